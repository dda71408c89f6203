"""Triton kernel of hard_concrete: every gate of a flat buffer sampled in one launch.

Each program samples ``BLOCK`` gates: noise ``gate_uniform(seed, offset + i)`` (SplitMix64 in
uint64 arithmetic, bit-identical to ``lumos_kernels.hard_concrete.gate_uniform``; never
stored), the semi-stochastic mask, its derivative in ``log_alpha`` (what the backward needs,
so the mask itself is never saved and may be modified in place) and a partial sum of
``p_open`` that torch reduces (deterministic: no atomics).
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from ..dispatch import triton_interpreted
from ..hard_concrete import GOLDEN_GAMMA, MIX_MULTIPLIERS, MIX_SHIFTS, UNIFORM_BITS

_MIX_1, _MIX_2 = (tl.constexpr(m) for m in MIX_MULTIPLIERS)
_SHIFT_1, _SHIFT_2 = (tl.constexpr(s) for s in MIX_SHIFTS[:2])
_GOLDEN = tl.constexpr(GOLDEN_GAMMA)
_TOP_SHIFT = tl.constexpr(64 - UNIFORM_BITS)
_UNIFORM_SCALE = tl.constexpr(2.0 ** -UNIFORM_BITS)

BLOCK = 1024            # gates per program on a GPU
INTERPRET_BLOCK = 4096  # under the interpreter each program costs milliseconds


@triton.jit
def gate_uniform(key, counter):
    """fp32 uniforms in [0, 1): SplitMix64 seeded with ``key`` (int64), output number ``counter``
    (int64): ``(mix(key + (counter + 1) * GOLDEN) >> 40) * 2**-24``, all in uint64 arithmetic
    (wrapping multiplies, logical shifts)."""
    z = key.to(tl.int64).to(tl.uint64, bitcast=True) + (counter.to(tl.int64).to(tl.uint64, bitcast=True) + 1) * _GOLDEN
    z = (z ^ (z >> _SHIFT_1)) * _MIX_1
    z = (z ^ (z >> _SHIFT_2)) * _MIX_2
    # SplitMix64's last step, z ^ (z >> 31), leaves the top bits that make u unchanged
    return (z >> _TOP_SHIFT).to(tl.float32) * _UNIFORM_SCALE


@triton.jit(do_not_specialize=["seed", "offset"])
def hard_concrete_fwd_kernel(log_alpha_ptr, m_ptr, dm_ptr, p_open_part_ptr, n, seed: tl.int64, offset: tl.int64,
                             closed_max: tl.float64, open_min: tl.float64,
                             noise_lo, noise_scale, u_eps, inv_beta, gamma, zeta, log_ratio, dm_scale,
                             TRAINING: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    idx = pid * BLOCK + tl.arange(0, BLOCK)
    ok = idx < n
    acc_dtype = dm_ptr.dtype.element_ty  # fp32, or fp64 for fp64 logits
    log_alpha = tl.load(log_alpha_ptr + idx, mask=ok, other=0.0).to(acc_dtype)
    if TRAINING:
        # 64-bit counters, modulo 2**64 like the torch backend's
        u = noise_lo + noise_scale * gate_uniform(seed, offset.to(tl.int64) + idx).to(acc_dtype)
        u = tl.minimum(tl.maximum(u, u_eps), 1.0 - u_eps)
        s = tl.sigmoid((tl.log(u) - tl.log(1.0 - u) + log_alpha) * inv_beta)
    else:
        s = tl.sigmoid(log_alpha)
    z = tl.minimum(tl.maximum(s * (zeta - gamma) + gamma, 0.0), 1.0)
    # thresholds on log_alpha, exact for the logits' dtype (see log_alpha_bounds): a rounded
    # sigmoid compared with t_u would force different gates than the torch backend near it
    forced_open = log_alpha >= open_min
    forced_closed = log_alpha <= closed_max
    m = tl.where(forced_open, 1.0, tl.where(forced_closed, 0.0, z))
    live = ~forced_open & ~forced_closed & (z > 0.0) & (z < 1.0)
    dm = tl.where(live, (z - gamma) * (zeta - z) * dm_scale, 0.0)
    tl.store(m_ptr + idx, m.to(m_ptr.dtype.element_ty), mask=ok)
    tl.store(dm_ptr + idx, dm, mask=ok)
    p_open = tl.sigmoid(log_alpha - log_ratio)
    tl.store(p_open_part_ptr + pid, tl.sum(tl.where(ok, p_open, 0.0), axis=0))


def forward(log_alpha, seed, offset, training, closed_max, open_min, beta, gamma, zeta, noise_range,
            u_eps, acc_dtype):
    """``(m, dm, p_open_sum)`` of the op ``lumos::hard_concrete``; ``seed`` and ``offset`` int64."""
    flat = log_alpha.contiguous().view(-1)
    n = flat.numel()
    m = torch.empty(log_alpha.shape, dtype=log_alpha.dtype, device=log_alpha.device)
    dm = torch.empty(log_alpha.shape, dtype=acc_dtype, device=log_alpha.device)
    if n == 0:
        return m, dm, torch.zeros((), dtype=acc_dtype, device=log_alpha.device)
    block = INTERPRET_BLOCK if triton_interpreted() else BLOCK
    grid = (triton.cdiv(n, block),)
    partial = torch.empty(grid[0], dtype=acc_dtype, device=flat.device)
    hard_concrete_fwd_kernel[grid](
        flat, m, dm, partial, n, seed, offset, closed_max, open_min,
        noise_range, 1.0 - 2.0 * noise_range, u_eps, 1.0 / beta, gamma, zeta,
        beta * math.log(-gamma / zeta), 1.0 / ((zeta - gamma) * (beta if training else 1.0)),
        TRAINING=bool(training), BLOCK=block)
    return m, dm, partial.sum()
