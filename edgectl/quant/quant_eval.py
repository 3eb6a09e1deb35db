"""The accuracy cost of a quantization, measured in eager PyTorch before anything is exported.

Perplexity of the reference and the quantized model on the same windows of a text file
(the windows `edgectl bench --ppl` scores), and the mean KL divergence KL(ref || quant)
of the next-token distributions over every scored position.
"""

from __future__ import annotations

import math
from pathlib import Path


def _logits(model, window: list[int]):
    """Logits [T, vocab] as the model gives them (float32; scored in float64 by chunks)."""
    import torch

    T = len(window)
    k, v = model.empty_caches()  # fresh, from position 0
    with torch.no_grad():
        logits = model(torch.tensor([window]), torch.arange(T), torch.arange(T), k, v)
    return logits[0]


def compare(ref, quant, ckpt, text_file: Path, n_tokens: int, window: int) -> dict:
    """{ppl_ref, ppl_quant, ppl_change, kl_mean, top1_agree, tokens_scored, windows, file}."""
    import torch

    from edgectl.util.scoring import log_prob_chunks, ppl_windows
    from edgectl.util.errors import EdgectlError
    from edgectl.runtime.tokenizer import Tokenizer

    args = ckpt.args
    tok = Tokenizer(ckpt.tokenizer_json, ckpt.tokenizer_config, args.bos_token_id, tuple(args.eos_token_ids))
    ids = tok.encode(Path(text_file).read_text(encoding="utf-8", errors="replace"), bos=False)[:n_tokens]
    wins = ppl_windows(ids, min(window, quant.max_seq_len), tok.bos_id if tok.add_bos else None)
    if not wins:
        raise EdgectlError(f"{text_file}: too little text to measure accuracy on")
    nll_r = nll_q = kl = 0.0
    agree = n = 0
    for w in wins:
        # float64 log-probs a few positions at a time (a whole window is hundreds of MB
        # for a large vocabulary); the picked ones are summed in one reduction as before
        target = torch.tensor(w[1:]).unsqueeze(1)
        pr, pq = (torch.empty(len(w) - 1, 1, dtype=torch.float64) for _ in range(2))
        for (a, lr), (_, lq) in zip(log_prob_chunks(_logits(ref, w)), log_prob_chunks(_logits(quant, w))):
            lr, lq = torch.from_numpy(lr), torch.from_numpy(lq)  # the chunks' buffers, shared
            rows = slice(a, a + len(lr))
            pr[rows], pq[rows] = lr.gather(1, target[rows]), lq.gather(1, target[rows])
            agree += int((lr.argmax(-1) == lq.argmax(-1)).sum())
            # exp(lr) * (lr - lq), in the chunks' own buffers (no chunk-sized temporaries)
            kl += float(lq.neg_().add_(lr).mul_(lr.exp_()).sum())
        nll_r -= float(pr.sum())
        nll_q -= float(pq.sum())
        n += len(w) - 1
    ppl_r, ppl_q = math.exp(nll_r / n), math.exp(nll_q / n)
    return {
        "file": str(text_file), "tokens_scored": n, "windows": len(wins), "window_tokens": window,
        "ppl_ref": ppl_r, "ppl_quant": ppl_q, "ppl_change": ppl_q / ppl_r - 1,
        "kl_mean": kl / n, "top1_agree": agree / n,
    }
