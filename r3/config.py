"""The training configuration: one dataclass of every knob, a config file, and ``--key value``.

Precedence: dataclass defaults < ``--config FILE`` (JSON or YAML) < command-line flags. Flags use
the field name with dashes or underscores (``--group-size 4`` == ``--group_size 4``). Every value is
checked; a mistake is an ``R3Error`` naming the key and the value.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import os
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from r3.chat import user_template_options
from r3.decode import DECODE_MODES
from r3.episode import CUT_ANSWERS, DEFAULT_CUT_ANSWERS, EpisodeSampling
from r3.errors import R3Error
from r3.grpo import AGGREGATIONS
from r3.precision import DTYPE_NAMES
from r3.tracking import REPORT_TO


@dataclass
class TrainConfig:
    # what to train
    model: str = "smollm2-135m"
    # A preset of Countdown that gives the built-in 135M model signal (it solves ~0% of standard
    # Countdown): two numbers, + and -, a plain prompt, the final equation is the answer.
    task: str = "countdown-tiny"
    task_options: dict = field(default_factory=dict)  # merged over the task's own defaults
    # passed to the tokenizer's chat template, over enable_thinking=false (Qwen3: true = thinking mode)
    chat_template_options: dict = field(default_factory=dict)
    failures: str | None = None  # a failure dataset (python -m r3.failures); None = fresh first attempts
    out: str = "runs/r3"
    # rollout
    batch_size: int = 8  # failed queries per optimizer step (all ranks together)
    group_size: int = 8  # reflections per failed query (the GRPO group)
    candidates_per_failure: float = 2.0  # first attempts sampled per needed failure (fresh mode; the floor)
    max_new_tokens: int | None = None  # sets the three limits below at once
    max_attempt_tokens: int = 48
    max_reflection_tokens: int = 96  # 48 cut almost every reflection of the built-in model short
    max_retry_tokens: int = 48
    temperature: float = 0.7
    top_p: float = 1.0
    top_k: int = 0
    decode: str = "eager"  # eager | compiled: the rollouts' decode step through torch.compile (r3.decode)
    compact_rollouts: bool = True  # decode batches drop rows that have stopped (the same samples)
    # an attempt or retry the token limit cut off: "fail" fails it unread; "judge" reads it as it stands
    cut_answers: str = DEFAULT_CUT_ANSWERS
    # optimisation
    lr: float = 1.5e-5  # for the built-in model (README: learning curve); the paper used 5e-7 on 1.5B-8B models
    warmup_steps: int = 2
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio
    weight_decay: float = 0.0
    adam_betas: tuple = (0.9, 0.999)
    beta: float = 0.001  # KL coefficient (paper: 0.001)
    eps_low: float = 0.2
    eps_high: float = 0.2
    agg: str = "token-mean"
    scale_advantages: bool = True  # False = Dr. GRPO (r - mean)
    micro_batch_size: int = 8  # sequences per forward/backward in the update
    update_epochs: int = 1  # passes over each rollout batch, one optimizer step each (old log-probs: the pre-update policy's)
    grad_clip: float = 1.0
    skip_no_signal_groups: bool = True  # groups with all-equal rewards have zero advantage
    shared_prefix: bool = True  # update and reference encode each group's shared prefix once
    activation_checkpointing: bool = False  # the update recomputes each block's activations in backward
    # parameters the update leaves as they are: comma-separated patterns over r3's parameter names
    # (fnmatch: embed_tokens.weight, layers.0.*, embed_tokens_per_layer.weight); "" = train all
    freeze: str = ""
    # precision and runtime
    dtype: str = "auto"  # compute dtype (auto: bf16 where the hardware has it); master weights and optimizer state stay fp32
    seed: int = 0
    max_steps: int = 30  # the built-in model on a 2-core CPU: ~12 min with AMX, ~17 with AVX-512 bf16, ~29 in fp32 on AVX2 only
    save_every: int = 20
    keep_last: int = 2
    eval_every: int = 0  # 0 = evaluate only before the first and after the last step
    eval_n: int = 0  # held-out queries per evaluation (0 = no evaluation during training)
    eval_temperature: float = 0.0  # 0 = greedy first attempt, reflection and retry
    samples_every: int = 1  # samples.jsonl: every rewarded retry, plus log_samples others every N steps
    log_samples: int = 2
    stop_after: int = 0  # end this process after that step, as if interrupted (0 = run to max_steps)
    report_to: str = "none"  # none | tensorboard | wandb (see r3.tracking)

    def __post_init__(self):
        if self.max_new_tokens is not None:
            self.max_attempt_tokens = self.max_reflection_tokens = self.max_retry_tokens = self.max_new_tokens

    def sampling(self, temperature: float | None = None):
        """The rollouts' :class:`r3.episode.EpisodeSampling` (``temperature`` overrides, e.g. the
        held-out evaluation's ``eval_temperature``)."""
        return EpisodeSampling(temperature=self.temperature if temperature is None else temperature,
                               top_p=self.top_p, top_k=self.top_k, max_attempt_tokens=self.max_attempt_tokens,
                               max_reflection_tokens=self.max_reflection_tokens,
                               max_retry_tokens=self.max_retry_tokens, decode=self.decode,
                               compact=self.compact_rollouts, cut_answers=self.cut_answers)

    # ---------------------------------------------------------------------------------------
    def validate(self) -> "TrainConfig":
        def positive(name, allow_zero=False):
            _check_positive(name, getattr(self, name), allow_zero)

        if self.max_new_tokens is not None:
            positive("max_new_tokens")
        for name in ("batch_size", "group_size", "max_attempt_tokens", "max_reflection_tokens",
                     "max_retry_tokens", "micro_batch_size", "update_epochs", "max_steps",
                     "save_every", "keep_last", "candidates_per_failure", "lr"):
            positive(name)
        for name in ("temperature", "beta", "eps_low", "eps_high", "weight_decay", "warmup_steps",
                     "eval_every", "eval_n", "eval_temperature", "samples_every", "log_samples", "top_k", "grad_clip", "min_lr_ratio", "stop_after"):
            positive(name, allow_zero=True)
        for name in ("compact_rollouts", "scale_advantages", "skip_no_signal_groups", "shared_prefix",
                     "activation_checkpointing"):
            if not isinstance(getattr(self, name), bool):
                raise InvalidValue(name, f" must be true or false, got {getattr(self, name)!r}")
        if self.group_size < 2:
            raise InvalidValue("group_size", f" must be >= 2 (GRPO compares samples within a group), got {self.group_size}")
        if not 0 < self.top_p <= 1:
            raise InvalidValue("top_p", f" must be in (0, 1], got {self.top_p}")
        for name, greedy in (("temperature", 0), ("top_k", 1)):  # (a group of G identical texts never carries signal)
            if getattr(self, name) == greedy:
                raise InvalidValue(name, f" {getattr(self, name)} samples greedily: the G reflections of a group would be one "
                                         "text, so no group could carry signal (eval_temperature sets the held-out "
                                         "evaluation's)")
        if len(self.adam_betas) != 2 or not all(0 <= b < 1 for b in self.adam_betas):
            raise InvalidValue("adam_betas", f" must be two numbers in [0, 1), got {list(self.adam_betas)}")
        if self.min_lr_ratio > 1:
            raise InvalidValue("min_lr_ratio", " must be <= 1 (the cosine decays from lr to lr * min_lr_ratio), "
                                               f"got {self.min_lr_ratio}")
        if self.eps_low >= 1:
            raise InvalidValue("eps_low", f" must be < 1, got {self.eps_low}")
        if self.agg not in AGGREGATIONS:
            raise InvalidValue("agg", f" must be one of {', '.join(AGGREGATIONS)}, got {self.agg!r}")
        if self.report_to not in REPORT_TO:
            raise InvalidValue("report_to", f" must be one of {', '.join(REPORT_TO)}, got {self.report_to!r}")
        if self.decode not in DECODE_MODES:
            raise InvalidValue("decode", f" must be one of {', '.join(DECODE_MODES)}, got {self.decode!r}")
        if self.cut_answers not in CUT_ANSWERS:
            raise InvalidValue("cut_answers", f" must be one of {', '.join(CUT_ANSWERS)}, got {self.cut_answers!r}")
        if self.dtype not in DTYPE_NAMES:
            raise InvalidValue("dtype", f" must be one of {', '.join(DTYPE_NAMES)}, got {self.dtype!r}")
        if not isinstance(self.task_options, dict):
            raise InvalidValue("task_options", f" must be a mapping, got {self.task_options!r}")
        where = "config: 'chat_template_options'"
        try:
            self.chat_template_options = user_template_options(self.chat_template_options, where)
        except R3Error as e:
            raise InvalidValue("chat_template_options", str(e)[len(where):]) from None
        if not isinstance(self.freeze, str) or (self.freeze and any(not p.strip() for p in self.freeze.split(","))):
            raise InvalidValue("freeze", " must be comma-separated parameter name patterns (e.g. "
                                         f"'embed_tokens.weight,layers.0.*'), got {self.freeze!r}")
        if not self.out:  # (an empty --out wrote the run into the current directory)
            raise InvalidValue("out", " cannot be empty")
        # (a config file's paths pass no shell: 'out: ~/runs/x' made a directory named '~' here)
        self.out = os.path.expanduser(self.out)
        self.task_options = absolute_paths(self.task_options)
        # (read again by a resume from another directory)
        self.failures = absolute_path(os.path.expanduser(self.failures) if self.failures else self.failures)
        return self

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["adam_betas"] = list(self.adam_betas)
        return d

    # Fields that may differ when resuming a run in the same --out (everything else must match).
    RESUMABLE_CHANGES = ("max_steps", "save_every", "keep_last", "eval_every", "eval_n",
                         "samples_every", "log_samples", "stop_after", "out", "report_to", "shared_prefix",
                         "compact_rollouts", "activation_checkpointing", "decode")

    def incompatible_with(self, other: dict) -> list[str]:
        mine = self.to_dict()
        other = upgrade_config_dict(other)
        if isinstance(other.get("task_options"), dict):  # (runs of older versions recorded relative paths)
            other["task_options"] = absolute_paths(other["task_options"])
        other["failures"] = absolute_path(other.get("failures"))
        from r3.checkpoint import same_model

        diff = sorted(k for k in set(mine) | set(other)
                      if k not in self.RESUMABLE_CHANGES and mine.get(k) != other.get(k)
                      and not (k == "model" and isinstance(other.get(k), str) and same_model(other[k], mine[k])))
        if {"task", "task_options"} & set(diff) and _same_task_in_effect(mine, other):
            diff = [k for k in diff if k not in ("task", "task_options")]
        return diff


def _same_task_in_effect(mine: dict, other: dict) -> bool:
    """Whether two configs' tasks, written differently (the ``countdown-tiny`` preset and the
    same options spelled out, say), are the same task: of one kind with the same options in
    effect. A task that cannot list its options (no ``config()``), or cannot be built, is not."""
    from r3.tasks import get

    try:
        a = get(mine["task"], **mine["task_options"])
        b = get(other["task"], **other["task_options"])
        if type(a) is not type(b) or getattr(a, "name", None) != getattr(b, "name", None):
            return False
        ca, cb = getattr(a, "config", None), getattr(b, "config", None)
        return callable(ca) and callable(cb) and bool(ca() == cb())
    except Exception:  # (R3Error or a plug-in's own: then only the written form decides)
        return False


_FIELDS = {f.name: f for f in fields(TrainConfig)}

# Keys of earlier versions -> (key, function of the old value), read from config files, flags and
# the config.json of a run being resumed.
_RENAMED = {"compile_decode": ("decode", lambda v: "compiled" if _coerce_bool(v) else "eager")}


def _parse_bool(v) -> bool | None:
    """True / False from a bool or a flag's spelling of one; None when it is neither."""
    if isinstance(v, bool):
        return v
    return {"1": True, "true": True, "yes": True, "on": True,
            "0": False, "false": False, "no": False, "off": False}.get(str(v).lower())


def _coerce_bool(v) -> bool:
    value = _parse_bool(v)
    if value is None:
        raise R3Error(f"bad value {v!r} for 'compile_decode' (expected true or false; it is now --decode eager|compiled)")
    return value


def upgrade_config_dict(d: dict) -> dict:
    """A config dict (a run's config.json) with the keys of earlier versions renamed."""
    d = dict(d)
    for old, (new, convert) in _RENAMED.items():
        if old in d:
            d[new] = convert(d.pop(old))
    d.setdefault("chat_template_options", {})  # (runs before the option rendered with the default)
    d.setdefault("freeze", "")  # (runs before the option trained every parameter)
    d.setdefault("cut_answers", "judge")  # (runs before the option judged cut answers as they stood)
    return d

# One line per knob for ``--help`` (a test checks that every field has one).
HELP = {
    "model": "HF directory, .gguf file, or smollm2-135m (built in)",
    "task": "countdown, countdown-tiny, function_calling, or module:Class of your own",
    "task_options": "JSON object merged over the task's defaults (or repeat --task-option key=value)",
    "chat_template_options": "JSON object passed to the chat template, over enable_thinking=false (or repeat "
                             "--chat-template-option key=value; Qwen3's thinking mode: enable_thinking=true)",
    "failures": "a failure dataset from python -m r3.failures; unset = sample fresh first attempts",
    "out": "run directory: config, metrics, samples, checkpoints, export; rerun with it to resume",
    "batch_size": "failed queries per optimizer step, all ranks together",
    "group_size": "reflections per failed query: the GRPO group (>= 2)",
    "candidates_per_failure": "first attempts sampled per failure needed (fresh mode); more (up to 8 and up to group_size) when the last steps' first-attempt success asks for it",
    "max_new_tokens": "sets the attempt, reflection and retry limits at once (a limit of its own given as "
                      "high up, or higher, wins: flag over file)",
    "max_attempt_tokens": "token limit of the first attempt",
    "max_reflection_tokens": "token limit of a reflection (the trained tokens)",
    "max_retry_tokens": "token limit of the retry",
    "temperature": "sampling temperature of the rollouts (> 0: greedy rollouts give a group no signal)",
    "top_p": "nucleus sampling of the rollouts (1 = off)",
    "top_k": "top-k sampling of the rollouts (0 = off; not 1, greedy)",
    "decode": "eager, or compiled: the rollouts' decode step through torch.compile (compiles once; on GPU with CUDA "
              "graphs, in a static KV cache held for the whole run: see the README's memory plan)",
    "compact_rollouts": "drop rows that have stopped from the rollouts' decode batches (the same samples, faster)",
    "cut_answers": "an attempt or retry the token limit cut off: fail (only answers the model ended can pass) or "
                   "judge (read it as it stands: a retry cut right after '28 + 12' passes for target 40)",
    "lr": "peak learning rate (AdamW)",
    "warmup_steps": "linear warmup steps, then cosine decay",
    "min_lr_ratio": "the cosine decays to lr * min_lr_ratio",
    "weight_decay": "AdamW weight decay",
    "adam_betas": "AdamW betas, a JSON list of two numbers",
    "beta": "KL coefficient against the frozen reference, on reflection tokens (0 = no reference)",
    "eps_low": "PPO clip range below the ratio 1",
    "eps_high": "PPO clip range above the ratio 1",
    "agg": "loss aggregation: " + ", ".join(AGGREGATIONS),
    "scale_advantages": "divide group advantages by their std (false = Dr. GRPO)",
    "micro_batch_size": "sequences per forward/backward in the update (with the shared prefix: as many as fit in that many padded sequences' tokens)",
    "update_epochs": "optimizer steps per rollout batch",
    "grad_clip": "gradient-norm clip (0 = none)",
    "skip_no_signal_groups": "leave out groups whose rewards are all equal (zero advantage)",
    "shared_prefix": "update and reference encode each group's shared prefix once (same loss and gradients)",
    "activation_checkpointing": "the update keeps only each block's input and recomputes the rest in backward "
                                "(same gradients, less memory, ~1/3 more update compute)",
    "freeze": "parameters the update leaves as they are: comma-separated patterns over r3's names "
              "(embed_tokens.weight, layers.0.*; Gemma 4's per-layer table: embed_tokens_per_layer.weight)",
    "dtype": "compute dtype: bf16, fp32, or auto (bf16 where the GPU or CPU multiplies bf16 natively, else fp32; "
             "a resumed run keeps its own); master weights and optimizer state stay fp32",
    "seed": "seed of data order, sampling and initialisation",
    "max_steps": "optimizer steps in all",
    "save_every": "checkpoint every N steps (and at the end)",
    "keep_last": "checkpoints kept",
    "eval_every": "held-out evaluation every N steps (0 = before the first and after the last)",
    "eval_n": "held-out queries per evaluation (0 = none)",
    "eval_temperature": "temperature of the held-out evaluation (0 = greedy)",
    "samples_every": "log --log-samples unrewarded samples every N steps, 0 = never (rewarded ones always)",
    "log_samples": "unrewarded samples logged per rank per logging step",
    "stop_after": "end this process after that step, as if interrupted (0 = run to max_steps)",
    "report_to": "experiment tracking: none, tensorboard (OUT/tensorboard) or wandb (OUT/wandb, offline by default)",
}


def absolute_path(v):
    """``v`` made absolute when it is a relative path naming an existing file; else ``v``."""
    if isinstance(v, str) and v and "\n" not in v and len(v) < 4096 and not os.path.isabs(v):
        try:
            return os.path.abspath(v) if os.path.isfile(v) else v
        except (OSError, ValueError):
            pass
    return v


def absolute_paths(options: dict) -> dict:
    """``options`` with each path option (``path`` or a name ending in ``_path``, as
    ``data_path``) that names an existing file by a relative path made absolute: the options are
    recorded (config.json, a failures file's header) and read again from other directories
    (``r3.evaluate --run``, a resumed run). Other options are never touched."""
    return {k: absolute_path(v) if k == "path" or str(k).endswith("_path") else v for k, v in options.items()}


def parse_task_options(items: list[str] | None, flag: str = "--task-option") -> dict[str, Any]:
    """``["key=value", ...]`` -> dict; a value is parsed as JSON when it is valid JSON (numbers,
    booleans, null, lists, quoted strings), else kept as the string (a path option's relative path
    to an existing file made absolute, see :func:`absolute_paths`). A key given twice is an error."""
    out: dict[str, Any] = {}
    for item in items or []:
        key, eq, value = item.partition("=")
        key = key.strip()
        if not eq or not key:
            raise R3Error(f"{flag} expects key=value, got {item!r}")
        if key in out:
            raise R3Error(f"{flag} {key} given twice")
        try:
            out[key] = json.loads(value)
        except (json.JSONDecodeError, RecursionError):
            out[key] = value
    return absolute_paths(out)


class InvalidValue(R3Error):
    """A config value :meth:`TrainConfig.validate` refuses, with its field: ``config: 'FIELD'
    PROBLEM`` (:func:`parse_args` names the config file that gave it instead)."""

    def __init__(self, field: str, problem: str):
        super().__init__(f"config: '{field}'{problem}")
        self.field, self.problem = field, problem


def _check_positive(name: str, v, allow_zero: bool = False) -> None:
    if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v) or v < 0 or (v == 0 and not allow_zero):
        raise InvalidValue(name, f" must be a finite number {'>= 0' if allow_zero else '> 0'}, got {v!r}")


def suggest(name: str, choices, flag: bool = True) -> str:
    """`` (did you mean --x?)`` for the closest choice (a config file's key: `` (did you mean
    x_y?)``), or '' when none is close."""
    close = difflib.get_close_matches(name, list(choices), n=1, cutoff=0.6)
    if not close:
        return ""
    return f" (did you mean --{close[0].replace('_', '-')}?)" if flag else f" (did you mean {close[0]}?)"


def _coerce(name: str, raw: Any, current: Any, source: str):
    """Turn a string (from the command line) or a parsed value into the field's type."""
    f = _FIELDS[name]
    typ = str(f.type)
    if raw is None or (isinstance(raw, str) and raw.lower() in ("none", "null") and "None" in typ):
        if "None" in typ:
            return None
        raise R3Error(f"{source}: '{name}' cannot be empty")
    try:
        if typ.startswith("bool"):
            value = _parse_bool(raw)
            if value is None:
                raise ValueError
            return value
        if typ.startswith("int") and "float" not in typ:
            written_as_float = isinstance(raw, str) and any(c in raw.lower() for c in ".e")
            number = float(raw) if written_as_float else raw  # (1e3 and 2.0, as a config file may hold)
            if isinstance(raw, bool) or (isinstance(number, float) and not number.is_integer()):
                raise ValueError  # (2.5 is not 2, and 1e400 not an OverflowError)
            return int(number)
        if typ.startswith("float"):
            if isinstance(raw, bool):
                raise ValueError
            return float(raw)
        if name == "freeze" and isinstance(raw, list) and all(isinstance(x, str) for x in raw):
            return ",".join(raw)  # (a config file's list of patterns)
        if typ.startswith("dict") or typ.startswith("tuple"):
            value = json.loads(raw) if isinstance(raw, str) else raw
            if typ.startswith("dict") and not isinstance(value, dict):
                raise ValueError
            if typ.startswith("tuple"):
                value = tuple(float(v) for v in value)
                if len(value) != len(current):
                    raise ValueError
            return value
        return str(raw)
    except (ValueError, TypeError, json.JSONDecodeError):
        kind = typ.split(" ")[0].split("|")[0]
        if kind.startswith("dict"):
            kind = "a JSON object"
        elif kind.startswith("tuple"):
            kind = f"a JSON list of {len(current)} numbers"
        raise R3Error(f"{source}: bad value {raw!r} for '{name}' (expected {kind})") from None


def _parse_problem(e: Exception) -> str:
    """One line saying what is wrong where: YAML's problem and its line and column, or JSON's
    message (which has them)."""
    mark, problem = getattr(e, "problem_mark", None), getattr(e, "problem", None)
    if mark is not None and problem:
        where = f"line {mark.line + 1}, column {mark.column + 1}: {problem}"
        context, at = getattr(e, "context", None), getattr(e, "context_mark", None)
        return where + (f" ({context} at line {at.line + 1}, column {at.column + 1})" if context and at else "")
    return str(e).splitlines()[0]


class _KeyTwice(ValueError):
    """A config file that sets one key twice in a mapping (YAML and JSON keep the last silently)."""


def _json_object_once_per_key(pairs: list) -> dict:
    seen = {}
    for k, v in pairs:
        if k in seen:
            raise _KeyTwice(f"key {k!r} is given twice (keep one)")
        seen[k] = v
    return seen


def _load_yaml_once_per_key(text: str):
    import yaml

    class Loader(yaml.SafeLoader):
        def construct_mapping(self, node, deep=False):
            lines: dict = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue
                key = self.construct_object(key_node, deep=True)
                line = key_node.start_mark.line + 1
                if isinstance(key, (str, int, float, bool)) and key in lines:
                    raise _KeyTwice(f"key {key!r} is given twice, on lines {lines[key]} and {line} (keep one)")
                lines.setdefault(key, line)
            return super().construct_mapping(node, deep=deep)

    return yaml.load(text, Loader=Loader)  # (a SafeLoader: builds plain Python objects only)


def _read_config_file(path: str) -> dict:
    p = Path(path)
    if p.is_dir():
        raise R3Error(f"config file '{path}' is a directory")
    if not p.is_file():
        raise R3Error(f"config file '{path}' does not exist")
    if p.suffix.lower() not in (".yaml", ".yml", ".json"):
        raise R3Error(f"config file '{path}': expected a .yaml, .yml or .json file")
    try:
        text = p.read_text(encoding="utf-8-sig")  # (a byte-order mark, as Windows tools write, is not data)
    except (OSError, UnicodeDecodeError) as e:
        raise R3Error(f"config file '{path}': cannot read ({getattr(e, 'strerror', None) or e})") from None
    try:
        if p.suffix.lower() in (".yaml", ".yml"):
            data = _load_yaml_once_per_key(text)
        else:
            data = json.loads(text, object_pairs_hook=_json_object_once_per_key)
    except _KeyTwice as e:
        raise R3Error(f"{path}: {e}") from None
    except Exception as e:
        raise R3Error(f"{path}: cannot parse ({_parse_problem(e)})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise R3Error(f"{path}: expected a mapping of config keys")
    return data


_REPEATED = ("task_option", "chat_template_option")  # key=value flags, merged into <name>s
_FLAGS = (*_FIELDS, "config", *_REPEATED)  # every flag name, as a key
_LIMITS = ("max_attempt_tokens", "max_reflection_tokens", "max_retry_tokens")  # what max_new_tokens sets


def parse_args(argv: list[str]) -> TrainConfig:
    """``[--config FILE] [--key value ...]`` -> a validated TrainConfig."""
    values: dict[str, Any] = {}
    pairs: list[tuple[str, str]] = []
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg in ("-h", "--help"):
            if "TORCHELASTIC_RUN_ID" not in os.environ or os.environ.get("RANK") == "0":  # (under torchrun, once)
                print(_help())
            raise SystemExit(0)
        if not arg.startswith("--"):
            raise R3Error(f"unexpected argument {arg!r} (flags are --key value)")
        key, eq, val = arg[2:].partition("=")
        name = key.replace("-", "_")
        if name not in _FLAGS and name not in _RENAMED:  # (before asking for its value)
            raise R3Error(f"unknown flag '--{name.replace('_', '-')}'{suggest(name, _FLAGS)}")
        if not eq:
            nxt = argv[i + 1] if i + 1 < len(argv) else None
            if nxt is None or (nxt.startswith("--") and nxt[2:].partition("=")[0].replace("-", "_")
                               in _FLAGS):
                raise R3Error(f"flag '--{key}' needs a value")
            val = argv[i + 1]
            i += 1
        pairs.append((key.replace("-", "_"), val))
        i += 1
    config_file = [v for k, v in pairs if k == "config"]
    if len(config_file) > 1:  # (only the last would be read: the others' settings dropped without a word)
        raise R3Error(f"--config given {len(config_file)} times ({', '.join(config_file)}): one file per run, "
                      "not merged; put the settings in one file, or override some with flags")
    from_file: dict[str, Any] = {}
    written: dict[str, str] = {}  # field -> the key the file spelled it with
    if config_file:
        unknown: dict[str, str] = {}  # key -> as written (every mistyped key in one error, not one per run)
        for k, v in _read_config_file(config_file[-1]).items():
            key = str(k).replace("-", "_")
            if key in _RENAMED:
                key, v = _RENAMED[key][0], _RENAMED[key][1](v)
            if key in from_file and from_file[key] != v:  # (a key and its old name, or - for _)
                raise R3Error(f"{config_file[-1]}: '{written[key]}' and '{k}' both set '{key}', to "
                              f"different values (keep one)")
            written[key] = k
            if key not in _FIELDS:
                unknown.setdefault(key, f"'{k}'{suggest(key, _FIELDS, flag=False)}")  # (grop-size, grop_size: one)
                continue
            values[key] = (v, config_file[-1])
            from_file[key] = v
        if unknown:
            named = list(unknown.values())
            help_hint = "" if len(named) == 1 and "did you mean" in named[0] else " (see python -m r3.train --help)"
            raise R3Error(f"{config_file[-1]}: unknown key{'s' if len(named) > 1 else ''} {', '.join(named)}{help_hint}")
    for k, v in pairs:
        if k == "config" or k in _REPEATED:
            continue
        if k in _RENAMED:
            k, v = _RENAMED[k][0], _RENAMED[k][1](v)
        if k not in _FIELDS:
            raise R3Error(f"unknown flag '--{k.replace('_', '-')}'{suggest(k, _FLAGS)}")
        values[k] = (v, "command line")
    cfg = TrainConfig()
    kwargs = {}
    for k, (v, source) in values.items():
        kwargs[k] = _coerce(k, v, getattr(cfg, k), source)
    for flag in _REPEATED:  # --task-option key=value (repeatable), as in the other CLIs
        items = [v for k, v in pairs if k == flag]
        if items:
            kwargs[flag + "s"] = {**kwargs.get(flag + "s", getattr(cfg, flag + "s")),
                                  **parse_task_options(items, "--" + flag.replace("_", "-"))}
    if kwargs.get("max_new_tokens") is not None:  # (it sets the three limits below any of them given as high up)
        _check_positive("max_new_tokens", kwargs["max_new_tokens"])
        source = values["max_new_tokens"][1]
        by_flag = source == "command line"
        own = {n: kwargs[n] for n in _LIMITS if n in values and (values[n][1] == "command line" or not by_flag)}
        where = {values[n][1] for n in own}  # (flags that give all three limits over a file's moot it: not refused)
        if (len(own) == len(_LIMITS) and any(v != kwargs["max_new_tokens"] for v in own.values())
                and source in where):  # (it would set nothing, silently)
            name = (lambda k: "--" + k.replace("_", "-")) if by_flag else (lambda k: k)
            raise R3Error(f"{'' if by_flag else source + ': '}{name('max_new_tokens')} {kwargs['max_new_tokens']} sets "
                          f"no limit: {', '.join(name(n) for n in _LIMITS[:2])} and {name(_LIMITS[2])} are all given "
                          f"{'on the command line' if by_flag else 'in ' + source}"
                          f"{' or on the command line' if len(where) > 1 else ''} too, and each wins over it; "
                          f"remove them to use {name('max_new_tokens')}, or remove it")
        if any(v != kwargs["max_new_tokens"] for v in own.values()):
            kwargs.update({n: kwargs["max_new_tokens"] for n in _LIMITS}, **own, max_new_tokens=None)
    try:
        cfg = TrainConfig(**kwargs).validate()
    except InvalidValue as e:  # a value the config file gave is named with the file, as a bad type is
        source = values.get(e.field, (None, "command line"))[1]
        if source == "command line":
            raise
        raise R3Error(f"{source}: '{e.field}'{e.problem}") from None
    _check_file_options_fit_task(cfg, values, from_file, config_file[-1] if config_file else None)
    return cfg


def _check_file_options_fit_task(cfg: TrainConfig, values: dict, from_file: dict, config_file: str | None) -> None:
    """A config file's ``task_options`` are written for the file's task: an option the task does
    not take is refused naming the file, and with another ``--task`` on the command line saying
    where it came from (``--task-options`` replaces them)."""
    file_task = from_file.get("task", _FIELDS["task"].default)
    file_options = from_file.get("task_options")
    if (config_file is None or values.get("task_options", (None, None))[1] != config_file
            or not isinstance(file_options, dict) or not file_options):
        return
    from r3.tasks import check_option_names

    try:  # (only the file's own options: a --task-option typo gets the usual error)
        check_option_names(cfg.task, file_options)
    except R3Error as e:
        if not str(e).startswith("unknown option"):
            raise
        if file_task == cfg.task:
            raise R3Error(f"{config_file}: task_options: {e}") from None
        # (cfg.task differs from the file's only where --task gave it on the command line)
        raise R3Error(f"{e} ({config_file}'s task_options are written for task {file_task!r}; with "
                      f"--task {cfg.task} pass --task-options '{{...}}' to replace them, '{{}}' for none)") from None


def _help() -> str:
    lines = ["usage: torchrun [--nproc_per_node N] -m r3.train [--config FILE] [--key value ...]",
             "       [--task-option key=value ...]  (merged into task_options, over the task's own defaults;",
             "                                       a JSON object given to --task-options replaces them whole)",
             "       [--chat-template-option key=value ...]  (merged into chat_template_options)",
             "",
             "--config FILE is JSON or YAML with the same keys; flags override it. Keys (default): what it sets"]
    d = TrainConfig().to_dict()
    for name in _FIELDS:
        lines.append(f"  --{name.replace('_', '-'):<24} {d[name]!r:<16} {HELP[name]}")
    return "\n".join(lines)
