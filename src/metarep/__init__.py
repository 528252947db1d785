"""metarep: gradient-based meta-learning of shared representations.

The public API: configs (:func:`load_config`, :class:`Config`), tasks (:func:`make_problem`,
:func:`sample_tasks`), the linear model (:class:`LinearParams`), algorithms (:class:`FOANIL`),
measures, evaluation, theory, and :func:`run` for a whole experiment.
"""

from metarep.algorithms import FOANIL, Method, adapt_head, make_method
from metarep.config import Config, ConfigError, load_config
from metarep.evaluation import EvalRow, evaluate
from metarep.experiments import RunResult, prepare, run
from metarep.metrics import measure, subspace_distance
from metarep.models import LinearParams, init_linear, load_params
from metarep.tasks import Problem, TaskBatch, load_pool, make_problem, sample_tasks
from metarep.theory import lambda_star
from metarep.training import Diverged

__all__ = [
    "FOANIL", "Config", "ConfigError", "Diverged", "EvalRow", "LinearParams", "Method",
    "Problem", "RunResult", "TaskBatch", "adapt_head", "evaluate", "init_linear", "lambda_star",
    "load_config", "load_params", "load_pool", "make_method", "make_problem", "measure",
    "prepare", "run", "sample_tasks", "subspace_distance",
]
__version__ = "0.1.0"
