"""The plan a shard set runs under: its data types, what counts against the budget, and its table rows.

The planner (planner.py) returns a Plan; the runtime, `run --plan` and `bench` read it.

What counts against the budget (all from the manifest's measured figures):
- every resident shard's `resident_bytes` at its chosen precision;
- the KV cache (owned by the runtime, never evicted), computed from the model shape for
  the positions the run will use (`context`: its prompt plus generated tokens, at most
  max_seq_len; a sliding layer's ring at most its C slots): the runtime's cache pages
  cost memory only once written (kv_cache_bytes);
- the loader's slots for streamed shards: one (on-demand: load, run, evict) or two
  (pipelined: one running while the next one loads), each as large as the largest
  streamed shard, plus `stream_extra_bytes` (what loading one keeps on the heap besides
  its weights) and, pipelined, `slot_extra_bytes` (a streamed shard's own XNNPACK
  workspace; on-demand loads use the shared one), both measured by the runtime;
- one activation arena, the largest `extra["planned_bytes"]` among the chosen variants
  (shards run one at a time and share it; a variant's resident_bytes includes its own);
- a tied embedding read from the head's file costs nothing extra (page cache rows).
- `fixed_bytes`: start-up costs the manifest cannot know, measured by the runtime in
  its own process just before it plans (ShardModel: the tokenizer, the runtime's
  first-execute set-up (XNNPACK init, heap growth), the I/O staging buffers); 0 when
  planning without a runtime (`edgectl run --plan` says so in its notes).
- `floor_bytes` (in fixed_bytes): the runtime floor, the whole process before any shard
  (Python, numpy, ExecuTorch's runtime library and thread pool; ~150-180 MB measured),
  measured by the runtime. The budget counts the whole process: a budget at or below the
  floor is refused, and the model's share is budget - floor. `bench --cgroup` caps a run
  at the budget.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field

from edgectl.util.errors import EdgectlError, UsageError

MODES = ("auto", "resident", "pipelined", "on-demand")
SLOTS = {"resident": 0, "pipelined": 2, "on-demand": 1}
PLAN_FORMAT = "edgectl-plan/1"


@dataclass
class ShardChoice:
    name: str
    kind: str
    layers: list[int]
    precision: str
    placement: str  # "resident" | "streamed" | "mapped" (a tied table read from the head's file)
    bytes: int  # resident bytes at this precision (what it costs while loaded)
    load_ms: float
    compute_ms: float | None  # one decode step, when measured
    kl: float  # importance of this precision (0 for the top one)
    ppl_delta: float


class Infeasible(EdgectlError):
    """A budget below the feasible minimum: one line naming the minimum. `partial`: the
    start-up costs counted are those measured so far (the first execute not yet
    probed), so the minimum named is a lower bound."""

    def __init__(self, budget: int, minimum: int, mode: str, kv: int, positions: int, fixed: int,
                 partial: bool = False, floor: int = 0, draft: int = 0):
        self.args_ = (budget, minimum, mode, kv, positions, fixed)
        self.floor, self.draft = floor, draft
        self.minimum = minimum
        what = {"resident": "all shards resident at their smallest precision",
                "pipelined": "every shard streamed through two loader slots",
                "on-demand": "every shard streamed through one loader slot"}[mode]
        at_least = "at least " if partial else ""
        super().__init__(
            f"a budget of {budget / 1e6:.1f} MB is below the feasible minimum of {at_least}{minimum / 1e6:.1f} MB "
            f"for mode {mode} ({what}, KV cache {kv / 1e6:.1f} MB for {positions} positions"
            + (f", runtime floor {floor / 1e6:.1f} MB" if floor else "")
            + (f", the draft {draft / 1e6:.1f} MB" if draft else "")
            + (f", measured start-up costs {(fixed - floor - draft) / 1e6:.1f} MB" if fixed - floor - draft else "")
            + (" so far; the first execute, not measured yet, adds more" if partial else "") + ")",
            hint=f"give --memory-budget {'more than ' if partial else ''}{int(-(-minimum // 10**5)) / 10:.1f}MB"
            + ("" if partial else " or more")
            + ("" if mode == "on-demand" else ", or --mode on-demand")
            + (", or a smaller --ctx-size" if positions > 64 else ""),
        )

    def partial(self) -> "Infeasible":
        return Infeasible(*self.args_, partial=True, floor=self.floor, draft=self.draft)


@dataclass
class Plan:
    mode: str  # "resident" | "pipelined" | "on-demand" (auto resolved)
    budget_bytes: int
    latency_target_ms: float | None
    shards: list[ShardChoice]
    kv_bytes: int
    slot_bytes: int  # loader buffers for streamed shards + the shared activation arena
    resident_bytes: int  # resident shards only
    total_bytes: int  # resident + kv + slots
    minimum_bytes: int  # the least any plan in this mode needs
    ms_per_token: float  # expected decode step (simulated)
    kl_sum: float  # sum of the chosen precisions' importance, a proxy for the accuracy lost
    compute_measured: bool  # False: ms_per_token counts loading only
    format: str = PLAN_FORMAT
    notes: list[str] = field(default_factory=list)
    fixed_bytes: int = 0  # runtime floor + measured start-up costs, counted in total_bytes (see module doc)
    floor_bytes: int = 0  # the runtime floor, part of fixed_bytes (0: planned without a runtime)
    context: int | None = None  # positions the KV cache is planned for (None: max_seq_len)
    draft: dict | None = None  # the speculative draft planned with (plan_cost.DraftCost.to_dict), counted in fixed_bytes

    def to_dict(self) -> dict:
        return asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    @classmethod
    def from_dict(cls, d: dict) -> "Plan":
        if d.get("format") != PLAN_FORMAT:
            raise EdgectlError(f"not an edgectl plan (format {d.get('format')!r}, expected {PLAN_FORMAT!r})",
                               hint="write one with `edgectl run DIR --memory-budget ... --plan --json`")
        try:
            return cls(**{**d, "shards": [ShardChoice(**s) for s in d["shards"]]})
        except TypeError as e:
            raise EdgectlError(f"malformed plan ({e})") from e

    @classmethod
    def load(cls, path) -> "Plan":
        from pathlib import Path

        try:
            d = json.loads(Path(path).read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise EdgectlError(f"{path}: cannot read the plan ({e})") from e
        return cls.from_dict(d)

    @property
    def streamed(self) -> list[str]:
        return [s.name for s in self.shards if s.placement == "streamed"]


def parse_bytes(text: str) -> int:
    """'150MB', '1.5GiB', '2000000' -> bytes (MB = 1e6, MiB = 2**20)."""
    units = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "kib": 2**10, "mib": 2**20, "gib": 2**30,
             "k": 10**3, "m": 10**6, "g": 10**9}
    t = text.strip().lower().replace(" ", "")
    num = t.rstrip("abgikm")
    unit = t[len(num):]
    try:
        value = float(num)
    except ValueError:
        value = -1
    if unit not in units or value <= 0:
        raise UsageError(f"--memory-budget {text!r}: expected a size like 150MB, 1.5GiB or 2000000")
    return int(value * units[unit])


PAGE = 4096


def kv_cache_bytes(manifest, context: int | None = None) -> int:
    """Bytes of KV cache a run over the first `context` positions writes (default: all
    max_seq_len). The runtime keeps each layer's K and V as [S, KV, D] (position-major) in
    fresh anonymous pages (runtime.KVCache), which cost memory once written: the first
    `context` positions are a contiguous prefix, charged in whole pages. A sliding layer's
    cache is a ring of C slots (model_args.ring_len: position p at slot p mod C), of which
    a run writes min(context, C). (Programs read a window rounded up past them: pages
    never written read as the shared zero page.)"""
    from edgectl.model_args import SLIDING, ring_slots

    m = manifest.model
    hd = m.get("head_dim") or m["dim"] // m["n_heads"]
    S = manifest.max_seq_len
    n = S if context is None else max(1, min(context, S))
    row = 4 * m["n_kv_heads"] * hd  # one position of one layer's K (or V)
    pages = lambda b: -(-b // PAGE) * PAGE  # noqa: E731
    types, window = m.get("layer_types") or (), m.get("sliding_window")
    ring = ring_slots(window, S, getattr(manifest, "max_tokens_per_call", None)) if window and SLIDING in types else S
    return sum(2 * min(pages(row * n), pages(row * (ring if types and types[i] == SLIDING else S)))
               for i in range(m["n_layers"]))


def render_rows(p: Plan) -> list[list[str]]:
    """Table rows for the CLI: shard, precision, placement, MB, KL, ppl delta, ms."""
    rows = []
    for c in p.shards:
        ms = c.load_ms if c.placement == "streamed" else 0.0
        rows.append([c.name, c.precision, c.placement, f"{c.bytes / 1e6:.2f}", f"{c.kl:.4f}", f"{c.ppl_delta:+.3f}",
                     f"{ms + (c.compute_ms or 0.0):.2f}"])
    return rows
