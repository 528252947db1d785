"""The one training loop: ``b >= 1`` runs stepped together, one divergence rule at every step.

A single run is a batch of one; the batched infinite-task runs of a sweep and
:func:`metarep.run.simulate.simulate_batch` are batches of many. The loop only needs a
:class:`Stepper` for the batch: ``step(state, t) -> (state, losses)``, where ``losses`` (b,) is
the meta-training loss of each run at the state *before* the step, and the measures of one
run. A deterministic stepper may also take many steps per call (:class:`BlockStepper`): the
loop then advances from record to record in one call each, with the same rule applied to
every step of the block.

**The divergence rule**, the same for every run at every step ``t``: the run stops with
:class:`Diverged` at step ``t`` when its loss is non-finite or more than
:data:`EXPLOSION_FACTOR` times its reference loss (the loss at the first step it trained), and
at step ``t + 1`` when the new state has a non-finite entry. A stopped run keeps every record
and its last finite state; the other runs of the batch go on.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Generic, Protocol, TypeVar, runtime_checkable

import numpy as np
from tqdm import tqdm

from metarep.errors import ArgumentError

State = TypeVar("State")

EXPLOSION_FACTOR = 1e8  # a loss this many times the initial loss counts as divergence


class Diverged(RuntimeError):
    """A run diverged: in ``phase`` ``"training"``, a non-finite or exploding loss at
    ``step``; in ``phase`` ``"test"``, the test-time adaptation after ``step`` training steps
    (``loss``: the non-finite risk). ``advice`` says what to change."""

    def __init__(self, step: int, loss: float, advice: str, phase: str = "training"):
        where = (f"training diverged at step {step} (train_loss = {loss:.4g})"
                 if phase == "training" else f"the test-time adaptation diverged after {step} "
                 "training steps")
        super().__init__(f"{where}. {advice}")
        self.step, self.loss, self.phase = step, loss, phase


@dataclass
class Trajectory(Generic[State]):
    """What training produced so far for one run: its state at ``step`` and the recorded rows
    (``{"step": t, "train_loss": loss_t, **measures_t}``)."""

    state: State
    step: int
    records: list[dict[str, float]] = field(default_factory=list)


class Stepper(Protocol[State]):
    """The ``b`` runs of a batch, as the loop sees them."""

    def step(self, state: State, t: int) -> tuple[State, np.ndarray]:
        """The state after outer step ``t``, and each run's loss at ``state``, shape (b,)."""
        ...

    def finite(self, state: State) -> np.ndarray:
        """Per run, shape (b,), whether its part of ``state`` is all finite."""
        ...

    def measures(self, state: State, indices: Sequence[int]) -> list[dict[str, float]]:
        """The measures recorded for the runs ``indices`` at ``state``, one dict per run in
        that order (all at once, so a batch can compute them together)."""
        ...

    def take(self, state: State, index: int) -> Any:
        """Run ``index``'s own state, valid whatever the batch computes next."""
        ...

    def park(self, state: State, stopped: np.ndarray) -> None:
        """Overwrite the ``stopped`` runs (mask (b,)) of ``state`` with harmless values, so
        the batch goes on computing with finite numbers."""
        ...


@runtime_checkable
class BlockStepper(Stepper[State], Protocol[State]):
    """A deterministic :class:`Stepper` that can also take many steps in one call."""

    def advance(self, state: State, t: int, count: int
                ) -> tuple[State, np.ndarray, np.ndarray] | None:
        """Outer steps ``t, ..., t + count - 1`` from ``state`` (left valid), computed exactly
        as ``count`` calls of ``step`` would: the state after them, each run's loss at the
        state before each step, ``losses`` (count, b), and whether each run's state after
        each step is finite, ``finite`` (count, b); ``None`` where this batch steps one at a
        time (e.g. on a device), which the loop then does to the end without asking again."""
        ...


LOG = "log"
"""The ``record_every`` of the geometric record grid (:class:`RecordSchedule`)."""

POINTS_PER_DECADE = 20
"""Grid points per decade of the geometric record grid."""


def _grid_point(j: int) -> int:
    """The ``j``-th point of the geometric grid, ``round(10^(j / POINTS_PER_DECADE))``: the
    one formula both :meth:`RecordSchedule.contains` and :meth:`RecordSchedule.steps` use."""
    return round(10.0 ** (j / POINTS_PER_DECADE))


@dataclass(frozen=True)
class RecordSchedule:
    """Which steps ``t`` of a run of ``last`` (= T) outer steps record their measures: step 0,
    step ``last``, and

    - ``every = n`` (an integer >= 1): every multiple of ``n``;
    - ``every = "log"``: the geometric grid ``{round(10^(j/20)) : j = 0, 1, 2, ...}``, each
      step once: every step from 1 to 11, then about :data:`POINTS_PER_DECADE` steps per
      decade, evenly spaced in log t (so curves on log axes have points in every decade);

    and the steps of ``extra`` (such as those evaluated during training, ``eval.at_steps``).

    :meth:`contains` is O(1) and :meth:`steps` a lazy iterator: neither allocates memory
    proportional to ``last`` (``last`` may be 10^12). Raises :class:`ArgumentError` for a
    negative ``last`` or an ``every`` that is neither an integer >= 1 nor ``"log"``.
    """

    last: int
    every: int | str
    extra: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if isinstance(self.last, bool) or not isinstance(self.last, int | np.integer) \
                or self.last < 0:
            raise ArgumentError("steps", f"must be an integer >= 0, got {self.last!r}")
        if self.every != LOG and (isinstance(self.every, bool)
                                  or not isinstance(self.every, int | np.integer)
                                  or self.every < 1):
            raise ArgumentError("record_every", f"must be an integer >= 1 or {LOG!r}, got "
                                f"{self.every!r}")

    def contains(self, t: int) -> bool:
        """Whether measures are recorded at step ``t`` (O(1))."""
        if t < 0 or t > self.last:
            return False
        if t == 0 or t == self.last or t in self.extra:
            return True
        if self.every != LOG:
            return t % self.every == 0
        # round(10^(j/20)) == t needs t - 1/2 <= 10^(j/20) <= t + 1/2: a few j to try
        lo = math.floor(POINTS_PER_DECADE * math.log10(t - 0.5)) - 1
        hi = math.ceil(POINTS_PER_DECADE * math.log10(t + 0.5)) + 1
        return any(_grid_point(j) == t for j in range(max(lo, 0), hi + 1))

    def steps(self) -> Iterator[int]:
        """Every recorded step, increasing, lazily."""
        extra = sorted(t for t in set(self.extra) if 0 < t < self.last)
        merged = heapq.merge(self._grid_steps(), extra)
        previous = -1
        for t in merged:
            if t > previous:
                yield t
                previous = t

    def _grid_steps(self) -> Iterator[int]:
        """The steps of ``every`` (with 0 and ``last``), increasing, lazily."""
        if self.every != LOG:
            yield from range(0, self.last + 1, self.every)
            if self.last % self.every:
                yield self.last
            return
        yield 0
        previous, j = 0, 0
        while (t := _grid_point(j)) < self.last:
            if t > previous:
                yield t
                previous = t
            j += 1
        if self.last > 0:
            yield self.last


def is_diverging(loss: float | np.ndarray, reference: float | np.ndarray) -> bool | np.ndarray:
    """Whether ``loss`` means divergence: non-finite, or more than ``EXPLOSION_FACTOR`` times
    the ``reference`` loss (the loss at the first step trained); elementwise for arrays."""
    with np.errstate(over="ignore", invalid="ignore"):
        return ~np.isfinite(loss) | (loss > EXPLOSION_FACTOR * np.maximum(reference, 1e-12))


def _references(trajectories: Sequence[Trajectory[Any]]) -> np.ndarray:
    """Each run's reference loss: its first recorded loss, ``nan`` when it has no record yet
    (then the loss of its first step trained here)."""
    return np.array([t.records[0]["train_loss"] if t.records else math.nan
                     for t in trajectories], dtype=float)


def train(
    stepper: Stepper[State],
    state: State,
    trajectories: Sequence[Trajectory[Any]],
    *,
    schedule: RecordSchedule,
    advice: Sequence[str],
    on_record: Callable[[int, Trajectory[Any]], None] | None = None,
    progress: bool = True,
) -> list[Diverged | None]:
    """Step the ``b`` runs of ``state`` (one :class:`Trajectory` each, all at the same step)
    up to ``schedule.last``, recording at the steps of ``schedule``.

    At every step ``t`` each run still training is tested by the divergence rule (module
    docstring); a :class:`BlockStepper` takes the steps between two records in one call
    (:func:`_advance_block`); at record steps (``schedule.steps()``) its record is appended to its
    trajectory, whose state is set to ``take(state, i)``, and ``on_record(i, trajectory)`` is
    called (e.g. to write a checkpoint). A run that ends (diverged, or at ``schedule.last``)
    keeps its state at that step. Floating-point overflow inside ``step`` is not an error
    (numpy's warnings are silenced there): it shows as a non-finite or exploding loss or
    state.

    **Returns** per run its :class:`Diverged` (``advice[i]`` says what to change), or ``None``
    when it reached ``schedule.last``; the trajectories hold everything recorded either way.
    """
    b = len(trajectories)
    start = {trajectory.step for trajectory in trajectories}
    if len(start) != 1:
        raise ValueError(f"the runs of a batch must start at one step, got {sorted(start)}")
    t = start.pop()
    steps = schedule.last
    reference = _references(trajectories)
    active = np.ones(b, dtype=bool)
    outcome: list[Diverged | None] = [None] * b
    records = (s for s in schedule.steps() if s >= t)  # lazily, in order
    next_record = next(records)
    bar = tqdm(total=steps, initial=t, disable=not progress, unit="step", dynamic_ncols=True,
               leave=False)
    blocks = isinstance(stepper, BlockStepper)
    try:
        while True:
            if blocks and next_record > t + 1:
                advanced = _advance_block(stepper, state, t, next_record - t, active,
                                          reference)
                if advanced is None:  # this batch steps one at a time
                    blocks = False
                else:
                    state, done, reference = advanced
                    t += done
                    bar.update(done)
            with np.errstate(over="ignore", invalid="ignore"):  # inf - inf: a diverged state
                new, losses = stepper.step(state, t)
                if np.isnan(reference).any():
                    reference = np.where(np.isnan(reference), losses, reference)
                exploded = active & is_diverging(losses, reference)
                last = t >= steps
                blown = (np.zeros(b, dtype=bool) if last
                         else active & ~exploded & ~stepper.finite(new))
            if t == next_record:
                recording = [int(i) for i in np.flatnonzero(active & ~exploded)
                             if not _has_record(trajectories[i], t)]
                measured = stepper.measures(state, recording) if recording else []
                for i, measures in zip(recording, measured, strict=True):
                    _record(stepper, state, t, i, float(losses[i]), measures, trajectories[i],
                            on_record)
                if b == 1:
                    bar.set_postfix(loss=f"{losses[0]:.4g}", refresh=False)
                next_record = next(records, -1)
            ending = exploded | blown | (active & last)
            for i in np.flatnonzero(ending):
                outcome[i] = (Diverged(t, float(losses[i]), advice[i]) if exploded[i] else
                              Diverged(t + 1, math.nan, advice[i]) if blown[i] else None)
                trajectories[i].state, trajectories[i].step = stepper.take(state, i), t
            active &= ~ending
            if not active.any():
                return outcome
            if ending.any():
                stepper.park(new, ending)
            state, t = new, t + 1
            bar.update(1)
    finally:
        bar.close()


def _advance_block(stepper: BlockStepper[State], state: State, t: int, count: int,
                   active: np.ndarray, reference: np.ndarray
                   ) -> tuple[State, int, np.ndarray] | None:
    """Steps ``t, ..., t + count - 1`` (none of them a record step nor the last) in one call,
    up to the first at which an ``active`` run ends by the divergence rule: returns the state
    at ``t + done`` and ``done`` (the steps taken: ``count`` when no run ends, else the steps
    before the ending one, which the caller then takes as a single step), and the reference
    losses (set from the block's first losses where still ``nan``). ``None`` where the
    stepper does not advance this batch in blocks."""
    block = stepper.advance(state, t, count)
    if block is None:
        return None
    new, losses, finite = block
    if np.isnan(reference).any():
        reference = np.where(np.isnan(reference), losses[0], reference)
    with np.errstate(over="ignore", invalid="ignore"):
        ends = active & (is_diverging(losses, reference) | ~finite)
    ending = np.flatnonzero(ends.any(axis=1))
    if ending.size == 0:
        return new, count, reference
    done = int(ending[0])
    if done == 0:
        return state, 0, reference
    replayed = stepper.advance(state, t, done)
    assert replayed is not None
    return replayed[0], done, reference


def _has_record(trajectory: Trajectory[Any], t: int) -> bool:
    """Whether ``trajectory`` holds its record at step ``t`` already (a resumed run)."""
    return bool(trajectory.records) and trajectory.records[-1]["step"] == t


def _record(stepper: Stepper[State], state: State, t: int, i: int, loss: float,
            measures: dict[str, float], trajectory: Trajectory[Any],
            on_record: Callable[[int, Trajectory[Any]], None] | None) -> None:
    """Append run ``i``'s record at step ``t`` (its loss and ``measures``)."""
    trajectory.records.append({"step": t, "train_loss": loss, **measures})
    trajectory.state, trajectory.step = stepper.take(state, i), t
    if on_record is not None:
        on_record(i, trajectory)
