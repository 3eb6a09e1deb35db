"""Resident bytes and load time of shard variants, measured in a fresh process.

`python -m edgectl.shard.shard_measure` reads a JSON list of {"id", "path"} or {"id", "dir",
"table"} on stdin and prints one JSON object {id: {"resident_bytes", "anon_bytes",
"load_ms"}} on stdout. For each program: read the file once (warm page cache), then
`repeats` times: malloc_trim, read RSS, load_program + load_method("forward"), read RSS,
drop both, malloc_trim. resident_bytes / anon_bytes are the medians of the VmRSS /
RssAnon growth, load_ms the median load time. One program is loaded and dropped first so
the one-time runtime initialisation (~15 ms) is not charged to a shard.

A program item may also carry "call": {"kind": "layers"|"head", "n_layers", "dim",
"n_kv_heads", "head_dim", "max_seq_len"[, "cache_lens"]}: then, through the native shim
the runtime uses (edgectl/_native), the program's planned (activation) memory is read from
its header ("planned_bytes") and one decode step (one token, position 64, full-size KV
cache: max_seq_len positions, or a layer's `cache_lens` entry, a sliding layer's ring) is
timed, median of 20 after a warm-up ("compute_ms"). Without the shim those two are absent.

An embed variant that reads the head's matrix has no program: its figures are those of
mapping the table (file-backed pages, touched only by the rows looked up).
"""

from __future__ import annotations

import json
import statistics
import sys
import time


def _status() -> dict[str, int]:
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, rest = line.partition(":")
            if key in ("VmRSS", "RssAnon"):
                out[key] = int(rest.split()[0]) * 1024
    return out


def measure(items: list[dict], repeats: int = 3) -> dict:
    import gc

    from edgectl.runtime.methods import _load_runtime

    from edgectl.util.native import malloc_trim, native_stderr_captured
    from edgectl.shard.chain import table_tensors

    rt = _load_runtime()
    native = None
    if any("call" in it for it in items):
        from edgectl.runtime import _native

        native = _native.load()
    out = {}
    with native_stderr_captured():
        progs = [it for it in items if "path" in it]
        if progs:  # one-time runtime init, not charged to any shard
            p = rt.load_program(progs[0]["path"])
            p.load_method("forward")
            del p
        for it in items:
            if "path" in it:
                with open(it["path"], "rb") as f:
                    while f.read(1 << 22):
                        pass
            rss, anon, ms = [], [], []
            for _ in range(repeats):
                gc.collect()
                malloc_trim()
                before = _status()
                t0 = time.perf_counter()
                if "path" in it:
                    prog = rt.load_program(it["path"])
                    method = prog.load_method("forward")
                    held = (prog, method)
                else:
                    held = table_tensors(it["dir"], it["table"])
                ms.append((time.perf_counter() - t0) * 1e3)
                after = _status()
                rss.append(after["VmRSS"] - before["VmRSS"])
                anon.append(after["RssAnon"] - before["RssAnon"])
                del held
                if "path" in it:
                    del prog, method
            out[it["id"]] = {"resident_bytes": int(statistics.median(rss)), "anon_bytes": int(statistics.median(anon)),
                             "load_ms": statistics.median(ms)}
            if "call" in it and native is not None:
                out[it["id"]].update(_decode_step(native, it["path"], it["call"]))
    gc.collect()
    malloc_trim()
    return out


def _decode_step(native, path: str, call: dict, runs: int = 20) -> dict:
    """Planned memory and the median time of one decode step of the program at `path`."""
    import numpy as np

    from edgectl.runtime.loader import NativeEngine

    planned = native.planned_size(path)
    eng = NativeEngine(native, planned)
    loaded = eng.load(path)
    S, dim, hd, nkv = call["max_seq_len"], call["dim"], call["head_dim"], call["n_kv_heads"]
    h = np.random.default_rng(0).standard_normal((1, 1, dim), dtype=np.float32)
    if call["kind"] == "layers":
        n = call["n_layers"]
        p = min(64, S - 1)  # a step at position p reads positions <= p of the cache
        lens = call.get("cache_lens") or [S] * n
        caches = [np.zeros((1, c, nkv, hd), dtype=np.float32) for c in lens for _ in "kv"]
        inputs, caps = [h, np.array([p], dtype=np.int64), *caches], [S * dim]
    else:
        inputs, caps = [h, np.array([0], dtype=np.int64)], [call["vocab_size"]]
    times = []
    try:
        for i in range(runs + 1):
            t0 = time.perf_counter()
            loaded.run(inputs, caps)
            if i:
                times.append((time.perf_counter() - t0) * 1e3)
    finally:
        loaded.free()
    return {"planned_bytes": int(planned), "compute_ms": statistics.median(times)}


def run_measure(items: list[dict], repeats: int = 3) -> dict:
    """Measure in a fresh subprocess (so nothing loaded by the caller distorts RSS)."""
    import subprocess

    from edgectl.util.errors import EdgectlError

    proc = subprocess.run([sys.executable, "-m", "edgectl.shard.shard_measure", str(repeats)],
                          input=json.dumps(items), capture_output=True, text=True)
    if proc.returncode != 0:
        tail = (proc.stderr.strip().splitlines() or ["?"])[-1]
        raise EdgectlError(f"measuring shard load cost failed: {tail}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


if __name__ == "__main__":
    import contextlib

    items = json.loads(sys.stdin.read())
    with contextlib.redirect_stdout(sys.stderr):
        res = measure(items, int(sys.argv[1]) if len(sys.argv) > 1 else 3)
    print(json.dumps(res))
