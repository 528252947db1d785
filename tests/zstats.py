"""Monte Carlo z-tests on every entry of an estimate, Bonferroni-corrected over the entries.

Used by ``test_infinite.py`` and ``test_theory.py``: with ``n`` entries, each ``|z|`` must stay
below ``z*(n) = Phi^{-1}(1 - FAMILY_ERROR / (2 n))``, so a correct formula fails with
probability at most ``FAMILY_ERROR`` whatever ``n`` is, and a wrong one is caught as soon as
one entry is off by a few standard errors.
"""

from __future__ import annotations

import numpy as np
from scipy.stats import norm

FAMILY_ERROR = 1e-4


def z_scores(estimate, stderr, expected) -> np.ndarray:
    """``(estimate - expected) / stderr`` entrywise, flattened."""
    estimate, stderr, expected = (np.asarray(a, dtype=float).ravel()
                                  for a in (estimate, stderr, expected))
    assert np.all(stderr > 0), "a standard error is zero: nothing random was estimated"
    return (estimate - expected) / stderr


def z_threshold(n: int) -> float:
    """Bonferroni bound ``z*(n)`` for ``n`` simultaneous two-sided z-tests."""
    return float(norm.isf(FAMILY_ERROR / (2 * n)))


def max_abs_z(estimate, stderr, expected) -> tuple[float, float]:
    """``(max |z|, z*(n))`` over the entries."""
    z = z_scores(estimate, stderr, expected)
    return float(np.abs(z).max()), z_threshold(z.size)


def assert_z(estimate, stderr, expected, what: str) -> None:
    """Every entry of ``estimate`` agrees with ``expected`` within ``z*(n)`` standard errors."""
    worst, bound = max_abs_z(estimate, stderr, expected)
    assert worst <= bound, f"{what}: max |z| = {worst:.2f} > {bound:.2f}"
