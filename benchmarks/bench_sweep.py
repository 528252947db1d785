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

    python benchmarks/bench_sweep.py            # 32 runs
    python benchmarks/bench_sweep.py --quick    # 4 short runs: a check that it runs
"""

from __future__ import annotations

import argparse
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import pandas as pd
import yaml

from metarep.sweeps import collect_table, run_sweep

WORKERS = 2
TARGET_SPEEDUP = 1.7


def write_sweep(folder: Path, runs: int, steps: int | None) -> Path:
    """A sweep of ``runs`` seeds of ``quick`` (``steps`` outer steps if given)."""
    sweep = {"base": "quick", "seeds": list(range(runs))}
    if steps is not None:
        sweep["set"] = {"train.steps": steps}
    path = folder / "bench_sweep.yaml"
    path.write_text(yaml.safe_dump(sweep))
    return path


def timed(run: Callable[[], object]) -> float:
    start = time.perf_counter()
    run()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="4 short runs (a smoke check)")
    parser.add_argument("--no-ray", action="store_true", help="skip the Ray executor")
    args = parser.parse_args()
    runs, steps = (4, 50) if args.quick else (32, None)
    with tempfile.TemporaryDirectory(prefix="bench-sweep-") as scratch:
        folder = Path(scratch)
        sweep = write_sweep(folder, runs, steps)
        options = {"progress": False}
        seconds = {
            "sequential": timed(lambda: run_sweep(sweep, folder / "sequential", workers=1,
                                                  **options)),
            "local": timed(lambda: run_sweep(sweep, folder / "local", workers=WORKERS,
                                             **options)),
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
                    seconds["ray"] = timed(lambda: run_sweep(
                        sweep, folder / "ray", executor="ray", workers=WORKERS, **options))
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


if __name__ == "__main__":
    main()
