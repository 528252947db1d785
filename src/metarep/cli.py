"""Command-line interface: a thin layer over :mod:`metarep.run`, :mod:`metarep.sweeps` and
:mod:`metarep.study`. Each command imports what it needs when it runs, so ``--help`` is fast.

Exit codes: 0 success, 1 the system failed a write (a full disk, a lost permission), 2 bad
input (one line naming the field), 3 a run diverged, 130 / 143 stopped by SIGINT / SIGTERM
(everything recorded is kept; the same command with ``--resume``, or again for a sweep,
continues). Every failure is one line on stderr.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any

import typer
from typer.core import TyperGroup

from metarep.errors import ConfigError

EXIT_SYSTEM = 1
EXIT_BAD_INPUT = 2
EXIT_DIVERGED = 3

_click_errors = sys.modules[typer.BadParameter.__module__]
"""The exceptions of the click that typer runs on (its vendored copy, or click itself)."""


class _OneLineErrors(TyperGroup):
    """The ``metarep`` command group, whose usage errors (an unknown option, a value of the
    wrong type, a missing argument) are one line ``error: ...`` on stderr with exit code 2,
    like every other bad input, instead of click's usage text and rich's framed box."""

    def main(self, args: Sequence[str] | None = None, prog_name: str | None = None,
             complete_var: str | None = None, standalone_mode: bool = True,
             windows_expand_args: bool = True, **extra: Any) -> Any:
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, standalone_mode,
                                windows_expand_args, **extra)
        try:
            code = super().main(args, prog_name, complete_var, False, windows_expand_args,
                                **extra)
        except _click_errors.ClickException as error:
            hint = ""
            if isinstance(error, _click_errors.UsageError) and error.ctx is not None:
                hint = f" (see {error.ctx.command_path} --help)"
            typer.echo(f"error: {error.format_message()}{hint}", err=True)
            sys.exit(error.exit_code)
        except typer.Abort:
            typer.echo("error: aborted", err=True)
            sys.exit(1)
        sys.exit(code or 0)


app = typer.Typer(
    cls=_OneLineErrors,
    add_completion=True,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="metarep: meta-learning of shared representations (FO-ANIL and friends).",
)


def _print_version(value: bool) -> None:
    if value:
        from metarep import __version__

        typer.echo(f"metarep {__version__}")
        raise typer.Exit()


@app.callback()
def _options(
    version: Annotated[bool, typer.Option("--version", callback=_print_version, is_eager=True,
                                          help="Print the version and exit.")] = False,
) -> None:
    """metarep: meta-learning of shared representations (FO-ANIL and friends)."""


def fail(message: str, code: int) -> typer.Exit:
    """Print ``error: message`` on stderr and return the exit to raise."""
    typer.echo(f"error: {message}", err=True)
    return typer.Exit(code)


@contextmanager
def reported(stopped: str, kept: str) -> Iterator[None]:
    """Run the block with SIGTERM raising an interrupt, as SIGINT does; an interrupt or a
    failed write (``OSError``: a full disk) becomes one ``error:`` line: what ``stopped``,
    then ``kept``, what was kept and how to go on. Exit 128 + the signal, or
    :data:`EXIT_SYSTEM`."""
    from metarep.run.interrupts import exit_code, signal_name, sigterm_interrupts

    try:
        with sigterm_interrupts():
            yield
    except KeyboardInterrupt as error:
        raise fail(f"{stopped} by {signal_name(error)}; {kept}", exit_code(error)) from None
    except OSError as error:
        where = f" {error.filename}" if error.filename else ""
        raise fail(f"{stopped}: cannot write{where}: {error.strerror or error}; {kept}",
                   EXIT_SYSTEM) from None


HEARTBEAT_SECONDS = 30.0
"""How often a run whose stderr is not a terminal prints where it is."""


class Heartbeat:
    """For a run whose progress goes to a log file: at a record, at most every
    :data:`HEARTBEAT_SECONDS`, one line ``[run] step t/T (p%), train_loss = ..., N s``."""

    def __init__(self, steps: int):
        self.steps, self.started = steps, time.monotonic()
        self.last = self.started

    def __call__(self, trajectory: Any) -> None:
        now = time.monotonic()
        if now - self.last < HEARTBEAT_SECONDS or not trajectory.records:
            return
        self.last = now
        share = 100.0 * trajectory.step / max(self.steps, 1)
        typer.echo(f"[run] step {trajectory.step:,}/{self.steps:,} ({share:.0f}%), train_loss "
                   f"= {trajectory.records[-1]['train_loss']:.4g}, {now - self.started:.0f} s",
                   err=True)


ConfigArg = Annotated[str, typer.Argument(help="YAML path or built-in name: paper, quick.")]
SetOpt = Annotated[
    list[str] | None,
    typer.Option("--set", "-s", help="Override a config key: --set model.width=10 (repeatable)."),
]


@app.command()
def run(
    config: ConfigArg,
    overrides: SetOpt = None,
    out: Annotated[str | None,
                   typer.Option(help="Output directory \\[default: runs/NAME].")] = None,
    resume: Annotated[bool, typer.Option(help="Continue from OUT/checkpoint.npz.")] = False,
    overwrite: Annotated[bool, typer.Option(
        "--force", "--overwrite",
        help="Replace the finished or interrupted run in OUT (refused without it).")] = False,
    progress: Annotated[bool, typer.Option(help="Show a progress bar.")] = True,
    figures: Annotated[bool, typer.Option(
        help="Draw training.png and eval.png (without: `metarep figures OUT` draws them "
        "later).")] = True,
) -> None:
    """Train one configuration and write metrics, evaluation, summary, params and figures."""
    from metarep.run.experiment import run_experiment
    from metarep.run.loop import Diverged
    from metarep.run.schema import load_config

    terminal = sys.stderr.isatty()
    try:
        cfg = load_config(config, overrides or [])
        out_dir = out if out is not None else str(Path("runs") / cfg.name)
        beat = Heartbeat(cfg.train.steps) if progress and not terminal else None
        with reported("run stopped", f"what was recorded is in {out_dir}; --resume continues "
                      "from its last checkpoint"):
            result = run_experiment(cfg, out_dir, progress=progress and terminal,
                                    resume=resume, overwrite=overwrite, on_record=beat,
                                    figures=figures)
    except ConfigError as error:
        raise fail(str(error), EXIT_BAD_INPUT) from None
    except Diverged as error:
        raise fail(f"{error} Results so far are in {out_dir}.", EXIT_DIVERGED) from None
    final = result.summary["final"]
    shown = ", ".join(f"{key} = {final[key]:.4g}" for key in
                      ("train_loss", "perp_norm", "subspace_dist", "lambda_err", "w1_perp_share")
                      if key in final)
    typer.echo(f"done: {result.out_dir} ({shown})")


@app.command()
def show(config: ConfigArg, overrides: SetOpt = None) -> None:
    """Print the resolved configuration as YAML."""
    from metarep.run.schema import dump_yaml, load_config

    try:
        typer.echo(dump_yaml(load_config(config, overrides or [])), nl=False)
    except ConfigError as error:
        raise fail(str(error), EXIT_BAD_INPUT) from None


@app.command()
def keys() -> None:
    """Print every config key with its default and meaning (Markdown)."""
    from metarep.run.schema import key_table

    typer.echo(key_table())


@app.command()
def sweep(
    target: Annotated[str, typer.Argument(
        metavar="SWEEP", help="Sweep YAML (base, set, grid, zip, seeds); or, with --grid, "
        "--set or --seeds, the base config: a YAML path or a built-in name (paper, quick).")],
    grid: Annotated[list[str] | None, typer.Option(
        "--grid", "-g", help="Vary a key: --grid model.width=2,4,8 (values read as YAML; "
        "list values: --grid 'eval.shots=[5,10];[20]'). Repeatable.")] = None,
    overrides: Annotated[list[str] | None, typer.Option(
        "--set", "-s", help="Fix a key for every run: --set train.steps=200. Repeatable.")]
    = None,
    seeds: Annotated[str | None, typer.Option(
        help="Run everything once per seed: --seeds 0,1,2.")] = None,
    seed_keys: Annotated[str | None, typer.Option(
        help="The keys a seed sets: tasks.seed,model.seed \\[default: every *.seed].")]
    = None,
    plan: Annotated[bool, typer.Option(
        "--plan", help="List the runs, their directories and what is done; run and write "
        "nothing.")] = False,
    executor: Annotated[str, typer.Option(
        help="local (process pool), ray, slurm (a job array through submitit) or "
        "submitit-local (the slurm path as local processes).")] = "local",
    address: Annotated[str | None, typer.Option(help="Ray cluster address (HEAD:6379).")] = None,
    workers: Annotated[int | None, typer.Option(help="Runs at once \\[default: CPUs].")] = None,
    out: Annotated[str | None, typer.Option(
        help="Sweep directory \\[default: runs/STEM; runs/sweep-STEM for a base config].")]
    = None,
    retry_failed: Annotated[bool, typer.Option(help="Redo runs that failed before.")] = False,
    progress: Annotated[bool, typer.Option(help="Show a progress bar.")] = True,
    batch: Annotated[bool, typer.Option(help="Batch tasks.n: infinite runs that differ only "
                                        "in step sizes, m_in, noise and seeds.")] = True,
    figures: Annotated[bool, typer.Option(
        help="Each run draws its training.png and eval.png (default: not; `metarep figures "
        "OUT` draws them from the runs' files).")] = False,
    slurm_partition: Annotated[str | None, typer.Option(
        help="SLURM partition \\[default: the cluster's default].")] = None,
    slurm_time: Annotated[int | None, typer.Option(
        help="Time limit of each array task, minutes (requeued and resumed when reached, "
        "up to 3 times) \\[default: 60].")] = None,
    slurm_cpus: Annotated[int | None, typer.Option(
        help="CPUs of each array task \\[default: 1; a run uses one thread].")] = None,
    slurm_mem: Annotated[float | None, typer.Option(
        help="Memory of each array task, GB \\[default: the partition's].")] = None,
    slurm_array_parallelism: Annotated[int | None, typer.Option(
        help="Array tasks running at once \\[default: --workers, else 256].")] = None,
    slurm_log_dir: Annotated[str | None, typer.Option(
        help="SLURM logs and submitit's files \\[default: OUT/.slurm].")] = None,
) -> None:
    """Run every run of a sweep (resuming: finished runs are skipped), one directory each.

    The sweep is a sweep file, or a base config with --grid, --set and --seeds (with a
    sweep file these override its fields, key by key)."""
    from metarep.sweeps.driver import SweepOptions, execute_plans, plan_lines, survey
    from metarep.sweeps.slurm import SlurmSettings
    from metarep.sweeps.spec import command_line_fields, sweep_of

    terminal = sys.stderr.isatty()
    slurm = SlurmSettings(slurm_partition, slurm_time, slurm_cpus, slurm_mem,
                          slurm_array_parallelism, slurm_log_dir)
    options = SweepOptions(executor=executor, workers=workers, address=address,
                           retry_failed=retry_failed, progress=progress and terminal,
                           batch_infinite=batch, figures=figures,
                           log_runs=progress and not terminal,
                           slurm=slurm)
    try:
        fields = command_line_fields(grid or [], overrides or [], seeds, seed_keys)
        spec, plans, default_out = sweep_of(target, fields)
        out_dir = out if out is not None else str(default_out)
        if plan:
            typer.echo("\n".join(plan_lines(survey(spec, plans, out_dir), out_dir,
                                             retry_failed)))
            return
        with reported("sweep stopped", "finished runs are kept and interrupted ones resume: "
                      "run the same command again"):
            report = execute_plans(spec, plans, out_dir, options)
    except ConfigError as error:
        raise fail(str(error), EXIT_BAD_INPUT) from None
    typer.echo(f"sweep {report.out_dir}: {report.total} runs, {report.done} done, "
               f"{report.failed} failed ({report.ran} ran now)")
    if report.failed_runs:
        typer.echo(f"failed: {', '.join(report.failed_runs)} (each DIR/NAME/error.json says "
                   "why; --retry-failed redoes them)")
    if report.unfinished_runs:
        typer.echo(f"unfinished: {', '.join(report.unfinished_runs)} (their jobs were "
                   "cancelled or preempted; run the same command again to finish them)")


@app.command()
def collect(
    sweep_dir: Annotated[Path, typer.Argument(help="A sweep directory.")],
    x: Annotated[str | None,
                 typer.Option(help="Axis: a config key \\[default: first axis].")] = None,
    y: Annotated[str | None, typer.Option(help="Measure \\[default: perp_norm].")] = None,
    xscale: Annotated[str, typer.Option(help="x axis: auto (log where the values are "
                                             "positive and span a factor 20), linear or log.")]
    = "auto",
    yscale: Annotated[str, typer.Option(help="y axis: auto, linear or log.")] = "auto",
) -> None:
    """Write DIR/collected.parquet and .csv (one row per run) and a plot of y against x
    (positive measures: geometric means and intervals over log values; text axes as
    categories)."""
    from metarep.sweeps.collect import collect as collect_sweep

    try:
        result = collect_sweep(sweep_dir, x, y, xscale=xscale, yscale=yscale)
    except ConfigError as error:
        raise fail(str(error), EXIT_BAD_INPUT) from None
    figure = f", {result.figure}" if result.figure is not None else ""
    typer.echo(f"collected {len(result.table)} runs: {result.parquet}, {result.csv}{figure}")


@app.command()
def compare(
    run_dirs: Annotated[list[Path], typer.Argument(help="Run directories (finished or not).",
                                                   metavar="RUN_DIR...",
                                                   show_default=False)],
    out: Annotated[str, typer.Option(help="Figure path without suffix: OUT.png and OUT.pdf "
                                          "are written.")] = "compare",
    measures: Annotated[str | None, typer.Option(
        help="Comma-separated measures of metrics.csv to draw \\[default: the training "
             "curves].")] = None,
) -> None:
    """Overlay the training curves of several runs (legend: the config keys that differ)."""
    from metarep.run.compare import compare as compare_runs

    asked = None if measures is None else [m.strip() for m in measures.split(",")]
    try:
        png, pdf = compare_runs(run_dirs, out, asked)
    except ConfigError as error:
        raise fail(str(error), EXIT_BAD_INPUT) from None
    typer.echo(f"compared {len(run_dirs)} runs: {png}, {pdf}")


@app.command("figures")
def draw_figures(
    dirs: Annotated[list[Path], typer.Argument(
        help="Finished run directories, or sweep directories (every finished run in them).",
        metavar="DIR...", show_default=False)],
    workers: Annotated[int, typer.Option(
        help="Processes that draw in parallel (each starts Python and matplotlib once: about "
             "1 s; a run's two figures take about 1 s).")] = 1,
) -> None:
    """Draw training.png and eval.png of finished runs from the files they wrote."""
    from metarep.run.figures import draw_figures
    from metarep.sweeps.collect import finished_runs

    try:
        runs = [run for path in dirs for run in finished_runs(path)]
        draw_figures(runs, workers)
    except ConfigError as error:
        raise fail(str(error), EXIT_BAD_INPUT) from None
    typer.echo(f"drew the figures of {len(runs)} runs")


CLAIM_TAGS = {"pass": "pass", "fail": "FAIL", "skipped": "skip"}
"""How ``reproduce`` tags a claim of each status."""


@app.command()
def reproduce(
    scale: Annotated[str, typer.Option(help="quick (30-40 s on 2 cores), default (10 to "
                                            "20 min) or paper (hours).")]
    = "default",
    out: Annotated[str | None, typer.Option(help="Report directory "
                                             "\\[default: runs/reproduce-SCALE].")] = None,
    workers: Annotated[int | None, typer.Option(help="Runs at once \\[default: CPUs].")] = None,
    progress: Annotated[bool, typer.Option(help="Show a progress bar.")] = True,
) -> None:
    """Run the paper's study and write report.html, figures, tables and claims.csv
    (finished runs are reused when re-run)."""
    from metarep.study.reproduce import reproduce as run_study
    from metarep.study.reproduce import skip_notice

    try:
        if (notice := skip_notice(scale)) is not None:
            typer.echo(f"reproduce: {notice}", err=True)
        terminal = sys.stderr.isatty()
        with reported("reproduce stopped", "finished runs are kept and interrupted ones "
                      "resume: run the same command again"):
            result = run_study(scale, out, workers=workers, progress=progress and terminal,
                               log_runs=progress and not terminal)
    except ConfigError as error:
        raise fail(str(error), EXIT_BAD_INPUT) from None
    tally = {status: sum(claim.status == status for claim in result.claims)
             for status in ("pass", "fail", "skipped")}
    for claim in result.claims:
        typer.echo(f"[{CLAIM_TAGS[claim.status]}] {claim.claim}: {claim.value} "
                   f"({claim.criterion})")
    skipped = f", {tally['skipped']} skipped" if tally["skipped"] else ""
    typer.echo(f"claims passed: {tally['pass']}/{tally['pass'] + tally['fail']}{skipped}; "
               f"report: {result.report}")


def main() -> None:
    """Console-script entry point."""
    app()
