"""metarep.core.problem and metarep.core.tasks: the ground truth, sampled tasks (moments by
z-tests) and task files (metarep.run.inputs.load_pool).

Every Monte Carlo check compares an estimate with its exact value in units of the estimate's
own standard error (known in closed form for Gaussian data) and allows ``Z_MAX`` of them; the
seeds are fixed, so the tests are deterministic.
"""

from __future__ import annotations

import numpy as np
import pytest

from metarep.core.problem import (
    Problem,
    diagonal_frame,
    head_covariance,
    make_problem,
    random_orthonormal,
)
from metarep.core.tasks import (
    TaskBatch,
    TaskPool,
    head_second_moment,
    residual_noise_var,
    sample_heads,
    sample_tasks,
    task_pool,
)
from metarep.errors import ArgumentError, ConfigError
from metarep.run.inputs import load_pool

Z_MAX = 5.0  # |z| bound of every z-test (two-sided p ~ 6e-7 per test under the null)


def assert_z(estimate, expected, stderr, what: str) -> None:
    """Elementwise ``|estimate - expected| <= Z_MAX * stderr``."""
    z = (np.asarray(estimate) - np.asarray(expected)) / np.asarray(stderr)
    assert np.all(np.abs(z) <= Z_MAX), f"{what}: max |z| = {np.max(np.abs(z)):.2f}"


def problem_of(d=6, k=3, noise_var=2.0, head_cov="linear", seed=0) -> Problem:
    return make_problem(d, k, noise_var, head_cov, np.random.default_rng(seed))


# ----------------------------------------------------------------------------- ground truth


def test_head_covariance_variants():
    np.testing.assert_array_equal(head_covariance("isotropic", 4), np.eye(4))
    linear = head_covariance("linear", 4)
    np.testing.assert_allclose(np.diag(linear), np.arange(1, 5) * 4 / 10, rtol=1e-15)
    assert np.trace(linear) == pytest.approx(4.0, rel=1e-15)
    np.testing.assert_array_equal(linear, np.diag(np.diag(linear)))
    np.testing.assert_array_equal(head_covariance((0.5, 2.0, 3.0), 3), np.diag([0.5, 2.0, 3.0]))
    np.testing.assert_array_equal(head_covariance([1.0], 1), np.eye(1))


@pytest.mark.parametrize(("spec", "k"), [("diagonal", 2), ((1.0, 2.0), 3), ((1.0, -1.0), 2),
                                         ((1.0, np.inf), 2)])
def test_head_covariance_rejects(spec, k):
    with pytest.raises(ArgumentError) as info:
        head_covariance(spec, k)
    assert info.value.argument == "spec"


@pytest.mark.parametrize(("d", "k"), [(1, 1), (5, 5), (50, 5), (7, 3)])
def test_B_star_has_orthonormal_columns(d, k):
    B_star = random_orthonormal(d, k, np.random.default_rng(d + k))
    assert B_star.shape == (d, k)
    np.testing.assert_allclose(B_star.T @ B_star, np.eye(k), atol=1e-13)


def test_B_star_is_haar_distributed_projector_mean():
    """E[B_star B_star^T] = (k/d) I for a uniformly random frame; each entry of the average
    projector over n frames is checked against its Monte Carlo error."""
    d, k, n = 5, 2, 4000
    rng = np.random.default_rng(7)
    projectors = np.stack([(b := random_orthonormal(d, k, rng)) @ b.T for _ in range(n)])
    mean = projectors.mean(axis=0)
    stderr = projectors.std(axis=0, ddof=1) / np.sqrt(n)
    assert_z(mean, k / d * np.eye(d), stderr, "E[B_star B_star^T]")


def test_problem_perp_is_the_orthogonal_projection():
    problem = problem_of(d=7, k=2)
    M = np.random.default_rng(1).standard_normal((7, 4))
    projector = np.eye(7) - problem.B_star @ problem.B_star.T
    np.testing.assert_allclose(problem.perp(M), projector @ M, atol=1e-14)
    assert (problem.d, problem.k) == (7, 2)


# ----------------------------------------------------------------------------- sampled tasks


@pytest.fixture(scope="module", params=["numpy", "torch"])
def big_batch(request) -> tuple[Problem, TaskBatch]:
    """4000 tasks drawn by each sampler of ``tasks.sampler`` (torch's in float32, the dtype
    it is for): every moment test below runs on both."""
    problem = problem_of(d=6, k=3, noise_var=2.0)
    if request.param == "numpy":
        return problem, sample_tasks(problem, 4000, 12, 8, np.random.default_rng(11))
    pytest.importorskip("torch")
    from metarep.engine.tasks import sample_tasks_torch
    return problem, sample_tasks_torch(problem, 4000, 12, 8, np.random.SeedSequence(11),
                                       np.float32)


def test_shapes_and_split(big_batch):
    _, batch = big_batch
    assert batch.X_in.shape == (4000, 12, 6) and batch.y_in.shape == (4000, 12)
    assert batch.X_out.shape == (4000, 8, 6) and batch.y_out.shape == (4000, 8)
    assert batch.heads.shape == (4000, 3)
    assert (batch.n_tasks, batch.m_in, batch.m_out, batch.d) == (4000, 12, 8, 6)
    X, y = batch.full()
    np.testing.assert_array_equal(X[:, :12], batch.X_in)
    np.testing.assert_array_equal(y[:, 12:], batch.y_out)


def test_inputs_are_standard_normal(big_batch):
    """E[x] = 0, Cov x = I_d (Var of x_a x_b is 2 on the diagonal, 1 off it), E[x^4] = 3."""
    _, batch = big_batch
    x = batch.full()[0].reshape(-1, batch.d)
    n, d = x.shape
    assert_z(x.mean(axis=0), 0.0, 1 / np.sqrt(n), "E[x]")
    second = x.T @ x / n
    assert_z(second, np.eye(d), np.sqrt((1 + np.eye(d)) / n), "Cov x")
    assert_z((x**4).mean(axis=0), 3.0, np.sqrt(96 / n), "E[x^4]")


def test_heads_have_mean_zero_and_covariance_sigma_star(big_batch):
    """Gaussian heads: Var(w_a w_b) = S_aa S_bb + S_ab^2."""
    problem, batch = big_batch
    heads, Sigma = batch.heads, problem.Sigma_star
    n = heads.shape[0]
    assert_z(heads.mean(axis=0), 0.0, np.sqrt(np.diag(Sigma) / n), "E[w_star]")
    variance = np.outer(np.diag(Sigma), np.diag(Sigma)) + Sigma**2
    assert_z(heads.T @ heads / n, Sigma, np.sqrt(variance / n), "Cov w_star")


def test_labels_are_signal_plus_independent_noise(big_batch):
    """``e = y - X B_star w_star`` (with the stored heads, in and out rows alike) has mean 0,
    variance sigma^2 (Var e^2 = 2 sigma^4) and is uncorrelated with x."""
    problem, batch = big_batch
    signal = problem.B_star @ batch.heads.T  # (d, N)
    for X, y in ((batch.X_in, batch.y_in), (batch.X_out, batch.y_out)):
        noise = y - np.einsum("nmd,dn->nm", X, signal)
        e = noise.ravel()
        n, s2 = e.size, problem.noise_var
        assert_z(e.mean(), 0.0, np.sqrt(s2 / n), "E[eps]")
        assert_z((e**2).mean(), s2, np.sqrt(2 * s2**2 / n), "Var eps")
        assert_z(X.reshape(-1, batch.d).T @ e / n, 0.0, np.sqrt(s2 / n), "E[eps x]")


def test_noise_free_labels_are_exact():
    problem = problem_of(noise_var=0.0)
    batch = sample_tasks(problem, 50, 4, 3, np.random.default_rng(0))
    X, y = batch.full()
    np.testing.assert_allclose(y, np.einsum("nmd,nd->nm", X, batch.heads @ problem.B_star.T),
                               atol=1e-13)


def test_sample_heads_moments():
    problem = problem_of(k=4, head_cov=(0.5, 1.0, 2.0, 4.0))
    heads = sample_heads(problem, 20000, np.random.default_rng(3))
    Sigma = problem.Sigma_star
    variance = np.outer(np.diag(Sigma), np.diag(Sigma)) + Sigma**2
    assert_z(heads.T @ heads / 20000, Sigma, np.sqrt(variance / 20000), "Cov w_star")


def test_same_seed_same_numbers_different_seed_different_numbers():
    problem = problem_of()
    first = sample_tasks(problem, 20, 3, 2, np.random.default_rng(5))
    again = sample_tasks(problem, 20, 3, 2, np.random.default_rng(5))
    other = sample_tasks(problem, 20, 3, 2, np.random.default_rng(6))
    for name in ("X_in", "y_in", "X_out", "y_out", "heads"):
        np.testing.assert_array_equal(getattr(first, name), getattr(again, name))
        assert not np.array_equal(getattr(first, name), getattr(other, name))
    np.testing.assert_array_equal(problem_of(seed=3).B_star, problem_of(seed=3).B_star)
    assert not np.array_equal(problem_of(seed=3).B_star, problem_of(seed=4).B_star)


def test_float32_tasks_are_the_float64_tasks_rounded():
    problem = problem_of()
    wide = sample_tasks(problem, 10, 3, 2, np.random.default_rng(5))
    narrow = sample_tasks(problem, 10, 3, 2, np.random.default_rng(5), np.float32)
    for name in ("X_in", "y_in", "X_out", "y_out"):
        array = getattr(narrow, name)
        assert array.dtype == np.float32 and array.flags.c_contiguous
        np.testing.assert_array_equal(array, getattr(wide, name).astype(np.float32))
    np.testing.assert_array_equal(narrow.heads, wide.heads)


def test_torch_sampler_same_seed_same_numbers_whatever_the_threads():
    """tasks.sampler: torch: the same seed sequence gives the same tasks bit for bit, with one
    torch thread or two; another sub-stream gives other tasks; float32 arrays are contiguous
    with float64 heads, and noise-free labels are the signal to float32 rounding."""
    torch = pytest.importorskip("torch")
    from metarep.engine.tasks import sample_tasks_torch
    problem = problem_of(d=9, k=2, noise_var=0.5)
    threads = torch.get_num_threads()
    try:
        draws = []
        for count in (1, 2):
            torch.set_num_threads(count)
            draws.append(sample_tasks_torch(problem, 3000, 4, 6, np.random.SeedSequence(
                3, spawn_key=(1, 1, 7)), np.float32))
    finally:
        torch.set_num_threads(threads)
    other = sample_tasks_torch(problem, 3000, 4, 6, np.random.SeedSequence(3, spawn_key=(1, 1, 8)),
                               np.float32)
    for name in ("X_in", "y_in", "X_out", "y_out", "heads"):
        np.testing.assert_array_equal(getattr(draws[0], name), getattr(draws[1], name))
        assert not np.array_equal(getattr(draws[0], name), getattr(other, name))
    first = draws[0]
    for name in ("X_in", "y_in", "X_out", "y_out"):
        assert getattr(first, name).dtype == np.float32
        assert getattr(first, name).flags.c_contiguous
    assert first.heads.dtype == np.float64 and first.X_out.shape == (3000, 6, 9)
    quiet = sample_tasks_torch(problem_of(d=9, k=2, noise_var=0.0), 50, 4, 6,
                               np.random.SeedSequence(1), np.float64)
    X, y = quiet.full()
    np.testing.assert_allclose(y, np.einsum("nmd,nd->nm", X, quiet.heads @ problem_of(
        d=9, k=2, noise_var=0.0).B_star.T), atol=1e-13)


def test_take_and_astype():
    batch = sample_tasks(problem_of(), 10, 3, 2, np.random.default_rng(5))
    picked = batch.take(np.array([7, 2]))
    np.testing.assert_array_equal(picked.X_in, batch.X_in[[7, 2]])
    np.testing.assert_array_equal(picked.y_out, batch.y_out[[7, 2]])
    np.testing.assert_array_equal(picked.heads, batch.heads[[7, 2]])
    assert picked.n_tasks == 2
    assert batch.astype("float32").X_out.dtype == np.float32


# ----------------------------------------------------------------------------- task files


def write_pool(path, **arrays):
    np.savez(path, **arrays)
    return path


@pytest.fixture
def pool_arrays():
    problem = problem_of(d=5, k=2)
    batch = sample_tasks(problem, 6, 3, 2, np.random.default_rng(1))
    X, y = batch.full()
    return {"X": X, "y": y, "B_star": problem.B_star, "heads": batch.heads}


def test_load_pool_round_trip(tmp_path, pool_arrays):
    pool = load_pool(write_pool(tmp_path / "pool.npz", **pool_arrays))
    assert isinstance(pool, TaskPool)
    for name in ("X", "y", "B_star", "heads"):
        np.testing.assert_array_equal(getattr(pool, name), pool_arrays[name])
    batch = pool.split(3)
    np.testing.assert_array_equal(batch.X_in, pool_arrays["X"][:, :3])
    np.testing.assert_array_equal(batch.y_out, pool_arrays["y"][:, 3:])
    assert batch.X_in.flags.c_contiguous and batch.X_out.flags.c_contiguous


def test_load_pool_without_ground_truth(tmp_path, pool_arrays):
    pool = load_pool(write_pool(tmp_path / "pool.npz", X=pool_arrays["X"].astype(np.float32),
                                y=pool_arrays["y"]))
    assert pool.B_star is None and pool.heads is None
    assert pool.X.dtype == np.float64


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"y": None}, "no array 'y'"),
        ({"X": None}, "no array 'X'"),
        ({"X": np.zeros((6, 5))}, "X must have shape"),
        ({"X": np.zeros((0, 5, 5)), "y": np.zeros((0, 5))}, "X must have shape"),
        ({"y": np.zeros((6, 4))}, "y must have shape"),
        ({"y": np.zeros(30)}, "y must have shape"),
        ({"B_star": np.eye(4)[:, :2]}, "B_star must have shape"),
        ({"B_star": np.eye(5)[:, :2] * 2}, "orthonormal"),
        ({"B_star": np.zeros((5, 6))}, "B_star must have shape"),
        ({"heads": np.zeros((5, 2))}, "heads must have shape"),
        ({"heads": np.zeros((6, 3))}, "heads must have shape"),
        ({"y": np.full((6, 5), np.nan)}, "finite"),
        ({"X": np.full((6, 5, 5), np.inf)}, "finite"),
        ({"y": np.full((6, 5), "a")}, "finite real numbers"),
        ({"y": np.ones((6, 5)) * 1j}, "finite real numbers"),
    ],
)
def test_load_pool_rejects_bad_files(tmp_path, pool_arrays, change, message):
    arrays = {**pool_arrays, **change}
    path = write_pool(tmp_path / "bad.npz", **{k: v for k, v in arrays.items() if v is not None})
    with pytest.raises(ConfigError) as info:
        load_pool(path)
    assert info.value.key == "tasks.from"
    assert message in str(info.value)


def test_load_pool_missing_or_unreadable_file(tmp_path):
    with pytest.raises(ConfigError) as info:
        load_pool(tmp_path / "nope.npz")
    assert info.value.key == "tasks.from" and "not found" in str(info.value)
    garbage = tmp_path / "garbage.npz"
    garbage.write_bytes(b"not a zip file at all")
    with pytest.raises(ConfigError) as info:
        load_pool(garbage)
    assert info.value.key == "tasks.from" and "is not an .npz file" in str(info.value)
    with pytest.raises(ConfigError) as info:
        load_pool(tmp_path)
    assert info.value.key == "tasks.from"


def test_a_pool_may_carry_its_noise_and_diagonal_head_covariance():
    X, y = np.zeros((4, 3, 5)), np.zeros((4, 3))
    B_star = np.eye(5)[:, :2]
    pool = task_pool(X, y, B_star, None, np.array(0.5), np.diag([1.0, 2.0]))
    assert pool.noise_var == 0.5 and pool.Sigma_star.shape == (2, 2)
    for noise, Sigma, argument in ((np.array(-1.0), None, "noise_var"),
                                   (np.zeros(2), None, "noise_var"),
                                   (None, np.ones((2, 2)), "Sigma_star"),
                                   (None, np.diag([1.0, 0.0]), "Sigma_star"),
                                   (None, np.eye(3), "Sigma_star")):
        with pytest.raises(ArgumentError) as error:
            task_pool(X, y, B_star, None, noise, Sigma)
        assert error.value.argument == argument


def test_the_heads_of_a_pool_estimate_its_noise_and_head_covariance():
    """residual_noise_var: mean of N m squared N(0, sigma^2) residuals, stderr sigma^2
    sqrt(2 / (N m)); head_second_moment: entry (a, b) of H^T H / N has variance
    (S_ab^2 + S_aa S_bb) / N."""
    rng = np.random.default_rng(11)
    Sigma = np.array([[2.0, 0.5], [0.5, 1.0]])
    problem = Problem(random_orthonormal(7, 2, rng), Sigma, 0.3)
    batch = sample_tasks(problem, 3000, 4, 4, rng)
    X, y = batch.full()
    pool = task_pool(X, y, problem.B_star, batch.heads)
    assert_z(residual_noise_var(pool), 0.3, 0.3 * np.sqrt(2 / (3000 * 8)), "noise variance")
    stderr = np.sqrt((Sigma**2 + np.outer(np.diag(Sigma), np.diag(Sigma))) / 3000)
    assert_z(head_second_moment(batch.heads), Sigma, stderr, "head second moment")
    with pytest.raises(ArgumentError, match="pool"):
        residual_noise_var(task_pool(X, y))


def test_diagonal_frame_writes_a_head_covariance_in_its_eigenbasis():
    rng = np.random.default_rng(12)
    A = rng.standard_normal((4, 4))
    Sigma = A @ A.T + 0.1 * np.eye(4)
    V, eigenvalues = diagonal_frame(Sigma)
    assert np.all(np.diff(eigenvalues) <= 0)
    assert np.allclose(V.T @ V, np.eye(4))
    assert np.allclose(V @ np.diag(eigenvalues) @ V.T, Sigma)
    B_star = random_orthonormal(9, 4, rng)
    # (B_star V) has the same span, and B_star w = (B_star V)(V^T w) for every head w.
    assert np.allclose((B_star @ V) @ (B_star @ V).T, B_star @ B_star.T)


# ----------------------------------------------------------------------------- run task sources


@pytest.mark.parametrize("sampler", ["numpy", "torch"])
def test_a_run_draws_its_online_tasks_with_its_sampler(sampler):
    """``tasks.sampler`` picks the draw of every step: step ``t`` of an online run is the
    sampler's draw on the sub-stream ``(tasks.seed, tasks, 1, t)``; the two samplers give
    different tasks (so the key is not ignored)."""
    pytest.importorskip("torch")
    from metarep.core.seeding import Purpose, seed_rng, seed_sequence
    from metarep.engine.tasks import sample_tasks_torch
    from metarep.run.backends.sources import resolve_inputs, task_source
    from metarep.run.schema import from_dict
    config = from_dict({}, {"tasks.n": "online", "train.tasks_per_step": 7, "problem.d": 5,
                            "problem.k": 2, "tasks.m_in": 3, "tasks.m_out": 2, "tasks.seed": 4,
                            "tasks.sampler": sampler, "train.dtype": "float32"})
    inputs = resolve_inputs(config)
    drawn = task_source(inputs)(9)
    numpy_draw = sample_tasks(inputs.problem, 7, 3, 2, seed_rng(4, Purpose.TASKS, 1, 9),
                              np.float32)
    torch_draw = sample_tasks_torch(inputs.problem, 7, 3, 2, seed_sequence(4, Purpose.TASKS, 1, 9),
                                    np.float32)
    expected, other = (numpy_draw, torch_draw) if sampler == "numpy" else (torch_draw, numpy_draw)
    for name in ("X_in", "y_in", "X_out", "y_out", "heads"):
        np.testing.assert_array_equal(getattr(drawn, name), getattr(expected, name))
        assert not np.array_equal(getattr(drawn, name), getattr(other, name))


def test_the_torch_sampler_without_torch_names_tasks_sampler(monkeypatch):
    """Without PyTorch, ``tasks.sampler: torch`` fails as a config error naming the key."""
    import importlib

    from metarep.run.backends.sources import resolve_inputs
    from metarep.run.schema import from_dict
    real = importlib.import_module

    def without_torch(name, *args):
        if name == "metarep.engine.tasks":
            raise ModuleNotFoundError("No module named 'torch'", name="torch")
        return real(name, *args)

    monkeypatch.setattr(importlib, "import_module", without_torch)
    config = from_dict({}, {"tasks.n": 50, "tasks.sampler": "torch"})
    with pytest.raises(ConfigError) as info:
        resolve_inputs(config)
    assert info.value.key == "tasks.sampler" and "metarep[torch]" in str(info.value)
    assert str(info.value).startswith("tasks.sampler: the torch sampler needs PyTorch")
