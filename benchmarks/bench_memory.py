"""Peak resident memory of whole runs against the bytes of their task pool.

Each run is ``metarep run`` in a fresh process, whose peak resident set size comes from the
kernel when it exits (``os.wait4``). A run's memory beyond the interpreter and its libraries
is its peak less that of the same run on a pool of 10 tasks (the baseline, measured in the
same way); the pool's own bytes are ``N (m_in + m_out) (d + 1)`` numbers (inputs and labels).

- **linear pool** (issue 11 item 6): the paper's FO-ANIL run (``paper``: N = 5000, d = 50,
  m = 30, float64), 100 steps and its full evaluation. Target: peak - baseline within 1.5x
  of the pool's bytes.
- **ReLU engine**: a one-hidden-layer MAML run (d = 40, h = 20, k' = 16, m = 5 + 10) on
  N = 20,000 tasks, 3 steps, all tasks at once and with ``train.task_chunk: 1000`` (the
  gradients summed over chunks of 1000 tasks, so that one chunk's autograd graph is held at
  a time): the chunked run's memory beyond the baseline is printed against the unchunked
  one's.

    python benchmarks/bench_memory.py
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

TARGET_RATIO = 1.5
BASELINE_TASKS = 10
LINEAR = ("paper", {"train.steps": 100})
RELU = ("quick", {"model.kind": "relu", "problem.d": 40, "problem.k": 2,
                  "problem.head_cov": "isotropic", "problem.noise_var": 0.25,
                  "tasks.m_in": 5, "tasks.m_out": 10, "model.width": 16,
                  "model.hidden_width": 20, "model.init_scale": 0.5, "method.name": "maml",
                  "method.inner_lr": 0.5, "method.outer_lr": 0.1, "train.steps": 3,
                  "train.record_every": 1, "eval.n_tasks": 200})
RELU_TASKS, RELU_CHUNK = 20_000, 1000


def peak_rss_bytes(base: str, overrides: dict[str, object], out: Path) -> int:
    """Run ``metarep run base --set KEY=VALUE ...`` into ``out`` and return the process's
    peak resident set size in bytes; fails on a non-zero exit."""
    command = [sys.executable, "-m", "metarep", "run", base, "--out", str(out), "--no-progress"]
    for key, value in overrides.items():
        command += ["--set", f"{key}={yaml.safe_dump(value).splitlines()[0]}"]
    with tempfile.TemporaryFile() as stderr:  # a file: a pipe left unread could fill up
        process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=stderr)
        _, status, usage = os.wait4(process.pid, 0)
        if os.waitstatus_to_exitcode(status) != 0:
            stderr.seek(0)
            raise RuntimeError(f"{' '.join(command)} failed: {stderr.read().decode()}")
    return usage.ru_maxrss * 1024


def pool_bytes(n: int, m: int, d: int) -> int:
    return n * m * (d + 1) * 8


def main() -> None:
    mib = 2**20
    with tempfile.TemporaryDirectory(prefix="bench-memory-") as scratch:
        folder = Path(scratch)
        base, overrides = LINEAR
        full = peak_rss_bytes(base, overrides, folder / "linear")
        small = peak_rss_bytes(base, {**overrides, "tasks.n": BASELINE_TASKS,
                                      "method.outer_lr": 0.001}, folder / "linear-small")
        pool = pool_bytes(5000, 30, 50)
        ratio = (full - small) / pool
        print("linear pool (paper, N = 5000, d = 50, m = 30, float64, 100 steps + evaluation):")
        print(f"  peak RSS {full / mib:.0f} MiB; baseline (N = {BASELINE_TASKS}) "
              f"{small / mib:.0f} MiB; pool {pool / mib:.1f} MiB")
        print(f"  peak - baseline = {(full - small) / mib:.1f} MiB = {ratio:.2f}x the pool "
              f"(target <= {TARGET_RATIO:g}: {'met' if ratio <= TARGET_RATIO else 'NOT met'})")

        base, overrides = RELU
        relu = {**overrides, "tasks.n": RELU_TASKS}
        whole = peak_rss_bytes(base, relu, folder / "relu")
        chunked = peak_rss_bytes(base, {**relu, "train.task_chunk": RELU_CHUNK},
                                 folder / "relu-chunked")
        small = peak_rss_bytes(base, {**relu, "tasks.n": BASELINE_TASKS}, folder / "relu-small")
        pool = pool_bytes(RELU_TASKS, 15, 40)
        print(f"\nReLU MAML (1 hidden layer, N = {RELU_TASKS:,}, d = 40, h = 20, m = 15, "
              f"float64, 3 steps): pool {pool / mib:.1f} MiB; baseline "
              f"(N = {BASELINE_TASKS}) {small / mib:.0f} MiB")
        for name, peak in (("all tasks at once", whole),
                           (f"train.task_chunk = {RELU_CHUNK}", chunked)):
            print(f"  {name:<24} peak RSS {peak / mib:6.0f} MiB; beyond the baseline "
                  f"{(peak - small) / mib:6.1f} MiB = {(peak - small) / pool:5.2f}x the pool")
        print(f"  the chunked run holds {(whole - small) / max(chunked - small, 1):.1f}x less "
              "beyond the baseline")


if __name__ == "__main__":
    main()
