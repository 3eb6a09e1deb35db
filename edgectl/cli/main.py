"""The `edgectl` entry point: every command registered on the app, and the one place where
exceptions become exit codes and one-line messages (traceback only with --debug or
EDGECTL_DEBUG=1): 0 ok, 1 domain error, 2 usage error, 130 Ctrl-C, 143 SIGTERM.
"""

from __future__ import annotations

import os
import sys

import typer

# each command module registers its command on `app`; --help lists them in this order
from edgectl.cli import export, run, bench, quantize, shard, verify, recipes, device  # noqa: F401
from edgectl.cli.app import app
from edgectl.util.env import RUNTIME_COMMANDS, one_blas_thread
from edgectl.util.errors import EdgectlError, UsageError


def _click_modules() -> list:
    """click itself, and the copy newer typer releases vendor as typer._click."""
    import importlib

    mods = []
    for name in ("click", "typer._click"):
        try:
            mods.append(importlib.import_module(name))
        except ImportError:
            pass
    return mods


class Terminated(BaseException):
    """SIGTERM (a CI job's timeout, `kill`), raised where the main thread is, so cleanup runs
    as on Ctrl-C: bench kills its worker and removes its memory cgroup, temporary files go."""


def _on_sigterm(signum, frame):
    raise Terminated


def main(argv: list[str] | None = None) -> int:
    """Entry point. Returns the exit code: 0 ok, 1 domain error, 2 usage error, 130 Ctrl-C,
    143 SIGTERM."""
    import signal
    import threading

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _on_sigterm)
    clicks = _click_modules()
    exits = (typer.Exit, *(getattr(c.exceptions, "Exit", typer.Exit) for c in clicks))
    click_errors = tuple(c.ClickException for c in clicks)
    aborts = (typer.Abort, *(getattr(c.exceptions, "Abort", typer.Abort) for c in clicks))
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv or os.environ.get("EDGECTL_DEBUG") == "1"
    argv = [a for a in argv if a != "--debug"]
    if next((a for a in argv if not a.startswith("-")), None) in RUNTIME_COMMANDS:
        one_blas_thread()
    try:
        rc = app(args=argv, prog_name="edgectl", standalone_mode=False)
        return rc if isinstance(rc, int) else 0
    except exits as e:
        return e.exit_code
    except click_errors as e:
        e.show()
        return e.exit_code
    except Terminated:
        print("edgectl: terminated", file=sys.stderr)
        return 143
    except (KeyboardInterrupt, *aborts):
        print("edgectl: interrupted", file=sys.stderr)
        return 130
    except EdgectlError as e:
        if debug:
            raise
        msg = f"edgectl: error: {e}"
        if e.hint:
            msg += f" ({e.hint})"
        print(msg, file=sys.stderr)
        return 2 if isinstance(e, UsageError) else 1
    except Exception as e:  # an edgectl bug or an unexpected library failure
        if debug:
            raise
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        print(f"edgectl: internal error: {type(e).__name__}: {first} (rerun with --debug for the traceback)", file=sys.stderr)
        return 1


def entry() -> None:
    sys.exit(main())
