"""Runtime: load an edgectl `.pte`, own the KV cache, run prefill/decode steps.

Every artifact `run` and `bench` accept implements the `Model` protocol below (the
monolithic `.pte` here; the shard set in shards_runtime.py): token ids in, numpy logits
out, the KV cache in numpy arrays over anonymous mappings, the program run through
methods.py (no torch). Each records what it does in a `Trace` (spans on named lanes)
that `bench --plot` draws.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Protocol

from edgectl.formats import integrity
from edgectl.util.errors import EdgectlError
from edgectl.model_args import ModelArgs, cache_shapes, call_spans, kv_layout_ok, ring_len, ring_track
from edgectl.formats.ptefile import constant_bytes
from edgectl.runtime.trace import Trace
from edgectl.runtime.methods import open_method, set_threads  # noqa: F401  (set_threads: the runtime's API)
from edgectl.util.native import malloc_trim


class Model(Protocol):
    meta: dict
    max_seq_len: int
    trace: Trace

    def reset(self) -> None: ...

    def forward(self, tokens: list[int], start: int, all_logits: bool = False) -> "np.ndarray": ...  # noqa: F821


class KVCache:
    """The KV cache, per layer, in fresh anonymous mappings (shapes of model_args.cache_shapes:
    [1, S, KV, D], a sliding layer's ring [1, C, KV, D] for programs of at most `chunk`
    tokens per call), as numpy arrays the programs write in place.

    A page of it costs memory only once written: a run that uses the first n positions
    pays for those (min(n, C) slots of a ring; the planner's kv_cache_bytes counts exactly
    these pages), not for max_seq_len. `reset` hands the pages back (MADV_DONTNEED: they read as zeros again)
    instead of writing zeros over the whole cache, which would charge all of it."""

    def __init__(self, args: ModelArgs, max_seq_len: int, n_layers: int, chunk: int | None = None):
        import mmap

        import numpy as np

        self._maps = []

        def zeros(shape):
            n_el = 1
            for d in shape:
                n_el *= d
            # private: MADV_DONTNEED then frees the pages and they read as zeros (a shared
            # anonymous mapping, mmap's default, would keep them in shmem with their data)
            mm = mmap.mmap(-1, n_el * 4, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
            self._maps.append(mm)
            return np.frombuffer(mm, dtype=np.float32).reshape(shape)

        shapes = cache_shapes(args, max_seq_len, chunk, range(n_layers))
        self.k = [zeros(ks) for ks, _ in shapes]
        self.v = [zeros(vs) for _, vs in shapes]

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


class Table:
    """A matrix mapped zero-copy from a `.pte`'s named data: `array` (numpy, read-only;
    bfloat16, which numpy lacks, as its uint16 bit patterns), `dtype` (the file's),
    `map` (the whole file's mmap) and `offset` (where the matrix starts in it), for madvise."""

    def __init__(self, array, dtype: str, mm, offset: int):
        self.array, self.dtype, self.map, self.offset = array, dtype, mm, offset

    def rows(self, idx):
        """Rows `idx` as float32 (a copy)."""
        import numpy as np

        r = self.array[idx]
        if self.dtype == "bfloat16":
            return (r.astype(np.uint32) << 16).view(np.float32)
        return r.astype(np.float32)


def tied_table(path: Path, spec: dict) -> Table:
    """The embedding table, mapped zero-copy from the output head's weight in the file."""
    import numpy as np

    from edgectl.formats.ptefile import map_blob

    blob, offset = map_blob(path, spec["key"])
    t = np.frombuffer(blob, dtype=np.uint16 if spec["dtype"] == "bfloat16" else np.dtype(spec["dtype"]))
    n = spec["shape"][0] * spec["shape"][1]
    if t.size < n:
        raise EdgectlError(f"{path}: its table {spec['key'][:12]}… holds {t.size} values, not {spec['shape']}",
                           hint="the shard set's manifest or the file is damaged")
    return Table(t[:n].reshape(spec["shape"]), spec["dtype"], blob.obj, offset)


def read_meta(path: Path) -> tuple[dict, str]:
    """(metadata, tokenizer.json text) of an edgectl `.pte`, read from the file (no runtime)."""
    try:
        meta = json.loads(constant_bytes(path, "edgectl_meta"))
    except EdgectlError as e:
        if "no constant method" in str(e):
            raise EdgectlError(f"{path}: not an edgectl .pte (no edgectl_meta)", hint="export it with `edgectl export`") from e
        raise
    return meta, constant_bytes(path, "edgectl_tokenizer").decode()


def _load_pte(path: Path, trace: Trace):
    """(meta, tokenizer.json text, forward method) of an edgectl `.pte`."""
    if not path.is_file():
        raise EdgectlError(f"{path}: no such file")
    integrity.require_pte(path)  # its own checksum, before ExecuTorch reads it (edgectl/formats/integrity.py)
    meta, tokenizer_json = read_meta(path)
    # the stock form keeps its cache inside (stock.py): only edgectl's own form takes it as inputs
    if meta.get("interface", "edgectl") == "edgectl" and not kv_layout_ok(meta.get("kv_layout"),
                                                                         ModelArgs.from_dict(meta["model"])):
        raise EdgectlError(f"{path}: exported by an older edgectl, whose programs take the KV cache another way "
                           f"({meta.get('kv_layout', 'the whole cache, read only')})",
                           hint="re-export it with `edgectl export`")
    from edgectl.runtime.delegates import check_runnable

    check_runnable(path)  # a delegate this runtime lacks: one line, before loading
    return meta, tokenizer_json, open_method(path, trace)


class PteModel:
    """A monolithic edgectl `.pte`: forward(tokens, pos, idx, k*L, v*L[, table]) -> logits,
    the caches (KVCache: whole [1, S, KV, D] buffers, a sliding layer's ring of C slots)
    written in place by the program."""

    def __init__(self, path: str | Path, trace: Trace | None = None, context: int | None = None):
        path = Path(path)
        self.path, self.trace = path, trace or Trace()
        self.meta, self.tokenizer_json, self.method = _load_pte(path, self.trace)
        if self.meta.get("interface", "edgectl") != "edgectl":
            raise EdgectlError(f"{path}: a {self.meta['interface']}-interface .pte", hint="open it with artifact.open_artifact")
        emb = self.meta.get("embedding_input")  # fp32: one table; quantized: {"tensors": [codes, scales]}
        self.extra_inputs = [tied_table(path, t).array for t in emb.get("tensors", [emb])] if emb else []
        args = ModelArgs.from_dict(self.meta["model"])
        self.vocab = args.vocab_size
        self.cache_len = self.meta["max_seq_len"]  # the program's cache shape
        self.max_seq_len = usable_context(context, self.cache_len)
        self.chunk = self.meta.get("prefill_chunk", self.cache_len)
        self.ring = ring_len(args, self.cache_len, self.chunk)  # a sliding layer's slots (None: none)
        if self.ring is not None and self.meta.get("kv_ring") != self.ring:
            raise EdgectlError(f"{path}: its sliding layers' cache holds {self.meta.get('kv_ring')} positions, "
                               f"this edgectl expects {self.ring}", hint="re-export it with `edgectl export`")
        self.cache = KVCache(args, self.cache_len, args.n_layers, self.chunk)
        self.k, self.v = self.cache.k, self.cache.v
        self.track = ring_track(args, self.cache_len, self.chunk)  # how far back a call may go (None: any)

    @property
    def engine_name(self) -> str:
        return self.method.name

    @property
    def max_rewind(self) -> int | None:
        """Positions a run may go back (re-feed from below the last one written) and keep
        its sliding window: None, any."""
        return self.track.max_rewind if self.track else None

    def reset(self) -> None:
        self.cache.reset()
        if self.track:
            self.track.reset()

    def forward(self, tokens: list[int], start: int, all_logits: bool = False):
        """Logits [N, vocab] (numpy, a fresh array) for the last token (or every token with
        all_logits); a prompt longer than the program's chunk runs in several calls, and so
        does one that would wrap a sliding layer's ring (model_args.call_spans)."""
        import numpy as np

        if start + len(tokens) > self.max_seq_len:
            raise EdgectlError(f"sequence of {start + len(tokens)} tokens exceeds max_seq_len {self.max_seq_len}")
        if self.track:
            self.track.check(start, len(tokens))
        outs = []
        for i, n in call_spans(start, len(tokens), self.chunk, self.ring):
            part = tokens[i : i + n]
            last = i + n >= len(tokens)
            if all_logits or last:
                outs.append(self._call(part, start + i, all_logits).copy())
            else:
                self._call(part, start + i, all_logits=False)
        return outs[0] if len(outs) == 1 else np.concatenate(outs)

    def _call(self, tokens: list[int], start: int, all_logits: bool):
        import numpy as np

        T = len(tokens)
        pos = np.arange(start, start + T, dtype=np.int64)
        idx = np.arange(T, dtype=np.int64) if all_logits else np.array([T - 1], dtype=np.int64)
        with self.trace.span("compute", "prefill" if T > 1 else "decode"):
            # the program writes the T new entries into self.k / self.v itself
            out = self.method.execute([np.array([tokens], dtype=np.int64), pos, idx, *self.k, *self.v, *self.extra_inputs],
                                      [idx.size * self.vocab])
        return out[0][0]  # [N, vocab]

    def close(self) -> None:
        if self.method is not None:
            self.method.close()
        self.method = None
        malloc_trim()


class StockPteModel:
    """A `.pte` in ExecuTorch's stock-runner form (stock.py): forward(tokens, input_pos) ->
    logits of the last token, with the KV cache in the program's own planned memory."""

    def __init__(self, path: str | Path, trace: Trace | None = None, context: int | None = None):
        path = Path(path)
        self.path, self.trace = path, trace or Trace()
        self.meta, self.tokenizer_json, self.method = _load_pte(path, self.trace)
        self.vocab = self.meta["model"]["vocab_size"]
        self.cache_len = self.meta["max_seq_len"]
        self.max_seq_len = usable_context(context, self.cache_len)
        self.chunk = self.meta["prefill_chunk"]

    @property
    def engine_name(self) -> str:
        return self.method.name

    def reset(self) -> None:
        """Nothing to clear: a call attends over positions < input_pos + T only, all written
        by this run's earlier calls (llama::custom_sdpa), so a run from 0 never reads the last one's."""

    def forward(self, tokens: list[int], start: int, all_logits: bool = False):
        """Logits [N, vocab]: the last token's, or every token's with all_logits (one call
        per token then, as the program returns the last token's logits only)."""
        import numpy as np

        if start + len(tokens) > self.max_seq_len:
            raise EdgectlError(f"sequence of {start + len(tokens)} tokens exceeds max_seq_len {self.max_seq_len}")
        if all_logits:
            return np.concatenate([self._call([t], start + i) for i, t in enumerate(tokens)])
        for i in range(0, len(tokens), self.chunk):
            out = self._call(tokens[i : i + self.chunk], start + i)
        return out

    def _call(self, tokens: list[int], start: int):
        import numpy as np

        with self.trace.span("compute", "prefill" if len(tokens) > 1 else "decode"):
            out = self.method.execute([np.array([tokens], dtype=np.int64), np.array([start], dtype=np.int64)], [self.vocab])
        return out[0].reshape(1, -1).copy()  # [1, vocab]

    def close(self) -> None:
        if self.method is not None:
            self.method.close()
        self.method = None
        malloc_trim()


def open_pte(path: str | Path, trace: Trace | None = None, context: int | None = None):
    """PteModel or StockPteModel, by the interface the file's metadata records."""
    try:
        interface = json.loads(constant_bytes(Path(path), "edgectl_meta")).get("interface", "edgectl")
    except Exception:  # noqa: BLE001  not an edgectl .pte: PteModel says what it is
        interface = "edgectl"
    cls = StockPteModel if interface == "stock" else PteModel
    return cls(path, trace=trace, context=context)
