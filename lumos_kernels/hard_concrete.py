"""Hard-concrete gate sampling with semi-stochastic thresholds (Louizos et al. 2018; LUMOS).

For gates with logits ``log_alpha`` (any shape), with ``pi = p_open(log_alpha)``:

    training:  z = clamp(sigmoid((logit(u) + log_alpha) / beta) * (zeta - gamma) + gamma, 0, 1)
    eval:      z = clamp(sigmoid(log_alpha) * (zeta - gamma) + gamma, 0, 1)          (z_hat)
    m = 1 if pi > t_u;  m = 0 if pi <= t_l;  m = z otherwise

``u`` comes from Philox (the generator behind ``tl.rand``) keyed by ``(seed, offset + i)`` for
gate ``i``: the same ``(seed, offset)`` gives the same mask on every backend, and nothing
random is stored. ``noise_range = r`` draws ``u ~ U(r, 1 - r)`` (the LUMOS reference code's
annealed variant: r = 0.5 is deterministic, r -> 0 the full hard-concrete).

Triton backend (CUDA tensors, or CPU tensors under ``TRITON_INTERPRET=1``): one launch
samples every gate of a flat ``log_alpha`` buffer (layers keep views into it) and, in the
same pass, writes per-program partial sums of ``p_open`` that torch reduces (deterministic,
no atomics): ``hard_concrete(..., return_p_open_sum=True)`` returns ``(m, sum p_open)`` for the
L0 penalty. ``u = tl.rand(seed, offset + i)`` is never written to memory; the backward needs
no ``u`` at all: it uses the saved mask (one value per gate) since
``dz/dlog_alpha = (z - gamma)(zeta - z) / ((zeta - gamma) beta)`` for ``0 < z < 1``, and
recomputes ``p_open`` from ``log_alpha`` for the band test and ``d p_open = p (1 - p)``.
The kernel computes in fp32 (fp64 for fp64 logits) and stores the mask in the logits' dtype;
its uniforms are bit-identical to :func:`philox_uniform`, its mask equals the reference to
float rounding (``log``/``sigmoid`` implementations differ by an ulp), with the same exact
zeros and ones.

Both backends are one custom op, ``torch.ops.lumos.hard_concrete`` (with a ``backend``
argument), so ``torch.compile`` sees one opaque op on CPU too: traced, the reference's
Philox integer arithmetic takes inductor minutes to compile.
"""
from __future__ import annotations

import functools
import math
from typing import Optional, Tuple

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


class _HardConcreteReference(torch.autograd.Function):
    """Torch reference; saves the mask only (the gradient needs nothing else, KERNELS.md 1)."""

    @staticmethod
    def forward(ctx, log_alpha, seed, offset, training, t_l, t_u, beta, gamma, zeta, noise_range):
        # 16-bit logits are computed in fp32 like the kernel: 1 - U_EPS rounds to 1 in fp16/bf16
        work = log_alpha.float() if log_alpha.element_size() < 4 else log_alpha
        if training:
            u = philox_uniform(seed, offset, work.numel(), work.device)
            u = (noise_range + (1.0 - 2.0 * noise_range) * u).to(work.dtype).view_as(work)
            u = u.clamp(U_EPS, 1.0 - U_EPS)
            s = torch.sigmoid((torch.log(u) - torch.log1p(-u) + work) / beta)
        else:
            s = torch.sigmoid(work)
        z = (s * (zeta - gamma) + gamma).clamp(0.0, 1.0)
        pi = p_open(work, beta, gamma, zeta)
        m = torch.where(pi > t_u, torch.ones_like(z), torch.where(pi <= t_l, torch.zeros_like(z), z))
        m = m.to(log_alpha.dtype)
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


# ----------------------------------------------------------------------------------------
# Triton kernels (built on first use: importing lumos_kernels must not import triton)
# ----------------------------------------------------------------------------------------

_BLOCK = 1024            # gates per program on a GPU
_INTERPRET_BLOCK = 4096  # under the interpreter each program costs milliseconds


@functools.lru_cache(maxsize=None)
def _kernels():
    import triton
    import triton.language as tl

    @triton.jit(do_not_specialize=["seed", "offset"])
    def _hard_concrete_fwd_kernel(log_alpha_ptr, m_ptr, p_open_part_ptr, n, seed, offset,
                                  noise_lo, noise_scale, t_l, t_u, inv_beta, gamma, stretch,
                                  log_ratio, u_eps,
                                  TRAINING: tl.constexpr, ACC: tl.constexpr, BLOCK: tl.constexpr):
        pid = tl.program_id(0)
        idx = pid * BLOCK + tl.arange(0, BLOCK)
        ok = idx < n
        log_alpha = tl.load(log_alpha_ptr + idx, mask=ok, other=0.0).to(ACC)
        if TRAINING:
            # int32 counters wrap like philox_uniform's (offset + i) mod 2**32
            u = tl.rand(seed, offset + idx).to(ACC)
            u = noise_lo + noise_scale * u
            u = tl.minimum(tl.maximum(u, u_eps), 1.0 - u_eps)
            s = tl.sigmoid((tl.log(u) - tl.log(1.0 - u) + log_alpha) * inv_beta)
        else:
            s = tl.sigmoid(log_alpha)
        z = tl.minimum(tl.maximum(s * stretch + gamma, 0.0), 1.0)
        p_open = tl.sigmoid(log_alpha - log_ratio)
        m = tl.where(p_open > t_u, 1.0, tl.where(p_open <= t_l, 0.0, z))
        tl.store(m_ptr + idx, m.to(m_ptr.dtype.element_ty), mask=ok)
        tl.store(p_open_part_ptr + pid, tl.sum(tl.where(ok, p_open, 0.0), axis=0))

    @triton.jit
    def _hard_concrete_bwd_kernel(log_alpha_ptr, m_ptr, grad_m_ptr, grad_sum_ptr, grad_ptr, n,
                                  t_l, t_u, gamma, zeta, scale, log_ratio,
                                  HAS_GRAD_M: tl.constexpr, HAS_GRAD_SUM: tl.constexpr,
                                  ACC: tl.constexpr, BLOCK: tl.constexpr):
        pid = tl.program_id(0)
        idx = pid * BLOCK + tl.arange(0, BLOCK)
        ok = idx < n
        log_alpha = tl.load(log_alpha_ptr + idx, mask=ok, other=0.0).to(ACC)
        p_open = tl.sigmoid(log_alpha - log_ratio)
        grad = tl.zeros((BLOCK,), dtype=ACC)
        if HAS_GRAD_M:
            m = tl.load(m_ptr + idx, mask=ok, other=0.0).to(ACC)
            grad_m = tl.load(grad_m_ptr + idx, mask=ok, other=0.0).to(ACC)
            # gates forced to 0 or 1 by the thresholds, or clamped, get no task gradient
            live = (p_open > t_l) & (p_open <= t_u) & (m > 0.0) & (m < 1.0)
            grad = tl.where(live, grad_m * (m - gamma) * (zeta - m) * scale, 0.0)
        if HAS_GRAD_SUM:
            grad += tl.load(grad_sum_ptr).to(ACC) * p_open * (1.0 - p_open)
        tl.store(grad_ptr + idx, grad.to(grad_ptr.dtype.element_ty), mask=ok)

    return _hard_concrete_fwd_kernel, _hard_concrete_bwd_kernel


def _block_and_acc(log_alpha: torch.Tensor):
    import triton.language as tl

    block = _INTERPRET_BLOCK if dispatch.triton_interpreted() else _BLOCK
    return block, (tl.float64 if log_alpha.dtype == torch.float64 else tl.float32)


def _as_int32(value: int) -> int:
    """``value mod 2**32`` as a signed int32, so the kernel's counters wrap like the reference's."""
    value = int(value) & 0xFFFFFFFF
    return value - (1 << 32) if value >= (1 << 31) else value


def _as_int64(value: int) -> int:
    """The 64-bit Philox key of ``philox_uniform`` as a signed int64 (a custom-op ``int``)."""
    value = int(value) & 0xFFFFFFFFFFFFFFFF
    return value - (1 << 64) if value >= (1 << 63) else value


def _hard_concrete_forward_triton(log_alpha, seed, offset, training, t_l, t_u, beta, gamma, zeta,
                                  noise_range):
    flat = log_alpha.contiguous().view(-1)
    n = flat.numel()
    m = torch.empty_like(flat)
    acc_dtype = torch.float64 if flat.dtype == torch.float64 else torch.float32
    if n == 0:
        return m.view(log_alpha.shape), torch.zeros((), dtype=log_alpha.dtype, device=log_alpha.device)
    block, acc = _block_and_acc(flat)
    grid = (-(-n // block),)
    partial = torch.empty(grid[0], dtype=acc_dtype, device=flat.device)
    fwd, _ = _kernels()
    fwd[grid](flat, m, partial, n, seed, _as_int32(offset),
              noise_range, 1.0 - 2.0 * noise_range, t_l, t_u, 1.0 / beta, gamma, zeta - gamma,
              beta * math.log(-gamma / zeta), U_EPS,
              TRAINING=bool(training), ACC=acc, BLOCK=block)
    return m.view(log_alpha.shape), partial.sum().to(log_alpha.dtype)


def _hard_concrete_backward_triton(grad_m, grad_sum, log_alpha, m, training, t_l, t_u, beta, gamma, zeta):
    flat = log_alpha.contiguous().view(-1)
    n = flat.numel()
    grad = torch.empty_like(flat)
    if n == 0:
        return grad.view(log_alpha.shape)
    block, acc = _block_and_acc(flat)
    _, bwd = _kernels()
    scale = 1.0 / ((zeta - gamma) * (beta if training else 1.0))
    bwd[(-(-n // block),)](flat, m.contiguous().view(-1),
                           grad_m.contiguous().view(-1) if grad_m is not None else flat,
                           grad_sum if grad_sum is not None else flat, grad, n,
                           t_l, t_u, gamma, zeta, scale, beta * math.log(-gamma / zeta),
                           HAS_GRAD_M=grad_m is not None, HAS_GRAD_SUM=grad_sum is not None,
                           ACC=acc, BLOCK=block)
    return grad.view(log_alpha.shape)


# ----------------------------------------------------------------------------------------
# torch.library registration: the Triton path as custom ops torch.compile can see
# ----------------------------------------------------------------------------------------

# Both backends run through these ops: ``backend="torch"`` is the reference's math. Beyond
# one op surface, this keeps the Philox integer arithmetic of the reference out of
# ``torch.compile``'s reach: inductor takes minutes to compile it (measured: >200 s on a CPU).

@torch.library.custom_op("lumos::hard_concrete", mutates_args=())
def _hard_concrete_op(log_alpha: torch.Tensor, seed: torch.Tensor, offset: int, training: bool, t_l: float,
                      t_u: float, beta: float, gamma: float, zeta: float, noise_range: float,
                      backend: str) -> Tuple[torch.Tensor, torch.Tensor]:
    # the seed travels as a tensor so that a compiled model can draw it in-graph each step
    seed = _as_int64(int(seed))
    if backend == "triton":
        return _hard_concrete_forward_triton(log_alpha, seed, offset, training, t_l, t_u, beta, gamma,
                                             zeta, noise_range)
    m = hard_concrete_reference(log_alpha, seed, offset, training, t_l, t_u, beta, gamma, zeta, noise_range)
    return m.contiguous(), p_open(log_alpha, beta, gamma, zeta).sum()


@_hard_concrete_op.register_fake
def _(log_alpha, seed, offset, training, t_l, t_u, beta, gamma, zeta, noise_range, backend):
    return torch.empty_like(log_alpha, memory_format=torch.contiguous_format), log_alpha.new_empty(())


def _hard_concrete_backward_torch(grad_m, grad_sum, log_alpha, m, training, t_l, t_u, beta, gamma, zeta):
    """The reference's backward (``_HardConcreteReference.backward``) plus the penalty term."""
    pi = p_open(log_alpha, beta, gamma, zeta)
    grad = torch.zeros_like(log_alpha, memory_format=torch.contiguous_format)
    if grad_m is not None:
        live = (pi > t_l) & (pi <= t_u) & (m > 0) & (m < 1)
        scale = 1.0 / ((zeta - gamma) * (beta if training else 1.0))
        grad = torch.where(live, grad_m * ((m - gamma) * (zeta - m) * scale), grad)
    if grad_sum is not None:
        grad = grad + grad_sum * pi * (1 - pi)
    return grad.contiguous()


@torch.library.custom_op("lumos::hard_concrete_backward", mutates_args=())
def _hard_concrete_backward_op(grad_m: Optional[torch.Tensor], grad_sum: Optional[torch.Tensor],
                               log_alpha: torch.Tensor, m: torch.Tensor, training: bool, t_l: float,
                               t_u: float, beta: float, gamma: float, zeta: float,
                               backend: str) -> torch.Tensor:
    fn = _hard_concrete_backward_triton if backend == "triton" else _hard_concrete_backward_torch
    return fn(grad_m, grad_sum, log_alpha, m, training, t_l, t_u, beta, gamma, zeta)


@_hard_concrete_backward_op.register_fake
def _(grad_m, grad_sum, log_alpha, m, training, t_l, t_u, beta, gamma, zeta, backend):
    return torch.empty_like(log_alpha, memory_format=torch.contiguous_format)


def _hard_concrete_setup_context(ctx, inputs, output):
    log_alpha, _seed, _offset, training, t_l, t_u, beta, gamma, zeta, _noise, backend = inputs
    ctx.save_for_backward(log_alpha, output[0])
    ctx.params = (training, t_l, t_u, beta, gamma, zeta, backend)


def _hard_concrete_backward(ctx, grad_m, grad_sum):
    log_alpha, m = ctx.saved_tensors
    grad = _hard_concrete_backward_op(grad_m, grad_sum, log_alpha, m, *ctx.params)
    return (grad,) + (None,) * 10


_hard_concrete_op.register_autograd(_hard_concrete_backward, setup_context=_hard_concrete_setup_context)


def hard_concrete(log_alpha: torch.Tensor, seed: int | torch.Tensor, offset: int = 0, training: bool = True,
                  t_l: float = T_LOW, t_u: float = T_UP, beta: float = BETA, gamma: float = GAMMA,
                  zeta: float = ZETA, noise_range: float = 0.0,
                  return_p_open_sum: bool = False) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Sample semi-stochastic hard-concrete gates.

    Args:
        log_alpha: gate logits, any shape (typically ``(n,)`` or one flat buffer for a model).
        seed, offset: Philox key (an int, or a one-element int64 tensor so that a compiled
            model can draw it in-graph) and counter start; gate ``i`` uses counter ``offset + i``.
        training: stochastic sample if True, deterministic ``z_hat`` if False (thresholds apply
            in both).
        t_l, t_u: semi-stochastic thresholds on ``p_open``: at or below ``t_l`` the mask is 0,
            above ``t_u`` it is 1, in between it is the hard-concrete value.
        beta, gamma, zeta: temperature and stretch of the hard-concrete distribution.
        noise_range: ``u ~ U(noise_range, 1 - noise_range)``; 0 is the full distribution.
        return_p_open_sum: also return ``p_open(log_alpha).sum()`` (the expected-L0 penalty with
            unit costs), fused into the sampling pass on the Triton backend.

    Returns:
        ``m``, same shape and dtype as ``log_alpha``, values in [0, 1], differentiable in
        ``log_alpha`` where ``0 < m < 1`` inside the band; with ``return_p_open_sum``, the
        pair ``(m, p_open_sum)`` (a 0-dim tensor, differentiable in ``log_alpha``). Both
        backends go through the custom op ``torch.ops.lumos.hard_concrete``: one Triton launch
        for CUDA tensors (or ``LUMOS_BACKEND=triton``), the torch reference for CPU tensors.
    """
    op = "hard_concrete"
    if not isinstance(log_alpha, torch.Tensor):
        raise TypeError(f"{op}: `log_alpha` must be a tensor, got {type(log_alpha).__name__}")
    dispatch.check_float(op, "log_alpha", log_alpha)
    check_gate_params(t_l, t_u, beta, gamma, zeta, noise_range)
    if isinstance(seed, torch.Tensor):
        if seed.numel() != 1 or seed.is_floating_point():
            raise TypeError(f"{op}: `seed` must be an int or a one-element integer tensor, got {seed.dtype} "
                            f"of shape {tuple(seed.shape)}")
        seed = seed.reshape(()).to(device="cpu", dtype=torch.int64)
    elif torch.compiler.is_compiling():  # a traced int may be symbolic: masking it breaks inductor
        seed = torch.tensor(seed, dtype=torch.int64)
    else:
        seed = torch.tensor(_as_int64(seed), dtype=torch.int64)
    m, p_open_sum = _hard_concrete_op(log_alpha, seed, _as_int32(offset), bool(training),
                                      float(t_l), float(t_u), float(beta), float(gamma), float(zeta),
                                      float(noise_range), dispatch.backend_for(op, log_alpha))
    return (m, p_open_sum) if return_p_open_sum else m
