"""The spec's equations as plain per-task loops: the one reference every fast kernel is
tested against.

Everything here is written as specification §3 (and ``docs/infinite_tasks.md`` for the
infinite-task step) states it: one task at a time, explicit matrices, no batching over tasks,
no reverse mode. It is slow on purpose and is meant for small problems in tests. It calls none
of the kernels it is a reference for (:mod:`metarep.core.methods`,
:mod:`metarep.core.infinite`) and imports neither.

Symbols (specification §1-§3): ``d`` the ambient dimension, ``k'`` the width, ``B`` (d, k') the
body, ``w`` (k',) the head, ``alpha`` the inner and ``beta`` the outer step size, ``s`` the
number of inner steps. One task is ``X`` (m, d), ``y`` (m,), and its loss is
``L(B, w; X, y) = ||X B w - y||^2 / (2 m)``. A :class:`~metarep.core.tasks.TaskBatch` holds
``N`` tasks ``(X_i^in, y_i^in, X_i^out, y_i^out)``.

- :func:`task_loss`, :func:`input_gradient`, :func:`head_gradient`, :func:`body_gradient`:
  the loss of one task and its gradients;
- :func:`adapt_head` (FO-ANIL / ANIL) and :func:`adapt` (with the body: FO-MAML / MAML): the
  inner loop of one task; :func:`adapt_tangent`: its derivative along one direction;
- :func:`fo_anil_step`: the paper's method;
- :func:`outer_gradient`, :func:`inner_loop_step`: ``fo-anil``, ``anil``, ``fo-maml``,
  ``maml``, the second-order ones by the chain rule in forward mode;
- :func:`outer_objective`, :func:`mtl_objective`: the functions whose gradients the methods
  take, for finite differences;
- :func:`mtl_step`: multi-task learning (Burer-Monteiro);
- :func:`expected_fo_anil_step`, :func:`expected_fo_anil_trajectory`: the exact expected
  FO-ANIL step on infinitely many tasks, in R^d;
- :func:`ridge_risks`: the test-time risk of ridge regression in d dimensions.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import TYPE_CHECKING

import numpy as np

from metarep.core.model import LinearParams
from metarep.core.problem import Problem
from metarep.core.tasks import TaskBatch
from metarep.errors import ArgumentError

if TYPE_CHECKING:  # the type only: nothing of metarep.core.methods runs here
    from metarep.core.methods.mtl import MTLState

INNER_LOOP_NAMES = ("fo-anil", "anil", "fo-maml", "maml")
"""The methods of :func:`inner_loop_step` and :func:`outer_objective`."""

Objective = Callable[[np.ndarray], float]


# ----------------------------------------------------------------------------- one task


def task_loss(B: np.ndarray, w: np.ndarray, X: np.ndarray, y: np.ndarray) -> float:
    """``L(B, w; X, y) = ||X B w - y||^2 / (2 m)`` for one task: ``B`` (d, k'), ``w`` (k',),
    ``X`` (m, d), ``y`` (m,)."""
    r = X @ B @ w - y
    return float(r @ r) / (2 * len(y))


def input_gradient(B: np.ndarray, w: np.ndarray, X: np.ndarray, y: np.ndarray) -> np.ndarray:
    """``v = X^T (X B w - y) / m``, shape (d,): the gradient of ``L`` with respect to ``B w``."""
    return X.T @ (X @ B @ w - y) / len(y)


def head_gradient(B: np.ndarray, w: np.ndarray, X: np.ndarray, y: np.ndarray) -> np.ndarray:
    """``grad_w L(B, w; X, y) = B^T X^T (X B w - y) / m``, shape (k',)."""
    return B.T @ input_gradient(B, w, X, y)


def body_gradient(B: np.ndarray, w: np.ndarray, X: np.ndarray, y: np.ndarray) -> np.ndarray:
    """``grad_B L(B, w; X, y) = X^T (X B w - y) w^T / m``, shape (d, k')."""
    return np.outer(input_gradient(B, w, X, y), w)


def adapt_head(B: np.ndarray, w: np.ndarray, X: np.ndarray, y: np.ndarray, alpha: float,
               steps: int) -> np.ndarray:
    """The inner loop of FO-ANIL and ANIL on one task: from ``w_0 = w``, ``steps`` times
    ``w_{j+1} = w_j - alpha grad_w L(B, w_j; X, y)``. **Returns:** ``w_s`` (k',)."""
    for _ in range(steps):
        w = w - alpha * head_gradient(B, w, X, y)
    return w


def adapt(B: np.ndarray, w: np.ndarray, X: np.ndarray, y: np.ndarray, alpha: float,
          steps: int, adapt_body: bool) -> tuple[np.ndarray, np.ndarray]:
    """The inner loop of one task, on the head (``adapt_body=False``: ANIL) or on body and
    head simultaneously (``adapt_body=True``: MAML): from ``(B_0, w_0) = (B, w)``, ``steps``
    times, with ``u_j = X^T (X B_j w_j - y) / m``,
    ``w_{j+1} = w_j - alpha B_j^T u_j`` and ``B_{j+1} = B_j - alpha u_j w_j^T`` (else
    ``B_{j+1} = B``). **Returns:** ``(B_s (d, k'), w_s (k',))``."""
    for _ in range(steps):
        u = input_gradient(B, w, X, y)
        B, w = (B - alpha * np.outer(u, w) if adapt_body else B), w - alpha * B.T @ u
    return B, w


def adapt_tangent(
    B: np.ndarray, w: np.ndarray, dB: np.ndarray, dw: np.ndarray, X: np.ndarray, y: np.ndarray,
    alpha: float, steps: int, adapt_body: bool,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """:func:`adapt` and its derivative along the direction ``(dB, dw)`` of ``(B, w)``
    (forward mode, the chain rule through each inner step).

    With ``S = X^T X / m``: ``du_j = S (dB_j w_j + B_j dw_j)``,
    ``dw_{j+1} = dw_j - alpha (dB_j^T u_j + B_j^T du_j)`` and, when ``adapt_body``,
    ``dB_{j+1} = dB_j - alpha (du_j w_j^T + u_j dw_j^T)`` (else ``dB_{j+1} = dB``).
    **Returns:** ``(B_s, w_s, dB_s, dw_s)``.
    """
    S = X.T @ X / len(y)
    for _ in range(steps):
        u = input_gradient(B, w, X, y)
        du = S @ (dB @ w + B @ dw)
        new_w, new_dw = w - alpha * B.T @ u, dw - alpha * (dB.T @ u + B.T @ du)
        if adapt_body:
            B, dB = B - alpha * np.outer(u, w), dB - alpha * (np.outer(du, w) + np.outer(u, dw))
        w, dw = new_w, new_dw
    return B, w, dB, dw


# ----------------------------------------------------------------------------- FO-ANIL


def fo_anil_step(params: LinearParams, batch: TaskBatch, alpha: float, beta: float,
                 steps: int) -> tuple[LinearParams, float]:
    """One FO-ANIL outer step (specification §3), one task at a time.

    For each task ``i``: ``w_i = adapt_head(B, w, X_i^in, y_i^in, alpha, steps)``; then, with
    ``w_i`` held constant,
    ``B <- B - beta mean_i grad_B L(B, w_i; X_i^out, y_i^out)`` and
    ``w <- w - beta mean_i grad_w L(B, w_i; X_i^out, y_i^out)``.
    **Returns:** the new ``(B, w)`` and the meta-training loss
    ``mean_i L(B, w_i; X_i^out, y_i^out)`` at the old ``(B, w)``.
    """
    B, w = params
    grad_B, grad_w, total = np.zeros_like(B), np.zeros_like(w), 0.0
    n = batch.n_tasks
    for i in range(n):
        w_i = adapt_head(B, w, batch.X_in[i], batch.y_in[i], alpha, steps)
        X_out, y_out = batch.X_out[i], batch.y_out[i]
        grad_B += body_gradient(B, w_i, X_out, y_out)
        grad_w += head_gradient(B, w_i, X_out, y_out)
        total += task_loss(B, w_i, X_out, y_out)
    return LinearParams(B - beta * grad_B / n, w - beta * grad_w / n), total / n


# ----------------------------------------------------------------------------- inner loops


def _method(name: str) -> tuple[bool, bool]:
    """``(adapt_body, second_order)`` of an inner-loop method."""
    if name not in INNER_LOOP_NAMES:
        raise ArgumentError("name", f"must be one of {', '.join(INNER_LOOP_NAMES)}; "
                            f"got {name!r}")
    return name.endswith("maml"), not name.startswith("fo-")


def outer_gradient(name: str, params: LinearParams, batch: TaskBatch, alpha: float,
                   steps: int) -> tuple[np.ndarray, np.ndarray, float]:
    """The outer gradient of ``fo-anil``, ``anil``, ``fo-maml`` or ``maml``, task by task.

    For each task ``i``: ``(B_i, w_i) = adapt(B, w, X_i^in, y_i^in, alpha, steps, adapt_body)``
    (``adapt_body`` for the MAMLs), ``v_i = X_i^out^T (X_i^out B_i w_i - y_i^out) / m_out``
    and ``g_i = (v_i w_i^T, B_i^T v_i)``, the gradient of ``L(.; X_i^out, y_i^out)`` at the
    adapted parameters. First order: ``G = mean_i g_i``. Second order (``anil``, ``maml``):
    ``G = mean_i J_i^T g_i`` with ``J_i`` the Jacobian of ``(B_i, w_i)`` with respect to
    ``(B, w)``, one column per direction of ``theta = (vec B, w)`` (:func:`adapt_tangent`).
    **Returns:** ``(G_B (d, k'), G_w (k',), mean_i L(B_i, w_i; X_i^out, y_i^out))``.
    """
    adapt_body, second_order = _method(name)
    B, w = params
    d, width = B.shape
    size = d * width + width
    grad, total = np.zeros(size), 0.0
    n = batch.n_tasks
    for i in range(n):
        X_in, y_in, X_out, y_out = batch.X_in[i], batch.y_in[i], batch.X_out[i], batch.y_out[i]
        B_i, w_i = adapt(B, w, X_in, y_in, alpha, steps, adapt_body)
        g_B, g_w = body_gradient(B_i, w_i, X_out, y_out), head_gradient(B_i, w_i, X_out, y_out)
        total += task_loss(B_i, w_i, X_out, y_out)
        if not second_order:
            grad += np.concatenate([g_B.ravel(), g_w])
            continue
        for p in range(size):
            direction = np.zeros(size)
            direction[p] = 1.0
            dB, dw = direction[: d * width].reshape(d, width), direction[d * width:]
            *_, dB_i, dw_i = adapt_tangent(B, w, dB, dw, X_in, y_in, alpha, steps, adapt_body)
            grad[p] += np.sum(g_B * dB_i) + g_w @ dw_i
    grad /= n
    return grad[: d * width].reshape(d, width), grad[d * width:], total / n


def inner_loop_step(name: str, params: LinearParams, batch: TaskBatch, alpha: float,
                    beta: float, steps: int) -> tuple[LinearParams, float]:
    """One outer step of ``name`` (``fo-anil``, ``anil``, ``fo-maml`` or ``maml``):
    ``(B, w) <- (B, w) - beta G`` with ``G`` from :func:`outer_gradient`. **Returns:** the new
    ``(B, w)`` and the meta-training loss at the old one."""
    grad_B, grad_w, meta_loss = outer_gradient(name, params, batch, alpha, steps)
    B, w = params
    return LinearParams(B - beta * grad_B, w - beta * grad_w), meta_loss


def outer_objective(name: str, params: LinearParams, batch: TaskBatch, alpha: float,
                    steps: int) -> tuple[Objective, np.ndarray]:
    """The function of ``theta = (vec B, w)`` whose gradient at the returned ``theta`` is the
    outer gradient of ``name`` at ``params`` (for finite differences).

    ``anil``, ``maml``: ``F(theta) = mean_i L(adapt(B', w'; X_i^in, y_i^in); X_i^out, y_i^out)``
    (through the inner loop). ``fo-anil``, ``fo-maml``: the inner loop's change is held at its
    value at ``params``, ``F(theta) = mean_i L(B_i + (B' - B), w_i + (w' - w); out)``.
    **Returns:** ``(F, theta)``, ``theta`` the flat ``params``.
    """
    adapt_body, second_order = _method(name)
    B, w = params
    d, width = B.shape
    tasks = range(batch.n_tasks)
    adapted = [adapt(B, w, batch.X_in[i], batch.y_in[i], alpha, steps, adapt_body)
               for i in tasks]

    def objective(theta: np.ndarray) -> float:
        B2, w2 = theta[: d * width].reshape(d, width), theta[d * width:]
        total = 0.0
        for i in tasks:
            if second_order:
                B_i, w_i = adapt(B2, w2, batch.X_in[i], batch.y_in[i], alpha, steps, adapt_body)
            else:
                B_i, w_i = adapted[i][0] + (B2 - B), adapted[i][1] + (w2 - w)
            total += task_loss(B_i, w_i, batch.X_out[i], batch.y_out[i])
        return total / batch.n_tasks

    return objective, np.concatenate([B.ravel(), w])


# ----------------------------------------------------------------------------- MTL


def _rows(batch: TaskBatch, heads: np.ndarray) -> np.ndarray:
    """The pool positions of the tasks of ``batch`` among ``heads``."""
    if batch.indices is not None:
        return np.asarray(batch.indices)
    if batch.n_tasks != heads.shape[0]:
        raise ArgumentError("batch", f"{batch.n_tasks} tasks without indices cannot update "
                            f"{heads.shape[0]} heads")
    return np.arange(batch.n_tasks)


def mtl_step(state: MTLState, batch: TaskBatch, beta: float) -> tuple[MTLState, float]:
    """One step of multi-task learning (Burer-Monteiro, specification §3), task by task.

    The tasks of ``batch`` are those at ``batch.indices`` of the pool (or the whole pool, one
    per head). Each uses all its ``m = m_in + m_out`` rows ``(X_i, y_i)``; simultaneously,
    ``B <- B - beta mean_i grad_B L(B, w_i; X_i, y_i)`` and, for each task of the batch,
    ``w_i <- w_i - beta grad_w L(B, w_i; X_i, y_i)``; the other heads and ``w`` are kept.
    **Returns:** the new state and ``mean_i L(B, w_i; X_i, y_i)`` at the old one.
    """
    B, _, heads = state
    X, y = batch.full()
    rows = _rows(batch, heads)
    grad_B, new_heads, total = np.zeros_like(B), heads.copy(), 0.0
    for i, row in enumerate(rows):
        grad_B += body_gradient(B, heads[row], X[i], y[i])
        new_heads[row] = heads[row] - beta * head_gradient(B, heads[row], X[i], y[i])
        total += task_loss(B, heads[row], X[i], y[i])
    n = batch.n_tasks
    return state._replace(B=B - beta * grad_B / n, heads=new_heads), total / n


def mtl_objective(state: MTLState, batch: TaskBatch) -> tuple[Objective, np.ndarray]:
    """``F(theta) = mean_i L(B, w_i; X_i, y_i)`` over all rows of every task of ``batch``, as a
    function of ``theta = (vec B, vec [w_i for the tasks of batch])`` (for finite differences).
    MTL steps ``B`` along ``-grad_B F`` and each head along ``-grad_{w_i} L_i = -N grad_{w_i} F``.
    **Returns:** ``(F, theta)`` at ``state``."""
    B, _, heads = state
    X, y = batch.full()
    rows = _rows(batch, heads)
    d, width = B.shape
    n = batch.n_tasks

    def objective(theta: np.ndarray) -> float:
        B2, H = theta[: d * width].reshape(d, width), theta[d * width:].reshape(n, width)
        return sum(task_loss(B2, H[i], X[i], y[i]) for i in range(n)) / n

    return objective, np.concatenate([B.ravel(), heads[rows].ravel()])


# ----------------------------------------------------------------------------- infinite tasks


def expected_fo_anil_step(params: LinearParams, problem: Problem, alpha: float, beta: float,
                          m_in: float) -> tuple[LinearParams, float]:
    """The exact expected FO-ANIL step on infinitely many tasks (one inner step with ``m_in``
    samples, ``inf`` allowed), written in R^d with ``Q`` expanded (``docs/infinite_tasks.md``).

    With ``N = B^T B`` (k', k'), ``C = B_star^T B`` (k, k'), ``m = m_in``:
    ``Q = E[w_i w_i^T] = w w^T - alpha (w w^T N + N w w^T)
    + alpha^2 [(1 + 1/m) (N w w^T N + C^T Sigma_star C) + ((w^T N w + tr Sigma_star + sigma^2)
    / m) N]``, and
    ``B <- B - beta (B Q - alpha B_star Sigma_star C)``, ``w <- w - beta N (w - alpha N w)``.
    **Returns:** the new ``(B, w)`` and the expected meta-training loss at the old one,
    ``(tr(N Q) - 2 alpha tr(Sigma_star C C^T) + tr Sigma_star + sigma^2) / 2``.
    """
    B, w = params
    inv_m = 0.0 if math.isinf(m_in) else 1.0 / m_in
    Sigma, B_star, noise_var = problem.Sigma_star, problem.B_star, problem.noise_var
    N, C, ww = B.T @ B, B_star.T @ B, np.outer(w, w)
    trace = np.trace(Sigma)
    Q = (ww - alpha * (ww @ N + N @ ww)
         + alpha**2 * ((1 + inv_m) * (N @ ww @ N + C.T @ Sigma @ C)
                       + inv_m * (w @ N @ w + trace + noise_var) * N))
    loss = 0.5 * (np.trace(N @ Q) - 2 * alpha * np.trace(Sigma @ C @ C.T) + trace + noise_var)
    new = LinearParams(B - beta * (B @ Q - alpha * B_star @ Sigma @ C),
                       w - beta * N @ (w - alpha * N @ w))
    return new, float(loss)


def expected_fo_anil_trajectory(
    params: LinearParams, problem: Problem, alpha: float, beta: float, m_in: float, steps: int
) -> tuple[list[LinearParams], list[float]]:
    """``steps`` iterations of :func:`expected_fo_anil_step` from ``params``. **Returns:** the
    ``steps + 1`` states ``(B_t, w_t)``, ``t = 0 .. steps``, and the ``steps`` losses (the loss
    of step ``t`` at ``(B_t, w_t)``)."""
    path, losses = [params], []
    for _ in range(steps):
        new, loss = expected_fo_anil_step(path[-1], problem, alpha, beta, m_in)
        path.append(new)
        losses.append(loss)
    return path, losses


# ----------------------------------------------------------------------------- test time


def ridge_risks(problem: Problem, m: int, penalty: float, n_tasks: int,
                rng: np.random.Generator) -> np.ndarray:
    """Excess risks ``||beta_hat - beta||^2`` (n_tasks,) of ridge regression in d dimensions,
    one task at a time: ``w_star ~ N(0, Sigma_star)``, ``beta = B_star w_star``, ``X`` (m, d)
    with i.i.d. ``N(0, 1)`` entries, ``y = X beta + eps``, ``eps ~ N(0, sigma^2 I_m)``, and
    ``beta_hat = X^T (X X^T + penalty I_m)^+ y`` (the minimum-norm solution of
    ``argmin ||X b - y||^2 + penalty ||b||^2``; least squares for ``m > d``, ``penalty = 0``)."""
    L = np.linalg.cholesky(problem.Sigma_star)
    risks = np.empty(n_tasks)
    for i in range(n_tasks):
        beta = problem.B_star @ (L @ rng.standard_normal(problem.k))
        X = rng.standard_normal((m, problem.d))
        y = X @ beta + math.sqrt(problem.noise_var) * rng.standard_normal(m)
        beta_hat = X.T @ (np.linalg.pinv(X @ X.T + penalty * np.eye(m)) @ y)
        risks[i] = float(np.sum((beta_hat - beta) ** 2))
    return risks
