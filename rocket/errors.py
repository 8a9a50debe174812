"""Error types of rocket: every user-facing error is a one-line RocketError naming its subject."""


class RocketError(ValueError):
    """Bad input or configuration; the message names the file, field, adapter or shape at fault."""
