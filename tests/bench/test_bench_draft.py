"""`edgectl bench --draft`: a no-draft row beside each draft row, the speculative figures per
run and per row, speedup_vs_no_draft against the no-draft row of the same bench, the draft
and verify trace lanes, and the one-line usage errors. The real runs share one stories260K
shard set at fp32 and 8da4w."""

from __future__ import annotations

import contextlib
import io
import json
import math
from pathlib import Path

import pytest

from edgectl.bench import report
from edgectl.bench.bench_draft import set_draft_speedups
from edgectl.bench.plot import _lanes
from edgectl.cli.bench import bench_cases
from edgectl.cli.main import main
from edgectl.util.errors import UsageError

NEW = 16


def _run(capsys, *argv):
    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


# ---- no model -----------------------------------------------------------------------------


def _row(artifact: Path, decode: float, **options) -> report.Row:
    return report.Row(report.Case(artifact, options), 1, runs=[{"status": "ok", **{k: 1.0 for k in report.SUMMARY_KEYS},
                                                               "decode_tok_s": decode}])


def test_speedup_is_over_the_same_case_without_draft(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    rows = [_row(a, 10.0, precision="fp32"), _row(a, 30.0, precision="fp32", draft="8da4w"),
            _row(a, 20.0, precision="int8"), _row(a, 50.0, precision="int8", draft="lookup", draft_tokens=3),
            _row(b, 7.0, draft="lookup")]  # no no-draft row of b in this bench
    report.set_decode_ratios(rows)
    assert [r.speedup_vs_no_draft for r in rows] == [None, 3.0, None, 2.5, None]
    assert rows[3].to_dict()["speedup_vs_no_draft"] == 2.5
    rows[0].device, rows[1].device = {"name": "here"}, {"name": "pi"}  # another device: not its baseline
    set_draft_speedups(rows)
    assert rows[1].speedup_vs_no_draft is None


def test_labels_and_cases(tmp_path):
    assert report.Case(Path("/x/smol-shards"), {"precision": "fp32", "draft": "8da4w"}).label == \
        "smol-shards precision=fp32 draft=8da4w"
    assert report.Case(Path("/x/s"), {"draft": "/m/small.pte", "draft_tokens": "auto"}).label == \
        "s draft=small.pte draft_tokens=auto"
    pte, other = tmp_path / "t.pte", tmp_path / "d.pte"
    pte.write_bytes(b"x")
    other.write_bytes(b"x")
    cases = bench_cases([pte], None, None, False, draft=f"lookup:2,{other}", draft_tokens="3")
    assert [c.options for c in cases] == [{}, {"draft": "lookup:2", "draft_tokens": 3},
                                          {"draft": str(other.resolve()), "draft_tokens": 3}]
    assert [c.options for c in bench_cases([pte], None, None, False, draft="lookup")] == [{}, {"draft": "lookup"}]
    for draft, k, why in (("8da4w", None, "needs a shard set"), (None, "3", "needs --draft"), ("lookup", "0", "or auto"),
                          ("lookup,", None, "empty"), (str(tmp_path), None, "manifest.json")):
        with pytest.raises(UsageError, match=why):
            bench_cases([pte], None, None, False, draft=draft, draft_tokens=k)


def test_table_columns_only_with_a_draft(tmp_path):
    from rich.console import Console

    def table(rows) -> str:
        c = Console(file=io.StringIO(), width=300)
        c.print(report.render_table(report.BenchReport(report.BenchSettings(), rows, cold=False)))
        return c.file.getvalue()

    plain = [_row(tmp_path / "a", 10.0)]
    assert "accept %" not in table(plain) and "× no draft" not in table(plain)
    spec = {"acceptance": 0.75, "tokens_per_target_call": 2.5}
    drafted = _row(tmp_path / "a", 25.0, draft="lookup")
    drafted.runs[0]["speculative"] = spec
    rows = [*plain, drafted]
    report.set_decode_ratios(rows)
    assert rows[1].summary["acceptance"]["mean"] == 0.75 and "acceptance" not in rows[0].summary
    text = table(rows)
    assert "accept %" in text and "tok/call" in text and "× no draft" in text
    line = next(ln for ln in text.splitlines() if "draft=lookup" in ln)
    assert " 75 " in line and "2.50" in line and "2.50×" in line


def test_draft_with_adb_device_is_a_usage_error(capsys, tmp_path):
    rc, out, err = _run(capsys, "bench", tmp_path / "a.pte", "--draft", "lookup", "--device", "adb:R58M")
    assert rc == 2 and "--device adb:" in err and err.strip().count("\n") == 0 and out == ""


def test_bad_draft_spec_is_one_line_exit_2(capsys, tmp_path):
    (tmp_path / "a.pte").write_bytes(b"x")
    for bad, why in ((["--draft", "int3"], "int3"), (["--draft", "lookup:x"], "lookup:N"),
                     (["--draft-tokens", "3"], "needs --draft")):
        rc, out, err = _run(capsys, "bench", tmp_path / "a.pte", *bad)
        assert rc == 2 and why in err and err.strip().count("\n") == 0 and out == "", (bad, err)


# ---- stories260K: real runs -----------------------------------------------------------------


@pytest.fixture(scope="session")
def stories_fp32_8da4w(tmp_path_factory, stories_dir) -> Path:
    """stories260K shards at fp32 and 8da4w (max_seq_len 512)."""
    from helpers import build_shard_set

    return build_shard_set(stories_dir, tmp_path_factory.mktemp("draft") / "stories", 512, ("fp32", "8da4w"))


def _bench(tmp: Path, *argv) -> tuple[dict, str]:
    """`edgectl bench ... --repeat 1 --new-tokens 16 --json --plot`: (the JSON, the table on stderr)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main([*map(str, argv), "--repeat", "1", "--new-tokens", str(NEW), "--json", "--plot", str(tmp / "t.png")])
    assert rc == 0, err.getvalue()
    assert (tmp / "t.png").stat().st_size > 0
    return json.loads(out.getvalue()), err.getvalue()


@pytest.fixture(scope="session")
def benched_8da4w(stories_fp32_8da4w, tmp_path_factory):
    return _bench(tmp_path_factory.mktemp("bench_draft"), "bench", stories_fp32_8da4w, "--precision", "fp32",
                  "--draft", "8da4w")


def _check_pair(rep: dict, label: str, **draft):
    """The no-draft row and the draft row of one bench: figures, invariants, lanes."""
    base, row = rep["rows"]
    assert base["options"] == {"precision": "fp32"} and row["options"] == {"precision": "fp32", **draft}
    assert base["label"] == "stories precision=fp32" and row["label"] == f"stories precision=fp32 {label}"
    (b,), (r,) = base["runs"], row["runs"]
    assert "speculative" not in b and base["speedup_vs_no_draft"] is None
    sp = r["speculative"]
    assert b["new_tokens"] == r["new_tokens"] == NEW  # EOS stops neither; the draft row never overshoots
    assert b["output_sha256"] == r["output_sha256"]  # greedy: token-identical to the target alone
    assert 0 <= sp["accepted"] <= sp["proposed"] and sp["target_calls"] >= 1
    assert sp["tokens_per_target_call"] == pytest.approx((NEW - 1) / sp["target_calls"]) and sp["tokens_per_target_call"] >= 1
    assert row["summary"]["acceptance"]["mean"] == sp["acceptance"]
    assert row["summary"]["tokens_per_target_call"]["mean"] == sp["tokens_per_target_call"]
    expect = row["summary"]["decode_tok_s"]["mean"] / base["summary"]["decode_tok_s"]["mean"]
    assert math.isclose(row["speedup_vs_no_draft"], expect, rel_tol=1e-12)
    lanes = {s["lane"] for s in r["trace"]}
    assert {"verify", "draft", "compute", "load"} <= lanes and not {"verify", "draft"} & {s["lane"] for s in b["trace"]}
    assert {"verify", "draft"} <= set(_lanes(r["trace"]))  # what --plot draws
    verify = [s for s in r["trace"] if s["lane"] == "verify"]
    assert len(verify) == sp["target_calls"] + r["warmup"]["speculative"]["target_calls"]  # warm-up + measured
    (a, z) = r["phases"]["measured"]
    assert all(a <= s["start"] <= s["end"] <= z for s in verify[-sp["target_calls"]:])
    return sp, r


def test_bench_draft_precision(benched_8da4w):
    rep, table = benched_8da4w
    sp, run = _check_pair(rep, "draft=8da4w", draft="8da4w")
    assert 0 < sp["acceptance"] <= 1 and sp["draft_tokens"] == 4 and sp["draft_load_ms"] > 0
    # the draft shard set's own spans (its set-up, loads and forward calls), moved onto the run's origin
    draft = [s for s in run["trace"] if s["lane"] == "draft"]
    assert {"runtime", "embed", "layers.0", "head"} <= {s["name"] for s in draft}
    (a, z) = run["phases"]["measured"]
    assert sum(a <= s["start"] and s["end"] <= z and s["name"] == "head" for s in draft) >= sp["target_calls"]
    assert "accept %" in table and "× no draft" in table  # the bench's table at 200 columns: long headers shortened
    line = next(ln for ln in table.splitlines() if "draft=8da4w" in ln and ln.startswith("│"))
    assert f"{rep['rows'][1]['speedup_vs_no_draft']:.2f}×" in line


def test_bench_draft_lookup(stories_fp32_8da4w, tmp_path):
    rep, _ = _bench(tmp_path, "bench", stories_fp32_8da4w, "--precision", "fp32", "--draft", "lookup",
                    "--draft-tokens", "auto")
    sp, run = _check_pair(rep, "draft=lookup draft_tokens=auto", draft="lookup", draft_tokens="auto")
    assert 0 <= sp["acceptance"] <= 1 and sp["draft_tokens"] == "auto" and sp["draft_load_ms"] == 0
    assert {s["name"] for s in run["trace"] if s["lane"] == "draft"} == {"lookup:3"}  # a span per proposal


def test_bad_precision_for_the_set(capsys, stories_fp32_8da4w):
    rc, out, err = _run(capsys, "bench", stories_fp32_8da4w, "--precision", "fp32", "--draft", "int3")
    assert rc == 2 and "fp32, 8da4w" in err and err.strip().count("\n") == 0 and out == ""


def test_title_says_which_rows_are_emulated(tmp_path):
    """All rows emulated: the title says EMULATED; some: it points at the rows (their device column)."""
    from io import StringIO

    from rich.console import Console

    def title(rows) -> str:
        c = Console(file=StringIO(), width=300)
        c.print(report.render_table(report.BenchReport(report.BenchSettings(), rows, cold=False)))
        return c.file.getvalue().splitlines()[0]

    here, board = ({"name": n, "machine": m, "cpu": "x", "cores": 2, "mem_total_bytes": 2**30, "emulated": e}
                   for n, m, e in (("here", "x86_64", False), ("board", "aarch64", True)))
    a, b = _row(tmp_path / "a.pte", 10.0), _row(tmp_path / "a.pte", 1.0)
    a.device, b.device = here, board
    assert "rows marked emulated" in title([a, b]) and "EMULATED" not in title([a, b])
    b2 = _row(tmp_path / "a.pte", 1.0)
    b2.device = board
    assert "EMULATED (timings mean nothing)" in title([b, b2])
    a2 = _row(tmp_path / "a.pte", 10.0)
    a2.device = here
    assert "emulated" not in title([a2]).lower()
