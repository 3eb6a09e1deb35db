"""Emulation is said in one place (edgectl/util/emulation.py), and its three users give the
same answer on the same facts: `emulated()` for this process, edgectl/device/info.py's SCRIPT
(run here as a device would run it: its own Python, no edgectl, `python -S`) and
edgectl/device/adb.py's device_facts (its `adb shell` answered by a stand-in function)."""

from __future__ import annotations

import json
import platform
import subprocess
import sys

import pytest

from edgectl.device import adb
from edgectl.device.info import SCRIPT
from edgectl.device.target import parse_target
from edgectl.util import emulation

X86 = """processor\t: 0
vendor_id\t: GenuineIntel
cpu family\t: 6
model\t\t: 85
model name\t: Intel(R) Xeon(R) Gold 6230 CPU @ 2.10GHz
flags\t\t: fpu vme de pse tsc msr pae mce cx8 apic sep mtrr sse sse2 avx avx2 avx512f

processor\t: 1
vendor_id\t: GenuineIntel
"""

PI5 = """processor\t: 0
BogoMIPS\t: 108.00
Features\t: fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp cpuid asimdrdm lrcpc dcpop asimddp
CPU implementer\t: 0x41
CPU architecture: 8
CPU variant\t: 0x4
CPU part\t: 0xd0b
CPU revision\t: 1

Revision\t: d04170
Model\t\t: Raspberry Pi 5 Model B Rev 1.0
"""

CASES = [
    pytest.param("aarch64", X86, True, id="qemu-user-aarch64-on-x86"),
    pytest.param("armv7l", X86, True, id="qemu-user-armv7-on-x86"),
    pytest.param("aarch64", PI5, False, id="pi5-cortex-a76"),
    pytest.param("x86_64", X86, False, id="x86"),
    pytest.param("aarch64", "", False, id="arm-no-cpuinfo"),
]


def _here(monkeypatch, machine: str, cpuinfo: str) -> bool:
    monkeypatch.setattr(platform, "machine", lambda: machine)
    monkeypatch.setattr(emulation, "read_cpuinfo", lambda: cpuinfo)
    return emulation.emulated.__wrapped__()  # past the cache: this process's own answer is cached


def _info_script(tmp_path, machine: str, cpuinfo: str) -> dict:
    """SCRIPT's facts with `machine` for platform.machine() and `cpuinfo` for /proc/cpuinfo."""
    fake = tmp_path / "cpuinfo"
    fake.write_text(cpuinfo)
    preamble = (
        "import builtins, platform\n"
        "_open = builtins.open\n"
        f"builtins.open = lambda p, *a, **k: _open({str(fake)!r} if p == '/proc/cpuinfo' else p, *a, **k)\n"
        f"platform.machine = lambda: {machine!r}\n")
    r = subprocess.run([sys.executable, "-S", "-"], input=preamble + SCRIPT, capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout.strip().splitlines()[-1])


def _adb(monkeypatch, machine: str, cpuinfo: str, qemu: str = "") -> dict:
    # getprop model, soc, ro.kernel.qemu; uname -m; nproc; midr_el1; meminfo; cpuinfo
    answer = adb._SEP.join(["Pixel", "", qemu, machine, "8", "", "MemTotal: 8000000 kB", cpuinfo]) + adb._SEP
    monkeypatch.setattr(adb, "shell", lambda target, command, timeout=300: subprocess.CompletedProcess(
        ["adb", "shell", command], 0, stdout=answer, stderr=""))
    return adb.device_facts(parse_target("adb:standin-0"))


@pytest.mark.parametrize("machine, cpuinfo, want", CASES)
def test_three_paths_agree(monkeypatch, tmp_path, machine, cpuinfo, want):
    assert emulation.emulated_from(machine, cpuinfo) is want
    assert _here(monkeypatch, machine, cpuinfo) is want
    assert _info_script(tmp_path, machine, cpuinfo)["emulated"] is want
    assert _adb(monkeypatch, machine, cpuinfo)["emulated"] is want


def test_android_emulator_by_its_property(monkeypatch):
    """adb's own extra: Android's emulator says so (ro.kernel.qemu=1) whatever its cpuinfo."""
    assert _adb(monkeypatch, "aarch64", PI5, qemu="1")["emulated"] is True


def test_script_carries_the_functions_source():
    """SCRIPT holds emulation's functions as text (no copy to drift), and no edgectl import
    before the native shim check."""
    for f in emulation.EMBEDDED:
        assert f"def {f.__name__}(" in SCRIPT
    assert "import edgectl" not in SCRIPT.split("from edgectl.runtime import _native")[0]
    assert "from edgectl" not in SCRIPT.split("from edgectl.runtime import _native")[0]
