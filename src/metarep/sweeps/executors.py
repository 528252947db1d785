"""Where the runs of a sweep execute: in this process, a local process pool, a Ray cluster
or SLURM.

Every executor runs jobs and yields one :class:`Outcome` per run as runs finish, in completion
order. A :data:`Job` is a tuple of :class:`RunTask` (the base config tree plus a run's dotted
overrides: plain data, so it pickles to any process or node): one run, which the worker
function :func:`execute` runs, or a batch of ``tasks.n: infinite`` runs that differ only in
step sizes, ``m_in``, noise and seeds, which :func:`execute_group` runs as one vectorised
computation (:func:`metarep.run.experiment.run_batch`, with the same results).

- :class:`LocalExecutor` with one worker runs in this process (the sequential baseline);
  with ``n`` workers it uses a ``spawn`` process pool. Its workers write straight into the
  temporary run directory the driver chose, and exit when the driver dies
  (:func:`watch_parent`).
- :class:`RayExecutor` sends each job to a Ray task (``num_cpus=1``); the task runs into a
  node-local temporary directory and returns the files' bytes, so the nodes need no shared
  filesystem; the directories of killed tasks are deleted by later ones
  (:func:`remove_stale_scratch`).
- :class:`metarep.sweeps.slurm.SlurmExecutor` submits the jobs as a SLURM job array through
  submitit (or to submitit's local executor); its array tasks write into the sweep directory
  as local workers do.

Each job is limited to one thread (BLAS, OpenMP, torch: :func:`one_thread`), so ``n`` workers
use ``n`` cores and a run gives bit-identical numbers on every executor.
"""

from __future__ import annotations

import concurrent.futures as futures
import ctypes
import multiprocessing
import os
import re
import shutil
import signal
import socket
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from threadpoolctl import threadpool_limits
from tqdm import tqdm

from metarep.errors import ConfigError
from metarep.run.interrupts import Terminated
from metarep.run.loop import Diverged
from metarep.run.rundir import RunDirectory
from metarep.run.schema import from_dict

THREAD_VARIABLES = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")
EXECUTORS = ("local", "ray", "slurm", "submitit-local")
PARENT_POLL_S = 0.2
"""How often a local pool worker checks that the driver still lives (:func:`watch_parent`)."""
SCRATCH_PREFIX = "metarep-run-"
SCRATCH = re.compile(rf"^{SCRATCH_PREFIX}(?P<pid>[0-9]{{1,9}})-")
"""A Ray task's scratch directory in the system temp dir: ``metarep-run-PID-XXXXXXXX``."""
PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


@dataclass(frozen=True)
class RunTask:
    """One run of a sweep, as plain data.

    ``tree`` is the base config (nested dict, as read from YAML), ``overrides`` the run's
    dotted keys (fixed ``set`` values, its grid/zip cell and its seeds), ``config_name`` the
    name recorded in the run's outputs, ``workdir`` the temporary directory a local worker
    writes into and ``cwd`` the driver's directory (relative paths in the config refer to it);
    ``figures``: the run draws its own figures (a sweep's runs do not by default:
    ``metarep figures`` draws them from the files).
    """

    name: str
    tree: dict[str, Any]
    overrides: dict[str, Any]
    config_name: str
    workdir: str
    cwd: str
    figures: bool = False

    @property
    def sweep(self) -> str:
        """The sweep's name, that of the sweep directory holding ``workdir`` (the group of
        the run's logging sinks, :mod:`metarep.run.sinks`)."""
        return Path(self.workdir).parent.name


@dataclass(frozen=True)
class Outcome:
    """What one run ended with: ``status`` is ``done``, ``failed`` (then ``error`` says why)
    or ``interrupted`` (its SLURM job was cancelled or preempted: ``error`` says so, and its
    temporary directory stays for the next sweep to resume).

    ``files`` holds the run's output files (relative path -> bytes) when the run executed away from
    the sweep directory (Ray); otherwise they are already in ``task.workdir``.
    """

    name: str
    status: str
    error: str | None
    files: dict[str, bytes] | None = field(default=None, repr=False)


@contextmanager
def one_thread() -> Iterator[None]:
    """Run the body on one thread: BLAS/OpenMP pools (``threadpoolctl``), and torch, whether
    it is imported already (``torch.set_num_threads``) or during the body (``*_NUM_THREADS``
    environment variables, read when torch starts). Restores the previous settings."""
    saved = {name: os.environ.get(name) for name in THREAD_VARIABLES}
    os.environ.update(dict.fromkeys(THREAD_VARIABLES, "1"))
    torch = sys.modules.get("torch")
    torch_threads = torch.get_num_threads() if torch is not None else None
    try:
        with threadpool_limits(limits=1):
            if torch is not None:
                torch.set_num_threads(1)
            yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        if torch is not None:
            torch.set_num_threads(torch_threads)


Job = tuple[RunTask, ...]


def execute(task: RunTask, workdir: str | Path) -> Outcome:
    """Run ``task`` into ``workdir`` on one thread; never raises for a failing run.

    A run interrupted earlier resumes from the checkpoint in ``workdir`` (one that cannot be
    resumed is started again). A bad config cell (:class:`ConfigError`), a divergence
    (:class:`Diverged`) or any other exception makes the run ``failed``:
    ``workdir/error.json`` records the error (with the config key at fault, the run's
    overrides and the traceback) next to whatever the run wrote before failing (a diverged
    run keeps its recorded measures).
    """
    from metarep.run.experiment import run_experiment  # heavy import, deferred to the worker

    try:
        with one_thread():
            run_experiment(from_dict(task.tree, task.overrides, name=task.config_name), workdir,
                           progress=False, resume=True, restart_unresumable=True,
                           run_name=task.name, group=task.sweep, figures=task.figures)
    except Exception as error:
        return failed(task, workdir, error)
    return Outcome(task.name, "done", None)


def failed(task: RunTask, workdir: str | Path, exc: Exception) -> Outcome:
    """Record ``exc`` as the failure of ``task`` in ``workdir/error.json`` (see :func:`execute`)."""
    error = str(exc) if isinstance(exc, ConfigError | Diverged) else (
        f"{type(exc).__name__}: {exc}")
    RunDirectory(workdir).write_error(error, type(exc).__name__, getattr(exc, "key", None),
                                      task.overrides, "".join(traceback.format_exception(exc)))
    return Outcome(task.name, "failed", error)


def execute_group(tasks: Job, workdirs: Sequence[str | Path]) -> list[Outcome]:
    """Run ``tasks``, ``tasks.n: infinite`` runs that differ only in
    :data:`metarep.run.experiment.BATCH_KEYS`, into ``workdirs`` as one batched computation on one
    thread (:func:`metarep.run.experiment.run_batch`: the same files and numbers as
    :func:`execute` of each). Each run succeeds or fails on its own and is recorded as
    :func:`execute` records it; should the shared computation itself fail, every run fails
    with its error."""
    from metarep.run.experiment import run_batch

    try:
        configs = [from_dict(task.tree, task.overrides, name=task.config_name) for task in tasks]
        with one_thread():
            results = run_batch(configs, workdirs, resume=True,
                                run_names=[task.name for task in tasks], group=tasks[0].sweep,
                                figures=tasks[0].figures)
    except Exception as error:
        results = [error] * len(tasks)
    return [failed(task, workdir, result) if isinstance(result, Exception)
            else Outcome(task.name, "done", None)
            for task, workdir, result in zip(tasks, workdirs, results, strict=True)]


def execute_job(job: Job, workdirs: Sequence[str | Path]) -> list[Outcome]:
    """Run ``job`` into ``workdirs`` (one per run): :func:`execute` for one run,
    :func:`execute_group` for a batch."""
    if len(job) == 1:
        return [execute(job[0], workdirs[0])]
    return execute_group(job, workdirs)


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` runs (here, in this process's pid namespace); a zombie, dead
    but not yet reaped, does not (where ``/proc`` tells)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:  # no /proc (macOS)
        return True
    return stat[stat.rindex(")") + 2] not in "ZX"


def remove_stale_scratch(root: str | Path | None = None) -> None:
    """Delete the scratch directories that dead processes left in ``root`` (default: the
    system temp dir), as a Ray task killed mid-run leaves its own: only ``metarep-run-PID-*``
    (:data:`SCRATCH`) and only where ``PID`` no longer exists. Errors are ignored (another
    task may be deleting the same directory)."""
    root = Path(tempfile.gettempdir() if root is None else root)
    with suppress(OSError):
        for path in list(root.iterdir()):
            match = SCRATCH.match(path.name)
            with suppress(OSError):
                if match and not pid_alive(int(match["pid"])) and not path.is_symlink() \
                        and path.is_dir():
                    shutil.rmtree(path, ignore_errors=True)


def execute_packed(job: Job) -> list[Outcome]:
    """:func:`execute_job` into private temporary directories; returns the files as bytes.

    Runs in the driver's directory where that directory exists (a single machine or a shared
    filesystem), so relative paths in the config resolve as they would for ``metarep run``.
    The scratch directory is ``metarep-run-PID-*`` in the system temp dir, ``PID`` this
    process's; those of dead processes (tasks killed mid-run) are deleted first
    (:func:`remove_stale_scratch`).
    """
    if os.path.isdir(job[0].cwd):
        os.chdir(job[0].cwd)
    remove_stale_scratch()
    with tempfile.TemporaryDirectory(prefix=f"{SCRATCH_PREFIX}{os.getpid()}-") as scratch:
        workdirs = [Path(scratch) / str(i) for i in range(len(job))]
        outcomes = execute_job(job, workdirs)
        return [Outcome(outcome.name, outcome.status, outcome.error, packed_files(workdir))
                for outcome, workdir in zip(outcomes, workdirs, strict=True)]


def packed_files(workdir: Path) -> dict[str, bytes]:
    """Every regular file under ``workdir`` (the sinks' folders ``tb/``, ``wandb/``,
    ``mlruns/`` included; symbolic links left out) by its relative POSIX path."""
    files = {}
    for folder, _, names in os.walk(workdir):
        for name in names:
            path = Path(folder) / name
            if path.is_file() and not path.is_symlink():
                files[path.relative_to(workdir).as_posix()] = path.read_bytes()
    return dict(sorted(files.items()))


def worker_died(task: RunTask, reason: str) -> Outcome:
    """The outcome of a run whose worker process died (the driver records it as failed)."""
    error = f"worker died: {reason}"
    RunDirectory(task.workdir).write_error(error, "WorkerDied", None, task.overrides, None)
    return Outcome(task.name, "failed", error)


def watch_parent(poll: float = PARENT_POLL_S) -> None:
    """Pool initializer: this worker exits once the driver that started it is gone, even in
    the middle of a run, so that a killed sweep leaves no orphaned workers (the next sweep
    resumes or deletes the run's temporary directory).

    The rule: a daemon thread checks every ``poll`` seconds that this process's parent is
    still the one it had at start (``os.getppid()``; an orphan is re-parented) and that the
    driver (:func:`multiprocessing.parent_process`: with ``spawn``, the parent itself) still
    runs (:func:`pid_alive`), and ends the process (``os._exit``) when either fails. On
    Linux the kernel also kills the worker when the parent dies (``PR_SET_PDEATHSIG``:
    strictly, when the parent's thread that started it ends; :meth:`LocalExecutor._pool_map`
    starts and shuts down a pool in one thread).
    """
    parent = os.getppid()
    creator = multiprocessing.parent_process()
    driver = creator.pid if creator is not None else parent
    if sys.platform.startswith("linux"):
        with suppress(OSError, AttributeError):
            ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)

    def watch() -> None:
        while os.getppid() == parent and pid_alive(driver):
            time.sleep(poll)
        os._exit(1)  # nobody is left to take this worker's result

    threading.Thread(target=watch, name="metarep-watch-parent", daemon=True).start()


STOP_SIGNAL = signal.SIGUSR1
"""What the driver sends its pool workers when it is interrupted: stop the running job,
saving its runs (SIGTERM keeps its default, ending a worker at once, which the pool relies
on to clear out a broken pool)."""
_job_running = False
"""In a pool worker: whether a job is running (:data:`STOP_SIGNAL` then stops it)."""
_stopping = False
"""In a pool worker: whether the driver asked it to stop (no job starts after that)."""


def _on_stop(signum: int, frame: Any) -> None:
    """A pool worker's :data:`STOP_SIGNAL`: stop the running job as an interrupt (its runs
    write their records and checkpoints on the way out; once only); an idle worker only
    notes it, starts no job after it, and leaves when the pool shuts down."""
    global _stopping
    if _job_running and not _stopping:
        _stopping = True
        raise Terminated(signal.SIGTERM)
    _stopping = True


def init_worker() -> None:
    """Pool initializer: exit with the driver (:func:`watch_parent`); leave SIGINT to the
    driver (a Ctrl-C reaches every process of the terminal, and the driver decides); stop
    the running job on :data:`STOP_SIGNAL` (:func:`_on_stop`), which the driver sends to its
    workers when it is interrupted."""
    watch_parent()
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(STOP_SIGNAL, _on_stop)
    tqdm.set_lock(threading.RLock())  # a thread lock: no process-shared semaphore to leak


def run_pool_job(job: Job, workdirs: Sequence[str | Path]) -> list[Outcome]:
    """:func:`execute_job` in a pool worker, marked as running for :func:`_on_stop`; none
    starts once the worker was told to stop."""
    global _job_running
    _job_running = True
    try:
        if _stopping:
            raise Terminated()
        return execute_job(job, workdirs)
    finally:
        _job_running = False


def _stop_workers(pool: futures.ProcessPoolExecutor) -> None:
    """Ask the pool's worker processes to stop their jobs (:data:`STOP_SIGNAL`)."""
    processes = getattr(pool, "_processes", None) or {}
    for process in list(processes.values()):
        with suppress(OSError, AttributeError, TypeError):
            os.kill(process.pid, STOP_SIGNAL)


class Executor(Protocol):
    """Runs jobs and yields their runs' outcomes as they finish, with ``workers`` jobs at once."""

    workers: int

    def map(self, jobs: Iterable[Job]) -> Iterator[Outcome]: ...

    def close(self) -> None: ...


def default_workers(workers: int | None) -> int:
    """``workers``, or where it is ``None`` the CPUs this process may run on: how many runs
    (or drawing processes) go at once by default."""
    return workers or len(os.sched_getaffinity(0))


class LocalExecutor:
    """``workers`` processes on this machine (``workers == 1``: in this process)."""

    def __init__(self, workers: int):
        self.workers = workers

    def map(self, jobs: Iterable[Job]) -> Iterator[Outcome]:
        if self.workers == 1:
            for job in jobs:
                yield from execute_job(job, [task.workdir for task in job])
            return
        listed = list(jobs)
        yield from self._pool_map(listed, retries_left={job[0].name: 1 for job in listed})

    def _pool_map(self, jobs: list[Job], retries_left: dict[str, int]) -> Iterator[Outcome]:
        """Run ``jobs`` on a fresh pool (its workers exit if this process dies:
        :func:`watch_parent`); if a worker dies (which breaks the pool), retry the
        unfinished jobs once on a new pool and record their runs failed the second time."""
        context = multiprocessing.get_context("spawn")
        broken: list[Job] = []
        pool = futures.ProcessPoolExecutor(self.workers, mp_context=context,
                                           initializer=init_worker)
        try:
            pending = {pool.submit(run_pool_job, job, [task.workdir for task in job]): job
                       for job in jobs}
            for future in futures.as_completed(pending):
                job = pending[future]
                try:
                    yield from future.result()
                except futures.process.BrokenProcessPool as error:
                    if retries_left[job[0].name] > 0:
                        broken.append(job)
                    else:
                        for task in job:
                            yield worker_died(task, str(error))
        except BaseException:  # interrupted (SIGINT, SIGTERM) or closed early: stop the runs
            _stop_workers(pool)
            raise
        finally:  # drop the queued jobs; the running ones end (checkpointed if stopped)
            pool.shutdown(wait=True, cancel_futures=True)
        for job in broken:
            retries_left[job[0].name] -= 1
            for task in job:
                shutil.rmtree(task.workdir, ignore_errors=True)
        if broken:
            yield from self._pool_map(broken, retries_left)

    def close(self) -> None:
        """Nothing to release (each map owns its pool)."""


def is_this_machine(host: str) -> bool:
    """Whether ``host`` (a name or an IP) is an address of this machine (one can bind to it)."""
    try:
        infos = socket.getaddrinfo(host, None, type=socket.SOCK_DGRAM)
    except OSError:
        return False
    for family, kind, _, _, address in infos:
        with socket.socket(family, kind) as probe:
            try:
                probe.bind((address[0], 0))
            except OSError:
                continue
            return True
    return False


def use_local_token(address: str) -> None:
    """Send Ray's authentication token to a cluster at ``address`` on this machine.

    Ray enables token authentication by itself for a cluster it finds on this machine
    (``address`` unset or ``auto``) when a token is available, but not for an explicit address;
    for an explicit address on this machine we do the same (a cluster without authentication
    ignores the token). Remote clusters need ``RAY_AUTH_MODE=token`` set by the user; an
    explicit ``RAY_AUTH_MODE`` is always respected.
    """
    if "RAY_AUTH_MODE" in os.environ:
        return
    has_token = ("RAY_AUTH_TOKEN" in os.environ or "RAY_AUTH_TOKEN_PATH" in os.environ
                 or (Path.home() / ".ray" / "auth_token").is_file())
    host = address.removeprefix("ray://").rsplit(":", 1)[0].strip("[]")
    if has_token and is_this_machine(host):
        os.environ["RAY_AUTH_MODE"] = "token"


@contextmanager
def _keeping_sigterm() -> Iterator[None]:
    """Restore this process's SIGTERM handler after the block (in the main thread), so that
    a SIGTERM still stops the sweep as :mod:`metarep.run.interrupts` says."""
    main = threading.current_thread() is threading.main_thread()
    previous = signal.getsignal(signal.SIGTERM) if main else None
    try:
        yield
    finally:
        if main and previous is not None:
            signal.signal(signal.SIGTERM, previous)


class RayExecutor:
    """Ray tasks on the cluster at ``address`` (``None``: Ray's default discovery, else a new
    local instance), one per job, at most ``workers`` in flight (default: the cluster's
    CPUs)."""

    def __init__(self, address: str | None, workers: int | None):
        if address is not None:
            use_local_token(address)
        try:
            import ray
        except ImportError:
            raise ConfigError("--executor", "ray is not installed; pip install "
                              "'metarep[ray]' (or choose --executor local)") from None
        self.ray = ray
        self.owns_connection = not ray.is_initialized()
        if self.owns_connection:
            try:
                with _keeping_sigterm():  # Ray's core would take SIGTERM over (and exit 1)
                    ray.init(address=address, include_dashboard=False, log_to_driver=False,
                             logging_level="warning")
            except (ConnectionError, ValueError, RuntimeError) as error:
                hint = ("" if os.environ.get("RAY_AUTH_MODE") else
                        " (a cluster with token authentication, Ray's default, also needs "
                        "RAY_AUTH_MODE=token and its token in ~/.ray/auth_token)")
                raise ConfigError("--address", f"cannot connect to Ray at {address!r}: "
                                  f"{error}{hint}") from None
        cpus = int(ray.cluster_resources().get("CPU", 1))
        self.workers = workers or max(cpus, 1)
        self.remote = ray.remote(num_cpus=1)(execute_packed)

    def map(self, jobs: Iterable[Job]) -> Iterator[Outcome]:
        queue = list(jobs)[::-1]
        running: dict[Any, Job] = {}
        try:
            while queue or running:
                while queue and len(running) < self.workers:
                    job = queue.pop()
                    running[self.remote.remote(job)] = job
                ready, _ = self.ray.wait(list(running), num_returns=1)
                job = running.pop(ready[0])
                try:
                    outcomes = self.ray.get(ready[0])
                except self.ray.exceptions.RayError as error:
                    outcomes = [worker_died(task, str(error).splitlines()[0]) for task in job]
                yield from outcomes
        finally:  # on an early exit (Ctrl-C) cancel what still runs on the cluster
            for ref in running:
                self.ray.cancel(ref, force=True)

    def close(self) -> None:
        """Disconnect from Ray if this executor connected (or started a local instance)."""
        if self.owns_connection:
            self.ray.shutdown()
