"""Bench rows with a draft: speculative decoding (edgectl/runtime/speculative.py) in a bench
worker, and what the report adds for it.

A Case's options `draft` (a `--draft` spec: a precision of the same shard set, a `.pte` or
shard-set path, or `lookup[:N]`) and `draft_tokens` (K or "auto"; default DEFAULT_K) make
the worker generate through speculative_generate: greedy, bench's fixed prompt, and, as
without a draft, EOS does not stop it (eos_ids=()), so a draft row generates exactly as
many tokens as its no-draft row (speculative_generate never drafts past max_new_tokens).

The draft is opened right after the artifact (its opening is in the run's open_ms, so in
first_token_ms; its load time is `speculative.draft_load_ms`, not in load_ms, which stays
the target's). Its trace spans join the run's trace on the "draft" lane, and each target
verify call is a span on the "verify" lane.
"""

from __future__ import annotations

import hashlib

from edgectl.runtime.speculative import DEFAULT_K  # noqa: F401  (a case's draft_tokens default)

DRAFT_OPTIONS = ("draft", "draft_tokens")
DRAFT_SUMMARY_KEYS = ("acceptance", "tokens_per_target_call")


def open_case_draft(artifact: str, options: dict, model):
    """The draft a case's options name, opened beside the opened target `model` (None without one)."""
    if options.get("draft") is None:
        return None
    from edgectl.runtime.speculative import open_draft, parse_draft

    return open_draft(parse_draft(options["draft"], artifact), artifact, model)


def generate_fixed(model, ids: list[int], new_tokens: int, drafter=None, options: dict | None = None, trace=None):
    """Exactly `new_tokens` tokens (EOS ignored), greedy: generate(), or speculative_generate()
    with `drafter` and the case's draft_tokens, tracing verify/draft lanes into `trace`."""
    if drafter is None:
        from edgectl.runtime.generate import generate

        return generate(model, ids, new_tokens, eos_ids=())
    from edgectl.runtime.generate import SamplingConfig
    from edgectl.runtime.speculative import speculative_generate

    k = (options or {}).get("draft_tokens", DEFAULT_K)
    return speculative_generate(model, drafter, ids, new_tokens, (), SamplingConfig(), k, trace=trace)


def speculative_figures(stats, drafter) -> dict:
    """A run's `speculative` entry (SpeculativeStats.speculative_dict + the draft's load time)."""
    model = getattr(drafter, "model", None)
    load_ms = model.trace.total("load") * 1e3 if model is not None else 0.0
    return {**stats.speculative_dict(), "draft_load_ms": load_ms}


def output_digest(tokens: list[int]) -> str:
    """First 16 hex digits of the sha256 of the generated ids: equal digests, equal outputs."""
    return hashlib.sha256(",".join(map(str, tokens)).encode()).hexdigest()[:16]


def merge_trace(trace, drafter) -> None:
    if drafter is not None:
        from edgectl.runtime.speculative import merge_draft_trace

        merge_draft_trace(trace, drafter)


# ---------------------------------------------------------------------------------------
# The report's side


def has_draft(options: dict) -> bool:
    return options.get("draft") is not None


def set_draft_speedups(rows: list) -> None:
    """Each draft row's mean decode tok/s over its no-draft row's: the same artifact, the
    same options but the draft ones, on the same device, in this bench. None where either
    is missing; None on rows without a draft."""
    def decode(r) -> float | None:
        return r.summary["decode_tok_s"]["mean"] if r.summary and r.summary["decode_tok_s"] else None

    def key(r) -> tuple:
        opts = {k: v for k, v in r.case.options.items() if k not in DRAFT_OPTIONS}
        return r.case.artifact, tuple(sorted(opts.items(), key=str)), (r.device or {}).get("name")

    base = {}
    for r in rows:
        if not has_draft(r.case.options) and decode(r):
            base.setdefault(key(r), decode(r))
    for r in rows:
        b = base.get(key(r)) if has_draft(r.case.options) else None
        r.speedup_vs_no_draft = decode(r) / b if b and decode(r) else None
