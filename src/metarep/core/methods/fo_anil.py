"""First-order ANIL on the linear model, the paper's method (specification §3), at the memory
bound: on numpy arrays the tasks are taken in cache-sized chunks on the threads of
:mod:`metarep.core.methods.threads`; on torch tensors (any device) all at once, with the same
formula (:func:`_fo_anil_sums`).

Tested against the plain per-task loop :func:`metarep.core.reference.fo_anil_step`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from metarep.core.arrays import Array, array_namespace
from metarep.core.methods.gradients import residual, transposed_apply
from metarep.core.methods.inner_loop import InnerLoopMethod
from metarep.core.methods.threads import map_chunks
from metarep.core.model import LinearParams
from metarep.core.tasks import TaskBatch


@dataclass(frozen=True)
class FOANIL(InnerLoopMethod):
    """First-order ANIL (the paper's method).

    Inner loop on the head only, from the shared head ``w``:
    ``w_i = w - alpha grad_w L(B, w; X_i^in, y_i^in)`` (repeated ``inner_steps`` times).
    Outer step with ``w_i`` held constant (no differentiation through the inner loop):

    ``B <- B - beta mean_i grad_B L(B, w_i; X_i^out, y_i^out)
          = B - beta mean_i X_i^out^T (X_i^out B w_i - y_i^out) w_i^T / m_out``,
    ``w <- w - beta mean_i grad_w L(B, w_i; X_i^out, y_i^out)
          = w - beta B^T mean_i X_i^out^T (X_i^out B w_i - y_i^out) / m_out``.

    Tested against :func:`metarep.core.reference.fo_anil_step`.
    """

    name: ClassVar[str] = "fo-anil"

    def step(self, params: LinearParams, batch: TaskBatch) -> tuple[LinearParams, float]:
        """One outer step on ``batch``; returns the new ``(B, w)`` and the meta-training loss.

        On numpy arrays the tasks are taken in cache-sized chunks (:func:`_fo_anil_sums`), in
        parallel (:func:`~metarep.core.methods.threads.map_chunks`); the chunks' sums are
        added in order, so the result does not depend on the number of threads. Torch tensors
        are one chunk (torch parallelises each operation itself).
        """
        B, w = params

        def chunk_sums(tasks: slice) -> tuple[Array, Array, float]:
            return _fo_anil_sums(B, w, batch.X_in[tasks], batch.y_in[tasks], batch.X_out[tasks],
                                 batch.y_out[tasks], self.inner_lr, self.inner_steps)

        if array_namespace(batch.X_in) is np:
            sums = map_chunks(chunk_sums, _task_chunks(batch))
        else:
            sums = [chunk_sums(slice(0, batch.n_tasks))]
        n = batch.n_tasks
        grad_B = sum(chunk[0] for chunk in sums) / n
        grad_w = B.T @ (sum(chunk[1] for chunk in sums) / n)
        meta_loss = 0.5 * sum(chunk[2] for chunk in sums) / (n * batch.m_out)
        return LinearParams(B - self.outer_lr * grad_B, w - self.outer_lr * grad_w), meta_loss


TASK_CHUNK_BYTES = 1 << 22
""":meth:`FOANIL.step` takes the tasks in chunks of about this many bytes of ``X_in`` and
``X_out``: small enough that a chunk read from memory by a product ``X_i v_i`` is still in
cache for the transposed product ``X_i^T r_i`` that follows, large enough that the Python
overhead per chunk stays small next to the arithmetic."""


def _task_chunks(batch: TaskBatch) -> list[slice]:
    """Consecutive slices of the tasks of ``batch``, each holding about ``TASK_CHUNK_BYTES``
    of inputs."""
    per_task = batch.X_in[0].nbytes + batch.X_out[0].nbytes
    size = max(1, TASK_CHUNK_BYTES // per_task)
    return [slice(start, start + size) for start in range(0, batch.n_tasks, size)]


def _fo_anil_sums(
    B: Array,
    w: Array,
    X_in: Array,
    y_in: Array,
    X_out: Array,
    y_out: Array,
    alpha: float,
    steps: int,
) -> tuple[Array, Array, float]:
    """FO-ANIL on a chunk of tasks: the sums over its tasks that the outer step averages.

    Inner loop (as :func:`adapt_head`): ``w_i <- w_i - alpha B^T X_i^in^T (X_i^in B w_i -
    y_i^in) / m_in``, ``steps`` times from ``w_i = w``. Outer residuals
    ``r_i = X_i^out B w_i - y_i^out`` and input gradients ``v_i = X_i^out^T r_i / m_out``.

    **Arguments:** ``B`` (d, k'); ``w`` (k',); ``X_in`` (n, m_in, d); ``y_in`` (n, m_in);
    ``X_out`` (n, m_out, d); ``y_out`` (n, m_out). **Returns:** ``sum_i v_i w_i^T`` (d, k'),
    ``sum_i v_i`` (d,) and ``sum_i ||r_i||^2``.
    """
    heads = w
    for _ in range(steps):
        inner = transposed_apply(X_in, residual(B, heads, X_in, y_in))
        heads = heads - (alpha / X_in.shape[1]) * inner @ B
    r = residual(B, heads, X_out, y_out)
    v = transposed_apply(X_out, r) / X_out.shape[1]
    return v.T @ heads, v.sum(axis=0), float(array_namespace(r).vdot(r, r))
