"""Speculative decoding over runtime Models: a cheap draft proposes K tokens, the target
checks them all in one forward call over [last accepted token, K drafts] (all_logits),
the longest prefix it agrees with is kept, then the target's own next token.

Drafts: another Model (a `.pte`, a shard set, or the same shard set at another precision:
each opened Model owns its KV cache), or `lookup[:N]`: prompt n-gram lookup, no model.

Exactness: at temperature 0 the output is token-identical to the target alone (a draft is
kept only where it is the target's argmax). With sampling, speculative sampling (Leviathan
et al., Chen et al.): draft x is kept with probability min(1, p(x)/q(x)), a rejection draws
from normalize(max(0, p - q)), and all K kept adds a bonus token from p; the output then
follows the target's distribution p whatever q is. p and q are generate.py's sampling
distribution (temperature, top_p); a lookup draft's q is a point mass.

The KV caches are indexed by position, so rejected entries are simply overwritten by the
next call at those positions: the target has always processed every output token but the
last; the draft re-feeds whatever accepted tokens it has not processed. A sliding layer's
ring (model_args.ring_len) serves a call only if the run went back at most `max_rewind`
positions (C - W + 1: the program's chunk at least, 1 for a one-token program), so K is
capped there.

Trace lanes (with `trace`, e.g. the target's): "verify", one span per target call after
the prefill; "draft", the draft's work: a lookup's proposals as spans, a model draft's own
trace (its model's spans) merged in by merge_draft_trace.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

from edgectl.runtime.generate import Generation, GenerationStats, SamplingConfig, draw, probabilities, sample
from edgectl.util.errors import EdgectlError, UsageError

LOOKUP_N = 3  # `lookup` alone: n-grams of 3 tokens down to 1
DEFAULT_K = 4  # --draft-tokens when not given
AUTO_K = (4, 1, 12)  # --draft-tokens auto: start, least, most
DRAFT_LANE, VERIFY_LANE = "draft", "verify"  # trace lanes


# ---------------------------------------------------------------------------------------
# Drafts


class LookupDraft:
    """Prompt n-gram lookup: the tokens that followed the most recent earlier occurrence of
    the last n tokens of prompt + output (n from `n` down to 1)."""

    def __init__(self, n: int = LOOKUP_N):
        self.n = n
        self.name = f"lookup:{n}"

    def reset(self) -> None:
        pass

    def propose(self, history: list[int], k: int, sampling: SamplingConfig, rng) -> tuple[list[int], list | None]:
        """Up to `k` tokens, and None for their q (point masses)."""
        import numpy as np

        L = len(history)
        if k <= 0 or L < 2:
            return [], None
        h = np.asarray(history, dtype=np.int64)
        for n in range(min(self.n, L - 1), 0, -1):
            # starts i < L - n (the suffix itself excluded) where h[i:i+n] == the last n tokens
            ok = np.ones(L - n, dtype=bool)
            for j in range(n):
                ok &= h[j : j + L - n] == h[L - n + j]
            hits = np.flatnonzero(ok)
            if hits.size:
                i = int(hits[-1]) + n
                return [int(t) for t in h[i : i + k]], None
        return [], None


class ModelDraft:
    """A Model proposing tokens from its own KV cache. `fed`: the tokens whose entries its
    cache holds, by position; each proposal re-feeds history from where they part."""

    def __init__(self, model, name: str):
        self.model, self.name, self.fed = model, name, []

    def reset(self) -> None:
        self.model.reset()
        self.fed = []

    def propose(self, history: list[int], k: int, sampling: SamplingConfig, rng) -> tuple[list[int], list | None]:
        """Up to `k` tokens (fewer near the draft's max_seq_len), and their q rows when sampling."""
        L, model = len(history), self.model
        k = min(k, model.max_seq_len - L + 1)
        if k <= 0:
            return [], None
        seen = 0
        for a, b in zip(self.fed, history):
            if a != b:
                break
            seen += 1
        seen = min(seen, L - 1)  # at least one token in, for the next logits
        logits = model.forward(history[seen:], seen)[-1]
        self.fed = list(history)
        toks, qs = [], []
        for i in range(k):
            if sampling.temperature > 0:
                qs.append(probabilities(logits, sampling))
                toks.append(draw(qs[-1], rng))
            else:
                toks.append(sample(logits, sampling))
            if i < k - 1:
                logits = model.forward([toks[-1]], L + i)[-1]
                self.fed.append(toks[-1])
        return toks, qs or None


# ---------------------------------------------------------------------------------------
# The acceptance step


def accept_probability(p, q, x: int) -> float:
    """The chance draft x is kept: min(1, p(x)/q(x)); q None: a point mass on x (p(x))."""
    if q is None:
        return float(p[x])
    return min(1.0, float(p[x]) / float(q[x])) if q[x] > 0 else 1.0


def residual(p, q, x: int):
    """The distribution a rejected draft x is replaced from: normalize(max(0, p - q))."""
    import numpy as np

    if q is None:
        r = np.array(p, dtype=np.float64)
        r[x] = 0.0
    else:
        r = np.maximum(np.asarray(p, dtype=np.float64) - q, 0.0)
    s = r.sum()
    return r / s if s > 0 else np.asarray(p, dtype=np.float64)  # s == 0 only when p == q: never rejected


def verify(logits, drafts: list[int], qs: list | None, sampling: SamplingConfig, rng) -> tuple[list[int], int]:
    """(the tokens this target call produces, how many drafts were kept) from the target's
    logits rows [len(drafts) + 1, vocab]: the kept drafts, then a correction or a bonus."""
    if sampling.temperature <= 0:
        for i, x in enumerate(drafts):
            t = sample(logits[i], sampling)
            if t != x:
                return [*drafts[:i], t], i
        return [*drafts, sample(logits[len(drafts)], sampling)], len(drafts)
    for i, x in enumerate(drafts):
        p = probabilities(logits[i], sampling)
        q = qs[i] if qs is not None else None
        if rng.random() >= accept_probability(p, q, x):
            return [*drafts[:i], draw(residual(p, q, x), rng)], i
    return [*drafts, draw(probabilities(logits[len(drafts)], sampling), rng)], len(drafts)


# ---------------------------------------------------------------------------------------
# The loop


@dataclass
class SpeculativeStats(GenerationStats):
    draft: str = ""
    k: int | str = 0  # drafts per call, or "auto"
    proposed: int = 0  # draft tokens offered to the target
    accepted: int = 0  # of those, kept
    target_calls: int = 0  # target forward calls after the prefill
    draft_s: float = 0.0  # time in the draft's proposals (within decode_s)

    @property
    def acceptance(self) -> float:
        return self.accepted / self.proposed if self.proposed else 0.0

    @property
    def tokens_per_target_call(self) -> float:
        """New tokens per target call after the prefill (1.0: no gain)."""
        return (self.new_tokens - 1) / self.target_calls if self.target_calls else 0.0

    def speculative_dict(self) -> dict:
        return {"draft": self.draft, "draft_tokens": self.k, "proposed": self.proposed, "accepted": self.accepted,
                "acceptance": self.acceptance, "tokens_per_target_call": self.tokens_per_target_call,
                "target_calls": self.target_calls, "draft_ms": self.draft_s * 1e3}

    def to_dict(self) -> dict:
        return {**super().to_dict(), "speculative": self.speculative_dict()}


class SpeculativeGeneration(Generation):
    """Generation's iterator with a draft: the same tokens at temperature 0, the same
    distribution when sampling; EOS, max_new_tokens and max_seq_len as Generation.
    `k`: drafts per target call, or "auto": from AUTO_K's start, 2 more after a call that
    kept them all, 1 fewer after one that did not."""

    def __init__(self, model, draft, prompt_ids: list[int], max_new_tokens: int, eos_ids: tuple[int, ...] = (),
                 sampling: SamplingConfig = SamplingConfig(), k: int | str = 4, trace=None):
        super().__init__(model, prompt_ids, max_new_tokens, eos_ids, sampling)
        self.draft, self.k, self.trace = draft, parse_draft_tokens(k), trace

    def __iter__(self) -> Iterator[int]:
        import numpy as np

        model, draft, sampling, eos_ids = self.model, self.draft, self.sampling, self.eos_ids
        gen = np.random.default_rng(sampling.seed) if sampling.temperature > 0 else None
        model.reset()
        draft.reset()
        st = SpeculativeStats(len(self.prompt_ids), 0, 0.0, 0.0, 0.0, "length", [], draft.name, self.k)
        t0 = time.perf_counter()
        logits = model.forward(self.prompt_ids, 0)[-1]
        t_prefill = time.perf_counter()
        tok = sample(logits, sampling, gen)
        ttft = time.perf_counter() - t0
        out, hist = [tok], [*self.prompt_ids, tok]
        yield tok
        t_dec = time.perf_counter()
        k_now = AUTO_K[0] if self.k == "auto" else self.k
        # rejected drafts send the target (and a model draft) back up to k positions: a
        # sliding layer's ring keeps its window over at most max_rewind (model_args.RingTrack)
        rewind = [r for m in (model, getattr(draft, "model", None)) if (r := getattr(m, "max_rewind", None))]
        k_most = min(rewind, default=None)
        trace = self.trace
        # a model draft's work is in its model's trace (merge_draft_trace); a lookup's is spanned here
        draft_trace = trace if getattr(draft, "model", None) is None else None
        while True:
            if out[-1] in eos_ids:
                st.stopped = "eos"
                break
            if len(out) >= self.max_new_tokens:
                break
            L = len(hist)  # the target has processed hist[:-1]; hist[-1] goes in at L - 1
            if L - 1 >= model.max_seq_len:
                st.stopped = "max_seq_len"
                break
            k = min(k_now, self.max_new_tokens - len(out) - 1, model.max_seq_len - L, k_most or k_now)
            t_d = time.perf_counter()
            with _span(draft_trace if k > 0 else None, DRAFT_LANE, draft.name):
                drafts, qs = draft.propose(hist, k, sampling, gen) if k > 0 else ([], None)
            st.draft_s += time.perf_counter() - t_d
            with _span(trace, VERIFY_LANE, "verify"):
                logits = model.forward([hist[-1], *drafts], L - 1, all_logits=bool(drafts))
            st.target_calls += 1
            st.proposed += len(drafts)
            new, kept = verify(logits, drafts, qs, sampling, gen)
            st.accepted += kept
            if self.k == "auto" and drafts:
                k_now = min(k_now + 2, AUTO_K[2]) if kept == len(drafts) else max(k_now - 1, AUTO_K[1])
            for t in new:
                out.append(t)
                hist.append(t)
                yield t
                if t in eos_ids:
                    break
        st.decode_s = time.perf_counter() - t_dec
        st.new_tokens, st.ttft_s, st.prefill_s, st.tokens = len(out), ttft, t_prefill - t0, out
        self.stats = st


def speculative_generate(model, draft, prompt_ids: list[int], max_new_tokens: int, eos_ids: tuple[int, ...] = (),
                         sampling: SamplingConfig = SamplingConfig(), k: int | str = 4,
                         on_token: Callable[[int], None] | None = None, trace=None) -> SpeculativeStats:
    """generate() with a draft (LookupDraft or ModelDraft) proposing `k` tokens a call;
    with `trace`, its "verify" and "draft" lanes (see the module's docstring)."""
    run = SpeculativeGeneration(model, draft, prompt_ids, max_new_tokens, eos_ids, sampling, k, trace)
    for tok in run:
        if on_token:
            on_token(tok)
    return run.stats


def _span(trace, lane: str, name: str):
    return trace.span(lane, name) if trace is not None else nullcontext()


def merge_draft_trace(trace, draft) -> None:
    """Append a model draft's own trace spans (its loads and forward calls) to `trace` on
    the "draft" lane, their times moved onto `trace`'s origin. A lookup draft has none."""
    from edgectl.runtime.trace import Span

    own = getattr(getattr(draft, "model", None), "trace", None)
    if own is None or own is trace:
        return
    shift = own.origin - trace.origin
    trace.spans += [Span(DRAFT_LANE, s.name, s.start + shift, s.end + shift) for s in own.spans]


# ---------------------------------------------------------------------------------------
# --draft SPEC


def parse_draft(spec: str, artifact: str | Path) -> tuple[str, object]:
    """("lookup", n), ("path", Path) or ("precision", name) for `--draft SPEC`."""
    if spec == "lookup" or spec.startswith("lookup:"):
        n = spec.partition(":")[2] or str(LOOKUP_N)
        if not n.isdigit() or int(n) < 1:
            raise UsageError(f"--draft {spec}: lookup:N takes a whole number N >= 1 (the longest n-gram)")
        return "lookup", int(n)
    if Path(spec).exists():
        return "path", Path(spec)
    a = Path(artifact)
    if a.is_dir() and (a / "manifest.json").exists():
        from edgectl.formats.manifest import Manifest

        have = Manifest.load(a).precisions
        if spec in have:
            return "precision", spec
        raise UsageError(f"--draft {spec}: not lookup[:N], an existing .pte or shard set, nor a precision of "
                         f"{artifact} ({', '.join(have)})")
    raise UsageError(f"--draft {spec}: not lookup[:N] nor an existing .pte or shard set "
                     "(a precision name needs a shard set as the artifact)")


def parse_draft_tokens(k: int | str | None) -> int | str:
    """`--draft-tokens`: a whole number >= 1, or "auto"; None: DEFAULT_K."""
    if k is None:
        return DEFAULT_K
    if k == "auto":
        return k
    if isinstance(k, str) and k.strip().isdigit():
        k = int(k)
    if not isinstance(k, int) or k < 1:
        raise UsageError(f"--draft-tokens {k}: a whole number >= 1, or auto")
    return k


def _tokenizer_files(path: Path) -> tuple[str, int]:
    """(tokenizer.json text, vocab_size) of a `.pte` or shard set, from its files."""
    if path.is_dir():
        from edgectl.formats.manifest import Manifest

        m = Manifest.load(path)
        return m.tokenizer_text(path), m.model["vocab_size"]
    from edgectl.runtime.runtime import read_meta

    meta, text = read_meta(path)
    return text, meta["model"]["vocab_size"]


def check_same_tokenizer(target, draft_path: Path, target_name: str) -> None:
    """One line when the draft at `draft_path` tokenizes otherwise than `target` (a Model):
    the same tokenizer.json (sha256), else the same vocabulary, and the same vocab_size."""
    import hashlib

    text, vocab = _tokenizer_files(draft_path)
    if vocab != target.meta["model"]["vocab_size"]:
        raise EdgectlError(f"--draft {draft_path}: its vocabulary has {vocab} tokens, {target_name}'s "
                           f"{target.meta['model']['vocab_size']}", hint="a draft needs the target's tokenizer")
    if text == target.tokenizer_json:
        return
    from tokenizers import Tokenizer as HFTokenizer

    try:
        same = HFTokenizer.from_str(text).get_vocab(True) == HFTokenizer.from_str(target.tokenizer_json).get_vocab(True)
    except Exception:  # noqa: BLE001  the tokenizers library raises a bare Exception
        same = False
    if not same:
        sha = [hashlib.sha256(t.encode()).hexdigest()[:12] for t in (text, target.tokenizer_json)]
        raise EdgectlError(f"--draft {draft_path}: its tokenizer (sha256 {sha[0]}…) differs from {target_name}'s "
                           f"({sha[1]}…)", hint="a draft needs the target's tokenizer")


def plan_draft(spec: tuple[str, object] | None, k: int | str | None, budget: int | None) -> tuple[str, int] | None:
    """What the target's budget plan counts for `spec` (ShardModel's `draft`): a precision of
    the same shard set, as (precision, k; `k` as --draft-tokens takes it, auto plans for its
    starting K). A lookup draft holds nothing. Another model as the draft under a budget is
    refused: the planner knows only the target's shard set."""
    if spec is None or not budget or spec[0] == "lookup":
        return None
    k = parse_draft_tokens(k)
    if spec[0] == "path":
        raise UsageError(f"--memory-budget with --draft {spec[1]}: the planner counts a draft from the same shard set "
                         "only", hint="give a precision of the shard set (e.g. --draft 8da4w) or lookup")
    return str(spec[1]), AUTO_K[0] if k == "auto" else int(k)


def open_draft(spec: tuple[str, object], artifact: str | Path, target):
    """The draft for a parsed `--draft` spec, beside the opened `target`: a LookupDraft, or
    a ModelDraft owning its own Model (and KV cache), for the target's context."""
    from edgectl.runtime.artifact import open_artifact

    kind, value = spec
    if kind == "lookup":
        return LookupDraft(value)
    if kind == "precision":  # the target's tokenizer: the same shard set's
        return ModelDraft(open_artifact(artifact, precision=value, context=target.max_seq_len,
                                        tokenizer=getattr(target, "tokenizer", None)), str(value))
    check_same_tokenizer(target, value, str(artifact))
    return ModelDraft(open_artifact(value, context=target.max_seq_len), str(value))
