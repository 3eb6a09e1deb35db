"""One Llama-family decoder, readable top to bottom.

Covers Llama 2/3 (incl. llama3 RoPE scaling), SmolLM/SmolLM2, Mistral-style and Qwen2
(q/k/v bias): RMSNorm, rotary embeddings, grouped-query attention, SwiGLU, tied embeddings.

The KV cache lives *outside* the model. Every decoder layer has the signature

    Block(x, step, k_cache, v_cache) -> (x_out, k_new, v_new)

where `k_cache`/`v_cache` ([1, W, n_kv_heads, head_dim]) are read only: a window, the
first W positions of the caller's [1, max_seq_len, n_kv_heads, head_dim] buffers (a
contiguous prefix; `cache_window` rounds the filled positions up to a KV_WINDOW step),
`step` holds what every layer derives from the positions of the T tokens in `x`, and
`k_new`/`v_new` ([1, T, n_kv_heads, head_dim]) are the entries the caller writes into
its caches at those positions. Attention runs over the window (positions < pos[0]) and
over the new entries (causal) in one softmax (computed in two parts), so no cache is
copied or mutated inside the program, and a step costs what the context holds, not
max_seq_len. This is the eager model and the default monolithic `.pte`. The programs of a
shard set (shard_build.LayersProgram) and the stock-runner form (stock.py) run the same
modules with a cache they write in place (stock.cached_layer: llama::update_cache and
llama::custom_sdpa); a layer shard's cache is still the caller's, so it can be evicted
mid-generation.

Module names mirror Hugging Face's (`self_attn.q_proj`, `mlp.gate_proj`, ...) so a
checkpoint loads with its keys unchanged apart from the leading "model.".
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from edgectl.checkpoint.architectures import check_hf_config
from edgectl.util.errors import EdgectlError
MASK_VALUE = -1e9  # additive mask; finite so a softmax row never sees NaN


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


# ---------------------------------------------------------------------------------------
# Rotary embeddings


def rope_inv_freq(args: ModelArgs) -> torch.Tensor:
    inv_freq = 1.0 / (args.rope_theta ** (torch.arange(0, args.head_dim, 2, dtype=torch.float64) / args.head_dim))
    s = args.rope_scaling
    if s is None:
        return inv_freq.float()
    # llama3: long wavelengths slowed by `factor`, short ones kept, smooth in between.
    factor, lo, hi = s["factor"], s["low_freq_factor"], s["high_freq_factor"]
    old_ctx = s["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv_freq
    smooth = (old_ctx / wavelen - lo) / (hi - lo)
    scaled = torch.where(wavelen > old_ctx / lo, inv_freq / factor, inv_freq)
    mid = (wavelen <= old_ctx / lo) & (wavelen >= old_ctx / hi)
    return torch.where(mid, (1 - smooth) * inv_freq / factor + smooth * inv_freq, scaled).float()


def rope_tables(args: ModelArgs, max_seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    t = torch.arange(max_seq_len, dtype=torch.float64)
    freqs = torch.outer(t, rope_inv_freq(args).double())
    emb = torch.cat([freqs, freqs], dim=-1)
    return emb.cos().float(), emb.sin().float()


def rotation_matrix(head_dim: int) -> torch.Tensor:
    """R with x @ R.T == rotate_half(x) == cat(-x[half:], x[:half]): RoPE's rotation as a
    linear, which XNNPACK runs inside the layer's delegate (a slice with a dynamic
    sequence length would fall out of it). Exact: one +-1 term per output."""
    half = head_dim // 2
    r = torch.zeros(head_dim, head_dim)
    r[torch.arange(half), torch.arange(half) + half] = -1.0
    r[torch.arange(half) + half, torch.arange(half)] = 1.0
    return r


class StepInputs(nn.Module):
    """Per-step tensors every layer needs, computed once from the positions `pos` and the
    cache window's length W: RoPE cos/sin [T, 1, D], the mask over the window [W] (slots
    < pos[0] are filled) and the causal mask over the new tokens [rep*T, T] (query rows
    grouped by kv head)."""

    def __init__(self, args: ModelArgs, max_seq_len: int):
        super().__init__()
        self.args, self.max_seq_len = args, max_seq_len
        self.rep = args.n_heads // args.n_kv_heads
        self.register_buffer("cos", None, persistent=False)
        self.register_buffer("sin", None, persistent=False)
        self.reset_buffers()

    def reset_buffers(self) -> None:
        """(Re)compute the RoPE tables on the CPU, also after building on the meta device."""
        with torch.device("cpu"):
            self.cos, self.sin = rope_tables(self.args, self.max_seq_len)

    def forward(self, pos, window: int):
        cos, sin = self.cos[pos].unsqueeze(1), self.sin[pos].unsqueeze(1)
        cached = torch.arange(window, dtype=pos.dtype) < pos[:1]
        mask_cache = torch.where(cached, 0.0, MASK_VALUE)
        causal = pos.unsqueeze(1) >= pos.unsqueeze(0)
        mask_new = torch.where(causal, 0.0, MASK_VALUE).repeat(self.rep, 1)
        return cos, sin, mask_cache, mask_new


# ---------------------------------------------------------------------------------------
# Layers


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))
        self.register_buffer("mean_w", None, persistent=False)
        self.reset_buffers()

    def reset_buffers(self) -> None:
        with torch.device("cpu"):
            self.mean_w = torch.full((1, self.weight.shape[0]), 1.0 / self.weight.shape[0])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # mean(x^2) as a 1-row linear: XNNPACK's mean only takes 4-D inputs.
        return self.weight * (x * torch.rsqrt(F.linear(x * x, self.mean_w) + self.eps))


class Attention(nn.Module):
    """Grouped-query attention over an external cache window. Both caches are [1, W, KV, D]
    (position-major): the first W positions of the runtime's [1, S, KV, D] buffers, a
    contiguous prefix, so a step reads what the context filled (W grows in KV_WINDOW
    steps), not all max_seq_len positions. New entries come back as [1, T, KV, D]."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = args.n_heads, args.n_kv_heads, args.head_dim
        bias = args.attention_bias
        self.q_proj = nn.Linear(args.dim, args.n_heads * args.head_dim, bias=bias)
        self.k_proj = nn.Linear(args.dim, args.n_kv_heads * args.head_dim, bias=bias)
        self.v_proj = nn.Linear(args.dim, args.n_kv_heads * args.head_dim, bias=bias)
        self.o_proj = nn.Linear(args.n_heads * args.head_dim, args.dim, bias=False)
        self.qkv = None  # export's one linear for q/k/v, which then replaces them (fuse_projections)
        self.register_buffer("rot", None, persistent=False)
        self.reset_buffers()

    def reset_buffers(self) -> None:
        with torch.device("cpu"):
            self.rot = rotation_matrix(self.head_dim)

    def project(self, x, cos, sin):
        """q [1,T,H,D], k and v [1,T,KV,D] of the T tokens in x, RoPE applied to q and k."""
        _, T, _ = x.shape
        H, KV, D = self.n_heads, self.n_kv_heads, self.head_dim
        if self.qkv is not None:
            q, k, v = self.qkv(x).split([H * D, KV * D, KV * D], dim=-1)
        else:
            q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        q, k, v = q.view(1, T, H, D), k.view(1, T, KV, D), v.view(1, T, KV, D)
        return q * cos + F.linear(q, self.rot) * sin, k * cos + F.linear(k, self.rot) * sin, v

    def forward(self, x, step, k_cache, v_cache):
        cos, sin, mask_cache, mask_new = step
        _, T, _ = x.shape
        H, KV, D = self.n_heads, self.n_kv_heads, self.head_dim
        rep, W = H // KV, v_cache.shape[1]
        q, k, v = self.project(x, cos, sin)
        q = q * (1.0 / math.sqrt(D))

        # Query heads that share a kv head become rows of one matrix: [KV, rep*T, D].
        qg = q.permute(0, 2, 1, 3).reshape(KV, rep * T, D)
        scores = torch.cat(
            [
                torch.bmm(qg, k_cache.permute(0, 2, 3, 1).reshape(KV, D, W)) + mask_cache,
                torch.bmm(qg, k.permute(0, 2, 3, 1).reshape(KV, D, T)) + mask_new,
            ],
            dim=-1,
        )
        p = torch.softmax(scores, dim=-1)
        out = torch.bmm(p[..., :W], v_cache.permute(0, 2, 1, 3).reshape(KV, W, D)) + torch.bmm(
            p[..., W:], v.permute(0, 2, 1, 3).reshape(KV, T, D)
        )
        out = out.view(H, T, D).permute(1, 0, 2).reshape(1, T, H * D)
        return self.o_proj(out), k, v


class MLP(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.gate_proj = nn.Linear(args.dim, args.hidden_dim, bias=False)
        self.up_proj = nn.Linear(args.dim, args.hidden_dim, bias=False)
        self.down_proj = nn.Linear(args.hidden_dim, args.dim, bias=False)
        self.gate_up = None  # export's one linear for gate/up (fuse_projections)

    def forward(self, x):
        if self.gate_up is not None:
            gate, up = self.gate_up(x).chunk(2, dim=-1)
        else:
            gate, up = self.gate_proj(x), self.up_proj(x)
        return self.down_proj(F.silu(gate) * up)


class Block(nn.Module):
    """One decoder layer: Block(x, step, k_cache, v_cache) -> (x, k_new, v_new)."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.input_layernorm = RMSNorm(args.dim, args.norm_eps)
        self.self_attn = Attention(args)
        self.post_attention_layernorm = RMSNorm(args.dim, args.norm_eps)
        self.mlp = MLP(args)

    def forward(self, x, step, k_cache, v_cache):
        a, k_new, v_new = self.self_attn(self.input_layernorm(x), step, k_cache, v_cache)
        x = x + a
        x = x + self.mlp(self.post_attention_layernorm(x))
        return x, k_new, v_new


class Embedding(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.embed_tokens = nn.Embedding(args.vocab_size, args.dim)

    def forward(self, tokens, table=None):
        # `table` lets an exported program take a tied matrix as an input (export.py).
        return F.embedding(tokens, self.embed_tokens.weight if table is None else table)


class Head(nn.Module):
    """Final norm and output projection, applied only at the positions in `idx`."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.norm = RMSNorm(args.dim, args.norm_eps)
        self.lm_head = nn.Linear(args.dim, args.vocab_size, bias=False)

    def forward(self, x, idx):
        return self.lm_head(self.norm(x.index_select(1, idx)))


class Transformer(nn.Module):
    """Embedding -> n_layers Blocks -> Head.

    forward(tokens [1,T], pos [T], idx [N], k_caches, v_caches[, embed_table])
        -> (logits [1,N,vocab], k_news, v_news)
    """

    def __init__(self, args: ModelArgs, max_seq_len: int):
        super().__init__()
        self.args, self.max_seq_len = args, max_seq_len
        self.step = StepInputs(args, max_seq_len)
        self.embed = Embedding(args)
        self.layers = nn.ModuleList(Block(args) for _ in range(args.n_layers))
        self.head = Head(args)
        if args.tie_embeddings:
            self.head.lm_head.weight = self.embed.embed_tokens.weight

    def forward(self, tokens, pos, idx, k_caches: list[torch.Tensor], v_caches: list[torch.Tensor], embed_table=None):
        x = self.embed(tokens, embed_table)
        step = self.step(pos, k_caches[0].shape[1] if k_caches else 1)
        k_news, v_news = [], []
        for layer, k_cache, v_cache in zip(self.layers, k_caches, v_caches):
            x, k, v = layer(x, step, k_cache, v_cache)
            k_news.append(k)
            v_news.append(v)
        return self.head(x, idx), k_news, v_news

    def empty_caches(self) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        return empty_caches(self.args, self.max_seq_len, self.args.n_layers)


def fuse_projections(model: nn.Module) -> int:
    """For export: q/k/v, and gate/up, each become one linear (quant_modules.fuse_linears)
    where they are of one kind, in place; the separate ones are dropped. Returns how many
    fused linears there now are. The checkpoint keeps its per-linear form."""
    from edgectl.quant.quant_modules import fuse_linears

    n = 0
    for m in model.modules():
        names = ("q_proj", "k_proj", "v_proj", "qkv") if isinstance(m, Attention) else \
            ("gate_proj", "up_proj", "gate_up") if isinstance(m, MLP) else None
        if names is None or getattr(m, names[-1]) is not None:
            continue
        fused = fuse_linears([getattr(m, name) for name in names[:-1]])
        if fused is not None:
            setattr(m, names[-1], fused)
            for name in names[:-1]:
                delattr(m, name)
            n += 1
    return n


def reset_buffers(model: nn.Module) -> nn.Module:
    """Materialise the derived (non-checkpoint) buffers after building on the meta device."""
    for m in model.modules():
        if hasattr(m, "reset_buffers"):
            m.reset_buffers()
    return model


# A `.pte`'s cache inputs (its meta records this): the runtime's whole [1, S, KV, D]
# buffers, which the program writes in place (stock.InPlaceTransformer). Before:
# "bskd-window/1", [1, W, KV, D] prefixes in and the new entries out; none, all S positions.
KV_LAYOUT = "bskd-inplace/1"

KV_WINDOW = 32  # a cache window grows in steps of this many positions


def cache_shapes(args: ModelArgs, max_seq_len: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """K and V are position-major, [1, S, KV, D]: the first W positions are a contiguous prefix."""
    shape = (1, max_seq_len, args.n_kv_heads, args.head_dim)
    return shape, shape


def empty_caches(args: ModelArgs, max_seq_len: int, n: int) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    ks, vs = cache_shapes(args, max_seq_len)
    return [torch.zeros(ks) for _ in range(n)], [torch.zeros(vs) for _ in range(n)]


def cache_window(start: int, cache_len: int) -> int:
    """Positions of the cache a call starting at `start` passes to a program: the filled
    ones (< start) rounded up to a KV_WINDOW step, at least 1, at most the cache. Steps
    keep the programs' shapes (XNNPACK re-plans on a change) the same for KV_WINDOW tokens."""
    return max(1, min(cache_len, -(-start // KV_WINDOW) * KV_WINDOW))


def windows(caches, start: int) -> list:
    """Views of the first cache_window(start) positions of each [1, S, KV, D] cache."""
    return [c[:, : cache_window(start, c.shape[1])] for c in caches]


def write_cache(k_cache, v_cache, k_new, v_new, start: int) -> None:
    """Store a layer's new entries ([1, T, KV, D], as Block returns them) at positions start..start+T."""
    T = v_new.shape[1]
    k_cache[:, start : start + T] = k_new
    v_cache[:, start : start + T] = v_new


