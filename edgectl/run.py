"""Run stage: open an artifact, encode a prompt, generate, and report timings."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from edgectl.generate import SamplingConfig, generate


def tokenizer_for(model):
    """The Tokenizer that travels with an artifact's metadata."""
    from edgectl.tokenizer import Tokenizer

    m = model.meta["model"]
    return Tokenizer(model.tokenizer_json, model.meta["tokenizer_config"], m["bos_token_id"], tuple(m["eos_token_ids"]))


def run_prompt(
    artifact: str | Path,
    prompt: str,
    max_new_tokens: int = 128,
    temperature: float = 0.0,
    top_p: float = 1.0,
    seed: int | None = None,
    chat: bool = False,
    system: str | None = None,
    threads: int | None = None,
    on_text: Callable[[str], None] | None = None,
) -> dict:
    """Generate from `artifact`; `on_text` receives printable text increments as they come."""
    from edgectl.runtime import open_artifact, set_threads  # imports torch + executorch

    set_threads(threads)
    model = open_artifact(artifact)
    load_ms = model.trace.total("load") * 1e3
    tok = tokenizer_for(model)
    ids = tok.encode_chat(prompt, system) if chat else tok.encode(prompt)
    stream = tok.stream()

    def on_token(t: int) -> None:
        if t in tok.eos_ids:
            return
        text = stream.push(t)
        if text and on_text:
            on_text(text)

    stats = generate(model, ids, max_new_tokens, tok.eos_ids, SamplingConfig(temperature, top_p, seed), on_token)
    text_ids = [t for t in stats.tokens if t not in tok.eos_ids]
    return {
        "artifact": str(artifact),
        "text": tok.decode(text_ids),
        "tokens": stats.tokens,
        "load_ms": load_ms,
        "stats": stats.to_dict(),
    }
