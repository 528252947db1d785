"""One experiment from a config: set up, train, evaluate, write every output.

``prepare(config)`` does everything that can fail on bad input (validation, loading files)
before anything is written; ``run(config, out_dir)`` then writes, atomically, into ``out_dir``:

- ``config.yaml``: the fully resolved config (values read from files filled in);
- ``metrics.csv``: one row per recorded step (``step`` first, then the measures);
- ``eval.csv``: ``method, shots, excess_risk, stderr, n_tasks, theory``;
- ``summary.json``: status, final measures next to the theory's predictions;
- ``params.npz``: ``B, w, B_star, Sigma_star`` (and, for ``mtl``, the per-task ``heads``;
  ``model.kind: relu`` has the network's ``W1``, [``W2``], ``w`` in place of ``B, w``);
- ``training.png`` and ``eval.png``: the training curves and the test risk against m_test.

While it trains, ``checkpoint.npz`` holds the latest recorded state so that
``run(..., resume=True)`` continues an interrupted run from there.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from metarep import plotting, population, storage
from metarep.algorithms import Method, MTLState, State, make_method
from metarep.config import Config, ConfigError, dump_yaml, flatten, to_dict
from metarep.evaluation import (
    EvalRow,
    evaluate,
    evaluate_predictors,
    feature_least_squares_predictor,
)
from metarep.metrics import measure, measure_network
from metarep.models import LinearParams, init_linear, load_params
from metarep.seeding import Purpose, seed_rng
from metarep.tasks import Problem, TaskBatch, load_pool, make_problem, sample_tasks
from metarep.theory import lambda_star, predicted_limits
from metarep.training import Diverged, Trajectory, is_diverging, record_steps, train

CHECKPOINT_SECONDS = 10.0


@dataclass(frozen=True)
class Setup:
    """Everything a run needs, built from a config without touching the output directory.

    ``config`` is the resolved config (N, d, k, k' taken from loaded files where given);
    ``has_truth`` is False when a loaded pool carries no ``B_star`` (then the measures that
    compare with the ground truth are ``nan`` and there is no test-time evaluation).
    For ``model.kind: relu``, ``params`` is the initial network and ``method`` its
    :class:`metarep.torch_engine.EngineMethod` (states are engine states).
    """

    config: Config
    problem: Problem
    has_truth: bool
    pool: TaskBatch | None
    params: LinearParams | Any
    method: Method
    Lambda_star: np.ndarray


def check_memory(key: str, n_bytes: float, what: str) -> None:
    """Raise :class:`ConfigError` naming ``key`` when ``what`` needs more than the machine's
    memory (instead of failing later with a ``MemoryError``)."""
    try:
        memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):  # no sysconf: nothing to check against
        return
    if n_bytes > memory:
        raise ConfigError(key, f"{what} needs about {n_bytes / 1e9:.3g} GB, more than the "
                          f"{memory / 1e9:.3g} GB of memory of this machine")


def _resolve_pool(config: Config) -> tuple[Config, Problem, bool, TaskBatch | None]:
    p, t = config.problem, config.tasks
    if t.from_ is None:
        m = t.m_in + t.m_out
        n, key = ((config.train.tasks_per_step, "train.tasks_per_step") if t.n == "online"
                  else (t.n, "tasks.n"))
        if isinstance(n, int):  # sampled in float64, then split: two copies of X
            check_memory(key, 16.0 * n * m * p.d, f"the task data, {key} x (tasks.m_in + "
                         f"tasks.m_out) x problem.d = {n} x {m} x {p.d} numbers,")
        problem = make_problem(p.d, p.k, p.noise_var, p.head_cov,
                               seed_rng(p.seed, Purpose.PROBLEM))
        if t.n in ("online", "infinite"):
            return config, problem, True, None
        pool = sample_tasks(problem, t.n, t.m_in, t.m_out, seed_rng(t.seed, Purpose.TASKS),
                            config.train.dtype)
        return config, problem, True, pool
    loaded = load_pool(t.from_)
    n, m, d = loaded.X.shape
    if t.m_in + t.m_out != m:
        raise ConfigError("tasks.m_in", f"tasks.m_in + tasks.m_out = {t.m_in + t.m_out} must "
                          f"equal the {m} samples per task in {t.from_}")
    k = p.k if loaded.B_star is None else loaded.B_star.shape[1]
    resolved = {"problem.d": d, "problem.k": min(k, d), "tasks.n": n}
    if config.train.tasks_per_step is not None and config.train.tasks_per_step > n:
        raise ConfigError("train.tasks_per_step", f"must be <= the {n} tasks in {t.from_}, got "
                          f"{config.train.tasks_per_step}")
    config = config.replace(**resolved)
    p = config.problem
    problem = make_problem(p.d, p.k, p.noise_var, p.head_cov, seed_rng(p.seed, Purpose.PROBLEM))
    if loaded.B_star is not None:
        problem = Problem(loaded.B_star, problem.Sigma_star, problem.noise_var)
    pool = loaded.split(t.m_in).astype(config.train.dtype)
    return config, problem, loaded.B_star is not None, pool


def prepare(config: Config) -> Setup:
    """Validate ``config`` against its files and build the problem, pool, init and method.

    Raises :class:`ConfigError` for anything wrong with the input; writes nothing.
    """
    config, problem, has_truth, pool = _resolve_pool(config)
    # Evaluation draws two or more test tasks at once, each in at most d dimensions per method.
    shots = max(config.eval.shots)
    check_memory("eval.shots", 64.0 * shots * problem.d,
                 f"test tasks of m_test = {shots} samples in d = {problem.d}")
    model, dtype, method_cfg = config.model, config.train.dtype, config.method
    Lambda = lambda_star(problem.Sigma_star, problem.noise_var, config.tasks.m_in,
                         method_cfg.inner_lr)
    if model.kind == "relu":
        config, network, engine = _network_setup(config, problem.d, pool)
        return Setup(config, problem, has_truth, pool, network, engine, Lambda)
    if model.init_from is not None:
        params = load_params(model.init_from, problem.d).astype(dtype)
        config = config.replace(**{"model.width": params.width})
    else:
        check_memory("model.width", 32.0 * problem.d * model.width,
                     f"B, problem.d x model.width = {problem.d} x {model.width}, with its updates")
        params = init_linear(problem.d, model.width, model.init_scale,
                             seed_rng(model.seed, Purpose.MODEL), dtype)
    method = make_method(method_cfg.name, method_cfg.inner_lr, method_cfg.outer_lr,
                         method_cfg.inner_steps)
    if config.tasks.n == "infinite":
        method = _infinite_method(config, problem, params)
    return Setup(config, problem, has_truth, pool, params, method, Lambda)


def _infinite_method(config: Config, problem: Problem,
                     params: LinearParams) -> population.InfiniteTaskMethod:
    """``tasks.n: infinite``: the exact expected dynamics (:mod:`metarep.population`). FO-MAML
    is exact there only from ``w_0 = 0``, where it coincides with FO-ANIL."""
    m = config.method
    if m.name == "fo-maml" and np.any(params.w != 0):
        raise ConfigError("model.init_from", "fo-maml with tasks.n: infinite needs w = 0 (its "
                          "exact dynamics are FO-ANIL's there); use fo-anil or a zero head")
    return population.InfiniteTaskMethod(m.name, problem, params, m.inner_lr, m.outer_lr,
                                         config.tasks.m_in, config.train.dtype)


def torch_modules() -> tuple[Any, Any]:
    """``(metarep.networks, metarep.torch_engine)``, imported on demand, or a
    :class:`ConfigError` naming ``model.kind`` when PyTorch is not installed."""
    try:
        from metarep import networks, torch_engine
    except ModuleNotFoundError as error:
        if error.name != "torch":
            raise
        raise ConfigError("model.kind", "relu runs need PyTorch: install metarep[torch] "
                          "(pip install 'metarep[torch]')") from None
    return networks, torch_engine


def _network_setup(config: Config, d: int, pool: TaskBatch | None) -> tuple[Config, Any, Method]:
    """The initial ReLU network (drawn, or read from ``model.init_from``) and its torch-engine
    method (``model.kind: relu``); the widths read from a file replace the configured ones."""
    networks, torch_engine = torch_modules()
    model, m = config.model, config.method
    if model.init_from is not None:
        arrays = storage.read_npz(model.init_from, "model.init_from", required=())
        network = networks.relu_from_arrays(arrays, d, model.hidden_layers)
        widths = {"model.width": int(network.w.shape[0])}
        if model.hidden_layers == 2:
            widths["model.hidden_width"] = int(network.W1.shape[1])
        config = config.replace(**widths)
    else:
        network = networks.init_relu(d, model.width, model.hidden_layers, model.hidden_width,
                                     model.init_scale, seed_rng(model.seed, Purpose.MODEL))
    base, first_order = torch_engine.split_method_name(m.name)
    learner = torch_engine.MetaLearner(
        network, networks.HEAD, method=base, first_order=first_order, inner_lr=m.inner_lr,
        outer_lr=m.outer_lr, inner_steps=m.inner_steps,
        n_tasks=None if pool is None else pool.n_tasks, device=config.train.device,
        dtype=config.train.dtype)
    return config, network, torch_engine.EngineMethod(learner, m.name)


def initial_state(setup: Setup) -> State:
    """The training state at step 0: the initial parameters, with one head per pool task for
    ``mtl`` (which :func:`metarep.config.validate` keeps off ``tasks.n: online``)."""
    return setup.method.init_state(setup.params, 0 if setup.pool is None else setup.pool.n_tasks)


def batch_source(setup: Setup) -> Callable[[int], TaskBatch]:
    """The tasks used at outer step ``t``.

    Whole pool; or ``train.tasks_per_step`` tasks of the pool drawn without replacement; or,
    for ``tasks.n: online``, that many fresh tasks. Step ``t`` draws from its own seeded
    stream (``tasks.seed``, sub-stream ``(1, t)``), so a resumed run draws the same tasks.
    """
    config = setup.config
    size, seed = config.train.tasks_per_step, config.tasks.seed
    if config.tasks.n == "infinite":
        return lambda t: None  # the exact dynamics average over all tasks
    if setup.pool is None:
        t_cfg = config.tasks
        return lambda t: sample_tasks(setup.problem, size, t_cfg.m_in, t_cfg.m_out,
                                      seed_rng(seed, Purpose.TASKS, 1, t), config.train.dtype)
    pool = setup.pool
    if size is None or size == pool.n_tasks:
        return lambda t: pool
    return lambda t: pool.take(
        seed_rng(seed, Purpose.TASKS, 1, t).choice(pool.n_tasks, size, replace=False))


def divergence_advice(config: Config) -> str:
    """What to change when a run diverges."""
    m = config.method
    return (f"Lower method.outer_lr (now {m.outer_lr:g}) and/or method.inner_lr "
            f"(now {m.inner_lr:g}), or model.init_scale (now {config.model.init_scale:g}).")


@dataclass(frozen=True)
class RunResult:
    """What a finished (or diverged) run produced."""

    out_dir: Path
    status: str
    metrics: pd.DataFrame
    eval_rows: list[EvalRow]
    params: LinearParams | Any  # model.kind relu: the final engine state
    summary: dict[str, Any]


LIMIT_MEASURES = ("train_loss", "perp_norm", "subspace_dist", "lambda_err", "head_norm")


def _theory_comparison(setup: Setup, final: dict[str, float],
                       rows: list[EvalRow]) -> dict[str, Any]:
    """Final measures next to their predicted limits (infinite tasks, t -> inf,
    :func:`metarep.theory.predicted_limits`), and the test risk of the method next to its
    closed form at the learned ``(B, w)`` and at the predicted limit."""
    c = setup.config
    limits = predicted_limits(setup.problem.Sigma_star, setup.problem.noise_var, c.tasks.m_in,
                              c.method.inner_lr, c.eval.shots)
    if isinstance(setup.method, population.InfiniteTaskMethod):
        limits["perp_norm"] = setup.method.predicted_perp_limit()
    regimes = {"infinite": "infinitely many tasks (exact expected dynamics)",
               "online": "fresh tasks every step"}
    regime = regimes.get(str(c.tasks.n), f"a pool of {c.tasks.n} tasks")
    return {
        "lambda_star": setup.Lambda_star,
        "limits": {name: {"final": final.get(name), "theory": limits[name]}
                   for name in LIMIT_MEASURES},
        "test_risk": [{"shots": row.shots, "simulated": row.excess_risk, "stderr": row.stderr,
                       "closed_form": row.theory, "limit": limits["test_risk"].get(row.shots)}
                      for row in rows if row.method == setup.method.name],
        "regime": regime,
        "note": "limits as t -> infinity for infinitely many tasks from w_0 = 0 (spec section "
        "4); a finite pool stops at a floor set by N, m and the noise. closed_form: the "
        "expected one-step test risk at the learned (B, w) (metarep.theory.adapted_risk)",
    }


def _figure_limits(theory: dict[str, Any]) -> dict[str, float]:
    """The predicted limits drawn on ``training.png``."""
    return {name: value["theory"] for name, value in theory["limits"].items()
            if value["theory"] is not None}


def _projected_gram(setup: Setup, params: LinearParams) -> np.ndarray:
    projected = setup.problem.B_star.T @ params.B.astype(np.float64)
    return projected @ projected.T


def state_arrays(state: State | Any) -> dict[str, np.ndarray]:
    """Named arrays of a training state (``checkpoint.npz``, ``params.npz``): the fields of a
    linear state, or an engine state's parameters by name (``model.kind: relu``)."""
    return state._asdict() if isinstance(state, tuple) else state.arrays()


def restore_state(initial: State | Any, arrays: Mapping[str, np.ndarray], dtype: str) -> Any:
    """A state of the same kind as ``initial`` holding ``arrays`` (from :func:`state_arrays`)."""
    if isinstance(initial, tuple):
        return initial._make(arrays[name].astype(dtype) for name in initial._fields)
    return initial.with_arrays(arrays)


def state_measures(setup: Setup, state: State | Any) -> dict[str, float]:
    """The measures recorded for ``state``: those of :func:`metarep.metrics.measure`, or for a
    ReLU network those of :func:`metarep.metrics.measure_network`."""
    truth = setup.problem if setup.has_truth else None
    if setup.config.model.kind == "relu":
        return measure_network(state_arrays(state), truth)
    if isinstance(setup.method, population.InfiniteTaskMethod):
        return setup.method.measure(state)  # from the coordinates, no d-sized work
    return measure(state, truth, setup.Lambda_star)


class _Recorder:
    """Persists metrics and a checkpoint at most every ``CHECKPOINT_SECONDS``."""

    def __init__(self, out_dir: Path):
        self.out_dir = out_dir
        self.last = 0.0

    def __call__(self, trajectory: Trajectory[State], force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self.last < CHECKPOINT_SECONDS:
            return
        self.last = now
        write_metrics(self.out_dir, trajectory.records)
        storage.write_npz(self.out_dir / "checkpoint.npz", **state_arrays(trajectory.state),
                          step=np.array(trajectory.step),
                          records=np.array(json.dumps(trajectory.records)))


def write_metrics(out_dir: Path, records: list[dict[str, float]]) -> None:
    """Atomically write ``metrics.csv`` (``step`` first)."""
    storage.write_text(out_dir / "metrics.csv", pd.DataFrame(records).to_csv(index=False))


def _resume_trajectory(out_dir: Path, setup: Setup) -> Trajectory[State] | None:
    checkpoint = out_dir / "checkpoint.npz"
    config_file = out_dir / "config.yaml"
    if not checkpoint.is_file() or not config_file.is_file():
        return None
    if config_file.read_text() != dump_yaml(setup.config):
        raise ConfigError("--resume", f"{config_file} differs from this run's config; use a new "
                          "--out directory or drop --resume")
    initial, dtype = initial_state(setup), setup.config.train.dtype
    with np.load(checkpoint, allow_pickle=False) as data:
        state = restore_state(initial, data, dtype)
        return Trajectory(state, int(data["step"]), json.loads(str(data["records"])))


def _begin(config: Config, out_dir: str | Path,
           resume: bool = False) -> tuple[Setup, Path, Trajectory[State]]:
    """Prepare ``config``, create ``out_dir`` and write ``config.yaml`` into it; returns the
    setup, the directory and the trajectory to train (from step 0, or from the checkpoint
    with ``resume``). Raises :class:`ConfigError` before writing anything for bad input."""
    setup = prepare(config)
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise ConfigError("--out", f"{out} exists and is not a directory")
    out.mkdir(parents=True, exist_ok=True)
    trajectory = _resume_trajectory(out, setup) if resume else None
    storage.write_text(out / "config.yaml", dump_yaml(setup.config))
    if trajectory is None:
        trajectory = Trajectory(initial_state(setup), 0, [])
    return setup, out, trajectory


def _conclude(setup: Setup, out: Path, trajectory: Trajectory[State], started: float,
              diverged: Diverged | None = None) -> RunResult:
    """Write a trained run's outputs into ``out``: the evaluation and every file of
    :func:`run`; for a run that ``diverged``, what was recorded (no evaluation)."""
    if diverged is not None:
        return _finish(out, setup, trajectory, [], "diverged", str(diverged), started)
    rows = evaluate_state(setup, trajectory.state) if setup.has_truth else []
    return _finish(out, setup, trajectory, rows, "done", None, started)


def run(config: Config, out_dir: str | Path, *, progress: bool = True,
        resume: bool = False) -> RunResult:
    """Run the experiment described by ``config`` and write its outputs to ``out_dir``.

    Raises :class:`ConfigError` before writing anything when the input is bad, and
    :class:`Diverged` (after writing what was recorded) when training diverges.
    """
    started = time.monotonic()
    setup, out, trajectory = _begin(config, out_dir, resume)
    config = setup.config
    recorder = _Recorder(out)
    batches, method = batch_source(setup), setup.method
    try:
        train(
            lambda state, t: method.step(state, batches(t)),
            trajectory,
            steps=config.train.steps,
            record_every=config.train.record_every,
            measure=lambda state: state_measures(setup, state),
            is_finite=lambda state: state.is_finite(),
            advice=divergence_advice(config),
            on_record=recorder,
            progress=progress,
        )
    except Diverged as error:
        _conclude(setup, out, trajectory, started, error)
        raise
    return _conclude(setup, out, trajectory, started)


BATCH_KEYS = ("method.inner_lr", "method.outer_lr", "tasks.m_in", "problem.noise_var",
              "model.seed", "eval.seed", "tasks.seed")


def infinite_batch_key(config: Config) -> str | None:
    """What the configs of one :func:`run_infinite_batch` share: for ``tasks.n: infinite``, the
    config without :data:`BATCH_KEYS` (as JSON text); ``None`` for any other config.

    The batch keys are the per-run parameters of :class:`metarep.population.ExactFOANIL`
    (``alpha``, ``beta``, ``m_in``, ``sigma^2``), the seed of each run's ``B_0``, and two seeds
    that do not enter the dynamics: ``eval.seed`` (test tasks) and ``tasks.seed`` (unused with
    infinitely many tasks)."""
    if config.tasks.n != "infinite":
        return None
    shared = {key: value for key, value in flatten(to_dict(config)).items()
              if key not in BATCH_KEYS}
    return json.dumps(shared, sort_keys=True)


def run_infinite_batch(configs: Sequence[Config],
                       out_dirs: Sequence[str | Path]) -> list[RunResult | Exception]:
    """:func:`run` of each of ``configs`` into ``out_dirs``, as one batched computation.

    The configs must be ``tasks.n: infinite`` and agree on every key but :data:`BATCH_KEYS`
    (:func:`infinite_batch_key`): then they share ``B_star``, ``Sigma_star``, the shapes, the
    steps and the recording, and one :class:`metarep.population.ExactFOANIL` steps their stacked
    coordinates with per-run ``alpha``, ``beta``, ``m_in``, ``sigma^2`` (each from its own
    ``B_0``). The results equal those of :func:`run` on each config: every run is prepared by
    :func:`prepare` (the same frame and initial coordinates), the batched step computes each
    run's slice with the same operations as a step of one run, and the records, the divergence
    test (:func:`metarep.training.is_diverging`, every step), the evaluation and the files go
    through the code of :func:`run` (``summary.json`` differs in ``seconds``, the time since the
    batch started). There is no checkpoint: an interrupted batch is redone.

    **Returns** per run its :class:`RunResult`, or the exception that failed it (a
    :class:`ConfigError` from :func:`prepare`, with nothing written; :class:`Diverged`, after
    writing what was recorded; any error while writing its outputs); the other runs go on.
    Raises ``ValueError`` when the configs cannot be batched.
    """
    if len(configs) != len(out_dirs):
        raise ValueError(f"{len(configs)} configs but {len(out_dirs)} output directories")
    keys = {infinite_batch_key(config) for config in configs}
    if None in keys or len(keys) > 1:
        raise ValueError("batched runs must be tasks.n: infinite configs that differ only in "
                         + ", ".join(BATCH_KEYS))
    started = time.monotonic()
    results: list[RunResult | Exception | None] = [None] * len(configs)
    runs = []
    for i, (config, out_dir) in enumerate(zip(configs, out_dirs, strict=True)):
        try:
            runs.append((i, *_begin(config, out_dir)))
        except Exception as error:  # this run fails alone
            results[i] = error
    diverged = _train_batch([setup for _, setup, _, _ in runs],
                            [trajectory for *_, trajectory in runs])
    for (i, setup, out, trajectory), error in zip(runs, diverged, strict=True):
        try:
            result = _conclude(setup, out, trajectory, started, error)
            results[i] = result if error is None else error
        except Exception as failure:  # this run fails alone
            results[i] = failure
    return results


def _train_batch(setups: list[Setup],
                 trajectories: list[Trajectory[population.RunState]]) -> list[Diverged | None]:
    """Train the infinite-task runs ``setups`` from step 0 in lockstep (see
    :func:`run_infinite_batch`), each as :func:`metarep.training.train` does: at step ``t``
    the loss of the state ``t`` is tested for divergence and recorded with the measures at the
    record steps, then the new state is tested for finiteness. A run that diverges stops there
    (its trajectory keeps the state and records up to ``t``; the batch carries it on as zeros).
    Returns each run's :class:`Diverged`, or ``None`` when it reached ``train.steps``."""
    if not setups:
        return []
    configs = [setup.config for setup in setups]
    state = population.PopulationState(
        np.concatenate([trajectory.state.coords.H for trajectory in trajectories]),
        np.concatenate([trajectory.state.coords.omega for trajectory in trajectories]))
    dynamics = population.ExactFOANIL(
        setups[0].problem.Sigma_star, [c.method.inner_lr for c in configs],
        [c.method.outer_lr for c in configs], [c.tasks.m_in for c in configs],
        [setup.problem.noise_var for setup in setups], state.H.shape, configs[0].train.dtype)
    steps = configs[0].train.steps
    when = record_steps(steps, configs[0].train.record_every)
    outcome: list[Diverged | None] = [None] * len(setups)
    training, reference, t = np.ones(len(setups), dtype=bool), None, 0

    def one(batch: population.PopulationState, i: int) -> population.RunState:
        return population.RunState(population.PopulationState(
            batch.H[i:i + 1], batch.omega[i:i + 1]), setups[i].method.frame)

    while training.any():
        with np.errstate(over="ignore", invalid="ignore"):
            new, losses = dynamics.step(state)
        reference = losses.copy() if reference is None else reference
        exploded = training & is_diverging(losses, reference)
        going = training & ~exploded
        if t in when:
            for i in np.flatnonzero(going):
                trajectories[i].records.append({"step": t, "train_loss": float(losses[i]),
                                                **state_measures(setups[i], one(state, i))})
        last = t >= steps
        blown = np.zeros_like(going) if last else going & ~new.finite()
        ending = exploded | blown | (going & last)
        for i in np.flatnonzero(ending):
            advice = divergence_advice(configs[i])
            outcome[i] = (Diverged(t, float(losses[i]), advice) if exploded[i] else
                          Diverged(t + 1, math.nan, advice) if blown[i] else None)
            trajectories[i].state = population.RunState(population.PopulationState(
                state.H[i:i + 1].copy(), state.omega[i:i + 1].copy()), setups[i].method.frame)
            trajectories[i].step = t
        training &= ~ending
        new.H[ending], new.omega[ending] = 0.0, 0.0
        state, t = new, t + 1
    return outcome


def evaluate_state(setup: Setup, state: State) -> list[EvalRow]:
    """Test-time evaluation, the same for every method: ``eval.adapt_steps`` head steps of size
    ``method.inner_lr`` from the learned head. ``mtl`` has no meta-learned head (its heads
    belong to the training tasks), so it starts from ``w = 0`` and adds the row ``mtl-lsq``:
    least squares on the learned features ``X B``."""
    if setup.config.model.kind == "relu":
        return _evaluate_network(setup, state)
    e, per_task = setup.config.eval, isinstance(state, MTLState)
    params = LinearParams(state.B, np.zeros_like(state.w)) if per_task else state
    return evaluate(params, setup.problem, setup.method.name, e.shots, e.n_tasks,
                    setup.config.method.inner_lr, e.adapt_steps, e.seed,
                    features_row=f"{setup.method.name}-lsq" if per_task else None)


def _evaluate_network(setup: Setup, state: Any) -> list[EvalRow]:
    """:func:`evaluate_state` for a ReLU network: the same head steps, through the torch
    engine, scored by :func:`metarep.evaluation.evaluate_predictors` (the excess risk
    ``E_x (f(x) - x^T B_star w_star)^2`` estimated with fresh inputs); ``mtl`` starts from
    ``w = 0`` and adds ``mtl-lsq``, least squares on the learned features ``phi(x)``."""
    e, name, learner = setup.config.eval, setup.method.name, setup.method.learner
    per_task = state.heads is not None
    predictors = {name: learner.test_predictor(state.params, e.adapt_steps,
                                               setup.config.method.inner_lr, from_zero=per_task)}
    if per_task:
        predictors[f"{name}-lsq"] = feature_least_squares_predictor(
            learner.feature_map(state.params), setup.problem)
    return evaluate_predictors(predictors, setup.problem, e.shots, e.n_tasks, e.seed)


def _finish(out: Path, setup: Setup, trajectory: Trajectory[State], rows: list[EvalRow],
            status: str, error: str | None, started: float) -> RunResult:
    state, network = trajectory.state, setup.config.model.kind == "relu"
    params = state if network else LinearParams(state.B, state.w)
    write_metrics(out, trajectory.records)
    truth = {"B_star": setup.problem.B_star} if setup.has_truth else {}  # else a random one
    storage.write_npz(out / "params.npz", **state_arrays(state), **truth,
                      Sigma_star=setup.problem.Sigma_star)
    eval_frame = pd.DataFrame([asdict(row) for row in rows],
                              columns=["method", "shots", "excess_risk", "stderr", "n_tasks",
                                       "theory"])
    if rows:
        storage.write_text(out / "eval.csv", eval_frame.to_csv(index=False))
    else:  # no evaluation: leave no stale results of an earlier run in this directory
        for stale in ("eval.csv", "eval.png"):
            (out / stale).unlink(missing_ok=True)
    final = dict(trajectory.records[-1]) if trajectory.records else {}
    summary = {
        "status": status,
        "error": error,
        "config": setup.config.name,
        "step": trajectory.step,
        "seconds": round(time.monotonic() - started, 3),
        "final": final,
        "theory": None if network else _theory_comparison(setup, final, rows),
        "B_star_BBt_B_star": (_projected_gram(setup, params) if setup.has_truth and not network
                              else None),
    }
    storage.write_json(out / "summary.json", summary)
    metrics = pd.DataFrame(trajectory.records)
    plotting.save_training_figure(metrics, out / "training.png", setup.config.name,
                                  None if network else _figure_limits(summary["theory"]))
    if rows:
        plotting.save_eval_figure(eval_frame, out / "eval.png", setup.config.name)
    (out / "checkpoint.npz").unlink(missing_ok=True)
    return RunResult(out, status, metrics, rows, params, summary)
