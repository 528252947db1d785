"""Regression tasks drawn from a :class:`~metarep.core.problem.Problem` (specification §1).

A :class:`TaskBatch` holds ``N`` tasks, each split into ``m_in`` inner (support) rows and
``m_out`` outer (query) rows; :func:`sample_tasks` draws fresh ones and :func:`task_pool`
checks a user's arrays (``X`` (N, m, d), ``y`` (N, m), optional ``B_star`` and heads).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from metarep.core.arrays import array_namespace
from metarep.core.problem import Problem
from metarep.errors import ArgumentError


@dataclass(frozen=True)
class TaskBatch:
    """``N`` regression tasks, split into inner and outer rows.

    **Attributes:**
    - ``X_in``: (N, m_in, d); ``y_in``: (N, m_in) — the inner (support) set.
    - ``X_out``: (N, m_out, d); ``y_out``: (N, m_out) — the outer (query) set.
    - ``heads``: (N, k) true heads ``w_star_i`` when known, else ``None``.
    - ``indices``: (N,) positions of these tasks in the pool they were taken from, or ``None``
      when the batch is a whole pool (or fresh tasks). Methods with per-task state (mtl) use
      them to update the sampled tasks only.
    """

    X_in: np.ndarray
    y_in: np.ndarray
    X_out: np.ndarray
    y_out: np.ndarray
    heads: np.ndarray | None = None
    indices: np.ndarray | None = None

    @property
    def n_tasks(self) -> int:
        return self.X_in.shape[0]

    @property
    def m_in(self) -> int:
        return self.X_in.shape[1]

    @property
    def m_out(self) -> int:
        return self.X_out.shape[1]

    @property
    def d(self) -> int:
        return self.X_in.shape[2]

    def take(self, indices: np.ndarray) -> TaskBatch:
        """The sub-batch of the tasks at ``indices`` (their pool positions kept in ``indices``)."""
        heads = None if self.heads is None else self.heads[indices]
        xp = array_namespace(self.X_in)
        positions = xp.asarray(indices) if self.indices is None else self.indices[indices]
        return TaskBatch(
            self.X_in[indices], self.y_in[indices], self.X_out[indices], self.y_out[indices], heads,
            positions,
        )

    def on(self, xp: Any) -> TaskBatch:
        """The same tasks as arrays of the namespace ``xp`` (e.g. torch tensors on a device:
        :func:`metarep.engine.arrays.torch_namespace`), values and dtypes unchanged."""
        def move(array: np.ndarray | None) -> Any:
            return None if array is None else xp.asarray(array)

        return TaskBatch(*(move(a) for a in (self.X_in, self.y_in, self.X_out, self.y_out,
                                             self.heads, self.indices)))

    def astype(self, dtype: np.dtype | str) -> TaskBatch:
        """The same tasks stored in ``dtype`` (heads stay float64)."""
        cast = [np.ascontiguousarray(a, dtype=dtype) for a in (self.X_in, self.y_in,
                                                                 self.X_out, self.y_out)]
        return TaskBatch(*cast, heads=self.heads, indices=self.indices)

    def full(self) -> tuple[np.ndarray, np.ndarray]:
        """All ``m = m_in + m_out`` rows of every task: ``X`` (N, m, d), ``y`` (N, m)."""
        return (np.concatenate([self.X_in, self.X_out], axis=1),
                np.concatenate([self.y_in, self.y_out], axis=1))


def sample_heads(problem: Problem, n: int, rng: np.random.Generator) -> np.ndarray:
    """``n`` heads ``w_star ~ N(0, Sigma_star)``, shape (n, k)."""
    factor = np.linalg.cholesky(problem.Sigma_star)
    return rng.standard_normal((n, problem.k)) @ factor.T


def sample_tasks(
    problem: Problem,
    n: int,
    m_in: int,
    m_out: int,
    rng: np.random.Generator,
    dtype: np.dtype | str = np.float64,
) -> TaskBatch:
    """Draw ``n`` fresh tasks with ``m_in + m_out`` samples each.

    Heads, then inputs ``X`` (n, m, d), then noise are drawn from ``rng`` in that order, all in
    float64; the arrays are then cast to ``dtype``.
    """
    heads = sample_heads(problem, n, rng)
    m = m_in + m_out
    X = rng.standard_normal((n, m, problem.d))
    noise = rng.standard_normal((n, m)) * np.sqrt(problem.noise_var)
    y = np.einsum("nmd,nd->nm", X, heads @ problem.B_star.T) + noise
    return TaskBatch(X[:, :m_in], y[:, :m_in], X[:, m_in:], y[:, m_in:], heads).astype(dtype)


@dataclass(frozen=True)
class TaskPool:
    """A task pool given as arrays (e.g. a user's file), with the ground truth where known.

    ``X`` (N, m, d), ``y`` (N, m); ``B_star`` (d, k), ``heads`` (N, k), ``noise_var``
    (``sigma^2``) and ``Sigma_star`` (k, k, diagonal) where the file has them, else ``None``.
    """

    X: np.ndarray
    y: np.ndarray
    B_star: np.ndarray | None
    heads: np.ndarray | None
    noise_var: float | None = None
    Sigma_star: np.ndarray | None = None

    def split(self, m_in: int) -> TaskBatch:
        """The pool split into the first ``m_in`` rows (inner) and the rest (outer)."""
        return TaskBatch(
            np.ascontiguousarray(self.X[:, :m_in]), np.ascontiguousarray(self.y[:, :m_in]),
            np.ascontiguousarray(self.X[:, m_in:]), np.ascontiguousarray(self.y[:, m_in:]),
            self.heads,
        )


def task_pool(
    X: np.ndarray, y: np.ndarray, B_star: np.ndarray | None = None,
    heads: np.ndarray | None = None, noise_var: np.ndarray | float | None = None,
    Sigma_star: np.ndarray | None = None,
) -> TaskPool:
    """Check the arrays of a task pool: ``X`` (N, m, d) with N, m, d >= 1, ``y`` (N, m),
    optional ``B_star`` (d, k) with ``k <= d`` and orthonormal columns, optional ``heads``
    (N, k), optional ``noise_var`` (a number >= 0) and optional ``Sigma_star`` (k, k):
    diagonal with positive entries (the head covariance a config can state). Raises
    :class:`~metarep.errors.ArgumentError` naming the array at fault."""
    if X.ndim != 3 or min(X.shape) < 1:
        raise ArgumentError("X", f"must have shape (N, m, d) with N, m, d >= 1, got {X.shape}")
    n, m, d = X.shape
    if y.shape != (n, m):
        raise ArgumentError("y", f"must have shape (N, m) = {(n, m)}, got {y.shape}")
    if B_star is not None:
        if B_star.ndim != 2 or B_star.shape[0] != d or not 1 <= B_star.shape[1] <= d:
            raise ArgumentError("B_star", f"must have shape (d, k) with d = {d}, k <= d; "
                                f"got {B_star.shape}")
        if not np.allclose(B_star.T @ B_star, np.eye(B_star.shape[1]), atol=1e-8):
            raise ArgumentError("B_star", "must have orthonormal columns (B_star^T B_star = I)")
    if heads is not None:
        k = None if B_star is None else B_star.shape[1]
        if heads.ndim != 2 or heads.shape[0] != n or (k is not None and heads.shape[1] != k):
            raise ArgumentError("heads", f"must have shape (N, k) = ({n}, {k or 'k'}), "
                                f"got {heads.shape}")
    if noise_var is not None:
        noise_var = np.asarray(noise_var)
        if noise_var.shape != () or float(noise_var) < 0:
            raise ArgumentError("noise_var", f"must be one number >= 0, got {noise_var!r}")
        noise_var = float(noise_var)
    if Sigma_star is not None:
        k = next((a.shape[1] for a in (B_star, heads) if a is not None), Sigma_star.shape[0])
        if Sigma_star.shape != (k, k):
            raise ArgumentError("Sigma_star", f"must have shape (k, k) = ({k}, {k}), got "
                                f"{Sigma_star.shape}")
        diagonal = np.diag(Sigma_star)
        if np.any(Sigma_star != np.diag(diagonal)) or np.any(diagonal <= 0):
            raise ArgumentError("Sigma_star", "must be diagonal with positive entries (the "
                                "head covariance problem.head_cov can state)")
    return TaskPool(X, y, B_star, heads, noise_var, Sigma_star)


def residual_noise_var(pool: TaskPool) -> float:
    """The noise variance of a pool with known ``B_star`` and ``heads``: the mean squared
    residual ``mean_(i, j) (y_ij - x_ij^T B_star w_star_i)^2`` over its ``N m`` labels (unbiased
    for ``sigma^2``, relative standard error ``sqrt(2 / (N m))`` for Gaussian noise)."""
    if pool.B_star is None or pool.heads is None:
        raise ArgumentError("pool", "needs B_star and heads to estimate the noise variance")
    residual = pool.y - np.einsum("nmd,nd->nm", pool.X, pool.heads @ pool.B_star.T)
    return float(np.mean(residual**2))


def head_second_moment(heads: np.ndarray) -> np.ndarray:
    """``H^T H / N`` for ``heads`` ``H`` (N, k): the estimate of ``Sigma_star = E[w_star
    w_star^T]`` (the heads have mean zero) from the heads of ``N`` tasks."""
    return heads.T @ heads / heads.shape[0]
