"""Do shard loads and shard compute overlap? Throughput of each alone and of both at once.

    python scripts/overlap.py SHARD_DIR [--precision int8] [--seconds 3] [--engine native|python]
    python scripts/overlap.py --files a.pte b.pte ... --shape DIM,N_KV_HEADS,HEAD_DIM,MAX_SEQ_LEN
        (one-layer programs without a manifest, e.g. from the shard build cache)

A loader thread loads and frees the layer shards' programs at `--precision` in a loop
(what the pipelined mode's loader does); the main thread runs one decode step (T=1) of a
resident layer shard in a loop. Each is measured alone, then both together, in
alternation (alone-load, alone-compute, both; repeated --rounds times) so machine drift
hits all three. Fraction = throughput together / throughput alone: 1.0 for both means
perfect overlap, 0.5 each means they took turns. Prints a table on stdout.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("shards", type=Path, nargs="?")
    ap.add_argument("--files", type=Path, nargs="+", help="one-layer programs instead of a shard set")
    ap.add_argument("--shape", help="with --files: dim,n_kv_heads,head_dim,max_seq_len")
    ap.add_argument("--precision", default=None, help="default: the manifest's lowest")
    ap.add_argument("--seconds", type=float, default=2.0)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--engine", default="native", choices=("native", "python"))
    ap.add_argument("--threads", type=int, default=0, help="XNNPACK thread pool size (default: the runtime's)")
    ap.add_argument("--shared-workspace", action="store_true",
                    help="load into XNNPACK's process-wide workspace (as before the loader got its own): shows the lock")
    a = ap.parse_args()

    import torch

    from edgectl.runtime import loader as ld
    from edgectl.formats.manifest import Manifest
    from edgectl.model import ModelArgs, empty_caches
    from edgectl.runtime.methods import _load_runtime

    rt = _load_runtime()
    from executorch.extension.pybindings import portable_lib

    if a.threads:
        portable_lib._unsafe_reset_threadpool(a.threads)
    portable_lib._threadpool_get_thread_count()
    if a.files:
        dim, nkv, hd, S = (int(x) for x in a.shape.split(","))
        paths, prec, n_per, S_ = a.files, a.precision or "?", 1, S
        shape = {"dim": dim, "n_kv_heads": nkv, "head_dim": hd}
    else:
        m = Manifest.load(a.shards)
        prec = a.precision or m.precisions[-1]
        layers = [s for s in m.shards if s.kind == "layers" and prec in s.variants]
        paths = [a.shards / s.variants[prec].file for s in layers]
        n_per, S_ = len(layers[0].layers), m.max_seq_len
    if a.engine == "native":
        from edgectl.runtime import _native

        native = _native.load()
        if native is None:
            sys.exit(f"native shim unavailable: {_native.why_not()}")
        eng = ld.NativeEngine(native, max(native.planned_size(p) for p in paths))
    else:
        eng = ld.PyEngine(rt)
    if a.files:
        from types import SimpleNamespace

        args = SimpleNamespace(**shape)
        cs = (1, S, args.n_kv_heads, args.head_dim)  # a global layer's cache (model_args.cache_shapes)
        k, v = [torch.zeros(cs)], [torch.zeros(cs)]
    else:
        args = ModelArgs.from_dict(m.model)
        k, v = empty_caches(args, S_, n_per, m.max_tokens_per_call, layers[0].layers)  # a sliding layer's: its ring
    # the computing shard gets its own engine's arena so loads cannot touch its memory
    ceng = ld.NativeEngine(native, native.planned_size(paths[0])) if a.engine == "native" else eng
    comp = ceng.load(paths[0])
    caches = [t for p in zip(k, v) for t in p]  # a decode step at position 5, written in place
    h, pos = torch.randn(1, 1, args.dim), torch.tensor([5])
    caps = [S_ * args.dim]

    def load_loop(stop: threading.Event, count: list) -> None:
        i = 0
        while not stop.is_set():
            eng.load(paths[i % len(paths)], streamed=not a.shared_workspace).free()
            i += 1
            count[0] = i

    def compute_loop(seconds: float) -> int:
        n, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < seconds:
            comp.run([h, pos, *caches], caps)
            n += 1
        return n

    def loads_alone() -> float:
        stop, count = threading.Event(), [0]
        t = threading.Thread(target=load_loop, args=(stop, count))
        t0 = time.perf_counter()
        t.start()
        time.sleep(a.seconds)
        stop.set()
        t.join()
        return count[0] / (time.perf_counter() - t0)

    def both() -> tuple[float, float]:
        stop, count = threading.Event(), [0]
        t = threading.Thread(target=load_loop, args=(stop, count))
        t0 = time.perf_counter()
        t.start()
        n = compute_loop(a.seconds)
        stop.set()
        t.join()
        dt = time.perf_counter() - t0
        return count[0] / dt, n / a.seconds

    compute_loop(0.3)  # warm
    la, ca, lb, cb = [], [], [], []
    for _ in range(a.rounds):
        la.append(loads_alone())
        ca.append(compute_loop(a.seconds) / a.seconds)
        x, y = both()
        lb.append(x)
        cb.append(y)
    mean = statistics.fmean
    size = sum(p.stat().st_size for p in paths) / len(paths)
    print(f"{a.shards or f'{len(paths)} programs'} layers at {prec} ({size / 1e6:.1f} MB file each), engine {a.engine}, {a.rounds} rounds x {a.seconds:g} s")
    print(f"{'':10s} {'alone /s':>10s} {'together /s':>12s} {'fraction':>9s}")
    print(f"{'loads':10s} {mean(la):10.1f} {mean(lb):12.1f} {mean(lb) / mean(la):9.2f}")
    print(f"{'computes':10s} {mean(ca):10.1f} {mean(cb):12.1f} {mean(cb) / mean(ca):9.2f}")
    print(f"sum of fractions {mean(lb) / mean(la) + mean(cb) / mean(ca):.2f} (1.0 = no overlap, 2.0 = perfect)")
    comp.free()


if __name__ == "__main__":
    main()
