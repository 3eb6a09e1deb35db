"""Bench stage: measure artifacts the way `edgectl run` runs them, each run in a fresh process.

`run_bench(cases, settings)` returns a `BenchReport`; it never prints. Each `Case` (an
artifact plus options; later issues add modes and memory budgets as options) is measured
`repeat` times, each time in a new `python -m edgectl.bench.bench_worker` process, so load time
and peak memory are that run's own. Runs go round-robin over the cases (case 1 run 1,
case 2 run 1, case 1 run 2, ...) so slow drift on a shared machine hits every case alike.

Warm (default): before the runs the artifact's files are read once (page cache warm), and
inside each process one generation runs before the measured one (first-call costs such as
XNNPACK set-up are out of the measured figures; they are in `warmup`, which is what
`edgectl run` would print). Cold (`cold=True`): the page cache is dropped before every run
(root only) and there is no warm-up generation: each run is a first run after boot.

With a prompt file (settings.prompt_file, `bench --prompt-file`), run i of every row uses
prompt i mod n of the file, encoded here (edgectl.bench.prompts) and handed to the worker.

The results (`Case`, `BenchSettings`, `Row`, `BenchReport`, their JSON schema and table) are
in edgectl.bench.report.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from edgectl.bench.report import FAILED, BenchReport, BenchSettings, Case, Row, set_decode_ratios
from edgectl.util.errors import EdgectlError, UsageError

DROP_CACHES = "/proc/sys/vm/drop_caches"


def artifact_files(path: Path) -> list[Path]:
    return sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]


def file_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in artifact_files(path))


def warm_page_cache(path: Path) -> None:
    for p in artifact_files(path):
        with open(p, "rb") as f:
            while f.read(1 << 24):
                pass


def evict_page_cache(path: Path) -> int:
    """Drop `path`'s files and the packed-weight cache's files from the page cache (only
    pages nobody maps go), so a memory cgroup run next is charged for every file page it
    touches: cgroup v1 charges a cached page to whoever read it first, and a page read
    by an earlier run, or by `warm_page_cache`, would cost the capped run nothing.
    Returns the number of files advised."""
    from edgectl.runtime import packed_cache

    files = list(artifact_files(path))
    root = packed_cache.default_root()
    if root is not None and root.is_dir():
        files += [p for p in root.iterdir() if p.is_file()]
    from edgectl.util.files import advise

    for p in files:
        advise(p, os.POSIX_FADV_DONTNEED)
    return len(files)


def drop_page_cache() -> str | None:
    """Write back dirty pages and drop the page cache. Returns why it could not, or None."""
    if os.geteuid() != 0:
        return f"dropping the page cache needs root (writing {DROP_CACHES})"
    try:
        os.sync()
        with open(DROP_CACHES, "w") as f:
            f.write("3\n")
    except OSError as e:
        return f"cannot write {DROP_CACHES} ({e.strerror})"
    return None


def worker(case: Case, settings: BenchSettings, mode: str = "gen", warmup: bool = False, cap=None,
           ppl_ids: Path | None = None, prompt: dict | None = None) -> dict:
    """Run one measurement in a fresh `python -m edgectl.bench.bench_worker` and return its figures.

    `prompt`: Job fields of a --prompt-file prompt (BenchPrompts.job), over the settings'.

    With `cap` (a memcap.MemCap) the worker runs in that memory cgroup; its figures gain
    the group's (cgroup_peak, ...), and a worker the group OOM-killed returns
    {"status": "oom", ...} instead of raising."""
    job = {"artifact": str(case.artifact), "mode": mode, "prompt_tokens": settings.prompt_tokens,
           "new_tokens": settings.new_tokens, "options": case.options, "threads": settings.threads or None,
           "ctx_size": settings.ctx_size or None, "warmup": warmup, **(prompt or {})}
    if mode == "ppl":
        job.update(ppl_file=str(settings.ppl_file), ppl_tokens=settings.ppl_tokens or None,
                   ppl_ids=None if ppl_ids is None else str(ppl_ids))
    cmd = [sys.executable, "-m", "edgectl.bench.bench_worker", json.dumps(job)]
    env = dict(os.environ)
    root = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
    if cap is not None and cap.limit is not None:
        evict_page_cache(case.artifact)
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, preexec_fn=cap.preexec if cap else None)
    if os.environ.get("EDGECTL_DEBUG") == "1" and proc.stderr:
        sys.stderr.write(proc.stderr)
    group = cap.figures() if cap else {}
    if cap and proc.returncode < 0 and (group["cgroup_oom_kills"] or group["cgroup_failcnt"]):
        return {"status": "oom", "exit_signal": -proc.returncode, **group}
    lines = proc.stdout.strip().splitlines()
    try:
        out = json.loads(lines[-1]) if lines else None
    except json.JSONDecodeError:
        out = None
    if not isinstance(out, dict):
        last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise EdgectlError(f"bench worker for {case.label} failed (exit {proc.returncode}): {last}", hint="rerun with --debug for its stderr")
    if not out.pop("ok", False):
        err = str(out.get("error"))
        if case.options.get("budget") is not None and err.startswith(("a budget of", "no plan")):
            return {"status": "infeasible", "error": err, **group}  # the planner's answer for this budget: a row
        raise EdgectlError(f"{case.label}: {err}", hint=out.get("hint"))
    return {"status": "ok", **out, **group}


def _capped(case: Case, settings: BenchSettings, extra: int = 0):
    """The memory cgroup a run of `case` goes in: its budget (which counts the whole
    process, runtime floor included) + `extra` (the perplexity scorer's own buffers), or
    uncapped (still measured) when the case has no budget. None without --cgroup."""
    if not settings.cgroup:
        return None
    from edgectl.bench.memcap import MemCap

    budget = case.options.get("budget")
    return MemCap(budget + extra if budget is not None else None)


def scoring_allowance(artifact: Path, ctx_size: int | None = None) -> int:
    """Memory the perplexity harness itself needs beyond a generation run, added to the cap
    of --ppl runs under --cgroup, and reported: it is the scorer's cost, not the model's.
    A shard set hands the scorer ShardModel.SINK_ROWS rows of logits at a time (staged
    fp32); a `.pte` returns one program call's logits for every position, which are copied
    out. Plus the float64 log-softmax buffers of util.scoring.log_prob_chunks."""
    from edgectl.util.scoring import SCORE_ROWS

    if artifact.is_dir():
        from edgectl.formats.manifest import Manifest
        from edgectl.runtime.shards_runtime import ShardModel

        m = Manifest.load(artifact)
        vocab, rows = m.model["vocab_size"], ShardModel.SINK_ROWS
    else:
        from edgectl.formats.ptefile import constant_bytes

        meta = json.loads(constant_bytes(artifact, "edgectl_meta"))
        vocab, piece = meta["model"]["vocab_size"], meta.get("prefill_chunk") or meta["max_seq_len"]
        rows = 2 * min(piece, ctx_size or piece)
    return rows * vocab * 4 + 2 * SCORE_ROWS * vocab * 8


def write_packed_caches(rows: list[Row], settings: BenchSettings, progress: Callable[[str], None],
                        prompt: Callable[[Path, int], dict] = lambda artifact, i: {}) -> list[str]:
    """A shard set's first run writes its packed-weight cache files (XNNPACK's packed
    weights, one file per program, see packed_cache): a one-time cost per machine and
    precision, which a capped or cold measurement would otherwise count in whichever run
    comes first. Under a cgroup cap the new file pages are charged to that run (SmolLM2's
    int8 plan at 250 MB decoded at 2.6 tok/s in the run that wrote them, 120 in the next).
    So each shard-set row runs once first, one new token, unmeasured and uncapped. Returns
    the note saying so (none when there is no shard set or the cache is disabled)."""
    from edgectl.runtime import packed_cache

    sets = [r for r in rows if r.case.artifact.is_dir()]
    if not sets or packed_cache.default_root() is None:
        return []
    t0 = time.perf_counter()
    once = dataclasses.replace(settings, new_tokens=1)
    for row in sets:
        progress(f"{row.case.label}: writing its packed-weight cache (unmeasured, uncapped)")
        try:
            worker(row.case, once, prompt=prompt(row.case.artifact, 0))
        except EdgectlError:
            pass  # the measured runs report what fails
    return [f"each shard-set row ran once before the measured runs, unmeasured and uncapped, so its packed-weight "
            f"cache files exist ({time.perf_counter() - t0:.0f} s): writing them is a first run's one-time cost"]


def cgroup_baseline(settings: BenchSettings, cold: bool = False) -> int:
    """Peak cgroup charge of a worker that loads the runtime library and the tokenizer
    library and starts the thread pool, but opens no model: the runtime floor as a cgroup
    charges it (reported beside the rows; a budget includes it),
    measured the way the runs will be charged. Warm: measured twice, keeping the second:
    the first may read the libraries from disk and be charged for their page cache
    (measured: 630 MB against 290 MB warm), which a model run, finding them cached, is not.
    Cold (`cold`): once, with the page cache dropped first, as before each cold run, which
    is charged for every library page it reads (a cap on the warm baseline left a resident
    int8 plan at 250 MB thrashing at 7 tok/s against 110 warm)."""
    from edgectl.bench.memcap import MemCap

    for _ in range(1 if cold else 2):
        if cold and (why := drop_page_cache()):
            raise EdgectlError(f"--cold: {why}")
        with MemCap(None) as cap:
            out = worker(Case(Path(sys.executable)), settings, mode="baseline", cap=cap)
    return out["cgroup_peak"]


def _ppl_ids(artifact: Path, settings: BenchSettings, tmp: Path, encoded: dict) -> Path:
    """The --ppl text encoded here, once per tokenizer, for the workers to read: the
    tokenizer's working memory (tens of MB for 160k characters) stays out of the
    measured, possibly capped, process."""
    import hashlib

    from edgectl.bench.bench_worker import encode_for_ppl, write_ids
    from edgectl.runtime.run import artifact_tokenizer

    tok = artifact_tokenizer(artifact)
    key = hashlib.sha256(tok.tokenizer_json.encode()).hexdigest()[:16]
    if key not in encoded:
        encoded[key] = tmp / f"{key}.ids"
        write_ids(encode_for_ppl(tok, str(settings.ppl_file), settings.ppl_tokens), encoded[key])
    return encoded[key]


@contextlib.contextmanager
def _same_plan(row: Row, settings: BenchSettings):
    """The case a row's perplexity run measures: with a budget and a fixed --ctx-size, the
    plan its generation runs followed (a fresh process measures its own start-up costs,
    which can tip the planner to another mix), so the row's speed and perplexity belong
    to one plan. Otherwise the row's own case."""
    plan = next((r["plan"] for r in row.ok_runs if r.get("plan")), None)
    if plan is None or not settings.ctx_size or row.case.options.get("budget") is None:
        yield row.case
        return
    with tempfile.TemporaryDirectory(prefix="edgectl-bench-") as d:
        path = Path(d) / "plan.json"
        path.write_text(json.dumps(plan))
        yield dataclasses.replace(row.case, options={"plan_file": str(path)})


def _measure(row: Row, run, record: Callable[[dict], None]) -> bool:
    """Call `run()` (one worker) and hand its figures to `record`; a worker error becomes
    a "failed" result. True if the row still stands (not failed, not OOM-killed)."""
    try:
        got = run()
    except EdgectlError as e:
        got = {"status": "failed", "error": f"{e} ({e.hint})" if e.hint else str(e)}
    record(got)
    return got.get("status", "ok") not in FAILED


def run_bench(
    cases: list[Case],
    settings: BenchSettings,
    progress: Callable[[str], None] = lambda msg: None,
    warn: Callable[[str], None] = lambda msg: None,
    keep_going: bool = False,
) -> BenchReport:
    """Measure every case `settings.repeat` times (and its perplexity with `ppl_file`).
    A row that fails or is OOM-killed is marked and measured no further; without
    `keep_going` it also stops the bench (the rows after it stay "not run")."""
    if not cases:
        raise UsageError("give at least one artifact")
    if settings.repeat < 1 or (settings.prompt_file is None and settings.prompt_tokens < 1) or settings.new_tokens < 2:
        raise UsageError("--repeat and --prompt-tokens must be >= 1, --new-tokens >= 2")
    for c in cases:
        if not c.artifact.exists():
            raise EdgectlError(f"{c.artifact}: no such file or directory")
    if settings.ppl_file is not None and not settings.ppl_file.is_file():
        raise EdgectlError(f"--ppl {settings.ppl_file}: no such file")
    with tempfile.TemporaryDirectory(prefix="edgectl-prompts-") as tmp:
        prompts = None
        if settings.prompt_file is not None:
            from edgectl.bench.prompts import BenchPrompts, read_prompt_file

            prompts = BenchPrompts(read_prompt_file(settings.prompt_file, settings.chat), settings.repeat,
                                   settings.new_tokens, settings.ctx_size, Path(tmp))
            for c in cases:
                prompts.prepare(c.artifact)  # every prompt checked against every artifact before any run
        report = _run_rows(cases, settings, progress, warn, keep_going, prompts)
        report.prompt_file = prompts.prompts.to_dict() if prompts else None
        return report


def _run_rows(cases: list[Case], settings: BenchSettings, progress: Callable[[str], None], warn: Callable[[str], None],
              keep_going: bool, prompts) -> BenchReport:
    """run_bench's measurements, `prompts` (a BenchPrompts, or None: the built-in text) prepared."""
    def prompt(artifact: Path, i: int) -> dict:
        return prompts.job(artifact, i) if prompts else {}

    rows = [Row(c, file_bytes(c.artifact)) for c in cases]
    notes, cold = [], settings.cold
    baseline = None
    if settings.cgroup:
        from edgectl.bench.memcap import unavailable

        if why := unavailable():
            raise EdgectlError(f"--cgroup: {why}")
    if cold and (why := drop_page_cache()):
        notes.append(f"--cold: {why}; measured warm instead")
        warn(notes[-1])
        cold = False
    if settings.cgroup:
        progress(f"measuring the runtime floor (cgroup{', cold' if cold else ''})")
        baseline = cgroup_baseline(settings, cold)
    if settings.cgroup or cold:
        notes += write_packed_caches(rows, settings, progress, prompt)
    if not cold:
        for c in cases:
            warm_page_cache(c.artifact)
    stopped = False
    for i in range(settings.repeat):
        for row in rows:
            if stopped or row.error is not None:
                continue
            progress(f"{row.case.label}: run {i + 1}/{settings.repeat}{' (cold)' if cold else ''}")
            dropped = cold and drop_page_cache() is None
            if cold and not dropped:
                raise EdgectlError("the page cache could be dropped once but not again")
            load_avg = os.getloadavg()[0]
            cap = _capped(row.case, settings)
            try:
                which = {"prompt_index": prompts.index(i)} if prompts else {}
                ok = _measure(row, lambda: worker(row.case, settings, warmup=not cold, cap=cap,
                                                  prompt=prompt(row.case.artifact, i)),
                              lambda got: row.runs.append({"cache_dropped": dropped, "loadavg_1m": load_avg, **which, **got}))
            finally:
                if cap:
                    cap.close()
            stopped = not ok and not keep_going
    busiest = max((r["loadavg_1m"] for row in rows for r in row.runs), default=0.0)
    if busiest > (os.cpu_count() or 1):
        notes.append(f"1-minute load average up to {busiest:.1f} on {os.cpu_count()} CPUs: other work shared the CPUs, expect noise")
        warn(notes[-1])
    if settings.ppl_file is not None:
        encoded: dict[str, Path] = {}
        tmp = tempfile.TemporaryDirectory(prefix="edgectl-ppl-")
        for row in rows:
            if stopped:
                break
            if not row.runs or row.error is not None or any(r.get("status") == "infeasible" for r in row.runs):
                continue
            if row.case.options.get("draft") is not None:
                continue  # speculative decoding leaves the target's distribution unchanged: its no-draft row's ppl
            progress(f"{row.case.label}: perplexity on {settings.ppl_file.name}")
            allowance = scoring_allowance(row.case.artifact, settings.ctx_size) if settings.cgroup else 0
            cap = _capped(row.case, settings, allowance)
            ids = _ppl_ids(row.case.artifact, settings, Path(tmp.name), encoded)
            with _same_plan(row, settings) as case:
                try:
                    ok = _measure(row, lambda: worker(case, settings, mode="ppl", cap=cap, ppl_ids=ids),
                                  lambda got: setattr(row, "ppl", got))
                finally:
                    if cap:
                        cap.close()
            stopped = not ok and not keep_going
            row.ppl["followed_generation_plan"] = case is not row.case
            if settings.cgroup:
                row.ppl["cgroup_scoring_allowance"] = allowance
            row.ppl.pop("trace", None)
        tmp.cleanup()
    set_decode_ratios(rows)
    return BenchReport(settings, rows, cold, notes, baseline)
