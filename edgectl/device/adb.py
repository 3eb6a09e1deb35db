"""An Android device through the system's `adb` (Debian's `adb` package): `adb -s SERIAL`
for shell, push and pull, never a transport of edgectl's own.

A content-addressed directory on the phone, /data/local/tmp/edgectl/store/<sha256><ext>:
a file is pushed only when missing, into <sha256>.part (an interrupted push resumes by
pushing the rest and appending it), verified with the device's `sha256sum` (toybox has it)
and then renamed. The runner (`llama_main`) goes to /data/local/tmp/edgectl/bin/llama_main
the same way, pushed again only when its sha256 differs.

adb's own failures (no such device, unauthorized, offline, no server) become one-line errors.
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import tempfile
from pathlib import Path

from edgectl.device.target import Target
from edgectl.formats.integrity import sha256_file
from edgectl.util import ui
from edgectl.util.emulation import emulated_from, parse_cpuinfo
from edgectl.util.errors import EdgectlError

ROOT = "/data/local/tmp/edgectl"
STORE = f"{ROOT}/store"
BIN = f"{ROOT}/bin"
RUNNER = f"{BIN}/llama_main"
INSTALL_HINT = "install Android's platform tools: apt install adb (Debian/Ubuntu), or put Google's platform-tools on PATH"
_NOT_FOUND = ("not found", "no devices", "no emulators")


def adb_argv(target: Target, *args: str) -> list[str]:
    """`adb -s SERIAL ARGS...`."""
    return ["adb", "-s", target.serial, *args]


def _last_line(text: str) -> str:
    lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip()]
    return lines[-1] if lines else "no message"


def adb_error(target: Target, stderr: str) -> EdgectlError | None:
    """adb's own failure in `stderr` as one error, or None when it names none (a device command's failure)."""
    own = [ln.strip() for ln in stderr.splitlines() if ln.strip().startswith(("adb:", "error:", "* daemon"))]
    if not own:  # a device command's own stderr, not adb's
        return None
    low, first = "\n".join(own).lower(), own[0]
    if "unauthorized" in low or "still authorizing" in low:
        return EdgectlError(f"{target.name} is unauthorized: {first}",
                            hint="unlock the phone and accept the 'Allow USB debugging?' dialog, then run again")
    if "offline" in low:
        return EdgectlError(f"{target.name} is offline: {first}",
                            hint="reconnect the cable or run `adb reconnect`; check `adb devices`")
    if any(p in low for p in _NOT_FOUND) and ("device" in low or "emulator" in low):
        return EdgectlError(f"no device {target.serial!r} on this machine's adb: {first}",
                            hint="see `adb devices` for the serials; enable USB debugging on the phone")
    if "cannot connect to daemon" in low or "failed to start daemon" in low:
        return EdgectlError(f"adb's server does not start: {_last_line(stderr)}",
                            hint="try `adb kill-server; adb start-server` by hand")
    return None


def _adb(target: Target, *args: str, timeout: float = 300, stdin: str | None = None) -> subprocess.CompletedProcess:
    if shutil.which("adb") is None:
        raise EdgectlError("no adb on this machine", hint=INSTALL_HINT)
    try:
        return subprocess.run(adb_argv(target, *args), input=stdin, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise EdgectlError(f"{target.name} did not answer within {timeout:.0f} s",
                           hint="check the cable and `adb devices`") from None


def check_device(target: Target) -> None:
    """`adb get-state` says "device", else the mapped one-line error."""
    r = _adb(target, "get-state", timeout=30)
    if r.returncode == 0 and r.stdout.strip() == "device":
        return
    raise adb_error(target, r.stderr + r.stdout) or EdgectlError(
        f"{target.name} is not ready: {_last_line(r.stderr + r.stdout)}", hint="see `adb devices`")


def shell(target: Target, command: str, timeout: float = 300) -> subprocess.CompletedProcess:
    """Run `command` in the device's shell; returns the finished process (the device's exit
    status), or raises when adb itself failed."""
    r = _adb(target, "shell", command, timeout=timeout)
    if r.returncode != 0 and (e := adb_error(target, r.stderr)) is not None:
        raise e
    return r


def shell_ok(target: Target, command: str, what: str, timeout: float = 300) -> list[str]:
    """The last stdout line's words of a device command that must succeed."""
    r = shell(target, command, timeout)
    words = r.stdout.strip().splitlines()[-1].split() if r.stdout.strip() else []
    if r.returncode != 0 or not words:
        raise EdgectlError(f"{what} failed on {target.name} (exit {r.returncode}): {_last_line(r.stderr or r.stdout)}",
                           hint=f"check the phone's free space under {ROOT} (adb shell df /data)")
    return words


def push(target: Target, local: Path, remote: str, timeout: float = 3600) -> None:
    """`adb push LOCAL REMOTE` (remote a plain path, no shell expansion)."""
    r = _adb(target, "push", str(local), remote, timeout=timeout)
    if r.returncode != 0:
        raise adb_error(target, r.stderr) or EdgectlError(
            f"pushing {local.name} to {target.name} failed: {_last_line(r.stderr or r.stdout)}",
            hint=f"run again to resume; check the phone's free space under {ROOT} (adb shell df /data)")


def pull(target: Target, remote: str, local: Path, timeout: float = 600) -> None:
    """`adb pull REMOTE LOCAL`."""
    r = _adb(target, "pull", remote, str(local), timeout=timeout)
    if r.returncode != 0:
        raise adb_error(target, r.stderr) or EdgectlError(
            f"pulling {remote} from {target.name} failed: {_last_line(r.stderr or r.stdout)}")


def _check_command(final: str, part: str, hash_existing: bool) -> str:
    have = 'echo "have $(wc -c < "$f")' + (' $(sha256sum < "$f")"' if hash_existing else '"')
    return (f"f={final}; p={part}; if [ -f \"$f\" ]; then {have}; "
            f"else mkdir -p {STORE} {BIN} && if [ -f \"$p\" ]; then echo \"part $(wc -c < \"$p\")\"; "
            "else echo \"part 0\"; fi; fi")


def _verify_command(final: str, part: str, sha: str, mode: str) -> str:
    return (f"p={part}; s=$(sha256sum < \"$p\"); s=${{s%% *}}; "
            f"if [ \"$s\" = {sha} ]; then chmod {mode} \"$p\" && mv -f \"$p\" {final} && echo ok; "
            "else rm -f \"$p\"; echo \"bad $s\"; fi")


def _append_rest(target: Target, path: Path, part: str, offset: int) -> None:
    """Resume: push the bytes from `offset` on as `part.rest`, append them to `part` there."""
    with tempfile.NamedTemporaryFile(prefix="edgectl-push-", suffix=".rest", delete=False) as tmp:
        with open(path, "rb") as src:
            src.seek(offset)
            shutil.copyfileobj(src, tmp, 1 << 20)
    try:
        push(target, Path(tmp.name), f"{part}.rest")
    finally:
        os.unlink(tmp.name)
    shell_ok(target, f'cat "{part}.rest" >> "{part}" && rm -f "{part}.rest" && echo ok', "appending the rest")


def ensure(target: Target, path: Path, final: str, sha: str | None = None, mode: str = "644",
           content_addressed: bool = True) -> str:
    """Make sure the device holds `path` at `final` (a path needing no shell quoting); returns
    `final`. Pushes nothing when it is there (by name and size in the store; by sha256 for a
    fixed name, `content_addressed=False`); resumes a `.part` left by an interrupted push;
    verifies the sha256 on the device before renaming."""
    size = path.stat().st_size
    sha = sha or sha256_file(path)
    part = f"{STORE}/{sha}.part"
    words = shell_ok(target, _check_command(final, part, not content_addressed), "checking the store")
    kind, n = words[0], int(words[1])
    if kind == "have" and n == size and (content_addressed or words[2:3] == [sha]):
        ui.info(f"on device already: {final}")
        return final
    offset = n if kind == "part" and n <= size else 0
    if kind == "part" and n > size:
        shell_ok(target, f'rm -f "{part}" && echo ok', "removing a stale partial file")
    ui.info(f"pushing {path.name} ({size / 1e6:.1f} MB) to {target.name}: {final}"
            + (f", resuming at {offset / 1e6:.1f} MB" if offset else ""))
    if offset == 0:
        push(target, path, part)
    elif offset < size:
        _append_rest(target, path, part, offset)
    words = shell_ok(target, _verify_command(final, part, sha, mode), "verifying the pushed file")
    if words[0] != "ok":
        raise EdgectlError(f"{path.name} arrived damaged on {target.name}: sha256 {words[-1][:12]}…, "
                           f"expected {sha[:12]}… (the partial file is removed)", hint="run again to push it afresh")
    return final


def store_path(sha: str, ext: str) -> str:
    """The store's name for a file with this sha256 and extension (".pte", ".model", ".json")."""
    return f"{STORE}/{sha}{ext}"


def send(target: Target, path: Path) -> str:
    """Push `path` to the device's store if it lacks it; returns its path there."""
    sha = sha256_file(path)
    return ensure(target, path, store_path(sha, path.suffix), sha)


BUILD_HINT = ("build ExecuTorch's llama_main for Android (README: 'Android over adb'): cmake with "
              "-DCMAKE_TOOLCHAIN_FILE=$ANDROID_NDK/build/cmake/android.toolchain.cmake -DANDROID_ABI=arm64-v8a, "
              "XNNPACK and the LLM extension on, then examples/models/llama; pass it with --runner PATH")


def clean(target: Target, dry_run: bool = False) -> dict:
    """Empty the phone's store (the runner in bin/ stays): as store.clean()."""
    from edgectl.device.store import clean_result

    check_device(target)
    r = shell(target, f'n=$(ls {STORE} 2>/dev/null | wc -l); k=$(du -sk {STORE} 2>/dev/null | cut -f 1); '
                      f'echo "$n 0 ${{k:-0}}"' + ("" if dry_run else f" && rm -rf {STORE}"))
    return clean_result(target, r.returncode, r.stdout, r.stderr, dry_run)


def ensure_runner(target: Target, runner: Path | None) -> str:
    """`llama_main` on the device: `runner` pushed once (by sha256), else the one already there."""
    if runner is not None:
        if not runner.is_file():
            raise EdgectlError(f"--runner {runner}: no such file", hint=BUILD_HINT)
        return ensure(target, runner, RUNNER, mode="755", content_addressed=False)
    r = shell(target, f"[ -x {RUNNER} ] && echo yes || echo no")
    if r.stdout.strip().splitlines()[-1:] != ["yes"]:
        raise EdgectlError(f"no llama_main on {target.name} ({RUNNER}) and no --runner given", hint=BUILD_HINT)
    return RUNNER


def quote(text: str) -> str:
    """One argument for the device's shell (Android's mksh takes POSIX single quotes)."""
    return shlex.quote(text)


_SEP = "@@edgectl@@"
_FACTS = "; ".join(f"{c} 2>/dev/null; echo {_SEP}" for c in (
    "getprop ro.product.model", "getprop ro.soc.model", "getprop ro.kernel.qemu", "uname -m", "nproc",
    "cat /sys/devices/system/cpu/cpu0/regs/identification/midr_el1", "cat /proc/meminfo", "cat /proc/cpuinfo"))
# Arm's cores by MIDR part number (implementer 0x41), as edgectl/device/info.py names them
_ARM = {0xd03: "Cortex-A53", 0xd04: "Cortex-A35", 0xd05: "Cortex-A55", 0xd07: "Cortex-A57", 0xd08: "Cortex-A72",
        0xd09: "Cortex-A73", 0xd0a: "Cortex-A75", 0xd0b: "Cortex-A76", 0xd0d: "Cortex-A77", 0xd41: "Cortex-A78",
        0xd44: "Cortex-X1", 0xd46: "Cortex-A510", 0xd47: "Cortex-A710", 0xd48: "Cortex-X2", 0xd4d: "Cortex-A715",
        0xd4e: "Cortex-X3", 0xd80: "Cortex-A520", 0xd81: "Cortex-A720", 0xd82: "Cortex-X4"}


def _core(midr: int | None, cpuinfo: dict) -> str | None:
    try:
        implementer, part = ((midr >> 24) & 0xff, (midr >> 4) & 0xfff) if midr is not None else (
            int(cpuinfo["CPU implementer"], 16), int(cpuinfo["CPU part"], 16))
    except (KeyError, ValueError):
        return None
    return _ARM.get(part) if implementer == 0x41 and part in _ARM else f"Arm implementer 0x{implementer:02x} part 0x{part:03x}"


def device_facts(target: Target) -> dict:
    """{name, cpu, cores, mem_total_bytes, machine, emulated} from getprop, /proc and nproc (one adb shell).
    `emulated`: Android's emulator (ro.kernel.qemu) or an arm64 userland whose /proc/cpuinfo is an x86 host's."""
    r = shell(target, _FACTS, timeout=60)
    parts = [p.strip() for p in r.stdout.split(_SEP)]
    model, soc, qemu, machine, nproc, midr_text, meminfo, cpuinfo_text = (parts + [""] * 8)[:8]
    cpuinfo = parse_cpuinfo(cpuinfo_text)
    mem = {k.strip(): v.split() for k, _, v in (ln.partition(":") for ln in meminfo.splitlines())}
    try:
        midr = int(midr_text.split()[0], 16)
    except (IndexError, ValueError):
        midr = None
    return {
        "name": model or target.serial,
        "cpu": soc or _core(midr, cpuinfo) or cpuinfo.get("Hardware") or cpuinfo.get("model name"),
        "cores": int(nproc) if nproc.isdigit() else None,
        "mem_total_bytes": int(mem["MemTotal"][0]) * 1024 if mem.get("MemTotal", [""])[0].isdigit() else None,
        "machine": machine or None,
        "emulated": qemu == "1" or emulated_from(machine, cpuinfo_text),
    }
