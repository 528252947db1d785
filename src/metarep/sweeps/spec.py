"""The sweep file and its runs: parsing, validation, the product of the runs and their names.

A sweep file (YAML) has

- ``base``: a built-in config name or a YAML path (relative to the sweep file, or else to the
  current directory);
- ``set``: dotted keys fixed for every run (optional);
- ``grid``: dotted key -> list of values; every combination is run;
- ``zip``: dotted key -> lists of one common length, taken together (row ``j`` of every list);
- ``seeds``: a list of seeds ``s``; every run is repeated for each ``s``, which is applied to
  every key of ``seed_keys`` (default: every ``*.seed`` key). Equal values are safe: each
  seed key draws from its own stream (:mod:`metarep.core.seeding`).

The runs are the product grid x zip rows x seeds, in that order. Each run's directory is
named from the values that vary across the sweep (``width=5,outer_lr=0.02,seed=1``).
"""

from __future__ import annotations

import hashlib
import itertools
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from metarep.errors import ConfigError
from metarep.run.schema import (
    BUILTIN_CONFIGS,
    flatten,
    from_dict,
    iter_keys,
    load_yaml,
    read_yaml,
    to_dict,
)

SWEEP_KEYS = ("base", "set", "grid", "zip", "seeds", "seed_keys")
SEED_AXIS = "seed"
MAX_NAME = 120


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
    raw = load_yaml(file.read_bytes(), str(file), "sweep")
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

    Raises :class:`ConfigError` naming the sweep key at fault (``grid.model.width``) when two
    runs are the same run: their resolved configs are equal (``[2, 2.0]`` for an integer
    key) or they share a directory name. A cell whose config does not resolve is left out
    of that check: it fails as a run of its own.
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
    _no_same_runs(spec, plans)
    return plans


def _frozen(value: Any) -> Any:
    """``value`` made hashable, equal where the values are equal (lists become tuples)."""
    if isinstance(value, Mapping):
        return tuple(sorted((str(k), _frozen(v)) for k, v in value.items()))
    if isinstance(value, list | tuple):
        return tuple(_frozen(v) for v in value)
    return value


def _no_same_runs(spec: SweepSpec, plans: list[RunPlan]) -> None:
    """Refuse two plans with equal resolved configs or the same directory name (each
    plan's config is resolved once; one that does not resolve is skipped)."""
    by_config: dict[Any, RunPlan] = {}
    by_name: dict[str, RunPlan] = {}
    for plan in plans:
        other = by_name.get(plan.name)
        if other is not None:
            _same_run(spec, other, plan, f"the same run directory {plan.name!r}")
        by_name[plan.name] = plan
        try:
            config = from_dict(spec.tree, plan.overrides, name=spec.config_name)
        except ConfigError:
            continue
        resolved = _frozen(flatten(to_dict(config)))
        other = by_config.get(resolved)
        if other is not None:
            _same_run(spec, other, plan, f"the same run ({other.name} and {plan.name})")
        by_config[resolved] = plan


def _same_run(spec: SweepSpec, first: RunPlan, second: RunPlan, what: str) -> None:
    """Raise the :class:`ConfigError` of two plans that give ``what``, naming the first
    sweep key whose values tell them apart (``grid.KEY``, ``zip.KEY`` or ``seeds``)."""
    def text(value: Any) -> str:
        return json.dumps(value, sort_keys=True, default=str)

    differ = [key for key in first.varied
              if text(first.varied[key]) != text(second.varied[key])]
    if differ:
        key = differ[0]
        where = f"grid.{key}" if key in spec.grid else f"zip.{key}"
        values = f"{text(first.varied[key])} and {text(second.varied[key])}"
    else:
        where, values = "seeds", f"{first.seed} and {second.seed}"
    raise ConfigError(where, f"values {values} give {what}; list each value once")


def axes_of(spec: SweepSpec) -> list[str]:
    """The config keys that vary across the sweep's runs (grid, then zip)."""
    return [key for key, values in (*spec.grid.items(), *spec.zip.items())
            if len({json.dumps(v, sort_keys=True) for v in values}) > 1]
