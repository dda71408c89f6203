"""Masked linear layer: ``y = (x * m_in) @ (W * m_out[:, None]).T + b * m_out``.

The gates scale input columns (``m_in``, length K) and output rows (``m_out``, length N);
the masked weight is never materialised. Gradients (KERNELS.md 1), with ``G = dL/dy``
flattened to (M, N) and ``R = G.T @ x`` (N, K):

    dx     = ((G * m_out) @ W) * m_in
    dW     = R * m_out[:, None] * m_in[None, :]
    db     = m_out * G.sum(0)
    dm_in  = (m_out[:, None] * W * R).sum(0)
    dm_out = (m_in[None, :] * W * R).sum(1) + b * G.sum(0)

Triton backend (CUDA tensors, or CPU tensors under ``TRITON_INTERPRET=1``):

- ``_gated_gemm_kernel`` computes ``out = ((a @ (b * g_k[None, :]).T) + bias) * g_n`` with the
  ``g_k`` gate applied to each loaded ``b`` tile and ``bias``/``g_n`` in the epilogue. The
  forward is ``a = x, b = W, g_k = m_in, g_n = m_out``; ``dx`` is the same kernel with
  ``a = G, b = W.T`` (a strided view, no copy), ``g_k = m_out, g_n = m_in``.
- ``_dw_kernel`` computes ``R`` tile by tile and, in its epilogue (where the ``W`` tile is
  loaded anyway), ``dW``, ``db`` and per-program partial sums of ``dm_in`` / ``dm_out``
  written to ``[programs, len]`` buffers that torch reduces with ``.sum(0)``: no atomics, so
  gate gradients are deterministic for a given tile config. When ``N x K`` has too few tiles
  to fill a GPU, the ``M`` reduction is split over ``SPLIT_M`` programs whose fp32 partials
  are summed the same way.
- fp32, fp16, bf16 (and fp64) inputs, fp32 accumulation (fp64 for fp64); fp32 ``tl.dot``
  uses TF32 only when ``torch.get_float32_matmul_precision() != "highest"``, as torch does.
- On a GPU the tile configs are autotuned, keyed on ``(M, N, K)`` and the dtypes; under the
  interpreter one config is used (autotuning needs a driver).
- Inputs are used through their strides (a non-contiguous ``x`` or ``W`` is not copied,
  except where ``reshape`` of leading batch dims must copy).

The Triton path is the custom op ``torch.ops.lumos.masked_linear`` (registered fake and
autograd, so ``torch.compile(fullgraph=True)`` keeps it in the graph). CPU tensors call the
reference ``autograd.Function`` directly: ``torch.compile`` traces it and fuses the gating.
"""
from __future__ import annotations

import functools
from typing import List, Optional

import torch

from . import dispatch


class _MaskedLinearReference(torch.autograd.Function):
    """Torch reference (the CPU path). Training computes ``y_pre = (x * m_in) @ W.T + b`` with
    ``nn.Linear``'s GEMMs and keeps it for the output-gate gradient, so that the backward is a
    plain linear backward on ``G * m_out`` plus one ``(M, N)`` product:
    ``dm_out = (G * y_pre).sum(0)``, ``dm_in = ((G * m_out) @ W * x).sum(0)`` (the same
    gradients as the formulas above, without the ``(N, K)`` products)."""

    @staticmethod
    def forward(ctx, x, weight, bias, m_in, m_out):
        lead, k = x.shape[:-1], x.shape[-1]
        x2 = x.reshape(-1, k)
        m_in_w = None if m_in is None else m_in.to(weight.dtype)
        m_out_w = None if m_out is None else m_out.to(weight.dtype)
        y_pre = None
        if m_out is not None and ctx.needs_input_grad[4]:
            y_pre = torch.nn.functional.linear(x2 if m_in is None else x2 * m_in_w, weight, bias)
            y = y_pre * m_out_w
        elif x2.shape[0] >= weight.shape[0]:
            # more rows than outputs: scaling the (N, K) weight costs less than scaling x and y
            w = weight if m_out is None else weight * m_out_w[:, None]
            w = w if m_in is None else w * m_in_w[None, :]
            b = bias if bias is None or m_out is None else bias * m_out_w
            y = torch.nn.functional.linear(x2, w, b)
        else:
            y = torch.nn.functional.linear(x2 if m_in is None else x2 * m_in_w, weight, bias)
            if m_out is not None:
                y = y * m_out_w
        ctx.save_for_backward(x2, weight, m_in, m_out, y_pre)
        ctx.has_bias = bias is not None
        return y.reshape(*lead, weight.shape[0])

    @staticmethod
    def backward(ctx, grad_y):
        x2, weight, m_in, m_out, y_pre = ctx.saved_tensors
        need_x, need_w, need_b, need_in, need_out = ctx.needs_input_grad
        gate_dtypes = (None if m_in is None else m_in.dtype, None if m_out is None else m_out.dtype)
        # fp32 gates on a 16-bit layer: the products run in the layer's dtype, as in the forward
        m_in = None if m_in is None else m_in.to(weight.dtype)
        m_out = None if m_out is None else m_out.to(weight.dtype)
        g = grad_y.reshape(-1, weight.shape[0])
        g_gated = g * m_out if m_out is not None else g
        dx = dw = db = dm_in = dm_out = None
        if need_x or need_in:
            d_xm = g_gated @ weight  # gradient of the gated input x * m_in
            if need_x:
                dx = (d_xm if m_in is None else d_xm * m_in).reshape(*grad_y.shape[:-1], weight.shape[1])
            if need_in:
                dm_in = (d_xm * x2).sum(0)
        if need_w:
            dw = g_gated.t() @ (x2 if m_in is None else x2 * m_in)
        if need_b and ctx.has_bias:
            db = g_gated.sum(0)
        if need_out:
            dm_out = (g * y_pre).sum(0)
        dm_in = None if dm_in is None else dm_in.to(gate_dtypes[0])
        dm_out = None if dm_out is None else dm_out.to(gate_dtypes[1])
        return dx, dw, db, dm_in, dm_out


def masked_linear_reference(x, weight, bias=None, m_in=None, m_out=None):
    """Torch reference of :func:`masked_linear` (same signature, any device)."""
    return _MaskedLinearReference.apply(x, weight, bias, m_in, m_out)


def check_masked_linear_args(x, weight, bias, m_in, m_out) -> None:
    """Raise a clear error for wrong shapes, dtypes or devices (shared by both backends)."""
    op = "masked_linear"
    for name, t in (("x", x), ("weight", weight), ("bias", bias), ("m_in", m_in), ("m_out", m_out)):
        if t is not None and not isinstance(t, torch.Tensor):
            raise TypeError(f"{op}: `{name}` must be a tensor or None, got {type(t).__name__}")
        dispatch.check_float(op, name, t)
    if weight.dim() != 2:
        raise ValueError(f"{op}: `weight` must be 2-D (out_features, in_features), got {tuple(weight.shape)}")
    n, k = weight.shape
    if x.dim() == 0 or x.shape[-1] != k:
        raise ValueError(
            f"{op}: `x` must have shape (..., {k}) to match weight {tuple(weight.shape)}, got {tuple(x.shape)}"
        )
    dispatch.check_vector(op, "bias", bias, n, "one per output")
    dispatch.check_vector(op, "m_in", m_in, k, "one gate per input column")
    dispatch.check_vector(op, "m_out", m_out, n, "one gate per output row")
    dispatch.check_same_device(op, x=x, weight=weight, bias=bias, m_in=m_in, m_out=m_out)


# ----------------------------------------------------------------------------------------
# Triton kernels (built on first use: importing lumos_kernels must not import triton)
# ----------------------------------------------------------------------------------------

# (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages) tried by the GPU autotuner.
_GEMM_CONFIGS = (
    (128, 128, 32, 4, 4),
    (128, 256, 64, 8, 3),
    (256, 128, 64, 8, 3),
    (128, 64, 32, 4, 4),
    (64, 128, 32, 4, 4),
    (64, 64, 32, 4, 5),
)
# The dW kernel tiles (N, K) and reduces over M: (BLOCK_N, BLOCK_K, BLOCK_M, warps, stages).
_DW_CONFIGS = (
    (128, 128, 32, 8, 3),
    (128, 64, 32, 4, 4),
    (64, 128, 32, 4, 4),
    (64, 64, 64, 4, 4),
)
# Under the interpreter every program costs milliseconds: one config, big tiles.
_INTERPRET_GEMM = (32, 32, 32)
_INTERPRET_DW = (32, 32, 32)
_SPLIT_M_ALIGN = 64  # split-M chunks are a multiple of every BLOCK_M above


@functools.lru_cache(maxsize=None)
def _kernels():
    """Compile-on-demand kernels: imports triton on the first Triton launch only."""
    import triton
    import triton.language as tl

    @triton.jit
    def _gated_gemm_kernel(a_ptr, b_ptr, g_k_ptr, bias_ptr, g_n_ptr, out_ptr, M, N, K,
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
                # the reduction-side gate scales the loaded b tile: W * m_in is never stored
                g_k = tl.load(g_k_ptr + ks, mask=k_ok, other=0.0).to(ACC)
                b = (b.to(ACC) * g_k[None, :]).to(b_ptr.dtype.element_ty)
            acc = tl.dot(a, tl.trans(b), acc, input_precision=INPUT_PRECISION, out_dtype=ACC)
        if HAS_BIAS:
            acc += tl.load(bias_ptr + offs_n, mask=col_ok, other=0.0).to(ACC)[None, :]
        if HAS_G_N:
            acc *= tl.load(g_n_ptr + offs_n, mask=col_ok, other=0.0).to(ACC)[None, :]
        out = out_ptr + offs_m[:, None].to(tl.int64) * stride_om + offs_n[None, :] * stride_on
        tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])

    @triton.jit
    def _dw_kernel(g_ptr, x_ptr, w_ptr, bias_ptr, m_in_ptr, m_out_ptr,
                   dw_ptr, db_ptr, dm_in_part_ptr, dm_out_part_ptr, M, N, K, m_per_split,
                   stride_gm, stride_gn, stride_xm, stride_xk, stride_wn, stride_wk,
                   HAS_BIAS: tl.constexpr, HAS_M_IN: tl.constexpr, HAS_M_OUT: tl.constexpr,
                   NEED_W: tl.constexpr, NEED_B: tl.constexpr,
                   NEED_M_IN: tl.constexpr, NEED_M_OUT: tl.constexpr,
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
            # with SPLIT_M > 1, dw_ptr is an fp32 [SPLIT_M, N, K] partial buffer
            dw = dw_ptr + split.to(tl.int64) * N * K + offs_n[:, None].to(tl.int64) * K + offs_k[None, :]
            dw_val = r * m_out[:, None] * m_in[None, :]
            tl.store(dw, dw_val.to(dw_ptr.dtype.element_ty), mask=tile_ok)
        if NEED_M_IN or NEED_M_OUT:
            w = tl.load(w_ptr + offs_n[:, None].to(tl.int64) * stride_wn + offs_k[None, :] * stride_wk,
                        mask=tile_ok, other=0.0).to(ACC)
            wr = w * r
            if NEED_M_IN:
                part_in = tl.sum(wr * m_out[:, None], axis=0)
                row = split * tl.num_programs(0) + pid_n
                tl.store(dm_in_part_ptr + row.to(tl.int64) * K + offs_k, part_in, mask=k_ok)
            if NEED_M_OUT:
                part_out = tl.sum(wr * m_in[None, :], axis=1)
                if HAS_BIAS:
                    # the bias term b * G.sum(0) goes to the k-block-0 partial only
                    bias = tl.load(bias_ptr + offs_n, mask=n_ok, other=0.0).to(ACC)
                    part_out += tl.where(pid_k == 0, bias * g_sum, 0.0)
                row = split * tl.num_programs(1) + pid_k
                tl.store(dm_out_part_ptr + row.to(tl.int64) * N + offs_n, part_out, mask=n_ok)
        if NEED_B:
            # db partial per split: [SPLIT_M, N], written by the k-block-0 programs
            first_k = (tl.zeros_like(offs_n) + pid_k) == 0
            tl.store(db_ptr + split.to(tl.int64) * N + offs_n, g_sum * m_out, mask=n_ok & first_k)

    if dispatch.triton_interpreted():
        return _gated_gemm_kernel, _dw_kernel, None, None
    gemm_tuned = triton.autotune(
        configs=[triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8},
                               num_warps=w, num_stages=s) for bm, bn, bk, w, s in _GEMM_CONFIGS],
        key=["M", "N", "K"],  # the autotuner adds the dtypes of tensor arguments to the key
    )(_gated_gemm_kernel)
    dw_tuned = triton.autotune(
        configs=[triton.Config({"BLOCK_N": bn, "BLOCK_K": bk, "BLOCK_M": bm}, num_warps=w, num_stages=s)
                 for bn, bk, bm, w, s in _DW_CONFIGS],
        key=["M", "N", "K", "m_per_split"],
        # programs of a bigger tile leave rows of the partial buffers unwritten: zero them
        reset_to_zero=["dm_in_part_ptr", "dm_out_part_ptr", "db_ptr"],
    )(_dw_kernel)
    return _gated_gemm_kernel, _dw_kernel, gemm_tuned, dw_tuned


def _acc_and_precision(dtype: torch.dtype):
    import triton.language as tl

    if dtype == torch.float64:
        return tl.float64, "ieee"
    if dtype == torch.float32 and torch.get_float32_matmul_precision() == "highest":
        return tl.float32, "ieee"
    return tl.float32, "tf32"  # ignored by tl.dot for 16-bit inputs


def _contiguous(vector: torch.Tensor | None) -> torch.Tensor | None:
    return None if vector is None else vector.contiguous()


def _gated_gemm(a, b, g_k, bias, g_n, out):
    """``out = ((a @ (b * g_k).T) + bias) * g_n`` for 2-D strided ``a`` (M, K), ``b`` (N, K)."""
    m, k = a.shape
    n = b.shape[0]
    g_k, bias, g_n = _contiguous(g_k), _contiguous(bias), _contiguous(g_n)  # 1-D loads use no stride
    kernel, _, tuned, _ = _kernels()
    acc, precision = _acc_and_precision(a.dtype)
    args = (a, b, g_k if g_k is not None else a, bias if bias is not None else a,
            g_n if g_n is not None else a, out, m, n, k,
            a.stride(0), a.stride(1), b.stride(0), b.stride(1), out.stride(0), out.stride(1))
    flags = dict(HAS_G_K=g_k is not None, HAS_BIAS=bias is not None, HAS_G_N=g_n is not None,
                 ACC=acc, INPUT_PRECISION=precision)
    if tuned is None:
        bm, bn, bk = _INTERPRET_GEMM
        grid = (_cdiv(m, bm) * _cdiv(n, bn),)
        kernel[grid](*args, **flags, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=8)
    else:
        def grid(meta):
            return (_cdiv(m, meta["BLOCK_M"]) * _cdiv(n, meta["BLOCK_N"]),)
        tuned[grid](*args, **flags)
    return out


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


@functools.lru_cache(maxsize=None)
def _multiprocessors(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _default_split_m(m: int, n: int, k: int, device: torch.device) -> int:
    """Split the M reduction of dW when the (N, K) tiles alone cannot fill the GPU."""
    if device.type != "cuda":
        return 1
    sms = _multiprocessors(device.index if device.index is not None else torch.cuda.current_device())
    tiles = _cdiv(n, 128) * _cdiv(k, 128)
    if tiles >= sms:
        return 1
    return max(1, min(_cdiv(2 * sms, tiles), m // 1024))


def _masked_linear_forward_triton(x, weight, bias, m_in, m_out):
    k = x.shape[-1]
    n = weight.shape[0]
    x2 = x.reshape(-1, k)
    out = torch.empty((x2.shape[0], n), dtype=x.dtype, device=x.device)
    if out.numel() == 0 or k == 0:
        return masked_linear_reference(x2, weight, bias, m_in, m_out).reshape(*x.shape[:-1], n)
    _gated_gemm(x2, weight, m_in, bias, m_out, out)
    return out.reshape(*x.shape[:-1], n)


def _masked_linear_backward_triton(grad_y, x, weight, bias, m_in, m_out,
                                   need_x, need_w, need_b, need_m_in, need_m_out, split_m=None):
    """All five gradients (None where not needed) from the Triton kernels."""
    n, k = weight.shape
    x2 = x.reshape(-1, k)
    g = grad_y.reshape(-1, n)
    m = x2.shape[0]
    dx = dw = db = dm_in = dm_out = None
    needs = (need_x, need_w, need_b, need_m_in, need_m_out)
    if m == 0 or n == 0 or k == 0:
        return _degenerate_grads(grad_y, (x, weight, bias, m_in, m_out), needs)
    if need_x:
        dx = torch.empty((m, k), dtype=x.dtype, device=x.device)
        # dx = ((G * m_out) @ W) * m_in: the forward kernel with b = W.T (a view, no copy)
        _gated_gemm(g, weight.t(), m_out, None, m_in, dx)
        dx = dx.reshape(x.shape)
    need_m_in = need_m_in and m_in is not None
    need_m_out = need_m_out and m_out is not None
    need_b = need_b and bias is not None
    if need_w or need_m_in or need_m_out or need_b:
        dw, db, dm_in, dm_out = _dw_and_gate_grads(g, x2, weight, bias, m_in, m_out,
                                                   need_w, need_b, need_m_in, need_m_out, split_m)
    return dx, dw, db, dm_in, dm_out


def _degenerate_grads(grad_y, inputs, needs):
    """Gradients when M, N or K is 0 (nothing for a kernel to do): autograd of the reference."""
    with torch.enable_grad():
        leaves = [t.detach().requires_grad_(need) if t is not None else None
                  for t, need in zip(inputs, needs)]
        wanted = [t for t in leaves if t is not None and t.requires_grad]
        y = masked_linear_reference(*leaves)
        found = iter(torch.autograd.grad(y, wanted, grad_y, allow_unused=True) if wanted else ())
    grads = [next(found) if t is not None and t.requires_grad else None for t in leaves]
    return tuple(torch.zeros_like(t) if t is not None and t.requires_grad and gr is None else gr
                 for gr, t in zip(grads, leaves))


def _dw_and_gate_grads(g, x2, weight, bias, m_in, m_out, need_w, need_b, need_m_in, need_m_out, split_m):
    m, k = x2.shape
    n = weight.shape[0]
    bias, m_in, m_out = _contiguous(bias), _contiguous(m_in), _contiguous(m_out)  # 1-D loads use no stride
    _, kernel, _, tuned = _kernels()
    acc, precision = _acc_and_precision(x2.dtype)
    part_dtype = torch.float64 if x2.dtype == torch.float64 else torch.float32
    if split_m is None:
        split_m = _default_split_m(m, n, k, x2.device)
    split_m = max(1, min(int(split_m), _cdiv(m, _SPLIT_M_ALIGN)))
    m_per_split = _cdiv(_cdiv(m, split_m), _SPLIT_M_ALIGN) * _SPLIT_M_ALIGN
    split_m = _cdiv(m, m_per_split)
    if tuned is None:
        block_n, block_k, block_m = _INTERPRET_DW
        min_block_n, min_block_k = block_n, block_k
    else:
        min_block_n = min(c[0] for c in _DW_CONFIGS)
        min_block_k = min(c[1] for c in _DW_CONFIGS)
    dev = x2.device
    # outputs that are not needed point at a scratch element, never at an input: the GPU
    # autotuner zeroes the partial buffers (reset_to_zero) before each trial
    scratch = torch.zeros(1, dtype=part_dtype, device=dev)
    if need_w:
        dw = (torch.empty((n, k), dtype=weight.dtype, device=dev) if split_m == 1
              else torch.empty((split_m, n, k), dtype=part_dtype, device=dev))
    else:
        dw = scratch
    # partial rows: one per (split, program along the other axis); unwritten rows stay zero
    dm_in_part = (torch.zeros((split_m * _cdiv(n, min_block_n), k), dtype=part_dtype, device=dev)
                  if need_m_in else scratch)
    dm_out_part = (torch.zeros((split_m * _cdiv(k, min_block_k), n), dtype=part_dtype, device=dev)
                   if need_m_out else scratch)
    db_part = torch.zeros((split_m, n), dtype=part_dtype, device=dev) if need_b else scratch
    args = (g, x2, weight, bias if bias is not None else x2, m_in if m_in is not None else x2,
            m_out if m_out is not None else x2, dw, db_part, dm_in_part, dm_out_part,
            m, n, k, m_per_split,
            g.stride(0), g.stride(1), x2.stride(0), x2.stride(1), weight.stride(0), weight.stride(1))
    flags = dict(HAS_BIAS=bias is not None, HAS_M_IN=m_in is not None, HAS_M_OUT=m_out is not None,
                 NEED_W=need_w, NEED_B=need_b, NEED_M_IN=need_m_in, NEED_M_OUT=need_m_out,
                 ACC=acc, INPUT_PRECISION=precision)
    if tuned is None:
        grid = (_cdiv(n, block_n), _cdiv(k, block_k), split_m)
        kernel[grid](*args, **flags, BLOCK_N=block_n, BLOCK_K=block_k, BLOCK_M=block_m)
    else:
        def grid(meta):
            return (_cdiv(n, meta["BLOCK_N"]), _cdiv(k, meta["BLOCK_K"]), split_m)
        tuned[grid](*args, **flags)
    if need_w and split_m > 1:
        dw = dw.sum(0).to(weight.dtype)
    db = db_part.sum(0).to(bias.dtype) if need_b else None
    dm_in = dm_in_part.sum(0).to(m_in.dtype) if need_m_in else None
    dm_out = dm_out_part.sum(0).to(m_out.dtype) if need_m_out else None
    return (dw if need_w else None), db, dm_in, dm_out


# ----------------------------------------------------------------------------------------
# torch.library registration: the Triton path as custom ops torch.compile can see
# ----------------------------------------------------------------------------------------

@torch.library.custom_op("lumos::masked_linear", mutates_args=())
def _masked_linear_op(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                      m_in: Optional[torch.Tensor], m_out: Optional[torch.Tensor]) -> torch.Tensor:
    return _masked_linear_forward_triton(x, weight, bias, m_in, m_out)


@_masked_linear_op.register_fake
def _(x, weight, bias, m_in, m_out):
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


@torch.library.custom_op("lumos::masked_linear_backward", mutates_args=())
def _masked_linear_backward_op(grad_y: torch.Tensor, x: torch.Tensor, weight: torch.Tensor,
                               bias: Optional[torch.Tensor], m_in: Optional[torch.Tensor],
                               m_out: Optional[torch.Tensor], need_x: bool, need_w: bool, need_b: bool,
                               need_m_in: bool, need_m_out: bool) -> List[torch.Tensor]:
    grads = _masked_linear_backward_triton(grad_y, x, weight, bias, m_in, m_out,
                                           need_x, need_w, need_b, need_m_in, need_m_out)
    # a custom op cannot return None: an empty tensor stands for "not needed"
    return [gr if gr is not None else x.new_empty(0) for gr in grads]


@_masked_linear_backward_op.register_fake
def _(grad_y, x, weight, bias, m_in, m_out, need_x, need_w, need_b, need_m_in, need_m_out):
    like = (x, weight, bias, m_in, m_out)
    needs = (need_x, need_w, need_b, need_m_in, need_m_out)
    return [torch.empty_like(t, memory_format=torch.contiguous_format) if (need and t is not None)
            else x.new_empty(0) for t, need in zip(like, needs)]


def _masked_linear_setup_context(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _masked_linear_backward(ctx, grad_y):
    x, weight, bias, m_in, m_out = ctx.saved_tensors
    needs = ctx.needs_input_grad
    grads = _masked_linear_backward_op(grad_y, x, weight, bias, m_in, m_out, *needs)
    return tuple(gr if (need and t is not None) else None
                 for gr, t, need in zip(grads, (x, weight, bias, m_in, m_out), needs))


_masked_linear_op.register_autograd(_masked_linear_backward, setup_context=_masked_linear_setup_context)


def masked_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                  m_in: torch.Tensor | None = None, m_out: torch.Tensor | None = None) -> torch.Tensor:
    """Gated linear map ``(x * m_in) @ (weight * m_out[:, None]).T + bias * m_out``.

    Args:
        x: ``(..., K)`` input.
        weight: ``(N, K)``, same dtype as ``x`` (fp32, fp16, bf16 or fp64).
        bias: ``(N,)`` or None.
        m_in: ``(K,)`` input-column gates or None (all open).
        m_out: ``(N,)`` output gates or None (all open).

    Returns:
        ``(..., N)`` in the dtype of ``x``, differentiable in every tensor argument. CUDA
        tensors (or ``LUMOS_BACKEND=triton``) run the Triton kernels through the custom op
        ``torch.ops.lumos.masked_linear``; CPU tensors run the torch reference.
    """
    check_masked_linear_args(x, weight, bias, m_in, m_out)
    if dispatch.backend_for("masked_linear", x) == "triton":
        if weight.dtype != x.dtype:
            raise TypeError(f"masked_linear: `weight` dtype {weight.dtype} must match `x` dtype {x.dtype}")
        return _masked_linear_op(x, weight, bias, m_in, m_out)
    return masked_linear_reference(x, weight, bias, m_in, m_out)
