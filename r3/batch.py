"""From an episode's sequences to what the update consumes: padded micro-batches whose mask marks
the reflection tokens, the targets' log-probs (logits only at those positions), and the reference
(and pre-update) log-probs that the loss compares with.

The G rows of a group share one long prefix (prompt + failed attempt + reflection prompt) and
differ only in their reflection. With ``shared_prefix`` the forward pass encodes each distinct
prefix of a micro-batch once: one packed row holds the prefix followed by the reflections of every
row that shares it, each reflection attending to the prefix and to its own past only (positions
restart after the prefix for each reflection). Logits, loss and gradients are those of the
per-row layout, which the micro-batch keeps for the loss."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from r3.kernels import fused_logprob_kl
from r3.model import SegmentRuns


@dataclass
class Packed:
    """The forward layout of a micro-batch with each shared prefix stored once."""

    tokens: torch.Tensor  # [P, L]
    positions: torch.Tensor  # [P, L] rotary positions: 0.. over the prefix, then per reflection from len(prefix)
    segments: torch.Tensor  # [P, L] 0 = prefix, k >= 1 = the k-th reflection, -1 = padding
    rows: torch.Tensor  # [N] packed row of each target's predicting position
    cols: torch.Tensor  # [N] packed column of it
    segments_host: torch.Tensor  # ``segments`` on the host, where they were made
    _runs: SegmentRuns | None = field(default=None, repr=False)

    def runs(self) -> SegmentRuns:
        """The layout as Gated DeltaNet layers run it (Qwen 3.5), made once from the host copy:
        no forward waits for the device to read ``segments`` back."""
        if self._runs is None:
            self._runs = SegmentRuns.of(self.segments_host, device=self.segments.device)
        return self._runs


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
    packed: Packed | None = None  # the shared-prefix forward layout (None: per row)


def make_micro_batches(sequences, spans, advantages, size: int, pad_id: int, device,
                       rollout_logprobs: list[list[float]] | None = None,
                       shared_prefix: bool = False) -> list[MicroBatch]:
    """Sequences -> padded micro-batches whose mask marks each reflection span. The targets are
    flattened row by row, so ``rollout_logprobs`` (one list per sequence, one value per reflection
    token, as :class:`r3.episode.Episode` holds them) line up with them. ``shared_prefix`` adds
    the packed forward layout (rows whose tokens before their span are equal share one prefix)."""

    out = []
    for i, j in _chunks(sequences, spans, size, shared_prefix):
        seqs, sp = sequences[i:j], spans[i:j]
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
                advantages=torch.as_tensor(advantages[i:j], dtype=torch.float32).to(device),
                rows=rows.to(device),
                cols=(cols - 1).to(device),
                targets=tokens[rows, cols].to(device),
                rollout_logp=None if rollout_logprobs is None else torch.tensor(
                    [x for row in rollout_logprobs[i:j] for x in row], dtype=torch.float32).to(device),
                packed=pack_shared_prefixes(seqs, sp, pad_id, device) if shared_prefix else None,
            )
        )
    return out


def _chunks(sequences, spans, size: int, shared_prefix: bool) -> list[tuple[int, int]]:
    """Row ranges of the micro-batches: ``size`` rows each; with ``shared_prefix``, whole runs of
    rows that share a prefix, as many as fit in the tokens that ``size`` padded rows of the per-row
    layout would take (``size`` x the longest row; each prefix counted once); a run that alone
    exceeds that is split by rows (its prefix then counted in each part)."""
    n = len(sequences)
    if not shared_prefix:
        return [(i, min(i + size, n)) for i in range(0, n, size)]
    budget = size * max((end for _, end in spans), default=1)
    runs, i = [], 0  # [start, end) of consecutive rows with equal prefixes
    while i < n:
        j, key = i + 1, sequences[i][: spans[i][0]]
        while j < n and spans[j][0] == spans[i][0] and sequences[j][: spans[j][0]] == key:
            j += 1
        runs.append((i, j))
        i = j

    def cost(a: int, b: int) -> int:
        return spans[a][0] + sum(end - start for start, end in spans[a:b])

    out: list[tuple[int, int]] = []
    lo, used = None, 0
    for a, b in runs:
        c = cost(a, b)
        if lo is not None and used + c <= budget:
            used += c
            continue
        if lo is not None:
            out.append((lo, a))
        if c <= budget:
            lo, used = a, c
            continue
        lo = None  # a run over the budget on its own: by rows
        start = a
        while start < b:
            stop, used_rows = start + 1, cost(start, start + 1)
            while stop < b and used_rows + spans[stop][1] - spans[stop][0] <= budget:
                used_rows += spans[stop][1] - spans[stop][0]
                stop += 1
            out.append((start, stop))
            start = stop
    if lo is not None:
        out.append((lo, n))
    return out


def pack_shared_prefixes(seqs, spans, pad_id: int, device) -> Packed:
    """Group the rows by their tokens before the span (in order of first appearance); each group
    becomes one packed row ``prefix + span_1 + span_2 + ...``. The targets' predicting positions
    are listed row by row, span position by span position, as ``mask.nonzero()`` lists them in the
    per-row layout: the first target of a span is predicted by the prefix's last token, the others
    by the span's own previous token."""
    packs: dict[tuple, list[int]] = {}
    for b, (s, (start, _)) in enumerate(zip(seqs, spans)):
        if start < 1:
            raise ValueError(f"row {b}: a span must start after at least one context token, got {start}")
        packs.setdefault(tuple(s[:start]), []).append(b)
    where: dict[int, tuple[int, int]] = {}  # row -> (packed row, column of its span's first token)
    layouts = []
    for p, (prefix, members) in enumerate(packs.items()):
        toks, pos, seg = list(prefix), list(range(len(prefix))), [0] * len(prefix)
        for k, b in enumerate(members, start=1):
            start, end = spans[b]
            where[b] = (p, len(toks))
            toks += seqs[b][start:end]
            pos += range(start, end)
            seg += [k] * (end - start)
        layouts.append((toks, pos, seg))
    L = max(len(t) for t, _, _ in layouts)
    tokens = torch.full((len(layouts), L), pad_id, dtype=torch.long)
    positions = torch.zeros((len(layouts), L), dtype=torch.long)
    segments = torch.full((len(layouts), L), -1, dtype=torch.long)
    for p, (t, pos, seg) in enumerate(layouts):
        tokens[p, : len(t)], positions[p, : len(t)], segments[p, : len(t)] = (
            torch.tensor(t), torch.tensor(pos), torch.tensor(seg))
    rows, cols = [], []
    for b, (start, end) in enumerate(spans):
        p, first = where[b]
        rows += [p] * (end - start)
        if end > start:  # (an empty span has no target, so no predicting position)
            cols += [start - 1] + list(range(first, first + end - start - 1))
    return Packed(tokens.to(device), positions.to(device), segments.to(device),
                  torch.tensor(rows, dtype=torch.long).to(device), torch.tensor(cols, dtype=torch.long).to(device),
                  segments)


def dummy_micro_batch(device) -> MicroBatch:
    """Keeps a rank with no data in lock-step with FSDP's collectives (zero loss)."""
    z = torch.zeros(1, dtype=torch.long, device=device)
    return MicroBatch(torch.zeros((1, 2), dtype=torch.long, device=device), torch.zeros((1, 2), dtype=torch.bool, device=device),
                      torch.zeros(1, device=device), z, z, z)


def token_logprobs(model, mb: MicroBatch, temperature: float, ref_logp: torch.Tensor | None = None):
    """``[N]`` log-probs of the micro-batch's targets (logits only at the masked positions) and,
    given ``ref_logp``, their k3 KL to it from the same fused pass (else None)."""
    if mb.packed is not None:
        p = mb.packed
        runs = p.runs() if model.config.linear_layers else None
        logits = model(p.tokens, positions=p.positions, segments=p.segments, at=(p.rows, p.cols), runs=runs)
    else:
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
    if reference is not None and hasattr(reference, "reshard"):
        # FSDP2 keeps the root module's parameters (embeddings, LM head) gathered after a forward,
        # to be resharded after the backward, which never comes for the frozen reference
        reference.reshard()


def kept_rows(adv: torch.Tensor, skip_no_signal: bool) -> list[int]:
    """The episode rows the update trains (``adv``: ``[n_groups, G]``): every row, or with
    ``skip_no_signal`` those of the groups whose advantages are not all zero."""
    G = adv.shape[1]
    keep = [g for g in range(adv.shape[0]) if not (skip_no_signal and (adv[g] == 0).all())]
    return [g * G + j for g in keep for j in range(G)]


def episode_micro_batches(ep, adv: torch.Tensor, size: int, pad_id: int, device, *,
                          skip_no_signal: bool = True, shared_prefix: bool = False) -> list[MicroBatch]:
    """The episode's rows as micro-batches, each with its advantage and the sampler's log-probs
    of its reflection tokens. ``adv``: ``[n_groups, G]``; with ``skip_no_signal`` the groups whose
    advantages are all zero (all-equal rewards: no policy gradient) are left out."""
    idx = kept_rows(adv, skip_no_signal)
    flat = adv.reshape(-1)
    return make_micro_batches([ep.sequences[i] for i in idx], [ep.spans[i] for i in idx],
                              [float(flat[i]) for i in idx], size, pad_id, device,
                              rollout_logprobs=[ep.reflection_logprobs[i] for i in idx],
                              shared_prefix=shared_prefix)

