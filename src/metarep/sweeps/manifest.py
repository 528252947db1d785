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


def check_out_dir(out: Path, manifest: dict[str, Any]) -> None:
    """``out`` must be new, empty, or hold this very sweep (same ``spec`` in its manifest)."""
    file = out / MANIFEST
    if file.is_file():
        if json.loads(file.read_text())["spec"] != manifest["spec"]:
            raise ConfigError("--out", f"{out} holds a different sweep (see {file}); use a "
                              "new --out directory")
    elif out.exists() and any(path.name != LOCK for path in out.iterdir()):
        raise ConfigError("--out", f"{out} exists and is not a sweep directory (no {MANIFEST})")


def read_manifest(sweep_dir: str | Path) -> dict[str, Any]:
    """The ``sweep.json`` of a sweep directory (:class:`ConfigError` ``DIR`` if absent)."""
    file = Path(sweep_dir) / MANIFEST
    if not file.is_file():
        raise ConfigError("DIR", f"{sweep_dir} is not a sweep directory (no {MANIFEST})")
    return json.loads(file.read_text())
