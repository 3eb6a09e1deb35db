"""The typer app every `edgectl` command registers on, and the options they share.

No torch/executorch import here or in any command module's top level, so `edgectl --help`
is instant. `--recipe` is an eager option: its callback loads the recipe and sets the
command's `ctx.default_map` before the other parameters take their defaults, so the
recipe's settings become defaults and flags given on the command line override them.
"""

from __future__ import annotations

from typing import Annotated, Optional

import typer

from edgectl.util.version import __version__

app = typer.Typer(
    name="edgectl",
    help="Take a Hugging Face causal LM to on-device inference with ExecuTorch.\n\n"
    "MODEL is a local Hugging Face directory, a hub id (HuggingFaceTB/SmolLM2-135M-Instruct) "
    "or a .gguf file. Add --debug anywhere for a traceback on errors.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
)

JsonOpt = Annotated[bool, typer.Option("--json", help="Print a machine-readable summary on stdout.")]
ThreadsOpt = Annotated[Optional[int], typer.Option("--threads", "-t", min=1, help="Runtime threads (default: runtime's choice).")]


def _apply_recipe(ctx: typer.Context, value: Optional[str]) -> Optional[str]:
    """`--recipe FILE|NAME` on any command: the recipe's settings as that command's defaults."""
    if value is None:
        return value
    from edgectl.recipes import command_defaults, load_recipe

    names = {p.name for p in ctx.command.params}
    defaults = command_defaults(load_recipe(value), ctx.command.name)
    ctx.default_map = {**(ctx.default_map or {}), **{k: v for k, v in defaults.items() if k in names}}
    return value


RecipeOpt = Annotated[
    Optional[str],
    typer.Option("--recipe", metavar="FILE|NAME", is_eager=True, callback=_apply_recipe,
                 help="A recipe: a TOML file, or the name of a shipped one (`edgectl recipes` lists them). Its settings become defaults; flags given here override them."),
]


def smoothquant_default(scheme: str, flag: bool | None) -> bool:
    """--smoothquant/--no-smoothquant, default: on for int8 (8-bit per-token activations),
    off for 4-bit schemes (whose asymmetric grid reproduces a Q4_1 source exactly)."""
    return scheme == "int8" if flag is None else flag


def _version(value: bool):
    if value:
        typer.echo(f"edgectl {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True, help="Show the version.")] = False,
):
    pass
