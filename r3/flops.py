"""Model FLOPs of the training passes and the device's peak rate: the MFU ``metrics.jsonl`` reports.

Counted as the MFU convention counts them (PaLM's appendix B; torchtitan): the forward's matmuls at
2 FLOPs per multiply-add, the attention's scores and weighted values (4 x heads x head_dim per key
a query attends to, sliding windows included), a backward pass at twice its forward; biases,
norms, activations, padding and recomputation (activation checkpointing) are not counted. With
frozen parameters (``--freeze``) the backward pass counts what autograd runs: each matmul's
weight gradient where its weight trains, and its input gradient (the attention's backward too)
where a trainable parameter enters the forward before it (:func:`backward_flops`). The
work is what the loss needs, whatever the layout: each distinct prefix of the step's rows once
(the shared-prefix layout's saving is not counted as utilisation), each row's reflection up to
its last target, and the LM head at the reflection's targets only.

The peak is the datasheet's dense bf16/fp16 tensor-core rate for GPUs this module knows, else a
matmul in the compute dtype measured once at start (on a CPU: the rate it reaches, not a
datasheet's), or ``R3_PEAK_TFLOPS`` (per device) where it is set.
"""

from __future__ import annotations

import math
import os
import re
import time
from typing import Iterable, Sequence

import torch

from r3.errors import R3Error
from r3.model import ModelConfig, _linear_layer_shapes

#: Dense bf16/fp16 tensor-core peak FLOP/s by product name, from NVIDIA's datasheets (their
#: figures with sparsity halved). A key matches as whole words (``A100`` is not the RTX A1000),
#: the first match wins: more specific names first.
DATASHEET_BF16 = (
    ("GB200", 2500e12),
    ("GH200", 989e12),
    ("H100 NVL", 835e12),
    ("H100 PCIe", 756e12),
    ("H100", 989e12),  # SXM
    ("H200 NVL", 835e12),
    ("H200", 989e12),
    ("B200", 2250e12),
    ("A100", 312e12),
    ("L40S", 362e12),
    ("L40", 181e12),
    ("L4", 121e12),
)


def linear_mixer_flops_per_token(cfg: ModelConfig) -> int:
    """One token through a Qwen 3.5 Gated DeltaNet's causal conv (2 FLOPs per tap and channel) and
    delta rule, counted as its recurrence: per value head, ``S^T k``, ``k delta^T`` and ``S^T q``,
    each ``2 dk dv`` (the chunked form computes the same with other matmuls)."""
    return 2 * cfg.linear_conv_kernel * cfg.linear_conv_channels + 6 * cfg.linear_value_heads * cfg.linear_key_dim * cfg.linear_value_dim


def _linear_projections(cfg: ModelConfig) -> dict[str, int]:
    """A Gated DeltaNet layer's projections (names under ``linear_attn.``) -> forward FLOPs per token:
    2 per weight (its shapes are the model's, :func:`r3.model.param_shapes`')."""
    shapes = _linear_layer_shapes(cfg, "")
    return {name: 2 * math.prod(shapes[f"linear_attn.{name}.weight"])
            for name in ("in_proj_qkv", "in_proj_z", "in_proj_b", "in_proj_a", "out_proj")}


def matmul_flops_per_token(cfg: ModelConfig) -> int:
    """One token's forward through every block's projections and MLP (no LM head, no attention;
    Gemma 4's per-layer shapes, and its per-layer inputs' projections; Qwen 3.5's Gated DeltaNet
    layers with their conv and delta rule, whose work grows with the tokens, not the context)."""
    d, total = cfg.hidden_size, 0
    for n in range(cfg.num_hidden_layers):
        if cfg.linear(n):
            total += (sum(_linear_projections(cfg).values()) + linear_mixer_flops_per_token(cfg)
                      + 6 * d * cfg.layer_intermediate_size(n))
            continue
        q = cfg.num_attention_heads * cfg.layer_head_dim(n)
        gate = q if cfg.attn_output_gate else 0  # (Qwen 3.5: the output gate's rows beside the queries')
        kv = cfg.layer_kv_heads(n) * cfg.layer_head_dim(n)
        kv_out = 0 if cfg.kv_source(n) != n else kv if cfg.layer_k_eq_v(n) else 2 * kv
        total += 2 * (d * (q + gate) + d * kv_out + q * d + 3 * d * cfg.layer_intermediate_size(n)
                      + 2 * d * cfg.per_layer_input_size)
    return total + 2 * d * cfg.num_hidden_layers * cfg.per_layer_input_size


def _keys(lo: int, hi: int, window: int | None) -> int:
    """Keys attended to by the queries at positions ``lo .. hi - 1``: ``min(p + 1, window)`` each."""
    if hi <= lo:
        return 0
    if window is None or window >= hi:
        return (hi * (hi + 1) - lo * (lo + 1)) // 2
    full = min(hi, window)  # positions below the window's size see every earlier key
    inside = (full * (full + 1) - lo * (lo + 1)) // 2 if full > lo else 0
    return inside + window * (hi - max(lo, window))


def attention_flops(cfg: ModelConfig, lo: int, hi: int) -> int:
    """The forward's attention scores and weighted values of positions ``lo .. hi - 1``, all layers."""
    windows = cfg.layer_windows or [None] * cfg.num_hidden_layers
    return 4 * cfg.num_attention_heads * sum(cfg.layer_head_dim(n) * _keys(lo, hi, w) for n, w in enumerate(windows)
                                             if not cfg.linear(n))


def forward_flops(cfg: ModelConfig, sequences: Sequence[Sequence[int]], spans: Sequence[tuple[int, int]]) -> int:
    """One forward's model FLOPs for the log-probs of each row's ``span`` (its reflection): each
    distinct prefix (the tokens before a span) once, then each row's tokens up to its last target,
    the LM head at the span's ``end - start`` targets."""
    body, head = matmul_flops_per_token(cfg), 2 * cfg.hidden_size * cfg.vocab_size
    return sum(body * (hi - lo) + attention_flops(cfg, lo, hi) + head * targets
               for lo, hi, targets in _passes(sequences, spans))


def _passes(sequences: Sequence[Sequence[int]], spans: Sequence[tuple[int, int]]):
    """The positions the passes run over, as ``(lo, hi, LM-head targets)``: each distinct prefix
    (the tokens before a span) once, then each row's tokens up to its span's last target."""
    seen: set = set()
    for seq, (start, end) in zip(sequences, spans):
        key = tuple(seq[:start])
        if key not in seen:
            seen.add(key)
            yield 0, start, 0
        last = max(end - 1, start)  # (the span's last token predicts nothing the loss reads)
        yield start, last, end - start


# Where each parameter enters the forward: (layer, order within the layer) by the name's suffix;
# the root's embeddings at layer -1, the final norm and LM head at layer L. A matmul's input
# gradient runs where a trainable parameter enters before it. Gemma 4's per-layer inputs enter
# at layer 0's gate product (between its per-layer gate and projection); the projection that
# computes them reads the embeddings at (-1, 1).
_IN_LAYER = (("input_layernorm.", 0), ("self_attn.qkv_proj.", 1), ("self_attn.q_norm.", 2), ("self_attn.k_norm.", 2),
             ("self_attn.o_proj.", 4), ("post_attention_layernorm.", 5), ("pre_feedforward_layernorm.", 6),
             ("mlp.gate_up_proj.", 7), ("mlp.down_proj.", 8), ("post_feedforward_layernorm.", 9),
             ("per_layer_input_gate.", 10), ("per_layer_projection.", 12), ("post_per_layer_input_norm.", 13),
             # (Qwen 3.5's Gated DeltaNet: the projections, the conv and the decay's parameters
             # before its mixer at _ATTENTION, the gated norm between it and out_proj)
             ("linear_attn.in_proj_", 1), ("linear_attn.conv1d.", 2), ("linear_attn.A_log", 2),
             ("linear_attn.dt_bias", 2), ("linear_attn.norm.", 3.5), ("linear_attn.out_proj.", 4))
_ATTENTION = 3  # the scores and weighted values, between the q/k norms and o_proj
_PER_LAYER_INPUTS = (0, 11)
_ROOT = {"embed_tokens.weight": (-1, 0), "per_layer_model_projection.weight": _PER_LAYER_INPUTS,
         "embed_tokens_per_layer.weight": _PER_LAYER_INPUTS, "per_layer_projection_norm.weight": _PER_LAYER_INPUTS}


def parameter_position(cfg: ModelConfig, name: str) -> tuple[int, int]:
    """Where parameter ``name`` (r3's names) enters the forward, as (layer, order within it)."""
    if name in _ROOT:
        return _ROOT[name]
    if name in ("norm.weight", "lm_head.weight"):
        return cfg.num_hidden_layers, 0 if name == "norm.weight" else 1
    layer, _, rest = name.removeprefix("layers.").partition(".")
    if name.startswith("layers.") and layer.isdigit():
        for prefix, order in _IN_LAYER:
            if rest.startswith(prefix):
                return int(layer), order
    raise R3Error(f"r3.flops: no place in the forward known for parameter {name!r}")


def backward_flops(cfg: ModelConfig, sequences: Sequence[Sequence[int]], spans: Sequence[tuple[int, int]],
                   trainable: Iterable[str] | None = None) -> int:
    """One backward pass's model FLOPs for the rows of :func:`forward_flops`: twice the forward
    when every parameter trains (``trainable`` None); else, per matmul, its weight gradient (its
    forward's FLOPs) where its weight is in ``trainable`` (r3's names; a tied LM head is
    ``lm_head.weight`` beside ``embed_tokens.weight``) and its input gradient (as many) where a
    trainable parameter enters before it; the attention's backward (twice its forward) likewise."""
    if trainable is None:
        return 2 * forward_flops(cfg, sequences, spans)
    trainable = set(trainable)
    first = min((parameter_position(cfg, n) for n in trainable), default=(cfg.num_hidden_layers + 1, 0))
    L, d = cfg.num_hidden_layers, cfg.hidden_size

    def matmul(name: str, at: tuple[int, int], flops: int) -> int:  # weight gradient + input gradient
        return flops * ((name in trainable) + (first < at))

    body = 0  # per token
    for n in range(L):
        if cfg.linear(n):
            pre = f"layers.{n}."
            i = cfg.layer_intermediate_size(n)
            body += sum(matmul(f"{pre}linear_attn.{name}.weight", (n, 4 if name == "out_proj" else 1), flops)
                        for name, flops in _linear_projections(cfg).items())
            body += linear_mixer_flops_per_token(cfg) * 2 * (first < (n, _ATTENTION))  # (its backward: twice)
            body += (matmul(pre + "mlp.gate_up_proj.weight", (n, 7), 4 * d * i)
                     + matmul(pre + "mlp.down_proj.weight", (n, 8), 2 * i * d))
            continue
        q = cfg.num_attention_heads * cfg.layer_head_dim(n)
        kv = cfg.layer_kv_heads(n) * cfg.layer_head_dim(n)
        kv_out = 0 if cfg.kv_source(n) != n else kv if cfg.layer_k_eq_v(n) else 2 * kv
        i, p, pre = cfg.layer_intermediate_size(n), cfg.per_layer_input_size, f"layers.{n}."
        gate = q if cfg.attn_output_gate else 0
        body += (matmul(pre + "self_attn.qkv_proj.weight", (n, 1), 2 * d * (q + gate + kv_out))
                 + matmul(pre + "self_attn.o_proj.weight", (n, 4), 2 * q * d)
                 + matmul(pre + "mlp.gate_up_proj.weight", (n, 7), 4 * d * i)
                 + matmul(pre + "mlp.down_proj.weight", (n, 8), 2 * i * d))
        if p:
            body += (matmul(pre + "per_layer_input_gate.weight", (n, 10), 2 * d * p)
                     + matmul(pre + "per_layer_projection.weight", (n, 12), 2 * p * d))
    if cfg.per_layer_input_size:
        body += matmul("per_layer_model_projection.weight", (-1, 1), 2 * d * L * cfg.per_layer_input_size)
    head = matmul("lm_head.weight", (L, 1), 2 * d * cfg.vocab_size)
    windows = cfg.layer_windows or [None] * L
    layers = [n for n in range(L) if first < (n, _ATTENTION) and not cfg.linear(n)]
    total = 0
    for lo, hi, targets in _passes(sequences, spans):
        total += body * (hi - lo) + head * targets
        total += 2 * 4 * cfg.num_attention_heads * sum(cfg.layer_head_dim(n) * _keys(lo, hi, windows[n]) for n in layers)
    return total


def datasheet_peak(device: torch.device, dtype: torch.dtype) -> float | None:
    """The datasheet's dense peak of a GPU this module knows, in bf16/fp16; else None (also for a
    MIG slice, which has a part of the chip's rate)."""
    if device.type != "cuda" or dtype not in (torch.bfloat16, torch.float16) or not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name(device)
    if re.search(r"(?<!\w)MIG(?!\w)", name):
        return None
    return next((rate for key, rate in DATASHEET_BF16 if re.search(rf"(?<!\w){re.escape(key)}(?!\w)", name)), None)


def measured_matmul_rate(device: torch.device, dtype: torch.dtype, n: int | None = None, seconds: float = 0.2,
                         each: int | None = None) -> float:
    """FLOP/s of the best of repeated ``[n, n] x [n, n]`` matmuls in ``dtype`` (after a warm-up),
    for about ``seconds``, timed ``each`` at a time (default: 20 on a GPU, so that the launch and
    the synchronisation are a small part of each timing; 1 on a CPU)."""
    cuda = device.type == "cuda"
    n, each = n or (8192 if cuda else 1024), each or (20 if cuda else 1)
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    sync = torch.cuda.synchronize if cuda else (lambda *_: None)
    a @ b
    sync(device)
    best, spent = float("inf"), 0.0
    while spent < seconds or best == float("inf"):
        t = time.perf_counter()
        for _ in range(each):
            a @ b
        sync(device)
        dt = time.perf_counter() - t
        best, spent = min(best, dt / each), spent + dt
    return 2 * n ** 3 / best


def peak_flops(device: torch.device, dtype: torch.dtype) -> tuple[float, str]:
    """-> (peak FLOP/s of one device in ``dtype``, where it comes from: ``R3_PEAK_TFLOPS``,
    ``datasheet`` or ``measured``)."""
    given = os.environ.get("R3_PEAK_TFLOPS")
    if given:
        try:
            value = float(given)
        except ValueError:
            value = float("nan")
        if not value > 0 or value == float("inf"):
            raise R3Error(f"R3_PEAK_TFLOPS must be a positive number of TFLOP/s per device, got {given!r}")
        return value * 1e12, "R3_PEAK_TFLOPS"
    sheet = datasheet_peak(device, dtype)
    if sheet is not None:
        return sheet, "datasheet"
    return measured_matmul_rate(device, dtype), "measured"
