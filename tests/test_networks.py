"""ReLU networks (model.kind: relu): the modules, their measures and test-time evaluation, and
runs of every method through the CLI (specification §2, nonlinear extension)."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import numpy as np
import pandas as pd
import pytest
from scipy.linalg import null_space

torch = pytest.importorskip("torch")
torch.set_num_threads(1)  # two test workers share two cores

from metarep.cli import EXIT_BAD_INPUT  # noqa: E402
from metarep.core.evaluation import evaluate, evaluate_predictors  # noqa: E402
from metarep.core.measures import perp_share, unit_perp_shares  # noqa: E402
from metarep.core.model import LinearParams  # noqa: E402
from metarep.core.problem import make_problem  # noqa: E402
from metarep.engine.learner import MetaLearner  # noqa: E402
from metarep.engine.networks import LinearNet, ReLUNet, init_relu, relu_from_arrays  # noqa: E402
from metarep.errors import ArgumentError  # noqa: E402
from metarep.run import atomic  # noqa: E402
from metarep.run.experiment import prepare, run_experiment  # noqa: E402
from metarep.run.schema import load_config  # noqa: E402

METHOD_NAMES = ("fo-anil", "anil", "fo-maml", "maml", "mtl")
TINY = {
    "problem": {"d": 6, "k": 2, "noise_var": 0.25, "head_cov": "isotropic"},
    "tasks": {"n": 12, "m_in": 5, "m_out": 5},
    "model": {"kind": "relu", "width": 5, "hidden_width": 4, "init_scale": 0.5},
    "method": {"inner_lr": 0.5, "outer_lr": 0.1, "inner_steps": 2},
    "train": {"steps": 4, "record_every": 2},
    "eval": {"shots": [3], "n_tasks": 20},
}


def write_config(path, tree) -> str:
    import yaml

    path.write_text(yaml.safe_dump(tree))
    return str(path)



# ----------------------------------------------------------------- the modules


def test_relu_forward_is_the_documented_formula():
    rng = np.random.default_rng(0)
    W1, W2, w = rng.standard_normal((4, 6)), rng.standard_normal((6, 3)), rng.standard_normal(3)
    x = rng.standard_normal((7, 4))
    relu = lambda a: np.maximum(a, 0.0)  # noqa: E731
    two = ReLUNet([W1, W2], w)(torch.as_tensor(x)).detach().numpy()
    np.testing.assert_allclose(two, relu(relu(x @ W1) @ W2) @ w, atol=1e-12)
    one = ReLUNet([W1[:, :3]], w)(torch.as_tensor(x)).detach().numpy()
    np.testing.assert_allclose(one, relu(x @ W1[:, :3]) @ w, atol=1e-12)
    B = rng.standard_normal((4, 3))
    np.testing.assert_allclose(LinearNet(B, w)(torch.as_tensor(x)).detach().numpy(), x @ B @ w,
                               atol=1e-12)


def test_relu_init_scales_match_the_linear_model():
    d, width, init_scale = 40, 200, 0.7
    net = init_relu(d, width, 2, 300, init_scale, np.random.default_rng(1))
    assert net.W1.shape == (d, 300) and net.W2.shape == (300, width)
    assert torch.count_nonzero(net.w) == 0
    x = torch.as_tensor(np.random.default_rng(2).standard_normal((4000, d)))
    with torch.no_grad():
        first = x @ net.W1
        second = torch.relu(first) @ net.W2
    # every pre-activation has variance ~ init_scale^2, like the linear model's x^T B_j
    assert float(first.var()) == pytest.approx(init_scale**2, rel=0.05)
    assert float(second.var()) == pytest.approx(init_scale**2, rel=0.1)
    again = init_relu(d, width, 2, 300, init_scale, np.random.default_rng(1))
    assert torch.equal(again.W2, net.W2)


def test_relu_from_arrays_checks_names_and_shapes():
    good = {"W1": np.ones((5, 4)), "W2": np.ones((4, 3)), "w": np.zeros(3)}
    assert relu_from_arrays(good, 5, 2).hidden_layers == 2
    with pytest.raises(ArgumentError, match="missing W2") as error:
        relu_from_arrays({"W1": good["W1"], "w": good["w"]}, 5, 2)
    assert error.value.argument == "arrays"
    with pytest.raises(ArgumentError, match="W2: must have shape") as error:
        relu_from_arrays({**good, "W2": np.ones((3, 3))}, 5, 2)
    assert error.value.argument == "W2"
    with pytest.raises(ArgumentError, match="w: must have shape") as error:
        relu_from_arrays({"W1": good["W1"], "w": good["w"]}, 5, 1)
    assert error.value.argument == "w"


def test_perp_share_against_an_explicit_complement_basis():
    rng = np.random.default_rng(3)
    problem = make_problem(7, 3, 0.0, "isotropic", rng)
    W1 = rng.standard_normal((7, 5))
    B_perp = null_space(problem.B_star.T)
    expected = np.linalg.norm(B_perp.T @ W1) / np.linalg.norm(W1)
    assert perp_share(W1, problem.B_star) == pytest.approx(expected, rel=1e-12)
    assert perp_share(problem.B_star @ rng.standard_normal((3, 5)), problem.B_star) < 1e-12


def test_unit_perp_shares_against_an_explicit_complement_basis():
    """Each unit's share outside span(B_star) from an explicit complement basis; a unit inside
    the span has 0, one in the complement 1, a zero unit 0; their energies add up to
    perp_share's."""
    rng = np.random.default_rng(5)
    problem = make_problem(8, 2, 0.0, "isotropic", rng)
    B_perp = null_space(problem.B_star.T)
    W1 = np.column_stack([rng.standard_normal(8), problem.B_star @ [1.0, 2.0],
                          B_perp @ rng.standard_normal(6), np.zeros(8)])
    shares = unit_perp_shares(W1, problem.B_star)
    expected = np.linalg.norm(B_perp.T @ W1[:, 0]) / np.linalg.norm(W1[:, 0])
    assert shares[0] == pytest.approx(expected, rel=1e-12)
    assert shares[1] < 1e-12 and shares[2] == pytest.approx(1.0, rel=1e-12) and shares[3] == 0
    energies = (shares * np.linalg.norm(W1, axis=0)) ** 2
    assert np.sqrt(energies.sum()) / np.linalg.norm(W1) == pytest.approx(
        perp_share(W1, problem.B_star), rel=1e-12)


def test_predictor_evaluation_agrees_with_the_exact_linear_evaluation():
    """Through the engine, a linear network scored with fresh test inputs has the exact
    reduced-coordinate risk of :func:`metarep.core.evaluation.evaluate` in expectation."""
    rng = np.random.default_rng(4)
    problem = make_problem(10, 2, 0.5, "linear", rng)
    B = problem.B_star @ rng.standard_normal((2, 4)) + 0.2 * rng.standard_normal((10, 4))
    params = LinearParams(B, 0.1 * rng.standard_normal(4))
    learner = MetaLearner(LinearNet(*params), "w", inner_lr=0.3, outer_lr=0.1)
    predictor = learner.test_predictor(learner.state.params, 1, 0.3)
    shots, n = (4, 12), 3000
    rows = evaluate_predictors({"engine": predictor}, problem, shots, n, seed=5)
    exact = evaluate(params, problem, "exact", shots, n, 0.3, 1, seed=6)
    for m in shots:
        ours = next(r for r in rows if r.method == "engine" and r.shots == m)
        theirs = next(r for r in exact if r.method == "exact" and r.shots == m)
        z = (ours.excess_risk - theirs.excess_risk) / np.hypot(ours.stderr, theirs.stderr)
        assert abs(z) < 4, (m, ours, theirs)
    assert [(r.method, r.shots) for r in rows] == [
        ("engine", 4), ("bayes-oracle", 4), ("oracle-lsq", 4), ("ridge", 4),
        ("engine", 12), ("bayes-oracle", 12), ("oracle-lsq", 12), ("ridge", 12),
        ("regression-lsq", 12)]
    # the reference rows, computed on d-dimensional tasks here and in reduced coordinates
    # there, agree; the least-squares ones carry no error bar where their variance is infinite
    for ours in rows:
        if ours.method == "engine":
            continue
        theirs = next(r for r in exact if (r.method, r.shots) == (ours.method, ours.shots))
        np.testing.assert_equal(ours.theory, theirs.theory)  # nan == nan here
        if (ours.method, ours.shots) in (("oracle-lsq", 4), ("regression-lsq", 12)):
            assert np.isnan(ours.stderr) and np.isnan(theirs.stderr)  # dim + 2
            continue
        z = (ours.excess_risk - theirs.excess_risk) / np.hypot(ours.stderr, theirs.stderr)
        assert abs(z) < 4, (ours, theirs)
    bayes = {r.shots: r for r in rows if r.method == "bayes-oracle"}
    for r in rows:  # the Bayes oracle is below every other row
        if r.method != "bayes-oracle":
            assert bayes[r.shots].excess_risk < r.excess_risk, r


# ----------------------------------------------------------------- runs through the CLI


@pytest.mark.slow
@pytest.mark.parametrize("hidden_layers", [1, 2])
@pytest.mark.parametrize("name", METHOD_NAMES)
def test_every_method_runs_a_relu_network_end_to_end(cli, tmp_path, name, hidden_layers):
    tree = {**TINY, "method": {**TINY["method"], "name": name},
            "model": {**TINY["model"], "hidden_layers": hidden_layers}}
    out = tmp_path / "run"
    result = cli("run", write_config(tmp_path / "relu.yaml", tree), "--out", out,
                    "--no-progress")
    assert result.exit_code == 0, result.output
    assert "w1_perp_share" in result.stdout
    metrics = pd.read_csv(out / "metrics.csv")
    assert list(metrics.columns) == ["step", "train_loss", "w1_perp_share", "head_norm"]
    assert list(metrics["step"]) == [0, 2, 4] and np.isfinite(metrics.to_numpy()).all()
    methods = list(pd.read_csv(out / "eval.csv")["method"])
    assert methods == ([name, "mtl-lsq"] if name == "mtl" else [name]) + ["bayes-oracle", "ridge"]
    with np.load(out / "params.npz") as params:
        expected = {"W1", "w", "B_star", "Sigma_star"} | ({"W2"} if hidden_layers == 2 else set())
        assert set(params.files) == expected | ({"heads"} if name == "mtl" else set())
        if name == "mtl":
            assert params["heads"].shape == (12, 5)
            np.testing.assert_array_equal(params["w"], 0.0)  # the model's head stays w_0


@pytest.mark.parametrize("name", METHOD_NAMES)
def test_relu_test_risk_beats_plain_regression_at_small_m(name):
    """After meta-training, one head step (mtl: least squares on the learned features) on 5
    samples of a fresh task beats ridge in d = 60 dimensions, and the Bayes oracle beats it."""
    config = load_config("quick", {
        "problem.d": 60, "problem.k": 2, "problem.noise_var": 0.25,
        "problem.head_cov": "isotropic", "tasks.n": 1000, "tasks.m_in": 5, "tasks.m_out": 10,
        "model.kind": "relu", "model.width": 16, "model.init_scale": 0.5, "method.name": name,
        "method.inner_lr": 0.5, "method.outer_lr": 0.1, "train.steps": 300,
        "train.record_every": 200, "eval.shots": [5], "eval.n_tasks": 2000,
    })
    backend = prepare(config)
    state = backend.initial_state()
    for t in range(config.train.steps):
        state, _ = backend.step(state, t)
    rows = {row.method: row for row in backend.evaluate(state)}
    ours = rows["mtl-lsq" if name == "mtl" else name]
    regression = rows["ridge"]
    margin = 3 * np.hypot(ours.stderr, regression.stderr)
    assert ours.excess_risk + margin < regression.excess_risk, (ours, regression)
    assert rows["bayes-oracle"].excess_risk < ours.excess_risk - margin


@pytest.mark.slow
def test_relu_run_resumes_to_the_same_result(tmp_path):
    config = load_config("quick", {"model.kind": "relu", "model.hidden_layers": 2,
                                   "model.width": 6, "model.hidden_width": 5,
                                   "method.name": "mtl", "tasks.n": 30, "problem.d": 8,
                                   "train.tasks_per_step": 10, "train.steps": 5,
                                   "train.record_every": 1, "eval.n_tasks": 10,
                                   "eval.shots": [4]})
    full = run_experiment(config, tmp_path / "full", progress=False)

    def interrupt(trajectory):
        if trajectory.step >= 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_experiment(config, tmp_path / "resumed", progress=False, on_record=interrupt,
            checkpoint_seconds=0.0)
    assert (tmp_path / "resumed" / "checkpoint.npz").is_file()
    resumed = run_experiment(config, tmp_path / "resumed", progress=False, resume=True)
    with np.load(tmp_path / "full" / "params.npz") as a, \
            np.load(tmp_path / "resumed" / "params.npz") as b:
        for key in ("W1", "W2", "w", "heads"):
            np.testing.assert_array_equal(a[key], b[key])
    assert resumed.metrics.equals(full.metrics)


@pytest.mark.slow
def test_relu_init_from_file_sets_the_widths(cli, tmp_path):
    rng = np.random.default_rng(7)
    arrays = {"W1": rng.standard_normal((6, 7)), "W2": rng.standard_normal((7, 3)),
              "w": rng.standard_normal(3)}
    atomic.write_npz(tmp_path / "init.npz", **arrays)
    tree = {**TINY, "model": {**TINY["model"], "hidden_layers": 2,
                              "init_from": str(tmp_path / "init.npz")}}
    tree["train"] = {**TINY["train"], "steps": 0}
    out = tmp_path / "run"
    result = cli("run", write_config(tmp_path / "c.yaml", tree), "--out", out, "--no-progress")
    assert result.exit_code == 0, result.output
    resolved = load_config(str(out / "config.yaml"))
    assert (resolved.model.width, resolved.model.hidden_width) == (3, 7)
    with np.load(out / "params.npz") as params:
        for key, value in arrays.items():
            np.testing.assert_array_equal(params[key], value)


@pytest.mark.parametrize(("overrides", "key"), [
    ({"model": {**TINY["model"], "hidden_layers": 3}}, "model.hidden_layers"),
    ({"model": {**TINY["model"], "init_from": "missing.npz"}}, "model.init_from"),
    ({"model": {**TINY["model"], "kind": "tanh"}}, "model.kind"),
    ({"train": {**TINY["train"], "device": "tpu"}}, "train.device"),
])
def test_bad_relu_input_exits_2_naming_the_field(cli, tmp_path, overrides, key):
    out = tmp_path / "run"
    result = cli("run", write_config(tmp_path / "c.yaml", {**TINY, **overrides}),
                    "--out", out, "--no-progress")
    assert result.exit_code == EXIT_BAD_INPUT
    assert result.stderr.startswith(f"error: {key}:") and not out.exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is present")
@pytest.mark.parametrize("kind", ["relu", "linear"])
def test_device_cuda_is_refused_when_absent(cli, tmp_path, kind):
    """A linear run on cuda computes with the torch backend (tests/test_torch_linear.py), so
    both kinds of run need the GPU."""
    out = tmp_path / "run"
    tree = {**TINY, "model": {**TINY["model"], "kind": kind},
            "train": {**TINY["train"], "device": "cuda"}}
    result = cli("run", write_config(tmp_path / "c.yaml", tree), "--out", out)
    assert result.exit_code == EXIT_BAD_INPUT and "train.device" in result.stderr
    assert not out.exists()


@pytest.mark.slow
def test_without_torch_linear_runs_work_and_relu_asks_for_the_extra(tmp_path):
    """In a process where ``import torch`` fails: ``import metarep`` and a linear run work;
    a relu run is a bad-input error naming ``pip install metarep[torch]``."""
    script = textwrap.dedent(f"""
        import importlib.abc
        import sys

        class NoTorch(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path=None, target=None):
                if name == "torch" or name.startswith("torch."):
                    raise ModuleNotFoundError(f"No module named {{name!r}}", name=name)
                return None

        sys.meta_path.insert(0, NoTorch())  # import torch now raises ModuleNotFoundError
        import metarep
        from metarep.cli import app
        from typer.testing import CliRunner
        runner = CliRunner()
        base = ["run", "quick", "--set", "train.steps=2", "--set", "eval.n_tasks=10",
                "--no-progress", "--out"]
        linear = runner.invoke(app, [*base, r"{tmp_path / 'linear'}"])
        assert linear.exit_code == 0, linear.output
        relu = runner.invoke(app, [*base, r"{tmp_path / 'relu'}", "--set", "model.kind=relu"])
        assert relu.exit_code == 2, relu.output
        print(relu.stderr)
        assert "torch" not in sys.modules
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    assert "error: model.kind:" in done.stdout and "metarep[torch]" in done.stdout
    assert not (tmp_path / "relu").exists()
    lazy = "import sys, metarep.cli, metarep.run.experiment; assert 'torch' not in sys.modules"
    assert subprocess.run([sys.executable, "-c", lazy], timeout=120).returncode == 0
