"""Integrity: every file edgectl hands to ExecuTorch is checked against a sha256 first.

ExecuTorch trusts a program's bytes: one byte changed in a shard's flatbuffer crashed the
process (SIGSEGV), one changed in a `.pte`'s weights ran silently with wrong weights. So a
damaged, truncated, swapped or replaced file is one line naming it (exit 1), never a crash:

- Shard sets: `Manifest.load` registers the sha256 and size the manifest records for every
  file it names (`expect`). `ensure(path)` checks a registered file before anything in the
  process parses or loads it: the native shim's load and planned_size, the Python-binding
  loader, ptefile's readers (the tied embedding). It runs in whichever process and thread
  loads (a bench worker, the loader thread). Once the bytes are verified, the model fields
  the runtime sizes tensors from (cache shape, vocabulary) are compared with the program's
  own sealed `edgectl_meta`, so a manifest damaged into other valid JSON is refused too.
  tokenizer.json is checked against the manifest's `tokenizer_sha256` (manifests written
  from now on; older ones have none), and `shard` rebuilds a cached program whose own
  checksum fails instead of linking it into a new set.
- `.pte` files: `edgectl export` (both interfaces) and `edgectl shard` seal every program
  they write. Its `edgectl_meta` JSON starts with `{"file_sha256": "<64 hex>"`: the sha256
  of the whole file except those 64 characters (`seal`, `check_pte`). Why there: the file
  stays an ordinary program of the same size and layout (ExecuTorch's stock runners never
  read edgectl_meta), a trailer after the last segment relies on every loader ignoring
  extra bytes, and a sidecar is lost when the file is copied alone. Finding the digest needs
  no flatbuffer parse (a search for that prefix, which comes early, in the constant
  segment), so a damaged header cannot hide it; bytes that only look like a digest cannot
  pass, since passing means every other byte hashes to it. A file exported before sealing:
  one warning ("no checksum; re-export it to get one") and it runs, as before; `edgectl
  verify` reports it as not verified (exit 1). runtime checks a `.pte` in `require_pte`.
- Stamps: hashing costs time (README, Integrity), so a verified file gets a stamp,
  `$EDGECTL_CACHE/verified/<hash of its real path and expected digest>`, holding its size,
  mtime_ns, ctime_ns, inode and device; a later check whose stat is the same skips the hash.
  ctime is in the key because ordinary tools cannot set it back (mtime they can: cp -p,
  touch -r), and there is no xattr because writing one changes ctime. A file changed less
  than RACY_NS before it was hashed gets no stamp: a second change within the same
  timestamp tick would leave its stat unchanged. A cache that cannot be written means
  hashing every time; EDGECTL_VERIFY_STAMPS=DIR moves the stamps, =0 turns them off.
  Stamps guard against accidents, not against someone who can write the cache. Within a
  process, a verified (path, stat) is not hashed again (a stat per load).
"""

from __future__ import annotations

import hashlib
import json
import mmap
import os
import sys
import threading
import time
from pathlib import Path

from edgectl.formats import ptefile
from edgectl.util.errors import EdgectlError

FIELD = "file_sha256"
PLACEHOLDER = "0" * 64
PREFIX = b'{"file_sha256": "'  # how json.dumps starts a meta dict whose first key is FIELD
RACY_NS = 2_000_000_000
# what the runtime sizes tensors from (a sliding layer's ring: model_args.ring_len)
MODEL_FIELDS = ("dim", "n_heads", "n_kv_heads", "head_dim", "vocab_size", "layer_types", "sliding_window")
SHARD_HINT = "re-create the shard set with `edgectl shard`, or copy it again"
PTE_HINT = "re-export it with `edgectl export`, or copy it again"

_lock = threading.Lock()
_expected: dict[str, dict] = {}  # abspath -> {"sha256", "bytes", "manifest", "facts"}
_seen: dict[tuple[str, str], tuple] = {}  # (abspath, expected digest or "pte") -> stat verified in this process
_warned: set[str] = set()
stats = {"hashed_files": 0, "hashed_bytes": 0, "stamp_hits": 0}


def _stat_key(st) -> list[int]:
    return [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino, st.st_dev]


def stamp_root() -> Path | None:
    """Where stamps live: EDGECTL_VERIFY_STAMPS=DIR moves them, =0 turns them off (None:
    hash every time)."""
    env = os.environ.get("EDGECTL_VERIFY_STAMPS", "1")
    if env == "0":
        return None
    if env not in ("", "1"):
        return Path(env)
    return Path(os.environ.get("EDGECTL_CACHE", Path.home() / ".cache" / "edgectl")) / "verified"


def _stamp_file(real: str, what: str) -> Path | None:
    root = stamp_root()
    return None if root is None else root / hashlib.sha256(f"{real}\0{what}".encode()).hexdigest()[:40]


def _known(path: str, what: str, key: list[int], stamps: bool) -> bool:
    """Verified before with this stat: in this process, or by its stamp (without `stamps`:
    never, hash it now)."""
    if not stamps:
        return False
    if _seen.get((path, what)) == tuple(key):
        return True
    real = os.path.realpath(path)
    f = _stamp_file(real, what)
    try:
        hit = f is not None and json.loads(f.read_text()) == {"path": real, "expect": what, "stat": key}
    except (OSError, ValueError):
        hit = False
    if hit:
        stats["stamp_hits"] += 1
        with _lock:
            _seen[path, what] = tuple(key)
    return hit


def _verified(path: str, what: str, key: list[int], started_ns: int) -> None:
    with _lock:
        _seen[path, what] = tuple(key)
    if max(key[1], key[2]) >= started_ns - RACY_NS:
        return  # changed just now: a second change within the same tick would keep this stat
    real = os.path.realpath(path)
    f = _stamp_file(real, what)
    if f is None:
        return
    tmp = f.with_name(f".{f.name}.tmp-{os.getpid()}-{threading.get_ident()}")
    try:
        f.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_text(json.dumps({"path": real, "expect": what, "stat": key}))
        os.replace(tmp, f)
    except OSError:
        try:
            tmp.unlink(missing_ok=True)
        except OSError:
            pass


def sha256_file(path: str | Path, skip: int | None = None) -> str:
    """sha256 of a file's bytes, without the 64 at offset `skip` when given."""
    h, buf, pos = hashlib.sha256(), bytearray(1 << 20), 0
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buf):
            chunk = view[:n]
            if skip is not None and pos < skip + 64 and pos + n > skip:
                a, b = max(skip - pos, 0), min(skip + 64 - pos, n)
                h.update(chunk[:a])
                h.update(chunk[b:])
            else:
                h.update(chunk)
            pos += n
    stats["hashed_files"] += 1
    stats["hashed_bytes"] += pos
    return h.hexdigest()


def _stat(path: str, shown, named_by: str | None = None) -> os.stat_result:
    try:
        return os.stat(path)
    except FileNotFoundError:
        raise EdgectlError(f"{shown}: missing" + (f" (named by {named_by})" if named_by else ""),
                           hint=SHARD_HINT if named_by else None) from None
    except OSError as e:
        raise EdgectlError(f"{shown}: cannot read ({e.strerror or e})") from e


# --- shard sets: the manifest's sha256 --------------------------------------------------------


def expect(directory: str | Path, manifest) -> None:
    """Register what a loaded manifest records for each file in `directory`, checked by
    `ensure` before first use. Refuses file names that leave the directory."""
    directory = Path(directory)
    mpath = str(directory / "manifest.json")
    mm = manifest.model
    facts = {"max_seq_len": manifest.max_seq_len, **{k: mm.get(k) for k in MODEL_FIELDS if k in mm}}
    if getattr(manifest, "max_tokens_per_call", None) is not None:
        facts["max_tokens_per_call"] = manifest.max_tokens_per_call
    for s in manifest.shards:
        for v in s.variants.values():
            if not v.file or "table" in v.extra and s.kind == "embed":
                continue  # an embed row table: its file is the head's, registered with it
            if os.path.isabs(v.file) or ".." in Path(v.file).parts:
                raise EdgectlError(f"{mpath}: damaged: it names {v.file!r}, outside the shard set", hint=SHARD_HINT)
            with _lock:
                _expected[os.path.abspath(directory / v.file)] = {"sha256": v.sha256, "bytes": v.bytes,
                                                                  "manifest": mpath, "facts": facts}


def ensure(path: str | Path) -> None:
    """Check `path` against a loaded manifest's record (nothing for a file none names)."""
    rec = _expected.get(os.path.abspath(path))
    if rec is None:
        return
    check_file(path, rec["sha256"], rec["bytes"], named_by=rec["manifest"])
    if rec["facts"] and not rec.get("agreed"):
        rec["agreed"] = True  # first: reading the program's meta comes back here
        try:
            _agrees(path, rec["facts"], rec["manifest"])
        except BaseException:
            rec["agreed"] = False
            raise


ptefile.BEFORE_READ.append(lambda path: ensure(path))  # looked up per call: a test may replace ensure


def check_file(path: str | Path, sha256: str, size: int | None = None, *, named_by: str = "the manifest",
               stamps: bool = True) -> None:
    """Raise a one-line EdgectlError unless `path` has the recorded size and sha256."""
    p = os.path.abspath(path)
    key = _stat_key(_stat(p, path, named_by))
    if _known(p, sha256, key, stamps):
        return
    if size is not None and key[0] != size:
        what = "truncated" if key[0] < size else "damaged (longer than recorded)"
        raise EdgectlError(f"{path}: {what}: {key[0]} bytes, {named_by} records {size}", hint=SHARD_HINT)
    started = time.time_ns()
    got = sha256_file(p)
    if got != sha256:
        other = next((q for q, r in list(_expected.items()) if r["sha256"] == got and q != p
                      and r["manifest"] == named_by), None)
        why = (f"it holds the bytes of {os.path.basename(other)} (files swapped?)" if other
               else f"its sha256 is not the one {named_by} records")
        raise EdgectlError(f"{path}: damaged: {why}", hint=SHARD_HINT)
    _verified(p, sha256, key, started)


def _agrees(path, facts: dict, named_by: str) -> None:
    """The model fields the runtime sizes tensors from, in the manifest, against the
    program's own sealed record (a damaged manifest can still be valid JSON)."""
    meta = _own_meta(path)
    if not isinstance(meta, dict):
        return  # a program without edgectl's record: nothing to compare
    own = {"max_seq_len": meta.get("max_seq_len"), "max_tokens_per_call": meta.get("max_tokens_per_call"),
           **(meta.get("model") or {})}
    for k, v in facts.items():
        if own.get(k) is not None and v != own[k]:
            raise EdgectlError(f"{named_by}: damaged: it records {k} {v!r}, {os.path.basename(path)} was built "
                               f"for {own[k]!r}", hint=SHARD_HINT)


def _own_meta(path) -> dict | None:
    """A verified program's edgectl_meta, read by ptefile's flatbuffer reader (~0.1 ms:
    it imports nothing), or None if it has none."""
    try:
        return json.loads(ptefile.constant_bytes(Path(path), "edgectl_meta"))
    except (EdgectlError, ValueError):
        return None


# --- a .pte's own checksum -----------------------------------------------------------------


def _digest_offset(path: str) -> int | None:
    """Where the 64 hex digits of the file's own digest start, or None if it has none."""
    with open(path, "rb") as f:
        if os.fstat(f.fileno()).st_size == 0:
            return None
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
            i = mm.find(PREFIX)
    return None if i < 0 else i + len(PREFIX)


def seal(path: str | Path) -> None:
    """Write the file's digest into its placeholder (the file as `export` just wrote it)."""
    off = _digest_offset(str(path))
    if off is None:
        raise EdgectlError(f"{path}: no {FIELD} placeholder to seal (an edgectl bug)")
    with open(path, "r+b") as f:
        f.seek(off)
        if f.read(64) != PLACEHOLDER.encode():
            raise EdgectlError(f"{path}: its {FIELD} placeholder is not where expected (an edgectl bug)")
        digest = sha256_file(path, skip=off)
        f.seek(off)
        f.write(digest.encode())
    if check_pte(path, stamps=False) != "ok":
        raise EdgectlError(f"{path}: sealing failed (an edgectl bug)")


def sealed(writer):
    """A write_atomic writer that seals what `writer` wrote."""

    def write(f) -> None:
        writer(f)
        f.flush()
        seal(f.name)

    return write


def _kind(path: str) -> str:
    """What a file without a digest is: "no-program", "foreign" (no edgectl_meta) or "unsealed"."""
    constant_bytes, program_end = ptefile.constant_bytes, ptefile.program_end

    with open(path, "rb") as f:
        head = f.read(12)
    if head[4:8] != b"ET12":
        return "no-program"
    program_end(Path(path))  # a header that cannot be read: raises, the file is damaged
    try:
        raw = constant_bytes(Path(path), "edgectl_meta")
    except EdgectlError as e:
        if "no constant method" in str(e):
            return "foreign"
        raise
    # every meta before sealing started with edgectl_version; a sealed one whose digest's
    # prefix was damaged starts with something else (or is no JSON at all)
    try:
        first = next(iter(json.loads(raw)), None)
    except (ValueError, TypeError):
        first = None
    if first != "edgectl_version":
        raise EdgectlError(f"{path}: damaged: its metadata cannot be read", hint=PTE_HINT)
    return "unsealed"


def check_pte(path: str | Path, *, stamps: bool = True) -> str:
    """Check a `.pte` against its own digest. Returns "ok", or for a file without one
    "unsealed" (an older edgectl's), "foreign" (not edgectl's) or "no-program"; raises a
    one-line EdgectlError for a damaged or truncated file."""
    p = os.path.abspath(path)
    key = _stat_key(_stat(p, path))
    if _known(p, "pte", key, stamps):
        return "ok"
    started = time.time_ns()
    off = _digest_offset(p)
    if off is None:
        return _kind(p)
    with open(p, "rb") as f:
        f.seek(off)
        stored = f.read(64).decode("ascii", errors="replace")
    if stored == PLACEHOLDER:
        raise EdgectlError(f"{path}: damaged: its checksum was never written (an interrupted export?)", hint=PTE_HINT)
    if sha256_file(p, skip=off) != stored:
        raise EdgectlError(f"{path}: {_damage(p, key[0])}", hint=PTE_HINT)
    _verified(p, "pte", key, started)
    return "ok"


def _damage(path: str, size: int) -> str:
    """What is wrong with a file whose digest does not match: truncated, if its header says so."""
    program_end = ptefile.program_end

    try:
        end = program_end(Path(path))
    except EdgectlError:
        return "damaged: its program header cannot be read"
    if size < end:
        return f"truncated: {size} bytes, its header needs {end}"
    return "damaged: its bytes do not match its checksum"


def require_pte(path: str | Path) -> None:
    """Before ExecuTorch opens a `.pte`: refuse a damaged one, warn once about one without a
    checksum, refuse one that is not edgectl's (as runtime._load_pte did after loading)."""
    kind = check_pte(path)
    if kind == "no-program":
        raise EdgectlError(f"{path}: not a loadable ExecuTorch program (no ExecuTorch header)")
    if kind == "foreign":
        raise EdgectlError(f"{path}: not an edgectl .pte (no edgectl_meta)", hint="export it with `edgectl export`")
    if kind == "unsealed" and str(path) not in _warned:
        _warned.add(str(path))
        print(f"edgectl: warning: {path}: no checksum (exported before edgectl sealed its files), so damage "
              "cannot be detected; re-export it to get one", file=sys.stderr)


def intact(path: str | Path) -> bool:
    """A sealed file whose checksum holds (a cache entry worth reusing)."""
    try:
        return check_pte(path) == "ok"
    except (EdgectlError, OSError):
        return False
