"""benchmarks/learning_curve.py --pool: the paired change of the mean trained model over seeds,
against hand-computed values."""

import json
import math
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import learning_curve as lc  # noqa: E402


def _run(tmp_path, name, seed, after_wins, after_first, before_wins=(0, 2, 0), before_first=(True, False, False)):
    res = {"config": {"seed": seed}, "samples_per_failure": 4,
           "before": {"own_failure_wins": list(before_wins), "greedy_first_correct": list(before_first),
                      "greedy_second_correct": list(before_first)},
           "after": {"base_failure_wins": list(after_wins), "greedy_first_correct": list(after_first),
                     "greedy_second_correct": list(after_first)}}
    path = tmp_path / f"{name}.json"
    path.write_text(json.dumps(res))
    return str(path)


def test_pool_is_the_paired_change_of_the_mean_model(tmp_path):
    a = _run(tmp_path, "a", 0, [1, 2, 0], [True, True, False])
    b = _run(tmp_path, "b", 1, [3, 2, 2], [True, False, False])
    res = lc.pool([a, b])
    # per failure: mean wins (2, 2, 1) minus before (0, 2, 0), over 4 samples -> (0.5, 0, 0.25)
    p = res["paired_retry_gain_on_base_failures"]
    d = [0.5, 0.0, 0.25]
    mean = sum(d) / 3
    se = math.sqrt(sum((x - mean) ** 2 for x in d) / 2 / 3)
    assert p["mean"] == pytest.approx(mean) and p["stderr"] == pytest.approx(se) and p["failures"] == 3
    # per query: mean correct (1, 0.5, 0) minus before (1, 0, 0) -> (0, 0.5, 0)
    g = res["paired_greedy_change"]["first_attempt"]
    assert g["mean"] == pytest.approx(0.5 / 3) and g["n"] == 3
    assert g["stderr"] == pytest.approx(math.sqrt(((0 - 1 / 6) ** 2 * 2 + (0.5 - 1 / 6) ** 2) / 2 / 3))
    assert res["seeds"] == [0, 1]
    # one run pooled with itself is that run
    assert lc.pool([a, a])["paired_retry_gain_on_base_failures"]["mean"] == pytest.approx((0.25 + 0 + 0) / 3)


def test_pool_refuses_runs_with_different_untrained_evaluations(tmp_path):
    a = _run(tmp_path, "a", 0, [1, 2, 0], [True, True, False])
    b = _run(tmp_path, "b", 1, [1, 2, 0], [True, True, False], before_wins=(1, 2, 0))
    with pytest.raises(SystemExit, match="copy before.json"):
        lc.pool([a, b])


def test_signal_estimate_against_hand_computed_values():
    """Failures with 0/4, 2/4 and 4/4 passing retries, groups of 2: a group has signal with
    probability 0, 1 - 0.25 - 0.25 = 0.5 and 0; mean 1/6, times 6 failures per step = 1."""
    s = lc.signal_estimate([0, 2, 4], samples=4, group_size=2, batch_size=6)
    assert s["failures"] == 3 and s["failures_with_any_success"] == 2
    assert math.isclose(s["p_group_has_signal"], 0.5 / 3)
    assert math.isclose(s["groups_with_signal_per_step"], 1.0)
    # one success in 16 samples, G = 8: 1 - (15/16)^8 - (1/16)^8
    one = lc.signal_estimate([1], samples=16, group_size=8, batch_size=8)
    assert math.isclose(one["p_group_has_signal"], 1 - (15 / 16) ** 8 - (1 / 16) ** 8)
    assert lc.signal_estimate([], samples=16, group_size=8, batch_size=8)["p_group_has_signal"] == 0.0


def test_first_attempts_are_judged_by_the_runs_cut_answers_rule(monkeypatch):
    """The untrained and trained models' sampled first attempts (which become the stored
    failures) are judged as the run judges: with ``cut_answers: fail`` an attempt the token limit
    cut off fails unread, as in training's rollouts and the retries on those failures; "judge"
    reads it as it stands."""
    from types import SimpleNamespace

    from r3.config import TrainConfig

    class FakeSession:
        @staticmethod
        def start(model, prompts, **kw):
            return SimpleNamespace(sample=lambda n, **kw: SimpleNamespace(
                tokens=[[i] for i in range(len(prompts))], finished=[i % 2 == 0 for i in range(len(prompts))]))

    monkeypatch.setattr(lc, "Session", FakeSession)
    monkeypatch.setattr(lc, "answer_stops", lambda task, chat: None)
    monkeypatch.setattr(lc, "passes", lambda task, ex, text: True)  # (every text passes when read)
    chat = SimpleNamespace(prompt=lambda m: [1], decode=lambda t: "x", stop_ids=[0])
    task = SimpleNamespace(messages=lambda ex: [])
    examples = [{"i": i} for i in range(4)]
    for rule, want in (("judge", [True] * 4), ("fail", [True, False, True, False])):
        sampling = TrainConfig(cut_answers=rule).validate().sampling()
        got = lc.first_attempts(None, [0] * 10, chat, task, examples, sampling, seed=0)
        assert [ok for _, ok in got] == want, rule


def test_the_untrained_evaluation_is_reused_only_under_the_same_cut_answers_rule():
    """``before.json`` judged under one rule is not the untrained model's numbers under the other;
    "judge", the rule before the option, adds nothing to the key, so evaluations cached before it
    stay valid for runs that judge, and the default ("fail") does not reuse them."""
    from r3.config import TrainConfig

    judged = lc.untrained_key(TrainConfig(cut_answers="judge").validate(), 16, 1234, "cpu")
    assert "cut_answers" not in judged
    failing = lc.untrained_key(TrainConfig().validate(), 16, 1234, "cpu")
    assert failing != judged and failing["cut_answers"] == "fail"
