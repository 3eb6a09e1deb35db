"""The planner with a speculative draft (plan_cost.DraftCost), on synthetic manifests:
expectations worked out by hand, or invariants."""

from __future__ import annotations

import json

import pytest
from test_planner import MB, _layer, _manifest

from edgectl.runtime.plan import Infeasible, Plan, kv_cache_bytes
from edgectl.runtime.plan_cost import DraftCost, _simulate, _State, draft_cost, expected_tokens, verify_scale
from edgectl.runtime.planner import plan
from edgectl.runtime.speculative import plan_draft
from edgectl.util.errors import UsageError


def test_expected_tokens_by_hand():
    assert expected_tokens(0.5, 3) == pytest.approx(1 + 0.5 + 0.25 + 0.125)
    assert expected_tokens(1.0, 4) == 5.0 and expected_tokens(0.0, 4) == 1.0
    assert expected_tokens(0.8, 4) == pytest.approx(1 + 0.8 + 0.64 + 0.512 + 0.4096)


def test_draft_cost_by_hand():
    # 2 layers (8da4w: 1.5 MB, compute 0.25 ms), head (8da4w: 0.5 MB, no compute figure),
    # the embedding mapped from the head's file: weights 3.5 MB, no arena, its own KV cache
    m = _manifest([_layer(i, (0, .1, .2), compute=0.25) for i in range(2)])
    d = draft_cost(m, "8da4w", 3, context=100)
    assert d.bytes == int(3.5 * MB) + kv_cache_bytes(m, 100)
    assert d.step_ms == pytest.approx(0.5) and d.k == 3 and d.precision == "8da4w"
    assert d.draft_ms == pytest.approx(1.5)


def test_simulated_step_with_a_draft_by_hand():
    # two fp32 layers streamed (load 7 ms, compute 1 ms); the draft: 3 steps of 0.5 ms, each
    # draft kept with probability 0.5 (1.875 tokens a call); a call over 4 tokens computes
    # verify_scale(3) times one token's
    m = _manifest([_layer(i, (0, .1, .2), compute=1.0) for i in range(2)])
    names = {s.name for s in m.shards}
    st = _State({n: "fp32" for n in names}, {"layers.0", "layers.1"})
    d = DraftCost(0, 0.5, 3, 0.5)
    c = verify_scale(3)
    # on-demand: the draft, then load+run twice
    assert _simulate(m.shards, st, 1, draft=d) == pytest.approx((1.5 + 2 * (7 + c)) / 1.875)
    # pipelined: the loader is the bottleneck (14 ms a step); the draft runs while it loads
    assert _simulate(m.shards, st, 2, draft=d) == pytest.approx(14.0 / 1.875)
    st.streamed = set()
    assert _simulate(m.shards, st, 0, draft=d) == pytest.approx((1.5 + 2 * c) / 1.875)


def test_plan_counts_the_draft():
    """The draft's bytes count like a fixed cost, the plan stays within budget, the budget
    minimum rises by them (and the refusal names the draft), and a plan that must stream
    expects fewer ms per token with the draft than the same budget's plan without it."""
    m = _manifest([_layer(i, (0, .1, .2), compute=1.0) for i in range(4)])
    d = draft_cost(m, "8da4w", 4, acceptance=0.8)
    budget = 30 * MB
    alone = plan(m, budget, mode="pipelined", precision="fp32")  # an fp32 target: it must stream
    spec = plan(m, budget, mode="pipelined", precision="fp32", draft=d)
    assert spec.fixed_bytes == alone.fixed_bytes + d.bytes and spec.total_bytes <= budget
    assert spec.draft["bytes"] == d.bytes and spec.draft["tokens_per_call"] == pytest.approx(expected_tokens(0.8, 4))
    assert alone.streamed and spec.streamed and spec.ms_per_token < alone.ms_per_token
    assert any("speculative" in n for n in spec.notes)
    assert Plan.from_dict(json.loads(spec.to_json())) == spec
    least = plan(m, 10**9, mode="on-demand").minimum_bytes
    with pytest.raises(Infeasible) as e:
        plan(m, least + d.bytes - 1, mode="on-demand", draft=d)
    assert e.value.minimum == least + d.bytes and "the draft" in str(e.value)


def test_a_draft_that_makes_the_target_stream_is_noted():
    # the target fits resident alone (4 x 10 MB fp32 + head); with the draft it must stream
    m = _manifest([_layer(i, (0, .1, .2), compute=1.0) for i in range(4)])
    d = draft_cost(m, "8da4w", 4)
    budget = plan(m, 10**9).total_bytes + MB
    assert plan(m, budget, precision="fp32").mode == "resident"
    p = plan(m, budget, precision="fp32", draft=d)
    assert p.streamed and any("without the draft" in n for n in p.notes)


def test_plan_draft_spec():
    assert plan_draft(("precision", "8da4w"), "auto", 100 * MB) == ("8da4w", 4)
    assert plan_draft(("precision", "int8"), 6, 100 * MB) == ("int8", 6)
    assert plan_draft(("precision", "int8"), 6, None) is None  # no budget: nothing to plan
    assert plan_draft(("lookup", 3), 4, 100 * MB) is None  # a lookup holds nothing
    with pytest.raises(UsageError, match="same shard set"):
        plan_draft(("path", "other.pte"), 4, 100 * MB)
