"""Benchmark of the exact infinite-task dynamics (metarep.core.infinite), on one core.

Prints a table: expected FO-ANIL steps per second at k' = 50, k = 5 for d = 50 and
d = 100,000 (target: >= 20,000 steps/s, equal for both d), and the throughput of one batch of
64 configurations against the same 64 configurations stepped one by one (target: >= 5x).

    python benchmarks/bench_infinite.py [--quick]
"""

from __future__ import annotations

import os

for _variable in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[_variable] = "1"  # one core: set before numpy is imported

import argparse  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402
from timing import peak_rss_line  # noqa: E402

from metarep.core.infinite import ExactFOANIL, InfiniteTaskState, coordinates  # noqa: E402
from metarep.core.model import init_linear  # noqa: E402
from metarep.core.problem import make_problem  # noqa: E402

WIDTH, K, BATCH = 50, 5, 64
STEPS_TARGET, BATCH_TARGET = 20_000, 5.0


def setup(d: int, b: int) -> tuple[ExactFOANIL, InfiniteTaskState]:
    """The paper's problem (m_in = 20, sigma^2 = 4) at dimension d, b initialisations, with
    per-configuration step sizes spread around the paper's."""
    problem = make_problem(d, K, 4.0, "linear", np.random.default_rng(0))
    B0 = np.stack([init_linear(d, WIDTH, 1.0, np.random.default_rng(seed)).B
                   for seed in range(b)])
    _, state = coordinates(problem.B_star, B0, keep_basis=False)
    alpha = np.linspace(0.5, 1.0, b)
    beta = np.linspace(0.2, 0.5, b)
    return ExactFOANIL(problem.Sigma_star, alpha, beta, 20, 4.0, state.H.shape), state


def steps_per_second(dynamics: ExactFOANIL, state: InfiniteTaskState, steps: int,
                     with_loss: bool, repeats: int) -> float:
    """Best of ``repeats`` timings of ``steps`` consecutive steps (one step = all configs)."""
    best = np.inf
    for _ in range(repeats):
        current = state
        start = time.perf_counter()
        for _ in range(steps):
            current, _ = dynamics.step(current, with_loss=with_loss)
        best = min(best, time.perf_counter() - start)
    return steps / best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a few hundred steps only")
    args = parser.parse_args()
    steps, repeats = (300, 2) if args.quick else (20_000, 5)
    try:
        from threadpoolctl import threadpool_limits
        threadpool_limits(1)
    except ImportError:
        pass
    print(f"exact infinite-task FO-ANIL, k' = {WIDTH}, k = {K}, one core"
          f"{' (quick: noisy)' if args.quick else ''}")
    print(f"{'case':44s} {'value':>14s} {'target':>12s}  ok")
    single = {}
    for d in (50, 100_000):
        dynamics, state = setup(d, 1)
        for with_loss in (True, False):
            rate = steps_per_second(dynamics, state, steps, with_loss, repeats)
            single[d, with_loss] = rate
            label = f"d = {d:>7}, state {state.H.shape[1]}x{state.H.shape[2]}, " + (
                "with loss" if with_loss else "no loss")
            print(f"{label:44s} {rate:>10.0f} st/s {STEPS_TARGET:>8d} st/s  "
                  f"{'yes' if rate >= STEPS_TARGET else 'NO'}")
    ratio = single[100_000, True] / single[50, True]
    print(f"{'steps/s ratio d = 100,000 vs d = 50':44s} {ratio:>14.2f} {'~1':>12s}")

    batch_steps = max(10, steps // 20)
    dynamics, state = setup(50, BATCH)
    batched = BATCH * steps_per_second(dynamics, state, batch_steps, False, repeats)
    singles = [setup(50, 1) for _ in range(BATCH)]
    best = np.inf
    for _ in range(repeats):
        start = time.perf_counter()
        for one, initial in singles:
            current = initial
            for _ in range(batch_steps):
                current, _ = one.step(current, with_loss=False)
        best = min(best, time.perf_counter() - start)
    one_by_one = BATCH * batch_steps / best
    print(f"{f'batch of {BATCH} configs (config-steps/s)':44s} {batched:>14.0f}")
    print(f"{'the same 64 one by one (config-steps/s)':44s} {one_by_one:>14.0f}")
    speedup = batched / one_by_one
    print(f"{'batch speed-up':44s} {speedup:>13.2f}x {BATCH_TARGET:>11.1f}x  "
          f"{'yes' if speedup >= BATCH_TARGET else 'NO'}")


if __name__ == "__main__":
    main()
    print(peak_rss_line())
