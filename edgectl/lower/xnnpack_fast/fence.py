"""The version fence of the lowering speed-ups: they apply only on the torch, executorch and torchao they were written for."""

from __future__ import annotations

import functools
import os
import sys

# The versions these patches were written against and tested on (the project's pins).
WRITTEN_FOR = {"torch": "2.13.0", "executorch": "1.4.1", "torchao": "0.18.0"}


@functools.lru_cache(maxsize=1)
def version_mismatch() -> str | None:
    """None when the installed torch/executorch/torchao are the ones in WRITTEN_FOR (a
    local build tag such as torch's "+cpu" aside), else what differs."""
    import importlib.metadata as md

    found = {}
    for name in WRITTEN_FOR:
        try:
            found[name] = md.version(name).split("+")[0]
        except md.PackageNotFoundError:
            found[name] = "not installed"
    diff = [f"{n} {found[n]} (written for {v})" for n, v in WRITTEN_FOR.items() if found[n] != v]
    return ", ".join(diff) or None


_noticed: list[str] = []


def enabled() -> bool:
    """Whether the lowering speed-ups apply: not with EDGECTL_SLOW_EXPORT=1, and only on
    the exact versions they were written for (one notice on stderr per process if not)."""
    if os.environ.get("EDGECTL_SLOW_EXPORT") == "1":
        return False
    why = version_mismatch()
    if why is not None:
        if not _noticed:
            _noticed.append(why)
            print(f"edgectl: note: ExecuTorch's stock lowering path (slower): edgectl's lowering speed-ups "
                  f"patch private internals and were written for other versions: {why}", file=sys.stderr)
        return False
    return True
