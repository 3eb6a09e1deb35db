"""edgectl: take a Hugging Face causal LM to on-device inference with ExecuTorch."""

__version__ = "0.1.0"
