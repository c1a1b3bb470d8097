"""From an episode's sequences to what the update consumes: padded micro-batches whose mask marks
the reflection tokens, the targets' log-probs (logits only at those positions), and the reference
(and pre-update) log-probs that the loss compares with."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kernels import fused_logprob_kl


@dataclass
class MicroBatch:
    tokens: torch.Tensor  # [b, T]
    mask: torch.Tensor  # [b, T] bool: positions whose token is a reflection token
    advantages: torch.Tensor  # [b]
    rows: torch.Tensor  # [N] masked positions (row index)
    cols: torch.Tensor  # [N] masked positions (column index of the *predicting* position)
    targets: torch.Tensor  # [N]
    ref_logp: torch.Tensor | None = None  # [N]
    old_logp: torch.Tensor | None = None  # [N]
    rollout_logp: torch.Tensor | None = None  # [N] the sampler's log-probs of the targets


def make_micro_batches(sequences, spans, advantages, size: int, pad_id: int, device,
                       rollout_logprobs: list[list[float]] | None = None) -> list[MicroBatch]:
    """Sequences -> padded micro-batches whose mask marks each reflection span. The targets are
    flattened row by row, so ``rollout_logprobs`` (one list per sequence, one value per reflection
    token, as :class:`r3.episode.Episode` holds them) line up with them."""

    out = []
    for i in range(0, len(sequences), size):
        seqs, sp = sequences[i : i + size], spans[i : i + size]
        # Only the prefix up to the reflection's end matters: the retry is never trained and,
        # by causality, cannot change the reflection tokens' log-probs.
        T = max(end for _, end in sp)
        tokens = torch.full((len(seqs), T), pad_id, dtype=torch.long)
        mask = torch.zeros((len(seqs), T), dtype=torch.bool)
        for b, (s, (start, end)) in enumerate(zip(seqs, sp)):
            tokens[b, :end] = torch.tensor(s[:end])
            mask[b, start:end] = True
        rows, cols = mask.nonzero(as_tuple=True)
        out.append(
            MicroBatch(
                tokens=tokens.to(device),
                mask=mask.to(device),
                advantages=torch.as_tensor(advantages[i : i + size], dtype=torch.float32).to(device),
                rows=rows.to(device),
                cols=(cols - 1).to(device),
                targets=tokens[rows, cols].to(device),
                rollout_logp=None if rollout_logprobs is None else torch.tensor(
                    [x for row in rollout_logprobs[i : i + size] for x in row], dtype=torch.float32).to(device),
            )
        )
    return out


def dummy_micro_batch(device) -> MicroBatch:
    """Keeps a rank with no data in lock-step with FSDP's collectives (zero loss)."""
    z = torch.zeros(1, dtype=torch.long, device=device)
    return MicroBatch(torch.zeros((1, 2), dtype=torch.long, device=device), torch.zeros((1, 2), dtype=torch.bool, device=device),
                      torch.zeros(1, device=device), z, z, z)


def token_logprobs(model, mb: MicroBatch, temperature: float, ref_logp: torch.Tensor | None = None):
    """``[N]`` log-probs of the micro-batch's targets (logits only at the masked positions) and,
    given ``ref_logp``, their k3 KL to it from the same fused pass (else None)."""
    logits = model(mb.tokens, at=(mb.rows, mb.cols))
    return fused_logprob_kl(logits, mb.targets, ref_logp, temperature=temperature)


def scatter(values: torch.Tensor, mb: MicroBatch) -> torch.Tensor:
    """[N] per-token values -> [b, T] at the masked positions (target positions)."""
    full = torch.zeros(mb.mask.shape, dtype=values.dtype, device=values.device)
    return full.index_put((mb.rows, mb.cols + 1), values)


@torch.no_grad()
def score_micro_batches(mbs: list[MicroBatch], reference, old_policy, temperature: float) -> None:
    """Reference log-probs (for the KL) and, with several update epochs, the pre-update policy's
    log-probs (the ratio's denominator). Every rank scores the same number of micro-batches."""
    for mb in mbs:
        if reference is not None:
            mb.ref_logp = token_logprobs(reference, mb, temperature)[0]
        if old_policy is not None:
            mb.old_logp = token_logprobs(old_policy, mb, temperature)[0]


def episode_micro_batches(ep, adv: torch.Tensor, size: int, pad_id: int, device, *,
                          skip_no_signal: bool = True) -> list[MicroBatch]:
    """The episode's rows as micro-batches, each with its advantage and the sampler's log-probs
    of its reflection tokens. ``adv``: ``[n_groups, G]``; with ``skip_no_signal`` the groups whose
    advantages are all zero (all-equal rewards: no policy gradient) are left out."""
    G = adv.shape[1]
    keep = [g for g in range(adv.shape[0]) if not (skip_no_signal and (adv[g] == 0).all())]
    idx = [g * G + j for g in keep for j in range(G)]
    flat = adv.reshape(-1)
    return make_micro_batches([ep.sequences[i] for i in idx], [ep.spans[i] for i in idx],
                              [float(flat[i]) for i in idx], size, pad_id, device,
                              rollout_logprobs=[ep.reflection_logprobs[i] for i in idx])

