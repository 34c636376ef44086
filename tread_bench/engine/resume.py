"""Which checkpoint a run may resume: only one written under the same configuration.

A run folder holds ``config_hash``, the hash of the configuration its files were written under
(tread_bench.engine.spec.config_hash of the run's snapshot). A checkpoint is resumed only when that file matches
the current configuration and ``force`` is off; otherwise the folder's state files are deleted first,
so a changed configuration never continues from another configuration's weights.
"""
from __future__ import annotations

import fcntl
import os
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Iterable, Iterator

from tread_bench.core.io import atomic_write_text
from tread_bench.training.checkpoint import CHECKPOINT_PATHS, find_checkpoint

# the checkpoint folder (and the .new/.old folders a killed save can leave, and an old-format checkpoint.pt)
STATE_FILES = (*CHECKPOINT_PATHS, "stats.jsonl", "result.json")


def prepare_run_dir(run_dir: Path, digest: str, force: bool = False, state_files: Iterable[str] = STATE_FILES,
                    write: bool = True) -> bool:
    """Delete ``state_files`` in ``run_dir`` unless its checkpoint was written under ``digest`` (and not
    ``force``); then record ``digest``. Returns whether a checkpoint is left to resume. ``write=False``
    (processes other than rank 0) only answers."""
    run_dir = Path(run_dir)
    hash_file = run_dir / "config_hash"
    resumable = (not force and find_checkpoint(run_dir) is not None and hash_file.exists()
                 and hash_file.read_text() == digest)
    if write:
        if run_dir.exists() and not resumable:
            for stale in state_files:
                if (run_dir / stale).is_dir():
                    shutil.rmtree(run_dir / stale)
                else:
                    (run_dir / stale).unlink(missing_ok=True)
        atomic_write_text(hash_file, digest)
    return resumable


LOCK_FILE = ".lock"


class RunBusy(RuntimeError):
    """Another process holds the run folder: it is training that run now."""


@contextmanager
def run_lock(run_dir: Path, enabled: bool = True) -> Iterator[None]:
    """Hold ``run_dir`` for this process (fcntl.flock on ``<run_dir>/.lock``: the OS drops it when the process
    dies, even by kill -9) or raise RunBusy naming the holder's pid. ``enabled=False``: hold nothing (processes
    other than rank 0 of a data-parallel run, which trains under rank 0's lock)."""
    if not enabled:
        yield
        return
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    handle = open(run_dir / LOCK_FILE, "a+")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        holder = handle.read().strip() or "unknown"
        handle.close()
        raise RunBusy(f"held by another process (pid {holder}), which is training it") from None
    try:
        handle.truncate(0)
        handle.write(str(os.getpid()))
        handle.flush()
        yield
    finally:
        fcntl.flock(handle, fcntl.LOCK_UN)
        handle.close()
