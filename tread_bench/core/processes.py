"""Child processes that never outlive the process that started them, and a clean stop on SIGINT / SIGTERM."""
from __future__ import annotations

import ctypes
import os
import signal
from contextlib import contextmanager
from typing import Iterator

PR_SET_PDEATHSIG = 1  # linux/prctl.h


class Stopped(BaseException):
    """SIGINT or SIGTERM arrived. A BaseException, as KeyboardInterrupt: ``except Exception`` around one run's
    training must not turn a stop into that run's failure and go on with the next run."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


@contextmanager
def stop_on_signals() -> Iterator[None]:
    """While inside: SIGINT and SIGTERM raise :class:`Stopped` in the main thread (call it from there)."""
    def stop(signum, frame):
        raise Stopped(signum)

    previous = {s: signal.signal(s, stop) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def die_with_parent(parent_pid: int) -> None:
    """In a child process: the kernel sends it SIGTERM when its parent dies, even by kill -9 (Linux prctl
    PR_SET_PDEATHSIG); it exits now if the parent is already gone. SIGINT is left to the parent, which stops its
    children itself (a Ctrl-C reaches every process of the terminal's group)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    try:
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    except (OSError, AttributeError):  # not Linux: the parent's handler still stops its children
        pass
    if os.getppid() != parent_pid:
        os._exit(1)
