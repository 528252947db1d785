"""Benchmark: a whole infinite-task run (train, evaluate, theory, figures, files) at d = 50 and
at d = 100,000, in this process, with the same config otherwise (the paper's: k' = 50, k = 5,
5000 exact steps, 2000 test tasks at each of 6 m_test).

The dynamics and the evaluation work in coordinates whose size does not depend on d (the
d-dimensional baselines are sampled from Wishart spectra, :func:`metarep.core.evaluation.
ridge_risks`); what remains d-sized is drawing B_0, building the frame, mapping the result
back to (B, w) and writing it. Prints the median wall time of each and their ratio
(target: at most 2).

    python benchmarks/bench_run_vs_d.py [--quick]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from timing import median_seconds, peak_rss_line

from metarep.run.experiment import run_experiment
from metarep.run.schema import load_config

DIMENSIONS = (50, 100_000)
RATIO_TARGET = 2.0


def one_run(d: int, steps: int, folder: Path) -> None:
    """``metarep run paper --set tasks.n=infinite --set problem.d=D`` into ``folder``."""
    config = load_config("paper", {"tasks.n": "infinite", "problem.d": d, "train.steps": steps})
    run_experiment(config, folder / f"d{d}", progress=False, overwrite=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="500 steps, one timing each")
    args = parser.parse_args()
    steps, repeats = (500, 1) if args.quick else (5000, 3)
    print(f"infinite-task run end to end ({steps} steps, the paper's config otherwise)"
          f"{' (quick: noisy)' if args.quick else ''}")
    with tempfile.TemporaryDirectory() as scratch:
        seconds = {d: median_seconds(lambda d=d: one_run(d, steps, Path(scratch)), repeats)
                   for d in DIMENSIONS}
    for d, value in seconds.items():
        print(f"d = {d:>7}: {value:8.2f} s")
    ratio = seconds[DIMENSIONS[1]] / seconds[DIMENSIONS[0]]
    print(f"ratio d = {DIMENSIONS[1]:,} / d = {DIMENSIONS[0]}: {ratio:.2f} (target <= "
          f"{RATIO_TARGET:.0f}: {'yes' if ratio <= RATIO_TARGET else 'NO'})")


if __name__ == "__main__":
    main()
    print(peak_rss_line())
