"""Multi-task linear regression with a shared representation (spec section 1).

A :class:`Problem` fixes the ground truth: ``B_star`` (d x k, orthonormal columns), the head
covariance ``Sigma_star`` (k x k) and the noise variance ``sigma^2``. Task ``i`` draws a head
``w_star_i ~ N(0, Sigma_star)``, inputs ``x ~ N(0, I_d)`` and labels
``y = x^T B_star w_star_i + eps`` with ``eps ~ N(0, sigma^2)``. A :class:`TaskBatch` holds
``N`` tasks, each split into ``m_in`` inner (support) rows and ``m_out`` outer (query) rows.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from metarep.config import ConfigError
from metarep.storage import read_npz


@dataclass(frozen=True)
class Problem:
    """Ground truth of the task distribution.

    **Attributes:**
    - ``B_star``: (d, k) with ``B_star^T B_star = I_k``.
    - ``Sigma_star``: (k, k) symmetric positive definite head covariance.
    - ``noise_var``: label noise variance ``sigma^2 >= 0``.
    """

    B_star: np.ndarray
    Sigma_star: np.ndarray
    noise_var: float

    @property
    def d(self) -> int:
        return self.B_star.shape[0]

    @property
    def k(self) -> int:
        return self.B_star.shape[1]

    def perp(self, M: np.ndarray) -> np.ndarray:
        """``B_perp B_perp^T M = (I - B_star B_star^T) M`` without forming the d x d projector."""
        return M - self.B_star @ (self.B_star.T @ M)


def head_covariance(spec: str | tuple[float, ...] | list[float], k: int) -> np.ndarray:
    """``Sigma_star`` from its config spelling.

    ``isotropic``: ``I_k``. ``linear``: ``diag(1, ..., k)`` scaled to trace ``k`` (the paper's
    experiments). A sequence: ``diag(values)`` exactly as given.
    """
    if isinstance(spec, str):
        if spec == "isotropic":
            return np.eye(k)
        if spec == "linear":
            diagonal = np.arange(1, k + 1, dtype=float)
            return np.diag(diagonal * k / diagonal.sum())
        raise ConfigError("problem.head_cov", f"must be isotropic, linear or a list; got {spec!r}")
    values = np.asarray(spec, dtype=float)
    if values.shape != (k,) or np.any(values <= 0) or not np.all(np.isfinite(values)):
        raise ConfigError("problem.head_cov", f"needs k = {k} positive eigenvalues")
    return np.diag(values)


def random_orthonormal(d: int, k: int, rng: np.random.Generator) -> np.ndarray:
    """A Haar-random d x k matrix with orthonormal columns (QR of a Gaussian, signs fixed)."""
    gaussian = rng.standard_normal((d, k))
    q, r = np.linalg.qr(gaussian)
    return q * np.sign(np.diag(r))


def make_problem(
    d: int,
    k: int,
    noise_var: float,
    head_cov: str | tuple[float, ...],
    rng: np.random.Generator,
) -> Problem:
    """Draw ``B_star`` uniformly among d x k orthonormal frames."""
    return Problem(random_orthonormal(d, k, rng), head_covariance(head_cov, k), float(noise_var))


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
        positions = np.asarray(indices) if self.indices is None else self.indices[indices]
        return TaskBatch(
            self.X_in[indices], self.y_in[indices], self.X_out[indices], self.y_out[indices], heads,
            positions,
        )

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
class LoadedPool:
    """A task pool read from a file, with the ground truth when the file has it."""

    X: np.ndarray
    y: np.ndarray
    B_star: np.ndarray | None
    heads: np.ndarray | None

    def split(self, m_in: int) -> TaskBatch:
        """The pool split into the first ``m_in`` rows (inner) and the rest (outer)."""
        return TaskBatch(
            np.ascontiguousarray(self.X[:, :m_in]), np.ascontiguousarray(self.y[:, :m_in]),
            np.ascontiguousarray(self.X[:, m_in:]), np.ascontiguousarray(self.y[:, m_in:]),
            self.heads,
        )


def load_pool(path: str | Path) -> LoadedPool:
    """Read ``X`` (N, m, d), ``y`` (N, m) and optional ``B_star`` (d, k), ``heads`` (N, k).

    Raises :class:`ConfigError` (key ``tasks.from``) for a missing file, missing arrays or
    shapes that do not match, or a ``B_star`` without orthonormal columns.
    """
    key = "tasks.from"
    data = read_npz(path, key, required=("X", "y"))
    X, y = data["X"], data["y"]
    if X.ndim != 3 or min(X.shape) < 1:
        raise ConfigError(key, f"X must have shape (N, m, d) with N, m, d >= 1, got {X.shape}")
    n, m, d = X.shape
    if y.shape != (n, m):
        raise ConfigError(key, f"y must have shape (N, m) = {(n, m)}, got {y.shape}")
    B_star = heads = None
    if "B_star" in data:
        B_star = data["B_star"]
        if B_star.ndim != 2 or B_star.shape[0] != d or not 1 <= B_star.shape[1] <= d:
            raise ConfigError(key, f"B_star must have shape (d, k) with d = {d}, k <= d; "
                              f"got {B_star.shape}")
        if not np.allclose(B_star.T @ B_star, np.eye(B_star.shape[1]), atol=1e-8):
            raise ConfigError(key, "B_star must have orthonormal columns (B_star^T B_star = I)")
    if "heads" in data:
        heads = data["heads"]
        k = None if B_star is None else B_star.shape[1]
        if heads.ndim != 2 or heads.shape[0] != n or (k is not None and heads.shape[1] != k):
            raise ConfigError(key, f"heads must have shape (N, k) = ({n}, {k or 'k'}), "
                              f"got {heads.shape}")
    return LoadedPool(X, y, B_star, heads)
