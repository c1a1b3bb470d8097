"""User-facing errors: CLIs print the one-line message and exit with code 2, no traceback."""

from __future__ import annotations

import functools
import sys


class R3Error(Exception):
    """A mistake in the user's input (a path, a file, a flag, a config field).

    The message is a single line that names the offending file, field or value.
    """


def cli_main(fn):
    """Wrap a CLI entry point: R3Error -> one line on stderr and exit 2."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except R3Error as e:
            print(f"error: {e}", file=sys.stderr)
            raise SystemExit(2)
        except KeyboardInterrupt:
            print("interrupted", file=sys.stderr)
            raise SystemExit(130)

    return wrapper
