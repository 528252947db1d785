"""README stays true: its test command is the one CI runs, its key table is the schema's."""

from pathlib import Path

from metarep.run.schema import key_table

ROOT = Path(__file__).resolve().parents[1]


def _readme() -> str:
    return (ROOT / "README.md").read_text()


def test_ci_runs_readme_test_command():
    ci_lines = (ROOT / ".ci" / "run").read_text().splitlines()
    command = ci_lines[ci_lines.index("# README test command:") + 1]
    assert f"&& {command}\n" in _readme(), "README must show the test command .ci/run runs"


def test_readme_key_table_matches_schema():
    readme = _readme()
    table = readme.split("<!-- keys:start -->\n")[1].split("<!-- keys:end -->")[0].strip()
    assert table == key_table().strip(), "regenerate README's table with `metarep keys`"
