"""ExecuTorch's LLM custom ops (llama::update_cache, llama::custom_sdpa), registered for export and for the runtime."""

from __future__ import annotations


def load_custom_ops() -> None:
    """Register llama::update_cache / llama::custom_sdpa (eager, export and the Python
    runtime). `run` and `bench` keep custom_sdpa's MKL calls on one thread (edgectl.util.env.one_blas_thread)."""
    from executorch.extension.llm.custom_ops import custom_ops  # noqa: F401
