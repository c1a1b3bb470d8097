"""Standard errors for accuracies and for paired differences between two models on the same items."""

from __future__ import annotations

import math


def binomial_stderr(k: int, n: int) -> float:
    """Standard error of the rate k/n: sqrt(p (1 - p) / n)."""
    if not n:
        return 0.0
    p = k / n
    return math.sqrt(p * (1 - p) / n)


def paired_difference(a: list[bool], b: list[bool]) -> dict:
    """Mean and standard error of ``b - a`` over the same queries (a paired comparison: each query
    is its own control, so the error is smaller than for two independent rates)."""
    n = len(a)
    if n != len(b):
        raise ValueError("paired verdicts must have the same length")
    diffs = [int(y) - int(x) for x, y in zip(a, b)]
    mean = sum(diffs) / n if n else 0.0
    return {"mean": mean, "stderr": mean_stderr(diffs), "n": n, "better": diffs.count(1), "worse": diffs.count(-1)}


def mean_stderr(values: list[float]) -> float:
    """Standard error of a mean as lm-evaluation-harness reports it: the sample standard
    deviation (n - 1) over sqrt(n); 0 for fewer than two values."""
    n = len(values)
    if n < 2:
        return 0.0
    mean = sum(values) / n
    return math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1) / n)
