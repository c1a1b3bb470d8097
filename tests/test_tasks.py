"""Tasks: the registry, plug-ins, and the Countdown generator, solver, loader and verifier."""

import itertools
import json
import random
import sys
from pathlib import Path
from collections import Counter
from fractions import Fraction
import re

import pytest

import r3.tasks as tasks
from r3.errors import R3Error
from r3.tasks import Task
from r3.tasks.recheck import recheck
from r3.tasks.countdown import (
    MAX_ANSWER_CHARS,
    REFLECTION_PROMPT,
    CountdownTask,
    check_answer,
    extract_answer,
    reachable_targets,
    solve,
)

# a verifier that raises judges the text wrong: every test here also fails on one (conftest)
pytestmark = pytest.mark.usefixtures("verifier_errors")


def ans(expr: str) -> str:
    return f"Let me think.\n<answer> {expr} </answer>"


# ---------------------------------------------------------------------------------------
# registry and plug-ins
# ---------------------------------------------------------------------------------------
def test_get_builtin_and_aliases():
    assert isinstance(tasks.get("countdown"), CountdownTask)
    assert isinstance(tasks.get(" Countdown "), CountdownTask)
    from r3.tasks.function_calling import FunctionCallingTask

    for name in ("function_calling", "function-calling", "xlam", "XLAM"):
        assert isinstance(tasks.get(name), FunctionCallingTask)
    assert tasks.available() == ["countdown", "function_calling", "countdown-tiny"]


def test_presets_and_each_task_owns_its_defaults():
    """A preset is a built-in task with other default options; options given merge over them. The
    training default is the preset, so another task gets only its own defaults."""
    from r3.config import parse_args
    from r3.tasks.function_calling import FunctionCallingTask

    tiny = tasks.get("countdown-tiny")
    assert isinstance(tiny, CountdownTask) and tiny.ops == "+-" and tiny.answer_tags is False
    assert (tiny.min_count, tiny.max_count, tiny.max_num) == (2, 2, 30)
    assert tasks.get("Countdown-Tiny", max_num=50).max_num == 50
    assert tasks.get("countdown").answer_tags is True  # the task's own default
    assert tasks.resolve("countdown-tiny", {"max_num": 50}) == ("countdown", {**tasks.PRESETS["countdown-tiny"][1], "max_num": 50})
    assert tasks.resolve("function_calling", {"a": 1}) == ("function_calling", {"a": 1})
    with pytest.raises(R3Error, match="unknown option colour"):
        tasks.get("countdown-tiny", colour="red")
    cfg = parse_args([])
    assert (cfg.task, cfg.task_options) == ("countdown-tiny", {})
    cfg = parse_args(["--task", "function_calling", "--task-option", "synthetic_size=10"])
    assert cfg.task_options == {"synthetic_size": 10}
    assert isinstance(tasks.get(cfg.task, **cfg.task_options), FunctionCallingTask)


def test_unknown_task_names_the_value_and_lists_valid_ones():
    with pytest.raises(R3Error) as e:
        tasks.get("countdwn")
    msg = str(e.value)
    assert "'countdwn'" in msg and "countdown" in msg and "function_calling" in msg
    assert "\n" not in msg
    # every name get() takes: the tasks, the presets, the aliases, and the plug-in form
    assert msg == ("unknown task 'countdwn'; valid tasks: countdown, function_calling, countdown-tiny, "
                   "function-calling, xlam, or a plug-in 'package.module:ClassName'")
    with pytest.raises(R3Error):
        tasks.get("")
    with pytest.raises(R3Error):
        tasks.get(None)


def test_unknown_option_and_bad_values():
    with pytest.raises(R3Error, match="unknown option colour.*valid options:.*difficulty"):
        tasks.get("countdown", colour="red")
    with pytest.raises(R3Error, match="difficulty"):
        tasks.get("countdown", difficulty="hard")
    with pytest.raises(R3Error, match="min_count"):
        tasks.get("countdown", min_count=1)
    with pytest.raises(R3Error, match="ops"):
        tasks.get("countdown", ops="+^")
    with pytest.raises(R3Error, match="max_num"):
        tasks.get("countdown", min_num=50, max_num=10)
    with pytest.raises(R3Error, match="test_fraction"):
        tasks.get("countdown", test_fraction=1.5)
    with pytest.raises(R3Error, match="no such file: /nonexistent/x.jsonl$"):
        tasks.get("countdown", data_path="/nonexistent/x.jsonl")
    with pytest.raises(R3Error, match=r"no such file: x.jsonl \(relative to the current directory, /"):
        tasks.get("countdown", data_path="x.jsonl")  # (a config file's relative path is read from here)
    with pytest.raises(R3Error, match="placeholder"):
        tasks.get("countdown", prompt_template="Reach {target}.")
    with pytest.raises(R3Error, match="unknown split"):
        tasks.get("countdown").examples("validation", n=1)


def test_options_accept_cli_strings():
    t = tasks.get("countdown", min_count="4", max_count="4", test_fraction="0.2", format_example="false")
    assert (t.min_count, t.max_count, t.test_fraction, t.format_example) == (4, 4, 0.2, False)
    assert all(len(e["nums"]) == 4 for e in t.examples("train", n=20))
    with pytest.raises(R3Error, match="integer"):
        tasks.get("countdown", min_count="four")
    with pytest.raises(R3Error, match="integer"):
        tasks.get("countdown", min_count=True)


PLUGIN = '''
from r3.tasks import Task

class EchoTask(Task):
    name = "echo"
    default_reflection_prompt = "Why?"
    default_retry_prompt = "Again."

    def __init__(self, *, word="hi", reflection_prompt=None, retry_prompt=None):
        super().__init__(reflection_prompt=reflection_prompt, retry_prompt=retry_prompt)
        self.word = word

    def examples(self, split="train", n=None, seed=0):
        return [{"word": self.word}] * (n or 1)

    def messages(self, example):
        return [{"role": "user", "content": "Say " + example["word"]}]

    def _check(self, example, completion_text):
        return completion_text.strip() == example["word"], "wrong word"

def make(**kw):
    return EchoTask(**kw)

NOT_CALLABLE = 3
'''


def test_plugin_loading(tmp_path, monkeypatch, verifier_errors):
    (tmp_path / "r3_test_plugin_mod.py").write_text(PLUGIN)
    monkeypatch.syspath_prepend(str(tmp_path))
    t = tasks.get("r3_test_plugin_mod:EchoTask", word="yo", retry_prompt="Once more.")
    assert isinstance(t, Task) and t.word == "yo"
    ex = t.examples("train", n=2)[0]
    assert t.verify(ex, " yo ") is True and t.verify(ex, "no") is False
    assert t.verify(ex, None) is False  # the base class turns exceptions into False, counted
    assert verifier_errors == ["AttributeError: 'NoneType' object has no attribute 'strip'"]
    verifier_errors.clear()
    assert t.reflection_message() == {"role": "user", "content": "Why?"}
    assert t.retry_message(ex) == {"role": "user", "content": "Once more."}
    assert tasks.get("r3_test_plugin_mod:make", word="x").word == "x"  # a factory function works too
    with pytest.raises(R3Error, match="unknown option wrd"):
        tasks.get("r3_test_plugin_mod:EchoTask", wrd="yo")
    with pytest.raises(R3Error, match="no attribute 'Nope'"):
        tasks.get("r3_test_plugin_mod:Nope")
    with pytest.raises(R3Error, match="not a class or a callable"):
        tasks.get("r3_test_plugin_mod:NOT_CALLABLE")
    with pytest.raises(R3Error, match=r"cannot import module 'r3_no_such_module_xyz' .*\(is its directory on PYTHONPATH\?\)$"):
        tasks.get("r3_no_such_module_xyz:Task")
    (tmp_path / "r3_test_plugin_needs.py").write_text("import r3_no_such_dependency_xyz\n")
    with pytest.raises(R3Error, match=r"cannot import module 'r3_test_plugin_needs' \(No module named "
                                      r"'r3_no_such_dependency_xyz'\)$"):  # (its directory is on the path)
        tasks.get("r3_test_plugin_needs:Task")
    with pytest.raises(R3Error, match="package.module:ClassName"):
        tasks.get("r3_test_plugin_mod:")
    bad = tmp_path / "r3_test_plugin_syntax.py"
    bad.write_text("class Task:\n    def f(self)\n        return 1\n")
    with pytest.raises(R3Error, match=rf"task 'r3_test_plugin_syntax:Task': module 'r3_test_plugin_syntax' has a "
                                      rf"syntax error: expected ':' \({re.escape(str(bad))}, line 2\)$"):
        tasks.get("r3_test_plugin_syntax:Task")
    # the base class, or a subclass that leaves methods unwritten: named, not a NotImplementedError
    # traceback from the first rollout
    with pytest.raises(R3Error, match=r"Task does not define examples, messages, _check; a task subclasses"):
        tasks.get("r3.tasks.base:Task")
    (tmp_path / "r3_test_plugin_half.py").write_text(
        "from r3.tasks import Task\n\nclass Half(Task):\n    def examples(self, split='train', n=None, seed=0):\n"
        "        return [{'a': 1}]\n\nclass ByVerify(Half):\n    def messages(self, ex):\n        return []\n\n"
        "    def verify(self, ex, text):\n        return True\n")
    with pytest.raises(R3Error, match=r"Half does not define messages, _check;"):
        tasks.get("r3_test_plugin_half:Half")
    assert tasks.get("r3_test_plugin_half:ByVerify").verify({}, "x") is True  # (verify stands in for _check)
    (tmp_path / "r3_test_plugin_other.py").write_text(
        "from r3.tasks import Task\n\nclass ByVerdict(Task):\n    def __init__(self, **kw):\n"
        "        super().__init__(**kw)\n        self.examples = lambda split='train', n=None, seed=0: [{'a': 1}]\n"
        "        self.messages = lambda ex: [{'role': 'user', 'content': 'hi'}]\n\n"
        "    def _verdict(self, ex, text):\n        return True, 'correct'\n")
    by_verdict = tasks.get("r3_test_plugin_other:ByVerdict")  # (_verdict stands in; instance methods count)
    assert by_verdict.verify({}, "x") is True and by_verdict.examples() == [{"a": 1}]


def test_get_passes_through_a_built_task():
    t = CountdownTask(difficulty="easy")
    assert tasks.get(t) is t
    with pytest.raises(R3Error):
        tasks.get(t, difficulty="standard")


# ---------------------------------------------------------------------------------------
# Countdown verifier
# ---------------------------------------------------------------------------------------
CD = CountdownTask()
E123 = {"nums": [1, 2, 3], "target": 1}


@pytest.mark.parametrize(
    "nums,target,completion,expected",
    [
        # correct answers
        ([1, 2, 3], 1, ans("(1 + 2) / 3"), True),
        ([1, 2, 3], 1, ans("(2+1)/3"), True),
        ([1, 2, 3], 1, "<answer>\n(1 +\n 2)\t/ 3\n</answer>", True),  # whitespace and newlines
        ([1, 2, 3], 1, ans("(1 + 2) / 3 = 1"), True),  # "= target" suffix accepted
        ([1, 2, 3], 6, ans("((((1 + 2)))) + (3)"), True),  # redundant parentheses
        ([3, 3, 8, 8], 24, ans("8 / (3 - 8 / 3)"), True),  # exact: floats give 23.999999999999993
        ([1, 3, 3], 1, ans("1 / 3 * 3"), True),
        ([0, 0, 1], 0, ans("1 * 0 * 0"), True),  # zero is a fine literal
        ([9007199254740993, 1], 9007199254740992, ans("9007199254740993 - 1"), True),
        # exact arithmetic: float division would round 2**53 + 1 to 2**53 and wrongly accept this
        ([9007199254740993, 1], 9007199254740992, ans("9007199254740993 / 1"), False),
        ([1, 2, 3], 1, ans("(1 + 2) / 3 = 2"), False),  # RHS is not the target
        ([1, 2, 3], 1, ans("1 = (1 + 2) / 3"), False),
        ([1, 2, 3], 1, ans("(1 + 2) / 3 = 1 = 1"), False),
        ([1, 2, 3], 1, ans("(1 + 2) / 3 = 01"), False),
        # wrong numbers
        ([1, 2, 3], 3, ans("1 + 2"), False),  # missing 3
        ([1, 2, 3], 6, ans("2 + 2 + 2"), False),  # reused 2
        ([1, 2, 3], 6, ans("1 + 2 + 3 + 0"), False),  # extra literal
        ([1, 2, 3], 9, ans("1 + 2 + 3 + 3"), False),  # 3 used twice
        ([2, 2, 3], 7, ans("2 + 2 + 3"), True),  # duplicates in nums used as often as given
        ([2, 2, 3], 5, ans("2 + 3"), False),
        ([1, 2, 3], 7, ans("1 + 2 + 3"), False),  # wrong target
        # forbidden syntax
        ([2, 3, 1], 9, ans("2 ** 3 + 1"), False),
        ([7, 2, 1], 4, ans("7 // 2 + 1"), False),
        ([7, 2, 1], 2, ans("7 % 2 + 1"), False),
        ([1, 2, 3], 6, ans("1.0 + 2 + 3"), False),
        ([2000, 1, 2], 2003, ans("2e3 + 1 + 2"), False),
        ([1, 2, 3], 0, ans("-1 - 2 + 3"), False),  # unary minus is rejected ...
        ([1, 2, 3], 0, ans("3 - 2 - 1"), True),  # ... binary minus is fine
        ([1, 2, 3], 0, ans("3 - (+2) - 1"), False),  # unary plus too
        ([1, 2, 3], 0, ans("3 - -2 - 1 - 2"), False),
        ([1, 2, 3], 6, ans("True + 2 + 3"), False),
        ([1, 2, 3], 6, ans("'1' + 2 + 3"), False),
        ([1, 2, 3], 6, ans("x + 2 + 3"), False),
        ([1, 2, 3], 6, ans("abs(1) + 2 + 3"), False),
        ([1, 2, 3], 6, ans("(1).real + 2 + 3"), False),
        ([1, 2, 3], 6, ans("(lambda: 1)() + 2 + 3"), False),
        ([1, 2, 3], 6, ans("[1][0] + 2 + 3"), False),
        ([1, 2, 3], 6, ans("1 + 2 + 3 if 1 else 0"), False),
        ([1, 2, 3], 6, ans("__import__('os').system('true') or 1 + 2 + 3"), False),
        ([1, 2, 3], 6, ans("1 × 2 × 3"), False),  # only ASCII operators
        ([1, 2, 3], 6, ans("１ + 2 + 3"), False),  # fullwidth digit
        ([1, 2, 3], 6, ans("١ + ٢ + ٣"), False),  # Arabic-Indic digits
        ([1, 2, 3], 6, ans("01 + 2 + 3"), False),  # leading zeros are rejected
        ([0, 2, 4], 6, ans("00 + 2 + 4"), False),
        ([1, 2, 3], 6, ans("0x1 + 2 + 3"), False),
        ([10, 2, 3], 15, ans("1_0 + 2 + 3"), False),
        ([1, 2, 3], 6, ans("1 + 2 + 3,"), False),
        ([1, 2, 3], 6, ans("(1, 2, 3)"), False),
        ([1, 2, 3], 6, ans(""), False),
        ([1, 2, 3], 6, ans("1 + 2 + (3"), False),
        # division by zero, even where it would "cancel"
        ([1, 1, 2], 2, ans("2 / (1 - 1)"), False),
        ([1, 0, 0], 0, ans("(1 / 0) * 0"), False),
        ([1, 0, 0], 0, ans("0 * (1 / 0)"), False),
        # answer extraction
        ([1, 2, 3], 6, "1 + 2 + 3", False),  # no answer block
        ([1, 2, 3], 6, "<answer> 1 + 2 + 3", False),  # unclosed
        ([1, 2, 3], 6, "1 + 2 + 3 </answer>", False),
        ([1, 2, 3], 6, "<answer> 1 + 2 + 3 </answer> then <answer> 1 * 2 * 4 </answer>", False),  # last wins
        ([1, 2, 3], 6, "<answer> 1 + 2 </answer> no: <answer> 1 * 2 * 3 </answer> done", True),
        ([1, 2, 3], 6, "<answer> 1 * 2 * 3 </answer> oops <answer> 7", False),  # a later answer was started
        ([1, 2, 3], 6, "<answer> 1 * 2 * 3 </answer> oops <answer", False),  # ... in any spelling
        ([1, 2, 3], 6, "<answer> 1 * 2 * 3 </answer>!", True),
        ([1, 2, 3], 6, "<answer> 1 * 2 * 3 </answer> is not right", False),  # denied
        ([1, 2, 3], 6, "<answer> 1 * 2 * 3 </answer>. Hmm, that is wrong.", False),
        ([1, 2, 3], 6, "Not <answer> 1 * 2 * 3 </answer>", False),
        ([1, 2, 3], 6, "<answer>1 * 2 * 3</answer>\n<answer >1 + 2 + 3</answer >", False),  # a later block
        ([1, 2, 3], 6, "<answer>1 * 2 * 3</answer>\n<Answer>1 + 2 * 3</Answer>", False),
        ([1, 2, 3], 6, "<answer>1 * 2 * 3</answer> &lt;answer&gt;7", False),
        ([1, 2, 3], 6, "2 * <answer>1 * 2 * 3</answer>", False),  # next to the block
        ([1, 2, 3], 6, "<answer>1 * 2 * 3</answer>^2", False),
        ([1, 2, 3], 6, "n\u043et <answer>1 * 2 * 3</answer>", False),
        ([1, 2, 3], 6, "<answer>1 * 2 * 3</answer> The answer is 7.", False),
        ([1, 2, 3], 6, "So: <answer>1 * 2 * 3</answer>, which is 6.", True),
        ([1, 2, 3], 6, "<Answer> 1 + 2 + 3 </Answer>", False),  # tags are case-sensitive
        # around the block, the text is read as a person sees it, by the final equation's rules
        ([1, 2, 3], 6, "2\u2009*\u2009<answer>1 * 2 * 3</answer>", False),  # thin spaces
        ([1, 2, 3], 6, "&minus;<answer>1 * 2 * 3</answer>", False),  # an entity
        ([1, 2, 3], 6, "n\u200bot <answer>1 * 2 * 3</answer>", False),  # a zero-width space in a word
        ([1, 2, 3], 6, "n\u00adot <answer>1 * 2 * 3</answer>", False),  # a soft hyphen
        ([1, 2, 3], 6, "it is n&#111;t <answer>1 * 2 * 3</answer>", False),
        ([1, 2, 3], 6, "<answer>1 * 2 * 3</answer> is n\u200bot right", False),
        ([1, 2, 3], 6, "2 *\n<answer>1 * 2 * 3</answer>", False),  # the line before ends in an operator
        ([1, 2, 3], 6, "2 times\n<answer>1 * 2 * 3</answer>", False),
        ([1, 2, 3], 6, "Wrong: <answer>1 * 2 * 3</answer>", False),
        ([1, 2, 3], 6, "<answer>1 * 2 * 3</answer> \u274c", False),
        ([1, 2, 3], 6, "<answer>1 * 2 * 3</answer>?", False),
        ([1, 2, 3], 6, "<answer>1 * 2 * 3</answer>, which is fifty-seven", False),
        ([1, 2, 3], 6, "<answer>1 * 2 * 3</answer>. The answer is 6.5", False),
        ([1, 2, 3], 6, "<answer>1 * 2 * 3</answer> \u2713", True),
        ([1, 2, 3], 6, "The answer is:\n<answer>1 * 2 * 3</answer>, which is six.", True),
        # Markdown emphasis around words or around the block is markup, not arithmetic (a sixth
        # reader's: every "**Answer:** <answer>" reply was refused); stars that are not are read
        ([1, 2, 3], 6, "**Answer:** <answer>1 * 2 * 3</answer>", True),
        ([1, 2, 3], 6, "**Final Answer**\n<answer>1 * 2 * 3</answer>", True),
        ([1, 2, 3], 6, "The answer is **<answer>1 * 2 * 3</answer>**.", True),
        ([1, 2, 3], 6, "***Answer:*** <answer>1 * 2 * 3</answer>", True),
        ([1, 2, 3], 6, "2 **<answer>1 * 2 * 3</answer>**", False),
        ([1, 2, 3], 6, "2**<answer>1 * 2 * 3</answer>**", False),
        ([1, 2, 3], 6, "2 * **<answer>1 * 2 * 3</answer>**", False),
        ([1, 2, 3], 6, "** <answer>1 * 2 * 3</answer>**", False),
        ([1, 2, 3], 6, "**2** <answer>1 * 2 * 3</answer>", False),
        ([1, 2, 3], 6, "<answer>1 * 2 * 3</answer> **2**", False),
        ([1, 2, 3], 6, "**Not** <answer>1 * 2 * 3</answer>", False),
        ([1, 2, 3], 6, "<answer>1 * 2 * 3</answer> **times two**", False),
        ([1, 2, 3], 6, "<answer>1 * 2 * 3</answer> *n*", False),  # one letter: maybe a variable
        ([1, 2, 3], 6, "**\u212a** <answer>1 * 2 * 3</answer>", False),  # (the Kelvin sign is no ASCII letter)
        # an operator next to the block with a number past it, quotes and number words too; "/" and a
        # spaced "*" after it are arithmetic (a seventh reader's)
        ([1, 2, 3], 6, "<answer>1 * 2 * 3</answer> * two", False),
        ([1, 2, 3], 6, "<answer>1 * 2 * 3</answer>/'2'", False),
        ([1, 2, 3], 6, "two*<answer>1 * 2 * 3</answer>", False),
        ([1, 2, 3], 6, "<answer>1 * 2 * 3</answer>. Then /3", False),
        ([1, 2, 3], 6, "<answer>1 * 2 * 3</answer> and then * 2", False),
        ([1, 2, 3], 6, "<answer>1 * 2 * 3</answer>\nSo the result is **6**.", True),
        ([1, 2, 3], 6, "<answer>1 * 2 * 3</answer> \u2014 one way to do it", True),
        ([26, 24], 50, "<answer>26 + 24</answer>\n\"24\" would then be 'my' final answer.", False),
        ([26, 24], 50, "<answer>26 + 24</answer>. Actually, 24's the final answer.", False),
        ([26, 24], 50, "n * <answer>26 + 24</answer>", False),  # a variable times the answer
        ([26, 24], 50, "<answer>26 + 24</answer> / n", False),
        ([26, 24], 50, "*n*<answer>26 + 24</answer>", False),
        ([26, 24], 50, "<answer>26 + 24</answer>\n\n* 26 used once\n* 24 used once", True),  # bullets
        ([26, 24], 50, "**Answer:** <answer>26 + 24</answer>\n\n*   26 and 24 are both used once.", True),
        ([26, 24], 50, "<answer>26 + 24</answer>\n* 2 more", False),
        ([1, 2, 3], 6, "<answer>1 * 2<sup>3</sup></answer>", False),  # an exponent as markup
        ([1, 2, 3], 6, "<answer>1 * 2 * 3</answer> in binary", False),
        ([1, 2, 3], 6, "<answer>1 * 2 * 3</answer>\n3 is the final answer.", False),
        ([1, 2, 3], 6, "<answer>1 * 2 *\u20eb 3</answer>", False),
        # a leading reasoning block: only what follows its first </think> is read
        ([1, 2, 3], 6, "<think>\n1 + 2 = 3, 3 * 2 = 6\n</think>\n<answer>1 * 2 * 3</answer>", True),
        ([1, 2, 3], 6, "<think>\nIt is <answer>1 * 2 * 3</answer>\n</think>\nI give up.", False),
        ([1, 2, 3], 6, "<think>\nIt is <answer>1 * 2 * 3</answer> for sure", False),  # never closed
        ([1, 2, 3], 6, "<think>So <answer>1 + 2 + 4</answer></think> is wrong. <answer>1 * 2 * 3</answer>", True),
        ([1, 2, 3], 6, "Hmm </think> <answer>1 * 2 * 3</answer>", True),  # no leading block: the tag is markup
    ],
)
def test_countdown_verifier_cases(nums, target, completion, expected):
    ex = {"nums": nums, "target": target}
    assert CD.verify(ex, completion) is expected
    assert recheck(CD, ex, completion)[0] is expected


def test_countdown_overlay_marks_are_unicodes_combining_class_1():
    """Both readings of an overlaid character cover every overlay mark Unicode names (the verifier
    lists them, the re-check asks unicodedata), and the enclosing circle backslash (U+20E0, a
    prohibition sign drawn over it): none is dropped as a plain accent."""
    import unicodedata

    from r3.tasks.countdown_verify import OVERLAY_MARKS

    overlays = {chr(c) for c in range(0x110000) if unicodedata.combining(chr(c)) == 1} | {"\u20e0"}
    listed = {m.group() for c in map(chr, range(0x110000))
              for m in [re.fullmatch(f"[{OVERLAY_MARKS}]", c)] if m}
    assert listed == overlays
    ex = {"nums": [26, 24], "target": 50}
    for mark in sorted(overlays - {"\u0335", "\u0336"}):
        text = f"26 + 24 ={mark} 50"
        assert not LENIENT.verify(ex, text) and not recheck(LENIENT, ex, text)[0], hex(ord(mark))


def test_countdown_never_executes(tmp_path):
    marker = tmp_path / "pwned"
    for code in (f"open({str(marker)!r}, 'w')", f"__import__('pathlib').Path({str(marker)!r}).touch()"):
        assert CD.verify({"nums": [1], "target": 1}, ans(code)) is False
    assert not marker.exists()


def test_countdown_never_raises_on_junk(verifier_errors):
    """A completion that is no text is wrong (no verifier error); an example without its fields
    is a verifier error, counted, so a run on a broken data file says so."""
    for text in (None, b"<answer> 1 </answer>", 42, ["<answer>1</answer>"], "", "<answer></answer>"):
        assert CD.verify(E123, text) is False
    assert verifier_errors == []
    for ex, error in (({}, "KeyError: 'nums'"), ({"nums": [1, 2, 3]}, "KeyError: 'target'"),
                      ({"nums": None, "target": 1}, "TypeError: 'NoneType' object is not iterable"),
                      (None, "TypeError: 'NoneType' object is not subscriptable")):
        assert CD.verify(ex, ans("(1 + 2) / 3")) is False
        assert verifier_errors == [error]
        assert CD.diagnose(ex, ans("1")) == f"verifier error: {error}"
        verifier_errors.clear()


@pytest.mark.parametrize(
    "completion",
    [
        "<answer>" + "1+" * 500_000 + "1</answer>",  # 1 MB answer
        "x" * 1_000_000,  # 1 MB, no tags
        "<answer>" * 125_000,  # many opening tags, no closing one
        "<answer> 1 </answer>" * 50_000,  # 1 MB of blocks
        "<answer>" + "(" * 10_000 + "1" + ")" * 10_000 + "</answer>",  # deep nesting
        "<answer>" + "(" * 120 + "1" + ")" * 120 + "</answer>",  # nesting within the length bound
        "<answer>" + "-" * 200 + "1</answer>",
        "<answer>" + "+".join(["1"] * 120) + "</answer>",
    ],
    ids=["1MB-answer", "1MB-no-tags", "many-open-tags", "1MB-of-blocks", "nesting-10000", "nesting-120",
         "many-minus", "many-literals"],
)
def test_countdown_huge_and_deep_inputs_are_wrong(completion):
    # their verify time is in benchmarks/fuzz_verifiers.py (tests assert no wall-clock time)
    assert CD.verify({"nums": [1, 2, 3], "target": 6}, completion) is False
    assert LENIENT.verify({"nums": [1, 2, 3], "target": 6}, completion) is False


def test_countdown_moderate_nesting_is_fine():
    expr = "(" * 50 + "1 + 2" + ")" * 50 + " + 3"
    assert len(expr) < MAX_ANSWER_CHARS
    assert CD.verify({"nums": [1, 2, 3], "target": 6}, ans(expr)) is True
    assert CD.verify({"nums": [1, 2, 3], "target": 6}, ans("1 + 2 + 3" + " " * (MAX_ANSWER_CHARS + 1))) is True
    assert CD.verify({"nums": [1, 2, 3], "target": 6}, ans("1 +" + " " * MAX_ANSWER_CHARS + "2 + 3")) is False
    # the bound itself: an answer of exactly MAX_ANSWER_CHARS characters is read, one more is not
    assert check_answer("1 +" + " " * (MAX_ANSWER_CHARS - 8) + "2 + 3", [1, 2, 3], 6) == (True, "correct")
    assert check_answer("1 +" + " " * (MAX_ANSWER_CHARS - 7) + "2 + 3", [1, 2, 3], 6) == (
        False, f"answer longer than {MAX_ANSWER_CHARS} characters")


def test_countdown_diagnose_reasons():
    ex = {"nums": [1, 2, 3], "target": 6}
    assert CD.diagnose(ex, ans("1 + 2 + 3")) == "correct"
    assert "no <answer>" in CD.diagnose(ex, "6")
    assert "evaluates to 5" in CD.diagnose(ex, ans("1 * 2 + 3"))
    assert "exactly once" in CD.diagnose(ex, ans("2 + 2 + 2"))
    assert "division by zero" in CD.diagnose({"nums": [1, 1, 2], "target": 2}, ans("2 / (1 - 1)"))
    assert "unary" in CD.diagnose(ex, ans("-1 + 2 + 3"))
    assert "only + - * /" in CD.diagnose({"nums": [2, 3, 1], "target": 9}, ans("2 ** 3 + 1"))
    assert "leading zero" in CD.diagnose(ex, ans("01 + 2 + 3"))
    # (a sample's reason names what stands next to the equation)
    from r3.tasks.countdown_verify import check_completion
    assert check_completion("The equation is [1, -1] + [2, 3] = 7 + 6 = 13.", [7, 6], 13, tags=False)[1] \
        == "a bracket the task does not allow next to the equation (']')"
    assert check_completion("So 7 + 6 = 13 ^ 2", [7, 6], 13, tags=False)[1] \
        == "an operator the task does not allow next to the equation ('^')"


def test_extract_answer():
    assert extract_answer("a <answer>x</answer> b <answer>y</answer> c") == "y"
    assert extract_answer("<answer>x</answer><answer>y") == "x"
    assert extract_answer("nothing") is None
    assert check_answer(" (1 + 2) / 3 ", [1, 2, 3], 1) == (True, "correct")


# ---------------------------------------------------------------------------------------
# solver and generator
# ---------------------------------------------------------------------------------------
def _brute_force(nums, ops):
    """Every integer reachable by repeatedly combining two of the numbers (independent of the
    subset DP in the solver)."""
    out = set()

    def rec(vals):
        if len(vals) == 1:
            if vals[0].denominator == 1:
                out.add(int(vals[0]))
            return
        for i, j in itertools.permutations(range(len(vals)), 2):
            a, b = vals[i], vals[j]
            rest = [v for k, v in enumerate(vals) if k not in (i, j)]
            for op in ops:
                if op == "/" and b == 0:
                    continue
                rec(rest + [{"+": a + b, "-": a - b, "*": a * b, "/": a / b if b else 0}[op]])

    rec([Fraction(x) for x in nums])
    return out


def test_solver_matches_brute_force():
    rng = random.Random(1234)
    for _ in range(40):
        nums = [rng.randint(0, 15) for _ in range(rng.choice([2, 3, 4]))]
        ops = rng.choice(["+-*/", "+-", "*/", "+*", "-/", "/", "+"])
        expected = _brute_force(nums, ops)
        assert set(reachable_targets(nums, ops)) == expected, (nums, ops)
        for t in sorted(expected)[:6]:
            sol = solve(nums, t, ops)
            assert sol is not None and check_answer(sol, nums, t)[0], (nums, t, sol)
            assert set(sol) - set("0123456789 ()") <= set(ops)
        assert solve(nums, max(expected) + 1, ops) is None


def test_solver_known_cases():
    assert check_answer(solve([3, 3, 8, 8], 24), [3, 3, 8, 8], 24)[0]
    assert check_answer(solve([1, 5, 5, 5], 24), [1, 5, 5, 5], 24)[0]
    assert solve([1, 1, 1, 1], 24) is None
    assert solve([1, 1], 7) is None
    assert solve([0, 0], 0) is not None


@pytest.mark.parametrize("difficulty", ["standard", "easy"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_generated_examples_are_solvable_and_in_range(difficulty, seed):
    t = CountdownTask(difficulty=difficulty)
    for split in ("train", "test"):
        exs = t.examples(split, n=150, seed=seed)
        assert len(exs) == 150
        keys = set()
        for e in exs:
            assert t.min_count <= len(e["nums"]) <= t.max_count
            assert all(type(x) is int and t.min_num <= x <= t.max_num for x in e["nums"])
            assert type(e["target"]) is int and t.min_target <= e["target"] <= t.max_target
            assert t.verify(e, f"<answer> {e['solution']} </answer>"), e
            assert set(e["solution"]) - set("0123456789 ()") <= set(t.ops)
            keys.add((tuple(sorted(e["nums"])), e["target"]))
        assert len(keys) == len(exs)  # no duplicate problems within a split


def test_easy_preset():
    t = CountdownTask(difficulty="easy")
    exs = t.examples("train", n=300)
    assert all(len(e["nums"]) == 3 and max(e["nums"]) <= 20 for e in exs)
    assert all("*" not in e["solution"] and "/" not in e["solution"] for e in exs)
    # explicit knobs override the preset
    t2 = CountdownTask(difficulty="easy", max_num=5, max_target=10)
    assert all(max(e["nums"]) <= 5 and e["target"] <= 10 for e in t2.examples("train", n=30))


def test_generation_is_deterministic_and_prefix_stable():
    a = CountdownTask().examples("train", n=60, seed=7)
    b = CountdownTask().examples("train", n=60, seed=7)
    assert a == b
    assert CountdownTask().examples("train", n=20, seed=7) == a[:20]
    c = CountdownTask().examples("train", n=60, seed=8)
    assert [e["nums"] for e in a] != [e["nums"] for e in c]
    assert CountdownTask().examples("test", n=10) == CountdownTask().examples("test", n=10)


@pytest.mark.parametrize("difficulty", ["standard", "easy"])
def test_train_and_test_are_disjoint(difficulty):
    t = CountdownTask(difficulty=difficulty)
    n_train = 1500 if difficulty == "easy" else 300
    train = {tuple(sorted(e["nums"])) for s in (0, 1) for e in t.examples("train", n=n_train, seed=s)}
    test = {tuple(sorted(e["nums"])) for s in (0, 1) for e in t.examples("test", n=150, seed=s)}
    assert train and test and not train & test


def test_exhausted_problem_space_is_a_clear_error():
    t = CountdownTask(min_count=3, max_count=3, min_num=1, max_num=1, min_target=1, max_target=99,
                      ops="+", test_fraction=0.0)
    assert [e["target"] for e in t.examples("train", n=1)] == [3]
    with pytest.raises(R3Error, match="found only 1 distinct"):
        t.examples("train", n=2)
    with pytest.raises(R3Error, match="empty"):
        t.examples("test", n=1)


# ---------------------------------------------------------------------------------------
# prompts
# ---------------------------------------------------------------------------------------
def test_countdown_messages_and_prompts():
    ex = {"nums": [19, 36, 55, 7], "target": 65}
    msgs = CountdownTask().messages(ex)
    assert [m["role"] for m in msgs] == ["user"]
    text = msgs[0]["content"]
    assert "[19, 36, 55, 7]" in text and "65" in text and "<answer>" in text and "exactly once" in text
    assert "<answer> (1 + 2) / 3 </answer>" in text
    # the format example in the prompt is itself a correct answer
    assert CD.verify({"nums": [1, 2, 3], "target": 1}, text)
    plain = CountdownTask(format_example=False).messages(ex)[0]["content"]
    assert "(1 + 2) / 3" not in plain and "[19, 36, 55, 7]" in plain
    sys_msgs = CountdownTask(system_prompt="You are terse.").messages(ex)
    assert sys_msgs[0] == {"role": "system", "content": "You are terse."} and sys_msgs[1]["role"] == "user"
    custom = CountdownTask(prompt_template="Reach {target} from {nums}. JSON {\"a\": 1}").messages(ex)
    assert custom[0]["content"] == "Reach 65 from [19, 36, 55, 7]. JSON {\"a\": 1}"


def test_countdown_stop_strings_follow_the_answer_format():
    """With tags an answer turn ends at </answer> (unless stop_at_answer is off); without tags
    there is no stop (a later equation would replace the answer); the option round-trips."""
    assert tasks.get("countdown").stop_strings == ("</answer>",)
    assert tasks.get("countdown", stop_at_answer=False).stop_strings == ()
    assert tasks.get("countdown-tiny").stop_strings == ()
    assert tasks.get("function_calling").stop_strings == ()
    t = tasks.get("countdown", stop_at_answer="false")
    assert tasks.get("countdown", **t.config()).stop_strings == ()
    with pytest.raises(R3Error, match="stop_at_answer"):
        tasks.get("countdown", stop_at_answer="maybe")
    # what the first </answer> ends is what the verifier reads
    ex = {"nums": [3, 5], "target": 8}
    text = "Let me see. <answer> 3 + 5 </answer>"
    assert tasks.get("countdown").verify(ex, text)


def test_reflection_and_retry_prompts():
    t = CountdownTask()
    assert t.reflection_prompt == REFLECTION_PROMPT == (
        "You tried solving the problem and got the wrong answer. Reflect on what went wrong and "
        "write a short explanation that will help you do better next time.")
    assert t.reflection_message({"nums": [1], "target": 1}) == {"role": "user", "content": REFLECTION_PROMPT}
    assert "<answer>" in t.retry_prompt
    t2 = tasks.get("countdown", reflection_prompt="Why?", retry_prompt="Again.")
    assert t2.reflection_message()["content"] == "Why?" and t2.retry_message()["content"] == "Again."
    with pytest.raises(R3Error, match="reflection_prompt"):
        tasks.get("countdown", reflection_prompt="  ")


# ---------------------------------------------------------------------------------------
# loading the public export
# ---------------------------------------------------------------------------------------
def _rows(n=40):
    t = CountdownTask()
    return [{"target": e["target"], "nums": e["nums"]} for e in t.examples("train", n=n, seed=3)]


def test_load_jsonl_and_json(tmp_path):
    rows = _rows()
    p = tmp_path / "cd.jsonl"
    p.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    q = tmp_path / "cd.json"
    q.write_text(json.dumps(rows))
    for path in (p, q):
        t = tasks.get("countdown", data_path=str(path), test_fraction=0.25)
        assert t.synthetic is False
        train, test = t.examples("train"), t.examples("test")
        assert len(train) + len(test) == len(rows) and test and train
        key = lambda e: (tuple(e["nums"]), e["target"])  # noqa: E731
        assert sorted(map(key, train + test)) == sorted(map(key, rows))
        assert not {key(e) for e in train} & {key(e) for e in test}
        assert t.examples("train", n=5, seed=1) == t.examples("train", seed=1)[:5]
        assert t.examples("train", n=5, seed=1) != t.examples("train", n=5, seed=2)
        assert len(t.examples("train", n=10_000)) == len(train)
        for e in train:  # generated rows are solvable: their solver answer verifies
            assert t.verify(e, ans(solve(e["nums"], e["target"])))


def test_load_explicit_test_file(tmp_path):
    rows = _rows(20)
    (tmp_path / "a.jsonl").write_text("\n".join(json.dumps(r) for r in rows[:15]))
    (tmp_path / "b.jsonl").write_text("\n".join(json.dumps(r) for r in rows[15:]))
    t = CountdownTask(data_path=str(tmp_path / "a.jsonl"), test_data_path=str(tmp_path / "b.jsonl"))
    assert len(t.examples("train")) == 15 and len(t.examples("test")) == 5


@pytest.mark.parametrize(
    "content,match",
    [
        ('{"target": 5, "nums": [1, 4]}\n{"nums": [1, 2]}\n', r"bad\.jsonl, line 2: missing field 'target'"),
        ('{"target": 5, "nums": [1, 4]}\n{"target": 3}\n', r"line 2: missing field 'nums'"),
        ('{"target": 5, "nums": [1, 4]}\n{"target": 5, "nums": "1 4"}\n', r"line 2: field 'nums'"),
        ('{"target": "5", "nums": [1, 4]}\n', r"line 1: field 'target' must be an integer"),
        ('{"target": 5.5, "nums": [1, 4]}\n', r"line 1: field 'target' must be an integer"),  # never 5
        ('{"target": 5, "nums": [1, -4]}\n', r"line 1: field 'nums' must hold non-negative"),
        ('{"target": 5, "nums": [1, 4.5]}\n', r"line 1: field 'nums'"),
        ('{"target": 5, "nums": [1, 4]}\n{"target": 5, "nums": [1, 4\n', r"line 2: not valid JSON"),
        ('[1, 2]\n', r"line 1: expected an object"),
        ('', r"no records"),
    ],
)
def test_load_malformed_rows(tmp_path, content, match):
    p = tmp_path / "bad.jsonl"
    p.write_text(content)
    with pytest.raises(R3Error, match=match):
        CountdownTask(data_path=str(p)).examples("train")


def test_load_malformed_json_list(tmp_path):
    p = tmp_path / "bad.json"
    p.write_text(json.dumps([{"target": 5, "nums": [1, 4]}, {"target": 5, "nums": [True, 4]}]))
    with pytest.raises(R3Error, match=r"bad\.json, record 2: field 'nums'"):
        CountdownTask(data_path=str(p)).examples("train")
    p.write_text('{"target": 5')
    with pytest.raises(R3Error, match=r"bad\.json: not valid JSON"):
        CountdownTask(data_path=str(p)).examples("train")
    for name in ("empty.json", "empty.txt"):  # (was "not valid JSON (line 1, column 1: Expecting value)")
        (tmp_path / name).write_text(" \n")
        with pytest.raises(R3Error, match=rf"{name}: empty file, no records"):
            CountdownTask(data_path=str(tmp_path / name)).examples("train")


def test_parquet_without_pyarrow_is_a_clear_error(tmp_path, monkeypatch):
    p = tmp_path / "cd.parquet"
    p.write_bytes(b"PAR1 not really")
    monkeypatch.setitem(sys.modules, "pyarrow", None)  # import pyarrow -> ImportError
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    with pytest.raises(R3Error, match=r"cd\.parquet.*pip install pyarrow"):
        CountdownTask(data_path=str(p)).examples("train")


def test_generated_rows_look_like_the_public_export():
    e = CountdownTask().examples("train", n=1)[0]
    assert set(e) == {"id", "nums", "target", "solution"}
    assert Counter(type(x) for x in e["nums"]) == Counter({int: len(e["nums"])})


def test_malformed_examples_are_false_not_truncated(verifier_errors):
    """A number that is not an integer is an error in the example (counted), never truncated."""
    assert CD.verify({"nums": [1, 2, 3], "target": 6.0}, ans("1 + 2 + 3")) is True
    for ex, text, bad in (({"nums": [1, 2, 3], "target": 6.5}, ans("1 + 2 + 3"), "6.5"),  # not int(6.5) == 6
                          ({"nums": [1, 2, 3], "target": 4.5}, ans("1.5 + 3"), "4.5"),
                          ({"nums": [1, 2, 3.5], "target": 6}, ans("1 + 2 + 3"), "3.5"),
                          ({"nums": [True, 2, 3], "target": 6}, ans("1 + 2 + 3"), "True")):
        assert CD.verify(ex, text) is False
        assert verifier_errors == [f"TypeError: expected an integer, got {bad}"]
        verifier_errors.clear()
        assert recheck(CD, ex, text) == (False, "malformed example")


@pytest.mark.parametrize("name,options", [("countdown", {"difficulty": "easy", "max_num": 12}),
                                          ("xlam", {"synthetic_size": 50, "test_fraction": 0.2})])
def test_config_round_trips(name, options):
    t = tasks.get(name, **options)
    cfg = t.config()
    json.dumps(cfg)  # serialisable for run metadata
    t2 = tasks.get(t.name, **cfg)
    assert t2.config() == cfg
    assert t2.examples("test", n=3, seed=1) == t.examples("test", n=3, seed=1)
    assert t2.messages(t.examples("test", n=1)[0]) == t.messages(t.examples("test", n=1)[0])


# The default run's options (two numbers, + and -, no tags): the final equation is the answer.
LENIENT = CountdownTask(difficulty="easy", answer_tags=False, min_count=2, max_count=2, max_num=30,
                        max_target=60)


@pytest.mark.parametrize(
    "nums,target,completion,expected",
    [
        # rewarded by the old reader on the default run (issue 12), all wrong
        ([27, 10], 37, "27 + (27 - 10) = 37 \n-10 + 27 = 37", False),  # the last equation's minus
        ([19, 17], 36, "The answer is 19 + 17 = 26.", False),  # a false written result
        ([28, 12], 40, "28 + 12 = 40\nCorrected equation: 4x + 3 = 40", False),  # the final one counts
        ([5, 23], 28, "Let me see. <answer> </answer>\nSo 5 + 23 = 28", True),  # echoed empty tags
        ([6, 92], -86, "-6 - 92", False),
        ([6, 92], -86, "6 - 92 = -86", True),  # a negative written result is fine
        # prose around the final equation is fine
        ([3, 4], 7, "so 4 + 3 = 7.", True),
        ([3, 4], 7, "(3+4)", True),
        ([3, 4], 7, "3 + 4 = 7, which is the target.", True),
        ([3, 4], 7, "Sure! 3 + 4 = 7", True),
        ([3, 4], 7, "3 + 4 = 7!", True),  # after a written result, '!' is an exclamation
        ([3, 4], 7, "3 + 4!", False),  # ... after an expression, a factorial
        ([3, 4], 7, "**Answer:** 3 + 4 = 7", True),
        ([3, 4], 7, "**3 + 4 = 7**", True),
        ([3, 4], 7, "**Answer: 3 + 4 = 7**", True),
        ([3, 4], 7, "3 + 4 = 7 (using each number once)", True),
        ([3, 4], 7, "Using each number exactly once \u2013 3 + 4 = 7", True),  # an en dash in prose
        ([3, 4], 7, "3 + 4 = 7 \u2713", True),
        ([3, 4], 7, "$3 + 4 = 7$", True),
        ([3, 4], 7, "3 + 4 = 7\nThe target was 7.", True),  # a bare number is no equation
        ([3, 4], 7, "4 - 3 = 1 is wrong.\n3 + 4 = 7", True),
        ([3, 4], 7, "x" * 90_000 + " 4 + 3", True),
        # the final equation is the last one, right or wrong
        ([3, 4], 7, "3 + 4 = 7. Check: 7 - 4 = 3", False),
        ([3, 4], 7, "4 + 3 first, then 4 - 3", False),
        ([3, 4], 7, "3 + 4 = 7 and 28 = 28", False),
        ([3, 4], 7, "7", False),
        ([3, 4], 7, "", False),
        # chained, reversed and malformed equations
        ([3, 4], 7, "3 + 4 = 7 = 7", False),
        ([3, 4], 7, "7 = 3 + 4", False),
        ([3, 4], 7, "3 + 4 = 3 + 4", False),
        ([3, 4], 7, "3 + 4 =", False),
        ([3, 4], 7, "= 7", False),
        ([3, 4], 7, "3 + 4 = +7", False),
        ([3, 4], 7, "3 + 4 = 07", False),
        ([3, 4], 7, "03 + 4 = 7", False),
        ([3, 4], 7, "3 + 4 +", False),
        ([3, 4], 7, "(3 + 4", False),
        ([16, 9], 7, "16 + (-9) = 16 - 9 = 7", False),
        # variables and letters glued to it
        ([3, 4], 7, "3x + 4 = 7", False),
        ([3, 4], 7, "x + 3 + 4", False),
        ([3, 4], 7, "3 + 4y", False),
        ([30, 10], 40, "The equation is: x = 30 + 10", False),
        ([2, 21], 19, "x + 21 - 2x + 21", False),
        ([2, 21], 19, "a21 - 2", False),
        ([3, 4], 7, "3 + 4 = 7km", False),
        # operators the task does not allow, next to the equation
        ([3, 4], 7, "2^(3 + 4)", False),
        ([3, 4], 7, "(3 + 4)^2", False),
        ([3, 4], 7, "(3 + 4)**2", False),
        ([3, 4], 7, "(3 + 4)!", False),
        ([3, 4], 7, "(3 + 4)%", False),
        ([3, 4], 7, "3 + 4 % 5", False),
        ([3, 4], 7, "(3 + 4)\u00b2", False),
        ([3, 4], 7, "\u221a(3 + 4)", False),
        ([3, 4], 7, "log (3 + 4)", False),
        ([3, 4], 7, "log(3 + 4)", False),
        ([3, 4], 7, "3 + 4 mod 5", False),
        ([3, 4], 7, "the square root of 3 + 4", False),
        ([3, 4], 7, "2 to the power of (3 + 4)", False),
        ([3, 4], 7, "(3 + 4) squared", False),
        ([3, 4], 7, "negative 3 + 4 = 7", False),
        ([3, 4], 7, "|3 - 4| + 6", False),
        ([3, 4], 7, "[3 + 4 = 7]", False),
        ([3, 4], 7, "3 + 4 \u2192 7", False),
        ([3, 4], 7, "3 + 4 \u2265 7", False),
        ([3, 4], 7, "3 \u00d7 4 = 7", False),
        ([3, 4], 7, "3 + 4 \u2013 0", False),  # an en dash as a minus before a number
        ([3, 4], 7, "\u20103 + 4", False),  # a dash glued before it
        ([3, 4], 7, "5 x 3 + 4", False),
        ([3, 4], 7, "3 + 4 times 1", False),
        # decimals, digit grouping and numbers in other scripts
        ([3, 4], 7, "3 + 4 = 7.0", False),
        ([3, 4], 7, "3.0 + 4 = 7", False),
        ([3, 4], 7, "1,3 + 4 = 7", False),
        ([3, 4], 7, ".3 + 4", False),
        ([3, 4], 7, "\uff13 + 4 = 7", False),  # fullwidth 3
        ([3, 4], 7, "\u0663 + 4 = 7", False),  # Arabic-Indic 3
        ([3, 4], 7, "3 + \u0664", False),
        # a result written in words is the written result; a denied equation is no answer
        ([26, 24], 50, "26 + 24 equals 50", True),
        ([26, 24], 50, "26 + 24 is equal to 50!", True),
        ([26, 24], 50, "26 + 24, which is 50.", True),
        ([26, 24], 50, "26 + 24 gives a total of 50", True),
        ([26, 24], 50, "26 + 24 is the answer", True),
        ([22, 7], 29, "The equation 22 + 7 equals 30.", False),
        ([26, 24], 50, "26 + 24 is not 50", False),
        ([19, 16], 35, "I ended up with 19 + 16, which is not 35.", False),
        ([26, 24], 50, "It is not 26 + 24", False),
        ([26, 24], 50, "So, you can't add 26 + 24 to any equation.", False),
        ([26, 24], 50, "26 + 24 isn\u2019t right", False),
        ([26, 24], 50, "26 + 24 is 50.5", False),
        ([26, 24], 50, "26 + 24 is 50%", False),
        ([26, 24], 50, "26 + 24 is \u0665\u0660", False),
        ([26, 24], 50, "26 + 24 = 50, not 51", False),  # after it: only the given numbers and the target
        ([9, 7], 16, "But 16 is not a possible multiple of 7 + 9.", False),
        # a denial anywhere after it (two retries a default run rewarded before this rule)
        ([23, 11], 34, "The original equation I provided earlier, 23 + 11 = 34, is indeed wrong.", False),
        ([6, 7], 13, 'Solve the equation 6 + 7 = 13.\n\nThere is no equation.\n\nThe answer is not "13"', False),
        ([23, 11], 34, "23 + 11 = 34. That isn\u2019t right, sorry.", False),
        ([23, 11], 34, "23 + 11 = 34. Done, the answer is 34!", True),
        ([10, 26], 36, "The correct way to solve the equation: \n(10 + 26) = 36\nThe equation is undefined.", False),
        ([29, 13], 42, "When you add 29 + 13 to 29 + 13, you get 42, which is the result", False),
        ([29, 13], 42, "Subtract 2 from 29 + 13 = 42", False),
        ([29, 13], 42, "I tried 27 and then 29 + 13 = 42", True),
        ([21, 27], 48, "You used the incorrect formula for 48 = 21 * 2 for 21 + 27.", False),
        # unfinished: an operator at the very end, a result word with no result
        ([24, 13], 37, "Let's start with 24 and add 13 to it: 24 + 13 \u2013 ", False),
        ([5, 15], 20, "(like 5 + 15 = 20, +", False),
        ([8, 4], 12, "The correct solution is 8 + 4 equals ", False),
        ([27, 5], 32, 'The example you gave was the "27 + 5," which was', False),
        ([16, 18], 34, "I started with 16 + 18, which equals 34. Then I added", False),
        ([5, 23], 28, "5 + 23 is", False),
        # more denials, arithmetic on the result (real retries a run rewarded)
        ([18, 24], 42, "However, I ended up at 18 + 24 = 42, which wasn", False),
        ([18, 24], 42, "18 + 24 = 42 hasn't worked", False),
        ([10, 28], 38, "10 + 28 equals 38, but it seems to be a contradiction based on", False),
        ([3, 21], 24, "3 + 21 = 24\n\nI made an error by adding the fractions 3 and 21 together twice.", False),
        ([26, 24], 50, "The answer is 26 + 24 = 50. Then double it.", False),
        ([26, 24], 50, "26 + 24 = 50. Multiply the result by the next number.", False),
        ([11, 1], 12, "11 + 1 = 12\n\nHowever, when the numbers are multiplied together, they equal 12.", False),
        ([18, 17], 35, "I'm going to solve the equation 18 + 17 = 35 and end by adding 17 to itself.", False),
        ([8, 4], 12, "Next, I multiplied 12 by both sides of the equation 8 + 4 = 12, which gave me ", False),
        ([18, 17], 35, "$$\n\n18 + 17 = 35\n\nHere it is:\n\n$$\n\\frac", False),
        # a bare expression is an answer where its sentence ends, not a mention in prose
        ([3, 11], 14, "The story of the equation 3 + 11 is a well-known mathematical puzzle.", False),
        ([15, 20], 35, "Calculating 15 + 20 gave me a decimal number.", False),
        ([20, 21], 41, "finding the sum of numbers (20 + 21) and themselves is a classic example", False),
        ([7, 16], 23, "the equation 7 + 16, you might assume that it equals", False),
        # ... and plainly correct answers stay correct
        ([26, 24], 50, "Adding them: 26 + 24 = 50", True),
        ([26, 24], 50, "Corrected error: 26 + 24 = 50.", True),
        ([26, 24], 50, "I first wrote 26 - 24 = 50, which is wrong. The answer is 26 + 24 = 50.", True),
        ([6, 7], 13, "6 + 7 = 13 \u2013 done.", True),
        ([26, 24], 50, "26 + 24 = 50. I added the two numbers.", True),
        ([6, 7], 13, "The final equation is 6 + 7.", True),
        ([5, 23], 28, "5 + 23 is the answer", True),
        ([5, 23], 28, "5 + 23 and that is my answer.", True),
        ([9, 1], 10, "9 + 1, which turns out to be 10.", True),
        ([9, 1], 10, "So: 9 + 1\nThat's it.", True),
        ([5, 23], 28, "Add them and it gives 5 + 23 = 28.", True),
        ([5, 23], 28, "**5 + 23** is the answer \u2713", True),
        ([5, 23], 28, '"5 + 23", which is the target.', True),
        # text hidden from a plain reading: Unicode spaces, invisible characters, entities, markup
        ([26, 24], 50, "2\u00a0*\u00a026 + 24 = 50", False),  # no-break spaces are spaces
        ([26, 24], 50, "26 + 24 = 50\u00a0-\u00a02", False),
        ([26, 24], 50, "2 *\u200b26 + 24 = 50", False),  # a zero-width space is nothing
        ([26, 24], 50, "3 ti\u00admes 26 + 24 = 50", False),  # a soft hyphen is nothing
        ([26, 24], 50, "log\u200b 26 + 24 = 50", False),
        ([26, 24], 50, "3 \u0445 26 + 24 = 50", False),  # a Cyrillic x
        ([26, 24], 50, "3 _times_ 26 + 24 = 50", False),  # Markdown emphasis around a word
        ([26, 24], 50, "The answer is _not_ 26 + 24 = 50", False),
        ([26, 24], 50, "'not' 26 + 24 = 50", False),
        ([26, 24], 50, "3 times the sum of 26 + 24 = 50", False),  # four words away
        ([26, 24], 50, "50% of 26 + 24 = 50", False),
        ([26, 24], 50, "1/2 of 26 + 24 = 50", False),
        ([26, 24], 50, "A third of 26 + 24 = 50", False),
        ([25, 10], 35, "the final equation:\n\nTwo-fifths of 25 + 10 = 35", False),  # rewarded once in a run
        ([25, 10], 35, "Two of 25 + 10 = 35", False),
        ([26, 24], 50, "Subtract 2 from 26 + 24 = 50", False),
        ([26, 24], 50, "26 + 24 = 50 less 2", False),
        ([26, 24], 50, "26 + 24 = 50 (in base 8)", False),
        ([26, 24], 50, "3 \\cdot 26 + 24 = 50", False),
        ([26, 24], 50, "3 &times; 26 + 24 = 50", False),  # HTML entities are decoded
        ([26, 24], 50, "26 + 24 = 50 &minus; 2", False),
        ([26, 24], 2, "\u202e26 - 24 = 2", False),  # bidirectional overrides: wrong whatever they show
        ([26, 24], 50, "3 *\n26 + 24 = 50", False),  # the line before ends in an operator
        ([26, 24], 50, "3 times\n26 + 24 = 50", False),
        ([26, 24], 50, "The answer is:\n26 + 24 = 50", True),
        # a result in words that is not the target, or not a plain integer
        ([26, 24], 48, "26 + 24 gives us 48.", False),
        ([26, 24], 50, "26 + 24 gives us 48.", False),
        ([26, 24], 50, "26 + 24 is: 48", False),
        ([26, 24], 50, "So the equation is 26 + 24, which equals: 48.", False),
        ([26, 24], 50, "26 + 24, that's 48.", False),
        ([26, 24], 50, "26 + 24; that is 48.", False),
        ([26, 24], 50, "26 + 24 is, in fact, 48", False),
        ([26, 24], 50, "26 + 24 is exactly 48.", False),
        ([26, 24], 50, "26 + 24 is ~48", False),
        ([26, 24], 50, "26 + 24 is (48)", False),
        ([26, 24], 50, "26 + 24 is '48'", False),
        ([26, 24], 50, "26 + 24 is forty-eight.", False),
        ([26, 24], 50, "26 + 24 is \u221250", False),
        ([26, 24], 50, "26 + 24 is exactly 50.", True),
        # a later answer contradicts the final equation
        ([26, 24], 50, "26 + 24 = 50. The answer is 48.", False),
        ([26, 24], 50, "26 + 24 = 50, then subtract 2 to get 48.", False),
        ([26, 24], 50, "26 + 24 = 50\n<answer>48</answer>", False),
        ([26, 24], 50, "Try 26 + 24 = 50? Hmm. Answer: 26 \u00d7 2 \u2212 2", False),
        ([26, 24], 50, "26 + 24 = 50. Final answer: $26 \\times 24$", False),
        ([26, 24], 50, "26 + 24 = 50. The answer is 50.", True),
        ([26, 24], 50, "26 + 24 = 50. The answer is fifty.", False),  # an answer in words is not read
        ([26, 24], 50, "26 + 24 = 50. The answer is fifty.", False),
        # wrappers that change nothing
        ([26, 24], 50, "\\boxed{26 + 24 = 50}", True),
        ([26, 24], 50, "\\(26 + 24 = 50\\)", True),
        ([26, 24], 50, "(26 + 24 = 50)", True),
        ([26, 24], 50, "<b>26 + 24 = 50</b>", True),
        ([26, 24], 50, "</think> 26 + 24 = 50", True),
        ([26, 24], 50, "**(26 + 24 = 50)** (using both)", True),
        ([26, 24], 50, "I can't use \\boxed{26 + 24}", False),
        ([26, 24], 50, "<b>26 + 24</b> is 48", False),
        # a second adversarial review: marks and blanks, look-alike letters, more operator words,
        # later answers the earlier rules missed
        ([26, 24], 50, "3 *\ufe0f 26 + 24 = 50", False),  # a variation selector is nothing
        ([26, 24], 50, "2\u2800*\u2800(26 + 24)", False),  # a braille blank is a space
        ([26, 24], 50, "26 + 24 = 50\u034f.5", False),
        ([26, 24], 50, "3 *\u3164 26 + 24 = 50", False),
        ([26, 24], 50, "3 *\u2800\n26 + 24 = 50", False),
        ([26, 24], 50, "3 t\u0456mes 26 + 24 = 50", False),  # Cyrillic i: a word in another alphabet
        ([26, 24], 50, "l\u03bfg (26 + 24)", False),
        ([26, 24], 50, "26 + 24 is n\u043et 50", False),
        ([26, 24], 50, "3 \uff58 26 + 24 = 50", False),
        ([26, 24], 50, "3 \u03c7 26 + 24 = 50", False),
        ([26, 24], 50, "Multiply 3 by 26 + 24 = 50", False),
        ([26, 24], 50, "Divide 26 + 24 = 50 by 2", False),
        ([26, 24], 50, "26 + 24 = 50 thousand", False),
        ([26, 24], 50, "26 + 24 = 50\n26 \u2212 24", False),  # a later equation in Unicode signs
        ([26, 24], 50, "26 + 24 = 50\n26 \u2013 24", False),
        ([26, 24], 50, "26 + 24 = 50\nFinal: 2(25)", False),
        ([26, 24], 50, "26 + 24 = 50. Final equation: 26 minus 24 plus 48", False),
        ([26, 24], 50, "26 + 24 = 50. Final answer:\n\n48", False),
        ([26, 24], 50, "26 + 24 = 50. **Final Answer**\n48", False),
        ([26, 24], 50, "26 + 24 = 50. Answer -> 48", False),
        ([26, 24], 50, "26 + 24 = 50. Answer: [48]", False),
        ([26, 24], 50, "26 + 24 = 50. The answer is 50 minus 2", False),
        ([26, 24], 50, "26 + 24 = 50. That would equal 48.", False),
        ([26, 24], 50, "26 + 24 = 50\n<Answer>48</Answer>", False),
        ([26, 24], 50, "26 + 24 = 50\n\\boxed{\\text{48}}", False),
        ([26, 24], 50, "26 + 24 adds up to 48", False),
        ([26, 24], 50, "26 + 24 evaluates to 48", False),
        ([26, 24], 50, "26 + 24 is\n48", False),
        ([26, 24], 50, "26 + 24 = 50, minus 2 is 48.", False),
        ([26, 24], 50, "26 + 24 = 50. The answer is 24.", False),  # a given number, but after a cue
        ([26, 24], 50, "26 + 24 = 50 is wrong", False),
        ([26, 24], 50, "26 + 24 = 50. I used 26 and 24 to make 50.", True),
        # a third review: a later answer after a cue, anywhere in an answer sentence
        ([5, 23], 28, "5 + 23 = 28. The answer is therefore 23.", False),
        ([5, 23], 28, "5 + 23 = 28. The answer is obviously 23.", False),
        ([5, 23], 28, "5 + 23 = 28. The answer here is 23.", False),
        ([5, 23], 28, "5 + 23 = 28. The answer is `23`.", False),
        ([5, 23], 28, "5 + 23 = 28. The answer is (23).", False),
        ([5, 23], 28, "5 + 23 = 28. The answer is [23].", False),
        ([5, 23], 28, "5 + 23 = 28. The answer is \u201c23\u201d.", False),
        ([5, 23], 28, "5 + 23 = 28. The answer is $23$.", False),
        ([5, 23], 28, "5 + 23 = 28. Hmm, I think it's 23.", False),
        ([5, 23], 28, "5 + 23 = 28.\n\n#### 23", False),  # GSM8K's answer marker
        ([5, 23], 28, "5 + 23 = 28. Actually, the correct equation is 23", False),  # cut off
        ([5, 23], 28, "5 + 23 = 28. Hmm, wait, the final equation should be 23", False),
        ([5, 23], 28, "5 + 23 = 28\n\nHowever, a better equation is 23", False),
        ([5, 23], 28, "5 + 23 = 28. The answer is therefore eighteen.", False),
        ([5, 23], 28, "5 + 23 = 28. The answer is 28, or 23.", False),
        ([5, 23], 28, "5 + 23 = 28.\n\n#### 28", True),
        ([5, 23], 28, "5 + 23 = 28. The answer is therefore 28.", True),
        ([5, 23], 28, "5 + 23 = 28. The answer is 28.\nI used 5 and 23.", True),
        # ... or before its cue, as the subject of "is the answer", or after "final"
        ([26, 24], 50, "26 + 24 = 50. Actually 24 is the final answer.", False),
        ([26, 24], 50, "26 + 24 = 50, and 26 would then be the answer", False),
        ([26, 24], 50, "26 + 24 = 50. **24** is *the* result.", False),
        ([26, 24], 50, "26 + 24 = 50. 24 is *the* **final** answer.", False),  # emphasis is no word
        ([26, 24], 50, "26 + 24 = 50. Option24 is the answer.", False),
        ([26, 24], 50, "26 + 24 = 50. \u201c24\u201d is definitely the answer.", False),
        ([26, 24], 50, "26 + 24 = 50. The sum (26 + 24) is the answer.", True),
        ([26, 24], 50, "26 + 24 = 50. 24" + " " * 300 + "is the answer.", False),
        ([26, 24], 50, "26 + 24 = 50. Final: 24", False),
        ([26, 24], 50, "26 + 24 = 50. 50 is the final answer.", True),
        ([26, 24], 50, "26 + 24 = 50. Using 26 and 24, the answer is 50.", True),
        ([26, 24], 50, "26 + 24 = 50. 24 is the second number; the answer is 50.", True),
        ([26, 24], 50, "26 + 24 = 50\nFinal: 50", True),
        # ... a number word that states another result
        ([5, 23], 28, "5 + 23 = 28, which is thirty-two.", False),
        ([5, 23], 28, "5 + 23 = 28 (eighteen)", False),
        ([5, 23], 28, "5 + 23 = 28, or eighteen.", False),
        ([5, 23], 28, "5 + 23 = 28, which is five.", False),
        ([5, 23], 28, "5 + 23 = 28. Oops, I meant 23 take away 5, which is eighteen.", False),
        ([5, 23], 28, "5 + 23 = 28. Oops, I meant 23 take away 5", False),
        ([5, 23], 28, "5 + 23 = 28, which is twenty-eight.", True),
        ([5, 23], 28, "5 + 23 = 28, using these two numbers. No other combination works.", False),  # 'no'
        ([5, 23], 28, "5 + 23 = 28, using these two numbers in one equation.", True),
        # ... decimals, LaTeX and symbols or words of other operations
        ([5, 23], 28, "5 + 23 = 28. The answer is 28.5", False),
        ([5, 23], 28, "5 + 23 = 28\n\\boxed{28.5}", False),
        ([5, 23], 28, "5 + 23 = 28\n\\boxed{\\frac{23}{5}}", False),
        ([5, 23], 28, "5 + 23 = 28. Final answer: $\\frac{23}{5}$", False),
        ([5, 23], 28, "5 + 23 = 28\n\nFinal answer: \\( \\dfrac{23}{5} \\)", False),
        ([5, 23], 28, "5 + 23 = 28\nSo \\boxed{{28}}", False),
        ([5, 23], 28, "5 + 23 = 28. So I'll go with 23 \u00b7 5", False),
        ([5, 23], 28, "5 + 23 = 28. So I'll go with 23 \u2715 5", False),
        ([5, 23], 28, "5 + 23 = 28. So I'll go with 23 \u2796 5", False),
        ([5, 23], 28, "5 + 23 = 28. Final answer: the difference of 23 and 5.", False),
        ([5, 23], 28, "5 + 23 = 28. Final answer: the product of 23 and 5.", False),
        ([5, 23], 28, "5 + 23 = 28. The answer is 28 to the power of 5.", False),
        ([26, 24], 50, "26 + 24 = 50 in binary", False),  # another base
        ([26, 24], 50, "26 + 24 = 50 (hex)", False),
        ([26, 24], 50, "In octal 26 + 24 = 50", False),
        ([26, 24], 50, "This binary puzzle took a while.\nSo 26 + 24 = 50", True),
        ([18, 25], 43, "18 + 25 = 43 (addition with two respective factors of 43)", True),
        # ... marks that negate or strike out what they touch, struck-through markup
        ([5, 23], 28, "5 + 23 =\u0338 28", False),  # shows as 5 + 23 \u2260 28
        ([5, 23], 28, "5\u0336 \u0336+\u0336 \u033623\u0336 \u0336=\u0336 \u033628\u0336", False),
        ([5, 23], 28, "5 + 23 = 28\u0335", False),
        ([5, 23], 28, "The answer is <del>5 + 23 = 28</del>", False),
        ([5, 23], 28, "<s>5 + 23 = 28</s>", False),
        ([5, 23], 28, "<strike>The answer is 5 + 23 = 28.</strike>", False),
        ([5, 23], 28, "5 + 23 = 28 <del>5 - 23 = 18</del>", True),  # struck text is not read
        ([5, 23], 28, "5 + 23 = 28\n5\u0336-\u0336", True),
        # ... any other overlay mark (Unicode's combining class 1) makes what it covers unreadable
        ([26, 24], 50, "26 + 24 =\u20eb 50", False),  # a double solidus: shows as \u2260
        ([26, 24], 50, "26 + 24 =\u20d2 50", False),  # a vertical line
        ([26, 24], 50, "26 + 24 =\u0334 50", False),  # a tilde
        ([26, 24], 50, "26 + 24 = 5\U0001d1670", False),
        ([26, 24], 50, "x\u20d2 is fine.\n26 + 24 = 50", True),
        # ... superscript and subscript markup: raised or lowered text is another operation
        ([26, 24], 50, "26<sup>+24</sup> = 50", False),
        ([26, 24], 50, "26 + 24 = 50<SUB>10</SUB>", False),
        ([26, 24], 50, "x<sup>2</sup> is another puzzle.\n26 + 24 = 50", True),
        # ... denials: cross marks, a label before it, more words after it
        ([5, 23], 28, "5 + 23 = 28 \u274c", False),
        ([5, 23], 28, "5 + 23 = 28 \u2717", False),
        ([5, 23], 28, "\u274c 5 + 23 = 28", False),
        ([5, 23], 28, "5 + 23 = 28 (using both) \u2718", False),
        ([5, 23], 28, "Wrong: 5 + 23 = 28", False),
        ([5, 23], 28, "This is false: 5 + 23 = 28", False),
        ([5, 23], 28, "Incorrect answer: 5 + 23 = 28", False),
        ([5, 23], 28, "5 + 23 = 28. Oops, I miscalculated.", False),
        ([5, 23], 28, "5 + 23 = 28 is inaccurate.", False),
        ([5, 23], 28, "5 + 23 = 28 is a typo.", False),
        ([5, 23], 28, "5 + 23 = 28. Scratch that.", False),
        ([5, 23], 28, "5 + 23 = 28. Please disregard that.", False),
        ([5, 23], 28, "5 + 23 = 28 \u2705", True),
        ([5, 23], 28, "Correct answer: 5 + 23 = 28", True),
        # ... a question or a supposition
        ([5, 23], 28, "5 + 23 = 28?", False),
        ([5, 23], 28, "Is 5 + 23 = 28?", False),
        ([5, 23], 28, "Could it be 5 + 23 = 28? I doubt it.", False),
        ([5, 23], 28, "If 5 + 23 = 28, then what?", False),
        ([5, 23], 28, "Suppose 5 + 23 = 28.", False),
        ([28, 12], 40, 'I saw a sign that read "28 + 12 = 40" and I thought, "What does it mean?"', True),
        # operators outside the task's + and -
        ([3, 4], 12, "3 * 4 = 12", False),
        ([3, 4], 12, "3 * 4", False),
        # the numbers, each exactly once
        ([3, 4], 7, "3 + 4 + 0 = 7", False),
        ([3, 4], 7, "3 + 3 + 1 = 7", False),
        ([3, 3], 6, "3 + 3 = 6", True),
        # a retry after a reflection names its operator and its mistake: fine; denials in other
        # languages and a decimal comma in a later answer are not
        ([5, 23], 28, "Switching to + gives 5 + 23 = 28", True),
        ([5, 23], 28, "Using + instead of \u2212 gives 5 + 23 = 28", True),
        ([5, 23], 28, "Fixing the mistake gives 5 + 23 = 28", True),
        ([5, 23], 28, "Correcting that error yields 5 + 23 = 28", True),
        ([5, 23], 28, "- So 5 + 23 = 28", True),  # a bullet
        ([5, 23], 28, "5 + 23 = 28 ist falsche", False),
        # a bare expression with a negation earlier in its clause is denied (a main run paid the first)
        ([3, 11], 14, "However, the math doesn't factor into a simple sum of 3 + 11. It's actually a result", False),
        ([3, 11], 14, "It never really comes down to the sum 3 + 11.", False),
        ([3, 11], 14, "I didn't get it at first, but the answer is 3 + 11.", True),
        ([3, 11], 14, "No doubt about it: 3 + 11.", True),
        ([3, 11], 14, "It isn't hard to see the sum 3 + 11 = 14", True),  # a stated result: the four-word rule
        ([12, 4], 16, "You don't have to write it out, but you can just add it: (12 + 4) = 16.", True),
        # ... unless the clause goes on to state it (a retry after a reflection writes these)
        ([3, 11], 14, "My previous answer was wrong because I subtracted so the correct answer is 3 + 11.", True),
        ([3, 11], 14, "The mistake was that 11 - 3 is not 14 and the correct answer is 3 + 11.", True),
        ([3, 11], 14, "I shouldn't have subtracted and the right equation is 3 + 11.", True),
        ([3, 11], 14, "Using each number once with no other operation the equation is 3 + 11.", True),
        ([3, 11], 14, "That's not right \u2014 the answer is 3 + 11.", True),
        ([3, 11], 14, "The correct expression (not 11 - 3) is 3 + 11.", True),
        ([5, 23], 28, "5 + 23 = 28 est fausse", False),
        ([5, 23], 28, "5 + 23 = 28 (falsch)", False),
        ([5, 23], 28, "5 + 23 = 28. Das ist nicht richtig.", False),
        ([5, 23], 28, "5 + 23 = 28, c'est faux.", False),
        ([5, 23], 28, "5 + 23 = 28 \u00e8 sbagliato", False),
        ([5, 23], 28, "5 + 23 = 28. The answer is 28,5", False),
        ([5, 23], 28, "5 + 23 = 28. The answer: 28,5.", False),
        ([5, 23], 28, "5 + 23 = 28. The answer is 28,\n5 and 23 are used.", True),
        ([5, 23], 28, "5 + 23 = 28 (I used 5,23 once each)", True),
        # a leading reasoning block: only what follows its first </think> is read; never closed, no answer
        ([5, 23], 28, "<think>\n5 * 23 = 115, too big. 5 + 23 = 28.\n</think>\n\n5 + 23 = 28", True),
        ([5, 23], 28, "<think>\n5 + 23 = 28\n</think>\n\nI cannot find one.", False),
        ([5, 23], 28, "<think>\nTry 5 + 23 = 28", False),
        ([5, 23], 28, "<think>\n5 + 23 = 28</think>The answer is 28.", False),
        ([5, 23], 28, "<think>Not 5 * 23.</think> 5 + 23 = 28", True),
    ],
)
def test_countdown_final_equation_rule(nums, target, completion, expected):
    ex = {"nums": nums, "target": target}
    assert LENIENT.verify(ex, completion) is expected, LENIENT.diagnose(ex, completion)
    assert recheck(LENIENT, ex, completion)[0] is expected  # the independent implementation agrees


def test_countdown_tags_off_has_no_tag_special_cases():
    """Without tags, ``<answer>`` blocks are ordinary text: the final equation counts."""
    ex = {"nums": [4, 3], "target": 7}
    assert LENIENT.verify(ex, "<answer> 4 - 3 </answer> and 4 + 3")
    assert not LENIENT.verify(ex, "<answer> 4 + 3 </answer> and 4 - 3")
    assert LENIENT.verify(ex, "<answer>4 + 3</answer>")
    strict = CountdownTask(difficulty="easy")
    assert not strict.verify(ex, "so 4 + 3 = 7.") and strict.verify(ex, "<answer>4 + 3</answer>")


def _model_outputs():
    from pathlib import Path

    path = Path(__file__).parent / "data" / "countdown_model_outputs.jsonl"
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def test_countdown_real_model_outputs():
    """Attempts and retries the built-in model wrote on the default run's task (two numbers, + and
    -, no tags), each verdict read and labelled by hand; 14 of them were rewarded by the old
    reader and are wrong, and 23 disown their final equation in the text after it."""
    records = _model_outputs()
    assert len(records) > 100 and sum(r["expected"] for r in records) > 20
    for r in records:
        ex = {"nums": r["nums"], "target": r["target"]}
        assert LENIENT.verify(ex, r["completion"]) is r["expected"], (r, LENIENT.diagnose(ex, r["completion"]))
        assert recheck(LENIENT, ex, r["completion"])[0] is r["expected"], r


def test_countdown_verifier_and_recheck_agree_on_edge_inputs(verifier_errors):
    """Cases where the two implementations once disagreed."""
    tags = CountdownTask(difficulty="standard")
    cases = [
        (tags, {"nums": [26, 24], "target": 50}, "<answer>26 +" + " " * 300 + "24</answer>", False),
        (LENIENT, {"nums": [26, 24], "target": 50}, "26 +" + " " * 300 + "24 = 50", False),
        (tags, {"nums": [26, 24], "target": 50}, "<answer>26 + 24" + "\n" * 5000 + "</answer>", False),
        (LENIENT, {"nums": [26.0, 24], "target": 50.0}, "26 + 24 = 50", True),
    ]
    for task, ex, text, expected in cases:
        assert task.verify(ex, text) is expected, (text[:40], task.diagnose(ex, text))
        assert recheck(task, ex, text)[0] is expected, text[:40]
    malformed = {"nums": ["26", "24"], "target": 50}
    assert LENIENT.verify(malformed, "26 + 24 = 50") is False
    assert verifier_errors == ["TypeError: expected an integer, got '26'"]
    verifier_errors.clear()
    assert LENIENT.diagnose(malformed, "26 + 24 = 50") == "verifier error: TypeError: expected an integer, got '26'"
    assert recheck(LENIENT, malformed, "26 + 24 = 50") == (False, "malformed example")


def test_a_bug_in_the_recheck_raises_and_is_not_a_malformed_example(monkeypatch):
    """Only the example's own fields make "malformed example": an error inside the re-check raises,
    so a table of texts expected wrong cannot pass on a crash of the independent implementation."""
    from r3.tasks import recheck as rc

    def broken(*a, **k):
        raise TypeError("a bug")

    monkeypatch.setattr(rc, "recheck_countdown", broken)
    with pytest.raises(TypeError, match="a bug"):
        recheck(LENIENT, {"nums": [26, 24], "target": 50}, "26 + 24 = 51")
    monkeypatch.setattr(rc, "recheck_function_calling", broken)
    fc = tasks.get("xlam", synthetic_size=10)
    ex = fc.examples("train", n=1)[0]
    with pytest.raises(TypeError, match="a bug"):
        recheck(fc, ex, "[]")
    for bad in ({**ex, "answers": "[1]"}, {**ex, "answers": "not json"}, {**ex, "tools": 3}, {"tools": "[]"},
                {**ex, "tools": '{"name": "x"}'}, {**ex, "answers": "[" * 100_000 + "]" * 100_000}):
        assert recheck(fc, bad, "[]") == (False, "malformed example")
    for nums in ({5: 1, 23: 1}, iter([5, 23]), "5 23"):
        assert recheck(LENIENT, {"nums": nums, "target": 28}, "5 + 23 = 28") == (False, "malformed example")


class _ReturnsText(Task):
    """A plug-in whose _check returns a bare string: truthy, but not a verdict."""

    name = "returns_text"

    def _check(self, example, completion_text):
        return "yes"


class _Raises(Task):
    name = "raises"

    def _check(self, example, completion_text):
        if completion_text == "fine":
            return False, "wrong"
        raise ValueError("bad field")


def test_a_verdict_must_be_a_bool_and_a_reason(capsys, verifier_errors):
    """A _check that returns anything but (bool, str) never pays a reward (a bare string read as
    True rewarded every completion); numpy's bool is a bool."""
    import numpy as np

    t = _ReturnsText()
    assert t.verify({}, "anything") is False
    assert t.diagnose({}, "anything").startswith("verifier error: TypeError: _ReturnsText._check must return (bool, str)")
    for out in (("yes", "r"), (1, "r"), (True,), None, [True, "ok", 3]):
        t._check = lambda ex, s, out=out: out
        assert t.verify({}, "x") is False
    t._check = lambda ex, s: (np.bool_(True), "correct")
    assert t.verify({}, "x") is True
    t._check = lambda ex, s: [False, "wrong"]
    assert t.verify({}, "x") is False and t.diagnose({}, "x") == "wrong"
    t._check = lambda ex, s: (True, "even length")  # a task's own reason for a pass is kept
    assert t.verify({}, "x") is True and t.diagnose({}, "x") == "even length"
    t._check = lambda ex, s: (True, "")
    assert t.diagnose({}, "x") == "correct"
    assert len(verifier_errors) == 6  # (made on purpose here)
    verifier_errors.clear()


def test_verifier_errors_are_counted_and_warned_once(capsys, verifier_errors):
    from r3.tasks.base import warn_verifier_errors

    from r3.tasks.base import passes

    t = _Raises()
    assert [passes(t, {}, str(i)) for i in range(3)] + [passes(t, {}, "fine")] == [False] * 4
    assert warn_verifier_errors(t, "in step 4") == 3
    err = capsys.readouterr().err
    assert err == ("warning: the task's verifier failed on 3 completions in step 4; they count as wrong "
                   "(first: ValueError: bad field)\n")
    assert warn_verifier_errors(t, "in step 5") == 0 and capsys.readouterr().err == ""  # reset
    assert t.diagnose({}, "x") == "verifier error: ValueError: bad field"
    assert warn_verifier_errors(object(), "anywhere") == 0  # a duck-typed task without the counter
    assert len(verifier_errors) == 3  # (made on purpose here)
    verifier_errors.clear()


def test_a_verifier_that_raises_on_every_completion_stops_the_run(verifier_errors):
    """Every verdict an error: nothing can be rewarded or measured, so it is an error, not a warning
    (a run and an evaluation went on at 0% with only a warning line)."""
    from r3.tasks.base import passes, warn_verifier_errors

    t = _Raises()
    for i in range(5):
        passes(t, {}, str(i))
    with pytest.raises(R3Error, match=r"failed on all 5 completions in step 2 \(first: ValueError: bad field\)"):
        warn_verifier_errors(t, "in step 2")
    assert warn_verifier_errors(t, "in step 3") == 0  # (counts reset)
    assert len(verifier_errors) == 5  # (made on purpose here)
    verifier_errors.clear()


class _VerifyReturnsTuple(Task):
    """A plug-in overriding verify() instead of _check, returning _check's tuple: always truthy."""
    name = "tuple"

    def _check(self, example, completion_text):
        return completion_text == "right", "why"

    def verify(self, example, completion_text):
        return self._check(example, completion_text)


class _VerifyOnly(Task):
    name = "verify-only"

    def verify(self, example, completion_text):
        return completion_text == "right"


def test_a_verify_override_must_return_a_bool(verifier_errors):
    """r3 reads every verdict through passes(): a verify() returning (False, reason) paid reward 1
    for wrong retries and the audit passed them. Now such a verdict is wrong and a verifier error
    (a run whose every verdict is one stops); numpy's bool and the integers 0 and 1 are verdicts."""
    import numpy as np

    from r3.tasks.base import passes, warn_verifier_errors

    t = _VerifyReturnsTuple()
    assert passes(t, {}, "right") is False and passes(t, {}, "wrong") is False
    with pytest.raises(R3Error, match=r"failed on all 2 completions in a test \(first: tuple: verify\(\) returned "
                                      r"tuple \(True, 'why'\), not a bool"):
        warn_verifier_errors(t, "in a test")
    t = _VerifyOnly()
    assert passes(t, {}, "right") is True and passes(t, {}, "wrong") is False
    assert t.diagnose({}, "right") == "correct" and t.diagnose({}, "x") == "wrong (the task gives no reason)"
    for verdict, ok in ((np.bool_(True), True), (1, True), (0, False), (np.int64(1), True)):
        t.verify = lambda ex, s, v=verdict: v
        assert passes(t, {}, "x") is ok
    for bad in (2, None, "yes", 1.0):
        t.verify = lambda ex, s, v=bad: v
        assert passes(t, {}, "x") is False
    assert warn_verifier_errors(t, "in a test") == 4  # (and not all failed: a warning)
    assert len(verifier_errors) == 6  # (made on purpose here)
    verifier_errors.clear()


class _DuckRaises:
    """A duck-typed plug-in (no Task): its own verify() raises on a text it cannot read."""
    name = "duck"

    def verify(self, example, completion_text):
        return int(completion_text) == example["sum"]


def test_a_plug_ins_own_verify_that_raises_counts_as_wrong(verifier_errors):
    """A verify() of a plug-in's own (a duck-typed task's) that raises is a wrong answer and a
    verifier error, as an exception of _check is (it was a traceback that ended the run at the
    first completion it could not read)."""
    from r3.tasks.base import judge, passes, warn_verifier_errors

    t = _DuckRaises()
    assert passes(t, {"sum": 3}, "3") is True and passes(t, {"sum": 3}, "three") is False
    assert judge(t, {"sum": 3}, "three") == (False, None)  # (no diagnose: no reason)
    assert warn_verifier_errors(t, "in a test") == 2  # (and not all failed: a warning)
    assert len(verifier_errors) == 2 and verifier_errors[0].startswith("ValueError: invalid literal")
    verifier_errors.clear()


@pytest.mark.parametrize("made, message", [
    (5, "examples('train') must return a list of dicts, got int"),
    ([{"a": 1}, "text"], "train example 2 is a str, not a dict"),
    ([{"x": {1, 2}}], "train example 1 cannot be written as JSON (Object of type set is not JSON serializable)"),
])
def test_a_plugins_examples_are_checked(made, message):
    """What a plug-in's examples() returns is checked where training, evaluation and r3.failures
    read it: one line, not a traceback (or a crash after the first step, when an example that
    is not JSON was logged)."""
    from r3.tasks import examples_of

    class Made(_Raises):
        def examples(self, split="train", n=None, seed=0):
            return made

    with pytest.raises(R3Error, match="^task 'raises': " + message.replace("(", r"\(").replace(")", r"\)")):
        examples_of(Made(), "train")
    assert examples_of(tasks.get("countdown-tiny"), "test", n=3) == tasks.get("countdown-tiny").examples("test", 3)


def test_plug_in_options_passed_on_with_kw_are_checked_and_recorded(monkeypatch):
    """A plug-in whose __init__ takes **kw and passes them to its base class accepts exactly the
    options of the classes the **kw reaches: a misspelt one is a one-line error (it was a TypeError
    traceback), and config() records every option in effect, also one kept under another
    attribute name (it was {}, so a failures file made with other options was accepted)."""
    from r3.tasks import get

    monkeypatch.syspath_prepend(str(Path(__file__).parent / "helpers"))
    with pytest.raises(R3Error, match=r"unknown option data_pth for task 'r3_test_tasks:KeywordsTask'; valid "
                                      r"options: data_path, size, fail_first, reflection_prompt, retry_prompt"):
        get("r3_test_tasks:KeywordsTask", data_pth="x.jsonl")
    t = get("r3_test_tasks:KeywordsTask", data_path="mine.jsonl", size="8")
    assert t.config() == {"data_path": "mine.jsonl", "size": 8, "fail_first": 0,
                          "reflection_prompt": t.reflection_prompt, "retry_prompt": t.retry_prompt}
    assert get("r3_test_tasks:KeywordsTask").config()["data_path"] == "default.jsonl"  # the default
    # options popped from **kw are accepted, recorded as given, and a misspelt one still fails
    t = get("r3_test_tasks:PopTask", source="file", size=4)
    assert t.source == "file" and t.config()["source"] == "file" and t.config()["size"] == 4
    with pytest.raises(R3Error, match="unknown option sauce for task 'r3_test_tasks:PopTask'"):
        get("r3_test_tasks:PopTask", sauce="file")



def test_the_readme_own_task_example_works(tmp_path, monkeypatch):
    """The README's custom-task example, run as a user would: a plug-in module on the path."""
    from r3.tasks import examples_of, get
    from r3.tasks.base import passes

    readme = (Path(__file__).parents[1] / "README.md").read_text()
    code = readme.split("<!-- example:own-task -->", 1)[1].split("```python\n", 1)[1].split("```", 1)[0]
    (tmp_path / "mymodule.py").write_text(code)
    monkeypatch.syspath_prepend(str(tmp_path))
    task = get("mymodule:AddTask", max_num="9")
    train, test = examples_of(task, "train", n=50), examples_of(task, "test", n=50)
    assert all(0 <= ex["a"] <= 9 for ex in train) and train != test
    ex = {"a": 2, "b": 3}
    assert passes(task, ex, "Let me add.\n5") and passes(task, ex, "2 + 3 =\n5.")
    assert not passes(task, ex, "5\nor maybe 6") and not passes(task, ex, "6")
    assert task.diagnose(ex, "6") == "6, expected 5" and task.diagnose(ex, "") == "no number on the last line"
    with pytest.raises(R3Error, match="unknown option max_nun"):
        get("mymodule:AddTask", max_nun=5)
    with pytest.raises(R3Error, match="option max_num: expected an integer, got 'abc'"):
        get("mymodule:AddTask", max_num="abc")
    data = tmp_path / "add.jsonl"
    data.write_text('{"a": 1, "b": 1}\n{"a": 1, "b": }\n')
    monkeypatch.chdir(tmp_path)
    with pytest.raises(R3Error, match=r"add.jsonl, line 2"):
        examples_of(get("mymodule:AddTask", data_path="add.jsonl"), "train")
    # a line that parses but is not an example: named with its file, before any model loads (the
    # README's examples() does not check its rows; examples_of runs check_example on each)
    data.write_text('{"a": 1, "b": 1}\n{"a": 1, "b": "x"}\n')
    with pytest.raises(R3Error, match=r"^task 'add' \(add.jsonl\): train example 2: an example needs integers"):
        examples_of(get("mymodule:AddTask", data_path="add.jsonl"), "train")
    with pytest.raises(R3Error, match="an example needs integers 'a' and 'b'"):
        task.check_example("failures.jsonl, record 1", {"a": "1"})
    # a data file is split: no row is both a training and a test query (held-out evaluation and
    # r3.train --failures, which leaves test queries out, rely on it)
    data.write_text("".join(f'{{"a": {i}, "b": {i % 7}}}\n' for i in range(200)))
    file_task = get("mymodule:AddTask", data_path="add.jsonl")
    train, test = examples_of(file_task, "train"), examples_of(file_task, "test")
    assert len(train) + len(test) == 200 and 5 <= len(test) <= 40
    assert not {repr(r) for r in train} & {repr(r) for r in test}
    # ... by the question, not the row: the same question under another id is on one side only
    # (hashing the whole row put 42 of 44 test rows' questions in training), generated ones too
    data.write_text("".join(f'{{"id": {i}, "a": {i % 100}, "b": {i % 100 // 10}}}\n' for i in range(400)))
    question = lambda r: (r["a"], r["b"])  # noqa: E731
    for t in (get("mymodule:AddTask", data_path="add.jsonl"), task):
        train, test = examples_of(t, "train", seed=1), examples_of(t, "test", seed=2)
        assert test and not {question(r) for r in train} & {question(r) for r in test}
    assert len(examples_of(task, "train")) + len(examples_of(task, "test")) == 100
    assert task.config() == {"data_path": None, "max_num": 9, "reflection_prompt": task.reflection_prompt,
                             "retry_prompt": "Try again. End with the sum alone on the last line."}


@pytest.mark.parametrize("text,tags,reason", [
    # operator symbols glued beside the final equation (the equation would read as another claim)
    ("5 + 23 = 28 · two", False, "a math symbol the task does not allow next to the equation ('·')"),
    ("✕ 5 + 23 = 28", False, "a math symbol the task does not allow next to the equation ('✕')"),
    ("y ➕ 5 + 23 = 28", False, "a math symbol the task does not allow next to the equation ('➕')"),
    # an exact result: 7 / 2 is 7/2, never 3
    ("<answer>7 / 2</answer>", True, "evaluates to 7/2, not 3"),
    ("<answer>5 - 5 = -0</answer>", True, "number with a leading zero or sign: -0"),
    ("x" * 100_001 + " <answer>5 + 23</answer>", True, "completion longer than 100000 characters"),
])
def test_countdown_refuses_wrong_or_malformed_answers_found_by_mutation(text, tags, reason):
    """Texts that a weakened rule paid (a mutation run): refused by the verifier, with its reason,
    and by the independent re-check."""
    from r3.tasks.countdown import check_completion
    from r3.tasks.recheck import recheck_countdown

    nums, target = ([7, 2], 3) if "7 / 2" in text else ([5, 5], 0) if "5 - 5" in text else ([5, 23], 28)
    assert check_completion(text, nums, target, tags=tags) == (False, reason)
    assert not recheck_countdown(text, nums, target, tags=tags)[0]
    # (the rule still pays the right answers written plainly)
    assert check_completion("5 + 23 = 28", [5, 23], 28, tags=False) == (True, "correct")
    assert check_completion("<answer>5 - 5 = 0</answer>", [5, 5], 0) == (True, "correct")


def test_final_equation_refuses_a_denied_equation_on_its_own():
    from r3.tasks.countdown_verify import final_equation

    assert final_equation("5 + 23 would then be the value not 28") == (
        None, "the equation is denied (a negation before its result)")
    assert final_equation("so 5 + 23 = 28")[0] == "5 + 23 = 28"


# A later mutation run (newer rules: denials in other languages, later answers, decimals, struck and
# overlaid text, <sup>/<sub>, number words, a negation earlier in a bare expression's clause):
# each verdict below flipped under one weakened rule, and the independent re-check agrees.
@pytest.mark.parametrize(
    "tags,nums,target,completion,expected",
    [
        # a denial after it, in each language the rule names (not only the first words tested above)
        (False, [5, 23], 28, "5 + 23 = 28. Det blev fel.", False),  # Swedish
        (False, [5, 23], 28, "5 + 23 = 28. Det er feil.", False),  # Norwegian
        (False, [5, 23], 28, "5 + 23 = 28. Dat is fout.", False),  # Dutch
        (False, [5, 23], 28, "5 + 23 = 28. Dat klopt niet.", False),
        (False, [5, 23], 28, "5 + 23 = 28. Isso est\u00e1 errado.", False),  # Portuguese
        (False, [5, 23], 28, "5 + 23 = 28. Ce n'est pas correct.", False),  # French
        (False, [5, 23], 28, "5 + 23 = 28. Eso es incorrecto.", False),  # Spanish
        (False, [5, 23], 28, "5 + 23 = 28. \u00c8 sbagliato.", False),  # Italian
        # a denial among the four words before a colon, the third of them; "not" as a label
        (False, [5, 23], 28, "Incorrect final answer: 5 + 23 = 28", False),
        (False, [5, 23], 28, "This is not correct: 5 + 23 = 28", False),
        # four words before it, past quotes standing alone (they are no words)
        (False, [26, 24], 50, '3 times " the sum of " 26 + 24 = 50', False),
        (False, [5, 23], 28, "Assuming 5 + 23 = 28, the rest follows.", False),  # a supposition
        # operator words of another base and of an average
        (False, [26, 24], 50, "26 + 24 = 50 (base 26)", False),
        (False, [26, 24], 50, "The average of 26 + 24 = 50", False),
        # struck-through markup nested in another: struck up to its own closing tag
        (False, [5, 23], 28, "<del>I wrote <s>5 - 23</s> and then 5 + 23 = 28</del>", False),
        # a character under a stroke and another overlay mark is overlaid, not just struck
        (False, [5, 23], 28, "5 + 23 = 28 \u2713\u0336\u0338", False),
        # raised or lowered text in any case of the tag: another operation (e^(5 + 23), n_28)
        (False, [5, 23], 28, "e<SUP>5 + 23</SUP> = 28", False),
        (False, [5, 23], 28, "n<sub>5 + 23</sub> = 28", False),
        # number words that state another result: after "(", "or", "that is"; ten is 10 or more
        (False, [5, 23], 28, "5 + 23 = 28, (five)", False),
        (False, [5, 23], 28, "5 + 23 = 28, or five.", False),
        (False, [5, 23], 28, "5 + 23 = 28, that is five.", False),
        (False, [5, 23], 28, "5 + 23 = 28. I count ten.", False),
        (False, [5, 24], 29, "5 + 24 = 29, which is twenty-nine.", True),  # a tens word joined to 'nine'
        (False, [5, 23], 28, "5 + 23 = 28, which is twenty\u2011eight.", True),  # ... by a non-breaking hyphen
        # later answers: "result" as a sentence cue, a subject before its cue, "(" after a cue
        (False, [5, 23], 28, "5 + 23 = 28. The result is therefore 23.", False),
        (False, [26, 24], 50, "26 + 24 = 50. 24 is definitely the final answer.", False),  # three words between
        (False, [26, 24], 50, "26 + 24 = 50. 24 remains the answer.", False),
        (False, [5, 23], 28, "5 + 23 = 28, which equals (23).", False),
        (False, [5, 23], 28, "5 + 23 = 28. The answer is 28! 23 and 5 are used.", True),  # '!' ends the sentence
        # decimals: anywhere after it, and a decimal comma anywhere in an answer's sentence
        (False, [5, 23], 28, "5 + 23 = 28 or 28.5", False),
        (False, [2, 3], 5, "2 + 3 = 5. The answer is therefore 5,5", False),
        # a negation earlier in a bare expression's clause: ended by "but", a comma, "correct"
        (False, [3, 11], 14, "It isn't 11 - 3 but 3 + 11.", True),
        (False, [3, 11], 14, "No, it's 3 + 11.", True),
        (False, [3, 11], 14, "No subtraction needed for the correct sum 3 + 11.", True),
        # a later answer tag in fullwidth brackets; a cross mark; a '!' glued before it
        (True, [1, 2, 3], 6, "<answer>1 * 2 * 3</answer> Done. \uff1canswer\uff1e ok", False),
        (False, [5, 23], 28, "5 + 23 = 28 \u274e", False),
        (False, [5, 23], 28, "3!5 + 23 = 28", False),
        # more arithmetic on the result, a few words away; the line before ending in '='
        (False, [26, 24], 50, "26 + 24 = 50. Then double the final result.", False),
        (False, [5, 23], 28, "5 * 23 =\n5 + 23 = 28", False),
        (False, [5, 23], 28, "5 + 23 = 28. Better: the difference of 23 and 5.", False),
        # re-check rules that only these rows hold (each fails a mutant of r3/tasks/recheck.py)
        (False, [26, 24], 50, "26 + 24 = 50 squared is too big.", False),  # an operator word after it
        (True, [26, 24], 50, "squared <answer>26 + 24</answer>", False),  # ... and before the block
        (False, [26, 24], 50, "26 + 24 = 50. Oops, I made a mistake.", False),  # a later "mistake"
        (False, [26, 24], 50, "26 + 24 = 50. So \\boxed{24}", False),  # \boxed{} is an answer
        (True, [26, 24], 50, "<answer>26 + 24</answer>. \\boxed{24}", False),
        (False, [26, 24], 50, "26 + 24 is 50ish.", False),  # letters glued to the stated result
        (True, [26, 24], 50, "<answer>26 + 24</answer> and then *", False),  # ends in a bare "*"
        (False, [26, 24], 50, "26 + 24 = 50, then *", False),
        # round 10 of mutation: rules that a weakened verifier broke with every test still passing
        # an exact value: one that rounds or truncates to the target is not it (5/2, 7/3)
        (True, [5, 2], 2, "<answer>5 / 2</answer>", False),
        (False, [7, 3], 2, "7 / 3 = 2", False),
        # an operator the task does not allow, inside the expression, not only at its top
        (False, [3, 4, 5], 7, "3 * 4 - 5 = 7", False),
        # a number sign that is no ASCII digit next to it: a vulgar fraction (half of 26)
        (False, [26, 24], 50, "\u00bd26 + 24 = 50", False),
        (True, [26, 24], 50, "\u00bd <answer>26 + 24</answer>", False),
        # a combining mark inside a denial is read through, as a zero-width space is
        (False, [5, 23], 28, "5 + 23 = 28. That is n\u0301ot right.", False),
        # the line before ends in '-' or '/' (neither is a Unicode math symbol)
        (False, [26, 24], 50, "100 -\n26 + 24 = 50", False),
        (False, [26, 24], 50, "100 /\n26 + 24 = 50", False),
        # a denial label in Markdown emphasis before its colon's equation
        (False, [5, 23], 28, "_Wrong:_ 5 + 23 = 28", False),
        # a number then a sign after it is more arithmetic, as a sign then a number is
        (False, [26, 24], 50, "26 + 24 = 50. Then 50 \u00f7 two.", False),
        # without tags an <answer> tag still reads as the word: a later answer that is not the target
        (False, [5, 23], 28, "5 + 23 = 28. <answer>23</answer>", False),
        # a later answer tag spelled 'answer>' after another opening sign
        (True, [1, 2, 3], 6, "<answer>1 * 2 * 3</answer> or \u2039answer>six\u2039/answer>.", False),
        # 'for' right after a number before it, as 'of', 'by', 'to', 'from'
        (False, [5, 23], 28, "Take 3 for 5 + 23 = 28", False),
        # the text ends in an operator word that is no verb of arithmetic: an unfinished operation
        (False, [5, 23], 28, "5 + 23 = 28. Then take it modulo", False),
        # a dash before it, spaced, with no word before it: a minus sign (-5 + 23 is 18, not 28)
        (False, [5, 23], 28, "Answer: \u2013 5 + 23 = 28", False),
        (False, [5, 23], 28, "\u2013 5 + 23 = 28", False),
        # a completion of exactly the length bound is read (one more is not: a row above)
        (False, [3, 4], 7, "x" * (100_000 - 6) + " 4 + 3", True),
        # and what stays right: a question before it, a given number written as words after it
        (False, [5, 23], 28, "Which sum gives 28? 5 + 23 = 28", True),
        (False, [5, 23], 28, "5 + 23 = 28, using twenty-three and five.", True),
        # round 12 of mutation (r3/tasks/recheck.py): a later "</think>" is text, not a second
        # reasoning block: a wrong equation between the two is read (and refused)
        (True, [1, 2, 3], 6, "<think>x</think> 1 + 2 + 4 = 6 </think> <answer>1 * 2 * 3</answer>", False),
        # a closing tag with no opening tag before it is no answer block, whatever follows it
        (True, [1, 2, 3], 6, "1 * 2 * 3</answer>\n\n", False),
        # two opening tags: the block is what follows the last one
        (True, [1, 2, 3], 6, "<answer><answer>1 * 2 * 3</answer>", True),
        # a lone Markdown bold marker is no emphasis to strip: "**26" is a power
        (False, [26, 24], 50, "**26 + 24 = 50", False),
        # a later number with a leading zero is no given number (nor the target), whatever its value
        (False, [5, 23], 28, "5 + 23 = 28. Check: 028.", False),
        # the written result is compared with its sign (a fuzz test alone caught an absolute value)
        (False, [26, 24], 2, "26 - 24 = -2", False),
        (True, [26, 24], 2, "<answer>26 - 24 = -2</answer>", False),
    ],
)
def test_countdown_newer_rules_found_by_mutation(tags, nums, target, completion, expected):
    task = CD if tags else LENIENT
    ex = {"nums": nums, "target": target}
    assert task.verify(ex, completion) is expected, task.diagnose(ex, completion)
    assert recheck(task, ex, completion)[0] is expected  # the independent implementation agrees


@pytest.mark.parametrize(
    "ops,nums,target,completion,expected",
    [
        # an operator outside the task's set, at the top level of the expression (+ and -) too
        ("*/", [1, 2, 3], 6, "<answer>1 + 2 + 3</answer>", False),
        ("*/", [2, 3, 4], 24, "<answer>2 * 3 * 4</answer>", True),
        ("+", [26, 24], 2, "<answer>26 - 24</answer>", False),
        ("+", [26, 24], 50, "<answer>26 + 24</answer>", True),
    ],
)
def test_countdown_operators_outside_the_tasks_set(ops, nums, target, completion, expected):
    task = CountdownTask(ops=ops)
    ex = {"nums": nums, "target": target}
    assert task.verify(ex, completion) is expected, task.diagnose(ex, completion)
    assert recheck(task, ex, completion)[0] is expected  # the independent implementation agrees


def test_countdown_presets_are_the_documented_ones():
    """The README's presets: standard is 3-4 numbers in 1..99, a target in 1..99 and all four
    operations; easy is 3 numbers in 1..20, a target in 1..50, + and - (a mutation run widened them
    unnoticed: every other test reads the bounds back from the task itself)."""
    std, easy = CountdownTask(), CountdownTask(difficulty="easy")
    assert (std.min_count, std.max_count, std.min_num, std.max_num, std.min_target, std.max_target, std.ops) \
        == (3, 4, 1, 99, 1, 99, "+-*/")
    assert (easy.min_count, easy.max_count, easy.min_num, easy.max_num, easy.min_target, easy.max_target,
            easy.ops) == (3, 3, 1, 20, 1, 50, "+-")
    assert all(3 <= len(e["nums"]) <= 4 and 1 <= e["target"] <= 99 for e in std.examples("train", n=50))


@pytest.mark.parametrize("options,ops_words,tags", [
    ({}, "+, -, * and /", True),
    ({"difficulty": "easy"}, "+ and -", True),
    ({"ops": "*/"}, "* and /", True),
    ({"difficulty": "easy", "answer_tags": False}, "+ and -", False),
])
def test_countdown_prompts_state_the_tasks_operators_and_answer_format(options, ops_words, tags):
    """The prompt names exactly the task's operations, its worked example uses only them and is
    itself a correct answer, and the answer format (tags or not) is the one the verifier reads, in
    the retry prompt too."""
    t = CountdownTask(**options)
    text = t.prompt({"nums": [19, 36, 55, 7], "target": 65})
    assert f"operations {ops_words}, and each number" in text
    example = text.split("For example,", 1)[1]
    assert set(example.replace("</answer>", "")) & set("+-*/") <= set(t.ops), example
    target = int(re.search(r"the target (\d+)", example).group(1))
    assert t.verify({"nums": [1, 2, 3], "target": target}, text), example  # the example is right
    assert ("<answer>" in text) is tags and ("<answer>" in t.retry_prompt) is tags


def test_countdown_file_split_keeps_a_problem_on_one_side(tmp_path):
    """A loaded file is split by the sorted numbers and the target: the same problem written in
    another order never lands on both sides, and test_fraction is the test side's share."""
    rows = [{"target": a + b, "nums": nums} for a in range(1, 60) for b in (a + 1, a + 2)
            for nums in ([a, b], [b, a])]
    p = tmp_path / "cd.jsonl"
    p.write_text("\n".join(json.dumps(r) for r in rows))
    t = CountdownTask(data_path=str(p), test_fraction=0.25)
    key = lambda e: (tuple(sorted(e["nums"])), e["target"])  # noqa: E731
    train, test = {key(e) for e in t.examples("train")}, {key(e) for e in t.examples("test")}
    assert not train & test
    assert 0.1 < len(t.examples("test")) / len(rows) < 0.4


def test_countdown_solutions_are_exact_where_floats_round():
    """The generator's float pre-filter offers 1 + 7 / (997 * 998 * 999) ~ 1.000000007 as a way to
    reach 1 from these numbers, which no expression reaches exactly: a witness used unchecked would
    store an unsolvable problem with a "solution" that does not verify."""
    from r3.tasks.countdown import _candidate_targets, _solve_with

    nums = (1, 7, 997, 998, 999)
    found = _candidate_targets(nums, "+-*/", 1, 9)
    assert 1 in found and 1 not in reachable_targets(list(nums), lo=1, hi=9)  # (it is not reachable)
    for target, witness in found.items():
        solution = _solve_with(nums, target, "+-*/", witness)
        assert solution is None or check_answer(solution, list(nums), target)[0], (target, solution)


def test_generator_draws_over_the_whole_ranges():
    """Generated problems cover the options' ranges, not a corner of them: both counts of numbers,
    the smallest and largest number, and many targets (a generator that always took the smallest
    reachable target made nearly every problem "... equals 1", and every test above still passed)."""
    std = CountdownTask().examples("train", n=200)
    assert {len(e["nums"]) for e in std} == {3, 4}
    assert len({e["target"] for e in std}) > 50
    easy = [x for e in CountdownTask(difficulty="easy").examples("train", n=300) for x in e["nums"]]
    assert (min(easy), max(easy)) == (1, 20)


@pytest.mark.parametrize("completion,expected", [
    # a denial after it in each language the rule names, its common words, read without diacritics
    ("5 + 23 = 28. Nej, det \u00e4r inte r\u00e4tt.", False),  # Swedish
    ("5 + 23 = 28. Det \u00e4r galet.", False),
    ("5 + 23 = 28. Nei, det er ikke riktig.", False),  # Norwegian
    ("5 + 23 = 28. Det er forkert.", False),  # Danish
    ("5 + 23 = 28. Non \u00e8 corretto.", False),  # Italian
    ("5 + 23 = 28. N\u00e3o est\u00e1 certo.", False),  # Portuguese
    ("5 + 23 = 28. Nao esta certo.", False),
    ("5 + 23 = 28. C'est inexact.", False),  # French
    ("5 + 23 = 28. Das ist inkorrekt.", False),  # German
    ("5 + 23 = 28. Das ist verkehrt.", False),
    ("5 + 23 = 28. Dat is onjuist.", False),  # Dutch
    ("5 + 23 = 28. Dat is verkeerd.", False),
    ("5 + 23 = 28. Est\u00e1 mal.", False),  # Spanish
    ("5 + 23 = 28. Esto es err\u00f3neo.", False),
    ("5 + 23 = 28. C'est erron\u00e9.", False),
    ("5 + 23 = 28. Das ist ein Fehler.", False),
    ("5 + 23 = 28. Das ist ung\u00fcltig.", False),
    ("5 + 23 = 28. \u00c8 scorretto.", False),
    ("5 + 23 = 28. Houve um erro.", False),
    # ... and what agrees with it stays right, accents or not; "non-" is a prefix, not a denial
    ("5 + 23 = 28. Est\u00e1 correcto.", True),
    ("5 + 23 = 28, using only non-negative numbers.", True),
    ("5 + 23 = 28 (non-negative).", True),
    ("5 + 23 = 28. Non-integer results were avoided.", True),
    ("5 + 23 = 28. Nice, gal!", True),
    ("5 + 23 = 28 non", False),
    ("5 + 23 = 28. That is wrong\u00e9.", False),  # a denial a letter with diacritics is glued to
    ("5 + 23 = 28. Not\u00e4 correct.", False),
    # a later answer's cue read without its accents, in both implementations
    ("5 + 23 = 28. 5 \u00efs the answer.", False),
    ("5 + 23 = 28. 23 is the r\u00e9al answer.", False),
    ("5 + 23 = 28. Das ist richtig.", True),
    ("5 + 23 = 28, which is twenty-e\u00efght.", True),
    ("5 + 23 = 28, which is twenty-f\u00efve.", False),
    # a number word in a parenthesis that opens right after it states another result, as after ", ("
    ("5 + 23 = 28 (five)", False),
    ("5 + 23 = 28 (two numbers used)", False),  # (as "5 + 23 = 28. (two numbers used)" always was)
    ("5 + 23 = 28 (twenty-eight)", True),
    ("5 + 23 = 28 (using both)", True),
    ("(5 + 23 = 28)", True),
    ("**5 + 23 = 28** (five)", False),
])
def test_countdown_later_denials_in_other_languages_and_a_parenthesis_after_it(completion, expected):
    """Found by a mutation run: both implementations paid these denials (words missing from the
    list, and words with diacritics read as pieces: "Não" as "N", "ã", "o"), and "(five)" right
    after the equation (the run took the "(" in, so the word after it was not read as stated)."""
    ex = {"nums": [5, 23], "target": 28}
    assert LENIENT.verify(ex, completion) is expected, LENIENT.diagnose(ex, completion)
    assert recheck(LENIENT, ex, completion)[0] is expected


@pytest.mark.parametrize("completion,expected", [
    # a denial or a later answer written in compatibility forms of Latin letters after the equation
    ("5 + 23 = 28. \uff2e\uff4f.", False),  # full-width "No."
    ("5 + 23 = 28. That is \uff57\uff52\uff4f\uff4e\uff47.", False),
    ("5 + 23 = 28. \U0001d40d\U0001d428\U0001d42d correct.", False),  # mathematical bold "Not"
    ("5 + 23 = 28. It is \u24d8\u24dd\u24d2\u24de\u24e1\u24e1\u24d4\u24d2\u24e3.", False),  # circled
    ("5 + 23 = 28. \uff34\uff48\uff45\uff4e double it.", False),
    ("5 + 23 = 28. 23 \uff49\uff53 the answer.", False),
    # ... and what agrees with it stays right; "non-" before such a letter is still a prefix
    ("5 + 23 = 28. \uff34\uff48\uff41\uff54 \uff49\uff53 \uff52\uff49\uff47\uff48\uff54.", True),
    ("5 + 23 = 28, non-\u24dde\u24d6ative.", True),
    ("5 + 23 = 28, using only non\u2011negative numbers.", True),  # (Unicode hyphens: the verifier
    ("5 + 23 = 28. It is non\u2010zero.", True),  # read "non" glued to them as a denial)
    ("5 + 23 = 28. \U0001d5e6\U0001d5fc\U0001d5f9\U0001d5f9\U0001d5f2\U0001d5f1.", True),  # "Solved"
    # a Roman numeral is a number in another script, not a letter
    ("5 + 23 = 28. Step \u2170.", False),
])
def test_countdown_later_words_in_compatibility_letters(completion, expected):
    """Full-width, mathematical and circled letters after the equation read as their ASCII letters,
    as letters with diacritics do: both implementations paid "5 + 23 = 28. Ｎｏ." (the words were
    read as symbols, each on its own)."""
    ex = {"nums": [5, 23], "target": 28}
    assert LENIENT.verify(ex, completion) is expected, LENIENT.diagnose(ex, completion)
    assert recheck(LENIENT, ex, completion)[0] is expected


@pytest.mark.parametrize("completion,expected", [
    # "answer's" is "answer is": a later number in its sentence is an answer
    ("5 + 23 = 28. The answer's 23.", False),
    ("5 + 23 = 28. The result\u2019s 5.", False),
    ("5 + 23 = 28. The answer's 28.", True),
    ("5 + 23 = 28. The solution's both numbers, once each.", True),
    # TeX's $ around the number that is made the answer, as quotes and emphasis are
    ("5 + 23 = 28. $23$ is the final answer.", False),
    ("5 + 23 = 28. $28$ is the final answer.", True),
    ("$5 + 23 = 28$ is the final answer.", True),
])
def test_countdown_later_answer_after_answers_and_in_tex_dollars(completion, expected):
    """Both implementations paid a later answer after the contraction "answer's" and a number in
    TeX dollars made the answer before the word ("$23$ is the final answer")."""
    ex = {"nums": [5, 23], "target": 28}
    assert LENIENT.verify(ex, completion) is expected, LENIENT.diagnose(ex, completion)
    assert recheck(LENIENT, ex, completion)[0] is expected


def _both_implementations_say(tags: bool, completion: str, expected: bool) -> None:
    """The verifier's verdict and the independent re-check's, on 5 and 23 with target 28."""
    task = CD if tags else LENIENT
    ex = {"nums": [5, 23], "target": 28}
    assert task.verify(ex, completion) is expected, task.diagnose(ex, completion)
    assert recheck(task, ex, completion)[0] is expected


@pytest.mark.parametrize("tags,completion,expected", [
    # a denial or supposition in parentheses next to the answer: the final equation's run takes a
    # "(" or ")" in and reads past it, the word windows around an answer block and before a
    # colon stopped at it
    pytest.param(True, "(wrong) <answer>5 + 23 = 28</answer>", False, id="tags-wrong-in-parens-before"),
    pytest.param(True, "(not) <answer>5 + 23 = 28</answer>", False, id="tags-not-in-parens-before"),
    pytest.param(True, "Wrong) <answer>5 + 23 = 28</answer>", False, id="tags-wrong-paren-before"),
    pytest.param(True, "(If) <answer>5 + 23 = 28</answer>", False, id="tags-if-in-parens-before"),
    pytest.param(True, "If (hypothetically) <answer>5 + 23 = 28</answer>", False, id="tags-if-parenthetical"),
    pytest.param(True, "Answer (wrong): <answer>5 + 23 = 28</answer>", False, id="tags-label-wrong-in-parens"),
    pytest.param(True, "Old (incorrect) answer: <answer>5 + 23 = 28</answer>", False, id="tags-label-incorrect"),
    pytest.param(False, "(Wrong): 5 + 23 = 28", False, id="label-wrong-in-parens"),
    pytest.param(False, "Answer (wrong): 5 + 23 = 28", False, id="label-wrong-in-parens-after-word"),
    pytest.param(False, "Old (incorrect) answer: 5 + 23 = 28", False, id="label-incorrect-in-parens"),
    pytest.param(False, "The (false) answer: 5 + 23 = 28", False, id="label-false-in-parens"),
    pytest.param(False, "Answer (not correct): 5 + 23 = 28", False, id="label-not-correct-in-parens"),
    pytest.param(False, "If (hypothetically) 5 + 23 = 28", False, id="if-parenthetical"),
    # ... or a denial label that ends the line before it (the colon is still just before it)
    pytest.param(False, "Wrong:\n5 + 23 = 28", False, id="label-wrong-line-before"),
    pytest.param(False, "Incorrect equation:\n\n5 + 23 = 28", False, id="label-incorrect-blank-line-before"),
    pytest.param(False, "This is NOT the answer:\n5 + 23 = 28", False, id="label-not-line-before"),
    pytest.param(True, "Wrong:\n<answer>5 + 23 = 28</answer>", False, id="tags-label-wrong-line-before"),
    pytest.param(True, "**Wrong answer:**\n<answer>5 + 23 = 28</answer>", False, id="tags-label-bold-line-before"),
    pytest.param(False, "Here's the final answer to the equation: 3x + Incorrect:\n\\boxed{5 + 23 = 28}", False,
                 id="label-after-a-sentence-line-before"),
    # ... or written before the "answer" that <answer> and \\boxed{ read as (the final equation's
    # mode): "3 * <answer>...", "Wrong:" and an operator the line before end there too
    pytest.param(False, "3 * \\boxed{5 + 23 = 28}", False, id="times-boxed"),
    pytest.param(False, "2 - \\boxed{5 + 23 = 28}", False, id="minus-boxed"),
    pytest.param(False, "x + \\boxed{5 + 23}", False, id="variable-plus-boxed"),
    pytest.param(False, "2 ** \\boxed{5 + 23}", False, id="power-boxed"),
    pytest.param(False, "Wrong: \\boxed{5 + 23 = 28}", False, id="label-wrong-boxed"),
    pytest.param(False, "**Wrong:** \\boxed{5 + 23 = 28}", False, id="label-bold-wrong-boxed"),
    pytest.param(False, "3 *\n\\boxed{5 + 23}", False, id="operator-line-before-boxed"),
    pytest.param(False, "3 * <answer>5 + 23 = 28</answer>", False, id="times-answer-tag-plain-mode"),
    pytest.param(False, "Wrong: <answer>5 + 23 = 28</answer>", False, id="label-wrong-answer-tag-plain-mode"),
    # a retraction after it: "Scratch that." and its synonyms, and words that take it back
    pytest.param(False, "5 + 23 = 28. Forget that.", False, id="forget-that"),
    pytest.param(False, "5 + 23 = 28. Ignore that.", False, id="ignore-that"),
    pytest.param(False, "5 + 23 = 28. Strike that.", False, id="strike-that"),
    pytest.param(False, "5 + 23 = 28. Just kidding.", False, id="just-kidding"),
    pytest.param(False, "5 + 23 = 28 jk", False, id="jk"),
    pytest.param(False, "5 + 23 = 28. Nah.", False, id="nah"),
    pytest.param(False, "5 + 23 = 28. Nevermind.", False, id="nevermind"),
    pytest.param(False, "5 + 23 = 28. I take it back.", False, id="take-it-back"),
    pytest.param(False, "5 + 23 = 28. I retract that.", False, id="retract"),
    pytest.param(False, "5 + 23 = 28. My bad.", False, id="my-bad"),
    pytest.param(False, "5 + 23 = 28. Oops.", False, id="oops"),
    pytest.param(False, "5 + 23 = 28. I misspoke.", False, id="misspoke"),
    pytest.param(False, "5 + 23 = 28 unless I miscounted.", False, id="miscounted"),
    pytest.param(False, "5 + 23 = 28. I goofed.", False, id="goofed"),
    pytest.param(False, "5 + 23 = 28. Bogus.", False, id="bogus"),
    pytest.param(False, "5 + 23 = 28. Nonsense.", False, id="nonsense"),
    pytest.param(False, "5 + 23 = 28. I lied.", False, id="lied"),
    pytest.param(False, "5 + 23 = 28. That is a lie.", False, id="a-lie"),
    pytest.param(True, "<answer>5 + 23 = 28</answer> Just kidding.", False, id="tags-just-kidding"),
    # ... and prose in parentheses, or after it, that does not deny it stays right
    pytest.param(True, "(using both numbers) <answer>5 + 23 = 28</answer>", True, id="tags-parenthetical-prose"),
    pytest.param(True, "The answer (using + only): <answer>5 + 23 = 28</answer>", True, id="tags-label-prose"),
    pytest.param(False, "Answer (final): 5 + 23 = 28", True, id="label-final-in-parens"),
    pytest.param(False, "(Correct) 5 + 23 = 28", True, id="correct-in-parens"),
    pytest.param(False, "Answer:\n5 + 23 = 28", True, id="label-answer-line-before"),
    pytest.param(False, "**Answer:** \\boxed{5 + 23}", True, id="bold-label-boxed"),
    pytest.param(False, "**Final answer** \\boxed{5 + 23 = 28}", True, id="bold-heading-boxed"),
    pytest.param(False, "- \\boxed{5 + 23}", True, id="bullet-boxed"),
    pytest.param(False, "> <answer>5 + 23</answer>", True, id="quote-answer-tag-plain-mode"),
    pytest.param(False, "Result = \\boxed{5 + 23}", True, id="result-equals-boxed"),
    pytest.param(False, "The answer is \\boxed{5 + 23}.", True, id="answer-is-boxed"),
    pytest.param(True, "The final answer:\n\n<answer>5 + 23 = 28</answer>", True, id="tags-label-answer-line-before"),
    pytest.param(False, "I was wrong before. Corrected:\n5 + 23 = 28", True, id="label-corrected-line-before"),
    pytest.param(False, "Here's a rewritten equation that avoids the issue of the original equation being "
                 "incorrect:\n\n5 + 23", True, id="logged-retry-long-line-before"),  # (a logged run paid it, with 22 + 7)
    pytest.param(False, "5 + 23 = 28 (I think)", True, id="i-think-after"),
    pytest.param(False, "5 + 23 = 28. That is it.", True, id="that-is-it"),
    pytest.param(False, "5 + 23 = 28. Take it or leave it.", True, id="take-it-or-leave-it"),
    pytest.param(False, "5 + 23 = 28. Both numbers lie in the list.", True, id="lie-as-a-verb"),
])
def test_countdown_parenthesised_denials_and_retractions_found_by_differential_fuzzing(tags, completion, expected):
    """A differential fuzz seeded by real model output found both implementations paying these:
    a denial or supposition in parentheses next to an answer block or in a label before a colon
    (``(wrong) <answer>...``, ``Answer (wrong): 5 + 23 = 28``), which the final equation refused
    as ``(wrong) 5 + 23 = 28``, a denial label ending the line before it (``Wrong:\\n5 + 23 = 28``),
    an operator or a denial label before ``\\boxed{`` or ``<answer>`` in the final equation's mode
    (both read as the word "answer", which hid them: ``3 * \\boxed{5 + 23 = 28}``), and retractions
    after it (``Forget that.``, ``Just kidding.``, ``I take it back.``) that the denial words after
    it missed."""
    _both_implementations_say(tags, completion, expected)


@pytest.mark.parametrize("tags,completion,expected", [
    # a denial, supposition or operation before it, with quotes, "$", a bullet or an emoji between
    # (the words before it were read only up to the first such symbol)
    pytest.param(False, "Wrong: $5 + 23 = 28$", False, id="label-wrong-dollars"),
    pytest.param(False, "This is not right: $5 + 23 = 28$.", False, id="not-right-dollars"),
    pytest.param(False, "If $$5 + 23 = 28$$", False, id="if-display-dollars"),
    pytest.param(False, "Suppose \u201c5 + 23 = 28\u201d.", False, id="suppose-curly-quotes"),
    pytest.param(False, "Not \u00ab5 + 23 = 28\u00bb", False, id="not-guillemets"),
    pytest.param(False, "Incorrect: \u300c5 + 23 = 28\u300d", False, id="label-incorrect-corner-brackets"),
    pytest.param(False, "Wrong: \u2022 5 + 23 = 28", False, id="label-wrong-bullet"),
    pytest.param(False, "If \U0001F449 5 + 23 = 28", False, id="if-emoji"),
    pytest.param(False, "Wrong answer:\n# 5 + 23 = 28", False, id="label-line-before-heading-mark"),
    pytest.param(False, "Wrong: $\\boxed{5 + 23 = 28}$", False, id="label-wrong-dollars-boxed"),
    pytest.param(False, "2 * \u201c5 + 23 = 28\u201d", False, id="times-curly-quotes"),
    pytest.param(False, "Wrong: \\boxed{$5 + 23 = 28$}", False, id="label-wrong-boxed-dollars"),
    pytest.param(False, "3 * \\boxed{$5 + 23$}", False, id="times-boxed-dollars"),
    pytest.param(False, "2 * $$5 + 23 = 28$$", False, id="times-display-dollars"),
    pytest.param(False, "half of \u201c5 + 23 = 28\u201d", False, id="half-of-curly-quotes"),
    pytest.param(True, "Wrong: $<answer>5 + 23 = 28</answer>$", False, id="tags-label-wrong-dollars"),
    pytest.param(True, "If \u00ab<answer>5 + 23 = 28</answer>\u00bb", False, id="tags-if-guillemets"),
    pytest.param(True, "Not \U0001F449 <answer>5 + 23 = 28</answer>", False, id="tags-not-emoji"),
    pytest.param(True, "Wrong: (<answer>5 + 23 = 28</answer>)", False, id="tags-label-wrong-paren"),
    pytest.param(True, "2 * \u201c<answer>5 + 23</answer>\u201d", False, id="tags-times-curly-quotes"),
    # a denial label in another language, or "Nope:", which denied it without the colon
    pytest.param(False, "Falsch: 5 + 23 = 28", False, id="label-falsch"),
    pytest.param(False, "Faux : 5 + 23 = 28", False, id="label-faux-spaced-colon"),
    pytest.param(False, "Incorrecto: 5 + 23 = 28", False, id="label-incorrecto"),
    pytest.param(False, "Nope: 5 + 23 = 28", False, id="label-nope"),
    pytest.param(True, "Sbagliato: <answer>5 + 23 = 28</answer>", False, id="tags-label-sbagliato"),
    # ... while wrapped answers without them stay right
    pytest.param(False, "So $5 + 23 = 28$.", True, id="so-dollars"),
    pytest.param(False, "Answer: \u201c5 + 23 = 28\u201d", True, id="label-curly-quotes"),
    pytest.param(False, "\u2022 5 + 23 = 28", True, id="bullet"),
    pytest.param(False, "I was wrong before. Now: $5 + 23 = 28$", True, id="denial-in-an-earlier-sentence-dollars"),
    pytest.param(False, "The answer is \u00ab5 + 23 = 28\u00bb.", True, id="answer-is-guillemets"),
    pytest.param(False, "**Answer:** \\boxed{$5 + 23 = 28$}", True, id="bold-label-boxed-dollars"),
    pytest.param(True, "\U0001F449 <answer>5 + 23 = 28</answer>", True, id="tags-emoji"),
    pytest.param(True, "The answer (<answer>5 + 23 = 28</answer>).", True, id="tags-in-parens"),
    pytest.param(True, "**Answer:** \u201c<answer>5 + 23 = 28</answer>\u201d", True, id="tags-bold-label-curly-quotes"),
])
def test_countdown_denials_before_quotes_dollars_and_bullets(tags, completion, expected):
    """An independent differential fuzz found both implementations paying a denial, supposition
    or operation before the equation when a symbol stood between them (``Wrong: $5 + 23 = 28$``,
    ``If \u201c5 + 23 = 28\u201d``, ``Not \u2022 5 + 23 = 28``, ``2 * \u201c5 + 23 = 28\u201d``), as without
    the symbol they refuse: the words before it were read only up to the first quote, ``$``,
    bullet or emoji, so a model could be rewarded for an equation it denies or doubles. A denial
    label in another language (``Falsch: 5 + 23 = 28``) was paid too, although ``Falsch 5 + 23 =
    28`` was refused: the labels before a colon were English only."""
    _both_implementations_say(tags, completion, expected)


@pytest.mark.parametrize("tags,completion,expected", [
    # a question within four words after it, in its sentence (only a "?" right after it was read)
    pytest.param(False, "5 + 23 = 28 maybe?", False, id="maybe-question"),
    pytest.param(False, "5 + 23 = 28, right?", False, id="right-question"),
    pytest.param(False, "Does 5 + 23 = 28 work?", False, id="does-it-work-question"),
    pytest.param(True, "<answer>5 + 23 = 28</answer> maybe?", False, id="tags-maybe-question"),
    pytest.param(False, "5 + 23 = 28. Or is it?", False, id="or-is-it"),
    pytest.param(True, "<answer>5 + 23 = 28</answer> Or was that?", False, id="tags-or-was-that"),
    # a denial word alone as the label before a colon
    pytest.param(False, "Mistake: 5 + 23 = 28", False, id="label-mistake-alone"),
    pytest.param(False, "**Error:** 5 + 23 = 28", False, id="label-error-bold"),
    pytest.param(False, "### Typo:\n5 + 23 = 28", False, id="label-typo-heading-line-before"),
    pytest.param(False, "Done. Error: 5 + 23 = 28", False, id="label-error-after-a-sentence"),
    pytest.param(True, "Mistake: <answer>5 + 23 = 28</answer>", False, id="tags-label-mistake-alone"),
    # a dash with a one-letter variable on either side, as "n * <answer>" already was
    pytest.param(True, "n - <answer>5 + 23 = 28</answer>", False, id="tags-variable-minus-before"),
    pytest.param(True, "<answer>5 + 23</answer> - x.", False, id="tags-minus-variable-after"),
    pytest.param(False, "5 + 23 = 28 \u2014 n", False, id="em-dash-variable-after"),
    # more retractions after it
    pytest.param(False, "5 + 23 = 28. That fails.", False, id="that-fails"),
    pytest.param(False, "5 + 23 = 28. Flawed.", False, id="flawed"),
    pytest.param(False, "5 + 23 = 28. Disproved.", False, id="disproved"),
    pytest.param(False, "5 + 23 = 28. Yikes.", False, id="yikes"),
    pytest.param(False, "5 + 23 = 28. Try again.", False, id="try-again"),
    pytest.param(False, "5 + 23 = 28. Uh oh.", False, id="uh-oh"),
    pytest.param(False, "5 + 23 = 28. Back to the drawing board.", False, id="drawing-board"),
    # ... while these stay right: a question five words on or in a later sentence, a longer
    # label that names the fix, a prose dash before "a" or "I", a word in another phrase
    pytest.param(False, "5 + 23 = 28 uses each of the numbers once? Yes.", True, id="question-five-words-on"),
    pytest.param(False, "5 + 23 = 28. Right? Yes.", True, id="question-later-sentence"),
    pytest.param(False, "5 + 23 = 28\nDoes it use both numbers? Yes.", True, id="question-next-line"),
    pytest.param(False, "Fixing the mistake: 5 + 23 = 28", True, id="label-fixing-the-mistake"),
    pytest.param(False, "A mistake. 5 + 23 = 28", True, id="mistake-in-an-earlier-sentence"),
    pytest.param(False, "Mistake fixed: 5 + 23 = 28", True, id="label-mistake-fixed"),
    pytest.param(True, "So - <answer>5 + 23 = 28</answer>", True, id="tags-prose-dash-before"),
    pytest.param(True, "<answer>5 + 23 = 28</answer> - I am sure.", True, id="tags-prose-dash-i"),
    pytest.param(True, "<answer>5 + 23 = 28</answer> - a good one.", True, id="tags-prose-dash-a"),
    pytest.param(True, "n's - <answer>5 + 23 = 28</answer>", True, id="tags-dash-after-possessive"),
    pytest.param(False, "5 + 23 = 28. Or is it 28? It is.", True, id="or-is-it-with-the-target"),
    pytest.param(False, "5 + 23 = 28. My board is drawing.", True, id="drawing-board-reversed"),
])
def test_countdown_questions_bare_labels_dashes_and_retractions_the_fuzz_left_open(tags, completion, expected):
    """Cases a differential fuzz found both implementations paying, which stop 62 decided: a
    ``?`` within four words after the equation in its sentence (``5 + 23 = 28, right?``; only one
    right after it was read), ``Or is it?``, ``Mistake:``/``Error:``/``Typo:`` as the whole label
    before it, a dash with a one-letter variable (``n - <answer>``, as ``n * <answer>``), and
    retractions (``That fails.``, ``Try again.``, ``Back to the drawing board.``)."""
    _both_implementations_say(tags, completion, expected)


@pytest.mark.parametrize("tags,completion,expected", [
    # a right equation that the retry then takes back in words the lists missed
    pytest.param(False, "Final answer: 5 + 23 = 28\nWait, I think I messed up.", False, id="messed-up"),
    pytest.param(False, "5 + 23 = 28. Hmm, that overshoots.", False, id="overshoots"),
    pytest.param(False, "5 + 23 = 28. That undershot.", False, id="undershot"),
    pytest.param(False, "5 + 23 = 28. Hmm, let me recalculate.", False, id="recalculate"),
    pytest.param(False, "5 + 23 = 28. Wait, recalculating...", False, id="recalculating"),
    pytest.param(False, "$5 + 23 = 28$\nLet me reconsider.", False, id="reconsider"),
    pytest.param(False, "5 + 23 = 28. Let me redo this.", False, id="redo"),
    pytest.param(False, "5 + 23 = 28. Let me rethink this.", False, id="rethink"),
    pytest.param(False, "5 + 23 = 28. Hmm, I think I made an arithmetic slip.", False, id="slip"),
    pytest.param(False, "5 + 23 = 28. Let me reevaluate.", False, id="reevaluate"),
    pytest.param(False, "5 + 23 = 28. Hmm, I need to recount.", False, id="recount"),
    pytest.param(False, "5 + 23 = 28. That overcounts.", False, id="overcounts"),
    pytest.param(False, "5 + 23 = 28. Hmm, let me rework this.", False, id="rework"),
    pytest.param(False, "**Answer:** 5 + 23 = 28\n\nLet me start over.", False, id="start-over"),
    pytest.param(False, "5 + 23 = 28. Let me try another approach.", False, id="try-another"),
    pytest.param(False, "5 + 23 = 28. That's way off.", False, id="way-off"),
    pytest.param(False, "5 + 23 = 28. Hold on, that's off.", False, id="thats-off"),
    pytest.param(False, "5 + 23 = 28. Hmm, something's off.", False, id="somethings-off"),
    pytest.param(False, "5 + 23 = 28. Wait, it is off by a bit.", False, id="off-by"),
    pytest.param(False, "5 + 23 = 28. That's too high.", False, id="too-high"),
    pytest.param(False, "5 + 23 = 28. Too small.", False, id="too-small"),
    pytest.param(False, "5 + 23 = 28. Hmm, that's a dead end.", False, id="dead-end"),
    pytest.param(False, "5 + 23 = 28. That attempt failed.", False, id="attempt-failed"),
    pytest.param(False, "5 + 23 = 28. Let's try something else.", False, id="something-else"),
    pytest.param(False, "5 + 23 = 28. Back to square one.", False, id="square-one"),
    pytest.param(False, "5 + 23 = 28. Let me try a different combination.", False, id="different-combination"),
    pytest.param(False, "5 + 23 = 28. Let me think again.", False, id="think-again"),
    pytest.param(False, "5 + 23 = 28. That's a miss.", False, id="a-miss"),
    pytest.param(False, "5 + 23 = 28\nLet me think about this differently.", False, id="differently"),
    pytest.param(False, "5 + 23 = 28\n\nI'm unable to find an equation that equals 28.", False, id="unable"),
    pytest.param(True, "<answer>5 + 23</answer>\n\nHmm, that's a dead end.", False, id="tags-dead-end"),
    pytest.param(True, "<answer>5 + 23 = 28</answer>\nHmm, something's off.", False, id="tags-somethings-off"),
    pytest.param(True, "<answer>5 + 23</answer> Let me reconsider.", False, id="tags-reconsider"),
    pytest.param(True, "<answer>5 + 23</answer> Wait, I think I messed up.", False, id="tags-messed-up"),
    # ... while these stay right: the words in other phrases
    pytest.param(False, "5 + 23 = 28. I used a different approach this time.", True, id="different-approach"),
    pytest.param(False, "5 + 23 = 28. The start is over.", True, id="start-is-over-reversed"),
    pytest.param(False, "5 + 23 = 28, with 5 and 23 used once.", True, id="plain-closing"),
    pytest.param(False, "5 + 23 = 28. It works, off we go.", True, id="off-we-go"),
    pytest.param(True, "<answer>5 + 23</answer> This uses each number once.", True, id="tags-plain-closing"),
])
def test_countdown_retractions_larger_models_write(tags, completion, expected):
    """A review from whole completions of 1.5B-8B instruct and reasoning models (a retry after a
    reflection, a right equation, then a line that takes it back) found both implementations
    paying the equation when the take-back was in words the lists missed: ``I messed up``,
    ``that overshoots``, ``Let me reconsider / recalculate / redo / start over``, ``That's way
    off``, ``something's off``, ``too high``, ``a dead end``, ``back to square one``, ``Let me try
    another approach``. The words now deny it after the equation, as ``Try again.`` did."""
    _both_implementations_say(tags, completion, expected)


@pytest.mark.parametrize("tags,completion,expected", [
    # a denial, supposition or operation before a code fence, "$$" or "\\[" that opens the block
    # holding it on the next line (the words before it stopped at the line break)
    pytest.param(False, "If ```\n5 + 23 = 28\n```", False, id="if-code-fence"),
    pytest.param(False, "Suppose ```python\n5 + 23 = 28\n```", False, id="suppose-code-fence-info-string"),
    pytest.param(False, "Not $$\n5 + 23 = 28\n$$", False, id="not-display-dollars-over-lines"),
    pytest.param(False, "If \\[\n5 + 23 = 28\n\\]", False, id="if-display-brackets-over-lines"),
    pytest.param(False, "half of ```\n5 + 23\n```", False, id="half-of-code-fence"),
    pytest.param(False, "3 * ```\n5 + 23\n```", False, id="times-code-fence"),
    pytest.param(True, "If ```\n<answer>5 + 23 = 28</answer>\n```", False, id="tags-if-code-fence"),
    pytest.param(True, "Wrong: $$\n<answer>5 + 23 = 28</answer>\n$$", False, id="tags-label-wrong-display-dollars"),
    # ... a question after the fence that closes its block (its sentence goes on past the line break)
    pytest.param(False, "```\n5 + 23 = 28\n```, right?", False, id="right-question-after-code-fence"),
    pytest.param(False, "```\n5 + 23 = 28\n```?", False, id="question-after-code-fence"),
    pytest.param(False, "\\[\n5 + 23 = 28\n\\], right?", False, id="right-question-after-display-brackets"),
    pytest.param(True, "```\n<answer>5 + 23 = 28</answer>\n```, right?", False, id="tags-question-after-code-fence"),
    # ... a decimal glued on past a closing tag or wrapper
    pytest.param(False, "<code>5 + 23</code>.5", False, id="decimal-past-closing-tag"),
    pytest.param(False, "\\(5 + 23\\).5", False, id="decimal-past-latex-delimiter"),
    pytest.param(False, "$5 + 23$.5", False, id="decimal-past-dollar"),
    pytest.param(True, "<answer>5 + 23</answer> .5", False, id="tags-spaced-decimal-after-block"),
    # ... a denial or supposition before a bullet, or before a dash or star between blanks
    pytest.param(True, "Assume - <answer>5 + 23 = 28</answer>", False, id="tags-assume-dash"),
    pytest.param(True, "Can't be - <answer>5 + 23 = 28</answer>", False, id="tags-cant-be-dash"),
    pytest.param(True, "Not \u2014 <answer>5 + 23 = 28</answer>", False, id="tags-not-em-dash"),
    pytest.param(False, "Wrong \u2014 $5 + 23 = 28$", False, id="wrong-em-dash-dollars"),
    pytest.param(False, "Not - \\boxed{5 + 23}", False, id="not-dash-boxed"),
    pytest.param(False, "\u274c * \\boxed{5 + 23}", False, id="cross-star-boxed"),
    pytest.param(False, "2 \u00d7 * \\boxed{5 + 23}", False, id="times-sign-star-boxed"),
    pytest.param(False, "Wrong answer:\n- \\boxed{5 + 23}", False, id="label-line-before-dash-bullet-boxed"),
    pytest.param(False, "Wrong answer:\n> '$5 + 23 = 28$'", False, id="label-line-before-quote-mark"),
    pytest.param(False, "2 \u00d7 > **\\boxed{5 + 23}**", False, id="times-sign-greater-bold-boxed"),
    # ... while a fence, a bullet or a prose dash before a right answer stays right
    pytest.param(False, "Answer:\n```\n5 + 23 = 28\n```", True, id="label-code-fence"),
    pytest.param(False, "```\n5 + 23 = 28\n```\nIt uses both numbers.", True, id="code-fence-then-prose"),
    pytest.param(False, "So \\[\n5 + 23 = 28\n\\]", True, id="display-brackets-over-lines"),
    pytest.param(False, "```python\nx = 1\n```\n5 + 23 = 28", True, id="after-an-earlier-code-block"),
    pytest.param(False, "5 + 23 = 28. 5 and 23 are used.", True, id="sentence-then-given-number"),
    pytest.param(True, "So - <answer>5 + 23 = 28</answer>", True, id="tags-prose-dash"),
    pytest.param(False, "- \\boxed{5 + 23}", True, id="dash-bullet-boxed"),
    pytest.param(False, "5 + 23 = 28 (see eq.5)", True, id="abbreviation-then-number"),  # (a letter: not a decimal)
    pytest.param(False, "5 + 23 = 28 (p.5)", True, id="page-number"),
])
def test_countdown_fences_bullets_and_glued_decimals_the_symbol_fix_left_open(tags, completion, expected):
    """After the fix of denials behind a symbol, both implementations still paid a denial,
    supposition or operation before a code fence, ``$$`` or ``\\[`` that opens the block on the
    line before the equation (``If`` and a fence: the words stopped at the line break), a question
    after the fence that closes it (the line break ended the sentence), a decimal glued on past a
    closing tag or wrapper (``<code>5 + 23</code>.5``) and a denial before a bullet or a dash
    between blanks (``Assume - <answer>...``, ``Wrong answer:`` and ``- \\boxed{...}``): a model
    could be rewarded for an equation it supposes, questions or changes."""
    _both_implementations_say(tags, completion, expected)


@pytest.mark.parametrize("tags,completion,expected", [
    # Markdown emphasis around a label, a sentence, a wrapped equation or the equation itself
    pytest.param(False, "**Answer:** $5 + 23 = 28$", True, id="bold-label-dollars"),
    pytest.param(False, "Final equation: **$5 + 23 = 28$**", True, id="bold-around-dollars"),
    pytest.param(False, "**Answer:** `5 + 23 = 28`", True, id="bold-label-backquotes"),
    pytest.param(False, "**So 5 + 23 = 28.**", True, id="bold-sentence"),
    pytest.param(False, "*The answer is 5 + 23 = 28*", True, id="italic-sentence"),
    pytest.param(False, "*5 + 23 = 28*", True, id="italic-stars"),
    pytest.param(False, "_5 + 23 = 28_", True, id="italic-underscores"),
    pytest.param(False, "__5 + 23 = 28__", True, id="bold-underscores"),
    pytest.param(False, "**Answer:** *5 + 23 = 28*", True, id="bold-label-italic-equation"),
    pytest.param(False, "**5 + 23** (using both numbers)", True, id="bold-then-prose-parenthesis"),
    pytest.param(True, "**Answer:** **$<answer>5 + 23 = 28</answer>$**", True, id="tags-bold-around-dollars"),
    # ... but never read away where it may be the power operator, nor past a denial or operator
    pytest.param(False, "2**5 + 23", False, id="power-glued"),
    pytest.param(False, "5 + 23 = 28**2", False, id="power-after-result"),
    pytest.param(False, "two **5 + 23 = 28**", False, id="number-word-power"),
    pytest.param(False, "n **5 + 23 = 28 is it**", False, id="variable-power-into-a-bold-sentence"),
    pytest.param(False, "two **$5 + 23$**", False, id="number-word-power-dollars"),
    pytest.param(False, "**$5 + 23$** (2)", False, id="dollars-power-parenthesised-number"),
    pytest.param(False, "2 * *5 + 23*", False, id="times-italic"),
    pytest.param(False, "2 \u00d7 *5 + 23*", False, id="times-sign-italic"),
    pytest.param(False, "2 * _5 + 23_", False, id="times-italic-underscores"),
    pytest.param(False, "x_5 + 23 = 28_", False, id="subscript-underscore"),
    pytest.param(False, "_5 + 23 = 28_.5", False, id="italic-underscores-decimal"),
    pytest.param(False, "Wrong: **5 + 23 = 28**", False, id="label-wrong-bold"),
    pytest.param(False, "**Wrong:** $5 + 23 = 28$", False, id="bold-label-wrong-dollars"),
    pytest.param(False, "If *5 + 23 = 28*", False, id="if-italic"),
    pytest.param(False, "**Not 5 + 23 = 28.**", False, id="bold-sentence-not"),
    pytest.param(True, "2 **$<answer>5 + 23 = 28</answer>$**", False, id="tags-number-power-dollars"),
])
def test_countdown_markdown_emphasis_around_a_right_final_equation(tags, completion, expected):
    """In the final equation's mode both implementations refused common Markdown around a right
    answer (``**Answer:** $5 + 23 = 28$``, ``**$5 + 23 = 28$**``, ``**So 5 + 23 = 28.**``,
    ``*5 + 23 = 28*``, ``_5 + 23 = 28_``): the ``**`` of a bold label or sentence was read as the
    power operator once a ``$``, a backquote or a full stop stood between it and the equation, so a
    right retry earned nothing. Emphasis is now read away as around an answer block, but never a
    star run with an operand on its far side (``two **5 + 23 = 28**``: a power), and the words
    before it are still read (``**Wrong:** $5 + 23 = 28$``)."""
    _both_implementations_say(tags, completion, expected)


@pytest.mark.parametrize("tags,completion,expected", [
    # an operator or denial a blank away from "_..._" emphasis around the equation
    pytest.param(False, "_5 + 23 = 28_ ^ n", False, id="italic-underscores-power-variable"),
    pytest.param(False, "_5 + 23 = 28_ / two", False, id="italic-underscores-divided-number-word"),
    pytest.param(False, "_5 + 23 = 28_ \u00f7 n", False, id="italic-underscores-division-sign"),
    pytest.param(False, "__5 + 23 = 28__ % n", False, id="bold-underscores-modulo"),
    pytest.param(False, "n * _5 + 23 = 28_", False, id="variable-times-italic-underscores"),
    pytest.param(False, "two ** _5 + 23 = 28_", False, id="number-word-power-italic-underscores"),
    # a "*" with a blank or an operand before it is an operator, not emphasis closing a label
    pytest.param(False, "n * \u201c5 + 23 = 28\u201d", False, id="variable-times-curly-quotes"),
    pytest.param(False, "two * \u201c5 + 23 = 28\u201d", False, id="number-word-times-curly-quotes"),
    pytest.param(False, "n * \\boxed{5 + 23 = 28}", False, id="variable-times-boxed"),
    pytest.param(True, "n * \u201c<answer>5 + 23 = 28</answer>\u201d", False, id="tags-variable-times-curly-quotes"),
    # ... while a right answer in them stays right
    pytest.param(False, "So _5 + 23 = 28_ (using both).", True, id="italic-underscores-then-prose"),
    pytest.param(False, "Then _5 + 23 = 28_ !", True, id="italic-underscores-spaced-exclamation"),
    pytest.param(False, "**Answer:** \u201c5 + 23 = 28\u201d", True, id="bold-label-curly-quotes"),
    pytest.param(False, "**Answer:** \\boxed{5 + 23 = 28}", True, id="bold-label-boxed"),
    pytest.param(False, "Final equation: **\\boxed{5 + 23}**", True, id="label-bold-boxed"),
    pytest.param(False, "Here it is: **\\boxed{5 + 23 = 28}** is the final equation.", True, id="bold-boxed-in-prose"),
    pytest.param(False, "n ** \\boxed{5 + 23}", False, id="variable-power-boxed"),
])
def test_countdown_operations_a_blank_past_underscores_or_behind_a_spaced_star(tags, completion, expected):
    """Both implementations paid ``_5 + 23 = 28_ ^ n``, ``n * _5 + 23 = 28_`` and ``_5 + 23 = 28_
    / two``: the characters next to ``_..._`` emphasis were read just past the underscores, so a
    blank there hid the operator that the equation's own run would have reached; and ``n *
    \u201c5 + 23 = 28\u201d`` or ``n * \\boxed{...}``: a star after a word was taken for emphasis
    closing a label (``**Answer:**``) even with an operand as the word. A model could be rewarded
    for an equation it raises, divides or multiplies. Bold opening around ``\\boxed{}`` after a
    label stays emphasis (``Final equation: **\\boxed{5 + 23}**``: refused by a first fix that
    took only stars glued to the word before them as emphasis)."""
    _both_implementations_say(tags, completion, expected)


@pytest.mark.parametrize("tags,completion,expected", [
    # an operator word or sign after the equation, past the quotes or "$" that close it
    pytest.param(False, "$5 + 23 = 28$ mod n", False, id="dollars-mod"),
    pytest.param(False, "\u201c5 + 23 = 28\u201d times two", False, id="curly-quotes-times-number-word"),
    pytest.param(False, "\u00ab5 + 23 = 28\u00bb \u00d7 n", False, id="guillemets-times-sign"),
    pytest.param(False, "$$5 + 23 = 28$$ ^ n", False, id="display-dollars-power"),
    pytest.param(False, "**$5 + 23 = 28$** mod n", False, id="bold-dollars-mod"),
    pytest.param(True, "$<answer>5 + 23 = 28</answer>$ mod n", False, id="tags-dollars-mod"),
    pytest.param(True, "\u201c<answer>5 + 23 = 28</answer>\u201d ^ n", False, id="tags-curly-quotes-power"),
    # an operator-like symbol (middle dot, heavy plus, multiplication X) is no wrapper to read past
    pytest.param(False, "n \u00b7 $5 + 23 = 28$", False, id="variable-middle-dot-dollars"),
    pytest.param(False, "two \u2715 \u201c5 + 23 = 28\u201d", False, id="number-word-multiplication-x-curly-quotes"),
    pytest.param(True, "n \u2795 \u201c<answer>5 + 23 = 28</answer>\u201d", False, id="tags-variable-heavy-plus"),
    # ... while prose, an exclamation or a bullet past them stays right
    pytest.param(False, "The answer is $5 + 23$!", True, id="dollars-bare-exclamation"),
    pytest.param(False, "\u201c5 + 23 = 28\u201d (using both).", True, id="curly-quotes-then-prose"),
    pytest.param(False, "$5 + 23 = 28$ \U0001F389 done", True, id="dollars-emoji-prose"),
    pytest.param(False, "\u2022 $5 + 23 = 28$", True, id="bullet-dollars"),
    pytest.param(True, "\u201c<answer>5 + 23 = 28</answer>\u201d.", True, id="tags-curly-quotes-full-stop"),
])
def test_countdown_operations_after_a_wrapper_and_behind_an_operator_symbol(tags, completion, expected):
    """The fix of denials and operations behind a symbol read past quotes, ``$`` and bullets only
    before the equation: both implementations still paid ``$5 + 23 = 28$ mod n``, ``\u201c5 + 23 =
    28\u201d times two`` and ``$$5 + 23 = 28$$ ^ n`` (refused without the symbols), and, once bold
    was read away, ``**$5 + 23 = 28$** mod n``; and an operator-like symbol (``\u00b7 \u2715
    \u2795``) counted as a wrapper, so ``n \u00b7 $5 + 23 = 28$`` was read past it and paid. A model
    could be rewarded for an equation it multiplies or reduces."""
    _both_implementations_say(tags, completion, expected)


@pytest.mark.parametrize("tags,completion,expected", [
    # the other forms of * / % ^ - (full-width, small, low, Arabic, per mille): operators as theirs
    pytest.param(False, "5 + 23 = 28 \uff0a two", False, id="fullwidth-asterisk-number-word"),
    pytest.param(False, "n \uff0a (5 + 23) = 28", False, id="variable-fullwidth-asterisk"),
    pytest.param(False, "5 + 23 = 28 \uff0f two", False, id="fullwidth-solidus-number-word"),
    pytest.param(False, "5 + 23 = 28\uff05", False, id="fullwidth-percent"),
    pytest.param(False, "5 + 23 = 28 \uff3e n", False, id="fullwidth-caret-variable"),
    pytest.param(False, "5 + 23 = 28 \uff0d n", False, id="fullwidth-minus-variable"),
    pytest.param(False, "5 + 23 = 28 \ufe61 n", False, id="small-asterisk-variable"),
    pytest.param(False, "two \u204e 5 + 23 = 28", False, id="number-word-low-asterisk"),
    pytest.param(False, "two \u066d 5 + 23 = 28", False, id="number-word-arabic-star"),
    pytest.param(False, "5 + 23 = 28\u2030", False, id="per-mille"),
    pytest.param(False, "5 + 23 = 28\u066a", False, id="arabic-percent"),
    pytest.param(False, "5 + 23 = 28. So 28 \uff05 5 too.", False, id="later-fullwidth-percent"),
    pytest.param(True, "n \uff0a <answer>5 + 23 = 28</answer>", False, id="tags-variable-fullwidth-asterisk"),
    pytest.param(True, "<answer>5 + 23 = 28</answer>\uff05", False, id="tags-fullwidth-percent"),
    # ... and an operator-like symbol that ends the line before, as an operator sign does
    pytest.param(False, "two \u2715\n5 + 23 = 28", False, id="multiplication-x-line-before"),
    pytest.param(False, "two \uff0a\n5 + 23 = 28", False, id="fullwidth-asterisk-line-before"),
    pytest.param(True, "two \u2715\n<answer>5 + 23 = 28</answer>", False, id="tags-multiplication-x-line-before"),
    # the other forms of "?" make it a question as "?" does; a full-width "!" is "!"
    pytest.param(False, "5 + 23 = 28\uff1f", False, id="fullwidth-question-mark"),
    pytest.param(False, "5 + 23 = 28, right\u2753", False, id="emoji-question-mark-right"),
    pytest.param(False, "Is 5 + 23 = 28 \u2047", False, id="double-question-mark"),
    pytest.param(False, "5 + 23 = 28\u203d", False, id="interrobang"),
    pytest.param(True, "<answer>5 + 23 = 28</answer>\uff1f", False, id="tags-fullwidth-question-mark"),
    pytest.param(False, "The answer is 5 + 23\uff01", False, id="fullwidth-factorial"),
    # a prohibition sign drawn over it (U+20E0, enclosing circle backslash), as a solidus overlay
    pytest.param(False, "5 + 23 =\u20e0 28", False, id="equals-in-prohibition-sign"),
    pytest.param(False, "5 + 23 = 28\u20e0", False, id="result-in-prohibition-sign"),
    # a number word in emphasis next to it: maybe a power, as "two **5 + 23 = 28**"
    pytest.param(False, "5 + 23 = 28 **two**", False, id="bold-number-word-after"),
    pytest.param(False, "5 + 23 = 28 *two*", False, id="italic-number-word-after"),
    # the other marks that say "no" (a ballot box with an X, prohibited, thumbs down), as a cross mark
    pytest.param(False, "5 + 23 = 28 \u2612", False, id="ballot-box-with-x-after"),
    pytest.param(False, "\U0001f6ab 5 + 23 = 28", False, id="prohibited-before"),
    pytest.param(False, "5 + 23 = 28. Both used once \u26d4", False, id="no-entry-later"),
    pytest.param(False, "5 + 23 = 28 \U0001f44e", False, id="thumbs-down-after"),
    pytest.param(True, "<answer>5 + 23 = 28</answer> \U0001f44e", False, id="tags-thumbs-down-after"),
    # a number word after an operator word: more arithmetic on the result, as with digits ("times 2")
    pytest.param(False, "5 + 23 = 28. Then times two.", False, id="later-times-number-word"),
    pytest.param(False, "5 + 23 = 28. Then minus five.", False, id="later-minus-number-word"),
    pytest.param(False, "5 + 23 = 28. Better: twenty-three minus five.", False, id="later-restated-difference-in-words"),
    pytest.param(False, "5 + 23 = 28, divided by two", False, id="later-divided-by-number-word"),
    pytest.param(False, "5 + 23 = 28. Therefore twenty-three less five.", False, id="later-less-number-word"),
    # ... while plain answers, an exclamation, bullets, emoji and emphasised words stay right
    pytest.param(False, "So the answer is 5 + 23 = 28.", True, id="plain"),
    pytest.param(False, "5 + 23 = 28. I checked it two times.", True, id="number-word-before-times"),
    pytest.param(False, "5 + 23 = 28. Let me add one more note.", True, id="add-one-more-note"),
    pytest.param(False, "\u2612 30 - 2 = 28\n\u2611 5 + 23 = 28 \U0001f44d", True, id="checked-box-after-a-crossed-one"),
    pytest.param(False, "**Answer:** $5 + 23 = 28$", True, id="bold-label-dollars"),
    pytest.param(False, "5 + 23 = 28\uff01", True, id="fullwidth-exclamation-after-result"),
    pytest.param(False, "\u2022 5 + 23 = 28 \u2728", True, id="bullet-and-emoji"),
    pytest.param(False, "Step **one**: 5 + 23 = 28", True, id="bold-number-word-in-label"),
    pytest.param(False, "**Two** numbers: 5 + 23 = 28", True, id="bold-number-word-heading"),
    pytest.param(False, "5 + 23 = 28 **correct**", True, id="bold-word-after"),
    pytest.param(True, "**Answer:** <answer>5 + 23 = 28</answer>", True, id="tags-bold-label"),
])
def test_countdown_operator_and_question_forms_found_by_a_white_box_review(tags, completion, expected):
    """A white-box review found both implementations paying these: full-width, small and other
    forms of ``* / % ^ -`` (``\uff0a \uff0f \uff05 \u204e \u2030``) counted as wrappers, not
    operators, so ``5 + 23 = 28 \uff0a two`` and ``5 + 23 = 28\uff05`` were paid where the ASCII
    signs are refused; an operator-like symbol ending the line before (``two \u2715``) was not
    read as continuing it; ``\uff1f \u2753 \u2047 \u203d`` were not questions as ``?`` is; the
    prohibition sign U+20E0 over ``=`` (shown as a crossed-out equals) was dropped; the marks
    ``\u2612 \U0001f6ab \u26d4 \U0001f44e`` were not cross marks; and a number
    word in emphasis just after it was read as emphasis, not as a possible power, unlike ``two
    **5 + 23 = 28**``; and a number word after ``times``, ``minus`` or ``divided by`` (``Then times
    two.``) was paid where digits (``Then times 2.``) are refused. A model could be paid for a
    percentage, a power, a question or more arithmetic on its result."""
    _both_implementations_say(tags, completion, expected)


@pytest.mark.parametrize("tags,completion,expected", [
    # a label in another alphabet before a colon just before it (without the colon it was refused)
    pytest.param(False, "\u041d\u0435\u0432\u0435\u0440\u043d\u043e: 5 + 23 = 28", False, id="russian-label"),
    pytest.param(False, "**\u041d\u0435\u0432\u0435\u0440\u043d\u043e:** 5 + 23 = 28", False, id="russian-bold-label"),
    pytest.param(False, "\u041d\u0435\u0432\u0435\u0440\u043d\u043e:\n5 + 23 = 28", False, id="russian-heading"),
    pytest.param(False, "\u9519\u8bef: 5 + 23 = 28", False, id="chinese-label"),
    pytest.param(False, "\u039b\u03ac\u03b8\u03bf\u03c2: 5 + 23 = 28", False, id="greek-label"),
    pytest.param(True, "\u041d\u0435\u0432\u0435\u0440\u043d\u043e: <answer>5 + 23 = 28</answer>", False,
                 id="tags-russian-label"),
    # a supposition in a language whose denials are read ("if", "suppose")
    pytest.param(False, "Wenn 5 + 23 = 28", False, id="german-if"),
    pytest.param(False, "Angenommen 5 + 23 = 28", False, id="german-suppose"),
    pytest.param(False, "Si 5 + 23 = 28, alors ...", False, id="french-if"),
    pytest.param(False, "Supposons que 5 + 23 = 28", False, id="french-suppose"),
    pytest.param(False, "Supongamos que 5 + 23 = 28", False, id="spanish-suppose"),
    pytest.param(False, "Hvis 5 + 23 = 28", False, id="danish-if"),
    pytest.param(True, "Wenn <answer>5 + 23 = 28</answer>", False, id="tags-german-if"),
    # a word in another alphabet after it, past a comma, colon or full stop ("Incorrect.", "wrong")
    pytest.param(False, "5 + 23 = 28. \u041d\u0435\u0432\u0435\u0440\u043d\u043e.", False, id="russian-after-sentence"),
    pytest.param(False, "5 + 23 = 28, \u043d\u0435\u0432\u0435\u0440\u043d\u043e.", False, id="russian-after-comma"),
    pytest.param(False, "5 + 23 = 28: \u03bb\u03ac\u03b8\u03bf\u03c2", False, id="greek-after-colon"),
    pytest.param(False, "5 + 23 = 28. \u9519\u8bef\u3002", False, id="chinese-after"),
    pytest.param(True, "<answer>5 + 23 = 28</answer>. \u041d\u0435\u0432\u0435\u0440\u043d\u043e.", False,
                 id="tags-russian-after"),
    # LaTeX's logical "not" (shown as \u00ac, which is refused) before it
    pytest.param(False, r"$\neg (5 + 23 = 28)$", False, id="latex-neg-parenthesised"),
    pytest.param(False, r"$\neg 5 + 23 = 28$", False, id="latex-neg"),
    pytest.param(False, r"$\lnot (5 + 23 = 28)$", False, id="latex-lnot"),
    pytest.param(True, r"\neg (<answer>5 + 23 = 28</answer>)", False, id="tags-latex-neg"),
    # a take-back verb with "it" or "this", as with "that"
    pytest.param(False, "5 + 23 = 28. Forget it.", False, id="forget-it"),
    pytest.param(False, "5 + 23 = 28. Ignore this.", False, id="ignore-this"),
    pytest.param(False, "5 + 23 = 28. Scrap it.", False, id="scrap-it"),
    pytest.param(True, "<answer>5 + 23 = 28</answer> Forget it.", False, id="tags-forget-it"),
    # a question within four words after a result written in words (the linking words are not
    # among them, as "=" is not), and still paid five words after it, as after "= 28"
    pytest.param(False, "5 + 23 gives us 28, is that correct?", False, id="question-after-gives-us"),
    pytest.param(False, "5 + 23, which is exactly 28, is that right?", False, id="question-after-which-is-exactly"),
    pytest.param(False, "5 + 23 is 28 is that right?", False, id="question-after-is"),
    pytest.param(False, "5 + 23 gives us 28, which uses both numbers once?", True, id="question-five-words-after"),
    pytest.param(False, "5 + 23 gives us 28.", True, id="result-in-words"),
    # still paid: Latin words (with diacritics, or letters no diacritic folds), a "yes" in an
    # earlier clause, a plain label
    pytest.param(False, "R\u00e9ponse : 5 + 23 = 28", True, id="french-label-latin"),
    pytest.param(False, "L\u00f6sung: 5 + 23 = 28", True, id="german-label-latin"),
    pytest.param(False, "Gro\u00dfe Summe: 5 + 23 = 28", True, id="german-sharp-s-label"),
    pytest.param(False, "S\u00ed, 5 + 23 = 28", True, id="spanish-yes-earlier-clause"),
    pytest.param(False, "5 + 23 = 28. Das ist gro\u00df.", True, id="german-sharp-s-after"),
    pytest.param(False, "5 + 23 = 28. Do\u011fru.", True, id="turkish-after"),
    pytest.param(False, "5 + 23 = 28. C'est la r\u00e9ponse.", True, id="french-after"),
    pytest.param(False, "Answer: 5 + 23 = 28", True, id="english-label"),
    pytest.param(True, "Answer: <answer>5 + 23 = 28</answer>", True, id="tags-english-label"),
])
def test_countdown_foreign_labels_and_suppositions_found_by_a_differential_fuzz(tags, completion, expected):
    """A black-box differential fuzz found both implementations paying a denial in another
    alphabet written as a label (``\u041d\u0435\u0432\u0435\u0440\u043d\u043e: 5 + 23 = 28``,
    "Incorrect:"), which the word window refused without the colon but the label rule did not
    read, or after the equation past a comma, colon or full stop (``5 + 23 = 28.
    \u041d\u0435\u0432\u0435\u0440\u043d\u043e.``), where only the listed languages' denials are
    read, and a supposition in German, French, Spanish or Danish (``Wenn 5 + 23 = 28``, "if"),
    whose denials are read but whose "if" was not, and LaTeX's ``\\neg`` / ``\\lnot`` (shown
    as the refused \u00ac) before it, and a take-back verb with ``it`` (``Forget it.``; ``Forget
    that.`` was refused), and a question after a result written in words, whose linking words
    counted among the four words after it (``5 + 23 gives us 28, is that correct?``): a model
    could be paid for an equation it called wrong, negated, took back, questioned or only
    supposed."""
    _both_implementations_say(tags, completion, expected)


@pytest.mark.parametrize("tags,completion,expected", [
    # a Markdown list item: "-", "*" or "+" first on its line with a blank after it
    pytest.param(False, "- 5 + 23 = 28", True, id="dash-bullet"),
    pytest.param(False, "The answer:\n- 5 + 23 = 28", True, id="dash-bullet-after-label"),
    pytest.param(False, "  - 23 + 5 = 28", True, id="indented-bullet"),
    pytest.param(False, "* 5 + 23 = 28", True, id="star-bullet"),
    pytest.param(False, "+ 5 + 23 = 28", True, id="plus-bullet"),
    pytest.param(False, "- **5 + 23 = 28**", True, id="bullet-bold"),
    pytest.param(False, "* **5 + 23 = 28**", True, id="star-bullet-bold"),
    pytest.param(False, "- $5 + 23 = 28$", True, id="bullet-dollars"),
    pytest.param(False, "- 5 + 23", True, id="bullet-expression"),
    # ... read as a bullet, never as an operation, so it cannot make a wrong sum right
    pytest.param(False, "- 5 + 23 = 18", False, id="bullet-not-a-minus"),
    pytest.param(False, "Answer:\n- $5 + 23 = 18$", False, id="bullet-dollars-not-a-minus"),
    # not bullets: a unary sign glued to a number, a second dash, a tab-less glued letter,
    # a sign that continues the line before, a denial in the item
    pytest.param(False, "-5 + 23 = 28", False, id="unary-minus"),
    pytest.param(False, "- - 5 + 23 = 28", False, id="bullet-then-minus"),
    pytest.param(False, "2 *\n- 5 + 23 = 28", False, id="continues-line-before"),
    pytest.param(False, "Wrong:\n- 5 + 23 = 28", False, id="bullet-under-denial"),
    pytest.param(False, "- Wrong: 5 + 23 = 28", False, id="denial-in-item"),
    pytest.param(False, "x - 5 + 23 = 28", False, id="minus-mid-line"),
    # "!=" after it says the equation does not hold, though a "!" after a written result is prose
    pytest.param(False, "5 + 23 = 28 != target", False, id="not-equal-after"),
    pytest.param(False, "5 + 23 = 28!= target", False, id="not-equal-glued"),
    pytest.param(False, "$5 + 23 = 28$ != target", False, id="not-equal-after-dollars"),
    pytest.param(True, "<answer>5 + 23 = 28</answer> != target", False, id="tags-not-equal"),
    pytest.param(False, "5 + 23 = 28!", True, id="exclamation-after-result"),
    pytest.param(False, "- <answer>5 + 23 = 28</answer>", True, id="bullet-before-block"),
    pytest.param(True, "- <answer>5 + 23 = 28</answer>", True, id="tags-bullet"),
])
def test_countdown_markdown_bullets_and_not_equal(tags, completion, expected):
    """Both implementations refused a right equation written as a Markdown list item (``- 5 + 23
    = 28``, ``* **5 + 23 = 28**``, ``- $5 + 23 = 28$``), reading the bullet as a unary minus or a
    product, although a bullet before a wrapped or tagged answer was already read as one; and both
    paid ``5 + 23 = 28 != target``, reading the ``!`` after a written result as an exclamation."""
    _both_implementations_say(tags, completion, expected)


@pytest.mark.parametrize("tags,completion,expected", [
    # a denial in a label chained before the answer's own label on its line
    pytest.param(False, "Wrong: Answer: 5 + 23 = 28", False, id="chained-label-wrong"),
    pytest.param(False, "**Incorrect attempt:** **Solution:** 5 + 23 = 28", False, id="chained-label-bold"),
    pytest.param(False, "This is wrong: the answer: 5 + 23 = 28", False, id="chained-label-sentence"),
    pytest.param(False, "> \u274c Wrong: - **Result:** 5 + 23 = 28", False, id="chained-label-quote-bullet"),
    pytest.param(True, "**Incorrect attempt:** **Final Answer:** <answer>5 + 23 = 28</answer>", False,
                 id="tags-chained-label"),
    pytest.param(True, "> \u274c Wrong: > **Result:** <answer>5 + 23 = 28</answer>", False, id="tags-chained-quote"),
    # ... or in a heading above the line the answer (or its label) starts: a Markdown heading, a
    # short line in bold, a label ending the line, blank lines apart
    pytest.param(False, "### Wrong answer\n\n5 + 23 = 28", False, id="heading-wrong"),
    pytest.param(False, "### Wrong answer\n5 + 23 = 28", False, id="heading-wrong-next-line"),
    pytest.param(False, "**Wrong answer**\n\n5 + 23 = 28", False, id="bold-line-wrong"),
    pytest.param(False, "### Wrong answer\n\n**Answer:** 5 + 23 = 28", False, id="heading-then-label"),
    pytest.param(False, "Wrong:\n\n**Answer:** 5 + 23 = 28", False, id="colon-heading-then-label"),
    pytest.param(False, "### Incorrect\n\n`5 + 23 = 28`", False, id="heading-then-code"),
    pytest.param(False, "### Wrong answer\n\n\\[\n5 + 23 = 28\n\\]", False, id="heading-then-display"),
    pytest.param(False, "### Mistake\n\n5 + 23 = 28", False, id="heading-mistake-alone"),
    pytest.param(False, "This does not work: Result:\n5 + 23 = 28", False, id="chained-heading-labels"),
    pytest.param(True, "### Wrong answer\n\n**Answer:** <answer>5 + 23 = 28</answer>", False, id="tags-heading"),
    pytest.param(True, "> \u274c Wrong: Answer:\n<answer>5 + 23 = 28</answer>", False, id="tags-heading-chain"),
    # still paid: a heading that denies nothing, a denial that is a sentence, a long label
    pytest.param(False, "### Correct answer\n\n**Answer:** 5 + 23 = 28", True, id="heading-correct"),
    pytest.param(False, "### Fixing the mistake\n\n5 + 23 = 28", True, id="heading-fixing-mistake"),
    pytest.param(False, "That was wrong.\n\n5 + 23 = 28", True, id="denial-sentence-before"),
    pytest.param(False, "I was wrong before: the correct equation is: 5 + 23 = 28", True, id="long-label-after-denial"),
    # a Markdown blockquote mark opening the line is not a comparison
    pytest.param(False, "> 5 + 23 = 28", True, id="blockquote"),
    pytest.param(False, "> **Answer:** 5 + 23 = 28", True, id="blockquote-label"),
    pytest.param(False, "> > 5 + 23 = 28", True, id="blockquote-nested"),
    pytest.param(False, ">> 5 + 23 = 28", True, id="blockquote-nested-glued"),
    pytest.param(False, "> - 5 + 23 = 28", True, id="blockquote-bullet"),
    pytest.param(True, "> <answer>5 + 23 = 28</answer>", True, id="tags-blockquote"),
    pytest.param(False, "> 5 + 23 = 18", False, id="blockquote-wrong-sum"),
    pytest.param(False, ">5 + 23 = 28", False, id="greater-than-glued"),
    pytest.param(False, "> -5 + 23 = 28", False, id="blockquote-unary-minus"),
    pytest.param(False, "Wrong:\n> 5 + 23 = 28", False, id="blockquote-under-denial"),
    pytest.param(False, "3 *\n> 5 + 23 = 28", False, id="blockquote-continues-line-before"),
    pytest.param(True, "<answer>5 + 23 = 28</answer> > 5", False, id="tags-greater-than-after"),
    # a Markdown table row ending the line before does not leave a bar open
    pytest.param(False, "| Step | Result |\n|---|---|\n| 5 + 23 | 28 |\n\n5 + 23 = 28", True, id="table-before"),
    pytest.param(False, "| a | b |\n|---|---|\n5 + 23 = 28", True, id="table-divider-before"),
    pytest.param(True, "| 1 | 5 + 23 | 28 |\n\n<answer>5 + 23 = 28</answer>", True, id="tags-table-before"),
    pytest.param(False, "|3 - 5| + |\n5 + 23 = 28", False, id="open-bar-before"),
    pytest.param(False, "|\n5 + 23 = 28", False, id="lone-bar-before"),
    pytest.param(False, "2 * |\n5 + 23 = 28|", False, id="abs-bars-around"),
    # a verification line that only restates the result, or repeats the answer block, is not
    # another equation ("Verification: 28 = 28" became the final equation; after a block it was
    # "more arithmetic")
    pytest.param(False, "5 + 23 = 28\n\nVerification: 28 = 28", True, id="verification-target"),
    pytest.param(False, "5 + 23 = 28\n\nResult = 28", True, id="result-equals-target"),
    pytest.param(False, "5 + 23 = 28\n\n**Verification:** $28 = 28$ \u2713", True, id="verification-dollars"),
    pytest.param(True, "<answer>5 + 23 = 28</answer>\n\nCheck: 5 + 23 = 28 \u2713", True, id="tags-check-repeat"),
    pytest.param(True, "<answer>5 + 23</answer>\n\nCheck: 5 + 23 = 28 \u2713", True, id="tags-check-with-result"),
    pytest.param(True, "<answer>5 + 23 = 28</answer>\n\nVerification: 28 = 28", True, id="tags-verification-target"),
    # ... but not another equation, a different result, or more arithmetic on it
    pytest.param(False, "5 + 23 = 29\n\nVerification: 28 = 28", False, id="verification-after-wrong"),
    pytest.param(False, "5 + 23 = 28\n\n28 = 29", False, id="verification-other-value"),
    pytest.param(False, "5 + 23 = 28\n\nVerification: 28 = 28 is false", False, id="verification-denied"),
    pytest.param(False, "5 + 23 = 28\n\n= 28.5", False, id="verification-decimal"),
    pytest.param(True, "<answer>5 + 23 = 28</answer>\n\nCheck: 23 + 5 = 28 \u2713", False, id="tags-check-other-order"),
    pytest.param(True, "<answer>5 + 23 = 28</answer>\n\nCheck: 5 + 23 = 28 * 2", False, id="tags-check-times-two"),
    pytest.param(True, "<answer>5 + 23 = 28</answer>\n\nCheck: 5 + 23 = 28.5", False, id="tags-check-decimal"),
    pytest.param(True, "<answer>5 + 23 = 28</answer>\n\nCheck: (5 + 23 = 28)^2", False, id="tags-check-power"),
    pytest.param(True, "<answer>5 + 23 = 28</answer> = 28", False, id="tags-equals-glued-to-block"),
])
def test_countdown_markdown_structure(tags, completion, expected):
    """Markdown structure as instruct models write it (a black-box fuzz round): a denial in a
    label chained before the answer's label (``Wrong: Answer: 5 + 23 = 28``) or in a heading on
    the line before it (``### Wrong answer``, blank lines apart) was paid, as a model could be for
    an equation it called wrong; a blockquote mark (``> 5 + 23 = 28``) read as a comparison, a
    table row ending the line before (``| 5 + 23 | 28 |``) as an open bar, and a verification line
    after the answer that restates it (``Verification: 28 = 28``, ``Check: 5 + 23 = 28 \u2713``
    after the block) as another equation refused right answers."""
    _both_implementations_say(tags, completion, expected)


@pytest.mark.parametrize("tags,completion,expected", [
    # a restatement that something acts on: the target stays where the run starts, so the word or
    # sign before it is read as acting on a number (blanked, "Then minus 28 = 28" left "Then minus")
    pytest.param(False, "5 + 23 = 28\nThen minus 28 = 28. Done.", False, id="restated-after-minus"),
    pytest.param(False, "5 + 23 = 28, squared 28 = 28.", False, id="restated-after-squared"),
    pytest.param(False, "5 + 23 = 28 which \u2260\n28 = 28.", False, id="restated-after-not-equal-sign"),
    pytest.param(True, "<answer>5 + 23</answer>\nThen times 5 + 23 = 28.", False, id="tags-repeat-after-times"),
    pytest.param(True, "<answer>5 + 23 = 28</answer>\nminus (5 + 23) = 28.", False, id="tags-repeat-after-minus"),
    pytest.param(False, "5 + 23 = 28\nResult = 2 8", False, id="restated-digits-apart"),
    # ... a result written apart from its expression still leaves nothing behind
    pytest.param(False, "`23 + 5` = 28", True, id="result-after-code-span"),
    pytest.param(False, "23 + 5 $= 28", True, id="result-after-dollar"),
    pytest.param(False, "`23 + 5` = 29", False, id="wrong-result-after-code-span"),
    # a table row whose last cell ends in an operator of any form leaves a bar open
    pytest.param(False, "| 3 | 2 \u2212 |\n5 + 23 = 28", False, id="table-cell-unicode-minus"),
    pytest.param(False, "| 3 | 2 ^ |\n5 + 23 = 28", False, id="table-cell-caret"),
    pytest.param(False, "| 3 | 2 % |\n5 + 23 = 28", False, id="table-cell-percent"),
    pytest.param(False, "| 5, 23 | Add |\n\n5 + 23 = 28", True, id="table-cell-word"),
    pytest.param(True, "| 3 | 2 \u00d7 |\n<answer>5 + 23 = 28</answer>", False, id="tags-table-cell-times"),
    pytest.param(False, "| Step | Result |\n|---|---|\n| 1 | 5 + 23 |\n5 + 23 = 28", True, id="table-cell-expression"),
    pytest.param(False, "| a | |\n5 + 23 = 28", True, id="table-empty-last-cell"),
    # a line of marks alone (a rule, a quote) between a denial and the answer is a blank line
    pytest.param(False, "Wrong:\n___\n5 + 23 = 28", False, id="denial-rule-line"),
    pytest.param(False, "Wrong:\n\"\n5 + 23 = 28", False, id="denial-quote-line"),
    pytest.param(True, "Wrong:\n___\n<answer>5 + 23 = 28</answer>", False, id="tags-denial-rule-line"),
    pytest.param(True, "### Wrong answer\n''\n<answer>5 + 23 = 28</answer>", False, id="tags-heading-quote-line"),
    # a mark glued before the block on its line (the re-check read the heading from that mark)
    pytest.param(True, "Wrong:\n\n*<answer>5 + 23 = 28</answer>", False, id="tags-denial-star-glued"),
    pytest.param(True, "### Incorrect\n\n> *<answer>5 + 23 = 28</answer>$", False, id="tags-heading-quote-star"),
    # a ">" glued to the block opening the line is a comparison, as ">5 + 23 = 28"
    pytest.param(True, "><answer>5 + 23 = 28</answer>", False, id="tags-greater-than-glued"),
    # a numbered list item's number between a denial and the answer
    pytest.param(False, "### Wrong answer\n\n1. 5 + 23 = 28", False, id="heading-numbered-item"),
    pytest.param(False, "Wrong:\n2. **Answer:** 5 + 23 = 28", False, id="label-numbered-item-label"),
    pytest.param(False, "Wrong: 1. 5 + 23 = 28", False, id="label-numbered-item"),
    pytest.param(True, "### Wrong answer\n\n1. <answer>5 + 23 = 28</answer>", False, id="tags-heading-numbered-item"),
    pytest.param(False, "### Final answer\n\n1. 5 + 23 = 28", True, id="heading-numbered-item-paid"),
    # a number in a label does not end it, and a bare denial chained after a label is a label
    pytest.param(False, "Incorrect: Step 2: 5 + 23 = 28", False, id="chained-label-with-number"),
    pytest.param(False, "Wrong step 2: 5 + 23 = 28", False, id="label-denial-before-number"),
    pytest.param(False, "Wrong answer #2: 5 + 23 = 28", False, id="label-denial-before-hash-number"),
    pytest.param(False, "### Incorrect\n- Step 2: 5 + 23 = 28", False, id="heading-then-numbered-label"),
    pytest.param(True, "Incorrect: Step 2: <answer>5 + 23 = 28</answer>", False, id="tags-chained-label-with-number"),
    pytest.param(False, "Answer: Mistake: 5 + 23 = 28", False, id="chained-bare-denial"),
    pytest.param(True, "- Answer: **Mistake:** <answer>5 + 23 = 28</answer>", False, id="tags-chained-bare-denial"),
    pytest.param(False, "Step 2: 5 + 23 = 28", True, id="label-with-number"),
    pytest.param(False, "Attempt #2: 5 + 23 = 28", True, id="label-with-hash-number"),
    # a line with a digit or a sentence mark is no heading: it says the earlier answer was wrong
    pytest.param(False, "23 + 5 = 29 is wrong\n\n5 + 23 = 28", True, id="earlier-equation-called-wrong"),
    pytest.param(False, "Oops, wrong\n5 + 23 = 28", True, id="interjection-with-comma"),
    pytest.param(False, "Not 27\n5 + 23 = 28", True, id="earlier-number-denied"),
    pytest.param(True, "Oops, wrong\n<answer>5 + 23 = 28</answer>", True, id="tags-interjection-with-comma"),
    pytest.param(False, "Wrong answer\n5 + 23 = 28", False, id="plain-heading"),
    pytest.param(False, "Not quite\n\n5 + 23 = 28", False, id="plain-heading-not"),
])
def test_countdown_markdown_structure_white_box(tags, completion, expected):
    """A white-box review of the Markdown structure rules: blanking a restatement dropped the
    number that a word or sign before it acts on (``Then minus 28 = 28`` read as ``Then minus``);
    a table row's last cell ending in a Unicode operator, ``^`` or ``%`` counted as closed; a line
    of marks alone (``___``) hid the denial above it, and the re-check read a mark glued before
    the block (``*<answer>``) as the heading; ``><answer>`` lost its ``>``; a numbered item's
    number, a number in a label and a bare denial chained after a label stopped the label
    reading: all were paid. ``28 = 2 8`` was a restatement."""
    _both_implementations_say(tags, completion, expected)


STANDARD_PLAIN = CountdownTask(answer_tags=False)


@pytest.mark.parametrize("tags,nums,target,completion,expected", [
    # LaTeX's multiplication and division signs and sized parentheses, as larger models write them
    pytest.param(False, [25, 4, 3], 97, "$25 \\times 4 - 3 = 97$", True, id="times-in-dollars"),
    pytest.param(False, [25, 4, 3], 97, "So the answer is $(25 \\cdot 4) - 3 = 97$.", True, id="cdot-sentence"),
    pytest.param(False, [25, 4, 3], 97, "\\[\n\\left( 25 \\times 4 \\right) - 3 = 97\n\\]", True, id="left-right-display"),
    pytest.param(False, [25, 4, 3], 97, "The final answer is: $\\boxed{25 \\times 4 - 3}$", True, id="times-in-boxed"),
    pytest.param(False, [100, 4, 3], 28, "Therefore, \\( 100 \\div 4 + 3 = 28 \\).", True, id="div-inline-math"),
    pytest.param(False, [25, 4, 3], 97, "$$25\\times4-3=97$$", True, id="times-glued"),
    pytest.param(True, [25, 4, 3], 97, "$25 \\times 4 - 3 = 97$\n\n<answer>25 * 4 - 3 = 97</answer>", True,
                 id="tags-times-before-block"),
    # ... read as the ASCII signs, so everything the rule says of those still holds
    pytest.param(False, [25, 4, 3], 97, "$25 \\times 4 - 3 = 98$", False, id="times-wrong-value"),
    pytest.param(False, [25, 4, 3], 97, "$25 \\times 4 \\div 3 = 97$", False, id="div-wrong-value"),
    pytest.param(False, [25, 4, 3], 97, "$2 \\times (25 \\times 4 - 3) = 97$", False, id="times-a-number-not-given"),
    pytest.param(False, [25, 4, 3], 97, "$25 \\times 4 - 3 = 97 \\times 1$", False, id="times-after-the-result"),
    pytest.param(False, [25, 4, 3], 97, "2 \\cdot $25 \\times 4 - 3 = 97$", False, id="cdot-before-dollars"),
    pytest.param(False, [25, 4, 3], 97, "$25 \\times 4 - 3 + \\cdots = 97$", False, id="cdots-is-no-cdot"),
    pytest.param(False, [25, 4, 3], 97, "$25 \\timesx 4 - 3 = 97$", False, id="longer-command"),
    pytest.param(False, [25, 4, 3], 97, "$\\left| 25 \\times 4 - 3 \\right| = 97$", False, id="left-bar"),
    pytest.param(False, [25, 4, 3], 97, "$\\left( 25 \\times 4 - 3 = 97$", False, id="left-unclosed"),
    pytest.param(False, [25, 4, 3], 97, "$25 \\times 4 - 3 \\neq 97$", False, id="times-then-neq"),
    pytest.param(False, [25, 4, 3], 97, "$\\frac{25 \\times 4 - 3}{1} = 97$", False, id="times-in-frac"),
    pytest.param(False, [25, 4, 3], 97, "$25 \\times 4 - 3 = 97$. Then \\div 2.", False, id="div-after"),
    pytest.param(True, [25, 4, 3], 97, "<answer>25 \\times 4 - 3</answer>", False, id="tags-times-inside-block"),
    pytest.param(True, [25, 4, 3], 97, "$2 \\times$ <answer>25 * 4 - 3</answer>", False, id="tags-times-before-block-op"),
    # a Markdown thematic break (a line of three or more of one of - * _) is a rule, not an operator
    pytest.param(False, [5, 23], 28, "5 + 23 = 28\n\n---", True, id="rule-after"),
    pytest.param(False, [5, 23], 28, "5 + 23 = 28\n\n* * *\n\nHope this helps!", True, id="spaced-star-rule-after"),
    pytest.param(False, [5, 23], 28, "Let me think.\n\n___\n5 + 23 = 28", True, id="underscore-rule-before"),
    pytest.param(True, [5, 23], 28, "**Answer:** 5 + 23 = 28\n\n---\n\n<answer>5 + 23 = 28</answer>", True,
                 id="tags-rule-before-block"),
    pytest.param(True, [5, 23], 28, "<answer>5 + 23 = 28</answer>\n\n---", True, id="tags-rule-after-block"),
    # ... blank, so the line above it is read as the line before, and short dashes stay operators
    pytest.param(False, [5, 23], 28, "3 *\n---\n5 + 23 = 28", False, id="operator-above-rule"),
    pytest.param(True, [5, 23], 28, "3 -\n\n---\n\n<answer>5 + 23 = 28</answer>", False, id="tags-operator-above-rule"),
    pytest.param(False, [5, 23], 28, "Wrong answer\n---\n5 + 23 = 28", False, id="denial-heading-above-rule"),
    pytest.param(False, [5, 23], 28, "5 + 23 = 28\n--", False, id="two-dashes-unfinished"),
    pytest.param(False, [5, 23], 28, "5 + 23 = 28\n---\nWrong.", False, id="denial-below-rule"),
    pytest.param(False, [5, 23], 28, "5 + 23 = 28\n- - -\n2", False, id="number-below-rule"),
    pytest.param(True, [5, 23], 28, "<answer>5 + 23 = 28</answer>\n\n---\n\n**Answer:** 27", False,
                 id="tags-other-answer-below-rule"),
    pytest.param(False, [5, 23], 28, "5 + 23 = 28\n---*", False, id="mixed-marks-unfinished"),
    pytest.param(True, [5, 23], 28, "---<answer>5 + 23 = 28</answer>", False, id="tags-dashes-on-the-blocks-line"),
    pytest.param(True, [5, 23], 28, "<answer>5 + 23 = 28</answer> ***", False, id="tags-stars-on-the-blocks-line"),
    # a LaTeX sign reads as one only after an operand: opening a line it would read as a bullet
    pytest.param(False, [25, 4, 3], 97, "\\cdot 25 * 4 - 3 = 97", False, id="cdot-opening-the-line"),
    pytest.param(False, [25, 4, 3], 97, "\\[ \\times 25 * 4 - 3 = 97 \\]", False, id="times-opening-display-math"),
    pytest.param(True, [25, 4, 3], 97, "\\cdot <answer>25 * 4 - 3</answer>", False, id="tags-cdot-before-block"),
    # an operator inside a math or code span that ends the line before (both paid these before)
    pytest.param(False, [25, 4, 3], 97, "$2 \\times$\n25 * 4 - 3 = 97", False, id="times-span-ends-line-before"),
    pytest.param(False, [25, 4, 3], 97, "$2 *$\n25 * 4 - 3 = 97", False, id="star-span-ends-line-before"),
    pytest.param(False, [25, 4, 3], 97, "`2 *`\n25 * 4 - 3 = 97", False, id="code-span-ends-line-before"),
    pytest.param(True, [25, 4, 3], 97, "$2 \\cdot$\n\n<answer>25 * 4 - 3</answer>", False, id="tags-cdot-span-line-before"),
    pytest.param(True, [25, 4, 3], 97, "`2 -`\n<answer>25 * 4 - 3</answer>", False, id="tags-code-span-line-before"),
    pytest.param(True, [25, 4, 3], 97, "$2 \\cdot$\n\n---\n\n<answer>25 * 4 - 3</answer>", False,
                 id="tags-cdot-span-above-rule"),
    pytest.param(False, [25, 4, 3], 97, "We need $97$.\n25 * 4 - 3 = 97", True, id="number-span-ends-line-before"),
    pytest.param(True, [25, 4, 3], 97, "$\\boxed{25 \\times 4 - 3 = 97}$\n\n<answer>25 * 4 - 3</answer>", True,
                 id="tags-boxed-span-line-before"),
    pytest.param(True, [25, 4, 3], 97, "$\\cancel{25 - 4 - 3}$\n\n<answer>25 * 4 - 3</answer>", True,
                 id="tags-brace-span-line-before"),
    pytest.param(True, [25, 4, 3], 97, "Using `25`, `4` and `3`:\n<answer>25 * 4 - 3</answer>", True,
                 id="tags-code-spans-line-before"),
    # (review) LaTeX's spaces are spaces, no clause mark hiding a denial or supposition before them
    pytest.param(False, [25, 4, 3], 97, "$\\text{wrong} \\; 25 \\times 4 - 3 = 97$", False,
                 id="wrong-latex-semicolon-space"),
    pytest.param(False, [25, 4, 3], 97, "Wrong \\quad 25 \\times 4 - 3 = 97", False, id="wrong-quad"),
    pytest.param(False, [25, 4, 3], 97, "$\\mathrm{not}\\,25 \\times 4 - 3 = 97$", False, id="not-thin-space"),
    pytest.param(False, [25, 4, 3], 97, "$\\text{if} \\qquad 25 \\times 4 - 3 = 97$", False, id="if-qquad"),
    pytest.param(True, [25, 4, 3], 97, "wrong \\; <answer>25 * 4 - 3</answer>", False, id="tags-wrong-latex-space"),
    pytest.param(False, [25, 4, 3], 97, "So \\quad $25 \\times 4 - 3 = 97$", True, id="quad-before-right-answer"),
    # (review) ... and its style switches, which show nothing, hide nothing before them either
    pytest.param(False, [25, 4, 3], 97, "Wrong: $\\displaystyle 25 \\times 4 - 3 = 97$", False, id="wrong-displaystyle"),
    pytest.param(False, [25, 4, 3], 97, "2 \\times $\\displaystyle 25 \\times 4 - 3 = 97$", False, id="times-displaystyle"),
    pytest.param(False, [25, 4, 3], 97, "If \\(\\textstyle 25 \\times 4 - 3 = 97\\)", False, id="if-textstyle"),
    pytest.param(False, [25, 4, 3], 97, "Not \\enspace 25 * 4 - 3 = 97", False, id="not-enspace"),
    pytest.param(True, [25, 4, 3], 97, "Wrong: $\\displaystyle$ <answer>25 * 4 - 3</answer>", False,
                 id="tags-wrong-displaystyle"),
    pytest.param(False, [25, 4, 3], 97, "$\\displaystyle 25 \\times 4 - 3 = 97$", True, id="displaystyle-right"),
    # (review) dashes right under a line of text make it a Markdown (setext) heading, a denial there too
    pytest.param(False, [25, 4, 3], 97, "This answer is definitely wrong\n---\n25 * 4 - 3 = 97", False,
                 id="setext-denial-heading"),
    pytest.param(False, [25, 4, 3], 97, "The following is not the answer\n---\n$25 \\times 4 - 3 = 97$", False,
                 id="setext-not-heading"),
    pytest.param(True, [25, 4, 3], 97, "Here is a wrong attempt\n---\n<answer>25 * 4 - 3</answer>", False,
                 id="tags-setext-denial-heading"),
    pytest.param(False, [25, 4, 3], 97, "This answer is definitely wrong\r\n---\r\n25 * 4 - 3 = 97", False,
                 id="setext-denial-heading-crlf"),
    pytest.param(True, [25, 4, 3], 97, "This is a wrong one\r\n---\r\n<answer>25 * 4 - 3</answer>", False,
                 id="tags-setext-denial-heading-crlf"),
    pytest.param(False, [25, 4, 3], 97, "The final answer\n---\n25 * 4 - 3 = 97", True, id="setext-answer-heading"),
    pytest.param(False, [25, 4, 3], 97, "25 * 4 - 3 = 97\n---", True, id="setext-equation-heading"),
    pytest.param(True, [25, 4, 3], 97, "**Answer:** 25 * 4 - 3 = 97\n---\n<answer>25 * 4 - 3</answer>", True,
                 id="tags-setext-answer-heading"),
    # (review) a function's name before \left( is another operation, as before a parenthesis
    pytest.param(False, [25, 4, 3], 97, "$\\arctan \\left(25 \\times 4 - 3\\right) = 97$", False, id="arctan-left"),
    pytest.param(False, [25, 4, 3], 97, "$\\sinh \\left( 25 \\times 4 - 3 \\right) = 97$", False, id="sinh-left"),
    pytest.param(False, [25, 4, 3], 97, "$\\det (25 * 4 - 3) = 97$", False, id="det-parenthesis"),
    pytest.param(True, [25, 4, 3], 97, "\\cot \\left( <answer>25 * 4 - 3</answer> \\right)", False, id="tags-cot-left"),
])
def test_countdown_latex_operators_and_thematic_breaks_larger_models_write(tags, nums, target, completion, expected):
    """A fuzz of how 1.5B-8B models write Countdown answers found both implementations refusing
    right final equations in LaTeX (``$25 \\times 4 - 3 = 97$``, ``\\left( ... \\right)``,
    ``\\boxed{25 \\times 4 - 3}``, ``\\div``, ``\\cdot``: read as the words "times", "div", "cdot"
    or a backslash next to it) and around a Markdown thematic break (``---`` after the equation
    read as an unfinished operation, above an answer block as an operator ending the line before).
    Both now read as a person sees them; with tags, the block itself must still be bare. The same
    fuzz found both paying an operator inside a math or code span that ends the line before the
    equation or block (``$2 \\times$`` then ``25 * 4 - 3 = 97``): it continues that line too."""
    task = (CD if tags else STANDARD_PLAIN)
    ex = {"nums": nums, "target": target}
    assert task.verify(ex, completion) is expected, task.diagnose(ex, completion)
    assert recheck(task, ex, completion)[0] is expected


@pytest.mark.parametrize("tags,completion,expected", [
    # any LaTeX command that is no operator or denial word, between a denial, supposition or
    # operation and the equation, is read past as a blank (it stopped the reading: paid)
    pytest.param(False, "Wrong: $\\mathbf 25 \\times 4 - 3 = 97$", False, id="wrong-mathbf"),
    pytest.param(True, "Wrong: $\\mathbf <answer>25 * 4 - 3 = 97</answer>$", False, id="tags-wrong-mathbf"),
    pytest.param(False, "Wrong: $\\large 25 \\times 4 - 3 = 97$", False, id="wrong-large"),
    pytest.param(True, "Wrong: \\large <answer>25 * 4 - 3</answer>", False, id="tags-wrong-large"),
    pytest.param(False, "Wrong: $\\therefore 25 \\times 4 - 3 = 97$", False, id="wrong-therefore"),
    pytest.param(True, "Wrong: $\\therefore <answer>25 * 4 - 3 = 97</answer>$", False, id="tags-wrong-therefore"),
    pytest.param(False, "Wrong: $\\bf 25 \\times 4 - 3 = 97$", False, id="wrong-bf"),
    pytest.param(False, "Wrong: $\\Large \\mathrm 25 \\times 4 - 3 = 97$", False, id="wrong-two-commands"),
    pytest.param(False, "Incorrect: \\Rightarrow 25 * 4 - 3 = 97", False, id="incorrect-rightarrow"),
    pytest.param(False, "This is not right \\implies 25 * 4 - 3 = 97", False, id="not-right-implies"),
    pytest.param(True, "This is not right \\implies <answer>25 * 4 - 3</answer>", False, id="tags-not-implies"),
    pytest.param(False, "Not \\because 25 * 4 - 3 = 97", False, id="not-because"),
    pytest.param(False, "If \\mathbf \\Large 25 * 4 - 3 = 97", False, id="if-two-commands"),
    pytest.param(False, "2 * \\mathbf 25 * 4 - 3 = 97", False, id="times-mathbf"),
    pytest.param(True, "2 * \\boldsymbol <answer>25 * 4 - 3</answer>", False, id="tags-times-boldsymbol"),
    pytest.param(False, "Wrong: \\bf \\boxed{25 \\times 4 - 3 = 97}", False, id="wrong-bf-boxed"),
    # ... in a label, past a label's colon, ending the line before (a heading or an operator)
    pytest.param(False, "Wrong \\bf answer: 25 * 4 - 3 = 97", False, id="label-word-bf"),
    pytest.param(False, "Wrong: \\bf Answer: 25 * 4 - 3 = 97", False, id="chained-label-bf"),
    pytest.param(True, "Wrong: \\bf Answer: <answer>25 * 4 - 3</answer>", False, id="tags-chained-label-bf"),
    pytest.param(False, "Wrong: \\bf\n25 * 4 - 3 = 97", False, id="heading-bf-line-before"),
    pytest.param(False, "2 * \\bf\n25 * 4 - 3 = 97", False, id="operator-bf-line-before"),
    pytest.param(True, "2 *\n\\mathbf <answer>25 * 4 - 3</answer>", False, id="tags-operator-line-before-mathbf"),
    # ... and an operator or denial command is still read as its word, past the others
    pytest.param(False, "\\sqrt \\mathbf 25 * 4 - 3 = 97", False, id="sqrt-past-mathbf"),
    # ... in the four words before it, which read on past commands and TeX's "$" (no words)
    pytest.param(False, "Not \\mathbf so 25 * 4 - 3 = 97", False, id="not-mathbf-word"),
    pytest.param(False, "If $\\huge so 25 \\times 4 - 3 = 97$", False, id="if-dollar-huge-word"),
    pytest.param(True, "sqrt $\\noindent thus <answer>25 * 4 - 3</answer>$", False, id="tags-sqrt-dollar-word"),
    # ... and LaTeX's \not ending the line before draws its solidus over the equation
    pytest.param(False, "**Incorrect:** \\not\n25 * 4 - 3 = 97", False, id="not-ending-line-before"),
    pytest.param(True, "2 * \\not\n<answer>25 * 4 - 3</answer>", False, id="tags-not-ending-line-before"),
    pytest.param(False, "$\\neg$ $\\mathbf 25 \\times 4 - 3 = 97$", False, id="neg-past-mathbf"),
    # a one-letter function (or variable) before the parenthesis that opens it: an argument
    pytest.param(False, "f (25 * 4 - 3) = 97", False, id="function-f-spaced"),
    pytest.param(False, "So f (25 * 4 - 3) = 97", False, id="function-f-after-prose"),
    pytest.param(False, "$f \\left( 25 \\times 4 - 3 \\right) = 97$", False, id="function-f-left"),
    pytest.param(False, "g $(25 \\times 4 - 3) = 97$", False, id="function-g-dollar"),
    pytest.param(False, "f \\boxed{(25 \\times 4 - 3)}", False, id="function-f-boxed"),
    pytest.param(True, "f <answer>(25 * 4 - 3)</answer>", False, id="tags-function-f"),
    # a tag question ending its sentence, at any distance, a "?" after an ellipsis, and ", right?"
    # opening the line after a display block
    pytest.param(False, "25 * 4 - 3 = 97 is my final answer, right?", False, id="tag-question-far"),
    pytest.param(True, "<answer>25 * 4 - 3 = 97</answer> is what I get in the end, correct?", False,
                 id="tags-tag-question-far"),
    pytest.param(False, "25 * 4 - 3 = 97 (using all three numbers), is that right?", False, id="tag-question-parens"),
    pytest.param(False, "25 * 4 - 3 = 97, right...?", False, id="ellipsis-question"),
    pytest.param(False, "25 * 4 - 3 = 97... right?", False, id="ellipsis-pause-question"),
    pytest.param(True, "<answer>25 * 4 - 3 = 97</answer> is what I get... right?", False, id="tags-ellipsis-tag-question"),
    pytest.param(False, "25 * 4 - 3 = 97!?", False, id="interrobang-marks"),
    pytest.param(False, "$$\n25 \\times 4 - 3 = 97\n$$\n, right?", False, id="comma-line-after-display"),
    pytest.param(True, "$$\n<answer>25 * 4 - 3 = 97</answer>\n$$\n, right?", False, id="tags-comma-line-after-display"),
    # ... while these stay right: a command with no denial, a one-letter word, a question that
    # is no tag or in a later sentence, an ellipsis that ends the sentence
    pytest.param(False, "$\\therefore 25 \\times 4 - 3 = 97$", True, id="therefore-right"),
    pytest.param(False, "We get \\Rightarrow 25 * 4 - 3 = 97", True, id="rightarrow-right"),
    pytest.param(True, "Answer: \\bf <answer>25 * 4 - 3</answer>", True, id="tags-bf-right"),
    pytest.param(False, "Wrong before. \\mathbf 25 * 4 - 3 = 97", True, id="denial-earlier-sentence-mathbf"),
    pytest.param(False, "(a) 25 * 4 - 3 = 97", True, id="item-a"),
    pytest.param(False, "So (25 * 4 - 3) = 97", True, id="prose-before-parenthesis"),
    pytest.param(False, "It's (25 * 4 - 3) = 97", True, id="possessive-s-before-parenthesis"),
    pytest.param(False, "25 * 4 - 3 = 97, which uses all of the given numbers once?", True, id="question-no-tag"),
    pytest.param(False, "25 * 4 - 3 = 97. Right? Yes.", True, id="question-later-sentence"),
    pytest.param(False, "25 * 4 - 3 = 97... and that is it.", True, id="ellipsis-statement"),
    pytest.param(False, "So, the answer is 25 * 4 - 3 = 97.", True, id="comma-before"),
])
def test_countdown_latex_commands_functions_and_tag_questions(tags, completion, expected):
    """A review of the LaTeX reading found both implementations paying what they refuse without the
    markup: a denial, supposition or operation before a LaTeX command other than the spaces and
    style switches read as blanks (``Wrong: $\\mathbf 25 \\times 4 - 3 = 97$``, ``\\large``,
    ``\\therefore``, ``\\implies``: the word windows stopped at the backslash); a one-letter function
    applied to the equation with a blank before its parenthesis (``f (25 * 4 - 3) = 97``, refused
    glued); and a question ending its sentence as a tag more than four words on (``... is my final
    answer, right?``), after an ellipsis (``right...?``) or on the line after a display block
    (``$$`` then ``, right?``)."""
    task = CD if tags else STANDARD_PLAIN
    ex = {"nums": [25, 4, 3], "target": 97}
    assert task.verify(ex, completion) is expected, task.diagnose(ex, completion)
    assert recheck(task, ex, completion)[0] is expected


@pytest.mark.parametrize("tags,completion,expected", [
    # LaTeX's negated relations deny the equation as their Unicode sign does ("\u2260 ..." is refused)
    pytest.param(False, "\\ne 25 * 4 - 3 = 97", False, id="latex-ne"),
    pytest.param(False, "$\\neq 25 \\times 4 - 3 = 97$", False, id="latex-neq"),
    pytest.param(True, "\\nRightarrow <answer>25 * 4 - 3 = 97</answer>", False, id="tags-latex-nrightarrow"),
    # ... and relations, brackets and operators change it as theirs do ("\u223c", "\u230a", "\u2261")
    pytest.param(False, "\\sim 25 * 4 - 3 = 97", False, id="latex-sim"),
    pytest.param(False, "$\\lfloor 25 \\times 4 - 3 = 97$", False, id="latex-lfloor"),
    pytest.param(True, "\\equiv <answer>25 * 4 - 3 = 97</answer>", False, id="tags-latex-equiv"),
    # a denial label in braces, brackets or TeX's "$" before its colon
    pytest.param(False, "\\text{Wrong}: 25 * 4 - 3 = 97", False, id="label-text-braces"),
    pytest.param(False, "$\\textbf{Incorrect answer}$: 25 * 4 - 3 = 97", False, id="label-textbf-dollar"),
    pytest.param(True, "\\mathrm{wrong}: <answer>25 * 4 - 3 = 97</answer>", False, id="tags-label-mathrm"),
    pytest.param(False, "[Wrong]: 25 * 4 - 3 = 97", False, id="label-brackets"),
    pytest.param(False, "\\textbf{Wrong}: \\textbf{Answer}: 25 * 4 - 3 = 97", False, id="label-chained-textbf"),
    # ... and a denial or supposition in a LaTeX group or brackets among the four words before it
    pytest.param(False, "\\text{Wrong} is 25 * 4 - 3 = 97", False, id="window-text-braces"),
    pytest.param(True, "$\\text{If} we take <answer>25 * 4 - 3 = 97</answer>$", False, id="tags-window-text-if"),
    pytest.param(False, "{\\bf Not} so 25 * 4 - 3 = 97", False, id="window-bf-group"),
    pytest.param(False, "[Not] so 25 * 4 - 3 = 97", False, id="window-brackets"),
    # a dash that starts the line glued to a LaTeX command is a minus sign, no list bullet
    pytest.param(False, "-\\bf 25 * 4 - 3 = 97", False, id="line-dash-bf"),
    pytest.param(True, "-\\mathbf <answer>25 * 4 - 3 = 97</answer>", False, id="tags-line-dash-mathbf"),
    # a one-letter function past a LaTeX command before its parenthesis
    pytest.param(False, "f \\bf (25 * 4 - 3) = 97", False, id="function-past-bf"),
    pytest.param(True, "g \\mathbf (<answer>25 * 4 - 3 = 97</answer>)", False, id="tags-function-past-mathbf"),
    # a tag question after a colon, an opening parenthesis or an ASCII dash
    pytest.param(False, "25 * 4 - 3 = 97 is my final answer -- right?", False, id="tag-after-double-hyphen"),
    pytest.param(False, "25 * 4 - 3 = 97 is my final answer - right?", False, id="tag-after-spaced-hyphen"),
    pytest.param(True, "<answer>25 * 4 - 3 = 97</answer> is my final answer (right?)", False, id="tags-tag-in-parens"),
    pytest.param(False, "25 * 4 - 3 = 97 is my final answer: right?", False, id="tag-after-colon"),
    # with tags, an answer block struck through by HTML, as the equation is without them
    pytest.param(True, "<del><answer>25 * 4 - 3 = 97</answer></del>", False, id="tags-struck-del"),
    pytest.param(True, "<s>Answer: <answer>25 * 4 - 3 = 97</answer></s>", False, id="tags-struck-s"),
    pytest.param(True, "<STRIKE> <answer>25 * 4 - 3 = 97</answer> </STRIKE>", False, id="tags-struck-strike"),
    pytest.param(False, "<del>25 * 4 - 3 = 97</del>", False, id="struck-del"),
    # ... while these stay right
    pytest.param(False, "\\text{Answer}: 25 * 4 - 3 = 97", True, id="label-text-answer-right"),
    pytest.param(True, "[Final answer]: <answer>25 * 4 - 3 = 97</answer>", True, id="tags-label-brackets-right"),
    pytest.param(False, "$\\text{So} the answer is 25 \\times 4 - 3 = 97$", True, id="window-text-so-right"),
    pytest.param(False, "- 25 * 4 - 3 = 97", True, id="list-bullet-right"),
    pytest.param(False, "\\Rightarrow 25 * 4 - 3 = 97", True, id="rightarrow-still-right"),
    pytest.param(False, "25 * 4 - 3 = 97 is my answer -- it uses each number once.", True, id="double-hyphen-statement"),
    pytest.param(False, "25 * 4 - 3 = 97 (each number once).", True, id="parenthesis-statement"),
    pytest.param(True, "<s>First try</s> <answer>25 * 4 - 3 = 97</answer>", True, id="tags-struck-before-right"),
])
def test_countdown_latex_relations_braced_labels_and_more_tag_marks(tags, completion, expected):
    """A second review of the LaTeX reading found both implementations paying: LaTeX's negated
    relations, relations and brackets before the equation (``\\ne``, ``\\nRightarrow``, ``\\sim``,
    ``\\lfloor``, ``\\equiv``: read as blanks where their Unicode signs are refused), a denial label
    whose word is in braces, brackets or ``$`` (``\\text{Wrong}: ...``: the label reading stopped at
    the ``}``), a denial or supposition in braces or brackets among the four words before it
    (``\\text{If} we take ...``: so did the word window), a dash starting the line glued to a command read as a list bullet (``-\\bf 25 ...``),
    a one-letter function with a command before its parenthesis (``f \\bf (...)``), and tag questions
    after ``--``, `` - ``, ``(`` or ``:`` (``... is my final answer -- right?``); and, with tags, an
    answer block struck through by ``<del>``, ``<s>`` or ``<strike>`` (struck text is no answer
    without tags)."""
    task = CD if tags else STANDARD_PLAIN
    ex = {"nums": [25, 4, 3], "target": 97}
    assert task.verify(ex, completion) is expected, task.diagnose(ex, completion)
    assert recheck(task, ex, completion)[0] is expected


# ---------------------------------------------------------------------------------------
# found by mutation (round 8): option helpers, record files, the registry's one-line errors
# ---------------------------------------------------------------------------------------
def test_option_helpers_take_cli_spellings_and_refuse_the_rest(tmp_path):
    """Each option helper at its bounds and with the spellings a CLI or a JSON config passes:
    a bound is inclusive, 3.0 is the integer 3 (3.5 is refused, never truncated), NaN and booleans
    are not numbers, a choice is read case-insensitively and stored as the canonical name, a path
    may be a ``Path``, n=0 asks for no examples, and a blank retry prompt is refused."""
    from r3.tasks.base import check_n, opt_bool, opt_choice, opt_float, opt_int, opt_path

    assert opt_int("k", 5, lo=5, hi=5) == 5 and opt_int("k", "5", lo=1, hi=5) == 5
    with pytest.raises(R3Error, match="option k: must be <= 5, got 6"):
        opt_int("k", 6, hi=5)
    assert opt_int("k", 3.0) == 3 and type(opt_int("k", 3.0)) is int
    with pytest.raises(R3Error, match="option k: expected an integer, got 3.5"):
        opt_int("k", 3.5)
    assert opt_float("f", 1, lo=0.0, hi=1.0) == 1.0
    for bad in (float("nan"), "nan", True):
        with pytest.raises(R3Error, match="option f: "):
            opt_float("f", bad, lo=0.0, hi=1.0)
    with pytest.raises(R3Error, match="test_fraction"):
        tasks.get("countdown", test_fraction="nan")
    assert [opt_bool("b", v) for v in ("off", " ON ", "No", "yes", 0, 1, True)] == [False, True, False, True,
                                                                                   False, True, True]
    for bad in (2, -1, "maybe"):
        with pytest.raises(R3Error, match="option b: expected true or false"):
            opt_bool("b", bad)
    assert opt_choice("c", " Easy ", ("easy", "standard")) == "easy"
    assert tasks.get("countdown", difficulty="EASY").difficulty == "easy"
    f = tmp_path / "cd.jsonl"
    f.write_text('{"target": 5, "nums": [1, 4]}\n')
    assert opt_path("p", f) == str(f) and opt_path("p", None) is None
    assert tasks.get("countdown", data_path=f).data_path == str(f)
    assert check_n(0) == 0 and check_n("3") == 3 and check_n(None) is None
    assert CountdownTask().examples("train", n=0) == []
    with pytest.raises(R3Error, match="option n: must be >= 0"):
        check_n(-1)
    with pytest.raises(R3Error, match="option retry_prompt: must not be empty"):
        tasks.get("countdown", retry_prompt=" \n")


def test_an_option_path_must_be_a_file_and_a_false_spelling_may_carry_blanks(tmp_path):
    """A directory as data_path is refused when the task is built (it passed, and failed later,
    when the task first read it); " false " and " Off " read as False as " ON " reads as True."""
    from r3.tasks.base import opt_bool, opt_path

    with pytest.raises(R3Error, match="option p: no such file: "):
        opt_path("p", tmp_path)
    with pytest.raises(R3Error, match="option data_path: no such file"):
        tasks.get("countdown", data_path=str(tmp_path))
    assert [opt_bool("b", v) for v in (" false ", " Off\n", "\t0 ")] == [False, False, False]


def test_long_verifier_errors_are_cut_to_one_short_reason(verifier_errors):
    """A verifier's exception text may be huge (a whole completion in a KeyError): the reason
    diagnose() gives and the first error the warning line quotes are each cut to 300 characters."""
    from r3.tasks.base import passes, verifier_error_counts

    class Huge(Task):
        name = "huge"

        def _check(self, example, completion_text):
            raise KeyError("x" * 1000)

    t = Huge()
    assert len(t.diagnose({}, "a")) == 300 and t.diagnose({}, "a").startswith("verifier error: KeyError: 'xxx")
    assert passes(t, {}, "a") is False
    n, calls, first = verifier_error_counts(t)
    assert (n, calls) == (1, 1) and len(first) == 300 and first.startswith("KeyError: 'xxx")
    verifier_errors.clear()


def test_one_failed_verdict_is_one_completion(capsys, verifier_errors):
    from r3.tasks.base import passes, warn_verifier_errors

    t = _Raises()
    assert [passes(t, {}, "fine"), passes(t, {}, "boom")] == [False, False]
    assert warn_verifier_errors(t, "in step 1") == 1
    assert capsys.readouterr().err == ("warning: the task's verifier failed on 1 completion in step 1; they count "
                                       "as wrong (first: ValueError: bad field)\n")
    verifier_errors.clear()


def test_stop_strings_of_a_plugin():
    """A plug-in's stop_strings may be missing, None or a list: always a tuple."""
    from types import SimpleNamespace

    from r3.tasks.base import stop_strings_of

    assert stop_strings_of(SimpleNamespace()) == () and stop_strings_of(SimpleNamespace(stop_strings=None)) == ()
    assert stop_strings_of(SimpleNamespace(stop_strings=["</a>"])) == ("</a>",)


def test_config_lists_the_options_the_constructors_declare_with_the_nearest_default():
    """A subclass whose __init__ takes no **kw declares only its own options (the base class's
    prompts are not options of it: config() must rebuild it through get()), and an option both a
    class and its base declare has the subclass's default."""
    from r3.tasks.base import option_defaults

    sys.path.insert(0, str(Path(__file__).parent / "helpers"))
    try:
        from r3_test_tasks import KeywordsTask
    finally:
        sys.path.remove(str(Path(__file__).parent / "helpers"))

    class Fixed(Task):
        name = "fixed"

        def __init__(self, *, word="hi"):
            super().__init__()
            self.word = word

    class Sub(KeywordsTask):
        def __init__(self, *, data_path="sub.jsonl", **kw):
            super().__init__(data_path=data_path, **kw)

    assert Fixed.option_names() == ["word"] and Fixed().config() == {"word": "hi"}
    assert option_defaults(Sub)["data_path"] == "sub.jsonl" and Sub().config()["data_path"] == "sub.jsonl"


def test_a_reasoning_block_ends_after_its_first_closing_tag():
    from r3.tasks.base import leading_reasoning_end

    assert leading_reasoning_end("<think>a</think>b</think>c") == len("<think>a</think>")
    assert leading_reasoning_end("  <think>a</think>") == len("  <think>a</think>")
    assert leading_reasoning_end("a <think>b</think>") == 0 and leading_reasoning_end("<think>a") is None


def test_config_writes_an_option_default_that_is_not_json_as_its_text():
    """Run metadata is JSON: an option whose default is a Path (kept by no attribute) is written as
    its text, not as the Path that json.dumps refuses."""

    class PathTask(Task):
        name = "path-task"

        def __init__(self, *, where=Path("a") / "b.txt", **kw):
            super().__init__(**kw)

    config = PathTask().config()
    assert config["where"] == str(Path("a") / "b.txt") and json.loads(json.dumps(config)) == config


def test_the_hash_split_and_the_seeded_shuffle_are_pinned():
    """Which side of the split a record falls on must never change between versions (a resumed run
    or a later evaluation would see training examples in its test split): pinned values. The shuffle's
    tag makes lists shuffled under other tags independent."""
    from r3.tasks.base import in_test_split, shuffled_prefix, stable_unit

    assert stable_unit("split", 0, "x") == 0.8024961669719339
    assert [int(in_test_split(("countdown", i), split_seed=0, test_fraction=0.5)) for i in range(16)] == \
        [1, 0, 0, 1, 1, 1, 0, 1, 1, 0, 1, 1, 1, 1, 0, 0]
    items = list(range(10))
    assert shuffled_prefix(items, None, 0, "a") == [8, 6, 2, 1, 4, 7, 3, 0, 9, 5]
    assert shuffled_prefix(items, None, 0, "b") == [4, 8, 3, 5, 1, 7, 6, 2, 9, 0]


def test_record_files_in_each_accepted_shape(tmp_path):
    """read_records: a {"data": [...]} wrapper (one key only: two lists are not guessed between), a
    .json file holding JSONL, JSON nested too deeply (one line, not a RecursionError), and parquet
    rows numbered from 1 like JSON records."""
    from r3.tasks.base import read_records

    rows = [{"target": 5, "nums": [1, 4]}, {"target": 3, "nums": [1, 2]}]
    p = tmp_path / "w.json"
    p.write_text(json.dumps({"data": rows}))
    assert list(read_records(str(p))) == [(f"{p}, record 1", rows[0]), (f"{p}, record 2", rows[1])]
    p.write_text(json.dumps({"train": rows, "test": rows}))
    with pytest.raises(R3Error, match=r"w\.json: expected a JSON list of records \(or JSONL\), got dict"):
        list(read_records(str(p)))
    p.write_text("\n".join(json.dumps(r) for r in rows))
    assert list(read_records(str(p))) == [(f"{p}, line 1", rows[0]), (f"{p}, line 2", rows[1])]
    p.write_text("[" * 100_000)
    with pytest.raises(R3Error, match=r"w\.json: JSON nested too deeply"):
        list(read_records(str(p)))
    pq = pytest.importorskip("pyarrow.parquet")
    import pyarrow as pa

    q = tmp_path / "cd.parquet"
    pq.write_table(pa.Table.from_pylist(rows), str(q))
    assert list(read_records(str(q))) == [(f"{q}, row 1", rows[0]), (f"{q}, row 2", rows[1])]


_REGISTRY_PLUGIN = '''
import types
from r3.tasks import Task


class Holder:
    class Inner(Task):
        name = "inner"

        def examples(self, split="train", n=None, seed=0):
            return [{"a": 1}]

        def messages(self, example):
            return []

        def _check(self, example, completion_text):
            return True, ""


class FixedSize(Holder.Inner):
    def __init__(self, **kw):
        super().__init__(reflection_prompt="Why?", **kw)


class Buggy(Holder.Inner):
    def __init__(self, **kw):
        super().__init__(colour="red", **kw)


def bare(**kw):
    return types.SimpleNamespace(examples=lambda *a: [], messages=lambda ex: [])
'''


def test_the_registrys_one_line_errors(tmp_path, monkeypatch):
    """A dotted class inside the module is found; every unknown option is named; a missing required
    option, an option the plug-in also sets itself and a factory that builds no task are each one
    R3Error; an object with only some of a task's methods is not taken for a built task; and a
    plug-in's own bad keyword (not one the user passed) stays its TypeError, not blamed on the user."""
    from types import SimpleNamespace

    (tmp_path / "r3_test_registry_mod.py").write_text(_REGISTRY_PLUGIN)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.syspath_prepend(str(Path(__file__).parent / "helpers"))
    assert tasks.get("r3_test_registry_mod:Holder.Inner").name == "inner"
    with pytest.raises(R3Error, match=r"unknown options colour, size for task 'countdown'; valid options:"):
        tasks.get("countdown", colour="red", size=3)
    with pytest.raises(R3Error, match=r"task 'r3_test_tasks:FileCoinTask': bad options: .*'data_path'"):
        tasks.get("r3_test_tasks:FileCoinTask")
    with pytest.raises(R3Error, match=r"task 'r3_test_registry_mod:FixedSize': bad options: .*multiple values for "
                                      r"keyword argument 'reflection_prompt'"):
        tasks.get("r3_test_registry_mod:FixedSize", reflection_prompt="How?")
    with pytest.raises(R3Error, match=r"the object built lacks verify, reflection_prompt, retry_prompt; subclass"):
        tasks.get("r3_test_registry_mod:bare")
    with pytest.raises(R3Error, match="task name must be a non-empty string"):
        tasks.get(SimpleNamespace(examples=None, messages=None, verify=None))
    with pytest.raises(R3Error, match="task name must be a non-empty string, got ' '"):
        tasks.get(" ")
    with pytest.raises(TypeError, match="colour"):
        tasks.get("r3_test_registry_mod:Buggy")


def test_a_jsonl_record_holding_a_unicode_line_separator_is_one_record(tmp_path):
    """JSON strings hold U+2028, U+2029 and U+0085 as they are (json.dumps(ensure_ascii=False)
    writes them so, as do most tools): str.splitlines() cut such a record in two and refused a
    valid file as not valid JSON. Windows line ends are still one line end."""
    from r3.tasks.base import read_records

    rows = [{"query": "a\u2028b\u2029c\x85d", "n": 1}, {"query": "e", "n": 2}]
    for name, end in (("d.jsonl", "\n"), ("d.json", "\n"), ("w.jsonl", "\r\n")):
        p = tmp_path / name
        p.write_bytes("".join(json.dumps(r, ensure_ascii=False) + end for r in rows).encode("utf-8"))
        assert list(read_records(str(p))) == [(f"{p}, line 1", rows[0]), (f"{p}, line 2", rows[1])]


def test_a_one_record_jsonl_file_by_any_spelling_of_its_extension(tmp_path):
    """The format is chosen by the extension, in any case: a one-line .ndjson or .JSONL file is one
    JSONL record (read as one JSON document it was an object, not a list, and refused; as
    JSON a {"rows": [...]}-shaped record was even taken for a wrapper of records)."""
    from r3.tasks.base import read_records

    rec = {"rows": [1, 2]}
    for name in ("one.ndjson", "ONE.JSONL", "One.NDJSON"):
        p = tmp_path / name
        p.write_text(json.dumps(rec) + "\n")
        assert list(read_records(str(p))) == [(f"{p}, line 1", rec)]


def test_examples_of_names_the_split_file_and_the_example_id():
    """A bad example of the test split is named with the test data file it came from and its id."""
    from r3.tasks import examples_of

    class Filed(_Raises):
        data_path, test_data_path = "train.jsonl", "test.jsonl"

        def examples(self, split="train", n=None, seed=0):
            return [{"id": f"{split}-7", "a": "x"}]

        def check_example(self, where, example):
            raise R3Error(f"{where}: field 'a' must be an integer")

    for split, file in (("train", "train.jsonl"), ("test", "test.jsonl")):
        with pytest.raises(R3Error, match=rf"^task 'raises' \({file}\): {split} example 1 \(id '{split}-7'\): field"):
            examples_of(Filed(), split)


def test_the_default_task_is_the_one_the_readme_describes():
    """countdown-tiny, the README's task and the setting of its results: 90 held-out queries, two
    numbers, and a plain prompt that names both numbers, the target, and + or - as the operations."""
    t = tasks.get("countdown-tiny")
    test = t.examples("test")
    assert len(test) == 90 and len(t.examples("train")) == 600
    assert all(len(e["nums"]) == 2 for e in test) and t.ops == "+-"
    prompt = t.messages({"nums": [8, 3], "target": 5})[-1]["content"]
    assert "8" in prompt and "3" in prompt and "5" in prompt and "+ or -" in prompt and "<answer>" not in prompt


def test_check_option_names_raises_what_get_would_without_building():
    from r3.tasks import check_option_names

    check_option_names("Countdown-Tiny", {"max_num": 5})
    check_option_names(CountdownTask(), {})  # a built task: nothing to check
    with pytest.raises(R3Error, match="unknown option colour for task 'countdown'"):
        check_option_names("countdown-tiny", {"colour": "red"})
    with pytest.raises(R3Error, match="unknown task 'countdwn'"):
        check_option_names("countdwn", {})



def test_data_and_config_files_with_a_byte_order_mark_are_read(tmp_path):
    """Files saved by Windows tools often start with a UTF-8 byte-order mark: task data, benchmark
    data and a config file are read as without it (the BOM made the first line "not valid JSON")."""
    from r3.config import parse_args
    from r3.evals.data import read_records as read_eval_records
    from r3.tasks.base import read_records

    rows = [{"target": 5, "nums": [1, 4]}, {"target": 3, "nums": [1, 2]}]
    for name, text in [("d.jsonl", "\n".join(json.dumps(r) for r in rows)), ("d.json", json.dumps(rows))]:
        p = tmp_path / name
        p.write_bytes(b"\xef\xbb\xbf" + text.encode())
        assert [r for _, r in read_records(str(p))] == rows
        assert read_eval_records(p) == rows
    cfg = tmp_path / "c.json"
    cfg.write_bytes(b"\xef\xbb\xbf" + json.dumps({"lr": 3e-6}).encode())
    assert parse_args(["--config", str(cfg)]).lr == 3e-6


# ---------------------------------------------------------------------------------------
# the problem side, found by mutation (solver edges, generator options, file rows)
# ---------------------------------------------------------------------------------------
def test_solver_finds_targets_reached_only_through_fractions():
    """The float pre-filter of the generator reads each fractional sub-result as a float: targets
    reached only through one are found (the classic 24s: 5 * (5 - 1 / 5), 8 / (3 - 8 / 3)). With "/"
    alone three numbers x, y, z reach x * z / y and x / (y * z): 3 * 4 / 6 = 2 and 4 * 6 / 3 = 8."""
    assert reachable_targets([1, 5, 5, 5], lo=24, hi=24) == [24]
    assert reachable_targets([3, 3, 8, 8], lo=24, hi=24) == [24]
    assert reachable_targets([3, 4, 6], "/") == [2, 8]
    # with - and / alone, 8 / (3 - 8 / 3) = 24 and 8 / (8 / 3 - 3) = -24 divide by a sub-result 1/3
    # (-1/3) whose inverse no other subset makes: a float pre-filter reading it wrong loses both
    found = reachable_targets([3, 3, 8, 8], "-/")
    assert 24 in found and -24 in found
    assert check_answer(solve([3, 3, 8, 8], 24, "-/"), [3, 3, 8, 8], 24)[0]


def test_solver_bounds_are_inclusive_and_one_number_is_itself():
    """reachable_targets keeps both ends of [lo, hi]: 2 and 3 make 3 - 2 = 1, 2 + 3 = 5 and
    2 * 3 = 6 in [1, 6]; one number reaches itself only."""
    assert reachable_targets([2, 3], lo=1, hi=6) == [1, 5, 6]
    assert reachable_targets([5], lo=5, hi=5) == [5] and reachable_targets([5]) == [5]
    assert reachable_targets([5], lo=6, hi=9) == [] and reachable_targets([5], lo=1, hi=4) == []
    assert solve([5], 5) == "5" and solve([5], 4) is None


def test_solver_takes_one_to_six_numbers():
    """MAX_NUMS is 6: six numbers are solved (and allowed in a data file), none or seven raise."""
    from r3.tasks.countdown import MAX_NUMS, validate_record

    assert MAX_NUMS == 6
    assert check_answer(solve([1, 2, 3, 4, 5, 6], 21, "+"), [1, 2, 3, 4, 5, 6], 21)[0]
    assert check_answer(solve([1, 2, 3, 4, 5, 6], 720, "*"), [1, 2, 3, 4, 5, 6], 720)[0]
    assert validate_record("r", {"target": 21, "nums": [1, 2, 3, 4, 5, 6]}, 0)["nums"] == [1, 2, 3, 4, 5, 6]
    for nums in ([], [1] * 7):
        with pytest.raises(R3Error, match="solve: need 1 to 6 numbers"):
            solve(nums, 7)
    assert CountdownTask(min_count=6, max_count=6, ops="+").max_count == 6


def test_a_reachable_target_whose_float_witness_is_inexact_is_still_found():
    """The pre-filter's first way to 0 from these numbers is 7 / (997 * 998 * 999) / 1 ~ 7e-9 (not
    0), yet (999 - 998 - 1) / 997 / 7 is exactly 0: an inexact witness falls back to the exact search
    (dropping the target instead would lose solvable problems)."""
    from r3.tasks.countdown import _apply, _candidate_targets, _solve_with

    nums = (1, 7, 997, 998, 999)
    witness = _candidate_targets(nums, "+-*/", 0, 0)[0]
    assert _apply(witness[0], witness[2], witness[4]) != 0  # (the premise: the witness is inexact)
    assert reachable_targets(list(nums), lo=0, hi=0) == [0]
    solution = _solve_with(nums, 0, "+-*/", witness)
    assert solution is not None and check_answer(solution, list(nums), 0)[0]


def test_generated_targets_reach_both_ends_of_the_target_range():
    """The target range is inclusive at both ends: a range of one value gives that value, and a
    range of two gives both."""
    one = CountdownTask(difficulty="easy", min_target=10, max_target=10).examples("train", n=20)
    assert {e["target"] for e in one} == {10}
    two = CountdownTask(difficulty="easy", min_target=1, max_target=2).examples("train", n=30)
    assert {e["target"] for e in two} == {1, 2}


def test_generated_rows_keep_the_drawn_order_and_unique_ids():
    """nums are stored in the order drawn (not sorted: the public export is not sorted either), and
    ids name the split, the seed and the position, so two seeds or splits never share an id."""
    exs = CountdownTask().examples("train", n=40, seed=0)
    assert any(e["nums"] != sorted(e["nums"]) for e in exs)
    assert [e["id"] for e in exs[:2]] == ["countdown-train-0-0", "countdown-train-0-1"]
    ids = [e["id"] for seed in (0, 1) for split in ("train", "test")
           for e in CountdownTask().examples(split, n=10, seed=seed)]
    assert len(set(ids)) == len(ids) == 40


def test_the_countdown_tiny_data_is_pinned():
    """The README's results were measured on countdown-tiny's generated problems: a change to the
    generator (its seeding, draws or target choice) silently changes the benchmark. The first test
    problem is the README's own prompt example, 8 and 3 make 5."""
    t = tasks.get("countdown-tiny")
    assert (t.min_num, t.max_num, t.min_target, t.max_target) == (1, 30, 1, 60)
    assert [(e["nums"], e["target"]) for e in t.examples("test", n=4)] == \
        [([8, 3], 5), ([11, 27], 16), ([18, 28], 46), ([10, 18], 28)]
    assert [(e["nums"], e["target"]) for e in t.examples("train", n=4)] == \
        [([16, 5], 21), ([20, 23], 3), ([12, 8], 4), ([7, 24], 31)]


def test_an_empty_split_is_an_error_only_when_examples_are_asked_for():
    """test_fraction 1.0 leaves no training problems (and 0.0 no test ones): asking for some says
    so at once, asking for none gives none."""
    every = CountdownTask(test_fraction=1.0)
    with pytest.raises(R3Error, match=r"test_fraction=1.0 leaves the train split empty"):
        every.examples("train", n=1)
    assert every.examples("train", n=0) == [] and len(every.examples("test", n=3)) == 3
    assert CountdownTask(test_fraction=0.0).examples("test", n=0) == []
    # the whole test split of 0.0 is none (r3.train checks the test split's rows at the start)
    assert CountdownTask(test_fraction=0.0).examples("test") == []
    with pytest.raises(R3Error, match=r"test_fraction=0.0 leaves the test split empty"):
        CountdownTask(test_fraction=0.0).examples("test", n=1)


def test_the_generator_gives_up_after_draws_scaled_by_its_splits_share(monkeypatch):
    """Before "found only" the generator draws (200 n + 2000) / share candidate problems, share being
    its split's fraction: a split holding a tenth of the problems gets ten times the draws (not a
    tenth, which gave up while problems were left)."""
    import r3.tasks.countdown as cd

    calls = []
    real = cd.in_test_split
    monkeypatch.setattr(cd, "in_test_split", lambda *a, **k: calls.append(1) or real(*a, **k))
    t = CountdownTask(min_count=2, max_count=2, min_num=1, max_num=1, min_target=50, max_target=60,
                      ops="+", test_fraction=0.9)  # 1 + 1 never reaches 50
    with pytest.raises(R3Error, match="found only 0"):
        t.examples("train", n=1)
    assert len(calls) == 22000  # (200 * 1 + 2000) / 0.1


def test_split_seed_repartitions_generated_and_loaded_problems(tmp_path):
    """split_seed picks another partition, for generated problems and for a file's rows."""
    def sides(**kw):
        t = CountdownTask(difficulty="easy", **kw)
        return {tuple(sorted(e["nums"])) for e in t.examples("test", n=40)}

    assert sides(split_seed=0) != sides(split_seed=1)
    p = tmp_path / "cd.jsonl"
    p.write_text("\n".join(json.dumps(r) for r in _rows(40)))
    keys = [{str(e["nums"]) for e in CountdownTask(data_path=str(p), split_seed=s).examples("test")} for s in (0, 1)]
    assert keys[0] != keys[1]


def test_a_files_rows_are_split_by_their_target_too(tmp_path):
    """Rows are partitioned by (sorted numbers, target): rows with the same numbers but other
    targets are other problems, and fall on both sides."""
    rows = [{"target": t, "nums": [3, 5]} for t in range(40)]
    p = tmp_path / "cd.jsonl"
    p.write_text("\n".join(json.dumps(r) for r in rows))
    t = CountdownTask(data_path=str(p), test_fraction=0.5)
    assert t.examples("train") and t.examples("test")


def test_loaded_rows_are_copies_and_keep_or_number_their_ids(tmp_path):
    """A caller editing a returned example does not edit the loaded data; a row's own id is kept and
    a row without one gets its index from 0."""
    p = tmp_path / "cd.jsonl"
    p.write_text('{"target": 5, "nums": [1, 4], "id": "a"}\n{"target": 3, "nums": [1, 2]}\n'
                 '{"target": 9, "nums": [4, 5]}\n')
    t = CountdownTask(data_path=str(p), test_data_path=str(p))
    assert sorted(map(str, (e["id"] for e in t.examples("train")))) == ["1", "2", "a"]
    t.examples("train")[0]["nums"].append(99)
    assert all(99 not in e["nums"] for e in t.examples("train"))


@pytest.mark.parametrize("rec,clean", [
    ({"target": 5.0, "nums": [1.0, 4]}, {"target": 5, "nums": [1, 4], "id": 7}),  # integral floats
    ({"target": 0, "nums": [0, 0]}, {"target": 0, "nums": [0, 0], "id": 7}),  # zero is a number
    ({"target": 7, "nums": [7], "id": "x", "extra": 1}, {"target": 7, "nums": [7], "id": "x", "extra": 1}),
])
def test_validate_record_accepts_and_cleans(rec, clean):
    from r3.tasks.countdown import validate_record

    row = validate_record("f, line 8", rec, 7)
    assert row == clean and type(row["target"]) is int and all(type(x) is int for x in row["nums"])


@pytest.mark.parametrize("rec,match", [
    ({"target": 5, "nums": []}, r"f, line 8: field 'nums' must be a list of 1 to 6 integers"),
    ({"target": 5, "nums": [1] * 7}, r"f, line 8: field 'nums' must be a list of 1 to 6 integers"),
    ({"target": True, "nums": [1, 4]}, r"f, line 8: field 'target' must be an integer, got True"),
    # (a long value is cut in its one-line error: a 1,000-number row printed every number)
    ({"target": 5, "nums": list(range(1000))},
     r"f, line 8: field 'nums' must be a list of 1 to 6 integers, got \[0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, \.\.\.\] "
     r"\(1000 items\)$"),
    ({"target": "9" * 500, "nums": [1]}, r"got '9{27}\.\.\.9{28}'$"),
])
def test_validate_record_refuses(rec, match):
    from r3.tasks.countdown import validate_record

    with pytest.raises(R3Error, match=match):
        validate_record("f, line 8", rec, 7)


def test_countdown_range_options_refuse_negative_numbers_and_empty_target_ranges():
    with pytest.raises(R3Error, match="min_num"):
        tasks.get("countdown", min_num=-1)
    with pytest.raises(R3Error, match="max_target"):
        tasks.get("countdown", min_target=50, max_target=10)


def test_countdown_preset_sizes():
    """The presets' default sizes (the README's): standard 10000/1000, easy 2000/200."""
    assert (CountdownTask().train_size, CountdownTask().test_size) == (10000, 1000)
    easy = CountdownTask(difficulty="easy")
    assert (easy.train_size, easy.test_size) == (2000, 200)


def test_reachable_targets_finds_a_product_past_float_precision():
    """Past 2**52 a float no longer tells integers apart: the float pre-filter would round a*a
    to a neighbour, whose exact check fails, and drop the value solve() finds. Such values are
    computed exactly."""
    a = 2**27 + 1  # a * a = 2**54 + 2**28 + 1: odd, not a float
    assert check_answer(solve([a, a], a * a, "*"), [a, a], a * a)[0]
    assert reachable_targets([a, a], "*") == [a * a]
    assert reachable_targets([a, a, 2], "*", lo=2 * a * a, hi=2 * a * a) == [2 * a * a]



_COUNTDOWN_SHAPES = {
    "blank-lines": lambda n: "5 + 23 = 28" + "\n" * n + "x",
    "blank-lines-spaced": lambda n: "5 + 23 = 28" + "\n " * n + "x",
    "fences": lambda n: "If ```\n" * n + "5 + 23 = 28",
    "display-math": lambda n: "\\[\n" * n + "5 + 23 = 28",
    "dollar-lines": lambda n: "$$\n" * n + "5 + 23 = 28",
    "dashes": lambda n: "Assume - " * n + "5 + 23 = 28",
    "bullets": lambda n: "- " * n + "5 + 23 = 28",
    "wrappers": lambda n: "\u201c" * n + "5 + 23 = 28",
    "stars": lambda n: "**" * n + "5 + 23 = 28",
    "emphasis": lambda n: "*a* " * n + "5 + 23 = 28",
    "bold-numbers": lambda n: "5 + 23 = 28 " + "**1 + 1** " * n,
    "bold-number-words": lambda n: "5 + 23 = 28 " + "1 **two** " * n,
    "underscores": lambda n: "_" * n + "5 + 23 = 28___",
    "decimals": lambda n: "5 + 23 = 28 " + ".5 " * n,
    "many-runs": lambda n: "1 a " * n + "5 + 23 = 28",
    "plus-paren": lambda n: "(+" * n,
    "blocks": lambda n: "<answer> 1 </answer>" * n,
    "open-tags": lambda n: "<answer>" * n + "5 + 23 = 28",
    "boxed": lambda n: "\\boxed{$" * n + "5 + 23 = 28",
    "label-chain": lambda n: "a: " * n + "5 + 23 = 28",
    "label-chain-heading": lambda n: "a: " * n + "\n5 + 23 = 28",
    "label-chain-numbers": lambda n: "a 1: " * n + "\n5 + 23 = 28",
    "quote-lines": lambda n: "> 1\n" * n + "5 + 23 = 28",
    "quote-marks": lambda n: "> " * n + "5 + 23 = 28",
    "table-rows": lambda n: "| 1 | 2 \u2212 |\n" * n + "5 + 23 = 28",
    "headings": lambda n: "### Wrong\n\n" * n + "5 + 23 = 28",
    "mark-lines": lambda n: "Wrong:\n" + "___\n" * n + "5 + 23 = 28",
    "list-numbers": lambda n: "1. " * n + "5 + 23 = 28",
    "restatements": lambda n: "5 + 23 = 28\n" + "Result = 28\n" * n,
    "restatements-glued": lambda n: "5 + 23 = 28 " + "a 28 = 28" * n,
    "latex-commands": lambda n: "Wrong: " + "\\bf " * n + "5 + 23 = 28",
    "latex-commands-glued": lambda n: "Wrong: $" + "\\bf" * n + " 5 + 23 = 28",
    "latex-long-command": lambda n: "\\" + "b" * n + " 5 + 23 = 28",
    "latex-label-words": lambda n: "Wrong " + "\\bf a: " * n + "5 + 23 = 28",
    "latex-line-ends": lambda n: "2 * \\bf\n" * n + "5 + 23 = 28",
    "one-letter-words": lambda n: "f " * n + "(5 + 23) = 28",
    "tag-commas": lambda n: "5 + 23 = 28" + " is, it" * n + "?",
    "ellipsis": lambda n: "5 + 23 = 28, right" + "." * n + "?",
    "comma-lines": lambda n: "5 + 23 = 28" + "\n," * n + " right?",
    "label-braces": lambda n: "Wrong" + "{}" * n + ": 5 + 23 = 28",
    "function-commands": lambda n: "f " + "\\bf " * n + "(5 + 23) = 28",
    "tag-dashes": lambda n: "5 + 23 = 28" + " --" * n + " right?",
    "struck-tags": lambda n: "<s>" * n + "5 + 23 = 28" + "</s>" * n,
    "latex-groups": lambda n: "Not " + "{}" * n + " so 5 + 23 = 28",
}



@pytest.mark.parametrize("shape", sorted(_COUNTDOWN_SHAPES))
@pytest.mark.parametrize("tags", [False, True])
def test_countdown_work_grows_linearly_with_the_text(shape, tags, python_lines_run):
    """Doubling a long adversarial text about doubles the Python lines both implementations run
    (a quadratic loop quadruples them): a look-ahead over the blanks after each line break in the
    re-checker made a text of many line breaks take minutes, which r3.audit would sit in, and a
    verifier that slow stalls a training step."""
    task, ex = CD if tags else LENIENT, {"nums": [5, 23], "target": 28}

    def text(n):
        t = _COUNTDOWN_SHAPES[shape](n)
        if not tags:
            return t
        return t.replace("5 + 23 = 28", "<answer>5 + 23 = 28</answer>") if "5 + 23 = 28" in t else t + "<answer>5 + 23</answer>"

    for name, fn in (("verifier", task.verify), ("recheck", lambda e, t: recheck(task, e, t))):
        small, large = (python_lines_run(fn, ex, text(n)) for n in (600, 1200))
        assert large <= 3 * max(small, 50), (name, shape, small, large)


@pytest.mark.parametrize("tags,completion,expected", [
    # a given number in digits stated as the result or as another answer after the final equation,
    # as a number word there already was ("which is five", ", or five")
    pytest.param(False, "5 + 23 = 28, which is 23.", False, id="which-is-digits"),
    pytest.param(False, "5 + 23 = 28, or 23.", False, id="or-digits"),
    pytest.param(False, "5 + 23 = 28 which would be 5", False, id="which-would-be-digits"),
    pytest.param(True, "<answer>5 + 23</answer> or 5", False, id="tags-or-digits"),
    # ... also with a hedge between ("or maybe", "or rather"), digits or words
    pytest.param(False, "5 + 23 = 28, or maybe 23.", False, id="or-maybe-digits"),
    pytest.param(False, "5 + 23 = 28, or rather 5.", False, id="or-rather-digits"),
    pytest.param(False, "5 + 23 = 28, or maybe five.", False, id="or-maybe-word"),
    pytest.param(True, "<answer>5 + 23</answer> or maybe 23", False, id="tags-or-maybe-digits"),
    # ... while the target there, and the numbers named in a parenthesis, stay right
    pytest.param(False, "5 + 23 = 28, or 28.", True, id="or-the-target"),
    pytest.param(False, "5 + 23 = 28, which is 28.", True, id="which-is-the-target"),
    pytest.param(False, "5 + 23 = 28 (using 5 and 23 once each).", True, id="parenthesis-names-the-numbers"),
    pytest.param(False, "5 + 23 = 28, using 5 and 23.", True, id="using-the-numbers"),
])
def test_countdown_a_given_number_stated_as_the_result_after_it(tags, completion, expected):
    """An adversarial round found both implementations paying a right equation followed by
    another result in digits: a number word after ``, or`` or ``which is`` was refused, but digits
    there (a given number, so no "other number") were paid (``5 + 23 = 28, which is 23.``, ``...,
    or 23.``), and ``or maybe`` / ``or rather`` put a hedge between, in either spelling."""
    _both_implementations_say(tags, completion, expected)


@pytest.mark.parametrize("tags,completion,expected", [
    # the answer taken back in words the lists missed: "fails" was read, not its other forms
    pytest.param(False, "5 + 23 = 28. That failed.", False, id="that-failed"),
    pytest.param(False, "5 + 23 = 28 (fail)", False, id="parenthesised-fail"),
    pytest.param(False, "5 + 23 = 28\nCheck: failed", False, id="check-failed"),
    pytest.param(False, "5 + 23 = 28 was rejected.", False, id="was-rejected"),
    # ("none" alone is no denial: "None of the numbers is used twice." follows right answers)
    pytest.param(False, "5 + 23 = 28. None of the numbers is used twice.", True, id="none-of-the-numbers"),
    pytest.param(False, "5 + 23 = 28. I give up.", False, id="give-up"),
    pytest.param(False, "5 + 23 = 28. Discard that.", False, id="discard-that"),
    # ... a label that says the attempt failed or was rejected
    pytest.param(False, "Failed attempt: 5 + 23 = 28", False, id="label-failed-attempt"),
    pytest.param(False, "Rejected: 5 + 23 = 28", False, id="label-rejected"),
    pytest.param(True, "Failed attempt: <answer>5 + 23</answer>", False, id="tags-label-failed-attempt"),
    # ... a supposition word before it
    pytest.param(False, "Hypothetically 5 + 23 = 28.", False, id="hypothetically"),
    pytest.param(False, "Imagine 5 + 23 = 28.", False, id="imagine"),
    pytest.param(True, "Pretend <answer>5 + 23</answer>", False, id="tags-pretend"),
    # ... while a failure before the final equation, said of an earlier try, stays right
    pytest.param(False, "I tried 23 - 5 and it failed. Now 5 + 23 = 28.", True, id="failed-earlier-try"),
    pytest.param(False, "None of my earlier tries worked, but 5 + 23 = 28.", True, id="none-earlier"),
    pytest.param(False, "My previous answer was rejected. This time: 5 + 23 = 28", True, id="rejected-earlier"),
])
def test_countdown_answers_called_failed_or_rejected_and_suppositions(tags, completion, expected):
    """An adversarial round found both implementations paying a right equation that the
    text then calls failed or rejected (``That failed.``, ``I give up.``,
    ``Discard that.``), labels ``Failed attempt:`` / ``Rejected:``, and suppositions
    ``Hypothetically`` / ``Imagine`` / ``Pretend`` before it."""
    _both_implementations_say(tags, completion, expected)


def test_a_data_file_of_problems_with_no_solution_is_refused_or_warned_about(tmp_path, capsys, monkeypatch):
    """A sample spread over a data file is solved with the task's operations: none solvable (a file
    made for other operations) is refused naming an example row; some is one warning line; the
    rows are checked with ``ops``, and at most SOLVABLE_SAMPLE of them."""
    from r3.tasks import countdown as C

    products = [{"target": a * b, "nums": [a, b]} for a in range(3, 40) for b in range(5, 9)]  # a*b != a+b here
    p = tmp_path / "mul.jsonl"
    p.write_text("\n".join(json.dumps(r) for r in products))
    assert len(CountdownTask(data_path=str(p)).examples("train")) + len(CountdownTask(data_path=str(p)).examples("test")) == 148
    assert capsys.readouterr().err == ""
    with pytest.raises(R3Error, match=r"mul\.jsonl: none of the 64 records checked across the file can be solved with "
                                      r"the operations '\+-' \(e\.g\. line 1: 15 from \[3, 5\]\); is the file made for "
                                      r"other operations \(task option ops\)\?"):
        CountdownTask(data_path=str(p), ops="+-").examples("train")
    mixed = [{"target": a + 1, "nums": [a, 1]} if a % 4 else {"target": 10 * a + 7, "nums": [a, 1]} for a in range(1, 41)]
    q = tmp_path / "mixed.jsonl"
    q.write_text("\n".join(json.dumps(r) for r in mixed))
    t = CountdownTask(data_path=str(q), test_data_path=str(p))
    assert len(t.examples("train")) == 40  # (kept: they are the user's problems)
    err = capsys.readouterr().err
    assert err == (f"warning: {q}: 10 of the 40 records checked across the file cannot be solved with the operations "
                   "'+-*/' (e.g. line 4: 47 from [4, 1]); such problems can never be rewarded\n")
    # spread over the file: unsolvable rows only near the end of a long file are found, and a short
    # file's every row is checked once (not its first rows over and over)
    tail = [{"target": a + 1, "nums": [a, 1]} for a in range(1, 901)] + [{"target": 999, "nums": [a, 1]} for a in range(100)]
    q.write_text("\n".join(json.dumps(r) for r in tail))
    C.load_file(str(q))
    err = capsys.readouterr().err
    k = int(err.split(".jsonl: ")[1].split(" of the 64 ")[0])
    assert 3 <= k <= 8 and int(err.split("(e.g. line ")[1].split(":")[0]) > 900, err
    short = [{"target": 10 * a + 7, "nums": [a, 1]} for a in (1, 2)] + [{"target": a + 1, "nums": [a, 1]} for a in range(3, 11)]
    q.write_text("\n".join(json.dumps(r) for r in short))
    C.load_file(str(q))
    assert "2 of the 10 records checked" in capsys.readouterr().err
    seen = []
    monkeypatch.setattr(C, "solve", lambda nums, target, ops: seen.append(ops) or "x")
    C.load_file(str(p), ops="+*")
    assert seen == ["+*"] * 64
    six = tmp_path / "six.jsonl"
    six.write_text("\n".join(json.dumps({"target": 9, "nums": [1, 1, 1, 1, 1, 4]}) for _ in range(10)))
    seen.clear()
    C.load_file(str(six))
    assert len(seen) == C.SOLVABLE_SAMPLE_SIX



def _spin_then(seconds: float, value):
    """Busy for ``seconds``, then ``value``: a hang that ends, so a broken limit fails a test
    rather than hanging it."""
    import time

    end = time.monotonic() + seconds
    while time.monotonic() < end:
        pass
    return value


class _Hangs(Task):
    """A verifier that runs past its limit on the texts named, then (if still running) says
    correct: "loop" spins; "swallow" spins in a loop that catches everything; "cases" runs test
    cases under a bare except and calls the answer right when none failed (the case that fails it
    comes after the limit); "late" sleeps; "own alarm" cancels the limit's timer with an alarm of
    its own. Any other text is correct at once."""

    name = "hangs"
    verify_timeout = 0.2

    def _check(self, example, completion_text):
        import signal
        import time

        if completion_text == "loop":
            return _spin_then(3, (True, "correct"))
        if completion_text == "swallow":  # (can only be left to end: 1 s)
            end = time.monotonic() + 1
            while time.monotonic() < end:
                try:
                    _spin_then(0.05, None)
                except BaseException:  # noqa: BLE001 -- (what careless grading code does)
                    pass
        if completion_text == "cases":
            try:
                for case in range(3000):
                    time.sleep(0.001)
                    if case == 1500:
                        return False, "fails case 1500"
            except:  # noqa: E722
                pass
        if completion_text == "late":
            time.sleep(1)
        if completion_text == "own alarm":
            signal.alarm(0)
            _spin_then(0.5, None)
        return True, "correct"


@pytest.mark.parametrize("text", ["loop", "swallow", "cases", "late", "own alarm"])
def test_a_verdict_past_the_tasks_verify_timeout_is_wrong_whatever_the_verifier_returns(text, capsys,
                                                                                         verifier_errors):
    """A verifier that runs out of time cannot stall a run, nor get paid: its verdict is wrong and
    a verifier error, even when it caught the interruption (a bare except) and went on to say
    correct, or cancelled the timer. The first timeout is said at once."""
    import time

    from r3.tasks.base import judge, passes, verifier_error_counts

    t = _Hangs()
    start = time.monotonic()
    ok, why = judge(t, {}, text)
    assert ok is False and why == "verifier error: VerifierTimeout: the verdict took longer than the task's " \
                                  "verify_timeout of 0.2 s"
    assert passes(t, {}, text) is False
    assert time.monotonic() - start < 2.5 or text in ("own alarm", "swallow")  # (interrupted, not run to its end)
    assert judge(t, {}, "fine") == (True, "correct") and passes(t, {}, "fine") is True
    n, calls, first = verifier_error_counts(t)
    assert (n, calls) == (2, 4) and first.startswith("VerifierTimeout: the verdict took longer")
    assert capsys.readouterr().err.count("warning:") == 1
    assert len(verifier_errors) == 2
    verifier_errors.clear()


def test_verdicts_that_run_out_of_time_in_a_row_stop_the_run_with_one_line(verifier_errors):
    """Each costs the whole limit, so TIMEOUTS_IN_A_ROW in a row stop the run, naming the last
    completion; a verdict in time between them starts the count again."""
    from r3.tasks.base import TIMEOUTS_IN_A_ROW, judge, passes

    t = _Hangs()
    t.verify_timeout = 0.05
    for _ in range(TIMEOUTS_IN_A_ROW - 1):
        assert passes(t, {}, "loop") is False
    assert passes(t, {}, "fine") is True
    for _ in range(TIMEOUTS_IN_A_ROW - 1):
        assert judge(t, {}, "loop")[0] is False
    with pytest.raises(R3Error, match=rf"^the task's verifier ran out of time on {TIMEOUTS_IN_A_ROW} completions in a "
                                      r"row \(the verdict took longer than the task's verify_timeout of 0.05 s; the "
                                      r"last began 'loop'\); fix the verifier, or give it longer with verify_timeout"):
        passes(t, {}, "loop")
    verifier_errors.clear()


def test_a_plug_ins_own_verify_and_diagnose_run_under_the_limit(capsys, verifier_errors):
    """A duck-typed task (no Task base): its verify runs under the limit, and when that ran out of
    time its diagnose is not asked; a diagnose that runs out of time leaves the verdict as it was,
    with a reason that agrees with it, said once, not counted as a verifier error."""
    import signal

    from r3.tasks.base import judge

    armed = {}
    calls = []

    class Duck:
        name = "duck"
        verify_timeout = 0.2

        def verify(self, example, text):
            armed["verify"] = signal.getitimer(signal.ITIMER_REAL)[0]
            return _spin_then(3, True) if text == "loop" else text != "bad"

        def diagnose(self, example, text):
            calls.append(text)
            armed["diagnose"] = signal.getitimer(signal.ITIMER_REAL)[0]
            if text == "broken":
                raise KeyError("x")
            return _spin_then(3, "slow reason") if text in ("ok", "bad") else "fast reason"

    reason = "its reason ran out of time: diagnose() took longer than the task's verify_timeout of 0.2 s"
    duck = Duck()
    assert judge(duck, {}, "ok") == (True, f"correct ({reason})")
    assert judge(duck, {}, "bad") == (False, f"wrong ({reason})")
    assert 0 < armed["verify"] <= 0.2 and 0 < armed["diagnose"] <= 0.2
    assert capsys.readouterr().err.count("diagnose() took longer") == 1 and verifier_errors == []
    assert judge(duck, {}, "loop") == (False, "verifier error: VerifierTimeout: the verdict took longer than the "
                                              "task's verify_timeout of 0.2 s")
    assert calls == ["ok", "bad"]  # (not asked for a verdict that ran out of time)
    assert judge(duck, {}, "quick") == (True, "fast reason")
    assert judge(duck, {}, "broken") == (True, "correct (diagnose() failed: KeyError: 'x')")
    assert len(verifier_errors) == 1
    verifier_errors.clear()
    del Duck.verify_timeout  # (a duck without the attribute: the default)
    judge(Duck(), {}, "quick")
    from r3.tasks import base

    assert base.VERIFY_TIMEOUT_S - 1 < armed["verify"] <= base.VERIFY_TIMEOUT_S


def test_a_task_that_overrides_verify_alone_is_judged_once(verifier_errors):
    """Its reason comes from the one verdict: asking diagnose() would call verify a second time,
    which near the limit can give the other verdict (a reward logged beside a contradicting
    reason)."""
    from r3.tasks.base import judge

    class Once(Task):
        name = "once"
        calls = 0

        def verify(self, example, completion_text):
            Once.calls += 1
            return Once.calls == 1

    t = Once()
    assert judge(t, {}, "x") == (True, "correct") and Once.calls == 1
    assert judge(t, {}, "x") == (False, "wrong (the task gives no reason)") and Once.calls == 2


def test_verify_timeout_none_sets_no_timer_and_the_default_is_ten_seconds():
    import signal

    from r3.tasks.base import judge

    armed = []

    class Timed(_Hangs):
        def _check(self, example, completion_text):
            armed.append(signal.getitimer(signal.ITIMER_REAL)[0])
            return True, "correct"

    t = Timed()
    t.verify_timeout = None
    assert t.diagnose({}, "x") == "correct" and armed == [0.0]  # (a direct call: r3 sets no limit)
    assert judge(t, {}, "x") == (True, "correct") and armed[-1] == 0.0
    del t.verify_timeout
    Timed.verify_timeout = Task.verify_timeout
    assert judge(t, {}, "x") == (True, "correct") and 9 < armed[-1] <= 10 == Task.verify_timeout
    assert judge(tasks.get("countdown-tiny"), {"nums": [1, 2], "target": 3}, "1 + 2 = 3")[0] is True


@pytest.mark.parametrize("value", ["60", 0, -1, float("nan"), float("inf"), 1e10, True])
def test_a_bad_verify_timeout_is_one_error_when_the_task_is_built(value, tmp_path, monkeypatch):
    mod = tmp_path / "badtimeout.py"
    mod.write_text("from r3.tasks import Task\n"
                   "class T(Task):\n"
                   "    name = 't'\n"
                   f"    verify_timeout = {value!r}\n"
                   "    def examples(self, split='train', n=None, seed=0): return [{'q': 1}]\n"
                   "    def messages(self, ex): return [{'role': 'user', 'content': 'q'}]\n"
                   "    def _check(self, ex, text): return True, ''\n".replace("nan", "float('nan')")
                   .replace("inf", "float('inf')"))
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(R3Error, match=r"task 't': verify_timeout must be a number of seconds > 0, or None"):
        tasks.get("badtimeout:T")
