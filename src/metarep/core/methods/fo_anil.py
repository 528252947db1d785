"""First-order ANIL on the linear model, the paper's method (specification §3), at the memory
bound: on numpy arrays the tasks are taken in chunks on the threads of
:mod:`metarep.core.methods.threads`, each task's inputs read once per residual
(:mod:`metarep.core.methods.fused`); on torch tensors (any device) all at once, with the same
formula (:func:`_chunk_sums`).

Tested against the plain per-task loop :func:`metarep.core.reference.fo_anil_step`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from metarep.core.arrays import Array, array_namespace
from metarep.core.methods.gradients import residual_gradients
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

        With ``u_i = B w_i`` and ``g_i^(s) = X_i^in^T (X_i^in u_i - y_i^in)`` the inner step
        is ``u_i <- u_i - c B B^T g_i^(s)`` (``c = alpha / m_in``), so ``w_i = w - c B^T G_i``
        with ``G_i = sum_s g_i^(s)``, and with ``v_i = X_i^out^T r_i`` the outer gradients are
        ``grad_B = (sum_i v_i w^T - c (sum_i v_i G_i^T) B) / (N m_out)`` and
        ``grad_w = B^T sum_i v_i / (N m_out)``: every product with ``X`` is a residual and its
        transpose (:func:`_chunk_sums`), and the products in ``d`` and ``k'`` take the cheaper
        order (:func:`_through_body`).

        On numpy arrays the tasks are taken in chunks, one pass over each task's inputs per
        residual (:func:`~metarep.core.methods.fused.residual_gradients`), in parallel
        (:func:`~metarep.core.methods.threads.map_chunks`); the chunks' sums are added in
        order, so the result does not depend on the number of threads. Torch tensors are one
        chunk, in batched products (torch parallelises each operation itself).
        """
        B, w = params
        gram = B @ B.T if _gram_first(*B.shape) else None
        c = self.inner_lr / batch.m_in

        def chunk_sums(tasks: slice) -> tuple[Array, Array, float]:
            return _chunk_sums(B, gram, w, batch.X_in[tasks], batch.y_in[tasks],
                               batch.X_out[tasks], batch.y_out[tasks], c, self.inner_steps)

        if array_namespace(batch.X_in) is np:
            sums = map_chunks(chunk_sums, _task_chunks(batch))
        else:
            sums = [chunk_sums(slice(0, batch.n_tasks))]
        scale = 1.0 / (batch.n_tasks * batch.m_out)
        v_sum = sum(chunk[0] for chunk in sums) * scale
        v_G = sum(chunk[1] for chunk in sums) * scale
        xp = array_namespace(B)
        grad_B = xp.einsum("d,k->dk", v_sum, w) - c * (v_G @ B if gram is not None else v_G)
        grad_w = B.T @ v_sum
        meta_loss = 0.5 * scale * sum(chunk[2] for chunk in sums)
        return LinearParams(B - self.outer_lr * grad_B, w - self.outer_lr * grad_w), meta_loss


TASK_CHUNK_BYTES = 1 << 22
""":meth:`FOANIL.step` takes the tasks in chunks of about this many bytes of ``X_in`` and
``X_out``, a size that does not depend on the threads (so neither do the sums): enough chunks
at the paper's scale (60 MB in float64) to keep every thread busy, few enough that the Python
overhead of a chunk (a few tens of microseconds; measured: 256 kB chunks take 2.5 times as
long as 4 MB chunks) stays small next to its arithmetic."""


def _task_chunks(batch: TaskBatch) -> list[slice]:
    """Consecutive slices of the tasks of ``batch``, each holding about ``TASK_CHUNK_BYTES``
    of inputs."""
    per_task = batch.X_in[0].nbytes + batch.X_out[0].nbytes
    size = max(1, TASK_CHUNK_BYTES // per_task)
    return [slice(start, start + size) for start in range(0, batch.n_tasks, size)]


def _gram_first(d: int, width: int) -> bool:
    """Whether ``G (B B^T)`` (``n d^2`` multiply-adds for ``G`` of shape (n, d), after
    ``d^2 k'`` for ``B B^T``) is cheaper than ``(G B) B^T`` (``2 n d k'``): when
    ``d <= 2 k'``."""
    return d <= 2 * width


def _through_body(G: Array, B: Array, gram: Array | None) -> Array:
    """``G B B^T`` for ``G`` (n, d), in the order :func:`_gram_first` chose (``gram`` is
    ``B B^T`` or None)."""
    return G @ gram if gram is not None else (G @ B) @ B.T


def _chunk_sums(
    B: Array,
    gram: Array | None,
    w: Array,
    X_in: Array,
    y_in: Array,
    X_out: Array,
    y_out: Array,
    c: float,
    steps: int,
) -> tuple[Array, Array, float]:
    """FO-ANIL on a chunk of tasks: the sums over its tasks that the outer step scales.

    Inner loop in ``u_i = B w_i`` from ``u_i = B w``: ``g_i = X_i^in^T (X_i^in u_i -
    y_i^in)``, ``G_i += g_i``, ``u_i <- u_i - c B B^T g_i``, ``steps`` times. Outer
    residuals ``r_i = X_i^out u_i - y_i^out`` and input gradients ``v_i = X_i^out^T r_i``.

    **Arguments:** ``B`` (d, k'); ``gram`` ``B B^T`` (d, d) or None (:func:`_gram_first`);
    ``w`` (k',); ``X_in`` (n, m_in, d); ``y_in`` (n, m_in); ``X_out`` (n, m_out, d);
    ``y_out`` (n, m_out); ``c = alpha / m_in``. **Returns:** ``sum_i v_i`` (d,),
    ``sum_i v_i G_i^T`` (d, d) when ``gram`` is given, else ``sum_i v_i (B^T G_i)^T`` (d, k'),
    and ``sum_i ||r_i||^2``.
    """
    u = B @ w
    total = None
    for _ in range(steps):
        g, _ = residual_gradients(X_in, u, y_in)
        total = g if total is None else total + g
        u = u - c * _through_body(g, B, gram)
    v, squares = residual_gradients(X_out, u, y_out)
    v_G = v.T @ total if gram is not None else v.T @ (total @ B)
    return v.sum(axis=0), v_G, float(squares.sum())
