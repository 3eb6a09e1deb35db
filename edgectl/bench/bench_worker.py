"""One bench measurement in a fresh process: `python -m edgectl.bench.bench_worker JOB_JSON`.

`edgectl bench` starts this module once per measured run, so every run pays its own load
and its peak memory is its own. Its one argument is a `Job` as a JSON object. It prints
exactly one JSON object on stdout (anything else the libraries write to stdout is sent to
stderr) and exits 0, or prints `{"ok": false, "error": ..., "hint": ...}` and exits 1.

Modes:
  gen  open the artifact, encode a fixed prompt (or read prompt_ids_file, `bench
       --prompt-file`'s prompt, see prompts.py), generate exactly new_tokens tokens
       through the same code path as `edgectl run` (artifact.open_artifact + generate).
       With warmup, one generation first (its figures are reported as `warmup`: they
       are what `edgectl run` shows, first-call costs included), then the measured one.
       With a `draft` option, speculative decoding (see bench_draft.py).
  ppl  perplexity of the artifact itself on a text file (see `ppl_windows`).
  baseline  set up torch, the runtime, the tokenizer library and the thread pool, open
       nothing, and report the process's memory: the interpreter baseline that
       `bench --cgroup` adds to a budget.

Options (`options`, a dict): `budget` (bytes) and `mode` go to `artifact.open_artifact` for
a shard set, which plans under them; a `.pte` ignores them here (bench caps its memory
with a cgroup instead). The plan's figures are reported as plan_*. ctx_size is the
positions a run uses (its KV cache is planned and charged for those, and perplexity
windows are that long): by default the prompt plus the new tokens for gen, the
artifact's max_seq_len for ppl.

Memory: the baseline is VmRSS read from /proc/self/status after torch, the ExecuTorch
runtime, the tokenizer library and the thread pool are set up, but before the artifact is
opened. Linux cannot reset VmHWM, so the peak is VmHWM read at the end of the run; as the
baseline is below the peak, `model_rss = peak - baseline` is what opening and running the
model added (weights, packed weights, KV cache, activations, tokenizer).
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from dataclasses import dataclass, field, fields

from edgectl.util.scoring import picked_log_probs, ppl_windows, prompt_ids

MODES = ("gen", "ppl", "baseline")


@dataclass(frozen=True)
class Job:
    """One measurement: `python -m edgectl.bench.bench_worker '{"artifact": ..., "mode": ...}'`."""

    artifact: str
    mode: str = "gen"  # gen, ppl or baseline
    prompt_tokens: int | None = 64  # of the built-in text (util/scoring.prompt_ids); unused with prompt_ids_file
    prompt_ids_file: str | None = None  # the prompt's token ids, encoded by bench (int32, as write_ids writes)
    new_tokens: int = 128
    warmup: bool = False  # one unmeasured generation before the measured one
    threads: int | None = None
    options: dict = field(default_factory=dict)  # the Case's options
    ppl_file: str | None = None
    ppl_tokens: int | None = None
    ppl_ids: str | None = None  # the ppl_file's token ids, already encoded (int32, as write_ids writes)
    ctx_size: int | None = None  # positions the run uses (default: prompt + new tokens for gen, max_seq_len for ppl)

    @classmethod
    def from_json(cls, text: str) -> Job:
        if not isinstance(d := json.loads(text), dict):
            raise ValueError("expected a JSON object")
        if unknown := set(d) - {f.name for f in fields(cls)}:
            raise ValueError(f"unknown keys {sorted(unknown)}")
        job = cls(**d)
        if job.mode not in MODES:
            raise ValueError(f"mode {job.mode!r}: expected one of {', '.join(MODES)}")
        return job




def read_status() -> dict[str, int]:
    """VmRSS, VmHWM (peak RSS), RssAnon and RssFile of this process, in bytes."""
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, rest = line.partition(":")
            if key in ("VmRSS", "VmHWM", "RssAnon", "RssFile"):
                out[key] = int(rest.split()[0]) * 1024
    return out


def model_chunk(model) -> int:
    """Most tokens the artifact takes per program call (what its forward splits a long
    input into): scoring a window in pieces of this size computes the same logits."""
    manifest = getattr(model, "manifest", None)
    return (manifest.max_tokens_per_call if manifest is not None else getattr(model, "chunk", None)) or model.max_seq_len


def window_nll(model, window: list[int], piece: int) -> float:
    """Sum of -log p(window[t] | window[:t]) for t = 1..T-1, feeding the window `piece`
    tokens at a time and scoring each piece's logits at once: a whole window's logits
    (2048 x 49152 fp32 = 403 MB) never exist, so a memory-capped run can score it (a shard
    set hands them over SINK_ROWS rows at a time, see ShardModel.forward). The
    picked log-probs are summed in one reduction, as nll_sum does."""
    import numpy as np

    picked = []
    sinks = getattr(model, "SINK_ROWS", None) is not None  # a shard set hands over a few rows at a time
    for a in range(0, len(window), piece):
        part = window[a : a + piece]
        targets = window[a + 1 : a + len(part) + 1]  # the last piece's last row predicts nothing
        if sinks:
            def sink(r, logits, targets=targets):
                if r < len(targets):
                    picked.append(picked_log_probs(logits, targets[r : r + len(logits)]))

            model.forward(part, a, all_logits=True, sink=sink)
            continue
        logits = model.forward(part, a, all_logits=True)
        if targets:
            picked.append(picked_log_probs(logits, targets))
    return float(-np.concatenate(picked).sum())


def _gen_figures(stats) -> dict:
    return {
        "prompt_tokens": stats.prompt_tokens,
        "new_tokens": stats.new_tokens,
        "ttft_ms": stats.ttft_s * 1e3,
        "prefill_ms": stats.prefill_s * 1e3,
        "decode_ms": stats.decode_s * 1e3,
        "prefill_tok_s": stats.prefill_tok_s,
        "decode_tok_s": stats.decode_tok_s,
    }


def measure_gen(job: Job, model, tok, drafter=None) -> dict:
    from edgectl.bench.bench_draft import generate_fixed, output_digest, speculative_figures

    def gen():
        stats = generate_fixed(model, ids, job.new_tokens, drafter, job.options, model.trace)
        figures = _gen_figures(stats)
        return {**figures, "speculative": speculative_figures(stats, drafter)} if drafter else figures, stats

    ids = read_ids(job.prompt_ids_file) if job.prompt_ids_file else prompt_ids(tok, job.prompt_tokens)
    need = len(ids) + job.new_tokens
    if need > model.max_seq_len:
        from edgectl.util.errors import EdgectlError

        raise EdgectlError(
            f"{len(ids)} prompt + {job.new_tokens} new tokens exceed this artifact's max_seq_len {model.max_seq_len}",
            hint="lower --new-tokens or the prompt's length",
        )
    phases, warm = {}, None
    o = model.trace.origin
    if job.warmup:
        t0 = time.perf_counter()
        warm = gen()[0]
        phases["warmup"] = [t0 - o, time.perf_counter() - o]
    t0 = time.perf_counter()
    figures, stats = gen()
    phases["measured"] = [t0 - o, time.perf_counter() - o]
    return {**figures, "output_sha256": output_digest(stats.tokens), "warmup": warm, "phases": phases}


def encode_for_ppl(tok, path: str, n_tokens: int | None) -> list[int]:
    """The token ids perplexity scores: the first `n_tokens` of the file's text (all of it
    when None), encoded without BOS. Only a long enough prefix is encoded (a whole
    corpus' encoding costs ~100 MB)."""
    with open(path, encoding="utf-8") as f:
        text = f.read()
    if not n_tokens:
        return tok.encode(text, bos=False)
    n_chars = 8 * n_tokens
    while True:
        ids = tok.encode(text[:n_chars], bos=False)
        # two tokens to spare: only the last pre-token can differ from the full text's
        if len(ids) >= n_tokens + 2 or n_chars >= len(text):
            return ids[:n_tokens]
        n_chars *= 2


def write_ids(ids: list[int], path) -> None:
    import array

    with open(path, "wb") as f:
        array.array("i", ids).tofile(f)


def read_ids(path) -> list[int]:
    import array
    import os

    a = array.array("i")
    with open(path, "rb") as f:
        a.fromfile(f, os.path.getsize(path) // a.itemsize)
    return a.tolist()


def measure_ppl(job: Job, model, tok) -> dict:
    if job.ppl_ids:  # encoded by `edgectl bench` itself, outside this (possibly capped) process
        ids = read_ids(job.ppl_ids)
    else:
        ids = encode_for_ppl(tok, job.ppl_file, job.ppl_tokens)
        from edgectl.util.native import malloc_trim

        malloc_trim()  # the tokenizer's working memory: measured +32 MB of heap kept after a 160k-char encode
    wins = ppl_windows(ids, model.max_seq_len, tok.bos_id if tok.add_bos else None)
    if not wins:
        from edgectl.util.errors import EdgectlError

        raise EdgectlError(f"{job.ppl_file}: too little text to score")
    t0 = time.perf_counter()
    nll, n = 0.0, 0
    piece = model_chunk(model)
    from edgectl.util.native import malloc_trim

    for w in wins:
        model.reset()
        nll += window_nll(model, w, piece)
        n += len(w) - 1
        # glibc's main heap keeps freed logits/score buffers in holes it never returns
        # (a memory-capped run measured up to +110 MB of [heap] that way): hand them back
        malloc_trim()
    return {
        "file": os.path.abspath(job.ppl_file),
        "ppl": math.exp(nll / n),
        "nll": nll,
        "tokens_scored": n,
        "text_tokens": len(ids),
        "windows": len(wins),
        "window_tokens": model.max_seq_len,
        "bos_prefixed": tok.add_bos,
        "seconds": time.perf_counter() - t0,
    }


def measure(job: Job) -> dict:
    from edgectl.runtime import artifact, methods, runtime
    from edgectl.runtime.run import tokenizer_for
    from edgectl.runtime.tokenizer import Tokenizer  # noqa: F401  (imports `tokenizers`)

    options = job.options
    if unknown := set(options) - {"budget", "mode", "precision", "plan_file", "draft", "draft_tokens"}:
        from edgectl.util.errors import EdgectlError

        raise EdgectlError(f"unsupported bench options for {job.artifact}: {sorted(unknown)}")
    native = methods.engine()  # the runtime library and the shim (or, without it, the binding and torch)
    if native is None:
        methods._load_runtime()
    runtime.set_threads(job.threads)
    if job.mode == "baseline":
        if native is not None:
            native.thread_count()  # the pool, as a shard set starts it
        else:
            from executorch.extension.pybindings import portable_lib

            portable_lib._threadpool_get_thread_count()
        from edgectl.runtime import generate, run  # noqa: F401  (code every run imports: not the model's)

        s = read_status()
        return {"rss": s["VmRSS"], "peak_rss": s["VmHWM"]}
    before = read_status()
    trace = runtime.Trace()
    shard_set = os.path.isdir(job.artifact)
    kw = {k: options[k] for k in ("budget", "mode", "precision") if k in options} if shard_set else {}
    if shard_set and "plan_file" in options:
        from edgectl.runtime.plan import Plan

        kw["plan"] = Plan.load(options["plan_file"])
    if shard_set and options.get("draft") is not None and options.get("budget"):
        from edgectl.runtime.speculative import parse_draft, plan_draft

        kw["draft"] = plan_draft(parse_draft(options["draft"], job.artifact), options.get("draft_tokens"), options["budget"])
    # positions this run uses: the KV cache a shard set plans for, and the perplexity window
    kw["context"] = job.ctx_size or (job.prompt_tokens + job.new_tokens if job.mode == "gen" else None)
    t_open = time.perf_counter()
    model = artifact.open_artifact(job.artifact, trace=trace, **kw)
    from edgectl.bench.bench_draft import merge_trace, open_case_draft

    drafter = open_case_draft(job.artifact, options, model) if job.mode == "gen" else None
    after_load = read_status()
    tok = tokenizer_for(model)
    open_ms = (time.perf_counter() - t_open) * 1e3  # the draft's opening included
    result = measure_gen(job, model, tok, drafter) if job.mode == "gen" else measure_ppl(job, model, tok)
    result["open_ms"] = open_ms
    if job.mode == "gen":  # wall time from opening the artifact to its first generated token
        result["first_token_ms"] = open_ms + (result["warmup"] or result)["ttft_ms"]
    end = read_status()
    result.update(
        load_ms=trace.total("load") * 1e3,
        rss_before_load=before["VmRSS"],
        rss_anon_before_load=before["RssAnon"],
        rss_anon_after_load=after_load["RssAnon"],
        rss_after_load=after_load["VmRSS"],
        rss_end=end["VmRSS"],
        rss_anon_end=end["RssAnon"],
        rss_file_end=end["RssFile"],
        peak_rss=end["VmHWM"],
        model_rss=end["VmHWM"] - before["VmRSS"],
        max_seq_len=getattr(model, "cache_len", model.max_seq_len),
        context=model.max_seq_len,
    )
    merge_trace(trace, drafter)  # the draft's spans on the "draft" lane (after load_ms, the target's)
    result["trace"] = trace.to_dict()["spans"]
    plan = getattr(model, "plan", None)
    if plan is not None:
        result.update(plan_mode=plan.mode, plan_total_bytes=plan.total_bytes, plan_budget_bytes=plan.budget_bytes,
                      plan_precisions={c.name: c.precision for c in plan.shards},
                      plan_placements={c.name: c.placement for c in plan.shards},
                      plan=plan.to_dict(),
                      engine=model.engine_name)
    return result


def main(argv: list[str] | None = None) -> int:
    from edgectl.util.env import one_blas_thread

    one_blas_thread()  # before torch loads (see edgectl/__init__.py)
    argv = sys.argv[1:] if argv is None else argv
    try:
        if len(argv) != 1:
            raise ValueError("expected one argument, the job as a JSON object")
        job = Job.from_json(argv[0])
    except (ValueError, TypeError) as e:
        print(f"usage: python -m edgectl.bench.bench_worker JOB_JSON: {e}", file=sys.stderr)
        return 2
    # Keep stdout for our one JSON object: whatever else writes to fd 1 goes to stderr.
    sys.stdout.flush()
    real_stdout = os.dup(1)
    os.dup2(2, 1)
    from edgectl.util.errors import EdgectlError

    try:
        out, rc = {"ok": True, **measure(job)}, 0
    except EdgectlError as e:
        out, rc = {"ok": False, "error": str(e), "hint": e.hint}, 1
    sys.stdout.flush()
    with os.fdopen(real_stdout, "w") as f:
        f.write(json.dumps(out) + "\n")
    return rc


if __name__ == "__main__":
    sys.exit(main())
