"""The Reflect-Retry-Reward episode: attempt, reflect (G samples), retry, verify.

For a batch of queries: first attempts are sampled in one batch; each failed attempt's
conversation gets the reflection prompt and is prefilled once, then forked into G rows that each
sample a reflection; each reflection gets the retry prompt and one retry, continuing the same KV
cache. The verifier's verdict on the retry is the reflection's reward (1 or 0).

Sequences are built from token ids only (the chat template is rendered once per prompt, turn
separators are tokenised once), never by re-rendering text, so there is no re-tokenisation drift:
the ids the loss sees are exactly the ids the sampler produced. The reflection span of each row
is ``[start, end)`` over exactly the reflection's generated tokens (its end-of-turn token
included when sampled).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from r3.chat import ChatFormat
from r3.errors import R3Error, positive_int
from r3.sampler import Session, StopStrings, sampling_vocab_size
from r3.tasks.base import judge, leading_reasoning_end, stop_strings_of


# How an answer (first attempt or retry) that the token limit ended is judged: "fail" (the
# default) counts it as failed, unread: only answers the model ended are paid. "judge" reads the
# text as it stands, so a retry cut right after "28 + 12" passes for target 40 although the model
# might have gone on (to "= 41", or past a wrong answer it wrote before the cut).
CUT_ANSWERS = ("judge", "fail")
DEFAULT_CUT_ANSWERS = "fail"
CUT_REASON = "cut off at the token limit before the model ended it (cut_answers: fail)"


@dataclass
class EpisodeSampling:
    """How every part of an episode is sampled: one object for training's rollouts, its held-out
    evaluation, ``r3.evaluate`` and the learning-curve benchmark (``TrainConfig.sampling()``)."""

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    max_attempt_tokens: int = 256
    max_reflection_tokens: int = 128
    max_retry_tokens: int = 256
    decode: str = "eager"  # eager | compiled: the sampler's decode step (see r3.decode)
    compact: bool = True  # drop stopped rows from decode batches (the same samples, less work)
    cut_answers: str = DEFAULT_CUT_ANSWERS  # how an answer the token limit cut off is judged

    def __post_init__(self):
        for name in ("max_attempt_tokens", "max_reflection_tokens", "max_retry_tokens"):
            positive_int(name, getattr(self, name))
        if self.cut_answers not in CUT_ANSWERS:
            raise R3Error(f"cut_answers must be one of {', '.join(CUT_ANSWERS)}, got {self.cut_answers!r}")


def failed_unread(finished: bool, cut_answers: str) -> bool:
    """Whether an answer fails without its text being read: the token limit ended it (``finished``
    false) under ``cut_answers="fail"``."""
    return not finished and cut_answers == "fail"


def judge_answer(task, example: dict, text: str, finished: bool, cut_answers: str) -> tuple[bool, str | None]:
    """The verdict on one answer: :func:`r3.tasks.base.judge`, or :data:`CUT_REASON`'s failure
    where :func:`failed_unread`."""
    if failed_unread(finished, cut_answers):
        return False, CUT_REASON
    return judge(task, example, text)


@dataclass
class Episode:
    """One batch of episodes. Rows are group-major: row ``g * G + j`` is reflection ``j`` of
    failed query ``g``."""

    sequences: list[list[int]]  # whole conversation per reflection sample
    spans: list[tuple[int, int]]  # reflection tokens [start, end) in each sequence
    rewards: torch.Tensor  # [n_groups, G] float32, 1 = the retry passed
    queries: int  # first attempts made (0 when starting from stored failures)
    first_success: int  # of those, how many passed (no training signal; counted)
    group_examples: list[dict]  # the failed example of each group
    generated_tokens: int  # all tokens sampled (attempts, reflections, retries)
    records: list[dict] = field(default_factory=list)  # texts for logging, one per row
    # Index into ``examples`` of each group's example, and each group's failed attempt (token ids).
    group_indices: list[int] = field(default_factory=list)
    attempts: list[list[int]] = field(default_factory=list)
    # Every first attempt made and its verdict, one per example (empty with ``failed_attempts``).
    first_attempts: list[list[int]] = field(default_factory=list)
    first_passed: list[bool] = field(default_factory=list)
    first_reasons: list[str | None] = field(default_factory=list)  # the verifier's reason for each first_passed
    first_cut: list[bool] = field(default_factory=list)  # each first attempt cut off by the token limit
    # Per row: the sampler's log-prob of each reflection / retry token (see r3.sampler), and
    # the retry tokens' span [start, end) in the sequence (the retry runs to the sequence's end).
    reflection_logprobs: list[list[float]] = field(default_factory=list)
    retry_logprobs: list[list[float]] = field(default_factory=list)
    retry_spans: list[tuple[int, int]] = field(default_factory=list)
    # Wall seconds of each part: "attempt" / "reflection" / "retry" (prefill of its turn + decode).
    times: dict = field(default_factory=dict)

    @property
    def group_size(self) -> int:
        return self.rewards.shape[1] if self.rewards.numel() else 0

    def reflection_mask(self, i: int) -> list[int]:
        start, end = self.spans[i]
        return [1 if start <= p < end else 0 for p in range(len(self.sequences[i]))]


def turn_text(task, kind: str, example: dict) -> str:
    """The text of the user turn that asks for a reflection (``kind="reflection"``) or a retry
    after ``example``'s failed attempt: ``task.reflection_message(example)`` /
    ``task.retry_message(example)``, or the plain ``reflection_prompt`` / ``retry_prompt`` of a
    plug-in that has no such method."""
    method = getattr(task, f"{kind}_message", None)
    if method is None:
        return getattr(task, f"{kind}_prompt")
    message = method(example)
    return message["content"] if isinstance(message, dict) else str(message)


def answer_stops(task, chat: ChatFormat) -> StopStrings | None:
    """What ends an answer turn besides the stop ids: the task's ``stop_strings`` (a plug-in
    without the attribute has none), read as the verifiers read the reply: where the assistant
    message (``chat.decode``: the reply after any reasoning block the generation prompt opened)
    opens a reasoning block, a stop string counts only after the block's first ``</think>``, so
    one written inside the reasoning does not cut it off before its answer."""
    strings = stop_strings_of(task)
    if not strings:
        return None

    def after_reasoning(ids: list[int]) -> bool:
        text = chat.decode(ids)
        end = leading_reasoning_end(text)
        return end is not None and any(x in text[end:] for x in strings)

    return StopStrings(strings, lambda ids: chat.tok.decode(ids, skip_special_tokens=True), confirm=after_reasoning)


def _presize(prompts, sampling: EpisodeSampling, turn_budget: int) -> int:
    return max(len(p) for p in prompts) + sampling.max_attempt_tokens + sampling.max_reflection_tokens + sampling.max_retry_tokens + turn_budget


def run_episode(
    model,
    tokenizer,
    task,
    examples: list[dict],
    *,
    group_size: int,
    max_failures: int | None = None,
    sampling: EpisodeSampling | None = None,
    seed: int | None = None,
    failed_attempts: list[list[int]] | None = None,
    chat: ChatFormat | None = None,
) -> Episode:
    """Attempt every example (or start from ``failed_attempts``, the stored attempt token ids of
    each example), keep up to ``max_failures`` failures, sample ``group_size`` reflections per
    failure and one retry per reflection; reward = the retry passes."""
    sampling = sampling or EpisodeSampling()
    chat = chat or ChatFormat(tokenizer)
    vocab = sampling_vocab_size(model, tokenizer)
    stops = chat.stop_ids
    kw = dict(temperature=sampling.temperature, top_p=sampling.top_p, top_k=sampling.top_k, stop_token_ids=stops)
    # Answer turns (attempt, retry) also end at the task's stop strings; reflections do not.
    answer_kw = dict(kw, stop_strings=answer_stops(task, chat))
    if not examples:
        return Episode([], [], torch.zeros((0, group_size)), 0, 0, [], 0)
    prompts = [chat.prompt(task.messages(ex)) for ex in examples]
    reflect_text = [turn_text(task, "reflection", ex) for ex in examples]
    retry_text = [turn_text(task, "retry", ex) for ex in examples]
    turn_budget = (max(len(chat.user_turn(t)) for t in reflect_text)
                   + max(len(chat.user_turn(t)) for t in retry_text) + 2)
    generated = 0
    times = {}

    if failed_attempts is None:
        session = Session.start(model, prompts, max_len=_presize(prompts, sampling, turn_budget), vocab_size=vocab, seed=seed,
                                decode=sampling.decode, compact=sampling.compact)
        first = session.sample(sampling.max_attempt_tokens, **answer_kw)
        times["attempt"] = session.prefill_s + first.decode_s
        generated += first.new_tokens
        t_verify = time.perf_counter()
        verdicts = [judge_answer(task, ex, chat.decode(t), fin, sampling.cut_answers)
                     for ex, t, fin in zip(examples, first.tokens, first.finished)]
        times["verify"] = time.perf_counter() - t_verify
        passed = [ok for ok, _ in verdicts]
        failed = [i for i, ok in enumerate(passed) if not ok]
        if max_failures is not None:
            failed = failed[:max_failures]
        queries, first_success = len(examples), sum(passed)
        first_attempts, first_passed = [list(t) for t in first.tokens], passed
        first_reasons = [why for _, why in verdicts]
        first_cut = [not f for f in first.finished]
        if not failed:
            return Episode([], [], torch.zeros((0, group_size)), queries, first_success, [], generated,
                           first_attempts=first_attempts, first_passed=first_passed, first_reasons=first_reasons,
                           first_cut=first_cut,
                           times=times)
        attempts = [first.tokens[i] for i in failed]
        closed = [chat.ends_turn(first.tokens[i]) for i in failed]
        session = session.select(failed)
    else:
        if len(failed_attempts) != len(examples):
            raise ValueError("failed_attempts must match examples one to one")
        failed = list(range(len(examples)))
        if max_failures is not None:
            failed = failed[:max_failures]
        if not failed:
            return Episode([], [], torch.zeros((0, group_size)), 0, 0, [], 0, times=times)
        attempts = [list(failed_attempts[i]) for i in failed]
        closed = [chat.ends_turn(a) for a in attempts]
        full = [prompts[i] + a for i, a in zip(failed, attempts)]
        session = Session.start(model, full, max_len=_presize(full, sampling, turn_budget) - sampling.max_attempt_tokens,
                                vocab_size=vocab, seed=seed,
                                decode=sampling.decode, compact=sampling.compact)
        times["attempt"] = session.prefill_s  # the stored attempts' prefill
        queries, first_success = 0, 0
        first_attempts, first_passed, first_reasons, first_cut = [], [], [], []

    # Reflect: one prefill of [task, failed attempt, reflection prompt] per failure, then G forks.
    t_prefill = session.prefill_s
    session.append([chat.user_turn(reflect_text[i], c) for i, c in zip(failed, closed)])
    session = session.fork(group_size)
    starts = session.lengths
    refl = session.sample(sampling.max_reflection_tokens, **kw)
    times["reflection"] = session.prefill_s - t_prefill + refl.decode_s
    generated += refl.new_tokens
    spans = [(s, s + n) for s, n in zip(starts, refl.lengths)]

    # Retry, continuing the same cache.
    session.append([chat.user_turn(retry_text[failed[r // group_size]], chat.ends_turn(t))
                    for r, t in enumerate(refl.tokens)])
    retry_starts = session.lengths
    t_prefill = session.prefill_s
    retry = session.sample(sampling.max_retry_tokens, **answer_kw)
    times["retry"] = session.prefill_s - t_prefill + retry.decode_s
    generated += retry.new_tokens

    group_examples = [examples[i] for i in failed]
    rewards, records = [], []
    for r, (toks, ref_toks) in enumerate(zip(retry.tokens, refl.tokens)):
        ex = group_examples[r // group_size]
        reply = chat.decode(toks)
        t_verify = time.perf_counter()
        ok, why = judge_answer(task, ex, reply, retry.finished[r], sampling.cut_answers)  # (the reason logged is this verdict's own)
        times["verify"] = times.get("verify", 0.0) + time.perf_counter() - t_verify
        rewards.append(1.0 if ok else 0.0)
        g = r // group_size
        records.append({
            "example": ex,
            "attempt": chat.decode(attempts[g]),
            # (why the attempt failed, where this rollout sampled it: an attempt the limit cut off
            # fails unread under cut_answers fail, so its text alone may read as right)
            **({"attempt_reason": first_reasons[failed[g]], "attempt_cut": first_cut[failed[g]]}
               if first_reasons else {}),
            "reflection": chat.decode(ref_toks),
            "retry": reply,
            "reward": 1.0 if ok else 0.0,
            "reason": why,
            # (cut off by the token limit, not ended by the model: a cut retry's final equation is
            # where the limit fell, which may not be where the model would have ended)
            "reflection_cut": not refl.finished[r],
            "retry_cut": not retry.finished[r],
        })
    return Episode(
        sequences=[list(t) for t in session.tokens],
        spans=spans,
        rewards=torch.tensor(rewards, dtype=torch.float32).view(len(failed), group_size),
        queries=queries,
        first_success=first_success,
        group_examples=group_examples,
        generated_tokens=generated,
        records=records,
        group_indices=list(failed),
        attempts=attempts,
        first_attempts=first_attempts,
        first_passed=first_passed,
        first_reasons=first_reasons,
        first_cut=first_cut,
        reflection_logprobs=refl.logprobs,
        retry_logprobs=retry.logprobs,
        retry_spans=[(s, s + n) for s, n in zip(retry_starts, retry.lengths)],
        times=times,
    )
