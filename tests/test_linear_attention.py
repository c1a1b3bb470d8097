"""Tests for r3.linear_attention (Qwen 3.5's Gated DeltaNet math): against transformers' reference
functions, against a per-token loop of the recurrence in float64, gradients, state passing,
padding, the decode step, the causal conv and the gated RMSNorm."""

from __future__ import annotations

import pytest
import torch

from r3.linear_attention import causal_conv, gated_delta_rule, gated_delta_step, gated_rms_norm, qk_normalize


@pytest.fixture(scope="module")
def hf():
    """transformers' Qwen 3.5 modeling module, for its torch reference functions (on CPU tensors
    its hub-kernel wrappers fall back to them, logging that they do once)."""
    return pytest.importorskip("transformers.models.qwen3_5.modeling_qwen3_5")


def _inputs(B=2, T=20, Hk=2, Hv=4, dk=8, dv=6, *, seed=0, dtype=torch.float32, g_scale=1.0):
    """Random q, k (raw: normalise them yourself), v, g (log decay <= 0), beta in (0, 1) and an
    initial state."""
    gen = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=gen, dtype=dtype)  # noqa: E731
    q, k, v = r(B, T, Hk, dk), r(B, T, Hk, dk), r(B, T, Hv, dv)
    g = -torch.rand(B, T, Hv, generator=gen, dtype=dtype) * g_scale
    beta = torch.rand(B, T, Hv, generator=gen, dtype=dtype)
    return q, k, v, g, beta, r(B, Hv, dk, dv)


def _naive(q, k, v, g, beta, state=None):
    """The recurrence as stated, one token at a time, in float64 (q, k used as given)."""
    B, T, Hk, dk = q.shape
    Hv, dv = v.shape[-2:]
    q, k = (x.double().repeat_interleave(Hv // Hk, dim=2) for x in (q, k))
    v, g, beta = v.double(), g.double(), beta.double()
    S = torch.zeros(B, Hv, dk, dv, dtype=torch.float64) if state is None else state.double()
    outs = []
    for t in range(T):
        S = torch.exp(g[:, t])[..., None, None] * S
        delta = beta[:, t, :, None] * (v[:, t] - torch.einsum("bhkv,bhk->bhv", S, k[:, t]))
        S = S + torch.einsum("bhk,bhv->bhkv", k[:, t], delta)
        outs.append(torch.einsum("bhkv,bhk->bhv", S, q[:, t]))
    return torch.stack(outs, 1), S


def _rel(a, b):
    """Largest absolute difference over the reference's largest magnitude."""
    return ((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-30)).item()


# ----------------------------------------------------------------------------- against transformers


@pytest.mark.parametrize("T", [1, 5, 64, 100, 130])
@pytest.mark.parametrize("Hk,Hv", [(2, 4), (3, 3)])
@pytest.mark.parametrize("chunk_size", [16, 64])
@pytest.mark.parametrize("with_state", [False, True])
def test_matches_transformers_chunk_and_recurrent(hf, T, Hk, Hv, chunk_size, with_state):
    q, k, v, g, beta, S0 = _inputs(T=T, Hk=Hk, Hv=Hv, dk=16, dv=8, seed=T + chunk_size)
    S0 = S0 if with_state else None
    kw = dict(initial_state=S0, output_final_state=True, use_qk_l2norm_in_kernel=True)
    ref_chunk = hf.torch_chunk_gated_delta_rule(q, k, v, g, beta, chunk_size=chunk_size, **kw)
    ref_rec = hf.torch_recurrent_gated_delta_rule(q, k, v, g, beta, **kw)
    o, S = gated_delta_rule(*qk_normalize(q, k), v, g, beta, state=S0, chunk_size=chunk_size)
    assert o.dtype == S.dtype == torch.float32 and o.shape == v.shape and S.shape == (2, Hv, 16, 8)
    for ref_o, ref_S in (ref_chunk, ref_rec):
        assert _rel(o, ref_o) < 1e-5 and _rel(S, ref_S) < 1e-5


def test_qk_normalize_is_transformers_l2norm_and_scaling(hf):
    q, k, *_ = _inputs(dk=16)
    qn, kn = qk_normalize(q.bfloat16(), k.bfloat16())
    assert qn.dtype == kn.dtype == torch.float32
    assert torch.equal(qn, hf.l2norm(q.bfloat16().float(), dim=-1, eps=1e-6) * 16**-0.5)
    assert torch.equal(kn, hf.l2norm(k.bfloat16().float(), dim=-1, eps=1e-6))


# ----------------------------------------------------------------------------- against the recurrence


@pytest.mark.parametrize("g_scale", [0.1, 3.0, 40.0])
def test_matches_naive_loop_float64(g_scale):
    """Weak to very strong decays (g down to -40 per token: a chunk's cumulative decay reaches
    -1000s, where exp(c_t) underflows). fp32 stays within 1e-6 of float64 there only because the
    pairwise decays are summed per pair (a difference of cumulative sums gives ~2e-5)."""
    q, k, v, g, beta, S0 = _inputs(T=130, seed=1, dtype=torch.float64, g_scale=g_scale)
    q, k = qk_normalize(q, k)
    ref_o, ref_S = _naive(q, k, v, g, beta, S0)
    for C in (1, 8, 16, 64):
        o, S = gated_delta_rule(q, k, v, g, beta, state=S0, chunk_size=C)
        assert o.dtype == torch.float64
        assert _rel(o, ref_o) < 1e-12 and _rel(S, ref_S) < 1e-12
        # in fp32 (inputs rounded to fp32 too)
        fp32 = [x.float() for x in (q, k, v, g, beta)]
        o32, S32 = gated_delta_rule(*fp32, state=S0.float(), chunk_size=C)
        assert _rel(o32, ref_o) < 1e-6 and _rel(S32, ref_S) < 1e-6


def test_unnormalised_qk_and_full_beta_match_naive():
    """q, k are used as given (not normalised inside): with |k| != 1 and beta near 1 the (I + L)
    solve is far from the identity."""
    q, k, v, g, beta, S0 = _inputs(T=40, seed=2, dtype=torch.float64, dk=4)
    k = 0.6 * k / k.norm(dim=-1, keepdim=True)
    beta = 0.9 + 0.1 * beta
    ref_o, ref_S = _naive(q, k, v, g, beta, S0)
    o, S = gated_delta_rule(q, k, v, g, beta, state=S0, chunk_size=16)
    assert _rel(o, ref_o) < 1e-12 and _rel(S, ref_S) < 1e-12


# ----------------------------------------------------------------------------- gradients


def test_gradcheck_float64():
    q, k, v, g, beta, S0 = _inputs(B=1, T=5, Hk=1, Hv=2, dk=3, dv=2, seed=3, dtype=torch.float64)
    q, k = qk_normalize(q, k)
    args = [x.clone().requires_grad_() for x in (q, k, v, g, beta, S0)]

    def f(q, k, v, g, beta, S0):
        return gated_delta_rule(q, k, v, g, beta, state=S0, chunk_size=2)  # 3 chunks, the last short

    assert torch.autograd.gradcheck(f, args)


def test_gradients_match_naive_loop():
    q, k, v, g, beta, S0 = _inputs(T=70, seed=4, g_scale=2.0)
    q, k = qk_normalize(q, k)
    gen = torch.Generator().manual_seed(5)
    w_o, w_S = torch.randn(v.shape, generator=gen), torch.randn(S0.shape, generator=gen)

    def grads(fn, dtype):
        xs = [x.detach().to(dtype).clone().requires_grad_() for x in (q, k, v, g, beta, S0)]
        o, S = fn(*xs)
        ((o * w_o.to(dtype)).sum() + (S * w_S.to(dtype)).sum()).backward()
        return [x.grad for x in xs]

    ours = grads(lambda *a: gated_delta_rule(*a[:5], state=a[5], chunk_size=16), torch.float32)
    ref = grads(_naive, torch.float64)
    for name, a, b in zip(("q", "k", "v", "g", "beta", "state"), ours, ref):
        assert _rel(a, b) < 1e-5, name


def _autograd_through_the_chunks(monkeypatch):
    """gated_delta_rule with autograd recording every chunk intermediate (the path the training
    backward replaces)."""
    import r3.linear_attention as la

    monkeypatch.setattr(la._ChunkedRule, "apply", la._rule)


@pytest.mark.parametrize("normalize", [False, True], ids=["given", "normalized_inside"])
@pytest.mark.parametrize("uses", ["both", "outputs", "state"])
@pytest.mark.parametrize("trained", ["all", "v", "state", "q,g"])
def test_training_backward_equals_autograd_through_the_chunks(monkeypatch, uses, trained, normalize):
    """The recomputing backward gives autograd's gradients (float64, to rounding): several chunks
    and a short last one, key heads shared, right padding, an initial state; a loss on the outputs,
    on the final state or on both; any subset of the inputs requiring grad; q and k normalised
    before the call or inside it (``normalize_qk``: the gradients then reach the raw q and k)."""
    q, k, v, g, beta, S0 = _inputs(B=2, T=45, Hk=1, Hv=2, seed=21, dtype=torch.float64, g_scale=2.0)
    if not normalize:
        q, k = qk_normalize(q, k)
    lengths = torch.tensor([45, 30])
    gen = torch.Generator().manual_seed(22)
    w_o, w_S = (torch.randn(x.shape, generator=gen, dtype=torch.float64) for x in (v, S0))
    names = ("q", "k", "v", "g", "beta", "state")
    wants = names if trained == "all" else trained.split(",")

    def grads():
        xs = [x.detach().clone().requires_grad_(n in wants) for n, x in zip(names, (q, k, v, g, beta, S0))]
        o, S = gated_delta_rule(*xs[:5], state=xs[5], lengths=lengths, chunk_size=8, normalize_qk=normalize)
        loss = (o * w_o).sum() * (uses != "state") + (S * w_S).sum() * (uses != "outputs")
        got = torch.autograd.grad(loss, [x for x in xs if x.requires_grad], allow_unused=True)
        return [torch.zeros_like(q) if x is None else x for x in got]

    ours = grads()
    _autograd_through_the_chunks(monkeypatch)
    ref = grads()
    for name, a, b in zip(wants, ours, ref):
        assert (a - b).abs().max() <= 1e-10 * b.abs().max().clamp_min(1e-30), name
    if uses == "state" and trained != "state":
        assert any(b.abs().max() > 0 for b in ref)  # (the final state still reaches the inputs)


@pytest.mark.parametrize("normalize", [False, True], ids=["given", "normalized_inside"])
def test_training_forward_keeps_only_its_inputs_and_each_chunks_starting_state(normalize):
    """What the training forward holds for backward: the chunked q, k, v, g, beta in their own
    dtypes (bf16 v and beta here; q and k fp32 as normalised outside, bf16 as given with
    ``normalize_qk``, whose fp32 normalised copies are not kept; q and k once per key head, not
    per value head) and the state at each chunk's start; autograd through the chunks would hold
    over three times more."""
    B, T, Hk, Hv, dk, dv, C = 2, 40, 2, 4, 8, 6, 16
    q, k, v, g, beta, S0 = _inputs(B=B, T=T, Hk=Hk, Hv=Hv, dk=dk, dv=dv, seed=23)
    qk = (q.bfloat16(), k.bfloat16()) if normalize else qk_normalize(q, k)
    xs = [x.requires_grad_() for x in (*qk, v.bfloat16(), g, beta.bfloat16())]

    def saved_bytes():
        seen = {}

        def pack(t):
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            gated_delta_rule(*xs, chunk_size=C, normalize_qk=normalize)
        return sum(seen.values())

    N = -(-T // C)
    qk_bytes = 2 if normalize else 4  # (per key head: repeated per value head inside)
    kept = B * N * C * (Hk * 2 * dk * qk_bytes + Hv * (dv * 2 + 4 + 2)) + B * Hv * N * dk * dv * 4
    assert saved_bytes() == kept
    with pytest.MonkeyPatch.context() as mp:
        _autograd_through_the_chunks(mp)
        assert saved_bytes() > 3 * kept


def test_normalizing_inside_equals_normalizing_before():
    """``normalize_qk`` is :func:`qk_normalize` then the rule: outputs, final state and the raw
    q and k's gradients (fp64, to rounding), in training and under no_grad."""
    q, k, v, g, beta, S0 = _inputs(B=2, T=37, Hk=2, Hv=4, seed=26, dtype=torch.float64)
    lengths = torch.tensor([37, 20])

    def run(inside):
        xs = [x.detach().clone().requires_grad_() for x in (q, k, v, g, beta, S0)]
        qk = xs[:2] if inside else qk_normalize(*xs[:2])
        o, S = gated_delta_rule(*qk, *xs[2:5], state=xs[5], lengths=lengths, chunk_size=8, normalize_qk=inside)
        (o.sin().sum() + S.cos().sum()).backward()
        with torch.no_grad():
            qk = xs[:2] if inside else qk_normalize(*xs[:2])
            o2, S2 = gated_delta_rule(*qk, *xs[2:5], state=xs[5], lengths=lengths, chunk_size=8, normalize_qk=inside)
        return [o, S, o2, S2] + [x.grad for x in xs]

    for a, b in zip(run(True), run(False)):
        assert _rel(a, b) < 1e-12


@pytest.mark.fresh_process
def test_training_backward_holds_one_chunks_intermediates_at_a_time():
    """The backward pass recomputes each chunk's parts as it reaches the chunk: what it allocates
    beyond what was allocated when it began (glibc mallinfo2 after each op) stays within a few
    times the rule's inputs, where recomputing every chunk at once holds what autograd through the
    chunks keeps (about 9x the inputs here)."""
    import sys
    from pathlib import Path

    from torch.utils._python_dispatch import TorchDispatchMode

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    from memory_plan import allocated_bytes

    B, T, Hk, Hv, dk, dv, C = 1, 512, 2, 4, 32, 32, 16
    q, k, v, g, beta, _ = _inputs(B=B, T=T, Hk=Hk, Hv=Hv, dk=dk, dv=dv, seed=25)
    xs = [x.requires_grad_() for x in (*qk_normalize(q, k), v, g, beta)]

    class Peak(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            self.peak = max(self.peak, allocated_bytes() - self.start)
            return out

    for _ in range(2):  # (the first pass: what kernels allocate once and keep)
        o, _ = gated_delta_rule(*xs, chunk_size=C)
        loss = o.sum()
        peak = Peak()
        peak.start, peak.peak = allocated_bytes(), 0
        with peak:
            torch.autograd.grad(loss, xs)
    assert peak.peak < 3 * B * Hv * T * (dk + dk + dv + 2) * 4


def test_no_grad_forward_takes_the_plain_scan(monkeypatch):
    """Prefill (no grad) does not stack every chunk's state for a backward pass that never comes."""
    import r3.linear_attention as la

    monkeypatch.setattr(la._ChunkedRule, "apply", lambda *a: pytest.fail("the training path under no_grad"))
    q, k, v, g, beta, S0 = (x.requires_grad_() for x in _inputs(T=20, seed=24))
    with torch.no_grad():
        gated_delta_rule(q, k, v, g, beta, state=S0)


# ----------------------------------------------------------------------------- invariances


@pytest.mark.parametrize("T1", [1, 7, 16, 33, 63, 64, 99])
def test_split_with_state_passing_equals_one_call(T1):
    q, k, v, g, beta, S0 = _inputs(T=100, seed=6)
    q, k = qk_normalize(q, k)
    o, S = gated_delta_rule(q, k, v, g, beta, state=S0, chunk_size=16)
    o1, S1 = gated_delta_rule(q[:, :T1], k[:, :T1], v[:, :T1], g[:, :T1], beta[:, :T1], state=S0, chunk_size=16)
    o2, S2 = gated_delta_rule(q[:, T1:], k[:, T1:], v[:, T1:], g[:, T1:], beta[:, T1:], state=S1, chunk_size=16)
    assert _rel(torch.cat([o1, o2], 1), o) < 1e-5 and _rel(S2, S) < 1e-5


def test_chunk_size_invariance():
    q, k, v, g, beta, S0 = _inputs(T=100, seed=7)
    q, k = qk_normalize(q, k)
    o, S = gated_delta_rule(q, k, v, g, beta, state=S0, chunk_size=1)
    for C in (3, 16, 64, 128):
        oc, Sc = gated_delta_rule(q, k, v, g, beta, state=S0, chunk_size=C)
        assert _rel(oc, o) < 1e-5 and _rel(Sc, S) < 1e-5, C


def test_right_padding_matches_the_row_alone():
    """Row 1 (37 valid) and row 2 (1 valid) padded to 100 beside a full row; the padding holds
    garbage, inf and nan, which must reach neither the state nor any output."""
    q, k, v, g, beta, S0 = _inputs(B=3, T=100, seed=8)
    q, k = qk_normalize(q, k)
    lengths = torch.tensor([100, 37, 1])
    pad = torch.arange(100)[None, :] >= lengths[:, None]  # [B, T]
    junk = lambda x, value: x.masked_fill(pad.view(3, 100, *[1] * (x.dim() - 2)), value)  # noqa: E731
    qp, kp, vp = junk(q, float("nan")), junk(k, float("inf")), junk(v, 1e4)
    gp, bp = junk(g, float("-inf")), junk(beta, 7.0)
    for C in (16, 64):
        o, S = gated_delta_rule(qp, kp, vp, gp, bp, state=S0, lengths=lengths, chunk_size=C)
        assert torch.isfinite(o).all() and torch.isfinite(S).all()
        for b, n in enumerate(lengths.tolist()):
            row = [x[b : b + 1, :n] for x in (q, k, v, g, beta)]
            o_b, S_b = gated_delta_rule(*row, state=S0[b : b + 1], chunk_size=C)
            assert _rel(o[b : b + 1, :n], o_b) < 1e-6 and _rel(S[b : b + 1], S_b) < 1e-6


def test_right_padding_gradients_match_the_row_alone():
    """The training update backpropagates through padded rows: the valid positions' gradients
    (and the initial state's) are the unpadded row's, and the padding gets none."""
    q, k, v, g, beta, S0 = _inputs(B=2, T=40, seed=14)
    q, k = qk_normalize(q, k)
    lengths, n = torch.tensor([40, 23]), 23
    gen = torch.Generator().manual_seed(15)
    w_o, w_S = torch.randn(v.shape, generator=gen), torch.randn(S0.shape, generator=gen)
    xs = [x.clone().requires_grad_() for x in (q, k, v, g, beta, S0)]
    o, S = gated_delta_rule(*xs[:5], state=xs[5], lengths=lengths, chunk_size=16)
    ((o * w_o)[:, :n].sum() + (o * w_o)[0, n:].sum() + (S * w_S).sum()).backward()
    row = [x[1:2, :n].clone().requires_grad_() for x in (q, k, v, g, beta)] + [S0[1:2].clone().requires_grad_()]
    o_b, S_b = gated_delta_rule(*row[:5], state=row[5], chunk_size=16)
    ((o_b * w_o[1:2, :n]).sum() + (S_b * w_S[1:2]).sum()).backward()
    for x, x_b in zip(xs[:5], row[:5]):
        assert _rel(x.grad[1:2, :n], x_b.grad) < 1e-5
        assert not x.grad[1, n:].any()
    assert _rel(xs[5].grad[1:2], row[5].grad) < 1e-5


def test_lengths_zero_keeps_the_state():
    q, k, v, g, beta, S0 = _inputs(T=9, seed=9)
    _, S = gated_delta_rule(q, k, v, g, beta, state=S0, lengths=torch.tensor([0, 9]))
    assert torch.equal(S[0], S0[0])


def test_step_repeated_equals_full_call():
    q, k, v, g, beta, S0 = _inputs(T=30, seed=10)
    q, k = qk_normalize(q, k)
    o, S = gated_delta_rule(q, k, v, g, beta, state=S0, chunk_size=16)
    state, outs = S0, []
    for t in range(30):
        o_t, state = gated_delta_step(q[:, t], k[:, t], v[:, t], g[:, t], beta[:, t], state)
        outs.append(o_t)
    assert _rel(torch.stack(outs, 1), o) < 1e-5 and _rel(state, S) < 1e-5


def test_step_live_rows_and_inplace():
    q, k, v, g, beta, S0 = _inputs(B=3, T=1, seed=11)
    q, k = qk_normalize(q, k)
    live = torch.tensor([True, False, True])
    step = [x[:, 0] for x in (q, k, v, g, beta)]
    o, S = gated_delta_step(*step, S0, live)
    assert torch.equal(S[1], S0[1])  # bit for bit
    o_all, S_all = gated_delta_step(*step, S0)
    assert torch.equal(S[live], S_all[live]) and torch.equal(o[live], o_all[live])
    ref_o, ref_S = _naive(*[x[[0, 2]] for x in (q, k, v, g, beta, S0)])
    assert _rel(S[live], ref_S) < 1e-6 and _rel(o[live], ref_o[:, 0]) < 1e-6
    buf = S0.clone()
    o_in, S_in = gated_delta_step(*step, buf, live, inplace=True)
    assert S_in is buf and torch.equal(buf, S) and torch.equal(o_in, o)


def test_bf16_inputs():
    """bf16 inputs are computed in fp32: exactly as their fp32 upcast, and within bf16 rounding of
    the fp32 inputs they were rounded from."""
    q, k, v, g, beta, S0 = _inputs(T=50, seed=12)
    q, k = qk_normalize(q, k)
    ref_o, ref_S = _naive(q, k, v, g, beta, S0)
    xs16 = [x.bfloat16() for x in (q, k, v, g, beta)]
    o, S = gated_delta_rule(*xs16, state=S0, chunk_size=16)
    assert o.dtype == S.dtype == torch.float32
    o_up, S_up = gated_delta_rule(*[x.float() for x in xs16], state=S0, chunk_size=16)
    assert torch.equal(o, o_up) and torch.equal(S, S_up)
    assert _rel(o, ref_o) < 3e-2 and _rel(S, ref_S) < 3e-2
    o_t, S_t = gated_delta_step(*[x[:, 0] for x in xs16], S0)
    assert o_t.dtype == S_t.dtype == torch.float32 and _rel(o_t, o[:, 0]) < 1e-5


@pytest.mark.parametrize("normalize", [False, True], ids=["given", "normalized_inside"])
def test_bf16_gradients_are_the_fp32_upcasts_rounded_once(normalize):
    """bf16 inputs are computed in fp32, the backward too: each input's gradient is its fp32
    upcast's gradient rounded to bf16 once (no bf16 sums of per-use or per-value-head pieces), with
    key heads shared, right padding and an initial state."""
    q, k, v, g, beta, S0 = _inputs(B=2, T=45, Hk=1, Hv=4, seed=27, g_scale=2.0)
    if not normalize:
        q, k = qk_normalize(q, k)
    xs16 = [x.bfloat16() for x in (q, k, v, g, beta)]
    gen = torch.Generator().manual_seed(28)
    w_o, w_S = torch.randn(v.shape, generator=gen), torch.randn(S0.shape, generator=gen)

    def grads(xs):
        xs = [x.detach().clone().requires_grad_() for x in xs]
        o, S = gated_delta_rule(*xs, state=S0, lengths=torch.tensor([45, 30]), chunk_size=8, normalize_qk=normalize)
        ((o * w_o).sum() + (S * w_S).sum()).backward()
        return [x.grad for x in xs]

    for name, got, want in zip("q k v g beta".split(), grads(xs16), grads([x.float() for x in xs16])):
        assert got.dtype == torch.bfloat16 and torch.equal(got, want.bfloat16()), name


def test_shape_errors():
    q, k, v, g, beta, _ = _inputs(Hk=3, Hv=4)
    with pytest.raises(ValueError, match="multiple"):
        gated_delta_rule(q, k, v, g, beta)


# ----------------------------------------------------------------------------- causal conv


def _conv_inputs(B=3, T=11, C=10, K=4, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x, w = torch.randn(B, T, C, generator=gen), torch.randn(C, K, generator=gen)
    return x, w, torch.randn(B, C, K - 1, generator=gen)


BF16, FP32 = torch.bfloat16, torch.float32


@pytest.mark.parametrize("x_dtype,w_dtype", [(FP32, FP32), (BF16, BF16), (BF16, FP32)])
def test_causal_conv_matches_transformers(hf, x_dtype, w_dtype):
    x, w, _ = _conv_inputs()
    x, w = x.to(x_dtype), w.to(w_dtype)
    y, state = causal_conv(x, w)
    ref = hf.causal_conv1d_fn(x.transpose(1, 2), w, None, activation="silu").transpose(1, 2)
    assert y.dtype == x_dtype and y.shape == x.shape
    torch.testing.assert_close(y, ref, rtol=0, atol=0)
    assert torch.equal(state, x[:, -3:].transpose(1, 2))


def test_causal_conv_state_passing_equals_one_call():
    x, w, s0 = _conv_inputs(T=12)
    y, s = causal_conv(x, w, state=s0)
    for T1 in (1, 2, 3, 5, 11):
        y1, s1 = causal_conv(x[:, :T1], w, state=s0)
        y2, s2 = causal_conv(x[:, T1:], w, state=s1)
        torch.testing.assert_close(torch.cat([y1, y2], 1), y, rtol=1e-6, atol=1e-6)
        assert torch.equal(s2, s)
    # the first call without a state is a call after K - 1 zeros (to rounding: see causal_conv)
    y0, s0_next = causal_conv(x, w)
    y0z, s0z_next = causal_conv(x, w, state=torch.zeros_like(s0))
    torch.testing.assert_close(y0, y0z, rtol=1e-6, atol=1e-6)
    assert torch.equal(s0_next, s0z_next)


def test_causal_conv_lengths_keep_the_valid_inputs():
    x, w, s0 = _conv_inputs(B=4, T=8)
    lengths = torch.tensor([8, 5, 1, 0])
    y, s = causal_conv(x, w, state=s0, lengths=lengths)
    for b, n in enumerate(lengths.tolist()[:3]):
        y_b, s_b = causal_conv(x[b : b + 1, :n], w, state=s0[b : b + 1])
        assert torch.equal(s[b : b + 1], s_b)
        torch.testing.assert_close(y[b : b + 1, :n], y_b, rtol=1e-6, atol=1e-6)
    # lengths 1, K = 4: the old state's last two columns, then the one new input
    assert torch.equal(s[2], torch.cat([s0[2, :, 1:], x[2, :1].T], dim=-1))
    assert torch.equal(s[3], s0[3])


def test_causal_conv_gradcheck_float64():
    x, w, s0 = (t.double().requires_grad_() for t in _conv_inputs(B=2, T=3, C=2, seed=16))
    lengths = torch.tensor([3, 1])
    assert torch.autograd.gradcheck(lambda x, w, s: causal_conv(x, w, state=s, lengths=lengths), (x, w, s0))


def test_causal_conv_one_token_matches_transformers_update(hf):
    x, w, s0 = _conv_inputs(T=1)
    conv_state = s0.clone()
    ref = hf.causal_conv1d_update(x.transpose(1, 2), conv_state, w, None, activation="silu")
    y, s = causal_conv(x, w, state=s0)
    assert torch.equal(y, ref.transpose(1, 2)) and torch.equal(s, conv_state)


# ----------------------------------------------------------------------------- gated RMSNorm


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gated_rms_norm_matches_transformers(hf, dtype):
    gen = torch.Generator().manual_seed(13)
    x, z = torch.randn(5, 3, 32, generator=gen).to(dtype), torch.randn(5, 3, 32, generator=gen).to(dtype)
    norm = hf.Qwen3_5RMSNormGated(32, eps=1e-6).to(dtype)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(32, generator=gen))
        ref = norm(x, z)
    y = gated_rms_norm(x, z, norm.weight.detach(), 1e-6)
    assert y.dtype == dtype and torch.equal(y, ref)
