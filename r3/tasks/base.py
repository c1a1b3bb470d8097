"""The task interface shared by every task, plus small helpers for options and data files.

A task is a prompt builder plus a binary verifier:

* ``examples(split, n, seed)`` -- the problems, deterministic by seed; ``"train"`` and ``"test"``
  never overlap;
* ``messages(example)`` -- the chat messages of the first attempt;
* ``reflection_message(example)`` / ``retry_message(example)`` -- the user turns that ask for a
  self-reflection after a failed attempt and then for a second attempt (their text is the
  ``reflection_prompt`` / ``retry_prompt`` options);
* ``verify(example, completion_text) -> bool`` -- never raises, never executes model output;
* ``diagnose(example, completion_text) -> str`` -- a short human-readable reason for the verdict.

Options are keyword-only ``__init__`` arguments. :func:`r3.tasks.get` checks option names against
the signature, so an unknown option is a clear :class:`~r3.errors.R3Error`. Numeric and boolean
options also accept their string spelling (``"3"``, ``"0.1"``, ``"true"``) so CLIs can pass
``--key value`` pairs through unchanged.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import numbers
import os
import random
import sys
from typing import Any, Iterator

from r3.errors import R3Error
from r3.time_limit import time_limit

SPLITS = ("train", "test")
VERIFY_TIMEOUT_S = 10.0  # Task.verify_timeout's default
TIMEOUTS_IN_A_ROW = 8  # verdicts in a row that ran out of time stop the run


class VerifierTimeout(BaseException):
    """Raised inside a verifier that runs past its task's ``verify_timeout`` (and again every
    :data:`r3.time_limit.REFIRE_S` while it runs on). Not an Exception, so a plug-in's ``except
    Exception`` does not swallow it; a verdict that ran out of time is wrong even when the verifier
    caught it and returned something."""


class Task:
    """Base class of every task. Subclasses set ``name`` and the default prompts and implement
    ``examples``, ``messages`` and ``_check``."""

    name: str = "task"
    default_reflection_prompt: str = (
        "You tried performing the task and failed. Reflect on what went wrong and write a short "
        "explanation that will help you do better next time."
    )
    default_retry_prompt: str = "Try again."
    #: True when the examples come from data the project generated itself (not a user file).
    synthetic: bool = False
    #: True when generated examples stand in for a real data set the user should pass (function
    #: calling without ``data_path``): training and evaluation say so. (Countdown's generated
    #: puzzles are the task itself.)
    stand_in_data: bool = False
    #: Texts that end an answer turn (the first attempt, the retry) as soon as the model writes
    #: one, e.g. Countdown's ``</answer>``: the verifier reads the turn up to there, and no time
    #: is spent on what follows. In a reply that opens a reasoning block (``<think>``, written by
    #: the model or opened by the generation prompt) one counts only after the block's first
    #: ``</think>``. Empty: an answer runs to the end-of-turn token or the limit.
    stop_strings: tuple[str, ...] = ()
    #: Seconds r3 gives one verdict (a ``verify`` call on one completion; a ``diagnose`` of the
    #: task's own gets as long again): a verdict that runs longer is interrupted and is a wrong
    #: answer and a verifier error, whatever it returns, and :data:`TIMEOUTS_IN_A_ROW` of them in a
    #: row stop the run, so a verifier that hangs cannot stall it. None: no limit. The limit
    #: takes SIGALRM (:mod:`r3.time_limit`): it interrupts Python code, ``re`` and ``time.sleep`` on
    #: the main thread, not a C call that never checks for signals, and a verifier that sets its
    #: own ``signal.alarm`` cancels it (its verdict is still judged by the time it took).
    verify_timeout: float | None = VERIFY_TIMEOUT_S

    def __init__(self, *, reflection_prompt: str | None = None, retry_prompt: str | None = None):
        self.reflection_prompt = (
            self.default_reflection_prompt
            if reflection_prompt is None
            else opt_str("reflection_prompt", reflection_prompt, allow_empty=False)
        )
        self.retry_prompt = (
            self.default_retry_prompt
            if retry_prompt is None
            else opt_str("retry_prompt", retry_prompt, allow_empty=False)
        )

    # ---- data ---------------------------------------------------------------------------
    def examples(self, split: str = "train", n: int | None = None, seed: int = 0) -> list[dict]:
        raise NotImplementedError

    def check_example(self, where: str, example: Any) -> None:
        """Raise R3Error naming ``where`` and the field when ``example`` is not one of this task's
        examples (a stored failure from another task or a hand-edited file). Tasks whose examples
        come from a file validate them with the same rules."""

    # ---- prompts ------------------------------------------------------------------------
    def messages(self, example: dict) -> list[dict]:
        """Chat messages (``[{"role": "system"|"user", "content": str}, ...]``) of the first
        attempt; the next turn is the model's answer."""
        raise NotImplementedError

    def reflection_message(self, example: dict | None = None) -> dict:
        """The user turn appended after a failed attempt, asking for a self-reflection."""
        return {"role": "user", "content": self.reflection_prompt}

    def retry_message(self, example: dict | None = None) -> dict:
        """The user turn appended after the reflection, asking for a second attempt."""
        return {"role": "user", "content": self.retry_prompt}

    # ---- verifier -----------------------------------------------------------------------
    def verify(self, example: dict, completion_text: str) -> bool:
        """True iff ``completion_text`` solves ``example``. Never raises; never executes it. A
        verifier that raises (or returns something other than ``(bool, str)``) judges the
        completion wrong, and is counted (:func:`verifier_error_counts`)."""
        try:
            return self._verdict(example, completion_text)[0]
        except Exception as e:  # noqa: BLE001 -- the contract is "never raises"
            _note_error(self, f"{type(e).__name__}: {e}")
            return False

    def diagnose(self, example: dict, completion_text: str) -> str:
        """A short reason for the verdict: ``_check``'s own ("correct" for a pass it gives no reason
        for). Never raises. A plug-in that overrides :meth:`verify` but not ``_check`` gets
        "correct" / "wrong" from its verdict."""
        try:
            if type(self)._check is Task._check and type(self).verify is not Task.verify:
                ok = _as_verdict(self.verify(example, completion_text))
                if ok is None:
                    return "verifier error: verify() returned no bool"
                return "correct" if ok else "wrong (the task gives no reason)"
            ok, why = self._verdict(example, completion_text)
            return (why or "correct") if ok else why
        except Exception as e:  # noqa: BLE001
            return _error_reason(e)

    def _verdict(self, example: dict, completion_text: str) -> tuple[bool, str]:
        """``_check``'s result, which must be ``(bool, str)``: anything else (a plug-in returning a
        bare string would read as True) is an error, so it can never pay a reward."""
        out = self._check(example, completion_text)
        if not (isinstance(out, (tuple, list)) and len(out) == 2
                and (isinstance(out[0], bool) or type(out[0]).__name__ in ("bool", "bool_"))):  # (numpy)
            raise TypeError(f"{type(self).__name__}._check must return (bool, str), got {out!r}"[:200])
        return bool(out[0]), str(out[1])

    def _check(self, example: dict, completion_text: str) -> tuple[bool, str]:
        raise NotImplementedError

    # ---- introspection ------------------------------------------------------------------
    @classmethod
    def option_names(cls) -> list[str]:
        """Names of the keyword options ``__init__`` declares (also those its ``**kw`` passes on
        to the base class)."""
        return declared_options(cls)

    def config(self) -> dict:
        """The options in effect (defaults filled in), JSON-serialisable for run metadata;
        ``r3.tasks.get(task.name, **task.config())`` rebuilds an equivalent task. Each declared
        option and each one :func:`r3.tasks.get` passed: the attribute of the same name, else the
        value passed, else the constructor's default."""
        given = self.__dict__.get("_options_given", {})
        defaults = option_defaults(type(self))
        out = {}
        for k in self.option_names() + [k for k in given if k not in self.option_names()]:
            if hasattr(self, k):
                out[k] = getattr(self, k)
            elif k in given:
                out[k] = given[k]
            elif k in defaults:
                out[k] = defaults[k]
            else:
                continue
            try:
                json.dumps(out[k])
            except (TypeError, ValueError):
                out[k] = str(out[k])  # (run metadata is JSON: a Path default is written as its text)
        return out

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name!r}>"


def _error_reason(e: BaseException) -> str:
    return f"verifier error: {type(e).__name__}: {e}"[:300]


def _count_call(task) -> None:
    counters = getattr(task, "__dict__", None)
    if counters is not None:
        counters["_verify_calls"] = counters.get("_verify_calls", 0) + 1


def _note_error(task, error: str) -> None:
    counters = getattr(task, "__dict__", None)
    if counters is not None:
        n, first = counters.get("_verifier_errors", (0, None))
        counters["_verifier_errors"] = (n + 1, first or error[:300])


def verify_timeout_of(task) -> float | None:
    """A task's ``verify_timeout`` in seconds (:data:`VERIFY_TIMEOUT_S` for a task without one;
    None: no limit); R3Error for anything but a finite number > 0 or None."""
    value = getattr(task, "verify_timeout", VERIFY_TIMEOUT_S)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not 0 < value < 1e9:
        raise R3Error(f"task {getattr(task, 'name', type(task).__name__)!r}: verify_timeout must be a number of "
                      f"seconds > 0, or None for no limit, got {value!r}")
    return float(value)


def _limited(task, call, what: str = "the verdict") -> tuple[str, Any]:
    """``call()`` under ``task``'s ``verify_timeout``: ``("ok", its value)``, ``("error", the
    exception)``, or ``("timeout", the reason)`` when it ran past the limit, whether the
    interruption came through or the call caught it and returned or raised something else."""
    seconds = verify_timeout_of(task)
    reason = f"{what} took longer than the task's verify_timeout of {seconds or 0:g} s"
    limit = None
    try:
        with time_limit(seconds, lambda: VerifierTimeout(reason)) as limit:
            value = call()
    except VerifierTimeout:
        return "timeout", reason
    except Exception as e:  # noqa: BLE001 -- the caller counts it
        return ("timeout", reason) if limit is not None and limit.expired else ("error", e)
    return ("timeout", reason) if limit.expired else ("ok", value)


def _say_timeout_once(task, what: str, reason: str, outcome: str) -> None:
    """One warning line per task and ``what`` ran out of time (``verify``, ``diagnose``)."""
    counters = getattr(task, "__dict__", None)
    if counters is not None and not counters.get(f"_timeout_said_{what}"):
        counters[f"_timeout_said_{what}"] = True
        print(f"warning: {reason} on a completion: {outcome} (a verifier that needs longer sets verify_timeout on "
              "its task class)", file=sys.stderr, flush=True)


def _note_timeout(task, reason: str, completion_text: str) -> None:
    """Count a verdict that ran out of time as a verifier error; say so at once the first time (the
    step's summary of verifier errors comes only when the step ends); stop the run with one line
    after :data:`TIMEOUTS_IN_A_ROW` in a row, as each costs the whole limit."""
    _note_error(task, f"VerifierTimeout: {reason}")
    _say_timeout_once(task, "verify", reason, "it counts as wrong")
    counters = getattr(task, "__dict__", None)
    if counters is None:
        return
    counters["_timeouts_in_a_row"] = n = counters.get("_timeouts_in_a_row", 0) + 1
    if n >= TIMEOUTS_IN_A_ROW:
        counters["_timeouts_in_a_row"] = 0
        raise R3Error(f"the task's verifier ran out of time on {n} completions in a row ({reason}; the last began "
                      f"{completion_text[:60]!r}); fix the verifier, or give it longer with verify_timeout on "
                      "its task class (None: no limit)")


def _counted_verdict(task, call, completion_text: str) -> tuple[str, Any]:
    """:func:`_limited` for one verdict, counted: a timeout or an exception noted as a verifier
    error, a verdict in time ending a run of timeouts."""
    _count_call(task)
    kind, out = _limited(task, call)
    if kind == "timeout":
        _note_timeout(task, out, completion_text)
        return kind, out
    counters = getattr(task, "__dict__", None)
    if counters is not None:
        counters["_timeouts_in_a_row"] = 0
    if kind == "error":
        _note_error(task, f"{type(out).__name__}: {out}")
    return kind, out


def _as_verdict(out: Any) -> bool | None:
    """A verdict as a bool: a bool (numpy's too) or the integer 0 or 1; None for anything else."""
    if isinstance(out, bool) or type(out).__name__ in ("bool", "bool_"):
        return bool(out)
    if isinstance(out, numbers.Integral) and out in (0, 1):
        return bool(out)
    return None


def stop_strings_of(task) -> tuple[str, ...]:
    """The texts that end a task's answer turns (``Task.stop_strings``; a plug-in without the
    attribute has none)."""
    return tuple(getattr(task, "stop_strings", ()) or ())


def passes(task, example: dict, completion_text: str) -> bool:
    """``task.verify(example, completion_text)`` as r3 reads every verdict: counted, within the
    task's ``verify_timeout``, and it must be a bool (or the integer 0 or 1). Anything else (a
    plug-in's ``verify`` returning ``(False, reason)``, which is truthy, would pay every
    completion) is a wrong answer and a verifier error, so a verifier that never returns a bool
    stops the run (:func:`report_verifier_errors`). So is a ``verify`` of a plug-in's own (a
    duck-typed task's) that raises, as :meth:`Task.verify` counts an exception of ``_check``, and
    one that runs out of time."""
    return _passes(task, example, completion_text)[0]


def _passes(task, example: dict, completion_text: str) -> tuple[bool, str | None]:
    """:func:`passes`, and the reason when the verdict ran out of time (else None)."""
    kind, out = _counted_verdict(task, lambda: task.verify(example, completion_text), completion_text)
    if kind != "ok":  # (a verify() of a plug-in's own that raised, as Task.verify counts _check's)
        return False, out if kind == "timeout" else None
    ok = _as_verdict(out)
    if ok is not None:
        return ok, None
    _note_error(task, f"{getattr(task, 'name', type(task).__name__)}: verify() returned {type(out).__name__} "
                      f"{out!r:.80}, not a bool (a Task subclass implements _check(example, text) -> "
                      "(bool, reason) and leaves verify() to the base class)")
    return False, None


def judge(task, example: dict, completion_text: str) -> tuple[bool, str | None]:
    """:func:`passes` and the verifier's reason for that same verdict: ``(verdict, reason)``. For a
    :class:`Task` whose ``verify`` and ``diagnose`` are the base class's, both come from one
    ``_check`` call, so a verifier that can judge the same text twice otherwise (a judge model, a
    time limit) never logs a reason that contradicts the reward beside it. A Task that overrides
    ``verify`` alone gets "correct" / "wrong" from that one verdict. Other tasks: their
    ``diagnose`` after the verdict (a reason it fails to give, or gives too late, is said as the
    verdict and why), or no reason (None) for a duck-typed task without one."""
    if isinstance(task, Task) and type(task).verify is Task.verify and type(task).diagnose is Task.diagnose:
        kind, out = _counted_verdict(task, lambda: task._verdict(example, completion_text), completion_text)
        if kind != "ok":  # as Task.verify: judged wrong, counted
            return False, _error_reason(VerifierTimeout(out) if kind == "timeout" else out)
        ok, why = out
        return ok, (why or "correct") if ok else why
    ok, timed_out = _passes(task, example, completion_text)
    if timed_out:
        return False, _error_reason(VerifierTimeout(timed_out))
    if isinstance(task, Task) and type(task).diagnose is Task.diagnose and type(task)._check is Task._check:
        return ok, "correct" if ok else "wrong (the task gives no reason)"  # (diagnose() would call verify again)
    diagnose = getattr(task, "diagnose", None)
    if not callable(diagnose):
        return ok, None
    kind, out = _limited(task, lambda: diagnose(example, completion_text), "diagnose()")
    verdict = "correct" if ok else "wrong"
    if kind == "timeout":
        _say_timeout_once(task, "diagnose", out, "the verdict stands, without its reason")
        return ok, f"{verdict} (its reason ran out of time: {out})"
    if kind == "error":
        return ok, f"{verdict} (diagnose() failed: {type(out).__name__}: {out})"[:300]
    return ok, out


def verifier_error_counts(task) -> tuple[int, int, str | None]:
    """``(errors, verdicts, first error)`` since the last look, reset: how many verdicts read
    with :func:`passes` failed (the verifier raised, or returned no bool) out of how many."""
    counters = getattr(task, "__dict__", None)
    if counters is None:
        return 0, 0, None
    n, first = counters.pop("_verifier_errors", (0, None))
    return n, counters.pop("_verify_calls", 0), first


def report_verifier_errors(n: int, calls: int, first: str | None, during: str) -> int:
    """Print one warning line when ``n`` verdicts failed ``during`` something; raise R3Error when
    all of its ``calls`` did (every verdict wrong by error: nothing can be rewarded or measured).
    Returns ``n``."""
    n, calls = int(n), int(calls)
    if n and calls and n >= calls:
        raise R3Error(f"the task's verifier failed on all {calls} completions {during} (first: {first}); "
                      "fix the task: its _check returns (bool, reason) and never raises")
    if n:
        print(f"warning: the task's verifier failed on {n} completion{'s' if n > 1 else ''} {during}; they count "
              f"as wrong (first: {first})", file=sys.stderr, flush=True)
    return n


def warn_verifier_errors(task, during: str) -> int:
    """:func:`report_verifier_errors` for ``task``'s counts since the last check; returns how many
    verdicts failed."""
    n, calls, first = verifier_error_counts(task)
    return report_verifier_errors(n, calls, first, during)


# ---------------------------------------------------------------------------------------
# option validation (accepts CLI strings)
# ---------------------------------------------------------------------------------------
def _init_chain(factory: Any) -> list[inspect.Signature]:
    """The signatures that declare ``factory``'s keyword options: its own, and for a Task
    subclass whose ``__init__`` takes ``**kw``, those of the classes above it (the usual
    ``super().__init__(**kw)``)."""
    if inspect.isclass(factory) and issubclass(factory, Task):
        chain = []
        for cls in factory.__mro__:
            init = cls.__dict__.get("__init__")
            if init is None or cls is object:
                continue
            try:
                sig = inspect.signature(init)
            except (TypeError, ValueError):
                return chain
            chain.append(sig)
            if not any(p.kind is p.VAR_KEYWORD for p in sig.parameters.values()):
                return chain
        return chain
    try:
        return [inspect.signature(factory)]
    except (TypeError, ValueError):
        return []


def option_names(factory: Any) -> list[str] | None:
    """Keyword names a callable accepts, or None if it takes ``**kwargs`` (anything goes: a
    plug-in may pop its own options from them; a name nothing accepts fails when it is built)."""
    try:
        sig = inspect.signature(factory)
    except (TypeError, ValueError):
        return None
    names = []
    for p in sig.parameters.values():
        if p.kind is p.VAR_KEYWORD:
            return None
        if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD):
            names.append(p.name)
    return names


def declared_options(factory: Any) -> list[str]:
    """The keyword options ``factory`` and, through ``**kw``, the classes above it declare by
    name (see :func:`_init_chain`)."""
    names: list[str] = []
    for sig in _init_chain(factory):
        for p in sig.parameters.values():
            if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD) and p.name != "self" and p.name not in names:
                names.append(p.name)
    return names


def option_defaults(factory: Any) -> dict:
    """The declared keyword options' defaults (the nearest class's)."""
    out: dict = {}
    for sig in _init_chain(factory):
        for p in sig.parameters.values():
            if p.default is not p.empty and p.name != "self":
                out.setdefault(p.name, p.default)
    return out


def opt_int(name: str, value: Any, *, lo: int | None = None, hi: int | None = None) -> int:
    if isinstance(value, str):
        try:
            value = int(value.strip())
        except ValueError:
            raise R3Error(f"option {name}: expected an integer, got {value!r}") from None
    if isinstance(value, bool) or not isinstance(value, int):
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        else:
            raise R3Error(f"option {name}: expected an integer, got {value!r}")
    if lo is not None and value < lo:
        raise R3Error(f"option {name}: must be >= {lo}, got {value}")
    if hi is not None and value > hi:
        raise R3Error(f"option {name}: must be <= {hi}, got {value}")
    return value


def opt_float(name: str, value: Any, *, lo: float | None = None, hi: float | None = None) -> float:
    if isinstance(value, str):
        try:
            value = float(value.strip())
        except ValueError:
            raise R3Error(f"option {name}: expected a number, got {value!r}") from None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise R3Error(f"option {name}: expected a number, got {value!r}")
    value = float(value)
    if value != value or (lo is not None and value < lo) or (hi is not None and value > hi):
        lo_s = "" if lo is None else f" >= {lo}"
        hi_s = "" if hi is None else f" <= {hi}"
        raise R3Error(f"option {name}: must be{lo_s}{' and' if lo_s and hi_s else ''}{hi_s}, got {value}")
    return value


def opt_bool(name: str, value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in ("1", "true", "yes", "on"):
        return True
    if isinstance(value, str) and value.strip().lower() in ("0", "false", "no", "off"):
        return False
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    raise R3Error(f"option {name}: expected true or false, got {value!r}")


def opt_str(name: str, value: Any, *, allow_empty: bool = True) -> str:
    if not isinstance(value, str):
        raise R3Error(f"option {name}: expected a string, got {value!r}")
    if not allow_empty and not value.strip():
        raise R3Error(f"option {name}: must not be empty")
    return value


def opt_choice(name: str, value: Any, choices: tuple[str, ...]) -> str:
    if not isinstance(value, str) or value.strip().lower() not in choices:
        raise R3Error(f"option {name}: got {value!r}; valid values: {', '.join(choices)}")
    return value.strip().lower()


def opt_path(name: str, value: Any) -> str | None:
    if value is None:
        return None
    if isinstance(value, os.PathLike):
        value = os.fspath(value)
    value = opt_str(name, value, allow_empty=False)
    if not os.path.isfile(value):
        where = "" if os.path.isabs(value) else f" (relative to the current directory, {os.getcwd()})"
        raise R3Error(f"option {name}: no such file: {value}{where}")
    return value


def check_split(split: Any) -> str:
    if split not in SPLITS:
        raise R3Error(f"unknown split {split!r}; valid splits: {', '.join(SPLITS)}")
    return split


def check_n(n: Any) -> int | None:
    if n is None:
        return None
    return opt_int("n", n, lo=0)


# ---------------------------------------------------------------------------------------
# deterministic splitting and sampling
# ---------------------------------------------------------------------------------------
def leading_reasoning_end(text: str) -> int | None:
    """Where the reasoning block that opens ``text`` (after blanks) with ``<think>`` ends: just
    after its first ``</think>``, where reasoning parsers split it; 0 when ``text`` opens no such
    block; None when it is never closed (the completion holds no answer). The built-in verifiers
    read only what follows it."""
    if not text.lstrip().startswith("<think>"):
        return 0
    close = text.find("</think>")
    return close + len("</think>") if close >= 0 else None


def stable_unit(*parts: Any) -> float:
    """A number in [0, 1) that depends only on ``parts`` (not on PYTHONHASHSEED or platform)."""
    h = hashlib.sha256(repr(parts).encode("utf-8")).digest()
    return int.from_bytes(h[:8], "big") / 2.0**64


def in_test_split(key: Any, *, split_seed: int, test_fraction: float) -> bool:
    """Hash partition: the same key is always on the same side, whatever the sampling seed."""
    return stable_unit("split", split_seed, key) < test_fraction


def shuffled_prefix(items: list, n: int | None, seed: int, tag: str) -> list:
    """A seeded shuffle of ``items`` truncated to ``n`` (prefix-stable: a smaller n gives a prefix
    of a larger n with the same seed)."""
    order = list(range(len(items)))
    random.Random(f"{tag}:{seed}").shuffle(order)
    if n is not None:
        order = order[:n]
    return [items[i] for i in order]


# ---------------------------------------------------------------------------------------
# record files: JSON list, JSONL, parquet
# ---------------------------------------------------------------------------------------
def read_records(path: str) -> Iterator[tuple[str, Any]]:
    """Yield ``(where, record)`` for each record of a data file, ``where`` being e.g.
    ``"data.jsonl, line 7"`` or ``"data.json, record 3"`` for error messages.

    Formats by extension: ``.jsonl``/``.ndjson`` (one JSON object a line, blank lines skipped),
    ``.parquet`` (needs pyarrow), anything else is read as one JSON list (and, if that fails with
    extra data, as JSONL).
    """
    lower = path.lower()
    if lower.endswith(".parquet"):
        yield from _read_parquet(path)
        return
    try:
        with open(path, encoding="utf-8-sig") as f:  # (a byte-order mark, as Windows tools write, is not data)
            text = f.read()
    except (OSError, UnicodeDecodeError) as e:
        raise R3Error(f"{path}: cannot read: {e}") from None
    if lower.endswith((".jsonl", ".ndjson")):
        yield from _read_jsonl(path, text)
        return
    if not text.strip():
        raise R3Error(f"{path}: empty file, no records")
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        if e.msg == "Extra data":  # a .json file that is really JSONL
            yield from _read_jsonl(path, text)
            return
        raise R3Error(f"{path}: not valid JSON (line {e.lineno}, column {e.colno}: {e.msg})") from None
    except RecursionError:
        raise R3Error(f"{path}: JSON nested too deeply") from None
    if isinstance(data, dict) and len(data) == 1 and isinstance(next(iter(data.values())), list):
        data = next(iter(data.values()))  # {"data": [...]}-style wrapper
    if not isinstance(data, list):
        raise R3Error(f"{path}: expected a JSON list of records (or JSONL), got {type(data).__name__}")
    for i, rec in enumerate(data, 1):  # (numbered from 1, as every message about a record)
        yield f"{path}, record {i}", rec


def _read_jsonl(path: str, text: str) -> Iterator[tuple[str, Any]]:
    # (by newline alone: str.splitlines also splits at U+2028, U+2029 and U+0085, which JSON strings hold as they are)
    for lineno, line in enumerate(text.split("\n"), 1):
        if not line.strip():
            continue
        where = f"{path}, line {lineno}"
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise R3Error(f"{where}: not valid JSON ({e.msg}, column {e.colno})") from None
        except RecursionError:
            raise R3Error(f"{where}: JSON nested too deeply") from None
        yield where, rec


def _read_parquet(path: str) -> Iterator[tuple[str, Any]]:
    try:
        import pyarrow.parquet as pq  # optional: not a dependency of r3
    except ImportError:
        raise R3Error(
            f"{path}: reading parquet files needs pyarrow, which r3 does not install: "
            "pip install pyarrow (or convert the file to JSONL)"
        ) from None
    try:
        rows = pq.read_table(path).to_pylist()
    except Exception as e:  # noqa: BLE001 -- pyarrow raises many types
        raise R3Error(f"{path}: cannot read parquet: {e}".splitlines()[0]) from None
    for i, rec in enumerate(rows, 1):  # (numbered from 1, as every message about a record)
        yield f"{path}, row {i}", rec
