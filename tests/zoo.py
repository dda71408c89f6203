"""Model zoo and helpers shared by the compaction tests."""
from __future__ import annotations

import io

import torch
import torch.nn.functional as F
from torch import nn

import lumos


class ResidualMLP(nn.Module):
    """Two residual blocks ``h + f(h)`` around a width-32 stream (custom forward)."""

    def __init__(self, n_in=9, width=32, n_out=2):
        super().__init__()
        self.inp = nn.Linear(n_in, width)
        self.block1 = nn.Sequential(nn.Linear(width, 48), nn.GELU(), nn.Linear(48, width))
        self.block2 = nn.Sequential(nn.Linear(width, 40), nn.ReLU(), nn.Linear(40, width))
        self.head = nn.Linear(width, n_out)

    def forward(self, x):
        h = F.silu(self.inp(x))
        h = h + self.block1(h)
        h = h + 0.5 * self.block2(h)
        return self.head(torch.tanh(h))


class NormMLP(nn.Module):
    """LayerNorm after the first layer (its width must stay), BatchNorm and sigmoid later."""

    def __init__(self, n_in=7, n_out=3):
        super().__init__()
        self.fc1 = nn.Linear(n_in, 24)
        self.norm = nn.LayerNorm(24)
        self.fc2 = nn.Linear(24, 30)
        self.bn = nn.BatchNorm1d(30)
        self.fc3 = nn.Linear(30, 20, bias=False)
        self.out = nn.Linear(20, n_out)

    def forward(self, x):
        h = torch.relu(self.norm(self.fc1(x)))
        h = torch.sigmoid(self.bn(self.fc2(h)))
        h = F.dropout(self.fc3(h), p=0.1, training=self.training)
        return self.out(torch.tanh(h) + 1.0)


def mlp_zoo() -> dict[str, tuple[nn.Module, torch.Tensor]]:
    """Name -> (dense model, example input). At least five MLP shapes."""
    torch.manual_seed(1)
    norm = NormMLP()
    with torch.no_grad():  # non-trivial running statistics
        norm.bn.running_mean.uniform_(-0.5, 0.5)
        norm.bn.running_var.uniform_(0.5, 2.0)
    return {
        "relu_3hidden": (nn.Sequential(nn.Linear(12, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(),
                                       nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 3)), torch.randn(16, 12)),
        "silu_dropout": (nn.Sequential(nn.Linear(6, 50), nn.SiLU(), nn.Dropout(0.2), nn.Linear(50, 17),
                                       nn.Softplus(), nn.Linear(17, 1)), torch.randn(16, 6)),
        "sequence_input": (nn.Sequential(nn.Linear(5, 20, bias=False), nn.Tanh(), nn.Linear(20, 11),
                                         nn.ELU(), nn.Linear(11, 4)), torch.randn(4, 7, 5)),
        "residual": (ResidualMLP(), torch.randn(16, 9)),
        "norms_sigmoid": (norm.eval(), torch.randn(16, 7)),
    }


def randomize_gates(gated: nn.Module, closed_fraction: float = 0.5, seed: int = 0,
                    fully_closed: str | None = None) -> None:
    """Set gate logits at random: about ``closed_fraction`` closed, the rest open or in the band.

    ``fully_closed`` names a gated layer (qualified name) whose output gates all close.
    """
    g = torch.Generator().manual_seed(seed)
    for name, gate in lumos.gates_of(gated):
        with torch.no_grad():
            u = torch.rand(gate.n, generator=g)
            value = torch.where(u < closed_fraction, torch.full_like(u, -8.0),
                                torch.where(u < closed_fraction + 0.2, torch.rand(gate.n, generator=g) * 2 - 1,
                                            torch.full_like(u, 4.0)))
            gate.log_alpha.copy_(value)
    if fully_closed is not None:
        with torch.no_grad():
            gated.get_submodule(fully_closed).out_gate.log_alpha.fill_(-8.0)


def assert_state_dict_round_trip(compacted: nn.Module, twin: nn.Module, inputs: tuple) -> None:
    """``compacted``'s state_dict, saved and loaded into ``twin`` (a second compaction of the same
    gated model, perturbed here first), gives ``twin`` the same outputs."""
    with torch.no_grad():
        for p in twin.parameters():
            p.add_(1.0)
    buffer = io.BytesIO()
    torch.save(compacted.state_dict(), buffer)
    buffer.seek(0)
    twin.load_state_dict(torch.load(buffer))
    torch.testing.assert_close(twin(*inputs), compacted(*inputs))
