"""Fixtures shared by the test modules."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest
from click.testing import Result
from typer.testing import CliRunner


@pytest.fixture(scope="session")
def cli() -> Callable[..., Result]:
    """The ``metarep`` command, in this process: ``cli("run", "quick", "--out", path)`` (every
    argument is turned into text) returns click's result (``exit_code``, ``stdout``,
    ``stderr``)."""
    runner = CliRunner()

    def invoke(*args: object) -> Result:
        from metarep.cli import app

        return runner.invoke(app, [str(arg) for arg in args])

    return invoke


@pytest.fixture(scope="session")
def error_line() -> Callable[[Result], str]:
    """The one ``error: ...`` line a failed command printed on stderr (asserting it is one)."""

    def line(result: Result) -> str:
        lines = result.stderr.splitlines()
        assert len(lines) == 1, result.stderr
        assert lines[0].startswith("error: ")
        return lines[0]

    return line


@pytest.fixture(scope="session")
def slurm_cluster() -> Iterator[Any]:
    """A real one-node SLURM on this machine for the session (:mod:`slurm_cluster`: munged,
    slurmctld and slurmd from Debian's packages, installed first where missing and possible);
    the test is skipped, with the reason, where it cannot start. Its ``env`` reaches it."""
    import slurm_cluster

    try:
        cluster = slurm_cluster.start()
    except slurm_cluster.Unavailable as why:
        pytest.skip(f"no SLURM here: {why}")
    yield cluster
    cluster.stop()
