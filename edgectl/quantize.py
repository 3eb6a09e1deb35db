"""Quantize stage (torchao). Filled in by the quantize issue; export calls the hook below."""

from __future__ import annotations

from edgectl.errors import EdgectlError


def apply_recorded_quantization(model, ckpt) -> dict | None:
    """Re-apply the quantization recorded in a `edgectl quantize` output to `model`."""
    if ckpt.quantization is None:
        return None
    raise EdgectlError(f"{ckpt.source}: quantized checkpoints are not supported yet")
