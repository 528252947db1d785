"""``sweep.json``, the manifest of a sweep directory: the one owner of its format.

It records the sweep (``spec``: what decides its runs' results; the base file's path is kept
apart, as it depends on the current directory), its axes, the resolved base config (flat),
every run and the provenance of the driver that wrote it. A directory holds one sweep: a
different sweep is refused.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

from metarep.errors import ConfigError
from metarep.run import atomic
from metarep.run.provenance import provenance
from metarep.run.schema import flatten, from_dict, to_dict
from metarep.sweeps.spec import RunPlan, SweepSpec, axes_of

MANIFEST = "sweep.json"
LOCK = ".sweep.lock"


def build_manifest(spec: SweepSpec, plans: list[RunPlan]) -> dict[str, Any]:
    """``sweep.json``: the sweep (``spec``: what decides its runs' results; the base file's
    path is kept apart, as it depends on the current directory), its axes, the resolved
    base config (flat), every run, and the :func:`~metarep.run.provenance.provenance` of the
    driver that wrote it (a resumed sweep records its own)."""
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
        "provenance": provenance(),
    }


def write_manifest(out: Path, manifest: dict[str, Any]) -> None:
    atomic.write_json(out / MANIFEST, manifest)


# what a reader of the manifest needs, with its type
READ_KEYS: dict[str, type] = {"spec": dict, "axes": list, "zip_keys": list, "base_config": dict,
                              "runs": list}


def _load(file: Path, key: str, advice: str, needed: dict[str, type]) -> dict[str, Any]:
    """The manifest ``file`` as a dict holding ``needed`` (key -> type), or a
    :class:`ConfigError` naming ``key``: ``FILE is corrupt (why); advice``."""
    def corrupt(why: str) -> ConfigError:
        return ConfigError(key, f"{file} is corrupt ({why}); {advice}")

    try:
        data = json.loads(file.read_bytes())
    except OSError as error:
        raise ConfigError(key, f"{file} cannot be read ({error.strerror or error}); "
                          f"{advice}") from None
    except RecursionError:
        raise corrupt("nested too deeply") from None
    except ValueError as error:  # json.JSONDecodeError, UnicodeDecodeError
        raise corrupt(f"not JSON: {error}") from None
    if not isinstance(data, dict):
        raise corrupt(f"a JSON {type(data).__name__}, not an object")
    for name, kind in needed.items():
        if name not in data:
            raise corrupt(f"no {name!r}")
        if not isinstance(data[name], kind):
            raise corrupt(f"{name!r} is not a {kind.__name__}")
    return data


def _check_runs(file: Path, runs: list[Any]) -> None:
    """Every run of a read manifest is ``{"name": plain name, "overrides": {...}, "seed": ...}``."""
    for i, run in enumerate(runs):
        name = run.get("name") if isinstance(run, dict) else None
        if (not isinstance(name, str) or name in ("", ".", "..") or "/" in name
                or "\\" in name or "\0" in name or not isinstance(run.get("overrides"), dict)
                or "seed" not in run):
            raise ConfigError("DIR", f"{file} is corrupt (runs[{i}] is not a run with a plain "
                              "name, overrides and seed); it cannot be read")


def _manifest_temporary(path: Path) -> bool:
    """Whether ``path`` is the temporary file of a ``sweep.json`` being written (by a sweep
    that holds the lock, or one killed while writing it)."""
    return atomic.is_temporary(path) and path.name.startswith(f".{MANIFEST}.")


def check_out_dir(out: Path, manifest: dict[str, Any]) -> None:
    """``out`` must be new, empty, or hold this very sweep (same ``spec`` in its manifest).

    A corrupt manifest (not JSON, not an object, no ``spec``) is a :class:`ConfigError`
    ``--out``, like a different sweep. The lock and a manifest being written (its temporary
    file) do not make a directory non-empty: another sweep may be starting in it, and the
    check made under the lock decides."""
    file = out / MANIFEST
    if file.is_file():
        found = _load(file, "--out", "use a new --out directory", {"spec": dict})
        if found["spec"] != manifest["spec"]:
            raise ConfigError("--out", f"{out} holds a different sweep (see {file}); use a "
                              "new --out directory")
    elif out.exists() and any(path.name != LOCK and not _manifest_temporary(path)
                              for path in out.iterdir()):
        raise ConfigError("--out", f"{out} exists and is not a sweep directory (no {MANIFEST})")


def read_manifest(sweep_dir: str | Path) -> dict[str, Any]:
    """The ``sweep.json`` of a sweep directory (:class:`ConfigError` ``DIR`` if absent or
    corrupt: not JSON, not an object, or missing what a reader needs, :data:`READ_KEYS`)."""
    file = Path(sweep_dir) / MANIFEST
    if not file.is_file():
        raise ConfigError("DIR", f"{sweep_dir} is not a sweep directory (no {MANIFEST})")
    manifest = _load(file, "DIR", "it cannot be read", READ_KEYS)
    _check_runs(file, manifest["runs"])
    return manifest
