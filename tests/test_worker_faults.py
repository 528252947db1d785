"""A SIGKILLed sweep driver leaves nothing behind: its workers notice that the driver is gone
and exit (local pool: :func:`metarep.sweeps.executors.watch_parent`; a Ray instance the driver
started: Ray's own fate sharing), the scratch directories of killed Ray tasks are deleted by
later tasks (:func:`metarep.sweeps.executors.remove_stale_scratch`), and the same sweep run
again finishes every run exactly once.

The process checks read ``/proc`` (Linux); they are skipped elsewhere."""

from __future__ import annotations

import collections
import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import pandas as pd
import pytest
import yaml

from metarep.sweeps import executors
from metarep.sweeps.executors import SCRATCH, SCRATCH_PREFIX, execute_packed, remove_stale_scratch
from metarep.sweeps.manifest import LOCK, MANIFEST
from metarep.sweeps.spec import load_sweep, plan_runs

PROC = Path("/proc")
needs_proc = pytest.mark.skipif(not (PROC / "self" / "stat").exists(),
                                reason="reads processes from /proc (Linux)")
STEPS, RECORD_EVERY = 20000, 2000  # a run of `quick` then takes ~8 s: it outlives a kill
WIDTHS = [17, 18, 19, 20]
LOGGED = re.compile(r"^\[\d+/\d+\] (?P<name>\S+): (?P<status>done|failed) ", re.MULTILINE)
RAY_AGENTS = ("ray::DashboardAgent", "ray::RuntimeEnvAgent")


# ----------------------------------------------------------------------------- processes


def processes() -> dict[int, tuple[int, int, str, int]]:
    """Every process: pid -> (parent pid, session, state, start time), from ``/proc``."""
    table = {}
    for entry in PROC.iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:  # ended meanwhile
                continue
            fields = stat[stat.rindex(")") + 2:].split()
            table[int(entry.name)] = (int(fields[1]), int(fields[3]), fields[0], int(fields[19]))
    return table


def command_line(pid: int) -> str:
    try:
        return (PROC / str(pid) / "cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def family(root: int) -> dict[int, int]:
    """The processes descended from ``root`` or in its session (``root`` leads one):
    pid -> start time (which tells a pid reused later from the same process)."""
    table = processes()
    found = {pid for pid, (_, session, _, _) in table.items() if session == root}
    found.add(root)
    grown = True
    while grown:
        grown = False
        for pid, (parent, *_) in table.items():
            if parent in found and pid not in found:
                found.add(pid)
                grown = True
    found.discard(root)
    return {pid: table[pid][3] for pid in found if pid in table}


def alive(pids: dict[int, int]) -> dict[int, str]:
    """The processes of ``pids`` (pid -> start time) that still run: pid -> command line."""
    table = processes()
    return {pid: command_line(pid) for pid, start in pids.items()
            if pid in table and table[pid][3] == start and table[pid][2] not in "ZX"}


def wait_until(condition: Callable[[], object], timeout: float, what: str,
               process: subprocess.Popen | None = None, log: Path | None = None) -> object:
    """Poll ``condition`` until it is true (returned) or ``timeout`` seconds pass (failure,
    saying ``what``); a ``process`` that must keep running meanwhile fails it when it exits."""
    deadline = time.monotonic() + timeout
    while not (result := condition()):
        if process is not None and process.poll() is not None:
            pytest.fail(f"the sweep exited ({process.returncode}) before {what}: "
                        f"{log.read_text() if log else ''}")
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.05)
    return result


def kill_left(pids: dict[int, int]) -> None:
    """SIGKILL whichever of ``pids`` (ours) still run, so a failing test leaks nothing."""
    for pid in alive(pids):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


# ----------------------------------------------------------------------------- the rule


GRANDCHILD = """
import sys, time
from metarep.sweeps import executors
if sys.argv[1] == "poll-only":
    executors.PR_SET_PDEATHSIG = 0  # no such prctl option: only the polling thread acts
executors.watch_parent()
print("watching", flush=True)
time.sleep(120)
"""
PARENT = """
import subprocess, sys, time
child = subprocess.Popen([sys.executable, "-c", sys.argv[1], sys.argv[2]],
                         stdout=subprocess.PIPE, text=True)
assert child.stdout.readline() == "watching\\n"
print(child.pid, flush=True)
time.sleep(120)
"""


@needs_proc
@pytest.mark.parametrize("mode", ["pdeathsig", "poll-only"])
def test_watch_parent_ends_a_process_whose_parent_is_killed(mode):
    parent = subprocess.Popen([sys.executable, "-c", PARENT, GRANDCHILD, mode],
                              stdout=subprocess.PIPE, text=True)
    child: dict[int, int] = {}
    try:
        line = parent.stdout.readline()
        assert line.strip().isdigit(), line
        pid = int(line)
        child = {pid: processes()[pid][3]}
        assert alive(child)
        parent.kill()
        parent.wait()
        started = time.monotonic()
        wait_until(lambda: not alive(child), 3, "the orphan to exit")
        assert time.monotonic() - started < 2
    finally:
        parent.kill()
        parent.wait()
        parent.stdout.close()
        kill_left(child)


# ----------------------------------------------------------------------------- scratch


def dead_pid() -> int:
    """The pid of a process that has ended (and was reaped)."""
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


@needs_proc
def test_a_zombie_is_not_alive():
    process = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()"],
                               stdin=subprocess.PIPE)
    assert executors.pid_alive(process.pid) and executors.pid_alive(os.getpid())
    process.stdin.close()  # it exits; unreaped, it is a zombie
    wait_until(lambda: processes()[process.pid][2] == "Z", 10, "the child to exit")
    assert not executors.pid_alive(process.pid)
    process.wait()
    assert not executors.pid_alive(process.pid) and not executors.pid_alive(0)


def test_only_our_scratch_directories_of_dead_processes_are_removed(tmp_path):
    dead = dead_pid()
    names = {"dead": f"{SCRATCH_PREFIX}{dead}-abcd1234",
             "live": f"{SCRATCH_PREFIX}{os.getpid()}-abcd1234",
             "unnamed": f"{SCRATCH_PREFIX}abcd1234",  # no pid in it: left alone
             "other": f"other-{dead}-abcd1234",
             "file": f"{SCRATCH_PREFIX}{dead}-file"}
    for key, name in names.items():
        if key == "file":
            (tmp_path / name).write_text("not a directory")
        else:
            (tmp_path / name / "0").mkdir(parents=True)
            (tmp_path / name / "0" / "metrics.csv").write_text("step\n0\n")
    (tmp_path / f"{SCRATCH_PREFIX}{dead}-link").symlink_to(tmp_path / names["other"])
    remove_stale_scratch(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        [name for key, name in names.items() if key != "dead"] + [f"{SCRATCH_PREFIX}{dead}-link"])
    assert (tmp_path / names["other"] / "0" / "metrics.csv").exists()
    remove_stale_scratch(tmp_path / "missing")  # a missing temp dir is no error


def test_execute_packed_names_its_scratch_after_its_process_and_clears_dead_ones(
        tmp_path, monkeypatch):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    stale = tmp_path / f"{SCRATCH_PREFIX}{dead_pid()}-abcd1234"
    (stale / "0").mkdir(parents=True)
    seen = []

    def fake_job(job, workdirs):
        seen.append(sorted(p.name for p in tmp_path.iterdir()))
        for workdir in workdirs:
            Path(workdir).mkdir()
            (Path(workdir) / "summary.json").write_text("{}")
        return [executors.Outcome(task.name, "done", None) for task in job]

    monkeypatch.setattr(executors, "execute_job", fake_job)
    task = executors.RunTask("run", {}, {}, "quick", str(tmp_path / ".run.tmp"), str(tmp_path))
    [outcome] = execute_packed((task,))
    assert outcome.files == {"summary.json": b"{}"}
    [names] = seen
    assert len(names) == 1 and SCRATCH.match(names[0])["pid"] == str(os.getpid())
    assert not list(tmp_path.iterdir()), "the stale and the task's own scratch are gone"


# ----------------------------------------------------------------------------- SIGKILL


def write_sweep(folder: Path) -> Path:
    path = folder / "sweep.yaml"
    path.write_text(yaml.safe_dump({"base": "quick", "set": {
        "train.steps": STEPS, "train.record_every": RECORD_EVERY},
        "grid": {"model.width": WIDTHS}}, sort_keys=False))
    return path


def sweep_command(sweep: Path, out: Path, executor: str) -> list[str]:
    return [sys.executable, "-m", "metarep", "sweep", str(sweep), "--out", str(out),
            "--executor", executor, "--workers", "2"]


def temporaries(out: Path) -> list[str]:
    """The sweep directory's hidden entries other than its manifest and lock: temporary run
    directories."""
    if not out.exists():
        return []
    return sorted(p.name for p in out.iterdir()
                  if p.name.startswith(".") and p.name not in {MANIFEST, LOCK})


def finished(out: Path) -> list[str]:
    return sorted(p.name for p in out.iterdir() if p.is_dir() and not p.name.startswith("."))


def resume_and_check(sweep: Path, out: Path, executor: str, env: dict[str, str]) -> None:
    """Run the sweep again to completion: the runs unfinished before run exactly once each,
    and every run is complete once (each recorded step once), with no temporaries left."""
    before = set(finished(out))
    result = subprocess.run(sweep_command(sweep, out, executor), capture_output=True, text=True,
                            env=env, cwd=out.parent, timeout=240)
    assert result.returncode == 0, result.stderr
    n = len(WIDTHS)
    assert f"{n} runs, {n} done, 0 failed ({n - len(before)} ran now)" in result.stdout
    names = sorted(plan.name for plan in plan_runs(load_sweep(sweep)))
    logged = collections.Counter(m["name"] for m in LOGGED.finditer(result.stderr))
    assert logged == collections.Counter(set(names) - before), result.stderr
    assert finished(out) == names
    assert temporaries(out) == []
    for name in names:
        assert json.loads((out / name / "summary.json").read_text())["status"] == "done"
        steps = pd.read_csv(out / name / "metrics.csv")["step"].tolist()
        assert steps == list(range(0, STEPS + 1, RECORD_EVERY)), name


@pytest.mark.slow
@needs_proc
def test_sigkill_of_a_local_sweep_ends_its_workers_then_resume_completes(tmp_path):
    sweep, out, log = write_sweep(tmp_path), tmp_path / "out", tmp_path / "driver.log"
    with open(log, "w") as stderr:
        process = subprocess.Popen(sweep_command(sweep, out, "local"), cwd=tmp_path,
                                   start_new_session=True, stdout=subprocess.DEVNULL,
                                   stderr=stderr)
    pids: dict[int, int] = {}
    try:
        def running() -> bool:  # both workers in a run (its temporary directory exists)
            workers = [pid for pid in family(process.pid)
                       if "spawn_main" in command_line(pid)]
            return len(workers) == 2 and len(temporaries(out)) == 2

        wait_until(running, 120, "two runs in progress", process, log)
        pids = family(process.pid)  # the two workers and multiprocessing's resource tracker
        assert len(alive(pids)) >= 2
        process.kill()  # the driver alone, not its process group
        process.wait()
        wait_until(lambda: not alive(pids), 5, "the driver's children to exit")
        assert len(finished(out)) < len(WIDTHS), "the kill must land midway"
    finally:
        process.kill()
        process.wait()
        kill_left(pids)
    resume_and_check(sweep, out, "local", dict(os.environ))


def scratch_dirs(root: Path) -> dict[str, int]:
    """The Ray tasks' scratch directories in ``root``: name -> pid."""
    return {p.name: int(m["pid"]) for p in root.iterdir() if (m := SCRATCH.match(p.name))}


def start_ray_sweep(tmp_path: Path) -> tuple[Path, dict[str, str], Path, Path, Path,
                                             subprocess.Popen]:
    """Start ``metarep sweep`` on Ray (a new local instance in a private, short temp dir, with
    a throw-away token) in its own session: its temp dir, environment, sweep file, sweep
    directory, stderr log and process."""
    pytest.importorskip("ray")
    short = Path(tempfile.mkdtemp(prefix="wf", dir="/tmp"))  # Ray's socket paths are short
    env = {key: value for key, value in os.environ.items() if key != "RAY_ADDRESS"}
    env.update(RAY_TMPDIR=str(short), TMPDIR=str(short), RAY_AUTH_MODE="token",
               RAY_AUTH_TOKEN=secrets.token_hex(32))
    sweep, out, log = write_sweep(tmp_path), tmp_path / "out", tmp_path / "driver.log"
    with open(log, "w") as stderr:
        process = subprocess.Popen(sweep_command(sweep, out, "ray"), cwd=tmp_path, env=env,
                                   start_new_session=True, stdout=subprocess.DEVNULL,
                                   stderr=stderr)
    return short, env, sweep, out, log, process


def wait_for_two_ray_tasks(process: subprocess.Popen, short: Path, log: Path) -> None:
    """Wait until two Ray tasks run, each in its scratch directory (skip if Ray cannot
    start here)."""
    def running() -> bool:
        if process.poll() is not None and "cannot connect to Ray" in log.read_text():
            pytest.skip(f"Ray cannot start here: {log.read_text().strip()}")
        live = [pid for pid in scratch_dirs(short).values() if executors.pid_alive(pid)]
        return len(live) == 2

    wait_until(running, 120, "two Ray tasks in progress", process, log)


@pytest.mark.slow
@needs_proc
def test_sigkill_of_a_ray_sweep_ends_its_ray_instance_and_clears_scratch(tmp_path):
    """The Ray instance the driver starts dies with it: Ray kills its workers, raylet and GCS
    within seconds; its two agents (dashboard, runtime env) exit by themselves ~60 s later
    (they first try to report the raylet's death to the dead GCS, with a 60 s timeout)."""
    short, env, sweep, out, log, process = start_ray_sweep(tmp_path)
    pids: dict[int, int] = {}
    try:
        wait_for_two_ray_tasks(process, short, log)
        pids = family(process.pid)
        assert any("ray::execute_packed" in command for command in alive(pids).values())
        process.kill()
        process.wait()
        killed = time.monotonic()

        def only_agents_left() -> bool:
            return all(command.startswith(RAY_AGENTS) for command in alive(pids).values())

        wait_until(only_agents_left, 15, "Ray's workers, raylet and GCS to exit")
        stale = scratch_dirs(short)
        assert len(stale) >= 2 and not any(map(executors.pid_alive, stale.values()))
        assert len(finished(out)) < len(WIDTHS), "the kill must land midway"
        resume_and_check(sweep, out, "ray", env)
        assert scratch_dirs(short) == {}, "the killed tasks' scratch went with the next tasks"
        wait_until(lambda: not alive(pids), max(5.0, killed + 90 - time.monotonic()),
                   "Ray's agents to exit")
    finally:
        process.kill()
        process.wait()
        kill_left(pids)
        shutil.rmtree(short, ignore_errors=True)


@pytest.mark.slow
@needs_proc
@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_stops_a_ray_sweep_cleanly_then_resume_completes(tmp_path, signum):
    """SIGINT to the process group (Ctrl-C) or SIGTERM to the driver of a Ray sweep (its own
    local instance): exit 128 + signal with one line, the running tasks cancelled and the
    instance shut down (no Ray process left); the same command then redoes the interrupted
    runs, each once."""
    short, env, sweep, out, log, process = start_ray_sweep(tmp_path)
    pids: dict[int, int] = {}
    try:
        wait_for_two_ray_tasks(process, short, log)
        pids = family(process.pid)
        if signum == signal.SIGINT:
            os.killpg(process.pid, signum)
        else:
            process.send_signal(signum)
        assert process.wait(timeout=60) == 128 + signum, log.read_text()
        lines = log.read_text().splitlines()
        name = signal.Signals(signum).name
        assert len(lines) == 1 and lines[0].startswith(f"error: sweep stopped by {name}"), lines
        wait_until(lambda: not alive(pids), 30, "the Ray instance to shut down")
        assert len(finished(out)) < len(WIDTHS), "the signal must land midway"
        resume_and_check(sweep, out, "ray", env)
    finally:
        process.kill()
        process.wait()
        kill_left(pids)
        shutil.rmtree(short, ignore_errors=True)
