"""``metarep reproduce``: the paper's study (specification §6) as one command.

The runs of the study (:mod:`metarep.study.design`) are independent; they execute on a local
process pool through the sweep machinery (:mod:`metarep.sweeps`), so finished runs are reused
when the command is re-run. The claims (:mod:`metarep.study.claims`) are measured on the
finished runs. The report (:mod:`metarep.study.report`) reads only the runs' output files:
six figures (PNG and PDF), the claims table (``claims.csv``) and ``report.html``, which embeds
the figures and opens offline.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path

from metarep import __version__
from metarep.run.provenance import provenance
from metarep.run.rundir import RunDirectory, check_output_dir
from metarep.run.schema import dump_yaml, from_dict
from metarep.study.claims import Claim, claim_rows, evaluate_claims
from metarep.study.design import Runs, base_tree, check_scale, study_runs
from metarep.study.report import write_report
from metarep.sweeps.driver import SweepOptions, execute_plans
from metarep.sweeps.executors import default_workers
from metarep.sweeps.spec import RunPlan, SweepSpec

TORCH_MISSING = "needs PyTorch: pip install 'metarep[torch]'"
"""Why the ReLU part of the study is skipped without the ``torch`` extra."""


@dataclass(frozen=True)
class StudyResult:
    """Where the report is, how the claims came out, and which runs were skipped (run name ->
    the reason)."""

    report: Path
    claims: list[Claim]
    runs_done: int
    runs_failed: list[str]
    runs_skipped: dict[str, str]


def skipped_runs(scale: str) -> dict[str, str]:
    """The runs of the study at ``scale`` that cannot run here, each with the reason: the ReLU
    runs (``model.kind: relu``) when torch is not installed; none otherwise."""
    check_scale(scale)
    if importlib.util.find_spec("torch") is not None:
        return {}
    return {run.name: TORCH_MISSING for run in study_runs(scale)
            if run.overrides.get("model.kind") == "relu"}


def skip_notice(scale: str) -> str | None:
    """One line saying which part of the study is skipped and why, or ``None``."""
    skipped = skipped_runs(scale)
    if not skipped:
        return None
    return (f"the ReLU study (figure f, {len(skipped)} runs and their claims) {TORCH_MISSING}; "
            "it is skipped, and its claims are marked skipped")


def reproduce(scale: str = "default", out: str | Path | None = None, *,
              workers: int | None = None, progress: bool = True,
              log_runs: bool = False) -> StudyResult:
    """Run the study at ``scale`` into ``out/runs`` (reusing finished runs) and write the
    report, figures, tables and ``claims.csv`` into ``out`` (default ``runs/reproduce-SCALE``).
    ``workers`` (default: the CPUs) bounds the runs at once and the processes drawing the
    report's figures. ``progress`` shows a progress bar, ``log_runs`` one line per finished
    run on stderr (for a log file). Without torch the ReLU runs are skipped
    (:func:`skipped_runs`) and their claims marked skipped, not failed; figure (f) then says
    so instead of being drawn.
    """
    skipped = skipped_runs(scale)
    root = check_output_dir(out) if out is not None else Path("runs") / f"reproduce-{scale}"
    tree = base_tree(scale)
    spec = SweepSpec(base=scale, config_name=f"reproduce-{scale}", tree=tree, fixed={}, grid={},
                     zip={}, seeds=[], seed_keys=[])
    plans = [RunPlan(run.name, run.overrides, {"run": run.name}, None)
             for run in study_runs(scale) if run.name not in skipped]
    options = SweepOptions(workers=workers, progress=progress, log_runs=log_runs)
    execute_plans(spec, plans, root / "runs", options)
    runs = {plan.name: data for plan in plans
            if (data := RunDirectory(root / "runs" / plan.name).read()) is not None}
    failed = [plan.name for plan in plans if plan.name not in runs]
    problem = tree["problem"]
    rows = claim_rows(problem["k"], problem["d"], Runs.floors(scale),
                      Runs.relu_claim_seeds(scale))
    claims = evaluate_claims(runs, rows, failed, skipped)
    context = {"scale": scale, "k": problem["k"], "m_in": tree["tasks"]["m_in"],
               "floors": Runs.floors(scale), "relu_seeds": Runs.relu_seeds(scale),
               "provenance": provenance(),
               "relu_claims": bool(Runs.relu_claim_seeds(scale)),
               "n_runs": len(plans), "skipped": skipped, "version": __version__,
               "setting": dump_yaml(from_dict(tree, name=f"reproduce-{scale}")) +
               "\nper-run overrides:\n" + "\n".join(
                   f"  {plan.name}: {plan.overrides}" for plan in plans)}
    report = write_report(root, runs, claims, context, default_workers(workers))
    return StudyResult(report, claims, len(runs), failed, skipped)
