"""The programs of a shard set, and the export of one shard at one precision.

Shard modules (interfaces in manifest.py):
- `LayersProgram`: forward(h[1,T,dim], pos[T], k_0, v_0, ...) -> h, the Blocks it holds
  and a `Rope` (its tables); each Block writes its T new entries into its caches in place.
- `HeadProgram`: forward(h[1,T,dim], idx[N]) -> logits[1,N,vocab].
- `EmbedProgram`: forward(tokens[1,T]) -> h[1,T,dim], only when the embedding matrix is
  not shared with the head (untied model, or a backend that does not keep the head's
  weight where the runtime can map it).

A precision is a `scheme.QuantScheme` applied by `weights.quantize_module` to the
shard's own module: layers take the scheme's linear treatment; the head's matrix (tied or
not) takes the embedding treatment that matches it (int8 rows for int8, int4 groups for
the 4-bit schemes), so a tied matrix is stored once per precision, in the head's file.

The *base* precision is the loaded checkpoint's own: "fp32" for an unquantized model, or
the `stored_precision` of an `edgectl quantize` output (e.g. "8da4w"), which is rebuilt
from its stored codes (`quant_checkpoint.load_quantized_model`) and exported as it is: a shard at
its base precision is never quantized again, and its record is the checkpoint's record
for that shard's weights (`stored_record`).

`build_variant` runs in a worker process (see shard.py): it owns one fp32 model per
process and exports shard variants from it one at a time.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import time
from pathlib import Path

import torch
from torch import nn

from edgectl.formats import integrity
from edgectl.util.errors import EdgectlError
from edgectl.quant.scheme import scheme_for

TOP = "fp32"


class LayersProgram(nn.Module):
    """forward(h [1,T,dim], pos [T], k_0, v_0, ...) -> h. Each cache is the runtime's own
    [1, S, KV, D] buffer, written in place (model.Block's attention); positions >= pos[0] + T
    are never read. A sliding layer's (Gemma 3, Phi-3) is a ring of C slots instead
    (model_args.ring_len, a fixed size), read whole under a mask of its window. The
    exported program keeps no copy of a cache: export.lower drops the
    copy-back outputs torch.export adds for mutated inputs, and inputs are not memory
    planned, so the kernels write the caller's memory."""

    def __init__(self, rope: nn.Module, blocks: list[nn.Module]):
        super().__init__()
        from edgectl.backends.custom_ops import load_custom_ops

        load_custom_ops()
        self.rope = rope
        self.blocks = nn.ModuleList(blocks)

    def forward(self, h, pos, *caches):
        T, start = h.shape[1], pos[0].item()
        torch._check(start >= 0)
        whole = [i for i, b in enumerate(self.blocks) if b.self_attn.window is None]
        if whole:  # a global layer's cache: S positions (a sliding layer's ring bounds none)
            torch._check(start + T <= caches[2 * whole[0]].shape[1])
        ropes = self.rope(pos)
        for i, block in enumerate(self.blocks):
            h = block(h, *ropes[block.rope_kind], caches[2 * i], caches[2 * i + 1], start)
        return h


class HeadProgram(nn.Module):
    def __init__(self, head: nn.Module):
        super().__init__()
        self.head = head

    def forward(self, h, idx):
        return self.head(h, idx)


class EmbedProgram(nn.Module):
    def __init__(self, embed: nn.Module):
        super().__init__()
        self.embed = embed

    def forward(self, tokens):
        return self.embed(tokens)


def stored_precision(record: dict | None) -> str:
    """The precision label of a checkpoint: "fp32" for an unquantized one, else the linear
    scheme an `edgectl quantize` output stores ("int8", "8da4w", "4w"), or "fp32-emb<e>"
    when only its embedding is quantized."""
    if record is None:
        return TOP
    from edgectl.quant.scheme import FORMAT, QUANT_FILE

    scheme = record.get("scheme") or {}
    if record.get("format") != FORMAT or "linear" not in scheme:
        raise EdgectlError(f"{QUANT_FILE} has format {record.get('format')!r}, expected {FORMAT!r}",
                           hint="re-run `edgectl quantize` with this edgectl version")
    if scheme["linear"] == TOP:
        return f"{TOP}-emb{scheme.get('embedding', 'none')}"
    return scheme["linear"]


def stored_record(record: dict, kind: str, layers: list[int], tied: bool) -> dict:
    """The part of a quantized checkpoint's record that one shard holds (names as in the
    checkpoint): its layers' linears, or the head (with the tied embedding it stores)."""
    from edgectl.quant.scheme import RUNS_AS

    if kind == "layers":
        prefixes = tuple(f"layers.{i}." for i in layers)
    elif kind == "head":
        prefixes = ("head.", "embed.") if tied else ("head.",)
    else:
        prefixes = ("embed.",)
    weights = {k: w for k, w in record["weights"].items() if k.startswith(prefixes)}
    return {"format": record["format"], "scheme": record["scheme"], "weights": weights,
            "runs_as": {f: RUNS_AS[f] for f in sorted({w["form"] for w in weights.values()}) if f in RUNS_AS},
            "stored": True}


def shares_table(args, backend: str) -> bool:
    """Whether the embed shard reads the head's matrix instead of holding its own."""
    return bool(args.tie_embeddings) and backend == "xnnpack"


# ---------------------------------------------------------------------------------------
# Shard modules at a precision (used by the exporter and by the eager importance path)


def _quantize_to(precision: str, base: str) -> bool:
    """Whether `precision` means quantizing a model whose own precision is `base`."""
    if precision == base:
        return False
    if base != TOP:  # shard.py refuses this before any work; a guard for other callers
        raise EdgectlError(f"cannot re-quantize a {base} checkpoint to {precision}",
                           hint="shard the original model")
    return True


def layers_module(model, layers: list[int], precision: str, group_size: int,
                  base: str = TOP, fuse: bool = False) -> tuple[nn.Module, dict]:
    """A LayersProgram over `model`'s blocks at `precision` (`model` itself is at `base`:
    the blocks are shared at that one, quantized copies at a lower one). `fuse`: for
    export, q/k/v and gate/up become one linear each (quant_modules.fuse_projections), in copies."""
    import copy

    from edgectl.model import Rope
    from edgectl.quant.quant_modules import fuse_projections
    from edgectl.quant.weights import quantize_module

    requant = _quantize_to(precision, base)
    blocks = [copy.deepcopy(model.layers[i]) if requant or fuse else model.layers[i] for i in layers]
    prog = LayersProgram(Rope(model.args, model.max_seq_len), blocks).eval()
    record = quantize_module(prog, scheme_for(precision, group_size)) if requant else {}
    if fuse:
        fuse_projections(prog)
    return prog, record


def embed_head_module(model, precision: str, group_size: int, base: str = TOP):
    """(tiny Transformer with no layers holding copies of `model`'s embedding and head,
    quantized to `precision` unless that is `model`'s own `base`, record). Going through a
    Transformer lets quantize_module treat a tied matrix as one (quantized once, the head
    holding the embedding's codes)."""
    import copy

    from edgectl.model import Transformer
    from edgectl.quant.weights import quantize_module

    requant = _quantize_to(precision, base)
    args = dataclasses.replace(model.args, n_layers=0)
    with torch.device("meta"):
        tiny = Transformer(args, model.max_seq_len)
    tiny.embed = copy.deepcopy(model.embed)
    tiny.head = copy.deepcopy(model.head)
    # a tied fp32 matrix is one Parameter again; a quantized checkpoint's tied matrix is
    # an embedding and a head built from the same stored codes (nothing to tie)
    if args.tie_embeddings and isinstance(getattr(tiny.embed, "embed_tokens", None), nn.Embedding):
        tiny.head.lm_head.weight = tiny.embed.embed_tokens.weight
    tiny.rope.reset_buffers()
    record = quantize_module(tiny, scheme_for(precision, group_size)) if requant else {}
    return tiny.eval(), record


# ---------------------------------------------------------------------------------------
# Export of one variant


def layer_example(args, max_seq_len: int, layers: list[int], chunk: int):
    """Example inputs and dynamic shapes of a LayersProgram of `layers`: T tokens (at most
    `chunk`), a global layer's caches of S positions (at most max_seq_len: a run may plan a
    shorter context), a sliding layer's a ring of a fixed C slots (model_args.ring_len)."""
    from torch.export import Dim

    from edgectl.model_args import ring_len

    S = min(6, max_seq_len)  # an example size no other dim has, or torch.export merges the dims
    C = ring_len(args, max_seq_len, chunk)
    shapes = [(C if args.sliding(i) and C is not None else S, args.n_kv_heads, args.head_dim) for i in layers]
    caches = [torch.zeros(1, *shape) for shape in shapes for _ in "kv"]
    T, Sd = Dim("T", min=1, max=chunk), Dim("S", min=1, max=max_seq_len)
    t = min(4, S)
    example = (torch.zeros(1, t, args.dim), torch.arange(t), *caches)
    dims = [None if args.sliding(i) and C is not None else {1: Sd} for i in layers for _ in "kv"]
    return example, ({1: T}, {0: T}, tuple(dims))  # *caches is one argument to export


def _head_example(args, chunk: int):
    from torch.export import Dim

    T, N = Dim("T", min=1, max=chunk), Dim("N", min=1, max=chunk)
    return (torch.zeros(1, 4, args.dim), torch.arange(2, 4)), ({1: T}, {0: N})


def _embed_example(chunk: int):
    from torch.export import Dim

    T = Dim("T", min=1, max=chunk)
    return (torch.zeros(1, 4, dtype=torch.long),), ({1: T},)


def table_spec(tiny, precision: str) -> dict | None:
    """Where the runtime finds the embedding matrix in the head's file at `precision`:
    fp32: {"key", "shape", "dtype"} of the head weight; quantized: {"tensors": [codes,
    scales], "bits", "group_size"} (XNNPACK's own blobs of the head)."""
    from edgectl.lower.export import tied_table_key
    from edgectl.quant.quantize import shared_embedding

    if precision == TOP or not hasattr(tiny.embed, "codes"):
        return tied_table_key(tiny)
    _, spec = shared_embedding(tiny)
    return {**spec, "bits": tiny.embed.bits, "group_size": tiny.embed.group_size, "dim": tiny.embed.dim}


def check_table(path: Path, spec: dict) -> None:
    from edgectl.lower.export import check_tied_table
    from edgectl.quant.quantize import check_shared_embedding

    if "tensors" in spec:
        check_shared_embedding(path, spec)
    else:
        check_tied_table(path, spec)


def program_for(model, kind: str, layers: list[int], precision: str, group_size: int, backend: str, chunk: int,
                base: str = TOP):
    """(module, example args, dynamic shapes, record, table spec or None) of one shard of
    `model` (whose own precision is `base`) at `precision`. `chunk` is the
    most tokens one call takes: ExecuTorch plans activation memory for the largest shape,
    and each shard program has its own arena (a 2048-token call would plan ~600 MB of
    attention scores per SmolLM2 layer), so prefill goes in chunks."""
    args, S = model.args, model.max_seq_len
    if kind == "layers":
        mod, rec = layers_module(model, layers, precision, group_size, base, fuse=True)
        ex, ds = layer_example(args, S, layers, chunk)
        return mod, ex, ds, rec, None
    tiny, rec = embed_head_module(model, precision, group_size, base)
    if kind == "head":
        ex, ds = _head_example(args, chunk)
        spec = table_spec(tiny, precision) if shares_table(args, backend) else None
        return HeadProgram(tiny.head).eval(), ex, ds, rec, spec
    ex, ds = _embed_example(chunk)
    return EmbedProgram(tiny.embed).eval(), ex, ds, rec, None


def shard_meta(manifest_head: dict, name: str, kind: str, layers: list[int], precision: str, record: dict) -> dict:
    return {**manifest_head, "format": "edgectl-shard/1", "shard": name, "kind": kind, "layers": layers,
            "precision": precision, "quantization": record or None}


def export_variant(model, name: str, kind: str, layers: list[int], precision: str, group_size: int,
                   backend: str, out: Path, meta_head: dict, chunk: int, base: str = TOP,
                   base_record: dict | None = None) -> dict:
    """Export one shard at one precision to `out` (atomically). `base_record` is the record
    of a shard at `base` (a quantized checkpoint's, see stored_record). Returns
    {"seconds", "cpu_seconds", "ops", "table" (spec or None), "record"}."""
    from edgectl.lower.export import bytes_tensor, lower
    from edgectl.util.files import write_atomic

    t0, c0 = time.perf_counter(), time.process_time()
    mod, example, dynamic, record, spec = program_for(model, kind, layers, precision, group_size, backend, chunk, base)
    if precision == base and base_record:
        record = base_record
    meta = shard_meta(meta_head, name, kind, layers, precision, record)
    meta = {integrity.FIELD: integrity.PLACEHOLDER, **meta}  # the file's own sha256 (edgectl/formats/integrity.py)
    prog, ops = lower(mod, example, dynamic, backend, {"edgectl_meta": bytes_tensor(json.dumps(meta).encode())})

    def write(f):
        prog.write_to_file(f)
        f.flush()
        if spec is not None:
            check_table(Path(f.name), spec)
        integrity.seal(f.name)

    write_atomic(out, write)
    return {"seconds": time.perf_counter() - t0, "cpu_seconds": time.process_time() - c0, "ops": ops,
            "table": spec, "record": record}


# ---------------------------------------------------------------------------------------
# Worker process


_WORKER: dict = {}


def worker_init(model_arg: str, max_seq_len: int, threads: int) -> None:
    """Process-pool initializer: load the checkpoint once per worker."""
    import logging
    import signal
    import warnings

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent handles Ctrl-C and cleans up
    torch.set_num_threads(threads)
    for noisy in ("torchao", "torch.utils._pytree", "torch._export", "executorch"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")
    _WORKER["model_arg"] = (model_arg, max_seq_len)


def _worker_model():
    if "model" not in _WORKER:
        from edgectl.checkpoint.checkpoint import resolve

        model_arg, max_seq_len = _WORKER["model_arg"]
        _WORKER["model"] = load_base(resolve(model_arg), max_seq_len)
    return _WORKER["model"]


def load_base(ckpt, max_seq_len: int):
    """The model at its own precision (stored_precision): fp32, or a quantized checkpoint
    rebuilt from its stored codes."""
    if ckpt.quantization is not None:
        from edgectl.quant.quant_checkpoint import load_quantized_model

        stored_precision(ckpt.quantization)  # an unknown record format: one line, before loading
        return load_quantized_model(ckpt, max_seq_len)[0]
    from edgectl.checkpoint.checkpoint import load_model

    return load_model(ckpt, max_seq_len)


def worker_task(task: dict) -> dict:
    """Build one variant into task["out"] (a cache path). Runs in a worker."""
    out = Path(task["out"])
    res = export_variant(_worker_model(), task["name"], task["kind"], task["layers"], task["precision"],
                         task["group_size"], task["backend"], out, task["meta"], task["chunk"],
                         task.get("base", TOP), task.get("base_record"))
    # the table spec travels with the cached file, so a cache hit needs no export
    side = out.with_suffix(".json")
    tmp = side.with_name(f".{side.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps({"table": res["table"], "record": res["record"], "ops": res["ops"],
                               "seconds": res["seconds"], "cpu_seconds": res["cpu_seconds"]}, default=str))
    os.replace(tmp, side)
    return {"key": task["key"], **{k: res[k] for k in ("seconds", "cpu_seconds")}}


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
