"""Choosing torchao codes for each weight, and quantizing a model's linears and embedding in place with a record of what was done.

    scheme = QuantScheme(linear="8da4w", group_size=32, embedding="int4", embedding_group_size=32)
    record = quantize_module(module, scheme)   # in place; returns what was done, per weight

`record` is JSON-serialisable and names every linear's actual treatment (including any
linear whose width is not a multiple of the group size, which is never skipped silently).
A linear whose input width no valid group size divides is kept at 8 bits ("8da8w"), and
the record says so. A tied embedding/output matrix takes the --embedding treatment.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from edgectl.quant.scheme import FORMAT, GROUP_MULTIPLE, RUNS_AS, SCHEME_FORM, QuantScheme
from edgectl.util.env import quiet_import_logs
from edgectl.util.errors import UsageError


# ---------------------------------------------------------------------------------------
# Choosing codes (torchao) for one weight


def pick_group(width: int, group_size: int) -> tuple[int | None, str | None]:
    """The group size to use for a weight of input width `width`, and why if not the one asked.
    None: no multiple of 32 divides `width` (the caller keeps it at 8 bits)."""
    if width % group_size == 0:
        return group_size, None
    for g in range(group_size - GROUP_MULTIPLE, 0, -GROUP_MULTIPLE):
        if width % g == 0:
            return g, f"input width {width} is not a multiple of {group_size}: group size {g}"
    return None, f"input width {width} is not a multiple of {group_size} nor of any smaller multiple of 32: kept at 8-bit per channel"


def codes_int8(w):
    """Symmetric int8, one scale per row: (codes int8 [N,K], scales fp32 [N,1])."""
    import torch
    from torchao.quantization.quantize_.workflows.intx.intx_unpacked_to_int8_tensor import IntxUnpackedToInt8Tensor

    t = IntxUnpackedToInt8Tensor.from_hp(w.detach().float(), (1, w.shape[1]), torch.int8)
    return t.qdata.clone(), t.scale.float().reshape(w.shape[0], 1).clone()


def codes_int4(w, group_size: int, qparams: str = "affine"):
    """Symmetric int4 groupwise: (codes int8 in -8..7 [N,K], scales fp32 [N,K/gs]).
    Scales are rounded to bfloat16 (what XNNPACK stores) and the codes chosen for them."""
    import torch
    from torchao.quantization.quantize_.workflows.intx.intx_unpacked_to_int8_tensor import (
        IntxChooseQParamsAlgorithm,
        IntxUnpackedToInt8Tensor,
    )

    from edgectl.quant.quant_modules import bf16_round

    w = w.detach().float()
    if qparams == "mse":
        scale = _mse_scales(w, group_size)
    else:
        algo = IntxChooseQParamsAlgorithm.HQQ_SCALE_ONLY if qparams == "hqq" else IntxChooseQParamsAlgorithm.AFFINE
        t = IntxUnpackedToInt8Tensor.from_hp(w, (1, group_size), torch.int4, intx_choose_qparams_algorithm=algo)
        scale = bf16_round(t.scale.float().reshape(w.shape[0], -1))
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    t = IntxUnpackedToInt8Tensor.from_hp(
        w, (1, group_size), torch.int4, intx_choose_qparams_algorithm=None,
        custom_scale=scale, custom_zero_point=torch.zeros_like(scale, dtype=torch.int8),
    )
    return t.qdata.clone(), scale


def _mse_scales(w, group_size: int):
    """Per group, the bf16 scale among 20 clipping ratios of max|w| whose symmetric int4
    codes give the least squared error."""
    import torch

    n, k = w.shape
    g = w.view(n, k // group_size, group_size)
    amax = g.abs().amax(-1, keepdim=True).clamp_min(1e-12)
    best_e = best_s = None
    for r in torch.linspace(0.70, 1.175, 20).tolist():
        s = (amax * r / 8).to(torch.bfloat16).float()
        e = ((g / s).round().clamp(-8, 7) * s - g).pow(2).sum(-1, keepdim=True)
        if best_e is None:
            best_e, best_s = e, s
        else:
            better = e < best_e
            best_e, best_s = torch.where(better, e, best_e), torch.where(better, s, best_s)
    return best_s.view(n, -1)


def codes_asym4(w, group_size: int):
    """Asymmetric 4-bit groupwise: (packed uint8 [N,K/2], scales [N,G], offsets [N,G]) with
    w ~ scales * (u - 8) + offsets. Codes from the min-max grid (exact for a Q4_1 source),
    then scale and offset refitted by least squares for those codes, scale in bfloat16."""
    import torch

    from edgectl.quant.quant_modules import bf16_round, pack4

    w = w.detach().float()
    n, k = w.shape
    g = w.view(n, k // group_size, group_size)
    lo, hi = g.amin(-1, keepdim=True), g.amax(-1, keepdim=True)
    step = ((hi - lo) / 15).clamp_min(1e-12)
    u = ((g - lo) / step).round().clamp(0, 15)
    # least squares s, c for w ~ s*u + c given u (same codes; a tighter fit than min-max)
    um, wm = u.mean(-1, keepdim=True), g.mean(-1, keepdim=True)
    var = ((u - um) ** 2).sum(-1, keepdim=True)
    s = torch.where(var > 0, ((u - um) * (g - wm)).sum(-1, keepdim=True) / var.clamp_min(1e-12), step)
    s = bf16_round(s)
    s = torch.where(s > 0, s, torch.ones_like(s))
    c = (g - s * (u - 8)).mean(-1, keepdim=True)
    return pack4(u.view(n, k).to(torch.uint8)), s.view(n, -1), c.view(n, -1)


# ---------------------------------------------------------------------------------------
# Quantizing a module in place


def _linears(module):
    from torch import nn

    return [(name, m) for name, m in module.named_modules() if isinstance(m, nn.Linear)]


def _set(module, name: str, value) -> None:
    owner, _, leaf = name.rpartition(".")
    setattr(module.get_submodule(owner) if owner else module, leaf, value)


def _quantize_linear(lin, scheme: QuantScheme) -> tuple[object, dict]:
    """One nn.Linear -> (its quantized replacement, its record entry)."""
    from edgectl.quant.quant_modules import Asym4Linear, dynamic_linear

    w, bias = lin.weight, lin.bias
    form, gs, note = SCHEME_FORM[scheme.linear], None, None
    if form == "8da4w" and scheme.asymmetric4:
        form = "a4w"
    if form in ("8da4w", "a4w"):
        gs, note = pick_group(w.shape[1], scheme.group_size)
        if gs is None:
            form = "8da8w"
    if form == "8da8w":
        codes, scales = codes_int8(w)
        new, entry = dynamic_linear(codes, scales, 8, w.shape[1], bias), {"bits": 8, "group_size": None}
    elif form == "8da4w":
        codes, scales = codes_int4(w, gs, scheme.qparams)
        new, entry = dynamic_linear(codes, scales, 4, gs, bias), {"bits": 4, "group_size": gs}
    else:
        packed, scales, offsets = codes_asym4(w, gs)
        new, entry = Asym4Linear(packed, scales, offsets, gs, bias), {"bits": 4, "group_size": gs}
    return new, {"form": form, **entry, "shape": list(w.shape), "note": note}


def _embedding(weight, scheme: QuantScheme, tied: bool) -> tuple[dict, object, object, str | None]:
    """(record entry, QuantEmbedding, tied head or None, the head's form) for an embedding
    matrix; a tied head is built from the very same codes, so the matrix is stored once."""
    import torch

    from edgectl.quant.quant_modules import Asym4Linear, QuantEmbedding, dynamic_linear, pack4

    bits, note, gs = (8 if scheme.embedding == "int8" else 4), None, None
    if bits == 4:
        gs, note = pick_group(weight.shape[1], scheme.embedding_group_size)
        if gs is None:
            bits = 8
    head = head_form = None
    if bits == 8:
        codes, scales = codes_int8(weight)
        emb, form = QuantEmbedding(codes, scales, 8, weight.shape[1], weight.shape[1]), "emb_int8"
        if tied:
            head, head_form = dynamic_linear(codes, scales, 8, weight.shape[1]), "8da8w"
    elif scheme.asymmetric4:
        packed, scales, offsets = codes_asym4(weight, gs)
        emb, form = QuantEmbedding(packed, scales, 4, gs, weight.shape[1], offsets), "emb_a4"
        if tied:
            head, head_form = Asym4Linear(packed, scales, offsets, gs), "a4w"
    else:
        codes, scales = codes_int4(weight, gs, scheme.qparams)
        packed = pack4((codes.to(torch.int16) + 8).to(torch.uint8))
        emb, form = QuantEmbedding(packed, scales, 4, gs, weight.shape[1]), "emb_int4"
        if tied:
            head, head_form = dynamic_linear(codes, scales, 4, gs), "8da4w"
    entry = {"form": form, "bits": bits, "group_size": gs if bits == 4 else None,
             "shape": list(weight.shape), "note": note}
    return entry, emb, head, head_form


def smooth_model(model, ckpt, scheme: QuantScheme, calibration: Path | None = None,
                 calibration_tokens: int = 1024) -> dict | None:
    """With `scheme.smoothquant`: fold SmoothQuant scales into the fp32 `model` (a whole
    Transformer, in place; its fp32 outputs are unchanged up to rounding), calibrated on
    `calibration` (a text file; None: edgectl's built-in paragraph). Returns what was done,
    for quantize_module's record; None when the scheme does not smooth."""
    if not scheme.smoothquant:
        return None
    from edgectl.quant import smoothquant as sq

    wins, what = sq.calibration_windows(ckpt, calibration, calibration_tokens, model.max_seq_len)
    info = sq.smooth(model, sq.calibrate(model, wins), scheme.smooth_alpha, sq.DEFAULT_PAIRS)
    return {"alpha": scheme.smooth_alpha, **info,
            "calibration": {"text": what, "tokens": sum(len(w) for w in wins), "windows": len(wins)}}


def quantize_module(module, scheme: QuantScheme, progress: Callable[[int, int], None] | None = None,
                    smoothed: dict | None = None) -> dict:
    """Quantize `module`'s linears (and embedding) in place; return the record.

    `module` is a whole `Transformer` or any part of one (a `Block` for per-layer shards).
    Names in the record are relative to `module`. `progress(done, total)` after each weight.
    A scheme with smoothquant needs `smoothed`: smooth_model's answer for `module`, recorded.
    """
    quiet_import_logs()
    from edgectl.model import Transformer

    if scheme.smoothquant and smoothed is None:
        raise ValueError("scheme.smoothquant: smooth the model first (smooth_model) and pass its answer as smoothed=")
    record = {"format": FORMAT, "scheme": scheme.to_dict(), "weights": {}, "runs_as": {}}
    if smoothed is not None:
        record["smoothquant"] = smoothed
    if scheme.is_identity:
        return record
    tied = isinstance(module, Transformer) and module.args.tie_embeddings
    linears = _linears(module)
    if tied:
        linears = [(n, m) for n, m in linears if n != "head.lm_head"]
    if scheme.linear in ("8da4w", "4w") and linears and not any(
            m.weight.shape[1] % scheme.group_size == 0 for _, m in linears):
        widths = sorted({m.weight.shape[1] for _, m in linears})
        raise UsageError(f"--group-size {scheme.group_size} divides none of the linear input widths {widths}",
                         hint="pick a group size that divides them (32 usually does)")
    has_embedding = isinstance(module, Transformer)
    total = len(linears) + int(has_embedding)
    done = 0
    weights = record["weights"]

    if scheme.linear != "fp32":
        for name, lin in linears:
            new, entry = _quantize_linear(lin, scheme)
            _set(module, name, new)
            weights[name] = entry
            done += 1
            if progress:
                progress(done, total)
    else:
        for name, lin in linears:
            weights[name] = {"form": "fp32", "shape": list(lin.weight.shape), "note": None}

    if has_embedding:
        emb_w = module.embed.embed_tokens.weight
        if scheme.embedding == "none":
            weights["embed.embed_tokens"] = {"form": "fp32", "shape": list(emb_w.shape), "note": None}
            if tied:
                weights["head.lm_head"] = {"form": "fp32", "shape": list(emb_w.shape), "tied_to": "embed.embed_tokens",
                                           "note": "tied to the embedding, which --embedding none keeps fp32"}
        else:
            scale = module.embed.scale  # Gemma's sqrt(dim), kept by the quantized table
            entry, module.embed, head, head_form = _embedding(emb_w, scheme, tied)
            module.embed.scale = scale
            weights["embed.embed_tokens"] = entry
            if tied:
                module.head.lm_head = head
                weights["head.lm_head"] = {
                    "form": head_form, "bits": entry["bits"], "group_size": entry["group_size"],
                    "shape": entry["shape"], "tied_to": "embed.embed_tokens",
                    "note": "tied to the embedding: same codes, stored once",
                }
        done += 1
        if progress:
            progress(done, total)
    record["runs_as"] = {f: RUNS_AS[f] for f in sorted({w["form"] for w in weights.values()})}
    return record
