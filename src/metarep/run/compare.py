"""``metarep compare``: the training curves of several runs on one figure (PNG and PDF).

Each run is labelled by the config keys whose values differ between the runs
(:func:`differing_keys`), so a legend reads ``method.name=anil, model.width=8`` rather than a
directory name; runs whose configs are identical are told apart by their directories.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import yaml

from metarep.errors import ConfigError
from metarep.run import atomic
from metarep.run.figures import CURVES, W1_CURVE, comparison_figure, stated_limits
from metarep.run.rundir import RunDirectory

RUN_ARGUMENT = "RUN_DIR"
"""How errors name the command's run directories."""

FIGURE_SUFFIXES = (".png", ".pdf")
DEFAULT_MEASURES = tuple(name for name, _ in (CURVES[0], W1_CURVE, *CURVES[1:]))
"""The measures drawn when none are asked for (those that some run recorded)."""


@dataclass(frozen=True)
class ComparedRun:
    """One run as drawn: its label, its recorded rows and the limits the theory states for it
    (``None`` where it states none)."""

    label: str
    metrics: pd.DataFrame
    limits: Mapping[str, float] | None


def differing_keys(configs: Sequence[Mapping[str, Any]]) -> list[str]:
    """The dotted keys (in first-seen order) whose values are not the same in every one of
    ``configs`` (flat dotted configs); a key missing from some config counts as differing."""
    keys = list(dict.fromkeys(key for config in configs for key in config))
    missing = object()
    return [key for key in keys
            if len({repr(config.get(key, missing)) for config in configs}) > 1]


def run_labels(names: Sequence[str], configs: Sequence[Mapping[str, Any]]) -> list[str]:
    """One legend label per run: ``key=value`` for every :func:`differing_keys` key, or the
    run's directory name when the configs do not differ; the directory name is added where two
    labels would coincide."""
    keys = differing_keys(configs)
    labels = [", ".join(f"{key}={config.get(key)}" for key in keys) or name
              for name, config in zip(names, configs, strict=True)]
    return [f"{label} ({name})" if labels.count(label) > 1 and label != name else label
            for label, name in zip(labels, names, strict=True)]


def _read(path: Path) -> tuple[str, dict[str, Any], pd.DataFrame, dict[str, Any] | None]:
    """A run directory's name, flat config, recorded rows and summary (``None`` while it
    runs); :class:`ConfigError` naming ``RUN_DIR`` when it is not a run with records."""
    directory = RunDirectory(path)
    not_a_run = ConfigError(RUN_ARGUMENT, f"{path} is not a run directory (no config.yaml "
                            "and metrics.csv in it)")
    if not path.is_dir():
        raise not_a_run
    try:
        metrics, config, summary = directory.metrics(), directory.config(), directory.summary()
    except ConfigError as error:
        raise ConfigError(RUN_ARGUMENT, error.message) from None
    except (yaml.YAMLError, AttributeError, TypeError):
        raise ConfigError(RUN_ARGUMENT, f"{path / 'config.yaml'} is corrupt (not YAML)") \
            from None
    if metrics is None or config is None:
        raise not_a_run
    if metrics.empty:
        raise ConfigError(RUN_ARGUMENT, f"{path} has no records yet (metrics.csv is empty)")
    return path.name, config, metrics, summary


def figure_paths(out: str | Path) -> tuple[Path, Path]:
    """``OUT.png`` and ``OUT.pdf`` (a ``.png`` or ``.pdf`` suffix of ``out`` is dropped);
    :class:`ConfigError` naming ``--out`` for an empty name or another suffix."""
    stem = Path(out)
    if stem.suffix.lower() in FIGURE_SUFFIXES:
        stem = stem.with_suffix("")
    if not stem.name or stem.suffix:
        raise ConfigError("--out", f"expected a file name without a suffix, or ending in .png or "
                          f".pdf; got {str(out)!r}")
    if stem.exists() and stem.is_dir():
        raise ConfigError("--out", f"{stem} is a directory; give a file name, e.g. {stem}/compare")
    return stem.with_suffix(".png"), stem.with_suffix(".pdf")


def _measures(asked: Sequence[str] | None, runs: Sequence[ComparedRun]) -> list[str]:
    """The measures to draw: ``asked`` (each recorded by some run, else :class:`ConfigError`
    naming ``--measures``), or the :data:`DEFAULT_MEASURES` some run recorded."""
    recorded = list(dict.fromkeys(column for run in runs for column in run.metrics.columns
                                  if column != "step" and run.metrics[column].notna().any()))
    if asked is None:
        return [name for name in DEFAULT_MEASURES if name in recorded]
    if not asked or len(set(asked)) != len(asked):
        raise ConfigError("--measures", f"expected distinct measures, got {list(asked)}")
    unknown = [name for name in asked if name not in recorded]
    if unknown:
        raise ConfigError("--measures", f"no run recorded {', '.join(unknown)}; recorded: "
                          f"{', '.join(recorded)}")
    return list(asked)


def compare(run_dirs: Sequence[str | Path], out: str | Path = "compare",
            measures: Sequence[str] | None = None) -> tuple[Path, Path]:
    """Draw the recorded ``measures`` of every run in ``run_dirs`` against the outer step, one
    panel per measure and one line per run (each run's theory limits dashed in its colour where
    its ``summary.json`` states them), and write ``OUT.png`` and ``OUT.pdf``; returns their
    paths. Everything is checked before anything is written (:class:`ConfigError` naming
    ``RUN_DIR``, ``--out`` or ``--measures``); a run still training is drawn as far as it got.
    """
    paths = [Path(p) for p in run_dirs]
    if not paths:
        raise ConfigError(RUN_ARGUMENT, "give at least one run directory")
    resolved = [p.resolve() for p in paths]
    twice = sorted({str(p) for p, r in zip(paths, resolved, strict=True)
                    if resolved.count(r) > 1})
    if twice:
        raise ConfigError(RUN_ARGUMENT, f"given twice: {', '.join(twice)}")
    png, pdf = figure_paths(out)
    read = [_read(p) for p in paths]
    labels = run_labels([name for name, *_ in read], [config for _, config, *_ in read])
    runs = [ComparedRun(label, metrics, stated_limits((summary or {}).get("theory")))
            for label, (_, _, metrics, summary) in zip(labels, read, strict=True)]
    drawn = _measures(measures, runs)
    figure = comparison_figure(runs, drawn, f"training curves of {len(runs)} runs")
    png.parent.mkdir(parents=True, exist_ok=True)
    for path in (png, pdf):
        atomic.write_figure(path, figure, dpi=130)
    return png, pdf
