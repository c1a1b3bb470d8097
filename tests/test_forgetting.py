"""The forgetting harness: each benchmark's file format, prompt and scoring rule against
hand-computed cases (the rules of lm-evaluation-harness), and the CLI end to end on small files."""

import hashlib
import json
import os
import random

import pytest

from r3 import forgetting as FG
from r3.errors import R3Error
from r3.evals import benchmarks as B
from r3.evals.data import read_records
from r3.stats import mean_stderr


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


# ----------------------------------------------------------------------------------- files


def test_read_records_formats_and_errors(tmp_path):
    recs = [{"a": 1}, {"a": 2}]
    assert read_records(write_jsonl(tmp_path / "x.jsonl", recs)) == recs
    (tmp_path / "x.json").write_text(json.dumps(recs))
    assert read_records(tmp_path / "x.json") == recs
    (tmp_path / "y.json").write_text(json.dumps({"rows": recs, "version": 1}))
    assert read_records(tmp_path / "y.json") == recs
    cases = [
        ("missing.jsonl", None, "no such file"),
        ("bad.jsonl", '{"a": 1}\n{"a": \n', "bad.jsonl:2: not valid JSON"),
        ("list.jsonl", '[1, 2]\n', "record 1 is not an object"),
        ("empty.jsonl", "\n", "no records"),
        ("x.csv", "a,b\n", "unknown format '.csv'"),
        ("two.json", json.dumps({"a": [], "b": []}), "exactly one list"),
    ]
    for name, text, msg in cases:
        if text is not None:
            (tmp_path / name).write_text(text)
        with pytest.raises(R3Error, match=msg):
            read_records(tmp_path / name)


def test_parquet_round_trip(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    recs = [{"question": "q", "answer": "a\n#### 3"}]
    pq.write_table(pa.Table.from_pylist(recs), tmp_path / "g.parquet")
    assert read_records(tmp_path / "g.parquet") == recs


@pytest.mark.parametrize("name,record,msg", [
    ("gsm8k", {"question": "q"}, "record 1 has no field 'answer'"),
    ("gsm8k", {"question": "q", "answer": "42"}, "no '#### N'"),
    ("hellaswag", {"activity_label": "a", "ctx_a": "b", "ctx_b": "c", "endings": ["x"], "label": 3}, "label 3 is not an index"),
    ("hellaswag", {"activity_label": "a", "ctx_a": "b", "ctx_b": "c", "endings": "x", "label": 0}, "'endings' must be a list"),
    ("math", {"problem": "p", "solution": "no box"}, "no \\\\boxed"),
    ("mmlu_pro", {"question": "q", "options": ["a", "b"], "answer": "C", "category": "math"}, "must be a letter A-B"),
    ("mmlu_pro", {"question": "q", "options": ["a", "b"], "answer_index": True, "category": "math"}, "must be an integer"),
])
def test_bad_records_name_file_record_and_field(name, record, msg, tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [record])
    with pytest.raises(R3Error, match=msg) as e:
        B.make_docs(name, read_records(path), path)
    assert str(path) in str(e.value)


# ----------------------------------------------------------------------------------- HellaSwag


def test_hellaswag_query_cleaning_and_norm():
    rec = {"activity_label": "Removing ice from car", "ctx_a": "Then, the man writes over the snow.",
           "ctx_b": "then He starts [title] the car", "endings": [" a [step] b  c ", "xx"], "label": "1"}
    doc = B.hellaswag_doc(rec, "f", 0)
    # capitalize() lower-cases the rest; " [title]" -> ". "; [..] dropped; one pass of double spaces
    assert doc["query"] == "Removing ice from car: Then, the man writes over the snow. Then he starts. the car"
    assert doc["choices"] == ["a b c", "xx"] and doc["gold"] == 1
    assert B.choices("hellaswag", doc) == [" a b c", " xx"]
    # acc picks the larger sum (-5 > -6); acc_norm divides by characters: -6/5 = -1.2 > -5/2 = -2.5
    s = B.hellaswag_scores(doc, [-6.0, -5.0])
    assert s["acc"] is True and s["acc_norm"] is False and s["prediction"] == 1
    s = B.hellaswag_scores({**doc, "gold": 0}, [-3.0, -3.0])  # ties go to the first choice
    assert s["acc"] is True


# ----------------------------------------------------------------------------------- GSM8K


@pytest.mark.parametrize("output,strict,flexible", [
    (" She has 9 * 2 = 18.\n#### 18", True, True),
    (" 3 + 4 = 7.\n#### 7", False, False),
    (" The answer is 18.", False, True),  # no '#### '; last number '18.' loses its trailing '.'
    (" #### $1,000.", False, False),  # gold 18: wrong either way
    (" 18 apples, then 20\n#### 18", True, True),
    (" 18 apples, then 20", False, False),  # flexible takes the last number
])
def test_gsm8k_extraction(output, strict, flexible):
    doc = {"question": "q", "answer": "so 9 * 2 = <<9*2=18>>18\n#### 18"}
    s = B.gsm8k_scores(doc, output)
    assert (s["exact_match,strict-match"], s["exact_match,flexible-extract"]) == (strict, flexible)


def test_gsm8k_normalisation_drops_commas_dollars_and_final_period():
    doc = {"question": "q", "answer": "...\n#### 1000"}
    s = B.gsm8k_scores(doc, "total $1,000.\n#### $1,000.")
    assert s["prediction"] == {"strict-match": "[invalid]", "flexible-extract": "$1,000."}
    assert s["exact_match,flexible-extract"] is True and s["exact_match,strict-match"] is False
    assert B.gsm8k_scores(doc, "#### 1,000.")["exact_match,strict-match"] is True


def test_gsm8k_prompt_and_shot_sampling():
    docs = [{"question": f"q{i}", "answer": f"a{i}\n#### {i}"} for i in range(3)]
    pool = [{"question": f"t{i}", "answer": f"s{i}\n#### {i}"} for i in range(20)]
    picks = B.fewshot_indices("gsm8k", docs, pool, 2, 1234)
    rnd = random.Random(1234)  # one generator shared over the documents, in order
    assert picks == [rnd.sample(range(20), 2) for _ in docs]
    p = B.prompt("gsm8k", docs[0], [pool[j] for j in picks[0]], 2)
    a, b = picks[0]
    assert p == (f"Question: t{a}\nAnswer: s{a}\n#### {a}\n\nQuestion: t{b}\nAnswer: s{b}\n#### {b}\n\n"
                 "Question: q0\nAnswer:")
    # HellaSwag draws one more and keeps the first k
    rnd = random.Random(5)
    assert B.fewshot_indices("hellaswag", docs, pool, 2, 5) == [rnd.sample(range(20), 3)[:2] for _ in docs]
    # ... and drops the document itself when the pool holds it (shots from the evaluated file)
    rnd, want = random.Random(7), []
    for i in range(20):
        want.append([j for j in rnd.sample(range(20), 3) if j != i][:2])
    got = B.fewshot_indices("hellaswag", pool, pool, 2, 7)
    assert got == want and all(i not in g for i, g in enumerate(got))
    r = random.Random(7)
    assert any(i in r.sample(range(20), 3) for i in range(20))  # the case does occur here
    # equal texts from different records (another "ind") are not the document: the harness keeps them
    recs = [{"activity_label": "A", "ctx_a": "c", "ctx_b": "", "endings": ["x", "y"], "label": 0, "ind": i} for i in range(4)]
    hs = B.make_docs("hellaswag", recs, "f")
    rnd = random.Random(3)
    assert B.fewshot_indices("hellaswag", hs[:1], hs, 2, 3) == [[j for j in rnd.sample(range(4), 3) if j != 0][:2]]
    dup = B.make_docs("hellaswag", [recs[0]] * 3 + [recs[1]], "f")
    with pytest.raises(R3Error, match="other than the document"):
        B.fewshot_indices("hellaswag", dup[:1], dup, 2, 0)
    with pytest.raises(R3Error, match="need at least"):
        B.fewshot_indices("gsm8k", docs, pool[:1], 2, 0)
    assert len(B.fewshot_indices("gsm8k", docs, pool[:2], 2, 0)[0]) == 2  # a pool of exactly that many shots


# ----------------------------------------------------------------------------------- MATH


def test_minerva_prompt_is_the_harness_prompt_byte_for_byte():
    p = B.prompt("math", {"problem": "What is $1+1$?"}, [], 4)
    prefix, _, tail = p.rpartition("Problem:\n")
    # sha256 of lm-evaluation-harness 0.4.13's minerva_math 4-shot prefix (1793 characters)
    assert len(prefix) == 1793
    assert hashlib.sha256(prefix.encode()).hexdigest() == "57164f1d8a2f4b6c5e0aa036b5c048c81b16bfe8568f2aafd016e76bc69c000f"
    assert tail == "What is $1+1$?\n\nSolution:"
    assert B.prompt("math", {"problem": "x"}, [], 0) == "Problem:\nx\n\nSolution:"


@pytest.mark.parametrize("raw,normalised", [
    ("$\\frac{2}{3}$", "\\frac{2}{3}"),
    ("x = 5", "5"),  # the part after the last '='
    ("10,000 dollars", "10000"),
    ("\\text{(A)}", "(A)"),
    ("\\boxed{24}", "24"),
    ("\\frac12", "\\frac{1}{2}"),
    ("\\sqrt2", "\\sqrt{2}"),
    ("90^\\circ", "90"),
    ("\\left(1,2\\right)", "\\left(1,2\\right)"),  # "ft" of \left is not a unit
    ("2\\pi cm", "2\\pi"), ("5 feet", "5"),
    ("\\sqrt[3]{8}", "\\sqrt[3]{8}"), ("\\sqrt[3]8", "\\sqrt[3]{8}"),
    ("0,1", "0,1"), ("-1,234,567", "-1234567"),  # only thousands groups lose their commas
    ("a 5 units", "5"),
    ("$[2,5)$", "[2,5)"),
])
def test_minerva_normalisation(raw, normalised):
    assert B.normalize_final_answer(raw) == normalised


def test_math_gold_and_answer_extraction():
    doc = B.math_doc({"problem": "p", "solution": "so \\boxed{\\frac{1}{2}} and finally $\\boxed{\\frac{2}{3}}$."}, "f", 0)
    assert doc["answer"] == "\\frac{2}{3}"  # the last \boxed{}, braces balanced
    assert B.math_doc({"problem": "p", "answer": "\\frac{2}{3}"}, "f", 0)["answer"] == "\\frac{2}{3}"  # MATH-500
    ok = "We get $x$.\nFinal Answer: The final answer is $\\frac{2}{3}$. I hope it is correct."
    assert B.math_scores(doc, ok) == {"exact_match": True, "prediction": "\\frac{2}{3}"}
    cut = "Final Answer: The final answer is $\\frac{2}{3}$"  # stopped before '. I hope': no answer
    assert B.math_scores(doc, cut)["prediction"] == "[invalidanswer]"
    # an output cut by the stop sequence right after the answer's period is read as the harness
    # reads it, with "I hope it is correct." appended before matching
    assert B.math_scores(doc, "Final Answer: The final answer is $\\frac{2}{3}$. ")["exact_match"] is True
    assert B.math_scores(doc, "Final Answer: The final answer is $0.66$. I hope it is correct.")["exact_match"] is False
    assert B.last_boxed_only_string("\\boxed 5$ and more") == "\\boxed 5"
    assert B.remove_boxed("\\boxed 5") == "5"


def _sympy_or_skip():
    from r3.evals import math_equivalence

    try:
        math_equivalence.require()
    except R3Error as e:  # the test extra installs both
        pytest.skip(str(e))


@pytest.mark.parametrize("pred,gold,same", [
    ("\\frac{1}{2}", "0.5", True), ("2\\sqrt{2}", "\\sqrt{8}", True), ("\\frac{\\pi}{3}", "\\pi/3", True),
    ("x+1", "1+x", True), ("[2,5)", "[2,5)", True),  # identical, though sympy cannot parse an interval
    ("(1,2)", "(2,1)", False), ("2", "3", False), ("[invalidanswer]", "1", False), ("", "", False),
    ("\\frac{2}{3}", "0.66", False),
])
def test_math_sympy_equivalence(pred, gold, same):
    _sympy_or_skip()
    doc = {"problem": "p", "answer": gold}
    text = f"Final Answer: The final answer is ${pred}$. I hope it is correct."
    assert B.math_scores(doc, text, "sympy")["exact_match"] is same
    assert B.math_scores(doc, text)["exact_match"] is (pred == gold)  # the default: strings


def test_math_sympy_needs_antlr_4_11(monkeypatch, tmp_path, capsys):
    from r3.evals import math_equivalence

    monkeypatch.setattr(math_equivalence, "version", lambda name: "4.13.2")
    with pytest.raises(R3Error, match=r"antlr4-python3-runtime 4.11.*found antlr4-python3-runtime 4.13.2.*r3\[math\]"):
        math_equivalence.require()
    # the CLI says so before loading any model
    f = write_jsonl(tmp_path / "m.jsonl", [{"problem": "1+1?", "answer": "2"}])
    with pytest.raises(SystemExit) as e:
        FG.main(["--data", f"math={f}", "--math-equivalence", "sympy", "--out", str(tmp_path / "o.json")])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and "r3[math]" in err and len(err.splitlines()) == 1, err


# ----------------------------------------------------------------------------------- MMLU-Pro


def test_mmlu_pro_prompt_and_extraction():
    shot = {"question": "Sq", "options": [" x ", "y"], "answer": "B", "category": "computer science",
            "cot_content": "A: Let's think step by step. Because y. The answer is (B)."}
    doc = {"question": "Q", "options": ["o1", "o2", "o3"], "answer": "C", "category": "computer science"}
    p = B.prompt("mmlu_pro", doc, [shot], 1)
    assert p == ("The following are multiple choice questions (with answers) about computer science. Think step by "
                 'step and then finish your answer with "the answer is (X)" where X is the correct letter choice.\n'
                 "Question:\nSq\nOptions:\nA. x\nB. y\nAnswer: Let's think step by step. Because y. The answer is (B).\n\n"
                 "Question:\nQ\nOptions:\nA. o1\nB. o2\nC. o3\nAnswer: Let's think step by step.")
    assert B.mmlu_pro_scores(doc, " so the answer is (C). Later the answer is A")["exact_match,custom-extract"] is True
    assert B.mmlu_pro_scores(doc, "The Answer is C")["prediction"] == "[invalid]"  # case-sensitive
    assert B.mmlu_pro_scores(doc, "the answer is C")["exact_match,custom-extract"] is True
    pool = [dict(shot, category=c) for c in ("math", "computer science", "math", "computer science")]
    assert B.fewshot_indices("mmlu_pro", [doc], pool, 5, 0) == [[1, 3]]  # first ones of its category
    assert B.fewshot_indices("mmlu_pro", [doc], pool, 1, 0) == [[1]]  # --shots 1: the first one only
    assert B.mmlu_pro_doc({"question": "q", "options": ["a", "b"], "answer_index": 1, "category": "law"}, "f", 0)["answer"] == "B"


def test_mean_stderr_is_the_harness_formula():
    v = [1.0, 0.0, 1.0, 1.0]
    mu = 0.75
    assert mean_stderr(v) == pytest.approx((sum((x - mu) ** 2 for x in v) / 3) ** 0.5 / 2)
    assert mean_stderr([1.0]) == 0.0


def test_summarise_pairs_the_same_items():
    plan = {"bench": B.get("gsm8k")}
    items = {"gsm8k": {"a": [{"scores": {m: s for m in B.get("gsm8k").metrics}} for s in (True, False, True, False)],
                       "b": [{"scores": {m: s for m in B.get("gsm8k").metrics}} for s in (True, True, False, False)]}}
    results, paired = FG.summarise([plan], ["a", "b"], items)
    assert [(r["model"], r["score"], r["n"]) for r in results[:2]] == [("a", 0.5, 4), ("b", 0.5, 4)]
    p = paired[0]
    assert (p["difference"], p["better"], p["worse"]) == (0.0, 1, 1)
    assert p["stderr"] == pytest.approx((2 / 3) ** 0.5 / 2)


# ----------------------------------------------------------------------------------- CLI


def test_cli_errors_before_loading_a_model(tmp_path, capsys):
    g = write_jsonl(tmp_path / "g.jsonl", [{"question": "q", "answer": "a\n#### 1"}])
    m = write_jsonl(tmp_path / "m.jsonl", [{"problem": "p", "answer": "1"}])
    cases = [
        ([], "no benchmark given"),
        (["--data", "gsm9k=" + str(g)], "unknown benchmark 'gsm9k'"),
        (["--data", "gsm8k=" + str(g)], "5-shot prompts need --fewshot-data gsm8k"),
        (["--data", "gsm8k=" + str(g), "--data", "gsm8k=" + str(g)], "given twice"),
        (["--data", "math=" + str(g), "--shots", "0"], "record 1 has no field 'problem'"),
        (["--data", "gsm8k=" + str(g), "--fewshot-data", "math=" + str(g)], "no --data math"),
        (["--data", "gsm8k=/no/such.jsonl"], "no such file"),
        (["--data", "gsm8k=" + str(g), "--chat-template-option", "enable_thinking=false"], "is for --chat"),
        (["--data", "gsm8k=" + str(g), "--shots", "-1"], "--shots must be >= 0, got -1"),
        (["--data", "math=" + str(m), "--shots", "5"], "math has 4 built-in examples"),
        (["--data", "math=" + str(m), "--fewshot-data", "math=" + str(m)], "math's shots are built in"),
        (["--data", "math=" + str(m), "--model", "/no/such/model"], "the same --model is given twice"),
    ]
    for args, msg in cases:
        with pytest.raises(SystemExit) as e:
            FG.main([*args, "--model", "/no/such/model", "--out", str(tmp_path / "o.json")])
        err = capsys.readouterr().err
        assert e.value.code == 2 and msg in err and "Traceback" not in err, (args, err)
        assert len(err.strip().splitlines()) == 1
    assert not (tmp_path / "o.json").exists()


def test_cli_end_to_end_on_small_files(tmp_path, capsys):
    hs = write_jsonl(tmp_path / "hs.jsonl", [
        {"activity_label": "Cooking", "ctx_a": "A man cracks two eggs into a bowl.", "ctx_b": "he",
         "endings": ["whisks them with a fork.", "drives a car to the moon.", "sings.", "is a bowl."], "label": 0},
        {"activity_label": "Swimming", "ctx_a": "A girl jumps into the pool.", "ctx_b": "she",
         "endings": ["swims to the other side.", "eats the water.", "flies.", "reads"], "label": 0},
        {"activity_label": "Running", "ctx_a": "A man ties his shoes.", "ctx_b": "he",
         "endings": ["runs down the road.", "eats the shoes.", "flies.", "reads"], "label": 0},  # (past --n 2)
    ])
    gs = write_jsonl(tmp_path / "gs.jsonl", [{"question": "What is 2 + 3?", "answer": "2 + 3 = 5\n#### 5"}])
    out = tmp_path / "f.json"
    assert FG.main(["--data", f"hellaswag={hs}", "--data", f"gsm8k={gs}", "--shots", "0", "--max-gen-toks", "3",
                    "--n", "2", "--out", str(out), "--quiet"]) == 0
    # (gsm8k holds one document, fewer than --n: said, as r3.evaluate says of a short split)
    err = capsys.readouterr().err
    assert f"note: {gs} has only 1 gsm8k documents, not --n 2" in err and "hellaswag documents" not in err
    data = json.loads(out.read_text())
    rows = {(r["benchmark"], r["metric"]): r for r in data["results"]}
    assert set(rows) == {("hellaswag", "acc"), ("hellaswag", "acc_norm"), ("gsm8k", "exact_match,strict-match"),
                         ("gsm8k", "exact_match,flexible-extract")}
    assert all(r["model"] == "smollm2-135m" and r["n"] == (2 if r["benchmark"] == "hellaswag" else 1) for r in rows.values())
    assert data["cwd"] == os.getcwd()  # (where relative model paths are relative to, for r3.report)
    hs_items = data["items"]["hellaswag"]["smollm2-135m"]
    assert [len(i["loglikelihoods"]) for i in hs_items] == [4, 4]
    assert all(i["prediction"] == max(range(4), key=lambda j: i["loglikelihoods"][j]) for i in hs_items)
    assert rows[("hellaswag", "acc")]["score"] == sum(i["correct"] for i in hs_items) / 2
    g = data["items"]["gsm8k"]["smollm2-135m"][0]
    assert isinstance(g["output"], str) and "Question:" not in g["output"]
    from r3.checkpoint import load_tokenizer

    assert 1 <= len(load_tokenizer("smollm2-135m")(g["output"], add_special_tokens=False)["input_ids"]) <= 3  # --max-gen-toks
    assert data["settings"]["benchmarks"]["gsm8k"]["shots"] == 0 and data["settings"]["chat"] is False


def test_an_items_correct_is_the_benchmarks_first_metric(tmp_path, monkeypatch):
    """``correct`` in the items is GSM8K's strict match (its first metric, the harness's
    headline): an answer only the flexible extraction finds is scored there, not here."""
    gs = write_jsonl(tmp_path / "gs.jsonl", [{"question": "What is 2 + 3?", "answer": "2 + 3 = 5\n#### 5"},
                                             {"question": "What is 2 + 2?", "answer": "2 + 2 = 4\n#### 4"}])
    texts = ["2 + 3 makes 5.", "2 + 2 = 4\n#### 4"]
    monkeypatch.setattr(FG, "generate_until", lambda model, tok, prompts, **k: texts[:len(prompts)])
    out = tmp_path / "f.json"
    assert FG.main(["--data", f"gsm8k={gs}", "--shots", "0", "--out", str(out), "--quiet"]) == 0
    items = json.loads(out.read_text())["items"]["gsm8k"]["smollm2-135m"]
    assert [i["output"] for i in items] == texts
    assert [i["scores"] for i in items] == [{"exact_match,strict-match": False, "exact_match,flexible-extract": True},
                                            {"exact_match,strict-match": True, "exact_match,flexible-extract": True}]
    assert [i["correct"] for i in items] == [False, True]


def test_cli_resumes_from_the_finished_batches(tmp_path, monkeypatch, capsys):
    """Interrupted after its third batch, a rerun of the same command runs only the fourth and
    writes what an uninterrupted run writes (log-likelihoods and texts read back exactly)."""
    from r3.partial_results import PartialResults

    hs = write_jsonl(tmp_path / "hs.jsonl", [
        {"activity_label": "Cooking", "ctx_a": f"A man cracks {k} eggs into a bowl.", "ctx_b": "he",
         "endings": ["whisks them with a fork.", "drives a car to the moon.", "sings.", "is a bowl."], "label": k % 4}
        for k in range(3)])
    gs = write_jsonl(tmp_path / "gs.jsonl", [{"question": f"What is 2 + {k}?", "answer": f"#### {2 + k}"}
                                             for k in range(3)])
    argv = ["--data", f"hellaswag={hs}", "--data", f"gsm8k={gs}", "--shots", "0", "--max-gen-toks", "8",
            "--batch-size", "2", "--dtype", "fp32", "--quiet", "--out"]
    assert FG.main(argv + [str(tmp_path / "whole.json")]) == 0
    whole = json.loads((tmp_path / "whole.json").read_text())
    real, added = PartialResults.add, []

    def add(self, unit, b, result, stop_after=None):
        real(self, unit, b, result)
        added.append((unit, b))
        if len(added) == stop_after:
            raise KeyboardInterrupt

    out = tmp_path / "f.json"
    monkeypatch.setattr(PartialResults, "add", lambda *a: add(*a, stop_after=3))
    with pytest.raises(SystemExit) as e:
        FG.main(argv + [str(out)])
    assert e.value.code == 130 and not out.exists()
    assert "interrupted: 3 finished batches kept in" in capsys.readouterr().err
    assert added == [("smollm2-135m hellaswag", 0), ("smollm2-135m hellaswag", 1), ("smollm2-135m gsm8k", 0)]
    kept_s = sum(json.loads(line)["s"] for line in (tmp_path / "f.json.partial.jsonl").read_text().splitlines()[1:])
    added.clear()
    monkeypatch.setattr(PartialResults, "add", lambda *a: add(*a))
    capsys.readouterr()
    assert FG.main(argv + [str(out)]) == 0
    assert "resuming: 3 finished batches" in capsys.readouterr().err
    assert added == [("smollm2-135m gsm8k", 1)]
    data = json.loads(out.read_text())
    assert data.pop("time_s") >= kept_s - 0.05 and whole.pop("time_s") >= 0  # (with the kept batches' time)
    assert data == whole
    assert not (tmp_path / "f.json.partial.jsonl").exists()


# ----------------------------------------------------------------------------------- --chat


def test_chat_messages_put_each_shot_in_its_own_turns():
    docs = [{"question": "q0", "answer": "a0\n#### 0"}]
    shots = [{"question": "t1", "answer": "s1\n#### 1"}, {"question": "t2", "answer": "s2\n#### 2"}]
    assert B.chat_messages("gsm8k", docs[0], shots, 2) == [
        {"role": "user", "content": "Question: t1\nAnswer:"}, {"role": "assistant", "content": "s1\n#### 1"},
        {"role": "user", "content": "Question: t2\nAnswer:"}, {"role": "assistant", "content": "s2\n#### 2"},
        {"role": "user", "content": "Question: q0\nAnswer:"}]
    # MMLU-Pro: the category header is the system message; a shot's target is its chain of thought
    shot = {"question": "Sq", "options": ["x", "y"], "answer": "B", "category": "law",
            "cot_content": "A: Let's think step by step. Because y. The answer is (B)."}
    doc = {"question": "Q", "options": ["o1", "o2"], "answer": "A", "category": "law"}
    m = B.chat_messages("mmlu_pro", doc, [shot], 1)
    assert [x["role"] for x in m] == ["system", "user", "assistant", "user"]
    assert m[0]["content"] == B.mmlu_pro_header("law")
    assert m[1]["content"] == "Question:\nSq\nOptions:\nA. x\nB. y\nAnswer: Let's think step by step."
    assert m[2]["content"] == "Because y. The answer is (B)."
    # MATH: the Minerva shots as turns; HellaSwag: the gold ending as the shot's answer
    m = B.chat_messages("math", {"problem": "P", "answer": "1"}, [], 2)
    assert m[0]["content"] == f"Problem:\n{B.MINERVA_FEWSHOT[0][0]}\n\nSolution:" and m[1]["content"] == B.MINERVA_FEWSHOT[0][1]
    assert m[-1] == {"role": "user", "content": "Problem:\nP\n\nSolution:"} and len(m) == 5
    hs = {"query": "Cooking: A man cracks eggs. He", "choices": ["whisks.", "flies."], "gold": 0}
    assert B.chat_messages("hellaswag", hs, [dict(hs, gold=1)], 1)[1] == {"role": "assistant", "content": "flies."}
    assert B.choices("hellaswag", hs) == [" whisks.", " flies."]
    assert B.choices("hellaswag", hs, chat=True) == ["whisks.", "flies."]


def test_chat_prompt_is_the_harness_prompt(builtin):
    """The text lm-evaluation-harness 0.4.13 sends the built-in model for a GSM8K item with
    --apply_chat_template (copied from its logged arguments, shortened to one shot)."""
    from r3.chat import ChatFormat

    _, tok = builtin
    doc = {"question": "Janet has 3 ducks. How many?", "answer": "3\n#### 3"}
    shot = {"question": "Jen did 16 flips. How many?", "answer": "Jen did 16 flips.\n#### 16"}
    text = ChatFormat(tok).prompt_text(B.chat_messages("gsm8k", doc, [shot], 1))
    assert text == ("<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
                    "<|im_start|>user\nQuestion: Jen did 16 flips. How many?\nAnswer:<|im_end|>\n"
                    "<|im_start|>assistant\nJen did 16 flips.\n#### 16<|im_end|>\n"
                    "<|im_start|>user\nQuestion: Janet has 3 ducks. How many?\nAnswer:<|im_end|>\n"
                    "<|im_start|>assistant\n")


def test_cli_chat_end_to_end(tmp_path):
    hs = write_jsonl(tmp_path / "hs.jsonl", [
        {"activity_label": "Cooking", "ctx_a": "A man cracks two eggs into a bowl.", "ctx_b": "he",
         "endings": ["whisks them with a fork.", "drives a car to the moon."], "label": 0}])
    gs = write_jsonl(tmp_path / "gs.jsonl", [{"question": "What is 2 + 3?", "answer": "2 + 3 = 5\n#### 5"}])
    out = tmp_path / "f.json"
    assert FG.main(["--data", f"hellaswag={hs}", "--data", f"gsm8k={gs}", "--shots", "0", "--max-gen-toks", "40",
                    "--chat", "--out", str(out), "--quiet"]) == 0
    data = json.loads(out.read_text())
    assert data["settings"]["chat"] is True
    g = data["items"]["gsm8k"]["smollm2-135m"][0]["output"]
    # the instruct model answers and ends its turn: nothing of the template is left in the text
    assert g and "<|im_end|>" not in g and "<|im_start|>" not in g
    assert len(data["items"]["hellaswag"]["smollm2-135m"][0]["loglikelihoods"]) == 2


def test_summarise_by_hand_later_model_minus_the_first():
    """Scores per benchmark and metric, and the paired change of each later model against the
    first (the base model): later minus first, better/worse counted from the later model's side."""
    bench = B.get("gsm8k")
    strict, flexible = bench.metrics

    def rows(strict_v, flexible_v):
        return [{"scores": {strict: s, flexible: f}} for s, f in zip(strict_v, flexible_v)]

    items = {"gsm8k": {"base": rows([1, 0, 0, 1], [1, 1, 0, 1]), "trained": rows([1, 1, 1, 0], [1, 1, 1, 1])}}
    results, paired = FG.summarise([{"bench": bench}], ["base", "trained"], items)
    scores = {(r["model"], r["metric"]): (r["score"], r["n"]) for r in results}
    assert scores == {("base", strict): (0.5, 4), ("trained", strict): (0.75, 4),
                      ("base", flexible): (0.75, 4), ("trained", flexible): (1.0, 4)}
    by_metric = {p["metric"]: p for p in paired}
    assert all((p["model"], p["baseline"]) == ("trained", "base") for p in paired)
    s = by_metric[strict]  # differences +0, +1, +1, -1
    assert (s["difference"], s["better"], s["worse"], s["n"]) == (pytest.approx(0.25), 2, 1, 4)
    assert s["stderr"] == pytest.approx(mean_stderr([0, 1, 1, -1]))
    f = by_metric[flexible]
    assert (f["difference"], f["better"], f["worse"]) == (pytest.approx(0.25), 1, 0)


# ----------------------------------------------------------------------------------- by hand (mutation gaps)


def test_hellaswag_label_must_index_an_ending_and_brackets_go_one_pair_at_a_time():
    rec = {"activity_label": "a", "ctx_a": "b", "ctx_b": "c", "endings": ["x", "y"], "label": 2}
    with pytest.raises(R3Error, match="label 2 is not an index into its 2 endings"):  # (one past the last)
        B.hellaswag_doc(rec, "f", 0)
    # each [..] goes by itself: the text between two of them stays
    assert B.hellaswag_clean("a [x] b [y] c") == "a b c"


def test_hellaswag_acc_norm_divides_by_the_endings_characters_and_ties_go_first():
    # lengths 1 and 4: acc -1.0 > -3.6 picks 0; acc_norm -1.0 < -3.6 / 4 = -0.9 picks 1
    # (dividing by length + 1, as if the leading space counted, would pick 0: -0.5 > -0.72)
    s = B.hellaswag_scores({"choices": ["a", "bcde"], "gold": 1}, [-1.0, -3.6])
    assert (s["acc"], s["acc_norm"], s["prediction"]) == (False, True, 0)
    # a tie after normalising (-1.0 / 1 == -2.0 / 2) goes to the first choice, as numpy's argmax
    s = B.hellaswag_scores({"choices": ["a", "bc"], "gold": 0}, [-1.0, -2.0])
    assert s["acc"] is True and s["acc_norm"] is True


@pytest.mark.parametrize("gold,output,strict,flexible", [
    ("#### 3", " #### 3 and later #### 5", True, False),  # strict: the first '#### N'; flexible: the last number
    ("#### -4", " so #### -4", True, True),  # the sign is part of the answer
    ("#### 7", " She has 7", False, True),  # a single digit: the regex's second group
])
def test_gsm8k_extraction_first_hashes_sign_and_single_digits(gold, output, strict, flexible):
    s = B.gsm8k_scores({"question": "q", "answer": gold}, output)
    assert (s["exact_match,strict-match"], s["exact_match,flexible-extract"]) == (strict, flexible)


def test_math_gold_is_normalised_as_the_prediction_is():
    for record in ({"problem": "p", "answer": "\\frac12"}, {"problem": "p", "solution": "so $\\boxed{\\frac12}$."}):
        doc = B.math_doc(record, "f", 0)
        assert doc["answer"] == "\\frac{1}{2}"
        assert B.math_scores(doc, "Final Answer: The final answer is $\\frac{1}{2}$. I hope it is correct.")["exact_match"]


def test_score_generation_passes_the_math_equivalence_on(monkeypatch):
    monkeypatch.setattr(B, "is_equiv", lambda a, b: True)  # (a stand-in for sympy's verdict)
    doc = {"problem": "p", "answer": "\\frac{1}{2}"}
    text = "Final Answer: The final answer is 0.5. I hope it is correct."
    assert B.score_generation("math", doc, text)["exact_match"] is False
    assert B.score_generation("math", doc, text, math_equivalence="sympy")["exact_match"] is True


def test_prepare_mmlu_pro_shots_math_default_and_cot_pool(tmp_path):
    """--fewshot-data mmlu_pro: its records' chains of thought are the shots' answers; without
    it MMLU-Pro is 0-shot (and says so); MATH runs its four built-in shots by default."""
    q = {"question": "Q", "options": ["o1", "o2"], "answer": "A", "category": "law"}
    data = write_jsonl(tmp_path / "m.jsonl", [q])
    cot = "A: Let's think step by step. So A. The answer is (A)."
    val = write_jsonl(tmp_path / "v.jsonl", [dict(q, question="V", cot_content=cot)])
    math = write_jsonl(tmp_path / "math.jsonl", [{"problem": "p", "answer": "1"}])
    (plan,) = FG.prepare(FG.parse_args(["--data", f"mmlu_pro={data}", "--fewshot-data", f"mmlu_pro={val}", "--out", "o"]))
    assert plan["shots"] == 5 and plan["messages"][0][2] == {"role": "assistant", "content": "So A. The answer is (A)."}
    plans = FG.prepare(FG.parse_args(["--data", f"mmlu_pro={data}", "--data", f"math={math}", "--out", "o"]))
    assert [(p["bench"].name, p["shots"]) for p in plans] == [("mmlu_pro", 0), ("math", 4)]
    assert len(plans[1]["messages"][0]) == 9  # 4 x (user, assistant) + the question


def test_run_benchmark_hellaswag_continuations_and_correct(builtin, monkeypatch):
    """The continuations scored: " " + ending, or the bare ending after a chat prompt; ``correct``
    is ``acc`` (the summed log-likelihood), not ``acc_norm``."""
    from types import SimpleNamespace

    from r3.evals.engine import Loglikelihood

    _, tok = builtin
    doc = {"query": "Cooking: A man", "choices": ["a", "bcde"], "gold": 1}
    plan = {"bench": B.get("hellaswag"), "docs": [doc], "messages": [B.chat_messages("hellaswag", doc, [], 0)]}
    for chat, want in ((False, [" a", " bcde"]), (True, ["a", "bcde"])):
        seen = []
        monkeypatch.setattr(FG, "encode_pair", lambda t, ctx, cont: (seen.append(cont), ([1], [2]))[1])
        monkeypatch.setattr(FG, "loglikelihoods", lambda model, items, **k: [[Loglikelihood(-1.0, False),
                                                                                Loglikelihood(-3.6, False)]])
        args = SimpleNamespace(chat=chat, chat_options={}, quiet=True, batch_size=4)
        (item,) = FG.run_benchmark(None, tok, plan, args, "m")
        assert seen == want
        assert item["correct"] is False and item["scores"] == {"acc": False, "acc_norm": True}


def test_summarise_stderr_and_table_in_percent():
    bench = B.get("gsm8k")
    items = {"gsm8k": {"a": [{"scores": {m: s for m in bench.metrics}} for s in (1, 0, 1, 1)]}}
    results, _ = FG.summarise([{"bench": bench}], ["a"], items)
    assert results[0]["score"] == 0.75 and results[0]["stderr"] == pytest.approx(mean_stderr([1, 0, 1, 1])) == 0.25
    line = FG.format_table(results, []).splitlines()[1]
    assert "75.00 \u00b1 25.00" in line


def _run_dir(tmp_path, dtype: str):
    """A run directory with its config (the built-in model, countdown, 8-token limits) and an
    export folder."""
    run = tmp_path / "run"
    (run / "export").mkdir(parents=True)
    (run / "export" / "config.json").write_text("{}")
    (run / "config.json").write_text(json.dumps({"model": "smollm2-135m", "task": "countdown", "task_options": {},
                                                 "max_attempt_tokens": 8, "max_reflection_tokens": 8,
                                                 "max_retry_tokens": 8, "dtype": dtype}))
    return run


def test_run_compares_the_export_against_the_untrained_base(builtin, tmp_path, monkeypatch):
    """--run DIR: the run's base model is the baseline, its export the later model (the paired
    change is trained minus untrained)."""
    _, tok = builtin
    run = _run_dir(tmp_path, "fp32")
    gs = write_jsonl(tmp_path / "gs.jsonl", [{"question": "What is 2 + 3?", "answer": "2 + 3 = 5\n#### 5"}])
    texts = {"smollm2-135m": "#### 4", str(run / "export"): "#### 5"}
    loaded = []
    monkeypatch.setattr(FG, "load_model", lambda m, dtype, device: (loaded.append(m), (m, tok))[1])
    monkeypatch.setattr(FG, "generate_until", lambda model, tok, prompts, **k: [texts[model]] * len(prompts))
    out = tmp_path / "f.json"
    assert FG.main(["--run", str(run), "--data", f"gsm8k={gs}", "--shots", "0", "--out", str(out), "--quiet"]) == 0
    data = json.loads(out.read_text())
    assert loaded == data["settings"]["models"] == ["smollm2-135m", str(run / "export")]
    p = data["paired"][0]
    assert (p["model"], p["baseline"], p["difference"], p["better"]) == (str(run / "export"), "smollm2-135m", 1.0, 1)


# ----------------------------------------------------------------------------------- by hand (mutation gaps, round 2)


def test_hellaswag_title_becomes_period_space_and_bad_labels_and_endings_are_named():
    # " [title]" -> ". " even when no space follows it (then [..] go, then one pass of double spaces)
    assert B.hellaswag_clean("How to cook [title]Boil water [step] now") == "How to cook. Boil water now"
    rec = {"activity_label": "a", "ctx_a": "b", "ctx_b": "c", "endings": ["x [step] y", "z"], "label": 0}
    assert B.hellaswag_doc(rec, "f", 0)["choices"] == ["x y", "z"]  # endings are cleaned too
    with pytest.raises(R3Error, match="label -1 is not an index into its 2 endings"):  # (not the last ending)
        B.hellaswag_doc(dict(rec, label=-1), "f", 0)
    with pytest.raises(R3Error, match="'endings' must be a non-empty list of strings"):
        B.hellaswag_doc(dict(rec, endings=[]), "f", 0)


def test_hellaswag_acc_norm_counts_characters_not_bytes():
    # characters: -3.0 / 4 = -0.75 > -1.8 / 2 = -0.9 picks 0; UTF-8 bytes ("\u00e9\u00e9" is 4) would
    # give -1.8 / 4 = -0.45 and pick 1
    s = B.hellaswag_scores({"choices": ["abcd", "\u00e9\u00e9"], "gold": 0}, [-3.0, -1.8])
    assert (s["acc"], s["acc_norm"]) == (False, True)


@pytest.mark.parametrize("gold,output,strict,flexible", [
    ("#### 5", " so ####5", False, True),  # strict needs '#### ' with its space
    ("#### 7", " She has 7 apples, so.", False, True),  # a lone ',' or '.' is no number (two characters or a digit)
    ("#### -1000", " It changes by -1,000 points", False, True),  # the sign stays with a number with commas
    ("#### -5", " a change of -$5", False, True),  # '$' inside the number, then dropped: -5
    ("#### 35", " #### 3.5", False, False),  # only a trailing '.' goes: 3.5 is not 35
])
def test_gsm8k_extraction_spaces_signs_and_points(gold, output, strict, flexible):
    s = B.gsm8k_scores({"question": "q", "answer": gold}, output)
    assert (s["exact_match,strict-match"], s["exact_match,flexible-extract"]) == (strict, flexible)


def test_math_last_boxed_space_form_nested_boxed_and_unknown_equivalence():
    assert B.last_boxed_only_string("\\boxed 3$ then \\boxed 5$ end") == "\\boxed 5"  # the last one
    assert B.normalize_final_answer("\\boxed{\\frac{1}{2}}") == "\\frac{1}{2}"  # up to the last '}'
    with pytest.raises(R3Error, match="unknown MATH equivalence 'numeric'"):
        B.math_scores({"problem": "p", "answer": "1"}, "x", "numeric")


@pytest.mark.parametrize("record,msg", [
    ({"answer": "AB"}, "must be a letter A-C, got 'AB'"),  # (a substring of the letters is no letter)
    ({"answer": ""}, "must be a letter A-C, got ''"),
    ({"answer_index": -1}, "answer_index -1 is not an index into its 3 options"),
    ({"options": [str(k) for k in range(11)], "answer": "A"}, "1 to 10 strings"),
])
def test_mmlu_pro_answers_and_options_are_checked(record, msg):
    base = {"question": "q", "options": ["a", "b", "c"], "category": "law"}
    with pytest.raises(R3Error, match=msg):
        B.mmlu_pro_doc({**base, **record}, "f", 0)
    assert B.mmlu_pro_doc({**base, "answer": " c "}, "f", 0)["answer"] == "C"  # a lower-case letter is that letter


def test_hellaswag_shots_drawn_again_without_a_document_the_pool_holds_twice():
    """When the document is drawn more than once among the shots + 1, the shots are drawn again
    from the others, by the same generator (continued, not restarted)."""
    recs = [{"activity_label": "A", "ctx_a": "c", "ctx_b": "", "endings": ["x"], "label": 0, "ind": i} for i in range(4)]
    pool = B.make_docs("hellaswag", [recs[0]] + recs, "f")  # the document at 0 and 1
    for seed in range(100):
        rnd = random.Random(seed)
        first = rnd.sample(range(5), 3)
        want = rnd.sample([2, 3, 4], 2)
        if {0, 1} <= set(first) and want != [2, 3] and want != random.Random(seed).sample([2, 3, 4], 2):
            break
    else:
        raise AssertionError("no seed shows the case")
    assert B.fewshot_indices("hellaswag", pool[:1], pool, 2, seed) == [want]


def test_run_benchmark_stop_strings_and_token_limits(builtin, monkeypatch):
    """The harness's generation settings per benchmark: GSM8K stops at 'Question:' (and '</s>',
    '<|im_end|>'), MATH at 'Problem:', MMLU-Pro at 'Question:'; 256, 256 and 2048 new tokens, or
    --max-gen-toks."""
    from types import SimpleNamespace

    _, tok = builtin
    seen = {}
    monkeypatch.setattr(FG, "generate_until", lambda model, tok, prompts, **k: (seen.update(k), [""] * len(prompts))[1])
    docs = {"gsm8k": {"question": "q", "answer": "#### 1"}, "math": {"problem": "p", "answer": "1"},
            "mmlu_pro": {"question": "q", "options": ["a"], "answer": "A", "category": "law"}}
    want = {"gsm8k": (("Question:", "</s>", "<|im_end|>"), 256), "math": (("Problem:",), 256),
            "mmlu_pro": (("Question:",), 2048)}
    for name, doc in docs.items():
        plan = {"bench": B.get(name), "docs": [doc], "messages": [B.chat_messages(name, doc, [], 0)]}
        for limit in (None, 7):
            args = SimpleNamespace(chat=False, chat_options={}, quiet=True, batch_size=4, max_gen_toks=limit,
                                   math_equivalence="string")
            FG.run_benchmark(None, tok, plan, args, "m")
            assert (tuple(seen["until"]), seen["max_new_tokens"]) == (want[name][0], limit or want[name][1]), name


def test_stop_ids_are_the_tokenizers_eos_or_the_chat_formats():
    from types import SimpleNamespace

    assert FG.stop_ids(SimpleNamespace(eos_token_id=7), None) == [7]  # (no generation config to read)
    assert FG.stop_ids(SimpleNamespace(eos_token_id=7), SimpleNamespace(stop_ids=[3, 9])) == [3, 9]


def test_prepare_draws_gsm8k_shots_with_the_seed_given(tmp_path):
    docs = write_jsonl(tmp_path / "g.jsonl", [{"question": "q0", "answer": "#### 0"}])
    train = write_jsonl(tmp_path / "t.jsonl", [{"question": f"t{i}", "answer": f"#### {i}"} for i in range(20)])
    argv = ["--data", f"gsm8k={docs}", "--fewshot-data", f"gsm8k={train}", "--out", "o"]
    for extra, seed in (([], 1234), (["--seed", "5"], 5)):  # (1234: the harness's default)
        (plan,) = FG.prepare(FG.parse_args(argv + extra))
        first = random.Random(seed).sample(range(20), 5)[0]
        assert plan["messages"][0][0]["content"] == f"Question: t{first}\nAnswer:", seed


def test_format_table_paired_line_is_later_minus_first():
    row = {"model": "trained", "benchmark": "gsm8k", "metric": "m", "score": 0.5, "stderr": 0.25, "n": 4}
    lines = FG.format_table([row], [{"model": "trained", "baseline": "base", "benchmark": "gsm8k", "metric": "m",
                                     "difference": 0.25, "stderr": 0.125, "n": 4, "better": 2, "worse": 1}])
    assert lines.splitlines()[-1] == "paired gsm8k m: trained minus base = +25.00 \u00b1 12.50 points (n=4, 2 better, 1 worse)"


def test_format_table_of_no_results_is_the_header_only():
    assert FG.format_table([], []).split() == ["benchmark", "metric", "model", "score", "n"]


def _two_models(tmp_path, monkeypatch, tok, stop_after=None):
    """The built-in model and an 'export' (files only): load_model and generation are stand-ins
    that honour the finished batches and record each batch they generate."""
    export = tmp_path / "export"
    export.mkdir(exist_ok=True)
    (export / "config.json").write_text("{}")
    texts = {"smollm2-135m": "#### 4", str(export): "#### 5"}
    generated = []

    def fake_generate(model, tok, prompts, *, finished, on_batch, batch_size, **k):
        out = []
        for b, lo in enumerate(range(0, len(prompts), batch_size)):
            got = finished[b] if b in finished else [texts[model]] * len(prompts[lo: lo + batch_size])
            if b not in finished:
                on_batch(b, got)
                generated.append((model, b))
                if len(generated) == stop_after:
                    raise KeyboardInterrupt
            out += got
        return out

    monkeypatch.setattr(FG, "load_model", lambda m, dtype, device: (m, tok))
    monkeypatch.setattr(FG, "generate_until", fake_generate)
    return export, generated


def test_a_later_model_never_reads_the_first_models_batches(builtin, tmp_path, monkeypatch):
    _, tok = builtin
    export, generated = _two_models(tmp_path, monkeypatch, tok)
    gs = write_jsonl(tmp_path / "gs.jsonl", [{"question": f"q{k}", "answer": "#### 5"} for k in range(3)])
    out = tmp_path / "f.json"
    assert FG.main(["--model", "smollm2-135m", "--model", str(export), "--data", f"gsm8k={gs}", "--shots", "0",
                    "--batch-size", "2", "--out", str(out), "--quiet"]) == 0
    assert generated == [("smollm2-135m", 0), ("smollm2-135m", 1), (str(export), 0), (str(export), 1)]
    data = json.loads(out.read_text())
    assert [i["output"] for i in data["items"]["gsm8k"][str(export)]] == ["#### 5"] * 3
    assert data["paired"][0]["difference"] == 1.0


def test_a_rerun_with_other_weights_data_or_batches_is_refused(builtin, tmp_path, monkeypatch, capsys):
    """Finished batches are kept for the same models (their files), the same documents and prompts
    and the same batches: a rewritten export, a file edited in place or another --batch-size is
    another evaluation, refused naming what changed, and the file is kept."""
    _, tok = builtin
    export, generated = _two_models(tmp_path, monkeypatch, tok, stop_after=1)
    gs = write_jsonl(tmp_path / "gs.jsonl", [{"question": f"q{k}", "answer": "#### 5"} for k in range(3)])
    out = tmp_path / "f.json"
    argv = ["--model", "smollm2-135m", "--model", str(export), "--data", f"gsm8k={gs}", "--shots", "0", "--quiet",
            "--out", str(out)]
    with pytest.raises(SystemExit) as e:
        FG.main(argv + ["--batch-size", "2"])
    assert e.value.code == 130
    capsys.readouterr()
    kept = (tmp_path / "f.json.partial.jsonl").read_text()

    def refused(extra, what):
        with pytest.raises(SystemExit) as e:
            FG.main(argv + extra)
        err = capsys.readouterr().err
        assert e.value.code == 2 and f"other inputs ({what})" in err, err
        assert (tmp_path / "f.json.partial.jsonl").read_text() == kept

    refused(["--batch-size", "3"], "batch_size")
    write_jsonl(gs, [{"question": f"Q{k}", "answer": "#### 5"} for k in range(3)])  # same path and size
    refused(["--batch-size", "2"], "data.gsm8k")
    write_jsonl(gs, [{"question": f"q{k}", "answer": "#### 5"} for k in range(3)])
    (export / "config.json").write_text('{"retrained": 1}')  # the export rewritten by more training
    refused(["--batch-size", "2"], "models")


# ----------------------------------------------------------------------------------- by hand (mutation round 18a)


def test_gsm8k_gold_needs_its_hashes_with_the_space():
    """A gold answer written '####18' is refused: the gold loses only '#### ' (with its space),
    so the whole worked solution would be the gold and every prediction would score wrong."""
    with pytest.raises(R3Error, match="no '#### N' final answer"):
        B.gsm8k_doc({"question": "q", "answer": "9 * 2 = 18\n####18"}, "f", 1)


def test_minerva_units_spare_a_latex_command_of_that_name_and_thousands_need_the_whole_answer():
    # 'square' goes as a word, never out of \square (a bare backslash would be left)
    assert B.normalize_final_answer("\\square") == "\\square"
    assert B.normalize_final_answer("4 square feet") == "4"
    # commas go only when the whole answer is one number in thousands groups: a list stays
    assert B.normalize_final_answer("100,200,3") == "100,200,3"
    assert B.normalize_final_answer("-1,234,567") == "-1234567"


def test_minerva_answer_is_the_first_on_its_line_and_stripped():
    """A model repeating itself on one line is scored on its first final answer (the harness's
    lazy match), not on the text up to the last 'I hope it is correct.'; the answer is stripped
    of any whitespace, not only spaces."""
    text = ("Final Answer: The final answer is $5$. I hope it is correct. "
            "Final Answer: The final answer is $6$. I hope it is correct.")
    assert B.minerva_answer(text) == "$5$"
    assert B.math_scores({"problem": "p", "answer": "5"}, text)["exact_match"] is True
    assert B.minerva_answer("Final Answer: The final answer is\t7. I hope it is correct.") == "7"


def test_mmlu_pro_answer_letter_is_a_capital_so_an_article_is_no_answer():
    """'answer is a bit ...' is English, not the letter A: the harness's regex takes capitals
    only, so the first answer is the later '(C)'."""
    doc = {"question": "q", "options": list("abcd"), "answer": "C", "category": "law"}
    s = B.mmlu_pro_scores(doc, " The answer is a bit subtle. Checking each option, the answer is (C).")
    assert s["prediction"] == "C" and s["exact_match,custom-extract"] is True


def test_mmlu_pro_ten_options_and_an_index_one_past_the_last():
    """MMLU-Pro's questions have ten options (A-J): all ten are taken; an answer_index equal to
    the number of options names no option."""
    base = {"question": "q", "options": [f"o{k}" for k in range(10)], "category": "law"}
    assert B.mmlu_pro_doc({**base, "answer_index": 9}, "f", 1)["answer"] == "J"
    assert B.mmlu_pro_question(B.mmlu_pro_doc({**base, "answer": "J"}, "f", 1)).endswith(
        "J. o9\nAnswer: Let's think step by step.")
    with pytest.raises(R3Error, match="answer_index 3 is not an index into its 3 options"):
        B.mmlu_pro_doc({**base, "options": ["a", "b", "c"], "answer_index": 3}, "f", 1)


def test_hellaswag_shots_need_one_more_example_than_the_shots():
    """HellaSwag draws shots + 1 (then drops the document): a pool of exactly `shots` examples is
    one line naming the need, not a ValueError from random.sample."""
    docs = [{"question": f"q{i}"} for i in range(2)]
    pool = [{"query": f"t{i}", "choices": ["x"], "gold": 0} for i in range(2)]
    with pytest.raises(R3Error, match="2 shots need at least 3 few-shot examples, the file has 2"):
        B.fewshot_indices("hellaswag", docs, pool, 2, 1234)
    assert len(B.fewshot_indices("gsm8k", docs, pool, 2, 1234)[0]) == 2  # GSM8K draws exactly the shots


def test_math_sympy_comparison_runs_under_a_5_second_alarm_and_restores_the_handler(monkeypatch):
    """Each sympy comparison runs under SIGALRM set to the harness's 5 seconds, cleared after,
    with the caller's SIGALRM handler put back (a pathological answer must not hang the run, nor
    leave our handler behind)."""
    pytest.importorskip("sympy")
    import signal

    from r3.evals import math_equivalence

    alarms = []
    monkeypatch.setattr(signal, "setitimer", lambda which, s, *interval: alarms.append((which, s)) or (0.0, 0.0))
    monkeypatch.setattr("sympy.parsing.latex.parse_latex", lambda s: int(s))  # (no ANTLR needed)
    mine = lambda signum, frame: None  # noqa: E731
    old = signal.signal(signal.SIGALRM, mine)
    try:
        assert math_equivalence.is_equiv("1", "2") is False
        assert signal.getsignal(signal.SIGALRM) is mine
    finally:
        signal.signal(signal.SIGALRM, old)
    assert alarms == [(signal.ITIMER_REAL, 5), (signal.ITIMER_REAL, 0)]


def test_math_sympy_without_its_latex_parser_is_an_error_not_a_wrong_answer(monkeypatch):
    """An ImportError from sympy's LaTeX parser (no ANTLR runtime) propagates: counting every
    answer wrong would report a model's MATH score as 0."""
    pytest.importorskip("sympy")
    from r3.evals import math_equivalence

    def no_antlr(s):
        raise ImportError("LaTeX parsing requires the antlr4 Python package")

    monkeypatch.setattr("sympy.parsing.latex.parse_latex", no_antlr)
    with pytest.raises(ImportError, match="antlr4"):
        math_equivalence.is_equiv("1", "2")


def test_read_records_skips_a_byte_order_mark(tmp_path):
    """A file saved with a UTF-8 byte-order mark (Windows tools, Excel's export) reads as the
    same records, JSONL and JSON alike: the mark is no part of the first record."""
    recs = [{"question": "q", "answer": "a\n#### 1"}, {"question": "r", "answer": "b\n#### 2"}]
    (tmp_path / "b.jsonl").write_bytes(b"\xef\xbb\xbf" + "".join(json.dumps(r) + "\n" for r in recs).encode())
    (tmp_path / "b.json").write_bytes(b"\xef\xbb\xbf" + json.dumps(recs).encode())
    assert read_records(tmp_path / "b.jsonl") == recs
    assert read_records(tmp_path / "b.json") == recs


def test_a_data_flag_without_its_file_is_refused_as_such():
    """'--data gsm8k=' (the path forgotten) is the NAME=FILE mistake, not a search for a file
    named '.'."""
    for item in ("gsm8k=", "=x.jsonl", "gsm8k"):
        with pytest.raises(R3Error, match="--data expects NAME=FILE"):
            FG._pairs([item], "--data")


def test_hellaswag_shots_without_a_train_file_say_which_flag_gives_them(tmp_path):
    """--shots 1 on HellaSwag without its train file names --fewshot-data hellaswag (as GSM8K's
    does), not 'the file has 0' of a file never given."""
    rec = {"activity_label": "a", "ctx_a": "b", "ctx_b": "c", "endings": ["x", "y"], "label": 0}
    h = write_jsonl(tmp_path / "h.jsonl", [rec])
    with pytest.raises(R3Error, match=r"hellaswag: 1-shot prompts need --fewshot-data hellaswag=FILE \(train split\)"):
        FG.prepare(FG.parse_args(["--data", f"hellaswag={h}", "--shots", "1", "--out", "o"]))


def test_run_takes_the_runs_dtype_unless_dtype_is_given(builtin, tmp_path, monkeypatch):
    """--run DIR: both models load in the run's dtype by default, in --dtype when given (the JSON
    says which): a flag silently overridden would compare other numbers than asked for."""
    _, tok = builtin
    run = _run_dir(tmp_path, "fp16")
    gs = write_jsonl(tmp_path / "gs.jsonl", [{"question": "What is 2 + 3?", "answer": "2 + 3 = 5\n#### 5"}])
    dtypes = []
    monkeypatch.setattr(FG, "load_model", lambda m, dtype, device: (dtypes.append(dtype), (m, tok))[1])
    monkeypatch.setattr(FG, "generate_until", lambda model, tok, prompts, **k: ["#### 5"] * len(prompts))
    for extra, want in (([], "float16"), (["--dtype", "fp32"], "float32")):
        dtypes.clear()
        out = tmp_path / f"f{len(extra)}.json"
        assert FG.main(["--run", str(run), "--data", f"gsm8k={gs}", "--shots", "0", "--device", "cpu", "--out",
                        str(out), "--quiet", *extra]) == 0
        assert [str(d) for d in dtypes] == [f"torch.{want}"] * 2
        assert json.loads(out.read_text())["settings"]["dtype"] == want


def test_a_rerun_after_the_shots_file_changed_is_refused_and_the_kept_time_counts(builtin, tmp_path, monkeypatch,
                                                                                  capsys):
    """The finished batches are keyed by the prompts themselves: a GSM8K train file edited in
    place (same path and size, other shots) is another evaluation, refused as data.gsm8k and
    the file kept. A resumed run's time_s adds the time its read-back batches took."""
    _, tok = builtin
    export, generated = _two_models(tmp_path, monkeypatch, tok, stop_after=1)
    gs = write_jsonl(tmp_path / "gs.jsonl", [{"question": f"q{k}", "answer": "#### 5"} for k in range(3)])
    train = write_jsonl(tmp_path / "train.jsonl", [{"question": f"t{k}", "answer": f"#### {k}"} for k in range(3)])
    out, part = tmp_path / "f.json", tmp_path / "f.json.partial.jsonl"
    argv = ["--model", "smollm2-135m", "--model", str(export), "--data", f"gsm8k={gs}", "--fewshot-data",
            f"gsm8k={train}", "--shots", "1", "--batch-size", "2", "--quiet", "--out", str(out)]
    with pytest.raises(SystemExit) as e:
        FG.main(argv)
    assert e.value.code == 130
    kept = part.read_text()
    write_jsonl(train, [{"question": f"T{k}", "answer": f"#### {k}"} for k in range(3)])
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        FG.main(argv)
    err = capsys.readouterr().err
    assert e.value.code == 2 and "other inputs (data.gsm8k)" in err, err
    assert part.read_text() == kept
    # the shots the batch was made with again: it is read back, with the time it took then
    write_jsonl(train, [{"question": f"t{k}", "answer": f"#### {k}"} for k in range(3)])
    head, row = kept.splitlines()
    part.write_text(head + "\n" + json.dumps({**json.loads(row), "s": 1000.0}) + "\n")
    assert FG.main(argv) == 0
    assert generated[1:] == [("smollm2-135m", 1), (str(export), 0), (str(export), 1)]
    assert json.loads(out.read_text())["time_s"] >= 1000


def test_a_resumed_benchmarks_progress_starts_at_the_documents_already_done(builtin, tmp_path, monkeypatch):
    """The progress bar of a resumed benchmark starts at the documents its read-back batches
    hold (2 + 2 of 5), not at the number of batches; the read-back texts are scored in place."""
    _, tok = builtin
    gs = write_jsonl(tmp_path / "gs.jsonl", [{"question": f"q{k}", "answer": "#### 5"} for k in range(5)])
    args = FG.parse_args(["--data", f"gsm8k={gs}", "--shots", "0", "--batch-size", "2", "--out", "o", "--quiet"])
    args.chat_options = {}
    (plan,) = FG.prepare(args)
    resumed = []

    class Bar:
        def __init__(self, *a, **k):
            pass

        def resume(self, n):
            resumed.append(n)

        def update(self, *a):
            pass

        def close(self):
            pass

    class Partial:
        def start(self, unit):
            return {0: ["#### 5", "#### 5"], 1: ["#### 4", "#### 5"]}

        def add(self, unit, b, result):
            pass

    monkeypatch.setattr(FG, "Progress", Bar)
    monkeypatch.setattr(FG, "generate_until", lambda model, tok, prompts, *, finished, **k:
                        [t for b in sorted(finished) for t in finished[b]] + ["#### 5"])
    items = FG.run_benchmark(None, tok, plan, args, "m", partial=Partial(), unit="u")
    assert resumed == [4] and [i["correct"] for i in items] == [True, True, False, True, True]
