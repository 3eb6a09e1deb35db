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
"""

from __future__ import annotations

import os
from pathlib import Path

from edgectl.errors import EdgectlError
from edgectl.manifest import Manifest
from edgectl.planner import Plan, plan as make_plan
from edgectl.runtime import Trace, _load_runtime, malloc_trim, native_stderr_captured, tied_table


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
            from edgectl.quant_modules import QuantEmbedding

            codes, scales = (tied_table(path, t) for t in spec["tensors"])
            self.quant = QuantEmbedding.__new__(QuantEmbedding)
            torch.nn.Module.__init__(self.quant)
            self.quant.bits, self.quant.group_size, self.quant.dim = spec["bits"], spec["group_size"], spec["dim"]
            self.table = (codes, scales)
            self.fn = lambda tokens: self.quant.forward(tokens, self.table)
        else:
            table = tied_table(path, spec)
            self.fn = lambda tokens: table.index_select(0, tokens.view(-1)).unsqueeze(0)


class ShardModel:
    """A shard set run under `plan` (or planned here from budget/mode/latency target)."""

    def __init__(self, directory: str | Path, trace: Trace | None = None, *, budget: int | None = None,
                 mode: str = "auto", latency_target_ms: float | None = None, plan: Plan | None = None,
                 engine: str = "auto"):
        self.dir = Path(directory)
        self.trace = trace or Trace()
        self.manifest = m = Manifest.load(self.dir)
        self.meta = {"model": m.model, "max_seq_len": m.max_seq_len, "tokenizer_config": m.tokenizer_config,
                     "format": "edgectl-shards"}
        self.max_seq_len = m.max_seq_len
        try:
            self.tokenizer_json = (self.dir / m.tokenizer).read_text()
        except OSError as e:
            raise EdgectlError(f"{self.dir}: cannot read {m.tokenizer} ({e})") from e
        if plan is None:
            plan = make_plan(m, budget, latency_target_ms, mode) if budget else _everything_resident(m)
        self.plan = plan
        rt = _load_runtime()
        self.memory = {"baseline": rss_bytes()["rss"]}  # interpreter + torch + runtime, before any shard
        with native_stderr_captured():  # cpuinfo's probing chatter when the thread pool starts
            self._open(m, plan, rt, engine)

    def _open(self, m, plan, rt, engine) -> None:
        import torch

        from edgectl import loader as ld
        from edgectl.model import ModelArgs, empty_caches
        from executorch.extension.pybindings import portable_lib

        portable_lib._threadpool_get_thread_count()  # start the pool here, not in the loader thread
        native = None
        if engine in ("auto", "native"):
            from edgectl import _native

            native = _native.load()
            if native is None and engine == "native":
                raise EdgectlError(f"the native shim is unavailable ({_native.why_not()})")
        by_name = {s.name: s for s in m.shards}
        self.steps = []  # (name, kind, path, layers, placement) in forward order, embed excluded
        self.embed = None
        for c in plan.shards:
            s = by_name.get(c.name)
            if s is None or c.precision not in s.variants:
                raise EdgectlError(f"the plan names {c.name} at {c.precision}, which {self.dir} does not have")
            v = s.variants[c.precision]
            if s.kind == "embed" and "table" in v.extra:
                self.embed = _Embed(self.dir, v)
                continue
            self.steps.append((c.name, s.kind, self.dir / v.file, list(s.layers), c.placement))
        if self.embed is None:
            raise EdgectlError(f"{self.dir}: embed shards with their own program are not supported yet")
        if native is not None:
            arena = max(native.planned_size(p) for _, _, p, _, _ in self.steps)
            self.engine = ld.NativeEngine(native, arena)
        else:
            self.engine = ld.PyEngine(rt)
        args = ModelArgs.from_dict(m.model)
        self.args = args
        self.k, self.v = empty_caches(args, self.max_seq_len, args.n_layers)
        self.h_cap = self.max_seq_len * args.dim
        self.kv_cap = args.n_kv_heads * args.head_dim * self.max_seq_len
        self.resident = {}
        for name, kind, path, _, placement in self.steps:  # the preload buffer, in forward order
            if placement == "resident":
                with self.trace.span("load", name):
                    self.resident[name] = self.engine.load(path)
        streamed = [(name, path) for name, _, path, _, placement in self.steps if placement == "streamed"]
        self.loader = None
        if streamed and plan.mode == "pipelined":
            self.loader = ld.Loader(self.engine, streamed, self.trace, slots=2)
        self.memory["after_load"] = rss_bytes()["rss"]
        self._torch = torch

    @property
    def engine_name(self) -> str:
        return self.engine.name

    def reset(self) -> None:
        for t in self.k + self.v:
            t.zero_()

    def _get(self, name: str, path: Path, placement: str):
        if placement == "resident":
            return self.resident[name]
        if self.loader is not None:
            return self.loader.take(name)
        with self.trace.span("load", name):
            return self.engine.load(path)

    def _release(self, loaded, placement: str) -> None:
        if placement == "resident":
            return
        if self.loader is not None:
            self.loader.done(loaded)
        else:
            loaded.free()

    def forward(self, tokens: list[int], start: int, all_logits: bool = False):
        from edgectl.model import write_cache

        torch = self._torch
        T = len(tokens)
        if start + T > self.max_seq_len:
            raise EdgectlError(f"sequence of {start + T} tokens exceeds max_seq_len {self.max_seq_len}")
        pos = torch.arange(start, start + T)
        idx = torch.arange(T) if all_logits else torch.tensor([T - 1])
        h = self.embed.fn(torch.tensor([tokens])).contiguous()
        logits = None
        for name, kind, path, layers, placement in self.steps:
            loaded = self._get(name, path, placement)
            try:
                with self.trace.span("compute", name):
                    if kind == "layers":
                        caches = [t for i in layers for t in (self.k[i], self.v[i])]
                        out = loaded.run([h, pos, *caches], [self.h_cap] + [self.kv_cap] * (2 * len(layers)))
                        for j, i in enumerate(layers):
                            write_cache(self.k[i], self.v[i], out[1 + 2 * j], out[2 + 2 * j], start)
                        h = out[0]
                    elif kind == "head":
                        out = loaded.run([h, idx], [idx.numel() * self.args.vocab_size])
                        logits = out[0][0].clone()
                    else:
                        raise EdgectlError(f"shard {name}: unknown kind {kind!r}")
            finally:
                self._release(loaded, placement)
        if logits is None:
            raise EdgectlError(f"{self.dir}: the shard set has no head shard")
        return logits  # [N, vocab]

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
                "budget_bytes": self.plan.budget_bytes, "engine": self.engine.name, "mode": self.plan.mode}


def _everything_resident(m: Manifest) -> Plan:
    """No budget: every shard at its top precision, resident."""
    return make_plan(m, 1 << 62, None, "resident")


def open_shard_set(path: str | Path, trace: Trace | None = None, **kw) -> ShardModel:
    return ShardModel(path, trace, **kw)


def env_engine() -> str:
    return os.environ.get("EDGECTL_ENGINE", "auto")
