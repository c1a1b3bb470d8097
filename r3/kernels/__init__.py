"""Fused Triton kernels, each beside its plain-PyTorch reference.

Importable without triton: the kernels then run their memory-lean PyTorch paths. r3 imports them
from here, never through the top-level ``kernels`` name (DESIGN.md's contract), because ``kernels``
is also the import name of Hugging Face's ``kernels`` distribution, which transformers >= 5.25
requires: where that one is installed it is what ``import kernels`` finds, and r3 must still work.
"""

from .logprob_kl import fused_logprob_kl, k3, logprob_kl_reference

__all__ = ["fused_logprob_kl", "k3", "logprob_kl_reference"]
