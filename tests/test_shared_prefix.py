"""The shared-prefix forward (each group's prefix encoded once, its reflections attending to it)
gives the per-row path's log-probs, KL, loss and every parameter gradient: fp32 to 1e-5 relative
on tiny models of each supported family; on the built-in model as closely as the per-row path
agrees with itself under another micro-batching; bf16 within a stated bound; for every
aggregation, whatever the micro-batching, with groups of different prefix and span lengths."""

from __future__ import annotations

import pytest
import torch

from r3 import batch as B
from r3 import grpo
from r3.checkpoint import load

MAX_LEN = 10


def groups(vocab: int, seed: int = 0):
    """3 groups (prefix lengths 12, 5 and 17; the mistral config's window is 8) of 4 rows whose
    spans have lengths 1..10, each row followed by a few retry tokens that must not matter."""
    g = torch.Generator().manual_seed(seed)
    seqs, spans, adv = [], [], []
    for plen, lens in ((12, (6, 10, 1, 3)), (5, (4, 4, 9, 2)), (17, (7, 5, 8, 6))):
        prefix = torch.randint(0, vocab, (plen,), generator=g).tolist()
        for n in lens:
            tail = torch.randint(0, vocab, (n + 3,), generator=g).tolist()
            seqs.append(prefix + tail)
            spans.append((plen, plen + n))
        adv += torch.randn(len(lens), generator=g).tolist()
    return seqs, spans, adv


def loss_and_grads(model, mbs, agg: str, beta: float):
    model.zero_grad(set_to_none=True)
    den = sum(grpo.loss_denominator(mb.mask, agg, max_len=MAX_LEN) for mb in mbs)
    total, logps = 0.0, []
    for mb in mbs:
        logp, kl = B.token_logprobs(model, mb, 0.7, mb.ref_logp)
        logps.append(logp.detach())
        lp = B.scatter(logp, mb)
        loss, _ = grpo.policy_loss(lp, lp.detach(), None, mb.advantages, mb.mask, beta=beta, agg=agg,
                                   denominator=den, max_len=MAX_LEN, kl=B.scatter(kl, mb) if kl is not None else None)
        loss.backward()
        total += float(loss.detach())
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    return total, torch.cat(logps), grads


def compare(model, reference, seqs, spans, adv, agg, *, micro_packed: int, rtol: float, atol: float):
    per_row = B.make_micro_batches(seqs, spans, adv, len(seqs), 0, "cpu")
    packed = B.make_micro_batches(seqs, spans, adv, micro_packed, 0, "cpu", shared_prefix=True)
    assert all(mb.packed is not None for mb in packed)
    if reference is not None:
        B.score_micro_batches(per_row, reference, None, 0.7)
        B.score_micro_batches(packed, reference, None, 0.7)
        ref_a, ref_b = torch.cat([m.ref_logp for m in per_row]), torch.cat([m.ref_logp for m in packed])
        torch.testing.assert_close(ref_b, ref_a, rtol=rtol, atol=atol)
    la, lpa, ga = loss_and_grads(model, per_row, agg, beta=0.05)
    lb, lpb, gb = loss_and_grads(model, packed, agg, beta=0.05)
    torch.testing.assert_close(lpb, lpa, rtol=rtol, atol=atol)
    assert lb == pytest.approx(la, rel=rtol, abs=atol)
    assert ga.keys() == gb.keys() and len(ga) == len(list(model.parameters()))
    for k in ga:  # each gradient tensor: the largest difference relative to its largest entry
        err = float((gb[k] - ga[k]).abs().max() / ga[k].abs().max().clamp_min(1e-12))
        assert err <= rtol, (k, err)


@pytest.mark.parametrize("kind", ["llama", "qwen2", "mistral", "qwen3", "phi3", "gemma3", "smollm3", "olmo2", "olmo3", "granite",
                                  "ministral3", "gemma2", "gemma4"])
@pytest.mark.parametrize("agg", grpo.AGGREGATIONS)
def test_shared_prefix_equals_per_row_fp32(tiny_dirs, kind, agg):
    path, _ = tiny_dirs[kind]
    model, _ = load(path, tokenizer=False)
    reference, _ = load(path, tokenizer=False)
    with torch.no_grad():  # a reference that differs, so the KL term has a gradient
        for p in reference.parameters():
            p.add_(0.02 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    seqs, spans, adv = groups(model.config.vocab_size)
    # (Gemma 4's tiny model is five layers deep, the others two: its first layer's gradients differ
    # by up to 1.2e-5 of their largest entry; with fp64 weights every family's differ by about 1e-7)
    rtol = 3e-5 if kind == "gemma4" else 1e-5
    for micro in (12, 5, 1):  # whole groups, groups split over micro-batches, one row each
        compare(model, reference, seqs, spans, adv, agg, micro_packed=micro, rtol=rtol, atol=1e-6)
    one = B.make_micro_batches(seqs, spans, adv, 12, 0, "cpu", shared_prefix=True)[0].packed
    assert one.tokens.shape == (3, 17 + 7 + 5 + 8 + 6)  # a row per group: its prefix once, then its spans


def test_shared_prefix_bf16_within_bound(tiny_dirs):
    path, _ = tiny_dirs["qwen2"]
    model, _ = load(path, dtype=torch.bfloat16, tokenizer=False)
    seqs, spans, adv = groups(model.config.vocab_size, seed=1)
    per_row = B.make_micro_batches(seqs, spans, adv, 12, 0, "cpu")
    packed = B.make_micro_batches(seqs, spans, adv, 12, 0, "cpu", shared_prefix=True)
    with torch.no_grad():
        a = torch.cat([B.token_logprobs(model, mb, 1.0)[0] for mb in per_row])
        b = torch.cat([B.token_logprobs(model, mb, 1.0)[0] for mb in packed])
    # bf16 rounds the attention and matmul outputs differently in the two layouts
    assert (a - b).abs().max() < 0.1 and (a - b).abs().mean() < 0.02


def test_shared_prefix_equals_per_row_on_the_builtin_model():
    """fp32, 30 layers: the per-row layout itself moves by up to ~5e-5 of a gradient tensor's
    largest entry when only its micro-batching (padding, summation order) changes; the shared
    prefix must stay within twice that (at least 5e-5: with one thread that noise is 5e-6 while
    the shared layout's own summation order moves it 1.5e-5) and within 1e-4 (the tiny models
    above stay under 1e-6; a wrong mask or position moves it by O(1))."""
    model, _ = load("smollm2-135m", tokenizer=False)
    for p in model.parameters():
        p.requires_grad_(True)
    seqs, spans, adv = groups(model.config.vocab_size, seed=2)

    def grads(size, shared):
        return loss_and_grads(model, B.make_micro_batches(seqs, spans, adv, size, 0, "cpu", shared_prefix=shared),
                              "token-mean", 0.05)[2]

    def worst(a, b):
        return max(float((b[k] - a[k]).abs().max() / a[k].abs().max()) for k in a)

    base = grads(12, False)
    noise = worst(base, grads(3, False))
    for size in (12, 5):
        err = worst(base, grads(size, True))
        assert err <= max(2 * noise, 5e-5) and err <= 1e-4, (err, noise)


def test_rows_with_different_prefixes_are_packed_apart_and_spans_must_follow_context():
    seqs = [[1, 2, 3, 4], [1, 2, 9, 9], [1, 2, 3, 5]]
    p = B.pack_shared_prefixes(seqs, [(3, 4), (3, 4), (3, 4)], 0, "cpu")
    assert p.tokens.tolist() == [[1, 2, 3, 4, 5], [1, 2, 9, 9, 0]]
    assert p.segments.tolist() == [[0, 0, 0, 1, 2], [0, 0, 0, 1, -1]]
    assert p.positions.tolist() == [[0, 1, 2, 3, 3], [0, 1, 2, 3, 0]]
    assert p.rows.tolist() == [0, 1, 0] and p.cols.tolist() == [2, 2, 2]
    with pytest.raises(ValueError, match="must start after at least one context token"):
        B.pack_shared_prefixes([[1, 2]], [(0, 2)], 0, "cpu")


def test_micro_batch_boundaries_follow_the_token_budget_exactly():
    """_chunks by hand: the budget is size x the longest row; a run of rows sharing a prefix costs
    the prefix once plus its spans; a run over the budget is split by rows, each part paying its
    prefix; a part may fill the budget exactly."""
    a, b = [7, 7, 7], [8, 8]
    seqs = [a + [1, 2, 3], a + [4, 5], a + [6]]
    spans = [(3, 6), (3, 5), (3, 4)]
    # size 3: budget 3 x 6 = 18 holds the whole run (3 + 3 + 2 + 1 = 9)
    assert B._chunks(seqs, spans, 3, shared_prefix=True) == [(0, 3)]
    assert B._chunks(seqs, spans, 3, shared_prefix=False) == [(0, 3)]
    # size 1: budget 6; split by rows: 3 + 3 = 6 fits exactly, then 3 + 2 + 1 = 6 fits exactly
    assert B._chunks(seqs, spans, 1, shared_prefix=True) == [(0, 1), (1, 3)]
    assert B._chunks(seqs, spans, 1, shared_prefix=False) == [(0, 1), (1, 2), (2, 3)]
    # two runs: A (cost 3 + 3 + 2 = 8) over the budget of 6 by itself, then B (2 + 2 = 4) alone
    seqs2, spans2 = [a + [1, 2, 3], a + [4, 5], b + [9, 9]], [(3, 6), (3, 5), (2, 4)]
    assert B._chunks(seqs2, spans2, 1, shared_prefix=True) == [(0, 1), (1, 2), (2, 3)]
    # size 2: budget 12 takes both runs (8 + 4 = 12, exactly)
    assert B._chunks(seqs2, spans2, 2, shared_prefix=True) == [(0, 3)]
    # equal prefix lengths but other tokens: two runs (3 + 3 and 3 + 2: 11 > 6)
    seqs3, spans3 = [a + [1, 2, 3], [5, 5, 5] + [4, 5]], [(3, 6), (3, 5)]
    assert B._chunks(seqs3, spans3, 1, shared_prefix=True) == [(0, 1), (1, 2)]
    # runs add up: four one-row runs of cost 2 + 2 = 4 (prefixes all different), budget 2 x 4 = 8
    # holds two of them, 3 x 4 = 12 three
    seqs4, spans4 = [[k, k, 5, 6] for k in (1, 2, 3, 4)], [(2, 4)] * 4
    assert B._chunks(seqs4, spans4, 2, shared_prefix=True) == [(0, 2), (2, 4)]
    assert B._chunks(seqs4, spans4, 3, shared_prefix=True) == [(0, 3), (3, 4)]


def test_segment_masks_let_each_reflection_see_the_prefix_and_its_own_past_only():
    """The packed layout's attention mask entry by entry: a prefix token sees the earlier prefix;
    a reflection token sees the prefix and its own reflection's earlier tokens, never another
    reflection of its group, a later token or padding; a sliding window keeps the keys of the last
    ``window`` positions (by position, not column); and no query row is empty (padding sees
    padding), so no softmax row is all -inf."""
    from conftest import tiny_hf_config

    from r3.model import ModelConfig, Transformer

    seqs = [[1, 2, 3, 4, 5, 6, 0], [1, 2, 3, 7, 0], [1, 2, 3, 8, 9], [5, 5, 5, 5, 5, 1, 0]]
    spans = [(3, 6), (3, 4), (3, 5), (5, 6)]
    p = B.pack_shared_prefixes(seqs, spans, 0, "cpu")
    assert p.tokens.tolist() == [[1, 2, 3, 4, 5, 6, 7, 8, 9], [5, 5, 5, 5, 5, 1, 0, 0, 0]]
    # packed row 0: prefix 0-2, reflection 1 at columns 3-5, reflection 2 at 6, reflection 3 at 7-8
    visible = [
        {0: {0}, 1: {0, 1}, 2: {0, 1, 2}, 3: {0, 1, 2, 3}, 4: {0, 1, 2, 3, 4}, 5: {0, 1, 2, 3, 4, 5},
         6: {0, 1, 2, 6}, 7: {0, 1, 2, 7}, 8: {0, 1, 2, 7, 8}},
        {**{i: set(range(i + 1)) for i in range(6)}, 6: {6, 7, 8}, 7: {6, 7, 8}, 8: {6, 7, 8}},  # padding: itself
    ]
    for window in (None, 3):
        model = Transformer(ModelConfig.from_hf(tiny_hf_config("mistral", sliding_window=window or 8).to_dict()))
        masks = model._segment_masks(p.positions, p.segments, torch.float32)
        assert len(masks) == 1
        allowed = next(iter(masks.values()))[:, 0] == 0  # [P, L, L]
        for r, rows in enumerate(visible):
            pos = p.positions[r].tolist()
            for q, keys in rows.items():
                real = p.segments[r, q] >= 0
                want = {k for k in keys if window is None or not real or pos[k] > pos[q] - window}
                got = set(allowed[r, q].nonzero().flatten().tolist())
                assert got == want, (window, r, q, got, want)
                assert got  # never an empty row


def test_a_row_with_an_empty_reflection_span_packs_like_the_per_row_layout():
    """A row whose reflection span is empty (nothing to train) lists no target in the per-row
    layout; the packed layout lists none either, so that its (rows, cols) line up one to one
    with the per-row targets (a stray predicting column for the empty row made 5 columns for 4
    targets, and token_logprobs failed on the shared-prefix path only)."""
    seqs = [[1, 2, 3, 4, 5], [1, 2, 3, 6], [1, 2, 3, 7, 8]]
    spans = [(3, 5), (3, 3), (3, 5)]
    mb = B.make_micro_batches(seqs, spans, [1.0, 0.0, -1.0], 3, 0, "cpu", shared_prefix=True)[0]
    assert mb.rows.tolist() == [0, 0, 2, 2] and mb.targets.tolist() == [4, 5, 7, 8]
    p = mb.packed
    assert p.tokens.tolist() == [[1, 2, 3, 4, 5, 7, 8]]
    # row 0's targets 4, 5 are predicted at columns 2 (the prefix's last token) and 3; row 2's
    # targets 7, 8 at column 2 again and 5
    assert p.rows.tolist() == [0, 0, 0, 0] and p.cols.tolist() == [2, 3, 2, 5]
