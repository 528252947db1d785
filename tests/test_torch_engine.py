"""The torch.func engine: equal to the linear fast path, to finite differences of each method's
outer objective, and runs ReLU networks end to end (specification §3)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
torch.set_num_threads(1)  # two test workers share two cores

from metarep.core import methods, reference  # noqa: E402
from metarep.core.methods import METHOD_NAMES, MTLState  # noqa: E402
from metarep.core.model import LinearParams  # noqa: E402
from metarep.core.problem import make_problem  # noqa: E402
from metarep.core.tasks import TaskBatch, sample_tasks  # noqa: E402
from metarep.engine.learner import MetaLearner  # noqa: E402
from metarep.engine.networks import LinearNet, ReLUNet, init_relu  # noqa: E402
from metarep.errors import ArgumentError  # noqa: E402
from metarep.run.backends.engine import engine_method  # noqa: E402

ALPHA, BETA = 0.3, 0.2


def small_problem(seed: int = 0, n: int = 6, d: int = 5, width: int = 4, m_in: int = 4,
                  m_out: int = 3) -> tuple[LinearParams, TaskBatch]:
    """A few tasks and a linear model with a non-zero head (so every gradient term acts)."""
    rng = np.random.default_rng(seed)
    problem = make_problem(d, 2, 0.5, "linear", rng)
    batch = sample_tasks(problem, n, m_in, m_out, rng)
    params = LinearParams(rng.standard_normal((d, width)) * 0.5, rng.standard_normal(width) * 0.5)
    return params, batch


def learner_for(name: str, module: torch.nn.Module, inner_steps: int, n_tasks: int,
                dtype: str = "float64") -> MetaLearner:
    method, first_order = engine_method(name)
    return MetaLearner(module, "w", method=method, first_order=first_order, inner_lr=ALPHA,
                       outer_lr=BETA, inner_steps=inner_steps, n_tasks=n_tasks, dtype=dtype)


# ----------------------------------------------------------------- the independent reference


def outer_objective(name: str, params: LinearParams, batch: TaskBatch, steps: int):
    """The method's outer objective as a function of a flat vector ``theta``
    (:func:`metarep.core.reference.outer_objective`, :func:`~metarep.core.reference.mtl_objective`),
    the point at which its gradient is the method's update direction, and how to map that
    gradient to the update of (B, w) (mtl: of (B, w_1 .. w_N))."""
    if name != "mtl":
        objective, theta = reference.outer_objective(name, params, batch, ALPHA, steps)
        return objective, theta, lambda g: g
    d, width = params.B.shape
    n = batch.n_tasks
    state = MTLState(*params, np.tile(params.w, (n, 1)))
    objective, theta = reference.mtl_objective(state, batch)  # mean_i L(B, w_i; X_i, y_i)
    # B steps on the mean loss; head i steps on its own loss, n times its share of the mean
    return objective, theta, lambda g: np.concatenate([g[: d * width], n * g[d * width:]])


def central_differences(objective, theta: np.ndarray, h: float = 1e-5) -> np.ndarray:
    gradient = np.empty_like(theta)
    for j in range(theta.size):
        step = np.zeros_like(theta)
        step[j] = h
        gradient[j] = (objective(theta + step) - objective(theta - step)) / (2 * h)
    return gradient


# ----------------------------------------------------------------- agreement


@pytest.mark.parametrize("inner_steps", [1, 2])
@pytest.mark.parametrize("name", METHOD_NAMES)
def test_engine_equals_linear_fast_path(name, inner_steps):
    params, batch = small_problem()
    method = methods.make_method(name, ALPHA, BETA, inner_steps)
    state = method.init_state(params, batch.n_tasks)
    learner = learner_for(name, LinearNet(*params), inner_steps, batch.n_tasks)
    for _ in range(3):
        state, loss = method.step(state, batch)
        engine_loss = learner.step(batch.X_in, batch.y_in, batch.X_out, batch.y_out)
        assert engine_loss == pytest.approx(loss, abs=1e-10)
    engine = learner.state
    np.testing.assert_allclose(engine.params["B"].numpy(), state.B, rtol=0, atol=1e-10)
    np.testing.assert_allclose(engine.params["w"].numpy(), state.w, rtol=0, atol=1e-10)
    if name == "mtl":
        np.testing.assert_allclose(engine.heads["w"].numpy(), state.heads, rtol=0, atol=1e-10)
        np.testing.assert_array_equal(engine.params["w"].numpy(), params.w)  # w stays w_0


def test_mtl_sampled_tasks_equal_linear_fast_path():
    params, pool = small_problem(n=8)
    method = methods.MTL(BETA)
    state = method.init_state(params, pool.n_tasks)
    learner = learner_for("mtl", LinearNet(*params), 1, pool.n_tasks)
    rng = np.random.default_rng(5)
    for _ in range(3):
        batch = pool.take(rng.choice(pool.n_tasks, 3, replace=False))
        state, loss = method.step(state, batch)
        engine_loss = learner.step(batch.X_in, batch.y_in, batch.X_out, batch.y_out,
                                   tasks=batch.indices)
        assert engine_loss == pytest.approx(loss, abs=1e-10)
    np.testing.assert_allclose(learner.state.heads["w"].numpy(), state.heads, rtol=0, atol=1e-10)
    np.testing.assert_allclose(learner.state.params["B"].numpy(), state.B, rtol=0, atol=1e-10)


@pytest.mark.parametrize("inner_steps", [1, 2])
@pytest.mark.parametrize("name", METHOD_NAMES)
def test_engine_step_equals_finite_differences(name, inner_steps):
    params, batch = small_problem(seed=1, n=4, d=4, width=3)
    objective, theta, to_update = outer_objective(name, params, batch, inner_steps)
    expected = to_update(central_differences(objective, theta))
    learner = learner_for(name, LinearNet(*params), inner_steps, batch.n_tasks)
    learner.step(batch.X_in, batch.y_in, batch.X_out, batch.y_out)
    new = learner.state
    moved = [params.B - new.params["B"].numpy()]
    moved.append(params.w - new.heads["w"].numpy() if name == "mtl"
                 else params.w - new.params["w"].numpy())
    gradient = np.concatenate([a.ravel() for a in moved]) / BETA
    np.testing.assert_allclose(gradient, expected, rtol=1e-6, atol=1e-8)


def test_second_order_differs_from_first_order():
    params, batch = small_problem()
    steps = {}
    for name in ("anil", "fo-anil"):
        learner = learner_for(name, LinearNet(*params), 1, batch.n_tasks)
        learner.step(batch.X_in, batch.y_in, batch.X_out, batch.y_out)
        steps[name] = learner.state.params["B"].numpy()
    assert np.abs(steps["anil"] - steps["fo-anil"]).max() > 1e-3


@pytest.mark.parametrize("hidden_layers", [1, 2])
@pytest.mark.parametrize("name", METHOD_NAMES)
def test_relu_engine_float32_runs_and_lowers_the_loss(name, hidden_layers):
    _, batch = small_problem(n=16, d=6)
    net = init_relu(6, 8, hidden_layers, 7, 0.5, np.random.default_rng(0))
    learner = learner_for(name, net, 2, batch.n_tasks, dtype="float32")
    losses = [learner.step(batch.X_in, batch.y_in, batch.X_out, batch.y_out) for _ in range(30)]
    assert all(np.isfinite(losses)) and losses[-1] < losses[0]
    assert all(t.dtype == torch.float32 for t in learner.state.params.values())
    assert net.W1.dtype == torch.float64  # the module itself is never modified


# ----------------------------------------------------------------- a user-defined module


class TwoLayer(torch.nn.Module):
    """A module with the head as a submodule (parameters ``body.weight``, ``head.weight``)."""

    def __init__(self, d: int, width: int):
        super().__init__()
        self.body = torch.nn.Linear(d, width, bias=False, dtype=torch.float64)
        self.head = torch.nn.Linear(width, 1, bias=False, dtype=torch.float64)

    def forward(self, x):
        return self.head(self.body(x))  # (m, 1)


def test_user_module_with_head_prefix_equals_linear_net():
    params, batch = small_problem()
    user = TwoLayer(*params.B.shape)
    with torch.no_grad():
        user.body.weight.copy_(torch.as_tensor(params.B.T))
        user.head.weight.copy_(torch.as_tensor(params.w[None, :]))
    ours = learner_for("maml", LinearNet(*params), 2, batch.n_tasks)
    theirs = MetaLearner(user, head="head", method="maml", inner_lr=ALPHA, outer_lr=BETA,
                         inner_steps=2)
    for _ in range(2):
        expected = ours.step(batch.X_in, batch.y_in, batch.X_out, batch.y_out)
        assert theirs.step(batch.X_in, batch.y_in, batch.X_out, batch.y_out) == pytest.approx(
            expected, abs=1e-12)
    np.testing.assert_allclose(theirs.state.params["body.weight"].numpy().T,
                               ours.state.params["B"].numpy(), atol=1e-12)
    assert theirs.head == ("head.weight",)


def test_adapt_heads_matches_fast_path_adaptation():
    params, batch = small_problem()
    learner = learner_for("fo-anil", LinearNet(*params), 1, batch.n_tasks)
    heads = learner.adapt_heads(learner.state.params, batch.X_in, batch.y_in, 2, ALPHA)
    expected = methods.adapt_head(params.B, params.w, batch.X_in, batch.y_in, ALPHA, 2)
    for i in range(batch.n_tasks):
        np.testing.assert_allclose(expected[i], reference.adapt_head(
            params.B, params.w, batch.X_in[i], batch.y_in[i], ALPHA, 2), atol=1e-12)
    np.testing.assert_allclose(heads["w"].numpy(), expected, atol=1e-12)
    predictions = learner.predict_adapted(learner.state.params, heads, batch.X_out)
    np.testing.assert_allclose(predictions.numpy(),
                               np.einsum("nmd,nd->nm", batch.X_out, expected @ params.B.T),
                               atol=1e-12)


# ----------------------------------------------------------------- bad input


@pytest.mark.parametrize(("kwargs", "argument"), [
    ({"method": "reptile"}, "method"),
    ({"inner_lr": -1.0}, "inner_lr"),
    ({"inner_lr": True}, "inner_lr"),
    ({"outer_lr": float("nan")}, "outer_lr"),
    ({"inner_steps": 0}, "inner_steps"),
    ({"method": "mtl"}, "n_tasks"),
    ({"method": "mtl", "n_tasks": 0}, "n_tasks"),
    ({"head": "nothing"}, "head"),
    ({"head": ["W1", "w"]}, "head"),
    ({"dtype": "float16"}, "dtype"),
    ({"device": "tpu"}, "device"),
])
def test_bad_arguments_name_the_argument(kwargs, argument):
    arguments = {"head": "w", "inner_lr": 0.1, "outer_lr": 0.1, **kwargs}
    with pytest.raises(ArgumentError) as error:
        MetaLearner(ReLUNet([np.ones((3, 2))], np.zeros(2)), **arguments)
    assert error.value.argument == argument


def test_bad_task_indices_name_the_argument():
    params, batch = small_problem(n=4)
    learner = learner_for("mtl", LinearNet(*params), 1, batch.n_tasks)
    with pytest.raises(ArgumentError) as error:
        learner.step(batch.X_in, batch.y_in, batch.X_out, batch.y_out, tasks=[0, 1, 2, 4])
    assert error.value.argument == "tasks"


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is present")
def test_cuda_requested_without_cuda_is_an_argument_error():
    with pytest.raises(ArgumentError, match="cuda") as error:
        MetaLearner(ReLUNet([np.ones((3, 2))], np.zeros(2)), "w", inner_lr=0.1, outer_lr=0.1,
                    device="cuda")
    assert error.value.argument == "device"


def test_config_method_names_map_to_the_engine_method_and_order():
    assert engine_method("fo-anil") == ("anil", True)
    assert engine_method("maml") == ("maml", False)
    assert engine_method("mtl") == ("mtl", False)
    for name in METHOD_NAMES:
        method, first_order = engine_method(name)
        MetaLearner(LinearNet(np.ones((3, 2)), np.zeros(2)), "w", method=method,
                    first_order=first_order, inner_lr=0.1, outer_lr=0.1, n_tasks=4)


def test_readme_example_meta_trains_a_user_module():
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = readme.split("### ReLU networks and any PyTorch module")[1]
    code = section.split("```python\n")[1].split("```")[0]
    namespace: dict = {}
    exec(compile(code, "README.md", "exec"), namespace)
    losses = namespace["losses"]
    assert losses[-1] < 0.7 * losses[0]
    assert set(namespace["trained"]) == {"body.0.weight", "body.0.bias", "head.weight"}


# ----------------------------------------------------------------- the ReLU fast path


class Wrapped(torch.nn.Module):
    """A network behind a plain module: the engine's generic torch.func path for it."""

    def __init__(self, net: torch.nn.Module):
        super().__init__()
        self.net = net

    def forward(self, x):
        return self.net(x)


def relu_net(hidden_layers: int, seed: int = 0, d: int = 5) -> ReLUNet:
    net = init_relu(d, 4, hidden_layers, 3, 1.0, np.random.default_rng(seed))
    with torch.no_grad():
        net.w.normal_(generator=torch.Generator().manual_seed(seed))  # every term acts
    return net


@pytest.mark.parametrize("inner_steps", [1, 2])
@pytest.mark.parametrize("hidden_layers", [1, 2])
@pytest.mark.parametrize("name", METHOD_NAMES)
def test_relu_fast_path_equals_the_generic_path(name, hidden_layers, inner_steps):
    _, batch = small_problem(n=6, d=5)
    net = relu_net(hidden_layers)
    method, first_order = engine_method(name)
    fast, generic = (MetaLearner(module, head, method=method, first_order=first_order,
                                 inner_lr=ALPHA, outer_lr=BETA, inner_steps=inner_steps,
                                 n_tasks=batch.n_tasks, task_chunk=chunk)
                     for module, head, chunk in ((net, "w", 4), (Wrapped(net), "net.w", None)))
    assert fast.chain is not None and generic.chain is None
    for _ in range(3):
        loss = fast.step(batch.X_in, batch.y_in, batch.X_out, batch.y_out)
        assert loss == pytest.approx(generic.step(batch.X_in, batch.y_in, batch.X_out,
                                                  batch.y_out), abs=1e-12)
    for key, value in fast.state.params.items():
        np.testing.assert_allclose(value.numpy(), generic.state.params["net." + key].numpy(),
                                   rtol=0, atol=1e-12)
    if name == "mtl":
        np.testing.assert_allclose(fast.state.heads["w"].numpy(),
                                   generic.state.heads["net.w"].numpy(), rtol=0, atol=1e-12)


@pytest.mark.parametrize(("steps", "from_zero", "chunk"),
                         [(0, False, None), (1, True, None), (2, False, 4), (3, True, 5)])
@pytest.mark.parametrize("hidden_layers", [1, 2])
def test_relu_test_time_adaptation_fast_path_equals_vmap(hidden_layers, steps, from_zero, chunk):
    """Test-time head steps of the built-in networks (all tasks of a chunk at once) against
    the same module wrapped, adapted task by task under vmap of torch.func.grad."""
    _, batch = small_problem(n=7, d=5)
    net = relu_net(hidden_layers, seed=4)
    fast, generic = (MetaLearner(module, head, method="anil", first_order=True, inner_lr=ALPHA,
                                 outer_lr=BETA, task_chunk=chunk)
                     for module, head in ((net, "w"), (Wrapped(net), "net.w")))
    assert fast.chain is not None and generic.chain is None
    heads = fast.adapt_heads(fast.state.params, batch.X_in, batch.y_in, steps, 0.7, from_zero)
    expected = generic.adapt_heads(generic.state.params, batch.X_in, batch.y_in, steps, 0.7,
                                   from_zero)
    assert heads["w"].shape == expected["net.w"].shape == (batch.n_tasks, *net.w.shape)
    np.testing.assert_allclose(heads["w"].numpy(), expected["net.w"].numpy(), rtol=0,
                               atol=1e-12)
    if steps:  # the steps act: each task's head moved from the shared one, by its own data
        assert not torch.allclose(heads["w"][0], heads["w"][1])


@pytest.mark.parametrize("hidden_layers", [1, 2])
@pytest.mark.parametrize("name", ["maml", "anil"])
def test_relu_exact_step_equals_finite_differences(name, hidden_layers):
    """The fast path's exact second-order gradient against central differences of the outer
    objective ``mean_i L(theta_i'(theta); out_i)``, ``theta_i'`` one inner step (its gradient
    by autograd, per task): away from the ReLU kinks the objective is smooth."""
    _, batch = small_problem(seed=2, n=4, d=5)
    net = relu_net(hidden_layers, seed=3)
    names = [n for n, _ in net.named_parameters()]
    shapes = [p.shape for p in net.parameters()]
    sizes = [p.numel() for p in net.parameters()]
    data = [torch.as_tensor(a) for a in (batch.X_in, batch.y_in, batch.X_out, batch.y_out)]

    def objective(theta: np.ndarray) -> float:
        flat = torch.as_tensor(theta).requires_grad_()
        params = dict(zip(names, (t.reshape(s) for t, s in
                                  zip(flat.split(sizes), shapes, strict=True)), strict=True))
        total = 0.0
        for X_in, y_in, X_out, y_out in zip(*data, strict=True):
            fast = params if name == "maml" else {"w": params["w"]}
            inner = 0.5 * torch.mean((torch.func.functional_call(net, params, (X_in,))
                                      - y_in) ** 2)
            grads = torch.autograd.grad(inner, tuple(fast.values()))
            adapted = {**params, **{n: fast[n] - ALPHA * g for n, g in zip(fast, grads,
                                                                               strict=True)}}
            outer = torch.func.functional_call(net, adapted, (X_out,))
            total += float(0.5 * torch.mean((outer.detach() - y_out) ** 2))
        return total / len(data[0])

    theta = np.concatenate([p.detach().numpy().ravel() for p in net.parameters()])
    expected = central_differences(objective, theta, h=1e-6)
    learner = learner_for(name, net, 1, batch.n_tasks)
    assert learner.chain is not None
    learner.step(batch.X_in, batch.y_in, batch.X_out, batch.y_out)
    moved = np.concatenate([(p.detach().numpy() - learner.state.params[n].numpy()).ravel()
                            for n, p in net.named_parameters()])
    np.testing.assert_allclose(moved / BETA, expected, rtol=1e-5, atol=1e-7)


def test_relu_fast_path_holds_frozen_parameters():
    _, batch = small_problem(n=6, d=5)
    net = relu_net(2)
    net.W1.requires_grad_(False)
    results = []
    for module, prefix in ((net, ""), (Wrapped(net), "net.")):
        learner = MetaLearner(module, prefix + "w", method="maml", inner_lr=ALPHA, outer_lr=BETA,
                              inner_steps=2)
        for _ in range(2):
            learner.step(batch.X_in, batch.y_in, batch.X_out, batch.y_out)
        results.append({n.removeprefix(prefix): p.numpy() for n, p in
                        learner.state.params.items()})
    np.testing.assert_array_equal(results[0]["W1"], net.W1.detach().numpy())
    for key in ("W2", "w"):
        np.testing.assert_allclose(results[0][key], results[1][key], rtol=0, atol=1e-12)
    assert np.abs(results[0]["W2"] - net.W2.detach().numpy()).max() > 1e-4
