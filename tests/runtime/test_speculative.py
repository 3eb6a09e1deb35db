"""Speculative decoding (edgectl/runtime/speculative.py): the acceptance step leaves the
target's distribution unchanged (exactly, on hand-made distributions, and statistically
through the whole loop on small Markov models with position-indexed caches); greedy output
is token-identical to the target alone on stories260K (a draft at another precision of the
same shard set, another .pte, lookup) and on SmolLM2 over MT-Bench prompts."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import numpy as np
import pytest

from edgectl.runtime.generate import SamplingConfig, generate, probabilities
from edgectl.runtime.speculative import (AUTO_K, LookupDraft, ModelDraft, SpeculativeGeneration, accept_probability,
                                         parse_draft, parse_draft_tokens, residual, speculative_generate, verify)
from edgectl.util.errors import EdgectlError, UsageError

# ---------------------------------------------------------------------------------------
# The acceptance step, exactly

P = np.array([0.5, 0.2, 0.15, 0.1, 0.05, 0.0])
QS = [
    np.array([0.1, 0.1, 0.3, 0.3, 0.1, 0.1]),  # q puts mass where p has none
    np.array([0.9, 0.0, 0.05, 0.05, 0.0, 0.0]),  # q misses tokens p has
    np.array([0.0, 0.0, 0.0, 0.0, 1.0, 0.0]),  # a point mass on a token p finds unlikely
    P.copy(),
]


@pytest.mark.parametrize("q", QS, ids=["spread", "narrow", "point", "equal"])
def test_one_step_gives_p_exactly(q):
    """Sum over drafts x ~ q of [keep x with a(x), else draw from the residual] is p."""
    out = np.zeros_like(P)
    for x in np.flatnonzero(q):
        a = accept_probability(P, q, x)
        assert 0.0 <= a <= 1.0
        out[x] += q[x] * a
        out += q[x] * (1 - a) * residual(P, q, x)
    np.testing.assert_allclose(out, P, atol=1e-12)


@pytest.mark.parametrize("x", range(6))
def test_point_mass_draft_gives_p_exactly(x):
    """A lookup draft (q a point mass on x, for any x): keep x with p(x), else draw from p without x."""
    a = accept_probability(P, None, x)
    out = a * np.eye(len(P))[x] + (1 - a) * residual(P, None, x)
    np.testing.assert_allclose(out, P, atol=1e-12)


def test_greedy_verify_keeps_the_agreeing_prefix():
    logits = np.full((4, 6), -1.0)
    for row, best in enumerate((2, 5, 1, 3)):
        logits[row, best] = 1.0
    g = SamplingConfig()
    assert verify(logits, [2, 5, 1], None, g, None) == ([2, 5, 1, 3], 3)  # all kept, then the bonus
    assert verify(logits, [2, 4, 1], None, g, None) == ([2, 5], 1)  # the correction replaces the first miss
    assert verify(logits, [0, 5, 1], None, g, None) == ([2], 0)
    assert verify(logits[:1], [], None, g, None) == ([2], 0)


# ---------------------------------------------------------------------------------------
# Small Markov models with a position-indexed cache, through the whole loop


class MarkovModel:
    """The Model protocol over a table of logits by the two previous tokens, which it reads
    from its own cache (token ids by position): a stale entry (a rejected draft not
    overwritten) or a gap before `start` changes or fails what it returns."""

    def __init__(self, table: np.ndarray, max_seq_len: int = 64):
        self.table, self.max_seq_len, self.calls = table, max_seq_len, []
        self.cache = np.full(max_seq_len, -1)
        self.meta = {"model": {"vocab_size": table.shape[-1]}}

    def reset(self) -> None:
        self.cache[:] = -1

    def forward(self, tokens, start, all_logits=False):
        assert start + len(tokens) <= self.max_seq_len and (self.cache[:start] >= 0).all()
        self.calls.append(len(tokens))
        self.cache[start : start + len(tokens)] = tokens
        pos = range(start, start + len(tokens)) if all_logits else [start + len(tokens) - 1]
        return np.stack([self.table[self.cache[i - 1] if i else -1, self.cache[i]] for i in pos])


def _tables(vocab: int, seed: int, scale: float = 1.5) -> tuple[np.ndarray, np.ndarray]:
    r = np.random.default_rng(seed)
    target = r.normal(0, scale, (vocab + 1, vocab, vocab))  # [prev2 (last: none), prev1, next]
    return target, target + r.normal(0, scale, target.shape)  # a draft that is often wrong


@pytest.mark.parametrize("cfg", [SamplingConfig(1.0), SamplingConfig(0.7, top_p=0.8)], ids=["t1", "t0.7-p0.8"])
@pytest.mark.parametrize("draft_kind", ["model", "lookup"])
def test_sampled_output_follows_the_target(draft_kind, cfg):
    """20k sampled 4-token continuations (the last 3 from draft-and-verify blocks), with a
    draft q != p, against the target's own chain probabilities (generate.py's sampling
    distribution): chi-square over the 81 sequences, each frequency within 0.01, and none
    the target cannot produce (top_p)."""
    vocab, n, prompt = 3, 20_000, [0, 1, 0, 1, 2]
    target_t, draft_t = _tables(vocab, 1)
    target = MarkovModel(target_t)
    draft = ModelDraft(MarkovModel(draft_t), "markov") if draft_kind == "model" else LookupDraft(3)
    counts, proposed, accepted = {}, 0, 0
    for seed in range(n):
        st = speculative_generate(target, draft, prompt, 4, (), SamplingConfig(cfg.temperature, cfg.top_p, seed), k=3)
        counts[tuple(st.tokens)] = counts.get(tuple(st.tokens), 0) + 1
        proposed, accepted = proposed + st.proposed, accepted + st.accepted
    assert proposed > n and 0 < accepted < proposed  # drafts were offered, some kept, some not
    chi2, worst, cells = 0.0, 0.0, 0
    for seq in itertools.product(range(vocab), repeat=4):
        hist, p = list(prompt), 1.0
        for t in seq:
            p *= probabilities(target_t[hist[-2], hist[-1]], cfg)[t]
            hist.append(t)
        c = counts.get(seq, 0)
        worst = max(worst, abs(c / n - p))
        if p == 0:
            assert c == 0, seq
            continue
        chi2, cells = chi2 + (c - n * p) ** 2 / (n * p), cells + 1
    assert cells >= 15 and sum(counts.values()) == n
    # df <= 80: P(chi2 > 146) ~ 1e-5 for a right sampler
    assert chi2 < 146.0 and worst < 0.01, (chi2, worst, cells)


@pytest.mark.parametrize("k", [1, 3, 6, "auto"])
@pytest.mark.parametrize("draft_kind", ["model", "same", "lookup"])
def test_markov_greedy_is_the_target_alone(draft_kind, k):
    """Greedy: the same tokens as generate() on the target alone, a draft equal to the
    target has every proposal kept (its cache follows the output), and near max_seq_len
    the loop stops where generate() does."""
    vocab = 5
    target_t, draft_t = _tables(vocab, 2)
    for prompt, n, seq in (([0, 1, 2], 30, 64), ([3, 3, 1, 0, 3, 3], 12, 64), ([1, 2], 40, 20)):
        target = MarkovModel(target_t, seq)
        alone = generate(target, prompt, n, (), SamplingConfig())
        target.calls.clear()
        draft = {"model": lambda: ModelDraft(MarkovModel(draft_t, seq), "markov"),
                 "same": lambda: ModelDraft(MarkovModel(target_t, seq), "same"), "lookup": lambda: LookupDraft(2)}
        st = speculative_generate(target, draft[draft_kind](), prompt, n, (), SamplingConfig(), k=k)
        assert st.tokens == alone.tokens and st.stopped == alone.stopped, (prompt, st.tokens, alone.tokens)
        assert max(target.calls[1:]) <= (AUTO_K[2] if k == "auto" else k) + 1
        assert st.target_calls == len(target.calls) - 1 and st.proposed == sum(target.calls[1:]) - st.target_calls
        if draft_kind == "same":
            assert st.accepted == st.proposed > 0
            if k == "auto" and n >= 30:  # all kept: K grows past where it starts
                assert max(target.calls[1:]) > AUTO_K[0] + 1
    assert alone.stopped == "max_seq_len"


def test_eos_and_max_new_tokens_mid_block():
    """A block that would run past EOS or max_new_tokens stops exactly where generate() does."""
    target_t, _ = _tables(5, 2)
    target = MarkovModel(target_t)
    alone = generate(target, [0, 1, 2], 30, (), SamplingConfig())
    eos = alone.tokens[7]  # a token the target emits: the run stops at its first occurrence
    first = alone.tokens.index(eos)
    same = ModelDraft(MarkovModel(target_t), "same")  # every draft kept: blocks of k + 1 tokens
    for n in (1, 2, 5, 9, 10):
        st = speculative_generate(target, same, [0, 1, 2], n, (), SamplingConfig(), k=4)
        assert st.tokens == alone.tokens[:n] and st.stopped == "length"
    st = speculative_generate(target, same, [0, 1, 2], 30, (eos,), SamplingConfig(), k=4)
    assert st.tokens == alone.tokens[: first + 1] and st.stopped == "eos"
    assert st.tokens == generate(target, [0, 1, 2], 30, (eos,), SamplingConfig()).tokens


def test_lookup_proposes_what_followed_the_latest_match():
    d, g = LookupDraft(3), SamplingConfig()
    assert d.propose([5, 6, 7, 8, 9, 5, 6, 7], 3, g, None) == ([8, 9, 5], None)
    assert d.propose([1, 2, 9, 1, 2, 3, 4, 1, 2], 2, g, None) == ([3, 4], None)  # the most recent of two
    assert d.propose([4, 1, 7, 2, 7], 4, g, None) == ([2, 7], None)  # n = 1, what is left after it
    assert d.propose([1, 2, 3], 4, g, None) == ([], None)
    assert LookupDraft(1).propose([5, 6, 9, 6, 5, 6], 3, g, None) == ([5, 6], None)  # after the 6 at 3, not at 1


def test_draft_spec_parsing(tmp_path):
    assert parse_draft("lookup", tmp_path) == ("lookup", 3)
    assert parse_draft("lookup:5", tmp_path) == ("lookup", 5)
    for bad in ("lookup:0", "lookup:x", "int8", str(tmp_path / "nope.pte")):
        with pytest.raises(UsageError) as e:
            parse_draft(bad, tmp_path)
        assert "\n" not in str(e.value)
    f = tmp_path / "d.pte"
    f.write_bytes(b"")
    assert parse_draft(str(f), tmp_path) == ("path", f)
    assert parse_draft_tokens("6") == 6 and parse_draft_tokens("auto") == "auto" and parse_draft_tokens(2) == 2
    for bad in (0, "0", "-1", "x", "4.5"):
        with pytest.raises(UsageError):
            parse_draft_tokens(bad)
    with pytest.raises(UsageError):
        SpeculativeGeneration(MarkovModel(_tables(3, 0)[0]), LookupDraft(), [1], 4, k=0)


# ---------------------------------------------------------------------------------------
# stories260K: greedy output identical to the target alone

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"


def _stories_prompts(tok, n: int = 4) -> list[list[int]]:
    lines = [ln for ln in (FIXTURES / "corpus" / "tinystories-valid-40.txt").read_text().splitlines() if ln.strip()]
    return [tok.encode(" ".join(ln.split()[:w])) for ln, w in zip(lines[::7][:n], (6, 12, 20, 30))]


@pytest.fixture(scope="module")
def stories_two_precisions(tmp_path_factory, stories_dir) -> Path:
    """stories260K shards at fp32 and 8da4w (max_seq_len 512)."""
    from helpers import build_shard_set

    return build_shard_set(stories_dir, tmp_path_factory.mktemp("spec") / "stories", 512, ("fp32", "8da4w"))


def test_stories_greedy_identical(stories_two_precisions, stories_pte):
    """fp32 shards as the target; drafts: the same shard set at 8da4w (its own KV cache),
    the fp32 .pte, lookup; K 1, 3, 6; runs ending on max_new_tokens inside a block, on an
    EOS inside a block, and on a context of 48 positions."""
    from edgectl.runtime.artifact import open_artifact
    from edgectl.runtime.run import tokenizer_for
    from edgectl.runtime.speculative import open_draft

    target = open_artifact(stories_two_precisions, precision="fp32")
    tok = tokenizer_for(target)
    drafts = {"8da4w": open_draft(("precision", "8da4w"), stories_two_precisions, target),
              "pte": open_draft(("path", stories_pte), stories_two_precisions, target),
              "lookup": LookupDraft(3)}
    rates, stops = {}, set()
    prompts = _stories_prompts(tok)
    for p_i, prompt in enumerate(prompts):
        n = (40, 97, 200, 61)[p_i]
        alone = generate(target, prompt, n, tok.eos_ids, SamplingConfig())
        # stories260K greedy does not end a story within these lengths: a token it does emit
        # stands in for EOS in a second run of each prompt
        eos = alone.tokens[n // 2 + p_i]
        alone_eos = generate(target, prompt, n, (eos,), SamplingConfig())
        assert alone_eos.stopped == "eos" and len(alone_eos.tokens) <= n // 2 + p_i + 1
        for name, draft in drafts.items():
            for k in (1, 3, 6, "auto"):
                for eos_ids, ref in ((tok.eos_ids, alone), ((eos,), alone_eos)):
                    st = speculative_generate(target, draft, prompt, n, eos_ids, SamplingConfig(), k)
                    assert st.tokens == ref.tokens and st.stopped == ref.stopped, (name, k, p_i, eos_ids)
                    rates.setdefault(name, []).append((st.accepted, st.proposed))
                    stops.add(st.stopped)
    assert stops == {"length", "eos"}
    for name, pairs in rates.items():
        acc, prop = map(sum, zip(*pairs))
        assert prop > 0, name
        print(f"stories260K draft {name}: {acc}/{prop} accepted ({acc / prop:.0%})")
    acc, prop = map(sum, zip(*rates["pte"]))
    assert acc == prop  # the fp32 .pte drafting for the fp32 shards: the same model, every draft kept

    small = open_artifact(stories_two_precisions, precision="fp32", context=48)
    alone = generate(small, prompts[1], 100, tok.eos_ids, SamplingConfig())
    assert alone.stopped == "max_seq_len"
    for draft in (open_draft(("precision", "8da4w"), stories_two_precisions, small), LookupDraft(2)):
        for k in (3, 6):
            st = speculative_generate(small, draft, prompts[1], 100, tok.eos_ids, SamplingConfig(), k)
            assert st.tokens == alone.tokens and st.stopped == "max_seq_len"


def test_draft_tokenizer_must_match(stories_pte):
    """A draft whose tokenizer has another vocabulary (or size) than the target's: one line;
    the same vocabulary written out differently is accepted."""
    from types import SimpleNamespace

    from edgectl.runtime.runtime import read_meta
    from edgectl.runtime.speculative import check_same_tokenizer

    meta, text = read_meta(stories_pte)
    vocab_size = meta["model"]["vocab_size"]
    spec = json.loads(text)
    check_same_tokenizer(SimpleNamespace(meta=meta, tokenizer_json=json.dumps(spec, indent=3)), stories_pte, "t")
    vocab = spec["model"]["vocab"]
    a, b = list(vocab)[300:302]
    vocab[a], vocab[b] = vocab[b], vocab[a]  # two tokens swap ids
    for target in (SimpleNamespace(meta=meta, tokenizer_json=json.dumps(spec)),
                   SimpleNamespace(meta={"model": {"vocab_size": vocab_size + 1}}, tokenizer_json=text)):
        with pytest.raises(EdgectlError) as e:
            check_same_tokenizer(target, stories_pte, "t")
        assert "\n" not in str(e.value) and "--draft" in str(e.value)


def test_run_with_a_draft(stories_two_precisions, capsys):
    """`run --draft`: the same text and tokens greedy, a "speculative" entry in --json, the
    acceptance on the stats line, sampling with a draft, and one-line refusals."""
    from edgectl.cli.main import main

    base = ["run", str(stories_two_precisions), "-p", "Once upon a time, a little dog", "-n", "30", "--precision", "fp32"]

    def run(*extra):
        rc = main([*base, *extra])
        out, err = capsys.readouterr()
        return rc, out, err

    rc, out, _ = run("--json")
    alone = json.loads(out)
    assert rc == 0 and "speculative" not in alone
    for spec in (["--draft", "8da4w", "--draft-tokens", "3"], ["--draft", "lookup:2"],
                 ["--draft", "8da4w", "--draft-tokens", "auto"]):
        rc, out, _ = run(*spec, "--json")
        res = json.loads(out)
        assert rc == 0 and res["tokens"] == alone["tokens"] and res["text"] == alone["text"], spec
        sp = res["speculative"]
        assert sp["target_calls"] >= 1 and 0 <= sp["accepted"] <= sp["proposed"]
        assert res["stats"]["new_tokens"] == 30 and sp["tokens_per_target_call"] == pytest.approx(29 / sp["target_calls"])
    rc, out, err = run("--draft", "8da4w")
    assert rc == 0 and out.strip() == alone["text"].strip() and "accepted" in err and "tokens/target call" in err
    rc, out, _ = run("--draft", "8da4w", "--temperature", "0.9", "--top-p", "0.9", "--seed", "3", "--json")
    assert rc == 0 and json.loads(out)["stats"]["new_tokens"] == 30
    # under a budget the plan counts the draft (its own shards, resident) and the text is the same
    # (a budget far above this process's floor: pytest's RSS, the floor, grows with the tests before)
    rc, out, err = run("--draft", "8da4w", "--draft-tokens", "3", "--memory-budget", "64GB", "--json")
    assert rc == 0, err
    res = json.loads(out)
    assert rc == 0 and res["tokens"] == alone["tokens"], res
    d = res["plan"]["draft"]
    assert (d["precision"], d["k"]) == ("8da4w", 3) and d["bytes"] > 0
    assert res["plan"]["fixed_bytes"] >= res["plan"]["floor_bytes"] + d["bytes"]
    rc, out, _ = run("--memory-budget", "64GB", "--draft", "8da4w", "--plan", "--json")
    assert rc == 0 and json.loads(out)["draft"]["bytes"] == d["bytes"]
    for bad, why in ((["--draft", "int3"], "fp32, 8da4w"), (["--draft-tokens", "3"], "needs --draft"),
                     (["--draft", str(stories_two_precisions), "--memory-budget", "1GB"], "same shard set"),
                     (["--draft", "lookup", "--draft-tokens", "0"], "or auto"),
                     (["--draft", "8da4w", "--device", "adb:phone"], "is not supported with adb")):
        rc, out, err = run(*bad)
        assert rc == 2 and why in err and err.strip().count("\n") == 0, (bad, err)


# ---------------------------------------------------------------------------------------
# SmolLM2-135M: fp32 target, 8da4w draft from the same shard set, MT-Bench prompts (minutes)



# MT-Bench's questions 81 and 129 (first turns), where ../shared/corpus is not beside the checkout
MT_BENCH_FALLBACK = [
    "Compose an engaging travel blog post about a recent trip to Hawaii, highlighting cultural experiences and "
    "must-see attractions.",
    "You are given two sorted lists of size m and n. Implement a function to find the kth smallest element in the "
    "union of the two lists with linear complexity.",
]


def _mt_bench_questions() -> list[str]:
    """First turns of 4 MT-Bench questions (one per 16: writing, roleplay, math, coding)
    from $EDGECTL_SHARED/corpus (../shared beside the checkout)."""
    import os

    shared = Path(os.environ.get("EDGECTL_SHARED", Path(__file__).resolve().parents[3] / "shared"))
    corpus = shared / "corpus" / "mt_bench_question.jsonl"
    if not corpus.exists():
        return MT_BENCH_FALLBACK
    return [json.loads(ln)["turns"][0] for ln in corpus.read_text().splitlines()[::16][:4]]


@pytest.mark.real_model
@pytest.mark.slow
def test_smol_greedy_identical_on_mt_bench(smol_gguf, tmp_path_factory):
    from helpers import build_shard_set

    from edgectl.checkpoint.checkpoint import resolve
    from edgectl.runtime.artifact import open_artifact
    from edgectl.runtime.speculative import open_draft
    from edgectl.runtime.tokenizer import Tokenizer

    shards = build_shard_set(smol_gguf, tmp_path_factory.mktemp("spec") / "smol", 512, ("fp32", "8da4w"))
    target = open_artifact(shards, precision="fp32")
    ckpt = resolve(str(smol_gguf))  # its tokenizer config has the chat template (the helper's manifest keeps BOS/EOS only)
    tok = Tokenizer(ckpt.tokenizer_json, ckpt.tokenizer_config, ckpt.args.bos_token_id, tuple(ckpt.args.eos_token_ids))
    draft = open_draft(("precision", "8da4w"), shards, target)
    questions = _mt_bench_questions()
    acc = prop = calls = new = 0
    for q in questions:
        ids = tok.encode_chat(q)
        alone = generate(target, ids, 32, tok.eos_ids, SamplingConfig())
        for k in (2, 4):
            st = speculative_generate(target, draft, ids, 32, tok.eos_ids, SamplingConfig(), k)
            assert st.tokens == alone.tokens and st.stopped == alone.stopped, (q[:40], k)
            acc, prop, calls, new = acc + st.accepted, prop + st.proposed, calls + st.target_calls, new + st.new_tokens - 1
        lk = speculative_generate(target, LookupDraft(3), ids, 32, tok.eos_ids, SamplingConfig(), 4)
        assert lk.tokens == alone.tokens
    print(f"SmolLM2 fp32 target, 8da4w draft: {acc}/{prop} accepted ({acc / prop:.0%}), "
          f"{new / calls:.2f} tokens per target call")
    assert prop > 0 and acc > 0
