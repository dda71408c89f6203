"""Hard-concrete gate sampling with semi-stochastic thresholds (Louizos et al. 2018; LUMOS).

For gates with logits ``log_alpha`` (any shape), with ``pi = p_open(log_alpha)``:

    training:  z = clamp(sigmoid((logit(u) + log_alpha) / beta) * (zeta - gamma) + gamma, 0, 1)
    eval:      z = clamp(sigmoid(log_alpha) * (zeta - gamma) + gamma, 0, 1)          (z_hat)
    m = 1 if pi > t_u;  m = 0 if pi <= t_l;  m = z otherwise

``u`` comes from Philox (the generator behind ``tl.rand``) keyed by ``(seed, offset + i)`` for
gate ``i``: the same ``(seed, offset)`` gives the same mask on every backend, and nothing
random is stored. ``noise_range = r`` draws ``u ~ U(r, 1 - r)`` (the LUMOS reference code's
annealed variant: r = 0.5 is deterministic, r -> 0 the full hard-concrete).
"""
from __future__ import annotations

import math

import torch

from . import dispatch

BETA = 2.0 / 3.0
GAMMA = -0.1
ZETA = 1.1
T_LOW = 0.05
T_UP = 0.95
U_EPS = 1e-6  # tl.rand can return exactly 0: keep log(u) and log(1 - u) finite

_PHILOX_KEY_A = 0x9E3779B9
_PHILOX_KEY_B = 0xBB67AE85
_PHILOX_ROUND_A = 0xD2511F53
_PHILOX_ROUND_B = 0xCD9E8D57
_MASK32 = 0xFFFFFFFF


def _umulhi32(a: int, b: torch.Tensor) -> torch.Tensor:
    """High 32 bits of the 64-bit product of uint32 values held in int64 (no overflow)."""
    a_hi, a_lo = a >> 16, a & 0xFFFF
    b_hi, b_lo = b >> 16, b & 0xFFFF
    cross = ((a_lo * b_lo) >> 16) + ((a_hi * b_lo) & 0xFFFF) + a_lo * b_hi
    return a_hi * b_hi + ((a_hi * b_lo) >> 16) + (cross >> 16)


def philox_uniform(seed: int, offset: int, n: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """``n`` uniforms in [0, 1), bit-identical to Triton's ``tl.rand(seed, offset + arange(n))``.

    Returns a float32 tensor of shape ``(n,)``. Offsets are taken modulo 2**32, as in
    ``tl.rand`` with int32 offsets.
    """
    seed = int(seed) & 0xFFFFFFFFFFFFFFFF
    c0 = (torch.arange(n, dtype=torch.int64, device=device) + int(offset)) & _MASK32
    c1 = torch.zeros_like(c0)
    c2 = torch.zeros_like(c0)
    c3 = torch.zeros_like(c0)
    k0, k1 = seed & _MASK32, (seed >> 32) & _MASK32
    for _ in range(10):
        prev_c0, prev_c2 = c0, c2
        c0 = _umulhi32(_PHILOX_ROUND_B, prev_c2) ^ c1 ^ k0
        c2 = _umulhi32(_PHILOX_ROUND_A, prev_c0) ^ c3 ^ k1
        c1 = (_PHILOX_ROUND_B * prev_c2) & _MASK32
        c3 = (_PHILOX_ROUND_A * prev_c0) & _MASK32
        k0 = (k0 + _PHILOX_KEY_A) & _MASK32
        k1 = (k1 + _PHILOX_KEY_B) & _MASK32
    signed = torch.where(c0 >= 2**31, c0 - 2**32, c0)
    signed = torch.where(signed < 0, -signed - 1, signed).to(torch.int32)
    return signed.to(torch.float32) * torch.tensor(4.6566127342e-10, dtype=torch.float32, device=device)


def p_open(log_alpha: torch.Tensor, beta: float = BETA, gamma: float = GAMMA, zeta: float = ZETA) -> torch.Tensor:
    """Probability that each gate is non-zero: ``sigmoid(log_alpha - beta * log(-gamma / zeta))``."""
    return torch.sigmoid(log_alpha - beta * math.log(-gamma / zeta))


def _check_params(t_l: float, t_u: float, beta: float, gamma: float, zeta: float, noise_range: float) -> None:
    if not 0.0 <= t_l < t_u <= 1.0:
        raise ValueError(f"hard_concrete: thresholds must satisfy 0 <= t_l < t_u <= 1, got t_l={t_l}, t_u={t_u}")
    if beta <= 0:
        raise ValueError(f"hard_concrete: temperature `beta` must be > 0, got {beta}")
    if not gamma < 0 < 1 < zeta:
        raise ValueError(f"hard_concrete: stretch needs gamma < 0 and zeta > 1, got gamma={gamma}, zeta={zeta}")
    if not 0.0 <= noise_range <= 0.5:
        raise ValueError(f"hard_concrete: `noise_range` must be in [0, 0.5], got {noise_range}")


class _HardConcreteReference(torch.autograd.Function):
    """Torch reference; saves the mask only (the gradient needs nothing else, KERNELS.md 1)."""

    @staticmethod
    def forward(ctx, log_alpha, seed, offset, training, t_l, t_u, beta, gamma, zeta, noise_range):
        if training:
            u = philox_uniform(seed, offset, log_alpha.numel(), log_alpha.device)
            u = (noise_range + (1.0 - 2.0 * noise_range) * u).to(log_alpha.dtype).view_as(log_alpha)
            u = u.clamp(U_EPS, 1.0 - U_EPS)
            s = torch.sigmoid((torch.log(u) - torch.log1p(-u) + log_alpha) / beta)
        else:
            s = torch.sigmoid(log_alpha)
        z = (s * (zeta - gamma) + gamma).clamp(0.0, 1.0)
        pi = p_open(log_alpha, beta, gamma, zeta)
        m = torch.where(pi > t_u, torch.ones_like(z), torch.where(pi <= t_l, torch.zeros_like(z), z))
        in_band = (pi > t_l) & (pi <= t_u)
        ctx.save_for_backward(m, in_band)
        # d sigmoid(t / b) / dt = s (1 - s) / b; eval uses sigmoid(log_alpha), i.e. b = 1.
        ctx.scale = 1.0 / ((zeta - gamma) * (beta if training else 1.0))
        ctx.gamma, ctx.zeta = gamma, zeta
        return m

    @staticmethod
    def backward(ctx, grad_m):
        m, in_band = ctx.saved_tensors
        live = in_band & (m > 0) & (m < 1)
        dm = (m - ctx.gamma) * (ctx.zeta - m) * ctx.scale
        grad = torch.where(live, grad_m * dm, torch.zeros_like(grad_m))
        return grad, None, None, None, None, None, None, None, None, None


def hard_concrete_reference(log_alpha, seed, offset, training, t_l=T_LOW, t_u=T_UP,
                            beta=BETA, gamma=GAMMA, zeta=ZETA, noise_range=0.0):
    """Torch reference of :func:`hard_concrete` (same signature, any device)."""
    return _HardConcreteReference.apply(log_alpha, int(seed), int(offset), bool(training),
                                        float(t_l), float(t_u), float(beta), float(gamma),
                                        float(zeta), float(noise_range))


def hard_concrete(log_alpha: torch.Tensor, seed: int, offset: int = 0, training: bool = True,
                  t_l: float = T_LOW, t_u: float = T_UP, beta: float = BETA, gamma: float = GAMMA,
                  zeta: float = ZETA, noise_range: float = 0.0) -> torch.Tensor:
    """Sample semi-stochastic hard-concrete gates.

    Args:
        log_alpha: gate logits, any shape (typically ``(n,)`` or one flat buffer for a model).
        seed, offset: Philox key and counter start; gate ``i`` uses counter ``offset + i``.
        training: stochastic sample if True, deterministic ``z_hat`` if False (thresholds apply
            in both).
        t_l, t_u: semi-stochastic thresholds on ``p_open``: at or below ``t_l`` the mask is 0,
            above ``t_u`` it is 1, in between it is the hard-concrete value.
        beta, gamma, zeta: temperature and stretch of the hard-concrete distribution.
        noise_range: ``u ~ U(noise_range, 1 - noise_range)``; 0 is the full distribution.

    Returns:
        ``m``, same shape and dtype as ``log_alpha``, values in [0, 1], differentiable in
        ``log_alpha`` where ``0 < m < 1`` inside the band.
    """
    op = "hard_concrete"
    if not isinstance(log_alpha, torch.Tensor):
        raise TypeError(f"{op}: `log_alpha` must be a tensor, got {type(log_alpha).__name__}")
    dispatch.check_float(op, "log_alpha", log_alpha)
    _check_params(t_l, t_u, beta, gamma, zeta, noise_range)
    if dispatch.backend_for(op, log_alpha) == "triton":
        raise dispatch.triton_not_built(op)
    return hard_concrete_reference(log_alpha, seed, offset, training, t_l, t_u, beta, gamma, zeta, noise_range)
