"""Monte Carlo estimates of the expected one-step update of any finite-pool method, over fresh
tasks: the reference for methods whose expectation has no closed form here, and the z-test of
the closed forms that do (:func:`metarep.core.infinite.expected_update`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from metarep.core.methods import Method
from metarep.core.model import LinearParams
from metarep.core.problem import Problem
from metarep.core.tasks import sample_tasks
from metarep.errors import ArgumentError


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
    fresh tasks (:func:`metarep.core.tasks.sample_tasks`, float64), and returns the mean update and
    its standard error (batch means are i.i.d., so ``stderr = std / sqrt(n_batches)``). For
    methods whose update is a task average (all of the above) the expectation does not depend
    on ``tasks_per_batch``, which only sets the memory used (``tasks_per_batch m d`` floats).
    Sums are shifted by the first batch's update for accuracy.
    """
    n_batches = n_tasks // tasks_per_batch
    if n_batches < 2:
        raise ArgumentError("n_tasks", f"need at least 2 batches: n_tasks = {n_tasks} < 2 * "
                            f"{tasks_per_batch}")
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
