"""Quantization schemes and their records: the scheme names, what each runs as, and a record's summary lines.

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
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from edgectl.util.errors import UsageError

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


EMBEDDING_FOR = {"fp32": "none", "int8": "int8", "8da4w": "int4", "4w": "int4"}


def scheme_for(precision: str, group_size: int):
    """The QuantScheme of a precision label (the labels are quantize's linear schemes)."""
    return QuantScheme(precision, group_size, EMBEDDING_FOR.get(precision, "none"), group_size)


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
