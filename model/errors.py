"""The model's user-facing error (bad config, bad checkpoint, bad batch shape); the CLI prints it without a traceback."""


class ModelError(ValueError):
    """An error the user can fix; the message says what to do."""
