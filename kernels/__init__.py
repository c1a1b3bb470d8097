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
import itertools
import sys

from r3.kernels import fused_logprob_kl, k3, logprob_kl, logprob_kl_reference

__all__ = ["fused_logprob_kl", "k3", "logprob_kl", "logprob_kl_reference"]


def installed_elsewhere():
    """The spec of the first ``kernels`` package that is not this one, or None: on ``sys.path``
    in order, then from the other import finders (an editable install's). Every r3 checkout's copy
    of this file is passed over (two checkouts on one path would otherwise load each other in turn)."""
    specs = (importlib.machinery.PathFinder.find_spec(__name__, [entry]) for entry in sys.path
             if isinstance(entry, str))
    finders = (f.find_spec(__name__, None) for f in sys.meta_path
               if f is not importlib.machinery.PathFinder and hasattr(f, "find_spec"))
    for spec in itertools.chain(specs, finders):
        if spec is not None and spec.origin and not _is_r3s(spec.origin):
            return spec
    return None


def _is_r3s(origin: str) -> bool:
    try:
        with open(origin, encoding="utf-8", errors="replace") as f:
            return _MARK in f.read()
    except OSError:
        return False


_MARK = "DESIGN.md's contract name for r3's fused kernels"


_other = installed_elsewhere()
if _other is not None and _other.loader is not None:
    # The import statement returns what sys.modules holds once this file has run. While that one
    # runs, another thread's import waits for it, as for any module being imported.
    _module = importlib.util.module_from_spec(_other)
    _other._initializing = True
    try:
        sys.modules[__name__] = _module
        _other.loader.exec_module(_module)
        for _name in __all__:
            if not hasattr(_module, _name):
                setattr(_module, _name, globals()[_name])
    finally:
        _other._initializing = False
sys.modules.setdefault(__name__ + ".logprob_kl", logprob_kl)  # (``import kernels.logprob_kl`` too)
