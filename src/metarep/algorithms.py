"""Meta-learning algorithms on the linear model, vectorised over tasks (spec section 3).

Each algorithm is a small frozen object with a pure ``step(state, batch) -> (state, loss)``,
where the state is the model ``(B, w)`` (:class:`LinearParams`) or, for multi-task learning,
:class:`MTLState` (the model plus one head per task), built by ``init_state``. The training
loop, recording and I/O live in :mod:`metarep.training`. Shapes: ``N`` tasks, ``m`` rows per
task, ambient dimension ``d``, width ``k'``. The squared loss on one task is
``L(B, w; X, y) = ||X B w - y||^2 / (2 m)``. Methods: ``fo-anil`` (:class:`FOANIL`), ``anil``
(:class:`ANIL`), ``fo-maml`` (:class:`FOMAML`), ``maml`` (:class:`MAML`), ``mtl`` (:class:`MTL`).

No per-task Python loop: every per-task quantity is a batched contraction over the task axis,
and the data ``X`` is read a small constant number of times per step.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import ClassVar, NamedTuple, Protocol, TypeVar

import numpy as np
from threadpoolctl import ThreadpoolController

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


@dataclass(frozen=True)
class _TaskMatrices:
    """Per-task d x k' matrices ``M_i = M + sum_r a_{r,i} b_{r,i}^T`` kept in factored form.

    ``base`` is the shared ``M`` (d, k') or ``None`` (zero); each pair of ``factors`` holds
    ``a_r`` (N, d) and ``b_r`` (N, k'). The inner loop of MAML changes ``B`` by one rank-one
    term per step and reverse mode adds two per step, so products with ``M_i`` cost
    O(N (d k' + rank (d + k'))) and no d x k' matrix is ever formed per task.
    """

    base: np.ndarray | None
    factors: tuple[tuple[np.ndarray, np.ndarray], ...] = ()

    def matvec(self, v: np.ndarray) -> np.ndarray:
        """``M_i v_i`` for ``v`` (N, k'); returns (N, d)."""
        out = [a * np.einsum("nk,nk->n", b, v)[:, None] for a, b in self.factors]
        if self.base is not None:
            out.append(v @ self.base.T)
        return sum(out[1:], out[0])

    def rmatvec(self, u: np.ndarray) -> np.ndarray:
        """``M_i^T u_i`` for ``u`` (N, d); returns (N, k')."""
        out = [b * np.einsum("nd,nd->n", a, u)[:, None] for a, b in self.factors]
        if self.base is not None:
            out.append(u @ self.base)
        return sum(out[1:], out[0])

    def plus(self, a: np.ndarray, b: np.ndarray) -> _TaskMatrices:
        """``M_i + a_i b_i^T`` for ``a`` (N, d), ``b`` (N, k')."""
        return _TaskMatrices(self.base, (*self.factors, (a, b)))

    def task_mean(self) -> np.ndarray:
        """``mean_i M_i``, shape (d, k') (needs at least one factor)."""
        left = np.concatenate([a for a, _ in self.factors])  # (rank N, d), one contiguous GEMM
        right = np.concatenate([b for _, b in self.factors])
        total = left.T @ right / self.factors[0][0].shape[0]
        return total if self.base is None else self.base + total


def _apply(X: np.ndarray, v: np.ndarray) -> np.ndarray:
    """``X_i v_i`` for ``X`` (N, m, d), ``v`` (N, d); returns (N, m)."""
    return np.einsum("nmd,nd->nm", X, v)


def meta_gradient(
    B: np.ndarray,
    w: np.ndarray,
    batch: TaskBatch,
    alpha: float,
    steps: int,
    *,
    adapt_body: bool,
    second_order: bool,
) -> tuple[np.ndarray, np.ndarray, float]:
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
    """
    X_in, y_in = batch.X_in, batch.y_in
    body = _TaskMatrices(B)
    head = np.tile(w, (batch.n_tasks, 1))
    trace = []
    for _ in range(steps):
        u = _input_gradient(X_in, _apply(X_in, body.matvec(head)) - y_in)
        trace.append((body, head, u))
        body, head = (body.plus(-alpha * u, head) if adapt_body else body,
                      head - alpha * body.rmatvec(u))
    residual = _apply(batch.X_out, body.matvec(head)) - batch.y_out
    v = _input_gradient(batch.X_out, residual)
    body_adj, head_adj = _TaskMatrices(None, ((v, head),)), body.rmatvec(v)
    if second_order:
        for body_j, head_j, u_j in reversed(trace):
            u_adj = -alpha * body_j.matvec(head_adj)
            if adapt_body:
                u_adj = u_adj - alpha * body_adj.matvec(head_j)
            s_u = _input_gradient(X_in, _apply(X_in, u_adj))
            new_head_adj = head_adj + body_j.rmatvec(s_u)
            if adapt_body:
                new_head_adj = new_head_adj - alpha * body_adj.rmatvec(u_j)
            body_adj = body_adj.plus(-alpha * u_j, head_adj).plus(s_u, head_j)
            head_adj = new_head_adj
    return body_adj.task_mean(), head_adj.mean(axis=0), 0.5 * float(np.mean(residual**2))


class MTLState(NamedTuple):
    """Training state of multi-task learning: the model ``(B, w)`` and one head per pool task.

    ``B`` (d, k'); ``w`` (k',) the model's head (kept at its initial value ``w_0``);
    ``heads`` (N, k') the per-task heads ``w_i``.
    """

    B: np.ndarray
    w: np.ndarray
    heads: np.ndarray

    def is_finite(self) -> bool:
        return bool(np.all(np.isfinite(self.B)) and np.all(np.isfinite(self.heads)))


State = LinearParams | MTLState
"""What a method trains: the model parameters, or (mtl) the model plus per-task heads. Both
are named tuples with fields ``B`` and ``w``, so the measures read any state."""


class Method(Protocol):
    """An outer step of a meta-learning algorithm on the linear model."""

    name: str

    def init_state(self, params: LinearParams, n_tasks: int) -> State:
        """The training state at the initialisation ``params`` for a pool of ``n_tasks``."""
        ...

    def step(self, state: State, batch: TaskBatch) -> tuple[State, float]:
        """One outer step on ``batch``; returns the new state and the meta-training loss
        (the outer loss after adaptation, averaged over the tasks, at the old state)."""
        ...


@dataclass(frozen=True)
class _InnerLoopMethod:
    """Shared machinery of the methods with an inner loop (state: the model ``(B, w)``).

    One outer step is ``(B, w) <- (B, w) - beta G`` with ``G`` from :func:`meta_gradient`,
    configured by the subclass's ``adapt_body`` and ``second_order``.
    """

    inner_lr: float
    outer_lr: float
    inner_steps: int = 1
    adapt_body: ClassVar[bool] = False
    second_order: ClassVar[bool] = False

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
class FOANIL(_InnerLoopMethod):
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
        """One outer step on ``batch``; returns the new ``(B, w)`` and the meta-training loss.

        The tasks are taken in cache-sized chunks (:func:`_fo_anil_sums`), in parallel
        (:func:`_map_chunks`); the chunks' sums are added in order, so the result does not
        depend on the number of threads.
        """
        B, w = params

        def chunk_sums(tasks: slice) -> tuple[np.ndarray, np.ndarray, float]:
            return _fo_anil_sums(B, w, batch.X_in[tasks], batch.y_in[tasks], batch.X_out[tasks],
                                 batch.y_out[tasks], self.inner_lr, self.inner_steps)

        sums = _map_chunks(chunk_sums, _task_chunks(batch))
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


@functools.cache
def _blas() -> ThreadpoolController:
    """numpy's BLAS libraries, found once."""
    return ThreadpoolController().select(user_api="blas")


def _blas_threads() -> int:
    """The threads BLAS may use now: its default (the cores), ``OPENBLAS_NUM_THREADS``, or a
    ``threadpoolctl`` limit such as the one sweeps set around each run (the smallest count
    when several BLAS libraries are loaded)."""
    return min((library.num_threads for library in _blas().lib_controllers), default=1)


@functools.cache
def _thread_pool(workers: int) -> ThreadPoolExecutor:
    return ThreadPoolExecutor(workers, thread_name_prefix="metarep")


if hasattr(os, "register_at_fork"):  # Unix: a forked child has none of the pool's threads
    os.register_at_fork(after_in_child=_thread_pool.cache_clear)

Result = TypeVar("Result")


def _map_chunks(work: Callable[[slice], Result], chunks: list[slice]) -> list[Result]:
    """``[work(chunk) for chunk in chunks]``, on as many threads as BLAS may use (numpy
    releases the GIL in its loops), with BLAS held to one thread meanwhile so that the two do
    not compete for the cores. The caller's floating-point error settings (``np.errstate``)
    hold in the threads too."""
    workers = min(len(chunks), _blas_threads())
    if workers <= 1:
        return [work(chunk) for chunk in chunks]
    errors = np.geterr()

    def run(chunk: slice) -> Result:
        with np.errstate(**errors):
            return work(chunk)

    with _blas().limit(limits=1):
        return list(_thread_pool(workers).map(run, chunks))


def _transposed_apply(X: np.ndarray, r: np.ndarray) -> np.ndarray:
    """``X_i^T r_i`` for ``X`` (N, m, d), ``r`` (N, m); returns (N, d). The same numbers as
    :func:`_input_gradient` times ``m``, as batched matrix products, which run at about twice
    the speed of ``einsum`` when ``X`` is in cache."""
    return (r[:, None, :] @ X)[:, 0]


def _fo_anil_sums(
    B: np.ndarray,
    w: np.ndarray,
    X_in: np.ndarray,
    y_in: np.ndarray,
    X_out: np.ndarray,
    y_out: np.ndarray,
    alpha: float,
    steps: int,
) -> tuple[np.ndarray, np.ndarray, float]:
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
        inner = _transposed_apply(X_in, _residual(B, heads, X_in, y_in))
        heads = heads - (alpha / X_in.shape[1]) * inner @ B
    residual = _residual(B, heads, X_out, y_out)
    v = _transposed_apply(X_out, residual) / X_out.shape[1]
    return v.T @ heads, v.sum(axis=0), float(np.vdot(residual, residual))


@dataclass(frozen=True)
class ANIL(_InnerLoopMethod):
    """ANIL: FO-ANIL's inner loop, differentiated through (second order, exact).

    ``w_i^0 = w``, ``w_i^{j+1} = w_i^j - alpha grad_w L(B, w_i^j; X_i^in, y_i^in)``
    (``j < s = inner_steps``), then
    ``(B, w) <- (B, w) - beta grad_(B, w) mean_i L(B, w_i^s(B, w); X_i^out, y_i^out)``.
    For ``s = 1``, with ``S_i = X_i^in^T X_i^in / m_in``, ``u_i = S_i B w - X_i^in^T y_i^in / m_in``
    and ``v_i = X_i^out^T (X_i^out B w_i - y_i^out) / m_out``:
    ``grad_w = mean_i (I - alpha B^T S_i B) B^T v_i`` and
    ``grad_B = mean_i (v_i w_i^T - alpha u_i v_i^T B - alpha S_i B B^T v_i w^T)``.
    """

    inner_lr: float
    outer_lr: float
    inner_steps: int = 1
    name: str = "anil"
    second_order: ClassVar[bool] = True


@dataclass(frozen=True)
class FOMAML(_InnerLoopMethod):
    """First-order MAML: the inner loop adapts body and head; the gradient at the adapted
    parameters is applied to the shared ones.

    ``(B_i^0, w_i^0) = (B, w)``,
    ``(B_i^{j+1}, w_i^{j+1}) = (B_i^j, w_i^j) - alpha grad_(B, w) L(B_i^j, w_i^j; X_i^in, y_i^in)``
    (simultaneous), then with ``v_i = X_i^out^T (X_i^out B_i^s w_i^s - y_i^out) / m_out``:
    ``B <- B - beta mean_i v_i w_i^s^T`` and ``w <- w - beta mean_i B_i^s^T v_i``.
    """

    inner_lr: float
    outer_lr: float
    inner_steps: int = 1
    name: str = "fo-maml"
    adapt_body: ClassVar[bool] = True


@dataclass(frozen=True)
class MAML(_InnerLoopMethod):
    """MAML: FO-MAML's inner loop on body and head, differentiated through (exact).

    ``(B, w) <- (B, w) - beta grad_(B, w) mean_i L(B_i^s(B, w), w_i^s(B, w); X_i^out, y_i^out)``.
    For ``s = 1``, with ``u_i = X_i^in^T (X_i^in B w - y_i^in) / m_in``,
    ``B_i = B - alpha u_i w^T``, ``w_i = w - alpha B^T u_i``, ``v_i`` as in :class:`FOMAML`,
    ``S_i = X_i^in^T X_i^in / m_in`` and ``ubar_i = -alpha (B B_i^T v_i + (w_i^T w) v_i)``:
    ``grad_B = mean_i (v_i w_i^T - alpha u_i v_i^T B_i + S_i ubar_i w^T)`` and
    ``grad_w = mean_i (B_i^T v_i - alpha (v_i^T u_i) w_i + B^T S_i ubar_i)``.
    """

    inner_lr: float
    outer_lr: float
    inner_steps: int = 1
    name: str = "maml"
    adapt_body: ClassVar[bool] = True
    second_order: ClassVar[bool] = True


@dataclass(frozen=True)
class MTL:
    """Multi-task learning (Burer-Monteiro): gradient descent on ``B`` and per-task heads.

    State ``(B, w, W = [w_1 .. w_N])``, every ``w_i`` starting at the model's head ``w_0``.
    One step on the sampled tasks ``I`` uses all ``m = m_in + m_out`` rows of each, with
    ``v_i = X_i^T (X_i B w_i - y_i) / m``, simultaneously:
    ``B <- B - beta grad_B mean_{i in I} L(B, w_i; X_i, y_i) = B - beta mean_{i in I} v_i w_i^T``,
    ``w_i <- w_i - beta grad_{w_i} L(B, w_i; X_i, y_i) = w_i - beta B^T v_i`` for ``i in I``.
    ``w`` stays ``w_0``; there is no inner loop (``inner_lr`` only acts at test time).
    """

    outer_lr: float
    name: str = "mtl"

    def init_state(self, params: LinearParams, n_tasks: int) -> MTLState:
        """``(B_0, w_0)`` with ``n_tasks`` copies of ``w_0`` as the per-task heads."""
        return MTLState(params.B, params.w, np.tile(params.w, (n_tasks, 1)))

    def step(self, state: MTLState, batch: TaskBatch) -> tuple[MTLState, float]:
        """One step on the tasks of ``batch``: those at ``batch.indices`` of the pool, or the
        whole pool (then ``batch`` must hold exactly one task per head)."""
        B, w, heads = state
        if batch.indices is None and batch.n_tasks != heads.shape[0]:
            raise ValueError(f"a batch of {batch.n_tasks} tasks without indices cannot update "
                             f"{heads.shape[0]} heads")
        rows = slice(None) if batch.indices is None else batch.indices
        H = heads[rows]
        r_in = _residual(B, H, batch.X_in, batch.y_in)
        r_out = _residual(B, H, batch.X_out, batch.y_out)
        m = batch.m_in + batch.m_out
        v = (batch.m_in * _input_gradient(batch.X_in, r_in)
             + batch.m_out * _input_gradient(batch.X_out, r_out)) / m
        new_heads = heads.copy()
        new_heads[rows] = H - self.outer_lr * (v @ B)
        new_B = B - self.outer_lr * (v.T @ H) / batch.n_tasks
        meta_loss = 0.5 * (float(np.sum(r_in**2)) + float(np.sum(r_out**2))) / (batch.n_tasks * m)
        return MTLState(new_B, w, new_heads), meta_loss


INNER_LOOP_METHODS: dict[str, type[_InnerLoopMethod]] = {
    "fo-anil": FOANIL, "anil": ANIL, "fo-maml": FOMAML, "maml": MAML,
}


def make_method(name: str, inner_lr: float, outer_lr: float, inner_steps: int) -> Method:
    """The algorithm called ``name`` (see ``METHOD_NAMES`` in :mod:`metarep.config`).

    ``mtl`` has no inner loop and ignores ``inner_lr`` and ``inner_steps``.
    """
    if name == "mtl":
        return MTL(outer_lr)
    if name in INNER_LOOP_METHODS:
        return INNER_LOOP_METHODS[name](inner_lr, outer_lr, inner_steps)
    raise ValueError(f"unknown method {name!r}")
