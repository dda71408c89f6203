"""GatedLinear: nn.Linear with L0 gates on its output neurons (and optionally its inputs)."""
from __future__ import annotations

import math

import torch
from torch import nn

from lumos_kernels import masked_linear

from ..gates import HardConcreteGate, fold_gate_scales_


class GatedLinear(nn.Module):
    r"""A linear layer whose output neurons (and optionally input columns) carry L0 gates.

    .. math::
        y = (x \odot m_{in}) (W \odot m_{out}[:, None])^T + b \odot m_{out}

    ``m_out`` prunes neurons; ``m_in`` prunes input columns (feature selection when this is a
    model's first layer; :class:`lumos.nn.FeatureGate` does the same in front of any layer).
    Parameters ``weight`` and ``bias`` have the names and initialisation of ``nn.Linear``.

    Args:
        in_features, out_features, bias: as ``nn.Linear``.
        gate_in: gate the input columns (default False).
        gate_out: gate the output neurons (default True).
        **gate_kwargs: passed to each :class:`lumos.gates.HardConcreteGate`.

    Shapes:
        input ``(*, in_features)``, output ``(*, out_features)``.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *,
                 gate_in: bool = False, gate_out: bool = True, device=None, dtype=None, **gate_kwargs):
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        self.in_features, self.out_features = in_features, out_features
        self.weight = nn.Parameter(torch.empty(out_features, in_features, **factory))
        self.bias = nn.Parameter(torch.empty(out_features, **factory)) if bias else None
        self._reset_weights()  # first, so that the weights draw the same numbers as nn.Linear's
        self.in_gate = HardConcreteGate(in_features, device=device, **gate_kwargs) if gate_in else None
        self.out_gate = HardConcreteGate(out_features, device=device, **gate_kwargs) if gate_out else None

    def _reset_weights(self) -> None:
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        if self.bias is not None:
            bound = 1 / math.sqrt(self.in_features) if self.in_features > 0 else 0
            nn.init.uniform_(self.bias, -bound, bound)

    def reset_parameters(self) -> None:
        """The initialisation of ``nn.Linear``; gates are reset to their initial logits."""
        self._reset_weights()
        for gate in (self.in_gate, self.out_gate):
            if gate is not None:
                gate.reset_parameters()

    @classmethod
    def from_linear(cls, linear: nn.Linear, **kwargs) -> "GatedLinear":
        """A gated copy of ``linear`` holding the same weights (copied, not shared)."""
        layer = cls(linear.in_features, linear.out_features, linear.bias is not None,
                    device=linear.weight.device, dtype=linear.weight.dtype, **kwargs)
        with torch.no_grad():
            layer.weight.copy_(linear.weight)
            if linear.bias is not None:
                layer.bias.copy_(linear.bias)
        return layer

    @torch.no_grad()
    def fold_lock_scales_(self) -> None:
        """Move each gate's ``lock_scale`` into the weights (rows and bias for the output gate,
        columns for the input gate) and set it to 1: the layer computes the same, and a unit
        held at a scale below 1 learns at the speed of one at 1 again."""
        fold_gate_scales_(self, lambda scale: self.weight * scale[:, None], in_dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 0 or x.shape[-1] != self.in_features:
            raise ValueError(
                f"GatedLinear: input must have shape (*, {self.in_features}), got {tuple(x.shape)}"
            )
        m_in = self.in_gate() if self.in_gate is not None else None
        m_out = self.out_gate() if self.out_gate is not None else None
        return masked_linear(x, self.weight, self.bias, m_in, m_out)

    def extra_repr(self) -> str:
        text = f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"
        if self.in_gate is not None:
            text += f", kept_in={int(self.in_gate.kept().sum())}/{self.in_features}"
        if self.out_gate is not None:
            text += f", kept_out={int(self.out_gate.kept().sum())}/{self.out_features}"
        return text
