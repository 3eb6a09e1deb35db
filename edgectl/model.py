"""One Llama-family decoder, readable top to bottom.

Covers Llama 2/3 (incl. llama3 RoPE scaling), SmolLM/SmolLM2, Mistral-style and Qwen2
(q/k/v bias): RMSNorm, rotary embeddings (rope.py), grouped-query attention, SwiGLU, tied
embeddings. Qwen3 adds q/k norms (plain RMSNorm per head, before RoPE). Phi-3's fused
qkv_proj and gate_up_proj are split at load (checkpoint.py) into the projections here;
its RoPE may be partial (rope_dim) or longrope, and a sliding window makes every layer a
sliding one.
Gemma 3 is the same decoder with the ModelArgs flags that say where it differs: sliding-
window layers with their own RoPE base, norms before and after attention and the MLP,
q/k norms, scaled embeddings, GELU-tanh, its attention scale and logit soft-capping. Its
RMSNorms scale by (1 + w) in the checkpoint; load_model folds the 1 into w, so RMSNorm
here is Llama's for every model.

The KV cache lives *outside* the model, in the caller's buffers: every decoder layer is

    Block(x, cos, sin, k_cache, v_cache, start) -> x

with `k_cache`/`v_cache` ([1, S, n_kv_heads, head_dim], position-major) a global layer's
whole cache, written in place: the T new entries go to positions start..start+T
(llama::update_cache), then causal attention reads positions < start + T only
(llama::custom_sdpa; grouped-query heads read the cache where it is, no copy).

A sliding layer (window W) holds a ring of C slots instead, [1, C, n_kv_heads, head_dim]
(model_args.ring_len: C = W + chunk - 1 rounded up to a multiple of `chunk`, the
program's most tokens per call, at most S): position p lives at slot p mod C. A call
writes its T entries at slots start mod C.. (never across the ring's end: the runtime
splits such a call, model_args.call_spans); afterwards slot s holds position
e - ((e - s) mod C), e = start + T - 1 (negative: not written yet), and the query at q
sees positions q - W < p <= q (Hugging Face's window) through an additive mask over all
C slots (ring_mask; custom_sdpa with a mask reads every slot). With T <= chunk,
C >= W + T - 1 keeps every position a query needs. Whole caches (C = S, never wrapped)
are the same attention: what the eager callers get from `empty_caches()` without a chunk,
and the stock-runner form's buffers.

Those are ExecuTorch's LLM custom ops, which every exported program runs with its
runtime kernels: the eager model, the monolithic `.pte`, the stock-runner form
(lower/stock.py) and each layer shard of a shard set (shard/shard_build.py) share this
one attention. A global layer's step costs what the context holds, not S, a sliding
layer's C; the caller owns the cache, so a layer shard can be evicted mid-generation.

Module names mirror Hugging Face's (`self_attn.q_proj`, `mlp.gate_proj`, ...) so a
checkpoint loads with its keys unchanged apart from the leading "model.".
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from edgectl.model_args import KV_LAYOUT, SLIDING, ModelArgs, cache_shapes, call_spans, ring_len  # noqa: F401  (the model's own names)
from edgectl.rope import Rope, rope_inv_freq, rope_tables, rotation_matrix  # noqa: F401  (the model's own names)


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


def ring_mask(start, T: int, C: int, window: int) -> torch.Tensor:
    """[T, C] additive mask of a sliding layer over its ring of C slots, once positions
    start..e (e = start+T-1) are written (position p at slot p mod C): slot s holds position
    e - ((e - s) mod C) (negative: never written), and the query at position start+t sees
    positions start+t-window < p <= start+t, p >= 0 (Hugging Face's sliding window).
    With C = S (a whole cache, never wrapped) this is the window over positions 0..S-1."""
    q = torch.arange(T).unsqueeze(1) + start
    e = start + T - 1
    p = e - torch.remainder(e - torch.arange(C).unsqueeze(0), C)
    return torch.zeros(T, C).masked_fill((p > q) | (p <= q - window) | (p < 0), float("-inf"))


class Attention(nn.Module):
    """Grouped-query attention over the caller's caches, written in place (see the module
    docstring): [1, S, KV, D] of a global layer, a ring of [1, C, KV, D] of a sliding one.
    `window`: a sliding layer's window (None: global)."""

    def __init__(self, args: ModelArgs, window: int | None = None):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = args.n_heads, args.n_kv_heads, args.head_dim
        self.rope_dim = args.rope_dim
        self.scale, self.window = args.attn_scale, window  # scale None: 1/sqrt(head_dim)
        bias = args.attention_bias
        self.q_proj = nn.Linear(args.dim, args.n_heads * args.head_dim, bias=bias)
        self.k_proj = nn.Linear(args.dim, args.n_kv_heads * args.head_dim, bias=bias)
        self.v_proj = nn.Linear(args.dim, args.n_kv_heads * args.head_dim, bias=bias)
        self.o_proj = nn.Linear(args.n_heads * args.head_dim, args.dim, bias=False)
        self.qkv = None  # export's one linear for q/k/v, which then replaces them (quant_modules.fuse_projections)
        if args.qk_norm:  # per head, before RoPE
            self.q_norm = RMSNorm(args.head_dim, args.norm_eps)
            self.k_norm = RMSNorm(args.head_dim, args.norm_eps)
        self.register_buffer("rot", None, persistent=False)
        self.reset_buffers()

    def reset_buffers(self) -> None:
        with torch.device("cpu"):
            self.rot = rotation_matrix(self.head_dim, self.rope_dim)

    def project(self, x, cos, sin):
        """q [1,T,H,D], k and v [1,T,KV,D] of the T tokens in x, RoPE applied to q and k."""
        _, T, _ = x.shape
        H, KV, D = self.n_heads, self.n_kv_heads, self.head_dim
        if self.qkv is not None:
            q, k, v = self.qkv(x).split([H * D, KV * D, KV * D], dim=-1)
        else:
            q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        q, k, v = q.view(1, T, H, D), k.view(1, T, KV, D), v.view(1, T, KV, D)
        if hasattr(self, "q_norm"):
            q, k = self.q_norm(q), self.k_norm(k)
        return q * cos + F.linear(q, self.rot) * sin, k * cos + F.linear(k, self.rot) * sin, v

    def forward(self, x, cos, sin, k_cache, v_cache, start):
        T = x.shape[1]
        q, k, v = self.project(x, cos, sin)
        if self.window is None:  # causal: reads positions < start + T
            torch.ops.llama.update_cache(k, k_cache, start)
            torch.ops.llama.update_cache(v, v_cache, start)
            o = torch.ops.llama.custom_sdpa(q, k_cache, v_cache, start, None, 0.0, True, self.scale)
        else:  # a ring of C slots (C = S: a whole cache), the window as a mask over all of them
            C = k_cache.shape[1]
            slot = start % C
            torch._check(slot >= 0)
            torch._check(slot + T <= C)  # the caller splits a call that would wrap (call_spans)
            torch.ops.llama.update_cache(k, k_cache, slot)
            torch.ops.llama.update_cache(v, v_cache, slot)
            # with a mask custom_sdpa reads all C keys, whatever its start (0 here)
            o = torch.ops.llama.custom_sdpa(q, k_cache, v_cache, 0, ring_mask(start, T, C, self.window), 0.0, False,
                                            self.scale)
        return self.o_proj(o.reshape(1, T, self.n_heads * self.head_dim))


def gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    """GELU's tanh approximation (HF's gelu_pytorch_tanh), written out as PyTorch computes it:
    XNNPACK's GELU is the exact (erf) one whatever `approximate` says (ExecuTorch 1.4's
    op_gelu.py drops it), up to 5e-4 off, which moved Gemma 3's logits by 0.1."""
    return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * (x * x * x))))


class MLP(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.gate_proj = nn.Linear(args.dim, args.hidden_dim, bias=False)
        self.up_proj = nn.Linear(args.dim, args.hidden_dim, bias=False)
        self.down_proj = nn.Linear(args.hidden_dim, args.dim, bias=False)
        self.gate_up = None  # export's one linear for gate/up (quant_modules.fuse_projections)
        self.gelu = args.mlp_act == "gelu_tanh"  # else SiLU (SwiGLU)

    def forward(self, x):
        if self.gate_up is not None:
            gate, up = self.gate_up(x).chunk(2, dim=-1)
        else:
            gate, up = self.gate_proj(x), self.up_proj(x)
        return self.down_proj((gelu_tanh(gate) if self.gelu else F.silu(gate)) * up)


class Block(nn.Module):
    """Decoder layer `layer`: Block(x, cos, sin, k_cache, v_cache, start) -> x, its cache
    written in place at positions start..start+T; (cos, sin) = rope(pos)[block.rope_kind].

    Norm names are Hugging Face's, whose meaning differs: Llama's post_attention_layernorm
    is the MLP's input norm; with sandwich norms (Gemma) it normalises the attention's
    output, and pre_/post_feedforward_layernorm wrap the MLP."""

    def __init__(self, args: ModelArgs, layer: int = 0):
        super().__init__()
        sliding = args.sliding(layer)
        self.rope_kind = 1 if sliding and args.rope_local_theta is not None else 0
        self.input_layernorm = RMSNorm(args.dim, args.norm_eps)
        self.self_attn = Attention(args, args.sliding_window if sliding else None)
        self.post_attention_layernorm = RMSNorm(args.dim, args.norm_eps)
        self.mlp = MLP(args)
        self.sandwich = args.sandwich_norms
        if self.sandwich:
            self.pre_feedforward_layernorm = RMSNorm(args.dim, args.norm_eps)
            self.post_feedforward_layernorm = RMSNorm(args.dim, args.norm_eps)

    def forward(self, x, cos, sin, k_cache, v_cache, start):
        attn = self.self_attn(self.input_layernorm(x), cos, sin, k_cache, v_cache, start)
        if self.sandwich:
            x = x + self.post_attention_layernorm(attn)
            return x + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(x)))
        x = x + attn
        return x + self.mlp(self.post_attention_layernorm(x))


class Embedding(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.embed_tokens = nn.Embedding(args.vocab_size, args.dim)
        self.scale = args.embed_scale  # Gemma: sqrt(dim); the tied head uses the table unscaled

    def forward(self, tokens, table=None):
        # `table` lets an exported program take a tied matrix as an input (export.py).
        x = F.embedding(tokens, self.embed_tokens.weight if table is None else table)
        return x if self.scale is None else x * self.scale


class Head(nn.Module):
    """Final norm and output projection, applied only at the positions in `idx`."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.norm = RMSNorm(args.dim, args.norm_eps)
        self.lm_head = nn.Linear(args.dim, args.vocab_size, bias=False)
        self.softcap = args.final_logit_softcap

    def forward(self, x, idx):
        return self.logits(x.index_select(1, idx))

    def logits(self, h):
        y = self.lm_head(self.norm(h))
        return y if self.softcap is None else torch.tanh(y / self.softcap) * self.softcap


class Transformer(nn.Module):
    """Embedding -> n_layers Blocks -> Head:

        forward(tokens [1,T], pos [T], idx [N], k_caches, v_caches[, embed_table]) -> logits [1,N,vocab]

    `pos` holds consecutive positions from pos[0]; each cache ([1, S, KV, D], S at most
    max_seq_len; a sliding layer's a ring of [1, C, KV, D]) is written in place there. `embed_table` lets a program take the tied
    matrix as an input, so the runtime maps it from the head's copy (lower/export.py).
    This module is what `export` lowers (the default `.pte`), as it is."""

    def __init__(self, args: ModelArgs, max_seq_len: int):
        super().__init__()
        from edgectl.backends.custom_ops import load_custom_ops
        from edgectl.runtime._native import quiet_custom_ops

        load_custom_ops()  # llama::update_cache, llama::custom_sdpa
        quiet_custom_ops()  # their eager kernels' "No temp allocator provided" on every call
        self.args, self.max_seq_len = args, max_seq_len
        self.rope = Rope(args, max_seq_len)
        self.embed = Embedding(args)
        self.layers = nn.ModuleList(Block(args, i) for i in range(args.n_layers))
        self.head = Head(args)
        if args.tie_embeddings:
            self.head.lm_head.weight = self.embed.embed_tokens.weight

    def forward(self, tokens, pos, idx, k_caches: list[torch.Tensor], v_caches: list[torch.Tensor], embed_table=None):
        x = self.embed(tokens, embed_table)
        start = pos[0].item()
        torch._check(start >= 0)
        whole = [k for layer, k in zip(self.layers, k_caches) if layer.self_attn.window is None]
        if whole:  # a global layer's whole cache (S at most max_seq_len)
            torch._check(start + tokens.shape[1] <= whole[0].shape[1])
        elif k_caches:  # sliding layers only: their rings bound no position
            torch._check(start + tokens.shape[1] <= self.max_seq_len)
        ropes = self.rope(pos)
        for layer, k_cache, v_cache in zip(self.layers, k_caches, v_caches):
            x = layer(x, *ropes[layer.rope_kind], k_cache, v_cache, start)
        return self.head(x, idx)

    def empty_caches(self, chunk: int | None = None) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Zero caches for every layer; `chunk`: the most tokens per call, which sizes the
        sliding layers' rings (model_args.ring_len; None: whole caches, any call length)."""
        return empty_caches(self.args, self.max_seq_len, self.args.n_layers, chunk)


def reset_buffers(model: nn.Module) -> nn.Module:
    """Materialise the derived (non-checkpoint) buffers after building on the meta device."""
    for m in model.modules():
        if hasattr(m, "reset_buffers"):
            m.reset_buffers()
    return model


def empty_caches(args: ModelArgs, max_seq_len: int, n: int, chunk: int | None = None,
                 layers=None) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Zero K and V caches (model_args.cache_shapes) of layers `layers` (default 0..n-1)."""
    shapes = cache_shapes(args, max_seq_len, chunk, range(n) if layers is None else layers)
    return [torch.zeros(ks) for ks, _ in shapes], [torch.zeros(vs) for _, vs in shapes]
