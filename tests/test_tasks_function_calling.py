"""Function calling (xlam format): parsing, multiset verifier, loading, synthetic data, CLI."""

import json
import os
import random
import re
import subprocess
import sys
from pathlib import Path

import pytest

import r3.tasks as tasks
from r3.errors import R3Error
from r3.tasks.recheck import recheck
from r3.tasks.function_calling import (
    REFLECTION_PROMPT,
    FunctionCallingTask,
    calls_match,
    load_file,
    main,
    parse_calls,
    values_equal,
    write_synthetic,
)
from r3.tasks.xlam_synthetic import CATALOGUE, synthetic_xlam

# a verifier that raises judges the text wrong: every test here also fails on one (conftest)
pytestmark = pytest.mark.usefixtures("verifier_errors")

ROOT = Path(__file__).resolve().parents[1]

TOOLS = [
    {"name": "get_weather", "description": "Weather for a city.",
     "parameters": {"city": {"description": "City.", "type": "str"},
                    "units": {"description": "Units.", "type": "str, optional", "default": "celsius"}}},
    {"name": "convert", "description": "Convert money.",
     "parameters": {"amount": {"description": "Amount.", "type": "float"},
                    "to": {"description": "Currency.", "type": "str"}}},
]
CALLS = [
    {"name": "get_weather", "arguments": {"city": "Paris"}},
    {"name": "get_weather", "arguments": {"city": "Tokyo"}},
    {"name": "convert", "arguments": {"amount": 100.0, "to": "EUR"}},
]
EX = {"id": 1, "query": "Weather in Paris and Tokyo, and convert 100 to EUR.",
      "tools": json.dumps(TOOLS), "answers": json.dumps(CALLS)}
FC = FunctionCallingTask()


def dumps(calls):
    return json.dumps(calls)


# ---------------------------------------------------------------------------------------
# value equality and the multiset verifier
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "a,b,eq",
    [
        (100, 100.0, True), (0.5, 0.5, True), (1, 2, False),
        (True, 1, False), (1, True, False), (False, 0, False), (True, True, True), (True, 1.0, False),
        ("1", 1, False), ("a", "a", True), ("a", "A", False), ("a ", "a", False),
        (None, None, True), (None, "None", False), (None, 0, False),
        ([1, 2], [1, 2], True), ([1, 2], [2, 1], False), ([1], [1, 1], False), ([1, 2.0], [1.0, 2], True),
        ({"a": [1, {"b": 2}]}, {"a": [1.0, {"b": 2.0}]}, True), ({"a": 1}, {"a": 1, "b": None}, False),
        ({"a": {"b": True}}, {"a": {"b": 1}}, False), ([], {}, False), (float("nan"), float("nan"), False),
        # numbers equal exactly, never within a tolerance
        (0.3, 0.1 + 0.2, False), (100, 100.0000001, False), (1e16, 1e16 + 2, False),
        # integers compare exactly, past a float's 53 bits too (JSON reads them as ints)
        (9007199254740993, 9007199254740992, False), (9007199254740993, 9007199254740992.0, False),
    ],
)
def test_values_equal(a, b, eq):
    assert values_equal(a, b) is eq
    assert values_equal(b, a) is eq


def test_multiset_of_calls():
    assert FC.verify(EX, dumps(CALLS))
    assert FC.verify(EX, dumps(CALLS[::-1]))  # call order does not matter
    assert FC.verify(EX, dumps([CALLS[2], CALLS[0], CALLS[1]]))
    assert not FC.verify(EX, dumps(CALLS[:2]))  # a call missing
    assert not FC.verify(EX, dumps(CALLS + [CALLS[0]]))  # a call extra
    assert not FC.verify(EX, dumps([CALLS[0], CALLS[0], CALLS[2]]))  # multiset, not set
    # argument order inside a call does not matter; numbers by value
    assert FC.verify(EX, dumps(CALLS[:2] + [{"arguments": {"to": "EUR", "amount": 100}, "name": "convert"}]))


def test_duplicate_reference_calls():
    ex = dict(EX, answers=dumps([CALLS[0], CALLS[0]]))
    assert FC.verify(ex, dumps([CALLS[0], CALLS[0]]))
    assert not FC.verify(ex, dumps([CALLS[0]]))
    assert not FC.verify(ex, dumps([CALLS[0], CALLS[1]]))


@pytest.mark.parametrize(
    "call",
    [
        {"name": "convert", "arguments": {"amount": 100.0}},  # missing argument
        {"name": "convert", "arguments": {"amount": 100.0, "to": "EUR", "fee": 0}},  # extra argument
        {"name": "convert", "arguments": {"amount": "100", "to": "EUR"}},  # string, not number
        {"name": "convert", "arguments": {"amount": 100.5, "to": "EUR"}},
        {"name": "convert", "arguments": {"amount": 100.0, "to": "eur"}},  # strings are exact
        {"name": "Convert", "arguments": {"amount": 100.0, "to": "EUR"}},  # names are exact
        {"name": "convert_currency", "arguments": {"amount": 100.0, "to": "EUR"}},
        {"name": "convert ", "arguments": {"amount": 100.0, "to": "EUR"}},  # (a harness finds no tool "convert ")
        {"name": " convert", "arguments": {"amount": 100.0, "to": "EUR"}},
    ],
)
def test_wrong_call_fails(call):
    assert not FC.verify(EX, dumps(CALLS[:2] + [call]))


def test_default_valued_extra_argument_fails():
    ex = dict(EX, answers=dumps([CALLS[0]]))
    assert FC.verify(ex, dumps([CALLS[0]]))
    assert not FC.verify(ex, dumps([{"name": "get_weather", "arguments": {"city": "Paris", "units": "celsius"}}]))


def test_bool_is_not_a_number_in_calls():
    ex = dict(EX, answers=dumps([{"name": "f", "arguments": {"flag": True, "n": 1}}]))
    assert FC.verify(ex, '[{"name": "f", "arguments": {"flag": true, "n": 1.0}}]')
    assert not FC.verify(ex, '[{"name": "f", "arguments": {"flag": 1, "n": 1}}]')
    assert not FC.verify(ex, '[{"name": "f", "arguments": {"flag": true, "n": true}}]')
    assert not FC.verify(ex, '[{"name": "f", "arguments": {"flag": "true", "n": 1}}]')


INT_TOOLS = [
    {"name": "forecast", "description": "Forecast.",
     "parameters": {"days": {"description": "Days.", "type": "int"},
                    "hours": {"description": "Hours.", "type": "int, optional", "default": 0},
                    "ratio": {"description": "Ratio.", "type": "float"},
                    "sizes": {"description": "Sizes.", "type": "List[int]"}}},
    {"name": "schema", "description": "JSON Schema parameters.",
     "parameters": {"type": "object", "properties": {"n": {"type": "integer"}, "m": {"type": "Optional[int]"}}}},
]


@pytest.mark.parametrize("answer,reference,paid", [
    ({"days": 3}, {"days": 3}, True),
    ({"days": 3.0}, {"days": 3}, False),   # range(3.0) raises; BFCL refuses a float for an int
    ({"days": 3e0}, {"days": 3}, False),
    ({"days": 3, "hours": 2.0}, {"days": 3, "hours": 2}, False),  # (int, optional)
    ({"days": 3, "ratio": 25}, {"days": 3, "ratio": 25.0}, True),  # an int where a float is declared: fine
    ({"days": 3, "ratio": 25.0}, {"days": 3, "ratio": 25}, True),  # (the reference writes a float-typed value as an int)
    ({"days": 3.0}, {"days": 3.0}, True),  # (the reference itself writes a float there: no stricter than it)
    ({"days": 3, "sizes": [1, 2]}, {"days": 3, "sizes": [1, 2]}, True),
    ({"days": 3, "sizes": [1.0, 2]}, {"days": 3, "sizes": [1, 2]}, False),  # (List[int]: each item as well)
])
def test_an_integer_parameter_written_as_a_float_is_not_paid(answer, reference, paid):
    """A parameter the tool declares as an integer (xlam's ``int``, ``int, optional``) holding
    ``3.0`` where the reference holds ``3`` was paid as the same number; a Python tool given it
    fails (``range(3.0)``) and BFCL's checker refuses it. Numbers still compare by value
    elsewhere. Both implementations."""
    ex = dict(EX, tools=json.dumps(INT_TOOLS), answers=dumps([{"name": "forecast", "arguments": reference}]))
    text = dumps([{"name": "forecast", "arguments": answer}])
    assert FC.verify(ex, text) is paid and recheck(FC, ex, text)[0] is paid
    if not paid:
        assert FC.diagnose(ex, text) == "an argument declared as an integer written as a float (3.0 for 3)"


@pytest.mark.parametrize("answer,paid", [({"n": 2, "m": 1}, True), ({"n": 2.0, "m": 1}, False),
                                         ({"n": 2, "m": 1.0}, False)])
def test_integer_parameters_in_json_schema_form(answer, paid):
    ex = dict(EX, tools=json.dumps(INT_TOOLS), answers=dumps([{"name": "schema", "arguments": {"n": 2, "m": 1}}]))
    text = dumps([{"name": "schema", "arguments": answer}])
    assert FC.verify(ex, text) is paid and recheck(FC, ex, text)[0] is paid


LIST_TOOLS = [
    {"name": "grid", "description": "Integer lists.",
     "parameters": {"row": {"description": "A row.", "type": "List[int]"},
                    "rows": {"description": "Rows.", "type": "List[List[int]], optional", "default": []},
                    "maybe": {"description": "Maybe.", "type": "Optional[List[int]]"},
                    "values": {"description": "Values.", "type": "List[float]"},
                    "mixed": {"description": "Mixed.", "type": "List[Union[int, float]]"}}},
    {"name": "schema_grid", "description": "JSON Schema.",
     "parameters": {"type": "object", "properties": {
         "ks": {"type": "array", "items": {"type": "integer"}},
         "xs": {"type": "array", "items": {"type": "number"}}}}},
]


@pytest.mark.parametrize("name,answer,reference,paid", [
    ("grid", {"row": [55, 51]}, {"row": [55, 51]}, True),
    ("grid", {"row": [55.0, 51.0]}, {"row": [55, 51]}, False),  # a float where List[int] has an integer
    ("grid", {"row": [55, 51e0]}, {"row": [55, 51]}, False),
    ("grid", {"row": [1], "rows": [[1, 2], [3.0]]}, {"row": [1], "rows": [[1, 2], [3]]}, False),  # nested
    ("grid", {"maybe": [2.0]}, {"maybe": [2]}, False),  # (Optional[List[int]])
    ("grid", {"values": [1.0, 2.0]}, {"values": [1, 2]}, True),  # (List[float]: by value, as before)
    ("grid", {"mixed": [1.0]}, {"mixed": [1]}, True),  # (not declared as integers alone)
    ("grid", {"row": [2.5]}, {"row": [2.5]}, True),  # (no stricter than the reference)
    ("schema_grid", {"ks": [1.0], "xs": [1.0]}, {"ks": [1], "xs": [1]}, False),
    ("schema_grid", {"ks": [1], "xs": [1.0]}, {"ks": [1], "xs": [1]}, True),
])
def test_an_integer_item_of_a_list_of_integers_written_as_a_float_is_not_paid(name, answer, reference, paid):
    """Both implementations paid ``[55.0, 51.0]`` for a ``List[int]`` parameter whose reference is
    ``[55, 51]``: the integer rule read only top-level parameters, while a Python tool given those
    items fails the same way (``range(55.0)``, ``xs[1.0]``) and BFCL's checker refuses a float item
    in an integer array as it does a float for an integer."""
    ex = dict(EX, tools=json.dumps(LIST_TOOLS), answers=dumps([{"name": name, "arguments": reference}]))
    text = dumps([{"name": name, "arguments": answer}])
    assert FC.verify(ex, text) is paid, FC.diagnose(ex, text)
    assert recheck(FC, ex, text)[0] is paid  # the independent implementation agrees


@pytest.mark.parametrize("declared,paid", [
    ("int, optional", False), ("int,optional", False), ("int ,optional", False), ("INT , Optional", False),
    ("Optional[int]", False), ("int, optional, optional", True), ("int optional", True), ("str, optional", True),
])
def test_an_integer_declared_without_the_usual_blank_is_one_in_both(declared, paid):
    """The verifier read ``int,optional`` (no blank after the comma) as no integer type and paid
    ``3.0`` for ``3``, while the re-check refused it: the two disagreed on such a declaration."""
    ex = dict(EX, tools=json.dumps([{"name": "f", "description": "", "parameters": {"x": {"type": declared}}}]),
              answers=dumps([{"name": "f", "arguments": {"x": 3}}]))
    text = dumps([{"name": "f", "arguments": {"x": 3.0}}])
    assert FC.verify(ex, text) is paid and recheck(FC, ex, text)[0] is paid


def test_integer_types_agree_with_the_recheck_on_random_declarations():
    """The two implementations read the same declared types as integers (or lists of them) on
    random type strings and JSON Schema specs built from the pieces that matter."""
    import random

    pieces = ["List[", "list[", "Optional[", "int", "integer", "Int", "]", " ", ", optional", "float", "[", "Union[",
              ",optional", " ,", ",", "\t", "Optional"]
    rng = random.Random(2)
    for _ in range(3_000):
        if rng.random() < 0.8:
            spec = {"type": "".join(rng.choice(pieces) for _ in range(rng.randint(1, 6)))}
        else:
            spec = {"type": rng.choice(["integer", "int", "number", "List[int]", "Array"])}
            for _ in range(rng.randint(1, 3)):
                spec = {"type": rng.choice(["array", "Array", " array", "list"]), "items": spec}
        for ref, answer in (([1, 2], [1.0, 2]), (3, 3.0), ([[1]], [[1.0]])):
            ex = dict(EX, tools=json.dumps([{"name": "f", "description": "", "parameters": {"x": spec}}]),
                      answers=dumps([{"name": "f", "arguments": {"x": ref}}]))
            text = dumps([{"name": "f", "arguments": {"x": answer}}])
            assert FC.verify(ex, text) == recheck(FC, ex, text)[0], spec


ONE_CALL = dict(EX, answers=dumps(CALLS[:1]))
NO_CALLS = dict(EX, answers="[]")


@pytest.mark.parametrize("example,completion,ok", [
    # OpenAI's legacy assistant message: one call under "function_call" (arguments as a JSON string)
    (ONE_CALL, json.dumps({"function_call": {"name": "get_weather", "arguments": json.dumps({"city": "Paris"})}}), True),
    (ONE_CALL, json.dumps({"role": "assistant", "content": None, "function_call": CALLS[0]}), True),
    (ONE_CALL, "Sure.\n" + json.dumps({"Function_Call": CALLS[0]}), True),
    (EX, json.dumps([{"function_call": c} for c in CALLS]), True),
    # ... with the rules of any wrapper: nothing else beside it, a wrong call stays wrong
    (ONE_CALL, json.dumps({"function_call": CALLS[0], "dry_run": True}), False),
    (ONE_CALL, json.dumps({"function_call": CALLS[0], "content": "Calling it."}), False),
    (ONE_CALL, json.dumps({"function_call": CALLS[1]}), False),
    (ONE_CALL, json.dumps({"function_call": CALLS[0], "tool_calls": [CALLS[0]]}), False),
    (NO_CALLS, json.dumps({"function_call": []}), False),  # (no calls: only {"tool_calls": []})
    (ONE_CALL, json.dumps({"function_call": {"name": "get_weather", "arguments": {"city": "Paris"},
                                             "then": "reset()"}}), False),
])
def test_openai_legacy_function_call_wrapper(example, completion, ok):
    """Both implementations refused OpenAI's legacy ``{"function_call": {call}}`` message (the
    right call under a wrapper key they did not know), which an OpenAI-style harness runs as that
    one call; it now reads as the other wrappers do."""
    assert FC.verify(example, completion) is ok, FC.diagnose(example, completion)
    assert recheck(FC, example, completion)[0] is ok  # the independent implementation agrees


def test_single_call_object_and_empty_list():
    ex = dict(EX, answers=dumps([CALLS[0]]))
    assert FC.verify(ex, json.dumps(CALLS[0]))  # a bare object counts as one call
    assert FC.verify(ex, '[{"name": "get_weather", "arguments": {"city": "Paris"}}]')
    noargs = dict(EX, answers=dumps([{"name": "ping", "arguments": {}}]))
    assert FC.verify(noargs, '[{"name": "ping"}]')  # missing "arguments" means none
    assert FC.verify(noargs, '[{"name": "ping", "arguments": {}, "id": "call_1"}]')  # extra keys ignored
    none = dict(EX, answers="[]")
    assert FC.verify(none, "[]")
    assert not FC.verify(none, dumps([CALLS[0]]))


def test_no_calls_only_through_a_bare_wrapper():
    """Where the reference makes no calls, "[]" and {"tool_calls": []} are the answer; a wrapper
    that says more beside its empty list ("type": "function", an id) is no answer: a wrapper
    yields no calls only as {"tool_calls": []} (the module docstring)."""
    none = dict(EX, answers="[]")
    assert FC.verify(none, "[]") and FC.verify(none, '{"tool_calls": []}')
    assert FC.verify(none, 'No tool fits this question:\n{"tool_calls": []}')
    for said_more in ('{"type": "function", "function": []}', '{"id": "call_0", "tool_calls": []}',
                      '{"function": []}',  # ("function" holds a call, not a list of none)
                      'No tool fits:\n{"role": "assistant", "content": null, "tool_calls": []}'):
        assert not FC.verify(none, said_more), said_more


# ---------------------------------------------------------------------------------------
# extracting the answer from a completion
# ---------------------------------------------------------------------------------------
GOOD = dumps(CALLS)
BAD = dumps(CALLS[:2])
DELETE_ALL = json.dumps({"name": "delete_all", "arguments": {"path": "/tmp/cache"}})


@pytest.mark.parametrize(
    "completion,ok",
    [
        (GOOD, True),
        ("  \n" + GOOD + "\n", True),
        ("```json\n" + GOOD + "\n```", True),
        ("```JSON\n" + GOOD + "\n```", True),
        ("```\n" + GOOD + "\n```", True),
        ("```" + GOOD + "```", True),
        ("Here are the calls:\n```json\n" + GOOD + "\n```\nDone.", True),
        ("```json\n" + BAD + "\n```\nWait, fixed:\n```json\n" + GOOD + "\n```", False),  # every fence counts
        ("```json\n" + GOOD + "\n```\nActually:\n```json\n" + BAD + "\n```", False),
        ("Sure! The calls are " + GOOD + " -- hope this helps.", True),  # prose around bare JSON
        ("First " + BAD + " no, rather " + GOOD + ".", False),  # every embedded call list counts
        ("First " + GOOD + " no, rather " + BAD + ".", False),
        ("I will call {\"name\": \"x\"} maybe [1, 2] and finally " + GOOD, False),  # (x() is a fourth call)
        ("I will call [1, 2] maybe {} and finally " + GOOD, True),
        ('{"tool_calls": ' + GOOD + "}", True),  # found inside a wrapper object
        ("<think>[not json]</think>" + GOOD, True),
        ("", False),
        ("I cannot help with that.", False),
        ("[{'name': 'get_weather', 'arguments': {'city': 'Paris'}}]", False),  # Python, not JSON
        (GOOD[:-1], False),  # truncated
        ("[" + GOOD, False),  # inside a truncated structure: no answer
        (GOOD + " [1, 2] {}", True),  # JSON that yields no calls does not replace the answer
        (GOOD + " Or: " + BAD[:-5], False),  # a truncated later attempt: no answer
        (GOOD + "\nCorrection: " + BAD.replace('"', "'"), False),  # a later attempt in Python quotes
        (GOOD + "\nActually none apply: []", False),  # a later empty list: no calls
        (GOOD + " (done) [see above]", True),  # structures without a key are prose
        (GOOD + '\nActually: [{"n\\u0061me": "get_weather", "arguments": {"city": "Oslo"}}]', False),
        (GOOD + '\nActually: [{name: "get_weather", arguments: {"city": "Oslo"}}]', False),
        (GOOD + "\nFinal answer: [\u200b]", False),  # an empty list with a zero-width space
        (GOOD + '\nActually: {"function": "convert", "args": {"to": "EUR"}}', False),
        (GOOD + "\nActually the correct call is get_weather(city='Oslo')", False),
        # the same later call spelled otherwise (seen from a second reader): dotted, other case,
        # a full-width parenthesis
        (GOOD + "\nThen: functions.get_weather(city='Oslo')", False),
        (GOOD + "\nThen: self.get_weather (city='Oslo')", False),
        (GOOD + "\nGET_WEATHER(city='Oslo')", False),
        (GOOD + "\nget_weather\uff08city='Oslo'\uff09", False),
        (GOOD + "\nThe weather tool get_weather takes a city (see above).", True),  # named, not called
        (GOOD + "\nmy_get_weather is not needed.", True),  # another identifier, not called
        # a later call of a tool the example does not have, in call syntax
        (GOOD + "\nThen: delete_all_files(path='/')", False),
        (GOOD + "\nmy_get_weather(city='Oslo')", False),
        (GOOD + "\nos.system('rm -rf /')", False),
        (GOOD + '\nreset("all")', False),
        (GOOD + "\nThen shutdown() to finish.", False),
        (GOOD + "\nThen shutdown\uff08force = True\uff09", False),
        # blanks before the parenthesis, other string literals, positional arguments of code-like
        # names, a dot before the name, compatibility forms, combining and zero-width characters,
        # Llama 3's syntax
        (GOOD + "\n1.delete_all_files(path='/')", False),
        (GOOD + "\nStep 2.reset()", False),
        (GOOD + "\nDone\u2026os.system('rm -rf /')", False),
        (GOOD + "\nreset\u0301()", False),
        (GOOD + "\ndelete_all_files (path='/')", False),
        (GOOD + "\ndelete_all_files\n(path='/')", False),
        (GOOD + "\nos.system(f'rm -rf {x}')", False),
        (GOOD + "\nrun(`rm -rf /`)", False),
        (GOOD + "\nreset(\u201call\u201d)", False),
        (GOOD + "\ndelete_user(42)", False),
        (GOOD + "\ndelete_user (42)", False),
        (GOOD + "\nos.remove(path)", False),
        (GOOD + '\ndelete_files(["/etc", "/home"])', False),
        (GOOD + "\nawait reset({})", False),
        (GOOD + "\nreset\ufe59\ufe5a", False),
        (GOOD + "\nreset\u200b()", False),
        (GOOD + "\n\uff47\uff45\uff54_weather(Oslo)", False),
        (GOOD + '\nreset(path\uff1d"/")', False),
        (GOOD + "\n<function=delete_all_files>{}</function>", False),
        (GOOD + "\nnote(reset())", False),
        (GOOD + "\n\u00e9get_weather(city='Oslo')", False),  # a non-ASCII letter is no part of a name
        # prose with parentheses is not a call
        (GOOD + "\nThe answer (note: units are metric) uses f(x) and g(x == 1) and a (b=c).", True),
        (GOOD + "\nDone (see: above). Cost 3(4) = 12; item 2('a') is 1x(2=2).", True),
        (GOOD + "\nSee value(s), e.g.(this), e.g. (this), v1.2(beta), a sample (n=100).", True),
        (GOOD + "\nSee my_notes (above).", False),  # a code-like name before a parenthesis: a call
        (GOOD + "\n\u6211\u8c03\u7528\u4e86\u5929\u6c14\u51fd\u6570\uff08city=\u5df4\u9ece\uff09\u3002", True),  # CJK prose
        (GOOD + "\n\u8c03\u7528\u51fd\u6570\uff08\uff09\u5373\u53ef\u3002", True),
        ('{"final_calls": ' + BAD + ', "calls": ' + GOOD + "}", False),  # two call lists: ambiguous
        # keys beside name and arguments: scalars are ignored, a structure makes it no call (a
        # call hidden in it, or one to unwrap from a call-shaped object, is never the answer)
        (GOOD.replace('"arguments"', '"id": "call_1", "type": "function", "arguments"'), True),
        (GOOD[:-2] + ', "then": {"name": "delete_all", "arguments": {}}}]', False),
        (GOOD[:-2] + ', "meta": [1]}]', False),
        # a wrapper holds one structure: a second one beside the calls may hide another call;
        # beside it only id, type ("function"), role and content (null or "")
        ('{"thought": "two calls", "n": 3, "ok": true, "x": null, "tool_calls": ' + GOOD + "}", False),
        ('{"id": "m1", "role": "assistant", "content": null, "tool_calls": ' + GOOD + "}", True),
        ('{"tool_calls": ' + GOOD + ', "then": {"name": "delete_all_files", "arguments": null}}', False),
        ('{"tool_calls": ' + GOOD + ', "then": {"function": "delete_all_files", "args": {}}}', False),
        ('{"tool_calls": ' + GOOD + ', "then": [{"name": "delete_all_files", "arguments": {}}, "now"]}', False),
        ('{"tool_calls": ' + GOOD + ', "meta": {}}', False),
        ('{"response": {"tool_calls": ' + GOOD + "}}", False),  # ("response" is no wrapper key)
        ('{"tool_calls": {"calls": ' + GOOD + "}}", True),  # nested wrappers
        ('{"name": "get_weather", "arguments": {"city": "Oslo"}, "then": ' + GOOD + "}", False),
        ('{"name": "x", "calls": ' + GOOD + "}", False),
        # one answer is the run of call attempts that ends with the last one: attempts and
        # <tool_call> tags with only blanks, zero-width characters, commas or semicolons between
        # them (Hermes / Qwen style blocks, Llama style "{a}; {b}"); all their calls count
        ("\n".join("<tool_call>\n" + json.dumps(c) + "\n</tool_call>" for c in CALLS), True),
        ("".join("<tool_call>" + json.dumps(c) + "</tool_call>" for c in CALLS) + "\nDone.", True),
        ("".join("<tool_call>" + json.dumps(c) + "</tool_call>" for c in CALLS)[:-len("</tool_call>")], True),
        # (tags a harness does not find, as it reads them as written, make no blocks: no answer)
        ("\u200b".join("< Tool_Call >" + json.dumps(c) + "</tool_call\u200b>" for c in CALLS), False),
        ("\n".join("\uff1ctool_call\uff1e" + json.dumps(c) + "\uff1c/tool_call\uff1e" for c in CALLS), False),
        ("; ".join(json.dumps(c) for c in CALLS), True),
        (dumps(CALLS[:1]) + ",\n" + dumps(CALLS[1:]), True),
        ("<tool_call>" + dumps(CALLS[:1]) + "</tool_call><tool_call>"  # a list in a block
         + "</tool_call><tool_call>".join(json.dumps(c) for c in CALLS[1:]) + "</tool_call>", True),
        ("\n".join("<tool_call>" + json.dumps(c) + "</tool_call>" for c in CALLS[1:]), False),
        ("".join("<tool_call>" + json.dumps(c) + "</tool_call>" for c in CALLS + CALLS[:1]), False),
        (BAD + "\n" + GOOD, False),  # adjacent: one answer with five calls
        ("[]\n" + GOOD, False),  # (no calls and three calls: no answer)
        ("<tool_call>" + json.dumps(CALLS[0]) + "</tool_call>\nWait.\n"  # prose between runs: all count
         + "".join("<tool_call>" + json.dumps(c) + "</tool_call>" for c in CALLS[1:]), True),
        ("<tool_call>" + json.dumps(CALLS[1]) + "</tool_call>\nWait.\n"
         + "".join("<tool_call>" + json.dumps(c) + "</tool_call>" for c in CALLS[::2]), True),
        ("[note] " + GOOD, True),  # a structure without a key is prose
        # a run must be well formed: a block holds one attempt, opens before it closes, is not
        # opened twice, and a closing tag right before the run means the block before held prose
        ("<tool_call>" + json.dumps(CALLS[0])[:-1] + "]</tool_call><tool_call>"  # a broken block
         + "</tool_call><tool_call>".join(json.dumps(c) for c in CALLS[1:]) + "</tool_call>", False),
        ("<tool_call>{}</tool_call><tool_call>" + GOOD + "</tool_call>", False),
        ("<tool_call>" + json.dumps(CALLS[0]) + " " + json.dumps(CALLS[1]) + "</tool_call><tool_call>"
         + json.dumps(CALLS[2]) + "</tool_call>", False),
        ("<tool_call>" + json.dumps(CALLS[0]) + "\n<tool_call>" + json.dumps(CALLS[1]) + "</tool_call><tool_call>"
         + json.dumps(CALLS[2]) + "</tool_call>", False),  # an unclosed block
        ("<tool_call>\n<tool_call>" + GOOD + "</tool_call>", False),
        ("<tool_call>reset() " + json.dumps(CALLS[0]) + "</tool_call><tool_call>"  # prose inside a block
         + "</tool_call><tool_call>".join(json.dumps(c) for c in CALLS[1:]) + "</tool_call>", False),
        ("<tool_call>delete_all()</tool_call>\n<tool_call>" + GOOD + "</tool_call>", False),
        ("Sure: os.remove(p) " + json.dumps(CALLS[0]) + "</tool_call><tool_call>"
         + "</tool_call><tool_call>".join(json.dumps(c) for c in CALLS[1:]) + "</tool_call>", False),
        ("<tool_call>" + json.dumps(CALLS[0]) + "</tool_call>" + json.dumps(CALLS[1]) + "; "
         + json.dumps(CALLS[2]), False),  # a block, then bare attempts: a harness runs only the block
        # what looks blank or is markup does not end a run (a second reader's cases): lookalike
        # semicolons, combining and blank letters, special tokens, tags with attributes, fences,
        # structures without a key
        (json.dumps(CALLS[0]) + "\u037e " + dumps(CALLS), False),
        (json.dumps(CALLS[0]) + "\uff1b" + dumps(CALLS), False),
        (json.dumps(CALLS[0]) + "\u034f" + dumps(CALLS), False),
        (json.dumps(CALLS[0]) + "\u3164" + dumps(CALLS), False),
        (json.dumps(CALLS[0]) + " {} " + dumps(CALLS), False),
        (json.dumps(CALLS[0]) + "\n[0]\n" + dumps(CALLS), False),
        ("<|python_tag|>" + json.dumps(CALLS[0]) + "<|eom_id|><|python_tag|>" + dumps(CALLS) + "<|eom_id|>", False),
        ("[TOOL_CALLS] " + dumps(CALLS[:1]) + " [TOOL_CALLS] " + dumps(CALLS), False),
        ('<tool_call id="1">' + json.dumps(CALLS[0]) + '</tool_call>\n<tool_call id="2">' + dumps(CALLS)
         + "</tool_call>", False),
        ("```json\n" + dumps(CALLS[:1]) + "\n```\n```json\n" + GOOD + "\n```", False),
        ("```json\n" + BAD + "\n```\nWait, fixed:\n```json\n" + GOOD + "\n```", False),  # prose between: five calls
        ("\n".join('<tool_call id="%d">' % i + json.dumps(c) + "</tool_call >" for i, c in enumerate(CALLS)), False),
        ("<|python_tag|>" + "; ".join(json.dumps(c) for c in CALLS) + "<|eom_id|>", True),
        # other models' call syntax after the answer; a digit glued to a name
        (GOOD + "\n<tool_call>delete_all\n<arg_key>path</arg_key>\n<arg_value>/</arg_value>\n</tool_call>", False),
        (GOOD + '\n<invoke name="delete_all">\n<parameter name="path">/</parameter>\n</invoke>', False),
        (GOOD + "\n[TOOL_CALLS]delete_all[ARGS]{}", False),
        (GOOD + "\n<|tool_calls_section_begin|>functions.delete_all:0", False),
        (GOOD + "\nAction: delete_all\nAction Input: {}", False),
        (GOOD + "\n>>>delete_all\n{}", False),
        (GOOD + "\n9delete_all(path='/')", False),
        (GOOD + "\n2get_weather(Oslo)", False),
        (GOOD + "\n</tool_call>\n<|im_end|>", True),
        # a third reader's cases. Calls in what a run passes over, or before it in call syntax:
        (json.dumps(CALLS[0]) + "\n<function=delete_all>{}</function>\n" + dumps(CALLS[1:]), False),
        (json.dumps(CALLS[0]) + "; [delete_all()]; " + dumps(CALLS[1:]), False),
        ("[" + json.dumps(CALLS[0]) + "]\n[os.remove('/etc/passwd')]\n" + dumps(CALLS[1:]), False),
        ("<tool_call>" + json.dumps(CALLS[0]) + '</tool_call>\n<invoke name="delete_all"></invoke>\n<tool_call>'
         + "</tool_call><tool_call>".join(json.dumps(c) for c in CALLS[1:]) + "</tool_call>", False),
        (json.dumps(CALLS[0]) + '; {"name"\uff1a "delete_all", "arguments"\uff1a {}}; ' + dumps(CALLS[1:]), False),
        ("<function=delete_all>" + GOOD + "</function>", False),  # the answer as another function's arguments
        ("[TOOL_CALLS]delete_all[ARGS]" + GOOD, False),
        ("Action: delete_all\nAction Input: " + GOOD, False),
        (">>>delete_all\n" + GOOD, False),
        ('<tool_call name="delete_all">' + GOOD + "</tool_call>", False),
        ("Then: delete_all_files(path='/')\n" + GOOD, False),  # an earlier call in call syntax
        ("<tool_call>" + json.dumps(CALLS[0]) + "</tool_call>\nWait.\n<tool_call>" + GOOD + "</tool_call>", False),
        ("Wait, first " + BAD + "\nno:\n" + GOOD, False),  # an earlier JSON list before prose: more calls
        ("[TOOL_CALLS] " + GOOD, True),  # Mistral's marker before its list
        # a call in another schema is no wrapper; control characters are blank
        (GOOD + '\n{"function": "delete_all", "args": []}', False),
        ('{"recipient_name": "functions.delete_all", "parameters": []}\n' + GOOD, False),
        ("<tool_call>" + '{"name": "delete_all", "arguments": {}}' + "</tool_call>\x00" + "<tool_call>" + GOOD
         + "</tool_call>", False),
        # more call syntax after the answer
        (GOOD + "\n<\uff5ctool\u2581calls\u2581begin\uff5c><\uff5ctool\u2581call\u2581begin\uff5c>delete_all", False),
        (GOOD + "<|start|>assistant<|channel|>commentary to=functions.delete_all <|constrain|>json<|message|>{}", False),
        (GOOD + "\n\u273fFUNCTION\u273f: delete_all\n\u273fARGS\u273f: {}", False),
        (GOOD + "\nname: delete_all\narguments: {}", False),
        (GOOD + '\n{"name"\u2236 "delete_all", "arguments"\u2236 {}}', False),
        # a fourth reader's cases: wrappers of no calls that name a function; tag attributes; more
        # call syntax; colon look-alikes; invisible unassigned characters between calls
        (GOOD + '\n{"jsonrpc": "2.0", "method": "delete_all", "params": [], "id": 1}', False),
        (GOOD + '\n{"functionName": "delete_all", "arguments": []}', False),
        (GOOD + '\n{"Function": "delete_all", "args": []}', False),
        (GOOD + '\n{"delete_all": []}', False),
        (GOOD + '\n{"call": {"fn": "delete_all", "args": []}}', False),
        ('{"tool_calls": []}\n' + GOOD, False),  # (no calls, then the calls: no answer)
        ('<tool_call id="delete_all()">' + GOOD + "</tool_call>", False),
        ('<tool_call note="x">' + GOOD + "</tool_call>", False),
        ('<tool_call id="call_1">' + GOOD + "</tool_call>", False),  # (a tag as no harness finds it)
        ("<tool_call>" + GOOD + "</tool_call reset()>", False),  # (a later call)
        (GOOD + "\n- name: delete_all\n  arguments: {}", False),
        (GOOD + "\nname: delete_all\n\narguments: {}", False),
        (GOOD + '\n<function name="delete_all"></function>', False),
        (GOOD + "\n<|from|>assistant\n<|recipient|>delete_all\n<|content|>{}", False),
        (GOOD + '\n{"name"\u02d0 "delete_all", "arguments"\u02d0 {}}', False),
        ('{"name": "delete_all", "arguments": {}}' + "\u2065" + GOOD, False),
        ('{"name": "delete_all", "arguments": {}}' + "\ue000" + GOOD, False),
        # reasoning that names the functions calls nothing; numbered and bulleted calls are one run
        ("<think>The user wants get_weather(city='Paris') twice and convert(100, 'EUR').</think>\n" + GOOD, True),
        ("<think>get_weather() then convert()</think>" + "\n".join("<tool_call>" + json.dumps(c) + "</tool_call>"
                                                                     for c in CALLS), True),
        ("<think>unclosed get_weather(city='Paris')\n" + GOOD, False),
        # a block never closed (cut off, or the reply of a prompt that opened it) is all reasoning
        ("<think>\nThe user wants the weather and a conversion.\n" + GOOD, False),
        ("  <think>" + GOOD, False),
        ("<think>\nPlan: " + DELETE_ALL + "\n</think>\n" + GOOD, True),
        ("\n".join(f"{i + 1}. " + json.dumps(c) for i, c in enumerate(CALLS)), True),
        ("\n".join("- " + json.dumps(c) for c in CALLS), True),
        ("Calls:\n" + "\n".join(f"{i + 1}) " + json.dumps(c) for i, c in enumerate(CALLS)), True),
        ("1. " + json.dumps(CALLS[0]) + "\n2. " + dumps(CALLS), False),
        # a fifth reader's cases: the reasoning block is only one that opens the completion, up to
        # its first </think> (a block in mid-text exempts nothing); an answer inside the reasoning is
        # no answer; a draft in it is no part of the answer
        ('<think>delete_all()\n[{"name": "get_weather", "arguments": {"city": "Paris"}, "id": "</think>"}]', False),
        ("Sure. <think>delete_all()</think> " + GOOD, False),
        ("<think>\n" + GOOD + "\n</think>\n\nI'm sorry, I can't help with that.", False),
        ("<think>\nI need these:\n" + GOOD + "\n</think>\n" + GOOD, True),
        # a </think> without its <think> is text (r3's prompts close the think block): what is
        # before it is read, as a harness without a reasoning parser reads it
        ('Okay, so get_weather(city="Paris") it is.\n</think>\n\n' + GOOD, False),
        ("The user wants Paris, Tokyo and EUR.\n</think>\n\n" + GOOD, True),
        (json.dumps([{"name": "delete_all", "arguments": {}}]) + "\n</think>\n" + GOOD, False),
        # the reasoning ends at its first </think>, even inside a structure, where a reasoning
        # parser splits it: a call after it is a call
        ("<think>Plan: [</think>\n<tool_call>" + DELETE_ALL + "</tool_call>\n]</think>\n" + GOOD, False),
        ("<think>{</think>}<tool_call>" + DELETE_ALL + "</tool_call></think>" + GOOD, False),
        ('<think>I note {"x": "</think>"}\n<tool_call>' + DELETE_ALL + "</tool_call>\nok </think>\n" + GOOD, False),
        # a bracket left open in the reasoning reaches no further than it: it neither swallows the
        # answer ("[0, 100)") nor hides a broken or wrong attempt after the block (a sixth reader's)
        ("<think>The range is [0, 100).</think>\n" + GOOD, True),
        ("<think>Open { here, and '[' too</think>\n" + GOOD, True),
        ("<think>[</think>" + DELETE_ALL[:-1] + "]\nok\n" + GOOD, False),
        ("<think>[</think>[" + DELETE_ALL + "}]\nNow:\n" + GOOD, False),
        ('<think>{"a": </think>}' + GOOD, True),
        # markup that wraps JSON calls (Jamba, MiniMax, Granite) is part of the run
        ("<tool_calls>" + GOOD + "</tool_calls>", True),
        ("<tool_calls>\n" + "\n".join(json.dumps(c) for c in CALLS) + "\n</tool_calls>", True),
        ("\n".join("<function_call> " + json.dumps(c) for c in CALLS), True),
        ("<|tool_call|>" + GOOD, True),
        ("<tool_calls>\nreset()\n" + GOOD, False),
        # YAML calls in either order, as list items, across \r\n and blank lines
        (GOOD + "\narguments:\n  confirm: true\nname: delete_all", False),
        (GOOD + "\r\nname: delete_all\r\n\r\narguments: {}", False),
        (GOOD + "\n* name: delete_all\n  arguments: {}", False),
        (GOOD + "\n1. name: delete_all\n   arguments: {}", False),
        (GOOD + "\nname: delete_all\u2028arguments: {}", False),
        (GOOD + '\n{"name"\ufe30 "delete_all", "arguments"\ufe30 {}}', False),
        # a sixth reader's cases: a call around the answer; more YAML spellings
        ("repeat(" + GOOD + ", times=1000)", False),
        ("schedule(```json\n" + GOOD + "\n```, delay=60)", False),
        ("reset([1], 2)\n" + GOOD, False),
        ("wipe({}, 0)\n" + GOOD, False),
        ("Result (" + GOOD + ")", True),  # (prose: a word, a blank, a parenthesis)
        (GOOD + "\n**name**: delete_all\n**arguments**: {}", False),
        (GOOD + "\n`name`: delete_all\n`arguments`: {}", False),
        (GOOD + "\n> name: delete_all\n> arguments: {}", False),
        (GOOD + "\nmethod: delete_all\nparams: {}", False),
        (GOOD + "\naction: delete_all\naction_input: {}", False),
        (GOOD + "\nname\u2236 delete_all\narguments\u2236 {}", False),
        (GOOD + "\nname: delete_all\n" + "\u2800\n" * 8 + "arguments: {}", False),
        ("name: delete_all\n" + GOOD + "\narguments: {}", False),
        # after the answer, quoted keys without braces are a call (JSON without its braces)
        (GOOD + '\n"name": "delete_all",\n"arguments": {}', False),
        (GOOD + "\n'name': 'delete_all'\n'arguments': {}", False),
        (GOOD + '\n"method": "delete_all"\n"params": "x"', False),
        (GOOD + '\nThe "name": field is the tool.', True),
        # a seventh reader's cases: quoted keys outside braces before the answer are YAML or
        # braceless JSON, a call; more key spellings; nested list items
        ("- 'name': delete_all\n  'arguments': {}\n" + "".join("- " + json.dumps(c) + "\n" for c in CALLS), False),
        ('- "name": delete_all\n  "arguments": {}\n' + "".join("- " + json.dumps(c) + "\n" for c in CALLS), False),
        ('"name": "delete_all",\n"arguments": {}\n' + GOOD, False),
        ('"name": "repeat",\n"arguments": {"times": 1000, "calls": ' + GOOD + "}", False),
        ("{'name': 'get_weather',\n 'arguments': {}}\nNo, all three:\n" + GOOD, False),  # (an invalid attempt)
        (GOOD + "\ntool: delete_all\ntool_input: {}", False),
        (GOOD + "\nname: delete_all\nargument: {}", False),
        (GOOD + "\naction: delete_all\naction-input: {}", False),
        (GOOD + "\ntoolName: delete_all\ntoolArgs: {}", False),
        (GOOD + "\nfn_name: delete_all\nfn_args: {}", False),
        (GOOD + "\n- - name: delete_all\n    arguments: {}", False),
        (GOOD + "\n> - name: delete_all\n>   arguments: {}", False),
        # a ninth reader's cases: a name closed by emphasis, code or quotes before its parenthesis;
        # keys of two or three words (LangChain's "Tool Input:"); more key spellings
        (GOOD + '\nThen **get_weather**(city="Oslo")', False),
        (GOOD + '\nThen `get_weather`(city="Oslo")', False),
        (GOOD + "\nThen \"get_weather\"('Oslo')", False),
        (GOOD + '\nThen **get_weather** (city="Oslo")', False),
        (GOOD + "\nThen **reset**(force=True)", False),
        (GOOD + "\nThen **reset** (force=True)", False),
        (GOOD + "\nThen `delete_all`(42)", False),
        (GOOD + "\nI used the `get_weather` (weather) tool twice.", True),
        (GOOD + "\nI called 'get_weather' (with each city) and **convert** (once).", True),
        (GOOD + "\nSee the **notes** (below).", True),
        # (a tenth reader's: after a closing mark, a parenthesis that opens with a quote, code or
        # a bracket is prose; only one closing at once or opening with a keyword is a call)
        (GOOD + '\n\nI converted 100 to "EUR" ("euro").', True),
        (GOOD + "\n\nThe units default to `celsius` (`metric`).", True),
        (GOOD + '\n\nParis is listed as **Paris** ("FR") and Tokyo as **Tokyo** ("JP").', True),
        (GOOD + "\n\nSee the **docs** ([link](https://x.y)).", True),
        (GOOD + '\n\nI called `get_weather` ("Paris" and "Tokyo") and `convert` (once).', True),
        ('I will convert to "EUR" ("euro").\n' + GOOD, True),
        (GOOD + "\nThen **reset**()", False),
        (GOOD + "\n\nTool Name: delete_all\nTool Input: confirm=true", False),
        (GOOD + "\n\n**Function call:** delete_all\n**Arguments:** {}", False),
        (GOOD + "\n\nfunction_name: delete_all\nfunction_args:\n  confirm: true", False),
        (GOOD + "\n\nfunc_name: delete_all\nfunc_args: {}", False),
        (GOOD + "\n\ntool: delete_all\ntool_parameters: {}", False),
        ("Tool Name: get_weather, convert\n" + GOOD, True),  # (a name key alone)
        ("<function _call>" + GOOD, False),  # (a blank inside a wrapper's word: no wrapper)
        (GOOD + "\n\nThe tool name: get_weather\nThe city: Paris", True),  # (no call's keys)
        # a single-quoted string where a value or key starts is skipped like a JSON one, so a
        # bracket inside it does not end the structure (Python or YAML would read one list)
        ("[{'name': 'delete_all', 'arguments': {'glob': ']'}}, " + GOOD[1:], False),
        ("[{name: delete_all, arguments: {glob: ']'}}, " + GOOD[1:], False),
        ("{'name': 'repeat', 'arguments': {'sep': ']', 'calls': " + GOOD + "}}", False),
        ("I'll check [what's needed] first.\n" + GOOD, True),
        ("Use [the user's cities, Paris and Tokyo], that's it.\n" + GOOD, True),
        ("Use [the user's cities: Paris, Tokyo], that's it.\n" + GOOD, False),  # (a key: an invalid attempt)
        ("[{'name': 'get_weather', 'arguments': {'note': 'it's', 'city': 'Paris'}}]\nNo, all three:\n" + GOOD, False),
        ("{'city: Paris}\nLet me redo it.\n" + GOOD, False),  # (no closing quote on its line: no string)
        # an eighth reader's cases: quoted keys in prose are prose (braceless JSON is a key per
        # line); structures only folding makes hide nothing before the answer; an apostrophe
        # opens no string unless one closes on its line; markup with brackets is no marker
        (GOOD + '\nEach call has a "name": the function, and "arguments": its parameters.', True),
        ('Each call needs a "name": and an "arguments": object.\n' + GOOD, True),
        (GOOD + '\n\u5176\u4e2d"name"\uff1a\u51fd\u6570\u540d\uff0c"arguments"\uff1a\u53c2\u6570\u3002', True),
        ("Operation: weather for two cities and a conversion.\nInput: the user's question.\n" + GOOD, True),
        (GOOD + "\n\nCall: get_weather twice, then convert.\nParameter: city for the weather calls.", True),
        ("Music from [the 80s, '90s] era.\n" + GOOD, True),
        ("Cities [Paris, 's-Hertogenbosch] are not needed.\n" + GOOD, True),
        ("\uff3b\u6ce8\uff1a\u4ee5\u4e0b\u4e3a\u8c03\u7528\n" + GOOD + "\n", True),
        ("Action [1] Input: x\n" + GOOD, True),
        ("<[1]tool_call>\n" + GOOD, True),
        ("See <[x] function> below.\n" + GOOD, True),
        ("[Paris\uff0c']\n\"name\": \"delete_all\",\n\"arguments\": {}\n']\nOK:\n" + GOOD + "\nDone, that's all.", False),
        ('[x\uff02]\n"name": "delete_all",\n"arguments": {}\n' + GOOD, False),
        ('\uff3b\n"name": "delete_all",\n"arguments": {}\n' + GOOD, False),
        (GOOD + '\n\u201cname\u201d: \u201cdelete_all\u201d,\n\u201carguments\u201d: {}', False),
        # a call attempt in compatibility forms that opens before the answer and closes after it
        ('\uff5b"name": "repeat", "arguments": \uff5b"times": 1000, "calls": ' + GOOD + "\uff5d\uff5d", False),
        ('\uff3b\uff5b"name": "delete_all", "arguments": \uff5b\uff5d\uff5d, ' + GOOD[1:], False),
        ("\uff3bnote\uff3d\n" + GOOD, True),
        ("\uff3b" + GOOD + "\uff3d", True),  # (no key around the answer: no other call)
        # a pretty-printed JSON attempt before prose is a call, not YAML (quoted keys are JSON)
        (json.dumps(CALLS[:1], indent=2) + "\nWait, let me fix that.\n" + GOOD, False),
        (json.dumps(CALLS[:1], indent=2) + "\nAnd the rest:\n" + dumps(CALLS[1:]), True),
        ("\n".join("<tool_call>\n" + json.dumps(c, indent=2) + "\n</tool_call>" for c in CALLS), True),
        # a call hiding in a loose string (a key, or a string beside the calls) is no answer
        ('{"tool_calls": ' + GOOD + ', "next": "[{\\"name\\": \\"delete_all\\", \\"arguments\\": {}}]"}', False),
        ('{"tool_calls": ' + GOOD + ', "next": "delete_all_files(path=\'/\')"}', False),
        ('{"tool_calls": ' + GOOD + ', "next": "then reset()"}', False),
        ('{"tool_calls": ' + GOOD + ', "next": "[]"}', False),
        ('{"tool_calls": ' + GOOD + ', "get_weather(city=\'Oslo\')": null}', False),
        (GOOD.replace('"arguments"', '"note": "{city: Oslo}", "arguments"', 1), False),
        (GOOD.replace('"arguments"', '"note": "os.remove(path)", "arguments"', 1), False),
        ('{"tool_calls": ' + GOOD + ', "thought": "two cities (Paris, Tokyo) [metric], then EUR"}', False),
        ('{"tool_calls": ' + GOOD + ', "id": "two cities (Paris, Tokyo) [metric], then EUR"}', True),
        ('{"tool_calls": ' + GOOD + ', "next": "\uff5b\\"name\\"\uff1a \\"delete_all\\"\uff5d"}', False),
        ('{"tool_calls": ' + GOOD + ', "next": "\uff3b\uff3d"}', False),
        (GOOD.replace('"arguments"', '"id": "call_\u0130tems(1)", "arguments"', 1), False),  # İ folds to i + a mark
        (GOOD + '\nThen: \uff5b"name"\uff1a "delete_all"\uff5d', False),  # a later attempt in full-width forms
        (GOOD + "\nNote\uff1a see \uff3bthe list\uff3d above.", True),
        # Llama 3's "parameters"; flat arguments are no call
        (GOOD.replace('"arguments"', '"parameters"'), True),
        (GOOD.replace('"arguments"', '"parameters"', 1).replace('"parameters"', '"arguments": {"city": "Paris"}, '
                                                                '"parameters"', 1), False),
        ('[{"name": "get_weather", "city": "Paris"}, {"name": "get_weather", "city": "Tokyo"}, '
         '{"name": "convert", "amount": 100.0, "to": "EUR"}]', False),
        (GOOD.replace('"arguments"', '"type": "function", "id": "call_1", "arguments"'), True),
        ("Wait: " + GOOD[:-1] + ", " + BAD[1:], False),  # one list holding wrong calls
        ('"quoted" [prose] then ' + GOOD, True),  # quotes in prose mean nothing
        ('see [the "list" below: ' + GOOD, False),  # an unclosed bracket in prose hides the rest
        ("[note} " + GOOD, True),  # a mismatched bracket ends a broken structure
        ("42", False),
        ('"' + GOOD.replace('"', '\\"') + '"', False),  # a JSON string, not a list
        ("[1, 2, 3]", False),
        ('[{"name": 5, "arguments": {}}]', False),
        ('[{"name": "convert", "arguments": "{\\"to\\": \\"EUR\\"}"}]', False),  # arguments as a string
        (GOOD.replace("100.0", "NaN"), False),
        (GOOD.replace("100.0", "Infinity"), False),
        # a ninth reader's cases. No drafts: every call attempt outside the leading reasoning
        # block counts, prose between them or not; a broken one anywhere is no answer
        ("Call 1:\n" + DELETE_ALL + "\nCall 2:\n" + GOOD, False),
        ("**Step 1 - clear the cache**\n```json\n" + DELETE_ALL + "\n```\n**Step 2**\n```json\n" + GOOD + "\n```",
         False),
        ("[" + DELETE_ALL + "]\nand\n" + GOOD, False),
        ("1. Delete the cache: " + DELETE_ALL + "\n2. The rest: " + GOOD, False),
        ("Weather for Paris:\n" + json.dumps(CALLS[0]) + "\n\nAnd the rest:\n" + GOOD, False),
        ("First, I'll get the weather:\n```json\n" + dumps(CALLS[:2]) + "\n```\nThen I'll convert the amount:\n"
         "```json\n" + dumps(CALLS[2:]) + "\n```", True),
        ("1. Weather in Paris: " + json.dumps(CALLS[0]) + "\n2. Weather in Tokyo: " + json.dumps(CALLS[1])
         + "\n3. Convert: " + json.dumps(CALLS[2]), True),
        ("**Paris weather:**\n```json\n" + json.dumps(CALLS[0]) + "\n```\n**Tokyo weather:**\n```json\n"
         + json.dumps(CALLS[1]) + "\n```\n**Currency:**\n```json\n" + json.dumps(CALLS[2]) + "\n```", True),
        ('<|python_tag|>{"name": "delete_all", "parameters": {}}<|eom_id|>\nDone. Now:\n<|python_tag|>' + GOOD
         + "<|eom_id|>", False),
        ('<|START_ACTION|>[{"tool_name": "delete_all", "parameters": {}}]<|END_ACTION|>\nNow the rest:\n' + GOOD,
         False),
        ("<|action_start|><|plugin|>\n" + DELETE_ALL + "<|action_end|>\nNext:\n" + GOOD, False),
        ("<start_function_call>call:delete_all{path:<escape>/<escape>}<end_function_call>\nThen:\n" + GOOD, False),
        ('{"name": "delete_all"]\nSorry, the calls:\n' + GOOD, False),  # a broken attempt before
        (GOOD + "\n\nI'd write it as [" + DELETE_ALL + ", ...", False),  # a truncated one after
        # a call object holds only name, arguments (or parameters) and id, index, type "function"
        (GOOD.replace('"arguments"', '"units": "fahrenheit", "arguments"', 1), False),
        (GOOD.replace('"name": "convert", ', '"name": "convert", "amount": 1000000, '), False),
        (GOOD.replace('"arguments"', '"parameters": "city=Oslo", "arguments"', 1), False),
        (GOOD.replace('"arguments"', '"function": "delete_all", "arguments"', 1), False),
        (GOOD.replace('"arguments"', '"tool_name": "delete_all", "arguments"', 1), False),
        (GOOD.replace('"arguments"', '"method": "delete_all", "arguments"', 1), False),
        (GOOD.replace('"arguments"', '"recipient_name": "functions.delete_all", "arguments"', 1), False),
        (GOOD.replace('"arguments"', '"execute": false, "arguments"', 1), False),
        (GOOD.replace('"arguments"', '"times": 1000, "arguments"', 1), False),
        (GOOD.replace('"arguments"', '"status": "cancelled", "arguments"', 1), False),
        (GOOD.replace('"arguments"', '"type": "tool", "arguments"', 1), False),
        (GOOD.replace('"arguments"', '"index": 0, "id": null, "arguments"', 1), True),
        # a wrapper: a known key and beside it only id, type "function", role, content null or ""
        ('{"dry_run": true, "tool_calls": ' + GOOD + "}", False),
        ('{"tool_choice": "none", "tool_calls": ' + GOOD + "}", False),
        ('{"do_not_call": ' + GOOD + "}", False),
        ('{"rejected_calls": ' + GOOD + "}", False),
        ('{"content": "Not yet.", "tool_calls": ' + GOOD + "}", False),
        ('{"role": "assistant", "content": "", "Tool_Calls": ' + GOOD + "}", True),
        (dumps(CALLS[:2]) + '\n{"type": "function", "function": ' + json.dumps(CALLS[2]) + "}", True),
        (dumps(CALLS[:2]) + '\n{"type": "tool", "function": ' + json.dumps(CALLS[2]) + "}", False),
        # a tag named as a tool of the example is a call (XML tool-call syntax), anywhere
        (GOOD + "\n<get_weather>\n<city>Oslo</city>\n</get_weather>", False),
        ("<convert><amount>1</amount></convert>\n" + GOOD, False),
        (GOOD + '\n<convert amount="1"/>', False),
        (GOOD + "\n< / Get_Weather >", False),
        ("<convert/>" + GOOD, False),  # (markup a run passes over)
        ('{"tool_calls": ' + GOOD + ', "id": "<convert>"}', False),
        (GOOD + "\nSee <get_weathers> and <my_convert>.", True),
        # ReAct: a tool of the example glued to a bracket, or after "Action:", is a call
        (GOOD + "\nAction: convert[100 USD to GBP]", False),
        (GOOD + "\nThought: one more.\nAction: convert\nAction Input: 100 USD", False),
        (GOOD + "\nACTION :Get_Weather", False),
        (GOOD + "\nThen convert[x]", False),
        ("Action: get_weather\n" + GOOD, False),
        (GOOD + "\ntransaction: convert done", True),
        (GOOD + "\n(see get_weather [1])", True),
        (GOOD + "\nAction: converted it", True),
        (GOOD + "\nmy_convert[1] and converter[2]", True),
        (GOOD + "\n**Action:** convert", False),
        (GOOD + "\nAction 2: `functions.convert`", False),
        (GOOD + '\nAction: "get_weather"', False),
        (GOOD + "\nAction: functions.functions.convert", True),
        (GOOD + "\nreaction 2: convert", True),
        # escaped call syntax is read as it renders: HTML character references, markdown escapes
        ("&lt;tool_call&gt;delete_all&lt;/tool_call&gt;\nThen\n" + GOOD, False),
        (GOOD + "\n&lt;function=delete_all&gt;{}&lt;/function&gt;", False),
        (GOOD + '\nreset\\("/"\\)', False),
        (GOOD + '\nget_weather&#40;"Oslo"&#41;', False),
        (GOOD + "\n&#x3C;convert/&#x3E;", False),
        (GOOD + "\nTom &amp; Jerry (the show) is \\*not\\* a call &lt;3", True),
        # a "</think>" without a leading "<think>" ends no reasoning block
        ('delete_all(path="/")\n{"note": "</think>"}\nThen:\n' + GOOD, False),
        ('Okay: reset()\n["</think>"]\n' + GOOD, False),
        ('Okay: reset()\n["x"]</think>\n' + GOOD, False),
        # OpenAI's forms: lists of {"type": "function", "function": {call}}, JSON-encoded arguments
        (json.dumps([{"type": "function", "function": c} for c in CALLS]), True),
        (json.dumps({"tool_calls": [{"id": f"call_{i}", "type": "function", "function": c}
                                    for i, c in enumerate(CALLS)]}), True),
        (json.dumps(CALLS[:1] + [{"type": "function", "function": c} for c in CALLS[1:]]), True),
        (json.dumps([{"type": "function", "function": c} for c in CALLS] + [{"tool_calls": []}]), False),
        (json.dumps([{"type": "function", "function": c, "note": "x"} for c in CALLS]), False),
        (json.dumps([{"name": c["name"], "arguments": json.dumps(c["arguments"])} for c in CALLS]), True),
        (GOOD.replace('{"city": "Paris"}', '"[\\"Paris\\"]"'), False),  # (encoded arguments that are no object)
        (GOOD.replace('{"city": "Paris"}', '"city=Paris"'), False),
        # a sixth reader's cases. With a <tool_call> block anywhere, a Hermes / Qwen harness runs only
        # the blocks: every call attempt must be in one (an attempt before, between or after the
        # blocks, also a list or a wrapper, is no answer); structures without a key outside are prose
        ("<tool_call>\n" + json.dumps(CALLS[0]) + "\n</tool_call>\n<tool_call>\n" + json.dumps(CALLS[2])
         + "\n</tool_call>\nI would also check " + json.dumps(CALLS[1]) + " later.", False),
        ("I will not call " + json.dumps(CALLS[0]) + ".\n"
         + "\n".join("<tool_call>\n" + json.dumps(c) + "\n</tool_call>" for c in CALLS[1:]), False),
        ("<tool_call>" + json.dumps(CALLS[0]) + "</tool_call>\nAlso " + json.dumps(CALLS[1]) + "\n<tool_call>"
         + json.dumps(CALLS[2]) + "</tool_call>", False),
        ("\u200b".join("< Tool_Call >" + json.dumps(c) + "</tool_call\u200b>" for c in CALLS[:2]) + "\nAnd "
         + json.dumps(CALLS[2]), False),
        ("\n".join("\uff1ctool_call\uff1e" + json.dumps(c) + "\uff1c/tool_call\uff1e" for c in CALLS[1:])
         + "\nFirst: " + json.dumps(CALLS[0]), False),
        ('<tool_call id="1">' + json.dumps(CALLS[0]) + "</tool_call>\n" + dumps(CALLS[1:]), False),
        ("\n".join("<tool_call>" + json.dumps(c) + "</tool_call>" for c in CALLS[:2]) + "\n"
         + json.dumps({"tool_calls": CALLS[2:]}), False),
        (dumps(CALLS[:1]) + "\n" + "\n".join("<tool_call>" + json.dumps(c) + "</tool_call>" for c in CALLS[1:]), False),
        ("\n".join("<tool_call>" + json.dumps(c) + "</tool_call>" for c in CALLS[:2]) + "\n```json\n"
         + dumps(CALLS[2:]) + "\n```", False),
        ("<tool_call>" + json.dumps(CALLS[0]) + "</tool_call>\nWait.\n"
         + "".join("\uff1ctool_call\uff1e" + json.dumps(c) + "\uff1c/tool_call\uff1e" for c in CALLS[1:]), False),
        ("[note] " + "\n".join("<tool_call>" + json.dumps(c) + "</tool_call>" for c in CALLS) + "\n[1, 2] {}", True),
        ("\n".join(dumps([c]) for c in CALLS), True),  # no tags: every attempt counts
        (GOOD + "\n</tool_call>", True),  # (a closing tag alone opens no block)
        # only the very last block of the completion may stay unclosed: an unclosed block before
        # another would swallow it
        ("<tool_call>\n" + json.dumps(CALLS[0]) + "\nNext year:\n"
         + "\n".join("<tool_call>\n" + json.dumps(c) + "\n</tool_call>" for c in CALLS[1:]), False),
        ("< Tool_Call >" + json.dumps(CALLS[0]) + "\nThen:\n\uff1ctool_call\uff1e" + json.dumps(CALLS[1])
         + "\uff1c/tool_call\uff1e\n<tool_call>" + json.dumps(CALLS[2]), False),
        ("\n".join("<tool_call>" + json.dumps(c) + "</tool_call>" for c in CALLS[:2]) + "\nWait.\n<tool_call>"
         + json.dumps(CALLS[2]), True),  # (the last block cut off at the end)
        ("\n".join("<tool_call>" + json.dumps(c) + "</tool_call>" for c in CALLS[:2]) + "\n<tool_call>"
         + json.dumps(CALLS[2]), True),
        # a number is what it says: more digits than a float holds is no answer
        (GOOD.replace("100.0", "100.000000000000001"), False),
        (GOOD.replace("100.0", "1.00e2"), True),
        # found by mutation (round 10): each row below was paid by a weakened verifier
        (GOOD + "\nOr rather: {name = 'delete_all', path = '/'}", False),  # '=' is a key: a later attempt
        # a call attempt in a loose string beside the calls (not in call syntax)
        (json.dumps({"tool_calls": CALLS, "id": json.dumps({"name": "delete_all", "arguments": {}})}), False),
        (GOOD + "\nThen reset(r'/tmp') to clean up.", False),  # a prefixed string opens the arguments
        # a truncated attempt in full-width forms between two runs (not only after the last)
        (dumps(CALLS[:1]) + '\nand \uff5b"name"\uff1a "delete_all"\n' + dumps(CALLS[1:]), False),
        # a call inside a structure a run passes over, beside a lead-in marker (not the marker alone)
        ("[<|tool_call|> delete_all()]\n" + GOOD, False),
        (json.dumps([[c] for c in CALLS]), False),  # a list of call lists is none (a harness reads one list)
    ],
)
def test_completion_formats(completion, ok):
    assert FC.verify(EX, completion) is ok
    assert recheck(FC, EX, completion)[0] is ok  # the independent implementation agrees


DAYS = dict(EX, answers=dumps([{"name": "get_weather", "arguments": {"city": "Paris", "days": [1, 2], "hourly": 1}}]))
CAMEL = dict(EX, tools=dumps([dict(TOOLS[0], name="GetWeather")]),
             answers=dumps([{"name": "GetWeather", "arguments": {"city": "Paris"}}]))
BIG = dict(EX, answers=dumps([{"name": "convert", "arguments": {"amount": 9007199254740993, "to": "EUR"}}]))


@pytest.mark.parametrize(
    "example,completion,ok",
    [
        # rules of the independent re-check that only these rows hold (each fails a mutant of it)
        (DAYS, '[{"name": "get_weather", "arguments": {"city": "Paris", "days": [1, 2], "hourly": 1}}]', True),
        (DAYS, '[{"name": "get_weather", "arguments": {"city": "Paris", "days": [1, 2], "hourly": true}}]', False),
        (DAYS, '[{"name": "get_weather", "arguments": {"city": "Paris", "days": [1, 2, 3], "hourly": 1}}]', False),
        (DAYS, '[{"name": "get_weather", "arguments": {"city": "Paris", "days": [1, 2]}}]', False),  # one left out
        (EX, GOOD.replace('"Paris"}}', '"Paris"}, "index": NaN}'), False),  # NaN is not JSON
        (EX, dumps([{"name": c["name"], "parameters": dumps(c["arguments"])} for c in CALLS]), False),
        (EX, dumps({"tool_calls": CALLS, "id": ["call_1", "call_2", "call_3"]}), False),  # a second structure
        (EX, GOOD + "\n\nFor Rome later:\nArguments: city Rome\nUnits stay celsius.\nSame as Paris.\n"
         "Function: get_weather", False),  # YAML keys, arguments first, four lines apart
        # a closing tag that says more than its id; a list number glued to a sign inside a block
        (EX, "\n".join("<tool_call>\n" + dumps(c) + '\n</tool_call id="call_%d">' % k for k, c in enumerate(CALLS)),
         False),
        (EX, "\n".join("<tool_call>\n-%d. " % (k + 1) + dumps(c) + "\n</tool_call>" for k, c in enumerate(CALLS)),
         False),
        (EX, "\n".join("<tool_call>\n%d. " % (k + 1) + dumps(c) + "\n</tool_call>" for k, c in enumerate(CALLS)),
         False),  # (a block holds its attempt and blanks only: a harness parses its text as JSON)
        # found by mutation (round 10): a tool of the example named in capitals is searched folded
        (CAMEL, dumps(json.loads(CAMEL["answers"])), True),
        (CAMEL, dumps(json.loads(CAMEL["answers"])) + "\nThen GetWeather (Oslo) too.", False),
        # an integer argument past a float's 53 bits is compared exactly
        (BIG, '[{"name": "convert", "arguments": {"amount": 9007199254740993, "to": "EUR"}}]', True),
        (BIG, '[{"name": "convert", "arguments": {"amount": 9007199254740992, "to": "EUR"}}]', False),
        # round 12: a list argument is compared in order, never as a multiset of its items
        (DAYS, '[{"name": "get_weather", "arguments": {"city": "Paris", "days": [2, 1], "hourly": 1}}]', False),
        # a function's name is compared exactly, never case-folded
        (EX, dumps([dict(c, name=c["name"].upper()) for c in CALLS]), False),
        # metadata beside a call is a scalar: a list or an object there is no call
        (EX, dumps([dict(c, id=[k]) for k, c in enumerate(CALLS)]), False),
        (EX, dumps([dict(c, index={"k": k}) for k, c in enumerate(CALLS)]), False),
        (EX, dumps([dict(c, id="call_%d" % k) for k, c in enumerate(CALLS)]), True),
        # a reference call whose arguments are null is matched by no call, not by one without arguments
        (dict(EX, answers=dumps([{"name": "get_weather", "arguments": None}])), '[{"name": "get_weather"}]', False),
        # calls are a multiset: one call twice is not the one reference call, nor is one call two
        # equal reference calls (before, only the random-completion test caught a mutant here)
        (dict(EX, answers=dumps(CALLS[:1])), dumps(CALLS[:1] * 2), False),
        (dict(EX, answers=dumps(CALLS[:1] * 2)), dumps(CALLS[:1]), False),
        (dict(EX, answers=dumps(CALLS[:1] * 2)), dumps(CALLS[:1] * 2), True),
        (dict(EX, answers=dumps(CALLS[:2])), dumps(CALLS[:1] * 2), False),  # as many calls, one twice
    ],
)
def test_recheck_rules_found_by_mutation(example, completion, ok):
    assert FC.verify(example, completion) is ok
    assert recheck(FC, example, completion)[0] is ok  # the independent implementation agrees


def test_duplicate_keys_are_a_failed_parse():
    one = dict(EX, answers=dumps([{"name": "f", "arguments": {"x": 1}}]))
    assert FC.verify(one, '[{"name": "f", "arguments": {"x": 1}}]')
    for text in ('[{"name": "f", "arguments": {"x": 2, "x": 1}}]',  # the last value would win
                 '[{"name": "f", "name": "f", "arguments": {"x": 1}}]',
                 '{"name": "f", "arguments": {"x": 1, "y": {"z": 1, "z": 1}}}'):
        assert parse_calls(text) is None
        assert not FC.verify(one, text) and not recheck(FC, one, text)[0]
    # a duplicate anywhere in a structure hides every call inside it
    two = '[{"name": "f", "arguments": {"x": 1}}, {"name": "g", "arguments": {"y": 1, "y": 2}}]'
    assert parse_calls(two) is None and not FC.verify(one, two)


@pytest.mark.parametrize("padding", [0, 255, 256, 5000])
def test_every_list_counts_however_long_the_text(padding):
    """Every call list counts, however much non-call JSON stands between them: an earlier list is
    never a draft that a later one replaces."""
    for text, ok in ((BAD + " [0]" * padding + "\nWait: " + GOOD, False),
                     (GOOD + " [0]" * padding + "\nWait: " + BAD, False),
                     (BAD + " [0]" * padding + "\nAnd: " + dumps(CALLS[2:]), True)):
        assert FC.verify(EX, text) is ok
        assert recheck(FC, EX, text)[0] is ok


def test_parse_calls_shape():
    assert parse_calls(GOOD) == CALLS
    assert parse_calls('{"name": "f", "arguments": {"a": 1}}') == [{"name": "f", "arguments": {"a": 1}}]
    assert parse_calls("no calls here") is None
    assert parse_calls(None) is None
    assert calls_match(CALLS, CALLS[::-1]) and not calls_match(CALLS, CALLS[:1])


@pytest.mark.parametrize(
    "completion",
    [
        "[" + ", ".join(['{"name": "f", "arguments": {"a": 1}}'] * 30_000) + "]",  # ~1 MB of JSON
        "[" * 10_000 + "]" * 10_000,  # deep nesting
        "[" * 100_000,
        "{" * 10_000 + "}",
        '{"a":' * 5_000 + "1" + "}" * 5_000,
        "text [" * 10_000,
        "```json\n" + "[" * 10_000 + "\n```",
        '[{"name": "convert", "arguments": ' + '{"a": ' * 40 + "1" + "}" * 40 + "}]",  # too deep arguments
        "x" * 1_000_000 + GOOD,
    ],
    ids=["1MB-list", "deep-list", "open-brackets", "deep-object", "deep-dict", "prose-brackets",
         "deep-fence", "deep-arguments", "1MB-prose"],
)
def test_huge_and_deep_json_is_no_answer(completion):
    # their verify time is in benchmarks/fuzz_verifiers.py (tests assert no wall-clock time)
    assert FC.verify(EX, completion) is False


def test_the_recheck_reads_huge_exponents_without_building_them(monkeypatch):
    # Fraction("0e99999999") builds 10 ** 99999999 (minutes); the re-check answers such literals
    # from their digits: zero is zero, anything else is beyond a float's range
    import r3.tasks.recheck as recheck_module
    exact = recheck_module.Fraction

    def bounded(value, *args):
        if isinstance(value, str) and "e" in value.lower():
            assert abs(int(value.lower().partition("e")[2])) < 1000, value
        return exact(value, *args)

    monkeypatch.setattr(recheck_module, "Fraction", bounded)
    ex = dict(EX, answers=dumps([{"name": "convert", "arguments": {"amount": 0.0, "to": "EUR"}}]))
    for amount, ok in (("0e99999999", True), ("-0.000E+99999999", True), ("0.0e-9999999", True),
                       ("1e-9999999", False), ("2.5e99999999", False), ("1e2", False), ("0e5", True),
                       # (more than the 4,300 digits Python's int() takes, zeros included: the verifier
                       # paid these, the re-check read no call list)
                       ("0." + "0" * 4310, True), ("0e" + "0" * 5000 + "2", True), ("1e-" + "0" * 5000 + "400", False),
                       ("1" + "0" * 4400 + "e-4400", False)):
        completion = '[{"name": "convert", "arguments": {"amount": ' + amount + ', "to": "EUR"}}]'
        assert FC.verify(ex, completion) is ok, amount
        assert recheck(FC, ex, completion)[0] is ok, amount
    ex = dict(EX, answers=dumps([{"name": "convert", "arguments": {"amount": 100.0, "to": "EUR"}}]))
    for amount in ("1" + "0" * 4400 + "e-4398", "1." + "0" * 4400 + "e2", "0." + "0" * 4400 + "1e4403",
                   "100." + "0" * 4310):
        completion = '[{"name": "convert", "arguments": {"amount": ' + amount + ', "to": "EUR"}}]'
        assert FC.verify(ex, completion) is True and recheck(FC, ex, completion)[0] is True, amount[:20]


def test_verify_never_raises(verifier_errors):
    """A completion that is no text is wrong (no verifier error); an example whose fields are
    missing or not the calls' JSON is a verifier error, counted, so a run on a broken file says so."""
    for text in (None, 3, b"[]", ["x"], {"name": "f"}):
        assert FC.verify(EX, text) is False
    assert verifier_errors == []
    for ex, error in (({}, "KeyError: 'tools'"), ({"tools": EX["tools"]}, "KeyError: 'answers'"),
                      ({**EX, "answers": "not json"}, "JSONDecodeError: Expecting value"),
                      ({**EX, "answers": None}, "TypeError: 'NoneType' object is not iterable"),
                      ({**EX, "answers": "[1]"}, "TypeError: 'int' object is not subscriptable"),
                      (None, "TypeError: 'NoneType' object is not subscriptable")):
        assert FC.verify(ex, GOOD) is False
        assert len(verifier_errors) == 1 and verifier_errors.pop().startswith(error), ex
        assert FC.diagnose(ex, GOOD).startswith(f"verifier error: {error}")


def test_diagnose():
    assert FC.diagnose(EX, GOOD) == "correct"
    assert "no parseable" in FC.diagnose(EX, "hello")
    assert "expected" in FC.diagnose(EX, dumps(CALLS[:2]))
    wrong_arg = CALLS[:2] + [{"name": "convert", "arguments": {"amount": 1, "to": "EUR"}}]
    assert "wrong arguments" in FC.diagnose(EX, dumps(wrong_arg))


# ---------------------------------------------------------------------------------------
# prompts
# ---------------------------------------------------------------------------------------
def test_messages():
    msgs = FC.messages(EX)
    assert [m["role"] for m in msgs] == ["system", "user"]
    assert msgs[1]["content"] == EX["query"]
    for tool in TOOLS:
        assert json.dumps(tool) in msgs[0]["content"]
    assert '"arguments"' in msgs[0]["content"]
    assert FC.reflection_prompt == REFLECTION_PROMPT == (
        "You tried performing the task, but failed in generating the correct tool call. Reflect on "
        "what went wrong and write a short explanation that will help you do better next time.")
    assert FC.retry_message(EX)["role"] == "user"
    custom = FunctionCallingTask(system_prompt="Tools: {tools}. Reply in JSON like {\"name\": ...}.")
    assert custom.messages(EX)[0]["content"].startswith("Tools: " + json.dumps(TOOLS[0]))
    with pytest.raises(R3Error, match="placeholder"):
        FunctionCallingTask(system_prompt="no tools here")


@pytest.mark.parametrize(
    "completion",
    [
        # metadata beside a call is a scalar: a structure there may hold another call, which the
        # hidden-call search does not read inside (its "name" and "arguments" are a call's)
        GOOD.replace('"arguments"', '"id": {"name": "delete_all", "arguments": {}}, "arguments"', 1),
        GOOD.replace('"arguments"', '"index": [{"name": "delete_all", "arguments": {}}], "arguments"', 1),
        # a wrapper holds one structure: a second one under a metadata key is no answer
        '{"tool_calls": ' + GOOD + ', "id": [{"name": "delete_all", "arguments": {}}]}',
        '{"tool_calls": ' + GOOD + ', "role": {"name": "delete_all", "arguments": {}}}',
        # tags pair up: a stray closing tag between blocks is no answer
        "<tool_call>" + json.dumps(CALLS[0]) + "</tool_call>\n</tool_call>\n<tool_call>" + json.dumps(CALLS[1])
        + "</tool_call>\n<tool_call>" + json.dumps(CALLS[2]) + "</tool_call>",
        # a "</think>" ends a run: the block it sits in holds "</think>" and the calls, which a
        # reasoning parser splits at the "</think>", so the calls are outside any block
        "<tool_call>\n</think>\n\n" + GOOD + "\n</tool_call>",
        # a call attempt in full-width brackets before the answer, complete: its single-quoted
        # value holding a bracket is a string ('\uff3d' is no closing bracket)
        "\uff5b'name'\uff1a 'delete_all'\uff0c 'path'\uff1a '\uff3d'\uff5d\n" + GOOD,
        # YAML "name:" and "arguments:" lines within 8 lines of each other are a call
        GOOD + "\n\nIf you also want it cleared:\nname: delete_all\nnote 1\nnote 2\narguments: {}\n",
        GOOD + "\n\nIf you also want it cleared:\nname: delete_all\n" + "".join(f"note {i}\n" for i in range(7))
        + "arguments: {}\n",
    ],
)
def test_more_calls_beside_the_answer_are_no_answer(completion):
    assert FC.verify(EX, completion) is False


def test_a_string_ending_in_a_backslash_ends_at_its_quote():
    """An escaped backslash before a closing quote (a Windows folder, "C:\\Temp\\") does not escape
    the quote: the answer in prose or a block is read whole, not as a truncated structure."""
    tools = TOOLS + [{"name": "save_file", "description": "Save.", "parameters": {"path": {"type": "str"}}}]
    ex = dict(EX, tools=json.dumps(tools),
              answers=json.dumps([{"name": "save_file", "arguments": {"path": "C:\\Temp\\"}}]))
    call = '{"name": "save_file", "arguments": {"path": "C:\\\\Temp\\\\"}}'
    assert json.loads(call)["arguments"]["path"] == "C:\\Temp\\"
    for completion in ("Sure, saving it:\n[" + call + "]", "<tool_call>\n" + call + "\n</tool_call>",
                       "```json\n" + call + "\n```\nDone."):
        assert FC.verify(ex, completion), completion


def test_a_number_past_decimals_range_is_no_answer_and_no_error(verifier_errors):
    """A JSON exponent too large for Decimal (its InvalidOperation is no ValueError) makes no
    structure, with no verifier error, as any other number that is not exactly a float."""
    for text in ('[{"name": "get_weather", "arguments": {"x": 1e1000000000000000000}}]',
                 'Here: [{"name": "get_weather", "arguments": {"x": 1e9999999999999999999999}}]',
                 '[{"name": "get_weather", "arguments": "{\\"x\\": 0e99999999999999999999999}"}]'):
        assert parse_calls(text) is None and FC.verify(EX, text) is False, text
        assert not recheck(FC, EX, text)[0]
    assert verifier_errors == []


def test_size_and_depth_limits_at_their_bounds():
    """A structure of MAX_JSON_CHARS characters is read, one more is no answer; a value nested
    MAX_DEPTH deep is read, one deeper is no answer; a completion of MAX_COMPLETION_CHARS
    characters is read, one more is no answer."""
    from r3.tasks.function_calling import MAX_COMPLETION_CHARS, MAX_DEPTH, MAX_JSON_CHARS

    def padded(n):
        bare = json.dumps([{"name": "f", "arguments": {"s": ""}}])
        return json.dumps([{"name": "f", "arguments": {"s": "x" * (n - len(bare))}}])

    assert len(padded(MAX_JSON_CHARS)) == MAX_JSON_CHARS
    assert parse_calls(padded(MAX_JSON_CHARS)) is not None
    assert parse_calls(padded(MAX_JSON_CHARS + 1)) is None
    assert parse_calls("Calls: " + padded(MAX_JSON_CHARS)) is not None
    assert parse_calls("Calls: " + padded(MAX_JSON_CHARS + 1)) is None

    def nested(depth):  # (the list holding the call is depth 1, the call 2, its arguments 3)
        k = depth - 3
        return '[{"name": "f", "arguments": {"x": ' + "[" * k + "]" * k + "}}]"

    assert parse_calls(nested(MAX_DEPTH)) is not None
    assert parse_calls(nested(MAX_DEPTH + 1)) is None

    for text in (GOOD + " " * (MAX_COMPLETION_CHARS - len(GOOD)),
                 "Calls: " + GOOD + "." * (MAX_COMPLETION_CHARS - 7 - len(GOOD))):
        assert len(text) == MAX_COMPLETION_CHARS
        assert FC.verify(EX, text) and not FC.verify(EX, text + " ")


# ---------------------------------------------------------------------------------------
# loading
# ---------------------------------------------------------------------------------------
def _records(n=30):
    return synthetic_xlam(n, seed=5)


def test_load_json_list_and_jsonl(tmp_path):
    recs = _records()
    pj, pl = tmp_path / "x.json", tmp_path / "x.jsonl"
    pj.write_text(json.dumps(recs))
    pl.write_text("\n".join(json.dumps(r) for r in recs) + "\n")
    for p in (pj, pl):
        assert load_file(str(p)) == recs
        t = tasks.get("xlam", data_path=str(p), test_fraction=0.3)
        assert t.synthetic is False
        train, test = t.examples("train"), t.examples("test")
        assert sorted(r["id"] for r in train + test) == list(range(30))
        assert not {r["id"] for r in train} & {r["id"] for r in test}
        assert t.examples("train", n=4, seed=2) == t.examples("train", seed=2)[:4]
        for r in train:
            assert t.verify(r, r["answers"])


def test_a_test_query_is_never_a_training_query(tmp_path):
    """The split hashes each record's query, not its id: the synthetic generator draws some short
    questions more than once (by id, 118 of the default task's 493 test records were training
    records), and a data file may repeat a query under other ids. Each query stays on one side,
    and test_fraction is still about the test side's share of the queries."""
    t = tasks.get("function_calling")
    train = {r["query"] for r in t.examples("train")}
    test = [r["query"] for r in t.examples("test")]
    assert len(test) > 300 and not train & set(test)
    recs = synthetic_xlam(400, seed=5)
    queries = sorted({r["query"] for r in recs})
    assert len(queries) > 250
    p = tmp_path / "x.jsonl"
    # every query three times over, under ids of its own, the copies with padding the split ignores
    p.write_text("".join(json.dumps(dict(r, id=f"{k}-{i}", query=(" " * k) + r["query"])) + "\n"
                         for k in range(3) for i, r in enumerate(recs)))
    f = tasks.get("xlam", data_path=str(p), test_fraction=0.3)
    sides = {}
    for split in ("train", "test"):
        for r in f.examples(split):
            sides.setdefault(r["query"].strip(), set()).add(split)
    assert len(sides) == len(queries) and all(len(v) == 1 for v in sides.values())
    share = sum(v == {"test"} for v in sides.values()) / len(sides)
    assert 0.2 < share < 0.4, share


def test_split_seed_and_an_explicit_test_file(tmp_path):
    """split_seed moves records between the splits; test_data_path gives the test split as is."""
    a, b = (tasks.get("xlam", synthetic_size=300, split_seed=s) for s in (0, 1))
    assert {r["id"] for r in a.examples("test")} != {r["id"] for r in b.examples("test")}
    train, test = tmp_path / "train.jsonl", tmp_path / "test.jsonl"
    recs = synthetic_xlam(12, seed=5)
    train.write_text("".join(json.dumps(dict(r, id=f"tr{i}")) + "\n" for i, r in enumerate(recs[:8])))
    test.write_text("".join(json.dumps(dict(r, id=f"te{i}")) + "\n" for i, r in enumerate(recs[8:])))
    t = tasks.get("xlam", data_path=str(train), test_data_path=str(test))
    assert sorted(r["id"] for r in t.examples("test")) == ["te0", "te1", "te2", "te3"]
    assert sorted(r["id"] for r in t.examples("train")) == [f"tr{i}" for i in range(8)]


def test_records_with_parsed_fields_are_normalised(tmp_path):
    rec = {"id": "a1", "query": "q", "tools": TOOLS, "answers": CALLS}
    p = tmp_path / "x.jsonl"
    p.write_text(json.dumps(rec) + "\n" + json.dumps({"query": "q2", "tools": "[]", "answers": "[]"}) + "\n")
    rows = load_file(str(p))
    assert isinstance(rows[0]["tools"], str) and json.loads(rows[0]["answers"]) == CALLS
    assert rows[1]["id"] == 1  # a record without an id gets its index
    assert FC.verify(rows[0], GOOD)


@pytest.mark.parametrize(
    "bad,match",
    [
        ({"id": 7, "query": "q", "tools": "[]", "answers": "[{oops"},
         r"record 2 \(id 7\): field 'answers' is not valid JSON"),
        ({"id": 7, "query": "q", "tools": "[]"}, r"record 2 \(id 7\): missing field 'answers'"),
        ({"id": 7, "tools": "[]", "answers": "[]"}, r"record 2 \(id 7\): field 'query'"),
        ({"id": 7, "query": "q", "tools": "{}", "answers": "[]"}, r"\(id 7\): field 'tools' must be a JSON list"),
        ({"id": 7, "query": "q", "tools": '[{"description": "x"}]', "answers": "[]"},
         r"\(id 7\): field 'tools', item 0"),
        ({"id": 7, "query": "q", "tools": '[{"name": "f", "parameters": {"a": "int"}}]', "answers": "[]"},
         r"\(id 7\): field 'tools', tool 'f'"),
        ({"id": 7, "query": "q", "tools": "[]", "answers": '[{"name": "f"}]'}, r"\(id 7\): field 'answers', item 0"),
        ({"id": 7, "query": "q", "tools": "[]", "answers": '[{"name": "f", "arguments": []}]'},
         r"field 'answers', item 0"),
        ({"id": [7], "query": "q", "tools": "[]", "answers": "[]"}, r"field 'id'"),
        ("just a string", r"record 2: expected an object"),
    ],
)
def test_malformed_record_names_file_record_and_field(tmp_path, bad, match):
    p = tmp_path / "data.json"
    p.write_text(json.dumps([_records(1)[0], bad]))
    with pytest.raises(R3Error, match=match) as e:
        load_file(str(p))
    assert str(e.value).startswith(f"{p}, record 2") and "\n" not in str(e.value)  # (the second)
    with pytest.raises(R3Error, match=match):
        FunctionCallingTask(data_path=str(p)).examples("train")


def test_malformed_jsonl_names_the_line(tmp_path):
    p = tmp_path / "data.jsonl"
    good = json.dumps(_records(1)[0])
    p.write_text(good + "\n\n" + good[:-5] + "\n")
    with pytest.raises(R3Error, match=r"data\.jsonl, line 3: not valid JSON"):
        load_file(str(p))
    q = tmp_path / "obj.json"
    q.write_text(json.dumps({"a": 1}))
    with pytest.raises(R3Error, match=r"obj\.json: expected a JSON list of records"):
        load_file(str(q))


# ---------------------------------------------------------------------------------------
# synthetic data
# ---------------------------------------------------------------------------------------
def _reserialise(calls, rng):
    """What a model might write: calls shuffled, keys reordered, integral floats as ints, spacing
    changed, sometimes fenced or wrapped in prose."""
    out = []
    for c in rng.sample(calls, len(calls)):
        args = {k: (int(v) if isinstance(v, float) and v.is_integer() else v) for k, v in c["arguments"].items()}
        args = dict(rng.sample(list(args.items()), len(args)))
        out.append({"arguments": args, "name": c["name"]})
    text = json.dumps(out, indent=rng.choice([None, 2]), separators=rng.choice([None, (",", ":")]))
    return rng.choice([text, f"```json\n{text}\n```", f"Calling the tools now: {text}"])


def test_synthetic_answers_verify_and_corruptions_fail():
    rng = random.Random(0)
    recs = synthetic_xlam(600, seed=1)
    for r in recs:
        calls = json.loads(r["answers"])
        assert FC.verify(r, r["answers"])
        assert FC.verify(r, _reserialise(calls, rng))
        # change one argument value -> wrong
        bad = json.loads(r["answers"])
        args = bad[0]["arguments"]
        k = sorted(args)[0]
        v = args[k]
        args[k] = (not v) if isinstance(v, bool) else (v + 1) if isinstance(v, (int, float)) else \
            (v + ["x"] if isinstance(v, list) else "x" + str(v))
        assert not FC.verify(r, json.dumps(bad)), (r, bad)
        assert not FC.verify(r, json.dumps(calls[1:]))


def test_synthetic_records_are_well_typed():
    recs = synthetic_xlam(800, seed=2)
    assert len({r["id"] for r in recs}) == 800
    n_calls = [len(json.loads(r["answers"])) for r in recs]
    assert {1, 2, 3} <= set(n_calls)
    names = [[c["name"] for c in json.loads(r["answers"])] for r in recs]
    same_tool = sum(1 for ns in names if len(set(ns)) < len(ns))
    diff_tools = sum(1 for ns in names if len(set(ns)) > 1)
    assert same_tool > 20 and diff_tools > 20
    distractors = 0
    py_types = {"str": str, "int": int, "float": (int, float), "bool": bool}
    for r in recs:
        tools = {t["name"]: t for t in json.loads(r["tools"])}
        answers = json.loads(r["answers"])
        distractors += len(tools) > len({c["name"] for c in answers})
        assert r["query"].strip()
        for c in answers:
            params = tools[c["name"]]["parameters"]
            assert set(c["arguments"]) <= set(params)
            required = {p for p, spec in params.items() if "default" not in spec}
            assert required <= set(c["arguments"])
            for p, v in c["arguments"].items():
                typ = params[p]["type"].replace(", optional", "")
                if typ.startswith("List["):
                    inner = py_types[typ[5:-1]]
                    assert isinstance(v, list) and all(isinstance(x, inner) and not isinstance(x, bool) or
                                                       inner is bool for x in v)
                else:
                    assert isinstance(v, py_types[typ]) and (typ == "bool" or not isinstance(v, bool)), (p, v, typ)
    assert distractors > 100
    assert 15 <= len(CATALOGUE) <= 40


def _written(x):
    """A number as a synthetic query writes it (an integral float without its ".0")."""
    return str(int(x)) if float(x).is_integer() else repr(float(x))


# (tool, optional argument, what the query says when the call passes it)
_OPTIONAL_PHRASES = [("get_current_weather", "units", r" in fahrenheit\."),
                     ("sort_numbers", "descending", "from largest to smallest"),
                     ("count_word_occurrences", "case_sensitive", "case-sensitive"),
                     ("compound_interest", "compounds_per_year", ", compounded "),
                     ("translate_text", "source_language", "' from "),
                     ("join_words", "separator", "using the separator"),
                     ("web_search", "num_results", " web results about "),
                     ("search_restaurants", "max_results", "show me "),
                     ("get_movie_details", "year", r"[0-9]{4} movie '")]
_IN_ORDER = {"convert_currency": ("from_currency", "to_currency"), "get_exchange_rate": ("base", "target"),
             "convert_temperature": ("from_unit", "to_unit"), "translate_text": ("source_language", "target_language")}


def test_synthetic_labels_state_what_the_query_asks():
    """Each reference call is what its query asks, so the verifier pays for the right answer: every
    argument value is written in the query (strings and lists as given, numbers as written, a rate
    as its percent, a compounding as its word), pairs in their order ("USD to EUR"), optional
    arguments exactly when the query asks for them; no call is asked twice."""
    for r in synthetic_xlam(1500, seed=3):
        q, calls = r["query"], json.loads(r["answers"])
        for c in calls:
            args = c["arguments"]
            for k, v in args.items():
                if isinstance(v, bool):
                    assert v is True, (c, q)  # (a flag is given only to turn it on; its phrase below)
                elif isinstance(v, str):
                    assert v in q, (k, v, q)
                elif isinstance(v, list):
                    assert str(v) in q or json.dumps(v) in q, (k, v, q)
                elif k == "annual_rate":
                    assert f"at {_written(round(v * 100, 6))}% annual interest" in q, (k, v, q)
                elif k == "compounds_per_year":
                    assert f"compounded {({12: 'monthly', 4: 'quarterly', 365: 'daily'})[v]}" in q, (k, v, q)
                else:
                    assert re.search(rf"(?<![0-9.]){re.escape(_written(v))}(?![0-9]|\.[0-9])", q), (k, v, q)
            if c["name"] in _IN_ORDER:
                a, b = (args.get(k) for k in _IN_ORDER[c["name"]])
                assert a is None or f"{a} to {b}" in q or f"{a} in {b}" in q, (c, q)
            if c["name"] == "calculate_bmi":
                assert f"{_written(args['weight_kg'])} kg and I am {_written(args['height_m'])} m tall" in q, (c, q)
            if c["name"] == "get_weather_forecast":
                assert f"{args['days']}-day weather forecast for {args['location']}" in q, (c, q)
        for tool, arg, phrase in _OPTIONAL_PHRASES:
            asked = len(re.findall(phrase, q, flags=re.IGNORECASE))
            assert asked == sum(c["name"] == tool and arg in c["arguments"] for c in calls), (tool, arg, q, calls)
        assert len({json.dumps(c, sort_keys=True) for c in calls}) == len(calls), calls


def test_synthetic_is_deterministic_and_extends():
    assert synthetic_xlam(50, seed=3) == synthetic_xlam(50, seed=3)
    assert synthetic_xlam(20, seed=3) == synthetic_xlam(50, seed=3)[:20]
    assert synthetic_xlam(20, seed=3) != synthetic_xlam(20, seed=4)


# tool -> {the arguments a call gives (sorted): the sentence that asks for it}, written by hand from
# what each argument means; a value goes in as the query writes it (_said)
_SENTENCES = {
    "get_current_weather": {("location",): "What's the weather like in {location} right now?",
                            ("location", "units"): "Tell me the current weather in {location} in {units}."},
    "get_weather_forecast": {("days", "location"): "Give me the {days}-day weather forecast for {location}."},
    "convert_currency": {("amount", "from_currency", "to_currency"): (
        "Convert {amount} {from_currency} to {to_currency}.",
        "How much is {amount} {from_currency} in {to_currency}?")},
    "get_exchange_rate": {("base", "target"): "What is the exchange rate from {base} to {target}?"},
    "calculate_bmi": {("height_m", "weight_kg"):
                      "My weight is {weight_kg} kg and I am {height_m} m tall. What is my BMI?"},
    "is_prime": {("number",): "Is {number} a prime number?"},
    "factorial": {("n",): "Compute the factorial of {n}."},
    "fibonacci_sequence": {("n",): "List the first {n} Fibonacci numbers."},
    "find_max": {("numbers",): "What is the largest number in {numbers}?"},
    "sort_numbers": {("numbers",): "Sort the numbers {numbers} in ascending order.",
                     ("descending", "numbers"): "Sort the numbers {numbers} from largest to smallest."},
    "calculate_average": {("numbers",): "Calculate the average of {numbers}."},
    "greatest_common_divisor": {("a", "b"): "What is the greatest common divisor of {a} and {b}?"},
    "web_search": {("query",): "Search the web for '{query}'.",
                   ("num_results", "query"): "Find {num_results} web results about '{query}'."},
    "get_stock_price": {("symbol",): "What's the current price of {symbol} stock?"},
    "translate_text": {("target_language", "text"): "Translate '{text}' into {target_language}.",
                       ("source_language", "target_language", "text"):
                           "Translate '{text}' from {source_language} to {target_language}."},
    "calculate_tip": {("bill_amount", "tip_percent"):
                          "How much should I tip on a bill of {bill_amount} dollars at {tip_percent} percent?"},
    "compound_interest": {("annual_rate", "principal", "years"):
                              "How much will {principal} dollars grow to in {years} years at {annual_rate}% annual "
                              "interest?",
                          ("annual_rate", "compounds_per_year", "principal", "years"):
                              "How much will {principal} dollars grow to in {years} years at {annual_rate}% annual "
                              "interest, compounded {compounds_per_year}?"},
    "search_restaurants": {("city", "cuisine"): "Find {cuisine} restaurants in {city}.",
                           ("city", "cuisine", "max_results"):
                               "Show me {max_results} {cuisine} restaurants in {city}."},
    "get_time_zone": {("city",): "Which time zone is {city} in?"},
    "send_email": {("body", "subject", "to"):
                   "Send an email to {to} with the subject '{subject}' and the message '{body}'."},
    "count_word_occurrences": {("text", "word"): "How many times does the word '{word}' appear in '{text}'?",
                               ("case_sensitive", "text", "word"):
                                   "Count the case-sensitive occurrences of '{word}' in '{text}'."},
    "get_movie_details": {("title",): "Tell me about the movie '{title}'.",
                          ("title", "year"): "Look up details of the {year} movie '{title}'."},
    "get_flight_status": {("date", "flight_number"): "Is flight {flight_number} on {date} on time?"},
    "convert_temperature": {("from_unit", "to_unit", "value"): "Convert {value} degrees {from_unit} to {to_unit}."},
    "join_words": {("words",): "Join the words {words} into one string.",
                   ("separator", "words"): "Join the words {words} using the separator '{separator}'."},
    "is_leap_year": {("year",): "Is {year} a leap year?"},
}


def _said(name, value):
    """An argument's value as a synthetic query writes it."""
    if name == "annual_rate":
        return _written(round(value * 100, 6))
    if name == "compounds_per_year":
        return {12: "monthly", 4: "quarterly", 365: "daily"}[value]
    if name == "words":
        return json.dumps(value)
    return _written(value) if isinstance(value, float) else str(value)


def _asked(call):
    """The sentences that ask for ``call`` (a flag's value True is said by its sentence)."""
    args = call["arguments"]
    made = _SENTENCES[call["name"]][tuple(sorted(args))]
    said = {k: _said(k, v) for k, v in args.items()}
    return [s.format(**said) for s in ((made,) if isinstance(made, str) else made)]


def test_synthetic_query_is_exactly_the_sentences_of_its_calls_in_order():
    """A synthetic query is its calls' sentences in the calls' order, nothing else: the first as
    written, each later one after a space (as written) or after "Also,", "And" or "Then" (its first
    letter lowered). So every argument is bound to the value the query gives it (a subject is not
    the body, gcd(a, b) is not gcd(b, a)), and the query asks for what the call does (the largest
    number, ascending order)."""
    for r in synthetic_xlam(1500, seed=3):
        q, calls, pos = r["query"], json.loads(r["answers"]), 0
        for i, c in enumerate(calls):
            options = _asked(c)
            ways = options if i == 0 else \
                [" " + s for s in options] + [j + s[0].lower() + s[1:] for s in options
                                              for j in (" Also, ", " And ", " Then ")]
            way = next((x for x in ways if q.startswith(x, pos)), None)
            assert way is not None, (i, c, q[pos:], options)
            pos += len(way)
        assert pos == len(q), (q, calls)


def test_synthetic_values_are_well_formed_and_pairs_distinct():
    """Values a tool's description fixes the form of have that form (a YYYY-MM-DD date, a flight
    number, a counted word without punctuation, lower case unless the count is case-sensitive), and a conversion never goes from a unit,
    currency or language to itself."""
    pairs = {"convert_currency": ("from_currency", "to_currency"), "get_exchange_rate": ("base", "target"),
             "convert_temperature": ("from_unit", "to_unit"), "translate_text": ("source_language", "target_language")}
    seen = set()
    for r in synthetic_xlam(1500, seed=4):
        for c in json.loads(r["answers"]):
            a = c["arguments"]
            seen.add(c["name"])
            if c["name"] == "get_flight_status":
                assert re.fullmatch(r"2024-(0[1-9]|1[0-2])-(0[1-9]|1[0-9]|2[0-8])", a["date"]), a
                assert re.fullmatch(r"[A-Z]{2}[0-9]{2,4}", a["flight_number"]), a
            if c["name"] in pairs and pairs[c["name"]][0] in a:
                x, y = (a[k] for k in pairs[c["name"]])
                assert x != y, c
    assert set(pairs) | {"get_flight_status"} <= seen
    _, makers = next(entry for entry in CATALOGUE if entry[0]["name"] == "count_word_occurrences")
    for seed in range(400):  # (a word of the sentences is followed by a comma one time in 50)
        for make in makers:
            _, args = make(random.Random(seed))
            assert re.fullmatch(r"[A-Za-z]+" if args.get("case_sensitive") else "[a-z]+", args["word"]), args


def test_synthetic_tools_list_each_tool_once_in_a_shuffled_order():
    """The tools of a record are its calls' tools and distractors, each listed once (a distractor
    is never a tool the query needs, a tool called twice is not listed twice), in an order that
    does not give the answer away: the first tool listed is often one the query does not call."""
    first_not_called = 0
    for r in synthetic_xlam(800, seed=2):
        names = [t["name"] for t in json.loads(r["tools"])]
        called = {c["name"] for c in json.loads(r["answers"])}
        assert len(names) == len(set(names)), names
        assert called <= set(names)
        first_not_called += names[0] not in called
    assert first_not_called > 80  # (in sorted order, with the distractors last: never)


def test_synthetic_catalogue_marks_optional_parameters_and_records_vary():
    """A parameter has a default exactly when its type says ", optional", as in the xlam data (the
    tool list is all a model reads to know what it may leave out); parallel calls of one tool come
    in twos as well as threes; and records differ from one index to the next (1763 distinct
    queries among the first 2000 of seed 0, the rest short single questions drawn again)."""
    for tool, _ in CATALOGUE:
        for name, spec in tool["parameters"].items():
            assert spec["type"].endswith(", optional") == ("default" in spec), (tool["name"], name, spec)
    recs = synthetic_xlam(2000, seed=0)
    assert len({r["query"] for r in recs}) > 1500
    names = [[c["name"] for c in json.loads(r["answers"])] for r in recs]
    assert sum(len(ns) == 2 and ns[0] == ns[1] for ns in names) > 50


def test_default_task_uses_synthetic_data():
    t = tasks.get("function_calling", synthetic_size=300)
    assert t.synthetic is True
    train, test = t.examples("train"), t.examples("test")
    assert len(train) + len(test) == 300 and 10 < len(test) < 60
    assert not {r["id"] for r in train} & {r["id"] for r in test}
    assert t.examples("test", n=5, seed=9) == tasks.get("xlam", synthetic_size=300).examples("test", n=5, seed=9)


def test_write_synthetic_round_trips(tmp_path):
    for name in ("s.json", "s.jsonl"):
        p = tmp_path / "sub" / name
        assert write_synthetic(str(p), 40, seed=2) == 40
        assert load_file(str(p)) == synthetic_xlam(40, seed=2)
    assert isinstance(json.loads((tmp_path / "sub" / "s.json").read_text()), list)


def test_cli(tmp_path, capsys):
    out = tmp_path / "syn.json"
    assert main(["--synthetic", "25", "--out", str(out)]) == 0
    assert "SYNTHETIC" in capsys.readouterr().err
    assert len(load_file(str(out))) == 25
    assert main(["--check", str(out)]) == 0
    assert "25 valid records" in capsys.readouterr().out
    with pytest.raises(SystemExit) as e:
        main([])
    assert e.value.code == 2
    bad = tmp_path / "bad.json"
    bad.write_text("[{}]")
    with pytest.raises(SystemExit) as e:
        main(["--check", str(bad)])
    assert e.value.code == 2
    assert "bad.json, record 1" in capsys.readouterr().err


def test_cli_as_module(tmp_path):
    out = tmp_path / "syn.jsonl"
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    r = subprocess.run([sys.executable, "-m", "r3.tasks.function_calling", "--synthetic", "7", "--out", str(out)],
                       cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert len(out.read_text().splitlines()) == 7
    r = subprocess.run([sys.executable, "-m", "r3.tasks.function_calling", "--help"],
                       cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and "SYNTHETIC" in r.stdout


def test_a_synthetic_file_cut_short_by_a_full_disk_leaves_the_old_file_whole(tmp_path):
    """The file was written in place: a full disk half-way left cut-off JSON where the earlier
    file was ("not valid JSON ... Unterminated string" when a run then read it). A limit on file
    size stands in for the full disk (a write past it fails with EFBIG)."""
    import resource
    import signal

    def limit():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (65536, 65536))

    out = tmp_path / "syn.json"
    out.write_text("[1]\n")
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    r = subprocess.run([sys.executable, "-m", "r3.tasks.function_calling", "--synthetic", "2000", "--out", str(out)],
                       cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60, preexec_fn=limit)
    assert out.read_text() == "[1]\n" and [p.name for p in tmp_path.iterdir()] == ["syn.json"]
    assert r.returncode == 2 and r.stderr == f"error: {out}: cannot write: File too large\n", r.stderr


def test_reference_without_arguments_means_none():
    ex = dict(EX, answers=json.dumps([{"name": "ping"}]))
    assert FC.verify(ex, '[{"name": "ping"}]') and recheck(FC, ex, '[{"name": "ping"}]')[0]
    assert not FC.verify(ex, '[{"name": "ping", "arguments": {"a": 1}}]')
    for flat in ('[{"name": "ping", "a": 1}]', '{"name": "ping", "id": "call_1"}'):  # flat arguments: no call
        assert not FC.verify(ex, flat) and not recheck(FC, ex, flat)[0]
    llama = '<|python_tag|>{"name": "ping", "parameters": {}}<|eom_id|>'
    assert FC.verify(ex, llama) and recheck(FC, ex, llama)[0]


def test_a_wrapper_whose_last_value_is_no_calls():
    wrapped = '{"wrong_calls": ' + GOOD + ', "right_calls": []}'
    assert not FC.verify(EX, wrapped) and not recheck(FC, EX, wrapped)[0]
    assert FC.verify(EX, '{"tool_calls": ' + GOOD + "}")


def test_a_tool_name_that_folds_to_nothing_matches_nothing():
    from r3.tasks.function_calling import called_later

    assert called_later(GOOD + " (see above)", len(GOOD), ["\u200b", "\u0301", ""]) is None
    ex = dict(EX, tools=dumps(json.loads(EX["tools"]) + [{"name": "\u200b", "description": "", "parameters": {}}]))
    assert FC.verify(ex, GOOD + " (see above)") and recheck(FC, ex, GOOD + " (see above)")[0]


def test_later_call_search_agrees_with_the_recheck_on_random_text():
    """The two implementations of the later-call search (see called_later) give the same verdict
    on random strings built from the characters that matter: identifiers, dots, parentheses of
    several alphabets, quotes, '=', blanks, format characters, lookalikes and case-folding traps."""
    import random

    from r3.tasks.function_calling import _fold, called_later
    from r3.tasks.recheck import _fc_any_call_after, _fc_fold, _fc_named_call_after

    alphabet = list("abcxyz_.() =\n\t'\"`{}[]<>fbru,:;!?0129") + [
        "\u2018", "\u201c", "\uff08", "\uff09", "\ufe59", "\u200b", "\u00b2", "\u2167", "\u00df", "\ufb00",
        "\u0130", "\u0345", "\u51fd", "\u00e9", "<function", "get_weather", "os.", "==", "\U0001d16d", "\u1715",
        "\uff9e", "\u0307", ">>>", ">", "action input", "action", "input:", "<invoke", "<|", "|", "[tool_calls]",
        "tool_call", "<tool_call", "function_calls", "9", "1get_weather", "tool\u2581call", "to=functions.", "to",
        "\u273ffunction\u273f", "name:", "\narguments:", "parameters :", "\n", "- ", "function:", "args:", "<function",
        "<|recipient", "input :", "\n  \n", "tool:", "&lt;", "&gt;", "&#40;", "&#x28;", "&", "\\", "</", "<convert",
        "<get_weather>", "/>", "&lt;tool_call&gt;", "```", "~~~", "tool_code", "\uff54ool_code", "\u200b"]
    names = ["get_weather", "convert", "is_valid", "strasse_info", "get_offers"]
    rng = random.Random(0)
    verdicts = []
    for _ in range(20_000):
        t = "".join(rng.choice(alphabet) for _ in range(rng.randint(1, 14)))
        folded = _fc_fold(t)
        assert _fold(t) == folded, repr(t)
        verdicts.append(called_later(t, 0, names) is not None)
        assert verdicts[-1] == bool(_fc_named_call_after(folded, names) or _fc_any_call_after(folded)), repr(t)
    assert min(verdicts.count(True), verdicts.count(False)) > 1000  # (both verdicts are tried)


def test_whole_verdicts_agree_with_the_recheck_on_random_completions():
    """The verifier and the independent re-check give the same verdict on random completions
    built from the pieces that matter: right and wrong call objects and lists, <tool_call> tags,
    wrappers with loose strings (some hiding a call), broken and non-call structures, prose,
    later calls, blanks."""
    import random

    calls = [json.dumps(c) for c in CALLS] + ['{"name": "convert", "arguments": {"amount": 1}}']
    blocks = ["<tool_call>" + c + "</tool_call>" for c in calls]
    pieces = calls * 2 + blocks * 6 + [GOOD] * 4 + ["\n".join(blocks[:3])] * 4 + [
        "<tool_call>", "</tool_call>", "<tool_call>\n", "\n</tool_call>", " ", "\n", "\u2003", "\u200b",
        "; ", ",", "< Tool_Call >", "\uff1ctool_call\uff1e", "</tool_call\u200b>", "<tool_call", "<", ">",
        "\uff1e", "<x>", '{"note": 1}', '"parameters": ', "\uff5b\"a\"\uff1a 1\uff5d", "\u0130",
        '{"name": "convert", "parameters": {"amount": 100.0, "to": "EUR"}}', '{"name": "convert", "to": "EUR"}',
        "```", "```json\n", "``", "<|eom_id|>", '<tool_call id="1">', "</ tool_call >", "\u037e", "\uff1b", "\u3164",
        "\u034f", "[TOOL_CALLS]", "9reset()", ">>>reset", "json", "[0]", "<" + "x" * 199 + ">", "<" + "x" * 200 + ">",
        "1. ", "2) ", "- ", "* ", "x-", "12345.", "7", "<think>get_weather(x)</think>", "<think>", "</think>",
        '<tool_call id="x y">', '<tool_call id="a()">', '<tool_call name="f">', "</tool_call x>", "\u2065", "\ue000",
        "\u02d0", '{"method": "f", "params": []}', '{"tool_calls": []}', "\n- name: f\n  arguments: {}",
        "<tool_calls>", "</tool_calls>", "<function_call>", "<|tool_call|>", "\r\n", "\u2028", "\n* name: f",
        "\narguments: {}\nname: f", "\ufe30", "repeat(", ", times=2)", "**name**:", "method: f", "\u2800",
        '\n"name": "f"', "\n'arguments': {}", '"params": [1]\n', "\n- - ", "tool-input: 1\n", "\n'fn_name': ", "{'a': ']'}", "[{'x': ", "']", " '", "what's", "\uff5b\"a\": ", "\uff5d", "\uff3b",
        GOOD, BAD, "[]", "{}", "[1]", "{", "]", "}", "Wait.", "x: ", '"', "reset()", "os.remove(p)",
        '{"tool_calls": ' + GOOD + ', "next": "reset()"}', '{"tool_calls": ' + GOOD + ', "n": "ok"}',
        GOOD.replace('"arguments"', '"id": "[]", "arguments"', 1),
        "&lt;tool_call&gt;", "reset\\()", "reset&#40;)", "<get_weather>", "</convert>", '["</think>"]',
        '{"note": "</think>"}', '{"dry_run": true, "tool_calls": []}', "Call 1:\n", '"units": "x", ',
        "100.000000000000001", '{"type": "function", "function": ' + json.dumps(CALLS[2]) + "}",
        json.dumps([{"type": "function", "function": CALLS[0]}]),
        json.dumps({"name": "convert", "arguments": json.dumps(CALLS[2]["arguments"])}),
        '{"role": "assistant", "content": null, "tool_calls": ', "}",
        json.dumps(CALLS[0]).replace('"arguments"', '"why": "get_weather (x)", "arguments"', 1)]
    rng = random.Random(0)
    seen, hermes = {True: 0, False: 0}, 0
    for _ in range(6_000):
        text = "".join(rng.choice(pieces) for _ in range(rng.randint(1, 9)))
        ok = FC.verify(EX, text)
        assert ok is recheck(FC, EX, text)[0], repr(text)
        seen[ok] += 1
        hermes += ok and GOOD not in text
    assert seen[True] > 100 and seen[False] > 100 and hermes > 20  # (each kind of verdict is exercised)


def test_visible_removes_exactly_marks_format_and_combining_characters():
    """The translate table behind _visible deletes what the per-character definition does, on
    random text over all of Unicode and the characters that matter."""
    import random
    import unicodedata

    from r3.tasks.function_calling import _visible

    def reference(s):
        return "".join(c for c in s if unicodedata.category(c) not in ("Mn", "Me", "Cf")
                       and not unicodedata.combining(c))

    rng = random.Random(0)
    for _ in range(3_000):
        s = "".join(chr(rng.randrange(0x110000)) if rng.random() < 0.5 else rng.choice("a\u0301\u200b\ufdfa\u0903\U0001d16d ")
                    for _ in range(rng.randint(0, 40)))
        assert _visible(s) == reference(s), repr(s)
    assert _visible("plain ascii") == "plain ascii"


def test_parse_refuses_non_json_constants_and_nesting_past_the_cap():
    """NaN / Infinity are not JSON (a reply writing them is refused, so an Infinity reference is
    never paid by one); calls nested deeper than MAX_DEPTH are refused, and values that deep are
    never equal, not even to themselves."""
    from r3.tasks.function_calling import MAX_DEPTH, parse_calls

    assert parse_calls('[{"name": "f", "arguments": {"x": 1}}]') == [{"name": "f", "arguments": {"x": 1}}]
    for const in ("NaN", "Infinity", "-Infinity"):
        assert parse_calls('[{"name": "f", "arguments": {"x": %s}}]' % const) is None, const
    deep = MAX_DEPTH + 8
    assert parse_calls('[{"name": "f", "arguments": {"x": ' + "[" * deep + "]" * deep + "}}]") is None
    shallow = 4
    assert parse_calls('[{"name": "f", "arguments": {"x": ' + "[" * shallow + "]" * shallow + "}}]") is not None
    d = 0
    for _ in range(deep):
        d = [d]
    assert not values_equal(d, d) and values_equal([[0]], [[0]])


def _blocks(calls, inside_before="", inside_after="", close=True) -> str:
    return "\n".join("<tool_call>\n" + inside_before + json.dumps(c) + inside_after + ("\n</tool_call>" if close else "")
                     for c in calls)


@pytest.mark.parametrize(
    "completion,ok",
    [
        (_blocks(CALLS), True),
        (_blocks(CALLS, " \t\r\n", "\r\n\t "), True),  # JSON whitespace
        (_blocks(CALLS[:1], "\u200b") + "\n" + _blocks(CALLS[1:]), False),  # (json.loads fails on the rest)
        (_blocks(CALLS[:2]) + "\n" + _blocks(CALLS[2:], inside_after=";"), False),
        (_blocks(CALLS[:2]) + "\n" + _blocks(CALLS[2:], inside_after="\u00a0"), False),
        (_blocks(CALLS) + "\nThese get the weather and convert.", True),  # prose after the blocks
        (_blocks(CALLS[:2]) + "\nWait.\n" + _blocks(CALLS[2:], close=False), True),  # the last one cut off
        # anything else in a block: a harness parses the block's text as JSON, which fails
        (_blocks(CALLS[:1], inside_after="\nThis gets the weather.") + "\n" + _blocks(CALLS[1:]), False),
        (_blocks(CALLS[:2]) + "\n" + _blocks(CALLS[2:], inside_after=" // EUR"), False),
        (_blocks(CALLS, "```json\n", "\n```"), False),
        (_blocks(CALLS[:1], "<|python_tag|>") + "\n" + _blocks(CALLS[1:]), False),
        (_blocks(CALLS[:2]) + "\n" + _blocks(CALLS[2:], close=False) + "\nThat is all.", False),  # left open
        (_blocks(CALLS[:2]) + "\n" + _blocks(CALLS[2:], close=False) + " [1, 2]", False),
        # a harness finds a block by its tags as written: "<tool_call>" and "</tool_call>"
        (_blocks(CALLS).replace("</tool_call>", "</TOOL_CALL>", 1) + "\nDone.", False),
        (_blocks(CALLS).replace("</tool_call>", "</tool_call >", 1), False),
        (_blocks(CALLS).replace("<tool_call>", "<Tool_Call>", 1), False),
        (_blocks(CALLS).replace("<tool_call>", '<tool_call id="1">', 1), False),
        (_blocks(CALLS).replace("</tool_call>", "\uff1c/tool_call\uff1e") + "\nDone.", False),
        (_blocks(CALLS) + "\nThe </ tool_call > tag ends each block.", True),  # (a tag in prose after them)
    ],
)
def test_a_tool_call_block_holds_its_call_alone(completion, ok):
    """Both implementations paid prose, a comment or a code fence after the call inside its block
    (and after the last block left open), and blocks whose tags were spelled otherwise, which the
    Hermes parsers of vLLM and others read as no call: they find the blocks by their tags as
    written and parse the text between them as JSON. Prose before the call in a block was already
    no answer."""
    assert FC.verify(EX, completion) is ok, FC.diagnose(EX, completion)
    assert recheck(FC, EX, completion)[0] is ok  # the independent implementation agrees


def _with_id(call: dict, id_: str) -> str:
    return json.dumps(dict(call, id=id_))


@pytest.mark.parametrize(
    "completion,ok",
    [
        (_blocks(CALLS), True),
        ("\n".join("<tool_call>" + _with_id(c, "call_%d" % k) + "</tool_call>" for k, c in enumerate(CALLS)), True),
        # a closing tag in an attempt's string: a harness's block ends there, and its text is no JSON
        ("\n".join("<tool_call>" + _with_id(c, "</tool_call>") + "</tool_call>" for c in CALLS), False),
        (_blocks(CALLS[:2]) + "\n<tool_call>" + _with_id(CALLS[2], "x</tool_call>"), False),  # the last, open
        (_blocks(CALLS[:2]) + "\n" + _blocks([dict(CALLS[2], id="</tool_call>")], close=False), False),
        # without blocks no harness looks for the tags; a tag in another case does not end a block
        (dumps([dict(c, id="</tool_call>") for c in CALLS]), True),
        ("\n".join("<tool_call>" + _with_id(c, "</TOOL_CALL>") + "</tool_call>" for c in CALLS), True),
    ],
)
def test_a_closing_tag_inside_a_blocks_call_is_no_answer(completion, ok):
    """Both implementations paid blocks whose call held "</tool_call>" in a string (an "id"),
    which a Hermes parser (vLLM's: the first "</tool_call>" after the opening tag ends the block)
    reads as a block of broken JSON: no call made, yet the reward paid."""
    assert FC.verify(EX, completion) is ok, FC.diagnose(EX, completion)
    assert recheck(FC, EX, completion)[0] is ok  # the independent implementation agrees


@pytest.mark.parametrize(
    "completion,ok",
    [
        # Llama's <|python_tag|> before the calls is part of the answer
        ("<|python_tag|>" + GOOD, True),
        ("<|python_tag|>" + "; ".join(json.dumps(c) for c in CALLS) + "<|eom_id|>", True),
        ("<| python_tag |>\n" + GOOD + "<|eom_id|>", True),
        # anywhere else it starts code for Llama's interpreter: another call
        (GOOD + "\n<|python_tag|>exec(chr(105) + chr(109))<|eom_id|>", False),
        (GOOD + "\n<|python_tag|>x = 2 ** 100", False),
        ("<|python_tag|>import math\n" + GOOD, False),
        ("<|python_tag|>Sure: " + GOOD, False),
        (GOOD + "\n\uff1c|python_tag|\uff1e print(1)", False),  # full-width
        (dumps([dict(c, id="<|python_tag|>") for c in CALLS]), False),  # in a string beside the calls
    ],
)
def test_python_tag_outside_the_answer_is_another_call(completion, ok):
    """Both implementations paid the right calls beside "<|python_tag|>" and code that the call
    search reads as prose (exec(chr(105)), x = 2 ** 100): in Llama 3's format that tag starts a
    call of the code interpreter (llama-models reads a reply that opens with it and holds no JSON
    call as code to run), so the reward paid for a reply that also asks to run code."""
    assert FC.verify(EX, completion) is ok, FC.diagnose(EX, completion)
    assert recheck(FC, EX, completion)[0] is ok  # the independent implementation agrees


@pytest.mark.parametrize(
    "completion,ok",
    [
        # Gemma 3's ```tool_code fence holds Python its harness evaluates: beside the JSON answer a
        # call there that the call search reads as prose elsewhere ("wipe(1)") is run instead
        ("```json\n" + GOOD + "\n```", True),
        (GOOD + "\n```tool_code\nwipe(1)\n```", False),
        ("```tool_code\nshutdown(now)\n```\n" + GOOD, False),
        ("```json\n" + GOOD + "\n```\n```tool_code\nprint(x)\n```", False),
        (GOOD + "\n~~~ TOOL_CODE\nwipe(1)\n~~~", False),
        (GOOD + "\n```\uff54\uff4f\uff4f\uff4c_code\nwipe(1)\n```", False),  # (full-width)
        ("```tool_code\n" + GOOD + "\n```", False),  # (evaluated as Python: a list of dicts, no call)
        (dumps([dict(c, id="```tool_code") for c in CALLS]), False),  # (in a string beside the calls)
        (GOOD + "\nNo tool_code was needed.", True),  # (the word in prose)
        (GOOD + "\n```python\nwipe(1)\n```", True),  # (a python fence is shown, not run: prose as before)
        # OLMo 3's <function_calls> block holds Python calls, one a line: its harness reads no JSON
        # there, and a line beside the JSON ("wipe(1)") is a call
        ("<function_calls>\n" + "\n".join(json.dumps(c) for c in CALLS) + "\nwipe(1)\n</function_calls>", False),
        ("<function_calls>\n" + GOOD + "\n</function_calls>", False),
        ("<tool_calls>\n" + GOOD + "\n</tool_calls>\nwipe(1)", True),  # (Jamba's / MiniMax's JSON block)
        ("\n".join("<function_call> " + json.dumps(c) for c in CALLS), True),  # (Granite's)
        # Llama's <|python_tag|> opens a message for its code interpreter: text after the calls is code
        ("<|python_tag|>" + "; ".join(json.dumps(c) for c in CALLS) + "<|eom_id|>", True),
        ("Sure.\n<|python_tag|>" + GOOD + " <|eot_id|>\n", True),  # (the reply's text before the tag)
        ("<|python_tag|>" + GOOD + "\nwipe(1)", False),
        ("<|python_tag|>" + "; ".join(json.dumps(c) for c in CALLS) + "; wipe(1)", False),
        ("<|python_tag|>" + GOOD + "\nprint(x)<|eom_id|>", False),
        ("<| Python_Tag |>" + GOOD + "\n\nI hope this helps.", False),
        # ... and so is what a run passes over after it: only markup may stand there
        ("<|python_tag|>[wipe(1)]; " + "; ".join(json.dumps(c) for c in CALLS), False),
        ("<|python_tag|>[wipe(1)] " + GOOD, False),
        ("<|python_tag|>```json\n" + GOOD + "\n```", False),
        ("<|python_tag|>[TOOL_CALLS] " + GOOD, False),
        ("<|python_tag|><|start|>" + GOOD + "<|eom_id|>", True),
        (GOOD + "\nwipe(1)", True),  # (without the tag, "f(x)" after the answer stays prose)
    ],
)
def test_code_a_models_harness_runs_beside_the_calls_is_no_answer(completion, ok):
    """Both implementations paid the right JSON calls beside code that the call search reads as
    prose ("wipe(1)", "print(x)": a name, a parenthesis, a number or a bare name) where a family r3
    trains has its harness run it: in Gemma 3's ```tool_code fence (its harness evaluates the
    Python there), in OLMo 3's <function_calls> block (Python calls, one a line; r3 passed over that
    tag as markup that wraps JSON) and after Llama's <|python_tag|> (the rest of the message is
    code for its interpreter, as the module docstring said; only code before the calls was read)."""
    assert FC.verify(EX, completion) is ok, FC.diagnose(EX, completion)
    assert recheck(FC, EX, completion)[0] is ok  # the independent implementation agrees


def test_code_contexts_agree_with_the_recheck_on_random_completions():
    """The two implementations agree on random completions built from the pieces the rules above
    read: <|python_tag|> in several spellings, markup, blanks, prose and "wipe(1)" beside the
    calls, fences with and without tool_code, <function_calls>, reasoning blocks."""
    calls = [json.dumps(c) for c in CALLS]
    pieces = calls * 3 + [GOOD] * 3 + [
        "<|python_tag|>", "<| python_tag |>", "<|Python_Tag|>", "\uff1c|python_tag|\uff1e", "<|python_tag",
        "<|eom_id|>", "<|eot_id|>", "<x>", "<", ">", "<>", " ", "\n", "; ", ",", "\u200b", "\u00a0", "wipe(1)",
        "print(x)", "Done.", "```tool_code\n", "``` tool_code\n", "~~~TOOL_CODE\n", "```\n", "```json\n",
        "```python\n", "tool_code", "```tool_codes\n", "`tool_code`", "<function_calls>", "</function_calls>",
        "<function_call>", "<tool_calls>", "<think>", "</think>", "<tool_call>", "</tool_call>", "[TOOL_CALLS]",
        "<" + "x" * 200 + ">", "<" + "x" * 199 + ">", "\uff1ceom\uff1e", "\ufe64x\ufe65"]
    rng = random.Random(1)
    paid = 0
    for _ in range(4_000):
        text = "".join(rng.choice(pieces) for _ in range(rng.randint(1, 8)))
        ok = FC.verify(EX, text)
        paid += ok
        assert ok == recheck(FC, EX, text)[0], repr(text)
    assert paid > 100  # (the pieces make right answers too)


# ---------------------------------------------------------------------------------------
# mutation round 14: rows that only these tests hold (each fails a mutant of the verifier)
# ---------------------------------------------------------------------------------------
BLOCK = "<tool_call>\n" + json.dumps(CALLS[0]) + "\n</tool_call>"
ONE = dict(EX, answers=dumps(CALLS[:1]))
NONE = dict(EX, answers="[]")
PING = dict(EX, answers=dumps([{"name": "ping", "arguments": {}}]))


@pytest.mark.parametrize(
    "example,completion,ok",
    [
        # a single quote that opens a string must close on its line; an escaped quote does not
        # close it: "['a\\']" is a complete list, and the answer after it is read
        (EX, "Pattern ['a\\']\n" + GOOD, True),
        # ... and a carriage return ends the line too ("'90s]\r...that's" is no string)
        (EX, "Decades [80s, '90s]\rthat's all\n" + GOOD, True),
        # a broken full-width structure with a key before the first run is prose, no call attempt
        # (the module docstring: broken or truncated only after the first run)
        (EX, '\uff5b"note"\uff1a 1\uff3d\n' + GOOD, True),
        # an empty block is no block: a harness parses "" as JSON and fails
        (ONE, BLOCK, True),
        (ONE, "<tool_call></tool_call>\n" + BLOCK, False),
        (ONE, "<tool_call>\n</tool_call>\n" + BLOCK, False),
        # a </think> ends a run: a stray closing tag before it is not "a block of prose" before the run
        (EX, "</tool_call>\n</think>\n" + GOOD, True),
        (EX, "</tool_call>\n" + GOOD, False),
        # ... and so does a broken structure without a key (prose): the tag is not before the run
        (EX, "</tool_call>\n[see above}\n" + GOOD, True),
        # ... and so does a symbol (prose), but not a <think> tag with an attribute (other markup)
        (EX, "</tool_call> \u2713 " + GOOD, True),
        (EX, '</tool_call>\n<think mode="fast">\n' + GOOD, False),
        # a single-quoted value after ":" is a string in the re-check too: a full-width call attempt
        # before the answer whose value holds a closing bracket stays complete (and is refused)
        (EX, "\uff5b'name'\uff1a 'delete_all'\uff0c 'path'\uff1a '\uff3d'\uff5d\n" + GOOD, False),
        # a wrapper yields no calls only as {"tool_calls": []}, in the re-check too: one that says
        # more beside its empty list is no answer
        (NONE, '{"tool_calls": []}', True),
        (NONE, '{"type": "function", "function": []}', False),
        (NONE, '{"id": "call_0", "tool_calls": []}', False),
        # arguments null is no arguments object: no call, in the re-check too (not "no arguments")
        (PING, '[{"name": "ping", "arguments": {}}]', True),
        (PING, '[{"name": "ping", "arguments": null}]', False),
        (PING, 'Calling: {"name": "ping", "arguments": null}', False),
    ],
)
def test_rows_found_by_mutation_round_14(example, completion, ok):
    """Rules only these rows hold (each failed a mutant of the verifier that the suite let live):
    a structure scanner that read an escaped quote or a lone carriage return as the end of a
    single-quoted string's line, or a broken full-width structure as a complete one, swallowed
    the answer after it or refused prose before it; a block check that let a block hold no attempt
    paid an empty block a harness cannot parse; a run that went on past a </think> refused an
    answer for a closing tag before it."""
    assert FC.verify(example, completion) is ok, FC.diagnose(example, completion)
    assert recheck(FC, example, completion)[0] is ok  # the independent implementation agrees


def test_the_split_reads_each_query_stripped_at_both_ends(tmp_path):
    """The split rule reads the query stripped at both ends: a copy of a record whose query
    carries trailing blanks or a line break (or both ends padded) stays on its query's side,
    and on_test_side says the side examples() put it on. A rule that stripped only the front
    (or nothing) put such copies of test queries into the training split."""
    recs = synthetic_xlam(300, seed=7)
    pads = [("", ""), ("", " \n"), ("\t", "  "), ("", "\r\n\r\n")]
    p = tmp_path / "x.jsonl"
    p.write_text("".join(json.dumps(dict(r, id=f"{k}-{i}", query=a + r["query"] + b)) + "\n"
                         for k, (a, b) in enumerate(pads) for i, r in enumerate(recs)))
    t = tasks.get("xlam", data_path=str(p), test_fraction=0.3)
    sides = {}
    for split in ("train", "test"):
        for r in t.examples(split):
            sides.setdefault(r["query"].strip(), set()).add(split)
            assert t.on_test_side(r) is (split == "test"), r["id"]
    assert all(len(v) == 1 for v in sides.values()) and {"train"} in sides.values() and {"test"} in sides.values()
    # padded at the back only: the side of the bare query
    test_query = next(q for q, v in sides.items() if v == {"test"})
    assert t.on_test_side({"query": test_query + " \n"}) is True
    assert t.on_test_side({"query": "\n" + test_query + "\t"}) is True


def test_on_test_side_is_none_with_an_explicit_test_file(tmp_path):
    """With test_data_path the test split is that file, listed whole: on_test_side answers None
    (the caller lists the split) rather than the hash rule, which would call queries of the
    training file test queries and the test file's queries training ones."""
    recs = synthetic_xlam(40, seed=5)
    train, test = tmp_path / "train.jsonl", tmp_path / "test.jsonl"
    train.write_text("".join(json.dumps(r) + "\n" for r in recs[:30]))
    test.write_text("".join(json.dumps(r) + "\n" for r in recs[30:]))
    t = tasks.get("xlam", data_path=str(train), test_data_path=str(test), test_fraction=0.5)
    assert all(t.on_test_side(r) is None for r in recs)
    hashed = tasks.get("xlam", data_path=str(train), test_fraction=0.5)
    assert {hashed.on_test_side(r) for r in recs} == {True, False}


@pytest.mark.parametrize(
    "bad,match",
    [
        ({"id": True, "query": "q", "tools": "[]", "answers": "[]"}, r"field 'id'"),  # (a bool is no integer id)
        ({"id": 7, "query": " \n\t", "tools": "[]", "answers": "[]"}, r"\(id 7\): field 'query'"),  # blank
        ({"id": 7, "query": "q", "tools": '[{"name": "", "parameters": {}}]', "answers": "[]"},
         r"\(id 7\): field 'tools', item 0"),  # a tool without a name
    ],
)
def test_malformed_record_fields_found_by_mutation(tmp_path, bad, match):
    """Records the loader let through when its checks were weakened: a boolean id (True == 1 as a
    key), a blank query (every blank query would share one split side and one prompt), a tool
    named "" (no call can name it; the system prompt would list a nameless function)."""
    p = tmp_path / "data.json"
    p.write_text(json.dumps([_records(1)[0], bad]))
    with pytest.raises(R3Error, match=match) as e:
        load_file(str(p))
    assert str(e.value).startswith(f"{p}, record 2") and "\n" not in str(e.value)  # (the second)


def test_a_test_file_needs_a_training_file_and_examples_are_copies(tmp_path):
    """test_data_path alone is refused (the training split would be the synthetic stand-in, silently
    mixed with real test data); and examples() hands out copies: a caller that edits an example
    (a trainer filling in fields) does not change the task's records for the next caller."""
    p = tmp_path / "test.json"
    p.write_text(json.dumps(_records(3)))
    with pytest.raises(R3Error, match="test_data_path needs data_path"):
        FunctionCallingTask(test_data_path=str(p))
    t = FunctionCallingTask(synthetic_size=20)
    first = t.examples("train")[0]
    query = first["query"]
    first["query"] = "changed"
    first["answers"] = "[]"
    assert t.examples("train")[0]["query"] == query and t.examples("train")[0]["answers"] != "[]"


def test_synthetic_optional_parameters_are_sometimes_left_out():
    """Each optional parameter of the catalogue is left out by some reference calls and given by
    others: one every query states is a required parameter marked optional (the tool list would
    tell the model it may leave out what the reference always has)."""
    given, left_out = set(), set()
    for r in synthetic_xlam(2000, seed=0):
        tools = {t["name"]: t for t in json.loads(r["tools"])}
        for c in json.loads(r["answers"]):
            for p, spec in tools[c["name"]]["parameters"].items():
                if "default" in spec:
                    (given if p in c["arguments"] else left_out).add((c["name"], p))
    optional = {(t["name"], p) for t, _ in CATALOGUE for p, spec in t["parameters"].items() if "default" in spec}
    assert given == optional and left_out == optional, (optional - given, optional - left_out)


def test_the_recheck_keeps_the_same_size_and_depth_bounds():
    """The independent re-check reads a structure of MAX_JSON_CHARS characters, a value nested
    MAX_DEPTH deep and a completion of MAX_COMPLETION_CHARS characters, and refuses one more of
    each, as the verifier does (test_size_and_depth_limits_at_their_bounds asserts the verifier
    alone): a re-check one character or one level more lenient agreed with a verifier that was."""
    from r3.tasks.function_calling import MAX_COMPLETION_CHARS, MAX_DEPTH, MAX_JSON_CHARS

    def padded(n):
        bare = json.dumps([{"name": "f", "arguments": {"s": ""}}])
        return json.dumps([{"name": "f", "arguments": {"s": "x" * (n - len(bare))}}])

    def nested(depth):  # (the list holding the call is depth 1, the call 2, its arguments 3)
        k = depth - 3
        return '[{"name": "f", "arguments": {"x": ' + "[" * k + "]" * k + "}}]"

    for make, bound in ((padded, MAX_JSON_CHARS), (nested, MAX_DEPTH)):
        for size, ok in ((bound, True), (bound + 1, False)):
            for text in (make(size), "Calls: " + make(size)):
                ex = dict(EX, answers=make(size))
                assert FC.verify(ex, text) is ok and recheck(FC, ex, text)[0] is ok, (make.__name__, size)
    text = GOOD + " " * (MAX_COMPLETION_CHARS - len(GOOD))
    assert FC.verify(EX, text) and recheck(FC, EX, text)[0]
    assert not FC.verify(EX, text + " ") and not recheck(FC, EX, text + " ")[0]


_CALL = '{"name": "get_weather", "arguments": {"city": "Paris"}}'
_FC_SHAPES = {
    "calls": lambda n: "[" + ", ".join([_CALL] * n) + "]",
    "deep-list": lambda n: "[" * n + "]" * n,
    "open-brackets": lambda n: "[" * n,
    "prose-brackets": lambda n: "text [" * n,
    "quotes": lambda n: '["' * n,
    "padding": lambda n: "[0] " * n + "[" + _CALL + "]",
    "combining": lambda n: "[" + _CALL + "]a" + "\u0301\u0316" * n,
    "expanding": lambda n: "[" + _CALL + "]" + "\ufdfa" * n,
    "expanding-markup": lambda n: ("<" + "\ufdfa" * 20 + ">") * (n // 10) + "[" + _CALL + "]",
    "single-quotes": lambda n: "[" + ", '" * n,
    "tool-call-blocks": lambda n: ("<tool_call>" + _CALL + "</tool_call>\n") * (n // 10),
    "empty-lists": lambda n: "[]" * n,
    "bullets": lambda n: "- " * n + "[" + _CALL + "]",
    "unclosed-think": lambda n: "[" + _CALL + "]" + "<think>" * n,
    "think-then-call": lambda n: "<think>" + "a " * n + "</think>" + "[" + _CALL + "]",
    "dotted-run": lambda n: "[" + _CALL + "]\n" + "a." * n,
    "blank-lines": lambda n: "[" + _CALL + "]" + "\n" * n + "x",
    "fences": lambda n: "```json\n" * n + "[" + _CALL + "]",
    "prose-calls": lambda n: "get_weather(city='Paris') " * (n // 10),
    "loose-string": lambda n: '{"tool_calls": [' + _CALL + '], "note": "' + "a_b (" * n + '"}',
    "python-tag-markup": lambda n: "<|python_tag|>[" + _CALL + "]" + " <|eom_id|>" * (n // 5) + "<" * n,
    "python-tag-scan": lambda n: "<|python_tag|>[" + _CALL + "]\n" + "<|  \t" * n,
    "tool-code-fences": lambda n: "[" + _CALL + "]\n" + "```  \t" * n + "~~~" * n,
}


@pytest.mark.parametrize("shape", sorted(_FC_SHAPES))
def test_function_calling_work_grows_linearly_with_the_text(shape, python_lines_run):
    """Doubling a long adversarial completion about doubles the Python lines the verifier and the
    re-checker run (a quadratic loop quadruples them; no clock): a verifier that slows down with
    the square of its input stalls a training step on one long sample, and r3.audit with it."""
    ex = {**EX, "answers": json.dumps([CALLS[0]])}
    for name, fn in (("verifier", FC.verify), ("recheck", lambda e, t: recheck(FC, e, t))):
        small, large = (python_lines_run(fn, ex, _FC_SHAPES[shape](n)) for n in (400, 800))
        assert large <= 3 * max(small, 50), (name, shape, small, large)
