"""Process start to first token, and peak RSS, of `edgectl run` commands, paired and interleaved.

    python scripts/startup.py --runs 5 'label A' 'command A' 'label B' 'command B' ...

Each command is run `--runs` times, the commands taking turns. Start-to-first-token is the
wall time from spawning the process to the first byte it writes on stdout (`run` streams
the generated text there, token by token, and prints nothing else before it); peak RSS is
the kernel's ru_maxrss of the process. `--cold` drops the page cache before every run
(root). Prints one row per command (medians) and, with --json, the samples."""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
import time


def once(cmd: str, cold: bool) -> tuple[float, int, int]:
    if cold:
        subprocess.run(["sync"], check=True)
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
    t0 = time.perf_counter()
    p = subprocess.Popen(shlex.split(cmd), stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    first = p.stdout.read(1)
    t_first = time.perf_counter() - t0
    p.stdout.read()
    _, status, ru = os.wait4(p.pid, 0)
    rc = os.waitstatus_to_exitcode(status)
    if not first:
        t_first = float("nan")
    return t_first, ru.ru_maxrss * 1024, rc


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--cold", action="store_true", help="drop the page cache before every run (root)")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("pairs", nargs="+", help="label command [label command ...]")
    a = ap.parse_args()
    if len(a.pairs) % 2:
        ap.error("give labels and commands in pairs")
    cases = list(zip(a.pairs[::2], a.pairs[1::2]))
    samples: dict[str, list] = {label: [] for label, _ in cases}
    for _ in range(a.runs):
        for label, cmd in cases:
            samples[label].append(once(cmd, a.cold))
    rows = []
    for label, cmd in cases:
        s = samples[label]
        ok = [x for x in s if x[2] == 0]
        rows.append({"label": label, "command": cmd, "runs": len(s), "failed": len(s) - len(ok),
                     "first_token_s": statistics.median([x[0] for x in ok]) if ok else None,
                     "peak_rss_mb": statistics.median([x[1] for x in ok]) / 1e6 if ok else None,
                     "samples": s})
    if a.json:
        print(json.dumps({"cold": a.cold, "rows": rows}, indent=1))
    else:
        print(f"{'case':<40} {'runs':>4} {'start->first token':>19} {'peak RSS':>10}")
        for r in rows:
            ft = f"{r['first_token_s']:.2f} s" if r["first_token_s"] is not None else "failed"
            mb = f"{r['peak_rss_mb']:.0f} MB" if r["peak_rss_mb"] is not None else ""
            print(f"{r['label']:<40} {r['runs'] - r['failed']:>4} {ft:>19} {mb:>10}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
