"""A wall-clock limit on a block of Python code, for code r3 calls but does not own (a task's
verifier, sympy): SIGALRM raises an exception in the block when the time is up, and again every
``REFIRE_S`` while the block runs on (code that swallowed the first one is interrupted again).
Pure-Python loops, ``re`` matching, big-integer arithmetic and ``time.sleep`` are interrupted; a C
call that never checks for signals is not, nor code that catches every exception in a loop. The
caller reads :attr:`Limit.expired`, not only whether the error came through: code that caught it
may have gone on to return a result. Only the main thread of a POSIX process can take SIGALRM:
elsewhere the block runs uninterrupted and ``expired`` still tells whether it ran past the limit."""

from __future__ import annotations

import signal
import threading
import time
from contextlib import contextmanager
from typing import Callable, Iterator

REFIRE_S = 0.5  # how often the error is raised again while the block runs past its deadline


def can_limit() -> bool:
    """Whether :func:`time_limit` can interrupt code here (POSIX, main thread)."""
    return hasattr(signal, "setitimer") and threading.current_thread() is threading.main_thread()


def ignore_late_alarm(signum, frame) -> None:
    """SIGALRM's handler after a limit where it had none: an alarm taken late does nothing."""


class Limit:
    """One block's limit, as :func:`time_limit` yields it."""

    def __init__(self, seconds: float | None):
        self.seconds = seconds
        self.start = time.monotonic()
        self.end: float | None = None  # (set when the block is left)
        self.fired = False  # the error was raised in the block (whatever the block did with it)

    @property
    def elapsed(self) -> float:
        return (self.end if self.end is not None else time.monotonic()) - self.start

    @property
    def expired(self) -> bool:
        """Whether the block ran past its limit (None: never)."""
        return self.fired or (self.seconds is not None and self.elapsed >= self.seconds)


@contextmanager
def time_limit(seconds: float | None, error: Callable[[], BaseException] = TimeoutError) -> Iterator[Limit]:
    """Raise ``error()`` inside the block once ``seconds`` have passed (None or <= 0: no limit),
    and again every :data:`REFIRE_S` until the block ends. Yields the :class:`Limit`.

    Limits nest: an outer limit whose deadline comes first fires at its own deadline (its handler
    raises its error), and again at each re-fire while it is overdue; on leaving the block the
    outer timer is set again to what is left of it (a deadline already passed fires at once),
    with its interval. A firing before the deadline (another timer's) is not this limit's. The
    handler before the block is put back, except that SIG_DFL (end the process) is put back as
    :func:`ignore_late_alarm`."""
    limit = Limit(seconds if seconds is not None and seconds > 0 else None)
    if limit.seconds is None or not can_limit():
        try:
            yield limit
        finally:
            limit.end = time.monotonic()
        return
    deadline = limit.start + limit.seconds
    outer_left, outer_interval = signal.getitimer(signal.ITIMER_REAL)
    outer_deadline = limit.start + outer_left if outer_left > 0 else None
    refire = min(REFIRE_S, limit.seconds)
    done = False
    previous = signal.getsignal(signal.SIGALRM)

    def expire(signum, frame):
        if done:  # (an alarm that arrived while the block was being left)
            return
        now = time.monotonic()
        if outer_deadline is not None and now >= outer_deadline and callable(previous):
            previous(signum, frame)  # the outer limit's error (a handler that does not raise returns)
        if now >= deadline:
            limit.fired = True
            raise error()
        signal.setitimer(signal.ITIMER_REAL, deadline - now, refire)  # (early: wait on for this deadline)

    try:
        signal.signal(signal.SIGALRM, expire)
        first = min(limit.seconds, outer_left) if outer_deadline is not None else limit.seconds
        signal.setitimer(signal.ITIMER_REAL, first, refire)
        yield limit
    finally:
        done = True
        limit.end = time.monotonic()
        try:
            signal.setitimer(signal.ITIMER_REAL, 0)
        finally:
            # (SIG_DFL ends the process: an alarm sent before the timer was cancelled but taken by
            # another thread after the block was left must not)
            signal.signal(signal.SIGALRM, ignore_late_alarm if previous in (None, signal.SIG_DFL) else previous)
            if outer_deadline is not None:
                signal.setitimer(signal.ITIMER_REAL, max(outer_deadline - time.monotonic(), 1e-6), outer_interval)
