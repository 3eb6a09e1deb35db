"""edgectl beside llama.cpp on the same GGUF, in one run: one table, every raw figure in JSON.

    python scripts/side_by_side.py --gguf MODEL.gguf --edgectl ART[=LABEL] [--edgectl ART2[=LABEL2] ...] \\
        --llama-types F32,Q8_0,Q4_0 [--threads 2] [--prompt-tokens 64] [--new-tokens 128] [--repeat 3] \\
        [--ppl-file TEXT --ppl-ctx 512 --ppl-chunks N] [--bench-args "EXTRA edgectl bench ARGS"] \\
        [--speculative --spec-prompt-file FILE [--spec-draft-type Q4_1 | --spec-draft-gguf D.gguf]] \\
        [--ref LABEL] [--work DIR] -o OUT.json

One measurement at a time, in this order: llama-quantize each --llama-types (cached in --work,
default ~/.cache/edgectl-anchors/side_by_side/<sha256 prefix of the GGUF>/); llama-bench each
GGUF (the original too, labelled by its own type); llama-perplexity each (with --ppl-file);
`edgectl bench` once over every --edgectl artifact; with --speculative, llama-speculative
(greedy) and the target alone (llama-completion) over each prompt. The table goes to stdout
as markdown, progress (each command line) to stderr, every figure to -o OUT.json (written
whole or not at all). llama.cpp: ../shared/tools/build_llamacpp.sh builds its tools.
"""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import json
import os
import shlex
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import llamacpp_tools as lt


def sha256_prefix(path: Path, n: int = 16) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()[:n]


def quantize(src: Path, typ: str, work: Path) -> Path:
    """WORK/model-TYPE.gguf, made once (llama-quantize --allow-requantize; to F32 it dequantizes)."""
    out = work / f"model-{typ}.gguf"
    if out.is_file():
        lt.log(f"[quantize {typ}] cached: {out}")
        return out
    tmp = work / f".model-{typ}.partial.gguf"
    try:
        lt.run([lt.tool("llama-quantize"), "--allow-requantize", str(src), str(tmp), typ], f"quantize {typ}")
        tmp.rename(out)
    finally:
        tmp.unlink(missing_ok=True)
    return out


def edgectl_precision(art: Path) -> str:
    """What an edgectl artifact holds: fp32, a scheme (8da4w, int8, ...), or 'shard set'."""
    if art.is_dir():
        return "shard set"
    try:
        from edgectl.runtime.runtime import read_meta

        meta, _ = read_meta(art)
    except Exception:  # noqa: BLE001
        return "?"
    q = meta.get("quantization")
    if not q:
        return f"fp32 ({meta.get('backend', '?')})"
    s = q.get("scheme")
    if isinstance(s, dict):
        s = s.get("linear", "?") + (f"+emb {s['embedding']}" if s.get("embedding", "none") != "none" else "")
    return f"{s or 'quantized'} ({meta.get('backend', '?')})"


def llama_rows(a, work: Path) -> tuple[list[dict], dict[str, Path]]:
    orig_type = lt.gguf_type(a.gguf)
    files = {orig_type: a.gguf}
    for t in a.llama_types:
        if t not in files:
            files[t] = quantize(a.gguf, t, work)
    if a.speculative and a.spec_draft_type and a.spec_draft_type not in files:
        files[a.spec_draft_type] = quantize(a.gguf, a.spec_draft_type, work)
    shown = [orig_type] + [t for t in a.llama_types if t != orig_type]
    rows = [{"engine": "llama.cpp", "label": t, "type": t + (" (original)" if t == orig_type else ""),
             "path": str(files[t]), "file_bytes": files[t].stat().st_size} for t in shown]
    return rows, files


def bench_llama(a, rows: list[dict]) -> None:
    for r in rows:
        r["loadavg_1m"] = os.getloadavg()[0]  # before the run, as edgectl bench records it
        p = lt.run([lt.tool("llama-bench"), "-m", r["path"], "-t", str(a.threads), "-p", str(a.prompt_tokens),
                    "-n", str(a.new_tokens), "-r", str(a.repeat), "-o", "json"], f"llama-bench {r['label']}")
        b = lt.parse_llama_bench(p.stdout)
        r["llama_bench"] = b
        for key, kind in (("prefill_tok_s", "pp"), ("decode_tok_s", "tg")):  # llama-bench's sd of 1 sample is 0
            t = b.get(kind)
            r[key] = t and {"mean": t["mean"], "sd": t["sd"] if len(t["samples"]) > 1 else None}
    if a.ppl_file:
        for r in rows:
            p = lt.run([lt.tool("llama-perplexity"), "-m", r["path"], "-f", str(a.ppl_file), "-c", str(a.ppl_ctx),
                        "--chunks", str(a.ppl_chunks), "-t", str(a.threads)], f"llama-perplexity {r['label']}")
            r["ppl"] = lt.parse_perplexity(p.stderr + p.stdout)


def edgectl_cmd() -> list[str]:
    exe = shutil.which("edgectl", path=str(Path(sys.executable).parent)) or shutil.which("edgectl")
    if not exe:
        raise lt.ToolError("edgectl not found: run with the project's venv (.venv/bin/python scripts/side_by_side.py ...)")
    return [exe]


def bench_edgectl(a, work_json: Path) -> tuple[list[dict], dict]:
    arts = [(Path(s.split("=", 1)[0]).expanduser().resolve(), s.split("=", 1)[1] if "=" in s else None) for s in a.edgectl]
    for p, _ in arts:
        if not p.exists():
            raise lt.ToolError(f"--edgectl {p}: no such file or directory")
    cmd = edgectl_cmd() + ["bench", *map(str, dict.fromkeys(p for p, _ in arts)), "--threads", str(a.threads),
                           "--prompt-tokens", str(a.prompt_tokens), "--new-tokens", str(a.new_tokens),
                           "--repeat", str(a.repeat), "-o", str(work_json)]
    if a.ppl_file:  # same text and window; as many scored tokens as llama-perplexity's chunks
        cmd += ["--ppl", str(a.ppl_file), "--ppl-tokens", str(a.ppl_chunks * lt.scored_per_chunk(a.ppl_ctx)),
                "-c", str(a.ppl_ctx)]
    cmd += shlex.split(a.bench_args or "")
    work_json.unlink(missing_ok=True)
    try:
        lt.run(cmd, "edgectl bench", capture=False)
    except lt.ToolError:
        if not work_json.is_file():
            raise
        lt.log("edgectl bench failed on a row; its other rows are kept (see status)")
    report = json.loads(work_json.read_text())
    labels = {p: lab for p, lab in arts}
    rows = []
    for br in report["rows"]:
        art = Path(br["artifact"])
        name, lab = art.name, labels.get(art)
        label = (lab + br["label"][len(name):]) if lab and br["label"].startswith(name) else br["label"]
        s = br.get("summary") or {}
        pick = {k: s[k] and {"mean": s[k]["mean"], "sd": s[k]["sd"]} for k in ("prefill_tok_s", "decode_tok_s") if k in s}
        ppl = br.get("ppl")
        rows.append({"engine": "edgectl", "label": label, "type": edgectl_precision(art), "path": str(art),
                     "file_bytes": br.get("file_bytes"), "prefill_tok_s": pick.get("prefill_tok_s"),
                     "decode_tok_s": pick.get("decode_tok_s"), "status": br.get("status"),
                     "ppl": ppl and {k: ppl.get(k) for k in ("ppl", "tokens_scored", "windows", "window_tokens",
                                                             "text_tokens", "bos_prefixed")},
                     "edgectl_row": {k: v for k, v in br.items() if k != "runs"}})
    return rows, report


def speculative(a, files: dict[str, Path]) -> dict:
    target = files.get("F32") or (files[a.llama_types[0]] if a.llama_types else a.gguf)
    if a.spec_draft_gguf:
        draft = a.spec_draft_gguf
    elif a.spec_draft_type:
        draft = files[a.spec_draft_type]
    else:  # the smallest GGUF of the llama.cpp rows
        draft = min(files.values(), key=lambda p: p.stat().st_size)
    prompts = lt.read_prompts(a.spec_prompt_file)[: a.spec_max_prompts or None]
    if not prompts:
        raise lt.ToolError(f"--spec-prompt-file {a.spec_prompt_file}: no prompts")
    common = ["-n", str(a.new_tokens), "-t", str(a.threads), "--temp", "0", "--ignore-eos",
              "-c", str(a.new_tokens + 1024)]
    per = []
    for i, prompt in enumerate(prompts, 1):
        s = lt.run([lt.tool("llama-speculative"), "-m", str(target), "-md", str(draft), "-p", prompt, *common,
                    "--spec-draft-n-max", str(a.spec_draft_max)], f"llama-speculative prompt {i}/{len(prompts)}")
        c = lt.run([lt.tool("llama-completion"), "-m", str(target), "-p", prompt, *common, "-no-cnv",
                    "--no-display-prompt"], f"llama-completion (target alone) prompt {i}/{len(prompts)}")
        sp, alone = lt.parse_speculative(s.stderr + s.stdout), lt.parse_completion(c.stderr + c.stdout)
        per.append({"prompt": i, "speculative": sp, "target_alone": alone,
                    "speedup": sp["decoded"]["tok_s"] / alone["eval"]["tok_s"] if alone["eval"]["tok_s"] else None})
    mean = lambda xs: statistics.fmean(xs) if xs else None
    return {"target": str(target), "draft": str(draft), "draft_max": a.spec_draft_max, "prompts": per,
            "mean": {"spec_tok_s": mean([p["speculative"]["decoded"]["tok_s"] for p in per]),
                     "alone_tok_s": mean([p["target_alone"]["eval"]["tok_s"] for p in per]),
                     "accept_pct": mean([p["speculative"]["accept_pct"] for p in per if p["speculative"]["accept_pct"] is not None]),
                     "speedup": mean([p["speedup"] for p in per if p["speedup"]])}}


def versions(edgectl_report: dict | None) -> dict:
    v = dict((edgectl_report or {}).get("versions") or {})
    from importlib.metadata import PackageNotFoundError, version

    for k in ("torch", "executorch", "torchao", "edgectl"):
        if not v.get(k):
            try:
                v[k] = version(k)
            except PackageNotFoundError:
                v[k] = None
    return v


def set_ratios(rows: list[dict], ref: str | None) -> dict | None:
    base = next((r for r in rows if r["label"] == ref), None) if ref else None
    if ref and base is None:  # after the measurements: say so, keep them
        lt.log(f"--ref {ref}: no row has that label ({', '.join(r['label'] for r in rows)}); using the default")
    if base is None:
        base = next((r for r in rows if r["engine"] == "llama.cpp" and r["label"] == "F32"), rows[0] if rows else None)
    b = base and base.get("decode_tok_s") and base["decode_tok_s"]["mean"]
    for r in rows:
        d = r.get("decode_tok_s")
        r["decode_ratio"] = d["mean"] / b if b and d else None
    return base and {"engine": base["engine"], "label": base["label"]}


def _ms(x: dict | None) -> str:
    if not x or x.get("mean") is None:
        return "-"
    return f"{x['mean']:.1f}" + (f" ± {x['sd']:.1f}" if x.get("sd") is not None else "")


def render(res: dict) -> str:
    """The markdown report: a header line, the table, the speculative table, the notes."""
    s, v, llv = res["settings"], res["versions"], res.get("llama_cpp") or {}
    ref = res.get("ref") or {}
    out = [f"# edgectl vs llama.cpp: {Path(s['gguf']).name}", "",
           f"{res['created'][:19].replace('T', ' ')} UTC · CPU {res['machine']['cpu']} · {s['threads']} threads · "
           f"torch {v.get('torch')} · executorch {v.get('executorch')} · torchao {v.get('torchao')} · "
           f"llama.cpp {llv.get('build_commit', '?')} (build {llv.get('build_number', '?')}) · "
           f"prompt {s['prompt_tokens']} / new {s['new_tokens']} tokens · repeat {s['repeat']}", "",
           f"| engine | artifact | type | size MB | prefill tok/s | decode tok/s | decode × {ref.get('label', 'ref')} "
           "| PPL | scored tokens |",
           "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in res["rows"]:
        ppl = r.get("ppl") or {}
        size = f"{r['file_bytes'] / 1e6:.1f}" if r.get("file_bytes") else "-"
        ratio = f"{r['decode_ratio']:.2f}" if r.get("decode_ratio") is not None else "-"
        label = r["label"] + (f" ({r['status']})" if r.get("status") not in (None, "ok") else "")
        pp = f"{ppl['ppl']:.3f}" if ppl.get("ppl") is not None else "-"
        out.append(f"| {r['engine']} | {label} | {r['type']} | {size} | {_ms(r.get('prefill_tok_s'))} | "
                   f"{_ms(r.get('decode_tok_s'))} | {ratio} | {pp} | {ppl.get('tokens_scored', '-')} |")
    sp = res.get("speculative")
    if sp:
        out += ["", f"Speculative decoding (llama.cpp, greedy): target {Path(sp['target']).name}, "
                f"draft {Path(sp['draft']).name}, up to {sp['draft_max']} drafted tokens per step", "",
                "| prompt | target alone tok/s | speculative tok/s | accept % | speed-up |",
                "| ---: | ---: | ---: | ---: | ---: |"]
        f = lambda x, p=1: "-" if x is None else f"{x:.{p}f}"
        for p in sp["prompts"]:
            out.append(f"| {p['prompt']} | {f(p['target_alone']['eval']['tok_s'])} | "
                       f"{f(p['speculative']['decoded']['tok_s'])} | {f(p['speculative']['accept_pct'])} | "
                       f"{f(p['speedup'], 2)} |")
        m = sp["mean"]
        out.append(f"| mean | {f(m['alone_tok_s'])} | {f(m['spec_tok_s'])} | {f(m['accept_pct'])} | {f(m['speedup'], 2)} |")
    if res.get("notes"):
        out += ["", *(f"- {n}" for n in res["notes"])]
    return "\n".join(out) + "\n"


def notes(a, res: dict) -> list[str]:
    n = ["prefill/decode tok/s: mean ± sd over --repeat runs; llama.cpp's from llama-bench (pp = a "
         f"{a.prompt_tokens}-token prompt, tg = {a.new_tokens} tokens generated, each a separate test), "
         "edgectl's from `edgectl bench` (one generation per run, each in a fresh process, after a warm-up)",
         f"decode × ref: decode tok/s over that of {(res.get('ref') or {}).get('label', '-')}; size: the file "
         "(edgectl: the .pte or the shard set's files)"]
    loads = [r["loadavg_1m"] for r in res["rows"] if "loadavg_1m" in r]
    if loads:
        n.append(f"1-minute load average before the llama-bench runs: up to {max(loads):.1f} on {os.cpu_count()} CPUs")
    if a.ppl_file:
        k = lt.scored_per_chunk(a.ppl_ctx)
        n.append(f"PPL on {Path(a.ppl_file).name}: llama-perplexity scores {a.ppl_chunks} chunks of {a.ppl_ctx} tokens "
                 f"of the text (BOS first where the model adds one), in each the last {k} predictions "
                 f"(context {a.ppl_ctx // 2 + 1}..{a.ppl_ctx - 1} tokens): {a.ppl_chunks * k} tokens; edgectl bench takes the "
                 f"first {a.ppl_chunks * k} tokens of the same text (--ppl-tokens) in non-overlapping windows of "
                 f"{a.ppl_ctx} positions (-c) and scores every position after a window's first (context 1.."
                 f"{a.ppl_ctx - 1}; with BOS a window is BOS + text and scores each of those tokens, without, a window's "
                 "first token is context only): less context per scored token, so a higher PPL is expected")
        for r in res["rows"]:
            p = r.get("ppl") or {}
            if r["engine"] == "edgectl" and p.get("windows"):
                n.append(f"{r['label']}: scored {p['tokens_scored']} tokens in {p['windows']} windows of "
                         f"{p['window_tokens']} ({'BOS + text' if p.get('bos_prefixed') else 'text only, no BOS'})")
    if a.speculative:
        n.append("speculative tok/s: llama-speculative's 'decoded N tokens in S seconds' (N = --new-tokens + 1, "
                 "prompt excluded); target alone: llama-completion's eval tok/s (tokens after the first); both "
                 "--temp 0 --ignore-eos on the same prompt")
    return n


def write_json(path: Path, res: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(res, f, indent=1)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp's 0600 is not what a written report wants
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gguf", type=Path, required=True)
    ap.add_argument("--edgectl", action="append", default=[], metavar="ART[=LABEL]", help=".pte or shard set; repeat")
    ap.add_argument("--llama-types", default="F32", help="comma-separated llama-quantize types, e.g. F32,Q8_0,Q4_0")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prompt-tokens", type=int, default=64)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--ppl-file", type=Path)
    ap.add_argument("--ppl-ctx", type=int, default=512)
    ap.add_argument("--ppl-chunks", type=int, default=4)
    ap.add_argument("--bench-args", help="extra `edgectl bench` arguments, one string")
    ap.add_argument("--speculative", action="store_true")
    ap.add_argument("--spec-prompt-file", type=Path, help="MT-Bench .jsonl (first turns) or a text file (one prompt)")
    ap.add_argument("--spec-max-prompts", type=int, default=0, help="only the first N prompts (0: all)")
    g = ap.add_mutually_exclusive_group()
    g.add_argument("--spec-draft-type", help="draft = the GGUF quantized to this type (default: the smallest GGUF)")
    g.add_argument("--spec-draft-gguf", type=Path)
    ap.add_argument("--spec-draft-max", type=int, default=4, help="tokens drafted per step (edgectl's default K)")
    ap.add_argument("--ref", help="label of the row decode ratios are against (default: llama.cpp F32, else the first)")
    ap.add_argument("--work", type=Path, help="cache of quantized GGUFs (default: ~/.cache/edgectl-anchors/side_by_side/<sha>)")
    ap.add_argument("-o", "--output", type=Path, required=True)
    a = ap.parse_args(argv)
    a.llama_types = [t.strip() for t in a.llama_types.split(",") if t.strip()]
    if a.speculative and not a.spec_prompt_file:
        ap.error("--speculative needs --spec-prompt-file")
    if a.ppl_file and a.edgectl and a.ppl_ctx < a.prompt_tokens + a.new_tokens:
        ap.error(f"--ppl-ctx {a.ppl_ctx} < prompt + new tokens: edgectl bench's -c sets both its perplexity window "
                 "and its generation's positions")
    for f in (a.gguf, a.ppl_file, a.spec_prompt_file, a.spec_draft_gguf):
        if f is not None and not f.is_file():
            ap.error(f"{f}: no such file")
    return a


def main(argv=None) -> int:
    a = parse_args(argv)
    a.gguf = a.gguf.expanduser().resolve()
    try:
        for t in ["llama-quantize", "llama-bench"] + (["llama-perplexity"] if a.ppl_file else []) + (
                ["llama-speculative", "llama-completion"] if a.speculative else []):
            lt.tool(t)
        work = a.work or Path.home() / ".cache" / "edgectl-anchors" / "side_by_side" / sha256_prefix(a.gguf)
        work.mkdir(parents=True, exist_ok=True)
        created = dt.datetime.now(dt.timezone.utc).isoformat()
        lrows, files = llama_rows(a, work)
        bench_llama(a, lrows)
        erows, report = bench_edgectl(a, work / "edgectl-bench.json") if a.edgectl else ([], None)
        rows = lrows + erows
        res = {"schema": "edgectl-side-by-side/1", "created": created, "argv": sys.argv,
               "machine": {"cpu": lt.cpu_model(), "cpu_count": os.cpu_count()},
               "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(a).items()},
               "versions": versions(report), "llama_cpp": {k: lrows[0]["llama_bench"].get(k) for k in
                                                           ("build_commit", "build_number")} if lrows else None,
               "rows": rows, "edgectl_report": report}
        if a.speculative:
            res["speculative"] = speculative(a, files)
        res["ref"] = set_ratios(rows, a.ref)
        res["notes"] = notes(a, res) + list((report or {}).get("notes") or [])
        write_json(a.output, res)
    except lt.ToolError as e:
        print(f"side_by_side: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("side_by_side: interrupted; no output written", file=sys.stderr)
        return 130
    sys.stdout.write(render(res))
    lt.log(f"wrote {a.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
