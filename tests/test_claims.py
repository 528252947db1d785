"""The study's claims as data: every row names runs of the study, and a claim can fail."""

import numpy as np
import pandas as pd

from metarep.run.rundir import RunData
from metarep.study.claims import claim_rows, evaluate_claims
from metarep.study.design import Runs, study_runs


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
