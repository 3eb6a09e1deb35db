"""`edgectl verify PATH`: check a `.pte` or a shard set for damage, one row per file.

Every file is hashed again (no stamps are trusted; verified files get fresh ones), with the
same checks `run` and `bench` make before loading (edgectl/formats/integrity.py): a shard set's
manifest.json (readable, well formed), each file it names against its size and sha256,
the tokenizer, and the model fields the runtime sizes tensors from against each program's
own record; a `.pte` against the checksum sealed in it, and, when the manifest.json beside
it names it, against the manifest too. Imports neither torch nor the runtime.
"""

from __future__ import annotations

from pathlib import Path

from edgectl.formats import integrity
from edgectl.util.errors import EdgectlError
from edgectl.formats.manifest import MANIFEST, Manifest

NO_CHECKSUM = "no checksum (exported before edgectl sealed its files); re-export it to get one"


def _row(path, problem: str | None = None) -> dict:
    return {"path": str(path), "ok": problem is None, "problem": problem}


def _problem(path, e: EdgectlError) -> str:
    """The message without the leading path it names (the row names it)."""
    msg, prefix = str(e), f"{path}: "
    return msg[len(prefix):] if msg.startswith(prefix) else msg


def verify(path: str | Path) -> list[dict]:
    """Rows {"path", "ok", "problem"}: one per file checked."""
    path = Path(path)
    if path.is_dir():
        return _shard_set(path)
    if not path.exists():
        return [_row(path, "missing")]
    return _pte(path)


def _pte(path: Path) -> list[dict]:
    try:
        kind = integrity.check_pte(path, stamps=False)
    except EdgectlError as e:
        return [_row(path, _problem(path, e))]
    named = _named_by_manifest(path)
    if named is not None:
        return named
    return [_row(path, {"ok": None, "unsealed": NO_CHECKSUM, "foreign": "not an edgectl .pte: no checksum to check",
                        "no-program": "not an ExecuTorch program"}[kind])]


def _named_by_manifest(path: Path) -> list[dict] | None:
    """The manifest beside a file that names it: checked against it too (a sealed shard file
    swapped for another sealed one passes its own check, not the manifest's)."""
    if not (path.parent / MANIFEST).is_file():
        return None
    try:
        m = Manifest.load(path.parent)
    except EdgectlError:
        return None
    for s in m.shards:
        for v in s.variants.values():
            if v.file == path.name and not (s.kind == "embed" and "table" in v.extra):
                try:
                    integrity.check_file(path, v.sha256, v.bytes, named_by=str(path.parent / MANIFEST), stamps=False)
                except EdgectlError as e:
                    return [_row(path, _problem(path, e))]
                return [_row(path)]
    return None


def _shard_set(d: Path) -> list[dict]:
    mpath = d / MANIFEST
    if not mpath.exists():
        return [_row(d, "a directory without manifest.json (not a shard set)")]
    try:
        m = Manifest.load(d)
    except EdgectlError as e:
        return [_row(mpath, _problem(mpath, e))]
    rows, facts_problem = [], None
    files = {}
    for s in m.shards:
        for v in s.variants.values():
            if v.file and not (s.kind == "embed" and "table" in v.extra):
                files.setdefault(v.file, v)
    for name, v in files.items():
        f = d / name
        try:
            integrity.check_file(f, v.sha256, v.bytes, named_by=str(mpath), stamps=False)
        except EdgectlError as e:
            rows.append(_row(f, _problem(f, e)))
            continue
        rows.append(_row(f))
        if facts_problem is None:
            try:
                integrity.ensure(f)  # registered by Manifest.load: compares the model fields once
            except EdgectlError as e:
                facts_problem = _problem(mpath, e)
    rows.append(_tokenizer(d, m))
    return [_row(mpath, facts_problem), *rows]


def _tokenizer(d: Path, m: Manifest) -> dict:
    from edgectl.runtime.tokenizer import Tokenizer

    f = d / m.tokenizer
    try:
        if m.tokenizer_sha256:
            integrity.check_file(f, m.tokenizer_sha256, named_by=str(d / MANIFEST), stamps=False)
        mm = m.model
        Tokenizer(m.tokenizer_text(d), m.tokenizer_config, mm.get("bos_token_id"), tuple(mm.get("eos_token_ids") or ()),
                  str(f))
    except EdgectlError as e:
        return _row(f, _problem(f, e))
    return _row(f)
