"""The command line: typer commands that parse, call one stage function and render its result."""
