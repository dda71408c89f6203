"""Hard-concrete gate sampling with semi-stochastic thresholds (Louizos et al. 2018; LUMOS).

For gates with logits ``log_alpha`` (any shape), with ``pi = p_open(log_alpha)``:

    training:  z = clamp(sigmoid((logit(u) + log_alpha) / beta) * (zeta - gamma) + gamma, 0, 1)
    eval:      z = clamp(sigmoid(log_alpha) * (zeta - gamma) + gamma, 0, 1)          (z_hat)
    m = 1 if pi > t_u;  m = 0 if pi <= t_l;  m = z otherwise

``u`` comes from Philox (the generator behind ``tl.rand``) keyed by ``seed`` at counter
``offset + i`` for the gate at flat (row-major) position ``i``. Nothing random is stored, and
a gate's mask depends only on its logit and on ``(seed, offset + i)``. ``noise_range = r``
draws ``u ~ U(r, 1 - r)`` (the LUMOS reference code's annealed variant: r = 0.5 is
deterministic, r -> 0 the full hard-concrete).

The thresholds are applied to ``log_alpha``, not to a rounded ``pi``: ``pi > t_u`` exactly when
``log_alpha >= open_min`` and ``pi <= t_l`` exactly when ``log_alpha <= closed_max``, with the
bounds of :func:`log_alpha_bounds` computed once in float64 and rounded to the logits' dtype in
the safe direction. Every backend therefore forces the same gates, bit for bit.

Backward: ``dm/dlog_alpha = (z - gamma)(zeta - z) / ((zeta - gamma) beta)`` for gates in the
band with ``0 < z < 1`` (``beta`` is 1 in eval), 0 otherwise (KERNELS.md 1); the forward
writes it (one float per gate) so that the mask is never saved and may be modified in place.
The penalty term's gradient is ``p_open (1 - p_open)``. Both backends share that backward.

Triton backend (CUDA tensors, or CPU tensors under ``TRITON_INTERPRET=1``): one launch
samples every gate of a flat buffer (layers keep views into it) and fuses ``sum p_open``,
accumulated in fp32 (fp64 for fp64 logits) from per-program partial sums (no atomics). The
kernel computes in fp32 (fp64 for fp64 logits) and stores the mask in the logits' dtype; its
uniforms are bit-identical to :func:`philox_uniform`, its mask equals the reference's to float
rounding (``log``/``sigmoid`` implementations differ by an ulp), with the same forced gates.
"""
from __future__ import annotations

import math
from typing import Tuple

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


def check_gate_params(t_l: float, t_u: float, beta: float, gamma: float, zeta: float, noise_range: float) -> None:
    """Raise ValueError naming the first hard-concrete parameter out of its range."""
    if not 0.0 <= t_l < t_u <= 1.0:
        raise ValueError(f"hard_concrete: thresholds must satisfy 0 <= t_l < t_u <= 1, got t_l={t_l}, t_u={t_u}")
    if beta <= 0:
        raise ValueError(f"hard_concrete: temperature `beta` must be > 0, got {beta}")
    if not gamma < 0 < 1 < zeta:
        raise ValueError(f"hard_concrete: stretch needs gamma < 0 and zeta > 1, got gamma={gamma}, zeta={zeta}")
    if not 0.0 <= noise_range <= 0.5:
        raise ValueError(f"hard_concrete: `noise_range` must be in [0, 0.5], got {noise_range}")


def _compute_dtype(log_alpha: torch.Tensor) -> torch.dtype:
    """Gates are computed, and ``sum p_open`` accumulated, in fp32 (fp64 for fp64 logits)."""
    return torch.float64 if log_alpha.dtype == torch.float64 else torch.float32


def _nearest_on_side(value: float, dtype: torch.dtype, above: bool) -> float:
    """The ``dtype`` number nearest ``value`` that is strictly above it (``above``), or at or below it."""
    rounded = torch.tensor(value, dtype=torch.float64).to(dtype)
    wrong_side = rounded.item() <= value if above else rounded.item() > value
    if wrong_side:
        rounded = torch.nextafter(rounded, torch.tensor(math.inf if above else -math.inf, dtype=dtype))
    return rounded.item()


def log_alpha_bounds(t_l: float = T_LOW, t_u: float = T_UP, beta: float = BETA, gamma: float = GAMMA,
                     zeta: float = ZETA, dtype: torch.dtype = torch.float32) -> Tuple[float, float]:
    """``(closed_max, open_min)``: the thresholds on ``p_open`` as exact bounds on ``log_alpha``.

    For a logit ``x`` of ``dtype`` (fp32 also stands for fp16 and bf16, which convert to it
    exactly), ``p_open(x) <= t_l`` exactly when ``x <= closed_max`` and ``p_open(x) > t_u``
    exactly when ``x >= open_min`` (``p_open`` evaluated without rounding; the boundaries
    ``logit(t) + beta * log(-gamma / zeta)`` are computed in float64). ``t_u = 1`` forces no
    gate open: ``open_min`` is NaN, which no comparison satisfies.
    """
    shift = beta * math.log(-gamma / zeta)  # p_open = sigmoid(log_alpha - shift)

    def logit(t):
        return -math.inf if t <= 0 else math.inf if t >= 1 else math.log(t) - math.log1p(-t)

    closed_max = _nearest_on_side(shift + logit(t_l), dtype, above=False)
    open_min = math.nan if t_u >= 1 else _nearest_on_side(shift + logit(t_u), dtype, above=True)
    return closed_max, open_min


def _gate_values(log_alpha, seed, offset, training, t_l, t_u, beta, gamma, zeta, noise_range):
    """``(m, z, forced)`` in the compute dtype, differentiable in ``log_alpha`` (torch ops only)."""
    work = log_alpha.to(_compute_dtype(log_alpha))
    if training:
        u = philox_uniform(seed, offset, work.numel(), work.device).to(work.dtype).view(work.shape)
        u = (noise_range + (1.0 - 2.0 * noise_range) * u).clamp(U_EPS, 1.0 - U_EPS)
        s = torch.sigmoid((torch.log(u) - torch.log1p(-u) + work) / beta)
    else:
        s = torch.sigmoid(work)
    z = (s * (zeta - gamma) + gamma).clamp(0.0, 1.0)
    closed_max, open_min = log_alpha_bounds(t_l, t_u, beta, gamma, zeta, work.dtype)
    forced_open, forced_closed = work >= open_min, work <= closed_max
    m = torch.where(forced_open, 1.0, torch.where(forced_closed, 0.0, z))
    return m, z, forced_open | forced_closed


def hard_concrete_reference(log_alpha, seed, offset, training, t_l=T_LOW, t_u=T_UP,
                            beta=BETA, gamma=GAMMA, zeta=ZETA, noise_range=0.0):
    """Plain-torch :func:`hard_concrete` (same arguments, any device; gradients from autograd).

    The test oracle: its gradient is autograd's derivative of the sampling formula, independent
    of the closed-form derivative the op's backward uses.
    """
    m, _, _ = _gate_values(log_alpha, int(seed), int(offset), bool(training), float(t_l), float(t_u),
                           float(beta), float(gamma), float(zeta), float(noise_range))
    return m.to(log_alpha.dtype)


def _forward_torch(log_alpha, seed, offset, training, t_l, t_u, beta, gamma, zeta, noise_range):
    """The torch backend: ``(m, dm/dlog_alpha, sum p_open)`` with the closed-form derivative."""
    with torch.no_grad():
        m, z, forced = _gate_values(log_alpha, seed, offset, training, t_l, t_u, beta, gamma, zeta, noise_range)
        live = ~forced & (z > 0) & (z < 1)
        dm = torch.where(live, (z - gamma) * (zeta - z) / ((zeta - gamma) * (beta if training else 1.0)), 0.0)
        p_open_sum = p_open(log_alpha.to(dm.dtype), beta, gamma, zeta).sum()
    return m.to(log_alpha.dtype).contiguous(), dm.contiguous(), p_open_sum


def _as_int32(value: int) -> int:
    """``value mod 2**32`` as a signed int32, so the kernel's counters wrap like the reference's."""
    value = int(value) & 0xFFFFFFFF
    return value - (1 << 32) if value >= (1 << 31) else value


def _as_int64(value: int) -> int:
    """The 64-bit Philox key of ``philox_uniform`` as a signed int64 (a custom-op ``int``)."""
    value = int(value) & 0xFFFFFFFFFFFFFFFF
    return value - (1 << 64) if value >= (1 << 63) else value


# ----------------------------------------------------------------------------------------
# The custom op (both backends) and its one backward
# ----------------------------------------------------------------------------------------

@torch.library.custom_op("lumos::hard_concrete", mutates_args=())
def _hard_concrete_op(log_alpha: torch.Tensor, seed: torch.Tensor, offset: int, training: bool, t_l: float,
                      t_u: float, beta: float, gamma: float, zeta: float, noise_range: float,
                      backend: str) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    # the seed travels as a tensor so that a compiled model can draw it in-graph each step
    seed = _as_int64(int(seed))
    if backend == "triton":
        acc = _compute_dtype(log_alpha)
        closed_max, open_min = log_alpha_bounds(t_l, t_u, beta, gamma, zeta, acc)
        return dispatch.triton_kernels("hard_concrete").forward(
            log_alpha, seed, offset, training, closed_max, open_min, beta, gamma, zeta, noise_range, U_EPS, acc)
    return _forward_torch(log_alpha, seed, offset, training, t_l, t_u, beta, gamma, zeta, noise_range)


@_hard_concrete_op.register_fake
def _(log_alpha, seed, offset, training, t_l, t_u, beta, gamma, zeta, noise_range, backend):
    acc = _compute_dtype(log_alpha)
    return (torch.empty_like(log_alpha, memory_format=torch.contiguous_format),
            torch.empty_like(log_alpha, dtype=acc, memory_format=torch.contiguous_format),
            log_alpha.new_empty((), dtype=acc))


def _hard_concrete_setup_context(ctx, inputs, output):
    log_alpha, _seed, _offset, _training, _t_l, _t_u, beta, gamma, zeta, _noise, _backend = inputs
    ctx.save_for_backward(log_alpha, output[1])
    ctx.mark_non_differentiable(output[1])
    ctx.distribution = (beta, gamma, zeta)


def _hard_concrete_backward(ctx, grad_m, _grad_dm, grad_sum):
    """``grad_m * dm/dlog_alpha + grad_sum * p_open (1 - p_open)``, in the compute dtype."""
    log_alpha, dm = ctx.saved_tensors
    grad = grad_m.to(dm.dtype) * dm if grad_m is not None else torch.zeros_like(dm)
    if grad_sum is not None:
        pi = p_open(log_alpha.to(dm.dtype), *ctx.distribution)
        grad = grad + grad_sum.to(dm.dtype) * pi * (1 - pi)
    return (grad.to(log_alpha.dtype),) + (None,) * 10


_hard_concrete_op.register_autograd(_hard_concrete_backward, setup_context=_hard_concrete_setup_context)


def hard_concrete(log_alpha: torch.Tensor, seed: int | torch.Tensor, offset: int = 0, training: bool = True,
                  t_l: float = T_LOW, t_u: float = T_UP, beta: float = BETA, gamma: float = GAMMA,
                  zeta: float = ZETA, noise_range: float = 0.0,
                  return_p_open_sum: bool = False) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Sample semi-stochastic hard-concrete gates.

    Noise contract: the gate at flat (row-major) position ``i`` of ``log_alpha`` draws its
    uniform from Philox with key ``seed`` at counter ``(offset + i) mod 2**32``, so its mask
    depends only on its own logit and on ``(seed, offset + i)``. The gates of a model can live
    in one flat buffer sampled in one call, or be sampled layer by layer: the slice
    ``buffer[a:b]`` sampled alone with ``offset + a`` gives exactly ``mask[a:b]`` of the whole
    buffer sampled with ``offset``. Same ``(seed, offset)``, same mask, on every backend.

    Args:
        log_alpha: gate logits, any shape (typically ``(n,)`` or one flat buffer for a model).
        seed: Philox key: an int, or a one-element integer tensor (so that a compiled model
            can draw it in-graph).
        offset: counter of the first gate (see the noise contract).
        training: stochastic sample if True, deterministic ``z_hat`` if False (thresholds apply
            in both).
        t_l, t_u: semi-stochastic thresholds on ``p_open``: at or below ``t_l`` the mask is 0,
            above ``t_u`` it is 1, in between it is the hard-concrete value.
        beta, gamma, zeta: temperature and stretch of the hard-concrete distribution.
        noise_range: ``u ~ U(noise_range, 1 - noise_range)``; 0 is the full distribution.
        return_p_open_sum: also return ``p_open(log_alpha).sum()`` (the expected-L0 penalty with
            unit costs), fused into the sampling pass on the Triton backend.

    Returns:
        ``m``, a new tensor of the shape and dtype of ``log_alpha`` (safe to modify in place),
        values in [0, 1], differentiable in ``log_alpha`` where ``0 < m < 1`` inside the band;
        with ``return_p_open_sum``, the pair ``(m, p_open_sum)``: ``p_open_sum`` is a 0-dim
        float32 tensor (float64 for float64 logits) whatever the logits' dtype, accumulated in
        that precision, differentiable in ``log_alpha``.
    """
    op = "hard_concrete"
    if not isinstance(log_alpha, torch.Tensor):
        raise TypeError(f"{op}: `log_alpha` must be a tensor, got {type(log_alpha).__name__}")
    dispatch.check_float(op, "log_alpha", log_alpha)
    check_gate_params(t_l, t_u, beta, gamma, zeta, noise_range)
    if isinstance(seed, torch.Tensor):
        if seed.numel() != 1 or seed.is_floating_point() or seed.is_complex():
            raise TypeError(f"{op}: `seed` must be an int or a one-element integer tensor, got {seed.dtype} "
                            f"of shape {tuple(seed.shape)}")
        seed = seed.reshape(()).to(device="cpu", dtype=torch.int64)
    elif torch.compiler.is_compiling():  # a traced int may be symbolic: masking it breaks inductor
        seed = torch.tensor(seed, dtype=torch.int64)
    else:
        seed = torch.tensor(_as_int64(seed), dtype=torch.int64)
    m, _, p_open_sum = _hard_concrete_op(log_alpha, seed, _as_int32(offset), bool(training),
                                         float(t_l), float(t_u), float(beta), float(gamma), float(zeta),
                                         float(noise_range), dispatch.backend_for(op, log_alpha))
    return (m, p_open_sum) if return_p_open_sum else m
