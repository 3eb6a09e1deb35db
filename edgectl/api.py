"""The Python API beside the CLI: export a model, load an artifact, stream generated text.

    import edgectl

    edgectl.export("HuggingFaceTB/SmolLM2-135M-Instruct", "smollm2.pte", scheme="8da4w")
    with edgectl.load("smollm2.pte") as llm:
        for piece in llm.generate("Once upon a time", max_new_tokens=32):
            print(piece, end="", flush=True)

`load` takes a `.pte` or a shard set directory; with `memory_budget` a shard set is
planned and streamed as `edgectl run --memory-budget` does. The CLI and this API call
the same stage functions.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path


def export(model: str | Path, path: str | Path, *, backend: str = "xnnpack", max_seq_len: int | None = None,
           scheme: str | None = None, group_size: int = 32, embedding: str = "none", mapping: str = "asymmetric",
           interface: str = "edgectl", prefill_chunk: int | None = None):
    """Export `model` (hub id, Hugging Face directory, .gguf or `edgectl quantize` output)
    to one `.pte` at `path`, as `edgectl export` does; `scheme` ("int8", "8da4w", "4w")
    quantizes in memory first. Returns the ExportResult (path, bytes, seconds, ...)."""
    from edgectl.checkpoint.checkpoint import resolve
    from edgectl.lower.export import export_pte

    qs = None
    if scheme is not None:
        from edgectl.quant.quantize import QuantScheme

        qs = QuantScheme(scheme, group_size, embedding, 32, mapping=mapping, smoothquant=scheme == "int8")
    return export_pte(resolve(str(model)), Path(path), backend=backend, max_seq_len=max_seq_len, scheme=qs,
                      prefill_chunk=prefill_chunk, interface=interface)


def load(path: str | Path, memory_budget: int | str | None = None, *, context: int | None = None,
         mode: str = "auto", precision: str | None = None, latency_target_ms: float | None = None,
         threads: int | None = None) -> "LLM":
    """Open a `.pte` or a shard set for generation. `memory_budget` (bytes, or "150MB")
    plans a shard set under that budget; `context` is the most positions one generation
    may use (prompt + new tokens; default the artifact's max_seq_len), which is what the
    KV cache is sized, and with a budget charged, for."""
    from edgectl.runtime.artifact import open_artifact
    from edgectl.runtime.runtime import set_threads

    options: dict = {}
    if memory_budget is not None:
        from edgectl.runtime.plan import parse_bytes

        options.update(budget=parse_bytes(memory_budget) if isinstance(memory_budget, str) else int(memory_budget),
                       mode=mode, latency_target_ms=latency_target_ms)
    if precision is not None:
        options["precision"] = precision
    if context is not None:
        options["context"] = context
    set_threads(threads)
    return LLM(open_artifact(path, **options))


class LLM:
    """A loaded artifact and its tokenizer. `generate` yields text as it is produced;
    `last_stats` holds the figures of the last finished generation."""

    def __init__(self, model):
        from edgectl.runtime.run import tokenizer_for

        self.model = model
        self.tokenizer = tokenizer_for(model)
        self.last_stats: dict | None = None

    @property
    def max_seq_len(self) -> int:
        return self.model.max_seq_len

    def generate(self, prompt: str, max_new_tokens: int = 128, temperature: float = 0.0, top_p: float = 1.0,
                 seed: int | None = None, chat: bool = False, system: str | None = None) -> Iterator[str]:
        """Yield printable pieces of the continuation of `prompt` (or, with `chat`, the
        answer to it) until EOS, `max_new_tokens` or the context is full."""
        from edgectl.runtime.generate import Generation, SamplingConfig
        from edgectl.runtime.run import prompt_token_ids

        tok = self.tokenizer
        run = Generation(self.model, prompt_token_ids(tok, prompt, chat, system), max_new_tokens, tok.eos_ids,
                         SamplingConfig(temperature, top_p, seed))
        stream = tok.stream()
        for t in run:
            if t not in tok.eos_ids and (text := stream.push(t)):
                yield text
        self.last_stats = run.stats.to_dict()

    def close(self) -> None:
        close = getattr(self.model, "close", None)
        if close:
            close()

    def __enter__(self) -> "LLM":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
