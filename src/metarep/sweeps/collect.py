"""Collecting a sweep directory into one tidy table (parquet and CSV) and a figure of a
measure against an axis, with Student-t intervals over seeds.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from scipy import stats

from metarep.errors import ConfigError
from metarep.run import atomic
from metarep.run.rundir import SUMMARY, RunDirectory
from metarep.run.schema import iter_keys
from metarep.sweeps.manifest import MANIFEST, read_manifest
from metarep.sweeps.spec import SEED_AXIS

RUN_FIELDS = ("run", "status", "error", SEED_AXIS)
RISK_PREFIX = "excess_risk."


def _run_row(path: Path, run: Mapping[str, Any], base: Mapping[str, Any]) -> dict[str, Any]:
    """One table row: run, status, error, seed, every config key, the final measures."""
    directory = RunDirectory(path)
    status = directory.status() or "pending"
    error = directory.error()["error"] if status == "failed" else None
    config = directory.config() or {**base, **run["overrides"]}
    row: dict[str, Any] = dict(zip(RUN_FIELDS, (run["name"], status, error, run["seed"]),
                                   strict=True))
    row.update({key: json.dumps(value) if isinstance(value, list | dict) else value
                for key, value in config.items()})
    summary = directory.summary()
    if summary is not None:
        row.update(summary.get("final") or {})
    evaluation = directory.eval_table()
    if evaluation is not None:
        for method, shots, risk in evaluation[["method", "shots", "excess_risk"]].itertuples(
                index=False):
            row[f"{RISK_PREFIX}{method}.{shots}"] = risk
    return row


def finished_runs(path: str | Path) -> list[Path]:
    """The finished runs in ``path``: ``[path]`` for a run directory, every run of the sweep
    that holds a ``summary.json`` (in sweep order) for a sweep directory (one with a
    manifest). :class:`ConfigError` naming ``DIR`` for anything else."""
    path = Path(path)
    if (path / SUMMARY).is_file():
        return [path]
    if not path.is_dir():
        raise ConfigError("DIR", f"{path} is not a directory")
    if not (path / MANIFEST).is_file():
        raise ConfigError("DIR", f"{path} is neither a finished run (no {SUMMARY}) nor a sweep "
                          f"directory (no {MANIFEST})")
    return [path / run["name"] for run in read_manifest(path)["runs"]
            if (path / run["name"] / SUMMARY).is_file()]


def _uniform_types(frame: pd.DataFrame) -> pd.DataFrame:
    """Columns mixing value types (e.g. ``tasks.n``: 500 and ``online``) become text."""
    for column in [c for c in frame.columns if frame[c].dtype == "object"]:
        kinds = {type(v) for v in frame[column] if not pd.isna(v)}
        if len(kinds) > 1:
            frame[column] = [None if v is None else str(v) for v in frame[column]]
    return frame


def collect_table(sweep_dir: str | Path) -> pd.DataFrame:
    """One row per run of the sweep (in sweep order), finished or not.

    Columns: ``run``, ``status`` (``done``, ``failed`` or ``pending``), ``error``, ``seed``
    (the sweep seed), every config key (dotted; list values as JSON text), then the final
    recorded measures (``step``, ``train_loss``, ``perp_norm``, ..., ``sv_i``) and the test
    excess risks ``excess_risk.METHOD.M_TEST``.
    """
    out = Path(sweep_dir)
    manifest = read_manifest(out)
    rows = [_run_row(out / run["name"], run, manifest["base_config"])
            for run in manifest["runs"]]
    frame = pd.DataFrame(rows)
    return _uniform_types(frame[sorted(frame.columns, key=_column_rank)])


def _column_rank(column: str) -> tuple[int, str, int]:
    """Column order: run fields, config keys (schema order), final measures (alphabetical,
    ``sv_i`` last by ``i``), then the excess risks (by method, then m_test)."""
    schema = [key for key, _ in iter_keys()]
    if column in RUN_FIELDS:
        return 0, "", RUN_FIELDS.index(column)
    if column in schema:
        return 1, "", schema.index(column)
    risk = re.fullmatch(re.escape(RISK_PREFIX) + r"(.+)\.(\d+)", column)
    if risk:
        return 5, risk[1], int(risk[2])
    if "." in column:
        return 2, column, 0
    if re.fullmatch(r"sv_\d+", column):
        return 4, "", int(column[3:])
    return 3, column, 0


def measure_columns(frame: pd.DataFrame) -> list[str]:
    """The measure columns of a collected table: undotted names (``perp_norm``, ``sv_1``)
    and ``excess_risk.*``; config keys are the other dotted names."""
    return [column for column in frame.columns if column not in RUN_FIELDS
            and ("." not in column or column.startswith(RISK_PREFIX))]


SCALES = ("auto", "linear", "log")
"""The axis scales ``collect`` takes (``--xscale``, ``--yscale``)."""


def seed_intervals(frame: pd.DataFrame, x: str, y: str, by: list[str],
                   level: float = 0.95, log: bool = False) -> pd.DataFrame:
    """Mean of ``y`` over seeds with its Student-t interval, per value of ``by + [x]``.

    For the ``n`` finite values ``y_1..y_n`` of a group: ``mean = sum(y_i) / n``,
    ``half = t_{(1+level)/2, n-1} * s / sqrt(n)`` with ``s`` the sample standard deviation;
    ``low``/``high`` are ``mean -/+ half`` (``nan`` when ``n < 2``). With ``log`` (every
    value positive) the same is done on ``log y_i`` and mapped back: ``mean`` is the geometric
    mean and ``low``/``high`` are ``exp(mean(log y) -/+ half)``, an interval that stays
    positive. Only ``done`` runs count.
    """
    done = frame[(frame["status"] == "done") & np.isfinite(frame[y].astype(float))]
    rows = []
    for key, group in done.groupby([*by, x], sort=False, dropna=False):
        values = group[y].to_numpy(dtype=float)
        values = np.log(values) if log else values
        n = len(values)
        mean = float(values.mean())
        half = (stats.t.ppf((1 + level) / 2, n - 1) * values.std(ddof=1) / math.sqrt(n)
                if n > 1 else math.nan)
        low, high = mean - half, mean + half
        if log:
            mean, low, high = math.exp(mean), math.exp(low), math.exp(high)
        rows.append({**dict(zip([*by, x], key, strict=True)), "mean": mean,
                     "low": low, "high": high, "n": n})
    return pd.DataFrame(rows, columns=[*by, x, "mean", "low", "high", "n"])


def _all_positive(values: np.ndarray) -> bool:
    """Whether ``values`` hold a finite value and every finite one is positive."""
    finite = values[np.isfinite(values)]
    return bool(len(finite) and (finite > 0).all())


def _wide_positive(values: np.ndarray) -> bool:
    """Whether values are all positive and span at least a factor 20 (then: log scale)."""
    finite = values[np.isfinite(values)]
    return _all_positive(values) and bool(finite.max() >= 20 * finite.min())


def is_categorical(values: pd.Series) -> bool:
    """Whether an axis is drawn as categories: text values, or numbers some of which are not
    finite (``tasks.m_in: inf``, which no position on a number line can hold)."""
    if not pd.api.types.is_numeric_dtype(values) or pd.api.types.is_bool_dtype(values):
        return True
    return not np.isfinite(values.to_numpy(dtype=float)).all()


def check_scale(asked: str, option: str) -> None:
    """:class:`ConfigError` ``option`` unless ``asked`` is one of :data:`SCALES`."""
    if asked not in SCALES:
        raise ConfigError(option, f"must be one of {', '.join(SCALES)}; got {asked!r}")


def axis_scale(values: np.ndarray, asked: str, option: str) -> str:
    """``linear`` or ``log`` for an axis holding ``values``: ``auto`` takes ``log`` when every
    finite value is positive and they span at least a factor 20 (:func:`_wide_positive`);
    ``log`` asked for values that are not all positive is :class:`ConfigError` ``option``."""
    check_scale(asked, option)
    if asked == "auto":
        return "log" if _wide_positive(values) else "linear"
    if asked == "log" and not _all_positive(values):
        finite = values[np.isfinite(values)]
        smallest = f"{finite.min():.4g}" if len(finite) else "none"
        raise ConfigError(option, f"a log axis needs positive values; the smallest is "
                          f"{smallest} (use linear or auto)")
    return asked


@dataclass(frozen=True)
class Collected:
    """Paths written by :func:`collect` (``figure`` is ``None`` when there is no axis)."""

    table: pd.DataFrame
    parquet: Path
    csv: Path
    figure: Path | None


def collect(sweep_dir: str | Path, x: str | None = None, y: str | None = None, *,
            xscale: str = "auto", yscale: str = "auto") -> Collected:
    """Write ``collected.parquet`` and ``collected.csv`` and a figure ``Y_vs_X.png`` to
    ``sweep_dir``: ``y`` against ``x``, the mean and 95% t-interval over seeds, one line per
    combination of the other axes (keys zipped with ``x`` move with it, so they are not split).

    ``x`` defaults to the sweep's first axis (no figure when nothing varies), ``y`` to
    ``perp_norm``. ``xscale``/``yscale`` are ``auto`` (log where the values are positive and
    span a factor 20 or more), ``linear`` or ``log``. A measure whose values are all positive
    gets its intervals over log values (geometric means, :func:`seed_intervals`), so a band
    never crosses zero; a categorical ``x`` (:func:`is_categorical`) is drawn as categories.
    Raises :class:`ConfigError` (``--x``, ``--y``, ``--xscale``, ``--yscale``) for unknown
    columns or scales that cannot hold the values, before anything is written.
    """
    out = Path(sweep_dir)
    manifest = read_manifest(out)
    table = collect_table(out)
    axes = manifest["axes"]
    measures = measure_columns(table)
    if y is None:
        y = "perp_norm" if "perp_norm" in measures else (measures or [None])[0]
    elif y not in measures:
        raise ConfigError("--y", f"unknown measure {y!r}; allowed: {', '.join(measures)}")
    configs = [c for c in table.columns if c not in RUN_FIELDS and c not in measures]
    if x is not None and x not in configs:
        raise ConfigError("--x", f"unknown axis {x!r}; allowed: {', '.join(configs)}")
    x = x or (axes[0] if axes else None)
    figure = None if x is None or y is None else _figure(table, manifest, x, y, xscale, yscale,
                                                         title=out.name)
    parquet, csv = out / "collected.parquet", out / "collected.csv"
    atomic.atomic_write(parquet, lambda tmp: table.to_parquet(tmp, index=False))
    atomic.write_text(csv, table.to_csv(index=False))
    if figure is None:
        return Collected(table, parquet, csv, None)
    figure_path = out / f"{y}_vs_{x}.png"
    atomic.write_figure(figure_path, figure, dpi=120)
    return Collected(table, parquet, csv, figure_path)


def _figure(table: pd.DataFrame, manifest: Mapping[str, Any], x: str, y: str, xscale: str,
            yscale: str, title: str) -> Figure:
    """The figure of :func:`collect`: its scales chosen (:func:`axis_scale`) and its
    intervals taken over log values where ``y`` is positive."""
    tied = manifest["zip_keys"] if x in manifest["zip_keys"] else []
    by = [key for key in manifest["axes"] if key != x and key not in tied]
    done = table[table["status"] == "done"]
    values = done[y].to_numpy(dtype=float)
    positive = _all_positive(values)
    categorical = is_categorical(table[x])
    check_scale(xscale, "--xscale")
    if categorical and xscale == "log":
        raise ConfigError("--xscale", f"{x} is categorical (not all finite numbers); a log "
                          "axis cannot hold it")
    scales = ("linear" if categorical else
              axis_scale(table[x].to_numpy(dtype=float), xscale, "--xscale"),
              axis_scale(values, yscale, "--yscale"))
    intervals = seed_intervals(table, x, y, by, log=positive)
    return sweep_figure(intervals, x, y, by, title=title, scales=scales,
                        categorical=categorical, geometric=positive)


def sweep_figure(intervals: pd.DataFrame, x: str, y: str, by: list[str], title: str,
                 scales: tuple[str, str] = ("linear", "linear"), categorical: bool = False,
                 geometric: bool = False) -> Figure:
    """``y`` against ``x`` over a sweep: the mean over seeds with its 95% interval, one
    series per combination of the ``by`` keys. ``intervals`` has the columns
    ``by + [x, "mean", "low", "high"]`` (:func:`seed_intervals`; ``geometric``: its means are
    geometric). A numeric ``x`` is drawn as lines with shaded bands on the axes' ``scales``
    (x, y); a ``categorical`` one as points with error bars at evenly spaced categories (in
    sweep order), the series side by side, not joined by lines."""
    figure = Figure(figsize=(7, 5), layout="constrained")
    axis = figure.subplots()
    categories = list(dict.fromkeys(intervals[x].astype(str)))
    groups = list(intervals.groupby(by, sort=False, dropna=False)) if by else [((), intervals)]
    width = min(0.6, 0.15 * len(groups))
    for index, (key, rows) in enumerate(groups):
        label = ", ".join(f"{k}={v}" for k, v in zip(by, key, strict=True)) or None
        if categorical:
            offset = (index - (len(groups) - 1) / 2) * (width / max(len(groups) - 1, 1))
            where = np.array([categories.index(str(v)) for v in rows[x]]) + offset
            mean = rows["mean"].to_numpy(dtype=float)
            spread = np.abs(np.vstack([mean - rows["low"].to_numpy(dtype=float),
                                       rows["high"].to_numpy(dtype=float) - mean]))
            axis.errorbar(where, mean, yerr=np.nan_to_num(spread), fmt="o", capsize=4,
                          label=label)
            continue
        rows = rows.sort_values(x)
        where = rows[x].to_numpy(dtype=float)
        line = axis.plot(where, rows["mean"], marker="o", label=label)[0]
        axis.fill_between(where, rows["low"], rows["high"], color=line.get_color(), alpha=0.2)
    if categorical:
        axis.set_xticks(range(len(categories)), categories)
        axis.set_xlim(-0.5, len(categories) - 0.5)
    else:
        axis.set_xscale(scales[0])
    axis.set_yscale(scales[1])
    mean = "geometric mean" if geometric else "mean"
    axis.set(xlabel=x, ylabel=f"{y} ({mean}, 95% interval over seeds)", title=f"{title}: {y}")
    axis.grid(alpha=0.3, which="both")
    if by:
        axis.legend(fontsize="small")
    return figure
