"""Tests for r3.kernels.fused_logprob_kl (DESIGN.md's kernels.fused_logprob_kl) on its CPU (chunked PyTorch) path.

The Triton kernels themselves are tested in test_kernels_triton_interpret.py (Triton's interpreter
on CPU) and, on a GPU machine, by the same checks run through CUDA.
"""

import os
import subprocess
import sys

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import r3.kernels
import r3.kernels.logprob_kl as lk
from r3.kernels import fused_logprob_kl, logprob_kl_reference


def make_case(N, V, dtype, seed=0, ref_spread=0.3, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(N, V, generator=g) * scale).to(dtype)
    targets = torch.randint(0, V, (N,), generator=g)
    # ref near the true logp (the realistic regime), a few far away
    true = logprob_kl_reference(logits.double(), targets)[0]
    ref = (true + torch.randn(N, generator=g, dtype=torch.float64) * ref_spread).float()
    ref[:2] += torch.tensor([2.0, -3.0])
    return logits, targets, ref


def check_against_float64(logits, targets, ref, temperature, backend, grad_rtol, grad_atol, use_kl=True):
    """Values and gradients of fused_logprob_kl vs float64 log_softmax on the same input values."""
    N = logits.shape[0]
    g = torch.Generator().manual_seed(1)
    w_lp = torch.randn(N, generator=g)
    w_kl = torch.randn(N, generator=g)

    x = logits.clone().requires_grad_()
    logp, kl = fused_logprob_kl(x, targets, ref, temperature, backend=backend)
    assert logp.dtype == torch.float32 and logp.shape == (N,)
    loss = (logp * w_lp).sum()
    if ref is not None:
        assert kl.dtype == torch.float32 and kl.shape == (N,)
        if use_kl:
            loss = loss + (kl * w_kl).sum()
    else:
        assert kl is None
    loss.backward()

    x64 = logits.detach().double().requires_grad_()
    r64 = None if ref is None else ref.double()
    lp64, kl64 = logprob_kl_reference(x64, targets, r64, temperature)
    loss64 = (lp64 * w_lp.double()).sum()
    if ref is not None and use_kl:
        loss64 = loss64 + (kl64 * w_kl.double()).sum()
    loss64.backward()

    # logp: fp32 accumulation over V terms of magnitude up to ~|logits|/T
    torch.testing.assert_close(logp.double(), lp64, rtol=0, atol=5e-6)
    if ref is not None:
        # k3 error is dominated by the logp error times |dk3/dlogp| = |1 - exp(ref - logp)|
        tol = 1e-6 + 1e-5 * (1 + torch.exp(r64 - lp64)).abs()
        assert ((kl.double() - kl64).abs() <= tol).all(), (kl.double() - kl64).abs().max()
    assert x.grad.dtype == logits.dtype and x.grad.shape == logits.shape
    torch.testing.assert_close(x.grad.double(), x64.grad, rtol=grad_rtol, atol=grad_atol)
    return x


GRAD_TOL = {torch.float32: (1e-4, 1e-6), torch.bfloat16: (1.6e-2, 1e-5)}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("V", [300, 4099])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("with_ref", [False, True])
def test_cpu_path_matches_float64(dtype, V, temperature, with_ref, monkeypatch):
    # 3-row chunks: several chunks and a ragged last one
    monkeypatch.setattr(lk, "CPU_CHUNK_BYTES", 3 * V * 4)
    logits, targets, ref = make_case(11, V, dtype)
    check_against_float64(logits, targets, ref if with_ref else None, temperature, "torch", *GRAD_TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cpu_path_real_vocab_151936(dtype):
    logits, targets, ref = make_case(4, 151936, dtype, scale=2.0)
    check_against_float64(logits, targets, ref, 1.0, None, *GRAD_TOL[dtype])


def test_gradient_through_kl_only_and_logp_only():
    logits, targets, ref = make_case(6, 257, torch.float32)
    for use in ("kl", "logp"):
        x = logits.clone().requires_grad_()
        logp, kl = fused_logprob_kl(x, targets, ref, backend="torch")
        (kl.sum() if use == "kl" else logp.sum()).backward()
        x64 = logits.double().requires_grad_()
        lp64, kl64 = logprob_kl_reference(x64, targets, ref.double())
        (kl64.sum() if use == "kl" else lp64.sum()).backward()
        torch.testing.assert_close(x.grad.double(), x64.grad, rtol=1e-4, atol=1e-6)


def test_masked_vocab_minus_inf():
    # padded vocab entries set to -inf: finite logp, exactly zero gradient there
    logits, targets, ref = make_case(5, 1000, torch.bfloat16)
    logits[:, 900:] = float("-inf")
    logits[0, :450] = float("-inf")
    targets = targets % 450 + 450 * (torch.arange(5) == 0)
    x = check_against_float64(logits, targets, ref, 1.3, "torch", *GRAD_TOL[torch.bfloat16])
    assert torch.equal(x.grad[:, 900:], torch.zeros_like(x.grad[:, 900:]))
    assert torch.equal(x.grad[0, :450], torch.zeros_like(x.grad[0, :450]))


def test_negative_targets_are_ignored_and_too_large_targets_are_nan():
    logits, targets, ref = make_case(4, 50, torch.float32)
    targets[1] = -100
    x = logits.clone().requires_grad_()
    logp, kl = fused_logprob_kl(x, targets, ref)
    assert logp[1].item() == 0.0 and kl[1].item() == 0.0
    (logp.sum() + kl.sum()).backward()
    assert torch.equal(x.grad[1], torch.zeros(50))
    assert x.grad[0].abs().sum() > 0
    targets[2] = 50
    x.grad = None
    logp, kl = fused_logprob_kl(x, targets, ref)
    assert torch.isnan(logp[2]) and torch.isfinite(logp[[0, 1, 3]]).all()
    (logp.sum() + kl[[0, 1, 3]].sum()).backward()  # (a gradient reaches the NaN row too)
    assert torch.equal(x.grad[1], torch.zeros(50)) and torch.equal(x.grad[2], torch.zeros(50))
    assert torch.isfinite(x.grad).all() and x.grad[3].abs().sum() > 0


def test_target_id_0_is_a_real_token():
    """Only negative targets are ignored: id 0 (a real token, e.g. SmolLM2's <|endoftext|>) gets
    its log-prob, its KL and its gradient like any other id."""
    logits, targets, ref = make_case(4, 50, torch.float32)
    targets[1] = 0
    x = check_against_float64(logits, targets, ref, 1.0, "torch", *GRAD_TOL[torch.float32])
    assert x.grad[1].abs().sum() > 0
    logp, kl = fused_logprob_kl(logits, targets, ref, backend="torch")
    assert logp[1].item() < 0 and kl[1].item() > 0


def test_caller_logits_not_mutated_and_leading_dims():
    logits, targets, ref = make_case(12, 97, torch.bfloat16)
    x = logits.view(3, 4, 97).clone().requires_grad_()
    before = x.detach().clone()
    logp, kl = fused_logprob_kl(x, targets.view(3, 4), ref.view(3, 4), 0.9)
    assert logp.shape == (3, 4) and kl.shape == (3, 4)
    (logp.sum() + kl.sum()).backward()
    assert torch.equal(x.detach(), before)
    lp2, _ = fused_logprob_kl(logits, targets, ref, 0.9)
    torch.testing.assert_close(logp.reshape(-1), lp2, rtol=0, atol=0)


def test_inplace_backward():
    _, targets, ref = make_case(9, 333, torch.float32)
    W = torch.randn(16, 333, dtype=torch.float32, requires_grad=True)
    h = torch.randn(9, 16)
    want_W = None
    for inplace in (False, True):
        W.grad = None
        z = h @ W  # fresh LM-head output: nothing else needs it after our backward
        logp, kl = fused_logprob_kl(z, targets, ref, inplace_backward=inplace)
        (logp.sum() + 0.5 * kl.sum()).backward()
        if inplace:
            torch.testing.assert_close(W.grad, want_W, rtol=1e-5, atol=1e-6)
            assert not torch.equal(z.detach(), h @ W.detach())  # the storage now holds the gradient
        else:
            want_W = W.grad.clone()
    # if another node still needs the logits, autograd must refuse
    w = torch.randn(333, requires_grad=True)
    z = h @ W
    other = (z * w).sum()  # saves z
    logp, _ = fused_logprob_kl(z, targets, inplace_backward=True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        (logp.sum() + other).backward()


def test_empty_and_bad_arguments():
    x = torch.zeros(0, 10, requires_grad=True)
    logp, kl = fused_logprob_kl(x, torch.zeros(0, dtype=torch.long), torch.zeros(0))
    assert logp.shape == (0,) and kl.shape == (0,)
    logp.sum().backward()
    logits, targets, _ = make_case(2, 10, torch.float32)
    with pytest.raises(ValueError):
        fused_logprob_kl(logits, targets, temperature=0.0)
    with pytest.raises(ValueError):
        fused_logprob_kl(logits, targets[:1])
    with pytest.raises(TypeError):
        fused_logprob_kl(logits, targets.float())
    with pytest.raises(ValueError):
        fused_logprob_kl(logits, targets, backend="cuda")
    if not lk.uses_triton("cpu"):
        with pytest.raises(RuntimeError):
            fused_logprob_kl(logits, targets, backend="triton")


def test_which_devices_compile_triton_kernels():
    """Compiled (so a C compiler is needed) on CUDA only, and not when the interpreter runs them
    (TRITON_INTERPRET=1 set before the import), where the CPU takes the Triton path instead."""
    if not lk.triton_available():
        pytest.skip("needs triton")
    probe = "from r3.kernels import logprob_kl as lk; print(lk.triton_compiles('cuda'), lk.triton_compiles('cpu'), " \
            "lk.uses_triton('cpu'))"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    seen = {}
    for interpret in ("", "1"):
        run_env = dict(env, **({"TRITON_INTERPRET": interpret} if interpret else {}))
        proc = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, env=run_env, timeout=300)
        assert proc.returncode == 0, proc.stderr[-2000:]
        seen[interpret] = proc.stdout.split()
    assert seen == {"": ["True", "False", "False"], "1": ["False", "False", "True"]}


def test_package_exports():
    """The code is r3.kernels'; the top-level ``kernels`` (DESIGN.md's contract name) is the same
    functions (also where it is Hugging Face's package with r3's names added: tests/test_layout.py)."""
    import kernels

    if not hasattr(kernels, "fused_logprob_kl"):
        pytest.skip(f"'import kernels' finds another package ahead of this checkout: {kernels.__file__}")
    import kernels.logprob_kl

    for mod in (r3.kernels, kernels):
        assert mod.fused_logprob_kl is lk.fused_logprob_kl
        assert mod.logprob_kl_reference is lk.logprob_kl_reference
        assert mod.k3 is lk.k3
    assert kernels.logprob_kl is lk and sys.modules["kernels.logprob_kl"] is lk


class _RecordAllocations(TorchDispatchMode):
    """Records dtype and size of every tensor any aten op returns (forward and backward)."""

    def __init__(self):
        super().__init__()
        self.outputs = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.outputs.append((str(func), t.dtype, t.numel(), t.untyped_storage().nbytes()))
        return out

    def largest(self, dtype):
        return max((nb for _, dt, _, nb in self.outputs if dt == dtype), default=0)


@pytest.mark.parametrize("backend", ["torch", "reference"])
def test_cpu_path_never_builds_full_fp32_tensor(backend, monkeypatch):
    N, V = 64, 8192
    monkeypatch.setattr(lk, "CPU_CHUNK_BYTES", 8 * V * 4)  # 8-row chunks
    logits, targets, ref = make_case(N, V, torch.bfloat16)
    x = logits.clone().requires_grad_()
    full_fp32 = N * V * 4
    with _RecordAllocations() as rec:
        if backend == "torch":
            logp, kl = fused_logprob_kl(x, targets, ref, 0.8, backend="torch")
        else:
            logp, kl = logprob_kl_reference(x, targets, ref, 0.8)
        (logp.sum() + kl.sum()).backward()
    assert len(rec.outputs) > 5  # the recorder saw the ops (forward and backward)
    assert x.grad is not None and x.grad.dtype == torch.bfloat16
    if backend == "torch":
        # every fp32 tensor is at most one chunk; the only [N, V] tensor is the bf16 gradient
        assert rec.largest(torch.float32) <= 8 * V * 4
        assert rec.largest(torch.bfloat16) == N * V * 2
    else:
        # the naive reference does build [N, V] fp32 tensors: the recorder would catch it
        assert rec.largest(torch.float32) >= full_fp32


@pytest.mark.skipif(not lk.triton_available() or lk._INTERPRETED, reason="needs triton (compiled mode)")
@pytest.mark.parametrize("dtype", ["bf16", "fp32"])
def test_triton_kernels_compile_for_h100(dtype):
    """Compile both kernels (all constexpr variants) to sm_90 PTX/cubin: no GPU needed.

    Catches compiled-mode errors the interpreter does not see, and checks that 16-byte aligned rows
    give 128-bit vector loads (forward) and loads + stores (backward).
    """
    import re

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    target = GPUTarget("cuda", 90, 32)
    opts = triton.compiler.make_backend(target).parse_options({"num_warps": 8, "enable_fp_fusion": True}).__dict__
    aligned = lambda n: {(i,): [["tt.divisibility", 16]] for i in range(n)}  # noqa: E731
    block = 16384 // (2 if dtype == "bf16" else 4)
    fwd_sig = {"logits_ptr": f"*{dtype}", "logits_row_stride": "i32", "targets_ptr": "*i64", "ref_ptr": "*fp32",
               "logp_ptr": "*fp32", "kl_ptr": "*fp32", "lse_ptr": "*fp32", "V": "i32", "inv_temp": "fp32",
               "HAS_REF": "constexpr", "BLOCK_V": "constexpr"}
    for has_ref in (False, True):
        src = ASTSource(lk._logprob_kl_fwd_kernel, fwd_sig, {"HAS_REF": has_ref, "BLOCK_V": block}, aligned(8))
        ptx = triton.compile(src, target=target, options=opts).asm["ptx"]
        assert "ld.global.v4" in ptx
    bwd_sig = {"logits_ptr": f"*{dtype}", "logits_row_stride": "i32", "dlogits_ptr": f"*{dtype}",
               "dlogits_row_stride": "i32", "targets_ptr": "*i64", "ref_ptr": "*fp32", "lse_ptr": "*fp32",
               "glogp_ptr": "*fp32", "gkl_ptr": "*fp32", "V": "i32", "inv_temp": "fp32",
               "HAS_GLOGP": "constexpr", "HAS_GKL": "constexpr", "BLOCK_V": "constexpr"}
    for hg, hk in ((True, False), (False, True), (True, True)):
        consts = {"HAS_GLOGP": hg, "HAS_GKL": hk, "BLOCK_V": block}
        src = ASTSource(lk._logprob_kl_bwd_kernel, bwd_sig, consts, aligned(11))
        ptx = triton.compile(src, target=target, options=opts).asm["ptx"]
        assert re.search(r"ld\.global\.v4", ptx) and re.search(r"st\.global\.v4", ptx)


def test_benchmark_smoke(tmp_path):
    """The benchmark script runs end to end on a tiny grid and writes its JSON and table."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    out_json, out_md = tmp_path / "b.json", tmp_path / "b.md"
    proc = subprocess.run(
        [sys.executable, str(repo / "benchmarks" / "bench_kernels.py"), "--device", "cpu", "--n", "64",
         "--v", "1000", "--dtype", "fp32", "bf16", "--providers", "eager", "r3", "--repeats", "1",
         "--warmup", "0", "--json", str(out_json), "--md", str(out_md)],
        cwd=repo, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    res = json.loads(out_json.read_text())["results"]
    assert len(res) == 4 and all(r["fwd_s"] > 0 and r["fwd_bwd_gbps"] > 0 for r in res)
    assert "| r3 | bf16 | 64 | 1000 |" in out_md.read_text()


def test_argument_checks_name_what_is_wrong():
    """Shapes must match, not just sizes (targets [2, 3] for logits [3, 2, V] were read in the
    wrong order); a reference of another shape is not broadcast; integer logits and the Triton
    backend where it cannot run are refused with their own messages."""
    logits, targets, ref = make_case(6, 10, torch.float32)
    with pytest.raises(ValueError, match=r"targets shape \(2, 3\) != logits leading shape \(3, 2\)"):
        fused_logprob_kl(logits.view(3, 2, 10), targets.view(2, 3))
    with pytest.raises(ValueError, match=r"ref_logp shape \(1,\) != \(6,\)"):
        fused_logprob_kl(logits, targets, ref[:1])
    with pytest.raises(TypeError, match="logits must be a floating-point tensor"):
        fused_logprob_kl(logits.long(), targets)
    if not lk.uses_triton("cpu"):
        with pytest.raises(RuntimeError, match="Triton backend needs triton and a CUDA tensor"):
            fused_logprob_kl(logits, targets, backend="triton")


def test_k3_gradient_stays_finite_far_outside_the_series_range():
    """Each branch of k3 sees only the values it is used for: at d = -1e6 the Taylor series
    (its polynomial ~ d^8 / 10!) would overflow float32, and the zero gradient of the unused branch
    times inf would be NaN. dk3/dd = expm1(d) everywhere."""
    d = torch.tensor([-1e6, -60.0, -0.3, 0.0, 0.4, 30.0], requires_grad=True)
    k = lk.k3(d)
    k.sum().backward()
    assert torch.isfinite(k).all() and k[0].item() == pytest.approx(1e6 - 1, rel=1e-6)
    torch.testing.assert_close(d.grad, torch.expm1(d.detach()), rtol=1e-5, atol=1e-7)


def test_k3_in_fp32_is_accurate_for_small_and_moderate_differences():
    """The series covers |d| < 0.5: expm1(d) - d alone loses ~1e-6 of relative accuracy there
    (2e-6 at |d| = 0.05); with the series the fp32 k3 stays within 5e-7 of float64."""
    d = torch.linspace(-0.5, 0.5, 2001, dtype=torch.float32)
    d = d[d != 0]
    want = torch.expm1(d.double()) - d.double()
    rel = ((lk.k3(d).double() - want).abs() / want.abs()).max().item()
    assert rel < 5e-7, rel


# ----------------------------------------------------------------------------- mutation round 14a


def test_a_chunk_budget_below_one_row_still_takes_one_row_per_chunk(monkeypatch):
    """With a vocabulary whose one fp32 row exceeds CPU_CHUNK_BYTES (V > 2M at the default 8 MB)
    each chunk is one row: the same values and gradients, not a zero-row step (an endless or
    refused loop)."""
    monkeypatch.setattr(lk, "CPU_CHUNK_BYTES", 16)
    assert lk._chunk_rows(300) == 1
    logits, targets, ref = make_case(5, 300, torch.float32)
    check_against_float64(logits, targets, ref, 0.8, "torch", *GRAD_TOL[torch.float32])


@pytest.mark.parametrize("ref_dtype", [torch.float64, torch.bfloat16])
def test_a_reference_in_another_dtype_still_gives_float32_results(ref_dtype):
    """The contract's results are fp32 whatever the reference's dtype (a float64 ref_logp must
    not turn the KL into float64, where the caller's fp32 buffers expect fp32), with the values
    and gradients of the reference as given, to fp32 accuracy."""
    logits, targets, ref = make_case(7, 129, torch.float32)
    x = logits.clone().requires_grad_()
    logp, kl = fused_logprob_kl(x, targets, ref.to(ref_dtype), 0.9, backend="torch")
    assert logp.dtype == torch.float32 and kl.dtype == torch.float32
    (logp.sum() + kl.sum()).backward()
    x64 = logits.double().requires_grad_()
    lp64, kl64 = logprob_kl_reference(x64, targets, ref.to(ref_dtype).double(), 0.9)
    (lp64.sum() + kl64.sum()).backward()
    torch.testing.assert_close(kl.double(), kl64, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(x.grad.double(), x64.grad, rtol=1e-4, atol=1e-6)


def test_k3_in_fp32_is_accurate_on_both_sides_of_the_series_bound():
    """Beyond |d| = 0.5 the closed form takes over: the truncated series (to d^10 / 10!) used
    further out would be off by ~6e-4 of k3 at d = -1.9; across [-8, 8] the fp32 k3 stays within
    1e-6 of float64."""
    d = torch.linspace(-8.0, 8.0, 1601, dtype=torch.float32)
    d = d[d != 0]
    want = torch.expm1(d.double()) - d.double()
    rel = ((lk.k3(d).double() - want).abs() / want.abs()).max().item()
    assert rel < 1e-6, rel


def test_a_reference_of_the_right_size_but_another_shape_is_refused():
    """ref_logp must have the targets' shape, not just their number of elements: a [2, 3]
    reference for [3, 2] targets would be flattened in the wrong order and pair each token
    with another token's reference log-prob."""
    logits, targets, ref = make_case(6, 10, torch.float32)
    with pytest.raises(ValueError, match=r"ref_logp shape \(2, 3\) != \(3, 2\)"):
        fused_logprob_kl(logits.view(3, 2, 10), targets.view(3, 2), ref.view(2, 3))
