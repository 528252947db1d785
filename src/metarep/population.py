"""Exact infinite-task dynamics of FO-ANIL, batched over configurations (spec sections 1, 4).

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
when asked (:meth:`Frame.params`). Every measure of :mod:`metarep.metrics` is invariant under
these orthonormal changes of basis, so it is computed from ``H`` with ``B_star = [I_k; 0]``.

**Batches.** All arrays carry a leading configuration axis ``b``: each configuration has its
own ``alpha``, ``beta``, ``m_in`` (finite or inf), ``sigma^2`` and initial state; ``d``, ``k``,
``k'`` and ``Sigma_star`` are shared. Python API:

- :func:`coordinates` -> (:class:`Frame`, :class:`PopulationState`) from ``B_0``, ``w_0``;
- :class:`ExactFOANIL`: the batched expected step (``step(state) -> (state, loss)``);
- :func:`measures`, :func:`undriven_perp_norm`, :meth:`Frame.params` (reconstruct B, w);
- :class:`InfiniteTaskMethod` and :class:`RunState`: one configuration as a method of a run
  (``tasks.n: infinite`` in :mod:`metarep.experiments`);
- :func:`grid` and :func:`simulate_batch`: many configurations in one vectorised computation,
  returning a DataFrame with a ``config`` column, e.g.
  ``simulate_batch(problem, grid(inner_lr=[0.1, 0.2], m_in=[10, inf], seed=[0, 1]),
  width=50, init_scale=0.1, steps=10_000, record_every=100)``;
- :func:`expected_update` (the exact update of ``(B, w)`` in R^d) and
  :func:`monte_carlo_update`: mean and standard error of the update of *any* finite-pool
  method (``step(params, batch)``) over many batches of fresh tasks, for methods whose
  expectation has no closed form here.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import pandas as pd

from metarep.algorithms import Method
from metarep.metrics import measure
from metarep.models import LinearParams, init_linear
from metarep.seeding import Purpose, seed_rng
from metarep.tasks import Problem, sample_tasks
from metarep.theory import lambda_star
from metarep.training import EXPLOSION_FACTOR, record_steps

GRID_COLUMNS = ("inner_lr", "outer_lr", "m_in", "noise_var", "seed")


class PopulationState(NamedTuple):
    """Coordinates of a batch of ``b`` configurations: ``H`` (b, k + r, p), ``omega`` (b, p).

    ``B = [B_star, Q_perp] H V^T`` and ``w = V omega`` (see the module docstring); the first
    k rows of ``H`` are ``C V = B_star^T B V``, the others ``R V``.
    """

    H: np.ndarray
    omega: np.ndarray

    def finite(self) -> np.ndarray:
        """Per configuration, shape (b,), whether every entry is finite (checked through one
        sum, which is also non-finite for entries so large that the sum overflows: a diverged
        state either way)."""
        return np.isfinite(self.H.sum(axis=(1, 2)) + self.omega.sum(axis=1))

    def is_finite(self) -> bool:
        """Whether every entry of every configuration is finite (:meth:`finite`)."""
        return bool(self.finite().all())


@dataclass(frozen=True)
class Frame:
    """The orthonormal bases that map coordinates back to R^d and R^{k'}.

    ``B_star`` (d, k); ``Q_perp`` (b, d, r) or ``None`` when not kept (then :meth:`params`
    is unavailable); ``V`` (b, k', p).
    """

    B_star: np.ndarray
    Q_perp: np.ndarray | None
    V: np.ndarray

    def params(self, state: PopulationState, index: int = 0) -> LinearParams:
        """``(B, w)`` of configuration ``index``: ``B = B_star C V^T + Q_perp R V^T``."""
        if self.Q_perp is None:
            raise ValueError("this frame was built without Q_perp (keep_basis=False)")
        k = self.B_star.shape[1]
        H, V = state.H[index], self.V[index]
        B = (self.B_star @ H[:k] + self.Q_perp[index] @ H[k:]) @ V.T
        return LinearParams(B, V @ state.omega[index])

    def state(self, params: Sequence[LinearParams]) -> PopulationState:
        """The coordinates of ``(B, w)`` for each configuration (the inverse of
        :meth:`params` for parameters on this frame's trajectories)."""
        if self.Q_perp is None:
            raise ValueError("this frame was built without Q_perp (keep_basis=False)")
        H = np.stack([
            np.concatenate([self.B_star.T @ p.B, self.Q_perp[i].T @ p.B]) @ self.V[i]
            for i, p in enumerate(params)])
        omega = np.stack([self.V[i].T @ p.w for i, p in enumerate(params)])
        return PopulationState(H, omega)


def _one_frame(
    B_star: np.ndarray, B0: np.ndarray, w0: np.ndarray, rows: int, cols: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """``(Q_perp (d, rows), V (k', cols), H (k + rows, cols), omega (cols,))`` of one config."""
    d, width = B0.shape
    C0 = B_star.T @ B0
    outside = B0 - B_star @ C0
    U, s, Vt = np.linalg.svd(outside, full_matrices=False)
    kept = s > max(s.max(initial=0.0), 1e-300) * 1e-12
    R0 = np.zeros((rows, width))
    used = min(rows, s.size)
    R0[:used] = (s[:used, None] * Vt[:used]) * kept[:used, None]
    Q_perp = np.zeros((d, rows))
    Q_perp[:, :used] = U[:, :used]
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
) -> tuple[Frame, PopulationState]:
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
    state = PopulationState(np.stack([part[2] for part in parts]).astype(dtype),
                            np.stack([part[3] for part in parts]).astype(dtype))
    return Frame(B_star, Q_perp, V), state


def _per_config(value: float | Sequence[float] | np.ndarray, b: int, key: str,
                lo: float, strict: bool) -> np.ndarray:
    """``value`` broadcast to (b,) float64, checked ``> lo`` (``strict``) or ``>= lo``."""
    array = np.broadcast_to(np.asarray(value, dtype=np.float64), (b,)).copy()
    bad = np.isnan(array) | ((array <= lo) if strict else (array < lo))
    if np.any(bad):
        raise ValueError(f"{key} must be {'>' if strict else '>='} {lo}, got {array[bad][0]}")
    return array


class _StateViews:
    """A state and the views of it that one step reads or writes."""

    def __init__(self, H: np.ndarray, omega: np.ndarray, k: int):
        self.state = PopulationState(H, omega)
        self.H, self.H_T = H, H.transpose(0, 2, 1)
        self.C = H[:, :k]
        self.C_flat = self.C.reshape(H.shape[0], 1, k * H.shape[2])
        self.H_flat = H.reshape(H.shape[0], 1, H.shape[1] * H.shape[2])
        self.H_flat_T = self.H_flat.transpose(0, 2, 1)
        self.omega_col, self.omega_row = omega[:, :, None], omega[:, None, :]


class _Workspace:
    """Preallocated arrays of one step, and two output state buffers used in turn."""

    def __init__(self, b: int, rows: int, p: int, k: int, dtype: np.dtype):
        def empty(*shape: int) -> np.ndarray:
            return np.empty(shape, dtype=dtype)

        self.N, self.M, self.T = empty(b, p, p), empty(b, p, p), empty(b, p, p)
        self.M_diag = self.M.reshape(b, p * p)[:, :: p + 1]
        self.N_flat, self.M_flat = self.N.reshape(b, 1, p * p), self.M.reshape(b, p * p, 1)
        self.n, self.u, self.t = empty(b, 1, p), empty(b, 1, p), empty(b, 1, p)
        self.Y = empty(b, k + 2, p)  # Y^T of the class docstring, rows u, n, Sigma^{1/2} C
        self.Y_T = self.Y.transpose(0, 2, 1)
        self.Y_u, self.Y_n, self.Y_c = self.Y[:, 0:1], self.Y[:, 1:2], self.Y[:, 2:]
        self.s = empty(b, 1, 1)
        self.E = empty(b, k, p)
        self.E_flat = self.E.reshape(b, k * p, 1)
        self.dots = empty(b, 1, 1)
        self.buffers = [_StateViews(empty(b, rows, p), empty(b, p), k) for _ in range(2)]


class ExactFOANIL:
    """The expected FO-ANIL step on infinitely many tasks, for ``b`` configurations at once.

    **Arguments:** ``Sigma_star`` (k, k); ``inner_lr`` (alpha > 0), ``outer_lr`` (beta > 0),
    ``m_in`` (>= 1, ``inf`` allowed) and ``noise_var`` (sigma^2 >= 0): scalars or (b,) arrays;
    ``shape`` the state's ``(b, k + r, p)``; ``dtype`` of the state.

    :meth:`step` maps a state to the next one (module docstring) and returns the expected
    meta-training loss at the *old* state, shape (b,) (or ``None`` with ``with_loss=False``).
    For speed it writes into one of two preallocated buffers, never the one it reads: the
    returned state stays valid until the next-but-one call (copy it to keep it longer). With
    ``Y = sqrt(beta) [u, (alpha/sqrt(m)) n, alpha sqrt(1 + 1/m) C^T Sigma^{1/2}]`` (p, k + 2),
    ``M = I - beta Q = I - Y Y^T - beta alpha^2 ((w^T n + tr Sigma + sigma^2)/m) N``, the step
    is ``H <- H M + [alpha beta Sigma C; 0]`` and ``omega <- omega - beta N u``: two
    ``(k + r) p^2`` matrix products and about twenty small array operations.
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
    ):
        b, rows, p = shape
        k = Sigma_star.shape[0]
        self.shape, self.k, self.dtype = shape, k, np.dtype(dtype)
        alpha = _per_config(inner_lr, b, "inner_lr", 0.0, strict=True)
        beta = _per_config(outer_lr, b, "outer_lr", 0.0, strict=True)
        m = _per_config(m_in, b, "m_in", 1.0, strict=False)
        noise = _per_config(noise_var, b, "noise_var", 0.0, strict=False)
        inv_m = np.where(np.isinf(m), 0.0, 1.0 / m)
        self.alpha, self.beta, self.m_in, self.noise_var = alpha, beta, m, noise
        self.Sigma_star = np.asarray(Sigma_star, dtype=np.float64)
        values, vectors = np.linalg.eigh(self.Sigma_star)
        root = (vectors * np.sqrt(np.clip(values, 0.0, None))) @ vectors.T
        trace = float(np.trace(self.Sigma_star))

        def col(x: np.ndarray) -> np.ndarray:
            return np.ascontiguousarray(np.reshape(x, (b, 1, 1)), dtype=self.dtype)

        self._neg_alpha, self._beta, self._sqrt_beta = col(-alpha), col(beta), col(np.sqrt(beta))
        self._c_n = col(np.sqrt(beta * inv_m) * alpha)
        self._k0 = col(trace + noise)
        self._neg_k1 = col(-beta * alpha**2 * inv_m)
        scale = np.sqrt(beta * (1 + inv_m)) * alpha
        self._S_c = (scale[:, None, None] * root).astype(self.dtype)  # Sigma^{1/2} symmetric
        self._S_e = ((alpha * beta)[:, None, None] * self.Sigma_star).astype(self.dtype)
        self._loss_const = trace + noise
        self._work = _Workspace(b, rows, p, k, self.dtype)

    def _views(self, state: PopulationState) -> _StateViews:
        for buffer in self._work.buffers:
            if state.H is buffer.H and state.omega is buffer.state.omega:
                return buffer
        b, _, p = self.shape
        if state.H.shape != self.shape or state.omega.shape != (b, p):
            raise ValueError(f"state of shapes {state.H.shape}, {state.omega.shape} does not "
                             f"match {self.shape}")
        return _StateViews(np.ascontiguousarray(state.H, dtype=self.dtype),
                           np.ascontiguousarray(state.omega, dtype=self.dtype), self.k)

    def _prepare(self, old: _StateViews) -> None:
        """Fill the workspace: ``N, n, u, Y, M = I - beta Q, E = alpha beta Sigma C``."""
        w = self._work
        np.matmul(old.H_T, old.H, out=w.N)                       # N = H^T H
        np.matmul(old.omega_row, w.N, out=w.n)                   # n^T = w^T N
        np.multiply(w.n, self._neg_alpha, out=w.u)
        np.add(w.u, old.omega_row, out=w.u)                      # u^T = (w - alpha n)^T
        np.multiply(w.u, self._sqrt_beta, out=w.Y_u)
        np.multiply(w.n, self._c_n, out=w.Y_n)
        np.matmul(self._S_c, old.C, out=w.Y_c)                   # Sigma^{1/2} C, scaled
        np.matmul(w.n, old.omega_col, out=w.s)                   # w^T N w
        np.add(w.s, self._k0, out=w.s)
        np.multiply(w.s, self._neg_k1, out=w.s)                  # -beta alpha^2 c / m
        np.multiply(w.N, w.s, out=w.M)
        np.add(w.M_diag, 1.0, out=w.M_diag)
        np.matmul(w.Y_T, w.Y, out=w.T)
        np.subtract(w.M, w.T, out=w.M)                           # M = I - beta Q
        np.matmul(self._S_e, old.C, out=w.E)                     # alpha beta Sigma C

    def step(
        self, state: PopulationState, *, with_loss: bool = True
    ) -> tuple[PopulationState, np.ndarray | None]:
        """One expected outer step of every configuration (see the class docstring)."""
        w = self._work
        old = self._views(state)
        new = w.buffers[1] if old is w.buffers[0] else w.buffers[0]
        self._prepare(old)
        np.matmul(old.H, w.M, out=new.H)
        np.add(new.C, w.E, out=new.C)                            # H M + [alpha beta Sigma C; 0]
        np.matmul(w.u, w.N, out=w.t)
        np.multiply(w.t, self._beta, out=w.t)
        np.subtract(old.omega_row, w.t, out=new.omega_row)      # w - beta N u
        return new.state, (self._loss(old) if with_loss else None)

    def _loss(self, old: _StateViews) -> np.ndarray:
        """Expected meta-training loss at ``old`` from the prepared workspace:
        ``tr(N Q) = (tr N - <N, M>) / beta`` and ``alpha tr(Sigma C C^T) = <C, E> / beta``."""
        w = self._work
        inner = np.matmul(old.H_flat, old.H_flat_T)[:, 0, 0]   # tr N = ||H||_F^2
        inner -= np.matmul(w.N_flat, w.M_flat, out=w.dots)[:, 0, 0]
        inner -= 2 * np.matmul(old.C_flat, w.E_flat, out=w.dots)[:, 0, 0]
        return 0.5 * (inner / self.beta + self._loss_const)

    def expected_loss(self, state: PopulationState) -> np.ndarray:
        """Expected meta-training loss of ``state``, shape (b,); writes no state buffer."""
        old = self._views(state)
        self._prepare(old)
        return self._loss(old)


def lambda_stars(dynamics: ExactFOANIL) -> np.ndarray:
    """``Lambda_star`` of each configuration, (b, k, k) (:func:`metarep.theory.lambda_star`)."""
    return np.stack([
        lambda_star(dynamics.Sigma_star, float(s2), float(m), float(a))
        for a, m, s2 in zip(dynamics.alpha, dynamics.m_in, dynamics.noise_var, strict=True)])


def measures(
    state: PopulationState, Sigma_star: np.ndarray, Lambda_star: np.ndarray,
    index: int | None = None,
) -> list[dict[str, float]]:
    """The measures of :func:`metarep.metrics.measure` (``head_norm``, ``perp_norm``,
    ``perp_norm_fro``, ``subspace_dist``, ``lambda_err``, ``sv_*``) of each configuration,
    computed from the coordinates (no d-sized work). ``Lambda_star`` (b, k, k); ``index``
    restricts to one configuration."""
    b, rows, _ = state.H.shape
    k = Sigma_star.shape[0]
    frame = Problem(np.eye(rows, k), Sigma_star, 0.0)
    chosen = range(b) if index is None else [index]
    return [measure(LinearParams(state.H[i].astype(np.float64),
                                 state.omega[i].astype(np.float64)), frame, Lambda_star[i])
            for i in chosen]


def undriven_perp_norm(state: PopulationState, k: int) -> np.ndarray:
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


class RunState:
    """The training state of one configuration in a run (:mod:`metarep.experiments`): its
    coordinates and the frame that maps them back to ``(B, w)``.

    ``B`` and ``w`` are reconstructed on access (O(d k'^2)); :meth:`arrays` gives them by name
    (``checkpoint.npz``, ``params.npz``) and :meth:`with_arrays` projects them back.
    """

    def __init__(self, coords: PopulationState, frame: Frame):
        self.coords, self.frame = coords, frame

    @property
    def B(self) -> np.ndarray:
        return self.frame.params(self.coords).B

    @property
    def w(self) -> np.ndarray:
        return self.frame.params(self.coords).w

    def arrays(self) -> dict[str, np.ndarray]:
        B, w = self.frame.params(self.coords)
        return {"B": B, "w": w}

    def with_arrays(self, arrays: Mapping[str, np.ndarray]) -> RunState:
        params = LinearParams(np.asarray(arrays["B"], np.float64),
                              np.asarray(arrays["w"], np.float64))
        coords = self.frame.state([params])
        return RunState(PopulationState(coords.H.astype(self.coords.H.dtype),
                                        coords.omega.astype(self.coords.omega.dtype)), self.frame)

    def is_finite(self) -> bool:
        return self.coords.is_finite()


class InfiniteTaskMethod:
    """Exact infinite-task FO-ANIL as a method of a run (``tasks.n: infinite``).

    Bound to the problem and the initialisation ``init = (B_0, w_0)``, whose frame it builds
    once: :meth:`init_state` -> :class:`RunState`, :meth:`step` ``(state, batch)`` (``batch``
    is ignored: every expectation is exact) and :meth:`measure` (coordinates only). ``name``
    is the configured method (``fo-anil``, or ``fo-maml`` from ``w_0 = 0``, identical then).
    """

    def __init__(self, name: str, problem: Problem, init: LinearParams, inner_lr: float,
                 outer_lr: float, m_in: float, dtype: np.dtype | str = np.float64):
        self.name = name
        self.frame, self.initial = coordinates(problem.B_star, init.B, init.w, dtype=dtype)
        self.dynamics = ExactFOANIL(problem.Sigma_star, inner_lr, outer_lr, m_in,
                                    problem.noise_var, self.initial.H.shape, dtype)
        self.Lambda_star = lambda_stars(self.dynamics)
        self.Sigma_star = problem.Sigma_star

    def init_state(self, params: LinearParams, n_tasks: int = 0) -> RunState:
        """The coordinates of ``params`` (the initialisation this method was built with)."""
        return RunState(self.initial, self.frame).with_arrays({"B": params.B, "w": params.w})

    def step(self, state: RunState, batch: object = None) -> tuple[RunState, float]:
        new, loss = self.dynamics.step(state.coords)
        return RunState(new, self.frame), float(loss[0])

    def measure(self, state: RunState) -> dict[str, float]:
        return measures(state.coords, self.Sigma_star, self.Lambda_star)[0]

    def predicted_perp_limit(self) -> float | None:
        """The limit of ``perp_norm`` predicted from the initialisation: 0 for finite
        ``m_in``; for ``m_in = inf`` from ``w_0 = 0``, the conserved
        :func:`undriven_perp_norm` of ``B_0``; otherwise unknown (``None``)."""
        if np.isfinite(self.dynamics.m_in[0]):
            return 0.0
        if np.any(self.initial.omega != 0):
            return None
        return float(undriven_perp_norm(self.initial, self.Sigma_star.shape[0])[0])


# ----------------------------------------------------------------------------- batches


def grid(**axes: Iterable[float]) -> pd.DataFrame:
    """The Cartesian product of the given axes as a DataFrame, one row per configuration
    (e.g. ``grid(inner_lr=[0.1, 0.2], m_in=[10, math.inf], seed=[0, 1])``). Allowed axes:
    ``inner_lr, outer_lr, m_in, noise_var, seed``."""
    unknown = set(axes) - set(GRID_COLUMNS)
    if unknown:
        raise ValueError(f"unknown grid axes {sorted(unknown)}; allowed: {GRID_COLUMNS}")
    names = list(axes)
    rows = list(itertools.product(*(list(axes[name]) for name in names)))
    return pd.DataFrame(rows, columns=names)


def simulate_batch(
    problem: Problem,
    configs: pd.DataFrame,
    *,
    width: int,
    init_scale: float,
    steps: int,
    record_every: int,
    defaults: dict[str, float] | None = None,
    dtype: np.dtype | str = np.float64,
) -> pd.DataFrame:
    """Exact infinite-task FO-ANIL for every row of ``configs``, in one batched computation.

    ``configs`` has columns among ``inner_lr, outer_lr, m_in, noise_var, seed`` (missing ones
    come from ``defaults``, else ``noise_var`` from ``problem`` and ``seed`` 0). Configuration
    ``i`` starts from ``init_linear(d, width, init_scale, seed_rng(seed_i, Purpose.MODEL))``
    (the initialisation ``metarep run`` uses for ``model.seed``) and ``w_0 = 0``.

    **Returns** one row per configuration and recorded step (0, every ``record_every``, and
    ``steps``): ``config`` (row of ``configs``), the configuration's columns, ``step``,
    ``train_loss``, the measures of :func:`measures` and ``diverged``. A configuration whose
    loss becomes non-finite or grows ``EXPLOSION_FACTOR``-fold is frozen at zero and reported
    with ``diverged = True`` and ``nan`` measures from then on.
    """
    table = configs.reset_index(drop=True).copy()
    fill = {"noise_var": problem.noise_var, "seed": 0, **(defaults or {})}
    for column in GRID_COLUMNS:
        if column not in table:
            if column not in fill:
                raise ValueError(f"configs needs a column {column!r} (or a default)")
            table[column] = fill[column]
    b = len(table)
    B0 = np.stack([init_linear(problem.d, width, init_scale,
                               seed_rng(int(seed), Purpose.MODEL)).B for seed in table["seed"]])
    _, state = coordinates(problem.B_star, B0, keep_basis=False, dtype=dtype)
    dynamics = ExactFOANIL(problem.Sigma_star, table["inner_lr"], table["outer_lr"],
                           table["m_in"], table["noise_var"], state.H.shape, dtype)
    Lambda = lambda_stars(dynamics)
    when = record_steps(steps, record_every)
    alive = np.ones(b, dtype=bool)
    rows, reference, records, t = table.to_dict("records"), None, [], 0
    with np.errstate(over="ignore", invalid="ignore"):
        while True:
            recording = t in when
            new, loss = dynamics.step(state, with_loss=recording)
            if recording:
                reference = loss.copy() if reference is None else reference
                blown = alive & (~np.isfinite(loss)
                                 | (loss > EXPLOSION_FACTOR * np.maximum(reference, 1e-12)))
                alive &= ~blown
                new.H[~alive], new.omega[~alive] = 0.0, 0.0
                for i in range(b):
                    row = {"config": i, **rows[i], "step": t,
                           "train_loss": float(loss[i]) if alive[i] else math.nan}
                    if alive[i]:
                        row.update(measures(state, problem.Sigma_star, Lambda, i)[0])
                    records.append({**row, "diverged": not alive[i]})
            if t >= steps:
                break
            state, t = new, t + 1
    return pd.DataFrame(records)


# ----------------------------------------------------------------------------- updates in R^d


def expected_update(
    params: LinearParams, problem: Problem, inner_lr: float, outer_lr: float, m_in: float
) -> tuple[LinearParams, float]:
    """The exact expected FO-ANIL update ``(E[B+] - B, E[w+] - w)`` in R^d from ``params``
    (one configuration), and the expected meta-training loss at ``params``."""
    frame, state = coordinates(problem.B_star, params.B, params.w)
    dynamics = ExactFOANIL(problem.Sigma_star, inner_lr, outer_lr, m_in, problem.noise_var,
                           state.H.shape)
    new, loss = dynamics.step(state)
    after = frame.params(new)
    return LinearParams(after.B - params.B, after.w - params.w), float(loss[0])


@dataclass(frozen=True)
class MonteCarloUpdate:
    """Monte Carlo estimate of the expected one-step update of a method.

    ``mean`` and ``stderr`` of ``(B+ - B, w+ - w)`` (as :class:`LinearParams`), ``loss`` and
    ``loss_stderr`` of the meta-training loss, over ``n_batches`` independent steps on
    ``tasks_per_batch`` fresh tasks each.
    """

    mean: LinearParams
    stderr: LinearParams
    loss: float
    loss_stderr: float
    n_batches: int
    tasks_per_batch: int


def monte_carlo_update(
    method: Method,
    params: LinearParams,
    problem: Problem,
    m_in: int,
    m_out: int,
    n_tasks: int,
    rng: np.random.Generator,
    tasks_per_batch: int = 100,
) -> MonteCarloUpdate:
    """Estimate ``E[step(params, fresh tasks)] - params`` for any method with the
    ``step(params, batch) -> (params, loss)`` protocol (FO-ANIL, ANIL, FO-MAML, MAML, ...).

    Runs ``n_tasks // tasks_per_batch`` steps from ``params``, each on ``tasks_per_batch``
    fresh tasks (:func:`metarep.tasks.sample_tasks`, float64), and returns the mean update and
    its standard error (batch means are i.i.d., so ``stderr = std / sqrt(n_batches)``). For
    methods whose update is a task average (all of the above) the expectation does not depend
    on ``tasks_per_batch``, which only sets the memory used (``tasks_per_batch m d`` floats).
    Sums are shifted by the first batch's update for accuracy.
    """
    n_batches = n_tasks // tasks_per_batch
    if n_batches < 2:
        raise ValueError(f"need at least 2 batches: n_tasks = {n_tasks} < 2 * {tasks_per_batch}")
    params = LinearParams(np.asarray(params.B, np.float64), np.asarray(params.w, np.float64))
    flat = np.concatenate([params.B.ravel(), params.w.ravel()])
    shift = None
    total = squares = None
    losses = np.empty(n_batches)
    for j in range(n_batches):
        batch = sample_tasks(problem, tasks_per_batch, m_in, m_out, rng)
        new, losses[j] = method.step(params, batch)
        update = np.concatenate([new.B.ravel(), new.w.ravel()]) - flat
        if shift is None:
            shift, total, squares = update, np.zeros_like(update), np.zeros_like(update)
        centred = update - shift
        total += centred
        squares += centred**2
    mean_centred = total / n_batches
    variance = (squares - n_batches * mean_centred**2) / (n_batches - 1)
    mean = shift + mean_centred
    stderr = np.sqrt(np.clip(variance, 0.0, None) / n_batches)
    size = params.B.size

    def split(vector: np.ndarray) -> LinearParams:
        return LinearParams(vector[:size].reshape(params.B.shape), vector[size:])

    return MonteCarloUpdate(split(mean), split(stderr), float(losses.mean()),
                            float(losses.std(ddof=1) / np.sqrt(n_batches)), n_batches,
                            tasks_per_batch)
