"""Quantize stage (torchao codes, ExecuTorch XNNPACK execution forms).

Contract used by export.py and shard.py:

    scheme = QuantScheme(linear="8da4w", group_size=32, embedding="int4", embedding_group_size=32)
    record = quantize_module(module, scheme)   # in place; returns what was done, per weight

`record` is JSON-serialisable and names every linear's actual treatment (including any
linear whose width is not a multiple of the group size, which is never skipped silently).

What each scheme name runs as (see quant_modules.py for the forms):
    int8   -> "8da8w": int8 weights, one scale per output channel, int8 dynamic activations
              (XNNPACK qd8-f32-qc8w). torchao's weight-only int8 lowers to wrong results
              in ExecuTorch 1.4.1, so weight-only is not offered as such.
    8da4w  -> int8 dynamic activations x 4-bit groupwise weights, with --mapping:
              asymmetric (default) -> "a4w": scale + offset per group (torchao's
              MappingType.ASYMMETRIC; the llama.cpp Q4_1 grid), run as qb4w on the centred
              codes plus an fp32 linear over per-group input sums carrying the offsets;
              symmetric -> "8da4w": torchao's symmetric int4 (plain qd8-f32-qb4w).
    4w     -> "a4w" as well: XNNPACK has no fp32 x 4-bit groupwise kernel, so 4-bit
              "weight-only" runs with int8 dynamic activations like 8da4w asymmetric.
The asymmetric grid matters for GGUF sources such as SmolLM2's Q4_1 release: its weights
already sit on an asymmetric 4-bit grid of group 32, which "a4w" reproduces exactly.
A linear whose input width no valid group size divides is kept at 8 bits ("8da8w"), and
the record says so. A tied embedding/output matrix takes the --embedding treatment.

`quantize_checkpoint` writes an `edgectl quantize` directory: model.safetensors with the
integer codes and scales, config/tokenizer files, and `edgectl_quant.json` (this record,
source model and hash, library versions). `load_quantized_model` rebuilds the modules from
those stored tensors; nothing is re-quantized at export.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from edgectl.util.version import __version__

from edgectl.util.env import quiet_import_logs
from edgectl.util.errors import EdgectlError, UsageError

LINEAR_SCHEMES = ("fp32", "int8", "8da4w", "4w")
EMBEDDING_SCHEMES = ("none", "int8", "int4")
QPARAMS = ("affine", "hqq", "mse")
MAPPINGS = ("asymmetric", "symmetric")
FORMAT = "edgectl-quant/1"
QUANT_FILE = "edgectl_quant.json"
GROUP_MULTIPLE = 32  # XNNPACK's blockwise kernels take group sizes that are multiples of 32

RUNS_AS = {
    "fp32": "fp32 (XNNPACK f32 gemm)",
    "8da8w": "XNNPACK qd8-f32-qc8w: int8 per-token dynamic activations x int8 weights, one fp32 scale per output channel",
    "8da4w": "XNNPACK qd8-f32-qb4w: int8 per-token dynamic activations x int4 weights, one bf16 scale per group",
    "a4w": "4-bit asymmetric groupwise weights (scale + offset per group): XNNPACK qd8-f32-qb4w on the "
           "centred codes plus an fp32 linear over per-group input sums carrying the offsets",
    "emb_int8": "int8 rows, one scale per row: gather + dequantize of the looked-up rows (portable ops)",
    "emb_int4": "int4 groupwise rows, packed two per byte: gather + dequantize of the looked-up rows (portable ops)",
    "emb_a4": "4-bit asymmetric groupwise rows (scale + offset per group), packed two per byte: gather + "
              "dequantize of the looked-up rows (portable ops)",
}
SCHEME_FORM = {"int8": "8da8w", "8da4w": "8da4w", "4w": "a4w"}

Progress = Callable[[str], None]


@dataclass(frozen=True)
class QuantScheme:
    linear: str = "fp32"  # fp32 | int8 (per channel; runs as 8da8w) | 8da4w | 4w
    group_size: int = 32
    embedding: str = "none"  # none | int8 | int4
    embedding_group_size: int = 32
    qparams: str = "affine"  # 4-bit symmetric scales: affine (torchao min-max) | hqq (torchao, scale only) | mse (clip search)
    mapping: str = "asymmetric"  # 4-bit weights (8da4w linears, int4 embedding): asymmetric | symmetric
    smoothquant: bool = False  # int8 only: SmoothQuant scales folded into the fp32 model first (smoothquant.py)
    smooth_alpha: float = 0.6  # s_j = max|X_j|^alpha / max|W_j|^(1 - alpha)

    def __post_init__(self):
        if self.linear not in LINEAR_SCHEMES:
            raise UsageError(f"unknown scheme {self.linear!r}", hint=f"choose one of: {', '.join(LINEAR_SCHEMES[1:])}")
        if self.embedding not in EMBEDDING_SCHEMES:
            raise UsageError(f"unknown embedding scheme {self.embedding!r}", hint=f"choose one of: {', '.join(EMBEDDING_SCHEMES)}")
        if self.mapping not in MAPPINGS:
            raise UsageError(f"unknown mapping {self.mapping!r}", hint=f"choose one of: {', '.join(MAPPINGS)}")
        if self.qparams not in QPARAMS:
            raise UsageError(f"unknown qparams algorithm {self.qparams!r}", hint=f"choose one of: {', '.join(QPARAMS)}")
        if self.smoothquant and self.linear != "int8":
            raise UsageError(f"--smoothquant applies to --scheme int8 only, not {self.linear}",
                             hint="4-bit asymmetric weights reproduce a Q4_1 source grid exactly; rescaled columns would leave it")
        if not 0 < self.smooth_alpha < 1:
            raise UsageError(f"--smooth-alpha {self.smooth_alpha}: must be between 0 and 1")
        for flag, gs in (("--group-size", self.group_size), ("--embedding-group-size", self.embedding_group_size)):
            if gs <= 0 or gs % GROUP_MULTIPLE:
                raise UsageError(f"{flag} {gs}: must be a positive multiple of {GROUP_MULTIPLE}",
                                 hint="XNNPACK's 4-bit kernels take groups of 32, 64, 128, ...")

    def to_dict(self) -> dict:
        return asdict(self)

    @property
    def asymmetric4(self) -> bool:
        """4-bit weights on the asymmetric grid ("4w" always is)."""
        return self.linear == "4w" or self.mapping == "asymmetric"

    @property
    def is_identity(self) -> bool:
        return self.linear == "fp32" and self.embedding == "none"


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
            entry, module.embed, head, head_form = _embedding(emb_w, scheme, tied)
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


def summarize(record: dict) -> list[str]:
    """One line per distinct treatment, plus every weight with a note (for the CLI)."""
    from collections import Counter

    counts = Counter((w["form"], w.get("group_size")) for w in record["weights"].values())
    lines = [f"{n:4d} x {form}" + (f" g{gs}" if gs else "") for (form, gs), n in sorted(counts.items(), key=str)]
    sm = record.get("smoothquant")
    if sm:
        from edgectl.quant.smoothquant import PAIR_NAMES

        cal = sm["calibration"]
        lines.append(f"smoothquant alpha {sm['alpha']} on {', '.join(PAIR_NAMES[p] for p in sm['pairs'])} "
                     f"({sm['layers']} layers; scales {sm['min_scale']:.3g}..{sm['max_scale']:.3g}), folded into "
                     f"the fp32 weights; calibrated on {cal['tokens']} tokens of {cal['text']}")
    lines += [f"{name}: {w['note']}" for name, w in record["weights"].items() if w.get("note") and "tied_to" not in w]
    return lines


# ---------------------------------------------------------------------------------------
# Checkpoint directory: save and load


def ours_to_hf(name: str) -> str:
    """Module path in model.py's tree -> Hugging Face key prefix (inverse of hf_key_to_ours)."""
    if name == "embed.embed_tokens":
        return "model.embed_tokens"
    if name == "head.norm":
        return "model.norm"
    if name == "head.lm_head":
        return "lm_head"
    return "model." + name


def quantized_state(model, record: dict) -> dict:
    """The tensors to store: integer codes and scales of quantized weights, the rest fp32."""
    import torch

    from edgectl.quant.quant_modules import Asym4Linear, QuantEmbedding

    out, skip = {}, set()
    for name, w in record["weights"].items():
        if w["form"] == "fp32":
            continue
        if "tied_to" in w:
            skip.add(name)  # rebuilt from its embedding's codes
            continue
        base = ours_to_hf(name)
        mod = model.embed if name == "embed.embed_tokens" else model.get_submodule(name)
        skip.add(name)
        if isinstance(mod, QuantEmbedding):
            out[base + ".qweight"], out[base + ".scales"] = mod.codes, mod.scales
            if mod.offsets is not None:
                out[base + ".offsets"] = mod.offsets
            continue
        lin = mod.main if isinstance(mod, Asym4Linear) else mod
        codes, scales = lin.weight.qdata, lin.weight.scale
        if w["bits"] == 4:
            from edgectl.quant.quant_modules import pack4

            codes = pack4((codes.to(torch.int16) + 8).to(torch.uint8))
        out[base + ".qweight"], out[base + ".scales"] = codes, scales
        if isinstance(mod, Asym4Linear):
            out[base + ".offsets"] = mod.offset.weight.detach()
        if lin.bias is not None:
            out[base + ".bias"] = lin.bias.detach()
    seen = set()
    for pname, p in model.named_parameters(remove_duplicate=False):
        owner = pname.rpartition(".")[0]
        if owner in skip or any(owner.startswith(s + ".") for s in skip) or id(p) in seen:
            continue
        seen.add(id(p))
        out[ours_to_hf(owner) + "." + pname.rpartition(".")[2]] = p.detach()
    return {k: v.contiguous() for k, v in out.items()}


def _versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    out = {"edgectl": __version__}
    for pkg in ("torch", "torchao", "executorch"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = None
    return out


def save_checkpoint(ckpt, model, record: dict, out_dir: Path, accuracy: dict | None) -> int:
    """Write the quantized checkpoint directory atomically; return its size in bytes."""
    from safetensors.torch import save_file

    out_dir = Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()) and not (out_dir / QUANT_FILE).exists():
        raise EdgectlError(f"{out_dir}: exists and is not an edgectl quantize output", hint="choose another -o")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.with_name(f".{out_dir.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir()
        save_file(quantized_state(model, record), str(tmp / "model.safetensors"), metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(ckpt.config, indent=2) + "\n")
        (tmp / "tokenizer.json").write_text(ckpt.tokenizer_json)
        (tmp / "tokenizer_config.json").write_text(json.dumps(ckpt.tokenizer_config, indent=2) + "\n")
        full = {
            **record,
            "source": {"model": ckpt.source, "sha256": ckpt.content_hash(), "kind": ckpt.kind,
                       "gguf_quant": ckpt.extra.get("gguf_quant")},
            "versions": _versions(),
            "accuracy": accuracy,
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        (tmp / QUANT_FILE).write_text(json.dumps(full, indent=2, default=str) + "\n")
        from edgectl.util.files import replace_dir

        replace_dir(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return sum(f.stat().st_size for f in out_dir.iterdir())


def apply_recorded_quantization(model, ckpt) -> dict | None:
    """Re-create the quantized modules recorded in an `edgectl quantize` output in `model`
    (built on the meta device or not) from the stored codes, and load every other weight.
    Returns the record, or None for a checkpoint that is not quantized."""
    if ckpt.quantization is None:
        return None
    quiet_import_logs()
    import torch

    from edgectl.checkpoint.checkpoint import hf_key_to_ours
    from edgectl.quant.quant_modules import Asym4Linear, QuantEmbedding, dynamic_linear, unpack4

    rec = ckpt.quantization
    if rec.get("format") != FORMAT:
        raise EdgectlError(f"{ckpt.source}: {QUANT_FILE} has format {rec.get('format')!r}, expected {FORMAT!r}",
                           hint="re-run `edgectl quantize` with this edgectl version")
    tensors = dict(ckpt.tensors())

    def take(key):
        if key not in tensors:
            raise EdgectlError(f"{ckpt.source}: {key} is missing from the quantized weights")
        return tensors.pop(key)

    def signed(codes, bits):
        return (unpack4(codes).to(torch.int16) - 8).to(torch.int8) if bits == 4 else codes

    built = {}
    for name, w in rec["weights"].items():
        form = w["form"]
        if form == "fp32" or "tied_to" in w:
            continue
        base = ours_to_hf(name)
        codes, scales = take(base + ".qweight"), take(base + ".scales")
        if form.startswith("emb_"):
            gs = w["group_size"] or w["shape"][1]
            offsets = take(base + ".offsets") if form == "emb_a4" else None
            model.embed = QuantEmbedding(codes, scales, w["bits"], gs, w["shape"][1], offsets)
            built[name] = (codes, scales, w["bits"], gs, offsets)
            continue
        bias = tensors.pop(base + ".bias", None)
        if form == "a4w":
            new = Asym4Linear(codes, scales, take(base + ".offsets"), w["group_size"], bias)
        elif form in ("8da4w", "8da8w"):
            new = dynamic_linear(signed(codes, w["bits"]), scales, w["bits"], w["group_size"] or w["shape"][1], bias)
        else:
            raise EdgectlError(f"{ckpt.source}: unknown quantized form {form!r} for {name}")
        _set(model, name, new)
    for name, w in rec["weights"].items():
        if "tied_to" in w and w["form"] != "fp32":
            codes, scales, bits, gs, offsets = built[w["tied_to"]]
            if offsets is not None:
                _set(model, name, Asym4Linear(codes, scales, offsets, gs))
            else:
                _set(model, name, dynamic_linear(signed(codes, bits), scales, bits, gs))
    params = dict(model.named_parameters())
    for key, t in tensors.items():
        ours = hf_key_to_ours(key)
        if ours in params:
            if tuple(t.shape) != tuple(params[ours].shape):
                raise EdgectlError(f"{ckpt.source}: {key} has shape {tuple(t.shape)}, expected {tuple(params[ours].shape)}")
            _set(model, ours, torch.nn.Parameter(t.to(torch.float32), requires_grad=False))
    if model.args.tie_embeddings and isinstance(getattr(model.embed, "embed_tokens", None), torch.nn.Embedding):
        model.head.lm_head.weight = model.embed.embed_tokens.weight
    missing = [n for n, p in model.named_parameters() if p.is_meta]
    if missing:
        raise EdgectlError(f"{ckpt.source}: quantized checkpoint is missing {len(missing)} weights, e.g. {missing[0]}")
    return rec


def load_quantized_model(ckpt, max_seq_len: int | None = None):
    """Build the model of an `edgectl quantize` output from its stored codes: (model, record)."""
    import torch

    from edgectl.model import Transformer

    args = ckpt.args
    max_seq_len = max_seq_len or min(args.max_position_embeddings, 2048)
    with torch.device("meta"):
        model = Transformer(args, max_seq_len)
    rec = apply_recorded_quantization(model, ckpt)
    for m in model.modules():  # RoPE tables, as checkpoint.load_model does after a meta build
        if hasattr(m, "reset_tables"):
            m.reset_tables()
    return model.eval(), rec


# ---------------------------------------------------------------------------------------
# The stage


@dataclass
class QuantizeResult:
    path: str
    bytes: int
    source_bytes: int
    seconds: float
    cpu_seconds: float
    scheme: dict
    summary: list[str]
    accuracy: dict | None = None
    record: dict = field(default_factory=dict, repr=False)

    def to_dict(self, with_record: bool = False) -> dict:
        d = {k: v for k, v in self.__dict__.items() if k != "record"}
        if with_record:
            d["record"] = self.record
        return d


def quantize_checkpoint(ckpt, out_dir: Path, scheme: QuantScheme, eval_file: Path | None = None,
                        eval_tokens: int = 2048, progress: Progress | None = None,
                        weight_progress: Callable[[int, int], None] | None = None,
                        calibration: Path | None = None, calibration_tokens: int = 1024) -> QuantizeResult:
    """Quantize `ckpt`, measure the cost on `eval_file` (eager), write `out_dir`.
    `calibration` (text file; None: built-in paragraph) calibrates scheme.smoothquant."""
    import copy

    from edgectl.checkpoint.checkpoint import load_model

    t0, c0 = time.perf_counter(), time.process_time()
    step = progress or (lambda s: None)
    if ckpt.quantization is not None:
        sch = ckpt.quantization.get("scheme", {})
        raise EdgectlError(f"{ckpt.source} is already quantized ({sch.get('linear')}, embedding {sch.get('embedding')})",
                           hint="quantize the original model instead")
    if scheme.is_identity:
        raise UsageError("nothing to do: --scheme fp32 with --embedding none", hint="choose int8, 8da4w or 4w")
    if eval_file is not None and not Path(eval_file).is_file():
        raise EdgectlError(f"{eval_file}: no such file")
    window = min(512, ckpt.args.max_position_embeddings)
    step("loading weights")
    model = load_model(ckpt, window)
    src_bytes = sum(p.numel() * 4 for p in {id(p): p for p in model.parameters()}.values())
    ref = copy.deepcopy(model) if eval_file is not None else None
    smoothed = None
    if scheme.smoothquant:
        step("calibrating smoothquant")
        smoothed = smooth_model(model, ckpt, scheme, calibration, calibration_tokens)
    step("quantizing")
    record = quantize_module(model, scheme, weight_progress, smoothed)
    accuracy = None
    if ref is not None:
        from edgectl.quant.quant_eval import compare

        step(f"measuring accuracy on {eval_tokens} tokens")
        accuracy = compare(ref, model, ckpt, Path(eval_file), eval_tokens, window)
        del ref
    step("writing")
    size = save_checkpoint(ckpt, model, record, out_dir, accuracy)
    return QuantizeResult(str(out_dir), size, src_bytes, time.perf_counter() - t0, time.process_time() - c0,
                          scheme.to_dict(), summarize(record), accuracy, record)


# ---------------------------------------------------------------------------------------
# Hooks for export


def load_for_export(ckpt, max_seq_len: int, scheme: QuantScheme | None, backend: str, progress: Progress | None = None,
                    calibration: Path | None = None, calibration_tokens: int = 1024):
    """(model, record or None): a quantized checkpoint rebuilt from its codes, or the fp32
    model quantized in memory when `scheme` is given (the `export --scheme` shortcut;
    `calibration` as in quantize_checkpoint)."""
    from edgectl.checkpoint.checkpoint import load_model

    step = progress or (lambda s: None)
    if ckpt.quantization is not None and scheme is not None:
        raise UsageError(f"{ckpt.source} is already quantized; drop --scheme", hint="or export the original model with --scheme")
    quantized = ckpt.quantization is not None or (scheme is not None and not scheme.is_identity)
    if quantized and backend != "xnnpack":
        raise EdgectlError(f"quantized models export with --backend xnnpack only, not {backend}",
                           hint="the other backends here have no kernels for torchao's quantized linears")
    if ckpt.quantization is not None:
        return load_quantized_model(ckpt, max_seq_len)
    model = load_model(ckpt, max_seq_len)
    if not quantized:
        return model, None
    smoothed = None
    if scheme.smoothquant:
        step("calibrating smoothquant")
        smoothed = smooth_model(model, ckpt, scheme, calibration, calibration_tokens)
    step(f"quantizing ({scheme.linear})")
    return model, quantize_module(model, scheme, smoothed=smoothed)


def shared_embedding(model):
    """For a tied matrix quantized as embedding + head: ((codes, scales) example inputs,
    spec) where spec names the head's XNNPACK blobs the runtime maps as those inputs.
    Drops the embedding's own buffers (for export only). None when the embedding is not a
    tied quantized one."""
    from edgectl.quant.quant_modules import QuantEmbedding, xnnpack_blobs

    emb = model.embed
    if not (model.args.tie_embeddings and isinstance(emb, QuantEmbedding)):
        return None
    blobs = xnnpack_blobs(emb.codes, emb.scales, emb.bits, emb.offsets)
    spec = {"tensors": [{"key": k, "shape": list(t.shape), "dtype": str(t.dtype).removeprefix("torch.")} for k, t in blobs]}
    # The program reads the inputs; its own copy would still be stored as an unused constant.
    emb.register_buffer("codes", None)
    emb.register_buffer("scales", None)
    emb.register_buffer("offsets", None)
    # Clones: an example input aliasing a parameter breaks the head's delegation.
    return tuple(t.clone() for _, t in blobs), spec


def check_shared_embedding(path: Path, spec: dict) -> None:
    import torch

    from edgectl.formats.ptefile import named_data

    blobs = named_data(path)
    for t in spec["tensors"]:
        n = torch.empty(0, dtype=getattr(torch, t["dtype"])).element_size()
        for d in t["shape"]:
            n *= d
        if t["key"] not in blobs or blobs[t["key"]][1] < n:
            raise EdgectlError(f"{path}: the quantized output head was not stored where the runtime can share it as the embedding")


EMBEDDING_FOR = {"fp32": "none", "int8": "int8", "8da4w": "int4", "4w": "int4"}


def scheme_for(precision: str, group_size: int):
    """The QuantScheme of a precision label (the labels are quantize's linear schemes)."""
    from edgectl.quant.quantize import QuantScheme

    return QuantScheme(precision, group_size, EMBEDDING_FOR.get(precision, "none"), group_size)
