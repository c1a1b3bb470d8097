"""r3.forgetting against lm-evaluation-harness's Hugging Face backend: same files, same model, same
dtype and batch size, in one run. Prints a table; ``--json`` writes it.

    pip install lm-eval        # the baseline (not an r3 dependency)
    python benchmarks/bench_forgetting.py --gsm8k-test ../shared/data/gsm8k_test.jsonl \\
        --gsm8k-train ../shared/data/gsm8k_train.jsonl --n-gsm8k 32 --n-hellaswag 200 --json F.json

Benchmarks: GSM8K 5-shot (generation, greedy, up to 256 tokens) on the given files, and HellaSwag
(0-shot log-likelihood over 4 endings, ``--hellaswag-shots K`` for k-shot) on two files in
HellaSwag's format written by this script from the GSM8K test questions (no HellaSwag file is
reachable here; the text does not matter for speed, and both sides score the same file): "long
endings" (contexts ~20 tokens, endings ~50) and "short endings" (contexts ~48, endings ~18).
lm-evaluation-harness reads the same files through task YAMLs that include its own ``gsm8k`` /
``hellaswag`` tasks and only change where the data comes from. ``--chat``: both sides apply the
model's chat template; ``--dtype``: both sides' dtype.

Each side runs in its own process, timed from start to its JSON (model loading included), one
after the other on an otherwise idle machine. Besides the time, the table compares the scores and
item by item: the predictions' agreement (GSM8K: the generated text's extracted answer; HellaSwag:
the chosen ending) and, for HellaSwag, the largest difference between the two sides'
log-likelihoods.

What it does not show: speed on a GPU, other models, or the harness's other backends (vLLM).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _sentences(text: str) -> list[str]:
    return [x.strip() for x in re.split(r"(?<=[.?!])\s+", text) if x.strip()]


def hellaswag_file(gsm8k_test: Path, n: int, out: Path, shape: str) -> Path:
    """HellaSwag-format records written from GSM8K questions, the true ending at index ``i % 4``
    and three other questions' endings beside it.

    ``shape`` "long-endings": the context is a question's first sentence and the endings are the
    rest of four questions (contexts ~20 tokens, endings ~50). "short-endings": the context is all
    of a question but its last sentence and the endings are four questions' last sentences
    (contexts ~48 tokens, endings ~18), closer to HellaSwag's own texts, where the context is the
    longer part."""
    qs = [json.loads(line)["question"] for line in gsm8k_test.read_text().splitlines()]
    rows = []
    for j in range(len(qs) - 3):
        if len(rows) == n:
            break
        if shape == "long-endings":
            parts = [q.split(". ", 1) + [""] for q in qs[j: j + 4]]
            ctx, endings = parts[0][0] + ".", [(p[1] or p[0]).strip() for p in parts]
        else:
            sents = [_sentences(q) for q in qs[j: j + 4]]
            if len(sents[0]) < 3:
                continue
            ctx, endings = " ".join(sents[0][:-1]), [x[-1] for x in sents]
        label = len(rows) % 4
        endings = endings[4 - label:] + endings[: 4 - label]  # the true continuation at index `label`
        rows.append({"ind": len(rows), "activity_label": "Word problem", "ctx_a": ctx, "ctx_b": "",
                     "ctx": ctx, "endings": endings, "label": str(label), "split": "val",
                     "split_type": "indomain", "source_id": f"gsm8k-{j}"})
    if len(rows) < n:
        raise SystemExit(f"{gsm8k_test}: only {len(rows)} {shape} records can be written, {n} asked")
    out.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return out


def harness_tasks(include: Path, gsm8k_test: Path, gsm8k_train: Path, hellaswag: dict[str, Path]) -> None:
    """Task YAMLs for the harness: ``r3_gsm8k`` and one ``r3_<name>`` per HellaSwag-format file,
    each including the harness's own task and changing only where the data comes from."""
    import lm_eval

    tasks = Path(lm_eval.__file__).parent / "tasks"
    (include / "r3_gsm8k.yaml").write_text(textwrap.dedent(f"""\
        include: {tasks / 'gsm8k' / 'gsm8k.yaml'}
        task: r3_gsm8k
        dataset_path: json
        dataset_name: null
        dataset_kwargs:
          data_files:
            train: {gsm8k_train}
            test: {gsm8k_test}
        """))
    (include / "utils.py").write_text((tasks / "hellaswag" / "utils.py").read_text())
    for name, path in hellaswag.items():
        (include / f"r3_{name}.yaml").write_text(textwrap.dedent(f"""\
            include: {tasks / 'hellaswag' / 'hellaswag.yaml'}
            task: r3_{name}
            dataset_path: json
            dataset_name: null
            dataset_kwargs:
              data_files:
                train: {path}
                validation: {path}
            process_docs: !function utils.process_docs
            """))


HARNESS = """
import json, sys, lm_eval
from lm_eval.tasks import TaskManager
args = json.loads(sys.argv[1])
res = lm_eval.simple_evaluate(model="hf", model_args=args["model_args"], tasks=args["tasks"], limit=args["limit"],
                              batch_size=args["batch_size"], device="cpu", log_samples=True,
                              apply_chat_template=args["chat"], num_fewshot=args["num_fewshot"],
                              task_manager=TaskManager(include_path=args["include"]), bootstrap_iters=0)
out = {"results": res["results"], "samples": {}}
for task, samples in res["samples"].items():
    out["samples"][task] = [{"doc_id": s["doc_id"], "filter": s.get("filter"), "resps": s["resps"],
                             "filtered_resps": s["filtered_resps"], "arguments": s.get("arguments")} for s in samples]
json.dump(out, open(args["out"], "w"), default=str)
"""


def run_timed(cmd: list[str], env: dict) -> float:
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"failed: {' '.join(cmd[:4])} ...\n{proc.stderr[-3000:]}")
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m", help="HF directory or smollm2-135m")
    ap.add_argument("--gsm8k-test", type=Path, required=True)
    ap.add_argument("--gsm8k-train", type=Path, required=True)
    ap.add_argument("--n-gsm8k", type=int, default=32)
    ap.add_argument("--n-hellaswag", type=int, default=200)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    ap.add_argument("--chat", action="store_true",
                    help="both sides apply the model's chat template (r3 --chat; the harness's apply_chat_template)")
    ap.add_argument("--hellaswag-shots", type=int, default=0,
                    help="k-shot HellaSwag rows (shots drawn from the same file on both sides; default 0, the harness's)")
    ap.add_argument("--only", nargs="+", default=None,
                    help="run only these rows: gsm8k, hellaswag_long_endings, hellaswag_short_endings")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()

    from r3.checkpoint import builtin_gguf

    work = Path(tempfile.mkdtemp(prefix="bench_forgetting-"))
    shapes = {f"hellaswag_{shape.replace('-', '_')}": shape for shape in ("long-endings", "short-endings")}
    hs = {name: hellaswag_file(args.gsm8k_test, args.n_hellaswag, work / f"{name}.jsonl", shape)
          for name, shape in shapes.items()}
    harness_tasks(work, args.gsm8k_test.resolve(), args.gsm8k_train.resolve(), hs)
    torch_dtype = {"fp32": "float32", "bf16": "bfloat16"}[args.dtype]
    if args.model == "smollm2-135m":
        f = builtin_gguf("smollm2-135m")
        model_args = f"pretrained={f.parent},gguf_file={f.name},dtype={torch_dtype}"
    else:
        model_args = f"pretrained={args.model},dtype={torch_dtype}"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TOKENIZERS_PARALLELISM": "false", "HF_DATASETS_OFFLINE": "1",
           "HF_HUB_OFFLINE": "1"}

    rows = []
    for name, r3_data, task, n in (
        ("gsm8k", ["--data", f"gsm8k={args.gsm8k_test}", "--fewshot-data", f"gsm8k={args.gsm8k_train}"], "r3_gsm8k",
         args.n_gsm8k),
        *((name, ["--data", f"hellaswag={path}", *(["--shots", str(args.hellaswag_shots), "--fewshot-data",
                                                     f"hellaswag={path}"] if args.hellaswag_shots else [])],
           f"r3_{name}", args.n_hellaswag) for name, path in hs.items()),
    ):
        if args.only and name not in args.only:
            continue
        r3_out, h_out = work / f"r3_{name}.json", work / f"harness_{name}.json"
        t_r3 = run_timed([sys.executable, "-m", "r3.forgetting", "--model", args.model, *r3_data, "--n", str(n),
                          "--batch-size", str(args.batch_size), "--dtype", args.dtype, "--device", "cpu", "--quiet",
                          *(["--chat"] if args.chat else []), "--out", str(r3_out)], env)
        spec = {"model_args": model_args, "tasks": [task], "limit": n, "batch_size": args.batch_size,
                "include": str(work), "out": str(h_out), "chat": args.chat,
                "num_fewshot": args.hellaswag_shots if name != "gsm8k" and args.hellaswag_shots else None}
        t_h = run_timed([sys.executable, "-c", HARNESS, json.dumps(spec)], env)
        mine, theirs = json.loads(r3_out.read_text()), json.loads(h_out.read_text())
        items = mine["items"]["gsm8k" if name == "gsm8k" else "hellaswag"][args.model]
        # one logged sample per document and filter: keep the first filter's (strict-match for GSM8K)
        first_filter = theirs["samples"][task][0]["filter"]
        samples = sorted((s for s in theirs["samples"][task] if s["filter"] == first_filter), key=lambda s: s["doc_id"])
        assert [s["doc_id"] for s in samples] == list(range(n)), "the harness did not log one sample per document"
        row = {"benchmark": name, "n": n, "r3_s": t_r3, "harness_s": t_h, "speedup": t_h / t_r3}
        row["r3"] = {r["metric"]: r["score"] for r in mine["results"]}
        row["harness"] = {k: v for k, v in theirs["results"][task].items() if isinstance(v, (int, float))}
        if name == "gsm8k":
            row["prediction_agreement"] = sum(str(it["prediction"]["strict-match"]) == str(s["filtered_resps"][0])
                                              for it, s in zip(items, samples)) / len(items)
            row["identical_generations"] = sum(it["output"] == s["resps"][0][0] for it, s in zip(items, samples)) / len(items)
        else:
            ll_theirs = [[float(c[0][0]) if isinstance(c[0], list) else float(c[0]) for c in s["resps"]] for s in samples]
            ll_mine = [it["loglikelihoods"] for it in items]
            row["prediction_agreement"] = sum(
                max(range(len(a)), key=a.__getitem__) == max(range(len(b)), key=b.__getitem__)
                for a, b in zip(ll_mine, ll_theirs)) / len(items)
            row["max_loglikelihood_diff"] = max(abs(x - y) for a, b in zip(ll_mine, ll_theirs) for x, y in zip(a, b))
        rows.append(row)
        print(json.dumps(row), flush=True)

    lines = ["| benchmark | n | r3 s | lm-eval HF s | speedup | r3 score | lm-eval score | item agreement |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        mine, theirs = ("exact_match,strict-match",) * 2 if r["benchmark"] == "gsm8k" else ("acc", "acc,none")
        same = (f"{r['identical_generations']:.3f} identical texts" if "identical_generations" in r
                else f"max log-likelihood diff {r['max_loglikelihood_diff']:.1e}")
        lines.append(f"| {r['benchmark']} | {r['n']} | {r['r3_s']:.1f} | {r['harness_s']:.1f} | {r['speedup']:.2f}x | "
                     f"{r['r3'][mine]:.3f} | {r['harness'][theirs]:.3f} | {r['prediction_agreement']:.3f} ({same}) |")
    print("\n".join(lines))
    if args.json:
        import importlib.metadata as md

        Path(args.json).write_text(json.dumps({
            "rows": rows, "table": "\n".join(lines), "model": args.model, "dtype": args.dtype, "chat": args.chat,
            "hellaswag_shots": args.hellaswag_shots,
            "batch_size": args.batch_size, "lm_eval_version": md.version("lm_eval"),
            "torch": md.version("torch"), "transformers": md.version("transformers"), "cpus": os.cpu_count(),
        }, indent=2) + "\n")


if __name__ == "__main__":
    main()
