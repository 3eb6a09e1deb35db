"""`edgectl recipes`: list the recipes that ship with edgectl."""

from __future__ import annotations

import typer

from edgectl.cli.app import JsonOpt, app


@app.command("recipes")
def recipes_cmd(json_out: JsonOpt = False):
    """List the recipes that ship with edgectl (use one with --recipe NAME on any command).

    Example: edgectl export --recipe smollm2-135m-android -o smollm2.pte
    """
    from edgectl.util import ui
    from edgectl.recipes import recipe_index

    index = recipe_index()
    if json_out:
        ui.emit_json(index)
        return
    width = max((len(r["name"]) for r in index), default=0)
    for r in index:
        typer.echo(f"{r['name']:<{width}}  {r['description']}")
