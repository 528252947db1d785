"""Sweeps on SLURM through submitit (the optional extra ``slurm``): one job array per sweep.

:class:`SlurmExecutor` submits the sweep's jobs (:data:`~metarep.sweeps.executors.Job`) as
one SLURM job array (``submitit``'s ``map_array``; ``--slurm-array-parallelism`` of them
run at once); each array task runs :class:`ArrayTask`, which is
:func:`~metarep.sweeps.executors.execute_job` into the runs' temporary directories in the
sweep directory, as a local pool worker does, so the sweep directory must be on a
filesystem that the nodes share. Resume, skip-finished, failure isolation and batching are
therefore those of the other executors.

A job that ends without its runs' outcomes is turned into outcomes here: cancelled
(``scancel``), preempted or lost with its node, its runs are ``interrupted`` (their
temporary directories stay, and the next sweep resumes them); failed, out of memory or out
of time, they are ``failed`` (``error.json`` names the job's state and log). A running job
that is cancelled stops as a run does on SIGTERM (records and checkpoint saved) and says so;
one that reaches its time limit is requeued by submitit and resumes its runs from their
checkpoints (at most :data:`MAX_TIMEOUTS` times). The logs and submitit's pickles go to
``--slurm-log-dir`` (default ``SWEEP_DIR/.slurm``). A sweep started again after its driver
was killed (SIGKILL: its jobs go on) first cancels the jobs that driver left running
(recorded in :data:`JOBS`), which checkpoint, so that no run ever runs twice at once.

``submitit-local`` runs the same path with submitit's local executor (a process per job on
this machine, ``--workers`` at once): for trying a SLURM sweep where there is no SLURM.

States are read with ``squeue`` (``-t all``, which needs no accounting database), not with
``sacct`` as submitit does.
"""

from __future__ import annotations

import logging
import math
import os
import re
import shutil
import subprocess
import time
from collections.abc import Iterable, Iterator, Sequence
from contextlib import suppress
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, ClassVar

from metarep.errors import ConfigError
from metarep.run.interrupts import install_sigterm_handler, signal_name
from metarep.sweeps.executors import (
    Job,
    Outcome,
    RunTask,
    default_workers,
    execute_job,
    worker_died,
)

MAX_TIMEOUTS = 3
"""How many times a job that reaches its time limit is requeued (then its runs fail)."""
POLL_S = 1.0
"""How often the driver looks for finished jobs (result files, and ``squeue``)."""
CANCEL_WAIT_S = 60.0
"""How long an interrupted driver waits for its cancelled jobs to save their runs."""
SCANCEL_TIMEOUT_S = 20.0
CONTROLLER_WAIT_S = 600.0
"""How long the driver waits while ``squeue`` cannot reach the SLURM controller before it
stops waiting: the runs still out are left unfinished (their jobs may still run; the next
sweep cancels those and resumes the runs)."""
UNREACHABLE = "UNREACHABLE"
"""The end state the driver gives a job it stopped waiting for (:data:`CONTROLLER_WAIT_S`)."""
ACTIVE = {"PENDING", "RUNNING", "SUSPENDED", "COMPLETING", "CONFIGURING", "REQUEUED",
          "REQUEUE_FED", "REQUEUE_HOLD", "RESIZING", "SIGNALING", "STAGE_OUT", "STOPPED",
          "RESV_DEL_HOLD", "SPECIAL_EXIT"}
"""SLURM job states of a job that is still queued or running (``squeue -t all`` also lists
ended jobs, for ``MinJobAge`` seconds)."""
STOPPED_FROM_OUTSIDE = {"CANCELLED", "PREEMPTED", "NODE_FAIL", "BOOT_FAIL", "DEADLINE",
                        "INTERRUPTED", "UNKNOWN"}
"""End states of a job stopped by something other than its runs (SLURM's; ``INTERRUPTED``:
submitit's local executor; ``UNKNOWN``: gone from the queue, as an array task cancelled
before it started is): its runs stay unfinished, to be resumed by the next sweep."""
PARTITION = re.compile(r"^[A-Za-z0-9_.+-]+$")
JOBS = ".slurm-jobs.txt"
"""In the sweep directory: the ids of the job arrays a sweep submitted, one a line (a later
sweep cancels those still running: their driver was killed)."""


@dataclass(frozen=True)
class SlurmSettings:
    """The ``--slurm-*`` options; ``None``: not given (SLURM's or this module's default).

    ``partition`` (default: the cluster's default partition), ``time_min`` the time limit of
    an array task in minutes (default 60), ``cpus`` per task (default 1: every run uses one
    thread), ``mem_gb`` per task (default: the partition's), ``array_parallelism`` the array
    tasks running at once (default 256), ``log_dir`` where logs and submitit's files go
    (default ``SWEEP_DIR/.slurm``)."""

    partition: str | None = None
    time_min: int | None = None
    cpus: int | None = None
    mem_gb: float | None = None
    array_parallelism: int | None = None
    log_dir: str | None = None

    OPTIONS: ClassVar[dict[str, str]] = {
        "partition": "--slurm-partition", "time_min": "--slurm-time", "cpus": "--slurm-cpus",
        "mem_gb": "--slurm-mem", "array_parallelism": "--slurm-array-parallelism",
        "log_dir": "--slurm-log-dir"}
    """The command-line option of each field."""

    def given(self) -> list[str]:
        """The options that were given, as command-line names."""
        return [self.OPTIONS[f.name] for f in fields(self) if getattr(self, f.name) is not None]

    def check(self, kind: str) -> None:
        """Validate for executor ``kind`` (:class:`ConfigError` naming the option): the
        numbers positive, the partition a name; only ``--slurm-time`` and
        ``--slurm-log-dir`` apply to ``submitit-local``."""
        if kind != "slurm":
            for option in self.given():
                if option not in ("--slurm-time", "--slurm-log-dir"):
                    raise ConfigError(option, "only used with --executor slurm")
        if self.partition is not None and not PARTITION.match(self.partition):
            raise ConfigError("--slurm-partition", f"must be a partition name, got "
                              f"{self.partition!r}")
        for name in ("time_min", "cpus", "array_parallelism"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ConfigError(self.OPTIONS[name], f"must be an integer >= 1, got {value}")
        if self.mem_gb is not None and not (math.isfinite(self.mem_gb) and self.mem_gb > 0):
            raise ConfigError("--slurm-mem", f"must be a number of GB > 0, got {self.mem_gb}")
        if self.log_dir is not None and Path(self.log_dir).exists() \
                and not Path(self.log_dir).is_dir():
            raise ConfigError("--slurm-log-dir", f"{self.log_dir} is not a directory")


def interrupted(task: RunTask, reason: str) -> Outcome:
    """The outcome of a run whose job was stopped from outside (``scancel``, preemption):
    ``interrupted``, its temporary directory kept for the next sweep to resume."""
    return Outcome(task.name, "interrupted", reason)


class ArrayTask:
    """What a SLURM array task runs: :func:`execute_job` of its job into the runs'
    temporary directories, in the driver's directory where it exists.

    SIGTERM (``scancel``; SIGINT from submitit's local executor) stops the runs as an
    interrupt, saving their records and checkpoints, and the job returns them as
    :func:`interrupted`. ``checkpoint`` makes the task requeueable: submitit calls it when
    the job nears its time limit and runs the task again, which resumes the runs."""

    def __call__(self, job: Job) -> list[Outcome]:
        install_sigterm_handler()  # submitit ignores SIGTERM; a run saves itself on it
        if os.path.isdir(job[0].cwd):
            os.chdir(job[0].cwd)
        try:
            return execute_job(job, [task.workdir for task in job])
        except KeyboardInterrupt as stop:
            return [interrupted(task, f"its job was stopped by {signal_name(stop)}")
                    for task in job]

    def checkpoint(self, job: Job) -> Any:
        """submitit's requeue hook: run this task again on the same job."""
        from submitit.helpers import DelayedSubmission

        return DelayedSubmission(self, job)


def _first_line(text: str) -> str:
    return next((line.strip() for line in text.splitlines() if line.strip()), "")


def _last_line(text: str) -> str:
    return _first_line("\n".join(reversed(text.splitlines())))


def _partitions() -> list[str]:
    """The cluster's partitions (``sinfo``); :class:`ConfigError` ``--executor`` when SLURM
    cannot be reached."""
    try:
        listed = subprocess.run(["sinfo", "-h", "-o", "%P"], capture_output=True, text=True,
                                timeout=60, check=True).stdout.split()
    except (OSError, subprocess.SubprocessError) as error:
        detail = _last_line(getattr(error, "stderr", None) or "") or str(error)
        raise ConfigError("--executor", f"cannot reach SLURM (sinfo: {detail})") from None
    return list(dict.fromkeys(name.rstrip("*") for name in listed))  # "*": the default


def _check_slurm(settings: SlurmSettings) -> None:
    """SLURM's clients are here, its controller answers and has ``settings.partition``
    (:class:`ConfigError` otherwise)."""
    if shutil.which("sbatch") is None or shutil.which("srun") is None:
        raise ConfigError("--executor", "slurm: sbatch and srun are not on PATH (no SLURM "
                          "client here)")
    partitions = _partitions()
    if settings.partition is not None and settings.partition not in partitions:
        raise ConfigError("--slurm-partition", f"no partition {settings.partition!r} "
                          f"(sinfo lists: {', '.join(partitions) or 'none'})")


def queue_states(job_ids: Iterable[str]) -> dict[str, str] | None:
    """The SLURM state of each array task of the jobs ``job_ids`` (``ID_INDEX`` -> state,
    ``squeue -r -t all``); a job SLURM no longer knows is left out; ``None`` when ``squeue``
    fails (the controller is unreachable: try again later)."""
    arrays = sorted({job_id.split("_")[0] for job_id in job_ids})
    if not arrays:
        return {}
    try:
        listing = subprocess.run(["squeue", "-h", "-r", "-t", "all", "-o", "%i|%T",
                                  "-j", ",".join(arrays)], capture_output=True, text=True,
                                 timeout=30)
    except (OSError, subprocess.SubprocessError):
        return None
    if listing.returncode != 0:
        return {} if "Invalid job id" in listing.stderr else None
    states = {}
    for line in listing.stdout.splitlines():
        job_id, _, state = line.strip().partition("|")
        if state:
            states[job_id] = state.split()[0]
    return states


def scancel(job_ids: list[str]) -> None:
    """``scancel JOB_IDS``, errors ignored (an unreachable controller: the jobs are left)."""
    with suppress(OSError, subprocess.SubprocessError):
        subprocess.run(["scancel", *job_ids], check=False, capture_output=True,
                       timeout=SCANCEL_TIMEOUT_S)


def _cancel_orphans(record: Path) -> None:
    """Cancel the jobs of ``record`` (:data:`JOBS`) still queued or running, left by a sweep
    whose driver was killed (this sweep holds the directory's lock), and wait, at most
    :data:`CANCEL_WAIT_S`, for them to end; then forget them."""
    if not record.is_file():
        return
    states = queue_states(record.read_text().split()) or {}
    orphans = [job_id for job_id, state in states.items() if state in ACTIVE]
    if orphans:
        scancel(orphans)
    deadline = time.monotonic() + CANCEL_WAIT_S
    while orphans and time.monotonic() < deadline:
        time.sleep(POLL_S)
        states = queue_states(orphans)
        orphans = [job_id for job_id in orphans if states is None
                   or states.get(job_id, "UNKNOWN") in ACTIVE]
    if orphans:
        raise ConfigError("--executor", f"jobs {', '.join(orphans)} of an earlier sweep into "
                          f"{record.parent} still run after scancel; run again once they ended")
    record.unlink()


class SlurmExecutor:
    """The sweep's jobs as one SLURM job array (``kind`` ``slurm``; ``workers``, if given, is
    the array parallelism), or as processes of submitit's local executor (``kind``
    ``submitit-local``, ``workers`` at once, default the CPUs), with ``settings``; logs and
    submitit's files in ``settings.log_dir``, else ``default_log_dir``. Raises
    :class:`ConfigError` when submitit is missing, SLURM cannot be reached or the partition
    does not exist."""

    def __init__(self, kind: str, workers: int | None, settings: SlurmSettings,
                 default_log_dir: str | Path):
        settings.check(kind)
        if kind == "slurm" and workers is not None and settings.array_parallelism is not None:
            raise ConfigError("--workers", "with --executor slurm it is the array tasks at "
                              "once: give it or --slurm-array-parallelism, not both")
        try:
            import submitit
        except ImportError:
            raise ConfigError("--executor", "submitit is not installed; pip install "
                              "'metarep[slurm]' (or choose --executor local)") from None
        logging.getLogger("submitit").setLevel(logging.WARNING)  # its INFO lines go to stdout
        self.kind, self.settings, self.submitit = kind, settings, submitit
        folder = Path(settings.log_dir if settings.log_dir is not None else default_log_dir)
        self.folder = folder.absolute()
        if kind == "slurm":
            _check_slurm(settings)
            self.workers = settings.array_parallelism or workers or 256
        else:
            self.workers = default_workers(workers)
        self.executor: Any = None
        self.unreachable_since: float | None = None  # when squeue began to fail

    def _controller_lost(self) -> bool:
        """Whether ``squeue`` has failed for :data:`CONTROLLER_WAIT_S` (counting from the
        first failure since it last answered)."""
        now = time.monotonic()
        if self.unreachable_since is None:
            self.unreachable_since = now
        return now - self.unreachable_since >= CONTROLLER_WAIT_S

    def _executor(self) -> Any:
        """submitit's executor for the settings, made when the first jobs are submitted
        (it creates the log directory)."""
        if self.executor is not None:
            return self.executor
        settings = self.settings
        if self.kind == "submitit-local":
            self.executor = self.submitit.LocalExecutor(self.folder)
            self.executor.update_parameters(timeout_min=settings.time_min or 60)
            return self.executor
        self.executor = self.submitit.SlurmExecutor(self.folder, max_num_timeout=MAX_TIMEOUTS)
        minutes = settings.time_min or 60
        parameters: dict[str, Any] = {
            "job_name": "metarep-sweep", "time": minutes, "cpus_per_task": settings.cpus or 1,
            "ntasks_per_node": 1, "array_parallelism": self.workers,
            "signal_delay_s": min(90, 12 * minutes)}  # the warning before the time limit
        if settings.partition is not None:
            parameters["partition"] = settings.partition
        if settings.mem_gb is not None:
            parameters["mem"] = f"{max(1, round(settings.mem_gb * 1024))}M"
        self.executor.update_parameters(**parameters)
        return self.executor

    def map(self, jobs: Iterable[Job]) -> Iterator[Outcome]:
        """Submit ``jobs`` (``slurm``: all as one array; ``submitit-local``: ``workers`` at
        a time) and yield their outcomes as they end; on an early exit (Ctrl-C, SIGTERM)
        cancel the jobs still queued or running and give them :data:`CANCEL_WAIT_S` to save
        their runs."""
        queue = list(jobs)
        window = len(queue) if self.kind == "slurm" else self.workers
        waiting: dict[Any, Job] = {}
        record = Path(queue[0][0].workdir).parent / JOBS if queue else None
        if self.kind == "slurm" and record is not None:
            _cancel_orphans(record)
        try:
            while queue or waiting:
                if queue and len(waiting) < window:
                    taken = window - len(waiting)
                    waiting.update(self._submit(queue[:taken], record))
                    del queue[:taken]
                ended = self._ended(list(waiting))
                for submitted, state in ended:
                    yield from self._outcomes(submitted, waiting.pop(submitted), state)
                if waiting and not ended:
                    time.sleep(POLL_S)
        finally:
            if waiting:
                self._cancel(list(waiting))

    def _submit(self, jobs: Sequence[Job], record: Path | None) -> dict[Any, Job]:
        """Submit ``jobs`` as one array (on SLURM, its id appended to ``record``); a refused
        submission is a :class:`ConfigError`."""
        errors = self.submitit.core.utils
        try:
            submitted = self._executor().map_array(ArrayTask(), jobs)
        except (errors.UncompletedJobError, errors.FailedSubmissionError, OSError) as error:
            raise ConfigError("--executor", f"{self.kind}: the job array was refused: "
                              f"{_first_line(str(error))}") from None
        if self.kind == "slurm" and record is not None:
            with open(record, "a") as file:
                file.write("".join(f"{array}\n" for array in
                                   dict.fromkeys(job.job_id.split("_")[0] for job in submitted)))
        return dict(zip(submitted, jobs, strict=True))

    def _ended(self, submitted: list[Any]) -> list[tuple[Any, str]]:
        """The jobs of ``submitted`` that ended, with their end state (``COMPLETED`` for
        one that left its result)."""
        if self.kind == "slurm":
            states = queue_states(job.job_id for job in submitted)
            if states is None:  # the controller did not answer
                return [(job, UNREACHABLE) for job in submitted] if self._controller_lost() \
                    else []
            self.unreachable_since = None
            ended = [(job, states.get(job.job_id, "UNKNOWN")) for job in submitted
                     if states.get(job.job_id, "UNKNOWN") not in ACTIVE]
        else:
            ended = [(job, job.state) for job in submitted if job.done()]
        return [(job, "COMPLETED" if job.paths.result_pickle.exists() else state)
                for job, state in ended]

    def _outcomes(self, submitted: Any, job: Job, state: str) -> list[Outcome]:
        """The runs' outcomes of a job that ended in ``state``: those it returned, else (no
        result) :func:`interrupted` or failed (:func:`worker_died`) by ``state``."""
        errors = self.submitit.core.utils
        if submitted.paths.result_pickle.exists():
            try:
                return list(submitted.result())
            except errors.UncompletedJobError as error:  # FailedJobError: the task raised
                reason = f"job {submitted.job_id} failed: {_exception_line(str(error))}"
                return [_died(task, reason) for task in job]
        name = state.split()[0].rstrip("+")
        if name == UNREACHABLE:
            return [interrupted(task, f"the SLURM controller did not answer for "
                                f"{CONTROLLER_WAIT_S:.0f} s; its job {submitted.job_id} may "
                                "still run (the next sweep cancels it and resumes the run)")
                    for task in job]
        if name in STOPPED_FROM_OUTSIDE:
            return [interrupted(task, f"its job {submitted.job_id} ended {name}")
                    for task in job]
        reason = (f"job {submitted.job_id} ended {name} without a result (see "
                  f"{submitted.paths.stderr})")
        return [_died(task, reason) for task in job]

    def _cancel(self, submitted: list[Any]) -> None:
        """Cancel ``submitted`` and wait (at most :data:`CANCEL_WAIT_S`) until they end."""
        if self.kind == "slurm":
            scancel([job.job_id for job in submitted])
        else:
            for job in submitted:
                job.cancel(check=False)
        deadline = time.monotonic() + CANCEL_WAIT_S
        left = submitted
        while time.monotonic() < deadline:
            ended = {id(job) for job, _ in self._ended(left)}
            left = [job for job in left if id(job) not in ended]
            if not left:
                return
            time.sleep(POLL_S)

    def close(self) -> None:
        """Nothing to release (every job ended or was cancelled in :meth:`map`)."""


def _exception_line(text: str) -> str:
    """The exception line of the traceback in submitit's ``FailedJobError`` message (the
    text between its two ``----`` lines), else the message's first line."""
    parts = re.split(r"^-{10,}$", text, flags=re.MULTILINE)
    if len(parts) < 3:
        return _first_line(text)
    lines = [line.strip() for line in parts[1].splitlines() if line.strip()]
    return lines[-1] if lines else _first_line(text)


def _died(task: RunTask, reason: str) -> Outcome:
    """:func:`worker_died` of a run whose job ended without a result; its temporary
    directory is made first where the job never started."""
    Path(task.workdir).mkdir(parents=True, exist_ok=True)
    return worker_died(task, reason)
