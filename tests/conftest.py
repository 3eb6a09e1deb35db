"""Shared fixtures. Markers (real_model, slow) are declared in pyproject.toml.

Real models come from ../shared/models beside the checkout (as in CI) or from the
edgectl cache that scripts/fetch_models.py fills; tests that need one skip without it.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("EDGECTL_SHARED", REPO.parent / "shared"))
CACHE = Path(os.environ.get("EDGECTL_CACHE", Path.home() / ".cache" / "edgectl"))
SMOL_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def _first(*paths: Path) -> Path | None:
    return next((p for p in paths if p.exists()), None)


@pytest.fixture(scope="session")
def stories_dir() -> Path:
    p = _first(SHARED / "models" / "stories260K")
    if p is None:
        pytest.skip("stories260K not found in ../shared/models")
    return p


@pytest.fixture(scope="session")
def smol_gguf() -> Path:
    p = _first(
        SHARED / "models" / "smollm2-135m-instruct" / SMOL_NAME,
        CACHE / "models" / "smollm2-135m-instruct" / SMOL_NAME,
    )
    if p is None:
        pytest.skip("SmolLM2-135M GGUF not found (run scripts/fetch_models.py)")
    return p


@pytest.fixture(scope="session")
def corpus_dir() -> Path:
    p = SHARED / "corpus"
    if not p.exists():
        pytest.skip("../shared/corpus not found")
    return p


def _export_once(tmp_path_factory, model: Path, name: str, max_seq_len: int, prefill_chunk: int | None = None) -> Path:
    from edgectl.checkpoint import resolve
    from edgectl.export import export_pte

    out = tmp_path_factory.mktemp("pte") / name
    export_pte(resolve(str(model)), out, max_seq_len=max_seq_len, prefill_chunk=prefill_chunk)
    return out


@pytest.fixture(scope="session")
def stories_pte(tmp_path_factory, stories_dir) -> Path:
    """stories260K exported once per test session (fp32, XNNPACK, max_seq_len 512). Its
    prefill chunk of 16 tokens makes longer prompts run in several calls."""
    return _export_once(tmp_path_factory, stories_dir, "stories260K.pte", 512, prefill_chunk=16)


@pytest.fixture(scope="session")
def smol_pte(tmp_path_factory, smol_gguf) -> Path:
    """SmolLM2-135M-Instruct exported once per test session (fp32, XNNPACK, 1024); minutes."""
    return _export_once(tmp_path_factory, smol_gguf, "smollm2-135m.pte", 1024)


@pytest.fixture(scope="session")
def smol_hf_model(smol_gguf):
    """transformers' LlamaForCausalLM holding the dequantized GGUF weights (the reference)."""
    transformers = pytest.importorskip("transformers")
    import torch

    from edgectl.checkpoint import resolve

    ckpt = resolve(str(smol_gguf))
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**ckpt.config)).eval()
    missing, _ = model.load_state_dict(dict(ckpt.tensors()), strict=False)
    assert set(missing) <= {"lm_head.weight"}
    model.tie_weights()
    return model.to(torch.float32)


def _assert_reads_only_the_cache_window(model, window=None) -> None:
    """Decode steps on both sides of a KV_WINDOW step, with NaN written past each call's
    cache window (and zeros in the unwritten part of it, as after a reset), give the
    logits of a clean run: the programs read the window and nothing past it (NaN read
    once would spread). `window(p, cache_len)`: the positions a step at p reads, by
    default model.cache_window's rounded-up prefix."""
    from edgectl.model import KV_WINDOW, cache_window

    window = window or cache_window
    seq = list(range(5, 5 + KV_WINDOW + 3))
    model.reset()
    clean = model.forward(seq, 0, all_logits=True)
    model.reset()
    model.forward(seq[:1], 0)
    for p in range(1, len(seq)):
        w = window(p, model.cache_len)
        assert p <= w < model.cache_len
        for c in model.k + model.v:
            c[:, p:w] = 0.0
            c[:, w:] = float("nan")
        out = model.forward(seq[p : p + 1], p)
        assert (out[-1] - clean[p]).abs().max().item() < 1e-5


@pytest.fixture
def assert_reads_only_the_cache_window():
    return _assert_reads_only_the_cache_window
