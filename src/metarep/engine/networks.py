"""Networks for the torch engine: the linear two-layer model and ReLU networks (specification §2).

Every network here is ``f(x) = phi(x)^T w``: a body ``phi: R^d -> R^{k'}`` (the representation)
followed by a linear head ``w`` in R^{k'} without bias, the name of the head parameter being
``w`` (:data:`HEAD`). Weights are stored in the (in, out) orientation of ``B``:

- :class:`LinearNet`: ``phi(x) = B^T x`` with ``B`` (d, k'), so ``f(x) = x^T B w``.
- :class:`ReLUNet` with one hidden layer (the paper's two-layer ReLU network):
  ``phi(x) = relu(W1^T x)``, ``W1`` (d, k').
- :class:`ReLUNet` with two hidden layers (the three-layer ReLU network):
  ``phi(x) = relu(W2^T relu(W1^T x))``, ``W1`` (d, h), ``W2`` (h, k'), with the hidden width
  ``h`` = ``model.hidden_width``.

No biases: the tasks are linear with mean zero, and ``relu(z) - relu(-z) = z`` lets a ReLU body
represent them. Initialisation (:func:`init_relu`) follows the linear model: ``W1`` has i.i.d.
``N(0, init_scale^2 / d)`` entries like ``B_0``, so each first-layer pre-activation ``x^T W1_j``
has variance ~ ``init_scale^2`` as the linear model's ``x^T B_j``; ``W2`` has i.i.d.
``N(0, 2 / h)`` entries (He scaling), which keeps the second-layer pre-activations at the same
variance ``init_scale^2`` (``E relu(z)^2 = var(z) / 2``); the head starts at ``w_0 = 0``.

These networks are chains ``A_0 = X``, ``Z_l = A_(l-1) W_l``, ``A_l = relu(Z_l)`` (``A_l = Z_l``
for the linear body), ``f = A_L w``, which :func:`chain_gradient` evaluates for a whole batch of
tasks at once, with the loss's backward pass written out: the torch engine's fast path for
them (:func:`chain_of` says which modules have one).
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor, nn

from metarep.errors import ArgumentError

HEAD = ("w",)


class RepresentationNet(nn.Module):
    """``f(x) = phi(x)^T w`` for inputs ``x`` (..., d); subclasses define the body ``phi``."""

    w: nn.Parameter

    def features(self, x: Tensor, params: Mapping[str, Tensor] | None = None) -> Tensor:
        """``phi(x)``, shape (..., k'), with the module's parameters or the given ``params``."""
        raise NotImplementedError

    def forward(self, x: Tensor) -> Tensor:
        """``f(x) = phi(x) w``, shape (...,)."""
        return self.features(x) @ self.w


def _parameter(array: np.ndarray) -> nn.Parameter:
    return nn.Parameter(torch.as_tensor(np.asarray(array, dtype=np.float64)))


class LinearNet(RepresentationNet):
    """The two-layer linear network ``f(x) = x^T B w``: ``B`` (d, k'), ``w`` (k',)."""

    def __init__(self, B: np.ndarray, w: np.ndarray):
        super().__init__()
        self.B = _parameter(B)
        self.w = _parameter(w)

    def features(self, x: Tensor, params: Mapping[str, Tensor] | None = None) -> Tensor:
        B = self.B if params is None else params["B"]
        return x @ B

    def forward(self, x: Tensor) -> Tensor:
        """``f(x) = x^T (B w)``: the d-vector ``B w`` first, so inputs are read once."""
        return x @ (self.B @ self.w)


class ReLUNet(RepresentationNet):
    """A ReLU body with one (``W1``) or two (``W1``, ``W2``) hidden layers and a linear head."""

    def __init__(self, layers: list[np.ndarray], w: np.ndarray):
        super().__init__()
        if len(layers) not in (1, 2):
            raise ArgumentError("layers", f"must hold 1 or 2 weight matrices, got {len(layers)}")
        self.W1 = _parameter(layers[0])
        if len(layers) == 2:
            self.W2 = _parameter(layers[1])
        self.w = _parameter(w)

    @property
    def hidden_layers(self) -> int:
        return 2 if hasattr(self, "W2") else 1

    def features(self, x: Tensor, params: Mapping[str, Tensor] | None = None) -> Tensor:
        p = dict(self.named_parameters()) if params is None else params
        hidden = torch.relu(x @ p["W1"])
        if self.hidden_layers == 2:
            hidden = torch.relu(hidden @ p["W2"])
        return hidden


def layer_shapes(
    d: int, width: int, hidden_layers: int, hidden_width: int
) -> list[tuple[int, int]]:
    """Shapes of the body's weights: ``[(d, k')]`` or ``[(d, h), (h, k')]``."""
    if hidden_layers == 1:
        return [(d, width)]
    return [(d, hidden_width), (hidden_width, width)]


def init_relu(
    d: int,
    width: int,
    hidden_layers: int,
    hidden_width: int,
    init_scale: float,
    rng: np.random.Generator,
) -> ReLUNet:
    """A :class:`ReLUNet` initialised as described in the module docstring (float64).

    ``W1`` ~ ``N(0, init_scale^2 / d)``, ``W2`` ~ ``N(0, 2 / hidden_width)``, ``w_0 = 0``; drawn
    from ``rng`` in that order, so the same seed gives the same network.
    """
    shapes = layer_shapes(d, width, hidden_layers, hidden_width)
    scales = [init_scale / np.sqrt(d), np.sqrt(2.0 / hidden_width)]
    layers = [rng.standard_normal(shape) * scale for shape, scale in zip(shapes, scales,
                                                                         strict=False)]
    return ReLUNet(layers, np.zeros(width))


def relu_from_arrays(arrays: Mapping[str, np.ndarray], d: int, hidden_layers: int) -> ReLUNet:
    """A :class:`ReLUNet` from named arrays ``W1`` (d, h1), [``W2`` (h1, k')], ``w`` (k').

    Raises :class:`~metarep.errors.ArgumentError` naming the array at fault (``arrays`` for
    a missing one) when arrays are missing or their shapes do not chain.
    """
    names = [*("W1", "W2")[:hidden_layers], "w"]
    missing = [name for name in names if name not in arrays]
    if missing:
        raise ArgumentError("arrays", f"must hold {', '.join(names)} for a ReLU network with "
                            f"{hidden_layers} hidden layer(s); missing {', '.join(missing)}")
    layers = [np.asarray(arrays[name]) for name in names[:-1]]
    w = np.asarray(arrays["w"])
    rows = d
    for name, layer in zip(names, layers, strict=False):
        if layer.ndim != 2 or layer.shape[0] != rows:
            raise ArgumentError(name, f"must have shape ({rows}, width), got {layer.shape}")
        rows = layer.shape[1]
    if w.shape != (rows,):
        raise ArgumentError("w", f"must have shape ({rows},), got {w.shape}")
    return ReLUNet(layers, w)


@dataclass(frozen=True)
class Chain:
    """A network's body as a chain: the names of its weights ``W_1 .. W_L`` in order, and
    whether each layer is rectified (``A_l = relu(Z_l)``) or linear (``A_l = Z_l``)."""

    layers: tuple[str, ...]
    rectified: bool


def chain_of(module: nn.Module) -> Chain | None:
    """The chain of a :class:`LinearNet` (``B``, linear) or :class:`ReLUNet` (``W1`` [, ``W2``],
    rectified); ``None`` for any other module, subclasses included (their forward may
    differ)."""
    if type(module) is LinearNet:
        return Chain(("B",), False)
    if type(module) is ReLUNet:
        return Chain(("W1", "W2")[: module.hidden_layers], True)
    return None


def chain_gradient(chain: Chain, params: Mapping[str, Tensor], X: Tensor, y: Tensor,
                   wanted: Sequence[str], summed: Collection[str] = (),
                   offset: Tensor | None = None, coefficient: bool = False
                   ) -> tuple[Tensor, dict[str, Tensor]]:
    """Per-task losses and their gradients for a batch of ``n`` tasks, the tasks a batch axis.

    ``X`` (n, m, d), ``y`` (n, m); each weight in ``params`` (the chain's and the head ``w``)
    is shared, of its own shape, or per task, with a leading axis n. With ``r = (f - y) / m``
    (``f = A_L w``) the loss of task i is ``L_i = m / 2 ||r_i||^2`` and, by the backward pass,
    ``grad_w L_i = A_L^T r``, ``dA_L = r w^T``, ``dZ_l = dA_l * 1[Z_l > 0]`` (rectified),
    ``grad_(W_l) L_i = A_(l-1)^T dZ_l``, ``dA_(l-1) = dZ_l W_l^T``, run down to the lowest
    layer in ``wanted`` (the names whose gradients are returned).

    Returns the losses (n,) and the gradients: per task (n, ...), those named in ``summed``
    summed over the tasks (``sum_i A_(l-1),i^T dZ_l,i`` as one product of the stacked rows).

    ``offset`` (n, m, h_1) is subtracted from the first pre-activation: ``Z_1 = X W_1 -
    offset``. A per-task first layer ``W_1,i = W_1 - X_i'^T C_i`` (the form that inner steps
    on the inputs ``X_i'`` give it, see :func:`first_layer_offset`) is passed as the shared
    ``W_1`` and ``offset = (X_i X_i'^T) C_i``, which never forms a (d, h_1) matrix per task.
    With ``coefficient``, the per-task gradient of the first layer is returned as ``dZ_1``
    (n, m, h_1), the gradient being ``X_i^T dZ_1,i``: an inner step on ``X_i' = X_i`` is
    ``C_i <- C_i + alpha dZ_1,i``. Every
    operation is a differentiable torch operation, so autograd through the gradients gives
    exact second derivatives; a shared weight multiplies all rows at once (one matrix
    product), a per-task one is a batched product. ``1[Z > 0]`` is taken from
    ``A = relu(Z)`` as torch's own ReLU backward does (``threshold_backward``), whose
    derivative by its input is zero: the second derivative of ReLU, almost everywhere.
    """
    m = X.shape[1]
    activations = [X]
    for layer, name in enumerate(chain.layers):
        Z = activations[-1] @ params[name]
        if layer == 0 and offset is not None:
            Z = Z - offset
        activations.append(torch.relu(Z) if chain.rectified else Z)
    head = params["w"]
    features = activations[-1]
    f = (features @ head.unsqueeze(-1)).squeeze(-1)
    r = (f - y) / m
    losses = 0.5 * m * (r * r).sum(-1)
    gradients: dict[str, Tensor] = {}

    def product(name: str, A: Tensor, dZ: Tensor) -> Tensor:  # sum_i A_i^T dZ_i, or each
        if name in summed:
            return A.reshape(-1, A.shape[-1]).T @ dZ.reshape(-1, dZ.shape[-1])
        return A.transpose(-1, -2) @ dZ

    if "w" in wanted:
        gradients["w"] = product("w", features, r.unsqueeze(-1)).squeeze(-1)
    lowest = min((chain.layers.index(n) for n in wanted if n in chain.layers), default=None)
    if lowest is None:
        return losses, gradients
    dA = r.unsqueeze(-1) * head.unsqueeze(-2)
    for layer in range(len(chain.layers) - 1, lowest - 1, -1):
        name = chain.layers[layer]
        dZ = (torch.ops.aten.threshold_backward(dA, activations[layer + 1], 0.0)
              if chain.rectified else dA)
        if name in wanted:
            gradients[name] = (dZ if layer == 0 and coefficient
                               else product(name, activations[layer], dZ))
        if layer > lowest:
            dA = dZ @ params[name].transpose(-1, -2)
    return losses, gradients


def first_layer_offset(X: Tensor, X_inner: Tensor, coefficient: Tensor | None) -> Tensor | None:
    """``(X_i X_i'^T) C_i`` (n, m, h_1) for inputs ``X`` (n, m, d), the inner inputs ``X'``
    (n, m', d) and ``C`` (n, m', h_1): ``X_i (W_1 - X_i'^T C_i) = X_i W_1 - offset_i``
    (:func:`chain_gradient`); ``None`` while the first layer is still shared (no ``C``)."""
    if coefficient is None:
        return None
    return (X @ X_inner.transpose(-1, -2)) @ coefficient
