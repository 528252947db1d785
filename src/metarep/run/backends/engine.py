"""ReLU networks as a run (``model.kind: relu``): the torch engine's
:class:`~metarep.engine.learner.MetaLearner` on a task pool or on online tasks, evaluated
through numpy predictors. Importing this module does not import torch; building a backend
does (a :class:`~metarep.errors.ConfigError` naming ``model.kind`` without PyTorch).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from metarep.core.evaluation import (
    EvalRow,
    evaluate_predictors,
    feature_least_squares_predictor,
    features_row,
)
from metarep.core.measures import measure_network
from metarep.core.seeding import Purpose, seed_rng
from metarep.core.tasks import TaskBatch
from metarep.run.backends.sources import RunInputs, task_source
from metarep.run.inputs import config_errors, load_network, torch_module

LEARNER_KEYS = {"method": "method.name", "inner_lr": "method.inner_lr",
                "outer_lr": "method.outer_lr", "inner_steps": "method.inner_steps",
                "n_tasks": "tasks.n", "device": "train.device", "dtype": "train.dtype",
                "task_chunk": "train.task_chunk", "deterministic": "train.deterministic"}
"""The config key of each argument of the engine that a run sets from its config."""


def engine_method(name: str) -> tuple[str, bool]:
    """A config method name as the engine's ``(method, first_order)``: ``fo-anil`` ->
    ``("anil", True)``, ``maml`` -> ``("maml", False)``, ``mtl`` -> ``("mtl", False)`` (the
    schema admits only the names of :data:`metarep.core.methods.METHOD_NAMES`)."""
    base = name.removeprefix("fo-")
    return base, base != name


class EngineBackend:
    """A ReLU network (drawn, or read from ``model.init_from``, whose widths then replace the
    configured ones) meta-trained by the torch engine. States are engine states
    (:class:`~metarep.engine.learner.EngineState`). The tensors of the last batch are kept, so
    a whole pool used at every step moves to the device once. ``train.task_chunk`` and
    ``train.deterministic`` are the learner's ``task_chunk`` and ``deterministic``: every
    torch computation of the run (its steps and its evaluation) then runs under
    :func:`~metarep.engine.learner.deterministic_algorithms`, the previous settings restored
    after each."""

    def __init__(self, inputs: RunInputs):
        networks, learner_module = torch_module("networks"), torch_module("learner")
        config, d = inputs.config, inputs.problem.d
        model, method = config.model, config.method
        if model.init_from is not None:
            self.network = load_network(model.init_from, d, model.hidden_layers)
            widths = {"model.width": int(self.network.w.shape[0])}
            if model.hidden_layers == 2:
                widths["model.hidden_width"] = int(self.network.W1.shape[1])
            config = config.replace(**widths)
            inputs = dataclasses.replace(inputs, config=config)
        else:
            self.network = networks.init_relu(d, model.width, model.hidden_layers,
                                              model.hidden_width, model.init_scale,
                                              seed_rng(model.seed, Purpose.MODEL))
        self.inputs, self.config, self.problem = inputs, config, inputs.problem
        self.method_name = method.name
        self.alpha = method.inner_lr
        self.n_tasks = None if inputs.pool is None else inputs.pool.n_tasks
        base, first_order = engine_method(method.name)
        with config_errors(LEARNER_KEYS):
            self.learner = learner_module.MetaLearner(
                self.network, networks.HEAD, method=base, first_order=first_order,
                inner_lr=method.inner_lr, outer_lr=method.outer_lr,
                inner_steps=method.inner_steps, n_tasks=self.n_tasks,
                device=config.train.device, dtype=config.train.dtype,
                task_chunk=config.train.task_chunk, deterministic=config.train.deterministic)
        self.batches = task_source(inputs)
        self.truth = self.problem if inputs.has_truth else None
        self._last: tuple[TaskBatch, tuple[Any, ...]] | None = None

    def initial_state(self) -> Any:
        return self.learner.init_state(self.network, self.n_tasks)

    def arrays(self, state: Any) -> dict[str, np.ndarray]:
        return state.arrays()

    def state_arrays(self, state: Any) -> dict[str, np.ndarray]:
        """The network's arrays (and per-task heads): the whole engine state."""
        return state.arrays()

    def restore(self, arrays: Mapping[str, np.ndarray]) -> Any:
        return self.initial_state().with_arrays(arrays)

    def params(self, state: Any) -> Any:
        """The final parameters of a run: the engine state itself."""
        return state

    def step(self, state: Any, t: int) -> tuple[Any, np.ndarray]:
        batch = self.batches(t)
        if self._last is None or self._last[0] is not batch:
            self._last = batch, tuple(self.learner.tensor(a) for a in
                                      (batch.X_in, batch.y_in, batch.X_out, batch.y_out))
        new, loss = self.learner.outer_step(state, *self._last[1], batch.indices)
        return new, np.array([loss])

    def finite(self, state: Any) -> np.ndarray:
        return np.array([state.is_finite()])

    def measures(self, state: Any, indices: Sequence[int] = (0,)) -> list[dict[str, float]]:
        """A run alone: its measures for each index (each is 0)."""
        return [measure_network(state.arrays(), self.truth) for _ in indices]

    def take(self, state: Any, index: int) -> Any:
        return state

    def park(self, state: Any, stopped: np.ndarray) -> None:
        """Nothing to do: a run of one stops the loop."""

    def evaluate(self, state: Any) -> list[EvalRow]:
        """The same head steps as the linear runs, through the torch engine, scored by
        :func:`metarep.core.evaluation.evaluate_predictors` (the excess risk
        ``E_x (f(x) - x^T B_star w_star)^2`` estimated with fresh inputs); ``mtl`` starts
        from ``w = 0`` and adds ``mtl-lsq``, least squares on the learned features (no error
        bar where its variance is infinite)."""
        e, name = self.config.eval, self.method_name
        per_task = state.heads is not None
        predictors = {name: self.learner.test_predictor(state.params, e.adapt_steps, self.alpha,
                                                        from_zero=per_task)}
        widths = {}
        if per_task:
            predictors[features_row(name)] = feature_least_squares_predictor(
                self.learner.feature_map(state.params), self.problem)
            widths[features_row(name)] = self.config.model.width
        return evaluate_predictors(predictors, self.problem, e.shots, e.n_tasks, e.seed, widths)

    def held_out(self, state: Any) -> list:
        """No held-out evaluation (``tasks.test_from`` is for the linear model)."""
        return []

    def theory(self, final: Mapping[str, float], rows: list[EvalRow]) -> None:
        """No closed forms for ReLU networks."""
        return None

    def projected_gram(self, state: Any) -> None:
        return None
