"""The native shim's build step (edgectl/runtime/_native/build.py): the shim shipped in the
platform wheel is taken when its stamp matches the installed executorch and source; a
stale one falls back to the cached build; with neither a prebuilt shim nor a compiler,
load() gives None with the reason, said once on stderr. No compiler is run."""

import importlib
import importlib.metadata as md
import json

import pytest

from edgectl.runtime import _native

nb = importlib.import_module("edgectl.runtime._native.build")
REAL_COMPILE = nb.compile_shim


@pytest.fixture
def pkg(tmp_path, monkeypatch):
    """The package's shim paths moved into tmp_path (no shim there yet), an empty cache, and
    a compiler that records its calls instead of running. Returns (shim path, calls)."""
    so = tmp_path / "pkg" / "etshim.so"
    so.parent.mkdir()
    monkeypatch.setattr(nb, "PREBUILT", so)
    monkeypatch.setattr(nb, "STAMP", so.with_name("etshim.json"))
    monkeypatch.setattr(nb, "_loads", lambda p: None)  # the fake shim "loads"
    monkeypatch.setenv("EDGECTL_CACHE", str(tmp_path / "cache"))
    calls = []

    def compile_shim(out, et, portable, rpath):
        calls.append((out, rpath))
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_bytes(b"built")

    monkeypatch.setattr(nb, "compile_shim", compile_shim)
    return so, calls


def ship(so, **changes):
    """A shipped shim with its stamp (the installed executorch's, with `changes`)."""
    so.write_bytes(b"shipped")
    st = nb.stamp(md.version("executorch"), nb.runtime_library()) | changes
    so.with_name("etshim.json").write_text(json.dumps(st))


def test_prebuilt_preferred_when_its_stamp_matches(pkg):
    so, calls = pkg
    ship(so)
    assert nb.prebuilt() == (so, "")
    assert nb.build() == so
    assert calls == []


@pytest.mark.parametrize("key, value", [("executorch", "0.0.1"), ("source_sha256", "0" * 64),
                                        ("runtime_library", "_portable_lib.cpython-39-x86_64-linux-gnu.so")])
def test_stale_stamp_falls_back_to_building(pkg, key, value):
    so, calls = pkg
    ship(so, **{key: value})
    got, why = nb.prebuilt()
    assert got is None and "stale" in why and key in why
    out = nb.build()
    assert out != so and out.read_bytes() == b"built" and out.is_relative_to(nb._cache_dir())
    assert len(calls) == 1 and calls[0][1] == str(nb.runtime_library().parent)  # the cache build: an absolute rpath
    assert nb.build() == out and len(calls) == 1  # cached


def test_missing_stamp_or_unloadable_prebuilt_is_not_used(pkg, monkeypatch):
    so, calls = pkg
    so.write_bytes(b"shipped")
    assert nb.prebuilt()[0] is None and "etshim.json" in nb.prebuilt()[1]
    ship(so)
    monkeypatch.setattr(nb, "_loads", lambda p: "undefined symbol: ets_x")
    got, why = nb.prebuilt()
    assert got is None and "does not load" in why and "ets_x" in why
    assert nb.build() != so and len(calls) == 1


def test_loads_reports_why_not(tmp_path):
    bad = tmp_path / "bad.so"
    bad.write_bytes(b"not an ELF file")
    assert nb._loads(bad)


def test_no_compiler_and_no_prebuilt_gives_none_with_reason(pkg, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(nb, "compile_shim", REAL_COMPILE)  # the real one: it finds no compiler
    monkeypatch.delenv("CXX", raising=False)
    monkeypatch.delenv("EDGECTL_NATIVE", raising=False)
    monkeypatch.setenv("PATH", str(tmp_path / "empty-bin"))
    with pytest.raises(FileNotFoundError, match="no C.. compiler.*no prebuilt shim in the package"):
        nb.build()
    monkeypatch.setattr(_native, "_state", {})
    assert _native.load() is None and _native.load() is None
    assert "no C++ compiler" in _native.why_not() and "no prebuilt shim" in _native.why_not()
    err = capsys.readouterr().err
    assert err.count("native shim unavailable") == 1, err
    assert not list(nb._cache_dir().rglob("*.so"))
