"""benchmarks/memory_plan.py: the formula's parts add up, and its activation term is what
autograd keeps (checked here against the bytes the forward pass actually allocates)."""

import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

TINY = dict(model_type="qwen2", vocab_size=512, hidden_size=64, intermediate_size=160, num_hidden_layers=3,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048, rms_norm_eps=1e-6,
            rope_theta=10000.0, tie_word_embeddings=True, hidden_act="silu")


def test_plan_parts_add_up_and_checkpointing_shrinks_activations():
    import memory_plan as mp

    run = dict(mp.PAPER, batch_size=16)
    plain = mp.plan(TINY, 2, run, False)
    ac = mp.plan(TINY, 2, run, True)
    P = plain["params"]
    assert plain["parts"]["policy fp32 shards"] == 4 * P / 2 and plain["parts"]["rollout copy bf16"] == 2 * P
    assert plain["static"] == sum(plain["parts"].get(k, 0) for k in mp.STATIC)
    update = plain["update_phase"] - plain["static"]
    kv = plain["parts"]["rollout KV cache"]
    assert plain["parts"]["its compacted copy (<= 3/4)"] == 0.75 * kv
    assert plain["total"] == plain["static"] + max(1.75 * kv, update)
    # without checkpointing every block keeps its activations; with it, every block its input and
    # one block all of its activations (during its recomputation)
    n, a, L, h = plain["micro_batch_tokens"], plain["activation_bytes_per_token_layer"], 3, 64
    assert plain["parts"]["activations (one micro-batch)"] == n * L * a
    assert ac["parts"]["activations (one micro-batch)"] == n * L * 2 * h + n * a
    assert ac["parts"]["rollout KV cache"] == plain["parts"]["rollout KV cache"]
    # compiled decode on CUDA: the static cache (64 rows; 830 slots rounded up to 832, plus one
    # bucket: 896) is held all the time, and compactions happen in it
    comp = mp.plan(TINY, 2, run, False, decode="compiled")
    assert plain["rows_per_rank"] == 64 and plain["slots"] == 830
    assert comp["parts"]["static decode cache"] == kv * 896 / 830
    assert comp["parts"]["its compacted copy (<= 3/4)"] == 0
    assert comp["static"] == plain["static"] + kv * 896 / 830
    assert comp["total"] == comp["static"] + max(kv, update)
    # the update's peak from its parts by name: the gradient shards, plus the backward pass's busiest
    # moment (gathered parameters, activations and logits held, or the root's reduce-scatter)
    for p in (plain, ac, comp):
        parts = p["parts"]
        assert parts["gradients fp32 shards"] == 4 * P / 2
        assert p["update_phase"] - p["static"] == pytest.approx(parts["gradients fp32 shards"] + max(
            parts["gathered params + their grads (bf16)"] + parts["activations (one micro-batch)"]
            + parts["logits (reflection positions)"], parts[mp.END_OF_BACKWARD]), rel=1e-12)


def test_activation_term_matches_the_bytes_a_forward_keeps():
    """Whole tiny model, bf16: the per-token, per-block coefficient times tokens and blocks is
    the memory the forward pass leaves allocated for backward, up to what lies outside the
    blocks (the final norm's float32 input and statistics, and the positions: 69 kB, about two
    [T, hidden] bf16 tensors, against the blocks' 2.3 MB here, so a coefficient 2% off fails)."""
    import memory_plan as mp
    from r3.model import ModelConfig, Transformer

    T = 256
    a = mp.activation_bytes_per_token(TINY, T)
    mc = ModelConfig.from_hf(TINY)
    torch.manual_seed(0)
    model = Transformer(mc).to(torch.bfloat16)
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    kept: dict[int, int] = {}

    def pack(t):
        s = t.untyped_storage()
        if s.data_ptr() not in params:
            kept[s.data_ptr()] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model.hidden_states(torch.randint(0, 512, (1, T)))
    blocks = a * T * mc.num_hidden_layers
    outside = sum(kept.values()) - blocks
    assert T * mc.hidden_size * 2 <= outside <= 3 * T * mc.hidden_size * 2


def test_measure_runs_and_the_formula_matches_what_an_update_allocates(tmp_path):
    """``--measure`` as a user runs it (one process here, a small shape given as a config.json):
    the models and an update of two micro-batches (the second holds the first's gradients), with
    and without activation checkpointing, allocate what the formula says, within a quarter."""
    import json
    import subprocess

    shape = dict(TINY, vocab_size=4096, hidden_size=256, intermediate_size=704, num_hidden_layers=4)
    (tmp_path / "config.json").write_text(json.dumps(shape))
    out = tmp_path / "measured.json"
    env = {k: v for k, v in __import__("os").environ.items() if not k.startswith(("RANK", "WORLD_SIZE", "MASTER_"))}
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "memory_plan.py"), "--measure", "--shape",
                           str(tmp_path / "config.json"), "--tokens", "2048", "--micro-batches", "2",
                           "--json", str(out)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    (r,) = json.loads(out.read_text())["measured"]
    assert r["world"] == 1 and r["micro_batches"] == 2 and len(r["phases"]) == 3
    assert abs(r["models_measured_gib"] / r["models_formula_gib"] - 1) < 0.1
    plain, ac = r["phases"][2], r["phases"][1]
    assert not plain["activation_checkpointing"] and ac["activation_checkpointing"]
    assert abs(plain["update_peak_growth_gib"] / r["formula_update_gib"]["false"] - 1) < 0.25
    assert abs(ac["update_peak_growth_gib"] / r["formula_update_gib"]["true"] - 1) < 0.25
    assert ac["update_peak_growth_gib"] < 0.6 * plain["update_peak_growth_gib"]
