"""Fuzz the verifiers: generated adversarial completions, each verdict checked three ways.

For Countdown (with and without ``<answer>`` tags) and function calling, ``--n`` completions per
verifier are generated from templates taken from real model output: prose around the answer,
earlier and later equations or call lists, Markdown, tags, and corruptions (operators the task does
not allow, unary minus, variables, decimals, Unicode digits and symbols, chained or reversed
equations, duplicate JSON keys, truncation, padding between answers). Every completion is judged by

* the task's verifier (``task.verify``, what training rewards),
* the independent re-implementation in :mod:`r3.tasks.recheck` (shares no parsing code), and
* the generator's own label: what the completion's final answer is by construction.

"wrong verdicts" counts verifier != recheck (goal: 0). Against the construction label the table
splits false positives (the verifier pays for a wrong answer: the worst bug r3 can have) from false
negatives (a right answer unpaid: the rule is strict by design; examples are printed). Time per
verify call: worst and p99 over the generated completions, and each verifier on long adversarial
inputs (up to the completion cap), to show the time stays linear in the input.

    python benchmarks/fuzz_verifiers.py                      # 10,000 per verifier, ~1 minute
    python benchmarks/fuzz_verifiers.py --n 2000 --seed 1 --json out.json --md out.md

What it does not show: that the generator covers every way a model can phrase an answer. Real
model outputs are in ``tests/data/countdown_model_outputs.jsonl`` (hand-labelled, tested), and
``python -m r3.audit RUN`` re-checks a run's rewarded samples.
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import re
import sys
import time
from collections import Counter
from fractions import Fraction
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from r3.tasks import get  # noqa: E402
from r3.tasks.base import verifier_error_counts  # noqa: E402
from r3.tasks.recheck import recheck  # noqa: E402

# ---------------------------------------------------------------------------------------
# Countdown
# ---------------------------------------------------------------------------------------
PROSE_BEFORE = [
    "", "The answer is ", "So ", "Answer: ", "**Answer:** ", "Final equation:\n", "Here is the equation:\n\n",
    "Circle: ", "Using each number exactly once \u2013 ", "Sure! ", "The equation would be ",
    "Let me think step by step.\nFirst, {a} + {b} = {ab} is too small.\n", "Let's try again.\n\n",
    "I made a mistake before. ", "We need {target}. ", "Magma: ", "1. Calculate: ",
]
PROSE_AFTER = [
    "", ".", "!", " \u2713", ", which is the target.", "\n\nI hope this helps!", " (using both numbers)",
    "\nThe target was {target}.", "\n\nTherefore the answer is {target}.", " is the final equation.",
    " and that is my answer.",
]
# prose after that makes a bare expression (no written result) a mention, not an answer
PROSE_AFTER_EQUATION_ONLY = [", but I'm stuck.", " is a classic puzzle.", ", you might assume that it equals"]
# a result written in words after a bare expression: (suffix, what it claims: "target", "other", "denied")
RESULT_WORDS = [(" equals {target}", "target"), (" is {target}.", "target"), (", which is {target}", "target"),
                (" gives a total of {target}", "target"), (" is equal to {target}!", "target"),
                (" equals {other}", "other"), (" is {other}", "other"), (", which makes {other}.", "other"),
                (" is not {target}", "denied"), (" isn't {target}", "denied"), (", which is not {other}", "denied"),
                (" is not correct", "denied"), (" does not work", "denied"), (" is {target}.5", "other"),
                (" is {target}%", "other")]
DENIALS = ["It is not ", "The answer isn't ", "I can't use ", "Never ", "This is not "]
# (text before, text after): each changes what the equation means, so the answer is wrong
POISON = [
    ("-", ""), ("x", ""), ("log(", ")"), ("\u221a(", ")"), ("2^(", ")"), ("\u2010", ""), ("[", "]"),
    ("|", "|"), ("log ", ""), ("sqrt ", ""), ("the square root of ", ""), ("negative ", ""),
    ("minus ", ""), ("2 to the power of (", ")"), ("half of ", ""), ("(", ")^2"), ("(", ")**2"),
    ("(", ")!"), ("(", ")%"), ("(", ")\u00b2"), ("", " mod 5"), ("", " squared"), ("", " times 2"),
    ("", " percent"), ("", " \u2013 3"), ("", " \u00d7 2"), ("", " \u2192 9"), ("", " \u2248 9"),
    ("", "x"), ("", ".5"), ("", ",000"), ("0", ""), ("", "y"), ("", " \u00f7 2"),
    # hidden by invisible or unusual characters, markup and entities
    ("2\u00a0*\u00a0", ""), ("", "\u00a0-\u00a02"), ("2 *\u200b", ""), ("3 ti\u00admes ", ""),
    ("3 \u0445 ", ""), ("3 _times_ ", ""), ("\u202e", ""), ("3 *\n", ""), ("3 times\n", ""),
    ("3 &times; ", ""), ("", " &minus; 2"), ("3 \\cdot ", ""), ("It is _not_ ", ""), ("'not' ", ""),
    ("50% of ", ""), ("1/2 of ", ""), ("A third of ", ""), ("4 added to ", ""), ("", " less 2"),
    ("", " doubled"), ("", " (in base 8)"), ("Move 2 to ", ""), ("Take 1 from ", ""),
    ("", " (falsch)"), ("", ". C'est faux."), ("", ". The answer is 28,5"), ("", ". N\u00e3o est\u00e1 certo."),
    ("", ". \uff2e\uff4f."), ("", ". \U0001d40d\U0001d428\U0001d42d correct."),
    # arithmetic on the result, an unfinished operation
    ("", "\n\nHowever, when the numbers are multiplied together, they should always equal 9."),
    ("", ". Then double it."), ("", ". Then I add 2 to it."), ("", ", +"), ("Next, I multiplied 3 by both sides of ", ""),
    # denied later on
    ("", ", is indeed wrong."), ("", "\n\nWait, that isn\u2019t right."), ("", ". That is not the answer."),
]
# wrappers that do not change the equation
BENIGN_WRAP = [("\\boxed{", "}"), ("\\(", "\\)"), ("\\[ ", " \\]"), ("<b>", "</b>"), ("</think>\n", ""),
               ("\u00a0", "\u00a0"), ("**", "**"), ("(", ")"), ("\u200b", "")]
UNICODE_DIGITS = ["\uff10", "\u0660", "\u09e6", "\u0966"]  # fullwidth, Arabic-Indic, Bengali, Devanagari zero


def _value(expr: str) -> Fraction | None:
    """Exact value of an expression the generator built (digits, + - * /, parentheses: our own
    strings, never model output)."""
    py = re.sub(r"\d+", lambda m: f"F({int(m.group())})", expr)
    try:
        return eval(py, {"__builtins__": {}, "F": Fraction})  # noqa: S307 -- generator-built string
    except ZeroDivisionError:
        return None


def _numbers(expr: str) -> list[int]:
    return [int(x) for x in re.findall(r"\d+", expr)]


def _label(expr: str, written: int | None, nums, target, ops) -> bool:
    if any(c in "+-*/" and c not in ops for c in expr):
        return False
    if written is not None and written != target:
        return False
    return sorted(_numbers(expr)) == sorted(nums) and _value(expr) == target


def _mutate(rng: random.Random, ex: dict, ops: str) -> tuple[str, bool, bool]:
    """(equation text, correct by construction, poison-free). The base is the solver's solution."""
    nums, target, expr = ex["nums"], ex["target"], ex["solution"]
    kind = rng.randrange(12)
    written = None
    if kind == 1:
        written = target
    elif kind == 2:
        written = target + rng.choice([-2, -1, 1, 10])
    elif kind == 3:  # a number changed
        ns = _numbers(expr)
        i = rng.randrange(len(ns))
        it = iter(range(len(ns)))
        expr = re.sub(r"\d+", lambda m: str(int(m.group()) + (1 if next(it) == i else 0)), expr)
    elif kind == 4:  # an operator changed
        spots = [m.start() for m in re.finditer(r"[+\-*/]", expr)]
        if spots:
            k = rng.choice(spots)
            expr = expr[:k] + rng.choice("+-*/") + expr[k + 1:]
    elif kind == 5:  # an extra number
        expr = expr + rng.choice([" + 0", " * 1", " - 1", " + 3"])
    elif kind == 6:  # a number dropped
        ns = _numbers(expr)
        if len(ns) > 2:
            expr = re.sub(r"\s*[+\-*/]\s*\d+\s*$", "", expr) or expr
    elif kind == 7:  # spacing
        expr = expr.replace(" ", "") if rng.random() < 0.5 else re.sub(r"([+\-*/])", r"  \1\t", expr)
    elif kind == 8:  # redundant parentheses
        expr = f"({expr})"
    ok = _label(expr, written, nums, target, ops)
    eq = expr if written is None else f"{expr} = {written}"
    clean = True
    if kind == 9:  # malformed forms
        eq, ok = rng.choice([(f"{target} = {expr}", False), (f"{expr} = {target} = {target}", False),
                             (f"{expr} = 0{target}", False), (f"{expr} =", False), (f"{expr} +", False),
                             (f"{expr} = +{target}", False)])
    elif kind == 10:  # a number written in another script or as a decimal
        d = rng.choice(UNICODE_DIGITS + [".0"])
        eq = re.sub(r"\d+", lambda m: m.group() + d if d == ".0" else m.group()[:-1] + chr(ord(d) + int(m.group()[-1])),
                    eq, count=1)
        ok, clean = False, False
    elif kind == 11:
        before, after = rng.choice(POISON)
        eq, ok, clean = before + eq + after, False, False
    return eq, ok, clean


def countdown_case(rng: random.Random, task, pool: list[dict]) -> tuple[dict, str, bool]:
    ex = rng.choice(pool)
    fmt = {"target": ex["target"], "a": ex["nums"][0], "b": ex["nums"][1], "ab": ex["nums"][0] + ex["nums"][1]}
    eq, ok, clean = _mutate(rng, ex, task.ops)
    before = rng.choice(PROSE_BEFORE).format(**fmt)
    after = rng.choice(PROSE_AFTER).format(**fmt)
    mention = not task.answer_tags and rng.random() < 0.1
    if mention:
        after = rng.choice(PROSE_AFTER_EQUATION_ONLY)
        ok = ok and "=" in eq
    if eq.startswith("**") or "**" in before:  # keep Markdown markers pairing as written
        before = before.replace("**", "")
    if task.answer_tags:
        if not clean:  # a decorated answer inside the block is wrong
            answer = f"<answer> {eq} </answer>"
        elif rng.random() < 0.2:
            answer, ok = f"<answer> {before.strip()} {eq} </answer>", ok and not before.strip()
        else:
            answer = f"<answer> {eq} </answer>"
        text = before + answer + after
        r = rng.random()
        if r < 0.15:  # an earlier block is superseded
            text = f"<answer> {ex['solution']} </answer> no wait. " + text
        elif r < 0.25:  # a later block was started: no answer
            text, ok = text + " <answer> 1 + 1", False
        elif r < 0.35:  # a later complete block does
            other, ok2, _ = _mutate(rng, ex, task.ops)
            text, ok = text + f"\nActually: <answer> {other} </answer>", ok2 and "<" not in other
        elif r < 0.4:
            text, ok = before + eq + after, False  # no block at all
        return ex, text, ok
    r = rng.random()
    if clean and "=" not in eq and not mention and r < 0.25:  # the result written in words
        suffix, claim = rng.choice(RESULT_WORDS)
        after = suffix.format(target=ex["target"], other=ex["target"] + rng.choice([-3, 1, 7]))
        ok = ok and claim == "target"
    elif clean and r < 0.3:
        before, ok = rng.choice(DENIALS), False
    elif clean and not task.answer_tags and "**" not in before and r < 0.45:
        lo, hi = rng.choice(BENIGN_WRAP)
        if lo != "(" or "=" in eq:
            eq = lo + eq + hi
    text = before + eq + after
    r = rng.random()
    if r < 0.15:  # a later equation supersedes it
        other, ok2, _ = _mutate(rng, ex, task.ops)
        text, ok = text + "\nWait, let me redo it: " + other, ok2
    elif r < 0.25:  # echoed tags are ordinary text
        text = text + " <answer> </answer>" if rng.random() < 0.5 else "<answer></answer>\n" + text
    elif r < 0.3:
        text = "Sure. " * rng.randrange(1, 2000) + text
    elif r < 0.4:  # a later answer, the target or not
        n = rng.choice([ex["target"], ex["target"] + rng.choice([-2, 1, 5])])
        text += rng.choice(["\nThe answer is {}.", " So the result is {}", "\n<answer>{}</answer>", " to get {}"]).format(n)
        ok = ok and n == ex["target"]
    return ex, *_reasoning_lead(rng, text, ok, decoy=f"Maybe {ex['nums'][0]} * 7 = {ex['target']}?")


def _reasoning_lead(rng: random.Random, text: str, ok: bool, decoy: str) -> tuple[str, bool]:
    """Sometimes a leading reasoning block: closed, it is not read (the label stands, even with a
    wrong answer inside it); never closed, the completion holds no answer."""
    r = rng.random()
    if r < 0.06:
        return f"<think>\nLet me see. {decoy}\n</think>\n\n" + text, ok
    if r < 0.1 and "</think>" not in text:
        return "<think>\n" + text, False
    return text, ok


def countdown_pool(task, n: int, seed: int) -> list[dict]:
    return task.examples("train", n=n, seed=seed)


# ---------------------------------------------------------------------------------------
# Function calling
# ---------------------------------------------------------------------------------------
def _int_declared(tools: list[dict]) -> set[tuple[str, str]]:
    """(function, parameter) pairs the tools declare as integers (``int``, ``int, optional``)."""
    return {(t["name"], k) for t in tools for k, spec in t.get("parameters", {}).items()
            if isinstance(spec, dict) and spec.get("type", "").split(",")[0].strip() in ("int", "integer")}


def _fc_mutate(rng: random.Random, calls: list[dict], truncate: bool = True,
               ints: set[tuple[str, str]] = frozenset()) -> tuple[str, bool, bool]:
    """(JSON text, correct by construction, valid JSON call list). ``truncate=False``: the text is
    always a balanced structure (a truncated one would swallow what follows it). ``ints``: the
    parameters declared as integers, where a float (``3.0``) is another value."""
    calls = json.loads(json.dumps(calls))
    kind = rng.randrange(17)
    if kind == 10 and not truncate:
        kind = 0
    ok, valid = True, True
    if kind == 1 and len(calls) > 1:
        rng.shuffle(calls)  # order does not matter
    elif kind == 2:
        for c in calls:
            for k, v in c["arguments"].items():
                if type(v) is int:
                    c["arguments"][k] = float(v)  # 100 == 100.0, except where an integer is declared
                    ok = ok and (c["name"], k) not in ints
    elif kind == 3:
        calls = calls[:-1] if len(calls) > 1 else calls + calls
        ok = False
    elif kind == 4:
        calls[0]["name"] += "_v2"
        ok = False
    elif kind == 5 and calls[0]["arguments"]:
        k = next(iter(calls[0]["arguments"]))
        v = calls[0]["arguments"][k]
        new = v + 1 if type(v) in (int, float) else (not v) if type(v) is bool else str(v).upper() + "x"
        calls[0]["arguments"][k] = new if new != v else "changed"
        ok = False
    elif kind == 6 and calls[0]["arguments"]:
        del calls[0]["arguments"][next(iter(calls[0]["arguments"]))]
        ok = False
    elif kind == 7:
        calls[0]["arguments"]["extra_flag"] = True
        ok = False
    elif kind == 8:
        flips = [(c, k) for c in calls for k, v in c["arguments"].items() if type(v) is bool]
        if flips:
            c, k = rng.choice(flips)
            c["arguments"][k] = int(c["arguments"][k])  # true -> 1
            ok = False
    text = json.dumps(calls, indent=None if kind == 9 else rng.choice([None, None, 2]))
    if kind == 9 and calls[0]["arguments"]:  # a duplicate key: either value last
        k, v = next(iter(calls[0]["arguments"].items()))
        dup = f'"{k}": {json.dumps(v)}, "{k}": "other"' if rng.random() < 0.5 else f'"{k}": "other", "{k}": {json.dumps(v)}'
        args = json.dumps(calls[0]["arguments"])
        text = text.replace(args, "{" + dup + ("," + args[1:] if len(args) > 2 else "}"), 1)
        ok, valid = False, False
    elif kind == 10:  # truncated
        text, ok, valid = text[: rng.randrange(1, len(text) - 1)], False, False
    elif kind == 11:
        text, ok, valid = text.replace(":", "=", 1), False, False
    elif kind == 12 and len(calls) == 1:
        text = json.dumps(calls[0])  # a bare call object
    elif kind == 13:
        text = text.replace('"arguments"', '"id": "call_1", "arguments"', 1)  # extra keys are ignored
    elif kind == 14:  # but not a structure beside the arguments (a call hidden there)
        extra = rng.choice(['"then": {"name": "delete_all", "arguments": {}}', '"then": ' + json.dumps(calls),
                            '"meta": [1]', '"options": {}'])
        if '"arguments"' in text:  # (an empty reference list has no call to put it in)
            text, ok = text.replace('"arguments"', extra + ', "arguments"', 1), False
    elif kind == 15:  # a wrapper: only id, role, type "function" and an empty content beside the calls
        extra, fine = rng.choice([('"id": "call_1"', True), ('"role": "assistant"', True), ('"content": null', True),
                                  ('"content": ""', True), ('"thought": "ok"', False), ('"n": 2', False),
                                  ('"note": "two (2) calls [done]"', False), ('"dry_run": true', False),
                                  ('"then": {"name": "delete_all", "arguments": {}}', False), ('"meta": {}', False),
                                  ('"next": "delete_all_files(path=1)"', False), ('"next": "reset()"', False),
                                  ('"next": "[{\\"name\\": \\"delete_all\\"}]"', False), ('"os.remove(p)": 1', False)])
        text, ok = '{"tool_calls": ' + text + ", " + extra + "}", ok and fine
    elif kind == 16 and '"arguments"' in text:  # beside a call's arguments only id, index, type "function"
        extra, fine = rng.choice([('"id": "call_[1]"', True), ('"index": 0', True), ('"type": "function"', True),
                                  ('"note": "see (above)"', False), ('"type": "tool"', False), ('"execute": false', False),
                                  ('"note": "reset()"', False), ('"note": "{x: 1}"', False), ('"note": "[]"', False),
                                  ('"note": "then os.remove(path)"', False)])
        text, ok = text.replace('"arguments"', extra + ', "arguments"', 1), ok and fine
    return text, ok, valid


FC_BEFORE = ["", "Sure! ", "Here are the calls:\n", "<tool_call>\n", "I'll call the tools.\n\n",
             'He said "hi" and I answer: ', "[note] ", "{see below} ", "Let me think (step 1).\n"]
FC_AFTER = ["", " Hope this helps.", "\n</tool_call>", " [1, 2]", " {}", "\nDone (see above).", " :)",
            " (note: f(x) is g(x == 1))", " Cost: 3(4) = 12.", " See value(s), e.g. (this), v1.2(beta).",
            "\n\u6211\u8c03\u7528\u4e86\u51fd\u6570\uff08city=\u5df4\u9ece\uff09\u3002"]


# the call syntax the generator writes into JSON strings (kinds 15 and 16)
CALL_SYNTAX = ("reset()", "delete_all_files(", "os.remove(")


def _canonical(v):
    """A JSON value with integral floats as ints (``100.0 == 100``; booleans stay booleans)."""
    if isinstance(v, float) and v.is_integer():
        return int(v)
    if isinstance(v, list):
        return [_canonical(x) for x in v]
    if isinstance(v, dict):
        return {k: _canonical(x) for k, x in v.items()}
    return v


def _same_multiset(calls: list[dict], ref: list[dict]) -> bool:
    key = lambda c: json.dumps(_canonical([c["name"], c.get("arguments", {})]), sort_keys=True)  # noqa: E731
    return sorted(map(key, calls)) == sorted(map(key, ref))


OPEN_TAGS = ["<tool_call>", "<tool_call>", "< Tool_Call >", "\uff1ctool_call\uff1e", '<tool_call id="1">']
CLOSE_TAGS = ["</tool_call>", "</tool_call>", "</tool_call\u200b>", "\uff1c/tool_call\uff1e", "</ tool_call >"]
DELETE_ALL = '{"name": "delete_all", "arguments": {}}'


def _hermes(rng: random.Random, calls: list, ref: list[dict], ok: bool) -> tuple[str, bool, bool]:
    """A call list written as Hermes / Qwen ``<tool_call>`` blocks (tags in any spelling) or bare
    objects between ``;``, ``,`` or blanks, maybe with prose between two blocks (every block
    counts); or with an extra block of another call, or a malformed run (prose in a block before
    it, an unclosed block, two objects in one block): no answer. Also whether the text ends in a
    block left open (what follows is in that block)."""
    if not calls or not all(isinstance(c, dict) and "name" in c and set(c) <= {"name", "arguments", "id"}
                            for c in calls):
        return json.dumps(calls), ok, False  # (then ``ok`` is a matter of content alone)
    objects = [json.dumps(c) for c in calls]
    blocks, tags = [], []
    for o in objects:
        tags.append((rng.choice(OPEN_TAGS), rng.choice(["", "\n"]), rng.choice(["", "\n"]), rng.choice(CLOSE_TAGS)))
        blocks.append(tags[-1][0] + tags[-1][1] + o + tags[-1][2] + tags[-1][3])
    sep = rng.choice(["", "\n", " ", "\n\n", "\u200b", "\u3164", "\u034f", "<|eom_id|>\n"])
    kind = rng.randrange(7)
    # a harness finds the blocks by their tags as written: another spelling makes no block (the
    # closing tag of a last block left open aside)
    as_written = all(t[0] == "<tool_call>" and (t[3] == "</tool_call>" or (kind == 5 and k == len(tags) - 1))
                     for k, t in enumerate(tags))
    if kind == 1 and len(blocks) > 1:  # prose between blocks: the blocks on both sides are the calls
        k = rng.randrange(1, len(blocks))
        return sep.join(blocks[:k]) + "\nWait.\n" + sep.join(blocks[k:]), ok and as_written, False
    if kind == 2:  # bare objects in one run
        return rng.choice(["; ", ",\n", "\n", " ", "\u037e ", "\uff1b", " {} "]).join(objects), ok, False
    if kind == 3:  # another call in an adjacent block
        extra = "<tool_call>" + DELETE_ALL + "</tool_call>"
        k = rng.randrange(len(blocks) + 1)
        return sep.join(blocks[:k] + [extra] + blocks[k:]), False, False
    if kind == 4:  # malformed: a block of prose right before, an unclosed block, two objects in a block
        first, rest = rng.choice([("<tool_call>reset()</tool_call>" + sep, blocks),
                                  ("<tool_call>" + DELETE_ALL + sep, blocks),
                                  ("<tool_call>" + DELETE_ALL + " " + objects[0] + "</tool_call>" + sep, blocks[1:])])
        return first + sep.join(rest), False, False
    text = sep.join(blocks)
    if kind == 5:  # the last block unclosed
        text = text[: text.rindex("<") if text.endswith(">") else text.rindex("\uff1c")]
    return text, ok and as_written, kind == 5


def _is_attempt(s: str) -> bool:
    """A call attempt by construction: a key of any spelling, or the empty list."""
    return ":" in s or "=" in s or s.strip() == "[]"


def function_calling_case(rng: random.Random, task, pool: list[dict]) -> tuple[dict, str, bool]:
    """The label is the correctness by construction of all the call attempts together (a broken
    or truncated attempt anywhere is no answer; an earlier attempt adds its calls)."""
    ex = rng.choice(pool)
    ref = json.loads(ex["answers"])
    ints = _int_declared(json.loads(ex["tools"]))
    final, ok, valid = _fc_mutate(rng, ref, ints=ints)
    r, hermes, unclosed = rng.random(), False, False
    if r < 0.15:
        final = '{"tool_calls": ' + final + "}"
    elif r < 0.3:
        final = "```json\n" + final + "\n```"
    elif r < 0.45 and valid and final.lstrip().startswith("["):
        final, ok, unclosed = _hermes(rng, json.loads(final), ref, ok)
        hermes = True
    elif r < 0.55 and ok and valid and final.lstrip().startswith("[") and rng.random() < 0.5:
        # an adjacent earlier attempt (blanks, ';' or ',' between): its calls count too, and an
        # empty one beside calls is no answer
        decoy = rng.choice(["[]", DELETE_ALL] + ([json.dumps(ref[:1])] if ref else []))
        final, ok = decoy + rng.choice(["\n", "; ", ", ", " "]) + final, decoy == "[]" and not ref
        hermes = True  # (after an opening tag: one block holding two attempts, no answer)
    after = rng.choice(FC_AFTER)
    # a truncated structure runs to the end of the text: what follows it is inside it
    truncated = not valid and final.count("[") + final.count("{") > final.count("]") + final.count("}")
    label = (ok and valid) if _is_attempt(final + after if truncated else final) else None
    before = rng.choice([b for b in FC_BEFORE if not (hermes and "<tool_call>" in b)])
    if label and (unclosed or before == "<tool_call>\n") and (after not in ("", "\n</tool_call>")
                                                             or final.startswith("`")):
        label = False  # (a block holds its attempt alone: a harness parses the block's text as JSON)
    text = before + final + after
    # a <tool_call> block in the text: an attempt outside the blocks is no answer
    blocks = "<tool_call>" in before or (hermes and final[:1] in "<\uff1c")
    r = rng.random()
    if r < 0.35:  # an earlier call list (right or wrong), maybe far away: its calls count too
        decoy, ok_d, valid_d = _fc_mutate(rng, ref, truncate=False, ints=ints)
        pad = " [0]" * rng.choice([0, 0, 255, 256, 600])
        text = decoy + pad + "\nWait, let me fix that. " + text
        if label is None and _is_attempt(decoy):  # (then an opening <tool_call> after it is a later call)
            label = ok_d and valid_d and "<tool_call>" not in before
        elif _is_attempt(decoy):  # both count: right only if both are the empty list
            label = label and ok_d and valid_d and not ref and not blocks
        if any(c in decoy for c in CALL_SYNTAX):  # call syntax in an earlier attempt: another call
            label = False
    elif r < 0.45 and valid:  # a later attempt that is no answer, or no calls at all
        call = ref[0] if ref else {"name": "f", "arguments": {}}
        args = ", ".join(f"{k}={v!r}" for k, v in call["arguments"].items())
        text += rng.choice(["\nActually none of the tools apply: []",
                            "\nOr: " + json.dumps(ref).replace('"', "'"),
                            f"\nActually the correct call is {call['name']}({args})",
                            f"\nThen: functions.{call['name']}({args})",
                            f"\nAction: {call['name']}[{args}]", f"\nAction: {call['name']}",
                            f"\n{call['name'].upper()} ({args})",
                            f"\nCall {call['name']}\uff08{args}\uff09",
                            "\nThen: delete_all_files(path='/')", "\nos.system('rm -rf /')",
                            "\nThen reset() to finish.", "\ndelete_user (42)", "\nos.remove(path)",
                            "\n<function=delete_all_files>{}</function>", "\n\uff52\uff45\uff53\uff45\uff54\u200b()",
                            "\n1.delete_all_files(path='/')", "\nDone\u2026os.remove(path)", "\nreset\u0301()",
                            '\nOr: [{"n\\u0061me": "' + call["name"] + '", "arguments": {}}]',
                            '\n"name": "' + call["name"] + '",\n"arguments": {}'])
        label = not ref and text.endswith("[]") and not blocks
    return ex, *_reasoning_lead(rng, text, bool(label), decoy="Call delete_all_files(path='/') first?")


# ---------------------------------------------------------------------------------------
def long_inputs(kind: str) -> list[tuple[str, str]]:
    """(name, text): long adversarial completions near the completion cap (100,000 characters)."""
    if kind == "function_calling":
        call = '{"name": "f", "arguments": {"a": 1}}'
        return [("1MB-list", "[" + ", ".join([call] * 2500) + "]"), ("deep-list", "[" * 45_000 + "]" * 45_000),
                ("open-brackets", "[" * 99_000), ("prose-brackets", "text [" * 16_000),
                ("quotes", '["' * 49_000), ("padding", "[0] " * 24_000 + "[" + call + "]"),
                ("combining", "[" + call + "]a" + "\u0301\u0316" * 49_000),
                ("expanding", "[" + call + "]" + "\ufdfa" * 99_000),
                ("expanding-markup", ("<" + "\ufdfa" * 198 + ">") * 490 + "[" + call + "]"),
                ("single-quotes", "[" + ", '" * 33_000), ("quote-after-blanks", ("[" + " " * 1_000 + "'") * 98),
                ("tool-call-blocks", ("<tool_call>" + call + "</tool_call>\n") * 1_650),
                ("empty-lists", "[]" * 49_000), ("bullets", "- " * 48_000 + "[" + call + "]"),
                ("unclosed-think", "[" + call + "]" + "<think>" * 14_000),
                ("dotted-run", "[" + call + "]\n" + "a." * 49_000),
                ("spacing-marks", "[" + call + "]\n" + "\U0001d16d" * 24_000 + "\u1715" * 24_000),
                ("loose-string", '{"tool_calls": [' + call + '], "note": "' + "a_b (" * 3_900 + '"}')]
    return [("no-tags", "x" * 99_000), ("many-runs", "1 a " * 24_000), ("long-run", "1+" * 49_000 + "1"),
            ("nested", "(" * 49_000 + "1" + ")" * 49_000), ("open-tags", "<answer>" * 12_000),
            ("blocks", "<answer> 1 </answer>" * 4_900), ("plus-paren", "(+" * 49_000),
            ("markdown", "**1 + 1** " * 9_000), ("words", "mod " * 24_000 + "1 + 2")]


def run(name: str, task, gen, pool, n: int, seed: int) -> dict:
    rng = random.Random(f"{name}:{seed}")
    times, wrong, fp, fn, examples_fp, examples_fn, wrong_examples = [], 0, 0, 0, [], [], []
    passes = 0
    fn_reasons: Counter = Counter()
    for _ in range(20):  # untimed warm-up: one-time work (compiled patterns, a Unicode table) is not a call's
        task.verify(*gen(random.Random(f"warm-up:{name}"), task, pool)[:2])
        task.verify(pool[0], "[] \u0301\uff08")
    verifier_error_counts(task)  # (from here on: a verifier that raised is judged wrong, and counted here)
    for _ in range(n):
        ex, text, label = gen(rng, task, pool)
        t0 = time.perf_counter()
        got = task.verify(ex, text)
        times.append(time.perf_counter() - t0)
        other = recheck(task, ex, text)[0]
        passes += got
        if got != other:
            wrong += 1
            if len(wrong_examples) < 5:
                wrong_examples.append({"text": text, "verifier": got, "recheck": other, "example": ex})
        if got and not label:
            fp += 1
            if len(examples_fp) < 5:
                examples_fp.append({"text": text, "reason": task.diagnose(ex, text), "example": ex})
        if label and not got:
            fn += 1
            fn_reasons[task.diagnose(ex, text)] += 1
            if len(examples_fn) < 5:
                examples_fn.append({"text": text, "reason": task.diagnose(ex, text), "example": ex})
    errors, _, first_error = verifier_error_counts(task)
    times.sort()
    long_t = {}
    for lname, text in long_inputs("function_calling" if name == "function_calling" else "countdown"):
        ex = pool[0]
        best = min(_timed(task, ex, text) for _ in range(3))
        long_t[lname] = {"chars": len(text), "ms": round(best * 1e3, 3)}
    return {
        "verifier": name, "n": n, "passes": passes, "wrong_verdicts": wrong,
        "verifier_errors": errors, "first_verifier_error": first_error,
        "false_positives_vs_label": fp, "false_negatives_vs_label": fn,
        "worst_ms": round(times[-1] * 1e3, 3), "p99_ms": round(times[int(0.99 * (n - 1))] * 1e3, 3),
        "median_ms": round(times[n // 2] * 1e3, 4), "long_inputs": long_t,
        "false_negative_reasons": dict(fn_reasons.most_common()),
        "wrong_examples": wrong_examples, "false_positive_examples": examples_fp,
        "false_negative_examples": examples_fn,
    }


def setups(seed: int) -> list[tuple]:
    """(name, task, generator, example pool) for each verifier fuzzed."""
    out = []
    for tags in (False, True):
        for preset in (dict(difficulty="easy", min_count=2, max_count=2, max_num=30, max_target=60),
                       dict(difficulty="standard")):
            task = get("countdown", answer_tags=tags, **preset)
            name = f"countdown ({'tags' if tags else 'final equation'}, {preset['difficulty']})"
            out.append((name, task, countdown_case, countdown_pool(task, 300, seed)))
    fc = get("function_calling")
    out.append(("function_calling", fc, function_calling_case, fc.examples("train", n=500, seed=seed)))
    return out


def _timed(task, ex, text) -> float:
    t0 = time.perf_counter()
    task.verify(ex, text)
    return time.perf_counter() - t0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=10_000, help="completions per verifier (default 10,000)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", help="write the results as JSON")
    ap.add_argument("--md", help="write the table as Markdown")
    args = ap.parse_args(argv)
    rows = []
    for name, task, gen, pool in setups(args.seed):
        n = args.n if name == "function_calling" else max(1, args.n // 2)
        print(f"fuzzing {name}: {n} completions ...", file=sys.stderr, flush=True)
        rows.append(run(name, task, gen, pool, n, args.seed))
    head = ("| verifier | completions | passed | wrong verdicts (vs recheck) | false positives (vs label) | "
            "false negatives (vs label) | p99 ms | worst ms | slowest long input (chars, ms) |")
    lines = [head, "|" + " --- |" * 9]
    for r in rows:
        slow = max(r["long_inputs"].items(), key=lambda kv: kv[1]["ms"])
        lines.append(f"| {r['verifier']} | {r['n']} | {r['passes']} | {r['wrong_verdicts']} | "
                     f"{r['false_positives_vs_label']} | {r['false_negatives_vs_label']} | {r['p99_ms']} | "
                     f"{r['worst_ms']} | {slow[0]} ({slow[1]['chars']:,}, {slow[1]['ms']}) |")
    table = "\n".join(lines)
    print(table)
    for r in rows:
        if r["verifier_errors"]:
            print(f"[{r['verifier']}] the verifier raised on {r['verifier_errors']} completions (judged wrong; "
                  f"first: {r['first_verifier_error']})", file=sys.stderr)
    for r in rows:
        for key in ("wrong_examples", "false_positive_examples", "false_negative_examples"):
            for e in r[key][:3]:
                print(f"[{r['verifier']}] {key}: {json.dumps(e)[:400]}")
    meta = {"command": "python benchmarks/fuzz_verifiers.py " + " ".join(argv if argv is not None else sys.argv[1:]),
            "python": platform.python_version(), "machine": platform.machine(), "seed": args.seed}
    if args.json:
        Path(args.json).write_text(json.dumps({"meta": meta, "results": rows}, indent=1) + "\n")
    notes = ["", "False negatives by the verifier's reason (the rule is strict by design; each is a right answer "
             "written in a way the rule refuses):", ""]
    for r in rows:
        for reason, k in r["false_negative_reasons"].items():
            notes.append(f"- {r['verifier']}: {k} x {reason}")
    notes += ["", "Columns: *wrong verdicts* = the verifier and the independent re-implementation "
              "(`r3/tasks/recheck.py`) disagree; *false positives / negatives* = against the generator's "
              "construction label. Times are per `verify` call on this machine (2 cores, shared); the last "
              "column is the slowest of the long adversarial inputs (up to the 100,000-character cap).",
              "", "What this does not show: that the generator covers every way a model phrases an answer. "
              "Hand-labelled real model outputs are in `tests/data/countdown_model_outputs.jsonl`."]
    print("\n".join(notes))
    if args.md:
        Path(args.md).write_text(
            "# Verifier fuzz results\n\n"
            f"`{meta['command']}` (Python {meta['python']}, {meta['machine']}).\n\n" + table + "\n"
            + "\n".join(notes) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
