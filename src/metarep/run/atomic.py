"""Writing result files atomically.

Every result file is written to a temporary sibling and moved into place with
``os.replace``, so a reader (or a resumed run) never sees a half-written file.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np


def _file_mode() -> int:
    """The permissions of a newly created file under this process's umask (usually 0o644)."""
    umask = os.umask(0o022)
    os.umask(umask)
    return 0o666 & ~umask


FILE_MODE = _file_mode()


@contextmanager
def named_errors(path: str | Path) -> Iterator[None]:
    """Give an ``OSError`` raised in the block without a file name (a full disk on
    ``write``) the name ``path``, so that its message says which file could not be
    written."""
    try:
        yield
    except OSError as error:
        if error.filename is not None or error.errno is None:
            raise
        raise OSError(error.errno, error.strerror, str(path)) from error


def atomic_write(path: str | Path, write: Callable[[Path], None]) -> None:
    """Call ``write(tmp_path)`` and then atomically rename ``tmp_path`` to ``path``; on any
    failure (a full disk, an interrupt) the temporary file is removed and ``path`` is left
    as it was.

    The file gets the usual permissions (``FILE_MODE``), not ``mkstemp``'s private 0o600.
    """
    target = Path(path)
    with named_errors(target):
        target.parent.mkdir(parents=True, exist_ok=True)
        handle, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.",
                                       suffix=".tmp")
        os.close(handle)
        try:
            os.chmod(tmp, FILE_MODE)
            write(Path(tmp))
            os.replace(tmp, target)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise


def is_temporary(path: Path) -> bool:
    """Whether ``path`` is the temporary file of an :func:`atomic_write` (``.NAME.*.tmp``),
    e.g. left behind by a process killed while writing."""
    return path.name.startswith(".") and path.name.endswith(".tmp")


def write_text(path: str | Path, text: str) -> None:
    """Atomically write ``text`` to ``path``."""
    atomic_write(path, lambda tmp: tmp.write_text(text))


def write_json(path: str | Path, data: Any) -> None:
    """Atomically write ``data`` as indented JSON (NaN written as null)."""
    write_text(path, json.dumps(_json_safe(data), indent=2) + "\n")


def write_npz(path: str | Path, **arrays: np.ndarray) -> None:
    """Atomically write arrays to an uncompressed ``.npz`` file."""

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as handle:
            np.savez(handle, **arrays)

    atomic_write(path, write)


def _json_safe(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_safe(v) for v in value]
    if isinstance(value, np.ndarray):
        return _json_safe(value.tolist())
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not np.isfinite(value):
        return None
    return value


def write_figure(path: str | Path, figure: Any, dpi: int) -> None:
    """Atomically save a matplotlib ``figure`` in the format of ``path``'s suffix."""
    target = Path(path)
    atomic_write(target, lambda tmp: figure.savefig(tmp, format=target.suffix[1:], dpi=dpi))
