"""Runtime: load an edgectl `.pte`, own the KV cache, run prefill/decode steps.

Every artifact `run` and `bench` accept implements the `Model` protocol below (the
monolithic `.pte` here; the shard set in a later module), and records what it does in a
`Trace` (spans on named lanes) that `bench --plot` draws.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from edgectl.formats import integrity
from edgectl.util.errors import EdgectlError
from edgectl.model import KV_LAYOUT, ModelArgs, cache_shapes
from edgectl.formats.ptefile import constant_bytes
from edgectl.runtime.trace import Trace
from edgectl.util.native import malloc_trim, native_stderr_captured


class Model(Protocol):
    meta: dict
    max_seq_len: int
    trace: Trace

    def reset(self) -> None: ...

    def forward(self, tokens: list[int], start: int, all_logits: bool = False) -> "torch.Tensor": ...  # noqa: F821


def set_threads(n: int | None) -> None:
    """Size the ExecuTorch/XNNPACK thread pool (default: what the runtime picks)."""
    if not n:
        return
    from executorch.extension.pybindings import portable_lib

    reset = getattr(portable_lib, "_unsafe_reset_threadpool", None)
    if reset is None:
        raise EdgectlError("this executorch build cannot set the thread count")
    reset(n)


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


class KVCache:
    """The KV cache, per layer, in fresh anonymous mappings (shapes of model.cache_shapes).

    A page of it costs memory only once written: a run that uses the first n positions
    pays for those (the planner's kv_cache_bytes counts exactly these pages), not for
    max_seq_len. `reset` hands the pages back (MADV_DONTNEED: they read as zeros again)
    instead of writing zeros over the whole cache, which would charge all of it."""

    def __init__(self, args: ModelArgs, max_seq_len: int, n_layers: int):
        import mmap

        import torch

        self._maps = []

        def zeros(shape):
            n_el = 1
            for d in shape:
                n_el *= d
            # private: MADV_DONTNEED then frees the pages and they read as zeros (a shared
            # anonymous mapping, mmap's default, would keep them in shmem with their data)
            mm = mmap.mmap(-1, n_el * 4, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
            self._maps.append(mm)
            return torch.frombuffer(mm, dtype=torch.float32).view(shape)

        ks, vs = cache_shapes(args, max_seq_len)
        self.k = [zeros(ks) for _ in range(n_layers)]
        self.v = [zeros(vs) for _ in range(n_layers)]

    def reset(self) -> None:
        import mmap

        for mm in self._maps:
            mm.madvise(mmap.MADV_DONTNEED)


def usable_context(context: int | None, max_seq_len: int) -> int:
    """Positions a run may use: its `context` (a smaller KV footprint), at most the
    artifact's max_seq_len."""
    if context is None:
        return max_seq_len
    if context < 2:
        raise EdgectlError(f"--ctx-size {context}: a run needs at least 2 positions")
    return min(context, max_seq_len)


def tied_table(path: Path, spec: dict):
    """The embedding table, mapped zero-copy from the output head's weight in the file."""
    import warnings

    import torch

    from edgectl.formats.ptefile import map_blob

    blob, offset = map_blob(path, spec["key"])
    with warnings.catch_warnings():  # read-only buffer: the program only reads it
        warnings.simplefilter("ignore", UserWarning)
        t = torch.frombuffer(blob, dtype=getattr(torch, spec["dtype"]))
    if t.numel() < spec["shape"][0] * spec["shape"][1]:
        raise EdgectlError(f"{path}: its table {spec['key'][:12]}… holds {t.numel()} values, not {spec['shape']}",
                           hint="the shard set's manifest or the file is damaged")
    t = t[: spec["shape"][0] * spec["shape"][1]].view(*spec["shape"])
    t._edgectl_map = blob.obj  # the mmap behind it, for madvise (shards_runtime._Embed)
    t._edgectl_offset = offset  # where the table starts in it
    return t


def _load_pte(path: Path, trace: Trace):
    """(program, meta, tokenizer.json text, forward method) of an edgectl `.pte`."""
    if not path.is_file():
        raise EdgectlError(f"{path}: no such file")
    integrity.require_pte(path)  # its own checksum, before ExecuTorch reads it (edgectl/formats/integrity.py)
    rt = _load_runtime()
    from edgectl.backends.registry import check_runnable

    check_runnable(path)  # a delegate this runtime lacks: one line, before loading
    with native_stderr_captured():
        with trace.span("load", "load_program"):
            try:
                program = rt.load_program(str(path))
            except (RuntimeError, ValueError) as e:
                raise EdgectlError(f"{path}: not a loadable ExecuTorch program ({e})") from e
        if "edgectl_meta" not in program.method_names:
            raise EdgectlError(f"{path}: not an edgectl .pte (no edgectl_meta)", hint="export it with `edgectl export`")
        meta = json.loads(constant_bytes(path, "edgectl_meta"))
        # the stock form keeps its cache inside (stock.py): only edgectl's own form takes it as inputs
        if meta.get("interface", "edgectl") == "edgectl" and meta.get("kv_layout") != KV_LAYOUT:
            raise EdgectlError(f"{path}: exported by an older edgectl, whose programs take the KV cache another way "
                               f"({meta.get('kv_layout', 'the whole cache, read only')})",
                               hint="re-export it with `edgectl export`")
        tokenizer_json = constant_bytes(path, "edgectl_tokenizer").decode()
        with trace.span("load", "load_method"):
            try:
                method = program.load_method("forward")
            except RuntimeError as e:
                raise EdgectlError(f"{path}: cannot load its forward method ({e})") from e
        from executorch.extension.pybindings import _portable_lib

        _portable_lib._threadpool_get_thread_count()  # built now (it logs cpuinfo probing), not at a portable or OpenVINO program's first call
    return program, meta, tokenizer_json, method


class PteModel:
    """A monolithic edgectl `.pte`: forward(tokens, pos, idx, k*L, v*L[, table]) -> logits,
    the caches (KVCache, whole [1, S, KV, D] buffers) written in place by the program."""

    def __init__(self, path: str | Path, trace: Trace | None = None, context: int | None = None):
        path = Path(path)
        self.path, self.trace = path, trace or Trace()
        self.program, self.meta, self.tokenizer_json, self.method = _load_pte(path, self.trace)
        if self.meta.get("interface", "edgectl") != "edgectl":
            raise EdgectlError(f"{path}: a {self.meta['interface']}-interface .pte", hint="open it with artifact.open_artifact")
        emb = self.meta.get("embedding_input")  # fp32: one table; quantized: {"tensors": [codes, scales]}
        self.extra_inputs = [tied_table(path, t) for t in emb.get("tensors", [emb])] if emb else []
        args = ModelArgs.from_dict(self.meta["model"])
        self.cache_len = self.meta["max_seq_len"]  # the program's cache shape
        self.max_seq_len = usable_context(context, self.cache_len)
        self.chunk = self.meta.get("prefill_chunk", self.cache_len)
        self.cache = KVCache(args, self.cache_len, args.n_layers)
        self.k, self.v = self.cache.k, self.cache.v

    def reset(self) -> None:
        self.cache.reset()

    def forward(self, tokens: list[int], start: int, all_logits: bool = False):
        """Logits [N, vocab] for the last token (or every token with all_logits); a
        prompt longer than the program's chunk runs in several calls."""
        import torch

        if start + len(tokens) > self.max_seq_len:
            raise EdgectlError(f"sequence of {start + len(tokens)} tokens exceeds max_seq_len {self.max_seq_len}")
        outs = []
        for i in range(0, len(tokens), self.chunk):
            part = tokens[i : i + self.chunk]
            last = i + self.chunk >= len(tokens)
            if all_logits or last:
                outs.append(self._call(part, start + i, all_logits))
            else:
                self._call(part, start + i, all_logits=False)
        return outs[0] if len(outs) == 1 else torch.cat(outs)

    def _call(self, tokens: list[int], start: int, all_logits: bool):
        import torch

        T = len(tokens)
        pos = torch.arange(start, start + T)
        idx = torch.arange(T) if all_logits else torch.tensor([T - 1])
        with self.trace.span("compute", "prefill" if T > 1 else "decode"):
            # the program writes the T new entries into self.k / self.v itself
            # the program writes the T new entries into self.k / self.v itself
            # the program writes the T new entries into self.k / self.v itself
            out = self.method.execute([torch.tensor([tokens]), pos, idx, *self.k, *self.v, *self.extra_inputs])
        return out[0][0]  # [N, vocab]

    def close(self) -> None:
        self.method = self.program = None
        malloc_trim()


class StockPteModel:
    """A `.pte` in ExecuTorch's stock-runner form (stock.py): forward(tokens, input_pos) ->
    logits of the last token, with the KV cache in the program's own planned memory."""

    def __init__(self, path: str | Path, trace: Trace | None = None, context: int | None = None):
        path = Path(path)
        self.path, self.trace = path, trace or Trace()
        self.program, self.meta, self.tokenizer_json, self.method = _load_pte(path, self.trace)
        self.cache_len = self.meta["max_seq_len"]
        self.max_seq_len = usable_context(context, self.cache_len)
        self.chunk = self.meta["prefill_chunk"]

    def reset(self) -> None:
        """Nothing to clear: a call attends over positions < input_pos + T only, all written
        by this run's earlier calls (llama::custom_sdpa), so a run from 0 never reads the last one's."""

    def forward(self, tokens: list[int], start: int, all_logits: bool = False):
        """Logits [N, vocab]: the last token's, or every token's with all_logits (one call
        per token then, as the program returns the last token's logits only)."""
        import torch

        if start + len(tokens) > self.max_seq_len:
            raise EdgectlError(f"sequence of {start + len(tokens)} tokens exceeds max_seq_len {self.max_seq_len}")
        if all_logits:
            return torch.cat([self._call([t], start + i) for i, t in enumerate(tokens)])
        for i in range(0, len(tokens), self.chunk):
            out = self._call(tokens[i : i + self.chunk], start + i)
        return out

    def _call(self, tokens: list[int], start: int):
        import torch

        with self.trace.span("compute", "prefill" if len(tokens) > 1 else "decode"):
            # custom_sdpa logs "No temp allocator provided" on every call through the
            # Python binding (it then allocates its own scratch): kept off the terminal
            with native_stderr_captured():
                return self.method.execute([torch.tensor([tokens]), torch.tensor([start])])[0]  # [1, vocab]

    def close(self) -> None:
        self.method = self.program = None
        malloc_trim()


def open_pte(path: str | Path, trace: Trace | None = None, context: int | None = None):
    """PteModel or StockPteModel, by the interface the file's metadata records."""
    _load_runtime()  # first: reading the metadata imports torchao, whose load-time chatter it quiets
    try:
        interface = json.loads(constant_bytes(Path(path), "edgectl_meta")).get("interface", "edgectl")
    except Exception:  # noqa: BLE001  not an edgectl .pte: PteModel says what it is
        interface = "edgectl"
    cls = StockPteModel if interface == "stock" else PteModel
    return cls(path, trace=trace, context=context)


