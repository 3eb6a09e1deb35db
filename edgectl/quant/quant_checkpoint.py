"""The `edgectl quantize` output directory: writing the codes, record and versions, and rebuilding the model from them.

model.safetensors holds the integer codes and scales, beside the config/tokenizer files and
`edgectl_quant.json` (the record, source model and hash, library versions).
`load_quantized_model` rebuilds the modules from those stored tensors; nothing is
re-quantized at export.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

from edgectl.quant.scheme import FORMAT, QUANT_FILE
from edgectl.quant.weights import _set
from edgectl.util.env import quiet_import_logs
from edgectl.util.errors import EdgectlError
from edgectl.util.version import __version__


def ours_to_hf(name: str) -> str:
    """Module path in model.py's tree -> Hugging Face key prefix (inverse of hf_key_to_ours)."""
    if name == "embed.embed_tokens":
        return "model.embed_tokens"
    if name == "head.norm":
        return "model.norm"
    if name == "head.lm_head":
        return "lm_head"
    return "model." + name


def quantized_state(model, record: dict) -> dict:
    """The tensors to store: integer codes and scales of quantized weights, the rest fp32."""
    import torch

    from edgectl.quant.quant_modules import Asym4Linear, QuantEmbedding

    out, skip = {}, set()
    for name, w in record["weights"].items():
        if w["form"] == "fp32":
            continue
        if "tied_to" in w:
            skip.add(name)  # rebuilt from its embedding's codes
            continue
        base = ours_to_hf(name)
        mod = model.embed if name == "embed.embed_tokens" else model.get_submodule(name)
        skip.add(name)
        if isinstance(mod, QuantEmbedding):
            out[base + ".qweight"], out[base + ".scales"] = mod.codes, mod.scales
            if mod.offsets is not None:
                out[base + ".offsets"] = mod.offsets
            continue
        lin = mod.main if isinstance(mod, Asym4Linear) else mod
        codes, scales = lin.weight.qdata, lin.weight.scale
        if w["bits"] == 4:
            from edgectl.quant.quant_modules import pack4

            codes = pack4((codes.to(torch.int16) + 8).to(torch.uint8))
        out[base + ".qweight"], out[base + ".scales"] = codes, scales
        if isinstance(mod, Asym4Linear):
            out[base + ".offsets"] = mod.offset.weight.detach()
        if lin.bias is not None:
            out[base + ".bias"] = lin.bias.detach()
    seen = set()
    for pname, p in model.named_parameters(remove_duplicate=False):
        owner = pname.rpartition(".")[0]
        if owner in skip or any(owner.startswith(s + ".") for s in skip) or id(p) in seen:
            continue
        seen.add(id(p))
        out[ours_to_hf(owner) + "." + pname.rpartition(".")[2]] = p.detach()
    return {k: v.contiguous() for k, v in out.items()}


def _versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    out = {"edgectl": __version__}
    for pkg in ("torch", "torchao", "executorch"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = None
    return out


def save_checkpoint(ckpt, model, record: dict, out_dir: Path, accuracy: dict | None) -> int:
    """Write the quantized checkpoint directory atomically; return its size in bytes."""
    from safetensors.torch import save_file

    out_dir = Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()) and not (out_dir / QUANT_FILE).exists():
        raise EdgectlError(f"{out_dir}: exists and is not an edgectl quantize output", hint="choose another -o")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.with_name(f".{out_dir.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir()
        save_file(quantized_state(model, record), str(tmp / "model.safetensors"), metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(ckpt.config, indent=2) + "\n")
        (tmp / "tokenizer.json").write_text(ckpt.tokenizer_json)
        (tmp / "tokenizer_config.json").write_text(json.dumps(ckpt.tokenizer_config, indent=2) + "\n")
        full = {
            **record,
            "source": {"model": ckpt.source, "sha256": ckpt.content_hash(), "kind": ckpt.kind,
                       "gguf_quant": ckpt.extra.get("gguf_quant")},
            "versions": _versions(),
            "accuracy": accuracy,
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        (tmp / QUANT_FILE).write_text(json.dumps(full, indent=2, default=str) + "\n")
        from edgectl.util.files import replace_dir

        replace_dir(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return sum(f.stat().st_size for f in out_dir.iterdir())


def apply_recorded_quantization(model, ckpt) -> dict | None:
    """Re-create the quantized modules recorded in an `edgectl quantize` output in `model`
    (built on the meta device or not) from the stored codes, and load every other weight.
    Returns the record, or None for a checkpoint that is not quantized."""
    if ckpt.quantization is None:
        return None
    quiet_import_logs()
    import torch

    from edgectl.checkpoint.checkpoint import hf_key_to_ours
    from edgectl.quant.quant_modules import Asym4Linear, QuantEmbedding, dynamic_linear, unpack4

    rec = ckpt.quantization
    if rec.get("format") != FORMAT:
        raise EdgectlError(f"{ckpt.source}: {QUANT_FILE} has format {rec.get('format')!r}, expected {FORMAT!r}",
                           hint="re-run `edgectl quantize` with this edgectl version")
    tensors = dict(ckpt.tensors())

    def take(key):
        if key not in tensors:
            raise EdgectlError(f"{ckpt.source}: {key} is missing from the quantized weights")
        return tensors.pop(key)

    def signed(codes, bits):
        return (unpack4(codes).to(torch.int16) - 8).to(torch.int8) if bits == 4 else codes

    built = {}
    for name, w in rec["weights"].items():
        form = w["form"]
        if form == "fp32" or "tied_to" in w:
            continue
        base = ours_to_hf(name)
        codes, scales = take(base + ".qweight"), take(base + ".scales")
        if form.startswith("emb_"):
            gs = w["group_size"] or w["shape"][1]
            offsets = take(base + ".offsets") if form == "emb_a4" else None
            model.embed = QuantEmbedding(codes, scales, w["bits"], gs, w["shape"][1], offsets)
            model.embed.scale = model.args.embed_scale
            built[name] = (codes, scales, w["bits"], gs, offsets)
            continue
        bias = tensors.pop(base + ".bias", None)
        if form == "a4w":
            new = Asym4Linear(codes, scales, take(base + ".offsets"), w["group_size"], bias)
        elif form in ("8da4w", "8da8w"):
            new = dynamic_linear(signed(codes, w["bits"]), scales, w["bits"], w["group_size"] or w["shape"][1], bias)
        else:
            raise EdgectlError(f"{ckpt.source}: unknown quantized form {form!r} for {name}")
        _set(model, name, new)
    for name, w in rec["weights"].items():
        if "tied_to" in w and w["form"] != "fp32":
            codes, scales, bits, gs, offsets = built[w["tied_to"]]
            if offsets is not None:
                _set(model, name, Asym4Linear(codes, scales, offsets, gs))
            else:
                _set(model, name, dynamic_linear(signed(codes, bits), scales, bits, gs))
    params = dict(model.named_parameters())
    for key, t in tensors.items():
        ours = hf_key_to_ours(key)
        if ours in params:
            if tuple(t.shape) != tuple(params[ours].shape):
                raise EdgectlError(f"{ckpt.source}: {key} has shape {tuple(t.shape)}, expected {tuple(params[ours].shape)}")
            _set(model, ours, torch.nn.Parameter(t.to(torch.float32), requires_grad=False))
    if model.args.tie_embeddings and isinstance(getattr(model.embed, "embed_tokens", None), torch.nn.Embedding):
        model.head.lm_head.weight = model.embed.embed_tokens.weight
    missing = [n for n, p in model.named_parameters() if p.is_meta]
    if missing:
        raise EdgectlError(f"{ckpt.source}: quantized checkpoint is missing {len(missing)} weights, e.g. {missing[0]}")
    return rec


def load_quantized_model(ckpt, max_seq_len: int | None = None):
    """Build the model of an `edgectl quantize` output from its stored codes: (model, record)."""
    import torch

    from edgectl.model import Transformer

    args = ckpt.args
    max_seq_len = max_seq_len or min(args.max_position_embeddings, 2048)
    with torch.device("meta"):
        model = Transformer(args, max_seq_len)
    rec = apply_recorded_quantization(model, ckpt)
    for m in model.modules():  # RoPE tables, as checkpoint.load_model does after a meta build
        if hasattr(m, "reset_tables"):
            m.reset_tables()
    return model.eval(), rec
