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
