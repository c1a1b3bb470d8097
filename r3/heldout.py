"""Held-out accuracy at the first attempt and after one reflection + retry (the paper's table),
through the same episode code as training (:func:`r3.episode.run_episode` with ``group_size=1``),
so evaluation and training build exactly the same conversations. ``python -m r3.evaluate`` is its
command line; the training loop calls it for ``--eval-n``."""

from __future__ import annotations

import time
from typing import Callable

from r3.chat import ChatFormat
from r3.episode import EpisodeSampling, run_episode
from r3.errors import R3Error, positive_int
from r3.progress import Progress
from r3.stats import binomial_stderr
from r3.tasks.base import verifier_error_counts

GREEDY = EpisodeSampling(temperature=0.0, max_attempt_tokens=256, max_reflection_tokens=256, max_retry_tokens=256)


def evaluate_batch(model, tokenizer, task, batch: list[dict], sampling: EpisodeSampling, *, seed: int | None,
                   chat: ChatFormat, records: bool) -> dict:
    """One batch of :func:`evaluate_examples`, as JSON-able values: ``first_correct`` and
    ``second_correct`` (one verdict per example), ``generated_tokens``, ``verifier`` (errors,
    verdicts and the first error since the last look) and, with ``records``, ``records``."""
    ep = run_episode(model, tokenizer, task, batch, group_size=1, sampling=sampling, seed=seed, chat=chat)
    retry_ok = [bool(r) for r in ep.rewards[:, 0].tolist()] if ep.rewards.numel() else []
    by_index = {gi: g for g, gi in enumerate(ep.group_indices)}
    first_correct = [bool(ep.first_passed[i]) for i in range(len(batch))]
    second_correct = [first_correct[i] or (i in by_index and retry_ok[by_index[i]]) for i in range(len(batch))]
    out_records = []
    if records:  # (each reason is its verdict's own; None: a duck-typed task that gives none)
        for i, ex in enumerate(batch):
            attempt = chat.decode(ep.first_attempts[i])
            rec = {"example": ex, "attempt": attempt, "attempt_correct": first_correct[i], "attempt_cut": ep.first_cut[i]}
            if ep.first_reasons[i] is not None:
                rec["attempt_reason"] = ep.first_reasons[i]
            if i in by_index:
                row = ep.records[by_index[i]]  # group_size 1: group g is row g
                start, end = ep.spans[by_index[i]]
                rec.update(reflection=row["reflection"], reflection_tokens=end - start, retry=row["retry"],
                           retry_correct=retry_ok[by_index[i]], reflection_cut=row["reflection_cut"],
                           retry_cut=row["retry_cut"])
                if row["reason"] is not None:
                    rec["retry_reason"] = row["reason"]
            out_records.append(rec)
    result = {"first_correct": first_correct, "second_correct": second_correct,
              "generated_tokens": int(ep.generated_tokens), "verifier": list(verifier_error_counts(task))}
    if records:
        result["records"] = out_records
    return result


def evaluate_examples(
    model,
    tokenizer,
    task,
    examples: list[dict],
    sampling: EpisodeSampling | None = None,
    *,
    batch_size: int = 16,
    seed: int = 0,
    records: bool = False,
    progress: Progress | bool | None = None,
    chat=None,
    finished: dict[int, dict] | None = None,
    on_batch: Callable[[int, dict], None] | None = None,
) -> dict:
    """First attempt, then (for failures) one reflection and one retry, for every example.

    ``sampling``: the same settings object training uses (default :data:`GREEDY`: greedy, 256
    tokens for each part; training evaluates with ``TrainConfig.sampling(eval_temperature)``).
    Examples are run in batches of ``batch_size`` through :func:`r3.episode.run_episode`
    (``group_size=1``), batch ``b`` with seed ``seed + b``.

    Returns ``{"n", "verifier_errors", "verdicts", "first_verifier_error", "first_success",
    "second_success", "first_attempt_accuracy", "second_attempt_accuracy", "delta",
    "first_attempt_stderr", "second_attempt_stderr", "first_correct", "second_correct",
    "generated_tokens", "time_s"}`` (``*_correct``: one verdict per example, in order, for paired
    comparisons; ``verifier_errors`` of ``verdicts`` failed, for the caller to report with
    :func:`r3.tasks.base.report_verifier_errors`) and, with
    ``records=True``, ``"records"``: one dict per example with the attempt, its verdict and, when
    it failed, the reflection (and its length in tokens), the retry and the retry's verdict, with
    the verifier's reasons (``attempt_reason``, ``retry_reason``) where the task gives them. ``progress``: a
    :class:`Progress`, True for a default one on stderr, or None/False for none.

    ``finished``: batches already evaluated (:func:`evaluate_batch`'s results by batch index, from
    an interrupted run), taken as they are; ``on_batch(b, result)`` is called for each batch
    evaluated here. ``time_s`` is this call's time.
    """
    batch_size = positive_int("batch_size", batch_size)
    sampling = sampling or GREEDY
    chat = chat or ChatFormat(tokenizer)
    finished = finished or {}
    if progress is True:
        progress = Progress(len(examples), "evaluate")
    t0 = time.perf_counter()
    starts = range(0, len(examples), batch_size)
    if progress and finished:
        progress.resume(sum(len(examples[lo: lo + batch_size]) for b, lo in enumerate(starts) if b in finished))
    first = second = generated = errors = verdicts = 0
    first_error = None
    first_correct: list[bool] = []
    second_correct: list[bool] = []
    out_records: list[dict] = []
    for b, lo in enumerate(starts):
        batch = examples[lo: lo + batch_size]
        res = finished.get(b)
        if res is not None and not (isinstance(res, dict) and all(
                isinstance(res.get(k), list) and len(res[k]) == len(batch)
                for k in ("first_correct", "second_correct", *(("records",) if records else ())))):
            raise R3Error(f"finished batch {b} read back does not hold results for its {len(batch)} examples "
                          "(a damaged partial results file?)")
        if res is None:
            res = evaluate_batch(model, tokenizer, task, batch, sampling, seed=None if seed is None else seed + b,
                                 chat=chat, records=records)
            if on_batch:
                on_batch(b, res)
        first_correct += res["first_correct"]
        second_correct += res["second_correct"]
        first += sum(res["first_correct"])
        second += sum(res["second_correct"])
        generated += res["generated_tokens"]
        errors, verdicts = errors + res["verifier"][0], verdicts + res["verifier"][1]
        first_error = first_error or res["verifier"][2]
        out_records += res.get("records", [])
        if progress and b not in finished:
            progress.update(min(lo + batch_size, len(examples)),
                            f"acc 1st {100 * first / (lo + len(batch)):.1f}%, 2nd {100 * second / (lo + len(batch)):.1f}%")
    if progress:
        progress.close()
    n = len(examples)
    errors_now = verifier_error_counts(task)  # (any since the last batch; the caller reports them)
    errors, verdicts, first_error = errors + errors_now[0], verdicts + errors_now[1], first_error or errors_now[2]
    result = {
        "n": n,
        "verifier_errors": errors,
        "verdicts": verdicts,
        "first_verifier_error": first_error,
        "first_success": first,
        "second_success": second,
        "first_attempt_accuracy": first / n if n else 0.0,
        "second_attempt_accuracy": second / n if n else 0.0,
        "delta": (second - first) / n if n else 0.0,
        "first_attempt_stderr": binomial_stderr(first, n),
        "second_attempt_stderr": binomial_stderr(second, n),
        "first_correct": first_correct,
        "second_correct": second_correct,
        "generated_tokens": generated,
        "time_s": round(time.perf_counter() - t0, 3),
    }
    if records:
        result["records"] = out_records
    return result
