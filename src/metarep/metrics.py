"""Measures of a learned representation against the ground truth (spec section 5)."""

from __future__ import annotations

import numpy as np

from metarep.models import LinearParams
from metarep.tasks import Problem

BASE_MEASURES = (
    "train_loss", "perp_norm", "perp_norm_fro", "subspace_dist", "lambda_err", "head_norm"
)


def perp_norms(B: np.ndarray, B_star: np.ndarray) -> tuple[float, float]:
    """``||B_perp^T B||`` in spectral and Frobenius norm (``B_perp`` never formed)."""
    outside = B - B_star @ (B_star.T @ B)
    return float(np.linalg.norm(outside, 2)), float(np.linalg.norm(outside))


def top_left_singular_vectors(B: np.ndarray, r: int) -> np.ndarray:
    """The ``r`` leading left singular vectors of ``B``, shape (d, min(r, k'))."""
    U, _, _ = np.linalg.svd(B, full_matrices=False)
    return U[:, : min(r, B.shape[1])]


def subspace_distance(B: np.ndarray, B_star: np.ndarray) -> float:
    """Sine of the largest principal angle between span(B_star) and the span of the top-k
    left singular vectors of ``B`` (top-k' when k' < k: then it measures whether
    span(B) lies inside span(B_star)). Equals ``sin(max(scipy.linalg.subspace_angles))``."""
    U = top_left_singular_vectors(B, B_star.shape[1])
    residual = U - B_star @ (B_star.T @ U)
    return float(min(1.0, np.linalg.norm(residual, 2)))


def lambda_error(B: np.ndarray, B_star: np.ndarray, Lambda_star: np.ndarray) -> float:
    """``||B_star^T B B^T B_star - Lambda_star||`` in spectral norm."""
    projected = B_star.T @ B
    return float(np.linalg.norm(projected @ projected.T - Lambda_star, 2))


def singular_values(B: np.ndarray) -> np.ndarray:
    """Singular values of ``B`` in decreasing order, shape (min(d, k'),)."""
    return np.linalg.svd(B, compute_uv=False)


def measure(
    params: LinearParams, problem: Problem | None, Lambda_star: np.ndarray | None
) -> dict[str, float]:
    """All measures of spec section 5 but the training loss, as a flat dict.

    Keys: ``perp_norm``, ``perp_norm_fro``, ``subspace_dist``, ``lambda_err``, ``head_norm``,
    ``sv_1 .. sv_r``. Measures that need the ground truth are ``nan`` when ``problem`` is None.
    """
    B = params.B.astype(np.float64)
    out = {"head_norm": float(np.linalg.norm(params.w))}
    if problem is None:
        out.update(perp_norm=np.nan, perp_norm_fro=np.nan, subspace_dist=np.nan,
                   lambda_err=np.nan)
    else:
        out["perp_norm"], out["perp_norm_fro"] = perp_norms(B, problem.B_star)
        out["subspace_dist"] = subspace_distance(B, problem.B_star)
        out["lambda_err"] = (np.nan if Lambda_star is None
                             else lambda_error(B, problem.B_star, Lambda_star))
    for i, value in enumerate(singular_values(B), start=1):
        out[f"sv_{i}"] = float(value)
    return out
