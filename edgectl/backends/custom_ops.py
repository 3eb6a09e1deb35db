"""ExecuTorch's LLM custom ops (llama::update_cache, llama::custom_sdpa), registered for eager torch, export and the runtime."""

from __future__ import annotations


def load_custom_ops() -> None:
    """Register llama::update_cache / llama::custom_sdpa with torch (the eager model's
    attention, and export). Their eager kernels log "No temp allocator provided" on every
    call (model.Transformer has the native shim filter it). `run` and `bench` keep
    custom_sdpa's MKL calls on one thread (edgectl.util.env.one_blas_thread)."""
    from executorch.extension.llm.custom_ops import custom_ops  # noqa: F401
