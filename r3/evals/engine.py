"""The two request types every benchmark reduces to, run on our model with its KV cache.

* :func:`loglikelihoods`: for each item, a context and several continuations (the choices of a
  multiple-choice question). The context is encoded once per item into the cache; the cache rows
  are then repeated for the item's choices, and all continuations are scored together. Returns,
  per continuation, the summed log-probability of its tokens and whether each was the argmax.
* :func:`generate_until`: greedy generation in batches with our sampler, each row ending at an
  end-of-sequence id or at the first of its stop strings (the text is cut there, as
  lm-evaluation-harness cuts it); stopped rows leave the decode batch (the sampler's compaction).

Token ids in, numbers or token ids out: how text becomes tokens is the caller's
(:func:`encode_pair` does it as the harness's Hugging Face backend does).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from r3.errors import R3Error
from r3.sampler import Session, StopStrings


@dataclass
class Loglikelihood:
    logprob: float  # sum of log p(token | everything before it) over the continuation
    greedy: bool  # every continuation token was the argmax of its distribution


def encode(tokenizer, text: str) -> list[int]:
    """Token ids as the harness's Hugging Face backend makes them: the tokenizer's own default
    special tokens (a BOS for Llama-style tokenizers), none when the text already starts with
    the BOS text (a chat-formatted prompt)."""
    bos = getattr(tokenizer, "bos_token", None)
    return tokenizer.encode(text, add_special_tokens=not (bos and text.startswith(bos)))


def encode_pair(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """Context and continuation ids as the harness makes them: trailing whitespace of the context
    moves to the continuation; the continuation's ids are those of ``context + continuation``
    after the context's own ids."""
    n_space = len(context) - len(context.rstrip())
    if n_space:
        continuation = context[-n_space:] + continuation
        context = context[:-n_space]
    whole = encode(tokenizer, context + continuation)
    ctx = encode(tokenizer, context)
    return ctx, whole[len(ctx):]


def _check_finished(b: int, results, n: int) -> None:
    if not isinstance(results, list) or len(results) != n:
        raise R3Error(f"finished batch {b} read back holds {len(results) if isinstance(results, list) else 'no'} "
                      f"results for its {n} items (a damaged partial results file?)")


SCORE_CHUNK = 256  # positions whose logits exist at once: [256, V] stays small beside the model


def _score_positions(model, hidden: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per position (``hidden`` ``[N, D]``, ``targets`` ``[N]``): the target's log-prob (float32) and
    whether it is the argmax. The LM head runs on ``SCORE_CHUNK`` positions at a time, so the
    ``[N, V]`` logits never exist together."""
    lps, greedy = [], []
    for lo in range(0, hidden.shape[0], SCORE_CHUNK):
        logits = model.logits(hidden[lo: lo + SCORE_CHUNK])
        t = targets[lo: lo + SCORE_CHUNK]
        top, argmax = logits.max(-1)  # the first index of the largest logit, as argmax gives it
        tok = logits.gather(-1, t[:, None]).squeeze(-1).float()
        # log-sum-exp in fp32, shifted by the row's largest logit
        top = top.float()
        lse = top + (logits.float() - top[:, None]).exp_().sum(-1).log_()
        lps.append(tok - lse)
        greedy.append(argmax == t)
    return torch.cat(lps), torch.cat(greedy)


@torch.inference_mode()
def loglikelihoods(model, items: Sequence[tuple[list[int], list[list[int]]]], *, batch_size: int = 8,
                   progress: Callable[[int], None] | None = None, finished: dict[int, list] | None = None,
                   on_batch: Callable[[int, list], None] | None = None) -> list[list[Loglikelihood]]:
    """``items``: ``(context_ids, [continuation_ids, ...])``; every context and continuation
    non-empty. Returns one list of :class:`Loglikelihood` per item, in the order of its choices.

    ``finished``: batches scored by an interrupted run (by batch index; each its items'
    ``[[logprob, greedy], ...]``), taken as they are; ``on_batch(b, result)`` is called with that
    form for each batch scored here. Batches are the same for the same items and ``batch_size``.

    An item's context is prefilled once; its last position's logits score every choice's first
    token, and the choices' remaining tokens are fed together on copies of the context's cache
    rows (positions continue after the context, so each choice sees exactly context + itself).
    """
    for i, (ctx, conts) in enumerate(items):
        if not ctx or not conts or any(not c for c in conts):
            raise ValueError(f"item {i}: empty context or continuation")
    device = model.device
    # Batches of similar lengths (longest first), so little of each batch is padding; results
    # go back to the items' order.
    order = sorted(range(len(items)), key=lambda i: (-(len(items[i][0]) + max(map(len, items[i][1]))), i))
    by_item: dict[int, list[Loglikelihood]] = {}
    finished = finished or {}
    for b, lo in enumerate(range(0, len(items), batch_size)):
        ids = order[lo: lo + batch_size]
        if b in finished:
            _check_finished(b, finished[b], len(ids))
            for i, scores in zip(ids, finished[b]):
                by_item[i] = [Loglikelihood(float(lp), bool(g)) for lp, g in scores]
            continue
        batch = [items[i] for i in ids]
        contexts = [list(c) for c, _ in batch]
        C = max(len(c) for c in contexts)
        L = max(len(k) for _, conts in batch for k in conts)
        rows = [r for r, (_, conts) in enumerate(batch) for _ in conts]
        # Prefill every context once (right-padded; a padded slot is never read by a real token).
        cache = model.new_cache(len(batch), C + L)
        toks = torch.tensor([c + [0] * (C - len(c)) for c in contexts], device=device)
        pos = torch.arange(C, device=device).expand(len(batch), C)
        # (Qwen 3.5's Gated DeltaNet states must not take the padding: lengths keeps it out)
        stateful = bool(model.config.linear_layers)
        lengths = torch.tensor([len(c) for c in contexts], device=device) if stateful else None
        h = model.hidden_states(toks, positions=pos, cache=cache, kv_len=C, lengths=lengths)
        last = torch.tensor([len(c) - 1 for c in contexts], device=device)
        first_h = h[torch.arange(len(batch), device=device), last]  # [items, D]: predicts each choice's token 0
        # One row per choice: feed its tokens but the last, at positions len(context)...
        conts = [k for _, cs in batch for k in cs]
        row_idx = torch.tensor(rows, device=device)
        cache = cache.select(row_idx)
        starts = torch.tensor([len(contexts[r]) for r in rows], device=device)
        T = max(len(k) for k in conts)
        targets = torch.tensor([k + [0] * (T - len(k)) for k in conts], device=device)
        valid = torch.arange(T, device=device)[None, :] < torch.tensor([len(k) for k in conts], device=device)[:, None]
        hidden = first_h[row_idx][:, None, :]
        if T > 1:
            feed = targets[:, :-1]
            fpos = starts[:, None] + torch.arange(T - 1, device=device)
            fed = torch.tensor([len(k) - 1 for k in conts], device=device) if stateful else None
            h = model.hidden_states(feed, positions=fpos, cache=cache, kv_len=int(fpos.max()) + 1, lengths=fed)
            hidden = torch.cat([hidden, h], dim=1)  # [choices, T, D]
        # score only the real (unpadded) positions
        tok_lp, tok_greedy = _score_positions(model, hidden[valid], targets[valid])
        row_of = torch.arange(len(conts), device=device)[:, None].expand(-1, T)[valid]
        lp = torch.zeros(len(conts), device=device).index_add_(0, row_of, tok_lp)
        greedy = torch.zeros(len(conts), device=device).index_add_(0, row_of, (~tok_greedy).float()).eq(0)
        k, lp, greedy = 0, lp.tolist(), greedy.tolist()  # (one read-back per batch)
        for i, (_, cs) in zip(ids, batch):
            by_item[i] = [Loglikelihood(float(lp[k + j]), bool(greedy[k + j])) for j in range(len(cs))]
            k += len(cs)
        if on_batch:
            on_batch(b, [[[x.logprob, x.greedy] for x in by_item[i]] for i in ids])
        if progress:
            progress(len(by_item))
    return [by_item[i] for i in range(len(items))]


def _cut(text: str, stops: Sequence[str]) -> tuple[str, bool]:
    """``text`` up to the first occurrence of any stop string, and whether one occurred."""
    cut = min((i for i in (text.find(s) for s in stops if s) if i >= 0), default=-1)
    return (text[:cut], True) if cut >= 0 else (text, False)


@torch.inference_mode()
def generate_until(model, tokenizer, prompts: Sequence[list[int]], *, until: Sequence[str], max_new_tokens: int,
                   stop_token_ids: Sequence[int] = (), batch_size: int = 16,
                   progress: Callable[[int], None] | None = None, finished: dict[int, list[str]] | None = None,
                   on_batch: Callable[[int, list[str]], None] | None = None) -> list[str]:
    """Greedy continuations of ``prompts`` (token ids), decoded, each cut at the first of the
    ``until`` strings (not included) or ended at a stop id, after at most ``max_new_tokens``.

    Prompts run longest first, ``batch_size`` at a time, so a batch's prompts have similar
    lengths. A row stops at a stop id or once its tokens complete one of the ``until`` strings;
    once a quarter of the batch has stopped, the sampler goes on with the live rows only.
    ``finished``: batches generated by an interrupted run (by batch index; each its texts),
    taken as they are; ``on_batch(b, texts)`` is called for each batch generated here."""
    # An ``until`` string that is a special token's text (``<|im_end|>``) never shows in text
    # decoded without special tokens: it stops as that token's id, as the harness's stopping
    # criterion (which decodes with them) stops.
    added = tokenizer.get_added_vocab() if hasattr(tokenizer, "get_added_vocab") else {}
    stop_ids = sorted(set(int(i) for i in stop_token_ids) | {int(added[u]) for u in until if u in added})
    stops = StopStrings([u for u in until if u], lambda ids: tokenizer.decode(ids, skip_special_tokens=True)) \
        if any(until) else None
    order = sorted(range(len(prompts)), key=lambda i: (-len(prompts[i]), i))
    texts: list[str] = [""] * len(prompts)
    finished = finished or {}
    for b, lo in enumerate(range(0, len(prompts), batch_size)):
        idx = order[lo: lo + batch_size]
        if b in finished:
            _check_finished(b, finished[b], len(idx))
            for i, text in zip(idx, finished[b]):
                texts[i] = text
            continue
        longest = max(len(prompts[i]) for i in idx)
        session = Session.start(model, [prompts[i] for i in idx], max_len=longest + max_new_tokens,
                                vocab_size=len(tokenizer))
        s = session.sample(max_new_tokens, temperature=0.0, stop_token_ids=stop_ids, stop_strings=stops)
        for i, new in zip(idx, s.tokens):
            if new and new[-1] in stop_ids:
                new = new[:-1]
            texts[i] = _cut(tokenizer.decode(new, skip_special_tokens=True), until)[0]
        if on_batch:
            on_batch(b, [texts[i] for i in idx])
        if progress:
            progress(min(lo + batch_size, len(prompts)))
    return texts
