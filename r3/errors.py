"""User-facing errors: CLIs print the one-line message and exit with code 2, no traceback."""

from __future__ import annotations

import argparse
import errno
import functools
import os
import shutil
import signal
import sys
import traceback


class R3Error(Exception):
    """A mistake in the user's input (a path, a file, a flag, a config field).

    The message is a single line that names the offending file, field or value.
    """


def cli_main(fn):
    """Wrap a CLI entry point: R3Error -> one line on stderr and exit 2."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        previous = _raise_on_sigterm()
        try:
            return fn(*args, **kwargs)
        except Terminated:
            # (a preemption outside a part that handles it: loading, an evaluation, the export;
            # every write is atomic or resumable, so a rerun of the same command goes on)
            print("terminated", file=sys.stderr)
            raise SystemExit(128 + signal.SIGTERM)
        except R3Error as e:
            # one write call: ranks that fail together do not interleave their lines
            sys.stderr.write(f"error: {e}\n")
            sys.stderr.flush()
            raise SystemExit(2)
        except KeyboardInterrupt:
            print("interrupted", file=sys.stderr)
            raise SystemExit(130)
        except (RuntimeError, MemoryError) as e:
            if not _out_of_memory(e):
                raise
            # a size that does not fit the device: the settings', not a bug (torch's first line
            # says how much was asked and is free, up to its pointer to the docs)
            first = (str(e).strip().splitlines() or [type(e).__name__])[0].split("  See documentation")[0].strip()
            sys.stderr.write(f"error: out of memory{_where(e)} ({first}); use smaller batches (--batch-size, --num-samples; "
                             "--group-size or --micro-batch-size in training) or token limits, or a device with more "
                             "memory (an evaluation keeps its finished batches for the same --batch-size only)\n")
            sys.stderr.flush()
            raise SystemExit(2)
        except OSError as e:
            if e.errno not in (errno.ENOSPC, errno.EDQUOT):
                raise
            # a full disk or quota: the machine's state, not a bug (runs and outputs are written
            # atomically or resumably, so a rerun after freeing space loses nothing)
            where = ""
            if e.filename:
                free = free_space_at(e.filename)
                where = f" writing {e.filename}" + (f" ({free})" if free else "")
            sys.stderr.write(f"error: {e.strerror}{where}; free space and run the command again\n")
            sys.stderr.flush()
            raise SystemExit(2)
        finally:
            if previous is not None:
                signal.signal(signal.SIGTERM, previous)

    return wrapper


def free_space_at(path, *, mark_low: bool = False) -> str:
    """``N GiB free on that disk`` for the disk that holds ``path`` (or its nearest existing
    folder: a failed write may have left no file), with ``(full?)`` under 1 GiB if ``mark_low``
    (for a reason that may not say the disk is full), or nothing when that cannot be read."""
    where = os.path.abspath(os.fsdecode(path))
    while not os.path.exists(where) and os.path.dirname(where) != where:
        where = os.path.dirname(where)
    try:
        free = shutil.disk_usage(where).free
    except OSError:
        return ""
    return f"{free / 2**30:.2f} GiB free on that disk" + (" (full?)" if mark_low and free < 2**30 else "")


class Terminated(BaseException):
    """SIGTERM (a preemption, ``kill``), raised where the work is, as Ctrl-C raises
    KeyboardInterrupt: :func:`cli_main` says so in one line and exits with 128 + SIGTERM."""


def _raise_on_sigterm():
    """Make SIGTERM raise :class:`Terminated` (its default ends the process at once, without a
    word) unless someone else handles it; returns the handler to restore, or None."""
    def terminated(signum, frame):
        raise Terminated

    try:
        if signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL:
            return None
        return signal.signal(signal.SIGTERM, terminated)
    except ValueError:  # (not the main thread: signals are left alone)
        return None


def _out_of_memory(e: BaseException) -> bool:
    """torch's ``OutOfMemoryError`` (a GPU's), its CPU allocator's refusal (a RuntimeError), or
    Python's (a MemoryError: a list of a --batch-size typo's size)."""
    return (isinstance(e, MemoryError) or type(e).__name__ == "OutOfMemoryError"
            or "DefaultCPUAllocator: can't allocate memory" in str(e))


def _where(e: BaseException) -> str:
    """`` at FILE:LINE in FUNCTION`` for the innermost frame outside torch that raised ``e`` (r3's
    files relative to the package's parent): an allocation from a bug (a stray [V, V] tensor) is
    then found without the traceback the one-line message leaves out."""
    torch_dir = os.path.join(os.path.dirname(os.path.abspath(sys.modules["torch"].__file__)), "") \
        if "torch" in sys.modules else None

    cache = os.environ.get("TORCHINDUCTOR_CACHE_DIR")

    def generated(path: str) -> bool:  # torch's too: FX's <eval_with_key>, inductor's output files
        return path.startswith("<") or "torchinductor_" in path or bool(cache and path.startswith(cache))

    frames = [f for f in traceback.extract_tb(e.__traceback__) if not generated(f.filename)
              and not (torch_dir and os.path.abspath(f.filename).startswith(torch_dir))]
    if not frames:
        return ""
    f = frames[-1]
    path = os.path.abspath(f.filename)
    ours = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    if path.startswith(os.path.join(ours, "r3", "")):
        path = os.path.relpath(path, ours)
    return f" at {path}:{f.lineno} in {f.name}"


class ArgumentParser(argparse.ArgumentParser):
    """argparse whose mistakes are an R3Error (one line, exit 2 under :func:`cli_main`) instead of
    usage text."""

    def error(self, message):
        raise R3Error(f"{self.prog}: {message} (see --help)")


def positive_int(name: str, value, allow_none: bool = False):
    """``value`` when it is an int >= 1 (or None with ``allow_none``), else an R3Error naming ``name``."""
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise R3Error(f"{name} must be a positive integer, got {value!r}")
    return value
