"""Start-up costs of a shard set measured in this process, and its memory report (ShardModel's side of the budget).

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

from pathlib import Path

from edgectl.util.native import malloc_trim


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



class StartupCosts:
    """ShardModel's start-up measurement and memory report (a mixin: it reads the model's
    directory, trace, manifest, plan and engine)."""

    def _precheck(self, m, budget, mode, precision, fixed: int, context, floor: int = 0, draft=None) -> None:
        """Refuse a budget that no plan fits with the start-up costs measured so far (the
        tokenizer's), before the first-execute probe loads and runs a shard: under a memory
        cap, the probe on top of the tokenizer got the process
        OOM-killed before it could say the budget is too small (bench, 25% rows). What is
        counted so far is a lower bound, so this refuses only what planning would."""
        from edgectl.runtime.plan import Infeasible
        from edgectl.runtime.plan_cost import draft_cost
        from edgectl.runtime.planner import check_budget

        context = context if isinstance(context, int) else 1
        try:
            check_budget(m, budget, mode, fixed_bytes=fixed, precision=precision, slot_extra_bytes=self.slot_workspace,
                         stream_extra_bytes=self.stream_extra, context=context, floor_bytes=floor,
                         draft=draft and draft_cost(m, *draft, context))
        except Infeasible as e:
            raise e.partial() from None

    def _measure_startup(self, m, rt, native, precheck=None) -> dict:
        """Measured start-up costs the planner counts as fixed bytes (see the module doc):
        the tokenizer's build, then `precheck(bytes so far)`, then the first-execute probe.
        Memory here is resident anonymous plus file-backed pages (`touched_bytes`): the
        first execute maps kernel code and the tokenizer reads its files, and a memory
        cgroup charges those pages too (measured: 10 MB of file pages, uncounted before)."""
        import numpy as np

        from edgectl.runtime import loader as ld
        from edgectl.model_args import ModelArgs, cache_shapes
        from edgectl.runtime.plan_cost import _weights

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
            shapes = cache_shapes(args, m.max_seq_len, m.max_tokens_per_call, s.layers)
            k = [np.zeros(ks, dtype=np.float32) for ks, _ in shapes]
            vc = [np.zeros(vs, dtype=np.float32) for _, vs in shapes]
            before_load = touched_bytes()
            with self.trace.span("load", "startup-probe"):
                loaded = eng.load(path, streamed=True)  # its own workspace: what a streamed shard pays
            T = min(m.max_tokens_per_call or m.max_seq_len, m.max_seq_len)  # the widest call: its workspace
            before_run = anon_bytes()
            loaded.run([np.zeros((1, T, args.dim), dtype=np.float32), np.arange(T, dtype=np.int64),
                        *[t for p in zip(k, vc) for t in p]],
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

    def memory_report(self) -> dict:
        """The runtime floor (`baseline_bytes`: the process before any shard), the model's
        share (peak RSS minus the floor) and, under a budget, the share the plan left it, measured."""
        r = rss_bytes()
        budget = self.plan.budget_bytes if self.plan.floor_bytes or self.startup else None
        return {"baseline_bytes": self.memory["baseline"], "peak_bytes": r["peak"],
                "model_peak_bytes": r["peak"] - self.memory["baseline"], "rss_bytes": r["rss"],
                "budget_bytes": self.plan.budget_bytes, "floor_bytes": self.plan.floor_bytes,
                "model_budget_bytes": budget - self.plan.floor_bytes if budget else None,
                "engine": self.engine.name, "mode": self.plan.mode, "startup": self.startup}
