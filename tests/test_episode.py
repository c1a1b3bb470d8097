"""The attempt / reflect / retry episode (r3.episode) on a tiny random model with the SmolLM2
tokenizer and chat template: token layout and reflection mask against the chat template rendered
independently, continuation against fresh prefills and teacher-forced forwards, rewards against
the verifier, group-major rows, first-attempt successes, stored failed attempts.

The tiny model is random but shaped so that it sometimes ends its turn: residual dimension 0 is a
constant (no layer writes to it) and the LM head's ``<|im_end|>`` row reads only that dimension, so
``<|im_end|>`` gets a steady logit -- both closed turns and turns cut at the token limit occur.
The task is a hash coin on the completion text, so both verdicts occur too.
"""

from __future__ import annotations

import copy
import hashlib
import math
from types import SimpleNamespace

import pytest
import torch

from r3.chat import ChatFormat
from r3.checkpoint import load
from r3.episode import EpisodeSampling, run_episode
from r3.sampler import generate
from r3.tasks.base import Task

EOS = 2  # <|im_end|> in the SmolLM2 tokenizer
REFLECT_TURN = "\n<|im_start|>user\n{}<|im_end|>\n<|im_start|>assistant\n"  # SmolLM2's template, by hand


class CoinTask(Task):
    """Passes iff a hash of (example id, completion text) is even; ``always`` forces a verdict."""

    name = "coin"
    default_reflection_prompt = "Reflect on what went wrong."
    default_retry_prompt = "Try again, briefly."

    def __init__(self, *, always: bool | None = None, **kw):
        super().__init__(**kw)
        self.always = always

    def examples(self, split="train", n=None, seed=0):
        return [{"id": f"{split}-{seed}-{i}", "word": f"item{i}"} for i in range(n or 8)]

    def messages(self, example):
        return [{"role": "user", "content": f"Say something about {example['word']}."}]

    def _check(self, example, completion_text):
        if self.always is not None:
            return self.always, "forced"
        h = hashlib.sha256((example["id"] + "|" + completion_text).encode()).digest()[0]
        return h % 2 == 0, "coin"


def build_tiny_chat_model(path, tokenizer, eos_logit: float = 7.5, seed: int = 0, *, kind: str = "llama",
                          eos: int = EOS, **overrides):
    """Save a tiny random model of ``kind`` (``tokenizer``'s vocabulary, untied head) plus
    ``tokenizer`` to ``path``; token ``eos`` (SmolLM2's ``<|im_end|>`` by default) gets a logit of
    about ``eos_logit * 1.2`` at every position."""
    from conftest import make_tiny_hf

    hf = make_tiny_hf(path, kind, seed=seed, vocab_size=len(tokenizer), tie_word_embeddings=False,
                      max_position_embeddings=1024, **{"initializer_range": 0.02, **overrides})
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if name.endswith("proj.weight") or (kind in ("gemma3", "gemma2") and ".post_" in name):
                p.mul_(10.0)  # context matters: attention and MLP outputs are not negligible
                # (Gemma norms them: their norms' scale, 1 + w, is what makes them so)
        emb = hf.model.embed_tokens.weight
        emb.normal_(0.0, 1.0, generator=torch.Generator().manual_seed(seed))
        emb[:, 0] = 8.0
        for layer in hf.model.layers:  # (Qwen 3.5's Gated DeltaNet layers write through linear_attn.out_proj)
            mixer = layer.self_attn.o_proj if hasattr(layer, "self_attn") else layer.linear_attn.out_proj
            for out in (mixer, layer.mlp.down_proj):
                out.weight[0].zero_()
                if out.bias is not None:  # (SmolLM3's tiny config has biases)
                    out.bias[0] = 0.0
        hf.model.norm.weight[0] = 1.0
        hf.lm_head.weight.normal_(0.0, 0.3, generator=torch.Generator().manual_seed(seed + 1))
        hf.lm_head.weight[eos].zero_()
        hf.lm_head.weight[eos, 0] = eos_logit
    hf.save_pretrained(str(path))
    tokenizer.save_pretrained(str(path))
    return path


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, builtin):
    path = build_tiny_chat_model(tmp_path_factory.mktemp("episode") / "model", builtin[1])
    model, tok = load(str(path))
    return model, tok, ChatFormat(tok)


# (cut_answers="judge": the tiny model's answers mostly run to these limits, and the tests here
# are of the verdicts the tasks give them; "fail", the default, has its own test below)
SAMPLING = EpisodeSampling(temperature=1.0, max_attempt_tokens=10, max_reflection_tokens=8, max_retry_tokens=10,
                           cut_answers="judge")


@pytest.fixture(scope="module")
def episode(tiny):
    model, tok, chat = tiny
    task = CoinTask()
    examples = task.examples(n=10)
    ep = run_episode(model, tok, task, examples, group_size=4, sampling=SAMPLING, seed=3, chat=chat)
    return task, examples, ep


def raw(tok, ids):
    return tok.decode(ids, skip_special_tokens=False)


def split_row(ep, chat, task, r):
    """Cut row ``r`` of an episode into its parts, checking the layout on the way."""
    G = ep.group_size
    g = r // G
    seq = ep.sequences[r]
    prompt = chat.prompt(task.messages(ep.group_examples[g]))
    attempt = ep.attempts[g]
    a_end = len(prompt) + len(attempt)
    (r0, r1), (t0, t1) = ep.spans[r], ep.retry_spans[r]
    assert seq[: len(prompt)] == prompt
    assert seq[len(prompt): a_end] == attempt
    assert t1 == len(seq) and a_end < r0 <= r1 < t0
    return dict(seq=seq, prompt=prompt, attempt=attempt, reflect_turn=seq[a_end:r0], reflection=seq[r0:r1],
                retry_turn=seq[r1:t0], retry=seq[t0:t1])


def closed(ids):
    return bool(ids) and ids[-1] == EOS


# --------------------------------------------------------------------------------------------
# layout, mask, chat template
# --------------------------------------------------------------------------------------------


def test_first_attempts_counted_and_only_failures_form_groups(tiny, episode):
    _, tok, chat = tiny
    task, examples, ep = episode
    assert ep.queries == len(examples) == len(ep.first_attempts) == len(ep.first_passed)
    verdicts = [task.verify(ex, chat.decode(a)) for ex, a in zip(examples, ep.first_attempts)]
    assert verdicts == ep.first_passed
    assert ep.first_success == sum(verdicts)
    assert 0 < ep.first_success < len(examples)  # both outcomes happen
    failed = [i for i, ok in enumerate(verdicts) if not ok]
    assert ep.group_indices == failed
    assert ep.group_examples == [examples[i] for i in failed]
    assert ep.attempts == [ep.first_attempts[i] for i in failed]
    assert ep.rewards.shape == (len(failed), 4) and ep.group_size == 4
    assert len(ep.sequences) == len(ep.spans) == len(ep.records) == len(failed) * 4
    # a passed query's attempt appears in no sequence; every row starts from its own failure
    for r, seq in enumerate(ep.sequences):
        g = r // 4
        prompt = chat.prompt(task.messages(examples[failed[g]]))
        assert seq[: len(prompt) + len(ep.attempts[g])] == prompt + ep.attempts[g]
    # attempts are what the sampler gives: closed by <|im_end|> or cut at the limit
    lengths = [len(a) for a in ep.first_attempts]
    assert all(closed(a) or len(a) == SAMPLING.max_attempt_tokens for a in ep.first_attempts)
    assert any(closed(a) for a in ep.first_attempts) and SAMPLING.max_attempt_tokens in lengths


def test_layout_turns_and_reflection_mask(tiny, episode):
    _, tok, chat = tiny
    task, _, ep = episode
    refl_turn = chat.encode(REFLECT_TURN.format(task.reflection_prompt))
    retry_turn = chat.encode(REFLECT_TURN.format(task.retry_prompt))
    seen = {"closed": 0, "cut": 0}
    for r in range(len(ep.sequences)):
        p = split_row(ep, chat, task, r)
        # the user turns: <|im_end|> only when the model did not write one, then the template's text
        assert p["reflect_turn"] == ([] if closed(p["attempt"]) else [EOS]) + refl_turn
        assert p["retry_turn"] == ([] if closed(p["reflection"]) else [EOS]) + retry_turn
        seen["closed" if closed(p["reflection"]) else "cut"] += 1
        # the mask covers exactly the reflection's tokens
        mask = ep.reflection_mask(r)
        assert len(mask) == len(p["seq"])
        masked = [t for t, m in zip(p["seq"], mask) if m]
        start, end = ep.spans[r]
        assert sum(mask) == end - start == len(p["reflection"]) > 0
        assert mask[start - 1] == 0 and all(mask[start:end]) and not any(mask[end:])
        assert masked == p["reflection"]
        assert chat.decode(masked) == ep.records[r]["reflection"]
        assert chat.decode(p["retry"]) == ep.records[r]["retry"]
        assert chat.decode(p["attempt"]) == ep.records[r]["attempt"]
        assert len(p["reflection"]) <= SAMPLING.max_reflection_tokens
        assert closed(p["reflection"]) or len(p["reflection"]) == SAMPLING.max_reflection_tokens
    assert seen["closed"] and seen["cut"]  # both kinds of reflection turn are exercised


def _render(tok, task, example, parts) -> str:
    """The conversation rendered by the tokenizer's chat template (not r3's ChatFormat) with the
    decoded texts as messages, up to the retry's assistant header, plus the retry text."""
    def content(ids):
        return raw(tok, ids[:-1] if closed(ids) else ids)

    messages = task.messages(example) + [
        {"role": "assistant", "content": content(parts["attempt"])},
        {"role": "user", "content": task.reflection_prompt},
        {"role": "assistant", "content": content(parts["reflection"])},
        {"role": "user", "content": task.retry_prompt},
    ]
    text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return text + raw(tok, parts["retry"])


def test_sequences_equal_the_chat_template_rendering(tiny, episode):
    _, tok, chat = tiny
    task, _, ep = episode
    for r in range(len(ep.sequences)):
        p = split_row(ep, chat, task, r)
        assert raw(tok, p["seq"]) == _render(tok, task, ep.group_examples[r // ep.group_size], p)


def test_sequences_equal_the_tokenized_rendering_when_canonical(tiny):
    """Token level: with canonical contents (a stored attempt written as text, one-token
    reflections and retries), tokenising the template's rendering gives the sequence's ids."""
    model, tok, chat = tiny
    task = CoinTask(always=False)
    examples = task.examples(n=6)
    attempts = [chat.encode(f"Item {i} is a fine thing.") + ([EOS] if i % 2 else []) for i in range(6)]
    sampling = EpisodeSampling(temperature=1.0, max_reflection_tokens=1, max_retry_tokens=1, cut_answers="judge")
    ep = run_episode(model, tok, task, examples, group_size=3, sampling=sampling, seed=1,
                     failed_attempts=attempts, chat=chat)
    checked = 0
    for r in range(len(ep.sequences)):
        p = split_row(ep, chat, task, r)
        segs = [p["reflection"], p["retry"]]
        if any(s != [EOS] and chat.encode(raw(tok, s)) != s for s in segs):
            continue  # a single token that is not its text's canonical tokenisation
        rendered = _render(tok, task, ep.group_examples[r // 3], p)
        assert tok(rendered, add_special_tokens=False)["input_ids"] == p["seq"]
        checked += 1
    assert checked >= len(ep.sequences) // 2


# --------------------------------------------------------------------------------------------
# continuation consistency
# --------------------------------------------------------------------------------------------


def test_logprobs_equal_teacher_forced_forward(tiny, episode):
    """The sampler's log-probs of every reflection and retry token (temperature 1, no filtering)
    equal log_softmax of one fresh forward over the whole conversation."""
    model, _, chat = tiny
    task, _, ep = episode
    assert len(ep.reflection_logprobs) == len(ep.retry_logprobs) == len(ep.sequences)
    worst = 0.0
    for r, seq in enumerate(ep.sequences):
        with torch.no_grad():
            logp = model(torch.tensor([seq]))[0].float().log_softmax(-1)
        for (start, end), got in ((ep.spans[r], ep.reflection_logprobs[r]), (ep.retry_spans[r], ep.retry_logprobs[r])):
            assert len(got) == end - start
            ref = logp[torch.arange(start - 1, end - 1), torch.tensor(seq[start:end])]
            diff = (ref - torch.tensor(got)).abs().max().item()
            assert not math.isnan(diff), "NaN log-prob"
            worst = max(worst, diff)
    assert worst < 1e-4, worst


def test_greedy_continuation_equals_fresh_prefill(tiny):
    """Greedy: the reflection and the retry equal what a fresh prefill of the conversation so far
    generates; the G rows of a group are identical."""
    model, tok, chat = tiny
    task = CoinTask(always=False)
    examples = task.examples(n=5, seed=1)
    sampling = EpisodeSampling(temperature=0.0, max_attempt_tokens=10, max_reflection_tokens=8, max_retry_tokens=10, cut_answers="judge")
    ep = run_episode(model, tok, task, examples, group_size=2, sampling=sampling, chat=chat)
    assert ep.first_success == 0 and ep.group_indices == list(range(5))
    for g in range(5):
        assert ep.sequences[2 * g] == ep.sequences[2 * g + 1]
    rows = range(0, 10, 2)
    for limit, spans in ((8, ep.spans), (10, ep.retry_spans)):
        prefixes = [ep.sequences[r][: spans[r][0]] for r in rows]
        fresh = generate(model, prefixes, max_new_tokens=limit, temperature=0, stop_token_ids=chat.stop_ids)
        assert fresh.tokens == [ep.sequences[r][spans[r][0]: spans[r][1]] for r in rows]
    # the first attempts too
    prompts = [chat.prompt(task.messages(ex)) for ex in examples]
    assert generate(model, prompts, max_new_tokens=10, temperature=0, stop_token_ids=chat.stop_ids).tokens == ep.first_attempts


# --------------------------------------------------------------------------------------------
# rewards, groups
# --------------------------------------------------------------------------------------------


def test_rewards_are_the_verdicts_on_the_retries_group_major(tiny, episode):
    _, tok, chat = tiny
    task, _, ep = episode
    G = ep.group_size
    flat = ep.rewards.view(-1).tolist()
    for r in range(len(ep.sequences)):
        ex = ep.group_examples[r // G]  # row g * G + j belongs to group g
        assert ep.records[r]["example"] == ex
        retry = ep.sequences[r][ep.retry_spans[r][0]:]
        ok = task.verify(ex, chat.decode(retry))
        assert flat[r] == ep.records[r]["reward"] == (1.0 if ok else 0.0)
        assert ep.rewards[r // G, r % G].item() == flat[r]
    assert 0.0 in flat and 1.0 in flat
    assert ep.rewards.dtype == torch.float32


class SecondThoughtsTask(CoinTask):
    """A verifier that judges a text otherwise when asked about it again (a judge model, a time
    limit): the coin, flipped on every later look; its reason says which verdict it gave."""

    def __init__(self, **kw):
        super().__init__(**kw)
        self.looks = {}

    def _check(self, example, completion_text):
        key = (example["id"], completion_text)
        self.looks[key] = self.looks.get(key, 0) + 1
        ok = super()._check(example, completion_text)[0] != (self.looks[key] % 2 == 0)
        return ok, f"look {self.looks[key]}: {'pass' if ok else 'fail'}"


def test_each_reason_logged_is_its_verdicts_own(tiny):
    """The reason beside a reward in samples.jsonl, and beside each verdict of an evaluation's
    records, comes from the verifier call that gave that verdict, not from a second call that may
    judge otherwise (a reward of 1 was logged with the reason of a fail); a duck-typed task with no
    ``diagnose`` logs no reason (training stopped with an AttributeError)."""
    from types import SimpleNamespace

    from r3.heldout import evaluate_batch
    from r3.train import sample_records

    model, tok, chat = tiny
    task = SecondThoughtsTask()
    examples = task.examples(n=6)
    ep = run_episode(model, tok, task, examples, group_size=2, sampling=SAMPLING, seed=3, chat=chat)
    cfg = SimpleNamespace(log_samples=len(ep.records), samples_every=1)
    rows = sample_records(ep, 1, cfg, 0)
    assert len(rows) == len(ep.records) and {r["reward"] for r in rows} == {0.0, 1.0}
    assert all(r["reason"].endswith("pass" if r["reward"] else "fail") for r in rows)
    assert all(why.endswith("pass" if ok else "fail") for ok, why in zip(ep.first_passed, ep.first_reasons))
    res = evaluate_batch(model, tok, task, examples, SAMPLING, seed=3, chat=chat, records=True)
    assert sum("retry" in rec for rec in res["records"]) > 0
    for rec in res["records"]:
        assert rec["attempt_reason"].endswith("pass" if rec["attempt_correct"] else "fail")
        if "retry" in rec:
            assert rec["retry_reason"].endswith("pass" if rec["retry_correct"] else "fail")
    duck = PlainPromptsTask()
    ep = run_episode(model, tok, duck, CoinTask().examples(n=2), group_size=2, sampling=SAMPLING, seed=2, chat=chat)
    assert [r["reason"] for r in sample_records(ep, 1, cfg, 0)] == [None] * 4


def test_the_verifiers_time_is_its_own_part_of_the_rollout(tiny, monkeypatch):
    """A slow plug-in verifier hid inside rollout_time_s (its attempt, reflection and retry parts
    summed to 0.94 s of 4.0 s): ``times["verify"]`` counts the verdict calls, those of the first
    attempts and of each retry (a clock that ticks once per reading: one span for the first
    attempts, one per retry)."""
    import r3.episode as E

    model, tok, chat = tiny
    ticks = iter(range(10 ** 6))
    monkeypatch.setattr(E, "time", SimpleNamespace(perf_counter=lambda: float(next(ticks))))
    ep = run_episode(model, tok, CoinTask(), CoinTask().examples(n=6), group_size=2, sampling=SAMPLING, seed=3,
                     chat=chat)
    assert ep.records and ep.times["verify"] == 1.0 + len(ep.records)


def test_group_reflections_differ_and_share_their_context(tiny, episode):
    _, _, chat = tiny
    task, _, ep = episode
    G = ep.group_size
    for g in range(len(ep.group_examples)):
        parts = [split_row(ep, chat, task, g * G + j) for j in range(G)]
        refl = [tuple(p["reflection"]) for p in parts]
        assert len(set(refl)) == G  # temperature 1: G different reflections
        starts = {ep.spans[g * G + j][0] for j in range(G)}
        assert len(starts) == 1  # one shared prefix: prompt + attempt + reflection turn
        assert len({tuple(p["seq"][: ep.spans[g * G][0]]) for p in parts}) == 1


def test_generated_token_count(episode):
    _, _, ep = episode
    total = sum(len(a) for a in ep.first_attempts)
    total += sum(e - s for s, e in ep.spans) + sum(e - s for s, e in ep.retry_spans)
    assert ep.generated_tokens == total


def test_max_failures_and_all_passed(tiny):
    model, tok, chat = tiny
    task = CoinTask(always=False)
    ep = run_episode(model, tok, task, task.examples(n=5), group_size=2, max_failures=2, sampling=SAMPLING,
                     seed=0, chat=chat)
    assert ep.queries == 5 and ep.first_success == 0
    assert ep.group_indices == [0, 1] and ep.rewards.shape == (2, 2) and len(ep.sequences) == 4

    ok = CoinTask(always=True)
    ep = run_episode(model, tok, ok, ok.examples(n=3), group_size=2, sampling=SAMPLING, seed=0, chat=chat)
    assert (ep.queries, ep.first_success) == (3, 3)
    assert ep.sequences == [] and ep.group_examples == [] and ep.rewards.shape == (0, 2)
    assert ep.first_passed == [True] * 3 and len(ep.first_attempts) == 3
    assert ep.generated_tokens == sum(len(a) for a in ep.first_attempts)

    assert run_episode(model, tok, ok, [], group_size=2, chat=chat).queries == 0


def test_sampling_token_limits_must_be_positive():
    """A zero token limit would sample empty reflections (nothing to reward) or empty answers:
    refused in one line naming the limit."""
    from r3.errors import R3Error

    for name in ("max_attempt_tokens", "max_reflection_tokens", "max_retry_tokens"):
        for bad in (0, -1, 2.5):
            with pytest.raises(R3Error, match=f"{name} must be a positive integer"):
                EpisodeSampling(**{name: bad})


def test_the_cache_sized_at_the_start_holds_every_turn_cut_at_its_limit(builtin, tmp_path, monkeypatch):
    """A model that never ends its turn: every attempt and reflection is cut at its limit, so r3
    writes the end-of-turn token after each itself. The KV cache allocated at the start still
    holds the whole conversation; it is never grown (a copy of every row's cache) mid-episode."""
    from r3.model import KVCache

    model, tok = load(str(build_tiny_chat_model(tmp_path / "model", builtin[1], eos_logit=-30.0)))
    chat = ChatFormat(tok)
    grown = []
    grow = KVCache.grow

    def spy(self, max_len):
        if max_len > self.max_len:
            grown.append((self.max_len, max_len))
        return grow(self, max_len)

    monkeypatch.setattr(KVCache, "grow", spy)
    task = CoinTask(always=False)
    ep = run_episode(model, tok, task, task.examples(n=3), group_size=2, sampling=SAMPLING, seed=0, chat=chat)
    assert all(len(a) == SAMPLING.max_attempt_tokens and not closed(a) for a in ep.attempts)
    assert all(e - s == SAMPLING.max_reflection_tokens for s, e in ep.spans)
    assert all(e - s == SAMPLING.max_retry_tokens for s, e in ep.retry_spans)
    assert grown == []
    stored = run_episode(model, tok, task, ep.group_examples, group_size=2, sampling=SAMPLING, seed=0, chat=chat,
                         failed_attempts=ep.attempts)
    assert all(e - s == SAMPLING.max_reflection_tokens for s, e in stored.spans)
    assert grown == []


# --------------------------------------------------------------------------------------------
# starting from stored failed attempts
# --------------------------------------------------------------------------------------------


def test_failed_attempts_mode_builds_the_same_conversations(tiny):
    """Greedy: an episode started from the stored attempts of an earlier episode builds exactly
    the same sequences, spans, rewards and records (no first attempts are made or counted)."""
    model, tok, chat = tiny
    task = CoinTask()
    examples = task.examples(n=8, seed=2)
    sampling = EpisodeSampling(temperature=0.0, max_attempt_tokens=10, max_reflection_tokens=8, max_retry_tokens=10, cut_answers="judge")
    fresh = run_episode(model, tok, task, examples, group_size=2, sampling=sampling, chat=chat)
    assert 0 < len(fresh.group_examples) < 8
    stored = run_episode(model, tok, task, fresh.group_examples, group_size=2, sampling=sampling, chat=chat,
                         failed_attempts=fresh.attempts)
    assert (stored.queries, stored.first_success, stored.first_attempts) == (0, 0, [])
    assert stored.group_indices == list(range(len(fresh.group_examples)))
    assert stored.attempts == fresh.attempts
    assert stored.sequences == fresh.sequences
    assert stored.spans == fresh.spans and stored.retry_spans == fresh.retry_spans
    assert torch.equal(stored.rewards, fresh.rewards)
    # (the same, less why each attempt failed, which only the rollout that sampled it knows)
    assert stored.records == [{k: v for k, v in r.items() if k not in ("attempt_reason", "attempt_cut")}
                              for r in fresh.records]
    assert torch.allclose(torch.tensor([x for row in stored.reflection_logprobs for x in row]),
                          torch.tensor([x for row in fresh.reflection_logprobs for x in row]), atol=1e-5)


def test_failed_attempts_mode_layout_at_temperature_one(tiny):
    """Stored attempts, closed or cut: the same layout as a sampled episode; max_failures keeps
    the first ones; a count mismatch is an error."""
    model, tok, chat = tiny
    task = CoinTask()
    examples = task.examples(n=4, seed=5)
    attempts = [chat.encode("Something about it.") + [EOS], chat.encode("Half a"), [EOS], chat.encode("x y z")]
    ep = run_episode(model, tok, task, examples, group_size=3, sampling=SAMPLING, seed=4, failed_attempts=attempts,
                     max_failures=3, chat=chat)
    assert ep.queries == 0 and ep.group_examples == examples[:3] and ep.attempts == attempts[:3]
    refl_turn = chat.encode(REFLECT_TURN.format(task.reflection_prompt))
    for r in range(len(ep.sequences)):
        p = split_row(ep, chat, task, r)
        assert p["reflect_turn"] == ([] if closed(p["attempt"]) else [EOS]) + refl_turn
        assert raw(tok, p["seq"]) == _render(tok, task, ep.group_examples[r // 3], p)
        assert ep.rewards.view(-1)[r].item() == float(task.verify(ep.group_examples[r // 3], chat.decode(p["retry"])))
    with pytest.raises(ValueError, match="one to one"):
        run_episode(model, tok, task, examples, group_size=2, failed_attempts=attempts[:2], chat=chat)


def test_chat_format_rejects_a_tokenizer_without_template(tiny):
    from r3.errors import R3Error

    _, tok, _ = tiny

    class NoTemplate:
        chat_template = None

    with pytest.raises(R3Error, match="chat template"):
        ChatFormat(NoTemplate())
    assert ChatFormat(tok).stop_ids == [EOS]
    no_eos = copy.deepcopy(tok)
    no_eos.eos_token = None
    assert no_eos.eos_token_id is None and no_eos.chat_template is not None
    with pytest.raises(R3Error, match="the tokenizer has no end-of-sequence token"):
        ChatFormat(no_eos)


class PerExampleTurns(CoinTask):
    """Reflection and retry turns that name the example (the Task interface's per-example
    ``reflection_message`` / ``retry_message``)."""

    def reflection_message(self, example=None):
        return {"role": "user", "content": f"What went wrong with {example['word']}?"}

    def retry_message(self, example=None):
        return {"role": "user", "content": f"Again, {example['word']}."}


class PerExampleTurnsSomePass(PerExampleTurns):
    """Examples 1 and 4 always pass: the failures are not the first examples in order."""

    def _check(self, example, completion_text):
        return example["word"] in ("item1", "item4"), "by example"


@pytest.mark.parametrize("task", [PerExampleTurns(always=False), PerExampleTurnsSomePass()], ids=["all-fail", "some-pass"])
def test_episode_asks_with_each_examples_own_turns(tiny, task):
    """Each group's reflection and retry turns are its own failed example's, also where earlier
    examples passed (a group's index among the failures is not its example's index)."""
    model, tok, chat = tiny
    examples = task.examples(n=6 if isinstance(task, PerExampleTurnsSomePass) else 3)
    ep = run_episode(model, tok, task, examples, group_size=2, sampling=SAMPLING, seed=5, chat=chat)
    assert ep.group_indices == ([0, 2, 3, 5] if isinstance(task, PerExampleTurnsSomePass) else [0, 1, 2])
    assert [e["word"] for e in ep.group_examples] == [examples[i]["word"] for i in ep.group_indices]
    assert len(ep.sequences) == 2 * len(ep.group_indices)
    for r in range(len(ep.sequences)):
        p = split_row(ep, chat, task, r)
        word = ep.group_examples[r // 2]["word"]
        refl = chat.encode(REFLECT_TURN.format(f"What went wrong with {word}?"))
        retry = chat.encode(REFLECT_TURN.format(f"Again, {word}."))
        assert p["reflect_turn"] == ([] if closed(p["attempt"]) else [EOS]) + refl
        assert p["retry_turn"] == ([] if closed(p["reflection"]) else [EOS]) + retry


@pytest.mark.parametrize("dtype, bound", [(torch.float32, 1e-4), (torch.bfloat16, 0.15)])
def test_trainer_logprobs_of_reflection_tokens_equal_the_samplers(tiny, dtype, bound):
    """The trainer's path (make_micro_batches -> token_logprobs -> scatter, with its cols - 1 /
    cols + 1 pair) gives each reflection token the log-prob the sampler drew it with (T = 0.7, so
    the temperature is applied alike); update() reports the same gap as its logp_diff metric."""
    from r3 import batch as B
    from r3 import train as T
    from r3.config import TrainConfig

    model, tok, chat = tiny
    model = copy.deepcopy(model).to(dtype)  # the fixture's fp32 weights stay as they are
    task = CoinTask()
    sampling = EpisodeSampling(temperature=0.7, max_attempt_tokens=10, max_reflection_tokens=8, max_retry_tokens=10, cut_answers="judge")
    ep = run_episode(model, tok, task, task.examples(n=6), group_size=3, sampling=sampling, seed=5, chat=chat)
    assert sum(e - s for s, e in ep.spans) > 20
    mbs = B.make_micro_batches(ep.sequences, ep.spans, [1.0] * len(ep.sequences), 5, 0, "cpu",
                               rollout_logprobs=ep.reflection_logprobs)
    worst, r = 0.0, 0
    for mb in mbs:
        with torch.no_grad():
            full = B.scatter(B.token_logprobs(model, mb, 0.7)[0], mb)
        for b in range(mb.tokens.shape[0]):
            start, end = ep.spans[r]
            got = full[b, start:end]
            assert mb.mask[b, start:end].all() and int(mb.mask[b].sum()) == end - start
            want = torch.tensor(ep.reflection_logprobs[r])
            assert (got < 0).all() and len(want) == end - start
            worst = max(worst, float((got - want).abs().max()))
            r += 1
    print(f"{dtype}: worst |trainer - sampler| log-prob {worst:.2e} over {r} rows")
    assert r == len(ep.sequences) and worst < bound, worst
    # the metric update() logs measures the same thing
    cfg = TrainConfig(dtype="fp32", temperature=0.7, beta=0.0, max_reflection_tokens=8).validate()
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    one_rank = T.Dist(rank=0, world=1, local_rank=0, device=torch.device("cpu"), mesh=None)
    stats = T.update(model, opt, mbs, len(mbs), cfg, one_rank)
    assert stats["logp_diff_tokens"] == sum(e - s for s, e in ep.spans)
    assert stats["logp_diff_max"] == pytest.approx(worst, abs=1e-6)
    assert stats["kl_scored"] is False  # (beta 0: metrics.jsonl's kl is None, not a measured 0)


class StopAtETask(CoinTask):
    """CoinTask whose answer turns end at the first letter "e" (a stand-in for ``</answer>``)."""

    stop_strings = ("e",)


def test_answer_turns_end_at_the_tasks_stop_strings(tiny):
    """First attempts and retries end at the token that writes the first "e"; reflections run on.
    The attempts are the free run's cut there (same seed), a cut attempt is closed by the
    end-of-turn token before the reflection turn, and the verdict reads the cut retry."""
    model, tok, chat = tiny
    examples = CoinTask().examples(n=12, seed=4)
    sampling = EpisodeSampling(temperature=1.0, max_attempt_tokens=24, max_reflection_tokens=24, max_retry_tokens=24, cut_answers="judge")
    free = run_episode(model, tok, CoinTask(), examples, group_size=2, sampling=sampling, seed=5, chat=chat)
    task = StopAtETask()
    ep = run_episode(model, tok, task, examples, group_size=2, sampling=sampling, seed=5, chat=chat)

    def cut(ids):
        for j in range(1, len(ids) + 1):
            if "e" in chat.decode(ids[:j]):
                return ids[:j]
        return ids

    assert [cut(a) for a in free.first_attempts] == ep.first_attempts
    n_cut = sum(cut(a) != a for a in free.first_attempts)
    assert n_cut >= 3
    for a in ep.first_attempts:
        assert "e" not in chat.decode(a[:-1]) and ("e" in chat.decode(a) or closed(a) or len(a) == 24)
    # reflections are not cut: some write an "e" and go on after it
    assert any("e" in chat.decode(ep.sequences[r][s:e - 1]) for r, (s, e) in enumerate(ep.spans))
    for r, rec in enumerate(ep.records):
        parts = split_row(ep, chat, task, r)
        retry = parts["retry"]
        assert "e" not in chat.decode(retry[:-1])
        assert rec["retry"] == chat.decode(retry)
        assert ep.rewards.view(-1)[r] == float(task.verify(rec["example"], rec["retry"]))
        attempt = parts["attempt"]
        if not closed(attempt):  # cut (or at the limit): the template's end-of-turn comes first
            assert parts["reflect_turn"][0] == EOS


def test_episode_with_the_cuda_graph_decode_equals_eager(tiny, monkeypatch):
    """A whole episode (attempts cut at stop strings, select, a new session per failure, forks,
    reflections, retries) decoded the CUDA-graph way -- in the model's static cache, rows padded,
    compacted in place; forced here, where inductor leaves the graphs out -- samples what the
    eager sampler samples: the same sequences, spans, rewards and log-probs."""
    import dataclasses

    import r3.decode
    from r3.packed_linear import PackedWeights

    model, tok, chat = tiny
    examples = CoinTask().examples(n=12, seed=6)
    # (T = 0.7: at T = 1 this sharp model puts a few draws so near a boundary of the CDF that
    # the compiled step's rounding -- any batch size, graphs or not -- flips them)
    sampling = EpisodeSampling(temperature=0.7, max_attempt_tokens=16, max_reflection_tokens=12, max_retry_tokens=16, cut_answers="judge")
    eager = run_episode(model, tok, StopAtETask(), examples, group_size=3, sampling=sampling, seed=7, chat=chat)
    monkeypatch.setattr(r3.decode, "CUDA_GRAPHS", True)  # (the decode path a GPU takes: no prepacked weights)
    monkeypatch.setattr(PackedWeights, "available", staticmethod(lambda model: False))
    graphs = run_episode(model, tok, StopAtETask(), examples, group_size=3, seed=7, chat=chat,
                         sampling=dataclasses.replace(sampling, decode="compiled"))
    assert r3.decode.static_cache(model).full is not None  # it did decode in the static cache
    assert len(eager.sequences) >= 6
    assert graphs.first_attempts == eager.first_attempts
    assert graphs.sequences == eager.sequences and graphs.spans == eager.spans
    assert torch.equal(graphs.rewards, eager.rewards)
    for a, b in zip(graphs.reflection_logprobs, eager.reflection_logprobs):
        assert a == pytest.approx(b, abs=1e-5)


def test_a_turn_ended_by_another_stop_id_is_closed_by_the_end_of_turn_token(tiny, tmp_path):
    """Every stop id ends a turn, not only the end-of-turn token: with the checkpoint's eos
    (here ``<|endoftext|>``, id 0, which the model favours) among the stop ids, attempts and
    reflections end at it, the reflection's span keeps it (it was sampled) and stops there, and
    the next user turn writes ``<|im_end|>`` after it, which no span covers. Sampling on past
    the eos would train tokens the rollout was meant never to produce."""
    _, tok, _ = tiny
    model, tok = load(str(build_tiny_chat_model(tmp_path / "eos0", tok, eos=0, eos_logit=7.5)))
    chat = ChatFormat(tok, eos_token_ids=[0])
    assert 0 in chat.stop_ids and chat.end_of_turn_id == EOS
    task = CoinTask(always=False)
    ep = run_episode(model, tok, task, task.examples(n=4), group_size=2, sampling=SAMPLING, seed=1, chat=chat)
    assert any(a[-1] == 0 for a in ep.first_attempts)
    assert all(0 not in a[:-1] for a in ep.first_attempts)
    ended = 0
    for r in range(len(ep.sequences)):
        p = split_row(ep, chat, task, r)
        assert 0 not in p["reflection"][:-1]
        if p["attempt"][-1] == 0:
            assert p["reflect_turn"][0] == EOS
        if p["reflection"][-1] == 0:
            ended += 1
            start, end = ep.spans[r]
            assert p["seq"][end - 1] == 0 and p["seq"][end] == EOS and p["retry_turn"][0] == EOS
    assert ended > 0


def test_max_failures_zero_keeps_no_failure(tiny):
    """max_failures caps the failures kept, 0 included: a cap of 0 read as "no cap" would
    reflect on every failure of the batch (a rank's share of the groups exceeded)."""
    model, tok, chat = tiny
    task = CoinTask(always=False)
    ep = run_episode(model, tok, task, task.examples(n=3), group_size=2, max_failures=0, sampling=SAMPLING,
                     seed=0, chat=chat)
    assert (ep.queries, ep.first_success, len(ep.first_attempts)) == (3, 0, 3)
    assert ep.sequences == [] and ep.group_indices == [] and ep.rewards.shape == (0, 2)
    # stored attempts: the same empty episode (it raised ValueError from max() over no rows)
    ep = run_episode(model, tok, task, task.examples(n=2), group_size=2, max_failures=0, sampling=SAMPLING,
                     seed=0, chat=chat, failed_attempts=[[5, 6], [7]])
    assert (ep.queries, ep.first_success, ep.generated_tokens) == (0, 0, 0)
    assert ep.sequences == [] and ep.group_indices == [] and ep.rewards.shape == (0, 2)


class PlainPromptsTask:
    """A duck-typed plug-in (not a Task): plain ``reflection_prompt`` / ``retry_prompt``
    attributes, no ``*_message`` methods, and a verify that fails every answer."""

    name = "plain"
    reflection_prompt = "Plain reflection prompt."
    retry_prompt = "Plain retry prompt."

    def messages(self, example):
        return [{"role": "user", "content": f"Say something about {example['word']}."}]

    def verify(self, example, completion_text):
        return False


def test_a_plug_in_without_turn_methods_is_asked_with_its_plain_prompts(tiny):
    """A task without ``reflection_message`` / ``retry_message`` gets its ``reflection_prompt``
    before the reflection and its ``retry_prompt`` before the retry (not one prompt for both)."""
    model, tok, chat = tiny
    task = PlainPromptsTask()
    examples = CoinTask().examples(n=2)
    ep = run_episode(model, tok, task, examples, group_size=2, sampling=SAMPLING, seed=2, chat=chat)
    refl = chat.encode(REFLECT_TURN.format(task.reflection_prompt))
    retry = chat.encode(REFLECT_TURN.format(task.retry_prompt))
    assert len(ep.sequences) == 4 and ep.rewards.sum() == 0
    for r in range(4):
        p = split_row(ep, chat, task, r)
        assert p["reflect_turn"] == ([] if closed(p["attempt"]) else [EOS]) + refl
        assert p["retry_turn"] == ([] if closed(p["reflection"]) else [EOS]) + retry


def test_an_episode_never_samples_the_checkpoints_padded_vocabulary_rows(builtin, tmp_path):
    """A checkpoint whose embedding is padded past the tokenizer's vocabulary (here by 32 rows, to
    which the LM head gives the largest logits): every attempt, reflection and retry samples only
    the tokenizer's ids (an id past it would decode to nothing, be trained as a reflection token,
    and break the next prefill's embedding lookup on a checkpoint without the rows)."""
    from conftest import make_tiny_hf

    tok = builtin[1]
    hf = make_tiny_hf(tmp_path / "padded", "llama", vocab_size=len(tok) + 32, tie_word_embeddings=False,
                      max_position_embeddings=1024)
    with torch.no_grad():
        hf.lm_head.weight[len(tok):] = 0.0
        hf.lm_head.weight[len(tok):, 0] = 30.0 * torch.sign(hf.model.norm.weight[0])
        hf.model.embed_tokens.weight[:, 0] = 8.0
    hf.save_pretrained(str(tmp_path / "padded"))
    tok.save_pretrained(str(tmp_path / "padded"))
    model, tok = load(str(tmp_path / "padded"))
    assert model.config.vocab_size == len(tok) + 32
    chat = ChatFormat(tok)
    task = CoinTask(always=False)
    ep = run_episode(model, tok, task, task.examples(n=2), group_size=2, sampling=SAMPLING, seed=0, chat=chat)
    assert len(ep.sequences) == 4
    assert all(max(seq) < len(tok) for seq in ep.sequences + ep.first_attempts)


def test_an_episode_runs_with_a_tokenizer_longer_than_the_models_vocabulary(builtin, tmp_path):
    """A tokenizer may hold ids the model has no row for (transformers adds ``<mask>`` to a Gemma
    GGUF vocabulary that lacks it): an episode samples only ids both have. Before, it stopped at
    its first step with "vocab_size 49153 must be in [1, 49152]"."""
    from conftest import make_tiny_hf

    tok = builtin[1]
    n = len(tok)
    make_tiny_hf(tmp_path / "short", "llama", vocab_size=n, max_position_embeddings=1024)
    tok.save_pretrained(str(tmp_path / "short"))
    model, tok = load(str(tmp_path / "short"))
    tok.add_tokens(["<extra_past_the_model>"])
    assert len(tok) == n + 1 and model.config.vocab_size == n
    task = CoinTask(always=False)
    ep = run_episode(model, tok, task, task.examples(n=2), group_size=2, sampling=SAMPLING, seed=0,
                     chat=ChatFormat(tok))
    assert len(ep.sequences) == 4
    assert all(max(seq) < n for seq in ep.sequences + ep.first_attempts)


def test_group_size_is_0_for_an_episode_without_groups(tiny):
    """Episode.group_size is the G of the rows it holds, read from its rewards: an episode whose
    queries all passed holds no row and says 0, not the G it was asked for; with groups, G."""
    model, tok, chat = tiny
    ok = CoinTask(always=True)
    ep = run_episode(model, tok, ok, ok.examples(n=2), group_size=3, sampling=SAMPLING, seed=0, chat=chat)
    assert ep.rewards.shape == (0, 3) and ep.group_size == 0
    bad = CoinTask(always=False)
    ep = run_episode(model, tok, bad, bad.examples(n=1), group_size=3, sampling=SAMPLING, seed=0, chat=chat)
    assert ep.group_size == 3 and len(ep.sequences) == 3


def test_records_say_which_reflections_and_retries_the_token_limit_cut_off(tiny, monkeypatch):
    """``reflection_cut`` / ``retry_cut`` in each record: the row's own ``finished`` of the sample
    call that wrote it, negated (a cut retry's final equation is where the limit fell, and
    ``r3.audit`` counts the rewarded ones); row r of the records is row r of the group-forked
    session, whose reflections and retries run as r // group_size's failure."""
    from r3 import sampler as S

    model, tok, chat = tiny
    task = CoinTask(always=False)
    ep = run_episode(model, tok, task, task.examples(n=3), group_size=2, sampling=SAMPLING, seed=0, chat=chat)

    def cut(spans, limit):  # (ran to the limit without ending on a stop id: CoinTask has no stop strings)
        return [e - s == limit and ep.sequences[r][e - 1] not in chat.stop_ids for r, (s, e) in enumerate(spans)]

    assert [r["reflection_cut"] for r in ep.records] == cut(ep.spans, SAMPLING.max_reflection_tokens)
    assert [r["retry_cut"] for r in ep.records] == cut(ep.retry_spans, SAMPLING.max_retry_tokens)
    assert {r["retry_cut"] for r in ep.records} == {True, False}  # (this seed has both)
    assert ep.first_cut == [len(a) == SAMPLING.max_attempt_tokens and a[-1] not in chat.stop_ids
                            for a in ep.first_attempts]
    from r3.heldout import evaluate_batch

    recs = evaluate_batch(model, tok, task, task.examples(n=3), SAMPLING, seed=0, chat=chat, records=True)["records"]
    assert all(isinstance(r["attempt_cut"], bool) for r in recs)
    assert all(isinstance(r["reflection_cut"], bool) and isinstance(r["retry_cut"], bool) for r in recs if "retry" in r)

    sample = S.Session.sample
    calls = []

    def marked(self, *args, **kw):
        out = sample(self, *args, **kw)
        calls.append(len(calls))
        out.finished = [(i + len(calls)) % 3 == 0 for i in range(len(out.finished))]  # (another pattern per call)
        return out

    monkeypatch.setattr(S.Session, "sample", marked)
    ep = run_episode(model, tok, task, task.examples(n=3), group_size=2, sampling=SAMPLING, seed=0, chat=chat)
    assert len(calls) == 3  # attempt, reflection, retry
    assert [r["reflection_cut"] for r in ep.records] == [(r + 2) % 3 != 0 for r in range(len(ep.records))]
    assert [r["retry_cut"] for r in ep.records] == [(r + 3) % 3 != 0 for r in range(len(ep.records))]


def test_cut_answers_fail_fails_every_answer_the_token_limit_cut_off_and_judges_the_rest(tiny):
    """``cut_answers="fail"``: a first attempt or retry that ran to its limit without the model
    ending it fails unread, with its own reason; every answer the model ended is judged as with
    "judge", and the samples are the same (the rule judges, it does not sample)."""
    from dataclasses import replace

    from r3.episode import CUT_REASON

    model, tok, chat = tiny
    task = CoinTask(always=True)  # (every text passes when it is read)
    examples = task.examples(n=6)
    judged = run_episode(model, tok, task, examples, group_size=2, sampling=SAMPLING, seed=0, chat=chat)
    assert judged.first_passed == [True] * 6 and judged.first_success == 6 and judged.records == []
    assert any(judged.first_cut), "this seed must cut some first attempt off"
    failing = run_episode(model, tok, task, examples, group_size=2, sampling=replace(SAMPLING, cut_answers="fail"),
                          seed=0, chat=chat)
    assert failing.first_attempts == judged.first_attempts and failing.first_cut == judged.first_cut
    assert failing.first_passed == [not c for c in judged.first_cut]
    assert failing.first_reasons == [CUT_REASON if c else "forced" for c in judged.first_cut]
    assert failing.group_indices == [i for i, c in enumerate(judged.first_cut) if c]
    cut = [r["retry_cut"] for r in failing.records]
    assert set(cut) == {True, False}, "this seed must have retries cut off and retries ended"
    assert failing.rewards.flatten().tolist() == [0.0 if c else 1.0 for c in cut]
    assert [r["reason"] for r in failing.records] == [CUT_REASON if c else "forced" for c in cut]
    assert all(r["reward"] == (0.0 if c else 1.0) for r, c in zip(failing.records, cut))
    # each record says why its attempt failed: cut off, so it was never read (its text may pass)
    assert [(r["attempt_cut"], r["attempt_reason"]) for r in failing.records] == [(True, CUT_REASON)] * len(cut)
    stored = run_episode(model, tok, task, examples[:2], group_size=2, sampling=replace(SAMPLING, cut_answers="fail"),
                         seed=0, chat=chat, failed_attempts=judged.first_attempts[:2])
    assert stored.records and not any("attempt_cut" in r or "attempt_reason" in r for r in stored.records)


def test_each_record_names_its_own_attempts_verdict_past_max_failures(tiny, monkeypatch):
    """``attempt_reason`` / ``attempt_cut`` of record r are those of the example its group
    reflects on (``group_indices[r // G]``), also where the failures are not the first examples
    and ``max_failures`` keeps only some."""
    from r3 import episode as E

    model, tok, chat = tiny
    task = CoinTask()
    examples = task.examples(n=7)
    first_pass = {"calls": 0}

    def verdict(task, example, text, finished, cut_answers):  # (first attempts: 3, 4 and 6 fail, each its own why)
        first_pass["calls"] += 1
        if first_pass["calls"] <= len(examples):
            return int(example["id"].rsplit("-", 1)[1]) not in (3, 4, 6), f"why {example['id']}"
        return True, "retry"

    monkeypatch.setattr(E, "judge_answer", verdict)
    ep = run_episode(model, tok, task, examples, group_size=2, max_failures=2, sampling=SAMPLING, seed=0, chat=chat)
    assert ep.group_indices == [3, 4] and len(ep.records) == 4
    assert ep.first_cut[3] != ep.first_cut[4], "this seed must cut one of the two attempts and end the other"
    for r, rec in enumerate(ep.records):
        i = ep.group_indices[r // 2]
        assert rec["example"] == examples[i] and rec["attempt_reason"] == f"why {examples[i]['id']}"
        assert rec["attempt_cut"] == ep.first_cut[i]


def test_cut_answers_must_be_judge_or_fail():
    from r3.errors import R3Error

    assert EpisodeSampling().cut_answers == "fail"  # (only answers the model ended are paid by default)

    with pytest.raises(R3Error, match="cut_answers must be one of judge, fail, got 'drop'"):
        EpisodeSampling(cut_answers="drop")
