"""The Triton kernels of r3/kernels/logprob_kl.py, run by Triton's interpreter on CPU.

Triton decides "interpret or compile" when a kernel is decorated, i.e. when ``r3.kernels`` is
imported, so TRITON_INTERPRET=1 must be set before that import. Other test files of the same
pytest process import ``r3.kernels`` normally; so in a normal run this file has a single test that
re-runs this same file in a fresh ``python -m pytest`` subprocess with TRITON_INTERPRET=1, where
the real tests below are defined. Shapes are small: the interpreter executes each program in
numpy. On a CUDA machine the same checks run through the compiled kernels
(``test_cuda_matches_float64``).
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("triton")

INTERPRETED_CHILD = os.environ.get("TRITON_INTERPRET") == "1"
REPO = Path(__file__).resolve().parents[1]


if not INTERPRETED_CHILD:

    def test_triton_interpreter_suite():
        env = dict(os.environ, TRITON_INTERPRET="1")
        proc = subprocess.run(
            [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(Path(__file__).resolve())],
            cwd=REPO, env=env, capture_output=True, text=True, timeout=600,
        )
        out = proc.stdout[-8000:] + proc.stderr[-4000:]
        if proc.returncode and "only 0-dimensional arrays can be converted to Python scalars" in out:
            import numpy
            import triton

            # Triton 3.6's interpreter reads a loop bound with int() of a 1-element array, which
            # NumPy >= 2.4 refuses (later Tritons squeeze it first): nothing the kernels can change.
            pytest.skip(f"Triton {triton.__version__}'s interpreter cannot run a loop over a runtime bound "
                        f"with NumPy {numpy.__version__}")
        assert proc.returncode == 0, out
        assert " passed" in proc.stdout and "skipped" not in proc.stdout, out

    @pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
    @pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
    @pytest.mark.parametrize("V", [4099, 151936])
    def test_cuda_matches_float64(dtype, V):
        from r3.kernels.logprob_kl import fused_logprob_kl, logprob_kl_reference, uses_triton

        assert uses_triton("cuda")
        g = torch.Generator().manual_seed(0)
        N = 64
        logits = (torch.randn(N, V, generator=g) * 3).to(dtype)
        targets = torch.randint(0, V, (N,), generator=g)
        noise = 0.3 * torch.randn(N, generator=g, dtype=torch.float64)
        ref = (logprob_kl_reference(logits.double(), targets)[0] + noise).float()
        x = logits.cuda().requires_grad_()
        logp, kl = fused_logprob_kl(x, targets.cuda(), ref.cuda(), 0.8)
        (logp.sum() + 0.5 * kl.sum()).backward()
        x64 = logits.double().requires_grad_()
        lp64, kl64 = logprob_kl_reference(x64, targets, ref.double(), 0.8)
        (lp64.sum() + 0.5 * kl64.sum()).backward()
        torch.testing.assert_close(logp.cpu().double(), lp64, rtol=0, atol=1e-5)
        torch.testing.assert_close(kl.cpu().double(), kl64, rtol=1e-4, atol=1e-5)
        rtol, atol = (1e-4, 1e-6) if dtype == torch.float32 else (1.6e-2, 1e-5)
        torch.testing.assert_close(x.grad.cpu().double(), x64.grad, rtol=rtol, atol=atol)

else:
    import r3.kernels.logprob_kl as lk
    from r3.kernels.logprob_kl import fused_logprob_kl, logprob_kl_reference

    GRAD_TOL = {torch.float32: (1e-4, 1e-6), torch.bfloat16: (1.6e-2, 1e-5)}

    def make_case(N, V, dtype, seed=0):
        g = torch.Generator().manual_seed(seed)
        logits = (torch.randn(N, V, generator=g) * 3).to(dtype)
        targets = torch.randint(0, V, (N,), generator=g)
        true = logprob_kl_reference(logits.double(), targets)[0]
        ref = (true + torch.randn(N, generator=g, dtype=torch.float64) * 0.3).float()
        ref[:2] += torch.tensor([2.0, -3.0])
        return logits, targets, ref

    def test_kernels_are_interpreted():
        assert lk._INTERPRETED and lk.uses_triton("cpu")
        # interpreted on CUDA too: nothing compiled, so training needs no C compiler for them
        assert lk.uses_triton("cuda") and not lk.triton_compiles("cuda") and not lk.triton_compiles("cpu")

    @pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
    @pytest.mark.parametrize("V,block", [(300, 128), (4099, 1024), (4099, None)])
    @pytest.mark.parametrize("temperature", [1.0, 0.7])
    @pytest.mark.parametrize("with_ref", [False, True])
    def test_triton_matches_float64_and_torch_path(dtype, V, block, temperature, with_ref, monkeypatch):
        if block is not None:  # several vocab blocks, ragged last block
            monkeypatch.setitem(lk.TRITON_CONFIG_OVERRIDE, "block_v", block)
        logits, targets, ref = make_case(8, V, dtype)
        ref = ref if with_ref else None
        g = torch.Generator().manual_seed(1)
        w_lp, w_kl = torch.randn(8, generator=g), torch.randn(8, generator=g)

        results = {}
        for backend in ("triton", "torch"):
            x = logits.clone().requires_grad_()
            logp, kl = fused_logprob_kl(x, targets, ref, temperature, backend=backend)
            loss = (logp * w_lp).sum() + ((kl * w_kl).sum() if kl is not None else 0)
            loss.backward()
            results[backend] = (logp, kl, x.grad)
            assert torch.equal(x.detach(), logits)  # caller's logits untouched

        x64 = logits.double().requires_grad_()
        lp64, kl64 = logprob_kl_reference(x64, targets, None if ref is None else ref.double(), temperature)
        (((lp64 * w_lp.double()).sum()) + ((kl64 * w_kl.double()).sum() if kl64 is not None else 0)).backward()

        logp, kl, grad = results["triton"]
        assert logp.dtype == torch.float32 and grad.dtype == dtype
        torch.testing.assert_close(logp.double(), lp64, rtol=0, atol=5e-6)
        if ref is None:
            assert kl is None
        else:
            tol = 1e-6 + 1e-5 * (1 + torch.exp(ref.double() - lp64)).abs()
            assert ((kl.double() - kl64).abs() <= tol).all()
            torch.testing.assert_close(kl, results["torch"][1], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(grad.double(), x64.grad, rtol=GRAD_TOL[dtype][0], atol=GRAD_TOL[dtype][1])
        # the two implementations agree closely (same fp32 algorithm up to summation order)
        torch.testing.assert_close(logp, results["torch"][0], rtol=0, atol=2e-6)
        rtol = 1e-2 if dtype == torch.bfloat16 else 1e-5
        torch.testing.assert_close(grad.float(), results["torch"][2].float(), rtol=rtol, atol=1e-6)

    def test_minus_inf_logits_and_ignored_targets(monkeypatch):
        monkeypatch.setitem(lk.TRITON_CONFIG_OVERRIDE, "block_v", 256)
        logits, targets, ref = make_case(6, 1000, torch.bfloat16)
        logits[:, 900:] = float("-inf")  # vocab padding
        logits[0, :600] = float("-inf")  # a whole first block (and more) of -inf
        targets = targets % 300 + 600 * (torch.arange(6) == 0)
        targets[3] = -100
        x = logits.clone().requires_grad_()
        logp, kl = fused_logprob_kl(x, targets, ref, 1.2, backend="triton")
        (logp.sum() + kl.sum()).backward()
        keep = targets >= 0
        x64 = logits.double().requires_grad_()
        lp64, kl64 = logprob_kl_reference(x64, targets.clamp_min(0), ref.double(), 1.2)
        ((lp64 + kl64) * keep).sum().backward()
        assert torch.isfinite(logp).all() and torch.isfinite(kl).all()
        assert logp[3].item() == 0.0 and kl[3].item() == 0.0
        torch.testing.assert_close(logp[keep].double(), lp64[keep], rtol=0, atol=5e-6)
        torch.testing.assert_close(x.grad.double(), x64.grad, rtol=1.6e-2, atol=1e-5)
        assert torch.equal(x.grad[:, 900:], torch.zeros_like(x.grad[:, 900:]))
        assert torch.equal(x.grad[0, :600], torch.zeros_like(x.grad[0, :600]))
        assert torch.equal(x.grad[3], torch.zeros_like(x.grad[3]))
        targets[1] = 1000
        logp, _ = fused_logprob_kl(logits, targets, None, backend="triton")
        assert torch.isnan(logp[1]) and torch.isfinite(logp[[0, 2, 4, 5]]).all()

    def test_inplace_backward_and_row_stride():
        # logits as a row-slice of a wider buffer: row stride != V
        logits, targets, ref = make_case(5, 700, torch.float32)
        wide = torch.zeros(5, 800)
        wide[:, :700] = logits
        view = wide[:, :700]
        x = view.clone().requires_grad_()
        lp_a, kl_a = fused_logprob_kl(x, targets, ref, backend="triton")
        (lp_a.sum() + kl_a.sum()).backward()
        lp_b, _ = fused_logprob_kl(view, targets, ref, backend="triton")
        torch.testing.assert_close(lp_a, lp_b, rtol=0, atol=0)
        # in place: grad written into the logits' storage, equal to the out-of-place one
        y = logits.clone().requires_grad_()
        z = y * 1.0  # non-leaf whose backward does not need z
        lp_c, kl_c = fused_logprob_kl(z, targets, ref, inplace_backward=True, backend="triton")
        (lp_c.sum() + kl_c.sum()).backward()
        torch.testing.assert_close(y.grad, x.grad, rtol=0, atol=0)
        torch.testing.assert_close(z.detach(), x.grad, rtol=0, atol=0)
        # another node still needs the logits: the kernel writes through a raw pointer, so only the
        # version bump it makes lets autograd refuse (a wrong gradient otherwise)
        w = torch.randn(700, requires_grad=True)
        z = logits.clone().requires_grad_() * 1.0
        other = (z * w).sum()  # saves z
        lp_d, _ = fused_logprob_kl(z, targets, inplace_backward=True, backend="triton")
        with pytest.raises(RuntimeError, match="modified by an inplace operation"):
            (lp_d.sum() + other).backward()

    @pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
    def test_first_and_last_vocab_ids_with_a_one_column_last_block(dtype, monkeypatch):
        """V = 2 * BLOCK_V + 1, so the last block holds a single column, with most of two rows' mass
        in it; targets on id 0 (a real token, not an ignored one) and on id V - 1: log-probs, KL and
        gradients of every row as float64's, and the id-0 column gets its (1 - p) share."""
        monkeypatch.setitem(lk.TRITON_CONFIG_OVERRIDE, "block_v", 128)
        logits, _, ref = make_case(4, 257, dtype)
        logits[1::2, 256] = 12.0
        targets = torch.tensor([0, 0, 256, 256])
        w = torch.tensor([1.0, -2.0, 0.5, 3.0])
        x = logits.clone().requires_grad_()
        logp, kl = fused_logprob_kl(x, targets, ref, backend="triton")
        ((logp + kl) * w).sum().backward()
        x64 = logits.double().requires_grad_()
        lp64, kl64 = logprob_kl_reference(x64, targets, ref.double())
        ((lp64 + kl64) * w.double()).sum().backward()
        torch.testing.assert_close(logp.double(), lp64, rtol=0, atol=5e-6)
        torch.testing.assert_close(kl.double(), kl64, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(x.grad.double(), x64.grad, rtol=GRAD_TOL[dtype][0], atol=GRAD_TOL[dtype][1])
        assert (x.grad[:2, 0] != 0).all()

    def test_small_kl_differences_keep_their_relative_precision():
        """For |ref - logp| << 1, exp(d) - d - 1 (and 1 - exp(d) in the backward) cancels to fp32
        noise: the kernels take the Taylor series there. KL and a KL-only gradient to 1e-5 relative,
        against float64 on the kernel's own logp (so only the k3 evaluation is measured)."""
        logits, targets, _ = make_case(6, 300, torch.float32)
        logp0, _ = fused_logprob_kl(logits, targets, backend="triton")
        ref = (logp0.double() + torch.tensor([1e-4, -3e-4, 1e-3, -2e-3, 0.3, -0.45], dtype=torch.float64)).float()
        d = ref.double() - logp0.double()  # exactly the difference the kernel sees
        x = logits.clone().requires_grad_()
        logp, kl = fused_logprob_kl(x, targets, ref, backend="triton")
        assert torch.equal(logp, logp0)
        err = (kl.detach().double() / (torch.expm1(d) - d) - 1).abs()
        assert (err <= 1e-5).all(), err
        kl.sum().backward()
        onehot = torch.nn.functional.one_hot(targets, 300).double()
        want_grad = -torch.expm1(d)[:, None] * (onehot - torch.softmax(logits.double(), -1))
        torch.testing.assert_close(x.grad.double(), want_grad, rtol=1e-5, atol=1e-12)

    @pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
    def test_logits_far_outside_exps_range(dtype, monkeypatch):
        """Rows of logits around +1000, -1000 and +500 (several blocks): the forward shifts by the
        running max and the backward by the saved logsumexp, so nothing overflows and the values
        are float64's (fp32 spacing near 1250 = 1000 / 0.8 is ~1e-4: looser tolerances)."""
        monkeypatch.setitem(lk.TRITON_CONFIG_OVERRIDE, "block_v", 128)
        logits, targets, ref = make_case(4, 300, torch.float32)
        logits = (logits + torch.tensor([1000.0, -1000.0, 500.0, 0.0])[:, None]).to(dtype)
        x = logits.clone().requires_grad_()
        logp, kl = fused_logprob_kl(x, targets, ref, 0.8, backend="triton")
        (logp.sum() + 0.5 * kl.sum()).backward()
        x64 = logits.double().requires_grad_()
        lp64, kl64 = logprob_kl_reference(x64, targets, ref.double(), 0.8)
        (lp64.sum() + 0.5 * kl64.sum()).backward()
        assert torch.isfinite(logp).all() and torch.isfinite(x.grad.float()).all()
        torch.testing.assert_close(logp.double(), lp64, rtol=0, atol=3e-4)
        rtol = 2e-3 if dtype == torch.float32 else GRAD_TOL[dtype][0]
        torch.testing.assert_close(x.grad.double(), x64.grad, rtol=rtol, atol=1e-5)

    def test_gradient_of_a_row_strided_view(monkeypatch):
        """Logits that are a column slice of a wider tensor (a padded vocab cut to size: row stride
        800, V 700) are read in place; the gradient lands in the slice's columns, zeros elsewhere.
        The block override checks that the tests' multi-block shapes really take effect."""
        logits, targets, ref = make_case(5, 700, torch.float32)
        wide = torch.cat([logits, torch.randn(5, 100)], dim=1).requires_grad_()
        view = wide[:, :700]
        monkeypatch.setitem(lk.TRITON_CONFIG_OVERRIDE, "block_v", 256)
        assert view.stride(0) == 800 and lk._launch_config(700, torch.float32)[0] == 256
        logp, kl = fused_logprob_kl(view, targets, ref, backend="triton")
        (logp.sum() + kl.sum()).backward()
        x64 = logits.double().requires_grad_()
        lp64, kl64 = logprob_kl_reference(x64, targets, ref.double())
        (lp64.sum() + kl64.sum()).backward()
        torch.testing.assert_close(wide.grad[:, :700].double(), x64.grad, rtol=1e-4, atol=1e-6)
        assert torch.equal(wide.grad[:, 700:], torch.zeros(5, 100))
