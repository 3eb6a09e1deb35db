"""The checkpoint resolver: local dirs, hub ids through the real huggingface_hub cache
code (offline, never the network), GGUF, and the one-line errors for bad input."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from edgectl.checkpoint.checkpoint import load_model, resolve
from edgectl.util.errors import EdgectlError


@pytest.fixture
def offline_hub(tmp_path, monkeypatch, stories_dir):
    """A Hugging Face cache holding stories260K as `edgectl-test/stories260K`, hub offline."""
    import huggingface_hub.constants as C

    rev = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "models--edgectl-test--stories260K"
    snap = repo / "snapshots" / rev
    snap.mkdir(parents=True)
    for f in stories_dir.iterdir():
        if f.is_file() and f.name != "SOURCE.md":
            shutil.copy(f, snap / f.name)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(rev)
    monkeypatch.setattr(C, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(C, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return snap


def test_hub_id_resolves_from_cache_offline(offline_hub):
    ckpt = resolve("edgectl-test/stories260K")
    assert ckpt.path == offline_hub
    assert ckpt.args.n_layers == 5 and ckpt.args.vocab_size == 512
    model = load_model(ckpt, 32)
    assert not any(p.is_meta for p in model.parameters())


def test_unknown_hub_id_offline_names_the_id(offline_hub):
    with pytest.raises(EdgectlError) as e:
        resolve("nobody/no-such-model")
    assert "nobody/no-such-model" in str(e.value)
    assert "\n" not in str(e.value)


def test_local_dir_and_tied_weights_loaded_once(stories_dir):
    model = load_model(resolve(str(stories_dir)), 32)
    assert model.head.lm_head.weight is model.embed.embed_tokens.weight


@pytest.mark.parametrize("bad", ["./nope", "/no/such/dir", "nope.gguf"])
def test_missing_path(bad):
    with pytest.raises(EdgectlError, match="no such file or directory"):
        resolve(bad)


def _copy_model(stories_dir: Path, dst: Path) -> Path:
    shutil.copytree(stories_dir, dst)
    return dst


def test_truncated_safetensors(stories_dir, tmp_path):
    d = _copy_model(stories_dir, tmp_path / "m")
    f = d / "model.safetensors"
    f.chmod(0o644)
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    with pytest.raises(EdgectlError, match="not a valid safetensors file"):
        load_model(resolve(str(d)), 32)


def test_garbage_safetensors(stories_dir, tmp_path):
    d = _copy_model(stories_dir, tmp_path / "m")
    (d / "model.safetensors").chmod(0o644)
    (d / "model.safetensors").write_bytes(b"\x00garbage" * 100)
    with pytest.raises(EdgectlError, match="not a valid safetensors file"):
        load_model(resolve(str(d)), 32)


def test_unsupported_architecture_in_config(stories_dir, tmp_path):
    import json

    d = _copy_model(stories_dir, tmp_path / "m")
    cfg = json.loads((d / "config.json").read_text())
    cfg["architectures"] = ["FalconForCausalLM"]
    (d / "config.json").chmod(0o644)
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(EdgectlError) as e:
        resolve(str(d)).args
    assert "FalconForCausalLM" in str(e.value) and "LlamaForCausalLM" in e.value.hint


def _refused_without_torch(argv: list[str]) -> tuple[int, str, bool]:
    """Run edgectl in a fresh interpreter; (exit code, stderr, whether torch got imported)."""
    import subprocess
    import sys

    code = ("import sys\nfrom edgectl.cli.main import main\nrc = main(sys.argv[1:])\n"
            "print(rc, 'torch' in sys.modules)\n")
    p = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True, timeout=120)
    rc, torch_loaded = p.stdout.split()
    return int(rc), p.stderr, torch_loaded == "True"


def _tiny_gguf(path: Path, arch: str) -> Path:
    import gguf
    import numpy as np

    w = gguf.GGUFWriter(str(path), arch)
    w.add_uint32(f"{arch}.block_count", 1)
    w.add_array("tokenizer.ggml.tokens", ["a", "b", "c"])
    w.add_tensor("token_embd.weight", np.zeros((3, 4), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_unsupported_gguf_architecture_is_refused_before_torch(tmp_path):
    g = _tiny_gguf(tmp_path / "g.gguf", "falcon")
    rc, err, torch_loaded = _refused_without_torch(["export", str(g), "-o", str(tmp_path / "g.pte")])
    assert rc == 1 and not torch_loaded
    assert "'falcon' is not supported (supported: gemma3, llama, qwen2)" in err and err.count("\n") == 1
    assert not (tmp_path / "g.pte").exists()


def test_unsupported_config_architecture_is_refused_before_torch(stories_dir, tmp_path):
    import json

    d = _copy_model(stories_dir, tmp_path / "m")
    (d / "config.json").chmod(0o644)
    (d / "config.json").write_text(json.dumps({"architectures": ["FalconForCausalLM"], "model_type": "falcon"}))
    rc, err, torch_loaded = _refused_without_torch(["shard", str(d), "-o", str(tmp_path / "s")])
    assert rc == 1 and not torch_loaded and "FalconForCausalLM" in err and err.count("\n") == 1


def test_gguf_header_architecture(smol_gguf, tmp_path):
    from edgectl.checkpoint.architectures import gguf_architecture

    assert gguf_architecture(smol_gguf) == "llama"  # SmolLM2's release, checked with gguf-dump
    assert gguf_architecture(_tiny_gguf(tmp_path / "q.gguf", "qwen2")) == "qwen2"
    head = smol_gguf.read_bytes()[:40]
    (tmp_path / "cut.gguf").write_bytes(head)
    with pytest.raises(EdgectlError, match="truncated"):
        gguf_architecture(tmp_path / "cut.gguf")
    (tmp_path / "bad.gguf").write_bytes(b"GGML" + head[4:])
    with pytest.raises(EdgectlError, match="not a GGUF file"):
        gguf_architecture(tmp_path / "bad.gguf")
