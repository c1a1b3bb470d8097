"""DESIGN.md's contract name for r3's fused kernels: ``kernels.fused_logprob_kl``.

The code lives in :mod:`r3.kernels` (``r3/kernels/logprob_kl.py``), and r3 imports it from there:
``kernels`` is also the import name of Hugging Face's ``kernels`` distribution (transformers >= 5.25
requires it), and where that one is installed, ``import kernels`` outside this checkout finds it,
not this package.
"""

import sys

from r3.kernels import fused_logprob_kl, k3, logprob_kl, logprob_kl_reference

sys.modules.setdefault(__name__ + ".logprob_kl", logprob_kl)  # (``import kernels.logprob_kl`` too)

__all__ = ["fused_logprob_kl", "k3", "logprob_kl", "logprob_kl_reference"]
