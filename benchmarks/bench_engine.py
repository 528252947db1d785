"""The torch engine against its compute bound: one ReLU MAML / FO-ANIL step at the study's sizes.

For each method (maml, anil, fo-maml, fo-anil) and body (1 or 2 hidden layers) it prints the
time of one :class:`metarep.engine.learner.MetaLearner` step on N tasks, the step's
floating-point operations, the achieved GFLOP/s, the bound and the ratio time / bound; the
engine's fast path (:func:`metarep.engine.networks.chain_gradient`) and, for comparison, the
generic ``torch.func`` path (the same network wrapped in a plain ``nn.Module``) are both timed.

**FLOPs** are counted analytically, matrix products only (elementwise work is of lower order),
for the textbook algorithm: per task, with ``f_l = 2 m a_l b_l`` for layer ``l`` of shape
(a_l, b_l) on m rows (the head is the last layer, (k', 1)),

- forward ``F(m) = sum_l f_l``; backward to the weights ``B(m) = sum_l f_l + sum_(l>=2) f_l``
  (every weight gradient, the input gradients above the first layer);
- the second order (MAML), reverse mode through the inner forward and backward: one product
  per operand that depends on the parameters, ``S(m) = 2 f_1 + 6 sum_(l>=2) f_l``; for ANIL,
  through the body's forward and the head's forward and gradient: the body's ``B`` plus
  ``4 f_head``;
- fo-anil ``F(m_in) + f_head(m_in) + F(m_out) + B(m_out)``; fo-maml ``F + B`` on both sets;
  maml adds ``S(m_in)``, anil ``B_body(m_in) + 4 f_head(m_in)`` to their first-order versions.

The fast path computes less than this for MAML (the adapted first layer in its Gram form,
see :mod:`metarep.engine.learner`), so its ratio may be lower than its share of the machine.

**The bound** is measured in the same run, on one thread, same dtype: each layer's products
are timed as ``torch.bmm`` of N tasks at that layer's shape, ``(N, m, a) @ (N, a, b)``, and
the bound is the step's FLOPs at those throughputs (every product of the step run as one
batched product of its shape, nothing else). The stricter *peak* bound divides the FLOPs by
the best throughput measured at any of these shapes, batched or as one product of all rows.

    python benchmarks/bench_engine.py                  # quick/paper sizes: d = 40, k' = 16, h = 20
    python benchmarks/bench_engine.py --sizes default  # d = 20, k' = 8, h = 10
    python benchmarks/bench_engine.py --dtype float32
"""

from __future__ import annotations

import os

for _variable in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[_variable] = "1"  # one core: set before numpy and torch are imported

import argparse  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402
from timing import median_seconds, peak_rss_line  # noqa: E402

from metarep.engine.learner import MetaLearner  # noqa: E402
from metarep.engine.networks import init_relu, layer_shapes  # noqa: E402

N, M_IN, M_OUT = 1000, 5, 10
SIZES = {"quick": {"d": 40, "width": 16, "hidden": 20}, "default": {"d": 20, "width": 8,
                                                                     "hidden": 10}}
METHODS = (("maml", "maml", False), ("anil", "anil", False), ("fo-maml", "maml", True),
           ("fo-anil", "anil", True))


def step_flops(name: str, shapes: list[tuple[int, int]]) -> dict[tuple[int, int, int], float]:
    """The step's matrix-product FLOPs (all N tasks) by the shape ``(m, a, b)`` they run at,
    as counted in the module docstring."""
    layers = [*shapes, (shapes[-1][1], 1)]
    flops: dict[tuple[int, int, int], float] = {}

    def add(m: int, layer: int, times: float) -> None:
        a, b = layers[layer]
        key = (m, a, b)
        flops[key] = flops.get(key, 0.0) + times * 2 * N * m * a * b

    def forward(m: int) -> None:
        for layer in range(len(layers)):
            add(m, layer, 1)

    def backward(m: int, upto: int) -> None:  # the gradients of layers [0, upto)
        for layer in range(upto):
            add(m, layer, 2 if layer else 1)

    head = len(layers) - 1
    forward(M_IN)
    if name.endswith("anil"):
        add(M_IN, head, 1)  # the head's inner gradient
    else:
        backward(M_IN, len(layers))
    forward(M_OUT)
    backward(M_OUT, len(layers))
    if name == "maml":
        for layer in range(len(layers)):
            add(M_IN, layer, 2 if layer == 0 else 6)
    if name == "anil":
        backward(M_IN, head)
        add(M_IN, head, 4)
    return flops


def throughputs(shapes: set[tuple[int, int, int]], dtype: torch.dtype
                ) -> dict[tuple[int, int, int], tuple[float, float]]:
    """FLOP/s of ``torch.bmm`` of N tasks and of one product of all N m rows, by shape."""
    out = {}
    for m, a, b in sorted(shapes):
        A, W = torch.randn(N, m, a, dtype=dtype), torch.randn(N, a, b, dtype=dtype)
        flops = 2 * N * m * a * b
        batched = median_seconds(lambda A=A, W=W: torch.bmm(A, W), 50, 5)
        rows, shared = A.reshape(N * m, a), W[0]
        flat = median_seconds(lambda rows=rows, shared=shared: rows @ shared, 50, 5)
        out[m, a, b] = flops / batched, flops / flat
    return out


class Generic(torch.nn.Module):
    """The same network behind a plain module: the engine's generic ``torch.func`` path."""

    def __init__(self, net: torch.nn.Module):
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", choices=SIZES, default="quick")
    parser.add_argument("--dtype", choices=("float64", "float32"), default="float64")
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--no-generic", action="store_true", help="time the fast path only")
    args = parser.parse_args()
    torch.set_num_threads(1)
    dtype = getattr(torch, args.dtype)
    size = SIZES[args.sizes]
    d = size["d"]
    gen = torch.Generator().manual_seed(0)
    data = [torch.randn(N, M_IN, d, generator=gen, dtype=dtype),
            torch.randn(N, M_IN, generator=gen, dtype=dtype),
            torch.randn(N, M_OUT, d, generator=gen, dtype=dtype),
            torch.randn(N, M_OUT, generator=gen, dtype=dtype)]
    print(f"N = {N}, m_in = {M_IN}, m_out = {M_OUT}, d = {d}, k' = {size['width']}, "
          f"h = {size['hidden']}, {args.dtype}, one thread")
    print(f"{'layers':>6} {'method':>8} {'path':>8} {'ms/step':>8} {'GFLOP':>7} {'GFLOP/s':>8} "
          f"{'bound ms':>9} {'ratio':>6} {'peak ratio':>10}")
    for hidden_layers in (1, 2):
        shapes = layer_shapes(d, size["width"], hidden_layers, size["hidden"])
        counts = {name: step_flops(name, shapes) for name, _, _ in METHODS}
        speed = throughputs({s for c in counts.values() for s in c}, dtype)
        peak = max(max(pair) for pair in speed.values())
        for name, method, first_order in METHODS:
            flops = sum(counts[name].values())
            bound = sum(f / speed[shape][0] for shape, f in counts[name].items())
            for path in ("fast", *(() if args.no_generic else ("generic",))):
                net = init_relu(d, size["width"], hidden_layers, size["hidden"], 0.5,
                                np.random.default_rng(1))
                with torch.no_grad():
                    net.w.normal_(generator=gen)  # a non-zero head: every term acts
                module, head = (net, "w") if path == "fast" else (Generic(net), "net.w")
                learner = MetaLearner(module, head, method=method, first_order=first_order,
                                      inner_lr=0.5, outer_lr=0.1, dtype=dtype)
                seconds = median_seconds(lambda learner=learner: learner.step(*data),
                                         args.repeats, 2)
                print(f"{hidden_layers:>6} {name:>8} {path:>8} {seconds * 1e3:8.2f} "
                      f"{flops / 1e9:7.3f} {flops / seconds / 1e9:8.2f} {bound * 1e3:9.2f} "
                      f"{seconds / bound:6.2f} {seconds * peak / flops:10.2f}")
        print("  bmm GFLOP/s by shape (m, a, b): " + ", ".join(
            f"{shape}: {pair[0] / 1e9:.1f} (all rows {pair[1] / 1e9:.1f})"
            for shape, pair in speed.items()))
    print(peak_rss_line())


if __name__ == "__main__":
    main()
