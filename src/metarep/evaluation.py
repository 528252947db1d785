"""Test-time evaluation on fresh tasks: adapt the head, measure the excess risk.

For a fresh task with head ``w_star`` and ``m`` test samples ``(X, y)``, a method adapts its
head from the learned ``w`` with ``s`` gradient steps of size ``alpha``
(``w' = w - alpha B^T X^T (X B w - y) / m``, repeated) and suffers the excess risk
``||B w' - B_star w_star||^2`` (x is isotropic, so this is the risk above the noise).

Two reference rows: the **oracle** knows ``B_star`` and fits the head by least squares in k
dimensions; **regression** ignores any representation and fits ``beta`` in d dimensions. Both
use plain least squares when ``m >= dim + 2`` and otherwise ridge with the penalty of
:func:`metarep.theory.ridge_penalty`.

The representation methods and the oracle only see ``X`` through ``X B`` and ``X B_star``, so
they are simulated exactly in an orthonormal basis ``Q = [B_star, Q_B]`` of span(B_star, B): the
projected inputs ``X Q`` are i.i.d. standard normal whatever ``d`` is. Regression needs the full
``X`` and is simulated in d dimensions, in chunks.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from metarep.algorithms import adapt_head
from metarep.models import LinearParams
from metarep.tasks import Problem, sample_heads
from metarep.theory import least_squares_risk, ridge_penalty, uses_least_squares

REGRESSION_BUDGET = 200_000_000  # Gaussian entries drawn for the regression row per m_test
CHUNK_ENTRIES = 4_000_000


@dataclass(frozen=True)
class EvalRow:
    """One line of ``eval.csv``: mean excess risk over ``n_tasks`` fresh tasks."""

    method: str
    shots: int
    excess_risk: float
    stderr: float
    n_tasks: int
    theory: float = float("nan")


def _summary(method: str, shots: int, risks: np.ndarray, theory: float = np.nan) -> EvalRow:
    n = risks.shape[0]
    return EvalRow(method, shots, float(risks.mean()), float(risks.std(ddof=1) / np.sqrt(n)), n,
                   theory)


def representation_basis(B: np.ndarray, B_star: np.ndarray) -> np.ndarray:
    """Orthonormal ``Q = [B_star, Q_B]`` (d, r) spanning span(B_star) + span(B), r <= k + k'."""
    outside = B - B_star @ (B_star.T @ B)
    U, s, _ = np.linalg.svd(outside, full_matrices=False)
    rank = int(np.sum(s > s.max(initial=0.0) * 1e-10)) if s.size else 0
    return np.concatenate([B_star, U[:, :rank]], axis=1)


def fit_least_squares(F: np.ndarray, y: np.ndarray, penalty: float) -> np.ndarray:
    """Batched ``argmin ||F b - y||^2 + penalty ||b||^2`` for ``F`` (n, m, p), ``y`` (n, m).

    Solved in the primal (p x p) when ``m > p``, else in the dual (m x m); ``penalty = 0`` with
    ``m <= p`` gives the minimum-norm interpolator. **Returns:** (n, p).
    """
    _, m, p = F.shape
    Ft = np.swapaxes(F, 1, 2)
    if m > p:
        gram = Ft @ F + penalty * np.eye(p)
        return np.linalg.solve(gram, (Ft @ y[..., None]))[..., 0]
    gram = F @ Ft + penalty * np.eye(m)
    return (Ft @ np.linalg.solve(gram, y[..., None]))[..., 0]


def baseline_penalty(m: int, dim: int, problem: Problem) -> float:
    """0 (least squares) when ``m >= dim + 2``, else the documented ridge penalty."""
    if uses_least_squares(m, dim):
        return 0.0
    return ridge_penalty(dim, problem.Sigma_star, problem.noise_var)


def adapted_and_oracle_risks(
    params: LinearParams,
    problem: Problem,
    m: int,
    n_tasks: int,
    alpha: float,
    adapt_steps: int,
    rng: np.random.Generator,
) -> tuple[np.ndarray, np.ndarray]:
    """Excess risks (n_tasks,) after ``adapt_steps`` head steps, and of the oracle, on the
    same fresh tasks (common random numbers)."""
    Q = representation_basis(params.B.astype(np.float64), problem.B_star)
    B_r, k = Q.T @ params.B.astype(np.float64), problem.k
    w = params.w.astype(np.float64)
    heads = sample_heads(problem, n_tasks, rng)
    Z = rng.standard_normal((n_tasks, m, Q.shape[1]))  # X Q
    y = Z[..., :k] @ heads[..., None]
    y = y[..., 0] + rng.standard_normal((n_tasks, m)) * np.sqrt(problem.noise_var)
    adapted = (adapt_head(B_r, w, Z, y, alpha, adapt_steps) if adapt_steps
               else np.broadcast_to(w, (n_tasks, w.shape[0])))
    truth = np.zeros((n_tasks, Q.shape[1]))
    truth[:, :k] = heads
    method_risk = np.sum((adapted @ B_r.T - truth) ** 2, axis=1)
    oracle_heads = fit_least_squares(Z[..., :k], y, baseline_penalty(m, k, problem))
    oracle_risk = np.sum((oracle_heads - heads) ** 2, axis=1)
    return method_risk, oracle_risk


def regression_risks(
    problem: Problem, m: int, n_tasks: int, rng: np.random.Generator
) -> np.ndarray:
    """Excess risks of least squares / ridge in d dimensions on fresh tasks.

    At most ``REGRESSION_BUDGET`` Gaussian entries are drawn, so for very large ``m d`` fewer
    than ``n_tasks`` tasks (at least 2) are used; the standard error says so.
    """
    d = problem.d
    n_total = max(2, min(n_tasks, REGRESSION_BUDGET // (m * d)))
    chunk = max(1, CHUNK_ENTRIES // (m * d))
    penalty = baseline_penalty(m, d, problem)
    risks = []
    for start in range(0, n_total, chunk):
        n = min(chunk, n_total - start)
        beta = sample_heads(problem, n, rng) @ problem.B_star.T
        X = rng.standard_normal((n, m, d))
        y = (X @ beta[..., None])[..., 0] + rng.standard_normal((n, m)) * np.sqrt(
            problem.noise_var)
        risks.append(np.sum((fit_least_squares(X, y, penalty) - beta) ** 2, axis=1))
    return np.concatenate(risks)


def evaluate(
    params: LinearParams,
    problem: Problem,
    method: str,
    shots: tuple[int, ...],
    n_tasks: int,
    alpha: float,
    adapt_steps: int,
    seed: int,
) -> list[EvalRow]:
    """Mean test excess risk with its standard error, for each ``m_test`` in ``shots``:
    the method after ``adapt_steps`` head steps, the oracle and plain regression."""
    rows = []
    children = np.random.SeedSequence(seed).spawn(len(shots))
    width = problem.k + params.B.shape[1]
    for m, child in zip(shots, children, strict=True):
        represent_rng, regression_rng = (np.random.default_rng(s) for s in child.spawn(2))
        chunk = max(2, CHUNK_ENTRIES // (m * width))
        pieces = [
            adapted_and_oracle_risks(params, problem, m, min(chunk, n_tasks - start), alpha,
                                     adapt_steps, represent_rng)
            for start in range(0, n_tasks, chunk)
        ]
        method_risk = np.concatenate([piece[0] for piece in pieces])
        oracle_risk = np.concatenate([piece[1] for piece in pieces])
        rows.append(_summary(method, m, method_risk))
        rows.append(_summary("oracle", m, oracle_risk,
                             least_squares_risk(m, problem.k, problem.noise_var)))
        rows.append(_summary("regression", m, regression_risks(problem, m, n_tasks, regression_rng),
                             least_squares_risk(m, problem.d, problem.noise_var)))
    return rows
