"""Second, independent implementations of the built-in verifiers' answer rules.

A verifier that pays for a wrong answer trains the model to answer wrongly, so every reward r3
hands out can be re-checked by code that shares no parsing with the verifier: ``python -m
r3.audit`` re-checks a run's rewarded samples with it, and ``benchmarks/fuzz_verifiers.py``
compares the two on generated adversarial completions.

* Countdown: the same rule as :mod:`r3.tasks.countdown_verify`, read with a regex tokenizer and
  evaluated by a recursive-descent parser over :class:`fractions.Fraction` (no :mod:`ast`).
* Function calling: the same rule as :mod:`r3.tasks.function_calling`, with the top-level
  structures found by a character-by-character JSON lexer (the verifier walks a regex's matches)
  and call attempts recognised by string search (the verifier uses a regular expression).

These are written for clarity, not speed: use them to audit, not to reward.
"""

from __future__ import annotations

import html
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
_CD_OP_WORDS = set("""
    mod modulo modulus log logs logarithm ln lg exp sqrt cbrt root roots radical sin cos tan abs absolute
    factorial squared cubed square cube power powers pow exponent exponents percent percentage negative
    minus plus times divided multiplied over x half twice double triple thrice third quarter inverse
    reciprocal floor ceil ceiling round rounded approximately approx roughly multiple multiples factor
    factors product quotient remainder fraction base radix binary octal hex hexadecimal from add added
    subtract subtracted
    increased decreased increase decrease less more doubled tripled halved cdot ast div frac
    pm mp fois mal halves thirds quarters fourth fourths fifth fifths sixth sixths seventh sevenths eighth
    eighths ninth ninths tenth tenths multiply multiplying multiplication divide dividing division negate
    negated halve raised reduced deducted dozen hundred thousand million average mean max maximum min minimum
    neg lnot
    arcsin arccos arctan arcsec arccsc arccot sinh cosh tanh coth sech csch sec csc cot gcd lcm det
""".split()) | {"\u0445"}
# LaTeX's relations, brackets and operators that change the equation as their Unicode signs do (\sim 25 * 4 - 3 = 97)
_CD_OP_WORDS |= {"sim", "simeq", "approxeq", "cong", "equiv", "propto", "lfloor", "rfloor", "lceil", "rceil",
                 "lvert", "rvert", "setminus", "oplus", "ominus", "otimes", "odot"}
_CD_NOT = set("""
    not no never nor neither cannot isn't wasn't aren't weren't doesn't don't didn't can't won't
    wouldn't shouldn't couldn't isnt wasnt doesnt dont didnt cant wont wrong incorrect false invalid nope
    untrue undefined impossible unsolvable incorrectly
    hasn't haven't hadn't ain't hasnt havent hadnt isn wasn doesn didn aren weren hasn haven hadn
    couldn wouldn shouldn contradiction contradicts contradictory contradict
    falsch falsche falscher falsches nicht kein keine faux fausse pas incorrecte incorrecto incorrecta
    incorreto incorreta errado errada erroneo errato errata sbagliato sbagliata falso falsa fout niet
    nein feil fel
    inkorrekt inkorrekte verkehrt unrichtig ungultig fehlerhaft inexact inexacte errone erronee non nao
    erronea equivocado equivocada mal scorretto scorretta onjuist onjuiste verkeerd verkeerde inte nej
    ikke nei galet galt felaktig felaktigt uriktig forkert forkerte
""".split())
# LaTeX's negated relations: \ne, \neq, \nRightarrow 25 * 4 - 3 = 97 deny it as "\u2260" does
_CD_NOT |= {"ne", "neq", "nequiv", "ncong", "nsim", "napprox", "nrightarrow", "nleftarrow", "nleftrightarrow", "nexists"}


def _cd_ascii_letter(c: str) -> str | None:
    """An ASCII letter as itself; a letter whose decomposition, canonical or compatibility, is an
    ASCII letter and combining marks as that letter ("ã", "ó", "ä", full-width "Ｎ", "𝐍", "ⓝ");
    else None (a Roman numeral, "ⅰ", is a number)."""
    if c.isascii():
        return c if c.isalpha() else None
    if unicodedata.numeric(c, None) is not None:
        return None
    parts = unicodedata.decomposition(c).split()
    if parts and parts[0].startswith("<"):
        parts = parts[1:]
    if not parts:
        return None
    head = _cd_ascii_letter(chr(int(parts[0], 16)))
    if head is None or not all(unicodedata.combining(chr(int(p, 16))) for p in parts[1:]):
        return None
    return head


def _cd_foreign_letter(c: str) -> bool:
    """A letter of a non-Latin script (Cyrillic, Greek, CJK: denials written in it are not read)."""
    return c.isalpha() and _cd_ascii_letter(c) is None and "LATIN" not in unicodedata.name(c, "")


def _cd_hyphen_prefix(word: str, text: str, end: int) -> bool:
    """"non" whose letters end at ``end`` and a hyphen joins to the next word ("non-negative")."""
    return (word == "non" and end + 1 < len(text) and text[end] in "-\u2010\u2011"
            and (text[end + 1].isalpha() or _cd_ascii_letter(text[end + 1]) is not None))


_CD_DENIED_LATER = {"mistake", "mistakes", "mistaken", "mistakenly", "error", "errors", "erroneous",
                    "erroneously", "fallacy", "miscalculated", "miscalculation", "miscalculate", "inaccurate",
                    "typo", "typos", "disregard", "disregarded", "erreur", "erreurs", "fehler", "errore", "errori",
                    "erro", "erros", "nah", "nevermind", "kidding", "jk", "retract", "retracted", "retracts",
                    "misspoke", "miscounted", "miscount", "goofed", "bogus", "nonsense", "lied", "oops", "whoops",
                    "oopsie", "fails", "flawed", "faulty", "refuted", "debunked", "disproved", "yikes",
                    # (a retry taking its equation back: "I messed up.", "That overshoots.", "Let me reconsider.")
                    "messed", "overshoots", "overshot", "undershoots", "undershot", "recalculate", "recalculating",
                    "reconsider", "reconsidering", "redo", "redoing", "rethink", "rethinking", "slip", "slipped",
                    "reevaluate", "recount", "overcounts", "undercounts", "rework", "unable",
                    "differently",
                    # (and "That failed.", "It was rejected.")
                    "fail", "failed", "failure", "failures", "reject", "rejected", "rejects"}
_CD_DENIED_PAIRS = {("my", "bad"), ("a", "lie"), ("try", "again"), ("uh", "oh"), ("drawing", "board"),
                    # ("Let me start over.", "Let me try another approach.", "That's way off.", "Too high.")
                    ("start", "over"), ("try", "another"), ("off", "by"), ("too", "high"), ("too", "low"),
                    ("too", "big"), ("too", "small"), ("too", "large"), ("dead", "end"), ("attempt", "failed"),
                    ("something", "else"), ("square", "one"), ("different", "combination"), ("think", "again"),
                    ("a", "miss"), ("give", "up"), ("gave", "up"), ("giving", "up")}
_CD_OFF_AFTER = {"way", "that's", "it's", "something's", "is", "was", "seems", "looks"}  # "... is off"
_CD_LABEL_ALONE = {"mistake", "error", "typo", "erroneous", "bogus", "fallacy", "miscalculation"}
_CD_TAKE_BACK = {"scratch", "forget", "ignore", "strike", "cancel", "erase", "delete", "scrap", "discard"}
_CD_IF = {"if", "whether", "suppose", "supposing", "assume", "assuming", "unless", "hypothetically", "imagine",
          "imagining", "pretend", "pretending",
          # German, French, Spanish, Italian, Portuguese, Dutch, Scandinavian
          "wenn", "angenommen", "si", "supposons", "supposant", "admettons", "supongamos", "suponiendo",
          "supongo", "supponiamo", "supponendo", "suponhamos", "supondo", "suponha", "indien", "aangenomen",
          "hvis", "dersom", "ifall", "antag", "antaget"}
_CD_LABEL_NOT = {"wrong", "incorrect", "incorrectly", "false", "invalid", "untrue", "not", "isn't", "wasn't", *"""
    nope falsch falsche falscher falsches faux fausse incorrecte incorrecto incorrecta incorreto
    incorreta errado errada erroneo errato sbagliato sbagliata falso falsa fout feil fel
    inkorrekt inkorrekte verkehrt unrichtig ungultig fehlerhaft inexact inexacte errone erronee
    erronea equivocado equivocada scorretto scorretta onjuist onjuiste verkeerd verkeerde galet
    galt felaktig felaktigt uriktig forkert forkerte failed rejected
""".split()}
_CD_CROSSES = set("\u274c\u274e\u2717\u2718\u2716")
# ... and the other marks that say "no": ballot boxes with an X, the saltire, prohibited, no entry, thumbs down
_CD_CROSSES |= {"\u2612", "\u2613", "\u2bbd", "\U0001f5f5", "\U0001f5f7", "\U0001f6ab", "\u26d4", "\U0001f44e"}
_CD_QUESTIONS = {"\uff1f", "\ufe56", "\ufe16", "\u2753", "\u2754", "\u2047", "\u2048", "\u2049", "\u203d",
                 "\u061f", "\u2e2e"}
_CD_BANGS = {"\uff01", "\ufe57", "\ufe15"}
_CD_OP_SYMBOLS = set("\u00b7\u2715\u2716\u2795\u2796\u2797")
# the operators' other forms, read as the operators: full-width and small * / % ^ \\ -, the low
# asterisk, the Arabic star and percent, per mille and per ten thousand, modifier plus and minus, caret
_CD_OP_SYMBOLS |= {chr(0xFF00 + k) for k in (0x0A, 0x0F, 0x05, 0x3E, 0x3C, 0x0D)}
_CD_OP_SYMBOLS |= {chr(0xFE00 + k) for k in (0x61, 0x6A, 0x68, 0x63)}
_CD_OP_SYMBOLS |= set("\u204e\u066d\u066a\u2030\u2031\u0609\u060a\u02d6\u02d7\u2038")
_CD_ACTIONS = set()
for _stem, _forms in (("add", "s ed ing"), ("subtract", "s ed ing"), ("multipl", "y ies ied ying ication"),
                      ("divid", "e es ed ing"), ("doubl", "e es ed ing"), ("tripl", "e es ed ing"),
                      ("halv", "e es ed ing"), ("squar", "e es ed ing"), ("cub", "e es ed ing"),
                      ("increas", "e es ed"), ("decreas", "e es ed"), ("rais", "e es ed"), ("negat", "e ed"),
                      ("reduc", "e es ed"), ("deduct", " s ed")):
    _CD_ACTIONS |= {_stem + f for f in _forms.split()}
_CD_ACTIONS |= {"add", "subtract", "deduct", "times", "plus", "minus", "division", "subtraction", "addition"}
_CD_OBJECTS = {"it", "itself", "themselves", "result", "answer", "sides", "equation", "together", "sum", "total"}
_CD_OPERANDS = {"itself", "themselves", "sides"}
_CD_BARE_OK = {"is", "was", "the", "my", "our", "final", "answer", "solution", "equation", "correct", "right",
               "indeed", "and", "that", "that's", "this", "it", "it's", "here", "which", "target", "using", "both",
               "numbers", "number", "each", "once", "exactly"}
_CD_BARE_LAST = {"answer", "solution", "equation", "correct", "right", "indeed", "here", "target", "numbers", "once"}
_CD_LINKS = set("""
    is was equals equal equaling equalling to gives give giving makes make making yields yield results
    result resulting in which that would will be get gets got we you it so then this the a becomes
    become comes out as sum total answer value of us me exactly just about around indeed actually fact
    now finally final also really clearly simply should must can could that's it's thats its
    turns turned gave equaled equalled came
""".split())
_CD_CUES = {"answer", "answers", "result", "results", "solution", "total", "equals", "gives", "makes", "get",
            "gets", "got", "yields", "equation", "it's", "final", "####", "answer's", "result's", "solution's"}
_CD_SENTENCE_CUES = {"answer", "answers", "result", "results", "solution", "total", "answer's", "result's",
                     "solution's"}
# a number made the answer by the words before an answer word: "24 is the final answer", "24 would
# then be my answer" (a verb, up to two of these before it and four after it)
_CD_FILLERS = set("""
    the my our final correct right real true actual only new last proper exact intended then therefore thus so
    actually really clearly indeed also definitely certainly surely probably will would should must could might
""".split())
_CD_VERBS = {"is", "was", "be", "becomes", "remains", "s"}  # ("24's the answer")
_CD_STATES = {"equals", "equal", "makes", "gives", "yields", "or"}
_CD_STATES_BEFORE_IS = {"which", "that", "would", "will", "should", "must"}
_CD_HEDGES = {"maybe", "perhaps", "possibly", "probably", "rather", "even", "actually", "really"}
_CD_OF_OPS = set("""
    product products quotient difference differences ratio power powers square squares cube cubes root roots
    half double triple twice reciprocal inverse log logarithm factorial remainder multiple multiples exponent
    percent percentage fraction third quarter average mean max maximum min minimum
""".split())
_CD_WORD_VALUES = {w: k for k, w in enumerate(
    "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen sixteen "
    "seventeen eighteen nineteen".split())}
_CD_TENS = {w: 20 + 10 * k for k, w in enumerate("twenty thirty forty fifty sixty seventy eighty ninety".split())}
_CD_WORD_VALUES.update(_CD_TENS)
_CD_WORD_VALUES.update(hundred=100, thousand=1000, million=1000000)
_CD_NUMBER_WORDS = set(_CD_WORD_VALUES)
_CD_BAD_ASCII = "^%|~\\[]{}<>"
_CD_PUNCT = ".,;:!?\"'\u201c\u201d\u2018\u2019\u00ab\u00bb"
_CD_DECOR = "_'\u2019*\"`"


class _Bad(Exception):
    pass


def _letter(c: str) -> bool:
    return c == "_" or c.isalpha()


def _arith(c: str) -> bool:
    return c in "0123456789+-*/()= \t"


def _math_sign(c: str) -> bool:
    return c in _CD_BAD_ASCII or unicodedata.category(c) == "Sm"


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
    if len(answer) > 4096:
        return False, "too long"
    flat = "".join(" " if c.isspace() else c for c in answer).strip()
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


def _cd_later_tag(rest: str) -> bool:
    """Whether ``rest`` holds an answer tag in any spelling: <answer, < /Answer, &lt;answer,
    answer>, answer &gt; (full-width brackets too)."""
    low = "".join(c.lower() if c.isascii() else c for c in rest)  # ASCII letters in any case
    k = low.find("answer")
    while k != -1:
        j = k - 1
        while j >= 0 and low[j].isspace():
            j -= 1
        if j >= 0 and low[j] == "/":
            j -= 1
            while j >= 0 and low[j].isspace():
                j -= 1
        if j >= 0 and (low[j] in "<\uff1c" or low[max(0, j - 3):j + 1] == "&lt;"):
            return True
        m = k + 6
        while m < len(low) and low[m].isspace():
            m += 1
        if m < len(low) and (low[m] in ">\uff1e" or low.startswith("&gt;", m)):
            return True
        k = low.find("answer", k + 1)
    return False


def _cd_overlay(c: str) -> bool:
    """An overlay mark: combining class 1, or the enclosing circle backslash (U+20E0), a
    prohibition sign drawn over the character before it."""
    return unicodedata.combining(c) == 1 or c == "\u20e0"


# LaTeX commands that show only blank space (named spaces, math style switches): read as a space
_CD_LATEX_BLANKS = ("quad", "qquad", "enspace", "thinspace", "medspace", "thickspace", "negthinspace",
                    "negmedspace", "negthickspace", "displaystyle", "textstyle", "scriptstyle",
                    "scriptscriptstyle")


def _cd_read(text: str) -> str | None:
    """The text as a person reads it, or None (bidirectional controls)."""
    if any("\u202a" <= c <= "\u202e" or "\u2066" <= c <= "\u2069" for c in text):
        return None
    text = "\n".join(text.split("\r\n"))  # CRLF: one line break (a setext heading's underline follows it)
    if "&" in text:
        text = html.unescape(text)
    if any(_cd_overlay(c) for c in text):
        # an overlay mark (combining class 1) on a character: strokes alone (U+0335, U+0336) strike
        # it out; any other (a solidus, U+0338, a double solidus, a vertical line) negates it: \u2260
        out, i = [], 0
        while i < len(text):
            if not _cd_overlay(text[i]):
                out.append(text[i])
                i += 1
                continue
            j = i
            while j < len(text) and _cd_overlay(text[j]):
                j += 1
            if out and out[-1] not in "\n\r\u2028\u2029\x85" and i > 0 and text[i - 1] == out[-1]:
                out.pop()
            if any(c not in "\u0335\u0336" for c in text[i:j]):
                out.append("\u2260")
            i = j
        text = "".join(out)
    if "<" in text:
        text = _cd_unstrike(text)
    out = []
    for c in text:
        if c in "\n\r\u2028\u2029\x85":
            out.append("\n")
        elif " " <= c <= "~":
            out.append(c)
        elif c.isspace() or c in "\u2800\u3164\u115f\u1160\uffa0":
            out.append(" ")
        elif c in _CD_QUESTIONS:  # ？ ﹖ ❓ ⁇ ‽ ؟ ...: a question, as "?"
            out.append("?")
        elif c in _CD_BANGS:  # ！ ﹗ ︕: "!"
            out.append("!")
        elif unicodedata.category(c) not in ("Cf", "Cc", "Mn", "Me"):
            out.append(c)
    text = "".join(out)
    # tags: <answer> reads as the word "answer", any other tag as a line break
    out, i = [], 0
    while i < len(text):
        if text[i] == "<":
            j = i + 1 + (text[i + 1:i + 2] == "/")
            k = j
            if k < len(text) and text[k].isascii() and text[k].isalpha():
                k += 1
                while k < len(text) and k - j <= 20 and (text[k].isascii() and (text[k].isalnum() or text[k] in "_-")):
                    k += 1
                if k < len(text) and text[k] == ">" and k - j <= 21:
                    name = text[i:k + 1]
                    # superscript / subscript: raised or lowered text, another operation: "^"
                    out.append(" answer " if name == "<answer>" else
                               "^" if name.lower() in ("<sup>", "</sup>", "<sub>", "</sub>") else " ")
                    i = k + 1
                    continue
        out.append(text[i])
        i += 1
    text = "".join(out)
    if "\\" in text:
        out, i = [], 0
        while i < len(text):
            if text.startswith("\\boxed{", i):
                k = i + 7
                while k < len(text) and text[k] not in "{}\n":
                    k += 1
                if k < len(text) and text[k] == "}":
                    out.append(" answer " + text[i + 7:k] + " ")
                    i = k + 1
                    continue
            out.append(text[i])
            i += 1
        text = "".join(out)
        # LaTeX's operator signs as ASCII (\\times and \\cdot a "*", \\div a "/", not \\cdots), its
        # sized parentheses \\left( and \\right) as parentheses
        out, i = [], 0
        while i < len(text):
            if text[i] == "\\":
                word = next((w for w in ("times", "cdot", "div") if text.startswith(w, i + 1)), None)
                after = i + 1 + len(word) if word else i
                j = i - 1  # only between operands: after a digit, ")" or "}" (blanks apart)
                while word and j >= 0 and text[j] in " \t":
                    j -= 1
                operand = j >= 0 and text[j] in "0123456789)}"
                if word and operand and not (after < len(text) and text[after].isascii() and text[after].isalpha()):
                    out.append(" / " if word == "div" else " * ")
                    i = after
                    continue
                # LaTeX's spaces (\\, \\: \\; \\!) are spaces: "\\text{wrong}\\;25 ..." is no clause break
                if text[i + 1:i + 2] in (",", ":", ";", "!") and i + 1 < len(text):
                    out.append(" ")
                    i += 2
                    continue
                # ... as are its named spaces and style switches, which show nothing ("Wrong: $\\displaystyle 25 ...")
                blank = next((w for w in _CD_LATEX_BLANKS if text.startswith(w, i + 1)), None)
                after = i + 1 + len(blank) if blank else i
                if blank and not (after < len(text) and text[after].isascii() and text[after].isalpha()):
                    out.append(" ")
                    i = after
                    continue
                if text.startswith("left(", i + 1) or text.startswith("right)", i + 1):
                    out.append(text[i + 5] if text[i + 1] == "l" else text[i + 6])
                    i += 6 if text[i + 1] == "l" else 7
                    continue
            out.append(text[i])
            i += 1
        text = "".join(out)
        out, i = [], 0
        while i < len(text):
            if text[i] == "\\" and text[i + 1:i + 2] in ("(", ")", "[", "]") and i + 1 < len(text):
                # \[ ending its line, \] starting one: display math over lines, a block like "$$ ... $$"
                k, step = (i + 2, 1) if text[i + 1] == "[" else (i - 1, -1)
                while 0 <= k < len(text) and text[k] in " \t":
                    k += step
                ends = not 0 <= k < len(text) or text[k] == "\n"
                out.append("$$" if text[i + 1] in "[]" and ends else " ")
                i += 2
                continue
            out.append(text[i])
            i += 1
        text = "".join(out)
    return text


def _cd_without_rules(text: str) -> str:
    """A Markdown thematic break (a whole line of 3+ of one of - * _, blanks between) is a rule, not
    an operator ending its line: it reads as an empty line. (With tags the block stands in the text
    as a NUL, so marks on its line are never a whole line of marks.)"""
    kept: list[str] = []
    for line in text.split("\n"):
        bare = "".join(c for c in line if c not in " \t")
        rule = len(bare) >= 3 and bare[0] in "-*_" and bare.count(bare[0]) == len(bare)
        # a setext underline: dashes alone (no blank among them) under a line of text make it a
        # Markdown heading, read as "# ..." ("This answer is wrong" then "---")
        if (rule and bare[0] == "-" and line.strip(" \t") == bare and kept and kept[-1].strip(" \t")
                and "\0" not in kept[-1] and kept[-1].lstrip(" \t")[:1] != "#"):
            kept[-1] = "# " + kept[-1]
        kept.append("" if rule else line)
    return "\n".join(kept)


def _cd_unstrike(text: str) -> str:
    """Struck-through spans (<del>, <s>, <strike> to the same closing tag, any case) read as a space."""
    names = {"<del>": "del", "<s>": "s", "<strike>": "strike"}
    out, done, k, opened = [], 0, text.find("<"), None
    while k != -1:
        head = "".join(c.lower() if c.isascii() else c for c in text[k:k + 9])
        tag = next((t for t in ("<del>", "<s>", "<strike>", "</del>", "</s>", "</strike>") if head.startswith(t)), None)
        if tag and opened is None and tag[1] != "/":
            opened = (k, names[tag])
        elif tag and opened is not None and tag[1] == "/" and tag[2:-1] == opened[1]:
            out.append(text[done:opened[0]] + " ")
            done, opened = k + len(tag), None
        k = text.find("<", k + 1)
    out.append(text[done:])
    return "".join(out)


def _cd_runs(text: str):
    """(start, end) of each maximal run of arithmetic characters, in order."""
    i, n = 0, len(text)
    while i < n:
        if not _arith(text[i]):
            i += 1
            continue
        j = i
        while j < n and _arith(text[j]):
            j += 1
        yield i, j
        i = j


def _cd_final_run(text: str) -> tuple[int, int] | None:
    """Start and end of the last maximal arithmetic run holding a digit and an operator or '='."""
    best = None
    for i, j in _cd_runs(text):
        seg = text[i:j]
        if any(c.isdigit() for c in seg) and any(c in "+-*/=" for c in seg):
            best = (i, j)
    return best


def _cd_tok(text: str, i: int, step: int):
    """(kind, value, next index) of the token at i in direction step; kinds word/skip/number/None."""
    n = len(text)
    while 0 <= i < n and text[i] in " \t":
        i += step
    if not 0 <= i < n:
        return None, "", i
    c = text[i]
    if c.isalpha() or c in _CD_DECOR:
        chars, j = [], i
        while 0 <= j < n and (text[j].isalpha() or text[j] in _CD_DECOR):
            chars.append(text[j])
            j += step
            if len(chars) >= 34:
                return None, "", i
        w = "".join(chars if step > 0 else chars[::-1]).strip(_CD_DECOR)
        return ("word" if w else "skip"), w.replace("\u2019", "'").lower(), j
    if c.isnumeric() or (c == "%" and 0 <= i + step < n and text[i + step].isnumeric()):
        chars, j = [], i
        while 0 <= j < n and len(chars) <= 64:
            d = text[j]
            nxt = j + step
            if d.isnumeric() or d == "%" or (d in ".,/" and 0 <= nxt < n and text[nxt].isnumeric()):
                chars.append(d)
                j = nxt
            else:
                break
        return "number", "".join(chars if step > 0 else chars[::-1]), j
    return None, "", i


def _cd_words_problem(text: str, start: int, end: int) -> str | None:
    """Operator words, negations, suppositions and other alphabets among the four words on each side
    (parentheses and TeX's ``$`` apart); a LaTeX command's name is read (``\\sqrt``) but not counted
    among them (``Not \\bf so ...``)."""
    for pos, step in ((start - 1, -1), (end, 1)):
        words = []
        i = pos
        budget = 8  # tokens read, LaTeX commands aside
        name_next = False
        while budget > 0:
            budget -= 1
            if len(words) >= 4:
                break
            at = i
            kind, w, i = _cd_tok(text, i, step)
            if kind is None and 0 <= i < len(text) and text[i] in "()${}[]":
                i += step  # words in parentheses, braces or brackets are still words around it ("\\text{If} we"), and TeX's $ shows nothing
                continue
            if (kind is None and 0 <= i < len(text) and text[i] == "\\" and i + 1 < len(text)
                    and text[i + 1].isascii() and text[i + 1].isalpha()):
                if step > 0:
                    name_next = True  # the word after the backslash is the command's name
                    budget += 1
                elif words:
                    words = words[:-1]  # the word just read was the command's name
                    budget += 2
                i += step
                continue
            if kind == "skip":
                continue
            if kind == "number":
                if step < 0 and len(words) == 1 and words[0] in ("of", "by", "to", "from", "for"):
                    return "a number of/by it"
                break
            if kind is None:
                break
            if any(ord(ch) > 127 for ch in w):
                return "non-ASCII word"
            if step < 0 and words == ["of"] and w in _CD_NUMBER_WORDS:
                return "a number word of it"
            if w in _CD_OP_WORDS:
                return f"operator word {w}"
            if w in _CD_NOT and not _cd_hyphen_prefix(w, text, i if step > 0 else at + 1):
                return f"negation {w}"
            if step < 0 and w in _CD_IF:
                return f"supposition {w}"
            if name_next:
                name_next = False
                budget += 1
                continue
            words.append(w)
    return None


def _cd_number_after(text: str, i: int, strict: bool) -> tuple[str | None, bool]:
    negated = False
    for links in range(7):
        while i < len(text) and text[i] in " \t,:;(\"'\u2019\u201c\u201d*_`$":
            i += 1
        if i >= len(text):
            return None, False
        c = text[i]
        if c.isnumeric():
            _, number, j = _cd_tok(text, i, 1)
            nxt = text[j] if j < len(text) else ""
            ok = all(d in "0123456789" for d in number) and not (nxt and (_letter(nxt) or nxt.isnumeric()))
            return (number if ok else "not an integer"), negated
        if strict and _math_sign(c):
            return "not an integer", negated
        kind, w, j = _cd_tok(text, i, 1)
        if kind != "word" or links == 6:
            return None, False
        if w in _CD_NUMBER_WORDS:
            return ("not an integer", negated) if strict else (None, False)
        if w not in _CD_LINKS and w not in _CD_NOT:
            return None, False
        negated = negated or w in _CD_NOT
        i = j
    return None, False


def _cd_side_problem(text: str, k: int, glued: bool, right: bool, has_result: bool) -> str | None:
    if not 0 <= k < len(text) or text[k].isspace() or (not right and _cd_list_bullet(text, k)):
        return None
    c = text[k]
    if _letter(c):
        if not glued and not right and _cd_function_letter(text, k) and _cd_next_after_wrapping(text, k + 1) == "(":
            return "a function or variable applied to it"
        return "glued letters" if glued else None
    if c.isnumeric():
        return "foreign number"
    if c in _CD_CROSSES:
        return "a cross mark"
    if c == "?" and right:
        return "a question"
    if _math_sign(c) or c in _CD_OP_SYMBOLS:
        return "operator symbol"
    if c == "!" and right and text[k + 1:k + 2] == "=":
        return "not equal"
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
    if (c not in _CD_PUNCT and far and (far.isnumeric() or far in "+-*/=()" or _math_sign(far))
            and not (not right and _cd_list_bullet(text, j))):
        return "symbol before more arithmetic"
    if c in "+*/":  # an operator with a number past it, spaces and quotes apart: "* two", "/'2'", "two*"
        step = 1 if right else -1
        j = k + step
        while 0 <= j < len(text) and text[j] in " \t'\"`\u2018\u2019\u201c\u201d":
            j += step
        if 0 <= j < len(text) and text[j].isnumeric():
            return "operation on a number"
        word = ""
        while 0 <= j < len(text) and text[j].isascii() and text[j].isalpha():
            word = word + text[j] if right else text[j] + word
            j += step
        if word.lower() in _CD_WORD_VALUES:
            return "operation on a number word"
        if len(word) == 1:
            return "operation on a variable"
    if unicodedata.category(c) == "Pd":  # "n - <answer>": a dash and a one-letter variable ("a", "I": words)
        step = 1 if right else -1
        j = k + step
        while 0 <= j < len(text) and text[j] in " \t'\"`\u2018\u2019\u201c\u201d":
            j += step
        if 0 <= j < len(text) and text[j].isascii() and text[j].isalpha() and text[j] not in "aAI":
            e = j + step
            if not (0 <= e < len(text) and (text[e].isalnum() or text[e] in "'\u2019_")):
                return "a dash and a variable"
    return None


def _cd_function_letter(text: str, k: int) -> bool:
    """An ASCII letter standing alone as a word at ``k`` (not ``a``, ``A`` or ``I``): a variable or
    a function's name, ``f (25 * 4 - 3) = 97``."""
    c = text[k]
    before = text[k - 1] if k > 0 else " "
    return (("a" <= c <= "z" or "A" <= c <= "Z") and c not in ("a", "A", "I")
            and not (before.isalnum() or before in ("_", "'", "\u2019", "\\")))


def _cd_next_after_wrapping(text: str, k: int) -> str:
    """The first character from ``k`` on that is no blank or wrapping symbol ("" at the end)."""
    while k < len(text):
        if text[k] in " \t" or _cd_wrapping(text[k]):
            k += 1
            continue
        if text[k] == "\\" and k + 1 < len(text) and text[k + 1].isascii() and text[k + 1].isalpha():
            e = k + 1  # a LaTeX command shows no character ("f \\bf (25 * 4 - 3) = 97"), unless it names an operation
            while e < len(text) and text[e].isascii() and text[e].isalpha():
                e += 1
            name = text[k + 1:e].lower()
            if name in _CD_OP_WORDS or name in _CD_NOT or name in _CD_IF or name in _CD_LABEL_NOT:
                return "\\"
            k = e
            continue
        break
    return text[k] if k < len(text) else ""


def _cd_list_bullet(text: str, k: int) -> bool:
    """A Markdown list marker: ``-``, ``*`` or ``+`` first on its line (blanks apart), a blank after it."""
    return (0 <= k < len(text) and text[k] in "-*+" and text[k + 1:k + 2] in (" ", "\t")
            and text[:k].rstrip(" \t")[-1:] in ("", "\n"))


def _cd_wrapping(c: str) -> bool:
    """Quotes of any script, ``$``, ``#``, bullets, emoji, CJK brackets: symbols that only wrap or
    mark the equation (not a sentence mark, an operator, a bracket, a dash or a math sign)."""
    if c.isalnum() or c.isspace() or c in ".,;:!?+-*/=()^%|~\\[]{}<>" or c in _CD_CROSSES or c in _CD_OP_SYMBOLS:
        return False
    cat = unicodedata.category(c)
    return cat[0] in "PS" and cat not in ("Sm", "Pd")


def _cd_skipped_command(text: str, k: int) -> int | None:
    """``text[k]`` the last letter of a LaTeX command (``\\`` then ASCII letters) that the readers
    before the equation pass over as a blank (``\\mathbf``, ``\\large``, ``\\therefore``,
    ``\\implies``): the index of its backslash. None when there is no such command there, or when
    its name is an operator, negation, supposition or label denial word, which is read as that word
    (``\\sqrt``, ``\\neg``, ``\\not``)."""
    if not (0 <= k < len(text) and "a" <= text[k].lower() <= "z"):
        return None
    b = k
    while b >= 0 and text[b].isascii() and text[b].isalpha():
        b -= 1
    if b < 0 or text[b] != "\\":
        return None
    name = text[b + 1:k + 1].lower()
    if name in _CD_OP_WORDS or name in _CD_NOT or name in _CD_IF or name in _CD_LABEL_NOT:
        return None
    return b


def _cd_back_over_wrapping(text: str, k: int) -> int:
    """From ``k`` back over blanks, opening parentheses and wrapping symbols; a line break is crossed
    when the line before it ends in a code fence (three backquotes or tildes, maybe a language
    name after them) or in ``$$``, which open a block holding the equation. Returns the index of
    the first character before them (-1 at the start of the text)."""
    while True:
        while k >= 0:
            if text[k] in " \t" or text[k] == "(" or _cd_wrapping(text[k]):
                k -= 1
                continue
            b = _cd_skipped_command(text, k)  # ("Wrong: $\\mathbf 25 ...": a command shows no word)
            if b is None:
                break
            k = b - 1
        if k < 0 or text[k] != "\n":
            return k
        e = k
        while e >= 0 and text[e].isspace():
            e -= 1
        name = e
        while name >= 0 and e - name < 20 and text[name].isascii() and text[name].isalnum():
            name -= 1  # ("```python")
        mark = text[name] if name >= 0 else ""
        f = name
        while f >= 0 and text[f] == mark:
            f -= 1
        if mark in ("`", "~") and name - f >= 3 or mark == "$" and name == e and name - f >= 2:
            k = f
        else:
            return k


def _cd_wrapped(text: str, start: int, has_result: bool, nested: bool = True) -> str | None:
    """``Wrong: $5 + 23 = 28$``, ``If \u201c5 + 23 = 28\u201d``, ``2 * \u00ab<answer>...``, ``If`` and a
    code fence on the line before: the text before the wrapper symbols (and an opening
    parenthesis) just before it, read as if they were not there; and then, once, the text before
    a bullet (``-``, ``*``, ``+`` or ``>`` starting its line) or a dash or star between blanks
    found there (``Assume - <answer>...``, ``Wrong answer:\n- \\boxed{...}``)."""
    k = _cd_back_over_wrapping(text, start - 1)
    between = text[k + 1:start]
    for round_ in range(2):
        if round_ == 1 or any(c == "(" or c == "\n" or c == "\\" or _cd_wrapping(c) for c in between):
            emphasis = _cd_emphasis_ends_at(text, k)
            line_start = (k >= 0 and text[k] in "-*+>" and text[:k].rstrip(" \t")[-1:] in ("", "\n")
                          and (text[k] in "*>" or text[k + 1:k + 2] in (" ", "\t")))  # ("-\\bf 25 ...": a minus)
            side = (None if k < 0 or emphasis or line_start
                    else _cd_side_problem(text, k, text[k + 1] not in " \t", False, has_result))
            why = (side or _cd_words_problem(text, k + 1, len(text)) or _cd_colon_label(text, k + 1)
                   or _cd_previous_line(text, k + 1) or (_cd_answer_word(text, k + 1, has_result) if nested else None))
            if why:
                return why
        # a bullet, or a dash or star with blanks on both sides, stands alone: read past it once
        if not (k >= 0 and text[k + 1:k + 2] in (" ", "\t")
                and (text[k] in "*>+" or unicodedata.category(text[k]) == "Pd")):
            return None
        bullet = text[:k].rstrip(" \t")[-1:] in ("", "\n")
        if not (bullet or (text[k] not in ">+" and k > 0 and text[k - 1] in " \t")):
            return None
        k = _cd_back_over_wrapping(text, k - 1)
    return None


def _cd_emphasis_ends_at(text: str, k: int) -> bool:
    """Whether the run of ``*`` and ``_`` (blanks among them) ending at ``k`` closes Markdown
    emphasis around a label (``**Answer:** $5 + 23 = 28$``) rather than being an operator: no
    digit, operator or math sign before it, and no operand word (``n * $5 + 23$`` is a product)."""
    e = k
    while e >= 0 and text[e] in "*_ \t":
        e -= 1
    return (e < k and not (e >= 0 and (text[e].isdigit() or text[e] in "+-*/=()" or _math_sign(text[e])))
            and not _cd_operand_next(text, e, -1))


def _cd_wrapped_after(text: str, end: int) -> str | None:
    """``$5 + 23 = 28$ mod n``, ``\u201c5 + 23 = 28\u201d \u00d7 n``: the text after the wrapping
    symbols (and blanks) just after the equation or block ending at ``end``, read as if they were
    not there; a "!" past them ends the sentence (``The answer is $5 + 23$!``)."""
    k = end
    while k < len(text) and (text[k] in " \t" or _cd_wrapping(text[k])):
        k += 1
    if not any(_cd_wrapping(c) for c in text[end:k]):
        return None
    return _cd_side_problem(text, k, False, True, True) or _cd_words_problem(text, 0, k)


def _cd_answer_word(text: str, start: int, has_result: bool, nested: bool = False) -> str | None:
    """Before the word "answer" (``<answer>``, ``\\boxed{``) just before ``start``: what stands there
    is next to the equation (``3 * \\boxed{$5 + 23$}``, ``Wrong: \\boxed{$5 + 23 = 28$}``); ``nested``:
    past wrapping symbols there, the word "answer" is looked for once more (:func:`_cd_wrapped`)."""
    k = start - 1
    while k >= 0 and text[k] in " \t":
        k -= 1
    if not (k >= 5 and text[k - 5:k + 1].lower() == "answer"
            and not (k > 5 and (text[k - 6].isalpha() or text[k - 6] in _CD_DECOR))):
        return None
    w = k - 5
    m = w - 1
    while m >= 0 and text[m] in " \t":
        m -= 1
    emphasis = _cd_emphasis_ends_at(text, m)
    line_start = (m >= 0 and text[m] in "-*+>" and text[:m].rstrip(" \t")[-1:] in ("", "\n")
                  and (text[m] in "*>" or text[m + 1:m + 2] in (" ", "\t")))
    side = (None if m < 0 or emphasis or line_start or text[m] == "="
            else _cd_side_problem(text, m, m == w - 1, False, has_result))
    opens = start
    while opens < len(text) and text[opens] in " \t":
        opens += 1
    if (not side and m >= 0 and m < w - 1 and opens < len(text) and text[opens] == "(" and _cd_function_letter(text, m)
            and _cd_next_after_wrapping(text, m + 1) == "a" and text[w:w + 6].lower() == "answer"):
        side = "a function or variable applied to it (before the word answer)"  # ("f \\boxed{(25 * 4 - 3)}")
    return (side or _cd_colon_label(text, w) or _cd_previous_line(text, w) or _cd_operand(text, w)
            or _cd_wrapped(text, w, has_result, nested=nested))


def _cd_colon_label(text: str, start: int) -> str | None:
    """``Wrong: 5 + 23 = 28``: a denial among the four words before a colon right before it; each
    of the short labels chained before it on its line too (``Wrong: Answer: ...``), and, when the
    labels (or bullets and marks alone) start the line, a heading on the last line before that is
    not blank: ending in a colon, a ``#`` heading, or up to four words with no digit or sentence mark."""
    k = _cd_skip_marks(text, start - 1)
    heading = k < 0 or text[k] in "\n\r"
    if heading:  # (from the line break that the answer's line, marks apart, starts after)
        k = _cd_heading_colon(text, k)
        if k is None:
            return None
    elif text[k] != ":":
        return None
    clause_words: list[int] = []  # the heading line's words after its last sentence mark, by position
    while True:
        if heading:  # a label on a line before: a heading of <= 8 words
            if not clause_words:
                clause_words = _cd_clause_words(text, k)
                line_start = k - len(clause_words) + 1
            if clause_words[k - line_start] > 8:  # (after the line's last sentence mark)
                return None
        seen, k, stopped = 0, k - 1, False
        for _ in range(8):
            if seen == 4:
                break
            kind, w, k = _cd_tok(text, k, -1)
            if kind is None and 0 <= k < len(text) and text[k] in "()#{}[]$":  # "Answer (wrong):", "Attempt #2:", "\\text{Wrong}:"
                k -= 1
                continue
            if kind is None and seen > 0 and 0 <= k < len(text) and text[k] == "\\" and k + 1 < len(text) \
                    and text[k + 1].isascii() and text[k + 1].isalpha():
                seen -= 1  # the word just read was a LaTeX command's name, no word of the label ("Wrong \\bf answer:")
                k -= 1
                continue
            if kind == "skip":
                continue
            if kind == "number":  # "Wrong step 2:", "Incorrect: Step 2:": the label goes on past a number
                seen += 1
                continue
            if kind != "word":
                stopped = True
                break
            if w in _CD_LABEL_NOT:
                return f"denied by {w}"
            if any(map(_cd_foreign_letter, w)):
                return f"label word in another alphabet {w}"
            if seen == 0 and w in _CD_LABEL_ALONE:  # "Mistake: 5 + 23 = 28", the word alone as the label
                b = k
                while b >= 0 and text[b] in " \t_'\u2019*\"`#>-":
                    b -= 1
                if b < 0 or text[b] in "\n\r\u2028\u2029\x85.!?:":  # (":": chained, "Answer: Mistake:")
                    return f"denied by {w} alone"
            seen += 1
        if not stopped:
            return None
        # a short label: the label before it on the line, or a heading above a line it starts
        j = _cd_skip_marks(text, k)
        if j < 0 or text[j] in "\n\r":
            if heading:  # (one heading line)
                return None
            heading, k = True, _cd_heading_colon(text, j)
            if k is None:
                return None
        elif text[j] == ":":
            k = j
        else:
            return None


def _cd_skip_marks(text: str, k: int) -> int:
    """Back from k past blanks, emphasis, bullets, quote, heading and dollar marks, and a numbered
    list item's number ("1. ", "12) ": "### Wrong answer\n\n1. 5 + 23 = 28")."""
    while k >= 0:
        if text[k] in " \t" + _CD_DECOR + "-+>#$":
            k -= 1
        elif _cd_skipped_command(text, k) is not None:  # "Wrong: \\bf Answer: ..."
            k = _cd_skipped_command(text, k) - 1
        elif text[k] in ".)" and k + 1 < len(text) and text[k + 1] in " \t":
            d = k - 1
            while d >= 0 and d > k - 4 and "0" <= text[d] <= "9":
                d -= 1
            if d == k - 1 or (d >= 0 and (text[d].isalnum() or text[d] in ".,")):
                return k  # (no digits, or a number inside other text: "3.", "v2.")
            k = d
        else:
            return k
    return k


def _cd_clause_words(text: str, end: int) -> list[int]:
    """For each place p from the start of the line holding ``end`` to ``end`` (one list, the line
    read once): how many words (``[A-Za-z']+``) the line's text before p holds after its last
    sentence mark (one of ``. ! ? : ;`` with a blank after it, both before p)."""
    lo = end
    while lo > 0 and text[lo - 1] not in "\n\r":
        lo -= 1
    counts, words, in_word, mark = [], 0, False, False
    for p in range(lo, end + 1):
        counts.append(words)
        if p == end:
            break
        c = text[p]
        if mark and c.isspace():
            words = 0  # a sentence mark and a blank: a new clause
        mark = c in ".!?:;"
        letter = c == "'" or ("a" <= c <= "z") or ("A" <= c <= "Z")
        if letter and not in_word:
            words += 1
        in_word = letter
    return counts


def _cd_heading_colon(text: str, k: int) -> int | None:
    """The index read as a heading's colon on the last line at or before ``k`` that is not blank
    (``k`` is at a line break, or -1): the line's own final colon (emphasis apart), or just past a
    ``#`` heading or a line of at most four words with no digit or sentence mark; None otherwise. A line
    of nothing but emphasis, quotes or marks (``___``) counts as blank."""
    while k >= 0:
        if text[k] in " \t\n\r" + _CD_DECOR + "-+>#$":
            k -= 1
        elif _cd_skipped_command(text, k) is not None:  # ("Wrong: \\bf" ending the line)
            k = _cd_skipped_command(text, k) - 1
        else:
            break
    if k < 0:
        return None
    last = k
    while k >= 0 and text[k] in _CD_DECOR:
        k -= 1
    if k >= 0 and text[k] == ":":
        return k
    lo = last
    while lo > 0 and text[lo - 1] not in "\n\r":
        lo -= 1
    line = text[lo:last + 1].strip(" \t")
    if line[:1] == "#":
        return last + 1
    # words alone: a digit or a sentence mark ("Oops, wrong", "23 + 5 = 29 is wrong") says an
    # earlier answer was wrong, not the one on the next line
    if all(c.isascii() and (c.isalpha() or c in " \t'()_*\"-") or c == "\u2019" for c in line) and len(
            re.findall(r"[A-Za-z']+", line)) <= 4:
        return last + 1
    return None


def _cd_previous_line(text: str, start: int) -> str | None:
    k = start - 1
    while k >= 0 and text[k] in " \t":
        k -= 1
    if k >= 0 and text[k] != "\n":
        return None
    while k >= 0 and (text[k].isspace() or _cd_skipped_command(text, k) is not None):
        k = k - 1 if text[k].isspace() else _cd_skipped_command(text, k) - 1  # ("2 * \\bf" ending it)
    if k < 0:
        return None
    if text[k] == "|":  # a Markdown table row ("| 1 | 6 * 50 | 300 |") ends the line before: no bar left open
        lo = k
        while lo > 0 and text[lo - 1] not in "\n\r":
            lo -= 1
        cells = text[lo:k].strip(" \t")
        last = cells[-1:]
        divider = all(c in "|-: \t" for c in cells)
        operation = (last in ("+", "-", "*", "/", "=", "(") or (last != "|" and _math_sign(last))
                     or last in _CD_OP_SYMBOLS or unicodedata.category(last or " ") == "Pd")  # (| 2 \u00d7 |, | 2 ^ |)
        if cells[:1] == "|" and cells.count("|") >= 2 and (divider or not operation):
            return None
    if text[k] in "+-*/=(" or _math_sign(text[k]) or text[k] in _CD_OP_SYMBOLS:
        return "continues the line before"
    if text[k] in "$`":  # "$2 \\times$", "`2 *`" ending the line: the operator in the span ends it
        while k >= 0 and text[k] in "$` \t":
            k -= 1
        if k < 0 or text[k] == "\n":
            return None
        if text[k] in "+-*/=(" or unicodedata.category(text[k]) == "Sm" or text[k] in _CD_OP_SYMBOLS:
            return "continues the line before (an operator in a span)"
    kind, w, b = _cd_tok(text, k, -1)
    if kind == "word" and w in _CD_OP_WORDS:
        return "continues the line before"
    if kind == "word" and w == "not" and b >= 0 and text[b] == "\\":  # LaTeX's \\not: a solidus over what follows
        return "continues the line before (\\not)"
    return None


def _cd_unquote(text: str) -> str:
    """Blockquote marks (``>``, nested ``> >`` or ``>>``) opening a line, blanks around them, become
    blanks, unless the last one is glued to the text after it (``>5``). The text starts a line."""
    if ">" not in text:
        return text
    out = []
    for line in text.split("\n"):
        j = 0
        while j < len(line) and line[j] in " \t":
            j += 1
        if j < len(line) and line[j] == ">":
            while j < len(line) and line[j] in "> \t":
                j += 1
            if line[j - 1] == ">" and j < len(line) and not line[j].isspace():
                j = 0  # ">5": not a quote mark
            line = " " * j + line[j:]
        out.append(line)
    return "\n".join(out)


def _cd_drop_restated(text: str, answer: str | None, target: int) -> str:
    """Blank out each arithmetic run that only says the result again (``28 = 28``, ``Result =
    28``: nothing but the target and ``=``) or, spaces apart, repeats the answer block's
    equation ``answer`` (with or without ``= target``; None: no block), when it stands alone:
    preceded by a line break, ``:``, ``*``, ``_``, a backquote, ``$`` or a word and a blank, and
    followed by the end, a line break, ``*``, ``_``, a backquote, ``$``, a check mark, or ``.``
    / ``,`` with no digit after it. A run opening with a digit or ``(`` leaves the target where it
    opens (what comes before it, ``minus 28 = 28``, acts on a number); one opening with ``=``
    (```5 + 23` = 28``) leaves only blanks. A run holding digits apart (``= 2 8``) is kept."""
    same = set()
    if answer is not None:
        squeezed = "".join(c for c in answer if c not in " \t")
        expression = squeezed.partition("=")[0]
        same = {squeezed, expression, expression + "=" + str(target)}
    goal = str(target)
    chars = list(text)
    n = len(text)
    for i, j in _cd_runs(text):
        run = text[i:j]
        squeezed = "".join(c for c in run if c not in " \t")
        sides = squeezed.split("=")
        only_result = len(sides) > 1 and goal in sides and all(x in ("", goal) for x in sides)
        digits_apart, gap = False, False  # ("= 2 8": a digit, blanks, a digit)
        for p in range(1, len(run)):
            if run[p] in " \t":
                gap = gap or run[p - 1].isdigit()
            else:
                digits_apart = digits_apart or (gap and run[p].isdigit())
                gap = False
        lead = len(run) - len(run.lstrip(" \t"))
        body = len(run.rstrip(" \t")) - lead
        left_digits = goal if run[lead:lead + 1].isdigit() or run[lead:lead + 1] == "(" else ""
        if ((squeezed in same or only_result) and any(c.isdigit() for c in run) and not digits_apart
                and len(left_digits) < body):
            left = text[i - 1] if i else ""
            right = text[j] if j < n else ""
            alone_left = left in ("\n", "\r", ":", "*", "_", "`", "$") or (left.isalpha() and run[0] in " \t")
            alone_right = (right in ("", "\n", "\r", "*", "_", "`", "$", "\u2713", "\u2714", "\u2705")
                           or (right in (".", ",") and not text[j + 1:j + 2].isdigit()))
            if alone_left and alone_right:
                chars[i:j] = [" "] * (j - i)
                chars[i + lead:i + lead + len(left_digits)] = list(left_digits)
    return "".join(chars)


def _cd_unemphasised(text: str) -> str:
    """Markdown emphasis markers dropped: star runs of one to three, taken in order, where one
    opens (no letter, digit or _ glued before it, no blank after it) and the next run on the same
    line is the same and closes (no blank before it, no letter, digit or _ glued after it), with
    two ASCII letters in a row between them (a word; *n* may be a variable), only the answer
    block (the NUL) or a wrapped equation (``**$5 + 23 = 28$**``) between them, and no operand
    outside a marker whose inside edge is a digit, a parenthesis or a wrapping symbol (``two
    **5 + 23 = 28 is it**`` may be a power). Used around an answer block and, in the final
    equation's mode, on the whole text."""
    stars = []  # (start, end) of each maximal run of "*"
    i = 0
    while i < len(text):
        if text[i] == "*":
            j = i
            while j < len(text) and text[j] == "*":
                j += 1
            stars.append((i, j))
            i = j
        else:
            i += 1
    drop = set()
    k = 0
    while k + 1 < len(stars):
        (a0, a1), (b0, b1) = stars[k], stars[k + 1]
        inner = text[a1:b0]
        glued_out = (a0 > 0 and (text[a0 - 1].isalnum() or text[a0 - 1] == "_")) or (
            b1 < len(text) and (text[b1].isalnum() or text[b1] == "_"))
        if (a1 - a0 == b1 - b0 <= 3 and inner and "\n" not in inner and not inner[0].isspace()
                and not inner[-1].isspace() and not glued_out
                and not ((inner[0].isdigit() or inner[0] in "()" or _cd_wrapping(inner[0])
                          or _cd_word_at_edge(inner, True))
                         and _cd_operand_next(text, a0 - 1, -1))  # (n **5 + 23 = 28 is it**: maybe a power)
                and not ((inner[-1].isdigit() or inner[-1] in "()" or _cd_wrapping(inner[-1])
                          or _cd_word_at_edge(inner, False))  # (5 + 23 = 28 **two**)
                         and _cd_operand_next(text, b1, 1))
                and (inner == "\0" or re.search("[a-zA-Z][a-zA-Z]", inner)
                     or (len(inner) > 2 and _cd_wrapping(inner[0]) and _cd_wrapping(inner[-1])))):
            drop.update(range(a0, a1))
            drop.update(range(b0, b1))
            k += 2
        else:
            k += 1
    return "".join(c for n, c in enumerate(text) if n not in drop)


def _cd_word_at_edge(inner: str, first: bool) -> bool:
    """Whether the letters at the start (``first``) or end of ``inner`` spell a number word."""
    n = 0
    while n < min(len(inner), 40):
        c = inner[n] if first else inner[len(inner) - 1 - n]
        if not (c.isascii() and c.isalpha()):
            break
        n += 1
    word = inner[:n] if first else inner[len(inner) - n:]
    return n > 0 and word.lower() in _CD_WORD_VALUES


def _cd_operand_next(text: str, k: int, step: int) -> bool:
    """Whether from ``k`` on in direction ``step``, blanks and quotes apart, an operand stands: a
    digit, a bracket that closes (before) or opens (after) a number, a number word or a one-letter
    variable; a run of stars next to it could be the power operator (``two **5 + 23 = 28**``)."""
    while 0 <= k < len(text) and text[k] in " \t'\"`\u2018\u2019\u201c\u201d":
        k += step
    if not 0 <= k < len(text):
        return False
    if text[k] in (")]}" if step < 0 else "([{"):  # (around a number; "(using both)" is prose)
        k += step
        while 0 <= k < len(text) and text[k] in " \t":
            k += step
        return 0 <= k < len(text) and (text[k].isnumeric() or text[k] in "()[]{}")
    if text[k].isnumeric():
        return True
    j = k
    while 0 <= j < len(text) and text[j].isascii() and text[j].isalpha():
        j += step
    word = text[k:j] if step > 0 else text[j + 1:k + 1]  # (one slice: a word built letter by letter is quadratic)
    return (len(word) == 1 and word not in "aAI") or word.lower() in _CD_WORD_VALUES  # ("a", "I": words)


def recheck_countdown(text: Any, nums: list[int], target: int, *, tags: bool = True,
                      ops: str = "+-*/") -> tuple[bool, str]:
    """The Countdown rule (see :mod:`r3.tasks.countdown_verify`), implemented separately."""
    if not isinstance(text, str) or len(text) > 100_000:
        return False, "not a string or too long"
    if text.strip().startswith("<think>"):  # a leading reasoning block: only what follows it is read
        head, closing, after = text.partition("</think>")
        if not closing:
            return False, "the reasoning block is never closed"
        text = after
    if tags:
        chunks = text.split("</answer>")
        if len(chunks) < 2 or "<answer>" not in chunks[-2]:
            # (a last </answer> whose block opened before an earlier </answer> holds a tag: never valid)
            return False, "no answer block"
        rest = chunks[-1]
        if "<answer>" in rest:
            return False, "a later block was started"
        if _cd_later_tag(rest):
            return False, "a later answer tag"
        start = len("</answer>".join(chunks[:-2])) + (len("</answer>") if len(chunks) > 2 else 0)
        start += chunks[-2].rfind("<answer>")
        end = len(text) - len(rest)
        content = chunks[-2].split("<answer>")[-1]
        outside = text[:start] + "\0" + text[end:]
        if _cd_unstrike(outside).count("\0") < outside.count("\0"):  # the span struck out took the block's NUL
            return False, "answer block struck through"
        # read what is around the block as a person does; the block itself stands as one NUL
        head, tail = _cd_read(text[:start]), _cd_read(rest)
        if head is None or tail is None:
            return False, "bidirectional controls"
        head, _, tail = _cd_without_rules(head + "\0" + tail).partition("\0")  # (_cd_read drops NULs)
        # (unquoted with the NUL: "><answer>" keeps its ">", glued as in ">5")
        around = _cd_unemphasised(_cd_unquote(head + "\0") + _cd_drop_restated(tail, content, target))
        start = around.index("\0")
        end = start + 1
        k1 = start - 1
        while k1 >= 0 and around[k1] in " \t":
            k1 -= 1
        k2 = end
        while k2 < len(around) and around[k2] in " \t":
            k2 += 1
        for k, glued, right in ((k1, k1 == start - 1, False), (k2, k2 == end, True)):
            why = _cd_side_problem(around, k, glued, right, True)
            if why:
                return False, why
        if (content.strip()[:1] == "(" and k1 >= 0 and k1 < start - 1 and _cd_function_letter(around, k1)
                and _cd_next_after_wrapping(around, k1 + 1) == "\0"):
            return False, "a function or variable applied to the block"
        why = (_cd_words_problem(around, start, end) or _cd_colon_label(around, start)
               or _cd_wrapped(around, start, True) or _cd_wrapped_after(around, end)
               or _cd_previous_line(around, start) or _cd_after(around, end, nums, target))
        if why:
            return False, why
        return _cd_check_equation(content, nums, target, ops)
    text = _cd_read(text)
    if text is None:
        return False, "bidirectional controls"
    text = _cd_without_rules(text)
    text = _cd_unemphasised(_cd_drop_restated(_cd_unquote(text), None, target))  # (as around an answer block: "**Answer:** $5 + 23 = 28$", "**So 5 + 23 = 28.**")
    span = _cd_final_run(text)
    if span is None:
        return False, "no equation"
    start, end = span
    body = text[start:end]
    a = start + len(body) - len(body.lstrip(" \t"))
    b = start + len(body.rstrip(" \t"))
    # Markdown bold markers that pair up on the line, a prose parenthesis, parentheses around it all
    line_lo = text.rfind("\n", 0, start) + 1
    line_hi = text.find("\n", end)
    line_hi = len(text) if line_hi == -1 else line_hi
    markers = [line_lo + m.start() for m in re.finditer(r"\*\*", text[line_lo:line_hi])]
    paired = set(markers[: len(markers) // 2 * 2])
    def trim(a, b):
        while a < b and text[a] in " \t":
            a += 1
        while b > a and text[b - 1] in " \t":
            b -= 1
        return a, b

    if b - a > 2 and _cd_list_bullet(text, a):  # "- 5 + 23 = 28": a list item, not a unary minus
        a, b = trim(a + 1, b)
    for _ in range(3):
        old_ab = (a, b)
        if (b - a >= 2 and text[a:a + 2] == "**" and a in paired and (a == 0 or not text[a - 1].isalnum())
                and not _cd_operand_next(text, a - 1, -1)):  # ("two **5 + 23 = 28**": maybe a power)
            a += 2
        if (b - a >= 2 and text[b - 2:b] == "**" and b - 2 in paired and (b == len(text) or not text[b].isalnum())
                and not _cd_operand_next(text, b, 1)):
            b -= 2
        # a single star of emphasis glued to each end, nothing glued outside: *5 + 23 = 28*
        if (b - a >= 3 and text[a] == "*" and text[b - 1] == "*" and text[a + 1] not in "* \t"
                and text[b - 2] not in "* \t" and not (a > 0 and (text[a - 1].isalnum() or text[a - 1] in "_*"))
                and not (b < len(text) and (text[b].isalnum() or text[b] in "_*"))
                and not _cd_operand_next(text, a - 1, -1) and not _cd_operand_next(text, b, 1)):
            a, b = a + 1, b - 1
        a, b = trim(a, b)
        if b - a > 1 and text[a] == ")" and a > 0 and (_letter(text[a - 1]) or text[a - 1] in ".,:;!?'\""):
            a += 1
        if b - a > 1 and text[b - 1] == "(" and b < len(text) and _letter(text[b]):
            b -= 1
        a, b = trim(a, b)
        if b - a > 2 and text[a] == "(" and text[b - 1] == ")" and "=" in text[a:b]:
            depth, closes_at = 0, None
            for k in range(a, b):
                depth += 1 if text[k] == "(" else -1 if text[k] == ")" else 0
                if depth == 0:
                    closes_at = k
                    break
            if closes_at == b - 1:
                a, b = trim(a + 1, b - 1)
        if (a, b) == old_ab:
            break
    core = text[a:b]
    if not core:
        return False, "no equation"
    glued_l = all(c not in " \t" for c in text[start:a])
    glued_r = all(c not in " \t" for c in text[b:end])
    # _5 + 23 = 28_: the same one to three underscores glued to both ends and to nothing outside
    under = 0
    for size in (3, 2, 1):
        if (start >= size and text[start - size:start] == "_" * size and text[end:end + size] == "_" * size
                and text[start] not in " \t" and text[end - 1] not in " \t"
                and not (start > size and (text[start - size - 1].isalnum() or text[start - size - 1] == "_"))
                and not (end + size < len(text) and (text[end + size].isalnum() or text[end + size] == "_"))):
            under = size
            break
    lk, rk = start - 1 - under, end + under
    if under:  # and the blanks past them, as the run takes in its own ("_5 + 23 = 28_ ^ n")
        while lk >= 0 and text[lk] in " \t":
            lk -= 1
        while rk < len(text) and text[rk] in " \t":
            rk += 1
        glued_l, glued_r = lk == start - 1 - under, rk == end + under
    for k, glued, right in ((lk, glued_l, False), (rk, glued_r, True)):
        why = _cd_side_problem(text, k, glued, right, "=" in core)
        if why:
            return False, why
    why = (_cd_words_problem(text, start, end) or _cd_colon_label(text, start) or _cd_previous_line(text, start)
           or _cd_operand(text, start) or _cd_wrapped(text, start, "=" in core)
           or _cd_wrapped_after(text, end))
    if why:
        return False, why
    # "<answer>" and "\boxed{" read as the word "answer": what is before that word is still next to it
    why = _cd_answer_word(text, start, "=" in core, nested=True)
    if why:
        return False, why
    linked = 0
    if "=" not in core:
        result, negated = _cd_number_after(text, end, strict=True)
        if negated:
            return False, "negated result"
        if result is not None:
            core = f"{core} = {result}"
            # the linking words ("gives us") are not among the four words after it: the result ends it
            if result.isdigit():
                linked = len(re.findall(r"[A-Za-z]+(?:['\u2019][A-Za-z]+)?", text[end:text.find(result, end)]))
        else:
            why = _cd_bare(text, b) or _cd_bare_denied(text, start)
            if why:
                return False, why
    # the text after it, with an opening parenthesis the run ended in ("... = 28 (five)")
    why = _cd_after(text, end - 1 if text[end - 1] == "(" and b < end else end + under, nums, target, linked)
    if why:
        return False, why
    return _cd_check_equation(core, nums, target, ops)


_CD_RESETS = {"but", "so", "and", "then", "now", "instead", "is", "was", "are", "be", "answer", "answers", "result",
              "results", "solution", "equation", "expression", "correct", "right"}


def _cd_bare_denied(text: str, start: int) -> str | None:
    """A bare expression is denied by a negation earlier in its clause (after the last sentence or
    clause mark) when no new clause or answer statement (:data:`_CD_RESETS`) follows the negation."""
    k = start - 1
    while k >= 0 and text[k] not in ".!?,;:\n\r\u2028\u2029\x85":
        k -= 1
    words = [w.lower().replace("\u2019", "'") for w in re.findall(r"[A-Za-z]+(?:['\u2019][A-Za-z]+)?", text[k + 1:start])]
    resets = [j for j, w in enumerate(words) if w in _CD_RESETS]
    if resets:
        words = words[resets[-1] + 1:]
    denied = [w for w in words if w in _CD_NOT]
    return f"bare expression denied in its clause ({denied[0]})" if denied else None


def _cd_subject(text: str, begin: int, i: int) -> int | None:
    """Reading back from ``i`` (an answer word) to ``begin``, over blanks, stars, underscores,
    straight and curly quotes, backticks and dollar signs: the number that the words between make
    the answer, or None."""
    verb, fillers, k = False, 0, i
    while True:
        while k > begin and (text[k - 1].isspace() or text[k - 1] in "*_'\u2018\u2019\u201c\u201d\"`$"):
            k -= 1
        if k <= begin:
            return None
        j = k
        if text[k - 1] in "0123456789":
            while j > begin and text[j - 1] in "0123456789":
                j -= 1
            return int(text[j:k]) if verb else None
        while j > begin and _cd_ascii_letter(text[j - 1]):
            j -= 1
        if j - 1 > begin and j < k and text[j - 1] in "'\u2019" and _cd_ascii_letter(text[j - 2]):
            j -= 1  # (one apostrophe between letters belongs to the word: "it's", "the'final")
            while j > begin and _cd_ascii_letter(text[j - 1]):
                j -= 1
        word = "".join(_cd_ascii_letter(c) or c for c in text[j:k]).lower()
        if not verb and word in _CD_VERBS:
            verb, fillers = True, 0
        elif word in _CD_FILLERS and fillers < (2 if verb else 4):
            fillers += 1
        else:
            return None  # (also any other character: j == k, an empty word)
        k = j


def _cd_after(text: str, i: int, nums: list[int], target: int, linked: int = 0) -> str | None:
    """The tokens after the final equation: only the given numbers and the target, no decimals, no
    arithmetic (signs, operator words, "<operation> of", LaTeX fractions), no other answer after a
    cue (next to it, or later in an answer/result sentence), no number word stating another value,
    no denial or cross mark."""
    allowed = {int(n) for n in nums} | {int(target)}
    window: list[tuple[str, str]] = []
    n = len(text)
    begin = i
    answer_sentence = False
    near = 0  # words read in the equation's own sentence; -1 once it ended or a fifth word came
    same_sentence = True  # the equation's sentence and line go on (any number of words)
    tag: int | None = None  # words after the last ", ; \u2013 \u2014" or ellipsis in that sentence ("..., right?")
    skip_to = -1  # the unit word of "thirty-two" was read with "thirty"

    def after_cue() -> bool:
        for k2, v2 in reversed(window):
            if k2 == "word" and v2 in _CD_CUES:
                return True
            if not ((k2 == "word" and v2 in _CD_LINKS) or (k2 == "other" and v2 in ":,;\"'*`([$\u201c\u201d\u2018")):
                return False
        return False

    def of_operation() -> bool:
        return (len(window) >= 2 and window[-1] == ("word", "of") and window[-2][0] == "word"
                and window[-2][1] in _CD_OF_OPS)

    def states(paren: bool = True) -> bool:
        # ("(" before a number word only: "(eighteen)" states a value, "(5 and 23 ...)" names the numbers;
        # a hedge may stand after the stating word: "or maybe 23", "or rather 23")
        seen = [(k2, v2) for k2, v2 in window if not (k2 == "other" and v2 in ",\"'*_`\u201c\u201d")][-3:]
        if seen and seen[-1] == ("other", "("):
            return paren
        if seen and seen[-1][0] == "word" and seen[-1][1] in _CD_HEDGES:
            seen = seen[:-1]
        seen = seen[-2:]
        if not seen or seen[-1][0] != "word":
            return False
        last = seen[-1][1]
        return last in _CD_STATES or (last in ("is", "was", "be") and len(seen) == 2 and seen[0][0] == "word"
                                      and seen[0][1] in _CD_STATES_BEFORE_IS)

    while i < n:
        c = text[i]
        if c.isspace():
            if c in "\n\r\u2028\u2029\x85":
                e = i + 1
                while e < n and text[e].isspace():
                    e += 1
                # (a fence closing the block: its sentence goes on; so does a line that opens with a comma)
                if not text.startswith(("```", "~~~", "$$", ","), e):
                    answer_sentence, near, same_sentence = False, -1, False
                i = e  # (the rest of the blanks read at once: each line break would look ahead again)
                continue
            i += 1
            continue
        j = i + 1
        if c in "0123456789":
            while j < n and text[j] in "0123456789":
                j += 1
            tok = text[i:j]
            if len(tok) > 12 or (tok[0] == "0" and tok != "0") or int(tok) not in allowed:
                return f"later number {tok[:12]}"
            if int(tok) != target and (answer_sentence or after_cue()):
                return "later answer"
            if int(tok) != target and states(paren=False):
                return "later stated result"
            if j + 1 < n and text[j] == "." and text[j + 1].isdigit():
                return "later decimal"
            if i > 0 and text[i - 1] == "." and not (i > 1 and (text[i - 2].isalnum() or text[i - 2] == ".")):
                return "later decimal without its integer part (.5)"
            if j + 1 < n and text[j] == "," and text[j + 1].isdigit() and (answer_sentence or after_cue()):
                return "later answer with a decimal comma"
            if of_operation():
                return "later operation of a number"
            kind = "number"
        elif c.isnumeric():
            return "later foreign number"
        elif text.startswith("####", i):
            tok, kind, j = "####", "word", i + 4
        elif _cd_foreign_letter(c):
            return "later word in another alphabet"  # (Cyrillic, Greek, CJK: their denials are not read)
        elif _cd_ascii_letter(c):  # (a letter with diacritics or full-width reads as its letter: "Não" is "nao")
            while j < n and _cd_ascii_letter(text[j]):
                j += 1
            if j + 1 < n and text[j] in "'\u2019" and _cd_ascii_letter(text[j + 1]):
                j += 1
                while j < n and _cd_ascii_letter(text[j]):
                    j += 1
            tok = "".join(_cd_ascii_letter(ch) or ch for ch in text[i:j])
            tok, kind = tok.lower().replace("\u2019", "'"), "word"
            if tag is not None:
                tag += 1
            if linked > 0:  # a word linking the expression to its result in words
                linked -= 1
            elif near >= 0:
                near = near + 1 if near < 4 else -1
            ascii_end = i
            while ascii_end < j and text[ascii_end].isascii() and text[ascii_end].isalpha():
                ascii_end += 1
            head = text[i:ascii_end].lower()  # (its ASCII letters, when diacritics follow: "wrongé")
            if (tok in _CD_NOT and not _cd_hyphen_prefix(tok, text, j)) or tok in _CD_DENIED_LATER \
                    or (tok in ("that", "it", "this") and len(window) > 0 and window[-1][0] == "word"
                        and window[-1][1] in _CD_TAKE_BACK) \
                    or (tok == "back" and window[-2:] == [("word", "take"), ("word", "it")]) \
                    or (len(window) > 0 and window[-1][0] == "word" and (window[-1][1], tok) in _CD_DENIED_PAIRS) \
                    or (tok == "off" and len(window) > 0 and window[-1][0] == "word" and window[-1][1] in _CD_OFF_AFTER) \
                    or (ascii_end < j and not text[ascii_end].isascii() and (head in _CD_NOT or head in _CD_DENIED_LATER)):
                return "later denial"
            if tok in _CD_OBJECTS and any(k2 == "word" and v2 in _CD_ACTIONS for k2, v2 in window[-5:]):
                return "later arithmetic on the result"
            if tok in _CD_NUMBER_WORDS and after_cue():
                return "later answer in words"
            if window[-1:] == [("other", "\\")]:
                if tok in ("frac", "dfrac", "tfrac", "div"):
                    return "later LaTeX operation"
                if tok == "boxed" and j < n and text[j] == "{":
                    k = j + 1
                    while k < n and text[k] not in "{}":
                        k += 1
                    if k < n and text[k] == "{":
                        return "later nested \\boxed"
            if tok == "away" and window and window[-1][1] in ("take", "takes", "took", "taking", "taken"):
                tok = "take away"
            if tok in _CD_WORD_VALUES and (  # "Then times two.", "minus five", "divided by three"
                    (window[-1:] and window[-1][0] == "word" and window[-1][1] in ("times", "plus", "minus", "less"))
                    or window[-2:] in ([("word", "divided"), ("word", "by")], [("word", "multiplied"), ("word", "by")])):
                return "later arithmetic on a number word"
            if tok in _CD_WORD_VALUES and i >= skip_to:
                value = _CD_WORD_VALUES[tok]
                if tok in _CD_TENS:
                    k = j + 1 if j < n and text[j] in "-\u2010\u2011 " else j
                    e = k
                    while e < n and _cd_ascii_letter(text[e]):
                        e += 1
                    unit = "".join(_cd_ascii_letter(ch) for ch in text[k:e]).lower()
                    if 1 <= _CD_WORD_VALUES.get(unit, 0) <= 9 and not (e < n and (text[e].isalnum() or text[e] == "_")):
                        value += _CD_WORD_VALUES[unit]
                        skip_to = e
                if value != target and (answer_sentence or states() or of_operation()
                                        or (value >= 10 and value not in allowed)):
                    return "later number word"
        elif c in _CD_CROSSES:
            return "later cross mark"
        elif c == "?" and near >= 0:
            return "a question right after it"
        elif c == "?" and same_sentence and tag is not None and 1 <= tag <= 3:
            return "a tag question ends its sentence"
        elif c == "?" and [v2 for k2, v2 in window[-3:] if k2 == "word"] in (
                [a, b, d] for a in ["or"] for b in ("is", "was") for d in ("it", "that", "this")):
            return "later doubt (or is it?)"
        else:
            tok = c
            # "/" is division; "*" with blanks on both sides is multiplication (Markdown emphasis never is)
            spaced_star = c == "*" and 0 < i and text[i - 1].isspace() and j < n and text[j].isspace()
            if spaced_star and text[text.rfind("\n", 0, i) + 1:i].strip(" \t") == "":
                spaced_star = False  # a "* " that starts its line is a bullet
            kind = "sign" if (c in "^%~/" or c in _CD_OP_SYMBOLS or unicodedata.category(c) in ("Sm", "Pd")
                              or spaced_star) else "other"
        if window:
            pk, pv = window[-1]
            if sorted((kind, pk)) == ["number", "sign"]:
                return "later arithmetic"
            word = tok if kind == "word" else pv
            if sorted((kind, pk)) == ["number", "word"] and (word in _CD_OP_WORDS or word == "take away"):
                return "later arithmetic (word)"
        if kind == "number" and any(k2 == "word" and v2 in _CD_ACTIONS for k2, v2 in window[-3:]):
            return "later arithmetic (a number after an operation)"
        if kind == "word" and tok in _CD_SENTENCE_CUES:
            subject = _cd_subject(text, begin, i)
            if subject is not None and subject != target:
                return "later answer before its cue"
            answer_sentence = True
        elif (tok in (".", "!", "?") and not (tok in (".", "!") and j < n and text[j] in ".!?")
              and not (tok == "." and i > 0 and text[i - 1] == ".")):
            # ("right...?", "!?": the run's last mark ends it; "..." is a pause, as the one character "\u2026")
            answer_sentence, near, same_sentence = False, -1, False
        ellipsis = tok == "\u2026" or (tok == "." and ((i > 0 and text[i - 1] == ".") or (j < n and text[j] == ".")))
        ascii_dash = tok == "-" and i > 0 and text[i - 1] in " \t-"  # ("... -- right?", "... - right?")
        if same_sentence and (tok in (",", ";", ":", "(", "\u2013", "\u2014") or ellipsis or ascii_dash):
            tag = 0
        window = (window + [(kind, tok)])[-8:]
        i = j
    if window:
        k_last, v_last = window[-1]
        if k_last == "sign" or v_last in ("*", "/"):
            return "ends in an operator"
        if k_last == "word" and (v_last in _CD_ACTIONS or v_last in _CD_OP_WORDS):
            return "ends in an operation word"
    return None


def _cd_operand(text: str, start: int) -> str | None:
    """An operation on both sides / itself earlier in the equation's sentence."""
    lo = start
    while lo > 0 and text[lo - 1] not in ".!?\n\r\u2028\u2029\x85":
        lo -= 1
    words = re.findall(r"[0-9]+|[A-Za-z]+(?:['\u2019][A-Za-z]+)?|\S", text[lo:start])
    seen = None
    for k, w in enumerate(words):
        w = w.lower().replace("\u2019", "'")
        if w in _CD_ACTIONS:
            seen = k
        elif w in _CD_OPERANDS and seen is not None and k - seen <= 5:
            return "operand of an earlier operation"
    return None


def _cd_bare(text: str, i: int) -> str | None:
    """After an expression with no written result: only a few words up to the sentence's end."""
    last = None
    n = len(text)
    while i < n:
        c = text[i]
        if c in ".!?;:\n\r\u2028\u2029\x85" or c.isnumeric():
            return None
        if not (c.isalpha() or c in "_'\u2019*\"`"):
            i += 1
            continue
        j = i
        while j < n and (text[j].isalpha() or text[j] in "_'\u2019*\"`"):
            j += 1
        if j - i > 33:
            return "mentioned, not answered"
        w = text[i:j].strip("_'\u2019*\"`").replace("\u2019", "'").lower()
        if not w:
            i = j
            continue
        if w not in _CD_BARE_OK:
            return "mentioned, not answered"
        last, i = w, j
    if last is not None and last not in _CD_BARE_LAST:
        return "cut off before a result"
    return None


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


def _fc_float(literal):
    """The float of a JSON number literal with a fraction or exponent, only when its shortest
    decimal has the literal's exact value (more digits than a float holds: invalid). Built from
    the literal's significant digits: Fraction(literal) would build 10 ** exponent for any
    exponent, and Python refuses int() of more than 4,300 digits, zeros included."""
    value = float(literal)
    mantissa, _, exponent = literal.lower().partition("e")
    whole, _, frac = mantissa.lstrip("-").partition(".")
    whole, frac = whole.lstrip("0"), frac.rstrip("0")
    digits = (whole + frac).lstrip("0")
    significant = digits.rstrip("0")
    if not significant:
        return value  # (zero, whatever its exponent: value is 0.0 or -0.0)
    e_digits = exponent.lstrip("+-").lstrip("0") or "0"
    if len(e_digits) > 6:  # (a leading digit beyond any float's)
        raise ValueError(literal)
    e = -int(e_digits) if exponent.startswith("-") else int(e_digits)
    # (a leading digit beyond any float's, or more significant digits than a float's exact
    # decimal has (at most 767): not a float's value)
    if abs(e) > 400 + len(whole) + len(frac) or len(significant) > 800:
        raise ValueError(literal)
    if value in (float("inf"), float("-inf")):
        raise ValueError(literal)
    exact = Fraction(int(significant)) * Fraction(10) ** (e - len(frac) + len(digits) - len(significant))
    if Fraction(repr(value)) != (-exact if mantissa.startswith("-") else exact):
        raise ValueError(literal)
    return value


_FC_DECODER = json.JSONDecoder(object_pairs_hook=_fc_hook, parse_constant=_fc_const, parse_float=_fc_float)


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
        if "arguments" in c:
            akey = "arguments"
        elif "parameters" in c:
            akey = "parameters"
        elif set(c) != {"name"}:
            return None
        else:
            akey = None
        args = c[akey] if akey else {}
        if akey == "arguments" and type(args) is str:
            args = _fc_parse(args)  # (JSON-encoded arguments; ValueError when not JSON)
        if type(args) is not dict:
            return None
        for key in c:
            if key == "name" or key == akey:
                continue
            # beside them only metadata: id and index with a scalar, type as "function"
            if key not in ("id", "type", "index") or type(c[key]) in (dict, list):
                return None
            if key == "type" and c[key] != "function":
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


# keys that name the function in other call schemas
_FC_FUNCTION_KEYS = ("function", "function_name", "functionname", "func", "fn", "tool", "tool_name", "toolname",
                     "action", "recipient_name", "api", "api_name", "method", "command")


def _fc_spans(text: str, begin: int = 0) -> list[tuple[int, int, bool]]:
    """(start, end, complete) of each top-level bracketed structure from ``begin`` on, char by
    char: complete, broken at a mismatched closing bracket, or truncated at the end of the text.
    Strings are skipped: double-quoted, and single-quoted where a value or key starts and closed
    on its line."""
    out, i, n = [], begin, len(text)
    while i < n:
        if text[i] not in "[{":
            i += 1
            continue
        start, want, j, ok = i, [], i, False
        quote, esc = "", False
        while j < n:
            c = text[j]
            if quote:
                if esc:
                    esc = False
                elif c == "\\":
                    esc = True
                elif c == quote:
                    quote = ""
            elif c == '"':
                quote = c
            elif c == "'":
                # a single-quoted string only where a value or key starts, closed on its line
                k = j - 1
                while k > start and text[k].isspace():
                    k -= 1
                if text[k] in "[{,:":
                    e = j + 1
                    while e < n and text[e] not in "'\n\r":
                        e += 2 if text[e] == "\\" else 1
                    if e < n and text[e] == "'":
                        quote = c
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
        out.append((start, min(j + 1, n), ok))
        i = j + 1
    return out


def _fc_top_level(text: str) -> list[tuple[str, bool]]:
    """(text, complete) of each top-level bracketed structure (see :func:`_fc_spans`)."""
    return [(text[a:b], ok) for a, b, ok in _fc_spans(text)]


def _fc_without_structures(text: str) -> str:
    """The text with each top-level bracketed structure blanked (spaces) but its line breaks."""
    out, at = [], 0
    for a, b, _ in _fc_spans(text):
        out.append(text[at:a])
        out.append("".join(c if c in "\n\r\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029" else " " for c in text[a:b]))
        at = b
    out.append(text[at:])
    return "".join(out)


_FC_COLONS = set(":=\u02d0\u02d1\u02f8\u0589\u05c3\u0703\u0704\u0705\u0706\u0707\u0708\u0709\u1361\u1365"
                 "\u1366\u1804\u205a\u205d\u2236\u2254\u2255\u2982\u2af6\ua4fd\ua6f4\ua789\ufe13\ufe30\ufe55"
                 "\uff1a\u0903\u0983\u0a03\u0a83\u0b03\u0c03\u0c83\u0d03\u0d83\u0f7f"
                 "\U00010781\U00010782\U00012471\U00012472\U0001da8a")


def _fc_is_attempt(chunk: str, complete: bool) -> bool:
    if any(c in _FC_COLONS for c in chunk):
        return True
    inner = chunk[1:-1] if len(chunk) >= 2 else "x"
    return (complete and chunk[0] == "[" and chunk[-1] == "]"
            and all(c.isspace() or "\u200b" <= c <= "\u200f" or c in "\u2060\ufeff" for c in inner))


def _fc_yield(v):
    if isinstance(v, list) and not v:
        return []
    calls = _fc_calls(v, allow_empty=False)
    if calls is not None:
        return calls
    if isinstance(v, list):  # items that are calls or wrappers of calls, each making some
        out = []
        for item in v:
            got = _fc_yield(item) if isinstance(item, dict) else None
            if not got:
                return None
            out += got
        return out
    if isinstance(v, dict) and "name" not in v:  # (a call-shaped object wraps nothing)
        structures = [key for key in v if type(v[key]) in (dict, list)]
        if len(structures) != 1:  # (a second one might hold a second call)
            return None
        holder = structures[0]
        if holder.casefold() not in ("tool_calls", "calls", "function_calls", "functions", "tool_uses", "tools",
                                     "function", "function_call"):  # (the last: OpenAI's legacy message)
            return None  # ({"do_not_call": [...]}, {"rejected_calls": [...]}: not calls)
        for key, x in v.items():
            if key == holder:
                continue
            if key == "content":
                fine = x is None or x == ""
            elif key == "type":
                fine = x == "function"
            else:
                fine = key in ("id", "role")
            if not fine:
                return None  # (a flag, a function name, a message: {"dry_run": true, ...})
        got = _fc_yield(v[holder])
        if got == [] and not (len(v) == 1 and holder.casefold() in (
                "tool_calls", "calls", "function_calls", "functions", "tool_uses", "tools")):
            return None  # (no calls through an object that says more)
        return got
    return None


def _fc_fold(text: str) -> str:
    """Without combining marks, format characters (Mn, Me, Cf) and anything with a combining
    class, NFKC, case-folded, again without them."""
    def visible(t: str) -> str:
        return "".join(c for c in t if unicodedata.category(c) not in ("Mn", "Me", "Cf")
                       and unicodedata.combining(c) == 0)

    return visible(unicodedata.normalize("NFKC", visible(text)).casefold())


_FC_ID = set("abcdefghijklmnopqrstuvwxyz0123456789_")
_FC_ID_START = set("abcdefghijklmnopqrstuvwxyz_")


def _fc_unescape(folded: str) -> str:
    """HTML character references (``&lt;``, ``&#40;``) and markdown backslash escapes (``\\(``)
    read as what they render, folded again; unchanged without a ``&`` or backslash."""
    if "&" not in folded and "\\" not in folded:
        return folded
    s = html.unescape(folded)
    out, i = [], 0
    while i < len(s):
        if s[i] == "\\" and i + 1 < len(s) and s[i + 1] in "!\"#$%&'()*+,-./:;<=>?@[\\]^_`{|}~":
            out.append(s[i + 1])
            i += 2
        else:
            out.append(s[i])
            i += 1
    return _fc_fold("".join(out))


def _fc_after_action(folded: str, k: int) -> bool:
    """Whether the name at ``k`` follows ReAct's action label, read backwards: an optional
    ``functions.``, blanks / emphasis / quotes, ``:``, blanks / emphasis / quotes, optional digits
    (blanks before them), then the word ``action`` (no word character before it)."""
    decor = "*_`'\""
    c = k - 10 if folded[max(0, k - 10):k] == "functions." else k
    while c > 0 and (folded[c - 1].isspace() or folded[c - 1] in decor):
        c -= 1
    if c == 0 or folded[c - 1] != ":":
        return False
    c -= 1
    while c > 0 and (folded[c - 1].isspace() or folded[c - 1] in decor):
        c -= 1
    if c > 0 and folded[c - 1].isdecimal():
        while c > 0 and folded[c - 1].isdecimal():
            c -= 1
        while c > 0 and folded[c - 1].isspace():
            c -= 1
    if folded[max(0, c - 6):c] != "action":
        return False
    lead = folded[c - 7] if c >= 7 else ""
    return not (lead.isalnum() or lead == "_")


# What may close a name before its parenthesis: Markdown emphasis or code, quotes ("**reset**(")
_FC_NAME_CLOSE = "*`'\"\u2019\u201d"


def _fc_named_call_after(folded: str, names: list[str]) -> bool:
    """A tool's folded name, not preceded by an ASCII letter or ``_`` (a dot or digits are fine),
    followed by blanks and an opening parenthesis, or by ``[`` right away (ReAct); a tag named so
    (``<delete_file>``, ``</delete_file>``, ``<delete_file path="/"/>``); or the name, not followed
    by a name character, after the word ``action``, blanks, ``:`` and blanks (ReAct's ``Action:
    delete_file``). Up to three closing marks (``*``, backquote, quotes) may stand between the name
    and its parenthesis; with blanks after them the parenthesis must open with a keyword or close
    at once (:func:`_fc_opens_with_a_keyword`). Escapes are read first (:func:`_fc_unescape`)."""
    folded = _fc_unescape(folded)
    for name in names:
        key = _fc_fold(name).strip() if type(name) is str else ""
        if not key:
            continue
        k = folded.find(key)
        while k != -1:
            before = folded[k - 1] if k > 0 else ""
            j = k + len(key)
            while j < len(folded) and j - k - len(key) < 3 and folded[j] in _FC_NAME_CLOSE:
                j += 1
            closed, marks_end = j > k + len(key), j
            while j < len(folded) and folded[j].isspace():
                j += 1
            spaced = j > marks_end
            if before not in _FC_ID_START and folded[j:j + 1] == "(" and closed and spaced:
                # ("`get_weather` (the tool)" is prose: after a closing mark and blanks, the
                # parenthesis must close at once or open with a keyword)
                a = j + 1
                while a < len(folded) and folded[a].isspace():
                    a += 1
                if _fc_opens_with_a_keyword(folded, a):
                    return True
            elif before not in _FC_ID_START and (folded[j:j + 1] == "("
                                                 or folded[k + len(key):k + len(key) + 1] == "["):
                return True
            # a tag: "<", blanks, maybe "/" and blanks, then the name, not followed by a name character
            b = k
            while b > 0 and folded[b - 1].isspace():
                b -= 1
            if b > 0 and folded[b - 1] == "/":
                b -= 1
                while b > 0 and folded[b - 1].isspace():
                    b -= 1
            after = folded[k + len(key):k + len(key) + 1]
            if b > 0 and folded[b - 1] == "<" and not (after and after in _FC_ID):
                return True
            # ReAct: "action", blanks, ":", blanks, the name
            if not (after and after in _FC_ID) and _fc_after_action(folded, k):
                return True
            k = folded.find(key, k + 1)
    return False


def _fc_opens_with_a_keyword(folded: str, j: int) -> bool:
    """At ``j`` (after the parenthesis and blanks): a closing parenthesis, or a name and a single
    ``=`` (what must follow a name behind a closing mark: ``**reset**(force=True)``; ``**Paris**
    ("FR")`` is prose)."""
    if folded[j:j + 1] == ")":
        return True
    if not (folded[j:j + 1] and folded[j] in _FC_ID_START):
        return False
    k = j
    while k < len(folded) and folded[k] in _FC_ID:
        k += 1
    while k < len(folded) and folded[k].isspace():
        k += 1
    return folded[k:k + 1] == "=" and folded[k + 1:k + 2] != "="


def _fc_opens_like_a_call(folded: str, j: int) -> bool:
    """At ``j`` (after the parenthesis and blanks): a closing parenthesis, a bracket or brace, a
    quote (straight, back or curly; after up to two of r/b/u/f), or a name and a single ``=``."""
    c = folded[j:j + 1]
    if c and c in "[{'\"`\u2018\u201c":
        return True
    k = j
    while k < len(folded) and k - j < 2 and folded[k] in "rbuf":
        k += 1
    if k > j and folded[k:k + 1] in ("'", '"'):
        return True
    return _fc_opens_with_a_keyword(folded, j)


def _fc_marker(folded: str, quoted: bool) -> bool:
    """Another model's tool-call syntax: an opening <tool_call>, <invoke or <function_calls tag,
    [tool_calls], <|tool_call, <|recipient, <|python_tag, >>> before a name, "action input:", a
    ```tool_code (or ~~~tool_code) fence, Gemma 3's; YAML
    keys (``quoted``: also in quotes, as JSON without braces)."""
    def skip_blanks(j):
        while j < len(folded) and folded[j].isspace():
            j += 1
        return j

    for k, ch in enumerate(folded):
        if ch == "<":
            j = skip_blanks(k + 1)
            # (Llama's <|python_tag|> leads into code for its interpreter where no call follows)
            if folded.startswith("|", k + 1) and any(folded.startswith(word, skip_blanks(k + 2))
                                                     for word in ("tool_call", "recipient", "python_tag")):
                return True
            for word in ("tool_call", "tool_calls", "invoke", "function_calls", "function_call", "function"):
                after = folded[j + len(word):j + len(word) + 1]
                if folded.startswith(word, j) and not (after and after in _FC_ID):
                    return True
        elif ch == "[":
            j = skip_blanks(k + 1)
            e = skip_blanks(j + len("tool_calls"))
            if folded.startswith("tool_calls", j) and folded[e:e + 1] == "]":
                return True
        elif ch == ">" and folded.startswith(">>", k + 1):
            j = skip_blanks(k + 3)
            if folded[j:j + 1] and folded[j] in _FC_ID_START:
                return True
        elif ch == "a" and folded.startswith("action", k):
            j = skip_blanks(k + len("action"))
            e = skip_blanks(j + len("input"))
            if folded.startswith("input", j) and folded[e:e + 1] == ":":
                return True
        elif ch == "t" and folded.startswith("tool\u2581call", k):
            return True
        elif ch == "t" and folded.startswith("to", k) and (k == 0 or not (folded[k - 1].isalnum() or folded[k - 1] == "_")):
            j = skip_blanks(k + 2)
            if folded[j:j + 1] == "=" and folded.startswith("functions.", skip_blanks(j + 1)):
                return True
        elif ch == "\u273f" and folded.startswith("\u273ffunction\u273f", k):
            return True
        elif ch in "`~" and folded.startswith(ch * 3, k):
            # Gemma 3's ```tool_code fence: its harness evaluates the Python in it ("wipe(1)" too)
            j = k + 3
            while j < len(folded) and folded[j] in " \t":
                j += 1
            if folded.startswith("tool_code", j):  # (also glued to what follows: a harness's regex is)
                return True
    return _fc_yaml(folded, quoted)


def _fc_yaml(folded: str, quoted: bool) -> bool:
    """A line keyed name (function, tool, method, ...) and one keyed arguments (args, parameters,
    ...; a key of up to three words, one blank between: ``tool name``) within 8 lines that are not
    blank, in either order (YAML: list items, quotes, keys in bold or backquotes too; in straight
    or curly quotes where ``quoted``)."""
    decoration = "*`\"'\u2018\u2019\u201c\u201d" if quoted else "*`"
    name_keys = _FC_FUNCTION_KEYS + ("name", "recipient", "fn_name", "fnname", "func_name", "funcname",
                                     "function_call", "tool_call")
    argument_keys = ("arguments", "argument", "args", "parameters", "parameter", "params", "input", "inputs",
                     "action_input", "kwargs", "tool_input", "toolinput", "tool_args", "toolargs", "tool_arguments",
                     "toolarguments", "tool_parameters", "toolparameters", "tool_params", "toolparams",
                     "function_arguments", "functionarguments", "function_args", "functionargs",
                     "function_parameters", "functionparameters", "func_args", "funcargs", "fn_args", "fnargs",
                     "arguments_json", "input_json")
    last_name = last_arguments = -100
    n = 0
    for line in folded.splitlines():
        k = 0
        while k < len(line) and _fc_sep(line[k]):
            k += 1
        if k == len(line):
            continue  # (a blank line)
        n += 1
        while k < len(line):  # list marks and quotes, any number ("- - name:", "> - name:")
            if line[k] in "-*+>\u2022":
                k += 1
            else:
                d = k
                while d < len(line) and d - k < 3 and line[d] in "0123456789":
                    d += 1
                if d > k and line[d:d + 1] in (".", ")"):
                    k = d + 1
                else:
                    break
            while k < len(line) and _fc_sep(line[k]):
                k += 1
        while k < len(line) and line[k] in decoration:
            k += 1
        e, words = k, 1
        while e < len(line):  # (up to three words, one space between: "tool name", "tool input")
            if "a" <= line[e] <= "z" or line[e] in "_-":
                e += 1
            elif line[e] == " " and words < 3 and e > k and e + 1 < len(line) \
                    and ("a" <= line[e + 1] <= "z" or line[e + 1] in "_-"):
                e, words = e + 1, words + 1
            else:
                break
        key = line[k:e].replace("-", "_").replace(" ", "_")
        while e < len(line) and line[e] in decoration:
            e += 1
        while e < len(line) and line[e] in " \t":
            e += 1
        if not key or e >= len(line) or line[e] not in _FC_COLONS:
            continue
        if key in name_keys:
            if n - last_arguments <= 8:
                return True
            last_name = n
        elif key in argument_keys:
            if n - last_name <= 8:
                return True
            last_arguments = n
    return False


def _fc_any_call_after(folded: str, quoted: bool = True) -> bool:
    """``<function=name`` or an ASCII identifier (dotted parts) before an opening parenthesis:
    with ``_`` or ``.`` in it, blanks between allowed; without, directly before a parenthesis
    that opens like a call (see :func:`_fc_opens_like_a_call`); behind up to three closing marks
    (``**reset**(``), a parenthesis that opens with a keyword or closes at once
    (:func:`_fc_opens_with_a_keyword`), or glued to a name with ``_`` or ``.``; other models'
    markers and YAML (:func:`_fc_marker`). Escapes are read first (:func:`_fc_unescape`)."""
    folded = _fc_unescape(folded)
    if _fc_marker(folded, quoted):
        return True
    k = folded.find("<function")
    while k != -1:
        j = k + len("<function")
        while j < len(folded) and folded[j].isspace():
            j += 1
        if folded[j:j + 1] == "=":
            j += 1
            while j < len(folded) and folded[j].isspace():
                j += 1
            if folded[j:j + 1] and folded[j] in _FC_ID_START:
                return True
        k = folded.find("<function", k + 1)
    for k, ch in enumerate(folded):
        if ch != "(":
            continue
        e = k
        while e > 0 and folded[e - 1].isspace():
            e -= 1
        spaced, marks = e < k, e
        while e > 0 and marks - e < 3 and folded[e - 1] in _FC_NAME_CLOSE:
            e -= 1
        closed = e < marks
        i = e
        while i > 0 and (folded[i - 1] in _FC_ID or folded[i - 1] == "."):
            i -= 1
        # the longest run of trailing dotted parts that each start like a name ("1.reset" -> "reset"),
        # digits glued before the first one dropped ("9reset" -> "reset")
        parts = []
        for part in reversed(folded[i:e].split(".")):
            d = 0
            while d < len(part) and part[d] in "0123456789":
                d += 1
            if d == len(part) or part[d] not in _FC_ID_START:
                break
            parts.append(part[d:])
            if d:
                break
        ident = ".".join(reversed(parts))
        if not ident:
            continue
        j = k + 1
        while j < len(folded) and folded[j].isspace():
            j += 1
        code_like = "_" in ident or "." in ident
        if closed and (_fc_opens_with_a_keyword(folded, j) or (code_like and not spaced)):
            return True  # ("**reset**(force=True)"; "**note** (see below)", '"EUR" ("euro")' are prose)
        if not closed and (code_like or (_fc_opens_like_a_call(folded, j) and not spaced)):
            return True
    return False


def _fc_beside(v, out: list) -> list:
    """Every key and string of an answer's structures except call names and arguments."""
    if isinstance(v, list):
        for x in v:
            _fc_beside(x, out)
    elif isinstance(v, dict):
        akey = "arguments" if "arguments" in v else "parameters"
        for k in v:
            if "name" in v and (k == "name" or k == akey):
                continue
            out.append(k)
            if type(v[k]) is str:
                out.append(v[k])
            else:
                _fc_beside(v[k], out)
    return out


_FC_BLANK_LETTERS = set("\u115f\u1160\u3164\uffa0\u2800")
_FC_LANG = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_+-")
_FC_LT, _FC_GT = "<\ufe64\uff1c", ">\ufe65\uff1e"


def _fc_sep(c: str) -> bool:
    """Blank-looking: folds to nothing, blanks, ',' or ';', a control, unassigned or private-use
    character, or a blank letter."""
    if c in _FC_BLANK_LETTERS or unicodedata.category(c) in ("Cc", "Cn", "Co"):
        return True
    return all(x.isspace() or x == "," or x == ";" for x in _fc_fold(c))


def _fc_markup_ending_at(text: str, lo: int, i: int) -> tuple[str | None, int]:
    """For ``text[i - 1]`` a ``>`` (or a compatibility form): ``("O" | "C" | "M", start)`` for
    the ``<...>`` markup that ends there (``O`` / ``C`` a tool_call tag opening / closing, ``M``
    any other), or ``(None, -1)``."""
    j = max(text.rfind(lt, max(lo, i - 202), i - 1) for lt in _FC_LT)
    if j < 0:
        return None, -1
    inner = text[j + 1:i - 1]
    if not inner or len(inner) > 200 or any(gt in inner for gt in _FC_GT):
        return None, -1
    f = _fc_fold(inner).strip()
    closing = f.startswith("/")
    words = (f[1:] if closing else f).split()
    if words == ["think"]:
        return "T", j  # (reasoning: it ends a run)
    if not words or words[0] != "tool_call":
        return "M", j
    attrs = (f[1:] if closing else f).lstrip()[len("tool_call"):].strip()
    if attrs:
        value = attrs[2:].lstrip() if attrs.startswith("id") else ""
        value = value[1:].lstrip() if value.startswith("=") else None
        quoted = value is not None and len(value) >= 2 and value[0] == value[-1] and value[0] in "\"'" \
            and value[0] not in value[1:-1]
        bare = bool(value) and all(ch in "abcdefghijklmnopqrstuvwxyz0123456789_-" for ch in value)
        if closing or not (quoted or bare):
            return "X", j  # (a block that names its function, or says more than its id: no answer)
    return ("C" if closing else "O"), j


def _fc_fence_ending_at(text: str, lo: int, i: int) -> int:
    """Where a code fence (three or more backquotes and a language name) ending at ``i`` starts,
    or -1."""
    j = i
    while j > lo and text[j - 1] in _FC_LANG:
        j -= 1
    b = j
    while b > lo and text[b - 1] == "`":
        b -= 1
    return b if j - b >= 3 else -1


def _fc_glued(text: str, at: int) -> bool:
    """Whether a list number or bullet starting at ``at`` is glued to a word before it."""
    return at > 0 and (text[at - 1] in _FC_LANG or text[at - 1] == "`")


def _fc_run(text: str, chunks: list, last: int) -> tuple[str, list[int], int, list[str]]:
    """The run that ends with chunk ``last``, walking back: one letter per item, ``S`` a call
    attempt, ``O`` / ``C`` an opening / closing tool-call tag; the attempts' chunk indices; where
    the run starts (its leftmost item); the markup, fences and chunks it passed over.
    Blank-looking characters, other markup, fences, list numbers and bullets (not glued to a word)
    and complete chunks that are not attempts are passed over; anything else ends it."""
    letters, idx, passed = ["S"], [last], []
    k, i = last, chunks[last][2]
    start = i
    while True:
        lo = chunks[k - 1][2] + len(chunks[k - 1][0]) if k > 0 else 0
        while i > lo:
            c = text[i - 1]
            if c in _FC_GT:
                kind, j = _fc_markup_ending_at(text, lo, i)
                if kind is None or kind == "T":
                    return "".join(reversed(letters)), idx, start, passed
                if kind == "M":
                    passed.append(text[j:i])
                else:
                    letters.append(kind)
                    if kind == "O":
                        passed.append(text[j + 1:i - 1].split(None, 1)[-1])  # (its id may not hide a call)
                i = start = j
            elif c in ".)":
                b = i - 1
                while b > lo and i - 1 - b < 3 and text[b - 1] in "0123456789":
                    b -= 1
                if b == i - 1 or _fc_glued(text, b):
                    return "".join(reversed(letters)), idx, start, passed
                passed.append(text[b:i])
                i = start = b
            elif c in "-*\u2022" and _fc_fence_ending_at(text, lo, i) < 0:
                if _fc_glued(text, i - 1):
                    return "".join(reversed(letters)), idx, start, passed
                passed.append(c)
                i = start = i - 1
            elif c in _FC_LANG or c == "`":
                b = _fc_fence_ending_at(text, lo, i)
                if b < 0:
                    return "".join(reversed(letters)), idx, start, passed
                passed.append(text[b:i])
                i = start = b
            elif _fc_sep(c):
                i -= 1
            else:
                return "".join(reversed(letters)), idx, start, passed
        if k == 0:
            return "".join(reversed(letters)), idx, start, passed
        k -= 1
        chunk, ok, at = chunks[k]
        if _fc_is_attempt(chunk, ok):
            letters.append("S")
            idx.append(k)
        elif ok:
            passed.append(chunk)
        else:
            return "".join(reversed(letters)), idx, start, passed
        i = start = at


def _fc_tags(text: str, spans: list[tuple[int, int, bool]], reasoning: int) -> list[tuple[int, str, int]]:
    """(where it starts, ``O`` / ``C`` / ``X``, where it ends) for each tool_call tag (see
    :func:`_fc_markup_ending_at`) from ``reasoning`` on, outside the bracketed ``spans``."""
    out, gaps, at = [], [], reasoning
    for a, b, _ in spans:
        if a > at:
            gaps.append((at, a))
        at = max(at, b)
    gaps.append((at, len(text)))
    for lo, hi in gaps:
        for i in range(lo, hi):
            if text[i] in _FC_GT:
                kind, j = _fc_markup_ending_at(text, lo, i + 1)
                if kind in ("O", "C", "X"):
                    out.append((j, kind, i + 1))
    return out


def _fc_int_params(tools: list) -> set[tuple[str, str]]:
    """(function, parameter) pairs whose declared type is an integer (``int``, ``int, optional``,
    ``integer``, ``Optional[int]``) or a list of them (``List[int]``, nested, or a JSON Schema
    array of integers), in xlam's parameter dict or under JSON Schema's properties."""
    out = set()
    for tool in tools:
        if not isinstance(tool, dict):
            continue
        params = tool.get("parameters")
        if isinstance(params, dict) and isinstance(params.get("properties"), dict):
            params = params["properties"]
        for key, spec in (params.items() if isinstance(params, dict) else ()):
            # (JSON Schema: an array's items, nested, down to their type)
            hops = 0
            while isinstance(spec, dict) and isinstance(spec.get("type"), str) \
                    and spec["type"].strip().lower() == "array" and hops < 32:
                spec, hops = spec.get("items"), hops + 1
            kind = spec.get("type") if isinstance(spec, dict) else None
            if isinstance(kind, str):
                kind = re.sub(r"\s*,\s*optional$", "", kind.strip().lower())
                kind = re.sub(r"^optional\[\s*(.*?)\s*\]$", r"\1", kind)
                # (xlam's lists of integers, nested: List[int], List[List[int]])
                m = re.fullmatch(r"((?:list\[\s*)*)(int|integer)((?:\s*\])*)", kind)
                if m and m.group(1).count("[") == m.group(3).count("]"):
                    out.add((tool.get("name"), key))
    return out


def _fc_float_for_int(args, ref) -> bool:
    """Whether ``args`` writes a float where ``ref`` (equal in value) has an integer, at the top or
    inside lists (walked with a stack)."""
    todo = [(args, ref)]
    while todo:
        a, r = todo.pop()
        if type(r) is int:
            if type(a) is float:
                return True
        elif type(r) is list and type(a) is list:
            todo.extend(zip(a, r))
    return False


def recheck_function_calling(text: Any, reference: list[dict], tool_names: list[str] = (),
                             int_params: set[tuple[str, str]] = frozenset()) -> tuple[bool, str]:
    """The function-calling rule (see :mod:`r3.tasks.function_calling`), implemented separately."""
    if not isinstance(text, str) or len(text) > 100_000:
        return False, "not a string or too long"
    calls, runs, parsed, passed = None, [], [], []
    # a reasoning block that opens the completion (after blanks) up to its first "</think>", where a
    # reasoning parser splits it, is not calls
    # (one never closed is all reasoning: no answer)
    reasoning = 0
    if text.strip().startswith("<think>"):
        if "</think>" not in text:
            return False, "the reasoning block is never closed"
        reasoning = text.index("</think>") + len("</think>")
    spans = _fc_spans(text, reasoning)  # (a bracket left open in the reasoning reaches no further)
    stripped = text.strip()
    if stripped[:1] in ("[", "{"):
        try:
            whole = _fc_parse(stripped)
            calls, parsed, runs = _fc_calls(whole, allow_empty=True), [whole], [(0, len(text))]
        except (ValueError, RecursionError):
            pass
    if calls is None:
        parsed, runs = [], []
        chunks, attempts = [], []
        for a, b, ok in spans:
            chunks.append((text[a:b], ok, a))
            if _fc_is_attempt(text[a:b], ok):
                attempts.append(len(chunks) - 1)
        # every attempt after the reasoning counts: each must be complete, each run well formed
        # (a block is <tool_call> one attempt </tool_call>; the last of a run may stay open here)
        good = bool(attempts) and all(chunks[j][1] for j in attempts)
        left, shapes = list(attempts), []
        while good and left:
            last = left[-1]
            letters, idx, run_start, run_passed = _fc_run(text, chunks, last)
            good = re.fullmatch(r"(?:S|OSC)*O?S", letters) is not None
            runs.append((run_start, chunks[last][2] + len(chunks[last][0])))
            shapes.append(letters)
            passed += run_passed
            lowest = min(idx)
            while left and left[-1] >= lowest:
                left.pop()
        runs.reverse()  # (found from the last run back)
        shapes.reverse()
        # with a <tool_call> block anywhere (after the reasoning, outside the structures) a harness
        # executes only the blocks: every attempt in one, and each run's last block closed by the
        # next tag after it, unless no tag comes after it (the very last block, cut off)
        tags = _fc_tags(text, spans, reasoning) if good else []
        if "O" in [kind for _, kind, _ in tags]:
            k = 0
            for (_, run_end), letters in zip(runs, shapes):
                while k < len(tags) and tags[k][0] < run_end:
                    k += 1
                if not re.fullmatch(r"(?:OSC)*OS", letters) or (k < len(tags) and tags[k][1] != "C"):
                    good = False
                    break
            # a harness finds the blocks by their tags as written ("<tool_call>", "</tool_call>")
            # and parses each block's text (up to the next tag, or the end) as JSON: JSON
            # whitespace aside, it is exactly one attempt, with no "</tool_call>" in its strings
            # (the harness's block would end there)
            attempt_spans = {(a, b) for a, b, ok in spans if ok and _fc_is_attempt(text[a:b], ok)}
            for n_tag, (at, kind, body) in enumerate(tags):
                if not good:
                    break
                if kind != "O":
                    continue
                after = tags[n_tag + 1] if n_tag + 1 < len(tags) else None
                a, b = body, after[0] if after else len(text)
                while a < b and text[a] in " \t\n\r":
                    a += 1
                while b > a and text[b - 1] in " \t\n\r":
                    b -= 1
                good = (text[at:body] == "<tool_call>" and (after is None or text[after[0]:after[2]] == "</tool_call>")
                        and (a, b) in attempt_spans and "</tool_call>" not in text[a:b])
        if good:
            try:
                calls, none_made = [], False
                for j in attempts:
                    value = _fc_parse(chunks[j][0])
                    got = _fc_yield(value)
                    if got is None:
                        calls = None
                        break
                    none_made = none_made or got == []
                    calls += got
                    parsed.append(value)
                if calls and none_made:
                    calls = None  # ("no calls" and calls in one text)
            except (ValueError, RecursionError):
                calls = None
    if calls is None:
        return False, "no call list"
    names = list(tool_names)
    # the text outside the runs after the reasoning block, folded: before the first run, between
    # runs, after the last
    cuts = [reasoning] + [x for run in runs for x in run] + [len(text)]
    outside = [_fc_fold(text[cuts[i]:cuts[i + 1]]) for i in range(0, len(cuts), 2)]
    for f in outside[1:]:
        if any(_fc_is_attempt(c, ok) for c, ok in _fc_top_level(f)):
            return False, "a later call attempt in compatibility forms"
    # that text as one, each run standing in as "[]": a call anywhere in it or around a run; YAML
    # keys in quotes (braceless JSON) too, but not inside the structures before the first run
    around = "[]".join(outside)
    if _fc_named_call_after(around, names) or _fc_any_call_after(around, quoted=False) \
            or _fc_yaml("[]".join([_fc_fold(_fc_without_structures(text[reasoning:runs[0][0]]))] + outside[1:]),
                        quoted=True):
        return False, "another call in call syntax"
    # a complete call attempt there that only folding makes (opened before a run and closed after it
    # too); the "[]" standing for a run is none
    stand_ins, at = set(), 0
    for f in outside[:-1]:
        stand_ins.add(at + len(f))
        at += len(f) + 2
    for a, b, ok in _fc_spans(around):
        if ok and a not in stand_ins and _fc_is_attempt(around[a:b], ok):
            return False, "a call attempt outside the answer"
    # after Llama's <|python_tag|> (anywhere past the reasoning) the message is code for its
    # interpreter: outside the runs, after the first, only blank-looking characters and <...> markup;
    # and what the runs passed over is markup alone (a close tag leaves nothing in "passed")
    beside = any(p[:1] not in _FC_LT for p in passed)
    for f in outside[1:]:
        i = 0
        while i < len(f) and not beside:
            if f[i] == "<":
                e = f.find(">", i + 1, i + 202)
                if e > i + 1 and "<" not in f[i + 1:e]:
                    i = e + 1
                    continue
            beside = not _fc_sep(f[i])
            i += 1
    if beside:
        lowered = _fc_fold(text[reasoning:])
        k = lowered.find("<|")
        while k != -1:
            j = k + 2
            while j < len(lowered) and lowered[j].isspace():
                j += 1
            if lowered.startswith("python_tag", j):
                return False, "text beside the calls after <|python_tag|>"
            k = lowered.find("<|", k + 1)
    for p in passed:
        f = _fc_fold(p)
        # (not <function_calls>: OLMo 3's block of Python calls, where a harness reads no JSON)
        if "".join(f.split()) in ("[tool_calls]", "<tool_calls>", "</tool_calls>", "<function_call>",
                                  "</function_call>", "<|tool_call|>", "<|python_tag|>") \
                and not re.search(r"[a-z_]\s+[a-z_]|<\s+\||\|\s+>", f):
            continue  # (markup that wraps JSON calls, blanks never inside its words: part of the answer)
        if any(_fc_is_attempt(c, ok) for c, ok in _fc_top_level(f)) or _fc_named_call_after(f, names) \
                or _fc_any_call_after(f):
            return False, "a call between the calls"
    for s in _fc_beside(parsed, []):
        f = _fc_fold(s)
        if any(_fc_is_attempt(c, ok) for c, ok in _fc_top_level(f)):
            return False, "a call attempt in a string beside the calls"
        if _fc_named_call_after(f, names) or _fc_any_call_after(f):
            return False, "a call in a string beside the calls"
    ref = [(c["name"], c.get("arguments", {})) for c in reference]
    if len(ref) != len(calls):
        return False, "wrong number of calls"
    left = list(ref)
    for name, args in calls:
        for k, (rn, ra) in enumerate(left):
            # (an integer parameter the reference gives an integer must hold one: 3, not 3.0)
            if rn == name and _fc_same(args, ra) and not any(
                    (rn, key) in int_params and _fc_float_for_int(args[key], ra[key]) for key in ra):
                del left[k]
                break
        else:
            return False, f"call {name} does not match"
    return True, "correct"


# ---------------------------------------------------------------------------------------
def _whole(v) -> int:
    """An int, or a float with an integral value; anything else (a string, a bool) is malformed."""
    if type(v) is int or (isinstance(v, float) and v.is_integer()):
        return int(v)
    raise TypeError(f"not an integer: {v!r}")


def has_recheck(task) -> bool:
    """Whether :func:`recheck` has an independent implementation for ``task``."""
    return getattr(task, "name", None) in ("countdown", "function_calling")


def recheck(task, example: dict, text: str) -> tuple[bool, str] | None:
    """The independent verdict for a built-in task's example, or None for other tasks. An example
    without its fields is ``(False, "malformed example")``; an error in the re-check itself raises."""
    name = getattr(task, "name", None)
    if name == "countdown":
        try:
            if not isinstance(example["nums"], (list, tuple)):
                raise TypeError("nums is not a list")
            nums, target = [_whole(x) for x in example["nums"]], _whole(example["target"])
        except (KeyError, TypeError, ValueError):
            return False, "malformed example"
        return recheck_countdown(text, nums, target, tags=task.answer_tags, ops=task.ops)
    if name == "function_calling":
        try:
            answers, tools = example["answers"], example.get("tools", "[]")
            tools = json.loads(tools) if isinstance(tools, str) else tools
            reference = json.loads(answers) if isinstance(answers, str) else answers
            if not isinstance(tools, list) or not isinstance(reference, list):
                raise TypeError("tools or answers is not a list")
            names = [t.get("name", "") for t in tools if isinstance(t, dict)]
            whole_only = _fc_int_params(tools)
            if not all(isinstance(c, dict) and isinstance(c.get("name"), str) for c in reference):
                raise TypeError("a reference call is not {'name': ..., 'arguments': ...}")
        except (KeyError, TypeError, ValueError, RecursionError):
            return False, "malformed example"
        return recheck_function_calling(text, reference, names, whole_only)
    return None
