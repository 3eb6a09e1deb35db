"""XNNPACK packed-weight cache files for shard loads (native shim only).

Loading a shard spends most of its time packing its weights into XNNPACK's layout
(SmolLM2 layer, 8da4w: ~10 ms of a 10-13 ms load). ExecuTorch's XNNPACK backend can keep
the packed weights in a file: the first load of a program writes them there, later loads
(in this process after a free, or in a later process) map the file and skip the packing
(~0.5-1.5 ms). The packed weights then live in clean, file-backed page cache instead of
anonymous memory.

One file per program, `<EDGECTL_CACHE>/packed/<executorch version>-<cpu key>/<sha256>.xpwc`
(the sha256 is the variant's, from the manifest). The backend keeps one cache object and
one lock per path, so a path shared by programs persists only a few of them. What the
backend would not tell us, handled here:
- a file is valid only once a load that wrote it has returned: the first load writes under
  a temporary name, which is renamed into place after load_method returned OK with no
  error from the cache; a crash mid-write leaves a temporary file (removed on a later
  write attempt), never a partial cache that would silently stay slow;
- a file from another executorch version or CPU would silently stay slow: the directory
  is keyed by both;
- a file already in place is never written to: its trailer is checked before use, and a
  broken one is unlinked (not truncated: another process may have it mapped);
- a missing directory makes the backend fall back to packing in memory silently: it is
  created here, and one that cannot be created or written means no cache and one warning.

EDGECTL_PACKED_CACHE=0 disables it; EDGECTL_PACKED_CACHE=<dir> puts it elsewhere.
"""

from __future__ import annotations

import hashlib
import os
import platform
import struct
import sys
import threading
from pathlib import Path

MAGIC = 0x58505743  # the backend's file trailer: [index_start u64][entries u32][magic u32][version u32]
SUFFIX = ".xpwc"


def cpu_key() -> str:
    """Machine, CPU model and feature flags (XNNPACK picks its kernels, hence the packed
    layout, by them), hashed."""
    model, flags = "", ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            k, _, v = line.partition(":")
            k = k.strip()
            if k in ("model name", "Model", "CPU part") and not model:
                model = v.strip()
            elif k in ("flags", "Features") and not flags:
                flags = " ".join(sorted(v.split()))
    except OSError:
        pass
    return f"{platform.machine()}-{hashlib.sha256(f'{model}|{flags}'.encode()).hexdigest()[:12]}"


def default_root() -> Path | None:
    """The cache directory for this executorch and CPU, or None when disabled."""
    env = os.environ.get("EDGECTL_PACKED_CACHE", "1")
    if env == "0":
        return None
    import importlib.metadata as md

    base = (Path(env) if env not in ("", "1") else
            Path(os.environ.get("EDGECTL_CACHE", Path.home() / ".cache" / "edgectl")) / "packed")
    return base / f"et{md.version('executorch')}-{cpu_key()}"


def trailer_ok(path: Path) -> bool:
    """The file ends with the backend's index trailer (magic, at least one entry, index
    inside the file)."""
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            if size < 20:
                return False
            f.seek(size - 20)
            index_start, entries, magic, _version = struct.unpack("<QIII", f.read(20))
    except OSError:
        return False
    return magic == MAGIC and entries > 0 and index_start < size - 20


class PackedCache:
    """Cache files for one directory; `load()` is what NativeEngine calls instead of
    native.load()."""

    def __init__(self, root: Path):
        self.root = Path(root)
        self.ok: bool | None = None  # None: directory not checked yet
        self.lock = threading.Lock()
        self.stats = {"hits": 0, "writes": 0, "uncached": 0}

    def _usable(self) -> bool:
        with self.lock:
            if self.ok is None:
                try:
                    self.root.mkdir(parents=True, exist_ok=True)
                    probe = self.root / f".probe-{os.getpid()}-{threading.get_ident()}"
                    probe.write_bytes(b"")
                    probe.unlink()
                    self.ok = True
                except OSError as e:
                    self.ok = False
                    print(f"edgectl: packed-weight cache off: cannot write {self.root} ({e.strerror or e}); "
                          "shards pack their weights at every load", file=sys.stderr)
            return self.ok

    def path(self, sha256: str) -> Path:
        return self.root / f"{sha256}{SUFFIX}"

    def existing(self, sha256: str | None) -> Path | None:
        """The complete cache file a load of the program `sha256` will map, or None."""
        if not sha256:
            return None
        p = self.path(sha256)
        return p if p.exists() and trailer_ok(p) else None

    def load(self, native, pte: Path, sha256: str | None, **kw) -> int:
        """native.load(pte, **kw) with the cache file for `sha256` (no cache without one)."""
        if not sha256 or not self._usable():
            self.stats["uncached"] += 1
            return native.load(pte, **kw)
        final = self.path(sha256)
        if final.exists():
            if trailer_ok(final):
                self.stats["hits"] += 1
                # the packed weights come from the cache file: reading the raw ones ahead doubled
                # a cold start's reads (the prefetcher reads the cache file instead, see `existing`)
                return native.load(pte, cache_path=final, readahead=False, **kw)
            final.unlink(missing_ok=True)  # broken (never written by us in place): rewrite it below
        tmp = final.with_name(f".{final.name}.tmp-{os.getpid()}-{threading.get_ident()}")
        errors = native.cache_errors()
        try:
            h = native.load(pte, cache_path=tmp, **kw)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        # the load packed into tmp, synced it and wrote its index before returning
        if native.cache_errors() == errors and trailer_ok(tmp):
            try:
                os.replace(tmp, final)
                self.stats["writes"] += 1
                return h
            except OSError:
                pass
        tmp.unlink(missing_ok=True)  # the loaded method keeps its mapping; the name goes
        self.stats["uncached"] += 1
        return h

    def clean(self) -> None:
        """Remove temporary files left by writers that died (not this process's)."""
        try:
            for p in self.root.glob(f".*{SUFFIX}.tmp-*"):
                pid = p.name.rsplit(".tmp-", 1)[1].split("-")[0]
                if pid.isdigit() and not Path(f"/proc/{pid}").exists():
                    p.unlink(missing_ok=True)
        except OSError:
            pass


_default: dict = {}


def default() -> PackedCache | None:
    """The process's cache (EDGECTL_PACKED_CACHE read once), or None when disabled."""
    key = os.environ.get("EDGECTL_PACKED_CACHE", "1"), os.environ.get("EDGECTL_CACHE")
    if key not in _default:
        root = default_root()
        _default[key] = PackedCache(root) if root is not None else None
        if root is not None:
            _default[key].clean()
    return _default[key]
