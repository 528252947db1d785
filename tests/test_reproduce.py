"""`metarep reproduce --scale quick` end to end: every artefact, every claim, reuse on re-run."""

import json

import pandas as pd
import pytest

import metarep
from metarep.run.schema import from_dict
from metarep.study.claims import claim_rows
from metarep.study.design import (
    POOL_METHODS,
    RELU_LAYERS,
    SCALES,
    Runs,
    base_tree,
    early_steps,
    study_runs,
)
from metarep.study.report import FIGURES

pytestmark = pytest.mark.slow  # end to end: the full tier (README, Tests)



@pytest.fixture(scope="module")
def study(cli, tmp_path_factory):
    out = tmp_path_factory.mktemp("reproduce")
    result = cli("reproduce", "--scale", "quick", "--out", str(out), "--no-progress")
    assert result.exit_code == 0, result.output
    return out, result


@pytest.mark.parametrize("scale", ["default", "paper"])
def test_relu_claims_cover_every_seed_and_method_where_the_study_converges(scale):
    """Every ReLU claim names only runs of the study; the test-risk convergence claim pairs
    each method's first-seed run with its early run, which follows the same trajectory for 4/5
    of the steps."""
    runs = {run.name: run for run in study_runs(scale)}
    seeds = Runs.relu_claim_seeds(scale)
    assert len(seeds) >= 3
    problem = base_tree(scale)["problem"]
    rows = [row for row in claim_rows(problem["k"], problem["d"], (), seeds)
            if row.claim.startswith("ReLU")]
    assert len(rows) == len(RELU_LAYERS) * (2 + len(POOL_METHODS))
    for row in rows:
        assert set(row.runs) <= set(runs), row.claim
    for layers in RELU_LAYERS:
        final = runs[Runs.relu(layers, "maml", seeds[0])].overrides
        early = runs[Runs.relu_early(layers, "maml", seeds[0])].overrides
        assert {k: v for k, v in early.items() if k != "train.steps"} == {
            k: v for k, v in final.items() if k != "train.steps"}
        assert early["train.steps"] == early_steps(final["train.steps"])


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
    assert len(claims) >= 20
    assert not claims["claim"].str.startswith("ReLU").any()  # a smoke test at quick: no claims
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
    assert "<h2>Provenance</h2>" in page and metarep.__version__ in page
    for run in study_runs("quick"):
        summary = json.loads((out / "runs" / run.name / "summary.json").read_text())
        assert summary["status"] == "done", run.name


def test_rerun_reuses_finished_runs(cli, study):
    out, _ = study
    stamps = {p: p.stat().st_mtime_ns for p in (out / "runs").glob("*/summary.json")}
    result = cli("reproduce", "--scale", "quick", "--out", str(out), "--no-progress")
    assert result.exit_code == 0, result.output
    assert stamps == {p: p.stat().st_mtime_ns for p in (out / "runs").glob("*/summary.json")}


def test_bad_scale_is_exit_2(cli, tmp_path):
    result = cli("reproduce", "--scale", "huge", "--out", str(tmp_path / "x"))
    assert result.exit_code == 2
    assert "--scale" in result.output and not (tmp_path / "x").exists()



def test_reproduce_without_torch_says_so_before_any_run(cli, tmp_path, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *args: None if name == "torch" else real(name, *args))
    result = cli("reproduce", "--scale", "quick", "--out", tmp_path / "x", "--no-progress")
    assert result.exit_code == 2 and "metarep[torch]" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and not (tmp_path / "x").exists()
