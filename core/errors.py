"""The user-facing error type."""


class ConfigError(ValueError):
    """A user-facing configuration error: its message says what to change (run_suite: one line, exit code 2)."""
