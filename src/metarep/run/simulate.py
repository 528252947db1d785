"""Many configurations of the exact infinite-task dynamics in one vectorised computation, as a
table: ``simulate_batch(problem, grid(inner_lr=[0.1, 0.2], m_in=[10, inf], seed=[0, 1]),
width=50, init_scale=0.1, steps=10_000, record_every="log")``, for FO-ANIL or any other
inner-loop method (``method="maml"``, ``inner_steps=...``).

The configurations go through the training loop of every run (:func:`metarep.run.loop.train`),
so they follow its divergence rule at every step.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterable, Mapping

import numpy as np
import pandas as pd

from metarep.core.infinite import coordinates, exact_dynamics
from metarep.core.model import init_linear
from metarep.core.problem import Problem
from metarep.core.seeding import Purpose, seed_rng
from metarep.core.theory import Setting, gram_target
from metarep.errors import ArgumentError
from metarep.run.backends.infinite import ExactStepper, use_compiled
from metarep.run.loop import RecordSchedule, Trajectory, train

GRID_COLUMNS = ("inner_lr", "outer_lr", "m_in", "noise_var", "seed")
ADVICE = "Lower its inner_lr or outer_lr."


def grid(**axes: Iterable[float]) -> pd.DataFrame:
    """The Cartesian product of the given axes as a DataFrame, one row per configuration
    (e.g. ``grid(inner_lr=[0.1, 0.2], m_in=[10, math.inf], seed=[0, 1])``). Allowed axes:
    ``inner_lr, outer_lr, m_in, noise_var, seed``."""
    unknown = set(axes) - set(GRID_COLUMNS)
    if unknown:
        raise ArgumentError("axes", f"unknown grid axes {sorted(unknown)}; allowed: "
                            f"{GRID_COLUMNS}")
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
    record_every: int | str,
    defaults: Mapping[str, float] | None = None,
    dtype: np.dtype | str = np.float64,
    method: str = "fo-anil",
    inner_steps: int = 1,
) -> pd.DataFrame:
    """The exact infinite-task dynamics of ``method`` with ``inner_steps`` inner steps
    (:func:`metarep.core.infinite.exact_dynamics`) for every row of ``configs``, in one batched
    computation; ``lambda_err`` is measured against the target the theory gives each
    configuration (:func:`metarep.core.theory.gram_target`; ``nan`` where it gives none).

    ``configs`` has columns among ``inner_lr, outer_lr, m_in, noise_var, seed`` (missing ones
    come from ``defaults``, else ``noise_var`` from ``problem`` and ``seed`` 0). Configuration
    ``i`` starts from ``init_linear(d, width, init_scale, seed_rng(seed_i, Purpose.MODEL))``
    (the initialisation ``metarep run`` uses for ``model.seed``) and ``w_0 = 0``.

    The record steps are those of ``RecordSchedule(steps, record_every)``
    (:class:`metarep.run.loop.RecordSchedule`): 0, every ``record_every`` steps (an integer
    >= 1) or the geometric grid of about 20 steps per decade (``"log"``), and ``steps``.

    **Returns** one row per configuration and record step: ``config`` (row of ``configs``),
    the configuration's columns, ``step``, ``train_loss``, the measures of
    :func:`metarep.core.infinite.coordinate_measures` and ``diverged``.
    A configuration that diverges (the loop's rule, checked at every step) stops there; its
    later rows have ``diverged = True`` and ``nan`` measures.
    """
    schedule = RecordSchedule(steps, record_every)
    table = configs.reset_index(drop=True).copy()
    fill = {"noise_var": problem.noise_var, "seed": 0, **(defaults or {})}
    for column in GRID_COLUMNS:
        if column not in table:
            if column not in fill:
                raise ArgumentError("configs", f"needs a column {column!r} (or a default)")
            table[column] = fill[column]
    B0 = np.stack([init_linear(problem.d, width, init_scale,
                               seed_rng(int(seed), Purpose.MODEL)).B for seed in table["seed"]])
    _, state = coordinates(problem.B_star, B0, keep_basis=False, dtype=dtype)
    dynamics = exact_dynamics(method, inner_steps, problem.d, problem.Sigma_star,
                              table["inner_lr"], table["outer_lr"], table["m_in"],
                              table["noise_var"], state.H.shape, dtype, np,
                              use_compiled(steps, len(table)))
    setting = Setting(method, width, inner_steps, 1, "infinite")
    targets = [gram_target(Problem(problem.B_star, problem.Sigma_star, float(noise)), float(m),
                           float(alpha), setting)[0]
               for alpha, m, noise in zip(table["inner_lr"], table["m_in"], table["noise_var"],
                                          strict=True)]
    trajectories = [Trajectory(None, 0) for _ in range(len(table))]
    train(ExactStepper(dynamics, targets), state, trajectories,
          schedule=schedule, advice=[ADVICE] * len(table), progress=False)
    rows = []
    for i, (config, trajectory) in enumerate(zip(table.to_dict("records"), trajectories,
                                                 strict=True)):
        by_step = {record["step"]: record for record in trajectory.records}
        for t in schedule.steps():
            record = by_step.get(t)
            if record is None:  # after the configuration diverged
                rows.append({"config": i, **config, "step": t, "train_loss": math.nan,
                             "diverged": True})
            else:
                rows.append({"config": i, **config, **record, "diverged": False})
    frame = pd.DataFrame(rows)
    return frame.sort_values(["step", "config"], kind="stable").reset_index(drop=True)
