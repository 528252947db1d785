"""The record schedule of the training loop (:class:`metarep.run.loop.RecordSchedule`): which
steps record, for an integer ``record_every`` and for the geometric grid ``"log"``; O(1)
membership and no memory proportional to the number of steps."""

from __future__ import annotations

import itertools
import math
import tracemalloc

import numpy as np
import pytest

from metarep.errors import ArgumentError
from metarep.run.loop import POINTS_PER_DECADE, RecordSchedule, Trajectory, train


def _grid(last: int) -> list[int]:
    """The definition, spelled out: 0, the distinct round(10^(j/20)) below ``last``, and
    ``last``."""
    points = sorted({round(10 ** (j / 20)) for j in range(20 * 13)} - {0})
    return [0, *(t for t in points if t < last), *([last] if last > 0 else [])]


@pytest.mark.parametrize("last", [0, 1, 2, 5, 10, 11, 12, 13, 100, 300, 1000, 12345])
def test_log_steps_are_the_grid(last):
    assert list(RecordSchedule(last, "log").steps()) == _grid(last)


def test_log_steps_for_small_T():
    assert list(RecordSchedule(0, "log").steps()) == [0]
    assert list(RecordSchedule(1, "log").steps()) == [0, 1]
    assert list(RecordSchedule(12, "log").steps()) == [*range(12), 12]
    assert list(RecordSchedule(30, "log").steps()) == [*range(12), 13, 14, 16, 18, 20, 22, 25,
                                                       28, 30]


def test_log_steps_for_a_million_steps():
    """First 10 steps all recorded, >= 15 points in every decade from 10 on (the decade
    [1, 10) holds all its 9 integers), strictly increasing, the last step recorded."""
    steps = list(RecordSchedule(10**6, "log").steps())
    assert steps[:11] == list(range(11))
    assert steps[-1] == 10**6 and steps[0] == 0
    assert all(a < b for a, b in itertools.pairwise(steps))
    for decade in range(1, 6):
        inside = [t for t in steps if 10**decade <= t < 10 ** (decade + 1)]
        assert len(inside) >= 15, (decade, inside)
        assert len(inside) <= POINTS_PER_DECADE + 1
    assert len(steps) < 140
    ratios = np.diff(np.log10(steps[12:]))  # beyond the integers: evenly spaced in log t
    assert ratios.max() < 2.5 / POINTS_PER_DECADE


def test_last_step_is_always_recorded():
    for last in [*range(0, 200), 10**6 + 3, 999_999]:
        schedule = RecordSchedule(last, "log")
        assert schedule.contains(last)
        assert list(schedule.steps())[-1] == last
        assert not schedule.contains(last + 1) and not schedule.contains(-1)


@pytest.mark.parametrize("every", ["log", 1, 7, 50])
@pytest.mark.parametrize("last", [0, 1, 49, 50, 2000])
def test_contains_agrees_with_steps_at_every_step(every, last):
    schedule = RecordSchedule(last, every)
    steps = list(schedule.steps())
    assert steps == sorted(set(steps))  # strictly increasing
    assert [t for t in range(-3, last + 4) if schedule.contains(t)] == steps


def test_contains_agrees_with_steps_around_large_grid_points():
    """Around every grid point up to 10^9: each is contained, its neighbours only when they
    are grid points too."""
    schedule = RecordSchedule(10**9, "log")
    steps = list(schedule.steps())
    on_grid = set(steps)
    for t in steps:
        for u in (t - 1, t, t + 1):
            assert schedule.contains(u) == (u in on_grid), u


def test_integer_schedule_is_every_multiple_plus_the_last_step():
    assert list(RecordSchedule(60, 25).steps()) == [0, 25, 50, 60]
    assert list(RecordSchedule(50, 25).steps()) == [0, 25, 50]
    assert list(RecordSchedule(0, 25).steps()) == [0]
    assert RecordSchedule(60, 25).contains(60) and not RecordSchedule(60, 25).contains(59)


def test_a_trillion_steps_cost_no_memory():
    """T = 10^12: building the schedule and querying it allocates a few bytes, not O(T);
    its steps are a lazy iterator of ~240 steps."""
    tracemalloc.start()
    try:
        schedule = RecordSchedule(10**12, "log")
        assert schedule.contains(0) and schedule.contains(10**12)
        assert schedule.contains(round(10 ** (201 / 20))) and schedule.contains(10**11)
        assert not schedule.contains(10**11 + 1) and not schedule.contains(10**12 - 1)
        assert not schedule.contains(123_456_789_012)
        iterator = schedule.steps()
        assert list(itertools.islice(iterator, 12)) == list(range(12))
        count = 12 + sum(1 for _ in iterator)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 100_000
    assert 12 * POINTS_PER_DECADE - 20 < count < 12 * POINTS_PER_DECADE + 2
    every = RecordSchedule(10**12, 1)  # an integer schedule is lazy too
    assert every.contains(10**12 - 1)
    assert next(itertools.islice(every.steps(), 10**6, None)) == 10**6


@pytest.mark.parametrize("every", ["loga", "LOG", 0, -1, 1.5, True, None])
def test_bad_record_every_is_an_argument_error(every):
    with pytest.raises(ArgumentError) as error:
        RecordSchedule(10, every)
    assert error.value.argument == "record_every"


@pytest.mark.parametrize("last", [-1, 1.0, None])
def test_bad_last_step_is_an_argument_error(last):
    with pytest.raises(ArgumentError) as error:
        RecordSchedule(last, "log")
    assert error.value.argument == "steps"


class CountingStepper:
    """A batch of one whose state is the step count and whose loss decays like 1 / (t + 1)."""

    def step(self, state, t):
        return state + 1, np.array([1.0 / (t + 1)])

    def finite(self, state):
        return np.array([True])

    def measures(self, state, indices):
        return [{"state": float(state)} for _ in indices]

    def take(self, state, index):
        return state

    def park(self, state, stopped):
        pass


@pytest.mark.parametrize("every", ["log", 9])
def test_train_records_exactly_the_schedule(every):
    schedule = RecordSchedule(500, every)
    trajectory = Trajectory(0, 0)
    seen = []
    [outcome] = train(CountingStepper(), 0, [trajectory], schedule=schedule,
                      advice=["none"], on_record=lambda i, tr: seen.append(tr.step),
                      progress=False)
    assert outcome is None and trajectory.step == 500
    steps = list(schedule.steps())
    assert [r["step"] for r in trajectory.records] == steps == seen
    assert all(r["state"] == r["step"] for r in trajectory.records)
    assert trajectory.records[-1]["train_loss"] == pytest.approx(1 / 501)
    assert math.isclose(trajectory.records[0]["train_loss"], 1.0)
