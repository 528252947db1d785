"""Closed-form predictions of the paper (spec section 4) and of the test-time baselines."""

from __future__ import annotations

import math

import numpy as np


def lambda_star(
    Sigma_star: np.ndarray, noise_var: float, m_in: float, alpha: float
) -> np.ndarray:
    """The limit of ``B_star^T B_t B_t^T B_star`` under FO-ANIL with infinitely many tasks.

    ``Lambda_star = (1/alpha) Sigma_star ((1 + 1/m_in) Sigma_star
    + ((tr(Sigma_star) + sigma^2) / m_in) I_k)^{-1}``; with ``m_in = inf`` it is
    ``I_k / alpha``. **Returns:** (k, k).
    """
    k = Sigma_star.shape[0]
    if math.isinf(m_in):
        return np.eye(k) / alpha
    shrinkage = (1 + 1 / m_in) * Sigma_star + (np.trace(Sigma_star) + noise_var) / m_in * np.eye(k)
    return Sigma_star @ np.linalg.inv(shrinkage) / alpha


def ridge_penalty(dim: int, Sigma_star: np.ndarray, noise_var: float) -> float:
    """Penalty ``lambda = sigma^2 dim / tr(Sigma_star)`` of the baselines' ridge regression.

    It is the Bayes-optimal isotropic penalty of ``||X beta - y||^2 + lambda ||beta||^2`` for a
    ``dim``-dimensional regressor with i.i.d. prior entries of variance ``tr(Sigma_star)/dim``
    (the same signal energy as ``B_star w_star``). ``sigma^2 = 0`` gives minimum-norm least
    squares.
    """
    return noise_var * dim / float(np.trace(Sigma_star))


def uses_least_squares(m: int, dim: int) -> bool:
    """Baselines use plain least squares when ``m >= dim + 2`` (finite expected risk)."""
    return m >= dim + 2


def least_squares_risk(m: int, dim: int, noise_var: float) -> float:
    """Expected excess risk ``sigma^2 dim / (m - dim - 1)`` of least squares in ``dim``
    dimensions with ``m`` isotropic Gaussian samples (``m >= dim + 2``), else ``nan``."""
    if not uses_least_squares(m, dim):
        return math.nan
    return noise_var * dim / (m - dim - 1)
