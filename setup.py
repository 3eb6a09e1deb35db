"""Build hook: compile the native shim (edgectl/runtime/_native/etshim.cpp) into the wheel.

Everything else is in pyproject.toml. The shim is declared as an extension, so the wheel is
a platform wheel (cpXY-cpXY-linux_<arch>: it links the executorch wheel's
`_portable_lib.cpython-XY-<arch>-linux-gnu.so`), and built by build_shim below as
edgectl/runtime/_native/etshim.so with its stamp, etshim.json. It is compiled against
executorch's headers and runtime library: the installed executorch if the build
environment has the pinned version (`--no-build-isolation`), else the executorch wheel
alone (`pip download --no-deps`, 18 MB, pip's cache as usual): a build requirement of
executorch would install torch and its CUDA packages (GBs) into every isolated build.
It finds the runtime library at run time through an rpath relative to itself.

Editable installs (`pip install -e .`) skip it: the shim is then compiled on first use
(build.py). A build without a compiler, or without the executorch wheel, still builds:
the wheel lacks the shim (a warning says why) and the first use compiles it, or falls
back. EDGECTL_REQUIRE_SHIM=1 makes that an error (scripts/wheel_smoke.sh sets it).
"""

from __future__ import annotations

import importlib.metadata as md
import importlib.util
import json
import os
import re
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent
_spec = importlib.util.spec_from_file_location("edgectl_shim_build", ROOT / "edgectl/runtime/_native/build.py")
shim = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(shim)


def pinned_executorch() -> str:
    m = re.search(r'"executorch==([^"]+)"', (ROOT / "pyproject.toml").read_text())
    if not m:
        raise RuntimeError("pyproject.toml pins no executorch version")
    return m.group(1)


def executorch_tree(version: str, tmp: Path) -> Path:
    """An executorch package directory with the headers and runtime library of `version`:
    the build environment's, or those two unpacked from its wheel into `tmp`."""
    try:
        if md.version("executorch") == version:
            return shim.executorch_dir()
    except md.PackageNotFoundError:
        pass
    wheels = tmp / "wheel"
    cmd = [sys.executable, "-m", "pip", "download", "-q", "--disable-pip-version-check", "--no-deps",
           "--only-binary=:all:", f"executorch=={version}", "-d", str(wheels)]
    r = subprocess.run(cmd, capture_output=True, text=True)
    found = sorted(wheels.glob("executorch-*.whl"))
    if r.returncode != 0 or not found:
        raise RuntimeError(f"cannot fetch the executorch=={version} wheel: {r.stderr.strip()[-300:] or r.returncode}")
    with zipfile.ZipFile(found[0]) as z:
        z.extractall(tmp / "tree", [n for n in z.namelist() if n.startswith("executorch/include/")
                                    or re.fullmatch(r"executorch/extension/pybindings/_portable_lib[^/]*\.so", n)])
    return tmp / "tree" / "executorch"


class build_shim(build_ext):
    def get_ext_filename(self, fullname: str) -> str:
        return os.path.join(*fullname.split(".")) + ".so"  # etshim.so: no Python module suffix

    def run(self) -> None:
        if self.editable_mode:  # not in the source tree: build.py compiles it into the cache on first use
            print("edgectl: editable install: the native shim is compiled on first use", file=sys.stderr)
            return
        super().run()

    def get_outputs(self) -> list[str]:
        return [] if self.editable_mode else super().get_outputs()

    def get_output_mapping(self) -> dict[str, str]:
        return {} if self.editable_mode else super().get_output_mapping()

    def build_extension(self, ext: Extension) -> None:
        out = Path(self.get_ext_fullpath(ext.name))
        try:
            version = pinned_executorch()
            with tempfile.TemporaryDirectory(prefix="edgectl-shim-") as tmp:
                et = executorch_tree(version, Path(tmp))
                portable = shim.runtime_library(et)
                shim.compile_shim(out, et, portable, shim.PREBUILT_RPATH)
                out.with_name(shim.STAMP.name).write_text(json.dumps(shim.stamp(version, portable), indent=1) + "\n")
        except (OSError, RuntimeError) as e:
            if os.environ.get("EDGECTL_REQUIRE_SHIM") == "1":
                raise
            print(f"edgectl: WARNING: the wheel ships no native shim ({e}); it is compiled on first use",
                  file=sys.stderr)


setup(ext_modules=[Extension("edgectl.runtime._native.etshim", sources=[])], cmdclass={"build_ext": build_shim})
