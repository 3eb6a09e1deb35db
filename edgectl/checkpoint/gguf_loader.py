"""Read a GGUF checkpoint as a Hugging Face config, a `tokenizers` tokenizer and fp32 tensors.

    checkpoint, tensors = read_gguf("model.gguf")
    for name, tensor in tensors:        # HF names, fp32, one tensor alive at a time
        ...

Weights are dequantized with the `gguf` package's own `gguf.quants.dequantize`. llama.cpp's
converter interleaves the rows of the Q and K projections of llama-arch models (HF's rotate_half
layout -> GGML's pairwise rotary layout); that is undone here, so every tensor equals what
transformers' own GGUF loader produces. `GGUFCheckpoint.gguf_quant` records how each tensor was
stored (F32, Q8_0, Q4_1, ...), so a later stage can reproduce the original quantization grid.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np
import torch
from gguf import GGMLQuantizationType, GGUFReader
from edgectl.checkpoint.architectures import GGUF_ARCHITECTURES
from edgectl.checkpoint.gguf_tokenizer import END_OF_TURN, GEMMA_CHAT_TEMPLATE, gguf_tokenizer
from edgectl.util.errors import EdgectlError

@dataclass
class GGUFCheckpoint:
    config: dict  # Hugging Face config.json dict
    tokenizer_json: str  # Hugging Face tokenizer.json string
    tokenizer_config: dict  # Hugging Face tokenizer_config.json-like dict
    gguf_quant: dict  # HF tensor name -> GGUF storage type name ("F32", "Q8_0", "Q4_1", ...)


@dataclass(frozen=True)
class _Arch:
    hf_class: str
    model_type: str
    permute_qk: bool  # llama.cpp interleaved the Q/K rows for its rotary layout
    attention_bias: bool | None  # None: whether the file has q/k/v biases
    extra: dict
    gemma: bool = False  # Gemma 3's norms (stored as 1 + w), q/k norms, sliding layers (_gemma3_config)


ARCHITECTURES = {
    "llama": _Arch("LlamaForCausalLM", "llama", True, None, {"mlp_bias": False, "pretraining_tp": 1}),
    "qwen2": _Arch("Qwen2ForCausalLM", "qwen2", False, True, {"use_sliding_window": False}),
    "gemma3": _Arch("Gemma3ForCausalLM", "gemma3_text", False, False,
                    {"hidden_act": "gelu_pytorch_tanh", "hidden_activation": "gelu_pytorch_tanh"}, gemma=True),
}

_GLOBAL_TENSORS = {
    "token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}  # fmt: skip
_BLOCK_TENSORS = {  # blk.{i}.<key>.{weight,bias} -> model.layers.{i}.<value>.{weight,bias}
    "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}  # fmt: skip
_GEMMA_BLOCK_TENSORS = {  # Gemma 3: ffn_norm is the MLP's input norm, and four more
    **_BLOCK_TENSORS, "ffn_norm": "pre_feedforward_layernorm", "post_attention_norm": "post_attention_layernorm",
    "post_ffw_norm": "post_feedforward_layernorm", "attn_q_norm": "self_attn.q_norm", "attn_k_norm": "self_attn.k_norm",
}  # fmt: skip
_CONFIG_DEFAULTS = {"attention_dropout": 0.0, "hidden_act": "silu", "initializer_range": 0.02, "use_cache": True}
_CONFIG_DEFAULTS["torch_dtype"] = "float32"  # what the iterator yields
_ROPE_FREQS = "rope_freqs.weight"  # llama3 rope scaling, folded into config["rope_scaling"]


def read_gguf(path) -> tuple[GGUFCheckpoint, Iterator[tuple[str, torch.Tensor]]]:
    """Parse a GGUF file. Returns its metadata and a lazy iterator over (HF name, fp32 tensor)."""
    path = Path(path)
    reader, meta = _open(path)
    arch_name = meta.get("general.architecture")
    if arch_name not in ARCHITECTURES:
        supported = ", ".join(sorted(ARCHITECTURES))
        raise EdgectlError(f"{path}: GGUF architecture {arch_name!r} is not supported (supported: {supported})")
    assert set(ARCHITECTURES) == set(GGUF_ARCHITECTURES), "architectures.GGUF_ARCHITECTURES is the early check's list"
    arch = ARCHITECTURES[arch_name]
    tensors = {t.name: t for t in reader.tensors}
    config = _config(meta, arch_name, arch, tensors, path)
    plan = _tensor_plan(tensors, config, arch, path)
    tokenizer_json, tokenizer_config = gguf_tokenizer(meta, path)
    if arch.gemma:
        tokenizer_config["chat_template"] = tokenizer_config["chat_template"] or GEMMA_CHAT_TEMPLATE
        if END_OF_TURN in meta["tokenizer.ggml.tokens"]:  # as llama.cpp: a turn's end ends generation
            turn_end = meta["tokenizer.ggml.tokens"].index(END_OF_TURN)
            config["eos_token_id"] = [i for i in (config["eos_token_id"], turn_end) if i is not None]
    quant = {hf: tensors[name].tensor_type.name for name, hf, _ in plan if name is not None}
    tensor_iter = _iter_tensors(path, tensors, plan, config if arch.permute_qk else None, arch.gemma)
    return GGUFCheckpoint(config, tokenizer_json, tokenizer_config, quant), tensor_iter


def _open(path: Path) -> tuple[GGUFReader, dict]:
    if not path.is_file():
        raise EdgectlError(f"{path}: no such file")
    try:
        reader = GGUFReader(path)
        return reader, {name: field.contents() for name, field in reader.fields.items()}
    except Exception as exc:  # a reader of an untrusted binary fails in many ways; all mean the same
        raise _invalid(path, exc) from exc


def _invalid(path: Path, exc: BaseException) -> EdgectlError:
    reason = str(exc) or type(exc).__name__
    if "cannot reshape" in reason or "cannot mmap an empty file" in reason:
        reason = f"truncated: tensor data runs past the end of the file; {reason}"
    hint = "Download it again; scripts/fetch_models.py checks the default model's sha256."
    return EdgectlError(f"{path}: not a valid GGUF file ({reason})", hint=hint)


def _config(meta: dict, arch_name: str, arch: _Arch, tensors: dict, path: Path) -> dict:
    def key(suffix, default=KeyError):
        value = meta.get(f"{arch_name}.{suffix}", default)
        if value is KeyError:
            raise EdgectlError(f"{path}: GGUF metadata lacks {arch_name}.{suffix}")
        return value

    hidden, heads = int(key("embedding_length")), int(key("attention.head_count"))
    head_dim = key("attention.key_length", None) or key("rope.dimension_count", None) or hidden // heads
    vocab = key("vocab_size", None) or len(meta.get("tokenizer.ggml.tokens") or ())
    bias = arch.attention_bias if arch.attention_bias is not None else "blk.0.attn_q.bias" in tensors
    rope_theta = _f32(key("rope.freq_base", 10000.0))
    config = {
        "architectures": [arch.hf_class],
        "model_type": arch.model_type,
        "hidden_size": hidden,
        "intermediate_size": int(key("feed_forward_length")),
        "num_hidden_layers": int(key("block_count")),
        "num_attention_heads": heads,
        "num_key_value_heads": int(key("attention.head_count_kv", heads)),
        "head_dim": int(head_dim),
        "vocab_size": int(vocab),
        "rms_norm_eps": _f32(key("attention.layer_norm_rms_epsilon")),
        "rope_theta": rope_theta,
        "rope_scaling": _rope_scaling(meta, arch_name, tensors.get(_ROPE_FREQS), rope_theta, int(head_dim), path),
        "max_position_embeddings": int(key("context_length", 2048)),
        "tie_word_embeddings": "output.weight" not in tensors,
        "bos_token_id": meta.get("tokenizer.ggml.bos_token_id"),
        "eos_token_id": meta.get("tokenizer.ggml.eos_token_id"),
        "attention_bias": bool(bias),
        **_CONFIG_DEFAULTS,
        **arch.extra,
    }
    if meta.get("tokenizer.ggml.padding_token_id") is not None:
        config["pad_token_id"] = meta["tokenizer.ggml.padding_token_id"]
    if arch.gemma:
        config.update(_gemma3_config(key, config))
    return config


def _gemma3_config(key, config: dict) -> dict:
    """Gemma 3's settings: those the file does not store are llama.cpp's, which fixes them
    for the architecture (src/llama-model.cpp): every 6th layer global, the sliding layers'
    RoPE base 10000, scores scaled by 1/sqrt(head_dim) (27B: 1/sqrt(hidden/heads))."""
    n, hidden, heads = config["num_hidden_layers"], config["hidden_size"], config["num_attention_heads"]
    scaling = config.pop("rope_scaling")
    out = {
        "sliding_window": int(key("attention.sliding_window")),
        "layer_types": ["sliding_attention" if (i + 1) % 6 else "full_attention" for i in range(n)],
        "rope_parameters": {
            "full_attention": {"rope_type": "default", **(scaling or {}), "rope_theta": config.pop("rope_theta")},
            "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
        },
        "query_pre_attn_scalar": hidden // heads if n == 62 else config["head_dim"],
        "final_logit_softcapping": key("final_logit_softcapping", None),
        "attn_logit_softcapping": key("attn_logit_softcapping", None),
    }
    if scaling is not None and scaling["rope_type"] != "linear":
        raise EdgectlError(f"GGUF gemma3 with {scaling['rope_type']!r} RoPE scaling is not supported", hint="supported: linear")
    return out


def _f32(value) -> float:
    """GGUF stores these as float32: write 1e-05, not 9.999999747378752e-06 (the same float32)."""
    return float(str(np.float32(value)))


def _rope_scaling(meta, arch_name, rope_freqs, theta, head_dim, path) -> dict | None:
    kind = meta.get(f"{arch_name}.rope.scaling.type", "none")
    factor = meta.get(f"{arch_name}.rope.scaling.factor")
    if kind == "linear" and factor:
        return {"rope_type": "linear", "factor": float(factor)}
    if kind == "yarn" and factor:
        original = meta.get(f"{arch_name}.rope.scaling.original_context_length")
        return {"rope_type": "yarn", "factor": float(factor), "original_max_position_embeddings": original}
    if kind not in ("none", "linear", "yarn"):
        raise EdgectlError(f"{path}: unsupported rope scaling type {kind!r}")
    return None if rope_freqs is None else _llama3_scaling(rope_freqs, theta, head_dim, path)


def _llama3_scaling(rope_freqs, theta: float, head_dim: int, path: Path) -> dict:
    """HF's llama3 rope_scaling from the per-frequency divisors llama.cpp stores instead. Llama 3.x uses
    low/high_freq_factor 1 and 4; factor and original context come out of the tensor, then get checked."""
    stored = np.asarray(gguf.quants.dequantize(rope_freqs.data, rope_freqs.tensor_type), np.float64).ravel()
    inv_freq = 1.0 / theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    wavelen = 2 * np.pi / inv_freq
    factor, low, high = float(stored.max()), 1.0, 4.0
    between = (stored > 1 + 1e-4) & (stored < factor - 1e-4)
    original = 8192
    if factor > 1 and between.any():
        smooth = (1 / stored[between] - 1 / factor) / (1 - 1 / factor)
        original = int(round(float(np.median((smooth * (high - low) + low) * wavelen[between]))))
    scaling = {"rope_type": "llama3", "factor": factor, "low_freq_factor": low, "high_freq_factor": high}
    scaling["original_max_position_embeddings"] = original
    smooth = np.clip((original / wavelen - low) / (high - low), 0.0, 1.0)
    expected = 1 / ((1 - smooth) / factor + smooth)
    if stored.shape != expected.shape or not np.allclose(stored, expected, rtol=1e-3):
        raise EdgectlError(f"{path}: {_ROPE_FREQS} does not match any llama3 rope scaling")
    return scaling


def _hf_name(name: str, arch: _Arch) -> str | None:
    if name in _GLOBAL_TENSORS:
        return _GLOBAL_TENSORS[name]
    block = _GEMMA_BLOCK_TENSORS if arch.gemma else _BLOCK_TENSORS
    match = re.fullmatch(r"blk\.(\d+)\.(\w+)\.(weight|bias)", name)
    if match and match[2] in block:
        return f"model.layers.{match[1]}.{block[match[2]]}.{match[3]}"
    return None


def _hf_shapes(c: dict, arch: _Arch) -> dict[str, tuple[int, ...]]:
    """Every parameter of the HF model this config describes, with its shape."""
    hidden, inter, vocab = c["hidden_size"], c["intermediate_size"], c["vocab_size"]
    q, kv = c["num_attention_heads"] * c["head_dim"], c["num_key_value_heads"] * c["head_dim"]
    shapes = {"model.embed_tokens.weight": (vocab, hidden), "model.norm.weight": (hidden,)}
    if not c["tie_word_embeddings"]:
        shapes["lm_head.weight"] = (vocab, hidden)
    layer = {
        "input_layernorm.weight": (hidden,), "post_attention_layernorm.weight": (hidden,),
        "self_attn.q_proj.weight": (q, hidden), "self_attn.k_proj.weight": (kv, hidden),
        "self_attn.v_proj.weight": (kv, hidden), "self_attn.o_proj.weight": (hidden, q),
        "mlp.gate_proj.weight": (inter, hidden), "mlp.up_proj.weight": (inter, hidden),
        "mlp.down_proj.weight": (hidden, inter),
    }  # fmt: skip
    if arch.gemma:
        layer.update({"pre_feedforward_layernorm.weight": (hidden,), "post_feedforward_layernorm.weight": (hidden,),
                      "self_attn.q_norm.weight": (c["head_dim"],), "self_attn.k_norm.weight": (c["head_dim"],)})
    if c["attention_bias"]:  # HF Llama then has an o_proj bias too; Qwen2 never does
        layer.update({"self_attn.q_proj.bias": (q,), "self_attn.k_proj.bias": (kv,), "self_attn.v_proj.bias": (kv,)})
        if arch.attention_bias is None:
            layer["self_attn.o_proj.bias"] = (hidden,)
    for i in range(c["num_hidden_layers"]):
        shapes.update({f"model.layers.{i}.{name}": shape for name, shape in layer.items()})
    return shapes


def _tensor_plan(tensors: dict, config: dict, arch: _Arch, path: Path) -> list[tuple[str | None, str, tuple]]:
    """(GGUF name, HF name, HF shape) for every HF parameter, checked against the config. A GGUF name
    of None means zeros: HF Llama's o_proj bias, for a file with q/k/v biases and no output bias."""
    wanted = _hf_shapes(config, arch)
    plan, unknown, checked_types = [], [], set()
    for name, tensor in tensors.items():
        hf = _hf_name(name, arch)
        if hf not in wanted:
            unknown += [] if name == _ROPE_FREQS else [name]
            continue
        shape = tuple(int(n) for n in reversed(tensor.shape))  # GGUF lists dimensions fastest-first
        if shape != wanted[hf]:
            raise EdgectlError(f"{path}: tensor {name} has shape {shape}; its metadata implies {wanted[hf]}")
        if tensor.tensor_type not in checked_types:
            _dequantize(tensor.data[:1], tensor.tensor_type, name, path)  # fail now, not mid-load
            checked_types.add(tensor.tensor_type)
        plan.append((name, hf, shape))
    missing = sorted(set(wanted) - {hf for _, hf, _ in plan})
    plan += [(None, hf, wanted[hf]) for hf in missing if hf.endswith("o_proj.bias")]
    missing = [hf for hf in missing if not hf.endswith("o_proj.bias")]
    for problem, names in (("unexpected tensors", unknown), ("no tensors for", missing)):
        if names:
            raise EdgectlError(f"{path}: {problem} {', '.join(names[:4])}" + (" ..." if len(names) > 4 else ""))
    return plan


def _dequantize(data: np.ndarray, qtype: GGMLQuantizationType, name: str, path: Path) -> np.ndarray:
    try:
        return gguf.quants.dequantize(data, qtype)
    except NotImplementedError as exc:
        raise EdgectlError(f"{path}: tensor {name} is stored as {qtype.name}, which gguf cannot dequantize") from exc
    except (ValueError, OSError) as exc:
        raise _invalid(path, exc) from exc


def _unpermute(w: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's `permute` (convert_hf_to_gguf.py): GGML rotary pairs -> HF rotate_half halves."""
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _iter_tensors(path, tensors, plan, permute_config, norm_minus_one=False) -> Iterator[tuple[str, torch.Tensor]]:
    for name, hf, shape in plan:
        if name is None:
            yield hf, torch.zeros(shape)
            continue
        array = _dequantize(tensors[name].data, tensors[name].tensor_type, name, path).reshape(shape)
        if permute_config is not None and hf.split(".")[-2] in ("q_proj", "k_proj"):
            heads = permute_config["num_attention_heads" if "q_proj" in hf else "num_key_value_heads"]
            array = _unpermute(array, heads)
        if norm_minus_one and hf.endswith("norm.weight"):  # llama.cpp stored Gemma's 1 + w; HF's w, as transformers'
            array = array - np.float32(1)
        if not array.flags.writeable:  # a view of the read-only memory map (F32 tensors)
            array = array.copy()
        yield hf, torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32))
