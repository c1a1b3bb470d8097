"""Tests for r3.grpo: advantages, the clipped policy loss, KL, aggregation, global normalisation."""

import math
import statistics

import pytest
import torch

from r3.grpo import AGGREGATIONS, aggregate, group_advantages, kl_k3, loss_denominator, policy_loss

LN2 = math.log(2.0)


# ----------------------------------------------------------------------------- advantages


def test_group_advantages_hand_values():
    r = torch.tensor([[1.0, 0.0, 0.0, 1.0], [1.0, 0.0, 0.0, 0.0]])
    # group 0: mean 0.5, unbiased std sqrt(4 * 0.25 / 3) = 1/sqrt(3)
    # group 1: mean 0.25, unbiased std sqrt((0.5625 + 3 * 0.0625) / 3) = 0.5
    a = group_advantages(r, eps=0.0)
    s3 = math.sqrt(3.0)
    expected = torch.tensor([[0.5 * s3, -0.5 * s3, -0.5 * s3, 0.5 * s3], [1.5, -0.5, -0.5, -0.5]])
    torch.testing.assert_close(a, expected, rtol=1e-6, atol=1e-6)
    # eps is added to the std
    a_eps = group_advantages(r, eps=0.5)
    torch.testing.assert_close(a_eps[1], torch.tensor([0.75, -0.25, -0.25, -0.25]))
    # Dr. GRPO: no std division
    torch.testing.assert_close(group_advantages(r, scale=False), r - r.mean(1, keepdim=True))


def test_group_advantages_vs_statistics_module():
    g = torch.Generator().manual_seed(0)
    r = torch.rand(7, 5, generator=g, dtype=torch.float64)
    a = group_advantages(r, eps=1e-6)
    for i, row in enumerate(r.tolist()):
        mu, sd = statistics.fmean(row), statistics.stdev(row)  # stdev is the unbiased (n-1) one
        for j, x in enumerate(row):
            assert a[i, j].item() == pytest.approx((x - mu) / (sd + 1e-6), rel=1e-12, abs=1e-12)


def test_group_advantages_all_equal_is_exactly_zero():
    # the float32 mean of (0.9, 0.9, 0.9) is not 0.9: without the exact-zero rule that residue over
    # std + eps (std 0) is an advantage of about 0.06 on every row of a group with no signal
    r = torch.tensor([[0.9] * 3, [1.0] * 3, [0.0] * 3])
    assert (r[0] - r[0].mean()).abs().max() > 0  # (the premise)
    for scale in (True, False):
        a = group_advantages(r, scale=scale)
        assert torch.equal(a, torch.zeros_like(a))
    assert torch.isfinite(group_advantages(r, eps=0.0)).all()



def test_group_advantages_of_no_groups_is_quiet():
    """A rank with no failures this step has no groups: an empty result and no torch warning on
    the console (the std of nothing warned)."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for scale in (True, False):
            assert group_advantages(torch.zeros(0, 4), scale=scale).shape == (0, 4)

def test_a_group_of_one_gets_zero_advantage_without_a_warning():
    """G == 1: the unbiased std of one reward is undefined (torch would warn and give NaN); the
    advantage is an exact 0 and nothing is said on the console, scaled or not."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for scale in (True, False):
            assert torch.equal(group_advantages(torch.tensor([[1.0], [0.0], [0.3]]), scale=scale), torch.zeros(3, 1))


def test_group_advantages_default_eps_is_1e_6_added_to_the_std():
    """The contract's default: (r - mean) / (std + 1e-6). float64 rewards, so that another
    default (1e-8, or none) shows at 1e-12."""
    r = torch.tensor([[1.0, 0.0, 0.0]], dtype=torch.float64)
    sd = statistics.stdev([1.0, 0.0, 0.0])  # 1 / sqrt(3)
    want = [(x - 1 / 3) / (sd + 1e-6) for x in (1.0, 0.0, 0.0)]
    assert group_advantages(r)[0].tolist() == pytest.approx(want, rel=1e-12, abs=0)


def test_group_advantages_g1_and_int_rewards():
    a = group_advantages(torch.tensor([[1.0], [0.0], [0.3]]))
    assert torch.equal(a, torch.zeros(3, 1))
    ai = group_advantages(torch.tensor([[1, 0], [0, 0]]))
    assert ai.dtype == torch.float32
    s = math.sqrt(0.5)  # unbiased std of (1, 0)
    torch.testing.assert_close(ai, torch.tensor([[0.5 / (s + 1e-6), -0.5 / (s + 1e-6)], [0.0, 0.0]]))
    ab = group_advantages(torch.tensor([[True, False, False]]), scale=False)
    torch.testing.assert_close(ab, torch.tensor([[2 / 3, -1 / 3, -1 / 3]]))
    with pytest.raises(ValueError):
        group_advantages(torch.zeros(4))


# ----------------------------------------------------------------------------- hand examples


def _hand_batch():
    """Two sequences, T=3.

    seq 0: tokens 0, 1 trained; token 0 has ratio 1, token 1 ratio 2; token 2 is padding with NaN.
    seq 1: token 0 trained with ratio 0.5; tokens 1, 2 padding with -inf / inf.
    """
    old = torch.log(torch.tensor([[0.5, 0.125, 0.3], [0.4, 0.2, 0.2]], dtype=torch.float64))
    logp = old.clone()
    logp[0, 1] += LN2  # ratio 2
    logp[1, 0] -= LN2  # ratio 0.5
    logp[0, 2] = float("nan")
    logp[1, 1] = float("-inf")
    logp[1, 2] = float("inf")
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    return logp.requires_grad_(), old, mask


@pytest.mark.parametrize(
    "agg,loss_val,grads",
    [
        # per-token losses: seq 0 (A=+1): -1 (r=1), -1.2 (r=2 clipped); seq 1 (A=-1): 0.8 (r=0.5 clipped)
        ("token-mean", (-1.0 - 1.2 + 0.8) / 3, [[-1 / 3, 0.0, 0.0], [0.0, 0.0, 0.0]]),
        ("seq-mean-token-mean", ((-1.0 - 1.2) / 2 + 0.8) / 2, [[-0.25, 0.0, 0.0], [0.0, 0.0, 0.0]]),
        ("seq-mean-token-sum-norm", (-1.0 - 1.2 + 0.8) / 6, [[-1 / 6, 0.0, 0.0], [0.0, 0.0, 0.0]]),
    ],
)
def test_policy_loss_hand_example(agg, loss_val, grads):
    logp, old, mask = _hand_batch()
    adv = torch.tensor([1.0, -1.0], dtype=torch.float64)
    loss, met = policy_loss(logp, old, None, adv, mask, beta=0.5, agg=agg)
    assert loss.item() == pytest.approx(loss_val, abs=1e-12)
    loss.backward()
    # grad of -A*r wrt logp is -A*r; only token (0,0) is unclipped; NaN/inf padding gives 0
    assert torch.equal(logp.grad == 0, torch.tensor(grads) == 0)
    torch.testing.assert_close(logp.grad, torch.tensor(grads, dtype=torch.float64), rtol=1e-12, atol=1e-12)
    assert met["clip_frac_high"].item() == pytest.approx(1 / 3)
    assert met["clip_frac_low"].item() == pytest.approx(1 / 3)
    assert met["ratio_min"].item() == pytest.approx(0.5)
    assert met["ratio_max"].item() == pytest.approx(2.0)
    assert met["ratio_mean"].item() == pytest.approx(3.5 / 3)
    assert met["tokens"].item() == 3 and met["sequences"].item() == 2
    assert met["kl"].item() == 0.0
    assert met["pg_loss"].item() == pytest.approx(loss_val, abs=1e-6)
    # advantages given as [B, 1] are read as [B]
    loss_col, _ = policy_loss(logp.detach(), old, None, adv[:, None], mask, beta=0.5, agg=agg)
    assert loss_col.item() == pytest.approx(loss_val, abs=1e-12)


def test_policy_loss_hand_example_negative_advantage_and_kl():
    # One sequence, A = -1: r=1 -> loss 1, grad -A*r = +1; r=2 -> -min(-2, -1.2) = 2, unclipped,
    # grad +2.  KL: ref = logp + ln2 at token 0 -> k3 = 2 - ln2 - 1; ref = logp at token 1 -> 0.
    logp, old, mask = _hand_batch()
    logp, old, mask = logp[:1].detach().clone().requires_grad_(), old[:1], mask[:1]
    ref = logp.detach().clone()
    ref[0, 0] += LN2
    beta = 0.1
    loss, met = policy_loss(logp, old, ref, torch.tensor([-1.0], dtype=torch.float64), mask, beta=beta)
    k3 = 1.0 - LN2
    assert loss.item() == pytest.approx((1.0 + 2.0 + beta * k3) / 2, abs=1e-12)
    loss.backward()
    # dk3/dlogp = 1 - exp(ref - logp) = 1 - 2 = -1 at token 0, 0 at token 1
    torch.testing.assert_close(
        logp.grad, torch.tensor([[(1.0 - beta) / 2, 2.0 / 2, 0.0]], dtype=torch.float64), rtol=1e-12, atol=1e-12
    )
    assert met["kl"].item() == pytest.approx(k3 / 2, rel=1e-6)
    assert met["clip_frac_low"].item() == 0.0 and met["clip_frac_high"].item() == 0.0
    # beta = 0: KL is still reported but not in the loss
    loss0, met0 = policy_loss(logp, old, ref, torch.tensor([-1.0], dtype=torch.float64), mask, beta=0.0)
    assert loss0.item() == pytest.approx(1.5, abs=1e-12)
    assert met0["kl"].item() == pytest.approx(k3 / 2, rel=1e-6)


def test_clip_fractions_and_ratio_range_count_only_where_each_clip_binds():
    """clip_frac_high: A > 0 and r > 1 + eps_high; clip_frac_low: A < 0 and r < 1 - eps_low; a
    zero advantage binds no clip whatever its ratio, and with eps_low = 0.1, eps_high = 0.3 a ratio
    of 1.25 is inside and one of 0.8 is clipped. ratio_min / ratio_max are over the trained tokens
    only (a masked-out position would read as a ratio of 1)."""
    # token:       A=0 r=2  A=0 r=.5  A=+1 r=1.25  A=+1 r=1.5  A=-1 r=.85  A=-1 r=.8  (masked out: A=+1 r=3)
    ratios = torch.tensor([[2.0, 0.5, 1.25, 1.5, 0.85, 0.8, 3.0]], dtype=torch.float64)
    adv = torch.tensor([[0.0, 0.0, 1.0, 1.0, -1.0, -1.0, 1.0]], dtype=torch.float64)
    mask = torch.tensor([[True] * 6 + [False]])
    old = torch.full_like(ratios, -1.0)
    _, met = policy_loss(old + torch.log(ratios), old, None, adv, mask, eps_low=0.1, eps_high=0.3, beta=0.0)
    assert met["clip_frac_high"].item() == pytest.approx(1 / 6)  # r = 1.5 only
    assert met["clip_frac_low"].item() == pytest.approx(2 / 6)  # r = 0.85 and 0.8
    assert met["ratio_min"].item() == pytest.approx(0.5) and met["ratio_max"].item() == pytest.approx(2.0)
    # every trained ratio above 1 (below 1): the minimum (maximum) is not the padding's 1
    for r, key, want in ((torch.tensor([[1.5, 2.0, 1.0]]), "ratio_min", 1.5), (torch.tensor([[0.5, 0.8, 1.0]]), "ratio_max", 0.8)):
        r = r.double()
        _, met = policy_loss(torch.log(r), torch.zeros_like(r), None, torch.ones(1), torch.tensor([[1, 1, 0]]))
        assert met[key].item() == pytest.approx(want)


def test_beta_0_leaves_even_an_overflowing_kl_out_of_the_loss():
    """beta = 0 means no KL term: a reference so far from the policy that k3 overflows float32
    (d = ref - logp = 100, exp(100) = inf) must not make the loss or its gradient inf or NaN
    (0 * inf), whether k3 comes from ref_logp or precomputed."""
    logp = torch.tensor([[-101.0, -0.5]], requires_grad=True)
    ref = torch.tensor([[-1.0, -0.5]])
    mask = torch.ones(1, 2, dtype=torch.bool)
    for kw in (dict(ref_logp=ref), dict(ref_logp=None, kl=kl_k3(logp.detach(), ref))):
        assert torch.isinf(kl_k3(logp.detach(), ref)[0, 0])  # (the premise)
        logp.grad = None
        loss, _ = policy_loss(logp, logp.detach(), advantages=torch.tensor([1.0]), mask=mask, beta=0.0, **kw)
        assert loss.item() == -1.0  # -min(r A, clip(r) A) with r = 1, A = 1, token mean
        loss.backward()
        assert torch.equal(logp.grad, torch.tensor([[-0.5, -0.5]]))


def test_policy_loss_defaults_are_the_contracts():
    """DESIGN.md: eps_low = eps_high = 0.2, beta = 0.001, agg = "token-mean" (this batch tells
    each of them apart from another value)."""
    logp, old, ref, adv, mask = _random_batch(10)
    got = policy_loss(logp, old, ref, adv, mask)[0].item()
    want = policy_loss(logp, old, ref, adv, mask, eps_low=0.2, eps_high=0.2, beta=0.001, agg="token-mean")[0].item()
    assert got == want
    for other in (dict(eps_low=0.1), dict(eps_high=0.28), dict(beta=0.01), dict(beta=0.0), dict(agg="seq-mean-token-mean")):
        assert policy_loss(logp, old, ref, adv, mask, **other)[0].item() != pytest.approx(got, rel=1e-9, abs=0), other


def test_asymmetric_clip():
    # eps_low=0.1, eps_high=0.5: r=1.4 with A>0 is inside, r=0.85 with A<0 is clipped at 0.9
    old = torch.zeros(1, 2, dtype=torch.float64)
    logp = torch.log(torch.tensor([[1.4, 0.85]], dtype=torch.float64)).requires_grad_()
    adv = torch.tensor([[1.0, -1.0]], dtype=torch.float64)
    loss, _ = policy_loss(logp, old, None, adv, torch.ones(1, 2), eps_low=0.1, eps_high=0.5, beta=0.0)
    assert loss.item() == pytest.approx((-1.4 + 0.9) / 2, abs=1e-12)
    loss.backward()
    torch.testing.assert_close(logp.grad, torch.tensor([[-1.4 / 2, 0.0]], dtype=torch.float64))


# ----------------------------------------------------------------------------- naive float64 reference


def naive_loss_and_grad(logp, old, ref, adv, mask, *, eps_low, eps_high, beta, agg, max_len=None):
    """Python-loop float64 loss and its analytic gradient w.r.t. logp."""
    B, T = len(logp), len(logp[0])
    per_tok = [[None] * T for _ in range(B)]
    dtok = [[0.0] * T for _ in range(B)]
    for b in range(B):
        for t in range(T):
            if not mask[b][t]:
                continue
            a = adv[b][t] if isinstance(adv[b], list) else adv[b]
            r = math.exp(logp[b][t] - old[b][t])
            c = min(max(r, 1 - eps_low), 1 + eps_high)
            unclipped, clipped = r * a, c * a
            loss = -min(unclipped, clipped)
            binds = (a > 0 and r > 1 + eps_high) or (a < 0 and r < 1 - eps_low)
            grad = 0.0 if binds else -a * r
            if ref is not None and beta:
                d = ref[b][t] - logp[b][t]
                loss += beta * (math.exp(d) - d - 1)
                grad += beta * (1 - math.exp(d))
            per_tok[b][t], dtok[b][t] = loss, grad
    counts = [sum(1 for t in range(T) if mask[b][t]) for b in range(B)]
    n_tok, n_seq = sum(counts), sum(1 for c in counts if c)
    L = T if max_len is None else max_len
    grad = [[0.0] * T for _ in range(B)]
    total = 0.0
    for b in range(B):
        for t in range(T):
            if per_tok[b][t] is None:
                continue
            if agg == "token-mean":
                w = 1.0 / n_tok
            elif agg == "seq-mean-token-mean":
                w = 1.0 / (counts[b] * n_seq)
            else:
                w = 1.0 / (B * L)
            total += w * per_tok[b][t]
            grad[b][t] = w * dtok[b][t]
    return total, grad


def _random_batch(seed, B=6, T=9, spread=1.5, dtype=torch.float64, per_token_adv=False):
    g = torch.Generator().manual_seed(seed)
    old = -torch.rand(B, T, generator=g, dtype=dtype) * 5
    # log-ratios up to +-3*spread: ratios far outside [0.8, 1.2] in both directions
    logp = old + torch.randn(B, T, generator=g, dtype=dtype) * spread
    ref = logp + torch.randn(B, T, generator=g, dtype=dtype) * 0.7
    mask = torch.rand(B, T, generator=g) < 0.6
    mask[2] = False  # a fully masked sequence
    mask[0, :3] = True
    if per_token_adv:
        adv = torch.randn(B, T, generator=g, dtype=dtype)
    else:
        adv = torch.randn(B, generator=g, dtype=dtype)
        adv[1] = 0.0
    # garbage in masked-out positions must not matter
    logp = torch.where(mask, logp, torch.tensor(float("nan"), dtype=dtype))
    ref = torch.where(mask, ref, torch.tensor(float("inf"), dtype=dtype))
    old = torch.where(mask, old, torch.tensor(float("-inf"), dtype=dtype))
    return logp, old, ref, adv, mask


@pytest.mark.parametrize("agg", AGGREGATIONS)
@pytest.mark.parametrize("per_token_adv", [False, True])
@pytest.mark.parametrize("beta", [0.0, 0.04])
@pytest.mark.parametrize("eps", [(0.2, 0.2), (0.2, 0.28)])
def test_policy_loss_vs_naive(agg, per_token_adv, beta, eps):
    logp, old, ref, adv, mask = _random_batch(1, per_token_adv=per_token_adv)
    lp = logp.clone().requires_grad_()
    loss, _ = policy_loss(lp, old, ref, adv, mask, eps_low=eps[0], eps_high=eps[1], beta=beta, agg=agg)
    loss.backward()
    want, want_grad = naive_loss_and_grad(
        logp.tolist(), old.tolist(), ref.tolist(), adv.tolist(), mask.tolist(),
        eps_low=eps[0], eps_high=eps[1], beta=beta, agg=agg,
    )
    assert loss.dtype == torch.float64
    assert loss.item() == pytest.approx(want, rel=1e-10, abs=1e-12)
    torch.testing.assert_close(lp.grad, torch.tensor(want_grad, dtype=torch.float64), rtol=1e-9, atol=1e-12)
    assert torch.isfinite(lp.grad).all()


def test_gradient_vanishes_exactly_where_clip_binds():
    logp, old, _, adv, mask = _random_batch(2, B=8, T=16, spread=2.0, per_token_adv=True)
    lp = logp.clone().requires_grad_()
    loss, met = policy_loss(lp, old, None, adv, mask, eps_low=0.2, eps_high=0.28, beta=0.0)
    loss.backward()
    r = torch.exp(logp - old)
    binds = mask & (((adv > 0) & (r > 1.28)) | ((adv < 0) & (r < 0.8)))
    free = mask & ~binds & (adv != 0)
    assert binds.sum() >= 10 and free.sum() >= 10  # the example exercises both cases
    assert torch.equal(lp.grad[binds], torch.zeros_like(lp.grad[binds]))
    assert torch.equal(lp.grad[~mask], torch.zeros_like(lp.grad[~mask]))
    assert (lp.grad[free] != 0).all()
    n = mask.sum()
    assert met["clip_frac_high"].item() == pytest.approx((mask & (adv > 0) & (r > 1.28)).sum().item() / n.item())
    assert met["clip_frac_low"].item() == pytest.approx((mask & (adv < 0) & (r < 0.8)).sum().item() / n.item())


@pytest.mark.parametrize("agg", AGGREGATIONS)
def test_all_masked_batch(agg):
    logp, old, ref, adv, _ = _random_batch(3)
    mask = torch.zeros_like(logp, dtype=torch.bool)
    lp = logp.clone().requires_grad_()
    loss, met = policy_loss(lp, old, ref, adv, mask, agg=agg)
    assert loss.item() == 0.0 and loss.requires_grad
    loss.backward()
    assert torch.equal(lp.grad, torch.zeros_like(lp.grad))
    for k, v in met.items():
        assert v.item() == 0.0, k
    # the same with a global denominator of 0
    lp.grad = None
    loss, _ = policy_loss(lp, old, ref, adv, mask, agg=agg, denominator=loss_denominator(mask, agg))
    loss.backward()
    assert loss.item() == 0.0 and torch.equal(lp.grad, torch.zeros_like(lp.grad))


def test_all_equal_rewards_give_no_gradient():
    """Groups whose rewards are all equal, also at values whose float32 mean is not exactly the
    value (0.9 in threes, 0.3 in sixes: a residue the std division would blow up to ~0.05)."""
    rewards = torch.tensor([[1.0, 1.0, 1.0, 1.0, 1.0, 1.0], [0.0] * 6, [0.9] * 6, [0.3] * 6])
    assert (rewards[2:] - rewards[2:].mean(dim=1, keepdim=True)).abs().max() > 0  # (the residue is there)
    adv = group_advantages(rewards).reshape(-1)
    logp, old, ref, _, mask = _random_batch(4, B=24, T=5)
    lp = logp.clone().requires_grad_()
    loss, _ = policy_loss(lp, old, ref, adv, mask, beta=0.0)
    loss.backward()
    assert loss.item() == 0.0
    assert torch.equal(lp.grad, torch.zeros_like(lp.grad))


def test_metrics_values():
    logp, old, ref, adv, mask = _random_batch(5, per_token_adv=True)
    _, met = policy_loss(logp, old, ref, adv, mask, beta=0.0)
    r = torch.exp(logp - old)[mask]
    d = (ref - logp)[mask]
    assert met["tokens"].item() == mask.sum().item()
    assert met["sequences"].item() == mask.any(1).sum().item()
    assert met["ratio_min"].item() == pytest.approx(r.min().item(), rel=1e-6)
    assert met["ratio_max"].item() == pytest.approx(r.max().item(), rel=1e-6)
    assert met["ratio_mean"].item() == pytest.approx(r.mean().item(), rel=1e-6)
    assert met["kl"].item() == pytest.approx((torch.exp(d) - d - 1).mean().item(), rel=1e-6)
    for v in met.values():
        assert v.dim() == 0 and not v.requires_grad and v.dtype == torch.float32


def test_float32_and_bf16_inputs():
    logp, old, ref, adv, mask = _random_batch(6, spread=0.3)
    for dt in (torch.float32, torch.bfloat16):
        lp = logp.to(dt).requires_grad_()
        loss, _ = policy_loss(lp, old.to(dt), ref.to(dt), adv, mask)
        assert loss.dtype == torch.float32
        want, _ = policy_loss(lp.detach().double(), old.to(dt).double(), ref.to(dt).double(), adv, mask)
        assert loss.item() == pytest.approx(want.item(), rel=1e-5, abs=1e-6)
        loss.backward()
        assert lp.grad.dtype == dt and torch.isfinite(lp.grad.float()).all()


def test_bad_arguments():
    x = torch.zeros(2, 3)
    with pytest.raises(ValueError):
        policy_loss(x, x, None, torch.zeros(2), x.bool(), agg="mean")
    with pytest.raises(ValueError):
        policy_loss(x, x, None, torch.zeros(3), x.bool())
    with pytest.raises(ValueError):
        policy_loss(x, x[:, :2], None, torch.zeros(2), x.bool())
    # an unknown aggregation is refused by every entry point, not read as another one
    for call in (lambda: loss_denominator(x.bool(), "mean"), lambda: aggregate(x, x.bool(), "mean", denominator=1.0)):
        with pytest.raises(ValueError, match="unknown agg 'mean'"):
            call()
    # a mask of another shape is refused, not broadcast (one row's mask applied to every row)
    with pytest.raises(ValueError, match=r"mask has shape \(1, 3\), expected \(2, 3\)"):
        policy_loss(x, x, None, torch.zeros(2), torch.ones(1, 3, dtype=torch.bool))


# ----------------------------------------------------------------------------- KL


def test_kl_k3_accurate_for_small_and_large_differences():
    d64 = torch.tensor([-3.0, -0.7, -0.49, -1e-2, -1e-4, -1e-6, 0.0, 1e-6, 1e-4, 1e-3, 0.3, 0.51, 2.0],
                       dtype=torch.float64)
    logp64 = torch.full_like(d64, -2.0)
    lp32 = logp64.float()
    ref32 = (logp64 + d64).float()
    got = kl_k3(lp32, ref32)
    d32 = (ref32.double() - lp32.double())  # the difference the fp32 inputs actually encode
    want32 = torch.expm1(d32) - d32
    torch.testing.assert_close(got.double(), want32, rtol=2e-6, atol=0)
    assert (got >= 0).all()
    ref64 = logp64 + d64
    dd = ref64 - logp64
    torch.testing.assert_close(kl_k3(logp64, ref64), torch.expm1(dd) - dd, rtol=1e-9, atol=0)
    # the naive fp32 formula is garbage here (this is why the series exists)
    naive = torch.exp(ref32 - lp32) - (ref32 - lp32) - 1
    assert not torch.allclose(naive.double(), want32, rtol=1e-2, atol=0)


def test_kl_k3_gradient():
    lp = torch.tensor([-1.0, -2.0, -0.5, -3.0], dtype=torch.float64, requires_grad=True)
    ref = torch.tensor([-1.3, -1.95, -0.5, -0.2], dtype=torch.float64)
    kl_k3(lp, ref).sum().backward()
    torch.testing.assert_close(lp.grad, 1 - torch.exp(ref - lp.detach()), rtol=1e-9, atol=1e-15)


# ----------------------------------------------------------------------------- global normalisation


def _split_and_trim(x_list, rows, mask):
    """Pick rows and trim to the last masked column + 1 (micro-batches padded differently)."""
    width = int(mask[rows].any(0).nonzero().max()) + 1 if mask[rows].any() else 1
    return [x[rows][:, :width] if x.dim() == 2 else x[rows] for x in x_list], width


@pytest.mark.parametrize("agg", AGGREGATIONS)
@pytest.mark.parametrize("per_token_adv", [False, True])
def test_micro_batch_and_rank_invariance(agg, per_token_adv):
    B, T, L = 10, 12, 12
    logp, old, ref, adv, mask = _random_batch(7, B=B, T=T, per_token_adv=per_token_adv)
    mask[:, 9:] = False  # so that micro-batches can be trimmed to different widths
    mask[5, :] = False
    kw = dict(eps_low=0.2, eps_high=0.28, beta=0.05, agg=agg, max_len=L)

    lp_full = logp.clone().requires_grad_()
    loss_full, _ = policy_loss(lp_full, old, ref, adv, mask, **kw)
    loss_full.backward()

    # 2 ranks x uneven micro-batches (one micro-batch holds only the fully masked row)
    ranks = [[[0, 1, 2], [3, 4], [5]], [[6], [7, 8, 9]]]
    all_mbs = [mb for rank in ranks for mb in rank]
    den = sum(loss_denominator(_split_and_trim([mask], r, mask)[0][0], agg, max_len=L) for r in all_mbs)
    widths = set()
    grad = torch.zeros(B, T, dtype=torch.float64)
    total = 0.0
    for rank in ranks:
        rank_grad = torch.zeros(B, T, dtype=torch.float64)  # what this rank's backward would accumulate
        for rows in rank:
            (lp, o, rf, a, m), w = _split_and_trim([logp, old, ref, adv, mask], rows, mask)
            widths.add(w)
            lp = lp.clone().requires_grad_()
            loss, _ = policy_loss(lp, o, rf, a, m, denominator=den, **kw)
            loss.backward()
            total += loss.item()
            rank_grad[rows, :w] += lp.grad
        grad += rank_grad  # all-reduce SUM
    assert len(widths) > 1
    assert total == pytest.approx(loss_full.item(), rel=1e-12, abs=1e-14)
    torch.testing.assert_close(grad, lp_full.grad, rtol=1e-12, atol=1e-15)

    # without the global denominator the split changes the gradient (so the test has teeth)
    if agg != "seq-mean-token-sum-norm":
        g2 = torch.zeros(B, T, dtype=torch.float64)
        for rows in all_mbs:
            (lp, o, rf, a, m), w = _split_and_trim([logp, old, ref, adv, mask], rows, mask)
            lp = lp.clone().requires_grad_()
            policy_loss(lp, o, rf, a, m, **kw)[0].backward()
            g2[rows, :w] += lp.grad / len(all_mbs)
        assert not torch.allclose(g2, lp_full.grad, rtol=1e-3)


def test_loss_denominator_values():
    mask = torch.tensor([[1, 1, 0, 0], [0, 0, 0, 0], [1, 0, 1, 1]])
    assert loss_denominator(mask, "token-mean").item() == 5
    assert loss_denominator(mask, "seq-mean-token-mean").item() == 2
    assert loss_denominator(mask, "seq-mean-token-sum-norm").item() == 12
    assert loss_denominator(mask, "seq-mean-token-sum-norm", max_len=100).item() == 300
    assert loss_denominator(mask).dtype == torch.float32


def test_aggregate_ignores_garbage_outside_mask():
    x = torch.tensor([[1.0, float("nan")], [float("inf"), 3.0]], requires_grad=True)
    m = torch.tensor([[True, False], [False, True]])
    out = aggregate(x, m, "token-mean")
    assert out.item() == 2.0
    out.backward()
    assert torch.equal(x.grad, torch.tensor([[0.5, 0.0], [0.0, 0.5]]))
    assert aggregate(x, m, "seq-mean-token-sum-norm", denominator=8.0).item() == 0.5


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_kl_from_the_kernel_equals_k3_from_ref_logp(dtype):
    """Training takes the KL from ``fused_logprob_kl`` (one pass with the log-probs): the loss and
    its gradient w.r.t. the logits equal those of policy_loss computing k3 from ref_logp."""
    from r3.kernels import fused_logprob_kl

    g = torch.Generator().manual_seed(3)
    B, T, V = 3, 5, 11
    mask = torch.rand(B, T, generator=g) > 0.3
    rows, cols = mask.nonzero(as_tuple=True)
    N = rows.numel()
    logits0 = (2 * torch.randn(N, V, generator=g)).to(dtype)
    targets = torch.randint(0, V, (N,), generator=g)
    ref = torch.log_softmax(torch.randn(N, V, generator=g), -1)[torch.arange(N), targets]
    old = torch.log_softmax(torch.randn(N, V, generator=g), -1)[torch.arange(N), targets]
    adv = torch.tensor([1.0, -0.5, 2.0])

    def full(v):
        return torch.zeros(B, T, dtype=v.dtype).index_put((rows, cols), v)

    results = []
    for fused in (True, False):
        logits = logits0.clone().requires_grad_(True)
        logp, kl = fused_logprob_kl(logits, targets, ref if fused else None, temperature=0.7)
        loss, m = policy_loss(full(logp), full(old), None if fused else full(ref), adv, mask, beta=0.1,
                              kl=full(kl) if fused else None)
        loss.backward()
        results.append((loss.detach(), m["kl"], logits.grad.float(), logp.detach(), None if kl is None else kl.detach()))
    (la, ka, ga, logp, kl), (lb, kb, gb, _, _) = results
    # the kernel's KL per token against k3 by hand in float64 (on CPU both paths call the same k3)
    d = ref.double() - torch.log_softmax(logits0.double() / 0.7, -1)[torch.arange(N), targets]
    assert torch.allclose(kl.double(), torch.expm1(d) - d, rtol=1e-4, atol=1e-6)
    assert torch.allclose(la, lb, rtol=1e-5, atol=1e-7) and torch.allclose(ka, kb, rtol=1e-5, atol=1e-8)
    assert ka > 0 and gb.abs().max() > 0
    assert torch.allclose(ga, gb, rtol=1e-4, atol=1e-6)
    with pytest.raises(ValueError, match="not both"):
        policy_loss(full(logp), full(old), full(ref), adv, mask, kl=full(kl))


def test_dr_grpo_normaliser_takes_max_len_without_a_global_denominator():
    """seq-mean-token-sum-norm divides by B x max_len (the fixed length, not the batch's T) in
    aggregate() and in policy_loss() alike when no step-wide denominator is given."""
    logp, old, ref, adv, mask = _random_batch(7, B=4, T=6)
    vals = torch.where(mask, logp, torch.zeros_like(logp))
    assert aggregate(logp, mask, "seq-mean-token-sum-norm", max_len=10).item() == pytest.approx(
        vals.sum().item() / (4 * 10), rel=1e-12)
    assert aggregate(logp, mask, "seq-mean-token-sum-norm").item() == pytest.approx(vals.sum().item() / (4 * 6), rel=1e-12)
    kw = dict(agg="seq-mean-token-sum-norm", beta=0.05)
    loss, _ = policy_loss(logp, old, ref, adv, mask, max_len=10, **kw)
    given, _ = policy_loss(logp, old, ref, adv, mask, denominator=torch.tensor(40.0), **kw)
    assert loss.item() == pytest.approx(given.item(), rel=1e-12)


@pytest.mark.parametrize("agg", AGGREGATIONS)
def test_pg_loss_metric_is_on_the_losss_normaliser(agg):
    """With beta = 0 the loss is its clipped-surrogate part: the pg_loss metric equals it under a
    step-wide denominator too (it is logged as the loss's share)."""
    logp, old, ref, adv, mask = _random_batch(8, B=5, T=7)
    loss, met = policy_loss(logp, old, None, adv, mask, beta=0.0, agg=agg, denominator=torch.tensor(100.0), max_len=9)
    assert met["pg_loss"].item() == pytest.approx(loss.item(), rel=1e-6, abs=1e-9) and loss.item() != 0.0


def test_old_and_reference_log_probs_are_constants():
    """No gradient flows into old_logp or ref_logp, and old_logp = logp (the first update epoch)
    still gives the policy gradient -A / n per token (token-mean), not 0."""
    g = torch.Generator().manual_seed(9)
    logp = -torch.rand(3, 4, generator=g, dtype=torch.float64) * 4
    ref = logp + 0.5 * torch.randn(3, 4, generator=g, dtype=torch.float64)
    mask = torch.ones(3, 4, dtype=torch.bool)
    adv = torch.tensor([1.0, -2.0, 0.5], dtype=logp.dtype)
    lp = logp.clone().requires_grad_()
    r = ref.clone().requires_grad_()
    loss, _ = policy_loss(lp, lp, r, adv, mask, beta=0.1)
    loss.backward()
    assert r.grad is None or torch.equal(r.grad, torch.zeros_like(r.grad))
    d = ref - logp  # the k3 term's gradient w.r.t. logp: (1 - exp(d)) x beta / n
    want = (-adv[:, None] + 0.1 * (1 - torch.exp(d))) / mask.sum()
    torch.testing.assert_close(lp.grad, want, rtol=1e-10, atol=1e-12)


# ----------------------------------------------------------------------------- mutation round 14a


def test_loss_denominator_is_a_float32_scalar_on_the_masks_device_for_every_agg():
    """The contract: a 0-d float32 tensor on mask's device, whatever the aggregation (an int64
    count, a float64 or a CPU tensor for a CUDA mask would make the step's all-reduce sum mix
    dtypes or devices); the default aggregation is token-mean; a mask that is not [B, T] is
    refused, not counted."""
    mask = torch.tensor([[1, 1, 0, 0], [0, 0, 0, 0], [1, 0, 1, 1]])
    for agg in AGGREGATIONS:
        den = loss_denominator(mask, agg)
        assert den.dtype == torch.float32 and den.dim() == 0, agg
        meta = loss_denominator(torch.ones(2, 3, dtype=torch.bool, device="meta"), agg)
        assert meta.device.type == "meta" and meta.dtype == torch.float32, agg
    assert loss_denominator(mask).item() == 5  # token-mean
    with pytest.raises(ValueError, match=r"mask must be \[B, T\]"):
        loss_denominator(torch.ones(4, dtype=torch.bool))


def test_aggregate_defaults_to_token_mean_and_honours_any_positive_denominator():
    """aggregate()'s default is token-mean like policy_loss's; a given denominator is used as it
    is (0.5 doubles the sum: only a zero one becomes 1) and is a constant (no gradient reaches a
    denominator tensor that requires one)."""
    x = torch.tensor([[1.0, 2.0, 3.0], [4.0, 0.0, 0.0]], requires_grad=True)
    m = torch.tensor([[True, True, True], [True, False, False]])
    assert aggregate(x, m).item() == pytest.approx(10.0 / 4)  # seq-mean-token-mean would be 3.0
    assert aggregate(x, m, denominator=0.5).item() == pytest.approx(20.0)
    den = torch.tensor(8.0, requires_grad=True)
    aggregate(x, m, denominator=den).backward()
    assert den.grad is None
    assert torch.equal(x.grad, m.float() / 8)


def test_policy_loss_refuses_reference_kl_and_advantages_of_the_wrong_shape():
    """ref_logp and a precomputed kl must be [B, T] like logp (not broadcast from one row), and
    advantages [B] or [B, 1]/[B, T]: one row of advantages for B rows, a width other than 1 or T,
    or a scalar would be broadcast silently over the batch; logp must be [B, T]."""
    x = torch.zeros(2, 3)
    adv = torch.zeros(2)
    m = torch.ones(2, 3, dtype=torch.bool)
    with pytest.raises(ValueError, match=r"ref_logp has shape \(1, 3\)"):
        policy_loss(x, x, torch.zeros(1, 3), adv, m)
    with pytest.raises(ValueError, match=r"kl has shape \(1, 3\)"):
        policy_loss(x, x, None, adv, m, kl=torch.zeros(1, 3))
    for bad in (torch.zeros(1, 3), torch.zeros(2, 2), torch.tensor(1.0), torch.zeros(2, 3, 1)):
        with pytest.raises(ValueError, match=r"advantages must be \[B\] or \[B, T\]"):
            policy_loss(x, x, None, bad, m)
    with pytest.raises(ValueError, match=r"logp must be \[B, T\]"):
        policy_loss(torch.zeros(6), torch.zeros(6), None, torch.zeros(6), torch.ones(6, dtype=torch.bool))


def test_advantages_are_constants():
    """Advantages that carry a graph (computed from something with grad) get no gradient from
    the loss: they weigh the policy gradient, they are not trained."""
    logp = torch.tensor([[-1.0, -2.0]], requires_grad=True)
    adv = torch.tensor([1.5], requires_grad=True)
    loss, _ = policy_loss(logp, logp.detach(), None, adv * 1.0, torch.ones(1, 2), beta=0.0)
    loss.backward()
    assert adv.grad is None
    torch.testing.assert_close(logp.grad, torch.tensor([[-0.75, -0.75]]))


def test_a_ratio_exactly_on_a_clip_bound_is_not_clipped():
    """At r == 1 - eps_low (A < 0) or r == 1 + eps_high (A > 0) the clip does not bind: the
    gradient is the unclipped -A r / n (torch.clamp passes it at the bound) and the clip fractions
    count neither token (they count r strictly outside the range, as the gradient does)."""
    old = torch.tensor([[-1.0, -0.5]])
    logp = torch.tensor([[-1.3, -0.2]], requires_grad=True)
    r = torch.exp(logp.detach() - old)  # the ratios exactly as policy_loss computes them
    eps_low, eps_high = 1.0 - r[0, 0].item(), r[0, 1].item() - 1.0  # (both exact in float64)
    assert 1.0 - eps_low == r[0, 0].item() and 1.0 + eps_high == r[0, 1].item()
    loss, met = policy_loss(logp, old, None, torch.tensor([[-1.0, 1.0]]), torch.ones(1, 2),
                            eps_low=eps_low, eps_high=eps_high, beta=0.0)
    assert met["clip_frac_low"].item() == 0.0 and met["clip_frac_high"].item() == 0.0
    loss.backward()
    torch.testing.assert_close(logp.grad, torch.tensor([[r[0, 0].item() / 2, -r[0, 1].item() / 2]]))


@pytest.mark.parametrize("agg", AGGREGATIONS)
def test_a_batch_of_no_rows_gives_zero_loss_and_metrics(agg):
    """A micro-batch with no rows ([0, T]: a rank whose share of the step is empty) gives a zero
    loss that backward accepts and every metric 0, as a batch with nothing masked does."""
    lp = torch.zeros(0, 5, requires_grad=True)
    loss, met = policy_loss(lp, lp.detach(), lp.detach(), torch.zeros(0), torch.zeros(0, 5, dtype=torch.bool), agg=agg)
    loss.backward()
    assert loss.item() == 0.0 and lp.grad.shape == (0, 5)
    assert {k: v.item() for k, v in met.items()} == dict.fromkeys(met, 0.0)


def test_bf16_log_probs_against_float32_old_log_probs_compare_in_float32():
    """old_logp is upcast to the computation dtype (float32), not rounded to logp's bf16: the
    ratio of a bf16 logp to a float32 old_logp is exp(logp - old) in float32 (bf16 rounding of
    old_logp ~ -3.1 moves the ratio by up to ~1%)."""
    logp = torch.tensor([[-3.125, -2.0, -5.0]], dtype=torch.bfloat16, requires_grad=True)
    old = torch.tensor([[-3.1, -2.01, -4.97]])
    adv = torch.tensor([1.0])
    loss, met = policy_loss(logp, old, None, adv, torch.ones(1, 3), beta=0.0, eps_low=10.0, eps_high=10.0)
    r = torch.exp(logp.detach().double() - old.double())
    assert loss.dtype == torch.float32
    assert loss.item() == pytest.approx(-r.mean().item(), rel=1e-6)
    assert met["ratio_max"].item() == pytest.approx(r.max().item(), rel=1e-6)


def test_kl_k3_is_differentiable_in_the_reference_too():
    """kl_k3 (a pure function, unlike policy_loss which detaches ref_logp) is differentiable in
    both arguments: d k3 / d ref = exp(ref - logp) - 1."""
    lp = torch.tensor([-1.0, -2.0, -0.5, -3.0], dtype=torch.float64)
    ref = torch.tensor([-1.3, -1.95, -0.5, -0.2], dtype=torch.float64, requires_grad=True)
    kl_k3(lp, ref).sum().backward()
    torch.testing.assert_close(ref.grad, torch.expm1(ref.detach() - lp), rtol=1e-9, atol=1e-15)


def test_pg_loss_metric_leaves_the_kl_term_out():
    """pg_loss is the clipped-surrogate part of the loss only: with beta > 0 the loss is pg_loss
    plus beta times the aggregated k3, and pg_loss is the loss that beta = 0 gives."""
    logp, old, ref, adv, mask = _random_batch(11, B=5, T=7)
    for agg in AGGREGATIONS:
        loss, met = policy_loss(logp, old, ref, adv, mask, beta=0.5, agg=agg)
        loss0, _ = policy_loss(logp, old, ref, adv, mask, beta=0.0, agg=agg)
        klagg = aggregate(kl_k3(torch.where(mask, logp, 0.0), torch.where(mask, ref, 0.0)), mask, agg)
        assert klagg.item() > 1e-3
        assert met["pg_loss"].item() == pytest.approx(loss0.item(), rel=1e-6, abs=1e-9), agg
        assert loss.item() == pytest.approx(loss0.item() + 0.5 * klagg.item(), rel=1e-9, abs=1e-12), agg


def test_pg_loss_metric_takes_max_len_without_a_global_denominator():
    """Dr. GRPO without a step-wide denominator: the loss divides by B x max_len, and so does the
    pg_loss metric logged beside it (not by B x T, the padded width)."""
    logp, old, _, adv, mask = _random_batch(12, B=4, T=6)
    loss, met = policy_loss(logp, old, None, adv, mask, beta=0.0, agg="seq-mean-token-sum-norm", max_len=10)
    assert loss.item() != 0.0
    assert met["pg_loss"].item() == pytest.approx(loss.item(), rel=1e-6, abs=1e-9)
