"""The study's report: six figures (PNG + PDF), their raw tables, and ``report.html``.

Every figure is drawn from a tidy table that is also written to ``tables/`` so that each
number in the report can be traced to a file. ``report.html`` embeds the PNG figures (base64)
and therefore opens offline; the PDFs sit beside it in ``figures/``.
"""

from __future__ import annotations

import base64
import functools
import html
import json
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from matplotlib import colormaps
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.ticker import NullFormatter

from metarep.core.evaluation import REFERENCE_ROWS, RIDGE, features_row
from metarep.core.measures import projected_gram, unit_perp_shares
from metarep.core.methods import MTL
from metarep.run import atomic
from metarep.run.figures import (
    REFERENCE_STYLES,
    closed_form_legend_entry,
    draw_risk,
    map_drawing,
    shots_axis,
)
from metarep.run.rundir import RunData
from metarep.study.claims import (
    CLAIM_COLUMNS,
    SAME_DYNAMICS_TOLERANCE,
    TWINS,
    Claim,
    floor_exponent,
    risk,
    same_dynamics,
    seed_mean,
    share_path,
    unlearning_law,
)
from metarep.study.design import MODEL_AGNOSTIC, POOL_METHODS, RELU_LAYERS, Runs

MTL_LSQ = features_row(MTL.name)
COLORS = {"fo-anil": "C0", "anil": "C1", "fo-maml": "C2", "maml": "C3", "mtl": "C4",
          MTL_LSQ: "C5", **{name: REFERENCE_STYLES[name]["color"] for name in REFERENCE_ROWS}}
STYLES = {"fo-anil": "-", "anil": "--", "fo-maml": ":", "maml": "-.", "mtl": "-"}
LABELS = {"fo-anil": "FO-ANIL", "anil": "ANIL", "fo-maml": "FO-MAML", "maml": "MAML",
          "mtl": "Burer-Monteiro (MTL)", MTL_LSQ: "Burer-Monteiro + least squares",
          **{name: REFERENCE_STYLES[name]["label"] for name in REFERENCE_ROWS}}
"""Colours and legend labels per method and reference row; the references' full styles
(lower references dashed, least squares dotted and light) are
:data:`metarep.run.figures.REFERENCE_STYLES`."""

FED = {method: " (fresh tasks)" for method in MODEL_AGNOSTIC} | {"mtl": " (pool)"}
"""How each method of the ReLU study is fed, in its legend label (figure f)."""


def _draw_row(axis: Axes, name: str, rows: pd.DataFrame) -> None:
    """One row of ``eval.csv`` (a method, ``mtl-lsq`` or a reference) in its report style."""
    if name in REFERENCE_STYLES:
        draw_risk(axis, rows, **REFERENCE_STYLES[name])
    else:
        draw_risk(axis, rows, LABELS.get(name, name), color=COLORS.get(name))


RISK_CEILING = 10.0
"""Risk axes stop at this multiple of the largest ridge risk: a row above it (least squares
near its interpolation threshold, where its risk is heavy-tailed) is marked at the top edge
with its value instead of stretching the axis over decades."""


def _cap_risk_axis(axis: Axes, drawn: list[pd.DataFrame]) -> None:
    """Stop the risk axis at :data:`RISK_CEILING` times the largest ``ridge`` risk among the
    ``drawn`` rows, and mark each point above with an arrow and its value."""
    frame = pd.concat(drawn, ignore_index=True) if drawn else pd.DataFrame()
    ridge = frame[frame["method"] == RIDGE]["excess_risk"] if len(frame) else pd.Series()
    if not len(ridge):
        return
    ceiling = RISK_CEILING * float(ridge.max())
    above = frame[frame["excess_risk"] > ceiling]
    axis.set_ylim(top=ceiling)
    for _, row in above.iterrows():
        axis.annotate(f"{row['excess_risk']:.2g}", (row["shots"], ceiling), xytext=(0, -12),
                      textcoords="offset points", ha="center", fontsize=7,
                      color=COLORS.get(row["method"], "k"),
                      arrowprops={"arrowstyle": "->", "color": COLORS.get(row["method"], "k")})


def _steps(metrics: pd.DataFrame) -> np.ndarray:
    return metrics["step"].to_numpy() + 1


def _long(runs: dict[str, RunData], names: list[str], columns: list[str]) -> pd.DataFrame:
    frames = []
    for name in names:
        run = runs.get(name)
        if run is None:
            continue
        present = [c for c in columns if c in run.metrics]
        frame = run.metrics[["step", *present]].copy()
        frame.insert(0, "run", name)
        frames.append(frame)
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


def _loglog(axis: Axes, xlabel: str, ylabel: str, title: str) -> None:
    """Log-log axes with labels, a light grid and a legend."""
    axis.set(xscale="log", yscale="log", xlabel=xlabel, ylabel=ylabel, title=title)
    axis.grid(alpha=0.3, which="both")
    axis.legend(fontsize=8)


# ----------------------------------------------------------------------------- figures


def figure_unlearning(runs: dict[str, RunData],
                      floors: tuple[str, ...] = ()) -> tuple[Figure, pd.DataFrame]:
    """(a) ``||B_perp^T B_t||`` against t, log-log: every method on the pool (solid; FO-MAML
    and MAML dotted, over FO-ANIL and ANIL which they follow closely), each model-agnostic
    method's exact infinite-task curve from the same ``B_0`` in its colour (dashed; one
    curve for a pair whose curves coincide, :func:`_exact_curves`), and the rates the theory
    gives for the undriven directions, ``(2 kappa alpha^2 beta c t)^(-1/2)`` with ``kappa = 1``
    (first order) and 2 (ANIL, MAML); beside it, the finite-pool floor of the ``floors`` runs
    against N with its fitted power law and the N^(-1/2) of a statistical error for
    contrast."""
    names = [Runs.pool(m) for m in POOL_METHODS] + [Runs.infinite(m) for m in MODEL_AGNOSTIC]
    table = _long(runs, names, ["perp_norm"])
    figure = Figure(figsize=(13, 6.5), layout="constrained")
    axis, floor_axis = figure.subplots(1, 2, width_ratios=(3, 2))
    for method in POOL_METHODS:
        run = runs.get(Runs.pool(method))
        if run is not None:
            overlap = {"fo-maml": " (close to FO-ANIL)", "maml": " (close to ANIL)"}
            axis.plot(_steps(run.metrics), run.metrics["perp_norm"], color=COLORS[method],
                      linestyle=":" if method in overlap else "-",
                      label=f"{LABELS[method]}, N-task pool{overlap.get(method, '')}")
    for method, label in _exact_curves(runs):
        run = runs[Runs.infinite(method)]
        axis.plot(_steps(run.metrics), run.metrics["perp_norm"], color=COLORS[method],
                  linestyle="--", linewidth=2, label=label)
    for method, kappa in (("fo-anil", 1), ("anil", 2)):
        run = runs.get(Runs.infinite(method))
        if run is not None:
            steps = _steps(run.metrics)
            axis.plot(steps, unlearning_law(run, steps), color="0.4" if kappa == 1 else "0.65",
                      linestyle=":", label=rf"theory, $\kappa = {kappa}$ ({LABELS[method]}): "
                      r"$(2\kappa\alpha^2\beta c\,t)^{-1/2}$, $c = (\mathrm{tr}\,\Sigma_* + "
                      r"\sigma^2)/m_{in}$")
    _loglog(axis, "outer step t + 1", r"$\|B_\perp^\top B_t\|_2$",
            f"(a) Unlearning the orthogonal complement of span(B*); dashed: {INFINITE_N} (exact)")
    axis.legend(fontsize=7.5, loc="upper center", bbox_to_anchor=(0.5, -0.12), ncol=2)
    floor_table = _floor_points(runs, floors)
    if len(floor_table):
        _draw_floors(floor_axis, floor_table, [runs[name] for name in floor_table["run"]])
        table = pd.concat([table, floor_table], ignore_index=True)
    floor_axis.set_title("The finite-pool floor of FO-ANIL against the pool size N", fontsize=10)
    return figure, table


INFINITE_N = r"$N = \infty$"


def _exact_curves(runs: dict[str, RunData]) -> list[tuple[str, str]]:
    """``(method, legend label)`` of each exact infinite-task curve to draw: every finished
    ``infinite-<method>`` run, except that FO-MAML and MAML, whose dynamics from ``w_0 = 0``
    are FO-ANIL's and ANIL's (:data:`metarep.study.claims.TWINS`), are not drawn over their
    twin where the two runs' records agree (:func:`metarep.study.claims.same_dynamics` below
    :data:`~metarep.study.claims.SAME_DYNAMICS_TOLERANCE`): the twin's label says so, with
    the measured difference."""
    labels = {m: f"{LABELS[m]}, {INFINITE_N} (exact)" for m in MODEL_AGNOSTIC
              if Runs.infinite(m) in runs}
    for method, twin in TWINS:
        if method in labels and twin in labels:
            gap = same_dynamics(runs[Runs.infinite(method)], runs[Runs.infinite(twin)]).values[0]
            if gap < SAME_DYNAMICS_TOLERANCE:
                del labels[method]
                labels[twin] = (f"{LABELS[twin]} = {LABELS[method]}, {INFINITE_N} (exact; "
                                f"one curve from $w_0 = 0$, relative difference {gap:.1g})")
    return list(labels.items())


def _floor_points(runs: dict[str, RunData], floors: tuple[str, ...]) -> pd.DataFrame:
    """One row per finished floor run: ``run, N, floor`` (its final perp_norm)."""
    rows = [{"run": name, "N": runs[name].config["tasks"]["n"],
             "floor": float(runs[name].metrics["perp_norm"].iloc[-1])}
            for name in floors if name in runs]
    return pd.DataFrame(rows, columns=["run", "N", "floor"])


def _draw_floors(axis: Axes, table: pd.DataFrame, floor_runs: list[RunData]) -> None:
    """The floors (one point per pool seed), the fitted ``N^e`` (the floor-law claim's
    measure) and ``N^(-1/2)`` through the same centre."""
    axis.plot(table["N"], table["floor"], "o", color=COLORS["fo-anil"],
              label="floor of one pool (perp_norm at T)")
    sizes = np.geomspace(table["N"].min(), table["N"].max(), 50)
    centre_n, centre_floor = np.exp(np.log(table["N"]).mean()), np.exp(
        np.log(table["floor"]).mean())
    if table["N"].nunique() > 1:
        found = floor_exponent(*floor_runs)
        exponent, stderr = found.values
        axis.plot(sizes, centre_floor * (sizes / centre_n) ** exponent, color=COLORS["fo-anil"],
                  label=f"fit: $N^{{{exponent:.3f} \\pm {stderr:.3f}}}$")
    axis.plot(sizes, centre_floor * (sizes / centre_n) ** -0.25, color="0.4", linestyle=":",
              label="$N^{-1/4}$: cubic unlearning against pool noise")
    axis.plot(sizes, centre_floor * (sizes / centre_n) ** -0.5, color="0.6", linestyle="--",
              label="$N^{-1/2}$: a statistical error (for contrast)")
    _loglog(axis, "tasks in the pool N", r"$\|B_\perp^\top B_T\|_2$ at the floor",
            "The finite-pool floor against N")
    sizes_run = sorted(table["N"].unique())
    axis.set_xticks(sizes_run, labels=[str(n) for n in sizes_run])
    axis.xaxis.set_minor_formatter(NullFormatter())


def figure_singular_values(runs: dict[str, RunData], k: int) -> tuple[Figure, pd.DataFrame]:
    """(b) Rank k at a glance: the gap ``sv_(k+1) / sv_k`` of ``B_t`` over t for each method
    on the pool and for the exact infinite-task FO-ANIL (which closes it as ``t^(-1/2)``), and
    the final singular values of each, index against value, with the cut at k."""
    names = [Runs.pool(m) for m in POOL_METHODS] + [Runs.INFINITE]
    columns = sorted({c for n in names if n in runs for c in runs[n].metrics
                      if c.startswith("sv_")}, key=lambda c: int(c[3:]))
    table = _long(runs, names, columns)
    figure = Figure(figsize=(13, 5), layout="constrained")
    gap_axis, spectrum_axis = figure.subplots(1, 2)
    curves = [(Runs.pool(m), LABELS[m] + (" = FO-ANIL up to the line width" if m == "fo-maml"
                                          else ""), COLORS[m], STYLES[m]) for m in POOL_METHODS]
    curves.append((Runs.INFINITE, "FO-ANIL, infinitely many tasks (exact)", "k", "--"))
    for name, label, color, style in curves:
        run = runs.get(name)
        if run is None or f"sv_{k + 1}" not in run.metrics:
            continue
        gap = run.metrics[f"sv_{k + 1}"] / run.metrics[f"sv_{k}"]
        gap_axis.plot(_steps(run.metrics), gap, color=color, linestyle=style, label=label)
        final = run.metrics[[c for c in columns if c in run.metrics]].iloc[-1].to_numpy()
        spectrum_axis.plot(np.arange(1, len(final) + 1), np.clip(final, 1e-12, None),
                           color=color, linestyle=style, marker=".", label=label)
    _loglog(gap_axis, "outer step t + 1", r"$s_{k+1}(B_t) / s_k(B_t)$",
            f"(b) The gap at k = {k}: closes for the model-agnostic methods, not for "
            "Burer-Monteiro")
    spectrum_axis.axvline(k + 0.5, color="0.5", linewidth=0.8)
    spectrum_axis.set(yscale="log", xlabel="index i", ylabel=r"$s_i(B_T)$",
                      title=f"Singular values at the last step (line: between k = {k} and "
                      f"k + 1)")
    spectrum_axis.grid(alpha=0.3, which="both")
    spectrum_axis.legend(fontsize=8)
    return figure, table


def figure_lambda(runs: dict[str, RunData]) -> tuple[Figure, pd.DataFrame]:
    """(c) ``||B*^T B_t B_t^T B* - Lambda*||`` against t, and the final eigenvalues of
    ``B*^T B_T B_T^T B*`` next to those of ``Lambda*``."""
    names = [Runs.pool(m) for m in MODEL_AGNOSTIC] + [Runs.INFINITE]
    table = _long(runs, names, ["lambda_err"])
    figure = Figure(figsize=(13, 4.8), layout="constrained")
    left, right = figure.subplots(1, 2)
    for name in names:
        run = runs.get(name)
        if run is None:
            continue
        method = name.split("-", 1)[1]
        style = {"color": "k", "linestyle": "--", "linewidth": 2} if name.startswith("infinite") \
            else {"color": COLORS[method], "linestyle": STYLES[method]}
        label = "FO-ANIL, infinite tasks" if name.startswith("infinite") else LABELS[method]
        left.plot(_steps(run.metrics), run.metrics["lambda_err"], label=label, **style)
    _loglog(left, "outer step t + 1", r"$\|B_*^\top B_t B_t^\top B_* - \Lambda_*\|_2$",
            r"(c) $B_*^\top B_t B_t^\top B_*$ approaches $\Lambda_*$")
    rows = []
    for name in (Runs.pool("fo-anil"), Runs.INFINITE):
        run = runs.get(name)
        if run is None:
            continue
        final = np.sort(np.linalg.eigvalsh(projected_gram(run.params["B"], run.params["B_star"])))
        target = np.sort(np.linalg.eigvalsh(np.asarray(run.summary["theory"]["lambda_star"])))
        rows += [{"run": name, "index": i + 1, "final": f, "lambda_star": t}
                 for i, (f, t) in enumerate(zip(final, target, strict=True))]
    eigen = pd.DataFrame(rows)
    if len(eigen):
        for name, marker in ((Runs.pool("fo-anil"), "o"), (Runs.INFINITE, "x")):
            part = eigen[eigen["run"] == name]
            right.plot(part["index"], part["final"], marker, markersize=8,
                       label=f"eigenvalues at T, {name}")
        part = eigen[eigen["run"] == eigen["run"].iloc[0]]
        right.plot(part["index"], part["lambda_star"], "k_", markersize=25, mew=2,
                   label=r"eigenvalues of $\Lambda_*$ (theory)")
    right.set(xlabel="eigenvalue index", ylabel="eigenvalue",
              title=r"eigenvalues of $B_*^\top B_T B_T^\top B_*$ vs $\Lambda_*$")
    right.grid(alpha=0.3)
    right.legend(fontsize=8)
    table = pd.concat([table, eigen.assign(step=np.nan)], ignore_index=True)
    return figure, table


def figure_test_risk(runs: dict[str, RunData]) -> tuple[Figure, pd.DataFrame]:
    """(d) Test excess risk against m_test after one head step, every method, with the
    reference rows of the FO-ANIL run (the Bayes oracle and ridge as lower references, least
    squares lighter), 95% error bars where the variance is finite and closed forms where
    known."""
    frames = []
    for method in POOL_METHODS:
        run = runs.get(Runs.pool(method))
        if run is None or run.eval is None:
            continue
        keep = run.eval["method"].isin([method, MTL_LSQ]) | (
            (method == "fo-anil") & run.eval["method"].isin(REFERENCE_ROWS))
        frames.append(run.eval[keep].assign(run=Runs.pool(method)))
    table = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()
    figure = Figure(figsize=(7.5, 5.2), layout="constrained")
    axis = figure.subplots()
    for method, rows in (table.groupby("method", sort=False) if len(table) else []):
        _draw_row(axis, str(method), rows)
    closed_form_legend_entry(axis)
    _loglog(axis, "test samples $m_{test}$", r"excess risk $E\|Bw' - B_* w_*\|^2$",
            "(d) Test risk after one head step (95% error bars)")
    _cap_risk_axis(axis, [table] if len(table) else [])
    if len(table):
        shots_axis(axis, table["shots"].to_numpy())
    return figure, table


def figure_m_in(runs: dict[str, RunData], base_m_in: int) -> tuple[Figure, pd.DataFrame]:
    """(e) ``||B_perp^T B_t||`` under the exact infinite-task FO-ANIL dynamics for several
    inner sample counts m_in, infinity included."""
    names = sorted([n for n in runs if n.startswith(Runs.m_in(""))] + [Runs.INFINITE],
                   key=lambda n: _m_in_of(n, base_m_in))
    table = _long(runs, names, ["perp_norm"])
    figure = Figure(figsize=(7.5, 5), layout="constrained")
    axis = figure.subplots()
    colors = colormaps["viridis"](np.linspace(0, 0.9, max(len(names), 1)))
    for color, name in zip(colors, names, strict=True):
        run = runs.get(name)
        if run is None:
            continue
        m_in = _m_in_of(name, base_m_in)
        label = r"$m_{in} = \infty$" if np.isinf(m_in) else f"$m_{{in}}$ = {int(m_in)}"
        axis.plot(_steps(run.metrics), run.metrics["perp_norm"], color=color, label=label,
                  linestyle="--" if np.isinf(m_in) else "-")
    _loglog(axis, "outer step t + 1", r"$\|B_\perp^\top B_t\|_2$",
            "(e) Finite inner samples unlearn the complement; infinite do not")
    return figure, table


def _m_in_of(name: str, base_m_in: int) -> float:
    if name == Runs.INFINITE:
        return float(base_m_in)
    return float(name.rsplit("-", 1)[1])


def seed_averaged_eval(runs: list[RunData], row: str) -> pd.DataFrame:
    """``row``'s risk against m_test averaged over the seeds' ``runs``, with the standard error
    of :func:`metarep.study.claims.seed_mean` (seeds and test tasks), in ``eval.csv``'s
    columns."""
    frames = [run.eval[run.eval["method"] == row].set_index("shots") for run in runs]
    averaged = []
    for shots in frames[0].index:
        mean, stderr = seed_mean([f.loc[shots, "excess_risk"] for f in frames],
                                 [f.loc[shots, "stderr"] for f in frames])
        averaged.append({"method": row, "shots": shots, "excess_risk": mean, "stderr": stderr,
                         "n_tasks": frames[0].loc[shots, "n_tasks"], "theory": np.nan})
    return pd.DataFrame(averaged)


def figure_relu(runs: dict[str, RunData], seeds: tuple[int, ...]) -> tuple[Figure, pd.DataFrame]:
    """(f) The appendix study: ReLU bodies with 1 and 2 hidden layers (two- and three-layer
    networks): the share of W1's energy outside span(B*) over t (one line per seed; FO-ANIL
    on the pool, the negative control, in black), and the test risk averaged over the seeds
    (error bars: 1.96 standard errors of seeds and test tasks)."""
    names = [*(Runs.relu(layers, m, seed) for layers in RELU_LAYERS for m in POOL_METHODS
               for seed in seeds), *(Runs.relu_pool(layers, seeds[0]) for layers in RELU_LAYERS)]
    table = _long(runs, names, ["w1_perp_share", "train_loss"])
    risk_frames = []
    figure = Figure(figsize=(13, 9), layout="constrained")
    axes = figure.subplots(2, 2)
    for (share_axis, risk_axis), layers in zip(axes, RELU_LAYERS, strict=True):
        reference, drawn = None, []
        for method in POOL_METHODS:
            seeded = _seed_runs(runs, layers, (method,), seeds)
            for i, run in enumerate(seeded):
                if "w1_perp_share" in run.metrics:
                    share_axis.plot(_steps(run.metrics), run.metrics["w1_perp_share"],
                                    color=COLORS[method], linestyle=STYLES[method],
                                    linewidth=1.2 if i == 0 else 0.6,
                                    label=(LABELS[method] + FED[method]) if i == 0 else None)
            evaluated = [run for run in seeded if run.eval is not None]
            if not evaluated:
                continue
            reference = reference or evaluated[0]
            for row in ((method, MTL_LSQ) if method == MTL.name else (method,)):
                averaged = seed_averaged_eval(evaluated, row)
                _draw_row(risk_axis, row, averaged)
                drawn.append(averaged)
                risk_frames.append(averaged.assign(run=f"relu{layers}-{method}",
                                                   seeds=len(evaluated)))
        if reference is not None:
            for baseline in REFERENCE_ROWS:
                rows = reference.eval[reference.eval["method"] == baseline]
                if len(rows):
                    _draw_row(risk_axis, baseline, rows)
                    drawn.append(rows)
            shots_axis(risk_axis, reference.eval["shots"].to_numpy())
        control = runs.get(Runs.relu_pool(layers, seeds[0]))
        if control is not None and "w1_perp_share" in control.metrics:
            share_axis.plot(_steps(control.metrics), control.metrics["w1_perp_share"],
                            color="black", linestyle="--", linewidth=1.2,
                            label="FO-ANIL on the pool (control)")
        share_axis.set(xscale="log", yscale="log", xlabel="outer step t + 1",
                       ylabel=r"$\|B_\perp^\top W_1\|_F / \|W_1\|_F$",
                       title=f"(f) ReLU, {layers + 1}-layer network: W1 energy outside span(B*)")
        risk_axis.set(xscale="log", yscale="log", xlabel="test samples $m_{test}$",
                      ylabel="test excess risk", title=f"{layers + 1}-layer ReLU: test risk "
                      f"after one head step (mean of {len(seeds)} seed(s))")
        _cap_risk_axis(risk_axis, drawn)
        for axis in (share_axis, risk_axis):
            axis.grid(alpha=0.3, which="both")
            axis.legend(fontsize=7)
    if risk_frames:
        table = pd.concat([table, *risk_frames], ignore_index=True)
    return figure, table


def relu_statement(runs: dict[str, RunData], seeds: tuple[int, ...]) -> str:
    """What the ReLU study shows, in numbers: per depth, W1's share outside span(B*) (mean over
    the model-agnostic methods and the seeds, on fresh tasks) at t = 0, at its minimum and at
    T, FO-ANIL's on the pool at its minimum and at T, and the test risk at the smallest m_test
    of FO-ANIL (mean over seeds; on the pool), ridge, the Bayes oracle and Burer-Monteiro's
    features with least squares."""
    parts = []
    for layers in RELU_LAYERS:
        agnostic = _seed_runs(runs, layers, MODEL_AGNOSTIC, seeds)
        fo = _seed_runs(runs, layers, ("fo-anil",), seeds)
        mtl = _seed_runs(runs, layers, (MTL.name,), seeds)
        if not agnostic or not fo or fo[0].eval is None:
            continue
        start, lowest, end = share_path(agnostic)
        smallest = int(fo[0].eval["shots"].min())
        text = (f"{layers + 1}-layer networks: with fresh tasks W1's share outside span(B*) "
                f"falls from {start:.2f} to {lowest:.2f} and ends at {end:.2f} (model-agnostic "
                f"methods, mean over {len(seeds)} seeds)")
        pool = runs.get(Runs.relu_pool(layers, seeds[0]))
        pool = pool if pool is not None and pool.eval is not None else None
        if pool is not None:
            _, floor, pool_end = share_path([pool])
            text += f"; on the pool FO-ANIL's stops at {floor:.2f} and ends at {pool_end:.2f}"
        text += (f". At m_test = {smallest} the test risk is "
                 f"{_mean_risk(fo, 'fo-anil', smallest):.3g} for FO-ANIL")
        if pool is not None:
            text += f" ({_mean_risk([pool], 'fo-anil', smallest):.3g} on the pool)"
        text += (f" against {_mean_risk(fo[:1], 'ridge', smallest):.3g} for ridge and "
                 f"{_mean_risk(fo[:1], 'bayes-oracle', smallest):.3g} for the Bayes oracle")
        if mtl and all(r.eval is not None for r in mtl):
            text += (f", and {_mean_risk(mtl, MTL_LSQ, smallest):.3g} for Burer-Monteiro + "
                     "least squares")
        parts.append(text + ". " + _stranded_statement(runs, layers, seeds))
    return " ".join(parts)


STRANDED_SHARE = 0.9
"""A first-layer unit is left outside span(B*) when more than this share of its weights lies
outside it at the end (:func:`metarep.core.measures.unit_perp_shares`)."""


def stranded_units(run: RunData) -> int:
    """How many first-layer units of a ReLU run end with a share outside span(B*) above
    :data:`STRANDED_SHARE`."""
    return int((unit_perp_shares(run.params["W1"], run.params["B_star"])
                > STRANDED_SHARE).sum())


def _stranded_statement(runs: dict[str, RunData], layers: int, seeds: tuple[int, ...]) -> str:
    """Per model-agnostic method, how many first-layer units end outside span(B*)
    (:func:`stranded_units`), over how many units and seeds."""
    counts = []
    for method in MODEL_AGNOSTIC:
        group = [run for run in _seed_runs(runs, layers, (method,), seeds) if "W1" in run.params]
        if group:
            stranded = [stranded_units(run) for run in group]
            units = sum(run.params["W1"].shape[1] for run in group)
            counts.append(f"{LABELS[method]} {sum(stranded)} of {units} "
                          f"(in {sum(n > 0 for n in stranded)} of {len(group)} seeds)")
    if not counts:
        return ""
    return (f"First-layer units left outside span(B*) at T (more than {STRANDED_SHARE:g} of "
            "their weights outside it): " + ", ".join(counts) + ".")


def _seed_runs(runs: dict[str, RunData], layers: int, methods: tuple[str, ...],
               seeds: tuple[int, ...]) -> list[RunData]:
    """The finished ReLU runs of ``methods`` with ``layers`` hidden layers, by method then
    seed."""
    return [run for method in methods for seed in seeds
            if (run := runs.get(Runs.relu(layers, method, seed))) is not None]


def _mean_risk(group: list[RunData], row: str, shots: int) -> float:
    """The mean over ``group`` of ``row``'s test risk at ``m_test = shots``."""
    return float(np.mean([risk(run, row, shots)[0] for run in group]))


# ----------------------------------------------------------------------------- writing


def _save_figure(figure: Figure, stem: Path) -> None:
    """``figure`` as ``stem.png`` and ``stem.pdf``. The layout is computed once, while drawing
    the PNG, and kept for the PDF (the constrained layout takes half the time of a draw)."""
    atomic.write_figure(stem.with_suffix(".png"), figure, dpi=110)
    figure.set_layout_engine("none")
    atomic.write_figure(stem.with_suffix(".pdf"), figure, dpi=110)


FIGURES: tuple[tuple[str, str], ...] = (
    ("a_unlearning", "Unlearning: the part of B_t outside span(B*) over training. Solid (and "
     "dotted for FO-MAML and MAML, which follow FO-ANIL and ANIL closely): each method on the "
     "finite pool. Dashed, in the same colour: the exact infinite-task dynamics of each "
     "model-agnostic method from the same B_0 (one inner step, w_0 = 0); from w_0 = 0 the "
     "head stays 0, so FO-MAML's curve is FO-ANIL's and MAML's is ANIL's exactly, and each "
     "pair is drawn once, as the legend says (the claims measure the difference). The "
     "dotted grey lines are the rates the theory gives for the undriven directions, (2 kappa "
     "alpha^2 beta c t)^(-1/2) with c = (tr Sigma* + sigma^2) / m_in: kappa = 1 for the "
     "first-order methods, 2 for ANIL and MAML, whose gradient through the inner step doubles "
     "the cubic shrinkage. The finite-pool curves leave them at a floor set by N, m and the "
     "noise. Right: the floor of FO-ANIL trained to convergence on pools of "
     "several sizes N (one point per pool seed), its fitted power law, the N^(-1/4) that "
     "cubic unlearning against pool noise of order N^(-1/2) gives (docs/finite_pool_floor.md) "
     "and the N^(-1/2) of a statistical error for contrast."),
    ("b_singular_values", "Rank k at a glance. Left: the gap s_(k+1) / s_k between the k-th "
     "and (k+1)-th singular values of B_t over training; it closes for the model-agnostic "
     "methods (as t^(-1/2) with infinitely many tasks, down to a floor on a pool) and stays "
     "near 1 for Burer-Monteiro. Right: every singular value at the last step; the line "
     "separates the top k."),
    ("c_lambda", "B*^T B_t B_t^T B* approaches Lambda* (specification §4, claim 3): error over "
     "training and the final eigenvalues against the theory's."),
    ("d_test_risk", "Test excess risk after one head step of size alpha against the number of "
     "test samples (error bars: 95%). Lower references, dashed: the Bayes oracle (black), the "
     "posterior mean of the head knowing B*, Sigma* and sigma^2, which no method can beat in "
     "expectation at any m_test, and ridge in d dimensions with the prior-optimal isotropic "
     "penalty sigma^2 d / tr(Sigma*) (grey), which uses no representation. Dotted and light: "
     "least squares on X B* (k dims) and in d dims, shown only where their expected risk is "
     "finite (m_test >= dim + 2) and without error bars at m_test = dim + 2, dim + 3, where "
     "the variance of their risk is infinite. Wide pale lines: closed forms where known (the "
     "method's one-step risk, sigma^2 dim / (m_test - dim - 1) for least squares; the "
     "noisy Bayes oracle and ridge have none). Burer-Monteiro + least squares switches to "
     "ridge below k' + 2 samples, so it peaks just above its interpolation threshold. The risk "
     "axis stops at 10 times the largest ridge risk; a point above is marked at the top edge "
     "with its value."),
    ("e_m_in", "The role of m_in under the exact infinite-task dynamics: finite inner samples "
     "unlearn the complement, infinitely many do not."),
    ("f_relu", "Appendix: two- and three-layer ReLU networks, the model-agnostic methods on "
     "fresh tasks at every step, Burer-Monteiro (one head per task) and FO-ANIL as the negative "
     "control (black, dashed) on a pool of N tasks; one line per seed (tasks and "
     "initialisation) on the left (log axes), the test risk averaged over the seeds on the "
     "right (error bars: 1.96 standard errors of the seeds and the test tasks), with the "
     "Bayes oracle and ridge as lower references. Burer-Monteiro + least "
     "squares fits its k' features by ridge below k' + 2 samples and by least squares from "
     "there: just above that threshold its risk is heavy-tailed (no error bar), and a point "
     "above 10 times the largest ridge risk is marked at the top edge with its value."),
)


DRAWING_ORDER = ("f_relu", "a_unlearning", "c_lambda", "b_singular_values", "e_m_in",
                 "d_test_risk")
"""The figures, longest to draw first (measured at ``quick``: 2.9 s for f_relu down to 1.1 s
for d_test_risk), so that parallel drawing ends with the short ones."""


def _draw_figure(stem: str, *, out: Path, runs: dict[str, RunData],
                 context: dict[str, Any]) -> None:
    """Draw figure ``stem`` from ``runs`` into ``out/figures`` (PNG and PDF) and its table into
    ``out/tables``."""
    makers: dict[str, Callable[[], tuple[Figure, pd.DataFrame]]] = {
        "a_unlearning": lambda: figure_unlearning(runs, context.get("floors", ())),
        "b_singular_values": lambda: figure_singular_values(runs, context["k"]),
        "c_lambda": lambda: figure_lambda(runs),
        "d_test_risk": lambda: figure_test_risk(runs),
        "e_m_in": lambda: figure_m_in(runs, context["m_in"]),
        "f_relu": lambda: figure_relu(runs, tuple(context.get("relu_seeds", (1,)))),
    }
    figure, table = makers[stem]()
    _save_figure(figure, out / "figures" / stem)
    atomic.write_text(out / "tables" / f"{stem}.csv", table.to_csv(index=False))


def write_report(out: Path, runs: dict[str, RunData], claims: list[Claim],
                 context: dict[str, Any], workers: int = 1) -> Path:
    """Draw the figures (on ``workers`` processes: :func:`~metarep.run.figures.map_drawing`),
    write their tables, ``claims.csv`` and ``report.html``; returns the path of the report."""
    sections: dict[str, str] = {}
    relu_skipped = sorted({reason for name, reason in context.get("skipped", {}).items()
                           if Runs.is_relu(name)})
    captions = dict(FIGURES)
    if relu_skipped:
        sections["f_relu"] = (f"<figure><figcaption><b>f_relu</b>: "
                              f"{html.escape(captions['f_relu'])} <b>Skipped</b>, the ReLU "
                              f"runs {html.escape(relu_skipped[0])}.</figcaption></figure>")
    elif not context.get("relu_claims", True):
        captions["f_relu"] += (" At this scale the ReLU runs are a smoke test of the pipeline: "
                               "they stop before W1 and the test risk stop moving, so no claim "
                               "is made from them (--scale default makes them).")
    else:
        captions["f_relu"] += " " + relu_statement(runs, tuple(context.get("relu_seeds", (1,))))
    drawn = [stem for stem in DRAWING_ORDER if stem not in sections]
    map_drawing(functools.partial(_draw_figure, out=out, runs=runs, context=context), drawn,
                workers)
    for stem in drawn:
        encoded = base64.b64encode((out / "figures" / f"{stem}.png").read_bytes()).decode()
        sections[stem] = (
            f'<figure><img alt="{stem}" src="data:image/png;base64,{encoded}">'
            f"<figcaption><b>{stem}</b>: {html.escape(captions[stem])} "
            f'(<a href="figures/{stem}.pdf">PDF</a>, <a href="tables/{stem}.csv">data</a>)'
            "</figcaption></figure>")
    sections_in_order = [sections[stem] for stem, _ in FIGURES]
    claims_frame = pd.DataFrame([{**asdict(c), "status": c.status} for c in claims],
                                columns=list(CLAIM_COLUMNS))
    atomic.write_text(out / "claims.csv", claims_frame.to_csv(index=False))
    key_numbers = key_numbers_table(runs)
    atomic.write_text(out / "tables" / "key_numbers.csv", key_numbers.to_csv(index=False))
    page = _html_page(context, claims_frame, key_numbers, sections_in_order)
    atomic.write_text(out / "report.html", page)
    return out / "report.html"


def key_numbers_table(runs: dict[str, RunData]) -> pd.DataFrame:
    """Final measures of every run (one row per run)."""
    columns = ["train_loss", "perp_norm", "subspace_dist", "lambda_err", "head_norm",
               "w1_perp_share"]
    rows = []
    for name, run in runs.items():
        last = run.metrics.iloc[-1]
        rows.append({"run": name, "steps": int(last["step"]),
                     "seconds": run.summary.get("seconds"),
                     **{c: float(last[c]) for c in columns if c in run.metrics}})
    return pd.DataFrame(rows)


def _table_html(frame: pd.DataFrame, status_column: str | None = None) -> str:
    """``frame`` as an HTML table; rows coloured by ``status_column`` (pass, fail, skipped)."""
    head = "".join(f"<th>{html.escape(str(c))}</th>" for c in frame.columns)
    body = []
    for _, row in frame.iterrows():
        css = f' class="{row[status_column]}"' if status_column is not None else ""
        cells = "".join(f"<td>{html.escape(_fmt(v))}</td>" for v in row)
        body.append(f"<tr{css}>{cells}</tr>")
    return f"<table><tr>{head}</tr>{''.join(body)}</table>"


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return "" if np.isnan(value) else f"{value:.4g}"
    return str(value)


def _provenance_html(record: dict[str, Any] | None) -> str:
    """The report's provenance (:func:`metarep.run.provenance.provenance` of the command that
    wrote it) as a two-column table; each run's own is in its ``summary.json``."""
    if not record:
        return "<p>not recorded</p>"
    rows = pd.DataFrame({"field": list(record), "value": [
        json.dumps(v) if isinstance(v, dict) or v is None else str(v) for v in record.values()]})
    return _table_html(rows) + "<p>Each run's own record is in its <code>summary.json</code>.</p>"


def _html_page(context: dict[str, Any], claims: pd.DataFrame, key_numbers: pd.DataFrame,
               sections: list[str]) -> str:
    passed = int((claims["status"] == "pass").sum())
    skipped = int((claims["status"] == "skipped").sum())
    tally = f"{passed} / {len(claims) - skipped}" + (
        f" ({skipped} skipped: their runs need an extra that is not installed)"
        if skipped else "")
    setting = html.escape(context["setting"])
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>metarep reproduce ({context['scale']})</title>
<style>
body {{ font-family: sans-serif; max-width: 1200px; margin: 2em auto; color: #222; }}
table {{ border-collapse: collapse; margin: 1em 0; font-size: 0.9em; }}
td, th {{ border: 1px solid #ccc; padding: 4px 8px; text-align: left; }}
tr.pass td:last-child {{ background: #d9f2d9; }} tr.fail td:last-child {{ background: #f7d4d4; }}
tr.skipped td:last-child {{ background: #ececec; }}
figure {{ margin: 2em 0; }} img {{ max-width: 100%; }} figcaption {{ font-size: 0.9em; }}
pre {{ background: #f6f6f6; padding: 1em; }}
</style></head><body>
<h1>First-order ANIL learns representations despite overparametrization: reproduction</h1>
<p>Scale <b>{context['scale']}</b>, {context['n_runs']} runs, written by metarep
{context['version']}. Claims passed: <b>{tally}</b>.</p>
<h2>Setting</h2><pre>{setting}</pre>
<h2>Provenance</h2>{_provenance_html(context.get("provenance"))}
<p>Regimes: the paper's theorem is about infinitely many tasks (runs named
<code>infinite-*</code>, exact population dynamics); runs named <code>pool-*</code> and
<code>floor-*</code> train on a finite pool of N tasks, where the orthogonal part stops
shrinking at a floor set by N, m and the noise. In the ReLU study (<code>relu*</code>) the
model-agnostic methods draw fresh tasks at every step; Burer-Monteiro and the control
<code>relu*-fo-anil-pool-*</code> train on a pool of N tasks.</p>
<h2>Claims</h2>{_table_html(claims, "status")}
<h2>Figures</h2>{''.join(sections)}
<h2>Key numbers (final measures of every run)</h2>{_table_html(key_numbers)}
</body></html>
"""
