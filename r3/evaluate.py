"""Evaluate: accuracy at the first attempt and after one reflection + retry (the paper's table).

``python -m r3.evaluate --model M [--model M2 ...] --task T --n N --out F.json``
``python -m r3.evaluate --run DIR [--n N] [--out F.json]`` (default ``DIR/evaluation.json``, which
an earlier evaluation there is not replaced by unless ``--out`` names it)

For each test query the model answers (greedy by default); when the answer fails the verifier the
conversation continues with the task's reflection prompt, the model writes one reflection, then the
retry prompt, and the model answers again. ``second_attempt_accuracy`` counts a query as solved
when either the first attempt or the retry passes. Uses :func:`r3.episode.run_episode` with
``group_size=1``, so evaluation and training build exactly the same conversations.

With several ``--model`` values each is evaluated on the same queries and a table
``model | acc 1st | acc 2nd | delta`` is printed (with standard errors), plus each later model's
paired change against the first (mean and standard error of the per-query difference). The JSON
output holds one entry per model under ``models`` (with per-example ``records`` when ``--records``
is given), the paired changes under ``paired``, and ``n``; and at the top level the last model's ``model``,
``first_attempt_accuracy``, ``second_attempt_accuracy`` and ``delta``: the one model's, or with
several the model compared against the first (with ``--run``, the export, never the untrained
base). They are written once every model is done. ``first_query_messages`` holds the first query's
messages as the task wrote them (before the chat template), for the report. OUT is written after each model, except where a
file was there already (an earlier evaluation being replaced): that one is replaced only once every
model is done, so an interruption leaves it whole.

``--run DIR`` evaluates a training run's base model and its export (``DIR/export``) side by side on
the run's own task, task options (hence its prompts), token limits, top-p/top-k, dtype and
``cut_answers`` rule, read from ``DIR/config.json``.

Each finished batch is appended to ``OUT.partial.jsonl`` (:mod:`r3.partial_results`): the same
command run again after an interruption goes on from there; the file goes once ``OUT`` is written.

:func:`r3.heldout.evaluate_examples` is the library entry point (the training loop calls it for
held-out evaluation); the helpers the CLIs share are in :mod:`r3.cli`.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from r3.chat import ChatFormat, template_options, user_template_options
from r3.checkpoint import load_config, load_tokenizer
from r3.cpu_share import watch_for
from r3.decode import DECODE_MODES
from r3.distributed import release_device_memory
from r3.cli import (
    DTYPES,
    ArgumentParser,
    Progress,
    check_out_path,
    check_run_dir,
    dtype_name,
    load_model,
    load_task,
    parse_chat_template_options,
    parse_task_options,
    pick_device_dtype,
    positive_int,
    read_run,
    run_cut_answers,
    write_json_atomic,
)
from r3.episode import CUT_ANSWERS, DEFAULT_CUT_ANSWERS, EpisodeSampling
from r3.errors import R3Error, cli_main
from r3.heldout import evaluate_examples
from r3.model import check_token_limits
from r3.partial_results import PartialResults, code_fingerprint, device_name, fingerprint, model_files, partial_path
from r3.sampler import check_sampling_args
from r3.stats import paired_difference
from r3.tasks import examples_of
from r3.tasks.base import report_verifier_errors
from r3.toolchain import check_toolchain

# --------------------------------------------------------------------------------------------
# Evaluation
# --------------------------------------------------------------------------------------------


def format_table(rows: list[dict], paired: list[dict] | None = None) -> str:
    """The paper's table: model | acc 1st | acc 2nd | delta (accuracies in percent, with their
    standard errors), then each later model's paired change against the first."""
    names = [str(r["model"]) for r in rows]
    w = max([len("model")] + [len(s) for s in names])
    lines = [f"{'model':<{w}} |  acc 1st (%) |  acc 2nd (%) | delta (points)",
             f"{'-' * w}-+--------------+--------------+---------------"]
    for name, r in zip(names, rows):
        lines.append(f"{name:<{w}} | {100 * r['first_attempt_accuracy']:5.1f} \u00b1 {100 * r['first_attempt_stderr']:4.1f} | "
                     f"{100 * r['second_attempt_accuracy']:5.1f} \u00b1 {100 * r['second_attempt_stderr']:4.1f} | "
                     f"{100 * r['delta']:+14.1f}")
    for pr in paired or []:
        f, sec = pr["first_attempt"], pr["second_attempt"]
        lines.append(f"paired, {pr['model']} minus {pr['baseline']} (same {f['n']} queries): "
                     f"1st {100 * f['mean']:+.1f} \u00b1 {100 * f['stderr']:.1f}, "
                     f"2nd {100 * sec['mean']:+.1f} \u00b1 {100 * sec['stderr']:.1f} points")
    for name, r in zip(names, rows):  # (beside the numbers they lower, not only in a warning above)
        if r.get("verifier_errors"):
            lines.append(f"{name}: the task's verifier failed on {r['verifier_errors']} of {r['verdicts']} verdicts; "
                         "each counts as wrong in these accuracies")
    return "\n".join(lines)


def parse_args(argv=None):
    p = ArgumentParser(prog="python -m r3.evaluate", description=__doc__.splitlines()[0])
    p.add_argument("--run", default=None, metavar="DIR",
                   help="a training run (--out of r3.train): evaluate its base model and its export on the run's "
                        "own task, options, prompts and token limits")
    p.add_argument("--model", action="append", default=None,
                   help="HF directory, .gguf file or built-in name; repeat to compare (default: smollm2-135m)")
    p.add_argument("--task", default=None, help="task name or plug-in 'package.module:Class' (default: countdown)")
    p.add_argument("--task-option", action="append", default=None, metavar="KEY=VALUE",
                   help="a task option (value parsed as JSON when possible); repeatable")
    p.add_argument("--chat-template-option", action="append", default=None, metavar="KEY=VALUE",
                   help="passed to the chat template, over enable_thinking=false (Qwen3's thinking mode: "
                        "enable_thinking=true); repeatable (with --run, the run's)")
    p.add_argument("--n", type=int, default=None,
                   help="test queries (default: the task's whole split, e.g. Countdown's test_size)")
    p.add_argument("--split", default="test", help="default: test")
    p.add_argument("--seed", type=int, default=0, help="which examples (and the sampling seed when --temperature > 0)")
    p.add_argument("--out", default=None,
                   help="the JSON result file (with --run, default: RUN/evaluation.json, what r3.report reads)")
    p.add_argument("--max-new-tokens", type=int, default=None,
                   help="attempt and retry limit (default: 256; with --run, the run's limits)")
    p.add_argument("--max-reflection-tokens", type=int, default=None, help="default: --max-new-tokens")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-p", type=float, default=None, help="default: 1.0 (with --run, the run's)")
    p.add_argument("--top-k", type=int, default=None, help="default: 0 (with --run, the run's)")
    p.add_argument("--cut-answers", choices=CUT_ANSWERS, default=None,
                   help="an attempt or retry the token limit cut off: fail it unread, or judge it as it stands "
                        f"(default: {DEFAULT_CUT_ANSWERS}; with --run, the run's)")
    p.add_argument("--batch-size", type=int, default=16, help="queries per batch (default: 16)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="default: auto, bf16 where the device multiplies it natively, else fp32 (with --run, the run's)")
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p.add_argument("--records", action="store_true", help="keep per-example texts and verdicts in the JSON (attempt_cut, reflection_cut, "
                        "retry_cut: the token limit ended that text, not the model)")
    p.add_argument("--decode", choices=DECODE_MODES, default="eager",
                   help="the decode step as it is, or through torch.compile (faster per token; CUDA graphs on GPU; "
                        "compiling takes ~1 min once)")
    p.add_argument("--compile", dest="decode", action="store_const", const="compiled", help="= --decode compiled")
    p.add_argument("--quiet", action="store_true", help="no progress line")
    return p.parse_args(argv)


def resolve_settings(args) -> dict:
    """Models, task, options and limits from the flags, or from the run with ``--run``."""
    if args.run is None:
        return dict(models=args.model or ["smollm2-135m"], task=args.task or "countdown",
                    options=parse_task_options(args.task_option),
                    chat_options=parse_chat_template_options(args.chat_template_option),
                    max_attempt=args.max_new_tokens or 256, max_retry=args.max_new_tokens or 256,
                    max_reflection=args.max_reflection_tokens or args.max_new_tokens or 256,
                    top_p=1.0 if args.top_p is None else args.top_p, top_k=args.top_k or 0,
                    dtype=args.dtype or "auto", cut_answers=args.cut_answers or DEFAULT_CUT_ANSWERS)
    clashes = [flag for flag, v in (("--model", args.model), ("--task", args.task), ("--task-option", args.task_option),
                                    ("--chat-template-option", args.chat_template_option)) if v is not None]
    if clashes:
        raise R3Error(f"--run takes the models, task and options from the run; drop {', '.join(clashes)}")
    cfg = read_run(args.run)
    chat_options = user_template_options(cfg.get("chat_template_options", {}),
                                         f"{Path(args.run) / 'config.json'}: 'chat_template_options'")
    return dict(models=[cfg["model"], str(Path(args.run) / "export")], task=cfg["task"], options=cfg["task_options"],
                chat_options=chat_options,
                max_attempt=args.max_new_tokens or cfg["max_attempt_tokens"],
                max_retry=args.max_new_tokens or cfg["max_retry_tokens"],
                max_reflection=args.max_reflection_tokens or args.max_new_tokens or cfg["max_reflection_tokens"],
                top_p=cfg.get("top_p", 1.0) if args.top_p is None else args.top_p,
                top_k=cfg.get("top_k", 0) if args.top_k is None else args.top_k,
                dtype=args.dtype or cfg.get("dtype", "auto"),
                cut_answers=args.cut_answers or run_cut_answers(args.run, cfg))


@cli_main
def main(argv=None) -> int:
    args = parse_args(argv)
    positive_int("--n", args.n, allow_none=True)
    positive_int("--max-new-tokens", args.max_new_tokens, allow_none=True)
    positive_int("--max-reflection-tokens", args.max_reflection_tokens, allow_none=True)
    positive_int("--batch-size", args.batch_size)
    if args.run is not None:
        check_run_dir(args.run)  # (before --out, which defaults to a path inside it)
    if args.out is None:
        if args.run is None:
            raise R3Error("--out is required (the JSON result file); with --run it defaults to RUN/evaluation.json")
        args.out = str(Path(args.run) / "evaluation.json")
        if Path(args.out).exists() and not partial_path(args.out).exists():  # (else: resuming it)
            raise R3Error(f"{args.out} exists (an earlier evaluation, which r3.report reads); pass --out {args.out} "
                          "to replace it, or another --out")
    out = check_out_path(args.out)
    # a file there already (an earlier evaluation being replaced, or this command's own from an
    # interrupted run) is replaced once every model is done, not model by model: an interruption
    # then leaves the earlier result whole, never a file of only the first models
    write_each_model = not out.exists()
    st = resolve_settings(args)
    models = st["models"]
    check_sampling_args(max(st["max_attempt"], st["max_retry"]), args.temperature, st["top_k"], st["top_p"])
    task = load_task(st["task"], st["options"])
    examples = examples_of(task, args.split, args.n, args.seed)
    if args.n is not None and len(examples) < args.n:
        print(f"note: the {args.split} split has only {len(examples)} examples", file=sys.stderr)
    if not examples:
        raise R3Error(f"task {st['task']!r}: no {args.split} examples")
    if getattr(task, "stand_in_data", False):
        print(f"note: task {st['task']!r} has no data_path: these are generated examples, not real data",
              file=sys.stderr)
    device, dtype = pick_device_dtype(args.device, st["dtype"])
    check_toolchain(device, compiled_decode=args.decode == "compiled")
    first_conversation = task.messages(examples[0])
    for spec in models:  # every path, its positions and its chat template checked before the first model runs
        try:
            config = load_config(spec)
        except R3Error as e:  # (--run: a path the user never typed, read from the run's config)
            if args.run is None:
                raise
            raise R3Error(f"{Path(args.run) / 'config.json'}: the run's "
                          f"{'base model' if spec == models[0] else 'export'}: {e}") from None
        check_token_limits(config, spec, attempt=st["max_attempt"], reflection=st["max_reflection"],
                           retry=st["max_retry"])
        tokenizer = load_tokenizer(spec)
        try:
            ChatFormat(tokenizer, template_options=template_options(st["chat_options"])).prompt(first_conversation)
        except R3Error as e:  # (the template's problem: name the model it came with)
            raise R3Error(f"{spec}: {e}") from None
    sampling = EpisodeSampling(temperature=args.temperature, top_p=st["top_p"], top_k=st["top_k"],
                               max_attempt_tokens=st["max_attempt"], max_reflection_tokens=st["max_reflection"],
                               max_retry_tokens=st["max_retry"], decode=args.decode, cut_answers=st["cut_answers"])
    settings = {
        "split": args.split, "seed": args.seed, "temperature": args.temperature, "top_p": st["top_p"],
        "top_k": st["top_k"], "max_attempt_tokens": st["max_attempt"], "max_retry_tokens": st["max_retry"],
        "max_reflection_tokens": st["max_reflection"], "dtype": dtype_name(dtype), "device": device_name(device),
        "batch_size": args.batch_size, "reflection_prompt": task.reflection_prompt,
        "retry_prompt": task.retry_prompt, "decode": args.decode, "chat_template_options": st["chat_options"],
        "cut_answers": st["cut_answers"],
    }
    task_config = task.config() if hasattr(task, "config") else st["options"]
    identities = [model_files(m) for m in models]
    partial = PartialResults(out, {
        "settings": settings, "task": st["task"], "task_options": st["options"], "task_config": task_config,
        "examples": fingerprint(examples), "records": args.records, "models": identities,
        "code": code_fingerprint(task)})
    # (what r3.report recognises the run's export by when the run directory is moved with it)
    run_identity = {"export_files": identities[-1]["files"]} if args.run else {}
    results: list[dict] = []
    paired: list[dict] = []
    watch = watch_for(device)  # (one for all models: its note is said once)
    with partial.interrupted_note():  # (says that a rerun goes on from the finished batches)
        for spec in models:
            print(f"evaluating {spec} on {st['task']} ({len(examples)} {args.split} queries)", file=sys.stderr)
            model, tok = load_model(spec, dtype, device)
            res = evaluate_examples(
                model, tok, task, examples, sampling, batch_size=args.batch_size, seed=args.seed, records=args.records,
                progress=Progress(len(examples), f"evaluate {spec}", enabled=not args.quiet, watch=watch),
                chat=ChatFormat(tok, template_options=template_options(st["chat_options"])),
                finished=partial.start(spec), on_batch=lambda b, r, spec=spec: partial.add(spec, b, r),
            )
            del model
            release_device_memory(device, compiled=args.decode == "compiled")
            res["time_s"] = round(res["time_s"] + partial.seconds_before(spec), 3)  # (with the kept batches' time)
            try:
                report_verifier_errors(res["verifier_errors"], res["verdicts"], res.pop("first_verifier_error"),
                                       f"evaluating {spec}")
            except R3Error:  # (every verdict an error: batches not worth keeping for a rerun with the task fixed)
                partial.finish()
                raise
            results.append({"model": spec, **res})
            if len(results) > 1:
                base = results[0]
                paired.append({"model": spec, "baseline": base["model"],
                               "first_attempt": paired_difference(base["first_correct"], res["first_correct"]),
                               "second_attempt": paired_difference(base["second_correct"], res["second_correct"])})
            head, last = results[0], results[-1]
            # the top level is the last model's (with --run the export), named by "model", once every
            # model is done: an interrupted file never shows the baseline's numbers as the result
            top = {k: last[k] for k in ("model", "first_attempt_accuracy", "second_attempt_accuracy", "delta")}
            if len(results) < len(models) and not write_each_model:
                continue
            write_json_atomic(out, {
                **(top if len(results) == len(models) else {}), "task": st["task"], "task_options": st["options"],
                "task_config": task_config, "run": args.run, "cwd": os.getcwd(), "synthetic_data": bool(getattr(task, "synthetic", False)),
                "n": head["n"], "settings": settings, "models": results, "paired": paired, **run_identity,
                "first_query_messages": first_conversation,
            })
    partial.finish()
    print(format_table(results, paired))
    print(f"[{len(examples)} {args.split} queries of {st['task']}; wrote {out}]", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
