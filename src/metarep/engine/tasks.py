"""Fresh regression tasks drawn by torch's CPU generator (``tasks.sampler: torch``).

The same distribution as :func:`metarep.core.tasks.sample_tasks` (specification §1): heads
``w_star_i ~ N(0, Sigma_star)``, inputs ``x ~ N(0, I_d)``, labels ``y = x^T B_star w_star_i +
eps`` with ``eps ~ N(0, sigma^2)``, but another stream. The inputs and the noise are drawn
directly in the run's dtype by torch's vectorised normal sampler: in float32 this takes about
0.35-0.4 of numpy's float64 draw and cast (measured on a 2-core host: 0.87 ms against 2.5 ms
for 500 tasks of 15 rows in d = 20; 8.4 ms against about 20 ms for 2500 tasks in d = 40). In
float64 torch's sampler is slower than numpy's, so ``numpy`` stays the better choice there.
"""

from __future__ import annotations

import numpy as np
import torch

from metarep.core.problem import Problem
from metarep.core.tasks import TaskBatch
from metarep.engine.arrays import TorchNamespace


def seeded_generator(seed: np.random.SeedSequence) -> torch.Generator:
    """A CPU ``torch.Generator`` seeded with 64 bits of ``seed``'s state (so distinct seed
    sequences, e.g. the sub-streams of the steps of a run, give distinct streams)."""
    return torch.Generator().manual_seed(int(seed.generate_state(1, np.uint64)[0]))


def sample_tasks_torch(
    problem: Problem,
    n: int,
    m_in: int,
    m_out: int,
    seed: np.random.SeedSequence,
    dtype: np.dtype | str = np.float32,
) -> TaskBatch:
    """Draw ``n`` fresh tasks with ``m_in`` inner and ``m_out`` outer rows from a generator on
    ``seed`` (:func:`seeded_generator`), as numpy arrays.

    Drawn in this order: the heads ``w_star`` (n, k) in float64 (times the Cholesky factor of
    ``Sigma_star``), the inner inputs ``X_in`` (n, m_in, d), the outer inputs ``X_out``
    (n, m_out, d), then the noise (n, m_in + m_out), all but the heads in ``dtype``; the labels
    ``y = X B_star w_star + eps`` are computed in ``dtype``. Heads stay float64, as in
    :func:`~metarep.core.tasks.sample_tasks`.
    """
    generator = seeded_generator(seed)
    as_torch = TorchNamespace.dtype(dtype)
    factor = torch.from_numpy(np.linalg.cholesky(problem.Sigma_star))
    heads = torch.randn((n, problem.k), generator=generator, dtype=torch.float64) @ factor.T
    X_in = torch.randn((n, m_in, problem.d), generator=generator, dtype=as_torch)
    X_out = torch.randn((n, m_out, problem.d), generator=generator, dtype=as_torch)
    noise = torch.randn((n, m_in + m_out), generator=generator, dtype=as_torch)
    noise *= float(np.sqrt(problem.noise_var))
    signal = (heads @ torch.from_numpy(problem.B_star).T).to(as_torch)[:, :, None]  # (n, d, 1)
    y_in = torch.bmm(X_in, signal)[:, :, 0] + noise[:, :m_in]
    y_out = torch.bmm(X_out, signal)[:, :, 0] + noise[:, m_in:]
    return TaskBatch(X_in.numpy(), y_in.numpy(), X_out.numpy(), y_out.numpy(), heads.numpy())
