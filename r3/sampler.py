"""Batched sampling with the KV cache: ragged prompts, temperature / top-k / top-p, per-row stop
tokens, G samples per prompt sharing one prefill, and conversations continued from the cache.

Two entry points:

* :func:`generate` -- one call: prompts in, completions out (the design contract).
* :class:`Session` -- the conversation API the attempt/reflect/retry episode is built on. It holds
  the KV cache and every row's full token history, and supports, without recomputing any prefix::

      s = Session.start(model, prompts, vocab_size=len(tok), seed=0)    # prefill once
      first = s.sample(256, stop_token_ids=[eos])                       # attempts
      s = s.select(failed_rows)                                         # keep some rows
      s.append(reflect_turn_ids)                                        # user turn (ragged per row)
      s = s.fork(G)                                                     # G copies of each row
      refl = s.sample(128, stop_token_ids=[eos])                        # G reflections per row
      s.append(retry_turn_ids); retry = s.sample(256, stop_token_ids=[eos])
      s.tokens[i]                                                       # row i, whole conversation

How the cache is driven (what makes continuation exact)
------------------------------------------------------
Every row keeps the invariant: *its history minus the last token is in the cache* (slot ``p`` holds
the token at position ``p``), and the last token -- the *pending* token -- is not. ``start``
prefills ``prompt[:-1]``; ``append(toks)`` feeds ``[pending] + toks[:-1]`` and makes ``toks[-1]``
pending; ``sample`` feeds the pending token as its first decode step, and the last sampled token
becomes pending. So the last prompt token of a fork is computed once per copy (one decode step),
while the whole prefix is computed once and copied by ``select``/``fork``.

Slots at or beyond a row's cached length hold garbage (right-padding of a ragged feed, or nothing
yet). That is harmless: every forward writes a row's new tokens contiguously from its cached length
before anything attends to them, and a query at position ``p`` reads only slots ``<= p``.

A row that samples a stop token stops producing tokens while the batch goes on: from then on its
decode steps re-feed the stop token at the stop token's own position (``positions`` frozen), which
writes that token's true keys/values to its own slot and touches nothing else; its outputs are
ignored. The stop token stays pending, so a later ``append`` continues the conversation exactly
as a fresh prefill of the whole history would. Once a quarter of the decode batch has stopped,
the batch is *compacted*: the live rows' cache rows are copied into a smaller cache, decoding goes
on there, and what they decode is written back into the session's cache (at the next compaction,
which then copies from the session's cache, or at the end). So a rollout holds at most the
session's cache plus a copy of three quarters of it. A row ended by a stop string keeps its
tokens up to the one that completed it; that token is pending as a stop token would be.

With CUDA graphs (``decode="compiled"`` on CUDA) every decode batch runs in the model's one
static cache instead (:class:`r3.decode.StaticKVCache`, so that graphs are recorded once per
process): ``sample`` copies the rows' cache in, a compaction moves the live rows to its first rows
in place (only when that lowers the padded row count the graphs run at), and what was decoded is
written back at each compaction and at the end. With the pick fused into the step (greedy, or no
top-k / top-p) it decodes in graph runs (:class:`r3.decode.GraphRuns`): one graph per
``GRAPH_RUN_STEPS`` steps, stops checked between runs, so a batch whose rows have all stopped may
run on to the end of a run (``Samples.steps`` counts those steps too). The samples are the same
either way.

Random streams
--------------
Each :meth:`Session.sample` call draws one 62-bit key per row from the session's generator; row
``b``'s uniform at step ``t`` is a hash of ``(key_b, t)`` (:func:`row_uniforms`). So a row's draws
do not depend on which other rows share the decode batch: compaction, and stops, change no draw.
The tokens are the same too where a row's logits do not depend on the batch's size (matmul
libraries may round differently at other sizes: bf16 oneDNN, and 1-2 row fp32 matmuls on CPU).

Log-probabilities (float32)
---------------------------
Each sampled token's log-prob is under the distribution it was drawn from: ``log_softmax`` of
``logits / temperature`` restricted to the real vocabulary, after top-k and top-p filtering, i.e.
renormalised over the kept tokens. With ``temperature=1``, ``top_k=0``, ``top_p=1`` that is exactly
a teacher-forced forward's ``log_softmax`` (over the real vocabulary). With ``temperature=0``
(greedy) it is the log-softmax of the raw logits (temperature 1, no filtering) at the argmax.
Logits are computed in the model's dtype (as ``model(tokens)`` does) and the softmax in float32.

Never samples ids ``>= vocab_size`` (:func:`sampling_vocab_size`: the ids both the tokenizer and
the model have; by default what :func:`r3.checkpoint.load` recorded from the tokenizer it loaded):
checkpoints often pad the embedding matrix, and the LM head is applied to the real rows only.

Performance
-----------
The decode loop does no per-row Python work: tokens, positions and stop flags are tensors, the
output buffers ``[B, max_new_tokens]`` are preallocated, and the host counts the stopped rows
with one ``.item()``-style sync every ``sync_every`` steps (only when there are stop tokens; in
graph runs, at the end of the run that reaches each multiple). Stop
strings are the exception: at each such check, every live row's last few tokens are decoded to
text (a tokenizer call per row, a few microseconds).
``kv_len`` is tracked as a Python int, so attention reads only the used cache slots. Sampling is
an inverse-CDF draw (see :func:`pick_tokens`); top-k uses ``topk`` only when ``k > 0`` and top-p
sorts only when ``top_p < 1``. The decode step is the model's own forward, eager or compiled
(:mod:`r3.decode`; on CPU its matmuls run on oneDNN-prepacked weights).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, Sequence

import torch

import r3.decode as decode_mod
from r3.decode import DECODE_MODES, DecodeStep, graph_rows, session_slots, static_cache
from r3.errors import R3Error

#: Padded tokens per prefill chunk (rows are prefilled in groups of at most this many tokens).
PREFILL_TOKENS = 16384
#: The tokens pad value in ``Samples.token_tensor``.
PAD = -1
#: A decode batch is compacted to its live rows once at least this fraction of it has stopped.
COMPACT_FRACTION = 0.25
#: Names how a seed becomes the sampler's uniforms (:func:`row_uniforms`). Results that pair
#: samples across runs by seed (the learning-curve benchmark's stored untrained evaluation) record
#: it, so a change of streams is not mistaken for the same draws.
RANDOM_STREAMS = "per-row-fmix32-v1"


def sampling_vocab_size(model, tokenizer) -> int:
    """The ids a sampler may draw: those both the tokenizer and the model have (an embedding
    padded past the tokenizer has rows no text decodes from; a tokenizer may hold tokens the model
    has no row for, as transformers adds ``<mask>`` to a Gemma GGUF vocabulary that lacks it)."""
    return min(len(tokenizer), model.config.vocab_size)


class SamplingError(R3Error, ValueError):
    """A bad sampling argument (an R3Error, so CLIs print one line and exit 2)."""


class StopStrings:
    """Texts that end a row when its sampled tokens produce one (e.g. ``"</answer>"``): the row
    keeps every token up to the one that completes the text, which may carry a few characters
    after it. ``decode``: token ids -> text (the tokenizer's). Each step decodes only a row's last
    ``window`` tokens (a text of n bytes spans at most n tokens, plus one for a character split
    across tokens), so the check costs the same at any length. Tokens whose own text is empty (the
    special tokens a decoder skips) do not count toward the window: a row that holds some decodes
    back past them.

    ``confirm``: optional, the row's tokens so far -> whether a stop string it now completes
    counts (a task's stop string written inside a reasoning block does not); asked only when the
    window shows one."""

    def __init__(self, strings: Sequence[str], decode, confirm=None):
        self.strings = tuple(str(x) for x in strings)
        if not self.strings or any(not x for x in self.strings):
            raise SamplingError(f"stop strings must be non-empty texts, got {list(strings)!r}")
        self.decode = decode
        self.confirm = confirm
        self.window = max(len(x.encode("utf-8")) for x in self.strings) + 1
        self._text: set[int] = set()  # token ids whose own text is not empty (others: below)
        self._blank: set[int] = set()  # token ids whose own text is empty

    def completed(self, tokens: Sequence[int], whole=None) -> bool:
        """Whether ``tokens`` (a row's sampled tokens so far, or at least their last ``window``)
        end in a stop string's occurrence that counts, i.e. hold one that is not in
        ``tokens[:-1]``, given that ``tokens[:-1]`` holds none that counted. ``whole``: a
        function that returns all of the row's tokens, for ``confirm`` and for a window that
        holds empty tokens (default: ``tokens``)."""
        toks = list(tokens[-self.window:])
        if not self._text.issuperset(toks) and any(self._is_blank(t) for t in toks):  # (counted in tokens with text)
            toks = list(tokens if whole is None else whole())
            start, n = len(toks), 0
            while start > 0 and n < self.window:
                start -= 1
                n += not self._is_blank(toks[start])
            toks = toks[start:]
        text = self.decode(toks)
        if not any(x in text for x in self.strings):
            return False
        return self.confirm is None or bool(self.confirm(list(tokens if whole is None else whole())))

    def _is_blank(self, token: int) -> bool:
        if token not in self._text and token not in self._blank:
            (self._text if self.decode([token]) else self._blank).add(token)
        return token in self._blank


@dataclass
class Samples:
    """What :meth:`Session.sample` and :func:`generate` return; row ``i`` is the session's row ``i``
    (for ``generate``: prompt ``i // num_samples``, sample ``i % num_samples``).

    ``tokens[i]`` -- the completion's token ids, the stop token included when one was hit.
    ``logprobs[i]`` -- float log-prob of each of those tokens (see the module docstring).
    ``finished[i]`` -- True when the row ended on a stop token or stop string (False: it hit
    ``max_new_tokens``).
    ``token_tensor`` / ``logprob_tensor`` -- the same, as ``[rows, steps]`` tensors on the model's
    device, padded with ``PAD`` (-1) / 0.0 past each row's ``lengths[i]``.
    Timing (seconds, wall clock, synchronised on CUDA): ``prefill_s`` (feeding prompts / appended
    turns; for ``Session.sample`` 0), ``decode_s`` (the sampling loop); ``steps`` decode steps run.
    """

    tokens: list[list[int]]
    logprobs: list[list[float]]
    finished: list[bool]
    lengths: list[int]
    token_tensor: torch.Tensor
    logprob_tensor: torch.Tensor
    steps: int = 0
    prefill_s: float = 0.0
    decode_s: float = 0.0

    @property
    def new_tokens(self) -> int:
        """Total completion tokens over all rows."""
        return sum(self.lengths)

    @property
    def tokens_per_s(self) -> float:
        """Completion tokens per second of wall time (prefill + decode)."""
        total = self.prefill_s + self.decode_s
        return self.new_tokens / total if total > 0 else float("inf")

    @property
    def decode_tokens_per_s(self) -> float:
        return self.new_tokens / self.decode_s if self.decode_s > 0 else float("inf")


# --------------------------------------------------------------------------------------------
# Choosing the next token
# --------------------------------------------------------------------------------------------


def check_sampling_args(max_new_tokens: int, temperature: float, top_k: int, top_p: float) -> None:
    if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise SamplingError(f"max_new_tokens must be a positive integer, got {max_new_tokens!r}")
    if not temperature >= 0:  # also rejects NaN
        raise SamplingError(f"temperature must be >= 0, got {temperature!r}")
    if not isinstance(top_k, int) or top_k < 0:
        raise SamplingError(f"top_k must be an integer >= 0 (0 = off), got {top_k!r}")
    if not 0 < top_p <= 1:
        raise SamplingError(f"top_p must be in (0, 1] (1 = off), got {top_p!r}")


def pick_tokens(
    logits: torch.Tensor,
    *,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    generator: torch.Generator | None = None,
    u: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Next tokens ``[B]`` (long) and their float32 log-probs ``[B]`` from ``logits [B, V]``.

    Sampling is by inverse CDF with one uniform per row (``cumsum`` + ``searchsorted``): an exact
    draw, reproducible by seed, no host sync, and a few passes over ``[B, V]`` -- several times
    cheaper on CPU than ``multinomial`` or exponential/Gumbel noise for every logit. Filtered-out
    tokens have probability exactly 0 and can never be drawn. ``u``: the uniforms ``[B, 1]`` in
    [0, 1) (the sampler's per-row streams, :func:`row_uniforms`); None: drawn from ``generator``.
    """
    if temperature == 0:
        return pick_greedy(logits)
    V = logits.shape[-1]
    if u is None:
        u = torch.rand(logits.shape[0], 1, device=logits.device, generator=generator)
    if _unfiltered(top_k, top_p, V):
        return pick_sampled(logits, u, temperature)
    x = logits.float()
    x = x / temperature if temperature != 1 else x
    index = None  # when set, x is in sorted (descending) space: token id = index[b, j]
    if 0 < top_k < V:
        x, index = _ties_by_id(*torch.topk(x, top_k, dim=-1))
        if top_p < 1:
            x = _nucleus(x, x.logsumexp(-1, keepdim=True), top_p)
    elif top_p < 1:
        x, index = _top_p_candidates(x, top_p)
    return _draw(x.softmax(-1), u, index)


def _unfiltered(top_k: int, top_p: float, vocab_size: int) -> bool:
    """No top-k / top-p filtering applies: the draw is :func:`pick_sampled`."""
    return not 0 < top_k < vocab_size and top_p >= 1


def pick_greedy(logits: torch.Tensor, u=None, temperature=None) -> tuple[torch.Tensor, torch.Tensor]:
    """The argmax (the first maximal index) and its log-prob under the raw logits."""
    x = logits.float()
    V = x.shape[-1]
    # Two passes with plain reductions (the max, then exp-sum and the first index at the max):
    # faster than ``max(-1)`` + ``logsumexp`` on CPU, eager and compiled (index tracking in a
    # vectorised max is slow). The clamp keeps the id valid if a row is all NaN.
    best = x.amax(-1, keepdim=True)
    first = torch.where(x == best, torch.arange(V, device=x.device), V).amin(-1).clamp_max(V - 1)
    return first, -(x - best).exp().sum(-1).log()


def pick_sampled(logits: torch.Tensor, u: torch.Tensor, temperature) -> tuple[torch.Tensor, torch.Tensor]:
    """A draw from ``softmax(logits / temperature)`` (no top-k / top-p) with uniforms ``u [B, 1]``;
    ``temperature``: a float or a 0-d float32 tensor (the compiled step passes one)."""
    x = logits.float()
    if not (isinstance(temperature, (int, float)) and temperature == 1):
        x = x / temperature
    return _draw(torch.softmax(x, -1), u, None)


def _draw(probs: torch.Tensor, u: torch.Tensor, index: torch.Tensor | None):
    """Inverse-CDF draw of one token per row of ``probs [B, K]`` with uniforms ``u [B, 1]``;
    ``index`` maps columns to token ids (None: the column is the id)."""
    cdf = probs.cumsum(-1)
    total = cdf[:, -1:].contiguous()
    j = torch.searchsorted(cdf, u * total, right=True)
    # u * total can round up to total: then take the last token of non-zero probability (the
    # first index where the CDF reaches its total; adding exact zeros leaves it unchanged).
    j = torch.minimum(j, torch.searchsorted(cdf, total, right=False))
    lp = probs.gather(-1, j).log()[:, 0]
    tok = j[:, 0] if index is None else index.gather(-1, j)[:, 0]
    return tok, lp


def _nucleus(sorted_x: torch.Tensor, log_norm: torch.Tensor, top_p: float) -> torch.Tensor:
    """Mask (to -inf) the tokens outside the nucleus of descending-sorted logits, whose
    probabilities are ``exp(x - log_norm)``: keep the smallest prefix whose mass reaches
    ``top_p``, i.e. drop a token when the mass strictly before it already does (as transformers'
    TopPLogitsWarper; the first token is always kept)."""
    probs = (sorted_x - log_norm).exp()
    return sorted_x.masked_fill(probs.cumsum(-1) - probs >= top_p, float("-inf"))


def _top_p_candidates(x: torch.Tensor, top_p: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Nucleus-filtered, descending-sorted logits and their token ids. A full sort of
    ``[B, V]`` is slow on CPU (tens of ms per step), so on CPU try the top 256, then 4096 tokens
    first: when they hold ``top_p`` of the mass in every row, the nucleus lies inside them and
    the result is that of a full sort (one cheap host sync per attempt). Elsewhere: a full sort."""
    V = x.shape[-1]
    log_norm = x.logsumexp(-1, keepdim=True)
    if x.device.type == "cpu":
        for k in (256, 4096):
            if k >= V:
                break
            vals, index = _ties_by_id(*torch.topk(x, k, dim=-1))
            mass = (vals - log_norm).exp().sum(-1)
            if bool((mass >= top_p + 1e-4).all()):  # a margin for the summation order
                return _nucleus(vals, log_norm, top_p), index
    vals, index = torch.sort(x, dim=-1, descending=True, stable=True)
    return _nucleus(vals, log_norm, top_p), index


def _ties_by_id(vals: torch.Tensor, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Candidates from ``topk`` reordered by (logit descending, token id ascending), the order a
    stable full sort gives: ``topk`` leaves tied logits in no set order, and which candidate set
    a batch uses depends on its other rows, so without this a row's draw at a tie could change
    with the rows beside it."""
    index, by_id = index.sort(dim=-1)
    vals, by_val = vals.gather(-1, by_id).sort(dim=-1, descending=True, stable=True)
    return vals, index.gather(-1, by_val)


_M32 = 0xFFFFFFFF


def _mul32(x: torch.Tensor, m: int) -> torch.Tensor:
    """``x * m mod 2**32`` for int64 ``x`` in [0, 2**32): in two 16-bit halves of ``m``, so no
    intermediate leaves int64's range (signed overflow is not relied on)."""
    lo = x * (m & 0xFFFF)
    hi = ((x * (m >> 16)) & 0xFFFF) << 16
    return (lo + hi) & _M32


def _fmix32(h: torch.Tensor) -> torch.Tensor:
    """MurmurHash3's 32-bit finaliser (a bijection of [0, 2**32) that mixes every bit)."""
    h = h ^ (h >> 16)
    h = _mul32(h, 0x85EBCA6B)
    h = h ^ (h >> 13)
    h = _mul32(h, 0xC2B2AE35)
    return h ^ (h >> 16)


def row_keys(n: int, generator: torch.Generator, device) -> torch.Tensor:
    """``n`` random stream keys (int64 in [0, 2**62)) from ``generator``: one per row of a
    :meth:`Session.sample` call."""
    return torch.randint(0, 2 ** 62, (n,), dtype=torch.long, generator=generator, device=device)


def row_uniforms(keys: torch.Tensor, step) -> torch.Tensor:
    """The uniform ``[B, 1]`` float32 in [0, 1) that row ``b`` uses at decode step ``step``: a
    hash of ``(keys[b], step)`` alone, so a row draws the same numbers whichever other rows share
    its batch (rollouts can drop finished rows without changing any sample). Each row's stream is
    a counter-based generator: two rounds of a 32-bit mix over the key's two halves and the step,
    24 bits out (exact in float32). ``step`` may also be a ``[S]`` tensor of steps: then
    ``[B, S]``, column ``j`` the uniforms of step ``step[j]``."""
    keys = keys[:, None]
    if isinstance(step, int):
        step &= _M32
    steps = torch.as_tensor(step, dtype=torch.long, device=keys.device).reshape(1, -1) & _M32
    lo, hi = keys & _M32, keys >> 32
    h = _fmix32((_mul32(steps, 0x9E3779B9) + lo) & _M32)
    h = _fmix32(h ^ hi)
    return (h >> 8).to(torch.float32) * (1.0 / (1 << 24))


def uniform_table(keys: torch.Tensor, steps: int) -> torch.Tensor:
    """Every uniform a sampling call uses, in one pass: ``[steps, B]``, row ``t`` the rows'
    uniforms at step ``t`` (:func:`row_uniforms`). The decode loop reads row ``t`` (contiguous)
    instead of hashing ~50 tiny tensor ops per step, each a kernel launch on a GPU."""
    return row_uniforms(keys, torch.arange(steps, device=keys.device)).t().contiguous()


def make_generator(device, seed: int | None) -> torch.Generator:
    gen = torch.Generator(device=device)
    if seed is None:
        gen.seed()
    else:
        gen.manual_seed(int(seed))
    return gen


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# --------------------------------------------------------------------------------------------
# Session: a batch of conversations held in one KV cache
# --------------------------------------------------------------------------------------------


class Session:
    """A batch of token sequences (rows) whose prefixes live in one KV cache.

    Build one with :meth:`start`. ``append`` and ``sample`` change the session in place;
    ``select`` and ``fork`` return a new session (copying the chosen cache rows) and leave this
    one usable. ``tokens[i]`` is row ``i``'s whole sequence so far (prompt, sampled tokens,
    appended turns); treat it as read-only.
    """

    def __init__(self, model, cache, rows: list[list[int]], *, vocab_size: int, generator: torch.Generator,
                 prefill_tokens: int = PREFILL_TOKENS, decode: str = "eager", compact: bool = True):
        if decode not in DECODE_MODES:
            raise SamplingError(f"decode must be one of {', '.join(DECODE_MODES)}, got {decode!r}")
        self.model = model
        # Qwen 3.5's Gated DeltaNet layers keep a state each token changes once: padding and rows
        # that have stopped must not reach it (see KVCache)
        self.stateful = bool(model.config.linear_layers)
        self.compact = compact
        self.decode = decode
        self.cache = cache
        self.rows = rows
        self.vocab_size = vocab_size
        self.generator = generator
        self.prefill_tokens = prefill_tokens
        self.prefill_s = 0.0  # time spent feeding tokens (start/append), cumulative

    # ---- construction ------------------------------------------------------------------

    @classmethod
    def start(
        cls,
        model,
        prompts: Sequence[Sequence[int]],
        *,
        max_len: int | None = None,
        vocab_size: int | None = None,
        seed: int | None = None,
        generator: torch.Generator | None = None,
        prefill_tokens: int = PREFILL_TOKENS,
        decode: str = "eager",
        compact: bool = True,
    ) -> "Session":
        """Prefill ``prompts`` (ragged token-id lists, each non-empty) into a new cache.

        ``max_len``: cache slots per row to allocate now (default: the longest prompt; the cache
        grows when ``append``/``sample`` need more, at the cost of a copy -- presize it for the
        whole conversation to avoid that; a compiled session on CPU gets up to two KV buckets
        more, see :func:`r3.decode.session_slots`). ``vocab_size``: the tokenizer's real vocabulary
        (default: ``model.sampling_vocab_size``, which :func:`r3.checkpoint.load` sets from the
        tokenizer it loads, else the model's, padded rows included). ``seed`` / ``generator``: the random stream of ``sample``
        (shared by sessions made from this one with ``select``/``fork``). ``decode``: ``"eager"``
        or ``"compiled"``, the model's decode step run as it is or through ``torch.compile`` (see
        :mod:`r3.decode`: CUDA graphs on CUDA, inductor on CPU; a one-time compile; speeds in
        ``benchmarks/results/sampler_cpu.md``).
        ``prefill_tokens``: padded tokens per prefill chunk. ``compact``: ``sample``'s default
        (drop stopped rows from the decode batch).
        """
        rows = [list(map(int, p)) for p in prompts]
        if not rows:
            raise SamplingError("no prompts given")
        model_vocab = model.config.vocab_size
        if vocab_size is None:  # (a model from r3.checkpoint.load knows its tokenizer's)
            vocab_size = getattr(model, "sampling_vocab_size", model_vocab)
        vocab_size = int(vocab_size)
        if not 0 < vocab_size <= model_vocab:
            raise SamplingError(f"vocab_size {vocab_size} must be in [1, {model_vocab}] (the model's vocabulary)")
        for i, r in enumerate(rows):
            if not r:
                raise SamplingError(f"prompt {i} is empty")
            lo, hi = min(r), max(r)
            if lo < 0 or hi >= model_vocab:
                raise SamplingError(f"prompt {i} has token id {lo if lo < 0 else hi} outside [0, {model_vocab})")
        device = model.device
        if generator is None:
            generator = make_generator(device, seed)
        longest = max(len(r) for r in rows)
        model.inv_freq(device)  # cache RoPE frequencies outside inference mode (a normal tensor)
        with torch.inference_mode():  # every cache is an inference tensor, wherever it is made: a
            # compiled decode step would compile again for the other kind (dynamo guards on it)
            cache = model.new_cache(len(rows), session_slots(decode, device, max(max_len or 0, longest)))
        session = cls(model, cache, rows, vocab_size=vocab_size, generator=generator, prefill_tokens=prefill_tokens,
                      decode=decode, compact=compact)
        session._feed([r[:-1] for r in rows])
        return session

    def _derive(self, rows: list[int]) -> "Session":
        cache = self.cache.select(rows)
        new = Session(self.model, cache, [list(self.rows[r]) for r in rows], vocab_size=self.vocab_size,
                      generator=self.generator, prefill_tokens=self.prefill_tokens, decode=self.decode,
                      compact=self.compact)
        new.prefill_s = self.prefill_s
        return new

    @torch.inference_mode()
    def select(self, rows: Sequence[int]) -> "Session":
        """A new session with the given rows, in that order (repeats allowed)."""
        rows = [int(r) for r in rows]
        if not rows:
            raise SamplingError("select() needs at least one row")
        for r in rows:
            if not 0 <= r < len(self):
                raise SamplingError(f"row {r} out of range for a session of {len(self)} rows")
        return self._derive(rows)

    def fork(self, n: int) -> "Session":
        """A new session with each row repeated ``n`` times, consecutively: rows
        ``[0]*n + [1]*n + ...`` (so new row ``i`` comes from old row ``i // n``)."""
        if n < 1:
            raise SamplingError(f"fork() needs n >= 1, got {n}")
        return self.select([r for r in range(len(self)) for _ in range(n)])

    # ---- state -------------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def tokens(self) -> list[list[int]]:
        """Each row's full token sequence so far (the internal lists: do not mutate)."""
        return self.rows

    @property
    def lengths(self) -> list[int]:
        return [len(r) for r in self.rows]

    @property
    def device(self) -> torch.device:
        return (self.cache.k or self.cache.ssm)[0].device

    def reserve(self, max_len: int) -> None:
        """Make sure every row has ``max_len`` cache slots (grows, by a copy, when needed; a
        compiled session on CPU keeps the margin :func:`r3.decode.session_slots` adds)."""
        need = session_slots(self.decode, self.device, max_len)
        if need > self.cache.max_len:
            with torch.inference_mode():  # (an inference tensor, as in start)
                self.cache = self.cache.grow(need)

    # ---- feeding tokens ----------------------------------------------------------------

    @torch.inference_mode()
    def append(self, new_tokens: Sequence[Sequence[int]]) -> "Session":
        """Append tokens to each row (ragged; an empty list leaves a row as it is), e.g. a user
        turn plus the assistant header. Prefills them now (the prefix is never recomputed).
        Returns ``self``."""
        if len(new_tokens) != len(self):
            raise SamplingError(f"append() got {len(new_tokens)} token lists for {len(self)} rows")
        vocab = self.model.config.vocab_size
        turns = [[int(t) for t in toks] for toks in new_tokens]
        for i, toks in enumerate(turns):  # (all checked before any row changes)
            if toks and (min(toks) < 0 or max(toks) >= vocab):
                raise SamplingError(f"append(): row {i} has a token id outside [0, {vocab})")
        chunks = []
        for row, toks in zip(self.rows, turns):
            chunks.append([row[-1]] + toks[:-1] if toks else [])
            row.extend(toks)
        self._feed(chunks)
        return self

    def _feed(self, chunks: list[list[int]]) -> None:
        """Write ``chunks[b]`` into row b's cache at positions ``cached_len(b)...``; rows are
        right-padded (harmless: see the module docstring) and prefilled in groups."""
        t0 = time.perf_counter()
        # The rows already hold the new tokens: a row's cached length before this feed is its
        # history length - 1 (the pending token) - the tokens fed now.
        starts = [len(r) - 1 - len(c) for r, c in zip(self.rows, chunks)]
        T = max(len(c) for c in chunks)
        if T == 0:
            return
        self.reserve(max(s for s in starts) + T)
        device = self.device
        B = len(chunks)
        with torch.inference_mode():
            per_chunk = max(1, self.prefill_tokens // T)
            for a in range(0, B, per_chunk):
                b = min(B, a + per_chunk)
                live = [i for i in range(a, b) if chunks[i]]
                if not live:
                    continue
                # Only rows that have tokens take part (a contiguous slice keeps the cache a view).
                lo, hi = live[0], live[-1] + 1
                Tc = max(len(chunks[i]) for i in range(lo, hi))
                toks = torch.tensor([chunks[i] + [0] * (Tc - len(chunks[i])) for i in range(lo, hi)])
                start = torch.tensor(starts[lo:hi], dtype=torch.long)
                pos = start[:, None] + torch.arange(Tc)
                kv_len = max(starts[lo:hi]) + Tc
                sub = _rows_view(self.cache, lo, hi)
                lengths = torch.tensor([len(chunks[i]) for i in range(lo, hi)], device=device) if self.stateful else None
                self.model.hidden_states(toks.to(device), positions=pos.to(device), cache=sub, kv_len=kv_len,
                                         lengths=lengths)
        _sync(device)
        self.prefill_s += time.perf_counter() - t0

    # ---- sampling ----------------------------------------------------------------------

    @torch.inference_mode()
    def sample(
        self,
        max_new_tokens: int,
        *,
        temperature: float = 1.0,
        top_k: int = 0,
        top_p: float = 1.0,
        stop_token_ids: Sequence[int] = (),
        generator: torch.Generator | None = None,
        sync_every: int | None = None,
        compact: bool | None = None,
        stop_strings: StopStrings | None = None,
        progress: Callable[[int], None] | None = None,
    ) -> Samples:
        """Sample up to ``max_new_tokens`` tokens for every row, append them to the rows (stop
        token included) and return them. A row that samples one of ``stop_token_ids``, or whose
        tokens complete one of ``stop_strings``, stops; the loop ends when every row has stopped
        or after ``max_new_tokens`` steps. A row's tokens up to its stop do not depend on the stops
        (the same seed gives the run without stops, cut there).

        ``generator``: overrides the session's random stream for this call (it draws one key per
        row; the row's uniforms are :func:`row_uniforms` of that key). ``sync_every``: how often
        (in steps) the host checks whether rows have stopped (default: every step on CPU, every 8
        on other devices; a check is one host sync; in graph runs, at the end of the run that
        reaches each multiple). ``compact`` (default: the session's): at a
        check where at least :data:`COMPACT_FRACTION` of the decode batch has stopped, go on with
        the live rows only (their cache rows copied out, and written back at the end); the
        samples are the same either way. Stop strings are checked at the same points (every step
        on CPU), so with ``sync_every > 1`` a row may run a few steps past its stop string before
        it is stopped; its tokens are cut at the stop all the same. ``progress``: called with the
        steps done so far at the same points (no host sync of its own), for a progress line.
        """
        check_sampling_args(max_new_tokens, temperature, top_k, top_p)
        device = self.device
        gen = generator or self.generator
        B, N = len(self), max_new_tokens
        if sync_every is None:
            sync_every = 1 if device.type == "cpu" else 8
        # (a stateful model's row must stop at its stop string's step: a state cannot take back
        # tokens, so stop strings are checked at every step, and graph runs are off)
        stop_each_step = self.stateful and stop_strings is not None
        if stop_each_step:
            sync_every = 1
        compact = self.compact if compact is None else compact
        t0 = time.perf_counter()
        starts = [len(r) - 1 for r in self.rows]
        base = max(starts)
        self.model.check_positions(base + N)
        self.reserve(base + N)
        step = DecodeStep(self.model, self.decode)
        # (an id outside the vocabulary is never sampled; -1 would match the outputs' padding)
        stop_ids = {t for t in map(int, stop_token_ids) if 0 <= t < self.vocab_size}
        stop = torch.tensor(sorted(stop_ids), dtype=torch.long, device=device)
        has_ids = bool(stop_ids)
        has_stop = has_ids or stop_strings is not None
        # is_stop[token]: one gather per step (isin sorts, and syncs, once the stop ids are many)
        is_stop = torch.zeros(self.vocab_size, dtype=torch.bool, device=device)
        is_stop[stop] = True
        # Stop strings: per row the tokens kept when one ended it; the steps checked so far, and
        # which rows had stopped by then.
        string_end, checked, was_done = [N + 1] * B, 0, torch.zeros(B, dtype=torch.bool, device=device)
        # [N, B]: row t holds the decode batch's uniforms at step t (None: greedy)
        uniforms = None if temperature == 0 else uniform_table(row_keys(B, gen, device), N)

        out_tok = torch.full((B, N), PAD, dtype=torch.long, device=device)
        out_lp = torch.zeros((B, N), dtype=torch.float32, device=device)
        tok = torch.tensor([r[-1] for r in self.rows], dtype=torch.long, device=device)
        pos = torch.tensor(starts, dtype=torch.long, device=device)
        done = torch.zeros(B, dtype=torch.bool, device=device)
        # The decode batch: ``live`` holds the session rows it runs (None: all, in the session's
        # cache); after a compaction ``cache`` is a copy of those rows' cache (slots < ``top``).
        live, cache, top = None, self.cache, base + N
        first_slot = min(starts)
        # With CUDA graphs the batch decodes in the model's static cache (see r3.decode), which
        # compactions rearrange in place; ``staged``: the cache holds a copy to write back.
        static = static_cache(self.model) if step.uses_cuda_graphs(device) else None
        if static is not None:
            ref = self.cache.k[0]
            static.reserve(self.model.config, B, self.cache.max_len, ref.dtype, ref.device)  # (>= top)
            cache = static.copy_in(self.cache, base)
        staged = static is not None
        steps = N
        # The compiled step picks the next token in its own graph when there is no top-k/top-p
        # (the same functions and uniforms as pick_tokens).
        fused = None
        if self.decode == "compiled" and (temperature == 0 or _unfiltered(top_k, top_p, self.vocab_size)):
            fused = pick_greedy if temperature == 0 else pick_sampled
            temp_t = torch.tensor(float(temperature), dtype=torch.float32, device=device)
        # With CUDA graphs and the pick fused, runs of GRAPH_RUN_STEPS steps replay one graph each
        # (r3.decode.GraphRuns), which advances its own tokens, positions and stop flags: these
        # are views of them.
        runs = None
        if static is not None and fused is not None and decode_mod.GRAPH_RUN_STEPS > 1 and not stop_each_step:
            runs = static.graph_runs()
            tok, pos, done = runs.start(self.model, tok, pos, is_stop, temperature, fused, step.lean_guards(device))
        t = 0  # the steps done
        with step.active():  # (the prepacked matmuls, on CPU)
            while t < N:
                if runs is not None:
                    k = runs.run_length(base + t, N - t)
                    toks, lps = runs.run(base + t + k, k, None if uniforms is None else uniforms[t:t + k])
                    if live is None:
                        out_tok[:, t:t + k], out_lp[:, t:t + k] = toks, lps
                    else:
                        out_tok[live, t:t + k], out_lp[live, t:t + k] = toks, lps
                    t += k
                else:
                    k = 1
                    u = None if uniforms is None else uniforms[t][:, None]
                    # (a stateful model: rows that have stopped keep their state; each row's last
                    # token stays pending, as its last slot does)
                    live_rows = ~done if self.stateful and has_stop else None
                    if fused is not None:
                        nxt, lp = step(tok, pos, cache, base + t + 1, self.vocab_size, pick=fused, u=u,
                                       temperature=temp_t, live=live_rows)
                    else:
                        logits = step(tok, pos, cache, base + t + 1, self.vocab_size, live=live_rows)
                        nxt, lp = pick_tokens(logits, temperature=temperature, top_k=top_k, top_p=top_p, u=u)
                    if has_stop:
                        # Stopped rows repeat their stop token at a frozen position (see module docstring).
                        nxt = torch.where(done, tok, nxt)
                        lp = lp.masked_fill(done, 0.0)
                        pos += ~done
                        if has_ids:
                            done |= is_stop[nxt]
                    else:
                        pos += 1
                    if live is None:
                        out_tok[:, t], out_lp[:, t] = nxt, lp
                    else:
                        out_tok[live, t], out_lp[live, t] = nxt, lp
                    tok = nxt
                    t += 1
                checks = t // sync_every != (t - k) // sync_every  # (a multiple of sync_every reached)
                if progress is not None and (checks or t == N):
                    progress(t)
                if not has_stop:
                    continue
                if stop_strings is not None and (checks or t == N):
                    _find_stop_strings(stop_strings, stop_ids, out_tok, live, done, was_done, checked, t, string_end)
                    checked, was_done = t, done.clone()
                if checks and t < N:
                    n_done = int(done.sum())
                    if n_done == len(done):
                        steps = t
                        break
                    # (at least 2 rows stay: a compiled step would specialise on a batch of 1;
                    # in the static cache, only a compaction to fewer padded rows saves work)
                    n_live = len(done) - n_done
                    if (compact and n_done >= COMPACT_FRACTION * len(done) and n_live >= 2
                            and (static is None or graph_rows(n_live) < graph_rows(len(done)))):
                        keep = (~done).nonzero()[:, 0]
                        if staged:  # the session's cache gets what the copy decoded,
                            self._write_back(cache, live, first_slot, base + t)
                            cache = None  # and the copy is freed before the next one is made
                        if static is not None:
                            cache = static.keep_rows(keep, base + t)
                        live = keep if live is None else live[keep]
                        if static is None:  # (as many slots as a session cache for top would have)
                            n_slots = min(self.cache.max_len, session_slots(self.decode, device, top))
                            cache = _slots_view(self.cache, n_slots).select(live)
                        staged = True
                        if runs is not None:
                            tok, pos, done = runs.keep(keep)
                        else:
                            tok, pos, done = tok[keep], pos[keep], done[keep]
                        was_done = was_done[keep]
                        uniforms = None if uniforms is None else uniforms[:, keep]
            if staged:
                self._write_back(cache, live, first_slot, base + steps)

        out_tok, out_lp = out_tok[:, :steps], out_lp[:, :steps]
        if has_stop:
            hit = torch.isin(out_tok, stop)
            lengths_t = torch.where(hit.any(-1), hit.int().argmax(-1) + 1, steps)
            by_string = torch.tensor(string_end, device=device)
            finished_t = hit.any(-1) | (by_string <= lengths_t)
            lengths_t = torch.minimum(lengths_t, by_string)
            keep = torch.arange(steps, device=device) < lengths_t[:, None]
            out_tok = out_tok.masked_fill(~keep, PAD)
            out_lp = out_lp.masked_fill(~keep, 0.0)
            finished = finished_t.tolist()
        else:
            lengths_t = torch.full((B,), steps, device=device)
            finished = [False] * B
        lengths = lengths_t.tolist()
        tok_rows = out_tok.tolist()
        lp_rows = out_lp.tolist()
        tokens = [row[:n] for row, n in zip(tok_rows, lengths)]
        logprobs = [row[:n] for row, n in zip(lp_rows, lengths)]
        for row, new in zip(self.rows, tokens):
            row.extend(new)
        _sync(device)
        return Samples(
            tokens=tokens,
            logprobs=logprobs,
            finished=finished,
            lengths=lengths,
            token_tensor=out_tok,
            logprob_tensor=out_lp,
            steps=steps,
            decode_s=time.perf_counter() - t0,
        )

    def _write_back(self, cache, rows: torch.Tensor | None, lo: int, hi: int) -> None:
        """Copy slots ``[lo, hi)`` of a decode batch's copy ``cache`` (its row ``i`` is the
        session's row ``rows[i]``; None: row ``i``) into the session's cache: what those rows
        decoded. Slots below a row's own start hold its history, unchanged, so one range serves
        all rows."""
        for dst, src in zip(self.cache.k + self.cache.v, cache.k + cache.v):
            if rows is None:
                dst[:, :, lo:hi] = src[:, :, lo:hi]
            else:
                dst[rows, :, lo:hi] = src[:, :, lo:hi]
        for dst, src in zip(self.cache.states, cache.states):  # (Qwen 3.5's: each row's whole state)
            if rows is None:
                dst.copy_(src)
            else:
                dst[rows] = src


def _find_stop_strings(strings: StopStrings, stop_ids: set, out_tok: torch.Tensor, live, done: torch.Tensor,
                       was_done: torch.Tensor, lo: int, hi: int, string_end: list[int]) -> None:
    """Stop the decode batch's rows whose tokens complete a stop string at a step in ``[lo, hi)``
    (``done`` set, ``string_end`` = the tokens the row keeps). Checked: the rows that had not
    stopped at the previous check (``was_done`` False), each up to its stop id if it sampled one
    since. ``live``: the session rows of the decode batch (None: all)."""
    cand = (~was_done).nonzero()[:, 0].tolist()
    if not cand:
        return
    rows = cand if live is None else live[cand].tolist()
    start = max(0, lo - strings.window)
    block = out_tok[rows, start:hi].tolist()
    for i, r, toks in zip(cand, rows, block):
        for j in range(lo, hi):
            if strings.completed(toks[: j + 1 - start], lambda: out_tok[r, : j + 1].tolist()):
                string_end[r] = j + 1
                done[i] = True
                break
            if toks[j - start] in stop_ids:
                break


def _slots_view(cache, n: int):
    """The first ``n`` slots of every row (views): what a compacted decode batch copies."""
    return cache.slots_view(n)


def _rows_view(cache, lo: int, hi: int):
    """The cache rows ``lo:hi`` as views (writes go to the original)."""
    if lo == 0 and hi == cache.batch_size:
        return cache
    return cache.rows_view(lo, hi)


# --------------------------------------------------------------------------------------------
# One call
# --------------------------------------------------------------------------------------------


def generate(
    model,
    prompts: Sequence[Sequence[int]],
    *,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    num_samples: int = 1,
    stop_token_ids: Sequence[int] = (),
    seed: int | None = None,
    vocab_size: int | None = None,
    generator: torch.Generator | None = None,
    decode: str = "eager",
    compact: bool = True,
    stop_strings: StopStrings | None = None,
    progress: Callable[[int], None] | None = None,
) -> Samples:
    """Sample ``num_samples`` completions per prompt (prompt-major: row ``i`` is prompt
    ``i // num_samples``). Each prompt is prefilled once and its cache forked ``num_samples``
    times. ``temperature=0`` is greedy. ``compact``: drop stopped rows from the decode batch (see
    :meth:`Session.sample`); ``stop_strings`` as there. See :class:`Samples` for the result and
    the module docstring for the log-probs. ``progress``: see :meth:`Session.sample`."""
    check_sampling_args(max_new_tokens, temperature, top_k, top_p)
    if not isinstance(num_samples, int) or num_samples < 1:
        raise SamplingError(f"num_samples must be a positive integer, got {num_samples!r}")
    longest = max((len(p) for p in prompts), default=0)
    session = Session.start(model, prompts, max_len=longest + max_new_tokens, vocab_size=vocab_size,
                            seed=seed, generator=generator, decode=decode, compact=compact)
    if num_samples > 1:
        t0 = time.perf_counter()
        session = session.fork(num_samples)
        _sync(session.device)
        session.prefill_s += time.perf_counter() - t0
    out = session.sample(max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                         stop_token_ids=stop_token_ids, stop_strings=stop_strings, progress=progress)
    out.prefill_s = session.prefill_s
    return out
