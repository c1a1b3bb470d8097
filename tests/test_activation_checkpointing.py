"""Activation checkpointing (``TrainConfig.activation_checkpointing``): the update's gradients are
those without it, and autograd keeps far fewer tensors for the backward pass. The same on 2 ranks
with FSDP2 is in ``test_train.py`` (the 1-vs-2-rank update test)."""

from __future__ import annotations

import pytest
import torch

from r3 import batch as B
from r3.checkpoint import load

KINDS = ("llama", "mistral", "qwen3", "gemma3", "smollm3", "olmo2", "olmo3", "granite", "ministral3", "gemma2",
         "gemma4")


def _saved_bytes_and_grads(model, mbs, recompute: bool):
    model.activation_checkpointing = recompute
    model.zero_grad(set_to_none=True)
    saved = [0]

    def pack(t):
        saved[0] += t.numel() * t.element_size()
        return t

    total = 0.0
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        for mb in mbs:
            logp, _ = B.token_logprobs(model, mb, 1.0)
            loss = (logp * torch.linspace(-1, 1, logp.numel())).sum()
            loss.backward()
            total += float(loss)
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.activation_checkpointing = False
    return saved[0], total, grads


@pytest.mark.parametrize("shared", [False, True], ids=["per-row", "shared-prefix"])
@pytest.mark.parametrize("kind", KINDS)
def test_same_gradients_fewer_saved_tensors(tiny_dirs, kind, shared):
    model, _ = load(tiny_dirs[kind][0], tokenizer=False)
    model.train()
    g = torch.Generator().manual_seed(1)
    seqs = [torch.randint(0, 256, (n,), generator=g).tolist() for n in (30, 41, 26, 38)]
    for b in (1, 2, 3):
        seqs[b][:12] = seqs[0][:12]
    spans = [(12, 25), (12, 40), (12, 20), (12, 33)]
    mbs = B.make_micro_batches(seqs, spans, [1.0, -0.5, 0.25, -1.0], 2, 0, "cpu", shared_prefix=shared)
    plain_bytes, plain_loss, plain = _saved_bytes_and_grads(model, mbs, False)
    ac_bytes, ac_loss, ac = _saved_bytes_and_grads(model, mbs, True)
    assert ac_loss == plain_loss
    for name, grad in plain.items():
        assert torch.equal(ac[name], grad), name  # the same ops on the same inputs, run again
    # Without recomputation every block saves its attention and MLP intermediates; with it only
    # what lies outside the blocks (embedding, final norm, LM head) is saved.
    assert ac_bytes < plain_bytes / 3, (ac_bytes, plain_bytes)
