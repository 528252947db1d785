"""Seconds per FO-ANIL step at the paper's scale, next to one read of the task data X and to
independent implementations of the same step.

One outer step of :class:`metarep.core.methods.FOANIL` on the full pool (N = 5000 tasks,
d = 50, m_in = 20, m_out = 10, k' = 50) in float64 and float32, timed in the same process as

- the fastest honest single pass over the same bytes (``X_in`` and ``X_out``): a BLAS
  matrix-vector product of X with a ones vector, and ``X.sum()``; the faster is "one read";
- the peers of ``peers.py`` (a numpy closed form, JAX jit+vmap, torch.func vmap, a per-task
  autograd loop), each first checked to give the same ``(B, w)`` as metarep.

Every time is the median of several repetitions after warm-up (the per-task loop, seconds per
step, gets three). Targets (issue 11): the step within 2x of one read and at least 1.5x faster
than the fastest peer, in both precisions.

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
from peers import Peer, available_peers
from threadpoolctl import threadpool_info, threadpool_limits
from timing import median_seconds, peak_rss_line

from metarep.core.methods import FOANIL
from metarep.core.model import LinearParams, init_linear
from metarep.core.problem import make_problem
from metarep.core.tasks import TaskBatch, sample_tasks

N, D, K, M_IN, M_OUT, WIDTH = 5000, 50, 5, 20, 10, 50
ALPHA, BETA = 0.2, 0.05
TARGET_READ_RATIO, TARGET_PEER_SPEEDUP = 2.0, 1.5
TOLERANCE = {"float64": 1e-10, "float32": 1e-4}  # relative agreement of a peer with metarep


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


def measure(dtype: str, n: int, repeats: int, warmup: int) -> dict[str, object]:
    """The bytes of X, one read, metarep's step and each peer's step (seconds)."""
    rng = np.random.default_rng(0)
    problem = make_problem(D, K, 4.0, "linear", rng)
    batch = sample_tasks(problem, n, M_IN, M_OUT, rng, dtype)
    B = init_linear(D, WIDTH, 1.0, rng, dtype).B
    params = LinearParams(B, (0.1 * rng.standard_normal(WIDTH)).astype(dtype))
    method = FOANIL(inner_lr=ALPHA, outer_lr=BETA)
    reads = {name: median_seconds(run, repeats, warmup)
             for name, run in read_passes(batch).items()}
    step = median_seconds(lambda: method.step(params, batch), repeats, warmup)
    ours, _ = method.step(params, batch)
    arrays = (params.B, params.w, batch.X_in, batch.y_in, batch.X_out, batch.y_out)
    peers, missing = available_peers(ALPHA, BETA, dtype)
    peer_times = {peer.name: time_peer(peer, arrays, ours, dtype, repeats, warmup)
                  for peer in peers}
    return {"bytes": batch.X_in.nbytes + batch.X_out.nbytes, "reads": reads,
            "read": min(reads.values()), "step": step, "peers": peer_times, "missing": missing}


def time_peer(peer: Peer, arrays: tuple[np.ndarray, ...], ours: LinearParams, dtype: str,
              repeats: int, warmup: int) -> float:
    """Seconds per step of ``peer`` (inputs already in its library), after checking that its
    ``(B, w)`` agrees with metarep's to ``TOLERANCE``."""
    prepared = peer.prepare(arrays)
    B, w = peer.result(peer.step(prepared))
    for name, theirs, mine in (("B", B, ours.B), ("w", w, ours.w)):
        error = np.max(np.abs(theirs - mine)) / np.max(np.abs(mine))
        if not error <= TOLERANCE[dtype]:
            raise AssertionError(f"{peer.name} disagrees with metarep on {name} in {dtype}: "
                                 f"relative error {error:.1e}")
    return median_seconds(lambda: peer.result(peer.step(prepared)),
                          min(repeats, 3) if peer.slow else repeats,
                          0 if peer.slow else warmup)


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
    verdicts = []
    for dtype in ("float64", "float32"):
        r = measure(dtype, n, repeats, warmup)
        read, step = r["read"], r["step"]
        print(f"\n{dtype}: X = {r['bytes'] / 1e6:.1f} MB; one read {read * 1e3:.2f} ms "
              f"(gemv {r['reads']['gemv'] * 1e3:.2f}, sum {r['reads']['sum'] * 1e3:.2f}; "
              f"{r['bytes'] / read / 1e9:.1f} GB/s)")
        print(f"  {'implementation':32} {'ms/step':>9} {'/ read':>7} {'/ metarep':>9}")
        rows = {"metarep FOANIL.step": step, **r["peers"]}
        for name, seconds in rows.items():
            print(f"  {name:32} {seconds * 1e3:9.2f} {seconds / read:7.2f} "
                  f"{seconds / step:9.2f}")
        for line in r["missing"]:
            print(f"  (left out: {line})")
        fastest = min(r["peers"], key=r["peers"].get)
        speedup = r["peers"][fastest] / step
        verdicts.append(
            f"{dtype}: step / one read = {step / read:.2f} (target <= {TARGET_READ_RATIO:g}: "
            f"{'met' if step / read <= TARGET_READ_RATIO else 'missed'}); fastest peer "
            f"({fastest}) / metarep = {speedup:.2f} (target >= {TARGET_PEER_SPEEDUP:g}: "
            f"{'met' if speedup >= TARGET_PEER_SPEEDUP else 'missed'})")
    print("\n" + "\n".join(verdicts))


if __name__ == "__main__":
    main()
    print(peak_rss_line())
