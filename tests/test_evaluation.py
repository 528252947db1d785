"""metarep.core.evaluation against closed forms and brute-force simulations.

Monte Carlo means are compared with exact values (or with an independent simulation) in units
of their standard errors, allowing ``Z_MAX``; seeds are fixed, so the tests are deterministic.
"""

from __future__ import annotations

import numpy as np
import pytest

from metarep.core import evaluation
from metarep.core.evaluation import (
    adapted_and_oracle_risks,
    evaluate,
    fit_least_squares,
    regression_risks,
    representation_basis,
)
from metarep.core.model import LinearParams
from metarep.core.problem import Problem, make_problem, random_orthonormal
from metarep.core.tasks import sample_heads
from metarep.core.theory import least_squares_risk

Z_MAX = 5.0


def z_score(mean, stderr, expected) -> float:
    return float((mean - expected) / stderr)


def two_sample_z(a: np.ndarray, b: np.ndarray) -> float:
    se = np.sqrt(a.var(ddof=1) / a.size + b.var(ddof=1) / b.size)
    return float((a.mean() - b.mean()) / se)


def problem_of(d=8, k=2, noise_var=1.5, head_cov="linear", seed=0) -> Problem:
    return make_problem(d, k, noise_var, head_cov, np.random.default_rng(seed))


def learned(problem: Problem, width=5, outside=0.3, head=0.4, seed=1) -> LinearParams:
    """A representation partly inside span(B_star), with a part outside of size ``outside``."""
    rng = np.random.default_rng(seed)
    B = (problem.B_star @ rng.standard_normal((problem.k, width))
         + outside * rng.standard_normal((problem.d, width)) / np.sqrt(problem.d))
    return LinearParams(B, head * rng.standard_normal(width))


def exact_one_step_risk(params: LinearParams, problem: Problem, m: int, alpha: float) -> float:
    """``E ||B w' - B_star w_star||^2`` after one head step from ``w`` with ``m`` samples.

    With ``P = B B^T``, ``S = X^T X / m`` and ``c = B w - B_star w_star`` (second moment
    ``C = B w w^T B^T + B_star Sigma_star B_star^T``):
    ``B w' - B_star w_star = (I - alpha P S) c + alpha P X^T eps / m``, and by
    ``E[S C S] = C + (C + tr(C) I) / m`` the expectation is
    ``tr C - 2 alpha tr(P C) + alpha^2 ((1 + 1/m) tr(P C P) + (tr C + sigma^2) tr(P^2) / m)``.
    """
    B, w = params
    P = B @ B.T
    u = B @ w
    C = np.outer(u, u) + problem.B_star @ problem.Sigma_star @ problem.B_star.T
    trace_C = np.trace(C)
    return float(trace_C - 2 * alpha * np.trace(P @ C)
                 + alpha**2 * ((1 + 1 / m) * np.trace(P @ C @ P)
                               + (trace_C + problem.noise_var) * np.trace(P @ P) / m))


def brute_force_adapted_risks(params, problem, m, n, alpha, steps, rng) -> np.ndarray:
    """The method's risk simulated in all d coordinates, one explicit step formula."""
    B, w = params
    w_star = sample_heads(problem, n, rng)
    X = rng.standard_normal((n, m, problem.d))
    beta_star = w_star @ problem.B_star.T  # (n, d)
    y = np.einsum("nmd,nd->nm", X, beta_star) + np.sqrt(problem.noise_var) * rng.standard_normal(
        (n, m))
    heads = np.tile(w, (n, 1))
    for _ in range(steps):
        residual = np.einsum("nmd,nd->nm", X, heads @ B.T) - y
        heads = heads - alpha * np.einsum("nmd,nm->nd", X, residual) @ B / m
    return np.sum((heads @ B.T - beta_star) ** 2, axis=1)


# ----------------------------------------------------------------------------- least squares


@pytest.mark.parametrize(("m", "p"), [(9, 4), (4, 4), (3, 7)])
def test_fit_least_squares_without_penalty_is_lstsq(m, p):
    """Primal (m > p), square and dual (m <= p: the minimum-norm interpolator)."""
    rng = np.random.default_rng(m * 10 + p)
    F, y = rng.standard_normal((6, m, p)), rng.standard_normal((6, m))
    fitted = fit_least_squares(F, y, 0.0)
    assert fitted.shape == (6, p)
    for i in range(6):
        expected = np.linalg.lstsq(F[i], y[i], rcond=None)[0]
        np.testing.assert_allclose(fitted[i], expected, rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize(("m", "p"), [(9, 4), (3, 7)])
def test_fit_least_squares_ridge_is_augmented_lstsq(m, p):
    """``argmin ||F b - y||^2 + lambda ||b||^2`` = lstsq of ``[F; sqrt(lambda) I]``."""
    rng = np.random.default_rng(m + p)
    F, y, penalty = rng.standard_normal((5, m, p)), rng.standard_normal((5, m)), 0.7
    fitted = fit_least_squares(F, y, penalty)
    for i in range(5):
        augmented = np.vstack([F[i], np.sqrt(penalty) * np.eye(p)])
        expected = np.linalg.lstsq(augmented, np.concatenate([y[i], np.zeros(p)]),
                                   rcond=None)[0]
        np.testing.assert_allclose(fitted[i], expected, rtol=1e-10, atol=1e-12)


# ----------------------------------------------------------------------------- reduced basis


@pytest.mark.parametrize(
    "B_of",
    [
        lambda B_star, rng: rng.standard_normal((10, 4)),
        lambda B_star, rng: B_star @ rng.standard_normal((3, 6)),  # inside span(B_star)
        lambda B_star, rng: np.hstack([B_star @ rng.standard_normal((3, 5)),
                                       1e-9 * rng.standard_normal((10, 2))]),
        lambda B_star, rng: rng.standard_normal((10, 25)),  # k' > d
        lambda B_star, rng: np.zeros((10, 3)),
    ],
    ids=["generic", "inside", "nearly-inside", "wide", "zero"],
)
def test_representation_basis_is_orthonormal_starts_with_B_star_and_spans_B(B_of):
    rng = np.random.default_rng(0)
    B_star = random_orthonormal(10, 3, rng)
    B = B_of(B_star, rng)
    Q = representation_basis(B, B_star)
    assert 3 <= Q.shape[1] <= min(10, 3 + B.shape[1])
    np.testing.assert_allclose(Q.T @ Q, np.eye(Q.shape[1]), atol=1e-12)
    np.testing.assert_array_equal(Q[:, :3], B_star)
    np.testing.assert_allclose(Q @ (Q.T @ B), B, atol=1e-12 * max(1.0, np.abs(B).max()))


# ----------------------------------------------------------------------------- reference rows


def test_oracle_and_regression_rows_match_least_squares_closed_forms():
    """Least squares with m >= dim + 6 (finite variance): sigma^2 dim / (m - dim - 1)."""
    problem = problem_of(d=8, k=2, noise_var=1.5)
    params = learned(problem)
    rows = evaluate(params, problem, "fo-anil", (10, 16, 30), 6000, 0.3, 1, seed=5)
    assert [row.method for row in rows] == ["fo-anil", "oracle", "regression"] * 3
    for row in rows:
        dim = {"oracle": 2, "regression": 8}.get(row.method)
        if dim is None:  # the method: metarep.core.theory.one_step_risk (tested in test_theory.py)
            assert abs(z_score(row.excess_risk, row.stderr, row.theory)) <= Z_MAX, row
            continue
        theory = least_squares_risk(row.shots, dim, 1.5)
        if row.shots >= dim + 6:
            assert row.theory == pytest.approx(1.5 * dim / (row.shots - dim - 1))
            assert abs(z_score(row.excess_risk, row.stderr, theory)) <= Z_MAX, row
        assert row.n_tasks == 6000 and row.stderr > 0


def test_ridge_rows_where_least_squares_has_no_finite_risk():
    """m < dim + 2: ridge with lambda = sigma^2 dim / tr(Sigma_star) (no closed form in the
    table); checked against a brute-force ridge simulation in d dimensions."""
    problem = problem_of(d=8, k=2, noise_var=1.5)
    rows = evaluate(learned(problem), problem, "fo-anil", (3, 6), 6000, 0.3, 1, seed=6)
    rng = np.random.default_rng(99)
    for row in rows:
        if row.method == "fo-anil":
            continue
        dim = 2 if row.method == "oracle" else 8
        if row.shots >= dim + 2:
            continue
        assert np.isnan(row.theory)
        penalty = 1.5 * dim / np.trace(problem.Sigma_star)
        basis = problem.B_star if dim == 2 else np.eye(8)
        w_star = sample_heads(problem, 6000, rng)
        target = w_star @ problem.B_star.T @ basis  # the regressor in the fitted coordinates
        X = rng.standard_normal((6000, row.shots, dim))
        y = np.einsum("nmd,nd->nm", X, target) + np.sqrt(1.5) * rng.standard_normal(
            (6000, row.shots))
        fitted = np.stack([np.linalg.solve(x.T @ x + penalty * np.eye(dim), x.T @ t)
                           for x, t in zip(X, y, strict=True)])
        brute = np.sum((fitted - target) ** 2, axis=1)
        se = np.hypot(row.stderr, brute.std(ddof=1) / np.sqrt(brute.size))
        assert abs(row.excess_risk - brute.mean()) <= Z_MAX * se, row


@pytest.mark.parametrize("m", [4, 12, 40])
def test_one_step_adapted_risk_matches_its_closed_form(m):
    problem = problem_of(d=8, k=3, noise_var=2.0)
    params = learned(problem, width=6, outside=0.5)
    alpha = 0.4
    method, _ = adapted_and_oracle_risks(params, problem, m, 20000, alpha, 1,
                                         np.random.default_rng(m))
    expected = exact_one_step_risk(params, problem, m, alpha)
    z = z_score(method.mean(), method.std(ddof=1) / np.sqrt(method.size), expected)
    assert abs(z) <= Z_MAX, (method.mean(), expected)


def test_zero_adaptation_risk_matches_its_closed_form():
    """No step: ``E ||B w - B_star w_star||^2 = ||B w||^2 + tr(Sigma_star)``."""
    problem = problem_of()
    params = learned(problem)
    rows = evaluate(params, problem, "m", (5,), 20000, 0.3, 0, seed=1)
    expected = np.sum((params.B @ params.w) ** 2) + np.trace(problem.Sigma_star)
    assert abs(z_score(rows[0].excess_risk, rows[0].stderr, expected)) <= Z_MAX


@pytest.mark.parametrize("steps", [1, 3])
def test_reduced_simulation_matches_brute_force_in_d_dimensions(steps):
    """The method row (simulated in span(B_star, B)) against an explicit full-d simulation:
    two-sample z-test on independent draws."""
    problem = problem_of(d=12, k=2, noise_var=1.0)
    params = learned(problem, width=4, outside=0.8, head=0.6)
    m, n, alpha = 7, 20000, 0.25
    rows = evaluate(params, problem, "m", (m,), n, alpha, steps, seed=2)
    brute = brute_force_adapted_risks(params, problem, m, n, alpha, steps,
                                      np.random.default_rng(3))
    se = np.hypot(rows[0].stderr, brute.std(ddof=1) / np.sqrt(n))
    assert abs(rows[0].excess_risk - brute.mean()) <= Z_MAX * se


def test_oracle_risk_is_unaffected_by_the_representation():
    """The oracle row only depends on B_star: the same for two different representations
    (common random numbers give the same draws when span(B_star, B) has the same dimension)."""
    problem = problem_of()
    first = adapted_and_oracle_risks(learned(problem, seed=1), problem, 9, 50, 0.3, 1,
                                     np.random.default_rng(0))[1]
    second = adapted_and_oracle_risks(learned(problem, seed=2), problem, 9, 50, 0.3, 1,
                                      np.random.default_rng(0))[1]
    np.testing.assert_allclose(first, second, rtol=1e-12)


def test_regression_budget_caps_the_number_of_tasks(monkeypatch):
    problem = problem_of()
    monkeypatch.setattr(evaluation, "REGRESSION_BUDGET", 20 * 10 * 8)
    assert regression_risks(problem, 10, 500, np.random.default_rng(0)).shape == (20,)
    monkeypatch.setattr(evaluation, "REGRESSION_BUDGET", 1)
    assert regression_risks(problem, 10, 500, np.random.default_rng(0)).shape == (2,)


def test_evaluate_is_deterministic_and_chunking_does_not_change_the_numbers(monkeypatch):
    problem = problem_of()
    params = learned(problem)
    first = evaluate(params, problem, "m", (5, 9), 300, 0.3, 2, seed=4)
    assert first == evaluate(params, problem, "m", (5, 9), 300, 0.3, 2, seed=4)
    assert first != evaluate(params, problem, "m", (5, 9), 300, 0.3, 2, seed=5)
    monkeypatch.setattr(evaluation, "CHUNK_ENTRIES", 9 * 7 * 50)  # several chunks per m_test
    chunked = evaluate(params, problem, "m", (5, 9), 300, 0.3, 2, seed=4)
    assert [row.n_tasks for row in chunked] == [300] * 6
    for a, b in zip(first, chunked, strict=True):
        assert (a.method, a.shots) == (b.method, b.shots)
        assert abs(a.excess_risk - b.excess_risk) <= Z_MAX * np.hypot(a.stderr, b.stderr)


def test_float32_parameters_are_evaluated_in_float64():
    problem = problem_of()
    params = learned(problem)
    narrow = LinearParams(params.B.astype(np.float32), params.w.astype(np.float32))
    wide_rows = evaluate(params, problem, "m", (6,), 200, 0.3, 1, seed=0)
    narrow_rows = evaluate(narrow, problem, "m", (6,), 200, 0.3, 1, seed=0)
    assert narrow_rows[0].excess_risk == pytest.approx(wide_rows[0].excess_risk, rel=1e-5)
