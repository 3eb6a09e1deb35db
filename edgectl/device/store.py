"""A content-addressed store on the device: a `.pte` sent over ssh once, by sha256, resumed and verified on arrival."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

from edgectl.device.ssh import run_ssh, ssh_argv, ssh_error
from edgectl.device.target import Target
from edgectl.formats.integrity import sha256_file
from edgectl.util import ui
from edgectl.util.errors import EdgectlError, UsageError

STORE = "$HOME/.cache/edgectl/store"  # as the device's shell expands it
CHUNK = 1 << 20
LARGE = 8 << 20  # progress lines from this size on


def remote_path(sha: str) -> str:
    """The store's name for a file with this sha256, for the device's shell (no quoting needed: hex)."""
    return f"{STORE}/{sha}.pte"


def _check_command(sha: str) -> str:
    f = remote_path(sha)
    return (f'f={f}; if [ -f "$f" ]; then echo "have $(wc -c < "$f")"; '
            f'else mkdir -p {STORE} && if [ -f "$f.part" ]; then echo "part $(wc -c < "$f.part")"; '
            'else echo "part 0"; fi; fi')


def _verify_command(sha: str) -> str:
    f = remote_path(sha)
    return (f'f={f}; if command -v sha256sum >/dev/null 2>&1; then s=$(sha256sum < "$f.part"); '
            'else s=$(python3 -c "import hashlib,sys; print(hashlib.sha256(sys.stdin.buffer.read()).hexdigest())" '
            '< "$f.part"); fi; s=${s%% *}; '
            f'if [ "$s" = {sha} ]; then mv -f "$f.part" "$f" && echo ok; else rm -f "$f.part"; echo "bad $s"; fi')


def _answer(target: Target, r: subprocess.CompletedProcess, what: str) -> list[str]:
    words = r.stdout.strip().splitlines()[-1].split() if r.stdout.strip() else []
    if r.returncode != 0 or not words:
        lines = [ln for ln in r.stderr.strip().splitlines() if ln.strip()]
        raise EdgectlError(f"{what} failed on {target.name} (exit {r.returncode}): "
                           f"{lines[-1].strip() if lines else 'no message'}",
                           hint="check the device's free disk space under ~/.cache/edgectl")
    return words


def _upload(target: Target, path: Path, sha: str, offset: int, size: int) -> None:
    """Append the file's bytes from `offset` to the device's `.part` file through one ssh."""
    f = remote_path(sha)
    proc = subprocess.Popen(ssh_argv(target, f'cat >> "{f}.part"'), stdin=subprocess.PIPE,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    sent, shown = offset, offset
    tty = ui.err.is_terminal
    try:
        with open(path, "rb") as src:
            src.seek(offset)
            while chunk := src.read(CHUNK):
                proc.stdin.write(chunk)
                sent += len(chunk)
                if size >= LARGE and (sent - shown >= (CHUNK * 4 if tty else size // 4) or sent == size):
                    ui.err.print(f"sent {sent / 1e6:.1f} of {size / 1e6:.1f} MB", end="\r" if tty else "\n")
                    shown = sent
        proc.stdin.close()
    except BrokenPipeError:
        pass
    except KeyboardInterrupt:
        proc.kill()  # the `.part` keeps what arrived: the next run resumes from there
        raise
    err = proc.stderr.read().decode(errors="replace")
    rc = proc.wait()
    if tty and size >= LARGE:
        ui.err.print()
    if rc == 255:
        raise ssh_error(target, err)
    if rc != 0:
        raise EdgectlError(f"sending {path.name} to {target.name} failed (exit {rc}): "
                           f"{err.strip().splitlines()[-1] if err.strip() else 'no message'}",
                           hint="run again to resume; check the device's free disk space")


def send(target: Target, path: Path) -> str:
    """Make sure the device's store holds `path` (a `.pte`); returns its remote path (for the
    device's shell). Sends nothing when it is there; resumes a `.part` left by an interrupted send."""
    if path.is_dir():
        raise UsageError(f"{path}: shard sets with --device are not supported yet", hint="give a .pte file")
    if not path.is_file():
        raise UsageError(f"no such file: {path}")
    if shutil.which("ssh") is None:
        raise EdgectlError("no ssh client on this machine", hint="install OpenSSH's client (apt install openssh-client)")
    size = path.stat().st_size
    sha = sha256_file(path)  # the whole file's: what sha256sum says there
    kind, n = _answer(target, run_ssh(target, _check_command(sha)), "checking the store")[:2]
    where = f"~/.cache/edgectl/store/{sha[:12]}….pte"
    if kind == "have" and int(n) == size:
        ui.info(f"on device already: {where}")
        return remote_path(sha)
    offset = int(n) if kind == "part" and int(n) <= size else 0
    if kind != "part" or offset != int(n):  # a file of the wrong size under the name, or a longer .part
        run_ssh(target, f'rm -f "{remote_path(sha)}" "{remote_path(sha)}.part"')
    ui.info(f"sending {path.name} ({size / 1e6:.1f} MB) to {target.name}: {where}"
            + (f", resuming at {offset / 1e6:.1f} MB" if offset else ""))
    if offset < size:
        _upload(target, path, sha, offset, size)
    words = _answer(target, run_ssh(target, _verify_command(sha)), "verifying the sent file")
    if words[0] != "ok":
        raise EdgectlError(f"{path.name} arrived damaged on {target.name}: sha256 {words[-1][:12]}…, "
                           f"expected {sha[:12]}… (the partial file is removed)", hint="run again to send it afresh")
    return remote_path(sha)
