"""The Python API (edgectl.api): `load(...).generate(...)` streams the text `edgectl run`
prints, for a .pte and for a shard set under a memory budget."""

from __future__ import annotations

import pytest

from edgectl import api
from edgectl.runtime.run import run_prompt

PROMPT = "Once upon a time"


@pytest.mark.real_model
def test_generate_streams_what_run_prints(stories_pte):
    ref = run_prompt(stories_pte, PROMPT, max_new_tokens=24)
    with api.load(stories_pte) as llm:
        it = llm.generate(PROMPT, max_new_tokens=24)
        first = next(it)
        assert llm.last_stats is None  # a generator: the rest is not produced yet
        pieces = [first, *it]
    assert "".join(pieces) == ref["text"] and len(pieces) > 5
    assert llm.last_stats["new_tokens"] == ref["stats"]["new_tokens"] == len(ref["tokens"])


@pytest.mark.real_model
def test_a_shard_set_under_a_budget(stories_dir, tmp_path):
    from helpers import build_shard_set

    from edgectl.runtime.methods import engine
    from edgectl.runtime.shards_startup import rss_bytes

    shards = build_shard_set(stories_dir, tmp_path / "s", 64, ("fp32",))
    # the budget counts the whole process: its runtime floor (this test process's RSS with
    # the runtime library up) + 400 MB for the model
    if (native := engine()) is not None:
        native.thread_count()
    mb = -(-rss_bytes()["rss"] // 10**6) + 400
    ref = run_prompt(shards, PROMPT, max_new_tokens=16, budget=mb * 10**6, context=48)
    assert ref["memory"]["floor_bytes"] > 0 and ref["memory"]["budget_bytes"] == mb * 10**6
    with api.load(shards, memory_budget=f"{mb}MB", context=48) as llm:
        text = "".join(llm.generate(PROMPT, max_new_tokens=16))
        assert llm.max_seq_len == 48
    assert text == ref["text"] and ref["stats"]["new_tokens"] == 16


def test_package_exposes_the_api_functions_after_every_submodule_is_imported():
    """`edgectl.export`/`edgectl.load` are the API's functions; no submodule shadows them
    (the export stage is `edgectl.lower` for that reason)."""
    import importlib
    import pkgutil

    import edgectl

    for m in pkgutil.walk_packages(edgectl.__path__, "edgectl."):
        if not m.name.endswith("__main__"):
            importlib.import_module(m.name)
    assert edgectl.export is api.export and edgectl.load is api.load


@pytest.mark.real_model
def test_the_readme_example_runs(tmp_path, monkeypatch, capsys, stories_dir):
    """The README's Python API example, run as written (in an empty directory: stories260K
    from the edgectl cache, where the stories_dir fixture found it)."""
    import re
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    code = re.search(r"## Python API\n.*?```python\n(.*?)```", readme, re.S).group(1)
    monkeypatch.chdir(tmp_path)
    # the cache the fixture found it in (a session fixture may have pointed EDGECTL_CACHE elsewhere)
    monkeypatch.setenv("EDGECTL_CACHE", str(stories_dir.parents[1]))
    exec(compile(code, "README.md", "exec"), {})
    out = capsys.readouterr().out.splitlines()
    ref = run_prompt(tmp_path / "stories.pte", "Once upon a time", max_new_tokens=32)
    assert out[0] == ref["text"] and len(ref["text"]) > 20
    assert "'new_tokens': 32" in out[1] or "'stopped': 'eos'" in out[1]
