"""ShardModel: run a shard set (a directory with manifest.json) within a memory budget.

Implements the runtime `Model` protocol. The KV cache belongs to ShardModel and is never
evicted; the layer programs write their new entries into it in place (a sliding layer's
cache is a ring of C slots, model_args.ring_len: a call that would wrap it is split).

Placement comes from a `plan.Plan`: resident shards are loaded before the first
token (the preload buffer: the planner keeps the first shards of the forward pass
resident); streamed shards are loaded for every forward call and freed after they run:
- on-demand: the executor loads each one itself when it reaches it;
- pipelined: a loader thread loads them ahead in forward order into two slots, so the
  next shard loads while the current one computes. With the native shim (edgectl/_native)
  the GIL is released in both, so the two really overlap; with the Python binding
  fallback they serialise.

Trace lanes: "load" (one span per shard load, named by shard) and "compute" (one span
per shard execute).

Budget: the start-up costs measured before planning are in shards_startup.py.
"""

from __future__ import annotations

import os
from pathlib import Path

from edgectl.util.errors import EdgectlError
from edgectl.formats.manifest import Manifest
from edgectl.runtime.plan import Plan
from edgectl.runtime.plan_cost import draft_cost
from edgectl.runtime.planner import check_floor, plan as make_plan
from edgectl.runtime.methods import _load_runtime
from edgectl.model_args import call_spans, ring_len, ring_track
from edgectl.runtime.runtime import KVCache, usable_context
from edgectl.runtime.shards_embed import _Embed
from edgectl.runtime.shards_startup import StartupCosts, rss_bytes
from edgectl.runtime.trace import Trace
from edgectl.util.native import malloc_trim, native_stderr_captured


class ShardModel(StartupCosts):
    """A shard set run under `plan` (or planned here from budget/mode/latency target)."""

    def __init__(self, directory: str | Path, trace: Trace | None = None, *, budget: int | None = None,
                 mode: str = "auto", latency_target_ms: float | None = None, plan: Plan | None = None,
                 engine: str = "auto", precision: str | None = None, context=None,
                 draft: tuple[str, int] | None = None, tokenizer=None):
        """`context`: positions this run may use (prompt + generated tokens; an int, or a
        function of the tokenizer, called once it is built). The KV cache is planned and
        charged for that many, not for the manifest's max_seq_len; None: max_seq_len, or
        what a given `plan` was made for. `draft`: (precision, k) of this shard set's own
        draft that will run beside it, resident; a budget plan counts it (plan_cost.draft_cost).
        `tokenizer`: one already built for this shard set, shared (a draft shares its target's)."""
        self.dir = Path(directory)
        self.trace = trace or Trace()
        self.manifest = m = Manifest.load(self.dir)
        self.meta = {"model": m.model, "max_seq_len": m.max_seq_len, "tokenizer_config": m.tokenizer_config,
                     "format": "edgectl-shards"}
        self.cache_len = m.max_seq_len  # the programs' cache shape
        self.max_seq_len = m.max_seq_len  # positions usable: the context, once known
        self.tokenizer_json = m.tokenizer_text(self.dir)  # checked against the manifest's sha256
        self.startup, self._tok = None, {}
        with native_stderr_captured():  # cpuinfo's probing chatter when the thread pool starts
            with self.trace.span("setup", "runtime"):
                native = self._native(engine)
                rt = _load_runtime() if native is None else None
            # the runtime floor: interpreter, numpy and the runtime library, before any shard.
            # A budget counts the whole process: the floor is counted like a start-up cost.
            self.memory = {"baseline": rss_bytes()["rss"]}
            floor = self.memory["baseline"] if budget and plan is None else 0
            check_floor(budget or 0, floor)
            if plan is None and budget:
                self.startup = self._measure_startup(m, rt, native, precheck=lambda fixed: self._precheck(
                    m, budget, mode, precision, fixed, context, floor, draft))
            elif tokenizer is not None:
                self._tok["value"] = tokenizer
            else:
                self._start_tokenizer()
            if callable(context):
                context = context(self.tokenizer)
            if plan is not None and context is None:
                context = plan.context
            self.max_seq_len = usable_context(context, m.max_seq_len)
            if self.startup:  # staging is sized by the widest call, at most the context
                self.startup = self._with_staging(self.startup, m)
            if plan is None:
                fixed = self.startup["total"] if self.startup else 0
                with self.trace.span("setup", "plan"):
                    plan = (make_plan(m, budget, latency_target_ms, mode, fixed_bytes=fixed, precision=precision,
                                      slot_extra_bytes=getattr(self, "slot_workspace", 0),
                                      stream_extra_bytes=getattr(self, "stream_extra", 0), context=self.max_seq_len,
                                      floor_bytes=floor, draft=draft and draft_cost(m, *draft, self.max_seq_len))
                            if budget else _everything_resident(m, precision))
            self.plan = plan
            self._open(m, plan, rt, native)

    def _native(self, engine: str):
        """The native shim (None: the Python binding runs the shards), its thread pool
        started here, not in the loader thread."""
        if engine not in ("auto", "native"):
            return None
        from edgectl.runtime import _native
        from edgectl.runtime.methods import engine as native_engine

        native = native_engine()
        if native is None and engine == "native":
            raise EdgectlError(f"the native shim is unavailable ({_native.why_not()})")
        if native is not None:
            native.thread_count()
        return native

    def _start_tokenizer(self) -> None:
        """Build the tokenizer on a thread: it runs while the main thread loads shards through
        the native shim (GIL released), off the cold-start path. `self.tokenizer` waits for it."""
        import threading

        from edgectl.runtime.tokenizer import Tokenizer

        m = self.manifest

        def build():
            try:
                mm = m.model
                self._tok["value"] = Tokenizer(self.tokenizer_json, m.tokenizer_config, mm["bos_token_id"],
                                               tuple(mm["eos_token_ids"]), str(self.dir / m.tokenizer))
            except BaseException as e:  # raised where the tokenizer is asked for
                self._tok["error"] = e

        self._tok["thread"] = t = threading.Thread(target=build, name="edgectl-tokenizer", daemon=True)
        t.start()

    @property
    def tokenizer(self):
        if "thread" not in self._tok:
            return self._tok.get("value")
        self._tok["thread"].join()
        if "error" in self._tok:
            raise self._tok["error"]
        return self._tok["value"]

    def _open(self, m, plan, rt, native) -> None:
        from edgectl.runtime import loader as ld
        from edgectl.model_args import ModelArgs

        by_name = {s.name: s for s in m.shards}
        self.steps = []  # (name, kind, path, layers, placement) in forward order, embed excluded
        embed = None
        for c in plan.shards:
            s = by_name.get(c.name)
            if s is None or c.precision not in s.variants:
                raise EdgectlError(f"the plan names {c.name} at {c.precision}, which {self.dir} does not have")
            v = s.variants[c.precision]
            if s.kind == "embed" and "table" in v.extra:
                embed = v
                continue
            self.steps.append((c.name, s.kind, self.dir / v.file, list(s.layers), c.placement))
        if embed is None:
            raise EdgectlError(f"{self.dir}: embed shards with their own program are not supported yet")
        # read the preload buffer's files ahead, first thing, in forward order, while the main
        # thread unpacks the shards already read. Not the streamed ones: under a tight memory
        # cap, reading the whole set into the page cache at once got runs OOM-killed (measured:
        # 190 MB budget, 8da4w, 2 of 2 killed with it, 0 of 2 without); the loader maps each
        # streamed file one slot ahead with WILLNEED instead.
        # A shard whose packed weights are in the packed-weight cache reads that file, not its
        # .pte (whose raw constants it then never touches): prefetch what the load will read.
        packed = None
        if native is not None:
            from edgectl.runtime import packed_cache

            packed = packed_cache.default()
        sha = {self.dir / s.variants[c.precision].file: s.variants[c.precision].sha256
               for c in plan.shards for s in [by_name[c.name]]}
        order = [(packed.existing(sha.get(path)) if packed is not None else None) or path
                 for _, _, path, _, placement in self.steps if placement == "resident"]
        self.prefetcher = ld.prefetch(order, self.trace) if os.environ.get("EDGECTL_PREFETCH", "1") != "0" else None
        self.embed = _Embed(self.dir, embed, m.model.get("embed_scale"))
        if native is not None:  # the manifest's planned_bytes, else read from each program's header
            planned = {s.name: s.variants[c.precision].extra.get("planned_bytes") for c in plan.shards
                       for s in [by_name[c.name]]}
            arena = max(planned.get(n) or native.planned_size(p) for n, _, p, _, _ in self.steps)
            self.engine = ld.NativeEngine(native, arena, keys=sha)
        else:
            self.engine = ld.PyEngine(rt)
        args = ModelArgs.from_dict(m.model)
        self.args = args
        self.chunk = m.max_tokens_per_call or self.cache_len
        self.ring = ring_len(args, self.cache_len, self.chunk)  # a sliding layer's slots (None: none)
        self.cache = KVCache(args, self.cache_len, args.n_layers, self.chunk)
        self.track = ring_track(args, self.cache_len, self.chunk)  # how far back a call may go (None: any)
        self.k, self.v = self.cache.k, self.cache.v
        self.h_cap = self.cache_len * args.dim
        self.resident = {}
        for name, kind, path, _, placement in self.steps:  # the preload buffer, in forward order
            if placement == "resident":
                with self.trace.span("load", name):
                    self.resident[name] = self.engine.load(path)
        self.runs = self._chain(native, args)
        streamed = [(name, path) for name, _, path, _, placement in self.steps if placement == "streamed"]
        self.loader = None
        # on-demand: the next streamed shard's file is read ahead while this one loads and runs
        self._next_streamed = {name: streamed[(i + 1) % len(streamed)][1] for i, (name, _) in enumerate(streamed)}
        if streamed and plan.mode == "pipelined":
            self.loader = ld.Loader(self.engine, streamed, self.trace, slots=2)
        self.memory["after_load"] = rss_bytes()["rss"]

    def _chain(self, native, args) -> list:
        """The forward pass as a list of runs: a run of consecutive resident layer shards
        becomes one ("chain", name, Chain) executed by a single native call (set
        EDGECTL_CHAIN=0 to call them one by one); every other step stays ("step", *step)."""
        runs, group = [], []

        def flush():
            if group:
                from edgectl.runtime._native import Chain

                caches = [t for st in group for i in st[3] for t in (self.k[i], self.v[i])]
                chain = Chain(native, [self.resident[st[0]].handle for st in group], [len(st[3]) for st in group], caches,
                              args.n_kv_heads, args.head_dim, self.cache_len)  # each cache's own length: its shape
                name = group[0][0] if len(group) == 1 else f"{group[0][0]}..{group[-1][0]}"
                runs.append(("chain", name, chain))
                group.clear()

        chaining = native is not None and os.environ.get("EDGECTL_CHAIN", "1") != "0"
        for st in self.steps:
            if chaining and st[1] == "layers" and st[4] == "resident":
                group.append(st)
                continue
            flush()
            runs.append(("step", *st))
        flush()
        return runs

    @property
    def engine_name(self) -> str:
        return self.engine.name

    @property
    def max_rewind(self) -> int | None:
        """Positions a run may go back and keep its sliding window (PteModel.max_rewind)."""
        return self.track.max_rewind if self.track else None

    def reset(self) -> None:
        self.cache.reset()
        if self.track:
            self.track.reset()

    def _get(self, name: str, path: Path, placement: str):
        if placement == "resident":
            return self.resident[name]
        if self.loader is not None:
            return self.loader.take(name)
        self.engine.readahead(self._next_streamed[name])
        with self.trace.span("load", name):  # on-demand: nothing else runs, the shared workspace serves
            return self.engine.load(path, streamed=True, own_workspace=False)

    def _release(self, loaded, placement: str) -> None:
        if placement == "resident":
            return
        if self.loader is not None:
            self.loader.done(loaded)
        else:
            loaded.free()

    # rows of logits the head computes per call when forward() hands them to a `sink`
    SINK_ROWS = 16

    def forward(self, tokens: list[int], start: int, all_logits: bool = False, sink=None):
        """Logits [N, vocab] of the last token (or of every token with all_logits).

        With `sink` (and all_logits), nothing is returned: the head runs SINK_ROWS rows at
        a time and calls sink(row, logits) with each group, a view of the staging buffer
        valid only during the call. A scorer then never holds a whole call's logits
        (64 x 49152 fp32 = 12.6 MB for SmolLM2, plus its copy) under a memory budget."""
        import numpy as np

        T = len(tokens)
        if start + T > self.max_seq_len:
            what = "max_seq_len" if self.max_seq_len == self.cache_len else "the context this run planned for (--ctx-size)"
            raise EdgectlError(f"sequence of {start + T} tokens exceeds {what} {self.max_seq_len}")
        spans = call_spans(start, T, self.chunk, self.ring)
        if len(spans) > 1:  # programs take at most `chunk` tokens per call, and never wrap a sliding layer's ring
            if sink is not None and all_logits:
                for i, n in spans:
                    self.forward(tokens[i : i + n], start + i, True, lambda r, x, i=i: sink(i + r, x))
                return None
            parts = [self.forward(tokens[i : i + n], start + i, all_logits) for i, n in spans]
            return np.concatenate(parts) if all_logits else parts[-1]
        if self.track:
            self.track.check(start, T)
        pos = np.arange(start, start + T, dtype=np.int64)
        idx = np.arange(T, dtype=np.int64) if all_logits else np.array([T - 1], dtype=np.int64)
        with self.trace.span("compute", "embed"):
            h = self.embed.fn(tokens)
        logits = None
        for run in self.runs:
            if run[0] == "chain":
                with self.trace.span("compute", run[1]):
                    h = np.ascontiguousarray(h)
                    run[2].run(h, pos, start)
                continue
            _, name, kind, path, layers, placement = run
            loaded = self._get(name, path, placement)
            try:
                with self.trace.span("compute", name):
                    if kind == "layers":  # writes its layers' new entries into the caches
                        h = loaded.run([h, pos, *[t for i in layers for t in (self.k[i], self.v[i])]], [self.h_cap])[0]
                    elif kind == "head" and sink is not None and all_logits:
                        h = h.copy()  # h may be a view of the staging buffer the head writes its logits to
                        for r in range(0, T, self.SINK_ROWS):
                            rows = idx[r : r + self.SINK_ROWS]
                            sink(r, loaded.run([h, rows], [rows.size * self.args.vocab_size])[0][0])
                        logits = ()
                    elif kind == "head":
                        out = loaded.run([h, idx], [idx.size * self.args.vocab_size])
                        logits = out[0][0].copy()
                    else:
                        raise EdgectlError(f"shard {name}: unknown kind {kind!r}")
            finally:
                self._release(loaded, placement)
        if logits is None:
            raise EdgectlError(f"{self.dir}: the shard set has no head shard")
        return None if sink is not None and all_logits else logits  # [N, vocab]

    def close(self) -> None:
        if self.loader is not None:
            self.loader.close()
            self.loader = None
        for loaded in self.resident.values():
            loaded.free()
        self.resident = {}
        malloc_trim()


def _everything_resident(m: Manifest, precision: str | None = None) -> Plan:
    """No budget: every shard at its top precision (or at `precision`), resident."""
    return make_plan(m, 1 << 62, None, "resident", precision=precision)


def open_shard_set(path: str | Path, trace: Trace | None = None, **kw) -> ShardModel:
    return ShardModel(path, trace, **kw)


def env_engine() -> str:
    return os.environ.get("EDGECTL_ENGINE", "auto")
