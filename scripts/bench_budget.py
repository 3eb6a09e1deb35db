"""Where a shard set's memory goes: measured cgroup charge and RSS at each start-up stage.

    python scripts/bench_budget.py SHARD_DIR [--memory-budget 5MB] [--mode resident]
                                   [--pte monolithic.pte] [--new-tokens 32]

Each artifact is measured in its own fresh process, which moves itself into a new cgroup v1
memory group (root; no limit) and reads memory.usage_in_bytes (what a cap would count),
RssAnon and RssFile after each stage: interpreter + torch + runtime + thread pool (the
baseline `bench --cgroup` adds to a budget), the native shim, the tokenizer, opening
the model (resident shards, KV cache, arena), the first prefill, decode. The plan's own
figures are printed beside them. A table on stdout; JSON with --json.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CG = Path("/sys/fs/cgroup/memory")


def status() -> dict:
    out = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        k, _, v = line.partition(":")
        if k in ("VmRSS", "RssAnon", "RssFile", "VmHWM"):
            out[k] = int(v.split()[0]) * 1024
    return out


def child(args) -> dict:
    group = CG / f"edgectl-budget-{os.getpid()}"
    group.mkdir()
    (group / "cgroup.procs").write_text(f"{os.getpid()}\n")
    stages = []

    def mark(name: str) -> None:
        s = status()
        stages.append({"stage": name, "cgroup": int((group / "memory.usage_in_bytes").read_text()),
                       "cgroup_peak": int((group / "memory.max_usage_in_bytes").read_text()),
                       "anon": s["RssAnon"], "file": s["RssFile"], "rss": s["VmRSS"]})

    import torch  # noqa: F401

    from edgectl.runtime import artifact, runtime
    from edgectl.runtime.tokenizer import Tokenizer  # noqa: F401

    methods._load_runtime()
    runtime.set_threads(None)
    from executorch.extension.pybindings import portable_lib

    portable_lib._threadpool_get_thread_count()
    mark("baseline (python, torch, runtime, thread pool)")
    from edgectl.runtime import _native
    from edgectl.util.scoring import prompt_ids
    from edgectl.runtime.generate import generate
    from edgectl.runtime.run import tokenizer_for

    _native.load()
    mark("native shim + edgectl modules")
    kw = {}
    if args.memory_budget:
        from edgectl.runtime.plan import parse_bytes

        kw = {"budget": parse_bytes(args.memory_budget), "mode": args.mode}
    model = artifact.open_artifact(args.artifact, **kw)
    mark("model opened (resident shards, KV cache, arena)")
    tok = tokenizer_for(model)
    mark("tokenizer")
    ids = prompt_ids(tok, args.prompt_tokens)
    model.forward(ids, 0)
    mark("first prefill")
    model.reset()
    generate(model, ids, args.new_tokens, eos_ids=())
    mark("after a generation")
    plan = getattr(model, "plan", None)
    out = {"artifact": args.artifact, "stages": stages}
    if plan is not None:
        out["plan"] = {"total": plan.total_bytes, "resident": plan.resident_bytes, "kv": plan.kv_bytes,
                       "slots_and_arena": plan.slot_bytes, "mode": plan.mode,
                       "fixed": getattr(plan, "fixed_bytes", None)}
        out["engine"] = model.engine_name
    if hasattr(model, "close"):
        model.close()
    (CG / "cgroup.procs").write_text(f"{os.getpid()}\n")
    group.rmdir()
    return out


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("artifacts", nargs="+")
    p.add_argument("--memory-budget")
    p.add_argument("--mode", default="auto")
    p.add_argument("--prompt-tokens", type=int, default=64)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--json")
    p.add_argument("--child", action="store_true")
    args = p.parse_args()
    if args.child:
        args.artifact = args.artifacts[0]
        print(json.dumps(child(args)))
        return
    results = []
    for a in args.artifacts:
        cmd = [sys.executable, __file__, a, "--child", "--mode", args.mode, "--prompt-tokens", str(args.prompt_tokens),
               "--new-tokens", str(args.new_tokens)]
        if args.memory_budget and Path(a).is_dir():
            cmd += ["--memory-budget", args.memory_budget]
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        r = subprocess.run(cmd, capture_output=True, text=True, env=env)
        if r.returncode:
            sys.exit(f"{a}: {r.stderr.strip().splitlines()[-1] if r.stderr.strip() else r.returncode}")
        results.append(json.loads(r.stdout.strip().splitlines()[-1]))
    for res in results:
        print(f"\n{res['artifact']}" + (f"  engine={res.get('engine')}" if res.get("engine") else ""))
        base = res["stages"][0]
        print(f"{'stage':50s} {'cgroup MB':>10s} {'+cg MB':>8s} {'anon MB':>8s} {'+anon MB':>9s} {'file MB':>8s}")
        prev = base
        for s in res["stages"]:
            print(f"{s['stage']:50s} {s['cgroup'] / 1e6:10.1f} {(s['cgroup'] - prev['cgroup']) / 1e6:8.2f} "
                  f"{s['anon'] / 1e6:8.1f} {(s['anon'] - prev['anon']) / 1e6:9.2f} {s['file'] / 1e6:8.1f}")
            prev = s
        last = res["stages"][-1]
        print(f"{'model cost over baseline (cgroup peak - baseline)':50s} {(last['cgroup_peak'] - base['cgroup']) / 1e6:10.2f}")
        if "plan" in res:
            pl = res["plan"]
            print("plan: " + ", ".join(f"{k} {v / 1e6:.2f} MB" if isinstance(v, int) else f"{k} {v}" for k, v in pl.items() if v is not None))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
