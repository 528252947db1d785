"""The ground truth of multi-task linear regression with a shared representation (spec
section 1).

A :class:`Problem` fixes ``B_star`` (d x k, orthonormal columns), the head covariance
``Sigma_star`` (k x k) and the noise variance ``sigma^2``. Task ``i`` draws a head
``w_star_i ~ N(0, Sigma_star)``, inputs ``x ~ N(0, I_d)`` and labels
``y = x^T B_star w_star_i + eps`` with ``eps ~ N(0, sigma^2)`` (:mod:`metarep.core.tasks`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from metarep.errors import ArgumentError


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
        """:func:`outside_span` of ``M`` (d, n): its part outside span(B_star)."""
        return outside_span(M, self.B_star)


def outside_span(M: np.ndarray, B_star: np.ndarray) -> np.ndarray:
    """``B_perp B_perp^T M = (I - B_star B_star^T) M`` for ``M`` (d, n), without forming the
    d x d projector (any ``B_star`` with orthonormal columns: the part of ``M`` outside its
    span)."""
    return M - B_star @ (B_star.T @ M)


def diagonal_frame(Sigma_star: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(V, eigenvalues)`` with ``Sigma_star = V diag(eigenvalues) V^T``, eigenvalues in
    decreasing order: the frame in which a head covariance is diagonal.

    The task distribution does not change when written in it: ``B_star w_star`` with
    ``w_star ~ N(0, Sigma_star)`` has the law of ``(B_star V) u`` with ``u ~ N(0, diag(
    eigenvalues))``, ``B_star V`` spans span(B_star), and a head ``w_star`` is ``V u``."""
    eigenvalues, V = np.linalg.eigh(Sigma_star)
    order = np.argsort(eigenvalues)[::-1]
    return V[:, order], eigenvalues[order]


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
        raise ArgumentError("spec", f"must be isotropic, linear or a list; got {spec!r}")
    values = np.asarray(spec, dtype=float)
    if values.shape != (k,) or np.any(values <= 0) or not np.all(np.isfinite(values)):
        raise ArgumentError("spec", f"needs k = {k} positive finite eigenvalues")
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
