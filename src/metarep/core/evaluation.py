"""Test-time evaluation on fresh tasks: adapt the head, measure the excess risk.

For a fresh task with head ``w_star`` and ``m`` test samples ``(X, y)``, a method adapts its
head from the learned ``w`` with ``s`` gradient steps of size ``alpha``
(``w' = w - alpha B^T X^T (X B w - y) / m``, repeated) and suffers the excess risk
``||B w' - B_star w_star||^2`` (x is isotropic, so this is the risk above the noise).
Multi-task learning (``mtl``) has no learned shared head: it adapts from ``w = 0`` and adds a
row fitting the head by least squares on the learned features ``X B``
(:func:`feature_least_squares_risks`).

Reference rows (:data:`REFERENCE_ROWS`), each from the same ``m`` test samples:

- ``bayes-oracle``: knows ``B_star``, ``Sigma_star`` and ``sigma^2``, and takes the posterior
  mean of ``w_star`` (:func:`posterior_mean`): the lowest risk any estimator can reach with
  ``m`` samples, hence a lower reference for every method, monotone in ``m``;
- ``ridge``: ignores any representation, ridge in d dimensions with the prior-optimal
  isotropic penalty :func:`metarep.core.theory.ridge_penalty` at every ``m`` (``sigma^2 = 0``:
  minimum-norm interpolation, then least squares);
- ``oracle-lsq`` (least squares on ``X B_star``, k dimensions) and ``regression-lsq`` (least
  squares in d dimensions): only where their expected risk is finite (``m >= dim + 2``), with
  standard error ``nan`` where the variance of the risk is infinite (``m = dim + 2, dim + 3``:
  :func:`metarep.core.theory.least_squares_has_finite_variance`).

The ``theory`` column holds closed forms where known: for the method,
:func:`metarep.core.theory.adapted_risk` of ``(B, w)`` (0 or 1 head step, any ``B`` and ``w``); for
the references, :func:`metarep.core.theory.bayes_oracle_risk`,
:func:`metarep.core.theory.ridge_risk` and :func:`metarep.core.theory.least_squares_risk`.

The representation methods and the oracle rows only see ``X`` through ``X B`` and
``X B_star``, so they are simulated exactly, on the same tasks (common random numbers), in an
orthonormal basis ``Q = [B_star, Q_B]`` of span(B_star, B): the projected inputs ``X Q`` are
i.i.d. standard normal whatever ``d`` is. ``ridge`` and ``regression-lsq`` see all of ``X``; their
risks are sampled exactly from the bidiagonal form of a Gaussian matrix and a uniformly random
direction of ``beta`` (:func:`ridge_risks`), in O(min(m, d)) per task, on their own tasks, so
the whole evaluation of a linear model costs nothing that grows with ``d``.

Any other model (a ReLU network trained by the torch engine) is evaluated through numpy
predictors (:func:`evaluate_predictors`) on fresh tasks in d dimensions: its excess risk
``E_x (f(x) - x^T B_star w_star)^2`` is estimated with fresh test inputs, next to the same
reference rows (the oracle rows on the predictors' tasks).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from metarep.core.methods.gradients import adapt_head
from metarep.core.model import LinearParams
from metarep.core.problem import Problem, outside_span
from metarep.core.seeding import Purpose, seed_sequence
from metarep.core.tasks import sample_heads
from metarep.core.theory import (
    adapted_risk,
    bayes_oracle_risk,
    least_squares_has_finite_risk,
    least_squares_has_finite_variance,
    least_squares_risk,
    ridge_penalty,
    ridge_risk,
)


def features_row(method: str) -> str:
    """The name of the row that fits the head by least squares on ``method``'s learned
    features (for methods without a meta-learned head: ``mtl`` -> ``mtl-lsq``)."""
    return f"{method}-lsq"


BAYES_ORACLE = "bayes-oracle"  # posterior mean knowing B_star, Sigma_star, sigma^2
ORACLE_LSQ = "oracle-lsq"  # least squares on X B_star (k dims), m >= k + 2
RIDGE = "ridge"  # ridge in d dims, lambda = sigma^2 d / tr(Sigma_star), every m
REGRESSION_LSQ = "regression-lsq"  # least squares in d dims, m >= d + 2
REFERENCE_ROWS = (BAYES_ORACLE, ORACLE_LSQ, RIDGE, REGRESSION_LSQ)
"""The reference rows, in the order :func:`evaluate` writes them after the method's rows."""

CHUNK_ENTRIES = 4_000_000


@dataclass(frozen=True)
class EvalRow:
    """One line of ``eval.csv``: mean excess risk over ``n_tasks`` fresh tasks, its standard
    error (``nan`` where the risk has infinite variance) and its closed form (``nan`` where none
    is known)."""

    method: str
    shots: int
    excess_risk: float
    stderr: float
    n_tasks: int
    theory: float = float("nan")


def _summary(method: str, shots: int, risks: np.ndarray, theory: float = np.nan,
             finite_variance: bool = True) -> EvalRow:
    n = risks.shape[0]
    # math.nan, one object, so that rows compare equal (dataclass == compares by identity first)
    stderr = float(risks.std(ddof=1) / np.sqrt(n)) if finite_variance else math.nan
    return EvalRow(method, shots, float(risks.mean()), stderr, n, theory)


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


def posterior_mean(Z: np.ndarray, y: np.ndarray, problem: Problem) -> np.ndarray:
    """Batched posterior mean of ``w_star ~ N(0, Sigma_star)`` given ``y = Z w_star + eps``,
    ``eps ~ N(0, sigma^2 I_m)``, for ``Z = X B_star`` (n, m, k), ``y`` (n, m):

    ``w_hat = (Z^T Z + sigma^2 Sigma_star^{-1})^{-1} Z^T y
    = Sigma_star Z^T (Z Sigma_star Z^T + sigma^2 I_m)^{-1} y``.

    Computed in whitened coordinates ``w = L v`` (``Sigma_star = L L^T``, ``v ~ N(0, I_k)``):
    ``w_hat = L fit_least_squares(Z L, y, sigma^2)``, which is the primal form for ``m > k`` and
    the dual form above for ``m <= k``. ``sigma^2 = 0`` works: for ``m <= k`` it is the
    interpolator of minimum ``||v|| = ||w||_{Sigma_star^{-1}}``, for ``m > k`` least squares.
    **Returns:** (n, k).
    """
    L = np.linalg.cholesky(problem.Sigma_star)
    return fit_least_squares(Z @ L, y, problem.noise_var) @ L.T


def features_variance_finite(m: int, width: int, problem: Problem) -> bool:
    """Whether the risk of least squares on ``width`` learned features has a finite variance,
    so that its standard error is an error bar: :func:`~metarep.core.theory.
    least_squares_has_finite_variance` in ``width`` dimensions where least squares is used
    (``m >= width + 2``; below, the ridge of :func:`features_penalty` has a finite variance).
    The rule is exact for linear features ``X B`` (Gaussian rows); for ReLU features, whose
    design can be singular with positive probability, it is the least that holds."""
    if not least_squares_has_finite_risk(m, width):
        return True
    return least_squares_has_finite_variance(m, width, problem.noise_var)


def features_penalty(m: int, width: int, problem: Problem) -> float:
    """The penalty of least squares on ``width`` learned features (``mtl-lsq``): 0 where least
    squares has a finite expected risk (``m >= width + 2``), else
    :func:`metarep.core.theory.ridge_penalty` in ``width`` dimensions."""
    if least_squares_has_finite_risk(m, width):
        return 0.0
    return ridge_penalty(width, problem)


def oracle_risks(Z_star: np.ndarray, y: np.ndarray, heads: np.ndarray,
                 problem: Problem) -> dict[str, np.ndarray]:
    """Risks ``||w_hat - w_star||^2`` (n,) of the oracle rows from ``Z_star = X B_star``
    (n, m, k) and ``y`` (n, m): ``bayes-oracle`` (:func:`posterior_mean`), and ``oracle-lsq``
    (least squares) where ``m >= k + 2``."""
    m, k = y.shape[1], problem.k
    risks = {BAYES_ORACLE: np.sum((posterior_mean(Z_star, y, problem) - heads) ** 2, axis=1)}
    if least_squares_has_finite_risk(m, k):
        risks[ORACLE_LSQ] = np.sum((fit_least_squares(Z_star, y, 0.0) - heads) ** 2, axis=1)
    return risks


def reduced_body(B: np.ndarray, B_star: np.ndarray) -> np.ndarray:
    """``B_r = Q^T B`` (r, k'): ``B`` in the coordinates of ``Q = [B_star, Q_B]``
    (:func:`representation_basis`), where ``B_star`` is ``[I_k; 0]``. The only d-sized work of
    the evaluation of a linear model, done once per evaluation."""
    B = B.astype(np.float64)
    return representation_basis(B, B_star).T @ B


def _reduced_tasks(
    B_r: np.ndarray, problem: Problem, m: int, n_tasks: int, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Fresh tasks in the coordinates of ``Q`` (:func:`reduced_body`, ``B_r`` (r, k')).

    **Returns:** heads ``w_star`` (n_tasks, k); ``Z = X Q`` (n_tasks, m, r), i.i.d. standard
    normal; labels ``y = Z[:, :, :k] w_star + eps`` (n_tasks, m). Drawn from ``rng`` in the
    order heads, ``Z``, noise.
    """
    heads = sample_heads(problem, n_tasks, rng)
    Z = rng.standard_normal((n_tasks, m, B_r.shape[0]))  # X Q
    y = Z[..., : problem.k] @ heads[..., None]
    y = y[..., 0] + rng.standard_normal((n_tasks, m)) * np.sqrt(problem.noise_var)
    return heads, Z, y


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
    :func:`features_penalty` in ``k'`` dimensions, risk ``||B w' - B_star w_star||^2``."""
    return _feature_least_squares(reduced_body(B, problem.B_star), problem, m, n_tasks, rng)


def _feature_least_squares(B_r: np.ndarray, problem: Problem, m: int, n_tasks: int,
                           rng: np.random.Generator) -> np.ndarray:
    """:func:`feature_least_squares_risks` from the reduced body ``B_r``."""
    return _feature_least_squares_on(B_r, problem, m, _reduced_tasks(B_r, problem, m, n_tasks,
                                                                     rng))


def _feature_least_squares_on(B_r: np.ndarray, problem: Problem, m: int,
                              tasks: tuple[np.ndarray, np.ndarray, np.ndarray]) -> np.ndarray:
    """:func:`_feature_least_squares` on the drawn ``tasks`` (:func:`_reduced_tasks`)."""
    heads, Z, y = tasks
    fitted = fit_least_squares(Z @ B_r, y, features_penalty(m, B_r.shape[1], problem))
    return _reduced_risk(fitted, B_r, heads)


def adapted_and_oracle_risks(
    params: LinearParams,
    problem: Problem,
    m: int,
    n_tasks: int,
    alpha: float,
    adapt_steps: int,
    rng: np.random.Generator,
) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Excess risks (n_tasks,) after ``adapt_steps`` head steps, and of the oracle rows
    (:func:`oracle_risks`: ``bayes-oracle``, and ``oracle-lsq`` where ``m >= k + 2``), on the
    same fresh tasks (common random numbers)."""
    reduced = LinearParams(reduced_body(params.B, problem.B_star), params.w)
    return _adapted_and_oracle(reduced, problem, m, n_tasks, alpha, adapt_steps, rng)


def _adapted_and_oracle(reduced: LinearParams, problem: Problem, m: int, n_tasks: int,
                        alpha: float, adapt_steps: int,
                        rng: np.random.Generator) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """:func:`adapted_and_oracle_risks` from ``(B_r, w)`` (:func:`reduced_body`)."""
    B_r, w = reduced.B, reduced.w.astype(np.float64)
    heads, Z, y = _reduced_tasks(B_r, problem, m, n_tasks, rng)
    method_risk = _reduced_risk(adapt_head(B_r, w, Z, y, alpha, adapt_steps), B_r, heads)
    return method_risk, oracle_risks(Z[..., : problem.k], y, heads, problem)


def wishart_tridiagonal(n: int, m: int, d: int,
                        rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``n`` draws of a ``p x p`` matrix ``T = L^T L``, ``p = min(m, d)``, whose eigenvalues
    have the law of the nonzero eigenvalues of ``X^T X`` for ``X`` (m, d) with i.i.d.
    ``N(0, 1)`` entries (Dumitriu and Edelman, 2002): ``L`` is lower bidiagonal with
    independent ``L_ii = chi_{q - i}`` and ``L_{i+1, i} = chi_{p - 1 - i}`` (``q = max(m, d)``,
    ``i`` from 0), the bidiagonal form of ``X``.

    **Returns:** ``L``'s diagonal (n, p) and subdiagonal (n, p - 1), and ``T``'s
    superdiagonal ``L_{i+1,i} L_{i+1,i+1}`` (n, p - 1); ``T``'s diagonal is
    ``L_ii^2 + L_{i+1,i}^2`` (:func:`_solve_tridiagonal` forms it). O(p) draws per task.
    """
    p, q = min(m, d), max(m, d)
    diagonal = np.sqrt(rng.chisquare(q - np.arange(p), size=(n, p)))
    below = np.sqrt(rng.chisquare(p - 1 - np.arange(p - 1), size=(n, p - 1)))
    return diagonal, below, below * diagonal[:, 1:]


def _solve_tridiagonal(diagonal: np.ndarray, off: np.ndarray, rhs: np.ndarray) -> np.ndarray:
    """Batched solve of the symmetric positive definite tridiagonal systems with ``diagonal``
    (n, p), off-diagonal ``off`` (n, p - 1) and right-hand sides ``rhs`` (n, p), by the
    Cholesky (Thomas) recursion, vectorised over the n systems (no pivoting is needed for a
    positive definite matrix). **Returns:** (n, p)."""
    p = diagonal.shape[1]
    pivots, forward = np.empty_like(diagonal), np.empty_like(rhs)
    pivots[:, 0], forward[:, 0] = diagonal[:, 0], rhs[:, 0]
    for i in range(1, p):
        ratio = off[:, i - 1] / pivots[:, i - 1]
        pivots[:, i] = diagonal[:, i] - ratio * off[:, i - 1]
        forward[:, i] = rhs[:, i] - ratio * forward[:, i - 1]
    solution = np.empty_like(rhs)
    solution[:, p - 1] = forward[:, p - 1] / pivots[:, p - 1]
    for i in range(p - 2, -1, -1):
        solution[:, i] = (forward[:, i] - off[:, i] * solution[:, i + 1]) / pivots[:, i]
    return solution


def ridge_risks(problem: Problem, m: int, penalties: Sequence[float], n_tasks: int,
                rng: np.random.Generator) -> np.ndarray:
    """Excess risks ``||beta_hat - beta||^2`` (len(penalties), n_tasks) of ridge in d
    dimensions, ``beta_hat = argmin ||X beta - y||^2 + lambda ||beta||^2`` for each ``lambda``
    in ``penalties`` (0: least squares, or the minimum-norm interpolator for ``m <= d``), on the
    same fresh tasks ``beta = B_star w_star``, ``y = X beta + eps``: sampled exactly in
    O(min(m, d)) per task, whatever ``d`` is.

    The law of the risk is rotation invariant: in a basis where ``X^T X`` restricted to the
    row space of ``X`` is ``T = L^T L`` (:func:`wishart_tridiagonal`, p = min(m, d)), ``beta``
    has coordinates ``c = ||w_star|| u_{1:p}`` for a uniform unit vector ``u`` of R^d (drawn as
    ``z_{1:p} / sqrt(||z_{1:p}||^2 + chi^2_{d-p})``, ``z ~ N(0, I_p)``) and ``X^T eps`` is
    ``sigma L^T g``, ``g ~ N(0, I_p)``, independent of ``T``. The error inside the row space
    is ``(T + lambda I)^{-1} (sigma L^T g - lambda c)``; outside it the fit is 0, an error
    of ``||w_star||^2 - ||c||^2``. Tested against the direct simulation in d dimensions,
    :func:`metarep.core.reference.ridge_risks`.
    """
    p = min(m, problem.d)
    heads = sample_heads(problem, n_tasks, rng)
    diagonal, below, upper = wishart_tridiagonal(n_tasks, m, problem.d, rng)
    z = rng.standard_normal((n_tasks, p))
    rest = rng.chisquare(problem.d - p, size=n_tasks) if problem.d > p else 0.0
    g = rng.standard_normal((n_tasks, p))
    energy, inside = np.sum(heads**2, axis=1), np.sum(z**2, axis=1)
    c = z * np.sqrt(energy / (inside + rest))[:, None]
    noise = diagonal * g
    noise[:, :-1] += below * g[:, 1:]  # L^T g: L^T is upper bidiagonal
    squares = diagonal**2
    squares[:, :-1] += below**2  # T's diagonal
    outside = energy * (1.0 - inside / (inside + rest))
    sigma = np.sqrt(problem.noise_var)
    return np.stack([
        np.sum(_solve_tridiagonal(squares + penalty, upper, sigma * noise - penalty * c) ** 2,
               axis=1) + outside
        for penalty in penalties])


def regression_risks(
    problem: Problem, m: int, n_tasks: int, rng: np.random.Generator
) -> dict[str, np.ndarray]:
    """Excess risks ``||beta_hat - beta||^2`` of the d-dimensional rows on the same fresh tasks
    (:func:`ridge_risks`, O(min(m, d)) per task): ``ridge`` (penalty
    :func:`metarep.core.theory.ridge_penalty` in d dimensions, every ``m``), and
    ``regression-lsq`` (least squares) where ``m >= d + 2``."""
    d = problem.d
    names = [RIDGE, *([REGRESSION_LSQ] if least_squares_has_finite_risk(m, d) else [])]
    penalties = [ridge_penalty(d, problem), 0.0][: len(names)]
    return dict(zip(names, ridge_risks(problem, m, penalties, n_tasks, rng), strict=True))


def _concatenate(pieces: Sequence[Mapping[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """Per-name concatenation of chunked risks (every piece has the same names)."""
    return {name: np.concatenate([piece[name] for piece in pieces]) for name in pieces[0]}


def reference_rows(m: int, problem: Problem, oracle: Mapping[str, np.ndarray],
                   regression: Mapping[str, np.ndarray]) -> list[EvalRow]:
    """The reference rows at ``m_test = m`` from the risks of :func:`oracle_risks` and
    :func:`regression_risks`, in the order of :data:`REFERENCE_ROWS`, with their closed forms;
    the least-squares rows with ``stderr = nan`` where their variance is infinite."""
    noise_var = problem.noise_var
    rows = [_summary(BAYES_ORACLE, m, oracle[BAYES_ORACLE], bayes_oracle_risk(m, problem))]
    if ORACLE_LSQ in oracle:
        rows.append(_summary(ORACLE_LSQ, m, oracle[ORACLE_LSQ],
                             least_squares_risk(m, problem.k, noise_var),
                             least_squares_has_finite_variance(m, problem.k, noise_var)))
    rows.append(_summary(RIDGE, m, regression[RIDGE], ridge_risk(m, problem)))
    if REGRESSION_LSQ in regression:
        rows.append(_summary(REGRESSION_LSQ, m, regression[REGRESSION_LSQ],
                             least_squares_risk(m, problem.d, noise_var),
                             least_squares_has_finite_variance(m, problem.d, noise_var)))
    return rows


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
    the method after ``adapt_steps`` head steps from ``params.w``; with ``features_row``, a row
    of that name for least squares on the learned features (:func:`feature_least_squares_risks`,
    on its own fresh tasks); then the reference rows (:func:`reference_rows`): the oracle rows on
    the method's tasks, ``ridge`` and ``regression-lsq`` on their own."""
    return evaluate_many([(params, alpha)], problem, method, shots, n_tasks, adapt_steps, seed,
                         features_row)[0]


def evaluate_many(
    models: Sequence[tuple[LinearParams, float]],
    problem: Problem,
    method: str,
    shots: tuple[int, ...],
    n_tasks: int,
    adapt_steps: int,
    seed: int,
    features_row: str | None = None,
) -> list[list[EvalRow]]:
    """:func:`evaluate` of each of ``models`` (``(params, alpha)`` each, of one width k'), on
    one draw of the test tasks: the rows of each are those :func:`evaluate` gives it alone,
    number for number.

    The test tasks of :func:`evaluate` depend on the model only through ``r``, the dimension
    of span(B_star, B) (:func:`representation_basis`): the models of equal ``r`` are evaluated
    on the tasks drawn once (their oracle rows computed once), and the d-dimensional rows
    (:func:`regression_risks`), which do not depend on the model, are drawn once for all; each
    model then adapts its own head on those tasks."""
    if not models:
        return []
    reduced = [LinearParams(reduced_body(params.B, problem.B_star), params.w)
               for params, _ in models]
    if len({params.B.shape[1] for params, _ in models}) > 1:
        raise ValueError("evaluate_many: the models must have one width k'")
    by_rank: dict[int, list[int]] = {}
    for i, body in enumerate(reduced):
        by_rank.setdefault(body.B.shape[0], []).append(i)
    results: list[list[EvalRow]] = [[] for _ in models]
    children = seed_sequence(seed, Purpose.EVAL).spawn(len(shots))
    width = problem.k + models[0][0].B.shape[1]
    for m, child in zip(shots, children, strict=True):
        represent_seed, regression_seed, features_seed = child.spawn(3)
        chunk = max(2, CHUNK_ENTRIES // (m * width))
        starts = range(0, n_tasks, chunk)
        regression = regression_risks(problem, m, n_tasks, np.random.default_rng(regression_seed))
        for members in by_rank.values():
            represent_rng = np.random.default_rng(represent_seed)
            method_pieces: list[list[np.ndarray]] = [[] for _ in members]
            oracle_pieces = []
            for start in starts:
                B_r = reduced[members[0]].B
                heads, Z, y = _reduced_tasks(B_r, problem, m, min(chunk, n_tasks - start),
                                             represent_rng)
                for pieces, i in zip(method_pieces, members, strict=True):
                    body, w = reduced[i].B, reduced[i].w.astype(np.float64)
                    pieces.append(_reduced_risk(adapt_head(body, w, Z, y, models[i][1],
                                                           adapt_steps), body, heads))
                oracle_pieces.append(oracle_risks(Z[..., : problem.k], y, heads, problem))
            features = None
            if features_row is not None:
                features_rng = np.random.default_rng(features_seed)
                features = [_reduced_tasks(reduced[members[0]].B, problem, m,
                                           min(chunk, n_tasks - start), features_rng)
                            for start in starts]
            references = reference_rows(m, problem, _concatenate(oracle_pieces), regression)
            for pieces, i in zip(method_pieces, members, strict=True):
                params, alpha = models[i]
                rows = results[i]
                rows.append(_summary(method, m, np.concatenate(pieces), adapted_risk(
                    params.astype(np.float64), problem, m, alpha, adapt_steps)))
                if features_row is not None and features is not None:
                    rows.append(_summary(features_row, m, np.concatenate([
                        _feature_least_squares_on(reduced[i].B, problem, m, tasks)
                        for tasks in features]), finite_variance=features_variance_finite(
                            m, params.B.shape[1], problem)))
                rows += references
    return results


TEST_INPUTS = 100  # fresh inputs per task estimating E_x of a nonlinear model's excess risk

Predictor = Callable[[np.ndarray, np.ndarray, np.ndarray], np.ndarray]
"""``(X (n, m, d), y (n, m), X_test (n, m', d)) -> (n, m')``: the model adapted to each task's
``(X, y)``, evaluated at that task's ``X_test``."""


def feature_least_squares_predictor(
    features: Callable[[np.ndarray], np.ndarray], problem: Problem
) -> Predictor:
    """Least squares on learned features ``phi`` (``features``: (n, m, d) -> (n, m, k')):
    ``w' = argmin ||phi(X) w - y||^2 + lambda ||w||^2`` (``lambda`` from :func:`features_penalty`
    in k' dimensions), predicting ``phi(X_test) w'``. Where ``lambda = 0`` the minimum-norm
    least squares solution (pseudo-inverse) is used: ReLU features can be rank deficient (units
    that are zero on every input)."""

    def predict(X: np.ndarray, y: np.ndarray, X_test: np.ndarray) -> np.ndarray:
        F = features(X)
        penalty = features_penalty(X.shape[1], F.shape[2], problem)
        fitted = (fit_least_squares(F, y, penalty) if penalty > 0
                  else (np.linalg.pinv(F) @ y[..., None])[..., 0])
        return np.einsum("nmk,nk->nm", features(X_test), fitted)

    return predict


def predictor_and_oracle_risks(
    predictors: Mapping[str, Predictor], problem: Problem, m: int, n_tasks: int,
    rng: np.random.Generator,
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Excess risks (n_tasks,) of each predictor and of the oracle rows
    (:func:`oracle_risks`) on the same fresh tasks.

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
    return risks, oracle_risks(X @ problem.B_star, y, heads, problem)


def evaluate_predictors(
    predictors: Mapping[str, Predictor],
    problem: Problem,
    shots: tuple[int, ...],
    n_tasks: int,
    seed: int,
    least_squares_widths: Mapping[str, int] | None = None,
) -> list[EvalRow]:
    """:func:`evaluate` for any model given as predictors (e.g. a ReLU network adapted by the
    torch engine): per ``m_test`` in ``shots``, one row per predictor (all on the same fresh
    tasks), then the reference rows of :func:`evaluate` (the oracle rows on those tasks).
    ``least_squares_widths`` names the predictors that fit least squares on that many learned
    features: their standard error is ``nan`` where :func:`features_variance_finite` says its
    variance is infinite."""
    least_squares_widths = least_squares_widths or {}
    rows = []
    children = seed_sequence(seed, Purpose.EVAL).spawn(len(shots))
    for m, child in zip(shots, children, strict=True):
        tasks_rng, regression_rng = (np.random.default_rng(s) for s in child.spawn(2))
        chunk = max(2, CHUNK_ENTRIES // ((m + TEST_INPUTS) * problem.d))
        pieces = [predictor_and_oracle_risks(predictors, problem, m,
                                             min(chunk, n_tasks - start), tasks_rng)
                  for start in range(0, n_tasks, chunk)]
        for name in predictors:
            finite = (name not in least_squares_widths
                      or features_variance_finite(m, least_squares_widths[name], problem))
            rows.append(_summary(name, m, np.concatenate([piece[0][name] for piece in pieces]),
                                 finite_variance=finite))
        rows += reference_rows(m, problem, _concatenate([piece[1] for piece in pieces]),
                               regression_risks(problem, m, n_tasks, regression_rng))
    return rows


ZERO = "zero"  # the predictor f = 0: the held-out tasks' label energy


@dataclass(frozen=True)
class HeldOutRow:
    """One line of ``heldout.csv``: the mean squared prediction error (label noise included:
    without the ground truth the excess risk cannot be separated) over ``n_tasks`` held-out
    tasks, and its standard error."""

    method: str
    shots: int
    risk: float
    stderr: float
    n_tasks: int


def held_out_risks(
    params: LinearParams, X: np.ndarray, y: np.ndarray, method: str,
    shots: Sequence[int], alpha: float, adapt_steps: int,
) -> list[HeldOutRow]:
    """Test-time adaptation on held-out tasks without the ground truth, per ``m_test`` in
    ``shots``: each task's first ``m_test`` rows adapt, and the squared error
    ``(f(x) - y)^2`` is averaged over its other rows. Rows: the method (``adapt_steps`` head
    steps of size ``alpha`` from ``params.w``), least squares in d dimensions where its risk is
    finite (``m_test >= d + 2``; no standard error below ``d + 4``, where the risk's variance
    is infinite: :func:`metarep.core.theory.least_squares_has_finite_variance`) and the zero
    predictor. No prior is known, so there is no ridge or Bayes row.
    **Arguments:** ``X`` (N', m', d), ``y`` (N', m') with ``m_test < m'``."""
    B, w = params.B.astype(np.float64), params.w.astype(np.float64)
    d, rows = X.shape[2], []
    for m in shots:
        X_fit, y_fit, X_test, y_test = X[:, :m], y[:, :m], X[:, m:], y[:, m:]
        heads = adapt_head(B, w, X_fit, y_fit, alpha, adapt_steps)  # 0 steps: w itself
        predictions = {method: np.einsum("nmd,nd->nm", X_test, heads @ B.T)}
        if least_squares_has_finite_risk(m, d):
            fitted = fit_least_squares(X_fit, y_fit, 0.0)
            predictions[REGRESSION_LSQ] = np.einsum("nmd,nd->nm", X_test, fitted)
        predictions[ZERO] = np.zeros_like(y_test)
        for name, prediction in predictions.items():
            errors = np.mean((prediction - y_test) ** 2, axis=1)
            stderr = float(errors.std(ddof=1) / math.sqrt(errors.size))
            if name == REGRESSION_LSQ and not least_squares_has_finite_variance(m, d, 1.0):
                stderr = math.nan
            rows.append(HeldOutRow(name, int(m), float(errors.mean()), stderr,
                                   int(errors.size)))
    return rows
