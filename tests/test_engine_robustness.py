"""The torch engine on modules beyond the study's networks: buffers written in forward
(BatchNorm's running statistics) refused by name, parameters with ``requires_grad=False`` held
fixed, task chunks equal to all tasks at once, and deterministic algorithms switched on for the
engine's computations only."""

from __future__ import annotations

import os

import numpy as np
import pytest

torch = pytest.importorskip("torch")
torch.set_num_threads(1)  # two test workers share two cores

from torch import nn  # noqa: E402
from torch.func import functional_call, grad  # noqa: E402

from metarep.core.methods import METHOD_NAMES  # noqa: E402
from metarep.core.problem import make_problem  # noqa: E402
from metarep.core.tasks import TaskBatch, sample_tasks  # noqa: E402
from metarep.engine.learner import (  # noqa: E402
    CUBLAS_VARIABLE,
    MetaLearner,
    deterministic_algorithms,
)
from metarep.errors import ArgumentError, ConfigError  # noqa: E402
from metarep.run.backends.engine import engine_method  # noqa: E402
from metarep.run.experiment import prepare, run_experiment  # noqa: E402
from metarep.run.schema import load_config  # noqa: E402

D, WIDTH, ALPHA, BETA = 5, 4, 0.3, 0.2
F64 = torch.float64


def tasks(n: int = 5, seed: int = 0) -> TaskBatch:
    rng = np.random.default_rng(seed)
    return sample_tasks(make_problem(D, 2, 0.5, "linear", rng), n, 4, 3, rng)


def learner(name: str, module: nn.Module, head="head", n_tasks: int = 5, **options):
    method, first_order = engine_method(name)
    return MetaLearner(module, head, method=method, first_order=first_order, inner_lr=ALPHA,
                       outer_lr=BETA, inner_steps=2, n_tasks=n_tasks, **options)


def train(model: MetaLearner, batch: TaskBatch, steps: int = 3) -> list[float]:
    return [model.step(batch.X_in, batch.y_in, batch.X_out, batch.y_out) for _ in range(steps)]


class Normed(nn.Module):
    """Linear -> ``norm`` -> tanh -> linear head (parameters ``body.*``, ``head.*``)."""

    def __init__(self, norm: nn.Module):
        super().__init__()
        torch.manual_seed(0)
        self.body = nn.Sequential(nn.Linear(D, WIDTH), norm, nn.Tanh())
        self.head = nn.Linear(WIDTH, 1)
        self.double()

    def forward(self, x):
        return self.head(self.body(x))



class Spy(nn.Module):
    """A ReLU body and linear head whose forward records each call: whether deterministic
    algorithms are on and the cuBLAS workspace setting it runs under."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.body = nn.Linear(D, WIDTH, dtype=F64)
        self.head = nn.Linear(WIDTH, 1, dtype=F64)
        self.seen: list[tuple[bool, str | None]] = []

    def forward(self, x):
        self.seen.append((torch.are_deterministic_algorithms_enabled(),
                          os.environ.get(CUBLAS_VARIABLE)))
        return self.head(torch.relu(self.body(x)))


# ----------------------------------------------------------------- buffers


@pytest.mark.parametrize(("norm", "kind"), [
    (nn.BatchNorm1d(WIDTH), "BatchNorm1d"),
    (nn.InstanceNorm1d(WIDTH, track_running_stats=True), "InstanceNorm1d"),
])
def test_running_statistics_are_refused_naming_the_submodule_and_the_fix(norm, kind):
    with pytest.raises(ArgumentError) as error:
        learner("fo-anil", Normed(norm))
    assert error.value.argument == "module"
    message = str(error.value)
    assert message.startswith(f"module: body.1 ({kind}) keeps running statistics")
    assert "track_running_stats=False" in message and "LayerNorm" in message
    assert "\n" not in message


def test_batchnorm_without_running_statistics_normalises_each_task_by_its_own_rows():
    batch = tasks()
    net = Normed(nn.BatchNorm1d(WIDTH, track_running_stats=False))
    model = learner("fo-anil", net)
    loss = model.step(batch.X_in, batch.y_in, batch.X_out, batch.y_out)
    params = {n: p.detach() for n, p in net.named_parameters()}
    X_in, y_in, X_out, y_out = (torch.as_tensor(a) for a in
                                (batch.X_in, batch.y_in, batch.X_out, batch.y_out))

    def task_loss(head: dict, X, y):
        prediction = functional_call(net, {**params, **head}, (X,)).reshape(y.shape)
        return 0.5 * torch.mean((prediction - y) ** 2)

    def adapted_loss(i: int) -> float:  # one task alone, a Python loop over the tasks
        head = {n: p for n, p in params.items() if n.startswith("head.")}
        for _ in range(2):
            step = grad(task_loss)(head, X_in[i], y_in[i])
            head = {n: head[n] - ALPHA * step[n] for n in head}
        return float(task_loss(head, X_out[i], y_out[i]))

    assert loss == pytest.approx(np.mean([adapted_loss(i) for i in range(5)]), abs=1e-12)
    trained = model.state.params
    heads = {n: p.expand(5, *p.shape) for n, p in trained.items() if n.startswith("head.")}
    per_task = model.predict_adapted(trained, heads, X_out)
    module_copy = Normed(nn.BatchNorm1d(WIDTH, track_running_stats=False))
    module_copy.load_state_dict(trained)
    with torch.no_grad():
        alone = torch.stack([module_copy(X_out[i]).reshape(-1) for i in range(5)])
        pooled = module_copy(X_out.reshape(-1, D)).reshape(5, -1)
    np.testing.assert_allclose(per_task.numpy(), alone.numpy(), atol=1e-12)
    assert np.abs(per_task.numpy() - pooled.numpy()).max() > 1e-3  # not the pooled statistics


def test_batchnorm_in_eval_mode_reads_its_statistics_as_constants():
    net = Normed(nn.BatchNorm1d(WIDTH))
    with torch.no_grad():
        net.body[1].running_mean.fill_(0.5)
        net.body[1].running_var.fill_(2.0)
    net.eval()
    model = learner("maml", net)
    losses = train(model, tasks(), 5)
    assert np.all(np.isfinite(losses)) and losses[-1] < losses[0]
    assert float(model.buffers["body.1.running_mean"][0]) == 0.5
    assert int(model.buffers["body.1.num_batches_tracked"]) == 0


class Scaled(nn.Module):
    """``head(tanh(body(x)) * scale - centre)`` with buffers ``scale`` (constant) and, with
    ``track``, ``centre`` written by forward: in place, or reassigned."""

    def __init__(self, track: str | None = None):
        super().__init__()
        torch.manual_seed(0)
        self.body = nn.Linear(D, WIDTH, dtype=F64)
        self.head = nn.Linear(WIDTH, 1, dtype=F64)
        self.register_buffer("scale", torch.full((WIDTH,), 2.0, dtype=F64))
        self.stat = nn.Module()
        self.stat.register_buffer("centre", torch.zeros(WIDTH, dtype=F64))
        self.track = track

    def forward(self, x):
        features = torch.tanh(self.body(x)) * self.scale
        if self.track == "in place":
            self.stat.centre.mul_(0.9).add_(0.1 * features.mean(0))
        elif self.track == "reassigned":
            self.stat.centre = 0.9 * self.stat.centre + 0.1 * features.mean(0)
        return self.head(features - self.stat.centre)


@pytest.mark.parametrize("track", ["in place", "reassigned"])
def test_a_buffer_written_in_forward_is_refused_at_the_first_step(track):
    model = learner("anil", Scaled(track))
    batch = tasks()
    with pytest.raises(ArgumentError) as error:
        model.step(batch.X_in, batch.y_in, batch.X_out, batch.y_out)
    assert error.value.argument == "module"
    assert str(error.value).startswith("module: stat (Module) writes its buffer stat.centre")
    with pytest.raises(ArgumentError, match=r"stat\.centre"):  # the test-time path checks too
        learner("anil", Scaled(track)).adapt_heads(model.state.params, batch.X_in, batch.y_in,
                                                   1, ALPHA)


def test_constant_buffers_are_used_and_kept():
    """The buffer ``scale = 2`` acts: with the inner loop on ``body`` (named as the head
    here), FO-ANIL's first loss equals that of the same function with the scale folded into
    ``head.weight`` (a buffer ignored would differ), later ones differ (the outer steps on
    ``head.weight`` see another parameterisation), and the buffer is unchanged."""
    batch = tasks()
    scaled = Scaled()
    folded = Scaled()
    with torch.no_grad():
        folded.scale.fill_(1.0)
        folded.head.weight.mul_(2.0)  # features * 2 @ w = features @ (2 w)
    first = {}
    for name, net in (("scaled", scaled), ("folded", folded)):
        model = learner("fo-anil", net, head="body")
        first[name] = train(model, batch, 3)
        assert float(model.buffers["scale"][0]) == (2.0 if name == "scaled" else 1.0)
    assert first["scaled"][0] == pytest.approx(first["folded"][0], abs=1e-12)
    assert abs(first["scaled"][2] - first["folded"][2]) > 1e-6  # a different parameterisation


# ----------------------------------------------------------------- fixed parameters


class PartlyFixed(nn.Module):
    """``tanh(x W1) W2 w + b``: ``W2`` and the head's ``b`` fixed, as parameters with
    ``requires_grad=False`` or, with ``as_buffers``, as buffers (the reference)."""

    def __init__(self, as_buffers: bool = False, frozen: bool = True):
        super().__init__()
        rng = np.random.default_rng(3)
        self.W1 = nn.Parameter(torch.as_tensor(rng.standard_normal((D, WIDTH)) * 0.5))
        self.w = nn.Parameter(torch.as_tensor(rng.standard_normal(WIDTH) * 0.5))
        fixed = {"W2": torch.as_tensor(rng.standard_normal((WIDTH, WIDTH)) * 0.5),
                 "b": torch.tensor(0.7, dtype=F64)}
        for name, value in fixed.items():
            if as_buffers:
                self.register_buffer(name, value)
            else:
                setattr(self, name, nn.Parameter(value, requires_grad=not frozen))

    def forward(self, x):
        return torch.tanh(x @ self.W1) @ self.W2 @ self.w + self.b


@pytest.mark.parametrize("name", METHOD_NAMES)
def test_parameters_without_grad_stay_fixed_and_act_as_constants(name):
    batch = tasks()
    net = PartlyFixed()
    model = learner(name, net, head=["w", "b"])
    reference = learner(name, PartlyFixed(as_buffers=True), head="w")
    losses = train(model, batch)
    assert losses == pytest.approx(train(reference, batch), abs=1e-12)
    state, expected = model.state, reference.state
    for fixed in ("W2", "b"):  # bitwise their initial values
        assert torch.equal(state.params[fixed], getattr(net, fixed).detach())
    trained = {"W1": state.params["W1"]}
    trained["w"] = state.heads["w"] if name == "mtl" else state.params["w"]
    for key, value in trained.items():
        assert np.abs(value.numpy() - getattr(net, key).detach().numpy()).max() > 1e-4
        reached = expected.heads["w"] if key == "w" and name == "mtl" else expected.params[key]
        np.testing.assert_allclose(value.numpy(), reached.numpy(), rtol=0, atol=1e-12)
    if name == "mtl":
        assert set(state.heads) == {"w"}
    heads = model.adapt_heads(state.params, batch.X_in, batch.y_in, 1, ALPHA, from_zero=True)
    assert set(heads) == {"w"}  # b stays 0.7: it is not a head that adapts


@pytest.mark.parametrize("name", ["anil", "maml"])
def test_trainable_parameters_move_negative_control(name):
    net = PartlyFixed(frozen=False)
    model = learner(name, net, head=["w", "b"])
    train(model, tasks())
    for key in ("W2", "b"):
        assert not torch.equal(model.state.params[key], getattr(net, key).detach())


def test_a_head_of_fixed_parameters_only_is_refused():
    with pytest.raises(ArgumentError, match="requires_grad=False") as error:
        learner("anil", PartlyFixed(), head="b")
    assert error.value.argument == "head"


# ----------------------------------------------------------------- task chunks


@pytest.mark.parametrize("chunk", [1, 2, 7])
@pytest.mark.parametrize("name", METHOD_NAMES)
def test_task_chunks_give_the_results_of_all_tasks_at_once(name, chunk):
    batch = tasks(n=5)
    whole = learner(name, Normed(nn.LayerNorm(WIDTH)))
    chunked = learner(name, Normed(nn.LayerNorm(WIDTH)), task_chunk=chunk)
    assert train(chunked, batch) == pytest.approx(train(whole, batch), abs=1e-12)
    for got, expected in ((chunked.state.params, whole.state.params),
                          (chunked.state.heads or {}, whole.state.heads or {})):
        for key in expected:
            np.testing.assert_allclose(got[key].numpy(), expected[key].numpy(), rtol=0,
                                       atol=1e-12)
    args = (batch.X_in, batch.y_in, 2, ALPHA)
    heads = chunked.adapt_heads(chunked.state.params, *args)
    for key, value in whole.adapt_heads(whole.state.params, *args).items():
        np.testing.assert_allclose(heads[key].numpy(), value.numpy(), rtol=0, atol=1e-12)
    np.testing.assert_allclose(
        chunked.predict_adapted(chunked.state.params, heads, batch.X_out).numpy(),
        whole.predict_adapted(whole.state.params, heads, batch.X_out).numpy(), atol=1e-12)


def test_mtl_task_chunks_on_sampled_tasks():
    pool = tasks(n=8)
    results = []
    for chunk in (None, 2):
        model = learner("mtl", Normed(nn.LayerNorm(WIDTH)), n_tasks=8, task_chunk=chunk)
        rng = np.random.default_rng(5)
        for _ in range(3):
            part = pool.take(rng.choice(8, 5, replace=False))
            model.step(part.X_in, part.y_in, part.X_out, part.y_out, tasks=part.indices)
        results.append(model.state)
    np.testing.assert_allclose(results[0].heads["head.weight"].numpy(),
                               results[1].heads["head.weight"].numpy(), rtol=0, atol=1e-12)
    np.testing.assert_allclose(results[0].params["body.0.weight"].numpy(),
                               results[1].params["body.0.weight"].numpy(), rtol=0, atol=1e-12)


@pytest.mark.parametrize("name", ["anil", "fo-maml", "mtl"])
def test_each_chunk_is_its_own_computation(name):
    """vmap traces the module once per call: with 5 tasks in chunks of 2, a step and the
    test-time adaptation run the forward pass 3 times as often as with all tasks at once."""
    batch = tasks(n=5)
    calls = {}
    for chunk in (None, 2):
        model = learner(name, Spy(), task_chunk=chunk)
        train(model, batch, 1)
        model.adapt_heads(model.state.params, batch.X_in, batch.y_in, 1, ALPHA)
        calls[chunk] = len(model.module.seen)
    assert calls[2] == 3 * calls[None] > 0


@pytest.mark.parametrize("value", [0, -1, 1.5, True, "2"])
def test_bad_task_chunk_names_the_argument(value):
    with pytest.raises(ArgumentError) as error:
        learner("anil", Normed(nn.LayerNorm(WIDTH)), task_chunk=value)
    assert error.value.argument == "task_chunk"


RELU = {"model.kind": "relu", "model.width": 5, "problem.d": 6, "tasks.n": 6, "tasks.m_in": 4,
        "tasks.m_out": 4, "method.name": "maml", "train.steps": 3, "train.record_every": 1,
        "eval.shots": [3], "eval.n_tasks": 10}


@pytest.mark.parametrize(("overrides", "key"), [
    ({**RELU, "train.task_chunk": 0}, "train.task_chunk"),
    ({**RELU, "train.task_chunk": 2.5}, "train.task_chunk"),
    ({"train.task_chunk": 2}, "train.task_chunk"),  # linear runs have no task chunks
    ({**RELU, "train.deterministic": "yes"}, "train.deterministic"),
    ({**RELU, "train.deterministic": 1}, "train.deterministic"),
])
def test_bad_robustness_keys_are_one_line_errors(overrides, key):
    with pytest.raises(ConfigError) as error:
        load_config("quick", overrides)
    assert error.value.key == key and "\n" not in str(error.value)


def test_the_run_passes_its_keys_to_the_learner():
    backend = prepare(load_config("quick", {**RELU, "train.task_chunk": 4,
                                            "train.deterministic": True}))
    assert (backend.learner.task_chunk, backend.learner.deterministic) == (4, True)
    default = prepare(load_config("quick", RELU))
    assert (default.learner.task_chunk, default.learner.deterministic) == (None, False)


# ----------------------------------------------------------------- deterministic algorithms


@pytest.mark.parametrize("name", ["anil", "fo-maml", "mtl"])
def test_deterministic_learner_switches_the_algorithms_on_inside_its_calls_only(name,
                                                                               monkeypatch):
    monkeypatch.delenv(CUBLAS_VARIABLE, raising=False)
    batch = tasks()
    for deterministic in (True, False):  # False: the negative control
        net = Spy()
        model = learner(name, net, deterministic=deterministic)
        train(model, batch, 1)
        heads = model.adapt_heads(model.state.params, batch.X_in, batch.y_in, 1, ALPHA)
        model.predict_adapted(model.state.params, heads, batch.X_out)
        expected = (True, ":4096:8") if deterministic else (False, None)
        assert net.seen and set(net.seen) == {expected}
        assert not torch.are_deterministic_algorithms_enabled()
        assert CUBLAS_VARIABLE not in os.environ


def test_deterministic_algorithms_restores_every_previous_setting(monkeypatch):
    monkeypatch.setenv(CUBLAS_VARIABLE, ":0:0")
    before = (torch.are_deterministic_algorithms_enabled(),
              torch.is_deterministic_algorithms_warn_only_enabled(),
              torch.backends.cudnn.benchmark)
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.backends.cudnn.benchmark = True
    try:
        with deterministic_algorithms():
            assert torch.are_deterministic_algorithms_enabled()
            assert not torch.is_deterministic_algorithms_warn_only_enabled()
            assert not torch.backends.cudnn.benchmark
            assert os.environ[CUBLAS_VARIABLE] == ":4096:8"
        assert torch.is_deterministic_algorithms_warn_only_enabled()
        assert torch.backends.cudnn.benchmark and os.environ[CUBLAS_VARIABLE] == ":0:0"
        monkeypatch.setenv(CUBLAS_VARIABLE, ":16:8")  # a deterministic value is kept
        with deterministic_algorithms():
            assert os.environ[CUBLAS_VARIABLE] == ":16:8"
    finally:
        torch.use_deterministic_algorithms(before[0], warn_only=before[1])
        torch.backends.cudnn.benchmark = before[2]


def test_bad_deterministic_names_the_argument():
    with pytest.raises(ArgumentError) as error:
        learner("anil", Spy(), deterministic="yes")
    assert error.value.argument == "deterministic"


def test_deterministic_backends_repeat_bit_for_bit():
    config = load_config("quick", {**RELU, "method.name": "mtl", "train.deterministic": True})
    results = []
    for _ in range(2):
        backend = prepare(config)
        state = backend.initial_state()
        for t in range(3):
            state, _ = backend.step(state, t)
        results.append((backend.state_arrays(state), backend.evaluate(state)))
    assert not torch.are_deterministic_algorithms_enabled()
    (first, rows), (second, rows_again) = results
    assert first.keys() == second.keys() and rows == rows_again
    for key in first:
        np.testing.assert_array_equal(first[key], second[key])


@pytest.mark.slow
def test_deterministic_runs_repeat_bit_for_bit_and_leave_the_setting_off(tmp_path):
    config = load_config("quick", {**RELU, "train.deterministic": True, "train.task_chunk": 4})
    runs = [run_experiment(config, tmp_path / f"run{i}", progress=False) for i in range(2)]
    assert not torch.are_deterministic_algorithms_enabled()
    assert runs[0].metrics.equals(runs[1].metrics)
    with np.load(tmp_path / "run0" / "params.npz") as a, \
            np.load(tmp_path / "run1" / "params.npz") as b:
        assert a.files == b.files
        for key in a.files:
            np.testing.assert_array_equal(a[key], b[key])
