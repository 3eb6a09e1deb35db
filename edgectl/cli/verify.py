"""`edgectl verify`: check a .pte or a shard set against its checksums."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from edgectl.cli.app import JsonOpt, app


@app.command()
def verify(
    path: Annotated[Path, typer.Argument(help="A .pte or a shard set directory.")],
    json_out: JsonOpt = False,
):
    """Check a .pte or a shard set for damage: each file against its checksum, one line each (exit 1 if any is wrong).

    Example: edgectl verify smollm2-shards/
    """
    from edgectl.util import ui
    from edgectl.runtime.verify import verify as check

    rows = check(path)
    ok = all(r["ok"] for r in rows)
    if json_out:
        ui.emit_json({"ok": ok, "files": rows})
    else:
        for r in rows:
            typer.echo(f"{r['path']}: {'OK' if r['ok'] else r['problem']}")
    return 0 if ok else 1
