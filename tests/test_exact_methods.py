"""Exact infinite-task steps of every inner-loop method (metarep.core.moments,
metarep.core.expected_steps, metarep.core.infinite.ExactInnerLoop).

Checked against independent computations: closed-form Wishart moments; the closed-form
FO-ANIL step; Monte Carlo over 2e5 fresh tasks with z-tests on every entry (and a control:
another method's expectation is rejected); exact Gauss-Hermite quadrature over the one inner
sample and the head (m_in = 1) and over the head with exactly whitened data (m_in = inf),
through the vectorised finite-task methods; and long trajectories against the same update
taken in R^d from a fresh frame at every step.
"""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
from zstats import assert_z, max_abs_z

from metarep.core import infinite as pop
from metarep.core.expected_steps import MAX_INNER_STEPS, check_exact, program_size
from metarep.core.methods import ANIL, FOANIL, FOMAML, MAML
from metarep.core.model import LinearParams
from metarep.core.moments import Poly, Program, Words, expectation, perfect_matchings
from metarep.core.monte_carlo import monte_carlo_update
from metarep.core.problem import Problem
from metarep.core.tasks import TaskBatch
from metarep.errors import ArgumentError

METHODS = {"fo-anil": FOANIL, "anil": ANIL, "fo-maml": FOMAML, "maml": MAML}


def problem_of(d: int, k: int, noise_var: float, seed: int) -> Problem:
    """A random ``B_star`` and a random anisotropic, non-diagonal ``Sigma_star``."""
    rng = np.random.default_rng(seed)
    B_star = np.linalg.qr(rng.standard_normal((d, k)))[0]
    root = rng.standard_normal((k, k))
    return Problem(B_star, root @ root.T / k + 0.3 * np.eye(k), noise_var)


def params_of(d: int, width: int, head: float, seed: int) -> LinearParams:
    rng = np.random.default_rng(seed)
    return LinearParams(0.5 * rng.standard_normal((d, width)),
                        head * rng.standard_normal(width))


# ----------------------------------------------------------------------------- the engine


def test_perfect_matchings_are_all_and_only_the_matchings():
    for size in range(0, 9, 2):
        matchings = perfect_matchings(size)
        assert len(matchings) == math.prod(range(size - 1, 0, -2))
        assert len(set(matchings)) == len(matchings)
        for matching in matchings:
            assert sorted(itertools.chain(*matching)) == list(range(size))
    assert perfect_matchings(5) == ()


def _letters(H: np.ndarray, omega: np.ndarray, Sigma: np.ndarray, noise_var: float,
             d: int) -> Words:
    """The letters of a batch of one configuration, built here from their definitions."""
    q, p = H.shape
    B = np.zeros((1, q + 1, p))
    B[0, :q] = H
    P = np.eye(q + 1)
    P[q, q] = 0.0
    T = np.zeros((q + 1, q + 1))
    T[: Sigma.shape[0], : Sigma.shape[0]] = Sigma
    n = np.zeros((1, q + 1, 1))
    n[0, q, 0] = -math.sqrt(noise_var)
    w = omega.reshape(1, p, 1)
    letters = {"B": B, "B'": B.transpose(0, 2, 1), "w": w, "w'": w.transpose(0, 2, 1),
               "n": n, "n'": n.transpose(0, 2, 1), "P": P[None], "I": np.eye(q + 1)[None],
               "T": T[None]}
    return Words(letters, d)


@pytest.mark.parametrize("m", [1.0, 3.0, math.inf])
def test_wishart_moments_of_the_engine(m):
    """``E[S A S] = A + (A^T + tr(A) I) / m`` and ``E[W^2] = (1 + (d + 2) / m) I`` on
    R^{d+1} (the complement of the inputs' span enters through ``tr P = d``)."""
    rng = np.random.default_rng(0)
    d, q, p = 9, 4, 3
    H, omega = rng.standard_normal((q, p)), rng.standard_normal(p)
    words = _letters(H, omega, np.eye(2), 0.5, d)
    alpha, ms = np.ones(1), np.array([m])
    inv_m = 0.0 if math.isinf(m) else 1 / m
    sandwich = Program(expectation(Poly.of("B'", "W", "B", "w", "w'", "B'", "W", "B")),
                       alpha, ms)(words)[0]
    N = H.T @ H
    a = N @ np.outer(omega, omega) @ N
    np.testing.assert_allclose(sandwich, a + (a + (omega @ N @ omega) * N) * inv_m,
                               rtol=1e-13)
    square = Program(expectation(Poly.of("w'", "B'", "W", "W", "B", "w")), alpha, ms)(words)
    np.testing.assert_allclose(square[0, 0, 0], omega @ N @ omega * (1 + (d + 2) * inv_m),
                               rtol=1e-13)


def test_odd_moments_vanish_and_the_head_covariance_pairs_heads():
    words = _letters(np.eye(3, 2), np.ones(2), np.diag([2.0, 0.5]), 0.0, 5)
    one = np.ones(1)
    assert expectation(Poly.of("w'", "B'", "t")) == {}
    value = Program(expectation(Poly.of("w'", "B'", "t", "t'", "B", "w")), one, one)(words)
    assert value[0, 0, 0] == pytest.approx(2.5)  # w^T B^T Theta B w, B = [I; 0]


@pytest.mark.parametrize(("d", "k", "width", "head"), [(8, 2, 5, 0.5), (4, 2, 7, 0.0),
                                                      (9, 4, 2, 0.3)])
def test_engine_fo_anil_is_the_closed_form(d, k, width, head):
    """The engine's one-step FO-ANIL is :class:`ExactFOANIL` for a batch of configurations
    with different step sizes, sample counts (inf included) and noise, to rounding."""
    problem = problem_of(d, k, 0.4, seed=d)
    params = params_of(d, width, head, seed=width)
    _, state = pop.coordinates(problem.B_star, np.stack([params.B] * 3),
                               np.stack([params.w] * 3))
    configs = dict(inner_lr=[0.3, 0.1, 0.5], outer_lr=[0.2, 0.05, 1.0], m_in=[1, 7, math.inf],
                   noise_var=[0.0, 0.4, 2.0], shape=state.H.shape)
    closed = pop.ExactFOANIL(problem.Sigma_star, **configs)
    engine = pop.ExactInnerLoop("fo-anil", 1, d, problem.Sigma_star, **configs)
    (H1, w1), loss1 = closed.step(state)
    (H2, w2), loss2 = engine.step(state)
    np.testing.assert_allclose(H2, H1, rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(w2, w1, rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(loss2, loss1, rtol=1e-13)


# ----------------------------------------------------------------------------- Monte Carlo

CASES = [  # method, inner steps, d, k, k', m_in, head scale
    ("anil", 1, 6, 2, 4, 2, 0.4),      # k' > k, w != 0
    ("anil", 1, 7, 3, 2, 5, 0.0),      # k' < k, w = 0
    ("anil", 2, 5, 3, 4, 6, 0.3),
    ("fo-maml", 1, 7, 2, 3, 1, 0.5),   # m_in = 1
    ("fo-maml", 1, 6, 2, 2, 3, 0.4),   # k' = k
    ("maml", 1, 5, 2, 7, 1, 0.4),      # k' > d, m_in = 1
    ("maml", 1, 30, 2, 2, 4, 0.3),     # d - q = 26: the complement's trace
    ("maml", 1, 9, 3, 2, 4, 0.0),      # k' < k, w = 0
    ("fo-anil", 2, 6, 2, 3, 2, 0.5),
    ("fo-anil", 3, 4, 2, 3, 3, 0.3),   # degree 6 in S_in (m_in = 1 is too heavy-tailed)
]
CONTROL = {"anil": "fo-anil", "fo-anil": "anil", "fo-maml": "maml", "maml": "fo-maml"}


@pytest.mark.parametrize(("method", "steps", "d", "k", "width", "m_in", "head"), CASES)
def test_exact_step_matches_monte_carlo(method, steps, d, k, width, m_in, head):
    """Every entry of ``(E[B+] - B, E[w+] - w)`` and the loss against 2e5 fresh tasks
    (Bonferroni z-test); the expectation of the method's first- or second-order twin (the
    control) is rejected by the same estimate."""
    problem = problem_of(d, k, 0.3, seed=d + width)
    params = params_of(d, width, head, seed=k)
    exact, loss = pop.expected_update(params, problem, 0.3, 1.0, m_in, method, steps)
    mc = monte_carlo_update(METHODS[method](0.3, 1.0, steps), params, problem, m_in, 2,
                            200_000, np.random.default_rng(1), tasks_per_batch=500)
    estimate = np.r_[mc.mean.B.ravel(), mc.mean.w, mc.loss]
    stderr = np.r_[mc.stderr.B.ravel(), mc.stderr.w, mc.loss_stderr]
    random = stderr > 0  # w = 0 with k' < k: some entries of the head update are exactly 0
    expected = np.r_[exact.B.ravel(), exact.w, loss]
    np.testing.assert_allclose(estimate[~random], expected[~random], atol=1e-12)
    assert_z(estimate[random], stderr[random], expected[random], f"{method} x{steps}")
    other = CONTROL[method]
    control, control_loss = pop.expected_update(params, problem, 0.3, 1.0, m_in, other,
                                                min(steps, MAX_INNER_STEPS[other]))
    worst, bound = max_abs_z(estimate[random], stderr[random],
                             np.r_[control.B.ravel(), control.w, control_loss][random])
    assert worst > 3 * bound, f"the z-test cannot tell {method} from {other}"


# ----------------------------------------------------------------------------- quadrature


def _quadrature(points: list[int]) -> tuple[np.ndarray, np.ndarray]:
    """Gauss-Hermite nodes (n, len(points)) and weights (n,) for a standard normal vector,
    ``points[j]`` nodes in variable ``j``: exact for polynomials of degree at most
    ``2 points[j] - 1`` in variable ``j``."""
    rules = [np.polynomial.hermite_e.hermegauss(count) for count in points]
    nodes = np.array(list(itertools.product(*(x for x, _ in rules))))
    weights = np.prod(np.array(list(itertools.product(*(w for _, w in rules)))), axis=1)
    return nodes, weights / weights.sum()


def _whitened_rows(d: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """``X`` (d + 1, d) with ``X^T X / (d + 1) = I`` and a unit ``e`` with ``X^T e = 0``."""
    Q = np.linalg.qr(rng.standard_normal((d + 1, d + 1)))[0]
    return math.sqrt(d + 1) * Q[:, :d], Q[:, d]


def _weighted_step(method: str, steps: int, params: LinearParams, batches: list[TaskBatch],
                   weights: np.ndarray) -> tuple[np.ndarray, float]:
    """``sum_i weight_i (update_i, loss_i)`` of the vectorised finite-task method."""
    rule = METHODS[method](0.3, 1.0, steps)
    flat = np.r_[params.B.ravel(), params.w]
    total, loss = np.zeros_like(flat), 0.0
    for batch, weight in zip(batches, weights, strict=True):
        new, value = rule.step(params, batch)
        total += weight * (np.r_[new.B.ravel(), new.w] - flat)
        loss += weight * value
    return total, loss


@pytest.mark.parametrize(("method", "steps"), [("anil", 1), ("fo-maml", 1), ("maml", 1),
                                               ("fo-anil", 2)])
def test_one_inner_sample_is_exact_by_quadrature(method, steps):
    """``m_in = 1``: the expectation over the one augmented sample ``(x, eps)`` and the head
    by Gauss-Hermite quadrature (exact: the update is a polynomial of degree <= 8 in each
    entry of the sample, <= 5 in the head), the outer data exactly whitened (``S_out = I``,
    ``X_out^T eps_out = 0``); ``d = 4 > k + k' = 3``, so the complement of the inputs' span
    is there."""
    d, k, width, noise_var = 4, 1, 2, 0.3
    problem = problem_of(d, k, noise_var, seed=5)
    params = params_of(d, width, 0.4, seed=6)
    root = math.sqrt(problem.Sigma_star[0, 0])
    X_out, e = _whitened_rows(d, np.random.default_rng(7))
    nodes, weights = _quadrature([5] * (d + 1) + [3])
    batches = []
    for node in nodes:
        x, eps, z = node[:d], math.sqrt(noise_var) * node[d], node[d + 1]
        theta = problem.B_star[:, 0] * root * z
        y_out = X_out @ theta + math.sqrt(noise_var * (d + 1)) * e
        batches.append(TaskBatch(x[None, None], np.array([[x @ theta + eps]]), X_out[None],
                                 y_out[None]))
    total, loss = _weighted_step(method, steps, params, batches, weights)
    exact, exact_loss = pop.expected_update(params, problem, 0.3, 1.0, 1, method, steps)
    np.testing.assert_allclose(np.r_[exact.B.ravel(), exact.w], total, rtol=1e-9, atol=1e-12)
    assert exact_loss == pytest.approx(loss, rel=1e-10)


@pytest.mark.parametrize("method", ["anil", "fo-maml", "maml", "fo-anil"])
def test_infinitely_many_samples_is_exact_by_quadrature(method):
    """``m_in = inf``: the inner data exactly whitened (``S_in = I``, no noise gradient), the
    expectation over the head by quadrature; ``d = 6 > k + k' = 5``."""
    d, k, width = 6, 2, 3
    problem = problem_of(d, k, 0.5, seed=8)
    params = params_of(d, width, 0.4, seed=9)
    values, vectors = np.linalg.eigh(problem.Sigma_star)
    root = vectors * np.sqrt(values)
    X, e = _whitened_rows(d, np.random.default_rng(10))
    nodes, weights = _quadrature([3] * k)
    batches = []
    for z in nodes:
        theta = problem.B_star @ (root @ z)
        y = X @ theta + math.sqrt(0.5 * (d + 1)) * e
        batches.append(TaskBatch(X[None], y[None], X[None], y[None]))
    steps = 2 if method == "fo-anil" else 1
    total, loss = _weighted_step(method, steps, params, batches, weights)
    exact, exact_loss = pop.expected_update(params, problem, 0.3, 1.0, math.inf, method, steps)
    np.testing.assert_allclose(np.r_[exact.B.ravel(), exact.w], total, rtol=1e-9, atol=1e-12)
    assert exact_loss == pytest.approx(loss, rel=1e-10)


# ----------------------------------------------------------------------------- trajectories


@pytest.mark.parametrize(("method", "d", "k", "width"), [("maml", 5, 2, 8), ("anil", 9, 3, 2)])
def test_trajectory_in_coordinates_is_the_update_in_d_dimensions(method, d, k, width):
    """100 steps in the reduced coordinates (k' = 8 > k + r + 1: a reduced head basis) are
    the same as 100 updates taken in R^d, each from a fresh frame: the span the coordinates
    keep is invariant under the method's expected step."""
    problem = problem_of(d, k, 0.3, seed=11)
    params = params_of(d, width, 0.3, seed=12)
    frame, state = pop.coordinates(problem.B_star, params.B, params.w)
    dynamics = pop.exact_dynamics(method, 1, d, problem.Sigma_star, 0.2, 0.1, 4, 0.3,
                                  state.H.shape)
    direct = params
    for _ in range(100):
        state, _ = dynamics.step(state)
        update, _ = pop.expected_update(direct, problem, 0.2, 0.1, 4, method)
        direct = LinearParams(direct.B + update.B, direct.w + update.w)
    final = frame.params(state)
    np.testing.assert_allclose(final.B, direct.B, rtol=1e-9, atol=1e-11)
    np.testing.assert_allclose(final.w, direct.w, rtol=1e-9, atol=1e-11)
    assert np.linalg.norm(final.B - params.B) > 0.05  # it moved


def test_programs_do_not_depend_on_d_and_limits_are_refused():
    sizes = {(name, steps): program_size(name, steps) for name, steps in
             [("fo-anil", 1), ("anil", 1), ("fo-maml", 1), ("maml", 1)]}
    assert sizes[("fo-anil", 1)]["words"] < sizes[("maml", 1)]["words"]
    check_exact("fo-anil", MAX_INNER_STEPS["fo-anil"])
    with pytest.raises(ArgumentError, match="inner_steps"):
        check_exact("maml", MAX_INNER_STEPS["maml"] + 1)
    with pytest.raises(ArgumentError, match="method"):
        check_exact("mtl", 1)


# ----------------------------------------------------------------------------- runs


@pytest.mark.parametrize(("method", "steps"), [("maml", 1), ("anil", 2)])
def test_runs_of_every_method_batch_like_runs_alone(tmp_path, method, steps):
    """``tasks.n: infinite`` runs of ``method``: three configurations stepped as one batch
    write the metrics each writes alone, byte for byte; the loss falls; the summary's theory
    gives no FO-ANIL limits for them."""
    from metarep.run.experiment import run_batch, run_experiment
    from metarep.run.schema import load_config

    base = ["tasks.n=infinite", f"method.name={method}", f"method.inner_steps={steps}",
            "problem.d=12", "model.width=4", "train.steps=300", "train.record_every=log",
            "eval.n_tasks=40", "method.inner_lr=0.2", "method.outer_lr=0.1"]
    cells = [[], ["method.inner_lr=0.1"], ["tasks.m_in=inf", "model.seed=4"]]
    configs = [load_config("quick", base + cell) for cell in cells]
    batched = run_batch(configs, [tmp_path / "batch" / str(i) for i in range(3)],
                        figures=False)
    for i, config in enumerate(configs):
        alone = run_experiment(config, tmp_path / "alone" / str(i), progress=False,
                               figures=False)
        assert batched[i].status == alone.status == "done"
        assert ((tmp_path / "batch" / str(i) / "metrics.csv").read_bytes()
                == (tmp_path / "alone" / str(i) / "metrics.csv").read_bytes())
        losses = alone.metrics["train_loss"].to_numpy()
        assert losses[-1] < losses[0]
        assert alone.summary["theory"]["limits"] is None
