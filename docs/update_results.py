"""Refresh README's results block from a finished `metarep reproduce` directory.

Usage: python docs/update_results.py runs/reproduce-default ["WALL TIME"]

Copies the six PNG figures to docs/results/ and writes the claims table and the key numbers
between the `<!-- results:start -->` and `<!-- results:end -->` markers of README.md.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pandas as pd

from metarep.study.report import FIGURES

ROOT = Path(__file__).resolve().parents[1]
COLUMNS = ["run", "steps", "seconds", "train_loss", "perp_norm", "subspace_dist", "lambda_err",
           "head_norm", "w1_perp_share"]


def markdown_table(frame: pd.DataFrame) -> str:
    """A GitHub Markdown table; floats with 4 significant digits, NaN left empty."""
    def cell(value: object) -> str:
        if isinstance(value, float):
            return "" if pd.isna(value) else f"{value:.4g}"
        return str(value).replace("|", "\\|")

    lines = ["| " + " | ".join(frame.columns) + " |", "|" + " --- |" * len(frame.columns)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in frame.itertuples(False)]
    return "\n".join(lines)


def results_block(study: Path, wall: str | None) -> str:
    claims = pd.read_csv(study / "claims.csv")
    numbers = pd.read_csv(study / "tables" / "key_numbers.csv")
    numbers = numbers[[c for c in COLUMNS if c in numbers.columns]]
    seconds = numbers["seconds"].sum()
    figures = "\n\n".join(f"![{stem}](docs/results/{stem}.png)" for stem, _ in FIGURES)
    return (
        f"Results of `metarep reproduce` (default scale) on the 2-core development machine: "
        f"{int(claims['passed'].sum())}/{len(claims)} claims passed"
        f"{f'; {wall} of wall time with 2 workers' if wall else ''}; the runs' own times add "
        f"up to {seconds:.0f} s (each run of a batch of infinite-task runs counts the batch's "
        "time).\n\n"
        f"{markdown_table(claims)}\n\n{figures}\n\n"
        f"Final measures of every run:\n\n{markdown_table(numbers)}\n"
    )


def main() -> None:
    study = Path(sys.argv[1])
    target = ROOT / "docs" / "results"
    target.mkdir(parents=True, exist_ok=True)
    for stem, _ in FIGURES:
        shutil.copyfile(study / "figures" / f"{stem}.png", target / f"{stem}.png")
    readme = (ROOT / "README.md").read_text()
    start, end = "<!-- results:start -->\n", "<!-- results:end -->"
    head, rest = readme.split(start)
    tail = rest.split(end)[1]
    wall = sys.argv[2] if len(sys.argv) > 2 else None
    (ROOT / "README.md").write_text(head + start + results_block(study, wall) + end + tail)


if __name__ == "__main__":
    main()
