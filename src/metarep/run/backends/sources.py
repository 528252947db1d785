"""Where a run's problem and tasks come from: the resolved config, the problem (drawn, or
with the ``B_star`` of a user's pool), the task pool, and the tasks of each outer step.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from metarep.core.problem import Problem, make_problem
from metarep.core.seeding import Purpose, seed_rng
from metarep.core.tasks import TaskBatch, TaskPool, sample_tasks
from metarep.errors import ConfigError
from metarep.run.inputs import check_memory, config_errors, load_heldout, load_pool
from metarep.run.schema import Config, flatten, to_dict


@dataclass(frozen=True)
class RunInputs:
    """A run's config and data, built without touching the output directory.

    ``config`` is the resolved config (N, d, k taken from a loaded pool where given);
    ``has_truth`` is False when a loaded pool carries no ``B_star`` (then the measures that
    compare with the ground truth are ``nan`` and no test-time evaluation on fresh tasks);
    ``pool`` is the task pool, or ``None`` for online and infinitely many tasks; ``heldout``
    the held-out tasks of ``tasks.test_from``, or ``None``.
    """

    config: Config
    problem: Problem
    has_truth: bool
    pool: TaskBatch | None
    heldout: TaskPool | None = None


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
    check_memory("eval.shots", 64.0 * shots * inputs.problem.d,
                 f"test tasks of m_test = {shots} samples in d = {inputs.problem.d}")
    return inputs


def _generated(config: Config) -> RunInputs:
    p, t = config.problem, config.tasks
    m = t.m_in + t.m_out
    n, key = ((config.train.tasks_per_step, "train.tasks_per_step") if t.n == "online"
              else (t.n, "tasks.n"))
    if isinstance(n, int):  # sampled in float64, then split: two copies of X
        check_memory(key, 16.0 * n * m * p.d, f"the task data, {key} x (tasks.m_in + "
                     f"tasks.m_out) x problem.d = {n} x {m} x {p.d} numbers,")
    problem = _problem(config)
    if t.n in ("online", "infinite"):
        return RunInputs(config, problem, True, None)
    pool = sample_tasks(problem, t.n, t.m_in, t.m_out, seed_rng(t.seed, Purpose.TASKS),
                        config.train.dtype)
    return RunInputs(config, problem, True, pool)


def _loaded(config: Config) -> RunInputs:
    p, t = config.problem, config.tasks
    loaded = load_pool(t.from_)
    n, m, d = loaded.X.shape
    if t.m_in + t.m_out != m:
        raise ConfigError("tasks.m_in", f"tasks.m_in + tasks.m_out = {t.m_in + t.m_out} must "
                          f"equal the {m} samples per task in {t.from_}")
    k = p.k if loaded.B_star is None else loaded.B_star.shape[1]
    if config.train.tasks_per_step is not None and config.train.tasks_per_step > n:
        raise ConfigError("train.tasks_per_step", f"must be <= the {n} tasks in {t.from_}, got "
                          f"{config.train.tasks_per_step}")
    resolved = {"problem.d": d, "problem.k": min(k, d), "tasks.n": n}
    if loaded.noise_var is not None:
        resolved["problem.noise_var"] = loaded.noise_var
    if loaded.Sigma_star is not None:
        resolved["problem.head_cov"] = [float(v) for v in np.diag(loaded.Sigma_star)]
    _refuse_contradictions(config, resolved, t.from_)
    config = config.replace(**resolved)
    problem = _problem(config)
    if loaded.B_star is not None:
        problem = Problem(loaded.B_star, problem.Sigma_star, problem.noise_var)
    pool = loaded.split(t.m_in).astype(config.train.dtype)
    heldout = (None if t.test_from is None else
               load_heldout(t.test_from, d, config.eval.shots))
    return RunInputs(config, problem, loaded.B_star is not None, pool, heldout)


def _refuse_contradictions(config: Config, resolved: dict[str, object], path: str) -> None:
    """A key the user set explicitly (:attr:`Config.explicit`) that the pool file fixes
    otherwise is refused; the base config's values are replaced by the file's."""
    current = flatten(to_dict(config))  # sequences as lists, as in ``resolved``
    for key, value in resolved.items():
        given = current[key]
        if key in config.explicit and given != value:
            raise ConfigError(key, f"{given!r} contradicts the {value!r} of {path}; drop it "
                              "or set it to the file's value")


def task_source(inputs: RunInputs) -> Callable[[int], TaskBatch]:
    """The tasks used at outer step ``t`` of a run on a pool or on online tasks.

    Whole pool; or ``train.tasks_per_step`` tasks of the pool drawn without replacement; or,
    for ``tasks.n: online``, that many fresh tasks. Step ``t`` draws from its own seeded
    stream (``tasks.seed``, sub-stream ``(1, t)``), so a resumed run draws the same tasks.
    """
    config, pool = inputs.config, inputs.pool
    size, seed, dtype = config.train.tasks_per_step, config.tasks.seed, config.train.dtype
    if pool is None:
        m_in, m_out = config.tasks.m_in, config.tasks.m_out
        return lambda t: sample_tasks(inputs.problem, size, m_in, m_out,
                                      seed_rng(seed, Purpose.TASKS, 1, t), dtype)
    if size is None or size == pool.n_tasks:
        return lambda t: pool
    return lambda t: pool.take(
        seed_rng(seed, Purpose.TASKS, 1, t).choice(pool.n_tasks, size, replace=False))
