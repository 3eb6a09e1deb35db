"""The native shim (etshim.cpp): ExecuTorch's runtime library driven through ctypes, from numpy arrays.

`runtime()` loads ExecuTorch's runtime library (`_portable_lib`, its kernels and
backends), the LLM custom ops and the quantized kernels with ctypes, then the shim: no
torch, no Python binding. Every shim call releases the GIL while it runs, so a shard
loads on one thread while another computes. Inputs and outputs are numpy arrays (their
memory is passed as raw pointers).

The shim ships prebuilt in the platform wheel, or is built on first use (build.py).
`load()` returns None, with the reason in `why_not()`, when neither works: callers then
fall back to the Python binding, which needs torch. Set EDGECTL_NATIVE=0 to force that.
"""

from __future__ import annotations

import ctypes
import os
import subprocess
import sys
from pathlib import Path

from edgectl.formats import integrity
from edgectl.util.errors import EdgectlError

from edgectl.runtime._native.build import build, executorch_dir, runtime_library

_state: dict = {}

# ExecuTorch's operator libraries beside the runtime: the LLM custom ops
# (llama::update_cache, llama::custom_sdpa) and the quantized kernels. Loading one
# registers its kernels with the runtime (static initialisers); they link libtorch's C++
# libraries, which load without torch's Python package.
OP_LIBRARIES = ("extension/llm/custom_ops/libcustom_ops_aot_lib.so", "kernels/quantized/libquantized_ops_aot_lib.so")


def open_runtime() -> list[ctypes.CDLL]:
    """Load the runtime library and the operator libraries, once. The operator libraries
    and the shim name the runtime library as a dependency, and the Python binding, if
    imported later, is that same file: one kernel registry, one thread pool. Local symbols
    (RTLD_LOCAL): with global ones, the binding's data_loader module, which carries its own
    copy of the runtime's registry code, binds to this one and registers its kernels twice
    (an abort). Raises OSError if one cannot be loaded."""
    if "libs" not in _state:
        et = executorch_dir()
        libs = [ctypes.CDLL(str(runtime_library()))]
        libs += [ctypes.CDLL(str(et / rel)) for rel in OP_LIBRARIES if (et / rel).exists()]
        _state["libs"] = libs
    return _state["libs"]


def _ptr(a) -> int:
    """The address of a numpy array's data (or of an int, passed through)."""
    return a if isinstance(a, int) else a.ctypes.data


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
        lib.ets_set_threads.argtypes = [ctypes.c_int]
        lib.ets_quiet_library_log.argtypes = [ctypes.c_char_p]
        lib.ets_run_layers.argtypes = [ctypes.c_int, ctypes.POINTER(vp), i32p, vp, ctypes.c_int, ctypes.c_int, vp,
                                       ctypes.POINTER(vp), i32p, ctypes.c_int, ctypes.c_int, ctypes.c_int,
                                       ctypes.c_int, ctypes.c_char_p, ctypes.c_size_t]
        self.lib, self.so = lib, so
        lib.ets_init()
        # the packed-weight cache's per-load log lines (see etshim.cpp) never reach the
        # terminal: the shim filters ExecuTorch's log hook, process-wide, by source file, so
        # nothing else written to fd 2 is touched (the loader thread loads while the main
        # thread may print). EDGECTL_DEBUG=1 keeps them.
        self.log_filtered = False
        if os.environ.get("EDGECTL_DEBUG") != "1":
            from edgectl.util.native import native_stderr_captured

            with native_stderr_captured():  # the runtime logs that the hook is replaced
                self.log_filtered = bool(lib.ets_quiet_weight_cache_log())

    def set_threads(self, n: int) -> None:
        """Resize ExecuTorch's thread pool (XNNPACK and the optimized kernels) to n threads."""
        if self.lib.ets_set_threads(int(n)) != 0:
            raise EdgectlError(f"cannot set the runtime's thread pool to {n} threads")

    def thread_count(self) -> int:
        """Threads in the pool (creating it now: it probes the CPU, which logs)."""
        return self.lib.ets_thread_count()

    def quiet_library_log(self, path: str | Path) -> bool:
        """Filter the log of a loaded library with its own copy of ExecuTorch's platform
        layer (the LLM custom ops: "No temp allocator provided" on every eager call)."""
        if os.environ.get("EDGECTL_DEBUG") == "1":
            return False
        return bool(self.lib.ets_quiet_library_log(str(path).encode()))

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
        """Load a method; `arena` (a uint8 numpy array) holds its planned memory if given.
        `own_workspace`: its XNNPACK delegates get their own workspace, so loading it does
        not wait for (or stall) methods executing in the shared one. `cache_path`: XNNPACK's
        packed-weight cache file for this program (written by a first load, mapped by later
        ones; None: no cache). `readahead`: read the whole file ahead; False when the cache
        holds the packed weights, so the raw constants are never read."""
        integrity.ensure(path)
        err = ctypes.create_string_buffer(512)
        ptr, size = (_ptr(arena), arena.nbytes) if arena is not None else (None, 0)
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
        self.caches = (ctypes.c_void_p * len(caches))(*[_ptr(t) for t in caches])
        self.lens = (ctypes.c_int32 * len(caches))(*[t.shape[1] for t in caches])  # a sliding layer's: its ring
        self._keep = caches  # the caches must outlive the chain
        self.nkv, self.hd, self.S = nkv, hd, S
        self.err = ctypes.create_string_buffer(512)

    def run(self, h, pos, start: int) -> None:
        """h: contiguous fp32 [1, T, dim], updated in place; pos: int64 [T]."""
        T, dim = h.shape[1], h.shape[2]
        rc = self.lib.ets_run_layers(self.n, self.handles, self.n_layers, _ptr(h), T, dim, _ptr(pos),
                                     self.caches, self.lens, self.nkv, self.hd, self.S, start, self.err, 512)
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
        """Input i is the C-contiguous numpy array `t` (its memory, not a copy)."""
        self.in_data[i] = _ptr(t)
        self.in_ndim[i] = t.ndim
        for d, s in enumerate(t.shape):
            self.in_sizes[8 * i + d] = s

    def set_output(self, i: int, t) -> None:
        self.out_data[i] = _ptr(t)
        self.out_cap[i] = t.nbytes

    def run(self) -> None:
        rc = self.lib.ets_run(self.h, self.nin, self.in_data, self.in_ndim, self.in_sizes, self.nout, self.out_data,
                              self.out_cap, self.out_sizes, self.out_ndim, self.err, 512)
        if rc:
            raise EdgectlError(f"shard execution failed: {self.err.value.decode(errors='replace')}")

    def out_shape(self, i: int) -> tuple[int, ...]:
        return tuple(self.out_sizes[8 * i + d] for d in range(self.out_ndim[i]))


def load(quiet: bool = False) -> Native | None:
    """The shim (building it on first use), or None with the reason in why_not(), said
    once on stderr by the first call that is not `quiet` (export uses the shim only to
    quiet a log, so it says nothing)."""
    if "native" not in _state:
        native = None
        if os.environ.get("EDGECTL_NATIVE", "1") == "0":
            _state["why"] = "disabled by EDGECTL_NATIVE=0"
        else:
            try:
                open_runtime()
                native = Native(build())
            except (OSError, RuntimeError, FileNotFoundError, subprocess.SubprocessError) as e:
                _state["why"] = str(e)
                _state["tell"] = True
        _state["native"] = native
    if not quiet and _state.pop("tell", False):
        print(f"edgectl: native shim unavailable ({_state['why']}); running through the Python binding (needs torch)",
              file=sys.stderr)
    return _state["native"]


def quiet_custom_ops() -> None:
    """Filter the LLM custom-op library's "No temp allocator provided", logged on every
    eager call (the eager model's attention), through the shim; nothing without it."""
    native = load(quiet=True)
    if native is not None:
        native.quiet_library_log(executorch_dir() / OP_LIBRARIES[0])


def why_not() -> str | None:
    return _state.get("why")
