"""The compute precision for a device: bf16 where the hardware multiplies bf16 natively, else fp32.

Without native bf16 matmuls (an x86 CPU with AVX2 but not AVX-512 BW/VL/DQ, AVX-NE-CONVERT or
AMX; a GPU before Ampere) PyTorch emulates them, and on such a CPU a bf16 matmul runs one to two
orders of magnitude slower than fp32, so a bf16 default would turn a 15-minute run into hours.
"""

from __future__ import annotations

import os
import platform
from pathlib import Path

import torch

DTYPE_NAMES = ("auto", "bf16", "fp32")


def bf16_is_native(device: torch.device | str) -> bool:
    """Whether ``device`` runs bf16 matmuls in hardware (on a CPU: oneDNN's bf16 path applies)."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported(including_emulation=False)
    if device.type == "cpu":
        check = getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", None)
        return bool(torch.backends.mkldnn.is_available() and check is not None and check())
    return True  # (other backends: their bf16 is taken as given)


def resolve_dtype_name(name: str, device: torch.device | str) -> str:
    """``"bf16"`` or ``"fp32"`` for a ``dtype`` setting: ``"auto"`` is bf16 where it is native."""
    if name == "auto":
        return "bf16" if bf16_is_native(device) else "fp32"
    return name


def slow_bf16_warning(device: torch.device | str) -> str | None:
    """A one-line warning when bf16 was asked for on a device that only emulates it, else None."""
    device = torch.device(device)
    if bf16_is_native(device):
        return None
    what = f"this CPU ({torch.backends.cpu.get_cpu_capability()})" if device.type == "cpu" else f"this {device.type} device"
    return (f"warning: {what} has no native bf16 matmuls: bf16 is emulated and runs many times slower "
            "than fp32 here (dtype auto or fp32 uses fp32)")


def cpu_description(cpuinfo: str | None = None) -> str:
    """This CPU as a benchmark result names it, e.g. ``AMD EPYC, 2 cores, AVX512, bf16 native, no
    AMX``: CPU timings depend on the model and on AMX (bf16 matmuls several times faster with it),
    and ``platform.processor()`` is empty on Linux. ``cpuinfo``: /proc/cpuinfo's text (read here
    when None; on other systems the model and AMX parts are left out)."""
    if cpuinfo is None:
        path = Path("/proc/cpuinfo")
        cpuinfo = path.read_text(errors="replace") if path.exists() else ""
    model, flags = None, None
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if key == "model name" and model is None:
            model = " ".join(value.split())
        elif key == "flags" and flags is None:
            flags = set(value.split())
    parts = [model or platform.processor() or platform.machine(), f"{os.cpu_count()} cores",
             torch.backends.cpu.get_cpu_capability(),
             "bf16 native" if bf16_is_native("cpu") else "bf16 emulated"]
    if flags is not None:
        parts.append("AMX" if "amx_bf16" in flags else "no AMX")
    return ", ".join(parts)
