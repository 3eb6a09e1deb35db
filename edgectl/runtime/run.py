"""Run stage: open an artifact, encode a prompt, generate, and report timings."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from edgectl.runtime.generate import GenerationStats, SamplingConfig, generate


def _tokenizer(tokenizer_json: str, tokenizer_config: dict, model: dict, source: str = "the tokenizer"):
    from edgectl.runtime.tokenizer import Tokenizer

    return Tokenizer(tokenizer_json, tokenizer_config, model["bos_token_id"], tuple(model["eos_token_ids"]), source)


def tokenizer_for(model):
    """The Tokenizer that travels with an artifact's metadata."""
    if getattr(model, "tokenizer", None) is not None:  # a shard set built it while measuring start-up costs
        return model.tokenizer
    return _tokenizer(model.tokenizer_json, model.meta["tokenizer_config"], model.meta["model"])


def manifest_tokenizer(directory: str | Path):
    """The tokenizer of a shard set, from its manifest (no torch or runtime import)."""
    from edgectl.formats.manifest import Manifest

    m = Manifest.load(Path(directory))
    return _tokenizer(m.tokenizer_text(Path(directory)), m.tokenizer_config, m.model,
                      str(Path(directory) / m.tokenizer))


def artifact_tokenizer(artifact: str | Path):
    """The tokenizer of a shard set or a `.pte`, read from its files without loading the model."""
    import json

    from edgectl.formats.ptefile import constant_bytes

    if is_shard_set(artifact):
        return manifest_tokenizer(artifact)
    from edgectl.formats.integrity import require_pte

    require_pte(artifact)  # a damaged file: one line here, not a parse error
    meta = json.loads(constant_bytes(Path(artifact), "edgectl_meta"))
    return _tokenizer(constant_bytes(Path(artifact), "edgectl_tokenizer").decode(), meta["tokenizer_config"], meta["model"])


def prompt_token_ids(tok, prompt: str, chat: bool = False, system: str | None = None) -> list[int]:
    return tok.encode_chat(prompt, system) if chat else tok.encode(prompt)


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
    budget: int | None = None,
    mode: str = "auto",
    latency_target_ms: float | None = None,
    precision: str | None = None,
    plan_file: str | Path | None = None,
    context: int | None = None,
    draft: str | None = None,
    draft_tokens: int | str | None = None,
) -> dict:
    """Generate from `artifact`; `on_text` receives printable text increments as they come.
    `budget`/`mode`/`latency_target_ms` apply to a shard set (a directory with manifest.json).
    `context`: positions the run may use; with a budget, by default the prompt's tokens +
    max_new_tokens (the shard set plans its KV cache for those).
    `draft`: speculative decoding (speculative.py) with `draft_tokens` drafts per target
    call (or "auto"): `lookup[:N]`, a `.pte` or shard set path, or a precision of the shard set."""
    from edgectl.runtime.artifact import open_artifact
    from edgectl.runtime.runtime import set_threads  # loads the runtime library (no torch with the native shim)

    spec = None
    if draft is not None:
        from edgectl.runtime.speculative import parse_draft, parse_draft_tokens

        spec, draft_tokens = parse_draft(draft, artifact), parse_draft_tokens(draft_tokens)  # before anything loads
    set_threads(threads)
    shard_kw = {"precision": precision} if precision else {}
    if plan_file is not None:
        from edgectl.runtime.plan import Plan

        shard_kw["plan"] = Plan.load(plan_file)
    if context is None and budget and plan_file is None and is_shard_set(artifact):
        context = lambda tok: len(prompt_token_ids(tok, prompt, chat, system)) + max_new_tokens  # noqa: E731
    if context is not None:
        shard_kw["context"] = context
    if spec is not None and plan_file is None:
        from edgectl.runtime.speculative import plan_draft

        if counted := plan_draft(spec, draft_tokens, budget):
            shard_kw["draft"] = counted  # the plan counts the draft's memory and time
    model = open_artifact(artifact, budget=budget, mode=mode, latency_target_ms=latency_target_ms, **shard_kw)
    load_ms = model.trace.total("load") * 1e3
    tok = tokenizer_for(model)
    ids = prompt_token_ids(tok, prompt, chat, system)
    stream = tok.stream()

    def on_token(t: int) -> None:
        if t in tok.eos_ids:
            return
        text = stream.push(t)
        if text and on_text:
            on_text(text)

    sampling = SamplingConfig(temperature, top_p, seed)
    if spec is None:
        stats = generate(model, ids, max_new_tokens, tok.eos_ids, sampling, on_token)
    else:
        from edgectl.runtime.speculative import open_draft, speculative_generate

        drafter = open_draft(spec, artifact, model)
        stats = speculative_generate(model, drafter, ids, max_new_tokens, tok.eos_ids, sampling, draft_tokens, on_token)
    text_ids = [t for t in stats.tokens if t not in tok.eos_ids]
    return {
        "artifact": str(artifact),
        "text": tok.decode(text_ids),
        "tokens": stats.tokens,
        "load_ms": load_ms,
        "stats": GenerationStats.to_dict(stats),
        **({"speculative": {**stats.speculative_dict(), "draft_load_ms": _draft_load_ms(drafter)}} if spec else {}),
        **({"memory": model.memory_report(), "plan": model.plan.to_dict()} if hasattr(model, "memory_report") else {}),
    }


def _draft_load_ms(drafter) -> float:
    model = getattr(drafter, "model", None)  # a lookup draft loads nothing
    return model.trace.total("load") * 1e3 if model is not None else 0.0


def is_shard_set(artifact: str | Path) -> bool:
    return Path(artifact).is_dir() and (Path(artifact) / "manifest.json").exists()


def plan_for(artifact: str | Path, budget: int | None, mode: str = "auto", latency_target_ms: float | None = None,
             precision: str | None = None, context: int | None = None, draft: str | None = None,
             draft_tokens: int | str | None = None):
    """The plan `run` would follow (no torch import). With a budget the runtime library is
    loaded, as a run loads it, to measure the runtime floor the budget includes; with a
    `draft`, the plan counts it (speculative.plan_draft)."""
    from edgectl.util.errors import UsageError
    from edgectl.formats.manifest import Manifest
    from edgectl.runtime.planner import plan

    if not is_shard_set(artifact):
        raise UsageError(f"{artifact}: --plan needs a shard set directory (from `edgectl shard`)")
    manifest = Manifest.load(Path(artifact))
    floor = 0
    if budget:
        from edgectl.runtime.methods import engine
        from edgectl.runtime.shards_startup import rss_bytes
        from edgectl.util.native import native_stderr_captured

        with native_stderr_captured():
            native = engine()
            if native is not None:
                native.thread_count()
        floor = rss_bytes()["rss"]
    counted = None
    if draft is not None:
        from edgectl.runtime.plan_cost import draft_cost
        from edgectl.runtime.speculative import parse_draft, plan_draft

        if counted := plan_draft(parse_draft(draft, artifact), draft_tokens, budget):
            counted = draft_cost(manifest, *counted, context)
    p = plan(manifest, budget or 1 << 62, latency_target_ms, mode if budget else "resident",
             precision=precision, context=context, floor_bytes=floor, draft=counted)
    if budget:
        p.notes.append("start-up costs (tokenizer, first-execute workspace, staging) are not measured here: "
                       "a run measures them first and plans with them, so it may choose lower precisions")
    return p
