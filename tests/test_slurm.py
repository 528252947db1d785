"""Sweeps on SLURM through submitit (``--executor slurm``) against a real one-node SLURM on
this machine (the ``slurm_cluster`` fixture: skipped, with the reason, where it cannot
start), and the same path on submitit's local executor (``--executor submitit-local``):
job arrays, every run exactly once, failure isolation, cancelled jobs left unfinished and
finished by the next sweep, a stopped driver cancelling its jobs, the options' errors."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
from sweep_files import write_sweep

from metarep.sweeps.collect import collect_table
from metarep.sweeps.driver import SweepOptions, run_sweep

METAREP = str(Path(sys.executable).with_name("metarep"))
LONG = {"train.steps": 10000, "train.record_every": 500}
"""Runs long enough (seconds) to be cancelled while they run."""
ORPHANS = {**LONG, "train.steps": 100000}
"""Runs that outlive a killed driver long enough (about 40 s; at 30,000 steps a loaded machine
could finish them before the next sweep started) for the next sweep to find them still
running and cancel them; that sweep resumes them from the checkpoints they save when
cancelled."""
WAIT_S = 120


def statuses(out: Path) -> dict[str, str]:
    """Run name -> the status in its ``summary.json`` (``failed`` where ``error.json``)."""
    found = {}
    for path in sorted(out.iterdir()):
        if path.is_dir() and not path.name.startswith("."):
            found[path.name] = ("failed" if (path / "error.json").exists() else
                                json.loads((path / "summary.json").read_text())["status"])
    return found


def submitted(out: Path) -> list[str]:
    """The array tasks submitted for the sweep in ``out`` (submitit's pickles)."""
    return sorted(path.name.removesuffix("_submitted.pkl")
                  for path in (out / ".slurm").glob("*_submitted.pkl"))


def sweep(env: dict[str, str], *args: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run([METAREP, "sweep", *map(str, args)], env=env, capture_output=True,
                          text=True, timeout=600)


@pytest.fixture
def start_sweep():
    """``start_sweep(env, *args)``: ``metarep sweep ARGS`` in the background; a driver still
    running when the test ends (it failed) is killed."""
    started: list[subprocess.Popen[str]] = []

    def start(env: dict[str, str], *args: object) -> subprocess.Popen[str]:
        started.append(subprocess.Popen([METAREP, "sweep", *map(str, args)], env=env,
                                        text=True, stdout=subprocess.PIPE,
                                        stderr=subprocess.PIPE))
        return started[-1]

    yield start
    for driver in started:
        if driver.poll() is None:
            driver.kill()
        driver.communicate()


def wait_for(condition, what: str, timeout: float = WAIT_S):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def assert_each_record_once(out: Path, names: tuple[str, ...], last_step: int) -> None:
    """Every run of ``names`` (resumed or started anew) has each record step once, in order,
    up to ``last_step``."""
    for name in names:
        steps = pd.read_csv(out / name / "metrics.csv")["step"].tolist()
        assert steps == sorted(set(steps)) and steps[-1] == last_step, name


def modified(out: Path, names: list[str]) -> dict[str, int]:
    return {name: (out / name / "summary.json").stat().st_mtime_ns for name in names}


# ----------------------------------------------------------------------------- real SLURM


@pytest.mark.slow
def test_a_sweep_on_slurm_runs_every_run_once_also_after_cancelled_jobs(tmp_path,
                                                                        slurm_cluster,
                                                                        start_sweep):
    """One scenario on one cluster (the only test that starts SLURM, so that one xdist
    worker does): a partition the cluster lacks is refused; a job array with a failing run;
    a sweep again runs nothing; cancelled jobs (one running, one pending) leave their runs
    unfinished, the next sweep finishes them and nothing else; SIGTERM to the driver cancels
    its jobs, and the next sweep finishes the runs; after SIGKILL to the driver the next
    sweep cancels the jobs it left running before it runs their runs."""
    env, out = slurm_cluster.env, tmp_path / "out"
    plain = write_sweep(tmp_path / "plain", grid={"model.width": [2, 3, 0]})
    refused = sweep(env, plain, "--executor", "slurm", "--slurm-partition", "nowhere",
                    "--out", out)
    assert refused.returncode == 2
    assert refused.stderr.strip() == ("error: --slurm-partition: no partition 'nowhere' "
                                      "(sinfo lists: debug)")
    assert not out.exists()
    first = sweep(env, plain, "--executor", "slurm", "--out", out, "--slurm-time", 10,
                  "--slurm-mem", 0.5, "--slurm-partition", slurm_cluster.partition)
    assert first.returncode == 0, first.stderr
    assert "3 runs, 2 done, 1 failed (3 ran now)" in first.stdout
    assert statuses(out) == {"width=0": "failed", "width=2": "done", "width=3": "done"}
    assert json.loads((out / "width=0" / "error.json").read_text())["key"] == "model.width"
    tasks = submitted(out)
    assert len(tasks) == 3 and len({task.split("_")[0] for task in tasks}) == 1, "one array"
    local = run_sweep(plain, tmp_path / "local", SweepOptions(workers=1, progress=False))
    assert local.failed == 1
    pd.testing.assert_frame_equal(collect_table(out), collect_table(tmp_path / "local"),
                                  check_exact=True)
    before = modified(out, ["width=2", "width=3"])
    again = sweep(env, plain, "--executor", "slurm", "--out", out)
    assert "3 runs, 2 done, 1 failed (0 ran now)" in again.stdout, again.stderr
    assert submitted(out) == tasks and modified(out, ["width=2", "width=3"]) == before

    long, out = write_sweep(tmp_path / "long", set=LONG, grid={"model.width": [2, 3, 4]}), \
        tmp_path / "long-out"
    driver = start_sweep(env, long, "--executor", "slurm", "--out", out,
                         "--slurm-array-parallelism", 1)
    running = wait_for(slurm_cluster.running_jobs, "an array task to run")[0]
    wait_for(lambda: (out / ".width=2.tmp" / "metrics.csv").exists(), "the first run")
    array = running.split("_")[0]
    assert running == f"{array}_0", "one task at a time, in order"
    slurm_cluster.run("scancel", running, f"{array}_2")  # width=2 running, width=4 pending
    stdout, stderr = driver.communicate(timeout=WAIT_S)
    assert driver.returncode == 0, stderr
    assert "3 runs, 1 done, 0 failed (3 ran now)" in stdout
    assert "unfinished: width=2, width=4" in stdout
    assert statuses(out) == {"width=3": "done"}
    assert (out / ".width=2.tmp" / "checkpoint.npz").exists(), "saved when cancelled"
    before = modified(out, ["width=3"])
    rerun = sweep(env, long, "--executor", "slurm", "--out", out)
    assert "3 runs, 3 done, 0 failed (2 ran now)" in rerun.stdout, rerun.stderr
    assert statuses(out) == dict.fromkeys(("width=2", "width=3", "width=4"), "done")
    assert modified(out, ["width=3"]) == before
    assert_each_record_once(out, ("width=2", "width=4"), LONG["train.steps"])
    assert not slurm_cluster.active_jobs()

    pair, out = write_sweep(tmp_path / "pair", set=LONG, grid={"model.width": [2, 3]}), \
        tmp_path / "stopped"
    driver = start_sweep(env, pair, "--executor", "slurm", "--out", out)
    wait_for(lambda: len(list(out.glob(".*.tmp/metrics.csv"))) == 2, "both runs to record")
    driver.send_signal(signal.SIGTERM)
    stdout, stderr = driver.communicate(timeout=WAIT_S)
    assert driver.returncode == 143, stderr
    assert "sweep stopped by SIGTERM" in stderr
    assert not slurm_cluster.active_jobs(), "the driver cancelled its jobs"
    assert len(list(out.glob(".*.tmp/checkpoint.npz"))) == 2, "the runs saved themselves"
    rerun = sweep(env, pair, "--executor", "slurm", "--out", out)
    assert "2 runs, 2 done, 0 failed (2 ran now)" in rerun.stdout, rerun.stderr
    assert statuses(out) == dict.fromkeys(("width=2", "width=3"), "done")

    out = tmp_path / "killed"  # SIGKILL: the jobs go on, and the next sweep cancels them first
    pair = write_sweep(tmp_path / "orphans", set=ORPHANS, grid={"model.width": [2, 3]})
    driver = start_sweep(env, pair, "--executor", "slurm", "--out", out)
    wait_for(lambda: len(list(out.glob(".*.tmp/metrics.csv"))) == 2, "both runs to record")
    driver.kill()
    driver.communicate(timeout=WAIT_S)
    assert len(slurm_cluster.running_jobs()) == 2
    rerun = sweep(env, pair, "--executor", "slurm", "--out", out)
    assert "2 runs, 2 done, 0 failed (2 ran now)" in rerun.stdout, rerun.stderr
    assert_each_record_once(out, ("width=2", "width=3"), ORPHANS["train.steps"])
    assert not slurm_cluster.active_jobs()


# ----------------------------------------------------------------- submitit's local executor


def job_processes(folder: Path) -> list[int]:
    """The pids of submitit's job processes (``submitit.core._submit``) for ``folder``."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            command = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"submitit.core._submit" in command and str(folder).encode() in command:
            pids.append(int(entry.name))
    return pids


@pytest.mark.slow
def test_submitit_local_gives_the_local_executor_table(tmp_path):
    pytest.importorskip("submitit")
    plain = write_sweep(tmp_path, grid={"model.width": [2, 0]}, seeds=[0, 1])
    local = run_sweep(plain, tmp_path / "local", SweepOptions(workers=1, progress=False))
    jobs = run_sweep(plain, tmp_path / "jobs", SweepOptions(executor="submitit-local",
                                                            workers=2, progress=False))
    assert (jobs.done, jobs.failed, jobs.ran) == (local.done, local.failed, 4) == (2, 2, 4)
    assert len(submitted(tmp_path / "jobs")) == 4
    pd.testing.assert_frame_equal(collect_table(tmp_path / "jobs"),
                                  collect_table(tmp_path / "local"), check_exact=True)
    error = json.loads((tmp_path / "jobs" / "width=0,seed=0" / "error.json").read_text())
    assert error["key"] == "model.width"
    again = run_sweep(plain, tmp_path / "jobs", SweepOptions(executor="submitit-local",
                                                             progress=False))
    assert (again.done, again.failed, again.ran) == (2, 2, 0)


@pytest.mark.slow
def test_submitit_local_a_stopped_job_leaves_its_run_to_the_next_sweep(tmp_path, start_sweep):
    pytest.importorskip("submitit")
    long, out = write_sweep(tmp_path, set=LONG, grid={"model.width": [2, 3]}), tmp_path / "out"
    args = (long, "--executor", "submitit-local", "--workers", 2, "--out", out)
    driver = start_sweep(dict(os.environ), *args)
    pids = wait_for(lambda: job_processes(out / ".slurm"), "a job process")
    wait_for(lambda: list(out.glob(".*.tmp/metrics.csv")), "a run to record")
    os.kill(pids[0], signal.SIGTERM)
    stdout, stderr = driver.communicate(timeout=WAIT_S)
    assert driver.returncode == 0, stderr
    assert "2 runs, 1 done, 0 failed (2 ran now)" in stdout
    assert "unfinished: width=" in stdout and len(statuses(out)) == 1
    rerun = sweep(dict(os.environ), *args)
    assert "2 runs, 2 done, 0 failed (1 ran now)" in rerun.stdout, rerun.stderr
    assert_each_record_once(out, ("width=2", "width=3"), LONG["train.steps"])


@pytest.mark.slow
def test_submitit_local_driver_stopped_by_sigterm_stops_its_jobs(tmp_path, start_sweep):
    pytest.importorskip("submitit")
    long, out = write_sweep(tmp_path, set=LONG, grid={"model.width": [2, 3]}), tmp_path / "out"
    args = (long, "--executor", "submitit-local", "--workers", 2, "--out", out)
    driver = start_sweep(dict(os.environ), *args)
    wait_for(lambda: len(list(out.glob(".*.tmp/metrics.csv"))) == 2, "both runs to record")
    driver.send_signal(signal.SIGTERM)
    stderr = driver.communicate(timeout=WAIT_S)[1]
    assert driver.returncode == 143, stderr
    assert not job_processes(out / ".slurm"), "the jobs ended with the driver"
    assert len(list(out.glob(".*.tmp/checkpoint.npz"))) == 2, "the runs saved themselves"
    rerun = sweep(dict(os.environ), *args)
    assert "2 runs, 2 done, 0 failed (2 ran now)" in rerun.stdout, rerun.stderr


# ----------------------------------------------------------------------------- options


@pytest.mark.parametrize(("args", "line"), [
    (["--executor", "slurm", "--slurm-time", "0"],
     "error: --slurm-time: must be an integer >= 1, got 0"),
    (["--executor", "slurm", "--slurm-cpus", "-1"],
     "error: --slurm-cpus: must be an integer >= 1, got -1"),
    (["--executor", "slurm", "--slurm-array-parallelism", "0"],
     "error: --slurm-array-parallelism: must be an integer >= 1, got 0"),
    (["--executor", "slurm", "--slurm-mem", "0"],
     "error: --slurm-mem: must be a number of GB > 0, got 0.0"),
    (["--executor", "slurm", "--slurm-partition", "a b"],
     "error: --slurm-partition: must be a partition name, got 'a b'"),
    (["--executor", "slurm", "--workers", "2", "--slurm-array-parallelism", "3"],
     "error: --workers: with --executor slurm it is the array tasks at once: give it or "
     "--slurm-array-parallelism, not both"),
    (["--slurm-partition", "debug"], "error: --slurm-partition: only used with --executor slurm"),
    (["--executor", "submitit-local", "--slurm-mem", "2"],
     "error: --slurm-mem: only used with --executor slurm"),
    (["--executor", "slurm", "--address", "head:6379"],
     "error: --address: only used with --executor ray"),
    (["--executor", "slurms"],
     "error: --executor: must be one of local, ray, slurm, submitit-local; got 'slurms'"),
])
def test_a_bad_slurm_option_is_one_line_naming_it(tmp_path, cli, error_line, args, line):
    result = cli("sweep", write_sweep(tmp_path, grid={"model.width": [2]}), "--out",
                 tmp_path / "out", *args)
    assert result.exit_code == 2
    assert error_line(result) == line
    assert not (tmp_path / "out").exists()


def test_slurm_without_submitit_or_without_slurm_is_one_line(tmp_path, cli, error_line,
                                                               monkeypatch):
    plain = write_sweep(tmp_path, grid={"model.width": [2]})
    monkeypatch.setitem(sys.modules, "submitit", None)  # import submitit fails
    result = cli("sweep", plain, "--executor", "slurm", "--out", tmp_path / "out")
    assert result.exit_code == 2
    assert error_line(result) == ("error: --executor: submitit is not installed; pip install "
                                  "'metarep[slurm]' (or choose --executor local)")
    monkeypatch.undo()
    pytest.importorskip("submitit")
    monkeypatch.setenv("PATH", str(tmp_path / "nothing"))
    result = cli("sweep", plain, "--executor", "slurm", "--out", tmp_path / "out")
    assert result.exit_code == 2
    assert error_line(result) == ("error: --executor: slurm: sbatch and srun are not on PATH "
                                  "(no SLURM client here)")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("answers", [[None] * 1000, [None, None, {"7_0": "COMPLETED"}]])
def test_an_unreachable_controller_leaves_the_runs_unfinished_after_a_wait(
        tmp_path, monkeypatch, answers):
    """``squeue`` failing for CONTROLLER_WAIT_S: the driver stops waiting and the job's runs
    are unfinished (their temporary directories kept for the next sweep); failing briefly
    (a control) it waits on and sees the job end (here without a result: a failed run)."""
    pytest.importorskip("submitit")
    from types import SimpleNamespace

    from metarep.sweeps import slurm
    from metarep.sweeps.executors import RunTask

    monkeypatch.setattr(slurm, "_check_slurm", lambda settings: None)
    monkeypatch.setattr(slurm, "POLL_S", 0.01)
    monkeypatch.setattr(slurm, "CONTROLLER_WAIT_S", 0.5)
    replies = iter(answers)
    monkeypatch.setattr(slurm, "queue_states", lambda job_ids: next(replies))
    executor = slurm.SlurmExecutor("slurm", None, slurm.SlurmSettings(), tmp_path / ".slurm")
    class Submitted(SimpleNamespace):  # a submitit job as the driver sees it (hashable)
        __hash__ = object.__hash__

    submitted = Submitted(job_id="7_0", paths=SimpleNamespace(
        result_pickle=tmp_path / "none.pkl", stderr=tmp_path / "7_0.err"))
    monkeypatch.setattr(executor, "_submit", lambda jobs, record: {submitted: jobs[0]})
    task = RunTask("r", {}, {}, "quick", str(tmp_path / "sweep" / ".r.tmp"), str(tmp_path))
    started = time.monotonic()
    [outcome] = list(executor.map([(task,)]))
    if len(answers) > 3:
        assert outcome.status == "interrupted" and "did not answer" in outcome.error
        assert time.monotonic() - started >= slurm.CONTROLLER_WAIT_S
    else:
        assert outcome.status == "failed" and "ended COMPLETED without a result" in outcome.error
