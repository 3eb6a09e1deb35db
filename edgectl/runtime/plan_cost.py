"""The planner's cost model: memory and simulated decode-step time of one assignment of precisions and placements.

The expected time per token comes from simulating one decode step on the measured
load_ms and (when the manifest has them) compute_ms of each shard: a loader that loads
streamed shards in forward order into its slots while the executor runs shards.

With a draft (speculative decoding, DraftCost), one step is K draft steps then a target
call over K+1 tokens (each streamed shard loaded once for all of them, its compute
scaled by verify_scale(K)), and yields expected_tokens(acceptance, K) tokens: the
expected time per token is the step's time over its expected tokens.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from edgectl.util.errors import UsageError

# Compute of one target call over K+1 tokens, relative to one token: 1 + VERIFY_SCALE * K,
# the least-squares slope over K = 1..8 measured by scripts/spec_verify_cost.py on SmolLM2's
# fp32 shard set (2 threads, all logits): 21.6 ms for 1 token, 48.7 for 5, 71.4 for 9.
VERIFY_SCALE = 0.29
# Expected share of drafts the target accepts, when the caller gives none: measured for an
# 8da4w draft of fp32 SmolLM2 on bench's built-in prompt, K = 4 (80%).
DEFAULT_ACCEPTANCE = 0.8


@dataclass(frozen=True)
class DraftCost:
    """What a resident draft adds to a plan: `bytes` it holds (weights, its own KV cache and
    activation arena), `step_ms` per draft token, `k` tokens drafted per target call, the
    expected `acceptance` of each draft, and its `precision` (for the plan's notes)."""

    bytes: int
    step_ms: float
    k: int
    acceptance: float = DEFAULT_ACCEPTANCE
    precision: str = ""

    @property
    def tokens_per_call(self) -> float:
        return expected_tokens(self.acceptance, self.k)

    @property
    def draft_ms(self) -> float:
        """The draft's work before each target call: k draft steps."""
        return self.k * self.step_ms

    def to_dict(self) -> dict:
        return {**asdict(self), "tokens_per_call": self.tokens_per_call}


def expected_tokens(acceptance: float, k: int) -> float:
    """Tokens one target call yields when each of k drafts is accepted with probability
    `acceptance`, independently, until the first rejection, plus the target's own token:
    1 + a + a^2 + ... + a^k."""
    a = min(max(acceptance, 0.0), 1.0)
    return float(k + 1) if a >= 1.0 else (1.0 - a ** (k + 1)) / (1.0 - a)


def verify_scale(k: int) -> float:
    return 1.0 + VERIFY_SCALE * k


def draft_cost(manifest, precision: str, k: int, context: int | None = None,
               acceptance: float = DEFAULT_ACCEPTANCE) -> DraftCost:
    """The cost of drafting with the shard set's own `precision`, every shard resident (a
    draft that streamed would load as much as the target it drafts for): its shards'
    weights and largest activation arena, and its own KV cache for `context` positions;
    a step is the sum of its shards' measured compute_ms (0 where not measured)."""
    from edgectl.runtime.plan import kv_cache_bytes

    m = same_layer_timings(only_precision(manifest, precision))
    weights = arena = 0
    step = 0.0
    for s in m.shards:
        v = s.variants[precision]
        if _is_mapped(s, precision):
            continue
        weights += _weights(v)
        arena = max(arena, int(v.extra.get("planned_bytes", 0)))
        step += _compute_ms(v) or 0.0
    return DraftCost(weights + arena + kv_cache_bytes(manifest, context), step, k, acceptance, precision)


@dataclass
class _State:
    prec: dict  # shard name -> precision
    streamed: set


def _variant(shard, precision):
    return shard.variants[precision]


def _is_mapped(shard, precision) -> bool:
    return shard.kind == "embed" and "table" in _variant(shard, precision).extra


def _compute_ms(v) -> float | None:
    c = v.extra.get("compute_ms")
    return float(c) if c is not None else None


def _weights(v) -> int:
    """Resident bytes without the planned (activation) memory, which all shards share:
    they run one at a time from one arena."""
    return max(v.resident_bytes - int(v.extra.get("planned_bytes", 0)), 0)


_sim_cache: dict = {}  # id(shards) -> (shards, table, {state: ms}); emptied by each plan() call


def _table(shards):
    """Per shard: (name, {precision: (mapped, weights, planned bytes, load_ms, compute_ms
    or 0)}), and a memo of simulated assignments, kept for one plan() call: the greedy
    loops and the plans _best and _no_worse_than_uniform compare evaluate thousands of
    assignments (SmolLM2 at 150 MB: ~3,000 simulations, most of a second of planning on
    the variants' dicts, and planning is on the cold-start path)."""
    entry = _sim_cache.get(id(shards))
    if entry is None or entry[0] is not shards:  # holding `shards` keeps its id unique
        table = [(s.name, {p: (_is_mapped(s, p), _weights(v), int(v.extra.get("planned_bytes", 0)), v.load_ms,
                               _compute_ms(v) or 0.0) for p, v in s.variants.items()}) for s in shards]
        entry = _sim_cache[id(shards)] = (shards, table, {})
    return entry


def _memory(shards, st: _State, kv: int, slots: int, slot_extra: int = 0) -> tuple[int, int, int]:
    """(resident bytes, slot bytes + the shared activation arena, total)."""
    resident, biggest, arena = 0, 0, 0
    prec, streamed = st.prec, st.streamed
    for name, by_prec in _table(shards)[1]:
        mapped, b, planned, _, _ = by_prec[prec[name]]
        if mapped:
            continue
        if planned > arena:
            arena = planned
        if name in streamed:
            if b > biggest:
                biggest = b
        else:
            resident += b
    slot = (biggest + slot_extra) * slots * (biggest > 0) + arena
    return resident, slot, resident + slot + kv


def _simulate(shards, st: _State, slots: int, steps: int = 3, draft: DraftCost | None = None) -> float:
    """ms of one decode step in steady state. The executor runs shards in forward order.
    Pipelined (2 slots): a loader loads streamed shards in order, wrapping into the next
    step, as soon as a slot is free (a slot frees when its shard has run), so the next
    load overlaps compute. On-demand (1 slot): the executor loads each streamed shard
    itself when it reaches it. With a `draft`: expected ms per output token (module
    docstring); the executor runs the draft's k steps before each target call while the
    pipelined loader goes on loading the target's streamed shards."""
    _, table, memo = _table(shards)
    prec, streamed_set = st.prec, st.streamed
    key = (tuple(prec[name] for name, _ in table), frozenset(streamed_set), slots, steps, draft)
    if (ms := memo.get(key)) is not None:
        return ms
    seq, scale = [], verify_scale(draft.k) if draft else 1.0
    for name, by_prec in table:
        mapped, _, _, load, compute = by_prec[prec[name]]
        if not mapped:
            seq.append((name in streamed_set, load, compute * scale))
    load_end: list[float] = []  # per streamed execution, in order
    exec_end: list[float] = []
    t, step_start = 0.0, 0.0
    for _ in range(steps):
        step_start = t
        if draft:
            t += draft.draft_ms
        for streamed, load, compute in seq:
            if not streamed:
                t += compute
                continue
            n = len(load_end)
            if slots <= 1:
                start = t
            else:  # after the previous load, once a slot is free
                start = load_end[n - 1] if n else 0.0
                if n >= slots and exec_end[n - slots] > start:
                    start = exec_end[n - slots]
            end = start + load
            load_end.append(end)
            t = (end if end > t else t) + compute
            exec_end.append(t)
    ms = t - step_start
    memo[key] = ms = ms / draft.tokens_per_call if draft else ms
    return ms


def _lower(shard, p, precisions):
    avail = [q for q in precisions if q in shard.variants]
    i = avail.index(p)
    return avail[i + 1] if i + 1 < len(avail) else None


def _higher(shard, p, precisions):
    avail = [q for q in precisions if q in shard.variants]
    i = avail.index(p)
    return avail[i - 1] if i > 0 else None


def _kl(shard, p) -> float:
    imp = _variant(shard, p).importance
    return imp.kl if imp is not None else 0.0


def _tied_head(shards):
    """Name of the head whose precision a mapped embedding must follow (tied table)."""
    heads = [s for s in shards if s.kind == "head"]
    return heads[0].name if heads else None


# ---------------------------------------------------------------------------------------
# The manifest as the planner sees it


def only_precision(manifest, precision: str):
    """The manifest with every shard offered at `precision` only: the uniform-precision
    baseline a plan is compared with (placement is still planned under the budget)."""
    import dataclasses

    if precision not in manifest.precisions:
        raise UsageError(f"--precision {precision}: this shard set has {', '.join(manifest.precisions)}")
    shards = []
    for s in manifest.shards:
        if precision not in s.variants:
            raise UsageError(f"--precision {precision}: shard {s.name} has no {precision} variant")
        shards.append(dataclasses.replace(s, variants={precision: s.variants[precision]}))
    return dataclasses.replace(manifest, shards=shards, precisions=[precision])


def same_layer_timings(manifest):
    """The manifest with each group of like layer shards (same layer count, precision and
    resident bytes within 1%: the same program with other weights) given its group's
    median load_ms and compute_ms. A shard set's figures are one measurement each, and
    identical layers measured 11.6-18.7 ms to load at int8 (SmolLM2); planning on that
    noise would keep arbitrary layers resident instead of the forward prefix."""
    import dataclasses
    import statistics

    groups: dict = {}
    for s in manifest.shards:
        if s.kind == "layers":
            for p, v in s.variants.items():
                groups.setdefault((len(s.layers), p, round(math.log(max(v.resident_bytes, 1)) / math.log(1.01))), []).append(v)
    median = {}
    for vs in groups.values():
        loads = statistics.median(v.load_ms for v in vs)
        computes = [c for v in vs if (c := _compute_ms(v)) is not None]
        c = statistics.median(computes) if len(computes) == len(vs) else None
        for v in vs:
            median[id(v)] = (loads, c)
    shards = []
    for s in manifest.shards:
        variants = {}
        for p, v in s.variants.items():
            if id(v) in median:
                load, c = median[id(v)]
                v = dataclasses.replace(v, load_ms=load, extra={**v.extra, **({"compute_ms": c} if c is not None else {})})
            variants[p] = v
        shards.append(dataclasses.replace(s, variants=variants))
    return dataclasses.replace(manifest, shards=shards)
