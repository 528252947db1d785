"""Closed-form predictions of the paper (spec section 4) and of the test-time baselines.

Every formula takes the task distribution as a :class:`~metarep.core.problem.Problem`
(``Sigma_star``, ``sigma^2``, and ``B_star`` where the coordinates matter) and the model as
:class:`~metarep.core.model.LinearParams`.
"""

from __future__ import annotations

import math

import numpy as np

from metarep.core.model import LinearParams
from metarep.core.problem import Problem


def lambda_star(problem: Problem, m_in: float, alpha: float) -> np.ndarray:
    """The limit of ``B_star^T B_t B_t^T B_star`` under FO-ANIL with infinitely many tasks.

    ``Lambda_star = (1/alpha) Sigma_star ((1 + 1/m_in) Sigma_star
    + ((tr(Sigma_star) + sigma^2) / m_in) I_k)^{-1}``; with ``m_in = inf`` it is
    ``I_k / alpha``. **Returns:** (k, k).
    """
    Sigma_star, noise_var = problem.Sigma_star, problem.noise_var
    k = Sigma_star.shape[0]
    if math.isinf(m_in):
        return np.eye(k) / alpha
    shrinkage = (1 + 1 / m_in) * Sigma_star + (np.trace(Sigma_star) + noise_var) / m_in * np.eye(k)
    return Sigma_star @ np.linalg.inv(shrinkage) / alpha


def ridge_penalty(dim: int, problem: Problem) -> float:
    """Penalty ``lambda = sigma^2 dim / tr(Sigma_star)`` of the baselines' ridge regression.

    It is the Bayes-optimal isotropic penalty of ``||X beta - y||^2 + lambda ||beta||^2`` for a
    ``dim``-dimensional regressor with i.i.d. prior entries of variance ``tr(Sigma_star)/dim``
    (the same signal energy as ``B_star w_star``). ``sigma^2 = 0`` gives minimum-norm least
    squares.
    """
    return problem.noise_var * dim / float(np.trace(problem.Sigma_star))


def uses_least_squares(m: int, dim: int) -> bool:
    """Baselines use plain least squares when ``m >= dim + 2`` (finite expected risk)."""
    return m >= dim + 2


def least_squares_risk(m: int, dim: int, noise_var: float) -> float:
    """Expected excess risk ``sigma^2 dim / (m - dim - 1)`` of least squares in ``dim``
    dimensions with ``m`` isotropic Gaussian samples (``m >= dim + 2``), else ``nan``."""
    if not uses_least_squares(m, dim):
        return math.nan
    return noise_var * dim / (m - dim - 1)


def _inverse(m: float) -> float:
    """``1/m``, with ``1/inf = 0`` (the infinite-sample limit)."""
    return 0.0 if math.isinf(m) else 1.0 / m


def one_step_risk(params: LinearParams, problem: Problem, m: float, alpha: float) -> float:
    """Expected excess risk ``E ||B w' - B_star w_star||^2`` on a fresh task after one head
    step ``w' = w - alpha B^T X^T (X B w - y) / m`` from any ``(B, w)`` with ``m`` samples.

    With ``N = B^T B``, ``C = B_star^T B`` and ``n = N w`` (docs/infinite_tasks.md, from
    ``E[S A S] = A + (A^T + tr(A) I) / m``):

    ``w^T n + tr Sigma - 2 alpha (n^T n + tr(Sigma C C^T))
    + alpha^2 [(1 + 1/m) (n^T N n + tr(N C^T Sigma C))
    + (w^T n + tr Sigma + sigma^2) tr(N^2) / m]``.

    ``m = inf`` drops the ``1/m`` terms. Only ``B^T B`` and ``B_star^T B`` enter, so ``B`` may
    be given in any orthonormal coordinates that contain span(B_star) (e.g. ``B_star = [I_k;
    0]``). **Arguments:** ``params``: ``B`` (d, k'), ``w`` (k',); ``problem``: ``B_star``
    (d, k), ``Sigma_star`` (k, k), ``sigma^2``.
    """
    (B, w), B_star, Sigma_star = params, problem.B_star, problem.Sigma_star
    inv_m = _inverse(m)
    N, C = B.T @ B, B_star.T @ B
    n = N @ w
    trace_sigma = float(np.trace(Sigma_star))
    signal = float(np.sum(C * (Sigma_star @ C)))  # tr(Sigma C C^T)
    energy = float(w @ n) + trace_sigma
    second = (1 + inv_m) * (float(n @ N @ n) + float(np.sum(N * (C.T @ Sigma_star @ C))))
    second += (energy + problem.noise_var) * float(np.sum(N * N)) * inv_m
    return energy - 2 * alpha * (float(n @ n) + signal) + alpha**2 * second


def adapted_risk(
    params: LinearParams, problem: Problem, m: float, alpha: float, steps: int
) -> float:
    """Closed-form expected excess risk after ``steps`` head steps (test-time adaptation):
    ``w^T B^T B w + tr Sigma`` for 0 steps, :func:`one_step_risk` for 1, ``nan`` beyond (no
    closed form is implemented)."""
    B, w = params
    if steps == 0:
        return float(w @ (B.T @ (B @ w))) + float(np.trace(problem.Sigma_star))
    if steps == 1:
        return one_step_risk(params, problem, m, alpha)
    return math.nan


def baseline_risk(m: int, dim: int, problem: Problem) -> float:
    """Closed-form expected excess risk of the oracle (``dim = k``) or plain regression
    (``dim = d``) as :mod:`metarep.core.evaluation` computes them, where one is known.

    Least squares (``m >= dim + 2``): ``sigma^2 dim / (m - dim - 1)``. Noiseless minimum-norm
    interpolation (``sigma^2 = 0``, ``m < dim + 2``): the fit is the projection of the true
    regressor onto the row space of ``X``, a uniformly random m-dimensional subspace, so the
    risk is ``tr(Sigma_star) (1 - m / dim)`` for ``m < dim`` and 0 for ``m >= dim``. Ridge with
    noise (``sigma^2 > 0``, ``m < dim + 2``) has no closed form here: ``nan``.
    """
    if uses_least_squares(m, dim):
        return least_squares_risk(m, dim, problem.noise_var)
    if problem.noise_var == 0.0:
        return float(np.trace(problem.Sigma_star)) * max(0.0, 1.0 - m / dim)
    return math.nan


def predicted_limits(
    problem: Problem, m_in: float, alpha: float, shots: tuple[int, ...] = ()
) -> dict[str, object]:
    """The limits of FO-ANIL with infinitely many tasks as ``t -> inf`` (spec section 4), for
    ``w_0 = 0``, a small initialisation and small step sizes, and ``k' >= k``.

    **Returns** a dict: ``Lambda_star`` (k, k) (:func:`lambda_star`); ``head_norm``,
    ``lambda_err`` and ``subspace_dist``: 0; ``rank``: k; ``perp_norm``: 0 for finite
    ``m_in`` and ``None`` for ``m_in = inf`` (then the undriven directions keep their initial
    size, which depends on ``B_0``: see :func:`metarep.core.infinite.undriven_perp_norm`);
    ``train_loss``: the expected meta-training loss at the limit,
    ``(one-step risk with m_in samples + sigma^2) / 2``; ``test_risk``: ``{m: one-step risk
    with m samples}`` at the limit for each ``m`` in ``shots``. At the limit ``w = 0``,
    ``B_perp^T B = 0`` and ``C C^T = Lambda_star``, so the risks are those of
    :func:`one_step_risk` with ``B = Lambda_star^{1/2}`` in the coordinates ``B_star = I_k``.
    """
    Lambda = lambda_star(problem, m_in, alpha)
    k = problem.k
    values, vectors = np.linalg.eigh((Lambda + Lambda.T) / 2)
    root = (vectors * np.sqrt(np.clip(values, 0.0, None))) @ vectors.T
    limit = LinearParams(root, np.zeros(k))
    in_span = Problem(np.eye(k), problem.Sigma_star, problem.noise_var)

    def risk(m: float) -> float:
        return one_step_risk(limit, in_span, m, alpha)

    return {
        "Lambda_star": Lambda,
        "head_norm": 0.0,
        "lambda_err": 0.0,
        "subspace_dist": 0.0,
        "rank": k,
        "perp_norm": None if math.isinf(m_in) else 0.0,
        "train_loss": 0.5 * (risk(m_in) + problem.noise_var),
        "test_risk": {int(m): risk(m) for m in shots},
    }
