"""Function calling in the APIGen / xlam-function-calling-60k format.

Records (= examples) are ``{"id", "query", "tools", "answers"}`` where ``tools`` and ``answers`` are
JSON strings: ``tools`` a list of ``{"name", "description", "parameters": {name: {"description",
"type", "default"?}}}``, ``answers`` a list of calls ``{"name", "arguments": {...}}``.

The real file (``xlam_function_calling_60k.json``, a JSON list; JSONL also accepted) is gated and not
shipped: pass its path as ``data_path``. Without one the task uses a SYNTHETIC data set in the same
format (:func:`r3.tasks.xlam_synthetic.synthetic_xlam`) and sets ``task.synthetic = True``.
Write the synthetic set to a file with::

    python -m r3.tasks.function_calling --synthetic 2000 --out xlam_synthetic.json

Verifier rules (see :func:`parse_calls` and :func:`calls_match`):

* the answer is the whole completion when it parses as JSON and is a call list (``[]`` included);
* otherwise it is EVERY call attempt embedded in the text after a leading reasoning block (below),
  in order, however long the text is. Scanning left to right, each ``[`` or ``{`` in prose starts a
  *structure* that runs to its matching bracket (strings, with their escapes, are skipped:
  ``"..."``, and ``'...'`` where a value or key starts, after ``[``, ``{``, ``,`` or ``:``); a
  mismatched closing bracket ends it as broken, and so does the end of the text (a truncated
  structure). A structure is a call attempt when it holds a ``:`` or ``=`` or a character that
  looks like a colon (a key of any spelling: ``"name":``, ``name:``, ``"n\\u0061me":``, ``'name' =``)
  or is an empty list (``[]``, blanks inside); other structures (``[1, 2]``, ``{}``, ``[see
  above]``) are not. There are no drafts: every attempt is a call (or calls), prose between
  attempts or not, so ``Call 1: {a} Call 2: {b}`` or a first answer and its correction make both
  calls, and labelled calls (``1. Paris: {a}\\n2. Tokyo: {b}``, fenced blocks under headings) are
  one answer. The attempts group into *runs*: an attempt and the attempts and ``<tool_call>`` /
  ``</tool_call>`` tags (any blanks, letter case, full-width form or attributes) before it, back
  to the first prose: anything but blank-looking characters (blanks, control, unassigned and
  private-use characters, characters that fold to nothing such as zero-width and combining ones,
  ``,`` and ``;`` in any form, Hangul fillers), other markup in angle brackets
  (``<|python_tag|>`` where it leads into calls), code fences, list numbers and bullets (``1.``,
  ``2)``, ``-``, ``*``) and complete structures without a key; a call may not hide in what a run
  passes over (as in loose strings, below; markup that wraps JSON calls is fine: Mistral's
  ``[TOOL_CALLS]``, ``<tool_calls>``, Granite's ``<function_call>`` and ``<|tool_call|>``, Llama's
  ``<|python_tag|>``; not OLMo 3's ``<function_calls>``, a block of Python calls). So Hermes / Qwen
  blocks
  (``<tool_call>{a}</tool_call>\\n<tool_call>{b}</tool_call>``), Llama's ``{a}; {b}`` and
  ``[a]\\n[b]`` are one run each. The answer is the calls of all attempts, in order. Each must be
  complete valid JSON and a call list (``[]`` included), a single call object, or a wrapper (an
  object without a ``"name"`` whose one object-or-list value is one, under a key of
  :data:`_WRAPPER_KEYS` in any letter case: ``{"tool_calls": [...]}``, ``{"type": "function",
  "function": {call}}``, OpenAI's legacy ``{"function_call": {call}}``, also nested; beside it only ``id`` and ``role`` with a string, number,
  boolean or null, ``type`` as ``"function"`` and ``content`` as null or ``""``: any other key may
  negate or change the calls, ``"dry_run": true``, ``"tool_choice": "none"``, or hold another call,
  so it is no answer, as are ``{"do_not_call": [...]}`` and ``{"function": "f", "args": []}``; a
  wrapper yields no calls only as ``{"tool_calls": []}``); a call list may hold wrappers that make
  calls as items (OpenAI's ``[{"type": "function", "function": {call}}, ...]``). An attempt of no
  calls (``[]``, ``{"tool_calls": []}``) beside one that makes calls is no answer. Tags must pair
  up in each run: a block opens, holds one attempt and closes; a block opened twice or unclosed,
  holding two attempts, a closing tag right before a run (a block of prose before it), or a tag
  written otherwise than ``<tool_call>`` / ``</tool_call>`` (``<tool_call name="f">``,
  ``<TOOL_CALL>``, ``</tool_call >``, an ``id`` attribute: a harness finds the tags as written)
  makes it no answer. Only the very last block of the completion may stay unclosed: the next tag
  after each run's last attempt must close its block unless no tag follows
  (``<tool_call>{a}\\nNext:\\n<tool_call>{b}</tool_call>`` is no answer). A Hermes / Qwen harness
  runs only the blocks, so when the text opens one (after the reasoning block, outside the
  structures) every attempt must be in a block: one before, between or after them
  (``<tool_call>{a}</tool_call> and {b}``) is no answer, and a block holds its attempt and JSON
  whitespace alone, as a harness parses the text between the tags as JSON (prose, a comment, a
  list number, a code fence or an invisible character in a block, also after the last block when
  it stays open, is no answer, and so is ``</tool_call>`` in a string of its attempt, where the
  harness's block ends: ``"id": "</tool_call>"``); structures without a key, blocks apart with prose between, and
  text with no opening tag (a bare list, ``{a}; {b}``, labelled calls; a stray ``</tool_call>``) are fine. A broken,
  truncated or invalid attempt anywhere is no answer, and nothing inside a structure is searched
  separately (``[{right call}, {broken call}]`` is no answer, not the right call alone). A
  leading reasoning block (the completion opens with ``<think>``, after blanks, up to its first
  ``</think>``, where a reasoning parser splits it) is reasoning, not calls: its attempts are not
  read, so an answer only inside it is no answer, a bracket left open in it (``[0, 100)``) reaches no further
  than its end, and a block never closed leaves no answer. A ``</think>``
  without that opening is text (r3 renders Qwen3 prompts with the think block closed; where a
  generation prompt opens it, as DeepSeek-R1-Distill's ``<think>\\n``, the reply's text starts
  with that opening: :meth:`r3.chat.ChatFormat.decode`);
* a call must not hide in the answer's loose strings: its keys and the strings beside its calls
  (``"id": "call_1"`` is fine; ``"id": "delete_all()"`` or a string holding a call attempt, also
  in full-width forms, is no answer, see :func:`hidden_call`); nor in full-width brackets outside
  the runs (``\\uff5b"name"\\uff1a ...\\uff5d``: complete anywhere there, also opened before a run
  and closed after it; broken or truncated too after the first run);
* a call in call syntax anywhere outside the runs (after the reasoning block) or around a run
  (before, between and after the runs read as one text with ``[]`` for each run:
  ``repeat([...], times=1000)``) is another call: no answer (:func:`called_later`), the text read
  after resolving HTML character references and markdown backslash escapes (``&lt;tool_call&gt;``,
  ``&#40;``, ``delete_file\\("/"\\)``): a tool of the example named with a parenthesis
  (``get_weather(city="Oslo")``, ``functions.get_weather (...)``, ``**get_weather**(...)``,
  `` `get_weather` (city="Oslo")``), glued to a bracket or after
  ``Action:`` (ReAct: ``delete_file[/]``, ``Action: delete_file``) or as a tag (XML tool calls:
  ``<get_weather><city>Oslo</city></get_weather>``, ``<delete_file path="/"/>``), any name with
  ``_`` or ``.`` followed by one (``delete_user (42)``, ``os.remove(path)``), any name whose
  parenthesis closes at once or opens with a string, list, object or keyword argument
  (``reset()``, ``delete_files(path="/")``), other models' call syntax (``<function=name>``, an
  opening ``<tool_call>`` tag, ``<function ...>``, ``<invoke``, ``[TOOL_CALLS]``, ``>>>name``,
  ``<|recipient|>``, Llama's ``<|python_tag|>`` (what follows it outside the runs is code for its
  interpreter: ``<|python_tag|>exec(s)``; with one anywhere after the reasoning block, the text
  outside the runs after the first one holds only blank-looking characters and markup in angle
  brackets, and the runs pass over markup alone: ``<|python_tag|>{a}\\nwipe(1)``,
  ``<|python_tag|>{a} Done.`` and ``<|python_tag|>[wipe(1)] {a}`` are no answer), OLMo 3's
  ``<function_calls>`` (a block of Python calls, one a line: JSON in it is no answer), Gemma 3's
  code fence opened as ``tool_code`` (three backquotes or tildes: Python its harness evaluates,
  so ``wipe(1)`` in one beside the answer is a call), ``Action Input:``, DeepSeek's and gpt-oss's markers,
  ``✿FUNCTION✿``,
  ``name:`` and ``arguments:`` lines within 8 lines of each other, also ``method:`` /
  ``params:``, ``tool:`` / ``tool_input:``, ``toolName:`` / ``toolArgs:``, ``Tool Name:`` /
  ``Tool Input:`` and the like (``-`` and one blank between words read as ``_``), as (nested)
  list items, after a ``>``, with the key in bold or backquotes, or in quotes, straight or curly, outside the structures before the first run (YAML, or JSON without
  its braces, a key per line), ...); full-width and other compatibility forms count as ASCII,
  combining and zero-width characters are ignored, in any letter case. ``f(x)``, ``value(s)`` and
  ``word (see: above)`` are prose;
* JSON is parsed with :mod:`json` only: NaN/Infinity, duplicate object keys (``{"x": 2, "x":
  1}``) and a number with more digits than a float holds (``20240101.000000001``) make a
  structure invalid; nothing is executed;
* a call list is a JSON list of calls; a single call object is accepted as a list of one. A call is
  an object with a string ``"name"`` and an object ``"arguments"`` (or a string of JSON that
  parses to an object: OpenAI's encoding; Llama 3's ``"parameters"`` object when there is no
  ``"arguments"``). Beside them it may hold only ``"id"`` and ``"index"`` with a string, number,
  boolean or null and ``"type": "function"``; any other key makes it no call: flat arguments
  (``"units": "fahrenheit"``, ``"parameters"`` beside ``"arguments"``), a second function name
  (``"function": "f"``, ``"method": "f"``), a flag (``"execute": false``, ``"times": 1000``), a
  structure (``"then": {call}``). Without an arguments object the call has no arguments and must
  have no other key (``{"name": "f", "city": "Paris"}`` is no call). An object with a ``"name"``
  key is never a wrapper;
* correct iff the calls equal the reference calls as a multiset (order of calls does not matter):
  same name and same arguments -- no missing or extra argument (even one equal to its default);
  numbers compare by value (``100 == 100.0``), except that a parameter the tool declares as an
  integer (``int``, ``int, optional``, ``integer``) must hold an integer where the reference
  does (``3.0`` for ``3`` fails in a harness: ``range(3.0)``; BFCL refuses it), and so must each
  item the reference gives an integer in one declared as a list of integers (``List[int]``,
  ``List[List[int]]``, JSON Schema's array of ``integer``: ``[55.0, 51]`` for ``[55, 51]``
  fails), and booleans are
  not numbers (``true != 1``); strings compare exactly; lists in order; objects recursively;
* completions over ``MAX_COMPLETION_CHARS``, structures over ``MAX_JSON_CHARS`` or nested deeper
  than ``MAX_DEPTH`` are wrong.

The scan is one pass over the brackets and quotes of the text, and each attempt after the
reasoning block is parsed once: time linear in the completion.
"""

from __future__ import annotations

import decimal
import functools
import html
import json
import re
import sys
import unicodedata
from typing import Any

from r3.errors import ArgumentParser, R3Error, cli_main
from r3.files import write_text_atomic
from r3.tasks.base import (
    Task,
    check_n,
    check_split,
    in_test_split,
    leading_reasoning_end,
    opt_float,
    opt_int,
    opt_path,
    opt_str,
    read_records,
    shuffled_prefix,
)
from r3.tasks.xlam_synthetic import synthetic_xlam

__all__ = ["FunctionCallingTask", "answer_calls", "parse_calls", "calls_match", "values_equal", "integer_parameters",
           "load_file", "synthetic_xlam", "write_synthetic"]

MAX_COMPLETION_CHARS = 100_000
MAX_JSON_CHARS = 20_000
MAX_DEPTH = 32

REFLECTION_PROMPT = (
    "You tried performing the task, but failed in generating the correct tool call. Reflect on what "
    "went wrong and write a short explanation that will help you do better next time."
)
RETRY_PROMPT = "Now try again. Answer with only the JSON list of function calls."
SYSTEM_PROMPT = (
    "You are an expert in composing function calls. You are given a question and a set of possible "
    "functions. Based on the question, make one or more function calls to achieve the purpose. Use "
    "only the functions listed below, give every required argument with a value of the right type, "
    "and leave out optional arguments the question does not mention.\n\n"
    "Available functions, one JSON object per line:\n{tools}\n\n"
    'Answer with only a JSON list of the calls, in the format [{"name": "function_name", '
    '"arguments": {"argument_name": value}}], one object per call, and nothing else.'
)


# ---------------------------------------------------------------------------------------
# parsing model output
# ---------------------------------------------------------------------------------------
def _no_constants(name: str):
    raise ValueError(f"{name} is not valid JSON")


def _no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict:
    out = dict(pairs)
    if len(out) != len(pairs):
        raise ValueError("duplicate object key")
    return out


def _exact_float(literal: str) -> float:
    """A JSON number with a fraction or exponent as a float, when the float is that number as
    written (its shortest decimal is the literal's value: ``1.50``, ``1e2``); a literal with more
    digits than a float holds (``20240101.000000001``) is invalid."""
    value = float(literal)
    try:
        exact = decimal.Decimal(literal)
    except decimal.InvalidOperation:  # (an exponent past Decimal's range: 1e1000000000000000000)
        raise ValueError(f"{literal[:40]} is not exactly a float") from None
    if decimal.Decimal(repr(value)) != exact:
        raise ValueError(f"{literal[:40]} is not exactly a float")
    return value


_DECODER = json.JSONDecoder(parse_constant=_no_constants, object_pairs_hook=_no_duplicate_keys,
                            parse_float=_exact_float)


def _depth_ok(value: Any, limit: int = MAX_DEPTH) -> bool:
    stack = [(value, 1)]
    while stack:
        v, d = stack.pop()
        if isinstance(v, (list, dict)):
            if d > limit:
                return False
            stack.extend((x, d + 1) for x in (v.values() if isinstance(v, dict) else v))
    return True


# What a call object may hold beside its name and arguments: metadata with a scalar value, "type"
# only as "function".
_CALL_META = frozenset({"id", "type", "index"})


def _as_calls(value: Any, allow_empty: bool = True) -> list[dict] | None:
    """Normalise a parsed JSON value to ``[{"name": str, "arguments": dict}, ...]`` or None."""
    if isinstance(value, dict):
        value = [value]
    if not isinstance(value, list) or (not value and not allow_empty):
        return None
    calls = []
    for c in value:
        if not isinstance(c, dict) or not isinstance(c.get("name"), str):
            return None
        key = _arguments_key(c)
        if key is None and len(c) > 1:
            return None  # (no arguments object, other keys: flat arguments, ambiguous)
        args = c[key] if key else {}
        if key == "arguments" and isinstance(args, str):  # (OpenAI's JSON-encoded arguments)
            try:
                args = _loads(args)
            except (ValueError, RecursionError):
                return None
        if not isinstance(args, dict):
            return None
        for k, v in c.items():
            if k not in ("name", key) and (k not in _CALL_META or isinstance(v, (dict, list))
                                           or (k == "type" and v != "function")):
                return None  # (flat arguments, a second function name, a flag: another call, or ambiguous)
        calls.append({"name": c["name"], "arguments": args})
    return calls


def _arguments_key(call: dict) -> str | None:
    """Which key of a call object holds its arguments: ``"arguments"``, else Llama 3's
    ``"parameters"``, else None (no arguments)."""
    return "arguments" if "arguments" in call else "parameters" if "parameters" in call else None


def _loads(s: str) -> Any:
    """json.loads with NaN/Infinity and duplicate keys rejected and size/depth bounds; raises
    ValueError."""
    if len(s) > MAX_JSON_CHARS:
        raise ValueError("too long")
    value = _DECODER.decode(s)
    if not _depth_ok(value):
        raise ValueError("too deep")
    return value


_MARKS = re.compile(r"""[\[\]{}"']""")
_CLOSER = {"[": "]", "{": "}"}


def _closes_on_its_line(text: str, pos: int) -> bool:
    """Whether the quote at ``pos`` has an unescaped closing one before the end of its line."""
    j = pos + 1
    while j < len(text):
        c = text[j]
        if c in "\n\r":
            return False
        if c == text[pos]:
            return True
        j += 2 if c == "\\" else 1
    return False


def _structures(text: str, begin: int = 0):
    """``(start, end, complete)`` of each top-level structure from ``begin`` on (see the module
    docstring), in order: complete ones end at their matching bracket, broken ones at the
    mismatched closing bracket, truncated ones at the end of the text. One pass over the brackets
    and quotes: a
    string opens at ``"``, or at ``'`` where a value or key starts (after ``[``, ``{``, ``,`` or
    ``:`` and blanks; ``[what's]`` is no string) and closes on the same line (``[80s, '90s]`` is
    none), and ends at the same quote, escapes skipped."""
    marks = _MARKS.finditer(text, begin)
    for m in marks:
        if m.group() not in _CLOSER:
            continue  # prose: quotes and closing brackets mean nothing here
        start, stack, string_start, quote = m.start(), [_CLOSER[m.group()]], -1, ""
        for m2 in marks:
            pos, ch = m2.start(), m2.group()
            if string_start >= 0:
                if ch == quote:
                    slashes = 0
                    while pos - slashes - 1 > string_start and text[pos - slashes - 1] == "\\":
                        slashes += 1
                    if slashes % 2 == 0:
                        string_start = -1
            elif ch == '"':
                string_start, quote = pos, ch
            elif ch == "'":
                k = pos - 1
                while text[k].isspace():  # (never past the structure's opening bracket)
                    k -= 1
                if text[k] in "[{,:" and _closes_on_its_line(text, pos):
                    string_start, quote = pos, ch
            elif ch in _CLOSER:
                stack.append(_CLOSER[ch])
            elif ch != stack.pop():
                yield start, pos + 1, False  # mismatched: broken; scanning goes on after it
                break
            elif not stack:
                yield start, pos + 1, True
                break
        else:
            yield start, len(text), False  # truncated
            return


# ':' and '=' and what looks like a colon (NFKC leaves most of these alone)
_COLONS = (":=\u02d0\u02d1\u02f8\u0589\u05c3\u0703\u0704\u0705\u0706\u0707\u0708\u0709\u1361\u1365\u1366"
           "\u1804\u205a\u205d\u2236\u2254\u2255\u2982\u2af6\ua4fd\ua6f4\ua789\ufe13\ufe30\ufe55\uff1a"
           "\u0903\u0983\u0a03\u0a83\u0b03\u0c03\u0c83\u0d03\u0d83\u0f7f"
           "\U00010781\U00010782\U00012471\U00012472\U0001da8a")
_KEY_LIKE = re.compile("[" + _COLONS + "]")
# Keys (any letter case) that name the function in other call schemas: an object with a string
# there is a call, never a wrapper.
_NAME_KEYS = frozenset({"function", "function_name", "functionname", "func", "fn", "tool", "tool_name", "toolname",
                        "action", "recipient_name", "api", "api_name", "method", "command"})
# The keys a wrapper of no calls may have ({"tool_calls": []}).
_EMPTY_WRAPPER_KEYS = frozenset({"tool_calls", "calls", "function_calls", "functions", "tool_uses", "tools"})
# The keys (any letter case) a wrapper may hold its calls under ({"type": "function", "function": {call}}
# too, and OpenAI's legacy {"role": "assistant", "content": null, "function_call": {call}}), and the
# keys beside them: scalars, "type" only as "function", "content" only null or "".
_WRAPPER_KEYS = _EMPTY_WRAPPER_KEYS | {"function", "function_call"}
_WRAPPER_META = frozenset({"id", "type", "role", "content"})
_BLANK_LIST = re.compile(r"\[[\s\u200b-\u200f\u2060\ufeff]*\]")


def _yielded_calls(value: Any, depth: int = 0) -> list[dict] | None:
    """The calls a parsed structure yields: itself as a call list or call object, or for a
    wrapper object the calls of its one value that is an object or a list, under a key of
    :data:`_WRAPPER_KEYS`, when that value yields any (beside it only the keys of
    :data:`_WRAPPER_META`: another key may negate the calls, ``"dry_run": true``, or hold another
    call, so it is ambiguous: none). A wrapper yields no calls only as ``{"tool_calls": []}`` (or
    another key of :data:`_EMPTY_WRAPPER_KEYS`) with nothing beside."""
    calls = _as_calls(value, allow_empty=isinstance(value, list) and not value)
    if calls is None and isinstance(value, list) and depth <= MAX_DEPTH:
        calls = []  # a list of calls and wrappers ([{"type": "function", "function": {call}}, ...])
        for item in value:
            got = _yielded_calls(item, depth + 1) if isinstance(item, dict) else None
            if not got:
                return None
            calls += got
        return calls
    if calls is not None or not isinstance(value, dict) or "name" in value or depth > MAX_DEPTH:
        return calls  # (an object with a "name" is a call, right or wrong, never a wrapper)
    inner = [k for k, v in value.items() if isinstance(v, (dict, list))]
    if len(inner) != 1 or str(inner[0]).casefold() not in _WRAPPER_KEYS:
        return None
    for k, v in value.items():
        if k != inner[0] and (k not in _WRAPPER_META or (k == "type" and v != "function")
                              or (k == "content" and v not in (None, ""))):
            return None  # ({"function": "f", "args": []}, {"tool_choice": "none", "tool_calls": [...]})
    calls = _yielded_calls(value[inner[0]], depth + 1)
    if calls == [] and not (len(value) == 1 and str(next(iter(value))).casefold() in _EMPTY_WRAPPER_KEYS):
        return None  # (no calls through an object that says more: {"method": "f", "params": []})
    return calls


# Between the items of a run: tags and other markup in angle brackets (``<tool_call id="1">``,
# ``<|python_tag|>``, compatibility forms of the brackets too), code fences, list numbers and
# bullets (``1.``, ``2)``, ``-``).
_GAP_TOKEN = re.compile("[<\ufe64\uff1c][^<>\ufe64\ufe65\uff1c\uff1e]{1,200}[>\ufe65\uff1e]|`{3,}[A-Za-z0-9_+-]*"
                        "|(?<![A-Za-z0-9_+`-])[0-9]{1,3}[.)]|(?<![A-Za-z0-9_+`-])[-*\u2022]")
_BLANK_LETTERS = "\u115f\u1160\u3164\uffa0\u2800"  # Hangul fillers, the blank Braille pattern


def _is_attempt(text: str, start: int, end: int, complete: bool) -> bool:
    return bool(_KEY_LIKE.search(text, start, end) or (complete and _BLANK_LIST.fullmatch(text, start, end)))


@functools.lru_cache(maxsize=4096)
def _separator(c: str) -> bool:
    """What may stand between the items of one answer: a character that folds (:func:`_fold`) to
    nothing, blanks, commas or semicolons (zero-width and combining characters, full-width and
    Greek semicolons, ...), control, unassigned and private-use characters and blank-looking
    letters."""
    return (c in _BLANK_LETTERS or unicodedata.category(c) in ("Cc", "Cn", "Co")
            or all(x.isspace() or x in ",;" for x in _fold(c)))


def _separators(text: str, start: int, end: int) -> bool:
    return all(_separator(c) for c in text[start:end])


def _tag(s: str) -> str | None:
    """``"open"`` or ``"close"`` for a ``<tool_call ...>`` / ``</tool_call>`` tag (any blanks,
    letter case, compatibility forms, an ``id`` attribute), ``"named"`` for one with any other
    attribute (``<tool_call name="f">``: no answer), ``"think"`` for ``<think>`` / ``</think>``
    (which end a run), None for other markup."""
    inner = _fold(s[1:-1])
    m = re.match(r"\s*(/?)\s*([a-z_]+)(?:\s|$)", inner)
    if m and m.group(2) == "think" and not inner[m.end():].strip():
        return "think"
    if not m or m.group(2) != "tool_call":
        return None
    attrs = inner[m.end():].strip()
    if attrs and (m.group(1) or not re.fullmatch(r"id\s*=\s*(?:\"[^\"]*\"|'[^']*'|[a-z0-9_-]+)", attrs)):
        return "named"  # (<tool_call name="f">: its block may call f; only an id is read past)
    return "close" if m.group(1) else "open"


def _run_items(text: str, found: list[tuple[int, int, bool]],
               last: int) -> tuple[list[tuple[str, int, int]], int, list[str]]:
    """The items of the run that ends with structure ``found[last]``, in order: ``("call", start,
    end)`` for each call attempt and ``("open" | "close", start, end)`` for each tool-call tag,
    from that structure back to the first prose: anything but separators (:func:`_separator`),
    markup in angle brackets, code fences and complete structures without a key, which a run
    passes over. Also where the run starts and the texts it passed over (a call may not hide in
    them)."""
    items = [("call", found[last][0], found[last][1])]  # (built backwards)
    passed: list[str] = []
    k, left = last, found[last][0]
    while True:
        lo = found[k - 1][1] if k > 0 else 0
        pos = left
        for m in reversed(list(_GAP_TOKEN.finditer(text, lo, left))):
            if not _separators(text, m.end(), pos):
                return items[::-1], pos, passed
            kind = _tag(m.group()) if m.group()[0] in "<\ufe64\uff1c" else None
            if kind == "think":
                return items[::-1], pos, passed  # (reasoning is not part of the answer)
            if kind:
                items.append((kind, m.start(), m.end()))
                passed.append(m.group()[1:-1].split(None, 1)[-1] if kind == "open" else "")  # (its id)
            else:
                passed.append(m.group())
            pos = m.start()
        if not _separators(text, lo, pos) or k == 0:
            return items[::-1], pos, passed
        k -= 1
        s0, e0, complete = found[k]
        if _is_attempt(text, s0, e0, complete):
            items.append(("call", s0, e0))
        elif complete:
            passed.append(text[s0:e0])
        else:
            return items[::-1], pos, passed  # (a broken structure without a key is prose)
        left = s0


def _well_formed(items: list[tuple[str, int, int]]) -> bool:
    """Tags in a run pair up: a block opens before it closes, holds one call attempt, and is not
    opened twice; a closing tag without its opening one means the block before held prose."""
    open_, held = False, 0
    for kind, _, _ in items:
        if kind == "named":
            return False
        if kind == "open":
            if open_:
                return False
            open_, held = True, 0
        elif kind == "close":
            if not open_ or held != 1:
                return False
            open_ = False
        elif open_:
            held += 1
            if held > 1:
                return False
    return True


_ANGLED = re.compile("[<\ufe64\uff1c][^<>\ufe64\ufe65\uff1c\uff1e]{1,200}[>\ufe65\uff1e]")


def _tool_call_tags(text: str, found: list[tuple[int, int, bool]], thought: int) -> list[tuple[int, str]]:
    """``(start, kind)`` of each ``<tool_call>`` / ``</tool_call>`` tag (:func:`_tag`: ``"open"``,
    ``"close"`` or ``"named"``) after the reasoning block that ends at ``thought`` and outside the
    structures ``found``, in order."""
    tags, lo = [], thought
    for s0, e0, _ in found + [(len(text), len(text), True)]:
        if s0 > lo:
            for m in _ANGLED.finditer(text, lo, s0):
                kind = _tag(m.group())
                if kind in ("open", "close", "named"):
                    tags.append((m.start(), kind))
        lo = max(lo, e0)
    return tags


def _json_blank(text: str, start: int, end: int) -> bool:
    """Whether ``text[start:end]`` is JSON whitespace alone (spaces, tabs, line feeds, carriage
    returns: what ``json.loads`` reads around a value)."""
    return not text[start:end].strip(" \t\n\r")


_EXACT_TAG = {"open": "<tool_call>", "close": "</tool_call>"}


def _blocks_fit(text: str, runs: list[list[tuple[str, int, int]]], tags: list[tuple[int, str]]) -> bool:
    """Where the completion opens a ``<tool_call>`` block (``tags``: :func:`_tool_call_tags`), a
    harness reads only the blocks: then every call attempt of the runs (their items, in order, see
    :func:`_run_items`) must stand right after an opening tag, and the next tag after each run's
    last attempt must close its block: only the very last block of the completion (no tag after
    it) may stay unclosed. A block holds its attempt and JSON whitespace only: a harness parses
    the text of the block as JSON, so prose, a code fence, a comma or an invisible character in it
    (``<tool_call>{a} Done.</tool_call>``, after the last block when it stays open) is no answer,
    and so is an attempt holding ``</tool_call>`` in a string (``"id": "</tool_call>"``: the
    harness's block ends there). A harness finds a block by its tags as written: a block's tags
    must be exactly ``<tool_call>`` and ``</tool_call>`` (``<TOOL_CALL>``, ``</tool_call >``, an
    ``id`` attribute or a full-width bracket is no answer)."""
    if not any(kind == "open" for _, kind in tags):
        return True
    t = 0
    for items in runs:
        for j, (kind, start, end) in enumerate(items):
            if kind == "call" and (j == 0 or items[j - 1][0] != "open"):
                return False  # (an attempt outside the blocks: a harness would not make its calls)
            if kind == "call" and text.find(_EXACT_TAG["close"], start, end) >= 0:
                return False  # (a closing tag in the attempt's strings: a harness's block ends there)
            if kind in ("call", "close") and j > 0 and not _json_blank(text, items[j - 1][2], start):
                return False  # (the block holds more than its attempt)
            if kind in ("open", "close") and text[start:end] != _EXACT_TAG[kind]:
                return False  # (a tag a harness does not find: the block is not one)
        while t < len(tags) and tags[t][0] < items[-1][2]:
            t += 1
        if t < len(tags) and (tags[t][1] != "close" or not text.startswith(_EXACT_TAG["close"], tags[t][0])):
            return False  # (an unclosed block before another block, or a closing tag as no harness writes it)
        if not _json_blank(text, items[-1][2], tags[t][0] if t < len(tags) else len(text)):
            return False  # (text after the attempt in its block, or after the last block left open)
    return True


def _embedded(text: str, thought: int) -> tuple[list[dict] | None, int, list, list[tuple[int, int]], list[str]]:
    """The calls of every run of call attempts in ``text`` after the reasoning block that ends at
    ``thought`` (see the module docstring), or None; where the last call attempt ends (0 when
    there is none); the parsed structures of the runs; each run's start and end (of its last
    attempt), in order; the texts the runs passed over."""
    found, attempts = [], []
    # (read from the block's end: a bracket left open in the reasoning, "[0, 100)", must not
    # swallow the answer after it, nor hide a broken attempt there)
    for start, end, complete in _structures(text, thought):
        found.append((start, end, complete))
        if _is_attempt(text, start, end, complete):
            attempts.append(len(found) - 1)
    if not attempts:
        return None, 0, [], [], []
    end = found[attempts[-1]][1]
    if not all(found[k][2] for k in attempts):
        return None, end, [], [], []  # a broken or truncated attempt
    runs, passed, n, shapes = [], [], len(attempts), []
    while n:  # the runs, from the last one back
        last = attempts[n - 1]
        items, start, run_passed = _run_items(text, found, last)
        if not _well_formed(items):
            return None, end, [], [], []
        n -= sum(kind == "call" for kind, _, _ in items)
        runs.append((start, found[last][1]))
        shapes.append(items)
        passed += run_passed
    if not _blocks_fit(text, shapes[::-1], _tool_call_tags(text, found, thought)):
        return None, end, [], [], []
    calls, values, empty = [], [], False
    try:
        for k in attempts:
            s0, e0, _ = found[k]
            if e0 - s0 > MAX_JSON_CHARS:
                return None, end, [], [], []
            value = _loads(text[s0:e0])
            got = _yielded_calls(value)
            if got is None:
                return None, end, [], [], []
            calls += got
            empty = empty or not got
            values.append(value)
    except (ValueError, RecursionError):
        return None, end, [], [], []
    if empty and calls:
        return None, end, [], [], []  # ("no calls" beside calls: which is the answer?)
    return calls, end, values, runs[::-1], passed


def _loose_strings(values: list) -> list[str]:
    """The strings of an answer's structures outside its calls' names and arguments: keys, and
    the strings beside the calls in call objects and wrappers (``"id": "call_1"``). A call could
    hide in one (``"next": "delete_all()"``)."""
    out, stack = [], list(values)
    while stack:
        v = stack.pop()
        if isinstance(v, list):
            stack.extend(v)
        elif isinstance(v, dict):
            for k, x in v.items():
                if "name" in v and k in ("name", _arguments_key(v)):
                    continue
                out.append(k)
                if isinstance(x, str):
                    out.append(x)
                elif isinstance(x, (list, dict)):
                    stack.append(x)
    return out


def _answer(text: Any) -> tuple[list[dict] | None, int, list[str], list[tuple[int, int]], list[str]]:
    """:func:`answer_calls`, the answer's loose strings (:func:`_loose_strings`), where each of
    its runs starts and ends and what the runs passed over (:func:`_run_items`)."""
    try:
        if not isinstance(text, str) or len(text) > MAX_COMPLETION_CHARS:
            return None, 0, [], [], []
        s = text.strip()
        if s[:1] in ("[", "{"):
            try:
                value = _loads(s)
                calls = _as_calls(value)
                if calls is not None:
                    return calls, len(text), _loose_strings([value]), [(0, len(text))], []
            except (ValueError, RecursionError):
                pass
        calls, end, values, runs, passed = _embedded(text, _reasoning_end(text))
        if calls is None:
            return None, end, [], [], []
        return calls, end, _loose_strings(values), runs, passed
    except (MemoryError, RecursionError):  # no answer (anything else is a bug: Task.verify counts it)
        return None, 0, [], [], []


def answer_calls(text: Any) -> tuple[list[dict] | None, int]:
    """The calls a completion makes (see the module docstring), or None, and the position where
    the answer ends. Any text is an answer or None (only a bug in the parser raises, which
    ``Task.verify`` counts as a verifier error)."""
    calls, end = _answer(text)[:2]
    return calls, end


def parse_calls(text: Any) -> list[dict] | None:
    """The calls a completion makes, as ``[{"name", "arguments"}]``, or None if it has no
    parseable call list (see the module docstring for the rules). Raises only on a bug, as
    :func:`answer_calls`."""
    return answer_calls(text)[0]


_INVISIBLE = ("Mn", "Me", "Cf")  # combining marks and format characters (zero-width spaces)


@functools.cache
def _invisible_table() -> dict[int, None]:
    """A :meth:`str.translate` table that deletes every character :func:`_visible` removes (built
    once per process from :mod:`unicodedata`, a quarter of a second)."""
    return {i: None for i in range(sys.maxunicode + 1)
            if unicodedata.category(chr(i)) in _INVISIBLE or unicodedata.combining(chr(i))}


def _visible(text: str) -> str:
    """``text`` without combining marks, format characters and any other character with a
    combining class (some spacing marks have one, and NFKC reorders runs of them in quadratic
    time)."""
    return text if text.isascii() else text.translate(_invisible_table())


def _fold(text: str) -> str:
    """``text`` as the later-call search reads it: invisible characters removed (:func:`_visible`),
    then NFKC (full-width and other compatibility forms of letters, parentheses and equals signs
    become ASCII), case folded, and what those two made invisible removed again (``İ`` folds to
    ``i`` and a combining dot). Linear in the text."""
    return _visible(unicodedata.normalize("NFKC", _visible(text)).casefold())


# In folded text: a run of ASCII identifier characters and dots (matched only from its start, never
# backtracked into: linear), up to three closing marks of Markdown emphasis, code or quotes
# (``**reset**(``, `` `reset`(``), blanks, an opening parenthesis; and what opens its arguments.
_NAME_CLOSE = "[*`'\"\u2019\u201d]"
_NAME_RUN = re.compile(r"(?<![a-z0-9_.])(?=([a-z0-9_.]+))\1(?=(" + _NAME_CLOSE + r"{0,3}\s*))\2\(\s*")  # ((?=(x))\1: atomic)
_CALL_OPENER = re.compile(r"[)\[{'\"`\u2018\u201c]|[rbuf]{1,2}['\"]|[a-z_][a-z0-9_]*\s*=(?!=)")
# After a closing mark (``**Paris** ("FR")``, `` `celsius` (`metric`)``: prose) only a parenthesis
# that closes at once or opens with a keyword argument reads as a call: ``**reset**(force=True)``.
_KEYWORD_OPENER = re.compile(r"\)|[a-z_][a-z0-9_]*\s*=(?!=)")


# Other models' tool-call syntax: Llama 3's <function=name> (any <function ...> tag), an opening
# <tool_call> or <tool_calls> tag (Hermes, GLM's "<tool_call>name"), Anthropic's <invoke>,
# <function_calls> (also OLMo 3's block of Python calls, one a line: JSON in it is not what its
# harness reads, and "wipe(1)" beside it is a call there), Gemma 3's ```tool_code fence (Python
# its harness evaluates, "wipe(1)" too), Mistral's [TOOL_CALLS], Kimi's <|tool_call...|>,
# functionary's ">>>name" and <|recipient|>, Llama's <|python_tag|> (code for its interpreter where no call follows), ReAct's
# "Action Input:", DeepSeek's tool▁call, gpt-oss's "to=functions.", Qwen-Agent's ✿FUNCTION✿; and
# "name: f" and "arguments:" lines (YAML, :func:`_yaml_call`).
_CALL_MARKER = re.compile(r"<\s*(?:tool_calls?|invoke|function_calls?|function)(?![a-z0-9_])"
                          r"|\[\s*tool_calls\s*\]|<\|\s*(?:tool_call|recipient|python_tag)|>>>\s*[a-z_]"
                          r"|(?:```|~~~)[ \t]*tool_code"
                          r"|action\s*input\s*:"
                          r"|tool\u2581call|\bto\s*=\s*functions\.|\u273ffunction\u273f")
_YAML_MARK = re.compile(r"[-*+>\u2022]|[0-9]{1,3}[.)]")  # (a list item or a quote)
# (a key of up to three words with one space between them: "Tool Name:", LangChain's "Tool Input:")
_YAML_KEY = re.compile("[*`]*([a-z_-]+(?: [a-z_-]+){0,2})[*`]*[ \t]*[" + _COLONS + "]")
_YAML_QUOTED_KEY = re.compile("[*`\"'\u2018\u2019\u201c\u201d]*([a-z_-]+(?: [a-z_-]+){0,2})"
                              "[*`\"'\u2018\u2019\u201c\u201d]*[ \t]*[" + _COLONS + "]")
# (keys compared with "-" and " " read as "_", in lower case: toolName is toolname)
_YAML_NAME_KEYS = _NAME_KEYS | {"name", "recipient", "fn_name", "fnname", "func_name", "funcname", "function_call",
                                "tool_call"}
_YAML_ARGUMENT_KEYS = frozenset({"arguments", "argument", "args", "parameters", "parameter", "params", "input",
                                 "inputs", "action_input", "kwargs", "tool_input", "toolinput", "tool_args",
                                 "toolargs", "tool_arguments", "toolarguments", "tool_parameters", "toolparameters",
                                 "tool_params", "toolparams", "function_arguments", "functionarguments",
                                 "function_args", "functionargs", "function_parameters", "functionparameters",
                                 "func_args", "funcargs", "fn_args", "fnargs", "arguments_json", "input_json"})


def _yaml_kind(line: str, quoted: bool) -> str | None:
    """``"name"`` or ``"arguments"`` for a line keyed so (after blanks, a list mark or quote, and
    ``**`` / backquotes around the key; ``quoted``: quotes too), else None."""
    i = 0
    while i < len(line) and _separator(line[i]):
        i += 1
    mark = _YAML_MARK.match(line, i)
    while mark:  # (nested list items and quotes: "- - name:", "> - name:")
        i = mark.end()
        while i < len(line) and _separator(line[i]):
            i += 1
        mark = _YAML_MARK.match(line, i)
    m = (_YAML_QUOTED_KEY if quoted else _YAML_KEY).match(line, i)
    key = m.group(1).replace("-", "_").replace(" ", "_") if m else ""
    return "name" if key in _YAML_NAME_KEYS else "arguments" if key in _YAML_ARGUMENT_KEYS else None


def _yaml_call(folded: str, quoted: bool, window: int = 8) -> bool:
    """A line keyed ``name:`` (or function, tool, method, ...) and one keyed ``arguments:`` (or
    args, parameters, params, input, ...) within ``window`` lines that are not blank, in either
    order (YAML, also as list items, after a ``>``, or with the keys in bold or backquotes;
    ``quoted``: also keys in quotes, straight or curly: JSON without its braces)."""
    seen = {"name": -window - 1, "arguments": -window - 1}  # (the last line of each kind)
    n = 0
    for line in folded.splitlines():
        if all(_separator(c) for c in line):
            continue
        n += 1
        kind = _yaml_kind(line, quoted)
        if kind:
            if n - seen["arguments" if kind == "name" else "name"] <= window:
                return True
            seen[kind] = n
    return False


def _blank_structures(text: str) -> str:
    """``text`` with every bracketed structure (:func:`_structures`) blanked but its line breaks."""
    parts, at = [], 0
    for start, end, _ in _structures(text):
        parts.append(text[at:start])
        parts.append(re.sub(r"[^\n\r\v\f\x1c-\x1e\x85\u2028\u2029]", " ", text[start:end]))
        at = end
    parts.append(text[at:])
    return "".join(parts)


def _trailing_name(run: str) -> str:
    """The longest tail of dotted parts of ``run`` that each start like a name, digits glued
    before the first one dropped (``1.reset`` -> ``reset``, ``a..b`` -> ``b``, ``9delete_all``
    -> ``delete_all``, ``x.1y`` -> ``y``, ``v1.2`` -> nothing)."""
    parts = []
    for part in reversed(run.split(".")):
        bare = part.lstrip("0123456789")
        if not bare or not (bare[0] == "_" or "a" <= bare[0] <= "z"):
            break
        parts.append(bare)
        if bare != part:
            break
    return ".".join(reversed(parts))


def _any_call(folded: str, quoted: bool = True) -> str | None:
    """The first call in call syntax of any name in ``folded`` text (see :func:`called_later`;
    ``quoted``: a YAML call's keys may be in quotes)."""
    marker = _CALL_MARKER.search(folded)
    if marker:
        return marker.group()
    if _yaml_call(folded, quoted):
        return "name: ... arguments: ..."
    for m in _NAME_RUN.finditer(folded):
        name, between = _trailing_name(m.group(1)), m.group(2)
        if not name:
            continue
        code_like = "_" in name or "." in name
        closed, blanks = bool(between.rstrip()), between != between.rstrip()
        if closed:  # (``**note** (see below)``, ``"EUR" ("euro")``: prose)
            if _KEYWORD_OPENER.match(folded, m.end()) or (code_like and not blanks):
                return name
        elif code_like or (_CALL_OPENER.match(folded, m.end()) and not blanks):
            return name
    return None


def called_later(text: str, end: int, tool_names: list[str]) -> str | None:
    """What is called with call syntax after the answer, or None. Read after :func:`_fold`
    (full-width and other compatibility forms count as ASCII; combining and zero-width characters
    are ignored; any letter case; letters of other scripts that merely look Latin do not count)
    and with HTML character references and markdown backslash escapes resolved (:func:`_unescaped`):

    * a tool of the example, by name (not after a letter or ``_``; a dotted prefix or glued
      digits allowed), then blanks and an opening parenthesis: ``get_weather(city='Oslo')``, ``get_weather (Oslo)``,
      ``functions.get_weather(...)``; or as the name of a tag: ``<get_weather>``, ``</get_weather>``,
      ``<get_weather city="Oslo"/>``;
    * a name of the first two kinds with up to three closing marks of emphasis, code or quotes
      before its parenthesis, glued: ``**get_weather**(...)``, `` `delete_user`(42)``; any name so
      closed, glued or with blanks, before a parenthesis that closes at once or opens with a
      keyword argument: ``**get_weather** (city="Oslo")``, ``**reset**()``; while
      `` `get_weather` (the tool)``, ``**Paris** ("FR")`` and ``"EUR" ("euro")`` are prose;
    * any ASCII identifier with ``_`` or ``.`` in it, then blanks and a parenthesis:
      ``delete_user(42)``, ``delete_user (42)``, ``os.remove(path)``, also after a dot
      (``1.delete_user(42)``, ``Step 2.reset()``);
    * any other ASCII identifier directly followed by a parenthesis that closes at once or opens
      with a string (also ``f'``, ``r"``, backquoted or curly-quoted), a list, an object or a
      keyword argument: ``reset()``, ``reset("all")``, ``reset({})``, ``shutdown(force=True)``;
    * other models' tool-call syntax: ``<function=name>`` (Llama 3), an opening ``<tool_call>``
      tag (Hermes; GLM's ``<tool_call>name``), ``<invoke``, ``<function_calls>``, ``[TOOL_CALLS]``
      (Mistral), ``<|tool_call...`` (Kimi), ``>>>name`` (functionary), ``<|python_tag|>`` (Llama's
      code interpreter), ``Action Input:`` (ReAct).

    Prose stays prose: ``f(x)``, ``value(s)``, ``g(x == 1)``, ``word (note: ...)``, ``3(4)``,
    ``e.g. (this)``, and words in other scripts before a full-width parenthesis
    (``函数（city=巴黎）``); ``my_notes (above)`` and ``Node.js (a runtime)`` do not."""
    return _call_in(_fold(text[end:]), tool_names)


@functools.lru_cache(maxsize=256)
def _tool_pattern(tool_names: tuple) -> tuple[re.Pattern | None, dict[str, str]]:
    """One search for every tool name of an example (folded) before a parenthesis (behind closing
    marks too, see :func:`called_later`) or glued to a bracket (not after a letter or ``_``;
    ReAct's ``delete_file[/]``), as the name of a tag (``<delete_file>``, ``</delete_file>``, ``<delete_file path="/"/>``: XML tool-call syntax) or
    after ReAct's ``Action:`` (``Action: delete_file``, ``**Action 2:** `functions.delete_file```),
    and each folded name's original."""
    keys = {}
    for name in tool_names:
        key = _fold(name).strip() if isinstance(name, str) else ""
        if key:
            keys.setdefault(key, name)
    if not keys:
        return None, keys
    alternatives = "|".join(re.escape(k) for k in sorted(keys, key=len, reverse=True))
    closed = _NAME_CLOSE + r"{1,3}(?:\(|\s+\(\s*(?=" + _KEYWORD_OPENER.pattern + r"))"  # (see called_later)
    return re.compile(r"(?<![a-z_])(" + alternatives + r")(?:\s*\(|\[|" + closed + r")"
                      r"|<\s*/?\s*(" + alternatives + r")(?![a-z0-9_])"
                      r"|\baction(?:\s*\d+)?[\s*_`'\"]*:[\s*_`'\"]*(?:functions\.)?(" + alternatives
                      + r")(?![a-z0-9_])"), keys


# A markdown backslash escape: a backslash before ASCII punctuation.
_MD_ESCAPE = re.compile(r"\\([!-/:-@\[-`{-~])")


def _unescaped(folded: str) -> str:
    """Folded text with HTML character references (``&lt;``, ``&#40;``) and markdown backslash
    escapes (``\\(``) read as what they render, folded again; unchanged without a ``&`` or a
    backslash."""
    if "&" not in folded and "\\" not in folded:
        return folded
    return _fold(_MD_ESCAPE.sub(r"\1", html.unescape(folded)))


def _call_in(folded: str, tool_names: list[str], quoted: bool = True) -> str | None:
    """:func:`called_later` on text already folded (``quoted``: see :func:`_any_call`), its
    escapes read first (:func:`_unescaped`)."""
    folded = _unescaped(folded)
    pattern, keys = _tool_pattern(tuple(n if isinstance(n, str) else "" for n in tool_names))
    m = pattern.search(folded) if pattern else None
    if m:
        return keys[m.group(1) or m.group(2) or m.group(3)]
    return _any_call(folded, quoted)


def _attempt_in(folded: str) -> str | None:
    """The first call attempt (a structure with a key, or an empty list) in folded text, or None.
    Outside the runs it is one that only shows once folded: full-width brackets, colons or quotes
    (any ASCII one would have been in a run)."""
    for start, end, complete in _structures(folded):
        if _is_attempt(folded, start, end, complete):
            return folded[start:end]
    return None


# Markup that wraps JSON calls and is part of the answer where a run passes over it: Mistral's
# [TOOL_CALLS], Jamba's and MiniMax's <tool_calls>, Granite's <function_call> and <|tool_call|>, Llama's
# <|python_tag|>. (Not <function_calls>: OLMo 3's harness reads Python calls in that block, not JSON.)
_PYTHON_TAG = re.compile(r"<\|\s*python_tag")  # (in folded text)
_LEAD_IN = re.compile(r"\[\s*tool_calls\s*\]|<\s*/?\s*(?:tool_calls|function_call)\s*>"
                      r"|<\|\s*(?:tool_call|python_tag)\s*\|>")


def _reasoning_end(text: str) -> int:
    """Where a leading reasoning block ends (just after its first ``</think>``, where a reasoning
    parser splits it; the end of the text when it is never closed), or 0: the block must open the
    completion (after blanks) with ``<think>`` (a ``</think>`` without its ``<think>`` is text;
    where the generation prompt opens the block, :meth:`r3.chat.ChatFormat.decode` puts the
    opening in front of the reply). Its text is reasoning, not calls."""
    thought = leading_reasoning_end(text)
    return len(text) if thought is None else thought


def hidden_call(strings: list[str], tool_names: list[str]) -> str | None:
    """What a call could hide in among an answer's loose strings (keys and strings beside its
    calls, see :func:`_loose_strings`), or None: a call attempt (a structure with a key, or an
    empty list, also in full-width forms) or a call in call syntax (:func:`called_later`)."""
    return _hidden_in_folded([_fold(s) for s in strings], tool_names)


def _hidden_in_folded(folded_strings: list[str], tool_names: list[str]) -> str | None:
    """:func:`hidden_call` on strings already folded."""
    for folded in folded_strings:
        found = _attempt_in(folded) or _call_in(folded, tool_names)
        if found:
            return found
    return None


# ---------------------------------------------------------------------------------------
# comparing calls
# ---------------------------------------------------------------------------------------
def values_equal(a: Any, b: Any, _depth: int = 0) -> bool:
    """JSON value equality: numbers by value (``100 == 100.0``), bools only equal bools, strings
    exactly, lists in order, objects with the same keys recursively."""
    if _depth > MAX_DEPTH:
        return False
    if isinstance(a, bool) or isinstance(b, bool):
        return isinstance(a, bool) and isinstance(b, bool) and a == b
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return a == b
    if isinstance(a, str) or isinstance(b, str):
        return isinstance(a, str) and isinstance(b, str) and a == b
    if a is None or b is None:
        return a is None and b is None
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(values_equal(x, y, _depth + 1) for x, y in zip(a, b, strict=True))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(values_equal(a[k], b[k], _depth + 1) for k in a)
    return False


def _integer_type(spec: Any, _depth: int = 0) -> bool:
    """Whether a parameter's spec declares an integer or a list of them (nested too): xlam's ``int``
    / ``int, optional``, JSON Schema's ``integer``, ``Optional[int]``; ``List[int]``,
    ``List[List[int]]``, JSON Schema's ``array`` whose ``items`` are integers."""
    t = spec.get("type") if isinstance(spec, dict) else None
    if not isinstance(t, str):
        return False
    if t.strip().lower() == "array" and _depth < MAX_DEPTH:
        return _integer_type(spec.get("items"), _depth + 1)
    t = t.strip().lower()
    head, comma, tail = t.rpartition(",")
    if comma and tail.strip() == "optional":  # ("int, optional", also "int,optional")
        t = head.strip()
    if t.startswith("optional[") and t.endswith("]"):
        t = t[len("optional["):-1].strip()
    while t.startswith("list[") and t.endswith("]"):
        t = t[len("list["):-1].strip()
    return t in ("int", "integer")


def integer_parameters(tools: Any) -> dict[str, frozenset[str]]:
    """``{function name: its top-level parameters declared as integers or lists of them}`` from a
    tools list (xlam's ``parameters: {name: {"type": ...}}`` or JSON Schema's ``properties``).
    Where the reference gives such a parameter an integer (or a list item one), a float (``3.0``)
    is another value to a harness: Python's ``range(3.0)`` raises, and BFCL refuses it."""
    out: dict[str, frozenset[str]] = {}
    for tool in tools if isinstance(tools, list) else ():
        if not isinstance(tool, dict) or not isinstance(tool.get("name"), str):
            continue
        params = tool.get("parameters")
        if isinstance(params, dict) and isinstance(params.get("properties"), dict):
            params = params["properties"]
        if isinstance(params, dict):
            ints = frozenset(k for k, v in params.items() if _integer_type(v))
            if ints:
                out[tool["name"]] = out.get(tool["name"], frozenset()) | ints
    return out


def _whole_where_whole(got: Any, want: Any) -> bool:
    """``got`` (equal in value to ``want``) holds an integer wherever ``want`` does, list items too."""
    if isinstance(want, int) and not isinstance(want, bool):
        return not isinstance(got, float)
    if isinstance(want, list) and isinstance(got, list):
        return all(_whole_where_whole(g, w) for g, w in zip(got, want))
    return True


def _integers_kept(p: dict, r: dict, integers: dict[str, frozenset[str]]) -> bool:
    """No parameter declared as an integer (or a list of them) holds a float where the reference
    holds an integer."""
    for key in integers.get(r["name"], ()):
        if not _whole_where_whole(p["arguments"].get(key), r["arguments"].get(key)):
            return False
    return True


def calls_match(predicted: list[dict], reference: list[dict], integers: dict[str, frozenset[str]] | None = None) -> bool:
    """Multiset equality of calls by (name, arguments) under :func:`values_equal`; with
    ``integers`` (:func:`integer_parameters`), an integer parameter the reference gives an integer
    must hold an integer (``3``, not ``3.0``)."""
    if len(predicted) != len(reference):
        return False
    unused = list(reference)
    for p in predicted:
        for k, r in enumerate(unused):
            if p["name"] == r["name"] and values_equal(p["arguments"], r["arguments"]) \
                    and _integers_kept(p, r, integers or {}):
                del unused[k]
                break
        else:
            return False
    return True


@functools.lru_cache(maxsize=8192)
def _parse_json_cached(s: str) -> Any:
    return json.loads(s)


def _field(example: dict, key: str) -> Any:
    v = example[key]
    return _parse_json_cached(v) if isinstance(v, str) else v


# ---------------------------------------------------------------------------------------
# loading
# ---------------------------------------------------------------------------------------
def _parse_field(where: str, rec: dict, key: str) -> list:
    if key not in rec:
        raise R3Error(f"{where}: missing field {key!r}")
    v = rec[key]
    if isinstance(v, str):
        try:
            v = json.loads(v)
        except (ValueError, RecursionError) as e:
            raise R3Error(f"{where}: field {key!r} is not valid JSON ({str(e).splitlines()[0]})") from None
    if not isinstance(v, list):
        raise R3Error(f"{where}: field {key!r} must be a JSON list, got {type(v).__name__}")
    return v


def validate_record(where: str, rec: Any, index: int) -> dict:
    """Check one xlam record; returns it with ``tools``/``answers`` as JSON strings and an ``id``
    (the index when the file has none). Raises R3Error naming the record and field."""
    if not isinstance(rec, dict):
        raise R3Error(f"{where}: expected an object with fields id, query, tools, answers, "
                      f"got {type(rec).__name__}")
    if "id" in rec:
        where = f"{where} (id {rec['id']!r})"
        if isinstance(rec["id"], bool) or not isinstance(rec["id"], (int, str)):
            raise R3Error(f"{where}: field 'id' must be an integer or a string")
    if not isinstance(rec.get("query"), str) or not rec["query"].strip():
        raise R3Error(f"{where}: field 'query' must be a non-empty string")
    tools = _parse_field(where, rec, "tools")
    for i, t in enumerate(tools):
        if not isinstance(t, dict) or not isinstance(t.get("name"), str) or not t["name"]:
            raise R3Error(f"{where}: field 'tools', item {i}: expected an object with a string 'name'")
        params = t.get("parameters", {})
        if not isinstance(params, dict) or not all(isinstance(p, dict) for p in params.values()):
            raise R3Error(f"{where}: field 'tools', tool {t['name']!r}: 'parameters' must map "
                          "names to objects ({description, type, default?})")
    answers = _parse_field(where, rec, "answers")
    for i, a in enumerate(answers):
        if not isinstance(a, dict) or not isinstance(a.get("name"), str) or not isinstance(a.get("arguments"), dict):
            raise R3Error(f"{where}: field 'answers', item {i}: expected {{\"name\": str, \"arguments\": object}}")
    out = dict(rec)
    out.setdefault("id", index)
    for key, v in (("tools", tools), ("answers", answers)):
        if not isinstance(rec[key], str):
            out[key] = json.dumps(v, ensure_ascii=False)
    return out


def load_file(path: str) -> list[dict]:
    """Validated xlam records from a JSON list, JSONL or parquet file."""
    rows = [validate_record(where, rec, i) for i, (where, rec) in enumerate(read_records(path))]
    if not rows:
        raise R3Error(f"{path}: no records")
    return rows


# ---------------------------------------------------------------------------------------
# the task
# ---------------------------------------------------------------------------------------
class FunctionCallingTask(Task):
    """Tool calling on xlam records: the tools go in the system message, the query is the user
    turn, and the model answers with a JSON list of calls.

    Train/test partition: a hash of each record's query (with ``split_seed``) puts
    ``test_fraction`` of the queries in "test", unless ``test_data_path`` gives the test split
    explicitly. Records that share a query (the synthetic generator draws some short questions
    more than once) stay on one side, so a test query is never a training query.
    """

    name = "function_calling"
    default_reflection_prompt = REFLECTION_PROMPT
    default_retry_prompt = RETRY_PROMPT

    def __init__(
        self,
        *,
        data_path: str | None = None,
        test_data_path: str | None = None,
        test_fraction: float = 0.1,
        split_seed: int = 0,
        synthetic_size: int = 5000,
        synthetic_seed: int = 0,
        system_prompt: str | None = None,
        reflection_prompt: str | None = None,
        retry_prompt: str | None = None,
    ):
        super().__init__(reflection_prompt=reflection_prompt, retry_prompt=retry_prompt)
        self.data_path = opt_path("data_path", data_path)
        self.test_data_path = opt_path("test_data_path", test_data_path)
        if self.test_data_path and not self.data_path:
            raise R3Error("option test_data_path needs data_path as well")
        self.test_fraction = opt_float("test_fraction", test_fraction, lo=0.0, hi=1.0)
        self.split_seed = opt_int("split_seed", split_seed)
        self.synthetic_size = opt_int("synthetic_size", synthetic_size, lo=1)
        self.synthetic_seed = opt_int("synthetic_seed", synthetic_seed)
        self.system_prompt = SYSTEM_PROMPT if system_prompt is None else opt_str(
            "system_prompt", system_prompt, allow_empty=False)
        if "{tools}" not in self.system_prompt:
            raise R3Error("option system_prompt: must contain the placeholder {tools}")
        self.synthetic = self.stand_in_data = self.data_path is None
        self._splits: dict[str, list[dict]] | None = None

    def _load(self) -> dict[str, list[dict]]:
        if self._splits is None:
            if self.test_data_path:
                self._splits = {"train": load_file(self.data_path), "test": load_file(self.test_data_path)}
            else:
                rows = load_file(self.data_path) if self.data_path else synthetic_xlam(
                    self.synthetic_size, self.synthetic_seed)
                splits: dict[str, list[dict]] = {"train": [], "test": []}
                for r in rows:
                    splits["test" if self._query_on_test_side(r) else "train"].append(r)
                self._splits = splits
        return self._splits

    def on_test_side(self, example: dict) -> bool | None:
        """Whether ``example``'s query is a test query by the split rule (its text, stripped),
        whatever tools it lists; None with a ``test_data_path``, whose test split is listed whole."""
        return None if self.test_data_path else self._query_on_test_side(example)

    def _query_on_test_side(self, record: dict) -> bool:
        return in_test_split(("xlam-query", record["query"].strip()), split_seed=self.split_seed,
                             test_fraction=self.test_fraction)

    def examples(self, split: str = "train", n: int | None = None, seed: int = 0) -> list[dict]:
        """Records of ``split`` in a seeded order, truncated to ``n`` (all when None, or when
        fewer exist); a smaller ``n`` gives a prefix of a larger one with the same seed."""
        split = check_split(split)
        n = check_n(n)
        seed = opt_int("seed", seed)
        rows = self._load()[split]
        return [dict(r) for r in shuffled_prefix(rows, n, seed, f"xlam-{split}")]

    def check_example(self, where: str, example: Any) -> None:
        validate_record(where, example, 0)

    def tools_text(self, example: dict) -> str:
        return "\n".join(json.dumps(t, ensure_ascii=False) for t in _field(example, "tools"))

    def messages(self, example: dict) -> list[dict]:
        return [
            {"role": "system", "content": self.system_prompt.replace("{tools}", self.tools_text(example))},
            {"role": "user", "content": example["query"]},
        ]

    def reference_calls(self, example: dict) -> list[dict]:
        return [{"name": c["name"], "arguments": c.get("arguments", {})} for c in _field(example, "answers")]

    def _check(self, example: dict, completion_text: str) -> tuple[bool, str]:
        calls, _, loose, runs, passed = _answer(completion_text)
        if calls is None:
            return False, "no parseable JSON list of calls"
        names = [t.get("name", "") for t in _field(example, "tools")]
        # the text outside the runs (after the reasoning block): before the first, between them
        # and after the last, read as one text with each run as "[]": a call anywhere there, or
        # one around a run (repeat([...], times=1000)); YAML keys in quotes too, except inside the
        # structures before the first run
        bounds = [_reasoning_end(completion_text)] + [x for run in runs for x in run] + [len(completion_text)]
        raw = [completion_text[bounds[i]:bounds[i + 1]] for i in range(0, len(bounds), 2)]
        outside = [_fold(r) for r in raw]
        around = "[]".join(outside)
        other = _call_in(around, names, quoted=False)
        if not other and _yaml_call("[]".join([_fold(_blank_structures(raw[0]))] + outside[1:]), quoted=True):
            other = "name: ... arguments: ..."
        if other:
            return False, f"another call of {other[:60]!r} in call syntax"
        # Llama's <|python_tag|> opens a message for its code interpreter: all the text after it is
        # code ("wipe(1)" too), so with one anywhere after the reasoning block, nothing but blanks
        # and markup (<|eom_id|>) may stand outside the runs after the first one, and a run passes
        # over nothing but markup (no "[wipe(1)]" before a call, no fence, list mark or tag id)
        beside = not all(_separators(m, 0, len(m)) for m in (_ANGLED.sub("", f) for f in outside[1:]))
        if (beside or any(p and p[0] not in "<\ufe64\uff1c" for p in passed)) \
                and _PYTHON_TAG.search(_fold(completion_text[bounds[0]:])):
            return False, "text beside the calls after <|python_tag|> (code for Llama's interpreter)"
        within = _hidden_in_folded([f for f in map(_fold, passed) if not _LEAD_IN.fullmatch(f)], names)
        if within:
            return False, f"a call {within[:60]!r} between the calls"
        disguised = next(filter(None, map(_attempt_in, outside[1:])), None)
        if disguised:
            return False, f"a later call attempt {disguised[:60]!r} in compatibility forms"
        # a complete call attempt only folding makes anywhere outside the runs, also one opened
        # before a run and closed after it (each "[]" standing for a run is none)
        holes, at = set(), 0
        for f in outside[:-1]:
            at += len(f)
            holes.add(at)
            at += 2
        wrapping = next((around[a:b] for a, b, complete in _structures(around)
                         if complete and a not in holes and _is_attempt(around, a, b, True)), None)
        if wrapping:
            return False, f"a call attempt {wrapping[:60]!r} outside the answer in compatibility forms"
        hidden = hidden_call(loose, names)
        if hidden:
            return False, f"a call {hidden[:60]!r} in a string beside the calls"
        ref = self.reference_calls(example)
        if calls_match(calls, ref, integer_parameters(_field(example, "tools"))):
            return True, "correct"
        if calls_match(calls, ref):
            return False, "an argument declared as an integer written as a float (3.0 for 3)"
        if sorted(c["name"] for c in calls) != sorted(c["name"] for c in ref):
            return False, f"called {_names(calls)}, expected {_names(ref)}"
        return False, "right functions, wrong arguments"


def _names(calls: list[dict], most: int = 8) -> str:
    """The sorted names of ``calls`` for a reason, at most ``most`` of them (a reply can hold
    thousands of calls)."""
    names = sorted(c["name"][:80] for c in calls)
    return str(names) if len(names) <= most else f"{names[:most]} and {len(names) - most} more"


# ---------------------------------------------------------------------------------------
# CLI: write the synthetic data set, or check a file
# ---------------------------------------------------------------------------------------
def write_synthetic(path: str, n: int, seed: int = 0) -> int:
    """Write ``n`` SYNTHETIC xlam-format records to ``path`` (JSONL if it ends in .jsonl, else a
    JSON list like the real file). Returns n."""
    records = synthetic_xlam(n, seed)
    if path.lower().endswith((".jsonl", ".ndjson")):
        text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
    else:
        text = json.dumps(records, ensure_ascii=False, indent=1) + "\n"
    try:  # (through a temporary file: a full disk leaves no half-written file, and the old one whole)
        write_text_atomic(path, text)
    except OSError as e:
        raise R3Error(f"{path}: cannot write: {e.strerror or e}") from None
    return n


@cli_main
def main(argv: list[str] | None = None) -> int:
    ap = ArgumentParser(
        prog="python -m r3.tasks.function_calling",
        description="Write a SYNTHETIC data set in the xlam-function-calling-60k format (generated "
                    "from r3's own small tool catalogue; not the real APIGen data, which is gated), "
                    "or check that a data file loads.",
        epilog="example: python -m r3.tasks.function_calling --synthetic 2000 --out xlam_synthetic.json",
    )
    ap.add_argument("--synthetic", type=int, metavar="N", help="number of synthetic records to write")
    ap.add_argument("--out", metavar="FILE", help="output file (.json: a JSON list; .jsonl: one record a line)")
    ap.add_argument("--seed", type=int, default=0, help="generator seed (default 0)")
    ap.add_argument("--check", metavar="FILE", help="load and validate FILE, print the record count")
    args = ap.parse_args(argv)
    if args.check:
        rows = load_file(args.check)
        print(f"{args.check}: {len(rows)} valid records")
        return 0
    if args.synthetic is None or not args.out:
        raise R3Error("give --synthetic N --out FILE (or --check FILE); see --help")
    if args.synthetic < 1:
        raise R3Error(f"--synthetic must be >= 1, got {args.synthetic}")
    write_synthetic(args.out, args.synthetic, args.seed)
    print(f"wrote {args.synthetic} SYNTHETIC xlam-format records (not the real APIGen data) to {args.out}",
          file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
