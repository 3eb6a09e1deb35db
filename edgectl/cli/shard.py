"""`edgectl shard`: cut a model into per-layer programs at several precisions, or re-measure a shard set."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from edgectl.backends.registry import SHARDABLE
from edgectl.cli.app import JsonOpt, RecipeOpt, app
from edgectl.util.errors import UsageError


@app.command()
def shard(
    model: Annotated[str, typer.Argument(help="Hub id, Hugging Face directory, .gguf file or `edgectl quantize` output.")],
    output: Annotated[Optional[Path], typer.Option("--output", "-o", help="Shard-set directory to write (complete or absent).")] = None,
    remeasure: Annotated[bool, typer.Option("--remeasure", help="MODEL is an existing shard set: measure its load time, "
                                            "memory and decode-step time again on this machine and rewrite its manifest "
                                            "(e.g. after copying it to a device); nothing is exported.")] = False,
    precisions: Annotated[Optional[str], typer.Option(help="Precisions every shard is exported at, highest first "
                                                           "(default fp32; a quantized MODEL: its own, the only one it offers).")] = None,
    group_size: Annotated[int, typer.Option(help="4-bit group size (a multiple of 32).")] = 32,
    layers_per_shard: Annotated[int, typer.Option(min=1, help="Decoder layers per shard.")] = 1,
    calibration: Annotated[Optional[Path], typer.Option(help="Text file to measure importance on (needed with 2+ precisions).")] = None,
    calibration_tokens: Annotated[int, typer.Option(min=16, help="Calibration tokens to score.")] = 2048,
    backend: Annotated[str, typer.Option(help=f"{', '.join(SHARDABLE)} (quantized precisions need xnnpack).")] = "xnnpack",
    max_seq_len: Annotated[Optional[int], typer.Option(help="KV cache length (default: min(model's, 2048)).")] = None,
    jobs: Annotated[int, typer.Option("--jobs", "-j", min=1, help="Parallel export workers.")] = 2,
    chunk: Annotated[int, typer.Option(min=2, help="Most tokens per program call (activation memory is planned for it).")] = 64,
    json_out: JsonOpt = False,
    recipe: RecipeOpt = None,
):
    """Cut MODEL into per-layer programs at several precisions and rank them by importance.

    Example: edgectl shard model.gguf -o smol-shards --precisions fp32,int8,8da4w --calibration wiki.valid.raw

    MODEL may be an `edgectl quantize` output: its shards are its stored codes, at its one precision (e.g. 8da4w).

    Example: edgectl shard smol-shards --remeasure   (on the device that will run it)
    """
    from edgectl.util import ui
    from edgectl.checkpoint.checkpoint import resolve
    from edgectl.quant.quantize import QuantScheme
    from edgectl.shard.shard import ShardSettings, parse_precisions, shard_model

    if remeasure:
        from edgectl.shard.shard import remeasure as do_remeasure

        if output is not None:
            raise UsageError("--remeasure rewrites MODEL's own manifest: drop --output")
        ui.info(f"re-measuring {model} (fresh process)")
        m = do_remeasure(Path(model))
        rows = [{"shard": sh.name, "precision": p, "load_ms": v.load_ms, "resident_bytes": v.resident_bytes,
                 "planned_bytes": v.extra.get("planned_bytes"), "compute_ms": v.extra.get("compute_ms")}
                for sh in m.shards for p, v in sh.variants.items()]
        if json_out:
            ui.emit_json({"path": str(model), "variants": rows})
            return
        for r in rows:
            c = f"{r['compute_ms']:.3f} ms/step" if r["compute_ms"] is not None else "-"
            typer.echo(f"  {r['shard']:<12} {r['precision']:<6} load {r['load_ms']:7.2f} ms  {r['resident_bytes'] / 1e6:7.2f} MB  {c}")
        return
    if output is None:
        raise UsageError("--output/-o is required", hint="give the shard-set directory to write")

    ps = parse_precisions(precisions) if precisions is not None else None
    QuantScheme("fp32", group_size)  # validates --group-size
    if output.suffix == ".pte":
        raise UsageError(f"--output {output}: a shard set is a directory, not a .pte")
    settings = ShardSettings(ps, group_size, layers_per_shard, calibration, calibration_tokens, backend, max_seq_len, jobs,
                             chunk=chunk)
    ckpt = resolve(model)
    with ui.progress_bar(0, "") as bar:
        tasks: dict[str, int] = {}

        def step(name: str) -> None:
            ui.info(f"  {name}")

        def built(name: str, precision: str, how: str) -> None:
            if name not in tasks:
                tasks[name] = bar.add_task(name, total=len(ps or (None,)))
            bar.advance(tasks[name])

        def count(what: str, done: int, total: int) -> None:
            if what not in tasks:
                tasks[what] = bar.add_task(what, total=total)
            bar.update(tasks[what], completed=done)

        res = shard_model(ckpt, output, settings, step=step, built=built, count=count)
    if json_out:
        ui.emit_json({**res.to_dict(), "ranking": res.manifest.calibration.get("ranking")})
        return
    typer.echo(f"{res.path}  {res.shards} shards, {res.variants} variants ({res.exported} exported, {res.cached} cached)  "
               f"{res.bytes / 1e6:.1f} MB  {res.seconds:.1f}s ({res.cpu_seconds:.0f} CPU-s)")
    for r in (res.manifest.calibration.get("ranking") or [])[:10]:
        typer.echo(f"  {r['shard']:<12} {r['precision']:<6} KL {r['kl']:.5f}  ppl {r['ppl_delta']:+.3f}")
