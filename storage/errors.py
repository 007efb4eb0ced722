"""The project's user-facing error: raised for bad input or configuration, printed by the CLI without a traceback.

It lives on the ground floor (storage/) because every package raises it; model/ keeps its own ModelError so that
it imports nothing of ours."""


class XvlmError(Exception):
    """An error the user can fix; the message says what to do."""
