"""The settings reach the run as documented: the lr schedule (by hand), the optimizer's
hyper-parameters, the rollouts' sampling, the bounds the config refuses, and which settings a
resume may change."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from r3.config import TrainConfig
from r3.errors import R3Error
from r3.train import lr_lambda, make_optimizer

CONFIG_FILE = Path(__file__).resolve().parents[1] / "configs" / "smollm2_countdown_tiny.yaml"


def test_lr_schedule_by_hand():
    """Linear warmup over 2 steps to the peak, then a cosine over the remaining 8 steps down to
    lr * min_lr_ratio at max_steps."""
    f = lr_lambda(TrainConfig(max_steps=10, warmup_steps=2, min_lr_ratio=0.1))
    assert [f(0), f(1)] == pytest.approx([1 / 3, 2 / 3], rel=1e-12)
    assert f(2) == pytest.approx(1.0, rel=1e-12)  # the peak, right after warmup
    assert f(6) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 4 / 8)), rel=1e-12)  # = 0.55
    assert f(6) == pytest.approx(0.55, rel=1e-12)
    assert f(9) == pytest.approx(0.1 + 0.45 * (1 + math.cos(math.pi * 7 / 8)), rel=1e-12)
    assert f(10) == pytest.approx(0.1, rel=1e-12) and f(12) == pytest.approx(0.1, rel=1e-12)  # the floor
    g = lr_lambda(TrainConfig(max_steps=4, warmup_steps=0, min_lr_ratio=0.0))
    assert [g(s) for s in range(5)] == pytest.approx([1.0, 0.5 * (1 + math.cos(math.pi / 4)), 0.5,
                                                      0.5 * (1 + math.cos(3 * math.pi / 4)), 0.0], abs=1e-12)


def test_the_optimizer_has_the_runs_settings_and_steps_through_the_schedule():
    cfg = TrainConfig(lr=2e-3, adam_betas=(0.8, 0.95), weight_decay=0.05, max_steps=4, warmup_steps=1,
                      min_lr_ratio=0.5)
    p = torch.nn.Parameter(torch.ones(3))
    opt, sched = make_optimizer(cfg, [p])
    (group,) = opt.param_groups
    assert (group["betas"], group["weight_decay"]) == ((0.8, 0.95), 0.05)
    assert isinstance(opt, torch.optim.AdamW)
    lrs = []
    for _ in range(5):
        lrs.append(group["lr"])
        opt.step()
        sched.step()
    # warmup 1/2, then cosine over 3 steps from 1 to 0.5
    want = [0.5, 1.0, 0.5 + 0.25 * (1 + math.cos(math.pi / 3)), 0.5 + 0.25 * (1 + math.cos(2 * math.pi / 3)), 0.5]
    assert lrs == pytest.approx([2e-3 * w for w in want], rel=1e-12)
    assert TrainConfig().weight_decay == 0.0 and make_optimizer(TrainConfig(), [p])[0].param_groups[0]["weight_decay"] == 0.0


def test_the_rollouts_and_the_evaluation_sample_with_the_runs_settings():
    cfg = TrainConfig(temperature=0.9, top_p=0.8, top_k=7, max_attempt_tokens=5, max_reflection_tokens=6,
                      max_retry_tokens=7, decode="compiled", compact_rollouts=False)
    s = cfg.sampling()
    assert (s.temperature, s.top_p, s.top_k, s.max_attempt_tokens, s.max_reflection_tokens, s.max_retry_tokens,
            s.decode, s.compact) == (0.9, 0.8, 7, 5, 6, 7, "compiled", False)
    assert cfg.sampling(0.0).temperature == 0.0  # eval_temperature 0: greedy, not the rollouts' 0.9
    assert cfg.sampling(cfg.eval_temperature).temperature == 0.0 and cfg.sampling(0.3).temperature == 0.3


@pytest.mark.parametrize("name, value", [
    ("lr", 0.0), ("batch_size", 0), ("max_steps", 0), ("micro_batch_size", 0), ("save_every", 0),
    ("candidates_per_failure", 0.0), ("candidates_per_failure", -1.0), ("grad_clip", -1.0), ("top_p", 0.0),
    ("top_p", 1.5), ("eps_low", 1.0), ("eps_high", -0.1), ("weight_decay", -0.01), ("lr", float("nan")),
    ("min_lr_ratio", 1.5), ("adam_betas", (0.9, 1.0)), ("group_size", 1),
])
def test_out_of_range_settings_are_refused_by_name(name, value):
    with pytest.raises(R3Error, match=f"config: '{name}' must be"):
        TrainConfig(**{name: value}).validate()


def test_edge_values_that_are_allowed():
    TrainConfig(grad_clip=0.0, top_p=1.0, eps_low=0.99, beta=0.0, warmup_steps=0, min_lr_ratio=1.0, top_k=0,
                temperature=0.0).validate()


def test_a_resume_may_change_only_how_the_work_is_done():
    stored = TrainConfig().to_dict()
    for key, value in (("seed", 1), ("lr", 1e-4), ("group_size", 4), ("temperature", 1.0), ("beta", 0.0),
                       ("top_k", 5), ("warmup_steps", 0), ("weight_decay", 0.1), ("max_reflection_tokens", 64)):
        assert TrainConfig(**{key: value}).incompatible_with(stored) == [key], key
    for key, value in (("max_steps", 60), ("save_every", 5), ("decode", "compiled"), ("eval_n", 10)):
        assert TrainConfig(**{key: value}).incompatible_with(stored) == [], key


def test_a_resume_compares_the_task_in_effect_not_as_written(tmp_path):
    """The countdown-tiny preset and the same options spelled out (the shipped config file) are
    one task, so either resumes the other; one option more, another kind of task, or a plug-in
    that cannot list its options is refused by the written form."""
    import yaml

    from r3.config import parse_args

    spelled = parse_args(["--config", str(CONFIG_FILE)])
    assert spelled.task == "countdown" and spelled.task_options
    assert spelled.incompatible_with(TrainConfig().to_dict()) == []
    assert TrainConfig().incompatible_with(spelled.to_dict()) == []
    other = yaml.safe_load(CONFIG_FILE.read_text())["task_options"] | {"max_num": 31}
    assert TrainConfig(task="countdown", task_options=other).incompatible_with(TrainConfig().to_dict()) \
        == ["task", "task_options"]
    assert TrainConfig(task="countdown").incompatible_with(TrainConfig().to_dict()) == ["task"]
    fc = TrainConfig(task="function_calling").to_dict()
    assert TrainConfig().incompatible_with(fc) == ["task"]
    assert TrainConfig(task="no_such_module:Task").incompatible_with(TrainConfig().to_dict()) == ["task"]


def test_a_config_files_task_options_under_another_task_say_where_they_came_from():
    """The shipped file spells out Countdown options; ``--task function_calling`` over it is
    refused naming the file and the way out, and ``--task-options '{}'`` is that way."""
    from r3.config import parse_args

    with pytest.raises(R3Error) as e:
        parse_args(["--config", str(CONFIG_FILE), "--task", "function_calling"])
    assert str(e.value).startswith("unknown options answer_tags, difficulty, ")
    assert f"({CONFIG_FILE}'s task_options are written for task 'countdown'; with --task function_calling pass " \
           "--task-options '{...}' to replace them, '{}' for none)" in str(e.value)
    cfg = parse_args(["--config", str(CONFIG_FILE), "--task", "function_calling", "--task-options", "{}"])
    assert (cfg.task, cfg.task_options) == ("function_calling", {})
    # options the other task takes pass (the countdown-tiny preset is Countdown)
    assert parse_args(["--config", str(CONFIG_FILE), "--task", "countdown-tiny"]).task == "countdown-tiny"


def test_only_the_files_own_task_options_are_blamed_on_it(tmp_path):
    from r3.config import parse_args

    shared = tmp_path / "shared.yaml"  # (split_seed: an option of both tasks)
    shared.write_text("task: countdown\ntask_options:\n  split_seed: 1\n")
    cfg = parse_args(["--config", str(shared), "--task", "function_calling", "--task-option", "synthetic_sise=100"])
    assert cfg.task_options == {"split_seed": 1, "synthetic_sise": 100}  # (the typo: the usual error, later)
    untitled = tmp_path / "untitled.yaml"  # (no task: the file's options were for the default task)
    untitled.write_text("task_options:\n  difficulty: easy\n")
    with pytest.raises(R3Error, match=r"untitled.yaml's task_options are written for task 'countdown-tiny'; "):
        parse_args(["--config", str(untitled), "--task", "function_calling"])


def test_the_candidate_pool_grows_with_first_attempt_success():
    """Fresh mode samples candidates_per_failure first attempts per failure needed, or 1.25 / the
    failure rate of the last 5 steps when that is more, at most 8 and G: a model that solves half
    its queries still yields about batch_size failures per step."""
    from r3.train import MAX_CANDIDATES_PER_FAILURE, candidates_per_failure, remember_first_success

    cfg = TrainConfig()
    assert cfg.candidates_per_failure == 2.0 and MAX_CANDIDATES_PER_FAILURE == 8.0
    assert candidates_per_failure(cfg, []) == 2.0
    assert candidates_per_failure(cfg, [0.1, 0.2]) == 2.0  # 1.25 / 0.85 < 2
    assert candidates_per_failure(cfg, [0.5]) == pytest.approx(2.5)
    assert candidates_per_failure(TrainConfig(candidates_per_failure=1.0), [0.0, 0.0, 0.0, 0.0, 0.0, 0.9]) \
        == pytest.approx(1.25 / 0.82)
    assert candidates_per_failure(cfg, [0.9, 0.9, 0.5, 0.5, 0.5, 0.5, 0.5]) == pytest.approx(2.5)  # the last 5
    assert candidates_per_failure(cfg, [1.0]) == 8.0
    assert candidates_per_failure(cfg, [0.95]) == 8.0
    assert candidates_per_failure(TrainConfig(candidates_per_failure=10.0), [0.5]) == 10.0  # (a larger floor stays)
    # at most G per failure: the first attempts never hold more rows (KV cache) than the reflections
    assert candidates_per_failure(TrainConfig(group_size=4), [0.9]) == 4.0
    assert candidates_per_failure(TrainConfig(group_size=2), [0.9]) == 2.0  # (the floor)
    recent: list = []
    for row in ({"first_try_success": 0.5}, {"first_try_success": None}, {}, *({"first_try_success": i / 10} for i in range(7))):
        remember_first_success(recent, row)
    assert recent == [0.2, 0.3, 0.4, 0.5, 0.6]
