"""Multi-task learning (Burer-Monteiro) on the linear model: gradient descent on the shared
body and one head per pool task (specification §3), vectorised over tasks.

Tested against the plain per-task loop :func:`metarep.core.reference.mtl_step`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, NamedTuple

from metarep.core.arguments import check_step_size
from metarep.core.arrays import Array, array_namespace
from metarep.core.methods.gradients import input_gradient, residual
from metarep.core.model import LinearParams
from metarep.core.tasks import TaskBatch
from metarep.errors import ArgumentError


class MTLState(NamedTuple):
    """Training state of multi-task learning: the model ``(B, w)`` and one head per pool task.

    ``B`` (d, k'); ``w`` (k',) the model's head (kept at its initial value ``w_0``);
    ``heads`` (N, k') the per-task heads ``w_i``.
    """

    B: Array
    w: Array
    heads: Array

    def is_finite(self) -> bool:
        xp = array_namespace(self.B)
        return bool(xp.all(xp.isfinite(self.B)) and xp.all(xp.isfinite(self.heads)))


@dataclass(frozen=True)
class MTL:
    """Multi-task learning (Burer-Monteiro): gradient descent on ``B`` and per-task heads.

    State ``(B, w, W = [w_1 .. w_N])``, every ``w_i`` starting at the model's head ``w_0``.
    One step on the sampled tasks ``I`` uses all ``m = m_in + m_out`` rows of each, with
    ``v_i = X_i^T (X_i B w_i - y_i) / m``, simultaneously:
    ``B <- B - beta grad_B mean_{i in I} L(B, w_i; X_i, y_i) = B - beta mean_{i in I} v_i w_i^T``,
    ``w_i <- w_i - beta grad_{w_i} L(B, w_i; X_i, y_i) = w_i - beta B^T v_i`` for ``i in I``.
    ``w`` stays ``w_0``; there is no inner loop (``inner_lr`` only acts at test time).
    Tested against :func:`metarep.core.reference.mtl_step`.
    """

    outer_lr: float
    name: ClassVar[str] = "mtl"

    def __post_init__(self) -> None:
        check_step_size("outer_lr", self.outer_lr)

    def init_state(self, params: LinearParams, n_tasks: int) -> MTLState:
        """``(B_0, w_0)`` with ``n_tasks`` copies of ``w_0`` as the per-task heads."""
        return MTLState(params.B, params.w,
                        array_namespace(params.w).tile(params.w, (n_tasks, 1)))

    def step(self, state: MTLState, batch: TaskBatch) -> tuple[MTLState, float]:
        """One step on the tasks of ``batch``: those at ``batch.indices`` of the pool, or the
        whole pool (then ``batch`` must hold exactly one task per head)."""
        B, w, heads = state
        if batch.indices is None and batch.n_tasks != heads.shape[0]:
            raise ArgumentError("batch", f"{batch.n_tasks} tasks without indices cannot "
                                f"update {heads.shape[0]} heads")
        rows = slice(None) if batch.indices is None else batch.indices
        H = heads[rows]
        r_in = residual(B, H, batch.X_in, batch.y_in)
        r_out = residual(B, H, batch.X_out, batch.y_out)
        m = batch.m_in + batch.m_out
        v = (batch.m_in * input_gradient(batch.X_in, r_in)
             + batch.m_out * input_gradient(batch.X_out, r_out)) / m
        xp = array_namespace(heads)
        new_heads = xp.copy(heads)
        new_heads[rows] = H - self.outer_lr * (v @ B)
        new_B = B - self.outer_lr * (v.T @ H) / batch.n_tasks
        meta_loss = 0.5 * (float(xp.sum(r_in**2)) + float(xp.sum(r_out**2))) / (batch.n_tasks * m)
        return MTLState(new_B, w, new_heads), meta_loss
