"""The study's design (specification §6) as data: the scales, their settings, and the runs.

The study is a fixed list of runs (:func:`study_runs`), each an ordinary ``metarep run`` of a
config derived from the scale's base setting:

- ``pool-<method>``: every method (FO-ANIL, ANIL, FO-MAML, MAML, Burer-Monteiro) on one
  finite task pool;
- ``infinite-fo-anil``: the exact infinite-task FO-ANIL dynamics from the same ``B_0``;
- ``infinite-w0``: the same from a non-zero head ``w_0``;
- ``infinite-m_in-<m>``: the same with other inner sample counts, ``inf`` included;
- ``infinite-<method>``: the exact infinite-task dynamics of ANIL, FO-MAML and MAML (one inner
  step) from the same ``B_0``, and ``infinite-anil-m_in-inf``: ANIL with ``m_in = inf``;
- ``floor-N<n>-s<seed>``: FO-ANIL trained to its finite-pool floor on pools of several sizes
  N and seeds (docs/finite_pool_floor.md);
- ``relu<L>-<method>-s<seed>``: the appendix study with ReLU bodies of ``L`` hidden layers,
  one run per seed (tasks and initialisation): the model-agnostic methods on fresh tasks at
  every step (the regime of the theorem, many tasks), Burer-Monteiro on a pool of N tasks (it
  keeps a head per task); ``relu<L>-fo-anil-pool-s<seed>``: FO-ANIL on that pool, the negative
  control of the unlearning. Where claims are made, each method's first-seed run is also
  evaluated at 4/5 of its steps (``eval.at_steps``), which tells whether the test risk still
  moves.
"""

from __future__ import annotations

import copy
import re
from dataclasses import dataclass
from fractions import Fraction
from typing import Any

from metarep.errors import ConfigError

SCALES = ("quick", "default", "paper")
POOL_METHODS = ("fo-anil", "anil", "fo-maml", "maml", "mtl")
MODEL_AGNOSTIC = ("fo-anil", "anil", "fo-maml", "maml")
INFINITE_METHODS = ("anil", "fo-maml", "maml")
"""The methods with an exact infinite-task run of their own besides FO-ANIL
(``infinite-<method>``, :data:`SCALE_SETTINGS` ``infinite_method_steps`` steps)."""

_PAPER_PROBLEM = {"d": 50, "k": 5, "noise_var": 4.0, "head_cov": "linear", "seed": 0}

# Per scale: the base config tree, and the sizes of the other parts of the study.
SCALE_SETTINGS: dict[str, dict[str, Any]] = {
    "quick": {
        "base": {
            "problem": {"d": 20, "k": 3, "noise_var": 1.0, "head_cov": "linear", "seed": 0},
            "tasks": {"n": 1000, "m_in": 10, "m_out": 10, "seed": 1},
            "model": {"width": 20, "init_scale": 1.0, "seed": 2},
            "method": {"inner_lr": 0.5, "outer_lr": 0.2, "inner_steps": 1},
            "train": {"steps": 300, "record_every": "log"},
            "eval": {"shots": [3, 5, 10, 20, 40], "n_tasks": 500, "adapt_steps": 1, "seed": 3},
        },
        "infinite_steps": 20_000,
        "infinite_record_every": "log",
        "infinite_method_steps": 1000,
        "m_in_values": (5, 10, 40, "inf"),
        "floor": {"n_values": (250, 1000, 4000), "seeds": (1, 2), "steps": 5000},
        # A smoke test of figure (f) (no claims at this scale): small enough to take seconds.
        "relu": {"problem.d": 20, "tasks.n": 250, "train.steps": 300, "train.record_every": "log",
                 "model.width": 8, "model.hidden_width": 10, "eval.shots": [5, 10, 20],
                 "eval.n_tasks": 200},
        "relu_study": {"seeds": (1,), "claims": False, "fresh_tasks_per_step": 125},
    },
    "default": {
        "base": {
            "problem": _PAPER_PROBLEM,
            "tasks": {"n": 5000, "m_in": 20, "m_out": 10, "seed": 1},
            "model": {"width": 50, "init_scale": 1.0, "seed": 2},
            "method": {"inner_lr": 0.5, "outer_lr": 0.2, "inner_steps": 1},
            "train": {"steps": 2000, "record_every": "log"},
            "eval": {"shots": [5, 10, 20, 40, 80, 160], "n_tasks": 2000, "adapt_steps": 1,
                     "seed": 3},
        },
        "infinite_steps": 200_000,
        "infinite_record_every": "log",
        "infinite_method_steps": 1000,
        "m_in_values": (5, 20, 80, "inf"),
        "floor": {"n_values": (2000, 4000, 8000), "seeds": (1, 2), "steps": 3000},
        "relu": {"problem.d": 20, "tasks.n": 1000, "train.steps": 5000, "train.record_every": "log",
                 "model.width": 8, "model.hidden_width": 10,
                 "eval.shots": [5, 10, 20, 40], "eval.n_tasks": 1000},
        "relu_study": {"seeds": (1, 2, 3), "claims": True, "fresh_tasks_per_step": 500},
    }
}


def _merged(tree: dict[str, Any], changes: dict[str, Any]) -> dict[str, Any]:
    """``tree`` with ``changes`` merged in, recursively (neither is modified)."""
    out = dict(tree)
    for key, value in changes.items():
        out[key] = _merged(out[key], value) if isinstance(value, dict) else value
    return out


# The paper scale: the default scale's setting with long runs and more test tasks.
SCALE_SETTINGS["paper"] = _merged(SCALE_SETTINGS["default"], {
    "base": {"train": {"steps": 10_000, "record_every": "log"}, "eval": {"n_tasks": 5000}},
    "infinite_steps": 1_000_000,
    "infinite_record_every": "log",
    "infinite_method_steps": 10_000,
    "floor": {"n_values": (2000, 8000, 32000), "seeds": (1, 2, 3), "steps": 6000},
    "relu": {"problem.d": 40, "model.width": 16, "model.hidden_width": 20, "tasks.n": 5000,
             "train.steps": 20_000, "eval.n_tasks": 2000},
    "relu_study": {"fresh_tasks_per_step": 2500},
})

# The appendix study's setting (on top of the scale's base; d, k', the hidden width, N and the
# steps per scale): ReLU bodies are trained on tasks with k = 2 isotropic heads, less label noise
# and few inner samples, where a representation can pay off against regression at small m_test:
# ReLU features are non-negative, so one head step recovers only part of a linear signal. alpha =
# 0.5, beta = 0.1 keeps FO-MAML stable on ReLU bodies (alpha = 1 diverges). The model-agnostic
# methods draw fresh tasks at every step (``relu_study`` ``fresh_tasks_per_step``, half the pool's
# N; drawing them makes a run 1.2-2.2 times as long as on the pool, measured at ``default``). On a
# pool of N = 1000 the deeper body's share of W1 outside span(B*) stops at a floor (0.44) and then
# rises as the body fits the pool's noise, its test risk rising with it; with fresh tasks it falls
# to a few hundredths and the test risk settles (measured; docs/study.md). Where claims are made,
# the study checks that W1 and the test risk have stopped moving (with three layers ANIL and MAML
# strand units of W1 outside span(B*) in some seeds and do not settle: docs/study.md). The runs
# are in float32. They draw their tasks with numpy's sampler: with torch's (``tasks.sampler:
# torch``, 1.2-2.25 times faster per fresh-task step) the three-layer MAML run of seed 1 diverged
# at step 1380 of 5000 (``default``, measured), while float32 training on the same tasks drawn in
# float64 did not: MAML on ReLU bodies at beta = 0.1 is at the edge of stability, and which stream
# crosses it is chance (docs/study.md).
RELU_SETTING: dict[str, Any] = {
    "model.kind": "relu", "problem.k": 2, "problem.head_cov": "isotropic",
    "problem.noise_var": 0.25, "tasks.m_in": 5, "tasks.m_out": 10, "model.width": 16,
    "model.init_scale": 0.5, "method.inner_lr": 0.5, "method.outer_lr": 0.1,
    "train.dtype": "float32",
}


class Runs:
    """The names of the study's runs (each its directory under ``runs/``), in one place."""

    INFINITE = "infinite-fo-anil"
    """Exact infinite-task FO-ANIL from the pool runs' ``B_0`` (the scale's ``m_in``)."""

    INFINITE_HEAD = "infinite-w0"
    """The same from a non-zero head ``w_0`` (``model.head_scale = 1``)."""

    @staticmethod
    def pool(method: str) -> str:
        """``method`` on the scale's task pool."""
        return f"pool-{method}"

    @staticmethod
    def infinite(method: str) -> str:
        """The exact infinite-task dynamics of ``method`` from the pool runs' ``B_0``
        (:attr:`INFINITE` for FO-ANIL)."""
        return f"infinite-{method}"

    @staticmethod
    def m_in(m_in: int | str, method: str = "fo-anil") -> str:
        """Exact infinite-task ``method`` with ``m_in`` inner samples (``inf`` included):
        ``infinite-m_in-<m>`` for FO-ANIL, ``infinite-<method>-m_in-<m>`` otherwise."""
        return f"infinite-m_in-{m_in}" if method == "fo-anil" else f"infinite-{method}-m_in-{m_in}"

    @staticmethod
    def floor(n: int, seed: int) -> str:
        """FO-ANIL on a pool of ``n`` tasks drawn with ``tasks.seed = seed``, trained to its
        finite-pool floor."""
        return f"floor-N{n}-s{seed}"

    @staticmethod
    def floors(scale: str) -> tuple[str, ...]:
        """Every floor run of ``scale``, by N then seed."""
        floor = SCALE_SETTINGS[check_scale(scale)]["floor"]
        return tuple(Runs.floor(n, seed) for n in floor["n_values"] for seed in floor["seeds"])

    @staticmethod
    def relu(layers: int, method: str, seed: int) -> str:
        """``method`` on ReLU bodies with ``layers`` hidden layers (the appendix study), with
        the tasks (fresh ones, or Burer-Monteiro's pool) and the initialisation of ``seed``."""
        return f"relu{layers}-{method}-s{seed}"

    @staticmethod
    def is_relu(name: str) -> bool:
        """Whether ``name`` is a run of the ReLU study (:meth:`relu`, :meth:`relu_pool`)."""
        return re.fullmatch(r"relu\d+-.+-s\d+", name) is not None

    @staticmethod
    def relu_pool(layers: int, seed: int) -> str:
        """FO-ANIL on ReLU bodies trained on the pool of N tasks of ``seed`` (the ReLU study's
        negative control: a finite pool stops unlearning at a floor)."""
        return f"relu{layers}-fo-anil-pool-s{seed}"

    @staticmethod
    def relu_seeds(scale: str) -> tuple[int, ...]:
        """The seeds of the ReLU study at ``scale``."""
        return tuple(SCALE_SETTINGS[check_scale(scale)]["relu_study"]["seeds"])

    @staticmethod
    def relu_claim_seeds(scale: str) -> tuple[int, ...]:
        """The seeds the ReLU claims are measured over: none at a scale whose ReLU runs are
        a smoke test, too short to converge (``quick``)."""
        study = SCALE_SETTINGS[check_scale(scale)]["relu_study"]
        return tuple(study["seeds"]) if study["claims"] else ()


RELU_LAYERS = (1, 2)


@dataclass(frozen=True)
class StudyRun:
    """One run of the study: its directory name and its dotted overrides."""

    name: str
    overrides: dict[str, Any]


def check_scale(scale: str) -> str:
    """``scale`` if it is one of :data:`SCALES`, else :class:`ConfigError`."""
    if scale not in SCALES:
        raise ConfigError("--scale", f"must be one of {', '.join(SCALES)}; got {scale!r}")
    return scale


# Outer step sizes per method: alpha = 0.5, beta = 0.2 is stable for every model-agnostic
# method at every scale (beta = 0.5 makes ANIL and MAML diverge); Burer-Monteiro starts at
# the saddle w_i = 0 and takes beta = 0.3 to leave it within the study's steps (beta = 0.5
# diverged from one of the initialisations tried).
OUTER_LR = {"fo-anil": 0.2, "anil": 0.2, "fo-maml": 0.2, "maml": 0.2, "mtl": 0.3}


FLOOR_DTYPE = "float32"
"""The precision of the floor runs: their claims are about ``perp_norm(T)`` at the 0.1 level
(flat to 1 %, a power law in N), which float32 gives to 7 digits (measured: 0.62366271 against
0.62366273 in float64, ``default``, N = 2000) in 0.55-0.75 of the time, the pool being read
at half the bytes."""


def study_runs(scale: str) -> list[StudyRun]:
    """The runs of the study at ``scale``, in the order they are reported."""
    settings = SCALE_SETTINGS[check_scale(scale)]
    runs = [StudyRun(Runs.pool(method),
                     {"method.name": method, "method.outer_lr": OUTER_LR[method]})
            for method in POOL_METHODS]
    infinite = {"tasks.n": "infinite", "train.steps": settings["infinite_steps"],
                "train.record_every": settings["infinite_record_every"]}
    runs.append(StudyRun(Runs.INFINITE, dict(infinite)))
    runs.append(StudyRun(Runs.INFINITE_HEAD, {**infinite, "model.head_scale": 1.0}))
    base_m_in = settings["base"]["tasks"]["m_in"]
    for m_in in settings["m_in_values"]:
        if m_in != base_m_in:
            runs.append(StudyRun(Runs.m_in(m_in), {**infinite, "tasks.m_in": m_in}))
    # The other methods' exact dynamics cost 5-40 times FO-ANIL's per step, and their claims
    # are settled well before infinite_steps (docs/study.md), so they run fewer steps.
    exact = {**infinite, "train.steps": settings["infinite_method_steps"]}
    for method in INFINITE_METHODS:
        runs.append(StudyRun(Runs.infinite(method), {
            **exact, "method.name": method, "method.outer_lr": OUTER_LR[method]}))
    runs.append(StudyRun(Runs.m_in("inf", "anil"), {
        **exact, "method.name": "anil", "method.outer_lr": OUTER_LR["anil"], "tasks.m_in": "inf"}))
    floor = settings["floor"]
    for n in floor["n_values"]:
        for seed in floor["seeds"]:
            runs.append(StudyRun(Runs.floor(n, seed), {
                "tasks.n": n, "tasks.seed": seed, "train.steps": floor["steps"],
                "eval.n_tasks": 200, "train.dtype": FLOOR_DTYPE}))
    return runs + relu_runs(settings)


def relu_runs(settings: dict[str, Any]) -> list[StudyRun]:
    """The runs of the ReLU study of a scale's ``settings``: per depth and method one run per
    seed (fresh tasks for the model-agnostic methods, the pool for Burer-Monteiro), FO-ANIL on
    the first seed's pool; where claims are made, each method's first seed is also evaluated at
    4/5 of its steps (:func:`early_steps`)."""
    relu, study = settings["relu"], settings["relu_study"]
    seeds = study["seeds"]
    fresh = {"tasks.n": "online", "train.tasks_per_step": study["fresh_tasks_per_step"]}
    runs = []
    for layers in RELU_LAYERS:
        depth = {**RELU_SETTING, **relu, "model.hidden_layers": layers}
        for method in POOL_METHODS:
            setting = {**depth, "method.name": method, **(fresh if method in MODEL_AGNOSTIC
                                                           else {})}
            seeded = {seed: {**setting, "tasks.seed": seed, "model.seed": seed} for seed in seeds}
            if study["claims"]:  # the first seed's run, evaluated earlier too
                seeded[seeds[0]]["eval.at_steps"] = [early_steps(relu["train.steps"])]
            runs += [StudyRun(Runs.relu(layers, method, seed), seeded[seed]) for seed in seeds]
        runs.append(StudyRun(Runs.relu_pool(layers, seeds[0]), {
            **depth, "method.name": "fo-anil", "tasks.seed": seeds[0], "model.seed": seeds[0]}))
    return runs


SETTLED_FRACTION = Fraction(1, 5)
"""The last part of training over which the study checks that a run has stopped moving (the
floor runs, W1's share, the ReLU test risk through its evaluation at :func:`early_steps`)."""


def early_steps(steps: int) -> int:
    """The step at which the ReLU study evaluates the first seed's runs a first time:
    ``(1 - SETTLED_FRACTION) steps`` (4/5), rounded down."""
    return int(steps * (1 - SETTLED_FRACTION))


def base_tree(scale: str) -> dict[str, Any]:
    """The base config tree of ``scale`` (a fresh copy)."""
    return copy.deepcopy(SCALE_SETTINGS[check_scale(scale)]["base"])
