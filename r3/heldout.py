"""Held-out accuracy at the first attempt and after one reflection + retry (the paper's table),
through the same episode code as training (:func:`r3.episode.run_episode` with ``group_size=1``),
so evaluation and training build exactly the same conversations. ``python -m r3.evaluate`` is its
command line; the training loop calls it for ``--eval-n``."""

from __future__ import annotations

import time

from r3.chat import ChatFormat
from r3.episode import EpisodeSampling, run_episode
from r3.errors import positive_int
from r3.progress import Progress
from r3.stats import binomial_stderr
from r3.tasks.base import verifier_error_counts

GREEDY = EpisodeSampling(temperature=0.0, max_attempt_tokens=256, max_reflection_tokens=256, max_retry_tokens=256)


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
) -> dict:
    """First attempt, then (for failures) one reflection and one retry, for every example.

    ``sampling``: the same settings object training uses (default :data:`GREEDY`: greedy, 256
    tokens for each part; training evaluates with ``TrainConfig.sampling(eval_temperature)``).
    Examples are run in batches of ``batch_size`` through :func:`r3.episode.run_episode`
    (``group_size=1``).

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
    """
    batch_size = positive_int("batch_size", batch_size)
    sampling = sampling or GREEDY
    chat = chat or ChatFormat(tokenizer)
    if progress is True:
        progress = Progress(len(examples), "evaluate")
    t0 = time.perf_counter()
    first = second = generated = 0
    first_correct: list[bool] = []
    second_correct: list[bool] = []
    out_records: list[dict] = []
    for b, lo in enumerate(range(0, len(examples), batch_size)):
        batch = examples[lo: lo + batch_size]
        ep = run_episode(model, tokenizer, task, batch, group_size=1, sampling=sampling,
                         seed=None if seed is None else seed + b, chat=chat)
        retry_ok = [bool(r) for r in ep.rewards[:, 0].tolist()] if ep.rewards.numel() else []
        first += ep.first_success
        second += ep.first_success + sum(retry_ok)
        generated += ep.generated_tokens
        by_index = {gi: g for g, gi in enumerate(ep.group_indices)}
        for i in range(len(batch)):
            first_correct.append(bool(ep.first_passed[i]))
            second_correct.append(bool(ep.first_passed[i]) or (i in by_index and retry_ok[by_index[i]]))
        if records:
            diagnose = getattr(task, "diagnose", None)  # the verifier's reason (a duck-typed task may not say)
            for i, ex in enumerate(batch):
                attempt = chat.decode(ep.first_attempts[i])
                rec = {"example": ex, "attempt": attempt, "attempt_correct": ep.first_passed[i]}
                if callable(diagnose):
                    rec["attempt_reason"] = diagnose(ex, attempt)
                if i in by_index:
                    row = ep.records[by_index[i]]  # group_size 1: group g is row g
                    start, end = ep.spans[by_index[i]]
                    rec.update(reflection=row["reflection"], reflection_tokens=end - start, retry=row["retry"],
                               retry_correct=retry_ok[by_index[i]])
                    if callable(diagnose):
                        rec["retry_reason"] = diagnose(ex, row["retry"])
                out_records.append(rec)
        if progress:
            progress.update(min(lo + batch_size, len(examples)),
                            f"acc 1st {first / (lo + len(batch)):.3f}, 2nd {second / (lo + len(batch)):.3f}")
    if progress:
        progress.close()
    n = len(examples)
    errors, verdicts, first_error = verifier_error_counts(task)  # (the caller reports them)
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
