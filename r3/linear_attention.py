"""The math of Qwen 3.5's linear-attention layers (Gated DeltaNet), as small pure tensor functions.

Qwen 3.5 (transformers ``qwen3_5``) interleaves full-attention layers with "linear_attention"
layers. Such a layer projects the hidden states to a fused q/k/v, runs it through a causal
depthwise conv (kernel 4, no bias) with SiLU (:func:`causal_conv`), l2-normalises q and k and
scales q by ``dk ** -0.5`` (:func:`qk_normalize`), and mixes the tokens with the *gated delta
rule* (:func:`gated_delta_rule`, one token at a time :func:`gated_delta_step`), whose output is
normed and gated by ``silu(z)`` (:func:`r3.rms_norm.gated_rms_norm`, imported here). This module holds that math; the
projections, the cache and the sampler are the model's.

The gated delta rule keeps a state ``S [dk, dv]`` per row and value head and, at each position t
(g_t <= 0 is a log decay, beta_t in (0, 1) a write strength), in fp32::

    S <- exp(g_t) S;   delta_t = beta_t (v_t - S^T k_t);   S <- S + k_t delta_t^T;   o_t = S^T q_t

Over a chunk of C positions that start from S0, with c_t = g_1 + ... + g_t, Gamma_t = exp(c_t),
L_ij = beta_i (k_i . k_j) exp(c_i - c_j) for j < i (0 elsewhere) and D_ti = exp(c_t - c_i) for
i <= t (0 elsewhere), unrolling the recurrence gives, in matrices with one row per position::

    (I + L) Delta = V_beta - (K_beta * Gamma) S0     (rows beta_i v_i and beta_i Gamma_i k_i)
    O   = (Q * Gamma) S0 + (Q K^T * D) Delta
    S_C = Gamma_C S0 + (K * exp(c_C - c))^T Delta

so a chunk costs one triangular solve (the inverse of I + L) and a few matmuls, and only the state
crosses chunks. Training keeps only the inputs (in their own dtype, q and k before
:func:`qk_normalize` where the rule applies it: ``normalize_qk``) and each chunk's starting state
for the backward pass, which recomputes the rest (:class:`_ChunkedRule`).

Contracts. Value head h reads key head ``h // (Hv // Hk)`` (transformers' ``repeat_interleave``).
States are ``[B, Hv, dk, dv]`` in fp32 and outputs fp32, whatever the input dtype (fp64 inputs
compute in fp64, for gradcheck). ``lengths`` marks right padding: a position at or beyond
``lengths[b]`` leaves row b's state unchanged (it is run with g = 0, beta = 0 and zero q/k/v), so
the final state is the state after the row's last valid token, and its output there is
unspecified but finite. :func:`causal_conv` likewise returns the last ``K - 1`` valid inputs as
its state. Everything is differentiable, the states passed in included.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from r3.rms_norm import gated_rms_norm

__all__ = ["qk_normalize", "gated_delta_rule", "gated_delta_step", "causal_conv", "gated_rms_norm"]


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    """fp32 for bf16/fp16/fp32 inputs; fp64 stays fp64 (so gradcheck can run in double)."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def qk_normalize(q: torch.Tensor, k: torch.Tensor, eps: float = 1e-6) -> tuple[torch.Tensor, torch.Tensor]:
    """q and k as Qwen 3.5 feeds them to the delta rule: each head vector divided by
    ``sqrt(|x|^2 + eps)`` (transformers' ``l2norm``, FLA's convention), and q then scaled by
    ``dk ** -0.5``; in fp32. Kept apart from :func:`gated_delta_rule` so the rule itself takes q
    and k as given (the caller may fuse or skip this)."""
    dtype = _compute_dtype(q)
    q, k = q.to(dtype), k.to(dtype)
    q = q * torch.rsqrt((q * q).sum(-1, keepdim=True) + eps)
    k = k * torch.rsqrt((k * k).sum(-1, keepdim=True) + eps)
    return q * q.shape[-1] ** -0.5, k


def _check_heads(q, k, v, g, beta) -> tuple[int, int]:
    """The shapes shared by the full call and the step: returns (Hk, Hv)."""
    if q.shape != k.shape:
        raise ValueError(f"q and k must have one shape, got {tuple(q.shape)} and {tuple(k.shape)}")
    Hk, Hv = q.shape[-2], v.shape[-2]
    if Hv % Hk:
        raise ValueError(f"value heads ({Hv}) must be a multiple of key heads ({Hk})")
    if g.shape != v.shape[:-1] or beta.shape != v.shape[:-1]:
        raise ValueError(f"g and beta must be v's shape without its last dim, {tuple(v.shape[:-1])}")
    return Hk, Hv


def _segment_sums(g: torch.Tensor) -> torch.Tensor:
    """``[..., C] -> [..., C, C]``: entry (i, j) is g_{j+1} + ... + g_i = c_i - c_j for j <= i (0 on
    the diagonal) and -inf above it. Summed per pair rather than as a difference of cumulative
    sums, so that two nearby positions deep into a strongly decaying chunk (|c| large) keep their
    small difference to fp32 precision instead of to the precision of |c|."""
    C = g.shape[-1]
    strictly_lower = torch.ones(C, C, dtype=torch.bool, device=g.device).tril(-1)
    # x[..., i, j] = g_i where i > j: summing down column j through row i adds g_{j+1} .. g_i
    x = g.unsqueeze(-1).expand(*g.shape, C).masked_fill(~strictly_lower, 0.0)
    return x.cumsum(-2).masked_fill(strictly_lower.T, float("-inf"))


def _chunk_parts(q, k, v, g, beta) -> tuple[torch.Tensor, ...]:
    """Everything inside a chunk (``[..., C, d]`` q, k, v and ``[..., C]`` g, beta in: every chunk at
    once, ``[B, Hv, N, C, ...]``, or one): what the scan across chunks reads, (U, W, Q * Gamma,
    Q K^T * D, K * exp(c_C - c), Gamma_C)."""
    c = g.cumsum(-1)  # c_t, the log decay from the chunk's start through t
    decay = _segment_sums(g).exp()  # D_ij = exp(c_i - c_j) for j <= i, else 0 (exp(-inf))
    L = (beta.unsqueeze(-1) * (k @ k.transpose(-1, -2)) * decay).tril(-1)
    # (I + L) [U | W] = [V_beta | K_beta * Gamma], so Delta = U - W S0 per chunk: by the inverse of
    # I + L (a solve against C columns instead of dk + dv, and batched matrix products)
    eye = torch.eye(L.shape[-1], dtype=L.dtype, device=L.device)
    inverse = torch.linalg.solve_triangular(L, eye.expand_as(L), upper=False, unitriangular=True)
    U = inverse @ (v * beta.unsqueeze(-1))
    W = inverse @ (k * (beta * c.exp()).unsqueeze(-1))
    attn = (q @ k.transpose(-1, -2)) * decay  # Q K^T * D, causal within the chunk
    q_decayed = q * c.exp().unsqueeze(-1)  # Q * Gamma reads the state at the chunk's start
    k_to_end = k * decay[..., -1, :].unsqueeze(-1)  # K * exp(c_C - c): the last row of D
    chunk_decay = c[..., -1].exp()[..., None, None]  # Gamma_C
    return U, W, q_decayed, attn, k_to_end, chunk_decay


def _scan(parts, S: torch.Tensor, starts: list | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Only the state crosses chunks: one short sequential scan over :func:`_chunk_parts` from the
    state ``S``. Returns (outputs ``[B, Hv, N, C, dv]``, the final state); appends each chunk's
    starting state to ``starts`` if given. (Each part is unbound into its chunks once: indexing
    chunk n inside the loop would make autograd zero-fill and accumulate a whole ``[B, Hv, N,
    ...]`` gradient per chunk.)"""
    outs = []
    for U_n, W_n, q_n, attn_n, k_n, decay_n in zip(*(x.unbind(2) for x in parts)):
        if starts is not None:
            starts.append(S)
        delta = U_n - W_n @ S
        outs.append(q_n @ S + attn_n @ delta)
        S = decay_n * S + k_n.transpose(-1, -2) @ delta
    return torch.stack(outs, dim=2), S


def _prepared(q, k, v, g, beta, normalize_qk: bool, rep: int) -> tuple[torch.Tensor, ...]:
    """The rule's inputs in the compute dtype, q and k ``[B, Hk, ...]`` through
    :func:`qk_normalize` if asked and repeated to the value heads (``rep`` each)."""
    dtype = _compute_dtype(q)
    q, k, v, g, beta = (x.to(dtype) for x in (q, k, v, g, beta))
    if normalize_qk:
        q, k = qk_normalize(q, k)
    return q.repeat_interleave(rep, dim=1), k.repeat_interleave(rep, dim=1), v, g, beta


def _rule(q, k, v, g, beta, S, normalize_qk: bool, rep: int, starts: list | None = None):
    """The chunked rule from the chunked inputs as given (:func:`_prepared`), autograd recording
    every intermediate: the no-grad path, and what :class:`_ChunkedRule` computes."""
    return _scan(_chunk_parts(*_prepared(q, k, v, g, beta, normalize_qk, rep)), S, starts)


class _ChunkedRule(torch.autograd.Function):
    """:func:`_rule` for training: the backward pass keeps only the inputs as given (bf16 from a
    bf16 model; q and k once per key head, before :func:`qk_normalize` where the rule applies it)
    and each chunk's starting state, where autograd would keep every chunk intermediate (the
    decays, L, the solve, in fp32, about 3.5x as many bytes) and the normalisation's fp32 copies;
    it recomputes the parts from them.

    Backward: with lam_n the loss's gradient by the state at chunk n's end (lam_N the final
    state's), chunk by chunk from the last, d Delta_n = attn_n^T dO_n + K_end_n lam_n and
    lam_{n-1} = Gamma_C,n lam_n + (Q Gamma)_n^T dO_n - W_n^T d Delta_n; chunk n's parts are
    recomputed as it is reached and their gradients are one autograd pass over its outputs and end
    state as functions of its parts with its starting state held fixed (the outputs' gradients dO_n,
    the end state's lam_n), so that one chunk's intermediates are alive at a time: recomputing every
    chunk's at once would hold what autograd through the chunks keeps, and more, while the block's
    backward runs (with activation checkpointing, more than autograd through the chunks at its peak)."""

    @staticmethod
    def forward(ctx, q, k, v, g, beta, S, normalize_qk, rep):
        starts = []
        out, S = _rule(q, k, v, g, beta, S, normalize_qk, rep, starts)
        ctx.save_for_backward(q, k, v, g, beta, torch.stack(starts, dim=2))
        ctx.prepare = (normalize_qk, rep)
        return out, S

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, d_out, d_end):
        *inputs, starts = ctx.saved_tensors
        lam = d_end  # (an output the loss does not use gets zeros: autograd materializes them)
        needs = ctx.needs_input_grad[:5]
        wanted = [i for i, need in enumerate(needs) if need]
        grads = [torch.empty_like(x) if need else None for x, need in zip(inputs, needs)]
        # Chunk by chunk from the last: recompute the chunk's parts (the chunks' parts are
        # independent, so one chunk's intermediates are alive at a time, not every chunk's), the
        # gradient of its Delta, its parts' gradients (one autograd pass over this chunk's outputs
        # and end state as functions of its parts, its starting state held fixed), then lam
        for n in reversed(range(starts.shape[2])):
            with torch.enable_grad():
                xs = [x[:, :, n].detach().requires_grad_(need) for x, need in zip(inputs, needs)]
                parts = _chunk_parts(*_prepared(*xs, *ctx.prepare))
            U, W, q_n, attn_n, k_n, decay_n = (x.detach() for x in parts)
            S, d_out_n = starts[:, :, n], d_out[:, :, n]
            d_delta = attn_n.transpose(-1, -2) @ d_out_n + k_n @ lam
            if wanted:
                S_t = S.transpose(-1, -2)
                delta = U - W @ S
                d_parts = (d_delta, -d_delta @ S_t, d_out_n @ S_t, d_out_n @ delta.transpose(-1, -2),
                           delta @ lam.transpose(-1, -2), (S * lam).sum((-1, -2), keepdim=True))
                linked = [(x, d) for x, d in zip(parts, d_parts) if x.requires_grad]  # (the parts the wanted reach)
                got = torch.autograd.grad([x for x, _ in linked], [xs[i] for i in wanted], [d for _, d in linked])
                for i, grad in zip(wanted, got):
                    grads[i][:, :, n] = grad
            lam = decay_n * lam + q_n.transpose(-1, -2) @ d_out_n - W.transpose(-1, -2) @ d_delta
        return (*grads, lam if ctx.needs_input_grad[5] else None, None, None)


def gated_delta_rule(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    *,
    state: torch.Tensor | None = None,
    lengths: torch.Tensor | None = None,
    chunk_size: int = 64,
    normalize_qk: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The gated delta rule over a whole sequence, in chunks (the prefill and the training
    forward).

    q, k ``[B, T, Hk, dk]`` (used as given, or through :func:`qk_normalize` first with
    ``normalize_qk``: then training keeps q and k as given for backward, not their fp32
    normalised copies), v ``[B, T, Hv, dv]``, g and beta ``[B, T, Hv]``; ``state`` ``[B, Hv, dk,
    dv]`` or None (zeros); ``lengths`` ``[B]`` or None (all T valid). Returns (o ``[B, T, Hv,
    dv]``, final state ``[B, Hv, dk, dv]``), fp32 (the math runs in fp32 whatever the inputs'
    dtype). The result does not depend on ``chunk_size`` beyond rounding; a chunk is never longer
    than T.
    """
    Hk, Hv = _check_heads(q, k, v, g, beta)
    B, T, _, dk = q.shape
    dv = v.shape[-1]
    dtype = _compute_dtype(q)
    if lengths is not None:
        # Right padding becomes the identity step: g = 0 keeps S, beta = 0 writes nothing, and the
        # zeroed q/k/v keep whatever the caller left there (even inf or nan) out of every product.
        valid = torch.arange(T, device=q.device) < lengths.to(q.device)[:, None]  # [B, T]
        q, k, v = (torch.where(valid[:, :, None, None], x, 0) for x in (q, k, v))
        g, beta = (torch.where(valid[:, :, None], x, 0) for x in (g, beta))
    # [B, T, H, d] -> [B, H, T, d] in the inputs' dtypes, key heads not yet repeated per value
    # head (both inside the rule: training keeps them so)
    q, k, v = (x.transpose(1, 2) for x in (q, k, v))
    g, beta = (x.transpose(1, 2) for x in (g, beta))
    S = torch.zeros(B, Hv, dk, dv, dtype=dtype, device=q.device) if state is None else state.to(dtype)

    # Pad T to whole chunks with identity steps (zero q/k/v, g = beta = 0), then split into chunks.
    C = max(1, min(chunk_size, T))
    N = -(-T // C)
    pad = N * C - T
    q, k, v = (F.pad(x, (0, 0, 0, pad)).reshape(B, x.shape[1], N, C, -1) for x in (q, k, v))
    g, beta = (F.pad(x, (0, pad)).reshape(B, Hv, N, C) for x in (g, beta))

    if torch.is_grad_enabled() and any(x.requires_grad for x in (q, k, v, g, beta, S)):
        o, S = _ChunkedRule.apply(q, k, v, g, beta, S, normalize_qk, Hv // Hk)
    else:
        o, S = _rule(q, k, v, g, beta, S, normalize_qk, Hv // Hk)
    o = o.reshape(B, Hv, N * C, dv)[:, :, :T]
    return o.transpose(1, 2).contiguous(), S


def gated_delta_step(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    state: torch.Tensor,
    live: torch.Tensor | None = None,
    *,
    inplace: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One decode step: the recurrence itself, one token per row.

    q, k ``[B, Hk, dk]``, v ``[B, Hv, dv]``, g and beta ``[B, Hv]``, ``state`` ``[B, Hv, dk, dv]``.
    ``live`` ``[B]`` bool or None (all live): a row that is not live keeps its state bit for bit
    (the sampler keeps stepping rows that have stopped); its output is unspecified. Returns
    (o ``[B, Hv, dv]``, new state), fp32. With ``inplace=True`` the new state is written into
    ``state`` and that same tensor returned (fixed buffers, as CUDA graphs want; no autograd).
    """
    Hk, Hv = _check_heads(q, k, v, g, beta)
    dtype = _compute_dtype(q)
    rep = Hv // Hk
    B, dk, dv = q.shape[0], q.shape[-1], v.shape[-1]
    q, k = (x.to(dtype).repeat_interleave(rep, dim=1) for x in (q, k))
    v, g, beta = v.to(dtype), g.to(dtype), beta.to(dtype)
    if live is not None:
        # a row that is not live takes the identity step: decay exp(0) = 1 and nothing written
        # (k and v zeroed too, so that nothing the caller left there reaches the state)
        on = live.to(q.device)
        g, beta = (torch.where(on[:, None], x, 0) for x in (g, beta))
        k, v = (torch.where(on[:, None, None], x, 0) for x in (k, v))
    # As batched matrix products over [B * Hv] states: the state is read three times and written
    # once per step (elementwise products and sums made more passes over it)
    S = (state.to(dtype) * g.exp()[..., None, None]).view(B * Hv, dk, dv)
    k3 = k.reshape(B * Hv, 1, dk)
    delta = beta.reshape(B * Hv, 1, 1) * (v.reshape(B * Hv, 1, dv) - torch.bmm(k3, S))  # beta (v - S^T k)
    S = torch.baddbmm(S, k3.transpose(1, 2), delta)  # + k delta^T
    o = torch.bmm(q.reshape(B * Hv, 1, dk), S).view(B, Hv, dv)  # S^T q
    S = S.view(B, Hv, dk, dv)
    if inplace:
        state.copy_(S)
        return o, state
    return o, S


def causal_conv(
    x: torch.Tensor,
    weight: torch.Tensor,
    *,
    state: torch.Tensor | None = None,
    lengths: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Qwen 3.5's depthwise causal conv1d followed by SiLU, over ``x [B, T, C]`` (time second, as
    the projections produce it; transformers runs ``[B, C, T]``).

    ``weight`` ``[C, K]`` (the checkpoint's ``conv1d.weight [C, 1, K]`` squeezed; no bias).
    ``state`` ``[B, C, K - 1]``: the K - 1 inputs before x, oldest first (None: zeros, the start of
    a sequence). ``lengths`` ``[B]`` or None (all T valid). Returns (y ``[B, T, C]`` in x's dtype,
    new state ``[B, C, K - 1]`` in x's dtype): the new state holds each row's last K - 1 valid
    inputs, the old state counting as earlier inputs (lengths 1, K = 4: the old state's last two
    columns, then x's first). Outputs at padded positions are unspecified. As transformers'
    ``causal_conv1d_fn``/``causal_conv1d_update``: the conv and SiLU run in the weight's dtype.
    """
    B, T, C = x.shape
    K = weight.shape[-1]
    # The whole input history: [B, C, K - 1 + T], the old state (or K - 1 zeros) first
    old = x.new_zeros(B, C, K - 1) if state is None else state.to(x.dtype)
    xs = torch.cat([old, x.transpose(1, 2)], dim=-1)
    if state is None:
        # At the start of a sequence, conv as causal_conv1d_fn does (its zero padding; bit for bit:
        # convolving the concatenated zeros instead can differ in the last place)
        y = F.conv1d(x.transpose(1, 2).to(weight.dtype), weight.unsqueeze(1), padding=K - 1, groups=C)[..., :T]
    elif T == 1 and torch.compiler.is_compiling():
        # A compiled decode step: each channel's dot product of its K inputs, summed in fp32 and
        # rounded once as the conv does (to its last bit or so); dynamo's shape rules for a conv
        # guard on the batch size, which the step keeps dynamic
        acc = _compute_dtype(weight)
        y = (xs.to(acc) * weight.to(acc)).sum(-1, keepdim=True).to(weight.dtype)
    else:
        y = F.conv1d(xs.to(weight.dtype), weight.unsqueeze(1), groups=C)  # as causal_conv1d_update
    y = F.silu(y)  # [B, C, T]
    if lengths is None:
        new_state = xs[:, :, T:]
    else:
        # Row b's valid history ends at column K - 2 + lengths[b]: keep the K - 1 columns up to it
        cols = lengths.to(x.device)[:, None] + torch.arange(K - 1, device=x.device)  # [B, K - 1]
        new_state = xs.gather(-1, cols[:, None, :].expand(B, C, K - 1))
    return y.to(x.dtype).transpose(1, 2), new_state
