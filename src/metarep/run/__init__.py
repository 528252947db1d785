"""Runs: the config schema, the user's input files, one backend per kind of run, the one
training loop, the run directory, the experiment and its figures.

- :mod:`~metarep.run.schema`: the config (:func:`load_config`, :class:`Config`);
- :mod:`~metarep.run.inputs`: user ``.npz`` files and sizes, errors naming the config key;
- :mod:`~metarep.run.backends`: linear pool, exact infinite tasks, torch engine;
- :mod:`~metarep.run.loop`: the training loop for ``b >= 1`` runs and its divergence rule;
- :mod:`~metarep.run.rundir`: the run directory's files (writing and reading);
- :mod:`~metarep.run.experiment`: :func:`run_experiment`, :func:`prepare`, :func:`run_batch`;
- :mod:`~metarep.run.simulate`: many infinite-task configurations as one table;
- :mod:`~metarep.run.figures`, :mod:`~metarep.run.atomic`: run figures, atomic writes.
"""

from __future__ import annotations

import importlib
from typing import Any

_PUBLIC = {"run_experiment": "metarep.run.experiment", "prepare": "metarep.run.experiment",
           "run_batch": "metarep.run.experiment", "RunResult": "metarep.run.experiment",
           "Config": "metarep.run.schema", "load_config": "metarep.run.schema",
           "Diverged": "metarep.run.loop"}


def __getattr__(name: str) -> Any:
    """``run_experiment``, ``prepare``, ``run_batch``, ``RunResult``, ``Config``,
    ``load_config`` and ``Diverged``, imported from their modules on first use (PEP 562)."""
    if name not in _PUBLIC:
        raise AttributeError(f"module 'metarep.run' has no attribute {name!r}")
    value = getattr(importlib.import_module(_PUBLIC[name]), name)
    globals()[name] = value
    return value
