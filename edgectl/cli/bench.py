"""`edgectl bench`: measure artifacts (each run in a fresh worker process) and render the table."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from edgectl.cli.app import RecipeOpt, ThreadsOpt, app
from edgectl.util.errors import UsageError


@app.command()
def bench(
    artifacts: Annotated[list[Path], typer.Argument(help="One or more .pte files (the same one twice compares runs).")],
    prompt_tokens: Annotated[Optional[int], typer.Option(min=1, help="Prompt length in tokens (a fixed real text; default 64).")] = None,
    prompt_file: Annotated[Optional[Path], typer.Option("--prompt-file", help="Prompts instead of the fixed text: a .jsonl in "
                                                        "MT-Bench's format (its first turns; run i of each row, over --repeat, "
                                                        "uses prompt i mod n, the same in every row: --repeat 8 runs 8 "
                                                        "questions) or any other file as one prompt, whole (e.g. an article + "
                                                        "\"Summarize the text above.\"). A prompt that with --new-tokens "
                                                        "passes the artifact's max_seq_len is an error, never cut. Not with "
                                                        "--prompt-tokens, nor --device ssh:/adb:.")] = None,
    chat: Annotated[Optional[bool], typer.Option("--chat/--no-chat", help="With --prompt-file: apply the model's chat "
                                                 "template to each prompt, as `run --chat` (default: on for a .jsonl, "
                                                 "off for a text file).")] = None,
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
    memory_budget: Annotated[Optional[str], typer.Option("--memory-budget", help="Shard sets: plan under each budget (whole process, comma-separated, e.g. 300MB,230MB), one row each.")] = None,
    precision: Annotated[Optional[str], typer.Option("--precision", help="Shard sets: also rows with every shard at each of these "
                                                     "precisions (comma-separated; 'plan' = the planner's mix), e.g. plan,int8,8da4w.")] = None,
    plan_file: Annotated[Optional[Path], typer.Option("--plan-file", help="Shard sets: one row following this plan "
                                                      "(from `run --plan --json`), e.g. against `export --plan`'s .pte.")] = None,
    mode: Annotated[Optional[str], typer.Option("--mode", help="Shard sets: placement mode(s), comma-separated (auto, resident, pipelined, on-demand), one row each.")] = None,
    cgroup: Annotated[bool, typer.Option("--cgroup", help="Run each worker in a memory cgroup capped at its budget, which counts the whole process (root; cgroup v2 or v1); OOM kills become a row status.")] = False,
    ctx_size: Annotated[Optional[int], typer.Option("--ctx-size", "-c", min=2, help="Positions each run uses: a shard set's KV cache is planned and charged for these, and --ppl scores windows this long (default: prompt + new tokens for generation, the longest prompt with --prompt-file, the artifact's max_seq_len for --ppl).")] = None,
    draft: Annotated[Optional[str], typer.Option("--draft", help="Speculative decoding: also a row per draft (comma-separated), "
                                                 "beside the same case without one: a precision of the shard set, a "
                                                 ".pte or shard set with the same tokenizer, or lookup[:N] (prompt "
                                                 "n-gram lookup). Greedy; e.g. --precision fp32 --draft 8da4w,lookup.")] = None,
    draft_tokens: Annotated[Optional[str], typer.Option("--draft-tokens", help="With --draft: tokens drafted per target "
                                                        "call, K (default 4) or auto.")] = None,
    device: Annotated[Optional[list[str]], typer.Option("--device", help="Measure on this device: ssh:user@host:port (user "
                                                        "and port optional; the artifacts are sent to its store once, "
                                                        "by sha256), or `local`. Repeat it for rows of several devices "
                                                        "in one table; each row names its device.")] = None,
    runner: Annotated[Optional[Path], typer.Option("--runner", help="With --device adb:SERIAL: ExecuTorch's llama_main "
                                                   "built for Android arm64 (pushed once; see the README, Android).")] = None,
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
    Example: edgectl bench smol-shards/ smol-int8.pte --memory-budget 300MB,230MB --mode resident,pipelined --cgroup
    Example: edgectl bench smol.pte smol-shards/ --device local --device ssh:pi@raspberrypi.local --memory-budget 300MB
    Example: edgectl bench smol-shards/ --precision fp32 --draft 8da4w,lookup --prompt-file mt_bench_question.jsonl --repeat 8
    """
    from rich.console import Console

    from edgectl.util import ui
    from edgectl.bench.bench import run_bench
    from edgectl.bench.report import BenchSettings, render_table

    if ppl_tokens and not ppl:
        raise UsageError("--ppl-tokens needs --ppl")
    if plot is not None and plot.suffix.lower() != ".png":
        raise UsageError(f"--plot {plot}: expected a .png path")
    _json_path_given_as_artifact(artifacts)
    if runner is not None and not device:
        raise UsageError("--runner needs --device adb:SERIAL")
    if prompt_file is not None and prompt_tokens is not None:
        raise UsageError("--prompt-file and --prompt-tokens: give one", hint="the file's prompts set their own lengths")
    if chat is not None and prompt_file is None:
        raise UsageError(f"--{'' if chat else 'no-'}chat needs --prompt-file")
    if prompt_file is not None and any(d.startswith("adb:") for d in device or []):
        raise UsageError("--prompt-file is not supported with --device adb: (llama_main takes one prompt)",
                         hint="bench it here or on an ssh: device")
    if prompt_file is None and prompt_tokens is None:
        prompt_tokens = 64
    settings = BenchSettings(prompt_tokens, new_tokens, repeat, threads, cold, ppl, ppl_tokens, cgroup, ctx_size,
                             prompt_file, chat)
    if draft is not None and any(d.startswith("adb:") for d in device or []):
        raise UsageError("--draft is not supported with --device adb: (llama_main decodes alone)",
                         hint="bench speculative decoding here or on an ssh: device")
    cases = bench_cases(artifacts, memory_budget, mode, cgroup, precision, plan_file, draft, draft_tokens)
    with ui.stages("benchmarking") as step:
        if device:
            report = _bench_devices(device, artifacts, cases, settings, step, keep_going, runner, memory_budget=memory_budget,
                                    precision=precision, mode=mode, plan_file=plan_file, draft=draft,
                                    draft_tokens=draft_tokens)
        else:
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


def _bench_devices(devices: list[str], artifacts: list[Path], cases: list, settings, step, keep_going: bool,
                   runner: Path | None, **plan_opts):
    """Rows of every device in one report: `local` measured here, ssh: targets by the same bench
    on the device (edgectl/device/remote_bench.py), each row carrying its device's facts."""
    from edgectl.bench.bench import run_bench
    from edgectl.bench.report import BenchReport, Row, machine, set_decode_ratios
    from edgectl.device.target import parse_target
    from edgectl.util import ui

    targets = [None if d == "local" else parse_target(d) for d in devices]
    if runner is not None and not any(t is not None and t.kind == "adb" for t in targets):
        raise UsageError("--runner needs --device adb:SERIAL")
    rows, notes, cold, baseline, prompt_file = [], [], settings.cold, None, None
    for t in targets:
        if t is None:
            step("here")
            local = run_bench(cases, settings, progress=step, warn=ui.warn, keep_going=keep_going)
            m = machine()
            here = {"name": "here", "machine": m["machine"], "cpu": m["cpu"], "cores": m["cpu_count"],
                    "mem_total_bytes": m["mem_total_bytes"], "emulated": False}
            for r in local.rows:
                r.device = here
            rows += local.rows
            notes += local.notes
            cold, baseline = cold and local.cold, baseline or local.cgroup_baseline
            prompt_file = local.prompt_file
            continue
        if t.kind == "adb":
            step(t.name)
            rows += _bench_android(t, artifacts, settings, runner, plan_opts)
            continue
        from edgectl.device.remote_bench import bench_remote

        step(t.name)
        data, _ = bench_remote(t, [a.resolve() for a in artifacts], _remote_options(settings, keep_going, **plan_opts),
                               remeasure=plan_opts["memory_budget"] is not None,
                               files={"--ppl": settings.ppl_file, "--plan-file": plan_opts["plan_file"],
                                      "--prompt-file": settings.prompt_file},
                               drafts=_draft_paths(cases))
        rows += [Row.from_dict(r, Path(r["artifact"])) for r in data["rows"]]
        if prompt_file is None and data["settings"].get("prompt_file"):  # the device read the same bytes (sha256)
            prompt_file = {**data["settings"]["prompt_file"], "path": str(settings.prompt_file.resolve())}
        notes += [f"{t.name}: {n}" for n in data.get("notes", [])]
        cold = cold and data["settings"].get("cold", False)
        baseline = baseline or data["settings"].get("cgroup_baseline")
    set_decode_ratios(rows)
    return BenchReport(settings, rows, cold, notes, baseline, prompt_file)


def _bench_android(target, artifacts: list[Path], settings, runner: Path | None, plan_opts: dict) -> list:
    """Rows of `adb:` devices: ExecuTorch's llama_main on each .pte (edgectl/device/android.py)."""
    from edgectl.bench.report import Case, Row
    from edgectl.device.android import bench_android

    unsupported = [f for f, on in (("--memory-budget", plan_opts["memory_budget"]), ("--precision", plan_opts["precision"]),
                                    ("--mode", plan_opts["mode"]), ("--plan-file", plan_opts["plan_file"]),
                                    ("--ppl", settings.ppl_file), ("--cgroup", settings.cgroup), ("--cold", settings.cold),
                                    ("--ctx-size", settings.ctx_size)) if on]
    if unsupported:
        raise UsageError(f"{unsupported[0]} is not supported with adb: devices",
                         hint="the phone runs ExecuTorch's stock runner on .pte files (export --target android)")
    rows = []
    for a in artifacts:
        if a.is_dir():
            raise UsageError(f"{a}: shard sets do not run on adb: devices", hint="give a .pte from export --target android")
        got = bench_android(target, a, prompt_tokens=settings.prompt_tokens, new_tokens=settings.new_tokens,
                            repeat=settings.repeat, threads=settings.threads, runner=runner)
        rows.append(Row(Case(a.resolve()), a.stat().st_size, got["runs"], device=got["device"]))
    return rows


def _draft_paths(cases: list) -> list[Path]:
    """The draft artifacts (.pte files, shard sets) the cases name, each once, in order."""
    paths = [Path(c.options["draft"]) for c in cases if "draft" in c.options and Path(c.options["draft"]).is_absolute()]
    return list(dict.fromkeys(paths))


def _remote_options(s, keep_going: bool, memory_budget: str | None, precision: str | None, mode: str | None,
                    plan_file: Path | None, draft: str | None = None, draft_tokens: str | None = None) -> list[str]:
    """The device's `bench` flags for these settings (files, --ppl, --plan-file, --prompt-file and
    draft artifacts, are sent apart; bench_remote puts their device paths into --draft)."""
    args = ["--new-tokens", str(s.new_tokens), "--repeat", str(s.repeat)]
    if s.prompt_file is None:
        args += ["--prompt-tokens", str(s.prompt_tokens)]
    elif s.chat is not None:  # the file itself is sent apart, as --prompt-file
        args.append("--chat" if s.chat else "--no-chat")
    for flag, value in (("--threads", s.threads), ("--ppl-tokens", s.ppl_tokens), ("--memory-budget", memory_budget),
                        ("--precision", precision), ("--mode", mode), ("--ctx-size", s.ctx_size),
                        ("--draft", draft), ("--draft-tokens", draft_tokens)):
        if value is not None:
            args += [flag, str(value)]
    return args + [flag for flag, on in (("--cold", s.cold), ("--cgroup", s.cgroup), ("--keep-going", keep_going)) if on]


def _json_path_given_as_artifact(artifacts: list[Path]) -> None:
    """`bench A.pte --json out.json` was the old spelling: out.json now lands among the
    artifacts. Say what changed instead of "no such file"."""
    for a in artifacts:
        if a.suffix == ".json" and not a.is_dir():
            raise UsageError(f"{a}: not an artifact; --json is a flag now (JSON on stdout)",
                             hint=f"write it to a file with -o {a}")


def bench_cases(artifacts: list[Path], memory_budget: str | None, mode: str | None, cgroup: bool,
                precision: str | None = None, plan_file: Path | None = None, draft: str | None = None,
                draft_tokens: str | None = None) -> list:
    """One Case per artifact x budget x mode x precision: a shard set gets every budget, mode
    and precision ('plan' = the planner's own mix); a .pte gets every budget only under
    --cgroup (as a cap), and no mode or precision. With `draft` (comma-separated --draft
    specs), each of those cases is followed by one Case per draft, the same options plus
    `draft` (a path made absolute) and, when given, `draft_tokens`."""
    from edgectl.bench.report import Case
    from edgectl.runtime.plan import MODES, parse_bytes

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
    return _with_drafts(cases, draft, draft_tokens)


def _with_drafts(cases: list, draft: str | None, draft_tokens: str | None) -> list:
    """Each case, then the same case with each `--draft` spec (checked here: one line, exit 2)."""
    from dataclasses import replace

    from edgectl.runtime.speculative import parse_draft, parse_draft_tokens

    if draft is None:
        if draft_tokens is not None:
            raise UsageError("--draft-tokens needs --draft")
        return cases
    specs = [d.strip() for d in draft.split(",")]
    if not all(specs):
        raise UsageError(f"--draft {draft!r}: an empty spec", hint="e.g. --draft 8da4w,lookup")
    k = {"draft_tokens": parse_draft_tokens(draft_tokens)} if draft_tokens is not None else {}
    out = []
    for c in cases:
        out.append(c)
        for spec in specs:
            kind, value = parse_draft(spec, c.artifact)
            if kind == "path" and not (value.is_file() or (value / "manifest.json").is_file()):
                raise UsageError(f"--draft {spec}: neither a .pte file nor a shard set (a directory with manifest.json)")
            out.append(replace(c, options={**c.options, "draft": str(value.resolve()) if kind == "path" else spec, **k}))
    return out
