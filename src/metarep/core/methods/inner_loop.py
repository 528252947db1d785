"""The methods with an inner loop through which the outer gradient may be taken: ANIL, FO-MAML
and MAML on the linear model (specification §3), and their shared outer gradient
:func:`meta_gradient` (exact by reverse mode, or first order), vectorised over tasks.

Tested against the plain per-task loops :func:`metarep.core.reference.inner_loop_step` (exact
gradients by the chain rule in forward mode) and, for the exact gradients, against autodiff
(torch) and finite differences of :func:`metarep.core.reference.outer_objective`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from metarep.core.arguments import check_count, check_step_size
from metarep.core.arrays import Array, array_namespace
from metarep.core.methods.gradients import residual_gradients
from metarep.core.model import LinearParams
from metarep.core.tasks import TaskBatch


@dataclass(frozen=True)
class _TaskMatrices:
    """Per-task d x k' matrices ``M_i = M + sum_r a_{r,i} b_{r,i}^T`` kept in factored form.

    ``base`` is the shared ``M`` (d, k') or ``None`` (zero); each pair of ``factors`` holds
    ``a_r`` (N, d) and ``b_r`` (N, k'). The inner loop of MAML changes ``B`` by one rank-one
    term per step and reverse mode adds two per step, so products with ``M_i`` cost
    O(N (d k' + rank (d + k'))) and no d x k' matrix is ever formed per task.
    """

    base: Array | None
    factors: tuple[tuple[Array, Array], ...] = ()

    def matvec(self, v: Array) -> Array:
        """``M_i v_i`` for ``v`` (N, k'); returns (N, d)."""
        xp = array_namespace(v)
        out = [a * xp.einsum("nk,nk->n", b, v)[:, None] for a, b in self.factors]
        if self.base is not None:
            out.append(v @ self.base.T)
        return sum(out[1:], out[0])

    def rmatvec(self, u: Array) -> Array:
        """``M_i^T u_i`` for ``u`` (N, d); returns (N, k')."""
        xp = array_namespace(u)
        out = [b * xp.einsum("nd,nd->n", a, u)[:, None] for a, b in self.factors]
        if self.base is not None:
            out.append(u @ self.base)
        return sum(out[1:], out[0])

    def plus(self, a: Array, b: Array) -> _TaskMatrices:
        """``M_i + a_i b_i^T`` for ``a`` (N, d), ``b`` (N, k')."""
        return _TaskMatrices(self.base, (*self.factors, (a, b)))

    def task_mean(self) -> Array:
        """``mean_i M_i``, shape (d, k') (needs at least one factor)."""
        products = [a.T @ b for a, b in self.factors]  # one GEMM per factor, no copies
        total = sum(products[1:], products[0]) / self.factors[0][0].shape[0]
        return total if self.base is None else self.base + total


def _residual_gradient(X: Array, v: Array, y: Array | None) -> tuple[Array, Array]:
    """``X_i^T (X_i v_i - y_i) / m`` (N, d) and ``||X_i v_i - y_i||^2`` (N,)
    (:func:`~metarep.core.methods.gradients.residual_gradients` scaled by ``1 / m``)."""
    gradients, squares = residual_gradients(X, v, y)
    return gradients / X.shape[1], squares


def meta_gradient(
    B: Array,
    w: Array,
    batch: TaskBatch,
    alpha: float,
    steps: int,
    *,
    adapt_body: bool,
    second_order: bool,
) -> tuple[Array, Array, float]:
    """Outer gradient of the inner-loop methods (ANIL, MAML and their first-order versions).

    Inner loop per task ``i``, from ``(B_i^0, w_i^0) = (B, w)``, for ``j = 0 .. steps-1``,
    with ``u_i^j = X_i^in^T (X_i^in B_i^j w_i^j - y_i^in) / m_in`` (the inner gradient with
    respect to ``B w``): ``w_i^{j+1} = w_i^j - alpha B_i^j^T u_i^j`` and, when ``adapt_body``,
    ``B_i^{j+1} = B_i^j - alpha u_i^j w_i^j^T`` (else ``B_i^{j+1} = B``). The outer loss is
    ``F(B, w) = mean_i L(B_i^s, w_i^s; X_i^out, y_i^out)``; let
    ``v_i = X_i^out^T (X_i^out B_i^s w_i^s - y_i^out) / m_out``.

    First order: ``(mean_i v_i w_i^s^T, mean_i B_i^s^T v_i)`` — the gradient at the adapted
    parameters. Second order: the exact ``grad_(B, w) F``, by reverse mode through the inner
    loop. With adjoints ``Bbar_i^s = v_i w_i^s^T``, ``wbar_i^s = B_i^s^T v_i`` and
    ``S_i = X_i^in^T X_i^in / m_in``, each step backwards is
    ``ubar = -alpha (B_i^j wbar^{j+1} + [adapt_body] Bbar^{j+1} w_i^j)``,
    ``Bbar^j = Bbar^{j+1} - alpha u_i^j wbar^{j+1}^T + S_i ubar w_i^j^T``,
    ``wbar^j = wbar^{j+1} + B_i^j^T S_i ubar - [adapt_body] alpha Bbar^{j+1}^T u_i^j``;
    then ``grad_B F = mean_i Bbar_i^0`` and ``grad_w F = mean_i wbar_i^0``. Every per-task
    matrix stays in factored form (:class:`_TaskMatrices`); no loop over tasks.

    **Arguments:** ``B`` (d, k'); ``w`` (k',); ``batch`` of N tasks; ``alpha`` the inner step
    size; ``steps >= 1``. **Returns:** ``(grad_B (d, k'), grad_w (k',), F(B, w))``.
    Tested against :func:`metarep.core.reference.outer_gradient`.
    """
    X_in, y_in = batch.X_in, batch.y_in
    body = _TaskMatrices(B)
    xp = array_namespace(w)
    head = xp.tile(w, (batch.n_tasks, 1))
    trace = []
    for _ in range(steps):
        u, _ = _residual_gradient(X_in, body.matvec(head), y_in)
        trace.append((body, head, u))
        body, head = (body.plus(-alpha * u, head) if adapt_body else body,
                      head - alpha * body.rmatvec(u))
    v, squares = _residual_gradient(batch.X_out, body.matvec(head), batch.y_out)
    body_adj, head_adj = _TaskMatrices(None, ((v, head),)), body.rmatvec(v)
    if second_order:
        for body_j, head_j, u_j in reversed(trace):
            u_adj = -alpha * body_j.matvec(head_adj)
            if adapt_body:
                u_adj = u_adj - alpha * body_adj.matvec(head_j)
            s_u, _ = _residual_gradient(X_in, u_adj, None)
            new_head_adj = head_adj + body_j.rmatvec(s_u)
            if adapt_body:
                new_head_adj = new_head_adj - alpha * body_adj.rmatvec(u_j)
            body_adj = body_adj.plus(-alpha * u_j, head_adj).plus(s_u, head_j)
            head_adj = new_head_adj
    meta_loss = 0.5 * float(squares.sum()) / (batch.n_tasks * batch.m_out)
    return body_adj.task_mean(), head_adj.mean(axis=0), meta_loss


@dataclass(frozen=True)
class InnerLoopMethod:
    """Shared machinery of the methods with an inner loop (state: the model ``(B, w)``).

    ``inner_lr`` (alpha > 0), ``outer_lr`` (beta > 0), ``inner_steps`` (s >= 1). One outer
    step is ``(B, w) <- (B, w) - beta G`` with ``G`` from :func:`meta_gradient`, configured by
    the subclass's ``adapt_body`` and ``second_order``; ``name`` is the method's name.
    """

    inner_lr: float
    outer_lr: float
    inner_steps: int = 1
    name: ClassVar[str]
    adapt_body: ClassVar[bool] = False
    second_order: ClassVar[bool] = False

    def __post_init__(self) -> None:
        check_step_size("inner_lr", self.inner_lr)
        check_step_size("outer_lr", self.outer_lr)
        check_count("inner_steps", self.inner_steps)

    def init_state(self, params: LinearParams, n_tasks: int) -> LinearParams:
        """The model parameters themselves (no per-task state)."""
        return params

    def step(self, params: LinearParams, batch: TaskBatch) -> tuple[LinearParams, float]:
        B, w = params
        grad_B, grad_w, meta_loss = meta_gradient(
            B, w, batch, self.inner_lr, self.inner_steps, adapt_body=self.adapt_body,
            second_order=self.second_order)
        return LinearParams(B - self.outer_lr * grad_B, w - self.outer_lr * grad_w), meta_loss


@dataclass(frozen=True)
class ANIL(InnerLoopMethod):
    """ANIL: FO-ANIL's inner loop, differentiated through (second order, exact).

    ``w_i^0 = w``, ``w_i^{j+1} = w_i^j - alpha grad_w L(B, w_i^j; X_i^in, y_i^in)``
    (``j < s = inner_steps``), then
    ``(B, w) <- (B, w) - beta grad_(B, w) mean_i L(B, w_i^s(B, w); X_i^out, y_i^out)``.
    For ``s = 1``, with ``S_i = X_i^in^T X_i^in / m_in``, ``u_i = S_i B w - X_i^in^T y_i^in / m_in``
    and ``v_i = X_i^out^T (X_i^out B w_i - y_i^out) / m_out``:
    ``grad_w = mean_i (I - alpha B^T S_i B) B^T v_i`` and
    ``grad_B = mean_i (v_i w_i^T - alpha u_i v_i^T B - alpha S_i B B^T v_i w^T)``.
    """

    name: ClassVar[str] = "anil"
    second_order: ClassVar[bool] = True


@dataclass(frozen=True)
class FOMAML(InnerLoopMethod):
    """First-order MAML: the inner loop adapts body and head; the gradient at the adapted
    parameters is applied to the shared ones.

    ``(B_i^0, w_i^0) = (B, w)``,
    ``(B_i^{j+1}, w_i^{j+1}) = (B_i^j, w_i^j) - alpha grad_(B, w) L(B_i^j, w_i^j; X_i^in, y_i^in)``
    (simultaneous), then with ``v_i = X_i^out^T (X_i^out B_i^s w_i^s - y_i^out) / m_out``:
    ``B <- B - beta mean_i v_i w_i^s^T`` and ``w <- w - beta mean_i B_i^s^T v_i``.
    """

    name: ClassVar[str] = "fo-maml"
    adapt_body: ClassVar[bool] = True


@dataclass(frozen=True)
class MAML(InnerLoopMethod):
    """MAML: FO-MAML's inner loop on body and head, differentiated through (exact).

    ``(B, w) <- (B, w) - beta grad_(B, w) mean_i L(B_i^s(B, w), w_i^s(B, w); X_i^out, y_i^out)``.
    For ``s = 1``, with ``u_i = X_i^in^T (X_i^in B w - y_i^in) / m_in``,
    ``B_i = B - alpha u_i w^T``, ``w_i = w - alpha B^T u_i``, ``v_i`` as in :class:`FOMAML`,
    ``S_i = X_i^in^T X_i^in / m_in`` and ``ubar_i = -alpha (B B_i^T v_i + (w_i^T w) v_i)``:
    ``grad_B = mean_i (v_i w_i^T - alpha u_i v_i^T B_i + S_i ubar_i w^T)`` and
    ``grad_w = mean_i (B_i^T v_i - alpha (v_i^T u_i) w_i + B^T S_i ubar_i)``.
    """

    name: ClassVar[str] = "maml"
    adapt_body: ClassVar[bool] = True
    second_order: ClassVar[bool] = True
