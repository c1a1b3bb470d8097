"""r3.distributed's process-group set-up on a GPU machine, seen through stand-ins for CUDA and
torch.distributed (this machine has no GPU; the real path runs in benchmarks/gpu_check.py)."""

import pytest
import torch

import r3.distributed as D


class _Stop(Exception):
    pass


def test_nccl_is_given_the_local_gpu_before_the_group_exists(monkeypatch):
    """Each rank sets its own GPU (LOCAL_RANK) and names it to NCCL, so the communicator and every
    barrier use it, not a device guessed from the global rank."""
    calls = []
    monkeypatch.setattr(D.torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(D.torch.cuda, "set_device", lambda dev: calls.append(("set_device", dev)))
    monkeypatch.setattr(D.dist, "is_initialized", lambda: False)

    def init_process_group(backend, **kw):
        calls.append(("init_process_group", backend, kw))
        raise _Stop  # (the rest needs a real group)

    monkeypatch.setattr(D.dist, "init_process_group", init_process_group)
    for k, v in {"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2"}.items():
        monkeypatch.setenv(k, v)
    with pytest.raises(_Stop):
        D.init_distributed()
    gpu = torch.device("cuda", 1)
    assert calls == [("set_device", gpu), ("init_process_group", "nccl", {"device_id": gpu})]


def test_release_device_memory_hands_a_gpus_cached_blocks_back(monkeypatch):
    """After a CLI drops one model: the allocator's cache on a GPU (and compiled code with its
    CUDA-graph pools after decode="compiled"); on a CPU only a collection."""
    from r3.distributed import release_device_memory

    calls = []
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: calls.append("empty_cache"))
    monkeypatch.setattr(torch.compiler, "reset", lambda: calls.append("reset"))
    release_device_memory(torch.device("cpu"), compiled=True)
    assert calls == []
    release_device_memory(torch.device("cuda", 1))
    assert calls == ["empty_cache"]
    release_device_memory(torch.device("cuda"), compiled=True)
    assert calls == ["empty_cache", "reset", "empty_cache"]
