"""metarep: gradient-based meta-learning of shared representations.

The package is layered; each layer imports only those below it:

- :mod:`metarep.errors`: the two errors of bad input;
- :mod:`metarep.core`: the paper in numpy (problem and tasks, the linear model, the methods,
  exact infinite-task dynamics, Monte Carlo, theory, measures, evaluation, seeding, and the
  plain per-task reference every kernel is tested against);
- :mod:`metarep.engine`: the torch engine (any ``torch.nn.Module``) and the networks;
- :mod:`metarep.run`: the config schema, input files, one backend per kind of run, the one
  training loop, the run directory, the experiment and its figures;
- :mod:`metarep.sweeps`: sweep files, the driver (execution and resume), executors, collect;
- :mod:`metarep.study`: the paper's study as data, its claims, the report, ``reproduce``;
- :mod:`metarep.cli`: the ``metarep`` command.

``import metarep`` is light and has no side effects: the names below are imported from their
modules on first use (``metarep.run`` imports the run layer, ``metarep.FOANIL`` the methods),
and nothing touches matplotlib's backend. ``metarep.run`` is the run layer; one experiment is
``metarep.run.run_experiment(config, out_dir)``
(:func:`metarep.run.experiment.run_experiment`).
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_PUBLIC: dict[str, str] = {
    "ArgumentError": "metarep.errors", "ConfigError": "metarep.errors",
    "Problem": "metarep.core.problem", "make_problem": "metarep.core.problem",
    "TaskBatch": "metarep.core.tasks", "sample_tasks": "metarep.core.tasks",
    "LinearParams": "metarep.core.model", "init_linear": "metarep.core.model",
    "ANIL": "metarep.core.methods", "FOANIL": "metarep.core.methods",
    "FOMAML": "metarep.core.methods", "MAML": "metarep.core.methods",
    "MTL": "metarep.core.methods", "MTLState": "metarep.core.methods",
    "Method": "metarep.core.methods", "adapt_head": "metarep.core.methods",
    "make_method": "metarep.core.methods", "meta_gradient": "metarep.core.methods",
    "measure": "metarep.core.measures", "subspace_distance": "metarep.core.measures",
    "EvalRow": "metarep.core.evaluation", "evaluate": "metarep.core.evaluation",
    "ExactFOANIL": "metarep.core.infinite", "expected_update": "metarep.core.infinite",
    "ExactInnerLoop": "metarep.core.infinite", "exact_dynamics": "metarep.core.infinite",
    "monte_carlo_update": "metarep.core.monte_carlo",
    "lambda_star": "metarep.core.theory", "one_step_risk": "metarep.core.theory",
    "predicted_limits": "metarep.core.theory",
    "Config": "metarep.run.schema", "load_config": "metarep.run.schema",
    "Diverged": "metarep.run.loop",
    "RunResult": "metarep.run.experiment", "prepare": "metarep.run.experiment",
    "run_experiment": "metarep.run.experiment",
    "grid": "metarep.run.simulate", "simulate_batch": "metarep.run.simulate",
    "SweepOptions": "metarep.sweeps.driver", "run_sweep": "metarep.sweeps.driver",
    "collect": "metarep.sweeps.collect",
    "reproduce": "metarep.study.reproduce",
}
SUBPACKAGES = ("core", "engine", "run", "sweeps", "study", "cli", "errors")

__all__ = sorted(_PUBLIC)


def __getattr__(name: str) -> Any:
    """Import a public name (or a subpackage) on first use (PEP 562)."""
    if name in _PUBLIC:
        value = getattr(importlib.import_module(_PUBLIC[name]), name)
    elif name in SUBPACKAGES:
        value = importlib.import_module(f"metarep.{name}")
    else:
        raise AttributeError(f"module 'metarep' has no attribute {name!r}")
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_PUBLIC, *SUBPACKAGES])
