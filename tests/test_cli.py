"""The r3.failures and r3.evaluate CLIs (and their library functions): output files and their
consistency, resume, crash-truncated lines, and one-line errors with exit code 2.

Most runs use a tiny random model with the SmolLM2 tokenizer and the coin-flip plug-in task
(``tests/helpers/r3_test_tasks.py``); the built-in model runs once per CLI (tiny n and lengths).
CLIs are called in-process (``main([...])``); two subprocess runs check the real exit path.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from r3 import cli as C
from r3 import evaluate as E
from r3 import failures as F
from r3 import stats as S
from r3.checkpoint import load
from r3.chat import ChatFormat
from r3.episode import EpisodeSampling, run_episode
from r3.sampler import generate

HERE = Path(__file__).parent
COIN = "r3_test_tasks:CoinTask"


@pytest.fixture(autouse=True)
def _helpers_on_path(monkeypatch):
    monkeypatch.syspath_prepend(str(HERE / "helpers"))


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory, builtin):
    from test_episode import build_tiny_chat_model

    return str(build_tiny_chat_model(tmp_path_factory.mktemp("cli") / "model", builtin[1]))


@pytest.fixture(scope="module")
def tiny(tiny_dir):
    model, tok = load(tiny_dir)
    return model, tok, ChatFormat(tok)


def coin_task(**kw):
    sys.path.insert(0, str(HERE / "helpers"))
    from r3.tasks import get

    return get(COIN, **kw)


def run_main(main, argv, capsys):
    """-> (exit code, stdout, stderr) of an in-process CLI call."""
    try:
        rc = main(argv)
    except SystemExit as e:
        rc = e.code
    out, err = capsys.readouterr()
    return rc, out, err


def read_lines(path):
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


def read_lines_before_cut(path):
    return [json.loads(line) for line in Path(path).read_bytes().split(b"\n")[:-1]]


def one_line_error(rc, err, pattern):
    lines = [line for line in err.splitlines() if line.strip()]
    assert rc == 2, err
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err
    assert pattern in lines[0], lines[0]


# --------------------------------------------------------------------------------------------
# r3.failures
# --------------------------------------------------------------------------------------------


def test_failures_tiny_rounds_records_and_training_reads_them(tiny_dir, tiny, tmp_path, capsys):
    model, tok, chat = tiny
    out = tmp_path / "f.jsonl"
    argv = ["--model", tiny_dir, "--task", COIN, "--samples", "6", "--n", "12", "--out", str(out),
            "--max-new-tokens", "6", "--batch-size", "8", "--dtype", "fp32", "--seed", "1",
            "--cut-answers", "judge"]  # (every attempt read by the verifier: most run to the 6-token limit)
    rc, stdout, err = run_main(F.main, argv, capsys)
    assert rc == 0, err
    assert "failures: " in err and "ETA" in err  # the progress line
    task = coin_task()
    examples = task.examples("train", 12)
    keys = [F.example_key(ex) for ex in examples]
    fails = read_lines(out)
    done = read_lines(F.done_path(out))
    head, passed = done[0], done[1:]
    assert head["r3_failures"] == 1 and head["settings"]["samples"] == 6 and head["settings"]["task"] == COIN
    assert sorted(r["key"] for r in fails + passed) == sorted(keys)  # every query once
    assert len(fails) >= 6
    by_key = dict(zip(keys, examples))
    for r in fails:
        assert r["example"] == by_key[r["key"]]
        assert r["attempt_text"] == chat.decode(r["attempt_tokens"])
        assert not task.verify(r["example"], r["attempt_text"])
        assert 0 <= r["attempts_before_failure"] < 6 and r["samples"] == r["attempts_before_failure"] + 1
        toks = r["attempt_tokens"]
        assert r["finished"] == (toks[-1] in chat.stop_ids) and (r["finished"] or len(toks) == 6)
    assert any(r["attempts_before_failure"] > 0 for r in fails)  # later rounds ran
    assert all(p["samples"] == 6 for p in passed)
    needed = sum(r["samples"] for r in fails) + 6 * len(passed)
    rate = len(fails) / 12
    assert f"{len(fails)}/12 queries failed" in stdout and f"failure rate {100 * rate:.1f}%" in stdout
    assert f"samples needed {needed}" in stdout

    # what r3.train reads, and an episode started from it
    from r3.failures import read_failures  # what r3.train calls

    recs = read_failures(str(out))
    assert [r["key"] for r in recs] == [r["key"] for r in fails]
    ep = run_episode(model, tok, task, [r["example"] for r in recs[:3]], group_size=2, chat=chat,
                     sampling=EpisodeSampling(max_reflection_tokens=4, max_retry_tokens=4), seed=0,
                     failed_attempts=[r["attempt_tokens"] for r in recs[:3]])
    for g, r in enumerate(recs[:3]):
        prompt = chat.prompt(task.messages(r["example"]))
        assert ep.sequences[2 * g][: len(prompt) + len(r["attempt_tokens"])] == prompt + r["attempt_tokens"]


def _fake_failure_sampling(monkeypatch, finished=lambda k: True):
    """A fake sampler for r3.failures whose k-th attempt at query i is the tokens [i, k] (its
    ``finished`` flag ``finished(k)``), a task failing query i at its ``fail_at``-th attempt
    (0-based) or never, and a chat format that passes ids through. Returns (task, chat, model,
    counter: attempts per query, calls: (prompts, samples) per call, seeds: one per call)."""
    from types import SimpleNamespace

    counter, calls, seeds = {}, [], []

    def fake_generate(model, prompts, *, num_samples, seed, **kw):
        calls.append((len(prompts), num_samples))
        seeds.append(seed)
        tokens = []
        for (i,) in prompts:
            for _ in range(num_samples):
                tokens.append([i, counter.get(i, 0)])
                counter[i] = counter.get(i, 0) + 1
        return SimpleNamespace(tokens=tokens, finished=[finished(t[1]) for t in tokens], new_tokens=2 * len(tokens))

    class Task:
        def messages(self, ex):
            return [{"role": "user", "content": str(ex["i"])}]

        def verify(self, ex, text):
            return json.loads(text)[1] != ex["fail_at"]

    chat = SimpleNamespace(prompt=lambda m: [int(m[0]["content"])], decode=lambda t: json.dumps(t), stop_ids=[0])
    monkeypatch.setattr(F, "generate", fake_generate)
    return Task(), chat, SimpleNamespace(config=SimpleNamespace(vocab_size=100)), counter, calls, seeds


@pytest.mark.parametrize("batch_size", [1, 3, 16])
def test_find_failures_rounds_count_attempts_exactly(monkeypatch, batch_size):
    """The round logic against a fake sampler whose k-th attempt at query i is the tokens
    [i, k]: a query fails exactly at its ``fail_at``-th attempt (0-based), or never."""
    K = 6
    fail_at = [0, 1, 2, 3, 5, None, 4, 0, None, 2]
    task, chat, model, counter, calls, _ = _fake_failure_sampling(monkeypatch)
    examples = [{"i": i, "fail_at": f} for i, f in enumerate(fail_at)]
    got = []
    stats = F.find_failures(model, list(range(100)), task, examples, samples=K, batch_size=batch_size, chat=chat,
                            on_batch=lambda fails, passes: got.append((fails, passes)))
    fails = {r["example"]["i"]: r for batch in got for r in batch[0]}
    passes = {r["key"]: r for batch in got for r in batch[1]}
    assert {i: r["attempts_before_failure"] for i, r in fails.items()} == {i: f for i, f in enumerate(fail_at) if f is not None}
    for i, r in fails.items():
        assert r["attempt_tokens"] == [i, fail_at[i]] and r["samples"] == fail_at[i] + 1
    assert sorted(passes) == sorted(F.example_key(examples[i]) for i, f in enumerate(fail_at) if f is None)
    assert all(p["samples"] == K for p in passes.values())
    assert stats["failed"] == 8 and stats["passed"] == 2 and stats["queries"] == 10
    assert stats["samples_needed"] == sum(f + 1 for f in fail_at if f is not None) + 2 * K
    # never more than K attempts per query; a query stops being sampled in the round it fails
    assert max(counter.values()) == K and all(counter[i] == K for i, f in enumerate(fail_at) if f is None)
    assert stats["samples_drawn"] == sum(counter.values()) == sum(n * m for n, m in calls)
    assert all(n * m <= batch_size or n == 1 for n, m in calls)
    # rounds of 1, 2, then the rest (capped by the batch): attempts drawn up to the failing round
    rounds = [1, 2, 3] if batch_size >= 3 else [1] * K
    bounds = [sum(rounds[: j + 1]) for j in range(len(rounds))]
    for i, f in enumerate(fail_at):
        if f is not None:
            assert counter[i] == next(b for b in bounds if b > f)


def test_find_failures_with_cut_answers_fail_counts_an_attempt_the_limit_cut_off_as_failed(monkeypatch):
    """``cut_answers="fail"``: a query's attempt the token limit cut off (here every third one)
    is its failure even where the verifier would pass it, recorded with ``finished`` false (the
    default); "judge" reads it, so the same queries then fail only where the verifier says."""
    fail_at = [None, 0, 4, None]
    for rule, expect in (("judge", {1: 0, 2: 4}), ("fail", {0: 2, 1: 0, 2: 2, 3: 2})):
        task, chat, model, *_ = _fake_failure_sampling(monkeypatch, finished=lambda k: k % 3 != 2)
        got = []
        stats = F.find_failures(model, list(range(100)), task, [{"i": i, "fail_at": f} for i, f in enumerate(fail_at)],
                                samples=6, batch_size=16, chat=chat, cut_answers=rule,
                                on_batch=lambda fails, passes: got.extend(fails))
        assert {r["example"]["i"]: r["attempts_before_failure"] for r in got} == expect, rule
        assert [r["finished"] for r in got] == [r["attempts_before_failure"] % 3 != 2 for r in got]
        assert stats["passed"] == len(fail_at) - len(expect)
    from r3.errors import R3Error

    with pytest.raises(R3Error, match="cut_answers must be one of judge, fail, got 'maybe'"):
        F.find_failures(model, list(range(100)), task, [{"i": 0, "fail_at": None}], samples=1, chat=chat,
                        cut_answers="maybe")


@pytest.mark.parametrize("stop_at", [1, 2, 3])
def test_a_resumed_failures_run_goes_on_from_the_attempts_each_query_passed(monkeypatch, tmp_path, stop_at):
    """A run stopped between rounds lost what its surviving queries had passed: the rerun drew
    each from its first attempt again (more than K attempts in all, and 'samples needed' of 45-48
    where the uninterrupted run's was 56). Each batch's survivors are written to F.jsonl.progress
    with the attempts they passed; the rerun goes on from there, so every record equals the
    uninterrupted run's (the fake sampler's k-th attempt at a query is the same in both), no query
    is drawn past K, the seeds differ from the first run's, and the progress file goes at the end."""
    K = 6
    fail_at = [0, 1, 2, 3, 5, None, 4, 0, None, 2]
    task, chat, model, counter, calls, seeds = _fake_failure_sampling(monkeypatch)
    examples = [{"i": i, "fail_at": f} for i, f in enumerate(fail_at)]
    keys = [F.example_key(ex) for ex in examples]
    out = tmp_path / "f.jsonl"
    store = F.FailureFile(out)
    store.open({"task": "t"})
    told = []

    def then_stop(records):
        store.add_progress(records)
        told.append(records)
        if len(told) == stop_at:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        F.find_failures(model, list(range(100)), task, examples, samples=K, batch_size=3, chat=chat,
                        on_batch=store.add, on_progress=then_stop)
    first_seeds = list(seeds)
    store = F.FailureFile(out)  # (a new process: the files as the first left them)
    store.open({"task": "t"})
    seen = store.keys()
    before = {k: v for k, v in store.progress.items() if k not in seen}
    assert before and all(0 < v < K for v in before.values())
    todo = [ex for ex, k in zip(examples, keys) if k not in seen]
    counter.clear()
    counter.update({ex["i"]: before.get(F.example_key(ex), 0) for ex in todo})  # (what the model had drawn)
    seeds.clear()
    F.find_failures(model, list(range(100)), task, todo, samples=K, batch_size=3, chat=chat, on_batch=store.add,
                    on_progress=store.add_progress, passed_before=before, seed_salt=len(seen) + len(store.progress))
    store.finished()
    fails = {r["example"]["i"]: r for r in store.failures}
    assert {i: r["attempts_before_failure"] for i, r in fails.items()} == {
        i: f for i, f in enumerate(fail_at) if f is not None}
    assert all(r["samples"] == fail_at[i] + 1 for i, r in fails.items())
    assert sorted(r["key"] for r in store.done_records) == sorted(k for k, f in zip(keys, fail_at) if f is None)
    assert all(r["samples"] == K for r in store.done_records) and len(store.keys()) == len(examples)
    assert max(counter.values()) <= K
    assert not set(seeds) & set(first_seeds)
    assert not F.progress_path(out).exists()


def test_rounds_before_and_the_seeds_of_a_fresh_run():
    """The round a query that passed n attempts is in (rounds draw 1, 2, 4, ... capped by the
    batch); a fresh run's seeds are those of earlier versions (no salt), a resumed run's others."""
    import hashlib

    assert [F._rounds_before(n, 16) for n in (0, 1, 3, 7, 15, 31)] == [0, 1, 2, 3, 4, 5]
    assert [F._rounds_before(n, 4) for n in (0, 1, 3, 7, 11, 15)] == [0, 1, 2, 3, 4, 5]
    assert F._rounds_before(2, 16) == 2  # (no round ends at 2: the first after)
    old = int.from_bytes(hashlib.sha256(b"r3.failures:0:1:2").digest()[:7], "big")
    assert F._round_seed(0, 1, 2) == F._round_seed(0, 1, 2, 0) == old != F._round_seed(0, 1, 2, 5)


def test_a_resumed_query_goes_on_in_its_round_and_one_past_a_smaller_k_is_recorded_as_it_passed(monkeypatch):
    """A query that passed 3 attempts before a stop goes on in the round an uninterrupted run is
    in (4 samples, then the 1 left of K=8, with those rounds' seeds), not in rounds of 1 and 2 again.
    A rerun asking for fewer attempts than some queries already passed (K=4 after 4 or 6) records
    them as never failed with the attempts they passed, each counted once, and samples them no
    more (they were left out of both files, or met a round of 0 samples). The generated tokens are
    those of every call, not the last one's."""
    task, chat, model, counter, calls, seeds = _fake_failure_sampling(monkeypatch)
    ex = [{"i": i, "fail_at": None} for i in range(4)]
    keys = [F.example_key(e) for e in ex]
    got = []
    stats = F.find_failures(model, list(range(100)), task, ex[:1], samples=8, batch_size=16, chat=chat,
                            passed_before={keys[0]: 3}, seed_salt=5, on_batch=lambda f, p: got.append(p))
    assert calls == [(1, 4), (1, 1)] and seeds == [F._round_seed(0, 2, 0, 5), F._round_seed(0, 3, 0, 5)]
    assert got[-1] == [{"key": keys[0], "id": None, "samples": 8}]
    assert (stats["passed"], stats["samples_needed"], stats["samples_drawn"], stats["generated_tokens"]) == (1, 8, 5, 10)
    calls.clear()
    got.clear()
    stats = F.find_failures(model, list(range(100)), task, ex[1:], samples=4, batch_size=16, chat=chat,
                            passed_before={keys[1]: 4, keys[2]: 6}, seed_salt=5, on_batch=lambda f, p: got.append(p))
    assert calls == [(1, 1), (1, 2), (1, 1)]  # (the fresh query alone is sampled)
    passed = sorted((r["key"], r["samples"]) for batch in got for r in batch)
    assert passed == sorted([(keys[1], 4), (keys[2], 6), (keys[3], 4)])
    assert (stats["passed"], stats["failed"], stats["samples_needed"]) == (3, 0, 4 + 4 + 6)


def test_find_failures_refuses_a_batch_size_or_samples_below_1(monkeypatch):
    """find_failures(batch_size=0) died in a ZeroDivisionError (rounds of 0 samples), and
    samples=0 recorded every query as never failed after 0 attempts: each is an R3Error naming
    the argument, before anything is sampled or recorded."""
    from r3.errors import R3Error

    task, chat, model, counter, calls, _ = _fake_failure_sampling(monkeypatch)
    got = []
    for kw, name in ((dict(samples=4, batch_size=0), "batch_size"), (dict(samples=0), "samples")):
        with pytest.raises(R3Error, match=f"{name} must be a positive integer, got 0"):
            F.find_failures(model, list(range(100)), task, [{"i": 0, "fail_at": 0}], chat=chat,
                            on_batch=lambda f, p: got.append((f, p)), **kw)
    assert got == [] and calls == []


def test_failures_attempt_tokens_are_the_samplers(tiny_dir, tiny, tmp_path, capsys):
    """Greedy, one sample: the stored attempt is exactly the sampler's continuation of
    ChatFormat(tokenizer).prompt(task.messages(example))."""
    model, tok, chat = tiny
    out = tmp_path / "g.jsonl"
    rc, _, err = run_main(F.main, ["--model", tiny_dir, "--task", COIN, "--samples", "1", "--temperature", "0",
                                   "--n", "5", "--out", str(out), "--max-new-tokens", "7", "--dtype", "fp32"], capsys)
    assert rc == 0, err
    task = coin_task()
    examples = task.examples("train", 5)
    greedy = generate(model, [chat.prompt(task.messages(ex)) for ex in examples], max_new_tokens=7, temperature=0,
                      stop_token_ids=chat.stop_ids).tokens
    expect = {F.example_key(ex): g for ex, g in zip(examples, greedy) if not task.verify(ex, chat.decode(g))}
    assert expect and {r["key"]: r["attempt_tokens"] for r in read_lines(out)} == expect
    assert len(read_lines(F.done_path(out))) == 1 + 5 - len(expect)


def test_failures_attempts_end_at_the_tasks_stop_strings_as_training_attempts_do(tiny, monkeypatch):
    """A mined attempt ends where a training attempt would (the task's stop strings), so a file
    holds only attempts the training rule also fails (tagged Countdown: a first right answer block
    followed by a wrong one passes in training, and failed here when the attempt ran on)."""
    from r3.episode import answer_stops
    from r3.sampler import StopStrings

    model, tok, chat = tiny
    task = coin_task()
    task.stop_strings = ("e", "McC")
    examples = task.examples("train", 6)
    prompts = [chat.prompt(task.messages(ex)) for ex in examples]
    stops = answer_stops(task, chat)
    # generate() passes them to the sampler: each cut attempt is a prefix of the whole one
    # (per-row streams), ends on the string, and some were cut
    cut = generate(model, prompts, max_new_tokens=12, temperature=1.0, stop_token_ids=chat.stop_ids, seed=3,
                   num_samples=4, stop_strings=stops).tokens
    whole = generate(model, prompts, max_new_tokens=12, temperature=1.0, stop_token_ids=chat.stop_ids, seed=3,
                     num_samples=4).tokens
    assert all(w[:len(c)] == c for c, w in zip(cut, whole))
    shorter = [c for c, w in zip(cut, whole) if len(c) < len(w)]
    assert shorter and all(any(x in tok.decode(c) for x in task.stop_strings) for c in shorter)
    seen = []
    real = F.generate
    monkeypatch.setattr(F, "generate", lambda *a, **k: seen.append(k["stop_strings"]) or real(*a, **k))
    F.find_failures(model, tok, task, examples, samples=2, temperature=1.0, max_new_tokens=12, chat=chat)
    assert seen and all(isinstance(x, StopStrings) and x.strings == ("e", "McC") for x in seen)


def test_failures_resume_and_truncated_last_line(tiny_dir, tmp_path, capsys):
    out = tmp_path / "r.jsonl"
    base = ["--model", tiny_dir, "--task", COIN, "--samples", "3", "--out", str(out), "--max-new-tokens", "4",
            "--dtype", "fp32"]
    assert run_main(F.main, base + ["--n", "4"], capsys)[0] == 0
    first, first_done = out.read_bytes(), F.done_path(out).read_bytes()
    # the same run again: nothing new, and it says so
    rc, stdout, err = run_main(F.main, base + ["--n", "4"], capsys)
    assert rc == 0 and "resuming" in err and "4 of 4 queries already done" in err
    assert "0 sampled in this run" in stdout and "4 resumed" in stdout
    assert out.read_bytes() == first and F.done_path(out).read_bytes() == first_done
    # a crash mid-write leaves a cut line: dropped with a warning, then the run goes on
    with open(out, "ab") as f:
        f.write(b'{"key": "0123456789abcdef", "example": {"id": "tr')
    assert [r["key"] for r in F.read_failures(out)] == [r["key"] for r in read_lines_before_cut(out)]
    assert "truncated last line" in capsys.readouterr().err
    rc, stdout, err = run_main(F.main, base + ["--n", "7"], capsys)
    assert rc == 0 and "truncated last line" in err and "3 to sample" in err
    fails = read_lines(out)  # every line parses again
    done = read_lines(F.done_path(out))[1:]
    assert out.read_bytes().startswith(first)
    keys = [F.example_key(ex) for ex in coin_task().examples("train", 7)]
    assert sorted(r["key"] for r in fails + done) == sorted(keys)
    assert "7 resumed" not in stdout and "3 sampled in this run" in stdout
    # another task into the same file is refused
    rc, _, err = run_main(F.main, base + ["--n", "2", "--task-option", "size=10"], capsys)
    one_line_error(rc, err, "task_options")


@pytest.mark.parametrize("cut", [1, 4, 7, 8, 30])
def test_a_line_cut_inside_its_first_bytes_is_dropped_as_any_cut_line(tmp_path, capsys, cut):
    """A crash or a full disk can cut an appended line at any byte, also inside its first eight
    (``{"ke``): such a file was refused as "not a file written by r3.failures (its last line is not
    a record); use another --out", so neither a rerun nor r3.train could use what it held. The cut
    line is dropped with a warning, in each of the three files, as one cut later is."""
    out = tmp_path / "f.jsonl"
    store = F.FailureFile(out)
    store.open({"task": "t"})
    rec = {"key": "a" * 16, "example": {"i": 1}, "attempt_tokens": [1], "attempt_text": "x",
           "attempts_before_failure": 0, "samples": 1, "finished": True}
    store.add([rec], [{"key": "c" * 16, "samples": 4}])
    store.add_progress([{"key": "d" * 16, "passed": 1}])
    store.close()
    whole = {p: p.read_bytes() for p in (out, F.done_path(out), F.progress_path(out))}
    line = json.dumps(dict(rec, key="b" * 16), ensure_ascii=True).encode()
    for path in whole:
        path.write_bytes(whole[path] + line[:cut])
        assert F.read_failures(out) == [rec]  # (what r3.train reads)
        store = F.FailureFile(out)
        store.open({"task": "t"})  # (a rerun: the cut line is dropped from the file)
        store.close()
        assert path.read_bytes() == whole[path]
        assert "ignoring a truncated last line" in capsys.readouterr().err
        assert store.keys() == {"a" * 16, "c" * 16} and store.progress == {"d" * 16: 1}


def test_failures_refuses_greedy_with_two_samples_and_a_split_without_queries(tmp_path, capsys):
    """--temperature 0 draws the same attempt K times (all but one wasted, and counted in 'samples
    needed'): refused for --samples 2 as for more. A split with no queries is an error, not a
    dataset of a header alone and a '0/0 queries failed' summary."""
    out = tmp_path / "f.jsonl"
    rc, _, err = run_main(F.main, ["--task", COIN, "--temperature", "0", "--samples", "2", "--n", "1",
                                   "--max-new-tokens", "1", "--out", str(out)], capsys)
    one_line_error(rc, err, "--temperature 0 is greedy")
    rc, _, err = run_main(F.main, ["--task", COIN, "--task-option", "size=0", "--out", str(out)], capsys)
    one_line_error(rc, err, f"task {COIN!r}: no train examples")
    assert not F.done_path(out).exists() and not out.exists()


def test_failures_builtin_smoke(tmp_path, capsys):
    """The built-in model on easy Countdown: it fails (almost) everything at the first sample."""
    out = tmp_path / "cd.jsonl"
    argv = ["--task", "countdown", "--task-option", "difficulty=easy", "--samples", "2", "--n", "3",
            "--max-new-tokens", "12", "--dtype", "bf16", "--out", str(out)]
    rc, stdout, err = run_main(F.main, argv, capsys)
    assert rc == 0, err
    fails = read_lines(out)
    head = read_lines(F.done_path(out))[0]
    assert head["settings"]["task_options"] == {"difficulty": "easy"}
    assert head["settings"]["attempt_stop_strings"] == ["</answer>"]  # (attempts end as training's do)
    assert len(fails) + len(read_lines(F.done_path(out))) - 1 == 3
    assert fails  # (12 tokens of a 135M model on Countdown: the loop below checks something)
    for r in fails:
        assert set(r["example"]) >= {"nums", "target"} and 1 <= len(r["attempt_tokens"]) <= 12
    assert "queries failed at least once" in stdout
    # a file made before attempts ended at the stop strings: resumed, with a warning that says so
    done = F.done_path(out)
    lines = done.read_text().splitlines()
    old = json.loads(lines[0])
    del old["settings"]["attempt_stop_strings"]
    done.write_text("\n".join([json.dumps(old)] + lines[1:]) + "\n")
    rc, _, err = run_main(F.main, argv, capsys)
    assert rc == 0 and "started with other settings (attempt_stop_strings: [] -> ['</answer>'])" in err, err
    # another model's failures are not appended to the file (its header would name the first alone)
    assert head["settings"]["model"] == "smollm2-135m"
    from r3.checkpoint import resolve

    gguf = str(resolve("smollm2-135m")[1])
    rc, _, err = run_main(F.main, argv + ["--model", gguf], capsys)  # (the same files, spelled otherwise)
    assert rc == 0 and "model" not in err, err
    done.write_text(done.read_text().replace('"model": "smollm2-135m"', f'"model": "{tmp_path / "other.gguf"}"', 1))
    before = (out.read_bytes(), done.read_bytes())
    rc, _, err = run_main(F.main, argv, capsys)
    assert rc == 2 and f"holds the failures of model '{tmp_path / 'other.gguf'}', not 'smollm2-135m'" in err, err
    assert (out.read_bytes(), done.read_bytes()) == before


# --------------------------------------------------------------------------------------------
# r3.evaluate
# --------------------------------------------------------------------------------------------


SIX = EpisodeSampling(temperature=0.0, max_attempt_tokens=6, max_reflection_tokens=6, max_retry_tokens=6)


def test_evaluate_examples_counts_and_records(tiny):
    model, tok, chat = tiny
    task = coin_task()
    examples = task.examples("test", 10)
    res = E.evaluate_examples(model, tok, task, examples, SIX, batch_size=10, records=True)
    # the first attempts are the greedy continuations of the prompts
    greedy = generate(model, [chat.prompt(task.messages(ex)) for ex in examples], max_new_tokens=6, temperature=0,
                      stop_token_ids=chat.stop_ids).tokens
    first = [task.verify(ex, chat.decode(g)) for ex, g in zip(examples, greedy)]
    assert res["n"] == 10 and res["first_success"] == sum(first)
    recs = res["records"]
    assert [r["attempt_correct"] for r in recs] == first
    assert [r["attempt"] for r in recs] == [chat.decode(g) for g in greedy]
    for r, ok in zip(recs, first):
        assert ("reflection" in r) == (not ok) and ("retry" in r) == (not ok)
        if not ok:
            assert r["retry_correct"] == task.verify(r["example"], r["retry"])
            assert 1 <= r["reflection_tokens"] <= 6  # the reflection's span; max_new_tokens bounds it
    # each reflection's length is its span in the conversation, whose tokens are its text
    ep = run_episode(model, tok, task, examples, group_size=1, sampling=SIX, seed=0, chat=chat)
    failed = [r for r in recs if not r["attempt_correct"]]
    assert [r["reflection_tokens"] for r in failed] == [e - s for s, e in ep.spans]
    assert [r["reflection"] for r in failed] == [chat.decode(seq[s:e]) for seq, (s, e) in zip(ep.sequences, ep.spans)]
    assert [chat.decode(seq[s:e + 1]) for seq, (s, e) in zip(ep.sequences, ep.spans)] != [r["reflection"] for r in failed]
    assert res["second_success"] == res["first_success"] + sum(r.get("retry_correct", False) for r in recs)
    assert res["second_attempt_accuracy"] == pytest.approx(res["second_success"] / 10)
    assert res["first_attempt_accuracy"] == pytest.approx(res["first_success"] / 10)
    assert res["delta"] == pytest.approx(res["second_attempt_accuracy"] - res["first_attempt_accuracy"])
    assert 0 < res["first_success"] < res["second_success"]  # this seed/model: both kinds of gain
    # batching does not change greedy results
    again = E.evaluate_examples(model, tok, task, examples, SIX, batch_size=3)
    assert {k: again[k] for k in ("first_success", "second_success")} == {k: res[k] for k in ("first_success", "second_success")}
    assert "records" not in again


def test_generate_cli_compile_times_the_compile_apart_and_decodes_the_same(tiny_dir, capsys, monkeypatch):
    from torch._dynamo.utils import counters

    import r3.decode
    from r3 import generate as G

    # the decode path a GPU takes (a static cache, grown past its first size; graph runs)
    monkeypatch.setattr(r3.decode, "CUDA_GRAPHS", True)
    args = ["--model", tiny_dir, "--prompt", "hello there", "--max-new-tokens", "150", "--temperature", "0",
            "--dtype", "fp32"]
    rc, plain_out, plain_err = run_main(G.main, args, capsys)
    assert rc == 0, plain_err
    real, compiles = G.generate, []

    def counted(*a, **kw):  # graphs compiled during each call
        before = sum(counters["stats"].values()) if "stats" in counters else 0
        out = real(*a, **kw)
        compiles.append(sum(counters["stats"].values()) - before)
        return out

    monkeypatch.setattr(G, "generate", counted)
    rc, comp_out, comp_err = run_main(G.main, args + ["--decode", "compiled"], capsys)
    assert rc == 0, comp_err
    assert comp_out == plain_out and comp_out.strip()  # fp32 greedy: the compiled step gives the same tokens
    assert "compiled the decode step (one untimed run) in" in comp_err and "compiled" not in plain_err
    assert "tokens/s" in comp_err
    assert len(compiles) == 2 and compiles[0] > 0 and compiles[1] == 0  # nothing compiled in the timed run


def test_evaluate_examples_compiled_decode_equals_eager(tiny, monkeypatch):
    model, tok, _ = tiny
    task = coin_task()
    examples = task.examples("test", 6)
    eager = E.evaluate_examples(model, tok, task, examples, SIX, batch_size=6, records=True)
    seen = []
    import r3.heldout as heldout

    real = heldout.run_episode
    monkeypatch.setattr(heldout, "run_episode", lambda *a, **k: seen.append(k["sampling"].decode) or real(*a, **k))
    comp = E.evaluate_examples(model, tok, task, examples, dataclasses.replace(SIX, decode="compiled"), batch_size=6,
                               records=True)
    assert seen == ["compiled"]
    keys = ("first_success", "second_success", "records")
    assert {k: comp[k] for k in keys} == {k: eager[k] for k in keys}
    assert E.parse_args(["--decode", "compiled", "--out", "x.json"]).decode == "compiled"
    assert E.parse_args(["--compile", "--out", "x.json"]).decode == "compiled"  # the earlier flag
    assert E.parse_args(["--out", "x.json"]).decode == "eager"


def _without_times(data):
    """An evaluation's JSON without what depends on the clock."""
    return json.loads(json.dumps(data), object_hook=lambda d: {k: v for k, v in d.items() if k != "time_s"})


def test_evaluate_cli_resumes_from_the_finished_batches(tiny_dir, tmp_path_factory, builtin, tmp_path, capsys,
                                                        monkeypatch):
    """Interrupted in the second model's second batch, a rerun of the same command evaluates only
    the batches not finished and writes what an uninterrupted run writes (verdicts, verifier errors
    and records); another command to the same --out is refused, naming what differs; a line cut
    short by the crash is dropped."""
    import r3.heldout as heldout
    from test_episode import build_tiny_chat_model

    second = str(build_tiny_chat_model(tmp_path_factory.mktemp("cli") / "second", builtin[1], seed=1))
    base = ["--model", tiny_dir, "--model", second, "--task", "r3_test_tasks:FlakyTask", "--n", "7",
            "--batch-size", "3", "--max-new-tokens", "6", "--dtype", "fp32", "--records", "--quiet"]
    rc, _, err = run_main(E.main, base + ["--out", str(tmp_path / "whole.json")], capsys)
    assert rc == 0, err
    whole = json.loads((tmp_path / "whole.json").read_text())
    assert all(0 < m["verifier_errors"] < m["verdicts"] for m in whole["models"])  # (read back too)
    # the paired changes, later model minus the first, at each attempt (the retries changed verdicts)
    m0, m1 = whole["models"]
    assert m0["second_correct"] != m0["first_correct"] and m1["second_correct"] != m1["first_correct"]
    for key in ("first", "second"):
        assert whole["paired"][0][f"{key}_attempt"] == S.paired_difference(m0[f"{key}_correct"], m1[f"{key}_correct"])
    assert not (tmp_path / "whole.json.partial.jsonl").exists()  # gone once the result is written

    real, calls = heldout.evaluate_batch, []

    def counting(*a, stop_at=None, **k):
        calls.append(len(a[3]))
        if len(calls) == stop_at:
            raise KeyboardInterrupt
        return real(*a, **k)

    out = tmp_path / "e.json"
    partial = tmp_path / "e.json.partial.jsonl"
    monkeypatch.setattr(heldout, "evaluate_batch", lambda *a, **k: counting(*a, stop_at=5, **k))
    rc, _, err = run_main(E.main, base + ["--out", str(out)], capsys)
    assert rc == 130 and f"interrupted: 4 finished batches kept in {partial}; the same command goes on" in err, err
    # the output so far holds the first model alone, and no top-level result (that is the last model's)
    early = json.loads(out.read_text())
    assert [m["model"] for m in early["models"]] == [tiny_dir] and "first_attempt_accuracy" not in early
    assert whole["model"] == second and whole["delta"] == whole["models"][1]["delta"]
    lines = read_lines(partial)
    assert "r3_partial_results" in lines[0] and [(r["unit"], r["batch"]) for r in lines[1:]] == \
        [(tiny_dir, 0), (tiny_dir, 1), (tiny_dir, 2), (second, 0)]
    assert all(r["s"] >= 0 for r in lines[1:])  # (each batch's time, for the rerun's time_s)
    kept_s = sum(r["s"] for r in lines[1:4])
    # the crash cut its last line short
    partial.write_bytes(partial.read_bytes()[:-9])
    calls.clear()
    monkeypatch.setattr(heldout, "evaluate_batch", lambda *a, **k: counting(*a, **k))
    rc, _, err = run_main(E.main, base + ["--out", str(out)], capsys)
    assert rc == 0, err
    assert "dropping the last line, cut short" in err and "resuming: 3 finished batches" in err
    assert calls == [3, 3, 1]  # the second model's batches only
    resumed = json.loads(out.read_text())
    assert _without_times(resumed) == _without_times(whole)
    assert resumed["models"][0]["time_s"] >= kept_s - 1e-3  # (read back, each batch's time counted)
    assert not partial.exists()
    # an interrupted run of another command to the same --out: its batches are neither reused nor
    # thrown away by a mistyped command
    calls.clear()
    monkeypatch.setattr(heldout, "evaluate_batch", lambda *a, **k: counting(*a, stop_at=2, **k))
    assert run_main(E.main, base + ["--out", str(out), "--seed", "1"], capsys)[0] == 130
    monkeypatch.setattr(heldout, "evaluate_batch", lambda *a, **k: counting(*a, **k))
    kept = partial.read_bytes()
    rc, _, err = run_main(E.main, base + ["--out", str(out)], capsys)
    one_line_error(rc, err, "holds 1 finished batches of an evaluation with other inputs (settings.seed): rerun "
                            "that command to finish it, or delete the file to start this one")
    assert partial.read_bytes() == kept
    partial.unlink()
    calls.clear()
    rc, _, err = run_main(E.main, base + ["--out", str(out)], capsys)
    assert rc == 0, err
    assert len(calls) == 6 and _without_times(json.loads(out.read_text())) == _without_times(whole)
    # replacing an earlier result: interrupted after the first model, the earlier file is left
    # whole (it was a file of the first model alone, which r3.report cannot read), and the rerun
    # replaces it once both models are done
    earlier = out.read_bytes()
    calls.clear()
    monkeypatch.setattr(heldout, "evaluate_batch", lambda *a, **k: counting(*a, stop_at=5, **k))
    assert run_main(E.main, base + ["--out", str(out)], capsys)[0] == 130
    assert out.read_bytes() == earlier and len(read_lines(partial)) == 5
    monkeypatch.setattr(heldout, "evaluate_batch", lambda *a, **k: counting(*a, **k))
    rc, _, err = run_main(E.main, base + ["--out", str(out)], capsys)
    assert rc == 0 and "resuming: 4 finished batches" in err, err
    assert out.read_bytes() != earlier and _without_times(json.loads(out.read_text())) == _without_times(whole)
    assert not partial.exists()
    # a file there that is not one of ours is refused, not overwritten
    partial.write_text("hello\n")
    rc, _, err = run_main(E.main, base + ["--out", str(out)], capsys)
    one_line_error(rc, err, "not a file of finished batches")


@pytest.mark.parametrize("changed", ["examples", "models", "records", "code"])
def test_evaluate_refuses_the_finished_batches_of_other_inputs_under_the_same_flags(tiny_dir, tmp_path, capsys,
                                                                                    monkeypatch, changed):
    """What the batches depend on beyond the flags: the data file's examples, the model's files (an
    export retrained in place), --records (batches without per-example records), and the task's
    source (a fixed verifier). Any of them changed, the kept batches are another evaluation's."""
    import shutil

    import r3.heldout as heldout

    model, words, plug = tmp_path / "model", tmp_path / "words.txt", tmp_path / f"plug_{changed}.py"
    shutil.copytree(tiny_dir, model)
    words.write_text("alpha beta gamma delta")
    plug.write_text("from r3_test_tasks import FileCoinTask\n\n\nclass Plug(FileCoinTask):\n    name = 'plug'\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    argv = ["--model", str(model), "--task", f"plug_{changed}:Plug", "--task-option", f"data_path={words}", "--n", "4",
            "--batch-size", "2", "--max-new-tokens", "3", "--dtype", "fp32", "--quiet", "--out", str(tmp_path / "e.json")]
    real, calls = heldout.evaluate_batch, []

    def interrupted_at_the_second(*a, **k):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(heldout, "evaluate_batch", interrupted_at_the_second)
    assert run_main(E.main, argv, capsys)[0] == 130
    monkeypatch.setattr(heldout, "evaluate_batch", real)
    if changed == "examples":
        words.write_text("alpha beta gamma omega")
    elif changed == "models":
        st = (model / "model.safetensors").stat()
        os.utime(model / "model.safetensors", ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
    elif changed == "records":
        argv.append("--records")
    else:
        plug.write_text(plug.read_text() + "# (the verifier fixed)\n")
    rc, _, err = run_main(E.main, argv, capsys)
    one_line_error(rc, err, f"holds 1 finished batches of an evaluation with other inputs ({changed}")


def test_evaluate_pairs_every_later_model_with_the_first(tiny_dir, tmp_path, capsys):
    """With three models, the third's paired change is against the first (the baseline), not
    against the model before it."""
    import shutil

    copies = [str(shutil.copytree(tiny_dir, tmp_path / name)) for name in ("second", "third")]
    out = tmp_path / "e.json"
    rc, _, err = run_main(E.main, ["--model", tiny_dir, "--model", copies[0], "--model", copies[1], "--task",
                                   "r3_test_tasks:CoinTask", "--n", "3", "--max-new-tokens", "3", "--dtype", "fp32",
                                   "--quiet", "--out", str(out)], capsys)
    assert rc == 0, err
    data = json.loads(out.read_text())
    assert [(p["model"], p["baseline"]) for p in data["paired"]] == [(copies[0], tiny_dir), (copies[1], tiny_dir)]
    first = data["models"][0]
    for p, m in zip(data["paired"], data["models"][1:]):
        assert p["first_attempt"] == S.paired_difference(first["first_correct"], m["first_correct"])


def test_evaluate_says_the_cpu_share_note_once_for_all_its_models(tiny_dir, tmp_path, capsys, monkeypatch):
    """Each model's progress line had a watch of its own, so a machine shared all along got the
    note again for every model (the README: "it prints once"); one watch now serves the run."""
    import shutil
    from itertools import count

    import torch

    from r3 import cpu_share as C

    clock = count()
    monkeypatch.setattr(C, "take_sample", lambda cpus: C.CpuSample(10.0 * next(clock), 0.0, 0.0))  # (10 s apart)
    monkeypatch.setattr(C, "others_cores", lambda before, after: 1.0)  # (every batch: one core taken)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
    monkeypatch.setattr(C, "_affinity", lambda: {0, 1})
    copy = str(shutil.copytree(tiny_dir, tmp_path / "second"))
    rc, _, err = run_main(E.main, ["--model", tiny_dir, "--model", copy, "--task", "r3_test_tasks:CoinTask", "--n", "2",
                                   "--max-new-tokens", "3", "--dtype", "fp32", "--device", "cpu",
                                   "--out", str(tmp_path / "e.json")], capsys)
    assert rc == 0, err
    assert err.count("note: other processes kept 1.0 of the 2 CPU cores busy") == 1, err


def test_evaluate_with_a_verifier_that_always_raises_keeps_no_partial_results(tiny_dir, tmp_path, capsys):
    """Every verdict an error: one line, and no finished batches kept that a rerun with the task
    fixed would have to be told to delete."""
    out = tmp_path / "e.json"
    rc, _, err = run_main(E.main, ["--model", tiny_dir, "--task", "r3_test_tasks:RaisingTask", "--n", "3",
                                   "--batch-size", "2", "--max-new-tokens", "4", "--dtype", "fp32", "--quiet",
                                   "--out", str(out)], capsys)
    assert rc == 2 and err.splitlines()[-1].startswith("error: the task's verifier failed on all 6 completions"), err
    assert not out.exists() and not (tmp_path / "e.json.partial.jsonl").exists()


def test_failures_with_a_verifier_that_always_raises_writes_no_failures(tiny_dir, tmp_path, capsys):
    """Every verdict an error: r3.failures took each for a failed attempt and wrote every query
    to the dataset as a failure, exit 0 and not a word; now one line and no record. A verifier
    that raises now and then is said once, as in r3.evaluate."""
    argv = ["--model", tiny_dir, "--samples", "2", "--max-new-tokens", "4", "--dtype", "fp32", "--quiet",
            "--cut-answers", "judge"]  # (the verifier reads every attempt, cut off or not)
    out = tmp_path / "f.jsonl"
    rc, _, err = run_main(F.main, argv + ["--task", "r3_test_tasks:RaisingTask", "--n", "3", "--out", str(out)], capsys)
    assert rc == 2 and err.splitlines()[-1] == ("error: the task's verifier failed on all 3 completions while "
                                                "sampling failures (first: KeyError: 'answr'); fix the task: its "
                                                "_check returns (bool, reason) and never raises"), err
    assert not out.exists() or not out.read_text()
    rc, _, err = run_main(F.main, argv + ["--task", "r3_test_tasks:FlakyTask", "--n", "8",
                                          "--out", str(tmp_path / "g.jsonl")], capsys)
    assert rc == 0 and err.count("warning: the task's verifier failed on ") == 1, err
    assert "while sampling failures; they count as wrong (first: KeyError: 'answr')" in err


def test_evaluate_cli_two_models_builtin_and_tiny(tiny_dir, tmp_path, capsys):
    out = tmp_path / "sub" / "eval.json"
    argv = ["--model", "smollm2-135m", "--model", tiny_dir, "--task", "countdown", "--task-option", "difficulty=easy",
            "--n", "3", "--max-new-tokens", "12", "--dtype", "bf16", "--out", str(out), "--records"]
    rc, stdout, err = run_main(E.main, argv, capsys)
    assert rc == 0, err
    assert "evaluate smollm2-135m: 3/3" in err and "ETA" in err
    data = json.loads(out.read_text())
    assert {"n", "task", "settings", "models", "paired"} <= set(data)
    # several models: the top level is the last one's, named (with --run the export, not the base)
    assert data["model"] == tiny_dir
    assert [data[k] for k in ("first_attempt_accuracy", "second_attempt_accuracy", "delta")] == \
        [data["models"][1][k] for k in ("first_attempt_accuracy", "second_attempt_accuracy", "delta")]
    assert data["n"] == 3 and data["task"] == "countdown"
    assert data["task_options"] == {"difficulty": "easy"} and data["settings"]["temperature"] == 0.0
    assert [m["model"] for m in data["models"]] == ["smollm2-135m", tiny_dir]
    from r3.tasks import get

    task = get("countdown", difficulty="easy")
    for m in data["models"]:
        assert m["n"] == 3 and len(m["records"]) == 3
        assert m["second_attempt_accuracy"] >= m["first_attempt_accuracy"]
        assert m["first_success"] == sum(r["attempt_correct"] for r in m["records"])
        assert m["second_success"] == m["first_success"] + sum(r.get("retry_correct", False) for r in m["records"])
        for r in m["records"]:
            assert task.verify(r["example"], r["attempt"]) == r["attempt_correct"]
            # the verifier's reasons, consistent with the verdicts
            assert (r["attempt_reason"] == "correct") == r["attempt_correct"]
            assert ("retry_reason" in r) == ("retry" in r)
            if "retry" in r:
                assert (r["retry_reason"] == "correct") == r["retry_correct"]
    # the table
    lines = stdout.strip().splitlines()
    assert [c.strip() for c in lines[0].split("|")[1:]] == ["acc 1st (%)", "acc 2nd (%)", "delta (points)"]
    assert lines[2].startswith("smollm2-135m") and lines[3].startswith(tiny_dir)
    first = data["models"][0]
    assert f"{100 * first['first_attempt_accuracy']:5.1f} \u00b1 {100 * first['first_attempt_stderr']:4.1f}" in lines[2]
    # standard errors and the paired change of the second model against the first
    for m in data["models"]:
        k, n = m["first_success"], m["n"]
        assert m["first_attempt_stderr"] == pytest.approx(((k / n) * (1 - k / n) / n) ** 0.5)
        assert len(m["first_correct"]) == len(m["second_correct"]) == n
    (pair,) = data["paired"]
    a, b = (data["models"][i]["first_correct"] for i in (0, 1))
    assert pair["first_attempt"]["mean"] == pytest.approx((sum(b) - sum(a)) / 3)
    a2, b2 = (data["models"][i]["second_correct"] for i in (0, 1))
    assert pair["second_attempt"] == S.paired_difference(a2, b2) and pair["baseline"] == "smollm2-135m"
    assert lines[4].startswith(f"paired, {tiny_dir} minus smollm2-135m (same 3 queries)")


def test_evaluate_without_n_takes_the_whole_split(tiny_dir, tmp_path, capsys):
    """No --n: every query of the task's test split (a run made with test_size=90 is evaluated on
    its 90 queries, not refused for lacking 100)."""
    out = tmp_path / "eval.json"
    argv = ["--model", tiny_dir, "--task", "countdown", "--task-option", "difficulty=easy",
            "--task-option", "test_size=3", "--max-new-tokens", "4", "--dtype", "fp32", "--out", str(out)]
    rc, _, err = run_main(E.main, argv, capsys)
    assert rc == 0, err
    data = json.loads(out.read_text())
    assert data["n"] == 3 and data["model"] == tiny_dir  # one model: its numbers at the top level too
    assert data["synthetic_data"] is True  # (Countdown's generated problems, not a data file)
    m = data["models"][0]
    assert [data[k] for k in ("first_attempt_accuracy", "second_attempt_accuracy", "delta")] == \
        [m[k] for k in ("first_attempt_accuracy", "second_attempt_accuracy", "delta")]


def test_paired_difference_by_hand():
    d = S.paired_difference([True, False, True, False], [True, True, False, True])
    # differences 0, 1, -1, 1: mean 0.25, sample variance ((0.25^2 + 0.75^2 + 1.25^2 + 0.75^2) / 3)
    assert d["mean"] == 0.25 and d["better"] == 2 and d["worse"] == 1
    assert d["stderr"] == pytest.approx((((0.0625 + 0.5625 + 1.5625 + 0.5625) / 3) / 4) ** 0.5)
    assert S.paired_difference([True] * 5, [True] * 5)["stderr"] == 0.0
    assert S.binomial_stderr(1, 4) == pytest.approx((0.25 * 0.75 / 4) ** 0.5)


def test_evaluate_run_refuses_flags_it_takes_from_the_run(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    rc, _, err = run_main(E.main, ["--run", str(run), "--out", str(tmp_path / "e.json")], capsys)
    one_line_error(rc, err, "config.json: missing")
    (run / "config.json").write_text(json.dumps({"model": "smollm2-135m", "task": "countdown", "task_options": {},
                                                 "max_attempt_tokens": 8, "max_reflection_tokens": 8,
                                                 "max_retry_tokens": 8}))
    rc, _, err = run_main(E.main, ["--run", str(run), "--out", str(tmp_path / "e.json")], capsys)
    one_line_error(rc, err, "no export yet")
    rc, _, err = run_main(E.main, ["--run", str(run), "--task", "countdown", "--out", str(tmp_path / "e.json")], capsys)
    one_line_error(rc, err, "drop --task")
    rc, _, err = run_main(E.main, ["--run", str(run), "--model", "m", "--task-option", "a=1", "--out",
                                   str(tmp_path / "e.json")], capsys)
    one_line_error(rc, err, "--run takes the models, task and options from the run; drop --model, --task-option")
    rc, _, err = run_main(E.main, ["--run", str(run)], capsys)  # (--out defaults to the run's evaluation.json)
    one_line_error(rc, err, "no export yet")
    (run / "evaluation.json").write_text("{}")  # (an earlier one, which r3.report reads: not replaced unasked)
    rc, _, err = run_main(E.main, ["--run", str(run)], capsys)
    one_line_error(rc, err, f"{run / 'evaluation.json'} exists (an earlier evaluation, which r3.report reads); "
                            f"pass --out {run / 'evaluation.json'} to replace it, or another --out")
    (run / "evaluation.json.partial.jsonl").write_text("")  # (an interrupted one: the rerun goes on with it)
    rc, _, err = run_main(E.main, ["--run", str(run)], capsys)
    one_line_error(rc, err, "no export yet")
    rc, _, err = run_main(E.main, ["--model", "smollm2-135m"], capsys)
    one_line_error(rc, err, "--out is required (the JSON result file); with --run it defaults to RUN/evaluation.json")


# --------------------------------------------------------------------------------------------
# bad input: one line, exit 2
# --------------------------------------------------------------------------------------------


def test_read_failures_for_training(tmp_path):
    from r3.errors import R3Error

    with pytest.raises(R3Error, match="does not exist"):
        F.read_failures(tmp_path / "none.jsonl")
    # r3.failures found no failure: it wrote only the .done file, so the file is not "missing"
    (tmp_path / "none.jsonl.done").write_text('{"r3_failures": 1, "settings": {}}\n')
    with pytest.raises(R3Error, match=r"none.jsonl: no failure records to train on \(r3.failures found none: "
                                      r"every query in .*none.jsonl.done passed\)"):
        F.read_failures(tmp_path / "none.jsonl")
    hand = tmp_path / "hand.jsonl"  # a hand-made file: no keys needed
    hand.write_text('{"example": {"nums": [1, 2], "target": 3}, "attempt_tokens": [5, 2]}\n')
    assert F.read_failures(hand) == [{"example": {"nums": [1, 2], "target": 3}, "attempt_tokens": [5, 2]}]
    for bad in ('{"example": {}, "attempt_tokens": []}\n', '{"example": {}, "attempt_tokens": ["a"]}\n',
                '{"example": {}, "attempt_tokens": [5, -1]}\n', '{"example": {}, "attempt_tokens": [true]}\n',
                '{"attempt_tokens": [1]}\n', '[1, 2]\n', 'nonsense\n'):
        hand.write_text(bad)
        with pytest.raises(R3Error) as e:
            F.read_failures(hand)
        assert "--out" not in str(e.value)  # (training reads it: no advice meant for r3.failures)


def test_read_failures_keeps_a_whole_last_record_written_without_its_newline(tmp_path, capsys):
    """A hand-made file often ends without a newline ("\\n".join(...)): its last record, whole, was
    dropped as "an interrupted write" (with a key) or the file refused as not one of ours (without
    one). A last line a crash cut short is still left out with the warning."""
    recs = [{"key": "a", "example": {"nums": [1, 2], "target": 3}, "attempt_tokens": [5]},
            {"example": {"nums": [2, 2], "target": 4}, "attempt_tokens": [6, 0]}]
    hand = tmp_path / "hand.jsonl"
    for order in (recs, recs[::-1]):
        hand.write_text("\n".join(json.dumps(r) for r in order))
        assert F.read_failures(hand) == order and capsys.readouterr().err == ""
    hand.write_text(json.dumps(recs[0]) + "\n" + json.dumps(recs[0])[:-1])  # (cut before its last brace)
    assert F.read_failures(hand) == recs[:1] and "ignoring a truncated last line" in capsys.readouterr().err
    # a byte-order mark (Windows tools write one) is skipped, as task data files' is
    hand.write_bytes(b"\xef\xbb\xbf" + "\n".join(json.dumps(r) for r in recs).encode())
    assert F.read_failures(hand) == recs and capsys.readouterr().err == ""


def test_read_failures_takes_blank_lines_and_token_id_0_and_refuses_an_example_that_is_no_object(tmp_path):
    """A hand-made file may hold blank lines, and 0 is a token id like any other (often a special
    token, the stop token included); an 'example' that is a list or a string is no example (it
    reached the task's checks, or the prompt builder, as something else)."""
    from r3.errors import R3Error

    recs = [{"example": {"nums": [1, 2], "target": 3}, "attempt_tokens": [0]},
            {"example": {"nums": [2, 2], "target": 4}, "attempt_tokens": [7, 0]}]
    hand = tmp_path / "hand.jsonl"
    hand.write_text("\n" + json.dumps(recs[0]) + "\n  \n\n" + json.dumps(recs[1]) + "\n\n")
    assert F.read_failures(hand) == recs
    for example in ([1, 2], "nums 1 2", None):
        hand.write_text(json.dumps({"example": example, "attempt_tokens": [5]}) + "\n")
        with pytest.raises(R3Error, match="record 1 lacks an 'example' object"):
            F.read_failures(hand)


def test_a_failure_file_line_whose_key_is_not_text_is_not_ours(tmp_path):
    """Every line r3.failures writes has a text key (the example's hash): a null or numeric key is
    a hand-edited or foreign file, refused before anything is appended to it."""
    from r3.errors import R3Error

    out = tmp_path / "f.jsonl"
    for key in (None, 5):
        out.write_text(json.dumps({"key": key, "example": {"nums": [1, 2], "target": 3}, "attempt_tokens": [5]}) + "\n")
        with pytest.raises(R3Error, match=r"line 1: expected a JSON object with a key; .*use another --out"):
            F.FailureFile(out)


def test_run_directory_and_json_mistakes_are_one_line(tmp_path, monkeypatch, capsys):
    """read_json_object / read_run_config / read_run / load_model / parse_chat_template_options:
    every mistake is an R3Error naming the file or flag (the CLIs print it in one line, exit 2)."""
    from r3.errors import R3Error

    f = tmp_path / "x.json"
    for content, pattern in [(None, "x.json: gone"), ("{oops", "x.json: unreadable"),
                             (b"\xff\xfe{", "x.json: unreadable"), ("[1, 2]", "x.json: not a JSON object")]:
        if content is not None:
            f.write_bytes(content if isinstance(content, bytes) else content.encode())
        with pytest.raises(R3Error, match=pattern):
            C.read_json_object(f, "gone")
    f.write_text('{"a": 1}')
    assert C.read_json_object(f) == {"a": 1}

    run = tmp_path / "run"
    with pytest.raises(R3Error, match="run: no such run directory"):
        C.read_run_config(run)
    run.write_text("")  # (a file given for the run: said so, not "no such")
    with pytest.raises(R3Error, match=r"run: not a run directory \(a file\)"):
        C.read_run_config(run)
    from r3.evaluate import main as evaluate_main

    with pytest.raises(SystemExit):
        evaluate_main(["--run", str(run)])
    assert capsys.readouterr().err.strip().endswith("run: not a run directory (a file)")  # (not "--out run/evaluation.json: ...")
    run.unlink()
    run.mkdir()
    for cfg, pattern in [({"task": "countdown"}, "missing field 'task_options'"),
                         ({"task": "countdown", "task_options": ["a"]}, "'task_options' an object"),
                         ({"task": 3, "task_options": {}}, "'task' must be a string")]:
        (run / "config.json").write_text(json.dumps(cfg))
        with pytest.raises(R3Error, match=pattern):
            C.read_run_config(run)
    cfg = {"model": "m", "task": "countdown", "task_options": {}, "max_attempt_tokens": 1, "max_reflection_tokens": 1,
           "max_retry_tokens": 1}
    (run / "config.json").write_text(json.dumps(cfg))
    assert C.read_run_config(run) == cfg
    with pytest.raises(R3Error, match="the run has not finished: rerun r3.train with --out"):
        C.read_run(str(run))
    import fcntl

    with open(run / ".lock", "a+") as held:  # (r3.train still running there: said, not "rerun r3.train")
        held.write("pid 123 on node7\n")
        held.flush()
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        code = ("import sys; from r3.cli import read_run\ntry: read_run(sys.argv[1])\n"
                "except Exception as e: print(e)")
        said = subprocess.run([sys.executable, "-c", code, str(run)], capture_output=True, text=True).stdout
    assert said.strip().endswith("the run is still training (pid 123 on node7): evaluate it when it ends"), said
    with pytest.raises(R3Error, match="the run has not finished"):  # (released: a lock file alone is no run)
        C.read_run(str(run))
    for step in (20, 40):  # (a stopped run: its last complete checkpoint can be exported as it stands)
        (run / "checkpoints" / f"step_{step}").mkdir(parents=True)
        (run / "checkpoints" / f"step_{step}" / "trainer_state.json").write_text("{}")
    (run / "checkpoints" / "step_60").mkdir()  # (cut short: no trainer state)
    with pytest.raises(R3Error) as e:
        C.read_run(str(run))
    assert str(e.value).endswith(f"rerun r3.train with --out {run} to finish it, or with --max-steps 40 as well to "
                                 "export its last checkpoint (step 40)")
    (run / "export").mkdir()  # (an export cut off before its config.json: the run has not finished either)
    with pytest.raises(R3Error, match="no export yet"):
        C.read_run(str(run))
    (run / "export" / "config.json").write_text("{}")
    assert C.read_run(str(run)) == cfg
    for field in ("model", "max_attempt_tokens", "max_reflection_tokens", "max_retry_tokens"):  # (--run reads each)
        (run / "config.json").write_text(json.dumps({k: v for k, v in cfg.items() if k != field}))
        with pytest.raises(R3Error, match=f"config.json: missing field '{field}'$"):
            C.read_run(str(run))

    monkeypatch.setattr(C, "load", lambda spec, dtype, device: (object(), None))
    with pytest.raises(R3Error, match="^some/model: no tokenizer$"):
        C.load_model("some/model", None, "cpu")
    with pytest.raises(R3Error, match="^--chat-template-option: 'tokenize' is an argument r3 gives"):
        C.parse_chat_template_options(["tokenize=true"])
    assert C.parse_chat_template_options(["enable_thinking=false", "x=1"]) == {"x": 1}


def test_parse_task_options():
    assert C.parse_task_options(["a=3", "b=true", "c=easy", "d=0.5", 'e="7"', "f=[1, 2]", "g=", "h=x=y"]) == {
        "a": 3, "b": True, "c": "easy", "d": 0.5, "e": "7", "f": [1, 2], "g": "", "h": "x=y"}


@pytest.mark.parametrize("cli,args,pattern", [
    ("failures", ["--task", "nope"], "unknown task 'nope'"),
    ("evaluate", ["--task", "nope"], "unknown task 'nope'"),
    ("failures", ["--task", "countdown", "--task-option", "colour=red"], "unknown option colour"),
    ("evaluate", ["--task", "countdown", "--task-option", "difficulty=extreme"], "difficulty"),
    ("evaluate", ["--task-option", "difficulty"], "key=value"),
    ("failures", ["--n", "0"], "--n must be a positive integer"),
    ("evaluate", ["--n", "-3"], "--n must be a positive integer"),
    ("evaluate", ["--n", "many"], "invalid int value"),
    ("failures", ["--samples", "0"], "--samples"),
    ("failures", ["--samples", "4", "--temperature", "0"], "greedy"),
    ("evaluate", ["--temperature", "-1"], "temperature"),
    ("evaluate", ["--split", "dev"], "unknown split 'dev'"),
    # each count flag is checked before anything else (the unknown task is not reached): unchecked,
    # a 0 reads as unset (256 tokens), or is refused only once the model has loaded, by no flag's name
    ("evaluate", ["--max-new-tokens", "0", "--task", "nope"], "--max-new-tokens must be a positive integer, got 0"),
    ("evaluate", ["--max-reflection-tokens", "0", "--task", "nope"],
     "--max-reflection-tokens must be a positive integer, got 0"),
    ("evaluate", ["--batch-size", "0", "--task", "nope"], "--batch-size must be a positive integer, got 0"),
    ("evaluate", ["--task", "r3_test_tasks:CoinTask", "--task-option", "size=0"],
     "task 'r3_test_tasks:CoinTask': no test examples"),
    ("failures", ["--model", "/no/such/model", "--n", "2"], "does not exist"),
    ("evaluate", ["--model", "/no/such/model", "--n", "2"], "does not exist"),
    ("failures", ["--dtype", "int4"], "invalid choice"),
    ("failures", ["--max-new-tokens", "9000"], "token limits attempt 9000, more than the 8192 positions of smollm2-135m"),
    ("evaluate", ["--max-reflection-tokens", "9000"],
     "token limits attempt 256 + reflection 9000 + retry 256 = 9512, more than the 8192 positions of smollm2-135m"),
])
def test_bad_input_is_one_line_exit_2(cli, args, pattern, tmp_path, capsys):
    out = str(tmp_path / ("f.jsonl" if cli == "failures" else "e.json"))
    main = F.main if cli == "failures" else E.main
    rc, _, err = run_main(main, ["--out", out] + args, capsys)
    one_line_error(rc, err, pattern)


@pytest.mark.parametrize("module,args,pattern", [
    ("r3.generate", [], "python -m r3.generate: the following arguments are required: --prompt (see --help)"),
    ("r3.plot", [".", "--smooth", "x"], "python -m r3.plot: argument --smooth: invalid int value: 'x'"),
    ("r3.tasks.function_calling", ["--synthetic", "x"], "argument --synthetic: invalid int value: 'x'"),
])
def test_argument_mistakes_are_one_line_in_every_cli(module, args, pattern, capsys):
    # (these three printed argparse's usage text: up to 10 lines)
    import importlib

    rc, _, err = run_main(importlib.import_module(module).main, args, capsys)
    one_line_error(rc, err, pattern)


@pytest.mark.parametrize("content,pattern", [
    (b"hello world\n", "not valid JSON"),
    (b'{"no_key": 1}\n', "expected a JSON object with a key"),
    (b"\x89PNG\r\n\x1a\n\x00\x00", "not"),
    (b'{"key": "a", "example": {}, "attempt_tokens": [1]}\ngarbage without newline', "last line is not a record"),
])
def test_failures_refuses_a_foreign_out_file(content, pattern, tmp_path, capsys):
    out = tmp_path / "f.jsonl"
    out.write_bytes(content)
    rc, _, err = run_main(F.main, ["--out", str(out), "--n", "2"], capsys)
    one_line_error(rc, err, pattern)
    assert err.rstrip().endswith("; use another --out")  # (r3.failures would append to it)
    assert out.read_bytes() == content  # left untouched


def test_out_is_a_directory(tmp_path, capsys):
    for main in (F.main, E.main):
        rc, _, err = run_main(main, ["--out", str(tmp_path), "--n", "2"], capsys)
        one_line_error(rc, err, "is a directory")


@pytest.mark.parametrize("module,args,pattern", [
    ("r3.evaluate", ["--model", "/no/such/model", "--n", "2", "--out", "{tmp}/e.json"], "does not exist"),
    ("r3.failures", ["--n", "2", "--out", "{tmp}/bad.jsonl"], "not valid JSON"),
    ("r3.evaluate", ["--n", "2", "--out", "{tmp}/e.json", "WORLD_SIZE=2"], "not under torchrun with 2 processes"),
])
def test_subprocess_exit_2_without_traceback(module, args, pattern, tmp_path):
    (tmp_path / "bad.jsonl").write_text("not json\n")
    env = {**os.environ, "PYTHONPATH": str(HERE.parent)}
    env.update(a.split("=", 1) for a in args if a.startswith("WORLD_SIZE="))  # (as torchrun sets it)
    args = [a for a in args if not a.startswith("WORLD_SIZE=")]
    proc = subprocess.run([sys.executable, "-m", module] + [a.format(tmp=tmp_path) for a in args],
                          capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and pattern in lines[0], proc.stderr


def test_an_out_file_that_cannot_be_written_fails_before_any_work(tmp_path, monkeypatch):
    """check_out_path (every CLI's --out) makes a file where the output will go: a read-only file
    system was found only after the whole evaluation had run."""
    import errno
    import tempfile

    from r3.cli import check_out_path
    from r3.errors import R3Error

    assert check_out_path(str(tmp_path / "new" / "deeper" / "x.json")) == tmp_path / "new" / "deeper" / "x.json"
    assert not (tmp_path / "new").exists() and list(tmp_path.iterdir()) == []  # (the probe is gone)

    def read_only(*a, **k):
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(tempfile, "mkstemp", read_only)
    with pytest.raises(R3Error, match=f"--out {tmp_path}/x.json: cannot write in {tmp_path} \\(Read-only file system\\)"):
        check_out_path(str(tmp_path / "x.json"))


def test_pythons_own_memory_error_is_one_line_with_what_to_lower(capsys):
    """Python's allocator refusing (a MemoryError: r3.train's query list for a --batch-size typo of
    1e9) was a traceback, though the CPU allocator's refusal in torch is one line."""
    from r3.errors import cli_main

    def queries():
        raise MemoryError

    with pytest.raises(SystemExit) as e:
        cli_main(queries)()
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1, err
    assert err.startswith(f"error: out of memory at {os.path.abspath(__file__)}:") and " in queries (MemoryError); " in err
    assert "--batch-size" in err


def test_out_of_memory_is_one_line_with_what_to_lower(capsys):
    """A GPU's OutOfMemoryError, or the CPU allocator's refusal, is one line saying what to lower,
    exit 2; other runtime errors stay tracebacks."""
    import torch

    from r3.errors import cli_main

    def gpu():  # (torch's message: one line)
        raise torch.OutOfMemoryError(
            "CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total capacity of 79.11 GiB of which 1.02 GiB "
            "is free. Including non-PyTorch memory, this process has 78.08 GiB memory in use. Of the allocated memory "
            "76.50 GiB is allocated by PyTorch, and 1.02 GiB is reserved by PyTorch but unallocated. If reserved but "
            "unallocated memory is large try setting PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True to avoid "
            "fragmentation.  See documentation for Memory Management  (https://pytorch.org/docs/stable/notes/cuda.html)")

    def cache():  # (an allocation inside r3, through torch's Python frames)
        from r3.model import KVCache, ModelConfig

        cfg = ModelConfig(model_type="llama", vocab_size=8, hidden_size=32, intermediate_size=8, num_hidden_layers=1,
                          num_attention_heads=2, num_key_value_heads=2, head_dim=16)
        KVCache.empty(cfg, 2 ** 20, 2 ** 20, torch.float32, "cpu")

    def generated():  # (torch's generated code is skipped: FX's modules, inductor's output files)
        raiser = compile("def call():\n    raise torch.OutOfMemoryError('CUDA out of memory. Tried to allocate 1 GiB.')\n",
                         "/tmp/torchinductor_someone/ab/cabcdef.py", "exec")
        fx = compile("def forward():\n    call()\n", "<eval_with_key>.7", "exec")
        scope = {"torch": torch}
        exec(raiser, scope)
        exec(fx, scope)
        scope["forward"]()

    errs = []
    for fn in (gpu, lambda: torch.empty(2 ** 62, dtype=torch.uint8), cache, generated):
        with pytest.raises(SystemExit) as e:
            cli_main(fn)()
        assert e.value.code == 2
        errs.append(capsys.readouterr().err)
    for err in errs:
        assert err.count("\n") == 1 and err.startswith("error: out of memory at ") and "--batch-size" in err
    # where it was asked for: the innermost frame outside torch, r3's files relative to the checkout
    here = os.path.abspath(__file__)
    assert errs[0].startswith(f"error: out of memory at {here}:") and " in gpu (CUDA out of memory. " in errs[0]
    assert f"{here}:" in errs[1] and " in <lambda> (" in errs[1]
    assert errs[2].startswith("error: out of memory at r3/model.py:")
    assert " in <listcomp> (" in errs[2] or " in empty (" in errs[2]  # (Python 3.12 inlines comprehensions)
    assert "Tried to allocate 2.00 GiB" in errs[0] and "expandable_segments:True" in errs[0]
    assert "See documentation" not in errs[0] and "lower" not in errs[0] and "smaller batches" in errs[0]
    assert "can't allocate memory" in errs[1] and "can't allocate memory" in errs[2]
    assert errs[3].startswith(f"error: out of memory at {here}:") and " in generated (CUDA out of memory. " in errs[3]

    def other():
        raise RuntimeError("shape mismatch")

    with pytest.raises(RuntimeError, match="shape mismatch"):
        cli_main(other)()


def test_a_full_disk_is_one_line_naming_the_file(tmp_path, monkeypatch, capsys):
    """ENOSPC from any write of a CLI (an atomic output, an appended log) is one line naming the
    file, exit 2, nothing half-written; other OS errors stay tracebacks."""
    import errno
    import io

    from r3 import failure_data, files
    from r3.errors import cli_main

    class Full(io.StringIO):
        def write(self, text):
            raise OSError(errno.ENOSPC, "No space left on device")

    real_fdopen = os.fdopen
    monkeypatch.setattr(files.os, "fdopen", lambda fd, *a, **k: (os.close(fd), Full())[1])
    out = tmp_path / "result.json"
    main = cli_main(lambda: files.write_json_atomic(out, {"n": 1}))
    with pytest.raises(SystemExit) as e:
        main()
    assert e.value.code == 2
    assert re.fullmatch(f"error: No space left on device writing {re.escape(str(out))} "
                        r"\(\d+\.\d\d GiB free on that disk\); free space and run the command again\n", capsys.readouterr().err)
    assert list(tmp_path.iterdir()) == []
    monkeypatch.setattr(files.os, "fdopen", real_fdopen)

    monkeypatch.setattr(failure_data, "open", lambda *a, **k: Full(), raising=False)
    with pytest.raises(SystemExit):
        cli_main(lambda: failure_data.append_lines(tmp_path / "fails.jsonl", [{"key": "k"}]))()
    assert re.fullmatch(f"error: No space left on device writing {re.escape(str(tmp_path / 'fails.jsonl'))} "
                        r"\(\d+\.\d\d GiB free on that disk\); free space and run the command again\n", capsys.readouterr().err)

    def quota():  # (a cluster's quota is a full disk too)
        raise OSError(errno.EDQUOT, "Disk quota exceeded", "/scratch/out.json")

    with pytest.raises(SystemExit) as e:
        cli_main(quota)()
    assert e.value.code == 2 and re.fullmatch(  # (no /scratch here: the free space of the disk that would hold it)
        r"error: Disk quota exceeded writing /scratch/out.json \(\d+\.\d\d GiB free on that disk\); "
        r"free space and run the command again\n", capsys.readouterr().err)

    def ctrl_c():
        raise KeyboardInterrupt

    with pytest.raises(SystemExit) as e:
        cli_main(ctrl_c)()
    assert e.value.code == 130 and capsys.readouterr().err == "interrupted\n"

    def denied():
        raise PermissionError(errno.EACCES, "Permission denied", "/x")

    with pytest.raises(PermissionError):
        cli_main(denied)()


def test_sigterm_outside_a_handled_part_is_one_line_exit_143(tmp_path):
    """SIGTERM (a preemption) where no part of r3 handles it -- r3.failures at any time, r3.train
    while its models load, in the first held-out evaluation or in the export -- ended the process
    at once without a word (killed by the signal); it is "terminated" and exit 128 + 15, as Ctrl-C
    is "interrupted" and 130. A handler someone else set is left alone, and the default is back
    after the command."""
    script = tmp_path / "term.py"
    script.write_text(
        "import os, signal, sys, time\n"
        "from r3.errors import cli_main\n"
        "def main():\n"
        "    os.kill(os.getpid(), signal.SIGTERM)\n"
        "    time.sleep(30)\n"
        "try:\n"
        "    cli_main(main)()\n"
        "except SystemExit as e:\n"
        "    print('restored', signal.getsignal(signal.SIGTERM) is signal.SIG_DFL)\n"
        "    raise\n")
    env = {**os.environ, "PYTHONPATH": str(HERE.parent)}
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=env, timeout=120)
    assert (proc.returncode, proc.stderr, proc.stdout) == (143, "terminated\n", "restored True\n")

    from r3.errors import cli_main

    def own(signum, frame):
        raise KeyboardInterrupt

    import signal

    previous = signal.signal(signal.SIGTERM, own)
    try:
        seen = []
        cli_main(lambda: seen.append(signal.getsignal(signal.SIGTERM)))()
        assert seen == [own] and signal.getsignal(signal.SIGTERM) is own
    finally:
        signal.signal(signal.SIGTERM, previous)


def test_evaluate_checks_every_models_chat_template_before_the_first_runs(tiny_dir, tmp_path, capsys, monkeypatch):
    """A second model without a chat template failed only once the first was evaluated, with a
    line that did not say which model it was."""
    from conftest import copy_without_chat_template

    bare = copy_without_chat_template(tiny_dir, tmp_path / "no_template")
    monkeypatch.syspath_prepend(str(HERE / "helpers"))
    rc, _, err = run_main(E.main, ["--model", tiny_dir, "--model", str(bare), "--task", "r3_test_tasks:CoinTask",
                                   "--n", "2", "--out", str(tmp_path / "e.json"), "--dtype", "fp32"], capsys)
    assert rc == 2 and "evaluating" not in err, err
    assert err.strip().splitlines()[-1].startswith(f"error: {bare}: the tokenizer has no chat template")


def test_failures_samples_the_split_asked_for_and_a_rerun_keeps_it(tiny_dir, tmp_path, capsys):
    out = tmp_path / "f.jsonl"
    argv = ["--model", tiny_dir, "--task", COIN, "--samples", "1", "--n", "3", "--out", str(out),
            "--max-new-tokens", "4", "--dtype", "fp32", "--split", "test"]
    rc, _, err = run_main(F.main, argv, capsys)
    assert rc == 0, err
    test_keys = sorted(F.example_key(ex) for ex in coin_task().examples("test", 3))
    recorded = read_lines(out) + read_lines(F.done_path(out))[1:]
    assert sorted(r["key"] for r in recorded) == test_keys
    assert all(r["example"]["id"].startswith("test-") for r in read_lines(out))
    rc, _, err = run_main(F.main, [a if a != "test" else "train" for a in argv], capsys)
    assert rc == 2 and "split" in err, err  # (another split into the same file: refused, not appended)


@pytest.mark.parametrize("tokenizer_len, drawn_from", [(100, 100), (200, 128)])
def test_failures_never_samples_the_models_padded_rows(monkeypatch, tokenizer_len, drawn_from):
    """An embedding padded past the tokenizer (Qwen2.5: 151,936 rows for 151,665 tokens): the
    attempts are drawn from the tokenizer's ids only; a tokenizer longer than the embedding (added
    tokens the model has no row for): from the model's ids (the sampler refuses a larger vocab_size)."""
    from types import SimpleNamespace

    seen = []

    def fake_generate(model, prompts, *, num_samples, vocab_size=None, **kw):
        seen.append(vocab_size)
        n = len(prompts) * num_samples
        return SimpleNamespace(tokens=[[1, 0]] * n, finished=[True] * n, new_tokens=2 * n)

    class Task:
        def messages(self, ex):
            return [{"role": "user", "content": "x"}]

        def verify(self, ex, text):
            return False

    chat = SimpleNamespace(prompt=lambda m: [3], decode=lambda t: "t", stop_ids=[0])
    monkeypatch.setattr(F, "generate", fake_generate)
    F.find_failures(SimpleNamespace(config=SimpleNamespace(vocab_size=128)), list(range(tokenizer_len)), Task(),
                    [{"i": 0}], samples=2, chat=chat)
    assert seen and set(seen) == {drawn_from}


# --------------------------------------------------------------------------------------------
# r3.failures: by hand (rounds' seeds, summary, the file pair)
# --------------------------------------------------------------------------------------------


def test_find_failures_draws_each_round_with_its_own_seed_and_keeps_the_failing_samples_flag(monkeypatch):
    """Per-row sample streams: a round drawn with round 0's seed would repeat the attempts the
    query already passed. ``finished`` is the failing sample's own (here: odd attempts finished)."""
    task, chat, model, _, _, seeds = _fake_failure_sampling(monkeypatch, finished=lambda k: k % 2 == 1)
    examples = [{"i": 0, "fail_at": 2}, {"i": 1, "fail_at": None}, {"i": 2, "fail_at": 1}]
    got = []
    F.find_failures(model, list(range(100)), task, examples, samples=6, batch_size=2, chat=chat,
                    cut_answers="judge", on_batch=lambda fails, passes: got.extend(fails))
    assert len(seeds) > 3 and len(set(seeds)) == len(seeds)  # every (round, batch) its own seed
    assert {r["example"]["i"]: r["finished"] for r in got} == {0: False, 2: True}


def test_failures_summary_counts_only_the_queries_asked_for(tmp_path):
    """A rerun with a smaller --n reports the failure rate of its own queries, not the file's."""
    store = F.FailureFile(tmp_path / "f.jsonl")
    store.open({"task": "t"})
    rec = {"example": {}, "attempt_tokens": [1], "attempt_text": "x", "finished": True}
    store.add([dict(rec, key="a", attempts_before_failure=1, samples=2),
               dict(rec, key="b", attempts_before_failure=0, samples=1)],
              [{"key": "c", "samples": 4}, {"key": "d", "samples": 4}])
    s = F.summarize(store, {"a", "c"}, new=0, drawn=0, elapsed=0.0)
    assert (s["queries"], s["failed"], s["never_failed"], s["samples_needed"]) == (2, 1, 1, 2 + 4)
    assert s["failure_rate"] == 0.5


def test_example_key_is_the_canonical_json_hash():
    import hashlib

    assert F.example_key({"a": 1, "b": [2, 3]}) == F.example_key({"b": [2, 3], "a": 1})  # (key order aside)
    assert F.example_key({"a": 1}) == hashlib.sha256(b'{"a":1}').hexdigest()[:16]


def test_failure_file_header_only_first_and_a_headerless_done_keeps_its_records(tmp_path):
    from r3.errors import R3Error
    from r3.failure_data import read_jsonl

    out = tmp_path / "f.jsonl"
    head = json.dumps({"r3_failures": 1, "settings": {"task": "t"}})
    F.done_path(out).write_text(head + "\n" + head + "\n")  # a second header: not a file r3.failures writes
    with pytest.raises(R3Error, match="line 2: expected a JSON object with a key"):
        F.FailureFile(out)
    F.done_path(out).write_text('{"key": "c", "samples": 3}\n')  # (a .done without its header)
    store = F.FailureFile(out)
    store.open({"task": "t"})
    header, records, _ = read_jsonl(F.done_path(out), header=True)
    assert header == {"r3_failures": 1, "settings": {"task": "t"}} and records == [{"key": "c", "samples": 3}]
    assert store.keys() == {"c"}


def test_evaluate_run_settings_come_from_the_run_unless_a_flag_overrides_them(tmp_path, capsys):
    """--run: each token limit is the run's own (retry is not the attempt's); --top-p/--top-k
    override the run's, 0 included (the default of neither flag is a value)."""
    run = tmp_path / "run"
    (run / "export").mkdir(parents=True)
    (run / "export" / "config.json").write_text("{}")
    (run / "config.json").write_text(json.dumps({
        "model": "base", "task": "countdown", "task_options": {}, "max_attempt_tokens": 10,
        "max_reflection_tokens": 20, "max_retry_tokens": 30, "top_p": 0.9, "top_k": 5, "dtype": "fp32"}))
    st = E.resolve_settings(E.parse_args(["--run", str(run)]))
    assert st["models"] == ["base", str(run / "export")]  # the untrained base first: the baseline
    assert (st["max_attempt"], st["max_reflection"], st["max_retry"]) == (10, 20, 30)
    assert (st["top_p"], st["top_k"], st["dtype"]) == (0.9, 5, "fp32")
    rc, _, err = run_main(E.main, ["--run", str(run), "--out", str(tmp_path / "e.json"), "--n", "1"], capsys)
    assert rc == 2 and err.startswith(f"error: {run / 'config.json'}: the run's base model: model path 'base' "
                                      "does not exist"), err  # (moved since the run: said where it comes from)
    st = E.resolve_settings(E.parse_args(["--run", str(run), "--top-p", "1.0", "--top-k", "0", "--max-new-tokens", "7"]))
    assert (st["top_p"], st["top_k"]) == (1.0, 0)
    assert (st["max_attempt"], st["max_reflection"], st["max_retry"]) == (7, 7, 7)
    assert E.parse_args([]).temperature == 0.0  # greedy unless asked


def test_evaluate_judges_cut_answers_by_the_runs_rule_unless_the_flag_says(tmp_path, capsys):
    """--cut-answers: the run's own rule with --run (judge for runs from before the option), the
    flag over it; fail without a run; a run's bad value is one line naming its config."""
    run = tmp_path / "run"
    (run / "export").mkdir(parents=True)
    (run / "export" / "config.json").write_text("{}")
    cfg = {"model": "base", "task": "countdown", "task_options": {}, "max_attempt_tokens": 10,
           "max_reflection_tokens": 20, "max_retry_tokens": 30}
    (run / "config.json").write_text(json.dumps(cfg))
    assert E.resolve_settings(E.parse_args(["--run", str(run)]))["cut_answers"] == "judge"
    (run / "config.json").write_text(json.dumps({**cfg, "cut_answers": "fail"}))
    assert E.resolve_settings(E.parse_args(["--run", str(run)]))["cut_answers"] == "fail"
    assert E.resolve_settings(E.parse_args(["--run", str(run), "--cut-answers", "judge"]))["cut_answers"] == "judge"
    assert E.resolve_settings(E.parse_args(["--out", "x.json"]))["cut_answers"] == "fail"
    assert E.resolve_settings(E.parse_args(["--out", "x.json", "--cut-answers", "judge"]))["cut_answers"] == "judge"
    (run / "config.json").write_text(json.dumps({**cfg, "cut_answers": "skip"}))
    rc, _, err = run_main(E.main, ["--run", str(run), "--out", str(tmp_path / "e.json"), "--n", "1"], capsys)
    one_line_error(rc, err, f"{run / 'config.json'}: 'cut_answers' must be one of judge, fail, got 'skip'")


def test_evaluate_table_by_hand():
    """Each column its own number: 1st-attempt accuracy, 2nd-attempt accuracy (with standard
    errors), delta; then the paired change, later model minus the first."""
    rows = [{"model": "base", "first_attempt_accuracy": 0.25, "first_attempt_stderr": 0.125,
             "second_attempt_accuracy": 0.5, "second_attempt_stderr": 0.0625, "delta": 0.25}]
    paired = [{"model": "trained", "baseline": "base", "first_attempt": {"mean": 0.1, "stderr": 0.05, "n": 4},
               "second_attempt": {"mean": -0.2, "stderr": 0.15, "n": 4}}]
    lines = E.format_table(rows, paired).splitlines()
    assert lines[2] == "base  |  25.0 \u00b1 12.5 |  50.0 \u00b1  6.2 |          +25.0"
    assert lines[3] == "paired, trained minus base (same 4 queries): 1st +10.0 \u00b1 5.0, 2nd -20.0 \u00b1 15.0 points"
    assert len(lines) == 4 and len(E.format_table([dict(rows[0], verifier_errors=0, verdicts=6)]).splitlines()) == 3
    lines = E.format_table([dict(rows[0], verifier_errors=2, verdicts=6)]).splitlines()
    assert lines[3] == "base: the task's verifier failed on 2 of 6 verdicts; each counts as wrong in these accuracies"


def test_evaluate_settings_without_a_run_come_from_the_flags_or_their_defaults(tmp_path, capsys):
    """The task defaults to countdown; --max-reflection-tokens defaults to --max-new-tokens (then 256); --top-p 0 is refused, not
    read as unset."""
    def settings(*flags):
        st = E.resolve_settings(E.parse_args([*flags, "--out", "x.json"]))
        return st["max_attempt"], st["max_reflection"], st["max_retry"], st["top_p"], st["top_k"], st["dtype"]

    assert settings() == (256, 256, 256, 1.0, 0, "auto")
    assert E.resolve_settings(E.parse_args(["--out", "x.json"]))["task"] == "countdown"  # (as --help says)
    assert settings("--max-new-tokens", "7") == (7, 7, 7, 1.0, 0, "auto")
    assert settings("--max-new-tokens", "7", "--max-reflection-tokens", "9", "--top-p", "0.5", "--top-k", "3",
                    "--dtype", "fp32") == (7, 9, 7, 0.5, 3, "fp32")
    rc, _, err = run_main(E.main, ["--top-p", "0", "--n", "1", "--out", str(tmp_path / "e.json")], capsys)
    one_line_error(rc, err, "top_p must be in (0, 1]")


def test_evaluate_run_refuses_chat_template_options_it_takes_from_the_run(tmp_path, capsys):
    run = tmp_path / "run"
    (run / "export").mkdir(parents=True)
    (run / "config.json").write_text(json.dumps({"model": "smollm2-135m", "task": "countdown", "task_options": {},
                                                 "max_attempt_tokens": 8, "max_reflection_tokens": 8,
                                                 "max_retry_tokens": 8}))
    rc, _, err = run_main(E.main, ["--run", str(run), "--chat-template-option", "enable_thinking=true",
                                   "--out", str(tmp_path / "e.json")], capsys)
    one_line_error(rc, err, "--run takes the models, task and options from the run; drop --chat-template-option")


def test_evaluate_run_records_the_runs_own_token_limits(tiny_dir, tmp_path, capsys):
    """With --run the output's settings hold each of the run's limits (retry is not the attempt's)."""
    run = tmp_path / "run"
    run.mkdir()
    (run / "export").symlink_to(tiny_dir, target_is_directory=True)
    (run / "config.json").write_text(json.dumps({
        "model": tiny_dir, "task": "countdown", "task_options": {"difficulty": "easy", "test_size": 2},
        "max_attempt_tokens": 3, "max_reflection_tokens": 4, "max_retry_tokens": 5, "dtype": "fp32"}))
    rc, _, err = run_main(E.main, ["--run", str(run), "--quiet"], capsys)
    assert rc == 0, err
    st = json.loads((run / "evaluation.json").read_text())["settings"]
    assert (st["max_attempt_tokens"], st["max_reflection_tokens"], st["max_retry_tokens"]) == (3, 4, 5)


# --------------------------------------------------------------------------------------------
# r3.files, r3.errors, r3.failure_data and r3.failures: edge cases by hand
# --------------------------------------------------------------------------------------------


def test_an_out_path_under_a_file_and_an_error_naming_its_own_file(tmp_path):
    import errno
    import stat

    from r3.errors import R3Error
    from r3.files import check_out_path, naming_os_errors

    (tmp_path / "f").write_text("")
    with pytest.raises(R3Error, match=f"^--out {tmp_path}/f/x.json: {tmp_path}/f is not a directory$"):
        check_out_path(str(tmp_path / "f" / "x.json"))
    with pytest.raises(OSError) as e, naming_os_errors(tmp_path / "out.json"):
        raise OSError(errno.ENOSPC, "No space left on device")
    assert e.value.filename == str(tmp_path / "out.json")
    with pytest.raises(OSError) as e, naming_os_errors(tmp_path / "out.json"):
        raise OSError(errno.ENOSPC, "No space left on device", "/scratch/other.tmp")  # (it names its own file)
    assert e.value.filename == "/scratch/other.tmp"
    from r3.files import current_umask, write_text_atomic

    write_text_atomic(tmp_path / "a.txt", "x")  # (an ordinary file: the umask's permissions, not mkstemp's 0600)
    assert stat.S_IMODE((tmp_path / "a.txt").stat().st_mode) == 0o666 & ~current_umask()



def test_a_file_written_whole_is_synced_in_full_and_an_interruption_leaves_no_temp_file(tmp_path, monkeypatch):
    """The flush before the rename must sync the whole text (left in Python's buffer until the
    close, an fsync syncs an empty file: after a power cut the published name is empty); Ctrl-C
    (or SIGTERM's Terminated) between the write and the rename left a NAME.*.tmp beside it and
    the old file as it was; a JSON file ends its last line; missing folders are made."""
    import shutil

    from r3.files import write_json_atomic, write_text_atomic

    real, synced = os.fsync, []
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(os.fstat(fd).st_size), real(fd))[1])
    write_text_atomic(tmp_path / "a.txt", "x" * 100)
    assert synced[0] == 100
    monkeypatch.setattr(os, "fsync", real)
    write_json_atomic(tmp_path / "b.json", {"a": [1]})
    assert (tmp_path / "b.json").read_text() == '{\n  "a": [\n    1\n  ]\n}\n'
    write_text_atomic(tmp_path / "c" / "d" / "e.txt", "z")  # (its folders made, as r3's outputs expect)
    assert (tmp_path / "c" / "d" / "e.txt").read_text() == "z"
    shutil.rmtree(tmp_path / "c")

    def interrupted(src, dst):
        raise KeyboardInterrupt

    monkeypatch.setattr(os, "replace", interrupted)
    with pytest.raises(KeyboardInterrupt):
        write_text_atomic(tmp_path / "a.txt", "y")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.txt", "b.json"]
    assert (tmp_path / "a.txt").read_text() == "x" * 100


def test_a_json_lines_log_skips_blank_lines_and_forgives_only_its_last_line_cut_short(tmp_path, capsys):
    """read_json_lines (r3.plot's and r3.audit's logs): blank lines are no rows; a last line that
    is not JSON (a run killed mid-write; blank lines after it are still the end) is skipped with
    a warning, while one before other rows is the caller's error, with its line number."""
    from r3.files import read_json_lines

    log = tmp_path / "log.jsonl"
    log.write_text('{"a": 1}\n\n{"b": 2}\n{"c": \n\n')
    assert read_json_lines(log, lambda n, e: ValueError(n)) == [(1, {"a": 1}), (3, {"b": 2})]
    warning = f"warning: {log}: skipping the last line, cut short by an interrupted write\n"
    assert capsys.readouterr().err == warning
    log.write_text('{"a": 1}\n{"c": \n{"b": 2}\n')
    with pytest.raises(ValueError, match="^2$"):
        read_json_lines(log, lambda n, e: ValueError(n))
    log.write_text("\n")
    assert read_json_lines(log, lambda n, e: ValueError(n)) == [] and capsys.readouterr().err == ""

def test_one_line_errors_without_a_file_name_or_from_a_multi_line_message(capsys):
    """A full disk whose error names no file is said without one; a multi-line out-of-memory
    message is said by its first line; a frame inside torch's Python code is not where."""
    import errno

    import torch

    from r3.errors import cli_main

    def full():
        raise OSError(errno.ENOSPC, "No space left on device")

    def oom():
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 8.00 GiB.\nException raised from malloc at "
                                     "CUDACachingAllocator.cpp:1 (most recent call first):\nframe #0: c10::Error")

    torch_file = os.path.join(os.path.dirname(torch.__file__), "nn", "functional.py")
    scope = {"torch": torch}
    exec(compile("def inner():\n    raise torch.OutOfMemoryError('CUDA out of memory. Tried to allocate 1 GiB.')\n",
                 torch_file, "exec"), scope)

    def in_torch():
        scope["inner"]()

    errs = []
    for fn in (full, oom, in_torch):
        with pytest.raises(SystemExit) as e:
            cli_main(fn)()
        assert e.value.code == 2
        errs.append(capsys.readouterr().err)
    assert errs[0] == "error: No space left on device; free space and run the command again\n"
    assert errs[1].count("\n") == 1 and "(CUDA out of memory. Tried to allocate 8.00 GiB.); use smaller" in errs[1]
    assert errs[2].startswith(f"error: out of memory at {os.path.abspath(__file__)}:") and " in in_torch (" in errs[2]


def test_positive_int_refuses_bools_and_none_unless_allowed():
    from r3.errors import R3Error, positive_int

    assert positive_int("--n", 1) == 1 and positive_int("--n", None, allow_none=True) is None
    for bad in (True, None, 0, 2.0, "3"):
        with pytest.raises(R3Error, match="--n must be a positive integer"):
            positive_int("--n", bad)


def test_failure_files_appends_are_synced_and_a_cut_second_header_is_refused(tmp_path, monkeypatch):
    from r3.errors import R3Error
    from r3.failure_data import append_lines, read_jsonl, recorded_settings

    synced = []
    real = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(fd), real(fd))[1])
    path = tmp_path / "f.jsonl"
    append_lines(path, [{"key": "a"}, {"key": "b"}])
    assert path.read_text() == '{"key": "a"}\n{"key": "b"}\n' and len(synced) == 1

    import errno

    def cannot_sync(fd):  # (a file system without fsync, as the other writes of r3 allow)
        raise OSError(errno.EINVAL, "Invalid argument")

    monkeypatch.setattr(os, "fsync", cannot_sync)
    append_lines(path, [{"key": "c"}])
    assert path.read_text().endswith('{"key": "c"}\n')
    monkeypatch.setattr(os, "fsync", real)
    done = tmp_path / "f.jsonl.done"
    done.write_text('{"r3_failures": 1, "settings": {"task": "t"}}\n{"key": "a"}\n{"r3_failures": 1, "sett')
    with pytest.raises(R3Error, match="its last line is not a record"):
        read_jsonl(done, header=True)
    done.write_text('{"r3_failures": 1, "settings": "t"}\n')
    assert recorded_settings(path) is None  # (not a header r3.failures writes)


def test_failure_file_refuses_chat_options_an_older_file_did_not_record_and_ignores_a_changed_n(tmp_path, capsys):
    """A file made before chat template options were recorded was sampled with none; rerunning
    with other --n is the way to add queries (no warning about it)."""
    from r3.errors import R3Error

    out = tmp_path / "f.jsonl"
    F.done_path(out).write_text(json.dumps({"r3_failures": 1, "settings": {"task": "t", "n": 4, "seed": 0}}) + "\n")
    store = F.FailureFile(out)
    store.open({"task": "t", "n": 8, "seed": 0, "chat_template_options": {}, "attempt_stop_strings": []})
    assert capsys.readouterr().err == ""
    with pytest.raises(R3Error, match="holds chat_template_options {}, not {'enable_thinking': True}"):
        F.FailureFile(out).open({"task": "t", "chat_template_options": {"enable_thinking": True}})


def test_a_failure_file_from_before_cut_answers_resumed_under_fail_says_its_rule_changed(tmp_path, capsys):
    """A file made before --cut-answers judged cut attempts as they stood: going on with
    --cut-answers fail mixes two rules in one file, which is said as any other changed setting
    is (it was not: the old header has no key to compare); going on under judge says nothing."""
    out = tmp_path / "f.jsonl"
    F.done_path(out).write_text(json.dumps({"r3_failures": 1, "settings": {"task": "t", "seed": 0}}) + "\n")
    F.FailureFile(out).open({"task": "t", "seed": 0, "cut_answers": "judge"})
    assert capsys.readouterr().err == ""
    F.FailureFile(out).open({"task": "t", "seed": 0, "cut_answers": "fail"})
    assert "started with other settings (cut_answers: 'judge' -> 'fail')" in capsys.readouterr().err


def test_a_second_process_on_the_same_failure_file_is_refused_until_the_first_ends(tmp_path):
    """Two r3.failures on the same --out at once each sampled every query left and appended it:
    each query twice in the file training reads, both summaries counting half of it. The second
    is refused in one line while the first holds the file, and goes on once it has ended."""
    from r3.errors import R3Error

    out = tmp_path / "f.jsonl"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys; from pathlib import Path; from r3.failure_data import FailureFile; "
         f"FailureFile(Path({str(out)!r})).open({{'task': 't'}}); print('held', flush=True); sys.stdin.read()"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": str(HERE.parent)})
    try:
        assert holder.stdout.readline() == "held\n"
        with pytest.raises(R3Error, match=f"{out} is being written by another process .* wait for it to end or use another --out"):
            F.FailureFile(out).open({"task": "t"})
    finally:
        holder.communicate("", timeout=60)
    store = F.FailureFile(out)  # (the first ended: its lock went with it)
    store.open({"task": "t"})
    store.add([], [{"key": "c", "samples": 4}])
    F.FailureFile(out).open({"task": "t"})  # (this process holds it: another object of its own goes on)
    assert F.FailureFile(out).keys() == {"c"}
    store.close()  # (as r3.failures does when it ends: a process running it in-process lets go)
    proc = subprocess.run(
        [sys.executable, "-c", "from pathlib import Path; from r3.failure_data import FailureFile; "
         f"FailureFile(Path({str(out)!r})).open({{'task': 't'}}); print('held')"],
        capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(HERE.parent)}, timeout=120)
    assert proc.stdout == "held\n", proc.stderr


def test_failure_file_of_a_version_that_recorded_no_split_or_task_options_is_added_to(tmp_path, capsys):
    """A header without 'split' or 'task_options' (versions before they were recorded, which
    sampled the train split with the options given) says nothing to compare: adding to it goes
    on, with no warning about them."""
    out = tmp_path / "f.jsonl"
    F.done_path(out).write_text(json.dumps({"r3_failures": 1, "settings": {"task": "t", "seed": 0}}) + "\n")
    F.FailureFile(out).open({"task": "t", "task_options": {"max_num": 9}, "split": "train", "seed": 0,
                             "chat_template_options": {}, "attempt_stop_strings": []})
    assert capsys.readouterr().err == ""


def test_failures_summary_line_by_hand(tmp_path):
    store = F.FailureFile(tmp_path / "f.jsonl")
    store.open({"task": "t"})
    rec = {"example": {}, "attempt_tokens": [1], "attempt_text": "x", "finished": True}
    store.add([dict(rec, key="a", attempts_before_failure=1, samples=2)], [{"key": "c", "samples": 4}])
    line = F.summarize(store, {"a", "c"}, new=2, drawn=7, elapsed=1.25)["line"]
    assert line == ("1/2 queries failed at least once (failure rate 50.0%); samples needed 6 (3.00 per query); "
                    f"2 sampled in this run (7 samples drawn, 1.2s), 0 resumed; 1 failures in {tmp_path / 'f.jsonl'}")


def test_failures_summary_counts_a_query_in_both_files_once_and_reads_a_record_without_samples(tmp_path):
    """A key in both files (a hand-merged file) is one failed query, not also a query that never
    failed; a failure record without 'samples' needed its attempts before the failure plus one."""
    store = F.FailureFile(tmp_path / "f.jsonl")
    store.open({"task": "t"})
    rec = {"example": {}, "attempt_tokens": [1], "attempt_text": "x", "finished": True}
    store.add([dict(rec, key="a", attempts_before_failure=2)], [{"key": "a", "samples": 4}, {"key": "c", "samples": 4}])
    s = F.summarize(store, {"a", "c"}, new=0, drawn=0, elapsed=0.0)
    assert (s["queries"], s["failed"], s["never_failed"], s["samples_needed"]) == (2, 1, 1, 3 + 4)


def test_failures_samples_a_repeated_example_once(tiny_dir, tmp_path, capsys, monkeypatch):
    """A data set that holds an example twice (a repeated row) has one query for it: sampled once,
    one record, and the summary counts distinct queries (it sampled and stored both, and said
    '-1 resumed')."""
    sampled = []

    def fake(model, tok, task, todo, *, on_batch, progress, **kw):
        sampled.extend(ex["id"] for ex in todo)
        on_batch([], [{"key": F.example_key(ex), "id": ex.get("id"), "samples": 2} for ex in todo])
        return {"samples_drawn": 4, "samples_needed": 4}

    monkeypatch.setattr(F, "find_failures", fake)
    listed = F.examples_of
    monkeypatch.setattr(F, "examples_of", lambda *a, **k: listed(*a, **k) + listed(*a, **k)[:1])
    argv = ["--model", tiny_dir, "--task", COIN, "--samples", "2", "--n", "2", "--out", str(tmp_path / "f.jsonl"),
            "--dtype", "fp32", "--quiet"]
    rc, stdout, err = run_main(F.main, argv, capsys)
    assert rc == 0, err
    assert sampled == ["train-0", "train-1"]
    assert "note: 1 of the 3 train queries repeat an earlier one" in err
    assert "0/2 queries failed" in stdout and "2 sampled in this run (4 samples drawn, " in stdout and ", 0 resumed;" in stdout
    rc, stdout, err = run_main(F.main, argv, capsys)
    assert rc == 0 and sampled == ["train-0", "train-1"]
    assert "resuming" in err and "2 of 2 queries already done, 0 to sample" in err
    assert "0 sampled in this run" in stdout and ", 2 resumed;" in stdout


def test_failures_cli_says_the_samples_drawn_and_resumes_only_when_it_does(tiny_dir, tmp_path, capsys, monkeypatch):
    """The summary's 'samples drawn' is the sampler's count (not the samples needed); a fresh file
    says nothing of resuming."""
    def fake(model, tok, task, todo, *, on_batch, progress, **kw):
        on_batch([], [{"key": F.example_key(ex), "id": ex.get("id"), "samples": 2} for ex in todo])
        return {"samples_drawn": 11, "samples_needed": 6}

    monkeypatch.setattr(F, "find_failures", fake)
    rc, stdout, err = run_main(F.main, ["--model", tiny_dir, "--task", COIN, "--samples", "2", "--n", "3", "--out",
                                        str(tmp_path / "f.jsonl"), "--dtype", "fp32", "--quiet"], capsys)
    assert rc == 0, err
    assert "resuming" not in err and "3 sampled in this run (11 samples drawn, " in stdout


def test_failures_cli_hands_a_stopped_runs_progress_on_with_a_seed_salt_and_says_it_resumes(tiny_dir, tmp_path, capsys,
                                                                                           monkeypatch):
    """A rerun hands find_failures the attempts each unfinished query passed (not those of a query
    already in a file: a progress line outlives its query's record), a seed salt of what the files
    held (else its batches drew the first run's seeds again), and says it resumes also when the
    queries left are all queries going on; a data set without repeated rows gets no note of them.
    A rerun with a smaller --n sums up the queries it was asked for, not the whole file."""
    handed = []

    def fake(model, tok, task, todo, *, on_batch, progress, **kw):
        handed.append(([ex["id"] for ex in todo], kw["passed_before"], kw["seed_salt"]))
        on_batch([], [{"key": F.example_key(ex), "id": ex.get("id"), "samples": 4} for ex in todo])
        return {"samples_drawn": 1, "samples_needed": 1}

    monkeypatch.setattr(F, "find_failures", fake)
    out = tmp_path / "f.jsonl"
    keys = [F.example_key(ex) for ex in coin_task().examples("train", 3)]
    F.done_path(out).write_text(json.dumps({"r3_failures": 1, "settings": {"task": COIN}}) + "\n")
    F.progress_path(out).write_text(json.dumps({"key": keys[1], "passed": 3}) + "\n")
    argv = ["--model", tiny_dir, "--task", COIN, "--samples", "4", "--out", str(out), "--dtype", "fp32", "--quiet"]
    rc, _, err = run_main(F.main, argv + ["--n", "2"], capsys)
    assert rc == 0, err
    assert handed == [(["train-0", "train-1"], {keys[1]: 3}, 1)]
    assert "0 of 2 queries already done, 2 to sample (1 go on from the attempts they passed)" in err
    assert "repeat" not in err and not F.progress_path(out).exists()
    F.progress_path(out).write_text(json.dumps({"key": keys[0], "passed": 1}) + "\n"
                                    + json.dumps({"key": keys[2], "passed": 2}) + "\n")
    rc, _, err = run_main(F.main, argv + ["--n", "3"], capsys)
    assert rc == 0, err
    assert handed[1] == (["train-2"], {keys[2]: 2}, 2 + 2)  # (2 queries done, 2 keys in the progress file)
    assert "2 of 3 queries already done, 1 to sample (1 go on from the attempts they passed)" in err
    rc, stdout, _ = run_main(F.main, argv + ["--n", "1"], capsys)  # (the summary: the queries asked for only)
    assert rc == 0 and stdout.startswith("0/1 queries failed at least once") and ", 1 resumed;" in stdout


@pytest.mark.parametrize("module", ["r3.evaluate", "r3.failures", "r3.generate", "r3.forgetting", "r3.audit",
                                    "r3.report", "r3.plot"])
def test_every_flag_of_a_command_says_what_it_does(module, monkeypatch):
    """--help is where a new user looks for a default: r3.generate's --max-new-tokens (256) and
    --seed, and r3.failures' --top-p and --top-k, were listed without a word on them."""
    import argparse
    import importlib

    parsers = []

    def capture(self, *args, **kwargs):
        parsers.append(self)
        raise SystemExit(0)

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", capture)
    with pytest.raises(SystemExit):
        importlib.import_module(module).main([])
    bare = [a.option_strings[-1] for a in parsers[0]._actions if a.option_strings and not a.help]
    assert not bare, f"python -m {module} --help says nothing about {bare}"
