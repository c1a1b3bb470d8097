"""The sampler's decode step: one new token per row through the model, with the per-token overhead cut.

Three implementations of the same math (``Transformer.hidden_states`` + ``lm_head`` for ``T = 1``):

* :class:`ModelStep` -- the model's own forward (the reference; the default on CUDA).
* :class:`FastStep` -- for CPU: q/k/v and gate/up fused into one matmul each, RoPE on q and k at
  once, a flat ``index_copy_`` into the cache, the query heads of each kv head passed to SDPA as
  that head's "query positions", and -- in bf16 with oneDNN -- weights prepacked once for oneDNN's
  matmul (no weight reorder on each call).
* ``FastStep(..., compiled=True)`` -- the same function through ``torch.compile``: inductor fuses
  the ~20 small elementwise ops of each layer (RMSNorm, RoPE, cache writes, SiLU, residuals)
  into a few C++ loops. The prepacked weights cannot be graph inputs (inductor lowers oneDNN's
  matmul only for frozen, constant weights), so the matmuls are an opaque custom op,
  ``r3::packed_linear(x, slot)``, that looks its weight up in a table by slot number. Slots are
  stable for a model: after an optimizer step the new packed weights go into the same slots, so
  the compiled graph is reused, not recompiled. Compiled with ``emulate_precision_casts``
  (intermediates rounded to the model dtype as in eager), its logits equal the eager step's up to
  rare one-ulp differences (fp32 ``exp``/``rsqrt`` implementations differ in the last bit). With
  no top-k/top-p the sampler's next-token pick is fused into the same graph. The first call
  compiles (~35-70 s for the built-in model on 2 cores; seconds when inductor's on-disk cache is
  warm); batch size and cache length are dynamic, so later batches reuse the graph (a batch of
  exactly one row is specialised once more).
"""

from __future__ import annotations

import itertools
import threading
import weakref
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from r3.model import rope_cos_sin


class ModelStep:
    """One decode step through the model's own forward (used on CUDA by default)."""

    def __init__(self, model):
        self.model = model

    def __call__(self, tok, pos, cache, kv_len, vocab_size):
        h = self.model.hidden_states(tok[:, None], positions=pos[:, None], cache=cache, kv_len=kv_len)
        weight = self.model.lm_head.weight
        return F.linear(h[:, 0], weight[:vocab_size] if vocab_size < weight.shape[0] else weight)


# --------------------------------------------------------------------------------------------
# The packed-weight table behind the r3::packed_linear custom op
# --------------------------------------------------------------------------------------------

_SLOTS: dict[int, tuple[torch.Tensor, torch.Tensor | None, int]] = {}  # slot -> (packed w, bias, out features)
_SLOT_IDS = itertools.count()
_SLOT_LOCK = threading.Lock()


# The resolved overload: no overload resolution through the op packet on each call.
_MKLDNN_LINEAR = torch.ops.mkldnn._linear_pointwise.default if hasattr(torch.ops.mkldnn, "_linear_pointwise") else None


def _packed_linear_impl(x: torch.Tensor, slot: int) -> torch.Tensor:
    w, b, _ = _SLOTS[slot]
    return _MKLDNN_LINEAR(x, w, b, "none", [], "")


def _packed_linear_fake(x: torch.Tensor, slot: int) -> torch.Tensor:
    return x.new_empty((*x.shape[:-1], _SLOTS[slot][2]))


# A plain library op (not ``torch.library.custom_op``, whose Python wrapper runs on each of the
# step's ~121 calls).
_LIB = torch.library.Library("r3", "DEF")
_LIB.define("packed_linear(Tensor x, int slot) -> Tensor")
_LIB.impl("packed_linear", _packed_linear_impl, "CPU")
torch.library.register_fake("r3::packed_linear", _packed_linear_fake, lib=_LIB)


class _Slots:
    """Slot numbers owned by one model's FastSteps (all its rebuilds), and the compiled step
    functions that use them; the slots are freed with the last FastStep that holds this."""

    def __init__(self):
        self.ids: dict[object, int] = {}  # matmul index j (see _decode) or ("head", vocab) -> slot
        self.compiled: dict[tuple, object] = {}  # (vocab_size, pick) -> compiled step function
        weakref.finalize(self, _free_slots, self.ids)

    def put(self, key, w: torch.Tensor, b: torch.Tensor | None, out_features: int) -> None:
        with _SLOT_LOCK:
            if key not in self.ids:
                self.ids[key] = next(_SLOT_IDS)
            _SLOTS[self.ids[key]] = (w, b, out_features)


def _free_slots(ids: dict) -> None:
    with _SLOT_LOCK:
        for slot in ids.values():
            _SLOTS.pop(slot, None)


# --------------------------------------------------------------------------------------------
# The step
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Shape:
    """What the step needs to know that is not a tensor (constants of a compiled graph)."""

    n_layers: int
    nh: int
    nkv: int
    hd: int
    inter: int
    eps: float
    windows: tuple


def _decode(shape: _Shape, linear, dense: list, tok, pos, ks: list, vs: list, slots, compiled: bool = False):
    """Logits ``[B, vocab]`` for one token per row; writes each row's keys/values at ``pos``.

    ``linear(x, j)``: the ``j``-th matmul (+ bias) -- layer ``i``'s q/k/v, o, gate/up and down are
    ``j = 4i .. 4i + 3``, the LM head ``4 * n_layers``. ``slots``: ``arange(kv_len)``, the cache
    slots attention reads (a tensor, so a compiled graph sees ``kv_len`` as a dynamic size). ``dense``: embedding, RoPE inverse
    frequencies, final norm, then the two norms of each layer. ``compiled``: written for
    torch.compile -- RMSNorm spelled out (inductor then fuses it; the eager step calls the one
    fused op, which rounds the same way) and cache writes by indexing, which inductor does in
    place (eager: ``index_copy_`` into a flat view of a contiguous cache, fewer ops).
    """
    B = tok.shape[0]
    nh, nkv, hd, inter = shape.nh, shape.nkv, shape.hd, shape.inter
    embed, inv_freq, final_norm = dense[0], dense[1], dense[2]
    dtype = embed.dtype
    dev = tok.device

    def rms(x, w):
        # Computed in fp32 and rounded once: the same values as the model's RMSNorm.
        if compiled:
            xf = x.float()
            return w * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + shape.eps)).to(x.dtype)
        return w * F.rms_norm(x, (x.shape[-1],), eps=shape.eps)

    x = F.embedding(tok, embed)  # [B, H]
    cos, sin = rope_cos_sin(inv_freq, pos[:, None], dtype)  # [B, 1, 1, D]
    cos, sin = cos[:, 0], sin[:, 0]  # [B, 1, D]: broadcast over the q and k heads
    # rotate_half(x) * sin == roll(x, D/2) * (sin with its first half negated), bit for bit
    half = hd // 2
    sin = torch.cat((-sin[..., :half], sin[..., half:]), dim=-1)
    kv_len = slots.shape[0]
    masks = {}
    for w in shape.windows:
        if w not in masks:
            m = slots <= pos[:, None]
            if w is not None:
                m = m & (slots > pos[:, None] - w)
            # additive float mask, built once per step (SDPA would convert a bool one per layer)
            masks[w] = torch.zeros(m.shape, dtype=dtype, device=dev).masked_fill_(~m, float("-inf"))[:, None, None, :]
    S = ks[0].shape[2]
    flat = ((torch.arange(B, device=dev) * nkv)[:, None] + torch.arange(nkv, device=dev)) * S + pos[:, None]
    flat = flat.reshape(-1)  # row (b, head) slot pos[b] of a [B * nkv * S, D] view
    contiguous = not compiled and all(t.is_contiguous() for t in ks + vs)
    rows = None if contiguous else torch.arange(B, device=dev)
    for i in range(shape.n_layers):
        h = rms(x, dense[3 + 2 * i])
        qkv = linear(h, 4 * i).view(B, nh + 2 * nkv, hd)
        qk = qkv[:, : nh + nkv]
        qk = qk * cos + qk.roll(half, -1) * sin  # RoPE on q and k at once (model.apply_rope)
        q, k, v = qk[:, :nh], qk[:, nh:], qkv[:, nh + nkv:]
        kc, vc = ks[i], vs[i]
        if contiguous:
            kc.view(-1, hd).index_copy_(0, flat, k.reshape(-1, hd).to(kc.dtype))
            vc.view(-1, hd).index_copy_(0, flat, v.reshape(-1, hd).to(vc.dtype))
        else:
            kc[rows, :, pos] = k.to(kc.dtype)
            vc[rows, :, pos] = v.to(vc.dtype)
        # The query heads sharing a kv head go in as that head's "query positions": one token
        # per row, so they share the row's mask. The same math as SDPA with enable_gqa (which
        # expands the cache to every query head, a copy per step).
        o = F.scaled_dot_product_attention(
            q.reshape(B, nkv, nh // nkv, hd), kc[:, :, :kv_len], vc[:, :, :kv_len], attn_mask=masks[shape.windows[i]],
        )
        x = x + linear(o.reshape(B, nh * hd), 4 * i + 1)
        gu = linear(rms(x, dense[4 + 2 * i]), 4 * i + 2)
        x = x + linear(F.silu(gu[:, :inter]) * gu[:, inter:], 4 * i + 3)
    return linear(rms(x, final_norm), 4 * shape.n_layers)


def _compile_step(shape: _Shape, slot_ids: tuple | None, pick=None):
    """``run(tok, pos, ks, vs, slots, dense, mats, u, temperature)`` through torch.compile: the
    logits, or ``pick(logits, u, temperature)`` fused into the same graph when ``pick`` is given.
    ``slot_ids``: the packed matmuls' slot numbers (constants of the graph); None = plain matmuls
    whose weights and biases come in ``mats`` (``[w0, b0, w1, b1, ...]``)."""

    def logits(tok, pos, ks, vs, slots, dense, mats):
        if slot_ids is not None:
            def linear(x, j):
                return torch.ops.r3.packed_linear(x, slot_ids[j])
        else:
            def linear(x, j):
                return F.linear(x, mats[2 * j], mats[2 * j + 1])
        return _decode(shape, linear, dense, tok, pos, ks, vs, slots, compiled=True)

    # Two functions, so the two kinds of graph do not share one code object's recompile budget.
    if pick is None:
        def run(tok, pos, ks, vs, slots, dense, mats, u, temperature):
            return logits(tok, pos, ks, vs, slots, dense, mats)
    else:
        def run_and_pick(tok, pos, ks, vs, slots, dense, mats, u, temperature):
            return pick(logits(tok, pos, ks, vs, slots, dense, mats), u, temperature)
        run = run_and_pick

    # Static shapes except those the caller marks dynamic (rows, cache slots, kv_len): with
    # everything dynamic, head counts and sizes become symbols and the fused loops much slower.
    # emulate_precision_casts: round intermediates to the model dtype where eager does (fused
    # kernels would otherwise keep fp32 between ops).
    return torch.compile(run, dynamic=None, options={"emulate_precision_casts": True})


class FastStep:
    """The CPU decode step (see the module docstring), optionally compiled.

    It holds copies of the weights (fused / packed), built by :meth:`get` and rebuilt whenever any
    parameter of the model changes (checked by data pointer and in-place version counter, so an
    optimizer step is seen); the copies cost about the model's size in memory again, and are
    dropped with the model (the cache holds the model weakly). A rebuild keeps the previous
    copy's packed-weight slots and compiled functions (it refills the slots).
    """

    _cache: weakref.WeakKeyDictionary | None = None  # model -> (key, FastStep)

    @staticmethod
    def supports(cfg) -> bool:
        """Whether the fused step implements this architecture (not yet: Qwen3's q/k norms and
        LongRoPE's scaled cos/sin; those models decode through :class:`ModelStep`)."""
        return not cfg.qk_norm and not (cfg.rope_scaling and cfg.rope_scaling["rope_type"] == "longrope")

    @classmethod
    def get(cls, model) -> "FastStep":
        if cls._cache is None:
            cls._cache = weakref.WeakKeyDictionary()
        key = tuple((p.data_ptr(), _version(p)) for p in model.parameters())
        hit = cls._cache.get(model)
        if hit is not None and hit[0] == key:
            return hit[1]
        step = cls(model, previous=hit[1] if hit is not None else None)
        cls._cache[model] = (key, step)
        return step

    def __init__(self, model, previous: "FastStep | None" = None):
        cfg = model.config
        # No reference to the model itself: the cache is keyed weakly by the model.
        self.inv_freq = model.inv_freq(model.device)
        self.lm_head = model.lm_head.weight.detach()
        self.dtype = model.dtype
        self.shape = _Shape(
            n_layers=cfg.num_hidden_layers, nh=cfg.num_attention_heads, nkv=cfg.num_key_value_heads,
            hd=cfg.head_dim, inter=cfg.intermediate_size, eps=cfg.rms_norm_eps,
            windows=tuple(layer.self_attn.window for layer in model.layers),
        )
        self.packed = (
            model.device.type == "cpu" and self.dtype == torch.bfloat16 and torch.backends.mkldnn.is_available()
            and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")
        )
        same = previous is not None and previous.shape == self.shape and previous.packed == self.packed
        self._slots = previous._slots if same else _Slots()
        with torch.no_grad():
            mats = []  # (weight, bias) of each matmul, in the step's order
            for layer in model.layers:
                a, m = layer.self_attn, layer.mlp
                mats += [
                    (torch.cat([a.q_proj.weight, a.k_proj.weight, a.v_proj.weight]), _cat_bias(a.q_proj, a.k_proj, a.v_proj)),
                    (a.o_proj.weight, _bias(a.o_proj)),
                    (torch.cat([m.gate_proj.weight, m.up_proj.weight]), _cat_bias(m.gate_proj, m.up_proj)),
                    (m.down_proj.weight, _bias(m.down_proj)),
                ]
            self.mats = [(self._weight(w, b, j), b) for j, (w, b) in enumerate(mats)]
            self.dense = [model.embed_tokens.weight.detach(), self.inv_freq, model.norm.weight.detach()]
            for layer in model.layers:
                self.dense += [layer.input_layernorm.weight.detach(), layer.post_attention_layernorm.weight.detach()]
        self._heads: dict[int, tuple] = {}
        for vocab in previous._heads if same else ():  # refill the head slots compiled steps use
            self.head(vocab)

    def _weight(self, w: torch.Tensor, b: torch.Tensor | None, key) -> torch.Tensor:
        w = w.detach().contiguous()
        if self.packed:
            packed = torch.ops.mkldnn._reorder_linear_weight(w, 16)
            self._slots.put(key, packed, b, w.shape[0])
            return packed
        return w

    def head(self, vocab_size: int) -> tuple:
        """(weight, bias) of the LM head restricted to the real vocabulary."""
        if vocab_size not in self._heads:
            with torch.no_grad():
                self._heads[vocab_size] = (self._weight(self.lm_head[:vocab_size], None, ("head", vocab_size)), None)
        return self._heads[vocab_size]

    def __call__(self, tok, pos, cache, kv_len, vocab_size, *, compiled: bool = False, pick=None, u=None,
                 temperature=None):
        """Logits ``[B, vocab_size]`` -- or, compiled with ``pick``, ``pick(logits, u, temperature)``
        computed in the same graph (the sampler's next-token choice: one pass less over the
        logits, no extra dispatch)."""
        mats = self.mats + [self.head(vocab_size)]
        if pick is not None and not compiled:
            raise ValueError("FastStep: pick is fused only into the compiled step")
        if compiled:
            fn = self._slots.compiled.get((vocab_size, pick))
            if fn is None:
                ids = None
                if self.packed:
                    keys = [*range(len(self.mats)), ("head", vocab_size)]
                    ids = tuple(self._slots.ids[k] for k in keys)
                fn = self._slots.compiled[(vocab_size, pick)] = _compile_step(self.shape, ids, pick)
            flat = [] if self.packed else [t for wb in mats for t in wb]
            slots = torch.arange(kv_len, device=tok.device)
            for t in (tok, pos, slots) if u is None else (tok, pos, slots, u):
                torch._dynamo.maybe_mark_dynamic(t, 0)
            for t in cache.k + cache.v:  # [B, n_kv, max_len, D]
                torch._dynamo.maybe_mark_dynamic(t, 0)
                torch._dynamo.maybe_mark_dynamic(t, 2)
            return fn(tok, pos, cache.k, cache.v, slots, self.dense, flat, u, temperature)
        if self.packed:
            def linear(x, j):
                w, b = mats[j]
                return _MKLDNN_LINEAR(x, w, b, "none", [], "")
        else:
            def linear(x, j):
                w, b = mats[j]
                return F.linear(x, w, b)
        return _decode(self.shape, linear, self.dense, tok, pos, cache.k, cache.v, torch.arange(kv_len, device=tok.device))


def _version(t: torch.Tensor) -> int:
    try:
        return t._version
    except RuntimeError:  # an inference tensor: it cannot be modified in place outside inference mode
        return -1


def _bias(linear):
    return None if linear.bias is None else linear.bias.detach()


def _cat_bias(*linears):
    if all(l.bias is None for l in linears):
        return None
    return torch.cat([l.bias.detach() if l.bias is not None else torch.zeros(l.out_features, dtype=l.weight.dtype,
                                                                            device=l.weight.device) for l in linears])
