"""r3.rms_norm: the RMS norms that keep their input for the backward pass. Their values are the
plain ops' bit for bit; their gradients are autograd's through the plain ops (fp64), no less
accurate in bf16, and they keep only the input (and gate) and one fp32 value per row."""

import pytest
import torch

from r3 import rms_norm as rn

CASES = [(style, True) for style in rn.STYLES] + [("", False), ("gemma4", False), ("gated", True)]


def _inputs(style, weighted, dtype, shape=(3, 5, 64), seed=0, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    x = (scale * torch.randn(*shape, generator=g)).to(dtype)
    w = (0.5 + torch.randn(shape[-1], generator=g)).to(dtype) if weighted else None
    z = torch.randn(*shape, generator=g).to(dtype) if style == "gated" else None
    return x, w, z


def _ours(style, x, w, z, eps=1e-6):
    return rn.gated_rms_norm(x, z, w, eps) if style == "gated" else rn.rms_norm(x, w, eps, style)


def _plain(style, x, w, z, eps=1e-6):
    return rn._plain_gated_rms_norm(x, z, w, eps) if style == "gated" else rn._plain_rms_norm(x, w, eps, style)


def _grads(fn, style, x, w, z, gy, eps=1e-6):
    leaves = [t.detach().clone().requires_grad_() if t is not None else None for t in (x, w, z)]
    out = fn(style, *leaves, eps=eps)
    return out, torch.autograd.grad(out, [t for t in leaves if t is not None], gy)


@pytest.mark.parametrize("style,weighted", CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_values_are_the_plain_ops_bit_for_bit_with_and_without_autograd(style, weighted, dtype):
    x, w, z = _inputs(style, weighted, dtype)
    ref = _plain(style, x, w, z)
    with torch.no_grad():
        assert torch.equal(_ours(style, x, w, z), ref)
    for eps in (1e-6, 0.5):  # (a large eps is really used)
        y, _ = _grads(_ours, style, x, w, z, torch.ones(x.shape, dtype=dtype), eps=eps)
        assert type(y.grad_fn).__name__ == "_RecomputedRMSNormBackward"
        assert y.dtype == dtype and torch.equal(y.detach(), _plain(style, x, w, z, eps=eps)), eps


@pytest.mark.parametrize("style,weighted", CASES)
def test_gradients_are_autograds_through_the_plain_ops_in_fp64(style, weighted):
    x, w, z = _inputs(style, weighted, torch.float64, shape=(2, 3, 4, 32))
    x[0, 1] = 0.0  # (a zero row: its rms is sqrt(eps))
    gy = torch.randn(x.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    y, ours = _grads(_ours, style, x, w, z, gy)
    ref_y, ref = _grads(_plain, style, x, w, z, gy)
    assert torch.equal(y, ref_y)
    for a, b in zip(ours, ref, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("style,weighted", [("", True), ("gemma", True), ("gemma4", False), ("gated", True)])
def test_gradcheck(style, weighted):
    x, w, z = _inputs(style, weighted, torch.float64, shape=(2, 3, 8), scale=1.0)
    leaves = [t.requires_grad_() for t in (x, w, z) if t is not None]

    def fn(*ts):
        it = iter(ts)
        return _ours(style, *[next(it) if t is not None else None for t in (x, w, z)], eps=1e-3)

    assert torch.autograd.gradcheck(fn, leaves)


@pytest.mark.parametrize("style,weighted", CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gradients_are_no_less_accurate_than_autograds(style, weighted, dtype):
    """Against fp64 gradients from the same (rounded) inputs, ours err no more than autograd's
    through the plain ops (bf16: which rounds each intermediate; ours round once), within 10%."""
    x, w, z = _inputs(style, weighted, dtype, shape=(64, 256), seed=3)
    gy = torch.randn(x.shape, generator=torch.Generator().manual_seed(4)).to(dtype)
    up = [t.double() if t is not None else None for t in (x, w, z)]
    _, truth = _grads(_plain, style, *up, gy.double())
    _, ours = _grads(_ours, style, x, w, z, gy)
    _, plain = _grads(_plain, style, x, w, z, gy)
    for a, b, t in zip(ours, plain, truth, strict=True):
        assert a.dtype == b.dtype == dtype
        err_ours, err_plain = ((a.double() - t).abs().max() / t.abs().max()).item(), \
            ((b.double() - t).abs().max() / t.abs().max()).item()
        assert err_ours <= 1.1 * err_plain + (1e-7 if dtype == torch.float32 else 0.0), (err_ours, err_plain)
        assert err_ours < (1e-6 if dtype == torch.float32 else 8e-3)


@pytest.mark.parametrize("style,weighted", CASES)
def test_only_some_inputs_need_gradients(style, weighted):
    """A frozen weight (or a gate without gradients) gets none, and the rest are the same."""
    x, w, z = _inputs(style, weighted, torch.float64)
    gy = torch.randn(x.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    _, full = _grads(_ours, style, x, w, z, gy)
    xs = x.clone().requires_grad_()
    y = _ours(style, xs, w, z)  # (the weight and gate as they are: no gradients)
    assert y.grad_fn is not None
    (gx,) = torch.autograd.grad(y, xs, gy)
    assert torch.equal(gx, full[0])
    if weighted:
        ws = w.clone().requires_grad_()
        (gw,) = torch.autograd.grad(_ours(style, x, ws, z), ws, gy)
        assert torch.equal(gw, full[1])


@pytest.mark.parametrize("style,weighted", CASES)
def test_keeps_its_input_and_one_fp32_value_per_row(style, weighted):
    """bf16 [2, 48, 256]: the norm keeps x (and the gate) and 4 bytes per row; autograd through
    the plain ops keeps 2 (no weight), 4 (Llama), 6 (fp32-scaled) or 12 (gated) bytes per value
    more (the fp32 upcast instead of x, and fp32 or rounded normalised values)."""
    x, w, z = _inputs(style, weighted, torch.bfloat16, shape=(2, 48, 256))

    def saved(fn):
        leaves = [t.clone().requires_grad_() if t is not None else None for t in (x, w, z)]
        weight = leaves[1].untyped_storage().data_ptr() if weighted else None
        kept = {}

        def pack(t):
            if t.untyped_storage().data_ptr() != weight:  # (a parameter, not an activation)
                kept[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            fn(style, *leaves)
        return sum(kept.values()), leaves

    ours, leaves = saved(_ours)
    inputs = leaves[0].nbytes + (leaves[2].nbytes if leaves[2] is not None else 0)
    assert ours == inputs + 2 * 48 * 4
    plain, _ = saved(_plain)
    more = {("", True): 4, ("", False): 2, ("gemma4", False): 2, ("gated", True): 12}.get((style, weighted), 6)
    assert plain >= ours + more * x.numel()


def test_a_view_of_a_larger_tensor_and_an_empty_batch():
    base = torch.randn(4, 6, 96, dtype=torch.float64)
    w = torch.randn(32, dtype=torch.float64)
    for x in (base[:, :, 32:64], base[:, :0, :32]):
        gy = torch.randn(x.shape, dtype=torch.float64)
        for style in rn.STYLES:
            y, ours = _grads(_ours, style, x, w, None, gy)
            _, ref = _grads(_plain, style, x, w, None, gy)
            assert y.shape == x.shape
            for a, b in zip(ours, ref, strict=True):
                torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_an_unknown_style_is_refused():
    with pytest.raises(ValueError, match="unknown RMS norm style 'layer'"):
        rn.rms_norm(torch.ones(2, 4), None, 1e-6, "layer")


def test_the_benchmark_writes_its_table_and_json(tmp_path):
    import json
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import bench_rms_norm

    bench_rms_norm.main(["--scale", "0.002", "--repeats", "1", "--rounds", "1", "--device", "cpu",
                         "--json", str(tmp_path / "r.json"), "--md", str(tmp_path / "r.md")])
    rows = json.loads((tmp_path / "r.json").read_text())["rows"]
    assert len(rows) == 2 * len(bench_rms_norm.CASES)
    for r in rows:
        assert r["plain_ms"] > 0 and r["recomputed_ms"] > 0
        # bf16 keeps x (2 bytes) and 4 bytes per row; fp32 keeps x (4 bytes)
        per_row = 4 / r["width"]
        kept = (2 if r["dtype"] == "bf16" else 4) * (2 if r["style"] == "gated" else 1) + per_row
        assert r["recomputed_saved_bytes_per_value"] == pytest.approx(kept)
        assert r["plain_saved_bytes_per_value"] > r["recomputed_saved_bytes_per_value"]
    assert "| Qwen 3.5 gated norm |" in (tmp_path / "r.md").read_text()


@pytest.mark.parametrize("style,weighted", CASES)
def test_an_fp32_weight_and_gate_on_bf16_inputs(style, weighted):
    """Mixed precision (bf16 x, fp32 weight and gate): the values are the plain ops' bit for bit,
    and the fp32 weight's and gate's gradients autograd's through them to fp32 rounding, which pins
    what the weight and the gate scale: the values rounded to x's dtype (Llama's and the gated
    norm's order), not the fp32 normalised values (0.1% apart, within bf16 test tolerances)."""
    x, w, z = _inputs(style, weighted, torch.bfloat16, shape=(64, 256), seed=5)
    w = w.float() if w is not None else None
    z = z.float() if z is not None else None
    out_dtype = _plain(style, x, w, z).dtype  # (Llama's: the fp32 weight's, as the reference's)
    gy = torch.randn(x.shape, generator=torch.Generator().manual_seed(6)).to(out_dtype)
    y, ours = _grads(_ours, style, x, w, z, gy)
    ref_y, ref = _grads(_plain, style, x, w, z, gy)
    assert y.dtype == out_dtype and torch.equal(y, ref_y)
    for a, b in zip(ours[1:], ref[1:], strict=True):
        assert a.dtype == b.dtype == torch.float32
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5 * b.abs().max().item())
    assert ours[0].dtype == torch.bfloat16
    torch.testing.assert_close(ours[0].float(), ref[0].float(), rtol=0, atol=8e-3 * ref[0].abs().max().item())


@pytest.mark.parametrize("style,weighted", CASES)
def test_the_plain_ops_run_without_autograd_and_the_function_for_any_trained_input(style, weighted, monkeypatch):
    """Without autograd (no_grad, or nothing that needs a gradient) the plain ops run (what decoding
    and its compiled step trace); a trained weight or gate alone (a frozen x: the first block's
    norm over frozen embeddings) records the function, which keeps x, not its fp32 intermediates."""
    x, w, z = _inputs(style, weighted, torch.bfloat16)
    trained = [i for i, t in enumerate((x, w, z)) if t is not None]
    for i in trained:
        leaves = [t.clone().requires_grad_(j == i) if t is not None else None for j, t in enumerate((x, w, z))]
        assert type(_ours(style, *leaves).grad_fn).__name__ == "_RecomputedRMSNormBackward", i

    def refused(*args):
        raise AssertionError("the recomputing function ran without autograd")

    monkeypatch.setattr(rn._RecomputedRMSNorm, "forward", staticmethod(refused))
    with torch.no_grad():
        leaves = [t.clone().requires_grad_() if t is not None else None for t in (x, w, z)]
        assert torch.equal(_ours(style, *leaves), _plain(style, x, w, z))
    assert _ours(style, x, w, z).grad_fn is None


@pytest.mark.parametrize("style,weighted", CASES)
def test_the_callers_tensors_are_left_as_they_were(style, weighted):
    """fp32 (where the upcasts are the tensors themselves): the backward pass writes into none of
    gy, x, the weight or the gate, also for a summed output (gy an expanded scalar, stride 0)."""
    x, w, z = _inputs(style, weighted, torch.float32)
    leaves = [t.clone().requires_grad_() if t is not None else None for t in (x, w, z)]
    gy = torch.randn(x.shape, generator=torch.Generator().manual_seed(7))
    kept = [t.detach().clone() if t is not None else None for t in (*leaves, gy)]
    torch.autograd.grad(_ours(style, *leaves), [t for t in leaves if t is not None], gy)
    for a, b in zip((*leaves, gy), kept, strict=True):
        assert a is None or torch.equal(a.detach(), b)
    _, ours = _grads(_ours, style, x, w, z, torch.ones(x.shape).expand(x.shape))
    summed = [t.clone().requires_grad_() if t is not None else None for t in (x, w, z)]
    _ours(style, *summed).sum().backward()
    for a, t in zip(ours, [t for t in summed if t is not None], strict=True):
        assert torch.equal(a, t.grad)


def test_a_double_backward_is_refused():
    """Its backward pass is not differentiable (the reciprocal RMS is kept as a constant): a
    create_graph backward is refused, not differentiated wrongly (the gate's gradient would be)."""
    x, w, z = _inputs("gated", True, torch.float64)
    x, w, z = (t.requires_grad_() for t in (x, w, z))
    with pytest.raises(RuntimeError, match="double backward"):
        torch.autograd.grad(rn.gated_rms_norm(x, z, w), z, torch.ones(x.shape, dtype=x.dtype), create_graph=True)
    (gz,) = torch.autograd.grad(rn.gated_rms_norm(x, z, w), z, torch.ones(x.shape, dtype=x.dtype))
    assert gz.grad_fn is None


@pytest.mark.parametrize("style", ["", "gated"])
def test_torch_compile_traces_it_whole(style):
    """With autograd, under torch.compile(fullgraph=True): no graph break (the backward pass
    compares no data pointers), the same values and gradients as eagerly."""
    x, w, z = _inputs(style, True, torch.bfloat16, shape=(4, 32))
    gy = torch.randn(x.shape, generator=torch.Generator().manual_seed(8)).to(x.dtype)
    torch._dynamo.reset()
    compiled = torch.compile(_ours, backend="eager", fullgraph=True)
    y, got = _grads(lambda *a, eps: compiled(*a, eps=eps), style, x, w, z, gy)
    ref_y, ref = _grads(_ours, style, x, w, z, gy)
    assert torch.equal(y, ref_y) and all(torch.equal(a, b) for a, b in zip(got, ref, strict=True))
