"""Model-agnostic meta-learning of any ``torch.nn.Module`` with ``torch.func`` (specification §3).

The module's parameters ``theta`` are split into a body ``theta_B`` and a head ``theta_w`` (the
user names the head). On task ``i`` with inputs ``X`` (m, d) and labels ``y`` (m,), the loss is
``L(theta; X, y) = ||f(X; theta) - y||^2 / (2 m)``; the inner set is ``(X_i^in, y_i^in)``, the
outer set ``(X_i^out, y_i^out)``, ``alpha`` = ``inner_lr``, ``beta`` = ``outer_lr``, ``s`` =
``inner_steps``. Methods (``method``, with ``first_order`` the one switch between exact and
first-order outer gradients):

- ``anil``: the inner loop adapts the head only,
  ``w_i^(0) = theta_w``, ``w_i^(j+1) = w_i^(j) - alpha grad_w L(theta_B, w_i^(j); X_i^in, y_i^in)``;
  the outer objective is ``J(theta) = mean_i L(theta_B, w_i^(s)(theta); X_i^out, y_i^out)`` and
  ``theta <- theta - beta grad_theta J`` (differentiating through the inner loop).
  ``first_order=True`` (FO-ANIL) holds ``w_i^(s)`` constant:
  ``theta_B <- theta_B - beta mean_i grad_B L(theta_B, w_i^(s); out)``,
  ``theta_w <- theta_w - beta mean_i grad_w L(theta_B, w_i^(s); out)``.
- ``maml``: the inner loop adapts body and head together,
  ``theta_i^(j+1) = theta_i^(j) - alpha grad_theta L(theta_i^(j); X_i^in, y_i^in)``,
  ``theta <- theta - beta grad_theta mean_i L(theta_i^(s)(theta); out)``; ``first_order=True``
  (FO-MAML) applies the gradient taken at the adapted parameters:
  ``theta <- theta - beta mean_i grad L(theta_i^(s); out)``.
- ``mtl`` (Burer-Monteiro multi-task learning): per-task heads ``w_i`` (all starting at the
  module's head ``w_0``, which itself stays ``w_0``) trained jointly with the body on all
  ``m = m_in + m_out`` rows of each sampled task, simultaneously:
  ``theta_B <- theta_B - beta grad_B mean_i L(theta_B, w_i; X_i, y_i)``,
  ``w_i <- w_i - beta grad_w L(theta_B, w_i; X_i, y_i)``. ``inner_lr``, ``inner_steps`` and
  ``first_order`` play no role in its training.

The reported loss of a step is the mean outer loss after adaptation at the parameters before
the step (for ``mtl``: ``mean_i L(theta_B, w_i; X_i, y_i)``). Every per-task quantity is computed
with ``torch.func.vmap`` over the task axis (no per-task Python loop); gradients with
``torch.func.grad`` through ``functional_call``, so the module itself is never modified.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor, nn
from torch.func import functional_call, grad, grad_and_value, vmap

from metarep.core.arguments import check_count, check_step_size
from metarep.engine import DEVICES
from metarep.errors import ArgumentError

METHODS = ("anil", "maml", "mtl")

Params = dict[str, Tensor]
ArrayLike = np.ndarray | Tensor


def resolve_device(name: str | torch.device) -> torch.device:
    """``cpu``, ``cuda`` (an ArgumentError when no CUDA device is present) or ``auto`` (CUDA when
    present, else CPU)."""
    if isinstance(name, torch.device):
        name = name.type
    if name not in DEVICES:
        raise ArgumentError("device", f"must be one of {', '.join(DEVICES)}; got {name!r}")
    has_cuda = torch.cuda.is_available()
    if name == "cuda" and not has_cuda:
        raise ArgumentError("device", "cuda requested but no CUDA device is available; "
                            "use cpu or auto")
    return torch.device("cuda" if name == "cuda" or (name == "auto" and has_cuda) else "cpu")


def resolve_dtype(dtype: str | torch.dtype) -> torch.dtype:
    """``float64`` / ``float32`` (names or torch dtypes)."""
    table = {"float64": torch.float64, "float32": torch.float32}
    if isinstance(dtype, torch.dtype) and dtype in table.values():
        return dtype
    if dtype not in table:
        raise ArgumentError("dtype", f"must be float64 or float32; got {dtype!r}")
    return table[dtype]


def head_names(module: nn.Module, head: str | Sequence[str]) -> tuple[str, ...]:
    """Names of the head parameters: each entry of ``head`` is a parameter name or a prefix
    (``"head"`` matches ``head.weight`` and ``head.bias``). The body must keep a parameter."""
    entries = (head,) if isinstance(head, str) else tuple(head)
    names = tuple(n for n, _ in module.named_parameters()
                  if any(n == e or n.startswith(e + ".") for e in entries))
    if not names:
        found = ", ".join(n for n, _ in module.named_parameters())
        raise ArgumentError("head", f"{entries} names no parameter of the module (found: "
                            f"{found})")
    if len(names) == len(list(module.parameters())):
        raise ArgumentError("head", "the head may not hold every parameter: the body must "
                            "keep one")
    return names


@dataclass(frozen=True)
class EngineState:
    """Training state: ``params`` (every parameter of the module, body and shared head) and,
    for ``mtl`` only, ``heads``: each head parameter with a leading task axis (N, ...)."""

    params: Params
    heads: Params | None = None

    def is_finite(self) -> bool:
        tensors = [*self.params.values(), *(self.heads or {}).values()]
        return bool(all(torch.isfinite(t).all() for t in tensors))

    def arrays(self) -> dict[str, np.ndarray]:
        """Every tensor as a numpy array of its dtype, by parameter name; the mtl heads as
        ``heads`` when the head is one parameter, else ``heads.NAME``."""
        out = {name: t.detach().cpu().numpy() for name, t in self.params.items()}
        heads = self.heads or {}
        out.update({_heads_key(name, len(heads)): t.detach().cpu().numpy()
                    for name, t in heads.items()})
        return out

    def with_arrays(self, arrays: Mapping[str, np.ndarray]) -> EngineState:
        """A state of the same structure, dtype and device holding ``arrays`` (as written by
        :meth:`arrays`)."""

        def like(reference: Tensor, array: np.ndarray) -> Tensor:
            return torch.as_tensor(array).to(device=reference.device, dtype=reference.dtype)

        params = {name: like(t, arrays[name]) for name, t in self.params.items()}
        if self.heads is None:
            return EngineState(params)
        count = len(self.heads)
        return EngineState(params, {name: like(t, arrays[_heads_key(name, count)])
                                    for name, t in self.heads.items()})


def _heads_key(name: str, count: int) -> str:
    return "heads" if count == 1 else f"heads.{name}"


def _numpy(tensor: Tensor) -> np.ndarray:
    return tensor.detach().cpu().double().numpy()


class MetaLearner:
    """Meta-train ``module`` with ``method`` (``anil``, ``maml`` or ``mtl``; see the module
    docstring for the updates), exact (``first_order=False``) or first-order.

    The learner copies the module's parameters (to ``device``/``dtype``) into ``self.state``;
    :meth:`step` updates that copy, :meth:`outer_step` is the same update as a pure function of
    a state. The module must map inputs (m, d) to outputs of m entries ((m,) or (m, 1)).
    ``n_tasks`` (the pool size N) is required for ``mtl``, which keeps one head per task.

    Example::

        learner = MetaLearner(net, head="w", method="anil", first_order=True,
                              inner_lr=0.2, outer_lr=0.05)
        loss = learner.step(X_in, y_in, X_out, y_out)  # (N, m_in, d), (N, m_in), ...
    """

    def __init__(
        self,
        module: nn.Module,
        head: str | Sequence[str],
        *,
        method: str = "anil",
        first_order: bool = False,
        inner_lr: float,
        outer_lr: float,
        inner_steps: int = 1,
        n_tasks: int | None = None,
        device: str | torch.device = "cpu",
        dtype: str | torch.dtype = torch.float64,
    ):
        if method not in METHODS:
            raise ArgumentError("method", f"must be one of {', '.join(METHODS)} (with "
                                f"first_order for fo-anil / fo-maml); got {method!r}")
        check_step_size("inner_lr", inner_lr)
        check_step_size("outer_lr", outer_lr)
        check_count("inner_steps", inner_steps)
        self.module = module
        self.method, self.first_order = method, bool(first_order)
        self.inner_lr, self.outer_lr = float(inner_lr), float(outer_lr)
        self.inner_steps = inner_steps
        self.device, self.dtype = resolve_device(device), resolve_dtype(dtype)
        self.head = head_names(module, head)
        self.buffers = {name: b.to(self.device, self.dtype if b.is_floating_point() else None)
                        for name, b in module.named_buffers()}
        self.state = self.init_state(module, n_tasks)

    def init_state(self, module: nn.Module, n_tasks: int | None = None) -> EngineState:
        """The state at ``module``'s parameters (same names as the learner's module), copied
        to the learner's device and dtype; for ``mtl``, ``n_tasks`` copies of its head."""
        params = {name: self.tensor(p.detach()) for name, p in module.named_parameters()}
        if self.method != "mtl":
            return EngineState(params)
        if not isinstance(n_tasks, int) or n_tasks < 1:
            raise ArgumentError("n_tasks", f"mtl needs the number of tasks n_tasks >= 1, got "
                                f"{n_tasks!r}")
        return EngineState(params, {name: params[name].expand(n_tasks, *params[name].shape)
                                    .clone() for name in self.head})

    # ------------------------------------------------------------------ helpers

    def tensor(self, array: ArrayLike) -> Tensor:
        """``array`` as a tensor of the learner's dtype on its device."""
        return torch.as_tensor(array).to(device=self.device, dtype=self.dtype)

    def split(self, params: Mapping[str, Tensor]) -> tuple[Params, Params]:
        """``(body, head)`` parameter dicts."""
        body = {n: p for n, p in params.items() if n not in self.head}
        return body, {n: params[n] for n in self.head}

    def task_loss(self, params: Mapping[str, Tensor], X: Tensor, y: Tensor) -> Tensor:
        """``L(theta; X, y) = ||f(X; theta) - y||^2 / (2 m)`` for one task (X (m, d), y (m,))."""
        prediction = functional_call(self.module, {**self.buffers, **params}, (X,))
        return 0.5 * torch.mean((prediction.reshape(y.shape) - y) ** 2)

    def _inner_loop(self, fixed: Params, fast: Params, X: Tensor, y: Tensor,
                    steps: int, lr: float) -> Params:
        """``steps`` gradient steps of size ``lr`` on the ``fast`` parameters of one task,
        ``fast <- fast - lr grad_fast L(fixed, fast; X, y)``, ``fixed`` held."""

        def loss_of_fast(current: Params) -> Tensor:
            return self.task_loss({**fixed, **current}, X, y)

        for _ in range(steps):
            gradient = grad(loss_of_fast)(fast)
            fast = {n: fast[n] - lr * gradient[n] for n in fast}
        return fast

    # ------------------------------------------------------------------ training

    def outer_step(
        self,
        state: EngineState,
        X_in: ArrayLike,
        y_in: ArrayLike,
        X_out: ArrayLike,
        y_out: ArrayLike,
        tasks: ArrayLike | None = None,
    ) -> tuple[EngineState, float]:
        """One outer step on a batch of tasks: ``X_in`` (N, m_in, d), ``y_in`` (N, m_in),
        ``X_out`` (N, m_out, d), ``y_out`` (N, m_out). ``tasks`` (mtl only) are the indices of the
        batch's tasks among the ``n_tasks`` heads (default: all, in order). Returns the new state
        and the meta-training loss at ``state``."""
        X_in, y_in, X_out, y_out = (self.tensor(a) for a in (X_in, y_in, X_out, y_out))
        if self.method == "mtl":
            return self._mtl_step(state, torch.cat([X_in, X_out], 1),
                                  torch.cat([y_in, y_out], 1), tasks)
        fixed, fast = self.split(state.params)
        if self.method == "maml":
            fixed, fast = {}, dict(state.params)
        gradient, loss = (self._first_order_gradient if self.first_order
                          else self._exact_gradient)(fixed, fast, X_in, y_in, X_out, y_out)
        params = {n: p - self.outer_lr * gradient[n] for n, p in state.params.items()}
        return EngineState(params, state.heads), float(loss)

    def _exact_gradient(self, fixed: Params, fast: Params, X_in: Tensor, y_in: Tensor,
                        X_out: Tensor, y_out: Tensor) -> tuple[Params, Tensor]:
        """``grad J`` of ``J = mean_i L(fixed, fast_i^(s)(fixed, fast); out)``, and ``J``."""

        def objective(fixed: Params, fast: Params) -> Tensor:
            def task(X_in: Tensor, y_in: Tensor, X_out: Tensor, y_out: Tensor) -> Tensor:
                adapted = self._inner_loop(fixed, fast, X_in, y_in, self.inner_steps,
                                           self.inner_lr)
                return self.task_loss({**fixed, **adapted}, X_out, y_out)

            return vmap(task)(X_in, y_in, X_out, y_out).mean()

        (g_fixed, g_fast), loss = grad_and_value(objective, argnums=(0, 1))(fixed, fast)
        return {**g_fixed, **g_fast}, loss

    def _first_order_gradient(self, fixed: Params, fast: Params, X_in: Tensor, y_in: Tensor,
                              X_out: Tensor, y_out: Tensor) -> tuple[Params, Tensor]:
        """``mean_i grad L(fixed, fast_i^(s); out)`` with the adapted ``fast_i^(s)`` held
        constant, and the mean outer loss."""
        adapt = vmap(self._inner_loop, in_dims=(None, None, 0, 0, None, None))
        adapted = adapt(fixed, fast, X_in, y_in, self.inner_steps, self.inner_lr)

        def objective(fixed: Params, adapted: Params) -> Tensor:
            def task(adapted: Params, X: Tensor, y: Tensor) -> Tensor:
                return self.task_loss({**fixed, **adapted}, X, y)

            return vmap(task)(adapted, X_out, y_out).mean()

        (g_fixed, g_adapted), loss = grad_and_value(objective, argnums=(0, 1))(fixed, adapted)
        return {**g_fixed, **{n: g.sum(0) for n, g in g_adapted.items()}}, loss

    def _mtl_step(self, state: EngineState, X: Tensor, y: Tensor,
                  tasks: ArrayLike | None) -> tuple[EngineState, float]:
        """Burer-Monteiro step on all rows ``X`` (n, m, d), ``y`` (n, m) of the sampled tasks."""
        assert state.heads is not None
        n_total = next(iter(state.heads.values())).shape[0]
        index = torch.arange(X.shape[0]) if tasks is None else torch.as_tensor(tasks).long()
        if index.shape != (X.shape[0],) or int(index.min()) < 0 or int(index.max()) >= n_total:
            raise ArgumentError("tasks", f"need one index in [0, {n_total}) per task of the "
                                "batch")
        index = index.to(self.device)
        body, _ = self.split(state.params)
        heads = {n: h[index] for n, h in state.heads.items()}

        def objective(body: Params, heads: Params) -> tuple[Tensor, Tensor]:
            def task(head: Params, X: Tensor, y: Tensor) -> Tensor:
                return self.task_loss({**body, **head}, X, y)

            losses = vmap(task)(heads, X, y)
            return losses.sum(), losses.mean()

        # grad_{w_i} sum_j L_j = grad_w L_i (each head's own loss); the body takes the mean
        gradients, (_, loss) = grad_and_value(objective, argnums=(0, 1), has_aux=True)(body, heads)
        g_body, g_heads = gradients
        n = X.shape[0]
        params = {**state.params, **{k: v - self.outer_lr * g_body[k] / n for k, v in body.items()}}
        new_heads = {name: h.index_put((index,), heads[name] - self.outer_lr * g_heads[name])
                     for name, h in state.heads.items()}
        return EngineState(params, new_heads), float(loss)

    def step(self, X_in: ArrayLike, y_in: ArrayLike, X_out: ArrayLike, y_out: ArrayLike,
             tasks: ArrayLike | None = None) -> float:
        """:meth:`outer_step` on ``self.state``, which it replaces; returns the loss."""
        self.state, loss = self.outer_step(self.state, X_in, y_in, X_out, y_out, tasks)
        return loss

    # ------------------------------------------------------------------ test time

    def adapt_heads(self, params: Mapping[str, Tensor], X: ArrayLike, y: ArrayLike, steps: int,
                    lr: float, from_zero: bool = False) -> Params:
        """Test-time adaptation on each task of ``X`` (n, m, d), ``y`` (n, m): ``steps`` head
        steps ``w <- w - lr grad_w L(theta_B, w; X_i, y_i)`` from the head in ``params`` (from
        ``w = 0`` when ``from_zero``). Returns the adapted heads with a task axis (n, ...)."""
        X, y = self.tensor(X), self.tensor(y)
        body, head = self.split(params)
        if from_zero:
            head = {name: torch.zeros_like(t) for name, t in head.items()}
        adapt = vmap(self._inner_loop, in_dims=(None, None, 0, 0, None, None))
        with torch.no_grad():
            return adapt(body, head, X, y, steps, lr)

    def predict_adapted(self, params: Mapping[str, Tensor], heads: Mapping[str, Tensor],
                        X: ArrayLike) -> Tensor:
        """``f(X_i; theta_B, w_i)`` for per-task heads (n, ...) and inputs ``X`` (n, m, d)."""
        X = self.tensor(X)
        body, _ = self.split(params)

        def task(head: Params, X: Tensor) -> Tensor:
            return functional_call(self.module, {**self.buffers, **body, **head}, (X,))

        with torch.no_grad():
            return vmap(task)(dict(heads), X).reshape(X.shape[:-1])

    def test_predictor(self, params: Mapping[str, Tensor], steps: int, lr: float,
                       from_zero: bool = False) -> Callable[[np.ndarray, np.ndarray, np.ndarray],
                                                            np.ndarray]:
        """The numpy predictor of :func:`metarep.core.evaluation.evaluate_predictors`:
        ``(X (n, m, d), y (n, m), X_test (n, m', d)) -> f(X_test; theta_B, w_i')`` (n, m') with
        ``w_i'`` from :meth:`adapt_heads` on each task's ``(X, y)``."""

        def predict(X: np.ndarray, y: np.ndarray, X_test: np.ndarray) -> np.ndarray:
            heads = self.adapt_heads(params, X, y, steps, lr, from_zero)
            return _numpy(self.predict_adapted(params, heads, X_test))

        return predict

    def feature_map(self, params: Mapping[str, Tensor]) -> Callable[[np.ndarray], np.ndarray]:
        """``X (..., d) -> phi(X) (..., k')`` in numpy, for modules with a
        ``features(x, params)`` method (the networks of :mod:`metarep.engine.networks`)."""
        features = self.module.features

        def phi(X: np.ndarray) -> np.ndarray:
            with torch.no_grad():
                return _numpy(features(self.tensor(X), params))

        return phi
