"""scripts/side_by_side.py and scripts/llamacpp_tools.py without llama.cpp: the parsers on what
the real tools printed (tests/fixtures/llamacpp, see its SOURCE.md), and the table on a small
made-up result."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "scripts"))

import llamacpp_tools as lt
import side_by_side as sbs

FIX = ROOT / "tests" / "fixtures" / "llamacpp"


def test_llama_bench_json():
    b = lt.parse_llama_bench((FIX / "llama-bench.json").read_text())
    assert b["build_commit"] == "0c1e570" and b["build_number"] == 1
    assert b["model_type"] == "llama 256M Q4_1" and b["n_threads"] == 2
    assert b["pp"] == {"tokens": 8, "mean": 59.216399, "sd": 7.899397, "samples": [53.6307, 64.8021]}
    assert b["tg"]["tokens"] == 8 and b["tg"]["mean"] == 20.761549 and b["tg"]["sd"] == 17.231337


def test_llama_bench_without_tests():
    with pytest.raises(lt.ToolError):
        lt.parse_llama_bench("[]")


def test_perplexity_final_estimate_shares_the_eta_line():
    text = (FIX / "llama-perplexity.txt").read_text()
    assert "ETA 0.04.295.540 I Final estimate" in text  # the real output: not at a line start
    p = lt.parse_perplexity(text)
    assert p == {"ppl": 10.615, "ppl_err": 2.5509, "chunks": 2, "n_ctx": 128, "tokens_scored": 2 * 63}


def test_perplexity_too_short_and_missing():
    with pytest.raises(lt.ToolError, match="at least 1024 tokens for -c 512"):
        lt.parse_perplexity("perplexity: you need at least 1024 tokens to evaluate perplexity with a context of 512\n")
    with pytest.raises(lt.ToolError, match="Final estimate"):
        lt.parse_perplexity("nothing here")


def test_scored_per_chunk():
    assert lt.scored_per_chunk(512) == 255 and lt.scored_per_chunk(128) == 63 and lt.scored_per_chunk(7) == 3


def test_speculative():
    s = lt.parse_speculative((FIX / "llama-speculative.stderr").read_text())
    assert s["encoded"] == {"tokens": 14, "seconds": 0.217, "tok_s": 64.441}
    assert s["decoded"] == {"tokens": 9, "seconds": 0.34, "tok_s": 26.49}
    assert (s["n_draft"], s["n_predict"], s["n_drafted"], s["n_accept"]) == (3, 9, 6, 6)
    assert s["accept_pct"] == 100.0


def test_completion_eval_lines():
    c = lt.parse_completion((FIX / "llama-completion.stderr").read_text())
    assert c["prompt_eval"] == {"tokens": 14, "ms": 78.05, "ms_per_token": 5.57, "tok_s": 179.37}
    assert c["eval"] == {"tokens": 7, "ms": 321.11, "ms_per_token": 45.87, "tok_s": 21.8}
    # the speculative run's target prints an eval line of 1 run at "inf" tokens per second
    s = lt.parse_completion((FIX / "llama-speculative.stderr").read_text())
    assert s["eval"]["tokens"] == 1 and s["eval"]["tok_s"] == float("inf")


def test_prompts(tmp_path):
    j = tmp_path / "q.jsonl"
    j.write_text(json.dumps({"question_id": 81, "turns": ["first", "second"]}) + "\n\n"
                 + json.dumps({"prompt": "plain"}) + "\n")
    assert lt.read_prompts(j) == ["first", "plain"]
    t = tmp_path / "p.txt"
    t.write_text("  one prompt\nof two lines \n")
    assert lt.read_prompts(t) == ["one prompt\nof two lines"]


def test_cpu_model():
    assert lt.cpu_model("processor\t: 0\nmodel name\t: AMD EPYC 9654 96-Core Processor\n") == "AMD EPYC 9654 96-Core Processor"
    assert lt.cpu_model("processor : 0\nCPU part : 0xd0b\n") == "0xd0b"


def test_missing_tool_names_the_build_script(tmp_path):
    with pytest.raises(lt.ToolError, match=r"build_llamacpp\.sh"):
        lt.tool("llama-bench", tmp_path)


def _fake() -> dict:
    rows = [
        {"engine": "llama.cpp", "label": "Q4_1", "type": "Q4_1 (original)", "file_bytes": 96_576_768,
         "prefill_tok_s": {"mean": 400.0, "sd": 4.0}, "decode_tok_s": {"mean": 60.0, "sd": 1.5},
         "ppl": {"ppl": 20.5, "tokens_scored": 510}},
        {"engine": "llama.cpp", "label": "F32", "type": "F32", "file_bytes": 539_845_696,
         "prefill_tok_s": {"mean": 300.0, "sd": 3.0}, "decode_tok_s": {"mean": 30.0, "sd": 0.5},
         "ppl": {"ppl": 19.25, "tokens_scored": 510}},
        {"engine": "edgectl", "label": "smol", "type": "fp32 (xnnpack)", "file_bytes": 540_203_904, "status": "ok",
         "prefill_tok_s": {"mean": 250.0, "sd": None}, "decode_tok_s": {"mean": 33.0, "sd": None},
         "ppl": {"ppl": 22.0, "tokens_scored": 510, "windows": 1, "window_tokens": 512, "bos_prefixed": False}},
        {"engine": "edgectl", "label": "broken", "type": "?", "file_bytes": None, "status": "failed",
         "prefill_tok_s": None, "decode_tok_s": None, "ppl": None},
    ]
    return {"created": "2026-12-05T00:00:00+00:00", "machine": {"cpu": "Test CPU"},
            "settings": {"gguf": "/m/SmolLM2.Q4_1.gguf", "threads": 2, "prompt_tokens": 64, "new_tokens": 128, "repeat": 3},
            "versions": {"torch": "2.13.0", "executorch": "1.4.1", "torchao": "0.18.0"},
            "llama_cpp": {"build_commit": "0c1e570", "build_number": 1}, "rows": rows, "notes": ["a note"]}


def test_ratios_default_to_llama_f32_and_ref_label():
    res = _fake()
    assert sbs.set_ratios(res["rows"], None) == {"engine": "llama.cpp", "label": "F32"}
    assert [r["decode_ratio"] for r in res["rows"]] == [2.0, 1.0, 1.1, None]
    assert sbs.set_ratios(res["rows"], "smol")["label"] == "smol"
    assert res["rows"][1]["decode_ratio"] == pytest.approx(30 / 33)
    assert sbs.set_ratios(res["rows"], "nope")["label"] == "F32"  # an unknown label: the default, measurements kept


def test_render_table():
    res = _fake()
    res["ref"] = sbs.set_ratios(res["rows"], None)
    res["speculative"] = {"target": "/w/model-F32.gguf", "draft": "/m/SmolLM2.Q4_1.gguf", "draft_max": 4,
                          "prompts": [{"prompt": 1, "speculative": {"decoded": {"tok_s": 45.0}, "accept_pct": 80.0},
                                       "target_alone": {"eval": {"tok_s": 30.0}}, "speedup": 1.5}],
                          "mean": {"alone_tok_s": 30.0, "spec_tok_s": 45.0, "accept_pct": 80.0, "speedup": 1.5}}
    md = sbs.render(res)
    lines = md.splitlines()
    assert lines[0] == "# edgectl vs llama.cpp: SmolLM2.Q4_1.gguf"
    head = lines[2]
    for part in ("2026-12-05 00:00:00 UTC", "CPU Test CPU", "2 threads", "torch 2.13.0", "executorch 1.4.1",
                 "torchao 0.18.0", "llama.cpp 0c1e570 (build 1)"):
        assert part in head
    assert "| llama.cpp | Q4_1 | Q4_1 (original) | 96.6 | 400.0 ± 4.0 | 60.0 ± 1.5 | 2.00 | 20.500 | 510 |" in lines
    assert "| llama.cpp | F32 | F32 | 539.8 | 300.0 ± 3.0 | 30.0 ± 0.5 | 1.00 | 19.250 | 510 |" in lines
    assert "| edgectl | smol | fp32 (xnnpack) | 540.2 | 250.0 | 33.0 | 1.10 | 22.000 | 510 |" in lines
    assert "| edgectl | broken (failed) | ? | - | - | - | - | - | - |" in lines
    assert "decode × F32" in md and "| 1 | 30.0 | 45.0 | 80.0 | 1.50 |" in lines and "| mean | 30.0 | 45.0 | 80.0 | 1.50 |" in lines
    assert lines[-1] == "- a note"
    # every table row has as many cells as its header
    table = [x for x in lines if x.startswith("| ")]
    assert {x.count("|") for x in table[: len(res["rows"]) + 2]} == {10}


def test_json_written_whole(tmp_path):
    out = tmp_path / "sub" / "out.json"
    sbs.write_json(out, {"a": 1})
    assert json.loads(out.read_text()) == {"a": 1} and [p.name for p in out.parent.iterdir()] == ["out.json"]

    class Bad:
        pass

    with pytest.raises(TypeError):
        sbs.write_json(out, {"a": Bad()})
    assert json.loads(out.read_text()) == {"a": 1} and [p.name for p in out.parent.iterdir()] == ["out.json"]


def test_args_check_ppl_ctx(tmp_path):
    g = tmp_path / "m.gguf"
    g.write_bytes(b"GGUF")
    t = tmp_path / "t.txt"
    t.write_text("x")
    with pytest.raises(SystemExit):
        sbs.parse_args(["--gguf", str(g), "--edgectl", "a.pte", "--ppl-file", str(t), "--ppl-ctx", "128", "-o", "o.json"])
    a = sbs.parse_args(["--gguf", str(g), "--llama-types", "F32, Q8_0", "-o", "o.json"])
    assert a.llama_types == ["F32", "Q8_0"] and a.ref is None and a.threads == 2
