"""Figures of a run: training curves and test risk against the number of test samples.

Drawn on :class:`matplotlib.figure.Figure` objects (no pyplot, no global backend): the user's
matplotlib settings are left alone, and the caller saves the figure where it belongs
(:meth:`metarep.run.rundir.RunDirectory.write_figure`).
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

CURVES = (
    ("train_loss", "meta-training loss"),
    ("perp_norm", r"$\|B_\perp^\top B_t\|_2$"),
    ("subspace_dist", "subspace distance (sin of largest angle)"),
    ("lambda_err", r"$\|B_*^\top B_t B_t^\top B_* - \Lambda_*\|_2$"),
    ("head_norm", r"$\|w_t\|$"),
)
W1_CURVE = ("w1_perp_share", r"$\|B_\perp^\top W_1\|_F / \|W_1\|_F$")  # ReLU runs


def training_figure(metrics: pd.DataFrame, title: str,
                    limits: Mapping[str, float] | None = None) -> Figure:
    """Six panels against the outer step (log-log where positive): the measures and the
    singular values of ``B_t``; ``limits`` (measure -> predicted limit) are drawn as dashed
    horizontal lines where positive."""
    figure = Figure(figsize=(14, 7.5), layout="constrained")
    axes = figure.subplots(2, 3)
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
    return figure


def eval_figure(frame: pd.DataFrame, title: str) -> Figure:
    """Mean test excess risk (with 1.96 standard errors) against m_test, log-log, per method;
    closed-form values, where known, as dashed lines."""
    figure = Figure(figsize=(7, 5), layout="constrained")
    axis = figure.subplots()
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
    return figure
