"""Process settings made before torch is imported: one BLAS thread for run/bench, quiet import logs."""

# Commands that run ExecuTorch programs. A stock-interface program's llama::custom_sdpa
# calls MKL from the runtime's own pool threads, and MKL's OpenMP threads (sized when
# torch loads) then fight that pool for the cores: a 64-token SmolLM2 prefill took
# 111 ms instead of 43 ms on 2 cores, and greedy text varied run to run (MKL split its
# sums differently). XNNPACK does not use OpenMP.
RUNTIME_COMMANDS = ("run", "bench")


def one_blas_thread() -> None:
    """One MKL/OpenMP thread per calling thread; call before torch is imported. A user's
    own OMP_NUM_THREADS/MKL_NUM_THREADS wins."""
    import os

    os.environ.setdefault("OMP_NUM_THREADS", "1")
    os.environ.setdefault("MKL_NUM_THREADS", "1")


NOISY_LOGGERS = ("torchao", "torch.utils._pytree")


def quiet_import_logs() -> None:
    """Before torch/executorch/torchao are imported: torchao logs a warning for each
    optional CUDA extension it cannot load, and torch's pytree one for an enum torchao
    registers. Harmless on CPU; EDGECTL_DEBUG=1 shows them."""
    import logging
    import os

    if os.environ.get("EDGECTL_DEBUG") == "1":
        return
    for name in NOISY_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)
