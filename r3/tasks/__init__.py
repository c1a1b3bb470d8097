"""Tasks: examples, first-attempt prompt, reflection and retry prompts, and a binary verifier.

``get(name, **options)`` returns a task instance:

* ``"countdown"`` -- :class:`r3.tasks.countdown.CountdownTask`
* ``"function_calling"`` (also ``"function-calling"``, ``"xlam"``) --
  :class:`r3.tasks.function_calling.FunctionCallingTask`
* a preset (:data:`PRESETS`): a built-in task with other default options; ``"countdown-tiny"``,
  the main command's task, is Countdown made for a 135M model (two numbers, + and -, a plain prompt,
  the final equation is the answer)
* ``"package.module:Name"`` -- a user plug-in: the module is imported and ``Name`` (a
  :class:`~r3.tasks.base.Task` subclass, or any callable returning an object with ``examples``,
  ``messages``, ``verify``, ``reflection_prompt`` and ``retry_prompt``) is called with the options.

Each task owns its default options (its constructor's keyword defaults, or a preset's); the options
passed are merged over them. Unknown names and unknown options raise :class:`r3.errors.R3Error`.
"""

from __future__ import annotations

import importlib
import inspect
import json
import re
from typing import Any

from r3.errors import R3Error
from r3.tasks.base import Task, declared_options, option_names, verify_timeout_of

__all__ = ["Task", "get", "resolve", "available", "TASKS", "ALIASES", "PRESETS", "R3Error"]

# canonical name -> "module:Class" (imported lazily)
TASKS = {
    "countdown": "r3.tasks.countdown:CountdownTask",
    "function_calling": "r3.tasks.function_calling:FunctionCallingTask",
}
ALIASES = {"function-calling": "function_calling", "xlam": "function_calling"}
# preset name -> (built-in task, its default options); options given with the preset merge over these
PRESETS = {
    "countdown-tiny": ("countdown", {
        "difficulty": "easy",
        "answer_tags": False,
        "min_count": 2,
        "max_count": 2,
        "max_num": 30,
        "max_target": 60,
        "train_size": 600,
        "test_size": 90,
        "prompt_template": "Write an equation that uses the numbers {nums} once each, with + or -, and equals {target}.",
    }),
}

_REQUIRED = ("examples", "messages", "verify", "reflection_prompt", "retry_prompt")


def available() -> list[str]:
    """Built-in task and preset names (aliases excluded)."""
    return sorted(TASKS) + sorted(PRESETS)


def resolve(name: Any, options: dict | None = None) -> tuple[Any, dict]:
    """``(task name, options)`` with a preset replaced by its task and its options merged under
    ``options``; any other name is returned as it is."""
    options = dict(options or {})
    if isinstance(name, str) and name.strip().lower() in PRESETS:
        base, defaults = PRESETS[name.strip().lower()]
        return base, {**defaults, **options}
    return name, options


def _resolve(spec: str, task_name: str) -> Any:
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise R3Error(f"task {task_name!r}: a plug-in is written 'package.module:ClassName'")
    try:
        obj = importlib.import_module(module_name)
    except ImportError as e:
        hint = (" (is its directory on PYTHONPATH?)" if isinstance(e, ModuleNotFoundError)
                and e.name and module_name.split(".")[0] == e.name.split(".")[0] else "")
        raise R3Error(f"task {task_name!r}: cannot import module {module_name!r} ({e}){hint}") from None
    except SyntaxError as e:  # the plug-in's own code: where it is says all a traceback would
        where = f"{e.filename}, line {e.lineno}" if e.filename else f"line {e.lineno}"
        raise R3Error(f"task {task_name!r}: module {module_name!r} has a syntax error: {e.msg} ({where})") from None
    for part in attr.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise R3Error(f"task {task_name!r}: module {module_name!r} has no attribute {attr!r}") from None
    if not callable(obj):
        raise R3Error(f"task {task_name!r}: {attr!r} is not a class or a callable")
    return obj


def _built(name: Any) -> bool:
    """Whether ``name`` is a task object already (an instance, or anything with a task's methods)."""
    return isinstance(name, Task) or (not isinstance(name, str) and all(hasattr(name, a) for a in _REQUIRED))


def _factory(name: Any) -> Any:
    """The class (or callable) a task name stands for, imported for a plug-in."""
    if not isinstance(name, str) or not name.strip():
        raise R3Error(f"task name must be a non-empty string, got {name!r}")
    key = name.strip()
    canonical = ALIASES.get(key.lower(), key.lower())
    if canonical in TASKS:
        return _resolve(TASKS[canonical], name)
    if ":" in key:
        return _resolve(key, name)
    valid = ", ".join(sorted(TASKS) + sorted(PRESETS) + sorted(ALIASES))
    raise R3Error(f"unknown task {name!r}; valid tasks: {valid}, or a plug-in 'package.module:ClassName'")


def _check_option_names(factory: Any, name: Any, options: dict) -> None:
    accepted = option_names(factory)
    if accepted is not None:
        unknown = sorted(set(options) - set(accepted))
        if unknown:
            raise R3Error(f"unknown option{'s' if len(unknown) > 1 else ''} {', '.join(unknown)} for task "
                          f"{name!r}; valid options: {', '.join(accepted) or '(none)'}")


def check_option_names(name: Any, options: dict) -> None:
    """Raise what :func:`get` raises for an unknown task or option name, without building the
    task (which may read its data)."""
    name, options = resolve(name, options)
    if not _built(name):
        _check_option_names(_factory(name), name, options)


def get(name: Any, **options: Any) -> Task:
    """The task called ``name``, built with ``options`` (its keyword arguments, merged over a
    preset's)."""
    name, options = resolve(name, options)
    if _built(name):
        if options:
            raise R3Error(f"options {sorted(options)} given with an already-built task {name!r}")
        return name
    factory = _factory(name)
    _check_option_names(factory, name, options)
    try:
        inspect.signature(factory).bind(**options)
    except TypeError as e:  # e.g. a required option is missing
        raise R3Error(f"task {name!r}: bad options: {e}") from None
    except ValueError:  # no signature available: just call it
        pass
    try:
        task = factory(**options)
    except TypeError as e:  # (a **kw constructor that passes an unknown option on to one that rejects it)
        unknown = re.search(r"unexpected keyword argument '(\w+)'", str(e))
        if unknown and unknown.group(1) in options:
            raise R3Error(f"unknown option {unknown.group(1)} for task {name!r}; valid options: "
                          f"{', '.join(declared_options(factory)) or '(none)'}") from None
        if "multiple values for keyword argument" in str(e):
            raise R3Error(f"task {name!r}: bad options: {e}") from None
        raise
    missing = [a for a in _REQUIRED if not hasattr(task, a)]
    if missing:
        raise R3Error(f"task {name!r}: the object built lacks {', '.join(missing)}; subclass r3.tasks.Task")
    verify_timeout_of(task)  # (a bad value is the plug-in's mistake: said now, not at the first verdict)
    if isinstance(task, Task):
        # (Task's own methods raise NotImplementedError; verify or _verdict may stand in for _check;
        # a method may be an attribute of the instance)
        def own(m):
            return getattr(getattr(task, m), "__func__", None) is getattr(Task, m)

        unwritten = [m for m in ("examples", "messages", "_check") if own(m)
                     and not (m == "_check" and not (own("verify") and own("_verdict")))]
        if unwritten:
            raise R3Error(f"task {name!r}: {type(task).__name__} does not define {', '.join(unwritten)}; a task "
                          "subclasses r3.tasks.Task and writes examples, messages and _check")
        task._options_given = dict(options)  # (config() reports options the task keeps under other names)
    return task


def examples_of(task, split: str, n: int | None = None, seed: int = 0) -> list[dict]:
    """``task.examples(split, n, seed)``, checked: a list of JSON objects (a plug-in returning
    anything else failed with a traceback, or after the first step when a run logged an example
    it could not write as JSON), each passing the task's ``check_example`` (else a data file's bad
    field surfaced only as a verifier failing on every completion, after the models loaded). Any
    problem is one R3Error naming the task, its data file and the example."""
    name = getattr(task, "name", type(task).__name__)
    source = (split == "test" and getattr(task, "test_data_path", None)) or getattr(task, "data_path", None)
    check = getattr(task, "check_example", None)
    examples = task.examples(split, n, seed)
    if not isinstance(examples, (list, tuple)):
        raise R3Error(f"task {name!r}: examples({split!r}) must return a list of dicts, got {type(examples).__name__}")
    for i, ex in enumerate(examples):
        if not isinstance(ex, dict):
            raise R3Error(f"task {name!r}: {split} example {i + 1} is a {type(ex).__name__}, not a dict")
        try:
            json.dumps(ex)
        except (TypeError, ValueError) as e:
            raise R3Error(f"task {name!r}: {split} example {i + 1} cannot be written as JSON ({e}); "
                          "examples are logged with every sample") from None
        if callable(check):
            check(f"task {name!r}" + (f" ({source})" if source else "") + f": {split} example {i + 1}"
                  + (f" (id {ex['id']!r})" if "id" in ex else ""), ex)
    return list(examples)
