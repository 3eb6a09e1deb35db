"""Bench results: the cases, settings, rows and report of `edgectl bench`, their JSON and their table.

JSON schema (`BenchReport.to_dict()`, written by `edgectl bench --json`), schema_version 1.
Sizes in bytes, times in ms, rates in tokens per second:

    schema_version: int                 1; bumped on any incompatible change
    edgectl_version: str
    created: str                        ISO 8601, UTC
    versions: {python, torch, executorch, torchao: str | null}
    machine: {platform, machine, cpu: str, cpu_count: int, mem_total_bytes: int | null,
              emulated: bool (user-mode emulation: timings mean nothing)}
    settings: {prompt_tokens: int | null (null with a prompt file), new_tokens, repeat: int,
               threads: int | null, cold_requested, cold, warmup: bool, ppl_file: str | null,
               ppl_tokens: int | null, cgroup: bool, cgroup_baseline: int | null,
               ctx_size: int | null,
               prompt_file: {path: str (absolute), sha256: str (of its bytes), format: "jsonl" |
                             "text", prompts: int (in the file), chat: bool (chat template
                             applied)} | null}   `bench --prompt-file` (bench/prompts.py); null:
                                        the built-in text cut to prompt_tokens
    notes: [str]                        e.g. why --cold fell back to warm, a busy machine
    rows: [{
        label: str                      file name plus options (#n for repeats), as in the table
        artifact: str                   absolute path (.pte file or shard-set directory)
        options: {str: any}             the Case's options ({} for a plain artifact); with
                                        `bench --draft`: draft (a precision of the shard set,
                                        a .pte/shard-set path, or lookup[:N]) and, when given,
                                        draft_tokens (K or "auto"; 4 when absent)
        file_bytes: int                 the .pte, or all files of a directory
        runs: [{                        one per repeat, in order
            cache_dropped: bool
            loadavg_1m: float           the machine's 1-minute load average before the run
            prompt_tokens, new_tokens: int   prompt_tokens: the run's prompt (chat template included)
            prompt_index: int           with a prompt file: the prompt run i used (i mod prompts),
                                        the same for run i of every row
            ttft_ms, prefill_ms, decode_ms, prefill_tok_s, decode_tok_s: float
            output_sha256: str          16 hex digits of the sha256 of the generated ids (greedy:
                                        a draft row's equals its no-draft row's)
            load_ms: float              sum of the trace's "load" lane (as `edgectl run`): the
                                        target's; a draft's is speculative.draft_load_ms
            open_ms: float              wall time of opening the artifact and its tokenizer
                                        (and the draft, with one)
            first_token_ms: float       open_ms + TTFT of the process's first generation (the
                                        warm-up's when there is one): start to first token
            rss_before_load: int        VmRSS after torch + runtime import, before load
            rss_after_load, rss_end, rss_anon_end, rss_file_end: int
            peak_rss: int               VmHWM at the end of the run
            model_rss: int              peak_rss - rss_before_load (a draft model's included)
            max_seq_len: int            the artifact's KV cache length
            context: int                positions the run could use (--ctx-size; its KV
                                        cache was planned and charged for these)
            plan: {...} | null          a shard set's plan (planner.Plan.to_dict), also as
                                        plan_mode, plan_total_bytes, plan_precisions, ...
            warmup: {prompt_tokens, new_tokens, ttft_ms, prefill_ms, decode_ms,
                     prefill_tok_s, decode_tok_s, speculative?} | null
            phases: {warmup?: [start_s, end_s], measured: [start_s, end_s]}
            trace: [{lane, name: str, start, end: float seconds from the trace origin}]
                                        lanes "load", "compute", ...; with a draft also
                                        "verify" (a span per target call after the prefill)
                                        and "draft" (a draft model's own spans, or a span
                                        per lookup proposal)
            speculative: {draft: str, draft_tokens: int | "auto", proposed, accepted: int,
                          acceptance: float (accepted / proposed),
                          tokens_per_target_call: float ((new_tokens - 1) / target_calls),
                          target_calls: int, draft_ms, draft_load_ms: float}
                                        only on a draft row (speculative decoding, greedy;
                                        exactly new_tokens generated, EOS ignored as without)
        }]
        summary: {load_ms, ttft_ms, first_token_ms, prefill_tok_s, decode_tok_s, peak_rss, model_rss
                  [, acceptance, tokens_per_target_call on a draft row]:
                  {mean: float, sd: float | null (null when n < 2), min, max: float, n: int}}
        decode_ratio: float             mean decode tok/s over the first row's
        speedup_vs_no_draft: float | null  a draft row's mean decode tok/s over the no-draft
                                        row of the same artifact and other options in this
                                        bench (null: no draft, or no such row measured)
        device: {name, machine, cpu: str, cores: int, mem_total_bytes: int | null,
                 emulated: bool} | null   where the row ran (`bench --device`; null: here)
        ppl: {file: str, ppl, nll: float, tokens_scored, text_tokens, windows,
              window_tokens: int, bos_prefixed: bool, seconds, load_ms: float,
              cgroup_scoring_allowance: int (with --cgroup: added to the cap of this run,
              see scoring_allowance),
              followed_generation_plan: bool (a budget row with --ctx-size scores the
              plan its first generation run made, see _same_plan),
              peak_rss, model_rss: int, ...} | null   (null on a draft row: speculative
              decoding leaves the target's distribution, its no-draft row's ppl, unchanged)
    }]
"""

from __future__ import annotations

import os
import platform
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path

from edgectl.bench.bench_draft import DRAFT_OPTIONS, DRAFT_SUMMARY_KEYS, has_draft, set_draft_speedups
from edgectl.util.version import __version__

FAILED = ("failed", "oom")  # run statuses that fail a row (and the bench, without --keep-going)

SCHEMA_VERSION = 1
SUMMARY_KEYS = ("load_ms", "ttft_ms", "first_token_ms", "prefill_tok_s", "decode_tok_s", "peak_rss", "model_rss")


@dataclass(frozen=True)
class Case:
    """One table row: an artifact and the options it runs with.

    Options: `budget` (bytes; a shard set is planned into it, and with --cgroup any
    artifact runs under a cap of its budget, which counts the whole process), `mode`
    (a shard set's placement mode, planner.MODES), `precision`, `plan_file`, and `draft`
    with `draft_tokens` (speculative decoding, bench_draft.py; shown last)."""

    artifact: Path
    options: dict = field(default_factory=dict)

    @property
    def label(self) -> str:
        def fmt(k, v):
            if k == "plan_file" or (k == "draft" and os.sep in str(v)):
                return f"{'plan' if k == 'plan_file' else k}={Path(v).name}"
            return f"{k}={v / 1e6:g}MB" if k == "budget" else f"{k}={v}"

        opts = " ".join(fmt(k, v) for k, v in sorted(self.options.items(), key=lambda kv: (kv[0] in DRAFT_OPTIONS, kv[0])))
        return f"{self.artifact.name} {opts}".strip()


@dataclass(frozen=True)
class BenchSettings:
    prompt_tokens: int | None = 64  # None with prompt_file
    new_tokens: int = 128
    repeat: int = 3
    threads: int | None = None
    cold: bool = False
    ppl_file: Path | None = None
    ppl_tokens: int | None = None
    cgroup: bool = False
    ctx_size: int | None = None  # positions per run (bench_worker.Job.ctx_size)
    prompt_file: Path | None = None  # prompts instead of the built-in text (bench/prompts.py)
    chat: bool | None = None  # apply the chat template to them (None: on for a .jsonl)


@dataclass
class Row:
    case: Case
    file_bytes: int
    runs: list[dict] = field(default_factory=list)
    ppl: dict | None = None
    decode_ratio: float = float("nan")
    device: dict | None = None  # where it ran, with --device (see the schema)
    speedup_vs_no_draft: float | None = None  # a draft row's (bench_draft.set_draft_speedups)

    @property
    def ok_runs(self) -> list[dict]:
        return [r for r in self.runs if r.get("status", "ok") == "ok"]

    @property
    def status(self) -> str:
        """"ok", or what stopped some runs ("oom 2/3": the cgroup OOM-killed 2 of 3;
        "failed 1/1": the worker failed, see `error`; "infeasible": the planner found no
        plan within the budget), or "not run" (an earlier row failed without --keep-going)."""
        if not self.runs:
            return "not run"
        bad = [r["status"] for r in self.runs if r.get("status", "ok") != "ok"]
        if not bad and self.ppl and self.ppl.get("status", "ok") in FAILED:
            return f"ppl {self.ppl['status']}"
        return "ok" if not bad else f"{bad[0]} {len(bad)}/{len(self.runs)}"

    @property
    def error(self) -> str | None:
        """Why the row failed (a worker's error, or an OOM kill), None if it did not."""
        for r in [*self.runs, *([self.ppl] if self.ppl else [])]:
            if r.get("status") == "failed":
                return r["error"]
            if r.get("status") == "oom":
                cap = r.get("cgroup_limit")
                return "OOM-killed under its memory cgroup cap" + (f" ({cap / 1e6:.0f} MB)" if cap else "")
        return None

    @property
    def summary(self) -> dict | None:
        ok = self.ok_runs
        if not ok:
            return None
        out = {k: summarise([r[k] for r in ok]) if all(r.get(k) is not None for r in ok) else None for k in SUMMARY_KEYS}
        if has_draft(self.case.options) and all(r.get("speculative") for r in ok):
            out.update({k: summarise([r["speculative"][k] for r in ok]) for k in DRAFT_SUMMARY_KEYS})
        return out

    def to_dict(self, label: str | None = None) -> dict:
        return {
            "label": label or self.case.label,
            "artifact": str(self.case.artifact),
            "options": dict(self.case.options),
            "file_bytes": self.file_bytes,
            "status": self.status,
            "failed": self.error is not None,
            "error": self.error,
            "runs": self.runs,
            "summary": self.summary,
            "decode_ratio": self.decode_ratio,
            "speedup_vs_no_draft": self.speedup_vs_no_draft,
            "ppl": self.ppl,
            "device": self.device,
        }

    @classmethod
    def from_dict(cls, d: dict, artifact: Path | None = None, device: dict | None = None) -> "Row":
        """A row of another bench's JSON (a device's), its artifact named by the local path."""
        return cls(Case(artifact or Path(d["artifact"]), dict(d.get("options") or {})), d["file_bytes"],
                   list(d.get("runs") or []), d.get("ppl"), d.get("decode_ratio", float("nan")),
                   device if device is not None else d.get("device"), d.get("speedup_vs_no_draft"))


def set_decode_ratios(rows: list[Row]) -> None:
    """Each row's mean decode tok/s over the first measured row's, and each draft row's over
    its no-draft row's (speedup_vs_no_draft)."""
    def decode(r: Row) -> float | None:
        return r.summary["decode_tok_s"]["mean"] if r.summary and r.summary["decode_tok_s"] else None

    base = next((d for r in rows if (d := decode(r))), None)
    for row in rows:
        row.decode_ratio = decode(row) / base if base and decode(row) else float("nan")
    set_draft_speedups(rows)


@dataclass
class BenchReport:
    settings: BenchSettings
    rows: list[Row]
    cold: bool  # whether the page cache really was dropped
    notes: list[str] = field(default_factory=list)
    cgroup_baseline: int | None = None  # peak cgroup charge of a worker that loads no model
    prompt_file: dict | None = None  # the prompt file run (PromptFile.to_dict), as settings.prompt_file

    @property
    def failed_rows(self) -> list[Row]:
        return [r for r in self.rows if r.error is not None]

    @property
    def measured_rows(self) -> list[Row]:
        """Rows with at least one run that finished (ok or infeasible): what a table shows."""
        return [r for r in self.rows if any(x.get("status", "ok") not in FAILED for x in r.runs)]

    def labels(self) -> list[str]:
        """Row labels, with #1, #2... where the same case is listed more than once."""
        base = [(r.case.label, (r.device or {}).get("name")) for r in self.rows]  # on another device: another row
        seen: dict[tuple, int] = {}
        out = []
        for b in base:
            seen[b] = seen.get(b, 0) + 1
            out.append(f"{b[0]} #{seen[b]}" if base.count(b) > 1 else b[0])
        return out

    def to_dict(self) -> dict:
        s = self.settings
        return {
            "schema_version": SCHEMA_VERSION,
            "edgectl_version": __version__,
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "versions": versions(),
            "machine": machine(),
            "settings": {
                "prompt_tokens": s.prompt_tokens,
                "new_tokens": s.new_tokens,
                "repeat": s.repeat,
                "threads": s.threads,
                "cold_requested": s.cold,
                "cold": self.cold,
                "warmup": not self.cold,
                "ppl_file": str(s.ppl_file) if s.ppl_file else None,
                "ppl_tokens": s.ppl_tokens,
                "cgroup": s.cgroup,
                "cgroup_baseline": self.cgroup_baseline,
                "ctx_size": s.ctx_size,
                "prompt_file": self.prompt_file,
            },
            "notes": self.notes,
            "rows": [r.to_dict(label) for r, label in zip(self.rows, self.labels())],
        }


def summarise(xs: list[float]) -> dict:
    return {
        "mean": statistics.fmean(xs),
        "sd": statistics.stdev(xs) if len(xs) > 1 else None,
        "min": min(xs),
        "max": max(xs),
        "n": len(xs),
    }


def versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version()}
    for pkg in ("torch", "executorch", "torchao"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = None
    return out


def machine() -> dict:
    cpu, mem = platform.processor() or platform.machine(), None
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("model name", "Model")):
                cpu = line.split(":", 1)[1].strip()
                break
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem = int(line.split()[1]) * 1024
    except OSError:
        pass
    from edgectl.util.emulation import emulated

    return {"platform": platform.platform(), "machine": platform.machine(), "cpu": cpu, "cpu_count": os.cpu_count(),
            "mem_total_bytes": mem, "emulated": emulated()}


def device_label(d: dict | None) -> str:
    """`name (CPU ×cores, M GiB[, emulated])` for the table's device column."""
    if not d:
        return "here"
    mem = f", {d['mem_total_bytes'] / 2**30:.0f} GiB" if d.get("mem_total_bytes") else ""
    return f"{d['name']} ({d.get('cpu') or d.get('machine') or '?'} ×{d.get('cores')}{mem}" + \
        (", emulated)" if d.get("emulated") else ")")


def _pm(s: dict, fmt: str = ".1f") -> str:
    return f"{s['mean']:{fmt}}" + (f" ± {s['sd']:{fmt}}" if s["sd"] is not None else "")


def render_table(report: BenchReport):
    """The results as a rich Table (the caller prints it)."""
    from rich.table import Table

    s = report.settings
    mode = "cold" if report.cold else "warm"
    pf = report.prompt_file
    what = f"prompts of {Path(pf['path']).name} ({pf['prompts']}{', chat' if pf['chat'] else ''})" if pf else \
        f"{s.prompt_tokens} prompt"
    title = f"edgectl bench: {what} + {s.new_tokens} new tokens, {s.repeat} run(s), {mode}, threads {s.threads or 'default'}"
    if report.cgroup_baseline is not None:
        title += f", cgroup cap = budget (runtime floor {report.cgroup_baseline / 1e6:.0f} MB included)"
    emulated = [(not r.device and machine()["emulated"]) or bool((r.device or {}).get("emulated")) for r in report.rows]
    if any(emulated):  # the device column names which rows when some are not
        title += ", EMULATED (timings mean nothing)" if all(emulated) else ", rows marked emulated: their timings mean nothing"
    t = Table(title=title, title_justify="left")
    devices = any(r.device for r in report.rows)
    cols = ["artifact", *(["device"] if devices else []), "size MB", "load ms", "TTFT ms", "open→1st token ms", "prefill tok/s", "decode tok/s", "peak RSS MB", "model RSS MB"]
    planned = any(r.get("plan_total_bytes") is not None for row in report.rows for r in row.runs)
    if planned:
        cols.append("plan MB")
    if s.cgroup:
        cols.append("cgroup peak MB")
    show_status = s.cgroup or any(r.status != "ok" for r in report.rows)
    if show_status:
        cols.append("status")
    if any(r.ppl for r in report.rows):
        cols.append("ppl")
    drafts = any(has_draft(r.case.options) for r in report.rows)
    if drafts:
        cols += ["accept %", "tok/call", "× no draft"]
    cols.append("decode ×")
    for name in cols:
        t.add_column(name, justify="left" if name in ("artifact", "device") else "right", no_wrap=True)
    for r, label in zip(report.rows, report.labels()):
        m = r.summary
        cells = [label, *([device_label(r.device)] if devices else []), f"{r.file_bytes / 1e6:.1f}"]
        if m is None:
            cells += ["-"] * 7
        else:
            cells += [_pm(m[k]) if m[k] else "-" for k in ("load_ms", "ttft_ms", "first_token_ms", "prefill_tok_s", "decode_tok_s")]
            cells += [f"{m[k]['mean'] / 1e6:.0f}" if m[k] else "-" for k in ("peak_rss", "model_rss")]
        if planned:
            p = [x["plan_total_bytes"] for x in r.ok_runs if x.get("plan_total_bytes") is not None]
            cells.append(f"{p[0] / 1e6:.1f}" if p else "")
        if s.cgroup:
            peaks = [x["cgroup_peak"] for x in r.runs if x.get("cgroup_peak") is not None]
            cells.append(f"{max(peaks) / 1e6:.0f}" if peaks else "")
        if show_status:
            cells.append(r.status)
        if "ppl" in cols:
            pp = r.ppl if r.ppl and r.ppl.get("status", "ok") == "ok" else None
            cells.append(f"{pp['ppl']:.3f} ({pp['tokens_scored']} tok)" if pp else (r.ppl or {}).get("status", ""))
        if drafts:
            acc, per = (m or {}).get("acceptance"), (m or {}).get("tokens_per_target_call")
            cells += [f"{acc['mean'] * 100:.0f}" if acc else "", _pm(per, ".2f") if per else "",
                      f"{r.speedup_vs_no_draft:.2f}×" if r.speedup_vs_no_draft else ""]
        cells.append(f"{r.decode_ratio:.2f}×" if r.decode_ratio == r.decode_ratio else "-")  # nan: no decode figure
        t.add_row(*cells)
    return t
