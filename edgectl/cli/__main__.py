"""`python -m edgectl.cli`: the same as the `edgectl` command."""

from edgectl.cli.main import entry

entry()
