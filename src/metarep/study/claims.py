"""The study's claims (specification §4 and §6) as data: each a row of (claim, runs, measure,
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

from metarep.core.evaluation import BAYES_ORACLE, RIDGE, features_row
from metarep.core.measures import moment_subspace, subspace_distance
from metarep.core.methods import MTL
from metarep.core.problem import Problem
from metarep.core.theory import UNDRIVEN_RATE, undriven_decay
from metarep.run.backends.sources import resolve_inputs
from metarep.run.rundir import RunData
from metarep.run.schema import from_dict
from metarep.study.design import (
    INFINITE_METHODS,
    MODEL_AGNOSTIC,
    POOL_METHODS,
    RELU_LAYERS,
    SETTLED_FRACTION,
    Runs,
)

CLAIM_COLUMNS = ("claim", "measure", "criterion", "value", "passed", "status")
"""The columns of ``claims.csv``: a :class:`Claim`'s fields, then its :attr:`~Claim.status`."""


@dataclass(frozen=True)
class Claim:
    """One row of ``claims.csv``: the claim, what was measured, the criterion, the measured
    value (as text) and whether it passed: ``True``, ``False``, or ``None`` for a claim that
    was skipped (its runs need an extra that is not installed, :meth:`ClaimRow.skipped`)."""

    claim: str
    measure: str
    criterion: str
    value: str
    passed: bool | None

    @property
    def status(self) -> str:
        """``pass``, ``fail`` or ``skipped``."""
        return {True: "pass", False: "fail", None: "skipped"}[self.passed]


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

    def skipped(self, reason: str) -> Claim:
        """The claim not measured, for ``reason`` (e.g. ``needs metarep[torch]``); the
        measure's fields, known only from its runs, read ``<field>``."""
        return Claim(self.claim, self.measure.format_map(_Unmeasured()), self.criterion,
                     f"skipped: {reason}", None)


class _Unmeasured(dict[str, str]):
    """Format fields of a measure that was not taken: ``{steps}`` reads ``<steps>``."""

    def __missing__(self, key: str) -> str:
        return f"<{key}>"


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


def each_run(value: Callable[[RunData], float]) -> Measure:
    """``value`` of one run (:func:`one`), or of each of two runs (:func:`pair`)."""
    def measured(*runs: RunData) -> Measurement:
        values = [value(run) for run in runs]
        return one(values[0]) if len(values) == 1 else pair(*values)

    return measured


def final(column: str) -> Measure:
    """``column`` at the last step."""
    return each_run(lambda run: last(run, column))


def shrinkage(column: str) -> Measure:
    """``column(T) / column(0)``."""
    return each_run(lambda run: last(run, column) / first(run, column))


def rank_gap(k: int) -> Measure:
    """:func:`sv_gap` at the last step."""
    return each_run(lambda run: sv_gap(run, k))


def slope(column: str) -> Measure:
    return lambda run: one(loglog_slope(run, column))


def beats(reference: str, k: int, d: int) -> Measure:
    """How many ``m_test`` in ``[2k, d]`` have ``risk(reference) - risk(fo-anil)`` more than 3
    standard errors above 0 (values: wins, total)."""
    def measured(run: RunData) -> Measurement:
        shots = sorted(int(s) for s in run.eval["shots"].unique())
        wins = []
        for s in (s for s in shots if 2 * k <= s <= d):
            mine, mine_se = risk(run, "fo-anil", s)
            theirs, theirs_se = risk(run, reference, s)
            wins.append((theirs - mine) / math.hypot(mine_se, theirs_se) > 3)
        return Measurement((sum(wins), len(wins)), f"{sum(wins)}/{len(wins)} m_test")

    return measured


def above_the_oracle(run: RunData) -> Measurement:
    """The largest z-score of ``risk(bayes-oracle) - risk(fo-anil)`` over ``m_test`` (below 3:
    the Bayes oracle is a lower reference at every m), and the gap ``risk(fo-anil) /
    risk(bayes-oracle)`` at the smallest and the largest ``m_test``."""
    shots = sorted(int(s) for s in run.eval["shots"].unique())
    z, ratios = [], []
    for s in shots:
        mine, mine_se = risk(run, "fo-anil", s)
        oracle, oracle_se = risk(run, BAYES_ORACLE, s)
        z.append((oracle - mine) / math.hypot(mine_se, oracle_se))
        ratios.append(mine / oracle)
    return Measurement((max(z),), f"max z {max(z):.3g}; fo-anil / bayes-oracle = "
                       f"{ratios[0]:.3g} at m = {shots[0]}, {ratios[-1]:.3g} at m = {shots[-1]}")


def closed_form_gap(run: RunData) -> Measurement:
    """``max over m_test of |risk - closed form| / stderr`` of FO-ANIL's rows."""
    rows = run.eval[run.eval["method"] == "fo-anil"]
    z = ((rows["excess_risk"] - rows["theory"]) / rows["stderr"]).abs()
    if not len(z):
        raise ValueError("no fo-anil rows")
    return one(float(z.max()))


def run_problem(run: RunData) -> Problem:
    """The run's ``Sigma_star`` and ``sigma^2``, with ``B_star`` in its own coordinates."""
    Sigma = run.params["Sigma_star"]
    return Problem(np.eye(Sigma.shape[0]), Sigma, run.config["problem"]["noise_var"])


def unlearning_law(run: RunData, steps: np.ndarray | float) -> np.ndarray | float:
    """:func:`metarep.core.theory.undriven_decay` at ``steps`` for an infinite-task run of its
    method."""
    method = run.config["method"]
    return undriven_decay(run_problem(run), float(run.config["tasks"]["m_in"]),
                          method["inner_lr"], method["outer_lr"], steps, method["name"])


def unlearning_constant(run: RunData) -> Measurement:
    """``perp_norm(T) / (2 kappa alpha^2 beta c T)^(-1/2)``: 1 when the undriven directions
    decay as the theory says for the run's method (:func:`unlearning_law`); ``T`` in the
    fields as ``steps``."""
    steps = int(run.metrics["step"].iloc[-1])
    value = last(run, "perp_norm") / float(unlearning_law(run, steps))
    return Measurement((value,), f"{value:.4g}", {"steps": steps})


def perp_shrinkage(run: RunData) -> float:
    """``perp_norm(T) / perp_norm(0)``."""
    return last(run, "perp_norm") / first(run, "perp_norm")


def at_the_end(value: Callable[[RunData], float]) -> Measure:
    """``value`` of one run, with its last step ``T`` in the fields as ``steps``."""
    def measured(run: RunData) -> Measurement:
        found = value(run)
        return Measurement((found,), f"{found:.4g}", {"steps": int(run.metrics["step"].iloc[-1])})

    return measured


SAME_DYNAMICS_COLUMNS = ("perp_norm", "train_loss")
SAME_DYNAMICS_TOLERANCE = 1e-9
"""Two exact runs follow the same dynamics when :func:`same_dynamics` is below this: far above
the rounding of float64 steps (about 1e-14 after T steps), far below any real difference."""


def same_dynamics(run: RunData, twin: RunData) -> Measurement:
    """The largest relative difference ``|a - b| / max(|a|, |b|)`` between two runs' records
    of :data:`SAME_DYNAMICS_COLUMNS` at the steps both recorded (at least two; 0 where both
    are 0); the number of those steps in the fields as ``records``."""
    both = run.metrics.merge(twin.metrics, on="step", suffixes=("", "_twin"))
    if len(both) < 2:
        raise ValueError("fewer than two common record steps")
    worst = 0.0
    for column in SAME_DYNAMICS_COLUMNS:
        a, b = both[column].to_numpy(), both[f"{column}_twin"].to_numpy()
        scale = np.maximum(np.abs(a), np.abs(b))
        gap = np.divide(np.abs(a - b), scale, out=np.zeros_like(scale), where=scale > 0)
        worst = max(worst, float(gap.max()))
    return Measurement((worst,), f"{worst:.2g}", {"records": len(both)})


def gap_decay(k: int) -> Measure:
    """The exponent of the singular-value gap ``sv_(k+1) / sv_k`` over the last decade,
    ``log(gap(T) / gap(t)) / log(T / t)`` with ``t`` the first record at or after ``T / 10``:
    ``-1/2`` when ``sv_(k+1)`` decays as ``t^(-1/2)`` and ``sv_k`` has converged."""
    def measured(run: RunData) -> Measurement:
        steps = run.metrics["step"].to_numpy()
        index = int(np.searchsorted(steps, steps[-1] / 10))
        earlier = run.metrics.iloc[index]
        before = float(earlier[f"sv_{k + 1}"] / earlier[f"sv_{k}"])
        return one(math.log(sv_gap(run, k) / before) / math.log(steps[-1] / steps[index]))

    return measured


def predictor_vanishes(run: RunData) -> Measurement:
    """``||B_T w_T|| / ||w_0||`` (the shared predictor's size at the end against the initial
    head's), with ``||w_T|| / ||w_0||`` in the text: ``w_T`` keeps a component in the kernel of
    ``B_T`` when ``k' > k``, which the predictor ``x -> x^T B w`` does not see."""
    B, w = run.params["B"], run.params["w"]
    start = first(run, "head_norm")
    ratio = float(np.linalg.norm(B @ w)) / start
    return Measurement((ratio,), f"{ratio:.3g} (||w_T|| / ||w_0|| = "
                       f"{last(run, 'head_norm') / start:.3g})")


def relu_row(method: str) -> str:
    """The ``eval.csv`` row of ``method`` on a ReLU body (``mtl``: its least-squares row)."""
    return features_row(method) if method == MTL.name else method


def seed_mean(values: Sequence[float], stderrs: Sequence[float]) -> tuple[float, float]:
    """The mean of one estimate per seed and its standard error: the spread over seeds
    (``std / sqrt(S)``, 0 for one seed) and the estimates' own standard errors (their mean,
    as if fully correlated: the seeds share the test tasks), added in quadrature."""
    spread = float(np.std(values, ddof=1) / np.sqrt(len(values))) if len(values) > 1 else 0.0
    return float(np.mean(values)), math.hypot(spread, float(np.mean(stderrs)))


def relu_against_ridge(method: str) -> Measure:
    """The z-score of ``risk(ridge) - mean over seeds of risk(method)`` at the smallest
    ``m_test`` (:func:`seed_mean`; ridge uses no training, so it is the same for every seed),
    with both risks in the text."""
    row = relu_row(method)

    def measured(*runs: RunData) -> Measurement:
        smallest = int(runs[0].eval["shots"].min())
        estimates = [risk(run, row, smallest) for run in runs]
        mine, mine_se = seed_mean([e[0] for e in estimates], [e[1] for e in estimates])
        theirs, theirs_se = risk(runs[0], RIDGE, smallest)
        z = (theirs - mine) / math.hypot(mine_se, theirs_se)
        return Measurement((z,), f"z = {z:.3g} ({mine:.3g} +/- {mine_se:.2g} vs {theirs:.3g})",
                           {"smallest": smallest, "row": row, "seeds": len(runs)})

    return measured


def share_path(runs: Sequence[RunData]) -> tuple[float, float, float]:
    """Where W1's share outside span(B*) (``w1_perp_share``) went in ReLU ``runs``: its mean
    over the runs at step 0, at each run's minimum, and at the last step."""
    shares = [run.metrics["w1_perp_share"] for run in runs]
    return (float(np.mean([share.iloc[0] for share in shares])),
            float(np.mean([share.min() for share in shares])),
            float(np.mean([share.iloc[-1] for share in shares])))


def relu_share_flat(*runs: RunData) -> Measurement:
    """The largest :func:`movement` of ``w1_perp_share`` over the ReLU runs (a share in
    [0, 1], so its change itself: relative to a share near 0 the noise of the updates would
    count as movement), and where W1's share outside span(B*) went (:func:`share_path`)."""
    moved = max(movement(run, "w1_perp_share") for run in runs)
    start, lowest, end = share_path(runs)
    return Measurement((moved,), f"{moved:.2g} (mean share: {start:.2f} at t = 0, minimum "
                       f"{lowest:.2f}, {end:.2f} at T)",
                       {"steps": int(runs[0].metrics["step"].iloc[-1])})


def share_kept(run: RunData) -> float:
    """``w1_perp_share(T) / w1_perp_share(0)``: how much of W1's share outside span(B*) is
    left at the end."""
    return last(run, "w1_perp_share") / first(run, "w1_perp_share")


def relu_unlearned(methods: Sequence[str]) -> Measure:
    """Per method, the mean over its seeds of :func:`share_kept`; the runs come by method
    then seed, as many seeds each. The value is the largest of the means, the text names
    every method's."""
    def measured(*runs: RunData) -> Measurement:
        per_method = len(runs) // len(methods)
        kept = {method: float(np.mean([share_kept(run) for run in
                                       runs[i * per_method:(i + 1) * per_method]]))
                for i, method in enumerate(methods)}
        worst = max(kept, key=kept.__getitem__)
        return Measurement((kept[worst],), f"{kept[worst]:.2g} ({worst}); " + ", ".join(
            f"{method} {value:.2g}" for method, value in kept.items()),
            {"steps": int(runs[0].metrics["step"].iloc[-1]), "seeds": per_method})

    return measured


def mean_final_share(count: int) -> Measure:
    """``w1_perp_share(T)``, the mean over the first ``count`` runs and over the rest: two
    groups of runs compared (values: the two means)."""
    def measured(*runs: RunData) -> Measurement:
        groups = (runs[:count], runs[count:])
        return pair(*(float(np.mean([last(run, "w1_perp_share") for run in group]))
                      for group in groups))

    return measured


def relu_risk_flat(methods: Sequence[str]) -> Measure:
    """The largest relative change of the test risk at the smallest ``m_test`` between each
    method's run at its end and at its evaluation during training (``eval_steps.csv``, at
    4/5 of the steps); the runs come in the order of ``methods``."""
    def measured(*runs: RunData) -> Measurement:
        moved = []
        for method, run in zip(methods, runs, strict=True):
            smallest = int(run.eval["shots"].min())
            now = risk(run, relu_row(method), smallest)[0]
            before = risk_at(run, relu_row(method), smallest)
            moved.append(abs(now / before - 1))
        return Measurement((max(moved),), f"{max(moved):.2g}",
                           {"steps": int(runs[0].metrics["step"].iloc[-1])})

    return measured


def risk_at(run: RunData, row: str, shots: int) -> float:
    """``row``'s test risk at ``m_test = shots`` in ``run``'s one evaluation during training
    (``eval_steps.csv``); a run without exactly one fails its claim (:meth:`ClaimRow.evaluate`:
    ``n/a``)."""
    table = run.eval_steps
    (value,) = table[(table["method"] == row) & (table["shots"] == shots)]["excess_risk"]
    return float(value)


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
    run (interpolated at ``T`` in log-log between its records)."""
    steps = int(pool.metrics["step"].iloc[-1])
    curve = infinite.metrics[infinite.metrics["step"] > 0]
    at = float(np.exp(np.interp(math.log(steps), np.log(curve["step"]),
                                np.log(curve["perp_norm"]))))
    return pair(last(pool, "perp_norm"), at, steps=steps)


def settling_value(run: RunData, column: str,
                   fraction: float = float(SETTLED_FRACTION)) -> float:
    """``column(t)`` with ``t`` the last record at or before ``(1 - fraction) T``."""
    steps = run.metrics["step"].to_numpy()
    index = int(np.searchsorted(steps, (1 - fraction) * steps[-1], side="right")) - 1
    return float(run.metrics[column].iloc[index])


def flatness(run: RunData, column: str, fraction: float = float(SETTLED_FRACTION)) -> float:
    """``|column(T) / column(t) - 1|`` (:func:`settling_value`): how much ``column`` still
    moved, relatively, over the last ``fraction`` of the steps."""
    return abs(last(run, column) / settling_value(run, column, fraction) - 1)


def movement(run: RunData, column: str, fraction: float = float(SETTLED_FRACTION)) -> float:
    """``|column(T) - column(t)|`` (:func:`settling_value`): how much ``column`` still moved
    over the last ``fraction`` of the steps."""
    return abs(last(run, column) - settling_value(run, column, fraction))


def floors_flat(*runs: RunData) -> Measurement:
    """The largest :func:`flatness` of ``perp_norm`` over the floor runs."""
    worst = max(flatness(run, "perp_norm") for run in runs)
    return Measurement((worst,), f"{worst:.2g} (largest of {len(runs)} runs)")


def floor_exponent(*runs: RunData) -> Measurement:
    """The exponent ``e`` of ``floor ~ N^e`` from a least-squares fit of ``log perp_norm(T)``
    on ``log N`` over the floor runs (several N, several pool seeds each), with its standard
    error from the fit's residuals; values ``(e, stderr)``."""
    n = np.log([run.config["tasks"]["n"] for run in runs])
    floor = np.log([last(run, "perp_norm") for run in runs])
    (exponent, _), covariance = np.polyfit(n, floor, 1, cov=True)
    stderr = float(np.sqrt(covariance[0, 0]))
    sizes = sorted({run.config["tasks"]["n"] for run in runs})
    return Measurement((float(exponent), stderr), f"{exponent:.3f} +/- {stderr:.3f}",
                       {"sizes": ", ".join(map(str, sizes)), "runs": len(runs)})


# ----------------------------------------------------------------------------- the rows


RELU_UNLEARNED = 0.2
"""The ReLU study's unlearning criterion: W1's share outside span(B*) ends below this fraction
of its start (the linear study's infinite-task criterion on ``perp_norm``)."""


def relu_rows(layers: int, seeds: Sequence[int]) -> list[ClaimRow]:
    """The claims of the ReLU study with ``layers`` hidden layers over ``seeds``: that its runs
    have stopped moving; that with fresh tasks the model-agnostic methods unlearn W1's part
    outside span(B*), with its two negative controls (FO-ANIL on a pool stops at a floor,
    Burer-Monteiro keeps it); then, per method, the test risk against ridge."""
    every_run = tuple(Runs.relu(layers, method, seed) for method in POOL_METHODS
                      for seed in seeds)
    agnostic = tuple(Runs.relu(layers, method, seed) for method in MODEL_AGNOSTIC
                     for seed in seeds)
    first_seed = tuple(Runs.relu(layers, method, seeds[0]) for method in POOL_METHODS)
    fresh, pool = Runs.relu(layers, "fo-anil", seeds[0]), Runs.relu_pool(layers, seeds[0])
    fo_seeds = tuple(Runs.relu(layers, "fo-anil", seed) for seed in seeds)
    mtl_seeds = tuple(Runs.relu(layers, MTL.name, seed) for seed in seeds)
    name = f"ReLU ({layers + 1} layers)"
    rows = [
        ClaimRow(f"{name}: every method is trained until the test risk stops moving", first_seed,
                 "largest relative change of the test risk at the smallest m_test over the "
                 "last fifth of T = {steps} steps (first seed, at T vs at 4T/5)",
                 "< 0.02", relu_risk_flat(POOL_METHODS), lambda moved: moved < 0.02),
        ClaimRow(f"{name}: ... and until W1's share outside span(B*) stops moving", every_run,
                 "largest change of ||B_perp^T W1||_F / ||W1||_F over the last fifth of "
                 "T = {steps} steps (every method and seed)", "< 0.01", relu_share_flat,
                 lambda moved: moved < 0.01),
        ClaimRow(f"{name}: with fresh tasks every model-agnostic method unlearns W1's part "
                 "outside span(B*)", agnostic, "largest over the methods of the mean over "
                 "{seeds} seeds of w1_perp_share(T) / w1_perp_share(0), T = {steps}",
                 f"< {RELU_UNLEARNED:g}", relu_unlearned(MODEL_AGNOSTIC),
                 lambda kept: kept < RELU_UNLEARNED),
        ClaimRow(f"{name}, negative control: on a pool of N tasks FO-ANIL stops unlearning at "
                 "a floor", (pool, fresh), f"w1_perp_share at T: {pool} vs {fresh}",
                 "pool > 1.5 x fresh tasks", final("w1_perp_share"),
                 lambda floor, unlearned: floor > 1.5 * unlearned),
        ClaimRow(f"{name}, negative control: Burer-Monteiro does not unlearn W1's part outside "
                 "span(B*)", mtl_seeds + fo_seeds,
                 "w1_perp_share at T, mean over the seeds: mtl vs fo-anil",
                 "mtl > 1.5 x fo-anil", mean_final_share(len(mtl_seeds)),
                 lambda kept, unlearned: kept > 1.5 * unlearned),
    ]
    for method in POOL_METHODS:
        rows.append(ClaimRow(
            f"ReLU ({layers + 1} layers), {method}: test risk below ridge regression at small m",
            tuple(Runs.relu(layers, method, seed) for seed in seeds),
            "z-score of risk(ridge) - mean risk({row}) over {seeds} seeds at m_test = "
            "{smallest} (error: seeds and test tasks)", "> 3", relu_against_ridge(method),
            lambda z: z > 3))
    return rows


RATE_REASON = {
    "fo-maml": "from w_0 = 0 its dynamics are FO-ANIL's",
    "anil": "the gradient through the inner step doubles FO-ANIL's cubic shrinkage",
    "maml": "from w_0 = 0 its dynamics are ANIL's",
}
"""Why ``kappa`` (:data:`metarep.core.theory.UNDRIVEN_RATE`) is what it is, per method of
:data:`~metarep.study.design.INFINITE_METHODS`."""

TWINS = (("maml", "anil"), ("fo-maml", "fo-anil"))
"""Pairs whose exact infinite-task dynamics coincide from ``w_0 = 0`` (one inner step)."""


def infinite_method_rows() -> list[ClaimRow]:
    """The claims on the exact infinite-task runs of ANIL, FO-MAML and MAML (one inner step,
    ``w_0 = 0``), per method: the complement is unlearned; at the rate
    ``(2 kappa alpha^2 beta c t)^(-1/2)`` of :func:`metarep.core.theory.undriven_decay`;
    ``B_star^T B_t B_t^T B_star`` reaches ``Lambda_star``, which the theory gives only as a
    stationary point of the expected step at ``w = 0`` (whether it is reached is measured).
    Then that MAML follows ANIL and FO-MAML follows FO-ANIL exactly (the head stays 0), and
    the negative control of ANIL (and so MAML) with ``m_in = inf``."""
    rows = []
    for method in INFINITE_METHODS:
        run = Runs.infinite(method)
        kappa = UNDRIVEN_RATE[method]
        rows += [
            ClaimRow(f"{method}, infinitely many tasks: the orthogonal complement is unlearned "
                     "(B_perp^T B_t -> 0)", (run,),
                     f"perp_norm(T) / perp_norm(0), T = {{steps}} ({run})", "< 0.2",
                     at_the_end(perp_shrinkage),
                     lambda v: v < 0.2),
            ClaimRow(f"{method}, infinitely many tasks: perp_norm(t) = (2 kappa alpha^2 beta c "
                     f"t)^(-1/2) with kappa = {kappa} ({RATE_REASON[method]})", (run,),
                     f"perp_norm(T) sqrt(2 kappa alpha^2 beta c T), T = {{steps}} ({run})",
                     "1 +/- 0.02", unlearning_constant, lambda v: abs(v - 1) <= 0.02),
            ClaimRow(f"{method}, infinitely many tasks: B_star^T B_t B_t^T B_star -> "
                     "Lambda_star, a stationary point of its expected step at w = 0 (that it "
                     "is reached is measured, not proven)", (run,),
                     f"lambda_err at T = {{steps}} ({run})", "< 1e-6",
                     at_the_end(lambda r: last(r, "lambda_err")), lambda v: v < 1e-6),
        ]
    for method, twin in TWINS:
        rows.append(ClaimRow(
            f"from w_0 = 0, infinite-task {method} follows {twin} exactly (the expected head "
            "step is odd in (w_star, noise), so w_t = 0 and the body's inner step vanishes)",
            (Runs.infinite(method), Runs.infinite(twin)),
            f"largest relative difference of perp_norm and train_loss over the {{records}} "
            f"common records, {Runs.infinite(method)} vs {Runs.infinite(twin)}",
            f"< {SAME_DYNAMICS_TOLERANCE:g}", same_dynamics,
            lambda v: v < SAME_DYNAMICS_TOLERANCE))
    control = Runs.m_in("inf", "anil")
    rows.append(ClaimRow(
        "negative control (ANIL, and so MAML): with infinitely many inner samples the "
        "complement is not unlearned", (control,),
        f"perp_norm(T) / perp_norm(0), T = {{steps}} ({control})", "> 0.5",
        at_the_end(perp_shrinkage), lambda v: v > 0.5))
    return rows


def claim_rows(k: int, d: int, floors: Sequence[str] = (),
               relu_seeds: Sequence[int] = ()) -> list[ClaimRow]:
    """Every claim of the study for latent dimension ``k`` and ambient dimension ``d``, in the
    order they are reported; ``floors`` names the runs of the finite-pool floor study
    (:meth:`metarep.study.design.Runs.floors`) and ``relu_seeds`` the seeds of the ReLU study
    (:func:`relu_rows`), none to leave their claims out. Each criterion
    comes from the theory (a rate, a constant, a closed form, a lower reference, a scaling law)
    and can fail; the negative controls (``m_in = inf``, Burer-Monteiro) are claims of their
    own, next to the claim they control."""
    inf, no_unlearning, head = Runs.INFINITE, Runs.m_in("inf"), Runs.INFINITE_HEAD
    fo, mtl = Runs.pool("fo-anil"), Runs.pool("mtl")
    rows = [
        ClaimRow("from w_0 != 0 the shared predictor vanishes: B_t w_t -> 0 (infinite tasks)",
                 (head,), f"||B_T w_T|| / ||w_0||, {head}", "< 1e-6", predictor_vanishes,
                 lambda v: v < 1e-6),
        ClaimRow("B_perp^T B_t -> 0: the orthogonal complement is unlearned although k' > k",
                 (inf,), "perp_norm(T) / perp_norm(0) (infinite-task FO-ANIL)", "< 0.2",
                 shrinkage("perp_norm"), lambda v: v < 0.2),
        ClaimRow("the unlearning is slow: perp_norm decays as t^(-1/2)", (inf,),
                 "log-log slope of perp_norm over the last decade of steps (infinite-task "
                 "FO-ANIL)", "-0.5 +/- 0.02", slope("perp_norm"),
                 lambda v: abs(v + 0.5) <= 0.02),
        ClaimRow("... with the predicted constant: perp_norm(t) = (2 alpha^2 beta c t)^(-1/2), "
                 "c = (tr Sigma* + sigma^2) / m_in", (inf,),
                 "perp_norm(T) sqrt(2 alpha^2 beta c T) (infinite-task FO-ANIL)",
                 "1 +/- 0.02", unlearning_constant, lambda v: abs(v - 1) <= 0.02),
        ClaimRow("negative control: with infinitely many inner samples the complement is not "
                 "unlearned", (no_unlearning, inf),
                 "perp_norm(T) / perp_norm(0), m_in = inf (infinite tasks)", "> 0.5",
                 lambda kept, _: shrinkage("perp_norm")(kept), lambda v: v > 0.5),
        ClaimRow("the finite m_in is what unlearns", (inf, no_unlearning),
                 "perp_norm(T)/perp_norm(0): finite m_in vs m_in = inf", "finite < inf / 2",
                 shrinkage("perp_norm"), lambda finite, infinite: finite < infinite / 2),
        ClaimRow("B_t becomes rank k: the gap sv_(k+1) / sv_k closes as t^(-1/2)", (inf,),
                 "log-log slope of sv_(k+1) / sv_k over the last decade (infinite-task "
                 "FO-ANIL)", "-0.5 +/- 0.02", gap_decay(k), lambda v: abs(v + 0.5) <= 0.02),
        ClaimRow("B_star^T B_t B_t^T B_star -> Lambda_star", (inf,),
                 "lambda_err at T (infinite-task FO-ANIL)", "< 1e-3", final("lambda_err"),
                 lambda v: v < 1e-3),
    ]
    rows += infinite_method_rows()
    for method in MODEL_AGNOSTIC:
        run = Runs.pool(method)
        rows.append(ClaimRow(
            f"{method} (finite pool) unlearns most of the complement: perp_norm falls below half "
            "its initial value",
            (run,), f"perp_norm(T) / perp_norm(0), {run}", "< 0.5", shrinkage("perp_norm"),
            lambda v: v < 0.5))
    rows += [
        ClaimRow("negative control: Burer-Monteiro does not unlearn the complement when k' > k",
                 (mtl, fo), f"perp_norm at T: {mtl} vs {fo}", "mtl > 1.5 x fo-anil",
                 final("perp_norm"), lambda kept, unlearned: kept > 1.5 * unlearned),
        ClaimRow("negative control: Burer-Monteiro opens no singular-value gap at k", (mtl, fo),
                 f"sv_(k+1) / sv_k at T: {mtl} vs {fo}", "mtl > 1.5 x fo-anil", rank_gap(k),
                 lambda gap, reference: gap > 1.5 * reference),
        ClaimRow("test time: one step of FO-ANIL beats ridge regression in d dimensions (the "
                 "prior-optimal estimator without a representation)", (fo,),
                 "z-score of risk(ridge) - risk(fo-anil) at each m_test in [2k, d]",
                 "> 3 at every such m_test", beats(RIDGE, k, d),
                 lambda wins, total: total > 0 and wins == total),
        ClaimRow("test time: the Bayes oracle is a lower reference; FO-ANIL's gap to it",
                 (inf,), "max over m_test of z(risk(bayes-oracle) - risk(fo-anil)), "
                 f"{inf}; the gap", "< 3", above_the_oracle, lambda z: z < 3),
        ClaimRow("test time: the one-step risk at the infinite-task limit matches its closed "
                 "form", (inf,), f"max over m_test of |risk - closed form| / stderr, {inf}",
                 "< 4", closed_form_gap, lambda v: v < 4),
        ClaimRow("test time: the one-step risk on the pool matches its closed form at the "
                 "learned (B, w)", (fo,),
                 f"max over m_test of |risk - closed form| / stderr, {fo}", "< 4",
                 closed_form_gap, lambda v: v < 4),
    ]
    for layers in RELU_LAYERS if relu_seeds else ():
        rows += relu_rows(layers, relu_seeds)
    rows += [
        ClaimRow("FO-ANIL (finite pool) learns span(B*) to the pool's statistical accuracy",
                 (fo,), "subspace_dist at T vs a method-of-moments estimate on the same pool",
                 "fo-anil <= 1.5 x moments + 0.02", moments_floor(k),
                 lambda mine, floor: mine <= 1.5 * floor + 0.02),
        ClaimRow("a finite pool stops unlearning at a floor above the infinite-task curve",
                 (fo, inf), f"perp_norm at t = {{steps}}: {fo} vs {inf}", "pool > infinite",
                 at_pool_end, lambda pool, infinite: pool > infinite),
    ]
    if floors:
        rows += [
            ClaimRow("the finite-pool floor is reached: FO-ANIL's perp_norm stops moving",
                     tuple(floors), "|perp_norm(T) / perp_norm(0.8 T) - 1| of each floor run",
                     "< 0.01", floors_flat, lambda v: v < 0.01),
            ClaimRow("the floor falls as N^(-1/4) (cubic unlearning against pool noise of "
                     "order N^(-1/2)), not as the N^(-1/2) of a statistical error",
                     tuple(floors), "exponent e of perp_norm(T) ~ N^e, N = {sizes} ({runs} "
                     "runs), +/- its standard error",
                     "-3/8 < e < -1/8 and |e + 1/2| > 3 stderr",
                     floor_exponent, lambda e, se: -0.375 < e < -0.125 and abs(e + 0.5) > 3 * se),
        ]
    return rows


def evaluate_claims(runs: Mapping[str, RunData], rows: Sequence[ClaimRow],
                    failed: Sequence[str] = (),
                    skipped: Mapping[str, str] | None = None) -> list[Claim]:
    """Measure every row whose runs all finished (in order), then one failing claim per run
    in ``failed``. A row with a run in ``skipped`` (run name -> why it was not run) is marked
    skipped with that reason instead of measured."""
    skipped = skipped or {}
    claims = []
    for row in rows:
        reasons = [skipped[name] for name in row.runs if name in skipped]
        if reasons:
            claims.append(row.skipped(reasons[0]))
        elif all(name in runs for name in row.runs):
            claims.append(row.evaluate(runs))
    return claims + [Claim(f"run {name} finished", "status", "done", "failed", False)
                     for name in failed]
