"""What a target call over K+1 tokens costs against one token: the planner's verify_scale.

    python scripts/spec_verify_cost.py SHARD_SET_OR_PTE [--precision fp32] [--max-k 8] [--repeat 15] [--threads 2]

Opens the artifact resident (as `run` does), fills a context of 64 positions, then times
forward() over T = 1..max_k+1 tokens at the next position with all_logits (as speculative
decoding's verify call asks), median of --repeat calls each. Prints per T the median ms and
its ratio to T = 1, and the least-squares slope c of ratio = 1 + c * K (K = T - 1): the
figure edgectl/runtime/plan_cost.py's VERIFY_SCALE records. Run it on a quiet machine.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("artifact")
    ap.add_argument("--precision")
    ap.add_argument("--max-k", type=int, default=8)
    ap.add_argument("--repeat", type=int, default=15)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()

    from edgectl.runtime.artifact import open_artifact
    from edgectl.runtime.runtime import set_threads

    set_threads(a.threads)
    kw = {"precision": a.precision} if a.precision else {}
    model = open_artifact(a.artifact, context=64 + a.max_k + 2, **kw)
    ctx = [1 + (i * 37) % 500 for i in range(64)]
    model.forward(ctx, 0)
    rows = []
    for T in range(1, a.max_k + 2):
        toks = ctx[:T]
        model.forward(toks, 64, all_logits=True)  # warm
        times = []
        for _ in range(a.repeat):
            t0 = time.perf_counter()
            model.forward(toks, 64, all_logits=True)
            times.append((time.perf_counter() - t0) * 1e3)
        rows.append((T, statistics.median(times)))
    base = rows[0][1]
    ks = [T - 1 for T, _ in rows]
    ratios = [ms / base for _, ms in rows]
    slope = sum(k * (r - 1) for k, r in zip(ks, ratios)) / sum(k * k for k in ks)
    for (T, ms), r in zip(rows, ratios):
        print(f"T={T:2d}  {ms:8.2f} ms  x{r:.2f}")
    print(json.dumps({"artifact": a.artifact, "precision": a.precision, "threads": a.threads,
                      "ms": {T: round(ms, 3) for T, ms in rows}, "verify_scale": round(slope, 4)}))


if __name__ == "__main__":
    main()
