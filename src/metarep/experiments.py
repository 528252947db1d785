"""One experiment from a config: set up, train, evaluate, write every output.

``prepare(config)`` does everything that can fail on bad input (validation, loading files)
before anything is written; ``run(config, out_dir)`` then writes, atomically, into ``out_dir``:

- ``config.yaml``: the fully resolved config (values read from files filled in);
- ``metrics.csv``: one row per recorded step (``step`` first, then the measures);
- ``eval.csv``: ``method, shots, excess_risk, stderr, n_tasks, theory``;
- ``summary.json``: status, final measures next to the theory's predictions;
- ``params.npz``: ``B, w, B_star, Sigma_star``;
- ``training.png`` and ``eval.png``: the training curves and the test risk against m_test.

While it trains, ``checkpoint.npz`` holds the latest recorded state so that
``run(..., resume=True)`` continues an interrupted run from there.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from metarep import plotting, storage
from metarep.algorithms import Method, make_method
from metarep.config import Config, ConfigError, dump_yaml
from metarep.evaluation import EvalRow, evaluate
from metarep.metrics import measure
from metarep.models import LinearParams, init_linear, load_params
from metarep.tasks import Problem, TaskBatch, load_pool, make_problem, sample_tasks
from metarep.theory import lambda_star
from metarep.training import Diverged, Trajectory, train

CHECKPOINT_SECONDS = 10.0


@dataclass(frozen=True)
class Setup:
    """Everything a run needs, built from a config without touching the output directory.

    ``config`` is the resolved config (N, d, k, k' taken from loaded files where given);
    ``has_truth`` is False when a loaded pool carries no ``B_star`` (then the measures that
    compare with the ground truth are ``nan`` and there is no test-time evaluation).
    """

    config: Config
    problem: Problem
    has_truth: bool
    pool: TaskBatch | None
    params: LinearParams
    method: Method
    Lambda_star: np.ndarray


def seed_rng(seed: int, *stream: int) -> np.random.Generator:
    """The generator of ``seed`` for the sub-stream ``stream`` (via ``SeedSequence``)."""
    return np.random.default_rng(np.random.SeedSequence(seed, spawn_key=stream))


def _resolve_pool(config: Config) -> tuple[Config, Problem, bool, TaskBatch | None]:
    p, t = config.problem, config.tasks
    if t.from_ is None:
        problem = make_problem(p.d, p.k, p.noise_var, p.head_cov, seed_rng(p.seed))
        if t.n == "online":
            return config, problem, True, None
        pool = sample_tasks(problem, t.n, t.m_in, t.m_out, seed_rng(t.seed), config.train.dtype)
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
    problem = make_problem(p.d, p.k, p.noise_var, p.head_cov, seed_rng(p.seed))
    if loaded.B_star is not None:
        problem = Problem(loaded.B_star, problem.Sigma_star, problem.noise_var)
    pool = loaded.split(t.m_in).astype(config.train.dtype)
    return config, problem, loaded.B_star is not None, pool


def prepare(config: Config) -> Setup:
    """Validate ``config`` against its files and build the problem, pool, init and method.

    Raises :class:`ConfigError` for anything wrong with the input; writes nothing.
    """
    config, problem, has_truth, pool = _resolve_pool(config)
    model, dtype = config.model, config.train.dtype
    if model.init_from is not None:
        params = load_params(model.init_from, problem.d).astype(dtype)
        config = config.replace(**{"model.width": params.width})
    else:
        params = init_linear(problem.d, model.width, model.init_scale, seed_rng(model.seed), dtype)
    method_cfg = config.method
    method = make_method(method_cfg.name, method_cfg.inner_lr, method_cfg.outer_lr,
                         method_cfg.inner_steps)
    Lambda = lambda_star(problem.Sigma_star, problem.noise_var, config.tasks.m_in,
                         method_cfg.inner_lr)
    return Setup(config, problem, has_truth, pool, params, method, Lambda)


def batch_source(setup: Setup) -> Callable[[int], TaskBatch]:
    """The tasks used at outer step ``t``.

    Whole pool; or ``train.tasks_per_step`` tasks of the pool drawn without replacement; or,
    for ``tasks.n: online``, that many fresh tasks. Step ``t`` draws from its own seeded
    stream (``tasks.seed``, stream ``(1, t)``), so a resumed run draws the same tasks.
    """
    config = setup.config
    size, seed = config.train.tasks_per_step, config.tasks.seed
    if setup.pool is None:
        t_cfg = config.tasks
        return lambda t: sample_tasks(setup.problem, size, t_cfg.m_in, t_cfg.m_out,
                                      seed_rng(seed, 1, t), config.train.dtype)
    pool = setup.pool
    if size is None or size == pool.n_tasks:
        return lambda t: pool
    return lambda t: pool.take(seed_rng(seed, 1, t).choice(pool.n_tasks, size, replace=False))


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
    params: LinearParams
    summary: dict[str, Any]


def _theory_comparison(setup: Setup, final: dict[str, float]) -> dict[str, Any]:
    """Final measures next to their predicted limits (infinite tasks, t -> inf)."""
    return {
        "lambda_star": setup.Lambda_star,
        "limits": {
            "perp_norm": {"final": final.get("perp_norm"), "theory": 0.0},
            "head_norm": {"final": final.get("head_norm"), "theory": 0.0},
            "lambda_err": {"final": final.get("lambda_err"), "theory": 0.0},
        },
        "note": "limits as t -> infinity for infinitely many tasks (spec section 4); a "
        "finite pool stops at a floor set by N, m and the noise",
    }


def _projected_gram(setup: Setup, params: LinearParams) -> np.ndarray:
    projected = setup.problem.B_star.T @ params.B.astype(np.float64)
    return projected @ projected.T


class _Recorder:
    """Persists metrics and a checkpoint at most every ``CHECKPOINT_SECONDS``."""

    def __init__(self, out_dir: Path):
        self.out_dir = out_dir
        self.last = 0.0

    def __call__(self, trajectory: Trajectory[LinearParams], force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self.last < CHECKPOINT_SECONDS:
            return
        self.last = now
        write_metrics(self.out_dir, trajectory.records)
        storage.write_npz(self.out_dir / "checkpoint.npz", B=trajectory.state.B,
                          w=trajectory.state.w, step=np.array(trajectory.step),
                          records=np.array(json.dumps(trajectory.records)))


def write_metrics(out_dir: Path, records: list[dict[str, float]]) -> None:
    """Atomically write ``metrics.csv`` (``step`` first)."""
    storage.write_text(out_dir / "metrics.csv", pd.DataFrame(records).to_csv(index=False))


def _resume_trajectory(out_dir: Path, setup: Setup) -> Trajectory[LinearParams] | None:
    checkpoint = out_dir / "checkpoint.npz"
    config_file = out_dir / "config.yaml"
    if not checkpoint.is_file() or not config_file.is_file():
        return None
    if config_file.read_text() != dump_yaml(setup.config):
        raise ConfigError("--resume", f"{config_file} differs from this run's config; use a new "
                          "--out directory or drop --resume")
    with np.load(checkpoint, allow_pickle=False) as data:
        params = LinearParams(data["B"], data["w"]).astype(setup.config.train.dtype)
        return Trajectory(params, int(data["step"]), json.loads(str(data["records"])))


def run(config: Config, out_dir: str | Path, *, progress: bool = True,
        resume: bool = False) -> RunResult:
    """Run the experiment described by ``config`` and write its outputs to ``out_dir``.

    Raises :class:`ConfigError` before writing anything when the input is bad, and
    :class:`Diverged` (after writing what was recorded) when training diverges.
    """
    started = time.monotonic()
    setup = prepare(config)
    config = setup.config
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    trajectory = _resume_trajectory(out, setup) if resume else None
    storage.write_text(out / "config.yaml", dump_yaml(config))
    if trajectory is None:
        trajectory = Trajectory(setup.params, 0, [])
    recorder = _Recorder(out)
    batches, problem = batch_source(setup), setup.problem
    truth = problem if setup.has_truth else None
    method = setup.method
    try:
        train(
            lambda params, t: method.step(params, batches(t)),
            trajectory,
            steps=config.train.steps,
            record_every=config.train.record_every,
            measure=lambda params: measure(params, truth, setup.Lambda_star),
            is_finite=LinearParams.is_finite,
            advice=divergence_advice(config),
            on_record=recorder,
            progress=progress,
        )
    except Diverged as error:
        _finish(out, setup, trajectory, [], "diverged", str(error), started)
        raise
    rows = []
    if setup.has_truth:
        e = config.eval
        rows = evaluate(trajectory.state, problem, method.name, e.shots, e.n_tasks,
                        config.method.inner_lr, e.adapt_steps, e.seed)
    return _finish(out, setup, trajectory, rows, "done", None, started)


def _finish(out: Path, setup: Setup, trajectory: Trajectory[LinearParams], rows: list[EvalRow],
            status: str, error: str | None, started: float) -> RunResult:
    params = trajectory.state
    write_metrics(out, trajectory.records)
    storage.write_npz(out / "params.npz", B=params.B, w=params.w, B_star=setup.problem.B_star,
                      Sigma_star=setup.problem.Sigma_star)
    eval_frame = pd.DataFrame([asdict(row) for row in rows],
                              columns=["method", "shots", "excess_risk", "stderr", "n_tasks",
                                       "theory"])
    if rows:
        storage.write_text(out / "eval.csv", eval_frame.to_csv(index=False))
    final = dict(trajectory.records[-1]) if trajectory.records else {}
    summary = {
        "status": status,
        "error": error,
        "config": setup.config.name,
        "step": trajectory.step,
        "seconds": round(time.monotonic() - started, 3),
        "final": final,
        "theory": _theory_comparison(setup, final),
        "B_star_BBt_B_star": _projected_gram(setup, params) if setup.has_truth else None,
    }
    storage.write_json(out / "summary.json", summary)
    metrics = pd.DataFrame(trajectory.records)
    plotting.save_training_figure(metrics, out / "training.png", setup.config.name)
    if rows:
        plotting.save_eval_figure(eval_frame, out / "eval.png", setup.config.name)
    (out / "checkpoint.npz").unlink(missing_ok=True)
    return RunResult(out, status, metrics, rows, params, summary)
