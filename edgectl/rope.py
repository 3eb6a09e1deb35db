"""Rotary position embeddings: the inverse frequencies of every RoPE variant edgectl
builds, their cos/sin tables, and RoPE's rotation as a linear (model.py applies them).

Variants (ModelArgs.rope_scaling["rope_type"]): default, llama3, linear (Gemma 3's global
layers) and longrope (Phi-3's 128k models: per-frequency factors, short ones up to the
original context, long ones past it, and cos/sin scaled by an attention factor). Partial
rotary (ModelArgs.rope_dim, Phi's partial_rotary_factor) rotates the first rope_dim dims
of each head and leaves the rest as they are: the tables hold cos 1 and sin 0 there.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from edgectl.model_args import SLIDING, ModelArgs


def rope_inv_freq(theta: float, dim: int, scaling: dict | None = None, max_seq_len: int | None = None) -> torch.Tensor:
    """Inverse frequencies of a RoPE over `dim` dims. longrope takes its long factors when
    the positions go past original_max_position_embeddings (max_seq_len), as transformers
    does for a sequence that long; its short ones otherwise."""
    exponents = torch.arange(0, dim, 2, dtype=torch.float64) / dim
    if scaling is not None and scaling["rope_type"] == "longrope":
        long = max_seq_len is not None and max_seq_len > scaling["original_max_position_embeddings"]
        ext = torch.tensor(scaling["long_factor" if long else "short_factor"], dtype=torch.float64)
        return (1.0 / (ext * theta**exponents)).float()
    inv_freq = 1.0 / (theta**exponents)
    if scaling is None:
        return inv_freq.float()
    if scaling["rope_type"] == "linear":  # positions divided by `factor` (Gemma 3's global layers)
        return (inv_freq / scaling["factor"]).float()
    # llama3: long wavelengths slowed by `factor`, short ones kept, smooth in between.
    factor, lo, hi = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
    old_ctx = scaling["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv_freq
    smooth = (old_ctx / wavelen - lo) / (hi - lo)
    scaled = torch.where(wavelen > old_ctx / lo, inv_freq / factor, inv_freq)
    mid = (wavelen <= old_ctx / lo) & (wavelen >= old_ctx / hi)
    return torch.where(mid, (1 - smooth) * inv_freq / factor + smooth * inv_freq, scaled).float()


def rope_tables(inv_freq: torch.Tensor, max_seq_len: int, head_dim: int | None = None,
                attention_factor: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin [max_seq_len, head_dim]: the rotated dims first (scaled by
    attention_factor), then cos 1 and sin 0 on the dims a partial RoPE leaves alone."""
    t = torch.arange(max_seq_len, dtype=torch.float64)
    freqs = torch.outer(t, inv_freq.double())
    emb = torch.cat([freqs, freqs], dim=-1)
    cos, sin = (emb.cos() * attention_factor).float(), (emb.sin() * attention_factor).float()
    rest = (head_dim or emb.shape[-1]) - emb.shape[-1]
    if rest:
        cos = torch.cat([cos, torch.ones(max_seq_len, rest)], dim=-1)
        sin = torch.cat([sin, torch.zeros(max_seq_len, rest)], dim=-1)
    return cos, sin


def rotation_matrix(head_dim: int, rope_dim: int | None = None) -> torch.Tensor:
    """R with x @ R.T == rotate_half(x) == cat(-x[half:], x[:half]) over the first rope_dim
    dims (zero on the rest): RoPE's rotation as a linear, which XNNPACK runs inside the
    layer's delegate (a slice with a dynamic sequence length would fall out of it).
    Exact: one +-1 term per output."""
    half = (rope_dim or head_dim) // 2
    r = torch.zeros(head_dim, head_dim)
    r[torch.arange(half), torch.arange(half) + half] = -1.0
    r[torch.arange(half) + half, torch.arange(half)] = 1.0
    return r


class Rope(nn.Module):
    """RoPE's cos/sin tables for max_seq_len positions, one pair per kind of layer: kind 0
    (every layer of a Llama; Gemma 3's global layers), kind 1 (Gemma 3's sliding layers,
    their own base). rope(pos) -> [(cos, sin) of each kind], each [T, 1, head_dim], for
    the T positions in `pos`; a layer takes `rope(pos)[layer.rope_kind]`."""

    def __init__(self, args: ModelArgs, max_seq_len: int):
        super().__init__()
        self.args, self.max_seq_len = args, max_seq_len
        self.kinds = 2 if args.rope_local_theta is not None and SLIDING in args.layer_types else 1
        for name in ("cos", "sin", "cos_local", "sin_local")[: 2 * self.kinds]:
            self.register_buffer(name, None, persistent=False)
        self.reset_buffers()

    def reset_buffers(self) -> None:
        """(Re)compute the tables on the CPU, also after building on the meta device."""
        a, n = self.args, self.max_seq_len
        dim = a.rope_dim or a.head_dim
        longrope = a.rope_scaling is not None and a.rope_scaling["rope_type"] == "longrope"
        factor = a.rope_scaling["attention_factor"] if longrope else 1.0
        with torch.device("cpu"):
            self.cos, self.sin = rope_tables(rope_inv_freq(a.rope_theta, dim, a.rope_scaling, n), n, a.head_dim, factor)
            if self.kinds == 2:
                self.cos_local, self.sin_local = rope_tables(rope_inv_freq(a.rope_local_theta, dim), n, a.head_dim)

    def forward(self, pos):
        tables = [(self.cos, self.sin)] + ([(self.cos_local, self.sin_local)] if self.kinds == 2 else [])
        return [(cos[pos].unsqueeze(1), sin[pos].unsqueeze(1)) for cos, sin in tables]
