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

The same fields can be given on the command line (``metarep sweep BASE --grid KEY=a,b --set
KEY=v --seeds 0,1``, :func:`command_line_fields`): they make the dict a sweep file would hold,
validated and planned by the same code (:func:`sweep_of`), or they override the fields of a
sweep file.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import re
from collections.abc import Mapping, Sequence
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
    parse_override,
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


def _resolve_base(base: Any, root: Path) -> tuple[str, dict[str, Any], str]:
    """(path or builtin name, config tree, config name) of ``base`` (a relative path is
    looked for in ``root``, the sweep file's folder, then in the current directory)."""
    if not isinstance(base, str) or not base:
        raise ConfigError("base", f"must be a config path or one of {', '.join(BUILTIN_CONFIGS)}"
                          f"; got {base!r}")
    source = base
    if base not in BUILTIN_CONFIGS and not Path(base).is_absolute():
        beside = root / base
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
    return sweep_from_dict(read_sweep_file(file), file.parent)


def read_sweep_file(path: str | Path) -> dict[str, Any]:
    """The fields of the sweep file ``path``, as plain JSON data (YAML dates become text),
    not yet validated; :class:`ConfigError` ``sweep`` when it is absent, not YAML or not a
    mapping."""
    file = Path(path)
    if not file.is_file():
        raise ConfigError("sweep", f"no such file {str(path)!r}")
    raw = load_yaml(file.read_bytes(), str(file), "sweep")
    raw = json.loads(json.dumps(raw, default=str))
    if not isinstance(raw, dict):
        raise ConfigError("sweep", f"{file} must hold a mapping with keys {', '.join(SWEEP_KEYS)}")
    return raw


def sweep_from_dict(raw: Mapping[str, Any], root: str | Path = ".") -> SweepSpec:
    """Validate the fields of a sweep (what a sweep file holds; a relative ``base`` is looked
    for in ``root``, then in the current directory): :func:`load_sweep` without the file."""
    raw = json.loads(json.dumps(raw, default=str))  # plain JSON data (YAML dates -> text)
    if not isinstance(raw, dict):
        raise ConfigError("sweep", f"must be a mapping with keys {', '.join(SWEEP_KEYS)}")
    for key in raw:
        if key not in SWEEP_KEYS:
            raise ConfigError(str(key), f"unknown sweep key; allowed: {', '.join(SWEEP_KEYS)}")
    if "base" not in raw:
        raise ConfigError("base", "missing: give a config path or one of "
                          + ", ".join(BUILTIN_CONFIGS))
    base, tree, name = _resolve_base(raw["base"], Path(root))
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


# ----------------------------------------------------------------------------- the command line

OPTIONS = {"set": "--set", "grid": "--grid", "seeds": "--seeds", "seed_keys": "--seed-keys"}
"""The ``metarep sweep`` option that gives each sweep field."""


def split_values(text: str) -> list[str]:
    """The values of ``a,b,c``: commas inside ``[...]``, ``{...}`` or quotes do not separate
    (``[5,10],[20]`` is two values); a text with a ``;`` outside brackets and quotes is
    separated by ``;`` instead (``[5,10];[20]``). Each value is stripped."""
    depth, quote, escaped, cuts = 0, "", False, {",": [], ";": []}
    for i, char in enumerate(text):
        if quote:
            escaped = not escaped and quote == '"' and char == "\\"
            if char == quote and not escaped:
                quote = ""
        elif char in "'\"":
            quote = char
        elif char in "[{":
            depth += 1
        elif char in "]}":
            depth = max(depth - 1, 0)
        elif char in cuts and depth == 0:
            cuts[char].append(i)
    at = cuts[";"] or cuts[","]
    bounds = zip([-1, *at], [*at, len(text)], strict=True)
    return [text[start + 1:end].strip() for start, end in bounds]


def _yaml_value(option: str, piece: str, text: str) -> Any:
    if not piece:
        raise ConfigError(option, f"empty value in {text!r}")
    try:
        return yaml.safe_load(piece)
    except yaml.YAMLError:
        raise ConfigError(option, f"{piece!r} is not a YAML value (in {text!r}; separate "
                          "list values with ';': [5,10];[20])") from None


def _grid_option(text: str) -> tuple[str, list[Any]]:
    """``KEY=a,b`` -> (KEY, [a, b]), each value read as YAML."""
    key, sep, values = text.partition("=")
    if not sep or not key.strip():
        what = "no '='" if not sep else "no key"
        raise ConfigError("--grid", f"expected KEY=a,b ({what}), got {text!r}")
    key = key.strip()
    if not values.strip():
        raise ConfigError(f"--grid {key}", "no values; give KEY=a,b")
    return key, [_yaml_value(f"--grid {key}", piece, values) for piece in split_values(values)]


def command_line_fields(grid: Sequence[str] = (), sets: Sequence[str] = (),
                        seeds: str | None = None,
                        seed_keys: str | None = None) -> dict[str, Any]:
    """The sweep fields given by ``metarep sweep``'s options, as a sweep file holds them
    (only those given): ``--grid KEY=a,b`` (values read as YAML, :func:`split_values`),
    ``--set KEY=v``, ``--seeds 0,1,2`` and ``--seed-keys KEY,KEY``. Raises
    :class:`ConfigError` naming the option for a text that cannot be read, or a key given
    twice (``--grid``) or with both ``--grid`` and ``--set``; what is read is validated with
    the sweep (:func:`sweep_of`)."""
    fields: dict[str, Any] = {}
    fixed = dict(parse_override(item) for item in sets)
    if fixed:
        fields["set"] = fixed
    varied: dict[str, list[Any]] = {}
    for item in grid:
        key, values = _grid_option(item)
        if key in varied:
            raise ConfigError(f"--grid {key}", "given twice; list every value in one "
                              "--grid KEY=a,b")
        if key in fixed:
            raise ConfigError(f"--grid {key}", "also given with --set; give it once")
        varied[key] = values
    if varied:
        fields["grid"] = varied
    for name, text in (("seeds", seeds), ("seed_keys", seed_keys)):
        if text is None:
            continue
        option = OPTIONS[name]
        if not text.strip():
            raise ConfigError(option, "no values; give them separated by commas: "
                              + ("0,1,2" if name == "seeds" else "tasks.seed,model.seed"))
        values = [_yaml_value(option, piece, text) for piece in split_values(text)]
        fields[name] = values if name == "seeds" else [str(value) for value in values]
    return fields


def is_sweep_file(target: str) -> bool:
    """Whether ``target`` is a sweep file: a YAML file holding a mapping with a ``base``
    (a built-in config name never is)."""
    if target in BUILTIN_CONFIGS or not Path(target).is_file():
        return False
    try:
        raw = read_sweep_file(target)
    except ConfigError:
        return False
    return "base" in raw


def _looks_like_config(target: str) -> bool:
    """A built-in name, or a YAML file whose keys are all config sections."""
    if target in BUILTIN_CONFIGS:
        return True
    try:
        raw = read_sweep_file(target)
    except ConfigError:
        return False
    sections = {key.split(".")[0] for key, _ in iter_keys()}
    return bool(raw) and set(raw) <= sections


def _merged(raw: Mapping[str, Any], fields: Mapping[str, Any]) -> tuple[dict[str, Any],
                                                                        dict[str, str]]:
    """The sweep fields ``raw`` with the command-line ``fields`` over them, and which option
    gave each field (``grid.KEY``, ``set.KEY``, ``seeds``, ``seed_keys``) that came from
    one. A key given with ``--set`` or ``--grid`` replaces the key wherever ``raw`` has it
    (``set``, ``grid`` or ``zip``); ``--seeds`` and ``--seed-keys`` replace those fields."""
    merged = dict(raw)
    if fields.get("set") or fields.get("grid"):
        for name in ("set", "grid", "zip"):
            if name in merged:
                merged[name] = _mapping(name, merged[name])
    origins: dict[str, str] = {}
    for name in ("set", "grid"):
        for key, value in fields.get(name, {}).items():
            for other in ("set", "grid", "zip"):
                if other != name and key in merged.get(other, {}):
                    merged[other] = {k: v for k, v in merged[other].items() if k != key}
            merged[name] = {**merged.get(name, {}), key: value}
            origins[f"{name}.{key}"] = OPTIONS[name]
    for name in ("seeds", "seed_keys"):
        if name in fields:
            merged[name] = fields[name]
            origins[name] = OPTIONS[name]
    if "seeds" in fields and "seed_keys" not in merged:
        origins["seed_keys"] = "--seeds"  # the default seed keys come with --seeds
    return merged, origins


def _named_by_options(error: ConfigError, origins: Mapping[str, str]) -> ConfigError:
    """``error`` of a sweep's field, naming the command-line option where it came from one
    (``grid.KEY: ...`` -> ``--grid KEY: ...``, ``seeds[1]: ...`` -> ``--seeds: ...``)."""
    field, _, rest = error.key.partition(".")
    option = origins.get(error.key) or origins.get(re.sub(r"\[\d+\]$", "", field))
    if option is None:
        return error
    message = error.message
    given = re.fullmatch(r"already given in (\w+)", message)
    if given and f"{given[1]}.{rest}" in origins:
        message = f"already given with {origins[f'{given[1]}.{rest}']}"
    if option in ("--set", "--grid"):
        return ConfigError(f"{option} {rest}", message)
    if option == "--seeds" and field == "seed_keys" and rest:
        return ConfigError(option, f"sets {rest} (as every *.seed key by default), {message}; "
                           "give the keys to seed with --seed-keys")
    if message.startswith("needs seeds"):
        message = "needs --seeds" + message.removeprefix("needs seeds")
    return ConfigError(option, f"{rest}: {message}" if rest else message)


def sweep_of(target: str, fields: Mapping[str, Any] | None = None,
             ) -> tuple[SweepSpec, list[RunPlan], Path]:
    """The sweep ``metarep sweep TARGET`` runs, its runs and its default directory.

    ``target`` is a sweep file (:func:`is_sweep_file`; default directory ``runs/STEM``),
    whose fields the command-line ``fields`` (:func:`command_line_fields`) override; or,
    with ``fields``, a base config (a built-in name or a config YAML; default directory
    ``runs/sweep-STEM``): ``{"base": target, **fields}`` is then the sweep, as a file in
    the current directory would hold it. Either way the fields are validated and planned by
    :func:`sweep_from_dict` and :func:`plan_runs`, so that a sweep file holding the same
    fields is the same sweep (the same run names, the same ``sweep.json`` spec). Raises
    :class:`ConfigError` naming the field, or the option that gave it (``--grid KEY``,
    ``--set KEY``, ``--seeds``, ``--seed-keys``)."""
    fields = dict(fields or {})
    if is_sweep_file(target):
        file = Path(target)
        raw, root, default = read_sweep_file(file), file.parent, Path("runs") / file.stem
    elif fields:
        raw, root = {"base": target}, Path(".")
        default = Path("runs") / f"sweep-{Path(target).stem}"
    elif _looks_like_config(target):
        raise ConfigError("sweep", f"{target} is a config, not a sweep file (a mapping with "
                          "base: ...); sweep it with --grid KEY=a,b, --set KEY=v or --seeds 0,1")
    else:
        raw, root, default = read_sweep_file(target), Path(target).parent, \
            Path("runs") / Path(target).stem
    merged, origins = _merged(raw, fields)
    try:
        spec = sweep_from_dict(merged, root)
        return spec, plan_runs(spec), default
    except ConfigError as error:
        raise _named_by_options(error, origins) from None
