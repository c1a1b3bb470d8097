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
                temperature=0.01, eval_temperature=0.0).validate()
    TrainConfig(top_k=2).validate()


@pytest.mark.parametrize("name,value", [("temperature", 0), ("temperature", 0.0), ("top_k", 1)])
def test_greedy_rollouts_are_refused(name, value):
    """Greedy rollouts make a group's G reflections one text: no group could ever carry signal, and
    a whole run trained nothing with only the no-signal warning to say so."""
    with pytest.raises(R3Error, match=f"config: '{name}' {value} samples greedily: the G reflections of a group"):
        TrainConfig(**{name: value}).validate()


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


def test_a_config_files_unknown_task_option_names_the_file(tmp_path):
    """A typo in a config file's task_options (its own task's) is refused naming the file, as a
    bad key of the file is; a --task-option typo beside it is not blamed on the file."""
    from r3.config import parse_args

    f = tmp_path / "my.yaml"
    f.write_text("task: countdown\ntask_options:\n  max_numb: 40\n")
    with pytest.raises(R3Error) as e:
        parse_args(["--config", str(f)])
    assert str(e.value).startswith(f"{f}: task_options: unknown option max_numb for task 'countdown'; valid options: ")
    f.write_text("task: countdown\ntask_options:\n  max_num: 40\n")
    cfg = parse_args(["--config", str(f), "--task-option", "max_targett=60"])  # (the usual error, when it is built)
    assert cfg.task_options == {"max_num": 40, "max_targett": 60}


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


# Each bound the config checks, field by field (a field left out of validate() ran with the bad
# value: keep_last=0 deleted every checkpoint, update_epochs=0 trained nothing).
@pytest.mark.parametrize("name", ["batch_size", "group_size", "max_attempt_tokens", "max_reflection_tokens",
                                  "max_retry_tokens", "micro_batch_size", "update_epochs", "max_steps",
                                  "save_every", "keep_last", "candidates_per_failure", "lr"])
def test_a_count_or_rate_that_must_be_positive_refuses_zero_and_true(name):
    for value in (0, -1, True, float("inf")):
        with pytest.raises(R3Error, match=f"config: '{name}' must be a finite number > 0, got {value!r}"):
            TrainConfig(**{name: value}).validate()


@pytest.mark.parametrize("name", ["temperature", "beta", "eps_low", "eps_high", "weight_decay", "warmup_steps",
                                  "eval_every", "eval_n", "eval_temperature", "samples_every", "log_samples",
                                  "top_k", "grad_clip", "min_lr_ratio", "stop_after"])
def test_a_setting_where_zero_means_off_refuses_negatives(name):
    if name != "temperature":  # (0 is greedy there: refused, test_greedy_rollouts_are_refused)
        TrainConfig(**{name: 0}).validate()
    for value in (-1, False, float("nan")):
        with pytest.raises(R3Error, match=f"config: '{name}' must be a finite number >= 0, got {value!r}"):
            TrainConfig(**{name: value}).validate()


def test_switches_names_and_shapes_are_checked_when_the_config_is_built_in_code():
    """TrainConfig(...).validate() (the library's way in, no flag parsing) refuses what the
    flags would: a switch that is not a bool, an unknown tracker, betas of another length, task
    options that are not a mapping."""
    for name in ("compact_rollouts", "scale_advantages", "skip_no_signal_groups", "shared_prefix",
                 "activation_checkpointing"):
        with pytest.raises(R3Error, match=f"config: '{name}' must be true or false, got 'yes'"):
            TrainConfig(**{name: "yes"}).validate()
    with pytest.raises(R3Error, match="config: 'report_to' must be one of none, tensorboard, wandb, got 'mlflow'"):
        TrainConfig(report_to="mlflow").validate()
    with pytest.raises(R3Error, match=r"config: 'adam_betas' must be two numbers in \[0, 1\), got \[0.9, 0.99, 0.5\]"):
        TrainConfig(adam_betas=(0.9, 0.99, 0.5)).validate()
    with pytest.raises(R3Error, match=r"config: 'task_options' must be a mapping, got \['difficulty=easy'\]"):
        TrainConfig(task_options=["difficulty=easy"]).validate()


def test_a_resume_may_change_when_it_stops_and_where_it_reports():
    stored = TrainConfig().to_dict()
    for key, value in (("stop_after", 5), ("report_to", "tensorboard"), ("keep_last", 5), ("log_samples", 0),
                       ("activation_checkpointing", True), ("compact_rollouts", False), ("shared_prefix", False)):
        assert TrainConfig(**{key: value}).incompatible_with(stored) == [], key


def test_flag_and_file_values_are_read_as_their_fields_types(tmp_path):
    """Switch spellings in any case, an exponent for a count, and what is not the field's type
    (2.5 steps, true as a learning rate, a switch of 'maybe', three betas) refused naming it."""
    from r3.config import parse_args

    assert parse_args(["--compact-rollouts", "off"]).compact_rollouts is False
    assert parse_args(["--shared-prefix", "FALSE", "--activation-checkpointing", "Yes"]).shared_prefix is False
    assert parse_args(["--activation-checkpointing", "On"]).activation_checkpointing is True
    assert parse_args(["--max-steps", "1e3"]).max_steps == 1000
    f = tmp_path / "c.json"
    for text, message in (('{"batch_size": 2.5}', "bad value 2.5 for 'batch_size' (expected int)"),
                          ('{"lr": true}', "bad value True for 'lr' (expected float)"),
                          ('{"shared_prefix": "maybe"}', "bad value 'maybe' for 'shared_prefix' (expected bool)")):
        f.write_text(text)
        with pytest.raises(R3Error) as e:
            parse_args(["--config", str(f)])
        assert str(e.value) == f"{f}: {message}"
    with pytest.raises(R3Error) as e:
        parse_args(["--adam-betas", "[0.9, 0.99, 0.5]"])
    assert str(e.value) == "command line: bad value '[0.9, 0.99, 0.5]' for 'adam_betas' (expected a JSON list of 2 numbers)"


def test_config_files_empty_dashed_repeated_and_under_flags(tmp_path):
    """An empty file is the defaults; keys may be written with dashes; two --config are refused
    (only the last was read, the first one's settings dropped without a word: a user may expect
    them merged); a file's task_options are merged under --task-option; an unknown key is named as
    written."""
    from r3.config import parse_args

    empty = tmp_path / "empty.yaml"
    empty.write_text("")
    assert parse_args(["--config", str(empty)]).to_dict() == TrainConfig().validate().to_dict()
    a, b = tmp_path / "a.yaml", tmp_path / "b.yaml"
    a.write_text("group-size: 4\ntask_options:\n  max_num: 30\n")
    b.write_text("group_size: 6\n")
    cfg = parse_args(["--config", str(a)])
    assert cfg.group_size == 4
    with pytest.raises(R3Error, match=r"^--config given 2 times \(.*a\.yaml, .*b\.yaml\): one file per run, not merged"):
        parse_args(["--config", str(a), "--config", str(b)])
    with pytest.raises(R3Error, match="--config given 3 times"):
        parse_args(["--config", str(b), "--lr", "1e-5", "--config", str(a), f"--config={a}"])
    cfg = parse_args(["--config", str(a), "--task-option", "max_num=40", "--task-option", "max_target=60"])
    assert cfg.task_options == {"max_num": 40, "max_target": 60}
    b.write_text("grop-size: 6\n")
    with pytest.raises(R3Error, match=r"unknown key 'grop-size' \(did you mean group_size\?\)$"):
        parse_args(["--config", str(b)])
    b.write_text("grop-size: 6\nlr: 1e-5\nxyzzy: 1\nbatch_sise: 4\n")  # (every typo at once, not one per run)
    with pytest.raises(R3Error, match=r"b\.yaml: unknown keys 'grop-size' \(did you mean group_size\?\), 'xyzzy', "
                                      r"'batch_sise' \(did you mean batch_size\?\) \(see python -m r3.train --help\)$"):
        parse_args(["--config", str(b)])
    b.write_text("xyzzy: 1\nxyzzy_: 2\nxyzzy-: 2\n")  # (one key spelled with - and with _: one typo)
    with pytest.raises(R3Error, match=r"b\.yaml: unknown keys 'xyzzy', 'xyzzy_' \(see python -m r3.train --help\)$"):
        parse_args(["--config", str(b)])
    b.write_text("xyzzy: 1\n")
    with pytest.raises(R3Error, match=r"b\.yaml: unknown key 'xyzzy' \(see python -m r3.train --help\)$"):
        parse_args(["--config", str(b)])


def test_a_task_that_does_not_exist_is_not_blamed_on_the_files_options(tmp_path):
    from r3.config import parse_args

    f = tmp_path / "c.yaml"
    f.write_text("task: countdown\ntask_options:\n  difficulty: easy\n")
    with pytest.raises(R3Error) as e:
        parse_args(["--config", str(f), "--task", "no_such_task"])
    assert str(e.value).startswith("unknown task 'no_such_task'") and "written for task" not in str(e.value)


def test_task_option_flags_keys_and_path_options(tmp_path, monkeypatch):
    """key=value: the key stripped, an empty key refused; the option named ``path`` is a path
    option like any ``*_path`` (made absolute when it names a file here)."""
    from r3.config import parse_task_options

    assert parse_task_options(["difficulty =easy", " max_num=30"]) == {"difficulty": "easy", "max_num": 30}
    with pytest.raises(R3Error, match="--task-option expects key=value, got '=5'"):
        parse_task_options(["=5"])
    (tmp_path / "data.jsonl").write_text("{}\n")
    monkeypatch.chdir(tmp_path)
    assert TrainConfig(task_options={"path": "data.jsonl"}).validate().task_options == {"path": str(tmp_path / "data.jsonl")}


def test_help_under_torchrun_is_printed_by_rank_0_only(capsys, monkeypatch):
    from r3.config import parse_args

    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "x")
    for rank, printed in (("0", True), ("1", False), ("2", False)):
        monkeypatch.setenv("RANK", rank)
        with pytest.raises(SystemExit):
            parse_args(["--help"])
        assert ("--group-size" in capsys.readouterr().out) == printed, rank


def test_a_far_off_flag_gets_no_suggestion():
    """Only a close name is suggested (--resume is not a misspelt --failures)."""
    from r3.config import parse_args

    for flag in ("--resume", "--gpu", "--bogus"):
        with pytest.raises(R3Error) as e:
            parse_args([flag, "1"])
        assert str(e.value) == f"unknown flag '{flag}'"


def test_plug_in_tasks_of_two_classes_are_two_tasks(tmp_path, monkeypatch):
    """Two task classes with the same name and options are not the same task on resume."""
    (tmp_path / "r3_twin_tasks.py").write_text(
        "from r3.tasks.countdown import CountdownTask\n\n"
        "class A(CountdownTask):\n    pass\n\n"
        "class B(CountdownTask):\n    pass\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    a = TrainConfig(task="r3_twin_tasks:A")
    assert a.incompatible_with(TrainConfig(task="r3_twin_tasks:A").to_dict()) == []
    assert a.incompatible_with(TrainConfig(task="r3_twin_tasks:B").to_dict()) == ["task"]


def test_the_files_own_task_named_again_on_the_command_line_is_not_another_task(tmp_path):
    """--task naming the file's own task: the file's options are that task's (a typo among them
    is the file's, not a hint to replace them for another task)."""
    from r3.config import parse_args

    f = tmp_path / "c.yaml"
    f.write_text("task: countdown\ntask_options:\n  dificulty: easy\n")
    with pytest.raises(R3Error) as e:
        parse_args(["--config", str(f), "--task", "countdown"])
    assert str(e.value).startswith(f"{f}: task_options: unknown option dificulty for task 'countdown'")
    assert "written for task" not in str(e.value)
    f.write_text("task: countdown\ntask_options:\n  difficulty: easy\n")
    assert parse_args(["--config", str(f), "--task", "countdown"]).task_options == {"difficulty": "easy"}


def test_a_flag_for_one_token_limit_overrides_max_new_tokens_from_the_file(tmp_path):
    """Flags override the config file: a file's max_new_tokens (which sets the three limits) must
    not silently win over --max-reflection-tokens, nor a flag's max_new_tokens over a more specific
    flag given with it; the recorded config builds the same limits again (r3.evaluate --run)."""
    from r3.config import parse_args

    f = tmp_path / "c.yaml"
    f.write_text("max_new_tokens: 64\n")
    cfg = parse_args(["--config", str(f), "--max-reflection-tokens", "128"])
    assert (cfg.max_attempt_tokens, cfg.max_reflection_tokens, cfg.max_retry_tokens) == (64, 128, 64)
    again = TrainConfig(**cfg.to_dict())
    assert (again.max_attempt_tokens, again.max_reflection_tokens, again.max_retry_tokens) == (64, 128, 64)
    cfg = parse_args(["--max-new-tokens", "32", "--max-retry-tokens", "16"])
    assert (cfg.max_attempt_tokens, cfg.max_reflection_tokens, cfg.max_retry_tokens) == (32, 32, 16)
    f.write_text("max_reflection_tokens: 128\n")  # a flag's max_new_tokens is above the file's limit
    cfg = parse_args(["--config", str(f), "--max-new-tokens", "32"])
    assert (cfg.max_new_tokens, cfg.max_attempt_tokens, cfg.max_reflection_tokens, cfg.max_retry_tokens) == (32, 32, 32, 32)


def test_a_max_new_tokens_that_sets_no_limit_is_refused(tmp_path):
    """The README's way to a config is a copy of configs/smollm2_countdown_tiny.yaml, which writes
    the three token limits out: max_new_tokens set in that copy was dropped without a word (recorded
    as null, the limits left at 48 / 96 / 48), so the edit did nothing. Refused in one line, as is
    --max-new-tokens beside all three limit flags; it still sets what no limit as high up sets."""
    from r3.config import parse_args

    f = tmp_path / "my.yaml"
    f.write_text(CONFIG_FILE.read_text().replace("max_new_tokens: null ", "max_new_tokens: 16   ", 1))
    with pytest.raises(R3Error, match=f"^{f}: max_new_tokens 16 sets no limit: max_attempt_tokens, "):
        parse_args(["--config", str(f)])
    with pytest.raises(R3Error, match="^--max-new-tokens 5 sets no limit: --max-attempt-tokens, "):
        parse_args(["--max-new-tokens", "5", "--max-attempt-tokens", "4", "--max-reflection-tokens", "4",
                    "--max-retry-tokens", "4"])
    limits = ("--max-attempt-tokens", "7", "--max-reflection-tokens", "7", "--max-retry-tokens", "7")
    cfg = parse_args(["--config", str(f), *limits])  # (flags over the file: its max_new_tokens gives way)
    assert (cfg.max_attempt_tokens, cfg.max_reflection_tokens, cfg.max_retry_tokens) == (7, 7, 7)
    cfg = parse_args(["--max-new-tokens", "7", *limits])  # (the same limits: nothing is lost)
    assert (cfg.max_attempt_tokens, cfg.max_reflection_tokens, cfg.max_retry_tokens) == (7, 7, 7)
    cfg = parse_args(["--config", str(CONFIG_FILE), "--max-new-tokens", "16"])
    assert (cfg.max_attempt_tokens, cfg.max_reflection_tokens, cfg.max_retry_tokens) == (16, 16, 16)
    f.write_text("max_new_tokens: 16\nmax_attempt_tokens: 8\nmax_retry_tokens: 8\n")
    cfg = parse_args(["--config", str(f)])
    assert (cfg.max_attempt_tokens, cfg.max_reflection_tokens, cfg.max_retry_tokens) == (8, 16, 8)


def test_a_max_new_tokens_that_sets_no_limit_is_refused_with_a_limit_flag_beside_the_file(tmp_path):
    """A copy of the example config with max_new_tokens set (the three limits written out) was
    refused, but not once one limit flag came with it: ``--max-attempt-tokens 7`` took that limit
    and the file's other two still won over its max_new_tokens, which again set nothing without
    a word (the limits 7 / 96 / 48). Refused too; flags that give all three limits still moot it."""
    from r3.config import parse_args

    f = tmp_path / "my.yaml"
    f.write_text(CONFIG_FILE.read_text().replace("max_new_tokens: null ", "max_new_tokens: 16   ", 1))
    with pytest.raises(R3Error, match=f"^{f}: max_new_tokens 16 sets no limit: .* are all given in {f} or on the "
                                      "command line too"):
        parse_args(["--config", str(f), "--max-attempt-tokens", "7"])
    f.write_text("max_new_tokens: 16\nmax_attempt_tokens: 8\nmax_reflection_tokens: 8\n")
    with pytest.raises(R3Error, match="max_new_tokens 16 sets no limit"):
        parse_args(["--config", str(f), "--max-retry-tokens", "7"])
    cfg = parse_args(["--config", str(f), "--max-attempt-tokens", "7"])  # (the retry limit is still its)
    assert (cfg.max_attempt_tokens, cfg.max_reflection_tokens, cfg.max_retry_tokens) == (7, 8, 16)


def test_a_resume_names_the_model_by_another_path_to_the_same_files(tmp_path, monkeypatch):
    """A run started with a relative --model path resumes with the absolute one (or from another
    directory): the same files are the same model; a different directory is another model."""
    model_dir = tmp_path / "m"
    model_dir.mkdir()
    (model_dir / "config.json").write_text("{}")  # (all a model spec needs to name a directory)
    monkeypatch.chdir(tmp_path)
    stored = TrainConfig(model="m").to_dict()
    assert TrainConfig(model=str(model_dir)).incompatible_with(stored) == []
    assert TrainConfig(model=str(tmp_path / "other")).incompatible_with(stored) == ["model"]


def test_a_config_file_must_be_yaml_or_json_and_may_start_with_a_byte_order_mark(tmp_path):
    """Another suffix is refused before it is read (a .txt or .toml file is not parsed as JSON by
    chance); a JSON file saved by a Windows tool with a byte-order mark is read."""
    from r3.config import parse_args

    f = tmp_path / "c.txt"
    f.write_text('{"max_steps": 3}')
    with pytest.raises(R3Error, match=r"expected a \.yaml, \.yml or \.json file"):
        parse_args(["--config", str(f)])
    g = tmp_path / "c.json"
    g.write_text('\ufeff{"max_steps": 3}', encoding="utf-8")
    assert parse_args(["--config", str(g)]).max_steps == 3


def test_an_integer_flag_in_e_notation_must_be_a_whole_finite_number():
    """``--max-steps 1e3`` is 1000, but ``--group-size 2.5e0`` was silently 2 and ``--max-steps
    1e400`` an OverflowError traceback: both are the usual one-line error naming the key."""
    from r3.config import parse_args

    assert parse_args(["--max-steps", "1e3"]).max_steps == 1000
    for flag, value in (("--group-size", "2.5e0"), ("--max-steps", "1e400"), ("--batch-size", "-inf")):
        with pytest.raises(R3Error, match=f"bad value '{value}' for '{flag[2:].replace('-', '_')}'"):
            parse_args([flag, value])


def test_an_integer_flag_written_with_a_decimal_point_is_read_as_a_config_file_reads_it(tmp_path):
    """``keep_last: 2.0`` in a YAML file is 2, and so was ``--keep-last 2e0``, but ``--keep-last
    2.0`` was refused: the same number is read the same way wherever it is written; a fraction
    is still refused in one line."""
    from r3.config import parse_args

    f = tmp_path / "c.yaml"
    f.write_text("keep_last: 2.0\n")
    assert parse_args(["--config", str(f)]).keep_last == 2
    assert parse_args(["--keep-last", "2.0"]).keep_last == 2
    assert parse_args(["--max-steps", "30."]).max_steps == 30
    for value in ("2.5", "nan", "1.0e400"):
        with pytest.raises(R3Error, match=f"bad value '{value}' for 'keep_last'"):
            parse_args(["--keep-last", value])


def test_a_zero_max_new_tokens_is_refused_under_its_own_name(tmp_path):
    """``--max-new-tokens 0`` was refused as "'max_attempt_tokens' must be ... > 0" (the limit it
    had set), a flag the user never gave; alongside a limit of its own it named another one."""
    from r3.config import parse_args

    for argv in (["--max-new-tokens", "0"], ["--max-new-tokens", "0", "--max-attempt-tokens", "10"],
                 ["--max-new-tokens", "-4"]):
        with pytest.raises(R3Error, match="'max_new_tokens' must be a finite number > 0"):
            parse_args(argv)
    f = tmp_path / "c.yaml"
    f.write_text("max_new_tokens: 0\n")
    with pytest.raises(R3Error, match="'max_new_tokens' must be"):
        parse_args(["--config", str(f)])
    with pytest.raises(R3Error, match="'max_new_tokens' must be"):
        TrainConfig(max_new_tokens=0).validate()


def test_follow_schedule_sets_the_lr_of_this_runs_schedule_at_the_resumed_step():
    """On resume the scheduler's state (its step) comes from the checkpoint with the lr of the
    schedule it was written under; follow_schedule puts this run's schedule at that step in every
    parameter group (not the step before, not the old schedule's lr)."""
    from r3.train import follow_schedule

    old_cfg = TrainConfig(lr=1e-3, max_steps=2, warmup_steps=1, min_lr_ratio=0.1)
    new_cfg = TrainConfig(lr=1e-3, max_steps=6, warmup_steps=1, min_lr_ratio=0.1)
    p, q = torch.nn.Parameter(torch.ones(2)), torch.nn.Parameter(torch.ones(3))
    opt, sched = make_optimizer(old_cfg, [p])
    for _ in range(2):
        opt.step()
        sched.step()
    opt2, sched2 = make_optimizer(new_cfg, [{"params": [p]}, {"params": [q]}])
    sched2.load_state_dict({**sched.state_dict(), "base_lrs": [1e-3, 1e-3], "_last_lr": [sched.get_last_lr()[0]] * 2})
    for group in opt2.param_groups:
        group["lr"] = opt.param_groups[0]["lr"]  # (what the checkpoint's optimizer state holds)
    assert sched2.last_epoch == 2
    follow_schedule(sched2)
    want = 1e-3 * lr_lambda(new_cfg)(2)
    assert want != pytest.approx(1e-3 * lr_lambda(old_cfg)(2)) and want != pytest.approx(1e-3 * lr_lambda(new_cfg)(1))
    assert [g["lr"] for g in opt2.param_groups] == pytest.approx([want, want], rel=1e-12)
    fresh_opt, fresh = make_optimizer(new_cfg, [q])
    follow_schedule(fresh)  # (a fresh start: step 0, the warmup's first lr)
    assert fresh_opt.param_groups[0]["lr"] == pytest.approx(1e-3 * 0.5, rel=1e-12)


def test_the_optimizer_state_is_made_up_front_and_each_rollout_seed_is_salted():
    """make_optimizer gives AdamW its state before any step (step 0, zero moments), as
    init_adamw_state does: a checkpoint before the first update would otherwise have DCP take an
    empty AdamW step, which changes the weights (--save-every would). step_seed differs for every
    run seed, step and rank (a seed not salted by the step repeats the same rollouts every step;
    by the run seed, --seed would not change them), and is a valid generator seed."""
    from r3.train import step_seed

    p = torch.nn.Parameter(torch.ones(3))
    opt, _ = make_optimizer(TrainConfig(), [p])
    state = opt.state[p]
    assert float(state["step"]) == 0.0 and not state["exp_avg"].any() and not state["exp_avg_sq"].any()
    seeds = [step_seed(TrainConfig(seed=seed), step, rank) for seed in (0, 1, 7) for step in range(4) for rank in range(3)]
    assert len(set(seeds)) == len(seeds) and all(0 <= s < 2**31 for s in seeds)
