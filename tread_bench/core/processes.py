"""Child processes that never outlive the process that started them, and a clean stop on SIGINT / SIGTERM."""
from __future__ import annotations

import ctypes
import multiprocessing
import os
import queue as queue_module
import signal
import threading
import time
import traceback
from contextlib import contextmanager
from typing import Callable, Iterator

from .errors import ConfigError

PR_SET_PDEATHSIG = 1  # linux/prctl.h


class Stopped(BaseException):
    """SIGINT or SIGTERM arrived. A BaseException, as KeyboardInterrupt: ``except Exception`` around one run's
    training must not turn a stop into that run's failure and go on with the next run."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


@contextmanager
def stop_on_signals() -> Iterator[None]:
    """While inside: the first SIGINT or SIGTERM raises :class:`Stopped` in the main thread (call it from there);
    from then on both are ignored, so a second Ctrl-C can neither interrupt the stop nor print a traceback."""
    stopped = []

    def stop(signum, frame):
        for s in STOP_SIGNALS:
            signal.signal(s, signal.SIG_IGN)
        stopped.append(signum)
        raise Stopped(signum)

    previous = {s: signal.signal(s, stop) for s in STOP_SIGNALS}
    try:
        yield
    finally:
        if not stopped:
            for s, handler in previous.items():
                signal.signal(s, handler)


@contextmanager
def spawning_children() -> Iterator[None]:
    """Around starting child processes (in the main thread): SIGINT and SIGTERM are held, not lost (delivered as
    the block ends), and SIGINT is ignored, which a spawned child inherits from birth. A Ctrl-C then reaches the
    suite, which ends its children itself (:func:`end_children`), and never a child still importing torch."""
    if threading.current_thread() is not threading.main_thread():  # only the main thread may set handlers
        yield
        return
    held = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    handler = signal.signal(signal.SIGINT, signal.SIG_IGN)  # Linux keeps a blocked signal pending even if ignored
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, handler)
        signal.pthread_sigmask(signal.SIG_SETMASK, held)


def end_children(grace: float = 3.0) -> None:
    """End every live child process multiprocessing started here, whether still starting up or working: SIGTERM,
    then SIGKILL for any alive after ``grace`` seconds; each is reaped."""
    children = multiprocessing.active_children()
    for child in children:
        child.terminate()
    deadline = time.monotonic() + grace
    for child in children:
        child.join(max(0.0, deadline - time.monotonic()))
    for child in children:
        if child.is_alive():
            child.kill()
            child.join(1.0)


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


def _child(fn: Callable, args: tuple, results, parent_pid: int) -> None:
    die_with_parent(parent_pid)
    try:
        results.put(("ok", fn(*args)))
    except ConfigError as err:
        results.put(("config", str(err)))
    except BaseException as err:  # reported to the parent as the run's failure, with the traceback
        traceback.print_exc()
        results.put(("error", f"{type(err).__name__}: {err}".splitlines()[0]))


def run_in_fresh_process(fn: Callable, *args):
    """``fn(*args)`` in a new spawned process (fn and args picklable); returns its value. A ConfigError in it is
    raised here; any other failure, or the process being killed (e.g. by the kernel's OOM killer), raises
    RuntimeError with one line saying what happened."""
    ctx = multiprocessing.get_context("spawn")
    results = ctx.Queue()
    proc = ctx.Process(target=_child, args=(fn, args, results, os.getpid()))
    with spawning_children():  # a Ctrl-C meanwhile reaches this process, never the child still starting up
        proc.start()
    outcome = None
    try:
        while outcome is None:  # read before joining: a child blocks on exit until its queued result is read
            try:
                outcome = results.get(timeout=2)
            except queue_module.Empty:
                if not proc.is_alive():
                    try:
                        outcome = results.get(timeout=2)  # put just before it exited
                    except queue_module.Empty:
                        break
    except Stopped:
        proc.terminate()  # its checkpoint is atomic: a stop mid-save leaves the previous one
        proc.join()
        raise
    proc.join()
    if outcome is None:
        code = proc.exitcode
        how = (f"killed by signal {signal.Signals(-code).name}" if code is not None and code < 0
               else f"exited with code {code}")
        hint = " (SIGKILL: most likely the kernel's out-of-memory killer)" if code == -signal.SIGKILL else ""
        raise RuntimeError(f"the run's process {how}{hint} before reporting a result")
    status, value = outcome
    if status == "config":
        raise ConfigError(value)
    if status == "error":
        raise RuntimeError(value)
    return value
