"""One experiment from a config: build its backend, train it, evaluate it, write every output.

:func:`prepare` does everything that can fail on bad input (validation, loading files) before
anything is written and returns the run's :class:`~metarep.run.backends.Backend`;
:func:`run_experiment` then trains it through the training loop (:func:`metarep.run.loop.train`) and
writes its directory (:mod:`metarep.run.rundir`). :func:`run_batch` runs many
``tasks.n: infinite`` configs that differ only in :data:`BATCH_KEYS` as one computation, with
the same outputs as :func:`run_experiment` of each.
"""

from __future__ import annotations

import functools
import json
import math
import time
from collections.abc import Callable, Mapping, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from metarep.core.evaluation import EvalRow
from metarep.core.infinite import InfiniteTaskState
from metarep.errors import ConfigError
from metarep.run.backends import Backend, build_backend
from metarep.run.backends.infinite import batched_stepper
from metarep.run.backends.linear import LinearModelRun, evaluate_together
from metarep.run.interrupts import deferred_interrupts
from metarep.run.loop import Diverged, RecordSchedule, Trajectory, is_diverging, train
from metarep.run.provenance import provenance
from metarep.run.rundir import (
    CHECKPOINT,
    CONFIG,
    EVAL_COLUMNS,
    METRICS,
    RunDirectory,
    check_output_dir,
    corrupt_file,
)
from metarep.run.schema import Config, dump_yaml, flatten, to_dict, written_as
from metarep.run.sinks import RunIdentity, Sinks, check_installed

if TYPE_CHECKING:
    import pandas as pd

CHECKPOINT_SECONDS = 10.0
"""A running run writes ``metrics.csv`` and ``checkpoint.npz`` at most this often (default)."""

OnRecord = Callable[[Trajectory[Any]], None]
"""A hook called after each record of a run, with its trajectory (state, step, records)."""


@dataclass(frozen=True)
class RunResult:
    """What a finished (or diverged) run produced. ``params``: the final ``(B, w)``, or the
    final engine state for ``model.kind: relu``."""

    out_dir: Path
    status: str
    records: list[dict[str, float]]
    eval_rows: list[EvalRow]
    params: Any
    summary: dict[str, Any]

    @functools.cached_property
    def metrics(self) -> pd.DataFrame:
        """The records as a table (one row per recorded step), as ``metrics.csv`` holds
        them; built on first use."""
        import pandas as pd  # only where a table is asked for: a run writes without it

        return pd.DataFrame(self.records)


def divergence_advice(config: Config) -> str:
    """What to change when a run diverges."""
    method = config.method
    return (f"Lower method.outer_lr (now {method.outer_lr:g}) and/or method.inner_lr "
            f"(now {method.inner_lr:g}), or model.init_scale (now {config.model.init_scale:g}).")


def prepare(config: Config) -> Backend:
    """Validate ``config`` against its files and build its backend (problem, pool,
    initialisation, method) after checking that the libraries of its ``log.sinks`` are
    installed. Raises :class:`~metarep.errors.ConfigError` for anything wrong with the input;
    writes nothing."""
    check_installed(config.log.sinks)
    return build_backend(config)


class _Recorder:
    """Logs each record into the run's ``sinks``, and persists a run at most every
    ``seconds`` (and on :meth:`save`): the records not yet in ``metrics.csv`` are appended to
    it, then ``checkpoint.npz`` is written with the state of the latest record and the number
    of rows it stands for; then calls ``hook``.

    A save interrupted half way (a signal, a full disk) leaves the previous checkpoint, which
    stands for rows that were all written: the next save rewrites from the end of those
    rows, and a resumed run drops whatever lies beyond them.
    """

    def __init__(self, backend: Backend, directory: RunDirectory, trajectory: Trajectory[Any],
                 seconds: float, hook: OnRecord | None, sinks: Sinks):
        self.backend, self.directory, self.seconds, self.hook = backend, directory, seconds, hook
        self.sinks = sinks
        self.saved = len(trajectory.records)  # records already in metrics.csv
        self.offset = directory.metrics_size()  # its size in bytes
        self.last = -math.inf
        self.eval_steps = set(backend.config.eval.at_steps) - directory.evaluated_steps()

    def __call__(self, index: int, trajectory: Trajectory[Any]) -> None:
        self.sinks.log(trajectory.records[-1])
        self.evaluate_at(trajectory)
        now = time.monotonic()
        if now - self.last >= self.seconds:
            self.last = now
            self.save(trajectory)
        if self.hook is not None:
            self.hook(trajectory)

    def evaluate_at(self, trajectory: Trajectory[Any]) -> None:
        """At a step of ``eval.at_steps`` not yet evaluated, evaluate the trajectory's state
        (the model at that step) into ``eval_steps.csv``."""
        if trajectory.step in self.eval_steps:
            self.eval_steps.discard(trajectory.step)
            self.directory.write_eval_at(trajectory.step, self.backend.evaluate(
                trajectory.state))

    def save(self, trajectory: Trajectory[Any]) -> None:
        """Append the unsaved records up to ``trajectory.step`` and checkpoint its state, after
        its evaluation if ``trajectory.step`` is one of ``eval.at_steps`` (so a checkpoint
        never stands for a step whose evaluation was not written)."""
        records, n = trajectory.records, len(trajectory.records)
        while n and records[n - 1]["step"] > trajectory.step:  # a record not yet taken
            n -= 1
        if n == 0:
            return
        self.evaluate_at(trajectory)
        if n > self.saved:
            self.offset = self.directory.append_metrics(records[self.saved:n], self.offset)
            self.saved = n
        self.directory.write_checkpoint(self.backend.state_arrays(trajectory.state),
                                        trajectory.step, n)


def _resumed(directory: RunDirectory, backend: Backend) -> Trajectory[Any] | None:
    """The trajectory in ``directory``'s checkpoint, if it holds one of this very config:
    its state (checked against the run's own: names, shapes, dtypes), its step (within
    ``train.steps``) and the records ``metrics.csv`` holds for it (on the run's record
    grid). :class:`ConfigError` ``--resume`` for a checkpoint of another config or a corrupt
    one."""
    checkpoint, config_text = directory.checkpoint(), directory.config_text()
    if checkpoint is None or config_text is None:
        return None
    if not written_as(config_text, backend.config):
        raise ConfigError("--resume", f"{directory.file(CONFIG)} differs from this run's "
                          "config; use a new --out directory or drop --resume")
    file = directory.file(CHECKPOINT)
    expected = backend.state_arrays(backend.initial_state())
    found = {name: (a.shape, a.dtype) for name, a in checkpoint.arrays.items()}
    wanted = {name: (a.shape, a.dtype) for name, a in expected.items()}
    if found != wanted:
        raise corrupt_file(file, f"its state {_shapes(found)} is not this run's "
                           f"{_shapes(wanted)}")
    schedule = _schedule(backend.config)
    if checkpoint.n_records == 0 or checkpoint.step > schedule.last:
        raise corrupt_file(file, f"step {checkpoint.step} with {checkpoint.n_records} records "
                           f"(train.steps = {schedule.last})")
    records = directory.recorded_metrics(checkpoint)
    off_grid = [r["step"] for r in records if not schedule.contains(r["step"])]
    if off_grid:
        raise corrupt_file(directory.file(METRICS), f"step {off_grid[0]} is not a record step "
                           "of this run")
    directory.keep_metrics(checkpoint.n_records)
    return Trajectory(backend.restore(checkpoint.arrays), checkpoint.step, records)


def _shapes(arrays: Mapping[str, tuple[tuple[int, ...], Any]]) -> str:
    return ", ".join(f"{name} {shape} {dtype}" for name, (shape, dtype) in sorted(arrays.items()))


def _check_occupant(directory: RunDirectory, resume: bool, overwrite: bool) -> None:
    """Finished work is never replaced by accident: a directory holding a finished run is
    refused unless ``overwrite``; one holding an interrupted run needs ``resume`` (continue)
    or ``overwrite`` (start again); one holding files that are not a run's is refused.
    :class:`ConfigError` naming ``--out``, before anything is written."""
    occupant, path = directory.occupant(), directory.path
    if occupant == "foreign":
        raise ConfigError("--out", f"{path} holds files that are not a run's; give an empty or "
                          "new directory")
    if occupant == "finished" and not overwrite:
        raise ConfigError("--out", f"{path} holds a finished run (summary.json); give a new "
                          "--out, or --force to replace it")
    if occupant == "interrupted" and not (resume or overwrite):
        try:
            checkpoint = directory.checkpoint()
            at = "" if checkpoint is None else f" at step {checkpoint.step}"
        except ConfigError:
            at = ", corrupt"
        raise ConfigError("--out", f"{path} holds an interrupted run (checkpoint{at}); "
                          "--resume continues it, --force starts it again")


def _begin(config: Config, out_dir: str | Path, resume: bool = False, overwrite: bool = False,
           restart_unresumable: bool = False) -> tuple[Backend, RunDirectory, Trajectory[Any]]:
    """Prepare ``config``, create ``out_dir`` and write ``config.yaml`` into it; returns the
    backend, the directory and the trajectory to train: from the checkpoint with ``resume``
    (when there is one), else from step 0 in a directory cleared of any earlier run's files.
    Raises :class:`ConfigError` before writing anything for bad input or a directory it may
    not use (:func:`_check_occupant`), and for a checkpoint that cannot be resumed (another
    config, corrupt) unless ``restart_unresumable``: then the run starts again."""
    directory = RunDirectory(check_output_dir(out_dir))
    backend = prepare(config)
    directory.create()
    _check_occupant(directory, resume, overwrite)
    directory.remove_temporaries()
    trajectory = None
    if resume:
        try:
            trajectory = _resumed(directory, backend)
        except ConfigError as error:
            if not (restart_unresumable and error.key == "--resume"):
                raise
    if trajectory is None:
        directory.clear()
        trajectory = Trajectory(backend.initial_state(), 0, [])
    directory.write_config(dump_yaml(backend.config))
    return backend, directory, trajectory


def run_experiment(config: Config, out_dir: str | Path, *, progress: bool = True,
                   resume: bool = False, overwrite: bool = False,
                   on_record: OnRecord | None = None,
                   checkpoint_seconds: float = CHECKPOINT_SECONDS,
                   restart_unresumable: bool = False, run_name: str | None = None,
                   group: str | None = None, figures: bool = True) -> RunResult:
    """Run the experiment described by ``config`` and write its outputs to ``out_dir``.

    ``resume`` continues from ``out_dir/checkpoint.npz`` (written at most every
    ``checkpoint_seconds`` while training, with the records appended to ``metrics.csv``);
    ``overwrite`` replaces the finished or interrupted run ``out_dir`` holds (without it, such
    a directory is refused); ``restart_unresumable`` starts again where the checkpoint cannot
    be resumed (another config, corrupt) instead of refusing; ``on_record`` is called after
    each record. The sinks of ``log.sinks`` (:mod:`metarep.run.sinks`) log the run as
    ``run_name`` (default: the name of ``out_dir``) in ``group`` (a sweep's name).
    ``figures`` draws ``training.png`` and ``eval.png`` (without it,
    :func:`metarep.run.figures.draw_run_figures` draws them later from the files).

    Raises :class:`ConfigError` before writing anything when the input is bad, and
    :class:`~metarep.run.loop.Diverged` (after writing what was recorded) when training, or
    the test-time adaptation, diverges. On :class:`KeyboardInterrupt` (SIGINT, and SIGTERM
    under :func:`metarep.run.interrupts.sigterm_interrupts`) the records so far and a
    checkpoint of the latest one are written before it propagates.
    """
    started, origin = time.monotonic(), provenance()
    backend, directory, trajectory = _begin(config, out_dir, resume, overwrite,
                                            restart_unresumable)
    if trajectory.step > 0:
        origin["resumed_at_step"] = trajectory.step
    identity = RunIdentity(run_name or directory.path.resolve().name, group)
    sinks = Sinks.open(backend.config, directory.path, identity, trajectory.records)
    recorder = _Recorder(backend, directory, trajectory, checkpoint_seconds, on_record, sinks)
    summary = None
    try:
        with determinism(backend):
            [diverged] = train(backend, trajectory.state, [trajectory],
                               schedule=_schedule(backend.config),
                               advice=[divergence_advice(backend.config)], on_record=recorder,
                               progress=progress)
        result, failure = _conclude(backend, directory, trajectory, started, diverged, origin,
                                    figures)
        summary = directory.summary()  # as written: plain JSON
    except KeyboardInterrupt:
        with deferred_interrupts():
            recorder.save(trajectory)
        raise
    finally:
        sinks.close(summary)
    if failure is not None:
        raise failure
    return result


def _schedule(config: Config) -> RecordSchedule:
    """The record steps of ``config``'s run (``train.steps``, ``train.record_every``, and the
    steps of ``eval.at_steps``, which are evaluated at their records)."""
    return RecordSchedule(config.train.steps, config.train.record_every, config.eval.at_steps)


BATCH_KEYS = ("method.inner_lr", "method.outer_lr", "tasks.m_in", "problem.noise_var",
              "model.seed", "eval.seed", "tasks.seed")


def batch_key(config: Config) -> str | None:
    """What the configs of one :func:`run_batch` share: for ``tasks.n: infinite``, the config
    without :data:`BATCH_KEYS` (as JSON text); ``None`` for any other config.

    The batch keys are the per-run parameters of :class:`metarep.core.infinite.ExactFOANIL`
    (``alpha``, ``beta``, ``m_in``, ``sigma^2``), the seed of each run's ``B_0``, and two seeds
    that do not enter the dynamics: ``eval.seed`` (test tasks) and ``tasks.seed`` (unused with
    infinitely many tasks)."""
    if config.tasks.n != "infinite":
        return None
    shared = {key: value for key, value in flatten(to_dict(config)).items()
              if key not in BATCH_KEYS}
    return json.dumps(shared, sort_keys=True)


def run_batch(configs: Sequence[Config], out_dirs: Sequence[str | Path], *,
              resume: bool = False, checkpoint_seconds: float = CHECKPOINT_SECONDS,
              run_names: Sequence[str] | None = None, group: str | None = None,
              figures: bool = True) -> list[RunResult | Exception]:
    """:func:`run_experiment` of each of ``configs`` into ``out_dirs``, as one batched computation.

    The configs must be ``tasks.n: infinite`` and agree on every key but :data:`BATCH_KEYS`
    (:func:`batch_key`): then they share ``B_star``, ``Sigma_star``, the shapes, the steps and
    the recording, and one stepper (:func:`metarep.run.backends.infinite.batched_stepper`)
    steps their stacked coordinates with per-run ``alpha``, ``beta``, ``m_in``, ``sigma^2``
    (each from its own ``B_0``) through the same training loop as :func:`run_experiment`. The
    results equal those of :func:`run_experiment` on each config (``summary.json`` differs in
    ``seconds``, the time since the batch started).

    Each run checkpoints into its directory as a run alone does; with ``resume`` each run
    continues from its checkpoint (one that cannot be resumed is started again), and runs
    that stopped at different steps are stepped as one batch per step, with the same
    numbers. On :class:`KeyboardInterrupt` every run's records and checkpoint are written
    before it propagates. Each run's sinks log it as ``run_names[i]`` (default: the name of
    its directory) in ``group``, as :func:`run_experiment` does, and ``figures`` draws
    each run's figures as it does.

    The runs stepped together are evaluated together too
    (:func:`metarep.run.backends.linear.evaluate_together`): those that share ``sigma^2`` and
    ``eval.seed`` on one draw of the test tasks, with their reference rows computed once,
    which gives each run the rows it gets alone.

    **Returns** per run its :class:`RunResult`, or the exception that failed it (a
    :class:`ConfigError` from :func:`prepare`, with nothing written; :class:`Diverged`, after
    writing what was recorded; any error while writing its outputs); the other runs go on.
    Raises ``ValueError`` when the configs cannot be batched.
    """
    if len(configs) != len(out_dirs):
        raise ValueError(f"{len(configs)} configs but {len(out_dirs)} output directories")
    keys = {batch_key(config) for config in configs}
    if None in keys or len(keys) > 1:
        raise ValueError("batched runs must be tasks.n: infinite configs that differ only in "
                         + ", ".join(BATCH_KEYS))
    started, origin = time.monotonic(), provenance()
    results: list[RunResult | Exception | None] = [None] * len(configs)
    runs, sinks = [], []
    for i, (config, out_dir) in enumerate(zip(configs, out_dirs, strict=True)):
        try:
            backend, directory, trajectory = _begin(config, out_dir, resume,
                                                    restart_unresumable=True)
            name = run_names[i] if run_names is not None else directory.path.resolve().name
            sinks.append(Sinks.open(backend.config, directory.path, RunIdentity(name, group),
                                    trajectory.records))
            runs.append((i, backend, directory, trajectory))
        except Exception as error:  # this run fails alone
            results[i] = error
    recorders = [_Recorder(backend, directory, trajectory, checkpoint_seconds, None, sinks[j])
                 for j, (_, backend, directory, trajectory) in enumerate(runs)]
    origins = [dict(origin) if trajectory.step == 0 else
               {**origin, "resumed_at_step": trajectory.step} for *_, trajectory in runs]
    by_step: dict[int, list[int]] = {}
    for j, (*_, trajectory) in enumerate(runs):
        by_step.setdefault(trajectory.step, []).append(j)
    try:
        for members in by_step.values():
            outcomes = _train_together([runs[j][1] for j in members],
                                       [runs[j][3] for j in members],
                                       [recorders[j] for j in members])
            evaluations = _evaluate_together([runs[j] for j in members], outcomes)
            for position, (j, diverged) in enumerate(zip(members, outcomes, strict=True)):
                i, backend, directory, trajectory = runs[j]
                try:
                    result, failure = _conclude(backend, directory, trajectory, started,
                                                diverged, origins[j], figures,
                                                evaluations.get(position))
                    results[i] = result if failure is None else failure
                    sinks[j].close(directory.summary())
                except Exception as error:  # this run fails alone
                    results[i] = error
    except KeyboardInterrupt:
        with deferred_interrupts():
            for j, recorder in enumerate(recorders):
                if results[runs[j][0]] is None:
                    recorder.save(runs[j][3])
        raise
    finally:
        for run_sinks in sinks:  # those of runs stopped before their summary
            run_sinks.close(None)
    return results


def _evaluate_together(runs: Sequence[tuple[int, Backend, RunDirectory, Trajectory[Any]]],
                       outcomes: Sequence[Diverged | None]) -> dict[int, list[EvalRow]]:
    """The evaluation rows of the trained ``runs`` that are evaluated (:func:`_evaluates`), by
    their index in ``runs``, computed together
    (:func:`metarep.run.backends.linear.evaluate_together`); empty when that fails, and each
    run is then evaluated alone (failing alone)."""
    evaluated = [j for j, ((_, backend, _, _), diverged) in enumerate(
        zip(runs, outcomes, strict=True)) if _evaluates(backend, diverged)]
    try:
        with np.errstate(over="ignore", invalid="ignore"):  # judged per run, as alone
            rows = evaluate_together([(runs[j][1], runs[j][3].state) for j in evaluated])
    except Exception:  # each run is then evaluated, and fails, alone
        return {}
    return dict(zip(evaluated, rows, strict=True))


def _train_together(backends: Sequence[Backend], trajectories: Sequence[Trajectory[Any]],
                    recorders: Sequence[_Recorder]) -> list[Diverged | None]:
    """Step ``backends`` (infinite-task runs at one step) as one batch through the loop."""
    state = InfiniteTaskState.stack([trajectory.state for trajectory in trajectories])
    with determinism(backends[0]):
        return train(batched_stepper(backends), state, trajectories,
                     schedule=_schedule(backends[0].config),
                     advice=[divergence_advice(b.config) for b in backends],
                     on_record=lambda i, trajectory: recorders[i](i, trajectory),
                     progress=False)


def determinism(backend: Backend) -> AbstractContextManager[Any]:
    """Where a linear run computes with torch (``train.backend: torch`` or a GPU) and
    ``train.deterministic`` is set, its training runs under
    :func:`metarep.engine.learner.deterministic_algorithms` (restored afterwards); otherwise
    nothing changes: numpy is deterministic, and the torch engine sets it around each of its
    own computations."""
    if not (backend.config.train.deterministic and isinstance(backend, LinearModelRun)
            and backend.xp is not np):
        return nullcontext()
    from metarep.engine.learner import deterministic_algorithms

    return deterministic_algorithms(True)


def _test_time_divergence(backend: Backend, rows: list[EvalRow]) -> Diverged | None:
    """The divergence of the test-time adaptation, by the training's rule
    (:func:`metarep.run.loop.is_diverging`) with the risk of predicting 0, ``tr(Sigma_star)``,
    as reference: an excess risk (or its standard error) of the method itself (its rows in
    ``eval.csv``) that is non-finite or more than ``EXPLOSION_FACTOR`` times that; returned
    with what to change, ``None`` when there is none."""
    zero_risk = float(np.trace(backend.inputs.problem.Sigma_star))
    bad = [row for row in rows if row.method == backend.method_name
           and (is_diverging(row.excess_risk, zero_risk) or not math.isfinite(row.stderr))]
    if not bad:
        return None
    c = backend.config
    return Diverged(c.train.steps, bad[0].excess_risk,
                    f"Excess risk {bad[0].excess_risk:g} at m_test = {bad[0].shots}: lower "
                    f"method.inner_lr (now "
                    f"{c.method.inner_lr:g}, also the test-time head step size) or "
                    f"eval.adapt_steps (now {c.eval.adapt_steps}).", phase="test")


def _evaluates(backend: Backend, diverged: Diverged | None) -> bool:
    """Whether a trained run is evaluated: unless it ``diverged`` or has no ground truth."""
    return diverged is None and backend.inputs.has_truth


def _conclude(backend: Backend, directory: RunDirectory, trajectory: Trajectory[Any],
              started: float, diverged: Diverged | None, origin: Mapping[str, Any],
              draw_figures: bool = True,
              rows: list[EvalRow] | None = None) -> tuple[RunResult, Diverged | None]:
    """Write a trained run's outputs: its evaluation (none for a run that ``diverged``; the
    ``rows`` given, computed with other runs', else its own), the final state, the figures
    (with ``draw_figures``) and, last, the summary (with ``origin``, the
    :func:`~metarep.run.provenance.provenance` of the process that started or resumed it),
    which marks the run finished; remove the checkpoint. Returns the result and the
    divergence that stopped the run, in training (``diverged``) or at test time (a
    non-finite test risk of the method: :func:`_test_time_divergence`), or ``None``."""
    state, inputs = trajectory.state, backend.inputs
    if rows is None:
        with np.errstate(over="ignore", invalid="ignore"):  # a diverging adaptation: below
            rows = backend.evaluate(state) if _evaluates(backend, diverged) else []
    failure = diverged if diverged is not None else _test_time_divergence(backend, rows)
    status, error = ("done", None) if failure is None else ("diverged", str(failure))
    directory.write_metrics(trajectory.records)
    truth = {"B_star": inputs.problem.B_star} if inputs.has_truth else {}  # else a random one
    directory.write_params({**backend.arrays(state), **truth,
                            "Sigma_star": inputs.problem.Sigma_star})
    directory.write_eval(rows)
    directory.write_held_out(backend.held_out(state) if diverged is None else [])
    final = dict(trajectory.records[-1]) if trajectory.records else {}
    theory = backend.theory(final, rows)
    if draw_figures:  # pandas and matplotlib: only when drawing
        import pandas as pd

        from metarep.run.figures import write_run_figures

        write_run_figures(directory, pd.DataFrame(trajectory.records),
                          pd.DataFrame([asdict(row) for row in rows], columns=EVAL_COLUMNS),
                          backend.config.name, theory)
    summary = {
        "status": status,
        "error": error,
        "config": backend.config.name,
        "step": trajectory.step,
        "seconds": round(time.monotonic() - started, 3),
        "final": final,
        "theory": theory,
        **({"ground_truth": dict(inputs.truth)} if inputs.truth else {}),
        "B_star_BBt_B_star": backend.projected_gram(state),
        "provenance": dict(origin),
    }
    directory.write_summary(summary)
    directory.remove_checkpoint()
    result = RunResult(directory.path, status, list(trajectory.records), rows,
                       backend.params(state), summary)
    return result, failure
