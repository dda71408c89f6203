r"""``em_denoise``: denoise low-dose electron micrographs with a U-Net (image-to-image, MSE).

The EM-denoise row of the LUMOS paper, on synthetic micrographs. A specimen is a background
of level ``b`` in [0.2, 0.4] plus ``K`` particles (``K`` uniform in 3..``max_particles``),
each the projection of a uniform sphere of radius ``R`` (uniform in [1.5, 4] px) and density
``rho`` (uniform in [0.3, 1.0]) at a uniform position:

.. math::
    I(x) = b + \sum_p \rho_p \sqrt{\max\big(0,\ 1 - |x - x_p|^2 / R_p^2\big)}.

The microscope blurs it with a Gaussian point-spread function of ``sigma_psf = 1`` px (applied
periodically in Fourier space), giving the clean image ``c = PSF * I``, the target. The
detector records the exposure as a movie of two frames, each with half the electron dose
``d`` (uniform in [10, 40] electrons per pixel for the whole exposure) and Poisson counting
noise; a frame is reported in intensity units, ``Poisson(c * d / 2) / (d / 2)``. The best
estimate uses both frames (their sum is the sufficient statistic), so both are relevant.
``dark_frame`` is the detector's dark reference, Poisson counts of mean 1 recorded without a
specimen: it is what a detector delivers next to the movie, and known-irrelevant.

Inputs ``(n, 3, size, size)`` (``frame_0, frame_1, dark_frame``) are standardised per channel
with train statistics (``workload.stats``: ``x_mean``, ``x_scale``, shape ``(1, 3, 1, 1)``);
targets ``(n, 1, size, size)`` are the clean images in intensity units (not standardised), so
the metric is the MSE in those units.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..metrics import mse
from .base import Workload, fit_defaults, size_params, split_rows, standardise, uniform
from .spectral import apply_transfer, wavenumbers

PSF_SIGMA = 1.0
DOSE = (10.0, 40.0)
DARK_MEAN = 1.0
CHANNELS = ["frame_0", "frame_1"]


def specimens(n: int, size: int, max_particles: int, gen: torch.Generator) -> torch.Tensor:
    """``(n, size, size)`` float64 projected densities: background plus spherical particles."""
    coords = torch.arange(size, dtype=torch.float64)
    yy, xx = torch.meshgrid(coords, coords, indexing="ij")
    count = torch.randint(3, max_particles + 1, (n,), generator=gen)
    centres = size * torch.rand(n, max_particles, 2, generator=gen, dtype=torch.float64)
    radius = uniform(n * max_particles, (1.5, 4.0), gen).reshape(n, max_particles)
    density = uniform(n * max_particles, (0.3, 1.0), gen).reshape(n, max_particles)
    density = density * (torch.arange(max_particles)[None] < count[:, None])  # unused particles: 0
    image = uniform(n, (0.2, 0.4), gen)[:, None, None].expand(n, size, size).clone()
    for p in range(max_particles):  # one particle at a time: n * size^2 memory, not * max_particles
        dist2 = (yy - centres[:, p, 0, None, None]) ** 2 + (xx - centres[:, p, 1, None, None]) ** 2
        image += density[:, p, None, None] * torch.sqrt((1 - dist2 / radius[:, p, None, None] ** 2).clamp_min(0.0))
    return image


def blur(images: torch.Tensor, sigma: float = PSF_SIGMA) -> torch.Tensor:
    """Periodic Gaussian blur of ``(n, H, W)`` images: transfer function ``exp(-k^2 sigma^2 / 2)``."""
    k = wavenumbers(tuple(images.shape[-2:]))
    return apply_transfer(images, torch.exp(-0.5 * (k * sigma) ** 2), dims=2)


def record_frames(clean: torch.Tensor, half_dose: torch.Tensor, n_frames: int, gen: torch.Generator) -> list:
    """``n_frames`` detector frames of ``clean`` images ``(n, H, W)``, each ``Poisson(clean * half_dose)
    / half_dose`` (counts in intensity units; ``half_dose`` ``(n, 1, 1)`` electrons per pixel per frame)."""
    return [torch.poisson(clean * half_dose, generator=gen) / half_dose for _ in range(n_frames)]


def _double_conv(c_in: int, c_out: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, padding=1), nn.ReLU(), nn.Conv2d(c_out, c_out, 3, padding=1),
                         nn.ReLU())


class UNet(nn.Module):
    """Two-level U-Net: double 3x3 convs, max pooling, ConvTranspose2d upsampling, concatenated skips,
    a 1x1 output conv.

    Shapes: input ``(B, C, H, W)`` with ``H, W`` divisible by 4, output ``(B, n_out, H, W)``.
    """

    def __init__(self, in_channels: int, width: int = 8, n_out: int = 1):
        super().__init__()
        self.enc1 = _double_conv(in_channels, width)
        self.enc2 = _double_conv(width, 2 * width)
        self.bottom = _double_conv(2 * width, 4 * width)
        self.up2 = nn.ConvTranspose2d(4 * width, 2 * width, 2, stride=2)
        self.dec2 = _double_conv(4 * width, 2 * width)
        self.up1 = nn.ConvTranspose2d(2 * width, width, 2, stride=2)
        self.dec1 = _double_conv(2 * width, width)
        self.out = nn.Conv2d(width, n_out, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        e1 = self.enc1(x)
        e2 = self.enc2(F.max_pool2d(e1, 2))
        b = self.bottom(F.max_pool2d(e2, 2))
        d2 = self.dec2(torch.cat([self.up2(b), e2], dim=1))
        d1 = self.dec1(torch.cat([self.up1(d2), e1], dim=1))
        return self.out(d1)


SIZES = {
    "small": dict(n_train=192, n_val=64, n_test=64, image_size=16, max_particles=4, width=4,
                  epochs=16, fine_tune_epochs=4, lr=3e-3, batch_size=16),
    "full": dict(n_train=2048, n_val=512, n_test=512, image_size=32, max_particles=10, width=8,
                 epochs=20, fine_tune_epochs=5, lr=1e-3, batch_size=32),
}


def load(size: str = "full", *, seed: int = 0, **overrides) -> Workload:
    """Build the workload; same arguments give bitwise-identical tensors.

    Args:
        size: ``"small"`` (16x16 images) or ``"full"`` (32x32), see :data:`SIZES`.
        seed: data seed.
        **overrides: any entry of :data:`SIZES`.

    Shapes: inputs ``(n, 3, size, size)`` float32, targets ``(n, 1, size, size)`` float32.
    """
    params = size_params(SIZES, size, overrides, "lumos.workloads.em_denoise.load")
    side, n_train, n_val = params["image_size"], params["n_train"], params["n_val"]
    if side % 4:
        raise ValueError(f"lumos.workloads.em_denoise.load: `image_size` must be a multiple of 4, got {side}")
    n = n_train + n_val + params["n_test"]
    gen = torch.Generator().manual_seed(seed)
    clean = blur(specimens(n, side, params["max_particles"], gen)).clamp_min(0.0)
    half_dose = (0.5 * uniform(n, DOSE, gen)).reshape(n, 1, 1)
    frames = record_frames(clean, half_dose, len(CHANNELS), gen)
    dark = torch.poisson(torch.full(clean.shape, DARK_MEAN, dtype=torch.float64), generator=gen)
    x, x_stats = standardise(torch.stack(frames + [dark], dim=1), n_train, dims=(0, 2, 3))
    y = clean[:, None].float()
    train, val, test = split_rows(x, y, n_train, n_val)

    def make_model(width=params["width"]) -> UNet:
        """The dense U-Net for these micrographs."""
        return UNet(x.shape[1], width, 1)

    return Workload(
        name="em_denoise",
        description="denoise low-dose two-frame electron micrographs (Poisson noise, blurred particles), U-Net, MSE",
        train=train, val=val, test=test,
        feature_names=CHANNELS + ["dark_frame"],
        informative_features=list(CHANNELS),
        target_names=["clean"],
        make_model=make_model,
        loss_fn=nn.functional.mse_loss,
        metric=mse,
        metric_name="MSE",
        higher_is_better=False,
        fit_defaults=fit_defaults(params),
        stats={"x_mean": x_stats["mean"], "x_scale": x_stats["scale"]},
        feature_dim=1,
        size=size,
        seed=seed,
        unit="image",
    )
