"""metarep.core.methods (FO-ANIL and the vectorised losses and gradients): against finite
differences, and against the plain per-task loops of metarep.core.reference written from the
spec (section 3)."""

from __future__ import annotations

import threading

import numpy as np
import pytest
from threadpoolctl import threadpool_limits

from metarep.core import reference
from metarep.core.methods import (
    FOANIL,
    adapt_head,
    body_gradient,
    fo_anil,
    head_gradient,
    loss,
    make_method,
)
from metarep.core.methods import threads as kernel_threads
from metarep.core.methods.fused import residual_gradients
from metarep.core.model import LinearParams
from metarep.core.problem import make_problem
from metarep.core.tasks import TaskBatch, sample_tasks
from metarep.errors import ArgumentError


def make_batch(n=40, m_in=7, m_out=5, d=6, k=2, seed=0) -> TaskBatch:
    rng = np.random.default_rng(seed)
    problem = make_problem(d, k, 0.5, "linear", rng)
    return sample_tasks(problem, n, m_in, m_out, rng)


def make_params(d=6, width=4, seed=1, head=True) -> LinearParams:
    rng = np.random.default_rng(seed)
    B = rng.standard_normal((d, width)) / np.sqrt(d)
    w = rng.standard_normal(width) if head else np.zeros(width)
    return LinearParams(B, w)


# ----------------------------------------------------------------------------- helpers


def central_difference(f, x: np.ndarray, h: float = 1e-4) -> np.ndarray:
    """The gradient of a scalar function ``f`` at ``x`` by central differences (exact up to
    rounding for the quadratic losses here)."""
    grad = np.zeros_like(x)
    for index in np.ndindex(x.shape):
        up, down = x.copy(), x.copy()
        up[index] += h
        down[index] -= h
        grad[index] = (f(up) - f(down)) / (2 * h)
    return grad


# ----------------------------------------------------------------------------- loss, gradients


@pytest.mark.parametrize("per_task", [False, True])
def test_loss_matches_per_task_definition(per_task):
    batch, (B, w) = make_batch(), make_params()
    heads = np.random.default_rng(2).standard_normal((batch.n_tasks, 4)) if per_task else w
    values = loss(B, heads, batch.X_in, batch.y_in)
    expected = [reference.task_loss(B, heads[i] if per_task else w, batch.X_in[i],
                                    batch.y_in[i]) for i in range(batch.n_tasks)]
    np.testing.assert_allclose(values, expected, rtol=1e-13)


def test_head_gradient_matches_finite_differences_shared_head():
    batch, (B, w) = make_batch(), make_params()
    grad = head_gradient(B, w, batch.X_in, batch.y_in)  # (N, k')
    numeric = np.stack([
        central_difference(
            lambda v, i=i: reference.task_loss(B, v, batch.X_in[i], batch.y_in[i]), w)
        for i in range(batch.n_tasks)])
    np.testing.assert_allclose(grad, numeric, rtol=1e-7, atol=1e-9)


def test_head_gradient_matches_finite_differences_per_task_heads():
    """``loss`` is separable over tasks, so perturbing column j of every head at once gives
    the j-th partial derivative of each task's loss."""
    batch, (B, _) = make_batch(), make_params()
    heads = np.random.default_rng(3).standard_normal((batch.n_tasks, 4))
    grad = head_gradient(B, heads, batch.X_out, batch.y_out)
    h = 1e-4
    for j in range(4):
        step = np.zeros(4)
        step[j] = h
        numeric = (loss(B, heads + step, batch.X_out, batch.y_out)
                   - loss(B, heads - step, batch.X_out, batch.y_out)) / (2 * h)
        np.testing.assert_allclose(grad[:, j], numeric, rtol=1e-7, atol=1e-9)


@pytest.mark.parametrize("per_task", [False, True])
def test_body_gradient_matches_finite_differences(per_task):
    batch, (B, w) = make_batch(), make_params()
    heads = np.random.default_rng(4).standard_normal((batch.n_tasks, 4)) if per_task else w
    grad = body_gradient(B, heads, batch.X_in, batch.y_in)
    numeric = central_difference(lambda M: loss(M, heads, batch.X_in, batch.y_in).mean(), B)
    assert grad.shape == B.shape
    np.testing.assert_allclose(grad, numeric, rtol=1e-7, atol=1e-10)


def test_reference_gradients_match_finite_differences_of_the_reference_loss():
    batch, (B, w) = make_batch(n=3), make_params()
    for i in range(batch.n_tasks):
        X, y = batch.X_in[i], batch.y_in[i]
        np.testing.assert_allclose(
            reference.head_gradient(B, w, X, y),
            central_difference(lambda v: reference.task_loss(B, v, X, y), w),  # noqa: B023
            rtol=1e-7, atol=1e-9)
        np.testing.assert_allclose(
            reference.body_gradient(B, w, X, y),
            central_difference(lambda M: reference.task_loss(M, w, X, y), B),  # noqa: B023
            rtol=1e-7, atol=1e-10)


@pytest.mark.parametrize("steps", [1, 2, 5])
def test_adapt_head_equals_repeated_per_task_steps(steps):
    batch, (B, w) = make_batch(), make_params()
    heads = adapt_head(B, w, batch.X_in, batch.y_in, 0.3, steps)
    for i in range(batch.n_tasks):
        w_i = reference.adapt_head(B, w, batch.X_in[i], batch.y_in[i], 0.3, steps)
        np.testing.assert_allclose(heads[i], w_i, rtol=0, atol=1e-13)


# ----------------------------------------------------------------------------- fused passes


@pytest.mark.parametrize("m", [1, 3, 4, 7, 8, 13])
@pytest.mark.parametrize("shared", [False, True], ids=["u per task", "u shared"])
@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_fused_residual_gradients_equal_a_per_task_loop(m, shared, dtype):
    """``X_i^T (X_i u_i - y_i)`` and ``||X_i u_i - y_i||^2`` for every row count around the
    blocks of four rows, against ``np.dot`` task by task."""
    rng = np.random.default_rng(m)
    n, d = 9, 11
    X = rng.standard_normal((n, m, d)).astype(dtype)
    y = rng.standard_normal((n, m)).astype(dtype)
    u = rng.standard_normal(d if shared else (n, d)).astype(dtype)
    gradients, squares = residual_gradients(X, u, y)
    assert gradients.dtype == squares.dtype == np.dtype(dtype)
    tolerance = 1e-12 if dtype == "float64" else 2e-5
    for i in range(n):
        r = X[i].astype(float) @ (u if shared else u[i]).astype(float) - y[i]
        np.testing.assert_allclose(gradients[i], X[i].T.astype(float) @ r, rtol=0,
                                   atol=tolerance * np.abs(X[i]).sum() * np.abs(r).max())
        assert squares[i] == pytest.approx(r @ r, rel=tolerance)


def test_fused_pass_compiles_without_a_writable_cache(monkeypatch):
    """Where numba can cache nowhere (it refuses ``cache=True`` with a RuntimeError), the loop
    is compiled without the disk cache and gives the same numbers."""
    import numba

    from metarep.core.methods import fused

    compile_ = numba.njit

    def no_cache(*args, **options):
        if options.get("cache"):
            raise RuntimeError("cannot cache function: no locator available")
        return compile_(*args, **options)

    rng = np.random.default_rng(0)
    X, u, y = rng.standard_normal((3, 5, 4)), rng.standard_normal(4), rng.standard_normal((3, 5))
    cached = residual_gradients(X, u, y)
    monkeypatch.setattr(numba, "njit", no_cache)
    fused._compiled.cache_clear()
    try:
        for got, want in zip(residual_gradients(X, u, y), cached, strict=True):
            np.testing.assert_array_equal(got, want)
    finally:
        fused._compiled.cache_clear()


def test_fused_residual_gradients_take_strided_inputs_and_keep_nan():
    """A non-contiguous slice gives the numbers of its copy (to rounding: the compiled loop
    vectorises only contiguous rows); a NaN input stays NaN in its task only (no fast-math
    assumption of finite numbers)."""
    rng = np.random.default_rng(0)
    X = rng.standard_normal((6, 5, 8))[::2, :, ::2]
    y = rng.standard_normal((6, 5))[::2]
    u = rng.standard_normal((3, 4))
    for got, want in zip(residual_gradients(X, u, y),
                         residual_gradients(X.copy(), u.copy(), y.copy()), strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-14, atol=1e-14)
    X = X.copy()
    X[1, 2, 3] = np.nan
    gradients, squares = residual_gradients(X, u, y)
    assert np.isnan(gradients[1]).all() and np.isnan(squares[1])
    assert np.isfinite(gradients[[0, 2]]).all() and np.isfinite(squares[[0, 2]]).all()


# ----------------------------------------------------------------------------- FO-ANIL step


@pytest.mark.parametrize("steps", [1, 3])
@pytest.mark.parametrize("head", [False, True], ids=["w=0", "w!=0"])
def test_fo_anil_step_equals_per_task_loop(steps, head):
    batch, params = make_batch(n=57), make_params(head=head)
    new, meta_loss = FOANIL(0.3, 0.5, steps).step(params, batch)
    (B_ref, w_ref), loss_ref = reference.fo_anil_step(params, batch, 0.3, 0.5, steps)
    assert np.abs(new.B).max() > 0.1  # values of order one: 1e-12 is a relative check
    np.testing.assert_allclose(new.B, B_ref, rtol=0, atol=1e-12)
    np.testing.assert_allclose(new.w, w_ref, rtol=0, atol=1e-12)
    assert meta_loss == pytest.approx(loss_ref, rel=1e-12)


@pytest.mark.parametrize("threads", [1, 2, 3])
@pytest.mark.parametrize("tasks_per_chunk", [1, 5, 56, 57, 1000])
def test_fo_anil_step_does_not_depend_on_chunks_and_threads(monkeypatch, tasks_per_chunk,
                                                            threads):
    """57 tasks in chunks of 1, 5 (the last one short), 56, 57 and 1000 tasks, on 1 to 3
    threads."""
    batch, params = make_batch(n=57), make_params()
    per_task = (batch.m_in + batch.m_out) * batch.d * 8
    monkeypatch.setattr(fo_anil, "TASK_CHUNK_BYTES", tasks_per_chunk * per_task)
    monkeypatch.setattr(kernel_threads, "_blas_threads", lambda: threads)
    sizes = [s.stop - s.start if s.stop <= 57 else 57 - s.start
             for s in fo_anil._task_chunks(batch)]
    assert sizes[0] == min(tasks_per_chunk, 57) and sum(sizes) == 57
    new, meta_loss = FOANIL(0.3, 0.5, 2).step(params, batch)
    (B_ref, w_ref), loss_ref = reference.fo_anil_step(params, batch, 0.3, 0.5, 2)
    np.testing.assert_allclose(new.B, B_ref, rtol=0, atol=1e-12)
    np.testing.assert_allclose(new.w, w_ref, rtol=0, atol=1e-12)
    assert meta_loss == pytest.approx(loss_ref, rel=1e-12)


@pytest.mark.parametrize(("d", "width"), [(6, 2), (6, 6), (5, 11)])
def test_fo_anil_step_any_width(d, width):
    batch, params = make_batch(n=23, d=d), make_params(d=d, width=width)
    new, meta_loss = FOANIL(0.2, 0.1, 2).step(params, batch)
    (B_ref, w_ref), loss_ref = reference.fo_anil_step(params, batch, 0.2, 0.1, 2)
    np.testing.assert_allclose(new.B, B_ref, rtol=0, atol=1e-12)
    np.testing.assert_allclose(new.w, w_ref, rtol=0, atol=1e-12)
    assert meta_loss == pytest.approx(loss_ref, rel=1e-12)


def test_fo_anil_step_many_tasks_and_a_single_task():
    for n in (1, 1501):
        batch, params = make_batch(n=n, m_in=3, m_out=2, d=5), make_params(d=5, width=3)
        new, meta_loss = FOANIL(0.4, 0.2, 1).step(params, batch)
        (B_ref, w_ref), loss_ref = reference.fo_anil_step(params, batch, 0.4, 0.2, 1)
        np.testing.assert_allclose(new.B, B_ref, rtol=0, atol=1e-12)
        np.testing.assert_allclose(new.w, w_ref, rtol=0, atol=1e-12)
        assert meta_loss == pytest.approx(loss_ref, rel=1e-12)


def test_fo_anil_update_is_the_first_order_gradient_by_finite_differences():
    """The update is ``-beta`` times the gradient of ``mean_i L(B, w_i; X_i^out, y_i^out)``
    with the adapted heads ``w_i`` held fixed: in ``B`` directly, and in ``w`` as the gradient
    with respect to a common shift of every ``w_i``."""
    batch, params = make_batch(), make_params()
    alpha, beta = 0.3, 0.5
    new, meta_loss = FOANIL(alpha, beta, 2).step(params, batch)
    heads = adapt_head(*params, batch.X_in, batch.y_in, alpha, 2)

    def outer(B, shift):
        return loss(B, heads + shift, batch.X_out, batch.y_out).mean()

    grad_B = central_difference(lambda M: outer(M, 0.0), params.B)
    grad_w = central_difference(lambda v: outer(params.B, v), np.zeros(4))
    np.testing.assert_allclose((params.B - new.B) / beta, grad_B, rtol=1e-7, atol=1e-10)
    np.testing.assert_allclose((params.w - new.w) / beta, grad_w, rtol=1e-7, atol=1e-10)
    assert meta_loss == pytest.approx(outer(params.B, 0.0), rel=1e-13)


def test_fo_anil_step_is_pure():
    batch, params = make_batch(), make_params()
    copies = [a.copy() for a in (params.B, params.w, batch.X_in, batch.y_in, batch.X_out,
                                 batch.y_out)]
    first = FOANIL(0.3, 0.5, 2).step(params, batch)
    second = FOANIL(0.3, 0.5, 2).step(params, batch)
    for before, after in zip(copies, (params.B, params.w, batch.X_in, batch.y_in, batch.X_out,
                                      batch.y_out), strict=True):
        np.testing.assert_array_equal(before, after)
    np.testing.assert_array_equal(first[0].B, second[0].B)
    assert first[1] == second[1]


@pytest.mark.parametrize("steps", [1, 3])
def test_fo_anil_float32_is_close_to_float64_and_stays_float32(steps):
    batch, params = make_batch(n=300), make_params()
    wide, wide_loss = FOANIL(0.3, 0.5, steps).step(params, batch)
    narrow, narrow_loss = FOANIL(0.3, 0.5, steps).step(params.astype(np.float32),
                                                       batch.astype(np.float32))
    assert narrow.B.dtype == np.float32 and narrow.w.dtype == np.float32
    np.testing.assert_allclose(narrow.B, wide.B, rtol=0, atol=2e-5 * np.abs(wide.B).max())
    np.testing.assert_allclose(narrow.w, wide.w, rtol=0, atol=2e-5 * np.abs(wide.w).max())
    assert narrow_loss == pytest.approx(wide_loss, rel=1e-5)


def test_make_method_fo_anil():
    method = make_method("fo-anil", 0.2, 0.1, 3)
    assert isinstance(method, FOANIL)
    assert (method.inner_lr, method.outer_lr, method.inner_steps) == (0.2, 0.1, 3)
    with pytest.raises(ArgumentError) as error:
        make_method("sgd", 0.2, 0.1, 1)
    assert error.value.argument == "name"


def test_the_name_of_a_method_is_a_class_constant():
    """``name`` is a ClassVar: it is no field, so it can be neither passed nor changed."""
    assert FOANIL.name == "fo-anil" and FOANIL(0.1, 0.2).name == "fo-anil"
    with pytest.raises(TypeError):
        FOANIL(0.1, 0.2, 1, "maml")
    with pytest.raises(TypeError):
        FOANIL(0.1, 0.2, name="maml")


@pytest.mark.parametrize(("kwargs", "argument"), [
    ({"inner_lr": 0.0}, "inner_lr"),
    ({"inner_lr": -0.1}, "inner_lr"),
    ({"inner_lr": float("nan")}, "inner_lr"),
    ({"outer_lr": float("inf")}, "outer_lr"),
    ({"outer_lr": True}, "outer_lr"),
    ({"outer_lr": "0.1"}, "outer_lr"),
    ({"inner_steps": 0}, "inner_steps"),
    ({"inner_steps": 1.0}, "inner_steps"),
])
def test_bad_step_sizes_name_the_argument(kwargs, argument):
    with pytest.raises(ArgumentError) as error:
        FOANIL(**{"inner_lr": 0.1, "outer_lr": 0.2, "inner_steps": 1, **kwargs})
    assert error.value.argument == argument


def chunked_threaded(monkeypatch, threads=2):
    """Make FOANIL.step use ``threads`` threads on chunks of 4 tasks."""
    monkeypatch.setattr(fo_anil, "TASK_CHUNK_BYTES", 4 * (7 + 5) * 6 * 8)
    monkeypatch.setattr(kernel_threads, "_blas_threads", lambda: threads)


def test_threaded_step_is_bit_identical_to_serial(monkeypatch):
    batch, params = make_batch(n=101), make_params()
    chunked_threaded(monkeypatch, 1)
    serial = FOANIL(0.3, 0.5, 2).step(params, batch)
    chunked_threaded(monkeypatch, 2)
    threaded = FOANIL(0.3, 0.5, 2).step(params, batch)
    np.testing.assert_array_equal(serial[0].B, threaded[0].B)
    np.testing.assert_array_equal(serial[0].w, threaded[0].w)
    assert serial[1] == threaded[1]


def test_threads_keep_the_callers_floating_point_settings(monkeypatch):
    """Overflow in float32 inside the worker threads follows the caller's ``np.errstate``: a
    warning (an error under pytest) by default, silent under ``over="ignore"`` (as in
    :func:`metarep.run.loop.train`, which then reports the divergence)."""
    chunked_threaded(monkeypatch)
    batch = make_batch(n=40).astype(np.float32)
    B, w = make_params()
    huge = LinearParams((B * 1e15).astype(np.float32), (w * 1e15).astype(np.float32))
    with pytest.raises(RuntimeWarning, match="overflow"):
        FOANIL(0.3, 0.5, 1).step(huge, batch)
    with np.errstate(over="ignore", invalid="ignore"):
        new, meta_loss = FOANIL(0.3, 0.5, 1).step(huge, batch)
    assert not np.isfinite(meta_loss) or not new.is_finite()


def test_threaded_step_restores_the_blas_thread_count(monkeypatch):
    chunked_threaded(monkeypatch)
    before = [lib.num_threads for lib in kernel_threads._blas().lib_controllers]
    FOANIL(0.3, 0.5, 1).step(make_params(), make_batch(n=40))
    assert [lib.num_threads for lib in kernel_threads._blas().lib_controllers] == before


@pytest.mark.parametrize(("threads", "n_chunks"), [(2, 15), (3, 7), (4, 4)])
def test_map_chunks_gives_each_thread_consecutive_chunks_in_order(monkeypatch, threads,
                                                                   n_chunks):
    """The results come in the chunks' order, each thread takes its chunks in increasing
    order, and no more threads than BLAS may use take part."""
    monkeypatch.setattr(kernel_threads, "_blas_threads", lambda: threads)
    taken: list[tuple[int, int]] = []
    chunks = [slice(i, i + 1) for i in range(n_chunks)]

    def work(chunk: slice) -> int:
        taken.append((threading.get_ident(), chunk.start))
        return chunk.start

    assert kernel_threads.map_chunks(work, chunks) == list(range(n_chunks))
    by_thread: dict[int, list[int]] = {}
    for thread, start in taken:
        by_thread.setdefault(thread, []).append(start)
    assert sorted(start for _, start in taken) == list(range(n_chunks))
    assert all(starts == sorted(starts) for starts in by_thread.values())
    assert 1 <= len(by_thread) <= threads and threading.get_ident() not in by_thread


def test_one_blas_thread_means_no_worker_threads(monkeypatch):
    """Under a one-thread BLAS limit (as sweeps set around each run) the chunks run in the
    calling thread."""
    monkeypatch.setattr(fo_anil, "TASK_CHUNK_BYTES", 4 * (7 + 5) * 6 * 8)

    def no_pool(workers):
        raise AssertionError("a thread pool was used")

    monkeypatch.setattr(kernel_threads, "_thread_pool", no_pool)
    batch, params = make_batch(n=40), make_params()
    with threadpool_limits(limits=1, user_api="blas"):
        new, _ = FOANIL(0.3, 0.5, 1).step(params, batch)
    (B_ref, _), _ = reference.fo_anil_step(params, batch, 0.3, 0.5, 1)
    np.testing.assert_allclose(new.B, B_ref, rtol=0, atol=1e-12)
