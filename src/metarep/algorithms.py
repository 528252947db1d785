"""Meta-learning algorithms on the linear model, vectorised over tasks (spec section 3).

Each algorithm is a small frozen object with a pure ``step(params, batch) -> (params, loss)``;
the training loop, recording and I/O live in :mod:`metarep.training`. Shapes: ``N`` tasks,
``m`` rows per task, ambient dimension ``d``, width ``k'``. The squared loss on one task is
``L(B, w; X, y) = ||X B w - y||^2 / (2 m)``.

No per-task Python loop: every per-task quantity is a batched contraction over the task axis,
and the data ``X`` is read a small constant number of times per step.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import numpy as np

from metarep.models import LinearParams
from metarep.tasks import TaskBatch


def loss(B: np.ndarray, w: np.ndarray, X: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Per-task loss ``||X_i B w_i - y_i||^2 / (2 m)``.

    **Arguments:** ``B`` (d, k'); ``w`` (k',) shared or (N, k') per task; ``X`` (N, m, d);
    ``y`` (N, m). **Returns:** (N,).
    """
    residual = _residual(B, w, X, y)
    return 0.5 * np.mean(residual**2, axis=1)


def _residual(B: np.ndarray, w: np.ndarray, X: np.ndarray, y: np.ndarray) -> np.ndarray:
    """``r_i = X_i B w_i - y_i``, shape (N, m); ``w`` shared (k',) or per task (N, k')."""
    if w.ndim == 1:
        return X @ (B @ w) - y
    return np.einsum("nmd,nd->nm", X, w @ B.T) - y


def _input_gradient(X: np.ndarray, residual: np.ndarray) -> np.ndarray:
    """``v_i = X_i^T r_i / m``, shape (N, d): the loss gradient with respect to ``B w_i``."""
    return np.einsum("nmd,nm->nd", X, residual) / X.shape[1]


def head_gradient(B: np.ndarray, w: np.ndarray, X: np.ndarray, y: np.ndarray) -> np.ndarray:
    """``grad_w L(B, w_i; X_i, y_i) = B^T X_i^T (X_i B w_i - y_i) / m``, shape (N, k')."""
    return _input_gradient(X, _residual(B, w, X, y)) @ B


def body_gradient(B: np.ndarray, w: np.ndarray, X: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Task-mean ``mean_i grad_B L(B, w_i; X_i, y_i) = mean_i X_i^T r_i w_i^T / m``, (d, k')."""
    heads = np.broadcast_to(w, (X.shape[0], B.shape[1]))
    return _input_gradient(X, _residual(B, w, X, y)).T @ heads / X.shape[0]


def adapt_head(
    B: np.ndarray, w: np.ndarray, X: np.ndarray, y: np.ndarray, alpha: float, steps: int
) -> np.ndarray:
    """The inner loop on the head: ``steps`` times ``w_i <- w_i - alpha grad_w L(B, w_i)``.

    **Arguments:** ``B`` (d, k'); ``w`` (k',) the shared starting head; ``X`` (N, m, d);
    ``y`` (N, m). **Returns:** the adapted heads ``w_i``, shape (N, k').
    """
    heads = np.broadcast_to(w, (X.shape[0], w.shape[-1]))
    current = w
    for _ in range(steps):
        heads = heads - alpha * head_gradient(B, current, X, y)
        current = heads
    return heads


class Method(Protocol):
    """An outer step of a meta-learning algorithm on the linear model."""

    name: str

    def step(self, params: LinearParams, batch: TaskBatch) -> tuple[LinearParams, float]:
        """One outer step on ``batch``; returns the new parameters and the meta-training loss
        (the outer loss after adaptation, averaged over the tasks, at the old parameters)."""
        ...


@dataclass(frozen=True)
class FOANIL:
    """First-order ANIL (the paper's method).

    Inner loop on the head only, from the shared head ``w``:
    ``w_i = w - alpha grad_w L(B, w; X_i^in, y_i^in)`` (repeated ``inner_steps`` times).
    Outer step with ``w_i`` held constant (no differentiation through the inner loop):

    ``B <- B - beta mean_i grad_B L(B, w_i; X_i^out, y_i^out)
          = B - beta mean_i X_i^out^T (X_i^out B w_i - y_i^out) w_i^T / m_out``,
    ``w <- w - beta mean_i grad_w L(B, w_i; X_i^out, y_i^out)
          = w - beta B^T mean_i X_i^out^T (X_i^out B w_i - y_i^out) / m_out``.
    """

    inner_lr: float
    outer_lr: float
    inner_steps: int = 1
    name: str = "fo-anil"

    def step(self, params: LinearParams, batch: TaskBatch) -> tuple[LinearParams, float]:
        B, w = params
        heads = adapt_head(B, w, batch.X_in, batch.y_in, self.inner_lr, self.inner_steps)
        residual = _residual(B, heads, batch.X_out, batch.y_out)
        outer_input_grad = _input_gradient(batch.X_out, residual)  # (N, d)
        n = batch.n_tasks
        grad_B = outer_input_grad.T @ heads / n
        grad_w = B.T @ outer_input_grad.mean(axis=0)
        meta_loss = 0.5 * float(np.mean(residual**2))
        return LinearParams(B - self.outer_lr * grad_B, w - self.outer_lr * grad_w), meta_loss


def make_method(name: str, inner_lr: float, outer_lr: float, inner_steps: int) -> Method:
    """The algorithm called ``name`` (see ``METHOD_NAMES`` in :mod:`metarep.config`)."""
    if name == "fo-anil":
        return FOANIL(inner_lr, outer_lr, inner_steps)
    raise ValueError(f"unknown method {name!r}")
