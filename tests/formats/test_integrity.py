"""Damaged, truncated, swapped or missing files: `run`, `bench` and `verify` give one line
naming the file and exit 1, never a crash (edgectl/formats/integrity.py); stamps spare the hash of
an unchanged file and never a changed one."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from edgectl.formats import integrity
from edgectl.cli.main import main


def _flip(path: Path, offset: int) -> None:
    b = bytearray(path.read_bytes())
    b[offset] ^= 0xFF
    path.write_bytes(bytes(b))


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _swap(a: Path, b: Path) -> None:
    tmp = a.with_name("swap.tmp")
    os.replace(a, tmp)
    os.replace(b, a)
    os.replace(tmp, b)


def _cli(*argv, timeout=300):
    """`edgectl ARGV` in a fresh process: a crash is a negative return code, not a dead test run."""
    return subprocess.run([sys.executable, "-c", "import sys; from edgectl.cli.main import entry; sys.argv[0] = 'edgectl'; entry()",
                           *map(str, argv)], capture_output=True, text=True, timeout=timeout)


def _one_error_line(r, name: str) -> str:
    """Exit 1 with exactly one `edgectl:` line on stderr, an error naming `name`."""
    lines = [ln for ln in r.stderr.splitlines() if ln.startswith("edgectl:")]
    assert r.returncode == 1, (r.returncode, r.stderr[-2000:])
    assert len(lines) == 1 and lines[0].startswith("edgectl: error:"), r.stderr[-2000:]
    assert name in lines[0] and "Traceback" not in r.stderr, lines[0]
    assert not [ln for ln in r.stderr.splitlines() if ln.startswith("[")], r.stderr[-2000:]  # no C++ runtime chatter
    return lines[0]


@pytest.fixture(autouse=True)
def _stamps(tmp_path, monkeypatch):
    """Stamps in this test's own directory; no file verified by an earlier test counts."""
    monkeypatch.setenv("EDGECTL_VERIFY_STAMPS", str(tmp_path / "stamps"))
    monkeypatch.setattr(integrity, "_seen", {})


@pytest.fixture(scope="module")
def shard_set(tmp_path_factory, stories_dir):
    """stories260K cut by `edgectl shard` (fp32): sealed programs and a tokenizer sha256."""
    from edgectl.checkpoint.checkpoint import resolve
    from edgectl.shard.shard import ShardSettings, shard_model

    mp = pytest.MonkeyPatch()
    mp.setenv("EDGECTL_CACHE", str(tmp_path_factory.mktemp("cache")))  # its own shard cache
    out = tmp_path_factory.mktemp("integrity") / "stories"
    try:
        shard_model(resolve(str(stories_dir)), out, ShardSettings(("fp32",), max_seq_len=128, jobs=1, chunk=16))
    finally:
        mp.undo()
    return out


@pytest.fixture
def copy(shard_set, tmp_path):
    """A private copy (the set's files are hard links into the shard cache: never damage those)."""
    d = tmp_path / "set"
    shutil.copytree(shard_set, d)
    return d


def _garble_manifest(d: Path) -> None:
    raw = json.loads((d / "manifest.json").read_text())
    raw["model"]["n_kv_heads"] = 2  # still JSON: without the check, ExecuTorch's update_cache aborted
    (d / "manifest.json").write_text(json.dumps(raw))


DAMAGE = {
    "layer byte 100": (lambda d: _flip(d / "layers.0.fp32.pte", 100), "layers.0.fp32.pte"),
    "head byte 100": (lambda d: _flip(d / "head.fp32.pte", 100), "head.fp32.pte"),
    "layer weights": (lambda d: _flip(d / "layers.1.fp32.pte", (d / "layers.1.fp32.pte").stat().st_size - 4000),
                      "layers.1.fp32.pte"),
    "truncated layer": (lambda d: _truncate(d / "layers.2.fp32.pte"), "layers.2.fp32.pte"),
    "swapped layers": (lambda d: _swap(d / "layers.0.fp32.pte", d / "layers.1.fp32.pte"), "layers.0.fp32.pte"),
    "missing layer": (lambda d: (d / "layers.3.fp32.pte").unlink(), "layers.3.fp32.pte"),
    "truncated manifest": (lambda d: _truncate(d / "manifest.json"), "manifest.json"),
    "garbled manifest": (_garble_manifest, "manifest.json"),
    "tokenizer byte": (lambda d: _flip(d / "tokenizer.json", 300), "tokenizer.json"),
}


@pytest.mark.real_model
def test_an_intact_shard_set_verifies_and_runs(copy, capsys):
    assert main(["verify", str(copy)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert len(out) == 8 and all(ln.endswith(": OK") for ln in out)  # manifest, 5 layers, head, tokenizer
    r = _cli("run", copy, "-p", "hi", "-n", "3")
    assert r.returncode == 0, r.stderr[-2000:]


@pytest.mark.real_model
@pytest.mark.parametrize("case", list(DAMAGE))
def test_verify_names_the_damaged_file(copy, capsys, case):
    damage, name = DAMAGE[case]
    damage(copy)
    assert main(["verify", str(copy), "--json"]) == 1
    rep = json.loads(capsys.readouterr().out)
    bad = [f for f in rep["files"] if not f["ok"]]
    assert rep["ok"] is False and bad and Path(bad[0]["path"]).name == name and bad[0]["problem"], rep


@pytest.mark.real_model
@pytest.mark.parametrize("case", ["layer byte 100", "head byte 100", "truncated layer", "swapped layers",
                                  "missing layer", "garbled manifest", "tokenizer byte"])
def test_run_on_a_damaged_shard_set_is_one_line_exit_1(copy, case):
    damage, name = DAMAGE[case]
    damage(copy)
    line = _one_error_line(_cli("run", copy, "-p", "hi", "-n", "4"), name)
    if case == "swapped layers":
        assert "layers.1.fp32.pte" in line  # says whose bytes it holds


@pytest.mark.real_model
def test_streamed_shards_are_checked_in_the_loader_thread(copy, monkeypatch):
    """A pipelined run loads its streamed shards on the loader thread: the check runs there."""
    from edgectl.runtime import _native
    from edgectl.runtime import loader as ld
    from edgectl.util.errors import EdgectlError
    from edgectl.formats.manifest import Manifest
    from edgectl.runtime.trace import Trace
    from edgectl.runtime.methods import _load_runtime

    monkeypatch.setenv("EDGECTL_PACKED_CACHE", "0")
    _load_runtime()
    native = _native.load()
    if native is None:
        pytest.skip(f"native shim unavailable: {_native.why_not()}")
    _flip(copy / "layers.4.fp32.pte", 100)
    Manifest.load(copy)  # registers what the manifest records
    path = copy / "layers.4.fp32.pte"
    loader = ld.Loader(ld.NativeEngine(native, 1 << 20), [("layers.4", path)], Trace())
    try:
        with pytest.raises(EdgectlError, match="layers.4.fp32.pte: damaged"):
            loader.take("layers.4")
    finally:
        loader.close()


@pytest.mark.real_model
def test_bench_on_a_damaged_shard_set_is_one_line_exit_1(copy):
    _flip(copy / "layers.0.fp32.pte", 100)
    _one_error_line(_cli("bench", copy, "--repeat", "1", "--new-tokens", "2", "--prompt-tokens", "4"), "layers.0.fp32.pte")


@pytest.mark.real_model
def test_a_damaged_cache_file_is_not_linked_into_a_new_shard_set(copy):
    assert integrity.intact(copy / "head.fp32.pte")
    _flip(copy / "head.fp32.pte", (copy / "head.fp32.pte").stat().st_size - 100)
    assert not integrity.intact(copy / "head.fp32.pte")


# ---------------------------------------------------------------------------------------
# A monolithic .pte: its own checksum


@pytest.fixture
def pte(stories_pte, tmp_path):
    p = tmp_path / "model.pte"
    shutil.copyfile(stories_pte, p)
    return p


@pytest.mark.real_model
def test_an_exported_pte_is_sealed(pte, capsys):
    assert integrity.check_pte(pte, stamps=False) == "ok"
    assert main(["verify", str(pte)]) == 0
    assert capsys.readouterr().out.strip() == f"{pte}: OK"


@pytest.mark.real_model
@pytest.mark.parametrize("where", ["weights", "header", "digest", "truncated", "appended"])
def test_a_damaged_pte_is_one_line_exit_1(pte, capsys, where):
    size = pte.stat().st_size
    if where == "weights":
        _flip(pte, size - 3000)  # the output head's weight: ran silently with wrong logits before
    elif where == "header":
        _flip(pte, 100)
    elif where == "digest":
        _flip(pte, integrity._digest_offset(str(pte)) + 10)
    elif where == "truncated":
        _truncate(pte)
    else:
        pte.write_bytes(pte.read_bytes() + b"\0")
    assert main(["verify", str(pte)]) == 1
    out = capsys.readouterr().out.strip()
    assert out.startswith(f"{pte}: ") and not out.endswith("OK") and "\n" not in out
    if where == "truncated":
        assert "truncated" in out
    if where in ("weights", "header", "truncated"):  # in a fresh process: a crash fails the test
        _one_error_line(_cli("run", pte, "-p", "hi", "-n", "4"), "model.pte")
    else:
        from edgectl.util.errors import EdgectlError
        from edgectl.runtime.runtime import open_pte

        with pytest.raises(EdgectlError, match="model.pte: damaged"):
            open_pte(pte)


@pytest.mark.real_model
def test_a_pte_without_a_checksum_warns_once_and_runs(pte, capsys):
    """A file exported before sealing (its meta starts with edgectl_version) still runs."""
    from edgectl.runtime.runtime import open_pte

    data = bytearray(pte.read_bytes())
    off = integrity._digest_offset(str(pte)) - len(integrity.PREFIX)
    old = b'{"edgectl_version": "old", "_": "'
    n = len(integrity.PREFIX) + 64 + 3  # `{"file_sha256": "<64>", `
    data[off : off + n] = old + b"x" * (n - len(old) - 3) + b'", '
    pte.write_bytes(bytes(data))
    assert integrity.check_pte(pte, stamps=False) == "unsealed"
    m = open_pte(pte)
    m.forward([1, 2, 3], 0)
    open_pte(pte)
    err = capsys.readouterr().err
    assert err.count("no checksum") == 1 and "re-export" in err
    assert main(["verify", str(pte)]) == 1


# ---------------------------------------------------------------------------------------
# Stamps


def _counting(monkeypatch):
    calls = []
    real = integrity.sha256_file

    def counted(path, skip=None):
        calls.append(str(path))
        return real(path, skip)

    monkeypatch.setattr(integrity, "sha256_file", counted)
    return calls


def _new_process(monkeypatch):
    monkeypatch.setattr(integrity, "_seen", {})  # what a new process starts with


def test_an_unchanged_file_is_hashed_once_and_a_changed_one_again(tmp_path, monkeypatch):
    import hashlib

    monkeypatch.setattr(integrity, "RACY_NS", 0)  # the file was written just now
    f = tmp_path / "x.bin"
    f.write_bytes(os.urandom(1 << 16))
    sha = hashlib.sha256(f.read_bytes()).hexdigest()
    calls = _counting(monkeypatch)
    integrity.check_file(f, sha, f.stat().st_size)
    integrity.check_file(f, sha, f.stat().st_size)  # same process
    _new_process(monkeypatch)
    integrity.check_file(f, sha, f.stat().st_size)  # the stamp
    assert len(calls) == 1 and integrity.stats["stamp_hits"] >= 1
    st = f.stat()
    _flip(f, 1000)  # same size, new mtime
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
    _new_process(monkeypatch)
    with pytest.raises(integrity.EdgectlError, match="damaged"):
        integrity.check_file(f, sha, st.st_size)
    assert len(calls) == 2


def test_a_change_that_keeps_size_and_mtime_is_caught_by_ctime(tmp_path, monkeypatch):
    import hashlib
    import time

    monkeypatch.setattr(integrity, "RACY_NS", 0)
    f = tmp_path / "x.bin"
    f.write_bytes(os.urandom(1 << 16))
    sha = hashlib.sha256(f.read_bytes()).hexdigest()
    integrity.check_file(f, sha)
    st = f.stat()
    time.sleep(0.02)
    _flip(f, 10)
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns))  # mtime set back, as cp -p or touch -r would
    _new_process(monkeypatch)
    with pytest.raises(integrity.EdgectlError, match="damaged"):
        integrity.check_file(f, sha)


def test_a_file_changed_just_now_gets_no_stamp(tmp_path, monkeypatch):
    """Within RACY_NS of its last change, a second change could keep the stat: no stamp."""
    import hashlib

    f = tmp_path / "x.bin"
    f.write_bytes(os.urandom(4096))
    sha = hashlib.sha256(f.read_bytes()).hexdigest()
    calls = _counting(monkeypatch)
    integrity.check_file(f, sha)
    _new_process(monkeypatch)
    integrity.check_file(f, sha)
    assert len(calls) == 2


def test_pte_stamps_and_an_unwritable_stamp_store(pte, monkeypatch, tmp_path):
    monkeypatch.setattr(integrity, "RACY_NS", 0)
    calls = _counting(monkeypatch)
    assert integrity.check_pte(pte) == "ok"
    _new_process(monkeypatch)
    assert integrity.check_pte(pte) == "ok" and len(calls) == 1
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("")
    monkeypatch.setenv("EDGECTL_VERIFY_STAMPS", str(blocker / "stamps"))  # cannot be created
    for _ in range(2):
        _new_process(monkeypatch)
        assert integrity.check_pte(pte) == "ok"
    assert len(calls) == 3  # hashed every time, no error


def test_verify_of_a_missing_path_and_a_plain_directory(tmp_path, capsys):
    assert main(["verify", str(tmp_path / "nope.pte")]) == 1
    assert main(["verify", str(tmp_path)]) == 1
    out = capsys.readouterr().out.splitlines()
    assert out[0].endswith("nope.pte: missing") and "without manifest.json" in out[1]
