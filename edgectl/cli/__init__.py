"""The command line: typer commands that parse, call one stage function and render its result."""


def entry() -> None:
    """The console script's old target (`edgectl.cli:entry`), which venvs installed before
    the CLI became a package still call; the entry point is now edgectl.cli.main:entry."""
    from edgectl.cli.main import entry as main_entry

    main_entry()
