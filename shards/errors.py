"""The project's user-facing error: raised for bad input or configuration, printed by the CLI without a traceback."""


class XvlmError(Exception):
    """An error the user can fix; the message says what to do."""
