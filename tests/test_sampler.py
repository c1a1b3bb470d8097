"""The KV-cache sampler against transformers' generate and against teacher-forced full forwards.

Greedy comparisons allow a difference only at an exact near-tie of the two best logits (the
reference and our model agree to ~1e-6 in fp32 on tiny models and ~1e-3 on the built-in GGUF, so
a tie closer than that can legitimately flip); everything after the first such tie is skipped.
"""

from __future__ import annotations

import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from r3.checkpoint import load
from r3.errors import R3Error
from r3.model import ModelConfig, Transformer
import r3.decode as decode_mod
from r3.decode import DecodeStep, StaticKVCache, graph_rows, static_cache, step_logits
from r3.packed_linear import PackedWeights
from r3.sampler import (Session, SamplingError, StopStrings, _mul32, _top_p_candidates, generate, pick_greedy,
                        pick_tokens,
                        RANDOM_STREAMS, row_keys, row_uniforms, uniform_table)

KINDS = ("llama", "qwen2", "mistral", "qwen3", "phi3", "gemma3", "smollm3", "olmo2", "olmo3", "granite", "ministral3",
         "gemma2", "gemma4")
ROOT = Path(__file__).resolve().parents[1]


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------


_PACKED_AVAILABLE = PackedWeights.available


def as_on_a_gpu(monkeypatch):
    """The decode path a GPU takes, run here: CUDA-graph steps (inductor leaves the graphs out on
    CPU) on plain matmuls (prepacked weights are a CPU backend, off on a GPU)."""
    monkeypatch.setattr(decode_mod, "CUDA_GRAPHS", True)
    monkeypatch.setattr(PackedWeights, "available", staticmethod(lambda model: False))


def _rand_prompts(vocab, lengths, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (n,), generator=g).tolist() for n in lengths]


@pytest.fixture(scope="module")
def tiny(tiny_dirs):
    """kind -> (our model, transformers model) on the same tiny random weights (fp32)."""
    return {k: (load(path, tokenizer=False)[0], hf) for k, (path, hf) in tiny_dirs.items()}


@pytest.fixture(scope="module")
def chat(builtin):
    """Chat prompts of different lengths for the built-in model."""
    _, tok = builtin
    texts = ["What is 2+2?", "Write one sentence about the sea and the sky at night.", "Hi"]
    out = []
    for t in texts:
        ids = tok.apply_chat_template([{"role": "user", "content": t}], add_generation_prompt=True, tokenize=True)
        out.append(list(ids["input_ids"] if hasattr(ids, "keys") else ids))
    assert len({len(p) for p in out}) == 3
    return out


def _hf_greedy(hf, prompt, n):
    from transformers import GenerationConfig

    ids = torch.tensor([prompt])
    cfg = GenerationConfig(do_sample=False, max_new_tokens=n, eos_token_id=None, pad_token_id=0)
    saved = hf.generation_config.eos_token_id  # else generate fills the unset eos in from here
    hf.generation_config.eos_token_id = None
    try:
        with torch.no_grad():
            out = hf.generate(ids, attention_mask=torch.ones_like(ids), generation_config=cfg)
    finally:
        hf.generation_config.eos_token_id = saved
    assert out.shape[1] == len(prompt) + n
    return out[0, len(prompt):].tolist()


def _assert_greedy_equal(model, prompt, ours, ref, tie_tol):
    """Equal token for token, unless the first difference is at a near-tie of our logits."""
    assert len(ours) == len(ref)
    diff = next((i for i, (a, b) in enumerate(zip(ours, ref)) if a != b), None)
    if diff is None:
        return
    with torch.no_grad():
        logits = model(torch.tensor([prompt + ours[:diff]]))[0, -1].float()
    top2 = logits.topk(2).values
    gap = (top2[0] - top2[1]).item()
    assert gap <= tie_tol, f"greedy differs at step {diff} with a logit gap of {gap} (not a near-tie)"


def _teacher_forced(model, prompt, completion, temperature=1.0, top_k=0, top_p=1.0, vocab_size=None):
    """Log-probs of ``completion`` after ``prompt`` from one full forward, under the filtered,
    renormalised distribution (an independent implementation: full sort, per position)."""
    with torch.no_grad():
        logits = model(torch.tensor([prompt + completion]))[0, len(prompt) - 1 : -1].float()
    if vocab_size is not None:
        logits = logits[:, :vocab_size]
    out = []
    for row, t in zip(logits / temperature, completion):
        keep = torch.ones_like(row, dtype=torch.bool)
        if top_k:
            keep &= row >= row.topk(top_k).values[-1]
        if top_p < 1:
            p = row.masked_fill(~keep, float("-inf")).softmax(-1)
            order = p.argsort(descending=True)
            before = p[order].cumsum(0) - p[order]
            k2 = torch.zeros_like(keep)
            k2[order[before < top_p]] = True
            keep &= k2
        out.append(row.masked_fill(~keep, float("-inf")).log_softmax(-1)[t].item())
    return out


def _stop_set_with_ragged_finish(seqs, n):
    """Stop ids under which the given (unstopped) rows finish at >= 2 different steps and
    at least one row runs to the limit."""
    cands = sorted({t for s in seqs for t in s[1:n - 1]})
    for a in cands:
        for b in [None] + cands:
            stops = {a} if b is None else {a, b}
            ends = [next((i + 1 for i, t in enumerate(s) if t in stops), None) for s in seqs]
            if None in ends and len({e for e in ends if e is not None}) >= 2:
                return sorted(stops), ends
    raise AssertionError("no stop set gives a ragged finish")


# --------------------------------------------------------------------------------------------
# greedy against transformers
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_greedy_matches_transformers_tiny(tiny, kind):
    model, hf = tiny[kind]
    prompts = _rand_prompts(256, [5, 13, 9], seed=1)  # Mistral's window is 8: it matters here
    out = generate(model, prompts, max_new_tokens=12, temperature=0)
    assert out.lengths == [12, 12, 12] and out.finished == [False] * 3
    for p, ours in zip(prompts, out.tokens):
        _assert_greedy_equal(model, p, ours, _hf_greedy(hf, p, 12), tie_tol=1e-5)


def test_greedy_matches_transformers_builtin(builtin, builtin_hf, chat):
    model, _ = builtin
    out = generate(model, chat[:2], max_new_tokens=10, temperature=0)
    for p, ours in zip(chat[:2], out.tokens):
        _assert_greedy_equal(model, p, ours, _hf_greedy(builtin_hf, p, 10), tie_tol=5e-3)


# --------------------------------------------------------------------------------------------
# batching, continuation, forks
# --------------------------------------------------------------------------------------------


def test_ragged_batch_rows_equal_alone(builtin, chat):
    model, _ = builtin
    batch = generate(model, chat, max_new_tokens=8, temperature=0)
    for i, p in enumerate(chat):
        alone = generate(model, [p], max_new_tokens=8, temperature=0)
        assert batch.tokens[i] == alone.tokens[0]
        assert torch.allclose(torch.tensor(batch.logprobs[i]), torch.tensor(alone.logprobs[0]), atol=1e-5)


@pytest.mark.parametrize("kind", KINDS)
def test_continuation_equals_fresh_prefill(tiny, kind):
    """Sample (rows stopping at different steps), select + fork, append a ragged user turn
    (growing the cache), sample again: identical to prefilling the whole conversation afresh,
    and every sampled log-prob equals a teacher-forced forward of the final sequence."""
    model, _ = tiny[kind]
    prompts = _rand_prompts(256, [7, 3, 11], seed=2)
    n1, n2 = 10, 6
    # Stops do not change the random stream: a stopped run is the free run cut at its stops.
    free = generate(model, prompts, max_new_tokens=n1, seed=0).tokens
    stops, ends = _stop_set_with_ragged_finish(free, n1)

    s = Session.start(model, prompts, seed=0)  # cache sized to the prompts: grows
    first = s.sample(n1, stop_token_ids=stops)
    assert first.lengths == [e or n1 for e in ends]
    assert first.finished == [e is not None for e in ends]
    for got, full, e in zip(first.tokens, free, ends):
        assert got == full[: e or n1]  # stop token included, nothing after it
    s2 = s.select([2, 0, 1]).fork(2)  # row order changes; repeats
    assert len(s2) == 6 and s2.tokens[0] == s.tokens[2] and s2.tokens[1] == s.tokens[2]
    turns = _rand_prompts(256, [4, 1, 6, 2, 3, 5], seed=3)
    s2.append(turns)
    second = s2.sample(n2, temperature=0)

    histories = [list(s2.tokens[i][: len(s2.tokens[i]) - n2]) for i in range(6)]
    fresh = Session.start(model, histories).sample(n2, temperature=0)
    assert second.tokens == fresh.tokens
    assert torch.allclose(second.logprob_tensor, fresh.logprob_tensor, atol=1e-5)
    src = [2, 2, 0, 0, 1, 1]
    for i in range(6):
        p = prompts[src[i]]
        comp = s2.tokens[i][len(p):]
        got = first.logprobs[src[i]] + [None] * len(turns[i]) + second.logprobs[i]
        ref = _teacher_forced(model, p, comp)
        pairs = [(a, b) for a, b in zip(got, ref) if a is not None]
        assert len(pairs) == first.lengths[src[i]] + n2
        assert max(abs(a - b) for a, b in pairs) < 1e-4


def test_continuation_sampled_equals_fresh_prefill(tiny):
    """At temperature 1 with the same random stream, continuing from the cache draws the same
    tokens as a fresh prefill, and log-probs are the teacher-forced ones."""
    model, _ = tiny["llama"]
    prompts = _rand_prompts(256, [6, 2, 9, 4], seed=4)
    s = Session.start(model, prompts, seed=0)
    s.sample(8, stop_token_ids=[5, 17, 40, 99])
    s.append(_rand_prompts(256, [3, 5, 1, 2], seed=5))
    histories = [list(r) for r in s.tokens]
    got = s.sample(7, generator=torch.Generator().manual_seed(9))
    fresh = Session.start(model, histories).sample(7, generator=torch.Generator().manual_seed(9))
    assert got.tokens == fresh.tokens
    for h, t, lp in zip(histories, got.tokens, got.logprobs):
        assert max(abs(a - b) for a, b in zip(lp, _teacher_forced(model, h, t))) < 1e-4


def test_continuation_builtin_chat(builtin, chat):
    """The episode's shape on the real model: answer, user turn, answer again."""
    model, tok = builtin
    s = Session.start(model, chat, vocab_size=len(tok))
    first = s.sample(12, temperature=0, stop_token_ids=[tok.eos_token_id])
    turn = tok.apply_chat_template([{"role": "user", "content": "Are you sure?"}], add_generation_prompt=True, tokenize=True)
    turn = list(turn["input_ids"] if hasattr(turn, "keys") else turn)
    # A row that hit the limit gets the turn's end-of-turn marker first; ragged on purpose.
    s.append([([] if f else [tok.eos_token_id]) + tok("\n")["input_ids"] + turn for f in first.finished])
    hist = [list(r) for r in s.tokens]
    second = s.sample(6, temperature=0)
    fresh = Session.start(model, hist).sample(6, temperature=0)
    assert second.tokens == fresh.tokens
    assert torch.allclose(second.logprob_tensor, fresh.logprob_tensor, atol=1e-4)
    for h, t, lp in zip(hist, second.tokens, second.logprobs):
        assert max(abs(a - b) for a, b in zip(lp, _teacher_forced(model, h, t))) < 1e-4


def test_num_samples_greedy_all_equal_and_prompt_major(tiny):
    model, _ = tiny["qwen2"]
    prompts = _rand_prompts(256, [4, 8], seed=6)
    single = generate(model, prompts, max_new_tokens=6, temperature=0)
    grouped = generate(model, prompts, max_new_tokens=6, temperature=0, num_samples=3)
    assert grouped.tokens == [single.tokens[0]] * 3 + [single.tokens[1]] * 3
    pair = generate(model, prompts, max_new_tokens=6, temperature=0, num_samples=2)
    assert pair.tokens == [single.tokens[0]] * 2 + [single.tokens[1]] * 2


def test_num_samples_differ_at_temperature_one(tiny):
    """Guard against forks sharing one draw: with a near-flat distribution (a random tiny model)
    the G first tokens of one prompt must differ."""
    model, _ = tiny["llama"]
    prompts = _rand_prompts(256, [5, 3], seed=7)
    out = generate(model, prompts, max_new_tokens=4, num_samples=8, seed=0)
    for i in range(2):
        group = out.tokens[8 * i : 8 * i + 8]
        assert len({g[0] for g in group}) > 1
        assert len({tuple(g) for g in group}) == 8


# --------------------------------------------------------------------------------------------
# log-probs, seeds, stops, vocab
# --------------------------------------------------------------------------------------------


def test_logprobs_equal_teacher_forced_builtin(builtin, chat):
    model, tok = builtin
    out = generate(model, chat, max_new_tokens=8, seed=1, vocab_size=len(tok))
    for p, t, lp in zip(chat, out.tokens, out.logprobs):
        ref = _teacher_forced(model, p, t)
        assert max(abs(a - b) for a, b in zip(lp, ref)) < 1e-4


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_pick_greedy_first_max_and_log_softmax(dtype):
    g = torch.Generator().manual_seed(0)
    logits = (torch.randn(5, 300, generator=g) * 4).to(dtype)
    logits[1, 7] = logits[1, 250] = logits[1].max() + 1  # a tie: the first index wins (as argmax)
    logits[2] = 0.0  # all equal: id 0, log-prob -log(V)
    logits[3, 17] = float("inf")  # an infinite logit can still be picked
    tok, lp = pick_greedy(logits)
    ref = logits.float().log_softmax(-1)
    assert tok.tolist()[:3] == [int(logits[0].float().argmax()), 7, 0] and int(tok[3]) == 17
    assert torch.allclose(lp[[0, 1, 2, 4]], ref[[0, 1, 2, 4]].gather(-1, tok[[0, 1, 2, 4], None])[:, 0], atol=1e-5)
    assert abs(float(lp[2]) + torch.log(torch.tensor(300.0)).item()) < 1e-5


def test_pick_greedy_nan_row_gives_a_valid_id():
    logits = torch.randn(2, 50)
    logits[1] = float("nan")
    tok, lp = pick_greedy(logits)
    assert 0 <= int(tok[1]) < 50 and torch.isnan(lp[1]) and int(tok[0]) == int(logits[0].argmax())


def test_greedy_logprobs_are_raw_log_softmax(tiny):
    model, _ = tiny["mistral"]
    prompts = _rand_prompts(256, [12], seed=8)
    out = generate(model, prompts, max_new_tokens=6, temperature=0)
    ref = _teacher_forced(model, prompts[0], out.tokens[0])
    assert max(abs(a - b) for a, b in zip(out.logprobs[0], ref)) < 1e-5


@pytest.mark.parametrize("kw", [dict(top_k=5), dict(top_p=0.3), dict(temperature=0.7, top_k=20, top_p=0.5),
                                dict(temperature=1.5)])
def test_filtered_logprobs_are_renormalised(builtin, chat, kw):
    model, tok = builtin
    out = generate(model, chat[:2], max_new_tokens=6, seed=2, vocab_size=len(tok), **kw)
    for p, t, lp in zip(chat, out.tokens, out.logprobs):
        ref = _teacher_forced(model, p, t, **kw)
        assert max(abs(a - b) for a, b in zip(lp, ref)) < 1e-4
    if "top_k" in kw:  # renormalisation shows: log-probs above the unfiltered ones
        plain = [_teacher_forced(model, p, t, temperature=kw.get("temperature", 1.0)) for p, t in zip(chat, out.tokens)]
        pairs = [(a, b) for r, q in zip(out.logprobs, plain) for a, b in zip(r, q)]
        assert all(a >= b - 1e-6 for a, b in pairs) and any(a > b + 1e-3 for a, b in pairs)


def test_seed_reproducible(tiny):
    model, _ = tiny["qwen2"]
    prompts = _rand_prompts(256, [3, 6, 2], seed=9)
    a = generate(model, prompts, max_new_tokens=10, seed=123, num_samples=2)
    b = generate(model, prompts, max_new_tokens=10, seed=123, num_samples=2)
    c = generate(model, prompts, max_new_tokens=10, seed=124, num_samples=2)
    assert a.tokens == b.tokens and a.logprobs == b.logprobs
    assert a.tokens != c.tokens


def test_stop_tokens_end_rows_individually(tiny):
    model, _ = tiny["llama"]
    prompts = _rand_prompts(256, [4, 9, 6], seed=10)
    free = generate(model, prompts, max_new_tokens=12, seed=5).tokens
    stops, ends = _stop_set_with_ragged_finish(free, 12)
    out = generate(model, prompts, max_new_tokens=12, seed=5, stop_token_ids=stops)
    for got, full, e, fin in zip(out.tokens, free, ends, out.finished):
        assert got == full[: e or 12] and fin == (e is not None)
        if e is not None:
            assert got[-1] in stops and not any(t in stops for t in got[:-1])
    assert (out.token_tensor == -1).sum().item() == sum(12 - len(t) for t in out.tokens) - 12 * (12 - out.steps)
    # every row stopping early ends the loop early
    early = generate(model, prompts, max_new_tokens=50, seed=5,
                     stop_token_ids=sorted(set(free[0][:3]) | set(free[1][:3]) | set(free[2][:3])))
    assert early.steps <= 3 and all(early.finished)
    # many stop ids (a table lookup per step), ids past the vocabulary, and negative ids (never
    # sampled; -1 is the outputs' padding) do not change which rows stop where
    rng = torch.Generator().manual_seed(3)
    others = [t for t in torch.randperm(256, generator=rng).tolist() if t not in set(sum(free, []))][:40]
    many = generate(model, prompts, max_new_tokens=12, seed=5, stop_token_ids=stops + others + [-1, -7, 10 ** 12])
    assert many.tokens == out.tokens and many.finished == out.finished and many.steps == out.steps


def test_padded_vocab_never_sampled():
    """Padded embedding rows whose logits dwarf the real ones are never drawn."""
    torch.manual_seed(0)
    cfg = ModelConfig(model_type="llama", vocab_size=320, hidden_size=32, intermediate_size=64,
                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=8)
    model = Transformer(cfg).eval()
    real = 300
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.05) if p.dim() > 1 else p.fill_(1.0)
        model.embed_tokens.weight[:, 0] = 10.0  # residual stream dim 0 strongly positive
        model.lm_head.weight[real:, 0] = 50.0  # -> the padded ids have by far the largest logits
        assert (model(torch.tensor([[1, 2, 3]]))[0].argmax(-1) >= real).all()
    prompts = _rand_prompts(real, [3, 5, 1, 4], seed=11)
    for kw in (dict(), dict(temperature=0), dict(top_p=0.9), dict(top_k=400), dict(temperature=5.0)):
        out = generate(model, prompts, max_new_tokens=16, num_samples=4, seed=0, vocab_size=real, **kw)
        assert max(max(t) for t in out.tokens) < real
    with pytest.raises(SamplingError):
        generate(model, prompts, max_new_tokens=1, vocab_size=321)


def test_topk1_and_tiny_topp_equal_greedy(builtin, chat):
    model, _ = builtin
    greedy = generate(model, chat, max_new_tokens=6, temperature=0)
    k1 = generate(model, chat, max_new_tokens=6, top_k=1, seed=3)
    p0 = generate(model, chat, max_new_tokens=6, top_p=1e-6, seed=4)
    assert k1.tokens == greedy.tokens and p0.tokens == greedy.tokens
    assert all(lp == 0.0 for r in k1.logprobs + p0.logprobs for lp in r)  # one token kept: prob 1


def _prefilled(model, rows, kv_len, n_caches=2):
    """``n_caches`` caches holding ``rows`` (ragged) but their last tokens, and the step inputs."""
    B = len(rows)
    caches = [model.new_cache(B, kv_len + 4) for _ in range(n_caches)]
    toks = torch.tensor([r + [0] * (kv_len - len(r)) for r in rows])
    for c in caches:
        model.hidden_states(toks[:, :-1], positions=torch.arange(kv_len - 1).expand(B, -1), cache=c, kv_len=kv_len - 1)
    return caches, torch.tensor([r[-1] for r in rows]), torch.tensor([len(r) - 1 for r in rows])


PACKED_SKIP = "no oneDNN packed matmul for this dtype here (this PyTorch build; bf16 also needs AVX-512 BW/VL/DQ, AVX-NE-CONVERT or AMX)"
DTYPE_TOL = {torch.float32: 1e-5, torch.bfloat16: 0.05}  # packed against plain matmuls, relative to the largest logit


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kind", KINDS)
def test_packed_matmuls_equal_the_plain_step(tiny_dirs, kind, dtype):
    """On CPU the decode step runs the model's matmuls on prepacked weights: the same logits (up
    to rounding of a different kernel) and cache writes as the plain step."""
    model, _ = load(tiny_dirs[kind][0], dtype=dtype, tokenizer=False)
    if not PackedWeights.available(model):
        pytest.skip(PACKED_SKIP)
    rows = _rand_prompts(256, [12, 5, 9], seed=12)
    with torch.inference_mode():
        caches, last, pos = _prefilled(model, rows, 12)
        ref = step_logits(model, last, pos, caches[0], 12, 200)
        step = DecodeStep(model, "eager")
        assert step.packed is not None
        with step.active():
            assert model.layers[0].self_attn.qkv_proj.packed is not None
            got = step(last, pos, caches[1], 12, 200)
        assert model.layers[0].self_attn.qkv_proj.packed is None  # off again outside the block
    assert got.shape == ref.shape == (3, 200) and got.dtype == dtype
    assert (got.float() - ref.float()).abs().max().item() <= DTYPE_TOL[dtype] * ref.float().abs().max().item()
    for a, b in zip(caches[0].k + caches[0].v, caches[1].k + caches[1].v):  # same keys/values written
        assert (a.float() - b.float()).abs().max().item() <= DTYPE_TOL[dtype]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_packed_weights_see_weight_updates(tiny_dirs, monkeypatch, dtype):
    """An in-place update (an optimizer step) repacks the weights: the sampler then gives what
    the plain matmuls give."""
    model, _ = load(tiny_dirs["qwen2"][0], dtype=dtype, tokenizer=False)
    if not PackedWeights.available(model):
        pytest.skip(PACKED_SKIP)
    prompts = _rand_prompts(256, [6, 3], seed=13)
    before = generate(model, prompts, max_new_tokens=8, temperature=0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("mlp.down_proj.weight") or name.endswith("qkv_proj.bias"):
                p.mul_(-3.0)
    after = generate(model, prompts, max_new_tokens=8, temperature=0)
    monkeypatch.setattr(PackedWeights, "available", staticmethod(lambda model: False))
    plain = generate(model, prompts, max_new_tokens=8, temperature=0)
    assert after.tokens == plain.tokens
    assert (after.logprob_tensor - plain.logprob_tensor).abs().max() <= DTYPE_TOL[dtype]
    assert (after.logprob_tensor - before.logprob_tensor).abs().max() > 1e-2


def test_packed_weights_do_not_keep_models_alive(tiny_dirs):
    import gc
    import weakref

    from r3 import packed_linear

    model, _ = load(tiny_dirs["llama"][0], dtype=torch.float32, tokenizer=False)
    gc.collect()
    slots = len(packed_linear._SLOTS)
    generate(model, [[1, 2, 3]], max_new_tokens=2, temperature=0)
    if PackedWeights.available(model):
        assert len(packed_linear._SLOTS) == slots + 2 * 4 + 1  # 4 matmuls per layer, the LM head
    ref = weakref.ref(model)
    del model
    gc.collect()
    assert ref() is None
    assert len(packed_linear._SLOTS) == slots  # the packed copies went with the model


# --------------------------------------------------------------------------------------------
# the token picker itself
# --------------------------------------------------------------------------------------------


def test_pick_tokens_distribution():
    """Empirical frequencies over many rows match the target distribution."""
    logits = torch.tensor([2.0, 1.0, 0.0, -1.0, -30.0]).expand(40000, 5)
    g = torch.Generator().manual_seed(0)
    cases = [
        (dict(), torch.tensor([2.0, 1.0, 0.0, -1.0, -30.0]).softmax(0)),
        (dict(temperature=2.0), torch.tensor([1.0, 0.5, 0.0, -0.5, -15.0]).softmax(0)),
        (dict(top_k=2), torch.tensor([2.0, 1.0]).softmax(0)),
        (dict(top_p=0.8), torch.tensor([2.0, 1.0]).softmax(0)),  # mass of top 1 is 0.64 < 0.8
    ]
    for kw, target in cases:
        tok, lp = pick_tokens(logits, generator=g, **kw)
        freq = torch.bincount(tok, minlength=5).float() / len(tok)
        expect = torch.zeros(5)
        expect[: len(target)] = target
        assert (freq - expect).abs().max() < 0.01, (kw, freq, expect)
        assert torch.allclose(lp, expect[tok].log(), atol=1e-5)


def test_top_p_candidates_shortcut_equals_full_sort():
    g = torch.Generator().manual_seed(0)
    peaky = torch.randn(6, 10000, generator=g) * 4  # nucleus inside the top 256 / 4096
    flat = torch.randn(3, 10000, generator=g) * 0.1  # needs the full sort
    for x in (peaky, flat):
        for p in (0.5, 0.9, 0.99):
            vals, idx = _top_p_candidates(x, p)
            kept = [set(i[torch.isfinite(v)].tolist()) for v, i in zip(vals, idx)]
            ref_v, ref_i = torch.sort(x.double(), -1, descending=True)
            pr = ref_v.softmax(-1)
            before = pr.cumsum(-1) - pr  # the mass before each token, in fp64
            ref = [set(i[m < p].tolist()) for i, m in zip(ref_i, before)]
            # a token whose mass before it is within fp32 rounding of p may go either way
            edge = [set(i[(m - p).abs() < 1e-5].tolist()) for i, m in zip(ref_i, before)]
            assert all(not ((k ^ r) - e) for k, r, e in zip(kept, ref, edge)), (p, [len(k ^ r) for k, r in zip(kept, ref)])


def test_bad_arguments_are_clear_errors(tiny):
    model, _ = tiny["llama"]
    for kw in (dict(max_new_tokens=0), dict(max_new_tokens=2, temperature=-1), dict(max_new_tokens=2, top_p=0.0),
               dict(max_new_tokens=2, top_k=-3), dict(max_new_tokens=2, num_samples=0)):
        with pytest.raises(SamplingError):
            generate(model, [[1, 2]], **kw)
    with pytest.raises(R3Error, match="empty"):
        generate(model, [[1], []], max_new_tokens=2)
    with pytest.raises(ValueError, match="outside"):
        generate(model, [[1, 256]], max_new_tokens=2)
    s = Session.start(model, [[1, 2], [3]])
    with pytest.raises(SamplingError):
        s.append([[1]])
    with pytest.raises(SamplingError):
        s.select([2])


# --------------------------------------------------------------------------------------------
# dtype, CLI
# --------------------------------------------------------------------------------------------


def test_bf16_mostly_agrees_with_fp32(builtin, chat):
    m32, _ = builtin
    m16, _ = load("smollm2-135m", dtype=torch.bfloat16, tokenizer=False)
    a = generate(m32, chat, max_new_tokens=4, temperature=0)
    b = generate(m16, chat, max_new_tokens=4, temperature=0)
    assert b.logprob_tensor.dtype == torch.float32 and all(len(t) == 4 for t in b.tokens)
    assert sum(x[0] == y[0] for x, y in zip(a.tokens, b.tokens)) >= 2


def _cli(*args):
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    return subprocess.run([sys.executable, "-m", "r3.generate", *args], capture_output=True, text=True, env=env,
                          cwd=ROOT, timeout=300)


def test_cli_prints_a_completion():
    r = _cli("--prompt", "What is the capital of France?", "--max-new-tokens", "6", "--temperature", "0")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() and "tokens/s" in r.stderr and "warning" not in r.stderr


def test_cli_warns_past_the_models_positions(builtin, monkeypatch, capsys):
    """In process, on the session's built-in model (the command itself runs in
    test_cli_prints_a_completion): the warning names the prompt's tokens and the limit."""
    import r3.generate as G
    from r3.checkpoint import builtin_gguf, gguf_config
    from r3.gguf_file import read_gguf

    path = builtin_gguf("smollm2-135m")
    limit = gguf_config(read_gguf(path), path)["max_position_embeddings"]
    assert limit == 8192 == builtin[0].config.max_position_embeddings
    monkeypatch.setattr(G, "load", lambda *a, **k: builtin)

    def cli(*args):
        rc = G.main(["--prompt", "What is the capital of France?", "--temperature", "0", *args])
        out, err = capsys.readouterr()
        assert rc == 0 and out.strip(), err  # (it stops at the end of its answer)
        return err

    err = cli("--max-new-tokens", str(limit))
    assert f"--max-new-tokens {limit} passes the model's {limit} positions" in err
    # exactly filling the positions (the last completion token at position limit - 1) is fine; one more is not
    n = int(re.search(r"the prompt \((\d+) tokens\)", err).group(1))
    assert "positions" not in cli("--max-new-tokens", str(limit - n))
    assert f"--max-new-tokens {limit - n + 1} passes" in cli("--max-new-tokens", str(limit - n + 1))


@pytest.mark.parametrize("args", [("--model", "/no/such/model", "--prompt", "hi"), ("--prompt", "hi", "--top-p", "2")])
def test_cli_mistakes_exit_2_with_one_line(args):
    r = _cli(*args)
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:"), r.stderr


# --------------------------------------------------------------------------------------------
# the compiled decode step (torch.compile; one compile per dtype, ~10-20 s each on tiny models)
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_compiled_step_equals_model_forward_and_sees_updates(tiny_dirs, dtype):
    """The compiled step (packed matmuls through the r3::packed_linear op where oneDNN runs the
    dtype, else plain matmuls) gives the eager step's logits and cache writes, for ragged rows and a later, larger
    batch (dynamic shapes), and after an in-place weight update it uses the new weights without
    compiling again."""
    from torch._dynamo.utils import counters

    model, _ = load(tiny_dirs["qwen2"][0], dtype=dtype, tokenizer=False)  # q/k/v biases

    def compare(rows, kv_len):
        with torch.inference_mode():
            caches, last, pos = _prefilled(model, rows, kv_len)
            eager, compiled = DecodeStep(model, "eager"), DecodeStep(model, "compiled")
            with eager.active():
                ref = eager(last, pos, caches[0], kv_len, 200)
            with compiled.active():
                got = compiled(last, pos, caches[1], kv_len, 200)
        tol = 1e-5 if dtype == torch.float32 else 0.05 * ref.float().abs().max().item()
        assert got.shape == ref.shape and got.dtype == dtype
        assert (got.float() - ref.float()).abs().max().item() <= tol
        for a, b in zip(caches[0].k + caches[0].v, caches[1].k + caches[1].v):
            assert (a.float() - b.float()).abs().max().item() <= (1e-5 if dtype == torch.float32 else 0.05)

    compare(_rand_prompts(256, [12, 5, 9], seed=21), 12)
    frames = counters["frames"]["ok"]
    compare(_rand_prompts(256, [7, 15, 3, 11, 16], seed=22), 16)  # another batch size and cache length
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("mlp.down_proj.weight") or name.endswith("qkv_proj.bias"):
                p.mul_(-3.0)
    compare(_rand_prompts(256, [6, 10], seed=23), 10)
    assert counters["frames"]["ok"] == frames, "the compiled step was compiled again"


def test_compiled_step_with_cuda_graph_options_on_cpu(tiny_dirs):
    """The CUDA-graph form of the compiled step (the cache marked as static addresses, the step
    boundary marked, outputs copied out of the graph's pool, the graph options) runs here too,
    where inductor leaves the graphs out: the same logits and cache writes as the eager step."""
    model, _ = load(tiny_dirs["mistral"][0], tokenizer=False)  # a sliding window
    rows = _rand_prompts(256, [12, 5, 9], seed=41)
    with torch.inference_mode():
        caches, last, pos = _prefilled(model, rows, 12)
        ref = DecodeStep(model, "eager")(last, pos, caches[0], 12, 200)
        step = DecodeStep(model, "compiled", cuda_graphs=True)
        got = step(last, pos, caches[1], 12, 200)
        nxt, lp = step(last, pos, caches[1], 12, 200, pick=pick_greedy, u=None, temperature=torch.tensor(0.0))
    assert (got - ref).abs().max().item() <= 1e-5
    assert nxt.tolist() == ref.argmax(-1).tolist() and lp.shape == (3,)
    assert all(getattr(t, "_dynamo_static_input_type", None) == "unguarded" for t in caches[1].k + caches[1].v)
    for a, b in zip(caches[0].k + caches[0].v, caches[1].k + caches[1].v):
        assert (a - b).abs().max().item() <= 1e-5


def test_compiled_step_tells_models_apart_and_keeps_none_alive(tiny_dirs):
    """One compiled function serves every model (the model is an argument): two models of the
    same shape with different weights (on CPU each its own packed slots, constants of its graph)
    each decode as their eager step does, and a model is freed when dropped."""
    import gc
    import weakref

    a, _ = load(tiny_dirs["llama"][0], dtype=torch.bfloat16, tokenizer=False)
    b, _ = load(tiny_dirs["llama"][0], dtype=torch.bfloat16, tokenizer=False)
    with torch.no_grad():
        for p in b.parameters():
            p.mul_(-1.5)
    prompts = _rand_prompts(256, [4, 2], seed=40)
    tokens = {}
    for name, m in (("a", a), ("b", b), ("a", a)):
        eager = generate(m, prompts, max_new_tokens=6, temperature=0)
        comp = generate(m, prompts, max_new_tokens=6, temperature=0, decode="compiled")
        assert comp.tokens == eager.tokens, name
        assert tokens.setdefault(name, comp.tokens) == comp.tokens
    assert tokens["a"] != tokens["b"]
    ref = weakref.ref(b)
    del b
    gc.collect()
    assert ref() is None


# plain; q/k norms; LongRoPE; RoPE over half of each head; Gemma 3 (two RoPE bases, sliding layers);
# Ministral 3 (queries scaled past position 16)
@pytest.mark.parametrize("kind", ("llama", "qwen3", "phi3", "phi3-partial", "gemma3", "ministral3"))
def test_compiled_generate_equals_eager(tiny_dirs, kind):
    """generate(decode="compiled"): greedy and seeded sampling (the pick fused into the graph)
    give the eager sampler's tokens and log-probs; top-p falls back to the eager pick."""
    model, _ = load(tiny_dirs[kind.removesuffix("-partial")][0], tokenizer=False)
    if kind.endswith("-partial"):
        partial = Transformer(ModelConfig(**{**model.config.__dict__, "partial_rotary_factor": 0.5,
                                             "rope_scaling": None})).eval()
        partial.load_state_dict(model.state_dict())
        model = partial
    prompts = _rand_prompts(256, [9, 4, 13], seed=24)
    samplings = (dict(temperature=0), dict(temperature=0.8, seed=5), dict(temperature=1.0, top_p=0.9, seed=6))
    for kw in samplings if kind == "llama" else samplings[1:2]:
        eager = generate(model, prompts, max_new_tokens=10, **kw)
        comp = generate(model, prompts, max_new_tokens=10, decode="compiled", **kw)
        assert comp.tokens == eager.tokens, kw
        assert torch.allclose(comp.logprob_tensor, eager.logprob_tensor, atol=1e-5), kw
    with pytest.raises(SamplingError, match="decode must be one of eager, compiled"):
        generate(model, prompts, max_new_tokens=2, decode="fast")


# --------------------------------------------------------------------------------------------
# per-row random streams and rollout compaction
# --------------------------------------------------------------------------------------------


def test_mul32_and_row_uniforms():
    """The 32-bit multiply equals Python's; a row's uniforms depend on its key and the step only
    (not on the other rows of the batch), lie in [0, 1) and look uniform and independent."""
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 2 ** 32, (3000,), generator=g)
    for m in (0x85EBCA6B, 0xC2B2AE35, 0x9E3779B9, 1, 0xFFFFFFFF):
        assert _mul32(x, m).tolist() == [(int(a) * m) % 2 ** 32 for a in x]
    keys = row_keys(2048, g, "cpu")
    assert keys.min() >= 0 and keys.max() < 2 ** 62
    assert (keys >> 32).max() >= 2 ** 29  # 62-bit keys: the high half the hash mixes in is used
    u = torch.cat([row_uniforms(keys, t) for t in range(32)], 1)  # [rows, steps]
    idx = torch.tensor([7, 3, 2000, 3])
    assert torch.equal(row_uniforms(keys[idx], 5), u[idx, 5:6])
    assert u.dtype == torch.float32 and u.min() >= 0 and u.max() < 1
    counts = torch.histc(u, bins=16, min=0, max=1)
    expect = u.numel() / 16
    assert ((counts - expect) ** 2 / expect).sum() < 45  # chi-square, 15 dof: p ~ 1e-4
    assert abs(torch.corrcoef(torch.stack([u[:, :-1].flatten(), u[:, 1:].flatten()]))[0, 1]) < 0.02
    assert abs(torch.corrcoef(torch.stack([u[:-1].flatten(), u[1:].flatten()]))[0, 1]) < 0.02
    assert len(set(u[:, 0].tolist())) > 2000 * 0.99  # rows do not share draws



def test_row_uniforms_pinned_and_tabled():
    """The streams RANDOM_STREAMS names, pinned to values (a change must rename them, or stored
    pairings by seed would silently pair other draws); the table the decode loop reads holds the
    same bits, row t contiguous."""
    assert RANDOM_STREAMS == "per-row-fmix32-v1"
    keys = torch.tensor([0, 1, 2 ** 62 - 1, 123456789012345678, 2 ** 32, 2 ** 32 - 1])
    pinned = {1: [0.6650139689445496, 0.4412654638290405, 0.09421670436859131, 0.40354931354522705,
                  0.4337639808654785, 0.5986602902412415],
              2 ** 32 + 3: [0.6144896745681763, 0.6825252771377563, 0.01780080795288086, 0.5788301825523376,
                            0.6471949815750122, 0.5010665655136108]}
    for step, values in pinned.items():
        assert row_uniforms(keys, step)[:, 0].tolist() == values
    keys = row_keys(37, torch.Generator().manual_seed(3), "cpu")
    table = uniform_table(keys, 300)
    assert table.shape == (300, 37) and table.dtype == torch.float32
    for t in (0, 1, 299):
        assert table[t].is_contiguous() and torch.equal(table[t], row_uniforms(keys, t)[:, 0])
    assert torch.equal(table.t(), row_uniforms(keys, torch.arange(300)))
    assert torch.equal(row_uniforms(keys, 2 ** 64 + 5), row_uniforms(keys, 5))  # a step is taken mod 2**32



@pytest.mark.parametrize("form", ["eager", "compiled", "runs"])
def test_decode_loop_host_ops_per_step(tiny, monkeypatch, form):
    """Host overhead outside the model: the ATen ops other than views (each a kernel launch on a
    GPU) that one sampled decode step with stop ids dispatches besides the forward; the uniforms
    used to be ~50 of them. Compiled: the code around the compiled function on the CUDA-graph path
    (forced here): the sampler's loop and DecodeStep's padding and output copies. (The compiled
    function itself runs eagerly under the counting mode and is not counted; what cudagraph trees
    add, copies of non-static inputs, exists only on CUDA.) Runs: graph runs of 8 steps, where
    the step's bookkeeping is in the graph; what is left is per run (the uniforms in, the ring
    out, the stop check). A count, not a time: a guard against per-step work creeping back into
    the loop."""
    import weakref

    from torch.utils._python_dispatch import TorchDispatchMode

    model = tiny["llama"][0]
    inside = [False]

    def counted(fn):
        def run(*a, **kw):
            inside[0] = True
            try:
                return fn(*a, **kw)
            finally:
                inside[0] = False
        return run

    class Count(TorchDispatchMode):
        ops = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.ops += not inside[0] and not func.is_view
            return func(*args, **(kwargs or {}))

    decode = "eager" if form == "eager" else "compiled"
    if form == "eager":
        monkeypatch.setattr(decode_mod, "step_logits", counted(decode_mod.step_logits))
    else:
        name = "_compile" if form == "compiled" else "_compile_step_in_place"
        compile_step = getattr(decode_mod, name)
        as_on_a_gpu(monkeypatch)
        monkeypatch.setattr(decode_mod, "GRAPH_RUN_STEPS", 8 if form == "runs" else 0)
        monkeypatch.setattr(decode_mod, "_COMPILED", weakref.WeakKeyDictionary())  # (compiled here, wrapped)
        monkeypatch.setattr(decode_mod, name, lambda *a: counted(compile_step(*a)))
    n = 48
    with torch.inference_mode():
        # (a stop id the run never samples: every step runs the whole loop)
        free = Session.start(model, [[1, 2, 3]] * 4, max_len=3 + n, seed=0).sample(n, temperature=1.0)
        stop = [min(set(range(model.config.vocab_size)) - {t for row in free.tokens for t in row})]
        # (the warm-up records the graphs the counted run replays; seeded as it is, it decodes the
        # same tokens and records every one: unseeded, two rows stopping in the first few steps
        # compacted the batch before its first run of 8, and the counted run recorded that graph)
        Session.start(model, [[1, 2, 3]] * 4, max_len=3 + n, seed=0, decode=decode).sample(
            n, temperature=1.0, stop_token_ids=stop)
        session = Session.start(model, [[1, 2, 3]] * 4, max_len=3 + n, seed=0, decode=decode)
        with Count() as count:
            out = session.sample(n, temperature=1.0, stop_token_ids=stop, sync_every=8)
    assert out.steps == n and not any(out.finished)
    # (measured 17.8, 12.0 and 2.98, the last mostly the call's set-up: deterministic counts; one
    # more op per step, or per run of 8 steps, fails)
    assert count.ops / n < {"eager": 18.5, "compiled": 12.5, "runs": 3.05}[form]


class _BatchSizes:
    """Wraps DecodeStep.__call__ to record every decode step's batch size."""

    def __init__(self, monkeypatch):
        self.sizes = []
        original = DecodeStep.__call__

        def run(step, tok, *a, **kw):
            self.sizes.append(tok.shape[0])
            return original(step, tok, *a, **kw)

        monkeypatch.setattr(DecodeStep, "__call__", run)


SAMPLINGS = [dict(temperature=0.0), dict(temperature=1.0), dict(temperature=0.8, top_p=0.9),
             dict(temperature=1.0, top_k=20)]


@pytest.mark.parametrize("kind", KINDS)
def test_compaction_gives_the_same_samples(tiny, kind, monkeypatch):
    """Rows stop at different steps; with compaction the decode batch shrinks, yet every token,
    stop and log-prob (fp32, up to rounding) is the one the full batch gives, and so is the
    cache: a second turn continued from it samples the same again."""
    model, _ = tiny[kind]
    prompts = _rand_prompts(256, [5, 9, 2, 12, 7, 3], seed=30)
    turns = _rand_prompts(256, [2, 6, 1, 4, 3, 5] * 3, seed=31)
    stops = list(range(3, 256, 11))  # ~9% of the vocabulary ends a row
    sizes = _BatchSizes(monkeypatch)
    compacted = 0
    for kw in SAMPLINGS:
        out = {}
        for compact in (False, True):
            sizes.sizes.clear()
            s = Session.start(model, prompts, seed=4, compact=compact).fork(3)
            a = s.sample(24, stop_token_ids=stops, **kw)
            s.append(turns)
            b = s.sample(16, stop_token_ids=stops, **kw)
            out[compact] = (s, a, b, list(sizes.sizes))
        (s0, a0, b0, n0), (s1, a1, b1, n1) = out[False], out[True]
        assert set(n0) == {18}
        early = sum(f and n < a0.steps for f, n in zip(a0.finished, a0.lengths))
        if early >= 0.25 * 18:  # a quarter stopped before the last step: the batch must shrink
            assert min(n1) < 18, "no compaction happened"
        compacted += min(n1) < 18
        for x, y in ((a0, a1), (b0, b1)):
            assert y.tokens == x.tokens and y.finished == x.finished and y.steps == x.steps, kw
            assert torch.equal(y.token_tensor, x.token_tensor)
            assert torch.allclose(y.logprob_tensor, x.logprob_tensor, atol=1e-5), kw
        assert s1.tokens == s0.tokens
        for r, row in enumerate(s0.tokens):  # every cached slot of every row
            n = len(row) - 1
            for k0, k1 in zip(s0.cache.k + s0.cache.v, s1.cache.k + s1.cache.v):
                assert torch.allclose(k0[r, :, :n], k1[r, :, :n], atol=1e-5)
    assert compacted >= 3


def test_compaction_with_the_compiled_step(tiny_dirs, monkeypatch):
    """The compiled decode step takes the shrinking batch (batch size is dynamic) and samples
    what the eager step without compaction samples."""
    model, _ = load(tiny_dirs["llama"][0], tokenizer=False)
    prompts = _rand_prompts(256, [9, 4, 13, 6], seed=32)
    stops = list(range(5, 256, 9))
    sizes = _BatchSizes(monkeypatch)
    eager = generate(model, prompts, max_new_tokens=16, temperature=0.9, seed=3, num_samples=4,
                     stop_token_ids=stops, compact=False)
    sizes.sizes.clear()
    comp = generate(model, prompts, max_new_tokens=16, temperature=0.9, seed=3, num_samples=4,
                    stop_token_ids=stops, decode="compiled")
    assert min(sizes.sizes) < 16
    assert comp.tokens == eager.tokens
    assert torch.allclose(comp.logprob_tensor, eager.logprob_tensor, atol=1e-5)


def test_compiled_step_compiles_once_inside_and_outside_inference_mode(tiny_dirs):
    """Sessions started inside and outside an inference-mode block (an evaluation harness, a
    training loop) and their compacted and grown caches all hold inference tensors, so the
    compiled step is not compiled again for the other kind of tensor (dynamo guards on it)."""
    from torch._dynamo.utils import counters

    model, _ = load(tiny_dirs["llama"][0], tokenizer=False)
    prompts = _rand_prompts(256, [5, 9, 2, 12, 4, 7, 3, 8, 6, 1, 10, 11], seed=50)
    stops = list(range(3, 256, 11))
    frames = None
    for inside in (False, True, False):
        with torch.inference_mode() if inside else torch.no_grad():
            # (presized, as episodes are: the first sample decodes in the cache made here)
            s = Session.start(model, prompts, max_len=40, seed=1, decode="compiled")
        s.sample(10, temperature=1.0)  # in the cache made here
        if frames is None:  # compiled once, for this first session's cache
            frames = counters["frames"]["ok"]
        s.append([[7, 8, 9, 10]] * len(s))
        s.sample(20, temperature=1.0, stop_token_ids=stops)  # a grown cache, compacted copies
        assert all(t.is_inference() for t in s.cache.k + s.cache.v)
    assert counters["frames"]["ok"] == frames, "compiled again"


def test_cuda_graph_decode_compiles_once_as_the_kv_length_grows(tiny_dirs, monkeypatch):
    """The static cache holds a bucket more than asked for, so no step reads every slot: a
    decode whose KV length crosses buckets up to the end of the request is one compiled graph."""
    from torch._dynamo.utils import counters

    as_on_a_gpu(monkeypatch)
    model, _ = load(tiny_dirs["llama"][0], tokenizer=False)
    frames = counters["frames"]["ok"]
    out = generate(model, _rand_prompts(256, [4, 8, 6], seed=51), max_new_tokens=70, temperature=0,
                   decode="compiled")
    assert out.steps == 70 and static_cache(model).full.max_len == 192  # 78 slots -> 128, + 64
    assert counters["frames"]["ok"] - frames == 1


def test_compiled_decode_compiles_once_as_the_kv_length_reaches_the_end(tiny_dirs):
    """Without CUDA graphs the compiled step runs on the session's cache, which a compiled
    session allocates a bucket longer than asked for: a decode up to the end of a presized
    request is one compiled graph (a step reading every slot would be compiled again)."""
    from torch._dynamo.utils import counters

    model, _ = load(tiny_dirs["llama"][0], tokenizer=False)
    frames = counters["frames"]["ok"]
    s = Session.start(model, _rand_prompts(256, [4, 8, 6], seed=52), max_len=78, decode="compiled")
    assert s.cache.max_len == 192  # 78 -> 128, + 64
    assert Session.start(model, [[1, 2]], max_len=78).cache.max_len == 78  # (eager: as asked)
    out = s.sample(70, temperature=0)
    assert out.steps == 70 and counters["frames"]["ok"] - frames == 1
    # A later turn that would fit the cache, but read its last bucket, grows it first.
    s = Session.start(model, _rand_prompts(256, [4, 15], seed=53), decode="compiled")
    s.sample(10, temperature=0)
    s.append([[5] * 40, [6] * 40])
    assert s.sample(30, temperature=0).steps == 30 and s.cache.max_len == 192  # 15 + 10 + 40 + 30
    assert counters["frames"]["ok"] - frames == 1


def test_graph_rows():
    assert [graph_rows(n) for n in (1, 2, 3, 4, 5, 8, 9, 16, 17, 300)] == [2, 2, 4, 4, 8, 8, 16, 16, 24, 304]
    assert all(graph_rows(graph_rows(n)) == graph_rows(n) >= n for n in range(1, 200))


def test_static_cache_grows_by_a_quarter_and_is_remade_for_another_dtype(tiny):
    model, _ = tiny["llama"]
    sc = StaticKVCache()
    sc.reserve(model.config, 3, 100, torch.float32, "cpu")
    assert (sc.full.batch_size, sc.full.max_len) == (4, 192)  # padded rows; slots: 64s, one more
    ptr = sc.full.k[0].data_ptr()
    sc.reserve(model.config, 4, 128, torch.float32, "cpu")  # fits: kept
    assert sc.full.k[0].data_ptr() == ptr
    v = sc.rows(3)
    assert v.k[0].data_ptr() == ptr and v.k[0].shape[0] == 3 and v.max_len == 192 and sc.holds(v)
    assert sc.rows(3) is v
    # the whole cache is what the compiled step gets: a static address, static shapes
    assert all(getattr(t, "_dynamo_static_input_type", None) == "unguarded" for t in sc.full.k + sc.full.v)
    assert not hasattr(sc.full.k[0], "_dynamo_weak_dynamic_indices")
    sc.reserve(model.config, 5, 129, torch.float32, "cpu")  # more of both: at least a quarter more
    assert (sc.full.batch_size, sc.full.max_len) == (8, 256) and not sc.holds(v)
    sc.reserve(model.config, 9, 10, torch.float32, "cpu")  # 9 rows pad to 16 (a quarter more: 10)
    assert (sc.full.batch_size, sc.full.max_len) == (16, 320)
    sc.reserve(model.config, 40, 10, torch.float32, "cpu")
    assert (sc.full.batch_size, sc.full.max_len) == (40, 448)
    sc.reserve(model.config, 2, 10, torch.bfloat16, "cpu")
    assert sc.full.k[0].dtype == torch.bfloat16 and (sc.full.batch_size, sc.full.max_len) == (2, 128)
    with pytest.raises(ValueError, match="holds 2 rows"):
        sc.rows(3)


def test_cuda_graph_decode_runs_in_one_static_cache(tiny_dirs, monkeypatch):
    """With CUDA graphs (forced here, where inductor leaves them out) the sampler decodes every
    session in the model's static cache: each compiled call sees the same addresses and slot
    count and a padded row count, so a graph recorded once is replayed by every later rollout;
    the samples, stops, log-probs and the session's cache equal the eager sampler's without
    compaction, across turns, forks and compactions (in place, to fewer padded rows)."""
    as_on_a_gpu(monkeypatch)
    monkeypatch.setattr(decode_mod, "GRAPH_RUN_STEPS", 0)  # (one replay per step; graph runs: below)
    calls = []
    compile_ = decode_mod._compile

    def spy(vocab_size, pick, cuda, lean_guards):
        assert cuda and lean_guards
        fn = compile_(vocab_size, pick, cuda, lean_guards)

        def run(model, tok, pos, ks, vs, conv, ssm, slots, live, u, temperature):
            calls.append((ks[0].data_ptr(), tuple(ks[0].shape), tok.shape[0], slots.shape[0]))
            return fn(model, tok, pos, ks, vs, conv, ssm, slots, live, u, temperature)
        return run

    monkeypatch.setattr(decode_mod, "_compile", spy)
    sizes = _BatchSizes(monkeypatch)
    model, _ = load(tiny_dirs["mistral"][0], tokenizer=False)  # (a sliding window)
    from torch._dynamo.utils import counters

    frames = counters["frames"]["ok"]
    stops = list(range(3, 256, 11))
    compacted = 0
    for prompts, fork, turn_rows in (([5, 9, 2, 12, 7], 3, 15), ([8, 3, 6], 1, 3)):
        prompts = _rand_prompts(256, prompts, seed=len(prompts))
        turns = _rand_prompts(256, [2, 6, 1, 4, 3, 5, 2, 1, 3, 4, 6, 2, 1, 5, 3][:turn_rows], seed=9)
        for kw in (dict(temperature=0.0), dict(temperature=1.0), dict(temperature=0.8, top_p=0.9)):
            out = {}
            for decode in ("eager", "compiled"):
                sizes.sizes.clear()
                s = Session.start(model, prompts, max_len=64, seed=4, decode=decode,  # (presized, as episodes are)
                                  compact=decode == "compiled").fork(fork)
                a = s.sample(24, stop_token_ids=stops, **kw)
                s.append(turns)
                b = s.sample(12, stop_token_ids=stops, **kw)
                out[decode] = (s, a, b)
            compacted += min(sizes.sizes) < len(turns)
            (s0, a0, b0), (s1, a1, b1) = out["eager"], out["compiled"]
            for x, y in ((a0, a1), (b0, b1)):
                assert y.tokens == x.tokens and y.finished == x.finished and y.steps == x.steps, kw
                assert torch.allclose(y.logprob_tensor, x.logprob_tensor, atol=1e-5), kw
            for r, row in enumerate(s0.tokens):  # every cached slot of every row
                n = len(row) - 1
                for k0, k1 in zip(s0.cache.k + s0.cache.v, s1.cache.k + s1.cache.v):
                    assert torch.allclose(k0[r, :, :n], k1[r, :, :n], atol=1e-5)
    assert compacted >= 2
    sc = static_cache(model)
    assert {c[0] for c in calls} == {sc.full.k[0].data_ptr()}
    assert {c[1][2] for c in calls} == {sc.full.max_len} == {128}
    assert all(c[3] < c[1][2] for c in calls)  # a step never reads every slot (one graph)
    assert {c[1][0] for c in calls} == {sc.full.batch_size}  # (the whole cache, its first rows decoded)
    assert all(c[2] == graph_rows(c[2]) for c in calls)
    assert {c[2] for c in calls} >= {16, 4} and max(c[2] for c in calls) == sc.full.batch_size
    shapes = {(c[2], c[3]) for c in calls}  # (rows, KV bucket): a graph each
    assert len(shapes) <= 8, shapes
    assert counters["frames"]["ok"] - frames == 3  # compiled once per pick (greedy, sampled, logits)


class _Runs:
    """Records GraphRuns' recordings (their keys) and runs ((padded rows, first slot, k))."""

    def __init__(self, monkeypatch):
        self.recorded, self.runs = [], []
        record, run = decode_mod.GraphRuns._record, decode_mod.GraphRuns.run

        def spy_record(runs, model_ref, key):
            self.recorded.append(key)
            return record(runs, model_ref, key)

        def spy_run(runs, kv_len, k, u):
            self.runs.append((graph_rows(runs.n), kv_len - k, k))
            return run(runs, kv_len, k, u)

        monkeypatch.setattr(decode_mod.GraphRuns, "_record", spy_record)
        monkeypatch.setattr(decode_mod.GraphRuns, "run", spy_run)


def test_graph_runs_decode_as_the_eager_sampler_does(tiny_dirs, monkeypatch):
    """With CUDA graphs (forced here; a recording is the steps run again) and the pick fused, the
    sampler decodes in runs of GRAPH_RUN_STEPS steps, one graph each, starting at multiples of it
    (one-step graphs before and after): the samples, stops (ids and strings), log-probs and the
    session's cache equal the eager sampler's, across turns, forks and compactions (to fewer
    padded rows); the same rollout again records no graph (each graph is recorded once); new
    parameter tensors drop the graphs."""
    as_on_a_gpu(monkeypatch)
    K = decode_mod.GRAPH_RUN_STEPS
    assert K == 8 and decode_mod.KV_BUCKET % K == 0
    spy = _Runs(monkeypatch)
    model, _ = load(tiny_dirs["mistral"][0], tokenizer=False)  # (a sliding window)
    stops = list(range(3, 256, 11))
    strings = StopStrings(["QZ", "KE"], _letters)

    def rollouts():
        for prompts, fork, turn_rows in (([5, 9, 2, 12, 7], 3, 15), ([8, 3, 6], 1, 3)):
            prompts = _rand_prompts(256, prompts, seed=len(prompts))
            turns = _rand_prompts(256, [2, 6, 1, 4, 3, 5, 2, 1, 3, 4, 6, 2, 1, 5, 3][:turn_rows], seed=9)
            for kw in (dict(temperature=0.0), dict(temperature=1.0), dict(temperature=1.0, stop_strings=strings)):
                out = {}
                for decode in ("eager", "compiled"):
                    s = Session.start(model, prompts, max_len=64, seed=4, decode=decode,
                                      compact=decode == "compiled").fork(fork)
                    a = s.sample(24, stop_token_ids=stops, **kw)
                    s.append(turns)
                    b = s.sample(12, stop_token_ids=stops, **kw)
                    out[decode] = (s, a, b)
                (s0, a0, b0), (s1, a1, b1) = out["eager"], out["compiled"]
                for x, y in ((a0, a1), (b0, b1)):
                    assert y.tokens == x.tokens and y.finished == x.finished, kw
                    # (stops are seen between runs: the batch may run on to the end of one)
                    assert x.steps <= y.steps < x.steps + K, kw
                    assert torch.allclose(y.logprob_tensor[:, :x.steps], x.logprob_tensor, atol=1e-5), kw
                    assert not y.logprob_tensor[:, x.steps:].any() and (y.token_tensor[:, x.steps:] == -1).all()
                for r, row in enumerate(s0.tokens):  # every cached slot of every row
                    n = len(row) - 1
                    for k0, k1 in zip(s0.cache.k + s0.cache.v, s1.cache.k + s1.cache.v):
                        assert torch.allclose(k0[r, :, :n], k1[r, :, :n], atol=1e-5)

    rollouts()
    sc = static_cache(model)
    assert {k for *_, k in spy.runs} == {1, K}
    assert all(first % K == 0 for _, first, k in spy.runs if k == K)
    assert sum(k == K for *_, k in spy.runs) >= 10
    rows = [r for r, *_ in spy.runs]
    assert {16, 4} <= set(rows) and max(rows) == sc.full.batch_size and all(r == graph_rows(r) for r in rows)
    assert len(spy.recorded) == len(set(spy.recorded)) == len(sc.runs.graphs)
    assert {key[-1] for key in spy.recorded} == {1, K} and {key[-2] for key in spy.recorded} == {64}
    recorded = len(spy.recorded)
    rollouts()
    assert len(spy.recorded) == recorded  # every graph replayed
    with torch.no_grad():
        model.embed_tokens.weight.data = model.embed_tokens.weight.data.clone()
    generate(model, [[1, 2, 3]], max_new_tokens=4, temperature=0.0, decode="compiled")
    assert len(sc.runs.graphs) == len(spy.recorded) - recorded > 0  # recorded again


@pytest.mark.parametrize("sync_every", [5, 8])
def test_graph_runs_where_they_meet_the_rest(tiny_dirs, monkeypatch, sync_every):
    """Graph runs against the eager sampler where runs meet the rest of the loop: a call that
    crosses from one KV bucket to the next (no run spans two), stop checks every 5 or 8 steps
    (not at run ends) with compactions, a batch of one row (padded to two), a vocabulary smaller
    than the model's (never sampled past it)."""
    as_on_a_gpu(monkeypatch)
    spy = _Runs(monkeypatch)
    model, _ = load(tiny_dirs["qwen3"][0], tokenizer=False)
    stops = list(range(5, 200, 17))
    for lengths, fork, n, vocab in (([58, 61, 50, 63, 57, 62], 2, 48, None), ([9], 1, 40, None),
                                    ([6, 11, 4], 2, 40, 200)):
        prompts = _rand_prompts(vocab or 256, lengths, seed=len(lengths))
        for kw in (dict(temperature=0.0), dict(temperature=1.0)):
            out = {}
            for decode in ("eager", "compiled"):
                s = Session.start(model, prompts, max_len=max(lengths) + n + 8, vocab_size=vocab, seed=7,
                                  decode=decode, compact=decode == "compiled").fork(fork)
                out[decode] = s.sample(n, stop_token_ids=stops, sync_every=sync_every, **kw)
            x, y = out["eager"], out["compiled"]
            assert y.tokens == x.tokens and y.finished == x.finished, (lengths, kw)
            m = min(x.steps, y.steps)
            assert torch.allclose(y.logprob_tensor[:, :m], x.logprob_tensor[:, :m], atol=1e-5)
            assert not x.logprob_tensor[:, m:].any() and not y.logprob_tensor[:, m:].any()
            if vocab:
                assert max(t for row in y.tokens for t in row) < vocab
    rows = {key[3] for key in spy.recorded}
    kvs = {key[4] for key in spy.recorded}
    assert 2 in rows and {64, 128} <= kvs and {key[0] for key in spy.recorded} == {256, 200}
    for _, first, k in spy.runs:  # (a run reads one bucket: its first and last steps' KV lengths)
        assert first // decode_mod.KV_BUCKET == (first + k - 1) // decode_mod.KV_BUCKET


@pytest.mark.parametrize("kind", KINDS)
def test_graph_runs_compile_every_architecture_as_one_graph(tiny_dirs, monkeypatch, kind):
    """Graph runs compile each architecture's step with the bookkeeping as one graph (a graph
    break would leave Python between pieces, which a CUDA graph does not replay) and sample as
    the eager sampler does (LongRoPE, q/k norms, a sliding window, biases)."""
    from torch._dynamo.utils import counters

    as_on_a_gpu(monkeypatch)
    breaks, frames = sum(counters["graph_break"].values()), counters["frames"]["ok"]
    spy = _Runs(monkeypatch)
    model, _ = load(tiny_dirs[kind][0], tokenizer=False)
    prompts = _rand_prompts(256, [7, 3, 12], seed=5)
    eager = generate(model, prompts, max_new_tokens=20, temperature=1.0, seed=3, stop_token_ids=[9, 17])
    comp = generate(model, prompts, max_new_tokens=20, temperature=1.0, seed=3, stop_token_ids=[9, 17],
                    decode="compiled")
    assert comp.tokens == eager.tokens and comp.finished == eager.finished
    assert torch.allclose(comp.logprob_tensor[:, :eager.steps], eager.logprob_tensor, atol=1e-5)
    assert {k for *_, k in spy.runs} == {1, 8}
    assert sum(counters["graph_break"].values()) == breaks and counters["frames"]["ok"] - frames == 1


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("run_steps", [0, 8])
def test_cuda_graph_decode_on_a_gpu(tiny_dirs, monkeypatch, run_steps):
    """On a GPU (skipped here): the compiled sampler with CUDA graphs, per-step replays and graph
    runs, equals the eager one in fp32 (tokens, stops, log-probs) across a fork, a second turn and
    compactions; a second rollout replays the graphs (graph runs: none recorded again)."""
    monkeypatch.setattr(decode_mod, "GRAPH_RUN_STEPS", run_steps)
    spy = _Runs(monkeypatch)
    model, _ = load(tiny_dirs["qwen2"][0], tokenizer=False)
    model = model.cuda()
    stops = list(range(3, 256, 13))
    prompts = _rand_prompts(256, [5, 9, 2, 12, 7, 3], seed=2)
    turns = _rand_prompts(256, [2, 6, 1, 4, 3, 5] * 3, seed=9)
    for rollout in range(2):
        for kw in (dict(temperature=0.0), dict(temperature=1.0)):
            out = {}
            for decode in ("eager", "compiled"):
                s = Session.start(model, prompts, max_len=96, seed=4, decode=decode).fork(3)
                a = s.sample(40, stop_token_ids=stops, **kw)
                s.append(turns)
                b = s.sample(24, stop_token_ids=stops, **kw)
                out[decode] = (a, b)
            for x, y in zip(out["eager"], out["compiled"]):
                assert y.tokens == x.tokens and y.finished == x.finished, kw
                assert torch.allclose(y.logprob_tensor[:, :x.steps], x.logprob_tensor, atol=1e-4), kw
        if rollout == 0:
            recorded = len(spy.recorded)
    assert len(spy.recorded) == recorded and (recorded > 0) == (run_steps > 0)


# --------------------------------------------------------------------------------------------
# stop strings
# --------------------------------------------------------------------------------------------


def _letters(ids):
    """A stand-in tokenizer: token i is the letter chr(65 + i % 26) (token 255 is two letters)."""
    return "".join("YZ" if i == 255 else chr(65 + i % 26) for i in ids)


def _cut_at_string(tokens, strings, decode=_letters):
    for j in range(1, len(tokens) + 1):
        if any(x in decode(tokens[:j]) for x in strings):
            return tokens[:j]
    return None


@pytest.mark.parametrize("sync_every", [1, 4])
def test_stop_strings_cut_the_free_run(tiny, sync_every):
    """A row ends at the token that completes a stop string; up to there its tokens are the
    free run's (same seed), with or without compaction, whether the check runs every step or
    every 4 (rows then run past their stop and are cut); a stop id earlier still wins; the
    cache continues exactly (a second turn equals a fresh prefill)."""
    model, _ = tiny["llama"]
    prompts = _rand_prompts(256, [5, 9, 2, 12], seed=33)
    strings = ["QZ", "AB", "YZ", "KE", "MM", "DO"]
    stop = StopStrings(strings, _letters)
    free = Session.start(model, prompts, seed=8).fork(4).sample(40, temperature=1.0)
    want = [_cut_at_string(t, strings) for t in free.tokens]
    assert sum(w is not None for w in want) >= 6 and sum(w is None for w in want) >= 1, [len(w or []) for w in want]
    stop_id = free.tokens[3][2]
    for compact in (False, True):
        s = Session.start(model, prompts, seed=8, compact=compact).fork(4)
        got = s.sample(40, temperature=1.0, stop_strings=stop, stop_token_ids=[stop_id], sync_every=sync_every)
        for g, f, w, fin in zip(got.tokens, free.tokens, want, got.finished):
            by_id = f[: f.index(stop_id) + 1] if stop_id in f else None
            ends = [x for x in (w, by_id) if x is not None]
            expect = min(ends, key=len) if ends else f
            assert g == expect and fin == bool(ends)
        assert got.tokens[3] == free.tokens[3][:3] or len(got.tokens[3]) < 3
        # the tensors are padded past each row's stop, where rows that ran on until a check
        # sampled more: PAD (-1) tokens and 0.0 log-probs
        pad = got.token_tensor == -1
        assert torch.equal(pad, torch.arange(got.steps) >= torch.tensor(got.lengths)[:, None])
        assert (got.logprob_tensor[pad] == 0).all() and (got.logprob_tensor[~pad] < 0).all()
        turns = _rand_prompts(256, [3, 1, 4, 2] * 4, seed=34)
        s.append(turns)
        hist = [list(r) for r in s.tokens]
        second = s.sample(6, temperature=0)
        fresh = Session.start(model, hist).sample(6, temperature=0)
        assert second.tokens == fresh.tokens
        assert torch.allclose(second.logprob_tensor, fresh.logprob_tensor, atol=1e-5)


@pytest.mark.parametrize("sync_every", [1, 4])
def test_stop_strings_count_only_where_confirm_says(tiny, sync_every):
    """With ``confirm`` (the whole row -> whether its stop string counts; episodes use it to skip
    stop strings inside a reasoning block) a row runs past an occurrence that does not count and
    ends at the first that does: here one after the row's first Q, as ``</answer>`` counts only
    after ``</think>``."""
    model, _ = tiny["llama"]
    prompts = _rand_prompts(256, [5, 9, 2, 12], seed=33)
    strings = ["K", "MM", "DO"]

    def after_q(ids):
        text = _letters(ids)
        return "Q" in text and any(x in text[text.index("Q") + 1:] for x in strings)

    free = Session.start(model, prompts, seed=8).fork(4).sample(60, temperature=1.0)
    want = []
    for t in free.tokens:
        cut = next((j for j in range(1, len(t) + 1) if after_q(t[:j])), None)
        want.append(None if cut is None else t[:cut])
    plain = [_cut_at_string(t, strings) for t in free.tokens]
    assert sum(p is not None and (w is None or len(p) < len(w)) for p, w in zip(plain, want)) >= 3  # (it matters)
    # (a quarter of the 16 rows stop well before the end, and more than two run on: the compacted
    # decode batch maps its rows back to the session's for confirm)
    assert sorted(len(w) for w in want if w is not None)[3] <= 40 and sum(w is None for w in want) >= 2
    stop = StopStrings(strings, _letters, confirm=after_q)
    for compact in (False, True):
        got = Session.start(model, prompts, seed=8, compact=compact).fork(4).sample(
            60, temperature=1.0, stop_strings=stop, sync_every=sync_every)
        for g, f, w, fin in zip(got.tokens, free.tokens, want, got.finished):
            assert g == (f if w is None else w) and fin == (w is not None)


def test_stop_strings_reject_empty_texts():
    with pytest.raises(SamplingError, match="stop strings"):
        StopStrings(["</answer>", ""], _letters)
    with pytest.raises(SamplingError, match="stop strings"):
        StopStrings([], _letters)


def test_a_rows_draw_at_tied_logits_does_not_depend_on_its_batch():
    """bf16-rounded logits tie often. With top-p the candidate set (top 256, top 4096, or a full
    sort) is chosen for the whole batch, and with top-k ``topk`` orders ties as it likes: ties are
    put in token-id order, so a row draws the same token alone or beside a flat row."""
    g = torch.Generator().manual_seed(0)
    V = 49152
    tied = (torch.randn(V, generator=g) * 3).bfloat16().float()
    flat = torch.zeros(V)  # its top 4096 hold less than top_p of its mass: the full sort
    for kw in (dict(top_p=0.9), dict(top_k=2000), dict(top_k=3000, top_p=0.8)):
        for _ in range(50):
            u = torch.rand(1, 1, generator=g)
            alone, _ = pick_tokens(tied[None], temperature=1.0, u=u, **kw)
            both, _ = pick_tokens(torch.stack([tied, flat]), temperature=1.0, u=torch.cat([u, u]), **kw)
            assert alone[0] == both[0], kw


def test_compiled_step_follows_changes_to_the_model(tiny_dirs, monkeypatch):
    """A model changed after its compiled step was made (a parameter replaced, an attribute the
    graph reads set, its dtype changed in place) decodes as the eager step does."""
    as_on_a_gpu(monkeypatch)  # (the static cache's form of the step)
    model, _ = load(tiny_dirs["llama"][0], tokenizer=False)
    prompts = _rand_prompts(256, [6, 3, 9], seed=61)

    def same():
        eager = generate(model, prompts, max_new_tokens=6, temperature=0)
        comp = generate(model, prompts, max_new_tokens=6, temperature=0, decode="compiled")
        assert comp.tokens == eager.tokens
        assert torch.allclose(comp.logprob_tensor, eager.logprob_tensor, atol=2e-2 if model.dtype != torch.float32 else 1e-5)
        return comp.tokens

    first = same()
    with torch.no_grad():  # a parameter replaced by another of the same shape
        w = model.layers[1].mlp.down_proj.weight
        model.layers[1].mlp.down_proj.weight = torch.nn.Parameter(-3.0 * w.detach().clone())
    assert same() != first
    model.layers[0].input_layernorm.eps = 0.5  # an attribute the graph reads (a constant in it)
    same()
    model.to(torch.bfloat16)  # in place: param.data swapped, no module dict changes
    same()


def test_cuda_graph_step_writes_the_static_cache_in_place(tiny_dirs, monkeypatch):
    """The CUDA-graph step gets the static cache's whole tensors and decodes in its first rows:
    inductor's code writes the new keys/values into them in place. (Rows sliced off before the
    write made it copy every layer's cache out and back at each step: ~20x slower here.) Its
    logits and cache writes equal the eager step's, and the rows it does not decode are untouched."""
    from torch._inductor.utils import run_and_get_code

    model, _ = load(tiny_dirs["llama"][0], tokenizer=False)
    rows = _rand_prompts(256, [12, 5, 9], seed=71)
    with torch.inference_mode():
        caches, last, pos = _prefilled(model, rows, 12)
        ref = DecodeStep(model, "eager")(last, pos, caches[0], 12, 256)
        sc = StaticKVCache()
        sc.reserve(model.config, 16, 250, torch.float32, "cpu")  # 16 rows of 320 slots
        assert (sc.full.batch_size, sc.full.max_len) == (16, 320)
        for t in sc.full.k + sc.full.v:
            t.fill_(7.0)
        monkeypatch.setitem(decode_mod._STATIC, model, sc)  # (the model's static cache)
        dst = sc.copy_in(caches[1], 11)
        step = DecodeStep(model, "compiled", cuda_graphs=True)
        got, codes = run_and_get_code(lambda: step(last, pos, dst, 12, 256))
    assert (got - ref).abs().max().item() <= 1e-5
    call = codes[-1][codes[-1].index("def call"):]
    buffers = [line for line in call.splitlines() if "empty_strided" in line]
    # (a buffer [rows, n_kv, 320 slots, head_dim]: a copy of a layer's cache)
    assert buffers and not [line for line in buffers if re.search(r"\b320, \d+\)", line)], buffers
    for full, eager in zip(sc.full.k + sc.full.v, caches[0].k + caches[0].v):
        for r, p in enumerate(pos.tolist()):
            assert torch.allclose(full[r, :, :p + 1], eager[r, :, :p + 1], atol=1e-5)
        assert (full[3, :, 1:] == 7.0).all() and (full[4:] == 7.0).all()  # (padding row 3 writes its slot 0)
        assert (full[:3, :, 12:] == 7.0).all()


@pytest.mark.parametrize("run_steps", [0, 8])
def test_cuda_graph_step_has_nothing_that_keeps_it_out_of_cuda_graphs(tiny_dirs, monkeypatch, run_steps):
    """What a GPU would show only as a warning (the step then runs without CUDA graphs, or in
    pieces), checked in inductor's graphs on the CPU: the step's only input mutations are the
    static cache's writes (a mutated input without a static address skips CUDA graphs), no node
    is unsafe for a graph (a host sync, a data-dependent shape: with graph partitioning, the graph
    is cut there), no graph breaks. Greedy and sampled picks, a batch of 1 (padded) and of 3.
    In graph runs (``run_steps``; GraphRuns captures them itself, where a host sync would fail
    the capture) the step also writes the runs' state and ring: five inputs more."""
    import inspect
    import weakref

    import torch._inductor.output_code as output_code
    from torch._dynamo.utils import counters
    from torch._inductor.utils import get_first_incompatible_cudagraph_node

    graphs = []
    init = output_code.CompiledFxGraph.__init__
    signature = inspect.signature(init)

    def recording_init(self, *args, **kwargs):
        init(self, *args, **kwargs)
        bound = signature.bind(self, *args, **kwargs).arguments
        graphs.append((bound["gm"], set(bound["static_input_idxs"]), self))

    monkeypatch.setattr(output_code.CompiledFxGraph, "__init__", recording_init)
    as_on_a_gpu(monkeypatch)
    monkeypatch.setattr(decode_mod, "GRAPH_RUN_STEPS", run_steps)
    monkeypatch.setattr(decode_mod, "_COMPILED", weakref.WeakKeyDictionary())
    model, _ = load(tiny_dirs["qwen2"][0], tokenizer=False)
    breaks = sum(counters["graph_break"].values())
    # (no cache hits: a graph from a cache is not built here. The config modules' own patch: pytest
    # 9.2's monkeypatch deletes a config entry on undo, which hides it from every later compile.)
    with torch._inductor.config.patch(fx_graph_cache=False), torch._functorch.config.patch(enable_autograd_cache=False):
        for temperature, lengths in ((0, [4, 7, 6]), (0, [5]), (1.0, [6, 2, 5]), (1.0, [3])):  # (one cache shape)
            prompts = _rand_prompts(256, lengths, seed=len(lengths))
            with torch.inference_mode():
                generate(model, prompts, max_new_tokens=6, temperature=temperature, decode="compiled", stop_token_ids=[7])
    assert sum(counters["graph_break"].values()) == breaks
    assert len(graphs) == 2  # (one per pick; batch size is dynamic)
    for gm, static, compiled in graphs:
        names = [node.name for node in gm.graph.find_nodes(op="placeholder")]
        assert get_first_incompatible_cudagraph_node(gm) is None
        mutated = sorted(compiled.mutated_input_idxs)
        cache = [i for i in mutated if i in static]
        assert len(cache) == 2 * model.config.num_hidden_layers  # (each layer's keys and values)
        others = sorted(names[i] for i in mutated if i not in static)
        if run_steps:  # (tokens, positions, stop flags; the ring's tokens and log-probs)
            assert len(others) == 5, others
        else:
            assert others == []
            # On the CPU inductor skips CUDA graphs for the device alone.
            assert compiled.disabled_cudagraphs_reason is None or "device" in compiled.disabled_cudagraphs_reason


def test_cuda_graph_step_guards_tensors_and_values_not_the_structure(tiny_dirs, monkeypatch):
    """The CUDA-graph step keeps dynamo's guards on tensors, shapes and the values it read, and
    drops those on the model's structure (host time at every step): a parameter with other
    strides compiles the step again, and its samples equal eager's (a changed attribute value:
    test_compiled_step_follows_changes_to_the_model); a ``forward`` replaced on an instance
    after compiling is not seen (r3 never does that). With prepacked weights (CPU) every
    guard stays: the modules' attributes say which weights are current."""
    import weakref

    from torch._dynamo.utils import counters

    as_on_a_gpu(monkeypatch)
    monkeypatch.setattr(decode_mod, "_COMPILED", weakref.WeakKeyDictionary())
    model, _ = load(tiny_dirs["qwen3"][0], tokenizer=False)
    prompts = _rand_prompts(256, [6, 3, 8], seed=5)
    eager = generate(model, prompts, max_new_tokens=8, temperature=0).tokens

    def compiles(change=lambda: None):
        change()
        frames = counters["frames"]["ok"]
        assert generate(model, prompts, max_new_tokens=8, temperature=0, decode="compiled").tokens == eager
        return counters["frames"]["ok"] - frames

    def strided_norm():  # the same values, every other element of a buffer
        w = model.norm.weight.detach()
        model.norm.weight = torch.nn.Parameter(torch.zeros(2 * w.numel()).view(-1, 2)[:, 0].copy_(w),
                                               requires_grad=False)

    assert compiles() == 1 and compiles() == 0
    assert compiles(strided_norm) == 1
    norm = model.norm
    monkeypatch.setattr(norm, "forward", lambda x: 0 * x, raising=False)
    assert generate(model, prompts, max_new_tokens=8, temperature=0).tokens != eager  # (eager runs it)
    assert compiles() == 0  # (the compiled step still runs the class's forward)
    # Prepacked weights: compiled with every guard.
    monkeypatch.setattr(PackedWeights, "available", staticmethod(_PACKED_AVAILABLE))
    packed = load(tiny_dirs["qwen3"][0], tokenizer=False)[0]
    step = DecodeStep(packed, "compiled", cuda_graphs=True)
    assert (step.packed is not None) == PackedWeights.available(packed)
    if step.packed is not None:
        compiled = []
        monkeypatch.setattr(decode_mod, "_compile", lambda *a: compiled.append(a) or (lambda *b: torch.zeros(2, 256)))
        with step.active():
            step(torch.tensor([1, 2]), torch.tensor([0, 0]), packed.new_cache(2, 8), 1, 256)
        assert compiled == [(256, None, True, False)]


@pytest.mark.parametrize("run_steps", [0, 8])
def test_cuda_graph_step_compiles_once_per_static_cache_shape(tiny_dirs, monkeypatch, run_steps):
    """When the static cache grows, the step is compiled once for its new shape and stays static
    in it (the cache's tensors are never marked dynamic; a batch of any padded row count shares
    one compiled graph per shape); the samples equal the eager sampler's throughout. Steps
    replayed one by one and in graph runs."""
    from torch._dynamo.utils import counters

    as_on_a_gpu(monkeypatch)
    monkeypatch.setattr(decode_mod, "GRAPH_RUN_STEPS", run_steps)
    model, _ = load(tiny_dirs["llama"][0], tokenizer=False)
    frames = counters["frames"]["ok"]
    shapes = []
    for lengths, new in (([5, 9], 10), ([4, 7, 3, 8, 6], 10), ([3, 6, 2], 12), ([9, 4, 6, 5, 7, 8, 3, 2, 4], 100)):
        prompts = _rand_prompts(256, lengths, seed=len(lengths))
        eager = generate(model, prompts, max_new_tokens=new, temperature=0)
        comp = generate(model, prompts, max_new_tokens=new, temperature=0, decode="compiled")
        assert comp.tokens == eager.tokens
        full = static_cache(model).full
        shapes.append((full.batch_size, full.max_len))
        assert not any(hasattr(t, "_dynamo_weak_dynamic_indices") for t in full.k + full.v)
    assert shapes == [(2, 128), (8, 192), (8, 192), (16, 256)]  # grew twice (each time a quarter at least)
    assert counters["frames"]["ok"] - frames == 3


def test_a_loaded_model_samples_only_its_tokenizers_ids_by_default(tmp_path, builtin):
    """A checkpoint whose embeddings are padded past its tokenizer (Qwen2.5: 151,936 rows for
    151,665 ids): loaded with its tokenizer, the sampler's default never draws a padded id, even
    where those ids win every argmax; an explicit vocab_size still decides."""
    from conftest import make_tiny_hf

    from r3.checkpoint import load

    real = len(builtin[1])
    hf = make_tiny_hf(tmp_path, "llama", vocab_size=real + 16, tie_word_embeddings=False)
    with torch.no_grad():  # a residual dimension held at 8 through the blocks, read by the padded rows
        hf.model.embed_tokens.weight[:, 0] = 8.0
        for layer in hf.model.layers:
            layer.self_attn.o_proj.weight[0].zero_()
            layer.mlp.down_proj.weight[0].zero_()
        hf.model.norm.weight[0] = 1.0
        hf.lm_head.weight[real:, 0] = 50.0
    hf.save_pretrained(str(tmp_path))
    builtin[1].save_pretrained(str(tmp_path))
    model, tok = load(tmp_path)
    assert model.config.vocab_size == real + 16 and model.sampling_vocab_size == len(tok) == real
    prompts = _rand_prompts(real, [3, 5], seed=2)
    assert (model(torch.tensor([prompts[0]]))[0].argmax(-1) >= real).all()
    for kw in (dict(), dict(temperature=0), dict(top_k=50)):
        out = generate(model, prompts, max_new_tokens=6, num_samples=2, seed=0, **kw)
        assert max(max(t) for t in out.tokens) < real
    assert min(generate(model, prompts, max_new_tokens=6, temperature=0, vocab_size=real + 16).tokens[0]) >= real
    bare, _ = load(tmp_path, tokenizer=False)  # (no tokenizer: the model's whole vocabulary)
    assert not hasattr(bare, "sampling_vocab_size")


def test_draw_boundaries():
    """Inverse-CDF edges: u = 0 never draws a token of probability 0 (a -inf logit first in the
    row); the nucleus keeps the smallest prefix whose mass reaches top_p, a tie at the boundary
    included (two equal tokens at top_p = 0.5: one kept, as transformers' TopPLogitsWarper); top_p
    = 1 with top-k is top-k alone."""
    from r3.sampler import pick_sampled

    tok, lp = pick_sampled(torch.tensor([[float("-inf"), 0.0, 0.0]]), torch.zeros(1, 1), 1.0)
    assert tok.item() == 1 and lp.item() == pytest.approx(math.log(0.5))
    for u in (0.0, 0.5, 0.99):
        tok, lp = pick_tokens(torch.zeros(1, 2), top_p=0.5, u=torch.tensor([[u]]))
        assert tok.item() == 0 and lp.item() == 0.0
    logits = torch.randn(3, 40, generator=torch.Generator().manual_seed(0)) * 3
    for u in (0.0, 0.5, 1 - 2 ** -24):
        a = pick_tokens(logits, top_k=10, top_p=1.0, u=torch.full((3, 1), u))
        b = pick_tokens(logits, top_k=10, u=torch.full((3, 1), u))
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_stop_ids_outside_the_vocabulary_are_ignored(tiny):
    """Stop ids the sampler can never draw -- negative ones and ``vocab_size`` itself (an eos id
    in a checkpoint's padded rows) -- stop nothing: not even a row that samples ``vocab_size - 1``
    (the id a negative index would alias)."""
    model, _ = tiny["llama"]
    prompts = _rand_prompts(256, [4, 7, 3], seed=12)
    first = [t[0] for t in generate(model, prompts, max_new_tokens=1, temperature=0).tokens]
    v = max(first) + 1  # greedy over ids < v keeps each row's argmax: one row's first token is v - 1
    ref = generate(model, prompts, max_new_tokens=6, temperature=0, vocab_size=v)
    assert ref.tokens[first.index(v - 1)][0] == v - 1
    out = generate(model, prompts, max_new_tokens=6, temperature=0, vocab_size=v, stop_token_ids=[-1, v])
    assert out.tokens == ref.tokens and out.finished == [False] * 3 and out.steps == 6


def test_stop_string_completed_at_the_last_step_finishes_the_row(tiny):
    """A row whose stop string is completed by its ``max_new_tokens``-th token ended on the stop
    string: ``finished`` is True (it did not merely hit the limit), also when the last step is
    not a multiple of ``sync_every``."""
    model, _ = tiny["llama"]
    prompts = _rand_prompts(256, [5, 9, 2, 12], seed=33)
    strings = ["QZ", "AB", "YZ", "KE", "MM", "DO"]
    free = Session.start(model, prompts, seed=8).fork(4).sample(40, temperature=1.0)
    want = [_cut_at_string(t, strings) for t in free.tokens]
    r = min((i for i, w in enumerate(want) if w is not None and len(w) >= 2), key=lambda i: len(want[i]))
    n = len(want[r])
    for sync_every in (1, n + 1):  # (n + 1: the only check is the one after the last step)
        got = Session.start(model, prompts, seed=8).fork(4).sample(
            n, temperature=1.0, stop_strings=StopStrings(strings, _letters), sync_every=sync_every)
        assert got.tokens[r] == want[r] and got.lengths[r] == n and got.finished[r], sync_every
        for g, f, w, fin in zip(got.tokens, free.tokens, want, got.finished):  # the rest: cut at n or their string
            assert fin == (w is not None and len(w) <= n) and g == (w if fin else f[:n])


def test_stop_strings_window_covers_multibyte_characters():
    """The window is counted in UTF-8 bytes (plus one): a one-character stop string whose two
    bytes are two tokens is found (byte-level tokens, as a byte-BPE tokenizer's)."""
    by_bytes = StopStrings(["\u00e9"], lambda ids: bytes(ids).decode("utf-8", "replace"))
    assert by_bytes.completed([0x41, 0xC3, 0xA9])
    assert not by_bytes.completed([0x41, 0xC3])


def test_stop_string_before_a_stop_id_between_checks_wins(tiny):
    """A row that completes a stop string and then, before the next check (every ``sync_every``
    steps), samples a stop id is cut at the stop string: rows that stopped on an id since the last
    check are still searched for stop strings up to that id -- at the first check and at later
    ones."""
    model, _ = tiny["llama"]
    prompts = _rand_prompts(256, [5, 9, 2, 12], seed=33)
    strings = ["QZ", "AB", "YZ", "KE", "MM", "DO"]
    free = Session.start(model, prompts, seed=8).fork(4).sample(40, temperature=1.0)
    want = [_cut_at_string(t, strings) for t in free.tokens]
    # (row, sync_every): the string's last token (index L - 1) and the next one in one check window
    cases = {}
    for i, (w, f) in enumerate(zip(want, free.tokens)):
        if w is not None and len(w) < 40 and f[len(w)] not in w:
            L = len(w)
            cases.setdefault("first", (i, 40))
            later = [s for s in range(2, L) if (L - 1) // s == L // s]
            if later:
                cases.setdefault("later", (i, later[0]))
    assert set(cases) == {"first", "later"}
    for r, sync_every in cases.values():
        stop_id = free.tokens[r][len(want[r])]  # the token right after the stop string
        for compact in (False, True):
            got = Session.start(model, prompts, seed=8, compact=compact).fork(4).sample(
                40, temperature=1.0, stop_strings=StopStrings(strings, _letters), stop_token_ids=[stop_id],
                sync_every=sync_every)
            assert got.tokens[r] == want[r] and got.finished[r], (r, sync_every, compact)
            for g, f, w in zip(got.tokens, free.tokens, want):
                by_id = f[: f.index(stop_id) + 1] if stop_id in f else None
                ends = [x for x in (w, by_id) if x is not None]
                assert g == (min(ends, key=len) if ends else f)


def test_new_tokens_counts_each_rows_own_tokens(tiny):
    """``new_tokens`` (the throughput figures' numerator) is the sum of the rows' lengths, not
    rows x steps: rows that stopped early count only their tokens."""
    model, _ = tiny["llama"]
    prompts = _rand_prompts(256, [4, 9, 6], seed=10)
    free = generate(model, prompts, max_new_tokens=12, seed=5).tokens
    out = generate(model, prompts, max_new_tokens=12, seed=5, stop_token_ids=[free[0][1]])
    assert out.lengths[0] <= 2 < max(out.lengths) <= out.steps
    assert out.new_tokens == sum(len(t) for t in out.tokens) == sum(out.lengths) < len(out.tokens) * out.steps
    assert out.new_tokens == (out.token_tensor != -1).sum().item()


def test_generate_passes_stop_strings_on(tiny):
    """``generate(stop_strings=...)`` ends rows as ``Session.sample`` does: each row is the free
    run (same seed) cut at the token that completes a stop string, and finished."""
    model, _ = tiny["llama"]
    prompts = _rand_prompts(256, [5, 9, 2, 12], seed=33)
    strings = ["QZ", "AB", "YZ", "KE", "MM", "DO"]
    free = generate(model, prompts, max_new_tokens=40, num_samples=4, seed=8)
    want = [_cut_at_string(t, strings) for t in free.tokens]
    assert sum(w is not None for w in want) >= 6
    got = generate(model, prompts, max_new_tokens=40, num_samples=4, seed=8, stop_strings=StopStrings(strings, _letters))
    assert got.tokens == [f if w is None else w for f, w in zip(free.tokens, want)]
    assert got.finished == [w is not None for w in want]



def test_r3_generate_renders_the_chat_template_with_its_options(builtin, monkeypatch, capsys):
    """--chat-template-option reaches the template (Qwen3's enable_thinking=true: the prompt of a
    thinking turn), as in training; without it the template gets r3's default
    (enable_thinking=false). An empty --system is a system message (to the template and to --raw,
    which refuses it); a template that fails
    is not answered with --raw (which is for a tokenizer without one)."""
    import copy
    from types import SimpleNamespace

    import r3.generate as cli

    _, tok = builtin
    thinking = copy.deepcopy(tok)
    thinking.chat_template = "{% if enable_thinking %}THINKING {% endif %}" + tok.chat_template
    config = SimpleNamespace(vocab_size=len(tok), eos_token_id=None, max_position_embeddings=8192)
    seen = []

    def fake_generate(model, prompts, **kw):
        seen.append(tok.decode(prompts[0]))
        return SimpleNamespace(tokens=[[]], finished=[False], new_tokens=0, prefill_s=0.0, decode_s=1.0,
                               tokens_per_s=0.0)

    monkeypatch.setattr(cli, "load", lambda *a, **kw: (SimpleNamespace(config=config), thinking))
    monkeypatch.setattr(cli, "generate", fake_generate)
    assert cli.main(["--prompt", "hi", "--device", "cpu", "--chat-template-option", "enable_thinking=true"]) == 0
    assert cli.main(["--prompt", "hi", "--device", "cpu"]) == 0
    assert seen[0].startswith("THINKING <|im_start|>") and seen[1].startswith("<|im_start|>"), seen
    # --system '' is an empty system message, not none: the built-in template's default one
    # (added when a conversation has no system message) is then left out, as the user asked
    assert cli.main(["--prompt", "hi", "--device", "cpu", "--system", ""]) == 0
    assert "SmolLM" in seen[1] and seen[2].startswith("<|im_start|>system\n<|im_end|>") and "SmolLM" not in seen[2], seen
    capsys.readouterr()
    with pytest.raises(SystemExit):
        cli.main(["--raw", "--prompt", "x", "--device", "cpu", "--system", ""])
    assert capsys.readouterr().err == "error: --raw samples without the chat template: drop --system\n"
    broken = copy.deepcopy(tok)  # (a template there is, which fails: --raw is no fix for it)
    broken.chat_template = "{{ raise_exception('no system turns here') }}"
    monkeypatch.setattr(cli, "load", lambda *a, **kw: (SimpleNamespace(config=config), broken))
    with pytest.raises(SystemExit):
        cli.main(["--prompt", "hi", "--device", "cpu"])
    err = capsys.readouterr().err
    assert "cannot apply the tokenizer's chat template" in err and "--raw" not in err, err


def test_r3_generate_raw_keeps_the_tokenizers_bos_and_refuses_a_prompt_of_no_tokens(builtin, monkeypatch, capsys):
    """--raw encodes the prompt as the tokenizer encodes text (the BOS it adds included: a Llama
    base model continues text after its BOS, and drifts without it); a prompt of no tokens (an
    empty --prompt with a tokenizer that adds none) is one line, not a sampler error."""
    from types import SimpleNamespace

    import r3.generate as cli

    _, tok = builtin

    class WithBos:  # (a tokenizer that adds a BOS, as Llama's does; SmolLM2's adds none)
        chat_template, eos_token_id = None, tok.eos_token_id

        def __init__(self, bos):
            self.bos = bos

        def __len__(self):
            return len(tok)

        def __call__(self, text, add_special_tokens=True):
            return {"input_ids": (self.bos if add_special_tokens else []) + tok(text)["input_ids"]}

        def decode(self, ids, skip_special_tokens=False):
            return tok.decode(ids, skip_special_tokens=skip_special_tokens)

    config = SimpleNamespace(vocab_size=len(tok), eos_token_id=None, max_position_embeddings=8192)
    seen = []

    def fake_generate(model, prompts, **kw):
        seen.append(prompts[0])
        return SimpleNamespace(tokens=[[]], finished=[False], new_tokens=0, prefill_s=0.0, decode_s=1.0,
                               tokens_per_s=0.0)

    monkeypatch.setattr(cli, "generate", fake_generate)
    monkeypatch.setattr(cli, "load", lambda *a, **kw: (SimpleNamespace(config=config), WithBos([1])))
    assert cli.main(["--raw", "--prompt", "Once upon", "--device", "cpu"]) == 0
    assert seen == [[1] + tok("Once upon")["input_ids"]]
    monkeypatch.setattr(cli, "load", lambda *a, **kw: (SimpleNamespace(config=config), WithBos([])))
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        cli.main(["--raw", "--prompt", "", "--device", "cpu"])
    assert e.value.code == 2 and len(seen) == 1
    assert capsys.readouterr().err == "error: --prompt is empty: a raw prompt needs at least one token\n"


def test_r3_generate_counts_its_decode_steps_out_of_max_new_tokens(builtin, monkeypatch, capsys):
    """The line of a long decode says the steps done out of --max-new-tokens (the most it decodes),
    not out of the number of samples."""
    from types import SimpleNamespace

    import r3.generate as cli

    _, tok = builtin
    config = SimpleNamespace(vocab_size=len(tok), eos_token_id=None, max_position_embeddings=8192)
    clock = [100.0]
    monkeypatch.setattr(cli.time, "perf_counter", lambda: clock[0])

    def fake_generate(model, prompts, *, progress, **kw):
        clock[0] += 30.0  # (past the quiet start)
        progress(120)
        return SimpleNamespace(tokens=[[], []], finished=[False, False], new_tokens=0, prefill_s=0.0, decode_s=1.0,
                               tokens_per_s=0.0)

    monkeypatch.setattr(cli, "load", lambda *a, **kw: (SimpleNamespace(config=config), tok))
    monkeypatch.setattr(cli, "generate", fake_generate)
    assert cli.main(["--prompt", "hi", "--device", "cpu", "--max-new-tokens", "300", "--num-samples", "2"]) == 0
    assert "decoding: 120/300 steps" in capsys.readouterr().err


def test_cli_samples_the_tokenizers_ids_and_stops_at_the_end_of_turn(builtin, monkeypatch, capsys):
    """An embedding padded past the tokenizer: the CLI samples from the tokenizer's ids only, and
    it stops at the template's end-of-turn token."""
    from types import SimpleNamespace

    import r3.generate as cli

    _, tok = builtin
    eos = tok.convert_tokens_to_ids("<|im_end|>")
    config = SimpleNamespace(vocab_size=len(tok) + 64, eos_token_id=eos, max_position_embeddings=8192)
    seen = []

    def fake_generate(model, prompts, *, max_new_tokens, vocab_size=None, stop_token_ids=(), **kw):
        seen.append((vocab_size, eos in stop_token_ids))
        return SimpleNamespace(tokens=[[eos]], finished=[True], new_tokens=1, prefill_s=0.0, decode_s=1.0,
                               tokens_per_s=1.0)

    monkeypatch.setattr(cli, "load", lambda *a, **kw: (SimpleNamespace(config=config), tok))
    monkeypatch.setattr(cli, "generate", fake_generate)
    assert cli.main(["--prompt", "hi", "--max-new-tokens", "4", "--device", "cpu"]) == 0
    assert seen == [(len(tok), True)]


def test_top_k_draws_over_tied_logits_in_token_id_order():
    """With top-k the candidates are laid out as a stable full sort would (logit descending, ties
    by token id), so the inverse-CDF draw picks the token that order gives, whatever order
    ``topk`` returned the ties in."""
    g = torch.Generator().manual_seed(1)
    V = 49152
    x = (torch.randn(V, generator=g) * 3).bfloat16().float()  # many tied logits
    for k in (2000, 3000):
        vals, ids = torch.sort(x, descending=True, stable=True)
        cdf = vals[:k].softmax(-1).cumsum(-1)
        u = torch.rand(200, 1, generator=g)
        want = ids[torch.searchsorted(cdf, u[:, 0] * cdf[-1], right=True).clamp_max(k - 1)]
        got, _ = pick_tokens(x.expand(200, V), temperature=1.0, top_k=k, u=u)
        assert (got == want).float().mean() > 0.99, k


def test_greedy_ignores_top_k_and_top_p(tiny):
    """``temperature=0`` is greedy whatever ``top_k`` / ``top_p`` say: the same tokens and the
    raw log-softmax log-probs."""
    model, _ = tiny["llama"]
    prompts = _rand_prompts(256, [4, 9, 6], seed=14)
    plain = generate(model, prompts, max_new_tokens=8, temperature=0)
    for kw in (dict(top_k=5), dict(top_p=0.5), dict(top_k=20, top_p=0.3)):
        out = generate(model, prompts, max_new_tokens=8, temperature=0, **kw)
        assert out.tokens == plain.tokens, kw
        assert torch.allclose(out.logprob_tensor, plain.logprob_tensor, atol=1e-6), kw


def test_packed_weights_see_an_update_of_the_biases_alone(tiny_dirs):
    """New bias tensors alone (q/k/v biases: Qwen2; the weights unchanged) are seen too: the packed
    step then gives the plain step's logits. (An in-place update of a bias is seen anyway: the
    packed table holds the bias itself.)"""
    model, _ = load(tiny_dirs["qwen2"][0], tokenizer=False)
    if not PackedWeights.available(model):
        pytest.skip(PACKED_SKIP)
    rows = _rand_prompts(256, [7, 4], seed=14)
    with torch.inference_mode():
        step = DecodeStep(model, "eager")
        caches, last, pos = _prefilled(model, rows, 7)
        with step.active():
            step(last, pos, caches[0], 7, 256)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("qkv_proj.bias"):
                p.data = p.data + 2.0
    with torch.inference_mode():
        caches, last, pos = _prefilled(model, rows, 7)
        ref = step_logits(model, last, pos, caches[0], 7, 256)
        step = DecodeStep(model, "eager")
        with step.active():
            got = step(last, pos, caches[1], 7, 256)
    assert (got - ref).abs().max().item() <= 1e-5 * ref.abs().max().item()


def test_packed_weights_are_one_table_per_model_repacked_only_when_a_weight_changes(tiny_dirs):
    """PackedWeights.get gives the model's one table (the same slots every time: a compiled step
    keeps slot numbers as constants) and repacks only when a weight changed: an unchanged model
    is not repacked on each get (a decode step per generate call would copy every weight again);
    after an in-place update the new copies go into the same slots."""
    from r3 import packed_linear

    model, _ = load(tiny_dirs["qwen2"][0], dtype=torch.float32, tokenizer=False)
    if not PackedWeights.available(model):
        pytest.skip(PACKED_SKIP)
    first = PackedWeights.get(model)
    slots = list(first.slots)
    packed = [packed_linear._SLOTS[s][0] for s in slots]
    again = PackedWeights.get(model)
    assert again is first and again.slots == slots
    assert all(packed_linear._SLOTS[s][0] is w for s, w in zip(slots, packed))  # not repacked
    with torch.no_grad():
        model.layers[0].mlp.down_proj.weight.mul_(2.0)
    assert PackedWeights.get(model) is first and first.slots == slots
    assert any(packed_linear._SLOTS[s][0] is not w for s, w in zip(slots, packed))


def test_packed_weights_do_not_apply_to_float16_models(tiny_dirs):
    """Only fp32 and (where oneDNN runs it) bf16 are packed: an fp16 CPU model keeps the plain
    matmuls (oneDNN's fp16 path on a CPU without native fp16 is emulated or missing)."""
    model, _ = load(tiny_dirs["llama"][0], dtype=torch.float16, tokenizer=False)
    assert model.dtype == torch.float16 and not PackedWeights.available(model)


def test_decode_step_and_graph_run_arguments_are_checked(tiny):
    """The eager step has no fused pick (a clear error, not a pick silently ignored); a graph run
    length must divide KV_BUCKET (a run must read one KV bucket)."""
    model, _ = tiny["llama"]
    step = DecodeStep(model, "eager")
    cache = model.new_cache(2, 8)
    with pytest.raises(ValueError, match="pick is fused only into the compiled step"):
        step(torch.tensor([1, 2]), torch.tensor([0, 0]), cache, 1, 256, pick=pick_greedy, u=None,
             temperature=torch.tensor(0.0))
    with pytest.raises(ValueError, match="decode must be one of eager, compiled, got 'fast'"):
        DecodeStep(model, "fast")
    for bad in (0, 1, 3, 48, 128):
        with pytest.raises(ValueError, match=rf"run_steps must be > 1 and divide KV_BUCKET \(64\), got {bad}"):
            decode_mod.GraphRuns(cache, bad)
    assert decode_mod.GraphRuns(cache, 16).run_steps == 16


def test_static_cache_holds_its_rows_and_remakes_graph_runs_for_another_run_length(tiny, monkeypatch):
    """A static cache holds the views of its first rows with every slot (where the step then
    decodes in place), not another cache nor a view of fewer slots; its graph runs are made
    again when GRAPH_RUN_STEPS changed (a run length set for a benchmark, or by a test), and
    kept while it did not."""
    model, _ = tiny["llama"]
    sc = StaticKVCache()
    sc.reserve(model.config, 3, 10, torch.float32, "cpu")
    assert sc.holds(sc.rows(2)) and not sc.holds(model.new_cache(4, sc.full.max_len))
    assert not sc.holds(decode_mod.KVCache([t[:, :, :64] for t in sc.full.k], [t[:, :, :64] for t in sc.full.v]))
    runs = sc.graph_runs()
    assert runs.run_steps == decode_mod.GRAPH_RUN_STEPS and sc.graph_runs() is runs
    monkeypatch.setattr(decode_mod, "GRAPH_RUN_STEPS", 4)
    assert sc.graph_runs().run_steps == 4 and sc.graph_runs() is not runs


def test_graph_runs_freeze_stopped_rows(tiny_dirs, monkeypatch):
    """Inside a graph run a row that sampled a stop id repeats that token at its frozen position
    with log-prob 0 for the rest of the run (the run's state, which the sampler's outputs hide)."""
    as_on_a_gpu(monkeypatch)
    model, _ = load(tiny_dirs["qwen2"][0], tokenizer=False)
    prompts = _rand_prompts(256, [9, 6, 4], seed=15)  # the longest at position 8: one run of 8 steps
    kw = dict(temperature=1.0, seed=3)  # (sampled: a tiny model's greedy pick often repeats its input)
    first = [row[0] for row in generate(model, prompts, max_new_tokens=1, **kw).tokens]
    stops = sorted(set(first) - {p[-1] for p in prompts})
    assert stops, first
    out = generate(model, prompts, max_new_tokens=8, stop_token_ids=stops, decode="compiled", **kw)
    runs = static_cache(model).runs
    assert runs is not None and runs.n == 3
    ring_tok, ring_lp = runs.ring_tok[:8, :3], runs.ring_lp[:8, :3]
    for r, p in enumerate(prompts):
        stopped = first[r] in stops
        assert out.finished[r] == stopped and ring_tok[0, r].item() == first[r]
        if stopped:  # (the sampler hides the rest of the run: PAD, log-prob 0)
            assert (ring_tok[:, r] == first[r]).all() and not ring_lp[1:, r].any() and ring_lp[0, r] < 0
            assert runs.pos[r].item() == len(p) and runs.done[r].item()
        else:
            assert (ring_lp[:, r] < 0).all() and runs.pos[r].item() == len(p) - 1 + 8


def test_which_decode_steps_use_cuda_graphs_and_session_slots(monkeypatch):
    """CUDA graphs: only the compiled step, by default on CUDA devices (forced on or off by the
    argument or CUDA_GRAPHS). A compiled session on its own cache (no CUDA graphs) gets a bucket
    of margin; an eager one, or one decoding in the static cache, exactly what it asked for."""
    uses = decode_mod.uses_cuda_graphs
    assert uses("compiled", "cuda") and uses("compiled", "cuda:1") and not uses("compiled", "cpu")
    assert not uses("eager", "cuda") and not uses("eager", "cpu", True) and not uses("compiled", "cuda", False)
    assert uses("compiled", "cpu", True)
    assert decode_mod.session_slots("eager", "cpu", 78) == 78
    assert decode_mod.session_slots("compiled", "cpu", 78) == 192 and decode_mod.session_slots("compiled", "cuda", 78) == 78
    monkeypatch.setattr(decode_mod, "CUDA_GRAPHS", True)
    assert uses("compiled", "cpu") and not uses("eager", "cpu") and decode_mod.session_slots("compiled", "cpu", 78) == 78
    monkeypatch.setattr(decode_mod, "CUDA_GRAPHS", False)
    assert not uses("compiled", "cuda") and decode_mod.session_slots("compiled", "cuda", 78) == 192


def test_packed_weights_apply_where_onednn_runs_the_dtype(tiny, monkeypatch):
    """The packed backend applies to a CPU model in fp32 wherever oneDNN has the packed matmul,
    in bf16 only where oneDNN runs bf16 natively, never on another device (where the copies would
    cost memory for nothing). (Elsewhere the packed tests above skip: this one does not.)"""
    from r3 import packed_linear
    from r3.precision import bf16_is_native

    onednn = (packed_linear._MKLDNN_LINEAR is not None and torch.backends.mkldnn.is_available()
              and hasattr(torch.ops.mkldnn, "_reorder_linear_weight"))
    model, _ = tiny["llama"]
    assert model.dtype == torch.float32 and PackedWeights.available(model) == onednn
    bf16 = Transformer(model.config).to(torch.bfloat16)
    assert PackedWeights.available(bf16) == (onednn and bf16_is_native("cpu"))
    monkeypatch.setattr(packed_linear, "bf16_is_native", lambda device: False)  # (a CPU that emulates bf16)
    assert not PackedWeights.available(bf16) and PackedWeights.available(model) == onednn
    with torch.device("meta"):
        elsewhere = Transformer(model.config)
    assert elsewhere.device.type == "meta" and not PackedWeights.available(elsewhere)


def test_graph_runs_one_step_at_the_first_slot_of_a_bucket(tiny_dirs, monkeypatch):
    """A one-step graph at position 64 (a call that ends before a whole run fits there) reads the
    next KV bucket, where its own slot is: its token and log-prob are the eager sampler's."""
    as_on_a_gpu(monkeypatch)
    spy = _Runs(monkeypatch)
    model, _ = load(tiny_dirs["llama"][0], tokenizer=False)
    prompts = _rand_prompts(256, [61, 50], seed=16)  # steps at positions 60..64: one step each
    for kw in (dict(temperature=0.0), dict(temperature=1.0, seed=2)):
        eager = generate(model, prompts, max_new_tokens=5, **kw)
        comp = generate(model, prompts, max_new_tokens=5, decode="compiled", **kw)
        assert comp.tokens == eager.tokens, kw
        assert torch.allclose(comp.logprob_tensor, eager.logprob_tensor, atol=1e-5), kw
    assert (2, 64, 1) in spy.runs


def test_compiled_decode_across_a_kv_bucket_equals_eager(tiny_dirs):
    """The compiled step on the session's cache (no CUDA graphs) reads a longer KV length once a
    call crosses into the next bucket (positions 59..68 here): the eager sampler's samples."""
    model, _ = load(tiny_dirs["qwen2"][0], tokenizer=False)
    prompts = _rand_prompts(256, [60, 31], seed=17)
    for kw in (dict(temperature=0.0), dict(temperature=1.0, top_p=0.9, seed=2)):  # (the pick fused, and not)
        eager = generate(model, prompts, max_new_tokens=10, **kw)
        comp = generate(model, prompts, max_new_tokens=10, decode="compiled", **kw)
        assert comp.tokens == eager.tokens, kw
        assert torch.allclose(comp.logprob_tensor, eager.logprob_tensor, atol=1e-5), kw


# --------------------------------------------------------------------------------------------
# streams end to end, compaction thresholds, stop-string windows, appends, KV buckets, timings,
# argument checks, the CLI's flags
# --------------------------------------------------------------------------------------------


def test_sampled_tokens_follow_the_documented_random_streams(tiny):
    """The streams as the module docstring states them, end to end: each ``sample`` call draws
    one key per row from the session's generator (``row_keys(B, generator)``, nothing more), and
    row ``b``'s token at step ``t`` is the inverse-CDF draw with ``row_uniforms(key_b, t)`` from
    the distribution its history gives (a teacher-forced forward), its log-prob that draw's."""
    model, _ = tiny["llama"]
    prompts = _rand_prompts(256, [5, 2, 8], seed=40)
    for seed, kw in ((0, dict(temperature=1.0)), (1, dict(temperature=0.7, top_k=30))):
        s = Session.start(model, prompts, seed=seed)
        ref = torch.Generator().manual_seed(seed)
        for n in (5, 4):  # two calls: the second draws the next keys
            hist = [list(r) for r in s.tokens]
            out = s.sample(n, **kw)
            keys = row_keys(len(prompts), ref, "cpu")
            assert torch.equal(s.generator.get_state(), ref.get_state())
            for b, (h, toks) in enumerate(zip(hist, out.tokens)):
                with torch.no_grad():
                    logits = model(torch.tensor([h + toks]))[0, len(h) - 1: -1].float()
                for t, tok in enumerate(toks):
                    want, lp = pick_tokens(logits[t][None], u=row_uniforms(keys[b:b + 1], t), **kw)
                    assert int(want) == tok, (kw, n, b, t)
                    assert abs(float(lp) - out.logprobs[b][t]) < 1e-4


def _stop_ids_for_ends(rows, ends):
    """Stop ids under which row ``i`` of ``rows`` (unstopped token lists) stops at its
    ``ends[i]``-th token (None: never), or None when its tokens make that impossible."""
    stops = {rows[i][e - 1] for i, e in enumerate(ends) if e}
    got = [next((j + 1 for j, t in enumerate(r) if t in stops), None) for r in rows]
    return sorted(stops) if got == list(ends) else None


def test_compaction_thresholds(tiny, monkeypatch):
    """The decode batch is compacted once at least a quarter of it has stopped (exactly a quarter
    included), never to fewer than 2 rows, and ``sample(compact=)`` overrides the session's
    setting either way."""
    import itertools

    model, _ = tiny["llama"]
    prompts = _rand_prompts(256, [4, 6], seed=41)
    free = Session.start(model, prompts, seed=2).fork(4).sample(12, temperature=1.0).tokens
    sizes = _BatchSizes(monkeypatch)

    def run(ends, session_compact=True, **kw):
        stops = next(s for s in (_stop_ids_for_ends(free, e) for e in ends) if s is not None)
        sizes.sizes.clear()
        s = Session.start(model, prompts, seed=2, compact=session_compact).fork(4)
        out = s.sample(12, temperature=1.0, stop_token_ids=stops, **kw)
        for got, f in zip(out.tokens, free):  # (the samples are the same either way)
            assert got == f[:len(got)]
        return list(sizes.sizes)

    def pattern(rows, steps):  # ends: the rows ``rows`` stop at the given steps, in any order
        for perm in itertools.permutations(steps):
            ends = [None] * 8
            for r, e in zip(rows, perm):
                ends[r] = e
            yield ends

    quarter = [e for a in range(2, 6) for e in pattern([1, 6], [a, a + 1])]  # 2 of 8 stopped: a quarter
    assert min(run(quarter)) == 6
    assert set(run(quarter, compact=False)) == {8}  # the call's setting wins, either way
    assert min(run(quarter, session_compact=False, compact=True)) == 6
    assert set(run([e for a in range(2, 9) for e in pattern([3], [a])])) == {8}  # 1 of 8: no
    # all rows but one stop, one after another: the batch shrinks to 2 rows, never to 1
    got = run(pattern([0, 1, 2, 3, 4, 5, 7], range(2, 9)))
    assert min(got) == 2 and got[-1] == 2, got


def test_timings_are_carried_and_throughput_counts_them(tiny):
    """``prefill_s`` is the time spent feeding tokens: a session made by ``select``/``fork``
    carries its parent's, ``append`` adds to it, and ``generate`` reports it; ``tokens_per_s``
    divides the completion tokens by prefill + decode time, ``decode_tokens_per_s`` by the
    decode time alone (inf for no time)."""
    import dataclasses

    from r3.sampler import Samples

    model, _ = tiny["llama"]
    s = Session.start(model, [[1, 2, 3], [4, 5]])
    assert s.prefill_s > 0
    f = s.fork(2)
    assert f.prefill_s == s.prefill_s and f.select([3, 0]).prefill_s == s.prefill_s
    f.append([[7, 8]] * 4)
    assert f.prefill_s > s.prefill_s
    out = generate(model, [[1, 2, 3], [4, 5]], max_new_tokens=3, num_samples=2, temperature=0)
    assert out.prefill_s > 0 and out.decode_s > 0
    samples = Samples(tokens=[[1, 2], [3]], logprobs=[[-1.0, -1.0], [-1.0]], finished=[True, False], lengths=[2, 1],
                      token_tensor=torch.tensor([[1, 2], [3, -1]]), logprob_tensor=torch.zeros(2, 2), steps=2,
                      prefill_s=1.0, decode_s=2.0)
    assert samples.new_tokens == 3 and samples.tokens_per_s == 1.0 and samples.decode_tokens_per_s == 1.5
    idle = dataclasses.replace(samples, prefill_s=0.0, decode_s=0.0)
    assert idle.tokens_per_s == idle.decode_tokens_per_s == float("inf")


def test_bad_argument_values_and_types_are_clear_errors(tiny):
    """Arguments of the wrong type or NaN are refused with a SamplingError that names them
    (not a TypeError from deep inside, nor a silent NaN draw); a bad prompt, row or fork count is
    named by its index and value."""
    model, _ = tiny["llama"]
    nan = float("nan")
    for kw, name in ((dict(max_new_tokens=2.5), "max_new_tokens"), (dict(top_k=2.5), "top_k"),
                     (dict(temperature=nan), "temperature"), (dict(top_p=nan), "top_p"),
                     (dict(num_samples=2.0), "num_samples"), (dict(vocab_size=0), "vocab_size")):
        with pytest.raises(SamplingError, match=name):
            generate(model, [[1, 2]], **{"max_new_tokens": 2, **kw})
    with pytest.raises(SamplingError, match=r"^prompt 1 is empty$"):
        generate(model, [[1], []], max_new_tokens=2)
    with pytest.raises(SamplingError, match=r"^prompt 1 has token id -1 outside \[0, 256\)$"):
        generate(model, [[1], [3, -1]], max_new_tokens=2)
    with pytest.raises(SamplingError, match=r"^prompt 0 has token id 300 outside \[0, 256\)$"):
        generate(model, [[300, 2]], max_new_tokens=2)
    s = Session.start(model, [[1, 2], [3]])
    for bad in ([[4], [-1]], [[4], [256]]):
        with pytest.raises(SamplingError, match=r"row 1 has a token id outside \[0, 256\)"):
            Session.start(model, [[1, 2], [3]]).append(bad)
    with pytest.raises(SamplingError, match="row -1 out of range"):
        s.select([-1])
    with pytest.raises(SamplingError, match=r"fork\(\) needs n >= 1, got 0"):
        s.fork(0)
    for kw in (dict(max_new_tokens=0), dict(max_new_tokens=2, top_p=1.5), dict(max_new_tokens=2, temperature=nan)):
        with pytest.raises(SamplingError):
            s.sample(**kw)
    assert s.lengths == [2, 1]  # (nothing was fed or sampled)


def _spaced(ids):
    """A stand-in SentencePiece-like tokenizer: token i is a space when i % 8 == 0, else the
    letter chr(65 + i % 26); decoding drops the text's leading space (as SentencePiece drops the
    '▁' that starts the first token it decodes)."""
    return "".join(" " if i % 8 == 0 else chr(65 + i % 26) for i in ids).removeprefix(" ")


def test_stop_strings_window_holds_a_token_before_the_text(tiny):
    """The window holds one token more than the stop string has bytes, so a decoder whose text
    for a token depends on the token before it (SentencePiece's leading space) still shows a
    stop string that begins with a space -- at every check, wherever the string ends in it."""
    stop = StopStrings([" A", " C"], _spaced)
    assert stop.window == 3
    assert stop.completed([1, 8, 2]) and not stop.completed([8, 2])  # "B C"; a completion starting " C" reads "C"
    model, _ = tiny["llama"]
    prompts = _rand_prompts(256, [5, 9, 2, 12], seed=33)
    strings = [" A", " B", " C", " D", " E"]
    free = Session.start(model, prompts, seed=8).fork(4).sample(40, temperature=1.0)
    want = [_cut_at_string(t, strings, _spaced) for t in free.tokens]
    assert sum(w is not None and len(w) > 3 for w in want) >= 3, want
    for sync_every in (1, 3):
        got = Session.start(model, prompts, seed=8).fork(4).sample(
            40, temperature=1.0, stop_strings=StopStrings(strings, _spaced), sync_every=sync_every)
        assert got.tokens == [f if w is None else w for f, w in zip(free.tokens, want)], sync_every
        assert got.finished == [w is not None for w in want]


def test_sample_refuses_positions_past_longrope_before_decoding(tiny, monkeypatch):
    """A request whose last position would pass the model's LongRoPE limit (the tiny phi3's
    original_max_position_embeddings, 64) is refused up front -- no decode step runs, the rows
    are unchanged -- which the compiled step, which does not check, relies on; exactly reaching
    the limit samples."""
    model, _ = tiny["phi3"]
    sizes = _BatchSizes(monkeypatch)
    s = Session.start(model, [[1] * 60, [2] * 30])
    with pytest.raises(R3Error, match="original_max_position_embeddings = 64"):
        s.sample(6, temperature=0)  # the 6th token would sit at position 65
    assert sizes.sizes == [] and s.lengths == [60, 30]
    assert s.sample(5, temperature=0).lengths == [5, 5]


def test_stops_are_noticed_every_sync_every_steps(tiny):
    """The loop notices stopped rows at every ``sync_every``-th step: once every row has stopped
    it ends there (``steps``), the tokens the same whatever ``sync_every`` is."""
    model, _ = tiny["llama"]
    prompts = _rand_prompts(256, [4, 9, 6], seed=10)
    free = generate(model, prompts, max_new_tokens=12, seed=5).tokens
    stops = sorted({free[0][1], free[1][0], free[2][1]})
    last = max(next(i + 1 for i, t in enumerate(r) if t in stops) for r in free)
    assert last <= 2
    for sync_every, steps in ((1, last), (4, 4), (5, 5), (20, 12)):
        s = Session.start(model, prompts, seed=5)
        out = s.sample(12, stop_token_ids=stops, sync_every=sync_every)
        assert out.steps == steps and all(out.finished), sync_every
        assert out.tokens == [f[: f.index(next(t for t in f if t in stops)) + 1] for f in free]


def test_a_refused_append_leaves_every_row_unchanged(tiny):
    """``append`` checks every row's tokens before it changes any row: after a SamplingError for
    a bad id in row 1, row 0 has not taken its turn either (its history would otherwise hold
    tokens that were never fed to the cache, and the session would go on sampling from a
    history other than the one it reports)."""
    model, _ = tiny["qwen2"]
    s = Session.start(model, [[1, 2, 3, 9, 10, 11], [4, 5]], seed=0)
    with pytest.raises(SamplingError, match="row 1"):
        s.append([[6, 7, 30, 31], [-1]])
    assert s.tokens == [[1, 2, 3, 9, 10, 11], [4, 5]]
    hist = [list(r) for r in s.tokens]
    got = s.sample(4, temperature=0)
    fresh = Session.start(model, hist).sample(4, temperature=0)
    assert got.tokens == fresh.tokens
    assert torch.allclose(got.logprob_tensor, fresh.logprob_tensor, atol=1e-5)


def test_append_with_empty_turns_in_small_prefill_groups_continues_exactly(tiny):
    """``append`` where some rows' turns are empty (those rows stay as they are, their pending
    token still pending), fed in prefill groups of a few tokens (``prefill_tokens``): a row
    longer than a group gets a group of its own, a group whose rows all have empty turns feeds
    nothing, and one whose first rows are empty feeds the rest at their own positions and cache
    rows. The session then continues exactly as a fresh prefill of the whole history would."""
    model, _ = tiny["qwen2"]
    prompts = _rand_prompts(256, [3, 7, 5, 2, 6], seed=42)
    for prefill_tokens in (4, 16384):
        s = Session.start(model, prompts, seed=1, prefill_tokens=prefill_tokens)
        s.sample(3, temperature=1.0)
        s.append([[]] * 5)  # nothing at all
        s.append([[], [9, 10], [], [], [11]])  # (2 tokens: groups of rows 0-1, 2-3, 4 at 4 tokens)
        s.append([[], [], [], [12, 13, 14, 15, 16, 17], []])  # (6 tokens: a group per row)
        hist = [list(r) for r in s.tokens]
        assert [len(h) for h in hist] == [len(p) + 3 + n for p, n in zip(prompts, [0, 2, 0, 6, 1])]
        got = s.sample(5, temperature=0)
        fresh = Session.start(model, hist).sample(5, temperature=0)
        assert got.tokens == fresh.tokens, prefill_tokens
        assert torch.allclose(got.logprob_tensor, fresh.logprob_tensor, atol=1e-5), prefill_tokens


def test_cli_passes_its_flags_on_and_prints_each_sample(builtin, monkeypatch, capsys):
    """The CLI builds the chat prompt from ``--system`` and ``--prompt``, hands every sampling flag
    to ``generate`` (defaults: temperature 1, no top-k / top-p, one sample, no seed), stops at a
    checkpoint's list of eos ids too, caps ``vocab_size`` at the embedding's rows when the
    tokenizer has more, and prints each sample under a header that says which were cut off.
    Mistakes are refused before the model loads."""
    from types import SimpleNamespace

    import r3.generate as cli

    _, tok = builtin
    eos = tok.convert_tokens_to_ids("<|im_end|>")
    config = SimpleNamespace(vocab_size=len(tok) - 5, eos_token_id=[7, None], max_position_embeddings=8192)
    seen, loads = [], []
    paris, lyon = tok("Paris")["input_ids"], tok("Lyon is")["input_ids"]

    def fake_generate(model, prompts, **kw):
        seen.append((prompts, kw))
        return SimpleNamespace(tokens=[paris + [eos], lyon], finished=[True, False], new_tokens=3, prefill_s=0.0,
                               decode_s=1.0, tokens_per_s=1.0)

    monkeypatch.setattr(cli, "load", lambda *a, **kw: loads.append(a) or (SimpleNamespace(config=config), tok))
    monkeypatch.setattr(cli, "generate", fake_generate)
    assert cli.main(["--prompt", "Where?", "--system", "Answer in French.", "--max-new-tokens", "4",
                     "--temperature", "0.5", "--top-k", "7", "--top-p", "0.8", "--num-samples", "2", "--seed", "11",
                     "--device", "cpu"]) == 0
    (prompts, kw), = seen
    text = tok.decode(prompts[0])
    assert "Answer in French." in text and "Where?" in text
    flags = ("max_new_tokens", "temperature", "top_k", "top_p", "num_samples", "seed", "vocab_size", "decode")
    assert {k: kw[k] for k in flags} == dict(max_new_tokens=4, temperature=0.5, top_k=7, top_p=0.8, num_samples=2,
                                             seed=11, vocab_size=len(tok) - 5, decode="eager")
    assert {7, eos} <= set(kw["stop_token_ids"])
    assert capsys.readouterr().out.splitlines() == [
        f"--- sample 1/2 ({len(paris) + 1} tokens) ---", "Paris",
        f"--- sample 2/2 ({len(lyon)} tokens, truncated) ---", "Lyon is"]
    seen.clear()
    assert cli.main(["--prompt", "Where?", "--device", "cpu"]) == 0
    (_, kw), = seen
    assert {k: kw[k] for k in flags[1:6]} == dict(temperature=1.0, top_k=0, top_p=1.0, num_samples=1, seed=None)
    loads.clear()
    for flag, value in (("--num-samples", "0"), ("--max-new-tokens", "0")):
        with pytest.raises(SystemExit) as e:
            cli.main(["--prompt", "Where?", "--device", "cpu", flag, value])
        assert e.value.code == 2 and f"error: {flag} must be >= 1, got 0" in capsys.readouterr().err
    assert loads == []


@pytest.mark.parametrize("sync_every", [1, 4])
def test_progress_is_told_the_steps_at_each_check_and_changes_no_sample(tiny, sync_every):
    """``progress`` hears the steps done at each check (every ``sync_every`` steps and the last),
    up to the step the loop stopped at, with stops and without; the samples are the same."""
    model, _ = tiny["llama"]
    prompts = _rand_prompts(256, [4, 6, 5], seed=7)
    plain = Session.start(model, prompts, seed=3).sample(10, temperature=1.0)
    heard = []
    told = Session.start(model, prompts, seed=3).sample(10, temperature=1.0, sync_every=sync_every,
                                                        progress=heard.append)
    assert told.tokens == plain.tokens
    assert heard == ([1, 2, 3, 4, 5, 6, 7, 8, 9, 10] if sync_every == 1 else [4, 8, 10])
    stop = [t for row in plain.tokens for t in row[2:3]]  # (each row stops at its third token at the latest)
    heard.clear()
    out = generate(model, prompts, max_new_tokens=10, temperature=1.0, seed=3, stop_token_ids=stop,
                   progress=heard.append)
    assert heard == list(range(1, out.steps + 1)) and out.steps <= 3


def test_r3_generate_says_how_far_a_long_decode_is(monkeypatch):
    """r3.generate printed nothing while it decoded (a --max-new-tokens 100000 run sat 34 s
    silent): after its first seconds, a line of the steps done, at most one a second on a
    terminal and one every ten seconds in a log."""
    import io

    import r3.generate as cli

    clock = [100.0]
    monkeypatch.setattr(cli.time, "perf_counter", lambda: clock[0])
    log = io.StringIO()
    bar = cli.DecodeProgress(500, stream=log)
    for t, steps in ((1.0, 10), (2.5, 30), (5.0, 60), (12.0, 140), (13.0, 150), (22.6, 250)):
        clock[0] = 100.0 + t
        bar(steps)
    bar.close()
    lines = log.getvalue().splitlines()
    assert [line.split(" |")[0] for line in lines] == ["decoding: 140/500 steps", "decoding: 250/500 steps"], lines


def test_r3_generate_raw_samples_a_model_without_a_chat_template(builtin, monkeypatch, capsys):
    """A base model without a chat template was refused ("the tokenizer has no chat template"),
    although the README showed r3.generate as sampling from any model. ``--raw`` encodes the prompt
    as plain text (the tokenizer's BOS included), stops at the eos ids and prints the continuation
    as sampled; without it the refusal names --raw. --system or template options with --raw are
    refused."""
    import copy
    from types import SimpleNamespace

    import r3.generate as cli

    _, tok = builtin
    bare = copy.deepcopy(tok)
    bare.chat_template = None
    config = SimpleNamespace(vocab_size=len(tok), eos_token_id=[7], max_position_embeddings=8192)
    seen = []
    cont = tok(" Paris.")["input_ids"]

    def fake_generate(model, prompts, **kw):
        seen.append((prompts, kw))
        return SimpleNamespace(tokens=[cont + [tok.eos_token_id]], finished=[True], new_tokens=3, prefill_s=0.0,
                               decode_s=1.0, tokens_per_s=1.0)

    monkeypatch.setattr(cli, "load", lambda *a, **kw: (SimpleNamespace(config=config), bare))
    monkeypatch.setattr(cli, "generate", fake_generate)
    assert cli.main(["--raw", "--prompt", "The capital of France is", "--device", "cpu"]) == 0
    (prompts, kw), = seen
    assert prompts == [tok("The capital of France is")["input_ids"]]
    assert kw["stop_token_ids"] == sorted({7, tok.eos_token_id})
    assert capsys.readouterr().out == " Paris.\n"
    with pytest.raises(SystemExit) as e:
        cli.main(["--prompt", "The capital of France is", "--device", "cpu"])
    assert e.value.code == 2
    assert capsys.readouterr().err.rstrip().endswith("the tokenizer has no chat template (r3 needs one to build "
                                                     "conversations); --raw samples without one")
    for extra, flag in ((["--system", "Be brief."], "--system"),
                        (["--chat-template-option", "enable_thinking=true"], "--chat-template-option")):
        with pytest.raises(SystemExit):
            cli.main(["--raw", "--prompt", "x", "--device", "cpu", *extra])
        assert capsys.readouterr().err == f"error: --raw samples without the chat template: drop {flag}\n"


def test_stop_string_completed_right_after_a_compaction(tiny):
    """A compaction re-indexes the rows' stop-string state with the batch: a row kept in the
    compacted batch whose tokens complete a stop string at the very next step is cut there, not
    a step later (which rows the next check searches follows the rows, not their old places)."""
    model, _ = tiny["llama"]
    prompts = _rand_prompts(256, [4, 6], seed=41)
    free = Session.start(model, prompts, seed=2).fork(4).sample(12, temperature=1.0).tokens
    case = None
    for a in range(8):  # rows a < b stop on ids at step 2 (a quarter: the batch is compacted)...
        for b in range(a + 1, 8):
            stops = _stop_ids_for_ends(free, [2 if i in (a, b) else None for i in range(8)])
            kept = [i for i in range(8) if i not in (a, b)]
            for r in kept[:2]:  # ...and row r, whose new place was a stopped row's, ends on a string at step 3
                text = _letters(free[r][:3])
                if stops is not None and kept.index(r) in (a, b) and text[1:] not in text[:2]:
                    case = case or (stops, r, text[1:])
    assert case is not None
    stops, r, string = case
    got = Session.start(model, prompts, seed=2).fork(4).sample(
        12, temperature=1.0, stop_token_ids=stops, stop_strings=StopStrings([string], _letters))
    assert got.tokens[r] == free[r][:3] and got.finished[r]
    for g, f in zip(got.tokens, free):
        by_id = next((f[:j + 1] for j, t in enumerate(f) if t in stops), None)
        ends = [x for x in (_cut_at_string(f, [string]), by_id) if x is not None]
        assert g == (min(ends, key=len) if ends else f)


def test_decode_across_a_kv_bucket_equals_teacher_forcing(builtin, chat):
    """A decode step reads the KV slots up to and including its own position: the length it
    asks for is rounded up to a KV bucket (64 slots), so one slot too few would show only at a
    bucket's first slot (position 64 here), where a step would miss its own key. On a real model
    (a tiny random one attends almost uniformly) the log-probs across it are a teacher-forced
    forward's."""
    model, tok = builtin
    prompt = (chat[1] * 3)[:60]  # decode positions 59..68
    out = generate(model, [prompt, chat[0]], max_new_tokens=10, temperature=0, vocab_size=len(tok))
    for p, t, lp in zip([prompt, chat[0]], out.tokens, out.logprobs):
        assert max(abs(a - b) for a, b in zip(lp, _teacher_forced(model, p, t))) < 1e-4


def test_stop_strings_window_counts_every_byte_of_a_multibyte_text():
    """The window is the stop string's UTF-8 bytes (plus one), not its characters: "\u00e9\u00e9" (two
    characters, four bytes) as four byte tokens is found; a window of characters (three tokens)
    would start inside the first character and read "\ufffd\u00e9"."""
    by_bytes = StopStrings(["\u00e9\u00e9"], lambda ids: bytes(ids).decode("utf-8", "replace"))
    assert by_bytes.window == 5
    assert by_bytes.completed([0xC3, 0xA9, 0xC3, 0xA9]) and by_bytes.completed([0x41, 0xC3, 0xA9, 0xC3, 0xA9])
    assert not by_bytes.completed([0xA9, 0xC3, 0xA9])


def test_stop_string_completed_inside_a_token_with_text_after_it():
    """A token whose text completes a stop string and goes on past it ends the row: the string
    need only be in the window's text, not end it (token 255 reads "YZ": it completes "Y" and
    "XY" after an X)."""
    stop = StopStrings(["Y", "XY"], _letters)
    assert stop.completed([0, 255]) and stop.completed([23, 255]) and not stop.completed([0, 25])


def _with_blanks(ids):
    """A stand-in tokenizer decoding without special tokens: token i is the letter
    chr(65 + i % 26), and no text at all when i % 4 == 0 (a special token the decoder skips)."""
    return "".join("" if i % 4 == 0 else chr(65 + i % 26) for i in ids)


def test_stop_strings_window_does_not_count_tokens_without_text(tiny):
    """Tokens that decode to no text (special tokens, skipped as episodes and evaluations decode)
    do not count toward the window: a two-letter stop string whose letters have two such tokens
    between them is found (a window of 3 tokens read only the second letter, and the row ran on
    past it, to a later occurrence or to the limit)."""
    stop = StopStrings(["AB"], _with_blanks)
    assert stop.completed([26, 4, 8, 1]) and stop.completed([5, 26, 4, 8, 12, 1]) and not stop.completed([26, 4, 8, 3])
    assert stop.completed([4, 8, 1], lambda: [26, 4, 8, 1])  # (the sampler passes a block, and the whole row)
    model, _ = tiny["llama"]
    prompts = _rand_prompts(256, [5, 9, 2, 12], seed=33)
    free = Session.start(model, prompts, seed=8).fork(4).sample(40, temperature=1.0).tokens
    strings = ["OR", "OJ", "TQ"]  # (each in a row of this free run with two blank tokens inside it)
    want = [_cut_at_string(t, strings, _with_blanks) for t in free]
    spread = [w for w in want if w and len(w) >= 4 and all(t % 4 == 0 for t in w[-3:-1])]
    assert len(spread) >= 2, want
    for sync_every in (1, 3):
        got = Session.start(model, prompts, seed=8).fork(4).sample(
            40, temperature=1.0, stop_strings=StopStrings(strings, _with_blanks), sync_every=sync_every)
        assert got.tokens == [f if w is None else w for f, w in zip(free, want)], sync_every
        assert got.finished == [w is not None for w in want]


def test_start_and_generate_presize_the_cache_so_sampling_never_grows_it(tiny, monkeypatch):
    """``Session.start(max_len=)`` allocates that many slots now, and ``generate`` sizes its
    session for the longest prompt plus ``max_new_tokens``: sampling then never grows the cache
    (a copy of every row's cache, prefix and forks included)."""
    from r3.model import KVCache

    model, _ = tiny["llama"]
    grown = []
    grow = KVCache.grow
    monkeypatch.setattr(KVCache, "grow", lambda self, n: grown.append((self.max_len, n)) or grow(self, n))
    prompts = _rand_prompts(256, [3, 7, 5], seed=4)
    s = Session.start(model, prompts, max_len=7 + 6, seed=0)
    assert s.cache.max_len >= 13
    s.sample(6, temperature=1.0)
    out = generate(model, prompts, max_new_tokens=9, num_samples=2, seed=0)
    assert out.steps == 9 and grown == []
    Session.start(model, prompts, seed=0).sample(2, temperature=0)  # (not presized: it grows)
    assert len(grown) == 1


def test_no_compaction_at_the_check_after_the_last_step(tiny, monkeypatch):
    """The decode batch is compacted only while steps remain: at the check after the last step
    (a quarter of the rows stopped, the rest at the limit) no live row's cache is copied out, to
    be written straight back. With a check at every step the same rows are compacted (the spy
    sees compactions)."""
    import r3.sampler as sampler_mod

    model, _ = tiny["llama"]
    prompts = _rand_prompts(256, [4, 6], seed=41)
    free = Session.start(model, prompts, seed=2).fork(4).sample(8, temperature=1.0).tokens
    stops, ends = _stop_set_with_ragged_finish(free, 8)
    assert sum(e is not None for e in ends) >= 2 and sum(e is None for e in ends) >= 2, ends
    copies = []
    view = sampler_mod._slots_view
    monkeypatch.setattr(sampler_mod, "_slots_view", lambda cache, n: copies.append(n) or view(cache, n))
    got = Session.start(model, prompts, seed=2).fork(4).sample(8, temperature=1.0, stop_token_ids=stops, sync_every=8)
    assert copies == [] and got.steps == 8
    assert got.tokens == [f if e is None else f[:e] for f, e in zip(free, ends)]
    Session.start(model, prompts, seed=2).fork(4).sample(8, temperature=1.0, stop_token_ids=stops, sync_every=1)
    assert copies


def test_generate_counts_the_forks_copy_as_prefill_time(tiny, monkeypatch):
    """``generate``'s ``prefill_s`` is the prompts' prefill plus the fork that copies each prompt's
    cache ``num_samples`` times (a clock that ticks once per reading: one interval each)."""
    import itertools
    from types import SimpleNamespace

    import r3.sampler as sampler_mod

    model, _ = tiny["llama"]
    ticks = itertools.count()
    monkeypatch.setattr(sampler_mod, "time", SimpleNamespace(perf_counter=lambda: float(next(ticks))))
    prompts = [[1, 2, 3], [4, 5]]
    assert generate(model, prompts, max_new_tokens=2, num_samples=1, temperature=0).prefill_s == 1.0
    assert generate(model, prompts, max_new_tokens=2, num_samples=3, temperature=0).prefill_s == 2.0


def test_prefill_groups_hold_as_many_rows_as_fit(tiny, monkeypatch):
    """Rows are prefilled in groups of as many rows as fit in ``prefill_tokens`` padded tokens:
    six 4-token feeds at 8 tokens per group are three forwards of two rows, six 2-token feeds
    (an appended turn of 2: the pending token and the turn's first) are one of four and one of two."""
    model, _ = tiny["llama"]
    calls = []
    forward = model.hidden_states
    monkeypatch.setattr(model, "hidden_states", lambda toks, **kw: calls.append(tuple(toks.shape)) or forward(toks, **kw))
    s = Session.start(model, _rand_prompts(256, [5] * 6, seed=3), prefill_tokens=8)
    assert calls == [(2, 4)] * 3
    calls.clear()
    s.append([[1, 2]] * 6)
    assert calls == [(4, 2), (2, 2)]


def test_sampling_argument_boundaries():
    """Each sampling argument's edge: ``top_k`` -1 is refused and 0 (off) taken, ``top_p`` 0 is
    refused and 1 (off) taken, ``temperature`` 0 (greedy) taken, ``max_new_tokens`` 1 taken and 0
    refused."""
    from r3.sampler import check_sampling_args

    check_sampling_args(1, 0.0, 0, 1.0)
    for bad in (dict(top_k=-1), dict(top_p=0.0), dict(max_new_tokens=0), dict(temperature=-1e-9)):
        kw = {**dict(max_new_tokens=1, temperature=0.0, top_k=0, top_p=1.0), **bad}
        with pytest.raises(SamplingError, match=next(iter(bad))):
            check_sampling_args(**kw)


def test_static_cache_rows_grow_by_a_quarter_and_are_all_served(tiny):
    """Rows grow by at least a quarter too where the padding does not hide it: from 40 rows, 41
    make 56 (a quarter more, 50, padded), not 48 (41 padded); slots grow by a quarter with them.
    ``rows(n)`` serves every row the cache holds, all of them included (a decode batch of exactly
    the padded size, as 8 or 16 rows, runs in the whole cache)."""
    model, _ = tiny["llama"]
    sc = StaticKVCache()
    sc.reserve(model.config, 40, 10, torch.float32, "cpu")
    assert (sc.full.batch_size, sc.full.max_len) == (40, 128)
    assert sc.rows(40).k[0].shape[0] == 40 and sc.holds(sc.rows(40))
    sc.reserve(model.config, 41, 10, torch.float32, "cpu")
    assert (sc.full.batch_size, sc.full.max_len) == (56, 192)
    sc.reserve(model.config, 8, 10, torch.float32, "cpu")  # (fits: kept)
    assert sc.rows(56).k[0].shape[0] == 56


def test_a_compacted_batch_copies_only_the_slots_the_call_reaches(tiny, monkeypatch):
    """A compaction copies each live row's cache up to the slots this call can reach (the
    longest row's start plus ``max_new_tokens``), not every slot of a session presized for a whole
    conversation (an episode's: attempts, reflections and retries): a rollout's copy stays the
    size of what it decodes."""
    import r3.sampler as sampler_mod

    model, _ = tiny["llama"]
    prompts = _rand_prompts(256, [4, 6], seed=41)
    free = Session.start(model, prompts, seed=2).fork(4).sample(8, temperature=1.0).tokens
    stops, _ = _stop_set_with_ragged_finish(free, 8)
    copies = []
    view = sampler_mod._slots_view
    monkeypatch.setattr(sampler_mod, "_slots_view", lambda cache, n: copies.append(n) or view(cache, n))
    s = Session.start(model, prompts, seed=2, max_len=200).fork(4)
    assert s.cache.max_len == 200
    s.sample(8, temperature=1.0, stop_token_ids=stops)
    assert copies and set(copies) == {5 + 8}  # (the longest row's start, 5, plus 8 steps)


def test_graph_runs_notice_stops_at_the_run_that_reaches_each_multiple(tiny_dirs, monkeypatch):
    """In graph runs (runs of 8 steps start at positions that are multiples of 8) the host checks
    for stops at the end of the run that reaches each multiple of ``sync_every``, not only where
    a run ends exactly on one: with the longest row's first step at position 5, runs end at steps
    3, 11, 19, ..., and a batch whose rows have all stopped by step 11 ends there, not at
    ``max_new_tokens``."""
    as_on_a_gpu(monkeypatch)
    model, _ = load(tiny_dirs["qwen3"][0], tokenizer=False)
    prompts = _rand_prompts(256, [6, 4], seed=3)
    free = Session.start(model, prompts).sample(40, temperature=0).tokens
    stops = sorted({free[0][1], free[1][1]})
    ends = [next(i + 1 for i, t in enumerate(f) if t in stops) for f in free]
    assert max(ends) <= 11, ends
    out = Session.start(model, prompts, max_len=6 + 40 + 8, decode="compiled").sample(
        40, temperature=0, stop_token_ids=stops, sync_every=8)
    assert out.tokens == [f[:e] for f, e in zip(free, ends)] and out.steps == 11


def test_generate_forks_only_for_several_samples(tiny, monkeypatch):
    """``generate`` with one sample per prompt decodes in the prefilled session itself: no fork,
    which would copy every prompt's cache for nothing; with several, one fork."""
    model, _ = tiny["llama"]
    forks = []
    fork = Session.fork
    monkeypatch.setattr(Session, "fork", lambda self, n: forks.append(n) or fork(self, n))
    prompts = [[1, 2, 3], [4, 5]]
    one = generate(model, prompts, max_new_tokens=3, seed=1)
    assert forks == [] and len(one.tokens) == 2
    generate(model, prompts, max_new_tokens=3, num_samples=2, seed=1)
    assert forks == [2]


def test_cli_prints_a_single_sample_without_a_header(builtin, monkeypatch, capsys):
    """With one sample (the default) the CLI prints the completion alone: the '--- sample i/n ---'
    headers are for several samples."""
    from types import SimpleNamespace

    import r3.generate as cli

    _, tok = builtin
    config = SimpleNamespace(vocab_size=len(tok), eos_token_id=None, max_position_embeddings=8192)
    paris = tok("Paris")["input_ids"]
    monkeypatch.setattr(cli, "load", lambda *a, **kw: (SimpleNamespace(config=config), tok))
    monkeypatch.setattr(cli, "generate", lambda model, prompts, **kw: SimpleNamespace(
        tokens=[paris], finished=[False], new_tokens=len(paris), prefill_s=0.0, decode_s=1.0, tokens_per_s=1.0))
    assert cli.main(["--prompt", "Where?", "--device", "cpu"]) == 0
    assert capsys.readouterr().out.splitlines() == ["Paris"]
