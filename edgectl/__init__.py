"""edgectl: take a Hugging Face causal LM to on-device inference with ExecuTorch.

The Python API is `edgectl.export(model, path, ...)` and `edgectl.load(path, ...)`; the
command line is `edgectl` (edgectl.cli). Importing this package imports no torch.
"""

from edgectl.api import export, load
from edgectl.util.version import __version__

__all__ = ["__version__", "export", "load"]
