"""Whether this process runs under user-mode emulation (qemu-user, as the emulated ARM board
does): an Arm userland whose kernel reports x86 CPUs. Timings taken there mean nothing, and
every figure edgectl prints there says so."""

from __future__ import annotations

import functools
import platform


@functools.cache
def emulated() -> bool:
    if not platform.machine().startswith(("aarch64", "arm")):
        return False
    try:
        with open("/proc/cpuinfo") as f:
            return any(line.startswith("vendor_id") for line in f)
    except OSError:
        return False
