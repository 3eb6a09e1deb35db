"""Open what `run` and `bench` are given: a `.pte` file or a shard set directory, as one Model."""

from __future__ import annotations

from pathlib import Path

from edgectl.runtime.runtime import Model, open_pte
from edgectl.runtime.trace import Trace
from edgectl.util.errors import EdgectlError


def open_artifact(path: str | Path, trace: Trace | None = None, **shard_options) -> Model:
    """A `.pte` file, or a shard set directory with a manifest.json. `shard_options`
    (budget, mode, latency_target_ms, plan, engine) go to the shard-set runtime; a `.pte`
    takes none of them."""
    from edgectl.util.errors import UsageError

    p = Path(path)
    if p.is_dir() and (p / "manifest.json").exists():
        from edgectl.runtime.shards_runtime import ShardModel

        return ShardModel(p, trace=trace, **shard_options)
    if not p.exists():
        raise EdgectlError(f"{path}: no such file or directory")
    if p.is_dir():
        raise EdgectlError(f"{path}: a directory without manifest.json", hint="give a .pte or a shard set from `edgectl shard`")
    context = shard_options.pop("context", None)
    if any(v is not None for k, v in shard_options.items() if k != "mode") or shard_options.get("mode", "auto") != "auto":
        raise UsageError("--memory-budget/--mode/--latency-target need a shard set directory (from `edgectl shard`)")
    return open_pte(p, trace=trace, context=context if isinstance(context, int) else None)
