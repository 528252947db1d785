"""Exact infinite-task dynamics as a run (``tasks.n: infinite``), alone or many at once.

:class:`ExactStepper` steps ``b`` configurations of the exact dynamics of the run's method
(:func:`metarep.core.infinite.exact_dynamics`) through the training loop (long runs of
one-step FO-ANIL from record to record in one call of its compiled loop, :func:`use_compiled`:
a :class:`~metarep.run.loop.BlockStepper`);
:class:`InfiniteTaskBackend` is one run of them (a stepper of one, with the frame that maps its
coordinates back to ``(B, w)``), and :func:`batched_stepper` joins runs that share everything
but their per-run parameters into one stepper.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from metarep.core.arrays import array_namespace, moved_state, numpy_state
from metarep.core.infinite import (
    Block,
    ExactDynamics,
    ExactFOANIL,
    InfiniteTaskState,
    coordinate_measures,
    coordinates,
    exact_dynamics,
    undriven_perp_norm,
)
from metarep.core.model import LinearParams
from metarep.core.theory import gram_target
from metarep.run.backends.linear import LinearModelRun, initial_params
from metarep.run.backends.sources import RunInputs

COMPILED_MIN_STEPS = 10_000
"""Runs of at least this many steps use FO-ANIL's compiled loop: loading it costs a process
about 0.9 s, and it saves about 0.1 ms a step (the loop's own work between two records and
half of the step: 30 against 160 microseconds a step at d = k' = 50, measured on a 2-core host),
so it pays from about 10,000 steps."""

COMPILED_MAX_CONFIGS = 8
"""... for at most this many configurations at once: the compiled loop computes each alone, and
for more numpy's batched operations are faster per configuration (measured at d = 20, k' = 10:
104 against 89 microseconds a step for 32 configurations; 27 against 60 for 8)."""


def use_compiled(steps: int, configs: int, xp: Any = np) -> bool:
    """Whether ``configs`` configurations of exact one-step FO-ANIL trained for ``steps`` steps
    in the namespace ``xp`` step with the compiled loop (:class:`~metarep.core.infinite.
    ExactFOANIL` ``compiled``): on numpy, at least :data:`COMPILED_MIN_STEPS` steps, at most
    :data:`COMPILED_MAX_CONFIGS` configurations. Decided from the config alone, so a run and
    its resumption step alike."""
    return xp is np and steps >= COMPILED_MIN_STEPS and configs <= COMPILED_MAX_CONFIGS


class ExactStepper:
    """``b`` configurations of the exact dynamics as the loop's
    :class:`~metarep.run.loop.Stepper`: ``dynamics`` steps them, ``Lambda_star`` (per
    configuration the (k, k) target of its ``lambda_err``, or ``None``) enters their measures,
    which come from the coordinates alone (no d-sized work), read as numpy arrays whatever
    namespace the dynamics compute in."""

    def __init__(self, dynamics: ExactDynamics, Lambda_star: Sequence[np.ndarray | None]):
        self.dynamics, self.Lambda_star = dynamics, Lambda_star

    def step(self, state: InfiniteTaskState, t: int) -> tuple[InfiniteTaskState, np.ndarray]:
        return self.dynamics.step(state)

    def advance(self, state: InfiniteTaskState, t: int, count: int) -> Block | None:
        """``count`` steps in one call (:meth:`~metarep.core.infinite.ExactFOANIL.advance`)
        for compiled one-step FO-ANIL (:func:`use_compiled`), whose :meth:`step` is that call
        with one step; ``None`` otherwise (the loop then steps one at a time)."""
        if isinstance(self.dynamics, ExactFOANIL) and self.dynamics.compiled:
            return self.dynamics.advance(state, count)
        return None

    def finite(self, state: InfiniteTaskState) -> np.ndarray:
        return state.finite()

    def measures(self, state: InfiniteTaskState,
                 indices: Sequence[int]) -> list[dict[str, float]]:
        return coordinate_measures(numpy_state(state), self.dynamics.Sigma_star,
                                   self.Lambda_star, indices)

    def take(self, state: InfiniteTaskState, index: int) -> InfiniteTaskState:
        """A copy: the dynamics reuse their output buffers."""
        return state.take(index)

    def park(self, state: InfiniteTaskState, stopped: np.ndarray) -> None:
        mask = array_namespace(state.H).asarray(stopped)
        state.H[mask], state.omega[mask] = 0.0, 0.0


class InfiniteTaskBackend(LinearModelRun):
    """Exact infinite-task dynamics of the run's method (``method.name``, any inner-loop
    method, with ``method.inner_steps``) from ``(B_0, w_0)`` as a run; states are coordinates
    (:class:`~metarep.core.infinite.InfiniteTaskState` of one configuration) on the frame built
    once from ``B_0``, of arrays of the namespace ``xp``
    (:func:`~metarep.run.backends.linear.array_backend`: numpy, or torch on a device; the frame
    stays numpy; the Gaussian-moment engine of the methods other than one-step FO-ANIL computes
    in numpy whatever ``xp`` is)."""

    def __init__(self, inputs: RunInputs, xp: Any = np):
        inputs, init = initial_params(inputs)
        config = inputs.config
        if config.method.name != "fo-anil" or config.method.inner_steps != 1:
            xp = np
        super().__init__(inputs, config.method.name, xp)
        if np.any(init.w != 0):  # the theory's statements for w_0 = 0 do not apply
            self.setting = dataclasses.replace(self.setting, zero_head=False)
            self.Lambda_star, self.reference = gram_target(
                self.problem, config.tasks.m_in, self.alpha, self.setting)
        dtype = config.train.dtype
        self.init = init
        self.frame, self.initial = coordinates(self.problem.B_star, init.B, init.w, dtype=dtype)
        dynamics = exact_dynamics(config.method.name, config.method.inner_steps,
                                  self.problem.d, self.problem.Sigma_star, self.alpha,
                                  config.method.outer_lr, config.tasks.m_in,
                                  self.problem.noise_var, self.initial.H.shape, dtype, xp,
                                  use_compiled(config.train.steps, 1, xp))
        self.stepper = ExactStepper(dynamics, [self.Lambda_star])

    def params(self, state: InfiniteTaskState) -> LinearParams:
        return self.frame.params(numpy_state(state))

    def initial_state(self) -> InfiniteTaskState:
        """The coordinates of ``(B_0, w_0)`` on this run's frame, in the run's dtype, on the
        backend's device."""
        coords = self.frame.state([LinearParams(np.asarray(self.init.B, np.float64),
                                                np.asarray(self.init.w, np.float64))])
        return moved_state(InfiniteTaskState(coords.H.astype(self.initial.H.dtype),
                                             coords.omega.astype(self.initial.omega.dtype)),
                           self.xp)

    def arrays(self, state: InfiniteTaskState) -> dict[str, np.ndarray]:
        B, w = self.params(state)
        return {"B": B, "w": w}

    def state_arrays(self, state: InfiniteTaskState) -> dict[str, np.ndarray]:
        """The coordinates ``H`` (1, k + r, p) and ``omega`` (1, p) themselves, as numpy
        arrays (mapping them to ``(B, w)`` and back would round)."""
        return numpy_state(state)._asdict()

    def restore(self, arrays: Mapping[str, np.ndarray]) -> InfiniteTaskState:
        """The coordinates ``H``, ``omega`` of :meth:`state_arrays`, in the run's dtype, on the
        backend's device."""
        return moved_state(InfiniteTaskState(np.array(arrays["H"], self.initial.H.dtype),
                                             np.array(arrays["omega"], self.initial.omega.dtype)),
                           self.xp)

    def step(self, state: InfiniteTaskState, t: int) -> tuple[InfiniteTaskState, np.ndarray]:
        return self.stepper.step(state, t)

    def advance(self, state: InfiniteTaskState, t: int, count: int) -> Block | None:
        return self.stepper.advance(state, t, count)

    def finite(self, state: InfiniteTaskState) -> np.ndarray:
        return self.stepper.finite(state)

    def measures(self, state: InfiniteTaskState,
                 indices: Sequence[int] = (0,)) -> list[dict[str, float]]:
        return self.stepper.measures(state, indices)

    def take(self, state: InfiniteTaskState, index: int) -> InfiniteTaskState:
        return self.stepper.take(state, index)

    def predicted_perp_limit(self) -> float | None:
        """The limit of ``perp_norm`` predicted from the initialisation, for FO-ANIL with one
        inner step (the paper's dynamics): 0 for finite ``m_in``; for ``m_in = inf`` from
        ``w_0 = 0``, the conserved :func:`~metarep.core.infinite.undriven_perp_norm` of
        ``B_0``. Otherwise none (``None``): whether the other methods unlearn is what their
        exact runs measure."""
        config = self.config
        if config.method.name != "fo-anil" or config.method.inner_steps != 1:
            return None
        dynamics = self.stepper.dynamics
        if np.isfinite(dynamics.m_in[0]):
            return 0.0
        if np.any(self.initial.omega != 0):
            return None
        return float(undriven_perp_norm(self.initial, self.problem.k)[0])


def batched_stepper(backends: Sequence[InfiniteTaskBackend]) -> ExactStepper:
    """One stepper for the runs ``backends``, which share the method, its inner steps,
    ``d``, ``Sigma_star``, the shapes and the dtype: each keeps its own ``alpha``, ``beta``,
    ``m_in``, ``sigma^2`` and ``Lambda_star``, and each configuration's slice is computed with
    the same operations (and in the same namespace) as in a run alone."""
    first = backends[0]
    parts = [backend.stepper.dynamics for backend in backends]
    dynamics = exact_dynamics(first.config.method.name, first.config.method.inner_steps,
                              first.problem.d, parts[0].Sigma_star,
                              [d.alpha[0] for d in parts], [d.beta[0] for d in parts],
                              [d.m_in[0] for d in parts], [d.noise_var[0] for d in parts],
                              (len(backends), *parts[0].shape[1:]), parts[0].dtype, parts[0].xp,
                              use_compiled(max(bk.config.train.steps for bk in backends),
                                           len(backends), parts[0].xp))
    return ExactStepper(dynamics, [target for bk in backends for target in bk.stepper.Lambda_star])
