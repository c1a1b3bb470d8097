"""Noticing other processes on a CPU run's cores: /proc parsing, the share arithmetic, when the
note is said, and the training loop saying it once."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys

import pytest
import torch

from r3 import cpu_share as C

PROC_STAT = """cpu  900 10 300 5000 40 0 7 100 0 0
cpu0 100 0 50 1000 10 0 1 60 0 0
cpu1 200 10 100 2000 20 0 3 40 0 0
cpu2 400 0 100 1000 5 0 2 0 0 0
cpu11 1 0 0 0 0 0 0 0 0 0
intr 5 0 0
ctxt 99
"""


def test_busy_seconds_sums_the_working_ticks_of_the_run_s_cpus_only():
    """user + nice + system + irq + softirq of the cpuN lines in the set, not idle, iowait or
    steal, not the machine-wide `cpu` line, not cpu11 for a set with cpu1 (a prefix match would
    count another CPU)."""
    assert C.busy_seconds(PROC_STAT, {0, 1}, 0.01) == pytest.approx((151 + 313) * 0.01)
    assert C.busy_seconds(PROC_STAT, {2}, 1.0) == 502
    assert C.busy_seconds(PROC_STAT, {11}, 1.0) == 1
    assert C.busy_seconds(PROC_STAT, {7}, 1.0) == 0


def _stat(pid, name, ppid, utime, stime, cutime=0, cstime=0):
    return f"{pid} ({name}) S {ppid} 1 1 0 -1 4194560 0 0 0 0 {utime} {stime} {cutime} {cstime} 20 0 1 0 5"


def test_tree_seconds_counts_a_process_its_descendants_and_their_ended_children():
    """utime + stime + cutime + cstime of the root and everything below it (a compile worker's
    worker is the run's own work, not other work), nothing of its parent or siblings; a name with
    spaces and parentheses does not shift the fields."""
    stats = {
        10: _stat(10, "python3", 1, 100, 20, 5, 1),
        11: _stat(11, "compile worker", 10, 30, 3),
        12: _stat(12, "a) b (c", 11, 7, 1),
        13: _stat(13, "sibling", 1, 1000, 1000),
        1: _stat(1, "init", 0, 9, 9),
        14: "14 (short) S 10",
    }
    assert C.tree_seconds(stats, 10, 0.01) == pytest.approx((126 + 33 + 8) * 0.01)
    assert C.tree_seconds(stats, 11, 1.0) == 41
    assert C.tree_seconds(stats, 99, 1.0) == 0


def test_others_cores_is_the_busy_time_that_is_not_the_run_s_own_per_second():
    a = C.CpuSample(wall=100.0, busy=50.0, own=40.0)
    assert C.others_cores(a, C.CpuSample(110.0, 70.0, 53.0)) == pytest.approx(0.7)
    assert C.others_cores(a, C.CpuSample(110.0, 60.0, 51.0)) == 0.0  # (tick rounding: never below 0)
    assert C.others_cores(a, C.CpuSample(100.0, 60.0, 40.0)) == 0.0


@pytest.mark.parametrize("others, cpus, threads, free", [
    (0.67, 2, 2, 1),  # one busy process beside torch's 2 threads on 2 cores gets 2/3 of a core
    (1.0, 2, 2, 1),
    (1.9, 2, 2, 1),   # at least one thread
    (1.3, 8, 8, 6),
    (0.3, 8, 8, 7),
])
def test_the_note_names_the_threads_that_fit_beside_the_other_work(others, cpus, threads, free):
    note = C.contention_note(others, cpus, threads, "step 3")
    assert note.startswith(f"note: other processes kept {others:.1f} of the {cpus} CPU cores busy during step 3")
    assert f"set OMP_NUM_THREADS={free} " in note


@pytest.mark.parametrize("others, cpus, threads", [
    (0.1, 2, 2),   # background noise
    (0.67, 2, 1),  # OMP_NUM_THREADS=1 already leaves the busy core alone
    (2.5, 8, 4),   # 4 threads fit beside it
    (0.0, 1, 1),
])
def test_no_note_when_the_threads_fit_or_the_other_work_is_noise(others, cpus, threads):
    assert C.contention_note(others, cpus, threads, "step 1") is None


def _said(monkeypatch, samples, stretches: list[str]) -> list[str | None]:
    """What a watch of 2 threads on 2 CPUs says after each stretch, the counters read from
    ``samples`` (two per stretch: its start and its end)."""
    monkeypatch.setattr(C, "take_sample", lambda cpus: next(samples))
    watch = C.CpuShareWatch(threads=2, cpus={0, 1})
    said = []
    for what in stretches:
        watch.start()
        said.append(watch.stop(what))
    return said


def test_the_watch_says_it_once_and_only_of_stretches_long_enough_to_judge(monkeypatch):
    """A step shorter than MIN_SECONDS is not judged alone (10 ms ticks over a short wall time read
    as several cores); the first long enough stretch with other work gets the note; later ones
    stay quiet."""
    samples = iter([C.CpuSample(0.0, 0.0, 0.0), C.CpuSample(1.0, 0.5, 0.0),        # 1 s: held
                    C.CpuSample(10.0, 0.0, 0.0), C.CpuSample(20.0, 20.0, 19.0),    # with it, 1.5 / 11 s: noise
                    C.CpuSample(20.0, 0.0, 0.0), C.CpuSample(30.0, 20.0, 10.0),    # 1 core: said
                    C.CpuSample(30.0, 0.0, 0.0), C.CpuSample(40.0, 20.0, 10.0)])
    said = _said(monkeypatch, samples, [f"step {step}" for step in range(1, 5)])
    assert said[:2] == [None, None] and said[3] is None
    assert said[2].startswith("note: other processes kept 1.0 of the 2 CPU cores busy during step 3")


def test_the_watch_stays_silent_without_proc(monkeypatch):
    monkeypatch.setattr(C, "take_sample", lambda cpus: None)
    watch = C.CpuShareWatch(threads=2, cpus={0, 1})
    watch.start()
    assert watch.stop("step 1") is None


@contextlib.contextmanager
def _child_running(code: str):
    """A child Python process that runs ``code`` and then waits; the block runs once it got there,
    and the child is killed and waited for after it."""
    child = subprocess.Popen([sys.executable, "-c", code + "\nimport sys, time\nsys.stdout.write('x'); "
                              "sys.stdout.flush(); time.sleep(30)"], stdout=subprocess.PIPE)
    try:
        assert child.stdout.read(1) == b"x"
        yield
    finally:
        child.kill()
        child.wait()


@pytest.mark.skipif(not os.path.exists("/proc/self/stat"), reason="Linux /proc only")
def test_a_child_s_cpu_time_is_the_run_s_own_while_it_runs_and_after_it_ended():
    """On the real /proc: a child that burns CPU counts in this process's tree, before and after
    it is waited for (a compile worker's time is not 'other work')."""
    before = C.take_sample(C._affinity())
    with _child_running("import time\nwhile time.process_time() < 0.5: pass"):
        alive = C.take_sample(C._affinity())
    ended = C.take_sample(C._affinity())
    assert alive.own - before.own >= 0.45
    assert ended.own - before.own >= 0.45
    assert ended.busy >= before.busy and ended.wall > before.wall


@pytest.mark.skipif(not os.path.exists("/proc/self/comm"), reason="Linux /proc only")
def test_a_process_name_that_is_not_utf8_does_not_silence_the_watch():
    """A process's name in /proc/<pid>/stat is bytes, cut at 15 of them (maybe inside a
    character: ``café`` cut inside its ``é``): read as strict UTF-8 it raised, the sample was None,
    and while any such process ran on the machine the watch said nothing."""
    with _child_running("open('/proc/self/comm', 'wb').write(b'caf\\xc3')"):
        sample = C.take_sample(C._affinity())
    assert sample is not None and sample.own > 0


def test_the_training_loop_prints_the_note_once_after_the_step_line(tmp_path, monkeypatch, capsys):
    """train_loop asks rank 0's watch after each step and prints what it says, after that step's
    own line; a CUDA run, another rank, or several ranks on the machine get no watch."""
    from test_train import _stand_in_run

    from r3 import train as T

    monkeypatch.setattr(T, "train_step", lambda run, step: ({"step": step + 1}, None))
    monkeypatch.setattr(T, "export", lambda out, policy, tok, d: out / "export")
    monkeypatch.setattr(T, "step_end", lambda run, step, row, ep, clock, signum: print(f"step {step + 1} line") or 0)
    samples = iter([C.CpuSample(0.0, 0.0, 0.0), C.CpuSample(10.0, 5.0, 5.0),
                    C.CpuSample(10.0, 0.0, 0.0), C.CpuSample(20.0, 20.0, 10.0)])
    monkeypatch.setattr(C, "take_sample", lambda cpus: next(samples))
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
    monkeypatch.setattr(C, "_affinity", lambda: {0, 1})
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    d = T.Dist(rank=0, world=1, local_rank=0, device=torch.device("cpu"), mesh=None)
    T.train_loop(_stand_in_run(tmp_path, d, max_steps=4))
    lines = capsys.readouterr().out.splitlines()
    notes = [i for i, line in enumerate(lines) if line.startswith("note: other processes")]
    assert len(notes) == 1 and lines[notes[0] - 1] == "step 2 line", lines
    assert "during step 2," in lines[notes[0]] and "OMP_NUM_THREADS=1" in lines[notes[0]]

    assert T.cpu_share_watch(T.Dist(rank=1, world=2, local_rank=1, device=torch.device("cpu"), mesh=None)) is None
    assert T.cpu_share_watch(T.Dist(rank=0, world=1, local_rank=0, device=torch.device("cuda"), mesh=None)) is None
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    assert T.cpu_share_watch(d) is None
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "1")
    assert isinstance(T.cpu_share_watch(d), C.CpuShareWatch)


class _Said:
    """A watch that says its note at the given calls of stop()."""

    def __init__(self, at):
        self.at, self.calls, self.starts = at, 0, 0

    def start(self):
        self.starts += 1

    def stop(self, what):
        self.calls += 1
        return f"note: slowed during {what}" if self.calls in self.at else None


@pytest.mark.parametrize("tty", [False, True])
def test_a_progress_line_puts_the_watch_s_note_on_a_line_of_its_own(tty):
    """Progress asks its watch at each update: the note goes on its own line after the progress
    line (on a terminal, after ending the line being rewritten, so the next update does not
    overwrite it); a disabled progress line asks nothing."""
    import io

    from r3.progress import Progress

    class Stream(io.StringIO):
        def isatty(self):
            return tty

    out = Stream()
    watch = _Said(at={2})
    p = Progress(3, "evaluate", stream=out, watch=watch)
    for done in (1, 2, 3):
        p.update(done)
    p.close()
    text = out.getvalue()
    assert text.count("note: slowed during the last batch\n") == 1 and watch.calls == 3
    before, after = text.split("note: slowed during the last batch\n")
    assert before.endswith("\n") and "2/3 queries" in before and "2/3" not in after and "3/3 queries" in after
    assert watch.starts == 3  # (at the start, then after each update that said nothing)
    quiet = _Said(at={1})
    Progress(3, "evaluate", stream=Stream(), watch=quiet, enabled=False).update(1)
    assert quiet.calls == 0 and quiet.starts == 0


def test_the_clis_watch_only_a_cpu():
    assert C.watch_for(torch.device("cuda")) is None and C.watch_for(None) is None
    assert isinstance(C.watch_for(torch.device("cpu")), C.CpuShareWatch)


def test_an_unexpected_proc_gives_no_sample_not_an_error(monkeypatch):
    """A /proc/stat in another format, or a /proc that cannot be listed, makes the watch silent:
    a note is never worth stopping a run for."""
    monkeypatch.setattr(C, "_read", lambda path: "cpu0 1 2 x\n" if path == "/proc/stat" else None)
    assert C.take_sample({0}) is None
    monkeypatch.setattr(C, "_read", lambda path: PROC_STAT)
    monkeypatch.setattr(C.os, "listdir", lambda path: (_ for _ in ()).throw(PermissionError(13, "denied")))
    assert C.take_sample({0}) is None


def test_r3_forgetting_says_the_note_once_for_all_its_benchmarks(tmp_path, monkeypatch, capsys):
    """Each benchmark's progress line had a watch of its own, so a machine shared all along got the
    note again for every benchmark of every model (the README: "it prints once"); one watch now
    serves the whole run."""
    import json

    from r3 import forgetting as FG
    from r3.evals.engine import Loglikelihood

    def fake_lls(model, items, batch_size, progress=None, **k):
        progress(len(items))
        return [[Loglikelihood(-1.0, True) for _ in conts] for _, conts in items]

    def fake_generate(model, tok, prompts, progress=None, **k):
        progress(len(prompts))
        return ["#### 5"] * len(prompts)

    clock = iter(range(10**6))
    monkeypatch.setattr(C, "take_sample", lambda cpus: C.CpuSample(10.0 * next(clock), 0.0, 0.0))  # (10 s apart)
    monkeypatch.setattr(C, "others_cores", lambda before, after: 1.0)  # (every batch: one core taken)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
    monkeypatch.setattr(C, "_affinity", lambda: {0, 1})
    monkeypatch.setattr(FG, "loglikelihoods", fake_lls)
    monkeypatch.setattr(FG, "generate_until", fake_generate)
    hs = tmp_path / "hs.jsonl"
    hs.write_text(json.dumps({"activity_label": "Cooking", "ctx_a": "A man cracks two eggs.", "ctx_b": "he",
                              "endings": ["whisks them.", "flies.", "sings.", "reads."], "label": 0}) + "\n")
    gs = tmp_path / "gs.jsonl"
    gs.write_text(json.dumps({"question": "What is 2 + 3?", "answer": "2 + 3 = 5\n#### 5"}) + "\n")
    assert FG.main(["--data", f"hellaswag={hs}", "--data", f"gsm8k={gs}", "--shots", "0", "--device", "cpu",
                    "--out", str(tmp_path / "f.json")]) == 0
    err = capsys.readouterr().err
    assert err.count("note: other processes kept 1.0 of the 2 CPU cores busy") == 1, err


def test_short_stretches_add_up_and_the_time_between_them_is_left_out(monkeypatch):
    """Batches of 1.5 s each, slowed by a core of other work: none is judged alone, but four of
    them (6 s) are, and the note says over how long; the 100 s between stretches (logging, a
    checkpoint, an idle machine) count neither way."""
    samples = []
    for k in range(6):
        t = 101.5 * k
        samples += [C.CpuSample(t, 10.0 * k, 5.0 * k), C.CpuSample(t + 1.5, 10.0 * k + 3.0, 5.0 * k + 1.5)]
    said = _said(monkeypatch, iter(samples), [f"batch {batch}" for batch in range(1, 6)])
    assert said[:3] == [None, None, None] and said[4] is None
    assert said[3].startswith("note: other processes kept 1.0 of the 2 CPU cores busy during the last 6 s of work "
                              "(up to batch 4), and each of torch's 2 threads waits for the slowest: set "
                              "OMP_NUM_THREADS=1 or fewer")
