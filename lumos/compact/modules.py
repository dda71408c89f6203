"""The one non-torch module a compacted model may hold, and the helper ops its graph calls."""
from __future__ import annotations

import torch
from torch import nn


class InputSelect(nn.Module):
    """Keeps the selected input features (and applies their fractional gate values, if any).

    ``y = x.index_select(dim, index) * scale`` with ``scale`` broadcast along ``dim``.

    Args:
        index: ``(k,)`` long, the kept positions along ``dim``.
        scale: ``(k,)`` gate values of the kept features, or None when all are exactly 1.
        dim: the feature dimension.

    Shapes:
        input ``(..., n, ...)``, output ``(..., k, ...)`` with features on ``dim``.
    """

    def __init__(self, index: torch.Tensor, scale: torch.Tensor | None = None, dim: int = -1):
        super().__init__()
        self.dim = dim
        self.register_buffer("index", index.long().clone())
        self.register_buffer("scale", None if scale is None else scale.clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x.index_select(self.dim, self.index)
        if self.scale is None:
            return y
        dim = self.dim % x.dim()
        return y * self.scale.reshape([-1 if d == dim else 1 for d in range(x.dim())]).to(y.dtype)

    def extra_repr(self) -> str:
        return f"kept={self.index.numel()}, dim={self.dim}, scaled={self.scale is not None}"


def zero_width(x: torch.Tensor, dim: int) -> torch.Tensor:
    """``x`` with no channels left on ``dim`` (a removed layer's output keeps only its batch shape)."""
    return x.narrow(dim, 0, 0)


def constant_like(x: torch.Tensor, value: torch.Tensor, dim: int) -> torch.Tensor:
    """``value`` (k,) broadcast to ``x``'s shape with ``k`` channels on ``dim``: a removed input's layer."""
    dim = dim % x.dim()
    shape = [value.numel() if d == dim else s for d, s in enumerate(x.shape)]
    view = value.reshape([-1 if d == dim else 1 for d in range(x.dim())])
    return view.to(x.dtype).expand(shape)
