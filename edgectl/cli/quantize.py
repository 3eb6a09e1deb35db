"""`edgectl quantize`: a model to a quantized checkpoint directory."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from edgectl.cli.app import JsonOpt, RecipeOpt, app, smoothquant_default
from edgectl.util.errors import UsageError


@app.command()
def quantize(
    model: Annotated[str, typer.Argument(help="Hub id, Hugging Face directory or .gguf file (not already quantized).")],
    output: Annotated[Path, typer.Option("--output", "-o", help="Directory to write the quantized checkpoint to.")],
    scheme: Annotated[str, typer.Option(help="int8 (per channel, runs as 8da8w), 8da4w (int8 dynamic activations x 4-bit groupwise "
                                             "weights), or 4w (4-bit groupwise; XNNPACK runs it as 8da4w asymmetric).")],
    group_size: Annotated[int, typer.Option(help="Group size of 4-bit weights (a multiple of 32).")] = 32,
    embedding: Annotated[str, typer.Option(help="Embedding: none, int8 or int4 (a tied output head follows it).")] = "none",
    embedding_group_size: Annotated[int, typer.Option(help="Group size of an int4 embedding.")] = 32,
    mapping: Annotated[str, typer.Option(help="4-bit weights: asymmetric (scale + offset per group; exact on a Q4_1 GGUF's grid) or symmetric (torchao's plain 8da4w).")] = "asymmetric",
    qparams: Annotated[str, typer.Option(help="How symmetric 4-bit scales are chosen: affine (torchao min-max), hqq (torchao), mse (clip search).")] = "affine",
    smoothquant: Annotated[Optional[bool], typer.Option("--smoothquant/--no-smoothquant", help="SmoothQuant for int8 (default on with --scheme int8): per-channel scales move activation outliers into the weights, folded into the norms, v_proj and o_proj (no extra ops). Never for 4-bit schemes (their grid must stay the source's).")] = None,
    smooth_alpha: Annotated[float, typer.Option(help="SmoothQuant's migration strength alpha (0..1).")] = 0.6,
    calibration: Annotated[Optional[Path], typer.Option(help="Text file SmoothQuant is calibrated on (default: a built-in paragraph); not the --eval-file.")] = None,
    calibration_tokens: Annotated[int, typer.Option(min=2, help="Tokens of --calibration to calibrate on.")] = 1024,
    eval_file: Annotated[Optional[Path], typer.Option(help="Text file to measure the accuracy cost on (eager).")] = None,
    eval_tokens: Annotated[int, typer.Option(min=2, help="Tokens of --eval-file to score.")] = 2048,
    json_out: JsonOpt = False,
    recipe: RecipeOpt = None,
):
    """Quantize MODEL into a checkpoint directory that `export` (and `shard`) accept as MODEL.

    Example: edgectl quantize model.gguf -o smollm2-8da4w --scheme 8da4w --embedding int8 --eval-file wiki.test.raw
    """
    from edgectl.util import ui
    from edgectl.checkpoint.checkpoint import resolve
    from edgectl.quant.quantize import QuantScheme, quantize_checkpoint

    qs = QuantScheme(scheme, group_size, embedding, embedding_group_size, qparams, mapping,
                     smoothquant=smoothquant_default(scheme, smoothquant), smooth_alpha=smooth_alpha)
    if calibration is not None and not qs.smoothquant:
        raise UsageError("--calibration calibrates SmoothQuant: it goes with --scheme int8 and --smoothquant")
    ckpt = resolve(model)
    with ui.stages(f"quantizing {model}") as step:
        res = quantize_checkpoint(ckpt, output, qs, eval_file, eval_tokens, progress=step,
                                  calibration=calibration, calibration_tokens=calibration_tokens)
    for line in res.summary:
        ui.info(f"  {line}")
    if json_out:
        ui.emit_json(res.to_dict(with_record=False))
        return
    typer.echo(f"{res.path}  {res.bytes / 1e6:.1f} MB (fp32 weights {res.source_bytes / 1e6:.1f} MB)  "
               f"{res.seconds:.1f}s ({res.cpu_seconds:.0f} CPU-s)")
    a = res.accuracy
    if a is None:
        ui.info("accuracy not measured (pass --eval-file)")
    else:
        typer.echo(f"perplexity {a['ppl_ref']:.3f} -> {a['ppl_quant']:.3f} ({a['ppl_change']:+.2%})  "
                   f"mean KL {a['kl_mean']:.4f}  top-1 agreement {a['top1_agree']:.1%}  ({a['tokens_scored']} tokens, eager)")
