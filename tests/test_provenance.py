"""metarep.run.provenance: every result says which code, libraries, machine and command made it."""

from __future__ import annotations

import json
import shlex
import subprocess
import sys
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path

import pytest

import metarep
from metarep.run import provenance as prov

ROOT = Path(__file__).resolve().parents[1]


def git(directory: Path, *args: str) -> str:
    return subprocess.run(["git", "-C", str(directory), "-c", "user.name=t", "-c",
                           "user.email=t@t", *args], capture_output=True, text=True,
                          check=True).stdout.strip()


def test_the_record_names_versions_host_time_and_command():
    record = prov.provenance(["metarep", "run", "quick", "--set", "eval.shots=[3, 5]"])
    assert record["metarep"] == metarep.__version__
    assert record["numpy"] == metadata.version("numpy")
    assert record["scipy"] == metadata.version("scipy")
    assert record["python"] == ".".join(map(str, sys.version_info[:3]))
    assert shlex.split(record["command"])[-1] == "eval.shots=[3, 5]"
    started = datetime.fromisoformat(record["started_utc"])
    assert started.tzinfo is not None
    assert abs((datetime.now(UTC) - started).total_seconds()) < 60
    assert record["host"] and record["platform"]
    assert prov.package_version("no-such-package-for-metarep") is None
    json.dumps(record)  # every value is JSON


def test_source_tree_is_the_git_state_of_the_checkout_metarep_runs_from():
    """An editable install from this repository reports its HEAD and whether a tracked file
    differs from it; the same computation on a file that no repository tracks says None."""
    package = Path(metarep.__file__).resolve().parent
    tracked = subprocess.run(["git", "-C", str(package), "ls-files", "--error-unmatch",
                              "__init__.py"], capture_output=True).returncode == 0
    tree = prov.source_tree()
    if not tracked:
        assert tree is None
        pytest.skip("metarep is not imported from a git checkout here")
    assert tree == {"commit": git(package, "rev-parse", "HEAD"),
                    "dirty": bool(git(package, "status", "--porcelain",
                                      "--untracked-files=no"))}


def test_source_tree_distinguishes_untracked_clean_and_dirty(tmp_path, monkeypatch):
    package = tmp_path / "repo" / "metarep"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("x = 1\n")
    monkeypatch.setattr(metarep, "__file__", str(package / "__init__.py"))
    unwrapped = prov.source_tree.__wrapped__
    assert unwrapped() is None  # no repository at all
    git(tmp_path / "repo", "init", "-q")
    assert unwrapped() is None  # a repository that does not track metarep's files
    git(tmp_path / "repo", "add", ".")
    git(tmp_path / "repo", "commit", "-q", "-m", "one")
    head = git(tmp_path / "repo", "rev-parse", "HEAD")
    assert unwrapped() == {"commit": head, "dirty": False}
    (tmp_path / "repo" / "notes.txt").write_text("untracked files do not make it dirty\n")
    assert unwrapped() == {"commit": head, "dirty": False}
    (package / "__init__.py").write_text("x = 2\n")
    assert unwrapped() == {"commit": head, "dirty": True}
    assert prov.git_state(tmp_path / "repo") == {"commit": head, "dirty": True}
    assert prov.git_state(tmp_path) is None  # not inside a work tree


def test_the_record_names_the_current_directory_and_its_work_tree(tmp_path, monkeypatch):
    """The user's project (the current directory) is recorded with its own commit."""
    monkeypatch.chdir(tmp_path)
    assert prov.provenance([])["cwd_git"] is None
    (tmp_path / "config.yaml").write_text("problem: {d: 5}\n")
    git(tmp_path, "init", "-q")
    git(tmp_path, "add", ".")
    git(tmp_path, "commit", "-q", "-m", "configs")
    record = prov.provenance([])
    assert Path(record["cwd"]).resolve() == tmp_path.resolve()
    assert record["cwd_git"] == {"commit": git(tmp_path, "rev-parse", "HEAD"), "dirty": False}


def test_runs_and_sweeps_record_their_provenance(cli, tmp_path):
    out = tmp_path / "run"
    result = cli("run", "quick", "--set", "train.steps=3", "--set", "eval.n_tasks=20",
                 "--out", out, "--no-progress")
    assert result.exit_code == 0, result.output
    record = json.loads((out / "summary.json").read_text())["provenance"]
    assert record["metarep"] == metarep.__version__ and "resumed_at_step" not in record
    assert set(prov.provenance()) <= set(record)
    sweep = tmp_path / "sweep.yaml"
    sweep.write_text("base: quick\nset: {train.steps: 2, eval.n_tasks: 20}\n"
                     "grid: {model.width: [3, 4]}\n")
    result = cli("sweep", sweep, "--out", tmp_path / "s", "--workers", "1", "--no-progress")
    assert result.exit_code == 0, result.output
    manifest = json.loads((tmp_path / "s" / "sweep.json").read_text())
    assert set(prov.provenance()) <= set(manifest["provenance"])
