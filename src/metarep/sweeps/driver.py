"""Running a sweep: resumable, failure-isolated, on the executors of
:mod:`metarep.sweeps.executors`.

Each run's directory holds exactly what ``metarep run`` writes; a failed run (bad config
cell, divergence, crash) holds ``error.json`` (and whatever the run wrote before failing). A
run directory is written under a temporary name (``.NAME.tmp``) and renamed into place when
complete, so a directory with a run's name is always a finished run. Re-running the sweep
skips finished runs, moves into place a run that finished just before the sweep stopped,
resumes from its checkpoint a run that was interrupted (runs on the local executor and on
SLURM checkpoint into ``.NAME.tmp`` as ``metarep run`` does; a checkpoint that cannot be
resumed is started again), deletes every other leftover temporary directory and redoes the
rest. A run whose SLURM job was cancelled or preempted is left in ``.NAME.tmp`` (reported as
unfinished) and resumed in the same way.

Runs with ``tasks.n: infinite`` that differ only in step sizes, ``m_in``, noise and seeds
(:data:`metarep.run.experiment.BATCH_KEYS`) are batched: each batch is one job that steps the
runs together, with the same results as the runs one by one (:func:`batch_jobs`).
"""

from __future__ import annotations

import fcntl
import json
import math
import os
import re
import shutil
import sys
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from metarep.errors import ConfigError
from metarep.run.experiment import batch_key
from metarep.run.rundir import ERROR, RunDirectory, check_output_dir
from metarep.run.schema import from_dict
from metarep.sweeps.executors import (
    EXECUTORS,
    Executor,
    Job,
    LocalExecutor,
    Outcome,
    RayExecutor,
    RunTask,
    default_workers,
)
from metarep.sweeps.manifest import LOCK, build_manifest, check_out_dir, write_manifest
from metarep.sweeps.slurm import SlurmExecutor, SlurmSettings
from metarep.sweeps.spec import RunPlan, SweepSpec, load_sweep, plan_runs

TEMP_DIR = re.compile(r"^\.(?P<name>.+)\.(?P<kind>tmp|old-[0-9a-f]{8})$")
"""A run's temporary directory: ``.NAME.tmp`` while it runs, ``.NAME.old-XXXXXXXX`` for a
failed run being replaced."""
MAX_BATCH = 64
SLURM_LOGS = ".slurm"
"""Where a SLURM sweep's logs and submitit's files go in the sweep directory by default."""


@dataclass(frozen=True)
class SweepOptions:
    """How a sweep runs: ``executor`` (``local``, ``ray``, ``slurm`` or ``submitit-local``)
    with ``workers`` runs at once (default: the CPUs), a Ray ``address`` and the ``slurm``
    settings (the ``--slurm-*`` options); ``retry_failed`` redoes failed runs;
    ``batch_infinite`` batches the infinite-task runs that can be batched; ``figures`` has
    each run draw its own figures (``training.png``, ``eval.png``; by default a sweep's runs
    do not, and ``metarep figures`` draws them from the files on request); ``progress``
    shows a progress bar; ``log_runs`` prints one line per finished run on stderr instead
    (for output that is not a terminal, such as a log file)."""

    executor: str = "local"
    workers: int | None = None
    address: str | None = None
    retry_failed: bool = False
    progress: bool = True
    batch_infinite: bool = True
    figures: bool = False
    log_runs: bool = False
    slurm: SlurmSettings | None = None


@dataclass(frozen=True)
class SweepReport:
    """Counts after a sweep: ``total`` runs, of which ``done`` and ``failed`` are finished;
    ``ran`` of them ran now, the others were already finished; ``failed_runs`` names the
    failed ones (each has its ``error.json``), ``unfinished_runs`` those whose SLURM job was
    cancelled or preempted (the next sweep resumes them)."""

    out_dir: Path
    total: int
    done: int
    failed: int
    ran: int
    failed_runs: tuple[str, ...] = ()
    unfinished_runs: tuple[str, ...] = ()


@contextmanager
def _locked(out: Path) -> Iterator[None]:
    """Hold an exclusive lock on ``out`` (released by the OS if this process dies)."""
    out.mkdir(parents=True, exist_ok=True)
    with open(out / LOCK, "w") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise ConfigError("--out", f"{out} is in use by another sweep") from None
        yield


def workdir(out: Path, name: str) -> Path:
    """Where run ``name`` of the sweep in ``out`` runs until it is complete."""
    return out / f".{name}.tmp"


def _clean_temporaries(out: Path, names: set[str]) -> None:
    """Tidy the temporary directories of an earlier sweep in ``out``: a run of ``names``
    that finished (``summary.json``, no ``error.json``) before it could be moved into place
    is moved now; one that was interrupted stays, for its run to resume; every other one
    (replaced runs, failed attempts, runs no longer planned) is deleted."""
    for path in out.iterdir():
        match = TEMP_DIR.match(path.name)
        if not (path.is_dir() and match):
            continue
        name, run = match["name"], RunDirectory(path)
        if match["kind"] == "tmp" and name in names and not (out / name).exists():
            if _complete(run):
                run.remove_checkpoint()
                os.rename(path, out / name)
                continue
            if run.occupant() in ("interrupted", "partial", "new"):
                continue
        shutil.rmtree(path)


def _complete(run: RunDirectory) -> bool:
    """Whether the temporary directory ``run`` holds a complete run, to be moved into place:
    only a run's files, a readable summary of a run that is done, no ``error.json``."""
    if run.occupant() != "finished" or run.file(ERROR).exists():
        return False
    try:
        summary = run.summary()
    except ConfigError:
        return False
    return summary is not None and summary.get("status") == "done"


def _finalize(out: Path, task: RunTask, outcome: Outcome) -> None:
    """Move a run's temporary directory into place (replacing a failed run being redone)."""
    workdir, final = Path(task.workdir), out / task.name
    if outcome.files is not None:  # ran elsewhere: its files replace anything left here
        shutil.rmtree(workdir, ignore_errors=True)
        workdir.mkdir(parents=True)
        for name, data in outcome.files.items():
            target = workdir / name
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(data)
    if final.exists():
        old = out / f".{task.name}.old-{uuid.uuid4().hex[:8]}"
        os.rename(final, old)
        os.rename(workdir, final)
        shutil.rmtree(old)
    else:
        os.rename(workdir, final)


def run_sweep(sweep_file: str | Path, out_dir: str | Path | None = None,
              options: SweepOptions = SweepOptions()) -> SweepReport:
    """Run (or resume) the sweep of ``sweep_file`` into ``out_dir`` (default ``runs/STEM``).

    Finished runs are skipped (failed ones too, unless ``options.retry_failed``); leftover
    temporary directories are deleted; a failing run is recorded and the others go on.
    ``options.batch_infinite`` batches the ``tasks.n: infinite`` runs that differ only in
    :data:`metarep.run.experiment.BATCH_KEYS` (:func:`batch_jobs`; the same results, faster).
    Raises :class:`ConfigError` for a bad sweep file or option, before writing anything.
    """
    spec = load_sweep(sweep_file)
    out = out_dir if out_dir is not None else Path("runs") / Path(sweep_file).stem
    return execute_plans(spec, plan_runs(spec), out, options)


def execute_plans(spec: SweepSpec, plans: list[RunPlan], out: str | Path,
                  options: SweepOptions = SweepOptions()) -> SweepReport:
    """Run (or resume) the runs ``plans`` of ``spec`` into ``out``: the engine behind
    :func:`run_sweep`, also used for studies built in code (:mod:`metarep.study.reproduce`).
    Same guarantees and options as :func:`run_sweep`. ``out`` is checked first
    (:func:`~metarep.run.rundir.check_output_dir`: not empty, not a file, writable), and
    again once its lock is held, so two different sweeps never finish into one directory."""
    out = check_output_dir(out)
    manifest = build_manifest(spec, plans)
    check_out_dir(out, manifest)
    pool = make_executor(options.executor, options.workers, options.address, options.slurm,
                         out / SLURM_LOGS)
    try:
        with _locked(out):
            check_out_dir(out, manifest)
            write_manifest(out, manifest)
            _clean_temporaries(out, {plan.name for plan in plans})
            return _drive(spec, plans, out, pool, options)
    finally:
        pool.close()


@dataclass(frozen=True)
class RunState:
    """What a sweep into a directory would find of one run (:func:`survey`): its ``plan``,
    its directory ``path`` and its ``state``: ``finished`` (a run directory without
    ``error.json``, or one complete in ``.NAME.tmp``, moved into place when the sweep runs),
    ``failed`` (``error.json``), ``interrupted`` (its ``.NAME.tmp`` holds a checkpoint: it
    resumes at ``step``) or ``new``."""

    plan: RunPlan
    path: Path
    state: str
    step: int | None = None


def survey(spec: SweepSpec, plans: list[RunPlan], out: str | Path) -> list[RunState]:
    """The state of every run of ``plans`` in ``out``, reading only (nothing is created or
    written). ``out`` is checked as :func:`execute_plans` checks it (a writable directory,
    new, empty or holding this very sweep): the same :class:`ConfigError` ``--out``."""
    out = check_output_dir(out)
    check_out_dir(out, build_manifest(spec, plans))
    states = []
    for plan in plans:
        path = out / plan.name
        state = RunDirectory(path).status()
        if state is not None:
            states.append(RunState(plan, path, "finished" if state == "done" else "failed"))
            continue
        temp = RunDirectory(workdir(out, plan.name))
        step = None
        if _complete(temp):
            state = "finished"
        elif temp.occupant() == "interrupted":
            try:
                checkpoint = temp.checkpoint()
                if checkpoint is not None:
                    temp.recorded_metrics(checkpoint)
                    state, step = "interrupted", checkpoint.step
            except ConfigError:  # damaged: the sweep starts it again
                pass
        states.append(RunState(plan, path, state or "new", step))
    return states


def _shown(value: object) -> str:
    return value if isinstance(value, str) else json.dumps(value, separators=(",", ":"))


def plan_lines(states: list[RunState], out: str | Path, retry_failed: bool = False) -> list[str]:
    """``metarep sweep --plan``: one line per run, ``NAME  DIR  key=value ...`` (the values
    of the sweep's axes, and the seed where seeds vary), then its state when it is not new
    (``[finished]``, ``[failed]``, ``[interrupted (resumes at step S)]``), and a summary
    line ``N runs in DIR: K finished, F failed, P to run`` (``P``: the runs a sweep would
    run now; the failed ones too with ``retry_failed``)."""
    seeded = len({state.plan.seed for state in states}) > 1
    labels = {"finished": "[finished]", "new": "",
              "failed": "[failed: redone, --retry-failed]" if retry_failed else "[failed]"}
    rows = []
    for state in states:
        pairs = [f"{key}={_shown(value)}" for key, value in state.plan.varied.items()]
        if seeded:
            pairs.append(f"seed={state.plan.seed}")
        label = (f"[interrupted (resumes at step {state.step})]" if state.state == "interrupted"
                 else labels[state.state])
        rows.append((state.plan.name, str(state.path), " ".join(pairs), label))
    width = [max((len(row[i]) for row in rows), default=0) for i in range(2)]
    lines = [f"{name:<{width[0]}}  {path:<{width[1]}}  {pairs}  {label}".rstrip()
             for name, path, pairs, label in rows]
    count = {kind: sum(state.state == kind for state in states)
             for kind in ("finished", "failed", "interrupted")}
    to_run = len(states) - count["finished"] - (0 if retry_failed else count["failed"])
    notes = [f"{count['interrupted']} interrupted"] if count["interrupted"] else []
    if retry_failed and count["failed"]:
        notes.append(f"{count['failed']} failed, redone with --retry-failed")
    note = f" ({'; '.join(notes)})" if notes else ""
    lines.append(f"{len(states)} runs in {out}: {count['finished']} finished, "
                 f"{count['failed']} failed, {to_run} to run{note}")
    return lines


def _batch_key(task: RunTask) -> str | None:
    """:func:`metarep.run.experiment.batch_key` of the run's config (``None`` for a config
    that does not resolve: it fails as a run of its own)."""
    try:
        return batch_key(from_dict(task.tree, task.overrides, name=task.config_name))
    except ConfigError:
        return None


def batch_jobs(tasks: list[RunTask], workers: int) -> list[Job]:
    """The jobs that run ``tasks``: runs with equal :func:`_batch_key` (``tasks.n: infinite``
    runs that differ only in :data:`metarep.run.experiment.BATCH_KEYS`) are batched, each batch
    run as one vectorised computation with the same results as the runs one by one
    (:func:`metarep.run.experiment.run_batch`); every other run is a job of its own.

    A group of ``n`` runs is cut into ``max(ceil(n / MAX_BATCH), min(workers, n // 2))``
    near-equal batches, so that a batch stays bounded and the batches spread over the workers,
    each holding >= 2 runs. Jobs come in the order of their first run.
    """
    groups: dict[str | int, list[RunTask]] = {}
    for i, task in enumerate(tasks):
        key = _batch_key(task)
        groups.setdefault(i if key is None else key, []).append(task)
    jobs: list[Job] = []
    for group in groups.values():
        n = len(group)
        parts = max(math.ceil(n / MAX_BATCH), min(workers, n // 2))
        jobs += [tuple(group[j * n // parts:(j + 1) * n // parts]) for j in range(parts)]
    return jobs


def _drive(spec: SweepSpec, plans: list[RunPlan], out: Path, pool: Executor,
           options: SweepOptions) -> SweepReport:
    status = {plan.name: RunDirectory(out / plan.name).status() for plan in plans}
    todo = [plan for plan in plans if status[plan.name] is None
            or (options.retry_failed and status[plan.name] == "failed")]
    redo = {plan.name for plan in todo}
    counts = {"done": 0, "failed": 0}
    for name, state in status.items():
        if state is not None and name not in redo:
            counts[state] += 1
    cwd, where = os.getcwd(), out.resolve()
    tasks = [RunTask(plan.name, spec.tree, plan.overrides, spec.config_name,
                     str(workdir(where, plan.name)), cwd, options.figures)
             for plan in todo]
    by_name = {task.name: task for task in tasks}
    jobs = (batch_jobs(tasks, pool.workers) if options.batch_infinite
            else [(task,) for task in tasks])
    bar = tqdm(total=len(plans), initial=len(plans) - len(todo), disable=not options.progress,
               unit="run", desc="sweep", dynamic_ncols=True)
    bar.set_postfix(counts)
    failed = {name for name, state in status.items() if state == "failed" and name not in redo}
    unfinished: set[str] = set()
    try:
        for outcome in pool.map(jobs):
            if outcome.status == "interrupted":  # stays in .NAME.tmp, to be resumed
                unfinished.add(outcome.name)
                _log(options, outcome, f"unfinished, {outcome.error}")
                continue
            _finalize(out, by_name[outcome.name], outcome)
            counts[outcome.status] += 1
            if outcome.status == "failed":
                failed.add(outcome.name)
            bar.set_postfix(counts, refresh=False)
            bar.update(1)
            finished = counts["done"] + counts["failed"]
            _log(options, outcome, f"{outcome.status} ({counts['done']} done, "
                 f"{counts['failed']} failed)", f"[{finished}/{len(plans)}] ")
    finally:
        bar.close()
    return SweepReport(out, len(plans), counts["done"], counts["failed"], len(tasks),
                       tuple(plan.name for plan in plans if plan.name in failed),
                       tuple(plan.name for plan in plans if plan.name in unfinished))


def _log(options: SweepOptions, outcome: Outcome, what: str, prefix: str = "") -> None:
    """With ``options.log_runs``, one line on stderr: ``PREFIXNAME: WHAT``."""
    if options.log_runs:
        print(f"{prefix}{outcome.name}: {what}", file=sys.stderr, flush=True)


def make_executor(kind: str, workers: int | None, address: str | None,
                  slurm: SlurmSettings | None = None,
                  slurm_log_dir: str | Path = ".slurm") -> Executor:
    """The executor named ``kind`` (one of :data:`EXECUTORS`), validated.

    ``workers`` (>= 1) defaults to this machine's CPUs (local, submitit-local) or the
    cluster's (ray); ``address`` is only meaningful for Ray, ``slurm`` (the ``--slurm-*``
    options) for ``slurm`` and ``submitit-local``, whose logs go to ``slurm_log_dir`` unless
    ``slurm.log_dir`` says otherwise.
    """
    if kind not in EXECUTORS:
        raise ConfigError("--executor", f"must be one of {', '.join(EXECUTORS)}; got {kind!r}")
    if workers is not None and workers < 1:
        raise ConfigError("--workers", f"must be an integer >= 1, got {workers}")
    if address is not None and kind != "ray":
        raise ConfigError("--address", "only used with --executor ray")
    if kind in ("slurm", "submitit-local"):
        return SlurmExecutor(kind, workers, slurm or SlurmSettings(), slurm_log_dir)
    if slurm is not None and slurm.given():
        raise ConfigError(slurm.given()[0], "only used with --executor slurm")
    if kind == "local":
        return LocalExecutor(default_workers(workers))
    return RayExecutor(address, workers)
