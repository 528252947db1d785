"""Where a result came from: the versions, the source tree, the machine, the time and the command
that produced it, recorded in ``summary.json``, ``sweep.json`` and the study's report.

:func:`provenance` is the one record; :func:`source_tree` is the git state of the checkout
metarep runs from (``None`` when it runs from an installed wheel or git is missing), and
:func:`git_state` that of any work tree (the user's project in the current directory).
"""

from __future__ import annotations

import functools
import platform
import shlex
import socket
import subprocess
import sys
from collections.abc import Sequence
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any

import metarep

PACKAGES = ("numpy", "scipy", "torch")
"""The libraries whose versions can change a result (torch only where installed)."""

GIT_SECONDS = 10.0
"""The longest any one git query may take before the source tree counts as unknown."""


def package_version(name: str) -> str | None:
    """The installed version of ``name`` (from its metadata, without importing it), or
    ``None`` when it is not installed."""
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def _git(directory: Path, *args: str) -> str | None:
    """``git -C directory ARGS``'s output, or ``None`` when git is missing, fails or hangs."""
    try:
        done = subprocess.run(["git", "-C", str(directory), *args], capture_output=True,
                              text=True, timeout=GIT_SECONDS, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip() if done.returncode == 0 else None


def git_state(directory: Path, tracked: str | None = None) -> dict[str, Any] | None:
    """``commit`` (HEAD) and ``dirty`` (whether a tracked file differs from it) of the git
    work tree holding ``directory``, or ``None`` when there is none (or git is missing). With
    ``tracked``, also ``None`` unless that file of ``directory`` is tracked by the tree."""
    if tracked is not None and _git(directory, "ls-files", "--error-unmatch", tracked) is None:
        return None
    if _git(directory, "rev-parse", "--is-inside-work-tree") != "true":
        return None
    commit = _git(directory, "rev-parse", "HEAD")
    status = _git(directory, "status", "--porcelain", "--untracked-files=no")
    if commit is None or status is None:
        return None
    return {"commit": commit, "dirty": bool(status)}


@functools.cache
def source_tree() -> dict[str, Any] | None:
    """The :func:`git_state` of the checkout metarep is imported from, or ``None`` when
    metarep's own source files are not tracked by a git repository (an installed wheel, even
    one inside a repository's ignored virtual environment). Asked once per process."""
    return git_state(Path(metarep.__file__).resolve().parent, tracked="__init__.py")


def provenance(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """The record of a result's origin: metarep's version, Python's and those of
    :data:`PACKAGES`, the git state of metarep's checkout (``git``, :func:`source_tree`) and of
    the current directory's work tree (``cwd_git``: the user's project, where the configs
    usually live; :func:`git_state`), the current directory, the host, the platform, the UTC
    time of this call (ISO 8601, seconds) and the command line (``argv``, default
    ``sys.argv``, quoted as a shell would need it)."""
    return {
        "metarep": metarep.__version__,
        "python": platform.python_version(),
        **{name: package_version(name) for name in PACKAGES},
        "git": source_tree(),
        "cwd": str(Path.cwd()),
        "cwd_git": git_state(Path.cwd()),
        "host": socket.gethostname(),
        "platform": platform.platform(),
        "started_utc": datetime.now(UTC).isoformat(timespec="seconds"),
        "command": shlex.join(list(sys.argv if argv is None else argv)),
    }
