"""Recipes: every shipped recipe loads and validates; unknown keys and wrong types fail loudly."""

from __future__ import annotations

import pytest

from edgectl.errors import EdgectlError
from edgectl.recipes import Recipe, apply_overrides, load_recipe, parse_size, shipped_recipes


def test_recipes_are_shipped():
    names = {p.stem for p in shipped_recipes()}
    assert {"smollm2-135m-laptop-fp32", "smollm2-135m-laptop-8da4w", "smollm2-135m-rpi5", "smollm2-135m-android",
            "llama-3.2-1b-instruct-android", "qwen2.5-0.5b-instruct-laptop"} <= names


@pytest.mark.parametrize("path", shipped_recipes(), ids=lambda p: p.stem)
def test_every_shipped_recipe_loads(path):
    r = load_recipe(path)
    assert isinstance(r, Recipe) and r.name == path.stem and r.model.id
    if r.run.memory_budget:
        assert parse_size(r.run.memory_budget) > 0


def _write(tmp_path, text):
    p = tmp_path / "r.toml"
    p.write_text(text)
    return p


def test_unknown_key_is_an_error(tmp_path):
    with pytest.raises(EdgectlError, match="unknown key 'groupsize'"):
        load_recipe(_write(tmp_path, "[quantize]\ngroupsize = 32\n"))


def test_unknown_section_is_an_error(tmp_path):
    with pytest.raises(EdgectlError, match="unknown key 'quantise'"):
        load_recipe(_write(tmp_path, "[quantise]\nscheme = '8da4w'\n"))


def test_wrong_type_is_an_error(tmp_path):
    with pytest.raises(EdgectlError, match="group_size must be int"):
        load_recipe(_write(tmp_path, "[quantize]\ngroup_size = '32'\n"))


def test_bad_value_is_an_error(tmp_path):
    with pytest.raises(EdgectlError, match="scheme"):
        load_recipe(_write(tmp_path, "[quantize]\nscheme = 'int3'\n"))
    with pytest.raises(EdgectlError, match="size"):
        load_recipe(_write(tmp_path, "[run]\nmemory_budget = 'lots'\n"))
    with pytest.raises(EdgectlError, match="export.interface"):
        load_recipe(_write(tmp_path, "[export]\ninterface = 'llama'\n"))
    assert load_recipe(_write(tmp_path, "[export]\ninterface = 'stock'\n")).export.interface == "stock"


def test_overrides_are_typed(tmp_path):
    r = load_recipe(_write(tmp_path, "[quantize]\nscheme = '8da4w'\n"))
    r = apply_overrides(r, ["quantize.group_size=64", "shard.precisions=['int8']", "run.memory_budget=150MB"])
    assert r.quantize.group_size == 64 and r.shard.precisions == ("int8",) and r.run.memory_budget == "150MB"
    with pytest.raises(EdgectlError):
        apply_overrides(r, ["quantize.group_size=big"])
    with pytest.raises(EdgectlError):
        apply_overrides(r, ["nosuch.key=1"])


@pytest.mark.parametrize("text,n", [("150MB", 150_000_000), ("1.5GiB", int(1.5 * 2**30)), ("4096", 4096), ("64 KiB", 65536)])
def test_parse_size(text, n):
    assert parse_size(text) == n


def _capture_export(monkeypatch):
    import edgectl.checkpoint as C
    import edgectl.export as E

    seen = {}

    class Res:
        path, bytes, seconds, cpu_seconds, ops, tokenizer = "x.pte", 1, 0.0, 0.0, {}, None

    def fake_export(ckpt, out, **kw):
        seen.update(kw, model=ckpt, out=out)
        return Res()

    monkeypatch.setattr(C, "resolve", lambda m: m)
    monkeypatch.setattr(E, "export_pte", fake_export)
    return seen


def test_recipe_gives_defaults_and_flags_override(monkeypatch, capsys):
    from edgectl.cli import main
    from edgectl.recipes import shipped_recipes

    recipe = next(p for p in shipped_recipes() if p.stem == "smollm2-135m-laptop-8da4w")
    seen = _capture_export(monkeypatch)
    assert main(["export", "--recipe", str(recipe), "-o", "x.pte"]) == 0
    assert seen["model"] == "HuggingFaceTB/SmolLM2-135M-Instruct" and seen["max_seq_len"] == 1024
    assert seen["scheme"].linear == "8da4w" and seen["scheme"].embedding == "int8"
    assert seen["interface"] == "edgectl"  # stock is the default only with --plan

    seen.clear()
    assert main(["export", "local.gguf", "--recipe", str(recipe), "-o", "x.pte", "--max-seq-len", "256",
                 "--group-size", "64"]) == 0
    assert seen["model"] == "local.gguf" and seen["max_seq_len"] == 256 and seen["scheme"].group_size == 64


def test_bad_recipe_is_a_one_line_error(tmp_path, capsys):
    from edgectl.cli import main

    bad = tmp_path / "bad.toml"
    bad.write_text("[run]\nmemroy_budget = '1MB'\n")
    rc = main(["run", "x.pte", "-p", "hi", "--recipe", str(bad)])
    err = capsys.readouterr().err
    assert rc == 1 and "memroy_budget" in err and err.strip().count("\n") == 0
