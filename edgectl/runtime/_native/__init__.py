"""The native shim (etshim.cpp): load and execute ExecuTorch methods with the GIL released.

Built on first use with the system C++ compiler against the executorch wheel's headers
and its `_portable_lib` (the same library the Python binding loaded), into
~/.cache/edgectl/native/<hash of source and executorch version>/ (atomic rename). `load()`
returns None, with the reason in `why_not()`, when no compiler or the build fails:
callers then fall back to the Python binding (loads and compute do not overlap).
Set EDGECTL_NATIVE=0 to force the fallback.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

from edgectl.formats import integrity
from edgectl.util.errors import EdgectlError

from edgectl.runtime._native.build import build, runtime_library

_state: dict = {}


class Native:
    """ctypes front of etshim.so. Every call releases the GIL while it runs."""

    def __init__(self, so: Path):
        lib = ctypes.CDLL(str(so))
        vp, i32p, i64p = ctypes.c_void_p, ctypes.POINTER(ctypes.c_int32), ctypes.POINTER(ctypes.c_int64)
        lib.ets_load.argtypes = [ctypes.c_char_p, ctypes.c_char_p, vp, ctypes.c_size_t, ctypes.c_int, ctypes.c_char_p,
                                 ctypes.c_char_p, ctypes.c_size_t]
        lib.ets_planned_size.argtypes = [ctypes.c_char_p, ctypes.c_char_p]
        lib.ets_planned_size.restype = ctypes.c_int64
        lib.ets_load.restype = vp
        lib.ets_num_inputs.argtypes = lib.ets_num_outputs.argtypes = [vp]
        lib.ets_planned_bytes.argtypes = [vp]
        lib.ets_planned_bytes.restype = ctypes.c_size_t
        lib.ets_run.argtypes = [vp, ctypes.c_int, ctypes.POINTER(vp), i32p, i32p, ctypes.c_int, ctypes.POINTER(vp), i64p,
                                i32p, i32p, ctypes.c_char_p, ctypes.c_size_t]
        lib.ets_free.argtypes = [vp, ctypes.c_int]
        lib.ets_weight_cache_log_dropped.restype = lib.ets_weight_cache_errors.restype = ctypes.c_long
        lib.ets_run_layers.argtypes = [ctypes.c_int, ctypes.POINTER(vp), i32p, vp, ctypes.c_int, ctypes.c_int, vp,
                                       ctypes.POINTER(vp), ctypes.c_int, ctypes.c_int, ctypes.c_int,
                                       ctypes.c_int, ctypes.c_char_p, ctypes.c_size_t]
        self.lib, self.so = lib, so
        # the packed-weight cache's per-load log lines (see etshim.cpp) never reach the
        # terminal: the shim filters ExecuTorch's log hook, process-wide, by source file, so
        # nothing else written to fd 2 is touched (the loader thread loads while the main
        # thread may print). EDGECTL_DEBUG=1 keeps them.
        self.log_filtered = False
        if os.environ.get("EDGECTL_DEBUG") != "1":
            from edgectl.util.native import native_stderr_captured

            with native_stderr_captured():  # the runtime logs that the hook is replaced
                self.log_filtered = bool(lib.ets_quiet_weight_cache_log())

    def cache_log_dropped(self) -> int:
        """Packed-weight cache log messages dropped by the filter so far."""
        return self.lib.ets_weight_cache_log_dropped()

    def cache_errors(self) -> int:
        """Error messages from the packed-weight cache so far (not counting its harmless
        flock ones): a load during which this grew may have left its file incomplete."""
        return self.lib.ets_weight_cache_errors() if self.log_filtered else 0

    def planned_size(self, path: str | Path, method: str = "forward") -> int:
        integrity.ensure(path)  # a file a loaded manifest names: checked before the runtime parses it
        n = self.lib.ets_planned_size(str(path).encode(), method.encode())
        if n < 0:
            raise EdgectlError(f"{path}: not a loadable ExecuTorch program with a {method} method")
        return n

    def load(self, path: str | Path, method: str = "forward", arena=None, own_workspace: bool = False,
             cache_path: str | Path | None = None, readahead: bool = True) -> int:
        """Load a method; `arena` (a uint8 torch tensor) holds its planned memory if given.
        `own_workspace`: its XNNPACK delegates get their own workspace, so loading it does
        not wait for (or stall) methods executing in the shared one. `cache_path`: XNNPACK's
        packed-weight cache file for this program (written by a first load, mapped by later
        ones; None: no cache). `readahead`: read the whole file ahead; False when the cache
        holds the packed weights, so the raw constants are never read."""
        integrity.ensure(path)
        err = ctypes.create_string_buffer(512)
        ptr, size = (arena.data_ptr(), arena.numel()) if arena is not None else (None, 0)
        cp = str(cache_path).encode() if cache_path else None
        h = self.lib.ets_load(str(path).encode(), method.encode(), ptr, size, int(own_workspace) | (0 if readahead else 2), cp, err, 512)
        if not h:
            raise EdgectlError(f"{path}: cannot load {method} ({err.value.decode(errors='replace')})")
        return h

    def free(self, handle: int, trim: bool = True) -> None:
        """Free a loaded method. `trim`: return the freed heap pages to the OS (malloc_trim);
        without, the next load reuses them (no fresh page faults)."""
        self.lib.ets_free(handle, int(trim))

    def call(self, handle: int) -> "Call":
        return Call(self, handle)


class Chain:
    """Consecutive loaded layer shards run by one ets_run_layers call (h updated in place,
    the programs writing their new K/V entries into the caches): one ctypes call per
    forward pass instead of one per shard."""

    def __init__(self, native: Native, handles: list[int], n_layers: list[int], caches: list, nkv: int, hd: int, S: int):
        self.lib = native.lib
        self.n = len(handles)
        self.handles = (ctypes.c_void_p * self.n)(*handles)
        self.n_layers = (ctypes.c_int32 * self.n)(*n_layers)
        self.caches = (ctypes.c_void_p * len(caches))(*[t.data_ptr() for t in caches])
        self._keep = caches  # the caches must outlive the chain
        self.nkv, self.hd, self.S = nkv, hd, S
        self.err = ctypes.create_string_buffer(512)

    def run(self, h, pos, start: int) -> None:
        """h: contiguous fp32 [1, T, dim], updated in place; pos: int64 [T]."""
        T, dim = h.shape[1], h.shape[2]
        rc = self.lib.ets_run_layers(self.n, self.handles, self.n_layers, h.data_ptr(), T, dim, pos.data_ptr(),
                                     self.caches, self.nkv, self.hd, self.S, start, self.err, 512)
        if rc:
            raise EdgectlError(f"shard execution failed: {self.err.value.decode(errors='replace')}")


class Call:
    """Reusable argument arrays for one loaded method (inputs re-pointed each run)."""

    def __init__(self, native: Native, handle: int):
        lib = native.lib
        self.lib, self.h = lib, handle
        self.nin, self.nout = lib.ets_num_inputs(handle), lib.ets_num_outputs(handle)
        self.in_data = (ctypes.c_void_p * self.nin)()
        self.in_ndim = (ctypes.c_int32 * self.nin)()
        self.in_sizes = (ctypes.c_int32 * (8 * self.nin))()
        self.out_data = (ctypes.c_void_p * self.nout)()
        self.out_cap = (ctypes.c_int64 * self.nout)()
        self.out_sizes = (ctypes.c_int32 * (8 * self.nout))()
        self.out_ndim = (ctypes.c_int32 * self.nout)()
        self.err = ctypes.create_string_buffer(512)

    def set_input(self, i: int, t) -> None:
        self.in_data[i] = t.data_ptr()
        self.in_ndim[i] = t.dim()
        for d, s in enumerate(t.shape):
            self.in_sizes[8 * i + d] = s

    def set_output(self, i: int, t) -> None:
        self.out_data[i] = t.data_ptr()
        self.out_cap[i] = t.numel() * t.element_size()

    def run(self) -> None:
        rc = self.lib.ets_run(self.h, self.nin, self.in_data, self.in_ndim, self.in_sizes, self.nout, self.out_data,
                              self.out_cap, self.out_sizes, self.out_ndim, self.err, 512)
        if rc:
            raise EdgectlError(f"shard execution failed: {self.err.value.decode(errors='replace')}")

    def out_shape(self, i: int) -> tuple[int, ...]:
        return tuple(self.out_sizes[8 * i + d] for d in range(self.out_ndim[i]))


def load() -> Native | None:
    """The shim (building it on first use), or None with the reason in why_not()."""
    if "native" in _state:
        return _state["native"]
    native = None
    if os.environ.get("EDGECTL_NATIVE", "1") == "0":
        _state["why"] = "disabled by EDGECTL_NATIVE=0"
    else:
        try:
            from executorch.extension.pybindings import portable_lib  # noqa: F401  (the runtime the shim links to)

            native = Native(build())
        except (OSError, RuntimeError, FileNotFoundError, subprocess.SubprocessError) as e:
            _state["why"] = str(e)
            print(f"edgectl: native shim unavailable ({e}); loads will not overlap compute", file=sys.stderr)
    _state["native"] = native
    return native


def why_not() -> str | None:
    return _state.get("why")
