"""Exact infinite-task dynamics (metarep.core.infinite) against independent computations:
Monte Carlo over >= 1e5 fresh tasks (z-test on every entry), the plain d-dimensional recursion
of metarep.core.reference, the measures of metarep.core.measures on the reconstructed B, finite
pools of growing size, and the predicted limits and decay rates; plus batching
(metarep.run.simulate), divergence (metarep.run.loop) and the CLI end to end."""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest
from zstats import assert_z, max_abs_z

from metarep.cli import EXIT_BAD_INPUT, EXIT_DIVERGED
from metarep.core import infinite as pop
from metarep.core import reference
from metarep.core.measures import measure
from metarep.core.methods import FOANIL, FOMAML
from metarep.core.model import LinearParams, init_linear
from metarep.core.monte_carlo import monte_carlo_update
from metarep.core.problem import Problem, make_problem
from metarep.core.seeding import Purpose, seed_rng
from metarep.core.tasks import sample_tasks
from metarep.core.theory import lambda_star
from metarep.errors import ArgumentError
from metarep.run.atomic import write_npz
from metarep.run.backends.infinite import ExactStepper
from metarep.run.experiment import prepare, run_experiment
from metarep.run.loop import EXPLOSION_FACTOR, Diverged, RecordSchedule, Trajectory, train
from metarep.run.schema import dump_yaml, load_config
from metarep.run.simulate import grid, simulate_batch


def problem_of(d: int, k: int, noise_var: float, seed: int = 0, full_cov: bool = False) -> Problem:
    """A random B_star with Sigma_star ~ diag(1..k), or (``full_cov``) a random non-diagonal
    symmetric positive definite Sigma_star."""
    rng = np.random.default_rng(seed)
    problem = make_problem(d, k, noise_var, "linear", rng)
    if not full_cov:
        return problem
    root = rng.standard_normal((k, k))
    return Problem(problem.B_star, root @ root.T / k + 0.2 * np.eye(k), noise_var)


def random_params(d: int, width: int, seed: int, scale: float = 0.5,
                  head: float = 0.5) -> LinearParams:
    rng = np.random.default_rng(seed)
    return LinearParams(scale * rng.standard_normal((d, width)),
                        head * rng.standard_normal(width))


def exact_trajectory(params: LinearParams, problem: Problem, alpha: float, beta: float,
                     m_in: float, steps: int) -> tuple[list[LinearParams], list[float]]:
    """The fast kernel's trajectory (:class:`metarep.core.infinite.ExactFOANIL` in coordinates,
    reconstructed in R^d): ``steps + 1`` states and ``steps`` losses."""
    frame, state = pop.coordinates(problem.B_star, params.B, params.w)
    dynamics = pop.ExactFOANIL(problem.Sigma_star, alpha, beta, m_in, problem.noise_var,
                               state.H.shape)
    path, losses = [frame.params(state)], []
    for _ in range(steps):
        state, loss = dynamics.step(state)
        path.append(frame.params(state))
        losses.append(float(loss[0]))
    return path, losses


# ----------------------------------------------------------------------------- Monte Carlo


SHAPES = [  # d, k, k', m_in, m_out: k' < d, and k' > d (the right basis V is a reduction)
    (8, 2, 5, 3, 1),
    (4, 2, 7, 2, 6),
]


@pytest.mark.parametrize(("d", "k", "width", "m_in", "m_out"), SHAPES)
def test_expected_fo_anil_update_matches_monte_carlo(d, k, width, m_in, m_out):
    """Every entry of (E[B+] - B, E[w+] - w) and the loss, against 1e5 fresh tasks; m_out = 1
    and 6 give the same expectation (m_out drops out). Dropping the 1/m_in terms is caught."""
    problem = problem_of(d, k, noise_var=0.7, full_cov=True)
    params = random_params(d, width, seed=1)
    alpha, beta = 0.3, 1.0
    exact, loss = pop.expected_update(params, problem, alpha, beta, m_in)
    mc = monte_carlo_update(FOANIL(alpha, beta), params, problem, m_in, m_out, 100_000,
                                np.random.default_rng(2), tasks_per_batch=250)
    assert mc.n_batches * mc.tasks_per_batch == 100_000
    assert_z(np.r_[mc.mean.B.ravel(), mc.mean.w, mc.loss],
             np.r_[mc.stderr.B.ravel(), mc.stderr.w, mc.loss_stderr],
             np.r_[exact.B.ravel(), exact.w, loss], "FO-ANIL expected update")
    wrong, _ = pop.expected_update(params, problem, alpha, beta, math.inf)
    worst, bound = max_abs_z(np.r_[mc.mean.B.ravel(), mc.mean.w],
                             np.r_[mc.stderr.B.ravel(), mc.stderr.w],
                             np.r_[wrong.B.ravel(), wrong.w])
    assert worst > 2 * bound, "the z-test cannot tell m_in from infinity"


def test_fo_maml_from_zero_head_is_fo_anil():
    """At w = 0 the exact FO-ANIL update is FO-MAML's expected update (Monte Carlo)."""
    problem = problem_of(7, 2, noise_var=0.5)
    params = random_params(7, 4, seed=3, head=0.0)
    exact, loss = pop.expected_update(params, problem, 0.4, 1.0, 3)
    assert np.all(exact.w == 0)
    mc = monte_carlo_update(FOMAML(0.4, 1.0), params, problem, 3, 2, 100_000,
                                np.random.default_rng(4), tasks_per_batch=250)
    assert_z(mc.mean.B, mc.stderr.B, exact.B, "FO-MAML body update at w = 0")
    assert np.max(np.abs(mc.mean.w)) < 6 * np.max(mc.stderr.w)  # E[dw] = 0
    assert_z(mc.loss, mc.loss_stderr, loss, "FO-MAML loss at w = 0")


def test_monte_carlo_update_needs_two_batches():
    problem = problem_of(4, 1, 0.1)
    with pytest.raises(ArgumentError, match="at least 2 batches") as error:
        monte_carlo_update(FOANIL(0.1, 0.1), random_params(4, 2, 0), problem, 2, 2, 150,
                           np.random.default_rng(0), tasks_per_batch=100)
    assert error.value.argument == "n_tasks"


# ----------------------------------------------------------------------------- exact algebra


@pytest.mark.parametrize("m_in", [3, math.inf])
@pytest.mark.parametrize(("d", "k", "width"), [(9, 3, 5), (5, 2, 8), (4, 4, 3)])
def test_coordinates_follow_the_naive_recursion_in_d_dimensions(d, k, width, m_in):
    """30 steps in (H, omega) coordinates, reconstructed, equal the d-dimensional recursion
    with Q in expanded form (metarep.core.reference); so do the losses. Covers k' < d,
    k' > d and d = k."""
    problem = problem_of(d, k, noise_var=0.3, full_cov=True)
    params = random_params(d, width, seed=5, scale=0.4, head=0.3)
    path, losses = exact_trajectory(params, problem, 0.5, 0.3, m_in, 30)
    naive, naive_losses = reference.expected_fo_anil_trajectory(params, problem, 0.5, 0.3,
                                                                m_in, 30)
    for t in range(30):
        assert losses[t] == pytest.approx(naive_losses[t], rel=1e-10)
    np.testing.assert_allclose(path[-1].B, naive[-1].B, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(path[-1].w, naive[-1].w, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("m_in", [3, math.inf])
def test_expected_update_in_d_dimensions_is_the_reference_step(m_in):
    """:func:`metarep.core.infinite.expected_update` (through coordinates) is the update of
    :func:`metarep.core.reference.expected_fo_anil_step`, with the same loss."""
    problem = problem_of(7, 2, noise_var=0.4, full_cov=True)
    params = random_params(7, 5, seed=11, scale=0.5, head=0.4)
    update, loss = pop.expected_update(params, problem, 0.4, 0.6, m_in)
    new, expected_loss = reference.expected_fo_anil_step(params, problem, 0.4, 0.6, m_in)
    np.testing.assert_allclose(update.B, new.B - params.B, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(update.w, new.w - params.w, rtol=1e-10, atol=1e-12)
    assert loss == pytest.approx(expected_loss, rel=1e-10)


@pytest.mark.parametrize(("d", "k", "width", "rank"),
                         [(12, 3, 5, None), (5, 2, 9, None), (12, 3, 1, None), (12, 3, 2, None),
                          (12, 3, 3, None), (12, 3, 6, 2), (12, 3, 6, 4)])
def test_measures_from_coordinates_equal_measures_of_the_reconstructed_B(d, k, width, rank):
    """Every measure (``subspace_dist``, ``span_outside``, ``span_missed`` included) of the
    coordinates ``H`` against ``B_star = [I_k; 0]`` equals that of ``B`` in R^d: k' > k,
    k' < k, k' = k, and a B_0 of rank ``rank`` (with w_0 = 0 the rank is kept, so rank 2 < k
    stays at subspace_dist = span_missed = 1 in both frames)."""
    problem = problem_of(d, k, noise_var=0.3)
    params = random_params(d, width, seed=6)
    if rank is not None:
        mix = np.random.default_rng(7).standard_normal((rank, width))
        params = LinearParams(params.B[:, :rank] @ mix, np.zeros(width))
    if width <= k or rank is not None:  # ||B_0|| = 1 keeps these 7 steps of size 0.2 stable
        params = LinearParams(params.B / np.linalg.norm(params.B, 2), params.w)
    frame, state = pop.coordinates(problem.B_star, params.B, params.w)
    dynamics = pop.ExactFOANIL(problem.Sigma_star, 0.5, 0.2, 4, 0.3, state.H.shape)
    for _ in range(7):
        state, _ = dynamics.step(state)
    Lambda = pop.lambda_stars(dynamics)
    ours = pop.coordinate_measures(state, problem.Sigma_star, Lambda)[0]
    theirs = measure(frame.params(state), problem, Lambda[0])
    assert list(ours) == list(theirs)
    for key, value in theirs.items():
        assert ours[key] == pytest.approx(value, rel=1e-9, abs=1e-12), key
    if min(width, rank or width) < k:
        assert ours["subspace_dist"] == ours["span_missed"] == theirs["subspace_dist"] == 1.0
    again = frame.state([frame.params(state)])  # exact for a rank-deficient B_0 too
    np.testing.assert_allclose(again.H, state.H, atol=1e-12)
    np.testing.assert_allclose(again.omega, state.omega, atol=1e-12)


def test_measures_of_a_batch_equal_each_configurations_own():
    """The measures of stacked configurations of different ranks (full, below k, zero) and
    with and without a ``lambda_err`` target, computed together, equal those of each
    ``B`` in R^d (:func:`metarep.core.measures.measure`) and those computed alone."""
    d, k, width = 12, 3, 6
    problem = problem_of(d, k, noise_var=0.3)
    rng = np.random.default_rng(8)
    full = random_params(d, width, seed=9)
    low = LinearParams(full.B[:, :2] @ rng.standard_normal((2, width)), full.w)
    zero = LinearParams(np.zeros((d, width)), np.zeros(width))
    configs = [full, low, zero, random_params(d, width, seed=10)]
    frame, state = pop.coordinates(problem.B_star, np.stack([p.B for p in configs]),
                                   np.stack([p.w for p in configs]))
    target = np.diag([1.0, 2.0, 3.0])
    Lambda = [target, None, target, 2 * target]
    together = pop.coordinate_measures(state, problem.Sigma_star, Lambda)
    assert [m["subspace_dist"] for m in together][1:3] == [1.0, 1.0]
    assert together[2]["span_outside"] == 0.0 and math.isnan(together[1]["lambda_err"])
    for i, ours in enumerate(together):
        alone = pop.coordinate_measures(state, problem.Sigma_star, Lambda, [i])[0]
        assert list(ours) == list(alone)
        np.testing.assert_array_equal(list(ours.values()), list(alone.values()))
        theirs = measure(frame.params(state, i), problem, Lambda[i])
        assert list(ours) == list(theirs)
        for key, value in theirs.items():
            assert ours[key] == pytest.approx(value, rel=1e-9, abs=1e-12, nan_ok=True), key


def test_cost_and_results_do_not_depend_on_d():
    """The same coordinates embedded in d = 40 and d = 100,000 give the same state sizes and
    the same trajectory; the state is (k + k') x k' however large d is."""
    k, width = 2, 6
    rng = np.random.default_rng(7)
    block = rng.standard_normal((k + width, width)) * 0.5
    results = []
    for d in (40, 100_000):
        B_star = np.eye(d, k)
        B0 = np.zeros((d, width))
        B0[: k + width] = block
        frame, state = pop.coordinates(B_star, B0)
        assert state.H.shape == (1, k + width, width) and frame.V.shape == (1, width, width)
        dynamics = pop.ExactFOANIL(np.diag([1.0, 2.0]), 0.5, 0.3, 5, 0.2, state.H.shape)
        Lambda = pop.lambda_stars(dynamics)
        for _ in range(50):
            state, loss = dynamics.step(state)
        measures = pop.coordinate_measures(state, np.diag([1.0, 2.0]), Lambda)[0]
        results.append((float(loss[0]), measures))
    (loss_a, measures_a), (loss_b, measures_b) = results
    assert loss_a == pytest.approx(loss_b, rel=1e-12)
    for key in measures_a:
        assert measures_a[key] == pytest.approx(measures_b[key], rel=1e-9, abs=1e-12), key


def test_step_never_writes_the_state_it_reads():
    problem = problem_of(6, 2, 0.2)
    _, state = pop.coordinates(problem.B_star, random_params(6, 4, 8).B)
    dynamics = pop.ExactFOANIL(problem.Sigma_star, 0.5, 0.3, 4, 0.2, state.H.shape)
    first, _ = dynamics.step(state)
    kept = first.H.copy()
    second, _ = dynamics.step(first)
    assert second.H is not first.H
    np.testing.assert_array_equal(first.H, kept)  # valid until the next-but-one call
    loss = dynamics.expected_loss(second)
    np.testing.assert_array_equal(dynamics.step(second)[1], loss)


# ----------------------------------------------------------------------------- finite pools


@pytest.mark.slow
def test_finite_pool_trajectory_approaches_the_infinite_one_like_inverse_sqrt_n():
    """||(B_T, w_T) - exact|| after 10 full-batch steps on a pool of N tasks, averaged over 16
    pools per N: the log-log slope in N is -1/2 within 3 standard errors (+ 0.05 for the
    O(1/N) corrections)."""
    problem = problem_of(6, 2, noise_var=0.5)
    params = random_params(6, 4, seed=9, scale=0.5, head=0.3)
    alpha, beta, m_in, m_out, steps = 0.5, 0.3, 4, 4, 10
    exact = exact_trajectory(params, problem, alpha, beta, m_in, steps)[0][-1]
    method, sizes, repeats = FOANIL(alpha, beta), np.array([200, 800, 3200, 12800]), 16
    means, errors = [], []
    for n in sizes:
        gaps = []
        for r in range(repeats):
            pool = sample_tasks(problem, int(n), m_in, m_out, np.random.default_rng([n, r]))
            state = params
            for _ in range(steps):
                state, _ = method.step(state, pool)
            gaps.append(np.sqrt(np.sum((state.B - exact.B) ** 2)
                                + np.sum((state.w - exact.w) ** 2)))
        means.append(np.mean(gaps))
        errors.append(np.std(gaps, ddof=1) / np.sqrt(repeats) / np.mean(gaps))
    x, y, weights = np.log(sizes), np.log(means), 1 / np.square(errors)
    design = np.stack([np.ones_like(x), x], axis=1)
    covariance = np.linalg.inv(design.T @ (weights[:, None] * design))
    slope = (covariance @ design.T @ (weights * y))[1]
    assert abs(slope + 0.5) <= 3 * np.sqrt(covariance[1, 1]) + 0.05, (slope, means)


# ----------------------------------------------------------------------------- limits


def test_lambda_star_reached_to_1e_8_in_a_paper_like_setting():
    """d = k' = 50, k = 5, m_in = 20, sigma^2 = 4, Sigma_star ~ diag(1..5), the built-in paper
    step sizes: C C^T reaches the closed form Lambda_star (written out here) within 1e-8."""
    problem = problem_of(50, 5, noise_var=4.0)
    B0 = init_linear(50, 50, 1.0, np.random.default_rng(2)).B
    _, state = pop.coordinates(problem.B_star, B0)
    dynamics = pop.ExactFOANIL(problem.Sigma_star, 1.0, 0.5, 20, 4.0, state.H.shape)
    for _ in range(500):
        state, _ = dynamics.step(state, with_loss=False)
    C = state.H[0, :5]
    s = np.diag(problem.Sigma_star)
    expected = np.diag(s / (1.0 * ((1 + 1 / 20) * s + (s.sum() + 4.0) / 20)))
    assert np.linalg.norm(C @ C.T - expected, 2) <= 1e-8
    Lambda = pop.lambda_stars(dynamics)
    np.testing.assert_allclose(Lambda[0], expected, rtol=1e-12)
    assert pop.coordinate_measures(state, problem.Sigma_star, Lambda)[0]["lambda_err"] <= 1e-8


def test_undriven_directions_keep_their_size_with_infinite_m_in_and_shrink_otherwise():
    """From w_0 = 0, ||B_perp^T B_t P|| (P: kernel of C_0) is conserved for m_in = inf and
    perp_norm converges to it; for m_in = 5 it decays like (2 beta alpha^2 c t)^{-1/2},
    c = (tr Sigma + sigma^2) / m_in (the scalar ODE x' = -beta alpha^2 c x^3 per direction)."""
    problem = problem_of(10, 2, noise_var=0.5)
    B0 = init_linear(10, 6, 1.0, np.random.default_rng(1)).B
    alpha, beta = 0.5, 0.5
    for m_in in (math.inf, 5):
        _, state = pop.coordinates(problem.B_star, B0)
        _, _, Vt = np.linalg.svd(state.H[0, :2])
        kernel = np.eye(6) - Vt[:2].T @ Vt[:2]
        initial = np.linalg.norm(state.H[0, 2:] @ kernel, 2)
        predicted = pop.undriven_perp_norm(state, 2)[0]
        assert predicted == pytest.approx(initial, rel=1e-12) and initial > 0.3
        dynamics = pop.ExactFOANIL(problem.Sigma_star, alpha, beta, m_in, 0.5, state.H.shape)
        Lambda = pop.lambda_stars(dynamics)
        for _ in range(20_000):
            state, _ = dynamics.step(state, with_loss=False)
        kept = np.linalg.norm(state.H[0, 2:] @ kernel, 2)
        perp = pop.coordinate_measures(state, problem.Sigma_star, Lambda)[0]["perp_norm"]
        if math.isinf(m_in):
            assert kept == pytest.approx(initial, rel=1e-10)
            assert perp == pytest.approx(predicted, rel=1e-8)
        else:
            c = (np.trace(problem.Sigma_star) + 0.5) / m_in
            assert kept < 0.05 * initial
            assert perp * np.sqrt(2 * beta * alpha**2 * c * 20_000) == pytest.approx(1, abs=0.01)


# ----------------------------------------------------------------------------- batches


CONFIGS = pd.DataFrame({"inner_lr": [0.5, 0.3, 0.5, 0.4], "outer_lr": [0.3, 0.5, 0.2, 0.3],
                        "m_in": [4, math.inf, 10, 2], "noise_var": [0.5, 0.0, 1.0, 0.2],
                        "seed": [0, 1, 2, 0]})


def test_simulate_batch_equals_one_configuration_at_a_time():
    problem = problem_of(9, 2, noise_var=0.5)
    kwargs = {"width": 5, "init_scale": 1.0, "steps": 40, "record_every": 15}
    batch = simulate_batch(problem, CONFIGS, **kwargs)
    assert list(batch["step"].unique()) == [0, 15, 30, 40]
    assert set(batch["config"]) == {0, 1, 2, 3} and not batch["diverged"].any()
    for i in range(len(CONFIGS)):
        alone = simulate_batch(problem, CONFIGS.iloc[[i]], **kwargs)
        mine = batch[batch["config"] == i].drop(columns="config").reset_index(drop=True)
        pd.testing.assert_frame_equal(mine, alone.drop(columns="config"), rtol=1e-10)
    first = batch[(batch["config"] == 0) & (batch["step"] == 40)].iloc[0]
    B0 = init_linear(9, 5, 1.0, seed_rng(0, Purpose.MODEL)).B  # `metarep run`'s B_0, seed 0
    path, _ = exact_trajectory(LinearParams(B0, np.zeros(5)), problem, 0.5, 0.3, 4, 40)
    assert first["perp_norm"] == pytest.approx(
        measure(path[-1], problem, lambda_star(problem, 4, 0.5))["perp_norm"],
        rel=1e-9)


def test_simulate_batch_records_on_the_log_grid():
    """``record_every="log"``: the rows of every configuration are at the steps of the
    geometric schedule (step 0, every step up to 11, ~20 per decade, and ``steps``), and equal
    those of an integer schedule at the steps both record."""
    problem = problem_of(9, 2, noise_var=0.5)
    kwargs = {"width": 5, "init_scale": 1.0, "steps": 150}
    frame = simulate_batch(problem, CONFIGS.iloc[:2], **kwargs, record_every="log")
    expected = list(RecordSchedule(150, "log").steps())
    assert expected[:12] == list(range(12)) and expected[-1] == 150
    for i in (0, 1):
        assert frame[frame["config"] == i]["step"].tolist() == expected
    assert not frame["diverged"].any()
    every = simulate_batch(problem, CONFIGS.iloc[:2], **kwargs, record_every=1)
    pd.testing.assert_frame_equal(every[every["step"].isin(expected)].reset_index(drop=True),
                                  frame.reset_index(drop=True), rtol=1e-12)
    with pytest.raises(ArgumentError) as error:
        simulate_batch(problem, CONFIGS.iloc[:1], **kwargs, record_every="loga")
    assert error.value.argument == "record_every"


def test_grid_is_the_cartesian_product():
    frame = grid(inner_lr=[0.1, 0.2], m_in=[5, math.inf], seed=[0, 1, 2])
    assert len(frame) == 12 and list(frame.columns) == ["inner_lr", "m_in", "seed"]
    with pytest.raises(ArgumentError, match="unknown grid axes") as error:
        grid(width=[1])
    assert error.value.argument == "axes"


def test_a_diverging_configuration_is_frozen_and_flagged():
    """simulate_batch applies the loop's divergence rule at every step: config 1 (outer_lr 50)
    explodes between the records of steps 0 and 20, so its rows from step 20 on are flagged
    with nan measures; config 0 is unaffected."""
    problem = problem_of(9, 2, noise_var=0.5)
    configs = CONFIGS.iloc[:2].assign(outer_lr=[0.3, 50.0])
    kwargs = {"width": 5, "init_scale": 1.0, "steps": 60, "record_every": 20}
    frame = simulate_batch(problem, configs, **kwargs)
    bad = frame[frame["config"] == 1].reset_index(drop=True)
    assert list(bad["step"]) == [0, 20, 40, 60]
    assert list(bad["diverged"]) == [False, True, True, True]
    assert np.isfinite(bad["train_loss"].iloc[0]) and np.isfinite(bad["perp_norm"].iloc[0])
    assert bad["train_loss"].iloc[1:].isna().all() and bad["perp_norm"].iloc[1:].isna().all()
    measures = [c for c in frame.columns if c.startswith("sv_") or c in ("subspace_dist",
                                                                         "lambda_err")]
    assert measures and bad[measures].iloc[1:].isna().all().all()
    good = frame[frame["config"] == 0].drop(columns="config").reset_index(drop=True)
    assert not good["diverged"].any()
    alone = simulate_batch(problem, configs.iloc[[0]], **kwargs).drop(columns="config")
    pd.testing.assert_frame_equal(good, alone, rtol=1e-10)


def _divergence_step(dynamics: pop.ExactFOANIL, state: pop.InfiniteTaskState, steps: int) -> int:
    """The step at which a batch of one diverges by the rule of metarep.run.loop, stepped
    here by hand: ``t`` where its loss is non-finite or above EXPLOSION_FACTOR times the loss
    at step 0, or ``t + 1`` when the state after step ``t`` has a non-finite entry."""
    first = None
    with np.errstate(over="ignore", invalid="ignore"):
        for t in range(steps + 1):
            new, loss = dynamics.step(state)
            first = loss[0] if first is None else first
            if not np.isfinite(loss[0]) or loss[0] > EXPLOSION_FACTOR * max(first, 1e-12):
                return t
            if not new.is_finite():
                return t + 1
            state = new  # the dynamics never write the state they read
    raise AssertionError("the configuration does not diverge")


class CheckedStepper(ExactStepper):
    """An ExactStepper that records, per call, the step it starts at, how many steps it takes
    and whether every configuration of the state it is given is finite; with
    ``blocks=False`` it declines to take several steps per call (as on a device)."""

    def __init__(self, dynamics: pop.ExactFOANIL, Lambda_star: np.ndarray, blocks: bool):
        super().__init__(dynamics, Lambda_star)
        self.blocks = blocks
        self.calls: list[tuple[int, int]] = []
        self.inputs_finite: list[np.ndarray] = []

    def step(self, state, t):
        self.calls.append((t, 1))
        self.inputs_finite.append(state.finite())
        return super().step(state, t)

    def advance(self, state, t, count):
        if not self.blocks:
            return None
        self.calls.append((t, count))
        self.inputs_finite.append(state.finite())
        return super().advance(state, t, count)


@pytest.mark.parametrize("blocks", [True, False])
def test_divergence_between_two_record_steps_is_caught_at_that_step(blocks):
    """Through the training loop with the exact stepper, two configurations, records every 25
    steps: the one with outer_lr 50 diverges a few steps after step 0 and is stopped exactly at
    the step the rule gives (not at the next record step); its last record is step 0, its
    kept state is finite, no non-finite state is ever handed to the stepper, and the other
    configuration runs to the end as it does alone. The same whether the steps between
    records are taken in one call each of the compiled loop (the block that holds the
    divergence is then taken again up to it) or one at a time by the array operations."""
    problem = problem_of(9, 2, noise_var=0.5)
    B0 = np.stack([init_linear(9, 5, 1.0, seed_rng(seed, Purpose.MODEL)).B for seed in (0, 1)])
    _, state = pop.coordinates(problem.B_star, B0, keep_basis=False)
    steps, every = 60, 25
    dynamics = pop.ExactFOANIL(problem.Sigma_star, [0.5, 0.3], [0.3, 50.0], [4, math.inf],
                               [0.5, 0.0], state.H.shape, compiled=blocks)
    alone = [pop.ExactFOANIL(problem.Sigma_star, a, b, m, s2, (1, *state.H.shape[1:]),
                             compiled=blocks)
             for a, b, m, s2 in ((0.5, 0.3, 4, 0.5), (0.3, 50.0, math.inf, 0.0))]
    expected = _divergence_step(alone[1], state.take(1), steps)
    assert 0 < expected < every  # strictly between the records of steps 0 and 25

    stepper = CheckedStepper(dynamics, pop.lambda_stars(dynamics), blocks)
    trajectories = [Trajectory(None, 0) for _ in range(2)]
    outcome = train(stepper, state, trajectories, schedule=RecordSchedule(steps, every),
                    advice=["lower it"] * 2, progress=False)
    assert outcome[0] is None and isinstance(outcome[1], Diverged)
    assert outcome[1].step == expected
    assert all(finite.all() for finite in stepper.inputs_finite)
    assert max(t + count for t, count in stepper.calls) == steps + 1
    if blocks:  # steps 1-24, 26-49 and 51-59 in one call each, and the block replayed
        assert (1, 24) in stepper.calls and (26, 24) in stepper.calls
        stopped = trajectories[1].step
        assert (1, stopped - 1) in stepper.calls or stopped == 1
    else:
        assert stepper.calls == [(t, 1) for t in range(steps + 1)]
    bad = trajectories[1]
    assert [r["step"] for r in bad.records] == [0]
    assert bad.step in (expected, expected - 1) and bad.step < every
    assert bad.state.is_finite()
    kept = state.take(1)
    for _ in range(bad.step):  # the state it stopped at, computed alone
        kept, _ = alone[1].step(kept)
    np.testing.assert_allclose(bad.state.H, kept.H, rtol=1e-10, atol=1e-12)
    assert [r["step"] for r in trajectories[0].records] == [0, 25, 50, 60]
    good_alone = [Trajectory(None, 0)]
    train(ExactStepper(alone[0], pop.lambda_stars(alone[0])), state.take(0), good_alone,
          schedule=RecordSchedule(steps, every), advice=["lower it"], progress=False)
    for ours, theirs in zip(trajectories[0].records, good_alone[0].records, strict=True):
        assert list(ours) == list(theirs)
        for key, value in theirs.items():
            assert ours[key] == pytest.approx(value, rel=1e-10, abs=1e-14), key


def test_bad_hyper_parameters_are_rejected():
    with pytest.raises(ArgumentError, match="m_in: must be >= 1") as error:
        pop.ExactFOANIL(np.eye(2), 0.1, 0.1, 0.5, 0.0, (1, 4, 3))
    assert error.value.argument == "m_in"
    with pytest.raises(ArgumentError, match="outer_lr: must be > 0") as error:
        pop.ExactFOANIL(np.eye(2), 0.1, [0.1, 0.0], 5, 0.0, (2, 4, 3))
    assert error.value.argument == "outer_lr"


# ----------------------------------------------------------------------------- runs and CLI


def test_run_state_round_trips_through_arrays(tmp_path):
    """An infinite-task run's state (coordinates on the frame of its B_0) starts at B_0 and
    survives the round trip through the arrays of checkpoint.npz bit for bit."""
    init = random_params(8, 5, 10)
    write_npz(tmp_path / "init.npz", B=init.B, w=init.w)
    backend = prepare(load_config("quick", {
        "tasks.n": "infinite", "problem.d": 8, "problem.k": 2, "problem.noise_var": 0.3,
        "model.init_from": str(tmp_path / "init.npz"), "tasks.m_in": 4,
        "method.inner_lr": 0.5, "method.outer_lr": 0.3}))
    state = backend.initial_state()
    np.testing.assert_allclose(backend.params(state).B, init.B, atol=1e-12)
    np.testing.assert_allclose(backend.params(state).w, init.w, atol=1e-12)
    for t in range(5):
        state, loss = backend.step(state, t)
        assert loss.shape == (1,) and np.isfinite(loss[0])
    state = backend.take(state, 0)  # a copy, valid whatever the dynamics compute next
    restored = backend.restore(backend.state_arrays(state))
    np.testing.assert_array_equal(restored.H, state.H)
    np.testing.assert_array_equal(restored.omega, state.omega)
    assert restored.H.dtype == state.H.dtype and restored.omega.dtype == state.omega.dtype


SMALL = ["--set", "train.steps=60", "--set", "train.record_every=20", "--set",
         "eval.n_tasks=200", "--set", "eval.shots=[5,20]", "--no-progress"]


@pytest.mark.slow
def test_cli_infinite_run_writes_the_usual_outputs_with_theory(cli, tmp_path):
    infinite, pool = tmp_path / "infinite", tmp_path / "pool"
    result = cli("run", "quick", "--set", "tasks.n=infinite", "--out",
                                 str(infinite), *SMALL)
    assert result.exit_code == 0, result.output
    result = cli("run", "quick", "--set", "tasks.n=50", "--out", str(pool),
                                 *SMALL)
    assert result.exit_code == 0, result.output
    metrics = pd.read_csv(infinite / "metrics.csv")
    assert list(metrics.columns) == list(pd.read_csv(pool / "metrics.csv").columns)
    assert list(metrics["step"]) == [0, 20, 40, 60]
    params = np.load(infinite / "params.npz")
    assert params["B"].shape == (20, 20) and params["w"].shape == (20,)
    summary = json.loads((infinite / "summary.json").read_text())
    limits = summary["theory"]["limits"]
    assert limits["perp_norm"]["theory"] == 0.0 and limits["train_loss"]["theory"] > 0
    assert summary["theory"]["regime"].startswith("infinitely many tasks")
    assert [row["shots"] for row in summary["theory"]["test_risk"]] == [5, 20]
    for run in (infinite, pool):
        rows = pd.read_csv(run / "eval.csv")
        assert rows[rows["method"] == "fo-anil"]["theory"].notna().all()
    truth = Problem(params["B_star"], params["Sigma_star"], 1.0)  # the reconstructed B
    recorded = measure(LinearParams(params["B"], params["w"]), truth,
                       np.array(summary["theory"]["lambda_star"]))
    for key in ("perp_norm", "subspace_dist", "lambda_err", "sv_1"):
        assert recorded[key] == pytest.approx(metrics.iloc[-1][key], rel=1e-9, abs=1e-12)


@pytest.mark.slow
def test_cli_infinite_m_in_predicts_the_kept_perp_norm(cli, tmp_path):
    out = tmp_path / "inf"
    result = cli("run", "quick", "--set", "tasks.n=infinite", "--set",
                                 "tasks.m_in=.inf", "--out", str(out), *SMALL)
    assert result.exit_code == 0, result.output
    limits = json.loads((out / "summary.json").read_text())["theory"]["limits"]
    assert limits["perp_norm"]["theory"] > 0.1
    assert limits["perp_norm"]["final"] >= limits["perp_norm"]["theory"] * (1 - 1e-9)


@pytest.mark.parametrize(("overrides", "key"), [
    (["tasks.m_in=inf"], "tasks.m_in"),
    (["tasks.n=infinite", "method.name=mtl"], "method.name"),
    (["tasks.n=infinite", "train.tasks_per_step=5"], "train.tasks_per_step"),
    (["tasks.n=infinite", "method.name=maml", "method.inner_steps=2"], "method.inner_steps"),
    (["tasks.n=infinite", "method.inner_steps=4"], "method.inner_steps"),
    (["tasks.n=infinite", "method.name=anil", "train.backend=torch"], "train.backend"),
    (["tasks.n=infinite", "method.name=maml", "train.device=cuda"], "train.device"),
    (["tasks.n=infinite", "tasks.m_in=0"], "tasks.m_in"),
    (["tasks.n=infinite", "tasks.from=pool.npz"], "tasks.from"),
    (["tasks.n=infinite", "model.kind=relu"], "tasks.n"),
])
def test_cli_rejects_bad_infinite_configs(cli, tmp_path, overrides, key):
    out = tmp_path / "bad"
    args = [item for o in overrides for item in ("--set", o)]
    result = cli("run", "quick", *args, "--out", str(out), "--no-progress")
    assert result.exit_code == EXIT_BAD_INPUT
    assert result.stderr.startswith(f"error: {key}") and not out.exists()


def test_cli_fo_maml_infinite_from_a_head_runs_its_own_dynamics(cli, tmp_path):
    """From w_0 != 0, FO-MAML's exact dynamics are its own (not FO-ANIL's): the run goes, and
    the summary gives no FO-ANIL limits for it (its scope says the head is not zero)."""
    init = tmp_path / "init.npz"
    write_npz(init, B=0.05 * np.ones((20, 4)), w=0.2 * np.ones(4))
    out = tmp_path / "run"
    result = cli("run", "quick", "--set", "tasks.n=infinite", "--set",
                 "method.name=fo-maml", "--set", f"model.init_from={init}", "--set",
                 "train.steps=50", "--set", "eval.n_tasks=50", "--out", str(out),
                 "--no-progress", "--no-figures")
    assert result.exit_code == 0, result.stderr
    theory = json.loads((out / "summary.json").read_text())["theory"]
    assert theory["scope"]["zero_head"] is False and theory["limits"] is None


@pytest.mark.parametrize("spelling", [".inf", "inf", "Infinity", "infinite"])
def test_infinite_m_in_spellings_and_yaml_round_trip(spelling):
    config = load_config("quick", ["tasks.n=infinite", f"tasks.m_in={spelling}"])
    assert config.tasks.n == "infinite" and math.isinf(config.tasks.m_in)
    text = dump_yaml(config)
    assert "m_in: .inf" in text
    assert dump_yaml(config.replace()) == text  # what --resume compares


@pytest.mark.slow
def test_cli_infinite_divergence_keeps_the_records(cli, tmp_path):
    out = tmp_path / "diverged"
    result = cli("run", "quick", "--set", "tasks.n=infinite", "--set",
                                 "method.outer_lr=50", "--out", str(out), "--no-progress")
    assert result.exit_code == EXIT_DIVERGED and "diverged at step" in result.stderr
    assert json.loads((out / "summary.json").read_text())["status"] == "diverged"
    assert len(pd.read_csv(out / "metrics.csv")) >= 1


@pytest.mark.slow
def test_cli_infinite_resume_continues_to_the_same_result(cli, tmp_path):
    """Interrupted after the record (and checkpoint) of step 40, resumed by the CLI from the
    reconstructed B, w of the checkpoint: the same final state up to rounding."""
    args = ["run", "quick", "--set", "tasks.n=infinite", *SMALL]
    reference_run, out = tmp_path / "reference", tmp_path / "run"
    assert cli(*args, "--out", str(reference_run)).exit_code == 0
    overrides = ["tasks.n=infinite", *SMALL[1:-1:2]]  # the values of the --set options
    assert len(overrides) == 5 and all("=" in item for item in overrides)

    def interrupt(trajectory):
        if trajectory.step == 40:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_experiment(load_config("quick", overrides), out, progress=False,
                       on_record=interrupt, checkpoint_seconds=0.0)
    with np.load(out / "checkpoint.npz") as data:
        assert int(data["step"]) == 40
    assert not (out / "params.npz").exists()
    result = cli(*args, "--out", str(out), "--resume")
    assert result.exit_code == 0, result.output
    with np.load(out / "params.npz") as resumed, \
            np.load(reference_run / "params.npz") as straight:
        np.testing.assert_allclose(resumed["B"], straight["B"], rtol=1e-9, atol=1e-12)
    pd.testing.assert_frame_equal(pd.read_csv(out / "metrics.csv"),
                                  pd.read_csv(reference_run / "metrics.csv"), rtol=1e-9)


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_advance_is_the_steps_one_at_a_time_bit_for_bit(dtype):
    """ExactFOANIL.advance: j steps then count - j steps, count single steps and one call of
    count steps give the same state, losses and finiteness bit for bit (the property the
    loop's blocks rely on), leaving the input state unchanged; each configuration of a batch
    is computed as it is alone."""
    problem = problem_of(9, 2, noise_var=0.5)
    B0 = np.stack([init_linear(9, 5, 1.0, seed_rng(seed, Purpose.MODEL)).B for seed in (0, 1)])
    _, state = pop.coordinates(problem.B_star, B0, keep_basis=False, dtype=dtype)
    before = state.H.copy()
    dynamics = pop.ExactFOANIL(problem.Sigma_star, [0.5, 0.3], [0.3, 0.2], [4, math.inf],
                               [0.5, 0.0], state.H.shape, dtype, compiled=True)
    whole = dynamics.advance(state, 30)
    first = dynamics.advance(state, 11)
    rest = dynamics.advance(first.state, 19)
    np.testing.assert_array_equal(state.H, before)
    single, losses = state, []
    for _ in range(30):
        single, loss = dynamics.step(single)
        losses.append(loss)
    for other, other_losses in ((rest.state, np.concatenate([first.losses, rest.losses])),
                                (single, np.stack(losses))):
        np.testing.assert_array_equal(other.H, whole.state.H)
        np.testing.assert_array_equal(other.omega, whole.state.omega)
        np.testing.assert_array_equal(other_losses, whole.losses)
    assert whole.losses.shape == (30, 2) and whole.finite.all()
    alone = pop.ExactFOANIL(problem.Sigma_star, 0.3, 0.2, math.inf, 0.0,
                            (1, *state.H.shape[1:]), dtype, compiled=True).advance(state.take(1),
                                                                                    30)
    np.testing.assert_array_equal(alone.state.H[0], whole.state.H[1])
    np.testing.assert_array_equal(alone.losses[:, 0], whole.losses[:, 1])
    assert dynamics.advance(state, 0).losses.shape == (0, 2)
    arrays = pop.ExactFOANIL(problem.Sigma_star, [0.5, 0.3], [0.3, 0.2], [4, math.inf],
                             [0.5, 0.0], state.H.shape, dtype)
    stepped = state
    for _ in range(30):
        stepped, _ = arrays.step(stepped)
    tolerance = 1e-5 if dtype == np.float32 else 1e-12  # the same formulas, other rounding
    np.testing.assert_allclose(stepped.H, whole.state.H, rtol=tolerance, atol=tolerance)


def test_the_loop_records_the_same_numbers_in_blocks_and_step_by_step():
    """A run of the compiled exact stepper on the log grid: the records of the loop taking
    the steps between records in one call each equal, bit for bit, those of one step per
    call."""
    problem = problem_of(9, 2, noise_var=0.5)
    B0 = np.stack([init_linear(9, 5, 1.0, seed_rng(seed, Purpose.MODEL)).B for seed in (0, 1)])
    _, state = pop.coordinates(problem.B_star, B0, keep_basis=False)
    records = []
    for blocks in (True, False):
        dynamics = pop.ExactFOANIL(problem.Sigma_star, [0.5, 0.3], [0.3, 0.2], [4, math.inf],
                                   [0.5, 0.0], state.H.shape, compiled=True)
        stepper = CheckedStepper(dynamics, pop.lambda_stars(dynamics), blocks)
        trajectories = [Trajectory(None, 0) for _ in range(2)]
        train(stepper, state, trajectories, schedule=RecordSchedule(3000, "log"),
              advice=["lower it"] * 2, progress=False)
        records.append([t.records for t in trajectories])
        assert any(count > 100 for _, count in stepper.calls) == blocks
    assert records[0] == records[1]


def test_long_runs_of_few_configurations_use_the_compiled_loop():
    """use_compiled: a run of COMPILED_MIN_STEPS steps or more, alone or with up to
    COMPILED_MAX_CONFIGS configurations, on numpy; not shorter runs, larger batches or torch;
    a compiled run's backend takes its steps in blocks and equals the array operations' run
    to rounding (the run reads back its config's choice)."""
    from metarep.run.backends import infinite as backend

    steps, configs = backend.COMPILED_MIN_STEPS, backend.COMPILED_MAX_CONFIGS
    assert backend.use_compiled(steps, 1) and backend.use_compiled(steps, configs)
    assert not backend.use_compiled(steps - 1, 1)
    assert not backend.use_compiled(steps, configs + 1)
    assert not backend.use_compiled(steps, 1, xp=object())
    problem = problem_of(9, 2, noise_var=0.5)
    B0 = init_linear(9, 5, 1.0, seed_rng(0, Purpose.MODEL)).B
    _, state = pop.coordinates(problem.B_star, B0, keep_basis=False)
    with pytest.raises(ArgumentError, match="compiled=True") as error:
        pop.ExactFOANIL(problem.Sigma_star, 0.5, 0.3, 4, 0.5, state.H.shape).advance(state, 3)
    assert error.value.argument == "compiled"
    from metarep.run.backends import build_backend
    from metarep.run.schema import from_dict

    for run_steps in (steps - 1, steps):
        config = from_dict({}, {"tasks.n": "infinite", "train.steps": run_steps,
                                "problem.d": 9, "model.width": 5})
        run = build_backend(config)
        assert run.stepper.dynamics.compiled == (run_steps == steps)
        assert (run.advance(run.initial, 0, 3) is not None) == (run_steps == steps)
