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
