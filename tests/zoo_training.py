"""Regression tasks with a known set of relevant inputs, for the training tests and benchmarks.

Each task returns standardised ``(inputs, target)`` splits, the indices of the inputs the
target depends on, and a dense MLP factory. ``late_quadratic`` is the hard case of issue 10: one
relevant input acts only through ``x**2``, which an MLP learns late, so a gate schedule that
closes inputs before the network has learned them loses it.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from lumos import workloads
from lumos.metrics import r2_score

SPLIT = (4000, 1000, 1000)  # train, validation and test rows of every task


@dataclass
class Task:
    """A regression task: data splits, the relevant input columns and a dense model factory."""

    name: str
    train: tuple[torch.Tensor, torch.Tensor]
    val: tuple[torch.Tensor, torch.Tensor]
    test: tuple[torch.Tensor, torch.Tensor]
    relevant: list[int]
    make_model: Callable[[], nn.Module]

    @property
    def n_features(self) -> int:
        return self.train[0].shape[1]

    def metric(self, pred: torch.Tensor, target: torch.Tensor) -> float:
        return r2_score(pred, target)


def mlp(widths: list[int]) -> nn.Sequential:
    """``widths[0] -> ... -> widths[-1]`` with SiLU between linear layers."""
    layers: list[nn.Module] = []
    for i, (n_in, n_out) in enumerate(zip(widths[:-1], widths[1:])):
        layers.append(nn.Linear(n_in, n_out))
        if i < len(widths) - 2:
            layers.append(nn.SiLU())
    return nn.Sequential(*layers)


def _standardised_splits(x: torch.Tensor, y: torch.Tensor) -> tuple[tuple, tuple, tuple]:
    n_train, n_val = SPLIT[0], SPLIT[0] + SPLIT[1]
    x = (x - x[:n_train].mean(0)) / x[:n_train].std(0)
    y = (y - y[:n_train].mean(0)) / y[:n_train].std(0)
    return (x[:n_train], y[:n_train]), (x[n_train:n_val], y[n_train:n_val]), (x[n_val:], y[n_val:])


def late_quadratic(seed: int = 0) -> Task:
    """5 relevant of 20 inputs: ``x0 + 0.8 x1 - 0.6 x2 + 0.7 sin(1.5 x3) + 0.5 (x4^2 - 1)`` plus
    small noise; MLP 20-64-64-1. The ``x4^2`` term (about 18% of the variance) is learned last."""
    g = torch.Generator().manual_seed(1000 + seed)
    x = torch.randn(sum(SPLIT), 20, generator=g)
    y = (x[:, 0] + 0.8 * x[:, 1] - 0.6 * x[:, 2] + 0.7 * torch.sin(1.5 * x[:, 3]) + 0.5 * (x[:, 4] ** 2 - 1)
         + 0.05 * torch.randn(sum(SPLIT), generator=g))[:, None]
    return Task("late_quadratic", *_standardised_splits(x, y), [0, 1, 2, 3, 4], lambda: mlp([20, 64, 64, 1]))


def four_of_fourteen(seed: int = 0) -> Task:
    """4 relevant of 14 inputs: ``tanh(x0 + x1) + 0.5 x2 x3`` plus small noise; MLP 14-64-64-1."""
    g = torch.Generator().manual_seed(2000 + seed)
    x = torch.randn(sum(SPLIT), 14, generator=g)
    y = (torch.tanh(x[:, 0] + x[:, 1]) + 0.5 * x[:, 2] * x[:, 3] + 0.05 * torch.randn(sum(SPLIT), generator=g))[:, None]
    return Task("four_of_fourteen", *_standardised_splits(x, y), [0, 1, 2, 3], lambda: mlp([14, 64, 64, 1]))


def cfd_flux_small(seed: int = 0) -> Task:
    """The built-in ``cfd_flux`` workload at 4000 training rows (6 relevant of 12 inputs), MLP
    12-64-64-3."""
    work = workloads.load("cfd_flux", n_train=SPLIT[0], n_val=SPLIT[1], n_test=SPLIT[2], seed=seed)
    relevant = [work.feature_names.index(f) for f in work.informative_features]
    return Task("cfd_flux", work.train, work.val, work.test, relevant, lambda: work.make_model(hidden=(64, 64)))


TASKS: dict[str, Callable[[int], Task]] = {
    "late_quadratic": late_quadratic,
    "four_of_fourteen": four_of_fourteen,
    "cfd_flux": cfd_flux_small,
}


def two_field_superres(n: int, seed: int, size: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    """``(x, y)``: x2 super-resolution of two smooth fields ``u``, ``v`` (Gaussian noise smoothed
    by a 7-point box, scaled by 3) from their 2x2 averages plus a noise channel; the target, three
    channels of ``u + v`` at full resolution, needs both fields."""
    g = torch.Generator().manual_seed(seed)
    fine = F.avg_pool2d(torch.randn(n, 2, 2 * size + 6, 2 * size + 6, generator=g), 7, stride=1) * 3
    x = torch.cat([F.avg_pool2d(fine, 2), torch.randn(n, 1, size, size, generator=g)], 1)
    return x, fine.sum(1, keepdim=True).expand(-1, 3, -1, -1).contiguous()


class ResidualMLP(nn.Module):
    """Pre-activation residual MLP (He et al. 2016, identity mappings), the kind MD and CFD
    surrogates use: ``Linear`` stem, ``blocks`` x ``[x + fc2(SiLU(fc1(SiLU(x))))]``, ReLU, head."""

    def __init__(self, n_in: int, n_out: int, width: int = 64, blocks: int = 3):
        super().__init__()
        self.stem = nn.Linear(n_in, width)
        self.blocks = nn.ModuleList(nn.ModuleDict({"fc1": nn.Linear(width, width), "fc2": nn.Linear(width, width)})
                                    for _ in range(blocks))
        self.act = nn.SiLU()
        self.head = nn.Linear(width, n_out)

    def forward(self, x):
        h = self.stem(x)
        for block in self.blocks:
            h = h + block["fc2"](self.act(block["fc1"](self.act(h))))
        return self.head(torch.relu(h))


def field_resnet(channels: int = 16, blocks: int = 3) -> nn.Sequential:
    """A one-resolution ResNet for field regression: 5x5 conv-BN-ReLU stem, ``blocks`` ResNet
    BasicBlocks (``tests/zoo_architectures.py``), a 3x3 conv head to one field."""
    from zoo_architectures import BasicBlock, ConvNormActivation

    return nn.Sequential(ConvNormActivation(3, channels, 5), *[BasicBlock(channels, channels) for _ in range(blocks)],
                         nn.Conv2d(channels, 1, 3, padding=1))


def field_product(n: int, seed: int, size: int = 12) -> tuple[torch.Tensor, torch.Tensor]:
    """``(x, y)``: smooth fields ``u``, ``v`` (Gaussian noise smoothed by a 5-point box, scaled by
    2.5) and a noise channel; the target, ``u v + u`` smoothed by a periodic 3-point box, needs both."""
    g = torch.Generator().manual_seed(seed)
    fields = F.avg_pool2d(torch.randn(n, 2, size + 4, size + 4, generator=g), 5, stride=1) * 2.5
    u, v = fields[:, :1], fields[:, 1:]
    y = F.avg_pool2d(F.pad(u * v + u, (1, 1, 1, 1), mode="circular"), 3, stride=1)
    return torch.cat([u, v, torch.randn(n, 1, size, size, generator=g)], 1), y


class SequenceRegressor(nn.Module):
    """A per-position sequence regressor as a user writes one: a linear embedding, an
    ``nn.TransformerEncoder`` (pre-norm, GELU, batch first), one ``nn.ReLU(inplace=True)`` used
    twice around a linear layer, a linear head. Input ``(B, T, n_inputs)``, output ``(B, T)``."""

    def __init__(self, n_inputs: int = 6, d_model: int = 32, layers: int = 2):
        super().__init__()
        self.embed = nn.Linear(n_inputs, d_model)
        layer = nn.TransformerEncoderLayer(d_model, nhead=4, dim_feedforward=2 * d_model, dropout=0.0,
                                           activation="gelu", batch_first=True, norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, num_layers=layers, enable_nested_tensor=False)
        self.act = nn.ReLU(inplace=True)
        self.mid = nn.Linear(d_model, d_model)
        self.head = nn.Linear(d_model, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.encoder(self.embed(x))
        return self.head(self.act(self.mid(self.act(h)))).squeeze(-1)


def sequence_product(n: int, seed: int, length: int = 12, n_inputs: int = 6) -> tuple[torch.Tensor, torch.Tensor]:
    """``(x, y)``: ``n`` sequences of ``n_inputs`` standard normal inputs; the target at each
    position is ``x0 x1`` there plus the sequence's mean of ``x0`` (attention needed). Inputs 2..
    are distractors."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, length, n_inputs, generator=g)
    return x, x[..., 0] * x[..., 1] + x[..., 0].mean(1, keepdim=True)
