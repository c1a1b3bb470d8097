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

from dataclasses import dataclass, field

import torch

from r3.checkpoint import generation_eos_ids
from r3.errors import R3Error
from r3.sampler import Session


_PROBE_SYSTEM, _PROBE_Q, _PROBE_A, _PROBE_U, _PROBE_R, _PROBE_V = (
    "PROBE_SYSTEM", "PROBE_QUERY", "PROBE_ATTEMPT", "PROBE_USER", "PROBE_REFLECTION", "PROBE_RETRY")


class ChatFormat:
    """Token ids of a conversation under the tokenizer's chat template.

    ``prompt(messages)`` renders the first turn with the generation prompt. ``user_turn(text,
    closed)`` is what follows an assistant message the model produced: the end-of-turn token if
    the model did not emit one (it hit its token limit), the template's text between turns, the
    user message and the next assistant header. All of it is derived from the template by
    rendering probe conversations, never guessed from token names:

    - the end-of-turn token is the special token the template puts right after an assistant
      message (``<|im_end|>``, ``<|eot_id|>``, Phi-3's ``<|end|>``, Mistral's ``</s>``);
    - ``stop_ids`` are that token, the tokenizer's eos and every ``eos_token_id`` of the
      checkpoint's ``generation_config.json`` (``config.json`` when there is none), as
      transformers' ``generate`` would stop;
    - a template may add text only when ``add_generation_prompt`` is false (Phi-3.5 appends
      eos): only renderings with the generation prompt are used;
    - a template may render earlier assistant turns without part of its generation prompt (Qwen3
      drops the empty ``<think></think>`` block of past turns): r3 keeps the conversation as the
      model saw it when sampling, so the sequence differs from a re-rendering by exactly that
      text in each past assistant turn (``history_drops``);
    - a template that moves the system message to the last user turn (Mistral v0.3) cannot be
      continued with a system message: ``prompt`` says so in one line.

    ``template_options`` are passed to the template (default ``enable_thinking=False``: Qwen3's
    non-thinking mode; templates that do not use it ignore it). ``eos_token_ids`` adds stop ids.
    """

    def __init__(self, tokenizer, *, eos_token_ids=None, template_options: dict | None = None):
        if getattr(tokenizer, "chat_template", None) is None:
            raise R3Error("the tokenizer has no chat template (r3 needs one to build conversations)")
        self.tok = tokenizer
        self.template_options = {"enable_thinking": False} if template_options is None else dict(template_options)
        if tokenizer.eos_token_id is None:
            raise R3Error("the tokenizer has no end-of-sequence token")
        q, a, u = ({"role": "user", "content": _PROBE_Q}, {"role": "assistant", "content": _PROBE_A},
                   {"role": "user", "content": _PROBE_U})
        one = self._probe([q])
        two = self._probe([q, a, u])
        shape = _continuation(one, two)
        if isinstance(shape, str):
            raise R3Error(f"the chat template {shape}; r3 cannot continue conversations with it")
        self.history_drops, lead, glue, self._tail = shape
        self.end_of_turn_id, end_text = self._end_of_turn(glue)
        self._between = glue[len(end_text):]  # e.g. "\n<|im_start|>user\n" after <|im_end|>
        # A second round must render like the first (earlier turns as the template renders them).
        three = self._probe([q, a, u, {"role": "assistant", "content": _PROBE_R},
                             {"role": "user", "content": _PROBE_V}])
        past_tail = self._tail[:len(self._tail) - len(self.history_drops)]
        head = two[:two.index(_PROBE_A)]
        expected = head + _PROBE_A + glue + _PROBE_U + past_tail + lead + _PROBE_R + glue + _PROBE_V + self._tail
        if three != expected:
            raise R3Error("the chat template renders a second round of turns differently from the first; "
                          "r3 cannot continue conversations with it")
        self._system_problem = self._check_system(q, a, u)
        extra = set() if eos_token_ids is None else {int(i) for i in eos_token_ids}
        ids = {self.end_of_turn_id, int(tokenizer.eos_token_id)} | extra | set(generation_eos_ids(tokenizer))
        self.stop_ids = sorted(i for i in ids if 0 <= i < len(tokenizer))

    def _probe(self, messages) -> str:
        try:
            return self._render(messages, generation=True)
        except Exception as e:  # a template that raises on a plain user/assistant conversation
            raise R3Error(f"cannot apply the tokenizer's chat template ({_first_line(e)})") from None

    def _end_of_turn(self, glue: str) -> tuple[int, str]:
        ids = self.encode(glue)
        added = getattr(self.tok, "added_tokens_decoder", {}) or {}
        token = added.get(ids[0]) if ids else None
        text = getattr(token, "content", str(token)) if token is not None else None
        if text is None or not glue.startswith(text):
            raise R3Error(f"the chat template ends an assistant turn with {glue[:40]!r}, not with a special "
                          "token; r3 needs an end-of-turn token to stop generating at")
        return ids[0], text

    def _check_system(self, q, a, u) -> str | None:
        s = {"role": "system", "content": _PROBE_SYSTEM}
        try:
            one = self._render([s, q], generation=True)
            two = self._render([s, q, a, u], generation=True)
        except Exception as e:
            return f"the chat template does not take a system message ({_first_line(e)})"
        shape = _continuation(one, two)
        if isinstance(shape, str) or _PROBE_SYSTEM not in two[:two.index(_PROBE_A)]:
            return ("the chat template does not keep a system message at the start of the conversation (Mistral "
                    "v0.3's moves it to the last user turn; some drop it), so a conversation with one cannot be "
                    "continued exactly; use the task without a system message")
        return None

    def _render(self, messages, generation: bool) -> str:
        return self.tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation,
                                            **self.template_options)

    def encode(self, text: str) -> list[int]:
        return self.tok(text, add_special_tokens=False)["input_ids"]

    def prompt_text(self, messages: list[dict]) -> str:
        """The first turn(s) with the generation prompt, as text."""
        if self._system_problem and any(m.get("role") == "system" for m in messages):
            raise R3Error(self._system_problem)
        return self._render(messages, generation=True)

    def prompt(self, messages: list[dict]) -> list[int]:
        return self.encode(self.prompt_text(messages))

    def ends_turn(self, ids) -> bool:
        """Whether a generated turn ends with the end-of-turn token. A turn cut off by the token
        limit, or stopped by another stop id (Qwen's ``<|endoftext|>``, Llama's ``<|eom_id|>``),
        does not: ``user_turn(..., closed=False)`` then writes the end-of-turn token after it, so
        every assistant turn is closed as the template closes it."""
        return bool(ids) and ids[-1] == self.end_of_turn_id

    def user_turn(self, text: str, closed: bool = True) -> list[int]:
        ids = [] if closed else [self.end_of_turn_id]
        return ids + self.encode(self._between + text + self._tail)

    def decode(self, ids: list[int]) -> str:
        return self.tok.decode(ids, skip_special_tokens=True)


def _first_line(e: BaseException) -> str:
    return str(e).splitlines()[0] if str(e) else type(e).__name__


def _continuation(one: str, two: str):
    """How the rendering ``two`` of [Q, A, U] (generation prompt) continues ``one``, the rendering
    of [Q] (generation prompt): ``(history_drops, lead, glue, tail)`` where lead is whitespace
    the template puts before A, glue is the text between A and the user message U and tail
    follows U; or a reason it does not.

    Continuation means the model's A can follow ``one`` directly: ``two`` up to A is ``one`` plus
    whitespace the model writes itself (Mistral's space before an answer), or ``one`` minus a
    suffix of its generation prompt that the template leaves out of past turns (Qwen3's empty
    think block)."""
    i = two.find(_PROBE_A)
    j = two.find(_PROBE_U, i + 1) if i >= 0 else -1
    if _PROBE_Q not in one or i < 0 or j < 0:
        return "drops messages of a plain user / assistant / user conversation"
    before = two[:i]
    if before.startswith(one) and not before[len(one):].strip():
        drops, lead = "", before[len(one):]
    elif one.startswith(before) and two.endswith(one[len(before):]):
        drops, lead = one[len(before):], ""
    else:
        return "re-renders earlier turns"
    return drops, lead, two[i + len(_PROBE_A):j], two[j + len(_PROBE_U):]


@dataclass
class EpisodeSampling:
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    max_attempt_tokens: int = 256
    max_reflection_tokens: int = 128
    max_retry_tokens: int = 256
    compile_decode: bool = False  # the sampler's decode step through torch.compile (see r3.decode)


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
    # Per row: the sampler's log-prob of each reflection / retry token (see r3.sampler), and
    # the retry tokens' span [start, end) in the sequence (the retry runs to the sequence's end).
    reflection_logprobs: list[list[float]] = field(default_factory=list)
    retry_logprobs: list[list[float]] = field(default_factory=list)
    retry_spans: list[tuple[int, int]] = field(default_factory=list)

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
    vocab = len(tokenizer)
    stops = chat.stop_ids
    kw = dict(temperature=sampling.temperature, top_p=sampling.top_p, top_k=sampling.top_k, stop_token_ids=stops)
    if not examples:
        return Episode([], [], torch.zeros((0, group_size)), 0, 0, [], 0)
    prompts = [chat.prompt(task.messages(ex)) for ex in examples]
    reflect_text = [turn_text(task, "reflection", ex) for ex in examples]
    retry_text = [turn_text(task, "retry", ex) for ex in examples]
    turn_budget = (max(len(chat.user_turn(t)) for t in reflect_text)
                   + max(len(chat.user_turn(t)) for t in retry_text) + 2)
    generated = 0

    if failed_attempts is None:
        session = Session.start(model, prompts, max_len=_presize(prompts, sampling, turn_budget), vocab_size=vocab, seed=seed,
                                compile_decode=sampling.compile_decode)
        first = session.sample(sampling.max_attempt_tokens, **kw)
        generated += first.new_tokens
        passed = [task.verify(ex, chat.decode(t)) for ex, t in zip(examples, first.tokens)]
        failed = [i for i, ok in enumerate(passed) if not ok]
        if max_failures is not None:
            failed = failed[:max_failures]
        queries, first_success = len(examples), sum(passed)
        first_attempts, first_passed = [list(t) for t in first.tokens], passed
        if not failed:
            return Episode([], [], torch.zeros((0, group_size)), queries, first_success, [], generated,
                           first_attempts=first_attempts, first_passed=first_passed)
        attempts = [first.tokens[i] for i in failed]
        closed = [chat.ends_turn(first.tokens[i]) for i in failed]
        session = session.select(failed)
    else:
        if len(failed_attempts) != len(examples):
            raise ValueError("failed_attempts must match examples one to one")
        failed = list(range(len(examples)))
        if max_failures is not None:
            failed = failed[:max_failures]
        attempts = [list(failed_attempts[i]) for i in failed]
        closed = [chat.ends_turn(a) for a in attempts]
        full = [prompts[i] + a for i, a in zip(failed, attempts)]
        session = Session.start(model, full, max_len=_presize(full, sampling, turn_budget) - sampling.max_attempt_tokens,
                                vocab_size=vocab, seed=seed,
                                compile_decode=sampling.compile_decode)
        queries, first_success = 0, 0
        first_attempts, first_passed = [], []

    # Reflect: one prefill of [task, failed attempt, reflection prompt] per failure, then G forks.
    session.append([chat.user_turn(reflect_text[i], c) for i, c in zip(failed, closed)])
    session = session.fork(group_size)
    starts = session.lengths
    refl = session.sample(sampling.max_reflection_tokens, **kw)
    generated += refl.new_tokens
    spans = [(s, s + n) for s, n in zip(starts, refl.lengths)]

    # Retry, continuing the same cache.
    session.append([chat.user_turn(retry_text[failed[r // group_size]], chat.ends_turn(t))
                    for r, t in enumerate(refl.tokens)])
    retry_starts = session.lengths
    retry = session.sample(sampling.max_retry_tokens, **kw)
    generated += retry.new_tokens

    group_examples = [examples[i] for i in failed]
    rewards, records = [], []
    for r, (toks, ref_toks) in enumerate(zip(retry.tokens, refl.tokens)):
        ex = group_examples[r // group_size]
        retry_text = chat.decode(toks)
        ok = task.verify(ex, retry_text)
        rewards.append(1.0 if ok else 0.0)
        records.append({
            "example": ex,
            "attempt": chat.decode(attempts[r // group_size]),
            "reflection": chat.decode(ref_toks),
            "retry": retry_text,
            "reward": 1.0 if ok else 0.0,
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
        reflection_logprobs=refl.logprobs,
        retry_logprobs=retry.logprobs,
        retry_spans=[(s, s + n) for s, n in zip(retry_starts, retry.lengths)],
    )
