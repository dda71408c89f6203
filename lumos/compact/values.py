"""What the dropped channels of a tensor hold: a :class:`Value` per tracked node.

A dropped channel ``c`` holds ``const[c] + sum_t coef[c, t] * s_t`` where ``s`` is the node's
*signals* tensor in the compacted graph: ``T`` per-row numbers on the channel dim (the other
dims those of the tensor, or 1 where they broadcast). CONST channels have zero ``coef`` rows;
AFFINE ones (a norm's output on a dropped channel) use the signals; FREE dropped channels are
never read, their row is 0. Consumers fold the constants into their bias and the signals through
an extra small product (see ``DERIVATIONS.md``).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import fx


@dataclass
class Value:
    """``const`` ``(C,)`` float64, ``signals`` a compacted-graph node (or None) and ``coef``
    ``(C, T)`` float64 (None without signals)."""

    const: torch.Tensor
    signals: fx.Node | None = None
    coef: torch.Tensor | None = None

    @classmethod
    def zeros(cls, size: int) -> "Value":
        return cls(torch.zeros(size, dtype=torch.float64))

    @property
    def size(self) -> int:
        return self.const.numel()

    def rows(self, index: torch.Tensor) -> "Value":
        """The values of channels ``index`` (in that order)."""
        return Value(self.const[index], self.signals, None if self.coef is None else self.coef[index])

    def scaled(self, factor: torch.Tensor | float) -> "Value":
        """Each channel times ``factor`` (a number or ``(C,)``)."""
        factor = torch.as_tensor(factor, dtype=torch.float64)
        coef = None if self.coef is None else self.coef * (factor[:, None] if factor.dim() else factor)
        return Value(self.const * factor, self.signals, coef)

    def with_const(self, const: torch.Tensor) -> "Value":
        return Value(const.double(), self.signals, self.coef)

    def uses_signals(self, index: torch.Tensor | None = None) -> bool:
        """Whether channels ``index`` (default all) depend on the signals."""
        if self.signals is None or self.coef is None:
            return False
        coef = self.coef if index is None else self.coef[index]
        return bool(coef.abs().gt(0).any())

    def coef_or_zeros(self, width: int) -> torch.Tensor:
        return self.coef if self.coef is not None else torch.zeros(self.size, width, dtype=torch.float64)
