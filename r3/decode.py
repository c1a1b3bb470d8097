"""The sampler's decode step: one new token per row through the model's own forward.

``decode="eager"`` runs :func:`step_logits` as it is; ``decode="compiled"`` runs it through
``torch.compile``, as gpt-fast compiles its ``decode_one_token``:

* on CUDA with CUDA graphs (inductor's ``triton.cudagraphs``, what ``mode="reduce-overhead"``
  sets): a step is one graph replay instead of hundreds of kernel launches from Python. The KV
  cache is marked as a static address (the step writes into it in place); a cache that moved (a
  new session, a compaction) is recorded again. Shapes are static per batch size and per
  KV-length bucket (``r3.model.KV_BUCKET`` slots): one graph is recorded for each, and the step
  has no host syncs.
* on CPU with inductor, which fuses each layer's small elementwise ops (RMSNorm, RoPE, cache
  writes, SiLU, residuals) into a few C++ loops; ``emulate_precision_casts`` rounds
  intermediates to the model dtype where eager does.

With no top-k/top-p, the sampler's next-token pick is fused into the same graph. Batch size and
KV length are dynamic dimensions of one compiled graph (compiled once per process, ~50-80 s for
the built-in model on 2 CPU cores; a batch of exactly one row is specialised once more). Each
model has compiled functions of its own (the model is their argument, not a closure variable, so
they keep no model alive), and so its own recompile budget; its packed slots are constants of
its graphs.

Not yet run on a GPU: the CUDA-graph form is tested on CPU (where inductor leaves the graphs
out), and ``benchmarks/gpu_check.py`` measures it where a GPU is lent.

On CPU in bf16 both modes run the model's matmuls on prepacked weights
(:mod:`r3.packed_linear`): a matmul backend, not a second copy of the model's math.
"""

from __future__ import annotations

import contextlib
import types
import weakref

import torch

from r3.model import KV_BUCKET, KVCache
from r3.packed_linear import PackedWeights

DECODE_MODES = ("eager", "compiled")


def step_logits(model, tok: torch.Tensor, pos: torch.Tensor, cache: KVCache, kv_len, vocab_size: int) -> torch.Tensor:
    """Logits ``[B, vocab_size]`` of one token per row (``tok``/``pos``: ``[B]``); writes each
    row's keys/values at ``pos`` and attends to its slots ``< kv_len``."""
    h = model.hidden_states(tok[:, None], positions=pos[:, None], cache=cache, kv_len=kv_len)
    logits = model.lm_head(h[:, 0])
    return logits[:, :vocab_size] if vocab_size < logits.shape[-1] else logits


# model -> {(vocab_size, pick, cuda): compiled function}. The model is the functions' argument,
# not a closure variable: they hold no model alive (the dictionary holds models weakly).
_COMPILED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _compile(vocab_size: int, pick, cuda: bool):
    """``run(model, tok, pos, ks, vs, slots, u, temperature)`` through torch.compile: the logits,
    or ``pick(logits, u, temperature)`` in the same graph when ``pick`` is given. ``slots``:
    ``arange(kv_len)`` (a tensor, so that kv_len is a dynamic size, not a constant)."""

    def logits(model, tok, pos, ks, vs, slots):
        return step_logits(model, tok, pos, KVCache(ks, vs), slots.shape[0], vocab_size)

    # Two functions, so the two kinds of graph do not share one code object's recompile budget.
    if pick is None:
        def run(model, tok, pos, ks, vs, slots, u, temperature):
            return logits(model, tok, pos, ks, vs, slots)
    else:
        def run_and_pick(model, tok, pos, ks, vs, slots, u, temperature):
            return pick(logits(model, tok, pos, ks, vs, slots), u, temperature)
        run = run_and_pick
    # A code object of its own: dynamo keeps compiled graphs, and counts recompiles against its
    # limit (8), per code object; shared by every model and vocabulary, the budget would run out
    # (a model of another dtype, a batch of one, greedy and sampled picks) and the step would
    # fall back to eager.
    run = types.FunctionType(run.__code__.replace(), run.__globals__, run.__name__, run.__defaults__,
                             run.__closure__)
    options = {"emulate_precision_casts": True}
    if cuda:
        # mode="reduce-overhead", plus: no warning for the one graph per (batch, KV bucket) shape.
        options.update({"triton.cudagraphs": True, "triton.cudagraph_dynamic_shape_warn_limit": None})
    # Static shapes except those marked dynamic (rows, cache slots, kv_len): with everything
    # dynamic, head counts and sizes would become symbols and the fused loops much slower.
    return torch.compile(run, dynamic=None, options=options)


class DecodeStep:
    """``step(tok, pos, cache, kv_len, vocab_size)`` -> logits ``[B, vocab_size]``; compiled, it
    also takes ``pick=, u=, temperature=`` and returns ``pick(logits, u, temperature)``.

    Use it inside ``with step.active():`` (the prepacked matmuls are on there, on CPU in bf16); the
    weights must not change inside that block. Make a new one after they change (an optimizer
    step): it repacks them. The compiled step leaves LongRoPE's position limit to its caller
    (``Session.sample`` checks a whole request once: ``model.check_positions``).
    """

    def __init__(self, model, mode: str = "eager", cuda_graphs: bool | None = None):
        """``cuda_graphs``: compiled with CUDA graphs (default: on a CUDA device)."""
        if mode not in DECODE_MODES:
            raise ValueError(f"decode must be one of {', '.join(DECODE_MODES)}, got {mode!r}")
        self.model = model
        self.compiled = mode == "compiled"
        self.cuda_graphs = cuda_graphs
        self.packed = PackedWeights.get(model) if PackedWeights.available(model) else None
        self._fns: dict[tuple, object] = {}  # (vocab_size, pick, cuda) -> this model's compiled step
        self._marked = None  # the cache whose tensors were last marked for the compiler (weakly:
        # the sampler frees a compacted copy before making the next)

    def active(self):
        return self.packed.active() if self.packed is not None else contextlib.nullcontext()

    def __call__(self, tok, pos, cache: KVCache, kv_len: int, vocab_size: int, *, pick=None, u=None,
                 temperature=None):
        if not self.compiled:
            if pick is not None:
                raise ValueError("DecodeStep: pick is fused only into the compiled step")
            return step_logits(self.model, tok, pos, cache, kv_len, vocab_size)
        cuda = tok.device.type == "cuda" if self.cuda_graphs is None else self.cuda_graphs
        fn = self._fns.get((vocab_size, pick, cuda))
        if fn is None:
            fns = _COMPILED.setdefault(self.model, {})
            if (vocab_size, pick, cuda) not in fns:
                fns[(vocab_size, pick, cuda)] = _compile(vocab_size, pick, cuda)
            fn = self._fns[(vocab_size, pick, cuda)] = fns[(vocab_size, pick, cuda)]
        # The bucket the eager forward would round kv_len up to (see Transformer.hidden_states).
        kv_len = min(cache.max_len, -(-kv_len // KV_BUCKET) * KV_BUCKET)
        slots = torch.arange(kv_len, device=tok.device)
        for t in (tok, pos, slots) if u is None else (tok, pos, slots, u):
            torch._dynamo.maybe_mark_dynamic(t, 0)
        if self._marked is None or self._marked() is not cache:  # a new cache: mark it once
            for t in cache.k + cache.v:  # [B, n_kv, max_len, D]
                torch._dynamo.maybe_mark_dynamic(t, 0)
                torch._dynamo.maybe_mark_dynamic(t, 2)
                if cuda:
                    torch._dynamo.mark_static_address(t, guard=False)
            self._marked = weakref.ref(cache)
        if not cuda:
            return fn(self.model, tok, pos, cache.k, cache.v, slots, u, temperature)
        torch.compiler.cudagraph_mark_step_begin()
        out = fn(self.model, tok, pos, cache.k, cache.v, slots, u, temperature)
        # The graph's outputs live in its memory pool and are overwritten by the next replay.
        return tuple(t.clone() for t in out) if isinstance(out, tuple) else out.clone()

