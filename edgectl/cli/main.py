"""The `edgectl` command line: parse, call one stage function, render its result.

No torch/executorch import at module level, so `edgectl --help` is instant. Results go
to stdout, everything else to stderr. `main()` is the one place where exceptions become
one-line messages (traceback only with --debug or EDGECTL_DEBUG=1).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from edgectl.util.env import RUNTIME_COMMANDS, one_blas_thread

from edgectl.util.version import __version__
from edgectl.backends.registry import HELP as BACKEND_HELP, SHARDABLE
from edgectl.util.errors import EdgectlError, UsageError

app = typer.Typer(
    name="edgectl",
    help="Take a Hugging Face causal LM to on-device inference with ExecuTorch.\n\n"
    "MODEL is a local Hugging Face directory, a hub id (HuggingFaceTB/SmolLM2-135M-Instruct) "
    "or a .gguf file. Add --debug anywhere for a traceback on errors.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
)

JsonOpt = Annotated[bool, typer.Option("--json", help="Print a machine-readable summary on stdout.")]
ThreadsOpt = Annotated[Optional[int], typer.Option("--threads", "-t", min=1, help="Runtime threads (default: runtime's choice).")]
RecipeOpt = Annotated[
    Optional[str],
    typer.Option("--recipe", metavar="FILE|NAME", help="A recipe: a TOML file, or the name of a shipped one (`edgectl recipes` lists them). Its settings become defaults; flags given here override them."),
]


def _version(value: bool):
    if value:
        typer.echo(f"edgectl {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True, help="Show the version.")] = False,
):
    pass


@app.command()
def export(
    model: Annotated[str, typer.Argument(help="Hub id, Hugging Face directory or .gguf file.")],
    output: Annotated[Path, typer.Option("--output", "-o", help="Where to write the .pte.")],
    backend: Annotated[str, typer.Option(help=BACKEND_HELP)] = "xnnpack",
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
    json_out: JsonOpt = False,
    recipe: RecipeOpt = None,
):
    """Export MODEL to a self-contained .pte (weights, tokenizer, chat template, config).

    Example: edgectl export HuggingFaceTB/SmolLM2-135M-Instruct -o smollm2.pte
    Example: edgectl export model.gguf --plan plan.json -o mixed.pte
    Example: llama_main --model_path mixed.pte --tokenizer_path mixed.tokenizer.json --prompt "Once upon a time"
    """
    from edgectl.util import ui
    from edgectl.checkpoint.checkpoint import resolve
    from edgectl.lower.export import export_pte

    if output.suffix != ".pte":
        raise UsageError(f"--output {output}: expected a .pte path")
    qs = None
    if scheme is not None:
        from edgectl.quant.quantize import QuantScheme

        qs = QuantScheme(scheme, group_size, embedding, embedding_group_size, mapping=mapping,
                         smoothquant=_smoothquant(scheme, smoothquant), smooth_alpha=smooth_alpha)
    elif (embedding, embedding_group_size, mapping) != ("none", 32, "asymmetric") or (group_size != 32 and plan is None):
        raise UsageError("--group-size/--embedding/--embedding-group-size/--mapping need --scheme (--group-size also goes with --plan)")
    elif smoothquant or smooth_alpha != 0.6 or calibration is not None:
        raise UsageError("--smoothquant/--smooth-alpha/--calibration need --scheme int8")
    the_plan = None
    if plan is not None:
        import json

        from edgectl.runtime.planner import Plan

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


def _smoothquant(scheme: str, flag: bool | None) -> bool:
    """--smoothquant/--no-smoothquant, default: on for int8 (8-bit per-token activations),
    off for 4-bit schemes (whose asymmetric grid reproduces a Q4_1 source exactly)."""
    return scheme == "int8" if flag is None else flag


def _print_ops(ops: dict) -> None:
    from edgectl.util import ui

    nd = ops["non_delegated"]
    ui.info(f"delegated calls: {ops['delegated']}   non-delegated ops: {sum(nd.values())}")
    for name, n in nd.items():
        ui.info(f"  {n:5d}  {name}")


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
    memory_budget: Annotated[Optional[str], typer.Option("--memory-budget", help="Shard sets: what the model may cost (weights, KV cache, activations, loader buffers), e.g. 150MB.")] = None,
    latency_target: Annotated[Optional[float], typer.Option("--latency-target", min=0.0, help="Shard sets: most expected ms per decoded token.")] = None,
    mode: Annotated[str, typer.Option("--mode", help="Shard sets: auto, resident, pipelined or on-demand.")] = "auto",
    precision: Annotated[Optional[str], typer.Option("--precision", help="Shard sets: every shard at this precision "
                                                     "(e.g. int8; the uniform baseline a plan is compared with).")] = None,
    plan_file: Annotated[Optional[Path], typer.Option("--plan-file", help="Shard sets: follow this plan (from `run "
                                                      "--plan --json`) instead of planning; the one `export --plan` takes.")] = None,
    show_plan: Annotated[bool, typer.Option("--plan", help="Shard sets: print the plan (table, or JSON with --json) and exit.")] = False,
    ctx_size: Annotated[Optional[int], typer.Option("--ctx-size", "-c", min=2, help="Positions the run may use (prompt + generated). With --memory-budget the KV cache is planned and charged for these (default: the prompt's tokens + -n); otherwise the artifact's max_seq_len.")] = None,
    json_out: JsonOpt = False,
    recipe: RecipeOpt = None,
):
    """Generate text from ARTIFACT, streaming tokens to stdout; timings go to stderr.

    Example: edgectl run smollm2.pte --chat -p "What is the capital of France?"
    Example: edgectl run smollm2-shards/ --memory-budget 150MB --plan
    """
    from edgectl.util import ui
    from edgectl.runtime.run import run_prompt

    if system and not chat:
        raise UsageError("--system needs --chat")
    budget = None
    if memory_budget is not None:
        from edgectl.runtime.planner import parse_bytes

        budget = parse_bytes(memory_budget)
    if show_plan:
        _show_plan(artifact, budget, mode, latency_target, json_out, precision,
                   _plan_context(artifact, ctx_size, prompt, n, chat, system) if budget else ctx_size)
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
        context=ctx_size,
    )
    if json_out:
        ui.emit_json(res)
        return
    sys.stdout.write("\n")
    sys.stdout.flush()  # the newline before the stats that go to stderr
    s = res["stats"]
    ui.info(
        f"[dim]{s['prompt_tokens']} prompt tokens, {s['new_tokens']} new ({s['stopped']}) | load {res['load_ms']:.0f} ms | "
        f"TTFT {s['ttft_ms']:.0f} ms | prefill {s['prefill_tok_s']:.1f} tok/s | decode {s['decode_tok_s']:.1f} tok/s[/dim]"
    )
    if "memory" in res:
        mem = res["memory"]
        ctx = res["plan"].get("context")
        ui.info(f"[dim]{mem['mode']} ({mem['engine']}) | KV cache for {f'{ctx} positions' if ctx else 'max_seq_len'} "
                f"(--ctx-size) | model peak {mem['model_peak_bytes'] / 1e6:.1f} MB of budget "
                f"{_mb(res['plan']['budget_bytes'])} | interpreter baseline {mem['baseline_bytes'] / 1e6:.0f} MB[/dim]")


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
               precision: str | None = None, context: int | None = None) -> None:
    from rich.console import Console
    from rich.table import Table

    from edgectl.util import ui
    from edgectl.runtime.planner import render_rows
    from edgectl.runtime.run import plan_for

    p = plan_for(artifact, budget, mode, latency_target, precision, context)
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


@app.command()
def bench(
    artifacts: Annotated[list[Path], typer.Argument(help="One or more .pte files (the same one twice compares runs).")],
    prompt_tokens: Annotated[int, typer.Option(min=1, help="Prompt length in tokens (a fixed real text).")] = 64,
    new_tokens: Annotated[int, typer.Option(min=2, help="Tokens to generate per run (EOS does not stop it).")] = 128,
    repeat: Annotated[int, typer.Option(min=1, help="Measured runs per artifact, each in a fresh process.")] = 3,
    threads: ThreadsOpt = None,
    cold: Annotated[bool, typer.Option("--cold", help="Drop the page cache before each run (root), no warm-up.")] = False,
    json_out: Annotated[bool, typer.Option("--json", help="Print every raw figure as JSON on stdout (the table goes to stderr).")] = False,
    output: Annotated[Optional[Path], typer.Option("--output", "-o", help="Also write that JSON to this file.")] = None,
    keep_going: Annotated[bool, typer.Option("--keep-going", "-k", help="Measure every row even when one fails, and exit 0; "
                                             "without it the first failed or OOM-killed row stops the bench and it exits 1.")] = False,
    plot: Annotated[Optional[Path], typer.Option("--plot", help="Write a timeline PNG of each artifact's last run.")] = None,
    ppl: Annotated[Optional[Path], typer.Option("--ppl", help="Also measure the artifact's perplexity on this text file.")] = None,
    ppl_tokens: Annotated[Optional[int], typer.Option(min=2, help="Score at most this many tokens of --ppl.")] = None,
    memory_budget: Annotated[Optional[str], typer.Option("--memory-budget", help="Shard sets: plan under each budget (comma-separated, e.g. 150MB,75MB), one row each.")] = None,
    precision: Annotated[Optional[str], typer.Option("--precision", help="Shard sets: also rows with every shard at each of these "
                                                     "precisions (comma-separated; 'plan' = the planner's mix), e.g. plan,int8,8da4w.")] = None,
    plan_file: Annotated[Optional[Path], typer.Option("--plan-file", help="Shard sets: one row following this plan "
                                                      "(from `run --plan --json`), e.g. against `export --plan`'s .pte.")] = None,
    mode: Annotated[Optional[str], typer.Option("--mode", help="Shard sets: placement mode(s), comma-separated (auto, resident, pipelined, on-demand), one row each.")] = None,
    cgroup: Annotated[bool, typer.Option("--cgroup", help="Run each worker in a memory cgroup capped at budget + the measured interpreter baseline (root); OOM kills become a row status.")] = False,
    ctx_size: Annotated[Optional[int], typer.Option("--ctx-size", "-c", min=2, help="Positions each run uses: a shard set's KV cache is planned and charged for these, and --ppl scores windows this long (default: prompt + new tokens for generation, the artifact's max_seq_len for --ppl).")] = None,
    recipe: RecipeOpt = None,
):
    """Measure load time, TTFT, prefill/decode speed and memory of ARTIFACTS; a table on stdout.

    A .pte with --memory-budget and --cgroup runs under each budget's cap (it has no plan).

    A row that fails (an error, or an OOM kill under --cgroup) is marked "failed" or "oom" in
    the table and the JSON, and bench exits 1: CI can gate on it. --keep-going measures the
    other rows anyway and exits 0. A budget no plan fits is a row too ("infeasible"), not a
    failure.

    Example: edgectl bench fp32.pte 8da4w.pte --repeat 5 -o bench.json --plot timeline.png
    Example: edgectl bench fp32.pte 8da4w.pte --json > bench.json
    Example: edgectl bench smol-shards/ smol-int8.pte --memory-budget 150MB,75MB --mode resident,pipelined --cgroup
    """
    from rich.console import Console

    from edgectl.util import ui
    from edgectl.bench.bench import BenchSettings, render_table, run_bench

    if ppl_tokens and not ppl:
        raise UsageError("--ppl-tokens needs --ppl")
    if plot is not None and plot.suffix.lower() != ".png":
        raise UsageError(f"--plot {plot}: expected a .png path")
    _json_path_given_as_artifact(artifacts)
    settings = BenchSettings(prompt_tokens, new_tokens, repeat, threads, cold, ppl, ppl_tokens, cgroup, ctx_size)
    cases = bench_cases(artifacts, memory_budget, mode, cgroup, precision, plan_file)
    with ui.stages("benchmarking") as step:
        report = run_bench(cases, settings, progress=step, warn=ui.warn, keep_going=keep_going)
    data = report.to_dict()
    target = sys.stderr if json_out else sys.stdout
    if report.measured_rows:
        Console(file=target, width=None if target.isatty() else 200).print(render_table(report))
    if json_out:
        ui.emit_json(data)
    if output is not None:
        import json

        from edgectl.util.files import write_atomic

        write_atomic(output, lambda f: f.write((json.dumps(data, indent=2) + "\n").encode()))
        ui.info(f"wrote {output}")
    if plot is not None and report.measured_rows:
        from edgectl.bench.plot import plot_timeline

        ui.info(f"wrote {plot_timeline(data['rows'], plot)}")
    failed = report.failed_rows
    for row in failed:  # a worker's error names the row already
        what = row.error if row.error.startswith(row.case.label) else f"{row.case.label}: {row.error}"
        print(f"edgectl: error: {what}", file=sys.stderr)
    if failed and not keep_going:
        raise typer.Exit(1)


def _json_path_given_as_artifact(artifacts: list[Path]) -> None:
    """`bench A.pte --json out.json` was the old spelling: out.json now lands among the
    artifacts. Say what changed instead of "no such file"."""
    for a in artifacts:
        if a.suffix == ".json" and not a.is_dir():
            raise UsageError(f"{a}: not an artifact; --json is a flag now (JSON on stdout)",
                             hint=f"write it to a file with -o {a}")


def bench_cases(artifacts: list[Path], memory_budget: str | None, mode: str | None, cgroup: bool,
                precision: str | None = None, plan_file: Path | None = None) -> list:
    """One Case per artifact x budget x mode x precision: a shard set gets every budget, mode
    and precision ('plan' = the planner's own mix); a .pte gets every budget only under
    --cgroup (as a cap), and no mode or precision."""
    from edgectl.bench.bench import Case
    from edgectl.runtime.planner import MODES, parse_bytes

    budgets = [parse_bytes(b) for b in memory_budget.split(",")] if memory_budget else [None]
    modes = [m.strip() for m in mode.split(",")] if mode else [None]
    for m in modes:
        if m is not None and m not in MODES:
            raise UsageError(f"--mode {m}: expected one of {', '.join(MODES)}")
    if mode and not memory_budget:
        raise UsageError("--mode needs --memory-budget")
    if plan_file is not None and (memory_budget or mode or precision):
        raise UsageError("--plan-file fixes the plan: drop --memory-budget, --mode and --precision")
    precs = [None if p.strip() == "plan" else p.strip() for p in precision.split(",")] if precision else [None]
    cases = []
    for a in artifacts:
        a = a.resolve()
        if a.is_dir() and plan_file is not None:
            cases.append(Case(a, {"plan_file": str(plan_file.resolve())}))
        elif a.is_dir():
            for b in budgets:
                for m in modes:
                    for p in precs:
                        opts = {k: v for k, v in (("budget", b), ("mode", m), ("precision", p)) if v is not None}
                        cases.append(Case(a, opts))
        elif cgroup and memory_budget:
            cases += [Case(a, {"budget": b}) for b in budgets]
        else:
            cases.append(Case(a))
    return cases


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
                     smoothquant=_smoothquant(scheme, smoothquant), smooth_alpha=smooth_alpha)
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


@app.command()
def verify(
    path: Annotated[Path, typer.Argument(help="A .pte or a shard set directory.")],
    json_out: JsonOpt = False,
):
    """Check a .pte or a shard set for damage: each file against its checksum, one line each (exit 1 if any is wrong).

    Example: edgectl verify smollm2-shards/
    """
    from edgectl.util import ui
    from edgectl.runtime.verify import verify as check

    rows = check(path)
    ok = all(r["ok"] for r in rows)
    if json_out:
        ui.emit_json({"ok": ok, "files": rows})
    else:
        for r in rows:
            typer.echo(f"{r['path']}: {'OK' if r['ok'] else r['problem']}")
    return 0 if ok else 1


@app.command("recipes")
def recipes_cmd(json_out: JsonOpt = False):
    """List the recipes that ship with edgectl (use one with --recipe NAME on any command).

    Example: edgectl export --recipe smollm2-135m-android -o smollm2.pte
    """
    from edgectl.util import ui
    from edgectl.recipes import recipe_index

    index = recipe_index()
    if json_out:
        ui.emit_json(index)
        return
    width = max((len(r["name"]) for r in index), default=0)
    for r in index:
        typer.echo(f"{r['name']:<{width}}  {r['description']}")


def _click_modules() -> list:
    """click itself, and the copy newer typer releases vendor as typer._click."""
    import importlib

    mods = []
    for name in ("click", "typer._click"):
        try:
            mods.append(importlib.import_module(name))
        except ImportError:
            pass
    return mods


def _recipe_defaults(argv: list[str]) -> dict | None:
    """`--recipe FILE|NAME` on any command: the recipe's settings as that command's defaults."""
    path = next((argv[i + 1] for i, a in enumerate(argv[:-1]) if a == "--recipe"), None)
    path = path or next((a.split("=", 1)[1] for a in argv if a.startswith("--recipe=")), None)
    if path is None:
        return None
    from edgectl.recipes import command_defaults, load_recipe

    group = typer.main.get_command(app)
    command = next((a for a in argv if a in group.commands), None)
    if command is None:
        return None
    names = {p.name for p in group.commands[command].params}
    defaults = command_defaults(load_recipe(path), command)
    return {command: {k: v for k, v in defaults.items() if k in names}}


class Terminated(BaseException):
    """SIGTERM (a CI job's timeout, `kill`), raised where the main thread is, so cleanup runs
    as on Ctrl-C: bench kills its worker and removes its memory cgroup, temporary files go."""


def _on_sigterm(signum, frame):
    raise Terminated


def main(argv: list[str] | None = None) -> int:
    """Entry point. Returns the exit code: 0 ok, 1 domain error, 2 usage error, 130 Ctrl-C,
    143 SIGTERM."""
    import signal
    import threading

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _on_sigterm)
    clicks = _click_modules()
    exits = (typer.Exit, *(getattr(c.exceptions, "Exit", typer.Exit) for c in clicks))
    click_errors = tuple(c.ClickException for c in clicks)
    aborts = (typer.Abort, *(getattr(c.exceptions, "Abort", typer.Abort) for c in clicks))
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv or os.environ.get("EDGECTL_DEBUG") == "1"
    argv = [a for a in argv if a != "--debug"]
    if next((a for a in argv if not a.startswith("-")), None) in RUNTIME_COMMANDS:
        one_blas_thread()
    try:
        rc = app(args=argv, prog_name="edgectl", standalone_mode=False, default_map=_recipe_defaults(argv))
        return rc if isinstance(rc, int) else 0
    except exits as e:
        return e.exit_code
    except click_errors as e:
        e.show()
        return e.exit_code
    except Terminated:
        print("edgectl: terminated", file=sys.stderr)
        return 143
    except (KeyboardInterrupt, *aborts):
        print("edgectl: interrupted", file=sys.stderr)
        return 130
    except EdgectlError as e:
        if debug:
            raise
        msg = f"edgectl: error: {e}"
        if e.hint:
            msg += f" ({e.hint})"
        print(msg, file=sys.stderr)
        return 2 if isinstance(e, UsageError) else 1
    except Exception as e:  # an edgectl bug or an unexpected library failure
        if debug:
            raise
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        print(f"edgectl: internal error: {type(e).__name__}: {first} (rerun with --debug for the traceback)", file=sys.stderr)
        return 1


def entry() -> None:
    sys.exit(main())
