"""Countdown: combine 3-4 numbers with + - * / and parentheses to reach a target.

Example dicts: ``{"id": str, "nums": [int, ...], "target": int, "solution": str}`` for generated
problems (``solution`` is what the exhaustive solver found; it always verifies). Rows loaded from a
file keep their fields; ``id`` is the file's own or the row index (an int).

The verifier (:mod:`r3.tasks.countdown_verify`) reads one answer: the content of the last
``<answer>`` block with ``answer_tags=True`` (the default), or the final equation of the completion
with ``answer_tags=False``. It is correct iff it is ``expression`` or ``expression = value`` that
uses each number exactly once with only the task's operators (``ops``) and parentheses, evaluates
exactly to the target, and whose written value, if any, is the target. The prompts ask for exactly
that format: the ``<answer>`` tags are requested only when the verifier reads them.

With tags, an answer turn (first attempt, retry) ends at its first ``</answer>`` (the task's stop
string; ``stop_at_answer=False`` lets it run on), so the block read is the first one written.
Without tags there is no such point: a later equation would replace the answer.
"""

from __future__ import annotations

import functools
import random
import reprlib
import sys
from math import gcd
from typing import Any

from r3.errors import R3Error
from r3.tasks.base import (
    Task,
    check_n,
    check_split,
    in_test_split,
    opt_bool,
    opt_choice,
    opt_float,
    opt_int,
    opt_path,
    opt_str,
    read_records,
    shuffled_prefix,
)
from r3.tasks.countdown_verify import (  # noqa: F401 -- re-exported: the verifier's public names
    MAX_ANSWER_CHARS,
    check_answer,
    check_completion,
    extract_answer,
    final_equation,
)

MAX_NUMS = 6  # the exhaustive solver is exponential in the count: ~0.5 ms for 4 numbers, ~0.3 s for 6

REFLECTION_PROMPT = (
    "You tried solving the problem and got the wrong answer. Reflect on what went wrong and write "
    "a short explanation that will help you do better next time."
)
RETRY_PROMPT = (
    "Now try again. Use each number exactly once and give the final equation inside "
    "<answer> </answer> tags."
)
RETRY_PROMPT_PLAIN = "Now try again. Use each number exactly once and end with the final equation."
PROMPT_TEMPLATE = (
    "Using the numbers {nums}, create an equation that equals {target}. You can use the arithmetic "
    "operations {ops}, and each number must be used exactly once. Think briefly, then give the "
    "final equation inside <answer> </answer> tags."
)
PROMPT_TEMPLATE_PLAIN = (
    "Using the numbers {nums}, create an equation that equals {target}. You can use the arithmetic "
    "operations {ops}, and each number must be used exactly once. Think briefly, then end with the "
    "final equation."
)
# the format example of the default templates: numbers [1, 2, 3] and a target each op set reaches
_EXAMPLE_NUMS = [1, 2, 3]
_EXAMPLE_TARGETS = (1, 2, 4, 5, 6, 7, 9, 0)

# difficulty presets; explicit knobs override them
PRESETS = {
    # TinyZero-like: 3-4 numbers in 1..99, target in 1..99, all four operations
    "standard": dict(min_count=3, max_count=4, min_num=1, max_num=99, min_target=1, max_target=99,
                     ops="+-*/", train_size=10000, test_size=1000),
    # for tiny models: 3 numbers in 1..20 and a target in 1..50 reachable with + and - alone
    # (about 5000 distinct train and 560 distinct test problems exist)
    "easy": dict(min_count=3, max_count=3, min_num=1, max_num=20, min_target=1, max_target=50,
                 ops="+-", train_size=2000, test_size=200),
}

# ---------------------------------------------------------------------------------------
# solver
# ---------------------------------------------------------------------------------------
# Exact rationals for the solver: an int, or a tuple (numerator, denominator) in lowest terms with
# denominator > 1. Much faster than fractions.Fraction (whose hash is a modular inverse) and just
# as exact; the verifier itself uses Fraction.
def _mk(n: int, d: int):
    if d < 0:
        n, d = -n, -d
    g = gcd(n, d)
    if g != 1:
        n //= g
        d //= g
    return n if d == 1 else (n, d)


def _add(a, b):
    if type(a) is int and type(b) is int:
        return a + b
    an, ad = (a, 1) if type(a) is int else a
    bn, bd = (b, 1) if type(b) is int else b
    return _mk(an * bd + bn * ad, ad * bd)


def _sub(a, b):
    if type(a) is int and type(b) is int:
        return a - b
    an, ad = (a, 1) if type(a) is int else a
    bn, bd = (b, 1) if type(b) is int else b
    return _mk(an * bd - bn * ad, ad * bd)


def _mul(a, b):
    if type(a) is int and type(b) is int:
        return a * b
    an, ad = (a, 1) if type(a) is int else a
    bn, bd = (b, 1) if type(b) is int else b
    return _mk(an * bn, ad * bd)


def _div(a, b):
    """a / b for b != 0."""
    an, ad = (a, 1) if type(a) is int else a
    bn, bd = (b, 1) if type(b) is int else b
    return _mk(an * bd, ad * bn)


def _float(v) -> float:
    return float(v) if type(v) is int else v[0] / v[1]


@functools.lru_cache(maxsize=4096)
def _table(nums: tuple[int, ...], ops: str) -> tuple[dict, ...]:
    """Dynamic programming over the proper subsets (bit masks of positions in ``nums``): for each,
    every exactly-reachable value with a back-pointer ``(op, left_mask, left_value, right_mask,
    right_value)`` to one way of making it (None for a single number). The full set is left empty:
    :func:`_candidate_targets` and :func:`solve` handle the last step."""
    k = len(nums)
    full = (1 << k) - 1
    table: list[dict] = [{} for _ in range(1 << k)]
    for i, v in enumerate(nums):
        table[1 << i][v] = None
    add, sub_, mul, div = ("+" in ops), ("-" in ops), ("*" in ops), ("/" in ops)
    for mask in range(1, full):
        if mask & (mask - 1) == 0:
            continue
        out = table[mask]
        for s, o, first in _splits(mask):
            for a in table[s]:
                for b in table[o]:
                    if first:
                        if add:
                            v = _add(a, b)
                            if v not in out:
                                out[v] = ("+", s, a, o, b)
                        if mul:
                            v = _mul(a, b)
                            if v not in out:
                                out[v] = ("*", s, a, o, b)
                    if sub_:
                        v = _sub(a, b)
                        if v not in out:
                            out[v] = ("-", s, a, o, b)
                    if div and b != 0:
                        v = _div(a, b)
                        if v not in out:
                            out[v] = ("/", s, a, o, b)
    return tuple(table)


def _splits(mask: int):
    """(s, o, first) for every ordered split of ``mask`` into two non-empty parts; ``first`` is
    True for one of the two orders (for commutative operations)."""
    s = (mask - 1) & mask
    while s:
        o = mask ^ s
        yield s, o, s < o
        s = (s - 1) & mask


def _candidate_targets(nums: tuple[int, ...], ops: str, lo: int, hi: int) -> dict[int, tuple]:
    """Integers in [lo, hi] that the full set may reach, each with a witness last step
    ``(op, left_mask, left_value, right_mask, right_value)``, found with float arithmetic on the
    exact sub-tables (fast). Floats are only a pre-filter: :func:`_confirm` checks a witness exactly,
    and :func:`solve` searches exactly when it does not hold."""
    k = len(nums)
    if k == 1:
        return {nums[0]: None} if lo <= nums[0] <= hi else {}
    table = _table(nums, ops)
    exact = [list(t) for t in table]
    floats = [[_float(v) for v in t] for t in exact]
    full = (1 << k) - 1
    found: dict[int, tuple] = {}
    add, sub_, mul, div = ("+" in ops), ("-" in ops), ("*" in ops), ("/" in ops)
    tol = 1e-6
    # past 2**52 floats no longer tell integers apart: such values are computed exactly (only a
    # range that reaches near there can hold one)
    big = max(hi, -lo) >= 2**51
    for s, o, first in _splits(full):
        fo = floats[o]
        for i, a in enumerate(floats[s]):
            for j, b in enumerate(fo):
                for op, v in (
                    ("+", a + b if first and add else None),
                    ("*", a * b if first and mul else None),
                    ("-", a - b if sub_ else None),
                    ("/", a / b if div and b != 0 else None),
                ):
                    if big and v is not None and abs(v) >= 2**52:
                        e = _apply(op, exact[s][i], exact[o][j])
                        if type(e) is int and lo <= e <= hi and e not in found:
                            found[e] = (op, s, exact[s][i], o, exact[o][j])
                        continue
                    if v is not None and lo - tol <= v <= hi + tol:
                        r = round(v)
                        if abs(v - r) <= tol and r not in found:
                            found[r] = (op, s, exact[s][i], o, exact[o][j])
    return found


def _apply(op, a, b):
    if op == "+":
        return _add(a, b)
    if op == "-":
        return _sub(a, b)
    if op == "*":
        return _mul(a, b)
    return None if b == 0 else _div(a, b)


_PREC = {"+": 1, "-": 1, "*": 2, "/": 2}


def _render(table, nums, mask, value) -> tuple[str, int]:
    ptr = table[mask][value]
    if ptr is None:
        return str(nums[mask.bit_length() - 1]), 3
    return _render_op(table, nums, *ptr)


def _render_op(table, nums, op, lm, lv, rm, rv) -> tuple[str, int]:
    p = _PREC[op]
    ls, lp = _render(table, nums, lm, lv)
    rs, rp = _render(table, nums, rm, rv)
    if lp < p:
        ls = f"({ls})"
    if rp < p or (rp == p and op in "-/"):
        rs = f"({rs})"
    return f"{ls} {op} {rs}", p


def solve(nums: list[int], target: int, ops: str = "+-*/") -> str | None:
    """An expression using every number of ``nums`` exactly once and only the operations in
    ``ops`` that evaluates exactly to ``target``, or None if there is none. Exhaustive and exact:
    the sub-tables of all proper subsets, then a meet-in-the-middle search for the last step."""
    nums_t = tuple(sorted(int(x) for x in nums))
    if not nums_t or len(nums_t) > MAX_NUMS:
        raise R3Error(f"solve: need 1 to {MAX_NUMS} numbers, got {len(nums_t)}")
    if len(nums_t) == 1:
        return str(nums_t[0]) if nums_t[0] == target else None
    table = _table(nums_t, ops)
    t = target
    full = (1 << len(nums_t)) - 1
    for s, o, first in _splits(full):
        right = table[o]
        for a in table[s]:
            # the b that would make "a op b" equal t, for each operation
            if first and "+" in ops and _sub(t, a) in right:
                return _render_op(table, nums_t, "+", s, a, o, _sub(t, a))[0]
            if first and "*" in ops:
                if a != 0 and _div(t, a) in right:
                    return _render_op(table, nums_t, "*", s, a, o, _div(t, a))[0]
                if a == 0 and t == 0:
                    return _render_op(table, nums_t, "*", s, a, o, next(iter(right)))[0]
            if "-" in ops and _sub(a, t) in right:
                return _render_op(table, nums_t, "-", s, a, o, _sub(a, t))[0]
            if "/" in ops:
                if t != 0 and a != 0 and _div(a, t) in right:
                    return _render_op(table, nums_t, "/", s, a, o, _div(a, t))[0]
                if t == 0 and a == 0:
                    nz = next((b for b in right if b != 0), None)
                    if nz is not None:
                        return _render_op(table, nums_t, "/", s, a, o, nz)[0]
    return None


def reachable_targets(nums: list[int], ops: str = "+-*/", lo: int | None = None,
                      hi: int | None = None) -> list[int]:
    """All integers in [lo, hi] (default: unbounded) reachable from ``nums`` (each used exactly
    once) with ``ops``, each confirmed by the exact solver."""
    nums_t = tuple(sorted(int(x) for x in nums))
    bound = 1
    for x in nums_t:
        bound *= max(x, 2)
    lo = -bound if lo is None else lo
    hi = bound if hi is None else hi
    found = _candidate_targets(nums_t, ops, lo, hi)
    return sorted(t for t, w in found.items() if _solve_with(nums_t, t, ops, w) is not None)


def _solve_with(nums: tuple[int, ...], target: int, ops: str, witness) -> str | None:
    """Render the witness last step if it holds exactly, else search exhaustively."""
    if witness is not None and _apply(witness[0], witness[2], witness[4]) == target:
        return _render_op(_table(nums, ops), nums, *witness)[0]
    return solve(nums, target, ops)


# ---------------------------------------------------------------------------------------
# the task
# ---------------------------------------------------------------------------------------
class CountdownTask(Task):
    """Countdown arithmetic puzzles, generated locally (default) or loaded from a file.

    Generated problems are guaranteed solvable (the stored ``solution`` verifies). The train/test
    partition is a hash of the sorted numbers (with ``split_seed``), so the two splits never share a
    multiset of numbers, whatever sampling ``seed`` each is drawn with. With ``data_path`` the file's
    rows are partitioned by a hash of (sorted numbers, target), unless ``test_data_path`` gives the
    test split explicitly.
    """

    name = "countdown"
    default_reflection_prompt = REFLECTION_PROMPT
    default_retry_prompt = RETRY_PROMPT

    def __init__(
        self,
        *,
        difficulty: str = "standard",
        min_count: int | None = None,
        max_count: int | None = None,
        min_num: int | None = None,
        max_num: int | None = None,
        min_target: int | None = None,
        max_target: int | None = None,
        ops: str | None = None,
        data_path: str | None = None,
        test_data_path: str | None = None,
        test_fraction: float = 0.1,
        split_seed: int = 0,
        train_size: int | None = None,
        test_size: int | None = None,
        prompt_template: str | None = None,
        format_example: bool = True,
        answer_tags: bool = True,
        stop_at_answer: bool = True,
        system_prompt: str | None = None,
        reflection_prompt: str | None = None,
        retry_prompt: str | None = None,
    ):
        super().__init__(reflection_prompt=reflection_prompt, retry_prompt=retry_prompt)
        self.difficulty = opt_choice("difficulty", difficulty, tuple(PRESETS))
        p = dict(PRESETS[self.difficulty])
        given = dict(min_count=min_count, max_count=max_count, min_num=min_num, max_num=max_num,
                     min_target=min_target, max_target=max_target, train_size=train_size,
                     test_size=test_size)
        for k, v in given.items():
            if v is not None:
                p[k] = opt_int(k, v)
        if ops is not None:
            p["ops"] = opt_str("ops", ops)
        self.min_count = opt_int("min_count", p["min_count"], lo=2, hi=MAX_NUMS)
        self.max_count = opt_int("max_count", p["max_count"], lo=self.min_count, hi=MAX_NUMS)
        self.min_num = opt_int("min_num", p["min_num"], lo=0)
        self.max_num = opt_int("max_num", p["max_num"], lo=self.min_num)
        self.min_target = opt_int("min_target", p["min_target"])
        self.max_target = opt_int("max_target", p["max_target"], lo=self.min_target)
        self.ops = "".join(c for c in "+-*/" if c in p["ops"])
        if not self.ops or set(p["ops"]) - set("+-*/"):
            raise R3Error(f"option ops: a non-empty subset of '+-*/', got {p['ops']!r}")
        self.data_path = opt_path("data_path", data_path)
        self.test_data_path = opt_path("test_data_path", test_data_path)
        if self.test_data_path and not self.data_path:
            raise R3Error("option test_data_path needs data_path as well")
        self.test_fraction = opt_float("test_fraction", test_fraction, lo=0.0, hi=1.0)
        self.split_seed = opt_int("split_seed", split_seed)
        self.train_size = opt_int("train_size", p["train_size"], lo=0)
        self.test_size = opt_int("test_size", p["test_size"], lo=0)
        self.format_example = opt_bool("format_example", format_example)
        # False: the final equation of the completion is the answer (no <answer> tags).
        self.answer_tags = opt_bool("answer_tags", answer_tags)
        # With tags: an answer turn ends at its first </answer> (stop_strings).
        self.stop_at_answer = opt_bool("stop_at_answer", stop_at_answer)
        default_template = PROMPT_TEMPLATE if self.answer_tags else PROMPT_TEMPLATE_PLAIN
        self.prompt_template = default_template if prompt_template is None else opt_str(
            "prompt_template", prompt_template, allow_empty=False)
        for ph in ("{nums}", "{target}"):
            if ph not in self.prompt_template:
                raise R3Error(f"option prompt_template: must contain the placeholder {ph}")
        if retry_prompt is None:
            self.retry_prompt = RETRY_PROMPT if self.answer_tags else RETRY_PROMPT_PLAIN
        self.system_prompt = None if system_prompt is None else opt_str("system_prompt", system_prompt)
        self.synthetic = self.data_path is None
        self._loaded: dict[str, list[dict]] | None = None

    @property
    def stop_strings(self) -> tuple[str, ...]:
        return ("</answer>",) if self.answer_tags and self.stop_at_answer else ()

    # ---- data ---------------------------------------------------------------------------
    def examples(self, split: str = "train", n: int | None = None, seed: int = 0) -> list[dict]:
        """``n`` problems of ``split`` (default: ``train_size``/``test_size`` when generating, the
        whole split when loading), deterministic in ``seed``; a smaller ``n`` gives a prefix."""
        split = check_split(split)
        n = check_n(n)
        seed = opt_int("seed", seed)
        if self.data_path is not None:
            rows = self._load()[split]
            return [dict(r, nums=list(r["nums"])) for r in shuffled_prefix(rows, n, seed, f"countdown-{split}")]
        if n is None:  # (the whole test split of test_fraction 0 is none: a run need not hold any out)
            n = self.train_size if split == "train" else 0 if self.test_fraction == 0.0 else self.test_size
        return self._generate(split, n, seed)

    def _generate(self, split: str, n: int, seed: int) -> list[dict]:
        rng = random.Random(f"countdown:{split}:{seed}")
        want_test = split == "test"
        if want_test and self.test_fraction == 0.0 or not want_test and self.test_fraction == 1.0:
            if n:
                raise R3Error(f"test_fraction={self.test_fraction} leaves the {split} split empty")
            return []
        out, seen = [], set()
        share = self.test_fraction if want_test else 1.0 - self.test_fraction
        tries, max_tries = 0, int((200 * n + 2000) / max(share, 1e-3))
        while len(out) < n:
            tries += 1
            if tries > max_tries:
                raise R3Error(
                    f"countdown: found only {len(out)} distinct solvable {split} problems of the {n} "
                    "asked for; widen the number/target ranges or ask for fewer"
                )
            count = rng.randint(self.min_count, self.max_count)
            nums = [rng.randint(self.min_num, self.max_num) for _ in range(count)]
            key = tuple(sorted(nums))
            if self._key_on_test_side(key) != want_test:
                continue
            found = _candidate_targets(key, self.ops, self.min_target, self.max_target)
            candidates = sorted(t for t in found if (key, t) not in seen)
            rng.shuffle(candidates)
            for target in candidates:  # almost always the first one: floats are only a pre-filter
                solution = _solve_with(key, target, self.ops, found[target])
                if solution is not None:
                    break
            else:
                continue
            seen.add((key, target))
            out.append({
                "id": f"countdown-{split}-{seed}-{len(out)}",
                "nums": nums,
                "target": target,
                "solution": solution,
            })
        return out

    def _load(self) -> dict[str, list[dict]]:
        if self._loaded is None:
            if self.test_data_path:
                self._loaded = {"train": load_file(self.data_path, self.ops),
                                "test": load_file(self.test_data_path, self.ops)}
            else:
                split = {"train": [], "test": []}
                for r in load_file(self.data_path, self.ops):
                    key = (tuple(sorted(r["nums"])), r["target"])
                    split["test" if self._key_on_test_side(key) else "train"].append(r)
                self._loaded = split
        return self._loaded

    def check_example(self, where: str, example: Any) -> None:
        validate_record(where, example, 0)

    def on_test_side(self, example: dict) -> bool | None:
        """Whether ``example`` is a test-split problem, for generated problems: by the split rule
        (its numbers), whatever seed or ``n`` drew it, as ``examples("test")`` lists only one
        seed's first ``test_size``. None where the split is a file's, listed whole."""
        return None if self.data_path is not None else self._key_on_test_side(tuple(sorted(example["nums"])))

    def _key_on_test_side(self, key: tuple) -> bool:
        """The split rule: a problem's key (its sorted numbers; in a data file, with its target)."""
        return in_test_split(key, split_seed=self.split_seed, test_fraction=self.test_fraction)

    # ---- prompts ------------------------------------------------------------------------
    def ops_text(self) -> str:
        """The allowed operations in words: ``+ and -`` or ``+, -, * and /``."""
        ops = list(self.ops)
        return ops[0] if len(ops) == 1 else ", ".join(ops[:-1]) + " and " + ops[-1]

    def format_example_text(self) -> str:
        """One worked example in the answer format the verifier reads, over the task's operations
        (the prompt's own example must be a correct answer)."""
        if self.ops == "+-*/":
            expr, target = "(1 + 2) / 3", 1
        else:
            expr, target = next((e, t) for t in _EXAMPLE_TARGETS
                                if (e := solve(_EXAMPLE_NUMS, t, self.ops)) is not None)
        head = f" For example, with the numbers {_EXAMPLE_NUMS} and the target {target}, "
        if self.answer_tags:
            return head + f"the final answer is <answer> {expr} </answer>."
        return head + f"the answer ends with the equation {expr} = {target}."

    def prompt(self, example: dict) -> str:
        text = (self.prompt_template.replace("{nums}", str(list(example["nums"])))
                .replace("{target}", str(example["target"])).replace("{ops}", self.ops_text()))
        if self.format_example and self.prompt_template in (PROMPT_TEMPLATE, PROMPT_TEMPLATE_PLAIN):
            text += self.format_example_text()
        return text

    def messages(self, example: dict) -> list[dict]:
        msgs = []
        if self.system_prompt:
            msgs.append({"role": "system", "content": self.system_prompt})
        msgs.append({"role": "user", "content": self.prompt(example)})
        return msgs

    # ---- verifier -----------------------------------------------------------------------
    def _check(self, example: dict, completion_text: str) -> tuple[bool, str]:
        nums = [_strict_int(x) for x in example["nums"]]
        return check_completion(completion_text, nums, _strict_int(example["target"]), tags=self.answer_tags,
                                ops=self.ops)


def _strict_int(v: Any) -> int:
    """An int from an int or an integral float; anything else (bools included) raises."""
    if isinstance(v, float) and v.is_integer():
        return int(v)
    if type(v) is not int:
        raise TypeError(f"expected an integer, got {v!r}")
    return v


_SHORT = reprlib.Repr()  # (a value in a one-line error: a 1,000-number list is not printed whole)
_SHORT.maxlist = _SHORT.maxtuple = 12
_SHORT.maxstring = _SHORT.maxother = 60


def validate_record(where: str, rec: Any, index: int) -> dict:
    """One Countdown row with integer ``target`` and ``nums`` (integral floats become ints) and an
    ``id`` (the index when the record has none). Raises R3Error naming ``where`` and the field."""
    if not isinstance(rec, dict):
        raise R3Error(f"{where}: expected an object with fields target and nums, got {type(rec).__name__}")
    for field in ("target", "nums"):
        if field not in rec:
            raise R3Error(f"{where}: missing field {field!r}")
    target, nums = rec["target"], rec["nums"]
    if isinstance(target, float) and target.is_integer():
        target = int(target)
    if type(target) is not int:
        raise R3Error(f"{where}: field 'target' must be an integer, got {_SHORT.repr(target)}")
    if not isinstance(nums, (list, tuple)) or not 1 <= len(nums) <= MAX_NUMS:
        raise R3Error(f"{where}: field 'nums' must be a list of 1 to {MAX_NUMS} integers, got {_SHORT.repr(nums)}"
                      + (f" ({len(nums)} items)" if isinstance(nums, (list, tuple)) else ""))
    clean = []
    for x in nums:
        if isinstance(x, float) and x.is_integer():
            x = int(x)
        if type(x) is not int or x < 0:
            raise R3Error(f"{where}: field 'nums' must hold non-negative integers, got {_SHORT.repr(x)}")
        clean.append(x)
    row = dict(rec)
    row["nums"], row["target"] = clean, target
    row.setdefault("id", index)
    return row


SOLVABLE_SAMPLE = 64  # records of a data file solved at load, spread over it (~0.5 ms each with 4 numbers, ~10 ms with 5)
SOLVABLE_SAMPLE_SIX = 4  # of them, at most this many with 6 numbers (~0.3 s each)


def load_file(path: str, ops: str = "+-*/") -> list[dict]:
    """Countdown rows from a JSON list / JSONL / parquet file with fields ``target`` and ``nums``
    (the public Countdown-Tasks export); extra fields are kept. A sample of the rows spread over
    the file is solved with ``ops`` (:func:`check_solvable`)."""
    rows, spread, every = [], {}, 1  # (spread: where of every `every`-th row, 64-128 of them at most)
    for i, (where, rec) in enumerate(read_records(path)):
        rows.append(validate_record(where, rec, i))
        if i % every == 0:
            spread[i] = where
            if len(spread) > 2 * SOLVABLE_SAMPLE:
                every *= 2
                spread = {j: w for j, w in spread.items() if j % every == 0}
    if not rows:
        raise R3Error(f"{path}: no records")
    check_solvable(path, [(w, rows[j]) for j, w in spread.items()], ops)
    return rows


def check_solvable(path: str, read: list[tuple[str, dict]], ops: str) -> int:
    """Solve up to :data:`SOLVABLE_SAMPLE` of ``read`` (``(where, row)`` in file order), spread
    evenly over it: a problem with no solution can never be rewarded, and a file made for other
    operations than the task's ``ops`` is mostly such problems. Raises R3Error when none of them
    has a solution, prints one warning line when some have none; returns how many have none.
    (Every row would cost minutes on the public 490k-row file.)"""
    k = min(SOLVABLE_SAMPLE, len(read))
    picked = [read[i * len(read) // k] for i in range(k)]
    checked, six = [], 0
    for where, row in picked:
        six += len(row["nums"]) == MAX_NUMS
        if len(row["nums"]) < MAX_NUMS or six <= SOLVABLE_SAMPLE_SIX:
            checked.append((where, row))
    bad = [(where, row) for where, row in checked if solve(row["nums"], row["target"], ops) is None]
    if not bad:
        return 0
    where, row = bad[0]
    eg = f"e.g. {where.removeprefix(f'{path}, ')}: {row['target']} from {row['nums']}"
    if len(bad) == len(checked):
        raise R3Error(f"{path}: none of the {len(checked)} records checked across the file can be solved with the "
                      f"operations {ops!r} ({eg}); is the file made for other operations (task option ops)?")
    print(f"warning: {path}: {len(bad)} of the {len(checked)} records checked across the file cannot be solved "
          f"with the operations {ops!r} ({eg}); such problems can never be rewarded", file=sys.stderr, flush=True)
    return len(bad)
