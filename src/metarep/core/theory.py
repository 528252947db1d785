"""Closed-form predictions of the paper (specification §4) and of the test-time reference rows.

Every formula takes the task distribution as a :class:`~metarep.core.problem.Problem`
(``Sigma_star``, ``sigma^2``, and ``B_star`` where the coordinates matter) and the model as
:class:`~metarep.core.model.LinearParams`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from metarep.core.model import LinearParams
from metarep.core.problem import Problem
from metarep.errors import ArgumentError


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
    """Penalty ``lambda = sigma^2 dim / tr(Sigma_star)`` of ridge regression in ``dim``
    dimensions (the ``ridge`` row in ``dim = d``, and the features rule of ``mtl-lsq``).

    It is the prior-optimal isotropic penalty of ``||X beta - y||^2 + lambda ||beta||^2``: the
    posterior mean for a ``dim``-dimensional regressor with i.i.d. ``N(0, tr(Sigma_star)/dim)``
    prior entries (the same signal energy ``E ||B_star w_star||^2 = tr(Sigma_star)``), which
    knows nothing of ``B_star``. ``sigma^2 = 0`` gives ``lambda = 0``: the minimum-norm
    interpolator for ``m <= dim``, least squares for ``m > dim``.
    """
    return problem.noise_var * dim / float(np.trace(problem.Sigma_star))


def least_squares_has_finite_risk(m: int, dim: int) -> bool:
    """Whether least squares in ``dim`` dimensions with ``m`` isotropic Gaussian samples has a
    finite expected risk: ``m >= dim + 2`` (see :func:`least_squares_risk`)."""
    return m >= dim + 2


def least_squares_risk(m: int, dim: int, noise_var: float) -> float:
    """Expected excess risk ``E ||beta_hat - beta||^2 = sigma^2 dim / (m - dim - 1)`` of least
    squares in ``dim`` dimensions with ``m`` isotropic Gaussian samples, ``nan`` where it is
    not finite (``m < dim + 2``).

    ``beta_hat - beta = W^{-1} X^T eps`` with ``W = X^T X ~ Wishart_dim(m, I)``, so the risk
    given ``X`` is ``sigma^2 tr(W^{-1})`` and ``E W^{-1} = I / (m - dim - 1)``, finite iff
    ``m > dim + 1``. It does not depend on ``Sigma_star``.
    """
    if not least_squares_has_finite_risk(m, dim):
        return math.nan
    return noise_var * dim / (m - dim - 1)


def least_squares_has_finite_variance(m: int, dim: int, noise_var: float) -> bool:
    """Whether the least-squares risk ``||beta_hat - beta||^2`` has a finite variance, i.e.
    whether its Monte Carlo standard error is a valid error bar: ``m >= dim + 4`` (or
    ``sigma^2 = 0``, where the risk is 0).

    Why: with ``A = X W^{-2} X^T`` and Gaussian noise,
    ``E[(eps^T A eps)^2 | X] = sigma^4 ((tr A)^2 + 2 tr A^2)
    = sigma^4 ((tr W^{-1})^2 + 2 tr W^{-2})``. The bracket lies between ``lambda_min(W)^{-2}``
    and ``3 dim^2 lambda_min(W)^{-2}``, and the density of ``lambda_min`` of a real
    ``Wishart_dim(m, I)`` behaves as ``lambda^{(m - dim - 1)/2}`` near 0 (the joint eigenvalue
    density has the factor ``prod_i lambda_i^{(m - dim - 1)/2}``), so
    ``E lambda_min^{-2} < inf`` iff ``(m - dim - 1)/2 - 2 > -1``, i.e. ``m >= dim + 4``. This
    agrees with the inverse-Wishart second moments, e.g.
    ``E W^{-2} = (m - 1) I / ((m - dim) (m - dim - 1) (m - dim - 3))``, finite iff
    ``m > dim + 3``. At ``m = dim + 2`` and ``dim + 3`` the mean is finite but the variance
    is not, so a sample standard error is meaningless there.
    """
    return noise_var == 0.0 or m >= dim + 4


def _isotropic_scale(Sigma_star: np.ndarray) -> float | None:
    """``c`` if ``Sigma_star = c I_k`` (to 1e-12 relative), else ``None``."""
    c = float(np.mean(np.diag(Sigma_star)))
    if np.abs(Sigma_star - c * np.eye(Sigma_star.shape[0])).max() <= 1e-12 * abs(c):
        return c
    return None


def bayes_oracle_risk(m: int, problem: Problem) -> float:
    """Closed-form expected excess risk of the Bayes oracle (``bayes-oracle``,
    :func:`metarep.core.evaluation.posterior_mean`) with ``m`` samples, where one is known;
    else ``nan``.

    The oracle knows ``B_star``, ``Sigma_star`` and ``sigma^2``; with ``Z = X B_star`` (m, k)
    its estimate is the posterior mean of ``w_star ~ N(0, Sigma_star)``, and its expected risk
    is the Bayes risk ``E_Z tr(Sigma_post)``, ``Sigma_post = Sigma_star - Sigma_star Z^T (Z
    Sigma_star Z^T + sigma^2 I_m)^{-1} Z Sigma_star`` (the posterior covariance). Known cases:

    - ``sigma^2 = 0``, ``m >= k``: ``Z`` has rank k, the head is recovered exactly: 0;
    - ``sigma^2 = 0``, ``m < k``, ``Sigma_star = c I_k``: ``Sigma_post = c (I - P)`` with ``P``
      the projection onto the row space of ``Z`` (rank m), so the risk is ``c (k - m)`` for
      every ``Z``.

    Otherwise (noise, or an anisotropic ``Sigma_star`` below k samples) the risk is an
    expectation over a Wishart matrix, e.g. ``sigma^2 E tr((Z^T Z + sigma^2/c I)^{-1})`` for
    ``Sigma_star = c I``, with no elementary closed form: ``nan``.
    """
    k = problem.k
    if problem.noise_var != 0.0:
        return math.nan
    if m >= k:
        return 0.0
    c = _isotropic_scale(problem.Sigma_star)
    return math.nan if c is None else c * (k - m)


def ridge_risk(m: int, problem: Problem) -> float:
    """Closed-form expected excess risk of the ``ridge`` row (d dimensions, penalty
    :func:`ridge_penalty`) with ``m`` samples, where one is known; else ``nan``.

    ``sigma^2 = 0`` (minimum-norm interpolation): the fit is the projection of ``beta = B_star
    w_star`` onto the row space of ``X``, a uniformly random m-dimensional subspace independent
    of ``beta``, so the risk is ``(1 - m/d) E ||beta||^2 = tr(Sigma_star) (1 - m/d)`` for
    ``m < d`` and 0 for ``m >= d``. With noise, ``E[R^2]`` for ``R = (X^T X + lambda I)^{-1}`` is
    a multiple of ``I`` (rotation invariance), which with ``lambda = sigma^2 d / tr(Sigma_star)``
    reduces the risk to ``sigma^2 E tr((X^T X + lambda I)^{-1})``, a Wishart expectation with no
    elementary closed form: ``nan``.
    """
    if problem.noise_var != 0.0:
        return math.nan
    return float(np.trace(problem.Sigma_star)) * max(0.0, 1.0 - m / problem.d)


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


UNDRIVEN_RATE = {"fo-anil": 1, "fo-maml": 1, "anil": 2, "maml": 2}
"""The factor ``kappa`` of :func:`undriven_decay` per method (one inner step, ``w = 0``): 1 for
the first-order methods, 2 for ANIL and MAML, whose gradient through the inner step adds the
first-order cubic term once more."""


def undriven_decay(problem: Problem, m_in: float, alpha: float, beta: float,
                   t: np.ndarray | float, method: str = "fo-anil") -> np.ndarray | float:
    """``(2 kappa alpha^2 beta c t)^(-1/2)``, ``c = (tr Sigma_star + sigma^2) / m_in``: the size
    at step ``t`` of a direction of ``B`` outside span(B_star) that the task signal does not
    drive, under the infinite-task dynamics of ``method`` with one inner step and ``w = 0``,
    once it is small; ``kappa`` is :data:`UNDRIVEN_RATE` (``inf`` for ``m_in = inf``: no decay).

    FO-ANIL: the expected step there is ``rho <- rho (1 - beta alpha^2 c rho^2)``
    (docs/infinite_tasks.md), whose solution is ``rho_t ~ (2 alpha^2 beta c t)^(-1/2)`` whatever
    ``rho_0``. ANIL: with ``g = S_in v - e_in`` (``v = -B_star w_star`` at ``w = 0``) the inner
    step is ``w_i = -alpha B^T g``, and differentiating through it adds ``-alpha E[g r^T] B`` to
    the body's gradient, ``r = B w_i - B_star w_star`` the outer residual; outside
    span(B_star), ``E[g g^T] = c I``, so the added part is ``alpha^2 c B_perp^T B B^T B``,
    FO-ANIL's own cubic term again: ``rho <- rho (1 - 2 beta alpha^2 c rho^2)``, ``kappa = 2``.
    From ``w_0 = 0`` the expected head step of every one of these methods is odd in
    ``(w_star, noise)``, so ``w_t = 0``, the body's inner step ``-alpha g w^T`` of FO-MAML and
    MAML vanishes, and their dynamics are those of FO-ANIL and ANIL (``kappa`` 1 and 2)."""
    c = (float(np.trace(problem.Sigma_star)) + problem.noise_var) * _inverse(m_in)
    if method not in UNDRIVEN_RATE:
        raise ArgumentError("method", f"must be one of {', '.join(UNDRIVEN_RATE)}; "
                            f"got {method!r}")
    kappa = UNDRIVEN_RATE[method]
    with np.errstate(divide="ignore"):
        return 1.0 / np.sqrt(2 * kappa * alpha**2 * beta * c * np.asarray(t, dtype=float))


FIXED_POINT_METHODS = ("fo-anil", "anil", "fo-maml", "maml")
"""The methods for which ``Lambda_star`` (with ``w = 0``, ``B_perp^T B = 0``) is a stationary
point of the expected one-inner-step update with infinitely many tasks."""

REGIMES = ("infinite", "pool", "online")


@dataclass(frozen=True)
class Setting:
    """What the theory's statements depend on: the ``method``'s name, the width ``k'``, the
    inner steps ``s``, the test-time head steps, and the ``regime`` of the training tasks
    (``infinite``: exact expectations; ``pool``: a finite pool; ``online``: fresh tasks), and
    whether training starts from the head ``w_0 = 0`` (``zero_head``: FO-MAML's dynamics are
    FO-ANIL's only from there)."""

    method: str
    width: int
    inner_steps: int
    adapt_steps: int
    regime: str
    zero_head: bool = True

    def scope(self, k: int) -> dict[str, object]:
        """The setting as plain data, with ``k`` for the comparison of ``k'`` with it."""
        return {"method": self.method, "width": self.width, "k": k,
                "inner_steps": self.inner_steps, "adapt_steps": self.adapt_steps,
                "regime": self.regime, "zero_head": self.zero_head}

    def is_fo_anil(self) -> bool:
        """Whether the run's dynamics are FO-ANIL's: FO-ANIL, or FO-MAML from ``w_0 = 0``
        with infinitely many tasks (then ``w_t = 0`` and the body's inner step vanishes)."""
        return self.method == "fo-anil" or (self.method == "fo-maml" and self.zero_head
                                            and self.regime == "infinite")


def top_part(Lambda: np.ndarray, rank: int) -> np.ndarray | None:
    """The part of the symmetric ``Lambda`` (k, k) on its ``rank`` largest eigenvalues,
    ``U_r diag(lambda_1 .. lambda_r) U_r^T``, or ``None`` when it is not unique (the r-th and
    (r+1)-th largest eigenvalues tie, to 1e-12 relative); ``Lambda`` itself for ``rank >= k``."""
    k = Lambda.shape[0]
    if rank >= k:
        return Lambda
    values, vectors = np.linalg.eigh((Lambda + Lambda.T) / 2)
    values, vectors = values[::-1], vectors[:, ::-1]
    if values[rank - 1] - values[rank] <= 1e-12 * abs(values[0]):
        return None
    return (vectors[:, :rank] * values[:rank]) @ vectors[:, :rank].T


def gram_target(problem: Problem, m_in: float, alpha: float,
                setting: Setting) -> tuple[np.ndarray | None, str]:
    """The matrix ``B_star^T B B^T B_star`` is measured against (``lambda_err``), and the
    statement it comes from; ``(None, reason)`` where the theory gives none.

    One inner step of FO-ANIL, ANIL, FO-MAML or MAML: ``Lambda_star``
    (:func:`lambda_star`) for ``k' >= k`` (the paper's limit for FO-ANIL, a stationary point
    of the expected update of the others at ``w = 0``). For FO-ANIL with ``k' < k``: the top
    ``k'`` eigen-part of ``Lambda_star`` (:func:`top_part`), the limit its exact infinite-task
    dynamics reach (none when that part is not unique). Otherwise (MTL, several inner steps,
    the other methods with ``k' < k``): none.
    """
    if setting.method not in FIXED_POINT_METHODS:
        return None, (f"{setting.method}: no prediction (the paper's limits are for "
                      "FO-ANIL; Burer-Monteiro has no inner loop and does not unlearn)")
    if setting.inner_steps != 1:
        return None, (f"{setting.inner_steps} inner steps: no prediction (Lambda_star is the "
                      "fixed point of the one-step map only)")
    Lambda = lambda_star(problem, m_in, alpha)
    if setting.width >= problem.k:
        statement = ("Lambda_star: the limit of FO-ANIL with infinitely many tasks, w_0 = 0 "
                     "and one inner step (specification §4, claim 3)")
        if setting.method != "fo-anil":
            statement = (f"Lambda_star: a stationary point of the expected one-inner-step "
                         f"{setting.method} update at w = 0 (infinitely many tasks); not "
                         "proven to be reached")
        return Lambda, statement
    if not setting.is_fo_anil():
        return None, f"{setting.method} with k' < k: no prediction"
    target = top_part(Lambda, setting.width)
    if target is None:
        return None, ("k' < k: the top-k' eigen-part of Lambda_star is not unique (tied "
                      "eigenvalues), so the limit depends on B_0: no prediction")
    return target, ("k' < k: the top-k' eigen-part of Lambda_star, which the exact "
                    "infinite-task FO-ANIL dynamics reach (not in the paper: it is bound "
                    "by rank k'); lambda_err is measured against it")


def predicted_limits(
    problem: Problem, m_in: float, alpha: float, setting: Setting, shots: tuple[int, ...] = ()
) -> dict[str, object] | None:
    """The limits as ``t -> inf`` of the run of ``setting``, where the theory gives them: the
    exact infinite-task dynamics of FO-ANIL (or of FO-MAML from ``w_0 = 0``, the same:
    :meth:`Setting.is_fo_anil`) with one inner step whose :func:`gram_target` is known;
    ``None`` for any other run (a finite pool stops at a floor set by N, m and the noise; the
    other methods have no proven limit).

    **Returns** a dict: ``gram`` (k, k), the limit ``G`` of ``B_star^T B B^T B_star``
    (:func:`gram_target`); ``head_norm``, ``lambda_err`` and ``span_outside``: 0;
    ``subspace_dist`` and ``span_missed``: 0 for ``k' >= k`` and 1 for ``k' < k`` (a rank-k'
    span cannot cover span(B_star));
    ``rank``: ``min(k, k')``; ``perp_norm``: 0 for finite ``m_in``, ``None`` for ``m_in = inf``
    (the undriven directions keep their size, :func:`metarep.core.infinite.undriven_perp_norm`);
    ``train_loss``: ``(one-step risk with m_in samples + sigma^2) / 2`` at the limit;
    ``test_risk``: ``{m: risk after the setting's test-time head steps}`` for each ``m`` in
    ``shots`` (:func:`adapted_risk`: 0 or 1 step; ``None`` beyond). At the limit ``w = 0``,
    ``B_perp^T B = 0`` and ``C C^T = G``, so the risks are those of ``B = G^{1/2}`` in the
    coordinates ``B_star = I_k``.

    With ``m_in = inf`` the part of ``B_perp^T B`` that the signal does not drive keeps its
    size, so ``B_perp^T B`` does not vanish: what depends on it has no limit from ``G`` alone,
    and ``subspace_dist``, ``span_outside``, ``span_missed``, ``rank`` and every ``test_risk``
    are ``None`` (``gram``, ``lambda_err``, ``head_norm`` and ``train_loss`` stand: the
    population inner step sees ``B`` only through ``B_star^T B``).
    """
    if setting.regime != "infinite" or not setting.is_fo_anil():
        return None
    gram, _ = gram_target(problem, m_in, alpha, setting)
    if gram is None:
        return None
    k = problem.k
    values, vectors = np.linalg.eigh((gram + gram.T) / 2)
    root = (vectors * np.sqrt(np.clip(values, 0.0, None))) @ vectors.T
    limit = LinearParams(root, np.zeros(k))
    in_span = Problem(np.eye(k), problem.Sigma_star, problem.noise_var)

    def test_risk(m: float) -> float | None:
        value = adapted_risk(limit, in_span, m, alpha, setting.adapt_steps)
        return None if math.isnan(value) else value

    unlearned = not math.isinf(m_in)  # B_perp^T B -> 0
    return {
        "gram": gram,
        "head_norm": 0.0,
        "lambda_err": 0.0,
        "subspace_dist": (0.0 if setting.width >= k else 1.0) if unlearned else None,
        "span_outside": 0.0 if unlearned else None,
        "span_missed": (0.0 if setting.width >= k else 1.0) if unlearned else None,
        "rank": min(k, setting.width) if unlearned else None,
        "perp_norm": 0.0 if unlearned else None,
        "train_loss": 0.5 * (one_step_risk(limit, in_span, m_in, alpha) + problem.noise_var),
        "test_risk": {int(m): test_risk(m) if unlearned else None for m in shots},
    }
