"""The model's shape (ModelArgs), the Hugging Face architectures it builds, and its KV
cache's layout, without torch: what a `.pte`'s metadata records and the runtime reads
(model.py builds the modules from it)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from edgectl.util.errors import EdgectlError

# Hugging Face `architectures[0]` values the one model definition (model.py) builds
SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM")
# config.json `model_type` -> architecture, for configs without `architectures`
MODEL_TYPES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM"}


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

    @classmethod
    def from_hf_config(cls, cfg: dict) -> "ModelArgs":
        arch = check_hf_config(cfg)
        n_heads = cfg["num_attention_heads"]
        dim = cfg["hidden_size"]
        rope = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type not in ("default", "llama3"):
            raise EdgectlError(f"unsupported RoPE scaling {rope_type!r}", hint="supported: default, llama3")
        eos = cfg.get("eos_token_id")
        eos = tuple(eos) if isinstance(eos, (list, tuple)) else ((eos,) if eos is not None else ())
        return cls(
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
            rope_scaling=dict(rope) if rope_type == "llama3" else None,
            attention_bias=cfg.get("attention_bias", arch == "Qwen2ForCausalLM"),
            tie_embeddings=cfg.get("tie_word_embeddings", False),
            max_position_embeddings=cfg.get("max_position_embeddings", 2048),
            bos_token_id=cfg.get("bos_token_id"),
            eos_token_ids=eos,
        )

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "ModelArgs":
        return cls(**{**d, "eos_token_ids": tuple(d.get("eos_token_ids", ()))})


# A `.pte`'s cache inputs (its meta records this): the runtime's whole [1, S, KV, D]
# buffers, which the program writes in place (model.Block). Before:
# "bskd-window/1", [1, W, KV, D] prefixes in and the new entries out; none, all S positions.
KV_LAYOUT = "bskd-inplace/1"


def cache_shapes(args: ModelArgs, max_seq_len: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """K and V are position-major, [1, S, KV, D]: the first W positions are a contiguous prefix."""
    shape = (1, max_seq_len, args.n_kv_heads, args.head_dim)
    return shape, shape
