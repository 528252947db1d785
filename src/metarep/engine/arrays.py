"""The torch array namespace of the linear kernels: numpy's names on torch tensors of a
device (:mod:`metarep.core.arrays`), registered for ``torch.Tensor`` on importing this module.

The kernels of :mod:`metarep.core.methods` and :mod:`metarep.core.infinite` then run
unchanged on tensors (``train.backend: torch``, :mod:`metarep.run.backends.linear`).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from metarep.core.arrays import register_namespace


class TorchNamespace:
    """numpy's functions that the kernels call, on torch tensors of ``device``.

    Same names and semantics as numpy: ``einsum``, ``matmul``, ``add``, ``subtract``,
    ``multiply`` (``out=`` writes into a tensor or a view of one), ``tile``, ``broadcast_to``,
    ``sum`` and ``mean`` (``axis=``), ``isfinite``, ``all``; and below, where torch's spelling
    differs, ``asarray``, ``ascontiguousarray``, ``empty``, ``concatenate``, ``transpose``,
    ``copy``, ``vdot`` and ``to_numpy``. dtypes are given as numpy dtypes (or their names).
    """

    def __init__(self, device: str):
        self.device = torch.device(device)
        self.einsum, self.matmul, self.tile = torch.einsum, torch.matmul, torch.tile
        self.add, self.subtract, self.multiply = torch.add, torch.subtract, torch.multiply
        self.broadcast_to, self.isfinite, self.all = torch.broadcast_to, torch.isfinite, torch.all
        self.sum, self.mean = torch.sum, torch.mean

    def __repr__(self) -> str:
        return f"TorchNamespace({str(self.device)!r})"

    @staticmethod
    def dtype(dtype: np.dtype | str | None) -> torch.dtype | None:
        """The torch dtype of the numpy ``dtype`` (``None`` stays ``None``)."""
        return None if dtype is None else getattr(torch, np.dtype(dtype).name)

    def asarray(self, x: Any, dtype: np.dtype | str | None = None) -> torch.Tensor:
        """``x`` (numpy array, tensor, number) as a tensor on the device, sharing memory where
        no copy is needed (as ``np.asarray``)."""
        return torch.as_tensor(x, dtype=self.dtype(dtype), device=self.device)

    def ascontiguousarray(self, x: Any, dtype: np.dtype | str | None = None) -> torch.Tensor:
        return self.asarray(x, dtype).contiguous()

    def empty(self, shape: Sequence[int], dtype: np.dtype | str) -> torch.Tensor:
        return torch.empty(tuple(shape), dtype=self.dtype(dtype), device=self.device)

    @staticmethod
    def concatenate(tensors: Sequence[torch.Tensor], axis: int = 0) -> torch.Tensor:
        return torch.cat(list(tensors), dim=axis)

    @staticmethod
    def transpose(x: torch.Tensor, axes: Sequence[int]) -> torch.Tensor:
        """``np.transpose(x, axes)``: a view with the axes permuted."""
        return x.permute(*axes)

    @staticmethod
    def copy(x: torch.Tensor) -> torch.Tensor:
        return x.clone()

    @staticmethod
    def vdot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """``np.vdot``: the dot product of the flattened (real) arrays, a 0-d tensor."""
        return torch.vdot(a.reshape(-1), b.reshape(-1))

    @staticmethod
    def to_numpy(x: torch.Tensor) -> np.ndarray:
        """The tensor as a numpy array, copied from its device (a CPU tensor's memory is
        shared)."""
        return x.detach().cpu().numpy()


@functools.cache
def torch_namespace(device: str) -> TorchNamespace:
    """The :class:`TorchNamespace` of ``device`` (``cpu``, ``cuda``, ``cuda:1``), one per
    device name."""
    return TorchNamespace(device)


register_namespace(torch.Tensor, lambda x: torch_namespace(str(x.device)))
