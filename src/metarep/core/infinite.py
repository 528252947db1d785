"""Exact infinite-task dynamics of FO-ANIL, batched over configurations (specification §1, §4).

With infinitely many tasks (``tasks.n: infinite``) every expectation over tasks, inputs and
noise is taken exactly, so the outer step is deterministic. For one inner head step with
``m = m_in`` samples (``m_in = inf`` allowed) and ``N = B^T B``, ``C = B_star^T B`` (k, k'),
the expected FO-ANIL step is (derivation in ``docs/infinite_tasks.md``)::

    Q  = E[w_i w_i^T] = u u^T + (alpha^2/m) n n^T + alpha^2 (1 + 1/m) C^T Sigma C
                        + alpha^2 ((w^T n + tr Sigma + sigma^2) / m) N,
         with n = N w and u = w - alpha n = E[w_i],
    B <- B - beta (B Q - alpha B_star Sigma C),       w <- w - beta N u,

and the meta-training loss is ``(tr(N Q) - 2 alpha tr(Sigma C C^T) + tr Sigma + sigma^2) / 2``.
``m_out`` plays no role: the outer gradients are linear in the outer data's ``S_out`` and
``X_out^T eps_out``, whose means (``I`` and 0) are all that survives the expectation.

**Coordinates.** Write ``B = B_star C + Q_perp R`` with ``Q_perp`` (d, r) an orthonormal basis
of the column space of ``(I - B_star B_star^T) B_0`` (``r <= min(d - k, k')``): the update
keeps ``B_perp^T B_t = Q_perp R_t`` inside it (``R <- R (I - beta Q)``). Every row of
``G = [C; R]`` and ``w`` also stays in the span of the rows of ``G_0`` and ``w_0``, so with an
orthonormal basis ``V`` (k', p) of that span, ``p <= min(k + r + 1, k')``,

    B_t = [B_star, Q_perp] H_t V^T,    w_t = V omega_t,

and the dynamics of ``(H, omega)`` (H: (k + r, p), omega: (p,)) are the formulas above with
``G, w`` replaced by ``H, omega`` and ``C`` by the first k rows of ``H``. One step costs
``O(p^2 (k + r))``, i.e. ``O(k'^3 + k k'^2)`` whatever ``d`` is; ``B`` is reconstructed only
when asked (:meth:`Frame.params`). Every measure of :mod:`metarep.core.measures` is invariant under
these orthonormal changes of basis, so it is computed from ``H`` with ``B_star = [I_k; 0]``.

**Batches.** All arrays carry a leading configuration axis ``b``: each configuration has its
own ``alpha``, ``beta``, ``m_in`` (finite or inf), ``sigma^2`` and initial state; ``d``, ``k``,
``k'`` and ``Sigma_star`` are shared. Python API:

- :func:`coordinates` -> (:class:`Frame`, :class:`InfiniteTaskState`) from ``B_0``, ``w_0``;
- :class:`ExactFOANIL`: the batched expected step (``step(state) -> (state, loss)``);
- :func:`coordinate_measures`, :func:`undriven_perp_norm`, :meth:`Frame.params` (reconstruct B, w);
- :func:`expected_update`: the exact update of ``(B, w)`` in R^d (tested against
  :func:`metarep.core.monte_carlo.monte_carlo_update` of :class:`~metarep.core.methods.FOANIL`
  with a z-test, and against the plain loop :func:`metarep.core.reference.expected_fo_anil_step`).

Runs of these dynamics (``tasks.n: infinite``) are
:class:`metarep.run.backends.InfiniteTaskBackend`; many configurations at once, as a table,
are :func:`metarep.run.simulate.simulate_batch`.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np

from metarep.core.arguments import per_config
from metarep.core.arrays import Array, array_namespace, to_numpy
from metarep.core.compiled import compile_loop
from metarep.core.expected_steps import ExpectedGradients, check_exact
from metarep.core.measures import TRUTH_MEASURES, numerical_rank
from metarep.core.model import LinearParams
from metarep.core.problem import Problem
from metarep.core.theory import lambda_star, top_part
from metarep.errors import ArgumentError


class InfiniteTaskState(NamedTuple):
    """Coordinates of a batch of ``b`` configurations: ``H`` (b, k + r, p), ``omega`` (b, p).

    ``B = [B_star, Q_perp] H V^T`` and ``w = V omega`` (see the module docstring); the first
    k rows of ``H`` are ``C V = B_star^T B V``, the others ``R V``.
    """

    H: Array
    omega: Array

    def finite(self) -> np.ndarray:
        """Per configuration, a numpy array (b,), whether every entry is finite (checked
        through one sum, which is also non-finite for entries so large that the sum
        overflows: a diverged state either way)."""
        xp = array_namespace(self.H)
        return to_numpy(xp.isfinite(self.H.sum(axis=(1, 2)) + self.omega.sum(axis=1)))

    def is_finite(self) -> bool:
        """Whether every entry of every configuration is finite (:meth:`finite`)."""
        return bool(self.finite().all())

    def take(self, index: int) -> InfiniteTaskState:
        """Configuration ``index`` alone, as a batch of one (a copy)."""
        xp = array_namespace(self.H)
        return InfiniteTaskState(xp.copy(self.H[index:index + 1]),
                                 xp.copy(self.omega[index:index + 1]))

    @staticmethod
    def stack(states: Sequence[InfiniteTaskState]) -> InfiniteTaskState:
        """The configurations of ``states`` as one batch, in order."""
        xp = array_namespace(states[0].H)
        return InfiniteTaskState(xp.concatenate([s.H for s in states]),
                                 xp.concatenate([s.omega for s in states]))


@dataclass(frozen=True)
class Frame:
    """The orthonormal bases that map coordinates back to R^d and R^{k'}.

    ``B_star`` (d, k); ``Q_perp`` (b, d, r) or ``None`` when not kept (then :meth:`params`
    is unavailable); ``V`` (b, k', p).
    """

    B_star: np.ndarray
    Q_perp: np.ndarray | None
    V: np.ndarray

    def params(self, state: InfiniteTaskState, index: int = 0) -> LinearParams:
        """``(B, w)`` of configuration ``index``: ``B = B_star C V^T + Q_perp R V^T``."""
        if self.Q_perp is None:
            raise ArgumentError("keep_basis", "this frame was built without Q_perp "
                                "(keep_basis=False)")
        k = self.B_star.shape[1]
        H, V = state.H[index], self.V[index]
        B = (self.B_star @ H[:k] + self.Q_perp[index] @ H[k:]) @ V.T
        return LinearParams(B, V @ state.omega[index])

    def state(self, params: Sequence[LinearParams]) -> InfiniteTaskState:
        """The coordinates of ``(B, w)`` for each configuration (the inverse of
        :meth:`params` for parameters on this frame's trajectories)."""
        if self.Q_perp is None:
            raise ArgumentError("keep_basis", "this frame was built without Q_perp "
                                "(keep_basis=False)")
        H = np.stack([
            np.concatenate([self.B_star.T @ p.B, self.Q_perp[i].T @ p.B]) @ self.V[i]
            for i, p in enumerate(params)])
        omega = np.stack([self.V[i].T @ p.w for i, p in enumerate(params)])
        return InfiniteTaskState(H, omega)


def _one_frame(
    B_star: np.ndarray, B0: np.ndarray, w0: np.ndarray, rows: int, cols: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """``(Q_perp (d, rows), V (k', cols), H (k + rows, cols), omega (cols,))`` of one config."""
    d, width = B0.shape
    C0 = B_star.T @ B0
    outside = B0 - B_star @ C0
    U, s, Vt = np.linalg.svd(outside, full_matrices=False)
    kept = s > max(np.linalg.norm(B0, 2), 1e-300) * 1e-12  # below: rounding, no direction
    R0 = np.zeros((rows, width))
    used = min(rows, s.size)
    R0[:used] = (s[:used, None] * Vt[:used]) * kept[:used, None]
    Q_perp = np.zeros((d, rows))
    Q_perp[:, :used] = U[:, :used] * kept[:used]  # unused directions: zero columns
    G0 = np.concatenate([C0, R0])
    if cols == width:
        V = np.eye(width)
    else:  # orthonormal basis of a cols-dimensional space containing rows(G0) and w0
        _, _, Vt_all = np.linalg.svd(np.concatenate([G0, w0[None]]), full_matrices=True)
        V = Vt_all[:cols].T
    return Q_perp, V, G0 @ V, V.T @ w0


def coordinates(
    B_star: np.ndarray,
    B0: np.ndarray,
    w0: np.ndarray | None = None,
    *,
    keep_basis: bool = True,
    dtype: np.dtype | str = np.float64,
) -> tuple[Frame, InfiniteTaskState]:
    """The frame and initial coordinates of ``(B_0, w_0)`` for each configuration.

    **Arguments:** ``B_star`` (d, k) orthonormal; ``B0`` (b, d, k') or (d, k'); ``w0`` (b, k')
    or (k',), default 0. ``keep_basis=False`` drops ``Q_perp`` (b, d, r), which is only needed
    to reconstruct ``B`` and is large for large ``d``. ``r = min(d - k, k')`` and
    ``p = min(k + r + 1, k')`` for every configuration (unused directions are zero). Costs
    ``O(b d k'^2)`` once.
    """
    B0 = np.asarray(B0, dtype=np.float64)
    B0 = B0[None] if B0.ndim == 2 else B0
    b, d, width = B0.shape
    k = B_star.shape[1]
    w0 = np.zeros((b, width)) if w0 is None else np.broadcast_to(
        np.asarray(w0, dtype=np.float64), (b, width))
    rows = min(d - k, width)
    cols = min(k + rows + 1, width)
    parts = [_one_frame(B_star, B0[i], w0[i], rows, cols) for i in range(b)]
    Q_perp = np.stack([part[0] for part in parts]) if keep_basis else None
    V = np.stack([part[1] for part in parts])
    state = InfiniteTaskState(np.stack([part[2] for part in parts]).astype(dtype),
                            np.stack([part[3] for part in parts]).astype(dtype))
    return Frame(B_star, Q_perp, V), state


def check_shape(state: InfiniteTaskState, shape: tuple[int, int, int]) -> None:
    """Refuse a state whose ``H`` is not ``shape`` = (b, q, p) or whose ``omega`` is not
    (b, p)."""
    b, _, p = shape
    if tuple(state.H.shape) != shape or tuple(state.omega.shape) != (b, p):
        raise ArgumentError("state", f"shapes {tuple(state.H.shape)}, "
                            f"{tuple(state.omega.shape)} do not match {shape}")


class _StateViews:
    """A state and the views of it that one step reads or writes."""

    def __init__(self, H: Array, omega: Array, k: int):
        xp = array_namespace(H)
        self.state = InfiniteTaskState(H, omega)
        self.H, self.H_T = H, xp.transpose(H, (0, 2, 1))
        self.C = H[:, :k]
        self.C_flat = self.C.reshape(H.shape[0], 1, k * H.shape[2])
        self.H_flat = H.reshape(H.shape[0], 1, H.shape[1] * H.shape[2])
        self.H_flat_T = xp.transpose(self.H_flat, (0, 2, 1))
        self.omega_col, self.omega_row = omega[:, :, None], omega[:, None, :]


class _Workspace:
    """Preallocated arrays of one step (of namespace ``xp``), and two output state buffers
    used in turn."""

    def __init__(self, b: int, rows: int, p: int, k: int, dtype: np.dtype, xp: Any):
        def empty(*shape: int) -> Array:
            return xp.empty(shape, dtype=dtype)

        self.N, self.M, self.T = empty(b, p, p), empty(b, p, p), empty(b, p, p)
        self.M_diag = self.M.reshape(b, p * p)[:, :: p + 1]
        self.N_flat, self.M_flat = self.N.reshape(b, 1, p * p), self.M.reshape(b, p * p, 1)
        self.n, self.u, self.t = empty(b, 1, p), empty(b, 1, p), empty(b, 1, p)
        self.Y = empty(b, k + 2, p)  # Y^T of the class docstring, rows u, n, Sigma^{1/2} C
        self.Y_T = xp.transpose(self.Y, (0, 2, 1))
        self.Y_u, self.Y_n, self.Y_c = self.Y[:, 0:1], self.Y[:, 1:2], self.Y[:, 2:]
        self.s = empty(b, 1, 1)
        self.E = empty(b, k, p)
        self.E_flat = self.E.reshape(b, k * p, 1)
        self.dots = empty(b, 1, 1)
        self.buffers = [_StateViews(empty(b, rows, p), empty(b, p), k) for _ in range(2)]


class Block(NamedTuple):
    """``count`` outer steps of ``b`` configurations (:meth:`ExactFOANIL.advance`): the state
    after them, each configuration's loss at the state before each step, ``losses``
    (count, b) in float64, and whether the state after each step is finite, ``finite``
    (count, b) (:meth:`InfiniteTaskState.finite`'s test)."""

    state: InfiniteTaskState
    losses: np.ndarray
    finite: np.ndarray


def _advance_into(H: np.ndarray, omega: np.ndarray, S_c: np.ndarray, S_e: np.ndarray,
                  beta: np.ndarray, k0: np.ndarray, neg_k1: np.ndarray, neg_alpha: np.ndarray,
                  loss_beta: np.ndarray, loss_const: np.ndarray, k: int, losses: np.ndarray,
                  finite: np.ndarray) -> None:
    """``losses.shape[0]`` expected FO-ANIL steps of each configuration ``c`` of ``H``
    (b, q, p) and ``omega`` (b, p), in place (the formulas of :class:`ExactFOANIL`)::

        N = H^T H,  n = N omega,  u = omega - alpha n,  C = H[:k],
        M = I + s N - beta u u^T - k1 n n^T - (S_c C)^T (S_c C),   k1 = beta alpha^2 / m,
            s = -k1 (omega^T n + tr Sigma + sigma^2),
        E = alpha beta Sigma C,   H <- H M + [E; 0],   omega <- omega - beta N u,

    writing ``losses[t, c] = (||H||_F^2 - <N, M> - 2 <C, E>) / (2 beta) + loss_const`` (at the
    state before step ``t``) and ``finite[t, c]`` (whether the sum of the new ``H`` and
    ``omega`` is finite). Per configuration: ``beta``, ``k0 = tr Sigma + sigma^2``,
    ``neg_k1 = -k1`` and ``neg_alpha`` in the state's dtype; ``loss_beta`` (beta) and
    ``loss_const`` of the losses in float64.
    """
    b, _, p = H.shape
    for t in range(losses.shape[0]):
        for c in range(b):
            Hc, w = H[c], omega[c]
            C = Hc[:k]
            N = Hc.T @ Hc
            n = w @ N
            u = w + neg_alpha[c] * n
            Y = S_c[c] @ C
            s = (n @ w + k0[c]) * neg_k1[c]
            M = s * N - Y.T @ Y
            for i in range(p):
                u_i, n_i = beta[c] * u[i], -neg_k1[c] * n[i]
                for j in range(p):
                    M[i, j] -= u_i * u[j] + n_i * n[j]
                M[i, i] += 1.0
            E = S_e[c] @ C
            inner = np.sum(Hc * Hc) - np.sum(N * M) - 2.0 * np.sum(C * E)
            losses[t, c] = 0.5 * (inner / loss_beta[c] + loss_const[c])
            new = Hc @ M
            new[:k] += E
            new_w = w - beta[c] * (u @ N)
            finite[t, c] = np.isfinite(new.sum() + new_w.sum())
            H[c] = new
            omega[c] = new_w


@functools.cache
def _compiled_advance() -> Callable[..., None]:
    """:func:`_advance_into`, compiled (:func:`~metarep.core.compiled.compile_loop`)."""
    return compile_loop(_advance_into)


class ExactFOANIL:
    """The expected FO-ANIL step on infinitely many tasks, for ``b`` configurations at once.

    **Arguments:** ``Sigma_star`` (k, k); ``inner_lr`` (alpha > 0), ``outer_lr`` (beta > 0),
    ``m_in`` (>= 1, ``inf`` allowed) and ``noise_var`` (sigma^2 >= 0): scalars or (b,) arrays;
    ``shape`` the state's ``(b, k + r, p)``; ``dtype`` of the state; ``xp`` the array
    namespace the states live in (:mod:`numpy`, or torch tensors on a device:
    :func:`metarep.engine.arrays.torch_namespace`), the constants being computed in numpy float64
    and moved there once. The losses are numpy arrays either way. ``compiled`` (numpy only):
    step with the compiled loop :func:`_advance_into` instead.

    :meth:`step` maps a state to the next one (module docstring) and returns the expected
    meta-training loss at the *old* state, shape (b,) (or ``None`` with ``with_loss=False``).
    By default it is some twenty array operations on all ``b`` configurations at once,
    written into one of two preallocated buffers, never the one it reads: the returned state
    stays valid until the next-but-one call (copy it to keep it longer). With ``compiled`` it
    is :meth:`advance` by one step, each configuration computed alone in a loop that takes
    ``count`` steps per call: about 30 microseconds a step at ``d = k' = 50`` against about 60
    for the array operations, and no Python between two records of a run, but loading the
    compiled code costs a process about 0.9 s, and for many configurations at once the
    batched array operations are faster per configuration (measured on a 2-core host). With
    ``Y = sqrt(beta) [u, (alpha/sqrt(m)) n, alpha sqrt(1 + 1/m) C^T Sigma^{1/2}]`` (p, k + 2),
    ``M = I - beta Q = I - Y Y^T - beta alpha^2 ((w^T n + tr Sigma + sigma^2)/m) N``, the step
    is ``H <- H M + [alpha beta Sigma C; 0]`` and ``omega <- omega - beta N u``: two
    ``(k + r) p^2`` matrix products and about twenty small array operations.
    Tested against :func:`metarep.core.reference.expected_fo_anil_step`.
    """

    def __init__(
        self,
        Sigma_star: np.ndarray,
        inner_lr: float | Sequence[float] | np.ndarray,
        outer_lr: float | Sequence[float] | np.ndarray,
        m_in: float | Sequence[float] | np.ndarray,
        noise_var: float | Sequence[float] | np.ndarray,
        shape: tuple[int, int, int],
        dtype: np.dtype | str = np.float64,
        xp: Any = np,
        compiled: bool = False,
    ):
        b, rows, p = shape
        k = Sigma_star.shape[0]
        if compiled and xp is not np:
            raise ArgumentError("compiled", "the compiled loop computes on numpy arrays")
        self.shape, self.k, self.dtype, self.xp = shape, k, np.dtype(dtype), xp
        self.compiled = compiled
        alpha = per_config(inner_lr, b, "inner_lr", 0.0, strict=True)
        beta = per_config(outer_lr, b, "outer_lr", 0.0, strict=True)
        m = per_config(m_in, b, "m_in", 1.0, strict=False)
        noise = per_config(noise_var, b, "noise_var", 0.0, strict=False)
        inv_m = np.where(np.isinf(m), 0.0, 1.0 / m)
        self.alpha, self.beta, self.m_in, self.noise_var = alpha, beta, m, noise
        self.Sigma_star = np.asarray(Sigma_star, dtype=np.float64)
        values, vectors = np.linalg.eigh(self.Sigma_star)
        root = (vectors * np.sqrt(np.clip(values, 0.0, None))) @ vectors.T
        trace = float(np.trace(self.Sigma_star))

        def col(x: np.ndarray) -> Array:
            return xp.ascontiguousarray(np.reshape(x, (b, 1, 1)), dtype=self.dtype)

        self._neg_alpha, self._beta, self._sqrt_beta = col(-alpha), col(beta), col(np.sqrt(beta))
        self._c_n = col(np.sqrt(beta * inv_m) * alpha)
        self._k0 = col(trace + noise)
        self._neg_k1 = col(-beta * alpha**2 * inv_m)
        scale = np.sqrt(beta * (1 + inv_m)) * alpha
        self._S_c = xp.asarray((scale[:, None, None] * root).astype(self.dtype))  # symmetric
        self._S_e = xp.asarray(((alpha * beta)[:, None, None] * self.Sigma_star)
                               .astype(self.dtype))
        self._loss_const = trace + noise
        if compiled:  # the same constants, one per configuration, as the compiled loop reads
            self._kernel_constants = (
                self._S_c, self._S_e,
                *(np.ascontiguousarray(x.reshape(b)) for x in (self._beta, self._k0,
                                                                self._neg_k1, self._neg_alpha)),
                beta, np.ascontiguousarray(self._loss_const, dtype=np.float64))
        else:
            self._work = _Workspace(b, rows, p, k, self.dtype, xp)

    def _views(self, state: InfiniteTaskState) -> _StateViews:
        for buffer in self._work.buffers:
            if state.H is buffer.H and state.omega is buffer.state.omega:
                return buffer
        check_shape(state, self.shape)
        xp = self.xp
        return _StateViews(xp.ascontiguousarray(state.H, dtype=self.dtype),
                           xp.ascontiguousarray(state.omega, dtype=self.dtype), self.k)

    def _prepare(self, old: _StateViews) -> None:
        """Fill the workspace: ``N, n, u, Y, M = I - beta Q, E = alpha beta Sigma C``."""
        w, xp = self._work, self.xp
        xp.matmul(old.H_T, old.H, out=w.N)                       # N = H^T H
        xp.matmul(old.omega_row, w.N, out=w.n)                   # n^T = w^T N
        xp.multiply(w.n, self._neg_alpha, out=w.u)
        xp.add(w.u, old.omega_row, out=w.u)                      # u^T = (w - alpha n)^T
        xp.multiply(w.u, self._sqrt_beta, out=w.Y_u)
        xp.multiply(w.n, self._c_n, out=w.Y_n)
        xp.matmul(self._S_c, old.C, out=w.Y_c)                   # Sigma^{1/2} C, scaled
        xp.matmul(w.n, old.omega_col, out=w.s)                   # w^T N w
        xp.add(w.s, self._k0, out=w.s)
        xp.multiply(w.s, self._neg_k1, out=w.s)                  # -beta alpha^2 c / m
        xp.multiply(w.N, w.s, out=w.M)
        xp.add(w.M_diag, 1.0, out=w.M_diag)
        xp.matmul(w.Y_T, w.Y, out=w.T)
        xp.subtract(w.M, w.T, out=w.M)                           # M = I - beta Q
        xp.matmul(self._S_e, old.C, out=w.E)                     # alpha beta Sigma C

    def advance(self, state: InfiniteTaskState, count: int) -> Block:
        """``count >= 0`` expected outer steps of every configuration from ``state`` (numpy
        arrays; left unchanged), by the compiled loop :func:`_advance_into` (``compiled``
        dynamics only): the new state, the losses and the finiteness after each step
        (:class:`Block`). Advancing by ``j`` and then by ``count - j`` steps gives the numbers
        of advancing by ``count``, and of ``count`` calls of :meth:`step`."""
        if not self.compiled:
            raise ArgumentError("compiled", "advance needs ExactFOANIL(..., compiled=True)")
        check_shape(state, self.shape)
        H = np.array(state.H, dtype=self.dtype, order="C")
        omega = np.array(state.omega, dtype=self.dtype, order="C")
        losses = np.empty((count, self.shape[0]))
        finite = np.empty((count, self.shape[0]), dtype=bool)
        _compiled_advance()(H, omega, *self._kernel_constants, self.k, losses, finite)
        return Block(InfiniteTaskState(H, omega), losses, finite)

    def step(
        self, state: InfiniteTaskState, *, with_loss: bool = True
    ) -> tuple[InfiniteTaskState, np.ndarray | None]:
        """One expected outer step of every configuration (see the class docstring)."""
        if self.compiled:
            block = self.advance(state, 1)
            return block.state, (block.losses[0] if with_loss else None)
        w, xp = self._work, self.xp
        old = self._views(state)
        new = w.buffers[1] if old is w.buffers[0] else w.buffers[0]
        self._prepare(old)
        xp.matmul(old.H, w.M, out=new.H)
        xp.add(new.C, w.E, out=new.C)                            # H M + [alpha beta Sigma C; 0]
        xp.matmul(w.u, w.N, out=w.t)
        xp.multiply(w.t, self._beta, out=w.t)
        xp.subtract(old.omega_row, w.t, out=new.omega_row)      # w - beta N u
        return new.state, (self._loss(old) if with_loss else None)

    def _loss(self, old: _StateViews) -> np.ndarray:
        """Expected meta-training loss at ``old`` from the prepared workspace:
        ``tr(N Q) = (tr N - <N, M>) / beta`` and ``alpha tr(Sigma C C^T) = <C, E> / beta``."""
        w, xp = self._work, self.xp
        inner = xp.matmul(old.H_flat, old.H_flat_T)[:, 0, 0]   # tr N = ||H||_F^2
        inner -= xp.matmul(w.N_flat, w.M_flat, out=w.dots)[:, 0, 0]
        inner -= 2 * xp.matmul(old.C_flat, w.E_flat, out=w.dots)[:, 0, 0]
        return 0.5 * (to_numpy(inner) / self.beta + self._loss_const)

    def expected_loss(self, state: InfiniteTaskState) -> np.ndarray:
        """Expected meta-training loss of ``state``, shape (b,); writes no state buffer."""
        if self.compiled:
            return self.advance(state, 1).losses[0]
        old = self._views(state)
        self._prepare(old)
        return self._loss(old)


class ExactInnerLoop:
    """The exact expected outer step of any inner-loop method on infinitely many tasks
    (ANIL, FO-MAML, MAML, FO-ANIL with several inner steps), ``b`` configurations at once,
    with the interface of :class:`ExactFOANIL`: ``H <- H - beta G_B``, ``omega <- omega -
    beta g_w`` with the expected gradients of
    :class:`metarep.core.expected_steps.ExpectedGradients` (built by the Gaussian-moment
    engine of :mod:`metarep.core.moments`; derivations in ``docs/infinite_tasks.md``).

    **Arguments:** ``method``, ``inner_steps`` (:func:`metarep.core.expected_steps.check_exact`
    says which are built); ``d`` the input dimension, which MAML's and FO-MAML's steps
    depend on (the body's inner step moves it out of the inputs' span by a d-dimensional
    amount); the rest as for :class:`ExactFOANIL`. Each step returns a new state.
    """

    def __init__(self, method: str, inner_steps: int, d: int, Sigma_star: np.ndarray,
                 inner_lr: float | Sequence[float] | np.ndarray,
                 outer_lr: float | Sequence[float] | np.ndarray,
                 m_in: float | Sequence[float] | np.ndarray,
                 noise_var: float | Sequence[float] | np.ndarray,
                 shape: tuple[int, int, int], dtype: np.dtype | str = np.float64,
                 xp: Any = np):
        b = shape[0]
        check_exact(method, inner_steps)
        if xp is not np:
            raise ArgumentError("xp", "the exact steps of methods other than one-step "
                                "FO-ANIL compute in numpy")
        self.method, self.inner_steps, self.d = method, inner_steps, d
        self.shape, self.dtype, self.xp = shape, np.dtype(dtype), xp
        self.Sigma_star = np.asarray(Sigma_star, dtype=np.float64)
        self.alpha = per_config(inner_lr, b, "inner_lr", 0.0, strict=True)
        self.beta = per_config(outer_lr, b, "outer_lr", 0.0, strict=True)
        self.m_in = per_config(m_in, b, "m_in", 1.0, strict=False)
        self.noise_var = per_config(noise_var, b, "noise_var", 0.0, strict=False)
        self.gradients = ExpectedGradients(method, inner_steps, d, self.Sigma_star, self.alpha,
                                           self.m_in, self.noise_var, shape, self.dtype)
        self._beta = self.beta.reshape(b, 1, 1).astype(self.dtype)

    def _checked(self, state: InfiniteTaskState) -> tuple[np.ndarray, np.ndarray]:
        check_shape(state, self.shape)
        return (np.ascontiguousarray(state.H, dtype=self.dtype),
                np.ascontiguousarray(state.omega, dtype=self.dtype))

    def step(
        self, state: InfiniteTaskState, *, with_loss: bool = True
    ) -> tuple[InfiniteTaskState, np.ndarray | None]:
        """One expected outer step of every configuration, and the expected meta-training
        loss at the old state (b,)."""
        H, omega = self._checked(state)
        body, head, loss = self.gradients(H, omega)
        new = InfiniteTaskState(H - self._beta * body, omega - self._beta[:, :, 0] * head)
        return new, (loss if with_loss else None)

    def expected_loss(self, state: InfiniteTaskState) -> np.ndarray:
        """Expected meta-training loss of ``state``, shape (b,)."""
        return self.gradients(*self._checked(state))[2]


ExactDynamics = ExactFOANIL | ExactInnerLoop
"""The exact infinite-task dynamics of one method (:func:`exact_dynamics`)."""


def exact_dynamics(method: str, inner_steps: int, d: int, Sigma_star: np.ndarray,
                   inner_lr: float | Sequence[float] | np.ndarray,
                   outer_lr: float | Sequence[float] | np.ndarray,
                   m_in: float | Sequence[float] | np.ndarray,
                   noise_var: float | Sequence[float] | np.ndarray,
                   shape: tuple[int, int, int], dtype: np.dtype | str = np.float64,
                   xp: Any = np, compiled: bool = False) -> ExactDynamics:
    """The exact expected step of ``method`` with ``inner_steps`` inner steps: FO-ANIL with one
    inner step is the closed form :class:`ExactFOANIL` (about 20 small array operations, or
    its compiled loop with ``compiled``); every other method or number of steps the
    Gaussian-moment engine, :class:`ExactInnerLoop` (``compiled`` does not apply). Both are
    the same expectation for FO-ANIL with one step (tested to rounding)."""
    if method == "fo-anil" and inner_steps == 1:
        return ExactFOANIL(Sigma_star, inner_lr, outer_lr, m_in, noise_var, shape, dtype, xp,
                           compiled)
    return ExactInnerLoop(method, inner_steps, d, Sigma_star, inner_lr, outer_lr, m_in,
                          noise_var, shape, dtype, xp)


def lambda_stars(dynamics: ExactDynamics, width: int | None = None) -> list[np.ndarray | None]:
    """The limit of ``B_star^T B_t B_t^T B_star`` of each configuration, (k, k) each:
    ``Lambda_star`` (:func:`metarep.core.theory.lambda_star` with the configuration's
    ``sigma^2``, ``m_in`` and ``alpha``) for ``k' >= k`` (or ``width=None``), its top-k'
    eigen-part for ``k' = width < k`` (:func:`metarep.core.theory.top_part`; ``None`` where
    that part is not unique)."""
    k = dynamics.Sigma_star.shape[0]
    rank = k if width is None else width
    return [top_part(lambda_star(Problem(np.eye(k), dynamics.Sigma_star, float(s2)), float(m),
                                 float(a)), rank)
            for a, m, s2 in zip(dynamics.alpha, dynamics.m_in, dynamics.noise_var, strict=True)]


def coordinate_measures(
    state: InfiniteTaskState, Sigma_star: np.ndarray,
    Lambda_star: Sequence[np.ndarray | None] | np.ndarray,
    indices: Sequence[int] | None = None,
) -> list[dict[str, float]]:
    """The measures of :func:`metarep.core.measures.measure` (``perp_norm``,
    ``perp_norm_fro``, ``subspace_dist``, ``span_outside``, ``span_missed``, ``lambda_err``,
    ``head_norm``, ``sv_*``, in that order) of each configuration, computed from the
    coordinates (no d-sized work) for all configurations at once (stacked SVDs and norms):
    ``H`` against ``B_star = [I_k; 0]``. Exact: each is invariant under the orthonormal maps of
    ``B = [B_star, Q_perp] H V^T`` (norms of projections, principal angles, singular values;
    the numerical rank of :func:`metarep.core.measures.span_measures` sees the same singular
    values). In these coordinates the part of ``H`` outside span(B_star) is its last rows
    ``H_perp``, and with ``U_B`` the top ``r = min(k, rank)`` left singular vectors,
    ``span_outside = ||U_B[k:]||_2`` and ``span_missed = ||[I_k; 0] - U_B U_B[:k]^T||_2``.
    ``Lambda_star``: per configuration the (k, k) target of ``lambda_err``, or ``None`` (then
    ``lambda_err`` is ``nan``); ``indices`` restricts to those configurations, in that order.
    """
    k = Sigma_star.shape[0]
    chosen = list(range(state.H.shape[0])) if indices is None else list(indices)
    H = np.asarray(state.H, dtype=np.float64)[chosen]
    omega = np.asarray(state.omega, dtype=np.float64)[chosen]
    U, singular, _ = np.linalg.svd(H, full_matrices=False)
    perp = H[:, k:, :]
    columns = {"perp_norm": _spectral_norms(perp), "perp_norm_fro": np.linalg.norm(perp,
                                                                                  axis=(1, 2))}
    columns.update(_coordinate_spans(U, singular, k))
    gram = H[:, :k, :] @ np.swapaxes(H[:, :k, :], 1, 2)  # B_star^T B B^T B_star
    targets = [Lambda_star[i] for i in chosen]
    with_target = [j for j, target in enumerate(targets) if target is not None]
    columns["lambda_err"] = np.full(len(chosen), np.nan)
    if with_target:
        columns["lambda_err"][with_target] = _spectral_norms(
            gram[with_target] - np.stack([targets[j] for j in with_target]))
    columns["head_norm"] = np.linalg.norm(omega, axis=1)
    for i in range(singular.shape[1]):
        columns[f"sv_{i + 1}"] = singular[:, i]
    order = [*TRUTH_MEASURES, "head_norm", *(f"sv_{i + 1}" for i in range(singular.shape[1]))]
    return [{name: float(columns[name][j]) for name in order} for j in range(len(chosen))]


def _spectral_norms(M: np.ndarray) -> np.ndarray:
    """``||M_j||_2`` of a stack ``M`` (b, p, q); zeros for empty matrices."""
    if M.shape[1] == 0 or M.shape[2] == 0:
        return np.zeros(M.shape[0])
    return np.linalg.norm(M, 2, axis=(1, 2))


def _coordinate_spans(U: np.ndarray, singular: np.ndarray, k: int) -> dict[str, np.ndarray]:
    """``subspace_dist``, ``span_outside``, ``span_missed``
    (:func:`metarep.core.measures.span_measures`) of each configuration from the stacked thin
    SVD of its coordinates ``H`` (``U`` (b, k + r, p), ``singular`` (b, p)), grouped by the
    rank ``r = min(k, numerical rank)`` of each."""
    b = U.shape[0]
    ranks = np.array([min(k, numerical_rank(values)) for values in singular])
    outside, missed = np.zeros(b), np.ones(b)
    for r in np.unique(ranks):
        group = np.flatnonzero(ranks == r)
        if r == 0:
            continue
        top = U[group, :, :r]
        outside[group] = np.minimum(1.0, _spectral_norms(top[:, k:, :]))
        if r == k:
            frame = np.eye(U.shape[1], k)
            missed[group] = np.minimum(1.0, _spectral_norms(
                frame - top @ np.swapaxes(top[:, :k, :], 1, 2)))
    full = ranks == k
    return {"subspace_dist": np.where(full, outside, 1.0), "span_outside": outside,
            "span_missed": np.where(full, missed, 1.0)}


def undriven_perp_norm(state: InfiniteTaskState, k: int) -> np.ndarray:
    """``||B_perp^T B P||_2`` per configuration, ``P`` the projector onto the kernel of
    ``C = B_star^T B``: the part of the orthogonal complement that the task signal does not
    drive. From ``w = 0`` with ``m_in = inf`` it is conserved exactly (docs/infinite_tasks.md),
    so at ``t = 0`` it predicts the limit of ``perp_norm``. **Returns:** (b,)."""
    out = []
    for H in state.H.astype(np.float64):
        C, R = H[:k], H[k:]
        _, s, Vt = np.linalg.svd(C, full_matrices=True)
        rank = int(np.sum(s > s.max(initial=0.0) * 1e-10)) if s.size else 0
        kernel = Vt[rank:]
        out.append(float(np.linalg.norm(R @ kernel.T, 2)) if kernel.size and R.size else 0.0)
    return np.array(out)


def expected_update(
    params: LinearParams, problem: Problem, inner_lr: float, outer_lr: float, m_in: float,
    method: str = "fo-anil", inner_steps: int = 1,
) -> tuple[LinearParams, float]:
    """The exact expected update ``(E[B+] - B, E[w+] - w)`` in R^d of ``method`` with
    ``inner_steps`` inner steps (:func:`exact_dynamics`) from ``params`` (one configuration),
    and the expected meta-training loss at ``params``. Tested against
    :func:`metarep.core.reference.expected_fo_anil_step` and against
    :func:`metarep.core.monte_carlo.monte_carlo_update` of every method."""
    frame, state = coordinates(problem.B_star, params.B, params.w)
    dynamics = exact_dynamics(method, inner_steps, problem.d, problem.Sigma_star, inner_lr,
                              outer_lr, m_in, problem.noise_var, state.H.shape)
    new, loss = dynamics.step(state)
    after = frame.params(new)
    return LinearParams(after.B - params.B, after.w - params.w), float(loss[0])
