"""benchmarks/gpu_check.py in --smoke mode (tiny shapes, on this CPU): every section runs and
writes its JSON and Markdown. It checks the script a GPU owner will run, not a GPU."""

import json
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))


def test_gpu_check_smoke_runs_every_section(tmp_path):
    import gpu_check

    report = gpu_check.main(["--smoke", "--device", "cpu", "--out", str(tmp_path), "--name", "check"])
    sections = report["sections"]
    assert list(sections) == list(gpu_check.SECTIONS)
    for name, sec in sections.items():
        assert "error" not in sec, (name, sec["error"])
    data = json.loads((tmp_path / "check.json").read_text())
    assert data["sections"].keys() == sections.keys()
    md = (tmp_path / "check.md").read_text()
    for heading in ("Ceilings measured here", "Parity with transformers", "fused_logprob_kl", "Sampler:", "Training:"):
        assert heading in md
    # Same weights on the same CPU: our fp32 logits equal transformers' to rounding.
    assert sections["parity"]["fp32_within_1e-4_of_scale"] is True
    assert sections["parity"]["bf16_error_within_1.1x_of_transformers"] is True
    assert sections["parity"]["fused_attention"]["ok"] is True  # (CPU kernels: no math fallback either)
    assert len(sections["parity"]["fused_attention"]["sdpa_choice"]) == 5
    assert "SDPA's kernel choice" in (tmp_path / "check.md").read_text()
    # (the probe is a fresh process: it takes the GPU when there is one, whatever --device says)
    expected = {"backend": "nccl", "device": "cuda"} if torch.cuda.is_available() else {"backend": "gloo", "device": "cpu"}
    assert sections["env"]["single_process_group"] == dict(expected, all_reduce_ok=True)
    assert all(r["greedy_prefix_agreement"] == 1.0 for r in sections["parity"]["rows"] if r["dtype"] == "fp32")
    compiled = [r["compiled_equals_eager"] for r in sections["parity"]["rows"] if "compiled_equals_eager" in r]
    (grads,) = [r["gradients"] for r in sections["parity"]["rows"] if "gradients" in r]  # (Qwen 3.5, fp32)
    assert grads["ok"] is True and grads["compared"] > 20 and grads["max_rel_diff"] < 1e-4, grads
    assert len(compiled) == 1 and compiled[0]["tokens"] is True and compiled[0]["finished"] is True  # (Qwen 3.5)
    assert 0 < compiled[0]["rows_stopped"] < compiled[0]["rows"]  # (rows that stopped while others decoded)
    assert compiled[0]["logprob_max_abs_diff"] < 1e-4 and "the compiled sampler against eager" in md
    # the compiled sampler's repeated rollouts ran through the static cache (graphs are CUDA only)
    rr = sections["sampler"]["repeated_rollouts"]
    assert [r["call"] for r in rr] == [1, 2] and all(r["steps"] > 0 and r["graphs"] is None for r in rr)
    assert all(r["graph_runs"] > 0 for r in rr)  # (recorded: on CPU a recording runs the steps again)
    # the sampler with one replay per step against graph runs: the same tokens
    check = sections["sampler"]["per_step_check"]
    assert check["compiled_step_equals_runs"] is True and check["r3c_step_decode_ms_per_step"] > 0
    assert rr[0]["static_cache"] == rr[1]["static_cache"] and rr[0]["static_cache"][0] >= rr[0]["rows"]
    assert "Repeated rollouts through the compiled step" in md
    # the compiled step timed alone in the static cache, as the sampler runs it (no CUDA events here)
    st = sections["sampler"]["step_timing"]
    assert [r["rows"] for r in st] == [1, 2]
    assert all(r["step_ms_per_step"] > 0 and r["issue_ms_per_step"] > 0 and r["device_ms_per_step"] is None for r in st)
    assert all(r["guard_check_ms"] > 0 and r["guards"] > 0 for r in st)  # (measured: no private API moved)
    assert all(r["runs_ms_per_step"] > 0 and r["runs_issue_ms_per_step"] > 0 and r["runs_device_ms_per_step"] is None
               and r["runs_of"] == 8 and r["runs_graphs"] >= 2 for r in st)  # (one-step graphs, then runs)
    assert "Where a compiled greedy decode step's time goes" in md
    # the kernels of a step under the profiler (here the CPU ops stand in for them)
    kp = sections["sampler"]["kernel_profile"]
    assert [(r["mode"], r["rows"]) for r in kp] == [("compiled", 1), ("compiled", 2), ("runs", 2), ("eager", 1)]
    for r in kp:
        assert r["kernels_per_step"] > 0 and 0 < r["kernel_ms_per_step"] and r["top"]
        assert sum(k["ms_per_step"] for k in r["by_kind"].values()) == pytest.approx(r["kernel_ms_per_step"])
        assert sum(t["pct"] for t in r["top"]) <= 100.0 + 1e-6
    assert "Kernels of a greedy decode step under torch.profiler" in md and "Costliest kernels, eager step" in md
    assert sections["sampler"]["dynamo"]["graph_breaks"] == {}  # the compiled step is one graph
    assert sections["sampler"]["dynamo"]["unique_graphs"] >= 1
    # the step's graphs with CUDA graphs forced on a CPU: inductor counts them as skipped, and
    # gives reasons only for graphs on a CUDA device
    assert sections["sampler"]["dynamo"]["cudagraph_skips"] >= 1
    assert sections["sampler"]["dynamo"]["cudagraph_skip_reasons"] == []
    assert "graphs inductor ran without CUDA graphs:" in md
    for r in sections["kernel"]["correctness"]:
        assert r["logp_max_abs_diff"] < 1e-4 and r["grad_max_abs_diff"] <= 1e-5 * r["grad_max_abs"]
    train = sections["train"]
    assert train["returncode"] == 0, train["log_tail"]
    assert "partial" not in train and "cut short" not in md  # the section finished
    assert [s["step"] for s in train["steps"]] == [1, 2] and train["export_written"]
    assert all(s["peak_memory_gb"] is None for s in train["steps"])  # CPU: no GPU memory to report
    ac = train["activation_checkpointing"]
    assert ac["returncode"] == 0 and "--activation-checkpointing true" in ac["command"]
    assert [s["step"] for s in ac["steps"]] == [1, 2]
    # recomputed activations are the same numbers: the same losses and gradient norms
    for a, b in zip(ac["steps"], train["steps"]):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-6, abs=1e-9)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-6, abs=1e-9)
    # each run beside memory_plan.py's plan of its own settings (the smoke run's limits: 8 tokens)
    plans = train["memory_plan"], ac["memory_plan"]
    assert all(p["run"]["batch_size"] == 2 and p["run"]["reflection"] == 8 for p in plans)
    assert all(0 < p["rollout_phase_gb"] <= p["peak_gb"] and p["update_phase_gb"] <= p["peak_gb"] for p in plans)
    assert ac["memory_plan"]["update_phase_gb"] <= train["memory_plan"]["update_phase_gb"]
    assert "| default | - | " in md and "| --activation-checkpointing true | - | " in md


def test_a_long_section_cut_short_keeps_what_finished(tmp_path):
    """The train section saves after each training run: a device run killed at its time limit
    still has the finished runs in its JSON and Markdown."""
    import argparse

    import gpu_check

    ctx = gpu_check.Ctx(argparse.Namespace(smoke=True, device="cpu"))
    ctx.path = tmp_path / "check"
    ctx.report["meta"] = {"command": "x", "date": "d", "device": "cpu"}
    run = {"command": "torch.distributed.run -m r3.train", "returncode": 0, "wall_s": 5.0,
           "steps": [{"step": 1, "step_time_s": 1.0, "rollout_time_s": 0.5, "reference_time_s": 0.1,
                      "update_time_s": 0.4, "rollout_tokens_per_s": 100.0, "peak_memory_gb": 2.0}]}
    ctx.save_partial("train", dict(run, model="m", export_written=True))
    data = json.loads((tmp_path / "check.json").read_text())
    assert data["sections"]["train"]["partial"] is True and data["sections"]["train"]["steps"][0]["step"] == 1
    md = (tmp_path / "check.md").read_text()
    assert "cut short" in md and "| 1 | 1.00 | 0.50 |" in md


def test_a_section_that_fails_after_saving_keeps_what_it_saved(tmp_path, monkeypatch):
    import gpu_check

    def train(ctx):
        ctx.save_partial("train", {"command": "c", "returncode": 0, "wall_s": 1.0, "model": "m",
                                   "export_written": True, "steps": []})
        raise ValueError("metrics.jsonl half written")

    monkeypatch.setattr(gpu_check, "section_train", train)
    report = gpu_check.main(["--smoke", "--device", "cpu", "--out", str(tmp_path), "--sections", "train"])
    tr = report["sections"]["train"]
    assert tr["partial"] is True and tr["returncode"] == 0 and "half written" in tr["error"]
    md = (tmp_path / "gpu_check_cpu_train_smoke.md").read_text()
    assert "## train: FAILED" in md and "cut short" in md


def test_the_sampler_section_keeps_each_case_done(tmp_path, monkeypatch):
    """The sampler section saves after each case (B = 1 first): a device call cut at its time
    limit in a later case keeps the rows measured before it."""
    import bench_sampler
    import gpu_check

    real, calls = bench_sampler.bench_case, []

    def bench_case(*args, **kw):
        calls.append(kw["B"])
        if len(calls) > 1:
            raise RuntimeError("killed at the time limit")
        return real(*args, **kw)

    monkeypatch.setattr(bench_sampler, "bench_case", bench_case)
    report = gpu_check.main(["--smoke", "--device", "cpu", "--out", str(tmp_path), "--sections", "sampler"])
    sp = report["sections"]["sampler"]
    assert calls == [1, 2] and sp["partial"] is True and "time limit" in sp["error"]
    assert [(r["batch"], r["group"]) for r in sp["rows"]] == [(1, 1)]
    saved = json.loads((tmp_path / "gpu_check_cpu_sampler_smoke.json").read_text())["sections"]["sampler"]
    assert [r["batch"] for r in saved["rows"]] == [1]
    md = (tmp_path / "gpu_check_cpu_sampler_smoke.md").read_text()
    assert "## Sampler:" in md and "| 1x1 | greedy |" in md and "cut short" in md


def test_cudagraph_skips_are_collected():
    """A graph inductor runs without CUDA graphs is only a warning on its cudagraphs log: the
    sampler section collects the reasons for its JSON."""
    import logging

    import gpu_check
    import torch._inductor.cudagraph_utils as cu

    skips = gpu_check._CudagraphSkips()
    cu.log_cudagraph_skip_and_bump_counter("skipping cudagraphs due to mutated inputs (1 instances)")
    for name in skips.LOGGERS:
        logging.getLogger(name).info("recording a graph")  # not a skip
    assert skips.close() == ["skipping cudagraphs due to mutated inputs (1 instances)"]
    cu.log_cudagraph_skip_and_bump_counter("skipping cudagraphs due to cpu device")
    assert skips.reasons == ["skipping cudagraphs due to mutated inputs (1 instances)"]  # detached


def test_gpu_check_rejects_unknown_section(tmp_path, capsys):
    import gpu_check

    with pytest.raises(SystemExit) as e:
        gpu_check.main(["--smoke", "--out", str(tmp_path), "--sections", "env,gpu"])
    assert e.value.code == 2
    assert "unknown section 'gpu'" in capsys.readouterr().err


def test_device_script_runs_the_check_into_out(tmp_path):
    """benchmarks/gpu_check_device.sh (the one command for a lent GPU machine) writes the report
    and its log into $OUT; here with the env section only, smoke-sized, on the CPU."""
    import os
    import subprocess

    env = dict(os.environ, OUT=str(tmp_path), SECTIONS="env", EXTRA="--smoke --device cpu --name check")
    proc = subprocess.run(["bash", "benchmarks/gpu_check_device.sh"], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert json.loads((tmp_path / "check.json").read_text())["sections"]["env"]
    assert "wrote" in (tmp_path / "gpu_check_env.log").read_text()
    # without --name, a run of some sections is named after them (two calls on one machine
    # do not overwrite each other)
    env["EXTRA"] = "--smoke --device cpu"
    proc = subprocess.run(["bash", "benchmarks/gpu_check_device.sh"], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert (tmp_path / "gpu_check_cpu_env_smoke.json").is_file() and (tmp_path / "check.json").is_file()


def test_kernel_kinds():
    import gpu_check

    kinds = {name: gpu_check.kernel_kind(name) for name in (
        "nvjet_tst_128x8_64x12_2x1_v_bz_TNT", "sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize64x64x64",
        "void cutlass::Kernel2<cutlass_80_wmma_tensorop_bf16_s161616gemm_bf16_16x16_128x2_tn_align8>",
        "triton_tem_fused_mm_0", "aten::mm", "aten::addmm", "gemv2T_kernel_val<int, int, float>",
        "void pytorch_flash::flash_fwd_splitkv_kernel<...>", "fmha_cutlassF_bf16_aligned_64x64_rf_sm80",
        "triton_per_fused__to_copy_add_mean_mul_pow_rsqrt_0", "triton_poi_fused_index_put_1", "triton_poi_fused_addmm_2",
        "Memcpy DtoD (Device -> Device)", "Memset (Device)", "void at::native::vectorized_elementwise_kernel<4, "
        "at::native::FillFunctor<float>>", "void at::native::reduce_kernel<512, 1>", "aten::exp")}
    assert kinds == {
        "nvjet_tst_128x8_64x12_2x1_v_bz_TNT": "matmul",
        "sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize64x64x64": "matmul",
        "void cutlass::Kernel2<cutlass_80_wmma_tensorop_bf16_s161616gemm_bf16_16x16_128x2_tn_align8>": "matmul",
        "triton_tem_fused_mm_0": "matmul", "aten::mm": "matmul", "aten::addmm": "matmul",
        "gemv2T_kernel_val<int, int, float>": "matmul",
        "void pytorch_flash::flash_fwd_splitkv_kernel<...>": "attention",
        "fmha_cutlassF_bf16_aligned_64x64_rf_sm80": "attention",
        "triton_per_fused__to_copy_add_mean_mul_pow_rsqrt_0": "triton (fused)",
        "triton_poi_fused_index_put_1": "triton (fused)", "triton_poi_fused_addmm_2": "triton (fused)",
        "Memcpy DtoD (Device -> Device)": "copy/fill", "Memset (Device)": "copy/fill",
        "void at::native::vectorized_elementwise_kernel<4, at::native::FillFunctor<float>>": "copy/fill",
        "void at::native::reduce_kernel<512, 1>": "other", "aten::exp": "other"}
