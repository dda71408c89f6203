r"""``cosmo3d``: regress cosmological parameters from 3-D density fields (Conv3d + FC).

The CosmoFlow row of the LUMOS paper, on Gaussian random fields instead of N-body boxes. Each
sample is a periodic box of ``grid^3`` cells holding a matter density contrast ``delta``, a
Gaussian random field with power spectrum

.. math::
    P(k) = A\, k^{n}, \qquad k > 0,

with ``A`` set so that the field's rms per cell is ``sigma`` (the analogue of sigma_8), and a
galaxy density contrast from linear bias plus shot noise,

.. math::
    \delta_g = b\, \delta + \epsilon, \qquad \epsilon \sim \mathcal N(0, 1/\bar n),
    \quad \bar n = 4 \text{ galaxies per cell}

(the Gaussian limit of Poisson shot noise). The targets are ``(sigma, n, b)``, drawn uniform
in [0.5, 1.5], [-2.5, -1.0] and [1, 3]. Both channels are needed: ``delta`` fixes sigma and
n, and only the ratio of the two fields fixes b (``delta_g`` alone cannot tell ``b`` from
``sigma``). Distractor channels: ``distractor_k`` is the density field of an unrelated box (a
GRF with its own sigma and n from the same priors): the same statistics as ``delta``,
independent of the targets.

Inputs ``(n, 2 + n_distractors, grid, grid, grid)`` are standardised per channel and targets
per column with train statistics (``workload.stats``: ``x_mean``, ``x_scale`` of shape
``(1, C, 1, 1, 1)``; ``y_mean``, ``y_scale`` of shape ``(1, 3)``; float64).
"""
from __future__ import annotations

import torch
from torch import nn

from .base import R2_REGRESSION, Workload, fit_defaults, size_params, split_rows, standardise, uniform
from .spectral import gaussian_random_fields, wavenumbers

PRIORS = {"sigma": (0.5, 1.5), "n": (-2.5, -1.0), "b": (1.0, 3.0)}
SHOT_NOISE_STD = 0.5  # 1 / sqrt(4 galaxies per cell)
CHANNELS = ["delta", "delta_g"]


def density_fields(sigma: torch.Tensor, slope: torch.Tensor, grid: int, gen: torch.Generator) -> torch.Tensor:
    """Periodic GRFs ``(n, grid, grid, grid)`` float64 with ``P(k) ∝ k^slope`` and rms ``sigma`` (each ``(n,)``)."""
    k = wavenumbers((grid,) * 3)
    log_k = torch.log(k.clamp_min(1e-12))
    power = torch.exp(slope.double().reshape(-1, 1, 1, 1) * log_k)
    return gaussian_random_fields(len(sigma), (grid,) * 3, power, sigma, gen)


class CosmoFlowNet(nn.Module):
    """CosmoFlow-style regressor: 3 x (Conv3d 3^3, LeakyReLU, AvgPool3d 2), flatten, 2 FC + output.

    Shapes: input ``(B, C, G, G, G)`` with ``G`` divisible by 8, output ``(B, n_out)``.
    """

    def __init__(self, in_channels: int, grid: int, width: int = 8, fc: tuple[int, int] = (64, 32), n_out: int = 3):
        super().__init__()
        widths = [in_channels, width, 2 * width, 4 * width]
        layers = []
        for c_in, c_out in zip(widths, widths[1:]):
            layers += [nn.Conv3d(c_in, c_out, 3, padding=1), nn.LeakyReLU(0.1), nn.AvgPool3d(2)]
        self.features = nn.Sequential(*layers)
        flat = widths[-1] * (grid // 8) ** 3
        self.head = nn.Sequential(nn.Linear(flat, fc[0]), nn.LeakyReLU(0.1), nn.Linear(fc[0], fc[1]),
                                  nn.LeakyReLU(0.1), nn.Linear(fc[1], n_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.flatten(self.features(x), 1))


SIZES = {
    "small": dict(n_train=192, n_val=64, n_test=64, grid=8, n_distractors=1, width=4, fc=(16, 16),
                  epochs=16, fine_tune_epochs=4, lr=3e-3, batch_size=16),
    "full": dict(n_train=2048, n_val=512, n_test=512, grid=16, n_distractors=2, width=8, fc=(64, 32),
                 epochs=20, fine_tune_epochs=5, lr=1e-3, batch_size=32),
}


def load(size: str = "full", *, seed: int = 0, **overrides) -> Workload:
    """Build the workload; same arguments give bitwise-identical tensors.

    Args:
        size: ``"small"`` (8^3 boxes) or ``"full"`` (16^3 boxes), see :data:`SIZES`.
        seed: data seed.
        **overrides: any entry of :data:`SIZES`.

    Shapes: inputs ``(n, 2 + n_distractors, grid, grid, grid)`` float32, targets ``(n, 3)``.
    """
    params = size_params(SIZES, size, overrides, "lumos.workloads.cosmo3d.load")
    grid, n_train, n_val = params["grid"], params["n_train"], params["n_val"]
    if grid % 8:
        raise ValueError(f"lumos.workloads.cosmo3d.load: `grid` must be a multiple of 8, got {grid}")
    n = n_train + n_val + params["n_test"]
    gen = torch.Generator().manual_seed(seed)
    theta = {name: uniform(n, prior, gen) for name, prior in PRIORS.items()}
    delta = density_fields(theta["sigma"], theta["n"], grid, gen)
    shot = SHOT_NOISE_STD * torch.randn(delta.shape, generator=gen, dtype=torch.float64)
    delta_g = theta["b"].reshape(-1, 1, 1, 1) * delta + shot
    channels = [delta, delta_g]
    for _ in range(params["n_distractors"]):
        channels.append(density_fields(uniform(n, PRIORS["sigma"], gen), uniform(n, PRIORS["n"], gen), grid, gen))
    x, x_stats = standardise(torch.stack(channels, dim=1), n_train, dims=(0, 2, 3, 4))
    y, y_stats = standardise(torch.stack([theta[k] for k in PRIORS], dim=1), n_train)
    stats = {"x_mean": x_stats["mean"], "x_scale": x_stats["scale"],
             "y_mean": y_stats["mean"], "y_scale": y_stats["scale"]}
    train, val, test = split_rows(x, y, n_train, n_val)
    n_channels = x.shape[1]

    def make_model(width=params["width"], fc=params["fc"]) -> CosmoFlowNet:
        """The dense CosmoFlow-style network for these boxes."""
        return CosmoFlowNet(n_channels, grid, width, fc, len(PRIORS))

    return Workload(
        name="cosmo3d",
        description="sigma, slope and galaxy bias of 3-D Gaussian random density fields (CosmoFlow), Conv3d+FC, R2",
        train=train, val=val, test=test,
        feature_names=CHANNELS + [f"distractor_{k}" for k in range(params["n_distractors"])],
        informative_features=list(CHANNELS),
        target_names=list(PRIORS),
        make_model=make_model,
        **R2_REGRESSION,
        fit_defaults=fit_defaults(params),
        stats=stats,
        feature_dim=1,
        size=size,
        seed=seed,
        unit="box",
    )
