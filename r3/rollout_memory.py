"""Whether a rollout's KV cache fits: a lower bound of what the first rollout holds, checked
against the memory this rank has before training starts. The whole rollout is one batch (every
first attempt, then every failure's G reflections and retries), so ``--batch-size`` sets its KV
cache; on a CPU a cache past the machine's memory ends with the kernel killing the process and no
message, so r3 says it first."""

from __future__ import annotations

import math
import os

import torch

GIB = 1024 ** 3


def kv_cache_bytes(model_cfg, rows: int, positions: int, element_size: int) -> int:
    """Bytes of a static KV cache (:class:`r3.model.KVCache`) of ``rows`` x ``positions``: keys and
    values of every layer that holds them (Gemma 4: per-layer shapes, none on shared layers), and
    the states of Qwen 3.5's Gated DeltaNet layers (per row, whatever the positions: the delta
    rule's in fp32, the conv's in the compute dtype)."""
    per_position = sum(model_cfg.layer_kv_heads(n) * model_cfg.layer_head_dim(n) for n in model_cfg.cache_layers())
    state = len(model_cfg.linear_layers) * (
        4 * model_cfg.linear_value_heads * model_cfg.linear_key_dim * model_cfg.linear_value_dim
        + element_size * model_cfg.linear_conv_channels * max(0, model_cfg.linear_conv_kernel - 1))
    return 2 * per_position * rows * positions * element_size + rows * state


def rollout_rows(batch_size: int, group_size: int, world: int, candidates_per_failure: float | None) -> int:
    """The most rows one rank's rollout decodes at once: its first attempts (``batch_size / world``
    failures wanted, ``candidates_per_failure`` attempts each; None: stored failures, one row each),
    or its failures' ``group_size`` reflections and retries."""
    local = batch_size // world
    first = local if candidates_per_failure is None else math.ceil(local * candidates_per_failure)
    return max(first, local * group_size)


def available_bytes(device: torch.device, local_ranks: int = 1) -> int | None:
    """Memory this rank can still take: a GPU's free memory, or this machine's available memory
    (``MemAvailable``, Linux) shared by the ranks on it; None where unknown."""
    if device.type == "cuda":
        try:
            return int(torch.cuda.mem_get_info(device)[0])
        except RuntimeError:
            return None
    if device.type != "cpu":
        return None
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024 // max(1, local_ranks)
    except (OSError, ValueError, IndexError):
        return None
    return None


def rollout_memory_warning(need: int, have: int | None, rows: int, positions: int, device: torch.device) -> str | None:
    """The warning when the KV cache alone (``need`` bytes, a lower bound of the rollout's memory)
    is more than ``have``; None when it fits or ``have`` is unknown."""
    if have is None or need <= have:
        return None
    where = f"free on {device}" if device.type == "cuda" else "available to this rank"
    return (f"warning: the rollout needs at least {_size(need)} for its KV cache ({rows} rows x {positions} "
            f"positions per rank), more than the {_size(have)} {where}: it will likely run out of memory"
            + (" (on a CPU the kernel then kills it without a message)" if device.type == "cpu" else "")
            + "; lower --batch-size, --group-size or the token limits")


def _size(n: int) -> str:
    return f"{n / GIB:.1f} GiB" if n >= GIB / 10 else f"{n / 1024 ** 2:.1f} MiB"


def local_ranks() -> int:
    """Ranks on this machine (torchrun's ``LOCAL_WORLD_SIZE``; 1 without it)."""
    value = os.environ.get("LOCAL_WORLD_SIZE", "1")
    return int(value) if value.isdigit() and int(value) > 0 else 1
