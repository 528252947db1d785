"""Benchmark of the exact infinite-task steps of every inner-loop method, against d, on one core.

For each method and number of inner steps whose exact expectation is built
(:data:`metarep.core.expected_steps.MAX_INNER_STEPS`) it prints:

- the one-off cost of building the expectation (symbolic inner loop and Isserlis matchings,
  once per process) and its size (monomials, distinct words);
- the expected steps per second at the paper's k = 5, k' = 50 (alpha = 0.1, beta = 0.05,
  m_in = 20, sigma^2 = 4, a stable trajectory for every method) for d = 50, 1,000 and 100,000,
  and the ratio of the largest d to the smallest (target: 1, the cost is independent of d);
- for one-step FO-ANIL, the closed form (:class:`metarep.core.infinite.ExactFOANIL`) next to
  the engine computing the same expectation.

Then the peak resident memory of the process.

    python benchmarks/bench_exact_methods.py [--quick]
"""

from __future__ import annotations

import os

for _variable in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[_variable] = "1"  # one core: set before numpy is imported

import argparse  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402
from timing import peak_rss_line  # noqa: E402

from metarep.core.expected_steps import (  # noqa: E402
    MAX_INNER_STEPS,
    program_size,
    step_expectations,
)
from metarep.core.infinite import (  # noqa: E402
    ExactFOANIL,
    ExactInnerLoop,
    InfiniteTaskState,
    coordinates,
    exact_dynamics,
)
from metarep.core.model import init_linear  # noqa: E402
from metarep.core.problem import make_problem  # noqa: E402

WIDTH, K = 50, 5
DIMENSIONS = (50, 1_000, 100_000)


def state_at(d: int) -> tuple[np.ndarray, InfiniteTaskState]:
    """The paper's problem at dimension d and the coordinates of one initialisation."""
    problem = make_problem(d, K, 4.0, "linear", np.random.default_rng(0))
    B0 = init_linear(d, WIDTH, 1.0, np.random.default_rng(1)).B
    _, state = coordinates(problem.B_star, B0, keep_basis=False)
    return problem.Sigma_star, state


def steps_per_second(dynamics: ExactFOANIL | ExactInnerLoop, state: InfiniteTaskState,
                     seconds: float) -> float:
    """Median over 3 timed blocks of ``seconds / 3`` each (after one warm-up step); the
    trajectory must stay finite (the step sizes are small enough for every method)."""
    dynamics.step(state)
    rates = []
    for _ in range(3):
        current, count, start = state, 0, time.perf_counter()
        while time.perf_counter() - start < seconds / 3:
            current, _ = dynamics.step(current)
            count += 1
        rates.append(count / (time.perf_counter() - start))
        if not current.is_finite():
            raise SystemExit(f"{dynamics}: the timed trajectory diverged; lower the step sizes")
    return float(np.median(rates))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="short timings (a smoke check)")
    seconds = 0.3 if parser.parse_args().quick else 3.0
    states = {d: state_at(d) for d in DIMENSIONS}
    cases = [(name, steps) for name, most in MAX_INNER_STEPS.items()
             for steps in range(1, most + 1)]
    header = " ".join(f"{'d = ' + format(d, ','):>12}" for d in DIMENSIONS)
    print(f"exact expected steps per second, k = {K}, k' = {WIDTH}, one core")
    print(f"{'method':<18} {'build s':>8} {'monomials':>9} {'words':>6} {header} "
          f"{'ratio':>6}")
    for name, steps in cases:
        start = time.perf_counter()
        step_expectations(name, steps)
        build = time.perf_counter() - start
        size = program_size(name, steps)
        rates = []
        for d in DIMENSIONS:
            Sigma, state = states[d]
            dynamics = ExactInnerLoop(name, steps, d, Sigma, 0.1, 0.05, 20, 4.0,
                                      state.H.shape)
            rates.append(steps_per_second(dynamics, state, seconds))
        cells = " ".join(f"{rate:>12,.0f}" for rate in rates)
        print(f"{name + ' x' + str(steps):<18} {build:>8.2f} {size['monomials']:>9} "
              f"{size['words']:>6} {cells} {rates[-1] / rates[0]:>6.2f}")
    closed = []
    for d in DIMENSIONS:
        Sigma, state = states[d]
        closed.append(steps_per_second(
            exact_dynamics("fo-anil", 1, d, Sigma, 0.1, 0.05, 20, 4.0, state.H.shape), state,
            seconds))
    cells = " ".join(f"{rate:>12,.0f}" for rate in closed)
    print(f"{'fo-anil x1 closed':<18} {'':>8} {'':>9} {'':>6} {cells} "
          f"{closed[-1] / closed[0]:>6.2f}")
    print(f"{peak_rss_line()} (the d = 100,000 initialisation, "
          f"{100_000 * WIDTH * 8 / 2**20:.0f} MiB, is the largest array)")


if __name__ == "__main__":
    main()
