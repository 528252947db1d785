"""Measures of a learned representation against the ground truth (spec section 5)."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from metarep.core.model import LinearParams
from metarep.core.problem import Problem, outside_span
from metarep.core.tasks import TaskBatch

BASE_MEASURES = (
    "train_loss", "perp_norm", "perp_norm_fro", "subspace_dist", "lambda_err", "head_norm"
)


def perp_norms(B: np.ndarray, B_star: np.ndarray) -> tuple[float, float]:
    """``||B_perp^T B||`` in spectral and Frobenius norm (``B_perp`` never formed)."""
    outside = outside_span(B, B_star)
    return float(np.linalg.norm(outside, 2)), float(np.linalg.norm(outside))


def perp_share(W1: np.ndarray, B_star: np.ndarray) -> float:
    """``||B_perp^T W1||_F / ||W1||_F`` for a first layer ``W1`` (d, h): the share of its
    energy outside span(B_star) (``w1_perp_share`` of ReLU runs; 0 when ``W1 = 0``)."""
    total = float(np.linalg.norm(W1))
    return perp_norms(W1, B_star)[1] / total if total > 0.0 else 0.0


def top_left_singular_vectors(B: np.ndarray, r: int) -> np.ndarray:
    """The ``r`` leading left singular vectors of ``B``, shape (d, min(r, k'))."""
    U, _, _ = np.linalg.svd(B, full_matrices=False)
    return U[:, : min(r, B.shape[1])]


def subspace_distance(B: np.ndarray, B_star: np.ndarray) -> float:
    """Sine of the largest principal angle between span(B_star) and the span of the top-k
    left singular vectors of ``B`` (top-k' when k' < k: then it measures whether
    span(B) lies inside span(B_star)). Equals ``sin(max(scipy.linalg.subspace_angles))``."""
    U = top_left_singular_vectors(B, B_star.shape[1])
    return float(min(1.0, np.linalg.norm(outside_span(U, B_star), 2)))


def projected_gram(B: np.ndarray, B_star: np.ndarray) -> np.ndarray:
    """``B_star^T B B^T B_star``, shape (k, k): the representation seen inside span(B_star)."""
    projected = B_star.T @ B
    return projected @ projected.T


def lambda_error(B: np.ndarray, B_star: np.ndarray, Lambda_star: np.ndarray) -> float:
    """``||B_star^T B B^T B_star - Lambda_star||`` in spectral norm."""
    return float(np.linalg.norm(projected_gram(B, B_star) - Lambda_star, 2))


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
    out = dict.fromkeys(("perp_norm", "perp_norm_fro", "subspace_dist", "lambda_err"), np.nan)
    if problem is not None:
        out["perp_norm"], out["perp_norm_fro"] = perp_norms(B, problem.B_star)
        out["subspace_dist"] = subspace_distance(B, problem.B_star)
        if Lambda_star is not None:
            out["lambda_err"] = lambda_error(B, problem.B_star, Lambda_star)
    out["head_norm"] = float(np.linalg.norm(params.w))
    for i, value in enumerate(singular_values(B), start=1):
        out[f"sv_{i}"] = float(value)
    return out


def measure_network(arrays: Mapping[str, np.ndarray], problem: Problem | None) -> dict[str, float]:
    """The measures that still mean something for a ReLU network (but the training loss):
    ``w1_perp_share`` (:func:`perp_share` of the first layer ``W1``; ``nan`` without the ground
    truth) and ``head_norm`` ``||w||``, from the network's named arrays."""
    W1 = arrays["W1"]
    share = np.nan if problem is None else perp_share(W1, problem.B_star)
    return {"w1_perp_share": share, "head_norm": float(np.linalg.norm(arrays["w"]))}


def moment_subspace(batch: TaskBatch, k: int) -> np.ndarray:
    """Method-of-moments estimate of span(B_star) from a task pool, (d, k) orthonormal.

    ``a_i = X_i^in^T y_i^in / m_in`` and ``b_i = X_i^out^T y_i^out / m_out`` are independent
    unbiased estimates of ``B_star w_star_i``, so ``M = mean_i (a_i b_i^T + b_i a_i^T) / 2``
    is unbiased for ``B_star Sigma_star B_star^T``; its top-k eigenvectors estimate
    span(B_star). A reference for the statistical accuracy a pool allows.
    """
    a = np.einsum("nmd,nm->nd", batch.X_in, batch.y_in) / batch.m_in
    b = np.einsum("nmd,nm->nd", batch.X_out, batch.y_out) / batch.m_out
    moments = (a.T @ b + b.T @ a) / (2 * batch.n_tasks)
    _, vectors = np.linalg.eigh(moments.astype(np.float64))
    return vectors[:, ::-1][:, :k]
