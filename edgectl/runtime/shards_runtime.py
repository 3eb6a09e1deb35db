"""ShardModel: run a shard set (a directory with manifest.json) within a memory budget.

Implements the runtime `Model` protocol. The KV cache belongs to ShardModel and is never
evicted; programs read it and return the new entries, which are written here.

Placement comes from a `planner.Plan`: resident shards are loaded before the first
token (the preload buffer: the planner keeps the first shards of the forward pass
resident); streamed shards are loaded for every forward call and freed after they run:
- on-demand: the executor loads each one itself when it reaches it;
- pipelined: a loader thread loads them ahead in forward order into two slots, so the
  next shard loads while the current one computes. With the native shim (edgectl/_native)
  the GIL is released in both, so the two really overlap; with the Python binding
  fallback they serialise.

Trace lanes: "load" (one span per shard load, named by shard) and "compute" (one span
per shard execute).

Budget: before planning under a budget, the start-up costs the manifest cannot know are
measured in this process (anonymous RSS growth) and handed to the planner as fixed bytes:
the tokenizer (built here and kept: `self.tokenizer`), the runtime's first-execute set-up
(XNNPACK init, heap growth; probed by loading and running the smallest layer shard once,
then freeing it), the I/O staging buffers (computed from the model shape), and, when
the manifest has no per-variant planned_bytes, the planned (activation) memory of each program read from its header into the in-memory manifest (so the planner
counts one shared arena, not one per shard). `self.startup` holds the figures. A budget
that no plan fits even with the tokenizer's cost alone is refused before the probe
(ShardModel._precheck).
"""

from __future__ import annotations

import os
from pathlib import Path

from edgectl.util.errors import EdgectlError
from edgectl.formats.manifest import Manifest
from edgectl.runtime.planner import Plan, plan as make_plan
from edgectl.runtime.runtime import KVCache, _load_runtime, tied_table, usable_context
from edgectl.runtime.trace import Trace
from edgectl.util.native import malloc_trim, native_stderr_captured


def anon_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) * 1024
    return 0


def touched_bytes() -> int:
    """Resident anonymous plus file-backed pages of this process (RssAnon + RssFile)."""
    out = 0
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(("RssAnon:", "RssFile:")):
            out += int(line.split()[1]) * 1024
    return out


def rss_bytes() -> dict:
    """Current and peak resident set size of this process (bytes)."""
    out = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(("VmRSS:", "VmHWM:")):
            k, v = line.split(":")
            out["rss" if k == "VmRSS" else "peak"] = int(v.split()[0]) * 1024
    return out


class _Embed:
    """Embedding rows gathered from the tied matrix in the head's file (page cache), or
    from the embed shard's own program."""

    def __init__(self, directory: Path, variant):
        import torch

        spec = variant.extra.get("table")
        self.program = None
        if spec is None:
            self.path = directory / variant.file
            return
        path = directory / spec["file"]
        if "tensors" in spec:
            from edgectl.quant.quant_modules import QuantEmbedding

            self.quant = QuantEmbedding.__new__(QuantEmbedding)
            torch.nn.Module.__init__(self.quant)
            self.quant.bits, self.quant.group_size, self.quant.dim = spec["bits"], spec["group_size"], spec["dim"]
            self.table = tuple(tied_table(path, t) for t in spec["tensors"])  # codes, scales[, offsets]
            lookup = lambda tokens: self.quant.forward(tokens, self.table)  # noqa: E731
        else:
            table = tied_table(path, spec)
            self.table = (table,)
            lookup = lambda tokens: table.index_select(0, tokens.view(-1)).unsqueeze(0)  # noqa: E731

        def fn(tokens):
            self.read_ahead(tokens)
            rows = lookup(tokens)  # a copy: the mapped pages are no longer needed
            self.release()
            return rows

        self.fn = fn

    def read_ahead(self, tokens) -> None:
        """Start reading every row the lookup will touch (MADV_WILLNEED per row) before
        touching one: from a cold page cache the gather otherwise faults the rows of a
        prompt in one at a time (SmolLM2, 64 prompt tokens: ~50 ms between opening and the
        first layer's compute)."""
        import mmap

        ids = sorted(set(tokens.view(-1).tolist()))
        if len(ids) < 2:
            return
        for t in self.table:
            mm, base = getattr(t, "_edgectl_map", None), getattr(t, "_edgectl_offset", None)
            if mm is None or base is None:
                continue
            row = t.stride(0) * t.element_size()
            for i in ids:
                start = base + i * row
                page = start - start % mmap.PAGESIZE
                mm.madvise(mmap.MADV_WILLNEED, page, start + row - page)

    def release(self) -> None:
        """Unmap the table pages the lookup touched (they stay in the page cache, unmapped,
        where the kernel reclaims them easily): mapped rows piling up over a long text are
        page cache a memory cgroup charges and could not reclaim in time."""
        import mmap

        for t in self.table:
            mm = getattr(t, "_edgectl_map", None)
            if mm is not None:
                mm.madvise(mmap.MADV_DONTNEED)


class ShardModel:
    """A shard set run under `plan` (or planned here from budget/mode/latency target)."""

    def __init__(self, directory: str | Path, trace: Trace | None = None, *, budget: int | None = None,
                 mode: str = "auto", latency_target_ms: float | None = None, plan: Plan | None = None,
                 engine: str = "auto", precision: str | None = None, context=None):
        """`context`: positions this run may use (prompt + generated tokens; an int, or a
        function of the tokenizer, called once it is built). The KV cache is planned and
        charged for that many, not for the manifest's max_seq_len; None: max_seq_len, or
        what a given `plan` was made for."""
        self.dir = Path(directory)
        self.trace = trace or Trace()
        self.manifest = m = Manifest.load(self.dir)
        self.meta = {"model": m.model, "max_seq_len": m.max_seq_len, "tokenizer_config": m.tokenizer_config,
                     "format": "edgectl-shards"}
        self.cache_len = m.max_seq_len  # the programs' cache shape
        self.max_seq_len = m.max_seq_len  # positions usable: the context, once known
        self.tokenizer_json = m.tokenizer_text(self.dir)  # checked against the manifest's sha256
        rt = _load_runtime()
        self.memory = {"baseline": rss_bytes()["rss"]}  # interpreter + torch + runtime, before any shard
        self.startup, self._tok = None, {}
        with native_stderr_captured():  # cpuinfo's probing chatter when the thread pool starts
            with self.trace.span("setup", "runtime"):
                native = self._native(engine)
            if plan is None and budget:
                self.startup = self._measure_startup(m, rt, native, precheck=lambda fixed: self._precheck(
                    m, budget, mode, precision, fixed, context))
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
                                      stream_extra_bytes=getattr(self, "stream_extra", 0), context=self.max_seq_len)
                            if budget else _everything_resident(m, precision))
            self.plan = plan
            self._open(m, plan, rt, native)

    def _native(self, engine: str):
        from executorch.extension.pybindings import portable_lib

        portable_lib._threadpool_get_thread_count()  # start the pool here, not in the loader thread
        if engine not in ("auto", "native"):
            return None
        from edgectl.runtime import _native

        native = _native.load()
        if native is None and engine == "native":
            raise EdgectlError(f"the native shim is unavailable ({_native.why_not()})")
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
            return None
        self._tok["thread"].join()
        if "error" in self._tok:
            raise self._tok["error"]
        return self._tok["value"]

    def _precheck(self, m, budget, mode, precision, fixed: int, context) -> None:
        """Refuse a budget that no plan fits with the start-up costs measured so far (the
        tokenizer's), before the first-execute probe loads and runs a shard: under a memory
        cap of budget + baseline, the probe on top of the tokenizer got the process
        OOM-killed before it could say the budget is too small (bench, 25% rows). What is
        counted so far is a lower bound, so this refuses only what planning would."""
        from edgectl.runtime.planner import Infeasible, check_budget

        try:
            check_budget(m, budget, mode, fixed_bytes=fixed, precision=precision, slot_extra_bytes=self.slot_workspace,
                         stream_extra_bytes=self.stream_extra, context=context if isinstance(context, int) else 1)
        except Infeasible as e:
            raise e.partial() from None

    def _measure_startup(self, m, rt, native, precheck=None) -> dict:
        """Measured start-up costs the planner counts as fixed bytes (see the module doc):
        the tokenizer's build, then `precheck(bytes so far)`, then the first-execute probe.
        Memory here is resident anonymous plus file-backed pages (`touched_bytes`): the
        first execute maps kernel code and the tokenizer reads its files, and a memory
        cgroup charges those pages too (measured: 10 MB of file pages, uncounted before)."""
        import torch

        from edgectl.runtime import loader as ld
        from edgectl.model import ModelArgs, empty_caches
        from edgectl.runtime.planner import _weights

        # A manifest without per-variant planned_bytes counts every shard's activation memory in
        # its resident_bytes, though all shards share one arena: read the programs' planned
        # sizes (headers only) into the in-memory manifest, so the planner counts the arena once.
        variants = [v for s in m.shards for v in s.variants.values() if not (s.kind == "embed" and "table" in v.extra)]
        if native is not None:
            for v in variants:
                if "planned_bytes" not in v.extra:
                    v.extra["planned_bytes"] = native.planned_size(self.dir / v.file)
        a0 = touched_bytes()
        mm = m.model
        self._start_tokenizer()
        # the tokenizer first: built after the probe instead, the process kept 17 MB more
        # (measured start-up costs 39.5 -> 56.7 MB for SmolLM2, and worse plans)
        with self.trace.span("setup", "tokenizer"):
            self.tokenizer  # noqa: B018
        malloc_trim()  # the build's transient heap: not part of what the pre-check counts
        self.slot_workspace = self.stream_extra = 0  # not measured yet: the pre-check's lower bound
        if precheck is not None:
            with self.trace.span("setup", "pre-check"):
                precheck(max(touched_bytes() - a0, 0))
        layers = [s for s in m.shards if s.kind == "layers"]
        probe = min(((s, v) for s in layers for v in s.variants.values()), key=lambda sv: sv[1].resident_bytes, default=None)
        run_growth = stream_extra = 0
        if probe is not None:
            s, v = probe
            path = self.dir / v.file
            eng = (ld.NativeEngine(native, native.planned_size(path), keys={path: v.sha256}) if native is not None
                   else ld.PyEngine(rt))
            args = ModelArgs.from_dict(mm)
            k, vc = empty_caches(args, m.max_seq_len, len(s.layers))
            before_load = touched_bytes()
            with self.trace.span("load", "startup-probe"):
                loaded = eng.load(path, streamed=True)  # its own workspace: what a streamed shard pays
            T = min(m.max_tokens_per_call or m.max_seq_len, m.max_seq_len)  # the widest call: its workspace
            before_run = anon_bytes()
            loaded.run([torch.zeros(1, T, args.dim), torch.arange(T), *[t for p in zip(k, vc) for t in p]],
                       [m.max_seq_len * args.dim])
            # execute-time workspace: paid once by the resident shards (they share XNNPACK's
            # process-wide one) and once more by every pipelined loader slot (streamed shards get their own)
            run_growth = max(anon_bytes() - before_run, 0)
            # what holding a streamed shard costs besides its weights and workspace: the heap
            # its load touched (program structures, the raw constants XNNPACK packs or finds
            # packed, freed but kept for the next streamed shard), measured, not modelled
            stream_extra = max(touched_bytes() - before_load - run_growth - _weights(v), 0)
            loaded.free()
            del loaded, eng, k, vc
            malloc_trim()
        out = {"tokenizer_and_first_execute": max(touched_bytes() - a0, 0) + run_growth}
        self.slot_workspace, self.stream_extra = run_growth, stream_extra
        # counted in the plan's slot bytes, not in total
        out["per_loader_slot_workspace"] = self.slot_workspace
        out["per_streamed_shard_load"] = self.stream_extra
        return out

    def _with_staging(self, startup: dict, m) -> dict:
        """Add the output staging buffers (h and 2 caches per layer of the widest shard, the
        head's logits row) for the widest call this run makes: at most a program call's
        tokens, at most the context. They are written only that far (fresh pages)."""
        mm = m.model
        widest = max((len(s.layers) for s in m.shards if s.kind == "layers"), default=1)
        T = min(m.max_tokens_per_call or m.max_seq_len, self.max_seq_len)
        hd = mm.get("head_dim") or mm["dim"] // mm["n_heads"]
        per_slot = ("per_loader_slot_workspace", "per_streamed_shard_load")
        out = {k: v for k, v in startup.items() if k not in ("staging", "total", *per_slot)}
        out["staging"] = 4 * (T * mm["dim"] + 2 * widest * mm["n_kv_heads"] * hd * T + mm["vocab_size"])
        out["total"] = sum(out.values())
        out.update({k: startup[k] for k in per_slot})
        return out

    def _open(self, m, plan, rt, native) -> None:
        import torch

        from edgectl.runtime import loader as ld
        from edgectl.model import ModelArgs

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
        self.embed = _Embed(self.dir, embed)
        if native is not None:  # the manifest's planned_bytes, else read from each program's header
            planned = {s.name: s.variants[c.precision].extra.get("planned_bytes") for c in plan.shards
                       for s in [by_name[c.name]]}
            arena = max(planned.get(n) or native.planned_size(p) for n, _, p, _, _ in self.steps)
            self.engine = ld.NativeEngine(native, arena, keys=sha)
        else:
            self.engine = ld.PyEngine(rt)
        args = ModelArgs.from_dict(m.model)
        self.args = args
        self.cache = KVCache(args, self.cache_len, args.n_layers)
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
        self._torch = torch

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
                              args.n_kv_heads, args.head_dim, self.cache_len)
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

    def reset(self) -> None:
        self.cache.reset()

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
        torch = self._torch
        T = len(tokens)
        if start + T > self.max_seq_len:
            what = "max_seq_len" if self.max_seq_len == self.cache_len else "the context this run planned for (--ctx-size)"
            raise EdgectlError(f"sequence of {start + T} tokens exceeds {what} {self.max_seq_len}")
        chunk = self.manifest.max_tokens_per_call or self.cache_len
        if T > chunk:  # programs take at most `chunk` tokens per call: feed a long prompt in pieces
            if sink is not None and all_logits:
                for i in range(0, T, chunk):
                    self.forward(tokens[i : i + chunk], start + i, True, lambda r, x, i=i: sink(i + r, x))
                return None
            parts = [self.forward(tokens[i : i + chunk], start + i, all_logits) for i in range(0, T, chunk)]
            return torch.cat(parts) if all_logits else parts[-1]
        pos = torch.arange(start, start + T)
        idx = torch.arange(T) if all_logits else torch.tensor([T - 1])
        with self.trace.span("compute", "embed"):
            h = self.embed.fn(torch.tensor([tokens])).contiguous()
        logits = None
        for run in self.runs:
            if run[0] == "chain":
                with self.trace.span("compute", run[1]):
                    h = h.contiguous()
                    run[2].run(h, pos, start)
                continue
            _, name, kind, path, layers, placement = run
            loaded = self._get(name, path, placement)
            try:
                with self.trace.span("compute", name):
                    if kind == "layers":  # writes its layers' new entries into the caches
                        h = loaded.run([h, pos, *[t for i in layers for t in (self.k[i], self.v[i])]], [self.h_cap])[0]
                    elif kind == "head" and sink is not None and all_logits:
                        h = h.clone()  # h may be a view of the staging buffer the head writes its logits to
                        for r in range(0, T, self.SINK_ROWS):
                            rows = idx[r : r + self.SINK_ROWS]
                            sink(r, loaded.run([h, rows], [rows.numel() * self.args.vocab_size])[0][0])
                        logits = ()
                    elif kind == "head":
                        out = loaded.run([h, idx], [idx.numel() * self.args.vocab_size])
                        logits = out[0][0].clone()
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

    def memory_report(self) -> dict:
        """Baseline (interpreter) and model cost (peak RSS minus baseline), measured."""
        r = rss_bytes()
        return {"baseline_bytes": self.memory["baseline"], "peak_bytes": r["peak"],
                "model_peak_bytes": r["peak"] - self.memory["baseline"], "rss_bytes": r["rss"],
                "budget_bytes": self.plan.budget_bytes, "engine": self.engine.name, "mode": self.plan.mode,
                "startup": self.startup}


def _everything_resident(m: Manifest, precision: str | None = None) -> Plan:
    """No budget: every shard at its top precision (or at `precision`), resident."""
    return make_plan(m, 1 << 62, None, "resident", precision=precision)


def open_shard_set(path: str | Path, trace: Trace | None = None, **kw) -> ShardModel:
    return ShardModel(path, trace, **kw)


def env_engine() -> str:
    return os.environ.get("EDGECTL_ENGINE", "auto")
