"""DESIGN.md's contract name for r3's fused kernels: ``kernels.fused_logprob_kl``.

The code lives in :mod:`r3.kernels` (``r3/kernels/logprob_kl.py``), and r3 imports it from there:
``kernels`` is also the import name of Hugging Face's ``kernels`` distribution (transformers >= 5.25
requires it). Outside this checkout, ``import kernels`` finds that one. Inside it (the checkout's
root first on ``sys.path``), this package is found first; where another ``kernels`` is installed,
this package then loads that one in its place and adds r3's names to it, so that transformers gets
the package it imports and ``kernels.fused_logprob_kl`` still works.
"""

import importlib.machinery
import importlib.util
import os
import sys

from r3.kernels import fused_logprob_kl, k3, logprob_kl, logprob_kl_reference

__all__ = ["fused_logprob_kl", "k3", "logprob_kl", "logprob_kl_reference"]


def installed_elsewhere():
    """The spec of a ``kernels`` package on ``sys.path`` outside this checkout, or None."""
    checkout = os.path.realpath(os.path.join(os.path.dirname(__file__), os.pardir))
    path = [p for p in sys.path if isinstance(p, str) and os.path.realpath(p or os.curdir) != checkout]
    return importlib.machinery.PathFinder.find_spec(__name__, path)


_other = installed_elsewhere()
if _other is not None and _other.loader is not None:
    # The import statement returns what sys.modules holds once this file has run.
    _module = sys.modules[__name__] = importlib.util.module_from_spec(_other)
    _other.loader.exec_module(_module)
    for _name in __all__:
        if not hasattr(_module, _name):
            setattr(_module, _name, globals()[_name])
sys.modules.setdefault(__name__ + ".logprob_kl", logprob_kl)  # (``import kernels.logprob_kl`` too)
