"""Loading shards: one loaded program per shard, and the pipelined loader thread.

Two engines, same small interface (`load(path) -> Loaded`, `Loaded.run(inputs) -> outputs`,
`Loaded.free()`):
- `NativeEngine` (edgectl/_native): load and execute through a C shim called with ctypes,
  which releases the GIL, so the loader thread really loads while the main thread
  computes. All shards share one planned-memory arena (they run one at a time).
  Streamed shards get an XNNPACK workspace of their own: with the default process-wide
  one, XNNPACK's workspace lock serialises a shard's weight packing with every other
  shard's execute (measured: compute fell to 9% of its speed while a loader ran).
- `PyEngine`: executorch's Python binding, the fallback when the shim cannot be built.
  It holds the GIL inside load and execute, so loads and compute serialise, and it needs
  torch (the binding takes torch tensors; both engines take and return numpy arrays).

`Loader` streams shards in forward order, one slot ahead of the executor (two slots:
the shard running and the shard loading), cyclically across forward calls, and frees
each shard after it has run.
"""

from __future__ import annotations

import queue
import threading
from pathlib import Path

from edgectl.formats import integrity
from edgectl.util.errors import EdgectlError
from edgectl.runtime.trace import Trace
from edgectl.util.native import malloc_trim, native_stderr_captured


import os

# EDGECTL_TRIM_STREAMED=1: trim the heap after every streamed shard too (the old behaviour)
TRIM_STREAMED = os.environ.get("EDGECTL_TRIM_STREAMED", "0") == "1"


class _NativeLoaded:
    def __init__(self, engine: "NativeEngine", path: Path, streamed: bool, own_workspace: bool | None = None):
        self.engine, self.path = engine, path
        own = streamed if own_workspace is None else own_workspace
        self.handle = engine.load_handle(path, own)
        self.streamed = streamed
        self.call = engine.native.call(self.handle)
        self.outs: dict[int, object] = {}

    def run(self, inputs: list, out_caps: list[int]) -> list:
        """Run with `inputs` (C-contiguous numpy arrays); outputs are views into staging
        buffers of out_caps[i] elements (fp32), valid until the next run."""
        c = self.call
        for i, t in enumerate(inputs):
            c.set_input(i, t)
        for i, cap in enumerate(out_caps):
            buf = self.engine.staging(i, cap)
            c.set_output(i, buf)
        c.run()
        return [self.engine.staging(i, cap)[: _numel(c.out_shape(i))].reshape(c.out_shape(i)) for i, cap in enumerate(out_caps)]

    def free(self) -> None:
        if self.handle:
            # A streamed shard's heap pages (packed weights, workspace) go to the next streamed
            # shard, which loads at once, instead of back to the OS: it then faults in ~40
            # fresh pages instead of ~1,900 (measured, SmolLM2 layer, 8da4w). The planner
            # already counts a slot's worth of them.
            self.engine.native.free(self.handle, trim=TRIM_STREAMED or not self.streamed)
            self.handle = None


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


class NativeEngine:
    name = "native"

    def __init__(self, native, arena_bytes: int, packed=None, keys: dict | None = None):
        """`packed`: a packed_cache.PackedCache (None: packed_cache.default()); `keys`: each
        program's sha256 by path (the manifest's), which names its cache file. A program
        without one loads uncached."""
        import numpy as np

        from edgectl.runtime import packed_cache

        self.native = native
        self.arena = np.zeros(max(arena_bytes, 64), dtype=np.uint8)
        self.arena.fill(0)  # touched now (np.zeros maps fresh pages lazily): it is part of the cost
        self._staging: dict[int, object] = {}
        if packed is None:
            packed = packed_cache.default()
        # without the log filter, every cached load would print three lines on stderr
        if packed is not None and not (native.log_filtered or os.environ.get("EDGECTL_DEBUG") == "1"):
            packed = None
        self.packed = packed
        self.keys = {str(k): v for k, v in (keys or {}).items()}

    def load_handle(self, path: Path, own_workspace: bool) -> int:
        kw = {"arena": self.arena, "own_workspace": own_workspace}
        if self.packed is None:
            return self.native.load(path, **kw)
        return self.packed.load(self.native, path, self.keys.get(str(path)), **kw)

    def planned_size(self, path: Path) -> int:
        return self.native.planned_size(path)

    def readahead(self, path: Path) -> None:
        """Ask the kernel to read, in the background, what loading and first running `path`
        will touch: its packed-weight cache file when there is one (XNNPACK maps it, and a
        cold run would otherwise fault it in page by page while computing), else the .pte."""
        f = (self.packed.existing(self.keys.get(str(path))) if self.packed is not None else None) or path
        willneed(f)

    def staging(self, i: int, cap: int):
        import numpy as np

        b = self._staging.get(i)
        if b is None or b.size < cap:
            b = self._staging[i] = np.empty(cap, dtype=np.float32)
        return b

    def load(self, path: Path, streamed: bool = False, own_workspace: bool | None = None) -> _NativeLoaded:
        """`streamed`: the shard will be evicted soon after it runs (its heap pages are kept
        for the next one), and by default gets its own XNNPACK workspace. XNNPACK locks a
        delegate's workspace for the whole of its init (weight packing) and of each
        execute; in the shared workspace, a loader thread's load would stall resident
        shards' compute. Loaded by the executor itself (on-demand) nothing runs meanwhile:
        `own_workspace=False` then saves the workspace's memory and first-run set-up."""
        return _NativeLoaded(self, path, streamed, own_workspace)


class _PyLoaded:
    def __init__(self, rt, path: Path):
        integrity.ensure(path)  # before the runtime reads a byte of it (edgectl/formats/integrity.py)
        with native_stderr_captured():
            try:
                self.program = rt.load_program(str(path))
                self.method = self.program.load_method("forward")
            except (RuntimeError, ValueError) as e:
                raise EdgectlError(f"{path}: cannot load ({e})") from e

    def run(self, inputs: list, out_caps: list[int]) -> list:
        """numpy in and out, shared with torch tensors (the binding takes torch only)."""
        import warnings

        import torch

        with warnings.catch_warnings():  # read-only mapped tables: the program only reads them
            warnings.simplefilter("ignore", UserWarning)
            args = [torch.from_numpy(a) for a in inputs]
        # a layer's custom_sdpa logs "No temp allocator provided" on every call through the
        # Python binding (the native shim gives it one): kept off the terminal
        with native_stderr_captured():
            return [o.numpy() for o in list(self.method.execute(args))[: len(out_caps)]]

    def free(self) -> None:
        self.method = self.program = None
        malloc_trim()


def willneed(path: Path) -> None:
    """Background readahead of the whole file (nothing if it cannot)."""
    from edgectl.util.files import advise

    advise(path, os.POSIX_FADV_WILLNEED)


class PyEngine:
    name = "python"

    def __init__(self, rt):
        self.rt = rt

    def planned_size(self, path: Path) -> int:
        return 0

    def readahead(self, path: Path) -> None:
        willneed(path)

    def load(self, path: Path, streamed: bool = False, own_workspace: bool | None = None) -> _PyLoaded:
        return _PyLoaded(self.rt, path)


def prefetch(paths: list[Path], trace: Trace) -> threading.Thread:
    """Read `paths` into the page cache, in order, on a background thread (plain reads
    release the GIL): from a cold start the disk streams the whole shard set in forward
    order while the main thread unpacks shards already read. A file already cached
    costs a memory copy. Trace lane "read", one span per file."""

    def run() -> None:
        buf = bytearray(4 << 20)
        for p in paths:
            try:
                with trace.span("read", p.name), open(p, "rb", buffering=0) as f:
                    while f.readinto(buf):
                        pass
            except OSError:
                pass  # the loader reports missing or unreadable files itself

    t = threading.Thread(target=run, name="edgectl-prefetch", daemon=True)
    t.start()
    return t


class Loader:
    """A thread that loads `order` (shard name, path) cyclically into `slots` buffers.

    `take(name)` hands the executor the next shard (waiting if it is still loading);
    `done(loaded)` frees it and returns its slot to the loader."""

    def __init__(self, engine, order: list[tuple[str, Path]], trace: Trace, slots: int = 2):
        self.engine, self.order, self.trace = engine, order, trace
        self.slots = threading.Semaphore(slots)
        self.ready: queue.Queue = queue.Queue()
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, name="edgectl-loader", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        i = 0
        while not self.stop.is_set():
            self.slots.acquire()
            if self.stop.is_set():
                break
            name, path = self.order[i % len(self.order)]
            # the next shard's file is read while this one loads and runs (one file ahead:
            # reading the whole streamed set at once got capped runs OOM-killed)
            self.engine.readahead(self.order[(i + 1) % len(self.order)][1])
            try:
                with self.trace.span("load", name):
                    loaded = self.engine.load(path, streamed=True)
            except BaseException as e:  # handed to the executor, which raises it
                self.ready.put((name, e))
                return
            self.ready.put((name, loaded))
            i += 1

    def take(self, name: str):
        got, loaded = self.ready.get()
        if isinstance(loaded, BaseException):
            raise loaded
        if got != name:
            raise EdgectlError(f"loader out of step: expected {name}, got {got}")
        return loaded

    def done(self, loaded) -> None:
        loaded.free()
        self.slots.release()

    def close(self) -> None:
        self.stop.set()
        self.slots.release()
        self.thread.join(timeout=10)
        while not self.ready.empty():
            _, loaded = self.ready.get_nowait()
            if not isinstance(loaded, BaseException):
                loaded.free()
