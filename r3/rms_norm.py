"""RMS norms that keep their input for the backward pass, not their fp32 intermediates.

Written as tensor ops, an RMS norm of a bf16 input makes autograd keep its fp32 upcast (4 bytes per
value) and its normalised values (2 bytes rounded, 4 in fp32; Qwen 3.5's gated norm also its gate
in fp32 and the gate's SiLU). :func:`rms_norm` and :func:`gated_rms_norm` compute the same values
with the same ops (so bit for bit, with autograd or without, on any device) and, when autograd
records them, keep only their input (2 bytes per value; and the gate) and the reciprocal RMS of
each row: 2 (no weight) to 12 (gated) bytes per value fewer. The backward pass recomputes the
normalised values from those, as Liger's RMSNorm does, in fp32, and rounds each gradient once to
its input's dtype; it writes in place only into tensors it made (on a CPU a fresh tensor of tens of
MB costs more than the op that fills it), and is not differentiable again (``create_graph`` is
refused).

Styles (:class:`r3.model.RMSNorm`): ``""`` normalises in fp32, rounds, then scales in the input
dtype (Llama, transformers' order); ``"gemma"`` scales by ``1 + w`` and ``"olmo"`` by ``w`` in
fp32 and rounds once; ``"gemma4"`` is OLMo's with ``x * (mean(x^2) + eps) ** -1/2`` in place of
the reciprocal square root."""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["STYLES", "rms_norm", "gated_rms_norm"]

STYLES = ("", "gemma", "olmo", "gemma4")


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The precision the norm computes in: fp32, or fp64 for fp64 inputs (gradcheck)."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _upcast(x: torch.Tensor) -> torch.Tensor:
    """``x`` in :func:`_compute_dtype` (``x`` itself where it already is)."""
    return x.to(_compute_dtype(x))


def _reciprocal_rms(x: torch.Tensor, eps: float) -> torch.Tensor:
    """``1 / sqrt(mean(x^2) + eps)`` per row of ``x`` (``[..., 1]``) in fp32 (fp64 for fp64 ``x``),
    for the backward pass: one read of ``x``, no fp32 copy of it. (The forward's values come from
    the plain ops, whose own statistics may round otherwise in the last bit.)"""
    square_sum = torch.linalg.vector_norm(x, dim=-1, keepdim=True, dtype=_compute_dtype(x)).square_()
    return square_sum.div_(x.shape[-1]).add_(eps).rsqrt_()


def _plain_rms_norm(x: torch.Tensor, weight: torch.Tensor | None, eps: float, style: str) -> torch.Tensor:
    """The norm as tensor ops (what autograd would record op by op)."""
    if style == "gemma4":
        x32 = _upcast(x)
        out = x32 * torch.pow(x32.pow(2).mean(-1, keepdim=True) + eps, -0.5)
        return (out if weight is None else out * _upcast(weight)).to(x.dtype)
    if style:
        w = _upcast(weight)
        return (F.rms_norm(_upcast(x), (x.shape[-1],), eps=eps) * (1.0 + w if style == "gemma" else w)).to(x.dtype)
    # (F.rms_norm normalises in fp32 and rounds once, bit for bit the order transformers uses)
    normed = F.rms_norm(x, (x.shape[-1],), eps=eps)
    return normed if weight is None else weight * normed


def _plain_gated_rms_norm(x: torch.Tensor, gate: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    dtype = x.dtype
    h = _upcast(x)
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    h = weight * h.to(dtype)
    return (h * F.silu(_upcast(gate))).to(dtype)


def _scale32(weight: torch.Tensor | None, style: str) -> torch.Tensor | float:
    """What the fp32 normalised values are multiplied by in the fp32-scaling styles."""
    if weight is None:
        return 1.0
    return 1.0 + _upcast(weight) if style == "gemma" else _upcast(weight)


def _fresh(t: torch.Tensor) -> torch.Tensor:
    """``t`` upcast (:func:`_upcast`) into a tensor of its own, which the backward pass may write.
    (Always a copy, by dtype, not by comparing data pointers, which torch.compile cannot trace: a
    graph break in the backward pass, and ``fullgraph=True`` refused.)"""
    return t.to(_compute_dtype(t), copy=True)


def _column_sums(a: torch.Tensor, b: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """A weight's gradient: the sum over every leading dim of ``a * b`` (``[..., n]``), in
    ``like``'s dtype."""
    n = a.shape[-1]
    return torch.linalg.vecdot(a.reshape(-1, n), b.reshape(-1, n), dim=0).to(like.dtype)


class _RecomputedRMSNorm(torch.autograd.Function):
    """:func:`rms_norm` (``gate`` None) and :func:`gated_rms_norm`, keeping ``x``, ``gate`` and the
    reciprocal RMS per row for the backward pass (module docstring)."""

    @staticmethod
    def forward(ctx, x, weight, gate, eps, style):
        # (the plain ops' values, which a forward pass without autograd gives too, on any device:
        # on CUDA F.rms_norm is a fused kernel that sums in its own order)
        y = _plain_rms_norm(x, weight, eps, style) if gate is None else _plain_gated_rms_norm(x, gate, weight, eps)
        ctx.save_for_backward(x, weight, gate, _reciprocal_rms(x, eps))
        ctx.style = style
        return y

    @staticmethod
    def backward(ctx, gy):
        x, weight, gate, r = ctx.saved_tensors
        if _records(gy, x, weight, gate):
            # (create_graph=True: these gradients hold r, the reciprocal RMS, as a constant, and some
            # of them, the gate's, would be differentiated again without an error, and wrongly)
            raise RuntimeError("r3.rms_norm: a double backward (create_graph=True) through the RMS norm is not "
                               "supported: its backward pass recomputes the normalised values and is not "
                               "differentiable")
        style = ctx.style
        normed = _fresh(x).mul_(r)
        g_normed = _fresh(gy)  # (d loss / d normed, once scaled below)
        grad_weight = grad_gate = None
        need_weight = weight is not None and ctx.needs_input_grad[1]
        if gate is not None:
            # y = round(round(w * round(n)) * silu(gate)): the weight scales the rounded values
            rounded = normed.to(x.dtype)
            g32 = _upcast(gate)
            sig = torch.sigmoid(g32)
            if ctx.needs_input_grad[2]:
                # d silu(g) / dg = sig (1 + g (1 - sig))
                d_silu = torch.addcmul(g32, g32, sig, value=-1.0).add_(1.0).mul_(sig).mul_(g_normed)
                grad_gate = d_silu.mul_(_upcast(weight * rounded)).to(gate.dtype)
            g_normed.mul_(g32).mul_(sig)
            if need_weight:
                grad_weight = _column_sums(g_normed, _upcast(rounded), weight)
            g_normed.mul_(_upcast(weight))
        elif style:
            if need_weight:
                grad_weight = _column_sums(g_normed, normed, weight)
            g_normed.mul_(_scale32(weight, style))
        elif weight is not None:
            if need_weight:  # (y = w * round(n): the weight scales the rounded values)
                grad_weight = _column_sums(g_normed, _upcast(normed.to(x.dtype)), weight)
            g_normed.mul_(_upcast(weight))
        grad_x = None
        if ctx.needs_input_grad[0]:
            dot = torch.linalg.vecdot(g_normed, normed).unsqueeze(-1).div_(x.shape[-1])
            grad_x = g_normed.addcmul_(normed, dot, value=-1.0).mul_(r).to(x.dtype)
        return grad_x, grad_weight, grad_gate, None, None


def _records(*tensors: torch.Tensor | None) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def rms_norm(x: torch.Tensor, weight: torch.Tensor | None, eps: float, style: str = "") -> torch.Tensor:
    """RMS-normalise ``x`` over its last dim and scale by ``weight`` (None: no scale) as ``style``
    says (module docstring), in ``x``'s dtype."""
    if style not in STYLES:
        raise ValueError(f"unknown RMS norm style {style!r}; expected one of {STYLES}")
    if _records(x, weight):
        return _RecomputedRMSNorm.apply(x, weight, None, eps, style)
    return _plain_rms_norm(x, weight, eps, style)


def gated_rms_norm(x: torch.Tensor, gate: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Qwen3_5RMSNormGated: RMS-normalise x over its last dim in fp32, round to x's dtype and
    multiply by ``weight``, multiply by ``silu(gate)`` in fp32, round to x's dtype. (Each rounding
    is the reference's, so bf16 results match it bit for bit.)"""
    if _records(x, gate, weight):
        return _RecomputedRMSNorm.apply(x, weight, gate, eps, "")
    return _plain_gated_rms_norm(x, gate, weight, eps)
