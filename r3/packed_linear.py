"""A CPU matmul backend for decoding: the model's :class:`r3.model.Linear` weights prepacked once
for oneDNN.

A decode step multiplies a few rows (one token per row) by every weight, ~120 matmuls. On CPU in
bf16 a oneDNN matmul reorders its weight into oneDNN's blocked layout on every call, and a decode
step spends much of its time on that; in fp32 the plain matmul goes to a BLAS sgemm that runs
such thin products well below what the blocked layout allows (on an AVX2 AMD EPYC: 45 against 97
GFLOP/s for the 135M model's LM head at 16 rows). Here each weight is reordered once into a table
of slots, and the model's ``Linear`` layers run on those copies while :meth:`PackedWeights.active`
is on (set ``Linear.packed`` to the slot number). Only the matmul is taken over: the model's
forward, eager or compiled, stays the one implementation.

The product goes through an opaque custom op, ``r3::packed_linear(x, slot)``, so a compiled graph
keeps the slot numbers as constants (inductor cannot take prepacked weights as graph inputs). Slots
are stable for a model: when its weights change (an optimizer step, a rollout-weight sync) the
new packed copies go into the same slots and a compiled step is reused, not recompiled.

The copies cost about the model's weights in memory again; they are dropped with the model.
"""

from __future__ import annotations

import contextlib
import itertools
import threading
import weakref

import torch

from r3.model import Linear
from r3.precision import bf16_is_native

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


# A plain library op (not ``torch.library.custom_op``, whose Python wrapper would run on each of
# a step's ~120 calls).
_LIB = torch.library.Library("r3", "DEF")
_LIB.define("packed_linear(Tensor x, int slot) -> Tensor")
_LIB.impl("packed_linear", _packed_linear_impl, "CPU")
torch.library.register_fake("r3::packed_linear", _packed_linear_fake, lib=_LIB)
Linear.packed_eager = staticmethod(_packed_linear_impl)


def _free(slots: list[int]) -> None:
    with _SLOT_LOCK:
        for slot in slots:
            _SLOTS.pop(slot, None)


def _version(t: torch.Tensor) -> int:
    try:
        return t._version
    except RuntimeError:  # an inference tensor has no version counter: a change in place inside
        return -1  # inference mode goes unseen (r3 changes weights outside it: optimizer, weight sync)


class PackedWeights:
    """Prepacked copies of one model's ``Linear`` weights (see the module docstring)."""

    _cache: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> PackedWeights

    @staticmethod
    def available(model) -> bool:
        """Whether this backend applies: a CPU model with oneDNN's packed matmul, in fp32, or in
        bf16 on a CPU where oneDNN runs bf16 (elsewhere it is emulated or missing; on other
        devices the copies would cost memory for nothing)."""
        if (model.device.type != "cpu" or _MKLDNN_LINEAR is None or not torch.backends.mkldnn.is_available()
                or not hasattr(torch.ops.mkldnn, "_reorder_linear_weight")):
            return False
        return model.dtype == torch.float32 or (model.dtype == torch.bfloat16 and bf16_is_native("cpu"))

    @classmethod
    def get(cls, model) -> "PackedWeights":
        """The model's packed weights, repacked first if any of its weights changed since (checked
        by data pointer and in-place version counter, so an optimizer step is seen)."""
        packed = cls._cache.get(model)
        if packed is None:
            packed = cls._cache[model] = cls(model)
        packed.refresh()
        return packed

    def __init__(self, model):
        # The Linear modules, not the model: the cache holds the model weakly.
        self.linears = [m for m in model.modules() if isinstance(m, Linear)]
        with _SLOT_LOCK:
            self.slots = [next(_SLOT_IDS) for _ in self.linears]
        self.key = None
        weakref.finalize(self, _free, list(self.slots))

    def _key(self) -> tuple:
        return tuple((t.data_ptr(), _version(t)) for m in self.linears for t in (m.weight, m.bias) if t is not None)

    def refresh(self) -> None:
        key = self._key()
        if key == self.key:
            return
        with torch.no_grad():
            for m, slot in zip(self.linears, self.slots):
                w = torch.ops.mkldnn._reorder_linear_weight(m.weight.detach().contiguous(), 16)
                b = None if m.bias is None else m.bias.detach()
                with _SLOT_LOCK:
                    _SLOTS[slot] = (w, b, m.out_features)
        self.key = key

    @contextlib.contextmanager
    def active(self):
        """The model's ``Linear`` layers run on the packed copies inside this block (which must
        not change the weights)."""
        for m, slot in zip(self.linears, self.slots):
            object.__setattr__(m, "packed", slot)  # (plain attributes: no nn.Module bookkeeping)
        try:
            yield self
        finally:
            for m in self.linears:
                object.__setattr__(m, "packed", None)
