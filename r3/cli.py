"""Helpers the r3 command-line tools share: argument parsing whose mistakes are one line, task
options, device and dtype flags, model loading, a progress line, atomic JSON output, and reading
a training run's directory. Library modules never import this one."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch

from r3.chat import user_template_options
from r3.checkpoint import load
from r3.config import parse_task_options  # noqa: F401  (re-exported for the CLIs)
from r3.errors import ArgumentParser, R3Error, positive_int  # noqa: F401
from r3.files import check_out_path, write_json_atomic, write_text_atomic  # noqa: F401
from r3.precision import resolve_dtype_name, slow_bf16_warning
from r3.progress import Progress, format_duration  # noqa: F401
from r3.tasks import get

DTYPES = {"auto": None, "bf16": "bfloat16", "fp32": "float32", "fp16": "float16"}


def load_task(name: str, options: dict):
    return get(name, **options)


def parse_chat_template_options(items: list[str] | None) -> dict:
    """``--chat-template-option key=value`` flags -> the checked options (see
    :func:`r3.chat.user_template_options`)."""
    flag = "--chat-template-option"
    return user_template_options(parse_task_options(items, flag), flag)


def pick_device_dtype(device: str | None, dtype: str | None):
    """The torch device and dtype of the ``--device`` / ``--dtype`` flags (device default: cuda if
    available, else cpu; dtype ``auto`` or None: bf16 where the device multiplies bf16 natively,
    else fp32). bf16 where it is only emulated is a warning.

    These commands run in one process on one device: under torchrun (``WORLD_SIZE`` > 1) every
    process would load the model onto the same GPU and write the same output files, so that is
    refused."""
    world = os.environ.get("WORLD_SIZE", "1")
    if world.strip().isdigit() and int(world) > 1:
        if "TORCHELASTIC_RUN_ID" in os.environ and os.environ.get("RANK", "0") != "0":
            raise SystemExit(2)  # (torchrun started them all: each is refused, the first one says why)
        raise R3Error(f"this command runs in one process on one device, not under torchrun with {int(world)} "
                      "processes (WORLD_SIZE): run it with python (--device cuda:N picks a GPU; for several GPUs, one "
                      "process each, each with its own --out), or unset WORLD_SIZE if a launcher set it for this one")
    name = device or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise R3Error(f"--device: unknown device {name!r}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise R3Error("--device cuda: CUDA is not available")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        n = torch.cuda.device_count()
        raise R3Error(f"--device {name}: this machine has {n} CUDA device{'s' if n != 1 else ''} (cuda:0"
                      + (f" to cuda:{n - 1})" if n > 1 else ")"))
    dtype = dtype or "auto"
    if dtype not in DTYPES:
        raise R3Error(f"--dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    dtype = resolve_dtype_name(dtype, dev)
    warning = slow_bf16_warning(dev) if dtype == "bf16" else None
    if warning:
        print(warning, file=sys.stderr, flush=True)
    return dev, getattr(torch, DTYPES[dtype])


def dtype_name(dtype: torch.dtype) -> str:
    """The ``--dtype`` spelling of a torch dtype (``torch.bfloat16`` -> ``"bf16"``)."""
    return {getattr(torch, v): k for k, v in DTYPES.items() if v}[dtype]


def load_model(spec: str, dtype, device):
    """(model, tokenizer) via :func:`r3.checkpoint.load`; a model without a tokenizer is an error."""
    model, tok = load(spec, dtype=dtype, device=device)
    if tok is None:
        raise R3Error(f"{spec}: no tokenizer")
    return model, tok


def read_json_object(path: Path, missing: str = "missing") -> dict:
    """A JSON file that must hold one object; any problem is one line naming the file."""
    path = Path(path)
    if not path.is_file():
        raise R3Error(f"{path}: {missing}")
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise R3Error(f"{path}: unreadable ({e})") from None
    if not isinstance(data, dict):
        raise R3Error(f"{path}: not a JSON object")
    return data


def check_run_dir(run) -> None:
    """One line when ``run`` is not a directory (missing, or a file)."""
    if not Path(run).is_dir():
        raise R3Error(f"{run}: not a run directory (a file)" if Path(run).exists() else f"{run}: no such run directory")


def read_run_config(run, fields=("task", "task_options")) -> dict:
    """A training run's resolved config (``RUN/config.json``), with ``fields`` checked."""
    path = Path(run)
    cfg_path = path / "config.json"
    check_run_dir(run)
    cfg = read_json_object(cfg_path, f"missing (is {run} a directory written by r3.train?)")
    for field in fields:
        if field not in cfg:
            raise R3Error(f"{cfg_path}: missing field {field!r}")
    if not isinstance(cfg.get("task"), str) or not isinstance(cfg.get("task_options", {}), dict):
        raise R3Error(f"{cfg_path}: 'task' must be a string and 'task_options' an object")
    return cfg


def run_cut_answers(run, cfg: dict) -> str:
    """A run's ``cut_answers`` from its config.json (``judge`` for runs from before the option), checked."""
    from r3.episode import CUT_ANSWERS

    value = cfg.get("cut_answers", "judge")
    if value not in CUT_ANSWERS:
        raise R3Error(f"{Path(run) / 'config.json'}: 'cut_answers' must be one of {', '.join(CUT_ANSWERS)}, "
                      f"got {value!r}")
    return value


def read_run(run: str) -> dict:
    """A training run's config for ``--run``, with its export checked."""
    cfg = read_run_config(run, ("model", "task", "task_options", "max_attempt_tokens", "max_reflection_tokens",
                                "max_retry_tokens"))
    export = Path(run) / "export"
    if not (export / "config.json").is_file():
        from r3.rundir import checkpoint_dirs, step_of, training_holder

        holder = training_holder(run)
        if holder:
            raise R3Error(f"--run {run}: no export yet ({export}); the run is still training ({holder}): "
                          "evaluate it when it ends")
        saved = checkpoint_dirs(Path(run))
        step = step_of(saved[-1]) if saved else None
        raise R3Error(f"--run {run}: no export yet ({export}); the run has not finished: rerun "
                      f"r3.train with --out {run} to finish it"
                      + (f", or with --max-steps {step} as well to export its last checkpoint (step {step})" if step else ""))
    return cfg
