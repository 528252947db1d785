"""`metarep reproduce --scale quick` end to end: every artefact, every claim, reuse on re-run."""

import json
import shutil

import pandas as pd
import pytest

import metarep
from metarep.run.schema import from_dict
from metarep.study.claims import CLAIM_COLUMNS, claim_rows, evaluate_claims
from metarep.study.design import (
    POOL_METHODS,
    RELU_LAYERS,
    SCALES,
    Runs,
    base_tree,
    early_steps,
    study_runs,
)
from metarep.study.report import DRAWING_ORDER, FIGURES
from metarep.study.reproduce import reproduce

pytestmark = pytest.mark.slow  # end to end: the full tier (README, Tests)



@pytest.fixture(scope="module")
def study(cli, tmp_path_factory):
    out = tmp_path_factory.mktemp("reproduce")
    result = cli("reproduce", "--scale", "quick", "--out", str(out), "--no-progress")
    assert result.exit_code == 0, result.output
    return out, result


@pytest.mark.parametrize("scale", ["default", "paper"])
def test_relu_claims_cover_every_seed_and_method_where_the_study_converges(scale):
    """Every ReLU claim names only runs of the study; the test-risk convergence claim reads
    each method's first-seed run, which is evaluated at 4/5 of its steps as well as at the
    end (the other seeds only at the end)."""
    runs = {run.name: run for run in study_runs(scale)}
    seeds = Runs.relu_claim_seeds(scale)
    assert len(seeds) >= 3
    problem = base_tree(scale)["problem"]
    rows = [row for row in claim_rows(problem["k"], problem["d"], (), seeds)
            if row.claim.startswith("ReLU")]
    assert len(rows) == len(RELU_LAYERS) * (5 + len(POOL_METHODS))
    for row in rows:
        assert set(row.runs) <= set(runs), row.claim
    for layers in RELU_LAYERS:
        for method in POOL_METHODS:
            first = runs[Runs.relu(layers, method, seeds[0])].overrides
            assert first["eval.at_steps"] == [early_steps(first["train.steps"])]
            later = runs[Runs.relu(layers, method, seeds[1])].overrides
            assert "eval.at_steps" not in later


@pytest.mark.parametrize("scale", SCALES)
def test_relu_study_feeds_fresh_tasks_to_the_model_agnostic_methods_and_a_pool_to_the_rest(
        scale):
    """The model-agnostic methods draw fresh tasks at every step, as many per step as half
    the pool; Burer-Monteiro and the FO-ANIL control train on the pool of N tasks of the first
    seed, otherwise in the same setting as the fresh-task FO-ANIL run (which alone is also
    evaluated at 4T/5, for the test-risk convergence claim)."""
    runs = {run.name: run.overrides for run in study_runs(scale)}
    seeds = Runs.relu_seeds(scale)
    for layers in RELU_LAYERS:
        for method in POOL_METHODS:
            for seed in seeds:
                config = from_dict(base_tree(scale), runs[Runs.relu(layers, method, seed)])
                if method == "mtl":
                    assert isinstance(config.tasks.n, int) and config.train.tasks_per_step is None
                else:
                    assert config.tasks.n == "online"
                    assert 2 * config.train.tasks_per_step == runs[
                        Runs.relu_pool(layers, seeds[0])]["tasks.n"]
        control = runs[Runs.relu_pool(layers, seeds[0])]
        fresh = runs[Runs.relu(layers, "fo-anil", seeds[0])]
        assert control["method.name"] == "fo-anil"
        assert {k: v for k, v in control.items() if k != "tasks.n"} == {
            k: v for k, v in fresh.items()
            if k not in ("tasks.n", "train.tasks_per_step", "eval.at_steps")}


@pytest.mark.parametrize("scale", SCALES)
def test_every_study_run_is_a_valid_config(scale):
    runs = study_runs(scale)
    assert len({run.name for run in runs}) == len(runs)
    for run in runs:
        from_dict(base_tree(scale), run.overrides, name=run.name)


def test_quick_study_passes_every_claim(study):
    out, result = study
    claims = pd.read_csv(out / "claims.csv")
    assert tuple(claims.columns) == CLAIM_COLUMNS
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


def test_the_report_drawn_in_one_process_equals_the_one_drawn_in_several(study, tmp_path):
    """The study's report (drawn on the CPUs' processes) against the same report drawn in this
    process: the same tables, and the figures in the order of FIGURES."""
    out, _ = study
    serial = tmp_path / "serial"
    shutil.copytree(out / "runs", serial / "runs")
    reproduce("quick", serial, workers=1, progress=False)
    for stem, _caption in FIGURES:
        assert ((serial / "tables" / f"{stem}.csv").read_text()
                == (out / "tables" / f"{stem}.csv").read_text()), stem
    for page in (out / "report.html", serial / "report.html"):
        text = page.read_text()
        positions = [text.index(f'alt="{stem}"') for stem, _caption in FIGURES]
        assert positions == sorted(positions)


def test_the_drawing_order_names_every_figure_once():
    assert sorted(DRAWING_ORDER) == sorted(stem for stem, _caption in FIGURES)


def test_bad_scale_is_exit_2(cli, tmp_path):
    result = cli("reproduce", "--scale", "huge", "--out", str(tmp_path / "x"))
    assert result.exit_code == 2
    assert "--scale" in result.output and not (tmp_path / "x").exists()



@pytest.fixture
def without_torch(monkeypatch):
    """``importlib.util.find_spec("torch")`` finds nothing, as on a machine without the extra."""
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *args: None if name == "torch" else real(name, *args))


def test_reproduce_without_torch_skips_the_relu_study_and_says_so_first(cli, study, tmp_path,
                                                                        without_torch):
    """The linear runs (reused from the study) and their claims go ahead; the ReLU runs are
    not made, figure (f) says it was skipped, and the first line of stderr says so."""
    out = tmp_path / "no-torch"
    shutil.copytree(study[0] / "runs", out / "runs",
                    ignore=lambda _, names: [n for n in names if Runs.is_relu(n)])
    result = cli("reproduce", "--scale", "quick", "--out", out, "--no-progress")
    assert result.exit_code == 0, result.output
    first = result.stderr.splitlines()[0]
    assert "ReLU study" in first and "metarep[torch]" in first and "skipped" in first
    assert not any(Runs.is_relu(p.name) for p in (out / "runs").iterdir())
    assert not (out / "figures" / "f_relu.png").exists()
    assert (out / "figures" / "a_unlearning.png").is_file()
    page = (out / "report.html").read_text()
    assert "<b>Skipped</b>, the ReLU runs needs PyTorch" in page
    claims = pd.read_csv(out / "claims.csv")
    assert (claims["status"] == "pass").all(), claims[claims["status"] != "pass"].to_string()
    assert "FAIL" not in result.stdout


def test_relu_claims_are_marked_skipped_not_failed_without_their_runs():
    """At a scale with ReLU claims, a skipped run marks each claim that needs it skipped
    (``passed`` empty); claims without skipped runs are measured as before."""
    problem = base_tree("default")["problem"]
    rows = claim_rows(problem["k"], problem["d"], (), Runs.relu_claim_seeds("default"))
    skipped = {run.name: "needs PyTorch" for run in study_runs("default")
               if Runs.is_relu(run.name)}
    claims = evaluate_claims({}, rows, [], skipped)
    relu = [row for row in rows if row.claim.startswith("ReLU")]
    assert len(claims) == len(relu) > 0  # the others have no finished runs: not measured
    assert all(c.status == "skipped" and c.passed is None for c in claims)
    assert all(c.value == "skipped: needs PyTorch" and "{" not in c.measure for c in claims)
    assert all(Runs.is_relu(name) == name.startswith("relu") for name in skipped)


def test_study_run_names_are_recognised_as_relu_exactly():
    for scale in SCALES:
        for run in study_runs(scale):
            assert Runs.is_relu(run.name) == (run.overrides.get("model.kind") == "relu"), run
