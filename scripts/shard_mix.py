"""Precision mixes of a shard set at equal bytes, and their perplexity through the `.pte` chain.

    python -m edgectl.shard_mix DIR --text wiki.test.raw --tokens 20000 [--lower N] [--json]

Every layer shard starts at `--base` (default: the second precision, e.g. int8); N of them
are lowered to the lowest precision, chosen three ways: the N least important (marginal
KL cost of that step, from the manifest), N spread evenly over the depth (importance
ignored), and the N most important. Layer shards of one precision have the same size, so
the three mixes have exactly the same bytes; embed and head stay at the base precision.
Uniform-precision sets (all base, all lowest) are scored alongside for reference.

Perplexity is measured through the exported programs (shard_chain.ShardChain) on the
windows `edgectl bench --ppl` uses (max_seq_len tokens, util.scoring.ppl_windows).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

from edgectl.formats.manifest import Manifest


def marginal_cost(manifest: Manifest, base: str, low: str) -> dict[str, float]:
    """KL(top || low) - KL(top || base) per layer shard: what lowering base -> low costs."""
    out = {}
    for s in manifest.shards:
        if s.kind != "layers":
            continue
        b = s.variants[base].importance
        out[s.name] = s.variants[low].importance.kl - (b.kl if b else 0.0)
    return out


def mixes(manifest: Manifest, n: int, base: str, low: str) -> dict[str, dict[str, str]]:
    cost = marginal_cost(manifest, base, low)
    layers = [s.name for s in manifest.shards if s.kind == "layers"]
    by_cost = sorted(layers, key=lambda name: cost[name])
    spread = [layers[round(i * (len(layers) - 1) / max(n - 1, 1))] for i in range(n)] if n > 1 else [layers[len(layers) // 2]]
    everything = {s.name: base for s in manifest.shards}

    def lower(names):
        return {**everything, **dict.fromkeys(names, low)}

    return {
        "least important lowered": lower(by_cost[:n]),
        "evenly spread lowered": lower(spread),
        "most important lowered": lower(by_cost[-n:]),
        f"uniform {base}": dict(everything),
        f"uniform {low}": {**everything, **dict.fromkeys(layers, low)},
    }


def mix_bytes(manifest: Manifest, choice: dict[str, str]) -> int:
    return sum(s.variants[choice[s.name]].bytes for s in manifest.shards if s.kind != "embed")


def perplexity(directory: Path, manifest: Manifest, choice: dict[str, str], ids: list[int], bos: int | None) -> dict:
    from edgectl.util.scoring import nll_sum, ppl_windows
    from edgectl.shard.chain import ShardChain

    chain = ShardChain(directory, choice, manifest)
    wins = ppl_windows(ids, manifest.max_seq_len, bos)
    t0 = time.perf_counter()
    nll, n = 0.0, 0
    for w in wins:
        chain.reset()
        nll += nll_sum(chain.forward(w, 0, all_logits=True), w)
        n += len(w) - 1
    chain.close()
    return {"ppl": math.exp(nll / n), "tokens_scored": n, "windows": len(wins), "seconds": time.perf_counter() - t0}


def main(argv: list[str] | None = None) -> int:
    from edgectl.model import ModelArgs
    from edgectl.runtime.tokenizer import Tokenizer

    ap = argparse.ArgumentParser(prog="python -m edgectl.shard_mix")
    ap.add_argument("dir", type=Path)
    ap.add_argument("--text", type=Path, required=True)
    ap.add_argument("--tokens", type=int, default=20000)
    ap.add_argument("--lower", type=int, default=None, help="layer shards lowered (default: half)")
    ap.add_argument("--base", default=None)
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args(argv)
    m = Manifest.load(a.dir)
    base = a.base or m.precisions[1]
    low = m.precisions[-1]
    n_layers = sum(s.kind == "layers" for s in m.shards)
    n = a.lower or n_layers // 2
    args = ModelArgs.from_dict(m.model)
    tok = Tokenizer((a.dir / m.tokenizer).read_text(), m.tokenizer_config, args.bos_token_id, tuple(args.eos_token_ids))
    ids = tok.encode(a.text.read_text(encoding="utf-8", errors="replace"), bos=False)[: a.tokens]
    rows = []
    for name, choice in mixes(m, n, base, low).items():
        r = perplexity(a.dir, m, choice, ids, tok.bos_id if tok.add_bos else None)
        lowered = sorted((k for k, v in choice.items() if v == low and k.startswith("layers")),
                         key=lambda s: int(s.split(".")[1].split("-")[0]))
        rows.append({"mix": name, "bytes": mix_bytes(m, choice), "lowered": lowered, **r})
        print(f"  {name}: ppl {r['ppl']:.4f} ({r['seconds']:.0f}s)", file=sys.stderr)
    if a.json:
        print(json.dumps({"base": base, "low": low, "n_lowered": n, "rows": rows}, indent=2))
    else:
        print(f"{'mix':<26} {'bytes':>12} {'ppl':>9}  lowered to {low}")
        for r in rows:
            print(f"{r['mix']:<26} {r['bytes']:>12,} {r['ppl']:>9.4f}  {' '.join(x.split('.')[1] for x in r['lowered'])}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
