"""ShardModel on a real shard set built here from stories260K (independent of `edgectl shard`):
per-layer programs with the manifest's interfaces, compared against the monolithic .pte."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

# stories_shards (stories260K as fp32 per-layer shards, max_seq_len 512): tests/runtime/conftest.py


# ---------------------------------------------------------------------------------------
# Tests


def _maxdiff(a, b) -> float:
    """Largest absolute difference of two logits arrays (numpy, as the runtime returns them)."""
    return float(np.abs(a - b).max())


PROMPT = [1, 403, 11, 57, 300, 4, 91, 17, 230, 61]


def _greedy(model, n=6):
    model.reset()
    logits = [model.forward(PROMPT, 0, all_logits=True)]
    tok, pos, toks = int(np.argmax(logits[-1][-1])), len(PROMPT), []
    for _ in range(n):
        toks.append(tok)
        logits.append(model.forward([tok], pos))
        pos += 1
        tok = int(np.argmax(logits[-1][-1]))
    return toks, logits


def _streamed_plan(directory, mode, names):
    from edgectl.formats.manifest import Manifest
    from edgectl.runtime.planner import plan

    p = plan(Manifest.load(directory), 1 << 40, mode="resident")
    for c in p.shards:
        if c.name in names:
            c.placement = "streamed"
    p.mode = mode
    return p


@pytest.mark.real_model
@pytest.mark.slow
@pytest.mark.parametrize("engine", ["native", "python"])
@pytest.mark.parametrize("mode", ["resident", "on-demand", "pipelined"])
def test_shard_set_reproduces_the_monolithic_pte(stories_shards, stories_pte, engine, mode):
    from edgectl.runtime.runtime import PteModel
    from edgectl.runtime.shards_runtime import ShardModel

    mono = PteModel(stories_pte)
    ref_toks, ref_logits = _greedy(mono)
    plan = _streamed_plan(stories_shards, mode, set() if mode == "resident" else {"layers.2", "layers.3", "layers.4", "head"})
    # what the preload buffer reads: a shard's packed-weight cache file once one exists, else its .pte
    from edgectl.runtime import packed_cache
    from edgectl.formats.manifest import Manifest

    pc = packed_cache.default() if engine == "native" else None
    by_name = {s.name: s for s in Manifest.load(stories_shards).shards}
    expect_reads = [(pc.existing(by_name[c.name].variants["fp32"].sha256) if pc else None) or Path(f"{c.name}.fp32.pte")
                    for c in plan.shards if c.placement == "resident"]
    sm = ShardModel(stories_shards, plan=plan, engine=engine)
    try:
        assert sm.engine_name == engine
        toks, logits = _greedy(sm)
        assert toks == ref_toks
        for a, b in zip(logits, ref_logits):
            assert _maxdiff(a, b) < 1e-4
        loads = [s.name for s in sm.trace.spans if s.lane == "load"]
        computes = [s.name for s in sm.trace.spans if s.lane == "compute"]
        steps = len(logits)
        # resident layer shards run as one chained native call, named by its first and last shard
        first = [c for c in computes if c.split("..")[0] == "layers.0"]
        assert len(first) == steps and computes.count("head") == steps
        if engine == "native":
            assert set(first) == {"layers.0..layers.4" if mode == "resident" else "layers.0..layers.1"}
        # the preload buffer's files were read ahead once each, in forward order; streamed ones not
        sm.prefetcher.join(timeout=10)
        reads = [s.name for s in sm.trace.spans if s.lane == "read"]
        assert reads == [p.name for p in expect_reads]
        if mode == "resident":
            assert sorted(loads) == sorted(["layers.0", "layers.1", "layers.2", "layers.3", "layers.4", "head"])
        else:  # streamed shards reloaded for every forward call (the loader may be one ahead)
            assert loads.count("layers.0") == 1 and steps <= loads.count("layers.3") <= steps + 1
    finally:
        sm.close()


@pytest.mark.real_model
@pytest.mark.slow
def test_budget_below_minimum_is_one_line_error(stories_shards, monkeypatch):
    """Refused before the first-execute probe loads a shard (the probe on top of the
    tokenizer is what got capped runs OOM-killed before they could refuse), with the
    minimum so far as a lower bound. The budget counts the whole process: one at or
    below the runtime floor (this process's RSS before any shard) is refused first."""
    import re

    from edgectl.runtime import loader
    from edgectl.runtime.methods import engine
    from edgectl.runtime.shards_startup import rss_bytes
    from edgectl.util.errors import EdgectlError
    from edgectl.runtime.shards_runtime import ShardModel

    loads = []
    for eng in (loader.NativeEngine, loader.PyEngine):
        monkeypatch.setattr(eng, "load", lambda self, *a, **k: loads.append(a))
    with pytest.raises(EdgectlError, match=r"below this process's runtime floor of [0-9.]+ MB"):
        ShardModel(stories_shards, budget=1000, mode="auto")
    # the floor as ShardModel measures it (the runtime library and its thread pool up), and
    # 1 MB over it for the model: above the floor, below what stories260K needs (~2 MB more)
    if (native := engine()) is not None:
        native.thread_count()
    budget = rss_bytes()["rss"] + 1_000_000
    with pytest.raises(EdgectlError, match=r"feasible minimum of at least [0-9.]+ MB .*so far; the first execute") as e:
        ShardModel(stories_shards, budget=budget, mode="auto")
    assert float(re.search(r"at least ([0-9.]+) MB", str(e.value)).group(1)) * 1e6 > budget
    assert not loads


@pytest.mark.real_model
@pytest.mark.slow
def test_long_prompt_runs_in_chunks_of_max_tokens_per_call(stories_shards, tmp_path):
    import json

    from edgectl.runtime.shards_runtime import ShardModel

    for f in stories_shards.iterdir():
        (tmp_path / f.name).symlink_to(f)
    (tmp_path / "manifest.json").unlink()
    d = json.loads((stories_shards / "manifest.json").read_text())
    d["max_tokens_per_call"] = 3
    (tmp_path / "manifest.json").write_text(json.dumps(d))
    whole = ShardModel(stories_shards).forward(PROMPT, 0, all_logits=True)
    chunked = ShardModel(tmp_path)
    got = chunked.forward(PROMPT, 0, all_logits=True)
    assert got.shape == whole.shape and _maxdiff(got, whole) < 1e-4
    chunked.reset()
    assert _maxdiff(chunked.forward(PROMPT, 0)[-1], whole[-1]) < 1e-4


@pytest.mark.real_model
@pytest.mark.slow
def test_logits_sink_hands_over_every_row_once_and_scores_as_the_whole(stories_shards):
    from edgectl.bench.bench_worker import model_chunk, window_nll
    from edgectl.util.scoring import nll_sum
    from edgectl.runtime.shards_runtime import ShardModel

    m = ShardModel(stories_shards)
    w = (PROMPT * 8)[: min(60, m.max_seq_len)]
    assert len(w) > 2 * ShardModel.SINK_ROWS  # several head calls per program call
    whole = m.forward(w, 0, all_logits=True)
    m.reset()
    rows = []
    assert m.forward(w, 0, all_logits=True, sink=lambda r, x: rows.append((r, x.copy()))) is None
    assert [r for r, _ in rows] == list(range(0, len(w), ShardModel.SINK_ROWS))
    got = np.concatenate([x for _, x in rows])
    assert got.shape == whole.shape and _maxdiff(got, whole) < 1e-5
    m.reset()
    assert window_nll(m, w, model_chunk(m)) == pytest.approx(nll_sum(whole, w), rel=1e-6)


@pytest.mark.real_model
@pytest.mark.slow
def test_plan_file_and_uniform_precision(stories_shards, tmp_path, capsys):
    import json

    from edgectl.cli.main import main
    from edgectl.util.errors import UsageError
    from edgectl.formats.manifest import Manifest
    from edgectl.runtime.planner import plan

    # a saved plan is followed as it is: same placements and precisions as printed
    p = _streamed_plan(stories_shards, "pipelined", {"layers.3"})
    f = tmp_path / "plan.json"
    f.write_text(p.to_json())
    capsys.readouterr()
    assert main(["run", str(stories_shards), "--plan-file", str(f), "-p", "Once upon a time", "-n", "4", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["plan"]["mode"] == "pipelined"
    assert {c["name"]: c["placement"] for c in out["plan"]["shards"]} == {c.name: c.placement for c in p.shards}
    # --precision restricts every shard to one precision; an unknown one is a usage error
    m = Manifest.load(stories_shards)
    assert {c.precision for c in plan(m, 1 << 40, mode="resident", precision="fp32").shards} == {"fp32"}
    with pytest.raises(UsageError):
        plan(m, 1 << 40, precision="int3")


@pytest.mark.real_model
@pytest.mark.slow
def test_context_plans_a_smaller_kv_cache_and_is_enforced(stories_shards):
    from edgectl.util.errors import EdgectlError
    from edgectl.runtime.plan import kv_cache_bytes
    from edgectl.runtime.shards_runtime import ShardModel

    full = ShardModel(stories_shards, budget=1 << 40)
    n = len(PROMPT) + 2
    short = ShardModel(stories_shards, budget=1 << 40, context=lambda tok: n)  # a function of the tokenizer, as `run` gives
    assert short.max_seq_len == n and short.plan.context == n and full.plan.context is None
    assert short.plan.kv_bytes == kv_cache_bytes(short.manifest, n) < full.plan.kv_bytes
    # the same logits: the context changes what is planned and allowed, not the computation
    assert _maxdiff(short.forward(PROMPT, 0, all_logits=True), full.forward(PROMPT, 0, all_logits=True)) == 0
    short.forward([1, 2], len(PROMPT))  # up to the context: fine
    with pytest.raises(EdgectlError, match="--ctx-size"):
        short.forward([3], n)


def _files(d: Path) -> dict:
    """Cache files by name: (size, mtime_ns, inode); temporary files included."""
    return {p.name: (p.stat().st_size, p.stat().st_mtime_ns, p.stat().st_ino) for p in d.iterdir()} if d.exists() else {}


@pytest.mark.real_model
@pytest.mark.slow
@pytest.mark.parametrize("mode", ["on-demand", "pipelined"])
def test_packed_weight_cache_same_outputs_and_reused(stories_shards, tmp_path, monkeypatch, capfd, mode):
    from edgectl.runtime import packed_cache
    from edgectl.runtime.shards_runtime import ShardModel

    streamed = {"layers.2", "layers.3", "layers.4", "head"}
    mapped = []  # cache files mapped in this process while each model was open
    read = []  # files the prefetcher read for the preload buffer

    def greedy():
        sm = ShardModel(stories_shards, plan=_streamed_plan(stories_shards, mode, streamed), engine="native")
        try:
            out = _greedy(sm)
            sm.prefetcher.join()
            read.append({Path(s.name).suffix for s in sm.trace.spans if s.lane == "read"})
            mapped.append({ln.split()[-1] for ln in open("/proc/self/maps") if ln.rstrip().endswith(".xpwc")})
            return out, dict(sm.engine.packed.stats) if sm.engine.packed else None
        finally:
            sm.close()

    monkeypatch.setenv("EDGECTL_PACKED_CACHE", "0")
    (ref_toks, ref_logits), stats = greedy()
    assert stats is None
    root = tmp_path / "packed"
    monkeypatch.setenv("EDGECTL_PACKED_CACHE", str(root))
    capfd.readouterr()
    (toks, logits), first = greedy()
    assert toks == ref_toks and all(arrays_equal(a, b) for a, b in zip(logits, ref_logits))
    d = packed_cache.default().root
    files = _files(d)
    # one complete file per program (5 layer shards and the head), none left half-written
    assert len(files) == 6 and all(n.endswith(".xpwc") and not n.startswith(".") for n in files), files
    assert all(packed_cache.trailer_ok(d / n) for n in files)
    assert first["writes"] == 6 and first["hits"] > 0  # streamed ones reloaded from their file at every call
    (toks2, logits2), second = greedy()
    assert toks2 == ref_toks and all(arrays_equal(a, b) for a, b in zip(logits2, ref_logits))
    second = {k: second[k] - first[k] for k in first}  # the process's cache: counts accumulate
    assert second["writes"] == 0 and second["uncached"] == 0 and second["hits"] >= 6, second
    assert _files(d) == files  # mapped, never rewritten
    # the resident shards' packed weights are the files' pages: the backend really used them
    # (other tests' models may still map files of the default directory)
    mine = [{Path(p).name for p in m if Path(p).parent == d} for m in mapped]
    assert mine[0] == set() and len(mine[2]) >= 2 and mine[2] <= set(files), mine
    # with the packed weights cached, the preload buffer's reads are the cache files, not the .pte files
    assert read[1] == {".pte"} and read[2] == {".xpwc"}, read
    err = capfd.readouterr().err
    assert "flock" not in err and "XNNWeightsCache" not in err and "packed weight" not in err, err


def arrays_equal(a, b) -> bool:
    """Same shape and the same values, bit for bit (numpy logits: np.array_equal)."""
    return a.shape == b.shape and np.array_equal(a, b)


@pytest.mark.real_model
@pytest.mark.slow
def test_packed_weight_cache_unwritable_dir_runs_uncached_with_one_warning(stories_shards, tmp_path, monkeypatch, capfd):
    from edgectl.runtime.shards_runtime import ShardModel

    plan = lambda: _streamed_plan(stories_shards, "pipelined", {"layers.3", "head"})  # noqa: E731
    monkeypatch.setenv("EDGECTL_PACKED_CACHE", "0")
    ref = _greedy(ShardModel(stories_shards, plan=plan(), engine="native"))
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("")
    monkeypatch.setenv("EDGECTL_PACKED_CACHE", str(blocker / "packed"))  # cannot be created
    capfd.readouterr()
    sm = ShardModel(stories_shards, plan=plan(), engine="native")
    toks, logits = _greedy(sm)
    assert toks == ref[0] and all(arrays_equal(a, b) for a, b in zip(logits, ref[1]))
    assert sm.engine.packed.stats["hits"] == sm.engine.packed.stats["writes"] == 0 < sm.engine.packed.stats["uncached"]
    sm.close()
    err = capfd.readouterr().err
    assert err.count("packed-weight cache off") == 1, err
    assert blocker.is_file()


@pytest.mark.real_model
@pytest.mark.slow
def test_packed_weight_cache_broken_or_leftover_files(stories_shards, tmp_path, monkeypatch):
    from edgectl.runtime import packed_cache
    from edgectl.formats.manifest import Manifest
    from edgectl.runtime.shards_runtime import ShardModel

    monkeypatch.setenv("EDGECTL_PACKED_CACHE", str(tmp_path / "packed"))
    pc = packed_cache.default()
    pc.root.mkdir(parents=True)
    sha = next(s.variants["fp32"].sha256 for s in Manifest.load(stories_shards).shards if s.name == "layers.3")
    broken = pc.path(sha)
    broken.write_bytes(b"\0" * 4096)  # a crash mid-write, or a foreign file: no trailer
    leftover = broken.with_name(f".{broken.name}.tmp-999999999-1")  # a dead writer's temporary file
    leftover.write_bytes(b"x")
    packed_cache._default.clear()
    plan = _streamed_plan(stories_shards, "on-demand", {"layers.3"})
    monkeypatch.setenv("EDGECTL_PACKED_CACHE", "0")
    ref = _greedy(ShardModel(stories_shards, plan=plan, engine="native"))
    monkeypatch.setenv("EDGECTL_PACKED_CACHE", str(tmp_path / "packed"))
    sm = ShardModel(stories_shards, plan=plan, engine="native")
    toks, logits = _greedy(sm)
    assert toks == ref[0] and all(arrays_equal(a, b) for a, b in zip(logits, ref[1]))
    assert not leftover.exists()
    assert packed_cache.trailer_ok(broken) and broken.stat().st_size > 4096  # rewritten whole, then reused
    assert sm.engine.packed.stats["writes"] == 6
    sm.close()


def test_kv_cache_reset_gives_pages_back_and_reads_zeros():
    from edgectl.model import ModelArgs
    from edgectl.runtime.runtime import KVCache

    def anon():
        for line in open("/proc/self/status"):
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) * 1024

    args = ModelArgs("llama", dim=64, n_layers=2, n_heads=4, n_kv_heads=4, head_dim=16, hidden_dim=128, vocab_size=32)
    a0 = anon()
    c = KVCache(args, 1 << 15, 2)  # 4 tensors of 4 * 16 * 32768 fp32 = 8 MiB each
    assert anon() - a0 < 4 << 20  # mapped, not yet written
    for t in c.k + c.v:
        t.fill(1.0)
    assert anon() - a0 >= 30 << 20
    c.reset()
    assert anon() - a0 < 4 << 20
    assert all(np.abs(t).sum() == 0 for t in c.k + c.v)


@pytest.mark.real_model
@pytest.mark.slow
@pytest.mark.parametrize("engine", ["native", "python"])
def test_shard_programs_read_only_the_filled_cache(stories_shards, engine, assert_reads_only_the_cache_window):
    """Resident layers (one chained native call, or Python calls) and streamed ones are
    handed the whole cache and read the positions up to the one they write, nothing past
    it."""
    from edgectl.runtime.shards_runtime import ShardModel

    streamed = {"layers.2", "head"}
    assert_reads_only_the_cache_window(
        ShardModel(stories_shards, plan=_streamed_plan(stories_shards, "on-demand", streamed), engine=engine),
        window=lambda p, S: p + 1)


def test_loader_reads_the_next_shard_ahead():
    """While a streamed shard loads (and then runs), the next one's file is already being
    read: one file ahead, in the loader's cyclic order."""
    from types import SimpleNamespace

    from edgectl.runtime.loader import Loader
    from edgectl.runtime.trace import Trace

    calls = []

    class Engine:
        def readahead(self, path):
            calls.append(("ahead", path))

        def load(self, path, streamed=False):
            calls.append(("load", path))
            return SimpleNamespace(free=lambda: None)

    loader = Loader(Engine(), [("a", "A"), ("b", "B"), ("c", "C")], Trace(), slots=1)
    for name in "abca":
        loader.done(loader.take(name))
    loader.close()
    assert calls[:8] == [("ahead", "B"), ("load", "A"), ("ahead", "C"), ("load", "B"),
                         ("ahead", "A"), ("load", "C"), ("ahead", "B"), ("load", "A")]


# ---------------------------------------------------------------------------------------
# Gemma 3: a shard set's embedding rows (read from the head's tied matrix) take sqrt(dim)


@pytest.fixture(scope="module")
def tiny_gemma3(tmp_path_factory, stories_dir):
    """A random 3-layer Gemma 3 (windows of 6 on two sliding layers) as a Hugging Face
    directory with stories260K's tokenizer, and transformers' model of it."""
    import shutil

    import torch

    transformers = pytest.importorskip("transformers")
    cfg = transformers.Gemma3TextConfig(
        hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
        head_dim=16, vocab_size=512, max_position_embeddings=256, sliding_window=6, bos_token_id=1, eos_token_id=2,
        pad_token_id=0, layer_types=["sliding_attention", "sliding_attention", "full_attention"])
    cfg.architectures = ["Gemma3ForCausalLM"]
    torch.manual_seed(0)
    hf = transformers.Gemma3ForCausalLM(cfg).eval()
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(torch.randn_like(p) * 0.3)
    d = tmp_path_factory.mktemp("gemma3") / "tiny"
    hf.save_pretrained(d)
    for f in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(stories_dir / f, d / f)
    return d, hf


@pytest.mark.parametrize("engine", ["native", "python"])
def test_gemma3_shard_set_matches_transformers(tiny_gemma3, tmp_path, engine):
    import torch

    from edgectl.runtime.shards_runtime import ShardModel
    from edgectl.shard.chain import ShardChain
    from helpers import build_shard_set

    d, hf = tiny_gemma3
    shards = build_shard_set(d, tmp_path / "shards", 64, ("fp32",))
    seq = [1] + [(37 * i) % 500 + 3 for i in range(19)]  # past the window of 6
    with torch.no_grad():
        ref = hf(torch.tensor([seq])).logits[0].numpy()
    sm = ShardModel(shards, budget=1 << 40, engine=engine)
    try:
        sm.reset()
        ours = np.concatenate([sm.forward(seq[:12], 0, all_logits=True)]
                              + [sm.forward([t], 12 + i, all_logits=True) for i, t in enumerate(seq[12:])])
    finally:
        sm.close()
    assert ours.shape == ref.shape and _maxdiff(ours, ref) < 1e-4
    chain = ShardChain(shards)  # what `shard` checks its figures with
    assert _maxdiff(chain.forward(seq, 0, all_logits=True).numpy(), ref) < 1e-4
