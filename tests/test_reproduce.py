"""`metarep reproduce --scale quick` end to end: every artefact, every claim, reuse on re-run."""

import json

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from metarep.cli import app
from metarep.run.rundir import RunData
from metarep.run.schema import from_dict
from metarep.study.claims import claim_rows, evaluate_claims
from metarep.study.design import SCALES, Runs, base_tree, study_runs
from metarep.study.report import FIGURES


def invoke(*args: str):
    return CliRunner().invoke(app, list(args))


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    out = tmp_path_factory.mktemp("reproduce")
    result = invoke("reproduce", "--scale", "quick", "--out", str(out), "--no-progress")
    assert result.exit_code == 0, result.output
    return out, result


@pytest.mark.parametrize("scale", SCALES)
def test_every_study_run_is_a_valid_config(scale):
    runs = study_runs(scale)
    assert len({run.name for run in runs}) == len(runs)
    for run in runs:
        from_dict(base_tree(scale), run.overrides, name=run.name)


def test_quick_study_passes_every_claim(study):
    out, result = study
    claims = pd.read_csv(out / "claims.csv")
    assert list(claims.columns) == ["claim", "measure", "criterion", "value", "passed"]
    assert len(claims) >= 25
    failed = claims[~claims["passed"]]
    assert failed.empty, failed.to_string()
    assert f"claims passed: {len(claims)}/{len(claims)}" in result.stdout


def test_quick_study_writes_every_figure_table_and_run(study):
    out, _ = study
    page = (out / "report.html").read_text()
    for stem, _caption in FIGURES:
        for suffix in ("png", "pdf"):
            assert (out / "figures" / f"{stem}.{suffix}").stat().st_size > 5000
        table = pd.read_csv(out / "tables" / f"{stem}.csv")
        assert len(table) > 0, stem
        assert f'alt="{stem}" src="data:image/png;base64,' in page
    assert "<h2>Claims</h2>" in page and "http" not in page.split("<body>")[1].split("PDF")[0]
    for run in study_runs("quick"):
        summary = json.loads((out / "runs" / run.name / "summary.json").read_text())
        assert summary["status"] == "done", run.name


def test_rerun_reuses_finished_runs(study):
    out, _ = study
    stamps = {p: p.stat().st_mtime_ns for p in (out / "runs").glob("*/summary.json")}
    result = invoke("reproduce", "--scale", "quick", "--out", str(out), "--no-progress")
    assert result.exit_code == 0, result.output
    assert stamps == {p: p.stat().st_mtime_ns for p in (out / "runs").glob("*/summary.json")}


def test_bad_scale_is_exit_2(tmp_path):
    result = invoke("reproduce", "--scale", "huge", "--out", str(tmp_path / "x"))
    assert result.exit_code == 2
    assert "--scale" in result.output and not (tmp_path / "x").exists()


def fake_run(name: str, perp_norm: list[float], **columns: list[float]) -> RunData:
    steps = np.arange(len(perp_norm)) * 10
    metrics = pd.DataFrame({"step": steps, "perp_norm": perp_norm, **columns})
    return RunData(name, {}, metrics, None, {"status": "done"}, {})


def test_claims_are_rows_of_runs_measures_and_criteria():
    rows = claim_rows(k=3, d=20)
    names = {run.name for run in study_runs("quick")}
    for row in rows:
        assert row.runs and set(row.runs) <= names, row.claim
        assert row.measure and row.criterion
    assert len({row.claim for row in rows}) == len(rows)


def test_a_claim_fails_when_its_measure_misses_its_criterion():
    """Negative control: a complement that does not shrink fails the unlearning claim, one
    that shrinks passes it; a claim whose runs are missing is not reported; a measure that
    cannot be taken fails its claim."""
    rows = [row for row in claim_rows(k=3, d=20) if row.runs == (Runs.INFINITE,)]
    unlearning = next(row for row in rows if row.claim.startswith("B_perp^T B_t -> 0"))
    kept = {Runs.INFINITE: fake_run(Runs.INFINITE, [1.0, 0.9, 0.8])}
    shrunk = {Runs.INFINITE: fake_run(Runs.INFINITE, [1.0, 0.1, 0.01])}
    assert not unlearning.evaluate(kept).passed
    claim = unlearning.evaluate(shrunk)
    assert claim.passed and claim.value == "0.01"
    assert evaluate_claims({}, rows) == []
    head = next(row for row in rows if row.claim.startswith("w_t -> 0"))
    broken = head.evaluate(kept)  # no head_norm column
    assert not broken.passed and broken.value == "n/a"
    [missing] = evaluate_claims({}, rows, failed=["pool-mtl"])
    assert missing.claim == "run pool-mtl finished" and not missing.passed
