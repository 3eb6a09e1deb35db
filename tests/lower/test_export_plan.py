"""`export --plan`: one monolithic program with a plan's per-layer precisions (stories260K)."""

from __future__ import annotations

import copy

import pytest

from edgectl.util.errors import EdgectlError
from edgectl.runtime.plan import Plan, ShardChoice

PROMPT = [1, 403, 11, 57, 300, 4, 91, 17, 230, 61]


def _plan(layer_precisions: list[str], head: str) -> Plan:
    shards = [ShardChoice("embed", "embed", [], head, "mapped", 0, 0.0, None, 0.0, 0.0)]
    shards += [ShardChoice(f"layers.{i}", "layers", [i], p, "resident", 1, 1.0, None, 0.0, 0.0)
               for i, p in enumerate(layer_precisions)]
    shards.append(ShardChoice("head", "head", [], head, "resident", 1, 1.0, None, 0.0, 0.0))
    return Plan("resident", 10**9, None, shards, 0, 0, 0, 0, 0, 0.0, 0.0, False)


@pytest.fixture(scope="module")
def fp32_model(stories_dir):
    from edgectl.checkpoint.checkpoint import load_model, resolve

    return load_model(resolve(str(stories_dir)), 128).eval()


def _logits(model):
    import torch

    k, v = model.empty_caches()
    with torch.no_grad():
        out = model(torch.tensor([PROMPT]), torch.arange(len(PROMPT)), torch.arange(len(PROMPT)), k, v)
    return out[0]


@pytest.mark.real_model
def test_plan_quantizes_exactly_the_layers_it_names(fp32_model):
    from edgectl.lower.export import quantize_by_plan

    m = copy.deepcopy(fp32_model)
    rec = quantize_by_plan(m, _plan(["int8", "fp32", "8da4w", "fp32", "fp32"], "int8"))
    assert set(rec["parts"]) == {"embedding", "layers.0", "layers.2"}
    for i in (1, 3, 4):  # untouched: the very same fp32 weights
        for (n, a), (_, b) in zip(m.layers[i].state_dict().items(), fp32_model.layers[i].state_dict().items()):
            assert a.equal(b), n
    for i in (0, 2):  # quantized: the linears are other modules or hold other tensors now
        assert any(type(a) is not type(b) or any(type(x) is not type(y) or not x.equal(y) for x, y in
                   zip(a.state_dict(keep_vars=True).values(), b.state_dict(keep_vars=True).values()))
                   for a, b in zip(m.layers[i].modules(), fp32_model.layers[i].modules()))
    assert hasattr(m.embed, "codes")  # the tied matrix went to int8 with the head
    a, b = _logits(m), _logits(fp32_model)
    assert not a.equal(b) and (a - b).abs().mean() < 0.5  # quantized, but still the same model (logits ~ ±15)


@pytest.mark.real_model
def test_plan_must_cover_the_model(fp32_model):
    from edgectl.lower.export import quantize_by_plan

    with pytest.raises(EdgectlError, match="does not cover"):
        quantize_by_plan(copy.deepcopy(fp32_model), _plan(["int8", "fp32"], "fp32"))


@pytest.mark.real_model
@pytest.mark.slow
def test_mixed_pte_matches_the_eager_mix(fp32_model, stories_dir, tmp_path):
    from edgectl.checkpoint.checkpoint import resolve
    from edgectl.lower.export import export_pte, quantize_by_plan
    from edgectl.runtime.runtime import PteModel

    plan = _plan(["8da4w", "int8", "fp32", "int8", "fp32"], "int8")
    out = export_pte(resolve(str(stories_dir)), tmp_path / "mixed.pte", max_seq_len=128, plan=plan)
    eager = copy.deepcopy(fp32_model)
    quantize_by_plan(eager, plan)
    ref = _logits(eager)
    import torch

    got = torch.from_numpy(PteModel(out.path).forward(PROMPT, 0, all_logits=True))
    assert (got - ref).abs().max().item() < 1e-3
