"""Everything the user sees besides results: progress and messages on stderr."""

from __future__ import annotations

import contextlib
import json
import sys
import time

from rich.console import Console

err = Console(stderr=True, highlight=False, soft_wrap=True)


def info(msg: str) -> None:
    err.print(msg)


def warn(msg: str) -> None:
    err.print(f"[yellow]warning:[/yellow] {msg}")


def emit_json(obj) -> None:
    """A result for machines, on stdout."""
    sys.stdout.write(json.dumps(obj, indent=2, default=str) + "\n")
    sys.stdout.flush()


@contextlib.contextmanager
def stages(title: str):
    """A spinner naming the current stage (TTY) or one line per stage (logs), on stderr.

    Yields a callback `step(name)` for library code: each call starts a new stage and
    reports how long the previous one took.
    """
    t0 = time.perf_counter()
    state = {"name": None, "t": t0}

    def done_line():
        if state["name"] is not None:
            err.print(f"  [green]✓[/green] {state['name']} [dim]({time.perf_counter() - state['t']:.1f}s)[/dim]")

    if err.is_terminal:
        with err.status(title) as status:

            def step(name: str) -> None:
                done_line()
                state.update(name=name, t=time.perf_counter())
                status.update(f"{title}: {name}")

            yield step
            done_line()
    else:

        def step(name: str) -> None:
            done_line()
            state.update(name=name, t=time.perf_counter())

        yield step
        done_line()


def progress_bar(total: int, description: str):
    """A rich progress bar for per-item work (layers, shards, windows); silent off a TTY."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    return Progress(
        TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
        console=err, disable=not err.is_terminal, transient=False,
    )
