"""Command-line interface: a thin layer over :mod:`metarep.experiments`.

Exit codes: 0 success, 2 bad input (one line naming the field), 3 training diverged.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer

from metarep import config as config_module
from metarep.config import ConfigError, load_config
from metarep.training import Diverged

EXIT_BAD_INPUT = 2
EXIT_DIVERGED = 3

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="metarep: meta-learning of shared representations (FO-ANIL and friends).",
)


def fail(message: str, code: int) -> typer.Exit:
    """Print ``error: message`` on stderr and return the exit to raise."""
    typer.echo(f"error: {message}", err=True)
    return typer.Exit(code)


ConfigArg = Annotated[str, typer.Argument(help="YAML path or built-in name: paper, quick.")]
SetOpt = Annotated[
    list[str] | None,
    typer.Option("--set", "-s", help="Override a config key: --set model.width=10 (repeatable)."),
]


@app.command()
def run(
    config: ConfigArg,
    overrides: SetOpt = None,
    out: Annotated[Path | None, typer.Option(help="Output directory [default: runs/NAME].")] = None,
    resume: Annotated[bool, typer.Option(help="Continue from OUT/checkpoint.npz.")] = False,
    progress: Annotated[bool, typer.Option(help="Show a progress bar.")] = True,
) -> None:
    """Train one configuration and write metrics, evaluation, summary, params and figures."""
    from metarep.experiments import run as run_experiment

    try:
        cfg = load_config(config, overrides or [])
        out_dir = out if out is not None else Path("runs") / cfg.name
        result = run_experiment(cfg, out_dir, progress=progress and sys.stderr.isatty(),
                                resume=resume)
    except ConfigError as error:
        raise fail(str(error), EXIT_BAD_INPUT) from None
    except Diverged as error:
        raise fail(f"{error} Results so far are in {out_dir}.", EXIT_DIVERGED) from None
    final = result.summary["final"]
    shown = ", ".join(f"{key} = {final[key]:.4g}" for key in
                      ("train_loss", "perp_norm", "subspace_dist", "lambda_err") if key in final)
    typer.echo(f"done: {result.out_dir} ({shown})")


@app.command()
def show(config: ConfigArg, overrides: SetOpt = None) -> None:
    """Print the resolved configuration as YAML."""
    try:
        typer.echo(config_module.dump_yaml(load_config(config, overrides or [])), nl=False)
    except ConfigError as error:
        raise fail(str(error), EXIT_BAD_INPUT) from None


@app.command()
def keys() -> None:
    """Print every config key with its default and meaning (Markdown)."""
    typer.echo(config_module.key_table())


def main() -> None:
    """Console-script entry point."""
    app()
