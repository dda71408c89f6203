r"""``cfd_flux``: a surrogate for a finite-volume solver's ``compute_flux()`` (1D Euler, FC).

The CFD row of the LUMOS paper: an MLP that maps the left and right states at a cell
interface to the numerical flux through it. Ideal gas, ``gamma = 1.4``. For a primitive state
``(rho, u, p)`` the conserved state and physical flux are

.. math::
    U = (\rho,\ \rho u,\ E), \qquad E = \frac{p}{\gamma - 1} + \tfrac12 \rho u^2,
    \qquad F(U) = (\rho u,\ \rho u^2 + p,\ u (E + p)),

and the target is the Rusanov (local Lax-Friedrichs) flux

.. math::
    F^* = \tfrac12 \big(F(U_L) + F(U_R)\big) - \tfrac12 s_{max} (U_R - U_L),
    \qquad s_{max} = \max(|u_L| + c_L,\ |u_R| + c_R),\quad c = \sqrt{\gamma p / \rho}.

Inputs are sampled i.i.d. uniform: ``rho_L, rho_R`` in ``[0.5, 2]``, ``u_L, u_R`` in
``[-1, 1]``, ``p_L, p_R`` in ``[0.5, 2]`` (subsonic to transonic, no vacuum). Distractor
``distractor_k`` is an independent draw from the same uniform range as real input ``k % 6``,
so it has exactly the marginal distribution of a real input and differs only in that the
target does not depend on it.

Inputs and targets are standardised with the train split's mean and std. The statistics are
``workload.stats = {"x_mean", "x_scale", "y_mean", "y_scale"}`` (float64 tensors); undo with
``x = x_std * x_scale + x_mean`` (likewise ``y``).
"""
from __future__ import annotations

import torch
from torch import nn


from .base import R2_REGRESSION, Workload, fit_defaults, mlp, size_params, split_rows, standardise_table

GAMMA = 1.4
STATE_NAMES = ["rho_L", "u_L", "p_L", "rho_R", "u_R", "p_R"]
STATE_RANGES = [(0.5, 2.0), (-1.0, 1.0), (0.5, 2.0)] * 2  # rho, u, p for L then R
TARGET_NAMES = ["flux_mass", "flux_momentum", "flux_energy"]


def physical_flux(rho: torch.Tensor, u: torch.Tensor, p: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Conserved state ``U`` and Euler flux ``F(U)``, both ``(n, 3)``, from primitives ``(n,)``."""
    energy = p / (GAMMA - 1) + 0.5 * rho * u * u
    state = torch.stack([rho, rho * u, energy], dim=1)
    flux = torch.stack([rho * u, rho * u * u + p, u * (energy + p)], dim=1)
    return state, flux


def rusanov_flux(prim: torch.Tensor) -> torch.Tensor:
    """Rusanov flux ``(n, 3)`` from primitives ``(n, 6)`` ordered as :data:`STATE_NAMES`."""
    rho_l, u_l, p_l, rho_r, u_r, p_r = prim.unbind(dim=1)
    state_l, flux_l = physical_flux(rho_l, u_l, p_l)
    state_r, flux_r = physical_flux(rho_r, u_r, p_r)
    s_max = torch.maximum(u_l.abs() + torch.sqrt(GAMMA * p_l / rho_l),
                          u_r.abs() + torch.sqrt(GAMMA * p_r / rho_r))
    return 0.5 * (flux_l + flux_r) - 0.5 * s_max[:, None] * (state_r - state_l)


SIZES = {
    "small": dict(n_train=1500, n_val=300, n_test=300, n_distractors=6, hidden=(32, 32),
                  epochs=8, fine_tune_epochs=2, lr=3e-3, batch_size=64),
    "full": dict(n_train=20000, n_val=4000, n_test=4000, n_distractors=6, hidden=(256, 256, 256),
                 epochs=20, fine_tune_epochs=5, lr=1e-3, batch_size=256),
    # what `lumos demo` runs: big enough that compaction pays off on a 4096-row batch, small
    # enough to take seconds of CPU time (18 s CPU, 13 s wall on 2 idle-ish cores, measured)
    "demo": dict(n_train=10000, n_val=2000, n_test=4096, n_distractors=6, hidden=(256, 256),
                 epochs=12, fine_tune_epochs=3, lr=2e-3, batch_size=256),
}


def load(size: str = "full", *, seed: int = 0, **overrides) -> Workload:
    """Build the workload; same arguments give bitwise-identical tensors.

    Args:
        size: ``"small"`` (1,500 training rows, a 32x32 MLP), ``"demo"`` (10,000 rows,
            256x256; what ``lumos demo`` runs) or ``"full"`` (20,000 rows, 256x256x256), see
            :data:`SIZES`.
        seed: data seed.
        **overrides: any entry of :data:`SIZES` (``n_train``, ``n_val``, ``n_test``,
            ``n_distractors``, ``hidden``, ``epochs``, ...).

    Shapes: inputs ``(n, 6 + n_distractors)`` float32 (the 6 states first, then
    ``distractor_0..``), targets ``(n, 3)`` float32, both standardised with train statistics.
    """
    params = size_params(SIZES, size, overrides, "lumos.workloads.cfd_flux.load")
    n_train, n_val, n_test = params["n_train"], params["n_val"], params["n_test"]
    n_distractors = params["n_distractors"]
    n_total = n_train + n_val + n_test
    n_features = len(STATE_NAMES) + n_distractors
    gen = torch.Generator().manual_seed(seed)
    ranges = STATE_RANGES + [STATE_RANGES[k % 6] for k in range(n_distractors)]
    low = torch.tensor([lo for lo, _ in ranges], dtype=torch.float64)
    high = torch.tensor([hi for _, hi in ranges], dtype=torch.float64)
    x = low + (high - low) * torch.rand(n_total, n_features, generator=gen, dtype=torch.float64)
    y = rusanov_flux(x[:, :6])

    x, y, stats = standardise_table(x, y, n_train)
    train, val, test = split_rows(x, y, n_train, n_val)

    def make_model(hidden=params["hidden"], activation=nn.SiLU) -> nn.Sequential:
        """Dense MLP ``n_features -> hidden... -> 3`` with ``activation`` after each hidden layer."""
        return mlp(n_features, hidden, len(TARGET_NAMES), activation)

    return Workload(
        name="cfd_flux",
        description="1D Euler Rusanov-flux surrogate (CFD compute_flux), FC regression, R2",
        train=train, val=val, test=test,
        feature_names=STATE_NAMES + [f"distractor_{k}" for k in range(n_distractors)],
        informative_features=list(STATE_NAMES),
        target_names=list(TARGET_NAMES),
        make_model=make_model,
        **R2_REGRESSION,
        fit_defaults=fit_defaults(params),
        stats=stats,
        size=size,
        seed=seed,
    )

