"""A wall-clock limit on a block of Python code, for code r3 calls but does not own (a task's
verifier, sympy): SIGALRM raises an exception in the block when the time is up. Pure-Python
loops, ``re`` matching and big-integer arithmetic are interrupted; a C call that never checks
for signals is not. Only the main thread of a POSIX process can take SIGALRM: elsewhere the
block runs without a limit."""

from __future__ import annotations

import signal
import threading
import time
from contextlib import contextmanager
from typing import Callable, Iterator


def can_limit() -> bool:
    """Whether :func:`time_limit` can interrupt code here (POSIX, main thread)."""
    return hasattr(signal, "setitimer") and threading.current_thread() is threading.main_thread()


@contextmanager
def time_limit(seconds: float | None, error: Callable[[], BaseException] = TimeoutError) -> Iterator[None]:
    """Raise ``error()`` inside the block once ``seconds`` have passed (None or <= 0: no limit).

    Limits nest: inside another limit whose deadline comes first, that one's handler fires at its
    own deadline, and on leaving the block the outer limit's timer is set again to what is left
    of it (a deadline already passed fires at once)."""
    if not seconds or seconds <= 0 or not can_limit():
        yield
        return
    start = time.monotonic()
    outer_left = signal.getitimer(signal.ITIMER_REAL)[0]
    outer_first = 0 < outer_left <= seconds

    def expire(signum, frame):
        if outer_first and callable(previous):
            previous(signum, frame)  # the outer limit's deadline: its handler raises its error
        raise error()

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, outer_left if outer_first else seconds)
    try:
        yield
    finally:
        try:
            signal.setitimer(signal.ITIMER_REAL, 0)
        finally:
            signal.signal(signal.SIGALRM, previous)
            if outer_left > 0:
                signal.setitimer(signal.ITIMER_REAL, max(outer_left - (time.monotonic() - start), 1e-6))
