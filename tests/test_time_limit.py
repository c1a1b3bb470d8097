"""r3.time_limit: a wall-clock limit on a block, which nests and leaves no handler or timer behind."""

import signal
import threading
import time

import pytest

from r3.time_limit import can_limit, ignore_late_alarm, time_limit

pytestmark = pytest.mark.skipif(not hasattr(signal, "setitimer"), reason="SIGALRM is POSIX only")


class Outer(Exception):
    pass


class Inner(BaseException):
    pass


def spin(seconds: float) -> None:
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        pass


@pytest.fixture(autouse=True)
def no_timer_left():
    """Each test must end with no SIGALRM timer and the handler it started with; the default
    (end the process) comes back as a handler that does nothing, so an alarm taken late is
    harmless."""
    assert signal.getitimer(signal.ITIMER_REAL)[0] == 0
    handler = signal.getsignal(signal.SIGALRM)
    yield
    assert signal.getitimer(signal.ITIMER_REAL)[0] == 0
    assert signal.getsignal(signal.SIGALRM) in ((handler,) if handler != signal.SIG_DFL else (handler, ignore_late_alarm))


def test_the_handler_before_comes_back_and_sig_dfl_as_one_that_ignores_a_late_alarm():
    mine = lambda signum, frame: None  # noqa: E731
    old = signal.signal(signal.SIGALRM, mine)
    try:
        with time_limit(1, Inner):
            assert signal.getsignal(signal.SIGALRM) is not mine
        assert signal.getsignal(signal.SIGALRM) is mine
        signal.signal(signal.SIGALRM, signal.SIG_DFL)
        with time_limit(1, Inner):
            pass
        assert signal.getsignal(signal.SIGALRM) is ignore_late_alarm
        signal.signal(signal.SIGALRM, signal.SIG_IGN)
        with time_limit(1, Inner):
            pass
        assert signal.getsignal(signal.SIGALRM) == signal.SIG_IGN
    finally:
        signal.signal(signal.SIGALRM, old)


def test_a_busy_loop_is_interrupted_with_the_error_given():
    start = time.monotonic()
    with pytest.raises(Inner):
        with time_limit(0.1, Inner):
            spin(5)
    assert time.monotonic() - start < 4


def test_a_sleep_and_a_backtracking_regex_are_interrupted():
    import re

    with pytest.raises(TimeoutError):
        with time_limit(0.1):
            time.sleep(5)
    with pytest.raises(TimeoutError):
        with time_limit(0.1):
            re.match(r"(a+)+$", "a" * 40 + "b")


def test_a_block_that_ends_in_time_raises_nothing_then_or_later():
    with time_limit(0.2, Inner):
        pass
    spin(0.3)  # (an alarm left armed would raise here)


@pytest.mark.parametrize("seconds", [None, 0, -1])
def test_no_limit_sets_no_timer(seconds):
    with time_limit(seconds, Inner):
        assert signal.getitimer(signal.ITIMER_REAL)[0] == 0
        spin(0.05)


def test_off_the_main_thread_there_is_no_limit():
    seen = {}

    def work():
        seen["can"] = can_limit()
        with time_limit(0.05, Inner):
            spin(0.2)
        seen["done"] = True

    t = threading.Thread(target=work)
    t.start()
    t.join()
    assert seen == {"can": False, "done": True} and can_limit()


def test_an_inner_limit_ends_first_then_the_outer_one_fires_at_its_own_deadline():
    start = time.monotonic()
    with pytest.raises(Outer):
        with time_limit(0.6, Outer):
            with pytest.raises(Inner):
                with time_limit(0.1, Inner):
                    spin(5)
            left = signal.getitimer(signal.ITIMER_REAL)[0]
            assert 0 < left < 0.6  # (the outer timer set again to what is left of it)
            spin(5)
    assert 0.5 < time.monotonic() - start < 4


def test_an_outer_deadline_that_comes_first_raises_the_outer_error():
    with pytest.raises(Outer):
        with time_limit(0.1, Outer):
            with time_limit(10, Inner):
                assert signal.getitimer(signal.ITIMER_REAL)[0] <= 0.1
                spin(5)


def test_an_outer_deadline_that_passed_inside_an_inner_block_that_swallowed_it_fires_again():
    """A block may catch the outer limit's error (a verifier's ``except Exception``): the outer
    limit is not lost, it fires again while the inner block runs on."""
    start = time.monotonic()
    with pytest.raises(Outer):
        with time_limit(0.1, Outer):
            with time_limit(10, Inner):
                try:
                    spin(5)
                except Outer:
                    pass
                spin(5)
    assert time.monotonic() - start < 3


def test_an_inner_error_swallowed_in_its_own_block_does_not_hold_off_the_outer_limit():
    """(sympy under a verifier's limit: its own limit's error is caught inside, again and again)"""
    start = time.monotonic()
    caught = 0
    with pytest.raises(Outer):
        with time_limit(0.5, Outer):
            with time_limit(0.1, Inner):
                end = time.monotonic() + 5
                while time.monotonic() < end:
                    try:
                        spin(0.01)
                    except Inner:
                        caught += 1
    assert 0.5 <= time.monotonic() - start < 2 and caught >= 2


def test_a_block_that_swallows_the_error_gets_it_again_and_reads_as_expired():
    """Code that catches the interruption and goes on is interrupted again every REFIRE_S; code
    that catches it and returns a result has still run out of time (``expired``)."""
    import r3.time_limit as tl

    caught = 0
    with time_limit(0.05, Inner) as limit:
        end = time.monotonic() + 3 * tl.REFIRE_S
        while time.monotonic() < end:
            try:
                spin(0.01)
            except Inner:
                caught += 1
    assert caught >= 2 and limit.fired and limit.expired
    with time_limit(0.05, Inner) as limit:
        try:
            spin(1)
        except Inner:
            pass
    assert limit.expired
    with time_limit(1, Inner) as limit:
        pass
    assert not limit.expired and not limit.fired


def test_a_block_that_cancels_the_timer_still_reads_as_expired_by_its_time():
    with time_limit(0.05, Inner) as limit:
        signal.alarm(0)  # (a verifier's own alarm, cancelled)
        spin(0.2)
    assert limit.expired and not limit.fired
    seen = {}

    def work():  # (off the main thread nothing is interrupted, but the time is still measured)
        with time_limit(0.05, Inner) as limit:
            spin(0.2)
        seen["expired"] = limit.expired

    t = threading.Thread(target=work)
    t.start()
    t.join()
    assert seen == {"expired": True}


def test_an_ignored_or_periodic_outer_timer_neither_fires_the_limit_early_nor_is_lost():
    before = signal.getsignal(signal.SIGALRM)
    try:
        signal.signal(signal.SIGALRM, signal.SIG_IGN)
        signal.setitimer(signal.ITIMER_REAL, 0.05)
        start = time.monotonic()
        with pytest.raises(Inner):
            with time_limit(0.3, Inner):
                spin(3)
        assert time.monotonic() - start >= 0.3
        ticks = []
        signal.signal(signal.SIGALRM, lambda signum, frame: ticks.append(1))
        signal.setitimer(signal.ITIMER_REAL, 0.05, 0.05)  # (a sampling profiler)
        with time_limit(1, Inner):
            spin(0.2)
        n = len(ticks)
        spin(0.3)
        assert len(ticks) > n and signal.getitimer(signal.ITIMER_REAL)[1] == pytest.approx(0.05)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, before)


def test_a_limit_the_timer_cannot_take_leaves_no_handler_behind():
    with pytest.raises(OverflowError):
        with time_limit(float("inf"), Inner):
            pass
