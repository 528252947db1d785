"""Seconds per outer step of FO-ANIL and ANIL, three ways, at the paper's scale.

One full-batch step (N = 5000 tasks, d = 50, m_in = 20, m_out = 10, k' = 50, float64) of

- the **linear fast path**: :class:`metarep.core.methods.FOANIL` /
  :class:`~metarep.core.methods.ANIL`
  (closed-form numpy, vectorised over tasks);
- the **torch engine**: :class:`metarep.engine.learner.MetaLearner` on the linear network
  (``torch.func``: ``functional_call``, ``grad``, ``vmap`` over tasks);
- a **plain per-task loop** written the way popular meta-learning libraries do it: per task,
  clone the head, adapt it with ``torch.autograd.grad`` (``create_graph`` for ANIL), take the
  outer loss, ``backward()`` to accumulate the gradients; then one SGD step.

The three are first checked to compute the same step (max abs difference printed), then timed
(median over repeats after a warm-up). The table gives seconds per step and each one's ratio to
the linear fast path. Everything runs on one thread (numpy's BLAS and torch), so that the
ratios compare the implementations rather than how each uses a shared, loaded machine.

    python benchmarks/bench_methods.py            # the paper's scale (the loop takes a while)
    python benchmarks/bench_methods.py --quick    # N = 200: a seconds-long check that it runs
"""

from __future__ import annotations

import os

for _variable in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[_variable] = "1"  # one core: set before numpy and torch are imported

import argparse  # noqa: E402
from collections.abc import Callable  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402
from timing import median_seconds, peak_rss_line  # noqa: E402

from metarep.core.methods import ANIL, FOANIL  # noqa: E402
from metarep.core.model import LinearParams  # noqa: E402
from metarep.core.problem import make_problem  # noqa: E402
from metarep.core.tasks import TaskBatch, sample_tasks  # noqa: E402
from metarep.engine.learner import MetaLearner  # noqa: E402
from metarep.engine.networks import LinearNet  # noqa: E402

D, K, M_IN, M_OUT, WIDTH = 50, 5, 20, 10, 50
ALPHA, BETA = 0.2, 0.05


def per_task_loop_step(B: torch.Tensor, w: torch.Tensor, data: tuple[torch.Tensor, ...],
                       first_order: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """One (FO-)ANIL step as meta-learning libraries write it: a Python loop over tasks."""
    B = B.clone().requires_grad_(True)
    w = w.clone().requires_grad_(True)
    X_in, y_in, X_out, y_out = data
    n = X_in.shape[0]
    for i in range(n):
        head = w.clone()  # "clone the learner"
        inner = 0.5 * torch.mean((X_in[i] @ B @ head - y_in[i]) ** 2)
        (g,) = torch.autograd.grad(inner, head, create_graph=not first_order)
        adapted = head - ALPHA * g
        outer = 0.5 * torch.mean((X_out[i] @ B @ adapted - y_out[i]) ** 2) / n
        outer.backward()
    with torch.no_grad():
        return B - BETA * B.grad, w - BETA * w.grad


def implementations(batch: TaskBatch, params: LinearParams, first_order: bool
                    ) -> dict[str, Callable[[], tuple[np.ndarray, np.ndarray]]]:
    """name -> a function doing one step from ``params`` and returning the new ``(B, w)``."""
    fast = (FOANIL if first_order else ANIL)(ALPHA, BETA, 1)
    learner = MetaLearner(LinearNet(*params), "w", method="anil", first_order=first_order,
                          inner_lr=ALPHA, outer_lr=BETA)
    data = tuple(learner.tensor(a) for a in (batch.X_in, batch.y_in, batch.X_out, batch.y_out))
    B0, w0 = learner.tensor(params.B), learner.tensor(params.w)

    def linear() -> tuple[np.ndarray, np.ndarray]:
        return tuple(fast.step(params, batch)[0])

    def engine() -> tuple[np.ndarray, np.ndarray]:
        state, _ = learner.outer_step(learner.state, *data)
        return state.params["B"].numpy(), state.params["w"].numpy()

    def loop() -> tuple[np.ndarray, np.ndarray]:
        B, w = per_task_loop_step(B0, w0, data, first_order)
        return B.numpy(), w.numpy()

    return {"linear fast path": linear, "torch engine": engine, "per-task loop": loop}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="N = 200 tasks, few repeats")
    args = parser.parse_args()
    torch.set_num_threads(1)
    n = 200 if args.quick else 5000
    repeats = {"linear fast path": 3 if args.quick else 10, "torch engine": 3 if args.quick else 5,
               "per-task loop": 1 if args.quick else 2}
    rng = np.random.default_rng(0)
    problem = make_problem(D, K, 4.0, "linear", rng)
    batch = sample_tasks(problem, n, M_IN, M_OUT, rng)
    params = LinearParams(rng.standard_normal((D, WIDTH)) / np.sqrt(D),
                          0.1 * rng.standard_normal(WIDTH))
    print(f"N = {n}, d = {D}, m_in = {M_IN}, m_out = {M_OUT}, k' = {WIDTH}, float64; "
          f"torch {torch.__version__} with {torch.get_num_threads()} threads")
    print(f"{'method':8} {'implementation':18} {'s / step':>10} {'x fast path':>12} "
          f"{'max |diff|':>11}")
    for name, first_order in (("FO-ANIL", True), ("ANIL", False)):
        runs = implementations(batch, params, first_order)
        reference = runs["linear fast path"]()
        fastest = None
        for label, step in runs.items():
            B, w = step()
            diff = max(np.abs(B - reference[0]).max(), np.abs(w - reference[1]).max())
            seconds = median_seconds(step, repeats[label])
            fastest = seconds if fastest is None else fastest
            print(f"{name:8} {label:18} {seconds:10.4g} {seconds / fastest:12.1f} {diff:11.1e}")


if __name__ == "__main__":
    main()
    print(peak_rss_line())
