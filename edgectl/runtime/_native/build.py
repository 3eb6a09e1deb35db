"""Build the native shim (etshim.cpp) against the executorch wheel's headers and runtime library.

Compiled with the system C++ compiler into ~/.cache/edgectl/native/<hash of source and
executorch version>/ (atomic rename) the first time it is needed."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
from pathlib import Path

SRC = Path(__file__).with_name("etshim.cpp")


def executorch_dir() -> Path:
    """The executorch package's directory, found without importing any of its modules."""
    import importlib.util

    spec = importlib.util.find_spec("executorch")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("executorch is not installed")
    return Path(list(spec.submodule_search_locations)[0])


def runtime_library() -> Path:
    """ExecuTorch's runtime library: the Python binding's `_portable_lib*.so`, which also
    carries the portable and optimized kernels and the XNNPACK and OpenVINO backends."""
    pyb = executorch_dir() / "extension" / "pybindings"
    libs = sorted(pyb.glob("_portable_lib*.so"))
    if not libs:
        raise FileNotFoundError(f"no _portable_lib*.so in {pyb}")
    return libs[0]


def _paths():
    return executorch_dir(), runtime_library()


def _cache_dir() -> Path:
    return Path(os.environ.get("EDGECTL_CACHE", Path.home() / ".cache" / "edgectl")) / "native"


def build(quiet: bool = True) -> Path:
    """Compile the shim if needed; return the .so path. Raises on failure."""
    import importlib.metadata as md

    et, portable = _paths()
    key = hashlib.sha256(SRC.read_bytes() + md.version("executorch").encode() + str(portable).encode()).hexdigest()[:16]
    out = _cache_dir() / key / "etshim.so"
    if out.exists():
        return out
    cxx = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++") or shutil.which("clang++")
    if not cxx:
        raise FileNotFoundError("no C++ compiler (g++, c++ or clang++) on PATH")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".etshim.so.tmp-{os.getpid()}")
    cmd = [cxx, "-O2", "-std=c++17", "-shared", "-fPIC", "-fvisibility=hidden", "-DC10_USING_CUSTOM_GENERATED_MACROS",
           f"-I{et / 'include'}", f"-I{et / 'include/executorch/runtime/core/portable_type/c10'}",
           str(SRC), "-o", str(tmp), str(portable), f"-Wl,-rpath,{portable.parent}"]
    try:
        r = subprocess.run(cmd, capture_output=True, text=True)
        if r.returncode != 0:
            raise RuntimeError(f"compiling the native shim failed: {r.stderr.strip().splitlines()[-1] if r.stderr.strip() else r.returncode}")
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return out
