"""The quantize stage: `quantize_checkpoint` (quantize, measure, write), and the quantized model's hooks for export.

Contract used by export.py and shard.py (schemes in scheme.py, quantizing in weights.py):

    scheme = QuantScheme(linear="8da4w", group_size=32, embedding="int4", embedding_group_size=32)
    record = quantize_module(module, scheme)   # in place; returns what was done, per weight

`quantize_checkpoint` writes an `edgectl quantize` directory (quant_checkpoint.py);
`load_for_export` gives export the model of such a directory, or the fp32 model quantized
in memory.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from edgectl.quant.quant_checkpoint import load_quantized_model, save_checkpoint
from edgectl.quant.scheme import LINEAR_SCHEMES, QuantScheme, summarize  # noqa: F401 - LINEAR_SCHEMES: shard.py reads it here
from edgectl.quant.weights import quantize_module, smooth_model
from edgectl.util.errors import EdgectlError, UsageError

Progress = Callable[[str], None]


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
