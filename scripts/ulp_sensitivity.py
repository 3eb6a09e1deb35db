"""How far do a model's logits move when every block's input moves by about one float ulp?

Eager PyTorch, on this machine: each scheme's model scores the first --tokens tokens of
--text, then again with every block's input scaled by (1 + 1e-7 * N(0, 1)), and the two
logits are compared (max and mean absolute difference, argmax agreement).

Two machines (x86 and aarch64, or two kernels on one machine) round floats differently by
about that much. An fp32 program carries such a difference through almost unchanged; one with
dynamic int8 activation quantization (int8 = 8da8w, 8da4w) turns it into codes that land in
the neighbouring int8 bucket, layer after layer. So this tells how close `device_parity.py`
can expect a device's logits to be before any kernel is suspected.

  python scripts/ulp_sensitivity.py MODEL --text wiki.valid.raw [--tokens 256] [--schemes fp32,int8,8da4w]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model", help="a hub id, Hugging Face directory or .gguf file")
    ap.add_argument("--text", type=Path, required=True, help="a text file; its first --tokens tokens are scored")
    ap.add_argument("--tokens", type=int, default=256)
    ap.add_argument("--schemes", default="fp32,int8,8da4w", help="comma-separated: fp32, int8, 8da4w, 4w")
    ap.add_argument("--eps", type=float, default=1e-7, help="relative size of the perturbation")
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()

    import torch

    from edgectl.checkpoint.checkpoint import load_model, resolve
    from edgectl.quant.quant_eval import _logits
    from edgectl.quant.scheme import QuantScheme
    from edgectl.quant.weights import quantize_module

    from edgectl.runtime.tokenizer import Tokenizer

    ckpt = resolve(a.model)
    args = ckpt.args
    ids = Tokenizer(ckpt.tokenizer_json, ckpt.tokenizer_config, args.bos_token_id,
                    tuple(args.eos_token_ids)).encode(a.text.read_text())[: a.tokens]  # as device_parity.py
    out = []
    for scheme in a.schemes.split(","):
        torch.manual_seed(0)
        model = load_model(ckpt, max_seq_len=max(len(ids), 16))
        if scheme != "fp32":
            quantize_module(model, QuantScheme(linear=scheme))
        base = _logits(model, ids).float().numpy()
        hooks = [b.register_forward_pre_hook(lambda m, args: (args[0] * (1 + a.eps * torch.randn_like(args[0])),) + args[1:])
                 for b in model.layers]
        moved = _logits(model, ids).float().numpy()
        for h in hooks:
            h.remove()
        d = np.abs(moved - base)
        r = {"scheme": scheme, "tokens": len(ids), "eps": a.eps, "max_abs_logit_diff": float(d.max()),
             "mean_abs_logit_diff": float(d.mean()), "argmax_agree": float((moved.argmax(-1) == base.argmax(-1)).mean())}
        out.append(r)
        if not a.json:
            print(f"{scheme}: logits move max {r['max_abs_logit_diff']:.3g}, mean {r['mean_abs_logit_diff']:.3g}; "
                  f"argmax agrees at {r['argmax_agree']:.1%} of {len(ids)} positions", flush=True)
    if a.json:
        print(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
