"""`edgectl bench`: JSON schema, ratio column, perplexity of the .pte against transformers,
timeline PNG, and the one-line errors. The real-model tests share one export of
stories260K and one short bench of it (listed twice, as a user comparing two runs would)."""

from __future__ import annotations

import contextlib
import io
import json
import math
from pathlib import Path

import pytest

from edgectl.bench import bench, report
from edgectl.util.scoring import ppl_windows
from edgectl.cli.main import main

PPL_TOKENS = 2000


def _run(capsys, *argv):
    rc = main(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


# ---- fast tests, no model ----------------------------------------------------------------


def test_summarise_mean_sd():
    s = report.summarise([1.0, 2.0, 3.0, 6.0])
    assert s["mean"] == 3.0 and s["n"] == 4 and s["min"] == 1.0 and s["max"] == 6.0
    assert math.isclose(s["sd"], math.sqrt(14 / 3))
    assert report.summarise([5.0])["sd"] is None  # one sample has no sd


def test_ppl_windows_with_bos_scores_every_text_token_once():
    ids = list(range(10, 30))  # 20 text tokens
    wins = ppl_windows(ids, 8, bos_id=1)
    assert all(w[0] == 1 and len(w) <= 8 for w in wins)
    assert [t for w in wins for t in w[1:]] == ids
    assert sum(len(w) - 1 for w in wins) == 20


def test_ppl_windows_without_bos_are_non_overlapping():
    ids = list(range(21))
    wins = ppl_windows(ids, 8, bos_id=None)
    assert wins == [ids[0:8], ids[8:16], ids[16:21]]
    assert ppl_windows([5], 8, bos_id=None) == []  # nothing left to score


def test_scoring_log_probs_equal_torchs_log_softmax():
    """util.scoring (numpy, float64, a few rows at a time) gives torch's float64 log_softmax:
    the picked log-probs, every chunk's rows (a torch tensor read as it is), and their sum."""
    import numpy as np
    import torch

    from edgectl.util.scoring import log_prob_chunks, nll_sum, picked_log_probs

    rng = np.random.default_rng(0)
    logits = (rng.standard_normal((21, 50)) * 8).astype(np.float32)
    targets = rng.integers(0, 50, 20).tolist()
    ref = torch.log_softmax(torch.from_numpy(logits).double(), -1).numpy()
    want = ref[np.arange(20), targets]
    got = picked_log_probs(logits, targets)
    assert got.dtype == np.float64 and got.shape == (20, 1)
    np.testing.assert_allclose(got[:, 0], want, rtol=0, atol=1e-12)
    chunks = [(a, c.copy()) for a, c in log_prob_chunks(torch.from_numpy(logits), rows=8)]
    assert [a for a, _ in chunks] == [0, 8, 16] and all(c.dtype == np.float64 for _, c in chunks)
    np.testing.assert_allclose(np.concatenate([c for _, c in chunks]), ref[:-1], rtol=0, atol=1e-12)
    assert nll_sum(logits, [0, *targets]) == pytest.approx(-want.sum(), rel=1e-12)


def test_duplicate_cases_get_numbered_labels(tmp_path):
    c = report.Case(tmp_path / "m.pte")
    rows = [report.Row(c, 1), report.Row(report.Case(tmp_path / "n.pte"), 1), report.Row(c, 1)]
    assert report.BenchReport(report.BenchSettings(), rows, cold=False).labels() == ["m.pte #1", "n.pte", "m.pte #2"]


def test_cold_without_root_says_why(monkeypatch):
    monkeypatch.setattr(bench.os, "geteuid", lambda: 1000)
    why = bench.drop_page_cache()
    assert why is not None and "root" in why


def test_ppl_tokens_without_ppl_is_usage_error(capsys, tmp_path):
    rc, _, err = _run(capsys, "bench", str(tmp_path / "x.pte"), "--ppl-tokens", "100")
    assert rc == 2 and "--ppl" in err


def test_missing_artifact_is_one_line_exit_1(capsys, tmp_path):
    rc, out, err = _run(capsys, "bench", str(tmp_path / "nope.pte"))
    assert rc == 1 and "nope.pte" in err and err.strip().count("\n") == 0 and out == ""


def test_worker_error_reaches_the_user_in_one_line(capsys, tmp_path):
    bad = tmp_path / "bad.pte"
    bad.write_bytes(b"not a program" * 10)
    rc, out, err = _run(capsys, "bench", str(bad), "--repeat", "1", "--new-tokens", "2")
    assert rc == 1 and "bad.pte" in err and "not a loadable" in err
    assert "Traceback" not in err and out == ""
    assert [ln for ln in err.splitlines() if ln.startswith("edgectl: error:")] == [err.strip().splitlines()[-1]]


def test_json_is_a_flag_and_a_failed_row_is_marked(capsys, tmp_path):
    """--json prints the report on stdout even when a row failed (CI reads it), marks the
    row, and the exit code still says it failed; -o writes the same JSON to a file."""
    bad = tmp_path / "bad.pte"
    bad.write_bytes(b"not a program" * 10)
    rc, out, err = _run(capsys, "bench", str(bad), "--repeat", "2", "--new-tokens", "2", "--json", "-o", str(tmp_path / "r.json"))
    assert rc == 1
    rep = json.loads(out)
    assert rep == json.loads((tmp_path / "r.json").read_text())
    (row,) = rep["rows"]
    assert row["failed"] is True and row["status"] == "failed 1/1" and "not a loadable" in row["error"]
    assert len(row["runs"]) == 1  # a failed row is not run again
    rc, out, _ = _run(capsys, "bench", str(bad), "--repeat", "1", "--new-tokens", "2", "--json", "--keep-going")
    assert rc == 0 and json.loads(out)["rows"][0]["failed"] is True


def test_old_json_file_spelling_says_what_changed(capsys, tmp_path):
    rc, out, err = _run(capsys, "bench", str(tmp_path / "a.pte"), "--json", str(tmp_path / "out.json"))
    assert rc == 2 and "-o " in err and "out.json" in err and out == ""


def test_an_oom_row_fails_the_bench_unless_keep_going(capsys, tmp_path, monkeypatch):
    """The exit-code logic for a row the cgroup OOM-killed (the worker's answer simulated
    here; test_bench_budget's cgroup test has the kernel kill a real worker)."""
    a, b = tmp_path / "a.pte", tmp_path / "b.pte"
    for p in (a, b):
        p.write_bytes(b"x")
    monkeypatch.setattr(bench, "warm_page_cache", lambda p: None)
    calls = []

    def fake_worker(case, settings, **kw):
        calls.append(case.artifact.name)
        if case.artifact == a:
            return {"status": "oom", "cgroup_limit": 50_000_000}
        return {"status": "ok", **{k: 1.0 for k in report.SUMMARY_KEYS}}

    monkeypatch.setattr(bench, "worker", fake_worker)
    rc, out, err = _run(capsys, "bench", str(a), str(b), "--repeat", "2", "--json")
    rows = json.loads(out)["rows"]
    assert rc == 1 and calls == ["a.pte"] and "OOM-killed" in err and "(50 MB)" in err
    assert [r["status"] for r in rows] == ["oom 1/1", "not run"]
    calls.clear()
    rc, out, err = _run(capsys, "bench", str(a), str(b), "--repeat", "2", "--json", "--keep-going")
    rows = json.loads(out)["rows"]
    assert rc == 0 and calls == ["a.pte", "b.pte", "b.pte"]
    assert [r["status"] for r in rows] == ["oom 1/1", "ok"] and [r["failed"] for r in rows] == [True, False]


# ---- real model: one export, one bench run -----------------------------------------------


@pytest.fixture(scope="session")
def s260_pte(stories_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("bench") / "s260.pte"
    assert main(["export", str(stories_dir), "-o", str(out), "--max-seq-len", "512"]) == 0
    return out


@pytest.fixture(scope="session")
def benched(s260_pte, corpus_dir, tmp_path_factory):
    """`edgectl bench s260.pte s260.pte --repeat 1 --new-tokens 8 --ppl ... -o b.json --plot`."""
    d = tmp_path_factory.mktemp("bench_out")
    stories = corpus_dir / "tinystories-valid-40.txt"
    argv = [
        "bench", str(s260_pte), str(s260_pte), "--repeat", "1", "--new-tokens", "8",
        "--ppl", str(stories), "--ppl-tokens", str(PPL_TOKENS),
        "-o", str(d / "b.json"), "--plot", str(d / "t.png"),
    ]
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        rc = main(argv)
    assert rc == 0
    return {"json": json.loads((d / "b.json").read_text()), "stdout": stdout.getvalue(), "png": d / "t.png", "stories": stories}


def _check(obj, spec, where="report"):
    """Every key of `spec` is in `obj` with the given type(s); dict/list specs recurse."""
    if isinstance(spec, dict):
        assert isinstance(obj, dict), where
        for k, sub in spec.items():
            assert k in obj, f"{where}.{k} missing"
            _check(obj[k], sub, f"{where}.{k}")
    elif isinstance(spec, list):
        assert isinstance(obj, list) and obj, f"{where}: expected a non-empty list"
        for i, item in enumerate(obj):
            _check(item, spec[0], f"{where}[{i}]")
    else:
        assert isinstance(obj, spec), f"{where}: {type(obj).__name__}, expected {spec}"


NUM = (int, float)
STAT = {"mean": NUM, "sd": (NUM, type(None)), "min": NUM, "max": NUM, "n": int}
GEN = {k: NUM for k in ("ttft_ms", "prefill_ms", "decode_ms", "prefill_tok_s", "decode_tok_s")} | {"prompt_tokens": int, "new_tokens": int}
SCHEMA = {
    "schema_version": int,
    "edgectl_version": str,
    "created": str,
    "versions": {"python": str, "torch": str, "executorch": str, "torchao": str},
    "machine": {"platform": str, "machine": str, "cpu": str, "cpu_count": int, "mem_total_bytes": int},
    "settings": {
        "prompt_tokens": int, "new_tokens": int, "repeat": int, "threads": (int, type(None)),
        "cold_requested": bool, "cold": bool, "warmup": bool, "ppl_file": str, "ppl_tokens": int,
    },
    "notes": list,
    "rows": [{
        "label": str, "artifact": str, "options": dict, "file_bytes": int, "decode_ratio": float,
        "runs": [GEN | {
            "cache_dropped": bool, "loadavg_1m": float, "load_ms": NUM, "rss_before_load": int, "rss_after_load": int,
            "rss_end": int, "rss_anon_end": int, "rss_file_end": int, "peak_rss": int, "model_rss": int,
            "max_seq_len": int, "warmup": GEN, "phases": {"warmup": list, "measured": list},
            "open_ms": NUM, "first_token_ms": NUM,
            "trace": [{"lane": str, "name": str, "start": float, "end": float}],
        }],
        "summary": {k: STAT for k in report.SUMMARY_KEYS},
        "ppl": {"file": str, "ppl": float, "nll": float, "tokens_scored": int, "windows": int, "window_tokens": int, "bos_prefixed": bool},
    }],
}


@pytest.mark.real_model
def test_json_schema_and_values(benched, s260_pte):
    rep = benched["json"]
    _check(rep, SCHEMA)
    assert rep["schema_version"] == report.SCHEMA_VERSION
    assert rep["settings"]["new_tokens"] == 8 and rep["settings"]["repeat"] == 1 and rep["settings"]["warmup"] is True
    assert [r["label"] for r in rep["rows"]] == ["s260.pte #1", "s260.pte #2"]
    for row in rep["rows"]:
        assert row["file_bytes"] == s260_pte.stat().st_size
        (run,) = row["runs"]
        assert run["new_tokens"] == 8 and run["prompt_tokens"] == 64  # EOS must not stop a bench
        assert run["model_rss"] == run["peak_rss"] - run["rss_before_load"] > 0
        assert run["rss_before_load"] > 100e6  # the runtime floor (interpreter, numpy, runtime library) is not charged to the model
        loads = [s for s in run["trace"] if s["lane"] == "load"]
        assert math.isclose(run["load_ms"], sum(s["end"] - s["start"] for s in loads) * 1e3, rel_tol=1e-9)
        names = [s["name"] for s in run["trace"] if s["lane"] == "compute"]
        assert names == (["prefill"] + ["decode"] * 7) * 2  # warm-up + measured generation
        assert row["summary"]["decode_tok_s"]["mean"] == run["decode_tok_s"]


@pytest.mark.real_model
def test_ratio_column(benched):
    rows = benched["json"]["rows"]
    assert rows[0]["decode_ratio"] == 1.0
    expect = rows[1]["summary"]["decode_tok_s"]["mean"] / rows[0]["summary"]["decode_tok_s"]["mean"]
    assert math.isclose(rows[1]["decode_ratio"], expect, rel_tol=1e-12)
    lines = [ln for ln in benched["stdout"].splitlines() if "s260.pte" in ln]
    assert len(lines) == 2 and "decode ×" in benched["stdout"]
    assert lines[0].rstrip(" │").endswith("1.00×")
    assert lines[1].rstrip(" │").endswith(f"{expect:.2f}×")


@pytest.mark.real_model
def test_ppl_of_pte_matches_transformers(benched, stories_dir):
    """The .pte's perplexity equals transformers' on the same windows (fp32: 1e-3 relative)."""
    import torch
    from tokenizers import Tokenizer
    from transformers import AutoModelForCausalLM

    ppl = benched["json"]["rows"][0]["ppl"]
    ids = Tokenizer.from_file(str(stories_dir / "tokenizer.json")).encode(benched["stories"].read_text(), add_special_tokens=False).ids
    ids = ids[:PPL_TOKENS]
    bos = 1  # stories260K adds <s>
    wins = [[bos, *ids[i : i + 511]] for i in range(0, len(ids), 511)]
    model = AutoModelForCausalLM.from_pretrained(stories_dir, dtype=torch.float32).eval()
    nll, n = 0.0, 0
    with torch.no_grad():
        for w in wins:
            logits = model(torch.tensor([w])).logits[0].double()
            lp = torch.log_softmax(logits[:-1], dim=-1)
            nll -= float(lp.gather(1, torch.tensor(w[1:]).unsqueeze(1)).sum())
            n += len(w) - 1
    assert ppl["tokens_scored"] == n == PPL_TOKENS and ppl["windows"] == len(wins) == 4
    eager = math.exp(nll / n)
    assert abs(ppl["ppl"] - eager) / eager < 1e-3, (ppl["ppl"], eager)
    assert 1.0 < eager < 50.0  # a trained model on its own domain, not a uniform guess (512)


@pytest.mark.real_model
def test_plot_writes_a_png(benched):
    data = benched["png"].read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000


@pytest.mark.real_model
def test_ppl_window_scored_in_pieces_matches_the_whole_window(s260_pte):
    import random

    from edgectl.bench.bench_worker import model_chunk, window_nll
    from edgectl.util.scoring import nll_sum
    from edgectl.runtime.runtime import PteModel

    m = PteModel(s260_pte)
    rng = random.Random(0)
    w = [rng.randrange(m.meta["model"]["vocab_size"]) for _ in range(min(300, m.max_seq_len))]
    m.reset()
    whole = nll_sum(m.forward(w, 0, all_logits=True), w)
    # pieces of the program's own call size: the same logits, the same sum to the bit
    m.reset()
    assert window_nll(m, w, model_chunk(m)) == whole
    m.reset()
    # any other piece size: the same positions scored once each (float rounding only)
    assert window_nll(m, w, 7) == pytest.approx(whole, rel=1e-5)


@pytest.mark.real_model
def test_sigterm_stops_the_worker_and_exits_143(stories_pte, tmp_path):
    """A CI job's timeout (SIGTERM) ends bench like Ctrl-C: its worker is killed, not left running."""
    import signal
    import subprocess
    import sys
    import time

    code = "import sys; from edgectl.cli.main import main; sys.exit(main(sys.argv[1:]))"
    proc = subprocess.Popen([sys.executable, "-c", code, "bench", str(stories_pte), "--repeat", "50", "--new-tokens", "200"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    children = Path(f"/proc/{proc.pid}/task/{proc.pid}/children")
    worker = None
    deadline = time.monotonic() + 120
    while worker is None and time.monotonic() < deadline and proc.poll() is None:
        kids = children.read_text().split() if children.exists() else []
        worker = int(kids[0]) if kids else None
        time.sleep(0.05)
    assert worker is not None, "bench started no worker"
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 143 and "terminated" in err
    time.sleep(0.5)
    assert not Path(f"/proc/{worker}").exists() or "Z" in Path(f"/proc/{worker}/stat").read_text().split()[2]


@pytest.mark.real_model
def test_reading_an_artifacts_tokenizer_prints_nothing(stories_pte):
    """`bench --ppl` reads each artifact's tokenizer in the parent process, which imports
    executorch and with it torchao: its load-time warnings (one per optional CUDA
    extension it cannot load) stay off the user's stderr."""
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "EDGECTL_DEBUG"}
    code = f"from edgectl.runtime.run import artifact_tokenizer; print(len(artifact_tokenizer({str(stories_pte)!r}).encode(\"Once upon a time\")))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    assert out.stdout.strip().isdigit() and out.stderr == ""


def test_a_row_without_decode_figures_shows_no_ratio(tmp_path):
    """A failed (or infeasible) row has no decode figure: its decode × cell is "-", not nan×."""
    from rich.console import Console

    ok, bad = report.Row(report.Case(tmp_path / "m.pte"), 1), report.Row(report.Case(tmp_path / "n.pte"), 1)
    ok.runs = [{"status": "ok", "decode_tok_s": 10.0, "new_tokens": 4}]
    bad.runs = [{"status": "failed", "error": "no plan fits"}]
    rep = report.BenchReport(report.BenchSettings(), [ok, bad], cold=False)
    report.set_decode_ratios(rep.rows)
    console = Console(width=400, record=True)
    console.print(report.render_table(rep))
    lines = [ln for ln in console.export_text().splitlines() if "n.pte" in ln or "m.pte" in ln]
    assert "nan" not in "".join(lines) and lines[0].rstrip(" │").endswith("1.00×") and lines[1].rstrip(" │").endswith("-")
