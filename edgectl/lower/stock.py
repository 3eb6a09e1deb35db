"""ExecuTorch's stock LLM-runner interface for a monolithic `.pte` (`export --interface stock`).

The runners ExecuTorch ships (`llama_main` on Linux/Android, the iOS and Android demo
apps, `executorch.extension.llm.runner.TextLLMRunner`) call

    forward(tokens [1, T], input_pos [1]) -> logits [1, vocab] (of the last token)

and keep no KV cache of their own. So in this form the cache lives inside the program as
mutable buffers, [1, S, KV, D] per layer (position-major, as everywhere in edgectl),
which the model's own attention writes in place (`llama::update_cache` at input_pos,
then `llama::custom_sdpa` over positions < input_pos + T only; see model.py). Both ops
come with ExecuTorch's LLM custom-op library, which the stock runners link. The token embedding is inside the program too
(a quantized one as index_select + dequantize in portable kernels), so a tied matrix is
stored twice here: once as the embedding's codes, once in the output head's XNNPACK blob.

The runners read these constant methods: get_max_seq_len (tokens per call: the prefill
chunk), get_max_context_len (cache positions), get_vocab_size, get_bos_id, get_eos_ids,
use_kv_cache, enable_dynamic_shape, use_sdpa_with_kv_cache. edgectl's own `edgectl_meta`
and `edgectl_tokenizer` travel too, so `edgectl run`/`bench` take the file as well
(runtime.StockPteModel), and `export` writes the tokenizer file the stock runners want
beside it.
"""

from __future__ import annotations

import torch
from torch import nn

from edgectl.backends.custom_ops import load_custom_ops

KV_LAYOUT = "bskd-buffers/1"  # the cache: [1, S, KV, D] mutable buffers inside the program
STOCK_IO = "forward(tokens[1,T], input_pos[1]) -> logits[1,V]; KV cache in mutable buffers (llama::update_cache, llama::custom_sdpa)"


class StockTransformer(nn.Module):
    """Our Transformer with its KV cache inside, in the stock runners' calling convention.
    Runs the model's own modules (embedding, Blocks with their one attention, head), so
    the numerics are the ones every other edgectl program runs."""

    def __init__(self, model, cache_len: int):
        super().__init__()
        load_custom_ops()
        self.model, self.cache_len = model, cache_len
        args = model.args
        # every layer's cache whole, a sliding layer's too (a ring of S slots, never wrapped):
        # the stock runners choose their calls, which a ring would need split at its end
        shape = (1, cache_len, args.n_kv_heads, args.head_dim)
        for i in range(args.n_layers):
            self.register_buffer(f"k_cache_{i}", torch.zeros(shape), persistent=False)
            self.register_buffer(f"v_cache_{i}", torch.zeros(shape), persistent=False)

    def forward(self, tokens, input_pos):
        m, T = self.model, tokens.shape[1]
        start = input_pos[0].item()
        torch._check(start >= 0)
        torch._check(start + T <= self.cache_len)
        ropes = m.rope(torch.arange(T) + input_pos[:1])
        x = m.embed(tokens)
        for i, layer in enumerate(m.layers):
            x = layer(x, *ropes[layer.rope_kind], getattr(self, f"k_cache_{i}"), getattr(self, f"v_cache_{i}"), start)
        return m.head.logits(x[:, -1])  # [1, vocab]


def example(chunk: int):
    from torch.export import Dim

    # a dynamic dim's example must not be 1
    return (torch.zeros(1, 2, dtype=torch.long), torch.tensor([0])), ({1: Dim("T", min=1, max=chunk)}, None)


def constant_methods(meta: dict, chunk: int) -> dict:
    args = meta["model"]
    eos = list(args["eos_token_ids"]) or [-1]
    return {
        "get_max_seq_len": chunk,
        "get_max_context_len": meta["max_seq_len"],
        "get_vocab_size": args["vocab_size"],
        "get_bos_id": args["bos_token_id"] if args["bos_token_id"] is not None else -1,
        "get_eos_ids": eos,
        "get_n_layers": args["n_layers"],
        "use_kv_cache": True,
        "enable_dynamic_shape": True,
        "use_sdpa_with_kv_cache": True,
    }


def tokenizer_file(ckpt, pte) -> tuple[str, bytes]:
    """(path, bytes) of the tokenizer file the stock runners take (`--tokenizer_path`),
    beside the `.pte`: a SentencePiece checkpoint's own tokenizer.model (the runners'
    HF-json reader does not take the JSON converted from it), else tokenizer.json."""
    from pathlib import Path

    pte = Path(pte)
    sp = ckpt.path / "tokenizer.model" if ckpt.path.is_dir() else None
    if sp is not None and sp.is_file():
        return str(pte.with_name(pte.stem + ".tokenizer.model")), sp.read_bytes()
    return str(pte.with_name(pte.stem + ".tokenizer.json")), ckpt.tokenizer_json.encode()
