"""The study's claims as data: every row names runs of the study, and a claim can fail."""

import numpy as np
import pandas as pd
import pytest

from metarep.run.rundir import RunData
from metarep.study.claims import claim_rows, evaluate_claims, infinite_method_rows
from metarep.study.design import INFINITE_METHODS, Runs, study_runs
from metarep.study.report import stranded_units


def fake_run(name: str, perp_norm: list[float], **columns: list[float]) -> RunData:
    steps = np.arange(len(perp_norm)) * 10
    metrics = pd.DataFrame({"step": steps, "perp_norm": perp_norm, **columns})
    return RunData(name, {}, metrics, None, {"status": "done"}, {})


def test_claims_are_rows_of_runs_measures_and_criteria():
    rows = claim_rows(k=3, d=20, floors=Runs.floors("quick"))
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
    gram = next(row for row in rows if row.claim.startswith("B_star^T B_t B_t^T B_star"))
    broken = gram.evaluate(kept)  # no lambda_err column
    assert not broken.passed and broken.value == "n/a"
    [missing] = evaluate_claims({}, rows, failed=["pool-mtl"])
    assert missing.claim == "run pool-mtl finished" and not missing.passed


def law_run(exponent: float, scale: float = 1.0, method: str = "fo-anil",
            kappa: int = 1) -> RunData:
    """An infinite-task ``method`` run whose perp_norm is ``scale (2 kappa alpha^2 beta c
    t)^(-1/2)`` bent to ``t^exponent`` (alpha = 0.5, beta = 0.2, Sigma_star = I_3, sigma^2 = 1,
    m_in = 10), with lambda_err 1e-15 and a train_loss."""
    config = {"method": {"name": method, "inner_lr": 0.5, "outer_lr": 0.2},
              "problem": {"noise_var": 1.0}, "tasks": {"m_in": 10}}
    c = (3 + 1.0) / 10
    steps = np.unique(np.round(np.logspace(0, 5, 101)).astype(int))
    perp = scale * (2 * kappa * 0.5**2 * 0.2 * c) ** -0.5 * steps.astype(float) ** exponent
    metrics = pd.DataFrame({"step": steps, "perp_norm": perp, "lambda_err": 1e-15,
                            "train_loss": 1 + perp**2})
    return RunData(Runs.infinite(method), config, metrics, None, {"status": "done"},
                   {"Sigma_star": np.eye(3)})


def test_the_unlearning_rate_and_constant_claims_hold_only_for_the_predicted_law():
    rows = {row.claim: row for row in claim_rows(k=3, d=20) if row.runs == (Runs.INFINITE,)}
    slope = next(row for claim, row in rows.items() if claim.startswith("the unlearning is slow"))
    constant = next(row for claim, row in rows.items() if "predicted constant" in claim)
    exact = {Runs.INFINITE: law_run(-0.5)}
    assert slope.evaluate(exact).passed and constant.evaluate(exact).passed
    assert float(constant.evaluate(exact).value) == pytest.approx(1.0, rel=1e-9)
    assert not slope.evaluate({Runs.INFINITE: law_run(-0.45)}).passed  # a slower rate
    assert not constant.evaluate({Runs.INFINITE: law_run(-0.5, scale=1.05)}).passed


def exact_study(*changed: RunData) -> dict[str, RunData]:
    """The exact infinite-task runs of every model-agnostic method on their theory's law (the
    ``kappa`` of their method), and ANIL's ``m_in = inf`` control keeping its complement;
    each of ``changed`` replaces the run of its name."""
    kappa = {"fo-anil": 1, "fo-maml": 1, "anil": 2, "maml": 2}
    runs = [law_run(-0.5, method=m, kappa=k) for m, k in kappa.items()]
    runs.append(fake_run(Runs.m_in("inf", "anil"), [1.0, 0.99, 0.98]))
    return {run.name: run for run in (*runs, *changed)}


def test_the_infinite_method_claims_fail_on_a_counterexample_each():
    """Every claim on the exact runs of ANIL, FO-MAML and MAML passes on runs that follow the
    theory, and each fails on its counterexample alone: a complement that stays, the
    first-order rate (kappa = 1) in a second-order method, lambda_err at 1e-4, a MAML run 1e-6
    away from ANIL's, an m_in = inf control that unlearns."""
    rows = infinite_method_rows()
    assert all(row.evaluate(exact_study()).passed for row in rows)

    def failing(*changed: RunData) -> list[str]:
        runs = exact_study(*changed)
        return [row.claim for row in rows if not row.evaluate(runs).passed]

    def edited(method: str, kappa: int, column: str, value: float) -> RunData:
        run = law_run(-0.5, method=method, kappa=kappa)
        run.metrics[column] = value
        return run

    for method in INFINITE_METHODS:
        stuck = failing(edited(method, 2, "perp_norm", 1.0))
        assert f"{method}, infinitely many tasks: the orthogonal complement is unlearned " \
               "(B_perp^T B_t -> 0)" in stuck
    wrong_rate = failing(*(law_run(-0.5, method=m, kappa=1) for m in ("anil", "maml")))
    assert [claim.split(",")[0] for claim in wrong_rate] == ["anil", "maml"]
    assert all("perp_norm(t) = (2 kappa" in claim for claim in wrong_rate)
    [not_reached] = failing(edited("maml", 2, "lambda_err", 1e-4))
    assert not_reached.startswith("maml, infinitely many tasks: B_star^T B_t B_t^T B_star")
    apart = law_run(-0.5, method="maml", kappa=2)
    apart.metrics["perp_norm"] *= 1 + 1e-6
    [twin] = failing(apart)
    assert twin.startswith("from w_0 = 0, infinite-task maml follows anil exactly")
    [control] = failing(fake_run(Runs.m_in("inf", "anil"), [1.0, 0.3, 0.1]))
    assert control.startswith("negative control (ANIL, and so MAML)")


def floor_run(n: int, seed: int, floor: float, drift: float = 0.0) -> RunData:
    """A pool run of ``n`` tasks whose perp_norm settles at ``floor`` (moving by ``drift``
    relative over the last fifth of its 1000 steps)."""
    steps = np.arange(0, 1001, 50)
    perp = floor * (1 + 2.0 * np.exp(-steps / 50.0)) * (1 - drift * np.clip(
        (steps - 800) / 200, 0, 1))
    metrics = pd.DataFrame({"step": steps, "perp_norm": perp})
    return RunData(Runs.floor(n, seed), {"tasks": {"n": n}}, metrics, None, {"status": "done"},
                   {})


def floor_rows(runs: dict[str, RunData]) -> tuple:
    rows = {row.claim: row for row in claim_rows(3, 20, floors=tuple(runs))}
    flat = next(row for claim, row in rows.items() if claim.startswith("the finite-pool floor"))
    law = next(row for claim, row in rows.items() if claim.startswith("the floor falls"))
    return flat, law


@pytest.mark.parametrize(("exponent", "passes"), [(-0.25, True), (-0.3, True), (-0.5, False),
                                                  (-0.05, False)])
def test_the_floor_law_claim_tells_n_to_the_minus_quarter_from_other_laws(exponent, passes):
    """Floors ``N^e`` with a seed scatter of 2 %: e = -1/4 (and near it) passes; the N^(-1/2)
    of a statistical error and an N-independent floor fail."""
    scatter = {1: 1.02, 2: 0.98}
    runs = {Runs.floor(n, seed): floor_run(n, seed, 3 * n**exponent * scatter[seed])
            for n in (250, 1000, 4000) for seed in (1, 2)}
    flat, law = floor_rows(runs)
    claim = law.evaluate(runs)
    assert claim.passed is passes, claim
    assert "250, 1000, 4000" in claim.measure
    assert flat.evaluate(runs).passed


def test_the_floor_is_reached_claim_fails_for_a_run_still_moving():
    runs = {Runs.floor(n, 1): floor_run(n, 1, n**-0.25, drift=0.03 if n == 1000 else 0.0)
            for n in (250, 1000, 4000)}
    flat, _ = floor_rows(runs)
    claim = flat.evaluate(runs)
    assert not claim.passed and claim.value.startswith("0.03")


UNLEARNED = [0.9, 0.3, 0.1, 0.06, 0.052, 0.05]
"""W1's share outside span(B*) of a run that unlearns it and has settled."""
KEPT = [0.9, 0.6, 0.5, 0.45, 0.45, 0.45]
"""The share of a run that stops at a floor (a pool) or keeps it (Burer-Monteiro)."""


def relu_run(name: str, risk: float, stderr: float = 0.02, ridge: float = 2.0,
             share: list[float] | None = None, early_risk: float | None = None) -> RunData:
    """A ReLU run with ``risk`` for every method's row (and mtl-lsq) at m_test = 5 and ridge
    at ``ridge``, ``w1_perp_share`` over 1000 steps and, given ``early_risk``, an evaluation
    at step 800 with that risk."""
    share = share if share is not None else UNLEARNED
    steps = np.linspace(0, 1000, len(share)).astype(int)
    metrics = pd.DataFrame({"step": steps, "w1_perp_share": share})
    rows = [(method, 5, risk, stderr, 1000, np.nan)
            for method in ("fo-anil", "anil", "fo-maml", "maml", "mtl-lsq")]
    rows.append(("ridge", 5, ridge, 0.02, 1000, np.nan))
    columns = ["method", "shots", "excess_risk", "stderr", "n_tasks", "theory"]
    frame = pd.DataFrame(rows, columns=columns)
    early = None if early_risk is None else frame.assign(excess_risk=early_risk).assign(
        step=800)[["step", *columns]]
    return RunData(name, {}, metrics, frame, {"status": "done"}, {}, early)


def relu_study(risks: dict[int, float], early_risk: float,
               shares: dict[str, list[float]] | None = None) -> dict[str, RunData]:
    """The runs of the ReLU study with one hidden layer: every method's share :data:`UNLEARNED`
    but Burer-Monteiro's and the pool control's, :data:`KEPT`; ``shares`` replaces those of the
    methods (and ``"pool"``) it names."""
    shares = {"mtl": KEPT, "pool": KEPT, **(shares or {})}
    runs = {}
    for method in ("fo-anil", "anil", "fo-maml", "maml", "mtl"):
        for seed, value in risks.items():
            name = Runs.relu(1, method, seed)
            runs[name] = relu_run(name, value, share=shares.get(method),
                                  early_risk=early_risk if seed == 1 else None)
    pool = Runs.relu_pool(1, 1)
    runs[pool] = relu_run(pool, 1.8, share=shares["pool"])
    return runs


def relu_claims() -> dict[str, object]:
    """The ReLU claims with one hidden layer over seeds 1-3, by their role."""
    rows = [row for row in claim_rows(3, 20, relu_seeds=(1, 2, 3))
            if row.claim.startswith("ReLU (2 layers)")]
    risk_flat, share_flat, unlearned, pool_floor, mtl_keeps, *against_ridge = rows
    return {"risk_flat": risk_flat, "share_flat": share_flat, "unlearned": unlearned,
            "pool_floor": pool_floor, "mtl_keeps": mtl_keeps,
            "fo_anil": next(row for row in against_ridge if "fo-anil" in row.claim)}


def test_relu_claims_use_every_seed_and_fail_when_training_still_moves():
    claims = relu_claims()
    risk_flat, share_flat, fo_anil = claims["risk_flat"], claims["share_flat"], claims["fo_anil"]
    good = relu_study({1: 1.5, 2: 1.52, 3: 1.48}, early_risk=1.505)
    for row in claims.values():
        assert row.evaluate(good).passed, row.evaluate(good)
    claim = fo_anil.evaluate(good)
    assert claim.passed and "3 seeds" in claim.measure, claim
    # Seeds that disagree widely carry a large error: no longer 3 errors below ridge.
    spread = relu_study({1: 1.0, 2: 2.6, 3: 1.4}, early_risk=1.0)
    assert not fo_anil.evaluate(spread).passed
    # A test risk that moved by 10 % over the last fifth, or a W1 share still falling.
    assert not risk_flat.evaluate(relu_study({1: 1.5, 2: 1.5, 3: 1.5}, 1.65)).passed
    falling = relu_study({1: 1.5, 2: 1.5, 3: 1.5}, 1.5,
                         shares={"maml": [0.9, 0.8, 0.7, 0.6, 0.5, 0.4]})
    claim = share_flat.evaluate(falling)
    assert not claim.passed and claim.value.startswith("0.1") and "minimum" in claim.value
    assert risk_flat.evaluate(falling).passed
    # The risk at 4T/5 is read from the run's own evaluation during training, not eval.csv.
    moved = relu_study({1: 1.5, 2: 1.5, 3: 1.5}, 1.5)
    moved[Runs.relu(1, "maml", 1)] = relu_run(Runs.relu(1, "maml", 1), 1.5, early_risk=1.2)
    claim = risk_flat.evaluate(moved)
    assert not claim.passed and claim.value == "0.25", claim
    unevaluated = relu_study({1: 1.5, 2: 1.5, 3: 1.5}, 1.5)
    unevaluated[Runs.relu(1, "anil", 1)] = relu_run(Runs.relu(1, "anil", 1), 1.5)
    claim = risk_flat.evaluate(unevaluated)  # no evaluation at 4T/5: not measured
    assert not claim.passed and claim.value == "n/a", claim


def test_relu_share_movement_is_absolute_so_a_settled_share_near_zero_is_flat():
    """A share that settled at 0.01 with updates of 0.002 has moved by 20 % relative to itself
    but by 0.002 of W1: flat; one that fell by 0.02 has not settled."""
    share_flat = relu_claims()["share_flat"]
    noisy = relu_study({1: 1.5, 2: 1.5, 3: 1.5}, 1.5,
                       shares={"maml": [0.9, 0.2, 0.05, 0.012, 0.01, 0.012]})
    assert share_flat.evaluate(noisy).passed
    still = relu_study({1: 1.5, 2: 1.5, 3: 1.5}, 1.5,
                       shares={"maml": [0.9, 0.3, 0.1, 0.07, 0.06, 0.04]})
    claim = share_flat.evaluate(still)
    assert not claim.passed and claim.value.startswith("0.02")


def test_relu_unlearning_claims_fail_without_unlearning_and_their_controls_fail_with_it():
    claims = relu_claims()
    unlearned, pool_floor, mtl_keeps = (claims[k] for k in ("unlearned", "pool_floor",
                                                            "mtl_keeps"))
    # One method whose share stops at half its start fails the claim, and is named.
    stuck = relu_study({1: 1.5, 2: 1.5, 3: 1.5}, 1.5, shares={"fo-maml": KEPT})
    claim = unlearned.evaluate(stuck)
    assert not claim.passed and "(fo-maml)" in claim.value and "3 seeds" in claim.measure
    # One seed of three that keeps it is averaged in: mean (0.5 + 2 x 0.056) / 3 > 0.2 fails.
    runs = relu_study({1: 1.5, 2: 1.5, 3: 1.5}, 1.5)
    runs[Runs.relu(1, "anil", 2)] = relu_run(Runs.relu(1, "anil", 2), 1.5, share=KEPT)
    assert not unlearned.evaluate(runs).passed
    # Controls: a pool that unlearns as fresh tasks do, a Burer-Monteiro that unlearns.
    assert not pool_floor.evaluate(relu_study({1: 1.5}, 1.5, shares={"pool": UNLEARNED})).passed
    assert not mtl_keeps.evaluate(relu_study({1: 1.5, 2: 1.5, 3: 1.5}, 1.5,
                                             shares={"mtl": UNLEARNED})).passed


def test_stranded_units_count_the_first_layer_units_outside_the_span():
    """A unit is stranded when more than 0.9 of its weights lie outside span(B*): one unit in
    the complement and one at 0.95 count, one at 0.87 does not, nor one inside the span."""
    B_star = np.eye(6)[:, :2]
    outside, inside = np.eye(6)[:, 4], np.eye(6)[:, 0]
    W1 = np.column_stack([outside, inside, 0.5 * inside + np.sqrt(0.75) * outside,
                          np.sqrt(1 - 0.95**2) * inside + 0.95 * outside])
    run = RunData("relu2-anil-s2", {}, pd.DataFrame(), None, {"status": "done"},
                  {"W1": W1, "B_star": B_star})
    assert stranded_units(run) == 2
