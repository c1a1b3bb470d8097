"""A small run of benchmarks/fuzz_verifiers.py: on generated adversarial completions the verifiers
agree with their independent re-implementations and never pay for a wrong answer."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import fuzz_verifiers as fz  # noqa: E402

# a verifier that raises judges the text wrong: every test here also fails on one (conftest)
pytestmark = pytest.mark.usefixtures("verifier_errors")


@pytest.mark.parametrize("seed", [11, 12])
def test_fuzzed_verdicts(seed):
    for name, task, gen, pool in fz.setups(seed):
        row = fz.run(name, task, gen, pool, 400, seed)
        assert row["wrong_verdicts"] == 0, row["wrong_examples"]
        assert row["verifier_errors"] == 0, row["first_verifier_error"]  # (also without the conftest fixture)
        assert row["false_positives_vs_label"] == 0, row["false_positive_examples"]
        assert row["passes"] > 40  # the generator makes right answers too
        # the only right answers the rule refuses: '!' after a bare expression (a factorial), a
        # bidirectional override anywhere in the text, and a bare expression followed in its
        # sentence by more than the few words an answer allows ("20 + 6 ✓ So the result is 26")
        allowed = ("a '!' next to the equation", "bidirectional control characters",
                   "the expression is mentioned in a sentence")
        assert all(r.startswith(allowed) for r in row["false_negative_reasons"]), row["false_negative_reasons"]
