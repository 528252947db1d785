"""Sweeps: many runs of one base config, resumable, on a process pool or a Ray cluster.

A sweep file (YAML) has

- ``base``: a built-in config name or a YAML path (relative to the sweep file, or else to the
  current directory);
- ``set``: dotted keys fixed for every run (optional);
- ``grid``: dotted key -> list of values; every combination is run;
- ``zip``: dotted key -> lists of one common length, taken together (row ``j`` of every list);
- ``seeds``: a list of seeds ``s``; every run is repeated for each ``s``, which is applied to
  every key of ``seed_keys`` (default: every ``*.seed`` key). Equal values are safe: each
  seed key draws from its own stream (:mod:`metarep.seeding`).

The runs are the product grid x zip rows x seeds, in that order. Each run's directory is
named from the values that vary across the sweep (``width=5,outer_lr=0.02,seed=1``) and holds
exactly what ``metarep run`` writes; a failed run (bad config cell, divergence, crash) holds
``error.json`` (and whatever the run wrote before failing). A run directory is written under
a temporary name and renamed into place when complete, so a directory with a run's name is
always a finished run: re-running the sweep skips finished runs, deletes leftover temporary
directories and redoes the rest. ``sweep.json`` records the sweep and its runs; ``collect``
turns the directory into one tidy table and a plot.

Runs with ``tasks.n: infinite`` that differ only in step sizes, ``m_in``, noise and seeds
(:data:`metarep.experiments.BATCH_KEYS`) are batched: each batch is one job that steps the runs
together, with the same results as the runs one by one (:func:`batch_jobs`).
"""

from __future__ import annotations

import fcntl
import hashlib
import itertools
import json
import math
import os
import re
import shutil
import uuid
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import yaml
from scipy import stats
from tqdm.auto import tqdm

from metarep import plotting, storage
from metarep.config import (
    BUILTIN_CONFIGS,
    ConfigError,
    flatten,
    from_dict,
    iter_keys,
    read_yaml,
    to_dict,
)
from metarep.executors import ERROR_FILE, Executor, Job, Outcome, RunTask, make_executor
from metarep.experiments import infinite_batch_key

SWEEP_KEYS = ("base", "set", "grid", "zip", "seeds", "seed_keys")
MANIFEST = "sweep.json"
LOCK = ".sweep.lock"
SEED_AXIS = "seed"
TEMP_DIR = re.compile(r"^\..+\.(tmp|old)-[0-9a-f]{8}$")
MAX_NAME = 120
MAX_BATCH = 64
RUN_FIELDS = ("run", "status", "error", SEED_AXIS)
RISK_PREFIX = "excess_risk."


# ----------------------------------------------------------------------------- the sweep file


@dataclass(frozen=True)
class SweepSpec:
    """A validated sweep file: the base config tree and what varies across runs."""

    base: str
    config_name: str
    tree: dict[str, Any]
    fixed: dict[str, Any]
    grid: dict[str, list[Any]]
    zip: dict[str, list[Any]]
    seeds: list[int]
    seed_keys: list[str]


@dataclass(frozen=True)
class RunPlan:
    """One run: its directory ``name``, its dotted ``overrides`` (set, cell and seeds), the
    values of the sweep's axes (``varied``) and its sweep seed (``None`` without seeds)."""

    name: str
    overrides: dict[str, Any]
    varied: dict[str, Any]
    seed: int | None


def _mapping(where: str, value: Any) -> dict[str, Any]:
    """A mapping of dotted keys (nested sections, ``{model: {width: ...}}``, are flattened)."""
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise ConfigError(where, f"must be a mapping of config keys, got {value!r}")
    return flatten(value)


def _check_keys(where: str, keys: Any) -> None:
    known = dict(iter_keys())
    for key in keys:
        if key not in known:
            section = str(key).split(".")[0]
            allowed = [k for k in known if k.startswith(section + ".")] or list(known)
            raise ConfigError(f"{where}.{key}", "unknown config key; allowed: "
                              + ", ".join(allowed))


def _value_list(where: str, value: Any, *, distinct: bool = True) -> list[Any]:
    if not isinstance(value, list) or not value:
        raise ConfigError(where, f"must be a non-empty list of values, got {value!r}")
    if distinct:
        _no_repeats(where, value)
    return value


def _no_repeats(where: str, values: list[Any]) -> None:
    texts = [json.dumps(v, sort_keys=True) for v in values]
    duplicate = next((t for i, t in enumerate(texts) if t in texts[:i]), None)
    if duplicate is not None:
        raise ConfigError(where, f"lists {duplicate} twice (the same run twice)")


def _resolve_base(base: Any, sweep_file: Path) -> tuple[str, dict[str, Any], str]:
    """(path or builtin name, config tree, config name) of ``base``."""
    if not isinstance(base, str) or not base:
        raise ConfigError("base", f"must be a config path or one of {', '.join(BUILTIN_CONFIGS)}"
                          f"; got {base!r}")
    source = base
    if base not in BUILTIN_CONFIGS and not Path(base).is_absolute():
        beside = sweep_file.parent / base
        source = str(beside) if beside.is_file() else base
    try:
        tree, name = read_yaml(source)
    except ConfigError as error:
        raise ConfigError("base", str(error).split(": ", 1)[1]) from None
    return source, tree, name


def load_sweep(path: str | Path) -> SweepSpec:
    """Read and validate a sweep file (see the module docstring).

    Raises :class:`ConfigError` naming the field (``grid.model.width``, ``zip.problem.d``,
    ``seeds[2]``, ...) for an unknown top-level key, an unknown config key, an empty or
    duplicated value list, zip lists of unequal length, a key given twice, or an invalid base
    config. Values of ``grid`` and ``zip`` are not checked here: a bad value fails its run.
    """
    file = Path(path)
    if not file.is_file():
        raise ConfigError("sweep", f"no such file {str(path)!r}")
    try:
        raw = yaml.safe_load(file.read_text())
    except yaml.YAMLError as error:
        raise ConfigError("sweep", f"{file} is not valid YAML: {error}") from None
    raw = json.loads(json.dumps(raw, default=str))  # plain JSON data (YAML dates -> text)
    if not isinstance(raw, dict):
        raise ConfigError("sweep", f"{file} must hold a mapping with keys {', '.join(SWEEP_KEYS)}")
    for key in raw:
        if key not in SWEEP_KEYS:
            raise ConfigError(str(key), f"unknown sweep key; allowed: {', '.join(SWEEP_KEYS)}")
    if "base" not in raw:
        raise ConfigError("base", "missing: give a config path or one of "
                          + ", ".join(BUILTIN_CONFIGS))
    base, tree, name = _resolve_base(raw["base"], file)
    fixed = _mapping("set", raw.get("set"))
    grid = _mapping("grid", raw.get("grid"))
    zipped = _mapping("zip", raw.get("zip"))
    for where, keys in (("set", fixed), ("grid", grid), ("zip", zipped)):
        _check_keys(where, keys)
    grid = {key: _value_list(f"grid.{key}", values) for key, values in grid.items()}
    zipped = {key: _value_list(f"zip.{key}", values, distinct=False)
              for key, values in zipped.items()}
    lengths = {key: len(values) for key, values in zipped.items()}
    if len(set(lengths.values())) > 1:
        first = next(iter(lengths))
        odd = next(key for key in lengths if lengths[key] != lengths[first])
        raise ConfigError(f"zip.{odd}", f"has {lengths[odd]} values but zip.{first} has "
                          f"{lengths[first]}; zip lists must have equal length")
    _no_repeats("zip", [list(row) for row in zip(*zipped.values(), strict=True)])
    seeds, seed_keys = _seeds(raw)
    taken: dict[str, str] = {}
    for where, keys in (("set", fixed), ("grid", grid), ("zip", zipped),
                        ("seed_keys", seed_keys if seeds else [])):
        for key in keys:
            if key in taken:
                raise ConfigError(f"{where}.{key}", f"already given in {taken[key]}")
            taken[key] = where
    try:
        from_dict(tree, fixed, name=name)
    except ConfigError as error:
        where = f"set.{error.key}" if error.key in fixed else f"base ({error.key})"
        raise ConfigError(where, str(error).split(": ", 1)[1]) from None
    return SweepSpec(base, name, tree, fixed, grid, zipped, seeds, seed_keys)


def _seeds(raw: Mapping[str, Any]) -> tuple[list[int], list[str]]:
    seeds_raw = raw.get("seeds")
    if seeds_raw is None:
        if raw.get("seed_keys") is not None:
            raise ConfigError("seed_keys", "needs seeds (a list of integers >= 0)")
        return [], []
    seeds = _value_list("seeds", seeds_raw)
    for i, seed in enumerate(seeds):
        if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            raise ConfigError(f"seeds[{i}]", f"must be an integer >= 0, got {seed!r}")
    default = [key for key, _ in iter_keys() if key.endswith(".seed")]
    seed_keys = raw.get("seed_keys", default)
    if not isinstance(seed_keys, list) or not seed_keys:
        raise ConfigError("seed_keys", f"must be a non-empty list of config keys, got "
                          f"{seed_keys!r}")
    _check_keys("seed_keys", seed_keys)
    return seeds, list(seed_keys)


# ----------------------------------------------------------------------------- the runs


def _short_hash(text: str) -> str:
    return hashlib.sha1(text.encode()).hexdigest()[:8]


def value_token(value: Any) -> str:
    """A filesystem-safe text for a config value, distinct for distinct values.

    Plain words and numbers are kept (``0.05``, ``fo-anil``); anything else is reduced to
    ``[A-Za-z0-9._+-]`` and suffixed with a hash of its exact JSON text.
    """
    exact = json.dumps(value, sort_keys=True)
    try:
        plain = isinstance(value, str) and yaml.safe_load(value) == value
    except yaml.YAMLError:
        plain = False
    text = value if plain else exact
    safe = re.sub(r"[^A-Za-z0-9._+-]+", "_", text).strip("_")
    return safe if safe == text else f"{safe}-{_short_hash(exact)}"


def _labels(keys: list[str]) -> dict[str, str]:
    """The last component of each key where that is unambiguous, else the dotted key."""
    last = [key.rsplit(".", 1)[-1] for key in keys] + [SEED_AXIS]
    return {key: short if last.count(short) == 1 else key
            for key, short in zip(keys, last, strict=False)}


def run_name(varied: Mapping[str, Any], labels: Mapping[str, str], seed: int | None) -> str:
    """``label=value,...`` (then ``seed=s``); ``run`` when nothing varies. Names longer than
    ``MAX_NAME`` are cut and suffixed with a hash of the whole name."""
    parts = [f"{labels[key]}={value_token(value)}" for key, value in varied.items()]
    if seed is not None:
        parts.append(f"{SEED_AXIS}={seed}")
    name = ",".join(parts) or "run"
    return name if len(name) <= MAX_NAME else f"{name[:MAX_NAME - 9]}-{_short_hash(name)}"


def plan_runs(spec: SweepSpec) -> list[RunPlan]:
    """Every run of the sweep, in order: grid product (keys in file order), zip rows, seeds.

    A key varies when it takes more than one value; only varying keys (and the seed, with
    more than one) name the run directory.
    """
    grid_cells = [dict(zip(spec.grid, values, strict=True))
                  for values in itertools.product(*spec.grid.values())]
    n_rows = len(next(iter(spec.zip.values()))) if spec.zip else 1
    zip_rows = [{key: values[j] for key, values in spec.zip.items()} for j in range(n_rows)]
    seeds: list[int | None] = list(spec.seeds) or [None]
    axes = axes_of(spec)
    labels = _labels(axes)
    plans = []
    for cell, row, seed in itertools.product(grid_cells, zip_rows, seeds):
        values = {**cell, **row}
        varied = {key: values[key] for key in axes}
        seeded = {} if seed is None else dict.fromkeys(spec.seed_keys, seed)
        name = run_name(varied, labels, seed if len(seeds) > 1 else None)
        plans.append(RunPlan(name, {**spec.fixed, **values, **seeded}, varied, seed))
    return plans


def axes_of(spec: SweepSpec) -> list[str]:
    """The config keys that vary across the sweep's runs (grid, then zip)."""
    return [key for key, values in (*spec.grid.items(), *spec.zip.items())
            if len({json.dumps(v, sort_keys=True) for v in values}) > 1]


def run_status(path: Path) -> str | None:
    """``done`` or ``failed`` for a finished run directory, ``None`` if the run is not there."""
    if not path.is_dir():
        return None
    return "failed" if (path / ERROR_FILE).is_file() else "done"


# ----------------------------------------------------------------------------- running


@dataclass(frozen=True)
class SweepReport:
    """Counts after a sweep: ``total`` runs, of which ``done`` and ``failed`` are finished;
    ``ran`` of them ran now, the others were already finished."""

    out_dir: Path
    total: int
    done: int
    failed: int
    ran: int


def _manifest(spec: SweepSpec, plans: list[RunPlan]) -> dict[str, Any]:
    """``sweep.json``: the sweep (``spec``: what decides its runs' results; the base file's
    path is kept apart, as it depends on the current directory), its axes, the resolved
    base config (flat) and every run."""
    spec_data = json.loads(json.dumps(
        {key: value for key, value in asdict(spec).items() if key != "base"}, default=str))
    base = to_dict(from_dict(spec.tree, spec.fixed, name=spec.config_name))
    return {
        "base": spec.base,
        "spec": spec_data,
        "axes": axes_of(spec),
        "zip_keys": list(spec.zip),
        "base_config": json.loads(json.dumps(flatten(base))),
        "runs": [asdict(plan) for plan in plans],
    }


@contextmanager
def _locked(out: Path) -> Iterator[None]:
    """Hold an exclusive lock on ``out`` (released by the OS if this process dies)."""
    out.mkdir(parents=True, exist_ok=True)
    with open(out / LOCK, "w") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise ConfigError("--out", f"{out} is in use by another sweep") from None
        yield


def _check_out_dir(out: Path, manifest: dict[str, Any]) -> None:
    """``out`` must be new, empty, or hold this very sweep (same ``spec`` in its manifest)."""
    file = out / MANIFEST
    if file.is_file():
        if json.loads(file.read_text())["spec"] != manifest["spec"]:
            raise ConfigError("--out", f"{out} holds a different sweep (see {file}); use a "
                              "new --out directory")
    elif out.exists() and any(path.name != LOCK for path in out.iterdir()):
        raise ConfigError("--out", f"{out} exists and is not a sweep directory (no {MANIFEST})")


def _clean_temporaries(out: Path) -> None:
    for path in out.iterdir():
        if path.is_dir() and TEMP_DIR.match(path.name):
            shutil.rmtree(path)


def _finalize(out: Path, task: RunTask, outcome: Outcome) -> None:
    """Move a run's temporary directory into place (replacing a failed run being redone)."""
    workdir, final = Path(task.workdir), out / task.name
    if outcome.files is not None:
        workdir.mkdir(parents=True, exist_ok=True)
        for name, data in outcome.files.items():
            (workdir / name).write_bytes(data)
    if final.exists():
        old = out / f".{task.name}.old-{uuid.uuid4().hex[:8]}"
        os.rename(final, old)
        os.rename(workdir, final)
        shutil.rmtree(old)
    else:
        os.rename(workdir, final)


def run_sweep(
    sweep_file: str | Path,
    out_dir: str | Path | None = None,
    *,
    executor: str = "local",
    workers: int | None = None,
    address: str | None = None,
    retry_failed: bool = False,
    progress: bool = True,
    batch_infinite: bool = True,
) -> SweepReport:
    """Run (or resume) the sweep of ``sweep_file`` into ``out_dir`` (default ``runs/STEM``).

    Finished runs are skipped (failed ones too, unless ``retry_failed``); leftover
    temporary directories are deleted; a failing run is recorded and the others go on.
    ``batch_infinite`` batches the ``tasks.n: infinite`` runs that differ only in
    :data:`metarep.experiments.BATCH_KEYS` (:func:`batch_jobs`; the same results, faster);
    ``False`` runs every run on its own.
    Raises :class:`ConfigError` for a bad sweep file or option, before writing anything.
    """
    spec = load_sweep(sweep_file)
    out = Path(out_dir) if out_dir is not None else Path("runs") / Path(sweep_file).stem
    return execute_plans(spec, plan_runs(spec), out, executor=executor, workers=workers,
                         address=address, retry_failed=retry_failed, progress=progress,
                         batch_infinite=batch_infinite)


def execute_plans(
    spec: SweepSpec,
    plans: list[RunPlan],
    out: Path,
    *,
    executor: str = "local",
    workers: int | None = None,
    address: str | None = None,
    retry_failed: bool = False,
    progress: bool = True,
    batch_infinite: bool = True,
) -> SweepReport:
    """Run (or resume) the runs ``plans`` of ``spec`` into ``out``: the engine behind
    :func:`run_sweep`, also used for study definitions built in code
    (:mod:`metarep.reproduce`). Same guarantees and options as :func:`run_sweep`."""
    manifest = _manifest(spec, plans)
    _check_out_dir(out, manifest)
    pool = make_executor(executor, workers, address)
    try:
        with _locked(out):
            storage.write_json(out / MANIFEST, manifest)
            _clean_temporaries(out)
            return _drive(spec, plans, out, pool, retry_failed, progress, batch_infinite)
    finally:
        pool.close()


def _batch_key(task: RunTask) -> str | None:
    """:func:`metarep.experiments.infinite_batch_key` of the run's config (``None`` for a
    config that does not resolve: it fails as a run of its own)."""
    try:
        return infinite_batch_key(from_dict(task.tree, task.overrides, name=task.config_name))
    except ConfigError:
        return None


def batch_jobs(tasks: list[RunTask], workers: int) -> list[Job]:
    """The jobs that run ``tasks``: runs with equal :func:`_batch_key` (``tasks.n: infinite``
    runs that differ only in :data:`metarep.experiments.BATCH_KEYS`) are batched, each batch run
    as one vectorised computation with the same results as the runs one by one
    (:func:`metarep.experiments.run_infinite_batch`); every other run is a job of its own.

    A group of ``n`` runs is cut into ``max(ceil(n / MAX_BATCH), min(workers, n // 2))``
    near-equal batches, so that a batch stays bounded and the batches spread over the workers,
    each holding >= 2 runs. Jobs come in the order of their first run.
    """
    groups: dict[str | int, list[RunTask]] = {}
    for i, task in enumerate(tasks):
        key = _batch_key(task)
        groups.setdefault(i if key is None else key, []).append(task)
    jobs: list[Job] = []
    for group in groups.values():
        n = len(group)
        parts = max(math.ceil(n / MAX_BATCH), min(workers, n // 2))
        jobs += [tuple(group[j * n // parts:(j + 1) * n // parts]) for j in range(parts)]
    return jobs


def _drive(spec: SweepSpec, plans: list[RunPlan], out: Path, pool: Executor,
           retry_failed: bool, progress: bool, batch_infinite: bool) -> SweepReport:
    status = {plan.name: run_status(out / plan.name) for plan in plans}
    todo = [plan for plan in plans
            if status[plan.name] is None or (retry_failed and status[plan.name] == "failed")]
    redo = {plan.name for plan in todo}
    counts = {"done": 0, "failed": 0}
    for name, state in status.items():
        if state is not None and name not in redo:
            counts[state] += 1
    cwd, where = os.getcwd(), out.resolve()
    tasks = [RunTask(plan.name, spec.tree, plan.overrides, spec.config_name,
                     str(where / f".{plan.name}.tmp-{uuid.uuid4().hex[:8]}"), cwd)
             for plan in todo]
    by_name = {task.name: task for task in tasks}
    jobs = batch_jobs(tasks, pool.workers) if batch_infinite else [(task,) for task in tasks]
    bar = tqdm(total=len(plans), initial=len(plans) - len(todo), disable=not progress,
               unit="run", desc="sweep", dynamic_ncols=True)
    bar.set_postfix(counts)
    try:
        for outcome in pool.map(jobs):
            _finalize(out, by_name[outcome.name], outcome)
            counts[outcome.status] += 1
            bar.set_postfix(counts, refresh=False)
            bar.update(1)
    finally:
        bar.close()
    return SweepReport(out, len(plans), counts["done"], counts["failed"], len(tasks))


# ----------------------------------------------------------------------------- collecting


def read_manifest(sweep_dir: str | Path) -> dict[str, Any]:
    """The ``sweep.json`` of a sweep directory (:class:`ConfigError` ``DIR`` if absent)."""
    file = Path(sweep_dir) / MANIFEST
    if not file.is_file():
        raise ConfigError("DIR", f"{sweep_dir} is not a sweep directory (no {MANIFEST})")
    return json.loads(file.read_text())


def _run_row(path: Path, run: Mapping[str, Any], base: Mapping[str, Any]) -> dict[str, Any]:
    """One table row: run, status, error, seed, every config key, the final measures."""
    status = run_status(path) or "pending"
    error = None
    if status == "failed":
        error = json.loads((path / ERROR_FILE).read_text())["error"]
    if (path / "config.yaml").is_file():
        config = flatten(yaml.safe_load((path / "config.yaml").read_text()))
    else:
        config = {**base, **run["overrides"]}
    row: dict[str, Any] = dict(zip(RUN_FIELDS, (run["name"], status, error, run["seed"]),
                                   strict=True))
    row.update({key: json.dumps(value) if isinstance(value, list | dict) else value
                for key, value in config.items()})
    if (path / "summary.json").is_file():
        final = json.loads((path / "summary.json").read_text()).get("final") or {}
        row.update(final)
    if (path / "eval.csv").is_file():
        evaluation = pd.read_csv(path / "eval.csv")
        for method, shots, risk in evaluation[["method", "shots", "excess_risk"]].itertuples(
                index=False):
            row[f"{RISK_PREFIX}{method}.{shots}"] = risk
    return row


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


def seed_intervals(frame: pd.DataFrame, x: str, y: str, by: list[str],
                   level: float = 0.95) -> pd.DataFrame:
    """Mean of ``y`` over seeds with its Student-t interval, per value of ``by + [x]``.

    For the ``n`` finite values ``y_1..y_n`` of a group: ``mean = sum(y_i) / n``,
    ``half = t_{(1+level)/2, n-1} * s / sqrt(n)`` with ``s`` the sample standard deviation;
    ``low``/``high`` are ``mean -/+ half`` (``nan`` when ``n < 2``). Only ``done`` runs count.
    """
    done = frame[(frame["status"] == "done") & np.isfinite(frame[y].astype(float))]
    rows = []
    for key, group in done.groupby([*by, x], sort=False, dropna=False):
        values = group[y].to_numpy(dtype=float)
        n = len(values)
        mean = float(values.mean())
        half = (stats.t.ppf((1 + level) / 2, n - 1) * values.std(ddof=1) / math.sqrt(n)
                if n > 1 else math.nan)
        rows.append({**dict(zip([*by, x], key, strict=True)), "mean": mean,
                     "low": mean - half, "high": mean + half, "n": n})
    return pd.DataFrame(rows, columns=[*by, x, "mean", "low", "high", "n"])


@dataclass(frozen=True)
class Collected:
    """Paths written by :func:`collect` (``figure`` is ``None`` when there is no axis)."""

    table: pd.DataFrame
    parquet: Path
    csv: Path
    figure: Path | None


def collect(sweep_dir: str | Path, x: str | None = None, y: str | None = None) -> Collected:
    """Write ``collected.parquet`` and ``collected.csv`` and a figure ``Y_vs_X.png`` to
    ``sweep_dir``: ``y`` against ``x``, mean and 95% t-interval over seeds, one line per
    combination of the other axes (keys zipped with ``x`` move with it, so they are not split).

    ``x`` defaults to the sweep's first axis (no figure when nothing varies), ``y`` to
    ``perp_norm``. Raises :class:`ConfigError` (``--x``, ``--y``) for unknown columns.
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
    parquet, csv = out / "collected.parquet", out / "collected.csv"
    storage.atomic_write(parquet, lambda tmp: table.to_parquet(tmp, index=False))
    storage.write_text(csv, table.to_csv(index=False))
    x = x or (axes[0] if axes else None)
    if x is None or y is None:
        return Collected(table, parquet, csv, None)
    tied = manifest["zip_keys"] if x in manifest["zip_keys"] else []
    by = [key for key in axes if key != x and key not in tied]
    figure = out / f"{y}_vs_{x}.png"
    plotting.save_sweep_figure(seed_intervals(table, x, y, by), x, y, by, figure,
                               title=out.name)
    return Collected(table, parquet, csv, figure)
