"""What a device is and can run: one Python script, fed over ssh on stdin, prints the facts
as JSON (CPU, memory, free disk, Python, edgectl and executorch versions, the native shim).

The script runs with the Python that runs the device's `edgectl` command (the first line
of that script), else `python3`. It needs nothing but the standard library for the facts,
and edgectl itself only for the native shim check, so a device without edgectl still answers.
"""

from __future__ import annotations

import inspect
import json

from edgectl.device.ssh import run_ssh
from edgectl.device.target import Target
from edgectl.util import emulation
from edgectl.util.errors import EdgectlError, UsageError

NO_PYTHON = "edgectl-device: no python3"
WHEEL_HINT = ("or a wheel from edgectl's sources: `pip wheel .` for an x86-64 device, `bash scripts/arm64-board.sh "
              "wheel` for an aarch64 one (there, torch from PyTorch's CPU index first: see the README's device section)")
INSTALL_HINT = f"install it there: pip install edgectl, {WHEEL_HINT}"

# run by the device's login shell: the python behind `edgectl` if there is one, else python3
FIND_PYTHON = (
    'p=; e=$(command -v edgectl 2>/dev/null) && p=$(sed -n "1s/^#! *//p" "$e" 2>/dev/null); '
    'case "$p" in */python*) [ -x "$p" ] || p=python3 ;; *) p=python3 ;; esac; '
    'command -v "$p" >/dev/null 2>&1 || { echo "' + NO_PYTHON + '" >&2; exit 127; }; '
)
REMOTE_COMMAND = FIND_PYTHON + 'exec "$p" -'

# the device's Python runs it without edgectl: emulation's functions travel as their source
SCRIPT = "".join(inspect.getsource(f) + "\n\n" for f in emulation.EMBEDDED) + r'''
import json, os, platform, shutil, sys
facts = {"machine": platform.machine(), "cpu": None, "cores": os.cpu_count(), "emulated": False,
         "mem_total_mb": None, "mem_available_mb": None, "disk_free_gb": None,
         "python": platform.python_version(), "python_path": sys.executable,
         "edgectl": None, "executorch": None, "native_shim": False, "native_why_not": None}
cpuinfo_text = read_cpuinfo()
cpu = parse_cpuinfo(cpuinfo_text)
# Arm: the core from its ID register (sysfs MIDR_EL1, else cpuinfo's "CPU part"); an
# emulated board's /proc/cpuinfo may be its host's
ARM = {0xd03: "Cortex-A53", 0xd04: "Cortex-A35", 0xd05: "Cortex-A55", 0xd07: "Cortex-A57",
       0xd08: "Cortex-A72", 0xd09: "Cortex-A73", 0xd0a: "Cortex-A75", 0xd0b: "Cortex-A76",
       0xd0c: "Neoverse-N1", 0xd0d: "Cortex-A77", 0xd41: "Cortex-A78", 0xd44: "Cortex-X1",
       0xd46: "Cortex-A510", 0xd47: "Cortex-A710", 0xd48: "Cortex-X2", 0xd4d: "Cortex-A715",
       0xd4e: "Cortex-X3", 0xd80: "Cortex-A520", 0xd81: "Cortex-A720", 0xd82: "Cortex-X4"}
part = implementer = None
try:
    with open("/sys/devices/system/cpu/cpu0/regs/identification/midr_el1") as f:
        midr = int(f.read().strip(), 16)
    implementer, part = midr >> 24 & 0xff, midr >> 4 & 0xfff
except (OSError, ValueError):
    try:
        implementer, part = int(cpu["CPU implementer"], 16), int(cpu["CPU part"], 16)
    except (KeyError, ValueError):
        pass
if part is not None:
    facts["cpu"] = ARM.get(part) if implementer == 0x41 and part in ARM else "Arm implementer 0x%02x part 0x%03x" % (implementer, part)
else:
    facts["cpu"] = cpu.get("model name") or cpu.get("Hardware") or None
facts["emulated"] = emulated_from(facts["machine"], cpuinfo_text)  # edgectl/util/emulation.py
try:
    with open("/proc/meminfo") as f:
        mem = {k: v.split()[0] for k, _, v in (line.partition(":") for line in f)}
    facts["mem_total_mb"] = int(mem["MemTotal"]) // 1024
    facts["mem_available_mb"] = int(mem["MemAvailable"]) // 1024
except (OSError, KeyError, ValueError, IndexError):
    pass
try:
    facts["disk_free_gb"] = round(shutil.disk_usage(os.path.expanduser("~")).free / 1e9, 1)
except OSError:
    pass
try:
    from importlib import metadata
    for dist in ("edgectl", "executorch"):
        try:
            facts[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            pass
except ImportError:
    pass
if facts["edgectl"] and "--no-shim" not in sys.argv[1:]:  # facts only (bench's row labels): no shim load
    try:
        from edgectl.runtime import _native
        try:
            native = _native.load(quiet=True)
        except TypeError:  # an older edgectl: load() takes no arguments
            native = _native.load()
        facts["native_shim"] = native is not None
        facts["native_why_not"] = _native.why_not()
        if native is not None:  # shipped in the package (a platform wheel), or compiled there on first use
            import importlib
            prebuilt = getattr(importlib.import_module("edgectl.runtime._native.build"), "prebuilt", None)
            facts["native_shim_prebuilt"] = bool(prebuilt and prebuilt()[0])
    except Exception as e:
        facts["native_why_not"] = "%s: %s" % (type(e).__name__, str(e).strip().splitlines()[0] if str(e).strip() else "")
print(json.dumps(facts))
'''


def device_info(target: Target, shim: bool = True) -> dict:
    """The device's facts (the dict SCRIPT prints); EdgectlError when it cannot say them,
    or when edgectl is not installed there. `shim` False skips loading the native shim there
    (native_shim stays False): the facts a bench row carries need no runtime library."""
    if target.kind != "ssh":
        raise UsageError(f"{target.kind}: targets are not supported yet ({target.name})",
                         hint="use ssh:[user@]host[:port]")
    r = run_ssh(target, REMOTE_COMMAND + ("" if shim else " --no-shim"), stdin=SCRIPT)
    if NO_PYTHON in r.stderr:
        raise EdgectlError(f"no python3 on {target.name}", hint="install Python 3 there (e.g. apt install python3)")
    if r.returncode != 0:
        lines = [ln for ln in r.stderr.strip().splitlines() if ln.strip()]
        raise EdgectlError(f"the info script failed on {target.name} (exit {r.returncode}): "
                           f"{lines[-1].strip() if lines else 'no message'}")
    try:
        facts = json.loads(r.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        raise EdgectlError(f"{target.name} answered with something other than the info JSON: "
                           f"{r.stdout.strip()[:120]!r}",
                           hint="a login script on the device may print to stdout") from None
    if not facts.get("edgectl"):
        raise EdgectlError(f"edgectl is not installed on {target.name} (for {facts.get('python_path')})",
                           hint=INSTALL_HINT)
    return facts
