"""Throughput of a sweep of ``quick`` runs: sequential, a local pool of 2 workers, and Ray.

The sweep is the built-in ``quick`` config over 32 seeds (32 runs). It is run three times into
fresh directories, each timed end to end (as ``metarep sweep`` would, pool start-up included):

- **sequential**: ``--workers 1``, the runs one after another in this process;
- **local**: ``--workers 2``, a process pool of two workers;
- **ray**: ``--executor ray`` on a local Ray instance with 2 CPUs (skipped when Ray is not
  installed). Starting Ray is timed separately; the run time then gives Ray's overhead per
  run, ``(workers * T_ray - T_sequential) / runs``: the extra busy time a run costs a worker
  (shipping the task and the run's files, worker start-up), next to the local pool's
  ``(workers * T_local - T_sequential) / runs``.

Every run is limited to one BLAS thread, so 2 workers use 2 cores. Target (issue 6): local
with 2 workers at least 1.7x faster than sequential on 2 cores. The three collected tables are
checked to be equal (same seeds, same numbers on every executor).

Then a sweep of 64 ``tasks.n: infinite`` runs (``quick`` with d = 20, k = 3, k' = 10, 2,000 steps
each; inner_lr x outer_lr x m_in x 4 model seeds) on the local pool: **batched** (the default:
the runs that differ only in step sizes, m_in, noise and seeds are stepped together, one batch
per worker, and evaluated together: one draw of the test tasks and one set of reference rows
per sigma^2 and eval seed) against **one by one** (``SweepOptions(batch_infinite=False)``,
``metarep sweep --no-batch``). Both write the same files (a sweep's runs draw no figures by
default); the tables are checked to be equal, and the ratio is printed against the target
(issue 11: >= 5x). A separate line adds the figures: the batched sweep followed by drawing all
64 runs' figures on request (``metarep figures --workers 2``), against the runs
one by one each drawing its own (``SweepOptions(batch_infinite=False, figures=True)``, as
sweeps did before), so the same files, figures included, are compared too. Another line
runs the same 64 runs as 64 ``metarep run --no-figures`` commands, two at a time (as one would
without sweeps), their files checked against the sweep's.

    python benchmarks/bench_sweep.py            # 32 runs, then 64 infinite-task runs
    python benchmarks/bench_sweep.py --quick    # short runs: a check that it runs
"""

from __future__ import annotations

import argparse
import math
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import yaml
from timing import peak_rss_line

from metarep.sweeps.driver import SweepOptions, run_sweep

# The pool's workers import this module (spawn): pandas' testing, the collector and the figures
# (matplotlib, scipy) are imported where they are used, so a worker starts as one of
# ``metarep sweep`` does.

WORKERS = 2
TARGET_SPEEDUP = 1.7
TARGET_BATCHED = 5.0  # issue 11: 64 infinite-task runs batched vs one by one
INFINITE = {"tasks.n": "infinite", "problem.d": 20, "problem.k": 3, "model.width": 10,
            "train.record_every": 100}


def write_sweep(folder: Path, runs: int, steps: int | None) -> Path:
    """A sweep of ``runs`` seeds of ``quick`` (``steps`` outer steps if given)."""
    sweep = {"base": "quick", "seeds": list(range(runs))}
    if steps is not None:
        sweep["set"] = {"train.steps": steps}
    path = folder / "bench_sweep.yaml"
    path.write_text(yaml.safe_dump(sweep))
    return path


def write_infinite_sweep(folder: Path, quick: bool) -> tuple[Path, int]:
    """The infinite-task sweep (64 runs of 2,000 steps; quick: 8 runs of 100 steps) and its
    number of runs."""
    grid = {"method.inner_lr": [0.3, 0.5], "method.outer_lr": [0.1, 0.2],
            "tasks.m_in": [5, math.inf] if quick else [5, 10, 20, math.inf]}
    seeds = [0] if quick else [0, 1, 2, 3]
    sweep = {"base": "quick", "set": {**INFINITE, "train.steps": 100 if quick else 2000},
             "grid": grid, "seeds": seeds, "seed_keys": ["model.seed"]}
    path = folder / "bench_infinite.yaml"
    path.write_text(yaml.safe_dump(sweep))
    return path, math.prod(len(values) for values in grid.values()) * len(seeds)


def bench_infinite(folder: Path, quick: bool) -> None:
    """Time the infinite-task sweep batched and one by one (2 workers each), then with the
    figures (drawn on request after the batched sweep, per run one by one), and print it."""
    import pandas as pd

    from metarep.run.figures import draw_figures
    from metarep.sweeps.collect import collect_table, finished_runs

    sweep, runs = write_infinite_sweep(folder, quick)
    seconds = {
        "one by one": timed(lambda: run_sweep(sweep, folder / "single", SweepOptions(
            workers=WORKERS, progress=False, batch_infinite=False))),
        "batched": timed(lambda: run_sweep(sweep, folder / "batched", SweepOptions(
            workers=WORKERS, progress=False))),
    }
    pd.testing.assert_frame_equal(collect_table(folder / "batched"),
                                  collect_table(folder / "single"), check_exact=False,
                                  rtol=1e-10, atol=0)
    drawing = timed(lambda: draw_figures(finished_runs(folder / "batched"), WORKERS))
    with_figures = timed(lambda: run_sweep(sweep, folder / "single-figures", SweepOptions(
        workers=WORKERS, progress=False, batch_infinite=False, figures=True)))
    commands = timed(lambda: run_commands(sweep, folder / "commands"))
    for run in finished_runs(folder / "single"):
        for table in ("metrics.csv", "eval.csv"):
            pd.testing.assert_frame_equal(pd.read_csv(folder / "commands" / run.name / table),
                                          pd.read_csv(run / table), check_exact=False,
                                          rtol=1e-10, atol=0)
    steps = 100 if quick else 2000
    print(f"\nsweep of {runs} infinite-task runs ({steps} steps each, d = 20, k = 3, k' = 10), "
          f"{WORKERS} workers; the tables are equal")
    print(f"{'runs':<12}{'seconds':>10}{'runs/s':>10}{'speedup':>10}")
    for name, value in seconds.items():
        print(f"{name:<12}{value:>10.2f}{runs / value:>10.2f}"
              f"{seconds['one by one'] / value:>9.2f}x")
    ratio = seconds["one by one"] / seconds["batched"]
    verdict = "met" if ratio >= TARGET_BATCHED else "NOT met"
    print(f"target: batched >= {TARGET_BATCHED:g}x one by one (same files, no per-run figures): "
          f"{ratio:.2f}x, {verdict}")
    print(f"the same runs as {runs} `metarep run --no-figures` commands, {WORKERS} at a time: "
          f"{commands:.2f} s, {commands / seconds['batched']:.1f}x the batched sweep "
          "(each command starts Python and imports metarep)")
    total = seconds["batched"] + drawing
    print(f"with the figures: batched {seconds['batched']:.2f} s + {runs} runs' figures drawn on "
          f"request afterwards {drawing:.2f} s ({WORKERS} processes) = {total:.2f} s, against "
          f"one by one each drawing its own ({WORKERS} workers) {with_figures:.2f} s: "
          f"{with_figures / total:.2f}x")


def run_commands(sweep: Path, out: Path) -> None:
    """Each run of ``sweep`` as its own ``metarep run`` command into ``out/NAME``,
    ``WORKERS`` commands at a time (as a user without sweeps would run them)."""
    from concurrent.futures import ThreadPoolExecutor

    from metarep.sweeps.spec import load_sweep, plan_runs

    spec = load_sweep(sweep)

    def run(plan) -> None:
        sets = [item for key, value in plan.overrides.items()
                for item in ("--set", f"{key}={yaml.safe_dump(value).splitlines()[0]}")]
        subprocess.run([sys.executable, "-m", "metarep", "run", spec.config_name, *sets,
                        "--out", str(out / plan.name), "--no-progress", "--no-figures"],
                       check=True, stdout=subprocess.DEVNULL)

    with ThreadPoolExecutor(WORKERS) as pool:
        list(pool.map(run, plan_runs(spec)))


def timed(run: Callable[[], object]) -> float:
    start = time.perf_counter()
    run()
    return time.perf_counter() - start


def main() -> None:
    import pandas as pd

    from metarep.sweeps.collect import collect_table

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="4 short runs (a smoke check)")
    parser.add_argument("--no-ray", action="store_true", help="skip the Ray executor")
    args = parser.parse_args()
    runs, steps = (4, 50) if args.quick else (32, None)
    with tempfile.TemporaryDirectory(prefix="bench-sweep-") as scratch:
        folder = Path(scratch)
        sweep = write_sweep(folder, runs, steps)
        seconds = {
            "sequential": timed(lambda: run_sweep(sweep, folder / "sequential",
                                                  SweepOptions(workers=1, progress=False))),
            "local": timed(lambda: run_sweep(sweep, folder / "local",
                                             SweepOptions(workers=WORKERS, progress=False))),
        }
        tables = [collect_table(folder / "sequential"), collect_table(folder / "local")]
        ray_start = None
        if not args.no_ray:
            try:
                import ray
            except ImportError:
                print("ray is not installed: pip install 'metarep[ray]'")
            else:
                ray_start = timed(lambda: ray.init(address="local", num_cpus=WORKERS,
                                                   include_dashboard=False,
                                                   log_to_driver=False))
                try:
                    seconds["ray"] = timed(lambda: run_sweep(sweep, folder / "ray", SweepOptions(
                        executor="ray", workers=WORKERS, progress=False)))
                finally:
                    ray.shutdown()
                tables.append(collect_table(folder / "ray"))
    for table in tables[1:]:
        pd.testing.assert_frame_equal(table, tables[0])
    sequential = seconds["sequential"]
    print(f"sweep of {runs} `quick` runs{' (train.steps = 50)' if steps else ''}, "
          f"{WORKERS} workers; the executors' tables are equal")
    print(f"{'executor':<12}{'seconds':>10}{'runs/s':>10}{'speedup':>10}{'overhead/run':>15}")
    for name, value in seconds.items():
        overhead = "" if name == "sequential" else (
            f"{(WORKERS * value - sequential) / runs:.3f} s")
        print(f"{name:<12}{value:>10.2f}{runs / value:>10.2f}{sequential / value:>9.2f}x"
              f"{overhead:>15}")
    if ray_start is not None:
        print(f"Ray start-up (once per sweep, not in the times above): {ray_start:.2f} s")
    verdict = "met" if sequential / seconds["local"] >= TARGET_SPEEDUP else "NOT met"
    print(f"target: local with {WORKERS} workers >= {TARGET_SPEEDUP}x sequential: {verdict}")
    with tempfile.TemporaryDirectory(prefix="bench-sweep-") as scratch:
        bench_infinite(Path(scratch), args.quick)


if __name__ == "__main__":
    main()
    print(peak_rss_line())
