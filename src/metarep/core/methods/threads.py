"""The threads of the fast kernels: chunks of tasks on a thread pool, BLAS held to one thread.

numpy releases the GIL in its loops, so chunks of tasks can run in parallel on as many threads
as BLAS may use, while BLAS itself is limited to one thread so the two do not compete.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

import numpy as np
from threadpoolctl import ThreadpoolController


@functools.cache
def _blas() -> ThreadpoolController:
    """numpy's BLAS libraries, found once."""
    return ThreadpoolController().select(user_api="blas")


def _blas_threads() -> int:
    """The threads BLAS may use now: its default (the cores), ``OPENBLAS_NUM_THREADS``, or a
    ``threadpoolctl`` limit such as the one sweeps set around each run (the smallest count
    when several BLAS libraries are loaded)."""
    return min((library.num_threads for library in _blas().lib_controllers), default=1)


@functools.cache
def _thread_pool(workers: int) -> ThreadPoolExecutor:
    return ThreadPoolExecutor(workers, thread_name_prefix="metarep")


if hasattr(os, "register_at_fork"):  # Unix: a forked child has none of the pool's threads
    os.register_at_fork(after_in_child=_thread_pool.cache_clear)

Result = TypeVar("Result")


def map_chunks(work: Callable[[slice], Result], chunks: list[slice]) -> list[Result]:
    """``[work(chunk) for chunk in chunks]``, on as many threads as BLAS may use (numpy
    releases the GIL in its loops), with BLAS held to one thread meanwhile so that the two do
    not compete for the cores. Each thread takes one run of consecutive chunks, in order (one
    hand-over per thread, not per chunk: measured 6-8 % faster for the paper-scale FO-ANIL
    step, 15 chunks on 2 threads, faster in 43 of 50 alternated pairs). The caller's
    floating-point error settings (``np.errstate``) hold in the threads too."""
    workers = min(len(chunks), _blas_threads())
    if workers <= 1:
        return [work(chunk) for chunk in chunks]
    errors = np.geterr()
    runs = [chunks[i * len(chunks) // workers:(i + 1) * len(chunks) // workers]
            for i in range(workers)]

    def run(consecutive: list[slice]) -> list[Result]:
        with np.errstate(**errors):
            return [work(chunk) for chunk in consecutive]

    with _blas().limit(limits=1):
        return [result for results in _thread_pool(workers).map(run, runs)
                for result in results]
