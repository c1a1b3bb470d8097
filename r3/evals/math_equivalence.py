"""MATH answers compared by symbolic equivalence, as lm-evaluation-harness's ``minerva_math``
compares them for its ``exact_match``: equal when the two normalised strings are identical, or
when sympy parses both as LaTeX (its ANTLR parser, which needs ``antlr4-python3-runtime`` 4.11)
and simplifies their difference to 0 within 5 seconds. Anything that fails to parse, subtract or
simplify counts as different. Optional: ``pip install 'r3[math]'``.

The identity rule is the released harness's (0.4.13 on PyPI: its ``is_equiv`` returns True for
identical non-empty strings before parsing, since sympy cannot parse an interval, a tuple or a
matrix); the harness's repository before that release had no such rule."""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

from r3.errors import R3Error
from r3.time_limit import time_limit

TIMEOUT_S = 5  # the harness's limit per comparison


def require() -> None:
    """Raise a one-line R3Error unless sympy and ANTLR 4.11 are installed."""
    try:
        import sympy  # noqa: F401

        antlr = version("antlr4-python3-runtime")
    except (ImportError, PackageNotFoundError):
        antlr = None
    if antlr is None or not antlr.startswith("4.11"):
        found = f" (found antlr4-python3-runtime {antlr})" if antlr else ""
        raise R3Error("--math-equivalence sympy needs sympy and antlr4-python3-runtime 4.11, as sympy's LaTeX parser "
                      f"does{found}: pip install 'r3[math]'")


def is_equiv(x1: str, x2: str) -> bool:
    """Whether two normalised answers are the same (identical, or equal as sympy expressions)."""
    if x1 and x1 == x2:
        return True
    import sympy
    from sympy.parsing.latex import parse_latex

    try:
        with time_limit(TIMEOUT_S):
            a, b = parse_latex(x1), parse_latex(x2)
            return bool(sympy.simplify(a - b) == 0)
    except ImportError:  # sympy's LaTeX parser without its ANTLR runtime: not an answer's fault
        raise
    except Exception:  # unparsable, not subtractable (sets, tuples), or too slow: not equal
        return False
