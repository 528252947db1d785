"""Closed forms of metarep.core.theory against brute-force Monte Carlo in d dimensions (z-tests over
1e5 fresh tasks), against the same formulas written in d-dimensional matrix form, and the
predicted limits against the exact infinite-task dynamics."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
from zstats import assert_z

from metarep.core import infinite
from metarep.core.evaluation import adapted_and_oracle_risks, fit_least_squares
from metarep.core.model import LinearParams
from metarep.core.problem import Problem, make_problem, random_orthonormal
from metarep.core.tasks import sample_heads
from metarep.core.theory import (
    adapted_risk,
    baseline_risk,
    lambda_star,
    one_step_risk,
    predicted_limits,
)

N_TASKS = 100_000


def problem_of(d: int, k: int, noise_var: float, seed: int = 0) -> Problem:
    return make_problem(d, k, noise_var, "linear", np.random.default_rng(seed))


def brute_force_one_step(B, w, problem, m, alpha, n_tasks, rng, chunk=10_000) -> np.ndarray:
    """Risks ||B w' - B_star w_star||^2 of one head step on fresh tasks, all in R^d."""
    risks = []
    for start in range(0, n_tasks, chunk):
        n = min(chunk, n_tasks - start)
        target = sample_heads(problem, n, rng) @ problem.B_star.T  # (n, d)
        X = rng.standard_normal((n, m, problem.d))
        y = np.einsum("nmd,nd->nm", X, target) + np.sqrt(problem.noise_var) * (
            rng.standard_normal((n, m)))
        residual = X @ (B @ w) - y
        heads = w - alpha * np.einsum("nmd,nm->nd", X, residual) @ B / m
        risks.append(np.sum((heads @ B.T - target) ** 2, axis=1))
    return np.concatenate(risks)


def matrix_form(B, w, problem, m, alpha) -> float:
    """The same expectation with d x d matrices: P = B B^T, A = E[v v^T] for
    v = B w - B_star w_star, risk = tr A - 2 alpha tr(P A) + alpha^2 ((1 + 1/m) tr(P A P)
    + (tr A + sigma^2) tr(P^2) / m)."""
    inv_m = 0.0 if math.isinf(m) else 1 / m
    P, u = B @ B.T, B @ w
    A = np.outer(u, u) + problem.B_star @ problem.Sigma_star @ problem.B_star.T
    return float(np.trace(A) - 2 * alpha * np.trace(P @ A) + alpha**2 * (
        (1 + inv_m) * np.trace(P @ A @ P) + (np.trace(A) + problem.noise_var)
        * np.trace(P @ P) * inv_m))


@pytest.mark.parametrize("m", [1, 3, 20])
def test_one_step_risk_matches_monte_carlo(m):
    problem = problem_of(7, 2, noise_var=0.8)
    rng = np.random.default_rng(m)
    B, w = 0.5 * rng.standard_normal((7, 4)), 0.5 * rng.standard_normal(4)
    closed = one_step_risk(LinearParams(B, w), problem, m, 0.4)
    assert closed == pytest.approx(matrix_form(B, w, problem, m, 0.4), rel=1e-12)
    risks = brute_force_one_step(B, w, problem, m, 0.4, N_TASKS, rng)
    assert_z(risks.mean(), risks.std(ddof=1) / np.sqrt(risks.size), closed, f"m = {m}")
    wrong = one_step_risk(LinearParams(B, w), problem, math.inf, 0.4)
    assert abs(risks.mean() - wrong) > 10 * risks.std(ddof=1) / np.sqrt(risks.size)


def test_one_step_risk_with_infinitely_many_samples_is_the_deterministic_step():
    """m = inf: w' = w - alpha B^T (B w - B_star w_star) exactly, so the risk is
    ||(I - alpha B B^T) B w||^2 + tr((I - alpha B B^T) B_star Sigma B_star^T (I - ...)^T)."""
    problem = problem_of(6, 3, noise_var=2.0)
    rng = np.random.default_rng(1)
    B, w = rng.standard_normal((6, 5)), rng.standard_normal(5)
    shrink = np.eye(6) - 0.3 * B @ B.T
    expected = (np.sum((shrink @ B @ w) ** 2)
                + np.trace(shrink @ problem.B_star @ problem.Sigma_star @ problem.B_star.T
                           @ shrink.T))
    got = one_step_risk(LinearParams(B, w), problem, math.inf, 0.3)
    assert got == pytest.approx(expected, rel=1e-12)
    assert matrix_form(B, w, problem, math.inf, 0.3) == pytest.approx(expected, rel=1e-12)


def test_adapted_risk_for_zero_one_and_more_steps():
    problem = problem_of(6, 2, noise_var=0.5)
    rng = np.random.default_rng(2)
    B, w = rng.standard_normal((6, 3)), rng.standard_normal(3)
    params, args = LinearParams(B, w), (problem, 10, 0.2)
    assert adapted_risk(params, *args, steps=0) == pytest.approx(
        np.sum((B @ w) ** 2) + np.trace(problem.Sigma_star))
    assert adapted_risk(params, *args, steps=1) == one_step_risk(params, *args)
    assert math.isnan(adapted_risk(params, *args, steps=2))


def test_the_meta_training_loss_is_the_one_step_risk_with_m_in_samples():
    """2 L - sigma^2 = one-step risk with m_in samples (population loss vs theory)."""
    problem = problem_of(8, 2, noise_var=0.6)
    rng = np.random.default_rng(3)
    params = LinearParams(0.6 * rng.standard_normal((8, 5)), 0.4 * rng.standard_normal(5))
    for m_in in (2, 7, math.inf):
        _, loss = infinite.expected_update(params, problem, 0.35, 0.1, m_in)
        risk = one_step_risk(params, problem, m_in, 0.35)
        assert 2 * loss - 0.6 == pytest.approx(risk, rel=1e-10)


# ----------------------------------------------------------------------------- baselines


@pytest.mark.parametrize(("m", "dim"), [(8, 2), (12, 5)])
def test_least_squares_baseline_matches_monte_carlo(m, dim):
    problem = problem_of(dim, dim, noise_var=1.3)
    rng = np.random.default_rng(m)
    heads = sample_heads(problem, N_TASKS, rng)
    X = rng.standard_normal((N_TASKS, m, dim))
    y = np.einsum("nmd,nd->nm", X, heads) + np.sqrt(1.3) * rng.standard_normal((N_TASKS, m))
    risks = np.sum((fit_least_squares(X, y, 0.0) - heads) ** 2, axis=1)
    closed = baseline_risk(m, dim, problem)
    assert closed == pytest.approx(1.3 * dim / (m - dim - 1))
    assert_z(risks.mean(), risks.std(ddof=1) / np.sqrt(N_TASKS), closed, "least squares")


def test_noiseless_minimum_norm_interpolation_baseline():
    """sigma^2 = 0, m < dim: the fit is the projection of the target onto the row space of X,
    a uniform m-dimensional subspace: risk tr(Sigma) (1 - m / dim); 0 once m >= dim."""
    problem = problem_of(6, 6, noise_var=0.0)
    rng = np.random.default_rng(4)
    heads = sample_heads(problem, N_TASKS, rng)
    X = rng.standard_normal((N_TASKS, 3, 6))
    y = np.einsum("nmd,nd->nm", X, heads)
    risks = np.sum((fit_least_squares(X, y, 0.0) - heads) ** 2, axis=1)
    closed = baseline_risk(3, 6, problem)
    assert closed == pytest.approx(np.trace(problem.Sigma_star) / 2)
    assert_z(risks.mean(), risks.std(ddof=1) / np.sqrt(N_TASKS), closed, "min-norm")
    assert baseline_risk(6, 6, problem) == 0.0
    noisy = dataclasses.replace(problem, noise_var=0.1)
    assert math.isnan(baseline_risk(5, 6, noisy))  # ridge: no closed form


# ----------------------------------------------------------------------------- limits


def limit_state(Lambda: np.ndarray, width: int, d: int, seed: int) -> LinearParams:
    """A representation at the predicted limit: B = B_star C with C C^T = Lambda, w = 0
    (embedded with B_star = first k coordinates)."""
    k = Lambda.shape[0]
    values, vectors = np.linalg.eigh(Lambda)
    C = (vectors * np.sqrt(values)) @ vectors.T @ random_orthonormal(width, k,
                                                                    np.random.default_rng(seed)).T
    B = np.zeros((d, width))
    B[:k] = C
    return LinearParams(B, np.zeros(width))


@pytest.mark.parametrize("m_in", [4, 25, math.inf])
def test_the_predicted_limit_is_a_fixed_point_with_the_predicted_loss(m_in):
    Sigma, noise, alpha = np.diag([0.5, 1.0, 1.5]), 0.7, 0.6
    problem = Problem(np.eye(9, 3), Sigma, noise)
    limits = predicted_limits(problem, m_in, alpha, shots=(5, 50))
    Lambda = limits["Lambda_star"]
    np.testing.assert_array_equal(Lambda, lambda_star(problem, m_in, alpha))
    state = limit_state(Lambda, width=5, d=9, seed=int(min(m_in, 99)))
    update, loss = infinite.expected_update(state, problem, alpha, 0.4, m_in)
    assert np.abs(update.B).max() < 1e-12 and np.abs(update.w).max() == 0
    assert limits["train_loss"] == pytest.approx(loss, rel=1e-12)
    assert limits["perp_norm"] == (None if math.isinf(m_in) else 0.0)
    assert limits["head_norm"] == limits["lambda_err"] == limits["subspace_dist"] == 0.0
    if math.isinf(m_in):
        np.testing.assert_allclose(alpha * Lambda, np.eye(3), atol=1e-15)
        assert limits["train_loss"] == pytest.approx(noise / 2)


def test_predicted_test_risk_at_the_limit_matches_monte_carlo():
    Sigma, noise, alpha, m_in = np.diag([0.5, 1.0, 1.5]), 0.7, 0.6, 10
    problem = Problem(np.eye(9, 3), Sigma, noise)
    limits = predicted_limits(problem, m_in, alpha, shots=(3, 30))
    state = limit_state(limits["Lambda_star"], width=5, d=9, seed=7)
    for m, expected in limits["test_risk"].items():
        risks, _ = adapted_and_oracle_risks(state, problem, m, N_TASKS, alpha, 1,
                                            np.random.default_rng(m))
        assert_z(risks.mean(), risks.std(ddof=1) / np.sqrt(N_TASKS), expected, f"limit m={m}")


def test_alpha_lambda_star_tends_to_identity_as_m_in_grows():
    problem = Problem(np.eye(2), np.diag([1.0, 3.0]), 2.0)
    for m_in, tolerance in ((1e3, 1e-2), (1e6, 1e-5)):
        error = np.abs(0.5 * lambda_star(problem, m_in, 0.5) - np.eye(2)).max()
        assert error < tolerance
