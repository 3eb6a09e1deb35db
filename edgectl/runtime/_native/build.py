"""Build the native shim (etshim.cpp) against the executorch wheel's headers and runtime library.

The platform wheel ships it prebuilt (setup.py compiles it when the wheel is built) as
etshim.so beside this file, with etshim.json: the executorch version, runtime library
and source it was built from. `build()` returns that one when its stamp matches what is
installed and it loads; otherwise (an editable install, a stale or missing prebuilt) it
compiles the shim with the system C++ compiler into ~/.cache/edgectl/native/<hash of
source and executorch version>/ (atomic rename) the first time it is needed.

Imports only the standard library: setup.py loads this file by path."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
from pathlib import Path

SRC = Path(__file__).with_name("etshim.cpp")
PREBUILT = Path(__file__).with_name("etshim.so")
STAMP = Path(__file__).with_name("etshim.json")
# the shipped shim finds the runtime library relative to itself: site-packages/edgectl/
# runtime/_native -> site-packages/executorch/extension/pybindings
PREBUILT_RPATH = "$ORIGIN/../../../executorch/extension/pybindings"


def executorch_dir() -> Path:
    """The executorch package's directory, found without importing any of its modules."""
    import importlib.util

    spec = importlib.util.find_spec("executorch")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("executorch is not installed")
    return Path(list(spec.submodule_search_locations)[0])


def runtime_library(et: Path | None = None) -> Path:
    """ExecuTorch's runtime library: the Python binding's `_portable_lib*.so`, which also
    carries the portable and optimized kernels and the XNNPACK and OpenVINO backends.
    `et`: an executorch package directory (default: the installed one)."""
    pyb = (et or executorch_dir()) / "extension" / "pybindings"
    libs = sorted(pyb.glob("_portable_lib*.so"))
    if not libs:
        raise FileNotFoundError(f"no _portable_lib*.so in {pyb}")
    return libs[0]


def _paths():
    return executorch_dir(), runtime_library()


def _cache_dir() -> Path:
    return Path(os.environ.get("EDGECTL_CACHE", Path.home() / ".cache" / "edgectl")) / "native"


def find_compiler() -> str | None:
    return os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++") or shutil.which("clang++")


def compile_shim(out: Path, et: Path, portable: Path, rpath: str) -> None:
    """Compile etshim.cpp into `out` (atomic rename) against the executorch package at `et`
    and its runtime library `portable`, which the shim finds at run time through `rpath`.
    Raises FileNotFoundError without a compiler, RuntimeError if compiling fails."""
    cxx = find_compiler()
    if not cxx:
        raise FileNotFoundError("no C++ compiler (g++, c++ or clang++) on PATH")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    cmd = [cxx, "-O2", "-std=c++17", "-shared", "-fPIC", "-fvisibility=hidden", "-DC10_USING_CUSTOM_GENERATED_MACROS",
           f"-I{et / 'include'}", f"-I{et / 'include/executorch/runtime/core/portable_type/c10'}",
           str(SRC), "-o", str(tmp), str(portable), f"-Wl,-rpath,{rpath}"]
    try:
        r = subprocess.run(cmd, capture_output=True, text=True)
        if r.returncode != 0:
            raise RuntimeError(f"compiling the native shim failed: {r.stderr.strip().splitlines()[-1] if r.stderr.strip() else r.returncode}")
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)


def stamp(executorch_version: str, portable: Path) -> dict:
    """What a shim is built from: compared with etshim.json before the shipped one is used."""
    return {"executorch": executorch_version, "runtime_library": portable.name,
            "source_sha256": hashlib.sha256(SRC.read_bytes()).hexdigest()}


def _loads(so: Path) -> str | None:
    """None if `so` loads, else why not."""
    import ctypes

    try:
        ctypes.CDLL(str(so))
    except OSError as e:
        return str(e)
    return None


def prebuilt() -> tuple[Path | None, str]:
    """The shim shipped in the package, if present, built for the installed executorch and
    this source, and loadable; else None and why not."""
    import importlib.metadata as md

    if not PREBUILT.exists():
        return None, "no prebuilt shim in the package"
    try:
        shipped = json.loads(STAMP.read_text())
    except (OSError, ValueError):
        return None, f"the prebuilt shim has no readable {STAMP.name}"
    try:
        want = stamp(md.version("executorch"), runtime_library())
    except (md.PackageNotFoundError, FileNotFoundError) as e:
        return None, str(e)
    stale = [f"{k} {shipped.get(k)!r}, not {v!r}" for k, v in want.items() if shipped.get(k) != v]
    if stale:
        return None, f"the prebuilt shim is stale ({'; '.join(stale)})"
    why = _loads(PREBUILT)
    if why:
        return None, f"the prebuilt shim does not load ({why})"
    return PREBUILT, ""


def build(quiet: bool = True) -> Path:
    """The prebuilt shim if it fits, else the cached build (compiled if needed); return the
    .so path. Raises on failure."""
    import importlib.metadata as md

    so, why = prebuilt()
    if so is not None:
        return so
    et, portable = _paths()
    key = hashlib.sha256(SRC.read_bytes() + md.version("executorch").encode() + str(portable).encode()).hexdigest()[:16]
    out = _cache_dir() / key / "etshim.so"
    if out.exists():
        return out
    try:
        compile_shim(out, et, portable, str(portable.parent))
    except FileNotFoundError as e:
        raise FileNotFoundError(f"{e}, and {why}") from None
    return out
