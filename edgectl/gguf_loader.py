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

import logging
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np
import torch
from gguf import GGMLQuantizationType, GGUFReader
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

from edgectl.errors import EdgectlError

logger = logging.getLogger(__name__)


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


ARCHITECTURES = {
    "llama": _Arch("LlamaForCausalLM", "llama", True, None, {"mlp_bias": False, "pretraining_tp": 1}),
    "qwen2": _Arch("Qwen2ForCausalLM", "qwen2", False, True, {"use_sliding_window": False}),
}

_GLOBAL_TENSORS = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_BLOCK_TENSORS = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_ROPE_FREQS = "rope_freqs.weight"  # llama3 rope scaling, folded into config["rope_scaling"]


def read_gguf(path) -> tuple[GGUFCheckpoint, Iterator[tuple[str, torch.Tensor]]]:
    """Parse a GGUF file. Returns its metadata and a lazy iterator over (HF name, fp32 tensor)."""
    path = Path(path)
    reader = _open(path)
    meta = _metadata(reader, path)
    arch_name = meta.get("general.architecture")
    if arch_name not in ARCHITECTURES:
        supported = ", ".join(sorted(ARCHITECTURES))
        raise EdgectlError(f"{path}: GGUF architecture {arch_name!r} is not supported (supported: {supported})")
    arch = ARCHITECTURES[arch_name]
    tensors = {t.name: t for t in reader.tensors}
    config = _config(meta, arch_name, arch, tensors, path)
    plan = _tensor_plan(tensors, config, path)
    tokenizer_json, tokenizer_config = _tokenizer(meta, path)
    checkpoint = GGUFCheckpoint(
        config=config,
        tokenizer_json=tokenizer_json,
        tokenizer_config=tokenizer_config,
        gguf_quant={hf: tensors[name].tensor_type.name for name, hf, _ in plan},
    )
    return checkpoint, _iter_tensors(path, tensors, plan, config if arch.permute_qk else None)


# ---------------------------------------------------------------------------------------- file


def _open(path: Path) -> GGUFReader:
    if not path.is_file():
        raise EdgectlError(f"{path}: no such file")
    try:
        return GGUFReader(path)
    except Exception as exc:  # the reader of an untrusted binary fails in many ways; all mean the same
        raise _invalid(path, exc) from exc


def _invalid(path: Path, exc: BaseException) -> EdgectlError:
    reason = str(exc) or type(exc).__name__
    if "cannot reshape" in reason or "cannot mmap an empty file" in reason:
        reason = f"truncated: tensor data runs past the end of the file; {reason}"
    return EdgectlError(
        f"{path}: not a valid GGUF file ({reason})",
        hint="Download it again; scripts/fetch_models.py checks the default model's sha256.",
    )


def _metadata(reader: GGUFReader, path: Path) -> dict:
    try:
        return {name: field.contents() for name, field in reader.fields.items()}
    except Exception as exc:
        raise _invalid(path, exc) from exc


# -------------------------------------------------------------------------------------- config


def _config(meta: dict, arch_name: str, arch: _Arch, tensors: dict, path: Path) -> dict:
    def key(suffix, default=KeyError):
        value = meta.get(f"{arch_name}.{suffix}", default)
        if value is KeyError:
            raise EdgectlError(f"{path}: GGUF metadata lacks {arch_name}.{suffix}")
        return value

    hidden, heads = int(key("embedding_length")), int(key("attention.head_count"))
    head_dim = key("attention.key_length", None) or key("rope.dimension_count", None) or hidden // heads
    vocab = key("vocab_size", None) or len(meta.get("tokenizer.ggml.tokens") or ())
    if not vocab and "token_embd.weight" in tensors:
        vocab = int(tensors["token_embd.weight"].shape[-1])
    bias = arch.attention_bias
    if bias is None:
        bias = "blk.0.attn_q.bias" in tensors
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
        "attention_dropout": 0.0,
        "hidden_act": "silu",
        "initializer_range": 0.02,
        "use_cache": True,
        "torch_dtype": "float32",
        **arch.extra,
    }
    if meta.get("tokenizer.ggml.padding_token_id") is not None:
        config["pad_token_id"] = meta["tokenizer.ggml.padding_token_id"]
    return config


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
    """Recover HF's llama3 rope_scaling from the per-frequency divisors llama.cpp stores instead.

    Llama 3.x ships low_freq_factor 1 and high_freq_factor 4; the factor and the original context
    come out of the tensor, and the result is checked by recomputing the whole tensor from it.
    """
    stored = np.asarray(gguf.quants.dequantize(rope_freqs.data, rope_freqs.tensor_type), np.float64).ravel()
    inv_freq = 1.0 / theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    wavelen = 2 * np.pi / inv_freq
    factor, low, high = float(stored.max()), 1.0, 4.0
    between = (stored > 1 + 1e-4) & (stored < factor - 1e-4)
    original = 8192
    if factor > 1 and between.any():
        smooth = (1 / stored[between] - 1 / factor) / (1 - 1 / factor)
        original = int(round(float(np.median((smooth * (high - low) + low) * wavelen[between]))))
    scaling = {
        "rope_type": "llama3",
        "factor": factor,
        "low_freq_factor": low,
        "high_freq_factor": high,
        "original_max_position_embeddings": original,
    }
    smooth = np.clip((original / wavelen - low) / (high - low), 0.0, 1.0)
    expected = 1 / ((1 - smooth) / factor + smooth)
    if stored.shape != expected.shape or not np.allclose(stored, expected, rtol=1e-3):
        raise EdgectlError(f"{path}: {_ROPE_FREQS} does not match any llama3 rope scaling")
    return scaling


# ------------------------------------------------------------------------------------- tensors


def _hf_name(name: str) -> str | None:
    if name in _GLOBAL_TENSORS:
        return _GLOBAL_TENSORS[name]
    match = re.fullmatch(r"blk\.(\d+)\.(\w+)\.(weight|bias)", name)
    if match and match[2] in _BLOCK_TENSORS:
        return f"model.layers.{match[1]}.{_BLOCK_TENSORS[match[2]]}.{match[3]}"
    return None


def _expected_shape(hf_name: str, c: dict) -> tuple[int, ...]:
    hidden, inter = c["hidden_size"], c["intermediate_size"]
    q, kv = c["num_attention_heads"] * c["head_dim"], c["num_key_value_heads"] * c["head_dim"]
    shapes = {
        "embed_tokens": (c["vocab_size"], hidden), "lm_head": (c["vocab_size"], hidden),
        "norm": (hidden,), "input_layernorm": (hidden,), "post_attention_layernorm": (hidden,),
        "q_proj": (q, hidden), "k_proj": (kv, hidden), "v_proj": (kv, hidden), "o_proj": (hidden, q),
        "gate_proj": (inter, hidden), "up_proj": (inter, hidden), "down_proj": (hidden, inter),
    }  # fmt: skip
    module, kind = hf_name.split(".")[-2:]
    shape = shapes[module]
    return shape[:1] if kind == "bias" else shape


def _tensor_plan(tensors: dict, config: dict, path: Path) -> list[tuple[str, str, tuple[int, ...]]]:
    """(GGUF name, HF name, HF shape) for every tensor to yield, checked against the config."""
    plan, unknown, checked_types = [], [], set()
    for name, tensor in tensors.items():
        hf = _hf_name(name)
        if hf is None:
            if name != _ROPE_FREQS:
                unknown.append(name)
            continue
        layer = re.match(r"model\.layers\.(\d+)\.", hf)
        shape = tuple(int(n) for n in reversed(tensor.shape))  # GGUF lists dimensions fastest-first
        if (layer and int(layer[1]) >= config["num_hidden_layers"]) or shape != _expected_shape(hf, config):
            raise EdgectlError(f"{path}: tensor {name} has shape {shape}, which the GGUF metadata does not explain")
        if tensor.tensor_type not in checked_types:
            _dequantize(tensor.data[:1], tensor.tensor_type, name, path)  # fail now, not mid-load
            checked_types.add(tensor.tensor_type)
        plan.append((name, hf, shape))
    if unknown:
        raise EdgectlError(f"{path}: unexpected tensors {', '.join(unknown[:5])}" + (" ..." if len(unknown) > 5 else ""))
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


def _iter_tensors(path, tensors, plan, permute_config) -> Iterator[tuple[str, torch.Tensor]]:
    for name, hf, shape in plan:
        array = _dequantize(tensors[name].data, tensors[name].tensor_type, name, path).reshape(shape)
        if permute_config is not None and hf.split(".")[-2] in ("q_proj", "k_proj"):
            heads = permute_config["num_attention_heads" if "q_proj" in hf else "num_key_value_heads"]
            array = _unpermute(array, heads)
        if not array.flags.writeable:  # a view of the read-only memory map (F32 tensors)
            array = array.copy()
        yield hf, torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32))


# ----------------------------------------------------------------------------------- tokenizer

_CONTROL, _UNKNOWN, _USER_DEFINED = 3, 2, 4  # tokenizer.ggml.token_type values
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)


def _gpt2_pre():
    return pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)


def _digits_then_gpt2_pre():  # StarCoder-style: every digit its own pre-token, as in SmolLM's tokenizer.json
    return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), _gpt2_pre()])


def _split_pre(pattern: str):
    def build():
        split = pre_tokenizers.Split(Regex(pattern), behavior="isolated")
        return pre_tokenizers.Sequence([split, pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])

    return build


# tokenizer.ggml.pre -> (pre-tokenizer factory, BPE ignore_merges, NFC normalizer), as llama.cpp reads them
_BPE_PRE = {
    "default": (_gpt2_pre, False, False),
    "gpt2": (_gpt2_pre, False, False),
    "smollm": (_digits_then_gpt2_pre, False, False),
    "starcoder": (_digits_then_gpt2_pre, False, False),
    "refact": (_digits_then_gpt2_pre, False, False),
    "llama-bpe": (_split_pre(_LLAMA3_SPLIT), True, False),
    "llama3": (_split_pre(_LLAMA3_SPLIT), True, False),
    "llama-v3": (_split_pre(_LLAMA3_SPLIT), True, False),
    "smaug-bpe": (_split_pre(_LLAMA3_SPLIT), True, False),
    "qwen2": (_split_pre(_QWEN2_SPLIT), False, True),
    "deepseek-r1-qwen": (_split_pre(_QWEN2_SPLIT), False, True),
}


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's printable spelling of the 256 byte values."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), 256))
    spelled, extra = {}, 0
    for byte in range(256):
        if byte in keep:
            spelled[byte] = chr(byte)
        else:
            spelled[byte], extra = chr(256 + extra), extra + 1
    return spelled


def _byte_level(meta: dict, tokens: list[str], types: list[int]) -> tuple[Tokenizer, list[AddedToken]]:
    spelling = _bytes_to_unicode()
    alphabet = set(spelling.values())
    vocab = {
        t if set(t) <= alphabet else "".join(spelling[b] for b in t.encode("utf-8")): i for i, t in enumerate(tokens)
    }
    pre = meta.get("tokenizer.ggml.pre", "default")
    if pre not in _BPE_PRE:
        logger.warning("GGUF pre-tokenizer %r is unknown; splitting text the GPT-2 way", pre)
    pre_factory, ignore_merges, nfc = _BPE_PRE.get(pre, _BPE_PRE["default"])
    merges = [tuple(m.split(" ", 1)) for m in meta.get("tokenizer.ggml.merges", ())]
    tok = Tokenizer(models.BPE(vocab, merges, ignore_merges=ignore_merges))
    tok.pre_tokenizer = pre_factory()
    tok.decoder = decoders.ByteLevel()
    if nfc:
        tok.normalizer = normalizers.NFC()
    # A control token spelled outside the byte alphabet is a llama.cpp mislabel; adding it would grow the vocab.
    added = [
        AddedToken(t, special=kind != _USER_DEFINED, normalized=False)
        for t, kind in zip(tokens, types)
        if (kind in (_CONTROL, _UNKNOWN) and set(t) <= alphabet) or (kind == _USER_DEFINED and t in vocab)
    ]
    return tok, added


def _sentencepiece(meta: dict, tokens: list[str], types: list[int]) -> tuple[Tokenizer, list[AddedToken]]:
    vocab = {t: i for i, t in enumerate(tokens)}
    if "tokenizer.ggml.merges" in meta:
        merges = [tuple(m.split(" ", 1)) for m in meta["tokenizer.ggml.merges"]]
    else:  # older files: every split of a token into two tokens, best-scored merged token first
        scores = meta.get("tokenizer.ggml.scores") or [0.0] * len(tokens)
        ranked = []
        for token, score in zip(tokens, scores):
            pairs = [(token[:i], token[i:]) for i in range(1, len(token)) if token[:i] in vocab and token[i:] in vocab]
            pairs.sort(key=lambda p: (vocab[p[0]], vocab[p[1]]))
            ranked += [(score, len(a), len(b), a, b) for a, b in pairs]
        ranked.sort(key=lambda r: r[:3], reverse=True)
        merges = [(a, b) for *_, a, b in ranked]
    unk_id = meta.get("tokenizer.ggml.unknown_token_id")
    unk = tokens[unk_id] if unk_id is not None else None
    tok = Tokenizer(models.BPE(vocab, merges, unk_token=unk, fuse_unk=True, byte_fallback=True))
    prefix = meta.get("tokenizer.ggml.add_space_prefix", True)
    tok.pre_tokenizer = pre_tokenizers.Metaspace("▁", prepend_scheme="first" if prefix else "never", split=False)
    steps = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    tok.decoder = decoders.Sequence(steps + ([decoders.Strip(" ", 1, 0)] if prefix else []))
    added = [
        AddedToken(t, special=kind != _USER_DEFINED, normalized=False)
        for t, kind in zip(tokens, types)
        if kind in (_CONTROL, _UNKNOWN, _USER_DEFINED)
    ]
    return tok, added


_TOKENIZER_MODELS = {"gpt2": (_byte_level, False), "llama": (_sentencepiece, True)}  # -> (builder, default add_bos)


def _tokenizer(meta: dict, path: Path) -> tuple[str, dict]:
    kind = meta.get("tokenizer.ggml.model")
    tokens = meta.get("tokenizer.ggml.tokens")
    if kind not in _TOKENIZER_MODELS or not tokens:
        raise EdgectlError(
            f"{path}: GGUF tokenizer {kind!r} is not supported",
            hint=f"Supported tokenizer.ggml.model values: {', '.join(sorted(_TOKENIZER_MODELS))}.",
        )
    builder, default_bos = _TOKENIZER_MODELS[kind]
    types = meta.get("tokenizer.ggml.token_type") or [1] * len(tokens)
    tok, added = builder(meta, tokens, types)
    tok.add_special_tokens([a for a in added if a.special])
    tok.add_tokens([a for a in added if not a.special])

    def token(key):
        index = meta.get(f"tokenizer.ggml.{key}")
        return tokens[index] if index is not None and 0 <= index < len(tokens) else None

    bos, eos = token("bos_token_id"), token("eos_token_id")
    if kind == "gpt2" and meta.get("tokenizer.ggml.pre") in ("llama-bpe", "llama3", "llama-v3", "smaug-bpe"):
        default_bos = True  # llama.cpp's default for these vocabularies
    add_bos = bool(meta.get("tokenizer.ggml.add_bos_token", default_bos)) and bos is not None
    add_eos = bool(meta.get("tokenizer.ggml.add_eos_token", False)) and eos is not None
    if add_bos or add_eos:
        single = ([f"{bos}:0"] if add_bos else []) + ["$A:0"] + ([f"{eos}:0"] if add_eos else [])
        pair = single + ([f"{bos}:1"] if add_bos else []) + ["$B:1"] + ([f"{eos}:1"] if add_eos else [])
        ids = {t: tok.token_to_id(t) for t in (bos if add_bos else None, eos if add_eos else None) if t}
        tok.post_processor = processors.TemplateProcessing(single=single, pair=pair, special_tokens=list(ids.items()))
    elif kind == "gpt2":
        tok.post_processor = processors.ByteLevel(trim_offsets=False)
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": bos,
        "eos_token": eos,
        "unk_token": token("unknown_token_id"),
        "pad_token": token("padding_token_id"),
        "add_bos_token": add_bos,
        "add_eos_token": add_eos,
        "chat_template": meta.get("tokenizer.chat_template"),
        "clean_up_tokenization_spaces": False,
        "model_max_length": meta.get(f"{meta.get('general.architecture')}.context_length"),
    }
    return tok.to_str(), config
