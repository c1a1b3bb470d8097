"""Whether other processes take the CPU cores a CPU run's torch threads need.

A parallel torch op waits for its slowest thread, so on a CPU that other work shares, one busy core
slows every op of a run that has a thread on it many times over (the README measured a step of the
main command at 74 s with ``OMP_NUM_THREADS=1`` and 827 s with torch's default 2 threads, with a
busy loop on one of the 2 cores). Nothing in a run's own output says why it is slow, so
:class:`CpuShareWatch` compares, over a step, the time the run's CPUs were busy (``/proc/stat``)
with the CPU time of this process and its children (``/proc/<pid>/stat``): the rest is other
work, and when it leaves fewer free cores than torch has threads, the run says so once.

Linux only (elsewhere it stays silent), and for one process per machine: the other ranks of a
multi-process CPU run are themselves "other work".
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass

#: Cores' worth of other work, averaged over a step, below which nothing is said (a system's own
#: background is a few hundredths).
NOTICEABLE_CORES = 0.25
#: Work is judged over at least this long (shorter stretches add up): the counters tick every
#: 10 ms or so.
MIN_SECONDS = 5.0


@dataclass(frozen=True)
class CpuSample:
    """Counters at one moment, in seconds: ``busy``, the CPUs this process may run on spent
    working (every process's work, not waiting or idle); ``own``, the CPU time of this process
    and its descendants, including those that have ended."""

    wall: float
    busy: float
    own: float


_NOTHING = CpuSample(0.0, 0.0, 0.0)  # (no time: the start of a sum of stretches)


def busy_seconds(proc_stat: str, cpus: set[int], tick: float) -> float:
    """Seconds the ``cpus`` spent working, from the text of ``/proc/stat`` (its ``cpuN`` lines:
    user, nice, system, idle, iowait, irq, softirq, steal, ... in ticks of ``tick`` seconds).
    Steal (time the hypervisor ran someone else) is not this machine's work and is left out."""
    total = 0
    for line in proc_stat.splitlines():
        name, _, rest = line.partition(" ")
        if not (name.startswith("cpu") and name[3:].isdigit() and int(name[3:]) in cpus):
            continue
        user, nice, system, _idle, _iowait, irq, softirq = (int(v) for v in rest.split()[:7])
        total += user + nice + system + irq + softirq
    return total * tick


def tree_seconds(stats: dict[int, str], root: int, tick: float) -> float:
    """CPU seconds of process ``root`` and all its descendants, those that have ended included,
    from the texts of their ``/proc/<pid>/stat`` (``stats``: pid -> text, any processes). Its
    fields after the name: the parent pid second, then utime, stime, cutime and cstime 12th to
    15th (cutime and cstime: the children that ended and were waited for)."""
    parent, spent = {}, {}
    for pid, text in stats.items():
        fields = text[text.rfind(")") + 2:].split()  # (the name in parentheses may hold spaces)
        if len(fields) < 15:
            continue
        parent[pid] = int(fields[1])
        spent[pid] = sum(int(v) for v in fields[11:15])
    children: dict[int, list[int]] = {}
    for pid, ppid in parent.items():
        children.setdefault(ppid, []).append(pid)
    total, todo, seen = 0, [root], set()
    while todo:
        pid = todo.pop()
        if pid in seen:
            continue
        seen.add(pid)
        total += spent.get(pid, 0)
        todo.extend(children.get(pid, ()))
    return total * tick


def _read(path: str) -> str | None:
    try:
        # (a process name is bytes, cut at 15 of them, maybe inside a character: not always UTF-8)
        with open(path, encoding="utf-8", errors="replace") as f:
            return f.read()
    except OSError:  # (a process that ended while we read)
        return None


def take_sample(cpus: set[int]) -> CpuSample | None:
    """This moment's counters; None where ``/proc`` is not there (not Linux) or cannot be read as
    expected (a note is never worth stopping a run for)."""
    try:
        tick = 1.0 / os.sysconf("SC_CLK_TCK")
        proc_stat = _read("/proc/stat")
        if proc_stat is None:
            return None
        stats = {}
        for name in os.listdir("/proc"):
            if name.isdigit():
                text = _read(f"/proc/{name}/stat")
                if text is not None:
                    stats[int(name)] = text
        return CpuSample(time.monotonic(), busy_seconds(proc_stat, cpus, tick), tree_seconds(stats, os.getpid(), tick))
    except (OSError, ValueError, AttributeError):  # (no sysconf name, an unexpected field)
        return None


def others_cores(before: CpuSample, after: CpuSample) -> float:
    """Cores' worth of other processes' work between two samples (a core's full time is 1)."""
    wall = after.wall - before.wall
    if wall <= 0:
        return 0.0
    return max(0.0, ((after.busy - before.busy) - (after.own - before.own)) / wall)


def free_threads(others: float, cpus: int) -> int:
    """The threads that fit beside ``others`` cores of other work. A process that wants a whole
    core shows as less while torch's threads compete with it for the same cores (it gets its
    fair share, 2/3 of a core beside 2 threads on 2 cores), so any clearly measured share counts
    as a whole core."""
    return max(1, cpus - math.ceil(others - 0.1))


def contention_note(others: float, cpus: int, threads: int, what: str) -> str | None:
    """One line saying that other work left too few free cores for torch's ``threads`` during
    ``what``, and what to set; None when nothing worth saying was measured."""
    free = free_threads(others, cpus)
    if others < NOTICEABLE_CORES or free >= threads:
        return None
    return (f"note: other processes kept {others:.1f} of the {cpus} CPU cores busy during {what}, and each of torch's "
            f"{threads} threads waits for the slowest: set OMP_NUM_THREADS={free} or fewer (r3 keeps the value you "
            "set) to use only the free cores (on a 2-core machine with one core busy, the README measured steps 11x "
            "faster)")


class CpuShareWatch:
    """Measures other processes' share of this run's CPUs over stretches of work (:meth:`start`,
    :meth:`stop`; the time between them is not counted) and returns a note the first time it
    slows the run. Stretches shorter than :data:`MIN_SECONDS` add up until they are that long."""

    def __init__(self, threads: int, cpus: set[int] | None = None):
        self.cpus = cpus if cpus is not None else _affinity()
        self.threads = threads
        self.said = False
        self._start: CpuSample | None = None
        self._held = _NOTHING  # (the short stretches so far, summed: wall, busy, own)
        self._stretches = 0

    def start(self) -> None:
        if not self.said:
            self._start = take_sample(self.cpus)

    def stop(self, what: str) -> str | None:
        """The note, once; None otherwise. ``what``: the stretch just ended (``step 3``), named
        in the note when it alone was judged."""
        if self.said or self._start is None:
            return None
        end = take_sample(self.cpus)
        before, self._start = self._start, None
        if end is None:
            return None
        held = self._held = CpuSample(self._held.wall + end.wall - before.wall, self._held.busy + end.busy - before.busy,
                                      self._held.own + end.own - before.own)
        self._stretches += 1
        if held.wall < MIN_SECONDS:
            return None
        stretches, self._held, self._stretches = self._stretches, _NOTHING, 0
        span = what if stretches == 1 else f"the last {held.wall:.0f} s of work (up to {what})"
        note = contention_note(others_cores(_NOTHING, held), len(self.cpus), self.threads, span)
        self.said = note is not None
        return note


def watch_for(device) -> CpuShareWatch | None:
    """A watch over one process's work on ``device`` (a ``torch.device``): None on a GPU (or for
    no device)."""
    if device is None or device.type != "cpu":
        return None
    import torch  # (this module's arithmetic needs no torch)

    return CpuShareWatch(torch.get_num_threads())


def _affinity() -> set[int]:
    try:
        return set(os.sched_getaffinity(0))
    except AttributeError:  # (not Linux)
        return set(range(os.cpu_count() or 1))
