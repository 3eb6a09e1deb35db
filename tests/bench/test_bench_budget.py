"""bench under memory budgets: cases per budget x mode, cgroup caps, OOM as a row status."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from edgectl.bench.report import Case, Row
from edgectl.cli.bench import bench_cases
from edgectl.util.errors import UsageError


def test_cases_are_artifact_by_budget_by_mode(tmp_path):
    shards = tmp_path / "shards"
    shards.mkdir()
    pte = tmp_path / "m.pte"
    pte.write_bytes(b"x")
    cases = bench_cases([shards, pte], "150MB,75MB", "resident,pipelined", cgroup=True)
    assert [(c.artifact.name, c.options) for c in cases] == [
        ("shards", {"budget": 150_000_000, "mode": "resident"}), ("shards", {"budget": 150_000_000, "mode": "pipelined"}),
        ("shards", {"budget": 75_000_000, "mode": "resident"}), ("shards", {"budget": 75_000_000, "mode": "pipelined"}),
        ("m.pte", {"budget": 150_000_000}), ("m.pte", {"budget": 75_000_000}),
    ]
    assert cases[0].label == "shards budget=150MB mode=resident"
    # without --cgroup a budget means nothing to a .pte: one plain row
    assert [c.options for c in bench_cases([pte], "150MB", None, cgroup=False)] == [{}]


def test_case_errors():
    with pytest.raises(UsageError, match="--mode needs --memory-budget"):
        bench_cases([Path(".")], None, "resident", cgroup=False)
    with pytest.raises(UsageError, match="--mode fast"):
        bench_cases([Path(".")], "1MB", "fast", cgroup=False)


def test_row_status_counts_oom_runs():
    row = Row(Case(Path("x")), 1, runs=[{"status": "oom"}, {"status": "ok", **{k: 1.0 for k in (
        "load_ms", "ttft_ms", "prefill_tok_s", "decode_tok_s", "peak_rss", "model_rss")}}])
    assert row.status == "oom 1/2" and row.summary["decode_tok_s"]["n"] == 1
    assert Row(Case(Path("x")), 1, runs=[{"status": "oom"}]).summary is None


@pytest.mark.real_model
def test_a_budget_below_the_minimum_is_an_infeasible_row(stories_dir, tmp_path):
    """Through a real worker: the planner's refusal becomes the row's status. The budget
    counts the whole worker process: one below its runtime floor is refused as such, and
    one a little above it (the floor a baseline worker measures, as bench does, + 4 MB)
    is below what the model needs on top."""
    from edgectl.bench.bench import worker
    from edgectl.bench.report import BenchSettings

    from helpers import build_shard_set

    shards = build_shard_set(stories_dir, tmp_path / "s", 64, ("fp32",))
    settings = BenchSettings(prompt_tokens=4, new_tokens=2, repeat=1)
    out = worker(Case(shards, {"budget": 1000}), settings)
    assert out["status"] == "infeasible" and "below this process's runtime floor" in out["error"]
    floor = worker(Case(Path(sys.executable)), settings, mode="baseline")["rss"]
    out = worker(Case(shards, {"budget": floor + 4_000_000}), settings)
    assert out["status"] == "infeasible" and "feasible minimum" in out["error"], out


def test_memcap_kills_a_child_over_its_cap():
    from edgectl.bench.memcap import MemCap, unavailable

    if unavailable():
        pytest.skip(unavailable())
    hog = "b = bytearray(200 * 1024 * 1024)\nfor i in range(0, len(b), 4096): b[i] = 1\nprint('survived')"
    with MemCap(64 * 1024 * 1024) as cap:
        p = subprocess.run([sys.executable, "-c", hog], preexec_fn=cap.preexec, capture_output=True, text=True)
        fig = cap.figures()
    assert p.returncode == -9 and "survived" not in p.stdout
    assert fig["cgroup_oom_kills"] >= 1 and fig["cgroup_peak"] <= 64 * 1024 * 1024
    with MemCap(None) as cap:  # uncapped: same child lives, and its peak is measured
        p = subprocess.run([sys.executable, "-c", hog], preexec_fn=cap.preexec, capture_output=True, text=True)
        fig = cap.figures()
    assert p.returncode == 0 and fig["cgroup_peak"] > 200 * 1024 * 1024
    assert not cap.path.exists()


@pytest.mark.real_model
@pytest.mark.slow
def test_ctx_size_row_scores_the_plan_its_generation_made(stories_dir, tmp_path):
    """With a budget and --ctx-size, a row's perplexity run follows its generation run's
    plan, both plan the KV cache for ctx-size positions, and windows are ctx-size long."""
    from edgectl.bench.bench import run_bench
    from edgectl.bench.report import BenchSettings

    from helpers import build_shard_set

    shards = build_shard_set(stories_dir, tmp_path / "s", 64, ("fp32",))
    text = tmp_path / "t.txt"
    text.write_text("Once upon a time, there was a little girl named Lily. She liked to play outside. " * 20)
    settings = BenchSettings(prompt_tokens=8, new_tokens=4, repeat=1, ppl_file=text, ppl_tokens=90, ctx_size=32)
    row = run_bench([Case(shards, {"budget": 1 << 40, "mode": "pipelined"})], settings).rows[0]
    gen, ppl = row.runs[0], row.ppl
    assert gen["status"] == ppl["status"] == "ok" and ppl["followed_generation_plan"]
    assert gen["context"] == ppl["context"] == ppl["window_tokens"] == 32 and gen["max_seq_len"] == 64
    assert gen["plan"]["context"] == ppl["plan"]["context"] == 32
    assert ppl["plan_precisions"] == gen["plan_precisions"] and ppl["plan_placements"] == gen["plan_placements"]
    assert ppl["windows"] == 3  # 90 tokens, 31 scored per window after BOS


@pytest.mark.real_model
def test_a_worker_the_cgroup_kills_is_a_failed_oom_row(stories_pte):
    """A real worker under a cap far below the interpreter's own needs: the kernel kills
    it, and the row says so (and fails the bench, see test_bench's exit-code tests)."""
    from edgectl.bench.bench import worker
    from edgectl.bench.report import BenchSettings
    from edgectl.bench.memcap import MemCap, unavailable

    if unavailable():
        pytest.skip(unavailable())
    with MemCap(40 * 1024 * 1024) as cap:
        out = worker(Case(stories_pte), BenchSettings(prompt_tokens=4, new_tokens=2, repeat=1), cap=cap)
    assert out["status"] == "oom" and out["cgroup_oom_kills"] >= 1
    row = Row(Case(stories_pte), 1, runs=[out])
    assert row.status == "oom 1/1" and "OOM-killed" in row.error and "(42 MB)" in row.error
