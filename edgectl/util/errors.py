"""Error types the CLI turns into one-line messages (exit 1), or usage errors (exit 2)."""


class EdgectlError(Exception):
    """A domain error: bad input, missing file, unsupported model. Exit code 1.

    `hint` is an optional second sentence telling the user what to do.
    """

    def __init__(self, message: str, hint: str | None = None):
        super().__init__(message)
        self.hint = hint


class UsageError(EdgectlError):
    """The command line itself is wrong (bad flag combination or value). Exit code 2."""
