"""Checks of the maths' arguments, shared by the methods and the torch engine; each raises
:class:`~metarep.errors.ArgumentError` naming the argument."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from metarep.errors import ArgumentError


def check_step_size(argument: str, value: float) -> float:
    """``value`` as a float if it is a finite number > 0 (a step size alpha or beta)."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not (
            math.isfinite(value) and value > 0):
        raise ArgumentError(argument, f"must be a finite number > 0, got {value!r}")
    return float(value)


def check_count(argument: str, value: int, lowest: int = 1) -> int:
    """``value`` if it is an integer >= ``lowest`` (a number of steps or tasks)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < lowest:
        raise ArgumentError(argument, f"must be an integer >= {lowest}, got {value!r}")
    return value


def per_config(value: float | Sequence[float] | np.ndarray, b: int, key: str,
               lo: float, strict: bool) -> np.ndarray:
    """``value`` broadcast to (b,) float64 (one per configuration of a batch), checked
    ``> lo`` (``strict``) or ``>= lo``; NaN is refused."""
    array = np.broadcast_to(np.asarray(value, dtype=np.float64), (b,)).copy()
    bad = np.isnan(array) | ((array <= lo) if strict else (array < lo))
    if np.any(bad):
        raise ArgumentError(key, f"must be {'>' if strict else '>='} {lo}, got {array[bad][0]}")
    return array
