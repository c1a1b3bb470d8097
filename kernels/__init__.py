"""Fused Triton kernels, each beside its plain-PyTorch reference.

Importable without triton: the kernels then run their memory-lean PyTorch paths.
"""

from .logprob_kl import fused_logprob_kl, k3, logprob_kl_reference

__all__ = ["fused_logprob_kl", "k3", "logprob_kl_reference"]
