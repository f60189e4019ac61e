"""Errors a user can hit."""


class MisconfigurationError(ValueError):
    """Bad arguments or config: the message says what to change."""
