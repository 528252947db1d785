"""The tiny base config that the sweep, SLURM and sink tests run, and the sweep files over it
(imported by those test modules)."""

from __future__ import annotations

from pathlib import Path

import yaml

BASE = {
    "problem": {"d": 6, "k": 2, "noise_var": 0.5, "head_cov": "linear", "seed": 0},
    "tasks": {"n": 30, "m_in": 5, "m_out": 5, "seed": 1},
    "model": {"width": 4, "init_scale": 1.0, "seed": 2},
    "method": {"name": "fo-anil", "inner_lr": 0.5, "outer_lr": 0.2},
    "train": {"steps": 20, "record_every": 10},
    "eval": {"shots": [5, 10], "n_tasks": 20, "seed": 3},
}
"""A run of a fraction of a second: d = 6, k = 2, k' = 4, 30 tasks, 20 steps."""


def write_sweep(folder: Path, name: str = "sweep.yaml", **fields) -> Path:
    """A base config ``base.yaml`` (:data:`BASE`) and a sweep file ``name`` over it, with the
    sweep's ``fields`` (``grid``, ``set``, ``seeds``, ...), in ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "base.yaml").write_text(yaml.safe_dump(BASE))
    path = folder / name
    path.write_text(yaml.safe_dump({"base": "base.yaml", **fields}, sort_keys=False))
    return path
