"""The user's input files and sizes, checked before anything is computed or written.

Every problem found here is a :class:`~metarep.errors.ConfigError` naming the config key at
fault: a ``.npz`` file given as ``tasks.from`` (a task pool) or ``model.init_from`` (an
initialisation), a size that cannot fit in memory, a missing optional dependency. The arrays
themselves are checked by the maths (:func:`metarep.core.tasks.task_pool`,
:func:`metarep.core.model.linear_params`, :func:`metarep.engine.networks.relu_from_arrays`),
whose :class:`~metarep.errors.ArgumentError` is turned into the key's error here.
"""

from __future__ import annotations

import importlib
import os
import zipfile
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from metarep.core.model import LinearParams, linear_params
from metarep.core.tasks import TaskPool, task_pool
from metarep.errors import ArgumentError, ConfigError


@contextmanager
def config_errors(keys: str | Mapping[str, str]) -> Iterator[None]:
    """Turn an :class:`~metarep.errors.ArgumentError` of the maths inside the block into a
    :class:`~metarep.errors.ConfigError` naming the config key at fault.

    With a mapping from the maths' arguments to config keys (``{"inner_lr":
    "method.inner_lr"}``), the key of the argument (``method.inner_lr: must be ...``); an
    argument not in the mapping is not the config's fault and its error passes through. With
    one key (a file such as ``tasks.from``), that key, the argument named in the message
    (``tasks.from: y must have shape ...``).
    """
    try:
        yield
    except ArgumentError as error:
        if isinstance(keys, str):
            raise ConfigError(keys, f"{error.argument} {error.message}") from None
        if error.argument not in keys:
            raise
        raise ConfigError(keys[error.argument], error.message) from None


ZIP_MAGIC = (b"PK\x03\x04", b"PK\x05\x06")  # a zip archive's first bytes (an .npz)
NPY_MAGIC = b"\x93NUMPY"


def _container(file: Path, key: str) -> None:
    """Check that ``file`` is an ``.npz`` archive by its first bytes, before numpy reads it:
    :class:`ConfigError` naming ``key`` for a single ``.npy`` array or any other file."""
    with open(file, "rb") as handle:
        head = handle.read(6)
    if head.startswith(NPY_MAGIC):
        raise ConfigError(key, f"{str(file)!r} is a single array (.npy), not an .npz file of "
                          "named arrays (write one with numpy.savez)")
    if not head.startswith(ZIP_MAGIC):
        raise ConfigError(key, f"{str(file)!r} is not an .npz file (a zip archive of named "
                          "arrays, written by numpy.savez)")


def read_npz(path: str | Path, key: str, required: tuple[str, ...]) -> dict[str, np.ndarray]:
    """Read every array of a user-supplied ``.npz`` file as finite float64.

    Raises :class:`ConfigError` naming the config ``key`` for a missing or unreadable file, a
    file that is not an ``.npz`` archive (a ``.npy`` array, text), a missing ``required``
    array, or an array that is not all finite real numbers (objects, complex, text).
    """
    file = Path(path)
    if not file.is_file():
        raise ConfigError(key, f"file not found: {str(path)!r}")
    try:
        _container(file, key)
        with open(file, "rb") as handle, np.load(handle, allow_pickle=False) as data:
            arrays = {name: _array(data, name, key, file) for name in data.files}
    except (OSError, EOFError, zipfile.BadZipFile) as error:
        raise ConfigError(key, f"cannot read {str(path)!r} as .npz: {error}") from None
    for name in required:
        if name not in arrays:
            raise ConfigError(key, f"{path} has no array {name!r} (found: {sorted(arrays)})")
    for name, array in arrays.items():
        real = np.issubdtype(array.dtype, np.integer) or np.issubdtype(array.dtype, np.floating)
        if not real or not np.all(np.isfinite(array)):
            raise ConfigError(key, f"array {name!r} in {path} must hold finite real numbers")
    return {name: array.astype(np.float64) for name, array in arrays.items()}


def _array(data: Any, name: str, key: str, file: Path) -> np.ndarray:
    """The array ``name`` of an open ``.npz``; :class:`ConfigError` for one numpy cannot read
    without unpickling (Python objects) or a damaged member."""
    try:
        return np.asarray(data[name])
    except ValueError as error:
        what = ("holds Python objects, not numbers" if "pickle" in str(error)
                else f"cannot be read: {error}")
        raise ConfigError(key, f"array {name!r} in {file} {what}") from None


def load_pool(path: str | Path) -> TaskPool:
    """Read ``X`` (N, m, d), ``y`` (N, m) and optional ``B_star`` (d, k), ``heads`` (N, k),
    ``noise_var`` (a number) and ``Sigma_star`` (k, k, diagonal) from a ``.npz`` file
    (:func:`metarep.core.tasks.task_pool` checks them). Raises :class:`ConfigError` (key
    ``tasks.from``) for a missing or unreadable file, missing arrays, non-finite values, shapes
    that do not match, a ``B_star`` without orthonormal columns, a negative ``noise_var`` or a
    ``Sigma_star`` that is not diagonal and positive.
    """
    key = "tasks.from"
    data = read_npz(path, key, required=("X", "y"))
    with config_errors(key):
        return task_pool(data["X"], data["y"], data.get("B_star"), data.get("heads"),
                         data.get("noise_var"), data.get("Sigma_star"))


def load_heldout(path: str | Path, d: int, shots: tuple[int, ...]) -> TaskPool:
    """Held-out tasks ``X`` (N', m', d), ``y`` (N', m') from a ``.npz`` file, checked by
    :func:`check_heldout`. :class:`ConfigError` naming ``tasks.test_from`` (or ``eval.shots``)."""
    key = "tasks.test_from"
    data = read_npz(path, key, required=("X", "y"))
    with config_errors(key):
        pool = task_pool(data["X"], data["y"])
    if pool.X.shape[2] != d:
        raise ConfigError(key, f"X must have d = {d} columns like the pool, got {pool.X.shape[2]}")
    return check_heldout(pool, shots, key, str(path))


def check_heldout(pool: TaskPool, shots: tuple[int, ...], key: str, source: str) -> TaskPool:
    """``pool`` if it can serve as held-out tasks: at least 2 tasks (else :class:`ConfigError`
    naming ``key``), and more samples per task than the largest ``m_test`` (each must leave
    rows to score; else naming ``eval.shots``)."""
    if pool.X.shape[0] < 2:
        raise ConfigError(key, f"needs at least 2 held-out tasks, got {pool.X.shape[0]}")
    if max(shots) >= pool.X.shape[1]:
        raise ConfigError("eval.shots", f"must be < the {pool.X.shape[1]} samples per held-out "
                          f"task of {source} (the rest are scored), got {max(shots)}")
    return pool


def load_params(path: str | Path, d: int) -> LinearParams:
    """Read ``B`` (d, k') and ``w`` (k',) from a ``.npz`` file, checking shapes against ``d``.

    Raises :class:`ConfigError` (key ``model.init_from``) for a missing file, missing arrays,
    non-finite values, mismatched shapes, or ``B = 0`` with ``w = 0`` (a fixed point).
    """
    key = "model.init_from"
    arrays = read_npz(path, key, required=("B", "w"))
    with config_errors(key):
        params = linear_params(arrays["B"], arrays["w"], d)
    if not params.B.any() and not params.w.any():
        raise ConfigError(key, f"{path} has B = 0 and w = 0, a fixed point of every method "
                          "(no gradient moves it); give a nonzero B or w")
    return params


def load_network(path: str | Path, d: int, hidden_layers: int) -> Any:
    """A ReLU network (:class:`metarep.engine.networks.ReLUNet`) from the arrays ``W1``,
    [``W2``], ``w`` of a ``.npz`` file; :class:`ConfigError` (key ``model.init_from``), also
    for ``W1 = 0`` (a fixed point)."""
    key = "model.init_from"
    arrays = read_npz(path, key, required=())
    networks = torch_module("networks")
    with config_errors(key):
        network = networks.relu_from_arrays(arrays, d, hidden_layers)
    if not arrays["W1"].any():
        raise ConfigError(key, f"{path} has W1 = 0, a fixed point (every hidden unit is "
                          "ReLU(0) = 0 with zero gradient); give a nonzero W1")
    return network


def torch_module(name: str, key: str = "model.kind", needs: str = "relu runs need") -> Any:
    """``metarep.engine.NAME``, imported on demand, or a :class:`ConfigError` naming ``key``
    (the setting that needs it: "``needs`` PyTorch") when PyTorch is not installed."""
    try:
        module = importlib.import_module(f"metarep.engine.{name}")
    except ModuleNotFoundError as error:
        if error.name != "torch":
            raise
        raise ConfigError(key, f"{needs} PyTorch: install metarep[torch] "
                          "(pip install 'metarep[torch]')") from None
    return module


def machine_memory() -> float | None:
    """This machine's memory in bytes (``None`` where the OS does not say)."""
    try:
        return float(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    except (AttributeError, ValueError, OSError):
        return None


def check_memory(key: str, value: float, bytes_each: float, what: str) -> None:
    """Raise :class:`ConfigError` naming ``key`` when ``what``, ``bytes_each`` bytes for each
    of ``value`` units (tasks, steps, columns), needs more than the machine's memory (instead
    of failing later with a ``MemoryError``); the message gives the largest ``value`` that
    fits."""
    memory = machine_memory()
    if memory is None or value * bytes_each <= memory:
        return
    largest = int(memory // bytes_each)
    raise ConfigError(key, f"{what} needs about {value * bytes_each / 1e9:.3g} GB, more than "
                      f"the {memory / 1e9:.3g} GB of memory of this machine (at most {key} = "
                      f"{largest:,} fits)")


YEAR_SECONDS = 365.25 * 24 * 3600.0
"""The longest a run may take: what needs more, even at the fastest, is refused."""


def check_time(key: str, value: float, seconds_each: float, what: str) -> None:
    """Raise :class:`ConfigError` naming ``key`` when ``what``, at least ``seconds_each``
    seconds for each of ``value`` units (an optimistic floor), cannot finish within a year;
    the message gives the largest ``value`` that can."""
    if value * seconds_each <= YEAR_SECONDS:
        return
    raise ConfigError(key, f"{what} takes at least {value * seconds_each / YEAR_SECONDS:.3g} "
                      f"years (>= {seconds_each * 1e6:g} us each); at most {key} = "
                      f"{int(YEAR_SECONDS // seconds_each):,} can finish within a year")
