"""Whether a userland runs under user-mode emulation (qemu-user, as the emulated ARM board
does): an Arm userland whose kernel reports x86 CPUs. Timings taken there mean nothing, and
every figure edgectl prints there says so.

The one place that says it, for all three who ask: `emulated()` here (this process),
edgectl/device/adb.py (a phone's `uname -m` and /proc/cpuinfo, read over `adb shell`) and
edgectl/device/info.py's SCRIPT, which runs on an ssh device with the device's Python and
cannot import edgectl: it carries the source of EMBEDDED's functions (`inspect.getsource`).
So those functions stay self-contained: builtins only (no imports, no module-level names)
and annotations that an old Python evaluates (dict, not dict[str, str]).
"""

from __future__ import annotations

import functools
import platform


def read_cpuinfo() -> str:
    """/proc/cpuinfo's text; "" where there is none."""
    try:
        with open("/proc/cpuinfo") as f:
            return f.read()
    except OSError:
        return ""


def parse_cpuinfo(text: str) -> dict:
    """/proc/cpuinfo's `key: value` lines as a dict, each key's first value (the first CPU's)."""
    cpu = {}
    for line in text.splitlines():
        k, _, v = line.partition(":")
        cpu.setdefault(k.strip(), v.strip())
    return cpu


def emulated_from(machine: str, cpuinfo_text: str) -> bool:
    """An Arm userland (`machine`: uname -m, platform.machine()) whose /proc/cpuinfo is an
    x86 kernel's (vendor_id, flags: an Arm kernel says CPU implementer, Features)."""
    cpu = parse_cpuinfo(cpuinfo_text)
    return machine.startswith(("aarch64", "arm")) and any(k in cpu for k in ("vendor_id", "flags"))


# what edgectl/device/info.py's SCRIPT carries, in this order
EMBEDDED = (read_cpuinfo, parse_cpuinfo, emulated_from)


@functools.cache
def emulated() -> bool:
    """This process: emulated_from(platform.machine(), /proc/cpuinfo)."""
    return emulated_from(platform.machine(), read_cpuinfo())
