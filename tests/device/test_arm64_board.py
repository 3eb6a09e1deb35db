"""The emulated aarch64 board that scripts/arm64-board.sh builds (Debian bookworm arm64 under
qemu-user, reached over ssh): it runs aarch64 code on the Cortex-A76 model, and its venv
imports ExecuTorch and loads ExecuTorch's runtime library, _portable_lib.

Skips (needs hardware) where the board is not built. A built board that is stopped is
started for these tests (that needs root) and stopped after them; a running one is left running.
Emulated: nothing here measures speed.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from conftest import REPO, needs_hardware

pytestmark = pytest.mark.arm64

SCRIPT = REPO / "scripts" / "arm64-board.sh"
BOARD = Path(os.environ.get("EDGECTL_BOARDS", Path.home() / ".cache" / "edgectl" / "boards")) / "bookworm-arm64"
PY = "/opt/edgectl/bin/python"  # the board's venv
TIMEOUT = 600  # emulated: importing torch takes a while


def _script(*args: str, timeout: int = TIMEOUT) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def board():
    """A function running a shell command in the board over ssh; returns its stdout, stripped.

    As root, the board's edgectl is first brought up to this checkout's (`build`: a no-op when
    it is, a reinstall of edgectl alone when not; refused, failing the test, while another
    session runs a board with other sources), then this test process counts as one of the
    board's users while the module runs (`start --pid`, which starts a stopped board, then
    `stop --pid`): the board stops after it only if no other session (a test run in another
    clone, a shell) still uses it. Not root: a running board is used as it is, and a stopped
    one skips."""
    if not ((BOARD / "stamps" / "complete").is_file() and (BOARD / "root").is_dir()):
        needs_hardware(f"the emulated aarch64 board in {BOARD} (build it: bash scripts/arm64-board.sh build)")
    me = str(os.getpid())
    if os.geteuid() == 0:
        r = _script("build", timeout=1800)  # a board built from other sources runs another edgectl
        assert r.returncode == 0, f"arm64-board.sh build failed:\n{r.stderr}"
        r = _script("start", "--pid", me)
        assert r.returncode == 0, f"arm64-board.sh start failed:\n{r.stderr}"
    elif "running:" not in _script("status").stdout:
        needs_hardware(f"the emulated aarch64 board running (as root: bash {SCRIPT} start)")

    def run(command: str) -> str:
        r = subprocess.run(["ssh", "-F", str(BOARD / "ssh_config"), "board", command],
                           capture_output=True, text=True, timeout=TIMEOUT)
        assert r.returncode == 0, f"in the board: {command!r} exited {r.returncode}:\n{r.stderr}"
        return r.stdout.strip()

    yield run
    if os.geteuid() == 0:
        r = _script("stop", "--pid", me)
        assert r.returncode == 0, f"arm64-board.sh stop failed:\n{r.stderr}"


def test_board_is_aarch64(board):
    assert board("uname -m") == "aarch64"


# HWCAP bit 22: SVE. qemu's default CPU model ("max") has it and computes wrong results in
# torch's kernels; the board pins the Cortex-A76 model (no SVE), also for a process started
# with an empty environment (the pin is in the binfmt handler, not in an environment variable).
_HWCAP = "import ctypes; c = ctypes.CDLL(None); c.getauxval.restype = ctypes.c_ulong; print(c.getauxval(16) >> 22 & 1)"


def test_board_cpu_is_cortex_a76(board):
    assert board(f"{PY} -c '{_HWCAP}'") == "0"
    assert board(f"env -i {PY} -c '{_HWCAP}'") == "0"
    assert board("cat /sys/devices/system/cpu/cpu0/regs/identification/midr_el1") == "0x00000000414fd0b0"


def test_board_imports_executorch(board):
    out = board(f"{PY} -c 'import executorch, edgectl; print(list(executorch.__path__)[0])'")
    assert out == "/opt/edgectl/lib/python3.11/site-packages/executorch"


_LOAD = """
import ctypes, glob, os, importlib.util
root = list(importlib.util.find_spec("executorch").submodule_search_locations)[0]
libs = glob.glob(os.path.join(root, "extension/pybindings/_portable_lib*.so"))
assert libs, "no _portable_lib in " + root
ctypes.CDLL(libs[0])
print(os.path.basename(libs[0]))
"""


def test_board_loads_portable_lib(board):
    out = board(f"{PY} -c '{_LOAD}'")
    assert out.startswith("_portable_lib") and out.endswith(".so")
