"""Run a command on a device through the system's `ssh` client: the user's own ssh config,
keys and agent, never a transport of edgectl's own.

Always `-o BatchMode=yes -o ConnectTimeout=10` (never a password prompt, never a hang on a
dead host); extra options from EDGECTL_SSH_OPTS (shell-split, e.g. `-F ~/boards/ssh_config`).
ssh's own failures (exit 255) become one-line errors: unreachable host, failed authentication.
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess

from edgectl.device.target import Target
from edgectl.util.errors import EdgectlError

BASE_OPTS = ["-o", "BatchMode=yes", "-o", "ConnectTimeout=10"]
_UNREACHABLE = ("connection refused", "timed out", "no route to host", "could not resolve",
                "name or service not known", "network is unreachable", "connection closed",
                "connection reset")
_AUTH = ("permission denied", "publickey", "too many authentication failures")


def ssh_argv(target: Target, command: str) -> list[str]:
    """The ssh command line running `command` (one string, run by the device's login shell)."""
    argv = ["ssh", *BASE_OPTS, *shlex.split(os.environ.get("EDGECTL_SSH_OPTS", ""))]
    if target.port:
        argv += ["-p", str(target.port)]
    if target.user:
        argv += ["-l", target.user]
    return [*argv, "--", target.host, command]


def _last_line(text: str) -> str:
    lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip()]
    return lines[-1] if lines else "no message"


def ssh_error(target: Target, stderr: str) -> EdgectlError:
    """ssh's exit 255 and its stderr as one error: unreachable, authentication, or other."""
    line = _last_line(stderr)
    low = stderr.lower()
    if any(p in low for p in _AUTH):
        return EdgectlError(f"authentication to {target.name} failed: {line}",
                            hint="check the user and that your key is loaded: ssh-add -l; try `ssh` to it by hand")
    if any(p in low for p in _UNREACHABLE):
        return EdgectlError(f"cannot reach {target.name}: {line}",
                            hint="check the device is on, its address and port, and that sshd runs on it")
    if "host key" in low:
        return EdgectlError(f"ssh to {target.name} failed: {line}",
                            hint="its host key is unknown or changed: connect once with `ssh` by hand to check it")
    return EdgectlError(f"ssh to {target.name} failed: {line}", hint="try `ssh` to it by hand to see why")


def run_ssh(target: Target, command: str, stdin: str = "", timeout: float = 300) -> subprocess.CompletedProcess:
    """Run `command` on the device, `stdin` fed to it; returns the finished process (any exit
    status but ssh's own 255, which raises the mapped EdgectlError)."""
    if shutil.which("ssh") is None:
        raise EdgectlError("no ssh client on this machine", hint="install OpenSSH's client (apt install openssh-client)")
    try:
        r = subprocess.run(ssh_argv(target, command), input=stdin, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise EdgectlError(f"{target.name} did not answer within {timeout:.0f} s",
                           hint="the device may be overloaded; try `ssh` to it by hand") from None
    if r.returncode == 255:
        raise ssh_error(target, r.stderr)
    return r
