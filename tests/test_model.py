"""The one model definition against transformers, for every architecture it claims."""

from __future__ import annotations

import pytest
import torch

from edgectl.checkpoint.checkpoint import Checkpoint, load_model, resolve
from edgectl.util.errors import EdgectlError
from edgectl.model import ModelArgs

transformers = pytest.importorskip("transformers")

TINY = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=8,
            num_key_value_heads=2, vocab_size=128, max_position_embeddings=256, rms_norm_eps=1e-5)


def _hf_model(arch: str, **over):
    cfg_cls = {"LlamaForCausalLM": transformers.LlamaConfig, "Qwen2ForCausalLM": transformers.Qwen2Config,
               "MistralForCausalLM": transformers.MistralConfig}[arch]
    cfg = cfg_cls(**{**TINY, **over})
    cfg.architectures = [arch]
    torch.manual_seed(0)
    model = getattr(transformers, arch)(cfg).eval()
    with torch.no_grad():  # random, non-trivial norms and biases
        for name, p in model.named_parameters():
            if name.endswith("norm.weight") or name.endswith(".bias"):
                p.copy_(torch.randn_like(p) * 0.1 + (1.0 if "norm" in name else 0.0))
    return model


def _ours(hf, max_seq_len=64):
    cfg = hf.config.to_dict()
    ckpt = Checkpoint("tiny", None, "hf", cfg, "", {})
    ckpt.tensors = lambda: iter(hf.state_dict().items())
    return load_model(ckpt, max_seq_len)


def _incremental_logits(model, ids, split):
    """Prefill ids[:split], then one token per call, the caches written in place."""
    k, v = model.empty_caches()
    out, start = [], 0
    for chunk in (ids[:split], *[[t] for t in ids[split:]]):
        T = len(chunk)
        out.append(model(torch.tensor([chunk]), torch.arange(start, start + T), torch.arange(T), k, v)[0])
        start += T
    return torch.cat(out)


@pytest.mark.parametrize("arch,over", [
    ("LlamaForCausalLM", {}),
    ("LlamaForCausalLM", {"tie_word_embeddings": True}),
    ("LlamaForCausalLM", {"rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                             "high_freq_factor": 4.0, "original_max_position_embeddings": 32},
                          "rope_theta": 500000.0}),
    ("Qwen2ForCausalLM", {"tie_word_embeddings": True}),
    ("MistralForCausalLM", {}),
    ("MistralForCausalLM", {"sliding_window": 8}),  # 40 positions: most queries see only their last 8
])
def test_parity_with_transformers(arch, over):
    hf = _hf_model(arch, **over)
    ours = _ours(hf)
    ids = torch.randint(0, 128, (40,)).tolist()
    with torch.no_grad():
        ref = hf(torch.tensor([ids])).logits[0]
        full = _incremental_logits(ours, ids, split=len(ids))
        inc = _incremental_logits(ours, ids, split=7)
    assert (full - ref).abs().max() < 1e-4
    assert (inc - ref).abs().max() < 1e-4


def test_weights_the_model_has_no_place_for_are_refused():
    """A Llama with attention_bias carries an o_proj bias (q/k/v biases the model has, as Qwen2): dropping it
    would give wrong logits without a word, so loading says so in one line."""
    hf = _hf_model("LlamaForCausalLM", attention_bias=True)
    with pytest.raises(EdgectlError, match=r"^tiny: 2 weights that edgectl's model has no place for, e.g. model.layers.0.self_attn.o_proj.bias") as e:
        _ours(hf)
    assert e.value.hint
    plain = _hf_model("LlamaForCausalLM")  # an old file's RoPE buffer is no weight: loads
    state = dict(plain.state_dict(), **{"model.layers.0.self_attn.rotary_emb.inv_freq": torch.ones(4)})
    ckpt = Checkpoint("tiny", None, "hf", plain.config.to_dict(), "", {})
    ckpt.tensors = lambda: iter(state.items())
    load_model(ckpt, 64)


GEMMA3_TINY = dict(TINY, head_dim=16, num_hidden_layers=4, sliding_window=5, query_pre_attn_scalar=24,
                   layer_types=["sliding_attention", "sliding_attention", "full_attention", "sliding_attention"])


def _gemma3_hf(**over):
    cfg = transformers.Gemma3TextConfig(**{**GEMMA3_TINY, **over})
    cfg.architectures = ["Gemma3ForCausalLM"]
    torch.manual_seed(0)
    model = transformers.Gemma3ForCausalLM(cfg).eval()
    with torch.no_grad():  # Gemma's norms start at w = 0 (scale 1 + w): make each one matter
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(torch.randn_like(p) * 0.3)
    return model


@pytest.mark.parametrize("over", [
    {},  # 40 tokens through sliding windows of 5: the window, not the causal mask, decides
    {"final_logit_softcapping": 3.0},
    {"rope_parameters": {"full_attention": {"rope_type": "linear", "factor": 4.0, "rope_theta": 1e6},
                         "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0}}},
])
def test_gemma3_parity_with_transformers(over):
    hf = _gemma3_hf(**over)
    ours = _ours(hf)
    ids = torch.randint(0, 128, (40,)).tolist()
    with torch.no_grad():
        ref = hf(torch.tensor([ids])).logits[0]
        full = _incremental_logits(ours, ids, split=len(ids))
        inc = _incremental_logits(ours, ids, split=7)
    assert (full - ref).abs().max() < 1e-4
    assert (inc - ref).abs().max() < 1e-4


def test_gemma3_args_from_config():
    hf = _gemma3_hf(final_logit_softcapping=30.0, rope_parameters={
        "full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1e6},
        "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0}})
    a = ModelArgs.from_hf_config(hf.config.to_dict())
    assert a.layer_types == tuple(GEMMA3_TINY["layer_types"]) and [a.sliding(i) for i in range(4)] == [1, 1, 0, 1]
    assert (a.sliding_window, a.rope_theta, a.rope_local_theta) == (5, 1e6, 10000.0)
    assert a.rope_scaling["rope_type"] == "linear" and a.rope_scaling["factor"] == 8.0
    assert a.attn_scale == 24 ** -0.5 and a.final_logit_softcap == 30.0 and a.embed_scale == torch.tensor(8.0).item()
    assert a.norm_plus_one and a.sandwich_norms and a.qk_norm and a.mlp_act == "gelu_tanh" and a.tie_embeddings
    assert ModelArgs.from_dict(a.to_dict()) == a
    # a Llama's metadata carries none of Gemma's fields: what runtimes before them read
    llama = ModelArgs.from_hf_config(_hf_model("LlamaForCausalLM").config.to_dict())
    assert not {"layer_types", "embed_scale", "norm_plus_one", "mlp_act"} & set(llama.to_dict())
    assert ModelArgs.from_dict(llama.to_dict()) == llama
    # an old-style config.json: sliding_window_pattern, rope_local_base_freq, rope_scaling
    old = {"architectures": ["Gemma3ForCausalLM"], **TINY, "num_hidden_layers": 7, "sliding_window_pattern": 3,
           "rope_theta": 1e6, "rope_local_base_freq": 1e4, "rope_scaling": {"rope_type": "linear", "factor": 8.0}}
    b = ModelArgs.from_hf_config(old)
    assert [b.sliding(i) for i in range(7)] == [1, 1, 0, 1, 1, 0, 1]
    assert (b.rope_theta, b.rope_local_theta, b.rope_scaling["factor"]) == (1e6, 1e4, 8.0)
    with pytest.raises(EdgectlError, match="soft-capping"):
        ModelArgs.from_hf_config({**old, "attn_logit_softcapping": 50.0})


def test_stories260k_parity(stories_dir):
    hf = transformers.AutoModelForCausalLM.from_pretrained(stories_dir, dtype=torch.float32).eval()
    ours = load_model(resolve(str(stories_dir)), 128)
    ids = [1, 403, 407, 261, 378, 259, 300, 310, 400, 12, 99]
    with torch.no_grad():
        ref = hf(torch.tensor([ids])).logits[0]
        assert (_incremental_logits(ours, ids, split=4) - ref).abs().max() < 1e-4


@pytest.mark.real_model
def test_smollm2_eager_parity(smol_gguf, smol_hf_model):
    ours = load_model(resolve(str(smol_gguf)), 128)
    ids = [1, 9690, 314, 253, 655, 28, 665, 436, 253, 2442, 1933, 1130, 216, 7, 8, 30, 2020, 78]
    with torch.no_grad():
        ref = smol_hf_model(torch.tensor([ids])).logits[0]
        assert (_incremental_logits(ours, ids, split=5) - ref).abs().max() < 1e-4


@pytest.fixture(scope="module")
def gemma_ours(gemma_gguf):
    return load_model(resolve(str(gemma_gguf)), 640)


@pytest.mark.real_model
def test_gemma3_270m_eager_parity(gemma_ours, gemma_hf_model):
    ids = [2, 105, 2364, 107, 3689, 563, 506, 5279, 529, 7001, 236881, 106, 107, 105, 4368, 107]  # the chat prompt
    with torch.no_grad():
        ref = gemma_hf_model(torch.tensor([ids])).logits[0]
        assert (_incremental_logits(gemma_ours, ids, split=5) - ref).abs().max() < 1e-4


@pytest.mark.real_model
@pytest.mark.slow
def test_gemma3_270m_eager_parity_past_the_window(gemma_ours, gemma_hf_model):
    """540 tokens: from position 512 on, the sliding layers see only their window of 512.
    Random tokens give logits up to ~130, whose fp32 sums over 540 positions differ by up to
    5e-4 (4e-6 relative): the bound is relative, as for the SmolLM2 `.pte` (2e-5)."""
    torch.manual_seed(1)
    ids = [2] + torch.randint(236, 200000, (539,)).tolist()
    with torch.no_grad():
        ref = gemma_hf_model(torch.tensor([ids])).logits[0]
        ours = _incremental_logits(gemma_ours, ids, split=520)
    assert gemma_ours.args.sliding_window == 512
    assert (ours - ref).abs().max() < 2e-5 * ref.abs().max()


@pytest.mark.real_model
def test_gemma3_270m_eager_greedy_64(gemma_gguf, gemma_ours, gemma_hf_model):
    from edgectl.runtime.tokenizer import Tokenizer

    ck = resolve(str(gemma_gguf))
    ids = Tokenizer(ck.tokenizer_json, ck.tokenizer_config, None, ()).encode("Once upon a time")
    k, v = gemma_ours.empty_caches()
    seq, start = list(ids), 0
    with torch.no_grad():
        while len(seq) < len(ids) + 64:
            new = seq[start:]
            logits = gemma_ours(torch.tensor([new]), torch.arange(start, start + len(new)), torch.tensor([len(new) - 1]), k, v)
            start = len(seq)
            seq.append(int(logits[0, -1].argmax()))
        ref = gemma_hf_model.generate(torch.tensor([ids]), max_new_tokens=64, min_new_tokens=64, do_sample=False)
    assert seq == ref[0].tolist()


def test_unsupported_architecture_names_the_supported_ones():
    with pytest.raises(EdgectlError) as e:
        ModelArgs.from_hf_config({"architectures": ["GPTNeoXForCausalLM"]})
    assert "GPTNeoXForCausalLM" in str(e.value) and "\n" not in str(e.value)
    for arch in ("LlamaForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM", "Phi3ForCausalLM", "Gemma3ForCausalLM"):
        assert arch in e.value.hint




def test_attention_reads_only_positions_before_start_plus_T():
    """The one attention (llama::custom_sdpa over the caller's cache) reads positions
    < start + T only: NaN written past them changes nothing."""
    ours = _ours(_hf_model("LlamaForCausalLM"))
    ids = torch.randint(0, 128, (12,)).tolist()
    with torch.no_grad():
        k, v = ours.empty_caches()
        clean = ours(torch.tensor([ids[:8]]), torch.arange(8), torch.arange(8), k, v)
        step = ours(torch.tensor([ids[8:9]]), torch.arange(8, 9), torch.arange(1), k, v)
        k2, v2 = ours.empty_caches()
        for c in (*k2, *v2):
            c.fill_(float("nan"))
        dirty = ours(torch.tensor([ids[:8]]), torch.arange(8), torch.arange(8), k2, v2)
        for c in (*k2, *v2):
            c[:, 9:] = float("nan")
        step2 = ours(torch.tensor([ids[8:9]]), torch.arange(8, 9), torch.arange(1), k2, v2)
    assert torch.isfinite(dirty).all() and torch.isfinite(step2).all()
    assert torch.equal(clean, dirty) and torch.equal(step, step2)
    assert torch.isnan(k2[0][:, 9:]).all()  # written only where the tokens went
