"""`run` and `bench` on an Android phone over adb (`--device adb:SERIAL`). Android has no
Python, so the phone runs ExecuTorch's stock runner, `llama_main`, on a stock-interface
`.pte` (`edgectl export --target android`) and the tokenizer file written beside it.

The `.pte`, the tokenizer file and the runner are pushed once (edgectl/device/adb.py);
llama_main's stdout (the echoed prompt, the text as generated, then its statistics line
"PyTorchObserver {json}", extension/llm/runner/stats.h) is turned into edgectl's output:
the text streamed to stdout, edgectl's figures on stderr or as JSON. llama_main has no
chat template, top-p or seed: --chat is formatted here with the model's own template and
passed as the prompt; --top-p/--seed other than its own behaviour are refused.
"""

from __future__ import annotations

import codecs
import json
import subprocess
import sys
import threading
from pathlib import Path

from edgectl.device import adb
from edgectl.device.target import Target
from edgectl.util import ui
from edgectl.util.errors import EdgectlError, UsageError
from edgectl.util.scoring import prompt_ids

STATS = "PyTorchObserver "
PID = "edgectl-pid "
STOCK_TOP_P = 0.9  # llama_main's sampler: top-p 0.9 (kTopp) at temperature > 0, seeded from the clock
TOKENIZER_EXTS = (".tokenizer.model", ".tokenizer.json")
EXPORT_HINT = "export it for the phone: edgectl export MODEL -o OUT.pte --target android"


def stock_files(artifact: Path) -> tuple[Path, dict]:
    """The tokenizer file beside a stock-interface `.pte`, and the program's edgectl metadata."""
    from edgectl.formats.integrity import require_pte
    from edgectl.formats.ptefile import constant_bytes

    artifact = Path(artifact)
    if artifact.is_dir():
        raise UsageError(f"{artifact}: shard sets do not run on Android", hint=EXPORT_HINT)
    if not artifact.is_file():
        raise UsageError(f"no such file: {artifact}")
    require_pte(artifact)
    meta = json.loads(constant_bytes(artifact, "edgectl_meta"))
    if meta.get("interface") != "stock":
        raise UsageError(f"{artifact.name} is an edgectl-interface program; llama_main needs the stock interface",
                         hint=EXPORT_HINT)
    for ext in TOKENIZER_EXTS:
        tok = artifact.with_name(artifact.stem + ext)
        if tok.is_file():
            return tok, meta
    raise EdgectlError(f"no tokenizer file beside {artifact} ({artifact.stem}{TOKENIZER_EXTS[0]} or "
                       f"{artifact.stem}{TOKENIZER_EXTS[1]})", hint="export writes it; export again with --target android")


def prepare(target: Target, artifact: Path, runner: Path | None) -> tuple[str, str, str, dict]:
    """Everything on the phone: (llama_main, .pte, tokenizer file) paths there, and the metadata."""
    if target.kind != "adb":
        raise UsageError(f"not an adb target: {target.name}", hint="use adb:SERIAL (see `adb devices`)")
    tok, meta = stock_files(artifact)
    adb.check_device(target)
    remote_runner = adb.ensure_runner(target, runner)  # first: no runner fails before a long push
    return remote_runner, adb.send(target, Path(artifact)), adb.send(target, tok), meta


def llama_command(runner: str, pte: str, tok: str, prompt: str, new_tokens: int, temperature: float,
                  num_bos: int, threads: int | None, ignore_eos: bool = False, context: int | None = None) -> str:
    """The phone's shell command: its pid on stderr first (to stop it), then llama_main in its place."""
    flags = [f"--model_path={pte}", f"--tokenizer_path={tok}", adb.quote(f"--prompt={prompt}"),
             f"--max_new_tokens={new_tokens}", f"--temperature={temperature!r}", f"--num_bos={num_bos}"]
    if context is not None:
        flags.append(f"--seq_len={context}")  # older llama_mains: prompt + new tokens
    if threads is not None:
        flags.append(f"--cpu_threads={threads}")
    if ignore_eos:
        flags.append("--ignore_eos")
    return f'echo "{PID}$$" >&2; exec {runner} ' + " ".join(flags)


class Output:
    """llama_main's stdout as it arrives: the echoed prompt dropped, the text passed to
    `emit` as produced, its statistics line parsed. Held back until more comes: trailing
    newlines (llama_main ends the text with one, and one more after an EOS), an EOS piece,
    and a line start that may be the statistics line."""

    def __init__(self, prompt: str, emit, eos_pieces: tuple[str, ...] = ()):
        self.skip, self.emit, self.eos = prompt, emit, tuple(p for p in eos_pieces if p)
        self.line, self.pending, self.parts = "", "", []
        self.stats: dict | None = None
        self.at_line_start = True

    def feed(self, s: str) -> None:
        if self.skip:
            n = len(self.skip) if s.startswith(self.skip) else 0
            while n < len(self.skip) and n < len(s) and s[n] == self.skip[n]:
                n += 1
            if n < min(len(self.skip), len(s)):  # not the echo (a runner without it): all is text
                self.skip = ""
            else:
                self.skip, s = self.skip[n:], s[n:]
                self.at_line_start = False
        self.line += s
        while "\n" in self.line:
            line, self.line = self.line.split("\n", 1)
            if self.at_line_start and line.startswith(STATS):
                self._parse(line[len(STATS):])
            else:
                self._text(line + "\n")
            self.at_line_start = True
        if self.line and not (self.at_line_start and (STATS.startswith(self.line) or self.line.startswith(STATS))):
            self._text(self.line)
            self.line, self.at_line_start = "", False

    def _parse(self, text: str) -> None:
        try:
            self.stats = json.loads(text)
        except ValueError:
            self._text(STATS + text + "\n")

    def _text(self, s: str) -> None:
        held = self.pending + s
        keep = len(held) - len(held.rstrip("\n"))  # trailing newlines
        body = held[: len(held) - keep]
        for piece in self.eos:  # a suffix that may be the start of an EOS piece
            for k in range(min(len(piece), len(body)), 0, -1):
                if body.endswith(piece[:k]):
                    keep = max(keep, len(held) - len(body) + k)
                    break
        out, self.pending = held[: len(held) - keep], held[len(held) - keep:]
        if out:
            self.parts.append(out)
            self.emit(out)

    def finish(self) -> str:
        """All text, the runner's own trailing newlines and EOS piece left out."""
        rest = (self.pending + (self.line if not self.line.startswith(STATS) else "")).rstrip("\n")
        for piece in self.eos:
            if rest.endswith(piece):
                rest = rest[: -len(piece)]
                break
        if rest:
            self.parts.append(rest)
            self.emit(rest)
        self.pending = self.line = ""
        return "".join(self.parts)


def figures(obs: dict) -> dict:
    """edgectl's figures (ms, tokens per second) from llama_main's statistics (ms timestamps)."""
    def span(a: str, b: str) -> float:
        return float(max(obs.get(b, 0) - obs.get(a, 0), 0))

    def rate(tokens: int, ms: float) -> float | None:
        # llama_main stamps whole milliseconds: a span that reads 0 ms was too short to time, so its
        # rate is unknown (None), never 0 tok/s or infinite
        return tokens / ms * 1e3 if tokens and ms else None

    prompt, gen = int(obs.get("prompt_tokens", 0)), int(obs.get("generated_tokens", 0))
    prefill, decode = span("inference_start_ms", "prompt_eval_end_ms"), span("prompt_eval_end_ms", "inference_end_ms")
    return {
        "prompt_tokens": prompt,
        "new_tokens": gen + 1,  # the decode loop's tokens and prefill's first one
        "load_ms": span("model_load_start_ms", "model_load_end_ms"),
        "ttft_ms": span("inference_start_ms", "first_token_ms"),
        "prefill_ms": prefill,
        "decode_ms": decode,
        "prefill_tok_s": rate(prompt, prefill),
        "decode_tok_s": rate(gen, decode),
        "first_token_ms": span("model_load_start_ms", "first_token_ms"),
    }


def _pump_bytes(src, feed) -> None:
    dec = codecs.getincrementaldecoder("utf-8")(errors="replace")
    while chunk := src.read1(4096):
        feed(dec.decode(chunk))
    feed(dec.decode(b"", final=True))


def run_llama(target: Target, command: str, prompt: str, emit, eos_pieces=()) -> tuple[int, str, dict | None, str]:
    """Run `command` (llama_command) on the phone: (exit status, text, statistics, stderr).
    Ctrl-C here stops the phone's llama_main (by its pid) and re-raises."""
    out = Output(prompt, emit, eos_pieces)
    proc = subprocess.Popen(adb.adb_argv(target, "shell", command), stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    err: list[str] = []
    pumps = [threading.Thread(target=_pump_bytes, args=(proc.stdout, out.feed), daemon=True),
             threading.Thread(target=_pump_bytes, args=(proc.stderr, err.append), daemon=True)]
    for t in pumps:
        t.start()
    try:
        rc = proc.wait()
        for t in pumps:
            t.join()
    except BaseException:
        _stop(target, proc, "".join(err))
        raise
    text, stderr = out.finish(), "".join(err)
    if rc != 0 and (e := adb.adb_error(target, stderr)) is not None:
        raise e
    return rc, text, out.stats, stderr


def _stop(target: Target, proc: subprocess.Popen, stderr: str) -> None:
    """Kill the phone's llama_main (the pid its shell printed), then the local adb."""
    pid = next((ln[len(PID):].strip() for ln in stderr.splitlines() if ln.startswith(PID)), "")
    if pid.isdigit():
        try:
            subprocess.run(adb.adb_argv(target, "shell", f"kill {pid}"), capture_output=True, timeout=15)
        except (OSError, subprocess.TimeoutExpired):
            pass
    proc.terminate()
    try:
        proc.wait(timeout=5)
    except subprocess.TimeoutExpired:
        proc.kill()


def _runner_failed(target: Target, rc: int, stderr: str) -> EdgectlError:
    lines = [ln.strip() for ln in stderr.splitlines() if ln.strip() and not ln.startswith(PID)]
    errors = [ln for ln in lines if ln.startswith("E ") or "error" in ln.lower() or "failed" in ln.lower()]
    line = (errors or lines or ["no message"])[-1]
    if rc in (126, 127):
        return EdgectlError(f"llama_main does not start on {target.name} (exit {rc}): {line}",
                            hint="build it for Android arm64-v8a and pass it with --runner PATH")
    return EdgectlError(f"llama_main failed on {target.name} (exit {rc}): {line}")


def stats_line(s: dict, load_ms: float, emulated: bool = False) -> str:
    """The figures as `edgectl run` prints them."""
    def tps(x: float | None) -> str:
        return f"{x:.1f} tok/s" if x is not None else "<1 ms, untimed"

    return (f"[dim]{s['prompt_tokens']} prompt tokens, {s['new_tokens']} new ({s['stopped']}) | load {load_ms:.0f} ms | "
            f"TTFT {s['ttft_ms']:.0f} ms | prefill {tps(s['prefill_tok_s'])} | decode {tps(s['decode_tok_s'])} "
            f"(llama_main{', emulated' if emulated else ''})[/dim]")


_RSS = {"RSS after loading model": "rss_after_load", "RSS after finishing text generation": "rss_end"}


def rss_figures(stderr: str) -> dict:
    """The RSS llama_main logs (ET_LOG "RSS after ...: X MiB", 0 if unsupported), in bytes;
    None where it logs none. VmHWM is not among them: peak_rss is None."""
    out = {"rss_after_load": None, "rss_end": None, "peak_rss": None}
    for line in stderr.splitlines():
        for label, key in _RSS.items():
            if label in line:
                try:
                    mib = float(line.split(label, 1)[1].lstrip(": ").split()[0])
                except (IndexError, ValueError):
                    continue
                out[key] = int(mib * 1024 * 1024) if mib > 0 else None
    return out


def _tokenizer(artifact: Path):
    from edgectl.runtime.run import artifact_tokenizer

    return artifact_tokenizer(artifact)


def _eos_pieces(tok) -> tuple[str, ...]:
    return tuple(p for p in (tok._tok.id_to_token(i) for i in tok.eos_ids) if p)


def _sampling(temperature: float, top_p: float, seed: int | None) -> None:
    if seed is not None:
        raise UsageError("--seed is not supported with adb: llama_main seeds its sampler from the clock",
                         hint="use --temperature 0 for a reproducible (greedy) run")
    if temperature > 0 and top_p not in (1.0, STOCK_TOP_P):
        raise UsageError(f"--top-p {top_p} is not supported with adb: llama_main samples with top-p {STOCK_TOP_P}",
                         hint=f"leave --top-p out (or give {STOCK_TOP_P})")
    if temperature > 0:
        ui.info(f"note: llama_main samples with top-p {STOCK_TOP_P}, seeded from the clock")


def run_android(target: Target, artifact: Path, *, prompt: str, n: int, temperature: float, top_p: float,
                seed: int | None, chat: bool, system: str | None, threads: int | None, json_out: bool,
                runner: Path | None) -> int:
    """`edgectl run --device adb:SERIAL`: push what the phone lacks, run llama_main there,
    stream its text to stdout (or print one JSON object); returns llama_main's exit status."""
    if system is not None and not chat:
        raise UsageError("--system needs --chat")
    _sampling(temperature, top_p, seed)
    artifact = Path(artifact)
    meta = stock_files(artifact)[1]  # before any push: the program and its tokenizer file
    tok = _tokenizer(artifact)
    if chat:  # llama_main has no chat template: the model's own, applied here
        text, num_bos = tok.apply_chat_template(([{"role": "system", "content": system}] if system else [])
                                                + [{"role": "user", "content": prompt}]), 0
        ids = tok.encode(text, bos=False)
    else:
        text, ids = prompt, tok.encode(prompt)
        num_bos = 1 if ids[:1] == [tok.bos_id] and tok.bos_id is not None else 0
    context = int(meta["max_seq_len"])
    new = min(n, context - len(ids))
    if new < 1:
        raise UsageError(f"the prompt ({len(ids)} tokens) fills the program's {context} positions",
                         hint="give a shorter prompt, or export with a larger --max-seq-len")
    remote_runner, pte, tok_path, _ = prepare(target, artifact, runner)
    emulated = adb.device_facts(target)["emulated"]

    def stream(s: str) -> None:
        if not json_out:
            sys.stdout.write(s)
            sys.stdout.flush()

    command = llama_command(remote_runner, pte, tok_path, text, new, temperature, num_bos, threads,
                            context=len(ids) + new)
    rc, out, obs, stderr = run_llama(target, command, text, stream, _eos_pieces(tok))
    if rc != 0:
        raise _runner_failed(target, rc, stderr)
    if obs is None:
        raise EdgectlError(f"llama_main on {target.name} printed no statistics line ({STATS.strip()})",
                           hint="is --runner ExecuTorch's examples/models/llama runner?")
    fig = figures(obs)
    stopped = "length" if fig["new_tokens"] >= new else "eos"
    if new < n and stopped == "length":
        stopped = "max_seq_len"
    stats = {k: fig[k] for k in ("prompt_tokens", "new_tokens", "ttft_ms", "prefill_tok_s", "decode_tok_s")}
    stats.update(stopped=stopped, prefill_ms=fig["prefill_ms"], decode_ms=fig["decode_ms"])
    if fig["prompt_tokens"] != len(ids):
        ui.warn(f"llama_main read the prompt as {fig['prompt_tokens']} tokens, edgectl as {len(ids)}")
    if json_out:
        ui.emit_json({"artifact": str(artifact), "device": target.name, "runner": "llama_main", "text": out,
                      "tokens": None, "load_ms": fig["load_ms"], "stats": stats, "emulated": emulated,
                      "runner_stats": obs})
        return 0
    sys.stdout.write("\n")
    sys.stdout.flush()
    ui.info(stats_line(stats, fig["load_ms"], emulated))
    return 0


def bench_android(target: Target, artifact: Path, *, prompt_tokens: int, new_tokens: int, repeat: int,
                  threads: int | None, runner: Path | None) -> dict:
    """`edgectl bench --device adb:SERIAL`: `repeat` llama_main runs of a fixed prompt of
    `prompt_tokens` tokens generating `new_tokens`; {"device": {...}, "runs": [...]}."""
    if repeat < 1 or prompt_tokens < 1 or new_tokens < 2:
        raise UsageError("--repeat and --prompt-tokens must be >= 1, --new-tokens >= 2")
    artifact = Path(artifact)
    meta = stock_files(artifact)[1]
    if prompt_tokens + new_tokens > int(meta["max_seq_len"]):
        raise UsageError(f"--prompt-tokens + --new-tokens ({prompt_tokens + new_tokens}) exceed the program's "
                         f"{meta['max_seq_len']} positions")
    tok = _tokenizer(artifact)
    ids = prompt_ids(tok, prompt_tokens)
    num_bos = 1 if tok.bos_id is not None and ids[:1] == [tok.bos_id] else 0
    text = tok.decode(ids[num_bos:])
    remote_runner, pte, tok_path, _ = prepare(target, artifact, runner)
    device = adb.device_facts(target)
    command = llama_command(remote_runner, pte, tok_path, text, new_tokens, 0.0, num_bos, threads,
                            ignore_eos=True, context=prompt_tokens + new_tokens)
    runs = []
    for i in range(repeat):
        ui.info(f"run {i + 1} of {repeat} on {target.name}")
        rc, _, obs, stderr = run_llama(target, command, text, lambda s: None)
        if rc != 0:
            raise _runner_failed(target, rc, stderr)
        if obs is None:
            raise EdgectlError(f"llama_main on {target.name} printed no statistics line ({STATS.strip()})")
        run = figures(obs)
        run.update(rss_figures(stderr), emulated=device["emulated"], runner_stats=obs)
        runs.append(run)
    return {"device": device, "runs": runs}
