"""Steps per second of FO-ANIL on the whole pool: numpy, torch on the CPU, torch on CUDA.

One outer step of :class:`metarep.core.methods.FOANIL` (one inner step) on the same tasks,
drawn by numpy and moved once to each device, as a ``train.backend: torch`` run does; the
torch step is the numpy formula run on tensors (:mod:`metarep.core.arrays`). Two sizes, both
with m_in = 20, m_out = 10 and k' = 50 (the paper's width, kept at the larger d so that the
cost grows with the data, N m d, alone):

- ``paper``: N = 5000 tasks, d = 50 (the paper's scale; 120 MB of inputs in float64);
- ``large``: N = 10^5 tasks, d = 500 (12 GB of inputs in float64: run it where the host, and
  the GPU, hold twice that).

Every time is the median of several steps after warm-up, CUDA ones synchronised; each row
prints seconds per step, steps per second and the speedup over numpy on the CPU measured in
the same run, and the largest relative difference of one step's ``B`` from numpy's. Without
a CUDA device the CUDA rows say they are not measured.

    python benchmarks/bench_torch_linear.py                 # both sizes, float64
    python benchmarks/bench_torch_linear.py --sizes paper   # the paper's scale only
    python benchmarks/bench_torch_linear.py --dtype float32
    python benchmarks/bench_torch_linear.py --quick         # N / 10 and N / 100: seconds
    python benchmarks/bench_torch_linear.py --torch-threads 1

On a machine shared with other jobs, torch's CPU threads that find their core busy slow a step
down several times over (as OpenBLAS's do): ``--torch-threads 1`` shows the difference.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from threadpoolctl import threadpool_info
from timing import median_seconds, peak_rss_line

from metarep.core.arrays import moved_state, numpy_state
from metarep.core.methods import FOANIL
from metarep.core.model import LinearParams, init_linear
from metarep.core.problem import make_problem
from metarep.core.tasks import TaskBatch, sample_tasks
from metarep.engine.arrays import torch_namespace

K, WIDTH, M_IN, M_OUT = 5, 50, 20, 10
SIZES = {"paper": (5000, 50), "large": (100_000, 500)}
"""(N, d) of each size."""
QUICK_DIVISOR = {"paper": 10, "large": 100}
"""``--quick`` divides N by this."""


def problem_of(n: int, d: int, dtype: str) -> tuple[TaskBatch, LinearParams]:
    """``n`` tasks in ``d`` dimensions and a model of width k' = 50, all drawn by numpy."""
    rng = np.random.default_rng(0)
    problem = make_problem(d, K, 4.0, "linear", rng)
    batch = sample_tasks(problem, n, M_IN, M_OUT, rng, dtype)
    B = init_linear(d, WIDTH, 1.0, rng, dtype).B
    return batch, LinearParams(B, (0.1 * rng.standard_normal(WIDTH)).astype(dtype))


def devices() -> list[str]:
    """numpy, torch on the CPU, and torch on CUDA where there is a device."""
    return ["numpy", "cpu", *(["cuda"] if torch.cuda.is_available() else [])]


def stepper(device: str, batch: TaskBatch, params: LinearParams) -> tuple[Callable[[], Any],
                                                                          Callable[[], Any]]:
    """``(run one step, the step's new (B, w) as numpy)`` on ``device``; the tasks and the
    model are moved there first, once."""
    method = FOANIL(inner_lr=0.2, outer_lr=0.05)
    if device == "numpy":
        return (lambda: method.step(params, batch)), lambda: method.step(params, batch)[0]
    xp = torch_namespace(device)
    on_device, state = batch.on(xp), moved_state(params, xp)

    def run() -> Any:
        result = method.step(state, on_device)  # its loss is a float: the step has ended
        if device == "cuda":
            torch.cuda.synchronize()
        return result

    return run, lambda: numpy_state(method.step(state, on_device)[0])


def measure(size: str, dtype: str, quick: bool) -> None:
    n, d = SIZES[size]
    n //= QUICK_DIVISOR[size] if quick else 1
    repeats, warmup = (3, 1) if quick else (10, 2)
    drawn = time.perf_counter()
    batch, params = problem_of(n, d, dtype)
    nbytes = batch.X_in.nbytes + batch.X_out.nbytes
    print(f"\n{size}: N = {n}, d = {d}, k' = {WIDTH}, m_in = {M_IN}, m_out = {M_OUT}, {dtype}, "
          f"{nbytes / 1e9:.2f} GB of inputs (drawn in {time.perf_counter() - drawn:.1f} s)")
    print(f"{'backend':<14}{'s / step':>12}{'steps / s':>12}{'vs numpy':>10}{'max rel diff':>15}")
    reference, base = None, None
    for device in devices():
        run, result = stepper(device, batch, params)
        seconds = median_seconds(run, repeats, warmup)
        B = result().B
        reference = B if reference is None else reference
        base = seconds if base is None else base
        diff = float(np.max(np.abs(B - reference)) / np.max(np.abs(reference)))
        name = "numpy (CPU)" if device == "numpy" else f"torch {device}"
        print(f"{name:<14}{seconds:>12.3g}{1 / seconds:>12.1f}{base / seconds:>9.2f}x"
              f"{diff:>15.1e}")
        del run, result
        if device == "cuda":
            torch.cuda.empty_cache()
    if not torch.cuda.is_available():
        print(f"{'torch cuda':<14}  not measured: no CUDA device on this machine")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="N / 10 (paper) and N / 100 "
                        "(large), few repetitions: a seconds-long check")
    parser.add_argument("--sizes", nargs="+", choices=list(SIZES), default=list(SIZES))
    parser.add_argument("--dtype", choices=["float64", "float32"], default="float64")
    parser.add_argument("--torch-threads", type=int, default=None,
                        help="torch's CPU threads (default: torch's own, the cores)")
    args = parser.parse_args()
    if args.torch_threads is not None:
        torch.set_num_threads(args.torch_threads)
    blas = ", ".join(f"{lib['internal_api']} {lib['num_threads']}" for lib in threadpool_info()
                     if lib["user_api"] == "blas") or "none found"
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "none"
    print(f"numpy {np.__version__} (BLAS threads: {blas}); torch {torch.__version__} "
          f"({torch.get_num_threads()} CPU threads); CUDA device: {gpu}")
    for size in args.sizes:
        measure(size, args.dtype, args.quick)


if __name__ == "__main__":
    main()
    print(peak_rss_line())
