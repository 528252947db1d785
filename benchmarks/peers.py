"""Independent implementations of one FO-ANIL outer step, written the way their users write
them, for the benchmarks to time next to :class:`metarep.core.methods.FOANIL`.

Every peer takes the same arrays (``B`` (d, k'), ``w`` (k',), ``X_in`` (N, m_in, d), ``y_in``
(N, m_in), ``X_out`` (N, m_out, d), ``y_out`` (N, m_out)) and returns the new ``(B, w)`` of one
step with inner rate ``alpha`` (one inner step) and outer rate ``beta``:

``w_i = w - alpha B^T X_i^in^T (X_i^in B w - y_i^in) / m_in``,
``B <- B - beta mean_i X_i^out^T r_i w_i^T / m_out``, ``w <- w - beta mean_i B^T X_i^out^T r_i
/ m_out`` with ``r_i = X_i^out B w_i - y_i^out`` (the adapted heads held constant).

- ``numpy``: the closed form with the products ordered so that ``X`` only meets vectors;
- ``jax``: per-task losses differentiated by ``jax.grad`` (the adapted head through
  ``stop_gradient``), ``vmap`` over tasks, the whole step under ``jit``, the product regrouped
  as ``X (B w)``;
- ``torch.func``: the same with ``torch.func.grad`` and ``torch.func.vmap``;
- ``per-task loop``: a Python loop over tasks with ``torch.autograd.grad``, as meta-learning
  libraries (learn2learn, higher) run a meta-batch.

The JAX and torch peers need the ``bench`` extra (``pip install -e ".[bench]"``); a peer whose
library is missing is left out (:func:`available_peers` says why).
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

Arrays = tuple[np.ndarray, ...]


@dataclass(frozen=True)
class Peer:
    """A peer: ``prepare(arrays)`` moves the inputs into its library once (outside the timing);
    ``step(prepared)`` runs one outer step there; ``result(output)`` brings ``(B, w)`` back as
    numpy arrays (after waiting for the computation). ``slow``: seconds per step, so timed
    with few repetitions."""

    name: str
    prepare: Callable[[Arrays], object]
    step: Callable[[object], object]
    result: Callable[[object], tuple[np.ndarray, np.ndarray]]
    slow: bool = False


def numpy_step(B, w, X_in, y_in, X_out, y_out, alpha: float, beta: float):
    """The closed form in numpy, ``X`` meeting vectors only."""
    r_in = X_in @ (B @ w) - y_in
    heads = w - (alpha / X_in.shape[1]) * np.einsum("nmd,nm->nd", X_in, r_in) @ B
    r_out = np.einsum("nmd,nd->nm", X_out, heads @ B.T) - y_out
    v = np.einsum("nmd,nm->nd", X_out, r_out) / X_out.shape[1]
    n = X_in.shape[0]
    return B - beta * (v.T @ heads) / n, w - beta * B.T @ v.mean(axis=0)


def _numpy_peer(alpha: float, beta: float) -> Peer:
    return Peer("numpy closed form", lambda arrays: arrays,
                lambda arrays: numpy_step(*arrays, alpha, beta), lambda out: out)


def _jax_peer(alpha: float, beta: float, dtype: str) -> Peer:
    import jax
    import jax.numpy as jnp

    jax.config.update("jax_enable_x64", True)

    def task_loss(B, w, X, y):
        return 0.5 * jnp.mean((X @ (B @ w) - y) ** 2)

    def task_gradients(B, w, X_in, y_in, X_out, y_out):
        head = jax.lax.stop_gradient(w - alpha * jax.grad(task_loss, 1)(B, w, X_in, y_in))
        return jax.grad(task_loss, (0, 1))(B, head, X_out, y_out)

    @jax.jit
    def step(B, w, X_in, y_in, X_out, y_out):
        grads = jax.vmap(task_gradients, (None, None, 0, 0, 0, 0))(B, w, X_in, y_in, X_out,
                                                                     y_out)
        grad_B, grad_w = (g.mean(axis=0) for g in grads)
        return B - beta * grad_B, w - beta * grad_w

    def prepare(arrays: Arrays):
        return tuple(jax.device_put(jnp.asarray(a, dtype=dtype)) for a in arrays)

    def result(out):
        return tuple(np.asarray(jax.block_until_ready(a)) for a in out)

    return Peer("jax jit+vmap", prepare, lambda arrays: step(*arrays), result)


def _torch_func_peer(alpha: float, beta: float) -> Peer:
    import torch
    from torch.func import grad, vmap

    def task_loss(B, w, X, y):
        return 0.5 * torch.mean((X @ (B @ w) - y) ** 2)

    def task_gradients(B, w, X_in, y_in, X_out, y_out):
        head = (w - alpha * grad(task_loss, 1)(B, w, X_in, y_in)).detach()
        return grad(task_loss, (0, 1))(B, head, X_out, y_out)

    batched = vmap(task_gradients, (None, None, 0, 0, 0, 0))

    def step(arrays):
        B, w = arrays[:2]
        grad_B, grad_w = (g.mean(dim=0) for g in batched(*arrays))
        return B - beta * grad_B, w - beta * grad_w

    return Peer("torch.func vmap", lambda arrays: tuple(torch.from_numpy(a) for a in arrays),
                step, lambda out: tuple(t.numpy() for t in out))


def _per_task_loop_peer(alpha: float, beta: float) -> Peer:
    import torch

    def step(arrays):
        B0, w0, X_in, y_in, X_out, y_out = arrays
        B, w = B0.clone().requires_grad_(), w0.clone().requires_grad_()
        grad_B, grad_w = torch.zeros_like(B0), torch.zeros_like(w0)
        for i in range(X_in.shape[0]):
            inner = 0.5 * torch.mean((X_in[i] @ (B @ w) - y_in[i]) ** 2)
            (g,) = torch.autograd.grad(inner, w)
            head = (w - alpha * g).detach().requires_grad_()
            outer = 0.5 * torch.mean((X_out[i] @ (B @ head) - y_out[i]) ** 2)
            gB, gw = torch.autograd.grad(outer, (B, head))
            grad_B += gB
            grad_w += gw
        n = X_in.shape[0]
        return B0 - beta * grad_B / n, w0 - beta * grad_w / n

    return Peer("per-task loop (torch autograd)",
                lambda arrays: tuple(torch.from_numpy(a) for a in arrays), step,
                lambda out: tuple(t.numpy() for t in out), slow=True)


def available_peers(alpha: float, beta: float, dtype: str) -> tuple[list[Peer], list[str]]:
    """The peers whose libraries are installed, and a line for each one left out."""
    peers, missing = [_numpy_peer(alpha, beta)], []
    if importlib.util.find_spec("jax"):
        peers.append(_jax_peer(alpha, beta, dtype))
    else:
        missing.append('jax jit+vmap: jax is not installed (pip install -e ".[bench]")')
    if importlib.util.find_spec("torch"):
        peers += [_torch_func_peer(alpha, beta), _per_task_loop_peer(alpha, beta)]
    else:
        missing.append('torch.func and per-task loop: torch is not installed '
                       '(pip install -e ".[bench]")')
    return peers, missing
