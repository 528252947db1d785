"""Every method's linear fast path against independent computations.

References, independent of :mod:`metarep.core.methods`:
- the plain per-task loops of :mod:`metarep.core.reference` with explicit matrices, whose
  second-order terms are propagated in *forward* mode (Jacobians of the adapted parameters
  with respect to all of ``(B, w)``, one direction at a time), while the library uses reverse
  mode;
- central finite differences of each method's outer objective
  (:func:`metarep.core.reference.outer_objective`);
- torch autodiff (``torch.func.grad`` through ``vmap`` over tasks), when torch is installed.
"""

from __future__ import annotations

import numpy as np
import pytest
from typer.testing import CliRunner

from metarep.cli import app
from metarep.core import reference
from metarep.core.methods import (
    ANIL,
    FOANIL,
    FOMAML,
    MAML,
    METHOD_NAMES,
    MTL,
    MTLState,
    make_method,
    meta_gradient,
)
from metarep.core.model import LinearParams
from metarep.core.tasks import TaskBatch
from metarep.errors import ArgumentError, ConfigError
from metarep.run.experiment import prepare, run_experiment
from metarep.run.schema import load_config

ALPHA, BETA = 0.3, 0.7
N, M_IN, M_OUT, D, WIDTH = 5, 4, 3, 5, 3
INNER_METHODS = ("fo-anil", "anil", "fo-maml", "maml")


def _problem(seed: int = 0) -> tuple[TaskBatch, LinearParams]:
    rng = np.random.default_rng(np.random.SeedSequence(seed))
    X = rng.standard_normal((N, M_IN + M_OUT, D))
    y = rng.standard_normal((N, M_IN + M_OUT))
    batch = TaskBatch(X[:, :M_IN], y[:, :M_IN], X[:, M_IN:], y[:, M_IN:])
    params = LinearParams(0.5 * rng.standard_normal((D, WIDTH)), 0.5 * rng.standard_normal(WIDTH))
    return batch, params


# ----------------------------------------------------------------------------- helpers


def central_differences(f, x: np.ndarray, eps: float = 1e-6) -> np.ndarray:
    """``grad f(x)`` by central differences, entry by entry."""
    out = np.zeros_like(x)
    for index in np.ndindex(x.shape):
        step = np.zeros_like(x)
        step[index] = eps
        out[index] = (f(x + step) - f(x - step)) / (2 * eps)
    return out


def reference_step(name, params, batch, steps, heads=None):
    """One outer step of ``name`` by :mod:`metarep.core.reference`; returns
    ``(B, w, heads or None, loss)`` (``heads``: mtl's per-task heads before the step)."""
    if name == "mtl":
        (B, w, new_heads), loss = reference.mtl_step(MTLState(*params, heads), batch, BETA)
        return B, w, new_heads, loss
    (B, w), loss = reference.inner_loop_step(name, params, batch, ALPHA, BETA, steps)
    return B, w, None, loss


def _relative_error(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


# ----------------------------------------------------------------------------- fast path


@pytest.mark.slow
@pytest.mark.parametrize("steps", [1, 2, 3])
@pytest.mark.parametrize("name", INNER_METHODS)
def test_inner_loop_methods_match_per_task_loop(name, steps):
    batch, params = _problem()
    new, loss = make_method(name, ALPHA, BETA, steps).step(params, batch)
    B, w, _, ref_loss = reference_step(name, params, batch, steps)
    np.testing.assert_allclose(new.B, B, rtol=0, atol=1e-12)
    np.testing.assert_allclose(new.w, w, rtol=0, atol=1e-12)
    assert loss == pytest.approx(ref_loss, rel=1e-12)


@pytest.mark.parametrize("steps", [1, 2])
@pytest.mark.parametrize("name", INNER_METHODS)
def test_inner_loop_methods_match_finite_differences(name, steps):
    batch, params = _problem(1)
    new, loss = make_method(name, ALPHA, BETA, steps).step(params, batch)
    objective, theta = reference.outer_objective(name, params, batch, ALPHA, steps)
    fd = central_differences(objective, theta)
    grad = np.concatenate([(params.B - new.B).ravel(), params.w - new.w]) / BETA
    assert _relative_error(grad, fd) < 1e-6
    assert loss == pytest.approx(objective(theta), rel=1e-12)


@pytest.mark.parametrize("steps", [1, 2])
@pytest.mark.parametrize("name", INNER_METHODS)
def test_reference_gradient_matches_finite_differences_of_its_objective(name, steps):
    """The reference itself: its forward-mode chain rule against central differences of its
    outer objective (so the fast path is checked against two independent references)."""
    batch, params = _problem(5)
    grad_B, grad_w, loss = reference.outer_gradient(name, params, batch, ALPHA, steps)
    objective, theta = reference.outer_objective(name, params, batch, ALPHA, steps)
    fd = central_differences(objective, theta)
    assert _relative_error(np.concatenate([grad_B.ravel(), grad_w]), fd) < 1e-6
    assert loss == pytest.approx(objective(theta), rel=1e-12)


def test_second_order_terms_matter():
    """The exact methods differ from their first-order versions (the test can fail)."""
    batch, params = _problem()
    for exact, first in (("anil", "fo-anil"), ("maml", "fo-maml")):
        a = make_method(exact, ALPHA, BETA, 1).step(params, batch)[0]
        b = make_method(first, ALPHA, BETA, 1).step(params, batch)[0]
        assert np.max(np.abs(a.B - b.B)) > 1e-3


@pytest.mark.parametrize("steps", [1, 2])
@pytest.mark.parametrize("body", [False, True])
def test_meta_gradient_matches_torch_autodiff(body, steps):
    torch = pytest.importorskip("torch")
    from torch.func import grad, vmap

    batch, params = _problem(2)
    tensors = [torch.as_tensor(a) for a in (batch.X_in, batch.y_in, batch.X_out, batch.y_out)]

    def task_loss(B, w, X_in, y_in, X_out, y_out):
        def inner(B, w):
            return ((X_in @ B @ w - y_in) ** 2).sum() / (2 * y_in.shape[0])

        for _ in range(steps):
            g_B, g_w = grad(inner, argnums=(0, 1))(B, w)
            B, w = (B - ALPHA * g_B if body else B), w - ALPHA * g_w
        return ((X_out @ B @ w - y_out) ** 2).sum() / (2 * y_out.shape[0])

    def meta_loss(B, w):
        return vmap(task_loss, in_dims=(None, None, 0, 0, 0, 0))(B, w, *tensors).mean()

    expected = grad(meta_loss, argnums=(0, 1))(torch.as_tensor(params.B), torch.as_tensor(params.w))
    grad_B, grad_w, _ = meta_gradient(params.B, params.w, batch, ALPHA, steps, adapt_body=body,
                                      second_order=True)
    np.testing.assert_allclose(grad_B, expected[0].numpy(), rtol=0, atol=1e-12)
    np.testing.assert_allclose(grad_w, expected[1].numpy(), rtol=0, atol=1e-12)


def _mtl_state(params: LinearParams, seed: int = 3) -> MTLState:
    heads = np.random.default_rng(seed).standard_normal((N, WIDTH))
    return MTLState(params.B, params.w, heads)


def test_mtl_matches_per_task_loop_and_finite_differences():
    batch, params = _problem()
    state = _mtl_state(params)
    new, loss = MTL(BETA).step(state, batch)
    B, _, heads, ref_loss = reference_step("mtl", params, batch, 1, state.heads)
    np.testing.assert_allclose(new.B, B, rtol=0, atol=1e-12)
    np.testing.assert_allclose(new.heads, heads, rtol=0, atol=1e-12)
    np.testing.assert_array_equal(new.w, params.w)
    assert loss == pytest.approx(ref_loss, rel=1e-12)

    objective, theta = reference.mtl_objective(state, batch)  # mean_i L(B, w_i; X_i, y_i)
    np.testing.assert_array_equal(theta, np.concatenate([state.B.ravel(), state.heads.ravel()]))
    fd = central_differences(objective, theta)
    grad_B = (state.B - new.B).ravel() / BETA
    grad_heads = (state.heads - new.heads).ravel() / BETA  # each head on its own task's loss
    assert _relative_error(grad_B, fd[: D * WIDTH]) < 1e-6
    assert _relative_error(grad_heads, N * fd[D * WIDTH:]) < 1e-6


def test_mtl_updates_only_the_sampled_heads():
    batch, params = _problem()
    state = _mtl_state(params)
    chosen = np.array([3, 1])
    new, loss = MTL(BETA).step(state, batch.take(chosen))
    B, _, heads, ref_loss = reference_step("mtl", params, batch.take(chosen), 1, state.heads)
    np.testing.assert_allclose(new.B, B, rtol=0, atol=1e-12)
    np.testing.assert_allclose(new.heads, heads, rtol=0, atol=1e-12)
    others = np.setdiff1d(np.arange(N), chosen)
    np.testing.assert_array_equal(new.heads[others], state.heads[others])
    assert loss == pytest.approx(ref_loss, rel=1e-12)
    with pytest.raises(ArgumentError, match="without indices") as error:
        MTL(BETA).step(state, TaskBatch(batch.X_in[:2], batch.y_in[:2], batch.X_out[:2],
                                        batch.y_out[:2]))
    assert error.value.argument == "batch"


def test_mtl_starts_every_head_at_the_model_head():
    _, params = _problem()
    state = make_method("mtl", ALPHA, BETA, 1).init_state(params, 4)
    np.testing.assert_array_equal(state.heads, np.tile(params.w, (4, 1)))


@pytest.mark.parametrize("cls", [FOANIL, ANIL, FOMAML, MAML])
def test_the_method_name_is_a_class_constant_not_an_argument(cls):
    method = cls(ALPHA, BETA, 2)
    assert method.name == cls.name == make_method(cls.name, ALPHA, BETA, 2).name
    with pytest.raises(TypeError):
        cls(ALPHA, BETA, 1, "maml")
    with pytest.raises(TypeError):
        cls(ALPHA, BETA, name="maml")
    with pytest.raises(TypeError):
        MTL(BETA, "fo-anil")
    assert MTL(BETA).name == "mtl"


BAD_STEP_SIZES = [  # inner_lr, outer_lr, inner_steps, the argument at fault
    (0.0, BETA, 1, "inner_lr"),
    (float("nan"), BETA, 1, "inner_lr"),
    (ALPHA, -1.0, 1, "outer_lr"),
    (ALPHA, float("inf"), 1, "outer_lr"),
    (ALPHA, BETA, 0, "inner_steps"),
]


@pytest.mark.parametrize(("name", "inner_lr", "outer_lr", "inner_steps", "argument"), [
    (name, *case) for name in METHOD_NAMES for case in BAD_STEP_SIZES
    if name != "mtl" or case[-1] == "outer_lr"  # mtl has no inner loop
])
def test_bad_step_sizes_raise_an_argument_error(name, inner_lr, outer_lr, inner_steps,
                                                argument):
    with pytest.raises(ArgumentError) as error:
        make_method(name, inner_lr, outer_lr, inner_steps)
    assert error.value.argument == argument


def test_unknown_method_names_are_argument_errors():
    with pytest.raises(ArgumentError) as error:
        make_method("reptile", ALPHA, BETA, 1)
    assert error.value.argument == "name"
    with pytest.raises(ArgumentError) as error:
        reference.inner_loop_step("mtl", _problem()[1], _problem()[0], ALPHA, BETA, 1)
    assert error.value.argument == "name"


@pytest.mark.parametrize("name", METHOD_NAMES)
def test_float32_steps_stay_float32_and_close(name):
    batch, params = _problem()
    method = make_method(name, ALPHA, BETA, 2)
    state64 = method.init_state(params, N)
    state32 = method.init_state(params.astype("float32"), N)
    new64, loss64 = method.step(state64, batch)
    new32, loss32 = method.step(state32, batch.astype("float32"))
    for a, b in zip(new32, new64, strict=True):
        assert a.dtype == np.float32
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
    assert loss32 == pytest.approx(loss64, rel=1e-5)


# ----------------------------------------------------------------------------- end to end


def _write_inputs(tmp_path):
    batch, params = _problem(4)
    X, y = batch.full()
    np.savez(tmp_path / "pool.npz", X=X, y=y)
    np.savez(tmp_path / "init.npz", B=params.B, w=params.w)
    return batch, params


@pytest.mark.parametrize("steps", [1, 2])
@pytest.mark.parametrize("name", METHOD_NAMES)
def test_cli_step_matches_independent_implementation(tmp_path, name, steps):
    batch, params = _write_inputs(tmp_path)
    out = tmp_path / "out"
    settings = {
        "tasks.from": tmp_path / "pool.npz", "model.init_from": tmp_path / "init.npz",
        "tasks.m_in": M_IN, "tasks.m_out": M_OUT, "method.name": name,
        "method.inner_lr": ALPHA, "method.outer_lr": BETA, "method.inner_steps": steps,
        "train.steps": 1,
    }
    args = ["run", "quick", "--out", str(out), "--no-progress"]
    for key, value in settings.items():
        args += ["--set", f"{key}={value}"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    heads = np.tile(params.w, (N, 1)) if name == "mtl" else None
    B, w, new_heads, _ = reference_step(name, params, batch, steps, heads)
    with np.load(out / "params.npz") as saved:
        np.testing.assert_allclose(saved["B"], B, rtol=0, atol=1e-9)
        np.testing.assert_allclose(saved["w"], w, rtol=0, atol=1e-9)
        assert ("heads" in saved.files) == (name == "mtl")
        if name == "mtl":
            np.testing.assert_allclose(saved["heads"], new_heads, rtol=0, atol=1e-9)


def _tiny(**overrides):
    settings = {"problem.d": 6, "problem.k": 2, "tasks.n": 12, "tasks.m_in": 5,
                "tasks.m_out": 5, "model.width": 4, "model.init_scale": 0.3,
                "method.inner_lr": 0.2, "method.outer_lr": 0.05, "train.steps": 6,
                "train.record_every": 2, "eval.shots": [4, 8], "eval.n_tasks": 20}
    settings.update(overrides)
    return load_config("quick", settings)


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("name", METHOD_NAMES)
def test_each_method_runs_end_to_end(tmp_path, name, dtype):
    result = run_experiment(_tiny(**{"method.name": name, "train.dtype": dtype,
                          "method.inner_steps": 2}), tmp_path, progress=False)
    assert result.status == "done"
    assert list(result.metrics["step"]) == [0, 2, 4, 6]
    assert np.all(np.isfinite(result.metrics["train_loss"]))
    methods = {row.method for row in result.eval_rows}
    expected = {name, "bayes-oracle", "ridge", "oracle-lsq", "regression-lsq"} | (
        {"mtl-lsq"} if name == "mtl" else set())  # least squares from k + 2 = 4 and d + 2 = 8
    assert methods == expected
    with np.load(tmp_path / "params.npz") as saved:
        assert saved["B"].dtype == np.dtype(dtype)
        assert saved["B"].shape == (6, 4)
        if name == "mtl":
            assert saved["heads"].shape == (12, 4)


@pytest.mark.slow
def test_mtl_with_sampled_tasks_and_resume(tmp_path):
    """A run interrupted after a checkpoint and resumed ends where an uninterrupted one does
    (the per-task heads travel through the checkpoint)."""
    config = _tiny(**{"method.name": "mtl", "train.tasks_per_step": 5, "train.record_every": 1})
    full = run_experiment(config, tmp_path / "full", progress=False)

    class Interrupted(Exception):
        pass

    def interrupt(trajectory):  # after the record (and checkpoint) of step 2
        if trajectory.step == 2:
            raise Interrupted

    with pytest.raises(Interrupted):
        run_experiment(config, tmp_path / "resumed", progress=False, on_record=interrupt,
            checkpoint_seconds=0.0)
    with np.load(tmp_path / "resumed" / "checkpoint.npz") as checkpoint:
        assert int(checkpoint["step"]) == 2 and checkpoint["heads"].shape == (12, 4)
    resumed = run_experiment(config, tmp_path / "resumed", progress=False, resume=True)
    with np.load(tmp_path / "full" / "params.npz") as a, \
            np.load(tmp_path / "resumed" / "params.npz") as b:
        for key in ("B", "w", "heads"):
            np.testing.assert_array_equal(a[key], b[key])
    assert resumed.metrics.equals(full.metrics)


def test_mtl_rejects_online_tasks():
    with pytest.raises(ConfigError) as error:
        load_config("quick", {"method.name": "mtl", "tasks.n": "online",
                              "train.tasks_per_step": 4})
    assert error.value.key == "tasks.n"


# ----------------------------------------------------------------------------- test time


def test_feature_least_squares_matches_full_dimensional_simulation():
    """The reduced-coordinate ``mtl-lsq`` risk agrees (z-test) with least squares on ``X B``
    simulated with full d-dimensional inputs."""
    from metarep.core.evaluation import (
        feature_least_squares_risks,
        features_penalty,
        fit_least_squares,
    )
    from metarep.core.problem import make_problem
    from metarep.core.tasks import sample_heads

    d, k, width, n = 8, 2, 3, 4000
    problem = make_problem(d, k, 0.5, "linear", np.random.default_rng(0))
    B = np.random.default_rng(1).standard_normal((d, width))
    for m in (3, 8):  # ridge (m < k' + 2) and least squares
        reduced = feature_least_squares_risks(B, problem, m, n, np.random.default_rng(2))
        rng = np.random.default_rng(3)
        beta = sample_heads(problem, n, rng) @ problem.B_star.T
        X = rng.standard_normal((n, m, d))
        y = np.einsum("nmd,nd->nm", X, beta) + rng.standard_normal((n, m)) * np.sqrt(0.5)
        fitted = fit_least_squares(X @ B, y, features_penalty(m, width, problem))
        direct = np.sum((fitted @ B.T - beta) ** 2, axis=1)
        stderr = np.hypot(reduced.std(ddof=1), direct.std(ddof=1)) / np.sqrt(n)
        assert abs(reduced.mean() - direct.mean()) < 4 * stderr


def test_mtl_is_evaluated_from_a_zero_head_with_a_feature_row():
    from metarep.core.evaluation import evaluate

    backend = prepare(_tiny(**{"method.name": "mtl"}))
    B = backend.initial_state().B
    state = MTLState(B, np.ones(B.shape[1]), np.zeros((12, B.shape[1])))
    rows = backend.evaluate(state)
    e = backend.config.eval
    expected = evaluate(LinearParams(B, np.zeros(B.shape[1])), backend.inputs.problem, "mtl",
                        e.shots, e.n_tasks, backend.config.method.inner_lr, e.adapt_steps,
                        e.seed)
    assert [r for r in rows if r.method != "mtl-lsq"] == expected
    assert [r.shots for r in rows if r.method == "mtl-lsq"] == list(e.shots)


@pytest.mark.parametrize("overrides, limits, target", [
    ({"tasks.n": "infinite"}, True, True),
    ({"tasks.n": "infinite", "model.width": 2}, True, True),  # the top-k' part of Lambda_star
    ({}, False, True),  # a pool: Lambda_star is the reference, no limits
    ({"method.name": "anil"}, False, True),
    ({"method.name": "mtl"}, False, False),
    ({"method.inner_steps": 2}, False, False),
    ({"method.name": "maml", "model.width": 2}, False, False),
])
def test_a_run_gets_the_theory_of_its_own_setting_only(overrides, limits, target):
    config = load_config("quick", {"train.steps": 1, "eval.n_tasks": 20, **overrides})
    backend = prepare(config)
    theory = backend.theory({}, [])
    assert (theory["limits"] is not None) == limits, theory["prediction"]
    assert (theory["lambda_star"] is not None) == target, theory["reference"]
    assert theory["scope"]["width"] == config.model.width and theory["scope"]["k"] == 3
    lambda_err = backend.measures(backend.initial_state())[0]["lambda_err"]
    assert np.isfinite(lambda_err) == target
