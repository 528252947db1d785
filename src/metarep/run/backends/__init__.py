"""One backend per kind of run, built once from the config (:func:`build_backend`):

- ``linear``: the linear model on a task pool or online tasks, trained by a method of
  :mod:`metarep.core.methods` (:class:`~metarep.run.backends.linear.LinearBackend`);
- ``infinite``: the exact infinite-task dynamics (``tasks.n: infinite``,
  :class:`~metarep.run.backends.infinite.InfiniteTaskBackend`);
- ``engine``: ReLU networks trained by the torch engine (``model.kind: relu``,
  :class:`~metarep.run.backends.engine.EngineBackend`).

``linear`` and ``infinite`` compute in numpy, or with the same formulas in torch on
``train.device`` (``train.backend: torch``, or a GPU ``train.device``:
:func:`~metarep.run.backends.linear.array_backend`).

Every backend is a :class:`Backend`: the experiment runs init -> loop(step) -> measure /
evaluate / theory through it and never asks which kind of run it holds.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Protocol

import numpy as np

from metarep.core.evaluation import EvalRow, HeldOutRow
from metarep.run.backends.engine import EngineBackend
from metarep.run.backends.infinite import InfiniteTaskBackend
from metarep.run.backends.linear import LinearBackend, array_backend
from metarep.run.backends.sources import RunInputs, resolve_inputs
from metarep.run.schema import Config


class Backend(Protocol):
    """A run of one configuration: its inputs, its states and what is measured of them.

    It is also the training loop's :class:`~metarep.run.loop.Stepper` for a batch of one.
    """

    inputs: RunInputs
    config: Config
    method_name: str

    def initial_state(self) -> Any:
        """The training state at step 0."""
        ...

    def arrays(self, state: Any) -> dict[str, np.ndarray]:
        """The model's named arrays at a state (``params.npz``)."""
        ...

    def state_arrays(self, state: Any) -> dict[str, np.ndarray]:
        """The exact training state as named arrays (``checkpoint.npz``): :meth:`restore`
        gives back the very same state, so a resumed run is bit-identical."""
        ...

    def restore(self, arrays: Mapping[str, np.ndarray]) -> Any:
        """The state holding ``arrays`` (the inverse of :meth:`state_arrays`)."""
        ...

    def params(self, state: Any) -> Any:
        """The model's parameters at ``state`` (``(B, w)``, or the engine state)."""
        ...

    def step(self, state: Any, t: int) -> tuple[Any, np.ndarray]: ...

    def finite(self, state: Any) -> np.ndarray: ...

    def measures(self, state: Any, indices: Sequence[int] = (0,)) -> list[dict[str, float]]:
        """The recorded measures of the runs ``indices`` (a run alone: ``(0,)``)."""
        ...

    def take(self, state: Any, index: int) -> Any: ...

    def park(self, state: Any, stopped: np.ndarray) -> None: ...

    def evaluate(self, state: Any) -> list[EvalRow]:
        """The test-time evaluation of the learned model (``eval.csv``)."""
        ...

    def held_out(self, state: Any) -> list[HeldOutRow]:
        """The evaluation on held-out tasks of a pool without ground truth (``heldout.csv``)."""
        ...

    def theory(self, final: Mapping[str, float], rows: list[EvalRow]) -> dict[str, Any] | None:
        """The theory's predictions next to the final measures (``summary.json``)."""
        ...

    def projected_gram(self, state: Any) -> np.ndarray | None:
        """``B_star^T B B^T B_star`` where it means something."""
        ...


BACKENDS: dict[str, type] = {"linear": LinearBackend, "infinite": InfiniteTaskBackend,
                             "engine": EngineBackend}


def run_kind(config: Config) -> str:
    """The kind of run of ``config``: ``engine`` for ``model.kind: relu``, ``infinite`` for
    ``tasks.n: infinite``, else ``linear``."""
    if config.model.kind == "relu":
        return "engine"
    return "infinite" if config.tasks.n == "infinite" else "linear"


def build_backend(config: Config) -> Backend:
    """The backend of ``config``, with its inputs resolved (files read, sizes checked).

    Raises :class:`~metarep.errors.ConfigError` for anything wrong with the input (checking
    first where a linear run computes: :func:`~metarep.run.backends.linear.array_backend`);
    writes nothing.
    """
    kind = run_kind(config)
    if kind == "engine":
        return EngineBackend(resolve_inputs(config))
    xp = array_backend(config)
    return BACKENDS[kind](resolve_inputs(config), xp)


__all__ = ["BACKENDS", "Backend", "EngineBackend", "InfiniteTaskBackend", "LinearBackend",
           "RunInputs", "build_backend", "run_kind"]
