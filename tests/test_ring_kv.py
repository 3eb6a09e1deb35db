"""Sliding layers keep a ring of C = ring_len slots instead of a whole cache: the same
logits as transformers (which attends over the whole sequence) past several wraps, calls
that would wrap split by call_spans, and the planner charging C positions for them."""

from __future__ import annotations

import pytest
import torch

from edgectl.model_args import ModelArgs, cache_shapes, call_spans, ring_len

transformers = pytest.importorskip("transformers")

# W = 8, S = 64, chunk 4: C = 12 (8 + 4 - 1 rounded up to a multiple of 4)
GEMMA3_RING = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
                   num_key_value_heads=2, head_dim=16, vocab_size=128, max_position_embeddings=256,
                   rms_norm_eps=1e-6, sliding_window=8, query_pre_attn_scalar=16, bos_token_id=1, eos_token_id=2,
                   pad_token_id=0, layer_types=["sliding_attention", "full_attention", "sliding_attention"])
S, CHUNK, C = 64, 4, 12


def gemma3_hf():
    cfg = transformers.Gemma3TextConfig(**GEMMA3_RING)
    cfg.architectures = ["Gemma3ForCausalLM"]
    torch.manual_seed(0)
    model = transformers.Gemma3ForCausalLM(cfg).eval()
    with torch.no_grad():  # Gemma's norms start at w = 0 (scale 1 + w): make each one matter
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(torch.randn_like(p) * 0.3)
    return model


def ours(hf, max_seq_len=S):
    from edgectl.checkpoint.checkpoint import Checkpoint, load_model

    ckpt = Checkpoint("tiny", None, "hf", hf.config.to_dict(), "", {})
    ckpt.tensors = lambda: iter(hf.state_dict().items())
    return load_model(ckpt, max_seq_len)


# (start, tokens) of each forward call: aligned prefill chunks, one that would wrap the
# ring (9..14 crosses slot 12), decode steps past several wraps, a chunk of 4 from an
# unaligned start (wraps at 36), then decode again
SCHEDULE = [(0, 4), (4, 4), (8, 1), (9, 6), *[(p, 1) for p in range(15, 33)], (33, 4), (37, 3),
            *[(p, 1) for p in range(40, 60)]]


def ring_logits(model, ids, chunk=CHUNK):
    """Logits of every position of ids, fed by SCHEDULE through ring caches, each call
    split as the runtime splits it (call_spans)."""
    k, v = model.empty_caches(chunk)
    ring = ring_len(model.args, model.max_seq_len, chunk)
    out = []
    for start, T in SCHEDULE:
        for i, n in call_spans(start, T, chunk or model.max_seq_len, ring):
            a = start + i
            out.append(model(torch.tensor([ids[a : a + n]]), torch.arange(a, a + n), torch.arange(n), k, v)[0])
    return torch.cat(out), k


def test_ring_len_and_shapes():
    args = ModelArgs.from_hf_config(gemma3_hf().config.to_dict())
    assert ring_len(args, S, CHUNK) == C
    assert ring_len(args, S) == S and ring_len(args, 10, CHUNK) == 10  # whole caches: no ring
    assert ring_len(args, 2048, 1) == 8 and ring_len(args, 2048, 128) == 256
    shapes = cache_shapes(args, S, CHUNK)
    assert [k[1] for k, _ in shapes] == [C, S, C] and all(k == v for k, v in shapes)
    assert [k[1] for k, _ in cache_shapes(args, S)] == [S, S, S]
    # Gemma 3 270M: W 512, prefill chunks of 128 -> 640 slots
    g = ModelArgs.from_dict({**args.to_dict(), "sliding_window": 512})
    assert ring_len(g, 2048, 128) == 640 and ring_len(g, 600, 128) == 600
    llama = ModelArgs("LlamaForCausalLM", 64, 2, 4, 2, 16, 96, 128)
    assert ring_len(llama, S, CHUNK) is None and cache_shapes(llama, S, CHUNK) == cache_shapes(llama, S)


def test_call_spans():
    assert call_spans(0, 10, 4, None) == [(0, 4), (4, 4), (8, 2)]
    assert call_spans(9, 6, 4, 12) == [(0, 3), (3, 3)]  # 9..11, then 12..14 from slot 0
    assert call_spans(0, 24, 4, 12) == [(0, 4), (4, 4), (8, 4), (12, 4), (16, 4), (20, 4)]
    assert call_spans(11, 1, 4, 12) == [(0, 1)]
    for start in range(30):
        for T in range(1, 15):
            spans = call_spans(start, T, 4, 12)
            assert sum(n for _, n in spans) == T and all(n <= 4 and (start + i) % 12 + n <= 12 for i, n in spans)


def test_ring_matches_transformers_past_wraps():
    hf = gemma3_hf()
    model = ours(hf)
    ids = torch.randint(3, 128, (60,), generator=torch.Generator().manual_seed(1)).tolist()
    with torch.no_grad():
        ref = hf(torch.tensor([ids])).logits[0]
        got, k = ring_logits(model, ids)
    assert [t.shape[1] for t in k] == [C, S, C]
    assert got.shape == ref.shape
    assert (got - ref).abs().max() < 1e-4
    # the whole-cache path (chunk None: C = S) agrees too
    with torch.no_grad():
        whole, kw = ring_logits(model, ids, chunk=None)
    assert [t.shape[1] for t in kw] == [S, S, S] and (whole - ref).abs().max() < 1e-4


def test_a_call_that_would_wrap_is_refused():
    model = ours(gemma3_hf())
    k, v = model.empty_caches(CHUNK)
    with torch.no_grad():
        model(torch.tensor([[5] * 4]), torch.arange(4), torch.arange(1), k, v)
        model(torch.tensor([[5] * 4]), torch.arange(4, 8), torch.arange(1), k, v)
        model(torch.tensor([[5] * 2]), torch.arange(8, 10), torch.arange(1), k, v)
        with pytest.raises(Exception):  # 10..13 would cross slot 12: call_spans splits it
            model(torch.tensor([[5] * 4]), torch.arange(10, 14), torch.arange(1), k, v)


def save_hf(hf, d, stories_dir):
    import shutil

    hf.save_pretrained(d)
    for f in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(stories_dir / f, d / f)
    return d


def eager_greedy(model, prompt, n):
    """Greedy tokens after `prompt`, through whole caches (no ring), one call per token."""
    k, v = model.empty_caches()
    seq = list(prompt)
    with torch.no_grad():
        logits = model(torch.tensor([seq]), torch.arange(len(seq)), torch.tensor([len(seq) - 1]), k, v)[0, -1]
        while len(seq) < len(prompt) + n:
            seq.append(int(logits.argmax()))
            p = len(seq) - 1
            logits = model(torch.tensor([seq[-1:]]), torch.tensor([p]), torch.tensor([0]), k, v)[0, -1]
    return seq[len(prompt):]


def test_pte_ring_greedy_matches_eager(tmp_path, stories_dir):
    """The exported program takes [1, C, KV, D] rings for its sliding layers; greedy tokens
    through edgectl's runtime past 4 wraps equal the eager model's over whole caches, and a
    multi-token call that would wrap the ring (split by the runtime) gives transformers' logits."""
    import numpy as np

    from edgectl.checkpoint.checkpoint import resolve
    from edgectl.lower.export import export_pte
    from edgectl.runtime.runtime import PteModel

    hf = gemma3_hf()
    ckpt = resolve(str(save_hf(hf, tmp_path / "m", stories_dir)))
    out = tmp_path / "m.pte"
    export_pte(ckpt, out, backend="xnnpack", max_seq_len=S, prefill_chunk=CHUNK)
    model = PteModel(out)
    assert model.meta["kv_ring"] == C and model.ring == C
    assert [k.shape[1] for k in model.k] == [C, S, C]
    prompt = [1, 17, 93, 5, 44, 120]
    n = S - len(prompt)  # 58 tokens: past 4 wraps of 12 slots
    want = eager_greedy(ours(hf), prompt, n)
    got, logits = [], model.forward(prompt, 0)  # 4 + 2 tokens
    while len(got) < n:
        got.append(int(np.argmax(logits[-1])))
        if len(prompt) + len(got) < S:
            logits = model.forward(got[-1:], len(prompt) + len(got) - 1)
    assert got == want and len(set(got)) > 3
    # calls of 3 tokens from position 1 on (as a speculative verify makes them): 10..12 crosses the
    # ring's end (10, 11 at slots 10, 11; 12 at slot 0), so do 22..24, 34..36, 46..48
    ids = torch.randint(3, 128, (S,), generator=torch.Generator().manual_seed(3)).tolist()
    with torch.no_grad():
        ref = hf(torch.tensor([ids])).logits[0].numpy()
    model.reset()
    calls, call = [], model._call
    model._call = lambda toks, start, all_logits: calls.append((start, len(toks))) or call(toks, start, all_logits)
    rows = [model.forward(ids[:1], 0, all_logits=True)]
    rows += [model.forward(ids[a : a + 3], a, all_logits=True) for a in range(1, 61, 3)]
    rows.append(model.forward(ids[61:], 61, all_logits=True))
    assert np.abs(np.concatenate(rows) - ref).max() < 1e-4
    assert {(10, 2), (12, 1), (22, 2), (24, 1)} <= set(calls) and all(a % C + n <= C for a, n in calls)
    model.close()


@pytest.mark.parametrize("engine", ["native", "python"])
def test_shard_set_rings_match_transformers(tmp_path, stories_dir, engine):
    """A shard set of programs of 4 tokens per call (two layers per shard: a sliding and a
    global layer in one program) runs past several wraps of its 12-slot rings, with calls
    the runtime splits at the ring's end, natively chained and one program at a time."""
    import numpy as np

    from edgectl.runtime.plan import kv_cache_bytes
    from edgectl.runtime.shards_runtime import ShardModel
    from edgectl.shard.chain import ShardChain
    from helpers import build_shard_set

    hf = gemma3_hf()
    shards = build_shard_set(save_hf(hf, tmp_path / "m", stories_dir), tmp_path / "shards", S, ("fp32",),
                             layers_per_shard=2, chunk=CHUNK)
    ids = torch.randint(3, 128, (60,), generator=torch.Generator().manual_seed(4)).tolist()
    with torch.no_grad():
        ref = hf(torch.tensor([ids])).logits[0].numpy()
    sm = ShardModel(shards, budget=1 << 40, engine=engine)
    try:
        assert [k.shape[1] for k in sm.k] == [C, S, C] and sm.ring == C
        # a slot is 2 heads x 16 x 4 bytes = 128: a ring (1536 bytes) takes one page, a whole cache two
        assert kv_cache_bytes(sm.manifest) == 2 * (4096 + 8192 + 4096)
        ours = np.concatenate([sm.forward(ids[a : a + n], a, all_logits=True) for a, n in
                               [(0, 5), (5, 6), *[(p, 1) for p in range(11, 30)], (30, 7), (37, 23)]])
    finally:
        sm.close()
    assert ours.shape == ref.shape and np.abs(ours - ref).max() < 1e-4
    chain = ShardChain(shards)  # what `shard` checks its figures with
    assert [k.shape[1] for k in chain.k] == [C, S, C]
    got = np.concatenate([chain.forward(ids[:9], 0, all_logits=True).numpy(),
                          chain.forward(ids[9:], 9, all_logits=True).numpy()])
    assert np.abs(got - ref).max() < 1e-4


def test_kv_cache_bytes_charges_rings_by_hand():
    """Gemma 3 270M's shape (18 layers, every 6th global; 1 KV head of 256: 1 KiB a
    position, K or V) at max_seq_len 2048, programs of 128 tokens: a ring of 640 slots."""
    from edgectl.formats.manifest import Manifest
    from edgectl.runtime.plan import kv_cache_bytes

    types = ["full_attention" if (i + 1) % 6 == 0 else "sliding_attention" for i in range(18)]
    model = dict(architecture="Gemma3ForCausalLM", dim=640, n_layers=18, n_heads=4, n_kv_heads=1, head_dim=256,
                 hidden_dim=2048, vocab_size=262144, layer_types=types, sliding_window=512)

    def manifest(chunk, model=model):
        return Manifest("0", {}, model, 2048, "xnnpack", ["fp32"], "tokenizer.json", {}, [], max_tokens_per_call=chunk)

    KiB = 1024
    assert kv_cache_bytes(manifest(128)) == 15 * 2 * 640 * KiB + 3 * 2 * 2048 * KiB == 32_243_712
    assert kv_cache_bytes(manifest(128), 100) == 18 * 2 * 100 * KiB  # below the ring: what is written
    assert kv_cache_bytes(manifest(128), 1000) == 15 * 2 * 640 * KiB + 3 * 2 * 1000 * KiB
    assert kv_cache_bytes(manifest(1)) == 15 * 2 * 512 * KiB + 3 * 2 * 2048 * KiB  # one token per call: C = W
    assert kv_cache_bytes(manifest(None)) == 18 * 2 * 2048 * KiB == 75_497_472  # no chunk: whole caches
    llama = {k: v for k, v in model.items() if k not in ("layer_types", "sliding_window")}
    assert kv_cache_bytes(manifest(128, llama)) == 18 * 2 * 2048 * KiB


def test_old_layouts_refused_for_sliding_models_only(tmp_path):
    """A sliding model's program or shard set from before the rings is refused in one line
    (re-export); a model without sliding layers keeps its artifacts (the same programs)."""
    import json

    from edgectl.formats.manifest import SCHEMA_VERSION, Manifest
    from edgectl.model_args import KV_LAYOUT, KV_LAYOUT_FULL, kv_layout_ok
    from edgectl.util.errors import EdgectlError

    gemma = ModelArgs.from_hf_config(gemma3_hf().config.to_dict())
    llama = ModelArgs("LlamaForCausalLM", 64, 2, 4, 2, 16, 96, 128)
    assert kv_layout_ok(KV_LAYOUT, gemma) and kv_layout_ok(KV_LAYOUT, llama)
    assert kv_layout_ok(KV_LAYOUT_FULL, llama) and not kv_layout_ok(KV_LAYOUT_FULL, gemma)
    assert not kv_layout_ok(None, llama) and not kv_layout_ok("bskd-window/1", llama)

    for args, ok in ((llama, True), (gemma, False)):
        d = tmp_path / args.architecture
        d.mkdir()
        Manifest("0", {}, args.to_dict(), 64, "xnnpack", ["fp32"], "tokenizer.json", {}, []).save(d)
        m = json.loads((d / "manifest.json").read_text())
        assert m["schema_version"] == SCHEMA_VERSION == 4
        (d / "manifest.json").write_text(json.dumps({**m, "schema_version": 3}))
        if ok:
            assert ModelArgs.from_dict(Manifest.load(d).model) == args
        else:
            with pytest.raises(EdgectlError, match="schema 3 is not 4") as e:
                Manifest.load(d)
            assert "\n" not in str(e.value) and "re-run `edgectl shard`" in e.value.hint


def test_pte_with_whole_caches_of_a_sliding_model_is_refused(tmp_path, stories_dir, monkeypatch):
    import json

    from edgectl.checkpoint.checkpoint import resolve
    from edgectl.lower.export import export_pte
    from edgectl.runtime import runtime
    from edgectl.util.errors import EdgectlError

    out = tmp_path / "m.pte"
    export_pte(resolve(str(save_hf(gemma3_hf(), tmp_path / "m", stories_dir))), out, max_seq_len=S, prefill_chunk=CHUNK)
    real = runtime.constant_bytes

    def old_meta(path, name):
        data = real(path, name)
        if name == "edgectl_meta":
            data = json.dumps({**json.loads(data), "kv_layout": "bskd-inplace/1"}).encode()
        return data

    monkeypatch.setattr(runtime, "constant_bytes", old_meta)
    with pytest.raises(EdgectlError, match="older edgectl") as e:
        runtime.PteModel(out)
    assert "\n" not in str(e.value) and "re-export" in e.value.hint


def test_stock_form_keeps_whole_caches(tmp_path, stories_dir):
    """The stock-runner form keeps [1, S, KV, D] buffers inside the program for every
    layer (a ring of S slots never wraps): transformers' logits, one token per call."""
    import numpy as np

    from edgectl.checkpoint.checkpoint import resolve
    from edgectl.lower.export import export_pte
    from edgectl.runtime.runtime import open_pte

    hf = gemma3_hf()
    out = tmp_path / "s.pte"
    export_pte(resolve(str(save_hf(hf, tmp_path / "m", stories_dir))), out, max_seq_len=32, prefill_chunk=CHUNK,
               interface="stock")
    ids = torch.randint(3, 128, (30,), generator=torch.Generator().manual_seed(5)).tolist()
    with torch.no_grad():
        ref = hf(torch.tensor([ids])).logits[0].numpy()
    model = open_pte(out)
    try:
        last = model.forward(ids[:10], 0)  # prefill in chunks of 4
        rest = model.forward(ids[10:], 10, all_logits=True)
    finally:
        model.close()
    assert np.abs(last[-1] - ref[9]).max() < 1e-4 and np.abs(rest - ref[10:]).max() < 1e-4


def test_edgectl_shard_builds_rings(tmp_path, stories_dir, monkeypatch):
    """`shard` itself (programs of 4 tokens per call, measured through the native shim with
    ring-sized caches) makes a set that `run` reads with rings: transformers' logits."""
    import numpy as np

    from edgectl.checkpoint.checkpoint import resolve
    from edgectl.formats.manifest import Manifest
    from edgectl.runtime.shards_runtime import ShardModel
    from edgectl.shard.shard import ShardSettings, shard_model

    monkeypatch.setenv("EDGECTL_CACHE", str(tmp_path / "cache"))
    hf = gemma3_hf()
    out = tmp_path / "shards"
    shard_model(resolve(str(save_hf(hf, tmp_path / "m", stories_dir))), out,
                ShardSettings(("fp32",), max_seq_len=S, chunk=CHUNK, jobs=1, verify=0))
    m = Manifest.load(out)
    assert m.max_tokens_per_call == CHUNK
    # a decode step of each layer program timed with its own caches' shapes (shard_measure)
    assert all(v.extra.get("compute_ms", 0) > 0 for sh in m.shards if sh.kind == "layers" for v in sh.variants.values())
    ids = torch.randint(3, 128, (50,), generator=torch.Generator().manual_seed(6)).tolist()
    with torch.no_grad():
        ref = hf(torch.tensor([ids])).logits[0].numpy()
    sm = ShardModel(out, budget=1 << 40)
    try:
        assert [k.shape[1] for k in sm.k] == [C, S, C]
        ours = np.concatenate([sm.forward(ids[:7], 0, all_logits=True)]
                              + [sm.forward([t], 7 + i, all_logits=True) for i, t in enumerate(ids[7:])])
    finally:
        sm.close()
    assert np.abs(ours - ref).max() < 1e-4
    # a manifest that says otherwise than its programs about what sizes the rings: damaged
    import json

    from edgectl.util.errors import EdgectlError

    for key, value in (("max_tokens_per_call", 8), ("sliding_window", 6)):
        raw = json.loads((out / "manifest.json").read_text())
        d = tmp_path / f"bad-{key}"
        d.mkdir()
        for f in out.iterdir():
            (d / f.name).symlink_to(f)
        (d / "manifest.json").unlink()
        if key in raw:
            raw[key] = value
        else:
            raw["model"][key] = value
        (d / "manifest.json").write_text(json.dumps(raw))
        with pytest.raises(EdgectlError, match=f"damaged: it records {key} {value}"):
            ShardModel(d, budget=1 << 40).close()


def test_ring_track():
    from edgectl.model_args import RingTrack
    from edgectl.util.errors import EdgectlError

    t = RingTrack(12, 8)  # back 5 positions at most
    assert t.max_rewind == 5
    t.check(0, 4)
    t.check(4, 4)
    t.check(3, 5)  # back 5 (3..7 again)
    with pytest.raises(EdgectlError, match="went back 6 positions, at most 5") as e:
        t.check(2, 1)
    assert "\n" not in str(e.value)
    t.check(0, 1)  # from 0 again: anything
    assert t.end == 0
    t.check(1, 20)
    t.check(16, 1)
    t.reset()
    t.check(5, 1)  # forward of the last one written: not going back


@pytest.fixture(scope="module")
def ring_pte(tmp_path_factory, stories_dir):
    from edgectl.checkpoint.checkpoint import resolve
    from edgectl.lower.export import export_pte

    hf = gemma3_hf()
    d = tmp_path_factory.mktemp("ringpte")
    out = d / "m.pte"
    export_pte(resolve(str(save_hf(hf, d / "m", stories_dir))), out, max_seq_len=S, prefill_chunk=CHUNK)
    return out, hf


def test_going_back_within_max_rewind_keeps_the_window(ring_pte):
    """Re-feeding from 5 positions back (other tokens, as after rejected drafts) gives
    transformers' logits of the new sequence; from 6 back the ring has lost a position the
    window needs: refused, and indeed wrong if not refused."""
    import numpy as np

    from edgectl.runtime.runtime import PteModel
    from edgectl.util.errors import EdgectlError

    path, hf = ring_pte
    a = torch.randint(3, 128, (40,), generator=torch.Generator().manual_seed(7)).tolist()
    b = [(t * 7 + 1) % 125 + 3 for t in a]
    model = PteModel(path)
    assert model.max_rewind == C - 8 + 1 == 5
    for back, ok in ((5, True), (6, False)):
        model.reset()
        for p in range(30):
            model.forward(a[p : p + 1], p)
        s = 30 - back
        seq = a[:s] + b[s:]
        with torch.no_grad():
            ref = hf(torch.tensor([seq])).logits[0].numpy()
        if not ok:
            with pytest.raises(EdgectlError, match="went back 6"):
                model.forward(seq[s:], s, all_logits=True)
            model.track = None  # what the rings would give without the check: not the window
        got = model.forward(seq[s:], s, all_logits=True)
        assert (np.abs(got - ref[s:]).max() < 1e-4) == ok
    model.close()


def test_speculative_over_rings_is_the_target_alone(ring_pte):
    """Greedy speculative decoding with a sliding target: K is capped at max_rewind, and the
    tokens are the target's alone, with drafts rejected along the way."""
    from edgectl.runtime.generate import generate
    from edgectl.runtime.runtime import PteModel
    from edgectl.runtime.speculative import LookupDraft, ModelDraft, speculative_generate

    path, _ = ring_pte
    target = PteModel(path)
    prompt = [1, 17, 93, 5, 44, 120, 17, 93]
    alone = generate(target, prompt, 50, ()).tokens
    stats = []
    for draft in (LookupDraft(2), ModelDraft(PteModel(path), "self")):
        calls = []
        fwd = target.forward
        target.forward = lambda toks, start, all_logits=False: calls.append(len(toks)) or fwd(toks, start, all_logits)
        st = speculative_generate(target, draft, prompt, 50, (), k=9)
        target.forward = fwd
        assert st.tokens == alone
        assert max(calls[1:]) <= 1 + 5  # the last token and at most max_rewind drafts
        stats.append((st, max(calls[1:])))
    (look, _), (own, widest) = stats
    assert look.accepted < look.proposed  # lookup: drafts rejected, the target went back
    assert own.accepted == own.proposed > 0 and widest == 1 + 5  # the target as its own draft: all kept, K capped
