"""Built-in SciML workloads, generated offline and deterministically from a seed.

``lumos.workloads.load("cfd_flux", size="small", seed=0)`` returns a :class:`Workload`;
``available()`` lists the names and ``describe()`` gives one line per workload.

=============  ========================================================  ===============  ========
name           physics                                                   model            metric
=============  ========================================================  ===============  ========
cfd_flux       Rusanov flux of the 1-D Euler equations                   MLP              R2
md_forces      Morse bonds + harmonic angle forces of a 3-atom fragment  MLP              R2
cosmo3d        3-D Gaussian random fields: rms, spectral slope, bias     Conv3d + FC      R2
em_denoise     blurred particles under Poisson (low-dose) noise          U-Net            MSE
molecules      bond-additivity atomization enthalpy of molecule graphs   GINE             R2
vit_fields     Lewis-number regime of two diffusing 2-D fields           ViT              accuracy
=============  ========================================================  ===============  ========
"""
from __future__ import annotations

from . import cfd_flux, cosmo3d, em_denoise, md_forces, molecules, vit_fields
from .base import SIZES, Workload

WORKLOADS = {module.__name__.rsplit(".", 1)[1]: module.load
             for module in (cfd_flux, md_forces, cosmo3d, em_denoise, molecules, vit_fields)}
DESCRIPTIONS = {
    "cfd_flux": "Euler-equation Rusanov flux surrogate (CFD), MLP, R2; 6 states + 6 distractor inputs",
    "md_forces": "Morse/harmonic bonded forces of a 3-atom fragment (MD), MLP, R2; masses/speeds are distractors",
    "cosmo3d": "rms, slope and bias of 3-D Gaussian random density fields (CosmoFlow), Conv3d+FC, R2",
    "em_denoise": "denoise low-dose two-frame electron micrographs, U-Net, MSE; the dark frame is a distractor",
    "molecules": "bond-additivity atomization enthalpy of molecule graphs, GINE, R2",
    "vit_fields": "Lewis-number regime of two diffusing 2-D fields, ViT, accuracy",
}


def available() -> list[str]:
    """Names of the built-in workloads, in the order of the LUMOS paper's table."""
    return list(WORKLOADS)


def describe(name: str) -> str:
    """One line saying what workload ``name`` is (physics, model, metric)."""
    _check_name(name, "lumos.workloads.describe")
    return DESCRIPTIONS[name]


def _check_name(name: str, who: str) -> None:
    if name not in WORKLOADS:
        raise ValueError(f"{who}: unknown workload {name!r}; known workloads: {', '.join(available())}")


def load(name: str, size: str = "full", *, seed: int = 0, **kwargs) -> Workload:
    """Build workload ``name`` at ``size`` (``"small"`` for tests, ``"full"`` for real runs) from
    ``seed``; ``kwargs`` override entries of the workload's ``SIZES`` table (e.g. ``n_train=``)."""
    _check_name(name, "lumos.workloads.load")
    return WORKLOADS[name](size, seed=seed, **kwargs)


__all__ = ["SIZES", "WORKLOADS", "Workload", "available", "describe", "load"]
