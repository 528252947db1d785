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
"""

from __future__ import annotations

from collections.abc import Mapping

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
