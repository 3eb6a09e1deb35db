"""edgectl.checkpoint.gguf_loader: tiny GGUF files written here, and the real SmolLM2 Q4_1 file against transformers."""

import json

import gguf
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q
from tokenizers import Tokenizer

from edgectl.util.errors import EdgectlError
from edgectl.checkpoint.gguf_loader import read_gguf

# ------------------------------------------------------------------------------ tiny GGUF files

HIDDEN, HEADS, KV_HEADS, HEAD_DIM, INTER, LAYERS = 64, 4, 2, 16, 96, 2
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def _llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """convert_hf_to_gguf.py's LlamaModel.permute: HF rotate_half rows -> GGML interleaved pairs."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _byte_level_vocab():
    from edgectl.checkpoint.gguf_tokenizer import _bytes_to_unicode

    merges = ["Ġ t", "h e", "Ġt he", "Ġ w", "o r", "Ġw or", "l d", "Ġwor ld"]
    tokens = SPECIALS + sorted(set(_bytes_to_unicode().values())) + [m.replace(" ", "") for m in merges]
    return tokens, [3] * len(SPECIALS) + [1] * (len(tokens) - len(SPECIALS)), merges


SPM_PIECES = ["▁", "h", "e", "l", "o", "w", "r", "d", "he", "ll", "▁h", "▁he", "▁hell", "▁hello", "▁w", "or"]
SPM_PIECES += ["▁wor", "ld", "▁world", "!", "▁!"]


def _sentencepiece_vocab():
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)] + SPM_PIECES
    types = [2, 3, 3] + [6] * 256 + [1] * len(SPM_PIECES)
    return tokens, types, [0.0] * 259 + [-float(i) for i in range(len(SPM_PIECES))]


def write_gguf(
    path, arch="llama", *, quant=Q.F32, tied=True, bias=False, rope_freqs=None, pre="smollm", spm=False
):
    """A 2-layer model in the layout llama.cpp writes; returns the HF-layout weights it should read back as."""
    rng = np.random.default_rng(0)
    w = gguf.GGUFWriter(str(path), arch)
    if spm:  # a Llama-2 / Mistral style sentencepiece vocabulary, with no merges: they come from the scores
        tokens, types, scores = _sentencepiece_vocab()
        w.add_tokenizer_model("llama")
        w.add_token_scores(scores)
        w.add_unk_token_id(0)
    else:
        tokens, types, merges = _byte_level_vocab()
        w.add_tokenizer_model("gpt2")
        w.add_tokenizer_pre(pre)
        w.add_token_merges(merges)
        w.add_add_bos_token(False)
    w.add_block_count(LAYERS)
    w.add_context_length(256)
    w.add_embedding_length(HIDDEN)
    w.add_feed_forward_length(INTER)
    w.add_head_count(HEADS)
    w.add_head_count_kv(KV_HEADS)
    w.add_rope_freq_base(500000.0)
    w.add_layer_norm_rms_eps(1e-6)
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    if arch == "gemma3":  # no chat template in the file (as in the real one): Gemma's own is supplied
        w.add_sliding_window(3)
        w.add_key_length(HEAD_DIM)
        w.add_value_length(HEAD_DIM)
    else:
        w.add_chat_template("{{ messages }}")
    expected = {}

    def add(name, hf_name, shape, qtype=Q.F32, heads=None):
        x = rng.standard_normal(shape).astype(np.float32)
        stored = _llama_cpp_permute(x, heads) if heads and arch == "llama" else x
        if qtype == Q.F32 and arch == "gemma3" and name.endswith("norm.weight"):
            stored = x + np.float32(1)  # convert_hf_to_gguf.py stores Gemma's 1 + w; HF (and we) read w back
            w.add_tensor(name, stored)
            expected[hf_name] = stored - np.float32(1)
        elif qtype == Q.F32:
            w.add_tensor(name, stored)
            expected[hf_name] = x
        else:  # blocks run along rows, so quantizing commutes with the row permutation
            w.add_tensor(name, gguf.quants.quantize(stored, qtype), raw_dtype=qtype)
            expected[hf_name] = gguf.quants.dequantize(gguf.quants.quantize(x, qtype), qtype)

    add("token_embd.weight", "model.embed_tokens.weight", (len(tokens), HIDDEN), Q.Q8_0 if quant != Q.F32 else Q.F32)
    for i in range(LAYERS):
        p, h = f"blk.{i}.", f"model.layers.{i}."
        add(p + "attn_norm.weight", h + "input_layernorm.weight", (HIDDEN,))
        add(p + "attn_q.weight", h + "self_attn.q_proj.weight", (HEADS * HEAD_DIM, HIDDEN), quant, HEADS)
        add(p + "attn_k.weight", h + "self_attn.k_proj.weight", (KV_HEADS * HEAD_DIM, HIDDEN), quant, KV_HEADS)
        add(p + "attn_v.weight", h + "self_attn.v_proj.weight", (KV_HEADS * HEAD_DIM, HIDDEN), quant)
        if bias:
            add(p + "attn_q.bias", h + "self_attn.q_proj.bias", (HEADS * HEAD_DIM,), Q.F32, HEADS)
            add(p + "attn_k.bias", h + "self_attn.k_proj.bias", (KV_HEADS * HEAD_DIM,), Q.F32, KV_HEADS)
            add(p + "attn_v.bias", h + "self_attn.v_proj.bias", (KV_HEADS * HEAD_DIM,))
        add(p + "attn_output.weight", h + "self_attn.o_proj.weight", (HIDDEN, HEADS * HEAD_DIM), quant)
        if arch == "gemma3":
            add(p + "attn_q_norm.weight", h + "self_attn.q_norm.weight", (HEAD_DIM,))
            add(p + "attn_k_norm.weight", h + "self_attn.k_norm.weight", (HEAD_DIM,))
            add(p + "post_attention_norm.weight", h + "post_attention_layernorm.weight", (HIDDEN,))
            add(p + "ffn_norm.weight", h + "pre_feedforward_layernorm.weight", (HIDDEN,))
            add(p + "post_ffw_norm.weight", h + "post_feedforward_layernorm.weight", (HIDDEN,))
        else:
            add(p + "ffn_norm.weight", h + "post_attention_layernorm.weight", (HIDDEN,))
        add(p + "ffn_gate.weight", h + "mlp.gate_proj.weight", (INTER, HIDDEN), quant)
        add(p + "ffn_up.weight", h + "mlp.up_proj.weight", (INTER, HIDDEN), quant)
        add(p + "ffn_down.weight", h + "mlp.down_proj.weight", (HIDDEN, INTER), quant)
    add("output_norm.weight", "model.norm.weight", (HIDDEN,))
    if not tied:
        add("output.weight", "lm_head.weight", (len(tokens), HIDDEN), quant)
    if rope_freqs is not None:
        w.add_tensor("rope_freqs.weight", rope_freqs.astype(np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return expected


def _check_tensors(tensors, expected):
    got = dict(tensors)
    assert set(got) == set(expected)
    for name, tensor in got.items():
        assert tensor.dtype == torch.float32 and tensor.is_contiguous(), name
        np.testing.assert_array_equal(tensor.numpy(), expected[name], err_msg=name)


# ------------------------------------------------------------------------------- fast tests


def test_llama_undoes_the_qk_permutation(tmp_path):
    expected = write_gguf(tmp_path / "tiny.gguf")
    checkpoint, tensors = read_gguf(tmp_path / "tiny.gguf")
    _check_tensors(tensors, expected)
    c = checkpoint.config
    assert c["architectures"] == ["LlamaForCausalLM"] and c["model_type"] == "llama"
    assert (c["hidden_size"], c["num_attention_heads"], c["num_key_value_heads"], c["head_dim"]) == (64, 4, 2, 16)
    assert (c["intermediate_size"], c["num_hidden_layers"], c["vocab_size"]) == (INTER, LAYERS, 267)
    assert (c["rms_norm_eps"], c["rope_theta"], c["rope_scaling"]) == (1e-6, 500000.0, None)
    assert c["tie_word_embeddings"] and not c["attention_bias"]
    assert (c["bos_token_id"], c["eos_token_id"], c["max_position_embeddings"]) == (1, 2, 256)
    assert set(checkpoint.gguf_quant.values()) == {"F32"}


def test_quantized_tensors_are_dequantized_by_gguf(tmp_path):
    expected = write_gguf(tmp_path / "q.gguf", quant=Q.Q4_1)
    checkpoint, tensors = read_gguf(tmp_path / "q.gguf")
    _check_tensors(tensors, expected)
    assert checkpoint.gguf_quant["model.embed_tokens.weight"] == "Q8_0"
    assert checkpoint.gguf_quant["model.layers.1.self_attn.k_proj.weight"] == "Q4_1"
    assert checkpoint.gguf_quant["model.norm.weight"] == "F32"


def test_qwen2_keeps_its_layout_and_biases(tmp_path):
    expected = write_gguf(tmp_path / "qwen.gguf", arch="qwen2", bias=True, tied=False, quant=Q.Q8_0, pre="qwen2")
    checkpoint, tensors = read_gguf(tmp_path / "qwen.gguf")
    _check_tensors(tensors, expected)
    c = checkpoint.config
    assert c["architectures"] == ["Qwen2ForCausalLM"] and c["model_type"] == "qwen2"
    assert c["attention_bias"] and not c["tie_word_embeddings"]
    assert checkpoint.gguf_quant["lm_head.weight"] == "Q8_0"


def test_gemma3_norms_layers_and_chat_template(tmp_path):
    expected = write_gguf(tmp_path / "g3.gguf", arch="gemma3", spm=True, quant=Q.Q8_0)
    checkpoint, tensors = read_gguf(tmp_path / "g3.gguf")
    _check_tensors(tensors, expected)  # the norms as HF's w (file: 1 + w), q/k norms, no permutation
    c = checkpoint.config
    assert c["architectures"] == ["Gemma3ForCausalLM"] and c["model_type"] == "gemma3_text"
    assert c["layer_types"] == ["sliding_attention", "sliding_attention"] and c["sliding_window"] == 3
    assert c["rope_parameters"]["full_attention"]["rope_theta"] == 500000.0
    assert c["rope_parameters"]["sliding_attention"]["rope_theta"] == 10000.0
    assert c["query_pre_attn_scalar"] == HEAD_DIM and c["final_logit_softcapping"] is None
    import transformers  # the config is one transformers accepts as it is

    hf = transformers.Gemma3TextConfig(**c)
    assert hf.layer_types == c["layer_types"] and hf.rope_parameters["sliding_attention"]["rope_theta"] == 10000.0
    tc = checkpoint.tokenizer_config
    from edgectl.runtime.tokenizer import Tokenizer as Tok

    tok = Tok(checkpoint.tokenizer_json, tc, None, ())
    text = tok.apply_chat_template([{"role": "system", "content": "Be brief."}, {"role": "user", "content": " hello "},
                                    {"role": "assistant", "content": "world"}, {"role": "user", "content": "!"}])
    assert text == ("<s><start_of_turn>user\nBe brief.\n\nhello<end_of_turn>\n<start_of_turn>model\nworld<end_of_turn>\n"
                    "<start_of_turn>user\n!<end_of_turn>\n<start_of_turn>model\n")


def test_llama_with_biases_unpermutes_them_too(tmp_path):
    expected = write_gguf(tmp_path / "b.gguf", bias=True)
    # HF Llama with attention_bias also has an o_proj bias; the file has none, so it reads as zeros
    expected.update({f"model.layers.{i}.self_attn.o_proj.bias": np.zeros(HIDDEN, np.float32) for i in range(LAYERS)})
    checkpoint, tensors = read_gguf(tmp_path / "b.gguf")
    _check_tensors(tensors, expected)
    assert checkpoint.config["attention_bias"]


def test_llama3_rope_freqs_become_rope_scaling(tmp_path):
    # what convert_hf_to_gguf.py writes for Llama 3.2 (factor 32, low 1, high 4, original context 8192)
    freqs = 1.0 / 500000.0 ** (np.arange(0, HEAD_DIM, 2) / HEAD_DIM)
    factors = []
    for freq in freqs:
        wavelen = 2 * np.pi / freq
        smooth = (8192 / wavelen - 1) / (4 - 1)
        factors.append(1.0 if wavelen < 2048 else 32.0 if wavelen > 8192 else 1 / ((1 - smooth) / 32 + smooth))
    assert any(1 < f < 32 for f in factors)  # the smooth band is what pins the original context
    write_gguf(tmp_path / "l3.gguf", rope_freqs=np.array(factors))
    checkpoint, tensors = read_gguf(tmp_path / "l3.gguf")
    assert checkpoint.config["rope_scaling"] == {
        "rope_type": "llama3",
        "factor": 32.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
    }
    assert "rope_freqs.weight" not in dict(tensors)


def test_byte_level_tokenizer(tmp_path):
    write_gguf(tmp_path / "t.gguf")
    checkpoint, _ = read_gguf(tmp_path / "t.gguf")
    tok = Tokenizer.from_str(checkpoint.tokenizer_json)
    enc = tok.encode("<|im_start|>the world 42<|im_end|>")
    assert enc.tokens == ["<|im_start|>", "t", "he", "Ġworld", "Ġ", "4", "2", "<|im_end|>"]
    assert tok.decode(enc.ids, skip_special_tokens=False) == "<|im_start|>the world 42<|im_end|>"
    added = {t["content"]: t["special"] for t in json.loads(checkpoint.tokenizer_json)["added_tokens"]}
    assert added == dict.fromkeys(SPECIALS, True)
    cfg = checkpoint.tokenizer_config
    assert (cfg["bos_token"], cfg["eos_token"], cfg["add_bos_token"]) == ("<|im_start|>", "<|im_end|>", False)
    assert cfg["chat_template"] == "{{ messages }}"


def test_sentencepiece_tokenizer_matches_transformers(tmp_path):
    from transformers import AutoTokenizer

    write_gguf(tmp_path / "spm.gguf", spm=True)
    checkpoint, _ = read_gguf(tmp_path / "spm.gguf")
    tok = Tokenizer.from_str(checkpoint.tokenizer_json)
    reference = AutoTokenizer.from_pretrained(str(tmp_path), gguf_file="spm.gguf")
    for text in ["hello world!", "hello  world\nhello", " hello", "héllo wörld 🤗", "<s>hello</s> world"]:
        ids = tok.encode(text).ids
        assert ids == reference.encode(text), text
        assert ids[0] == 1  # add_bos_token defaults to true for sentencepiece vocabularies, as in llama.cpp
        assert tok.decode(ids) == reference.decode(ids, skip_special_tokens=True)
    assert tok.decode(tok.encode("héllo wörld 🤗").ids) == "héllo wörld 🤗"  # through the byte-fallback tokens
    assert tok.encode("hello world").tokens == ["<s>", "▁hello", "▁world"]


def test_unsupported_architecture(tmp_path):
    write_gguf(tmp_path / "g.gguf", arch="gemma2")
    with pytest.raises(EdgectlError, match=r"'gemma2' is not supported \(supported: gemma3, llama, qwen2\)"):
        read_gguf(tmp_path / "g.gguf")


@pytest.mark.parametrize("damage", ["half", "one byte short", "garbage", "empty", "bad magic", "flipped header"])
def test_corrupt_file_is_an_edgectl_error(tmp_path, damage):
    good = tmp_path / "good.gguf"
    write_gguf(good, quant=Q.Q4_1)
    data = good.read_bytes()
    bad = {
        "half": data[: len(data) // 2],
        "one byte short": data[:-1],
        "garbage": np.random.default_rng(1).bytes(4096),
        "empty": b"",
        "bad magic": b"GGUX" + data[4:],
        "flipped header": data[:8] + bytes([255]) * 16 + data[24:],  # absurd tensor and key counts
    }[damage]
    path = tmp_path / "bad.gguf"
    path.write_bytes(bad)
    with pytest.raises(EdgectlError, match="not a valid GGUF file"):
        list(read_gguf(path)[1])


def test_missing_file(tmp_path):
    with pytest.raises(EdgectlError, match="no such file"):
        read_gguf(tmp_path / "nope.gguf")


# ------------------------------------------------------------------------ the real Q4_1 model


# `smol_gguf` (tests/conftest.py) skips these when the file is in neither ../shared/models nor the cache
@pytest.fixture(scope="module")
def ours(smol_gguf):
    checkpoint, tensors = read_gguf(smol_gguf)
    return checkpoint, dict(tensors)


@pytest.fixture(scope="module")
def theirs(ours, smol_gguf):
    """transformers' own GGUF loading (what `from_pretrained(gguf_file=...)` calls), done once."""
    from transformers import LlamaConfig, LlamaForCausalLM
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    with torch.device("meta"):  # only used to map GGUF names to HF names
        names = LlamaForCausalLM(LlamaConfig(**ours[0].config))
    return load_gguf_checkpoint(str(smol_gguf), return_tensors=True, model_to_load=names)


@pytest.mark.real_model
def test_real_tensors_equal_transformers(ours, theirs):
    mine, reference = ours[1], theirs["tensors"]
    assert set(mine) == set(reference) and len(mine) == 272
    for name, tensor in reference.items():
        assert mine[name].shape == tensor.shape, name
        assert (mine[name] - tensor.float()).abs().max().item() <= 1e-6, name


@pytest.mark.real_model
def test_real_config_and_quant_types(ours, theirs):
    config, quant = ours[0].config, ours[0].gguf_quant
    for key, value in theirs["config"].items():
        if key in config and key != "rms_norm_eps":
            assert config[key] == value, key
    assert config["rms_norm_eps"] == 1e-5 and config["rope_theta"] == 100000.0
    assert (config["vocab_size"], config["num_hidden_layers"], config["tie_word_embeddings"]) == (49152, 30, True)
    assert quant["model.embed_tokens.weight"] == "Q8_0"
    assert {v for k, v in quant.items() if k.endswith("proj.weight")} == {"Q4_1"}
    assert {v for k, v in quant.items() if "norm" in k} == {"F32"}


@pytest.mark.real_model
def test_real_model_answers_from_our_config_and_weights(ours):
    from transformers import LlamaConfig, LlamaForCausalLM
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    checkpoint, tensors = ours
    with torch.device("meta"):
        model = LlamaForCausalLM(LlamaConfig(**checkpoint.config))
    model.load_state_dict(tensors, assign=True, strict=False)
    model.tie_weights()
    model.model.rotary_emb = LlamaRotaryEmbedding(model.config)  # its buffers were built on meta
    tok = Tokenizer.from_str(checkpoint.tokenizer_json)
    prompt = "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n"
    ids = torch.tensor([tok.encode(prompt).ids])
    out = model.eval().generate(ids, max_new_tokens=8, do_sample=False)
    assert tok.decode(out[0, ids.shape[1] :].tolist()).startswith("The capital of France is Paris")


TEXTS = [
    "Hello world! The quick brown fox jumps over the lazy dog.",
    "def fib(n):\n    return n if n < 2 else fib(n - 1) + fib(n - 2)  # 1234567",
    "Ünïcödé: naïve café, 東京, emoji 🤗🚀, Ελληνικά, русский.",
    "<|im_start|>system\nYou are SmolLM.<|im_end|>\n<|im_start|>user\n  spaces\ttabs\n\n<|im_end|>",
]


@pytest.mark.real_model
def test_real_tokenizer_matches_transformers(ours, smol_gguf):
    from transformers import AutoTokenizer

    reference = AutoTokenizer.from_pretrained(str(smol_gguf.parent), gguf_file=smol_gguf.name)
    checkpoint = ours[0]
    tok = Tokenizer.from_str(checkpoint.tokenizer_json)
    for text in TEXTS:
        ids = tok.encode(text).ids
        assert ids == reference.encode(text), text
        assert tok.decode(ids, skip_special_tokens=False) == text
    assert tok.encode("<|im_start|>").ids == [1] and tok.encode("<|im_end|>").ids == [2]
    cfg = checkpoint.tokenizer_config
    assert (cfg["bos_token"], cfg["eos_token"]) == (reference.bos_token, reference.eos_token)
    assert cfg["chat_template"] == reference.chat_template and cfg["add_bos_token"] is False


@pytest.mark.real_model
def test_real_file_truncated_to_half(tmp_path, smol_gguf):
    path = tmp_path / "half.gguf"
    with open(smol_gguf, "rb") as src:
        path.write_bytes(src.read(smol_gguf.stat().st_size // 2))
    with pytest.raises(EdgectlError, match=r"half\.gguf: not a valid GGUF file \(truncated"):
        read_gguf(path)
