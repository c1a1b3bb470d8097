"""r3.time_limit: a wall-clock limit on a block, which nests and leaves no handler or timer behind."""

import signal
import threading
import time

import pytest

from r3.time_limit import can_limit, time_limit

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
    """Each test starts and must end with no SIGALRM timer and the default handler."""
    assert signal.getitimer(signal.ITIMER_REAL)[0] == 0
    handler = signal.getsignal(signal.SIGALRM)
    yield
    assert signal.getitimer(signal.ITIMER_REAL)[0] == 0
    assert signal.getsignal(signal.SIGALRM) is handler


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


def test_an_outer_deadline_that_passed_inside_an_inner_block_that_swallowed_it_fires_on_leaving():
    """A block may catch the outer limit's error (a verifier's ``except Exception``): the outer
    limit is not lost, it fires as soon as the inner block is left."""
    with pytest.raises(Outer):
        with time_limit(0.1, Outer):
            with time_limit(10, Inner):
                try:
                    spin(5)
                except Outer:
                    pass
            spin(5)
