"""metarep.core.measures against independent computations (scipy's principal angles, an explicit
orthonormal complement B_perp from scipy.linalg.null_space, plain definitions)."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.linalg

from metarep.core.measures import (
    BASE_MEASURES,
    lambda_error,
    measure,
    perp_norms,
    singular_values,
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


def scipy_distance(B: np.ndarray, B_star: np.ndarray) -> float:
    """sin of the largest principal angle between span(B_star) and the top-k left singular
    vectors of B (all of span(B) when k' <= k)."""
    k = B_star.shape[1]
    U, _, _ = scipy.linalg.svd(B, full_matrices=False)
    return float(np.sin(np.max(scipy.linalg.subspace_angles(B_star, U[:, :k]))))


@pytest.mark.parametrize("width", [1, 2, 3, 5, 9, 14])
@pytest.mark.parametrize("noise", [0.01, 0.3, 3.0])
def test_subspace_distance_agrees_with_scipy_principal_angles(width, noise):
    """k' < k, k' = k and k' > k (k = 3), near and far from span(B_star)."""
    B_star = frame()
    B = near(B_star, width, noise, seed=width)
    assert subspace_distance(B, B_star) == pytest.approx(scipy_distance(B, B_star), abs=1e-12)


def test_subspace_distance_extremes():
    B_star = frame()
    inside = B_star @ np.random.default_rng(2).standard_normal((3, 3))
    assert subspace_distance(inside, B_star) < 1e-12
    null = scipy.linalg.null_space(B_star.T)
    assert subspace_distance(null[:, :3], B_star) == pytest.approx(1.0, abs=1e-12)
    # The top-k directions decide, not small extra ones outside span(B_star).
    extra = np.concatenate([inside, 1e-3 * null[:, :4]], axis=1)
    assert subspace_distance(extra, B_star) < 1e-10


def test_subspace_distance_is_invariant_to_rotating_the_columns():
    B_star = frame()
    B = near(B_star, 6, 0.5)
    mix = np.random.default_rng(3).standard_normal((6, 6))
    rotation, _ = np.linalg.qr(mix)
    assert subspace_distance(B @ rotation, B_star) == pytest.approx(
        subspace_distance(B, B_star), abs=1e-12)


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
    assert list(values)[:5] == [name for name in BASE_MEASURES if name != "train_loss"]
    assert [key for key in values if key.startswith("sv_")] == [f"sv_{i}" for i in range(1, 6)]
    assert values["head_norm"] == pytest.approx(np.linalg.norm(np.arange(5.0)))
    assert values["subspace_dist"] == pytest.approx(scipy_distance(params.B, B_star), abs=1e-12)
    assert values["perp_norm"] == pytest.approx(perp_norms(params.B, B_star)[0])
    assert values["lambda_err"] == pytest.approx(lambda_error(params.B, B_star, Lambda))
    assert values["sv_1"] == pytest.approx(scipy.linalg.svdvals(params.B)[0])


def test_measure_without_ground_truth_and_in_float32():
    B_star = frame()
    params = LinearParams(near(B_star, 4, 0.2).astype(np.float32), np.ones(4, np.float32))
    values = measure(params, None, None)
    for name in ("perp_norm", "perp_norm_fro", "subspace_dist", "lambda_err"):
        assert np.isnan(values[name])
    assert values["head_norm"] == pytest.approx(2.0)
    truth = measure(params, Problem(B_star, np.eye(3), 1.0), None)
    assert np.isnan(truth["lambda_err"]) and np.isfinite(truth["subspace_dist"])
    assert all(isinstance(value, float) for value in truth.values())
