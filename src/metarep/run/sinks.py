"""Logging sinks (``log.sinks``): a run's records, config and summary, also in TensorBoard,
Weights & Biases or MLflow, inside the run directory.

``metrics.csv`` stays the source of truth; a sink is a copy of it for watching runs in the
tool of one's choice. Each sink writes, into the run directory,

- ``tensorboard`` (``tb/``): one event file; every measure a scalar summary at its step, held
  as a float64 tensor (read back exactly, where ``simple_value`` would round to float32); the
  resolved config as hyperparameters (the ``hparams`` plugin's session start); the final
  summary as the text summary ``summary`` (its JSON) at the last step;
- ``wandb`` (``wandb/offline-run-*``): an offline run (unless ``WANDB_MODE`` says otherwise):
  one history row per record (``_step`` = the step), the resolved config as the run's config
  (nested by section) and the final summary in the run's summary;
- ``mlflow`` (``mlruns/``): a local MLflow file store with one run: every measure a metric at
  its step, the resolved config as params (dotted keys), the final summary as tags, one per
  leaf of ``summary.json`` (``summary.final.perp_norm``, ``summary.theory.lambda_star.0.0``;
  text as :func:`param_text` writes it: tags survive the run directory being moved, as a
  sweep's is when complete, where MLflow's artifacts are found by an absolute path), and the
  run's status (``FINISHED``, ``FAILED`` for a diverged run, ``KILLED`` for one stopped
  before its summary).

A run of a sweep is its own logged run, grouped by the sweep's name (W&B ``group``; MLflow:
the experiment's name and the tag ``metarep.sweep``; TensorBoard: ``tensorboard --logdir
SWEEP`` shows every run's ``tb/`` under its directory). Where a run is resumed, every sink
is written again from the records ``metrics.csv`` holds at the checkpoint, then goes on: it
holds each step once, and no step that ``metrics.csv`` dropped, whatever an interrupted
attempt had logged (or lost in a buffer) before it stopped.

Each library is imported only when its sink opens; :func:`check_installed` refuses a sink
whose library is missing before a run writes anything.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import time
import uuid
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from metarep.errors import ConfigError
from metarep.run.rundir import MLFLOW_DIR, TENSORBOARD_DIR, WANDB_DIR
from metarep.run.schema import Config, flatten, to_dict

MODULES = {"tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow"}
"""The module each sink needs, from the extra of its name (``pip install metarep[wandb]``)."""
WANDB_PROJECT = "metarep"
"""The W&B project of the runs (``WANDB_PROJECT`` overrides it)."""
SUMMARY_TAG = "summary"
"""The TensorBoard text summary of the summary, and the prefix of its MLflow tags."""
MLFLOW_BATCH = 100
"""The most params, metrics or tags sent to MLflow in one call (its limit for params)."""
TENSORBOARD_FLUSH_SECONDS = 10
"""TensorBoard's event file is flushed at least this often while a run trains."""
EXACT_INTEGER = 2**53
"""Integers up to this size are exact as a float64 (a TensorBoard hyperparameter number)."""

Record = Mapping[str, float]


@dataclass(frozen=True)
class RunIdentity:
    """How a run is named in the sinks: ``name`` (a run of a sweep: its directory's name) and
    ``group``, the sweep's name (``None`` for a run of its own)."""

    name: str
    group: str | None = None


class Sink(Protocol):
    """One logging library's copy of a run."""

    def open(self, config: Config, run_dir: Path, identity: RunIdentity) -> None:
        """Start a new logged run of ``config`` in ``run_dir`` (replacing this sink's files
        there, if any), holding ``config`` as its hyperparameters."""
        ...

    def log(self, step: int, measures: Record) -> None:
        """Log the measures recorded at ``step``."""
        ...

    def close(self, summary: Mapping[str, Any] | None) -> None:
        """Write the final ``summary`` (that of ``summary.json``; ``None``: the run stopped
        before one) and finish."""
        ...


def check_installed(sinks: Sequence[str]) -> None:
    """Raise :class:`ConfigError` ``log.sinks`` for a sink whose library is not installed
    (without importing it)."""
    for name in sinks:
        if importlib.util.find_spec(MODULES[name]) is None:
            raise ConfigError("log.sinks", f"{name} needs its library: pip install "
                              f"'metarep[{name}]'")


def param_text(value: Any) -> str:
    """A config value as text: a string as it is, anything else as JSON (``5``, ``0.5``,
    ``true``, ``null``, ``[5, 10]``, ``Infinity``)."""
    return value if isinstance(value, str) else json.dumps(value)


def hyperparameters(config: Config) -> dict[str, Any]:
    """The resolved config as ``{dotted key: value}`` (lists as lists)."""
    return flatten(to_dict(config))


def _fresh(directory: Path) -> Path:
    """``directory``, emptied of an earlier attempt's files."""
    shutil.rmtree(directory, ignore_errors=True)
    directory.mkdir(parents=True)
    return directory


# ----------------------------------------------------------------------------- TensorBoard


def _tensorboard_value(value: Any) -> bool | float | str:
    """A hyperparameter as TensorBoard holds it: a bool, a float64 number (integers while
    exact) or text (:func:`param_text`)."""
    if isinstance(value, bool | str):
        return value
    if isinstance(value, float) or (isinstance(value, int) and abs(value) <= EXACT_INTEGER):
        return float(value)
    return param_text(value)


class TensorBoardSink:
    """``tb/``: scalars as float64 tensors, hparams, the summary as text (module docstring)."""

    def open(self, config: Config, run_dir: Path, identity: RunIdentity) -> None:
        from tensorboard.plugins.hparams import summary_v2
        from tensorboard.summary.writer.event_file_writer import EventFileWriter

        self.writer = EventFileWriter(str(_fresh(run_dir / TENSORBOARD_DIR)),
                                      flush_secs=TENSORBOARD_FLUSH_SECONDS)
        values = {key: _tensorboard_value(value)
                  for key, value in hyperparameters(config).items()}
        self._write(0, summary_v2.hparams_pb(values, trial_id=identity.name))

    def _write(self, step: int, summary: Any) -> None:
        from tensorboard.compat.proto import event_pb2

        self.writer.add_event(event_pb2.Event(wall_time=time.time(), step=step,
                                              summary=summary))

    def log(self, step: int, measures: Record) -> None:
        from tensorboard.compat.proto import summary_pb2, tensor_pb2, types_pb2
        from tensorboard.plugins.scalar import metadata

        values = [summary_pb2.Summary.Value(
            tag=name, metadata=metadata.create_summary_metadata(display_name=name,
                                                                description=""),
            tensor=tensor_pb2.TensorProto(dtype=types_pb2.DT_DOUBLE, double_val=[value]))
            for name, value in measures.items()]
        self._write(step, summary_pb2.Summary(value=values))

    def close(self, summary: Mapping[str, Any] | None) -> None:
        from tensorboard.compat.proto import summary_pb2, tensor_pb2, types_pb2
        from tensorboard.plugins.text import metadata

        if summary is not None:
            text = json.dumps(summary, indent=2).encode()
            value = summary_pb2.Summary.Value(
                tag=SUMMARY_TAG, metadata=metadata.create_summary_metadata(
                    display_name=SUMMARY_TAG, description="summary.json"),
                tensor=tensor_pb2.TensorProto(dtype=types_pb2.DT_STRING, string_val=[text]))
            self._write(summary["step"], summary_pb2.Summary(value=[value]))
        self.writer.close()


# ----------------------------------------------------------------------------- W&B


def wandb_mode() -> str:
    """``WANDB_MODE`` where the user set it, else ``offline``: nothing leaves the machine
    unless asked."""
    return os.environ.get("WANDB_MODE") or "offline"


def wandb_run_ids(directory: Path) -> list[str]:
    """The ids of the W&B runs under ``directory`` (``wandb/``), from their ``run-ID.wandb``
    files."""
    return sorted({file.stem.removeprefix("run-") for file in directory.glob("*/run-*.wandb")})


class WandbSink:
    """``wandb/``: an offline run by default (module docstring). A resumed run keeps its id,
    so that ``wandb sync`` uploads it as the same run."""

    def open(self, config: Config, run_dir: Path, identity: RunIdentity) -> None:
        os.environ.setdefault("WANDB_ERROR_REPORTING", "false")  # no crash reports sent
        import wandb

        directory = run_dir / WANDB_DIR
        earlier = wandb_run_ids(directory)
        run_id = earlier[0] if len(earlier) == 1 else uuid.uuid4().hex[:8]
        mode = wandb_mode()
        settings = wandb.Settings(silent=True, console="off", disable_git=True,
                                  save_code=False, x_disable_stats=True, x_disable_meta=True,
                                  x_disable_machine_info=True, x_save_requirements=False)
        self.run = wandb.init(
            dir=str(_fresh(directory).parent), mode=mode, id=run_id, name=identity.name,
            group=identity.group, project=os.environ.get("WANDB_PROJECT", WANDB_PROJECT),
            config=to_dict(config), settings=settings, reinit="create_new",
            resume=None if mode == "offline" else "allow")

    def log(self, step: int, measures: Record) -> None:
        self.run.log(dict(measures), step=step)

    def close(self, summary: Mapping[str, Any] | None) -> None:
        """Finish the run, and wait until its files are written: ``finish`` returns before
        W&B's service has written the run's ``.wandb`` file, which it does when it closes.
        Where no other W&B run is active in this process, the service is closed
        (``wandb.teardown``, which waits for it); otherwise the last run to finish does it."""
        import wandb

        if summary is not None:
            self.run.summary.update(dict(summary))
        self.run.finish(exit_code=0 if summary is not None and summary["status"] == "done"
                        else 1)
        if wandb.setup().most_recent_active_run is None:
            wandb.teardown()


# ----------------------------------------------------------------------------- MLflow


MLFLOW_STATUS = {"done": "FINISHED", "diverged": "FAILED"}
"""The MLflow run status of a summary's status (a run without a summary: ``KILLED``)."""


def _batches(items: Sequence[Any]) -> Iterator[Sequence[Any]]:
    for start in range(0, len(items), MLFLOW_BATCH):
        yield items[start:start + MLFLOW_BATCH]


def leaves(value: Any, path: str = "") -> Iterator[tuple[str, Any]]:
    """The leaves of a JSON value with their dotted paths (list items by their index):
    ``{"final": {"step": 3}, "shots": [5]}`` gives ``("final.step", 3), ("shots.0", 5)``."""
    if isinstance(value, Mapping) and value:
        for key, item in value.items():
            yield from leaves(item, f"{path}.{key}" if path else str(key))
    elif isinstance(value, list) and value:
        for i, item in enumerate(value):
            yield from leaves(item, f"{path}.{i}")
    else:
        yield path, value


def now_ms() -> int:
    """The time in milliseconds, as MLflow stamps its entities."""
    return int(time.time() * 1000)


class MlflowSink:
    """``mlruns/``: a local file store with one run (module docstring); its experiment is
    named after the sweep (or the config, for a run of its own).

    It writes through MLflow's ``FileStore``, made anew for each run: ``MlflowClient`` caches
    one store per URI for the life of the process, which goes stale once a restarted or
    resumed run has replaced the directory. MLflow 3 keeps the file store in maintenance
    mode behind ``MLFLOW_ALLOW_FILE_STORE``, set here unless the user set it."""

    def open(self, config: Config, run_dir: Path, identity: RunIdentity) -> None:
        os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        from mlflow.entities import Param, RunTag
        from mlflow.store.tracking.file_store import FileStore

        root = run_dir.resolve() / MLFLOW_DIR
        shutil.rmtree(root, ignore_errors=True)
        self.store = FileStore(str(root))
        experiment = self.store.create_experiment(identity.group or config.name)
        tags = {"metarep.config": config.name,
                **({"metarep.sweep": identity.group} if identity.group else {})}
        run = self.store.create_run(experiment, user_id="unknown", start_time=now_ms(),
                                    tags=[RunTag(key, value) for key, value in tags.items()],
                                    run_name=identity.name)
        self.run_id = run.info.run_id
        params = [Param(key, param_text(value))
                  for key, value in hyperparameters(config).items()]
        for batch in _batches(params):
            self.store.log_batch(self.run_id, metrics=[], params=list(batch), tags=[])

    def log(self, step: int, measures: Record) -> None:
        from mlflow.entities import Metric

        metrics = [Metric(name, value, now_ms(), step) for name, value in measures.items()]
        for batch in _batches(metrics):
            self.store.log_batch(self.run_id, metrics=list(batch), params=[], tags=[])

    def close(self, summary: Mapping[str, Any] | None) -> None:
        from mlflow.entities import RunStatus, RunTag

        status = "KILLED"
        if summary is not None:
            tags = [RunTag(f"{SUMMARY_TAG}.{path}", param_text(value))
                    for path, value in leaves(summary)]
            for batch in _batches(tags):
                self.store.log_batch(self.run_id, metrics=[], params=[], tags=list(batch))
            status = MLFLOW_STATUS.get(summary["status"], "FAILED")
        self.store.update_run_info(self.run_id, RunStatus.from_string(status), now_ms(), None)


# ----------------------------------------------------------------------------- the set


SINKS: dict[str, type[Sink]] = {"tensorboard": TensorBoardSink, "wandb": WandbSink,
                                "mlflow": MlflowSink}


def measures_of(record: Record) -> tuple[int, dict[str, float]]:
    """A record of ``metrics.csv`` as its step and its measures (floats)."""
    return int(record["step"]), {name: float(value) for name, value in record.items()
                                 if name != "step"}


class Sinks:
    """The sinks of one run (``config.log.sinks``; none: every call does nothing)."""

    def __init__(self, sinks: Sequence[Sink]):
        self.sinks, self.closed = list(sinks), False

    @classmethod
    def open(cls, config: Config, run_dir: Path, identity: RunIdentity,
             records: Sequence[Record] = ()) -> Sinks:
        """Open the sinks of ``config`` in ``run_dir`` and log ``records`` (those of a
        resumed run) into them. A sink that fails to open closes the ones opened before."""
        opened = cls([])
        try:
            for name in config.log.sinks:
                sink = SINKS[name]()
                sink.open(config, run_dir, identity)
                opened.sinks.append(sink)
            for record in records:
                opened.log(record)
        except BaseException:
            opened.close(None)
            raise
        return opened

    def log(self, record: Record) -> None:
        """Log one record (``{"step": t, **measures}``) into every sink."""
        if self.sinks:
            step, measures = measures_of(record)
            for sink in self.sinks:
                sink.log(step, measures)

    def close(self, summary: Mapping[str, Any] | None) -> None:
        """Close every sink with ``summary`` (``None``: the run stopped before one), once."""
        if self.closed:
            return
        self.closed = True
        for sink in self.sinks:
            sink.close(summary)
