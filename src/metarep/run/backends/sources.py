"""Where a run's problem and tasks come from: the resolved config, the problem (drawn, or
with the ``B_star`` of a user's pool), the task pool, and the tasks of each outer step.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from metarep.core.problem import Problem, diagonal_frame, make_problem
from metarep.core.seeding import Purpose, seed_rng, seed_sequence
from metarep.core.tasks import (
    TaskBatch,
    TaskPool,
    head_second_moment,
    residual_noise_var,
    sample_tasks,
    task_pool,
)
from metarep.errors import ConfigError
from metarep.run.inputs import (
    check_heldout,
    check_memory,
    check_time,
    config_errors,
    load_heldout,
    load_pool,
    torch_module,
)
from metarep.run.loop import LOG
from metarep.run.schema import Config, flatten, to_dict


@dataclass(frozen=True)
class RunInputs:
    """A run's config and data, built without touching the output directory.

    ``config`` is the resolved config (N, d, k taken from a loaded pool where given);
    ``has_truth`` is False when a loaded pool carries no ``B_star`` (then the measures that
    compare with the ground truth are ``nan`` and no test-time evaluation on fresh tasks);
    ``pool`` is the task pool, or ``None`` for online and infinitely many tasks; ``heldout``
    the held-out tasks of ``tasks.test_from``, or ``None``; ``truth`` says, for a pool file
    with ``B_star``, where ``B_star``, ``problem.head_cov`` and ``problem.noise_var`` came from.
    """

    config: Config
    problem: Problem
    has_truth: bool
    pool: TaskBatch | None
    heldout: TaskPool | None = None
    truth: Mapping[str, str] = dataclasses.field(default_factory=dict)


def _problem(config: Config) -> Problem:
    p = config.problem
    with config_errors("problem.head_cov"):
        return make_problem(p.d, p.k, p.noise_var, p.head_cov, seed_rng(p.seed, Purpose.PROBLEM))


def resolve_inputs(config: Config) -> RunInputs:
    """Draw the problem and the pool of ``config`` (or read the pool of ``tasks.from``, whose
    N and d replace the configured ones), refusing sizes that cannot fit in memory.

    Raises :class:`~metarep.errors.ConfigError` for anything wrong with the input.
    """
    inputs = _generated(config) if config.tasks.from_ is None else _loaded(config)
    # Evaluation draws two or more test tasks at once, each in at most d dimensions per method.
    shots = max(inputs.config.eval.shots)
    check_memory("eval.shots", shots, 64.0 * inputs.problem.d,
                 f"test tasks of m_test = {shots} samples in d = {inputs.problem.d}")
    _check_run_size(config)
    return inputs


RECORD_BYTES = 1000.0
"""Memory of one recorded row (about a dozen measures) while a run holds its records."""
EVAL_BYTES_PER_TASK = 128.0
"""Memory per test task of the evaluation: each row's per-task risks, then joined."""
STEP_SECONDS_FLOOR = 2e-6
"""The least time an outer step takes, whatever the run (the smallest exact infinite-task run,
d = 3 and k' = 1, takes about 1e-5 s per step on a 2-core machine, its steps between records
in one compiled call; this allows a machine 5 times faster)."""


def _check_run_size(config: Config) -> None:
    """Refuse a run whose records (``train.steps`` / ``train.record_every`` rows) or whose
    evaluation (``eval.n_tasks`` risks per row) cannot be held in memory, or whose steps
    cannot finish within a year even at :data:`STEP_SECONDS_FLOOR` each, naming the key."""
    train = config.train
    check_time("train.steps", train.steps, STEP_SECONDS_FLOOR,
               f"train.steps = {train.steps:,} outer steps")
    if train.record_every != LOG:
        check_memory("train.steps", train.steps, RECORD_BYTES / train.record_every,
                     f"recording every {train.record_every} of train.steps = {train.steps:,} "
                     "steps (raise train.record_every, or use log)")
    check_memory("eval.n_tasks", config.eval.n_tasks, EVAL_BYTES_PER_TASK,
                 f"evaluating on eval.n_tasks = {config.eval.n_tasks:,} test tasks")


def _generated(config: Config) -> RunInputs:
    p, t = config.problem, config.tasks
    m = t.m_in + t.m_out
    n, key = ((config.train.tasks_per_step, "train.tasks_per_step") if t.n == "online"
              else (t.n, "tasks.n"))
    if isinstance(n, int):  # sampled in float64, then split: two copies of X
        check_memory(key, n, 16.0 * m * p.d, f"the task data, {key} x (tasks.m_in + "
                     f"tasks.m_out) x problem.d = {n} x {m} x {p.d} numbers,")
    problem = _problem(config)
    draw = task_sampler(config, problem)  # refuses tasks.sampler: torch without torch
    if t.n in ("online", "infinite"):
        return RunInputs(config, problem, True, None)
    return RunInputs(config, problem, True, draw(t.n, seed_sequence(t.seed, Purpose.TASKS)))


def task_sampler(config: Config, problem: Problem
                 ) -> Callable[[int, np.random.SeedSequence], TaskBatch]:
    """``draw(n, seed)``: ``n`` fresh tasks of ``problem`` with the config's ``tasks.m_in``,
    ``tasks.m_out`` and ``train.dtype``, drawn from the stream of ``seed`` by
    ``tasks.sampler`` (numpy: :func:`~metarep.core.tasks.sample_tasks`; torch:
    :func:`metarep.engine.tasks.sample_tasks_torch`, a :class:`ConfigError` naming
    ``tasks.sampler`` without PyTorch)."""
    t, dtype = config.tasks, config.train.dtype
    if t.sampler == "torch":
        engine_tasks = torch_module("tasks", "tasks.sampler", "the torch sampler needs")
        sample = engine_tasks.sample_tasks_torch
        return lambda n, seed: sample(problem, n, t.m_in, t.m_out, seed, dtype)
    return lambda n, seed: sample_tasks(problem, n, t.m_in, t.m_out,
                                        np.random.default_rng(seed), dtype)


def _loaded(config: Config) -> RunInputs:
    p, t = config.problem, config.tasks
    loaded, heldout = _held_out(config, load_pool(t.from_))
    n, m, d = loaded.X.shape
    if t.m_in + t.m_out != m:
        raise ConfigError("tasks.m_in", f"tasks.m_in + tasks.m_out = {t.m_in + t.m_out} must "
                          f"equal the {m} samples per task in {t.from_}")
    if loaded.heads is not None and loaded.B_star is None:
        raise ConfigError("tasks.from", f"{t.from_} has heads but no B_star: heads are the "
                          "coordinates of w_star in B_star's frame; add B_star or drop heads")
    k = p.k if loaded.B_star is None else loaded.B_star.shape[1]
    if config.train.tasks_per_step is not None and config.train.tasks_per_step > n:
        raise ConfigError("train.tasks_per_step", f"must be <= the {n} tasks in {t.from_}, got "
                          f"{config.train.tasks_per_step}")
    stated: dict[str, object] = {"problem.d": d, "problem.k": min(k, d), "tasks.n": n}
    if loaded.noise_var is not None:
        stated["problem.noise_var"] = loaded.noise_var
    if loaded.Sigma_star is not None:
        stated["problem.head_cov"] = [float(v) for v in np.diag(loaded.Sigma_star)]
    _refuse_contradictions(config, stated, t.from_)
    loaded, estimated = _estimated_truth(config, loaded)
    config = config.replace(**stated, **estimated)
    problem = _problem(config)
    if loaded.B_star is not None:
        problem = Problem(loaded.B_star, problem.Sigma_star, problem.noise_var)
    pool = loaded.split(t.m_in).astype(config.train.dtype)
    truth = ({} if loaded.B_star is None else
             {"B_star": "tasks.from", **{key: _source(key, stated, estimated, config)
                                         for key in ("problem.head_cov", "problem.noise_var")}})
    return RunInputs(config, problem, loaded.B_star is not None, pool, heldout, truth)


def _held_out(config: Config, pool: TaskPool) -> tuple[TaskPool, TaskPool | None]:
    """The tasks to train on and the held-out tasks: ``tasks.test_from``'s, the last
    ``tasks.test_split`` of the pool, or none."""
    t, shots = config.tasks, config.eval.shots
    if t.test_from is not None:
        return pool, load_heldout(t.test_from, pool.X.shape[2], shots)
    if not t.test_split:
        return pool, None
    n = pool.X.shape[0]
    if not 2 <= t.test_split <= n - 1:
        raise ConfigError("tasks.test_split", f"must be 0 or in [2, N - 1] = [2, {n - 1}] for "
                          f"the {n} tasks of {t.from_}, got {t.test_split}")
    train, held = slice(0, n - t.test_split), slice(n - t.test_split, n)
    kept = dataclasses.replace(pool, X=pool.X[train], y=pool.y[train],
                               heads=None if pool.heads is None else pool.heads[train])
    return kept, check_heldout(task_pool(pool.X[held], pool.y[held]), shots,
                               "tasks.test_split", f"the tasks held out of {t.from_}")


def _estimated_truth(config: Config, pool: TaskPool) -> tuple[TaskPool, dict[str, object]]:
    """What the heads of a pool with ``B_star`` tell of the truth the file does not state, for
    the keys the user did not set: ``problem.noise_var`` (the mean squared residual,
    :func:`~metarep.core.tasks.residual_noise_var`) and ``problem.head_cov`` (the eigenvalues
    of the heads' second moment, :func:`~metarep.core.tasks.head_second_moment`; the pool is
    then written in its eigenframe, :func:`~metarep.core.problem.diagonal_frame`, where that
    covariance is diagonal). Returns the pool (rotated or not) and the estimated keys."""
    if pool.B_star is None or pool.heads is None:
        return pool, {}
    estimated: dict[str, object] = {}
    if pool.noise_var is None and "problem.noise_var" not in config.explicit:
        estimated["problem.noise_var"] = residual_noise_var(pool)
    if pool.Sigma_star is None and "problem.head_cov" not in config.explicit:
        V, eigenvalues = diagonal_frame(head_second_moment(pool.heads))
        if eigenvalues[-1] <= 1e-12 * max(eigenvalues[0], 1e-300):
            raise ConfigError("tasks.from", f"the heads of {config.tasks.from_} span fewer "
                              f"than k = {pool.heads.shape[1]} dimensions, so they give no head "
                              "covariance; add Sigma_star or set problem.head_cov")
        estimated["problem.head_cov"] = [float(v) for v in eigenvalues]
        pool = dataclasses.replace(pool, B_star=pool.B_star @ V, heads=pool.heads @ V)
    return pool, estimated


def _source(key: str, stated: Mapping[str, object], estimated: Mapping[str, object],
            config: Config) -> str:
    """Where the run's value of ``key`` came from (``summary.json``'s ``ground_truth``)."""
    if key in stated:
        return "tasks.from"
    if key in estimated:
        return "estimated from the heads of tasks.from"
    if key in config.explicit:
        return "set in the config"
    return "config default (tasks.from states no value and has no heads)"


def _refuse_contradictions(config: Config, resolved: dict[str, object], path: str) -> None:
    """A key the user set explicitly (:attr:`Config.explicit`) that the pool file fixes
    otherwise is refused; the base config's values are replaced by the file's."""
    current = flatten(to_dict(config))  # sequences as lists, as in ``resolved``
    for key, value in resolved.items():
        given = current[key]
        if key in config.explicit and given != value:
            raise ConfigError(key, f"{given!r} contradicts the {value!r} of {path}; drop it "
                              "or set it to the file's value")


def task_source(inputs: RunInputs, xp: Any = np) -> Callable[[int], TaskBatch]:
    """The tasks used at outer step ``t`` of a run on a pool or on online tasks, as arrays of
    the namespace ``xp`` (numpy, or torch on a device: :mod:`metarep.core.arrays`).

    Whole pool; or ``train.tasks_per_step`` tasks of the pool drawn without replacement; or,
    for ``tasks.n: online``, that many fresh tasks. Step ``t`` draws from its own seeded
    stream (``tasks.seed``, sub-stream ``(1, t)``), so a resumed run draws the same tasks.
    The draws are those of ``tasks.sampler`` (:func:`task_sampler`) whatever ``xp`` is, so
    every namespace gets the same tasks; a pool moves to ``xp`` once, fresh tasks at each
    step.
    """
    config = inputs.config
    size, seed = config.train.tasks_per_step, config.tasks.seed
    if inputs.pool is None:
        draw = task_sampler(config, inputs.problem)
        return lambda t: draw(size, seed_sequence(seed, Purpose.TASKS, 1, t)).on(xp)
    pool = inputs.pool if xp is np else inputs.pool.on(xp)
    if size is None or size == pool.n_tasks:
        return lambda t: pool
    return lambda t: pool.take(xp.asarray(
        seed_rng(seed, Purpose.TASKS, 1, t).choice(pool.n_tasks, size, replace=False)))
