"""Progress of long work: a line on stderr with the rate and the time left."""

from __future__ import annotations

import math
import sys
import time


def format_duration(s: float) -> str:
    if not math.isfinite(s):
        return "?"
    s = round(s)
    h, rem = divmod(s, 3600)
    m, sec = divmod(rem, 60)
    return f"{h}h{m:02d}m" if h else (f"{m}m{sec:02d}s" if m else f"{sec}s")


class Progress:
    """A progress line on stderr: ``label: done/total unit | rate | ETA | extra``.

    On a terminal the line is rewritten in place; otherwise (logs, pipes) one line per update. The
    rate and ETA leave out the first update's work once there is more (it includes warm-up: a
    compiled decode step compiles in the first batch).
    """

    def __init__(self, total: int, label: str, unit: str = "queries", stream=None, enabled: bool = True,
                 watch=None):
        """``watch``: an :class:`r3.cpu_share.CpuShareWatch` asked at each update whether other
        processes slowed the work since the last one (its note goes on its own line)."""
        self.total, self.label, self.unit = total, label, unit
        self.stream = stream if stream is not None else sys.stderr
        self.enabled = enabled
        self.watch = watch if enabled else None
        if self.watch is not None:
            self.watch.start()
        self.tty = enabled and hasattr(self.stream, "isatty") and self.stream.isatty()
        self.t0 = time.perf_counter()
        self.done = self._resumed = 0
        self._since = (self.t0, 0)  # (time, done): where the rate is measured from
        self._open = False

    def update(self, done: int, extra: str = "") -> None:
        now = time.perf_counter()
        first = self.done == self._resumed and done > self._resumed
        self.done = done
        dt = now - self.t0
        t_since, done_since = self._since
        if done > done_since and now > t_since:
            rate = (done - done_since) / (now - t_since)
        else:  # (nothing done since the first update yet: the overall rate)
            rate = (done - self._resumed) / dt if dt > 0 else 0.0
        if first:
            self._since = (now, done)
        if not self.enabled:
            return
        eta = 0.0 if done >= self.total else (self.total - done) / rate if rate > 0 else float("inf")
        line = (f"{self.label}: {done}/{self.total} {self.unit} | {rate:.2f} {self.unit}/s | "
                f"ETA {format_duration(eta)} | elapsed {format_duration(dt)}" + (f" | {extra}" if extra else ""))
        if self.tty:
            self.stream.write("\r\033[K" + line)
            self._open = True
        else:
            self.stream.write(line + "\n")
        note = self.watch.stop("the last batch") if self.watch is not None else None
        if note:
            self.stream.write(("\n" if self.tty else "") + note + "\n")
            self._open = False
        elif self.watch is not None:
            self.watch.start()
        self.stream.flush()

    def resume(self, done: int) -> None:
        """Count ``done`` as finished by an earlier, interrupted run: shown, left out of the rate."""
        self.done = self._resumed = done
        self._since = (time.perf_counter(), done)

    def close(self) -> None:
        if self._open:
            self.stream.write("\n")
            self.stream.flush()
            self._open = False
