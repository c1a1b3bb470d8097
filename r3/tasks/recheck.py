"""Second, independent implementations of the built-in verifiers' answer rules.

A verifier that pays for a wrong answer trains the model to answer wrongly, so every reward r3
hands out can be re-checked by code that shares no parsing with the verifier: ``python -m
r3.audit`` re-checks a run's rewarded samples with it, and ``benchmarks/fuzz_verifiers.py``
compares the two on generated adversarial completions.

* Countdown: the same rule as :mod:`r3.tasks.countdown_verify`, read with a regex tokenizer and
  evaluated by a recursive-descent parser over :class:`fractions.Fraction` (no :mod:`ast`).
* Function calling: the same rule as :mod:`r3.tasks.function_calling`, with the top-level
  structures found by a character-by-character JSON lexer (the verifier walks a regex's matches).

These are written for clarity, not speed: use them to audit, not to reward.
"""

from __future__ import annotations

import json
import re
import unicodedata
from collections import Counter
from fractions import Fraction
from typing import Any

__all__ = ["has_recheck", "recheck", "recheck_countdown", "recheck_function_calling"]


# ---------------------------------------------------------------------------------------
# Countdown
# ---------------------------------------------------------------------------------------
_CD_OP_WORDS = {
    "mod", "modulo", "modulus", "log", "logs", "logarithm", "ln", "lg", "exp", "sqrt", "cbrt", "root",
    "roots", "radical", "sin", "cos", "tan", "abs", "absolute", "factorial", "squared", "cubed",
    "square", "cube", "power", "powers", "pow", "exponent", "exponents", "percent", "percentage",
    "negative", "minus", "plus", "times", "divided", "multiplied", "over", "x", "half", "twice",
    "double", "triple", "inverse", "reciprocal", "floor", "ceil", "ceiling", "round", "rounded",
    "approximately", "approx", "roughly",
}
_CD_OP_WORDS |= {"multiple", "multiples", "factor", "factors", "product", "quotient", "remainder", "fraction"}
_CD_NOT = {"not", "no", "never", "nor", "neither", "cannot", "isn't", "wasn't", "aren't", "weren't", "doesn't",
           "don't", "didn't", "can't", "won't", "wouldn't", "shouldn't", "couldn't", "isnt", "wasnt", "doesnt",
           "dont", "didnt", "cant", "wont"}
_CD_LINKS = {"is", "was", "equals", "equal", "equaling", "equalling", "to", "gives", "give", "giving", "makes",
             "make", "making", "yields", "yield", "results", "result", "resulting", "in", "which", "that", "would",
             "will", "be", "get", "gets", "we", "you", "it", "so", "then", "this", "the", "a", "becomes", "become",
             "comes", "out", "as", "sum", "total", "answer", "value", "of"}
_CD_BAD_ASCII = "^%|~\\[]{}<>"
_CD_PUNCT = ".,;:!?\"'\u201c\u201d\u2018\u2019\u00ab\u00bb"


class _Bad(Exception):
    pass


def _letter(c: str) -> bool:
    return c == "_" or c.isalpha()


def _arith(c: str) -> bool:
    return c in "0123456789+-*/()= \t"


class _Parser:
    """expr := term (('+'|'-') term)* ; term := atom (('*'|'/') atom)* ; atom := NUMBER | '(' expr ')'."""

    def __init__(self, s: str, ops: str):
        self.toks = re.findall(r"\d+|\S", s)
        self.i, self.ops, self.numbers = 0, ops, []

    def peek(self) -> str | None:
        return self.toks[self.i] if self.i < len(self.toks) else None

    def take(self) -> str:
        t = self.peek()
        if t is None:
            raise _Bad("unexpected end")
        self.i += 1
        return t

    def expr(self) -> Fraction:
        v = self.term()
        while self.peek() in ("+", "-"):
            op = self.take()
            if op not in self.ops:
                raise _Bad(f"operator {op} not allowed")
            w = self.term()
            v = v + w if op == "+" else v - w
        return v

    def term(self) -> Fraction:
        v = self.atom()
        while self.peek() in ("*", "/"):
            op = self.take()
            if op not in self.ops:
                raise _Bad(f"operator {op} not allowed")
            w = self.atom()
            if op == "*":
                v = v * w
            elif w == 0:
                raise _Bad("division by zero")
            else:
                v = v / w
        return v

    def atom(self) -> Fraction:
        t = self.take()
        if t == "(":
            v = self.expr()
            if self.take() != ")":
                raise _Bad("unbalanced")
            return v
        if not (t.isascii() and t.isdigit()) or (len(t) > 1 and t[0] == "0"):
            raise _Bad(f"not a number: {t}")
        self.numbers.append(int(t))
        return Fraction(int(t))


def _cd_check_equation(answer: str, nums: list[int], target: int, ops: str) -> tuple[bool, str]:
    flat = " ".join(answer.split())
    if not flat:
        return False, "empty"
    if len(flat) > 256:
        return False, "too long"
    if any(c not in "0123456789+-*/()= " for c in flat):
        return False, "bad character"
    sides = flat.split("=")
    if len(sides) > 2:
        return False, "chained"
    lhs = sides[0].strip()
    if len(sides) == 2:
        rhs = sides[1].strip()
        digits = rhs[1:] if rhs.startswith("-") else rhs
        if not digits.isdigit() or (len(digits) > 1 and digits[0] == "0") or rhs == "-0":
            return False, "the written value is not a plain integer"
        if int(rhs) != target:
            return False, "the written value is not the target"
    p = _Parser(lhs, ops)
    try:
        value = p.expr()
        if p.peek() is not None:
            raise _Bad("trailing tokens")
    except _Bad as e:
        return False, str(e)
    except RecursionError:
        return False, "too deep"
    if Counter(p.numbers) != Counter(nums):
        return False, "wrong numbers"
    if value != target:
        return False, "wrong value"
    return True, "correct"


def _cd_final_run(text: str) -> tuple[int, int] | None:
    """Start and end of the last maximal arithmetic run holding a digit and an operator or '='."""
    best, i, n = None, 0, len(text)
    while i < n:
        if not _arith(text[i]):
            i += 1
            continue
        j = i
        while j < n and _arith(text[j]):
            j += 1
        seg = text[i:j]
        if any(c.isdigit() for c in seg) and any(c in "+-*/=" for c in seg):
            best = (i, j)
        i = j
    return best


def _cd_read_word(text: str, i: int, step: int) -> tuple[str | None, int]:
    """(word, index after it) for the word whose first character in reading order is at ``i``:
    letters and apostrophes, starting with a letter; (None, i) when there is none or it is longer
    than 32 characters."""
    if not (0 <= i < len(text) and _letter(text[i])):
        return None, i
    chars = []
    while 0 <= i < len(text) and (_letter(text[i]) or text[i] in "'\u2019"):
        chars.append(text[i])
        i += step
        if len(chars) > 32:
            return None, i
    w = "".join(chars if step > 0 else reversed(chars))
    return w.strip("'\u2019").replace("\u2019", "'").lower(), i


def _cd_words(text: str, i: int, step: int) -> list[str]:
    words: list[str] = []
    while len(words) < 3:
        while 0 <= i < len(text) and text[i] in " \t":
            i += step
        w, i = _cd_read_word(text, i, step)
        if w is None:
            break
        words.append(w)
    return words


def _cd_result_words(text: str, i: int) -> tuple[str | None, bool]:
    """(number, negated) of a result written after an expression, else (None, False)."""
    negated = False
    for links in range(6):
        while i < len(text) and text[i] in " \t,":
            i += 1
        k = i + 1 if text[i:i + 1] == "-" else i
        e = k
        while e < len(text) and text[e].isnumeric():
            e += 1
        if e > k:
            number = text[i:e]
            after = text[e:e + 2]
            bad = not all(c in "-0123456789" for c in number)
            if after:
                c = after[0]
                bad |= c.isalnum() or c in "%^" or unicodedata.category(c) == "Sm"
                bad |= c in ".," and len(after) > 1 and after[1].isdigit()
            return ("not an integer" if bad else number), negated
        if links == 5:
            break
        w, j = _cd_read_word(text, i, 1)
        if w is None or (w not in _CD_LINKS and w not in _CD_NOT):
            break
        negated = negated or w in _CD_NOT
        i = j
    return None, False


def _cd_side_problem(text: str, k: int, glued: bool, right: bool, has_result: bool) -> str | None:
    if not 0 <= k < len(text) or text[k].isspace():
        return None
    c = text[k]
    if _letter(c):
        return "glued letters" if glued else None
    if c.isnumeric():
        return "foreign number"
    if c in _CD_BAD_ASCII or unicodedata.category(c) == "Sm" or c == "\u00b7":
        return "operator symbol"
    if c == "!" and (glued or right) and not (right and has_result):
        return "factorial"
    if c in ".," and glued and k + 1 < len(text) and text[k + 1].isdigit():
        return "decimal"
    j = k + (1 if right else -1)
    while 0 <= j < len(text) and text[j] in " \t":
        j += 1 if right else -1
    far = text[j] if 0 <= j < len(text) else ""
    if not right and unicodedata.category(c) == "Pd" and (glued or not _letter(far)):
        return "dash"
    if c not in _CD_PUNCT and far.isdigit():
        return "symbol before a number"
    return None


def recheck_countdown(text: Any, nums: list[int], target: int, *, tags: bool = True,
                      ops: str = "+-*/") -> tuple[bool, str]:
    """The Countdown rule (see :mod:`r3.tasks.countdown_verify`), implemented separately."""
    if not isinstance(text, str) or len(text) > 100_000:
        return False, "not a string or too long"
    if tags:
        chunks = text.split("</answer>")
        if len(chunks) < 2:
            return False, "no answer block"
        head = chunks[-2]
        if "<answer>" not in head:
            # the last </answer> closes a block opened before an earlier </answer>: its content
            # holds a tag, which is never a valid answer
            return False, "no answer block"
        return _cd_check_equation(head.split("<answer>")[-1], nums, target, ops)
    text = text.replace("<answer>", "\n").replace("</answer>", "\n")
    span = _cd_final_run(text)
    if span is None:
        return False, "no equation"
    start, end = span
    body = text[start:end]
    a = start + len(body) - len(body.lstrip(" \t"))
    b = start + len(body.rstrip(" \t"))
    # Markdown bold markers that pair up on the line, then a prose parenthesis.
    line_lo = max(text.rfind("\n", 0, start), text.rfind("\r", 0, start)) + 1
    line_hi = len(text)
    for nl in ("\n", "\r"):
        k = text.find(nl, end)
        if k != -1:
            line_hi = min(line_hi, k)
    markers = [m.start() for m in re.finditer(r"\*\*", text[line_lo:line_hi])]
    markers = [line_lo + m for m in markers]
    paired = set(markers[: len(markers) // 2 * 2])
    if b - a >= 2 and text[a:a + 2] == "**" and a in paired and (a == 0 or not text[a - 1].isalnum()):
        a += 2
    if b - a >= 2 and text[b - 2:b] == "**" and b - 2 in paired and (b == len(text) or not text[b].isalnum()):
        b -= 2
    core = text[a:b].strip(" \t")
    a += len(text[a:b]) - len(text[a:b].lstrip(" \t"))
    b = a + len(core)
    if len(core) > 1 and core[0] == ")" and a > 0 and (_letter(text[a - 1]) or text[a - 1] in ".,:;!?'\""):
        a += 1
    if len(core) > 1 and core[-1] == "(" and b < len(text) and _letter(text[b]):
        b -= 1
    core = text[a:b].strip(" \t")
    a += len(text[a:b]) - len(text[a:b].lstrip(" \t"))
    b = a + len(core)
    if not core:
        return False, "no equation"
    glued_l = all(c not in " \t" for c in text[start:a])
    glued_r = all(c not in " \t" for c in text[b:end])
    for k, glued, right in ((start - 1, glued_l, False), (end, glued_r, True)):
        why = _cd_side_problem(text, k, glued, right, "=" in core)
        if why:
            return False, why
    for w in _cd_words(text, start - 1, -1) + _cd_words(text, end, 1):
        if w in _CD_OP_WORDS:
            return False, f"operator word {w}"
        if w in _CD_NOT:
            return False, f"negation {w}"
    if "=" not in core:
        result, negated = _cd_result_words(text, end)
        if negated:
            return False, "negated result"
        if result is not None:
            core = f"{core} = {result}"
    return _cd_check_equation(core, nums, target, ops)


# ---------------------------------------------------------------------------------------
# Function calling
# ---------------------------------------------------------------------------------------
def _fc_hook(pairs):
    keys = [k for k, _ in pairs]
    if len(keys) != len(set(keys)):
        raise ValueError("duplicate key")
    return dict(pairs)


def _fc_const(name):
    raise ValueError(name)


_FC_DECODER = json.JSONDecoder(object_pairs_hook=_fc_hook, parse_constant=_fc_const)


def _fc_depth(v, d=1):
    if isinstance(v, dict):
        return max([d] + [_fc_depth(x, d + 1) for x in v.values()])
    if isinstance(v, list):
        return max([d] + [_fc_depth(x, d + 1) for x in v])
    return 0


def _fc_calls(v, allow_empty):
    if isinstance(v, dict):
        v = [v]
    if not isinstance(v, list) or (not v and not allow_empty):
        return None
    out = []
    for c in v:
        if not isinstance(c, dict) or type(c.get("name")) is not str:
            return None
        args = c.get("arguments", {})
        if type(args) is not dict:
            return None
        out.append((c["name"], args))
    return out


def _fc_parse(s: str):
    if len(s) > 20_000:
        raise ValueError("too long")
    v = _FC_DECODER.decode(s)
    if _fc_depth(v) > 32:
        raise ValueError("too deep")
    return v


def _fc_same(a, b) -> bool:
    if type(a) is bool or type(b) is bool:
        return type(a) is bool and type(b) is bool and a == b
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return a == b
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_fc_same(x, y) for x, y in zip(a, b))
    if isinstance(a, dict) and isinstance(b, dict):
        return set(a) == set(b) and all(_fc_same(a[k], b[k]) for k in a)
    return type(a) is type(b) and a == b


def _fc_top_level(text: str) -> list[str]:
    """The complete top-level bracketed structures of the text, char by char."""
    out, i, n = [], 0, len(text)
    while i < n:
        if text[i] not in "[{":
            i += 1
            continue
        start, want, j, ok = i, [], i, False
        in_str = esc = False
        while j < n:
            c = text[j]
            if in_str:
                if esc:
                    esc = False
                elif c == "\\":
                    esc = True
                elif c == '"':
                    in_str = False
            elif c == '"':
                in_str = True
            elif c == "[":
                want.append("]")
            elif c == "{":
                want.append("}")
            elif c in "]}":
                if want.pop() != c:
                    break
                if not want:
                    ok = True
                    break
            j += 1
        if ok:
            out.append(text[start:j + 1])
        i = j + 1
    return out


def _fc_yield(v):
    calls = _fc_calls(v, allow_empty=False)
    if calls is not None:
        return calls
    if isinstance(v, dict):
        for x in reversed(list(v.values())):
            found = _fc_yield(x)
            if found is not None:
                return found
    return None


def recheck_function_calling(text: Any, reference: list[dict]) -> tuple[bool, str]:
    """The function-calling rule (see :mod:`r3.tasks.function_calling`), implemented separately."""
    if not isinstance(text, str) or len(text) > 100_000:
        return False, "not a string or too long"
    calls = None
    stripped = text.strip()
    if stripped[:1] in ("[", "{"):
        try:
            calls = _fc_calls(_fc_parse(stripped), allow_empty=True)
        except (ValueError, RecursionError):
            pass
    if calls is None:
        for chunk in reversed(_fc_top_level(text)):
            try:
                calls = _fc_yield(_fc_parse(chunk))
            except (ValueError, RecursionError):
                continue
            if calls is not None:
                break
    if calls is None:
        return False, "no call list"
    ref = [(c["name"], c.get("arguments", {})) for c in reference]
    if len(ref) != len(calls):
        return False, "wrong number of calls"
    left = list(ref)
    for name, args in calls:
        for k, (rn, ra) in enumerate(left):
            if rn == name and _fc_same(args, ra):
                del left[k]
                break
        else:
            return False, f"call {name} does not match"
    return True, "correct"


# ---------------------------------------------------------------------------------------
def has_recheck(task) -> bool:
    """Whether :func:`recheck` has an independent implementation for ``task``."""
    return getattr(task, "name", None) in ("countdown", "function_calling")


def recheck(task, example: dict, text: str) -> tuple[bool, str] | None:
    """The independent verdict for a built-in task's example, or None for other tasks."""
    name = getattr(task, "name", None)
    try:
        if name == "countdown":
            return recheck_countdown(text, [int(x) for x in example["nums"]], int(example["target"]),
                                     tags=task.answer_tags, ops=task.ops)
        if name == "function_calling":
            answers = example["answers"]
            return recheck_function_calling(text, json.loads(answers) if isinstance(answers, str) else answers)
    except (KeyError, TypeError, ValueError):
        return False, "malformed example"
    return None
