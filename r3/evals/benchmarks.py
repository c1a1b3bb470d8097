"""GSM8K, MATH, MMLU-Pro and HellaSwag, prompted and scored as lm-evaluation-harness does.

Each benchmark turns the records of its public file into documents (checking every field it
reads), builds the k-shot prompt of a document, and scores the model's output. The rules, with
the harness's task files they reproduce:

* **HellaSwag** (``hellaswag``): 0-shot log-likelihood multiple choice. Query =
  ``activity_label + ": " + ctx_a + " " + ctx_b.capitalize()``; query and endings are cleaned
  (strip, ``" [title]"`` -> ``". "``, ``[...]`` removed, one pass of double spaces -> one space).
  Each choice is the continuation ``" " + ending``; ``acc``: the highest summed log-likelihood is
  the label; ``acc_norm``: the same after dividing by the ending's length in characters.
* **GSM8K** (``gsm8k``): 5-shot ``Question: ...\\nAnswer:`` prompts (shots drawn from a train
  file by a ``random.Random(seed)`` shared over the documents in order, the full answer as the
  shot's target), greedy, stop at ``Question:``, at most 256 tokens. ``strict-match``: the first
  ``#### (-?[0-9.,]+)``; ``flexible-extract``: the last number. Prediction and the reference
  answer both lose ``,``, ``$``, everything up to ``#### ``, a trailing ``.``, and case.
* **MATH** (``minerva_math``): the four Minerva examples, ``Problem:\\n...\\n\\nSolution:``,
  greedy, stop at ``Problem:``, at most 256 tokens; the answer is X of "Final Answer: The final
  answer is X. I hope it is correct.", normalised as Minerva's Appendix D (with the harness
  0.4.13's corrections, :func:`normalize_final_answer`); the gold answer is the
  last ``\\boxed{}`` of the solution (or the ``answer`` field of the MATH-500 layout), normalised
  the same way. ``exact_match`` is equality of the normalised strings by default. The harness's
  own ``exact_match`` also credits answers sympy finds equal (``0.5`` for ``\\frac{1}{2}``):
  ``--math-equivalence sympy`` does the same (:mod:`r3.evals.math_equivalence`).
* **MMLU-Pro** (``mmlu_pro``): chain-of-thought, 5-shot from a validation file when one is given
  (the first five validation questions of the same category, their ``cot_content`` as target),
  0-shot otherwise; the answer is the first ``answer is \\(?([A-J])\\)?``; no match is wrong.
  Stop at ``Question:``, at most 2048 tokens.

With ``--chat`` the same texts go through the model's chat template as the harness's
``apply_chat_template`` (with its default ``fewshot_as_multiturn``) sends them: each shot a user
and an assistant turn, the question the last user turn (:func:`chat_messages`); HellaSwag's
endings are then scored without the leading space.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass
from pathlib import Path

from r3.errors import R3Error
from r3.evals.data import field
from r3.evals.math_equivalence import is_equiv
from r3.evals.minerva_fewshot import MINERVA_FEWSHOT

DEFAULT_FEWSHOT_SEED = 1234  # lm-evaluation-harness's default few-shot seed


@dataclass
class Benchmark:
    name: str
    kind: str  # "loglikelihood" or "generate"
    metrics: tuple[str, ...]
    default_shots: int
    fewshot_split: str | None = None  # what --fewshot-data gives it ("train", "validation"), if anything
    until: tuple[str, ...] = ()
    max_gen_toks: int = 256


# ---------------------------------------------------------------------------------- HellaSwag


def hellaswag_clean(text: str) -> str:
    text = text.strip()
    text = text.replace(" [title]", ". ")
    text = re.sub(r"\[.*?\]", "", text)
    return text.replace("  ", " ")


def hellaswag_doc(record: dict, path, i: int) -> dict:
    label = field(record, "label", (int, str), path, i)
    endings = field(record, "endings", list, path, i)
    if not endings or not all(isinstance(e, str) for e in endings):
        raise R3Error(f"{path}: record {i}: field 'endings' must be a non-empty list of strings")
    try:
        gold = int(label)
    except ValueError:
        raise R3Error(f"{path}: record {i}: field 'label' must be an integer, got {label!r}") from None
    if not 0 <= gold < len(endings):
        raise R3Error(f"{path}: record {i}: label {gold} is not an index into its {len(endings)} endings")
    ctx = field(record, "ctx_a", str, path, i) + " " + field(record, "ctx_b", str, path, i).capitalize()
    return {"query": hellaswag_clean(field(record, "activity_label", str, path, i) + ": " + ctx),
            "choices": [hellaswag_clean(e) for e in endings], "gold": gold, "record": record}


def hellaswag_scores(doc: dict, lls: list[float]) -> dict:
    norm = [ll / max(len(c), 1) for ll, c in zip(lls, doc["choices"])]
    pick = max(range(len(lls)), key=lambda j: (lls[j], -j))  # ties: the first, as numpy's argmax
    pick_norm = max(range(len(norm)), key=lambda j: (norm[j], -j))
    return {"acc": pick == doc["gold"], "acc_norm": pick_norm == doc["gold"], "prediction": pick}


# ---------------------------------------------------------------------------------- GSM8K


GSM8K_STRICT = re.compile(r"#### (\-?[0-9\.\,]+)")
GSM8K_FLEXIBLE = re.compile(r"(-?[$0-9.,]{2,})|(-?[0-9]+)")
_GSM8K_IGNORE = (re.compile(","), re.compile(r"\$"), re.compile(r"(?s).*#### "), re.compile(r"\.$"))


def gsm8k_doc(record: dict, path, i: int) -> dict:
    answer = field(record, "answer", str, path, i)
    if "#### " not in answer:
        raise R3Error(f"{path}: record {i}: field 'answer' has no '#### N' final answer")
    return {"question": field(record, "question", str, path, i), "answer": answer}


def gsm8k_normalise(text: str) -> str:
    for pattern in _GSM8K_IGNORE:
        text = pattern.sub("", text)
    return text.lower()


def _regex_pick(pattern: re.Pattern, text: str, which: int) -> str:
    """lm-eval's regex filter: ``findall``, the match at index ``which``, the first non-empty
    group of a multi-group match, stripped; ``[invalid]`` when nothing matches."""
    found = pattern.findall(text)
    if not found:
        return "[invalid]"
    m = found[which]
    if isinstance(m, tuple):
        m = next((g for g in m if g), "[invalid]")
    return m.strip()


def gsm8k_scores(doc: dict, text: str) -> dict:
    gold = gsm8k_normalise(doc["answer"])
    strict = _regex_pick(GSM8K_STRICT, text, 0)
    flexible = _regex_pick(GSM8K_FLEXIBLE, text, -1)
    return {"exact_match,strict-match": gsm8k_normalise(strict) == gold,
            "exact_match,flexible-extract": gsm8k_normalise(flexible) == gold,
            "prediction": {"strict-match": strict, "flexible-extract": flexible}}


# ---------------------------------------------------------------------------------- MATH


def last_boxed_only_string(text: str) -> str | None:
    idx = text.rfind("\\boxed")
    if "\\boxed " in text:
        return "\\boxed " + text.split("\\boxed ")[-1].split("$")[0]
    if idx < 0:
        idx = text.rfind("\\fbox")
        if idx < 0:
            return None
    depth = 0
    for i in range(idx, len(text)):
        if text[i] == "{":
            depth += 1
        elif text[i] == "}":
            depth -= 1
            if depth == 0:
                return text[idx: i + 1]
    return None


def remove_boxed(s: str) -> str | None:
    if s.startswith("\\boxed "):
        return s[len("\\boxed "):]
    if s.startswith("\\boxed{") and s.endswith("}"):
        return s[len("\\boxed{"):-1]
    return None  # \fbox{...}: the harness fails an assertion here; we treat it as no answer


_SUBSTITUTIONS = [("an ", ""), ("a ", ""), (".$", "$"), ("\\$", ""), ("\\ ", ""), (" ", ""), ("mbox", "text"),
                  (",\\text{and}", ","), ("\\text{and}", ","), ("\\text{m}", "\\text{}")]
_REMOVED = ["square", "ways", "integers", "dollars", "mph", "inches", "ft", "hours", "km", "units", "\\ldots", "sue",
            "points", "feet", "minutes", "digits", "cents", "degrees", "cm", "gm", "pounds", "meters", "meals", "edges",
            "students", "childrentickets", "multiples", "\\text{s}", "\\text{.}", "\\text{\ns}", "\\text{}^2",
            "\\text{}^3", "\\text{\n}", "\\text{}", r"\mathrm{th}", r"^\circ", r"^{\circ}", r"\;", r",\!", "{,}", '"',
            "\\dots"]


def normalize_final_answer(answer: str) -> str:
    """Minerva's answer normalisation (Lewkowycz et al. 2022, Appendix D) with lm-evaluation-harness
    0.4.13's corrections: unit words go only as whole words or outside LaTeX command names (so
    ``\\left`` keeps its "ft"), ``\\sqrt[3]8`` becomes ``\\sqrt[3]{8}`` and an indexed root is
    not rewritten further, and commas go only from thousands groups (``0,1`` stays a pair)."""
    answer = answer.split("=")[-1]
    words = [w for w in _REMOVED if w.isalpha()]
    for w in words:  # while spaces still separate words
        answer = re.sub(rf"(?<!\\)\b{w}\b", "", answer)
    for before, after in _SUBSTITUTIONS:
        answer = answer.replace(before, after)
    for expr in _REMOVED:
        if expr.isalpha():  # units glued to their neighbours, outside \command names
            parts = re.split(r"(\\[a-zA-Z]+)", answer)
            answer = "".join(x if i % 2 else x.replace(expr, "") for i, x in enumerate(parts))
        else:
            answer = answer.replace(expr, "")
    answer = re.sub(r"(.*?)(\$)(.*?)(\$)(.*)", "$\\3$", answer)
    answer = re.sub(r"(\\text\{)(.*?)(\})", "\\2", answer)
    answer = re.sub(r"(\\textbf\{)(.*?)(\})", "\\2", answer)
    answer = re.sub(r"(\\overline\{)(.*?)(\})", "\\2", answer)
    answer = re.sub(r"(\\boxed\{)(.*)(\})", "\\2", answer)
    answer = re.sub(r"(frac)([^{])(.)", "frac{\\2}{\\3}", answer)
    answer = re.sub(r"(sqrt)(\[[^\]]*\])(\w)", "\\1\\2{\\3}", answer)
    answer = re.sub(r"(sqrt)(?!\[)([^{])", "sqrt{\\2}", answer)
    answer = answer.replace("$", "")
    if re.fullmatch(r"-?\d{1,3}(,\d{3})+", answer):
        answer = answer.replace(",", "")
    return answer


_FINAL_ANSWER = re.compile(r"Final Answer: The final answer is(.*?). I hope it is correct.")


def minerva_answer(text: str) -> str:
    m = _FINAL_ANSWER.search(text + "I hope it is correct.")
    return m.group(1).strip() if m else "[invalidanswer]"


def math_doc(record: dict, path, i: int) -> dict:
    problem = field(record, "problem", str, path, i)
    if "answer" in record:  # the MATH-500 layout
        gold = field(record, "answer", str, path, i)
    else:
        boxed = last_boxed_only_string(field(record, "solution", str, path, i))
        gold = remove_boxed(boxed) if boxed else None
        if gold is None:
            raise R3Error(f"{path}: record {i}: field 'solution' has no \\boxed{{}} answer")
    return {"problem": problem, "answer": normalize_final_answer(gold)}


def math_scores(doc: dict, text: str, equivalence: str = "string") -> dict:
    """``equivalence`` "string": the normalised answers are identical; "sympy": identical or equal
    as sympy expressions (:mod:`r3.evals.math_equivalence`, the harness's rule)."""
    pred = normalize_final_answer(minerva_answer(text))
    if equivalence == "sympy":
        same = is_equiv(pred, doc["answer"])
    elif equivalence == "string":
        same = pred == doc["answer"]
    else:
        raise R3Error(f"unknown MATH equivalence {equivalence!r} (string or sympy)")
    return {"exact_match": same, "prediction": pred}


# ---------------------------------------------------------------------------------- MMLU-Pro


LETTERS = "ABCDEFGHIJ"
MMLU_PRO_ANSWER = re.compile(r"answer is \(?([ABCDEFGHIJ])\)?")


def mmlu_pro_doc(record: dict, path, i: int, *, with_cot: bool = False) -> dict:
    options = field(record, "options", list, path, i)
    if not 1 <= len(options) <= len(LETTERS) or not all(isinstance(o, str) for o in options):
        raise R3Error(f"{path}: record {i}: field 'options' must be a list of 1 to 10 strings")
    if "answer" in record:
        letter = field(record, "answer", str, path, i).strip().upper()
        if len(letter) != 1 or letter not in LETTERS[: len(options)]:
            raise R3Error(f"{path}: record {i}: field 'answer' must be a letter A-{LETTERS[len(options) - 1]}, got {letter!r}")
    else:
        index = field(record, "answer_index", int, path, i)
        if not 0 <= index < len(options):
            raise R3Error(f"{path}: record {i}: answer_index {index} is not an index into its {len(options)} options")
        letter = LETTERS[index]
    doc = {"question": field(record, "question", str, path, i), "options": options, "answer": letter,
           "category": field(record, "category", str, path, i)}
    if with_cot:
        doc["cot_content"] = field(record, "cot_content", str, path, i)
    return doc


def mmlu_pro_question(doc: dict) -> str:
    text = "Question:\n" + doc["question"] + "\nOptions:\n"
    for letter, option in zip(LETTERS, doc["options"]):
        text += f"{letter}. {option.strip()}\n"
    return text + "Answer: Let's think step by step."


def mmlu_pro_header(category: str) -> str:
    return (f"The following are multiple choice questions (with answers) about {category}. Think step by step and "
            f'then finish your answer with "the answer is (X)" where X is the correct letter choice.\n')


def mmlu_pro_scores(doc: dict, text: str) -> dict:
    pred = _regex_pick(MMLU_PRO_ANSWER, text, 0)
    return {"exact_match,custom-extract": pred.lower() == doc["answer"].lower(), "prediction": pred}


# ---------------------------------------------------------------------------------- registry


BENCHMARKS = {
    "hellaswag": Benchmark("hellaswag", "loglikelihood", ("acc", "acc_norm"), 0, fewshot_split="train"),
    "gsm8k": Benchmark("gsm8k", "generate", ("exact_match,strict-match", "exact_match,flexible-extract"), 5,
                       fewshot_split="train", until=("Question:", "</s>", "<|im_end|>")),
    "math": Benchmark("math", "generate", ("exact_match",), 4, until=("Problem:",)),
    "mmlu_pro": Benchmark("mmlu_pro", "generate", ("exact_match,custom-extract",), 5, fewshot_split="validation",
                          until=("Question:",), max_gen_toks=2048),
}
_DOC = {"hellaswag": hellaswag_doc, "gsm8k": gsm8k_doc, "math": math_doc, "mmlu_pro": mmlu_pro_doc}


def get(name: str) -> Benchmark:
    if name not in BENCHMARKS:
        raise R3Error(f"unknown benchmark {name!r} (choose from {', '.join(BENCHMARKS)})")
    return BENCHMARKS[name]


def make_docs(name: str, records: list[dict], path: str | Path, *, fewshot: bool = False) -> list[dict]:
    """The documents of ``records`` (from ``path``); ``fewshot``: the file holds few-shot examples
    (MMLU-Pro's then need ``cot_content``). Errors name a record by its number from 1 (in a
    JSONL file without blank lines, its line)."""
    if name == "mmlu_pro":
        return [mmlu_pro_doc(r, path, i, with_cot=fewshot) for i, r in enumerate(records, 1)]
    return [_DOC[name](r, path, i) for i, r in enumerate(records, 1)]


def _record(doc: dict):
    """The file record a document came from (the document itself where none is kept)."""
    return doc.get("record", doc)


def fewshot_indices(name: str, docs: list[dict], pool: list[dict], shots: int, seed: int) -> list[list[int]]:
    """Indices into ``pool`` of each document's shots, chosen as the harness chooses them:
    GSM8K ``Random(seed).sample`` per document in order; HellaSwag the same but drawing
    ``shots + 1``, dropping any equal to the document and keeping the first ``shots`` (its
    sampler excludes the document itself, since the task has no test split); MMLU-Pro the first
    ``shots`` pool entries of the document's category. (MATH's are fixed.)"""
    if shots == 0 or name == "math":
        return [[] for _ in docs]
    if name == "mmlu_pro":
        by_cat: dict[str, list[int]] = {}
        for j, d in enumerate(pool):
            by_cat.setdefault(d["category"], []).append(j)
        return [by_cat.get(d["category"], [])[:shots] for d in docs]
    if shots > len(pool) - (name == "hellaswag"):
        raise R3Error(f"{name}: {shots} shots need at least {shots + (name == 'hellaswag')} few-shot examples, "
                      f"the file has {len(pool)}")
    rnd = random.Random(seed)
    if name == "gsm8k":
        return [rnd.sample(range(len(pool)), shots) for _ in docs]
    picks = []
    for d in docs:
        # the harness compares whole records (a shot differing from the document in any field stays)
        kept = [j for j in rnd.sample(range(len(pool)), shots + 1) if _record(pool[j]) != _record(d)][:shots]
        if len(kept) < shots:  # the document is in the pool more than once: draw again without it
            others = [j for j in range(len(pool)) if _record(pool[j]) != _record(d)]
            if len(others) < shots:
                raise R3Error(f"{name}: {shots} shots need {shots} few-shot examples other than the document, "
                              f"the file has {len(others)}")
            kept = rnd.sample(others, shots)
        picks.append(kept)
    return picks


def chat_messages(name: str, doc: dict, shots: list[dict], n_shots: int) -> list[dict]:
    """The prompt as chat messages, as the harness builds it with ``apply_chat_template`` (its
    default ``fewshot_as_multiturn``): the task's description (MMLU-Pro's header) as the system
    message, each shot as a user turn (its question) and an assistant turn (its target), then the
    document's question as the last user turn. No system message otherwise: the template adds
    its own default, if it has one."""
    if name == "hellaswag":
        pairs = [(s["query"], s["choices"][s["gold"]]) for s in shots]
        last, system = doc["query"], None
    elif name == "gsm8k":
        pairs = [(f"Question: {s['question']}\nAnswer:", s["answer"]) for s in shots]
        last, system = f"Question: {doc['question']}\nAnswer:", None
    elif name == "math":
        pairs = [(f"Problem:\n{p}\n\nSolution:", s) for p, s in MINERVA_FEWSHOT[:n_shots]]
        last, system = f"Problem:\n{doc['problem']}\n\nSolution:", None
    elif name == "mmlu_pro":
        pairs = [(mmlu_pro_question(s), s["cot_content"].replace("A: Let's think step by step. ", "")) for s in shots]
        last, system = mmlu_pro_question(doc), mmlu_pro_header(doc["category"])
    else:
        raise R3Error(f"unknown benchmark {name!r}")
    messages = [{"role": "system", "content": system}] if system else []
    for question, answer in pairs:
        messages += [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
    return messages + [{"role": "user", "content": last}]


def plain_text(messages: list[dict]) -> str:
    """:func:`chat_messages` as the harness's plain (no chat template) prompt: the system text,
    each shot's question and answer joined by a space and followed by a blank line, then the
    last question."""
    system = messages[0]["content"] if messages[0]["role"] == "system" else ""
    turns = [m["content"] for m in messages if m["role"] != "system"]
    return system + "".join(q + " " + a + "\n\n" for q, a in zip(turns[:-1:2], turns[1::2])) + turns[-1]


def prompt(name: str, doc: dict, shots: list[dict], n_shots: int) -> str:
    """The text the model continues (for HellaSwag: the context its choices are scored after)."""
    return plain_text(chat_messages(name, doc, shots, n_shots))


def choices(name: str, doc: dict, *, chat: bool = False) -> list[str]:
    """Continuations scored after the prompt (multiple choice by log-likelihood): ``" " + ending``,
    or the bare ending after a chat prompt (the harness drops its target delimiter there, the
    assistant header already separating it)."""
    if name != "hellaswag":
        raise R3Error(f"{name} is not a log-likelihood benchmark")
    return list(doc["choices"]) if chat else [" " + c for c in doc["choices"]]


def score_generation(name: str, doc: dict, text: str, *, math_equivalence: str = "string") -> dict:
    if name == "math":
        return math_scores(doc, text, math_equivalence)
    return {"gsm8k": gsm8k_scores, "mmlu_pro": mmlu_pro_scores}[name](doc, text)
