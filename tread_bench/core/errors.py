"""The user-facing error type."""


class ConfigError(ValueError):
    """A user-facing configuration error: its message says what to change (run_suite: one line, exit code 2)."""


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be read (missing, truncated, corrupt, or refused by ``weights_only``). Its
    message is one line naming the file and the fix. Not a ConfigError: the suite records the run as failed
    and goes on with the next one."""
