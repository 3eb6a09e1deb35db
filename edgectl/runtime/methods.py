"""How the runtime runs a program: ExecuTorch's runtime library through the native shim
(numpy arrays in and out, no torch), or its Python binding when the shim is unavailable."""

from __future__ import annotations

import ctypes
import os
from pathlib import Path

from edgectl.runtime.trace import Trace
from edgectl.util.errors import EdgectlError
from edgectl.util.native import native_stderr_captured


# glibc raises its mmap threshold to the size of every large block freed (up to 32 MB), so
# after the first logits or shard load, multi-MB blocks come from the main heap, whose
# holes it keeps: a budgeted perplexity run's [heap] crept from 151 to 189 MB over eight
# windows, streaming 8da4w shards, and peaked 50 MB above its steady state. A fixed
# threshold keeps large blocks in their own mappings, returned when freed (measured: heap
# flat at 131 MB, peak anonymous memory 431 -> 379 MB, decode speed unchanged).
MMAP_THRESHOLD = 256 << 10


def fixed_mmap_threshold(size: int = MMAP_THRESHOLD) -> None:
    """mallopt(M_MMAP_THRESHOLD, size): blocks of `size` bytes and more are mapped on
    their own (this also stops glibc's dynamic threshold). EDGECTL_MMAP_THRESHOLD=0 skips it."""
    env = os.environ.get("EDGECTL_MMAP_THRESHOLD")
    if env == "0":
        return
    try:
        ctypes.CDLL("libc.so.6").mallopt(-3, int(env) if env else size)  # M_MMAP_THRESHOLD
    except (OSError, AttributeError, ValueError):
        pass


def _load_runtime():
    """The Python binding's Runtime (the fallback without the native shim; imports torch)."""
    from edgectl.util.env import quiet_import_logs

    fixed_mmap_threshold()
    quiet_import_logs()
    from edgectl.backends.registry import prepare_runtime

    prepare_runtime()  # where the OpenVINO backend finds its library
    import torch

    # torch only moves KV-cache entries here; its intra-op threads would fight the
    # runtime's thread pool (zeroing the caches took 1.2 s on a busy 2-core machine).
    torch.set_num_threads(1)
    from executorch.runtime import Runtime

    import executorch.kernels.quantized  # noqa: F401  (registers quantized kernels)

    from edgectl.backends.custom_ops import load_custom_ops

    load_custom_ops()  # llama::update_cache / custom_sdpa: stock-form programs and layer shards (43 ms, 0.7 MB)
    return Runtime.get()


def set_threads(n: int | None) -> None:
    """Size ExecuTorch's thread pool, which XNNPACK and the optimized kernels share
    (default: what the runtime picks)."""
    if not n:
        return
    native = engine()
    if native is not None:
        native.set_threads(n)
        return
    from executorch.extension.pybindings import portable_lib

    reset = getattr(portable_lib, "_unsafe_reset_threadpool", None)
    if reset is None:
        raise EdgectlError("this executorch build cannot set the thread count")
    reset(n)


def engine():
    """The native shim over ExecuTorch's runtime library (torch-free), loaded once; None
    when it is unavailable (the reason printed once), and programs then run through the
    Python binding, which needs torch."""
    from edgectl.runtime import _native

    fixed_mmap_threshold()
    from edgectl.backends.registry import prepare_runtime

    prepare_runtime()  # where the OpenVINO backend finds its library, before the runtime looks
    import numpy  # noqa: F401  (the runtime's arrays: part of the runtime floor a budget measures, 12 MB)

    return _native.load()


class _NativeMethod:
    """A method loaded through the native shim: numpy arrays in, numpy arrays out."""

    name = "native"

    def __init__(self, native, path: Path, method: str = "forward"):
        self.native, self.handle = native, native.load(path, method)
        self.call = native.call(self.handle)
        self.last = [None] * self.call.nin  # the array each input points at now
        self.outs: dict[int, object] = {}

    def execute(self, inputs: list, out_elems: list[int], dtype="float32") -> list:
        """Run with `inputs`; output i is copied into a reused buffer of out_elems[i]
        elements (valid until the next call) and returned with its shape."""
        import numpy as np

        c, last = self.call, self.last
        for i, a in enumerate(inputs):
            if last[i] is not a:  # the KV caches and tables are the same arrays every call: set once
                c.set_input(i, a)
                last[i] = a
        for i, n in enumerate(out_elems):
            b = self.outs.get(i)
            if b is None or b.size < n:
                b = self.outs[i] = np.empty(n, dtype=dtype)
            c.set_output(i, b)
        c.run()
        res = []
        for i in range(len(out_elems)):
            shape = c.out_shape(i)
            n = 1
            for d in shape:
                n *= d
            res.append(self.outs[i][:n].reshape(shape))
        return res

    def close(self) -> None:
        if self.handle:
            self.native.free(self.handle)
            self.handle = None


class _BindingMethod:
    """A method loaded through ExecuTorch's Python binding (needs torch): the fallback
    without the native shim. Numpy in and out, shared with torch tensors (no copies)."""

    name = "binding"

    def __init__(self, path: Path, method: str = "forward"):
        rt = _load_runtime()
        with native_stderr_captured():
            try:
                self.program = rt.load_program(str(path))
            except (RuntimeError, ValueError) as e:
                raise EdgectlError(f"{path}: not a loadable ExecuTorch program ({e})") from e
            try:
                self.method = self.program.load_method(method)
            except RuntimeError as e:
                raise EdgectlError(f"{path}: cannot load its {method} method ({e})") from e
            from executorch.extension.pybindings import _portable_lib

            _portable_lib._threadpool_get_thread_count()  # built now (it logs cpuinfo probing), not at the first call

    def execute(self, inputs: list, out_elems: list[int], dtype="float32") -> list:
        import warnings

        import torch

        with warnings.catch_warnings():  # read-only mapped tables: the program only reads them
            warnings.simplefilter("ignore", UserWarning)
            args = [torch.from_numpy(a) for a in inputs]
        # custom_sdpa logs "No temp allocator provided" on every call through the binding
        with native_stderr_captured():
            outs = self.method.execute(args)
        return [o.numpy() for o in list(outs)[: len(out_elems)]]

    def close(self) -> None:
        self.method = self.program = None


def open_method(path: Path, trace: Trace, method: str = "forward"):
    """`method` of the program at `path`, through the native shim (or the binding without it)."""
    native = engine()
    with trace.span("load", "load_method"):
        if native is None:
            return _BindingMethod(path, method)
        with native_stderr_captured():
            try:
                m = _NativeMethod(native, path, method)
            except EdgectlError as e:
                if "error 0x20)" in str(e):  # NotFound: a backend this runtime lacks?
                    from edgectl.runtime.delegates import missing_backend

                    if (why := missing_backend(path)) is not None:
                        raise why from e
                raise EdgectlError(f"{path}: not a loadable ExecuTorch program ({str(e).split('(', 1)[-1].rstrip(')')})") from e
            native.thread_count()  # the pool is built now (it logs cpuinfo probing), not at the first call
        return m
