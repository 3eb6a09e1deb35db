"""SmoothQuant for the 8-bit dynamic-activation linears: activation outliers moved into weights.

int8 here runs as XNNPACK qd8-f32-qc8w: every token's activations are quantized to int8
with one scale per token, so a few input channels of large magnitude (after RMSNorm, and
after SwiGLU's product) set that scale and crush the others. SmoothQuant (Xiao et al.,
2023) divides input channel j by s_j = max|X_j|^alpha / max|W_j|^(1 - alpha) and
multiplies weight column j by s_j: the product is unchanged, the activations are flatter
and the weights (one int8 scale per output row) take the difference.

The division is folded into what produces the input, so the exported program has no
extra op:
    input_layernorm.weight / s      q_proj, k_proj, v_proj columns * s   (one s, shared input)
    post_attention_layernorm / s    gate_proj, up_proj columns * s
    v_proj rows / s                 o_proj columns * s   (s per kv-head channel: o_proj's input
                                    is softmax(...) @ V, so a V channel scales the same channel
                                    of every query head that reads that kv head)
    up_proj rows / s                down_proj columns * s   (up is linear in its output, gate
                                    is not: silu(g) * (u / s) = (silu(g) * u) / s)
Exact in real arithmetic; in fp32 the logits move by rounding only (tested).

max|X_j| comes from a calibration pass over a text file (`calibrate`). Only 8-bit linears
gain from this: 4-bit asymmetric weights (8da4w/4w) reproduce a Q4_1 source grid exactly,
which rescaled columns would no longer sit on, so scheme.py smooths int8 only.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn


# Which pairs of (producer, consumers) are smoothed; weights.py records the ones used.
PAIRS = ("qkv", "gate_up", "v_o", "up_down")
PAIR_NAMES = {"qkv": "q/k/v (input_layernorm)", "gate_up": "gate/up (post_attention_layernorm)",
              "v_o": "o_proj (v_proj rows)", "up_down": "down_proj (up_proj rows)"}
# What `edgectl quantize --smoothquant` folds. up_down is left out: on SmolLM2-135M int8
# (eager, 2048 tokens of WikiText-2 validation) it alone raised perplexity at alpha 0.5
# (+1.77% vs +1.05% unsmoothed) and 0.8 (+3.10%, KL doubled), while q/k/v, gate/up and
# o_proj at 0.6 gave +0.31% (6144 tokens: +0.44% vs +1.56% unsmoothed).
DEFAULT_PAIRS = ("qkv", "gate_up", "v_o")
EPS = 1e-5


BUILTIN = "built-in paragraph"  # scoring.PROMPT_TEXT: calibration without a text file
WINDOW = 512  # calibration window (tokens); the same for `quantize` and `export --scheme`


def calibration_windows(ckpt, text_file: Path | None, n_tokens: int,
                        max_seq_len: int | None = None) -> tuple[list[list[int]], str]:
    """(windows of token ids, what they are) from the first `n_tokens` tokens of `text_file`,
    or of edgectl's built-in paragraph when None."""
    from edgectl.util.scoring import PROMPT_TEXT, ppl_windows
    from edgectl.util.errors import EdgectlError
    from edgectl.runtime.tokenizer import Tokenizer

    args = ckpt.args
    tok = Tokenizer(ckpt.tokenizer_json, ckpt.tokenizer_config, args.bos_token_id, tuple(args.eos_token_ids))
    if text_file is None:
        text, what = PROMPT_TEXT, BUILTIN
    else:
        try:
            text, what = Path(text_file).read_text(encoding="utf-8", errors="replace"), str(text_file)
        except OSError as e:
            raise EdgectlError(f"--calibration {text_file}: cannot read ({e.strerror})") from e
    ids = tok.encode(text, bos=False)[:n_tokens]
    window = min(WINDOW, args.max_position_embeddings, max_seq_len or WINDOW)
    wins = ppl_windows(ids, window, tok.bos_id if tok.add_bos else None)
    if not wins:
        raise EdgectlError(f"{what}: too little text to calibrate on")
    return wins, what


@torch.no_grad()
def calibrate(model, windows: list[list[int]]) -> dict[str, torch.Tensor]:
    """max |x_j| over every calibration token, per input channel of every decoder linear
    (keyed by the linear's module name in `model`)."""
    amax: dict[str, torch.Tensor] = {}
    hooks = []

    def hook(name):
        def f(_mod, inputs):
            x = inputs[0].detach().reshape(-1, inputs[0].shape[-1]).abs().amax(0).float()
            amax[name] = x if name not in amax else torch.maximum(amax[name], x)
        return f

    for name, m in model.named_modules():
        if isinstance(m, nn.Linear) and name.startswith("layers."):
            hooks.append(m.register_forward_pre_hook(hook(name)))
    try:
        for w in windows:
            T = len(w)
            model(torch.tensor([w]), torch.arange(T), torch.arange(T)[-1:], *model.empty_caches())
    finally:
        for h in hooks:
            h.remove()
    return amax


def _scales(x_max: torch.Tensor, w_max: torch.Tensor, alpha: float) -> torch.Tensor:
    s = x_max.clamp_min(EPS).pow(alpha) / w_max.clamp_min(EPS).pow(1 - alpha)
    return s.clamp_min(EPS)


@torch.no_grad()
def smooth(model, amax: dict[str, torch.Tensor], alpha: float, pairs=PAIRS, layers=None) -> dict:
    """Fold SmoothQuant scales into `model` (an fp32 Transformer, in place) for `pairs`.
    Returns {"pairs": [...], "layers": n, "max_scale": ..., "min_scale": ...}."""
    bad = set(pairs) - set(PAIRS)
    if bad:
        raise ValueError(f"unknown smoothing pairs {sorted(bad)}")
    lo, hi = float("inf"), 0.0
    done = 0
    for i, blk in enumerate(model.layers):
        if layers is not None and i not in layers:
            continue
        p = f"layers.{i}."
        at, mlp = blk.self_attn, blk.mlp
        used = []
        if "qkv" in pairs:
            used.append(_fold_norm(blk.input_layernorm, [at.q_proj, at.k_proj, at.v_proj], amax[p + "self_attn.q_proj"], alpha))
        if "gate_up" in pairs:
            mlp_norm = blk.pre_feedforward_layernorm if blk.sandwich else blk.post_attention_layernorm
            used.append(_fold_norm(mlp_norm, [mlp.gate_proj, mlp.up_proj],
                                   amax[p + "mlp.gate_proj"], alpha))
        if "v_o" in pairs:
            used.append(_fold_v_o(at, amax[p + "self_attn.o_proj"], alpha))
        if "up_down" in pairs:
            s = _scales(amax[p + "mlp.down_proj"], mlp.down_proj.weight.abs().amax(0), alpha)
            _rows_div(mlp.up_proj, s)
            mlp.down_proj.weight.mul_(s)
            used.append(s)
        for s in used:
            lo, hi = min(lo, float(s.min())), max(hi, float(s.max()))
        done += 1
    return {"pairs": list(pairs), "layers": done, "min_scale": lo if done else None, "max_scale": hi if done else None}


def _rows_div(lin: nn.Linear, s: torch.Tensor) -> None:
    lin.weight.div_(s.unsqueeze(1))
    if lin.bias is not None:
        lin.bias.div_(s)


def _fold_norm(norm, linears: list[nn.Linear], x_max: torch.Tensor, alpha: float) -> torch.Tensor:
    w_max = torch.cat([lin.weight for lin in linears], 0).abs().amax(0)
    s = _scales(x_max, w_max, alpha)
    norm.weight.div_(s)
    for lin in linears:
        lin.weight.mul_(s)
    return s


def _fold_v_o(attn, x_max: torch.Tensor, alpha: float) -> torch.Tensor:
    """One scale per (kv head, channel), shared by the query heads of that kv head:
    query head h reads kv head h // rep (model.Attention's grouping)."""
    H, KV, D = attn.n_heads, attn.n_kv_heads, attn.head_dim
    rep = H // KV
    xm = x_max.view(KV, rep, D).amax(1)  # [KV, D]
    wm = attn.o_proj.weight.abs().amax(0).view(KV, rep, D).amax(1)
    s = _scales(xm, wm, alpha)  # [KV, D]
    _rows_div(attn.v_proj, s.reshape(-1))
    attn.o_proj.weight.mul_(s.unsqueeze(1).expand(KV, rep, D).reshape(1, -1))
    return s.reshape(-1)
