"""The torch backend of the linear runs (``train.backend: torch``) against the numpy one.

The kernels are one formula each, run on numpy arrays or torch tensors
(:mod:`metarep.core.arrays`); these tests check that a torch run on the CPU in float64 equals
the numpy run to 1e-10 (relative) in every recorded measure, every loss and the final
parameters, for every method on pools (whole or subsampled, inner steps 1 and 2, pool files
without ground truth) and online tasks, and for the exact infinite-task dynamics (alone and
batched); that one step of each method equals the plain per-task loops of
:mod:`metarep.core.reference`; that a torch run resumes bit for bit; float32; the refusals.
A negative control shows the comparison fails for a run that differs slightly.
"""

from __future__ import annotations

import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch")
torch.set_num_threads(1)  # two test workers share two cores

from metarep.core import arrays, reference  # noqa: E402
from metarep.core.arrays import array_namespace, moved_state, numpy_state, to_numpy  # noqa: E402
from metarep.core.infinite import ExactFOANIL, InfiniteTaskState, coordinates  # noqa: E402
from metarep.core.methods import METHOD_NAMES, MTLState, make_method  # noqa: E402
from metarep.core.model import LinearParams  # noqa: E402
from metarep.core.problem import make_problem  # noqa: E402
from metarep.core.tasks import TaskBatch  # noqa: E402
from metarep.engine.arrays import torch_namespace  # noqa: E402
from metarep.errors import ArgumentError, ConfigError  # noqa: E402
from metarep.run.atomic import write_npz  # noqa: E402
from metarep.run.backends.infinite import batched_stepper  # noqa: E402
from metarep.run.backends.linear import array_backend  # noqa: E402
from metarep.run.experiment import prepare, run_experiment  # noqa: E402
from metarep.run.loop import RecordSchedule, Trajectory, train  # noqa: E402
from metarep.run.rundir import RunDirectory  # noqa: E402
from metarep.run.schema import load_config  # noqa: E402

RTOL = 1e-10
CPU = torch_namespace("cpu")
SMALL = {"problem.d": 9, "problem.k": 3, "model.width": 4, "tasks.n": 30, "tasks.m_in": 5,
         "tasks.m_out": 4, "method.inner_lr": 0.2, "method.outer_lr": 0.15, "train.steps": 40,
         "train.record_every": "log", "eval.n_tasks": 20, "eval.shots": [5]}

CASES = {
    "fo-anil": {},
    "fo-anil-2-steps-sampled": {"method.inner_steps": 2, "train.tasks_per_step": 7},
    "anil-2-steps": {"method.name": "anil", "method.inner_steps": 2},
    "fo-maml-sampled": {"method.name": "fo-maml", "train.tasks_per_step": 11},
    "maml-2-steps-sampled": {"method.name": "maml", "method.inner_steps": 2,
                             "train.tasks_per_step": 9},
    "mtl": {"method.name": "mtl"},
    "mtl-sampled": {"method.name": "mtl", "train.tasks_per_step": 6},
    "online-fo-anil": {"tasks.n": "online", "train.tasks_per_step": 8},
    "online-maml": {"tasks.n": "online", "train.tasks_per_step": 5, "method.name": "maml"},
    "wide-head-scale": {"problem.d": 5, "model.width": 7, "model.head_scale": 0.5},
    "narrow": {"model.width": 2, "method.name": "anil"},
    "infinite": {"tasks.n": "infinite"},
    "infinite-m-inf": {"tasks.n": "infinite", "tasks.m_in": "inf"},
    "infinite-head-scale": {"tasks.n": "infinite", "model.head_scale": 0.4},
}


def _config(overrides: dict, backend: str = "numpy"):
    """``quick`` with ``SMALL``, ``overrides`` (a key set to ``None`` is dropped) and
    ``train.backend``."""
    given = {**SMALL, **overrides, "train.backend": backend}
    return load_config("quick", {key: value for key, value in given.items()
                                 if value is not None})


def _trained(config) -> tuple[list[dict[str, float]], dict[str, np.ndarray]]:
    """A whole run of ``config`` through the training loop: its records and final arrays."""
    backend = prepare(config)
    trajectory = Trajectory(backend.initial_state(), 0, [])
    outcome = train(backend, trajectory.state, [trajectory],
                    schedule=RecordSchedule(config.train.steps, config.train.record_every),
                    advice=[""], progress=False)
    assert outcome == [None]
    on_torch = config.train.backend == "torch"
    assert all(isinstance(array, torch.Tensor) == on_torch for array in trajectory.state)
    return trajectory.records, backend.arrays(trajectory.state)


def assert_same_run(a, b, rtol: float = RTOL) -> None:
    """Two runs' records (every measure and loss at every recorded step) and final arrays
    agree to ``rtol``, relative to each array's largest entry (nan where both are nan)."""
    (records_a, arrays_a), (records_b, arrays_b) = a, b
    assert [r["step"] for r in records_a] == [r["step"] for r in records_b]
    assert [sorted(r) for r in records_a] == [sorted(r) for r in records_b]
    for name in records_a[0]:
        x = np.array([r[name] for r in records_a])
        y = np.array([r[name] for r in records_b])
        scale = np.nanmax(np.abs(y), initial=0.0)
        np.testing.assert_allclose(x, y, rtol=0, atol=rtol * max(scale, 1e-300), err_msg=name)
    assert sorted(arrays_a) == sorted(arrays_b)
    for name, x in arrays_a.items():
        y = arrays_b[name]
        assert x.dtype == y.dtype and x.shape == y.shape, name
        np.testing.assert_allclose(x, y, rtol=0, atol=rtol * np.abs(y).max(), err_msg=name)


@pytest.mark.parametrize("case", list(CASES))
def test_a_torch_run_equals_the_numpy_run(case):
    numpy_run = _trained(_config(CASES[case]))
    assert_same_run(_trained(_config(CASES[case], "torch")), numpy_run)


@pytest.mark.parametrize("truth", [False, True])
def test_a_pool_file_with_held_out_tasks(tmp_path, truth):
    """A user's pool of 24 tasks in d = 7, the last 4 held out: without ``B_star`` (nan
    measures) or with ``B_star`` and heads (their covariance estimated, the pool rotated)."""
    rng = np.random.default_rng(3)
    X = rng.standard_normal((24, 9, 7))
    B_star = np.linalg.qr(rng.standard_normal((7, 2)))[0]
    heads = rng.standard_normal((24, 2)) * [1.5, 0.5]
    y = np.einsum("nmd,nd->nm", X, heads @ B_star.T) + 0.3 * rng.standard_normal((24, 9))
    write_npz(tmp_path / "pool.npz", X=X, y=y, **({"B_star": B_star, "heads": heads} if truth
                                                  else {}))
    overrides = {"tasks.from": str(tmp_path / "pool.npz"), "tasks.test_split": 4,
                 "train.tasks_per_step": 6, "method.name": "maml", "tasks.n": None,
                 "problem.d": None, "problem.k": None}
    numpy_run = _trained(_config(overrides))
    assert np.isnan(numpy_run[0][-1]["perp_norm"]) != truth
    assert_same_run(_trained(_config(overrides, "torch")), numpy_run)


def test_the_comparison_fails_for_a_slightly_different_run():
    """Negative control: outer_lr changed by one part in 10^6 is caught."""
    numpy_run = _trained(_config({"method.name": "maml"}))
    other = _trained(_config({"method.name": "maml", "method.outer_lr": 0.15 * (1 + 1e-6)},
                             "torch"))
    with pytest.raises(AssertionError):
        assert_same_run(other, numpy_run)


def test_the_torch_run_computes_in_torch_and_hands_numpy_out():
    backend = prepare(_config({"method.name": "mtl"}, "torch"))
    state = backend.initial_state()
    assert all(isinstance(array, torch.Tensor) for array in state)
    assert backend.batches(0).X_in is backend.batches(1).X_in  # the pool moved once
    state, loss = backend.step(state, 0)
    assert isinstance(state.heads, torch.Tensor) and isinstance(loss, np.ndarray)
    for named in (backend.arrays(state), backend.state_arrays(state),
                  backend.params(state)._asdict()):
        assert all(isinstance(array, np.ndarray) for array in named.values())
    assert prepare(_config({})).xp is np


# ----------------------------------------------------------------------------- one step


def test_torch_tensors_without_their_namespace_are_refused(monkeypatch):
    """With nothing registered for tensors (metarep.engine.arrays not imported), a tensor is
    an error, not a silent conversion to numpy."""
    monkeypatch.setattr(arrays, "_NAMESPACES", [])
    x, y = torch.ones(2, 3, 4), torch.ones(2, 3)
    with pytest.raises(ArgumentError, match=r"metarep\.engine\.arrays"):
        make_method("fo-anil", 0.1, 0.1, 1).step(LinearParams(torch.ones(4, 2), torch.ones(2)),
                                                 TaskBatch(x, y, x, y))


def test_each_array_computes_in_its_own_namespace():
    assert array_namespace(np.zeros(2)) is np and array_namespace(1.5) is np
    assert array_namespace(torch.zeros(2)) is CPU
    x = torch.arange(6.0, dtype=torch.float64).reshape(2, 3)
    assert isinstance(to_numpy(x), np.ndarray) and to_numpy(x).tolist() == x.tolist()
    assert CPU.transpose(x, (1, 0)).tolist() == x.T.tolist()
    assert float(CPU.vdot(x, x)) == float(np.vdot(x.numpy(), x.numpy()))



def _batch(rng: np.random.Generator, n: int, m_in: int, m_out: int, d: int) -> TaskBatch:
    X = rng.standard_normal((n, m_in + m_out, d))
    y = rng.standard_normal((n, m_in + m_out))
    return TaskBatch(X[:, :m_in], y[:, :m_in], X[:, m_in:], y[:, m_in:])


@pytest.mark.parametrize("steps", [1, 2])
@pytest.mark.parametrize("name", METHOD_NAMES)
def test_one_step_in_torch_is_the_per_task_loop(name, steps):
    """Entry by entry: one step in torch equals numpy's to 1e-13 and the plain per-task loops of
    :mod:`metarep.core.reference` to 1e-11 (mtl: 3 of the 6 pool tasks)."""
    rng = np.random.default_rng(steps)
    batch = _batch(rng, 6, 4, 3, 5)
    params = LinearParams(0.5 * rng.standard_normal((5, 3)), 0.5 * rng.standard_normal(3))
    method = make_method(name, 0.3, 0.7, steps)
    state = method.init_state(params, 6)
    if name == "mtl":
        state = MTLState(params.B, params.w, rng.standard_normal((6, 3)))
        batch = batch.take(np.array([4, 0, 2]))
        expected, ref_loss = reference.mtl_step(state, batch, 0.7)
    else:
        expected, ref_loss = reference.inner_loop_step(name, params, batch, 0.3, 0.7, steps)
    new, loss = method.step(moved_state(state, CPU), batch.on(CPU))
    fast, fast_loss = method.step(state, batch)
    for got, numpy_value, want in zip(numpy_state(new), fast, expected, strict=True):
        np.testing.assert_allclose(got, numpy_value, rtol=0, atol=1e-13)
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-11)
    assert loss == pytest.approx(fast_loss, rel=1e-13) and loss == pytest.approx(ref_loss,
                                                                                rel=1e-11)


def test_the_exact_dynamics_in_torch_are_the_reference_step():
    problem = make_problem(8, 3, 0.3, "linear", np.random.default_rng(0))
    rng = np.random.default_rng(1)
    params = LinearParams(0.4 * rng.standard_normal((8, 5)), 0.3 * rng.standard_normal(5))
    frame, state = coordinates(problem.B_star, params.B, params.w)
    dynamics = ExactFOANIL(problem.Sigma_star, 0.2, 0.3, 7, problem.noise_var, state.H.shape,
                           xp=CPU)
    new, loss = dynamics.step(moved_state(state, CPU))
    assert isinstance(new.H, torch.Tensor) and isinstance(loss, np.ndarray)
    (B, w), ref_loss = reference.expected_fo_anil_step(params, problem, 0.2, 0.3, 7)
    after = frame.params(numpy_state(new))
    np.testing.assert_allclose(after.B, B, rtol=0, atol=1e-12)
    np.testing.assert_allclose(after.w, w, rtol=0, atol=1e-12)
    assert loss[0] == pytest.approx(ref_loss, rel=1e-12)


def test_batched_infinite_runs_in_torch_equal_numpy_with_one_diverging():
    """Three exact runs stepped as one batch (stacked, each with its own beta; the largest
    diverges, is parked, and the others go on): the same as numpy's batch."""
    def batch(backend: str) -> list:
        backends = [prepare(_config({"tasks.n": "infinite", "method.outer_lr": lr}, backend))
                    for lr in (0.1, 0.2, 40.0)]
        trajectories = [Trajectory(b.initial_state(), 0, []) for b in backends]
        outcome = train(batched_stepper(backends),
                        InfiniteTaskState.stack([t.state for t in trajectories]), trajectories,
                        schedule=RecordSchedule(40, 5), advice=["a", "b", "c"], progress=False)
        assert [o is None for o in outcome] == [True, True, False]
        return [(t.records, b.state_arrays(t.state)) for t, b in zip(trajectories, backends,
                                                                      strict=True)]

    for torch_run, numpy_run in zip(batch("torch"), batch("numpy"), strict=True):
        assert_same_run(torch_run, numpy_run)


# ----------------------------------------------------------------------------- whole runs


@pytest.fixture
def no_drawing(monkeypatch) -> None:
    """Build the figures but do not draw them (the slow part; figures are not compared):
    each is written as a placeholder file."""

    def write_figure(self, name, figure):
        self.file(name).write_bytes(b"figure")

    monkeypatch.setattr(RunDirectory, "write_figure", write_figure)


def test_an_experiment_in_torch_writes_the_numpy_outputs(tmp_path, no_drawing):
    """``metarep run`` end to end: metrics, params and the evaluation agree to 1e-10."""
    overrides = {"method.name": "anil", "train.tasks_per_step": 10}
    a = run_experiment(_config(overrides, "torch"), tmp_path / "torch", progress=False)
    b = run_experiment(_config(overrides), tmp_path / "numpy", progress=False)
    assert sorted(a.metrics) == sorted(b.metrics)
    for name in b.metrics:
        np.testing.assert_allclose(a.metrics[name], b.metrics[name], rtol=RTOL, err_msg=name)
    for x, y in zip(a.params, b.params, strict=True):
        np.testing.assert_allclose(x, y, rtol=0, atol=RTOL * np.abs(y).max())
    risks = [[row.excess_risk for row in result.eval_rows] for result in (a, b)]
    np.testing.assert_allclose(*risks, rtol=1e-8)


@pytest.mark.parametrize("case", ["mtl-sampled", "infinite"])
def test_a_torch_run_resumes_bit_for_bit(tmp_path, no_drawing, case):
    config = _config({**CASES[case], "train.record_every": 5}, "torch")
    straight = run_experiment(config, tmp_path / "straight", progress=False)

    def interrupt(trajectory) -> None:
        if trajectory.step == 20:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_experiment(config, tmp_path / "run", progress=False, on_record=interrupt)
    resumed = run_experiment(config, tmp_path / "run", progress=False, resume=True)
    assert resumed.summary["provenance"]["resumed_at_step"] == 20
    assert resumed.metrics.equals(straight.metrics)
    with np.load(tmp_path / "straight" / "params.npz") as x, \
            np.load(tmp_path / "run" / "params.npz") as y:
        assert x.files == y.files
        for name in x.files:
            np.testing.assert_array_equal(x[name], y[name])


@pytest.mark.parametrize("case", ["fo-anil-2-steps-sampled", "infinite"])
def test_float32_in_torch(case):
    """float32 states and arrays, within float32 rounding of numpy's float32 run."""
    config = _config({**CASES[case], "train.dtype": "float32"}, "torch")
    state = prepare(config).initial_state()
    assert all(array.dtype == torch.float32 for array in state)
    assert_same_run(_trained(config), _trained(_config({**CASES[case],
                                                        "train.dtype": "float32"})), rtol=1e-4)


# ----------------------------------------------------------------------------- choosing


def test_where_a_linear_run_computes():
    assert array_backend(_config({})) is np
    assert array_backend(_config({}, "torch")) is CPU
    if not torch.cuda.is_available():
        assert array_backend(load_config("quick", {"train.device": "auto"})) is np
        with pytest.raises(ConfigError) as error:
            prepare(load_config("quick", {"train.device": "cuda"}))
        assert error.value.key == "train.device" and "cuda" in str(error.value)


def test_a_bad_backend_is_refused_in_one_line(cli, error_line, tmp_path):
    result = cli("run", "quick", "--set", "train.backend=jax", "--out", tmp_path / "run")
    assert result.exit_code == 2
    line = error_line(result)
    assert line.startswith("error: train.backend:") and "numpy" in line and "torch" in line
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(("overrides", "key"), [({"train.backend": "torch"}, "train.backend"),
                                                ({"train.device": "cuda"}, "train.device")])
def test_torch_without_pytorch_names_the_extra(monkeypatch, overrides, key):
    monkeypatch.setitem(sys.modules, "torch", None)  # import torch now fails
    with pytest.raises(ConfigError) as error:
        prepare(load_config("quick", overrides))
    assert error.value.key == key
    assert "pip install 'metarep[torch]'" in str(error.value) and "\n" not in str(error.value)
    assert array_backend(load_config("quick", {"train.device": "auto"})) is np


@pytest.mark.parametrize("kind", ["pool", "infinite"])
def test_deterministic_algorithms_hold_while_a_torch_linear_run_trains_and_only_then(
        tmp_path, no_drawing, kind):
    """``train.deterministic`` on a torch-backend linear run: torch's deterministic mode is on
    at every record and off again afterwards; without it (a control), never on; the numbers
    are the same either way (CPU kernels are deterministic anyway)."""
    overrides = {"tasks.n": "infinite"} if kind == "infinite" else {}
    seen: dict[bool, list[bool]] = {True: [], False: []}
    results = {}
    for flag in (True, False):
        config = _config({**overrides, "train.deterministic": flag}, "torch")
        results[flag] = run_experiment(
            config, tmp_path / str(flag), progress=False,
            on_record=lambda trajectory, flag=flag: seen[flag].append(
                torch.are_deterministic_algorithms_enabled()))
        assert not torch.are_deterministic_algorithms_enabled()
    assert seen[True] and all(seen[True]) and not any(seen[False])
    for name in results[False].metrics:
        np.testing.assert_array_equal(results[True].metrics[name], results[False].metrics[name])
