"""GRPO loss math: group advantages, the clipped policy loss with a k3 KL penalty, aggregation.

Pure tensor functions: no model, no optimizer, no process group, no state. Everything the
training loop needs to turn (log-probs, rewards, reflection mask) into a scalar loss.

Per masked (reflection) token::

    loss_t = -min(r * A, clip(r, 1 - eps_low, 1 + eps_high) * A) + beta * k3
    r      = exp(logp - old_logp)
    k3     = exp(ref - logp) - (ref - logp) - 1

``old_logp`` (the log-probs under the policy that sampled the batch, before this step's
updates; r3.train passes the policy's own detached log-probs in the first epoch, so there r = 1,
and its pre-update pass in later ones) and ``ref_logp`` (the frozen reference model's) are
constants: they are detached here. All three are of the same temperature-scaled distribution
(logits / T, the one the tokens were sampled from), so k3 and r compare what was sampled.
Masked-out positions are replaced with zeros *before* any arithmetic (``torch.where``, not a
multiply), so inf/NaN sitting in padding can neither reach the loss nor the gradient.

Aggregations (``agg``), for a batch of B sequences with T positions:

* ``"token-mean"``: sum over masked tokens / number of masked tokens. Each token weighs the same.
* ``"seq-mean-token-mean"``: mean over each sequence's masked tokens, then mean over the
  sequences that have at least one masked token. Each sequence weighs the same.
* ``"seq-mean-token-sum-norm"``: sum over masked tokens / (B * max_len) (Dr. GRPO). The
  normaliser is a constant, so no length bias. ``max_len`` defaults to T, the padded width of the
  tensor, which depends on how the batch was padded: pass a fixed ``max_len`` (e.g. the
  reflection's ``max_new_tokens``) whenever micro-batches are padded differently.

Global normalisation (gradient accumulation and data parallelism)
-----------------------------------------------------------------
Every aggregation is ``numerator / denominator`` where the numerator is a sum over the
sequences of the batch (tokens, or per-sequence means). If each micro-batch divided by its own
denominator, the step's gradient would depend on how the batch was split over micro-batches and
ranks (a micro-batch holding 3 reflection tokens would weigh as much as one holding 300). So the
training loop divides every micro-batch by the denominator of the *whole optimizer step*:

.. code-block:: python

    # once per optimizer step, before any backward:
    den = sum(loss_denominator(mb.mask, agg, max_len=L) for mb in my_micro_batches)
    torch.distributed.all_reduce(den, op=ReduceOp.SUM)      # global over ranks
    for mb in my_micro_batches:
        loss, metrics = policy_loss(mb.logp, mb.old_logp, mb.ref_logp, mb.adv, mb.mask,
                                    agg=agg, max_len=L, denominator=den)
        (loss * world_size).backward()   # only if the gradient reduction AVERAGES over ranks
    optimizer.step()

The sum over micro-batches and ranks of these losses equals the whole-batch loss, and the
accumulated (summed over micro-batches, summed over ranks) gradient equals the whole-batch
gradient exactly, whatever the split. FSDP2 and DDP *average* gradients over ranks by default;
either multiply the loss by ``world_size`` as above, or make the reduction a plain sum (FSDP2:
``model.set_gradient_divide_factor(1.0)``). ``den`` may be a python number or a 0-d tensor; a
zero denominator (no masked token anywhere) is treated as 1, giving a zero loss and zero
gradient. The returned ``metrics`` are local to the micro-batch (see :func:`policy_loss`); weight
them by ``metrics["tokens"]`` when averaging across micro-batches.

Without ``denominator`` each call normalises by its own batch, which is the whole-batch loss when
the whole batch is passed at once.
"""

from __future__ import annotations

import torch

from r3.kernels.logprob_kl import k3

__all__ = [
    "AGGREGATIONS",
    "aggregate",
    "group_advantages",
    "kl_k3",
    "loss_denominator",
    "policy_loss",
]

AGGREGATIONS = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm")


def group_advantages(rewards: torch.Tensor, *, scale: bool = True, eps: float = 1e-6) -> torch.Tensor:
    """Group-relative advantages for rewards ``[num_groups, G]`` (same shape back).

    ``(r - mean) / (std + eps)`` with the unbiased std over each group (as TRL and verl), or just
    ``r - mean`` when ``scale=False`` (Dr. GRPO: no std division, which would up-weight groups
    that are almost all-pass or all-fail). A group whose rewards are all equal carries no signal
    and gets exactly 0 (not a rounding residue of the mean), as does every group when G == 1
    (where the unbiased std is undefined). Integer/bool rewards are promoted to float32.
    """
    if rewards.dim() != 2:
        raise ValueError(f"rewards must be [num_groups, G], got shape {tuple(rewards.shape)}")
    r = rewards if rewards.is_floating_point() else rewards.to(torch.float32)
    G = r.shape[1]
    if G == 0:
        return r.clone()
    centered = r - r.mean(dim=1, keepdim=True)
    if scale and G > 1 and r.shape[0]:  # (no groups: torch warns on the std of nothing)
        std = r.std(dim=1, keepdim=True, unbiased=True)
        centered = centered / (std + eps)
    # Exact zeros for all-equal groups: mean(x, x, x) can differ from x in the last bit.
    constant = (r == r[:, :1]).all(dim=1, keepdim=True)
    return torch.where(constant, torch.zeros_like(centered), centered)


def kl_k3(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """k3 estimator of KL(policy || ref) per token: ``exp(d) - d - 1`` with ``d = ref - logp``.

    Non-negative, unbiased for the KL under samples from the policy, low variance (Schulman's
    "approximating KL divergence"). Small |d| (the usual case: the policy stays near the
    reference, |d| < 0.5) use the Taylor series d^2/2 + d^3/6 + ... + d^10/10!, exact to fp32
    rounding where the closed form would cancel (the closed form exp(d) - d - 1 is pure fp32
    rounding noise for |d| < 1e-3, and can come out negative). Differentiable in both arguments.
    The same function as ``r3.kernels.fused_logprob_kl``'s PyTorch path (:func:`r3.kernels.k3`).
    """
    return k3(ref_logp - logp)


def _check_agg(agg: str) -> None:
    if agg not in AGGREGATIONS:
        raise ValueError(f"unknown agg {agg!r}; expected one of {AGGREGATIONS}")


def loss_denominator(mask: torch.Tensor, agg: str = "token-mean", *, max_len: int | None = None) -> torch.Tensor:
    """This batch's contribution to the loss denominator: a 0-d float32 tensor on mask's device.

    ``token-mean``: number of masked tokens; ``seq-mean-token-mean``: number of sequences with at
    least one masked token; ``seq-mean-token-sum-norm``: B * max_len (max_len defaults to T).
    Contributions add up: sum them over micro-batches and all-reduce (SUM) over ranks to get the
    denominator of the whole step, then pass it to :func:`policy_loss` as ``denominator``. It is
    a tensor so the all-reduce needs no host sync.
    """
    _check_agg(agg)
    if mask.dim() != 2:
        raise ValueError(f"mask must be [B, T], got shape {tuple(mask.shape)}")
    m = mask.bool()
    if agg == "token-mean":
        return m.sum().to(torch.float32)
    if agg == "seq-mean-token-mean":
        return m.any(dim=1).sum().to(torch.float32)
    L = mask.shape[1] if max_len is None else int(max_len)
    return torch.tensor(float(mask.shape[0] * L), dtype=torch.float32, device=mask.device)


def _safe_denominator(den, like: torch.Tensor) -> torch.Tensor:
    den = torch.as_tensor(den, dtype=like.dtype, device=like.device).detach()
    return torch.where(den > 0, den, torch.ones_like(den))


def aggregate(
    per_token: torch.Tensor,
    mask: torch.Tensor,
    agg: str = "token-mean",
    *,
    denominator: torch.Tensor | float | None = None,
    max_len: int | None = None,
) -> torch.Tensor:
    """Reduce a per-token quantity ``[B, T]`` to a scalar with one of :data:`AGGREGATIONS`.

    Positions outside ``mask`` are excluded with ``torch.where`` (their values, even inf/NaN,
    never reach the result). ``denominator`` overrides the local one (see the module docstring);
    otherwise this batch's own :func:`loss_denominator` is used. With nothing masked the result is
    an exact 0 that still depends on ``per_token`` (so ``backward`` works and gives zeros).
    """
    _check_agg(agg)
    m = mask.bool()
    vals = torch.where(m, per_token, torch.zeros_like(per_token))
    if agg == "seq-mean-token-mean":
        counts = m.sum(dim=1)
        per_seq = vals.sum(dim=1) / counts.clamp_min(1).to(vals.dtype)
        numerator = per_seq.sum()
    else:
        numerator = vals.sum()
    if denominator is None:
        denominator = loss_denominator(m, agg, max_len=max_len)
    return numerator / _safe_denominator(denominator, numerator)


def policy_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    ref_logp: torch.Tensor | None,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    eps_low: float = 0.2,
    eps_high: float = 0.2,
    beta: float = 0.001,
    agg: str = "token-mean",
    denominator: torch.Tensor | float | None = None,
    max_len: int | None = None,
    kl: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Clipped GRPO policy loss plus ``beta`` * k3 KL, aggregated over the masked tokens.

    Args:
        logp: ``[B, T]`` log-probs of the sampled tokens under the current policy (with grad).
        old_logp: ``[B, T]`` log-probs under the policy before this step's updates (detached here).
        ref_logp: ``[B, T]`` log-probs under the reference model (detached here), or None.
        advantages: ``[B]`` (one per sequence) or ``[B, T]`` (per token).
        mask: ``[B, T]`` bool or 0/1: the tokens that are trained (reflection tokens).
        eps_low, eps_high: the ratio is clipped to ``[1 - eps_low, 1 + eps_high]`` (DAPO's
            asymmetric "clip-higher" when they differ).
        beta: KL weight; ``beta=0``, or neither ``ref_logp`` nor ``kl``, means no KL term in the loss.
        agg: one of :data:`AGGREGATIONS`.
        denominator: the global normaliser for this optimizer step (module docstring); None:
            this batch's own.
        max_len: the fixed length L of the Dr. GRPO normaliser B * L (default: T).
        kl: ``[B, T]`` per-token k3 already computed with ``logp`` (what
            ``r3.kernels.fused_logprob_kl`` returns, differentiable through it); used instead of
            computing k3 from ``ref_logp``, which must then be None.

    Returns ``(loss, metrics)``: ``loss`` a 0-d tensor in the computation dtype (float32, or
    float64 for float64 inputs); ``metrics`` 0-d detached float32 tensors (no host sync; call
    ``.item()`` when logging), all over this batch's masked tokens:
    ``pg_loss`` (the clipped-surrogate part of ``loss``, same normaliser), ``kl`` (mean k3, also
    reported when beta=0 as long as ref_logp is given; 0 without ref_logp), ``clip_frac_low``
    (fraction of tokens where the lower clip binds: A < 0 and r < 1 - eps_low),
    ``clip_frac_high`` (A > 0 and r > 1 + eps_high), ``ratio_min``/``ratio_mean``/``ratio_max``,
    ``tokens`` (masked-token count) and ``sequences`` (sequences with a masked token). With no
    masked token every metric is 0.

    The gradient w.r.t. ``logp`` is exactly 0 at masked-out positions and wherever the clip
    binds (the clipped term is a constant there), and the loss is 0 (still attached to the graph)
    when nothing is masked.
    """
    _check_agg(agg)
    if logp.dim() != 2:
        raise ValueError(f"logp must be [B, T], got shape {tuple(logp.shape)}")
    if kl is not None and ref_logp is not None:
        raise ValueError("give either ref_logp or a precomputed kl, not both")
    for name, t in (("old_logp", old_logp), ("ref_logp", ref_logp), ("mask", mask), ("kl", kl)):
        if t is not None and t.shape != logp.shape:
            raise ValueError(f"{name} has shape {tuple(t.shape)}, expected {tuple(logp.shape)}")
    B, T = logp.shape
    if advantages.dim() == 1:
        if advantages.shape[0] != B:
            raise ValueError(f"advantages [B] must have B={B}, got {tuple(advantages.shape)}")
        advantages = advantages[:, None]
    elif advantages.dim() == 2:
        if advantages.shape[0] != B or advantages.shape[1] not in (1, T):
            raise ValueError(f"advantages must be [B] or [B, T], got {tuple(advantages.shape)}")
    else:
        raise ValueError(f"advantages must be [B] or [B, T], got {tuple(advantages.shape)}")

    dtype = torch.promote_types(logp.dtype, torch.float32)
    m = mask.bool()
    zero = torch.zeros((), dtype=dtype, device=logp.device)

    # Sanitise first: masked positions become 0 before any exp, so no inf/NaN can appear in the
    # forward or (through the chain rule) in the backward.
    lp = torch.where(m, logp.to(dtype), zero)
    old = torch.where(m, old_logp.detach().to(dtype), zero)
    adv = torch.where(m, advantages.detach().to(dtype).expand(B, T), zero)

    ratio = torch.exp(lp - old)
    clipped = torch.clamp(ratio, 1.0 - eps_low, 1.0 + eps_high)
    pg = -torch.minimum(ratio * adv, clipped * adv)

    if kl is not None:
        kl = torch.where(m, kl.to(dtype), zero)
    elif ref_logp is not None:
        ref = torch.where(m, ref_logp.detach().to(dtype), zero)
        kl = kl_k3(lp, ref)
    per_token = pg + beta * kl if (kl is not None and beta != 0) else pg

    if denominator is None:
        denominator = loss_denominator(m, agg, max_len=max_len)
    loss = aggregate(per_token, m, agg, denominator=denominator)

    with torch.no_grad():
        n = m.sum()
        nf = n.clamp_min(1).to(torch.float32)
        f32 = torch.float32
        ratio_d = ratio.detach().to(f32)
        big = torch.tensor(float("inf"), device=logp.device)
        has = n > 0
        metrics = {
            "pg_loss": aggregate(pg.detach(), m, agg, denominator=denominator).to(f32),
            "kl": (torch.where(m, kl.detach(), zero).sum().to(f32) / nf)
            if kl is not None
            else torch.zeros((), device=logp.device),
            "clip_frac_low": ((m & (adv < 0) & (ratio_d < 1.0 - eps_low)).sum().to(f32) / nf),
            "clip_frac_high": ((m & (adv > 0) & (ratio_d > 1.0 + eps_high)).sum().to(f32) / nf),
            "ratio_min": torch.where(has, torch.where(m, ratio_d, big).min(), 0.0) if m.numel() else zero.to(f32),
            "ratio_mean": torch.where(m, ratio_d, 0.0).sum() / nf,
            "ratio_max": torch.where(has, torch.where(m, ratio_d, -big).max(), 0.0) if m.numel() else zero.to(f32),
            "tokens": n.to(f32),
            "sequences": m.any(dim=1).sum().to(f32),
        }
    return loss, metrics
