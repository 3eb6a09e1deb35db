"""Planner: fit a shard set into a memory budget (and a latency target), pure function.

    plan(manifest, budget_bytes, latency_target_ms=None, mode="auto") -> Plan

What counts against the budget: see plan.py; the cost model: plan_cost.py.

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

from edgectl.runtime.plan import MODES, SLOTS, Infeasible, Plan, ShardChoice, kv_cache_bytes
from edgectl.runtime.plan_cost import (DraftCost, _compute_ms, _higher, _is_mapped, _kl, _lower, _memory, _sim_cache,
                                       _simulate, _State, _tied_head, _variant, _weights, only_precision,
                                       same_layer_timings)
from edgectl.util.errors import EdgectlError, UsageError

STREAM_SLACK = 0.10  # see _plan step 3a
# Without a latency target, a single precision that fits is a reference the plan must match
# in accuracy only if its decode step is at most this many times the plan's: streaming
# fp32 on-demand (SmolLM2 at 150 MB: 478 ms a token against 130) is not a default anyone wants.
UNIFORM_SLOWDOWN = 2.0
# Shards whose figures differ by less than this (relative) count as equal when choosing
# which to stream or keep (_plan steps 2 and 3b): measured load times of identical layers
# differ by noise, and on a tie the first shards of the forward pass stay resident.
PRELOAD_TIE = 0.05


def plan(manifest, budget_bytes: int, latency_target_ms: float | None = None, mode: str = "auto",
         fixed_bytes: int = 0, precision: str | None = None, slot_extra_bytes: int = 0,
         context: int | None = None, stream_extra_bytes: int = 0, floor_bytes: int = 0,
         draft: DraftCost | None = None) -> Plan:
    """`precision`: every shard at that precision (see only_precision). `slot_extra_bytes`:
    what each pipelined loader slot costs besides its shard's weights, measured by the
    runtime (a streamed shard's own XNNPACK workspace). `stream_extra_bytes`: what loading
    a streamed shard costs besides its weights in every streaming mode, measured by the
    runtime (heap its loading touches and keeps, e.g. the freed raw constants, which the
    next streamed shard reuses). `context`: positions the run uses (the KV cache is charged
    for those; default max_seq_len). `floor_bytes`: the runtime floor, what the process holds
    before any shard (interpreter, numpy, ExecuTorch's runtime library): the budget counts
    the whole process, so the floor is counted like a fixed cost, and a budget at or below
    it is refused. `draft`: a resident draft for speculative decoding (draft_cost): its
    bytes are counted like a fixed cost, and times are expected ms per output token."""
    if context is not None and context >= manifest.max_seq_len:
        context = None
    if precision is not None:
        manifest = only_precision(manifest, precision)
    manifest = same_layer_timings(manifest)
    check_floor(budget_bytes, floor_bytes)
    if mode not in MODES:
        raise UsageError(f"--mode {mode!r}", hint=f"choose one of: {', '.join(MODES)}")
    if budget_bytes <= 0:
        raise UsageError("--memory-budget must be positive")
    kw = _costs(fixed_bytes, floor_bytes, slot_extra_bytes, stream_extra_bytes, context, draft)
    try:
        found = _in_mode(manifest, budget_bytes, latency_target_ms, mode, kw)
        if precision is None:
            found = _no_worse_than_uniform(found, manifest, budget_bytes, latency_target_ms, mode, kw)
        if draft:
            _compare_without_draft(found, manifest, budget_bytes, latency_target_ms, mode, kw, draft)
        return found
    finally:
        _sim_cache.clear()


def _costs(fixed: int, floor: int, slot_extra: int, stream_extra: int, context: int | None,
           draft: DraftCost | None) -> dict:
    """_plan's cost keywords: the floor and a resident draft count as fixed bytes."""
    return dict(fixed=fixed + floor + (draft.bytes if draft else 0), slot_extra=slot_extra, stream_extra=stream_extra,
                context=context, runtime_floor=floor, draft=draft)


def _compare_without_draft(found: Plan, manifest, budget: int, target: float | None, mode: str, kw: dict,
                           draft: DraftCost) -> None:
    """A note when the same budget without the draft is expected to be faster: the draft's
    memory can push target shards out to stream (at a budget where the target alone fits
    resident, drafting loses)."""
    alone_kw = {**kw, "fixed": kw["fixed"] - draft.bytes, "draft": None}
    try:
        alone = _in_mode(manifest, budget, target, mode, alone_kw)
    except EdgectlError:
        return
    if alone.ms_per_token < found.ms_per_token:
        found.notes.append(f"without the draft this budget plans {alone.ms_per_token:.1f} ms per token ({alone.mode}), "
                           f"faster than {found.ms_per_token:.1f} with it: the draft's {draft.bytes / 1e6:.1f} MB "
                           "make target shards stream; drop --draft or raise --memory-budget")


def check_floor(budget_bytes: int, floor_bytes: int) -> None:
    """Refuse a budget at or below the runtime floor (nothing would be left for the model)."""
    if floor_bytes and budget_bytes <= floor_bytes:
        raise EdgectlError(f"a budget of {budget_bytes / 1e6:.1f} MB is below this process's runtime floor of "
                           f"{floor_bytes / 1e6:.1f} MB (Python, numpy and ExecuTorch's runtime library, before any "
                           "shard): the budget counts the whole process",
                           hint=f"give --memory-budget above {-(-floor_bytes // 10**6)}MB plus the model's share")


def check_budget(manifest, budget_bytes: int, mode: str = "auto", fixed_bytes: int = 0, precision: str | None = None,
                 slot_extra_bytes: int = 0, stream_extra_bytes: int = 0, context: int | None = None,
                 floor_bytes: int = 0, draft: DraftCost | None = None) -> None:
    """Raise Infeasible, as plan() would, when the budget is below the feasibility minimum
    of `mode` (auto: of every mode), without planning: the runtime's pre-check, on the
    cold-start path (a full plan of SmolLM2 at 150 MB takes tens of ms)."""
    if mode not in MODES:
        raise UsageError(f"--mode {mode!r}", hint=f"choose one of: {', '.join(MODES)}")
    if context is not None and context >= manifest.max_seq_len:
        context = None
    if precision is not None:
        manifest = only_precision(manifest, precision)
    check_floor(budget_bytes, floor_bytes)
    kw = _costs(fixed_bytes, floor_bytes, slot_extra_bytes, stream_extra_bytes, context, draft)
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
          pin: set | None = None, check_only: bool = False, runtime_floor: int = 0,
          draft: DraftCost | None = None) -> Plan | None:
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
        raise Infeasible(budget, minimum, mode, kv, context or manifest.max_seq_len, fixed, floor=runtime_floor,
                         draft=draft.bytes if draft else 0)
    if check_only:
        return None

    st = _State({s.name: [q for q in precisions if q in s.variants][0] for s in shards}, set())
    _sync_embed(shards, st)
    mem = lambda: _memory(shards, st, kvf, slots, slot_extra)[2]  # noqa: E731
    time_ms = lambda: _simulate(shards, st, slots, draft=draft)  # noqa: E731
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
    if draft:
        notes.append(f"speculative: a resident {draft.precision or 'draft'} draft ({draft.bytes / 1e6:.1f} MB, counted in "
                     f"the fixed costs) proposes {draft.k} tokens a call; ms per token expects "
                     f"{draft.tokens_per_call:.2f} tokens a call at {draft.acceptance:.0%} acceptance")
    return Plan(actual_mode, budget, target, choices, kv, slot, resident, total, minimum, ms,
                sum(c.kl for c in choices), measured, notes=notes, fixed_bytes=fixed, context=context,
                floor_bytes=runtime_floor, draft=draft.to_dict() if draft else None)

