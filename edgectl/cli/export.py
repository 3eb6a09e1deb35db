"""`edgectl export`: a model to a self-contained .pte."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.markup import escape

from edgectl.backends.registry import HELP as BACKEND_HELP
from edgectl.cli.app import JsonOpt, RecipeOpt, app, smoothquant_default
from edgectl.util.errors import EdgectlError, UsageError


@app.command()
def export(
    model: Annotated[str, typer.Argument(help="Hub id, Hugging Face directory or .gguf file.")],
    output: Annotated[Path, typer.Option("--output", "-o", help="Where to write the .pte.")],
    backend: Annotated[str, typer.Option(help=escape(BACKEND_HELP))] = "xnnpack",
    max_seq_len: Annotated[Optional[int], typer.Option(help="KV cache length (default: min(model's, 2048)).")] = None,
    prefill_chunk: Annotated[Optional[int], typer.Option(help="Most tokens per call (default 128): bounds activation memory; longer prompts run in chunks.")] = None,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Print delegated vs non-delegated op counts.")] = False,
    scheme: Annotated[Optional[str], typer.Option(help="Quantize in memory first: int8, 8da4w or 4w (see `edgectl quantize`).")] = None,
    group_size: Annotated[int, typer.Option(help="With --scheme: 4-bit group size.")] = 32,
    embedding: Annotated[str, typer.Option(help="With --scheme: embedding none, int8 or int4.")] = "none",
    embedding_group_size: Annotated[int, typer.Option(help="With --scheme: int4 embedding group size.")] = 32,
    mapping: Annotated[str, typer.Option(help="With --scheme: 4-bit weights: asymmetric (scale + offset per group; exact on a Q4_1 GGUF's grid) or symmetric (torchao's plain 8da4w).")] = "asymmetric",
    smoothquant: Annotated[Optional[bool], typer.Option("--smoothquant/--no-smoothquant", help="With --scheme int8: per-channel scales move activation outliers into the weights, folded into the norms, v_proj and o_proj (no extra ops). Default on for int8.")] = None,
    smooth_alpha: Annotated[float, typer.Option(help="SmoothQuant's migration strength alpha (0..1).")] = 0.6,
    calibration: Annotated[Optional[Path], typer.Option(help="Text file SmoothQuant is calibrated on (default: a built-in paragraph).")] = None,
    plan: Annotated[Optional[Path], typer.Option("--plan", help="Per-layer precisions from a plan JSON (`edgectl run SHARDS --memory-budget X --plan --json`); one monolithic .pte of that mix.")] = None,
    interface: Annotated[Optional[str], typer.Option(help="edgectl: for `edgectl run`/`bench` (the runtime owns the KV cache; a tied matrix stored once). stock: also runs on ExecuTorch's stock runners (llama_main, the Android/iOS apps, TextLLMRunner): KV cache and embedding inside the program, the tokenizer file they take (OUT.tokenizer.json, or .model for SentencePiece) written beside it. Default: stock with --plan, else edgectl.")] = None,
    target: Annotated[str, typer.Option("--target", help="host: for this machine's edgectl. android: for ExecuTorch's llama_main on a phone (`run`/`bench --device adb:SERIAL`): --interface stock and xnnpack, the tokenizer file beside the .pte.")] = "host",
    json_out: JsonOpt = False,
    recipe: RecipeOpt = None,
):
    """Export MODEL to a self-contained .pte (weights, tokenizer, chat template, config).

    Example: edgectl export HuggingFaceTB/SmolLM2-135M-Instruct -o smollm2.pte
    Example: edgectl export model.gguf --plan plan.json -o mixed.pte
    Example: llama_main --model_path mixed.pte --tokenizer_path mixed.tokenizer.json --prompt "Once upon a time"
    Example: edgectl export HuggingFaceTB/SmolLM2-135M-Instruct -o smollm2.pte --target android
    """
    from edgectl.util import ui
    from edgectl.checkpoint.checkpoint import resolve
    from edgectl.lower.export import export_pte

    if output.suffix != ".pte":
        raise UsageError(f"--output {output}: expected a .pte path")
    if target not in ("host", "android"):
        raise UsageError(f"--target {target}: choose host or android")
    if target == "android":
        if interface not in (None, "stock"):
            raise UsageError(f"--target android runs ExecuTorch's llama_main: --interface stock, not {interface}")
        if backend != "xnnpack":
            raise UsageError(f"--target android exports for XNNPACK (the CPU of the phone's llama_main), not {backend}")
        interface = "stock"
    qs = None
    if scheme is not None:
        from edgectl.quant.quantize import QuantScheme

        qs = QuantScheme(scheme, group_size, embedding, embedding_group_size, mapping=mapping,
                         smoothquant=smoothquant_default(scheme, smoothquant), smooth_alpha=smooth_alpha)
    elif (embedding, embedding_group_size, mapping) != ("none", 32, "asymmetric") or (group_size != 32 and plan is None):
        raise UsageError("--group-size/--embedding/--embedding-group-size/--mapping need --scheme (--group-size also goes with --plan)")
    elif smoothquant or smooth_alpha != 0.6 or calibration is not None:
        raise UsageError("--smoothquant/--smooth-alpha/--calibration need --scheme int8")
    the_plan = None
    if plan is not None:
        import json

        from edgectl.runtime.plan import Plan

        if qs is not None:
            raise UsageError("--plan and --scheme exclude each other")
        try:
            the_plan = Plan.from_dict(json.loads(plan.read_text()))
        except OSError as e:
            raise EdgectlError(f"--plan {plan}: cannot read ({e.strerror})") from e
        except json.JSONDecodeError as e:
            raise EdgectlError(f"--plan {plan}: not JSON ({e.msg}, line {e.lineno})") from e
    ckpt = resolve(model)
    with ui.stages(f"exporting {model}") as step:
        res = export_pte(ckpt, output, backend=backend, max_seq_len=max_seq_len, progress=step, scheme=qs,
                         prefill_chunk=prefill_chunk, plan=the_plan, plan_group_size=group_size, calibration=calibration,
                         interface=interface or ("stock" if the_plan is not None else "edgectl"))
    if verbose:
        _print_ops(res.ops)
    if json_out:
        ui.emit_json(res.to_dict())
    else:
        typer.echo(f"{res.path}  {res.bytes / 1e6:.1f} MB  {res.seconds:.1f}s ({res.cpu_seconds:.0f} CPU-s)")
        if res.tokenizer:
            typer.echo(f"{res.tokenizer}  (the tokenizer file ExecuTorch's stock runners take)")
        if target == "android":
            ui.info(f"for the phone: edgectl run {res.path} --device adb:SERIAL --runner llama_main -p ... "
                    "(pushes both files and llama_main to /data/local/tmp/edgectl)")



def _print_ops(ops: dict) -> None:
    from edgectl.util import ui

    nd = ops["non_delegated"]
    ui.info(f"delegated calls: {ops['delegated']}   non-delegated ops: {sum(nd.values())}")
    for name, n in nd.items():
        ui.info(f"  {n:5d}  {name}")
