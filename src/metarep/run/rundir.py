"""The run directory: the one owner of its format, for writing and for reading.

A run writes, atomically (:mod:`metarep.run.atomic`), into its directory:

- ``config.yaml``: the fully resolved config (values read from files filled in);
- ``metrics.csv``: one row per recorded step (``step`` first, then the measures);
- ``eval.csv``: ``method, shots, excess_risk, stderr, n_tasks, theory``;
- ``heldout.csv`` for a pool given ``tasks.test_from`` or ``tasks.test_split``: ``method,
  shots, risk, stderr, n_tasks``, the squared prediction error on held-out tasks;
- ``summary.json``: status, final measures next to the theory's predictions (and, for a pool
  file with ``B_star``, ``ground_truth``: where its sigma^2 and ``Sigma_star`` came from);
- ``params.npz``: the final state's arrays (``B, w`` and, for ``mtl``, the per-task ``heads``;
  a ReLU network's ``W1``, [``W2``], ``w``), ``B_star`` where known, and ``Sigma_star``;
- ``training.png`` and ``eval.png``: the training curves and the test risk against m_test;
- ``checkpoint.npz`` while it trains: the latest recorded state, step and records;
- ``error.json`` when it failed in a sweep: the error, its config key and traceback.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import yaml

from metarep.core.evaluation import EvalRow, HeldOutRow
from metarep.errors import ConfigError
from metarep.run import atomic
from metarep.run.schema import flatten

if TYPE_CHECKING:
    from matplotlib.figure import Figure

CONFIG, METRICS, EVAL, SUMMARY = "config.yaml", "metrics.csv", "eval.csv", "summary.json"
PARAMS, CHECKPOINT, ERROR = "params.npz", "checkpoint.npz", "error.json"
HELD_OUT = "heldout.csv"
TRAINING_FIGURE, EVAL_FIGURE = "training.png", "eval.png"
RUN_FILES = frozenset({CONFIG, METRICS, EVAL, SUMMARY, PARAMS, CHECKPOINT, ERROR, HELD_OUT,
                       TRAINING_FIGURE, EVAL_FIGURE})
"""Every file a run directory may hold (temporary files of atomic writes aside)."""
EVAL_COLUMNS = ["method", "shots", "excess_risk", "stderr", "n_tasks", "theory"]
HELD_OUT_COLUMNS = ["method", "shots", "risk", "stderr", "n_tasks"]


def check_output_dir(path: str | Path, key: str = "--out") -> Path:
    """``path`` as a directory that can be created or written, checked before any work:
    :class:`ConfigError` naming ``key`` when it is empty, when it or an existing ancestor is
    a file, or when the nearest existing ancestor (or itself) is not writable."""
    if str(path) == "":
        raise ConfigError(key, "must not be empty; give a directory")
    path = Path(path)
    for existing in (path, *path.parents):
        if not existing.exists():
            continue
        if not existing.is_dir():
            raise ConfigError(key, f"{existing} exists and is not a directory")
        if not os.access(existing, os.W_OK | os.X_OK):
            raise ConfigError(key, f"{existing} is not writable")
        break
    return path


@dataclass(frozen=True)
class Checkpoint:
    """The state of an interrupted run: its arrays, its step and its records so far."""

    arrays: dict[str, np.ndarray]
    step: int
    records: list[dict[str, float]]


@dataclass(frozen=True)
class RunData:
    """The outputs of one finished run, as read back: its name, its resolved config (the
    nested tree of ``config.yaml``), metrics, evaluation (``None`` without one), summary and
    final arrays."""

    name: str
    config: dict[str, Any]
    metrics: pd.DataFrame
    eval: pd.DataFrame | None
    summary: dict[str, Any]
    params: dict[str, np.ndarray]


class RunDirectory:
    """The files of one run at ``path`` (see the module docstring)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)

    def file(self, name: str) -> Path:
        return self.path / name

    # ------------------------------------------------------------------ writing

    def create(self) -> None:
        """Create the directory (whose path the caller checked with :func:`check_output_dir`,
        before ``Path`` turned an empty one into the current directory)."""
        self.path.mkdir(parents=True, exist_ok=True)

    def clear(self) -> None:
        """Remove every file of a run (:data:`RUN_FILES`), so that a run started again leaves
        no stale output of the one it replaces."""
        for name in RUN_FILES:
            self.file(name).unlink(missing_ok=True)

    def write_config(self, text: str) -> None:
        atomic.write_text(self.file(CONFIG), text)

    def write_metrics(self, records: list[dict[str, float]]) -> None:
        atomic.write_text(self.file(METRICS), pd.DataFrame(records).to_csv(index=False))

    def write_checkpoint(self, arrays: dict[str, np.ndarray], step: int,
                         records: list[dict[str, float]]) -> None:
        atomic.write_npz(self.file(CHECKPOINT), **arrays, step=np.array(step),
                         records=np.array(json.dumps(records)))

    def remove_checkpoint(self) -> None:
        self.file(CHECKPOINT).unlink(missing_ok=True)

    def write_eval(self, rows: list[EvalRow]) -> pd.DataFrame:
        """Write ``eval.csv`` (or, with no rows, remove any stale ``eval.csv`` and
        ``eval.png``); returns the table."""
        frame = pd.DataFrame([asdict(row) for row in rows], columns=EVAL_COLUMNS)
        if rows:
            atomic.write_text(self.file(EVAL), frame.to_csv(index=False))
        else:
            for stale in (EVAL, EVAL_FIGURE):
                self.file(stale).unlink(missing_ok=True)
        return frame

    def write_held_out(self, rows: list[HeldOutRow]) -> None:
        """Write ``heldout.csv`` (or, with no rows, remove a stale one)."""
        if rows:
            frame = pd.DataFrame([asdict(row) for row in rows], columns=HELD_OUT_COLUMNS)
            atomic.write_text(self.file(HELD_OUT), frame.to_csv(index=False))
        else:
            self.file(HELD_OUT).unlink(missing_ok=True)

    def write_params(self, arrays: dict[str, np.ndarray]) -> None:
        atomic.write_npz(self.file(PARAMS), **arrays)

    def write_summary(self, summary: dict[str, Any]) -> None:
        atomic.write_json(self.file(SUMMARY), summary)

    def write_figure(self, name: str, figure: Figure) -> None:
        atomic.write_figure(self.file(name), figure, dpi=120)

    def write_error(self, error: str, kind: str, key: str | None, overrides: dict[str, Any],
                    traceback: str | None) -> None:
        """``error.json`` of a failed run: the error's message and type, the config key at
        fault (or ``None``), the run's overrides and the traceback (``None`` for a dead
        worker)."""
        atomic.write_json(self.file(ERROR), {"status": "failed", "error": error, "type": kind,
                                             "key": key, "overrides": overrides,
                                             "traceback": traceback})

    # ------------------------------------------------------------------ reading

    def config_text(self) -> str | None:
        file = self.file(CONFIG)
        return file.read_text() if file.is_file() else None

    def config(self) -> dict[str, Any] | None:
        """The resolved config as flat dotted keys, or ``None`` when not written yet."""
        text = self.config_text()
        return None if text is None else flatten(yaml.safe_load(text))

    def checkpoint(self) -> Checkpoint | None:
        file = self.file(CHECKPOINT)
        if not file.is_file():
            return None
        with np.load(file, allow_pickle=False) as data:
            arrays = {name: data[name] for name in data.files if name not in ("step", "records")}
            return Checkpoint(arrays, int(data["step"]), json.loads(str(data["records"])))

    def summary(self) -> dict[str, Any] | None:
        """``summary.json``, or ``None`` when not written yet; :class:`ConfigError` ``DIR``
        when it is corrupt (not JSON, not an object, ``final`` not an object)."""
        file = self.file(SUMMARY)
        if not file.is_file():
            return None
        try:
            data = json.loads(file.read_bytes())
        except (OSError, ValueError, RecursionError) as error:
            why = "nested too deeply" if isinstance(error, RecursionError) else error
            raise ConfigError("DIR", f"{file} is corrupt ({why}); it cannot be read") from None
        if not isinstance(data, dict) or not isinstance(data.get("final", {}), dict | None):
            raise ConfigError("DIR", f"{file} is corrupt (not a run summary: a JSON object "
                              "with an object 'final'); it cannot be read")
        return data

    def error(self) -> dict[str, Any] | None:
        """``error.json``, or ``None`` when the run did not fail; :class:`ConfigError` ``DIR``
        when it is corrupt (not JSON, not an object, no ``error`` text)."""
        file = self.file(ERROR)
        if not file.is_file():
            return None
        try:
            data = json.loads(file.read_bytes())
        except (OSError, ValueError, RecursionError) as error:
            why = "nested too deeply" if isinstance(error, RecursionError) else error
            raise ConfigError("DIR", f"{file} is corrupt ({why}); it cannot be read") from None
        if not isinstance(data, dict) or not isinstance(data.get("error"), str):
            raise ConfigError("DIR", f"{file} is corrupt (not a run failure: a JSON object "
                              "with an 'error' text); it cannot be read")
        return data

    def eval_table(self) -> pd.DataFrame | None:
        file = self.file(EVAL)
        return pd.read_csv(file) if file.is_file() else None

    def occupant(self) -> str:
        """What the directory holds: ``new`` (absent or empty), ``finished`` (a summary),
        ``interrupted`` (a checkpoint and no summary), ``partial`` (other run files only: a
        run that stopped before its first checkpoint) or ``foreign`` (a file that is not a
        run's; :data:`RUN_FILES`, temporary files of atomic writes aside)."""
        if not self.path.is_dir():
            return "new"
        names = {p.name for p in self.path.iterdir() if not atomic.is_temporary(p)}
        if names - RUN_FILES:
            return "foreign"
        if SUMMARY in names:
            return "finished"
        if CHECKPOINT in names:
            return "interrupted"
        return "partial" if names else "new"

    def status(self) -> str | None:
        """``done`` or ``failed`` for a finished run directory of a sweep, ``None`` if the
        run is not there."""
        if not self.path.is_dir():
            return None
        return "failed" if self.file(ERROR).is_file() else "done"

    def read(self) -> RunData | None:
        """A finished run's outputs, or ``None`` if it did not finish."""
        summary = self.summary()
        if summary is None or summary.get("status") != "done":
            return None
        with np.load(self.file(PARAMS)) as data:
            params = {key: data[key] for key in data.files}
        return RunData(self.path.name, yaml.safe_load(self.config_text() or "{}"),
                       pd.read_csv(self.file(METRICS)), self.eval_table(), summary, params)
