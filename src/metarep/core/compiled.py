"""Loops of the maths compiled by numba, on demand.

numba is imported and a loop compiled on its first call, so importing the maths loads
neither. The machine code is cached on disk (numba's ``cache=True``), so later processes load
it (a fraction of a second) instead of compiling it again; where numba finds no writable cache
directory (a read-only install and home) the loop is compiled in each process instead. The
loops release the GIL, so threads can run them side by side. Reassociation lets the compiler
vectorise sums; NaN and infinity keep their IEEE meaning (no ``nnan``/``ninf``), so a diverging
run still shows non-finite numbers.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

FASTMATH = {"reassoc", "contract"}
"""numba's fastmath flags for every compiled loop."""


def compile_loop(function: Callable[..., Any]) -> Callable[..., Any]:
    """``function`` compiled by numba (``nogil``, :data:`FASTMATH`), cached on disk where
    possible."""
    import numba

    try:
        return numba.njit(nogil=True, cache=True, fastmath=FASTMATH)(function)
    except RuntimeError:  # no writable cache directory
        return numba.njit(nogil=True, fastmath=FASTMATH)(function)
