"""FeatureGate: L0 gates on a model's input features (feature selection)."""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from lumos_kernels import dispatch

from ..gates import HardConcreteGate


class FeatureGate(nn.Module):
    r"""Multiplies each input feature by its gate: ``y = x * m`` along ``dim``.

    Trained with the L0 penalty, the gates learn which input features the model needs;
    :func:`lumos.compact` turns the closed ones into a column selection.

    Args:
        n_features: number of features along ``dim``.
        feature_names: optional names (one per feature) used by reports.
        dim: the feature dimension of the input (-1 for tabular data, 1 for conv channels).
        **gate_kwargs: passed to :class:`lumos.gates.HardConcreteGate`.

    Shapes:
        input and output ``(..., n_features, ...)`` with the features on ``dim``.
    """

    def __init__(self, n_features: int, feature_names: Sequence[str] | None = None, dim: int = -1,
                 **gate_kwargs):
        super().__init__()
        if feature_names is not None:
            feature_names = [str(name) for name in feature_names]
            if len(feature_names) != n_features:
                raise ValueError(
                    f"FeatureGate: `feature_names` has {len(feature_names)} names for {n_features} features"
                )
        self.n_features = n_features
        self.feature_names = feature_names or [f"x{i}" for i in range(n_features)]
        self.dim = dim
        self.gate = HardConcreteGate(n_features, **gate_kwargs)

    def _broadcast(self, m: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        dim = self.dim % x.dim()
        if dim != x.dim() - 1:  # the last dim broadcasts as it is: no op to dispatch
            m = m.reshape([-1 if d == dim else 1 for d in range(x.dim())])
        return dispatch.in_dtype(m, x.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 0 or not -x.dim() <= self.dim < x.dim() or x.shape[self.dim] != self.n_features:
            raise ValueError(
                f"FeatureGate: input must have {self.n_features} features on dim {self.dim}, "
                f"got shape {tuple(x.shape)}"
            )
        if not x.is_floating_point():
            raise TypeError(f"FeatureGate: input must be floating point, got {x.dtype}")
        return x * self._broadcast(self.gate(), x)

    def kept_features(self) -> list[str]:
        """Names of the features whose gates are open in eval mode."""
        kept = self.gate.kept().tolist()
        return [name for name, keep in zip(self.feature_names, kept) if keep]

    def extra_repr(self) -> str:
        return f"n_features={self.n_features}, dim={self.dim}, kept={len(self.kept_features())}/{self.n_features}"
