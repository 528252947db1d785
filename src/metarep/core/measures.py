"""Measures of a learned representation against the ground truth (specification §5)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import NamedTuple

import numpy as np

from metarep.core.model import LinearParams
from metarep.core.problem import Problem, outside_span
from metarep.core.tasks import TaskBatch

BASE_MEASURES = (
    "train_loss", "perp_norm", "perp_norm_fro", "subspace_dist", "span_outside", "span_missed",
    "lambda_err", "head_norm",
)
TRUTH_MEASURES = ("perp_norm", "perp_norm_fro", "subspace_dist", "span_outside", "span_missed",
                  "lambda_err")
"""The measures that need the ground truth (``nan`` without it)."""

RANK_RTOL = 1e-10
"""Numerical rank of ``B``: the number of its singular values above ``RANK_RTOL * sigma_1``
(0 for ``B = 0``), computed in float64."""


def perp_norms(B: np.ndarray, B_star: np.ndarray) -> tuple[float, float]:
    """``||B_perp^T B||`` in spectral and Frobenius norm (``B_perp`` never formed)."""
    outside = outside_span(B, B_star)
    return float(np.linalg.norm(outside, 2)), float(np.linalg.norm(outside))


def perp_share(W1: np.ndarray, B_star: np.ndarray) -> float:
    """``||B_perp^T W1||_F / ||W1||_F`` for a first layer ``W1`` (d, h): the share of its
    energy outside span(B_star) (``w1_perp_share`` of ReLU runs; 0 when ``W1 = 0``)."""
    total = float(np.linalg.norm(W1))
    return perp_norms(W1, B_star)[1] / total if total > 0.0 else 0.0


def unit_perp_shares(W1: np.ndarray, B_star: np.ndarray) -> np.ndarray:
    """``||B_perp^T W1[:, j]|| / ||W1[:, j]||`` for each unit ``j`` of a first layer ``W1``
    (d, h): how much of each unit's weights lies outside span(B_star), shape (h,) (0 for a
    zero column)."""
    norms = np.linalg.norm(W1, axis=0)
    outside = np.linalg.norm(outside_span(W1, B_star), axis=0)
    return np.divide(outside, norms, out=np.zeros_like(norms), where=norms > 0.0)


def top_left_singular_vectors(B: np.ndarray, r: int) -> np.ndarray:
    """The ``r`` leading left singular vectors of ``B``, shape (d, min(r, k'))."""
    U, _, _ = np.linalg.svd(B, full_matrices=False)
    return U[:, : min(r, B.shape[1])]


def numerical_rank(singular: np.ndarray) -> int:
    """The number of singular values (decreasing) above ``RANK_RTOL * sigma_1``; 0 when all
    are 0."""
    if singular.size == 0 or not singular[0] > 0.0:
        return 0
    return int(np.count_nonzero(singular > RANK_RTOL * singular[0]))


class SpanMeasures(NamedTuple):
    """How span(B) and span(B_star) compare (:func:`span_measures`); each a sine in [0, 1]."""

    subspace_dist: float
    span_outside: float
    span_missed: float


def span_measures(B: np.ndarray, B_star: np.ndarray,
                  svd: tuple[np.ndarray, np.ndarray] | None = None) -> SpanMeasures:
    """``subspace_dist``, ``span_outside`` and ``span_missed`` of ``B`` (d, k') against
    ``B_star`` (d, k, orthonormal), from one SVD of ``B``.

    ``U_B`` (d, r): the top ``r = min(k, rank(B))`` left singular vectors of ``B`` (rank:
    :func:`numerical_rank`, singular values above ``RANK_RTOL * sigma_1``). Then

    - ``span_outside = ||(I - B_star B_star^T) U_B||_2``: the sine of the largest principal
      angle from span(U_B) to span(B_star), how much of span(B) (its top part) lies outside
      span(B_star); 0 when it lies inside (and for ``B = 0``);
    - ``span_missed = ||(I - U_B U_B^T) B_star||_2``: the sine of the largest principal angle
      from span(B_star) to span(U_B), how much of span(B_star) ``B`` fails to cover; exactly 1
      when ``r < k`` (a model of rank below k cannot cover a k-dim span);
    - ``subspace_dist = max(span_outside, span_missed)``: for ``r = k`` the sine of the largest
      principal angle between span(B_star) and span(U_B) (both k-dim, so the two sines are
      equal; it is computed as ``span_outside``), and 1 for ``r < k`` (in particular for every
      ``k' < k``: a narrow model is never closer than a wide one).

    All three are principal angles, so they are invariant under ``B -> Q B V^T``,
    ``B_star -> Q B_star`` for any ``Q`` (d', d) and ``V`` (k'', k') with orthonormal columns
    (singular values and the map of left singular vectors are kept): the infinite-task
    coordinates ``H`` with ``B_star = [I_k; 0]`` give the measures of ``B`` in R^d.
    ``svd``: ``(U, singular values)`` of ``B`` (thin SVD) when the caller has them already.
    """
    k = B_star.shape[1]
    U, singular = svd if svd is not None else np.linalg.svd(B, full_matrices=False)[:2]
    r = min(k, numerical_rank(singular))
    U_B = U[:, :r]
    outside = float(min(1.0, np.linalg.norm(outside_span(U_B, B_star), 2))) if r else 0.0
    if r < k:
        return SpanMeasures(1.0, outside, 1.0)
    missed = float(min(1.0, np.linalg.norm(outside_span(B_star, U_B), 2)))
    return SpanMeasures(outside, outside, missed)


def span_outside(B: np.ndarray, B_star: np.ndarray) -> float:
    """How much of span(B) lies outside span(B_star): ``||(I - B_star B_star^T) U_B||_2``
    (:func:`span_measures`)."""
    return span_measures(B, B_star).span_outside


def span_missed(B: np.ndarray, B_star: np.ndarray) -> float:
    """How much of span(B_star) span(B) fails to cover: ``||(I - U_B U_B^T) B_star||_2``, 1
    when ``rank(B) < k`` (:func:`span_measures`)."""
    return span_measures(B, B_star).span_missed


def subspace_distance(B: np.ndarray, B_star: np.ndarray) -> float:
    """Sine of the largest principal angle between span(B_star) and the span of the top-k
    left singular vectors of ``B``, made honest for a model of rank below k:
    ``max(span_outside, span_missed)`` (:func:`span_measures`), which is
    ``sin(max(scipy.linalg.subspace_angles(B_star, U_k)))`` when ``rank(B) >= k`` and 1 when
    ``rank(B) < k`` (every ``k' < k``)."""
    return span_measures(B, B_star).subspace_dist


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
    """All measures of specification §5 but the training loss, as a flat dict.

    Keys: ``perp_norm``, ``perp_norm_fro``, ``subspace_dist``, ``span_outside``,
    ``span_missed`` (:func:`span_measures`), ``lambda_err``, ``head_norm``, ``sv_1 .. sv_r``.
    Measures that need the ground truth (:data:`TRUTH_MEASURES`) are ``nan`` when ``problem``
    is None.
    """
    B = params.B.astype(np.float64)
    U, singular, _ = np.linalg.svd(B, full_matrices=False)  # one SVD for the span and sv_*
    out = dict.fromkeys(TRUTH_MEASURES, np.nan)
    if problem is not None:
        out["perp_norm"], out["perp_norm_fro"] = perp_norms(B, problem.B_star)
        out.update(span_measures(B, problem.B_star, (U, singular))._asdict())
        if Lambda_star is not None:
            out["lambda_err"] = lambda_error(B, problem.B_star, Lambda_star)
    out["head_norm"] = float(np.linalg.norm(params.w))
    for i, value in enumerate(singular, start=1):
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
