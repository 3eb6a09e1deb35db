"""How much each shard matters: the cost of lowering it alone, measured on calibration text.

For every shard and every lower precision it offers, only that shard runs at the lower
precision and all others at the top one; the figures are the mean KL divergence
KL(top || lowered) of the next-token distribution over every scored position, and the
perplexity with that shard lowered.

Fast path (eager PyTorch, "eager-quantized"): the very modules the exporter lowers
(shard_build.layers_module / embed_head_module, quantized by weights.quantize_module),
run eagerly. The hidden state entering each shard at the top precision is kept per
window, so lowering layer shard j re-runs only shards j.. onward. `shard` checks a sample
of these figures through the exported programs (see shard_figures.verify_with_pte).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from edgectl.formats.manifest import Importance


@dataclass
class ShardSpec:
    name: str
    kind: str  # embed | layers | head
    layers: list[int]


def calibration_windows(tok, text: str, n_tokens: int, window: int) -> list[list[int]]:
    """The first `n_tokens` tokens of `text`, in `edgectl bench --ppl`'s windows."""
    from edgectl.util.scoring import ppl_windows
    from edgectl.util.errors import EdgectlError

    ids = tok.encode(text, bos=False)
    if len(ids) < n_tokens:
        raise EdgectlError(f"calibration text has {len(ids)} tokens, fewer than the {n_tokens} asked for",
                           hint="give a longer --calibration file or lower --calibration-tokens")
    return ppl_windows(ids[:n_tokens], window, tok.bos_id if tok.add_bos else None)


class EagerShards:
    """Eager modules of every shard at every precision, built from one model whose own
    precision is `base` (fp32, or a quantized checkpoint's stored precision)."""

    def __init__(self, model, shards: list[ShardSpec], precisions: list[str], group_size: int,
                 progress: Callable[[int, int], None] | None = None, base: str = "fp32"):
        from edgectl.shard.shard_build import embed_head_module, layers_module

        self.model, self.shards, self.precisions = model, shards, precisions
        self.mods: dict[tuple[str, str], torch.nn.Module] = {}
        total, done = len(shards) * len(precisions), 0
        for p in precisions:
            tiny, _ = embed_head_module(model, p, group_size, base)
            for s in shards:
                if s.kind == "layers":
                    self.mods[s.name, p] = layers_module(model, s.layers, p, group_size, base)[0]
                else:
                    self.mods[s.name, p] = tiny.embed if s.kind == "embed" else tiny.head
                done += 1
                if progress:
                    progress(done, total)

    def run(self, choice: dict[str, str], tokens: torch.Tensor, start_at: int = 0, h=None):
        """Logits [T, vocab] for one window from position 0, shards from index `start_at`
        (with `h` the hidden state entering it). Also returns the hidden state entering
        every shard that ran (list aligned with self.shards)."""
        from edgectl.model import empty_caches

        T = tokens.shape[1]
        pos, idx = torch.arange(T), torch.arange(T)
        args = self.model.args
        top = self.precisions[0]
        entering = [None] * len(self.shards)
        for i in range(start_at, len(self.shards)):
            s = self.shards[i]
            m = self.mods[s.name, choice.get(s.name, top)]
            entering[i] = h
            if s.kind == "embed":
                h = m(tokens)
            elif s.kind == "layers":
                k, v = empty_caches(args, T, len(m.blocks))  # a fresh cache per window, from position 0
                h = m(h, pos, *[c for pair in zip(k, v) for c in pair])
            else:
                return m(h, idx)[0], entering
        raise RuntimeError("no head shard")


def _scores(top_logits, logits, window: list[int]) -> tuple[float, float]:
    """(sum of KL(top || this) over the scored positions, sum of NLL), given both logits
    [T, vocab]. In float64 a few positions at a time (util.scoring.log_prob_chunks): a
    window's log-probs at once are hundreds of MB for a 49152-token vocabulary."""
    from edgectl.util.scoring import log_prob_chunks

    target = torch.tensor(window[1:]).unsqueeze(1)
    picked = torch.empty(len(window) - 1, 1, dtype=torch.float64)
    kl = 0.0
    for (a, lt), (_, lp) in zip(log_prob_chunks(top_logits), log_prob_chunks(logits)):
        lt, lp = torch.from_numpy(lt), torch.from_numpy(lp)  # the chunks' buffers, shared
        picked[a : a + len(lp)] = lp.gather(1, target[a : a + len(lp)])
        # exp(lt) * (lt - lp), in the chunks' own buffers (no chunk-sized temporaries)
        kl += float(lp.neg_().add_(lt).mul_(lt.exp_()).sum())
    return kl, float(-picked.sum())


def measure(eager: EagerShards, windows: list[list[int]],
            progress: Callable[[int, int], None] | None = None) -> tuple[dict, dict]:
    """({(shard, precision): Importance} for every lower precision, {"top_ppl", "tokens"})."""
    from edgectl.util.scoring import nll_sum

    shards, lower = eager.shards, eager.precisions[1:]
    kl = {(s.name, p): 0.0 for s in shards for p in lower}
    nll = dict.fromkeys(kl, 0.0)
    top_nll, n = 0.0, 0
    total, done = len(windows) * (1 + len(kl)), 0
    with torch.no_grad():
        for w in windows:
            tokens = torch.tensor([w])
            logits, entering = eager.run({}, tokens)
            top_nll += nll_sum(logits, w)
            n += len(w) - 1
            done += 1
            for i, s in enumerate(shards):
                for p in lower:
                    low, _ = eager.run({s.name: p}, tokens, start_at=i, h=entering[i])
                    a, b = _scores(logits, low, w)
                    kl[s.name, p] += a
                    nll[s.name, p] += b
                    done += 1
                    if progress:
                        progress(done, total)
    top_ppl = math.exp(top_nll / n)
    out = {key: Importance(kl=kl[key] / n, ppl=math.exp(nll[key] / n), ppl_delta=math.exp(nll[key] / n) - top_ppl,
                           tokens=n, measured_with="eager-quantized") for key in kl}
    return out, {"top_ppl": top_ppl, "tokens": n, "windows": len(windows)}


def window_scores(run_logits: Callable[[list[int]], torch.Tensor], ref_logits: torch.Tensor, window: list[int]):
    """(mean KL vs ref, ppl) of one window given a function producing logits [T, vocab]."""
    kl, nll = _scores(ref_logits, run_logits(window), window)
    return kl / (len(window) - 1), math.exp(nll / (len(window) - 1))
