"""User-facing errors: one line, no traceback, a non-zero exit in the CLI."""


class ChimeraError(Exception):
    """An error caused by the user's input or environment, with a message that says what is wrong."""
