"""Test-time evaluation on fresh tasks: adapt the head, measure the excess risk.

For a fresh task with head ``w_star`` and ``m`` test samples ``(X, y)``, a method adapts its
head from the learned ``w`` with ``s`` gradient steps of size ``alpha``
(``w' = w - alpha B^T X^T (X B w - y) / m``, repeated) and suffers the excess risk
``||B w' - B_star w_star||^2`` (x is isotropic, so this is the risk above the noise).
Multi-task learning (``mtl``) has no learned shared head: it adapts from ``w = 0`` and adds a
row fitting the head by least squares on the learned features ``X B``
(:func:`feature_least_squares_risks`).

Two reference rows: the **oracle** knows ``B_star`` and fits the head by least squares in k
dimensions; **regression** ignores any representation and fits ``beta`` in d dimensions. Both
use plain least squares when ``m >= dim + 2`` and otherwise ridge with the penalty of
:func:`metarep.core.theory.ridge_penalty`.

The ``theory`` column holds closed forms where known: for the method,
:func:`metarep.core.theory.adapted_risk` of ``(B, w)`` (0 or 1 head step, any ``B`` and ``w``); for
the baselines, :func:`metarep.core.theory.baseline_risk` (least squares, or noiseless
interpolation).

The representation methods and the oracle only see ``X`` through ``X B`` and ``X B_star``, so
they are simulated exactly in an orthonormal basis ``Q = [B_star, Q_B]`` of span(B_star, B): the
projected inputs ``X Q`` are i.i.d. standard normal whatever ``d`` is. Regression needs the full
``X`` and is simulated in d dimensions, in chunks.

Any other model (a ReLU network trained by the torch engine) is evaluated through numpy
predictors (:func:`evaluate_predictors`) on fresh tasks in d dimensions: its excess risk
``E_x (f(x) - x^T B_star w_star)^2`` is estimated with fresh test inputs, next to the same
oracle and regression rows.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

import numpy as np

from metarep.core.methods.gradients import adapt_head
from metarep.core.model import LinearParams
from metarep.core.problem import Problem, outside_span
from metarep.core.seeding import Purpose, seed_sequence
from metarep.core.tasks import sample_heads
from metarep.core.theory import adapted_risk, baseline_risk, ridge_penalty, uses_least_squares


def features_row(method: str) -> str:
    """The name of the row that fits the head by least squares on ``method``'s learned
    features (for methods without a meta-learned head: ``mtl`` -> ``mtl-lsq``)."""
    return f"{method}-lsq"


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
    """Orthonormal ``Q = [B_star, Q_B]`` (d, r) spanning span(B_star) + span(B), r <= k + k'.

    ``Q_B`` spans the part of ``B`` outside span(B_star), ``(I - B_star B_star^T) B``, down to
    singular values of ``1e-10 ||B||_2`` (below that it is rounding error, whose directions
    are arbitrary); it is projected off ``B_star`` once more so that ``Q^T Q = I`` holds to
    rounding even when ``B`` lies (almost) inside span(B_star).
    """
    U, s, _ = np.linalg.svd(outside_span(B, B_star), full_matrices=False)
    scale = np.linalg.norm(B, 2) if B.size else 0.0
    U = U[:, : int(np.sum(s > 1e-10 * scale))]
    Q_B, _ = np.linalg.qr(outside_span(U, B_star))
    return np.concatenate([B_star, Q_B], axis=1)


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
    return ridge_penalty(dim, problem)


def _reduced_tasks(
    B: np.ndarray, problem: Problem, m: int, n_tasks: int, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Fresh tasks in the coordinates of ``Q = [B_star, Q_B]`` (:func:`representation_basis`).

    **Returns:** ``B_r = Q^T B`` (r, k'); heads ``w_star`` (n_tasks, k); ``Z = X Q``
    (n_tasks, m, r), i.i.d. standard normal; labels ``y = Z[:, :, :k] w_star + eps``
    (n_tasks, m). Drawn from ``rng`` in the order heads, ``Z``, noise.
    """
    Q = representation_basis(B.astype(np.float64), problem.B_star)
    B_r = Q.T @ B.astype(np.float64)
    heads = sample_heads(problem, n_tasks, rng)
    Z = rng.standard_normal((n_tasks, m, Q.shape[1]))  # X Q
    y = Z[..., : problem.k] @ heads[..., None]
    y = y[..., 0] + rng.standard_normal((n_tasks, m)) * np.sqrt(problem.noise_var)
    return B_r, heads, Z, y


def _reduced_risk(fitted: np.ndarray, B_r: np.ndarray, heads: np.ndarray) -> np.ndarray:
    """``||B w' - B_star w_star||^2`` per task from heads ``w'`` (n, k') in reduced coordinates,
    where ``B_star`` is ``[I_k; 0]``. **Returns:** (n,)."""
    truth = np.zeros((heads.shape[0], B_r.shape[0]))
    truth[:, : heads.shape[1]] = heads
    return np.sum((fitted @ B_r.T - truth) ** 2, axis=1)


def feature_least_squares_risks(
    B: np.ndarray, problem: Problem, m: int, n_tasks: int, rng: np.random.Generator
) -> np.ndarray:
    """Excess risks (n_tasks,) of least squares on the learned features ``X B`` (k' of them):
    ``w' = argmin ||X B w - y||^2 + lambda ||w||^2`` with ``lambda`` from
    :func:`baseline_penalty` in ``k'`` dimensions, risk ``||B w' - B_star w_star||^2``."""
    B_r, heads, Z, y = _reduced_tasks(B, problem, m, n_tasks, rng)
    fitted = fit_least_squares(Z @ B_r, y, baseline_penalty(m, B.shape[1], problem))
    return _reduced_risk(fitted, B_r, heads)


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
    B_r, heads, Z, y = _reduced_tasks(params.B, problem, m, n_tasks, rng)
    k, w = problem.k, params.w.astype(np.float64)
    adapted = (adapt_head(B_r, w, Z, y, alpha, adapt_steps) if adapt_steps
               else np.broadcast_to(w, (n_tasks, w.shape[0])))
    method_risk = _reduced_risk(adapted, B_r, heads)
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
    features_row: str | None = None,
) -> list[EvalRow]:
    """Mean test excess risk with its standard error, for each ``m_test`` in ``shots``:
    the method after ``adapt_steps`` head steps from ``params.w``, the oracle and plain
    regression; with ``features_row``, also a row of that name for least squares on the
    learned features (:func:`feature_least_squares_risks`, on its own fresh tasks)."""
    rows = []
    children = seed_sequence(seed, Purpose.EVAL).spawn(len(shots))
    width = problem.k + params.B.shape[1]
    for m, child in zip(shots, children, strict=True):
        represent_rng, regression_rng, features_rng = (
            np.random.default_rng(s) for s in child.spawn(3))
        chunk = max(2, CHUNK_ENTRIES // (m * width))
        pieces = [
            adapted_and_oracle_risks(params, problem, m, min(chunk, n_tasks - start), alpha,
                                     adapt_steps, represent_rng)
            for start in range(0, n_tasks, chunk)
        ]
        method_risk = np.concatenate([piece[0] for piece in pieces])
        oracle_risk = np.concatenate([piece[1] for piece in pieces])
        rows.append(_summary(method, m, method_risk, adapted_risk(
            params.astype(np.float64), problem, m, alpha, adapt_steps)))
        if features_row is not None:
            rows.append(_summary(features_row, m, np.concatenate([
                feature_least_squares_risks(params.B, problem, m, min(chunk, n_tasks - start),
                                            features_rng)
                for start in range(0, n_tasks, chunk)])))
        rows.append(_summary("oracle", m, oracle_risk,
                             baseline_risk(m, problem.k, problem)))
        rows.append(_summary("regression", m, regression_risks(problem, m, n_tasks, regression_rng),
                             baseline_risk(m, problem.d, problem)))
    return rows


TEST_INPUTS = 100  # fresh inputs per task estimating E_x of a nonlinear model's excess risk

Predictor = Callable[[np.ndarray, np.ndarray, np.ndarray], np.ndarray]
"""``(X (n, m, d), y (n, m), X_test (n, m', d)) -> (n, m')``: the model adapted to each task's
``(X, y)``, evaluated at that task's ``X_test``."""


def feature_least_squares_predictor(
    features: Callable[[np.ndarray], np.ndarray], problem: Problem
) -> Predictor:
    """Least squares on learned features ``phi`` (``features``: (n, m, d) -> (n, m, k')):
    ``w' = argmin ||phi(X) w - y||^2 + lambda ||w||^2`` (``lambda`` from :func:`baseline_penalty`
    in k' dimensions), predicting ``phi(X_test) w'``. Where ``lambda = 0`` the minimum-norm
    least squares solution (pseudo-inverse) is used: ReLU features can be rank deficient (units
    that are zero on every input)."""

    def predict(X: np.ndarray, y: np.ndarray, X_test: np.ndarray) -> np.ndarray:
        F = features(X)
        penalty = baseline_penalty(X.shape[1], F.shape[2], problem)
        fitted = (fit_least_squares(F, y, penalty) if penalty > 0
                  else (np.linalg.pinv(F) @ y[..., None])[..., 0])
        return np.einsum("nmk,nk->nm", features(X_test), fitted)

    return predict


def predictor_and_oracle_risks(
    predictors: Mapping[str, Predictor], problem: Problem, m: int, n_tasks: int,
    rng: np.random.Generator,
) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Excess risks (n_tasks,) of each predictor and of the oracle on the same fresh tasks.

    A predictor's excess risk on task ``w_star`` is ``E_x (f(x) - x^T B_star w_star)^2``,
    estimated with ``TEST_INPUTS`` fresh inputs ``x ~ N(0, I_d)`` (unbiased; for a linear ``f``
    its mean is :func:`adapted_and_oracle_risks`' exact ``||B w' - B_star w_star||^2``).
    """
    heads = sample_heads(problem, n_tasks, rng)
    beta = heads @ problem.B_star.T
    X = rng.standard_normal((n_tasks, m, problem.d))
    y = np.einsum("nmd,nd->nm", X, beta) + rng.standard_normal((n_tasks, m)) * np.sqrt(
        problem.noise_var)
    X_test = rng.standard_normal((n_tasks, TEST_INPUTS, problem.d))
    truth = np.einsum("nmd,nd->nm", X_test, beta)
    risks = {name: np.mean((predict(X, y, X_test) - truth) ** 2, axis=1)
             for name, predict in predictors.items()}
    oracle_heads = fit_least_squares(X @ problem.B_star, y, baseline_penalty(m, problem.k, problem))
    return risks, np.sum((oracle_heads - heads) ** 2, axis=1)


def evaluate_predictors(
    predictors: Mapping[str, Predictor],
    problem: Problem,
    shots: tuple[int, ...],
    n_tasks: int,
    seed: int,
) -> list[EvalRow]:
    """:func:`evaluate` for any model given as predictors (e.g. a ReLU network adapted by the
    torch engine): per ``m_test`` in ``shots``, one row per predictor (all on the same fresh
    tasks), then the oracle and plain regression rows of :func:`evaluate`."""
    rows = []
    children = seed_sequence(seed, Purpose.EVAL).spawn(len(shots))
    for m, child in zip(shots, children, strict=True):
        tasks_rng, regression_rng = (np.random.default_rng(s) for s in child.spawn(2))
        chunk = max(2, CHUNK_ENTRIES // ((m + TEST_INPUTS) * problem.d))
        pieces = [predictor_and_oracle_risks(predictors, problem, m,
                                             min(chunk, n_tasks - start), tasks_rng)
                  for start in range(0, n_tasks, chunk)]
        for name in predictors:
            rows.append(_summary(name, m, np.concatenate([piece[0][name] for piece in pieces])))
        rows.append(_summary("oracle", m, np.concatenate([piece[1] for piece in pieces]),
                             baseline_risk(m, problem.k, problem)))
        rows.append(_summary("regression", m, regression_risks(problem, m, n_tasks, regression_rng),
                             baseline_risk(m, problem.d, problem)))
    return rows
