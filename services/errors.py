"""Errors every service shares."""


class FatalError(Exception):
    """The service cannot run as configured; the message says what to fix (exit code 2)."""
