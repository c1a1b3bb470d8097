"""The dataset of failures: sample up to K attempts per query and keep the queries the model fails.

``python -m r3.failures --model M --task T --samples K --out F.jsonl [--n N] [--split train] ...``

For each query, attempts are sampled until the first one that fails the verifier (at most K).
Sampling is batched by rounds: round ``r`` draws ``min(2**r, K - done, --batch-size)`` attempts for
every query that has passed all its attempts so far (one :func:`r3.sampler.generate` call per
batch of queries, the prompt prefilled once and shared by its samples), so a weak model finishes in
one round and a strong one needs about ``log2(K)`` rounds, not K.

Files (all lines ASCII JSON, appended whole and flushed after every batch):

* ``F.jsonl`` -- one record per query that failed, what ``r3.train --failures F.jsonl`` reads::

      {"key": "...", "example": {...}, "attempt_tokens": [ids], "attempt_text": "...",
       "attempts_before_failure": k, "samples": k + 1, "finished": true}

  ``attempt_tokens`` are the failed attempt's generated token ids (the stop token included when
  it was sampled), exactly as the sampler produced them after the prompt
  ``ChatFormat(tokenizer, template_options=...).prompt(task.messages(example))``. An attempt
  ends where a training attempt does: at a stop id or at the task's stop strings (Countdown with
  answer tags: the first ``</answer>``).
* ``F.jsonl.done`` -- a header line ``{"r3_failures": 1, "settings": {...}}`` (model, task, task
  options, chat template options, sampling settings of the first run), then one line ``{"key": "...", "samples": K}``
  per query that passed all its K attempts.

* ``F.jsonl.progress`` -- while a run goes on, one line ``{"key": "...", "passed": n}`` per query
  that passed all ``n`` attempts drawn so far and is sampled again in a later round (the last
  line of a key wins); removed when every query is in one of the two files above.

``key`` is a hash of the example's canonical JSON. A rerun with the same ``--out`` skips every query
whose key is in either file (resume), and a query in the progress file goes on from the attempts
it passed, in the round an uninterrupted run would be in (other seeds: ``_round_seed``'s salt), so
its record counts all its attempts, at most K (only the batch in flight at the stop is drawn again); with another model, task, task options, split or chat
template options it is refused, with other sampling settings it warns. A crash can at worst leave the last line of a file cut short:
it is dropped, with a warning, when the file is next opened. Prints the failure rate and how many
samples it took.
"""

from __future__ import annotations

import hashlib
import sys
import time

from r3.chat import ChatFormat, template_options
from r3.checkpoint import canonical_model, load_config
from r3.config import TrainConfig
from r3.cpu_share import watch_for
from r3.cli import (
    DTYPES,
    ArgumentParser,
    Progress,
    check_out_path,
    dtype_name,
    load_model,
    load_task,
    parse_chat_template_options,
    parse_task_options,
    pick_device_dtype,
    positive_int,
)
from r3.episode import CUT_ANSWERS, DEFAULT_CUT_ANSWERS, answer_stops, failed_unread
from r3.errors import R3Error, cli_main
from r3.failure_data import (  # noqa: F401  (the file format's names, re-exported)
    FORMAT_VERSION,
    FailureFile,
    append_lines,
    done_path,
    example_key,
    progress_path,
    read_failures,
    read_jsonl,
)
from r3.model import check_token_limits
from r3.sampler import check_sampling_args, generate, sampling_vocab_size
from r3.tasks import examples_of
from r3.tasks.base import passes as task_passes, report_verifier_errors, stop_strings_of, verifier_error_counts

# --------------------------------------------------------------------------------------------
# Sampling
# --------------------------------------------------------------------------------------------


def _round_seed(seed: int, round_: int, batch: int, salt: int = 0) -> int:
    """A batch's sampling seed; ``salt`` (a resumed run's: how much the files held) keeps it from
    repeating the seeds of the run it goes on from for other queries."""
    tail = f":{salt}" if salt else ""
    return int.from_bytes(hashlib.sha256(f"r3.failures:{seed}:{round_}:{batch}{tail}".encode()).digest()[:7], "big")


def _rounds_before(passed: int, batch_size: int) -> int:
    """The rounds after which a query has passed ``passed`` attempts (rounds draw 1, 2, 4, ...
    attempts, at most ``batch_size``); where no count of rounds gives exactly that, the first after."""
    rounds = done = 0
    while done < passed:
        done += min(2**rounds, batch_size)
        rounds += 1
    return rounds


def find_failures(
    model,
    tokenizer,
    task,
    examples: list[dict],
    *,
    samples: int,
    max_new_tokens: int = 256,
    temperature: float = 1.0,
    top_p: float = 1.0,
    top_k: int = 0,
    batch_size: int = 16,
    seed: int = 0,
    on_batch=None,
    progress: Progress | None = None,
    chat=None,
    passed_before: dict[str, int] | None = None,
    on_progress=None,
    seed_salt: int = 0,
    cut_answers: str = DEFAULT_CUT_ANSWERS,
) -> dict:
    """Sample up to ``samples`` attempts per example, stopping at each example's first failure.

    After every batch, ``on_batch(failures, passed)`` gets the new failure records (see the
    module docstring) and the records ``{"key", "id", "samples"}`` of examples that passed all
    their attempts, and ``on_progress(records)`` ``{"key", "passed"}`` for those that passed
    every attempt so far and go on to the next round. ``passed_before``: key -> attempts a stopped
    run's query already passed (it goes on from there; ``seed_salt`` then keeps the seeds from
    repeating that run's). Returns ``{"queries", "failed", "passed", "samples_needed", "samples_drawn",
    "generated_tokens"}``; ``samples_needed`` counts attempts up to and including each first
    failure (``samples`` for queries that never failed), ``samples_drawn`` all attempts sampled
    (rounds of several samples per query may draw a few past the first failure). ``cut_answers``:
    as in training (:data:`r3.episode.CUT_ANSWERS`), "fail" counts an attempt the token limit cut
    off as a failure unread."""
    samples = positive_int("samples", samples)
    if cut_answers not in CUT_ANSWERS:
        raise R3Error(f"cut_answers must be one of {', '.join(CUT_ANSWERS)}, got {cut_answers!r}")
    batch_size = positive_int("batch_size", batch_size)
    chat = chat or ChatFormat(tokenizer)
    vocab = sampling_vocab_size(model, tokenizer)
    prompts = [chat.prompt(task.messages(ex)) for ex in examples]
    keys = [example_key(ex) for ex in examples]
    stops = answer_stops(task, chat)  # (the task's stop strings end an attempt, as in training)
    stats = dict(queries=len(examples), failed=0, passed=0, samples_needed=0, samples_drawn=0, generated_tokens=0)
    verifier_error_counts(task)  # (counted from here)
    errors = verdicts = 0
    first_error = None
    resolved = 0
    # Queries a stopped run had already sampled go on from the attempts they passed (a group per
    # count, each from the round an uninterrupted run would be in); a fresh run is one group at 0.
    groups: dict[int, list[int]] = {}
    for i, k in enumerate(keys):
        groups.setdefault(int((passed_before or {}).get(k, 0)), []).append(i)
    for start in sorted(groups):
        pending = groups[start]
        passed_so_far = start  # attempts every pending query of the group has passed
        round_ = _rounds_before(start, batch_size)
        if passed_so_far >= samples:  # (a rerun that asks for fewer attempts than these passed)
            passes = [{"key": keys[i], "id": examples[i].get("id"), "samples": passed_so_far} for i in pending]
            stats["passed"] += len(passes)
            stats["samples_needed"] += passed_so_far * len(passes)
            resolved += len(passes)
            if on_batch is not None:
                on_batch([], passes)
            continue
        while pending:
            m = min(2**round_, samples - passed_so_far, batch_size)  # samples per query this round
            per_batch = max(1, batch_size // m)
            survivors = []
            for b, lo in enumerate(range(0, len(pending), per_batch)):
                idx = pending[lo: lo + per_batch]
                out = generate(model, [prompts[i] for i in idx], max_new_tokens=max_new_tokens, temperature=temperature,
                               top_p=top_p, top_k=top_k, num_samples=m, stop_token_ids=chat.stop_ids,
                               stop_strings=stops, seed=_round_seed(seed, round_, b, seed_salt), vocab_size=vocab)
                stats["samples_drawn"] += len(out.tokens)
                stats["generated_tokens"] += out.new_tokens
                fails, passes, going_on = [], [], []
                for j, i in enumerate(idx):
                    ex = examples[i]
                    for s in range(m):
                        toks = out.tokens[j * m + s]
                        text = chat.decode(toks)
                        finished = bool(out.finished[j * m + s])
                        if failed_unread(finished, cut_answers) or not task_passes(task, ex, text):
                            k = passed_so_far + s
                            fails.append({"key": keys[i], "example": ex, "attempt_tokens": list(toks), "attempt_text": text,
                                          "attempts_before_failure": k, "samples": k + 1,
                                          "finished": finished})
                            stats["samples_needed"] += k + 1
                            break
                    else:
                        if passed_so_far + m >= samples:
                            passes.append({"key": keys[i], "id": ex.get("id"), "samples": samples})
                            stats["samples_needed"] += samples
                        else:
                            going_on.append(i)
                survivors += going_on
                n, calls, first = verifier_error_counts(task)
                errors, verdicts, first_error = errors + n, verdicts + calls, first_error or first
                if errors and errors >= verdicts:  # (every verdict so far an error: stop before writing them as failures)
                    report_verifier_errors(errors, verdicts, first_error, "while sampling failures")
                stats["failed"] += len(fails)
                stats["passed"] += len(passes)
                resolved += len(fails) + len(passes)
                if on_batch is not None:
                    on_batch(fails, passes)
                if on_progress is not None and going_on:
                    on_progress([{"key": keys[i], "passed": passed_so_far + m} for i in going_on])
                if progress is not None:
                    progress.update(resolved, f"round {round_ + 1} ({m} sample{'s' if m > 1 else ''}/query), "
                                    f"failed {stats['failed']}, never failed {stats['passed']}, "
                                    f"{stats['samples_drawn']} samples drawn")
            pending = survivors
            passed_so_far += m
            round_ += 1
    if progress is not None:
        progress.close()
    report_verifier_errors(errors, verdicts, first_error, "while sampling failures")
    return stats


# --------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------


def parse_args(argv=None):
    p = ArgumentParser(prog="python -m r3.failures", description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m", help="HF directory, .gguf file or built-in name (default: smollm2-135m)")
    p.add_argument("--task", default="countdown", help="task name or plug-in 'package.module:Class' (default: countdown)")
    p.add_argument("--task-option", action="append", default=[], metavar="KEY=VALUE",
                   help="a task option (value parsed as JSON when possible); repeatable")
    p.add_argument("--chat-template-option", action="append", default=[], metavar="KEY=VALUE",
                   help="passed to the chat template, over enable_thinking=false (Qwen3's thinking mode: "
                        "enable_thinking=true); repeatable; r3.train needs the same")
    p.add_argument("--samples", type=int, default=8, help="K: attempts per query at most (default: 8; the paper: up to 64)")
    p.add_argument("--out", required=True, help="the failure dataset (JSONL); F.jsonl.done lists queries that never failed")
    p.add_argument("--n", type=int, default=None, help="queries (default: the task's whole split)")
    p.add_argument("--split", default="train", help="default: train")
    p.add_argument("--seed", type=int, default=0, help="which examples, and the sampling seed (default: 0)")
    # (sampled as r3.train samples its first attempts by default, so the failures are the ones a
    # training run meets: at temperature 1 and 256 tokens the built-in model's attempts are noise)
    p.add_argument("--temperature", type=float, default=TrainConfig.temperature,
                   help=f"default: {TrainConfig.temperature}, as r3.train's rollouts")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling (default: 1.0 = off)")
    p.add_argument("--top-k", type=int, default=0, help="top-k sampling (default: 0 = off)")
    p.add_argument("--max-new-tokens", type=int, default=TrainConfig.max_attempt_tokens,
                   help=f"attempt length limit (default: {TrainConfig.max_attempt_tokens}, r3.train's --max-attempt-tokens)")
    p.add_argument("--cut-answers", choices=CUT_ANSWERS, default=DEFAULT_CUT_ANSWERS,
                   help="an attempt the token limit cut off: count it as failed (default), or judge it as it stands")
    p.add_argument("--batch-size", type=int, default=16, help="sampled rows per batch (default: 16)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="auto",
                   help="default: auto, bf16 where the device multiplies it natively, else fp32")
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p.add_argument("--quiet", action="store_true", help="no progress line")
    return p.parse_args(argv)


@cli_main
def main(argv=None) -> int:
    args = parse_args(argv)
    positive_int("--samples", args.samples)
    positive_int("--n", args.n, allow_none=True)
    positive_int("--max-new-tokens", args.max_new_tokens)
    positive_int("--batch-size", args.batch_size)
    check_sampling_args(args.max_new_tokens, args.temperature, args.top_k, args.top_p)
    if args.temperature == 0 and args.samples > 1:
        raise R3Error("--temperature 0 is greedy: every sample of a query would be the same; use --samples 1")
    out = check_out_path(args.out)
    options = parse_task_options(args.task_option)
    task = load_task(args.task, options)
    examples = examples_of(task, args.split, args.n, args.seed)
    if not examples:
        raise R3Error(f"task {args.task!r}: no {args.split} examples")
    device, dtype = pick_device_dtype(args.device, args.dtype)
    # a bad path or token limit is an error even when there is nothing left to sample
    check_token_limits(load_config(args.model), args.model, attempt=args.max_new_tokens)
    store = FailureFile(out)
    chat_options = parse_chat_template_options(args.chat_template_option)
    settings = {"model": canonical_model(args.model), "task": args.task, "task_options": options, "chat_template_options": chat_options,
                "split": args.split,
                "seed": args.seed, "n": args.n, "samples": args.samples, "temperature": args.temperature,
                "top_p": args.top_p, "top_k": args.top_k, "max_new_tokens": args.max_new_tokens, "dtype": dtype_name(dtype),
                "attempt_stop_strings": list(stop_strings_of(task)), "cut_answers": args.cut_answers}
    store.open(settings)
    try:
        return _sample_the_rest(args, task, examples, out, store, dtype, device, chat_options)
    finally:
        store.close()


def _sample_the_rest(args, task, examples: list[dict], out, store: FailureFile, dtype, device,
                     chat_options: dict) -> int:
    """The queries the files do not hold yet, sampled and appended; prints the summary."""
    seen = store.keys()
    keys = [example_key(ex) for ex in examples]
    distinct: dict[str, dict] = {}  # key -> example, in order (a repeated example is one query, one record)
    for k, ex in zip(keys, examples):
        distinct.setdefault(k, ex)
    if len(distinct) < len(examples):  # (a data file with repeated rows)
        print(f"note: {len(examples) - len(distinct)} of the {len(examples)} {args.split} queries repeat an "
              "earlier one (the same example); each distinct query is sampled once", file=sys.stderr)
    todo = [ex for k, ex in distinct.items() if k not in seen]
    going_on = {k: v for k, v in store.progress.items() if k in distinct and k not in seen}
    if len(todo) < len(distinct) or going_on:
        print(f"resuming {out}: {len(distinct) - len(todo)} of {len(distinct)} queries already done, "
              f"{len(todo)} to sample" + (f" ({len(going_on)} go on from the attempts they passed)" if going_on else ""),
              file=sys.stderr)
    t0 = time.perf_counter()
    drawn = 0
    if todo:
        if args.n is None:
            print(f"note: no --n: all {len(examples)} {args.split} queries of {args.task!r} (--n N takes the first N)",
                  file=sys.stderr)
        model, tok = load_model(args.model, dtype, device)
        drawn = find_failures(
            model, tok, task, todo, samples=args.samples, max_new_tokens=args.max_new_tokens,
            temperature=args.temperature, top_p=args.top_p, top_k=args.top_k, batch_size=args.batch_size,
            seed=args.seed, on_batch=store.add, chat=ChatFormat(tok, template_options=template_options(chat_options)),
            progress=Progress(len(todo), "failures", enabled=not args.quiet, watch=watch_for(device)),
            passed_before=going_on, on_progress=store.add_progress,
            seed_salt=len(seen) + len(store.progress), cut_answers=args.cut_answers,
        )["samples_drawn"]
    store.finished()
    summary = summarize(store, set(keys), new=len(todo), drawn=drawn, elapsed=time.perf_counter() - t0)
    print(summary["line"])
    return 0


def summarize(store: FailureFile, keys: set[str], *, new: int, drawn: int, elapsed: float) -> dict:
    """The failure rate and samples needed over the queries ``keys`` (from the files)."""
    failed = {r["key"]: r for r in store.failures if r["key"] in keys}
    passed = {r["key"]: r for r in store.done_records if r["key"] in keys and r["key"] not in failed}
    q = len(failed) + len(passed)
    needed = sum(int(r.get("samples", r.get("attempts_before_failure", 0) + 1)) for r in failed.values()) + \
        sum(int(r.get("samples", 0)) for r in passed.values())
    rate = len(failed) / q if q else 0.0
    line = (f"{len(failed)}/{q} queries failed at least once (failure rate {100 * rate:.1f}%); "
            f"samples needed {needed} ({needed / q if q else 0:.2f} per query); "
            f"{new} sampled in this run ({drawn} samples drawn, {elapsed:.1f}s), {q - new} resumed; "
            f"{len(store.failures)} failures in {store.out}")
    return {"queries": q, "failed": len(failed), "never_failed": len(passed), "failure_rate": rate,
            "samples_needed": needed, "new": new, "samples_drawn": drawn, "line": line}


if __name__ == "__main__":
    sys.exit(main())
