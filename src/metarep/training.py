"""The outer training loop: steps, recording, divergence detection, progress.

The loop is generic over the training state (finite-pool parameters, infinite-task
population state, ...): it only needs a ``step(state, t) -> (state, loss)`` function, where
``loss`` is the meta-training loss at the state *before* the step, and a ``measure(state)``
function returning the measures to record.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

import numpy as np
from tqdm.auto import tqdm

State = TypeVar("State")

EXPLOSION_FACTOR = 1e8  # a loss this many times the initial loss counts as divergence


class Diverged(RuntimeError):
    """Training produced a non-finite or exploding loss; ``step`` is where it happened."""

    def __init__(self, step: int, loss: float, advice: str):
        super().__init__(f"training diverged at step {step} (train_loss = {loss:.4g}). {advice}")
        self.step = step
        self.loss = loss


@dataclass
class Trajectory(Generic[State]):
    """What training produced so far: the state at ``step`` and the recorded rows."""

    state: State
    step: int
    records: list[dict[str, float]] = field(default_factory=list)


def record_steps(steps: int, record_every: int) -> set[int]:
    """Steps at which measures are recorded: 0, every ``record_every``, and the last."""
    return set(range(0, steps + 1, record_every)) | {steps}


def is_diverging(loss: float | np.ndarray, reference: float | np.ndarray) -> bool | np.ndarray:
    """Whether ``loss`` means divergence: non-finite, or more than ``EXPLOSION_FACTOR`` times
    the ``reference`` loss (the loss at the first step trained); elementwise for arrays."""
    with np.errstate(over="ignore"):
        return ~np.isfinite(loss) | (loss > EXPLOSION_FACTOR * np.maximum(reference, 1e-12))


def train(
    step: Callable[[State, int], tuple[State, float]],
    trajectory: Trajectory[State],
    *,
    steps: int,
    record_every: int,
    measure: Callable[[State], dict[str, float]],
    is_finite: Callable[[State], bool],
    advice: str,
    on_record: Callable[[Trajectory[State]], None] | None = None,
    progress: bool = True,
) -> Trajectory[State]:
    """Run ``step`` from ``trajectory.step`` up to ``steps``, recording as it goes.

    Each record is ``{"step": t, "train_loss": loss(state_t), **measure(state_t)}``. The
    trajectory is updated in place (so a caller that catches :class:`Diverged` keeps every
    record made before the divergence) and returned. ``on_record`` is called after each
    record, e.g. to persist results. Floating-point overflow inside ``step`` is not an error
    (numpy's warnings are silenced there): it shows as a non-finite or exploding loss or a
    non-finite state, which raises :class:`Diverged`.
    """
    when = record_steps(steps, record_every)
    reference = trajectory.records[0]["train_loss"] if trajectory.records else None
    bar = tqdm(total=steps, initial=trajectory.step, disable=not progress, unit="step",
               dynamic_ncols=True, leave=False)
    try:
        while True:
            t = trajectory.step
            with np.errstate(over="ignore", invalid="ignore"):
                new_state, loss = step(trajectory.state, t)
            reference = loss if reference is None else reference
            if is_diverging(loss, reference):
                raise Diverged(t, loss, advice)
            if t in when and not (trajectory.records and trajectory.records[-1]["step"] == t):
                trajectory.records.append({"step": t, "train_loss": loss,
                                           **measure(trajectory.state)})
                bar.set_postfix(loss=f"{loss:.4g}", refresh=False)
                if on_record is not None:
                    on_record(trajectory)
            if t >= steps:
                return trajectory
            if not is_finite(new_state):
                raise Diverged(t + 1, math.nan, advice)
            trajectory.state, trajectory.step = new_state, t + 1
            bar.update(1)
    finally:
        bar.close()


def summarise_records(records: list[dict[str, Any]]) -> dict[str, Any]:
    """The last record (the final measures), or an empty dict."""
    return dict(records[-1]) if records else {}
