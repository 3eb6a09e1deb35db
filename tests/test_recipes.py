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
