"""What checking files before loading costs (edgectl/formats/integrity.py): ms per 100 MB.

    python scripts/verify_cost.py ARTIFACT [--repeat 5]

ARTIFACT is a `.pte` (its own checksum) or a shard set (every file the manifest names,
against its sha256). Three figures, each the median (and range) of --repeat runs, each run
as a new process would see it (nothing verified in this process yet):
  cold   no stamp, page cache dropped first (echo 3 > /proc/sys/vm/drop_caches: root only)
  warm   no stamp, files already in the page cache
  stamp  a stamp from an earlier check: stat + one small file read per file, no hash
  ensure (shard sets) what a run's first load of every file costs with stamps: the stamp
         hit plus the manifest compared with each program's own record (integrity.ensure)
Stamps go to a temporary directory (EDGECTL_VERIFY_STAMPS), not the user's cache.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path


def _files(artifact: Path):
    from edgectl.formats.manifest import Manifest

    if artifact.is_dir():
        m = Manifest.load(artifact)
        seen = {}
        for s in m.shards:
            for v in s.variants.values():
                if v.file and not (s.kind == "embed" and "table" in v.extra):
                    seen[v.file] = v
        return [(artifact / f, v.sha256, v.bytes) for f, v in seen.items()]
    return [(artifact, None, artifact.stat().st_size)]


def _check(files) -> float:
    from edgectl.formats import integrity

    integrity._seen.clear()  # what a new process starts with
    t0 = time.perf_counter()
    for path, sha, size in files:
        if sha is None:
            assert integrity.check_pte(path) == "ok", path
        else:
            integrity.check_file(path, sha, size)
    return (time.perf_counter() - t0) * 1e3


def _drop_caches() -> bool:
    os.sync()
    try:
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return True
    except OSError:
        return False


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("artifact", type=Path)
    ap.add_argument("--repeat", type=int, default=5)
    a = ap.parse_args()
    files = _files(a.artifact)
    total = sum(s for _, _, s in files)
    out = {"artifact": str(a.artifact), "files": len(files), "mb": total / 1e6, "ms": {}}
    with tempfile.TemporaryDirectory() as stamps:
        for mode in ("cold", "warm", "stamp"):
            times = []
            for _ in range(a.repeat):
                root = Path(stamps) / (mode if mode == "stamp" else f"{mode}-{len(times)}")
                os.environ["EDGECTL_VERIFY_STAMPS"] = str(root)  # a fresh store: no stamp (cold, warm)
                if mode == "stamp" and not times:
                    _check(files)  # writes the stamps
                if mode == "cold" and not _drop_caches():
                    print("cold: cannot drop the page cache (not root?); skipped", file=sys.stderr)
                    break
                times.append(_check(files))
            if times:
                med = statistics.median(times)
                out["ms"][mode] = {"median": med, "min": min(times), "max": max(times),
                                   "per_100mb": med * 1e8 / total}
        if a.artifact.is_dir():  # as a run does it
            from edgectl.formats import integrity
            from edgectl.formats.manifest import Manifest
            times = []
            for _ in range(a.repeat):
                Manifest.load(a.artifact)  # registers the files afresh
                integrity._seen.clear()
                t0 = time.perf_counter()
                for path, _, _ in files:
                    integrity.ensure(path)
                times.append((time.perf_counter() - t0) * 1e3)
            med = statistics.median(times)
            out["ms"]["ensure"] = {"median": med, "min": min(times), "max": max(times), "per_100mb": med * 1e8 / total}
    print(json.dumps(out, indent=2))
    for mode, t in out["ms"].items():
        print(f"{mode:6s} {out['files']} files, {out['mb']:.1f} MB: {t['median']:.1f} ms "
              f"({t['min']:.1f}-{t['max']:.1f}), {t['per_100mb']:.2f} ms per 100 MB", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
