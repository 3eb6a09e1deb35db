"""Shard stage: cut a model into programs that load, evict and swap independently.

    shard_model(ckpt, out_dir, ShardSettings(...)) -> ShardResult

Shards: "embed", the decoder layers (`layers_per_shard` per shard), and "head" (final
norm + output). Every shard is exported once per precision (shard_build.py); a tied
embedding/output matrix is stored once per precision, in the head's file, and the embed
variant names it (`extra["table"]`). The KV cache stays outside every program.

Build: variants are exported by a spawn pool of `jobs` workers (one thread each, the
checkpoint loaded once per worker) into a content-addressed cache
($EDGECTL_CACHE/shards/<key>.pte, key = source hash, shard, precision, group size,
max_seq_len, backend, edgectl version and a fingerprint of the code that builds them),
so a re-run with the same inputs exports nothing. The set is assembled in a temporary
directory beside `out_dir` (files hard-linked from the cache), measured (load cost in a
fresh process, importance on the calibration text, a sample of the importance figures
re-measured through the exported programs), and renamed to `out_dir` only when complete.
Ctrl-C or an error removes the temporary directory.

MODEL may be an `edgectl quantize` output: its shards are exported from the stored codes
as they are, at one precision named after the stored scheme (shard_build.stored_precision,
e.g. "8da4w"), which is then the set's only one. A precision above it (fp32 from an 8da4w
checkpoint) cannot be had from quantized weights, and a lower or different one would be
re-quantized from already-quantized weights: both are refused before any work (shard the
original model for a set of several precisions). The manifest's `source` records the
quantize directory, its content hash and its quantization record.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from edgectl.util.version import __version__

from edgectl.formats import integrity
from edgectl.util.errors import EdgectlError, UsageError
from edgectl.formats.manifest import MANIFEST, Manifest, Shard, Variant
from edgectl.shard.shard_figures import _importance, _measure_load

Step = Callable[[str], None]
Built = Callable[[str, str, str], None]  # (shard, precision, "cached" | "exported")
Counter_ = Callable[[str, int, int], None]  # (what, done, total)

CODE_FILES = ("model.py", "model_args.py", "shard/shard_build.py", "quant/quantize.py", "quant/scheme.py", "quant/weights.py",
              "quant/quant_checkpoint.py", "quant/quant_modules.py", "lower/export.py", "lower/stock.py", "lower/edge_passes.py")


@dataclass(frozen=True)
class ShardSettings:
    precisions: tuple[str, ...] | None = None  # highest first; None: the checkpoint's own (fp32, or as quantized)
    group_size: int = 32
    layers_per_shard: int = 1
    calibration: Path | None = None
    calibration_tokens: int = 2048
    backend: str = "xnnpack"
    max_seq_len: int | None = None
    jobs: int = 2
    verify: int = 3  # importance figures re-measured through the .pte files
    window: int = 512  # calibration window (tokens), capped by max_seq_len
    chunk: int = 64  # most tokens per program call (activation memory is planned for it)


@dataclass
class ShardResult:
    path: str
    shards: int
    variants: int
    exported: int
    cached: int
    bytes: int
    seconds: float
    cpu_seconds: float  # this process and its (joined) workers and measuring subprocess
    manifest: Manifest = field(repr=False, default=None)

    def to_dict(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k != "manifest"}


def parse_precisions(text: str) -> tuple[str, ...]:
    from edgectl.quant.quantize import LINEAR_SCHEMES

    ps = tuple(p.strip() for p in text.split(",") if p.strip())
    if not ps:
        raise UsageError("--precisions is empty", hint=f"e.g. {','.join(LINEAR_SCHEMES[:3])}")
    for p in ps:
        if p not in LINEAR_SCHEMES:
            raise UsageError(f"unknown precision {p!r}", hint=f"choose from: {', '.join(LINEAR_SCHEMES)}")
    if len(set(ps)) != len(ps):
        raise UsageError(f"--precisions {text}: a precision is listed twice")
    return ps


_RANK = {"fp32": 0, "int8": 1, "8da4w": 2, "4w": 2}  # bits kept, most first (8da4w and 4w: both 4-bit)


def precisions_for(ckpt, settings: ShardSettings) -> ShardSettings:
    """`settings` with the precisions (and group size) the shard set of `ckpt` will have.

    An unquantized checkpoint takes any precisions (default fp32). A quantized one offers
    only its stored precision (the default): one above it is refused since quantized
    weights cannot give back the originals, and one below it (or another 4-bit scheme)
    since it would quantize already-quantized weights."""
    import dataclasses

    from edgectl.shard.shard_build import TOP, stored_precision

    rec = ckpt.quantization
    base = stored_precision(rec)
    if rec is None:
        return settings if settings.precisions else dataclasses.replace(settings, precisions=(TOP,))
    sch = rec["scheme"]
    what = f"{ckpt.source} is quantized ({sch['linear']}, embedding {sch.get('embedding')})"
    hint = f"its one precision is {base}: omit --precisions, or shard the original model for others"
    for p in settings.precisions or ():
        if p == base:
            continue
        if p == TOP or _RANK.get(p, 0) < _RANK.get(sch["linear"], 0):
            raise UsageError(f"{what}: it cannot give back {p} weights", hint=hint)
        raise UsageError(f"{what}: {p} would quantize its already-quantized weights again", hint=hint)
    return dataclasses.replace(settings, precisions=(base,), group_size=sch.get("group_size", settings.group_size))


def plan(n_layers: int, per_shard: int) -> list[tuple[str, str, list[int]]]:
    """[(name, kind, layers)] in forward order."""
    if per_shard < 1:
        raise UsageError("--layers-per-shard must be at least 1")
    out = [("embed", "embed", [])]
    for a in range(0, n_layers, per_shard):
        ls = list(range(a, min(a + per_shard, n_layers)))
        out.append((f"layers.{ls[0]}" if len(ls) == 1 else f"layers.{ls[0]}-{ls[-1]}", "layers", ls))
    out.append(("head", "head", []))
    return out


def _code_fingerprint() -> str:
    h = hashlib.sha256()
    here = Path(__file__).resolve().parents[1]  # edgectl/
    for name in CODE_FILES:
        h.update((here / name).read_bytes())
    from importlib.metadata import version

    for pkg in ("torch", "executorch", "torchao"):
        h.update(version(pkg).encode())
    return h.hexdigest()


def _shard_cache() -> Path:
    from edgectl.checkpoint.checkpoint import cache_dir

    return cache_dir() / "shards"


def check_output(out_dir: Path) -> None:
    if out_dir.exists():
        if not out_dir.is_dir():
            raise EdgectlError(f"{out_dir}: exists and is not a directory", hint="choose another -o")
        if any(out_dir.iterdir()) and not (out_dir / MANIFEST).exists():
            raise EdgectlError(f"{out_dir}: exists and is not a shard set", hint="choose another -o or remove it")


def _link(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copyfile(src, dst)


def shard_model(ckpt, out_dir: Path, settings: ShardSettings, step: Step | None = None,
                built: Built | None = None, count: Counter_ | None = None) -> ShardResult:
    """Build the shard set of `ckpt` at `out_dir` (complete or absent)."""
    from edgectl.lower.export import partitioners
    from edgectl.shard.shard_build import stored_precision, stored_record

    t0, c0 = time.perf_counter(), _cpu()
    step = step or (lambda s: None)
    out_dir = Path(out_dir)
    s = precisions_for(ckpt, settings)
    args = ckpt.args
    base = stored_precision(ckpt.quantization)
    if any(p != "fp32" for p in s.precisions) and s.backend != "xnnpack":
        raise UsageError(f"quantized precisions need --backend xnnpack, not {s.backend}")
    from edgectl.backends.registry import NAMES, SHARDABLE

    if s.backend in NAMES and s.backend not in SHARDABLE:
        raise UsageError(f"{s.backend} programs take one token per call; a shard set needs one of: {', '.join(SHARDABLE)}")
    max_seq_len = s.max_seq_len or min(args.max_position_embeddings, 2048)
    if max_seq_len < 2:
        raise UsageError("--max-seq-len must be at least 2")
    check_output(out_dir)
    if s.chunk < 2:
        raise UsageError("--chunk must be at least 2")
    chunk = min(s.chunk, max_seq_len)
    if len(s.precisions) > 1 and s.calibration is None:
        raise UsageError("measuring importance needs --calibration FILE (a plain text file)")
    windows, tok = None, None
    if s.calibration is not None:
        from edgectl.shard.importance import calibration_windows
        from edgectl.runtime.tokenizer import Tokenizer

        if not Path(s.calibration).is_file():
            raise EdgectlError(f"{s.calibration}: no such file")
        tok = Tokenizer(ckpt.tokenizer_json, ckpt.tokenizer_config, args.bos_token_id, tuple(args.eos_token_ids))
        text = Path(s.calibration).read_text(encoding="utf-8", errors="replace")
        windows = calibration_windows(tok, text, s.calibration_tokens, min(s.window, max_seq_len))
    shards = plan(args.n_layers, s.layers_per_shard)
    partitioners(s.backend)  # unknown backend: fail before any work (imports executorch)
    source_hash = ckpt.content_hash()
    from edgectl.shard.shard_build import shares_table

    shared = shares_table(args, s.backend)

    # 1. build (or find) every variant
    step("exporting shards")
    fingerprint = _code_fingerprint()
    cache = _shard_cache()
    cache.mkdir(parents=True, exist_ok=True)
    meta_head = {"edgectl_version": __version__, "source": {"model": ckpt.source, "sha256": source_hash},
                 "model": args.to_dict(), "max_seq_len": max_seq_len, "max_tokens_per_call": chunk, "backend": s.backend}
    tasks, keys = [], {}
    for name, kind, layers in shards:
        if kind == "embed" and shared:
            continue
        for p in s.precisions:
            key = hashlib.sha256(json.dumps([source_hash, name, layers, p, s.group_size, max_seq_len, chunk, s.backend,
                                             __version__, fingerprint]).encode()).hexdigest()[:32]
            keys[name, p] = key
            out = cache / f"{key}.pte"
            # a damaged cache file (its own checksum, integrity.py) is built again, not linked in
            if out.exists() and out.with_suffix(".json").exists() and integrity.intact(out):
                if built:
                    built(name, p, "cached")
                continue
            tasks.append({"key": key, "name": name, "kind": kind, "layers": layers, "precision": p,
                          "group_size": s.group_size, "backend": s.backend, "out": str(out), "meta": meta_head,
                          "chunk": chunk, "base": base,
                          "base_record": stored_record(ckpt.quantization, kind, layers, shared)
                          if ckpt.quantization is not None and p == base else None})
    _build(ckpt.source, max_seq_len, tasks, s.jobs, built)

    # 2. assemble in a temporary directory, measure, rename
    tmp = out_dir.with_name(f".{out_dir.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir(parents=True)
        step("assembling")
        manifest = _assemble(tmp, ckpt, shards, keys, s, max_seq_len, source_hash, shared, cache)
        manifest.max_tokens_per_call = chunk
        step("measuring load cost (fresh process)")
        _measure_load(tmp, manifest)
        if windows:
            _importance(ckpt, tmp, manifest, s, windows, step, count)
        manifest.save(tmp)
        _replace_dir(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    n_var = sum(len(sh.variants) for sh in manifest.shards)
    total = sum(f.stat().st_size for f in out_dir.iterdir())
    return ShardResult(str(out_dir), len(manifest.shards), n_var, len(tasks), len(keys) - len(tasks), total,
                       time.perf_counter() - t0, _cpu() - c0, manifest)


def _cpu() -> float:
    """CPU seconds of this process and of its waited-for children."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


def _build(model_arg: str, max_seq_len: int, tasks: list[dict], jobs: int, built: Built | None) -> float:
    """Export `tasks` in a spawn pool; returns the workers' CPU seconds (as reported)."""
    if not tasks:
        return 0.0
    import multiprocessing as mp
    from concurrent.futures import FIRST_EXCEPTION, ProcessPoolExecutor, wait

    from edgectl.shard.shard_build import worker_init, worker_task

    # biggest first keeps both workers busy to the end (the head holds the vocab matrix)
    tasks = sorted(tasks, key=lambda t: t["kind"] != "head")
    jobs = max(1, min(jobs, len(tasks)))
    by_key = {t["key"]: t for t in tasks}
    ex = ProcessPoolExecutor(jobs, mp_context=mp.get_context("spawn"), initializer=worker_init,
                             initargs=(model_arg, max_seq_len, 1))
    cpu = 0.0
    try:
        futs = {ex.submit(worker_task, t) for t in tasks}
        while futs:
            done, futs = wait(futs, return_when=FIRST_EXCEPTION)
            for f in done:
                r = f.result()  # re-raises a worker's exception
                cpu += r["cpu_seconds"]
                t = by_key[r["key"]]
                if built:
                    built(t["name"], t["precision"], "exported")
    except BaseException:
        ex.shutdown(wait=False, cancel_futures=True)
        for p in list((getattr(ex, "_processes", None) or {}).values()):
            p.terminate()
        raise
    ex.shutdown()
    return cpu


def _assemble(tmp: Path, ckpt, shards, keys, s: ShardSettings, max_seq_len: int, source_hash: str,
              shared: bool, cache: Path) -> Manifest:
    from edgectl.shard.shard_build import file_sha256

    (tmp / "tokenizer.json").write_text(ckpt.tokenizer_json)
    out = []
    head_files = {}
    for name, kind, layers in shards:
        variants = {}
        if kind == "embed" and shared:
            out.append(Shard(name, kind, layers, variants))  # filled once the head is placed
            continue
        for p in s.precisions:
            src = cache / f"{keys[name, p]}.pte"
            side = json.loads(src.with_suffix(".json").read_text())
            fname = f"{name}.{p}.pte"
            _link(src, tmp / fname)
            extra = {"quantization": side["record"] or None, "ops": side["ops"]}
            variants[p] = Variant(p, fname, src.stat().st_size, file_sha256(tmp / fname), 0, 0.0, None, extra)
            if kind == "head":
                head_files[p] = (fname, side["table"], variants[p].sha256)
        out.append(Shard(name, kind, layers, variants))
    if shared:
        emb = out[0].variants
        for p in s.precisions:
            fname, table, sha = head_files[p]
            nbytes = _table_bytes(table)
            emb[p] = Variant(p, fname, nbytes, sha, 0, 0.0, None,
                             {"table": {"file": fname, **table},
                              "note": "no program: rows are gathered from the head's matrix in `file`"})
    tc = ckpt.tokenizer_config
    keep = ("bos_token", "eos_token", "add_bos_token", "chat_template")
    source = {"model": ckpt.source, "sha256": source_hash, "kind": ckpt.kind}
    if ckpt.quantization is not None:  # an `edgectl quantize` output: its record, as stored
        source["quantization"] = ckpt.quantization
    return Manifest(
        edgectl_version=__version__,
        source=source,
        model=ckpt.args.to_dict(),
        max_seq_len=max_seq_len,
        backend=s.backend,
        precisions=list(s.precisions),
        tokenizer="tokenizer.json",
        tokenizer_config={k: tc[k] for k in keep if k in tc},
        tokenizer_sha256=file_sha256(tmp / "tokenizer.json"),
        shards=out,
        calibration={"group_size": s.group_size},
    )


def _table_bytes(table: dict) -> int:
    import torch

    n_all = 0
    for t in table.get("tensors", [table]):
        n = torch.empty(0, dtype=getattr(torch, t["dtype"])).element_size()
        for d in t["shape"]:
            n *= d
        n_all += n
    return n_all


def remeasure(directory: Path) -> Manifest:
    """Measure an existing shard set's per-variant costs again on this machine (load time,
    resident bytes, planned memory, decode-step time: what the planner plans with) and
    rewrite its manifest.json atomically; importance figures are kept."""
    directory = Path(directory)
    manifest = Manifest.load(directory)
    for v in {v.file: v for s in manifest.shards for v in s.variants.values() if v.file}.values():
        integrity.ensure(directory / v.file)  # the measuring process would load a damaged file
    _measure_load(directory, manifest)
    tmp = directory / f".manifest.json.tmp-{os.getpid()}"
    try:
        manifest.save_as(tmp)
        os.replace(tmp, directory / "manifest.json")
    finally:
        tmp.unlink(missing_ok=True)
    return manifest


def _replace_dir(tmp: Path, out_dir: Path) -> None:
    from edgectl.util.files import replace_dir

    replace_dir(tmp, out_dir)
