"""Array namespaces: one formula per update, on numpy arrays or on other arrays (torch
tensors on a device).

The kernels of :mod:`metarep.core.methods` and :mod:`metarep.core.infinite` are written once,
with numpy's names, against the namespace of their inputs (:func:`array_namespace`): numpy
itself for numpy arrays, or the namespace registered for the inputs' type
(:func:`register_namespace`), which gives numpy's names and meanings to another library's
functions. :mod:`metarep.engine.arrays` registers torch tensors on importing; this layer
never imports torch.

A registered namespace provides what the kernels call, with numpy's semantics: ``einsum``,
``matmul``, ``add``, ``subtract``, ``multiply`` (``out=`` writing into an array or a view of
one), ``tile``, ``broadcast_to``, ``sum`` and ``mean`` (``axis=``), ``isfinite``, ``all``,
``asarray``, ``ascontiguousarray``, ``empty`` (numpy dtypes), ``concatenate``,
``transpose(x, axes)``, ``copy``, ``vdot``; and ``to_numpy(x)``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

import numpy as np

from metarep.errors import ArgumentError

Array = Any
"""A numpy array, or an array of a registered namespace (a torch tensor)."""

_NAMESPACES: list[tuple[type, Callable[[Any], Any]]] = []


def register_namespace(array_type: type, namespace_of: Callable[[Any], Any]) -> None:
    """Compute on arrays of ``array_type`` in ``namespace_of(x)`` (e.g. the torch namespace of
    a tensor's device); registering a type again replaces its namespace."""
    _NAMESPACES[:] = [(t, f) for t, f in _NAMESPACES if t is not array_type]
    _NAMESPACES.append((array_type, namespace_of))


def array_namespace(x: Array) -> Any:
    """The namespace of ``x``: :mod:`numpy` for numpy arrays and for anything of no registered
    type (numbers), else the namespace registered for its type. A torch tensor before
    :mod:`metarep.engine.arrays` is imported (nothing registered for it: numpy would silently
    convert it) is an :class:`~metarep.errors.ArgumentError`."""
    if isinstance(x, np.ndarray):
        return np
    for array_type, namespace_of in _NAMESPACES:
        if isinstance(x, array_type):
            return namespace_of(x)
    if type(x).__module__.split(".")[0] == "torch":
        raise ArgumentError("arrays", "torch tensors compute in the namespace of "
                            "metarep.engine.arrays: import it first")
    return np


def to_numpy(x: Array) -> np.ndarray:
    """``x`` as a numpy array: itself for a numpy array, else its namespace's ``to_numpy``
    (a tensor is copied from its device; a CPU tensor's memory is shared, as ``np.asarray``
    does)."""
    xp = array_namespace(x)
    return np.asarray(x) if xp is np else xp.to_numpy(x)


Arrays = TypeVar("Arrays")


def numpy_state(state: Arrays) -> Arrays:
    """A named tuple of arrays (``LinearParams``, ``MTLState``, ``InfiniteTaskState``) with
    every field as a numpy array (:func:`to_numpy`)."""
    return state._make(to_numpy(array) for array in state)  # type: ignore[attr-defined]


def moved_state(state: Arrays, xp: Any) -> Arrays:
    """A named tuple of arrays with every field as an array of the namespace ``xp`` (numpy
    arrays moved to a device, say), values and dtypes unchanged."""
    return state._make(xp.asarray(array) for array in state)  # type: ignore[attr-defined]
