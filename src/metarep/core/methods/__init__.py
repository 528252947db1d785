"""Meta-learning methods on the linear model ``x -> x^T B w``, vectorised over tasks (spec
section 3), one module per family:

- :mod:`~metarep.core.methods.fo_anil`: :class:`FOANIL`, the paper's method, at the memory bound;
- :mod:`~metarep.core.methods.inner_loop`: :class:`ANIL`, :class:`FOMAML`, :class:`MAML` and
  their outer gradient :func:`meta_gradient` (exact by reverse mode, or first order);
- :mod:`~metarep.core.methods.mtl`: :class:`MTL`, multi-task learning (Burer-Monteiro);
- :mod:`~metarep.core.methods.gradients`: the loss, its gradients and the head adaptation;
- :mod:`~metarep.core.methods.fused`: a residual and its transposed product in one pass over
  each task's inputs (compiled with numba), FO-ANIL's kernel on numpy arrays;
- :mod:`~metarep.core.methods.threads`: the thread pool and BLAS threads of the kernels.

Each method is a small frozen object with a pure ``step(state, batch) -> (state, loss)``; the
state is the model ``(B, w)`` (:class:`~metarep.core.model.LinearParams`) or, for ``mtl``,
:class:`MTLState`, built by ``init_state``. The readable per-task versions every kernel is
tested against are in :mod:`metarep.core.reference`.
"""

from __future__ import annotations

from typing import Protocol

from metarep.core.methods.fo_anil import FOANIL
from metarep.core.methods.gradients import adapt_head, body_gradient, head_gradient, loss
from metarep.core.methods.inner_loop import ANIL, FOMAML, MAML, InnerLoopMethod, meta_gradient
from metarep.core.methods.mtl import MTL, MTLState
from metarep.core.model import LinearParams
from metarep.core.tasks import TaskBatch
from metarep.errors import ArgumentError

State = LinearParams | MTLState
"""What a method trains: the model parameters, or (mtl) the model plus per-task heads. Both
are named tuples with fields ``B`` and ``w``, so the measures read any state."""


class Method(Protocol):
    """An outer step of a meta-learning algorithm on the linear model."""

    name: str

    def init_state(self, params: LinearParams, n_tasks: int) -> State:
        """The training state at the initialisation ``params`` for a pool of ``n_tasks``."""
        ...

    def step(self, state: State, batch: TaskBatch) -> tuple[State, float]:
        """One outer step on ``batch``; returns the new state and the meta-training loss
        (the outer loss after adaptation, averaged over the tasks, at the old state)."""
        ...


INNER_LOOP_METHODS: dict[str, type[InnerLoopMethod]] = {
    method.name: method for method in (FOANIL, ANIL, FOMAML, MAML)
}
METHOD_NAMES: tuple[str, ...] = (*INNER_LOOP_METHODS, MTL.name)


def make_method(name: str, inner_lr: float, outer_lr: float, inner_steps: int) -> Method:
    """The method called ``name`` (one of :data:`METHOD_NAMES`).

    ``mtl`` has no inner loop and ignores ``inner_lr`` and ``inner_steps``.
    """
    if name == MTL.name:
        return MTL(outer_lr)
    if name in INNER_LOOP_METHODS:
        return INNER_LOOP_METHODS[name](inner_lr, outer_lr, inner_steps)
    raise ArgumentError("name", f"must be one of {', '.join(METHOD_NAMES)}; got {name!r}")


__all__ = [
    "ANIL",
    "FOANIL",
    "FOMAML",
    "MAML",
    "METHOD_NAMES",
    "MTL",
    "MTLState",
    "Method",
    "State",
    "adapt_head",
    "body_gradient",
    "head_gradient",
    "loss",
    "make_method",
    "meta_gradient",
]
