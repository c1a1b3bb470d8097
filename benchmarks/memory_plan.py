"""Per-rank memory of an r3 training run with FSDP2: a formula, and a measurement that checks it.

    python benchmarks/memory_plan.py                                  # the plan: 1.5B, 7B, 8B on 8 ranks
    python benchmarks/memory_plan.py --json F --markdown F.md
    python benchmarks/memory_plan.py --shape path/to/model --world 4 --freeze 'embed_tokens*'
    torchrun --nproc_per_node 2 benchmarks/memory_plan.py --measure   # check it: 0.5B shape, 2 CPU ranks

What one rank holds (``P`` parameters of which ``P_t`` trained (``--freeze``), ``W`` ranks, compute
in bf16, fp32 master weights). All the time:

* policy: fp32 shards ``4P/W``; AdamW's two moments ``8P_t/W``;
* reference: bf16 shards ``2P/W``;
* rollout copy: the whole policy in bf16 on every rank, ``2P`` (the sampler runs unsharded).

During the rollout, the KV cache (below). During the update:

* gradients, fp32 shards ``4P_t/W`` (freed after the optimizer step);
* parameters gathered for compute: bf16, the root module's (embeddings, final norm, LM head: FSDP2
  keeps the root gathered through forward and backward) plus the two largest blocks (the one
  computing and the one prefetched), and the bf16 gradients of their trained parameters before
  the reduce-scatter;
* activations of one micro-batch (the update's forward saves them for the backward pass): per
  token and layer ``l``, ``a_l`` bytes, plus ``i_l``, the layer's input where the block keeps it
  (its input norm, r3.rms_norm, or OLMo's attention, which reads it unnormed), plus ``r``, what
  lies outside the blocks (the RoPE tables and masks every block reads, Gemma 4's per-layer
  inputs, the final norm's); with activation checkpointing every block keeps
  only its input (``2h`` bytes per token) and one block's full activations exist at a time
  during backward (the largest ``a_l``), plus ``r``. They are measured, not guessed: the bytes
  autograd saves (``saved_tensors_hooks``) in a forward of the real shape on one row of a few
  hundred tokens, divided by the tokens, each saved tensor counted in the block whose op made it
  (``r``: the root's, made once). Layers of different kinds differ (Qwen
  3.5's Gated DeltaNets keep 1.75x the bytes of its attention layers at Qwen3.5-0.8B's shapes;
  Gemma 4's full, sliding and shared layers): one block of each kind is measured, in the model's
  own forward cut to those blocks and a small vocabulary. While block ``l``'s backward pass runs
  it allocates a working set ``w_l`` on top (its gradients and temporaries; a Gated DeltaNet's
  recomputes the delta rule's chunk intermediates, which its forward does not keep), measured in
  the same model as the most bytes allocated during that block's backward beyond what was
  allocated when it began: the activations are ``max_l (a_1 + i_1 + ... + a_l + i_l + w_l)``
  without checkpointing, ``L 2h + max_l (a_l + w_l)`` with it. Frozen parameters change no activation:
  the plan keeps them all (an upper bound where a frozen bottom of the model needs no backward
  pass). Counted for the trainer's default layout, the shared prefix (:func:`micro_batch_layout`):
  a micro-batch holds as many whole groups, each its prefix once, as fit in the tokens of
  ``micro_batch_size`` per-row rows -- about as many tokens as the per-row layout, and in the
  paper-shaped run 3x the trained rows (3 groups of 8) -- and on CUDA each attention block keeps
  its kv heads repeated for the memory-efficient kernel (``2 (heads - kv heads) head_dim`` bf16
  values more per token, 5% of ``a_l`` for Qwen2.5-7B) and each packed row an additive ``[L, L]``
  mask; ``shared_prefix=False`` (``--measure``) counts the per-row layout;
* logits at the micro-batch's reflection positions, bf16, plus the fused log-prob kernel's float32
  per-chunk work (``r3/kernels/``) -- small next to the rest;
* or, where that is more, the end of the backward pass, when the activations are freed: the
  root's gathered bf16 parameters and gradients, the fp32 copy FSDP2 reduce-scatters them from
  (``reduce_dtype``) and its fp32 output shard. With activation checkpointing this is often the
  update's peak (an untied 7B/8B model's embeddings and LM head are 1B parameters).

The rollout's KV cache (r3.model.KVCache, bf16, as r3.rollout_memory counts it): per layer that
holds keys and values, rows x slots x 2 x its kv heads x its head dim x 2 bytes (Gemma 4's shared
layers hold none), and per Qwen 3.5 Gated DeltaNet its conv and delta-rule states, the same for
any slots; at the rows of one rank's reflection batch (its failures x G) and the longest
conversation, plus, with
``compact_rollouts`` (the default), a copy of at most three quarters of it (the live rows once a
quarter has stopped). With ``--decode compiled`` on CUDA (CUDA graphs) the sampler instead decodes
in a static cache of the same size that is held all the time (see :func:`plan`). The peak is
what is held all the time plus the larger of the two phases.

``--measure`` builds the trainer's models for a Qwen2.5-0.5B-shaped random model (``--shape``: a
name above or a config.json) on 2 CPU ranks (gloo), runs one update over ``--micro-batches``
micro-batches of ``--tokens`` tokens per rank (2: from the second on, the first's gradients are
held beside the activations, as in every update of more than one micro-batch) with and without
activation checkpointing, samples each rank's allocated bytes (glibc's ``mallinfo2``) every 2 ms,
and prints the measured growth of each phase next to the formula's: the models (policy shards,
reference shards, rollout copy), then the update (gradients, gathered parameters, activations,
logits; AdamW's state is allocated by a first, unreported update). What it does not show: a GPU's
caching allocator and NCCL buffers (add a few GB there), the rollout's KV cache (not allocated by
``--measure``), fragmentation.
"""

from __future__ import annotations

import argparse
import copy
import ctypes
import ctypes.util
import json
import os
import shlex
import sys
import threading
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from r3.errors import cli_main  # noqa: E402
from r3.files import write_json_atomic, write_text_atomic  # noqa: E402
from r3.decode import graph_rows, slots_with_margin  # noqa: E402
from r3.model import ModelConfig, Transformer  # noqa: E402
from r3.rollout_memory import kv_cache_bytes  # noqa: E402

GiB = 2 ** 30

# Public shapes (config.json fields); tied embeddings as the models ship.
SHAPES = {
    "qwen2.5-0.5b": dict(model_type="qwen2", vocab_size=151936, hidden_size=896, intermediate_size=4864,
                         num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2,
                         max_position_embeddings=32768, rms_norm_eps=1e-6, rope_theta=1000000.0,
                         tie_word_embeddings=True, hidden_act="silu"),
    "qwen2.5-1.5b": dict(model_type="qwen2", vocab_size=151936, hidden_size=1536, intermediate_size=8960,
                         num_hidden_layers=28, num_attention_heads=12, num_key_value_heads=2,
                         max_position_embeddings=32768, rms_norm_eps=1e-6, rope_theta=1000000.0,
                         tie_word_embeddings=True, hidden_act="silu"),
    "qwen2.5-7b": dict(model_type="qwen2", vocab_size=152064, hidden_size=3584, intermediate_size=18944,
                       num_hidden_layers=28, num_attention_heads=28, num_key_value_heads=4,
                       max_position_embeddings=32768, rms_norm_eps=1e-6, rope_theta=1000000.0,
                       tie_word_embeddings=False, hidden_act="silu"),
    "llama-3.1-8b": dict(model_type="llama", vocab_size=128256, hidden_size=4096, intermediate_size=14336,
                         num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                         max_position_embeddings=131072, rms_norm_eps=1e-5, rope_theta=500000.0,
                         tie_word_embeddings=False, hidden_act="silu"),
    # a hybrid: 18 Gated DeltaNet and 6 attention layers (Qwen/Qwen3.5-0.8B's text model)
    "qwen3.5-0.8b": dict(model_type="qwen3_5_text", vocab_size=248320, hidden_size=1024, intermediate_size=3584,
                         num_hidden_layers=24, num_attention_heads=8, num_key_value_heads=2, head_dim=256,
                         linear_num_key_heads=16, linear_num_value_heads=16, linear_key_head_dim=128,
                         linear_value_head_dim=128, linear_conv_kernel_dim=4, full_attention_interval=4,
                         max_position_embeddings=262144, rms_norm_eps=1e-6, tie_word_embeddings=True,
                         hidden_act="silu", rope_parameters={"rope_type": "default", "rope_theta": 1e7,
                                                             "partial_rotary_factor": 0.25}),
}

#: The plan's models by default: the paper's sizes.
PLAN_SHAPES = ("qwen2.5-1.5b", "qwen2.5-7b", "llama-3.1-8b")

# The paper-shaped run the plan is for: 256 failures per step over all ranks, G=8, attempts and
# retries up to 256 tokens, reflections up to 128, a ~150-token prompt; micro-batches of 8 rows.
PAPER = dict(batch_size=256, group_size=8, prompt=150, attempt=256, reflection=128, retry=256, micro_batch_size=8)


def param_counts(mc: ModelConfig, freeze: str = "") -> dict:
    """Parameter counts from a meta-device model: total, each block's, the root's (the rest: the
    embeddings, the final norm, an untied LM head, Gemma 4's per-layer tables), and of each the
    trained part (``freeze``: r3.train's comma-separated patterns over r3's names)."""
    from r3.train import freeze_parameters

    with torch.device("meta"):
        m = Transformer(mc)
    freeze_parameters(m, freeze)

    def count(params, trained=False):
        seen = {id(p): p for p in params}  # tied weights counted once
        return sum(p.numel() for p in seen.values() if p.requires_grad or not trained)

    blocks = [count(b.parameters()) for b in m.layers]
    blocks_trained = [count(b.parameters(), True) for b in m.layers]
    total, trained = count(m.parameters()), count(m.parameters(), True)
    return {"total": total, "trained": trained, "blocks": blocks, "blocks_trained": blocks_trained,
            "root": total - sum(blocks), "root_trained": trained - sum(blocks_trained)}


def layer_kind(mc: ModelConfig, i: int) -> tuple:
    """What decides the shapes of layer ``i``'s activations: a Gated DeltaNet or attention, full or
    sliding (Gemma 4's full layers have their own head size and kv heads), RoPE or not (SmolLM3's
    NoPE layers), its own keys and values or an earlier layer's (Gemma 4's shared layers, whose MLP
    may be twice as wide)."""
    return (mc.linear(i), mc.full_attention(i), i in mc.nope_layers, mc.kv_source(i) != i)


def _reduced_config(mc: ModelConfig, vocab: int = 1024, extra: bool = False) -> tuple[ModelConfig, list[int]]:
    """A model of the same shapes with one layer of each kind, in their order, and a small
    vocabulary; and which real layers those are. Activations per token of a block depend on
    neither the vocabulary nor the other blocks. (A Gemma 4 shared layer reads the last earlier
    layer of its kind with keys and values of its own: the first such layer is kept, and comes
    before it.) ``extra``: the first layer twice, for what outside the blocks grows with them."""
    import dataclasses

    first: dict[tuple, int] = {}
    for i in range(mc.num_hidden_layers):
        first.setdefault(layer_kind(mc, i), i)
    keep = sorted(first.values())
    if extra:
        keep = keep[:1] + keep
    small = dataclasses.replace(
        mc, vocab_size=min(mc.vocab_size, vocab), num_hidden_layers=len(keep),
        layer_windows=[mc.layer_windows[i] for i in keep] if mc.layer_windows else [],
        nope_layers=[n for n, i in enumerate(keep) if i in mc.nope_layers],
        linear_layers=[n for n, i in enumerate(keep) if i in mc.linear_layers],
        kv_shared_layers=sum(mc.kv_source(i) != i for i in keep),
        per_layer_vocab_size=min(mc.per_layer_vocab_size, vocab))
    assert [layer_kind(small, n) for n in range(len(keep))] == [layer_kind(mc, i) for i in keep], "reduction"
    return small, keep


def _saved_bytes(mc: ModelConfig, tokens: int, dtype, backward: bool = False) -> dict:
    """One forward of a random model of ``mc`` over one row of ``tokens`` tokens, the bytes per
    token autograd saves for the backward pass (each storage once; parameters are not
    activations), split by who holds them (see :func:`activation_bytes`). ``backward``: then a
    backward pass to the first block's input (no parameter gradients: the plan counts those
    apart), and for each block the most bytes allocated while its backward runs beyond what was
    allocated when it began (the process's, ``mallinfo2`` after each op): ``backward``, per token."""
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_flatten

    with torch.device("meta"):
        model = Transformer(mc)
    model = model.to_empty(device="cpu").to(dtype)
    with torch.no_grad():
        for prm in model.parameters():
            prm.normal_(0, 0.02)
    params = {q.untyped_storage().data_ptr() for q in model.parameters()}
    tok = torch.randint(0, mc.vocab_size, (1, tokens), generator=torch.Generator().manual_seed(0))
    if backward:  # (once before: what kernels allocate on a first call and keep is no block's working set)
        torch.autograd.grad(model.hidden_states(tok).float().sum(), next(model.layers[0].parameters()))
    made: dict[int, int | None] = {}  # storage -> the block whose op made it (None: the root)
    inputs: dict[int, int | None] = {}  # the residual stream: storage -> the block (None: the final norm) it enters
    saved: dict[int, tuple[int | None, int]] = {}  # storage -> (the block that saved it first, bytes)
    current: list = [None]
    alive = []  # every op's output, held to the end: no storage's address is reused meanwhile

    class Makers(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            alive.append(out)
            ins = {t.untyped_storage().data_ptr() for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)}
            for t in tree_flatten(out)[0]:
                if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in ins:  # (not a view)
                    made[t.untyped_storage().data_ptr()] = current[0]
            return out

    def enter(block_index):
        def hook(module, args):
            current[0] = block_index
            inputs[args[0].untyped_storage().data_ptr()] = block_index
        return hook

    def leave(module, args, out):
        current[0] = None

    handles = [b.register_forward_pre_hook(enter(n)) for n, b in enumerate(model.layers)]
    handles += [b.register_forward_hook(leave) for b in model.layers]
    handles.append(model.norm.register_forward_pre_hook(
        lambda module, args: inputs.setdefault(args[0].untyped_storage().data_ptr(), None)))

    def pack(t):
        st = t.untyped_storage()
        ptr = st.data_ptr()
        # (a block that keeps its own input holds it, whoever saved it first: Gemma 4's root
        # keeps the embeddings its per-layer inputs are projected from, the first block's input)
        own_input = current[0] is not None and inputs.get(ptr, -1) == current[0]
        if ptr not in params and (ptr not in saved or own_input):
            saved[ptr] = (current[0], st.nbytes())
        return t

    first_input: list = []
    window: list = [None]  # during a block's backward: [the block, bytes allocated as it began, the most since]
    extra = [0.0] * mc.num_hidden_layers
    if backward:
        handles.append(model.layers[0].register_forward_pre_hook(lambda module, args: first_input.append(args[0])))

        def began(block_index):
            def hook(module, grad_output):
                window[0] = [block_index, allocated_bytes(), 0]
            return hook

        def ended(module, grad_input, grad_output):
            block_index, start, most = window[0]
            extra[block_index] = max(0, most - start) / tokens
            window[0] = None

        handles += [b.register_full_backward_pre_hook(began(n)) for n, b in enumerate(model.layers)]
        handles += [b.register_full_backward_hook(ended) for b in model.layers]

    class Peaks(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if window[0] is not None:
                window[0][2] = max(window[0][2], allocated_bytes())
            return out

    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), Makers():
            hidden = model.hidden_states(tok)
        alive.clear()
        if backward:
            with Peaks():
                torch.autograd.grad(hidden.float().sum(), first_input[0])
    finally:
        for h in handles:
            h.remove()
    out = {"blocks": [0.0] * mc.num_hidden_layers, "inputs": [0.0] * mc.num_hidden_layers, "root": 0.0}
    for ptr, (saver, nbytes) in saved.items():
        # (a block keeping its own input: its input norm, OLMo's attention)
        if ptr in inputs and saver is not None and saver == inputs[ptr]:
            out["inputs"][saver] += nbytes / tokens
            continue
        # each other storage in the block that made it (the RoPE tables, masks and Gemma 4's
        # per-layer inputs are the root's, made once and read by every block; the keys and values a
        # Gemma 4 layer shares are the block's that made them); one no op handed out (made inside
        # a kernel), in the block that saved it
        block = saver if ptr in inputs else made.get(ptr, saver)
        if block is None:
            out["root"] += nbytes / tokens
        else:
            out["blocks"][block] += nbytes / tokens
    if backward:
        out["backward"] = extra
    return out


def activation_bytes(shape: dict, tokens: int, dtype=torch.bfloat16, reduce: bool = True,
                     backward: bool = False) -> dict:
    """Bytes per token autograd saves for the backward pass, for one row of ``tokens`` tokens,
    causal attention, forward in ``dtype``: ``blocks``, each block's (a list, one per layer),
    what each block made; ``inputs``, each block's own input where the block keeps it (its input
    norm, r3.rms_norm; OLMo's attention, which reads it unnormed), which activation checkpointing
    keeps anyway; ``root``, what lies outside the blocks (the RoPE tables, masks, Gemma 4's per-layer inputs, the final
    norm's). A fused attention kernel keeps its output and log-sum-exp, not the ``tokens x
    tokens`` probabilities; the shared-prefix layout adds one additive mask per row, shared by all
    blocks. Layers differ where their kinds do (:func:`layer_kind`: Qwen 3.5's Gated DeltaNets and
    attention, Gemma 4's full, sliding and shared layers): ``reduce`` measures one layer of each
    kind in the model's own forward (:func:`_reduced_config`), and a second time with one more
    layer for the root's part that grows with the layers (Gemma 4's per-layer inputs).
    ``backward``: also ``backward``, each block's working set in its backward pass beyond what it
    saved (measured, so approximate: what a recomputing backward, such as the Gated DeltaNet's,
    allocates again, gradients, temporaries)."""
    mc = ModelConfig.from_hf(shape)
    if not reduce:
        return _saved_bytes(mc, tokens, dtype, backward)
    small, keep = _reduced_config(mc)
    got = _saved_bytes(small, tokens, dtype, backward)
    root = got["root"]
    if len(keep) < mc.num_hidden_layers:
        more = _saved_bytes(_reduced_config(mc, extra=True)[0], tokens, dtype)["root"]
        root += (mc.num_hidden_layers - len(keep)) * (more - got["root"])
    by_kind = {layer_kind(mc, i): n for n, i in enumerate(keep)}
    pick = lambda key: [got[key][by_kind[layer_kind(mc, i)]] for i in range(mc.num_hidden_layers)]  # noqa: E731
    out = {"blocks": pick("blocks"), "inputs": pick("inputs"), "root": root}
    if backward:
        out["backward"] = pick("backward")
    return out


def activation_bytes_of(result: dict) -> dict:
    """The activation bytes a :func:`plan` result was made with (to plan again without measuring)."""
    return {"blocks": result["activation_bytes_per_token_by_layer"],
            "inputs": result["activation_bytes_per_token_inputs"], "root": result["activation_bytes_per_token_root"],
            "backward": result["activation_bytes_per_token_backward"]}


def row_tokens(run: dict) -> int:
    """One trained row: prompt, attempt, the reflection turn's ~20 tokens, the reflection."""
    return run["prompt"] + run["attempt"] + run["reflection"] + 20


def micro_batch_layout(run: dict, shared_prefix: bool) -> dict:
    """The update's largest micro-batch: its ``tokens`` (what the forward encodes), ``targets``
    (the reflection positions whose logits it takes), ``rows`` and ``length`` of its forward rows.
    Per row: ``micro_batch_size`` rows. Shared prefix (r3.batch's ``_chunks``): as many whole
    groups, each its prefix once and its G reflections, as fit in the tokens of
    ``micro_batch_size`` rows of the per-row layout; a group over that alone is split by rows,
    its prefix in each part."""
    size, per_row, refl = run["micro_batch_size"], row_tokens(run), run["reflection"]
    if not shared_prefix:
        return {"tokens": size * per_row, "targets": size * refl, "rows": size, "length": per_row}
    budget, prefix = size * per_row, per_row - refl
    group = prefix + run["group_size"] * refl
    if group <= budget:
        groups = budget // group
        return {"tokens": groups * group, "targets": groups * run["group_size"] * refl, "rows": groups, "length": group}
    part = max(1, (budget - prefix) // refl)
    return {"tokens": prefix + part * refl, "targets": part * refl, "rows": 1, "length": prefix + part * refl}


def plan(shape: dict, world: int, run: dict, checkpointing: bool, act_bytes: dict | None = None,
         decode: str = "eager", freeze: str = "", shared_prefix: bool = True) -> dict:
    """Bytes per rank, by part (see the module docstring). ``act_bytes``: the activations' bytes
    per token (:func:`activation_bytes`, measured when not given). ``freeze``:
    r3.train's ``freeze`` patterns (frozen parameters have no gradients and no AdamW state).
    ``decode="compiled"``: the CUDA-graph decode step's static cache (r3.decode.StaticKVCache: the
    reflection batch's rows padded to ``graph_rows``, slots rounded up to a multiple of 64, plus
    64) is held all the time, and compactions happen in it (no separate copy). Not counted: the
    cache grows by at least a quarter when a request outgrows it (so it can end up to ~1.25x the
    rows and slots counted here, if sizes creep up), and the memory pool of the recorded CUDA
    graphs."""
    mc = ModelConfig.from_hf(shape)
    n = param_counts(mc, freeze)
    P, trained = n["total"], n["trained"]
    L, h, V = mc.num_hidden_layers, mc.hidden_size, mc.vocab_size
    if act_bytes is None:
        act_bytes = activation_bytes(shape, row_tokens(run), backward=True)
    blocks, inputs, root = act_bytes["blocks"], act_bytes["inputs"], act_bytes["root"]
    working = act_bytes.get("backward") or [0.0] * len(blocks)
    rows = run["batch_size"] // world * run["group_size"]
    slots = run["prompt"] + run["attempt"] + run["reflection"] + run["retry"] + 40  # + the two user turns
    mb = micro_batch_layout(run, shared_prefix)
    mb_tokens, targets = mb["tokens"], mb["targets"]
    held, held_root = blocks, root
    if shared_prefix:
        # the packed layout's attention on CUDA: one additive mask per packed row and window size,
        # and the kv heads repeated for the memory-efficient kernel (kept for backward per block)
        windows = len(set(mc.layer_windows)) if mc.layer_windows else 1
        held_root = root + mb["rows"] * mb["length"] ** 2 * 2 * windows / mb_tokens
        held = [b + (0 if mc.linear(i) else 2 * (mc.num_attention_heads - mc.layer_kv_heads(i))
                     * mc.layer_head_dim(i) * 2) for i, b in enumerate(blocks)]
    # (with checkpointing every block keeps its input, and one block its activations while it is
    # recomputed; without, every block keeps its activations, and its input where it saves it;
    # either way, block l's backward pass allocates its working set while blocks 0..l keep theirs)
    if checkpointing:
        per_token = L * 2 * h + max(a + w for a, w in zip(held, working))
    else:
        kept = [sum(held[:i + 1]) + sum(inputs[:i + 1]) for i in range(L)]
        per_token = max(k + w for k, w in zip(kept, working))
    act = mb_tokens * per_token + mb_tokens * held_root
    # the two largest blocks gathered at once (the one computing and the one prefetched)
    two = sorted(range(L), key=lambda i: n["blocks"][i])[-2:]
    kv = kv_cache_bytes(mc, rows, slots, 2)  # (bf16)
    parts = {
        "policy fp32 shards": 4 * P / world,
        "AdamW state": 8 * trained / world,
        "reference bf16 shards": 2 * P / world,
        "rollout copy bf16": 2 * P,
        "gradients fp32 shards": 4 * trained / world,
        "gathered params + their grads (bf16)": 2 * (n["root"] + sum(n["blocks"][i] for i in two))
                                                + 2 * (n["root_trained"] + sum(n["blocks_trained"][i] for i in two)),
        "rollout KV cache": kv,
        "its compacted copy (<= 3/4)": 0.75 * kv,
        "activations (one micro-batch)": act,
        "logits (reflection positions)": targets * V * 2,
        # the last thing the backward pass does: the root's gathered parameters and bf16 gradients,
        # copied to fp32 for the reduce-scatter (reduce_dtype), and its fp32 output shard
        END_OF_BACKWARD: 2 * n["root"] + 2 * n["root_trained"] + 4 * n["root_trained"] * (1 + 1 / world),
    }
    if decode == "compiled":
        parts["its compacted copy (<= 3/4)"] = 0.0
        parts["static decode cache"] = kv_cache_bytes(mc, graph_rows(rows), slots_with_margin(slots), 2)
    static = sum(parts.get(k, 0.0) for k in STATIC)
    rollout = sum(parts[k] for k in ROLLOUT)
    # the update's peak: the gradient shards plus the larger of the backward pass's busiest
    # moments (activations held, or the root's reduce-scatter once they are freed)
    during = sum(v for k, v in parts.items() if k not in STATIC and k not in ROLLOUT and k != END_OF_BACKWARD
                 and k != "gradients fp32 shards")
    update = parts["gradients fp32 shards"] + max(during, parts[END_OF_BACKWARD])
    return {"params": P, "trained_params": trained, "activation_bytes_per_token_layer": sum(blocks) / L,
            "activation_bytes_per_token_by_layer": list(blocks), "activation_bytes_per_token_inputs": list(inputs),
            "activation_bytes_per_token_backward": list(working),
            "activation_bytes_per_token_root": root, "rows_per_rank": rows, "slots": slots,
            "micro_batch_tokens": mb_tokens, "micro_batch_targets": targets, "parts": parts, "static": static, "rollout_phase": static + rollout,
            "update_phase": static + update, "total": static + max(rollout, update)}


#: The alternative to the activations in the update's peak (see :func:`plan`).
END_OF_BACKWARD = "or, at the end of backward: the root's gradient reduce-scattered in fp32"

#: What every rank holds all the time; the rollout's KV cache and the update's gradients,
#: gathered parameters, activations and logits exist only during their phase of the step.
STATIC = ("policy fp32 shards", "AdamW state", "reference bf16 shards", "rollout copy bf16", "static decode cache")
ROLLOUT = ("rollout KV cache", "its compacted copy (<= 3/4)")


def plan_table(world: int, gpu_gb: float, shapes: dict | None = None, freeze: str = "",
               shared_prefix: bool = True) -> tuple[list[dict], str]:
    """The plan of each of ``shapes`` (name -> config.json fields; the paper's 1.5B, 7B and 8B when
    None) as rows for JSON and a Markdown table."""
    shapes = shapes or {name: SHAPES[name] for name in PLAN_SHAPES}
    rows, lines = [], []
    lines.append(f"Per-rank memory (GiB), {world} ranks, FSDP2, bf16 compute, fp32 master weights and AdamW, the "
                 f"paper-shaped run ({PAPER['batch_size']} failures x G={PAPER['group_size']} per step, attempts/"
                 f"retries <= {PAPER['attempt']} tokens, reflections <= {PAPER['reflection']}, micro-batches of "
                 f"{PAPER['micro_batch_size']} rows, {'shared-prefix' if shared_prefix else 'per-row'} layout)"
                 + (f", parameters matching {freeze!r} frozen" if freeze else "") + ":")
    lines.append("")
    names = list(shapes)
    results = {}
    for name in names:
        a = activation_bytes(shapes[name], row_tokens(PAPER), backward=True)
        for ckpt in (False, True):
            results[(name, ckpt)] = plan(shapes[name], world, PAPER, ckpt, a, freeze=freeze, shared_prefix=shared_prefix)
    head = "| part | " + " | ".join(f"{n} | {n} + AC" for n in names) + " |"
    lines += [head, "|---|" + "---|" * (2 * len(names))]
    for part in results[(names[0], False)]["parts"]:
        cells = [f"{results[(n, c)]['parts'][part] / GiB:.1f}" for n in names for c in (False, True)]
        lines.append(f"| {part} | " + " | ".join(cells) + " |")
    for key, label in (("rollout_phase", "during the rollout (all the time + KV cache and its copy)"),
                       ("update_phase", "during the update (all the time + gradients + the busier moment: "
                                        "activations held, or the end of backward)")):
        cells = [f"{results[(n, c)][key] / GiB:.1f}" for n in names for c in (False, True)]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    cells = [f"**{results[(n, c)]['total'] / GiB:.1f}**" for n in names for c in (False, True)]
    lines.append("| **peak** | " + " | ".join(cells) + " |")
    lines.append("")
    for name in names:
        r = results[(name, False)]
        budget = 0.9 * gpu_gb * 1e9
        fits = [c for c in (False, True) if results[(name, c)]["total"] <= budget]
        text = ("fits" if fits else "does not fit") + f" in 90% of {gpu_gb:.0f} GB"
        text += " only with activation checkpointing" if fits == [True] else ""
        if not fits:
            # without compaction's copy of the KV cache?
            ac = results[(name, True)]
            no_copy = ac["static"] + max(ac["parts"]["rollout KV cache"], ac["update_phase"] - ac["static"])
            if no_copy <= budget:
                text += (f"; with activation checkpointing and --compact-rollouts false it needs "
                         f"{no_copy / GiB:.1f} GiB and fits (or lower --batch-size)")
        b = [x + y for x, y in zip(r["activation_bytes_per_token_by_layer"], r["activation_bytes_per_token_inputs"])]
        per_block = (f"{b[0]:.0f}" if len(set(b)) == 1 else
                     " / ".join(f"{v:.0f} ({b.count(v)} blocks)" for v in sorted(set(b), key=b.index)))
        trained = "" if r["trained_params"] == r["params"] else f" ({r['trained_params'] / 1e9:.2f}B trained)"
        lines.append(f"- {name}: {r['params'] / 1e9:.2f}B parameters{trained}; {per_block} bytes saved per token "
                     f"per block, {r['activation_bytes_per_token_root']:.0f} outside them, up to "
                     f"{max(r['activation_bytes_per_token_backward']):.0f} more while a block's backward pass runs "
                     f"(measured); {text}.")
        a = activation_bytes_of(r)
        comp = {c: plan(shapes[name], world, PAPER, c, a, decode="compiled", freeze=freeze, shared_prefix=shared_prefix)
                for c in (False, True)}
        fits = [c for c in (False, True) if comp[c]["total"] <= budget]
        lines.append(f"  With `--decode compiled` on CUDA the static decode cache "
                     f"({comp[False]['parts']['static decode cache'] / GiB:.1f} GiB) is held all the time, in place "
                     f"of compaction's copy: peak {comp[False]['total'] / GiB:.1f} GiB, "
                     f"{comp[True]['total'] / GiB:.1f} with activation checkpointing: "
                     + ("fits" if fits == [False, True] else "fits only with activation checkpointing" if fits
                        else "does not fit (lower --batch-size, or decode eager)") + ".")
        for c in (False, True):
            for decode, res in (("eager", results[(name, c)]), ("compiled", comp[c])):
                rows.append({"model": name, "activation_checkpointing": c, "decode": decode, "world": world,
                             **{k: v for k, v in res.items() if k != "parts"},
                             "parts_gib": {k: v / GiB for k, v in res["parts"].items()}})
    return rows, "\n".join(lines)


# ------------------------------------------------------------------------------------ measure


class _MallInfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                               "fsmblks", "uordblks", "fordblks", "keepcost")]


_mallinfo2 = None


def allocated_bytes() -> int:
    """The bytes this process has allocated now (glibc ``mallinfo2``: mmapped blocks plus the heap
    in use; torch's CPU tensors come from malloc). Unlike resident memory it does not count what
    the allocator keeps after a free."""
    global _mallinfo2
    if _mallinfo2 is None:
        libc = ctypes.CDLL(ctypes.util.find_library("c"))
        libc.mallinfo2.restype = _MallInfo2
        _mallinfo2 = libc.mallinfo2
    m = _mallinfo2()
    return m.hblkhd + m.uordblks


class AllocatedPeak:
    """Samples :func:`allocated_bytes` every ``every`` seconds; ``peak`` since ``reset``."""

    def __init__(self, every: float = 0.002):
        self.every, self.peak, self.peak_time, self._stop = every, 0, time.perf_counter(), False
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def now(self) -> int:
        return allocated_bytes()

    def _run(self):
        while not self._stop:
            now = self.now()
            if now > self.peak:
                self.peak, self.peak_time = now, time.perf_counter()
            time.sleep(self.every)

    def reset(self) -> int:
        self.peak, self.peak_time = self.now(), time.perf_counter()
        return self.peak

    def stop(self):
        self._stop = True


def measure(args) -> None:
    from r3 import batch as B
    from r3 import train as T
    from r3.config import TrainConfig
    from r3.distributed import shard

    d = T.init_distributed()
    shape = load_shape(args.shape or "qwen2.5-0.5b")
    mc = ModelConfig.from_hf(shape)
    # --micro-batches micro-batches of 8 rows of --tokens / 8 tokens, the last 128 of each
    # trained; as a run for plan(): its update terms are the formula checked here (no rollout is
    # made). From the second micro-batch on, the gradients of the first (fp32 shards) are held
    # while the activations are, as in a real update of many micro-batches.
    rows, per = 8, args.tokens // 8
    run = dict(batch_size=d.world, group_size=1, prompt=per - 128 - 20, attempt=0, reflection=128, retry=0,
               micro_batch_size=rows)
    formula = {ckpt: plan(shape, d.world, run, ckpt, freeze=args.freeze, shared_prefix=False) for ckpt in (False, True)}
    rss = AllocatedPeak()
    out = {"shape": args.shape, "world": d.world, "tokens": args.tokens, "rank": d.rank, "phases": []}
    base = rss.reset()
    torch.manual_seed(0)
    policy = Transformer(mc)
    T.freeze_parameters(policy, args.freeze)
    reference = copy.deepcopy(policy).to(torch.bfloat16).requires_grad_(False)
    with torch.device("meta"):
        rollout = Transformer(mc)
    rollout = rollout.to_empty(device="cpu").to(torch.bfloat16)
    rollout.tie_weights()
    rollout.requires_grad_(False)
    policy.train()
    shard(policy, d, torch.bfloat16)
    shard(reference, d, torch.bfloat16)
    import gc

    gc.collect()
    models = rss.now() - base
    out["models_measured_gib"] = models / GiB
    parts = formula[False]["parts"]
    out["models_formula_gib"] = sum(parts.get(k, 0.0) for k in STATIC if k != "AdamW state") / GiB
    opt = torch.optim.AdamW([p for p in policy.parameters() if p.requires_grad], lr=1e-6)
    g = torch.Generator().manual_seed(d.rank)
    n_rows = rows * args.micro_batches
    seqs = [torch.randint(0, mc.vocab_size, (per,), generator=g).tolist() for _ in range(n_rows)]
    spans = [(per - 128, per)] * n_rows
    cfg = TrainConfig(micro_batch_size=rows, max_reflection_tokens=128, beta=0.0).validate()
    out["micro_batches"] = args.micro_batches
    for ckpt in (False, True, False):  # the first run allocates AdamW's state; the next two compare
        policy.activation_checkpointing = ckpt
        mbs = B.make_micro_batches(seqs, spans, [1.0] * n_rows, rows, 0, d.device)
        dist_barrier(d)
        before = rss.reset()
        t0 = time.perf_counter()
        T.update(policy, opt, mbs, len(mbs), cfg, d)
        dt = time.perf_counter() - t0
        time.sleep(0.05)
        out["phases"].append({"activation_checkpointing": ckpt, "update_peak_growth_gib": (rss.peak - before) / GiB,
                              "update_s": dt, "peak_at_fraction_of_update": (rss.peak_time - t0) / dt})
    rss.stop()
    # the update's parts: gradients, gathered parameters, activations, logits (AdamW's state
    # exists already after the first run)
    out["formula_update_gib"] = {ckpt: (f["update_phase"] - f["static"]) / GiB for ckpt, f in formula.items()}
    out["activation_bytes_per_token_layer"] = formula[False]["activation_bytes_per_token_layer"]
    gathered = [None] * d.world
    import torch.distributed as dist

    dist.all_gather_object(gathered, out)
    if d.rank == 0:
        print(json.dumps(gathered, indent=1))
        for r in gathered:
            print(f"rank {r['rank']}: models {r['models_measured_gib']:.2f} GiB (formula {r['models_formula_gib']:.2f}); "
                  + "; ".join(f"update{' + AC' if p['activation_checkpointing'] else ''} +{p['update_peak_growth_gib']:.2f} GiB "
                              f"in {p['update_s']:.1f} s (peak at {p['peak_at_fraction_of_update']:.0%} of it)" for p in r["phases"][1:])
                  + f" (formula {r['formula_update_gib'][False]:.2f} / {r['formula_update_gib'][True]:.2f} GiB)")
        if args.json:
            write_json_atomic(Path(args.json), {"measured": gathered})
    dist_barrier(d)


def load_shape(name: str) -> dict:
    """A shape of :data:`SHAPES` by name, or the fields of a config.json (or of a checkpoint
    directory's); what r3 cannot read is an R3Error naming the file and field."""
    from r3.errors import R3Error  # (main() prints it in one line)

    if name in SHAPES:
        return SHAPES[name]
    path = Path(name)
    if path.is_dir():
        path = path / "config.json"
    if not path.is_file():
        raise R3Error(f"--shape {name!r}: neither one of {', '.join(SHAPES)} nor a config.json file "
                      "(or a directory holding one)")
    try:
        shape = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise R3Error(f"{path}: not JSON ({e})") from None
    if not isinstance(shape, dict):
        raise R3Error(f"{path}: a config.json holds a JSON object, got {type(shape).__name__}")
    ModelConfig.from_hf(shape, source=str(path))  # (an R3Error naming the field)
    return shape


def dist_barrier(d):
    import torch.distributed as dist

    if d.world > 1:
        dist.barrier()


@cli_main
def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--measure", action="store_true", help="measure on this machine (run under torchrun)")
    ap.add_argument("--shape", default=None,
                    help=f"the model: one of {', '.join(SHAPES)}, or a config.json (or a checkpoint directory "
                         f"holding one); the plan's default: {', '.join(PLAN_SHAPES)}; --measure's: qwen2.5-0.5b")
    ap.add_argument("--freeze", default="",
                    help="r3.train's freeze patterns (comma-separated, over r3's parameter names): frozen "
                         "parameters have no gradients and no AdamW state")
    ap.add_argument("--shared-prefix", choices=("true", "false"), default="true",
                    help="the plan's update layout, as r3.train's --shared-prefix (--measure runs the per-row one)")
    ap.add_argument("--tokens", type=int, default=4096, help="--measure's micro-batch tokens")
    ap.add_argument("--micro-batches", type=int, default=2,
                    help="--measure's micro-batches per update (from the second on, gradients are held too)")
    ap.add_argument("--world", type=int, default=8, help="the plan's ranks")
    ap.add_argument("--gpu-gb", type=float, default=80.0)
    ap.add_argument("--json", default=None)
    ap.add_argument("--markdown", default=None)
    args = ap.parse_args(argv)
    if args.measure:
        os.environ["CUDA_VISIBLE_DEVICES"] = ""  # (it counts host memory: the CPU, even where a GPU is)
        from r3.distributed import run_and_exit

        # (leaves without gloo's teardown; an R3Error, a --shape or --freeze it cannot use, is one line
        # and exit 2, as the plan's: run_and_exit would print it as a crash)
        run_and_exit(lambda: cli_main(measure)(args))
    shapes = None
    if args.shape:
        shape = load_shape(args.shape)
        path = Path(args.shape)
        name = args.shape if args.shape in SHAPES else path.resolve().name if path.is_dir() else (
            path.parent.resolve().name if path.name == "config.json" else path.stem)
        shapes = {name: shape}
    rows, text = plan_table(args.world, args.gpu_gb, shapes, args.freeze, args.shared_prefix == "true")
    print(text)
    if args.json:
        write_json_atomic(Path(args.json), {"plan": rows, "run": PAPER})
    if args.markdown:
        command = " ".join(["python benchmarks/memory_plan.py", *map(shlex.quote, sys.argv[1:])])
        write_text_atomic(Path(args.markdown), "# Memory plan\n\n" + text + "\n\n" + MARKDOWN_FOOTER.format(command=command))


#: How a written plan was made and what it leaves out.
MARKDOWN_FOOTER = """Made with `{command}` (activations measured on this machine's CPU in the model's own bf16
forward and backward; the rest counted). It does not show a GPU allocator's caching and
fragmentation, NCCL's buffers, CUDA graphs' memory pool, or a frozen bottom of the model that
needs no backward pass (counted as if it did). Checked against measured allocations on CPU ranks:
`torchrun --nproc_per_node 2 benchmarks/memory_plan.py --measure`.
"""


if __name__ == "__main__":
    main()
