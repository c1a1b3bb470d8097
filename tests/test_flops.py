"""r3.flops: the model FLOPs behind metrics.jsonl's MFU, against hand counts, a naive count per
position, and torch's FLOP counter on the model's own forward; the peak's sources."""

from __future__ import annotations

import math

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from conftest import tiny_hf_config
from r3 import flops as F
from r3.errors import R3Error
from r3.model import ModelConfig, Transformer


def _cfg(kind="qwen2", **over) -> ModelConfig:
    return ModelConfig.from_hf(tiny_hf_config(kind, **over).to_dict())


def test_matmul_flops_per_token_by_hand():
    cfg = _cfg("qwen2")  # hidden 64, 4 heads x 16, 2 kv heads, MLP 96, 2 layers
    q, kv = 4 * 16, 2 * 16
    per_layer = 2 * (64 * q + 2 * 64 * kv + q * 64 + 3 * 64 * 96)
    assert F.matmul_flops_per_token(cfg) == 2 * per_layer == 2 * 2 * (4096 + 4096 + 4096 + 18432)


@pytest.mark.parametrize("window", [None, 1, 3, 8, 50])
def test_keys_attended_equal_a_count_per_position(window):
    for lo in range(0, 12):
        for hi in range(lo, 30):
            naive = sum(min(p + 1, window or 10 ** 9) for p in range(lo, hi))
            assert F._keys(lo, hi, window) == naive, (lo, hi, window)


def test_attention_flops_follow_each_layers_window():
    cfg = _cfg("mistral")  # sliding window 8 on every layer, head_dim 24
    assert cfg.layer_windows == [8, 8]
    per_key = 4 * cfg.num_attention_heads * cfg.head_dim
    assert F.attention_flops(cfg, 0, 20) == 2 * per_key * sum(min(p + 1, 8) for p in range(20))
    dense = _cfg("llama")
    assert F.attention_flops(dense, 5, 9) == 2 * 4 * 4 * 16 * (6 + 7 + 8 + 9)


def test_the_measured_rate_is_two_flops_per_multiply_add_over_the_best_timing(monkeypatch):
    """A clock that advances 1 s per reading: each timing of ``each`` matmuls takes 1 s."""
    clock = iter(range(10 ** 6))
    monkeypatch.setattr(F.time, "perf_counter", lambda: float(next(clock)))
    for each in (1, 5):
        rate = F.measured_matmul_rate(torch.device("cpu"), torch.float32, n=64, seconds=0.5, each=each)
        assert rate == 2 * 64 ** 3 * each


def test_rows_with_other_prefixes_of_the_same_length_each_pay_their_prefix():
    cfg = _cfg("llama")
    one = F.forward_flops(cfg, [[1, 2, 3, 9, 9]], [(3, 5)])
    assert F.forward_flops(cfg, [[1, 2, 3, 9, 9], [4, 5, 6, 9, 9]], [(3, 5), (3, 5)]) == 2 * one
    assert F.forward_flops(cfg, [[1, 2, 3, 9, 9], [1, 2, 3, 8, 8]], [(3, 5), (3, 5)]) < 2 * one


def test_forward_flops_counts_each_prefix_once_and_the_head_at_the_targets():
    cfg = _cfg("llama")
    body, head = F.matmul_flops_per_token(cfg), 2 * 64 * 256
    prefix = [5, 6, 7, 8]
    seqs = [prefix + [1, 2, 3, 99], prefix + [4, 4, 99], [9, 9] + [1, 2]]
    spans = [(4, 7), (4, 6), (2, 4)]  # (a span ends before the retry: 99 is never read)
    want = (body * 4 + F.attention_flops(cfg, 0, 4)  # the shared prefix, once
            + body * 2 + F.attention_flops(cfg, 4, 6) + head * 3  # row 0: tokens 4, 5 feed targets 5, 6
            + body * 1 + F.attention_flops(cfg, 4, 5) + head * 2
            + body * 2 + F.attention_flops(cfg, 0, 2) + body * 1 + F.attention_flops(cfg, 2, 3) + head * 2)
    assert F.forward_flops(cfg, seqs, spans) == want
    # the same rows one by one: the prefix is counted per distinct prefix, not per call order
    assert F.forward_flops(cfg, seqs[::-1], spans[::-1]) == want
    assert F.forward_flops(cfg, [], []) == 0


@pytest.mark.parametrize("kind", ["qwen2", "gemma4"])  # (Gemma 4: per-layer shapes, shared layers, per-layer inputs)
def test_the_matmuls_equal_torchs_count_of_the_models_forward(kind):
    """torch's FLOP counter on our forward of one row up to its last target, LM head at the
    targets: its matmuls are exactly the count (it has no formula for the CPU's fused attention
    kernel, which the per-position count above checks)."""
    cfg = _cfg(kind)
    model = Transformer(cfg).eval()
    seq, (start, end) = list(range(3, 3 + 14)), (9, 14)
    tokens = torch.tensor([seq[: end - 1]])
    cols = torch.arange(start - 1, end - 1)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(tokens, at=(torch.zeros_like(cols), cols))
    by_op = {str(op): n for op, n in counter.get_flop_counts()["Global"].items()}
    assert set(by_op) == ({"aten.mm", "aten.addmm"} if kind == "qwen2" else {"aten.mm"})  # (q/k/v biases: addmm)
    matmuls = sum(by_op.values())
    T = end - 1
    assert matmuls == F.matmul_flops_per_token(cfg) * T + 2 * cfg.hidden_size * cfg.vocab_size * (end - start)
    assert F.forward_flops(cfg, [seq], [(start, end)]) == matmuls + F.attention_flops(cfg, 0, T)


def _freeze_all_but(model, keep: set[str]) -> None:
    for name, p in model.named_parameters(remove_duplicate=False):
        if name not in keep:
            p.requires_grad_(False)
    for name, p in model.named_parameters(remove_duplicate=False):  # (a tied head: its embeddings' name kept)
        if name in keep:
            p.requires_grad_(True)


# (kind, parameters left to train: None = all; else names, or a prefix of names)
FREEZES = [
    ("qwen2", None),
    ("qwen2", {"lm_head.weight"}),  # the head's weight gradient only
    ("qwen2", {"norm.weight"}),  # the head's input gradient only
    ("qwen2", {"layers.1.mlp.down_proj.weight"}),  # one matmul: the head's and that matmul's gradients
    ("qwen2", "layers.1."),  # the top block
    ("qwen2", {"layers.0.self_attn.qkv_proj.bias"}),  # a bias: everything after it, not its matmul's input
    ("qwen3", {"layers.1.self_attn.q_norm.weight"}),  # after qkv, before the attention
    ("llama", {"embed_tokens.weight"}),  # tied: the embeddings are the head
    ("llama", "layers."),  # tied head frozen, every block trains
    ("olmo2", {"layers.0.post_attention_layernorm.weight"}),
    ("gemma3", {"layers.1.pre_feedforward_layernorm.weight"}),
    ("gemma4", None),
    ("gemma4", {"per_layer_model_projection.weight"}),  # per-layer inputs enter at layer 0's gate product
    ("gemma4", {"embed_tokens_per_layer.weight", "layers.2.self_attn.o_proj.weight"}),
    ("gemma4", {"layers.3.self_attn.qkv_proj.weight"}),  # (layer 3 reads its own keys and values)
]


@pytest.mark.parametrize("kind,keep", FREEZES)
def test_the_backward_equals_torchs_count_of_what_autograd_runs_with_frozen_parameters(kind, keep):
    """torch's FLOP counter on our forward and backward of one row, some parameters frozen: its
    matmuls in the backward are exactly ``backward_flops`` less the attention's backward (which
    it has no formula for on the CPU, and which runs in the layers where a trainable parameter
    enters before it); with every parameter training, the backward is twice the forward."""
    cfg = _cfg(kind)
    model = Transformer(cfg)
    names = [n for n, _ in model.named_parameters(remove_duplicate=False)]
    if keep is not None:
        keep = {n for n in names if n.startswith(keep)} if isinstance(keep, str) else keep
        assert keep <= set(names) and keep
        _freeze_all_but(model, keep)
    trainable = {n for n, p in model.named_parameters(remove_duplicate=False) if p.requires_grad}
    seq, (start, end) = list(range(3, 3 + 14)), (9, 14)
    tokens = torch.tensor([seq[: end - 1]])
    cols = torch.arange(start - 1, end - 1)
    logits = model(tokens, at=(torch.zeros_like(cols), cols))
    with FlopCounterMode(display=False) as counter:
        logits.float().square().sum().backward()
    counted = sum(counter.get_flop_counts()["Global"].values())
    T = end - 1
    first = min(F.parameter_position(cfg, n) for n in trainable)
    windows = cfg.layer_windows or [None] * cfg.num_hidden_layers
    attention = 2 * 4 * cfg.num_attention_heads * sum(cfg.layer_head_dim(n) * F._keys(0, T, windows[n])
                                                      for n in range(cfg.num_hidden_layers) if first < (n, 3))
    got = F.backward_flops(cfg, [seq], [(start, end)], trainable)
    assert got - attention == counted > 0
    assert F.backward_flops(cfg, [seq], [(start, end)], set(names)) == F.backward_flops(cfg, [seq], [(start, end)]) \
        == 2 * F.forward_flops(cfg, [seq], [(start, end)])
    if keep is None:
        assert got == 2 * F.forward_flops(cfg, [seq], [(start, end)])
    else:
        assert got < 2 * F.forward_flops(cfg, [seq], [(start, end)])


@pytest.mark.parametrize("kind", ["llama", "qwen2", "qwen3", "phi3", "gemma2", "gemma3", "gemma4", "olmo2", "olmo3",
                                  "granite", "smollm3", "mistral", "ministral3", "qwen35"])
def test_every_parameter_of_every_family_has_a_place_in_the_forward(kind):
    cfg = _cfg(kind)
    for name, _ in Transformer(cfg).named_parameters(remove_duplicate=False):
        F.parameter_position(cfg, name)
    with pytest.raises(R3Error, match="no place in the forward known for parameter 'layers.0.adapter.weight'"):
        F.parameter_position(cfg, "layers.0.adapter.weight")


def test_backward_flops_over_a_shared_prefix_and_nothing_trainable():
    """The backward runs over the rows' passes as the forward does (each prefix once); frozen
    blocks below the first trainable one cost nothing, and a step with nothing trainable none."""
    cfg = _cfg("llama")  # 2 blocks, tied
    prefix = [5, 6, 7, 8]
    seqs, spans = [prefix + [1, 2, 3], prefix + [4, 4]], [(4, 7), (4, 6)]
    top = {n for n, _ in Transformer(cfg).named_parameters() if n.startswith("layers.1.")}
    block = F.matmul_flops_per_token(cfg) // 2  # (both blocks have one shape)
    tokens = 4 + 2 + 1  # the prefix once, then each row to its last target
    attention_1 = 2 * 4 * 4 * 16 * (F._keys(0, 4, None) + F._keys(4, 6, None) + F._keys(4, 5, None))
    head = 2 * 64 * 256 * (3 + 2)  # its input gradient, at the targets: the tied head does not train
    assert F.backward_flops(cfg, seqs, spans, top) == 2 * block * tokens + attention_1 + head
    assert F.backward_flops(cfg, seqs, spans, set()) == 0


def test_peak_sources(monkeypatch):
    monkeypatch.setenv("R3_PEAK_TFLOPS", "12.5")
    assert F.peak_flops(torch.device("cpu"), torch.bfloat16) == (12.5e12, "R3_PEAK_TFLOPS")
    for bad in ("abc", "0", "-3", "inf", "nan"):
        monkeypatch.setenv("R3_PEAK_TFLOPS", bad)
        with pytest.raises(R3Error, match="R3_PEAK_TFLOPS must be a positive number"):
            F.peak_flops(torch.device("cpu"), torch.bfloat16)
    monkeypatch.delenv("R3_PEAK_TFLOPS")
    rate, source = F.peak_flops(torch.device("cpu"), torch.float32)
    assert source == "measured" and math.isfinite(rate) and rate > 1e8
    # the datasheet by product name, most specific first; bf16/fp16 only
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    cuda = torch.device("cuda", 0)
    for name, want in (("NVIDIA H100 80GB HBM3", 989e12), ("NVIDIA H100 PCIe", 756e12), ("NVIDIA H100 NVL", 835e12),
                       ("NVIDIA H200", 989e12), ("NVIDIA A100-SXM4-80GB", 312e12), ("NVIDIA L40S", 362e12),
                       ("NVIDIA L40", 181e12), ("NVIDIA L4", 121e12), ("NVIDIA GH200 480GB", 989e12),
                       ("NVIDIA RTX A1000 6GB Laptop GPU", None), ("NVIDIA GeForce RTX 3060", None),
                       ("NVIDIA GB200", 2500e12), ("NVIDIA B200", 2250e12),
                       ("NVIDIA A100-SXM4-40GB MIG 1g.5gb", None), ("NVIDIA H100 80GB HBM3 MIG 3g.40gb", None)):
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None, name=name: name)
        assert F.datasheet_peak(cuda, torch.bfloat16) == want, name
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H100 80GB HBM3")
    assert F.datasheet_peak(cuda, torch.bfloat16) == 989e12 and F.datasheet_peak(cuda, torch.float16) == 989e12
    assert F.datasheet_peak(cuda, torch.float32) is None  # (fp32 runs off the tensor cores' bf16 rate)
    assert F.datasheet_peak(torch.device("cpu"), torch.bfloat16) is None


def test_step_metrics_mfu_is_the_flops_over_the_training_passes_time_and_peak():
    from types import SimpleNamespace

    from r3.distributed import Dist
    from r3.metrics import format_step_line, step_metrics

    ep = SimpleNamespace(rewards=torch.tensor([[1.0, 0.0]]), queries=1, first_success=0, spans=[(3, 5), (3, 6)], records=[],
                         generated_tokens=40, times={})
    upd = {"loss": 0.1, "kl_sum": 0.0, "tokens": 5, "clip_low_sum": 0.0, "clip_high_sum": 0.0, "logp_diff_sum": 0.0,
           "logp_diff_tokens": 0, "logp_diff_max": 0.0, "grad_norm": 1.0, "skipped": False, "kl_scored": True}
    times = {"step": 10.0, "rollout": 7.0, "reference": 1.0, "update": 2.0}
    d = Dist(rank=0, world=1, local_rank=0, device=torch.device("cpu"), mesh=None)
    kw = dict(lr=1e-5, data_position=0, fresh_attempts=True)
    row = step_metrics(1, ep, torch.tensor([[0.7, -0.7]]), upd, times, d, flops=6e12, peak_flops=4e12, **kw)
    assert row["mfu"] == pytest.approx(6e12 / (3.0 * 4e12)) and row["peak_tflops"] == pytest.approx(4.0)
    assert "| mfu 50.0% |" in format_step_line(row, 3, 1.0)
    none = step_metrics(1, ep, torch.tensor([[0.7, -0.7]]), upd, times, d, flops=6e12, peak_flops=0.0, **kw)
    assert none["mfu"] is None and none["peak_tflops"] is None and "mfu" not in format_step_line(none, 3, 1.0)
    no_ref = step_metrics(1, ep, torch.tensor([[0.7, -0.7]]), {**upd, "kl_scored": False}, times, d, flops=6e12,
                          peak_flops=4e12, **kw)
    assert row["kl"] == 0.0 and no_ref["kl"] is None  # (beta 0: no reference, so no KL measured)
    idle = step_metrics(1, ep, torch.tensor([[0.0, 0.0]]), upd, times, d, flops=0.0, peak_flops=4e12, **kw)
    assert idle["mfu"] is None and idle["peak_tflops"] == pytest.approx(4.0)  # (no training pass ran)


@pytest.mark.parametrize("beta,epochs,skip", [(0.001, 1, True), (0.0, 1, True), (0.05, 2, False), (0.0, 3, True)])
def test_training_flops_count_each_pass_over_the_rows_the_update_keeps(beta, epochs, skip):
    """The reference's forward (beta > 0), the pre-update policy's (more than one epoch) and the
    update's forward and backward (3 forwards) per epoch, over the kept rows only."""
    from types import SimpleNamespace

    from r3.train import training_flops

    cfg = _cfg("llama")
    prefix_a, prefix_b = [1, 2, 3], [4, 5, 6, 7, 8]
    ep = SimpleNamespace(sequences=[prefix_a + [9, 9, 9], prefix_a + [8, 8], prefix_b + [7, 7, 7, 7], prefix_b + [6]],
                         spans=[(3, 6), (3, 5), (5, 9), (5, 6)])
    adv = torch.tensor([[0.7, -0.7], [0.0, 0.0]])  # the second group has no signal
    run = SimpleNamespace(cfg=SimpleNamespace(beta=beta, update_epochs=epochs, skip_no_signal_groups=skip, freeze=""),
                          rollout_model=SimpleNamespace(config=cfg))
    rows = [0, 1] if skip else [0, 1, 2, 3]
    forward = F.forward_flops(cfg, [ep.sequences[i] for i in rows], [ep.spans[i] for i in rows])
    passes = (1 if beta > 0 else 0) + (1 if epochs > 1 else 0) + 3 * epochs
    assert training_flops(run, ep, adv) == passes * forward > 0
    nothing = torch.zeros(2, 2)
    assert training_flops(run, ep, nothing) == (0 if skip else passes * forward)


def test_step_metrics_row_by_hand_on_two_ranks(monkeypatch):
    """Every field of a metrics.jsonl row computed by hand, with a stand-in for a second rank
    holding the same counts (all_sum doubles, all_max keeps the larger): fractions over the
    right totals, low and high clips apart, per-retry means, stored attempts (no first-attempt
    success), rates over the rollout's time, the peak per device, and the skip marker."""
    from types import SimpleNamespace

    import r3.metrics as M
    from r3.distributed import Dist

    monkeypatch.setattr(M, "all_sum", lambda values, d: {k: 2 * float(v) for k, v in values.items()})
    monkeypatch.setattr(M, "all_max", lambda value, d: max(value, 0.9))  # (the other rank's max: 0.9)
    ep = SimpleNamespace(rewards=torch.tensor([[1.0, 0.0], [0.0, 0.0]]), queries=3, first_success=1,
                         spans=[(3, 5), (3, 6), (4, 5), (4, 8)], generated_tokens=40, times={"attempt": 1.5},
                         records=[{"reflection_cut": k < 3, "retry_cut": k == 1} for k in range(4)])
    upd = {"loss": 0.1, "kl_sum": 0.6, "tokens": 10, "clip_low_sum": 1.0, "clip_high_sum": 3.0, "logp_diff_sum": 0.5,
           "logp_diff_tokens": 10, "logp_diff_max": 0.2, "grad_norm": 1.5, "skipped": True, "kl_scored": True}
    times = {"step": 10.0, "rollout": 8.0, "reference": 0.5, "update": 1.5}
    d = Dist(rank=0, world=2, local_rank=0, device=torch.device("cpu"), mesh=None)
    adv = torch.tensor([[0.7, -0.7], [0.0, 0.0]])
    row = M.step_metrics(3, ep, adv, upd, times, d, lr=1e-5, data_position=64, fresh_attempts=True,
                         flops=1e12, peak_flops=4e12)
    assert row["loss"] == pytest.approx(0.2) and row["kl"] == pytest.approx(1.2 / 20)
    assert (row["clip_frac_low"], row["clip_frac_high"]) == (pytest.approx(2 / 20), pytest.approx(6 / 20))
    assert row["retry_success"] == pytest.approx(2 / 8) and row["first_try_success"] == pytest.approx(2 / 6)
    assert (row["groups"], row["groups_with_signal"]) == (4, 2)
    assert row["reflection_tokens"] == 2 * (2 + 3 + 1 + 4) and row["trained_tokens"] == 20
    assert row["reflection_len_mean"] == pytest.approx(20 / 8)
    assert row["reflection_cut_frac"] == pytest.approx(6 / 8) and row["retry_cut_frac"] == pytest.approx(2 / 8)
    assert row["logp_diff_mean"] == pytest.approx(1.0 / 20) and row["logp_diff_max"] == 0.9
    assert row["rollout_tokens_per_s"] == pytest.approx(80 / 8.0) and row["tokens_per_s"] == pytest.approx(80 / 10.0)
    assert row["mfu"] == pytest.approx(2e12 / (2.0 * 8e12)) and row["peak_tflops"] == pytest.approx(4.0)
    assert row["attempt_time_s"] == 1.5 and row["data_position"] == 64 and row["lr"] == 1e-5
    assert row["skipped"] is True and row["grad_norm"] == 1.5
    assert format_step_line_of(row).endswith(" | SKIPPED (non-finite)")
    stored = M.step_metrics(3, ep, adv, {**upd, "skipped": False}, times, d, lr=1e-5, data_position=64,
                            fresh_attempts=False, flops=1e12, peak_flops=4e12)
    assert stored["first_try_success"] is None and "SKIPPED" not in format_step_line_of(stored)
    # the verifier's time is said where it is a tenth of the rollout or more (a slow plug-in)
    assert "of which verify" not in format_step_line_of(dict(row, rollout_time_s=8.0, verify_time_s=0.79))
    assert "(rollout 8.0 of which verify 0.8, ref " in format_step_line_of(dict(row, rollout_time_s=8.0,
                                                                                verify_time_s=0.8))


def format_step_line_of(row):
    from r3.metrics import format_step_line

    return format_step_line(row, 10, 5.0)


def test_rows_whose_prefixes_differ_only_in_the_last_token_each_pay_their_prefix():
    """Found by mutation: the prefix is every token before the span, its last one included."""
    cfg = _cfg("llama")
    one = F.forward_flops(cfg, [[1, 2, 3, 9, 9]], [(3, 5)])
    assert F.forward_flops(cfg, [[1, 2, 3, 9, 9], [1, 2, 4, 9, 9]], [(3, 5), (3, 5)]) == 2 * one


def test_the_measured_rate_takes_the_fastest_timing_not_the_last(monkeypatch):
    """A clock whose timings of one matmul take 1 s, 3 s, 2 s, 4 s (then 10 s, past ``seconds``): the
    rate is that of the 1 s one."""
    readings, t = [], 0.0
    for dt in (1.0, 3.0, 2.0, 4.0):  # (each timing reads the clock twice)
        readings += [t, t + dt]
        t += dt
    clock = iter(readings)
    monkeypatch.setattr(F.time, "perf_counter", lambda: next(clock))
    rate = F.measured_matmul_rate(torch.device("cpu"), torch.float32, n=16, seconds=8.5, each=1)
    assert rate == 2 * 16 ** 3 / 1.0


def test_the_datasheet_matches_the_h200_nvl_before_the_h200(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H200 NVL")
    assert F.datasheet_peak(torch.device("cuda", 0), torch.bfloat16) == 835e12


def test_step_metrics_times_signal_and_a_step_without_retries():
    """The row's times are each part's own (step, reference, update; the rollout's parts from the
    episode); a group with some advantage not zero has signal; a step whose first attempts all
    passed (no group, no retry) has retry success 0, and its line prints."""
    from types import SimpleNamespace

    from r3.distributed import Dist
    from r3.metrics import format_step_line, step_metrics

    d = Dist(rank=0, world=1, local_rank=0, device=torch.device("cpu"), mesh=None)
    upd = {"loss": 0.0, "kl_sum": 0.0, "tokens": 0, "clip_low_sum": 0.0, "clip_high_sum": 0.0, "logp_diff_sum": 0.0,
           "logp_diff_tokens": 0, "logp_diff_max": 0.0, "grad_norm": 0.0, "skipped": False, "kl_scored": True}
    times = {"step": 10.0, "rollout": 7.0, "reference": 1.0, "update": 2.0}
    kw = dict(lr=1e-5, data_position=0, fresh_attempts=True, flops=0.0, peak_flops=0.0)
    ep = SimpleNamespace(rewards=torch.tensor([[1.0, 0.5, 0.0], [1.0, 1.0, 1.0]]), queries=2, first_success=0,
                         spans=[(3, 5)] * 6, generated_tokens=40, records=[{"reflection_cut": False, "retry_cut": False}] * 6,
                         times={"attempt": 1.5, "reflection": 2.5, "retry": 3.0})
    row = step_metrics(1, ep, torch.tensor([[1.0, 0.0, -1.0], [0.0, 0.0, 0.0]]), upd, times, d, **kw)
    assert (row["groups"], row["groups_with_signal"]) == (2, 1)  # (an advantage of 0 in a group with signal)
    assert (row["step_time_s"], row["rollout_time_s"], row["reference_time_s"], row["update_time_s"]) == (10.0, 7.0, 1.0, 2.0)
    assert (row["attempt_time_s"], row["reflection_time_s"], row["retry_time_s"]) == (1.5, 2.5, 3.0)
    easy = SimpleNamespace(rewards=torch.zeros(0, 3), queries=2, first_success=2, spans=[], generated_tokens=12, times={},
                           records=[])
    row = step_metrics(1, easy, torch.zeros(0, 3), upd, times, d, **kw)
    assert row["retry_success"] == 0.0 and row["reflection_len_mean"] == 0.0 and row["first_try_success"] == 1.0
    assert row["reflection_cut_frac"] == row["retry_cut_frac"] == 0.0
    assert row["groups"] == 0 and row["kl"] is None
    assert "| retry 0.00 | first 1.00 | signal 0/0 |" in format_step_line(row, 3, 1.0)


def test_the_step_line_by_hand():
    """Every field of the printed line in its place: signal as groups with signal over groups, the
    four times each its own, the ETA the one given."""
    from r3.metrics import format_step_line

    row = {"step": 4, "loss": -0.03125, "kl": 0.0123, "retry_success": 0.375, "first_try_success": 0.25,
           "groups_with_signal": 3, "groups": 8, "step_time_s": 12.34, "rollout_time_s": 8.1, "reference_time_s": 0.6,
           "update_time_s": 3.2, "mfu": 0.125, "skipped": False}
    assert format_step_line(row, 10, 3725.0) == (
        "step 4/10 | loss -0.0312 | kl 1.23e-02 | retry 0.38 | first 0.25 | signal 3/8 | 12.3s/step (rollout 8.1, "
        "ref 0.6, update 3.2) | mfu 12.5% | ETA 1h02m")


def test_training_flops_with_frozen_parameters_count_the_backward_of_what_trains():
    """With --freeze the update's backward is ``backward_flops`` over the policy's trainable
    parameters (a tied head under both its names); the forwards are as without it."""
    from types import SimpleNamespace

    from r3.train import freeze_parameters, training_flops

    cfg = _cfg("llama")  # tied
    policy = Transformer(cfg)
    freeze_parameters(policy, "embed_tokens.weight,layers.0.*")
    ep = SimpleNamespace(sequences=[[1, 2, 3, 9, 9, 9], [1, 2, 3, 8, 8]], spans=[(3, 6), (3, 5)])
    adv = torch.tensor([[0.7, -0.7]])
    run = SimpleNamespace(cfg=SimpleNamespace(beta=0.001, update_epochs=2, skip_no_signal_groups=True,
                                              freeze="embed_tokens.weight,layers.0.*"),
                          rollout_model=SimpleNamespace(config=cfg), policy=policy)
    forward = F.forward_flops(cfg, ep.sequences, ep.spans)
    trainable = {n for n, p in policy.named_parameters() if p.requires_grad}
    assert trainable and not any(n.startswith(("embed_tokens", "lm_head", "layers.0.")) for n in trainable)
    backward = F.backward_flops(cfg, ep.sequences, ep.spans, trainable)
    assert 0 < backward < 2 * forward
    assert training_flops(run, ep, adv) == forward * (1 + 1 + 2) + backward * 2
    run.cfg.freeze = ""
    for p in policy.parameters():
        p.requires_grad_(True)
    assert training_flops(run, ep, adv) == forward * (1 + 1 + 3 * 2)


def test_qwen35_counts_its_gated_deltanets_and_gated_attention_by_hand():
    """Qwen 3.5 (layers 0, 1, 3 Gated DeltaNets, 2 attention): a DeltaNet's projections, conv
    (2 FLOPs a tap and channel) and delta rule (6 dk dv per value head and token) per token, and
    no attention scores; the attention layer's query projection twice as wide (its output gate).
    The backward with every parameter training is twice the forward."""
    cfg = _cfg("qwen35")  # hidden 64, 4 heads x 16, 2 kv heads, MLP 96; DeltaNet 2 key heads x 8, 4 value heads x 12
    attention = 2 * (64 * (64 + 64) + 64 * 64 + 64 * 64 + 3 * 64 * 96)
    conv = 2 * 16 + 48  # q, k and v channels
    deltanet = (2 * 64 * conv + 2 * 64 * 48 + 2 * 2 * 64 * 4 + 2 * 48 * 64  # in_proj_qkv, z, b and a; out_proj
                + 2 * 4 * conv + 6 * 4 * 8 * 12 + 6 * 64 * 96)  # conv, delta rule; MLP
    assert F.matmul_flops_per_token(cfg) == 3 * deltanet + attention == 3 * 63360 + 69632
    assert F.attention_flops(cfg, 0, 10) == 4 * 4 * 16 * F._keys(0, 10, None)  # (layer 2 alone)
    seqs, spans = [list(range(20))], [(12, 20)]
    names = [n for n, _ in Transformer(cfg).named_parameters(remove_duplicate=False)]
    assert F.backward_flops(cfg, seqs, spans, set(names)) == 2 * F.forward_flops(cfg, seqs, spans)
    top = {n for n in names if n.startswith("layers.3.mlp.")}  # (only the last DeltaNet's MLP trains)
    # per token (19: the prefix's 12, then the row's 7 to its last target): gate_up's weight
    # gradient (nothing trains before it: no input gradient), down's weight and input gradients;
    # the head's input gradient at the 8 targets
    per_token = 4 * 64 * 96 + 2 * (2 * 96 * 64)
    assert F.backward_flops(cfg, seqs, spans, top) == per_token * 19 + 2 * 64 * 256 * 8
