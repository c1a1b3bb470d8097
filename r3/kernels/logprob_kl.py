"""Fused token log-prob + k3 KL from logits, without an [N, V] fp32 temporary.

GRPO needs, per sampled token, ``logp = log_softmax(logits / temperature)[target]`` and the k3 KL
against a reference log-prob. The naive way (``log_softmax`` + ``gather``) materialises a full
fp32 ``[N, V]`` tensor: 10 GB for 16k tokens x 152k vocab, plus as much again for its gradient.
Here the Triton forward streams each row once, keeping only a running max and sum (online
logsumexp) and saving one fp32 logsumexp per row; the backward recomputes the softmax from the
logits and that logsumexp and writes ``dlogits`` once, in the logits' dtype. Nothing of size
[N, V] is saved for backward: only the logits themselves (which autograd keeps anyway) and [N]
vectors.

Three implementations, one contract (``fused_logprob_kl``):

* Triton kernels (``_logprob_kl_fwd_kernel`` / ``_logprob_kl_bwd_kernel``), used for CUDA tensors.
* ``_torch_forward`` / ``_torch_backward``: plain PyTorch, chunked over rows so one chunk's fp32
  temporaries stay under ``CPU_CHUNK_BYTES`` each (log_softmax forward, softmax recomputed in
  backward); used for CPU tensors (and CUDA without triton).
* ``logprob_kl_reference``: the naive log_softmax + gather + k3, for tests and benchmarks.

Triton's interpreter: if ``TRITON_INTERPRET=1`` is in the environment **when this module is
imported** (Triton fixes compiled vs. interpreted when a kernel is decorated, i.e. at import), the
kernels are interpreted and CPU tensors go through them too -- that is how the Triton code is
tested on machines without a GPU. Set the variable before importing ``r3.kernels`` (a subprocess is
the reliable way inside a test suite).

Targets: a negative target (the usual ``ignore_index``, e.g. -100) gives logp = 0, kl = 0 and no
gradient; a target >= V is an upstream bug and gives NaN (never an out-of-bounds read).
"""

from __future__ import annotations

import warnings

import torch

try:  # triton is optional: CPU-only installs use the chunked PyTorch path
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the environment
    triton = None
    tl = None

__all__ = [
    "CPU_CHUNK_BYTES",
    "TRITON_CONFIG_OVERRIDE",
    "fused_logprob_kl",
    "k3",
    "logprob_kl_reference",
    "triton_available",
    "uses_triton",
]

# Upper bound on one fp32 row-chunk temporary in the PyTorch path: the (log)softmax output, plus an
# fp32 copy of the chunk for bf16/fp16 logits or temperature != 1 (at most two alive at once).
CPU_CHUNK_BYTES = 8 << 20  # small chunks stay cache-resident (much faster on CPU than 64 MB chunks)

# {"block_v": int, "num_warps": int}: overrides the launch heuristics (benchmark sweeps, tests).
TRITON_CONFIG_OVERRIDE: dict = {}

# |ref - logp| below which k3 (and, in the kernel, its derivative) use the Taylor series: the
# closed form exp(d) - d - 1 cancels catastrophically for small d (pure fp32 rounding noise for
# |d| < 1e-3). With the series the fp32 relative error stays ~1e-6 for every d.
_K3_TAYLOR_BELOW = 0.5


# --------------------------------------------------------------------------------------------
# Reference
# --------------------------------------------------------------------------------------------


def logprob_kl_reference(
    logits: torch.Tensor,
    targets: torch.Tensor,
    ref_logp: torch.Tensor | None = None,
    temperature: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Naive log_softmax + gather + k3, in float32 (float64 for float64 logits).

    Materialises the full ``[..., V]`` log-softmax: for tests and benchmarks only.
    """
    dtype = torch.promote_types(logits.dtype, torch.float32)
    logp_all = torch.log_softmax(logits.to(dtype) / temperature, dim=-1)
    logp = logp_all.gather(-1, targets.long().unsqueeze(-1)).squeeze(-1)
    if ref_logp is None:
        return logp, None
    d = ref_logp.to(dtype) - logp
    return logp, torch.exp(d) - d - 1


# --------------------------------------------------------------------------------------------
# Triton kernels
# --------------------------------------------------------------------------------------------

if triton is not None:

    @triton.jit
    def _expm1_series(d):
        # exp(d) - 1 = sum_{n=1..9} d^n / n!, relative error < 1e-9 for |d| < 0.5
        p = 2.755731922398589e-06 + d * 2.755731922398589e-07
        p = 2.48015873015873e-05 + d * p
        p = 0.0001984126984126984 + d * p
        p = 0.001388888888888889 + d * p
        p = 0.008333333333333333 + d * p
        p = 0.041666666666666664 + d * p
        p = 0.16666666666666666 + d * p
        p = 0.5 + d * p
        p = 1.0 + d * p
        return d * p

    @triton.jit
    def _k3_series(d):
        # exp(d) - d - 1 = sum_{n=2..10} d^n / n!, relative error < 1e-9 for |d| < 0.5
        p = 2.755731922398589e-06 + d * 2.755731922398589e-07
        p = 2.48015873015873e-05 + d * p
        p = 0.0001984126984126984 + d * p
        p = 0.001388888888888889 + d * p
        p = 0.008333333333333333 + d * p
        p = 0.041666666666666664 + d * p
        p = 0.16666666666666666 + d * p
        p = 0.5 + d * p
        return d * d * p

    @triton.jit
    def _logprob_kl_fwd_kernel(
        logits_ptr,
        logits_row_stride,
        targets_ptr,
        ref_ptr,
        logp_ptr,
        kl_ptr,
        lse_ptr,
        V,
        inv_temp,
        HAS_REF: tl.constexpr,
        BLOCK_V: tl.constexpr,
    ):
        # One program per row on a 1-D grid; int64 row offset (N * V can exceed 2**31).
        row = tl.program_id(0).to(tl.int64)
        row_ptr = logits_ptr + row * logits_row_stride

        # Online logsumexp in fp32: m = running max, d = sum(exp(z - m)).
        m = float("-inf")
        d = 0.0
        for start in range(0, V, BLOCK_V):
            offs = start + tl.arange(0, BLOCK_V)
            z = tl.load(row_ptr + offs, mask=offs < V, other=float("-inf")).to(tl.float32) * inv_temp
            m_new = tl.maximum(m, tl.max(z, axis=0))
            # While every logit seen is -inf, shift by 0 instead of -inf (avoids -inf - -inf).
            shift = tl.where(m_new == float("-inf"), 0.0, m_new)
            d = d * tl.exp(m - shift) + tl.sum(tl.exp(z - shift), axis=0)
            m = m_new
        lse = m + tl.log(d)

        t = tl.load(targets_ptr + row).to(tl.int64)
        t_ok = (t >= 0) & (t < V)
        z_t = tl.load(row_ptr + tl.where(t_ok, t, 0)).to(tl.float32) * inv_temp
        logp = z_t - lse
        logp = tl.where(t < 0, 0.0, tl.where(t >= V, float("nan"), logp))
        tl.store(lse_ptr + row, lse)
        tl.store(logp_ptr + row, logp)

        if HAS_REF:
            dd = tl.load(ref_ptr + row).to(tl.float32) - logp
            small = tl.abs(dd) < 0.5
            ds = tl.where(small, dd, 0.0)
            kl = tl.where(small, _k3_series(ds), tl.exp(dd) - dd - 1.0)
            kl = tl.where(t < 0, 0.0, kl)
            tl.store(kl_ptr + row, kl)

    @triton.jit
    def _logprob_kl_bwd_kernel(
        logits_ptr,
        logits_row_stride,
        dlogits_ptr,
        dlogits_row_stride,
        targets_ptr,
        ref_ptr,
        lse_ptr,
        glogp_ptr,
        gkl_ptr,
        V,
        inv_temp,
        HAS_GLOGP: tl.constexpr,
        HAS_GKL: tl.constexpr,
        BLOCK_V: tl.constexpr,
    ):
        row = tl.program_id(0).to(tl.int64)
        row_ptr = logits_ptr + row * logits_row_stride
        drow_ptr = dlogits_ptr + row * dlogits_row_stride

        t = tl.load(targets_ptr + row).to(tl.int64)
        t_ok = (t >= 0) & (t < V)
        lse = tl.load(lse_ptr + row)

        # Per-row coefficient g = dL/dlogp (+ dL/dkl * dk3/dlogp, dk3/dlogp = 1 - exp(ref - logp)).
        g = 0.0
        if HAS_GLOGP:
            g += tl.load(glogp_ptr + row).to(tl.float32)
        if HAS_GKL:
            # Read before the loop below (which may overwrite the row when in place).
            z_t = tl.load(row_ptr + tl.where(t_ok, t, 0)).to(tl.float32) * inv_temp
            dd = tl.load(ref_ptr + row).to(tl.float32) - (z_t - lse)
            small = tl.abs(dd) < 0.5
            ds = tl.where(small, dd, 0.0)
            dk3 = tl.where(small, -_expm1_series(ds), 1.0 - tl.exp(dd))
            g += tl.load(gkl_ptr + row).to(tl.float32) * dk3
        g = tl.where(t_ok, g, 0.0)
        scale = g * inv_temp  # d z / d logits = 1 / temperature

        # dlogits_j = scale * (1[j == t] - softmax_j), softmax recomputed from the saved lse.
        for start in range(0, V, BLOCK_V):
            offs = start + tl.arange(0, BLOCK_V)
            valid = offs < V
            z = tl.load(row_ptr + offs, mask=valid, other=float("-inf")).to(tl.float32) * inv_temp
            p_scaled = tl.exp(z - lse) * scale
            grad = tl.where(offs == t, scale - p_scaled, -p_scaled)
            tl.store(drow_ptr + offs, grad.to(dlogits_ptr.dtype.element_ty), mask=valid)

    _INTERPRETED = type(_logprob_kl_fwd_kernel).__name__ == "InterpretedFunction"
else:  # pragma: no cover
    _INTERPRETED = False


def triton_available() -> bool:
    """True if triton imported (kernels usable on CUDA, or on CPU when interpreted)."""
    return triton is not None


def uses_triton(device: torch.device | str) -> bool:
    """Whether :func:`fused_logprob_kl` takes the Triton path for tensors on ``device``."""
    device = torch.device(device)
    if triton is None:
        return False
    if device.type == "cuda":
        return True
    return device.type == "cpu" and _INTERPRETED


def triton_compiles(device: torch.device | str) -> bool:
    """Whether the Triton path on ``device`` compiles its kernels (and launchers, with a C
    compiler): on CUDA unless Triton's interpreter runs them."""
    return uses_triton(device) and not _INTERPRETED


def _launch_config(V: int, dtype: torch.dtype) -> tuple[int, int]:
    """(BLOCK_V, num_warps): 16 KB of logits per loop iteration, whole row if shorter."""
    block = min(triton.next_power_of_2(V), 16384 // torch.empty((), dtype=dtype).element_size())
    block = int(TRITON_CONFIG_OVERRIDE.get("block_v", block))
    warps = int(TRITON_CONFIG_OVERRIDE.get("num_warps", 8 if block >= 2048 else 4))
    return block, warps


def _device_ctx(t: torch.Tensor):
    import contextlib

    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


def _triton_forward(logits, targets, ref, temperature):
    N, V = logits.shape
    f32 = dict(dtype=torch.float32, device=logits.device)
    logp, lse = torch.empty(N, **f32), torch.empty(N, **f32)
    kl = torch.empty(N, **f32) if ref is not None else None
    block, warps = _launch_config(V, logits.dtype)
    with _device_ctx(logits):
        _logprob_kl_fwd_kernel[(N,)](
            logits, logits.stride(0), targets,
            ref if ref is not None else logp, logp, kl if kl is not None else logp, lse,
            V, 1.0 / temperature,
            HAS_REF=ref is not None, BLOCK_V=block, num_warps=warps, enable_fp_fusion=True,
        )
    return logp, kl, lse


def _triton_backward(logits, targets, ref, lse, g_logp, g_kl, temperature, inplace):
    N, V = logits.shape
    dlogits = logits if inplace else torch.empty_like(logits, memory_format=torch.contiguous_format)
    has_gkl = g_kl is not None and ref is not None
    block, warps = _launch_config(V, logits.dtype)
    with _device_ctx(logits):
        _logprob_kl_bwd_kernel[(N,)](
            logits, logits.stride(0), dlogits, dlogits.stride(0), targets,
            ref if ref is not None else lse, lse,
            g_logp.contiguous() if g_logp is not None else lse,
            g_kl.contiguous() if has_gkl else lse,
            V, 1.0 / temperature,
            HAS_GLOGP=g_logp is not None, HAS_GKL=has_gkl, BLOCK_V=block, num_warps=warps,
            enable_fp_fusion=True,  # FMA contraction (explicit: Triton 3.10 changes the default)
        )
    return dlogits


# --------------------------------------------------------------------------------------------
# Memory-lean PyTorch path (CPU)
# --------------------------------------------------------------------------------------------


def _chunk_rows(V: int) -> int:
    return max(1, int(CPU_CHUNK_BYTES) // (4 * max(V, 1)))


# 1/n! for n = 2..10: k3(d) = exp(d) - d - 1 = d^2 * sum_n d^(n-2) / n!
_K3_COEFFS = (1 / 2, 1 / 6, 1 / 24, 1 / 120, 1 / 720, 1 / 5040, 1 / 40320, 1 / 362880, 1 / 3628800)


def k3(d: torch.Tensor) -> torch.Tensor:
    """k3 = exp(d) - d - 1 with d = ref - logp, the PyTorch form (the Triton kernel has its own):
    the Taylor series for |d| < 0.5, where the closed form cancels, ``expm1(d) - d`` elsewhere.
    Each branch only sees the values it is used for, so the unused one stays finite and its zero
    gradient cannot become NaN. ``r3.grpo.kl_k3`` is this function of ``ref_logp - logp``."""
    small = d.abs() < _K3_TAYLOR_BELOW
    ds = torch.where(small, d, torch.zeros_like(d))
    p = torch.full_like(ds, _K3_COEFFS[-1])
    for c in reversed(_K3_COEFFS[:-1]):
        p = p * ds + c
    dl = torch.where(small, torch.zeros_like(d), d)
    return torch.where(small, ds * ds * p, torch.expm1(dl) - dl)


def _dk3_dlogp(d: torch.Tensor) -> torch.Tensor:
    """d k3 / d logp = 1 - exp(d) = -expm1(d), d = ref - logp."""
    return -torch.expm1(d)


def _scaled_chunk(x: torch.Tensor, inv_t: float) -> torch.Tensor:
    """The chunk as fp32 logits / temperature (a chunk-sized copy only when temperature != 1)."""
    if inv_t == 1.0:
        return x
    return torch.mul(x.to(torch.float32), inv_t)


def _torch_forward(logits, targets, ref, temperature):
    """Row chunks through log_softmax(dtype=fp32) (PyTorch's fused kernel; for bf16 it upcasts the
    chunk first): only chunk-sized fp32 temporaries ever exist. Returns (logp, kl, logp): the
    PyTorch backward recomputes the softmax from the logits and needs only logp per row."""
    N, V = logits.shape
    inv_t = 1.0 / temperature
    t_ok = (targets >= 0) & (targets < V)
    t_safe = torch.where(t_ok, targets, 0).long()
    logp = torch.empty(N, dtype=torch.float32, device=logits.device)
    rows = _chunk_rows(V)
    for s in range(0, N, rows):
        e = min(N, s + rows)
        lsm = torch.log_softmax(_scaled_chunk(logits[s:e], inv_t), dim=-1, dtype=torch.float32)
        torch.gather(lsm, 1, t_safe[s:e, None], out=logp[s:e, None])
        del lsm
    logp = torch.where(targets < 0, 0.0, torch.where(targets >= V, float("nan"), logp))
    kl = None
    if ref is not None:
        kl = torch.where(targets < 0, 0.0, k3(ref.to(torch.float32) - logp))
    return logp, kl, logp


def _torch_backward(logits, targets, ref, logp, g_logp, g_kl, temperature, inplace):
    N, V = logits.shape
    inv_t = 1.0 / temperature
    t_ok = (targets >= 0) & (targets < V)
    t_safe = torch.where(t_ok, targets, 0).long()
    g = torch.zeros(N, dtype=torch.float32, device=logits.device)
    if g_logp is not None:
        g += g_logp.to(torch.float32)
    if g_kl is not None and ref is not None:
        g += g_kl.to(torch.float32) * _dk3_dlogp(ref.to(torch.float32) - logp)
    scale = torch.where(t_ok, g, 0.0) * inv_t
    # d logits_j = scale * (1[j == t] - p_j). The target column is written separately, from the
    # saved logp in fp32 (1 - p_t = -expm1(logp)), not as a difference of two rounded numbers.
    grad_t = torch.where(t_ok, scale * -torch.expm1(logp), 0.0)[:, None]
    neg_scale = -scale[:, None]

    dlogits = logits if inplace else torch.empty(N, V, dtype=logits.dtype, device=logits.device)
    rows = _chunk_rows(V)
    for s in range(0, N, rows):
        e = min(N, s + rows)
        out = dlogits[s:e]
        p = torch.softmax(_scaled_chunk(logits[s:e], inv_t), dim=-1, dtype=torch.float32)
        if out.dtype == torch.float32:
            torch.mul(p, neg_scale[s:e], out=out)
        else:  # in place then one rounding copy: faster than a mixed-dtype mul on CPU
            out.copy_(p.mul_(neg_scale[s:e]))
        del p
    # the target column, once for all rows (index_put; a scatter_ per chunk copies the chunk)
    dlogits[torch.arange(N, device=logits.device), t_safe] = grad_t.squeeze(1).to(dlogits.dtype)
    return dlogits


# --------------------------------------------------------------------------------------------
# autograd + dispatch
# --------------------------------------------------------------------------------------------


class _LogprobKL(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, targets, ref, temperature, use_triton, inplace_backward):
        fwd = _triton_forward if use_triton else _torch_forward
        # aux: the per-row fp32 state the backward needs (Triton: logsumexp; PyTorch: logp)
        logp, kl, aux = fwd(logits, targets, ref, temperature)
        ctx.save_for_backward(logits, targets, ref, aux)
        ctx.temperature = temperature
        ctx.use_triton = use_triton
        ctx.inplace = inplace_backward
        ctx.set_materialize_grads(False)
        if kl is None:
            kl = logp.new_empty(0)
            ctx.mark_non_differentiable(kl)
        return logp, kl

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g_logp, g_kl):
        logits, targets, ref, aux = ctx.saved_tensors
        if not ctx.needs_input_grad[0] or (g_logp is None and (g_kl is None or ref is None)):
            return None, None, None, None, None, None
        bwd = _triton_backward if ctx.use_triton else _torch_backward
        if ctx.inplace:
            # The logits' storage is about to hold the gradient: make autograd's saved-tensor
            # check fail loudly if another node still needs the logits.
            torch.autograd.graph.increment_version(logits)
        dlogits = bwd(logits, targets, ref, aux, g_logp, g_kl if ref is not None else None,
                      ctx.temperature, ctx.inplace)
        return dlogits, None, None, None, None, None


_warned_no_triton = False


def fused_logprob_kl(
    logits: torch.Tensor,
    targets: torch.Tensor,
    ref_logp: torch.Tensor | None = None,
    temperature: float = 1.0,
    *,
    inplace_backward: bool = False,
    backend: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Log-prob of ``targets`` under ``softmax(logits / temperature)`` and its k3 KL to ``ref_logp``.

    Args:
        logits: ``[N, V]`` (or ``[..., V]``; leading dims are flattened, which copies if they
            cannot be viewed), fp32, bf16 or fp16; last dim contiguous. Never modified, unless
            ``inplace_backward``.
        targets: ``[N]`` integer ids (negative: ignored, see module docstring).
        ref_logp: ``[N]`` reference log-probs (a constant: no gradient flows to it), or None.
        temperature: > 0; applied inside the kernel, gradients include the 1/temperature.
        inplace_backward: write the gradient into the logits' storage instead of a new tensor
            (saves one ``[N, V]`` buffer). Only for logits nothing else needs after this
            backward, e.g. the fresh output of the LM head matmul.
        backend: ``"triton"``, ``"torch"``, or None (auto: Triton for CUDA tensors and for CPU
            tensors when the kernels are interpreted, the chunked PyTorch path otherwise).

    Returns ``(logp, kl)``: fp32 tensors shaped like ``targets``; ``kl`` is
    ``exp(ref - logp) - (ref - logp) - 1`` or None without ``ref_logp``. Both are differentiable
    in ``logits``.

    For training, compute the LM head only where log-probs are needed and pass contiguous
    logits: ``fused_logprob_kl(head(hidden[mask_prev]), tokens[mask])`` rather than slicing
    ``logits[:, :-1]`` (a slice of [B, T, V] cannot be flattened without a copy, and autograd's
    slice backward allocates the full [B, T, V] gradient).
    """
    global _warned_no_triton
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    V = logits.shape[-1]
    lead = logits.shape[:-1]
    if tuple(targets.shape) != tuple(lead):
        raise ValueError(f"targets shape {tuple(targets.shape)} != logits leading shape {tuple(lead)}")
    if targets.is_floating_point() or targets.is_complex():
        raise TypeError("targets must be an integer tensor")
    if not logits.is_floating_point():
        raise TypeError("logits must be a floating-point tensor")
    x = logits.reshape(-1, V)
    if x.stride(-1) != 1:
        x = x.contiguous()
    t = targets.reshape(-1).to(logits.device).contiguous()
    r = None
    if ref_logp is not None:
        if tuple(ref_logp.shape) != tuple(lead):
            raise ValueError(f"ref_logp shape {tuple(ref_logp.shape)} != {tuple(lead)}")
        r = ref_logp.detach().reshape(-1).to(logits.device).contiguous()

    if backend is None:
        use_triton = uses_triton(x.device)
        if x.is_cuda and not use_triton and not _warned_no_triton:
            warnings.warn("triton is not installed: fused_logprob_kl uses the chunked PyTorch path on CUDA")
            _warned_no_triton = True
    elif backend == "triton":
        if not uses_triton(x.device):
            raise RuntimeError(
                "Triton backend needs triton and a CUDA tensor, or TRITON_INTERPRET=1 set before "
                "importing r3.kernels (CPU)"
            )
        use_triton = True
    elif backend == "torch":
        use_triton = False
    else:
        raise ValueError(f"backend must be 'triton', 'torch' or None, got {backend!r}")

    if x.shape[0] == 0:
        logp = x.sum(dim=-1, dtype=torch.float32)  # empty, still attached to the graph
        return logp.view(lead), (logp.view(lead).clone() if r is not None else None)

    logp, kl = _LogprobKL.apply(x, t, r, float(temperature), use_triton, bool(inplace_backward))
    return logp.view(lead), (kl.view(lead) if r is not None else None)
