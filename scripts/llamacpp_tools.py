"""llama.cpp's command-line tools for scripts/side_by_side.py: where they are, how they run,
and parsers for what they print (tests/scripts/test_side_by_side.py holds each parser to a
captured real output in tests/fixtures/llamacpp/).

The tools come from ../shared/tools/build_llamacpp.sh (default ~/.cache/edgectl-anchors/llamacpp/bin,
or $EDGECTL_LLAMACPP_BIN). Every parser takes the text a tool printed (stdout and stderr
together where the figures are log lines) and returns plain numbers.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

BUILD_SCRIPT = "../shared/tools/build_llamacpp.sh"
DEFAULT_BIN = Path.home() / ".cache" / "edgectl-anchors" / "llamacpp" / "bin"


class ToolError(RuntimeError):
    """A tool is missing, failed, or printed something its parser does not know."""


def bin_dir() -> Path:
    return Path(os.environ.get("EDGECTL_LLAMACPP_BIN", DEFAULT_BIN)).expanduser()


def tool(name: str, where: Path | None = None) -> str:
    """The path of llama.cpp tool `name`, or a one-line ToolError saying how to build it."""
    p = (where or bin_dir()) / name
    if not (p.is_file() and os.access(p, os.X_OK)):
        raise ToolError(f"{name} not found in {p.parent}: build llama.cpp with {BUILD_SCRIPT} "
                        "(or point $EDGECTL_LLAMACPP_BIN at its bin/)")
    return str(p)


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def run(cmd: list[str], what: str, capture: bool = True) -> subprocess.CompletedProcess:
    """Run one measurement (never two at once): its command line to stderr first. With capture,
    stdout and stderr come back as text; without, the child's output goes to our stderr.
    Ctrl-C: subprocess.run kills the child before the KeyboardInterrupt goes on."""
    log(f"[{what}] $ {shlex.join(cmd)}")
    if capture:
        p = subprocess.run(cmd, check=False, stdin=subprocess.DEVNULL, capture_output=True, text=True, errors="replace")
    else:
        p = subprocess.run(cmd, check=False, stdin=subprocess.DEVNULL, stdout=sys.stderr, stderr=sys.stderr)
    if p.returncode != 0:
        tail = "\n".join(((p.stderr or "") + (p.stdout or "")).strip().splitlines()[-8:]) if capture else ""
        raise ToolError(f"{what}: {Path(cmd[0]).name} exited {p.returncode}" + (f"\n{tail}" if tail else ""))
    return p


def _num(s: str) -> float:
    return float("inf") if s.strip() == "inf" else float(s)


# --- llama-bench -o json --------------------------------------------------------------------

def parse_llama_bench(text: str) -> dict:
    """llama-bench's JSON (one object per test): prefill (n_prompt > 0, n_gen = 0) as "pp" and
    decode (n_gen > 0, n_prompt = 0) as "tg", each {tokens, mean, sd, samples} in tok/s; the
    build and model facts of the first entry."""
    tests = json.loads(text)
    if not tests:
        raise ToolError("llama-bench printed no tests")
    out = {k: tests[0].get(k) for k in ("build_commit", "build_number", "cpu_info", "model_type", "model_size",
                                         "model_n_params", "n_threads")}
    for t in tests:
        kind = "pp" if t["n_prompt"] > 0 and t["n_gen"] == 0 else "tg" if t["n_gen"] > 0 and t["n_prompt"] == 0 else None
        if kind:
            out[kind] = {"tokens": t["n_prompt"] or t["n_gen"], "mean": t["avg_ts"], "sd": t["stddev_ts"],
                         "samples": t.get("samples_ts", [])}
    if "pp" not in out and "tg" not in out:
        raise ToolError("llama-bench's JSON has neither a prompt (pp) nor a generation (tg) test")
    return out


# --- llama-perplexity -----------------------------------------------------------------------

_PPL_FINAL = re.compile(r"Final estimate: PPL = ([\d.]+|inf|nan) \+/- ([\d.]+|inf|nan)")
_PPL_SETUP = re.compile(r"calculating perplexity over (\d+) chunks, n_ctx=(\d+)")
_PPL_NEED = re.compile(r"you need at least (\d+) tokens to evaluate perplexity with a context of (\d+)")


def parse_perplexity(text: str) -> dict:
    """llama-perplexity's final estimate (it may share a line with the ETA, so it is searched
    anywhere): {ppl, ppl_err, chunks, n_ctx, tokens_scored}. Each chunk of n_ctx tokens
    (its first replaced by BOS where the vocabulary adds one) scores its second half but the
    last position: n_ctx - n_ctx//2 - 1 tokens, each with n_ctx//2 .. n_ctx-2 tokens of context."""
    m = _PPL_FINAL.search(text)
    if not m:
        need = _PPL_NEED.search(text)
        if need:
            raise ToolError(f"llama-perplexity: the text is too short: it needs at least {need[1]} tokens for -c {need[2]}")
        raise ToolError("llama-perplexity printed no 'Final estimate: PPL = X +/- Y' line")
    out = {"ppl": _num(m[1]), "ppl_err": _num(m[2])}
    s = _PPL_SETUP.search(text)
    if s:
        chunks, n_ctx = int(s[1]), int(s[2])
        out.update(chunks=chunks, n_ctx=n_ctx, tokens_scored=chunks * scored_per_chunk(n_ctx))
    return out


def scored_per_chunk(n_ctx: int) -> int:
    """Tokens llama-perplexity scores in one chunk of n_ctx (tools/perplexity/perplexity.cpp:
    first = n_ctx/2, count += n_ctx - first - 1)."""
    return n_ctx - n_ctx // 2 - 1


# --- llama-speculative ----------------------------------------------------------------------

_SPEC_CODED = re.compile(r"(encoded|decoded)\s+(\d+) tokens in\s+([\d.]+) seconds, speed:\s+([\d.]+|inf) t/s")
_SPEC_KV = re.compile(r"\b(n_draft|n_predict|n_drafted|n_accept)\s+=\s+(\d+)")
_SPEC_ACCEPT = re.compile(r"\baccept\s+=\s+([\d.]+|nan|-?inf)%")


def parse_speculative(text: str) -> dict:
    """llama-speculative's summary (stderr): prompt encode and decode {tokens, seconds, tok_s},
    n_draft (tokens drafted per step), n_predict (tokens generated: with -n N it stops after
    N + 1), n_drafted, n_accept and accept_pct (100 * n_accept / n_drafted)."""
    out: dict = {}
    for kind, n, sec, speed in _SPEC_CODED.findall(text):
        out[kind] = {"tokens": int(n), "seconds": float(sec), "tok_s": _num(speed)}
    if "decoded" not in out:
        raise ToolError("llama-speculative printed no 'decoded N tokens in S seconds, speed: X t/s' line")
    out.update({k: int(v) for k, v in _SPEC_KV.findall(text)})
    a = _SPEC_ACCEPT.search(text)
    out["accept_pct"] = float(a[1]) if a else None
    return out


# --- llama-completion (the target alone) ----------------------------------------------------

_PERF = r"=\s+([\d.]+) ms /\s+(\d+) (?:tokens|runs)\s+\(\s*([\d.]+) ms per token,\s+([\d.]+|inf) tokens per second\)"
_PROMPT_EVAL = re.compile(r"prompt eval time\s+" + _PERF)
_EVAL = re.compile(r"(?<!prompt )\beval time\s+" + _PERF)


def parse_completion(text: str) -> dict:
    """llama-completion's perf lines (stderr): prompt eval {tokens, ms, tok_s} and eval (the
    decode: one run per generated token after the first, which the prompt's logits give)."""
    out: dict = {}
    for key, rx in (("prompt_eval", _PROMPT_EVAL), ("eval", _EVAL)):
        m = rx.search(text)
        if m:
            out[key] = {"tokens": int(m[2]), "ms": float(m[1]), "ms_per_token": float(m[3]), "tok_s": _num(m[4])}
    if "eval" not in out:
        raise ToolError("llama-completion printed no 'eval time = ... tokens per second' line")
    return out


# --- inputs and facts -----------------------------------------------------------------------

def read_prompts(path: Path) -> list[str]:
    """The prompts of a file: MT-Bench's .jsonl (each line's first turn; or a "prompt"/"text"
    field), else the whole file as one prompt."""
    text = Path(path).read_text(encoding="utf-8")
    if Path(path).suffix == ".jsonl":
        prompts = []
        for line in filter(str.strip, text.splitlines()):
            d = json.loads(line)
            p = d["turns"][0] if d.get("turns") else d.get("prompt") or d.get("text")
            if p:
                prompts.append(p)
        return prompts
    return [text.strip()] if text.strip() else []


def gguf_type(path: Path) -> str:
    """A GGUF's file type as llama-quantize names it (Q4_1, Q4_K_M, F32, ...), from general.file_type."""
    try:
        import gguf

        f = gguf.GGUFReader(str(path)).fields["general.file_type"]
        name = gguf.LlamaFileType(int(f.parts[f.data[0]][0])).name
        return name.split("_", 1)[1]  # MOSTLY_Q4_1 -> Q4_1, ALL_F32 -> F32
    except Exception:  # noqa: BLE001 (an odd file still gets a row)
        return "?"


def cpu_model(cpuinfo: str | None = None) -> str:
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            return "unknown"
    for key in ("model name", "Model", "Hardware", "CPU part"):
        m = re.search(rf"^{key}\s*:\s*(.+)$", cpuinfo, re.MULTILINE)
        if m:
            return m[1].strip()
    return "unknown"
