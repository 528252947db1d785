"""metarep.core.evaluation against closed forms and brute-force simulations.

Monte Carlo means are compared with exact values (or with an independent simulation) in units
of their standard errors, allowing ``Z_MAX``; seeds are fixed, so the tests are deterministic.
"""

from __future__ import annotations

import dataclasses
import itertools
import tracemalloc

import numpy as np
import pytest
from scipy import stats

from metarep.core import evaluation, reference
from metarep.core.evaluation import (
    BAYES_ORACLE,
    ORACLE_LSQ,
    REGRESSION_LSQ,
    RIDGE,
    adapted_and_oracle_risks,
    evaluate,
    fit_least_squares,
    posterior_mean,
    regression_risks,
    representation_basis,
    ridge_risks,
)
from metarep.core.model import LinearParams
from metarep.core.problem import Problem, make_problem, random_orthonormal
from metarep.core.tasks import sample_heads, sample_tasks
from metarep.core.theory import lambda_star, least_squares_risk, ridge_penalty, ridge_risk

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


def rows_named(rows, name: str) -> list:
    return [row for row in rows if row.method == name]


def brute_force_posterior(problem: Problem, m: int, n: int, rng) -> tuple[np.ndarray, np.ndarray]:
    """The Bayes oracle per task in all d coordinates, one explicit formula: the prior of
    ``beta = B_star w_star`` is ``N(0, C)``, ``C = B_star Sigma_star B_star^T`` (d x d, rank k),
    the posterior mean ``C X^T (X C X^T + sigma^2 I)^{-1} y`` and the posterior covariance
    ``C - C X^T (X C X^T + sigma^2 I)^{-1} X C``. **Returns** the risks
    ``||beta_hat - beta||^2`` and the posterior variances (the trace: the risk's expectation
    given ``X``), (n,) each."""
    C = problem.B_star @ problem.Sigma_star @ problem.B_star.T
    beta = sample_heads(problem, n, rng) @ problem.B_star.T
    X = rng.standard_normal((n, m, problem.d))
    y = np.einsum("nmd,nd->nm", X, beta) + np.sqrt(problem.noise_var) * rng.standard_normal(
        (n, m))
    risks, variances = np.empty(n), np.empty(n)
    for i in range(n):
        gain = C @ X[i].T @ np.linalg.inv(X[i] @ C @ X[i].T + problem.noise_var * np.eye(m))
        risks[i] = np.sum((gain @ y[i] - beta[i]) ** 2)
        variances[i] = np.trace(C - gain @ X[i] @ C)
    return risks, variances


def assert_same_mean(row, samples: np.ndarray) -> None:
    """Two-sample z-test of a row against independent draws of the same quantity."""
    se = np.hypot(row.stderr, samples.std(ddof=1) / np.sqrt(samples.size))
    assert abs(row.excess_risk - samples.mean()) <= Z_MAX * se, (row, samples.mean(), se)


def test_reference_rows_error_bars_and_least_squares_closed_forms():
    """bayes-oracle and ridge at every m; the least-squares rows only where m >= dim + 2, with
    stderr nan exactly at dim + 2 and dim + 3 (infinite variance of the risk) and the closed form
    sigma^2 dim / (m - dim - 1), matched by Monte Carlo where m >= dim + 6 (finite variance)."""
    problem = problem_of(d=8, k=2, noise_var=1.5)
    shots = (3, 4, 5, 6, 9, 10, 11, 12, 16, 30)
    rows = evaluate(learned(problem), problem, "fo-anil", shots, 6000, 0.3, 1, seed=5)
    for m in shots:
        assert [row.method for row in rows if row.shots == m] == [
            "fo-anil", BAYES_ORACLE, *([ORACLE_LSQ] if m >= 4 else []), RIDGE,
            *([REGRESSION_LSQ] if m >= 10 else [])]
    for row in rows:
        assert row.n_tasks == 6000
        dim = {ORACLE_LSQ: 2, REGRESSION_LSQ: 8}.get(row.method)
        if row.method == "fo-anil":  # metarep.core.theory.one_step_risk (test_theory.py)
            assert abs(z_score(row.excess_risk, row.stderr, row.theory)) <= Z_MAX, row
        elif dim is None:  # bayes-oracle, ridge with noise: no closed form
            assert np.isnan(row.theory) and row.stderr > 0, row
        else:
            assert row.theory == pytest.approx(1.5 * dim / (row.shots - dim - 1))
            assert row.theory == least_squares_risk(row.shots, dim, 1.5)
            assert np.isnan(row.stderr) == (row.shots in (dim + 2, dim + 3)), row
            if row.shots >= dim + 6:
                assert abs(z_score(row.excess_risk, row.stderr, row.theory)) <= Z_MAX, row


@pytest.mark.parametrize(("head_cov", "noise_var", "m"), [
    ("linear", 1.5, 1), ("linear", 1.5, 2), ("linear", 1.5, 5), ("linear", 1.5, 12),
    ("isotropic", 0.5, 3), ((0.2, 1.0, 3.0), 2.0, 4),
])
def test_bayes_oracle_matches_a_brute_force_posterior_mean_in_d_dimensions(head_cov, noise_var,
                                                                           m):
    """The bayes-oracle row (whitened, in k reduced coordinates) against the posterior mean
    computed per task in d dimensions, and against the mean posterior variance (the Bayes risk
    is E tr(posterior covariance)): two-sample z-tests on independent draws."""
    problem = make_problem(8, 3, noise_var, head_cov, np.random.default_rng(0))
    (row,) = rows_named(evaluate(learned(problem), problem, "m", (m,), 6000, 0.3, 1, seed=m),
                        BAYES_ORACLE)
    risks, variances = brute_force_posterior(problem, m, 4000, np.random.default_rng(50 + m))
    assert_same_mean(row, risks)
    assert_same_mean(row, variances)


def test_posterior_mean_is_the_primal_and_the_dual_formula():
    """``(Z^T Z + sigma^2 Sigma^{-1})^{-1} Z^T y = Sigma Z^T (Z Sigma Z^T + sigma^2 I)^{-1} y``;
    with sigma^2 = 0: the interpolator of least ``w^T Sigma^{-1} w`` for m < k, least squares
    for m >= k."""
    rng = np.random.default_rng(0)
    problem = make_problem(7, 4, 0.8, (0.3, 1.0, 2.0, 5.0), rng)
    Sigma = problem.Sigma_star
    for m in (2, 4, 9):
        Z, y = rng.standard_normal((3, m, 4)), rng.standard_normal((3, m))
        got = posterior_mean(Z, y, problem)
        for i in range(3):
            primal = np.linalg.solve(Z[i].T @ Z[i] + 0.8 * np.linalg.inv(Sigma), Z[i].T @ y[i])
            dual = Sigma @ Z[i].T @ np.linalg.solve(Z[i] @ Sigma @ Z[i].T + 0.8 * np.eye(m), y[i])
            np.testing.assert_allclose(got[i], primal, rtol=1e-9, atol=1e-12)
            np.testing.assert_allclose(got[i], dual, rtol=1e-9, atol=1e-12)
        noiseless = posterior_mean(Z, y, dataclasses.replace(problem, noise_var=0.0))
        for i in range(3):
            if m < 4:
                np.testing.assert_allclose(Z[i] @ noiseless[i], y[i], atol=1e-10)
                expected = Sigma @ Z[i].T @ np.linalg.solve(Z[i] @ Sigma @ Z[i].T, y[i])
            else:
                expected = np.linalg.lstsq(Z[i], y[i], rcond=None)[0]
            np.testing.assert_allclose(noiseless[i], expected, rtol=1e-9, atol=1e-11)
            # any other interpolator has a larger Sigma^{-1}-norm
            if m < 4:
                other = noiseless[i] + np.linalg.svd(Z[i])[2][-1]
                norm = lambda w: w @ np.linalg.solve(Sigma, w)  # noqa: E731
                assert norm(other) > norm(noiseless[i])


@pytest.mark.parametrize("head_cov", ["isotropic", "linear"])
def test_noiseless_reference_rows(head_cov):
    """sigma^2 = 0: the Bayes oracle recovers w_star from m >= k samples (risk 0); below, c (k - m)
    for Sigma_star = c I (no closed form otherwise, checked against the posterior variance);
    ridge is minimum-norm interpolation with risk tr(Sigma_star) (1 - m / d); least squares has
    risk 0, so a finite standard error even at dim + 2."""
    problem = problem_of(d=8, k=4, noise_var=0.0, head_cov=head_cov)
    shots = (2, 3, 4, 6, 7, 10)
    rows = evaluate(learned(problem), problem, "m", shots, 4000, 0.3, 1, seed=8)
    isotropic = head_cov == "isotropic"
    for row in rows_named(rows, BAYES_ORACLE):
        if row.shots >= 4:
            assert row.theory == 0.0 and row.excess_risk < 1e-10, row  # rounding
            continue
        if isotropic:
            assert row.theory == pytest.approx(4 - row.shots)  # c = 1 (trace k)
            assert abs(z_score(row.excess_risk, row.stderr, row.theory)) <= Z_MAX, row
        else:
            assert np.isnan(row.theory)
        assert_same_mean(row, brute_force_posterior(problem, row.shots, 3000,
                                                    np.random.default_rng(row.shots))[1])
    for row in rows_named(rows, RIDGE):
        expected = np.trace(problem.Sigma_star) * max(0.0, 1 - row.shots / 8)
        assert row.theory == pytest.approx(expected)
        if expected > 0:
            assert abs(z_score(row.excess_risk, row.stderr, expected)) <= Z_MAX, row
        else:
            assert row.excess_risk < 1e-10
    for row in rows_named(rows, ORACLE_LSQ) + rows_named(rows, REGRESSION_LSQ):
        assert row.theory == 0.0 and np.isfinite(row.stderr) and row.excess_risk < 1e-10, row
    assert [row.shots for row in rows_named(rows, ORACLE_LSQ)] == [6, 7, 10]
    assert [row.shots for row in rows_named(rows, REGRESSION_LSQ)] == [10]


@pytest.mark.parametrize("noise_var", [0.0, 1.5])
@pytest.mark.parametrize("head_cov", ["isotropic", "linear"])
def test_lower_references_are_monotone_in_m(noise_var, head_cov):
    """Over m = 1 .. d + 5, across both interpolation thresholds (k + 2 and d + 2), neither the
    Bayes oracle nor ridge increases with m beyond error (the former least-squares/ridge switch
    jumped up at dim + 2)."""
    problem = problem_of(d=6, k=2, noise_var=noise_var, head_cov=head_cov)
    rows = evaluate(learned(problem), problem, "m", tuple(range(1, 12)), 3000, 0.3, 1, seed=9)
    for name in (BAYES_ORACLE, RIDGE):
        series = rows_named(rows, name)
        assert [row.shots for row in series] == list(range(1, 12))
        for a, b in itertools.pairwise(series):
            assert b.excess_risk <= a.excess_risk + Z_MAX * np.hypot(a.stderr, b.stderr) + 1e-10, (
                a, b)


@pytest.mark.parametrize("m", [3, 8, 9, 10, 11, 16])
def test_ridge_row_matches_brute_force_ridge_and_its_variance_identity(m):
    """Ridge at every m (below, at and above d + 2 = 10) against an explicit per-task ridge
    fit in d dimensions, and against ``E risk = sigma^2 E tr((X^T X + lambda I)^{-1})`` (which
    holds for lambda = sigma^2 d / tr(Sigma_star) by rotation invariance, whatever Sigma_star)."""
    problem = problem_of(d=8, k=2, noise_var=1.5)
    penalty = ridge_penalty(8, problem)
    assert penalty == pytest.approx(1.5 * 8 / np.trace(problem.Sigma_star))
    (row,) = rows_named(evaluate(learned(problem), problem, "m", (m,), 6000, 0.3, 1, seed=m),
                        RIDGE)
    assert np.isnan(row.theory)
    rng = np.random.default_rng(99 + m)
    beta = sample_heads(problem, 4000, rng) @ problem.B_star.T
    X = rng.standard_normal((4000, m, 8))
    y = np.einsum("nmd,nd->nm", X, beta) + np.sqrt(1.5) * rng.standard_normal((4000, m))
    fitted = np.stack([np.linalg.solve(x.T @ x + penalty * np.eye(8), x.T @ t)
                       for x, t in zip(X, y, strict=True)])
    assert_same_mean(row, np.sum((fitted - beta) ** 2, axis=1))
    identity = 1.5 * np.trace(np.linalg.inv(np.swapaxes(X, 1, 2) @ X + penalty * np.eye(8)),
                              axis1=1, axis2=2)
    assert_same_mean(row, identity)


def test_ridge_has_no_jump_at_d_plus_2_and_is_below_least_squares():
    """On the same tasks, ridge is below least squares in d dimensions (paired), by far at
    d + 2 where least squares peaks, and decreases through d + 2."""
    problem = problem_of(d=8, k=2, noise_var=1.5)
    ridge_means = []
    for m in (9, 10, 11, 12, 16):
        risks = regression_risks(problem, m, 6000, np.random.default_rng(m))
        ridge_means.append((risks[RIDGE].mean(), risks[RIDGE].std(ddof=1) / np.sqrt(6000)))
        if m < 10:
            assert set(risks) == {RIDGE}
            continue
        gap = risks[REGRESSION_LSQ] - risks[RIDGE]
        assert gap.mean() > 0
        if m >= 12:  # finite variance: a valid z-test
            assert gap.mean() > 3 * gap.std(ddof=1) / np.sqrt(gap.size)
    for (a, sa), (b, sb) in itertools.pairwise(ridge_means):
        assert b <= a + Z_MAX * np.hypot(sa, sb)


@pytest.mark.parametrize("m", [2, 4, 8, 20])
def test_bayes_oracle_is_below_the_method_ridge_least_squares_and_misspecified_posteriors(m):
    """The Bayes oracle is the least risk any estimator reaches with m samples: below one FO-ANIL
    step at the predicted limit (paired, same tasks), below oracle-lsq (paired), below ridge;
    and a posterior mean with the wrong Sigma_star or sigma^2 does worse (paired z > 3), which
    pins down the prior and the noise the oracle uses."""
    problem = problem_of(d=10, k=3, noise_var=1.0)
    Lambda = lambda_star(problem, 10, 0.5)
    values, vectors = np.linalg.eigh(Lambda)
    B = problem.B_star @ ((vectors * np.sqrt(values)) @ vectors.T) @ np.eye(3, 5)
    B = B + 0.05 * np.random.default_rng(1).standard_normal((10, 5))
    n = 20000
    method, oracle = adapted_and_oracle_risks(LinearParams(B, np.zeros(5)), problem, m, n, 0.5,
                                              1, np.random.default_rng(m))
    bayes = oracle[BAYES_ORACLE]
    paired = [method] + ([oracle[ORACLE_LSQ]] if ORACLE_LSQ in oracle else [])
    for other in paired:
        gap = other - bayes
        assert gap.mean() > -Z_MAX * gap.std(ddof=1) / np.sqrt(n)
    ridge = regression_risks(problem, m, n, np.random.default_rng(100 + m))[RIDGE]
    assert bayes.mean() < ridge.mean() + Z_MAX * np.hypot(bayes.std(), ridge.std()) / np.sqrt(n)
    rng = np.random.default_rng(7 + m)
    heads = sample_heads(problem, n, rng)
    Z = rng.standard_normal((n, m, 3))
    y = (Z @ heads[..., None])[..., 0] + rng.standard_normal((n, m))
    best = np.sum((posterior_mean(Z, y, problem) - heads) ** 2, axis=1)
    scale = np.trace(problem.Sigma_star) / 3
    for wrong in (dataclasses.replace(problem, Sigma_star=scale * np.eye(3)),
                  dataclasses.replace(problem, Sigma_star=np.linalg.inv(problem.Sigma_star)),
                  dataclasses.replace(problem, noise_var=4.0),
                  dataclasses.replace(problem, noise_var=0.25)):
        gap = np.sum((posterior_mean(Z, y, wrong) - heads) ** 2, axis=1) - best
        assert gap.mean() > 3 * gap.std(ddof=1) / np.sqrt(n), wrong


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
    """The oracle rows only depend on B_star: the same for two different representations
    (common random numbers give the same draws when span(B_star, B) has the same dimension)."""
    problem = problem_of()
    first = adapted_and_oracle_risks(learned(problem, seed=1), problem, 9, 50, 0.3, 1,
                                     np.random.default_rng(0))[1]
    second = adapted_and_oracle_risks(learned(problem, seed=2), problem, 9, 50, 0.3, 1,
                                      np.random.default_rng(0))[1]
    assert set(first) == set(second) == {BAYES_ORACLE, ORACLE_LSQ}
    for name in first:
        np.testing.assert_allclose(first[name], second[name], rtol=1e-12)


@pytest.mark.parametrize(("d", "k", "noise_var", "m"), [
    (8, 2, 1.5, 1), (8, 2, 1.5, 5), (8, 2, 1.5, 8), (8, 2, 1.5, 9), (8, 2, 1.5, 14),
    (12, 3, 0.0, 7), (5, 5, 0.5, 30), (30, 2, 2.0, 12)])
def test_ridge_risks_sampled_from_the_bidiagonal_form_match_the_simulation_in_d_dims(
        d, k, noise_var, m):
    """The d-free sampler (a Wishart spectrum in bidiagonal form and a uniform direction of
    beta) against ridge solved task by task on explicit d-dimensional inputs: the same mean
    (two-sample z) and the same law (two-sample Kolmogorov-Smirnov), for m below, at and above
    d, with and without noise; least squares (penalty 0) where m >= d + 2 too."""
    problem = problem_of(d=d, k=k, noise_var=noise_var)
    penalties = [ridge_penalty(d, problem)] + ([0.0] if m >= d + 2 else [])
    fast = ridge_risks(problem, m, penalties, 20000, np.random.default_rng(d + m))
    for penalty, sampled in zip(penalties, fast, strict=True):
        direct = reference.ridge_risks(problem, m, penalty, 3000, np.random.default_rng(m))
        if direct.std() < 1e-12:  # noiseless least squares: exact recovery, up to rounding
            assert sampled.max() < 1e-20
            continue
        se = np.hypot(sampled.std(ddof=1) / np.sqrt(sampled.size),
                      direct.std(ddof=1) / np.sqrt(direct.size))
        assert abs(sampled.mean() - direct.mean()) <= Z_MAX * se, (penalty, sampled.mean(),
                                                                   direct.mean())
        assert stats.ks_2samp(sampled, direct).pvalue > 1e-3, penalty


def test_ridge_risks_match_their_closed_forms_and_detect_a_wrong_penalty():
    """Noiseless ridge is the projection onto a random m-dimensional row space:
    tr(Sigma_star)(1 - m/d); least squares has sigma^2 d / (m - d - 1). A penalty 30% off the
    prior-optimal one is detectably worse on the same draws (a negative control)."""
    noiseless = problem_of(d=10, k=3, noise_var=0.0)
    risks = ridge_risks(noiseless, 4, [0.0], 40000, np.random.default_rng(1))[0]
    assert abs(z_score(risks.mean(), risks.std(ddof=1) / 200, ridge_risk(4, noiseless))) < Z_MAX
    noisy = problem_of(d=6, k=2, noise_var=1.3)
    lsq = ridge_risks(noisy, 30, [0.0], 40000, np.random.default_rng(2))[0]
    expected = least_squares_risk(30, 6, 1.3)
    assert abs(z_score(lsq.mean(), lsq.std(ddof=1) / 200, expected)) < Z_MAX
    best = ridge_penalty(6, noisy)
    optimal, off = ridge_risks(noisy, 4, [best, 1.3 * best], 40000, np.random.default_rng(3))
    gap = off - optimal
    assert gap.mean() > 3 * gap.std(ddof=1) / 200


def test_regression_rows_cost_nothing_that_grows_with_d():
    """At d = 10^6 the d-dimensional rows are drawn without any d-sized array: every array
    the sampler makes is at most n x min(m, d) (checked through numpy's allocations being
    small: the whole call stays far below one d-sized row per task)."""
    problem = dataclasses.replace(problem_of(d=8, k=2), B_star=np.eye(10**6, 2))
    tracemalloc.start()
    risks = regression_risks(problem, 20, 200, np.random.default_rng(0))
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert set(risks) == {RIDGE} and risks[RIDGE].shape == (200,)
    assert peak < 2_000_000, peak  # one d-sized row per task would be 1.6 GB


def test_evaluate_is_deterministic_and_chunking_does_not_change_the_numbers(monkeypatch):
    problem = problem_of()
    params = learned(problem)
    first = evaluate(params, problem, "m", (5, 9), 300, 0.3, 2, seed=4)
    assert first == evaluate(params, problem, "m", (5, 9), 300, 0.3, 2, seed=4)
    assert first != evaluate(params, problem, "m", (5, 9), 300, 0.3, 2, seed=5)
    monkeypatch.setattr(evaluation, "CHUNK_ENTRIES", 9 * 7 * 50)  # several chunks per m_test
    chunked = evaluate(params, problem, "m", (5, 9), 300, 0.3, 2, seed=4)
    assert [row.n_tasks for row in chunked] == [300] * 8  # m, bayes-oracle, oracle-lsq, ridge
    for a, b in zip(first, chunked, strict=True):
        assert (a.method, a.shots) == (b.method, b.shots)
        if np.isnan(a.stderr):  # oracle-lsq at m = k + 3: infinite variance
            assert np.isnan(b.stderr) and (a.method, a.shots) == (ORACLE_LSQ, 5)
            continue
        assert abs(a.excess_risk - b.excess_risk) <= Z_MAX * np.hypot(a.stderr, b.stderr)


def test_float32_parameters_are_evaluated_in_float64():
    problem = problem_of()
    params = learned(problem)
    narrow = LinearParams(params.B.astype(np.float32), params.w.astype(np.float32))
    wide_rows = evaluate(params, problem, "m", (6,), 200, 0.3, 1, seed=0)
    narrow_rows = evaluate(narrow, problem, "m", (6,), 200, 0.3, 1, seed=0)
    assert narrow_rows[0].excess_risk == pytest.approx(wide_rows[0].excess_risk, rel=1e-5)


def test_held_out_risks_score_each_task_on_its_own_unseen_rows():
    """Without the ground truth: the method adapts on a held-out task's first m rows and is
    scored on the others; with the true representation it predicts better than zero, least
    squares appears only where its risk is finite, and the risk equals a per-task
    reference."""
    from metarep.core.evaluation import REGRESSION_LSQ, ZERO, held_out_risks
    from metarep.core.methods import adapt_head

    problem = make_problem(6, 2, 0.25, "isotropic", np.random.default_rng(0))
    tasks = sample_tasks(problem, 400, 10, 30, np.random.default_rng(1))
    X, y = tasks.full()
    B = problem.B_star / np.sqrt(0.5)  # alpha B^T B = I: one step is unbiased
    params = LinearParams(B, np.zeros(2))
    rows = {(row.method, row.shots): row for row in
            held_out_risks(params, X, y, "fo-anil", (4, 12), 0.5, 1)}
    assert (REGRESSION_LSQ, 4) not in rows and (REGRESSION_LSQ, 12) in rows  # m >= d + 2
    assert np.isfinite(rows[(REGRESSION_LSQ, 12)].stderr)
    assert rows[("fo-anil", 12)].risk < rows[(ZERO, 12)].risk - 5 * rows[(ZERO, 12)].stderr
    i = 7
    errors = []
    for j in (i, i + 1):  # one task at a time
        head = adapt_head(B, np.zeros(2), X[j:j + 1, :10], y[j:j + 1, :10], 0.5, 1)[0]
        errors.append(np.mean((X[j, 10:] @ (B @ head) - y[j, 10:]) ** 2))
    pair = held_out_risks(params, X[i:i + 2], y[i:i + 2], "fo-anil", (10,), 0.5, 1)
    assert pair[0].risk == pytest.approx(np.mean(errors), rel=1e-12)


def test_least_squares_on_learned_features_has_no_error_bar_where_its_variance_is_infinite():
    """mtl-lsq fits least squares on k' learned features: ridge below k' + 2 samples (finite
    variance), no standard error at m = k' + 2, k' + 3 (infinite variance, as for least
    squares on any Gaussian design), a standard error from k' + 4 on."""
    rng = np.random.default_rng(21)
    problem = make_problem(8, 2, 0.5, "isotropic", rng)
    width = 4
    params = LinearParams(rng.standard_normal((8, width)) / np.sqrt(8), np.zeros(width))
    rows = evaluation.evaluate(params, problem, "mtl", (3, 6, 7, 8), 200, 0.5, 1, seed=0,
                               features_row="mtl-lsq")
    stderr = {row.shots: row.stderr for row in rows if row.method == "mtl-lsq"}
    assert np.isfinite(stderr[3]) and np.isfinite(stderr[8])
    assert np.isnan(stderr[6]) and np.isnan(stderr[7])
    predictors = {"phi-lsq": evaluation.feature_least_squares_predictor(
        lambda X: X @ params.B, problem)}
    rows = evaluation.evaluate_predictors(predictors, problem, (6, 8), 50, seed=0,
                                          least_squares_widths={"phi-lsq": width})
    stderr = {row.shots: row.stderr for row in rows if row.method == "phi-lsq"}
    assert np.isnan(stderr[6]) and np.isfinite(stderr[8])


def test_evaluate_many_gives_each_model_the_rows_it_gets_alone(monkeypatch):
    """Models of two step sizes, heads and ranks of span(B_star, B) (a B inside span(B_star)
    draws other tasks), with the least-squares row on the features: each gets exactly the rows
    of :func:`evaluate` alone, in a chunked evaluation too."""
    problem = make_problem(8, 2, 0.5, "linear", np.random.default_rng(0))
    rng = np.random.default_rng(1)
    inside = problem.B_star @ rng.standard_normal((2, 3))
    models = [(LinearParams(rng.standard_normal((8, 3)), rng.standard_normal(3)), 0.3),
              (LinearParams(inside, np.zeros(3)), 0.5),
              (LinearParams(rng.standard_normal((8, 3)), np.zeros(3)), 0.5)]
    for features, chunk in ((None, 4_000_000), ("mtl-lsq", 200)):  # 200: a few tasks a chunk
        monkeypatch.setattr(evaluation, "CHUNK_ENTRIES", chunk)
        if features is not None:  # least squares on features of rank k' only
            models = [models[0], models[2]]
        together = evaluation.evaluate_many(models, problem, "fo-anil", (3, 12), 30, 1, 4,
                                            features_row=features)
        for (params, alpha), rows in zip(models, together, strict=True):
            assert rows == evaluate(params, problem, "fo-anil", (3, 12), 30, alpha, 1, 4,
                                    features_row=features)
    assert evaluation.evaluate_many([], problem, "fo-anil", (3,), 30, 1, 4) == []
