"""`edgectl run`: generate text from a .pte or a shard set, or show a shard set's plan."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from edgectl.cli.app import JsonOpt, RecipeOpt, ThreadsOpt, app
from edgectl.util.errors import UsageError


@app.command()
def run(
    artifact: Annotated[Path, typer.Argument(help="A .pte from `edgectl export`, or a shard set directory from `edgectl shard`.")],
    prompt: Annotated[Optional[str], typer.Option("--prompt", "-p", help="Text to continue (or to answer, with --chat).")] = None,
    n: Annotated[int, typer.Option("-n", "--max-new-tokens", min=1, help="Most tokens to generate.")] = 128,
    temperature: Annotated[float, typer.Option(min=0.0, help="0 = greedy.")] = 0.0,
    top_p: Annotated[float, typer.Option(min=0.0, max=1.0, help="Nucleus sampling mass.")] = 1.0,
    seed: Annotated[Optional[int], typer.Option(help="Sampling seed, for reproducible runs.")] = None,
    chat: Annotated[bool, typer.Option("--chat", help="Apply the model's chat template.")] = False,
    system: Annotated[Optional[str], typer.Option(help="System message (with --chat).")] = None,
    threads: ThreadsOpt = None,
    memory_budget: Annotated[Optional[str], typer.Option("--memory-budget", help="Shard sets: what the whole process may use, e.g. 300MB: the runtime floor (Python, numpy, ExecuTorch's runtime, ~165 MB, measured) plus the model's share (weights, KV cache, activations, loader buffers).")] = None,
    latency_target: Annotated[Optional[float], typer.Option("--latency-target", min=0.0, help="Shard sets: most expected ms per decoded token.")] = None,
    mode: Annotated[str, typer.Option("--mode", help="Shard sets: auto, resident, pipelined or on-demand.")] = "auto",
    precision: Annotated[Optional[str], typer.Option("--precision", help="Shard sets: every shard at this precision "
                                                     "(e.g. int8; the uniform baseline a plan is compared with).")] = None,
    plan_file: Annotated[Optional[Path], typer.Option("--plan-file", help="Shard sets: follow this plan (from `run "
                                                      "--plan --json`) instead of planning; the one `export --plan` takes.")] = None,
    show_plan: Annotated[bool, typer.Option("--plan", help="Shard sets: print the plan (table, or JSON with --json) and exit.")] = False,
    ctx_size: Annotated[Optional[int], typer.Option("--ctx-size", "-c", min=2, help="Positions the run may use (prompt + generated). With --memory-budget the KV cache is planned and charged for these (default: the prompt's tokens + -n); otherwise the artifact's max_seq_len.")] = None,
    draft: Annotated[Optional[str], typer.Option("--draft", help="Speculative decoding: the draft that proposes tokens "
                                                 "for the target to check: lookup[:N] (prompt n-gram lookup), a .pte or "
                                                 "shard set with the same tokenizer, or a precision of the shard set "
                                                 "(e.g. --precision fp32 --draft 8da4w). Greedy output is unchanged.")] = None,
    draft_tokens: Annotated[Optional[str], typer.Option("--draft-tokens", help="With --draft: tokens drafted per target "
                                                        "call (default 4), or auto (more while all are kept, fewer when not).")] = None,
    json_out: JsonOpt = False,
    recipe: RecipeOpt = None,
    runner: Annotated[Optional[Path], typer.Option("--runner", help="With --device adb:SERIAL: ExecuTorch's llama_main "
                                                   "built for Android arm64 (pushed once; see the README, Android).")] = None,
    device: Annotated[Optional[str], typer.Option("--device", help="Run on this device instead: ssh:user@host:port, user and port optional, or adb:SERIAL (a .pte from "
                                                  "`export --target android`, run by ExecuTorch's llama_main). "
                                                  "The .pte or shard set is sent to the device's store once (by sha256); "
                                                  "a budget is planned with the device's own measured figures.")] = None,
):
    """Generate text from ARTIFACT, streaming tokens to stdout; timings go to stderr.

    Example: edgectl run smollm2.pte --chat -p "What is the capital of France?"
    Example: edgectl run smollm2-shards/ --memory-budget 300MB --plan
    """
    from edgectl.util import ui
    from edgectl.runtime.run import run_prompt

    if system and not chat:
        raise UsageError("--system needs --chat")
    if runner is not None and device is None:
        raise UsageError("--runner needs --device adb:SERIAL")
    if draft is None and draft_tokens is not None:
        raise UsageError("--draft-tokens needs --draft")
    if device is not None:
        _run_on_device(device, artifact, prompt, n, temperature, top_p, seed, chat, system, threads, json_out,
                       memory_budget, latency_target, mode, precision, plan_file, show_plan, ctx_size, runner,
                       draft, draft_tokens)
        return
    budget = None
    if memory_budget is not None:
        from edgectl.runtime.plan import parse_bytes

        budget = parse_bytes(memory_budget)
    if show_plan:
        _show_plan(artifact, budget, mode, latency_target, json_out, precision,
                   _plan_context(artifact, ctx_size, prompt, n, chat, system) if budget else ctx_size,
                   draft, draft_tokens)
        return
    if prompt is None:
        raise UsageError("--prompt is required (unless --plan)")

    def stream(text: str) -> None:
        sys.stdout.write(text)
        sys.stdout.flush()

    res = run_prompt(
        artifact, prompt, max_new_tokens=n, temperature=temperature, top_p=top_p, seed=seed,
        chat=chat, system=system, threads=threads, on_text=None if json_out else stream,
        budget=budget, mode=mode, latency_target_ms=latency_target, precision=precision, plan_file=plan_file,
        context=ctx_size, draft=draft, draft_tokens=draft_tokens,
    )
    if json_out:
        ui.emit_json(res)
        return
    sys.stdout.write("\n")
    sys.stdout.flush()  # the newline before the stats that go to stderr
    s = res["stats"]
    from edgectl.util.emulation import emulated

    ui.info(
        f"[dim]{'emulated (timings mean nothing): ' if emulated() else ''}{s['prompt_tokens']} prompt tokens, {s['new_tokens']} new ({s['stopped']}) | load {res['load_ms']:.0f} ms | "
        f"TTFT {s['ttft_ms']:.0f} ms | prefill {s['prefill_tok_s']:.1f} tok/s | decode {s['decode_tok_s']:.1f} tok/s"
        + (f" | accepted {sp['acceptance']:.0%} ({sp['tokens_per_target_call']:.2f} tokens/target call)"
           if (sp := res.get("speculative")) else "") + "[/dim]"
    )
    if "memory" in res:
        mem = res["memory"]
        ctx = res["plan"].get("context")
        share = (f"model peak {mem['model_peak_bytes'] / 1e6:.1f} MB of its {mem['model_budget_bytes'] / 1e6:.1f} MB share"
                 if mem.get("model_budget_bytes") else f"model peak {mem['model_peak_bytes'] / 1e6:.1f} MB")
        ui.info(f"[dim]{mem['mode']} ({mem['engine']}) | KV cache for {f'{ctx} positions' if ctx else 'max_seq_len'} "
                f"(--ctx-size) | peak {mem['peak_bytes'] / 1e6:.1f} MB of budget {_mb(res['plan']['budget_bytes'])} = "
                f"runtime floor {mem['baseline_bytes'] / 1e6:.0f} MB + {share}[/dim]")


def _run_on_device(device: str, artifact: Path, prompt: str | None, n: int, temperature: float, top_p: float,
                   seed: int | None, chat: bool, system: str | None, threads: int | None, json_out: bool,
                   memory_budget: str | None, latency_target: float | None, mode: str, precision: str | None,
                   plan_file: Path | None, show_plan: bool, ctx_size: int | None, runner: Path | None,
                   draft: str | None = None, draft_tokens: str | None = None) -> None:
    """`--device`: the artifact sent to the device (edgectl/device/store.py), the same `run`
    there, its output streamed back; exits with its status. A shard set run with a budget or
    a latency target is planned with the device's own figures (`shard --remeasure` there, once).
    `--draft`: a precision or lookup goes as it is; a draft artifact is sent to the store too."""
    from edgectl.device.remote_run import remeasure_once, run_edgectl, send_artifact
    from edgectl.device.target import parse_target

    if prompt is None and not show_plan:
        raise UsageError("--prompt is required (unless --plan)")
    target = parse_target(device)
    if not artifact.exists():
        raise UsageError(f"no such file or directory: {artifact}")
    if target.kind == "adb":
        _run_on_android(target, artifact, prompt, n, temperature, top_p, seed, chat, system, threads, json_out, runner,
                        memory_budget=memory_budget, latency_target=latency_target, precision=precision,
                        plan_file=plan_file, plan=show_plan, ctx_size=ctx_size, draft=draft)
        return
    if runner is not None:
        raise UsageError("--runner is for adb: devices (ExecuTorch's llama_main)")
    if memory_budget is not None:
        from edgectl.runtime.plan import parse_bytes

        parse_bytes(memory_budget)  # a typo is a usage error here, before anything is sent
    spec = None
    if draft is not None:
        from edgectl.runtime.speculative import parse_draft, parse_draft_tokens

        spec = parse_draft(draft, artifact)  # a typo is a usage error here, before anything is sent
        parse_draft_tokens(draft_tokens)
    remote = send_artifact(target, artifact)
    if spec is not None and spec[0] == "path":
        draft = send_artifact(target, spec[1])
    if artifact.is_dir() and (memory_budget is not None or latency_target is not None):
        remeasure_once(target, remote, artifact.name)
    args: list = ["run", remote, "-n", n, "--temperature", repr(temperature), "--top-p", repr(top_p), "--mode", mode]
    for flag, value in (("-p", prompt), ("--seed", seed), ("--system", system), ("--threads", threads),
                        ("--memory-budget", memory_budget), ("--latency-target", latency_target),
                        ("--precision", precision), ("--ctx-size", ctx_size), ("--draft", draft),
                        ("--draft-tokens", draft_tokens)):
        if value is not None:
            args += [flag, value]
    if plan_file is not None:
        args += ["--plan-file", send_artifact(target, plan_file)]
    args += [flag for flag, on in (("--chat", chat), ("--plan", show_plan), ("--json", json_out)) if on]
    rc = run_edgectl(target, args)
    if rc:
        raise typer.Exit(rc)


def _run_on_android(target, artifact: Path, prompt: str, n: int, temperature: float, top_p: float, seed: int | None,
                    chat: bool, system: str | None, threads: int | None, json_out: bool, runner: Path | None,
                    **shard_options) -> None:
    """`--device adb:SERIAL`: ExecuTorch's llama_main on the phone (edgectl/device/android.py)."""
    from edgectl.device.android import run_android

    given = [k for k, v in shard_options.items() if v not in (None, False)]
    if given:
        raise UsageError(f"--{given[0].replace('_', '-')} is not supported with adb: devices",
                         hint="the phone runs ExecuTorch's stock runner on one .pte (export --target android)")
    rc = run_android(target, artifact, prompt=prompt, n=n, temperature=temperature, top_p=top_p, seed=seed, chat=chat,
                     system=system, threads=threads, json_out=json_out, runner=runner)
    if rc:
        raise typer.Exit(rc)


def _mb(budget: int) -> str:
    return "no budget" if budget >= 1 << 60 else f"{budget / 1e6:.1f} MB"


def _plan_context(artifact: Path, ctx_size: int | None, prompt: str | None, n: int, chat: bool,
                  system: str | None) -> int | None:
    """The context `run` would plan for: --ctx-size, else the prompt's tokens + n (the
    shard set's tokenizer), else (no prompt) the artifact's max_seq_len."""
    if ctx_size is not None or prompt is None:
        return ctx_size
    from edgectl.runtime.run import is_shard_set, manifest_tokenizer, prompt_token_ids

    if not is_shard_set(artifact):
        return None
    return len(prompt_token_ids(manifest_tokenizer(artifact), prompt, chat, system)) + n


def _show_plan(artifact: Path, budget: int | None, mode: str, latency_target: float | None, json_out: bool,
               precision: str | None = None, context: int | None = None, draft: str | None = None,
               draft_tokens: int | str | None = None) -> None:
    from rich.console import Console
    from rich.table import Table

    from edgectl.util import ui
    from edgectl.runtime.plan import render_rows
    from edgectl.runtime.run import plan_for

    p = plan_for(artifact, budget, mode, latency_target, precision, context, draft, draft_tokens)
    if json_out:
        ui.emit_json(p.to_dict())
        return
    t = Table(title=f"plan: {p.mode}, {p.total_bytes / 1e6:.1f} MB of {_mb(p.budget_bytes)} "
                    f"(minimum {p.minimum_bytes / 1e6:.1f} MB), expected {p.ms_per_token:.2f} ms/token")
    for col in ("shard", "precision", "placement", "MB", "KL", "ppl Δ", "ms/token"):
        t.add_column(col, justify="left" if col in ("shard", "precision", "placement") else "right")
    for row in render_rows(p):
        t.add_row(*row)
    Console(file=sys.stdout, width=None if sys.stdout.isatty() else 120).print(t)
    typer.echo(f"KV cache {p.kv_bytes / 1e6:.1f} MB for {p.context or 'max_seq_len'} positions, loader slots + activations "
               f"{p.slot_bytes / 1e6:.1f} MB, resident shards {p.resident_bytes / 1e6:.1f} MB; sum of KL {p.kl_sum:.4f}")
    for note in p.notes:
        ui.info(f"note: {note}")
