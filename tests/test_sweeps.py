"""Sweeps: the sweep file, run planning, executors (local pool, Ray), resume after SIGKILL,
failure records and the collected table."""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from scipy import stats
from sweep_files import BASE, write_sweep
from threadpoolctl import threadpool_limits
from typer.testing import CliRunner

from metarep.cli import app
from metarep.errors import ConfigError
from metarep.run import experiment
from metarep.run.experiment import BATCH_KEYS
from metarep.run.loop import Diverged
from metarep.run.rundir import ERROR as ERROR_FILE
from metarep.run.rundir import RunDirectory
from metarep.run.schema import from_dict, iter_keys
from metarep.sweeps import driver
from metarep.sweeps.collect import collect, collect_table, seed_intervals
from metarep.sweeps.driver import TEMP_DIR, SweepOptions, _finalize, batch_jobs, run_sweep
from metarep.sweeps.executors import (
    LocalExecutor,
    Outcome,
    RunTask,
    is_this_machine,
    one_thread,
    packed_files,
    use_local_token,
)
from metarep.sweeps.manifest import MANIFEST, build_manifest, write_manifest
from metarep.sweeps.spec import load_sweep, plan_runs, value_token

METAREP = [str(Path(sys.executable).with_name("metarep"))]
RUN_FILES = {"config.yaml", "metrics.csv", "eval.csv", "summary.json", "params.npz"}
"""What a sweep's run writes: what `metarep run` writes but the figures (drawn on request)."""
FIGURES = {"training.png", "eval.png"}
SAFE_NAME = re.compile(r"^[A-Za-z0-9._+=,-]+$")
RUNNER = CliRunner()


def finished_runs(out: Path) -> list[Path]:
    return sorted(p for p in out.iterdir() if p.is_dir() and not p.name.startswith("."))


# ----------------------------------------------------------------------------- planning


def test_value_tokens_are_safe_and_tell_values_apart():
    values = [5, "5", 5.0, 0.05, 1e-5, -2, "fo-anil", "a/b", "a_b", "a b", [1, 2], "1_2",
              None, "null", True, "true", "online", {"x": 1}, "", "..", "x" * 300]
    tokens = [value_token(v) for v in values]
    assert len(set(tokens)) == len(values)
    assert all(re.fullmatch(r"[A-Za-z0-9._+-]*", t) for t in tokens)
    assert value_token(0.05) == "0.05" and value_token("fo-anil") == "fo-anil"


def test_plan_runs_is_the_product_of_grid_zip_and_seeds(tmp_path):
    grid = {"model.width": [2, 4, 8], "method.outer_lr": [0.1, 0.2]}
    zipped = {"problem.d": [6, 8], "problem.k": [2, 2]}
    seeds = [0, 5, 7]
    spec = load_sweep(write_sweep(tmp_path, set={"train.steps": 10}, grid=grid, zip=zipped,
                                  seeds=seeds))
    plans = plan_runs(spec)
    expected = []  # naive nested loops, in the documented order
    for width in grid["model.width"]:
        for lr in grid["method.outer_lr"]:
            for j in range(2):
                for s in seeds:
                    expected.append({"train.steps": 10, "model.width": width,
                                     "method.outer_lr": lr, "problem.d": zipped["problem.d"][j],
                                     "problem.k": 2,
                                     **{key: s for key, _ in iter_keys()
                                        if key.endswith(".seed")}})
    assert [plan.overrides for plan in plans] == expected
    names = [plan.name for plan in plans]
    assert len(set(names)) == len(names) and all(SAFE_NAME.match(n) for n in names)
    assert names == [plan.name for plan in plan_runs(load_sweep(tmp_path / "sweep.yaml"))]
    assert names[0] == "width=2,outer_lr=0.1,d=6,seed=0"  # problem.k never varies: not named
    assert [plan.seed for plan in plans[:3]] == seeds


def test_seed_keys_choose_which_seeds_vary(tmp_path):
    spec = load_sweep(write_sweep(tmp_path, seeds=[1, 2], seed_keys=["model.seed"]))
    plans = plan_runs(spec)
    assert [plan.name for plan in plans] == ["seed=1", "seed=2"]
    assert [plan.overrides for plan in plans] == [{"model.seed": s} for s in (1, 2)]
    single = plan_runs(load_sweep(write_sweep(tmp_path / "one", grid={"model.width": [3]})))
    assert [(p.name, p.overrides) for p in single] == [("run", {"model.width": 3})]


@pytest.mark.parametrize("fields, key", [
    ({"grid": {"model.width": [2]}, "grids": {}}, "grids"),
    ({"grid": {"model.widht": [2]}}, "grid.model.widht"),
    ({"grid": {"model.width": []}}, "grid.model.width"),
    ({"grid": {"model.width": 3}}, "grid.model.width"),
    ({"grid": {"model.width": [2, 2]}}, "grid.model.width"),
    ({"zip": {"problem.d": [6, 8], "model.width": [2, 3, 4]}}, "zip.model.width"),
    ({"zip": {"problem.d": [6, 6], "model.width": [2, 2]}}, "zip"),
    ({"set": {"model.width": 2}, "grid": {"model.width": [2, 3]}}, "grid.model.width"),
    ({"set": {"model.width": 0}}, "set.model.width"),
    ({"set": {"nope.x": 1}}, "set.nope.x"),
    ({"seeds": [0, -1]}, "seeds[1]"),
    ({"seeds": [0, 0]}, "seeds"),
    ({"seed_keys": ["model.seed"]}, "seed_keys"),
    ({"seeds": [0], "seed_keys": ["model.sed"]}, "seed_keys.model.sed"),
    ({"seeds": [0, 1], "grid": {"model.seed": [1, 2]}}, "seed_keys.model.seed"),
])
def test_load_sweep_rejects_bad_files_naming_the_field(tmp_path, fields, key):
    with pytest.raises(ConfigError) as error:
        load_sweep(write_sweep(tmp_path, **fields))
    assert error.value.key == key


def test_base_is_found_beside_the_sweep_file_or_by_name(tmp_path, monkeypatch):
    path = write_sweep(tmp_path / "a" / "b")
    monkeypatch.chdir(tmp_path)
    assert load_sweep(path).tree == BASE
    path.write_text("base: quick\n")
    assert load_sweep(path).config_name == "quick"
    path.write_text("base: missing.yaml\n")
    with pytest.raises(ConfigError, match="base: no such file"):
        load_sweep(path)
    path.write_text("grid: {model.width: [2]}\n")
    with pytest.raises(ConfigError) as error:
        load_sweep(path)
    assert error.value.key == "base"


# ----------------------------------------------------------------------------- statistics


def test_seed_intervals_are_student_t_intervals_with_95_percent_coverage():
    rng = np.random.default_rng(np.random.SeedSequence(11))
    n_groups, n = 4000, 4
    values = rng.normal(1.5, 2.0, size=(n_groups, n))
    frame = pd.DataFrame({"status": "done", "g": np.repeat(np.arange(n_groups), n),
                          "x": 1.0, "y": values.ravel()})
    out = seed_intervals(frame, "x", "y", ["g"])
    covered = ((out["low"] <= 1.5) & (1.5 <= out["high"])).mean()
    z = (covered - 0.95) / np.sqrt(0.95 * 0.05 / n_groups)
    assert abs(z) < 4, (covered, z)
    low, high = stats.t.interval(0.95, n - 1, loc=values[0].mean(), scale=stats.sem(values[0]))
    np.testing.assert_allclose(out.loc[0, ["low", "high"]].to_numpy(float), [low, high],
                               rtol=1e-12)
    assert (out["n"] == n).all()


def test_seed_intervals_skip_failed_runs_and_single_seeds():
    frame = pd.DataFrame({"status": ["done", "failed", "done"], "x": [1, 1, 2],
                          "y": [2.0, 100.0, 3.0]})
    out = seed_intervals(frame, "x", "y", [])
    assert out["mean"].tolist() == [2.0, 3.0] and out["n"].tolist() == [1, 1]
    assert out[["low", "high"]].isna().all().all()


# ----------------------------------------------------------------------------- running


def test_one_thread_limits_blas_and_torch_and_restores_them(monkeypatch):
    from threadpoolctl import threadpool_info

    torch = pytest.importorskip("torch")
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    monkeypatch.delenv("MKL_NUM_THREADS", raising=False)
    torch.set_num_threads(2)
    with one_thread():
        assert all(pool["num_threads"] == 1 for pool in threadpool_info())
        assert torch.get_num_threads() == 1
        assert os.environ["OMP_NUM_THREADS"] == os.environ["MKL_NUM_THREADS"] == "1"
    assert torch.get_num_threads() == 2
    assert os.environ["OMP_NUM_THREADS"] == "2" and "MKL_NUM_THREADS" not in os.environ


def run_directly(tree: dict, overrides: dict, out: Path) -> None:
    """The reference: ``metarep.run.experiment.run_experiment`` of one run, in this process."""
    with threadpool_limits(limits=1):
        experiment.run_experiment(from_dict(tree, overrides, name="base"), out, progress=False,
                                  figures=False)


@pytest.mark.slow
def test_sweep_runs_records_failures_resumes_and_retries(tmp_path):
    grid = {"model.width": [2, 0], "method.outer_lr": [0.2, 1000.0]}
    sweep = write_sweep(tmp_path, grid=grid)
    out = tmp_path / "out"
    report = run_sweep(sweep, out, SweepOptions(workers=2, progress=False))
    assert (report.total, report.done, report.failed, report.ran) == (4, 1, 3, 4)
    plans = plan_runs(load_sweep(sweep))
    failing = tuple(p.name for p in plans if p.overrides["model.width"] == 0
                    or p.overrides["method.outer_lr"] == 1000.0)
    assert report.failed_runs == failing
    assert [p.name for p in finished_runs(out)] == sorted(p.name for p in plans)
    for plan in plans:
        run_dir = out / plan.name
        files = {p.name for p in run_dir.iterdir()}
        if plan.overrides["model.width"] == 0:  # bad cell: only the error record
            assert files == {ERROR_FILE}
            record = json.loads((run_dir / ERROR_FILE).read_text())
            assert record["key"] == "model.width" and record["type"] == "ConfigError"
            assert record["overrides"] == plan.overrides
        elif plan.overrides["method.outer_lr"] == 1000.0:  # diverges: recorded results kept
            assert ERROR_FILE in files and "metrics.csv" in files
            assert json.loads((run_dir / ERROR_FILE).read_text())["type"] == "Diverged"
        else:  # exactly the outputs of metarep run, with the same numbers
            assert files == RUN_FILES
            run_directly(BASE, plan.overrides, tmp_path / "direct" / plan.name)
            for name in ("metrics.csv", "eval.csv", "config.yaml"):
                assert (run_dir / name).read_text() == (
                    tmp_path / "direct" / plan.name / name).read_text()
    assert not [p for p in out.iterdir() if TEMP_DIR.match(p.name)]
    stamps = {p.name: (p / ERROR_FILE if (p / ERROR_FILE).exists() else p / "summary.json"
                       ).stat().st_mtime_ns for p in finished_runs(out)}
    again = run_sweep(sweep, out, SweepOptions(workers=1, progress=False))
    assert (again.ran, again.done, again.failed) == (0, 1, 3)
    assert again.failed_runs == failing  # the earlier failures are still named
    retried = run_sweep(sweep, out, SweepOptions(workers=1, retry_failed=True, progress=False))
    assert (retried.ran, retried.done, retried.failed) == (3, 1, 3)
    for path in finished_runs(out):
        newer = (path / ERROR_FILE).exists()
        marker = path / (ERROR_FILE if newer else "summary.json")
        assert (marker.stat().st_mtime_ns != stamps[path.name]) == newer
    assert len(finished_runs(out)) == 4
    assert not [p for p in out.iterdir() if TEMP_DIR.match(p.name)]


@pytest.mark.slow
def test_a_killed_worker_breaks_the_pool_and_its_runs_are_redone(tmp_path):
    import multiprocessing

    spec = load_sweep(write_sweep(tmp_path, set={"train.steps": 800}, seeds=[0, 1, 2, 3]))
    tasks = [RunTask(plan.name, spec.tree, plan.overrides, "base",
                     str(tmp_path / f".{plan.name}.tmp-0000000{i}"), str(tmp_path))
             for i, plan in enumerate(plan_runs(spec))]
    outcomes = []
    for outcome in LocalExecutor(2).map([(task,) for task in tasks]):
        if not outcomes:  # a worker dies while the others run: the pool breaks
            os.kill(multiprocessing.active_children()[0].pid, signal.SIGKILL)
        outcomes.append(outcome)
    assert sorted(o.name for o in outcomes) == sorted(t.name for t in tasks)
    assert [o.status for o in outcomes] == ["done"] * 4
    for task in tasks:
        assert {p.name for p in Path(task.workdir).iterdir()} == RUN_FILES


# ----------------------------------------------------------------------------- batched runs

INFINITE = {"tasks.n": "infinite", "train.steps": 300, "train.record_every": 50}


def skip_drawing(monkeypatch) -> None:
    """In this process, build the figures but do not draw them (the slow part; figures are
    not compared): each is written as a placeholder file."""

    def write_figure(self, name, figure):
        self.file(name).write_bytes(b"figure")

    monkeypatch.setattr(RunDirectory, "write_figure", write_figure)


def assert_close_json(a, b, where: str = "summary") -> None:
    """``a == b``, floats to 1e-10 relative."""
    if isinstance(b, dict):
        assert isinstance(a, dict) and a.keys() == b.keys(), where
        for key in b:
            assert_close_json(a[key], b[key], f"{where}.{key}")
    elif isinstance(b, list):
        assert isinstance(a, list) and len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_close_json(x, y, f"{where}[{i}]")
    elif isinstance(b, float):
        assert a == pytest.approx(b, rel=1e-10, abs=0), where
    else:
        assert a == b, where


def assert_same_run(batched: Path, single: Path) -> None:
    """The run directories hold the same files (``error.json`` aside) with the same numbers:
    metrics, evaluation and parameters to 1e-10 (relative), the summary but for ``seconds`` and
    ``provenance``."""
    names = {p.name for p in batched.iterdir()} - {ERROR_FILE}
    assert names == {p.name for p in single.iterdir()} - {ERROR_FILE}
    assert (batched / "config.yaml").read_text() == (single / "config.yaml").read_text()
    for name in ("metrics.csv", "eval.csv"):
        if name in names:
            pd.testing.assert_frame_equal(pd.read_csv(batched / name), pd.read_csv(single / name),
                                          check_exact=False, rtol=1e-10, atol=0)
    with np.load(batched / "params.npz") as mine, np.load(single / "params.npz") as theirs:
        assert sorted(mine.files) == sorted(theirs.files)
        for key in theirs.files:
            np.testing.assert_allclose(mine[key], theirs[key], rtol=1e-10, atol=0)
    summaries = [json.loads((path / "summary.json").read_text()) for path in (batched, single)]
    for summary in summaries:
        summary.pop("seconds")
        summary.pop("provenance")  # when and by which command each was run
    assert_close_json(*summaries)


def spy_on(monkeypatch, module, name: str) -> list:
    """Replace the function ``module.name`` by a wrapper that records what each call returns."""
    results, real = [], getattr(module, name)

    def wrapper(*args, **kwargs):
        results.append(real(*args, **kwargs))
        return results[-1]

    monkeypatch.setattr(module, name, wrapper)
    return results


def test_batch_jobs_group_infinite_runs_that_differ_only_in_batch_keys(tmp_path, monkeypatch):
    grid = {"tasks.n": ["infinite", 30], "model.width": [3, 0, 4], "method.outer_lr": [0.1, 0.2]}
    spec = load_sweep(write_sweep(tmp_path, grid=grid, seeds=[0, 1, 2],
                                  seed_keys=["model.seed", "eval.seed"]))
    tasks = [RunTask(p.name, spec.tree, p.overrides, "base", "", "") for p in plan_runs(spec)]
    assert len(tasks) == 36

    def shared(task: RunTask) -> str:
        return json.dumps({k: v for k, v in task.overrides.items() if k not in BATCH_KEYS})

    for workers, max_batch, sizes in ((1, 64, [6]), (2, 64, [3, 3]), (3, 64, [2, 2, 2]),
                                      (16, 64, [2, 2, 2]), (1, 4, [3, 3])):
        monkeypatch.setattr(driver, "MAX_BATCH", max_batch)
        jobs = batch_jobs(tasks, workers)
        assert [task.name for job in jobs for task in job] == [task.name for task in tasks]
        batched = [job for job in jobs if len(job) > 1]
        assert [len(job) for job in batched] == sizes * 2  # widths 3 and 4, in order
        for job in batched:
            assert {task.overrides["tasks.n"] for task in job} == {"infinite"}
            assert len({shared(task) for task in job}) == 1
        assert len(jobs) - len(batched) == 24  # the pool runs and the bad cells (width 0)
    # seeds applied to problem.seed too: runs of different B_star are not batched together
    spec = load_sweep(write_sweep(tmp_path / "b", set=INFINITE,
                                  grid={"method.outer_lr": [0.1, 0.2]}, seeds=[0, 1]))
    tasks = [RunTask(p.name, spec.tree, p.overrides, "base", "", "") for p in plan_runs(spec)]
    assert [[task.name for task in job] for job in batch_jobs(tasks, 1)] == [
        ["outer_lr=0.1,seed=0", "outer_lr=0.2,seed=0"],
        ["outer_lr=0.1,seed=1", "outer_lr=0.2,seed=1"]]
    with pytest.raises(ValueError, match="differ only in"):
        experiment.run_batch(
            [from_dict(BASE, INFINITE), from_dict(BASE, {**INFINITE, "model.width": 3})],
            [tmp_path / "x", tmp_path / "y"])


def test_a_batch_is_evaluated_together_and_writes_what_each_run_writes_alone(tmp_path):
    """Two evaluation groups (sigma^2, eval.seed), one of them with two step sizes: every file
    is byte for byte (the summary but ``seconds`` and ``provenance``) that of the run alone,
    and no figure is drawn."""
    cells = [{"method.inner_lr": 0.3}, {"method.inner_lr": 0.5, "tasks.m_in": math.inf},
             {"problem.noise_var": 1.0, "eval.seed": 7}, {"eval.seed": 7, "model.seed": 5}]
    configs = [from_dict(BASE, {**INFINITE, **cell}, name="base") for cell in cells]
    batched = [tmp_path / "batch" / str(i) for i in range(len(cells))]
    results = experiment.run_batch(configs, batched, figures=False)
    assert all(result.status == "done" for result in results)
    for i, (config, path) in enumerate(zip(configs, batched, strict=True)):
        single = tmp_path / "single" / str(i)
        experiment.run_experiment(config, single, progress=False, figures=False)
        names = {p.name for p in path.iterdir()}
        assert names == RUN_FILES == {p.name for p in single.iterdir()}
        for name in RUN_FILES - {"summary.json"}:
            assert (path / name).read_bytes() == (single / name).read_bytes(), (i, name)
        summaries = [json.loads((p / "summary.json").read_text()) for p in (path, single)]
        for summary in summaries:
            del summary["seconds"], summary["provenance"]
        assert summaries[0] == summaries[1]
        assert results[i].eval_rows == experiment.run_experiment(
            config, single, progress=False, figures=False, overwrite=True).eval_rows


def test_figures_drawn_on_request_are_those_a_run_draws(tmp_path, monkeypatch, cli,
                                                        error_line):
    """``metarep figures`` draws from a run's files what the run draws from its records;
    on a sweep directory, every finished run's; anything else is one line naming DIR."""
    from metarep.run import figures

    drawn, real = [], figures.write_run_figures

    def spy(directory, metrics, eval_frame, title, theory):
        drawn.append((Path(directory.path).name, metrics, eval_frame, title,
                      figures.stated_limits(theory)))
        return real(directory, metrics, eval_frame, title, theory)

    monkeypatch.setattr(figures, "write_run_figures", spy)
    skip_drawing(monkeypatch)
    config = from_dict(BASE, INFINITE, name="base")
    experiment.run_experiment(config, tmp_path / "drawn", progress=False)
    experiment.run_experiment(config, tmp_path / "later", progress=False, figures=False)
    assert not FIGURES & {p.name for p in (tmp_path / "later").iterdir()}
    assert figures.draw_run_figures(tmp_path / "later") == [
        tmp_path / "later" / name for name in ("training.png", "eval.png")]
    (_, *at_run), (_, *on_request) = drawn
    for mine, theirs in zip(at_run[:2], on_request[:2], strict=True):
        pd.testing.assert_frame_equal(mine, theirs, check_exact=False, rtol=1e-15, atol=0)
    assert at_run[2:] == on_request[2:] and at_run[3] is not None
    assert FIGURES <= {p.name for p in (tmp_path / "later").iterdir()}

    sweep = write_sweep(tmp_path, set=INFINITE, grid={"method.outer_lr": [0.1, 1e4, 0.2]})
    out = tmp_path / "sweep"
    result = cli("sweep", sweep, "--out", out, "--workers", 1, "--no-progress")
    assert result.exit_code == 0, result.output
    assert all(not FIGURES & {p.name for p in run.iterdir()} for run in finished_runs(out))
    drawn.clear()
    result = cli("figures", out)
    assert result.exit_code == 0, result.output
    assert "drew the figures of 3 runs" in result.stdout  # the diverged one: its training
    assert sorted(name for name, *_ in drawn) == sorted(p.name for p in finished_runs(out))
    for bad in (tmp_path / "nowhere", tmp_path):
        result = cli("figures", bad)
        assert result.exit_code == 2
        assert error_line(result).startswith("error: DIR: ")
    (tmp_path / "later" / "metrics.csv").write_text("not,a\ntable")
    result = cli("figures", tmp_path / "later")
    assert result.exit_code == 2 and error_line(result).startswith("error: RUN_DIR: ")


def test_figures_drawn_by_several_processes_are_those_drawn_in_this_one(tmp_path, cli,
                                                                          error_line):
    """``metarep figures --workers 2`` draws every run's two figures, byte for byte those
    drawn in this process; ``--workers 0`` is refused naming the option."""
    from metarep.run import figures

    sweep = write_sweep(tmp_path, set=INFINITE, grid={"method.outer_lr": [0.1, 0.2]})
    out = tmp_path / "sweep"
    assert cli("sweep", sweep, "--out", out, "--workers", 1, "--no-progress").exit_code == 0
    runs = finished_runs(out)
    serial = {run.name: [run / name for name in sorted(FIGURES)] for run in runs}
    figures.draw_figures(runs)
    drawn = {path: path.read_bytes() for paths in serial.values() for path in paths}
    for path in drawn:
        path.unlink()
    result = cli("figures", out, "--workers", 2)
    assert result.exit_code == 0, result.output
    assert "drew the figures of 2 runs" in result.stdout
    assert {path: path.read_bytes() for path in drawn} == drawn
    result = cli("figures", out, "--workers", 0)
    assert result.exit_code == 2 and "--workers" in error_line(result)


def test_a_sweep_with_figures_has_each_run_draw_its_own(tmp_path, monkeypatch, cli):
    skip_drawing(monkeypatch)
    sweep = write_sweep(tmp_path, seeds=[0, 1])
    result = cli("sweep", sweep, "--out", tmp_path / "out", "--workers", 1, "--no-progress",
                 "--figures")
    assert result.exit_code == 0, result.output
    runs = finished_runs(tmp_path / "out")
    assert len(runs) == 2
    assert all({p.name for p in run.iterdir()} == RUN_FILES | FIGURES for run in runs)


@pytest.mark.slow
def test_infinite_task_sweep_is_batched_and_equals_single_runs(tmp_path, monkeypatch):
    skip_drawing(monkeypatch)
    batches = spy_on(monkeypatch, experiment, "run_batch")
    grid = {"method.inner_lr": [0.3, 0.5], "method.outer_lr": [0.1, 0.2],
            "tasks.m_in": [5, math.inf]}
    sweep = write_sweep(tmp_path, set=INFINITE, grid=grid, seeds=[0, 1],
                        seed_keys=["model.seed", "eval.seed"])
    out = tmp_path / "out"
    result = RUNNER.invoke(app, ["sweep", str(sweep), "--out", str(out), "--workers", "1",
                                 "--no-progress"])
    assert result.exit_code == 0, result.output
    assert "16 runs, 16 done, 0 failed" in result.output
    assert [len(results) for results in batches] == [16]
    runs = finished_runs(out)
    assert len(runs) == 16
    for path in runs:  # `metarep run` on the run's config.yaml (same name: base)
        single = tmp_path / "single" / path.name
        single.mkdir(parents=True)
        shutil.copy(path / "config.yaml", single / "base.yaml")
        result = RUNNER.invoke(app, ["run", str(single / "base.yaml"), "--out",
                                     str(single / "out"), "--no-progress", "--no-figures"])
        assert result.exit_code == 0, result.output
        assert_same_run(path, single / "out")
    assert len(batches) == 1


@pytest.mark.slow
def test_a_diverging_run_fails_alone_in_its_batch(tmp_path, monkeypatch):
    batches = spy_on(monkeypatch, driver, "batch_jobs")
    # two batches of two on a pool of 2 workers, each with a run that diverges at step 1:
    # the loss explodes (outer_lr 1e4) or is nan (1e100)
    sweep = write_sweep(tmp_path, set=INFINITE,
                        grid={"method.outer_lr": [0.1, 1e4, 1e100, 0.2]})
    out = tmp_path / "out"
    report = run_sweep(sweep, out, SweepOptions(workers=2, progress=False))
    assert (report.done, report.failed) == (2, 2)
    assert [[len(job) for job in jobs] for jobs in batches] == [[2, 2]]
    skip_drawing(monkeypatch)
    for plan in plan_runs(load_sweep(sweep)):
        single = tmp_path / "single" / plan.name
        try:
            run_directly(BASE, plan.overrides, single)
        except Diverged as error:
            assert plan.overrides["method.outer_lr"] > 1
            record = json.loads((out / plan.name / ERROR_FILE).read_text())
            assert record["type"] == "Diverged" and record["error"] == str(error)
            assert record["overrides"] == plan.overrides
        else:
            assert not (out / plan.name / ERROR_FILE).exists()
        assert_same_run(out / plan.name, single)


@pytest.mark.slow
def test_collect_writes_one_tidy_row_per_run_and_a_plot(tmp_path):
    sweep = write_sweep(tmp_path, grid={"model.width": [1, 2, 0]},
                        zip={"problem.d": [6, 8], "tasks.m_in": [5, 6]}, seeds=[0, 1])
    out = tmp_path / "out"
    run_sweep(sweep, out, SweepOptions(workers=1, progress=False))
    result = collect(out, x="model.width", y="subspace_dist")
    table = result.table
    plans = plan_runs(load_sweep(sweep))
    assert table["run"].tolist() == [plan.name for plan in plans]
    assert table["status"].tolist() == ["failed" if plan.overrides["model.width"] == 0
                                        else "done" for plan in plans]
    failed = table[table["status"] == "failed"]
    assert failed["error"].str.startswith("model.width: ").all()
    assert table["seed"].tolist() == [plan.seed for plan in plans]
    frame = table.set_index("run")
    for plan in plans:
        for key, value in plan.overrides.items():
            assert str(frame.loc[plan.name, key]) == str(value)
        if plan.overrides["model.width"] != 0:
            summary = json.loads((out / plan.name / "summary.json").read_text())
            for key, value in summary["final"].items():
                assert frame.loc[plan.name, key] == value
            risks = pd.read_csv(out / plan.name / "eval.csv")
            for r in risks.itertuples(index=False):
                assert frame.loc[plan.name, f"excess_risk.{r.method}.{r.shots}"] == r.excess_risk
    assert {key for key, _ in iter_keys()} <= set(table.columns)
    pd.testing.assert_frame_equal(pd.read_parquet(result.parquet), table)
    csv = pd.read_csv(result.csv)
    assert csv.shape == table.shape and list(csv.columns) == list(table.columns)
    np.testing.assert_array_equal(csv["subspace_dist"], table["subspace_dist"])
    assert result.figure == out / "subspace_dist_vs_model.width.png"
    assert result.figure.stat().st_size > 1000
    default = collect(out)
    assert default.figure == out / "perp_norm_vs_model.width.png"
    # A width sweep with k = 2: width 1 cannot cover span(B_star), whatever it learned.
    missed = collect(out, x="model.width", y="span_missed")
    assert missed.figure == out / "span_missed_vs_model.width.png"
    assert missed.figure.stat().st_size > 1000
    done = table[table["status"] == "done"]
    narrow, wide = done[done["model.width"] == 1], done[done["model.width"] == 2]
    assert len(narrow) == len(wide) == 4
    assert (narrow["span_missed"] == 1.0).all() and (narrow["subspace_dist"] == 1.0).all()
    assert (narrow["span_outside"] < 1.0).all()
    np.testing.assert_allclose(wide["span_missed"], wide["subspace_dist"], atol=1e-12)
    assert (wide["subspace_dist"] < 1.0).all()
    result.parquet.unlink()
    for bad, key in (({"x": "model.widht"}, "--x"), ({"y": "nope"}, "--y")):
        with pytest.raises(ConfigError) as error:
            collect(out, **bad)
        assert error.value.key == key and not result.parquet.exists()


@pytest.mark.slow
def test_out_dir_must_hold_the_same_sweep(tmp_path):
    sweep = write_sweep(tmp_path, grid={"model.width": [2, 3]})
    out = tmp_path / "out"
    run_sweep(sweep, out, SweepOptions(workers=1, progress=False))
    other = write_sweep(tmp_path, "other.yaml", grid={"model.width": [2, 4]})
    with pytest.raises(ConfigError, match="different sweep") as error:
        run_sweep(other, out, SweepOptions(workers=1, progress=False))
    assert error.value.key == "--out"
    (tmp_path / "plain").mkdir()
    (tmp_path / "plain" / "notes.txt").write_text("mine")
    with pytest.raises(ConfigError, match="not a sweep directory"):
        run_sweep(sweep, tmp_path / "plain", SweepOptions(workers=1, progress=False))
    with pytest.raises(ConfigError, match="not a sweep directory"):
        collect_table(tmp_path / "plain")


def cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([*METAREP, *args], capture_output=True, text=True, env=env,
                          timeout=300)


@pytest.mark.slow
def test_cli_rejects_bad_input_with_one_line_and_writes_nothing(tmp_path):
    bad = write_sweep(tmp_path, zip={"problem.d": [6, 8], "model.width": [2]})
    good = write_sweep(tmp_path, "good.yaml", grid={"model.width": [2, 3]})
    out = tmp_path / "out"
    for args, key in (([str(bad)], "zip.model.width"),
                      ([str(good), "--address", "127.0.0.1:1"], "--address"),
                      ([str(good), "--workers", "0"], "--workers"),
                      ([str(good), "--executor", "condor"], "--executor")):
        result = cli("sweep", *args, "--out", str(out))
        assert result.returncode == 2, result.stderr
        assert result.stderr.startswith(f"error: {key}: ") and result.stderr.count("\n") == 1
        assert not out.exists()
    result = cli("collect", str(tmp_path))
    assert result.returncode == 2 and "not a sweep directory" in result.stderr


# ----------------------------------------------------------------------------- SIGKILL


@pytest.mark.slow
def test_sigkill_midway_then_resume_completes_every_run_once(tmp_path):
    grid = {"model.width": [2, 3, 4, 5], "method.outer_lr": [0.1, 0.2]}
    sweep = write_sweep(tmp_path, set={"train.steps": 1500, "train.record_every": 100},
                        grid=grid)
    out = tmp_path / "out"
    command = ["sweep", str(sweep), "--out", str(out), "--workers", "2", "--no-progress"]
    process = subprocess.Popen([*METAREP, *command], start_new_session=True,
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while not (out.exists() and len(finished_runs(out)) >= 2):
        assert process.poll() is None, process.stderr.read()
        assert time.monotonic() < deadline
        time.sleep(0.05)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    process.stderr.close()
    assert 2 <= len(finished_runs(out)) < 8, "the kill must land midway"
    resumed = cli(*command)
    assert resumed.returncode == 0, resumed.stderr
    assert "8 runs, 8 done, 0 failed" in resumed.stdout
    plans = plan_runs(load_sweep(sweep))
    assert [p.name for p in finished_runs(out)] == sorted(p.name for p in plans)
    assert not [p.name for p in out.iterdir() if p.name not in {MANIFEST, ".sweep.lock"}
                and p.name.startswith(".")]
    for plan in plans:
        run_dir = out / plan.name
        assert {p.name for p in run_dir.iterdir()} == RUN_FILES
        assert yaml.safe_load((run_dir / "config.yaml").read_text())["model"]["width"] == (
            plan.overrides["model.width"])
        assert len(pd.read_csv(run_dir / "metrics.csv")) == 16
        assert json.loads((run_dir / "summary.json").read_text())["status"] == "done"
        with np.load(run_dir / "params.npz") as params:
            assert params["B"].shape == (6, plan.overrides["model.width"])
    reference = tmp_path / "reference"
    run_directly(BASE, plans[-1].overrides, reference)
    assert (out / plans[-1].name / "metrics.csv").read_text() == (
        reference / "metrics.csv").read_text()


# ----------------------------------------------------------------------------- Ray


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


RAY_TOKEN = secrets.token_hex(32)  # one per test process: Ray caches the token it first reads


@pytest.fixture
def ray_env(monkeypatch):
    """Token authentication with a throw-away token (nothing written to ~/.ray), and a
    short Ray temp dir (Ray's socket paths are length-limited)."""
    monkeypatch.setenv("RAY_AUTH_MODE", "token")  # before Ray is imported: it caches its mode
    monkeypatch.setenv("RAY_AUTH_TOKEN", RAY_TOKEN)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    pytest.importorskip("ray")
    temp = tempfile.mkdtemp(prefix="ray", dir="/tmp")
    yield temp
    subprocess.run(["rm", "-rf", temp], check=False)


def test_token_authentication_is_used_only_for_a_cluster_on_this_machine(monkeypatch, tmp_path):
    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / ".ray").mkdir()
    (tmp_path / ".ray" / "auth_token").write_text(secrets.token_hex(32))
    for variable in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"):
        monkeypatch.delenv(variable, raising=False)
    assert is_this_machine("127.0.0.1") and is_this_machine("localhost")
    assert not is_this_machine("203.0.113.7") and not is_this_machine("no-such-host.invalid")
    use_local_token("203.0.113.7:6379")
    assert "RAY_AUTH_MODE" not in os.environ
    use_local_token("127.0.0.1:6379")
    assert os.environ["RAY_AUTH_MODE"] == "token"
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    use_local_token("localhost:6379")
    assert os.environ["RAY_AUTH_MODE"] == "disabled"


@pytest.mark.slow
def test_ray_executor_gives_the_local_executor_table(tmp_path, ray_env):
    import ray

    sweep = write_sweep(tmp_path, grid={"model.width": [2, 0]},
                        zip={"method.outer_lr": [0.2, 1000.0]}, seeds=[0, 1])
    local = run_sweep(sweep, tmp_path / "local", SweepOptions(workers=2, progress=False))
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False,
             _temp_dir=ray_env)
    try:
        remote = run_sweep(sweep, tmp_path / "ray", SweepOptions(executor="ray", progress=False))
        assert ray.is_initialized(), "a connection made by the caller is left open"
    finally:
        ray.shutdown()
    assert (remote.done, remote.failed) == (local.done, local.failed) == (2, 6)
    pd.testing.assert_frame_equal(collect_table(tmp_path / "ray"),
                                  collect_table(tmp_path / "local"), check_exact=True)
    for path in finished_runs(tmp_path / "local"):
        twin = tmp_path / "ray" / path.name
        assert sorted(p.name for p in twin.iterdir()) == sorted(p.name for p in path.iterdir())
        if (path / "metrics.csv").exists():
            assert (twin / "metrics.csv").read_bytes() == (path / "metrics.csv").read_bytes()


@pytest.mark.slow
def test_ray_executor_runs_a_batch_of_infinite_task_runs(tmp_path, ray_env, monkeypatch):
    import ray

    batches = spy_on(monkeypatch, driver, "batch_jobs")
    sweep = write_sweep(tmp_path, set=INFINITE, grid={"method.outer_lr": [0.1, 1e4, 0.2]})
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False,
             _temp_dir=ray_env)
    try:
        remote = run_sweep(sweep, tmp_path / "ray", SweepOptions(executor="ray", progress=False))
    finally:
        ray.shutdown()
    assert [[len(job) for job in jobs] for jobs in batches] == [[3]]  # >= 2 runs a batch
    skip_drawing(monkeypatch)
    single = run_sweep(sweep, tmp_path / "single",
                       SweepOptions(workers=1, progress=False, batch_infinite=False))
    assert len(batches) == 1, "batch_infinite=False batches nothing"
    assert (remote.done, remote.failed) == (single.done, single.failed) == (2, 1)
    pd.testing.assert_frame_equal(collect_table(tmp_path / "ray"),
                                  collect_table(tmp_path / "single"), check_exact=False,
                                  rtol=1e-10, atol=0)
    for path in finished_runs(tmp_path / "single"):
        assert_same_run(tmp_path / "ray" / path.name, path)
        if (path / ERROR_FILE).exists():
            records = [json.loads((run / ERROR_FILE).read_text())
                       for run in (path, tmp_path / "ray" / path.name)]
            assert records[0]["error"] == records[1]["error"]
            assert records[0]["error"].startswith("training diverged at step 1 ")


@pytest.mark.slow
def test_ray_cluster_at_an_address_runs_the_sweep_from_the_cli(tmp_path, ray_env):
    port = free_port()
    head = subprocess.Popen(
        [str(Path(sys.executable).with_name("ray")), "start", "--head", "--block",
         "--node-ip-address=127.0.0.1", f"--port={port}", "--num-cpus=2",
         "--include-dashboard=false", f"--temp-dir={ray_env}", "--disable-usage-stats"],
        start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        sweep = write_sweep(tmp_path, grid={"model.width": [2, 3]}, seeds=[0, 1])
        # no RAY_AUTH_MODE: metarep turns token authentication on for a cluster on this host
        env = {k: v for k, v in os.environ.items() if k != "RAY_AUTH_MODE"}
        result = cli("sweep", str(sweep), "--executor", "ray", "--address",
                     f"127.0.0.1:{port}", "--out", str(tmp_path / "ray"), env=env)
        assert result.returncode == 0, result.stderr
        assert "4 runs, 4 done, 0 failed (4 ran now)" in result.stdout
    finally:  # `ray start --block` stops the cluster it started on SIGTERM
        head.terminate()
        try:
            head.wait(timeout=60)
        finally:
            with contextlib.suppress(ProcessLookupError):  # any process left behind
                os.killpg(head.pid, signal.SIGKILL)
    run_sweep(sweep, tmp_path / "local", SweepOptions(workers=1, progress=False))
    pd.testing.assert_frame_equal(collect_table(tmp_path / "ray"),
                                  collect_table(tmp_path / "local"), check_exact=True)


def test_readme_example_is_the_example_sweep_file():
    root = Path(__file__).resolve().parents[1]
    example = root / "configs" / "sweep_example.yaml"
    readme = (root / "README.md").read_text().split("## Sweeps")[1]
    block = readme.split("```yaml\n")[1].split("```")[0]
    assert block == example.read_text()
    plans = plan_runs(load_sweep(example))
    assert len(plans) == 36 and plans[0].name == "width=2,outer_lr=0.2,d=20,k=3,seed=0"


@pytest.mark.slow
def test_a_sweep_logged_to_a_file_reports_each_run_and_names_the_failed_ones(tmp_path):
    """Without a terminal (stderr captured, as in a log file) the sweep prints one line per
    finished run; the summary names the failed runs."""
    sweep = write_sweep(tmp_path, grid={"model.width": [2, 0]})
    result = cli("sweep", str(sweep), "--out", str(tmp_path / "out"), "--workers", "1")
    assert result.returncode == 0, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.startswith("[")]
    assert len(lines) == 2 and {line.split()[0] for line in lines} == {"[1/2]", "[2/2]"}
    failed = next(p.name for p in plan_runs(load_sweep(sweep))
                  if p.overrides["model.width"] == 0)
    assert any(line.startswith("[") and f"{failed}: failed" in line for line in lines)
    assert f"failed: {failed} (" in result.stdout


# ----------------------------------------------------------------------------- hostile input
# (the tests taking the ``cli`` fixture call the command in this process, not ``cli`` above)


@pytest.mark.parametrize("fields, key", [
    ({"grid": {"model.width": [2, 2.0]}}, "grid.model.width"),
    ({"grid": {"model.width": [3, 3]}}, "grid.model.width"),
    ({"grid": {"method.outer_lr": [0.1, 0.2], "model.width": [3, 3.0]}, "seeds": [0, 1]},
     "grid.model.width"),
    ({"zip": {"problem.d": [6, 8, 6], "model.width": [2, 3, 2]}}, "zip"),
    ({"zip": {"problem.d": [6, 8, 6.0], "model.width": [2, 3, 2]}}, "zip.problem.d"),
])
def test_the_same_run_twice_is_refused_before_anything_is_written(tmp_path, cli, error_line,
                                                                  fields, key):
    out = tmp_path / "out"
    result = cli("sweep", write_sweep(tmp_path, **fields), "--out", out, "--workers", "1",
                 "--no-progress")
    assert result.exit_code == 2
    line = error_line(result)
    assert line.startswith(f"error: {key}: ") and ("twice" in line or "same run" in line)
    assert not out.exists()


def test_distinct_values_and_bad_cells_still_plan(tmp_path):
    """Values that resolve apart are distinct runs; cells that do not resolve (width 0 and
    0.0) are not compared: each fails as a run of its own."""
    sweep = write_sweep(tmp_path, grid={"model.width": [2, 3, 0, 0.0],
                                        "method.outer_lr": [0.1, 0.10000001]},
                        zip={"problem.d": [6, 8], "tasks.m_in": [5, 5.5]}, seeds=[0, 1])
    plans = plan_runs(load_sweep(sweep))
    assert len(plans) == 4 * 2 * 2 * 2 == len({plan.name for plan in plans})


def corrupt_sweep_dir(out: Path, text: bytes) -> Path:
    out.mkdir(parents=True)
    (out / MANIFEST).write_bytes(text)
    return out


@pytest.mark.parametrize("text", [b'{"spec": {"grid": {"model.wid', b"", b"[]", b"{}",
                                  b'{"spec": 3}', b"\xff\xfe\x00garbage", b"[" * 100_000])
def test_a_corrupt_sweep_json_is_refused_in_one_line(tmp_path, cli, error_line, text):
    sweep = write_sweep(tmp_path, grid={"model.width": [2, 3]})
    out = corrupt_sweep_dir(tmp_path / "out", text)
    result = cli("sweep", sweep, "--out", out, "--workers", "1", "--no-progress")
    assert result.exit_code == 2
    assert error_line(result).startswith(f"error: --out: {out / MANIFEST} is corrupt (")
    assert [p.name for p in out.iterdir()] == [MANIFEST]
    assert (out / MANIFEST).read_bytes() == text
    result = cli("collect", out)
    assert result.exit_code == 2
    assert error_line(result).startswith(f"error: DIR: {out / MANIFEST} is corrupt (")
    assert [p.name for p in out.iterdir()] == [MANIFEST]


@pytest.mark.parametrize("runs", [[{"name": "../elsewhere", "overrides": {}, "seed": None}],
                                  [{"overrides": {}, "seed": None}], ["run"]])
def test_collect_refuses_a_manifest_with_corrupt_runs(tmp_path, cli, error_line, runs):
    manifest = {"spec": {}, "axes": [], "zip_keys": [], "base_config": {}, "runs": runs}
    out = corrupt_sweep_dir(tmp_path / "out", json.dumps(manifest).encode())
    result = cli("collect", out)
    assert result.exit_code == 2
    assert error_line(result).startswith(f"error: DIR: {out / MANIFEST} is corrupt (runs[0] ")


@pytest.mark.parametrize("file, text", [
    ("summary.json", b'{"status": "do'), ("summary.json", b"[1, 2]"),
    ("summary.json", b'{"status": "done", "final": [1]}'), ("summary.json", b"\xff"),
    (ERROR_FILE, b""), (ERROR_FILE, b"null"), (ERROR_FILE, b'{"status": "failed"}'),
])
def test_collect_refuses_a_corrupt_run_file_in_one_line(tmp_path, cli, error_line, file, text):
    spec = load_sweep(write_sweep(tmp_path, grid={"model.width": [2, 3]}))
    plans = plan_runs(spec)
    out = tmp_path / "out"
    write_manifest(out, build_manifest(spec, plans))
    (out / plans[1].name).mkdir()
    (out / plans[1].name / file).write_bytes(text)
    result = cli("collect", out)
    assert result.exit_code == 2
    line = error_line(result)
    assert line.startswith(f"error: DIR: {out / plans[1].name / file} is corrupt (")
    assert sorted(p.name for p in out.iterdir()) == sorted([MANIFEST, plans[1].name])


@pytest.mark.slow
def test_two_sweeps_racing_into_one_directory_leave_only_the_winner(tmp_path):
    """Two different sweeps started at once into one --out, as two processes: one runs, the
    other is refused in one line naming --out (the lock is held, or the winner's manifest is
    there already), and the directory holds the winner's sweep and runs only."""
    quick = {"train.steps": 5, "train.record_every": 5}
    sweeps = {widths[0]: write_sweep(tmp_path, f"w{widths[0]}.yaml", set=quick,
                                     grid={"model.width": widths})
              for widths in ([2, 3], [4, 5])}
    for attempt in range(3):
        out = tmp_path / f"out{attempt}"
        order = list(sweeps.values())[::1 if attempt % 2 == 0 else -1]
        processes = [subprocess.Popen(
            [sys.executable, "-m", "metarep", "sweep", str(sweep), "--out", str(out),
             "--workers", "1", "--no-progress"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for sweep in order]
        results = [(sweep, process.returncode, *outputs) for sweep, process in
                   zip(order, processes, strict=True)
                   if (outputs := process.communicate(timeout=300))]
        assert sorted(code for _, code, _, _ in results) == [0, 2], results
        winner = next(sweep for sweep, code, _, _ in results if code == 0)
        loser_stderr = next(stderr for _, code, _, stderr in results if code == 2)
        assert loser_stderr.count("\n") == 1 and loser_stderr.startswith("error: --out: ")
        assert "in use by another sweep" in loser_stderr or "holds a different sweep" in (
            loser_stderr)
        manifest = json.loads((out / MANIFEST).read_text())
        spec = load_sweep(winner)
        assert manifest["spec"]["grid"] == spec.grid
        names = {plan.name for plan in plan_runs(spec)}
        assert {run["name"] for run in manifest["runs"]} == names
        assert {p.name for p in out.iterdir()} == names | {MANIFEST, ".sweep.lock"}
        assert all((out / name / "summary.json").is_file() for name in names)


def test_a_run_packed_on_a_ray_node_keeps_its_folders(tmp_path):
    """A run that executed away from the sweep directory comes back with every file, the
    logging sinks' folders included (symbolic links, such as W&B's latest-run, left out), and
    lands in place with the same tree."""
    run = tmp_path / "node" / "0"
    (run / "tb").mkdir(parents=True)
    (run / "metrics.csv").write_text("step,perp_norm\n0,1.0\n")
    (run / "tb" / "events.out").write_bytes(b"\x00\x01")
    (run / "wandb" / "offline-run-1").mkdir(parents=True)
    (run / "wandb" / "offline-run-1" / "run-1.wandb").write_bytes(b"W&B")
    (run / "wandb" / "latest-run").symlink_to(run / "wandb" / "offline-run-1")
    files = packed_files(run)
    assert files == {"metrics.csv": b"step,perp_norm\n0,1.0\n", "tb/events.out": b"\x00\x01",
                     "wandb/offline-run-1/run-1.wandb": b"W&B"}
    out = tmp_path / "sweep"
    task = RunTask("r", {}, {}, "quick", str(out / ".r.tmp"), str(tmp_path))
    _finalize(out, task, Outcome("r", "done", None, files))
    assert packed_files(out / "r") == files and not (out / ".r.tmp").exists()
