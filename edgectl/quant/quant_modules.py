"""Quantized module forms that ExecuTorch's XNNPACK backend lowers, built from integer codes.

Every form is built from stored codes and scales (never by re-quantizing fp32), so the
checkpoint written by `edgectl quantize` is the artifact that runs:

- `dynamic_linear(codes, scales, ...)`: a torchao `IntxUnpackedToInt8Tensor` weight with
  int8 per-token dynamic activation quantization. XNNPACK runs it as qd8-f32-qc8w (8-bit,
  one scale per output channel) or qd8-f32-qb4w (4-bit, one scale per group, zero point 8).
- `Asym4Linear`: 4-bit codes u in 0..15 with a scale s and an offset per group,
  w = s * (u - 8) + c (c = min + 8 s: the llama.cpp Q4_1 grid). Runs as a qb4w linear on
  (u - 8, s) plus a small fp32 linear over the input's per-group sums carrying c.
- `QuantEmbedding`: gather + dequantize of the T looked-up rows only, in core ATen ops
  (XNNPACK has no gather). For a tied matrix the codes come in as program inputs mapped
  from the output head's own XNNPACK blobs, so the matrix is stored once.

4-bit codes are packed two per byte, low nibble = even column: the layout XNNPACK itself
serializes (backends/xnnpack/operators/node_visitor.py, convert_to_qc4w), so a tied
embedding can read the head's blob. 4-bit scales are rounded to bfloat16 when quantizing,
because XNNPACK stores groupwise scales as bfloat16: eager and `.pte` then agree.
"""

from __future__ import annotations

import hashlib

import torch
import torch.nn.functional as F
from torch import nn

XNNPACK_GROUP_MULTIPLE = 32  # XNNPACK's blockwise (qb4w) kernels need group sizes that are multiples of 32


def pack4(u: torch.Tensor) -> torch.Tensor:
    """[N, K] codes in 0..15 -> [N, K/2] uint8, low nibble = even column."""
    u = u.to(torch.uint8)
    return u[:, 0::2] | (u[:, 1::2] << 4)


def unpack4(p: torch.Tensor) -> torch.Tensor:
    """Inverse of pack4: [N, K/2] uint8 -> [N, K] uint8 codes in 0..15."""
    return torch.stack([p & 15, p >> 4], dim=-1).reshape(p.shape[0], p.shape[1] * 2)


def bf16_round(t: torch.Tensor) -> torch.Tensor:
    return t.to(torch.bfloat16).to(torch.float32)


def sha256_hex(t: torch.Tensor) -> str:
    t = t.detach().contiguous()
    if t.dtype == torch.bfloat16:
        t = t.view(torch.int16)
    return hashlib.sha256(t.numpy().tobytes()).hexdigest()


def ao_weight(codes: torch.Tensor, scales: torch.Tensor, bits: int, group_size: int):
    """torchao's exportable weight form: int8-held codes, fp32 scales, zero points 0,
    int8 asymmetric per-token activation quantization (the pattern XNNPACK delegates)."""
    from torchao.quantization.quantize_.workflows.intx.intx_unpacked_to_int8_tensor import (
        IntxUnpackedToInt8Tensor,
        IntxUnpackedToInt8TensorActivationQuantization as Act,
    )

    return IntxUnpackedToInt8Tensor(
        codes.to(torch.int8).contiguous(), scales.to(torch.float32).contiguous(),
        torch.zeros(scales.shape, dtype=torch.int8), torch.int4 if bits == 4 else torch.int8,
        (1, group_size), torch.float32, Act.INT8_ASYM_PER_TOKEN,
    )


def dynamic_linear(codes: torch.Tensor, scales: torch.Tensor, bits: int, group_size: int,
                   bias: torch.Tensor | None = None) -> nn.Linear:
    """A Linear holding `codes` [N, K] (signed: -8..7 or -128..127) and `scales` [N, K/group_size]."""
    n, k = codes.shape
    with torch.device("meta"):
        lin = nn.Linear(k, n, bias=bias is not None)
    lin.weight = nn.Parameter(ao_weight(codes, scales, bits, group_size), requires_grad=False)
    if bias is not None:
        lin.bias = nn.Parameter(bias.to(torch.float32), requires_grad=False)
    return lin


_ONES: dict[int, torch.Tensor] = {}


def _ones(group_size: int) -> torch.Tensor:
    """One shared [1, group_size] tensor of ones per group size: linears that read the same
    input then compute the very same group sums in the exported graph, and export's
    common-subexpression pass (edge_passes.dedupe) keeps one of them (q/k/v, gate/up)."""
    if group_size not in _ONES:
        _ONES[group_size] = torch.ones(1, group_size)
    return _ONES[group_size]


class Asym4Linear(nn.Module):
    """4-bit asymmetric groupwise weight: w = scales * (u - 8) + offsets, per group.

    x @ w.T = x @ (scales * (u - 8)).T + group_sums(x) @ offsets.T: a qb4w linear plus a
    small fp32 linear over the input's per-group sums. The sums are one more linear, over
    the input viewed as [tokens * groups, group_size] with a [1, group_size] weight of ones:
    it reads the input once (a dense 0/1 [groups, K] matrix would read K * K / group_size
    weights per call) and stays inside XNNPACK."""

    def __init__(self, packed: torch.Tensor, scales: torch.Tensor, offsets: torch.Tensor, group_size: int,
                 bias: torch.Tensor | None = None):
        super().__init__()
        n, g = scales.shape
        self.group_size, self.groups = group_size, g
        codes = unpack4(packed).to(torch.int8) - 8
        self.main = dynamic_linear(codes, scales, 4, group_size, bias)
        self.register_buffer("ones", _ones(group_size), persistent=False)
        self.offset = nn.Linear(g, n, bias=False)
        self.offset.weight = nn.Parameter(offsets.to(torch.float32).contiguous(), requires_grad=False)

    def forward(self, x):
        sums = F.linear(x.reshape(-1, self.group_size), self.ones).reshape(*x.shape[:-1], self.groups)
        return self.main(x) + self.offset(sums)


class QuantEmbedding(nn.Module):
    """Embedding from int8 (one scale per row) or packed int4 (one scale per group) codes.

    forward(tokens [1,T], table=None): `table`, when given, is the (codes, scales) pair as
    program inputs (the tied head's XNNPACK blobs); otherwise the module's own buffers.
    """

    def __init__(self, codes: torch.Tensor, scales: torch.Tensor, bits: int, group_size: int, dim: int,
                 offsets: torch.Tensor | None = None):
        super().__init__()
        self.bits, self.group_size, self.dim = bits, group_size, dim
        self.register_buffer("codes", codes.contiguous())
        self.register_buffer("scales", scales.to(torch.float32).contiguous())
        # 4-bit asymmetric (Asym4Linear's grid): w = scales * (u - 8) + offsets, per group
        self.register_buffer("offsets", None if offsets is None else offsets.to(torch.float32).contiguous())
        self.scale = None  # rows times this (model.Embedding's, Gemma's sqrt(dim)), set by whoever replaces one

    def forward(self, tokens, table=None):
        codes, scales, *rest = table if table is not None else (self.codes, self.scales, self.offsets)
        offsets = rest[0] if rest else None
        idx = tokens.reshape(-1)
        rows = codes.index_select(0, idx)
        s = scales.index_select(0, idx).to(torch.float32)
        if self.bits == 4:
            # >>, & are not core ATen (the edge verifier rejects them): div/sub instead.
            r = rows.to(torch.int32)
            hi = torch.div(r, 16, rounding_mode="floor")
            q = torch.stack([r - hi * 16, hi], dim=-1).to(torch.float32) - 8.0  # [T, D/2, 2]
            e = q.reshape(-1, self.dim // self.group_size, self.group_size) * s.unsqueeze(-1)
            if offsets is not None:
                e = e + offsets.index_select(0, idx).unsqueeze(-1)
        else:
            e = rows.to(torch.float32) * s
        e = e.reshape(1, -1, self.dim)
        return e if self.scale is None else e * self.scale

    def dequantized(self) -> torch.Tensor:
        if self.bits == 4:
            q = unpack4(self.codes).to(torch.float32) - 8.0
            e = q.view(q.shape[0], -1, self.group_size) * self.scales.unsqueeze(-1)
            if self.offsets is not None:
                e = e + self.offsets.unsqueeze(-1)
            return e.view(q.shape[0], -1)
        return self.codes.to(torch.float32) * self.scales


def xnnpack_blobs(codes: torch.Tensor, scales: torch.Tensor, bits: int,
                  offsets: torch.Tensor | None = None) -> list[tuple[str, torch.Tensor]]:
    """The (named-data key, tensor) pairs XNNPACK writes for a quantized linear weight
    with these codes (int8 [N,K] signed, or packed uint8 [N,K/2] for 4 bits) and scales;
    with `offsets`, also the fp32 weight of Asym4Linear's offset linear (stored unchanged)."""
    if bits == 4:
        sc = scales.to(torch.bfloat16).contiguous()
    else:
        sc = scales.to(torch.float32).contiguous()
    out = [(sha256_hex(codes), codes.contiguous()), ("scale_" + sha256_hex(sc), sc)]
    if offsets is not None:
        off = offsets.to(torch.float32).contiguous()
        out.append((sha256_hex(off), off))
    return out


def is_quantized_linear(m: nn.Module) -> bool:
    if isinstance(m, Asym4Linear):
        return True
    return isinstance(m, nn.Linear) and type(m.weight).__name__ == "IntxUnpackedToInt8Tensor"



def fuse_linears(linears: list[nn.Module]) -> nn.Module | None:
    """One module that computes linears reading the same input side by side (their output
    columns concatenated, in order), or None when they are not all of one kind with the
    same input width, grouping and bias-or-not. The numerics are the same: per-token
    activation quantization depends on the input only, and each output column keeps its
    own codes, scales and offsets. Export fuses q/k/v and gate/up (fuse_projections):
    in a decode step each call is one XNNPACK activation quantization, GEMM and dispatch."""
    if len(linears) < 2 or len({type(m) for m in linears}) != 1:
        return None
    if len({m.bias is None for m in (lin.main if isinstance(lin, Asym4Linear) else lin for lin in linears)}) != 1:
        return None

    def bias(ms):
        return None if ms[0].bias is None else torch.cat([m.bias.detach() for m in ms])

    if isinstance(linears[0], Asym4Linear):
        if len({m.group_size for m in linears}) != 1:
            return None
        mains = [m.main for m in linears]
        u = torch.cat([m.weight.qdata for m in mains]).to(torch.int16) + 8
        return Asym4Linear(pack4(u), torch.cat([m.weight.scale for m in mains]),
                           torch.cat([m.offset.weight.detach() for m in linears]), linears[0].group_size, bias(mains))
    if type(linears[0]) is not nn.Linear:
        return None
    kinds = {is_quantized_linear(m) for m in linears}
    if kinds == {False}:
        with torch.device("meta"):
            fused = nn.Linear(linears[0].in_features, sum(m.out_features for m in linears), bias=linears[0].bias is not None)
        fused.weight = nn.Parameter(torch.cat([m.weight.detach() for m in linears]), requires_grad=False)
        if fused.bias is not None:
            fused.bias = nn.Parameter(bias(linears), requires_grad=False)
        return fused
    if kinds != {True}:
        return None
    ws = [m.weight for m in linears]
    form = {(w.target_dtype, tuple(w.block_size), w.activation_quantization, w.dtype) for w in ws}
    if len(form) != 1 or any(w.zero_point.any() for w in ws):
        return None
    bits = 4 if ws[0].target_dtype == torch.int4 else 8
    return dynamic_linear(torch.cat([w.qdata for w in ws]), torch.cat([w.scale for w in ws]), bits, ws[0].block_size[1],
                          bias(linears))


def fuse_projections(model: nn.Module) -> int:
    """For export: q/k/v, and gate/up, each become one linear (quant_modules.fuse_linears)
    where they are of one kind, in place; the separate ones are dropped. Returns how many
    fused linears there now are. The checkpoint keeps its per-linear form."""
    from edgectl.model import MLP, Attention

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
