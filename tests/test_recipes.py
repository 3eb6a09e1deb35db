"""Recipes: every shipped recipe loads and validates; unknown keys and wrong types fail loudly."""

from __future__ import annotations

from pathlib import Path

import pytest

from edgectl.util.errors import EdgectlError
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
    import edgectl.checkpoint.checkpoint as C
    import edgectl.lower.export as E

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
    from edgectl.cli.main import main
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
    from edgectl.cli.main import main

    bad = tmp_path / "bad.toml"
    bad.write_text("[run]\nmemroy_budget = '1MB'\n")
    rc = main(["run", "x.pte", "-p", "hi", "--recipe", str(bad)])
    err = capsys.readouterr().err
    assert rc == 1 and "memroy_budget" in err and err.strip().count("\n") == 0


# ---------------------------------------------------------------------------------------
# Shipped recipes: found by name, listed by `edgectl recipes`, Android ones export stock


def test_shipped_recipes_are_package_data():
    """They live inside the package (edgectl/recipes), so a wheel install has them."""
    import edgectl
    from edgectl.recipes import RECIPE_DIR

    assert RECIPE_DIR.parent == Path(edgectl.__file__).resolve().parent and len(shipped_recipes()) >= 6
    for p in shipped_recipes():
        r = load_recipe(p)
        assert r.description and r.name == p.stem


def test_android_recipes_ask_for_the_stock_interface(monkeypatch):
    """No Android runner loads the edgectl interface: an android recipe's export is stock."""
    from edgectl.cli.main import main

    android = [p for p in shipped_recipes() if "android" in p.stem]
    assert len(android) >= 2
    for p in android:
        assert load_recipe(p).export.interface == "stock", p.name
        seen = _capture_export(monkeypatch)
        assert main(["export", "--recipe", p.stem, "-o", "x.pte"]) == 0
        assert seen["interface"] == "stock" and seen["model"] == load_recipe(p).model.id


@pytest.mark.parametrize("form", ["{name}", "{name}.toml", "--recipe={name}"])
def test_recipe_by_name(monkeypatch, form):
    from edgectl.cli.main import main

    seen = _capture_export(monkeypatch)
    arg = form.format(name="smollm2-135m-laptop-8da4w")
    argv = ["export", "-o", "x.pte", *([arg] if arg.startswith("--") else ["--recipe", arg])]
    assert main(argv) == 0
    assert seen["model"] == "HuggingFaceTB/SmolLM2-135M-Instruct" and seen["scheme"].linear == "8da4w"


def test_a_path_wins_over_a_shipped_name(tmp_path, monkeypatch):
    from edgectl.recipes import find_recipe

    local = tmp_path / "smollm2-135m-android"
    local.write_text("[model]\nid = 'mine.gguf'\n")
    monkeypatch.chdir(tmp_path)
    assert find_recipe("smollm2-135m-android") == Path("smollm2-135m-android")
    assert load_recipe("smollm2-135m-android").model.id == "mine.gguf"
    assert load_recipe(str(local)).model.id == "mine.gguf"


def test_unknown_recipe_name_is_a_one_line_error(capsys):
    from edgectl.cli.main import main

    assert main(["export", "--recipe", "no-such-recipe", "-o", "x.pte"]) == 1
    err = capsys.readouterr().err
    assert "no-such-recipe" in err and "smollm2-135m-android" in err and err.strip().count("\n") == 0
    with pytest.raises(EdgectlError, match="cannot read recipe"):
        load_recipe("no/such/dir/r.toml")  # a path is never looked up by name


def test_recipes_command_lists_name_and_description(capsys):
    import json

    from edgectl.cli.main import main

    stems = [p.stem for p in shipped_recipes()]
    assert main(["recipes", "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert [r["name"] for r in listed] == stems
    for r in listed:
        assert r["description"] == load_recipe(r["path"]).description != ""
    assert main(["recipes"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in lines] == stems
    assert all(load_recipe(s).description in line for s, line in zip(stems, lines))
