"""Seeds to random streams: every draw of a run comes from its config's seeds.

Each seed key of a config feeds one *purpose*: ``problem.seed`` draws ``B_star``,
``tasks.seed`` the task pool (and the tasks of each step), ``model.seed`` the initialisation,
``eval.seed`` the test tasks. The purpose is part of the ``SeedSequence`` spawn key, so equal
seed values for different keys still give independent streams (with one plain stream per
value, ``model.seed = problem.seed`` would draw ``B_0`` from the very numbers that made
``B_star``).
"""

from __future__ import annotations

from enum import IntEnum

import numpy as np


class Purpose(IntEnum):
    """What a random stream is for (the first entry of its spawn key)."""

    PROBLEM = 0
    TASKS = 1
    MODEL = 2
    EVAL = 3


def seed_sequence(seed: int, purpose: Purpose, *stream: int) -> np.random.SeedSequence:
    """The ``SeedSequence`` of ``seed`` for ``purpose`` and the sub-stream ``stream``."""
    return np.random.SeedSequence(seed, spawn_key=(int(purpose), *stream))


def seed_rng(seed: int, purpose: Purpose, *stream: int) -> np.random.Generator:
    """A generator on :func:`seed_sequence` ``(seed, purpose, *stream)``."""
    return np.random.default_rng(seed_sequence(seed, purpose, *stream))
