"""metarep.core.measures against independent computations (scipy's principal angles, an explicit
orthonormal complement B_perp from scipy.linalg.null_space, plain definitions), narrow and
rank-deficient models, and invariance under orthonormal changes of basis."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.linalg

from metarep.core.measures import (
    BASE_MEASURES,
    RANK_RTOL,
    TRUTH_MEASURES,
    lambda_error,
    measure,
    numerical_rank,
    perp_norms,
    singular_values,
    span_measures,
    span_missed,
    span_outside,
    subspace_distance,
    top_left_singular_vectors,
)
from metarep.core.model import LinearParams
from metarep.core.problem import Problem, random_orthonormal


def frame(d=9, k=3, seed=0) -> np.ndarray:
    return random_orthonormal(d, k, np.random.default_rng(seed))


def near(B_star: np.ndarray, width: int, noise: float, seed=1) -> np.ndarray:
    """A d x width matrix close to span(B_star) (``noise`` sets the part outside)."""
    rng = np.random.default_rng(seed)
    d, k = B_star.shape
    return B_star @ rng.standard_normal((k, width)) + noise * rng.standard_normal((d, width))


def low_rank(B_star: np.ndarray, width: int, rank: int, noise: float, seed=4) -> np.ndarray:
    """A d x width matrix of exact rank ``rank`` near span(B_star)."""
    rng = np.random.default_rng(seed)
    return near(B_star, rank, noise, seed=seed) @ rng.standard_normal((rank, width))


def scipy_reference(B: np.ndarray, B_star: np.ndarray) -> tuple[float, float, float]:
    """``(subspace_dist, span_outside, span_missed)`` from scipy alone: the rank from
    scipy.linalg.svdvals, U_B the top r = min(k, rank) left singular vectors (scipy.linalg.svd),
    the sines of the largest principal angles from scipy.linalg.subspace_angles, and
    span_missed from an explicit orthonormal complement of span(U_B) (scipy.linalg.null_space)."""
    k = B_star.shape[1]
    singular = scipy.linalg.svdvals(B)
    rank = int(np.sum(singular > RANK_RTOL * singular[0])) if singular[0] > 0 else 0
    r = min(k, rank)
    U_B = scipy.linalg.svd(B, full_matrices=False)[0][:, :r]
    outside = float(np.sin(np.max(scipy.linalg.subspace_angles(U_B, B_star)))) if r else 0.0
    complement = scipy.linalg.null_space(U_B.T) if r else np.eye(B.shape[0])
    missed = float(np.linalg.norm(complement.T @ B_star, 2))
    distance = (float(np.sin(np.max(scipy.linalg.subspace_angles(B_star, U_B)))) if r == k
                else 1.0)
    return distance, outside, missed


def scipy_distance(B: np.ndarray, B_star: np.ndarray) -> float:
    """sin of the largest principal angle between span(B_star) and the top-k left singular
    vectors of B when rank(B) >= k; 1 below (a span of fewer than k dimensions)."""
    return scipy_reference(B, B_star)[0]


@pytest.mark.parametrize("width", [1, 2, 3, 5, 9, 14])
@pytest.mark.parametrize("noise", [0.01, 0.3, 3.0])
def test_span_measures_agree_with_scipy_principal_angles(width, noise):
    """k' < k, k' = k and k' > k (k = 3, d = 9), near and far from span(B_star)."""
    B_star = frame()
    B = near(B_star, width, noise, seed=width)
    expected = scipy_reference(B, B_star)
    got = span_measures(B, B_star)
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-12)
    assert subspace_distance(B, B_star) == got.subspace_dist
    assert span_outside(B, B_star) == got.span_outside
    assert span_missed(B, B_star) == got.span_missed
    assert got.subspace_dist == pytest.approx(max(got.span_outside, got.span_missed), abs=1e-14)
    if width < 3:  # a narrow model cannot cover span(B_star)
        assert got.subspace_dist == got.span_missed == 1.0
    else:  # two k-dim spans: the two one-sided sines are the same angle
        assert got.span_outside == pytest.approx(got.span_missed, abs=1e-12)


@pytest.mark.parametrize(("width", "rank"), [(6, 1), (6, 2), (6, 3), (6, 4), (2, 2)])
@pytest.mark.parametrize("noise", [0.05, 1.0])
def test_span_measures_of_rank_deficient_B(width, rank, noise):
    """rank(B) < k gives r = rank (subspace_dist = span_missed = 1) whatever k' is; the
    directions past the rank (numerically 0) never enter U_B."""
    B_star = frame()
    B = low_rank(B_star, width, rank, noise, seed=10 * width + rank)
    assert numerical_rank(singular_values(B)) == rank
    got = span_measures(B, B_star)
    np.testing.assert_allclose(got, scipy_reference(B, B_star), rtol=0, atol=1e-12)
    if rank < 3:
        assert got.subspace_dist == got.span_missed == 1.0
        assert got.span_outside < 1.0


def test_numerical_rank_and_the_zero_matrix():
    assert numerical_rank(np.array([3.0, 1.0, 1e-9])) == 3
    assert numerical_rank(np.array([3.0, 1.0, 1e-11])) == 2
    assert numerical_rank(np.zeros(4)) == 0
    assert numerical_rank(np.array([])) == 0
    B_star = frame()
    assert span_measures(np.zeros((9, 5)), B_star) == (1.0, 0.0, 1.0)


def test_a_narrow_model_inside_span_B_star_is_not_closer_than_a_wide_one():
    """The issue's example (k = 3): width 1 used to report ~0.116 (better than width 20's
    ~0.212) because the top-1 direction of B was compared with a 3-dim span. A narrow B inside
    span(B_star) now has subspace_dist = span_missed = 1, and a small span_outside says that
    what it does span is right; a wide B near span(B_star) has a small distance."""
    B_star = frame(d=30)
    rng = np.random.default_rng(5)
    noise = 0.01 * rng.standard_normal((30, 1))
    narrow = B_star @ rng.standard_normal((3, 1)) + noise
    narrow_measures = span_measures(narrow, B_star)
    assert narrow_measures.subspace_dist == 1.0 and narrow_measures.span_missed == 1.0
    assert narrow_measures.span_outside < 0.05
    assert span_measures(B_star[:, :1], B_star).span_outside < 1e-14  # exactly inside
    wide = near(B_star, 20, 0.05, seed=6)
    wide_measures = span_measures(wide, B_star)
    assert wide_measures.subspace_dist < 0.5
    assert narrow_measures.subspace_dist > wide_measures.subspace_dist
    # k' = k - 1 (width 2): still 1, however good its two directions are.
    assert subspace_distance(B_star[:, :2], B_star) == 1.0


def test_subspace_distance_extremes():
    B_star = frame()
    inside = B_star @ np.random.default_rng(2).standard_normal((3, 3))
    assert subspace_distance(inside, B_star) < 1e-12
    assert span_outside(inside, B_star) < 1e-12 and span_missed(inside, B_star) < 1e-12
    null = scipy.linalg.null_space(B_star.T)
    assert subspace_distance(null[:, :3], B_star) == pytest.approx(1.0, abs=1e-12)
    assert span_outside(null[:, :3], B_star) == pytest.approx(1.0, abs=1e-12)
    # The top-k directions decide, not small extra ones outside span(B_star).
    extra = np.concatenate([inside, 1e-3 * null[:, :4]], axis=1)
    assert subspace_distance(extra, B_star) < 1e-10
    assert span_outside(extra, B_star) < 1e-10 and span_missed(extra, B_star) < 1e-10


def test_subspace_distance_is_invariant_to_rotating_the_columns():
    B_star = frame()
    B = near(B_star, 6, 0.5)
    mix = np.random.default_rng(3).standard_normal((6, 6))
    rotation, _ = np.linalg.qr(mix)
    assert subspace_distance(B @ rotation, B_star) == pytest.approx(
        subspace_distance(B, B_star), abs=1e-12)


@pytest.mark.parametrize(("width", "rank"), [(1, 1), (2, 2), (3, 3), (7, 7), (6, 2), (6, 4)])
def test_measures_are_invariant_under_orthonormal_changes_of_basis(width, rank):
    """``B -> Q B V^T``, ``B_star -> Q B_star`` with ``Q`` (d', d) and ``V`` (k'', k')
    orthonormal columns (as in the infinite-task coordinates, read backwards): every
    ground-truth measure and every nonzero singular value is unchanged."""
    B_star = frame()
    B = low_rank(B_star, width, rank, 0.4, seed=width + rank)
    rng = np.random.default_rng(width)
    Q = random_orthonormal(14, 9, rng)
    V = random_orthonormal(width + 3, width, rng)
    problem = Problem(B_star, np.eye(3), 1.0)
    moved = Problem(Q @ B_star, np.eye(3), 1.0)
    Lambda = np.diag([1.0, 2.0, 3.0])
    ours = measure(LinearParams(B, np.ones(width)), problem, Lambda)
    theirs = measure(LinearParams(Q @ B @ V.T, V @ np.ones(width)), moved, Lambda)
    for key in TRUTH_MEASURES:
        assert theirs[key] == pytest.approx(ours[key], abs=1e-12), key
    assert theirs["head_norm"] == pytest.approx(ours["head_norm"], rel=1e-12)
    for i in range(1, rank + 1):
        assert theirs[f"sv_{i}"] == pytest.approx(ours[f"sv_{i}"], rel=1e-12)


@pytest.mark.parametrize("width", [2, 3, 12])
def test_perp_norms_with_explicit_orthogonal_complement(width):
    B_star = frame()
    B = near(B_star, width, 0.4, seed=width)
    B_perp = scipy.linalg.null_space(B_star.T)  # d x (d - k), orthonormal columns
    assert B_perp.shape == (9, 6)
    spectral, frobenius = perp_norms(B, B_star)
    assert spectral == pytest.approx(np.linalg.norm(B_perp.T @ B, 2), rel=1e-12)
    assert frobenius == pytest.approx(np.linalg.norm(B_perp.T @ B, "fro"), rel=1e-12)
    assert perp_norms(B_star @ B_star.T @ B, B_star)[1] < 1e-14


def test_lambda_error_and_singular_values():
    B_star = frame()
    B = near(B_star, 5, 0.2)
    Lambda = np.diag([1.0, 2.0, 3.0])
    gram = B_star.T @ B @ B.T @ B_star
    expected = np.max(np.abs(np.linalg.eigvalsh(gram - Lambda)))
    assert lambda_error(B, B_star, Lambda) == pytest.approx(expected, rel=1e-12)
    np.testing.assert_allclose(singular_values(B), scipy.linalg.svdvals(B), rtol=1e-12)
    U = top_left_singular_vectors(B, 3)
    assert U.shape == (9, 3)
    np.testing.assert_allclose(U.T @ U, np.eye(3), atol=1e-13)
    assert top_left_singular_vectors(B[:, :2], 3).shape == (9, 2)


def test_measure_keys_and_values():
    B_star = frame()
    problem = Problem(B_star, np.eye(3), 1.0)
    params = LinearParams(near(B_star, 5, 0.2), np.arange(5.0))
    Lambda = np.eye(3)
    values = measure(params, problem, Lambda)
    assert list(values)[:7] == [name for name in BASE_MEASURES if name != "train_loss"]
    assert list(values)[:6] == list(TRUTH_MEASURES)
    assert [key for key in values if key.startswith("sv_")] == [f"sv_{i}" for i in range(1, 6)]
    assert values["head_norm"] == pytest.approx(np.linalg.norm(np.arange(5.0)))
    assert values["subspace_dist"] == pytest.approx(scipy_distance(params.B, B_star), abs=1e-12)
    np.testing.assert_allclose([values[name] for name in ("subspace_dist", "span_outside",
                                                          "span_missed")],
                               scipy_reference(params.B, B_star), rtol=0, atol=1e-12)
    assert values["perp_norm"] == pytest.approx(perp_norms(params.B, B_star)[0])
    assert values["lambda_err"] == pytest.approx(lambda_error(params.B, B_star, Lambda))
    assert values["sv_1"] == pytest.approx(scipy.linalg.svdvals(params.B)[0])


def test_measure_without_ground_truth_and_in_float32():
    B_star = frame()
    params = LinearParams(near(B_star, 4, 0.2).astype(np.float32), np.ones(4, np.float32))
    values = measure(params, None, None)
    for name in TRUTH_MEASURES:
        assert np.isnan(values[name])
    assert values["head_norm"] == pytest.approx(2.0)
    truth = measure(params, Problem(B_star, np.eye(3), 1.0), None)
    assert np.isnan(truth["lambda_err"]) and np.isfinite(truth["subspace_dist"])
    assert np.isfinite(truth["span_outside"]) and np.isfinite(truth["span_missed"])
    assert all(isinstance(value, float) for value in truth.values())
