"""The Countdown verifier: one answer rule, read in linear time, evaluated exactly.

**The answer.** With ``answer_tags=True`` it is the content of the last complete ``<answer> ...
</answer>`` block. With ``answer_tags=False`` it is the *final equation* of the completion: the
last run of arithmetic text (ASCII digits, ``+ - * /``, parentheses, ``=``, spaces and tabs) that
holds a digit and one of ``+ - * / =``. Anything after it that is another equation makes the final
equation that one; a line break ends a run; ``<answer>`` tags are ignored. Prose around it is fine
("The answer is 5 + 23 = 28."), but not what would change its meaning, so the final equation is
rejected (never skipped in favour of an earlier one) when

* a letter is glued to it (``4x + 3``, ``log(3 + 4)``, ``21 - 2x``), or a word that is an
  operator (``mod``, ``log``, ``sqrt``, ``root``, ``power``, ``squared``, ``times``, ``minus``,
  ``multiple``, ``x``, ... see :data:`OPERATOR_WORDS`) or a negation (``not``, ``isn't``, ...
  :data:`NEGATIONS`) is among the three words before or after it (spaces apart);
* next to it (spaces apart or glued) is a symbol of an operation the task does not allow or a
  number in another script: ``^ % | ~ \\ [ ] { } < >``, ``!`` after it (unless it follows a
  written result: ``= 7!``) or glued before it, any
  Unicode math symbol (``× ÷ − √ ≥ ≈ →``), superscript or non-ASCII digit (``² ½ ٣``), or a dash
  glued before it (``‐5``);
* a ``.`` or ``,`` glued to it continues a number (``36.5``, ``1,000``, ``.5``).

Markdown bold around it (``**5 + 23 = 28**``) and a parenthesis that opens or closes prose next to
it (``5 + 23 = 28 (using both)``) are not part of it. A result written in words after an
expression is its written value: ``5 + 12 equals 17``, ``5 + 12 is 17``, ``5 + 12, which is 17``
(up to five linking words, :data:`RESULT_LINKS`, then a number) read as ``5 + 12 = 17``.

**Correct iff** the answer is ``expression`` or ``expression = value`` (exactly one ``=``, the
value a plain integer, optionally negative) where the expression uses each given number exactly
once, only the allowed binary operators and parentheses (no unary minus or plus, no decimals, no
leading zeros), its exact value (:class:`fractions.Fraction`; a division by zero anywhere fails)
equals the target, and the written value, when present, equals the target too. The expression is
parsed with :mod:`ast` and a whitelist of node types: model output is never evaluated by Python.

Every step is linear in the completion's length (no backtracking regular expression), and the
completion is capped at :data:`MAX_COMPLETION_CHARS`.
"""

from __future__ import annotations

import ast
import re
import unicodedata
from collections import Counter
from fractions import Fraction
from typing import Any

MAX_ANSWER_CHARS = 256
MAX_COMPLETION_CHARS = 100_000

#: Words that, within three words of the final equation, can change what it means.
OPERATOR_WORDS = frozenset("""
    mod modulo modulus log logs logarithm ln lg exp sqrt cbrt root roots radical sin cos tan abs
    absolute factorial squared cubed square cube power powers pow exponent exponents percent
    percentage negative minus plus times divided multiplied over x half twice double triple
    inverse reciprocal floor ceil ceiling round rounded approximately approx roughly multiple
    multiples factor factors product quotient remainder fraction
""".split())
#: Words that, within three words of the final equation, deny it ("26 + 24 is not 50").
NEGATIONS = frozenset("""
    not no never nor neither cannot isn't wasn't aren't weren't doesn't don't didn't can't won't
    wouldn't shouldn't couldn't isnt wasnt doesnt dont didnt cant wont
""".split())
#: Words that may link an expression to its result written in words ("5 + 12 equals 17").
RESULT_LINKS = frozenset("""
    is was equals equal equaling equalling to gives give giving makes make making yields yield
    results result resulting in which that would will be get gets we you it so then this the a
    becomes become comes out as sum total answer value of
""".split())

_RUN_CHARS = frozenset("0123456789+-*/()= \t")
_RUN = re.compile(r"[0-9+\-*/()= \t]+")
_HAS_DIGIT = re.compile(r"[0-9]")
_HAS_OP = re.compile(r"[+\-*/=]")
_SPACE = " \t"
_DISALLOWED_ASCII = frozenset("^%|~\\[]{}<>")
_SENTENCE = frozenset(".,;:!?\"'\u201c\u201d\u2018\u2019\u00ab\u00bb")
_EXPR_CHARS = re.compile(r"[0-9+\-*/() ]*")
_INT = re.compile(r"[0-9]+")
_VALUE = re.compile(r"-?[0-9]+")
_WS = re.compile(r"\s")
_OPS = {ast.Add: "+", ast.Sub: "-", ast.Mult: "*", ast.Div: "/"}
_MAX_WORD = 32  # operator words are short; reading a longer word stops there


class _Reject(Exception):
    pass


# ---------------------------------------------------------------------------------------
# finding the answer
# ---------------------------------------------------------------------------------------
def extract_answer(text: str) -> str | None:
    """The content of the last complete ``<answer>...</answer>`` block, or None. Linear time."""
    end = text.rfind("</answer>")
    if end < 0:
        return None
    start = text.rfind("<answer>", 0, end)
    if start < 0:
        return None
    return text[start + len("<answer>"): end]


def _is_letter(ch: str) -> bool:
    return ch.isalpha() or ch == "_"


def _beyond(text: str, pos: int, step: int) -> str:
    """The first character after ``pos`` in direction ``step`` that is not a space or tab ("" at
    the end of the text)."""
    i = pos + step
    while 0 <= i < len(text) and text[i] in _SPACE:
        i += step
    return text[i] if 0 <= i < len(text) else ""


def _neighbour_problem(text: str, pos: int, glued: bool, after: bool, written: bool) -> str | None:
    """Why the character at ``pos`` (just outside the final equation's run, on its right when
    ``after``) changes the equation's meaning, or None when it is harmless prose. ``written``: the
    equation ends in a written result (``= 7``), after which ``!`` is an exclamation."""
    if pos < 0 or pos >= len(text):
        return None
    ch = text[pos]
    if ch.isspace():  # a line break: the equation's line ends here
        return None
    if _is_letter(ch):
        return f"letters glued to the equation ({ch!r})" if glued else None
    if ch.isdigit() or ch.isnumeric():
        return f"a number sign the task does not allow next to the equation ({ch!r})"
    if ch in _DISALLOWED_ASCII:
        return f"an operator the task does not allow next to the equation ({ch!r})"
    cat = unicodedata.category(ch)
    if cat == "Sm" or ch == "\u00b7":
        return f"a math symbol the task does not allow next to the equation ({ch!r})"
    if ch == "!" and (after or glued) and not (after and written):
        return "a '!' next to the equation"
    step = 1 if after else -1
    if ch in ".," and glued and text[pos + 1: pos + 2].isdigit():
        return f"a decimal point or digit grouping ({ch!r}) in a number of the equation"
    beyond = _beyond(text, pos, step)
    if cat == "Pd" and not after and (glued or not _is_letter(beyond)):
        return f"a dash before the equation ({ch!r})"
    if ch not in _SENTENCE and beyond.isdigit():
        return f"a symbol between the equation and another number ({ch!r})"
    return None


def _word_char(ch: str) -> bool:
    return _is_letter(ch) or ch in "'\u2019"


def _words(text: str, pos: int, step: int, n: int = 3) -> list[str]:
    """Up to ``n`` lower-cased words read from ``pos`` in direction ``step`` (-1 or +1), apart by
    spaces or tabs only; stops at anything else, and at a word longer than any listed word. A word
    is letters with inner apostrophes (``isn't``)."""
    out: list[str] = []
    i, size = pos, len(text)
    while len(out) < n:
        while 0 <= i < size and text[i] in _SPACE:
            i += step
        if not (0 <= i < size and _is_letter(text[i])):
            break
        j, length = i, 0
        while 0 <= j < size and _word_char(text[j]) and length <= _MAX_WORD:
            j += step
            length += 1
        if length > _MAX_WORD:
            break
        word = text[i:j] if step > 0 else text[j + 1: i + 1]
        out.append(word.strip("'\u2019").replace("\u2019", "'").lower())
        i = j
    return out


def _result_in_words(text: str, pos: int) -> tuple[str | None, bool]:
    """A result written in words after an expression (``5 + 12 equals 17``, ``is not 50``,
    ``, which is 17``): ``(number, negated)`` when up to five linking words (commas allowed) lead
    from ``pos`` to a number, ``(None, False)`` otherwise. A number that is not a plain integer
    (``17.5``, ``17%``, ``17x``) comes back as ``"not an integer"``."""
    i, size, links, negated = pos, len(text), 0, False
    while True:
        while i < size and (text[i] in _SPACE or text[i] == ","):
            i += 1
        if i < size and (text[i].isnumeric() or (text[i] == "-" and text[i + 1: i + 2].isnumeric())):
            j = i + 1
            while j < size and text[j].isnumeric():
                j += 1
            number, nxt = text[i:j], text[j: j + 1]
            if not number.lstrip("-").isascii() or (nxt and (nxt.isalnum() or nxt in "%^" or unicodedata.category(nxt) == "Sm")) \
                    or (nxt in (".", ",") and text[j + 1: j + 2].isdigit()):
                return "not an integer", negated
            return number, negated
        words = _words(text, i, +1, 1) if links < 5 else []
        if not words or (words[0] not in RESULT_LINKS and words[0] not in NEGATIONS):
            return None, False
        negated |= words[0] in NEGATIONS
        links += 1
        while i < size and _word_char(text[i]):
            i += 1


def _strip_markup(text: str, a: int, b: int) -> tuple[int, int]:
    """Shrink ``text[a:b]`` (the run without its outer spaces) by Markdown bold markers (``**``
    that pair up with another on the same line) and by a parenthesis that opens or closes prose
    next to it; returns the new bounds, spaces stripped."""
    line_start = max(text.rfind("\n", 0, a), text.rfind("\r", 0, a)) + 1
    ends = [k for k in (text.find("\n", b), text.find("\r", b)) if k >= 0]
    line_end = min(ends) if ends else len(text)
    total = text.count("**", line_start, line_end)
    paired = total - total % 2  # markers with index < paired have a partner

    def is_markup(k: int) -> bool:
        return text.count("**", line_start, k) < paired

    if b - a >= 2 and text.startswith("**", a) and (a == 0 or not text[a - 1].isalnum()) and is_markup(a):
        a += 2
    if b - a >= 2 and text.startswith("**", b - 2) and (b >= len(text) or not text[b].isalnum()) and is_markup(b - 2):
        b -= 2
    a, b = _trim(text, a, b)
    if b - a > 1 and text[a] == ")" and a > 0 and (_is_letter(text[a - 1]) or text[a - 1] in ".,:;!?'\""):
        a += 1
    if b - a > 1 and text[b - 1] == "(" and b < len(text) and _is_letter(text[b]):
        b -= 1
    return _trim(text, a, b)


def _trim(text: str, a: int, b: int) -> tuple[int, int]:
    while a < b and text[a] in _SPACE:
        a += 1
    while b > a and text[b - 1] in _SPACE:
        b -= 1
    return a, b


def final_equation(text: str) -> tuple[str | None, str]:
    """``(equation, "")`` for the final equation of ``text`` (see the module docstring), or
    ``(None, reason)`` when there is none or it is not a valid answer."""
    last = None
    for m in _RUN.finditer(text):
        s = m.group()
        if _HAS_OP.search(s) and _HAS_DIGIT.search(s):
            last = m
    if last is None:
        return None, "no equation"
    start, end = last.span()
    a, b = _strip_markup(text, *_trim(text, start, end))
    if a >= b:
        return None, "no equation"
    # The characters just outside the run; "glued" = no space between them and the equation.
    glued_left = not any(c in _SPACE for c in text[start:a])
    glued_right = not any(c in _SPACE for c in text[b:end])
    for pos, glued, after in ((start - 1, glued_left, False), (end, glued_right, True)):
        why = _neighbour_problem(text, pos, glued, after, "=" in text[a:b])
        if why:
            return None, why
    for word in _words(text, start - 1, -1) + _words(text, end, +1):
        if word in OPERATOR_WORDS:
            return None, f"the word {word!r} next to the equation"
        if word in NEGATIONS:
            return None, f"the equation is denied ({word!r} next to it)"
    equation = text[a:b]
    if "=" not in equation:
        result, negated = _result_in_words(text, end)
        if negated:
            return None, "the equation is denied (a negation before its result)"
        if result is not None:
            equation += " = " + result
    return equation, ""


# ---------------------------------------------------------------------------------------
# checking it
# ---------------------------------------------------------------------------------------
def _evaluate(node: ast.AST, literals: list[int]) -> Fraction:
    """Exact value of a whitelisted expression tree; collects its integer literals."""
    if isinstance(node, ast.BinOp) and type(node.op) in _OPS:
        left = _evaluate(node.left, literals)
        right = _evaluate(node.right, literals)
        op = type(node.op)
        if op is ast.Add:
            return left + right
        if op is ast.Sub:
            return left - right
        if op is ast.Mult:
            return left * right
        if right == 0:
            raise _Reject("division by zero")
        return left / right
    if isinstance(node, ast.Constant) and type(node.value) is int and node.value >= 0:
        literals.append(node.value)
        return Fraction(node.value)
    if isinstance(node, ast.UnaryOp):
        raise _Reject("unary operators are not allowed")
    if isinstance(node, ast.BinOp):
        raise _Reject("only + - * / are allowed")
    raise _Reject(f"{type(node).__name__} is not allowed")


def _literals(node: ast.AST, out: list[int], ops: str) -> None:
    """The integer literals of a whitelisted tree, left to right (before any arithmetic); raises
    :class:`_Reject` for anything else, and for an operator not in ``ops``."""
    if isinstance(node, ast.BinOp) and type(node.op) in _OPS:
        if _OPS[type(node.op)] not in ops:
            raise _Reject(f"uses {_OPS[type(node.op)]!r}; this task allows only {' '.join(ops)}")
        _literals(node.left, out, ops)
        _literals(node.right, out, ops)
    elif isinstance(node, ast.Constant) and type(node.value) is int and node.value >= 0:
        out.append(node.value)
    else:
        _evaluate(node, [])  # raises the reason this node is not allowed


def check_answer(answer: str, nums: list[int], target: int, ops: str = "+-*/") -> tuple[bool, str]:
    """Check an answer string (``expression`` or ``expression = value``) over the operators
    ``ops``; ``(ok, reason)``. Raises nothing."""
    try:
        if len(answer) > 16 * MAX_ANSWER_CHARS:  # cheap bound before any other work
            return False, f"answer longer than {MAX_ANSWER_CHARS} characters"
        expr = _WS.sub(" ", answer).strip()
        if not expr:
            return False, "empty answer"
        if len(expr) > MAX_ANSWER_CHARS:
            return False, f"answer longer than {MAX_ANSWER_CHARS} characters"
        n_eq = expr.count("=")
        if n_eq > 1:
            return False, "more than one '=' (a chained equation)"
        if n_eq == 1:
            expr, rhs = (s.strip() for s in expr.split("="))
            if not _VALUE.fullmatch(rhs):
                return False, "the right-hand side of '=' is not a single integer"
            if rhs.lstrip("-") != str(abs(int(rhs))) or rhs == "-0":
                return False, f"number with a leading zero or sign: {rhs}"
            if int(rhs) != target:
                return False, f"the written result {rhs} is not the target {target}"
            if not expr:
                return False, "nothing on the left of '='"
        if not _EXPR_CHARS.fullmatch(expr):
            return False, "the answer may contain only digits, + - * /, parentheses and spaces"
        for tok in _INT.findall(expr):
            if len(tok) > 1 and tok[0] == "0":
                return False, f"number with a leading zero: {tok}"
        tree = ast.parse(expr, mode="eval")
        literals: list[int] = []
        _literals(tree.body, literals, ops)
        if Counter(literals) != Counter(int(x) for x in nums):
            return False, f"uses the numbers {sorted(literals)}, not each of {sorted(nums)} exactly once"
        value = _evaluate(tree.body, [])
        if value != target:
            return False, f"evaluates to {value}, not {target}"
        return True, "correct"
    except _Reject as e:
        return False, str(e)
    except SyntaxError:
        return False, "not a valid expression"
    except Exception as e:  # noqa: BLE001 -- RecursionError, MemoryError, anything: just wrong
        return False, f"rejected ({type(e).__name__})"


def check_completion(text: Any, nums: list[int], target: int, *, tags: bool = True,
                     ops: str = "+-*/") -> tuple[bool, str]:
    """Verdict and reason for a whole completion (see the module docstring)."""
    if not isinstance(text, str):
        return False, "completion is not a string"
    if len(text) > MAX_COMPLETION_CHARS:
        return False, f"completion longer than {MAX_COMPLETION_CHARS} characters"
    if tags:
        answer = extract_answer(text)
        if answer is None:
            return False, "no <answer> </answer> block"
        return check_answer(answer, nums, target, ops)
    equation, why = final_equation(text.replace("<answer>", "\n").replace("</answer>", "\n"))
    if equation is None:
        return False, why
    return check_answer(equation, nums, target, ops)
