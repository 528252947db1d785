"""One experiment from a config: build its backend, train it, evaluate it, write every output.

:func:`prepare` does everything that can fail on bad input (validation, loading files) before
anything is written and returns the run's :class:`~metarep.run.backends.Backend`;
:func:`run_experiment` then trains it through the training loop (:func:`metarep.run.loop.train`) and
writes its directory (:mod:`metarep.run.rundir`). :func:`run_batch` runs many
``tasks.n: infinite`` configs that differ only in :data:`BATCH_KEYS` as one computation, with
the same outputs as :func:`run_experiment` of each.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from metarep.core.evaluation import EvalRow
from metarep.core.infinite import InfiniteTaskState
from metarep.errors import ConfigError
from metarep.run import figures
from metarep.run.backends import Backend, build_backend
from metarep.run.backends.infinite import batched_stepper
from metarep.run.loop import Diverged, RecordSchedule, Trajectory, train
from metarep.run.provenance import provenance
from metarep.run.rundir import (
    CONFIG,
    EVAL_FIGURE,
    TRAINING_FIGURE,
    RunDirectory,
    check_output_dir,
)
from metarep.run.schema import Config, dump_yaml, flatten, to_dict

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
    metrics: pd.DataFrame
    eval_rows: list[EvalRow]
    params: Any
    summary: dict[str, Any]


def divergence_advice(config: Config) -> str:
    """What to change when a run diverges."""
    method = config.method
    return (f"Lower method.outer_lr (now {method.outer_lr:g}) and/or method.inner_lr "
            f"(now {method.inner_lr:g}), or model.init_scale (now {config.model.init_scale:g}).")


def prepare(config: Config) -> Backend:
    """Validate ``config`` against its files and build its backend (problem, pool,
    initialisation, method). Raises :class:`~metarep.errors.ConfigError` for anything wrong
    with the input; writes nothing."""
    return build_backend(config)


class _Recorder:
    """Persists the metrics and a checkpoint at most every ``seconds``, then calls ``hook``."""

    def __init__(self, backend: Backend, directory: RunDirectory, seconds: float,
                 hook: OnRecord | None):
        self.backend, self.directory, self.seconds, self.hook = backend, directory, seconds, hook
        self.last = 0.0

    def __call__(self, index: int, trajectory: Trajectory[Any]) -> None:
        now = time.monotonic()
        if now - self.last >= self.seconds:
            self.last = now
            self.directory.write_metrics(trajectory.records)
            self.directory.write_checkpoint(self.backend.arrays(trajectory.state),
                                            trajectory.step, trajectory.records)
        if self.hook is not None:
            self.hook(trajectory)


def _resumed(directory: RunDirectory, backend: Backend) -> Trajectory[Any] | None:
    """The trajectory in ``directory``'s checkpoint, if it holds one of this very config."""
    checkpoint, config_text = directory.checkpoint(), directory.config_text()
    if checkpoint is None or config_text is None:
        return None
    if config_text != dump_yaml(backend.config):
        raise ConfigError("--resume", f"{directory.file(CONFIG)} differs from this run's "
                          "config; use a new --out directory or drop --resume")
    return Trajectory(backend.restore(checkpoint.arrays), checkpoint.step, checkpoint.records)


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
                          "--out, or --overwrite to replace it")
    if occupant == "interrupted" and not (resume or overwrite):
        checkpoint = directory.checkpoint()
        step = "" if checkpoint is None else f" at step {checkpoint.step}"
        raise ConfigError("--out", f"{path} holds an interrupted run (checkpoint{step}); "
                          "--resume continues it, --overwrite starts it again")


def _begin(config: Config, out_dir: str | Path, resume: bool = False,
           overwrite: bool = False) -> tuple[Backend, RunDirectory, Trajectory[Any]]:
    """Prepare ``config``, create ``out_dir`` and write ``config.yaml`` into it; returns the
    backend, the directory and the trajectory to train (from step 0, or from the checkpoint
    with ``resume``). Raises :class:`ConfigError` before writing anything for bad input or a
    directory it may not use (:func:`_check_occupant`); ``overwrite`` first removes the files
    of the run the directory holds."""
    directory = RunDirectory(check_output_dir(out_dir))
    backend = prepare(config)
    directory.create()
    _check_occupant(directory, resume, overwrite)
    if overwrite:
        directory.clear()
    trajectory = _resumed(directory, backend) if resume else None
    directory.write_config(dump_yaml(backend.config))
    if trajectory is None:
        trajectory = Trajectory(backend.initial_state(), 0, [])
    return backend, directory, trajectory


def run_experiment(config: Config, out_dir: str | Path, *, progress: bool = True,
                   resume: bool = False, overwrite: bool = False,
                   on_record: OnRecord | None = None,
                   checkpoint_seconds: float = CHECKPOINT_SECONDS) -> RunResult:
    """Run the experiment described by ``config`` and write its outputs to ``out_dir``.

    ``resume`` continues from ``out_dir/checkpoint.npz`` (written at most every
    ``checkpoint_seconds`` while training); ``overwrite`` replaces the finished or
    interrupted run ``out_dir`` holds (without it, such a directory is refused);
    ``on_record`` is called after each record.
    Raises :class:`ConfigError` before writing anything when the input is bad, and
    :class:`~metarep.run.loop.Diverged` (after writing what was recorded) when training
    diverges.
    """
    started, origin = time.monotonic(), provenance()
    backend, directory, trajectory = _begin(config, out_dir, resume, overwrite)
    if trajectory.step > 0:
        origin["resumed_at_step"] = trajectory.step
    recorder = _Recorder(backend, directory, checkpoint_seconds, on_record)
    [diverged] = train(backend, trajectory.state, [trajectory], schedule=_schedule(backend.config),
                       advice=[divergence_advice(backend.config)], on_record=recorder,
                       progress=progress)
    result = _conclude(backend, directory, trajectory, started, diverged, origin)
    if diverged is not None:
        raise diverged
    return result


def _schedule(config: Config) -> RecordSchedule:
    """The record steps of ``config``'s run (``train.steps``, ``train.record_every``)."""
    return RecordSchedule(config.train.steps, config.train.record_every)


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


def run_batch(configs: Sequence[Config],
              out_dirs: Sequence[str | Path]) -> list[RunResult | Exception]:
    """:func:`run_experiment` of each of ``configs`` into ``out_dirs``, as one batched computation.

    The configs must be ``tasks.n: infinite`` and agree on every key but :data:`BATCH_KEYS`
    (:func:`batch_key`): then they share ``B_star``, ``Sigma_star``, the shapes, the steps and
    the recording, and one stepper (:func:`metarep.run.backends.infinite.batched_stepper`)
    steps their stacked coordinates with per-run ``alpha``, ``beta``, ``m_in``, ``sigma^2``
    (each from its own ``B_0``) through the same training loop as :func:`run_experiment`. The
    results equal those of :func:`run_experiment` on each config (``summary.json`` differs in
    ``seconds``, the time since the batch started). There is no checkpoint: an interrupted
    batch is redone.

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
    runs = []
    for i, (config, out_dir) in enumerate(zip(configs, out_dirs, strict=True)):
        try:
            runs.append((i, *_begin(config, out_dir)))
        except Exception as error:  # this run fails alone
            results[i] = error
    if runs:
        backends = [backend for _, backend, _, _ in runs]
        trajectories = [trajectory for *_, trajectory in runs]
        state = InfiniteTaskState.stack([trajectory.state for trajectory in trajectories])
        outcomes = train(batched_stepper(backends), state, trajectories,
                         schedule=_schedule(backends[0].config),
                         advice=[divergence_advice(b.config) for b in backends], progress=False)
        for (i, backend, directory, trajectory), diverged in zip(runs, outcomes, strict=True):
            try:
                result = _conclude(backend, directory, trajectory, started, diverged, origin)
                results[i] = result if diverged is None else diverged
            except Exception as failure:  # this run fails alone
                results[i] = failure
    return results


def _conclude(backend: Backend, directory: RunDirectory, trajectory: Trajectory[Any],
              started: float, diverged: Diverged | None,
              origin: Mapping[str, Any]) -> RunResult:
    """Write a trained run's outputs: its evaluation (none for a run that ``diverged``), the
    final state, the summary (with ``origin``, the :func:`~metarep.run.provenance.provenance`
    of the process that started or resumed it) and the figures; remove the checkpoint."""
    status, error = ("done", None) if diverged is None else ("diverged", str(diverged))
    state, inputs = trajectory.state, backend.inputs
    rows = backend.evaluate(state) if diverged is None and inputs.has_truth else []
    directory.write_metrics(trajectory.records)
    truth = {"B_star": inputs.problem.B_star} if inputs.has_truth else {}  # else a random one
    directory.write_params({**backend.arrays(state), **truth,
                            "Sigma_star": inputs.problem.Sigma_star})
    eval_frame = directory.write_eval(rows)
    directory.write_held_out(backend.held_out(state) if diverged is None else [])
    final = dict(trajectory.records[-1]) if trajectory.records else {}
    theory = backend.theory(final, rows)
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
    metrics = pd.DataFrame(trajectory.records)
    limits = None if theory is None or theory["limits"] is None else {
        name: value["theory"] for name, value in theory["limits"].items()
        if value["theory"] is not None}
    directory.write_figure(TRAINING_FIGURE,
                           figures.training_figure(metrics, backend.config.name, limits))
    if rows:
        directory.write_figure(EVAL_FIGURE, figures.eval_figure(eval_frame, backend.config.name))
    directory.remove_checkpoint()
    return RunResult(directory.path, status, metrics, rows, backend.params(state), summary)
