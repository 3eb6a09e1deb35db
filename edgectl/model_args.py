"""The model's shape (ModelArgs), the Hugging Face architectures it builds, and its KV
cache's layout, without torch: what a `.pte`'s metadata records and the runtime reads
(model.py builds the modules from it)."""

from __future__ import annotations

import math
import struct
from dataclasses import asdict, dataclass, field, fields

from edgectl.util.errors import EdgectlError

# Hugging Face `architectures[0]` values the one model definition (model.py) builds
SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM",
                           "Phi3ForCausalLM", "Gemma3ForCausalLM")
# config.json `model_type` -> architecture, for configs without `architectures`
MODEL_TYPES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM",
               "qwen3": "Qwen3ForCausalLM", "phi3": "Phi3ForCausalLM", "gemma3_text": "Gemma3ForCausalLM"}
ROPE_TYPES = ("default", "llama3", "linear", "longrope")
SLIDING, FULL = "sliding_attention", "full_attention"  # Hugging Face's `layer_types` values


def hf_architecture(config: dict) -> str:
    """The architecture name a Hugging Face config.json declares."""
    return (config.get("architectures") or [MODEL_TYPES.get(config.get("model_type"), config.get("model_type", "?"))])[0]


def check_hf_config(config: dict, source: str | None = None) -> str:
    """The config's architecture, or a one-line EdgectlError if edgectl cannot build it."""
    arch = hf_architecture(config)
    if arch not in SUPPORTED_ARCHITECTURES:
        where = f"{source}: " if source else ""
        raise EdgectlError(f"{where}unsupported architecture {arch!r}", hint=f"supported: {', '.join(SUPPORTED_ARCHITECTURES)}")
    return arch


@dataclass(frozen=True)
class ModelArgs:
    architecture: str
    dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    hidden_dim: int
    vocab_size: int
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None
    attention_bias: bool = False
    tie_embeddings: bool = True
    max_position_embeddings: int = 2048
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = field(default_factory=tuple)
    # Gemma 3's differences from Llama; the defaults are Llama's.
    layer_types: tuple[str, ...] = ()  # per layer SLIDING or FULL; () all FULL
    sliding_window: int | None = None  # positions a SLIDING layer attends to, its own included
    rope_local_theta: float | None = None  # RoPE base of the SLIDING layers (unscaled)
    norm_plus_one: bool = False  # the checkpoint's RMSNorms scale by (1 + w): load_model folds the 1 into w
    sandwich_norms: bool = False  # RMSNorms before *and after* attention and the MLP
    qk_norm: bool = False  # RMSNorm over each head of q and k, before RoPE
    embed_scale: float | None = None  # embeddings times this (Gemma: sqrt(dim), rounded to float32)
    mlp_act: str = "silu"  # gate activation: "silu" or "gelu_tanh"
    attn_scale: float | None = None  # attention scores' scale; None: 1/sqrt(head_dim)
    final_logit_softcap: float | None = None  # logits = c * tanh(logits / c)
    rope_dim: int | None = None  # RoPE rotates each head's first rope_dim dims (Phi's partial_rotary_factor); None: all

    def sliding(self, layer: int) -> bool:
        return bool(self.layer_types) and self.layer_types[layer] == SLIDING

    @classmethod
    def from_hf_config(cls, cfg: dict) -> "ModelArgs":
        arch = check_hf_config(cfg)
        n_heads = cfg["num_attention_heads"]
        dim = cfg["hidden_size"]
        rope = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
        if FULL in rope:  # per layer type (Gemma 3): the global layers' RoPE, maybe scaled
            rope = {"rope_theta": cfg.get("rope_theta", 1e6), **(rope[FULL] or {})}
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if arch == "Phi3ForCausalLM" and rope_type in ("su", "yarn"):  # transformers' Phi3Config reads both as longrope
            rope_type = "longrope"
        if rope_type not in ROPE_TYPES:
            raise EdgectlError(f"unsupported RoPE scaling {rope_type!r}", hint=f"supported: {', '.join(ROPE_TYPES)}")
        eos = cfg.get("eos_token_id")
        eos = tuple(eos) if isinstance(eos, (list, tuple)) else ((eos,) if eos is not None else ())
        fields = dict(
            architecture=arch,
            dim=dim,
            n_layers=cfg["num_hidden_layers"],
            n_heads=n_heads,
            n_kv_heads=cfg.get("num_key_value_heads") or n_heads,
            head_dim=cfg.get("head_dim") or dim // n_heads,
            hidden_dim=cfg["intermediate_size"],
            vocab_size=cfg["vocab_size"],
            norm_eps=cfg.get("rms_norm_eps", 1e-5),
            rope_theta=rope.get("rope_theta", cfg.get("rope_theta", 10000.0)),
            rope_scaling=dict(rope, rope_type=rope_type) if rope_type != "default" else None,
            attention_bias=cfg.get("attention_bias", arch == "Qwen2ForCausalLM"),
            tie_embeddings=cfg.get("tie_word_embeddings", False),
            max_position_embeddings=cfg.get("max_position_embeddings", 2048),
            bos_token_id=cfg.get("bos_token_id"),
            eos_token_ids=eos,
        )
        if rope_type == "longrope":
            fields["rope_scaling"] = _longrope(cfg, rope)
        if arch == "Gemma3ForCausalLM":
            fields.update(_gemma3_fields(cfg))
        if arch == "Qwen3ForCausalLM":
            if cfg.get("use_sliding_window"):
                raise EdgectlError("Qwen3 with use_sliding_window is not supported", hint="its released models do not use it")
            if cfg.get("attention_bias"):  # Qwen3's o_proj takes a bias then too, which this model has not
                raise EdgectlError("Qwen3 with attention_bias is not supported", hint="its released models do not use it")
            fields["qk_norm"] = True  # plain RMSNorm over each head of q and k
        if arch == "Phi3ForCausalLM":
            fields.update(_phi3_fields(cfg, rope, fields["head_dim"]))
        if arch == "MistralForCausalLM" and cfg.get("sliding_window"):  # Mistral 7B v0.1: 4096, every layer
            fields.update(sliding_window=cfg["sliding_window"], layer_types=(SLIDING,) * fields["n_layers"])
        return cls(**fields)

    def to_dict(self) -> dict:
        """The fields, Gemma's only where they differ from Llama's defaults: a Llama-family
        artifact's metadata stays what runtimes before Gemma support read."""
        d = asdict(self)
        return {k: v for k, v in d.items() if k not in _GEMMA_DEFAULTS or v != _GEMMA_DEFAULTS[k]}

    @classmethod
    def from_dict(cls, d: dict) -> "ModelArgs":
        return cls(**{**d, "eos_token_ids": tuple(d.get("eos_token_ids", ())), "layer_types": tuple(d.get("layer_types", ()))})


_GEMMA_FIELDS = ("layer_types", "sliding_window", "rope_local_theta", "norm_plus_one", "sandwich_norms", "qk_norm",
                 "embed_scale", "mlp_act", "attn_scale", "final_logit_softcap", "rope_dim")  # and Qwen3's, Phi-3's
_GEMMA_DEFAULTS = {f.name: f.default for f in fields(ModelArgs) if f.name in _GEMMA_FIELDS}


def _longrope(cfg: dict, rope: dict) -> dict:
    """longrope's parameters as transformers computes them (_compute_longrope_parameters)."""
    # the top-level key wins, as in transformers' Phi3Config (which writes it into rope_parameters)
    orig = cfg.get("original_max_position_embeddings") or rope.get("original_max_position_embeddings")
    if not orig or not rope.get("short_factor") or not rope.get("long_factor"):
        raise EdgectlError("longrope RoPE scaling without original_max_position_embeddings, short_factor and long_factor")
    factor = rope.get("factor") or cfg.get("max_position_embeddings", orig) / orig
    attention_factor = rope.get("attention_factor")
    if attention_factor is None:
        attention_factor = 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(orig))
    return dict(rope_type="longrope", original_max_position_embeddings=orig, attention_factor=attention_factor,
                short_factor=list(rope["short_factor"]), long_factor=list(rope["long_factor"]))


def _phi3_fields(cfg: dict, rope: dict, head_dim: int) -> dict:
    """ModelArgs fields of a Phi-3 config (transformers' Phi3Config): partial RoPE, and a
    sliding window (Phi-3-mini-4k: 2047) over every layer."""
    partial = rope.get("partial_rotary_factor", cfg.get("partial_rotary_factor", 1.0))
    rope_dim = int(head_dim * partial)
    window = cfg.get("sliding_window")
    n = cfg["num_hidden_layers"]
    return dict(rope_dim=rope_dim if rope_dim < head_dim else None, sliding_window=window,
                layer_types=(SLIDING,) * n if window is not None else ())


def _gemma3_fields(cfg: dict) -> dict:
    """ModelArgs fields of a Gemma 3 config (transformers' Gemma3TextConfig, its defaults)."""
    n = cfg["num_hidden_layers"]
    pattern = cfg.get("sliding_window_pattern", 6)  # older configs: every pattern-th layer is global
    types = tuple(cfg.get("layer_types") or (SLIDING if (i + 1) % pattern else FULL for i in range(n)))
    if len(types) != n or not set(types) <= {SLIDING, FULL}:
        raise EdgectlError(f"layer_types {list(types)!r} is not {n} of {SLIDING!r}/{FULL!r}")
    rope = cfg.get("rope_parameters") or {}
    local = (rope.get(SLIDING) or {}) if SLIDING in rope else {}
    if local.get("rope_type", "default") != "default":
        raise EdgectlError(f"unsupported RoPE scaling {local['rope_type']!r} on the sliding layers", hint="supported: default")
    if cfg.get("attn_logit_softcapping") is not None:
        raise EdgectlError("attention logit soft-capping is not supported", hint="Gemma 3 does not use it; Gemma 2 does")
    if cfg.get("use_bidirectional_attention"):
        raise EdgectlError("bidirectional attention is not supported", hint="a causal language model is expected")
    act = cfg.get("hidden_activation") or cfg.get("hidden_act") or "gelu_pytorch_tanh"
    if act != "gelu_pytorch_tanh":
        raise EdgectlError(f"unsupported MLP activation {act!r}", hint="supported: gelu_pytorch_tanh")
    return dict(
        layer_types=types,
        sliding_window=cfg.get("sliding_window", 4096) if SLIDING in types else None,
        rope_local_theta=local.get("rope_theta", cfg.get("rope_local_base_freq", 10000.0)),
        norm_plus_one=True,
        sandwich_norms=True,
        qk_norm=True,
        # HF casts the scale to the weights' dtype: the float32 nearest sqrt(hidden_size)
        embed_scale=struct.unpack("<f", struct.pack("<f", cfg["hidden_size"] ** 0.5))[0],
        mlp_act="gelu_tanh",
        attn_scale=cfg.get("query_pre_attn_scalar", 256) ** -0.5,
        final_logit_softcap=cfg.get("final_logit_softcapping"),
        tie_embeddings=cfg.get("tie_word_embeddings", True),
        max_position_embeddings=cfg.get("max_position_embeddings", 131072),
        norm_eps=cfg.get("rms_norm_eps", 1e-6),
    )


# A `.pte`'s cache inputs (its meta records this): the runtime's [1, S, KV, D] buffers
# of a global layer, [1, C, KV, D] rings of a sliding one (ring_len), which the program
# writes in place (model.Block). Before: "bskd-inplace/1", whole [1, S, KV, D] buffers
# for every layer (still read for models without sliding layers: the same programs);
# "bskd-window/1", [1, W, KV, D] prefixes in and the new entries out; none, all S positions.
KV_LAYOUT = "bskd-ring/2"
KV_LAYOUT_FULL = "bskd-inplace/1"


def has_sliding(args: ModelArgs) -> bool:
    return SLIDING in args.layer_types and args.sliding_window is not None


def kv_layout_ok(layout: str | None, args: ModelArgs) -> bool:
    """Whether a program with this `kv_layout` takes the caches cache_shapes gives: the
    current layout, or the one before it for a model without sliding layers (whose
    programs it did not change)."""
    return layout == KV_LAYOUT or (layout == KV_LAYOUT_FULL and not has_sliding(args))


def ring_len(args: ModelArgs, max_seq_len: int, chunk: int | None = None) -> int | None:
    """Slots C of a sliding layer's ring (None: the model has none), for programs taking at
    most `chunk` tokens per call (None: max_seq_len, then C = max_seq_len, a whole cache).

    Position p lives at slot p mod C. A call writing T tokens ending at e leaves positions
    e-C+1..e in the ring; its first query (e-T+1) needs the window W back from it, so
    C >= W + T - 1. Rounded up to a multiple of `chunk`: prefill chunks from position 0
    never cross the ring's end (a call that would is split by the runtime, call_spans)."""
    return ring_slots(args.sliding_window, max_seq_len, chunk) if has_sliding(args) else None


def ring_slots(window: int, max_seq_len: int, chunk: int | None = None) -> int:
    """ring_len's C for a window of `window` positions."""
    c = max(1, min(chunk or max_seq_len, max_seq_len))
    return min(max_seq_len, -(-(window + c - 1) // c) * c)


def cache_len(args: ModelArgs, layer: int, max_seq_len: int, chunk: int | None = None) -> int:
    """Positions layer `layer`'s cache holds: max_seq_len, or its ring's slots if sliding."""
    C = ring_len(args, max_seq_len, chunk)
    return C if C is not None and args.sliding(layer) else max_seq_len


def cache_shapes(args: ModelArgs, max_seq_len: int, chunk: int | None = None,
                 layers=None) -> list[tuple[tuple[int, ...], tuple[int, ...]]]:
    """(K shape, V shape) of each layer in `layers` (default all), position-major:
    [1, S, KV, D] for a global layer (the first W positions are a contiguous prefix),
    [1, C, KV, D] for a sliding one (ring_len, position p at slot p mod C). `chunk`: the
    program's most tokens per call (None: max_seq_len, which makes every cache whole)."""
    out = []
    for layer in range(args.n_layers) if layers is None else layers:
        shape = (1, cache_len(args, layer, max_seq_len, chunk), args.n_kv_heads, args.head_dim)
        out.append((shape, shape))
    return out


def call_spans(start: int, T: int, chunk: int, ring: int | None) -> list[tuple[int, int]]:
    """(offset, length) of the program calls that feed T tokens from position `start`: at
    most `chunk` tokens each, and none crossing a multiple of `ring` (a sliding layer's
    ring end: the program writes a call's entries at consecutive slots from start mod C)."""
    spans, i = [], 0
    while i < T:
        n = min(chunk, T - i)
        if ring is not None:
            n = min(n, ring - (start + i) % ring)
        spans.append((i, n))
        i += n
    return spans


class RingTrack:
    """The positions a run's sliding-layer rings still hold, for a caller that may go back
    (a speculative verify's rejected drafts, a draft model's own rejected tokens).

    A call from `start` needs positions start-W+1..start-1 as written; each was overwritten
    only if a position C later has been written since. So, with `end` the highest position
    written since the run last started from 0, going back is safe while
    end - start + 1 <= C - W + 1 (`max_rewind`); from position 0 it always is (the mask
    drops every slot not written since). A ring of S slots never wraps: no limit."""

    def __init__(self, ring: int, window: int):
        self.ring, self.window, self.end = ring, window, -1

    @property
    def max_rewind(self) -> int:
        return self.ring - self.window + 1

    def reset(self) -> None:
        self.end = -1

    def check(self, start: int, T: int) -> None:
        """Refuse a call from `start` the rings cannot serve (one line), else record it."""
        back = self.end - start + 1
        if start and back > self.max_rewind:
            raise EdgectlError(f"positions from {start}: the sliding layers' rings of {self.ring} slots no longer hold "
                               f"the {self.window} positions before it (the run went back {back} positions, at most "
                               f"{self.max_rewind} can be)",
                               hint="start again from position 0, or re-export with a larger --prefill-chunk")
        self.end = start + T - 1 if start == 0 else max(self.end, start + T - 1)


def ring_track(args: ModelArgs, max_seq_len: int, chunk: int | None) -> RingTrack | None:
    """A RingTrack for a run of programs of at most `chunk` tokens per call, or None when
    no cache wraps (no sliding layer, or rings of max_seq_len slots)."""
    C = ring_len(args, max_seq_len, chunk)
    return RingTrack(C, args.sliding_window) if C is not None and C < max_seq_len else None
