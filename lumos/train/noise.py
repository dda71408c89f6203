"""NoiseRangeSchedule: the LUMOS reference code's annealed gate noise."""
from __future__ import annotations

from torch import nn

from ..gates import gates_of


class NoiseRangeSchedule:
    """Anneals every gate's ``noise_range`` per epoch (the LUMOS reference code's variant).

    Geometric from ``start`` (0.5: deterministic gates) to ``end`` (about 0: full hard-concrete
    noise) over ``epochs``, then held at ``end``.
    """

    def __init__(self, start: float = 0.5, end: float = 1e-6, epochs: int = 10):
        if not 0 < end <= start <= 0.5 or epochs < 1:
            raise ValueError(f"NoiseRangeSchedule: need 0 < end <= start <= 0.5 and epochs >= 1, got {start}, {end}, {epochs}")
        self.start, self.end, self.epochs = start, end, epochs

    def value(self, epoch: int) -> float:
        t = min(epoch / self.epochs, 1.0)
        return self.start * (self.end / self.start) ** t

    def apply(self, model: nn.Module, epoch: int) -> None:
        for _, gate in gates_of(model):
            gate.noise_range = self.value(epoch)
