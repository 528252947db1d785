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

What a module may hold (checked when the learner is built, and by one forward pass on the first
inputs the learner sees):

- Parameters with ``requires_grad=False`` are held fixed: constants in the inner and the outer
  loop, bitwise equal to their initial values after any number of steps; the head must keep a
  trainable parameter.
- Buffers that forward only reads (a registered constant, BatchNorm's statistics in ``eval()``
  mode) are constants. A buffer that forward writes (BatchNorm / InstanceNorm with
  ``track_running_stats=True`` in training mode, any running mean) is state shared by every
  task, which functional meta-learning cannot carry: an
  :class:`~metarep.errors.ArgumentError` (``argument == "module"``) names the submodule and
  its type. ``BatchNorm`` with ``track_running_stats=False`` is accepted: it normalises each
  task by the statistics of that task's own rows (vmap keeps the tasks apart).

Two options bound memory and fix the numerics: ``task_chunk`` computes a training step on at
most that many tasks at a time (the gradients summed over the chunks, so the autograd graph of
one chunk is in memory at once) and test-time adaptation with
``vmap(..., chunk_size=task_chunk)``: the results equal the unchunked ones up to rounding.
``deterministic`` runs every computation of the learner under :func:`deterministic_algorithms`.

The networks of :mod:`metarep.engine.networks` (:class:`~metarep.engine.networks.LinearNet`,
:class:`~metarep.engine.networks.ReLUNet`, with the head ``w`` and no buffers) train on a fast
path with the same updates: :func:`~metarep.engine.networks.chain_gradient` computes every
task's loss and gradient at once with the tasks as a batch axis (a shared weight multiplies
all tasks' rows in one matrix product), its backward pass written out, so the inner loop
``fast_i <- fast_i - alpha grad L_i`` costs a few batched products instead of vmap's per-call
tracing. An adapted first layer is kept as ``W_1 - X_i^T C_i`` (its gradients
``X_i^T dZ_1`` lie in the span of the task's inner inputs), so that ``X W_1,i`` is
``X W_1 - (X X_i^T) C_i``: one product of all rows with the shared ``W_1`` and (m, m_in)
Gram matrices, never a (d, h_1) matrix per task. The first-order methods apply the same
function at the adapted parameters (``sum_i grad L_i`` summed in one product); the exact ones
take ``grad_theta`` of the outer objective by autograd through the written-out inner
gradients, which are differentiable torch operations: the exact second-order gradient. The
results equal the generic path's up to rounding.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor, nn
from torch.func import functional_call, grad, grad_and_value, vmap

from metarep.core.arguments import check_count, check_step_size
from metarep.engine import DEVICES
from metarep.engine.networks import HEAD, chain_gradient, chain_of, first_layer_offset
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


CUBLAS_VARIABLE = "CUBLAS_WORKSPACE_CONFIG"
DETERMINISTIC_CUBLAS = (":4096:8", ":16:8")
"""The values of ``CUBLAS_WORKSPACE_CONFIG`` under which cuBLAS (CUDA >= 10.2) is
deterministic; :func:`deterministic_algorithms` sets the first where neither is set."""


@contextmanager
def deterministic_algorithms(enabled: bool = True) -> Iterator[None]:
    """Inside the block (when ``enabled``; else nothing changes):
    ``torch.use_deterministic_algorithms(True)`` (an op without a deterministic implementation
    raises a ``RuntimeError``), ``torch.backends.cudnn.benchmark = False`` and
    ``CUBLAS_WORKSPACE_CONFIG=:4096:8`` unless it already holds a deterministic value. On
    leaving, each of the three is restored, so the setting has no effect outside the block.

    The settings are process-wide while the block runs. torch reads ``CUBLAS_WORKSPACE_CONFIG``
    at the first cuBLAS call in the process: set it in the environment yourself if the process
    used cuBLAS before entering the block."""
    if not enabled:
        yield
        return
    previous = (torch.are_deterministic_algorithms_enabled(),
                torch.is_deterministic_algorithms_warn_only_enabled(),
                torch.backends.cudnn.benchmark, os.environ.get(CUBLAS_VARIABLE))
    if previous[3] not in DETERMINISTIC_CUBLAS:
        os.environ[CUBLAS_VARIABLE] = DETERMINISTIC_CUBLAS[0]
    torch.backends.cudnn.benchmark = False
    torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(previous[0], warn_only=previous[1])
        torch.backends.cudnn.benchmark = previous[2]
        if previous[3] is None:
            os.environ.pop(CUBLAS_VARIABLE, None)
        else:
            os.environ[CUBLAS_VARIABLE] = previous[3]


def head_names(module: nn.Module, head: str | Sequence[str]) -> tuple[str, ...]:
    """Names of the trainable head parameters: each entry of ``head`` is a parameter name or a
    prefix (``"head"`` matches ``head.weight`` and ``head.bias``); those with
    ``requires_grad=False`` stay fixed and are left out. The body must keep a parameter and the
    head a trainable one."""
    entries = (head,) if isinstance(head, str) else tuple(head)
    named = dict(module.named_parameters())
    names = tuple(n for n in named if any(n == e or n.startswith(e + ".") for e in entries))
    if not names:
        raise ArgumentError("head", f"{entries} names no parameter of the module (found: "
                            f"{', '.join(named)})")
    if len(names) == len(named):
        raise ArgumentError("head", "the head may not hold every parameter: the body must "
                            "keep one")
    trainable = tuple(n for n in names if named[n].requires_grad)
    if not trainable:
        raise ArgumentError("head", f"every head parameter ({', '.join(names)}) has "
                            "requires_grad=False: the inner loop would adapt nothing")
    return trainable


STATEFUL_FIX = ("buffers are state shared by every task and cannot be meta-learned "
                "functionally; use track_running_stats=False, or LayerNorm/GroupNorm")


def check_stateless(module: nn.Module) -> None:
    """An :class:`~metarep.errors.ArgumentError` (``module``) naming the first submodule (its
    qualified name and type) that keeps running statistics: ``track_running_stats=True`` in
    training mode (BatchNorm, InstanceNorm, SyncBatchNorm, or a module of the same
    convention), whose forward writes its buffers."""
    for name, sub in module.named_modules():
        if getattr(sub, "track_running_stats", False) is True and sub.training:
            raise ArgumentError("module", f"{name or 'the module itself'} "
                                f"({type(sub).__name__}) keeps running statistics, which are "
                                f"updated in forward; {STATEFUL_FIX}")


@dataclass(frozen=True)
class EngineState:
    """Training state: ``params`` (every parameter of the module, body and shared head, the
    fixed ones with ``requires_grad=False`` included) and, for ``mtl`` only, ``heads``: each
    trainable head parameter with a leading task axis (N, ...)."""

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


def _added(total: Params, part: Params) -> Params:
    """``total + part`` by name (``part`` itself when ``total`` is empty)."""
    return {name: total[name] + g for name, g in part.items()} if total else dict(part)


class MetaLearner:
    """Meta-train ``module`` with ``method`` (``anil``, ``maml`` or ``mtl``; see the module
    docstring for the updates), exact (``first_order=False``) or first-order.

    The learner copies the module's parameters (to ``device``/``dtype``) into ``self.state``;
    :meth:`step` updates that copy, :meth:`outer_step` is the same update as a pure function of
    a state. The module must map inputs (m, d) to outputs of m entries ((m,) or (m, 1)).
    ``n_tasks`` (the pool size N) is required for ``mtl``, which keeps one head per task.
    Parameters with ``requires_grad=False`` stay fixed; a module whose forward writes a buffer
    (BatchNorm with running statistics) is an :class:`~metarep.errors.ArgumentError`.

    ``task_chunk`` (an integer >= 1, or ``None``: all tasks at once) bounds memory: a step
    runs on chunks of at most that many tasks, summing their gradients, and test-time
    adaptation vmaps with that ``chunk_size``; results equal the unchunked ones up to
    rounding. ``deterministic`` runs every computation of the learner (:meth:`outer_step`,
    :meth:`adapt_heads`, :meth:`predict_adapted`, :meth:`feature_map`'s map) under
    :func:`deterministic_algorithms`, restoring the previous settings after each.

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
        task_chunk: int | None = None,
        deterministic: bool = False,
    ):
        if method not in METHODS:
            raise ArgumentError("method", f"must be one of {', '.join(METHODS)} (with "
                                f"first_order for fo-anil / fo-maml); got {method!r}")
        check_step_size("inner_lr", inner_lr)
        check_step_size("outer_lr", outer_lr)
        check_count("inner_steps", inner_steps)
        if task_chunk is not None:
            check_count("task_chunk", task_chunk)
        if not isinstance(deterministic, bool):
            raise ArgumentError("deterministic", f"must be True or False, got {deterministic!r}")
        check_stateless(module)
        self.module = module
        self.method, self.first_order = method, bool(first_order)
        self.inner_lr, self.outer_lr = float(inner_lr), float(outer_lr)
        self.inner_steps = inner_steps
        self.task_chunk, self.deterministic = task_chunk, deterministic
        self.device, self.dtype = resolve_device(device), resolve_dtype(dtype)
        self.head = head_names(module, head)
        self.frozen = tuple(n for n, p in module.named_parameters() if not p.requires_grad)
        self.buffers = {name: b.to(self.device, self.dtype if b.is_floating_point() else None)
                        for name, b in module.named_buffers()}
        self._buffers_checked = not self.buffers
        self.chain = chain_of(module) if self.head == HEAD and not self.buffers else None
        self.state = self.init_state(module, n_tasks)

    def init_state(self, module: nn.Module, n_tasks: int | None = None) -> EngineState:
        """The state at ``module``'s parameters (same names as the learner's module), copied
        to the learner's device and dtype; for ``mtl``, ``n_tasks`` copies of its trainable
        head."""
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

    def partition(self, params: Mapping[str, Tensor]) -> tuple[Params, Params, Params]:
        """``(frozen, body, head)`` parameter dicts: the fixed parameters
        (``requires_grad=False``), the trainable body and the trainable head."""
        frozen = {n: params[n] for n in self.frozen}
        body = {n: p for n, p in params.items() if n not in self.head and n not in frozen}
        return frozen, body, {n: params[n] for n in self.head}

    def task_loss(self, params: Mapping[str, Tensor], X: Tensor, y: Tensor) -> Tensor:
        """``L(theta; X, y) = ||f(X; theta) - y||^2 / (2 m)`` for one task (X (m, d), y (m,))."""
        prediction = functional_call(self.module, {**self.buffers, **params}, (X,))
        return 0.5 * torch.mean((prediction.reshape(y.shape) - y) ** 2)

    def _check_buffers(self, params: Mapping[str, Tensor], X: Tensor) -> None:
        """Once per learner: one forward pass on one task's inputs ``X`` (m, d) with copies of
        the buffers; a buffer written in place or reassigned is an ArgumentError naming its
        submodule."""
        if self._buffers_checked:
            return
        copies = {name: b.clone() for name, b in self.buffers.items()}
        versions = {name: b._version for name, b in copies.items()}
        passed = {**copies, **params}  # functional_call puts a reassigned buffer here
        with torch.no_grad():
            functional_call(self.module, passed, (X,))
        for name, copy in copies.items():
            if passed[name] is not copy or copy._version != versions[name]:
                owner = name.rpartition(".")[0]
                kind = type(self.module.get_submodule(owner)).__name__
                raise ArgumentError("module", f"{owner or 'the module itself'} ({kind}) writes "
                                    f"its buffer {name} in forward; {STATEFUL_FIX}")
        self._buffers_checked = True

    def _chunks(self, n: int) -> list[slice]:
        """The task chunks of a batch of ``n`` tasks: ``task_chunk`` tasks each (the last may
        hold fewer), one chunk without ``task_chunk``."""
        size = self.task_chunk or n
        return [slice(start, start + size) for start in range(0, n, size)]

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
        with deterministic_algorithms(self.deterministic):
            self._check_buffers(state.params, X_in[0])
            if self.method == "mtl":
                return self._mtl_step(state, torch.cat([X_in, X_out], 1),
                                      torch.cat([y_in, y_out], 1), tasks)
            return self._meta_step(state, X_in, y_in, X_out, y_out)

    def _meta_step(self, state: EngineState, X_in: Tensor, y_in: Tensor, X_out: Tensor,
                   y_out: Tensor) -> tuple[EngineState, float]:
        """ANIL / MAML: ``theta <- theta - beta / N sum_chunks grad sum_{i in chunk} L_i`` on
        the trainable parameters; the frozen ones are held."""
        frozen, body, head = self.partition(state.params)
        fixed, fast = (body, head) if self.method == "anil" else ({}, {**body, **head})
        if self.chain is None:
            gradient_of = self._first_order_gradient if self.first_order else self._exact_gradient
        else:
            gradient_of = (self._chain_first_order_gradient if self.first_order
                           else self._chain_exact_gradient)
        gradient: Params = {}
        loss = torch.zeros((), dtype=self.dtype, device=self.device)
        for part in self._chunks(X_in.shape[0]):
            chunk_gradient, chunk_loss = gradient_of(frozen, fixed, fast, X_in[part], y_in[part],
                                                     X_out[part], y_out[part])
            gradient = _added(gradient, chunk_gradient)
            loss = loss + chunk_loss
        n = X_in.shape[0]
        params = {**state.params, **{name: p - self.outer_lr * gradient[name] / n
                                     for name, p in {**fixed, **fast}.items()}}
        return EngineState(params, state.heads), float(loss) / n

    def _exact_gradient(self, frozen: Params, fixed: Params, fast: Params, X_in: Tensor,
                        y_in: Tensor, X_out: Tensor, y_out: Tensor) -> tuple[Params, Tensor]:
        """``grad S`` (by ``fixed`` and ``fast``) of ``S = sum_i L(frozen, fixed,
        fast_i^(s)(fixed, fast); out_i)`` over the tasks given, and ``S``."""

        def objective(fixed: Params, fast: Params) -> Tensor:
            held = {**frozen, **fixed}

            def task(X_in: Tensor, y_in: Tensor, X_out: Tensor, y_out: Tensor) -> Tensor:
                adapted = self._inner_loop(held, fast, X_in, y_in, self.inner_steps,
                                           self.inner_lr)
                return self.task_loss({**held, **adapted}, X_out, y_out)

            return vmap(task)(X_in, y_in, X_out, y_out).sum()

        (g_fixed, g_fast), loss = grad_and_value(objective, argnums=(0, 1))(fixed, fast)
        return {**g_fixed, **g_fast}, loss

    def _first_order_gradient(self, frozen: Params, fixed: Params, fast: Params, X_in: Tensor,
                              y_in: Tensor, X_out: Tensor, y_out: Tensor
                              ) -> tuple[Params, Tensor]:
        """``sum_i grad L(frozen, fixed, fast_i^(s); out_i)`` (by ``fixed`` and ``fast``) with
        the adapted ``fast_i^(s)`` held constant, and the summed outer loss."""
        adapt = vmap(self._inner_loop, in_dims=(None, None, 0, 0, None, None))
        adapted = adapt({**frozen, **fixed}, fast, X_in, y_in, self.inner_steps, self.inner_lr)

        def objective(fixed: Params, adapted: Params) -> Tensor:
            def task(adapted: Params, X: Tensor, y: Tensor) -> Tensor:
                return self.task_loss({**frozen, **fixed, **adapted}, X, y)

            return vmap(task)(adapted, X_out, y_out).sum()

        (g_fixed, g_adapted), loss = grad_and_value(objective, argnums=(0, 1))(fixed, adapted)
        return {**g_fixed, **{n: g.sum(0) for n, g in g_adapted.items()}}, loss

    def _chain_inner_loop(self, fixed: Params, fast: Params, X: Tensor, y: Tensor, steps: int,
                          lr: float) -> tuple[Params, Tensor | None]:
        """:meth:`_inner_loop` on every task of ``X`` (n, m, d), ``y`` (n, m) at once by
        :func:`~metarep.engine.networks.chain_gradient`, ``steps`` steps of size ``lr``: the
        adapted ``fast`` parameters with a task axis (n, ...), but for the first layer ``W_1``
        when it adapts, which stays shared, the adapted one being ``W_1 - X_i^T C_i``; returns
        the parameters and ``C`` (n, m, h_1) (``None`` when the first layer is not adapted)."""
        first = self.chain.layers[0]
        adapts_first = first in fast
        coefficient = None
        for _ in range(steps):
            _, gradient = chain_gradient(self.chain, {**fixed, **fast}, X, y, tuple(fast),
                                         offset=first_layer_offset(X, X, coefficient),
                                         coefficient=adapts_first)
            if adapts_first:
                step = lr * gradient[first]
                coefficient = step if coefficient is None else coefficient + step
            fast = {n: fast[n] if n == first else fast[n] - lr * gradient[n] for n in fast}
        return fast, coefficient

    def _chain_exact_gradient(self, frozen: Params, fixed: Params, fast: Params, X_in: Tensor,
                              y_in: Tensor, X_out: Tensor, y_out: Tensor
                              ) -> tuple[Params, Tensor]:
        """:meth:`_exact_gradient` on the fast path: ``S = sum_i L(fixed, fast_i^(s); out_i)``
        from the batched inner loop, and ``grad S`` by autograd through it."""
        leaves = {n: p.detach().requires_grad_() for n, p in {**fixed, **fast}.items()}
        with torch.enable_grad():
            held = {**frozen, **{n: leaves[n] for n in fixed}}
            adapted, coefficient = self._chain_inner_loop(held, {n: leaves[n] for n in fast},
                                                          X_in, y_in, self.inner_steps,
                                                          self.inner_lr)
            losses, _ = chain_gradient(self.chain, {**held, **adapted}, X_out, y_out, (),
                                       offset=first_layer_offset(X_out, X_in, coefficient))
            loss = losses.sum()
            gradient = torch.autograd.grad(loss, tuple(leaves.values()))
        return dict(zip(leaves, gradient, strict=True)), loss.detach()

    def _chain_first_order_gradient(self, frozen: Params, fixed: Params, fast: Params,
                                    X_in: Tensor, y_in: Tensor, X_out: Tensor, y_out: Tensor
                                    ) -> tuple[Params, Tensor]:
        """:meth:`_first_order_gradient` on the fast path: ``sum_i grad L(fixed, fast_i^(s);
        out_i)`` at the adapted parameters of the batched inner loop, summed over the tasks
        by :func:`~metarep.engine.networks.chain_gradient` itself."""
        with torch.no_grad():
            held = {**frozen, **fixed}
            adapted, coefficient = self._chain_inner_loop(held, fast, X_in, y_in,
                                                          self.inner_steps, self.inner_lr)
            names = (*fixed, *fast)
            losses, gradient = chain_gradient(
                self.chain, {**held, **adapted}, X_out, y_out, names, summed=names,
                offset=first_layer_offset(X_out, X_in, coefficient))
        return gradient, losses.sum()

    def _mtl_step(self, state: EngineState, X: Tensor, y: Tensor,
                  tasks: ArrayLike | None) -> tuple[EngineState, float]:
        """Burer-Monteiro step on all rows ``X`` (n, m, d), ``y`` (n, m) of the sampled tasks,
        chunk by chunk: the body's gradient summed over the chunks, each head's its own (on the
        fast path, both from one :func:`~metarep.engine.networks.chain_gradient`)."""
        assert state.heads is not None
        n_total = next(iter(state.heads.values())).shape[0]
        index = torch.arange(X.shape[0]) if tasks is None else torch.as_tensor(tasks).long()
        if index.shape != (X.shape[0],) or int(index.min()) < 0 or int(index.max()) >= n_total:
            raise ArgumentError("tasks", f"need one index in [0, {n_total}) per task of the "
                                "batch")
        index = index.to(self.device)
        frozen, body, _ = self.partition(state.params)
        heads = {n: h[index] for n, h in state.heads.items()}

        def objective(body: Params, heads: Params, X: Tensor, y: Tensor) -> Tensor:
            def task(head: Params, X: Tensor, y: Tensor) -> Tensor:
                return self.task_loss({**frozen, **body, **head}, X, y)

            return vmap(task)(heads, X, y).sum()

        # grad_{w_i} sum_j L_j = grad_w L_i (each head's own loss); the body takes the mean
        g_body: Params = {}
        g_heads: list[Params] = []
        loss = torch.zeros((), dtype=self.dtype, device=self.device)
        for part in self._chunks(X.shape[0]):
            part_heads = {name: h[part] for name, h in heads.items()}
            if self.chain is None:
                (chunk_body, chunk_heads), chunk_loss = grad_and_value(
                    objective, argnums=(0, 1))(body, part_heads, X[part], y[part])
            else:
                with torch.no_grad():
                    losses, chunk_gradient = chain_gradient(
                        self.chain, {**frozen, **body, **part_heads}, X[part], y[part],
                        (*body, *part_heads), summed=tuple(body))
                chunk_body = {name: chunk_gradient[name] for name in body}
                chunk_heads = {name: chunk_gradient[name] for name in part_heads}
                chunk_loss = losses.sum()
            g_body = _added(g_body, chunk_body)
            g_heads.append(chunk_heads)
            loss = loss + chunk_loss
        n = X.shape[0]
        params = {**state.params, **{k: v - self.outer_lr * g_body[k] / n for k, v in body.items()}}
        new_heads = {name: h.index_put((index,), heads[name] - self.outer_lr
                                       * torch.cat([g[name] for g in g_heads]))
                     for name, h in state.heads.items()}
        return EngineState(params, new_heads), float(loss) / n

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
        ``w = 0`` when ``from_zero``), ``task_chunk`` tasks at a time. Returns the adapted
        trainable heads with a task axis (n, ...); the fixed parameters are held. The built-in
        networks take the tasks of a chunk at once (:meth:`_chain_inner_loop`, the training's
        fast path), any other module one by one under ``vmap``."""
        X, y = self.tensor(X), self.tensor(y)
        frozen, body, head = self.partition(params)
        if from_zero:
            head = {name: torch.zeros_like(t) for name, t in head.items()}
        fixed = {**frozen, **body}
        with deterministic_algorithms(self.deterministic), torch.no_grad():
            self._check_buffers(params, X[0])
            if self.chain is None:
                adapt = vmap(self._inner_loop, in_dims=(None, None, 0, 0, None, None),
                             chunk_size=self.task_chunk)
                return adapt(fixed, head, X, y, steps, lr)
            if steps == 0:  # the head itself, for each task
                return {name: t.expand(X.shape[0], *t.shape).clone() for name, t in head.items()}
            parts = [self._chain_inner_loop(fixed, head, X[part], y[part], steps, lr)[0]
                     for part in self._chunks(X.shape[0])]
            return {name: torch.cat([part[name] for part in parts]) for name in head}

    def predict_adapted(self, params: Mapping[str, Tensor], heads: Mapping[str, Tensor],
                        X: ArrayLike) -> Tensor:
        """``f(X_i; theta_B, w_i)`` (n, m) for per-task heads (n, ...) and inputs ``X``
        (n, m, d), ``task_chunk`` tasks at a time; ``params`` give every other parameter."""
        X = self.tensor(X)

        def task(head: Params, X: Tensor) -> Tensor:
            return functional_call(self.module, {**self.buffers, **params, **head}, (X,))

        with deterministic_algorithms(self.deterministic), torch.no_grad():
            self._check_buffers(params, X[0])
            return vmap(task, chunk_size=self.task_chunk)(dict(heads), X).reshape(X.shape[:-1])

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
            with deterministic_algorithms(self.deterministic), torch.no_grad():
                return _numpy(features(self.tensor(X), params))

        return phi
