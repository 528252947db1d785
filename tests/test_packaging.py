"""What a user who cites and installs metarep relies on: the license, the citation, the
changelog, the type marker and the version (the built wheel itself is checked by .ci/run)."""

from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

import yaml

import metarep

ROOT = Path(__file__).resolve().parents[1]


def test_version_is_one_number_everywhere(cli):
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    citation = yaml.safe_load((ROOT / "CITATION.cff").read_text())
    assert project["version"] == metarep.__version__ == citation["version"]
    result = cli("--version")
    assert result.exit_code == 0 and result.stdout.strip() == f"metarep {metarep.__version__}"
    module = subprocess.run([sys.executable, "-m", "metarep", "--version"], capture_output=True,
                            text=True, check=True)
    assert module.stdout.strip() == f"metarep {metarep.__version__}"


def test_license_is_mit_with_its_text_shipped():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert project["license"] == "MIT" and project["license-files"] == ["LICENSE"]
    assert (ROOT / "LICENSE").read_text().startswith("MIT License")


def test_the_preferred_citation_is_the_paper():
    citation = yaml.safe_load((ROOT / "CITATION.cff").read_text())
    assert citation["cff-version"] == "1.2.0" and citation["license"] == "MIT"
    paper = citation["preferred-citation"]
    assert paper["year"] == 2024 and "ICLR 2024" in paper["collection-title"]
    assert "arXiv:2303.01335" in [identifier["value"] for identifier in paper["identifiers"]]
    assert [a["family-names"] for a in paper["authors"]] == ["Yüksel", "Boursier", "Flammarion"]


def test_type_marker_and_changelog_are_present():
    assert (Path(metarep.__file__).parent / "py.typed").is_file()
    package_data = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"][
        "package-data"]["metarep"]
    assert "py.typed" in package_data
    changelog = (ROOT / "CHANGELOG.md").read_text()
    assert "## [Unreleased]" in changelog and f"## [{metarep.__version__}]" in changelog
