"""Forgetting: other skills before and after training, scored as lm-evaluation-harness scores them.

``python -m r3.forgetting --model M [--model M2 ...] --data NAME=FILE [...] --out F.json``
``python -m r3.forgetting --run DIR --data gsm8k=test.jsonl --fewshot-data gsm8k=train.jsonl --out F.json``

Benchmarks (``NAME``): ``gsm8k``, ``math``, ``mmlu_pro``, ``hellaswag``, each read from a local
file in its public format (JSONL, JSON or parquet; see :mod:`r3.evals.benchmarks` for the fields
and the scoring rules). ``--fewshot-data`` gives GSM8K's train file (its 5 shots come from it)
and MMLU-Pro's validation file (5-shot chain of thought; 0-shot without it); MATH's four Minerva
shots are built in; HellaSwag is 0-shot. ``--n`` takes the first N documents of each file (the
harness's ``--limit``). ``--chat`` (instruct models) sends the prompts through the model's chat
template as the harness's ``--apply_chat_template`` does (each shot a user and an assistant
turn), with ``--chat-template-option`` or, with ``--run``, the options the run trained with; the
JSON says which mode and options a number used.

Every model sees the same documents; the table gives each score with its standard error, and for
each later model the paired difference against the first (same items) with its standard error.
The JSON has ``results`` (rows ``{model, benchmark, metric, score, stderr, n}``), ``paired`` and
``items`` (``{benchmark: {model: [{prediction, correct, scores, output | loglikelihoods}]}}`` in
file order; ``correct`` is the benchmark's first metric: GSM8K's strict match, MATH's and
MMLU-Pro's exact match, HellaSwag's ``acc``), so numbers can be compared item by item with
another harness.

Each finished batch is appended to ``OUT.partial.jsonl`` (:mod:`r3.partial_results`): the same
command run again after an interruption goes on from there; the file goes once ``OUT`` is written.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

from r3.chat import ChatFormat, template_options, user_template_options
from r3.checkpoint import generation_eos_ids
from r3.cpu_share import watch_for
from r3.cli import (
    DTYPES,
    ArgumentParser,
    Progress,
    check_out_path,
    load_model,
    parse_chat_template_options,
    pick_device_dtype,
    positive_int,
    read_run,
    write_json_atomic,
)
from r3.distributed import release_device_memory
from r3.errors import R3Error, cli_main
from r3.evals import benchmarks as B
from r3.evals.data import read_records
from r3.evals.engine import encode, encode_pair, generate_until, loglikelihoods
from r3.evals.math_equivalence import require as require_sympy
from r3.partial_results import PartialResults, code_fingerprint, device_name, fingerprint, model_files
from r3.stats import mean_stderr, paired_difference


def parse_args(argv=None):
    p = ArgumentParser(prog="python -m r3.forgetting", description=__doc__.splitlines()[0])
    p.add_argument("--model", action="append", default=None,
                   help="HF directory, .gguf file or built-in name; repeat to compare (default: smollm2-135m)")
    p.add_argument("--run", default=None, metavar="DIR", help="a training run: its base model and its export")
    p.add_argument("--data", action="append", default=[], metavar="NAME=FILE",
                   help=f"a benchmark's evaluation file; NAME is one of {', '.join(B.BENCHMARKS)}; repeatable")
    p.add_argument("--fewshot-data", action="append", default=[], metavar="NAME=FILE",
                   help="few-shot examples: gsm8k's train file, mmlu_pro's validation file, hellaswag's train file")
    p.add_argument("--n", type=int, default=None, help="the first N documents of each file (default: all)")
    p.add_argument("--shots", type=int, default=None,
                   help="shots for every benchmark (default: gsm8k 5, math 4, mmlu_pro 5 with a validation file, hellaswag 0)")
    p.add_argument("--seed", type=int, default=B.DEFAULT_FEWSHOT_SEED, help="few-shot sampling seed (default: 1234, as the harness)")
    p.add_argument("--max-gen-toks", type=int, default=None, help="generation limit (default: gsm8k/math 256, mmlu_pro 2048)")
    p.add_argument("--batch-size", type=int, default=16, help="documents per batch (default: 16)")
    p.add_argument("--chat", action="store_true", help="prompts through the model's chat template, shots as turns (lm-eval's --apply_chat_template)")
    p.add_argument("--chat-template-option", action="append", default=[], metavar="KEY=VALUE",
                   help="with --chat: passed to the chat template, over enable_thinking=false; repeatable "
                        "(with --run, the run's)")
    p.add_argument("--math-equivalence", choices=("string", "sympy"), default="string",
                   help="MATH exact_match: identical normalised answers (default), or also equal as sympy "
                        "expressions, as the harness scores it (needs pip install 'r3[math]')")
    p.add_argument("--dtype", choices=sorted(DTYPES), default=None,
                   help="default: auto, bf16 where the device multiplies it natively, else fp32 (with --run, the run's)")
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p.add_argument("--out", required=True, help="the JSON result file")
    p.add_argument("--quiet", action="store_true", help="no progress line")
    return p.parse_args(argv)


def _pairs(items: list[str], flag: str) -> dict[str, Path]:
    out: dict[str, Path] = {}
    for item in items:
        name, eq, path = item.partition("=")
        name = name.strip()
        if not eq or not name or not path:
            raise R3Error(f"{flag} expects NAME=FILE, got {item!r}")
        B.get(name)
        if name in out:
            raise R3Error(f"{flag} {name} given twice")
        out[name] = Path(path).expanduser()
    return out


def prepare(args) -> list[dict]:
    """Every benchmark's documents and prompts (text), checked before any model is loaded."""
    data, fewshot = _pairs(args.data, "--data"), _pairs(args.fewshot_data, "--fewshot-data")
    if not data:
        raise R3Error(f"no benchmark given: add --data NAME=FILE (NAME one of {', '.join(B.BENCHMARKS)})")
    for name in fewshot:
        if name not in data:
            raise R3Error(f"--fewshot-data {name}: no --data {name}=FILE to evaluate")
        if B.get(name).fewshot_split is None:
            raise R3Error(f"--fewshot-data {name}: {name}'s shots are built in")
    n = positive_int("--n", args.n, allow_none=True)
    if args.shots is not None and args.shots < 0:
        raise R3Error(f"--shots must be >= 0, got {args.shots}")
    if args.math_equivalence == "sympy" and "math" in data:
        require_sympy()
    plans = []
    for name, path in data.items():
        bench = B.get(name)
        docs = B.make_docs(name, read_records(path), path)[:n]
        if n is not None and len(docs) < n:  # (as r3.evaluate says of a short split)
            print(f"note: {path} has only {len(docs)} {name} documents, not --n {n}", file=sys.stderr)
        pool = B.make_docs(name, read_records(fewshot[name]), fewshot[name], fewshot=True) if name in fewshot else []
        shots = bench.default_shots if args.shots is None else args.shots
        if name == "mmlu_pro" and not pool:
            shots = 0  # chain of thought without examples
        if name == "math" and shots > len(B.MINERVA_FEWSHOT):
            raise R3Error(f"--shots {shots}: math has {len(B.MINERVA_FEWSHOT)} built-in examples")
        if name in ("gsm8k", "hellaswag") and shots and not pool:
            raise R3Error(f"{name}: {shots}-shot prompts need --fewshot-data {name}=FILE ({bench.fewshot_split} split), "
                          f"or --shots 0")
        picks = B.fewshot_indices(name, docs, pool, shots, args.seed)
        messages = [B.chat_messages(name, d, [pool[j] for j in pick], shots) for d, pick in zip(docs, picks)]
        plans.append({"bench": bench, "path": str(path), "fewshot_path": str(fewshot[name]) if name in fewshot else None,
                      "shots": shots, "docs": docs, "messages": messages})
    return plans


def stop_ids(tokenizer, chat) -> list[int]:
    """The generation config's and tokenizer's eos ids; with a chat format, its stop ids."""
    if chat is not None:
        return chat.stop_ids
    ids = set(generation_eos_ids(tokenizer))
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    return sorted(ids)


def run_benchmark(model, tokenizer, plan: dict, args, label: str, partial: PartialResults | None = None,
                  unit: str = "", watch=None) -> list[dict]:
    """One model on one benchmark: an item record per document. With ``partial``, the batches
    ``unit`` finished in an interrupted run are read back and each batch run here is recorded.
    ``watch``: the run's :class:`r3.cpu_share.CpuShareWatch` (one for all benchmarks and models,
    so that its note is said once)."""
    bench, docs = plan["bench"], plan["docs"]
    finished = partial.start(unit) if partial is not None else {}
    resume = dict(finished=finished, on_batch=(lambda b, r: partial.add(unit, b, r)) if partial is not None else None)
    chat = None
    if args.chat:
        if not getattr(tokenizer, "chat_template", None):
            raise R3Error("--chat: this model's tokenizer has no chat template")
        chat = ChatFormat(tokenizer, template_options=template_options(args.chat_options))
    prompts = [chat.prompt_text(m) if chat else B.plain_text(m) for m in plan["messages"]]
    progress = Progress(len(docs), f"{label} {bench.name}", unit="docs", enabled=not args.quiet, watch=watch)
    if finished:
        progress.resume(sum(len(r) for r in finished.values()))
    try:
        if bench.kind == "loglikelihood":
            items = []
            for d, ctx in zip(docs, prompts):
                pairs = [encode_pair(tokenizer, ctx, c) for c in B.choices(bench.name, d, chat=chat is not None)]
                items.append((pairs[0][0], [cont for _, cont in pairs]))
            lls = loglikelihoods(model, items, batch_size=args.batch_size, progress=progress.update, **resume)
            out = []
            for d, ll in zip(docs, lls):
                s = B.hellaswag_scores(d, [x.logprob for x in ll])
                out.append({"prediction": s["prediction"], "correct": s["acc"], "scores": {m: s[m] for m in bench.metrics},
                            "loglikelihoods": [x.logprob for x in ll]})
            return out
        limit = args.max_gen_toks or bench.max_gen_toks
        texts = generate_until(model, tokenizer, [encode(tokenizer, p) for p in prompts], until=bench.until,
                               max_new_tokens=limit, stop_token_ids=stop_ids(tokenizer, chat),
                               batch_size=args.batch_size, progress=progress.update, **resume)
        out = []
        for d, text in zip(docs, texts):
            s = B.score_generation(bench.name, d, text, math_equivalence=args.math_equivalence)
            out.append({"prediction": s["prediction"], "correct": s[bench.metrics[0]],
                        "scores": {m: s[m] for m in bench.metrics}, "output": text})
        return out
    finally:
        progress.close()


def summarise(plans: list[dict], models: list[str], items: dict) -> tuple[list[dict], list[dict]]:
    results, paired = [], []
    for plan in plans:
        bench = plan["bench"]
        for metric in bench.metrics:
            per_model = {}
            for m in models:
                v = [float(r["scores"][metric]) for r in items[bench.name][m]]
                per_model[m] = v
                results.append({"model": m, "benchmark": bench.name, "metric": metric, "score": sum(v) / len(v),
                                "stderr": mean_stderr(v), "n": len(v)})
            for m in models[1:]:
                d = paired_difference([bool(x) for x in per_model[models[0]]], [bool(x) for x in per_model[m]])
                paired.append({"model": m, "baseline": models[0], "benchmark": bench.name, "metric": metric,
                               "difference": d["mean"], "stderr": d["stderr"], "n": d["n"],
                               "better": d["better"], "worse": d["worse"]})
    return results, paired


def format_table(results: list[dict], paired: list[dict]) -> str:
    names = sorted({r["model"] for r in results}, key=[r["model"] for r in results].index)
    w = max([len("model"), *(len(n) for n in names)])
    lines = [f"{'benchmark':<10} {'metric':<30} {'model':<{w}} {'score':>16} {'n':>6}"]
    for r in results:
        lines.append(f"{r['benchmark']:<10} {r['metric']:<30} {r['model']:<{w}} "
                     f"{100 * r['score']:7.2f} \u00b1 {100 * r['stderr']:5.2f} {r['n']:>6}")
    for p in paired:
        lines.append(f"paired {p['benchmark']} {p['metric']}: {p['model']} minus {p['baseline']} = "
                     f"{100 * p['difference']:+.2f} \u00b1 {100 * p['stderr']:.2f} points (n={p['n']}, "
                     f"{p['better']} better, {p['worse']} worse)")
    return "\n".join(lines)


@cli_main
def main(argv=None) -> int:
    args = parse_args(argv)
    out = check_out_path(args.out)
    args.chat_options = parse_chat_template_options(args.chat_template_option)
    if args.chat_template_option and not args.chat:
        raise R3Error("--chat-template-option is for --chat (the prompts through the chat template)")
    positive_int("--batch-size", args.batch_size)
    if args.max_gen_toks is not None:
        positive_int("--max-gen-toks", args.max_gen_toks)
    if args.run is not None:
        if args.model:
            raise R3Error("--run takes the models from the run; drop --model")
        if args.chat_template_option:
            raise R3Error("--run takes the chat template options from the run; drop --chat-template-option")
        cfg = read_run(args.run)
        models = [cfg["model"], str(Path(args.run) / "export")]
        args.dtype = args.dtype or cfg.get("dtype", "auto")
        if args.chat:
            args.chat_options = user_template_options(cfg.get("chat_template_options", {}),
                                                      f"{Path(args.run) / 'config.json'}: 'chat_template_options'")
    else:
        models = args.model or ["smollm2-135m"]
    if len(set(models)) != len(models):
        raise R3Error("the same --model is given twice")
    plans = prepare(args)
    device, dtype = pick_device_dtype(args.device, args.dtype)
    settings = {
        "models": models, "chat": args.chat, "chat_template_options": args.chat_options,
        "math_equivalence": args.math_equivalence, "n": args.n, "seed": args.seed,
        "dtype": str(dtype).replace("torch.", ""), "device": device_name(device), "max_gen_toks": args.max_gen_toks,
        "benchmarks": {p["bench"].name: {"file": p["path"], "fewshot_file": p["fewshot_path"], "shots": p["shots"],
                                         "n": len(p["docs"])} for p in plans}}
    partial = PartialResults(out, {  # (what the generated texts and log-likelihoods depend on; not the scoring)
        "settings": {k: v for k, v in settings.items() if k != "math_equivalence"}, "batch_size": args.batch_size,
        "models": [model_files(m) for m in models], "code": code_fingerprint(),
        "data": {p["bench"].name: fingerprint([p["docs"], p["messages"]]) for p in plans}})
    items: dict = {p["bench"].name: {} for p in plans}
    t0 = time.perf_counter()
    watch = watch_for(device)
    with partial.interrupted_note():  # (says that a rerun goes on from the finished batches)
        for m in models:
            model, tok = load_model(m, dtype, device)
            for plan in plans:
                name = plan["bench"].name
                items[name][m] = run_benchmark(model, tok, plan, args, label=Path(m).name or m, partial=partial,
                                               unit=f"{m} {name}", watch=watch)
            del model
            release_device_memory(device)
    results, paired = summarise(plans, models, items)
    print(format_table(results, paired))
    write_json_atomic(out, {
        "results": results,
        "paired": paired,
        "settings": settings,
        "cwd": os.getcwd(),  # (where relative model paths above are relative to)
        "time_s": round(time.perf_counter() - t0 + partial.seconds_before(), 1),  # (with the kept batches' time)
        "items": items,
    })
    partial.finish()
    print(f"[wrote {out}]", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
