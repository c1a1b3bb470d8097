"""The held-out numbers users read: accuracies, standard errors and per-query verdicts summed over
batches (here read back as finished batches, so no model runs), and the statistics behind them."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest

from r3.heldout import evaluate_examples
from r3.stats import binomial_stderr, paired_difference


class _Task:
    """No verifier calls: every batch is read back."""


def _batch(first, second, generated):
    return {"first_correct": first, "second_correct": second, "generated_tokens": generated,
            "verifier": [0, 2 * len(first), None]}


def test_accuracies_errors_and_verdicts_sum_over_batches():
    examples = [{"id": i} for i in range(4)]
    finished = {0: _batch([True, False], [True, True], 3), 1: _batch([False, False], [False, False], 4)}
    r = evaluate_examples(None, None, _Task(), examples, batch_size=2, finished=finished, progress=False,
                          chat=SimpleNamespace())  # (no conversation is built)
    assert (r["n"], r["first_success"], r["second_success"]) == (4, 1, 2)
    assert r["first_correct"] == [True, False, False, False] and r["second_correct"] == [True, True, False, False]
    assert r["first_attempt_accuracy"] == 0.25 and r["second_attempt_accuracy"] == 0.5 and r["delta"] == 0.25
    assert r["first_attempt_stderr"] == pytest.approx(math.sqrt(0.25 * 0.75 / 4))
    assert r["second_attempt_stderr"] == pytest.approx(0.25)
    assert r["generated_tokens"] == 7 and r["verdicts"] == 8


def test_binomial_and_paired_standard_errors_by_hand():
    assert binomial_stderr(4, 4) == 0.0 and binomial_stderr(0, 4) == 0.0 and binomial_stderr(0, 0) == 0.0
    assert binomial_stderr(1, 4) == pytest.approx(math.sqrt(0.25 * 0.75 / 4))
    # later minus first: +1, -1, 0, +1 -> mean 0.25, sample sd sqrt(11/12), over sqrt(4)
    pair = paired_difference([False, True, True, False], [True, False, True, True])
    assert pair["mean"] == 0.25 and pair["better"] == 2 and pair["worse"] == 1 and pair["n"] == 4
    assert pair["stderr"] == pytest.approx(math.sqrt(11 / 12) / 2)
    with pytest.raises(ValueError, match="same length"):
        paired_difference([True], [True, False])


def test_each_batch_has_its_own_seed_kept_on_resume(monkeypatch):
    """Batch b samples with seed + b, so its draws do not depend on the other batches, and a
    resumed evaluation (batch 1 read back) draws exactly what the uninterrupted one drew."""
    import r3.heldout as H

    seeds = []

    def fake_batch(model, tokenizer, task, batch, sampling, *, seed, chat, records):
        seeds.append(seed)
        return _batch([False] * len(batch), [False] * len(batch), 0)

    monkeypatch.setattr(H, "evaluate_batch", fake_batch)
    examples = [{"id": i} for i in range(5)]
    kw = dict(batch_size=2, progress=False, chat=SimpleNamespace())
    evaluate_examples(None, None, _Task(), examples, seed=7, **kw)
    assert seeds == [7, 8, 9]
    seeds.clear()
    evaluate_examples(None, None, _Task(), examples, seed=7, finished={1: _batch([True] * 2, [True] * 2, 0)}, **kw)
    assert seeds == [7, 9]
    seeds.clear()
    evaluate_examples(None, None, _Task(), examples, seed=None, **kw)
    assert seeds == [None, None, None]


def test_a_batch_reads_each_verdict_and_reason_from_its_own_turn(monkeypatch):
    """evaluate_batch on a made-up episode (no model): the retry rows belong to the failed examples
    by group index, the second verdict is the first one's or the retry's, each reason is the
    verifier's for the text it judges (the retry's for retry_reason), given with the verdict by the
    episode, and the verifier counts are the task's since the last look."""
    import torch

    import r3.heldout as H

    ep = SimpleNamespace(first_passed=[True, False, False], group_indices=[1, 2], rewards=torch.tensor([[0.0], [1.0]]),
                         records=[{"reflection": "r1", "retry": "retry1", "reason": "why retry1", "reflection_cut": True,
                                   "retry_cut": False},
                                  {"reflection": "r2", "retry": "retry2", "reason": "why retry2", "reflection_cut": False,
                                   "retry_cut": True}],
                         first_reasons=["why attempt0", "why attempt1", "why attempt2"], first_cut=[False, True, False],
                         spans=[(5, 8), (4, 9)], first_attempts=[[0], [1], [2]], generated_tokens=17)
    monkeypatch.setattr(H, "run_episode", lambda *a, **k: ep)

    class Said(_Task):
        def diagnose(self, example, text):  # (not asked again: the episode's reasons are the verdicts' own)
            return "a second opinion"

    task = Said()
    task.__dict__.update(_verifier_errors=(1, "boom"), _verify_calls=5)
    chat = SimpleNamespace(decode=lambda ids: f"attempt{ids[0]}")
    examples = [{"id": i} for i in range(3)]
    res = H.evaluate_batch(None, None, task, examples, H.GREEDY, seed=0, chat=chat, records=True)
    assert res["first_correct"] == [True, False, False] and res["second_correct"] == [True, False, True]
    assert res["generated_tokens"] == 17 and res["verifier"] == [1, 5, "boom"]
    first, second, third = res["records"]
    assert first == {"example": {"id": 0}, "attempt": "attempt0", "attempt_correct": True, "attempt_reason": "why attempt0",
                     "attempt_cut": False}
    assert second == {"example": {"id": 1}, "attempt": "attempt1", "attempt_correct": False, "attempt_reason": "why attempt1",
                      "attempt_cut": True, "reflection": "r1", "reflection_tokens": 3, "retry": "retry1",
                      "retry_correct": False, "retry_reason": "why retry1", "reflection_cut": True, "retry_cut": False}
    assert (third["reflection_tokens"], third["retry_correct"], third["retry_reason"]) == (5, True, "why retry2")
    assert (third["attempt_cut"], third["reflection_cut"], third["retry_cut"]) == (False, False, True)
    assert third["attempt_correct"] is False  # (the first attempt's verdict, though the retry passed)


def test_verifier_errors_sum_over_batches_and_the_first_is_the_earliest():
    """The first verifier error quoted is the earliest batch's, and the errors counted after the
    last batch (by the task since its last look) are included."""
    examples = [{"id": i} for i in range(4)]
    finished = {0: {**_batch([False] * 2, [False] * 2, 0), "verifier": [1, 4, "first batch's"]},
                1: {**_batch([False] * 2, [False] * 2, 0), "verifier": [1, 4, "second batch's"]}}
    task = _Task()
    task.__dict__.update(_verifier_errors=(2, "after the last batch"), _verify_calls=3)
    r = evaluate_examples(None, None, task, examples, batch_size=2, finished=finished, progress=False, chat=SimpleNamespace())
    assert (r["verifier_errors"], r["verdicts"], r["first_verifier_error"]) == (4, 11, "first batch's")
    r = evaluate_examples(None, None, _Task(), examples, batch_size=2, finished={0: _batch([False] * 2, [False] * 2, 0),
                          1: finished[1]}, progress=False, chat=SimpleNamespace())
    assert r["first_verifier_error"] == "second batch's"


def test_a_resumed_progress_bar_starts_at_the_queries_already_evaluated(monkeypatch):
    """Resuming with the short last batch finished counts its own queries, not a whole batch."""
    import r3.heldout as H

    calls = []

    class Bar:
        def resume(self, done):
            calls.append(("resume", done))

        def update(self, done, extra=""):
            calls.append(("update", done))

        def close(self):
            calls.append(("close",))

    monkeypatch.setattr(H, "evaluate_batch", lambda model, tok, task, batch, *a, **k: _batch([True] * len(batch),
                                                                                             [True] * len(batch), 0))
    examples = [{"id": i} for i in range(5)]
    evaluate_examples(None, None, _Task(), examples, batch_size=2, finished={2: _batch([True], [True], 0)},
                      progress=Bar(), chat=SimpleNamespace())
    assert calls == [("resume", 1), ("update", 2), ("update", 4), ("close",)]


def test_a_paired_difference_of_no_queries_is_zero():
    assert paired_difference([], []) == {"mean": 0.0, "stderr": 0.0, "n": 0, "better": 0, "worse": 0}


def test_no_examples_give_zeros_and_records_sum_over_batches(monkeypatch):
    """An empty held-out set reports zeros (no division by zero); records of every batch are kept
    in order; a resumed evaluation that wants records refuses a batch read back without them; the
    sampling settings given reach every batch."""
    import r3.heldout as H
    from r3.errors import R3Error

    r = evaluate_examples(None, None, _Task(), [], progress=False, chat=SimpleNamespace())
    assert (r["n"], r["first_attempt_accuracy"], r["second_attempt_accuracy"], r["delta"]) == (0, 0.0, 0.0, 0.0)
    examples = [{"id": i} for i in range(3)]
    finished = {0: {**_batch([True, False], [True, True], 0), "records": [{"id": 0}, {"id": 1}]},
                1: {**_batch([False], [False], 0), "records": [{"id": 2}]}}
    r = evaluate_examples(None, None, _Task(), examples, batch_size=2, finished=finished, records=True,
                          progress=False, chat=SimpleNamespace())
    assert r["records"] == [{"id": 0}, {"id": 1}, {"id": 2}]
    with pytest.raises(R3Error, match="finished batch 1 read back does not hold results for its 1 examples"):
        evaluate_examples(None, None, _Task(), examples, batch_size=2, finished={0: finished[0], 1: _batch([False], [False], 0)},
                          records=True, progress=False, chat=SimpleNamespace())
    seen = []
    monkeypatch.setattr(H, "evaluate_batch", lambda model, tok, task, batch, sampling, **k: (
        seen.append(sampling), _batch([False] * len(batch), [False] * len(batch), 0))[1])
    mine = H.EpisodeSampling(temperature=0.7, max_attempt_tokens=8, max_reflection_tokens=8, max_retry_tokens=8)
    evaluate_examples(None, None, _Task(), examples, mine, batch_size=2, progress=False, chat=SimpleNamespace())
    evaluate_examples(None, None, _Task(), examples[:1], progress=False, chat=SimpleNamespace())
    assert seen == [mine, mine, H.GREEDY]


def test_a_batch_is_one_episode_with_one_reflection_per_failure_of_every_example(monkeypatch):
    """evaluate_batch runs its batch as one episode with group_size 1, no max_failures, and the
    sampling, seed and chat it was given: with two reflections per failure, row g would no longer
    be group g (records and reflection lengths read from another failure's rows, tokens doubled);
    a failure cap would leave failed queries without their retry."""
    import torch

    import r3.heldout as H

    ep = SimpleNamespace(first_passed=[False, True], group_indices=[0], rewards=torch.tensor([[1.0]]),
                         records=[{"reflection": "r", "retry": "t"}], spans=[(3, 5)], first_attempts=[[0], [1]],
                         generated_tokens=9)
    calls = []
    monkeypatch.setattr(H, "run_episode", lambda *a, **k: calls.append((a, k)) or ep)
    task, chat, examples = _Task(), SimpleNamespace(decode=lambda ids: "a"), [{"id": 0}, {"id": 1}]
    sampling = H.EpisodeSampling(temperature=0.5, max_attempt_tokens=3, max_reflection_tokens=4, max_retry_tokens=5)
    res = H.evaluate_batch("model", "tok", task, examples, sampling, seed=11, chat=chat, records=False)
    assert calls == [(("model", "tok", task, examples), dict(group_size=1, sampling=sampling, seed=11, chat=chat))]
    assert res["second_correct"] == [True, True] and "records" not in res


def test_the_default_sampling_is_greedy_with_256_tokens_for_each_part():
    """GREEDY (r3.evaluate's default, the paper's table) is what the docs say: temperature 0 and
    256 tokens for the attempt, the reflection and the retry (a shorter reflection limit would cut
    reflections that training, at the same settings, lets run on)."""
    import r3.heldout as H

    g = H.GREEDY
    assert (g.temperature, g.max_attempt_tokens, g.max_reflection_tokens, g.max_retry_tokens) == (0.0, 256, 256, 256)
    assert (g.top_p, g.top_k) == (1.0, 0)


def test_the_progress_bar_counts_each_batchs_queries_and_ends_at_n(monkeypatch):
    """Each evaluated batch moves the bar to the queries done so far (the short last batch to n,
    not past it) and says both accuracies over those queries; a single query's delta is its own."""
    import r3.heldout as H

    calls = []

    class Bar:
        def update(self, done, extra=""):
            calls.append((done, extra))

        def close(self):
            calls.append("close")

    verdicts = {0: ([True, False], [True, True]), 1: ([False, False], [False, True]), 2: ([False], [False])}
    seen = iter(range(3))
    monkeypatch.setattr(H, "evaluate_batch", lambda model, tok, task, batch, *a, **k: _batch(*verdicts[next(seen)], 0))
    r = evaluate_examples(None, None, _Task(), [{"id": i} for i in range(5)], batch_size=2, progress=Bar(),
                          chat=SimpleNamespace())
    assert calls == [(2, "acc 1st 50.0%, 2nd 100.0%"), (4, "acc 1st 25.0%, 2nd 75.0%"), (5, "acc 1st 20.0%, 2nd 60.0%"),
                     "close"]
    assert (r["first_success"], r["second_success"]) == (1, 3)
    one = evaluate_examples(None, None, _Task(), [{"id": 0}], finished={0: _batch([False], [True], 0)},
                            progress=False, chat=SimpleNamespace())
    assert (one["first_attempt_accuracy"], one["second_attempt_accuracy"], one["delta"]) == (0.0, 1.0, 1.0)


def test_a_batch_size_that_is_not_a_positive_integer_is_refused_in_one_line():
    """batch_size 0 would fail deep inside range(); a negative one would evaluate no batch at all
    and report 0% of n queries as if measured: both are refused up front."""
    from r3.errors import R3Error

    examples = [{"id": 0}, {"id": 1}]
    for bad in (0, -2):
        with pytest.raises(R3Error, match="batch_size must be a positive integer"):
            evaluate_examples(None, None, _Task(), examples, batch_size=bad, progress=False, chat=SimpleNamespace())
