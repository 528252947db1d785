"""Figures of a run: training curves and test risk against the number of test samples."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from metarep import storage

CURVES = (
    ("train_loss", "meta-training loss"),
    ("perp_norm", r"$\|B_\perp^\top B_t\|_2$"),
    ("subspace_dist", "subspace distance (sin of largest angle)"),
    ("lambda_err", r"$\|B_*^\top B_t B_t^\top B_* - \Lambda_*\|_2$"),
    ("head_norm", r"$\|w_t\|$"),
)
W1_CURVE = ("w1_perp_share", r"$\|B_\perp^\top W_1\|_F / \|W_1\|_F$")  # ReLU runs


def _save(figure: plt.Figure, path: Path) -> None:
    storage.atomic_write(path, lambda tmp: figure.savefig(tmp, format=path.suffix[1:], dpi=120))
    plt.close(figure)


def save_training_figure(metrics: pd.DataFrame, path: Path, title: str,
                         limits: Mapping[str, float] | None = None) -> None:
    """Six panels against the outer step (log-log where positive): the measures and the
    singular values of ``B_t``; ``limits`` (measure -> predicted limit) are drawn as dashed
    horizontal lines where positive."""
    figure, axes = plt.subplots(2, 3, figsize=(14, 7.5), constrained_layout=True)
    steps = metrics["step"].to_numpy() + 1 if len(metrics) else np.array([])
    curves = (CURVES[0], W1_CURVE, *CURVES[2:]) if W1_CURVE[0] in metrics else CURVES
    for axis, (column, label) in zip(axes.flat, curves, strict=False):
        if column in metrics and metrics[column].notna().any():
            axis.plot(steps, metrics[column], marker=".", markersize=3, label="simulation")
            limit = (limits or {}).get(column)
            if limit is not None and limit > 0:
                axis.axhline(limit, linestyle="--", color="k", linewidth=0.8,
                             label="predicted limit")
                axis.legend(fontsize="small")
            axis.set_xscale("log")
            if (metrics[column].dropna() > 0).all():
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
    _save(figure, path)


def save_eval_figure(frame: pd.DataFrame, path: Path, title: str) -> None:
    """Mean test excess risk (with 1.96 standard errors) against m_test, log-log, per method;
    closed-form values, where known, as dashed lines."""
    figure, axis = plt.subplots(figsize=(7, 5), constrained_layout=True)
    for method, rows in frame.groupby("method", sort=False):
        rows = rows.sort_values("shots")
        line = axis.errorbar(rows["shots"], rows["excess_risk"], yerr=1.96 * rows["stderr"],
                             marker="o", capsize=3, label=str(method))
        theory = rows["theory"].to_numpy(dtype=float)
        if np.isfinite(theory).any():
            axis.plot(rows["shots"], theory, linestyle="--", color=line[0].get_color(),
                      label=f"{method} (closed form)")
    axis.set(xscale="log", yscale="log", xlabel="test samples $m_{test}$",
             ylabel=r"excess risk $\|Bw' - B_* w_*\|^2$", title=f"{title}: test-time adaptation")
    axis.grid(alpha=0.3, which="both")
    axis.legend()
    _save(figure, path)


def _wide_positive(values: np.ndarray) -> bool:
    """Whether values are all positive and span at least a factor 20 (then: log scale)."""
    finite = values[np.isfinite(values)]
    return bool(len(finite) and (finite > 0).all() and finite.max() >= 20 * finite.min())


def save_sweep_figure(intervals: pd.DataFrame, x: str, y: str, by: list[str], path: Path,
                      title: str) -> None:
    """``y`` against ``x`` over a sweep: the mean over seeds with its 95% interval (shaded),
    one line per combination of the ``by`` keys. ``intervals`` has the columns
    ``by + [x, "mean", "low", "high"]`` (see ``metarep.sweeps.seed_intervals``); a
    non-numeric ``x`` is placed at evenly spaced positions."""
    figure, axis = plt.subplots(figsize=(7, 5), constrained_layout=True)
    numeric = pd.api.types.is_numeric_dtype(intervals[x])
    categories = list(dict.fromkeys(intervals[x].astype(str)))
    groups = intervals.groupby(by, sort=False, dropna=False) if by else [((), intervals)]
    for key, rows in groups:
        rows = rows.sort_values(x) if numeric else rows
        where = (rows[x].to_numpy(dtype=float) if numeric
                 else np.array([categories.index(str(v)) for v in rows[x]]))
        label = ", ".join(f"{k}={v}" for k, v in zip(by, key, strict=True))
        line = axis.plot(where, rows["mean"], marker="o", label=label or None)[0]
        axis.fill_between(where, rows["low"], rows["high"], color=line.get_color(), alpha=0.2)
    if numeric and _wide_positive(intervals[x].to_numpy(dtype=float)):
        axis.set_xscale("log")
    if _wide_positive(intervals[["mean", "low", "high"]].to_numpy(dtype=float).ravel()):
        axis.set_yscale("log")
    if not numeric:
        axis.set_xticks(range(len(categories)), categories)
    axis.set(xlabel=x, ylabel=f"{y} (mean, 95% interval over seeds)", title=f"{title}: {y}")
    axis.grid(alpha=0.3, which="both")
    if by:
        axis.legend(fontsize="small")
    _save(figure, path)
