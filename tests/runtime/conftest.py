"""Fixtures of the runtime tests (tests/runtime/)."""

from __future__ import annotations

from pathlib import Path

import pytest
from helpers import build_shard_set


@pytest.fixture(scope="session")
def stories_shards(tmp_path_factory, stories_dir) -> Path:
    """stories260K as fp32 per-layer shards, max_seq_len 512 (as the stories_pte fixture)."""
    return build_shard_set(stories_dir, tmp_path_factory.mktemp("shards") / "stories", 512, ("fp32",))
