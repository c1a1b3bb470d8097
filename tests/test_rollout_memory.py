"""The rollout's KV-cache check before training: sizes by hand, the real cache's bytes, and the
warning r3.train prints when the cache alone is more than the memory a rank has."""

from __future__ import annotations

import torch

from r3 import rollout_memory as M
from r3.model import KVCache, ModelConfig

CFG = ModelConfig(model_type="llama", vocab_size=32, hidden_size=48, intermediate_size=64, num_hidden_layers=3,
                  num_attention_heads=6, num_key_value_heads=2, head_dim=8)


def test_kv_cache_bytes_by_hand_and_as_the_cache_allocates():
    # 2 (k, v) x 3 layers x 2 kv heads x 8 dims x 5 rows x 7 positions x 2 bytes
    assert M.kv_cache_bytes(CFG, rows=5, positions=7, element_size=2) == 2 * 3 * 2 * 8 * 5 * 7 * 2 == 6720
    cache = KVCache.empty(CFG, batch_size=5, max_len=7, dtype=torch.bfloat16, device="cpu")
    assert cache.nbytes() == M.kv_cache_bytes(CFG, 5, 7, 2)
    # the built-in model's shape (SmolLM2-135M: 30 layers, 3 kv heads of 64): 23,040 bytes a token in bf16
    smol = ModelConfig(model_type="llama", vocab_size=49152, hidden_size=576, intermediate_size=1536,
                       num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3, head_dim=64)
    assert M.kv_cache_bytes(smol, 1, 1, 2) == 23040


def test_kv_cache_bytes_of_a_gemma4_with_shared_layers_and_wider_full_heads():
    """Gemma 4's cache: the sliding layers' kv heads, the full layers' own (wider, fewer), none
    for the layers that read an earlier layer's."""
    from conftest import tiny_hf_config

    cfg = ModelConfig.from_hf(tiny_hf_config("gemma4").to_dict())  # layers: sliding, full, sliding, shared x 2
    # 2 (k, v) x (2 sliding layers x 2 kv heads x 16 + 1 full layer x 1 kv head x 32) x 5 x 7 x 2 bytes
    assert M.kv_cache_bytes(cfg, rows=5, positions=7, element_size=2) == 2 * (2 * 2 * 16 + 32) * 5 * 7 * 2 == 13440
    cache = KVCache.empty(cfg, batch_size=5, max_len=7, dtype=torch.bfloat16, device="cpu")
    assert len(cache.k) == 3 and cache.nbytes() == 13440


def test_rollout_rows_are_the_first_attempts_or_the_reflections_whichever_is_more():
    assert M.rollout_rows(8, 8, 1, 2.0) == 64  # 16 first attempts, then 8 failures x G = 8
    assert M.rollout_rows(8, 2, 1, 4.0) == 32  # 32 first attempts, then 8 x 2
    assert M.rollout_rows(16, 4, 2, 2.5) == 32  # per rank: 8 failures -> 20 attempts, 8 x 4 rows
    assert M.rollout_rows(7, 3, 2, 1.5) == 9  # 3 failures per rank (7 // 2) -> ceil(4.5) = 5 attempts, 3 x 3 rows
    assert M.rollout_rows(8, 2, 1, None) == 16  # stored failures: one row each, then 8 x 2


def test_the_warning_says_what_is_needed_and_what_there_is():
    gib = 1024 ** 3
    cpu, gpu = torch.device("cpu"), torch.device("cuda", 0)
    assert M.rollout_memory_warning(2 * gib, 3 * gib, 40, 250, cpu) is None
    assert M.rollout_memory_warning(3 * gib, 3 * gib, 40, 250, cpu) is None  # (exactly fits)
    assert M.rollout_memory_warning(30 * gib, None, 40, 250, cpu) is None  # (unknown: said nothing)
    assert M.rollout_memory_warning(int(214.6 * gib), int(19.9 * gib), 40000, 250, cpu) == (
        "warning: the rollout needs at least 214.6 GiB for its KV cache (40000 rows x 250 positions per rank), more "
        "than the 19.9 GiB available to this rank: it will likely run out of memory (on a CPU the kernel then kills "
        "it without a message); lower --batch-size, --group-size or the token limits")
    assert "GiB free on cuda:0: it will likely run out of memory; lower" in M.rollout_memory_warning(
        5 * gib, gib, 10, 10, gpu)


def test_available_memory_is_shared_by_the_ranks_on_the_machine(monkeypatch, tmp_path):
    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal:       24000000 kB\nMemFree:         1000 kB\nMemAvailable:   8000000 kB\n")
    real_open = open
    monkeypatch.setattr("builtins.open", lambda p, *a, **k: real_open(meminfo if p == "/proc/meminfo" else p, *a, **k))
    assert M.available_bytes(torch.device("cpu")) == 8_000_000 * 1024
    assert M.available_bytes(torch.device("cpu"), local_ranks=4) == 2_000_000 * 1024
    meminfo.write_text("MemTotal: 1 kB\n")  # (no MemAvailable: an old kernel)
    assert M.available_bytes(torch.device("cpu")) is None
    assert M.available_bytes(torch.device("meta")) is None
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "3")
    assert M.local_ranks() == 3
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "x")
    assert M.local_ranks() == 1


def test_r3_train_warns_before_a_rollout_that_cannot_fit(monkeypatch, capsys):
    """--batch-size 5000 on the built-in model filled 24 GiB within a minute and the kernel killed
    the run with no message; the check says so before the first rollout, and nothing when it fits."""
    from r3 import train as T
    from r3.config import TrainConfig
    from r3.distributed import Dist

    d = Dist(rank=0, world=1, local_rank=0, device=torch.device("cpu"), mesh=None)
    model = torch.nn.Linear(2, 2).to(torch.bfloat16)
    model.config = CFG
    cfg = TrainConfig(batch_size=50, group_size=4, max_attempt_tokens=10, max_reflection_tokens=20,
                      max_retry_tokens=10)
    # 200 rows (50 x 4; 100 first attempts) x (20 + 40) positions x 192 bytes a position = 2,304,000
    monkeypatch.setattr(T, "available_bytes", lambda device, ranks: 2_304_000)
    T.say_if_rollout_too_big(cfg, d, model, prompt_tokens=20, fresh=True)
    assert capsys.readouterr().err == ""
    monkeypatch.setattr(T, "available_bytes", lambda device, ranks: 2_303_999)
    T.say_if_rollout_too_big(cfg, d, model, prompt_tokens=20, fresh=True)
    err = capsys.readouterr().err
    assert err.startswith("warning: the rollout needs at least 2.2 MiB for its KV cache (200 rows x 60 positions per "
                          "rank), more than the 2.2 MiB available to this rank"), err
