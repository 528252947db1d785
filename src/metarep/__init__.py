"""metarep: gradient-based meta-learning of shared representations.

The public API: configs (:func:`load_config`, :class:`Config`), tasks (:func:`make_problem`,
:func:`sample_tasks`), the linear model (:class:`LinearParams`), algorithms (:class:`FOANIL`,
:class:`ANIL`, :class:`FOMAML`, :class:`MAML`, :class:`MTL`),
measures, evaluation, theory, exact infinite-task dynamics (:func:`simulate_batch`,
:class:`ExactFOANIL`, :func:`monte_carlo_update` in :mod:`metarep.population`),
:func:`run` for a whole experiment, and sweeps of many runs (:func:`run_sweep`, :func:`collect`
in :mod:`metarep.sweeps`).
"""

from metarep.algorithms import (
    ANIL,
    FOANIL,
    FOMAML,
    MAML,
    MTL,
    Method,
    MTLState,
    adapt_head,
    make_method,
    meta_gradient,
)
from metarep.config import Config, ConfigError, load_config
from metarep.evaluation import EvalRow, evaluate
from metarep.experiments import RunResult, prepare, run
from metarep.metrics import measure, subspace_distance
from metarep.models import LinearParams, init_linear, load_params
from metarep.population import ExactFOANIL, grid, monte_carlo_update, simulate_batch
from metarep.sweeps import collect, run_sweep
from metarep.tasks import Problem, TaskBatch, load_pool, make_problem, sample_tasks
from metarep.theory import lambda_star, one_step_risk, predicted_limits
from metarep.training import Diverged

__all__ = [
    "ANIL", "FOANIL", "FOMAML", "MAML", "MTL", "Config", "ConfigError", "Diverged", "EvalRow",
    "ExactFOANIL", "LinearParams", "MTLState", "Method", "Problem", "RunResult", "TaskBatch",
    "adapt_head", "collect", "evaluate", "grid", "init_linear", "lambda_star", "load_config",
    "load_params", "load_pool", "make_method", "make_problem", "measure", "meta_gradient",
    "monte_carlo_update", "one_step_risk", "predicted_limits", "prepare", "run", "run_sweep",
    "sample_tasks", "simulate_batch", "subspace_distance",
]
__version__ = "0.1.0"
