"""dtype ``auto``: bf16 only where the hardware multiplies it natively (r3.precision), and every
path that would run oneDNN's bf16 kernels stays off on a CPU without them."""

import json
from pathlib import Path

import pytest
import torch

from r3 import precision
from r3.config import TrainConfig
from r3.distributed import Dist


@pytest.fixture(params=[True, False], ids=["native-bf16", "emulated-bf16"])
def native(request, monkeypatch):
    monkeypatch.setattr(precision, "bf16_is_native", lambda device: request.param)
    return request.param


def test_the_cpu_check_agrees_with_the_cpus_own_flags():
    """The README's rule, read independently of oneDNN from /proc/cpuinfo: bf16 is native on an x86
    CPU with AVX-512 BW/VL/DQ, AVX-NE-CONVERT or AMX (an AVX2-only CPU emulates it)."""
    import platform

    info = Path("/proc/cpuinfo")
    if not info.exists() or platform.machine() not in ("x86_64", "AMD64"):
        pytest.skip("reads an x86 Linux CPU's flags")
    line = next(x for x in info.read_text().splitlines() if x.startswith("flags"))
    flags = set(line.split(":", 1)[1].split())
    want = {"avx512bw", "avx512vl", "avx512dq"} <= flags or bool({"avx_ne_convert", "amx_bf16"} & flags)
    assert precision.bf16_is_native("cpu") == want


def test_auto_is_bf16_only_where_native(native):
    assert precision.resolve_dtype_name("auto", "cpu") == ("bf16" if native else "fp32")
    assert precision.resolve_dtype_name("bf16", "cpu") == "bf16"
    assert precision.resolve_dtype_name("fp32", "cpu") == "fp32"
    warning = precision.slow_bf16_warning("cpu")
    assert (warning is None) == native
    if not native:
        assert warning.startswith("warning: this CPU (") and "no native bf16 matmuls" in warning


def _dist():
    return Dist(rank=0, world=1, local_rank=0, device=torch.device("cpu"), mesh=None, cpu_group=None)


def test_a_new_run_resolves_auto_and_a_resumed_one_keeps_its_dtype(native, tmp_path, capsys):
    from r3.train import compute_dtype, resolve_dtype

    cfg = TrainConfig(out=str(tmp_path / "new")).validate()
    assert cfg.dtype == "auto"
    resolve_dtype(cfg, _dist())
    assert cfg.dtype == ("bf16" if native else "fp32")
    assert compute_dtype(cfg) == (torch.bfloat16 if native else torch.float32)
    assert capsys.readouterr().out == ""

    old = tmp_path / "old"
    old.mkdir()
    (old / "config.json").write_text(json.dumps({**TrainConfig().to_dict(), "dtype": "bf16"}))
    cfg = TrainConfig(out=str(old)).validate()
    resolve_dtype(cfg, _dist())
    assert cfg.dtype == "bf16"  # the run's own, also where bf16 is emulated
    assert ("no native bf16 matmuls" in capsys.readouterr().out) == (not native)

    cfg = TrainConfig(out=str(old), dtype="fp32").validate()  # an explicit dtype is never replaced
    resolve_dtype(cfg, _dist())
    assert cfg.dtype == "fp32"


def test_compute_dtype_needs_a_resolved_dtype():
    from r3.train import compute_dtype

    with pytest.raises(KeyError):
        compute_dtype(TrainConfig())


def test_the_cli_flag(native, capsys):
    from r3.cli import dtype_name, pick_device_dtype

    device, dtype = pick_device_dtype("cpu", "auto")
    assert dtype_name(dtype) == ("bf16" if native else "fp32")
    assert pick_device_dtype("cpu", None)[1] == dtype  # (no --dtype: auto)
    assert capsys.readouterr().err == ""
    assert pick_device_dtype("cpu", "bf16")[1] == torch.bfloat16
    assert ("no native bf16 matmuls" in capsys.readouterr().err) == (not native)


def test_one_process_commands_refuse_torchrun_and_an_absent_gpu(monkeypatch):
    """Under torchrun every process would load the model onto one GPU and append to the same
    files; a GPU index the machine lacks is named, not an "invalid device ordinal" traceback."""
    from r3.cli import pick_device_dtype
    from r3.errors import R3Error

    monkeypatch.setenv("WORLD_SIZE", "8")
    with pytest.raises(R3Error, match="not under torchrun with 8 processes"):
        pick_device_dtype("cpu", "fp32")
    monkeypatch.setenv("RANK", "3")  # another launcher's rank 3 (no rank 0 to say it): said
    with pytest.raises(R3Error, match="not under torchrun with 8 processes"):
        pick_device_dtype("cpu", "fp32")
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "x")  # torchrun's: exits quietly, its rank 0 says it once
    with pytest.raises(SystemExit) as e:
        pick_device_dtype("cpu", "fp32")
    assert e.value.code == 2
    monkeypatch.delenv("RANK")
    monkeypatch.delenv("TORCHELASTIC_RUN_ID")
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert pick_device_dtype("cpu", "fp32")[1] == torch.float32
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    with pytest.raises(R3Error, match=r"--device cuda:7: this machine has 2 CUDA devices \(cuda:0 to cuda:1\)"):
        pick_device_dtype("cuda:7", "fp32")


def test_device_and_dtype_mistakes_are_one_line(monkeypatch):
    """A device torch cannot parse, CUDA asked for where there is none, a GPU index just past the
    last, an unknown dtype: each an R3Error naming the flag, not a torch traceback or a KeyError."""
    from r3.cli import pick_device_dtype
    from r3.errors import R3Error

    monkeypatch.setenv("WORLD_SIZE", "")  # (set but empty, or not a number: not torchrun's, ignored)
    assert pick_device_dtype("cpu", "fp32") == (torch.device("cpu"), torch.float32)
    monkeypatch.delenv("WORLD_SIZE")
    with pytest.raises(R3Error, match="--device: unknown device 'gpu0'"):
        pick_device_dtype("gpu0", "fp32")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(R3Error, match="--device cuda: CUDA is not available"):
        pick_device_dtype("cuda", "fp32")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(R3Error, match=r"--device cuda:1: this machine has 1 CUDA device \(cuda:0\)$"):
        pick_device_dtype("cuda:1", "fp32")
    with pytest.raises(R3Error, match="--dtype must be one of auto, bf16, fp32, fp16, got 'int4'"):
        pick_device_dtype("cpu", "int4")


def test_prepacked_weights_in_fp32_and_where_onednn_runs_bf16(monkeypatch):
    from r3 import packed_linear
    from r3.model import ModelConfig, Transformer

    model = Transformer(ModelConfig(model_type="llama", vocab_size=32, hidden_size=16, intermediate_size=32,
                                    num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                                    head_dim=8))
    onednn = packed_linear._MKLDNN_LINEAR is not None and torch.backends.mkldnn.is_available()
    monkeypatch.setattr(packed_linear, "bf16_is_native", lambda device: False)
    assert packed_linear.PackedWeights.available(model) == onednn  # fp32: wherever oneDNN is built in
    model = model.to(torch.bfloat16)
    assert not packed_linear.PackedWeights.available(model)
    if onednn and precision.bf16_is_native("cpu"):
        monkeypatch.setattr(packed_linear, "bf16_is_native", lambda device: True)
        assert packed_linear.PackedWeights.available(model)


def test_native_bf16_by_device_kind(monkeypatch):
    """Found by mutation: a GPU that only emulates bf16 (before Ampere) is not native, nor is CUDA
    when no GPU is available; a CPU is native only where oneDNN is built in and its bf16 check
    passes; another backend's bf16 is taken as given, and its warning names that device."""
    asked = []

    def supported(including_emulation=True, native=False):
        asked.append(including_emulation)
        return native or including_emulation

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", supported)
    assert precision.bf16_is_native("cuda") is False and asked == [False]  # a T4 or V100: emulated
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)
    assert precision.bf16_is_native("cuda:0") is True
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert not precision.bf16_is_native("cuda")
    assert precision.slow_bf16_warning("cuda").startswith("warning: this cuda device has no native bf16 matmuls")

    monkeypatch.setattr(torch.backends.mkldnn, "is_available", lambda: True)
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: False)
    assert precision.bf16_is_native("cpu") is False
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: True)
    assert precision.bf16_is_native("cpu") is True
    monkeypatch.setattr(torch.backends.mkldnn, "is_available", lambda: False)
    assert precision.bf16_is_native("cpu") is False

    assert precision.bf16_is_native("mps") is True and precision.resolve_dtype_name("auto", "mps") == "bf16"
    monkeypatch.setattr(precision, "bf16_is_native", lambda device: False)
    assert precision.slow_bf16_warning("mps").startswith("warning: this mps device has no native bf16 matmuls")


def test_a_dtype_the_trainer_cannot_run_is_refused_by_the_config():
    """Only auto, bf16 and fp32 have a compute dtype: fp16 is refused when the config is read, not a
    KeyError from compute_dtype once the models are loaded."""
    from r3.errors import R3Error

    assert precision.DTYPE_NAMES == ("auto", "bf16", "fp32")
    for bad in ("fp16", "float16", "BF16"):
        with pytest.raises(R3Error, match=rf"'dtype' must be one of auto, bf16, fp32, got '{bad}'"):
            TrainConfig(dtype=bad).validate()


def test_cpu_description_names_the_model_the_cores_and_amx(monkeypatch):
    """What a benchmark result records about the CPU: the first processor's model name and flags."""
    import os

    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX512")
    monkeypatch.setattr(precision, "bf16_is_native", lambda device: True)
    intel = ("processor\t: 0\nmodel name\t: Intel(R) Xeon(R)   Platinum 8488C\nflags\t\t: fpu avx512bw amx_bf16 amx_tile\n\n"
             "processor\t: 1\nmodel name\t: Other\nflags\t\t: fpu\n")
    assert precision.cpu_description(intel) == "Intel(R) Xeon(R) Platinum 8488C, 2 cores, AVX512, bf16 native, AMX"
    amd = "model name\t: AMD EPYC\nflags\t\t: avx512bw avx512_bf16 amx_tile\n"
    assert precision.cpu_description(amd) == "AMD EPYC, 2 cores, AVX512, bf16 native, no AMX"
    monkeypatch.setattr(precision, "bf16_is_native", lambda device: False)
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX2")
    assert precision.cpu_description("model name : AMD EPYC 7B12\nflags : avx2\n") == \
        "AMD EPYC 7B12, 2 cores, AVX2, bf16 emulated, no AMX"
    # Without /proc/cpuinfo's fields (another system): the platform's name, and nothing said about AMX.
    monkeypatch.setattr(precision.platform, "processor", lambda: "arm")
    assert precision.cpu_description("") == "arm, 2 cores, AVX2, bf16 emulated"
