"""The progress line's rate and ETA."""

from __future__ import annotations

import io

from r3 import progress as P


def test_rate_and_eta_leave_out_the_first_updates_warm_up(monkeypatch):
    clock = iter([0.0, 100.0, 110.0, 120.0, 121.0])  # start, then four updates
    monkeypatch.setattr(P.time, "perf_counter", lambda: next(clock))
    out = io.StringIO()
    p = P.Progress(100, "evaluate", stream=out)
    p.update(10)  # 100 s: a compile and 10 queries
    p.update(20)  # 10 queries in 10 s
    p.update(30)
    p.update(30, "no new queries")
    lines = out.getvalue().splitlines()
    assert lines[0] == "evaluate: 10/100 queries | 0.10 queries/s | ETA 15m00s | elapsed 1m40s"
    assert lines[1] == "evaluate: 20/100 queries | 1.00 queries/s | ETA 1m20s | elapsed 1m50s"
    assert lines[2] == "evaluate: 30/100 queries | 1.00 queries/s | ETA 1m10s | elapsed 2m00s"
    assert lines[3].startswith("evaluate: 30/100 queries | 0.95 queries/s | ETA 1m14s") and lines[3].endswith("| no new queries")


def test_updates_without_progress_and_at_the_end(monkeypatch):
    clock = iter([0.0, 10.0, 20.0, 30.0, 40.0, 50.0])
    monkeypatch.setattr(P.time, "perf_counter", lambda: next(clock))
    out = io.StringIO()
    p = P.Progress(8, "failures", stream=out)
    p.update(0)  # a batch that resolved nothing: no rate yet
    p.update(4)  # the first update with work
    p.update(4)  # none since: the overall rate, not 0
    p.update(8)
    p.update(8)  # done: ETA 0, not '?'
    lines = out.getvalue().splitlines()
    assert lines[0].startswith("failures: 0/8 queries | 0.00 queries/s | ETA ? |")
    assert lines[1].startswith("failures: 4/8 queries | 0.20 queries/s | ETA 20s |")
    assert lines[2].startswith("failures: 4/8 queries | 0.13 queries/s | ETA 30s |")
    assert lines[3].startswith("failures: 8/8 queries | 0.20 queries/s | ETA 0s |")
    assert lines[4].startswith("failures: 8/8 queries | 0.13 queries/s | ETA 0s |")  # (4 in the 30 s since the first)


def test_resumed_work_is_shown_but_not_in_the_rate(monkeypatch):
    clock = iter([0.0, 1.0, 61.0, 71.0, 81.0])  # start, resume, three updates
    monkeypatch.setattr(P.time, "perf_counter", lambda: next(clock))
    out = io.StringIO()
    p = P.Progress(100, "evaluate", stream=out)
    p.resume(50)  # read back from an interrupted run, in no time
    p.update(60)  # 60 s: model warm-up and 10 queries
    p.update(60)  # nothing since: 10 queries in 70 s overall, not 60
    p.update(70)
    lines = out.getvalue().splitlines()
    assert lines[0].startswith("evaluate: 60/100 queries | 0.17 queries/s | ETA 4m00s |")
    assert lines[1].startswith("evaluate: 60/100 queries | 0.14 queries/s |")
    assert lines[2].startswith("evaluate: 70/100 queries | 0.50 queries/s | ETA 1m00s |")


def test_format_duration():
    assert [P.format_duration(s) for s in (0.4, 59.6, 61, 3600 + 125, float("inf"))] == ["0s", "1m00s", "1m01s", "1h02m", "?"]


class _Terminal(io.StringIO):
    def isatty(self):
        return True


def test_on_a_terminal_the_line_is_rewritten_in_place_and_closed_once(monkeypatch):
    clock = iter([0.0, 10.0, 20.0])
    monkeypatch.setattr(P.time, "perf_counter", lambda: next(clock))
    out = _Terminal()
    p = P.Progress(2, "evaluate", stream=out)
    p.update(1)
    p.update(2)
    p.close()
    p.close()  # (a second close adds nothing)
    assert out.getvalue() == ("\r\033[Kevaluate: 1/2 queries | 0.10 queries/s | ETA 10s | elapsed 10s"
                              "\r\033[Kevaluate: 2/2 queries | 0.10 queries/s | ETA 0s | elapsed 20s\n")


def test_a_disabled_progress_writes_nothing(monkeypatch):
    out = _Terminal()
    p = P.Progress(2, "evaluate", stream=out, enabled=False)
    p.update(1)
    p.update(2, "extra")
    p.close()
    assert out.getvalue() == "" and p.done == 2


def test_work_all_resumed_is_done_not_of_unknown_duration(monkeypatch):
    clock = iter([0.0, 1.0, 2.0])
    monkeypatch.setattr(P.time, "perf_counter", lambda: next(clock))
    out = io.StringIO()
    p = P.Progress(8, "failures", stream=out)
    p.resume(8)
    p.update(8)
    assert out.getvalue().startswith("failures: 8/8 queries | 0.00 queries/s | ETA 0s |")
