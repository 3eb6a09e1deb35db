"""`edgectl run --device`: the `.pte` sent to the device's store, then the device's edgectl run over ssh with its output streamed back."""

from __future__ import annotations

import codecs
import shlex
import subprocess
import sys
import threading
from pathlib import Path

from edgectl.device.info import FIND_PYTHON, NO_PYTHON
from edgectl.device.ssh import ssh_argv, ssh_error
from edgectl.device.store import send
from edgectl.device.target import Target
from edgectl.util.errors import EdgectlError, UsageError

MAIN = "import sys; from edgectl.cli.main import main; sys.exit(main(sys.argv[1:]))"


def remote_command(args: list[str]) -> str:
    """The device's shell command: edgectl run in the background, killed when our ssh's stdin
    closes (Ctrl-C here) or the session drops; its exit status is the command's."""
    run = f'PYTHONUNBUFFERED=1 "$p" -c {shlex.quote(MAIN)} run {" ".join(args)} < /dev/null'
    return (FIND_PYTHON + "exec 3<&0; " + run + " & pid=$!; "
            "( read _ <&3; kill $pid 2>/dev/null ) & w=$!; "
            "wait $pid; rc=$?; kill $w 2>/dev/null; exit $rc")


def run_args(remote_pte: str, prompt: str, n: int, temperature: float, top_p: float, seed: int | None,
             chat: bool, system: str | None, threads: int | None, json_out: bool) -> list[str]:
    """`edgectl run`'s arguments for the device, each quoted for its shell (the store path, hex, expands $HOME)."""
    args = [f'"{remote_pte}"', "-p", shlex.quote(prompt), "-n", str(n), "--temperature", repr(temperature),
            "--top-p", repr(top_p)]
    if seed is not None:
        args += ["--seed", str(seed)]
    if chat:
        args.append("--chat")
    if system is not None:
        args += ["--system", shlex.quote(system)]
    if threads is not None:
        args += ["--threads", str(threads)]
    if json_out:
        args.append("--json")
    return args


def _pump(src, dst) -> None:
    """Copy a pipe to a text stream as the bytes arrive (small reads, flushed)."""
    dec = codecs.getincrementaldecoder("utf-8")(errors="replace")
    while chunk := src.read1(4096) if hasattr(src, "read1") else src.read(4096):
        dst.write(dec.decode(chunk))
        dst.flush()
    dst.write(dec.decode(b"", final=True))
    dst.flush()


def run_remote(target: Target, artifact: Path, **run: object) -> int:
    """Send `artifact` to the device's store if it lacks it, run it there; returns the device's exit status."""
    if target.kind != "ssh":
        raise UsageError(f"{target.kind}: targets are not supported yet ({target.name})",
                         hint="use ssh:[user@]host[:port]")
    remote_pte = send(target, artifact)
    proc = subprocess.Popen(ssh_argv(target, remote_command(run_args(remote_pte, **run))),
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            start_new_session=True)  # a terminal's Ctrl-C reaches us, and we stop it there
    err_seen: list[str] = []

    class _Tee:
        def write(self, text: str) -> None:
            err_seen.append(text)
            sys.stderr.write(text)

        def flush(self) -> None:
            sys.stderr.flush()

    pumps = [threading.Thread(target=_pump, args=(proc.stdout, sys.stdout), daemon=True),
             threading.Thread(target=_pump, args=(proc.stderr, _Tee()), daemon=True)]
    for t in pumps:
        t.start()
    try:
        rc = proc.wait()
        for t in pumps:
            t.join()
    except BaseException:  # Ctrl-C, SIGTERM (Terminated): the device's run stops too
        _stop(proc)
        raise
    text = "".join(err_seen)
    if rc == 255:
        raise ssh_error(target, text)
    if rc == 127 and NO_PYTHON in text:
        raise EdgectlError(f"no python3 on {target.name}", hint="install Python 3 there (e.g. apt install python3)")
    return rc


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
