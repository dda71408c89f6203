"""Triton kernels of masked_linear: one gated GEMM (forward and dx) and the dW kernel.

- ``gated_gemm_kernel``: ``out = (((a * g_k[None, :]) @ b.T) + bias) * g_n``. The forward is
  ``a = x, b = W, g_k = m_in, g_n = m_out``; ``dx`` is ``a = G, b = W.T`` (a strided view, no
  copy), ``g_k = m_out, g_n = m_in``. The gate of the reduction axis scales the ``a`` tile.
- ``dw_kernel``: ``R = G.T @ x`` tile by tile; its epilogue (where the ``W`` tile is loaded
  anyway) writes ``dW``, ``db`` and per-program partial sums of ``dm_in`` / ``dm_out`` into
  ``[programs, len]`` buffers that torch reduces (no atomics: deterministic for a config).
  When ``N x K`` has too few tiles to fill a GPU, the ``M`` reduction is split over
  ``split_m`` programs whose fp32 partials are summed the same way.

Launch configs are chosen per key by :class:`.tuning.ConfigChooser` (``M`` bucketed to a power
of two, flags, layouts, dtypes, ``N``, ``K``).
"""
from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from ..dispatch import triton_interpreted
from .tuning import ConfigChooser, LaunchConfig, m_bucket


@triton.jit
def gated_gemm_kernel(a_ptr, b_ptr, g_k_ptr, bias_ptr, g_n_ptr, out_ptr, M, N, K,
                      stride_am, stride_ak, stride_bn, stride_bk, stride_om, stride_on,
                      HAS_G_K: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_G_N: tl.constexpr,
                      ACC: tl.constexpr, INPUT_PRECISION: tl.constexpr,
                      BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                      GROUP_M: tl.constexpr):
    pid = tl.program_id(0)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    # Grouped ordering: GROUP_M row-blocks share each column block of b while it is in L2.
    group = GROUP_M * num_pid_n
    first_m = (pid // group) * GROUP_M
    group_m = tl.minimum(num_pid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % group) % group_m
    pid_n = (pid % group) // group_m

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    row_ok = offs_m < M
    col_ok = offs_n < N
    a_rows = a_ptr + offs_m[:, None].to(tl.int64) * stride_am
    b_rows = b_ptr + offs_n[:, None].to(tl.int64) * stride_bn
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC)
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + offs_k
        k_ok = ks < K
        a = tl.load(a_rows + ks[None, :] * stride_ak, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        b = tl.load(b_rows + ks[None, :] * stride_bk, mask=col_ok[:, None] & k_ok[None, :], other=0.0)
        if HAS_G_K:
            # Gate the a tile, the operand an sm_90 MMA may read from registers: b streams
            # through shared memory untouched and the MMA stays pipelined. Gating b instead
            # sends its tile shared -> registers -> shared and the MMA waits every step
            # (tests/test_kernel_masked_gemm.py checks this in the compiled IR).
            g_k = tl.load(g_k_ptr + ks, mask=k_ok, other=0.0).to(ACC)
            a = (a.to(ACC) * g_k[None, :]).to(a_ptr.dtype.element_ty)
        acc = tl.dot(a, tl.trans(b), acc, input_precision=INPUT_PRECISION, out_dtype=ACC)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=col_ok, other=0.0).to(ACC)[None, :]
    if HAS_G_N:
        acc *= tl.load(g_n_ptr + offs_n, mask=col_ok, other=0.0).to(ACC)[None, :]
    out = out_ptr + offs_m[:, None].to(tl.int64) * stride_om + offs_n[None, :] * stride_on
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])


@triton.jit
def dw_kernel(g_ptr, x_ptr, w_ptr, bias_ptr, m_in_ptr, m_out_ptr,
              dw_ptr, db_part_ptr, dm_in_part_ptr, dm_out_part_ptr, M, N, K, m_per_split,
              stride_gm, stride_gn, stride_xm, stride_xk, stride_wn, stride_wk,
              HAS_BIAS: tl.constexpr, HAS_M_IN: tl.constexpr, HAS_M_OUT: tl.constexpr,
              NEED_W: tl.constexpr, NEED_B: tl.constexpr, NEED_M_IN: tl.constexpr, NEED_M_OUT: tl.constexpr,
              ACC: tl.constexpr, INPUT_PRECISION: tl.constexpr,
              BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_M: tl.constexpr):
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    split = tl.program_id(2)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    offs_m = tl.arange(0, BLOCK_M)
    n_ok = offs_n < N
    k_ok = offs_k < K
    m_start = split * m_per_split
    m_end = tl.minimum(m_start + m_per_split, M)

    r = tl.zeros((BLOCK_N, BLOCK_K), dtype=ACC)  # R = G.T @ x for this tile
    g_sum = tl.zeros((BLOCK_N,), dtype=ACC)      # G.sum(0), for db and the bias term of dm_out
    for m0 in range(m_start, m_end, BLOCK_M):
        ms = m0 + offs_m
        m_ok = ms < m_end
        g_t = tl.load(g_ptr + ms[None, :].to(tl.int64) * stride_gm + offs_n[:, None] * stride_gn,
                      mask=n_ok[:, None] & m_ok[None, :], other=0.0)
        x = tl.load(x_ptr + ms[:, None].to(tl.int64) * stride_xm + offs_k[None, :] * stride_xk,
                    mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        r = tl.dot(g_t, x, r, input_precision=INPUT_PRECISION, out_dtype=ACC)
        if NEED_B or (NEED_M_OUT and HAS_BIAS):
            g_sum += tl.sum(g_t.to(ACC), axis=1)

    tile_ok = n_ok[:, None] & k_ok[None, :]
    if HAS_M_IN:
        m_in = tl.load(m_in_ptr + offs_k, mask=k_ok, other=0.0).to(ACC)
    else:
        m_in = tl.full((BLOCK_K,), 1.0, ACC)
    if HAS_M_OUT:
        m_out = tl.load(m_out_ptr + offs_n, mask=n_ok, other=0.0).to(ACC)
    else:
        m_out = tl.full((BLOCK_N,), 1.0, ACC)
    if NEED_W:
        # with split_m > 1, dw_ptr is an fp32 [split_m, N, K] partial buffer
        dw = dw_ptr + split.to(tl.int64) * N * K + offs_n[:, None].to(tl.int64) * K + offs_k[None, :]
        tl.store(dw, (r * m_out[:, None] * m_in[None, :]).to(dw_ptr.dtype.element_ty), mask=tile_ok)
    if NEED_M_IN or NEED_M_OUT:
        w = tl.load(w_ptr + offs_n[:, None].to(tl.int64) * stride_wn + offs_k[None, :] * stride_wk,
                    mask=tile_ok, other=0.0).to(ACC)
        wr = w * r
        if NEED_M_IN:
            row = split * tl.num_programs(0) + pid_n
            tl.store(dm_in_part_ptr + row.to(tl.int64) * K + offs_k, tl.sum(wr * m_out[:, None], axis=0),
                     mask=k_ok)
        if NEED_M_OUT:
            part_out = tl.sum(wr * m_in[None, :], axis=1)
            if HAS_BIAS:
                # the bias term b * G.sum(0) goes to the k-block-0 partial only
                bias = tl.load(bias_ptr + offs_n, mask=n_ok, other=0.0).to(ACC)
                part_out += tl.where(pid_k == 0, bias * g_sum, 0.0)
            row = split * tl.num_programs(1) + pid_k
            tl.store(dm_out_part_ptr + row.to(tl.int64) * N + offs_n, part_out, mask=n_ok)
    if NEED_B:
        # db partial per split: [split_m, N], written by the k-block-0 programs
        first_k = (tl.zeros_like(offs_n) + pid_k) == 0
        tl.store(db_part_ptr + split.to(tl.int64) * N + offs_n, g_sum * m_out, mask=n_ok & first_k)


# ----------------------------------------------------------------------------------------
# Launch configs
# ----------------------------------------------------------------------------------------

# gated_gemm_kernel blocks: (BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M)
_GEMM = ConfigChooser("gated_gemm", [
    LaunchConfig((128, 128, 32, 8), 4, 4),
    LaunchConfig((128, 256, 64, 8), 8, 3),
    LaunchConfig((256, 128, 64, 8), 8, 3),
    LaunchConfig((128, 64, 32, 8), 4, 4),
    LaunchConfig((64, 128, 32, 8), 4, 4),
    LaunchConfig((64, 64, 32, 8), 4, 5),
])
# dw_kernel blocks: (BLOCK_N, BLOCK_K, BLOCK_M); it tiles (N, K) and reduces over M
_DW = ConfigChooser("masked_linear_dw", [
    LaunchConfig((128, 128, 32), 8, 3),
    LaunchConfig((128, 64, 32), 4, 4),
    LaunchConfig((64, 128, 32), 4, 4),
    LaunchConfig((64, 64, 64), 4, 4),
])
# under the interpreter every program costs milliseconds: big tiles, and never timed
_INTERPRET_GEMM = LaunchConfig((32, 32, 32, 8), 4, 1)
_INTERPRET_DW = LaunchConfig((32, 32, 32), 4, 1)
_SPLIT_M_ALIGN = 64  # split-M chunks are a multiple of every BLOCK_M above


def _gemm_heuristic(m: int, n: int, dtype: torch.dtype) -> LaunchConfig:
    """The untimed config (interpreter; an untimed key met during CUDA-graph capture)."""
    if triton_interpreted():
        return _INTERPRET_GEMM
    block_k = 64 if dtype in (torch.float16, torch.bfloat16) else 32
    return LaunchConfig((64 if m <= 64 else 128, 64 if n <= 64 else 128, block_k, 8), 4, 3)


def _dw_heuristic() -> LaunchConfig:
    return _INTERPRET_DW if triton_interpreted() else _DW.candidates[1]


def _acc_and_precision(dtype: torch.dtype, fp32_precision: str):
    if dtype == torch.float64:
        return tl.float64, "ieee"
    return tl.float32, fp32_precision if dtype == torch.float32 else "ieee"  # 16-bit: tensor cores


def _layout(t: torch.Tensor) -> tuple:
    """Which axes of a 2-D operand are unit-stride (a launch specialises on it)."""
    return tuple(s == 1 for s in t.stride())


def _flags_key(flags: dict) -> tuple:
    return tuple((name, str(value)) for name, value in sorted(flags.items()))


def _contiguous(vector: torch.Tensor | None) -> torch.Tensor | None:
    return None if vector is None else vector.contiguous()  # 1-D loads use no stride


# ----------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------

def gated_gemm(a, b, g_k, bias, g_n, out, fp32_precision):
    """``out = (((a * g_k) @ b.T) + bias) * g_n`` for 2-D strided ``a`` (M, K), ``b`` (N, K)."""
    m, k = a.shape
    n = b.shape[0]
    g_k, bias, g_n = _contiguous(g_k), _contiguous(bias), _contiguous(g_n)
    acc, precision = _acc_and_precision(a.dtype, fp32_precision)
    flags = dict(HAS_G_K=g_k is not None, HAS_BIAS=bias is not None, HAS_G_N=g_n is not None,
                 ACC=acc, INPUT_PRECISION=precision)

    def run(config: LaunchConfig):
        block_m, block_n, block_k, group_m = config.blocks
        grid = (triton.cdiv(m, block_m) * triton.cdiv(n, block_n),)
        gated_gemm_kernel[grid](
            a, b, g_k if g_k is not None else a, bias if bias is not None else a,
            g_n if g_n is not None else a, out, m, n, k,
            a.stride(0), a.stride(1), b.stride(0), b.stride(1), out.stride(0), out.stride(1),
            **flags, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, GROUP_M=group_m,
            num_warps=config.num_warps, num_stages=config.num_stages)

    key = (a.device, a.dtype, out.dtype, _flags_key(flags), _layout(a), _layout(b), n, k, m_bucket(m))
    run(_GEMM.choose(key, run, _gemm_heuristic(m, n, a.dtype)))
    return out


def forward(x, weight, bias, m_in, m_out, fp32_precision):
    """``y`` of shape ``(*x.shape[:-1], N)``, a fresh tensor (not a view: safe to modify in place)."""
    n = weight.shape[0]
    out = torch.empty((*x.shape[:-1], n), dtype=x.dtype, device=x.device)
    gated_gemm(x.reshape(-1, x.shape[-1]), weight, m_in, bias, m_out, out.view(-1, n), fp32_precision)
    return out


@functools.lru_cache(maxsize=None)
def _multiprocessors(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _default_split_m(m: int, n: int, k: int, device: torch.device) -> int:
    """Split the M reduction of dW when the (N, K) tiles alone cannot fill the GPU."""
    if device.type != "cuda":
        return 1
    sms = _multiprocessors(device.index if device.index is not None else torch.cuda.current_device())
    tiles = triton.cdiv(n, 128) * triton.cdiv(k, 128)
    if tiles >= sms:
        return 1
    return max(1, min(triton.cdiv(2 * sms, tiles), m // 1024))


def backward(grad_y, x, weight, bias, m_in, m_out, needs, fp32_precision, split_m=None):
    """``(dx, dW, db, dm_in, dm_out)`` (None where not needed) for ``M, N, K > 0``."""
    need_x, need_w, need_b, need_m_in, need_m_out = needs
    n, k = weight.shape
    x2 = x.reshape(-1, k)
    g = grad_y.reshape(-1, n)
    dx = None
    if need_x:
        dx = torch.empty(x.shape, dtype=x.dtype, device=x.device)
        # dx = ((G * m_out) @ W) * m_in: the forward kernel with b = W.T (a view, no copy)
        gated_gemm(g, weight.t(), m_out, None, m_in, dx.view(-1, k), fp32_precision)
    need_b = need_b and bias is not None
    need_m_in = need_m_in and m_in is not None
    need_m_out = need_m_out and m_out is not None
    if not (need_w or need_b or need_m_in or need_m_out):
        return dx, None, None, None, None
    return (dx, *_dw_and_gate_grads(g, x2, weight, bias, m_in, m_out, need_w, need_b, need_m_in,
                                    need_m_out, fp32_precision, split_m))


def _dw_and_gate_grads(g, x2, weight, bias, m_in, m_out, need_w, need_b, need_m_in, need_m_out,
                       fp32_precision, split_m):
    m, k = x2.shape
    n = weight.shape[0]
    bias, m_in, m_out = _contiguous(bias), _contiguous(m_in), _contiguous(m_out)
    acc, precision = _acc_and_precision(x2.dtype, fp32_precision)
    part_dtype = torch.float64 if x2.dtype == torch.float64 else torch.float32
    dev = x2.device
    if split_m is None:
        split_m = _default_split_m(m, n, k, dev)
    split_m = max(1, min(int(split_m), triton.cdiv(m, _SPLIT_M_ALIGN)))
    m_per_split = triton.cdiv(triton.cdiv(m, split_m), _SPLIT_M_ALIGN) * _SPLIT_M_ALIGN
    split_m = triton.cdiv(m, m_per_split)
    scratch = torch.empty(1, dtype=part_dtype, device=dev)  # stands for an output that is not needed
    flags = dict(HAS_BIAS=bias is not None, HAS_M_IN=m_in is not None, HAS_M_OUT=m_out is not None,
                 NEED_W=need_w, NEED_B=need_b, NEED_M_IN=need_m_in, NEED_M_OUT=need_m_out,
                 ACC=acc, INPUT_PRECISION=precision)

    def run(config: LaunchConfig):
        block_n, block_k, block_m = config.blocks
        grid = (triton.cdiv(n, block_n), triton.cdiv(k, block_k), split_m)
        # every row of each partial buffer is written by exactly one program of this grid
        dw = (torch.empty((n, k), dtype=weight.dtype, device=dev) if split_m == 1
              else torch.empty((split_m, n, k), dtype=part_dtype, device=dev)) if need_w else scratch
        db_part = torch.empty((split_m, n), dtype=part_dtype, device=dev) if need_b else scratch
        dm_in_part = torch.empty((split_m * grid[0], k), dtype=part_dtype, device=dev) if need_m_in else scratch
        dm_out_part = torch.empty((split_m * grid[1], n), dtype=part_dtype, device=dev) if need_m_out else scratch
        dw_kernel[grid](
            g, x2, weight, bias if bias is not None else x2, m_in if m_in is not None else x2,
            m_out if m_out is not None else x2, dw, db_part, dm_in_part, dm_out_part, m, n, k, m_per_split,
            g.stride(0), g.stride(1), x2.stride(0), x2.stride(1), weight.stride(0), weight.stride(1),
            **flags, BLOCK_N=block_n, BLOCK_K=block_k, BLOCK_M=block_m,
            num_warps=config.num_warps, num_stages=config.num_stages)
        return dw, db_part, dm_in_part, dm_out_part

    key = (dev, x2.dtype, _flags_key(flags), _layout(g), _layout(x2), _layout(weight),
           n, k, m_bucket(m), split_m)
    dw, db_part, dm_in_part, dm_out_part = run(_DW.choose(key, run, _dw_heuristic()))
    if need_w and split_m > 1:
        dw = dw.sum(0).to(weight.dtype)
    return ((dw if need_w else None),
            db_part.sum(0).to(bias.dtype) if need_b else None,
            dm_in_part.sum(0).to(m_in.dtype) if need_m_in else None,
            dm_out_part.sum(0).to(m_out.dtype) if need_m_out else None)
