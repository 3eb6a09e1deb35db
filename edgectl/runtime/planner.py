"""Planner: fit a shard set into a memory budget (and a latency target), pure function.

    plan(manifest, budget_bytes, latency_target_ms=None, mode="auto") -> Plan

What counts against the budget (all from the manifest's measured figures):
- every resident shard's `resident_bytes` at its chosen precision;
- the KV cache (owned by the runtime, never evicted), computed from the model shape for
  the positions the run will use (`context`: its prompt plus generated tokens, at most
  max_seq_len): the runtime's cache pages cost memory only once written (kv_cache_bytes);
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
The interpreter's own baseline (Python + torch + the runtime + thread pool, ~280-360 MB)
is not counted: the runtime measures it and reports it beside the model's cost, and
`bench --cgroup` caps a run at budget + that baseline.

How it chooses (greedy; every step is on the manifest's measured figures):
1. Start at every shard's top precision. While the all-resident set is over budget,
   lower the shard whose next precision costs the least accuracy per byte saved
   (importance.kl of that precision, in nats): the least important give up first.
2. If it still does not fit (or a streaming mode is asked for), stream shards: each step
   streams the shard that frees the most bytes per millisecond it adds to a decode step
   (the simulated pipeline below), later shards first on ties (within PRELOAD_TIE: the
   measured figures of identical layers differ by noise), so the first shards of the
   forward pass stay resident as the preload buffer and work starts at once.
3. Spend what is left: raise precisions back (most accuracy per byte first), then keep
   streamed shards resident again (most time saved first), as long as budget and
   latency target still hold (a streamed shard kept resident again: the earliest of
   those within PRELOAD_TIE of the most time saved). With shards streamed and no latency target, a raise must
   keep the decode step within STREAM_SLACK (10%) of the plan before raising: otherwise
   the most accurate plan streams top-precision layers at a few tokens per second.
4. A plan is never less accurate than a single precision that fits (within the target;
   without one, fitting the same way, resident or streaming, and at most UNIFORM_SLOWDOWN
   times slower): then that precision's time is the target (see _no_worse_than_uniform).
The expected time per token comes from simulating one decode step on the measured
load_ms and (when the manifest has them) compute_ms of each shard: a loader that loads
streamed shards in forward order into its slots while the executor runs shards.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field

from edgectl.util.errors import EdgectlError, UsageError

MODES = ("auto", "resident", "pipelined", "on-demand")
SLOTS = {"resident": 0, "pipelined": 2, "on-demand": 1}
PLAN_FORMAT = "edgectl-plan/1"
STREAM_SLACK = 0.10  # see _plan step 3a
# Without a latency target, a single precision that fits is a reference the plan must match
# in accuracy only if its decode step is at most this many times the plan's: streaming
# fp32 on-demand (SmolLM2 at 150 MB: 478 ms a token against 130) is not a default anyone wants.
UNIFORM_SLOWDOWN = 2.0
# Shards whose figures differ by less than this (relative) count as equal when choosing
# which to stream or keep (_plan steps 2 and 3b): measured load times of identical layers
# differ by noise, and on a tie the first shards of the forward pass stay resident.
PRELOAD_TIE = 0.05


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
                 partial: bool = False):
        self.args_ = (budget, minimum, mode, kv, positions, fixed)
        self.minimum = minimum
        what = {"resident": "all shards resident at their smallest precision",
                "pipelined": "every shard streamed through two loader slots",
                "on-demand": "every shard streamed through one loader slot"}[mode]
        at_least = "at least " if partial else ""
        super().__init__(
            f"a budget of {budget / 1e6:.1f} MB is below the feasible minimum of {at_least}{minimum / 1e6:.1f} MB "
            f"for mode {mode} ({what}, KV cache {kv / 1e6:.1f} MB for {positions} positions"
            + (f", measured start-up costs {fixed / 1e6:.1f} MB" if fixed else "")
            + (" so far; the first execute, not measured yet, adds more" if partial else "") + ")",
            hint=f"give --memory-budget {'more than ' if partial else ''}{int(-(-minimum // 10**5)) / 10:.1f}MB"
            + ("" if partial else " or more")
            + ("" if mode == "on-demand" else ", or --mode on-demand")
            + (", or a smaller --ctx-size" if positions > 64 else ""),
        )

    def partial(self) -> "Infeasible":
        return Infeasible(*self.args_, partial=True)


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
    fixed_bytes: int = 0  # measured start-up costs counted in total_bytes (see module doc)
    context: int | None = None  # positions the KV cache is planned for (None: max_seq_len)

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
    `context` positions are a contiguous prefix, charged in whole pages. (Programs read a
    window rounded up past them: pages never written read as the shared zero page.)"""
    m = manifest.model
    hd = m.get("head_dim") or m["dim"] // m["n_heads"]
    S = manifest.max_seq_len
    n = S if context is None else max(1, min(context, S))
    row = 4 * m["n_kv_heads"] * hd  # one position of one layer's K (or V)
    pages = lambda b: -(-b // PAGE) * PAGE  # noqa: E731
    return m["n_layers"] * 2 * min(pages(row * n), pages(row * S))


# ---------------------------------------------------------------------------------------
# Cost and time of one assignment


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
# The planner


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


def plan(manifest, budget_bytes: int, latency_target_ms: float | None = None, mode: str = "auto",
         fixed_bytes: int = 0, precision: str | None = None, slot_extra_bytes: int = 0,
         context: int | None = None, stream_extra_bytes: int = 0) -> Plan:
    """`precision`: every shard at that precision (see only_precision). `slot_extra_bytes`:
    what each pipelined loader slot costs besides its shard's weights, measured by the
    runtime (a streamed shard's own XNNPACK workspace). `stream_extra_bytes`: what loading
    a streamed shard costs besides its weights in every streaming mode, measured by the
    runtime (heap its loading touches and keeps, e.g. the freed raw constants, which the
    next streamed shard reuses). `context`: positions the run uses (the KV cache is charged
    for those; default max_seq_len)."""
    if context is not None and context >= manifest.max_seq_len:
        context = None
    if precision is not None:
        manifest = only_precision(manifest, precision)
    manifest = same_layer_timings(manifest)
    if mode not in MODES:
        raise UsageError(f"--mode {mode!r}", hint=f"choose one of: {', '.join(MODES)}")
    if budget_bytes <= 0:
        raise UsageError("--memory-budget must be positive")
    kw = dict(fixed=fixed_bytes, slot_extra=slot_extra_bytes, stream_extra=stream_extra_bytes, context=context)
    try:
        found = _in_mode(manifest, budget_bytes, latency_target_ms, mode, kw)
        if precision is None:
            found = _no_worse_than_uniform(found, manifest, budget_bytes, latency_target_ms, mode, kw)
        return found
    finally:
        _sim_cache.clear()


def check_budget(manifest, budget_bytes: int, mode: str = "auto", fixed_bytes: int = 0, precision: str | None = None,
                 slot_extra_bytes: int = 0, stream_extra_bytes: int = 0, context: int | None = None) -> None:
    """Raise Infeasible, as plan() would, when the budget is below the feasibility minimum
    of `mode` (auto: of every mode), without planning: the runtime's pre-check, on the
    cold-start path (a full plan of SmolLM2 at 150 MB takes tens of ms)."""
    if mode not in MODES:
        raise UsageError(f"--mode {mode!r}", hint=f"choose one of: {', '.join(MODES)}")
    if context is not None and context >= manifest.max_seq_len:
        context = None
    if precision is not None:
        manifest = only_precision(manifest, precision)
    kw = dict(fixed=fixed_bytes, slot_extra=slot_extra_bytes, stream_extra=stream_extra_bytes, context=context)
    err = None
    for m in (("resident", "pipelined", "on-demand") if mode == "auto" else (mode,)):
        try:
            return _plan(manifest, budget_bytes, None, m, check_only=True, **kw)
        except Infeasible as e:
            err = e
    raise err


def _in_mode(manifest, budget: int, target: float | None, mode: str, kw: dict) -> Plan:
    """`auto`: the first of resident, pipelined, on-demand that fits."""
    if mode != "auto":
        return _best(manifest, budget, target, mode, **kw)
    last_err = None
    for m in ("resident", "pipelined", "on-demand"):
        try:
            return _best(manifest, budget, target, m, auto=True, **kw)
        except EdgectlError as e:
            last_err = e
    raise last_err


def _no_worse_than_uniform(found: Plan, manifest, budget: int, target: float | None, mode: str, kw: dict) -> Plan:
    """A plan is never less accurate than a single precision that fits the budget (and the
    target): the greedy search can miss one, e.g. all fp32 streamed, which needs every
    layer raised at once before the loader slots it sizes pay off.
    Without a latency target, a single precision counts if it fits the same way (resident,
    or streaming) and is at most UNIFORM_SLOWDOWN times slower. The STREAM_SLACK rule keeps
    a streaming plan near its fastest, which can leave it below uniform int8 (SmolLM2 at
    125 MB: the 8da4w-heavy plan streams at 134 ms a token, sum of KL 0.088; all int8 streams
    at 179 ms, KL 0.023). Then that precision's expected time becomes the latency target,
    and the plan is the most accurate within it (or the uniform plan itself, if the greedy
    search does worse)."""
    ref = None
    for q in manifest.precisions:
        try:
            u = _in_mode(only_precision(manifest, q), budget, target, mode, kw)
        except EdgectlError:
            continue
        if target is None and ((u.mode == "resident") != (found.mode == "resident")
                               or u.ms_per_token > found.ms_per_token * UNIFORM_SLOWDOWN):
            continue
        if u.kl_sum < found.kl_sum - 1e-12 and (ref is None or u.kl_sum < ref[1].kl_sum):
            ref = (q, u)
    if ref is None:
        return found
    q, u = ref
    how = "resident" if u.mode == "resident" else "streamed"
    if target is not None:
        u.notes.append(f"uniform {q} ({how}) is more accurate within {target:g} ms per token than the mixed plans found")
        return u
    try:
        held = _in_mode(manifest, budget, u.ms_per_token * (1 + 1e-9), mode, kw)
    except EdgectlError:
        held = None
    best = held if held is not None and held.kl_sum <= u.kl_sum else u
    best.latency_target_ms = None
    best.notes = [n for n in best.notes if "--latency-target" not in n]
    best.notes.append(f"no --latency-target: held to the {u.ms_per_token:.1f} ms per token of uniform {q} "
                      f"(the most accurate single precision that fits {how}), to be at least as accurate; "
                      f"give --latency-target to trade speed for accuracy")
    return best


def _best(manifest, budget: int, target: float | None, mode: str, **kw) -> Plan:
    """The greedy plan, and the same with the head held at each higher precision (the
    embedding follows a tied head), each also with the head kept resident: when shards
    must stream, the greedy first lowers everything (the head too, the shard importance
    ranks first) and can only buy precision back through loader slots, i.e. for streamed
    layers; and it streams the shard that frees the most bytes per ms first, which is the
    head (the largest shard), though a streamed head then sizes every loader slot.
    Of the plans found, the most accurate (lowest sum of KL) within the latency target, or
    without one within STREAM_SLACK of the fastest, is kept."""
    plans, err = [], None
    head = _tied_head(manifest.shards)
    variants = [(None, None)]
    if head and SLOTS[mode]:
        avail = [q for q in manifest.precisions if q in {s.name: s for s in manifest.shards}[head].variants]
        variants = [(f, pin) for f in [None] + [{head: q} for q in avail[:-1]] for pin in (None, {head})]
    for f, pin in variants:
        try:
            plans.append(_plan(manifest, budget, target, mode, floor=f, pin=pin, **kw))
        except EdgectlError as e:
            if f is None and pin is None:
                err = e
    if not plans:
        raise err
    limit = target if target is not None else min(p.ms_per_token for p in plans) * (1 + STREAM_SLACK)
    ok = [p for p in plans if p.ms_per_token <= limit + 1e-9] or plans[:1]
    return min(ok, key=lambda p: p.kl_sum)


def _sync_embed(shards, st: _State) -> None:
    """A mapped embedding reads the head's table: it takes the head's precision."""
    head = _tied_head(shards)
    for s in shards:
        if s.kind == "embed" and head and st.prec[head] in s.variants and _is_mapped(s, st.prec[head]):
            st.prec[s.name] = st.prec[head]


def _plan(manifest, budget: int, target: float | None, mode: str, auto: bool = False, fixed: int = 0,
          slot_extra: int = 0, stream_extra: int = 0, floor: dict | None = None, context: int | None = None,
          pin: set | None = None, check_only: bool = False) -> Plan | None:
    shards, precisions = manifest.shards, manifest.precisions
    kv = kv_cache_bytes(manifest, context)
    if mode == "on-demand":  # the executor loads each shard itself, in the shared workspace
        slot_extra = 0
    slot_extra += stream_extra
    kvf = kv + fixed  # what every plan pays besides shards: KV cache and the measured start-up costs
    slots = SLOTS[mode]
    movable = [s for s in shards if not (s.kind == "embed" and all("table" in v.extra for v in s.variants.values()))]
    # Feasibility minimum: everything at its smallest variant, streamed as far as the mode allows.
    small = _State({s.name: min(s.variants, key=lambda q: _weights(s.variants[q])) for s in shards}, set())
    _sync_embed(shards, small)
    if slots:
        small.streamed = {s.name for s in movable}
    minimum = _memory(shards, small, kvf, slots, slot_extra)[2]
    if budget < minimum:
        raise Infeasible(budget, minimum, mode, kv, context or manifest.max_seq_len, fixed)
    if check_only:
        return None

    st = _State({s.name: [q for q in precisions if q in s.variants][0] for s in shards}, set())
    _sync_embed(shards, st)
    mem = lambda: _memory(shards, st, kvf, slots, slot_extra)[2]  # noqa: E731
    time_ms = lambda: _simulate(shards, st, slots)  # noqa: E731
    ok_time = lambda: target is None or time_ms() <= target  # noqa: E731

    # 1. least important give up precision first (accuracy lost per byte saved)
    while mem() > budget:
        best = None
        for s in movable:
            q = _lower(s, st.prec[s.name], precisions)
            if q is None or (floor and s.name in floor and precisions.index(q) > precisions.index(floor[s.name])):
                continue
            saved = _weights(_variant(s, st.prec[s.name])) - _weights(_variant(s, q))
            if saved <= 0:
                continue
            cost = (_kl(s, q) - _kl(s, st.prec[s.name])) / saved
            if best is None or cost < best[0]:
                best = (cost, s, q)
        if best is None:
            break
        st.prec[best[1].name] = best[2]
        _sync_embed(shards, st)
    if auto and mode == "resident" and mem() > budget:
        raise EdgectlError("does not fit resident")
    # 2. stream what still does not fit, stalling the pipeline least
    while mem() > budget and slots:
        cands = []
        base_t = time_ms()
        for pos, s in enumerate(movable):
            if s.name in st.streamed or (pin and s.name in pin):
                continue
            # bytes the shard itself gives up (the first streamed shards may cost more
            # in loader slots than they free; the loop goes on until the set fits)
            freed = _weights(_variant(s, st.prec[s.name]))
            st.streamed.add(s.name)
            added = max(time_ms() - base_t, 1e-6)
            st.streamed.discard(s.name)
            if freed <= 0:
                continue
            cands.append((freed / added, pos, s))
        if not cands:
            break
        top = max(c[0] for c in cands)
        st.streamed.add(max((c for c in cands if c[0] >= top * (1 - PRELOAD_TIE)), key=lambda c: c[1])[2].name)
    if mem() > budget:  # cannot happen above the minimum; keep the guard honest
        raise EdgectlError(f"no plan fits {budget / 1e6:.1f} MB in mode {mode} (minimum {minimum / 1e6:.1f} MB)")
    # 3a. raise precisions back while budget and latency hold (most accuracy per byte first).
    # With shards streamed and no latency target, a raise may not slow a decode step by more
    # than STREAM_SLACK over the plan found so far: a streamed fp32 layer buys a sliver of
    # accuracy for several ms of loading per token. --latency-target lifts this.
    notes = []
    if target is None and st.streamed:
        base = time_ms()
        ok_time = lambda: time_ms() <= base * (1 + STREAM_SLACK) + 1e-9  # noqa: E731
        notes.append(f"no --latency-target: precisions raised only while a decode step stays within "
                     f"{STREAM_SLACK:.0%} of {base:.1f} ms; give --latency-target to trade speed for accuracy")
    while True:
        best = None
        for s in movable:
            q = _higher(s, st.prec[s.name], precisions)
            if q is None:
                continue
            old = st.prec[s.name]
            st.prec[s.name] = q
            _sync_embed(shards, st)
            fits, fast = mem() <= budget, ok_time()
            extra = mem()
            st.prec[s.name] = old
            _sync_embed(shards, st)
            if not (fits and fast):
                continue
            gain = _kl(s, old) - _kl(s, q)
            if gain <= 0:
                continue
            key = gain / max(extra - mem(), 1)
            if best is None or key > best[0]:
                best = (key, s, q)
        if best is None:
            break
        st.prec[best[1].name] = best[2]
        _sync_embed(shards, st)
    # 3b. bring streamed shards back (most time saved first) while the budget holds
    while st.streamed:
        cands = []
        base_t = time_ms()
        for pos, s in enumerate(movable):
            if s.name not in st.streamed:
                continue
            st.streamed.discard(s.name)
            if mem() <= budget:
                cands.append((base_t - time_ms(), pos, s))
            st.streamed.add(s.name)
        if not cands:
            break
        top = max(c[0] for c in cands)
        near = [c for c in cands if c[0] >= top - abs(top) * PRELOAD_TIE]
        st.streamed.discard(min(near, key=lambda c: c[1])[2].name)
    ms = time_ms()
    if target is not None and ms > target:
        raise EdgectlError(
            f"no plan within {budget / 1e6:.1f} MB meets {target:g} ms per token in mode {mode}: "
            f"the best found takes {ms:.1f} ms",
            hint="raise --memory-budget or --latency-target",
        )
    resident, slot, total = _memory(shards, st, kvf, slots, slot_extra)
    actual_mode = mode if st.streamed or not auto else "resident"
    choices = []
    for s in shards:
        p = st.prec[s.name]
        v = _variant(s, p)
        placement = "mapped" if _is_mapped(s, p) else ("streamed" if s.name in st.streamed else "resident")
        imp = v.importance
        choices.append(ShardChoice(s.name, s.kind, list(s.layers), p, placement, 0 if placement == "mapped" else _weights(v),
                                   v.load_ms, _compute_ms(v), imp.kl if imp else 0.0, imp.ppl_delta if imp else 0.0))
    measured = all(c.compute_ms is not None for c in choices if c.placement != "mapped")
    if not measured:
        notes.append("compute time per shard not in the manifest (`edgectl shard DIR --remeasure` adds it): "
                     "expected ms/token counts loading only")
    return Plan(actual_mode, budget, target, choices, kv, slot, resident, total, minimum, ms,
                sum(c.kl for c in choices), measured, notes=notes, fixed_bytes=fixed, context=context)


def render_rows(p: Plan) -> list[list[str]]:
    """Table rows for the CLI: shard, precision, placement, MB, KL, ppl delta, ms."""
    rows = []
    for c in p.shards:
        ms = c.load_ms if c.placement == "streamed" else 0.0
        rows.append([c.name, c.precision, c.placement, f"{c.bytes / 1e6:.2f}", f"{c.kl:.4f}", f"{c.ppl_delta:+.3f}",
                     f"{ms + (c.compute_ms or 0.0):.2f}"])
    return rows
