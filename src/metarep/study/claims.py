"""The study's claims (spec sections 4 and 6) as data: each a row of (claim, runs, measure,
criterion), measured on the study's finished runs.

:func:`claim_rows` lists the rows for a setting (``k``, ``d``); :func:`evaluate_claims` measures
every row whose runs finished. A measure maps the rows' runs to a :class:`Measurement` (its
values, their text, and the fields its description names, such as the step ``T``); a
criterion is a test of those values.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from metarep.core.evaluation import features_row
from metarep.core.measures import moment_subspace, subspace_distance
from metarep.core.methods import MTL
from metarep.run.backends.sources import resolve_inputs
from metarep.run.rundir import RunData
from metarep.run.schema import from_dict
from metarep.study.design import MODEL_AGNOSTIC, POOL_METHODS, RELU_LAYERS, Runs


@dataclass(frozen=True)
class Claim:
    """One row of ``claims.csv``: the claim, what was measured, the criterion, the measured
    value (as text) and whether it passed."""

    claim: str
    measure: str
    criterion: str
    value: str
    passed: bool


@dataclass(frozen=True)
class Measurement:
    """What a measure found: its ``values``, their ``text``, and ``fields`` that fill the
    placeholders of the row's measure description (e.g. ``{steps}``)."""

    values: tuple[float, ...]
    text: str
    fields: Mapping[str, Any] = field(default_factory=dict)


Measure = Callable[..., Measurement]
"""``(run_1, ..., run_n) -> Measurement`` for the ``n`` runs of a row."""


@dataclass(frozen=True)
class ClaimRow:
    """A claim, the runs it is measured on, the measure (its description and function) and
    the criterion (its description and test of the measured values)."""

    claim: str
    runs: tuple[str, ...]
    measure: str
    criterion: str
    measured: Measure
    passes: Callable[..., bool]

    def evaluate(self, runs: Mapping[str, RunData]) -> Claim:
        """Measure the row on ``runs`` (which hold every run of the row); a measure that cannot
        be taken (a missing column or row) fails the claim."""
        try:
            found = self.measured(*(runs[name] for name in self.runs))
            passed = bool(self.passes(*found.values))
        except (KeyError, IndexError, TypeError, ValueError):
            return Claim(self.claim, self.measure, self.criterion, "n/a", False)
        return Claim(self.claim, self.measure.format(**found.fields), self.criterion,
                     found.text, passed)


# ----------------------------------------------------------------------------- measures


def last(run: RunData, column: str) -> float:
    """The recorded value of ``column`` at the last step."""
    return float(run.metrics[column].iloc[-1])


def first(run: RunData, column: str) -> float:
    """The recorded value of ``column`` at step 0."""
    return float(run.metrics[column].iloc[0])


def loglog_slope(run: RunData, column: str, start_fraction: float = 0.1) -> float:
    """Least-squares slope of log(column) against log(step) over the last decade of steps."""
    frame = run.metrics[run.metrics["step"] >= start_fraction * run.metrics["step"].iloc[-1]]
    frame = frame[(frame["step"] > 0) & (frame[column] > 0)]
    if len(frame) < 3:
        return math.nan
    return float(np.polyfit(np.log(frame["step"]), np.log(frame[column]), 1)[0])


def sv_gap(run: RunData, k: int) -> float:
    """``sv_{k+1} / sv_k`` at the end of training (0 for an exactly rank-k ``B``)."""
    if f"sv_{k + 1}" not in run.metrics:
        return 0.0
    return last(run, f"sv_{k + 1}") / last(run, f"sv_{k}")


def risk(run: RunData, method: str, shots: int) -> tuple[float, float]:
    """``(excess_risk, stderr)`` of ``method``'s row at ``m_test = shots`` in ``eval.csv``."""
    rows = run.eval[(run.eval["method"] == method) & (run.eval["shots"] == shots)]
    return float(rows["excess_risk"].iloc[0]), float(rows["stderr"].iloc[0])


def one(value: float) -> Measurement:
    return Measurement((value,), f"{value:.4g}")


def pair(a: float, b: float, **fields: Any) -> Measurement:
    return Measurement((a, b), f"{a:.3g} vs {b:.3g}", fields)


def final(column: str) -> Measure:
    """``column`` at the last step of one run."""
    return lambda run: one(last(run, column))


def shrinkage(column: str) -> Measure:
    """``column(T) / column(0)`` of one run, or of each of several runs (as a pair)."""
    def measured(*runs: RunData) -> Measurement:
        ratios = [last(run, column) / first(run, column) for run in runs]
        return one(ratios[0]) if len(ratios) == 1 else pair(*ratios)

    return measured


def final_pair(column: str) -> Measure:
    """``column`` at the last step of two runs."""
    return lambda a, b: pair(last(a, column), last(b, column))


def rank_gap(k: int) -> Measure:
    """:func:`sv_gap` of one run, or of two runs (as a pair)."""
    def measured(*runs: RunData) -> Measurement:
        gaps = [sv_gap(run, k) for run in runs]
        return one(gaps[0]) if len(gaps) == 1 else pair(*gaps)

    return measured


def slope(column: str) -> Measure:
    return lambda run: one(loglog_slope(run, column))


def regression_wins(k: int, d: int) -> Measure:
    """How many ``m_test`` in ``[2k, d]`` have ``risk(regression) - risk(fo-anil)`` more than
    3 standard errors above 0 (values: wins, total)."""
    def measured(run: RunData) -> Measurement:
        shots = sorted(int(s) for s in run.eval["shots"].unique())
        wins = []
        for s in (s for s in shots if 2 * k <= s <= d):
            mine, mine_se = risk(run, "fo-anil", s)
            theirs, theirs_se = risk(run, "regression", s)
            wins.append((theirs - mine) / math.hypot(mine_se, theirs_se) > 3)
        return Measurement((sum(wins), len(wins)), f"{sum(wins)}/{len(wins)} m_test")

    return measured


def closed_form_gap(run: RunData) -> Measurement:
    """``max over m_test of |risk - closed form| / stderr`` of FO-ANIL's rows."""
    rows = run.eval[run.eval["method"] == "fo-anil"]
    z = ((rows["excess_risk"] - rows["theory"]) / rows["stderr"]).abs()
    if not len(z):
        raise ValueError("no fo-anil rows")
    return one(float(z.max()))


def relu_against_regression(method: str) -> Measure:
    """The risks of ``method`` (``mtl``: its least-squares row) and of regression at the
    smallest ``m_test`` of one ReLU run."""
    row = features_row(method) if method == MTL.name else method

    def measured(run: RunData) -> Measurement:
        smallest = int(run.eval["shots"].min())
        return pair(risk(run, row, smallest)[0], risk(run, "regression", smallest)[0],
                    smallest=smallest, row=row)

    return measured


def moments_floor(k: int) -> Measure:
    """FO-ANIL's ``subspace_dist`` at T on the pool, and that of a method-of-moments estimate
    of span(B*) from the same pool (:func:`metarep.core.measures.moment_subspace`, the
    statistical accuracy the pool allows)."""
    def measured(run: RunData) -> Measurement:
        inputs = resolve_inputs(from_dict(run.config, name=run.summary["config"]))
        floor = subspace_distance(moment_subspace(inputs.pool, k), inputs.problem.B_star)
        return pair(last(run, "subspace_dist"), floor)

    return measured


def at_pool_end(pool: RunData, infinite: RunData) -> Measurement:
    """``perp_norm`` at the pool run's last step ``T``, of the pool run and of the infinite-task
    run (its last record at or before ``T``)."""
    steps = int(pool.metrics["step"].iloc[-1])
    at = infinite.metrics[infinite.metrics["step"] <= steps].iloc[-1]
    return pair(last(pool, "perp_norm"), float(at["perp_norm"]), steps=steps)


# ----------------------------------------------------------------------------- the rows


def claim_rows(k: int, d: int) -> list[ClaimRow]:
    """Every claim of the study for latent dimension ``k`` and ambient dimension ``d``, in the
    order they are reported."""
    inf, no_unlearning = Runs.INFINITE, Runs.m_in("inf")
    fo, mtl = Runs.pool("fo-anil"), Runs.pool("mtl")
    rows = [
        ClaimRow("w_t -> 0 (infinite tasks, w_0 = 0)", (inf,),
                 "head_norm at T (infinite-task FO-ANIL)", "<= 1e-8",
                 final("head_norm"), lambda v: v <= 1e-8),
        ClaimRow("B_perp^T B_t -> 0: the orthogonal complement is unlearned although k' > k",
                 (inf,), "perp_norm(T) / perp_norm(0) (infinite-task FO-ANIL)", "< 0.2",
                 shrinkage("perp_norm"), lambda v: v < 0.2),
        ClaimRow("the unlearning is slow: polynomial in t", (inf,),
                 "log-log slope of perp_norm over the last decade of steps (infinite-task "
                 "FO-ANIL)", "between -1.5 and -0.05", slope("perp_norm"),
                 lambda v: -1.5 <= v <= -0.05),
        ClaimRow("B_star^T B_t B_t^T B_star -> Lambda_star", (inf,),
                 "lambda_err at T (infinite-task FO-ANIL)", "< 1e-3", final("lambda_err"),
                 lambda v: v < 1e-3),
        ClaimRow("with infinitely many inner samples the complement is not unlearned",
                 (no_unlearning, inf), "perp_norm(T) / perp_norm(0), m_in = inf (infinite tasks)",
                 "> 0.5", lambda kept, _: shrinkage("perp_norm")(kept), lambda v: v > 0.5),
        ClaimRow("the finite m_in is what unlearns", (inf, no_unlearning),
                 "perp_norm(T)/perp_norm(0): finite m_in vs m_in = inf", "finite < inf / 2",
                 shrinkage("perp_norm"), lambda finite, infinite: finite < infinite / 2),
    ]
    for method in MODEL_AGNOSTIC:
        run = Runs.pool(method)
        rows += [
            ClaimRow(f"{method} (finite pool) unlearns the complement down to the finite-pool "
                     "floor", (run,), f"perp_norm(T) / perp_norm(0), {run}", "< 0.5",
                     shrinkage("perp_norm"), lambda v: v < 0.5),
            ClaimRow(f"{method} (finite pool) ends near rank k", (run,),
                     f"sv_(k+1) / sv_k at T, {run}", "< 0.6", rank_gap(k), lambda v: v < 0.6),
        ]
    rows += [
        ClaimRow("Burer-Monteiro does not unlearn the complement when k' > k", (mtl, fo),
                 f"perp_norm at T: {mtl} vs {fo}", "mtl > 1.5 x fo-anil",
                 final_pair("perp_norm"), lambda kept, unlearned: kept > 1.5 * unlearned),
        ClaimRow("Burer-Monteiro does not become rank k", (mtl, fo),
                 f"sv_(k+1) / sv_k at T: {mtl} vs {fo}", "mtl > 1.5 x fo-anil", rank_gap(k),
                 lambda gap, reference: gap > 1.5 * reference),
        ClaimRow("test time: one step of FO-ANIL beats regression without a representation "
                 "(risk of order k/m, not d/m)", (fo,),
                 "z-score of risk(regression) - risk(fo-anil) at each m_test in [2k, d]",
                 "> 3 at every such m_test", regression_wins(k, d),
                 lambda wins, total: total > 0 and wins == total),
        ClaimRow("test time: the one-step risk matches its closed form (theory vs simulation)",
                 (fo,), f"max over m_test of |risk - closed form| / stderr, {fo}", "< 4",
                 closed_form_gap, lambda v: v < 4),
    ]
    for layers in RELU_LAYERS:
        for method in POOL_METHODS:
            rows.append(ClaimRow(
                f"ReLU ({layers + 1} layers), {method}: test risk beats plain regression at "
                "small m", (Runs.relu(layers, method),),
                "risk at m_test = {smallest}: {row} vs regression", "method < regression",
                relu_against_regression(method), lambda mine, theirs: mine < theirs))
    rows += [
        ClaimRow("FO-ANIL (finite pool) learns span(B*) to the pool's statistical accuracy",
                 (fo,), "subspace_dist at T vs a method-of-moments estimate on the same pool",
                 "fo-anil <= 1.5 x moments + 0.02", moments_floor(k),
                 lambda mine, floor: mine <= 1.5 * floor + 0.02),
        ClaimRow("a finite pool stops unlearning at a floor above the infinite-task curve",
                 (fo, inf), f"perp_norm at t = {{steps}}: {fo} vs {inf}", "pool > infinite",
                 at_pool_end, lambda pool, infinite: pool > infinite),
    ]
    return rows


def evaluate_claims(runs: Mapping[str, RunData], rows: Sequence[ClaimRow],
                    failed: Sequence[str] = ()) -> list[Claim]:
    """Measure every row whose runs all finished (in order), then one failing claim per run
    in ``failed``."""
    claims = [row.evaluate(runs) for row in rows if all(name in runs for name in row.runs)]
    return claims + [Claim(f"run {name} finished", "status", "done", "failed", False)
                     for name in failed]
