"""The runtime without torch: `edgectl run` (a `.pte`, a shard set with and without a
memory budget) and the bench worker (gen and baseline modes) in processes where torch,
torchao and transformers cannot be imported, giving what they give with them importable
(and what eager transformers gives); and, with them importable, a run, a budgeted shard
set and the bench worker's measurements import none of them."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.real_model

BLOCKED = ("torch", "torchao", "transformers")
PROMPT = "Once upon a time"
N = 24  # new tokens: no EOS within them for this prompt (the length is checked)

# A sys.meta_path finder, first in line, that refuses the blocked top-level packages (and
# any of their submodules), whatever asks for them.
SITECUSTOMIZE = f"""
import sys


class _Block:
    BLOCKED = {BLOCKED!r}

    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in self.BLOCKED:
            raise ImportError(f"{{name}} is blocked in this process")
        return None


sys.meta_path.insert(0, _Block())
"""


@pytest.fixture(scope="module")
def no_torch(tmp_path_factory) -> dict:
    """The environment of a process in which torch, torchao and transformers are unimportable
    (a sitecustomize.py first on PYTHONPATH), checked to be so."""
    d = tmp_path_factory.mktemp("notorch")
    (d / "sitecustomize.py").write_text(SITECUSTOMIZE)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (str(d), os.environ.get("PYTHONPATH")) if p)}
    for name in BLOCKED:
        r = subprocess.run([sys.executable, "-c", f"import {name}"], env=env, capture_output=True, text=True, timeout=120)
        assert r.returncode == 1 and f"{name} is blocked" in r.stderr, r.stderr[-2000:]
    return env


def _edgectl(env: dict, *argv: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "edgectl.cli", *argv], env=env, capture_output=True, text=True,
                          timeout=300)


def _run_json(env: dict, artifact: Path, *extra: str) -> dict:
    """`edgectl run ARTIFACT -p PROMPT -n N --json` (greedy) in a fresh process."""
    r = _edgectl(env, "run", str(artifact), "-p", PROMPT, "-n", str(N), "--json", *extra)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout)


def _worker(env: dict, **job) -> dict:
    """`python -m edgectl.bench.bench_worker JOB_JSON`, as bench starts it: one JSON object on stdout."""
    r = subprocess.run([sys.executable, "-m", "edgectl.bench.bench_worker", json.dumps(job)], env=env,
                       capture_output=True, text=True, timeout=300)
    lines = r.stdout.strip().splitlines()
    assert r.returncode == 0 and len(lines) == 1, (r.returncode, r.stdout[-2000:], r.stderr[-3000:])
    out = json.loads(lines[0])
    assert out["ok"] is True, out
    return out


@pytest.fixture(scope="module")
def eager_tokens(stories_dir, stories_pte) -> list[int]:
    """N greedy tokens of eager transformers after PROMPT, encoded as `run` encodes it."""
    import torch
    import transformers

    from edgectl.runtime.run import artifact_tokenizer

    ids = artifact_tokenizer(stories_pte).encode(PROMPT)
    hf = transformers.AutoModelForCausalLM.from_pretrained(stories_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        out = hf.generate(torch.tensor([ids]), max_new_tokens=N, min_new_tokens=N, do_sample=False)
    return out[0, len(ids):].tolist()


@pytest.fixture(scope="module")
def pte_run_with_torch(stories_pte) -> dict:
    """`edgectl run` of the stories260K .pte (greedy, --json) with torch importable."""
    return _run_json(dict(os.environ), stories_pte)


def test_run_a_pte_without_torch(stories_pte, no_torch, eager_tokens, pte_run_with_torch):
    """Greedy `edgectl run` of the stories260K .pte with torch unimportable: the text and
    tokens of the same command with torch importable, and eager transformers' tokens."""
    free, ref = _run_json(no_torch, stories_pte), pte_run_with_torch
    assert len(free["tokens"]) == N and free["stats"]["new_tokens"] == N
    assert free["tokens"] == ref["tokens"] == eager_tokens
    assert free["text"] == ref["text"] and len(free["text"]) > 40


def test_run_a_shard_set_without_torch_with_and_without_a_budget(stories_shards, no_torch, pte_run_with_torch):
    """The stories260K shard set with torch unimportable: without a budget, and under one
    of the runtime floor (this process's RSS before any shard, measured by the run itself)
    plus 48 MB for the model, the greedy text of the monolithic .pte; a budget below the
    floor is one line that says so."""
    ref = pte_run_with_torch
    plain = _run_json(no_torch, stories_shards)
    assert plain["tokens"] == ref["tokens"] and plain["text"] == ref["text"]
    floor = plain["memory"]["baseline_bytes"]
    assert 50e6 < floor < 1e9  # Python, numpy and the runtime library: ~140-160 MB measured
    assert plain["memory"]["engine"] == "native"

    budget = floor + 48_000_000
    capped = _run_json(no_torch, stories_shards, "--memory-budget", str(budget))
    assert capped["tokens"] == ref["tokens"] and capped["text"] == ref["text"]
    mem, plan = capped["memory"], capped["plan"]
    assert mem["budget_bytes"] == plan["budget_bytes"] == budget
    # the floor this run measured (within a few MB of the plain run's) is counted in the plan
    assert mem["floor_bytes"] == plan["floor_bytes"] and abs(mem["floor_bytes"] - floor) < 8e6
    assert mem["model_budget_bytes"] == budget - mem["floor_bytes"]
    assert plan["floor_bytes"] <= plan["fixed_bytes"] and plan["total_bytes"] <= budget

    r = _edgectl(no_torch, "run", str(stories_shards), "-p", PROMPT, "-n", "4", "--memory-budget", str(floor // 2))
    err = r.stderr.strip()
    assert r.returncode == 1 and err.count("\n") == 0 and "Traceback" not in err, err
    assert "below this process's runtime floor" in err


def test_bench_worker_without_torch(stories_pte, stories_shards, no_torch):
    """The bench worker, torch unimportable: baseline mode reports the runtime floor; gen
    mode generates exactly new_tokens from a .pte, and from a shard set planned under a
    budget of that floor plus 64 MB, counting the floor it measured itself."""
    base = _worker(no_torch, artifact=sys.executable, mode="baseline")
    assert 50e6 < base["rss"] <= base["peak_rss"] < 1e9

    gen = _worker(no_torch, artifact=str(stories_pte), mode="gen", prompt_tokens=8, new_tokens=8)
    assert gen["prompt_tokens"] == 8 and gen["new_tokens"] == 8
    assert gen["decode_tok_s"] > 0 and gen["prefill_tok_s"] > 0 and gen["ttft_ms"] > 0
    assert gen["rss_before_load"] > 50e6 and gen["peak_rss"] >= gen["rss_end"] > 0 and gen["model_rss"] > 0
    assert gen["context"] == 16 and gen["max_seq_len"] == 512

    budget = base["rss"] + 64_000_000
    sh = _worker(no_torch, artifact=str(stories_shards), mode="gen", prompt_tokens=8, new_tokens=8,
                 options={"budget": budget, "mode": "pipelined"})
    assert sh["new_tokens"] == 8 and sh["engine"] == "native" and sh["plan_mode"] == "pipelined"
    assert sh["plan_budget_bytes"] == budget and sh["plan_total_bytes"] <= budget
    # the floor the worker's runtime counted is the one baseline mode measures (a few modules more)
    assert 0 < sh["plan"]["floor_bytes"] and abs(sh["plan"]["floor_bytes"] - base["rss"]) < 8e6


IN_PROCESS = """
import json
import sys

import edgectl
from edgectl.bench import bench_worker
from edgectl.cli.main import main

pte, shards, out = sys.argv[1:]
res = {}
with edgectl.load(pte) as llm:
    res["pte"] = "".join(llm.generate("Once upon a time", max_new_tokens=16))
from edgectl.runtime.methods import engine
from edgectl.runtime.shards_startup import rss_bytes

engine().thread_count()
with edgectl.load(shards, memory_budget=rss_bytes()["rss"] + 64_000_000, context=32) as llm:
    res["shards"] = "".join(llm.generate("Once upon a time", max_new_tokens=16))
res["cli"] = main(["run", pte, "-p", "Once upon a time", "-n", "4"])
res["baseline"] = bench_worker.measure(bench_worker.Job(sys.executable, mode="baseline"))
res["gen"] = bench_worker.measure(bench_worker.Job(pte, mode="gen", prompt_tokens=8, new_tokens=8))["new_tokens"]
res["imported"] = sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "torchao", "transformers"))
with open(out, "w") as f:
    json.dump(res, f)
"""


def test_nothing_imports_torch_where_it_is_importable(stories_pte, stories_shards, tmp_path):
    """With torch, torchao and transformers importable, the Python API (a .pte, a shard set
    under a budget), `edgectl run` and the bench worker's measurements, all in one process,
    leave none of them in sys.modules."""
    out = tmp_path / "res.json"
    r = subprocess.run([sys.executable, "-c", IN_PROCESS, str(stories_pte), str(stories_shards), str(out)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads(out.read_text())
    assert res["imported"] == []
    assert res["cli"] == 0 and res["gen"] == 8 and res["baseline"]["rss"] > 0
    assert len(res["pte"]) > 20 and res["shards"] == res["pte"]
