"""`edgectl bench --prompt-file`: an MT-Bench .jsonl (first turns, run i uses question i mod n,
chat template on by default) or a text file (one prompt, as it is); every row, the no-draft
row beside a draft row included, runs the same prompts in the same order; each run
generates what a greedy generation on that prompt does; the usage errors are one line,
exit 2. The real runs use stories260K (a copy given a chat template, for --chat)."""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import shutil
from pathlib import Path

import pytest

from edgectl.bench.bench_draft import output_digest
from edgectl.bench.prompts import read_prompt_file
from edgectl.cli.main import main
from edgectl.util.errors import EdgectlError

NEW = 12
TEMPLATE = ("{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}\n{% endfor %}"
            "{% if add_generation_prompt %}<|assistant|>\n{% endif %}")
QUESTIONS = ["Tell me a story about a cat who likes milk.",
             "Write a short poem about the sea. Use simple words that a small child knows.",
             "What did Lily find in the garden?"]


def _jsonl(path: Path, questions=QUESTIONS) -> Path:
    path.write_text("".join(json.dumps({"question_id": 81 + i, "category": "writing", "turns": [q, "Now shorter."]}) + "\n"
                            for i, q in enumerate(questions)))
    return path


def _bench(*argv) -> dict:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main([*map(str, argv), "--new-tokens", str(NEW), "--json"])
    assert rc == 0, err.getvalue()
    return json.loads(out.getvalue())


def _usage_error(capsys, *argv) -> str:
    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    assert rc == 2 and out == "" and err.strip().count("\n") == 0, (argv, rc, err)
    return err


def _greedy(artifact: Path, ids: list[int]) -> list[int]:
    """Exactly NEW tokens, greedy, EOS ignored: what bench generates, here in this process."""
    from edgectl.runtime.artifact import open_artifact
    from edgectl.runtime.generate import generate

    return generate(open_artifact(str(artifact)), ids, NEW, eos_ids=()).tokens


def _hf_ids(model_dir: Path, text: str, chat: bool) -> list[int]:
    """The prompt's ids from the model's own tokenizer.json (and the template, rendered by
    jinja2 here), not through edgectl's Tokenizer."""
    import jinja2
    from tokenizers import Tokenizer

    if chat:
        text = jinja2.Environment(trim_blocks=True, lstrip_blocks=True).from_string(TEMPLATE).render(
            messages=[{"role": "user", "content": text}], add_generation_prompt=True, bos_token="<s>")
    ids = Tokenizer.from_file(str(model_dir / "tokenizer.json")).encode(text, add_special_tokens=False).ids
    return ids if chat else [1, *ids]  # stories260K adds BOS (<s> = 1) to a plain prompt


@pytest.fixture(scope="session")
def chat_model(stories_dir, tmp_path_factory) -> tuple[Path, Path]:
    """stories260K with a chat template: (its directory, its .pte at max_seq_len 256)."""
    d = tmp_path_factory.mktemp("chat") / "stories-chat"
    shutil.copytree(stories_dir, d)
    cfg = json.loads((d / "tokenizer_config.json").read_text())
    (d / "tokenizer_config.json").write_text(json.dumps({**cfg, "chat_template": TEMPLATE}))
    pte = d.parent / "chat.pte"
    assert main(["export", str(d), "-o", str(pte), "--max-seq-len", "256"]) == 0
    return d, pte


# ---- no model -----------------------------------------------------------------------------


def test_read_prompt_file(tmp_path):
    pf = read_prompt_file(_jsonl(tmp_path / "q.jsonl"))
    assert pf.texts == tuple(QUESTIONS) and pf.format == "jsonl" and pf.chat is True
    assert pf.sha256 == hashlib.sha256((tmp_path / "q.jsonl").read_bytes()).hexdigest()
    assert read_prompt_file(tmp_path / "q.jsonl", chat=False).chat is False
    (tmp_path / "a.txt").write_text("An article.\n\nSummarize the text above.\n")
    pf = read_prompt_file(tmp_path / "a.txt")
    assert pf.texts == ("An article.\n\nSummarize the text above.\n",) and pf.format == "text" and pf.chat is False
    (tmp_path / "bad.jsonl").write_text('{"turns": ["ok"]}\n{"question": "no turns"}\n')
    with pytest.raises(EdgectlError, match=r"bad.jsonl:2: .*turns"):
        read_prompt_file(tmp_path / "bad.jsonl")


def test_usage_errors_are_one_line_exit_2(capsys, tmp_path):
    q = _jsonl(tmp_path / "q.jsonl")
    (tmp_path / "a.pte").write_bytes(b"x")
    a = tmp_path / "a.pte"
    assert "give one" in _usage_error(capsys, "bench", a, "--prompt-file", q, "--prompt-tokens", "32")
    assert "--chat needs --prompt-file" in _usage_error(capsys, "bench", a, "--chat")
    assert "--no-chat needs --prompt-file" in _usage_error(capsys, "bench", a, "--no-chat")
    assert "--device adb:" in _usage_error(capsys, "bench", a, "--prompt-file", q, "--device", "adb:R58M")


# ---- stories260K: real runs -----------------------------------------------------------------


@pytest.mark.real_model
def test_jsonl_questions_in_turn_and_the_same_in_every_row(chat_model, tmp_path):
    model_dir, pte = chat_model
    q = _jsonl(tmp_path / "q.jsonl")
    rep = _bench("bench", pte, "--prompt-file", q, "--repeat", "3", "--draft", "lookup")
    assert rep["settings"]["prompt_tokens"] is None
    assert rep["settings"]["prompt_file"] == {"path": str(q.resolve()), "sha256": hashlib.sha256(q.read_bytes()).hexdigest(),
                                              "format": "jsonl", "prompts": 3, "chat": True}
    base, drafted = rep["rows"]
    assert drafted["options"] == {"draft": "lookup"} and "speculative" in drafted["runs"][0]
    expect = []
    for question in QUESTIONS:
        ids = _hf_ids(model_dir, question, chat=True)
        tokens = _greedy(pte, ids)
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            assert main(["run", str(pte), "--chat", "-p", question, "-n", str(NEW), "--json"]) == 0
        ran = json.loads(out.getvalue())
        assert ran["stats"]["prompt_tokens"] == len(ids)
        assert ran["tokens"] == tokens[: len(ran["tokens"])]  # run stops at EOS; bench does not
        expect.append((len(ids), output_digest(tokens)))
    assert len({n for n, _ in expect}) == 3  # three prompts of three lengths: a mix-up would show
    for row in (base, drafted):
        assert [r["prompt_index"] for r in row["runs"]] == [0, 1, 2]
        assert [(r["prompt_tokens"], r["output_sha256"]) for r in row["runs"]] == expect
        assert all(r["new_tokens"] == NEW for r in row["runs"])
    # the KV cache each run needs: the longest prompt + the new tokens
    assert {r["context"] for row in rep["rows"] for r in row["runs"]} == {max(n for n, _ in expect) + NEW}


@pytest.mark.real_model
def test_repeat_past_the_questions_goes_round_and_fewer_use_fewer(chat_model, tmp_path):
    _, pte = chat_model
    q = _jsonl(tmp_path / "q.jsonl", QUESTIONS[:2])
    rep = _bench("bench", pte, "--prompt-file", q, "--repeat", "3", "--no-chat", "--device", "local")
    (row,) = rep["rows"]
    assert [r["prompt_index"] for r in row["runs"]] == [0, 1, 0] and row["device"]["name"] == "here"
    assert rep["settings"]["prompt_file"]["chat"] is False and rep["settings"]["prompt_file"]["prompts"] == 2
    first, _, again = row["runs"]
    assert (first["prompt_tokens"], first["output_sha256"]) == (again["prompt_tokens"], again["output_sha256"])


@pytest.mark.real_model
def test_text_file_is_one_prompt_as_it_is(stories_pte, stories_dir, corpus_dir, tmp_path):
    text = ("Tom had a red ball. He played with it in the park every day. One day the ball rolled into the pond.\n"
            "Summarize the text above.\n")
    (tmp_path / "a.txt").write_text(text)
    rep = _bench("bench", stories_pte, "--prompt-file", tmp_path / "a.txt", "--repeat", "2",
                 "--ppl", corpus_dir / "tinystories-valid-40.txt", "--ppl-tokens", "64")
    (row,) = rep["rows"]
    ids = _hf_ids(stories_dir, text, chat=False)
    assert len(ids) > 16  # stories_pte prefills in chunks of 16: several calls
    assert rep["settings"]["prompt_file"]["format"] == "text" and rep["settings"]["prompt_file"]["chat"] is False
    assert [(r["prompt_index"], r["prompt_tokens"]) for r in row["runs"]] == [(0, len(ids))] * 2
    assert {r["output_sha256"] for r in row["runs"]} == {output_digest(_greedy(stories_pte, ids))}
    assert row["ppl"]["tokens_scored"] > 0  # --ppl scores its own text, as without a prompt file


@pytest.mark.real_model
def test_too_long_a_prompt_or_no_template_is_a_usage_error(capsys, stories_pte, chat_model, tmp_path):
    _, pte = chat_model
    q = _jsonl(tmp_path / "q.jsonl")
    err = _usage_error(capsys, "bench", pte, "--prompt-file", q, "--new-tokens", "230")
    assert "question 0" in err and "+ 230 new tokens" in err and "max_seq_len 256" in err
    err = _usage_error(capsys, "bench", pte, "--prompt-file", q, "--new-tokens", "8", "--ctx-size", "12")
    assert "question 0" in err and "--ctx-size 12" in err
    long = _jsonl(tmp_path / "long.jsonl", [QUESTIONS[0], "Tell me more. " * 200])
    err = _usage_error(capsys, "bench", pte, "--prompt-file", long, "--repeat", "2")
    assert "question 1 (0-based)" in err and "> chat.pte's max_seq_len 256" in err
    err = _usage_error(capsys, "bench", stories_pte, "--prompt-file", q)
    assert "no chat template" in err and "--no-chat" in err


@pytest.mark.real_model
def test_shard_set_under_a_budget(stories_dir, tmp_path):
    from helpers import build_shard_set

    shards = build_shard_set(stories_dir, tmp_path / "set", 256, ("fp32",))
    q = _jsonl(tmp_path / "q.jsonl")
    rep = _bench("bench", shards, "--memory-budget", "1GB", "--prompt-file", q, "--no-chat", "--repeat", "2")
    (row,) = rep["rows"]
    lengths = [len(_hf_ids(stories_dir, x, chat=False)) for x in QUESTIONS[:2]]
    assert [(r["prompt_index"], r["prompt_tokens"]) for r in row["runs"]] == [(0, lengths[0]), (1, lengths[1])]
    assert all(r["context"] == max(lengths) + NEW and r["plan"] for r in row["runs"])  # planned for the longest used
