"""Qwen3 and Phi-3 against transformers, on tiny random models of their real structure:
saved as Hugging Face directories and read back through edgectl's own checkpoint path
(Phi-3's fused qkv_proj and gate_up_proj split at load), eager and as a `.pte`."""

from __future__ import annotations

import copy
import shutil

import pytest
import torch

from edgectl.checkpoint.checkpoint import load_model, resolve
from edgectl.model import ModelArgs
from edgectl.util.errors import EdgectlError

transformers = pytest.importorskip("transformers")

VOCAB = 256
TINY = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=256, rms_norm_eps=1e-6,
            bos_token_id=1, eos_token_id=2, pad_token_id=None)
QWEN3 = dict(TINY, head_dim=24)  # Qwen3's head_dim is not hidden/heads (0.6B: 1024 and 16 heads of 128)
# Phi-3.5-mini's longrope in miniature: 16 positions of original context, 64 in all
LONGROPE = {"rope_type": "longrope", "rope_theta": 10000.0,
            "short_factor": [1.0, 1.1, 1.3, 1.6, 2.0, 2.5, 3.0, 4.0],
            "long_factor": [1.0, 1.5, 2.5, 4.0, 6.0, 9.0, 13.0, 20.0]}

LONG = {"rope_scaling": LONGROPE, "max_position_embeddings": 64, "original_max_position_embeddings": 16}


def _hf(arch: str, **over):
    cfg_cls = {"Qwen3ForCausalLM": transformers.Qwen3Config, "Phi3ForCausalLM": transformers.Phi3Config}[arch]
    over = copy.deepcopy(over)  # transformers' Phi3Config writes into the rope_scaling dict it is given
    cfg = cfg_cls(**{**(QWEN3 if arch == "Qwen3ForCausalLM" else TINY), **over})
    cfg.architectures = [arch]
    torch.manual_seed(0)
    model = getattr(transformers, arch)(cfg).eval()
    with torch.no_grad():  # random, non-trivial norms (q_norm and k_norm too) and biases
        for name, p in model.named_parameters():
            if name.endswith("norm.weight") or name.endswith(".bias"):
                p.copy_(torch.randn_like(p) * 0.3 + (1.0 if "norm" in name else 0.0))
    return model


def _save(hf, d, stories_dir):
    """A Hugging Face directory as a user has it: config.json, model.safetensors, a tokenizer."""
    hf.save_pretrained(d)
    for f in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(stories_dir / f, d / f)
    return d


def _incremental_logits(model, ids, split):
    """Prefill ids[:split], then one token per call, the caches written in place."""
    k, v = model.empty_caches()
    out, start = [], 0
    for chunk in (ids[:split], *[[t] for t in ids[split:]]):
        T = len(chunk)
        out.append(model(torch.tensor([chunk]), torch.arange(start, start + T), torch.arange(T), k, v)[0])
        start += T
    return torch.cat(out)


CASES = [
    ("Qwen3ForCausalLM", {}, 64),
    ("Qwen3ForCausalLM", {"tie_word_embeddings": True}, 64),  # 0.6B and 1.7B tie theirs
    ("Phi3ForCausalLM", {}, 64),
    ("Phi3ForCausalLM", {"sliding_window": 5}, 64),  # Phi-3-mini-4k's window (2047), in miniature
    ("Phi3ForCausalLM", {"partial_rotary_factor": 0.75, "tie_word_embeddings": True}, 64),  # Phi-4-mini's
    ("Phi3ForCausalLM", LONG, 64),  # past 16: long factors
    ("Phi3ForCausalLM", LONG, 16),  # within: short ones
    ("Phi3ForCausalLM", dict(LONG, partial_rotary_factor=0.5, rope_scaling=dict(  # Phi-4-mini's: both
        LONGROPE, short_factor=[1.0, 1.2, 1.7, 2.5], long_factor=[1.0, 3.0, 7.0, 15.0])), 64),
]


@pytest.mark.parametrize("arch,over,max_seq_len", CASES)
def test_parity_with_transformers(arch, over, max_seq_len, tmp_path, stories_dir):
    hf = _hf(arch, **over)
    ckpt = resolve(str(_save(hf, tmp_path / "m", stories_dir)))
    ours = load_model(ckpt, max_seq_len)
    if arch == "Qwen3ForCausalLM":
        assert ours.args.qk_norm and not ours.args.norm_plus_one
    torch.manual_seed(1)
    ids = torch.randint(0, VOCAB, (min(40, max_seq_len),)).tolist()
    with torch.no_grad():
        ref = hf(torch.tensor([ids])).logits[0]
        full = _incremental_logits(ours, ids, split=len(ids))
        inc = _incremental_logits(ours, ids, split=5)
    assert (full - ref).abs().max() < 1e-4
    assert (inc - ref).abs().max() < 1e-4


def test_phi3_fused_projections_split_at_load(tmp_path, stories_dir):
    hf = _hf("Phi3ForCausalLM")
    ours = load_model(resolve(str(_save(hf, tmp_path / "m", stories_dir))), 32)
    qkv = hf.model.layers[1].self_attn.qkv_proj.weight
    a = ours.layers[1].self_attn
    assert torch.equal(torch.cat([a.q_proj.weight, a.k_proj.weight, a.v_proj.weight]), qkv)
    assert a.q_proj.weight.shape == (4 * 16, 64) and a.k_proj.weight.shape == (2 * 16, 64)
    m = ours.layers[1].mlp
    assert torch.equal(torch.cat([m.gate_proj.weight, m.up_proj.weight]), hf.model.layers[1].mlp.gate_up_proj.weight)


def test_args_from_config():
    partial = ModelArgs.from_hf_config(_hf("Phi3ForCausalLM", partial_rotary_factor=0.75).config.to_dict())
    assert partial.rope_dim == 12 and not partial.layer_types and ModelArgs.from_dict(partial.to_dict()) == partial
    phi = ModelArgs.from_hf_config(_hf("Phi3ForCausalLM", **LONG,
                                       sliding_window=7).config.to_dict())
    assert phi.rope_dim is None and phi.sliding_window == 7 and all(phi.sliding(i) for i in range(2))
    assert phi.rope_scaling["rope_type"] == "longrope" and phi.rope_scaling["original_max_position_embeddings"] == 16
    assert abs(phi.rope_scaling["attention_factor"] - (1 + torch.log(torch.tensor(4.0)) / torch.log(torch.tensor(16.0))) ** 0.5) < 1e-6
    assert ModelArgs.from_dict(phi.to_dict()) == phi
    qwen = ModelArgs.from_hf_config(_hf("Qwen3ForCausalLM").config.to_dict())
    assert qwen.head_dim == 24 and qwen.qk_norm and not qwen.attention_bias and not qwen.layer_types
    assert ModelArgs.from_dict(qwen.to_dict()) == qwen
    # a config.json as Phi-3.5-mini ships it: "su"-era keys at the top level
    old = {"architectures": ["Phi3ForCausalLM"], **TINY, "original_max_position_embeddings": 16,
           "rope_scaling": {"type": "longrope", **{k: LONGROPE[k] for k in ("short_factor", "long_factor")}}}
    assert ModelArgs.from_hf_config(old).rope_scaling["long_factor"] == LONGROPE["long_factor"]
    assert ModelArgs.from_hf_config({"model_type": "qwen3", **QWEN3}).architecture == "Qwen3ForCausalLM"


@pytest.mark.parametrize("cfg,words", [
    ({"model_type": "phi3", "rope_scaling": {"rope_type": "dynamic", "factor": 2.0}}, "'dynamic'"),
    ({"model_type": "qwen3", "use_sliding_window": True}, "use_sliding_window"),
    ({"model_type": "qwen3", "attention_bias": True}, "attention_bias"),  # its o_proj would have a bias too
    ({"model_type": "phi3", "rope_scaling": {"type": "longrope"}}, "original_max_position_embeddings"),
])
def test_refused_in_one_line(cfg, words):
    with pytest.raises(EdgectlError) as e:
        ModelArgs.from_hf_config({**TINY, **cfg})
    assert words in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("arch,over", [  # 5-10 s each
    ("Qwen3ForCausalLM", {}),
    ("Phi3ForCausalLM", {"partial_rotary_factor": 0.75, "sliding_window": 9}),
])
def test_pte_logits_match_transformers(arch, over, tmp_path, stories_dir):
    from edgectl.lower.export import export_pte
    from edgectl.runtime.runtime import PteModel

    hf = _hf(arch, **over)
    out = tmp_path / "m.pte"
    export_pte(resolve(str(_save(hf, tmp_path / "m", stories_dir))), out, max_seq_len=64, prefill_chunk=16)
    torch.manual_seed(2)
    ids = torch.randint(0, VOCAB, (40,)).tolist()
    model = PteModel(out)
    ours = torch.from_numpy(model.forward(ids[:20], 0, all_logits=True))  # prefill in two chunks
    ours = torch.cat([ours] + [torch.from_numpy(model.forward([t], 20 + i, all_logits=True)) for i, t in enumerate(ids[20:])])
    with torch.no_grad():
        ref = hf(torch.tensor([ids])).logits[0]
    assert (ours.reshape(ref.shape) - ref).abs().max() < 1e-4
