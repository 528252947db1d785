"""The two-layer linear network ``f(x; B, w) = x^T B w`` (specification §2).

``B`` in R^{d x k'} is the body (representation), ``w`` in R^{k'} the head. The width ``k'``
may be below, at or above ``k`` (and above ``d``).
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from metarep.core.arrays import Array, array_namespace
from metarep.errors import ArgumentError


class LinearParams(NamedTuple):
    """Parameters of the linear network: ``B`` (d, k') and ``w`` (k',), numpy arrays or (in a
    torch-backend run) tensors on its device."""

    B: Array
    w: Array

    @property
    def width(self) -> int:
        return self.B.shape[1]

    def astype(self, dtype: np.dtype | str) -> LinearParams:
        return LinearParams(self.B.astype(dtype), self.w.astype(dtype))

    def is_finite(self) -> bool:
        xp = array_namespace(self.B)
        return bool(xp.all(xp.isfinite(self.B)) and xp.all(xp.isfinite(self.w)))


def init_linear(
    d: int,
    width: int,
    init_scale: float,
    rng: np.random.Generator,
    dtype: np.dtype | str = "float64",
    head_scale: float = 0.0,
) -> LinearParams:
    """Gaussian ``B_0`` with i.i.d. ``N(0, init_scale^2 / d)`` entries and ``w_0`` with i.i.d.
    ``N(0, head_scale^2 / k')`` entries, drawn from ``rng`` after ``B_0`` (``w_0 = 0``, the
    paper's setting, for ``head_scale = 0``, drawing nothing).

    Each column of ``B_0`` then has norm close to ``init_scale`` whatever ``d`` is, and ``w_0``
    a norm close to ``head_scale``.
    """
    B = rng.standard_normal((d, width)) * (init_scale / np.sqrt(d))
    w = (rng.standard_normal(width) * (head_scale / np.sqrt(width)) if head_scale > 0
         else np.zeros(width))
    return LinearParams(B.astype(dtype), w.astype(dtype))


def predict(params: LinearParams, X: np.ndarray) -> np.ndarray:
    """``X B w`` for inputs ``X`` of shape (..., m, d); returns (..., m)."""
    return X @ (params.B @ params.w)


def linear_params(B: np.ndarray, w: np.ndarray, d: int) -> LinearParams:
    """Check ``B`` (d, k') with k' >= 1 and ``w`` (k',) against ``d``; raises
    :class:`~metarep.errors.ArgumentError` naming the array at fault."""
    if B.ndim != 2 or B.shape[0] != d or B.shape[1] < 1:
        raise ArgumentError("B", f"must have shape (d, k') with d = {d}, k' >= 1, got {B.shape}")
    if w.shape != (B.shape[1],):
        raise ArgumentError("w", f"must have shape (k',) = ({B.shape[1]},), got {w.shape}")
    return LinearParams(B, w)
