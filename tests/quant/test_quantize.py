"""Quantize stage: codes, records, the checkpoint directory, and the exported .pte.

Exports use stories260K (dim 64, MLP 172 wide: the width no group size of 32 divides),
so the whole module runs in a few minutes on two cores.
"""

from __future__ import annotations

import json
import logging

import pytest
import torch

from edgectl.util.errors import EdgectlError, UsageError
from edgectl.quant.scheme import QuantScheme
from edgectl.quant.weights import codes_asym4, codes_int4, pick_group, quantize_module
from edgectl.quant.quant_modules import pack4, unpack4

logging.getLogger("torchao").setLevel(logging.ERROR)


# ---------------------------------------------------------------------------------------
# Pure functions


def test_pack4_roundtrip_and_nibble_order():
    u = torch.randint(0, 16, (3, 8), dtype=torch.uint8)
    p = pack4(u)
    assert p.shape == (3, 4)
    assert torch.equal(unpack4(p), u)
    assert int(p[0, 0]) == int(u[0, 0]) | (int(u[0, 1]) << 4)  # low nibble = even column (XNNPACK's order)


def test_pick_group():
    assert pick_group(576, 32) == (32, None)
    g, note = pick_group(576, 128)  # 576 = 4.5 * 128; 96 is the largest multiple of 32 dividing it
    assert g == 96 and "576" in note
    g, note = pick_group(172, 32)
    assert g is None and "172" in note and "8-bit" in note


def test_asym4_is_exact_on_a_q4_1_grid():
    # Weights on a Q4_1 grid (w = d*q + m per group of 32) come back to bf16 precision of d.
    torch.manual_seed(0)
    d = torch.rand(16, 4, 1) * 0.01 + 0.001
    m = -torch.rand(16, 4, 1) * 0.05
    q = torch.randint(0, 16, (16, 4, 32)).float()
    q[..., 0], q[..., 1] = 0, 15  # the grid's min and max occur, as llama.cpp's quantizer guarantees
    w = (d * q + m).view(16, 128)
    packed, s, c = codes_asym4(w, 32)
    u = unpack4(packed).float().view(16, 4, 32)
    back = (s.unsqueeze(-1) * (u - 8) + c.unsqueeze(-1)).view(16, 128)
    assert torch.equal(u, q)
    err = (back - w).view(16, 4, 32).abs().amax(-1, keepdim=True)
    # bf16 scale rounding only (relative 2^-9, times |u - 8| <= 8, on both sides of the
    # refitted offset): far below a quantization step d
    assert (err / d).max() < 16 * 2**-9 * 1.05
    sym_codes, sym_scales = codes_int4(w, 32)
    sym = (sym_codes.float().view(16, 4, 32) * sym_scales.unsqueeze(-1)).view(16, 128)
    assert (sym - w).abs().max() > 10 * (back - w).abs().max()  # symmetric int4 cannot represent it


def test_scheme_validation():
    with pytest.raises(UsageError, match="unknown scheme"):
        QuantScheme("int3")
    with pytest.raises(UsageError, match="unknown embedding"):
        QuantScheme("int8", embedding="fp8")
    with pytest.raises(UsageError, match="multiple of 32"):
        QuantScheme("8da4w", group_size=48)


def _tiny(tie: bool = True, hidden: int = 172):
    from edgectl.model import ModelArgs, Transformer

    args = ModelArgs("LlamaForCausalLM", dim=64, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=16,
                     hidden_dim=hidden, vocab_size=96, tie_embeddings=tie)
    torch.manual_seed(0)
    m = Transformer(args, 32)
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(0, 0.05)
    return m.eval()


def test_group_size_that_divides_nothing_is_an_error():
    with pytest.raises(UsageError, match="divides none"):
        quantize_module(_tiny(hidden=96), QuantScheme("8da4w", group_size=128))


@pytest.mark.parametrize("mapping,linear,emb", [("asymmetric", "a4w", "emb_a4"), ("symmetric", "8da4w", "emb_int4")])
def test_record_names_the_172_wide_linear_and_the_tied_head(mapping, linear, emb):
    m = _tiny()
    ref = m.head.lm_head.weight.detach().clone()
    rec = quantize_module(m, QuantScheme("8da4w", 32, "int4", 32, mapping=mapping))
    w = rec["weights"]
    assert w["layers.0.mlp.down_proj"]["form"] == "8da8w"
    assert "172" in w["layers.0.mlp.down_proj"]["note"]
    assert w["layers.0.mlp.up_proj"] == {**w["layers.0.mlp.up_proj"], "form": linear, "group_size": 32}
    assert w["embed.embed_tokens"]["form"] == emb
    assert w["head.lm_head"]["tied_to"] == "embed.embed_tokens" and w["head.lm_head"]["form"] == linear
    assert set(rec["runs_as"]) == {linear, "8da8w", emb}
    json.dumps(rec)  # serialisable
    # the embedding's rows are the head's matrix: one set of codes, two views of it
    x = torch.eye(64).unsqueeze(0)
    with torch.no_grad():
        head_w = m.head.lm_head(x)[0].T  # [vocab, dim]; the activation quantization of an identity is exact
        rows = m.embed(torch.arange(96).unsqueeze(0))[0]
    assert torch.allclose(head_w, rows, atol=1e-5)
    assert 0 < (rows - ref).abs().max() < 0.05 * ref.abs().max() * 4


def test_quantized_block_alone():
    # What `edgectl shard` does: one decoder layer.
    m = _tiny()
    rec = quantize_module(m.layers[1], QuantScheme("int8"))
    assert {v["form"] for v in rec["weights"].values()} == {"8da8w"}
    assert "self_attn.q_proj" in rec["weights"]


# ---------------------------------------------------------------------------------------
# Checkpoint directory and export (stories260K)


@pytest.fixture(scope="module")
def quantized_dirs(tmp_path_factory, stories_dir, corpus_dir):
    from edgectl.checkpoint.checkpoint import resolve
    from edgectl.quant.quantize import quantize_checkpoint

    root = tmp_path_factory.mktemp("q")
    out = {}
    schemes = {"8da4w": QuantScheme("8da4w", 32, "int4", 32), "4w": QuantScheme("4w", 32, "int8", 32),
               "8da4w-sym": QuantScheme("8da4w", 32, "int4", 32, mapping="symmetric"),
               "int8-sq": QuantScheme("int8", 32, "int8", 32, smoothquant=True)}  # calibrated on the built-in paragraph
    for name, scheme in schemes.items():
        res = quantize_checkpoint(resolve(str(stories_dir)), root / name, scheme,
                                  corpus_dir / "tinystories-valid-40.txt", 256)
        out[name] = res
    return out


def test_checkpoint_roundtrip_and_record(quantized_dirs, stories_dir):
    from edgectl.checkpoint.checkpoint import resolve, load_model
    from edgectl.quant.quant_checkpoint import load_quantized_model

    res = quantized_dirs["8da4w"]
    ck = resolve(res.path)
    assert ck.quantization["scheme"]["linear"] == "8da4w"
    assert ck.quantization["source"]["model"] == str(stories_dir)
    assert ck.quantization["versions"]["torchao"]
    assert "172" in ck.quantization["weights"]["layers.0.mlp.down_proj"]["note"]
    assert res.bytes < 0.4 * (stories_dir / "model.safetensors").stat().st_size  # codes, not fp32
    model, _ = load_quantized_model(ck, 64)
    ref = load_model(resolve(str(stories_dir)), 64)
    toks = torch.randint(0, 512, (1, 12))
    with torch.no_grad():
        a = model(toks, torch.arange(12), torch.arange(12), *model.empty_caches())[0]
        b = ref(toks, torch.arange(12), torch.arange(12), *ref.empty_caches())[0]
    assert (a - b).abs().max() > 0  # quantized
    assert torch.nn.functional.cosine_similarity(a.flatten(), b.flatten(), dim=0) > 0.95
    acc = res.accuracy
    assert acc["tokens_scored"] > 200 and acc["kl_mean"] > 0


def test_requantizing_is_refused(quantized_dirs):
    from edgectl.checkpoint.checkpoint import resolve
    from edgectl.quant.quantize import quantize_checkpoint

    with pytest.raises(EdgectlError, match="already quantized"):
        quantize_checkpoint(resolve(quantized_dirs["4w"].path), quantized_dirs["4w"].path, QuantScheme("int8"))


@pytest.mark.parametrize("name", ["8da4w", "4w", "8da4w-sym", "int8-sq"])
def test_export_parity_delegation_and_tied_matrix_once(quantized_dirs, name, tmp_path):
    from edgectl.checkpoint.checkpoint import resolve
    from edgectl.lower.export import export_pte
    from edgectl.formats.ptefile import named_data
    from edgectl.quant.quant_checkpoint import load_quantized_model
    from edgectl.runtime.runtime import PteModel

    ck = resolve(quantized_dirs[name].path)
    res = export_pte(ck, tmp_path / "m.pte", max_seq_len=64)
    left = res.ops["non_delegated"]
    assert not [op for op in left if any(s in op for s in ("linear", "mm", "addmm", "quantize", "choose_qparams"))], left
    pte = PteModel(res.path)
    spec = pte.meta["embedding_input"]
    emb_form = ck.quantization["weights"]["embed.embed_tokens"]["form"]
    assert spec is not None and len(spec["tensors"]) == (3 if emb_form == "emb_a4" else 2)  # codes, scales[, offsets]
    blobs = named_data(res.path)
    # the tied matrix's codes exist once, as the head's XNNPACK blob the embedding reads
    v, d = ck.args.vocab_size, ck.args.dim
    code_bytes = v * d // (2 if ck.quantization["weights"]["embed.embed_tokens"]["bits"] == 4 else 1)
    assert blobs[spec["tensors"][0]["key"]][1] >= code_bytes
    assert sum(1 for _, size in blobs.values() if size >= code_bytes) == 1
    from edgectl.formats.ptefile import _program, constant_bytes

    # and no second copy among the program's own constants (there: metadata, tokenizer, norms)
    prog, _ = _program(res.path)
    other = len(constant_bytes(res.path, "edgectl_meta")) + len(constant_bytes(res.path, "edgectl_tokenizer"))
    assert prog.segments[prog.constant_segment[0]][1] - other < code_bytes
    model, _ = load_quantized_model(ck, 64)
    # Dynamic int8 activation quantization rounds each token's activations; a rounding tie
    # that XNNPACK and eager break differently moves one code by one step, and on this
    # tiny model that moves later logits by up to ~0.3 (eager alone does the same under a
    # 1e-6 relative perturbation of its input, measured). So: most positions exact, every
    # position close, the greedy choice almost always the same. Wrong codes, scales or
    # offsets miss all three by far.
    exact = close = agree = total = 0
    for seed in range(8):
        toks = torch.randint(0, v, (20,), generator=torch.Generator().manual_seed(seed)).tolist()
        with torch.no_grad():
            ref = model(torch.tensor([toks]), torch.arange(20), torch.arange(20), *model.empty_caches())[0]
        out = torch.from_numpy(pte.forward(toks, 0, all_logits=True))  # the runtime's numpy logits
        err = (out - ref).abs().amax(-1)
        exact += int((err < 1e-3 * ref.abs().max()).sum())
        close += int((err < 0.05 * ref.abs().max()).sum())
        agree += int((out.argmax(-1) == ref.argmax(-1)).sum())
        total += len(toks)
    assert exact >= 0.6 * total and close == total and agree >= 0.9 * total, (exact, close, agree, total)
    step = pte.forward([toks[0]], 20)
    assert step.shape == (1, v)


def test_cli_errors(stories_dir, tmp_path):
    from typer.testing import CliRunner

    from edgectl.cli.main import main

    assert main(["quantize", str(stories_dir), "-o", str(tmp_path / "x"), "--scheme", "int3"]) == 2
    assert main(["quantize", str(stories_dir), "-o", str(tmp_path / "x"), "--scheme", "8da4w", "--group-size", "100"]) == 2
    assert main(["quantize", str(stories_dir), "-o", str(tmp_path / "x"), "--scheme", "8da4w", "--group-size", "128"]) == 2
    assert not (tmp_path / "x").exists()
    assert main(["export", str(stories_dir), "-o", str(tmp_path / "x.pte"), "--embedding", "int8"]) == 2
    assert main(["export", str(stories_dir), "-o", str(tmp_path / "x.pte"), "--calibration", str(tmp_path / "t.txt")]) == 2
    assert main(["quantize", str(stories_dir), "-o", str(tmp_path / "x"), "--scheme", "8da4w", "--smoothquant"]) == 2
    assert main(["quantize", str(stories_dir), "-o", str(tmp_path / "x"), "--scheme", "int8", "--smooth-alpha", "1"]) == 2
    assert not (tmp_path / "x").exists() and not (tmp_path / "x.pte").exists()
    r = CliRunner().invoke(__import__("edgectl.cli.main", fromlist=["app"]).app, ["quantize", "--help"])
    assert r.exit_code == 0 and "--scheme" in r.output


def test_4w_is_8da4w_asymmetric():
    # XNNPACK has no fp32 x 4-bit groupwise kernel: 4w runs as 8da4w with the asymmetric
    # mapping, the same modules from the same codes (so the same program).
    a, b = _tiny(), _tiny()
    ra = quantize_module(a, QuantScheme("4w", 32, "int4", 32))
    rb = quantize_module(b, QuantScheme("8da4w", 32, "int4", 32, mapping="asymmetric"))
    assert ra["weights"] == rb["weights"]
    toks = torch.arange(12).unsqueeze(0)
    with torch.no_grad():
        la = a(toks, torch.arange(12), torch.arange(12), *a.empty_caches())[0]
        lb = b(toks, torch.arange(12), torch.arange(12), *b.empty_caches())[0]
    assert torch.equal(la, lb)


# ---------------------------------------------------------------------------------------
# SmoothQuant (int8)


def _with_outliers(m):
    """Norm weights with a few large channels, as trained models have (the case smoothing is for)."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for blk in m.layers:
            for norm in (blk.input_layernorm, blk.post_attention_layernorm):
                norm.weight.copy_(1 + torch.rand(norm.weight.shape, generator=g))
                norm.weight[::13] *= 20
    return m


def _prefill_then_decode(m, toks: list[int], split: int):
    """Logits of a prefill of toks[:split] and then one decode step per remaining token,
    through the external caches (so smoothed V entries are read back from the cache)."""
    ks, vs = m.empty_caches()
    out = []
    with torch.no_grad():
        for a, b in [(0, split)] + [(i, i + 1) for i in range(split, len(toks))]:
            out.append(m(torch.tensor([toks[a:b]]), torch.arange(a, b), torch.arange(b - a), ks, vs)[0])
    return torch.cat(out)


@pytest.mark.parametrize("tie", [True, False])
def test_smoothquant_fold_preserves_fp32_outputs(tie):
    import copy

    from edgectl.quant import smoothquant as sq

    m = _with_outliers(_tiny(tie=tie))  # GQA: 4 query heads on 2 kv heads
    windows = [torch.randint(0, 96, (24,), generator=torch.Generator().manual_seed(i)).tolist() for i in range(3)]
    amax = sq.calibrate(m, windows)
    assert set(amax) == {n for n, x in m.named_modules() if n.startswith("layers.") and isinstance(x, torch.nn.Linear)}
    ref = copy.deepcopy(m)
    info = sq.smooth(m, amax, 0.5, sq.PAIRS)
    assert info["layers"] == 2 and info["max_scale"] / info["min_scale"] > 5  # really rescaled
    for name in ("layers.0.input_layernorm.weight", "layers.1.self_attn.v_proj.weight", "layers.1.mlp.up_proj.weight",
                 "layers.0.self_attn.o_proj.weight", "layers.0.mlp.down_proj.weight"):
        assert not torch.equal(m.get_parameter(name), ref.get_parameter(name)), name
    # the V scale is per kv-head channel, shared by the query heads reading that kv head
    s = ref.layers[0].self_attn.v_proj.weight.abs().amax(1) / m.layers[0].self_attn.v_proj.weight.abs().amax(1)
    assert s.std() > 0
    toks = torch.randint(0, 96, (20,), generator=torch.Generator().manual_seed(7)).tolist()
    a, b = _prefill_then_decode(ref, toks, 12), _prefill_then_decode(m, toks, 12)
    assert (a - b).abs().max() <= 1e-5 * a.abs().max(), float((a - b).abs().max())


def test_smoothquant_lowers_int8_error_on_outliers():
    import copy

    from edgectl.quant import smoothquant as sq

    base = _with_outliers(_tiny())
    windows = [torch.randint(0, 96, (24,), generator=torch.Generator().manual_seed(i)).tolist() for i in range(3)]
    toks = torch.randint(0, 96, (20,), generator=torch.Generator().manual_seed(9)).tolist()
    want = _prefill_then_decode(base, toks, 20)
    plain, smooth = copy.deepcopy(base), copy.deepcopy(base)
    quantize_module(plain, QuantScheme("int8"))
    info = sq.smooth(smooth, sq.calibrate(smooth, windows), 0.6)
    quantize_module(smooth, QuantScheme("int8", smoothquant=True), smoothed=info)
    err = lambda m: float((_prefill_then_decode(m, toks, 20) - want).pow(2).mean())  # noqa: E731
    assert err(smooth) < err(plain)


def test_smoothquant_scheme_rules():
    from edgectl.cli.app import smoothquant_default as _smoothquant

    with pytest.raises(UsageError, match="int8 only"):
        QuantScheme("8da4w", smoothquant=True)  # the 4-bit grid must stay the source's
    with pytest.raises(UsageError, match="between 0 and 1"):
        QuantScheme("int8", smoothquant=True, smooth_alpha=1.5)
    with pytest.raises(ValueError, match="smooth the model first"):
        quantize_module(_tiny(), QuantScheme("int8", smoothquant=True))  # never recorded without being done
    assert _smoothquant("int8", None) and not _smoothquant("int8", False)
    assert not _smoothquant("8da4w", None) and not _smoothquant("4w", None)


def test_smoothquant_checkpoint_records_and_folds(stories_dir, corpus_dir, tmp_path):
    from edgectl.checkpoint.checkpoint import load_model, resolve
    from edgectl.quant.quant_checkpoint import load_quantized_model
    from edgectl.quant.quantize import quantize_checkpoint

    cal = corpus_dir / "tinystories-valid-40.txt"
    res = quantize_checkpoint(resolve(str(stories_dir)), tmp_path / "sq", QuantScheme("int8", smoothquant=True, smooth_alpha=0.5),
                              cal, 256, calibration=cal, calibration_tokens=300)
    ck = resolve(res.path)
    rec = ck.quantization
    assert rec["scheme"]["smoothquant"] is True and rec["scheme"]["smooth_alpha"] == 0.5
    sm = rec["smoothquant"]
    assert sm["alpha"] == 0.5 and sm["pairs"] == ["qkv", "gate_up", "v_o"] and sm["layers"] == 5
    assert sm["calibration"]["text"] == str(cal) and 0 < sm["calibration"]["tokens"] <= 301
    assert any(line.startswith("smoothquant alpha 0.5") for line in res.summary)
    assert {w["form"] for n, w in rec["weights"].items() if n.startswith("layers.")} == {"8da8w"}
    # the folded norms are what is stored (the codes are of the smoothed weights)
    model, _ = load_quantized_model(ck, 64)
    ref = load_model(resolve(str(stories_dir)), 64)
    assert not torch.equal(model.layers[0].input_layernorm.weight, ref.layers[0].input_layernorm.weight)
    assert torch.equal(model.head.norm.weight, ref.head.norm.weight)  # the final norm feeds the fp32 head: not smoothed
    toks = torch.randint(0, 512, (24,), generator=torch.Generator().manual_seed(3)).tolist()
    a, b = _prefill_then_decode(model, toks, 16), _prefill_then_decode(ref, toks, 16)
    assert torch.nn.functional.cosine_similarity(a.flatten(), b.flatten(), dim=0) > 0.99
    assert res.accuracy["kl_mean"] < 0.05


@pytest.mark.parametrize("scheme", [None, QuantScheme("int8"), QuantScheme("8da4w", 32, "int4", 32),
                                    QuantScheme("8da4w", 32, mapping="symmetric"), QuantScheme("8da4w", 64)])
def test_fused_projections_compute_what_the_separate_linears_did(scheme):
    """Export's q/k/v and gate/up fusion (quant_modules.fuse_projections) gives the very same
    logits: activation quantization depends on the input only, and each output column keeps
    its own codes, scales and offsets."""
    import copy

    from edgectl.quant.quant_modules import fuse_projections

    m = _tiny(hidden=192)
    if scheme is not None:
        quantize_module(m, scheme)
    fused = copy.deepcopy(m)
    assert fuse_projections(fused) == 2 * m.args.n_layers
    attn = fused.layers[0].self_attn
    assert attn.qkv is not None and not hasattr(attn, "q_proj") and fused.layers[0].mlp.gate_up is not None
    toks = torch.randint(0, 96, (1, 12), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        a = m(toks, torch.arange(12), torch.arange(12), *m.empty_caches())[0]
        b = fused(toks, torch.arange(12), torch.arange(12), *fused.empty_caches())[0]
    assert torch.equal(a, b)


def test_linears_of_different_kinds_are_not_fused():
    from edgectl.quant.quant_modules import fuse_linears

    a = _tiny(hidden=192).layers[0].self_attn
    q4, q8 = _tiny(hidden=192), _tiny(hidden=192)
    quantize_module(q4.layers[0], QuantScheme("8da4w", 32, mapping="symmetric"))
    quantize_module(q8.layers[0], QuantScheme("int8"))
    assert fuse_linears([q4.layers[0].self_attn.q_proj, a.k_proj, a.v_proj]) is None  # 4-bit with fp32
    assert fuse_linears([q4.layers[0].self_attn.q_proj, q8.layers[0].self_attn.k_proj]) is None  # 4-bit with 8-bit
    assert fuse_linears([a.q_proj]) is None


def _tiny_gemma3():
    """A random Gemma 3: sandwich norms (the MLP's input norm is pre_feedforward_layernorm),
    q/k norms, embeddings scaled by sqrt(64) = 8, sliding windows of 4."""
    from edgectl.model import ModelArgs, Transformer

    args = ModelArgs.from_hf_config({
        "architectures": ["Gemma3ForCausalLM"], "hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 3,
        "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16, "vocab_size": 96, "sliding_window": 4,
        "sliding_window_pattern": 3})
    torch.manual_seed(0)
    m = Transformer(args, 64).eval()
    with torch.no_grad():
        for name, p in m.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.3 * torch.randn_like(p))
    return m


def test_gemma3_smoothquant_fold_preserves_fp32_outputs():
    import copy

    from edgectl.quant import smoothquant as sq

    m = _with_outliers(_tiny_gemma3())
    windows = [torch.randint(0, 96, (24,), generator=torch.Generator().manual_seed(i)).tolist() for i in range(3)]
    ref = copy.deepcopy(m)
    info = sq.smooth(m, sq.calibrate(m, windows), 0.5, sq.PAIRS)
    assert info["max_scale"] / info["min_scale"] > 5
    assert not torch.equal(m.layers[0].pre_feedforward_layernorm.weight, ref.layers[0].pre_feedforward_layernorm.weight)
    assert torch.equal(m.layers[0].post_attention_layernorm.weight, ref.layers[0].post_attention_layernorm.weight)
    toks = torch.randint(0, 96, (20,), generator=torch.Generator().manual_seed(7)).tolist()
    a, b = _prefill_then_decode(ref, toks, 12), _prefill_then_decode(m, toks, 12)
    assert (a - b).abs().max() <= 1e-5 * a.abs().max(), float((a - b).abs().max())


@pytest.mark.parametrize("embedding", ["int8", "int4"])
def test_gemma3_quantized_embedding_keeps_the_scale(embedding):
    import copy

    from edgectl.quant.scheme import QuantScheme
    from edgectl.quant.weights import quantize_module

    m = _tiny_gemma3()
    q = copy.deepcopy(m)
    quantize_module(q, QuantScheme("fp32", 32, embedding, 32))
    assert q.embed.scale == m.args.embed_scale == 8.0
    toks = torch.randint(0, 96, (1, 12), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        e, eq = m.embed(toks), q.embed(toks)
    assert (eq - e).abs().max() < 0.05 * e.abs().max()  # the table's rounding only; without the scale: 8x off
