"""Helpers several test modules share: a small shard set built from stories260K the way the manifest describes it
(independent of `edgectl shard`), with eager importance figures."""

from __future__ import annotations

import hashlib
import os
import time
from pathlib import Path


PRECISIONS = {"fp32": None, "int8": ("int8", "int8"), "8da4w": ("8da4w", "int4")}


def _head_program(head):
    import torch

    class HeadProgram(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.head = head

        def forward(self, h, idx):
            return self.head(h, idx)

    return HeadProgram()


def build_shard_set(model_dir: Path, out: Path, max_seq_len: int = 128, precisions=("fp32", "int8"),
                    layers_per_shard: int = 1, eval_tokens: list[int] | None = None,
                    chunk: int | None = None) -> Path:
    """Export per-layer shards of a small model, with measured resident bytes/load ms and
    (when eval_tokens are given) eager importance figures. Returns the directory. `chunk`:
    the programs' most tokens per call (the manifest's max_tokens_per_call; None: any up
    to max_seq_len), which sizes a sliding layer's ring."""
    import copy

    import torch
    from torch.export import Dim

    from edgectl.checkpoint.checkpoint import load_model, resolve
    from edgectl.lower.export import check_tied_table, lower, tied_table_key
    from edgectl.formats.manifest import Importance, Manifest, Shard, Variant
    from edgectl.shard.shard_build import LayersProgram, layer_example
    from edgectl.quant.quantize import shared_embedding
    from edgectl.quant.scheme import QuantScheme
    from edgectl.quant.weights import quantize_module

    ckpt = resolve(str(model_dir))
    args = ckpt.args
    base = load_model(ckpt, max_seq_len).eval()
    out.mkdir(parents=True, exist_ok=True)
    (out / "tokenizer.json").write_text(ckpt.tokenizer_json)
    groups = [list(range(i, min(i + layers_per_shard, args.n_layers))) for i in range(0, args.n_layers, layers_per_shard)]
    models = {}
    for p in precisions:
        m = copy.deepcopy(base)
        if PRECISIONS[p]:
            lin, emb = PRECISIONS[p]
            quantize_module(m, QuantScheme(lin, 32, emb, 32))
        models[p] = m
    shards = {"embed": {}, **{f"layers.{g[0]}" + (f"-{g[-1]}" if len(g) > 1 else ""): {} for g in groups}, "head": {}}
    T, N = Dim("T", min=1, max=max_seq_len), Dim("N", min=1, max=max_seq_len)
    for p, m in models.items():
        for g in groups:
            name = f"layers.{g[0]}" + (f"-{g[-1]}" if len(g) > 1 else "")
            example, dynamic = layer_example(args, max_seq_len, g, chunk or max_seq_len)
            prog, _ = lower(LayersProgram(m.rope, [m.layers[i] for i in g]), example, dynamic, "xnnpack")
            f = f"{name}.{p}.pte"
            (out / f).write_bytes(prog.buffer)
            shards[name][p] = f
        prog, _ = lower(_head_program(m.head), (torch.zeros(1, 4, args.dim), torch.arange(2, 4)), ({1: T}, {0: N}), "xnnpack")
        f = f"head.{p}.pte"
        (out / f).write_bytes(prog.buffer)
        shards["head"][p] = f
        q = shared_embedding(m)
        table = q[1] if q else tied_table_key(m)
        if q:
            table = {**table, "bits": m.embed.bits, "group_size": m.embed.group_size, "dim": m.embed.dim}
        else:
            check_tied_table(out / f, table)
        shards["embed"][p] = {"file": f, **table}

    from edgectl.runtime.methods import _load_runtime

    _load_runtime()
    from edgectl.runtime import _native

    lib = _native.load()

    from edgectl.util.native import malloc_trim

    def rss():
        return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def measure(path, kind, n_layers):
        malloc_trim()
        r0, t0 = rss(), time.perf_counter()
        h = lib.load(str(path))
        load_ms = (time.perf_counter() - t0) * 1e3
        r1 = rss()
        lib.free(h)
        return max(r1 - r0, 0), load_ms

    ppl_ref, ref_logits = None, None
    if eval_tokens:
        ref_logits = _eager_logits(base, eval_tokens)
        ppl_ref = _ppl(ref_logits, eval_tokens)
    manifest_shards = []
    for name, files in shards.items():
        kind = name.split(".")[0]
        variants = {}
        for p, f in files.items():
            if kind == "embed":
                variants[p] = Variant(p, "", 0, "", 0, 0.0, None, {"table": f})
                continue
            path = out / f
            resident, load_ms = measure(path, kind, 1)
            extra = {"planned_bytes": lib.planned_size(path)}
            imp = None
            if eval_tokens and p != precisions[0]:
                mixed = copy.deepcopy(base)
                src = models[p]
                if kind == "head":
                    mixed.head, mixed.embed = src.head, src.embed
                else:
                    for i in _layers_of(name):
                        mixed.layers[i] = src.layers[i]
                lg = _eager_logits(mixed, eval_tokens)
                kl = torch.nn.functional.kl_div(lg.log_softmax(-1), ref_logits.log_softmax(-1), log_target=True,
                                                reduction="batchmean").item()
                ppl = _ppl(lg, eval_tokens)
                imp = Importance(kl, ppl, ppl - ppl_ref, len(eval_tokens) - 1)
            variants[p] = Variant(p, f, path.stat().st_size, hashlib.sha256(path.read_bytes()).hexdigest(),
                                  resident, load_ms, imp, extra)
        manifest_shards.append(Shard(name, kind, _layers_of(name) if kind == "layers" else [], variants))
    Manifest("test", {"model": str(model_dir), "kind": "hf"}, args.to_dict(), max_seq_len, "xnnpack", list(precisions),
             "tokenizer.json", {k: v for k, v in ckpt.tokenizer_config.items() if k in ("bos_token", "eos_token", "add_bos_token")},
             manifest_shards, {"top_ppl": ppl_ref}, max_tokens_per_call=chunk).save(out)
    return out


def _layers_of(name: str) -> list[int]:
    r = name.split(".")[1]
    a, _, b = r.partition("-")
    return list(range(int(a), int(b or a) + 1))


def _eager_logits(model, tokens):
    import torch

    from edgectl.model import empty_caches

    k, v = empty_caches(model.args, model.max_seq_len, model.args.n_layers)
    n = min(len(tokens), model.max_seq_len)
    with torch.no_grad():
        logits = model(torch.tensor([tokens[:n]]), torch.arange(n), torch.arange(n), k, v)
    return logits[0]


def _ppl(logits, tokens) -> float:
    import math

    import torch

    n = logits.shape[0]
    return math.exp(torch.nn.functional.cross_entropy(logits[:-1], torch.tensor(tokens[1:n])).item())


def default_sigint() -> None:
    """A `preexec_fn` for a child a test sends Ctrl-C: SIGINT's default disposition, as under a
    terminal. A test run launched as a background job inherits SIGINT ignored, and Python then
    installs no KeyboardInterrupt handler."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_DFL)
