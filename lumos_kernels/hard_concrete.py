"""Hard-concrete gate sampling with semi-stochastic thresholds (Louizos et al. 2018; LUMOS).

For gates with logits ``log_alpha`` (any shape), with ``pi = p_open(log_alpha)``:

    training:  z = clamp(sigmoid((logit(u) + log_alpha) / beta) * (zeta - gamma) + gamma, 0, 1)
    eval:      z = clamp(sigmoid(log_alpha) * (zeta - gamma) + gamma, 0, 1)          (z_hat)
    m = 1 if pi > t_u;  m = 0 if pi <= t_l;  m = z otherwise

Noise: ``u`` for the gate at flat (row-major) position ``i`` is :func:`gate_uniform` of key
``seed`` at counter ``offset + i``: the top 24 bits of output number ``offset + i`` of the
SplitMix64 generator seeded with ``seed`` (Steele, Lea, Flood, "Fast splittable pseudorandom
number generators", OOPSLA 2014), a dozen 64-bit integer operations per gate. Nothing random
is stored, and a gate's mask depends only on its logit and on ``(seed, offset + i)``.
``noise_range = r`` draws ``u ~ U(r, 1 - r)`` (the LUMOS reference code's annealed variant:
r = 0.5 is deterministic, r -> 0 the full hard-concrete).

The thresholds are applied to ``log_alpha``, not to a rounded ``pi``: ``pi > t_u`` exactly when
``log_alpha >= open_min`` and ``pi <= t_l`` exactly when ``log_alpha <= closed_max``, with the
bounds of :func:`log_alpha_bounds` computed once in float64 and rounded to the logits' dtype in
the safe direction. Every backend therefore forces the same gates, bit for bit.

Backends (:mod:`lumos_kernels.dispatch`):

- torch (CPU tensors): the formulas above in plain torch, computed without recording a
  graph, with the Triton op's closed-form backward (below) as one autograd node: about 25
  small tensor ops per call whatever the number of gates (a few dozen more when it makes its
  own uniforms; :func:`hard_concrete_parts` takes them from a caller that made many steps'
  at once with :func:`gate_uniform_rows`). :func:`hard_concrete_reference` is the same
  formulas differentiated by autograd (the oracle of both backends). Elementwise CPU kernels
  may round an element an ulp differently depending on where it falls in a vector, so a
  model's gates are always sampled as the same concatenation (:class:`lumos.gates.GateSampler`);
- Triton (CUDA tensors, or CPU tensors under ``TRITON_INTERPRET=1``): the custom op
  ``torch.ops.lumos.hard_concrete``; one launch samples every gate of a flat buffer (layers
  keep views into it) and fuses ``sum p_open``, accumulated in fp32 (fp64 for fp64 logits)
  from per-program partial sums (no atomics). The kernel computes in fp32 (fp64 for fp64
  logits) and stores the mask in the logits' dtype; its uniforms are bit-identical to
  :func:`gate_uniform`, its mask equals the torch backend's to float rounding (``log`` and
  ``sigmoid`` implementations differ by an ulp), with the same forced gates. Its registered
  backward: ``dm/dlog_alpha = (z - gamma)(zeta - z) / ((zeta - gamma) beta)`` for gates in
  the band with ``0 < z < 1`` (``beta`` is 1 in eval), 0 otherwise (KERNELS.md 1); the
  forward writes it (one float per gate) so that the mask is never saved and may be modified
  in place. The penalty term's gradient is ``p_open (1 - p_open)``.
"""
from __future__ import annotations

import functools
import math
import struct
from typing import Sequence, Tuple

import torch

from . import dispatch

BETA = 2.0 / 3.0
GAMMA = -0.1
ZETA = 1.1
T_LOW = 0.05
T_UP = 0.95
U_EPS = 1e-6  # u can be exactly 0: keep log(u) and log(1 - u) finite

# SplitMix64: the state advances by GOLDEN_GAMMA; each output is the state through MIX.
GOLDEN_GAMMA = 0x9E3779B97F4A7C15
MIX_MULTIPLIERS = (0xBF58476D1CE4E5B9, 0x94D049BB133111EB)
MIX_SHIFTS = (30, 27, 31)
UNIFORM_BITS = 24  # u = (top 24 bits) * 2**-24: every value exact in float32
_MASK64 = (1 << 64) - 1


def as_int64(value: int) -> int:
    """``value mod 2**64`` as a signed int64 (the bit pattern a 64-bit tensor holds)."""
    value = int(value) & _MASK64
    return value - (1 << 64) if value >= (1 << 63) else value


def splitmix64(value: int) -> int:
    """SplitMix64's output function (a bijection of 64-bit ints) on ``value + GOLDEN_GAMMA``:
    the generator's first output when seeded with ``value``."""
    value = (int(value) + GOLDEN_GAMMA) & _MASK64
    for multiplier, shift in zip(MIX_MULTIPLIERS, MIX_SHIFTS):
        value = ((value ^ (value >> shift)) * multiplier) & _MASK64
    return value ^ (value >> MIX_SHIFTS[2])


def _shift_right(z: torch.Tensor, bits: int) -> torch.Tensor:
    """Logical right shift of the 64-bit patterns held in an int64 tensor."""
    return (z >> bits) & ((1 << (64 - bits)) - 1)


def gate_uniform(key: int | torch.Tensor, offset: int, n: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """``n`` uniforms in [0, 1): ``u[i]`` from SplitMix64 seeded with ``key``, output number
    ``offset + i`` (counting from 0, modulo 2**64), bit-identical to the Triton kernel's.

    ``u[i] = (z >> 40) * 2**-24`` with ``z = mix(key + (offset + i + 1) * GOLDEN_GAMMA)``, where
    ``mix`` is SplitMix64's multiply-xorshift (its final ``z ^ (z >> 31)`` leaves the top 24
    bits unchanged, so it is skipped). Under ``torch.compile`` it is one opaque op, as torch's
    own random ops are (inductor's CPU code for wrapping int64 ``arange`` arithmetic is not
    reliable in torch 2.13).

    Args:
        key: a 64-bit key: an int, or a 0-dim int64 tensor (any device; no read-back).
        offset: counter of the first number.
        n: how many numbers.

    Returns:
        ``(n,)`` float32 tensor on ``device``; every value is a multiple of 2**-24.
    """
    if torch.compiler.is_compiling():
        key = key if isinstance(key, torch.Tensor) else torch.tensor(key, dtype=torch.int64)
        return _gate_uniform_op(key, as_int64(offset), n, torch.device(device))
    return _gate_uniform(key, offset, n, device)


def _counters(offset: int, n: int, device) -> torch.Tensor:
    """``(offset + i + 1) * GOLDEN_GAMMA`` for ``i < n`` (int64, wrapping): SplitMix64's states before the key."""
    z = torch.arange(n, dtype=torch.int64, device=device)
    return z.mul_(as_int64(GOLDEN_GAMMA)).add_(as_int64((int(offset) + 1) * GOLDEN_GAMMA))


def _mix_to_uniform(z: torch.Tensor) -> torch.Tensor:
    """SplitMix64's multiply-xorshift of the states ``z`` (int64, any shape), top 24 bits as float32 in [0, 1)."""
    for multiplier, shift in zip(MIX_MULTIPLIERS, MIX_SHIFTS):
        z = (z ^ _shift_right(z, shift)).mul_(as_int64(multiplier))
    return _shift_right(z, 64 - UNIFORM_BITS).to(torch.float32).mul_(2.0 ** -UNIFORM_BITS)


def _gate_uniform(key, offset, n, device):
    return _mix_to_uniform(_counters(offset, n, device).add_(key))


def gate_uniform_rows(keys: torch.Tensor, offset: int, n: int) -> torch.Tensor:
    """``(len(keys), n)`` uniforms whose row ``s`` is ``gate_uniform(keys[s], offset, n)``, bit for bit
    (integer arithmetic): the noise of many training steps in one pass.

    Args:
        keys: ``(S,)`` int64 keys (e.g. :func:`lumos.gates.noise_key` of consecutive steps), on
            the device the uniforms are wanted on.
        offset, n: as :func:`gate_uniform`.
    """
    if keys.dim() != 1 or keys.dtype != torch.int64:
        raise ValueError(f"gate_uniform_rows: `keys` must be a 1-D int64 tensor, got {keys.dtype} {tuple(keys.shape)}")
    return _mix_to_uniform(_counters(offset, n, keys.device)[None, :] + keys[:, None])


@torch.library.custom_op("lumos::gate_uniform", mutates_args=())
def _gate_uniform_op(key: torch.Tensor, offset: int, n: int, device: torch.device) -> torch.Tensor:
    return _gate_uniform(key, offset, n, device)


@_gate_uniform_op.register_fake
def _(key, offset, n, device):
    return torch.empty(n, dtype=torch.float32, device=device)


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


def nearest_on_side(value: float, dtype: torch.dtype, above: bool) -> float:
    """The ``dtype`` (float32 or float64) number nearest ``value`` that is strictly above it
    (``above``), or at or below it. Plain Python (no tensor is read back), so that
    ``torch.compile`` traces the sampling without a graph break."""
    single = dtype != torch.float64
    rounded = _to_float32(value) if single else value
    if rounded <= value if above else rounded > value:
        rounded = _next_float32(rounded, above) if single else math.nextafter(rounded, math.inf if above else -math.inf)
    return rounded


def _to_float32(value: float) -> float:
    """``value`` rounded to the nearest float32 (ties to even), as a Python float."""
    if math.isinf(value) or math.isnan(value):
        return value
    return struct.unpack("<f", struct.pack("<f", value))[0]


def _next_float32(value: float, up: bool) -> float:
    """The float32 after ``value`` (itself a float32) towards +inf (``up``) or -inf."""
    if math.isnan(value) or value == (math.inf if up else -math.inf):
        return value
    if value == 0.0:
        return math.copysign(struct.unpack("<f", struct.pack("<I", 1))[0], 1.0 if up else -1.0)
    bits = struct.unpack("<I", struct.pack("<f", value))[0]
    bits += 1 if (value > 0) == up else -1  # away from zero when moving outwards
    return struct.unpack("<f", struct.pack("<I", bits))[0]


def log_alpha_bounds(t_l: float = T_LOW, t_u: float = T_UP, beta: float = BETA, gamma: float = GAMMA,
                     zeta: float = ZETA, dtype: torch.dtype = torch.float32) -> Tuple[float, float]:
    """``(closed_max, open_min)``: the thresholds on ``p_open`` as exact bounds on ``log_alpha``.

    For a logit ``x`` of ``dtype`` (fp32 also stands for fp16 and bf16, which convert to it
    exactly), ``p_open(x) <= t_l`` exactly when ``x <= closed_max`` and ``p_open(x) > t_u``
    exactly when ``x >= open_min`` (``p_open`` evaluated without rounding; the boundaries
    ``logit(t) + beta * log(-gamma / zeta)`` are computed in float64). ``t_u = 1`` forces no
    gate open: ``open_min`` is NaN, which no comparison satisfies. Remembered per arguments
    (every sampling call asks), except under ``torch.compile``, which traces the computation
    (and warns about tracing through a cache).
    """
    if torch.compiler.is_compiling():
        return _log_alpha_bounds(t_l, t_u, beta, gamma, zeta, dtype)
    return _remembered_bounds(t_l, t_u, beta, gamma, zeta, dtype)


def _log_alpha_bounds(t_l: float, t_u: float, beta: float, gamma: float, zeta: float,
                      dtype: torch.dtype) -> Tuple[float, float]:
    """:func:`log_alpha_bounds`, computed."""
    shift = beta * math.log(-gamma / zeta)  # p_open = sigmoid(log_alpha - shift)

    def logit(t):
        return -math.inf if t <= 0 else math.inf if t >= 1 else math.log(t) - math.log1p(-t)

    closed_max = nearest_on_side(shift + logit(t_l), dtype, above=False)
    open_min = math.nan if t_u >= 1 else nearest_on_side(shift + logit(t_u), dtype, above=True)
    return closed_max, open_min


_remembered_bounds = functools.lru_cache(maxsize=64)(_log_alpha_bounds)


def _gate_z(work, key, offset, training, beta, gamma, zeta, noise_range, uniform=None, low=0.0, high=1.0):
    """``z`` of the module docstring's formulas for compute-dtype logits ``work`` (differentiable
    in ``work`` where autograd records); ``uniform``: the uniforms of these gates when the caller
    already has them (bit-identical to what ``(key, offset)`` gives). ``low``, ``high``: the
    clamp's bounds (bool tensors: a gate forced to 1 or 0 gets the bounds [1, 1] or [0, 0])."""
    if not training:
        s = torch.sigmoid(work)
    else:
        with torch.no_grad():  # the noise: logit(u), clamped as the kernel clamps u
            if uniform is None:
                uniform = gate_uniform(key, offset, work.numel(), work.device)
            u = _as_part(uniform, work.shape, work.dtype)
            if noise_range:
                u = u.mul(1.0 - 2.0 * noise_range).add_(noise_range)
            noise = torch.logit(u, eps=U_EPS)
        s = torch.sigmoid((work + noise) * (1.0 / beta))
    return (s * (zeta - gamma) + gamma).clamp(low, high)


def _forced(work, t_l, t_u, beta, gamma, zeta):
    """``(forced_open, forced_closed)``: the gates the thresholds set to 1 and to 0 (bool)."""
    closed_max, open_min = log_alpha_bounds(t_l, t_u, beta, gamma, zeta, work.dtype)
    return work >= open_min, work <= closed_max  # open_min NaN (t_u = 1): never open


def _thresholded(z, forced_open, forced_closed):
    """The mask: ``z`` with the forced gates set to 1 or 0 (a new tensor)."""
    return z.masked_fill(forced_closed, 0.0).masked_fill_(forced_open, 1.0)


def _compute_input(log_alpha: torch.Tensor) -> torch.Tensor:
    # contiguous: CPU kernels may round a strided layout differently, and masks must not depend on it
    if log_alpha.dtype == _compute_dtype(log_alpha) and log_alpha.is_contiguous():
        return log_alpha  # the usual fp32 logits: no op to dispatch
    return log_alpha.to(_compute_dtype(log_alpha)).contiguous()


def _flat_mask(key, offset, training, t_l, t_u, beta, gamma, zeta, noise_range, uniform, log_alphas):
    """``(work, m)``: the compute-dtype logits of the concatenated ``log_alphas`` and their masks
    (the torch backend's numbers), computed as they are, with or without a graph."""
    flat = log_alphas[0] if len(log_alphas) == 1 else torch.cat([_as_part(la, (la.numel(),), la.dtype)
                                                                  for la in log_alphas])
    work = _compute_input(flat)
    # the thresholds as the clamp's bounds: _thresholded's mask in one op instead of three (a NaN
    # logit's z is NaN either way)
    closed_max, open_min = log_alpha_bounds(t_l, t_u, beta, gamma, zeta, work.dtype)
    return work, _gate_z(work, key, offset, training, beta, gamma, zeta, noise_range, uniform,
                         low=work >= open_min, high=work > closed_max)


def _split_mask(m: torch.Tensor, parts: list) -> tuple[torch.Tensor, ...]:
    """The flat mask (or its gradient) ``m`` as one tensor per ``(shape, numel, dtype)`` of ``parts``."""
    if len(parts) == 1:
        return (m.to(parts[0][2]),)
    return tuple(_as_part(part, shape, dtype) for part, (shape, _, dtype) in zip(m.split([n for _, n, _ in parts]), parts))


class _HardConcreteTorch(torch.autograd.Function):
    """The torch backend for the gates of one or several logit tensors, sampled as their
    concatenation: ``(*masks, dm)`` (and ``p_open_sum`` when asked for) computed without
    recording a graph, as the Triton kernel computes them, and the closed-form backward of the Triton op
    (:func:`_hard_concrete_backward`) as one backward node. (Inside a training step autograd
    through the formulas costs 0.2 ms less on ``bench/bench_training.py``'s MLP; README,
    "How a run reaches its budget", says why this stays.) A single tensor's mask is a new tensor
    that no backward reads: safe to modify in place; several tensors' masks are views of one."""

    @staticmethod
    def forward(ctx, key, offset, training, t_l, t_u, beta, gamma, zeta, noise_range, with_sum, uniform,
                *log_alphas):
        if not torch.compiler.is_compiling():  # unused outputs (dm, the sum) get no zero tensors in backward
            ctx.set_materialize_grads(False)
        work, m = _flat_mask(key, offset, training, t_l, t_u, beta, gamma, zeta, noise_range, uniform, log_alphas)
        live = (m > 0) & (m < 1)  # inside the band and not clamped: where m = z has a slope
        slope = (m - gamma).mul_(zeta - m).mul_(1.0 / ((zeta - gamma) * (beta if training else 1.0)))
        dm = torch.where(live, slope, live)  # 0 elsewhere (False as a float), without wrapping a scalar
        ctx.save_for_backward(work, dm)
        ctx.mark_non_differentiable(dm)
        ctx.distribution = (beta, gamma, zeta)
        ctx.parts = [(la.shape, la.numel(), la.dtype) for la in log_alphas]
        ctx.with_sum = with_sum
        masks = _split_mask(m, ctx.parts)
        return (*masks, dm, p_open(work, beta, gamma, zeta).sum()) if with_sum else (*masks, dm)

    @staticmethod
    def backward(ctx, *grads):
        work, dm = ctx.saved_tensors
        grad_masks, grad_sum = grads[:len(ctx.parts)], grads[-1] if ctx.with_sum else None
        if all(g is None for g in grad_masks) and grad_sum is None:
            return (None,) * (11 + len(ctx.parts))
        if len(grad_masks) == 1:
            grad_m = grad_masks[0]
        else:
            grad_m = torch.cat([_as_part(g, (n,), dm.dtype) if g is not None else dm.new_zeros(n)
                                for g, (_, n, _) in zip(grad_masks, ctx.parts)])
        grad = _hard_concrete_backward_flat(work, dm, grad_m, grad_sum, ctx.distribution)
        return (None,) * 11 + _split_mask(grad, ctx.parts)


def _as_part(flat: torch.Tensor, shape: torch.Size, dtype: torch.dtype) -> torch.Tensor:
    """A 1-D piece of a flat buffer in the shape and dtype of its part (itself when they match:
    the common case of 1-D gates, where a view and a cast per gate would cost more than the math)."""
    return dispatch.in_dtype(flat if flat.shape == shape else flat.reshape(shape), dtype)


def hard_concrete_reference(log_alpha, seed, offset, training, t_l=T_LOW, t_u=T_UP,
                            beta=BETA, gamma=GAMMA, zeta=ZETA, noise_range=0.0):
    """The mask of :func:`hard_concrete` computed by the torch backend (same arguments, any
    device; gradients from autograd): the oracle of the Triton kernels, whose backward is the
    closed-form derivative."""
    key = seed if isinstance(seed, torch.Tensor) else as_int64(seed)
    work = _compute_input(log_alpha)
    z = _gate_z(work, key, int(offset), bool(training), float(beta), float(gamma), float(zeta), float(noise_range))
    with torch.no_grad():
        forced = _forced(work, float(t_l), float(t_u), float(beta), float(gamma), float(zeta))
    return _thresholded(z, *forced).to(log_alpha.dtype)


# ----------------------------------------------------------------------------------------
# The Triton backend: a custom op and its one backward
# ----------------------------------------------------------------------------------------

@torch.library.custom_op("lumos::hard_concrete", mutates_args=())
def _hard_concrete_op(log_alpha: torch.Tensor, seed: torch.Tensor, offset: int, training: bool, t_l: float,
                      t_u: float, beta: float, gamma: float, zeta: float,
                      noise_range: float) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    # the seed travels as a tensor so that a compiled model can draw it in-graph each step
    acc = _compute_dtype(log_alpha)
    closed_max, open_min = log_alpha_bounds(t_l, t_u, beta, gamma, zeta, acc)
    return dispatch.triton_kernels("hard_concrete").forward(
        log_alpha, as_int64(int(seed)), offset, training, closed_max, open_min, beta, gamma, zeta, noise_range,
        U_EPS, acc)


@_hard_concrete_op.register_fake
def _(log_alpha, seed, offset, training, t_l, t_u, beta, gamma, zeta, noise_range):
    acc = _compute_dtype(log_alpha)
    return (torch.empty_like(log_alpha, memory_format=torch.contiguous_format),
            torch.empty_like(log_alpha, dtype=acc, memory_format=torch.contiguous_format),
            log_alpha.new_empty((), dtype=acc))


def _hard_concrete_setup_context(ctx, inputs, output):
    log_alpha, _seed, _offset, _training, _t_l, _t_u, beta, gamma, zeta, _noise = inputs
    ctx.save_for_backward(log_alpha, output[1])
    ctx.mark_non_differentiable(output[1])
    ctx.distribution = (beta, gamma, zeta)


def _hard_concrete_backward_flat(log_alpha, dm, grad_m, grad_sum, distribution):
    """``grad_m * dm/dlog_alpha + grad_sum * p_open (1 - p_open)``, in the compute dtype of ``dm``."""
    grad = grad_m.to(dm.dtype) * dm if grad_m is not None else torch.zeros_like(dm)
    if grad_sum is not None:
        pi = p_open(log_alpha.to(dm.dtype), *distribution)
        grad = grad + grad_sum.to(dm.dtype) * pi * (1 - pi)
    return grad


def _hard_concrete_backward(ctx, grad_m, _grad_dm, grad_sum):
    log_alpha, dm = ctx.saved_tensors
    grad = _hard_concrete_backward_flat(log_alpha, dm, grad_m, grad_sum, ctx.distribution)
    return (grad.to(log_alpha.dtype),) + (None,) * 9


_hard_concrete_op.register_autograd(_hard_concrete_backward, setup_context=_hard_concrete_setup_context)


def _seed_tensor(seed: int | torch.Tensor) -> torch.Tensor:
    """The key as a 0-dim int64 CPU tensor (what the custom op takes)."""
    if isinstance(seed, torch.Tensor):
        return seed.reshape(()).to(device="cpu", dtype=torch.int64)
    if torch.compiler.is_compiling():  # a traced int may be symbolic: masking it breaks inductor
        return torch.tensor(seed, dtype=torch.int64)
    return torch.tensor(as_int64(seed), dtype=torch.int64)


def hard_concrete(log_alpha: torch.Tensor, seed: int | torch.Tensor, offset: int = 0, training: bool = True,
                  t_l: float = T_LOW, t_u: float = T_UP, beta: float = BETA, gamma: float = GAMMA,
                  zeta: float = ZETA, noise_range: float = 0.0,
                  return_p_open_sum: bool = False) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Sample semi-stochastic hard-concrete gates.

    Noise contract: the gate at flat (row-major) position ``i`` of ``log_alpha`` draws its
    uniform from :func:`gate_uniform` with key ``seed`` at counter ``offset + i`` (SplitMix64,
    modulo 2**64), so its mask depends only on its own logit and on ``(seed, offset + i)``. The
    gates of a model can live in one flat buffer sampled in one call, or be sampled layer by
    layer: the slice ``buffer[a:b]`` sampled alone with ``offset + a`` gives exactly
    ``mask[a:b]`` of the whole buffer sampled with ``offset``. Same ``(seed, offset)``, same
    mask, on every backend and every machine (DDP ranks with the same key agree).

    Args:
        log_alpha: gate logits, any shape (typically ``(n,)`` or one flat buffer for a model).
        seed: the 64-bit key: an int (taken modulo 2**64), or a one-element integer tensor (so
            that a compiled model reads it in-graph, and the torch backend never reads it back).
        offset: counter of the first gate (see the noise contract).
        training: stochastic sample if True, deterministic ``z_hat`` if False (thresholds apply
            in both).
        t_l, t_u: semi-stochastic thresholds on ``p_open``: at or below ``t_l`` the mask is 0,
            above ``t_u`` it is 1, in between it is the hard-concrete value.
        beta, gamma, zeta: temperature and stretch of the hard-concrete distribution.
        noise_range: ``u ~ U(noise_range, 1 - noise_range)``; 0 is the full distribution.
        return_p_open_sum: also return ``p_open(log_alpha).sum()`` (the expected-L0 penalty with
            unit costs), fused into the sampling pass on the Triton backend.

    CPU tensors run the torch backend (plain torch, autograd; ``torch.compile`` fuses it), CUDA
    tensors (or ``LUMOS_BACKEND=triton``) the Triton kernel through the custom op
    ``torch.ops.lumos.hard_concrete`` (module docstring).

    Returns:
        ``m``, a new tensor of the shape and dtype of ``log_alpha`` (safe to modify in place),
        values in [0, 1], differentiable in ``log_alpha`` where ``0 < m < 1`` inside the band;
        with ``return_p_open_sum``, the pair ``(m, p_open_sum)``: ``p_open_sum`` is a 0-dim
        float32 tensor (float64 for float64 logits) whatever the logits' dtype, accumulated in
        that precision, differentiable in ``log_alpha``.
    """
    op = "hard_concrete"
    args = _checked_args(op, [log_alpha], seed, training, t_l, t_u, beta, gamma, zeta, noise_range)
    if dispatch.backend_for(op, log_alpha) == "triton":
        m, _, p_open_sum = _hard_concrete_op(log_alpha, _seed_tensor(seed), as_int64(offset), *args)
    else:
        key = _torch_key(seed, log_alpha)
        outputs = _HardConcreteTorch.apply(key, int(offset), *args, return_p_open_sum, None, log_alpha)
        m, p_open_sum = outputs[0], outputs[-1]  # (m, dm) or (m, dm, p_open_sum)
    return (m, p_open_sum) if return_p_open_sum else m


def hard_concrete_parts(log_alphas: Sequence[torch.Tensor], seed: int | torch.Tensor, offset: int = 0,
                        training: bool = True, t_l: float = T_LOW, t_u: float = T_UP, beta: float = BETA,
                        gamma: float = GAMMA, zeta: float = ZETA, noise_range: float = 0.0,
                        uniform: torch.Tensor | None = None) -> tuple[torch.Tensor, ...]:
    """:func:`hard_concrete` of the concatenation of the flattened ``log_alphas`` (gates numbered
    from ``offset`` in that order), returned as one mask per tensor: what a model's gates draw
    in one call. The masks, and the gradients, are those of sampling the concatenation, without
    the concatenation and the split in the autograd graph (one backward node on the torch backend).

    Args:
        log_alphas: logit tensors of one dtype and device (any shapes).
        seed, offset, training, t_l, t_u, beta, gamma, zeta, noise_range: as :func:`hard_concrete`.
        uniform: ``(sum of numels,)`` float32: the uniforms :func:`gate_uniform` gives for
            ``(seed, offset)``, when the caller already has them (:class:`lumos.gates.GateSampler`
            makes many steps' at once, with :func:`gate_uniform_rows`); the torch backend then
            uses them instead of generating them. Ignored by the Triton kernel, which makes its own.

    Returns:
        A tuple of masks, one per tensor of ``log_alphas``, of its shape and dtype (views of
        one buffer when there are several).
    """
    op = "hard_concrete_parts"
    log_alphas = list(log_alphas)
    if not log_alphas:
        raise ValueError(f"{op}: `log_alphas` must hold at least one tensor")
    args = _checked_args(op, log_alphas, seed, training, t_l, t_u, beta, gamma, zeta, noise_range)
    first = log_alphas[0]
    if dispatch.backend_for("hard_concrete", first) == "triton" or torch.compiler.is_compiling():
        flat = torch.cat([la.reshape(-1) for la in log_alphas]) if len(log_alphas) > 1 else first
        m = hard_concrete(flat, seed, offset, *args)
        if len(log_alphas) == 1:
            return (m,)
        return tuple(part.view(la.shape) for part, la in zip(m.split([la.numel() for la in log_alphas]), log_alphas))
    if uniform is not None and (uniform.dim() != 1 or uniform.numel() != sum(la.numel() for la in log_alphas)):
        raise ValueError(f"{op}: `uniform` must hold one number per gate, got shape {tuple(uniform.shape)}")
    key, uniform = _torch_key(seed, first), uniform if args[0] else None
    if not (torch.is_grad_enabled() and any(la.requires_grad for la in log_alphas)):
        # nothing to differentiate (eval masks, a budget's measurement): the masks alone, no autograd node
        _, m = _flat_mask(key, int(offset), *args, uniform, log_alphas)
        return _split_mask(m, [(la.shape, la.numel(), la.dtype) for la in log_alphas])
    return _HardConcreteTorch.apply(key, int(offset), *args, False, uniform, *log_alphas)[:-1]


def _checked_args(op, log_alphas, seed, training, t_l, t_u, beta, gamma, zeta, noise_range) -> tuple:
    """The sampling arguments as plain Python values, or a clear error naming ``op``'s argument."""
    for log_alpha in log_alphas:
        if not isinstance(log_alpha, torch.Tensor):
            raise TypeError(f"{op}: `log_alpha` must be a tensor, got {type(log_alpha).__name__}")
        dispatch.check_float(op, "log_alpha", log_alpha)
    check_gate_params(t_l, t_u, beta, gamma, zeta, noise_range)
    if isinstance(seed, torch.Tensor) and (seed.numel() != 1 or seed.is_floating_point() or seed.is_complex()):
        raise TypeError(f"{op}: `seed` must be an int or a one-element integer tensor, got {seed.dtype} "
                        f"of shape {tuple(seed.shape)}")
    return bool(training), float(t_l), float(t_u), float(beta), float(gamma), float(zeta), float(noise_range)


def _torch_key(seed, log_alpha: torch.Tensor):
    """The key as the torch backend takes it: an int, or a 0-dim int64 tensor (never read back)."""
    if isinstance(seed, torch.Tensor):  # stays where it is: a CPU scalar adds to any device's tensor
        seed = seed if seed.dim() == 0 else seed.reshape(())  # a 0-dim key, the sampler's: no op
        return seed.to(dtype=torch.int64, device="cpu" if seed.is_cpu else log_alpha.device)
    return _seed_tensor(seed) if torch.compiler.is_compiling() else as_int64(seed)
