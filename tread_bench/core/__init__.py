"""The leaf of the import graph: what every package may import without importing another one.

``tread_bench.core.errors.ConfigError`` is the user-facing error (run_suite prints its message as one ``error:`` line
and exits 2); ``tread_bench.core.io`` writes files atomically; ``devices`` copies to the accelerator without a host
sync; ``processes`` keeps child processes from outliving their parent and turns SIGINT / SIGTERM into one exception.
Nothing here imports another package of this project, so every other package of the project can depend on it.
"""
from .errors import CheckpointError, ConfigError
from .io import atomic_write, atomic_write_text

__all__ = ["CheckpointError", "ConfigError", "atomic_write", "atomic_write_text"]
