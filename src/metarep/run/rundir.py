"""The run directory: the one owner of its format, for writing and for reading.

A run writes, atomically (:mod:`metarep.run.atomic`), into its directory:

- ``config.yaml``: the fully resolved config (values read from files filled in);
- ``metrics.csv``: one row per recorded step (``step`` first, then the measures);
- ``eval.csv``: ``method, shots, excess_risk, stderr, n_tasks, theory``;
- ``eval_steps.csv`` for ``eval.at_steps``: the same columns after ``step``, the evaluation
  of the model at each of those training steps, written as training passes them;
- ``heldout.csv`` for a pool given ``tasks.test_from`` or ``tasks.test_split``: ``method,
  shots, risk, stderr, n_tasks``, the squared prediction error on held-out tasks;
- ``summary.json``: status, final measures next to the theory's predictions (and, for a pool
  file with ``B_star``, ``ground_truth``: where its sigma^2 and ``Sigma_star`` came from);
- ``params.npz``: the final state's arrays (``B, w`` and, for ``mtl``, the per-task ``heads``;
  a ReLU network's ``W1``, [``W2``], ``w``), ``B_star`` where known, and ``Sigma_star``;
- ``training.png`` and ``eval.png``: the training curves and the test risk against m_test;
- ``checkpoint.npz`` while it trains: the exact training state at the latest checkpointed
  record, its step and how many rows of ``metrics.csv`` it stands for (the records are not
  copied into it: ``metrics.csv`` grows by appended rows, the checkpoint stays the size of
  the state);
- ``error.json`` when it failed in a sweep: the error, its config key and traceback;
- ``tb/``, ``wandb/`` and ``mlruns/`` for the logging sinks of ``log.sinks``
  (:mod:`metarep.run.sinks`).
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import shutil
import zipfile
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import yaml

from metarep.core.evaluation import EvalRow, HeldOutRow
from metarep.errors import ConfigError
from metarep.run import atomic
from metarep.run.schema import flatten

if TYPE_CHECKING:
    import pandas as pd
    from matplotlib.figure import Figure

CONFIG, METRICS, EVAL, SUMMARY = "config.yaml", "metrics.csv", "eval.csv", "summary.json"
PARAMS, CHECKPOINT, ERROR = "params.npz", "checkpoint.npz", "error.json"
HELD_OUT = "heldout.csv"
EVAL_STEPS = "eval_steps.csv"
TRAINING_FIGURE, EVAL_FIGURE = "training.png", "eval.png"
RUN_FILES = frozenset({CONFIG, METRICS, EVAL, SUMMARY, PARAMS, CHECKPOINT, ERROR, HELD_OUT,
                       EVAL_STEPS, TRAINING_FIGURE, EVAL_FIGURE})
"""Every file a run directory may hold (temporary files of atomic writes aside)."""
TENSORBOARD_DIR, WANDB_DIR, MLFLOW_DIR = "tb", "wandb", "mlruns"
SINK_DIRS = frozenset({TENSORBOARD_DIR, WANDB_DIR, MLFLOW_DIR})
"""The directories of the logging sinks (:mod:`metarep.run.sinks`) a run directory may hold."""
EVAL_COLUMNS = ["method", "shots", "excess_risk", "stderr", "n_tasks", "theory"]
HELD_OUT_COLUMNS = ["method", "shots", "risk", "stderr", "n_tasks"]
EVAL_STEPS_COLUMNS = ["step", *EVAL_COLUMNS]


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


CHECKPOINT_FORMAT = 2
"""The layout of ``checkpoint.npz``: the state's arrays, ``step``, ``n_records``, ``format``."""
CHECKPOINT_FIELDS = ("step", "n_records", "format")


@dataclass(frozen=True)
class Checkpoint:
    """The state of an interrupted run: its arrays at ``step``, where the first ``n_records``
    rows of ``metrics.csv`` (the last one at ``step``) are its records."""

    arrays: dict[str, np.ndarray]
    step: int
    n_records: int


def corrupt_file(file: Path, why: str) -> ConfigError:
    """The refusal of a damaged file of an interrupted run (which ``--resume`` would need)."""
    return ConfigError("--resume", f"{file} is corrupt ({why}); --force starts the run "
                       "again")


def _count(value: np.ndarray, name: str, file: Path) -> int:
    """A non-negative integer scalar of a checkpoint, or :func:`corrupt_file`."""
    if value.shape != () or not np.issubdtype(value.dtype, np.integer) or int(value) < 0:
        raise corrupt_file(file, f"{name!r} is not a non-negative integer")
    return int(value)


@dataclass(frozen=True)
class RunData:
    """The outputs of one finished run, as read back: its name, its resolved config (the
    nested tree of ``config.yaml``), metrics, evaluation (``None`` without one), summary,
    final arrays, and the evaluations during training (``eval.at_steps``; ``None`` without
    any)."""

    name: str
    config: dict[str, Any]
    metrics: pd.DataFrame
    eval: pd.DataFrame | None
    summary: dict[str, Any]
    params: dict[str, np.ndarray]
    eval_steps: pd.DataFrame | None = None


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

    def remove_temporaries(self) -> None:
        """Remove the temporary files of atomic writes that were killed half way."""
        for path in self.path.iterdir():
            if atomic.is_temporary(path) and path.is_file():
                path.unlink(missing_ok=True)

    def clear(self) -> None:
        """Remove every file of a run (:data:`RUN_FILES`) and its sinks' directories
        (:data:`SINK_DIRS`), so that a run started again leaves no stale output of the one it
        replaces."""
        for name in RUN_FILES:
            self.file(name).unlink(missing_ok=True)
        for name in SINK_DIRS:
            shutil.rmtree(self.file(name), ignore_errors=True)

    def write_config(self, text: str) -> None:
        atomic.write_text(self.file(CONFIG), text)

    def write_metrics(self, records: list[dict[str, float]]) -> None:
        """Write ``metrics.csv`` whole (atomically): one row per record, ``step`` first."""
        atomic.write_text(self.file(METRICS), csv_text(records))

    def metrics_size(self) -> int:
        """The size of ``metrics.csv`` in bytes (0 when absent)."""
        file = self.file(METRICS)
        return file.stat().st_size if file.is_file() else 0

    def append_metrics(self, rows: list[dict[str, float]], offset: int) -> int:
        """Write ``rows`` into ``metrics.csv`` from byte ``offset`` (the end of the rows
        written so far; 0: a new file, with its header), cutting whatever lies beyond it (a
        write torn by a signal or a full disk), and flush them to the disk, so that a
        checkpoint written next may count them. Returns the new end."""
        text = csv_text(rows, header=offset == 0).encode()
        file = self.file(METRICS)
        with atomic.named_errors(file), \
                open(file, "r+b" if offset and file.is_file() else "wb") as handle:
            handle.seek(offset)
            handle.truncate()
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        return offset + len(text)

    def write_checkpoint(self, arrays: dict[str, np.ndarray], step: int,
                         n_records: int) -> None:
        """Write ``checkpoint.npz`` (atomically): the state ``arrays`` at ``step``, standing
        for the first ``n_records`` rows of ``metrics.csv``."""
        atomic.write_npz(self.file(CHECKPOINT), **arrays, step=np.array(step),
                         n_records=np.array(n_records), format=np.array(CHECKPOINT_FORMAT))

    def remove_checkpoint(self) -> None:
        self.file(CHECKPOINT).unlink(missing_ok=True)

    def write_eval(self, rows: list[EvalRow]) -> None:
        """Write ``eval.csv`` (or, with no rows, remove any stale ``eval.csv`` and
        ``eval.png``)."""
        if rows:
            atomic.write_text(self.file(EVAL), csv_text([asdict(row) for row in rows],
                                                        EVAL_COLUMNS))
        else:
            for stale in (EVAL, EVAL_FIGURE):
                self.file(stale).unlink(missing_ok=True)

    def write_eval_at(self, step: int, rows: list[EvalRow]) -> None:
        """Put ``rows``, the evaluation at training step ``step``, into ``eval_steps.csv`` (the
        rows of ``eval.csv`` with a first column ``step``), replacing any rows of that step
        (a resumed run evaluates a step again, to the same numbers) and keeping the others,
        by step; written atomically."""
        kept = [row for row in self._eval_steps_rows() if int(row["step"]) != step]
        new = [{"step": step, **asdict(row)} for row in rows]
        ordered = sorted(kept + new, key=lambda row: int(row["step"]))  # stable: rows in order
        atomic.write_text(self.file(EVAL_STEPS), csv_text(ordered, EVAL_STEPS_COLUMNS))

    def _eval_steps_rows(self) -> list[dict[str, str]]:
        """The rows of ``eval_steps.csv`` as text, or none without the file."""
        file = self.file(EVAL_STEPS)
        if not file.is_file():
            return []
        with file.open(newline="") as stream:
            return list(csv.DictReader(stream))

    def evaluated_steps(self) -> set[int]:
        """The training steps ``eval_steps.csv`` holds rows of."""
        return {int(row["step"]) for row in self._eval_steps_rows()}

    def write_held_out(self, rows: list[HeldOutRow]) -> None:
        """Write ``heldout.csv`` (or, with no rows, remove a stale one)."""
        if rows:
            atomic.write_text(self.file(HELD_OUT), csv_text([asdict(row) for row in rows],
                                                            HELD_OUT_COLUMNS))
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
        """``checkpoint.npz`` (``None`` if absent), checked as a container: a readable
        archive of this format with ``step`` and ``n_records`` (non-negative integers) and
        state arrays of finite real numbers. Whether the arrays fit the run is for its
        backend to check. Raises :class:`ConfigError` ``--resume`` when it is corrupt."""
        file = self.file(CHECKPOINT)
        if not file.is_file():
            return None
        try:
            with open(file, "rb") as handle, np.load(handle, allow_pickle=False) as data:
                loaded = {name: data[name] for name in data.files}
        except (OSError, ValueError, EOFError, zipfile.BadZipFile) as error:
            raise corrupt_file(file, f"not a readable .npz: {error}") from None
        missing = [name for name in CHECKPOINT_FIELDS if name not in loaded]
        if missing:
            raise corrupt_file(file, f"no {', '.join(missing)}")
        if _count(loaded["format"], "format", file) != CHECKPOINT_FORMAT:
            raise corrupt_file(file, f"format {int(loaded['format'])}, this version reads "
                           f"{CHECKPOINT_FORMAT}")
        arrays = {name: a for name, a in loaded.items() if name not in CHECKPOINT_FIELDS}
        for name, array in arrays.items():
            if not (np.issubdtype(array.dtype, np.floating)
                    or np.issubdtype(array.dtype, np.integer)) or not np.isfinite(array).all():
                raise corrupt_file(file, f"array {name!r} does not hold finite real numbers")
        return Checkpoint(arrays, _count(loaded["step"], "step", file),
                          _count(loaded["n_records"], "n_records", file))

    def recorded_metrics(self, checkpoint: Checkpoint) -> list[dict[str, float]]:
        """The records ``checkpoint`` stands for: the first ``n_records`` rows of
        ``metrics.csv``, checked (a header with ``step`` first, complete rows of numbers,
        steps increasing, the last at the checkpoint's step). Rows after them (appended
        after the checkpoint, or torn by a crash) are ignored (:meth:`keep_metrics` cuts
        them). Raises :class:`ConfigError` ``--resume`` when the file cannot back the
        checkpoint."""
        file, n = self.file(METRICS), checkpoint.n_records
        try:
            lines = file.read_text().splitlines()
        except (OSError, UnicodeDecodeError) as error:
            raise corrupt_file(file, f"cannot be read: {error}") from None
        if len(lines) < n + 1:
            raise corrupt_file(file, f"{max(len(lines) - 1, 0)} rows, the checkpoint stands "
                               f"for {n}")
        columns = lines[0].split(",")
        if columns[0] != "step" or len(set(columns)) != len(columns):
            raise corrupt_file(file, "its header does not start with step")
        records = [_record(line, columns, file) for line in lines[1:n + 1]]
        steps = [record["step"] for record in records]
        if steps != sorted(set(steps)) or (records and steps[-1] != checkpoint.step):
            raise corrupt_file(file, f"its steps do not end at the checkpoint's step "
                           f"{checkpoint.step} in increasing order")
        return records

    def keep_metrics(self, n_records: int) -> None:
        """Cut ``metrics.csv`` to its header and first ``n_records`` rows (atomically)."""
        lines = self.file(METRICS).read_text().splitlines()
        if len(lines) > n_records + 1:
            atomic.write_text(self.file(METRICS), "\n".join(lines[:n_records + 1]) + "\n")

    def metrics(self) -> pd.DataFrame | None:
        """``metrics.csv`` as a table (one row per record), or ``None`` when not written yet;
        a file that is not such a table is refused (:class:`ConfigError` naming ``DIR``)."""
        import pandas as pd  # only where tables are read: a run writes without it

        file = self.file(METRICS)
        if not file.is_file():
            return None
        try:
            table = pd.read_csv(file)
        except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as error:
            raise ConfigError("DIR", f"{file} is corrupt (not a table of records: "
                              f"{type(error).__name__})") from None
        if "step" not in table.columns or not all(
                pd.api.types.is_numeric_dtype(table[c]) for c in table.columns):
            raise ConfigError("DIR", f"{file} is corrupt (not a table of records: a step "
                              "column and numbers)")
        return table

    def summary(self) -> dict[str, Any] | None:
        """``summary.json``, or ``None`` when not written yet; :class:`ConfigError` ``DIR``
        when it is corrupt (not JSON, not an object, ``final`` not an object)."""
        data = self._json(SUMMARY)
        if data is not None and not isinstance(data.get("final", {}), dict | None):
            raise ConfigError("DIR", f"{self.file(SUMMARY)} is corrupt (not a run summary: "
                              "its 'final' is not an object); it cannot be read")
        return data

    def error(self) -> dict[str, Any] | None:
        """``error.json``, or ``None`` when the run did not fail; :class:`ConfigError` ``DIR``
        when it is corrupt (not JSON, not an object, no ``error`` text)."""
        data = self._json(ERROR)
        if data is not None and not isinstance(data.get("error"), str):
            raise ConfigError("DIR", f"{self.file(ERROR)} is corrupt (not a run failure: no "
                              "'error' text); it cannot be read")
        return data

    def _json(self, name: str) -> dict[str, Any] | None:
        """The JSON object in file ``name``, ``None`` when absent; :class:`ConfigError`
        ``DIR`` when it is not readable JSON or not an object."""
        file = self.file(name)
        if not file.is_file():
            return None
        try:
            data = json.loads(file.read_bytes())
        except (OSError, ValueError, RecursionError) as error:
            why = "nested too deeply" if isinstance(error, RecursionError) else error
            raise ConfigError("DIR", f"{file} is corrupt ({why}); it cannot be read") from None
        if not isinstance(data, dict):
            raise ConfigError("DIR", f"{file} is corrupt (not a JSON object); it cannot be "
                              "read")
        return data

    def eval_table(self) -> pd.DataFrame | None:
        import pandas as pd

        file = self.file(EVAL)
        return pd.read_csv(file) if file.is_file() else None

    def eval_steps_table(self) -> pd.DataFrame | None:
        """``eval_steps.csv`` (``eval.at_steps``), or ``None`` without one."""
        import pandas as pd

        file = self.file(EVAL_STEPS)
        return pd.read_csv(file) if file.is_file() else None

    def occupant(self) -> str:
        """What the directory holds: ``new`` (absent or empty), ``finished`` (a summary),
        ``interrupted`` (a checkpoint and no summary), ``partial`` (other run files only: a
        run that stopped before its first checkpoint) or ``foreign`` (a file that is not a
        run's; :data:`RUN_FILES` and :data:`SINK_DIRS`, temporary files of atomic writes
        aside)."""
        if not self.path.is_dir():
            return "new"
        names = {p.name for p in self.path.iterdir() if not atomic.is_temporary(p)}
        if names - RUN_FILES - SINK_DIRS:
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
        import pandas as pd

        summary = self.summary()
        if summary is None or summary.get("status") != "done":
            return None
        with np.load(self.file(PARAMS)) as data:
            params = {key: data[key] for key in data.files}
        return RunData(self.path.name, yaml.safe_load(self.config_text() or "{}"),
                       pd.read_csv(self.file(METRICS)), self.eval_table(), summary, params,
                       self.eval_steps_table())


def csv_text(rows: Sequence[Mapping[str, Any]], columns: Sequence[str] | None = None,
             header: bool = True) -> str:
    """``rows`` as CSV text, as ``pandas.DataFrame(rows, columns=columns).to_csv(index=False,
    header=header)`` writes it: the columns in the order given, else in the order the rows
    first name them; a missing, ``None`` or NaN cell empty; numbers at full precision (the
    shortest text that reads back to the same value); fields quoted only where needed. (A
    column of float32 numbers alone, which pandas writes at float32's shortest text, is
    written at its exact value.)"""
    names = list(columns) if columns is not None else list(
        dict.fromkeys(name for row in rows for name in row))
    text = io.StringIO()
    writer = csv.writer(text, lineterminator="\n")
    if header:
        writer.writerow(names)
    writer.writerows([_cell(row.get(name)) for name in names] for row in rows)
    return text.getvalue()


def _cell(value: Any) -> str:
    """One CSV field: ``None`` and NaN empty, booleans ``True``/``False``, integers as
    integers, floats (numpy's of any precision too) as the shortest text that reads back to
    the same float64 value."""
    if value is None or (isinstance(value, float | np.floating) and math.isnan(value)):
        return ""
    if isinstance(value, bool | np.bool_):
        return str(bool(value))
    if isinstance(value, float | np.floating):
        return repr(float(value))
    return str(value)


def _record(line: str, columns: list[str], file: Path) -> dict[str, float]:
    """One row of ``metrics.csv`` as the record it was written from (``step`` an integer,
    the measures floats read back exactly; an empty field is ``nan``)."""
    fields = line.split(",")
    if len(fields) != len(columns):
        raise corrupt_file(file, f"a row has {len(fields)} fields for {len(columns)} columns")
    try:
        values = [math.nan if field == "" else float(field) for field in fields]
    except ValueError:
        raise corrupt_file(file, f"a row holds something that is not a number: {line[:60]!r}") \
            from None
    step = values[0]
    if not (math.isfinite(step) and step == int(step) and step >= 0):
        raise corrupt_file(file, f"a row's step is not an integer: {fields[0]!r}")
    return {"step": int(step), **dict(zip(columns[1:], values[1:], strict=True))}
