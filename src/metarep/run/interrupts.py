"""Stopping on SIGINT or SIGTERM without losing what was computed.

Python turns SIGINT (Ctrl-C) into :class:`KeyboardInterrupt`; :func:`sigterm_interrupts` turns
SIGTERM (``kill``, a cluster's scheduler, a container stopping) into :class:`Terminated`, a
:class:`KeyboardInterrupt` too, so one ``except KeyboardInterrupt`` saves the run in both
cases (:func:`metarep.run.experiment.run_experiment` writes its records and a checkpoint,
then re-raises). :func:`exit_code` is the conventional status of a process stopped by the
signal: 128 + its number (130 for SIGINT, 143 for SIGTERM).
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from types import FrameType


class Terminated(KeyboardInterrupt):
    """SIGTERM (or the signal ``signum``) arrived: stop as for Ctrl-C."""

    def __init__(self, signum: int = signal.SIGTERM):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum

    def __reduce__(self) -> tuple[type[Terminated], tuple[int]]:
        """Pickled by its signal number (a pool worker sends it back to the driver; an
        exception that cannot be unpickled would break the pool)."""
        return Terminated, (self.signum,)


_received: list[int] = []
"""The signals :func:`_raise_terminated` turned into interrupts, latest last (a library
between the signal and its handler, such as Ray, may re-raise a plain KeyboardInterrupt)."""


def _raise_terminated(signum: int, frame: FrameType | None) -> None:
    _received.append(signum)
    raise Terminated(signum)


def install_sigterm_handler() -> None:
    """Make SIGTERM raise :class:`Terminated` in this process from now on (in the main thread
    only, where Python delivers signals; elsewhere nothing changes)."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _raise_terminated)


@contextmanager
def sigterm_interrupts() -> Iterator[None]:
    """Within the block, SIGTERM raises :class:`Terminated`; the previous handler is restored
    afterwards."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, _raise_terminated)
    _received.clear()
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _signum(error: KeyboardInterrupt) -> int:
    """The signal behind ``error``: its own (:class:`Terminated`), else the last one turned
    into an interrupt here, else SIGINT (Python's own KeyboardInterrupt)."""
    return int(getattr(error, "signum", None) or (_received[-1] if _received
                                                  else signal.SIGINT))


def signal_name(error: KeyboardInterrupt) -> str:
    """``SIGTERM`` for :class:`Terminated` (or a re-raised one), ``SIGINT`` otherwise."""
    return signal.Signals(_signum(error)).name


def exit_code(error: KeyboardInterrupt) -> int:
    """128 + the signal's number: 130 for SIGINT (Ctrl-C), 143 for SIGTERM."""
    return 128 + _signum(error)


@contextmanager
def deferred_interrupts() -> Iterator[None]:
    """Hold SIGINT and SIGTERM back during the block (the saving of a stopped run: a second
    Ctrl-C must not cut it short); one that arrived meanwhile is delivered after it."""
    if not hasattr(signal, "pthread_sigmask") \
            or threading.current_thread() is not threading.main_thread():
        yield
        return
    held = {signal.SIGINT, signal.SIGTERM}
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, held)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)
