"""The planner's cost model: memory and simulated decode-step time of one assignment of precisions and placements.

The expected time per token comes from simulating one decode step on the measured
load_ms and (when the manifest has them) compute_ms of each shard: a loader that loads
streamed shards in forward order into its slots while the executor runs shards.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from edgectl.util.errors import UsageError


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


def _simulate(shards, st: _State, slots: int, steps: int = 3) -> float:
    """ms of one decode step in steady state. The executor runs shards in forward order.
    Pipelined (2 slots): a loader loads streamed shards in order, wrapping into the next
    step, as soon as a slot is free (a slot frees when its shard has run), so the next
    load overlaps compute. On-demand (1 slot): the executor loads each streamed shard
    itself when it reaches it."""
    _, table, memo = _table(shards)
    prec, streamed_set = st.prec, st.streamed
    key = (tuple(prec[name] for name, _ in table), frozenset(streamed_set), slots, steps)
    if (ms := memo.get(key)) is not None:
        return ms
    seq = []
    for name, by_prec in table:
        mapped, _, _, load, compute = by_prec[prec[name]]
        if not mapped:
            seq.append((name in streamed_set, load, compute))
    load_end: list[float] = []  # per streamed execution, in order
    exec_end: list[float] = []
    t, step_start = 0.0, 0.0
    for _ in range(steps):
        step_start = t
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
    memo[key] = ms = t - step_start
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
