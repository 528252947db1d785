"""The sweep figure's rules (log axes where the values span decades, categorical axes as
categories, intervals that respect a positive measure's range) and ``metarep compare`` (the
training curves of several runs, labelled by the config keys that differ)."""

from __future__ import annotations

import json
import os
import shutil
import time

import numpy as np
import pandas as pd
import pytest
from matplotlib.collections import PolyCollection
from scipy import stats

from metarep.errors import ConfigError
from metarep.run.compare import differing_keys, figure_paths, run_labels
from metarep.run.figures import map_drawing
from metarep.sweeps.collect import axis_scale, is_categorical, seed_intervals, sweep_figure

TINY = {"train.steps": 6, "train.record_every": 2, "eval.n_tasks": 20, "eval.shots": [5, 10],
        "problem.d": 8, "tasks.n": 40}
TINY_SET = [arg for key, value in TINY.items() for arg in ("--set", f"{key}={json.dumps(value)}")]


# ----------------------------------------------------------------------------- intervals


def test_positive_measures_get_intervals_over_log_values_that_cover_the_median():
    """Log-normal values: the geometric mean is exp(mean log y), the interval is the t-interval
    of log y mapped back, stays positive, and covers the median exp(mu) 95% of the time."""
    rng = np.random.default_rng(np.random.SeedSequence(5))
    n_groups, n, mu = 4000, 3, np.log(0.02)
    values = np.exp(rng.normal(mu, 1.5, size=(n_groups, n)))
    frame = pd.DataFrame({"status": "done", "g": np.repeat(np.arange(n_groups), n), "x": 1.0,
                          "y": values.ravel()})
    out = seed_intervals(frame, "x", "y", ["g"], log=True)
    covered = ((out["low"] <= np.exp(mu)) & (np.exp(mu) <= out["high"])).mean()
    assert abs((covered - 0.95) / np.sqrt(0.95 * 0.05 / n_groups)) < 4, covered
    assert (out["low"] > 0).all()
    logs = np.log(values[0])
    low, high = stats.t.interval(0.95, n - 1, loc=logs.mean(), scale=stats.sem(logs))
    np.testing.assert_allclose(out.loc[0, ["mean", "low", "high"]].to_numpy(float),
                               np.exp([logs.mean(), low, high]), rtol=1e-12)
    linear = seed_intervals(frame, "x", "y", ["g"])  # control: the plain band crosses zero
    assert (linear["low"] < 0).mean() > 0.3


# ----------------------------------------------------------------------------- axes


@pytest.mark.parametrize(("values", "asked", "scale"), [
    ([1.0, 10.0, 100.0], "auto", "log"),
    ([1.0, 2.0, 5.0], "auto", "linear"),
    ([0.0, 10.0, 1000.0], "auto", "linear"),
    ([1.0, np.nan, 50.0], "auto", "log"),
    ([1.0, 2.0, 5.0], "log", "log"),
    ([1.0, 10.0, 100.0], "linear", "linear"),
])
def test_axis_scale_is_log_where_positive_values_span_a_factor_20(values, asked, scale):
    assert axis_scale(np.array(values), asked, "--yscale") == scale


@pytest.mark.parametrize(("values", "asked"), [([0.0, 1.0], "log"), ([-1.0, 2.0], "log"),
                                               ([1.0, 2.0], "loglog")])
def test_axis_scale_refuses_what_the_axis_cannot_hold(values, asked):
    with pytest.raises(ConfigError) as error:
        axis_scale(np.array(values), asked, "--yscale")
    assert error.value.key == "--yscale"


@pytest.mark.parametrize(("values", "categorical"), [
    (["fo-anil", "anil"], True), ([10, 20, 40], False), ([0.5, 1.0], False),
    ([10.0, np.inf], True), ([True, False], True), (["500", "online"], True)])
def test_text_and_non_finite_axes_are_categorical(values, categorical):
    assert is_categorical(pd.Series(values)) is categorical


def test_a_categorical_axis_is_drawn_as_points_with_error_bars_side_by_side():
    intervals = pd.DataFrame({"g": [1, 1, 1, 2, 2, 2], "x": ["maml", "anil", "mtl"] * 2,
                              "mean": [1.0, 2.0, 3.0, 1.5, 2.5, 3.5],
                              "low": [0.5, 1.5, 2.5, 1.0, 2.0, 3.0],
                              "high": [1.5, 2.5, 3.5, 2.0, 3.0, 4.0], "n": 3})
    axis = sweep_figure(intervals, "x", "y", ["g"], "t", categorical=True).axes[0]
    assert [t.get_text() for t in axis.get_xticklabels()] == ["maml", "anil", "mtl"]
    markers = [line for line in axis.get_lines() if line.get_marker() == "o"]
    assert len(markers) == 2 and all(line.get_linestyle() == "None" for line in markers)
    first, second = (np.asarray(line.get_xdata(), float) for line in markers)
    assert (second - first > 0).all() and (np.abs(first - [0, 1, 2]) < 0.5).all()
    assert not [c for c in axis.collections if isinstance(c, PolyCollection)]  # no bands
    numeric = sweep_figure(intervals.assign(x=[1, 2, 3] * 2), "x", "y", ["g"], "t").axes[0]
    assert [line.get_linestyle() for line in numeric.get_lines()] == ["-", "-"]  # control


# ----------------------------------------------------------------------------- collect


@pytest.fixture(scope="module")
def method_sweep(tmp_path_factory, cli):
    """A finished sweep over method.name (a categorical axis) x model.width x 2 seeds."""
    out = tmp_path_factory.mktemp("collect") / "methods"
    result = cli("sweep", "quick", *TINY_SET, "--grid", "method.name=fo-anil,anil,mtl",
                 "--grid", "model.width=2,4", "--seeds", "0,1", "--out", out, "--no-progress")
    assert result.exit_code == 0, result.output
    return out


def test_collect_draws_a_categorical_axis_and_positive_measures_on_log_bands(method_sweep, cli):
    result = cli("collect", method_sweep, "--x", "method.name", "--y", "train_loss",
                 "--yscale", "log")
    assert result.exit_code == 0, result.output
    figure = method_sweep / "train_loss_vs_method.name.png"
    assert figure.stat().st_size > 1000 and str(figure) in result.stdout
    table = pd.read_parquet(method_sweep / "collected.parquet")
    assert sorted(table["method.name"].unique()) == ["anil", "fo-anil", "mtl"]
    widths = cli("collect", method_sweep, "--x", "model.width", "--xscale", "linear")
    assert widths.exit_code == 0, widths.output


@pytest.mark.parametrize(("args", "key"), [
    (["--x", "method.name", "--xscale", "log"], "--xscale"),
    (["--x", "model.width", "--yscale", "exp"], "--yscale"),
    (["--x", "model.width", "--xscale", "sideways"], "--xscale"),
    (["--x", "method.name", "--xscale", "sideways"], "--xscale")])
def test_collect_refuses_a_scale_the_values_cannot_take_and_writes_nothing(
        method_sweep, cli, error_line, args, key):
    for name in ("collected.parquet", "collected.csv"):
        (method_sweep / name).unlink(missing_ok=True)
    result = cli("collect", method_sweep, *args)
    assert result.exit_code == 2
    assert error_line(result).startswith(f"error: {key}: ")
    assert not (method_sweep / "collected.parquet").exists()


# ----------------------------------------------------------------------------- compare


def test_differing_keys_and_labels_name_what_tells_runs_apart():
    a = {"problem.d": 8, "model.width": 2, "method.name": "anil"}
    b = {"problem.d": 8, "model.width": 4, "method.name": "anil"}
    c = {"problem.d": 8, "model.width": 4, "method.name": "anil", "tasks.from": "x.npz"}
    assert differing_keys([a, b, c]) == ["model.width", "tasks.from"]
    assert differing_keys([a, dict(a)]) == []
    assert run_labels(["r1", "r2"], [a, b]) == ["model.width=2", "model.width=4"]
    assert run_labels(["r1", "r2"], [a, dict(a)]) == ["r1", "r2"]
    assert run_labels(["r1", "r2", "r3"], [a, b, dict(b)]) == [
        "model.width=2", "model.width=4 (r2)", "model.width=4 (r3)"]


@pytest.mark.parametrize(("out", "paths"), [("cmp", ("cmp.png", "cmp.pdf")),
                                            ("fig/cmp.pdf", ("fig/cmp.png", "fig/cmp.pdf"))])
def test_figure_paths_are_a_png_and_a_pdf(tmp_path, out, paths):
    assert figure_paths(tmp_path / out) == tuple(tmp_path / p for p in paths)


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory, cli):
    """Two finished tiny runs that differ in model.width."""
    root = tmp_path_factory.mktemp("compare")
    for width in (2, 4):
        result = cli("run", "quick", *TINY_SET, "--set", f"model.width={width}", "--out",
                     root / f"w{width}", "--no-progress")
        assert result.exit_code == 0, result.output
    return root


def test_compare_writes_one_png_and_one_pdf(two_runs, cli, tmp_path):
    out = tmp_path / "figs" / "widths"
    result = cli("compare", two_runs / "w2", two_runs / "w4", "--out", out)
    assert result.exit_code == 0, result.output
    png, pdf = out.with_suffix(".png"), out.with_suffix(".pdf")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    assert pdf.read_bytes()[:5] == b"%PDF-"
    assert f"compared 2 runs: {png}, {pdf}" in result.stdout
    training = tmp_path / "training"  # a run still training: no summary, fewer records
    shutil.copytree(two_runs / "w4", training)
    (training / "summary.json").unlink()
    lines = (training / "metrics.csv").read_text().splitlines()
    (training / "metrics.csv").write_text("\n".join(lines[:3]) + "\n")
    only = cli("compare", two_runs / "w2", training, "--measures", "perp_norm,sv_1",
               "--out", tmp_path / "two")
    assert only.exit_code == 0, only.output
    assert (tmp_path / "two.png").is_file() and (tmp_path / "two.pdf").is_file()


@pytest.mark.parametrize(("case", "key"), [
    ("missing", "RUN_DIR"), ("twice", "RUN_DIR"), ("measure", "--measures"),
    ("suffix", "--out"), ("corrupt", "RUN_DIR")])
def test_compare_refuses_bad_input_in_one_line_and_writes_nothing(
        two_runs, cli, error_line, tmp_path, case, key):
    runs = [two_runs / "w2", two_runs / "w4"]
    extra: list[object] = []
    if case == "missing":
        runs.append(tmp_path / "nope")
    elif case == "twice":
        runs.append(two_runs / "w2" / ".." / "w2")
    elif case == "measure":
        extra = ["--measures", "perp_norm,bogus"]
    elif case == "corrupt":
        broken = tmp_path / "broken"
        broken.mkdir()
        (broken / "config.yaml").write_text((two_runs / "w2" / "config.yaml").read_text())
        (broken / "metrics.csv").write_text("step,perp_norm\n0,abc\n")
        runs.append(broken)
    out = tmp_path / ("cmp.svg" if case == "suffix" else "cmp")
    result = cli("compare", *runs, *extra, "--out", out)
    assert result.exit_code == 2
    assert error_line(result).startswith(f"error: {key}: ")
    assert not list(tmp_path.glob("cmp*"))


# ----------------------------------------------------------------------------- drawing processes


def _drawn_by(item: int) -> tuple[int, int]:
    """A stand-in for drawing one figure: the item, and the process that drew it."""
    time.sleep(0.05)
    if item < 0:
        raise ValueError(f"cannot draw {item}")
    return item, os.getpid()


@pytest.mark.parametrize("workers", [2, 3])
def test_map_drawing_draws_here_and_in_other_processes_in_order(workers):
    """Every item once, in the order given; this process draws the first item and the spawned
    ones draw some of the others (``workers - 1`` of them at most)."""
    items = list(range(12))
    drawn = map_drawing(_drawn_by, items, workers)
    assert [item for item, _ in drawn] == items
    processes = {pid for _, pid in drawn}
    assert drawn[0][1] == os.getpid()
    assert 2 <= len(processes) <= workers


def test_map_drawing_on_one_worker_or_one_item_stays_in_this_process():
    for items, workers in (([0, 1, 2], 1), ([7], 4)):
        drawn = map_drawing(_drawn_by, items, workers)
        assert drawn == [(item, os.getpid()) for item in items]


@pytest.mark.parametrize("failing", [0, 1])
def test_map_drawing_raises_an_items_exception(failing):
    """A failing item, drawn here (the first) or in another process (the second, always
    handed out first), raises its own error."""
    items = list(range(8))
    items[failing] = -1
    with pytest.raises(ValueError, match="cannot draw -1"):
        map_drawing(_drawn_by, items, 2)
