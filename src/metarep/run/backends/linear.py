"""The linear model ``x -> x^T B w`` as a run: on a task pool or online tasks
(:class:`LinearBackend`, the methods of :mod:`metarep.core.methods`), and what it shares with
the exact infinite-task runs (:class:`LinearModelRun`): where it computes
(:func:`array_backend`: numpy, or torch on ``train.device``), the test-time evaluation, the
theory's predictions and ``B_star^T B B^T B_star``.

A torch-backend run moves its pool to the device once, steps there with the same formulas as
numpy (:mod:`metarep.core.arrays`), and hands numpy arrays to everything else: measures,
records, checkpoints (exactly: :meth:`LinearBackend.restore` gives back the very state),
``params.npz`` and the evaluation. Its tasks are drawn by numpy, as in a numpy run, so the
same seed gives the same tasks.
"""

from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from metarep.core.arrays import moved_state, numpy_state
from metarep.core.evaluation import (
    EvalRow,
    HeldOutRow,
    evaluate_many,
    features_row,
    held_out_risks,
)
from metarep.core.measures import measure, projected_gram
from metarep.core.methods import MTLState, State, make_method
from metarep.core.model import LinearParams, init_linear
from metarep.core.seeding import Purpose, seed_rng
from metarep.core.theory import Setting, gram_target, predicted_limits
from metarep.errors import ConfigError
from metarep.run.backends.sources import RunInputs, task_source
from metarep.run.inputs import check_memory, config_errors, load_params
from metarep.run.schema import Config

LIMIT_MEASURES = ("train_loss", "perp_norm", "subspace_dist", "span_outside", "span_missed",
                  "lambda_err", "head_norm")
REGIMES = {"infinite": "infinitely many tasks (exact expected dynamics)",
           "online": "fresh tasks every step"}


def initial_params(inputs: RunInputs) -> tuple[RunInputs, LinearParams]:
    """``(B_0, w_0)``: drawn (:func:`metarep.core.model.init_linear` with ``model.seed``), or
    read from ``model.init_from`` (whose k' replaces ``model.width`` in the config)."""
    config, d = inputs.config, inputs.problem.d
    model, dtype = config.model, config.train.dtype
    if model.init_from is not None:
        params = load_params(model.init_from, d).astype(dtype)
        config = config.replace(**{"model.width": params.width})
        return dataclasses.replace(inputs, config=config), params
    check_memory("model.width", model.width, 32.0 * d,
                 f"B, problem.d x model.width = {d} x {model.width}, with its updates")
    return inputs, init_linear(d, model.width, model.init_scale,
                               seed_rng(model.seed, Purpose.MODEL), dtype, model.head_scale)


def array_backend(config: Config) -> Any:
    """The array namespace a linear run computes in (:mod:`metarep.core.arrays`): numpy,
    unless ``train.backend: torch`` or ``train.device`` means a GPU (``cuda``, or ``auto``
    with one present); then torch on the device ``train.device`` resolves to
    (:func:`metarep.engine.learner.resolve_device`).

    :class:`ConfigError` naming ``train.backend`` (or ``train.device`` for ``cuda``) without
    PyTorch, and ``train.device`` for ``cuda`` without a CUDA device.
    """
    train = config.train
    if train.backend == "numpy" and train.device == "cpu":
        return np
    try:
        importlib.import_module("torch")
    except ModuleNotFoundError as error:
        if error.name != "torch":
            raise
        if train.backend == "numpy" and train.device == "auto":  # no torch, so no GPU
            return np
        key, value = (("train.backend", train.backend) if train.backend == "torch"
                      else ("train.device", train.device))
        raise ConfigError(key, f"{value} needs PyTorch: install metarep[torch] "
                          "(pip install 'metarep[torch]')") from None
    from metarep.engine.arrays import torch_namespace
    from metarep.engine.learner import resolve_device

    with config_errors({"device": "train.device"}):
        device = resolve_device(train.device)
    if train.backend == "numpy" and device.type == "cpu":
        return np
    return torch_namespace(str(device))


def _finite(value: float) -> float | None:
    return None if np.isnan(value) else value


class LinearModelRun:
    """What the runs of the linear model share, given the run's inputs, its method's name and
    the map from a training state to ``(B, w)`` (:meth:`params`).

    ``alpha`` (``method.inner_lr``, also the test-time head step size), the theory's
    :class:`~metarep.core.theory.Setting` of the run, and ``Lambda_star``, the target of
    ``lambda_err`` in force for it (:func:`metarep.core.theory.gram_target`: ``Lambda_star``,
    its top-k' part for k' < k, or ``None`` where the theory gives none, then ``lambda_err`` is
    ``nan``), are decided once here.
    """

    def __init__(self, inputs: RunInputs, method_name: str, xp: Any = np):
        self.inputs, self.method_name, self.xp = inputs, method_name, xp
        self.config, self.problem = inputs.config, inputs.problem
        c = self.config
        self.alpha = c.method.inner_lr
        regime = c.tasks.n if c.tasks.n in ("infinite", "online") else "pool"
        self.setting = Setting(method_name, c.model.width, c.method.inner_steps,
                               c.eval.adapt_steps, regime)
        self.Lambda_star, self.reference = gram_target(self.problem, c.tasks.m_in, self.alpha,
                                                       self.setting)

    def params(self, state: Any) -> LinearParams:
        """``(B, w)`` of a training state, as numpy arrays."""
        return numpy_state(LinearParams(state.B, state.w))

    def take(self, state: Any, index: int) -> Any:
        return state

    def park(self, state: Any, stopped: np.ndarray) -> None:
        """Nothing to do: a run of one stops the loop."""

    def evaluate(self, state: Any) -> list[EvalRow]:
        """Test-time evaluation, the same for every method: ``eval.adapt_steps`` head steps of
        size ``alpha`` from the learned head. ``mtl`` has no meta-learned head (its heads
        belong to the training tasks), so it starts from ``w = 0`` and adds the row
        ``mtl-lsq``: least squares on the learned features ``X B``."""
        return evaluate_together([(self, state)])[0]

    def evaluation_key(self, state: Any) -> tuple[Any, ...]:
        """What decides the test tasks and reference rows of :meth:`evaluate` besides the
        model itself: runs with equal keys are evaluated together (:func:`evaluate_together`)."""
        problem = self.problem
        return (self.method_name, isinstance(state, MTLState), self.config.eval,
                problem.noise_var, problem.B_star.shape, problem.B_star.tobytes(),
                np.asarray(problem.Sigma_star, np.float64).tobytes(),
                self.test_params(state).B.shape[1])

    def test_params(self, state: Any) -> LinearParams:
        """The ``(B, w)`` test-time adaptation starts from: the learned ones, with ``w = 0``
        for ``mtl`` (its heads belong to the training tasks)."""
        params = self.params(state)
        if isinstance(state, MTLState):
            return LinearParams(params.B, np.zeros_like(params.w))
        return params

    def held_out(self, state: Any) -> list[HeldOutRow]:
        """The evaluation on the held-out tasks of ``tasks.test_from``
        (:func:`metarep.core.evaluation.held_out_risks`; ``mtl`` adapts from ``w = 0``), or
        none without them."""
        heldout, e = self.inputs.heldout, self.config.eval
        if heldout is None:
            return []
        return held_out_risks(self.test_params(state), heldout.X, heldout.y, self.method_name,
                              e.shots, self.alpha, e.adapt_steps)

    def predicted_perp_limit(self) -> float | None:
        """The limit of ``perp_norm`` the theory predicts for this run (0 by default)."""
        return 0.0

    def theory(self, final: Mapping[str, float], rows: list[EvalRow]) -> dict[str, Any]:
        """The theory next to the run, each statement with its scope (``summary.json``):

        - ``scope``: the run's setting (method, k' and k, inner steps, test-time steps,
          regime); ``regime``: the training tasks in words;
        - ``lambda_star`` and ``reference``: the target of ``lambda_err`` in force and the
          statement it comes from (:func:`metarep.core.theory.gram_target`; ``null`` and the
          reason where there is none);
        - ``limits``: the final measures next to their limits as t -> inf, only for the runs
          whose limits the theory gives (:func:`metarep.core.theory.predicted_limits`: exact
          infinite-task FO-ANIL with one inner step); otherwise ``null``, and ``prediction``
          says why;
        - ``test_risk``: the simulated test risk of the method next to its closed form at the
          learned ``(B, w)`` (0 or 1 test-time step, else ``null``) and, with ``limits``, at
          the limit.
        """
        c = self.config
        limits = predicted_limits(self.problem, c.tasks.m_in, self.alpha, self.setting,
                                  c.eval.shots)
        if limits is not None:
            limits["perp_norm"] = self.predicted_perp_limit()
            prediction = self.reference
        elif self.setting.regime != "infinite":
            prediction = ("no limits for a finite pool or online tasks: the theorem is about "
                          "infinitely many tasks (tasks.n: infinite); a pool stops at a floor "
                          "set by N, m and the noise")
        else:
            prediction = self.reference
        return {
            "scope": self.setting.scope(self.problem.k),
            "regime": REGIMES.get(str(c.tasks.n), f"a pool of {c.tasks.n} tasks"),
            "lambda_star": self.Lambda_star,
            "reference": self.reference,
            "prediction": prediction,
            "limits": None if limits is None else {
                name: {"final": final.get(name), "theory": limits[name]}
                for name in LIMIT_MEASURES},
            "test_risk": [{"shots": row.shots, "simulated": row.excess_risk,
                           "stderr": row.stderr, "closed_form": _finite(row.theory),
                           "limit": None if limits is None else limits["test_risk"].get(row.shots)}
                          for row in rows if row.method == self.method_name],
            "note": "closed_form: the expected test risk at the learned (B, w) after "
            "eval.adapt_steps head steps (metarep.core.theory.adapted_risk; 0 or 1 step)",
        }

    def projected_gram(self, state: Any) -> np.ndarray | None:
        """``B_star^T B B^T B_star`` (``None`` without the ground truth)."""
        if not self.inputs.has_truth:
            return None
        return projected_gram(self.params(state).B.astype(np.float64), self.problem.B_star)


class LinearBackend(LinearModelRun):
    """The linear model trained by a method of :func:`metarep.core.methods.make_method` on a
    task pool or on online tasks, in the namespace ``xp`` (:func:`array_backend`: numpy, or
    torch on a device). States: :class:`~metarep.core.model.LinearParams`, or
    :class:`~metarep.core.methods.MTLState` for ``mtl``, of arrays of ``xp``."""

    def __init__(self, inputs: RunInputs, xp: Any = np):
        inputs, self.init = initial_params(inputs)
        method = inputs.config.method
        self.method = make_method(method.name, method.inner_lr, method.outer_lr,
                                  method.inner_steps)
        super().__init__(inputs, self.method.name, xp)
        self.batches = task_source(inputs, xp)
        self.truth = self.problem if inputs.has_truth else None

    def initial_state(self) -> State:
        """``(B_0, w_0)`` on the backend's device, with one head per pool task for ``mtl``
        (which the schema keeps off ``tasks.n: online``)."""
        pool = self.inputs.pool
        return self.method.init_state(moved_state(self.init, self.xp),
                                      0 if pool is None else pool.n_tasks)

    def arrays(self, state: State) -> dict[str, np.ndarray]:
        return numpy_state(state)._asdict()

    def state_arrays(self, state: State) -> dict[str, np.ndarray]:
        """``B``, ``w`` (and the per-task ``heads`` of ``mtl``): the state itself, as numpy
        arrays."""
        return numpy_state(state)._asdict()

    def restore(self, arrays: Mapping[str, np.ndarray]) -> State:
        """The state of :meth:`state_arrays`, in the run's dtype, on the backend's device."""
        initial, dtype = self.initial_state(), self.config.train.dtype
        return moved_state(initial._make(arrays[name].astype(dtype) for name in initial._fields),
                           self.xp)

    def step(self, state: State, t: int) -> tuple[State, np.ndarray]:
        new, loss = self.method.step(state, self.batches(t))
        return new, np.array([loss])

    def finite(self, state: State) -> np.ndarray:
        return np.array([state.is_finite()])

    def measures(self, state: State, indices: Sequence[int] = (0,)) -> list[dict[str, float]]:
        """A run alone: its measures for each index (each is 0)."""
        return [measure(numpy_state(state), self.truth, self.Lambda_star) for _ in indices]


def evaluate_together(runs: Sequence[tuple[LinearModelRun, Any]]) -> list[list[EvalRow]]:
    """:meth:`LinearModelRun.evaluate` of each ``(backend, state)`` of ``runs``, with the same
    rows: the test-time evaluation, the same for every method, ``eval.adapt_steps`` head steps
    of size ``alpha`` from the learned head. ``mtl`` has no meta-learned head (its heads
    belong to the training tasks), so it starts from ``w = 0`` and adds the row ``mtl-lsq``:
    least squares on the learned features ``X B``.

    Runs of equal :meth:`~LinearModelRun.evaluation_key` (a batch of infinite-task runs that
    share ``sigma^2`` and ``eval.seed``) are evaluated on one draw of their test tasks
    (:func:`metarep.core.evaluation.evaluate_many`), their reference rows computed once."""
    groups: dict[tuple[Any, ...], list[int]] = {}
    for i, (backend, state) in enumerate(runs):
        groups.setdefault(backend.evaluation_key(state), []).append(i)
    results: list[list[EvalRow]] = [[] for _ in runs]
    for members in groups.values():
        first, state = runs[members[0]]
        e, per_task = first.config.eval, isinstance(state, MTLState)
        rows = evaluate_many([(runs[i][0].test_params(runs[i][1]), runs[i][0].alpha)
                              for i in members], first.problem, first.method_name, e.shots,
                             e.n_tasks, e.adapt_steps, e.seed,
                             features_row=features_row(first.method_name) if per_task else None)
        for i, row in zip(members, rows, strict=True):
            results[i] = row
    return results
