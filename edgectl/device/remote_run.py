"""edgectl on the device, over ssh: `run`, `bench` and `shard --remeasure` there, the artifacts
sent to the device's store first (store.py), the output streamed back as it is produced.

The device's shell finds the Python behind its `edgectl` (info.FIND_PYTHON), checks that its
edgectl is the same version as this one (one line and exit 1 otherwise: the two exchange
arguments and JSON), and runs `python -c MAIN SUBCOMMAND ARGS` in the background, killed when
our ssh's stdin closes (Ctrl-C here) or the session drops.
"""

from __future__ import annotations

import codecs
import io
import shlex
import subprocess
import sys
import threading
from pathlib import Path

from edgectl.device.info import FIND_PYTHON, INSTALL_HINT, NO_PYTHON, WHEEL_HINT
from edgectl.device.ssh import run_ssh, ssh_argv, ssh_error
from edgectl.device.store import send, send_set
from edgectl.device.target import Target
from edgectl.util import ui
from edgectl.util.errors import EdgectlError, UsageError
from edgectl.util.version import __version__

MAIN = "import sys; from edgectl.cli.main import main; sys.exit(main(sys.argv[1:]))"
NO_EDGECTL = "edgectl-device: no edgectl"
OTHER_VERSION = "edgectl-device: version "
REMEASURED = ".remeasured"  # in a set directory on the device: `shard --remeasure` ran there


class Remote(str):
    """A path on the device, as its shell expands it ($HOME/...): quoted with double quotes."""


def quote(args: list[str]) -> str:
    return " ".join(f'"{a}"' if isinstance(a, Remote) else shlex.quote(str(a)) for a in args)


def version_check(version: str = __version__) -> str:
    """Shell: exit 127 without edgectl for "$p", 126 when its version is not `version`."""
    probe = shlex.quote('import importlib.metadata as m; print(m.version("edgectl"))')
    return (f'v=$("$p" -c {probe} 2>/dev/null) || {{ echo "{NO_EDGECTL} for $p" >&2; exit 127; }}; '
            f'[ "$v" = {shlex.quote(version)} ] || {{ echo "{OTHER_VERSION}$v" >&2; exit 126; }}; ')


def remote_command(args: list[str]) -> str:
    """The device's shell command: `edgectl ARGS` in the background, killed when our ssh's stdin
    closes (Ctrl-C here) or the session drops; its exit status is the command's."""
    run = f'PYTHONUNBUFFERED=1 "$p" -c {shlex.quote(MAIN)} {quote(args)} < /dev/null'
    return (FIND_PYTHON + version_check() + "exec 3<&0; " + run + " & pid=$!; "
            "( read _ <&3; kill $pid 2>/dev/null ) & w=$!; "
            "wait $pid; rc=$?; kill $w 2>/dev/null; exit $rc")


def _pump(src, dst) -> None:
    """Copy a pipe to a text stream as the bytes arrive (small reads, flushed)."""
    dec = codecs.getincrementaldecoder("utf-8")(errors="replace")
    while chunk := src.read1(4096) if hasattr(src, "read1") else src.read(4096):
        dst.write(dec.decode(chunk))
        dst.flush()
    dst.write(dec.decode(b"", final=True))
    dst.flush()


class _Tee:
    """stderr, also kept (to name ssh's and the prelude's failures)."""

    def __init__(self):
        self.seen: list[str] = []

    def write(self, text: str) -> None:
        self.seen.append(text)
        sys.stderr.write(text)

    def flush(self) -> None:
        sys.stderr.flush()


def run_edgectl(target: Target, args: list[str], stdout=None) -> int:
    """`edgectl ARGS` on the device: its stdout streamed to `stdout` (default ours), its stderr
    to ours; returns its exit status. ssh's failures, no Python, no edgectl or another
    version of it there: one EdgectlError."""
    if target.kind != "ssh":
        raise UsageError(f"{target.kind}: targets are not supported here ({target.name})",
                         hint="use ssh:[user@]host[:port]")
    proc = subprocess.Popen(ssh_argv(target, remote_command(args)),
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            start_new_session=True)  # a terminal's Ctrl-C reaches us, and we stop it there
    tee = _Tee()
    pumps = [threading.Thread(target=_pump, args=(proc.stdout, stdout or sys.stdout), daemon=True),
             threading.Thread(target=_pump, args=(proc.stderr, tee), daemon=True)]
    for t in pumps:
        t.start()
    try:
        rc = proc.wait()
        for t in pumps:
            t.join()
    except BaseException:  # Ctrl-C, SIGTERM (Terminated): the device's run stops too
        _stop(proc)
        raise
    _check_prelude(target, rc, "".join(tee.seen))
    return rc


def _check_prelude(target: Target, rc: int, err: str) -> None:
    if rc == 255:
        raise ssh_error(target, err)
    if rc == 127 and NO_PYTHON in err:
        raise EdgectlError(f"no python3 on {target.name}", hint="install Python 3 there (e.g. apt install python3)")
    if rc == 127 and NO_EDGECTL in err:
        raise EdgectlError(f"edgectl is not installed on {target.name}", hint=INSTALL_HINT)
    if rc == 126 and OTHER_VERSION in err:
        theirs = err.split(OTHER_VERSION, 1)[1].split()[0] if err.split(OTHER_VERSION, 1)[1].split() else "?"
        raise EdgectlError(f"{target.name} has edgectl {theirs}, this machine {__version__}: the two must match",
                           hint=f"install edgectl {__version__} there: pip install edgectl=={__version__}, {WHEEL_HINT}")


def _stop(proc: subprocess.Popen) -> None:
    """Close ssh's stdin (the device's watcher kills the run), then end ssh itself."""
    try:
        proc.stdin.close()
    except OSError:
        pass
    try:
        proc.wait(timeout=5)
    except subprocess.TimeoutExpired:
        proc.terminate()
        try:
            proc.wait(timeout=2)
        except subprocess.TimeoutExpired:
            proc.kill()


def send_artifact(target: Target, artifact: Path) -> Remote:
    """A `.pte` to the store, a shard set to a set directory; its path there."""
    if artifact.is_dir():
        return Remote(send_set(target, artifact))
    if not artifact.is_file():
        raise UsageError(f"no such file or directory: {artifact}")
    return Remote(send(target, artifact))


def remeasure_once(target: Target, remote_dir: Remote, name: str) -> None:
    """`edgectl shard DIR --remeasure` on the device, once per set directory there: a budget
    is planned with the device's own load times, memory and step times."""
    r = run_ssh(target, f'[ -f "{remote_dir}/{REMEASURED}" ] && echo yes || echo no')
    if r.stdout.strip().endswith("yes"):
        return
    ui.info(f"measuring {name} on {target.name} (once; the device's figures plan its budgets)")
    rc = run_edgectl(target, ["shard", remote_dir, "--remeasure", "--json"], stdout=io.StringIO())
    if rc:
        raise EdgectlError(f"`edgectl shard --remeasure` of {name} failed on {target.name} (exit {rc})")
    run_ssh(target, f'touch "{remote_dir}/{REMEASURED}"')
