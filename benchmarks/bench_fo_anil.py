"""Seconds per FO-ANIL step at the paper's scale, next to one read of the task data X.

One outer step of :class:`metarep.core.methods.FOANIL` on the full pool (N = 5000 tasks,
d = 50, m_in = 20, m_out = 10, k' = 50) in float64 and float32, timed in the same process as
the fastest honest single pass over the same bytes (``X_in`` and ``X_out``): a BLAS
matrix-vector product of X with a ones vector, and ``X.sum()``. The faster of the two is
"one read". Every time is the median of several repetitions after warm-up.

Target (issue 2): float64 step within 2x of one read of X, and faster than every peer. The
peers' times were measured on a 2-core machine and are quoted from the issue.

    python benchmarks/bench_fo_anil.py              # the full measurement
    python benchmarks/bench_fo_anil.py --quick      # a seconds-long check that it runs
    python benchmarks/bench_fo_anil.py --threads 1  # BLAS (and so FO-ANIL) on one thread

FO-ANIL runs its chunks of tasks on as many threads as BLAS may use, so ``--threads`` (or
``OPENBLAS_NUM_THREADS``) sets the threads of the step and of the gemv read alike. On a
machine shared with other jobs the times are noisy: OpenBLAS threads that find their core busy
can slow a call down by an order of magnitude.
"""

from __future__ import annotations

import argparse
import contextlib
import os
from collections.abc import Callable

import numpy as np
from threadpoolctl import threadpool_info, threadpool_limits
from timing import median_seconds

from metarep.core.methods import FOANIL
from metarep.core.model import LinearParams, init_linear
from metarep.core.problem import make_problem
from metarep.core.tasks import TaskBatch, sample_tasks

N, D, K, M_IN, M_OUT, WIDTH = 5000, 50, 5, 20, 10, 50
TARGET_RATIO = 2.0
PEERS = {  # seconds per step, from the issue (2-core machine)
    "jit+vmap (fastest peer)": {"float64": 13e-3, "float32": 6e-3},
    "per-task loop (meta-learning library style)": {"float64": 4.0, "float32": None},
}


def read_passes(batch: TaskBatch) -> dict[str, Callable[[], object]]:
    """Single passes over the bytes of ``X_in`` and ``X_out``."""
    X_in = batch.X_in.reshape(-1, batch.d)
    X_out = batch.X_out.reshape(-1, batch.d)
    ones = np.ones(batch.d, dtype=X_in.dtype)
    return {
        "gemv": lambda: (X_in @ ones, X_out @ ones),
        "sum": lambda: (X_in.sum(), X_out.sum()),
    }


def blas_threads() -> str:
    return ", ".join(f"{lib['internal_api']} {lib['num_threads']}" for lib in threadpool_info()
                     if lib["user_api"] == "blas") or "none found"


def measure(dtype: str, n: int, repeats: int, warmup: int) -> dict[str, float]:
    rng = np.random.default_rng(0)
    problem = make_problem(D, K, 4.0, "linear", rng)
    batch = sample_tasks(problem, n, M_IN, M_OUT, rng, dtype)
    B = init_linear(D, WIDTH, 1.0, rng, dtype).B
    params = LinearParams(B, (0.1 * rng.standard_normal(WIDTH)).astype(dtype))
    method = FOANIL(inner_lr=0.2, outer_lr=0.05)
    reads = {name: median_seconds(run, repeats, warmup)
             for name, run in read_passes(batch).items()}
    step = median_seconds(lambda: method.step(params, batch), repeats, warmup)
    one_read = min(reads.values())
    nbytes = batch.X_in.nbytes + batch.X_out.nbytes
    return {"bytes": nbytes, "gemv": reads["gemv"], "sum": reads["sum"], "read": one_read,
            "bandwidth": nbytes / one_read, "step": step, "ratio": step / one_read}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="few repetitions (a smoke test)")
    parser.add_argument("--repeats", type=int, default=None, help="timed repetitions [50]")
    parser.add_argument("--tasks", type=int, default=N, help=f"tasks N [{N}]")
    parser.add_argument("--threads", type=int, default=None,
                        help="limit BLAS (and so the FO-ANIL step) to this many threads")
    args = parser.parse_args()
    repeats = args.repeats or (3 if args.quick else 50)
    warmup = 1 if args.quick else 5
    limit = (threadpool_limits(limits=args.threads, user_api="blas") if args.threads
             else contextlib.nullcontext())
    with limit:
        report(args.tasks, repeats, warmup)


def report(n: int, repeats: int, warmup: int) -> None:
    print(f"FO-ANIL step: N = {n}, d = {D}, m_in = {M_IN}, m_out = {M_OUT}, "
          f"k' = {WIDTH}; median of {repeats} after {warmup} warm-up")
    print(f"numpy {np.__version__}; {os.cpu_count()} CPUs; BLAS threads: {blas_threads()}")
    header = (f"{'dtype':8} {'X MB':>7} {'gemv ms':>8} {'sum ms':>8} {'read ms':>8} "
              f"{'GB/s':>6} {'step ms':>8} {'step/read':>9} {'target':>7}")
    print(header)
    print("-" * len(header))
    results = {}
    for dtype in ("float64", "float32"):
        r = results[dtype] = measure(dtype, n, repeats, warmup)
        target = f"<= {TARGET_RATIO:g}" if dtype == "float64" else "-"
        print(f"{dtype:8} {r['bytes'] / 1e6:7.1f} {r['gemv'] * 1e3:8.2f} {r['sum'] * 1e3:8.2f} "
              f"{r['read'] * 1e3:8.2f} {r['bandwidth'] / 1e9:6.1f} {r['step'] * 1e3:8.2f} "
              f"{r['ratio']:9.2f} {target:>7}")
    print("\npeers (per step, quoted from the issue: measured on a 2-core machine):")
    for peer, times in PEERS.items():
        for dtype, seconds in times.items():
            if seconds is not None:
                ours = results[dtype]["step"]
                print(f"  {peer:45} {dtype}: {seconds * 1e3:8.1f} ms; ours {ours * 1e3:6.2f} ms; "
                      f"peer / ours = {seconds / ours:,.1f}")
    ratio = results["float64"]["ratio"]
    verdict = "meets" if ratio <= TARGET_RATIO else "misses"
    print(f"\nfloat64 step / one read of X = {ratio:.2f} ({verdict} the {TARGET_RATIO:g}x target)")


if __name__ == "__main__":
    main()
