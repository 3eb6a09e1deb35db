"""One checkpoint resolver for every command.

MODEL may be a local Hugging Face directory, a hub repo id (resolved through
huggingface_hub, so its cache and HF_HUB_OFFLINE behave as users expect), or a `.gguf`
file. Weights are streamed one tensor at a time into a model built on the meta device,
so a checkpoint never sits in memory twice.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from edgectl.checkpoint.architectures import check_gguf, check_hf_config
from edgectl.util.errors import EdgectlError

HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
HUB_PATTERNS = ["*.json", "*.safetensors", "tokenizer.model", "*.txt"]


@dataclass
class Checkpoint:
    """A resolved MODEL: where it is, its config and tokenizer, and how to read its weights."""

    source: str  # what the user typed
    path: Path  # local file or directory
    kind: str  # "hf" or "gguf"
    config: dict  # Hugging Face config.json dict
    tokenizer_json: str
    tokenizer_config: dict
    quantization: dict | None = None  # set by `edgectl quantize` outputs
    extra: dict = field(default_factory=dict)

    @property
    def args(self):
        from edgectl.model import ModelArgs

        return ModelArgs.from_hf_config(self.config)

    def content_hash(self) -> str:
        """sha256 over the weight files' sizes and first/last MiB: cheap, stable, and it
        changes whenever the weights do (a full hash of a multi-GB file costs seconds)."""
        h = hashlib.sha256()
        files = [self.path] if self.path.is_file() else sorted(weight_files(self.path))
        for f in files:
            size = f.stat().st_size
            h.update(f"{f.name}:{size}".encode())
            with open(f, "rb") as fh:
                h.update(fh.read(1 << 20))
                fh.seek(max(0, size - (1 << 20)))
                h.update(fh.read(1 << 20))
        return h.hexdigest()

    def tensors(self) -> Iterator[tuple[str, "torch.Tensor"]]:  # noqa: F821
        """(Hugging Face key, tensor) pairs, one at a time."""
        if self.kind == "gguf":
            from edgectl.checkpoint.gguf_loader import read_gguf

            # resolve() already parsed the file (seconds for a large vocab): use its
            # iterator once, parse again only for a second pass.
            it = self.extra.pop("_tensors", None) or read_gguf(self.path)[1]
            yield from it
            return
        yield from read_safetensors(self.path)


def resolve(model: str) -> Checkpoint:
    """Turn what the user typed into a Checkpoint, or raise a one-line EdgectlError."""
    p = Path(model).expanduser()
    if p.exists():
        if p.is_file():
            if p.suffix == ".gguf":
                return _from_gguf(model, p)
            raise EdgectlError(f"{model}: not a model", hint="give a Hugging Face directory, a hub id or a .gguf file")
        return _from_hf_dir(model, p)
    looks_like_path = model.startswith((".", "/", "~")) or model.endswith((".gguf", ".safetensors", ".pte"))
    if looks_like_path or not HUB_ID.match(model):
        raise EdgectlError(f"{model}: no such file or directory")
    return _from_hf_dir(model, _hub_download(model))


def _hub_download(repo_id: str) -> Path:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
    )

    try:
        return Path(snapshot_download(repo_id, allow_patterns=HUB_PATTERNS))
    except LocalEntryNotFoundError as e:
        raise EdgectlError(
            f"{repo_id}: not in the local Hugging Face cache and the hub cannot be reached",
            hint="download it once while online (or unset HF_HUB_OFFLINE), or pass a local path",
        ) from e
    except (RepositoryNotFoundError, GatedRepoError) as e:
        raise EdgectlError(f"{repo_id}: no such model on the hub, or it is gated") from e


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise EdgectlError(f"{path}: cannot read JSON ({e})") from e


def _from_hf_dir(source: str, d: Path) -> Checkpoint:
    if not (d / "config.json").exists():
        raise EdgectlError(f"{source}: no config.json in {d}", hint="a Hugging Face model directory is expected")
    config = _read_json(d / "config.json")
    check_hf_config(config, source)
    if not weight_files(d):
        raise EdgectlError(f"{source}: no *.safetensors weights in {d}")
    tok = d / "tokenizer.json"
    if tok.exists():
        tokenizer_json = tok.read_text()
    elif (d / "tokenizer.model").exists():
        tokenizer_json = _sentencepiece_to_json(d / "tokenizer.model")
    else:
        raise EdgectlError(f"{source}: no tokenizer.json or tokenizer.model in {d}")
    tok_cfg = _read_json(d / "tokenizer_config.json") if (d / "tokenizer_config.json").exists() else {}
    if "chat_template" not in tok_cfg and (d / "chat_template.jinja").exists():
        tok_cfg["chat_template"] = (d / "chat_template.jinja").read_text()
    gen = _read_json(d / "generation_config.json") if (d / "generation_config.json").exists() else {}
    if gen.get("eos_token_id") is not None:
        config = {**config, "eos_token_id": _merge_ids(config.get("eos_token_id"), gen["eos_token_id"])}
    quant = _read_json(d / "edgectl_quant.json") if (d / "edgectl_quant.json").exists() else None
    return Checkpoint(source, d, "hf", config, tokenizer_json, tok_cfg, quantization=quant)


def _merge_ids(a, b) -> list[int]:
    out: list[int] = []
    for x in (a, b):
        for i in x if isinstance(x, list) else ([x] if x is not None else []):
            if i not in out:
                out.append(i)
    return out


def _from_gguf(source: str, path: Path) -> Checkpoint:
    check_gguf(path)  # header only: an unsupported model is refused before torch is imported
    from edgectl.checkpoint.gguf_loader import read_gguf

    meta, tensors = read_gguf(path)
    return Checkpoint(
        source, path, "gguf", meta.config, meta.tokenizer_json, meta.tokenizer_config,
        extra={"gguf_quant": meta.gguf_quant, "_tensors": tensors},
    )


def _sentencepiece_to_json(model_file: Path) -> str:
    try:
        from transformers import LlamaTokenizerFast
    except ImportError as e:  # transformers is only a test extra
        raise EdgectlError(f"{model_file}: only tokenizer.model, and no tokenizer.json", hint="add a tokenizer.json") from e
    return LlamaTokenizerFast(vocab_file=str(model_file)).backend_tokenizer.to_str()


def weight_files(d: Path) -> list[Path]:
    index = d / "model.safetensors.index.json"
    if index.exists():
        names = sorted(set(_read_json(index)["weight_map"].values()))
        missing = [n for n in names if not (d / n).exists()]
        if missing:
            raise EdgectlError(f"{d}: shards listed in model.safetensors.index.json are missing: {missing[:3]}")
        return [d / n for n in names]
    return sorted(d.glob("*.safetensors"))


def read_safetensors(d: Path) -> Iterator[tuple[str, "torch.Tensor"]]:  # noqa: F821
    from safetensors import SafetensorError, safe_open

    for f in weight_files(d):
        try:
            with safe_open(f, framework="pt") as st:
                for key in st.keys():
                    yield key, st.get_tensor(key)
        except SafetensorError as e:
            raise EdgectlError(f"{f}: not a valid safetensors file ({e})") from e


def load_model(ckpt: Checkpoint, max_seq_len: int | None = None):
    """Build the Transformer on the meta device and assign the checkpoint's tensors.

    Returns the model in fp32, eval mode. A tensor is converted at most once and then
    owned by the model, so peak memory is about one copy of the weights.
    """
    import torch

    from edgectl.model import RMSNorm, Transformer, reset_buffers

    args = ckpt.args
    max_seq_len = max_seq_len or min(args.max_position_embeddings, 2048)
    with torch.device("meta"):
        model = Transformer(args, max_seq_len)
    params = dict(model.named_parameters())
    # Gemma's RMSNorms scale by (1 + w): the 1 is folded in here, once (float32, as HF adds it)
    plus_one = {n + ".weight" for n, m in model.named_modules() if isinstance(m, RMSNorm)} if args.norm_plus_one else set()
    unplaced = []  # a layer tensor this definition has no parameter for (e.g. an attention bias): refused
    for key, fused in ckpt.tensors():
        for ours, t in split_fused(hf_key_to_ours(key), fused, args):
            if ours is None or ours not in params:
                # a tied head's copy is no loss; old HF files store RoPE buffers in the layers
                if ours is not None and ours.startswith("layers.") and not ours.endswith("rotary_emb.inv_freq"):
                    unplaced.append(key)
                continue
            if tuple(t.shape) != tuple(params[ours].shape):
                raise EdgectlError(f"{ckpt.source}: {key} has shape {tuple(fused.shape)}, "
                                   f"config expects {tuple(params[ours].shape)} for {ours}")
            t = t.to(torch.float32)
            _assign(model, ours, torch.nn.Parameter(1.0 + t if ours in plus_one else t, requires_grad=False))
    if unplaced:
        raise EdgectlError(f"{ckpt.source}: {len(unplaced)} weights that edgectl's model has no place for, e.g. "
                           f"{unplaced[0]}: its config asks for something the model does not do (an attention bias?)",
                           hint="running without them would give wrong logits; this architecture option is not supported yet")
    if args.tie_embeddings:
        model.head.lm_head.weight = model.embed.embed_tokens.weight
    missing = [n for n, p in model.named_parameters() if p.is_meta]
    if missing:
        raise EdgectlError(f"{ckpt.source}: checkpoint is missing {len(missing)} weights, e.g. {missing[0]}")
    return reset_buffers(model).eval()


def _assign(model, name: str, value) -> None:
    owner, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(owner), leaf, value)


def cache_dir() -> Path:
    return Path(os.environ.get("EDGECTL_CACHE", Path.home() / ".cache" / "edgectl"))


def split_fused(ours: str | None, t, args) -> list[tuple[str | None, "torch.Tensor"]]:  # noqa: F821
    """Phi-3's fused projections as this model's own: qkv_proj's rows are q's, k's, then
    v's; gate_up_proj's are gate's, then up's (transformers' Phi3Attention and Phi3MLP).
    Each part is cloned, so none holds the whole fused tensor alive. Any other key: as is."""
    if ours is None or not ours.endswith(("self_attn.qkv_proj.weight", "mlp.gate_up_proj.weight")):
        return [(ours, t)]
    stem = ours.rsplit(".", 2)[0]
    if ours.endswith("qkv_proj.weight"):
        q, kv = args.n_heads * args.head_dim, args.n_kv_heads * args.head_dim
        if t.shape[0] != q + 2 * kv:  # checked here: a wrong split would load silently
            raise EdgectlError(f"{ours}: {t.shape[0]} rows, config expects {q + 2 * kv} (q, k, v)")
        names, sizes = ("q_proj", "k_proj", "v_proj"), [q, kv, kv]
    else:
        if t.shape[0] != 2 * args.hidden_dim:
            raise EdgectlError(f"{ours}: {t.shape[0]} rows, config expects {2 * args.hidden_dim} (gate, up)")
        names, sizes = ("gate_proj", "up_proj"), [args.hidden_dim, args.hidden_dim]
    return [(f"{stem}.{n}.weight", part.clone()) for n, part in zip(names, t.split(sizes, dim=0))]


def hf_key_to_ours(key: str) -> str | None:
    """Map a Hugging Face state-dict key onto this module tree (None: not a weight we use)."""
    if key == "model.embed_tokens.weight":
        return "embed.embed_tokens.weight"
    if key == "model.norm.weight":
        return "head.norm.weight"
    if key == "lm_head.weight":
        return "head.lm_head.weight"
    if key.startswith("model.layers."):
        return key[len("model.") :]
    return None
