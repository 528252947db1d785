"""Faults survived: runs stopped by SIGINT / SIGTERM and resumed bit for bit, checkpoints that
hold the state (not the records), corrupted checkpoints and metrics refused (``metarep run``)
or repaired (sweeps), batched infinite-task runs resumed, a divergence at test time, and a
full disk (a real tmpfs where this machine can mount one)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from metarep.cli import EXIT_BAD_INPUT, EXIT_DIVERGED, EXIT_SYSTEM
from metarep.errors import ConfigError
from metarep.run import experiment
from metarep.run.atomic import is_temporary
from metarep.run.rundir import CHECKPOINT, METRICS, RunDirectory, csv_text
from metarep.run.schema import load_config

METAREP = [sys.executable, "-m", "metarep"]


def same_outputs(a: Path, b: Path) -> None:
    """Two finished runs agree bit for bit: metrics.csv and eval.csv as text, params.npz
    array by array, and the summary's final measures."""
    assert (a / METRICS).read_text() == (b / METRICS).read_text()
    for table in ("eval.csv", "eval_steps.csv"):
        assert (a / table).exists() == (b / table).exists(), table
        if (b / table).exists():
            assert (a / table).read_text() == (b / table).read_text(), table
    with np.load(a / "params.npz") as x, np.load(b / "params.npz") as y:
        assert x.files == y.files
        for name in x.files:
            np.testing.assert_array_equal(x[name], y[name])
    final = [json.loads((d / "summary.json").read_text())["final"] for d in (a, b)]
    assert final[0] == final[1]


def interrupt_at(step: int):
    """An ``on_record`` hook that raises KeyboardInterrupt at the record of ``step``."""
    def hook(trajectory) -> None:
        if trajectory.step == step:
            raise KeyboardInterrupt
    return hook


# ----------------------------------------------------------------------------- exact resume

RESUMED = {
    "pool": [],
    "online": ["tasks.n=online", "train.tasks_per_step=20"],
    "mtl": ["method.name=mtl", "method.outer_lr=0.05"],
    "infinite": ["tasks.n=infinite"],
    "infinite-float32": ["tasks.n=infinite", "train.dtype=float32"],
    "pool-float32": ["train.dtype=float32"],
    "online-torch-sampler": ["tasks.n=online", "train.tasks_per_step=20", "tasks.sampler=torch",
                             "train.dtype=float32"],
}


def test_a_run_checkpointed_before_keys_were_added_resumes_but_not_another_config(tmp_path):
    """``config.yaml`` written by an earlier version lacks the keys added since (here the
    whole ``log`` section and ``train.backend``): they take their defaults, so the run is the
    same config and resumes; a changed value is still another config (a negative control)."""
    config = load_config("quick", ["train.steps=40", "train.record_every=7",
                                   "eval.n_tasks=20", "eval.shots=[5]"])
    out = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):
        experiment.run_experiment(config, out, progress=False, on_record=interrupt_at(21),
                                  checkpoint_seconds=3600.0)
    text = (out / "config.yaml").read_text()
    older = text.split("log:")[0].replace("  backend: numpy\n", "")
    assert older != text and "backend" not in older
    (out / "config.yaml").write_text(older.replace("outer_lr: 0.2", "outer_lr: 0.3"))
    with pytest.raises(ConfigError, match="differs from this run's config") as error:
        experiment.run_experiment(config, out, progress=False, resume=True)
    assert error.value.key == "--resume"
    (out / "config.yaml").write_text(older)
    resumed = experiment.run_experiment(config, out, progress=False, resume=True)
    assert resumed.summary["provenance"]["resumed_at_step"] == 21


@pytest.mark.parametrize("case", list(RESUMED))
def test_an_interrupted_run_resumes_bit_for_bit(tmp_path, case):
    """Interrupted at a record (the checkpoint of that record is written on the way out),
    then resumed: every output equals the uninterrupted run's, bit for bit, the evaluations
    during training before, at and after the interruption included."""
    if "torch" in case:
        pytest.importorskip("torch")
    config = load_config("quick", ["train.steps=120", "train.record_every=7",
                                   "eval.n_tasks=60", "eval.shots=[5, 20]",
                                   "eval.at_steps=[30, 63, 100]", *RESUMED[case]])
    experiment.run_experiment(config, tmp_path / "straight", progress=False)
    out = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):
        experiment.run_experiment(config, out, progress=False, on_record=interrupt_at(63),
                                  checkpoint_seconds=3600.0)
    checkpoint = RunDirectory(out).checkpoint()
    assert checkpoint is not None and checkpoint.step == 63 and checkpoint.n_records == 11
    if case.startswith("infinite"):
        assert set(checkpoint.arrays) == {"H", "omega"}  # the coordinates, not (B, w)
    resumed = experiment.run_experiment(config, out, progress=False, resume=True)
    assert resumed.summary["provenance"]["resumed_at_step"] == 63
    same_outputs(out, tmp_path / "straight")
    assert not (out / CHECKPOINT).exists()


@pytest.mark.parametrize("case", ["pool", "online", "infinite"])
def test_an_evaluation_during_training_is_the_end_of_the_run_stopped_there(tmp_path, case):
    """``eval.at_steps``: the rows of ``eval_steps.csv`` at a step equal, number for number,
    ``eval.csv`` of the same run with ``train.steps`` set to that step; the step is recorded
    in ``metrics.csv`` although off the record grid."""
    base = ["train.steps=60", "train.record_every=25", "eval.n_tasks=40", "eval.shots=[5, 20]",
            *RESUMED[case]]
    experiment.run_experiment(load_config("quick", [*base, "eval.at_steps=[17, 44]"]),
                              tmp_path / "long", progress=False)
    during = pd.read_csv(tmp_path / "long" / "eval_steps.csv")
    assert list(during["step"].unique()) == [17, 44]
    assert {17, 44} <= set(pd.read_csv(tmp_path / "long" / METRICS)["step"])
    for step in (17, 44):
        experiment.run_experiment(load_config("quick", [*base, f"train.steps={step}"]),
                                  tmp_path / f"to{step}", progress=False)
        end = pd.read_csv(tmp_path / f"to{step}" / "eval.csv")
        at = during[during["step"] == step].drop(columns="step").reset_index(drop=True)
        pd.testing.assert_frame_equal(at, end)


@pytest.mark.parametrize("tasks", [["tasks.n=40"], ["tasks.n=online", "train.tasks_per_step=30",
                                               "tasks.sampler=torch"]])
def test_an_engine_run_resumes_bit_for_bit(tmp_path, tasks):
    """On a pool, and on fresh tasks drawn by torch (each step's from its own stream)."""
    pytest.importorskip("torch")
    config = load_config("quick", ["model.kind=relu", "model.hidden_width=6", "problem.d=8",
                                   "model.width=4", *tasks, "train.steps=30",
                                   "train.record_every=5", "eval.n_tasks=20",
                                   "eval.shots=[5]", "train.dtype=float32"])
    experiment.run_experiment(config, tmp_path / "straight", progress=False)
    out = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):
        experiment.run_experiment(config, out, progress=False, on_record=interrupt_at(15))
    experiment.run_experiment(config, out, progress=False, resume=True)
    same_outputs(out, tmp_path / "straight")


def test_the_checkpoint_holds_the_state_and_metrics_grow_by_appended_rows(tmp_path):
    """With a record at every step, the checkpoint has the same size at step 50 and at step
    2000 (it holds the state, not the records), and metrics.csv only grows: the rows of the
    earlier checkpoint are the first rows of the later one."""
    config = load_config("quick", ["train.steps=3000", "train.record_every=1",
                                   "eval.n_tasks=50", "eval.shots=[5]"])
    sizes, texts = [], []
    for step in (50, 2000):
        out = tmp_path / f"at{step}"
        with pytest.raises(KeyboardInterrupt):
            experiment.run_experiment(config, out, progress=False, on_record=interrupt_at(step),
                                      checkpoint_seconds=0.0)
        sizes.append((out / CHECKPOINT).stat().st_size)
        texts.append((out / METRICS).read_text())
        assert RunDirectory(out).checkpoint().n_records == step + 1
        assert len(texts[-1].splitlines()) == step + 2  # the header, steps 0 .. step
    assert sizes[0] == sizes[1]
    assert texts[1].startswith(texts[0])


# ----------------------------------------------------------------------------- signals


def wait_for(predicate, process: subprocess.Popen, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert process.poll() is None, process.communicate()
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_stops_a_run_cleanly_and_resume_finishes_it_bit_for_bit(tmp_path, signum):
    """A real ``metarep run`` process gets SIGINT or SIGTERM mid-training: exit 128 + signal,
    one line saying what to do, a checkpoint at the last record with every record before it
    in metrics.csv; ``--resume`` then finishes with the outputs of an uninterrupted run."""
    args = ["run", "quick", "--set", "train.steps=6000", "--set", "train.record_every=1",
            "--set", "eval.n_tasks=100", "--set", "eval.shots=[5,20]", "--no-progress"]
    straight = tmp_path / "straight"
    subprocess.run([*METAREP, *args, "--out", str(straight)], check=True, capture_output=True)
    out = tmp_path / "run"
    process = subprocess.Popen([*METAREP, *args, "--out", str(out)], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    wait_for(lambda: (out / CHECKPOINT).exists(), process)  # step 0 recorded: training
    time.sleep(1.0)  # about a fifth of the way through
    process.send_signal(signum)
    stdout, stderr = process.communicate(timeout=60)
    assert process.returncode == 128 + signum, stderr
    assert stdout == "" and len(stderr.splitlines()) == 1, stderr
    assert stderr.startswith(f"error: run stopped by {signal.Signals(signum).name}")
    assert "--resume" in stderr and str(out) in stderr
    checkpoint = RunDirectory(out).checkpoint()
    assert 0 < checkpoint.step < 6000
    assert RunDirectory(out).recorded_metrics(checkpoint)[-1]["step"] == checkpoint.step
    assert not [p for p in out.iterdir() if is_temporary(p)]
    resumed = subprocess.run([*METAREP, *args, "--out", str(out), "--resume"],
                             capture_output=True, text=True, check=False)
    assert resumed.returncode == 0, resumed.stderr
    same_outputs(out, straight)


# ----------------------------------------------------------------------------- corruption


def _edit_npz(path: Path, **changes) -> None:
    with np.load(path) as data:
        arrays = {name: data[name] for name in data.files}
    arrays.update(changes)
    for name in [name for name, value in changes.items() if value is None]:
        del arrays[name]
    np.savez(path, **arrays)


CORRUPTIONS = {
    "truncated": lambda out: (out / CHECKPOINT).write_bytes((out / CHECKPOINT).read_bytes()[:300]),
    "zero-bytes": lambda out: (out / CHECKPOINT).write_bytes(b""),
    "random-bytes": lambda out: (out / CHECKPOINT).write_bytes(
        np.random.default_rng(0).bytes(5000)),
    "missing-step": lambda out: _edit_npz(out / CHECKPOINT, step=None),
    "B-cut-to-5-columns": lambda out: _edit_npz(out / CHECKPOINT, B=np.zeros((20, 5))),
    "w-float32": lambda out: _edit_npz(out / CHECKPOINT, w=np.zeros(20, np.float32)),
    "nan-in-B": lambda out: _edit_npz(out / CHECKPOINT, B=np.full((20, 20), np.nan)),
    "step-beyond-train-steps": lambda out: _edit_npz(out / CHECKPOINT, step=np.array(10**6)),
    "step-not-the-last-record": lambda out: _edit_npz(out / CHECKPOINT, step=np.array(23)),
    "negative-step": lambda out: _edit_npz(out / CHECKPOINT, step=np.array(-4)),
    "step-not-an-integer": lambda out: _edit_npz(out / CHECKPOINT, step=np.array(2.5)),
    "more-records-than-rows": lambda out: _edit_npz(out / CHECKPOINT, n_records=np.array(500)),
    "unknown-format": lambda out: _edit_npz(out / CHECKPOINT, format=np.array(1)),
    "an-object-array": lambda out: _edit_npz(out / CHECKPOINT,
                                             B=np.array([None] * 3, dtype=object)),
    "metrics-deleted": lambda out: (out / METRICS).unlink(),
    "metrics-truncated": lambda out: (out / METRICS).write_text(
        (out / METRICS).read_text()[:150]),
    "metrics-garbage-row": lambda out: (out / METRICS).write_text(
        "\n".join([*(out / METRICS).read_text().splitlines()[:3], "7,oops"]) + "\n"),
    "metrics-binary": lambda out: (out / METRICS).write_bytes(b"\xff\xfe\x00" * 100),
    "metrics-steps-off-grid": lambda out: (out / METRICS).write_text(
        (out / METRICS).read_text().replace("\n14,", "\n15,", 1)),
}


@pytest.fixture(scope="module")
def interrupted_run(tmp_path_factory) -> Path:
    """A quick run interrupted at the record of step 42 (records every 7 steps)."""
    config = load_config("quick", ["train.steps=60", "train.record_every=7", "eval.n_tasks=50"])
    out = tmp_path_factory.mktemp("interrupted") / "run"
    with pytest.raises(KeyboardInterrupt):
        experiment.run_experiment(config, out, progress=False, on_record=interrupt_at(42),
                                  checkpoint_seconds=0.0)
    return out


@pytest.mark.parametrize("case", list(CORRUPTIONS))
def test_a_corrupt_checkpoint_or_metrics_file_is_refused_on_resume(cli, error_line, tmp_path,
                                                                   interrupted_run, case):
    """``--resume`` on a damaged interrupted run: exit 2, one line naming --resume and the
    file, the directory untouched; ``--overwrite`` starts the run again and finishes."""
    out = tmp_path / "run"
    shutil.copytree(interrupted_run, out)
    CORRUPTIONS[case](out)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    args = ["run", "quick", "--set", "train.steps=60", "--set", "train.record_every=7",
            "--set", "eval.n_tasks=50", "--out", out, "--no-progress"]
    result = cli(*args, "--resume")
    assert result.exit_code == EXIT_BAD_INPUT, result.output
    line = error_line(result)
    assert line.startswith("error: --resume: ") and "corrupt" in line, line
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    result = cli(*args, "--overwrite")
    assert result.exit_code == 0, result.output
    assert json.loads((out / "summary.json").read_text())["status"] == "done"


def test_a_sweep_repairs_a_corrupt_checkpoint_of_its_interrupted_run(tmp_path, interrupted_run):
    """A sweep run whose temporary directory holds a damaged checkpoint is started again (a
    sweep repairs what ``metarep run`` refuses) and finishes like a run straight through."""
    from metarep.run.schema import read_yaml
    from metarep.sweeps.executors import RunTask, execute

    overrides = {"train.steps": 60, "train.record_every": 7, "eval.n_tasks": 50}
    workdir = tmp_path / ".run.tmp"
    shutil.copytree(interrupted_run, workdir)
    CORRUPTIONS["B-cut-to-5-columns"](workdir)
    tree, name = read_yaml("quick")
    task = RunTask("run", tree, overrides, name, str(workdir), os.getcwd())
    assert execute(task, workdir).status == "done"
    straight = tmp_path / "straight"
    experiment.run_experiment(load_config("quick", overrides), straight, progress=False)
    same_outputs(workdir, straight)


# ----------------------------------------------------------------------------- batches


def test_an_interrupted_batch_resumes_each_run_bit_for_bit(tmp_path, monkeypatch):
    """A batch of infinite-task runs interrupted mid-way checkpoints every run; resumed (one
    run's checkpoint removed, so it restarts from step 0 while the others go on from theirs)
    it gives the outputs of each run alone."""
    configs = [load_config("quick", ["tasks.n=infinite", "train.steps=200",
                                     "train.record_every=10", "eval.n_tasks=50",
                                     "eval.shots=[5]", f"method.outer_lr={lr}"])
               for lr in (0.1, 0.2, 0.3)]
    for i, config in enumerate(configs):
        experiment.run_experiment(config, tmp_path / f"alone{i}", progress=False)
    dirs = [tmp_path / f"batch{i}" for i in range(3)]
    real = experiment.batched_stepper

    def interrupting(backends):
        stepper = real(backends)
        step = stepper.step

        def stop_at_130(state, t):
            if t == 130:
                raise KeyboardInterrupt
            return step(state, t)

        stepper.step = stop_at_130
        return stepper

    monkeypatch.setattr(experiment, "batched_stepper", interrupting)
    with pytest.raises(KeyboardInterrupt):
        experiment.run_batch(configs, dirs, checkpoint_seconds=0.0)
    assert [RunDirectory(d).checkpoint().step for d in dirs] == [120, 120, 120]
    monkeypatch.setattr(experiment, "batched_stepper", real)
    (dirs[1] / CHECKPOINT).unlink()
    results = experiment.run_batch(configs, dirs, resume=True)
    assert all(result.status == "done" for result in results)
    assert [r.summary["provenance"].get("resumed_at_step") for r in results] == [120, None, 120]
    for i, directory in enumerate(dirs):
        same_outputs(directory, tmp_path / f"alone{i}")


# ----------------------------------------------------------------------------- test time


def test_a_diverging_test_time_adaptation_exits_3_with_advice_and_keeps_results(
        cli, error_line, tmp_path):
    out = tmp_path / "run"
    result = cli("run", "quick", "--set", "eval.adapt_steps=200", "--set", "eval.shots=[5,20]",
                 "--set", "eval.n_tasks=100", "--out", out, "--no-progress")
    assert result.exit_code == EXIT_DIVERGED, result.output
    line = error_line(result)
    assert "test-time adaptation diverged" in line
    assert "method.inner_lr" in line and "eval.adapt_steps" in line and str(out) in line
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "diverged" and "eval.adapt_steps" in summary["error"]
    assert (out / "eval.csv").is_file() and (out / "params.npz").is_file()
    assert len(pd.read_csv(out / METRICS)) == 31  # the training is kept
    assert not (out / CHECKPOINT).exists()
    control = cli("run", "quick", "--set", "eval.adapt_steps=3", "--set", "eval.shots=[5,20]",
                  "--set", "eval.n_tasks=100", "--out", tmp_path / "control", "--no-progress")
    assert control.exit_code == 0, control.output  # a few test-time steps are fine


# ----------------------------------------------------------------------------- full disk


@pytest.fixture
def tiny_disk(tmp_path):
    """A real 256 kB tmpfs at ``tmp_path / "disk"`` (skipped where it cannot be mounted)."""
    mount = tmp_path / "disk"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mount)],
                          capture_output=True, text=True, check=False)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip() or done.returncode}")
    yield mount
    subprocess.run(["umount", str(mount)], check=False)


@pytest.mark.slow
def test_a_full_disk_is_one_line_and_resume_finishes_once_there_is_room(tmp_path, tiny_disk):
    """A run writing onto a full disk: exit 1, one line naming what could not be written; no
    temporary file left, nothing a resume would trust wrongly; with more room, ``--resume``
    finishes with the outputs of an uninterrupted run."""
    args = ["run", "quick", "--set", "train.steps=3000", "--set", "train.record_every=1",
            "--set", "eval.n_tasks=100", "--no-progress"]
    straight = tmp_path / "straight"
    subprocess.run([*METAREP, *args, "--out", str(straight)], check=True, capture_output=True)
    out = tiny_disk / "run"
    full = subprocess.run([*METAREP, *args, "--out", str(out)], capture_output=True, text=True,
                          check=False)
    assert full.returncode == EXIT_SYSTEM, full.stderr
    assert len(full.stderr.splitlines()) == 1, full.stderr
    assert full.stderr.startswith("error: run stopped: cannot write ")
    assert "No space left on device" in full.stderr
    assert not [p for p in out.iterdir() if is_temporary(p)]
    assert not (out / "summary.json").exists()
    checkpoint = RunDirectory(out).checkpoint()
    if checkpoint is not None:  # what it says is backed by the rows metrics.csv holds
        assert RunDirectory(out).recorded_metrics(checkpoint)[-1]["step"] == checkpoint.step
    subprocess.run(["mount", "-o", "remount,size=64m", str(tiny_disk)], check=True)
    resumed = subprocess.run([*METAREP, *args, "--out", str(out), "--resume"],
                             capture_output=True, text=True, check=False)
    assert resumed.returncode == 0, resumed.stderr
    same_outputs(out, straight)


# ----------------------------------------------------------------------------- sweeps


def descendants(pid: int) -> set[int]:
    """The processes below ``pid`` (from /proc; empty where there is none)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:
            continue
        fields = text[text.rindex(")") + 2:].split()
        if fields[0] not in "ZX":
            children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = set(), [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.add(child)
            todo.append(child)
    return found


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs /proc")
@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_stops_a_sweep_cleanly_and_the_same_command_finishes_it(tmp_path, signum):
    """A real sweep on two local workers gets SIGINT (to its process group, as Ctrl-C does)
    or SIGTERM (to the driver alone, as ``kill`` does) while runs train: the running runs
    checkpoint, no worker survives, the sweep exits 128 + signal with one line; the same
    command then resumes the interrupted runs from their checkpoints, and every run equals
    the run made on its own, bit for bit."""
    import yaml

    base = {"problem": {"d": 8, "k": 2}, "tasks": {"n": 100, "m_in": 5, "m_out": 5},
            "model": {"width": 4}, "train": {"steps": 6000, "record_every": 1},
            "eval": {"shots": [5], "n_tasks": 50}}
    (tmp_path / "base.yaml").write_text(yaml.safe_dump(base))
    sweep = tmp_path / "sweep.yaml"
    sweep.write_text(yaml.safe_dump({"base": "base.yaml", "grid": {"model.width": [2, 3, 4]}}))
    out = tmp_path / "out"
    command = [*METAREP, "sweep", str(sweep), "--out", str(out), "--workers", "2",
               "--no-progress"]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True, start_new_session=True)
    wait_for(lambda: out.exists() and len(list(out.glob(".*.tmp/checkpoint.npz"))) == 2,
             process)
    time.sleep(0.5)
    workers = descendants(process.pid)
    if signum == signal.SIGINT:
        os.killpg(process.pid, signum)
    else:
        process.send_signal(signum)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 128 + signum, stderr
    assert len(stderr.splitlines()) == 1, stderr
    assert stderr.startswith(f"error: sweep stopped by {signal.Signals(signum).name}")
    deadline = time.monotonic() + 10
    while {pid for pid in workers if Path(f"/proc/{pid}").exists()
           and Path(f"/proc/{pid}/stat").read_text().split(") ")[1][0] not in "ZX"}:
        assert time.monotonic() < deadline, "a worker outlived the sweep"
        time.sleep(0.1)
    checkpoints = {p.parent.name: RunDirectory(p.parent).checkpoint().step
                   for p in out.glob(".*.tmp/checkpoint.npz")}
    assert len(checkpoints) == 2 and all(step > 0 for step in checkpoints.values())
    resumed = subprocess.run(command, capture_output=True, text=True, check=False)
    assert resumed.returncode == 0, resumed.stderr
    assert "3 runs, 3 done, 0 failed" in resumed.stdout
    assert sorted(p.name for p in out.iterdir()) == [
        ".sweep.lock", "sweep.json", "width=2", "width=3", "width=4"]
    resumed_at = {p.name: json.loads((p / "summary.json").read_text())["provenance"].get(
        "resumed_at_step") for p in out.iterdir() if p.is_dir()}
    assert {f".{name}.tmp": step for name, step in resumed_at.items() if step} == checkpoints
    for width in (2, 3, 4):
        straight = tmp_path / f"straight{width}"
        with_width = load_config(str(tmp_path / "base.yaml"), [f"model.width={width}"])
        from threadpoolctl import threadpool_limits

        with threadpool_limits(limits=1):
            experiment.run_experiment(with_width, straight, progress=False)
        same_outputs(out / f"width={width}", straight)


def test_an_interrupt_sent_back_by_a_pool_worker_unpickles_with_its_signal():
    """A worker's stopped job returns its Terminated to the driver; one that cannot be
    unpickled would break the pool (which then kills the other workers mid-save)."""
    import pickle

    from metarep.run.interrupts import Terminated, exit_code

    for signum in (signal.SIGTERM, signal.SIGINT):
        back = pickle.loads(pickle.dumps(Terminated(signum)))
        assert isinstance(back, KeyboardInterrupt) and back.signum == signum
        assert exit_code(back) == 128 + signum


# ----------------------------------------------------------------------------- CSV text


def test_csv_text_writes_what_pandas_writes():
    """The run directory writes its tables without pandas; the text is pandas' own
    ``to_csv(index=False)`` of the same rows (columns in first-named order, missing, None and
    NaN cells empty, numbers at full precision, fields with commas or quotes quoted), and
    reads back to the same values."""
    rows = [{"step": 0, "loss": 0.1, "risk": float("nan"), "tag": 'a, "b"'},
            {"step": 10, "loss": np.float64(1 / 3), "risk": np.float32(0.1), "tag": None,
             "late": 1e-300},
            {"step": 20, "loss": float("inf"), "risk": -2.5e17, "tag": "plain", "late": True}]
    assert csv_text(rows) == pd.DataFrame(rows).to_csv(index=False)
    assert csv_text(rows[1:], header=False) == pd.DataFrame(rows[1:]).to_csv(index=False,
                                                                             header=False)
    columns = ["tag", "step", "absent"]
    assert csv_text(rows, columns) == pd.DataFrame(rows, columns=columns).to_csv(index=False)
    import io
    back = pd.read_csv(io.StringIO(csv_text(rows)))
    assert back["loss"].tolist()[:2] == [0.1, 1 / 3] and back["step"].tolist() == [0, 10, 20]
