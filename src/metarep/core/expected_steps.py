"""Exact expected outer steps of every inner-loop method on infinitely many tasks: ANIL,
FO-MAML, MAML and FO-ANIL with any number of inner steps, from any ``(B, w)``.

The inner loop of :func:`metarep.core.methods.meta_gradient` is run once on symbolic
polynomials (:class:`metarep.core.moments.Poly`) instead of arrays: with the augmented inner
data ``W`` and head ``t`` of :mod:`metarep.core.moments`, per inner step ``j``

    u_j = P W (B_j w_j + n - t),   w_{j+1} = w_j - alpha B_j^T u_j,
    B_{j+1} = B_j - alpha u_j w_j^T   (FO-MAML, MAML; ANIL and FO-ANIL keep B),

and the outer data, which enter the outer gradient linearly and independently, are replaced
by their means (``S_out -> I``, ``X_out^T eps_out -> 0``): ``v = B_s w_s - t``. The first-order
gradient is ``(v w_s^T, B_s^T v)``; the second-order one runs the reverse-mode recursion of
:func:`~metarep.core.methods.meta_gradient` on the same polynomials. The expected loss is
``(|B_s w_s - t|^2 + sigma^2) / 2``. :func:`metarep.core.moments.expectation` then takes every
expectation exactly, once per (method, number of inner steps) and cached: the result is a
list of monomials (words in ``B``, ``w``, ``Theta``, ...) with coefficients polynomial in
``alpha`` and ``1/m`` (:data:`metarep.core.moments.Expectation`).

:class:`ExactInnerLoop` evaluates them for a batch of configurations in the coordinates of
:mod:`metarep.core.infinite` (``H`` (b, q, p), ``omega`` (b, p)) with the interface of
:class:`~metarep.core.infinite.ExactFOANIL`: a step costs ``O(#words * (q + 1) p^2)``, the
word count depending on the method and inner steps (:func:`program_size`), independent of
``d``, which enters only as a number (the trace of the input projector). Derivations and the
cost of each method: ``docs/infinite_tasks.md``.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache

import numpy as np

from metarep.core.moments import Expectation, Poly, Program, Words, expectation, words
from metarep.errors import ArgumentError

METHOD_FLAGS: dict[str, tuple[bool, bool]] = {
    "fo-anil": (False, False), "anil": (False, True),
    "fo-maml": (True, False), "maml": (True, True),
}
"""``(adapt_body, second_order)`` of each inner-loop method."""

MAX_INNER_STEPS: dict[str, int] = {"fo-anil": 3, "anil": 2, "fo-maml": 1, "maml": 1}
"""The most inner steps whose exact expectation is built (the number of terms, and of
Isserlis matchings per term, grows quickly with the degree ``2 s + 2`` in ``W``; measured in
``benchmarks/bench_exact_methods.py``)."""


@dataclass(frozen=True)
class StepExpectations:
    """The exact expectations of one outer step: ``body`` the gradient with respect to ``B``
    ((q + 1) x p, noise row zero), ``head`` with respect to ``w`` (p x 1), ``loss`` (1 x 1)."""

    body: Expectation
    head: Expectation
    loss: Expectation


def _alpha(poly: Poly) -> Poly:
    return poly.scale(1.0, alpha_power=1)


@cache
def step_expectations(method: str, inner_steps: int) -> StepExpectations:
    """The exact expected gradients and loss of ``method`` with ``inner_steps`` inner steps
    (module docstring), built symbolically once per process."""
    check_exact(method, inner_steps)
    adapt_body, second_order = METHOD_FLAGS[method]
    B, w, n, t = Poly.of("B"), Poly.of("w"), Poly.of("n"), Poly.of("t")
    body, head = B, w
    trace = []
    for _ in range(inner_steps):
        u = Poly.of("P", "W") @ (body @ head + n - t)
        trace.append((body, head, u))
        body, head = (body - _alpha(u @ head.T) if adapt_body else body,
                      head - _alpha(body.T @ u))
    v = body @ head - t
    body_adj, head_adj = v @ head.T, body.T @ v
    if second_order:
        for body_j, head_j, u_j in reversed(trace):
            u_adj = -_alpha(body_j @ head_adj)
            if adapt_body:
                u_adj = u_adj - _alpha(body_adj @ head_j)
            s_u = Poly.of("P", "W", "P") @ u_adj
            new_head_adj = head_adj + body_j.T @ s_u
            if adapt_body:
                new_head_adj = new_head_adj - _alpha(body_adj.T @ u_j)
            body_adj = body_adj - _alpha(u_j @ head_adj.T) + s_u @ head_j.T
            head_adj = new_head_adj
    loss = (v.dot(v) + n.dot(n)).scale(0.5)
    return StepExpectations(expectation(body_adj), expectation(head_adj), expectation(loss))


def check_exact(method: str, inner_steps: int) -> None:
    """Refuse a method or a number of inner steps without an exact expectation here."""
    if method not in METHOD_FLAGS:
        raise ArgumentError("method", f"exact infinite-task steps exist for "
                            f"{', '.join(METHOD_FLAGS)}; got {method!r}")
    if not 1 <= inner_steps <= MAX_INNER_STEPS[method]:
        raise ArgumentError("inner_steps", f"{method}: exact infinite-task steps are built for "
                            f"1 to {MAX_INNER_STEPS[method]} inner steps; got {inner_steps}")


def program_size(method: str, inner_steps: int) -> dict[str, int]:
    """How many monomials and distinct words one expected step evaluates."""
    step = step_expectations(method, inner_steps)
    parts = (step.body, step.head, step.loss)
    return {"monomials": sum(len(part) for part in parts),
            "words": len({word for part in parts for word in words(part)})}


class ExpectedGradients:
    """The exact expected outer gradients and loss of an inner-loop method on infinitely many
    tasks, for ``b`` configurations at once, in the coordinates of :mod:`metarep.core.infinite`
    (numpy).

    **Arguments:** ``method`` (one of :data:`METHOD_FLAGS`) and ``inner_steps`` (1 ..
    :data:`MAX_INNER_STEPS`); ``d`` the input dimension (>= q); ``Sigma_star`` (k, k);
    ``alpha`` (the inner step size), ``m_in`` (``inf`` allowed) and ``noise_var``: (b,)
    arrays; ``shape`` the state's ``(b, q, p)``; ``dtype``. Calling it on ``H`` (b, q, p),
    ``omega`` (b, p) returns ``(G_B (b, q, p), g_w (b, p), loss (b,))``:
    ``B = [B_star, Q_perp] H V^T`` has expected gradient ``[B_star, Q_perp] G_B V^T`` (its
    part outside the inputs' span has mean zero) and ``w = V omega`` has ``V g_w``.
    """

    def __init__(self, method: str, inner_steps: int, d: int, Sigma_star: np.ndarray,
                 alpha: np.ndarray, m_in: np.ndarray, noise_var: np.ndarray,
                 shape: tuple[int, int, int], dtype: np.dtype | str = np.float64):
        b, q, _ = shape
        if d < q:
            raise ArgumentError("d", f"must be >= the coordinates' {q} rows; got {d}")
        self.d, self.dtype = d, np.dtype(dtype)
        parts = step_expectations(method, inner_steps)
        self._body, self._head, self._loss = (
            Program(e, alpha, m_in, self.dtype) for e in (parts.body, parts.head, parts.loss))
        size = q + 1
        k = Sigma_star.shape[0]
        projector = np.eye(size)
        projector[q, q] = 0.0
        theta = np.zeros((size, size))
        theta[:k, :k] = Sigma_star
        noise = np.zeros((b, size, 1))
        noise[:, q, 0] = -np.sqrt(noise_var)
        constant = {"P": projector, "I": np.eye(size), "T": theta}
        self._constants = {name: np.broadcast_to(value.astype(self.dtype), (b, size, size))
                           for name, value in constant.items()}
        self._constants["n"] = noise.astype(self.dtype)
        self._constants["n'"] = np.swapaxes(noise, 1, 2).astype(self.dtype)

    def _words(self, H: np.ndarray, omega: np.ndarray) -> Words:
        b, _, p = H.shape
        B = np.concatenate([H, np.zeros((b, 1, p), dtype=H.dtype)], axis=1)
        w = omega[:, :, None]
        letters = {"B": B, "B'": B.transpose(0, 2, 1), "w": w, "w'": w.transpose(0, 2, 1),
                   **self._constants}
        return Words(letters, self.d)

    def __call__(self, H: np.ndarray, omega: np.ndarray
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        words = self._words(H, omega)
        q = H.shape[1]
        body = self._body(words)[:, :q]
        head = self._head(words)[:, :, 0]
        loss = self._loss(words)[:, 0, 0]
        return body, head, loss.astype(np.float64)
