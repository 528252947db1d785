"""Figures of a run: training curves and test risk against the number of test samples.

Drawn on :class:`matplotlib.figure.Figure` objects (no pyplot, no global backend): the user's
matplotlib settings are left alone, and the figures are saved where they belong
(:meth:`metarep.run.rundir.RunDirectory.write_figure`). A run's own two figures
(``training.png``, ``eval.png``) are drawn by :func:`write_run_figures`: from the run's
records as it finishes (``metarep run``), or afterwards from the files it wrote
(:func:`draw_run_figures`, ``metarep figures``), which is how a sweep's runs get theirs.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol, TypeVar

import numpy as np
import pandas as pd
from matplotlib.axes import Axes
from matplotlib.figure import Figure

from metarep.core.evaluation import BAYES_ORACLE, ORACLE_LSQ, REGRESSION_LSQ, RIDGE
from metarep.errors import ConfigError
from metarep.run.rundir import EVAL_FIGURE, TRAINING_FIGURE, RunDirectory

CURVES = (
    ("train_loss", "meta-training loss"),
    ("perp_norm", r"$\|B_\perp^\top B_t\|_2$"),
    ("subspace_dist", "span($B_t$) vs span($B_*$): sin of largest angle"),
    ("lambda_err", r"$\|B_*^\top B_t B_t^\top B_* - \Lambda_*\|_2$"),
    ("head_norm", r"$\|w_t\|$"),
)
W1_CURVE = ("w1_perp_share", r"$\|B_\perp^\top W_1\|_F / \|W_1\|_F$")  # ReLU runs
PANEL_LINES: dict[str, tuple[tuple[str, str, dict[str, Any]], ...]] = {
    "subspace_dist": (
        ("subspace_dist", "subspace_dist = max of the two",
         {"linewidth": 5, "alpha": 0.3, "color": "C0"}),
        ("span_outside", "span_outside: of span($B_t$), outside span($B_*$)",
         {"marker": ".", "markersize": 3, "linewidth": 1.2, "color": "C1"}),
        ("span_missed", "span_missed: of span($B_*$), not covered",
         {"linestyle": "--", "linewidth": 1.2, "color": "C2"}),
    ),
}
"""Panels that draw several columns: ``(column, legend label, line style)`` each (the other
panels draw their own column alone)."""


def training_figure(metrics: pd.DataFrame, title: str,
                    limits: Mapping[str, float] | None = None) -> Figure:
    """Six panels against the outer step (log-log where positive): the measures (the subspace
    panel with ``span_outside`` and ``span_missed`` next to ``subspace_dist``,
    :data:`PANEL_LINES`) and the singular values of ``B_t``; ``limits`` (measure -> the limit
    the theory predicts for this run, given only where it applies) are drawn as dashed
    horizontal lines where positive."""
    figure = Figure(figsize=(14, 7.5), layout="constrained")
    axes = figure.subplots(2, 3)
    steps = metrics["step"].to_numpy() + 1 if len(metrics) else np.array([])
    curves = (CURVES[0], W1_CURVE, *CURVES[2:]) if W1_CURVE[0] in metrics else CURVES
    for axis, (column, label) in zip(axes.flat, curves, strict=False):
        if column in metrics and metrics[column].notna().any():
            lines = [line for line in PANEL_LINES.get(
                         column, ((column, "simulation", {"marker": ".", "markersize": 3}),))
                     if line[0] in metrics and metrics[line[0]].notna().any()]
            for name, line_label, style in lines:
                axis.plot(steps, metrics[name], label=line_label, **style)
            limit = (limits or {}).get(column)
            if limit is not None and limit > 0:
                axis.axhline(limit, linestyle="--", color="k", linewidth=0.8,
                             label="predicted limit (infinite tasks)")
            if len(lines) > 1 or (limit is not None and limit > 0):
                axis.legend(fontsize="small")
            axis.set_xscale("log")
            if all((metrics[name].dropna() > 0).all() for name, _, _ in lines):
                axis.set_yscale("log")
        else:
            axis.text(0.5, 0.5, "not available", ha="center", transform=axis.transAxes)
        axis.set(title=label, xlabel="outer step t + 1")
        axis.grid(alpha=0.3, which="both")
    sv_axis = axes.flat[-1]
    sv_columns = [c for c in metrics.columns if c.startswith("sv_")]
    for column in sv_columns:
        sv_axis.plot(steps, metrics[column], linewidth=0.8)
    sv_axis.set(title=f"singular values of $B_t$ ({len(sv_columns)})", xlabel="outer step t + 1",
                xscale="log", yscale="log")
    sv_axis.grid(alpha=0.3, which="both")
    figure.suptitle(f"{title}: training")
    return figure


def stated_limits(theory: Mapping[str, Any] | None) -> dict[str, float] | None:
    """The limits a run's theory block (``summary.json``'s ``theory``) states, measure ->
    value, leaving out those it gives no value for; ``None`` when the run has no theory or
    no limits apply to it."""
    if theory is None or theory.get("limits") is None:
        return None
    return {name: value["theory"] for name, value in theory["limits"].items()
            if value["theory"] is not None}


class Curves(Protocol):
    """A run as :func:`comparison_figure` draws it."""

    label: str
    metrics: pd.DataFrame
    limits: Mapping[str, float] | None


PANEL_TITLES = dict((*CURVES, W1_CURVE))
"""The title of a measure's panel (a measure not listed is titled by its name)."""


def comparison_figure(runs: Sequence[Curves], measures: Sequence[str], title: str) -> Figure:
    """One panel per measure against the outer step ``t + 1`` (log x; log y where every
    value drawn is positive), one line per run in its own colour, and each run's predicted
    limit, where it states one for the measure, dashed in that colour; one legend below the
    panels."""
    columns = min(3, len(measures))
    rows = math.ceil(len(measures) / columns)
    figure = Figure(figsize=(4.8 * columns, 3.6 * rows + 0.35 * len(runs) + 0.6),
                    layout="constrained")
    axes = figure.subplots(rows, columns, squeeze=False)
    limits_drawn = False
    for axis, measure in zip(axes.flat, measures, strict=False):
        positive = True
        for index, run in enumerate(runs):
            color = f"C{index % 10}"
            if measure not in run.metrics or run.metrics[measure].isna().all():
                continue
            values = run.metrics[measure]
            positive &= bool((values.dropna() > 0).all())
            axis.plot(run.metrics["step"] + 1, values, color=color, linewidth=1.2,
                      label=run.label if axis is axes.flat[0] else None)
            limit = (run.limits or {}).get(measure)
            if limit is not None and limit > 0:
                axis.axhline(limit, color=color, linestyle="--", linewidth=0.8)
                limits_drawn = True
        axis.set_xscale("log")
        if positive:
            axis.set_yscale("log")
        axis.set(title=PANEL_TITLES.get(measure, measure), xlabel="outer step t + 1")
        axis.grid(alpha=0.3, which="both")
    for axis in list(axes.flat)[len(measures):]:
        axis.set_visible(False)
    handles = [line for line in axes.flat[0].get_lines() if not line.get_label().startswith("_")]
    if limits_drawn:
        handles.append(axes.flat[0].plot([], [], color="0.3", linestyle="--", linewidth=0.8,
                                         label="predicted limit (infinite tasks), "
                                               "in the run's colour")[0])
    figure.legend(handles=handles, loc="outside lower center", fontsize="small",
                  ncols=1 if len(runs) > 4 else 2)
    figure.suptitle(title)
    return figure


REFERENCE_STYLES: dict[str, dict[str, Any]] = {
    BAYES_ORACLE: {"color": "k", "linestyle": "--", "marker": "s",
                   "label": r"Bayes oracle (knows $B_*, \Sigma_*, \sigma^2$)"},
    RIDGE: {"color": "0.5", "linestyle": "--", "marker": "D", "label": "ridge in d dims"},
    ORACLE_LSQ: {"color": "k", "linestyle": ":", "marker": "x", "alpha": 0.45,
                 "label": "least squares on $XB_*$ (k dims)"},
    REGRESSION_LSQ: {"color": "0.5", "linestyle": ":", "marker": "+", "alpha": 0.45,
                     "label": "least squares in d dims"},
}
"""How the reference rows are drawn: the lower references ``bayes-oracle`` and ``ridge``
dashed, black and grey; the least-squares rows dotted and light."""

CLOSED_FORM_STYLE = {"linewidth": 5, "alpha": 0.22, "solid_capstyle": "round"}
"""Closed forms: a wide pale line in the row's colour (paler still for a light row)."""


def draw_risk(axis: Axes, rows: pd.DataFrame, label: str, color: str | None = None,
              linestyle: str = "-", marker: str = "o", alpha: float = 1.0) -> None:
    """One row of ``eval.csv`` against m_test: the mean risk joined by a line, 1.96 standard
    errors as error bars where the standard error is finite (none where it is ``nan``: infinite
    variance), and the closed form, where known and positive, as a wide pale line."""
    rows = rows.sort_values("shots")
    shots, risk = rows["shots"].to_numpy(), rows["excess_risk"].to_numpy(dtype=float)
    stderr = rows["stderr"].to_numpy(dtype=float)
    (line,) = axis.plot(shots, risk, color=color, linestyle=linestyle, marker=marker,
                        markersize=4, alpha=alpha, label=label)
    color = line.get_color()
    bars = np.isfinite(stderr)
    if bars.any():
        axis.errorbar(shots[bars], risk[bars], yerr=1.96 * stderr[bars], fmt="none",
                      ecolor=color, capsize=3, alpha=alpha)
    theory = rows["theory"].to_numpy(dtype=float)
    shown = np.isfinite(theory) & (theory > 0)
    if shown.any():
        axis.plot(shots[shown], theory[shown], color=color,
                  **{**CLOSED_FORM_STYLE, "alpha": CLOSED_FORM_STYLE["alpha"] * alpha})


def shots_axis(axis: Axes, shots: np.ndarray) -> None:
    """A log m_test axis ticked at the evaluated ``shots``, labelled as plain integers."""
    ticks = np.unique(np.asarray(shots, dtype=int))
    if ticks.size:
        axis.set_xticks(ticks, [str(t) for t in ticks])
        axis.set_xticks([], minor=True)


def closed_form_legend_entry(axis: Axes) -> None:
    """A legend entry explaining the closed-form style."""
    axis.plot([], [], color="0.3", label="closed form (wide pale line)", **CLOSED_FORM_STYLE)


def eval_figure(frame: pd.DataFrame, title: str) -> Figure:
    """Mean test excess risk against m_test, log-log: the methods in colour (solid), the lower
    references ``bayes-oracle`` and ``ridge`` dashed in black and grey, the least-squares rows
    dotted and light (:data:`REFERENCE_STYLES`); 1.96 standard errors where the variance is
    finite, closed forms where known (:func:`draw_risk`)."""
    figure = Figure(figsize=(7.5, 5.2), layout="constrained")
    axis = figure.subplots()
    for method, rows in frame.groupby("method", sort=False):
        style = REFERENCE_STYLES.get(str(method))
        if style is None:
            draw_risk(axis, rows, str(method))
        else:
            draw_risk(axis, rows, **style)
    if np.isfinite(frame["theory"].to_numpy(dtype=float)).any():
        closed_form_legend_entry(axis)
    axis.set(xscale="log", yscale="log", xlabel="test samples $m_{test}$",
             ylabel=r"excess risk $\|Bw' - B_* w_*\|^2$", title=f"{title}: test-time adaptation")
    shots_axis(axis, frame["shots"].to_numpy())
    axis.grid(alpha=0.3, which="both")
    axis.legend(fontsize="small")
    return figure


def write_run_figures(directory: RunDirectory, metrics: pd.DataFrame,
                      eval_frame: pd.DataFrame | None, title: str,
                      theory: Mapping[str, Any] | None) -> list[Path]:
    """Draw a run's figures into its ``directory``: ``training.png``
    (:func:`training_figure`, with the limits its ``theory`` states) and, where it has an
    evaluation (``eval_frame`` with rows), ``eval.png`` (:func:`eval_figure`). Returns the
    files written."""
    written = [directory.file(TRAINING_FIGURE)]
    directory.write_figure(TRAINING_FIGURE,
                           training_figure(metrics, title, stated_limits(theory)))
    if eval_frame is not None and len(eval_frame):
        directory.write_figure(EVAL_FIGURE, eval_figure(eval_frame, title))
        written.append(directory.file(EVAL_FIGURE))
    return written


RUN_ARGUMENT = "RUN_DIR"
"""How :func:`draw_run_figures` names a run directory in its errors."""


def draw_run_figures(path: str | Path) -> list[Path]:
    """Draw the figures of the finished run in ``path`` (one with ``summary.json``: done or
    diverged) from the files it wrote, ``metrics.csv``, ``eval.csv`` and ``summary.json``
    (title and stated limits), read through :class:`~metarep.run.rundir.RunDirectory`: the
    same figures as the run draws itself (:func:`write_run_figures`). Returns the files
    written; :class:`ConfigError` naming ``RUN_DIR`` for a directory that is not a finished
    run or whose files are corrupt."""
    directory = RunDirectory(path)
    try:
        summary = directory.summary() if directory.path.is_dir() else None
        metrics = directory.metrics() if summary is not None else None
        eval_frame = directory.eval_table()
    except ConfigError as error:
        raise ConfigError(RUN_ARGUMENT, error.message) from None
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as error:
        raise ConfigError(RUN_ARGUMENT, f"{directory.file('eval.csv')} is corrupt (not a "
                          f"table: {type(error).__name__})") from None
    if summary is None or metrics is None:
        raise ConfigError(RUN_ARGUMENT, f"{path} is not a finished run directory (no "
                          "summary.json and metrics.csv in it)")
    theory = summary.get("theory")
    return write_run_figures(directory, metrics, eval_frame, str(summary.get("config", "run")),
                             theory if isinstance(theory, dict) else None)


def draw_figures(paths: Sequence[str | Path], workers: int = 1) -> list[Path]:
    """:func:`draw_run_figures` of each finished run in ``paths``, on ``workers`` processes
    (:func:`map_drawing`; 1: in this process). Returns the files written, run by run in the
    order of ``paths``; the first :class:`ConfigError` of a run stops the drawing."""
    if workers < 1:
        raise ConfigError("--workers", f"must be an integer >= 1; got {workers}")
    return [file for files in map_drawing(draw_run_figures, paths, workers) for file in files]


Item = TypeVar("Item")
Result = TypeVar("Result")


def map_drawing(draw: Callable[[Item], Result], items: Sequence[Item], workers: int
                ) -> list[Result]:
    """``[draw(item) for item in items]`` on up to ``workers`` processes, this one included,
    in the order of ``items``; all in this process when ``workers`` or the number of items is
    1. The other processes are spawned, not forked (a fork copies a process whose threads,
    BLAS's, torch's and the kernels' pool, may hold locks), so each first imports matplotlib
    and the package (about 1-2 s): worth it from a few seconds of drawing on. Meanwhile this
    process draws the first item, and then, whenever it is free, the next one that no other
    process has been handed (each holds at most one waiting item), so that the drawing ends
    together. ``draw`` and the items must pickle; an exception of an item is raised here."""
    if workers <= 1 or len(items) <= 1:
        return [draw(item) for item in items]
    import multiprocessing
    from concurrent.futures import Future, ProcessPoolExecutor
    from concurrent.futures import wait as wait_for

    helpers = min(workers, len(items)) - 1
    results: dict[int, Result] = {}
    waiting = list(range(len(items)))
    handed: dict[Future[Result], int] = {}
    with ProcessPoolExecutor(helpers, mp_context=multiprocessing.get_context("spawn")) as pool:
        try:
            mine: int | None = waiting.pop(0)
            while mine is not None:
                while waiting and sum(not future.done() for future in handed) < 2 * helpers:
                    index = waiting.pop(0)
                    handed[pool.submit(draw, items[index])] = index
                results[mine] = draw(items[mine])
                mine = waiting.pop(0) if waiting else None
            for future in wait_for(handed).done:
                results[handed[future]] = future.result()
        except BaseException:
            pool.shutdown(cancel_futures=True)
            raise
    return [results[index] for index in range(len(items))]
