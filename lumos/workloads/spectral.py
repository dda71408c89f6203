r"""Fields on periodic grids, made in Fourier space: Gaussian random fields, diffusion, blur.

Grid spacing 1, so a wavenumber ``k = 2 pi f`` with ``f`` the FFT frequency in cycles per
cell (``|k| <= pi * sqrt(d)``). Every function works in float64 on the last ``d`` dimensions
of its input and is deterministic given its inputs.
"""
from __future__ import annotations

import math

import torch


def wavenumbers(shape: tuple[int, ...], half: bool = True) -> torch.Tensor:
    """``|k|`` on the FFT grid of ``shape``: ``rfftn``'s half grid (``half=True``, last
    dimension ``shape[-1] // 2 + 1``) or the full ``fftn`` grid. float64."""
    axes = [torch.fft.fftfreq(n, dtype=torch.float64) for n in shape[:-1]]
    last = torch.fft.rfftfreq if half else torch.fft.fftfreq
    axes.append(last(shape[-1], dtype=torch.float64))
    grids = torch.meshgrid(*axes, indexing="ij")
    return 2 * math.pi * torch.sqrt(sum(g * g for g in grids))


def apply_transfer(fields: torch.Tensor, transfer: torch.Tensor, dims: int) -> torch.Tensor:
    """Multiply the Fourier transform of ``fields`` (over its last ``dims`` dimensions) by
    ``transfer`` (broadcast against the ``rfftn`` half grid) and transform back. float64."""
    shape = fields.shape[-dims:]
    axes = tuple(range(-dims, 0))
    spectrum = torch.fft.rfftn(fields.double(), dim=axes)
    return torch.fft.irfftn(spectrum * transfer, s=shape, dim=axes)


def gaussian_random_fields(n: int, shape: tuple[int, ...], power: torch.Tensor, sigma: torch.Tensor,
                           generator: torch.Generator) -> torch.Tensor:
    r"""``n`` periodic Gaussian random fields with power spectrum ``P_i(k) ∝ power[i]`` and
    variance ``sigma[i]**2`` per cell.

    White noise ``w`` (unit variance per cell) is filtered by ``sqrt(P(k))``: then
    ``E|delta_k|^2 = N P(k)`` for the ``N`` cells, and the variance per cell is the mean of
    ``P`` over the full ``fftn`` grid (Parseval), which sets the normalisation. ``P(0) = 0``
    (zero-mean fields).

    Args:
        power: ``(n, *half_grid)`` unnormalised spectra on the ``rfftn`` half grid of ``shape``
            (from :func:`wavenumbers`), non-negative.
        sigma: ``(n,)`` standard deviation per cell of each field.

    Returns:
        ``(n, *shape)`` float64.
    """
    dims = len(shape)
    power = power.clone()
    power[(slice(None),) + (0,) * dims] = 0.0
    # mean of P over the full grid: half-grid entries other than the k_last = 0 (and Nyquist)
    # plane stand for two full-grid entries each
    weight = torch.full(power.shape[-1:], 2.0, dtype=torch.float64)
    weight[0] = 1.0
    if shape[-1] % 2 == 0:
        weight[-1] = 1.0
    mean_power = (power * weight).sum(dim=tuple(range(1, dims + 1))) / math.prod(shape)
    scale = (sigma.double() ** 2 / mean_power).reshape((n,) + (1,) * dims)
    noise = torch.randn((n,) + tuple(shape), generator=generator, dtype=torch.float64)
    return apply_transfer(noise, torch.sqrt(power * scale), dims)
