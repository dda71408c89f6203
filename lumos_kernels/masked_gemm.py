"""Masked linear layer: ``y = (x * m_in) @ (W * m_out[:, None]).T + b * m_out``.

The gates scale input columns (``m_in``, length K) and output rows (``m_out``, length N);
the masked weight is never materialised by the Triton backend. Gradients (KERNELS.md 1), with
``G = dL/dy`` flattened to (M, N) and ``R = G.T @ x`` (N, K):

    dx     = ((G * m_out) @ W) * m_in
    dW     = R * m_out[:, None] * m_in[None, :]
    db     = m_out * G.sum(0)
    dm_in  = (m_out[:, None] * W * R).sum(0)
    dm_out = (m_in[None, :] * W * R).sum(1) + b * G.sum(0)

Triton backend (CUDA tensors, or CPU tensors under ``TRITON_INTERPRET=1``; kernels in
``lumos_kernels/_triton/masked_gemm.py``):

- one gated GEMM kernel for the forward and ``dx``: the gate of the reduction axis scales the
  loaded ``x`` (or ``G``) tile in registers, the output gate and bias are applied in the
  epilogue; the dW kernel computes ``R`` once and reduces both gate gradients in its epilogue
  into per-program partial sums that torch adds up (no atomics: deterministic);
- fp32, fp16, bf16 (and fp64) inputs, fp32 accumulation (fp64 for fp64). fp32 inputs use TF32
  tensor cores exactly when torch's cuBLAS would (``torch.backends.cuda.matmul.allow_tf32``,
  set by ``torch.set_float32_matmul_precision("high")``); :func:`fp32_input_precision` says
  which the next launch uses;
- on a GPU each (``M`` bucketed to a power of two, ``N``, ``K``, dtype, flags, layouts) key
  times a few tile configs once; under CUDA-graph capture an untimed key takes a heuristic
  config without timing;
- inputs are used through their strides (no copies, except where ``reshape`` of leading batch
  dims must copy).

Both backends go through the custom op ``torch.ops.lumos.masked_linear`` (see
:mod:`lumos_kernels.dispatch`); the torch backend computes the same formulas with torch ops.
"""
from __future__ import annotations

from typing import List, Optional

import torch
import torch.nn.functional as F

from . import dispatch


def fp32_input_precision() -> str:
    """``"tf32"`` or ``"ieee"``: how the Triton GEMMs multiply fp32 inputs, following cuBLAS.

    ``"tf32"`` when ``torch.backends.cuda.matmul.allow_tf32`` is set (for example by
    ``torch.set_float32_matmul_precision("high")``), otherwise ``"ieee"`` (torch's default).
    16-bit inputs always run on tensor cores; fp64 inputs always in fp64.
    """
    return "tf32" if torch.backends.cuda.matmul.allow_tf32 else "ieee"


def masked_linear_reference(x, weight, bias=None, m_in=None, m_out=None):
    """Plain-torch :func:`masked_linear` (same arguments, any device; gradients from autograd)."""
    xm = x if m_in is None else x * m_in.to(x.dtype)
    w = weight if m_out is None else weight * m_out.to(weight.dtype)[:, None]
    b = bias if bias is None or m_out is None else bias * m_out.to(bias.dtype)
    return F.linear(xm, w, b)


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
    for name, t in (("weight", weight), ("bias", bias)):
        if t is not None and t.dtype != x.dtype:
            raise TypeError(f"{op}: `{name}` dtype {t.dtype} must match `x` dtype {x.dtype} "
                            "(gates may have any floating dtype)")
    dispatch.check_vector(op, "bias", bias, n, "one per output")
    dispatch.check_vector(op, "m_in", m_in, k, "one gate per input column")
    dispatch.check_vector(op, "m_out", m_out, n, "one gate per output row")
    dispatch.check_same_device(op, x=x, weight=weight, bias=bias, m_in=m_in, m_out=m_out)


def _forward_torch(x, weight, bias, m_in, m_out):
    """The torch backend: a fresh ``(*x.shape[:-1], N)`` tensor (never a view)."""
    n, k = weight.shape
    out = torch.empty((*x.shape[:-1], n), dtype=x.dtype, device=x.device)
    x2, out2 = x.reshape(-1, k), out.view(-1, n)
    if x2.shape[0] >= n:
        # more rows than outputs: scaling the (N, K) weight costs less than scaling x and y
        w = weight if m_out is None else weight * m_out.to(weight.dtype)[:, None]
        w = w if m_in is None else w * m_in.to(weight.dtype)[None, :]
        b = bias if bias is None or m_out is None else bias * m_out.to(bias.dtype)
        m_out = None
    else:
        x2 = x2 if m_in is None else x2 * m_in.to(x.dtype)
        w, b = weight, bias
    if b is None:
        torch.mm(x2, w.t(), out=out2)
    else:
        torch.addmm(b, x2, w.t(), out=out2)
    if m_out is not None:
        out2.mul_(m_out.to(out.dtype))
    return out


def _backward_torch(grad_y, x, weight, bias, m_in, m_out, needs):
    """The torch backend's gradients (module docstring), None where not needed."""
    need_x, need_w, need_b, need_in, need_out = needs
    gate_dtypes = (None if m_in is None else m_in.dtype, None if m_out is None else m_out.dtype)
    # fp32 gates on a 16-bit layer: the products run in the layer's dtype, as in the forward
    m_in = None if m_in is None else m_in.to(weight.dtype)
    m_out = None if m_out is None else m_out.to(weight.dtype)
    n, k = weight.shape
    x2 = x.reshape(-1, k)
    g = grad_y.reshape(-1, n)
    g_gated = g * m_out if m_out is not None else g
    dx = dw = db = dm_in = dm_out = None
    if need_x:
        dx = g_gated @ weight
        if m_in is not None:
            dx = dx * m_in
        dx = dx.reshape(x.shape)
    need_in, need_out = need_in and m_in is not None, need_out and m_out is not None
    if need_w or need_in or need_out:
        r = g.t() @ x2  # (N, K): the plain dW product, computed once
        if need_w:
            dw = r
            if m_out is not None:
                dw = dw * m_out[:, None]
            if m_in is not None:
                dw = dw * m_in[None, :]
        if need_in:
            wr = weight * r if m_out is None else m_out[:, None] * weight * r
            dm_in = wr.sum(0).to(gate_dtypes[0])
        if need_out:
            wr = weight * r if m_in is None else m_in[None, :] * weight * r
            dm_out = wr.sum(1)
            if bias is not None:
                dm_out = dm_out + bias * g.sum(0)
            dm_out = dm_out.to(gate_dtypes[1])
    if need_b and bias is not None:
        db = g_gated.sum(0)
    return dx, dw, db, dm_in, dm_out


def _has_work(x, weight) -> bool:
    """False when M, N or K is 0: nothing for a kernel to do (the torch backend handles it)."""
    return x.numel() > 0 and weight.numel() > 0


# ----------------------------------------------------------------------------------------
# The custom ops (both backends) and the one backward
# ----------------------------------------------------------------------------------------

@torch.library.custom_op("lumos::masked_linear", mutates_args=())
def _masked_linear_op(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                      m_in: Optional[torch.Tensor], m_out: Optional[torch.Tensor], backend: str) -> torch.Tensor:
    if backend == "triton" and _has_work(x, weight):
        return dispatch.triton_kernels("masked_gemm").forward(x, weight, bias, m_in, m_out, fp32_input_precision())
    return _forward_torch(x, weight, bias, m_in, m_out)


@_masked_linear_op.register_fake
def _(x, weight, bias, m_in, m_out, backend):
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


@torch.library.custom_op("lumos::masked_linear_backward", mutates_args=())
def _masked_linear_backward_op(grad_y: torch.Tensor, x: torch.Tensor, weight: torch.Tensor,
                               bias: Optional[torch.Tensor], m_in: Optional[torch.Tensor],
                               m_out: Optional[torch.Tensor], need_x: bool, need_w: bool, need_b: bool,
                               need_m_in: bool, need_m_out: bool, backend: str) -> List[torch.Tensor]:
    needs = (need_x, need_w, need_b, need_m_in, need_m_out)
    if backend == "triton" and _has_work(x, weight):
        grads = dispatch.triton_kernels("masked_gemm").backward(grad_y, x, weight, bias, m_in, m_out, needs,
                                                                fp32_input_precision())
    else:
        grads = _backward_torch(grad_y, x, weight, bias, m_in, m_out, needs)
    return dispatch.none_as_empty(grads, x)


@_masked_linear_backward_op.register_fake
def _(grad_y, x, weight, bias, m_in, m_out, need_x, need_w, need_b, need_m_in, need_m_out, backend):
    like = (x, weight, bias, m_in, m_out)
    needs = (need_x, need_w, need_b, need_m_in, need_m_out)
    return [torch.empty_like(t, memory_format=torch.contiguous_format) if (need and t is not None)
            else x.new_empty(0) for t, need in zip(like, needs)]


def _masked_linear_setup_context(ctx, inputs, output):
    ctx.save_for_backward(*inputs[:5])
    ctx.backend = inputs[5]


def _masked_linear_backward(ctx, grad_y):
    x, weight, bias, m_in, m_out = ctx.saved_tensors
    needs = [need and t is not None for need, t in zip(ctx.needs_input_grad, (x, weight, bias, m_in, m_out))]
    grads = _masked_linear_backward_op(grad_y, x, weight, bias, m_in, m_out, *needs, ctx.backend)
    return (*dispatch.wanted(grads, needs), None)


_masked_linear_op.register_autograd(_masked_linear_backward, setup_context=_masked_linear_setup_context)


def masked_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                  m_in: torch.Tensor | None = None, m_out: torch.Tensor | None = None) -> torch.Tensor:
    """Gated linear map ``(x * m_in) @ (weight * m_out[:, None]).T + bias * m_out``.

    Args:
        x: ``(..., K)`` input.
        weight: ``(N, K)``, same dtype as ``x`` (fp32, fp16, bf16 or fp64).
        bias: ``(N,)`` in that dtype, or None.
        m_in: ``(K,)`` input-column gates or None (all open), any floating dtype.
        m_out: ``(N,)`` output gates or None (all open), any floating dtype.

    Under ``torch.autocast``, ``x``, ``weight`` and ``bias`` are cast to the autocast dtype
    first, as ``F.linear`` does.

    Returns:
        ``(..., N)`` in the dtype of ``x``, a new tensor (safe to modify in place),
        differentiable in every tensor argument. CUDA tensors (or ``LUMOS_BACKEND=triton``) run
        the Triton kernels, CPU tensors the torch backend, both through the custom op
        ``torch.ops.lumos.masked_linear``.
    """
    if isinstance(x, torch.Tensor) and torch.is_autocast_enabled(x.device.type):
        dtype = torch.get_autocast_dtype(x.device.type)
        x, weight, bias = (t.to(dtype) if isinstance(t, torch.Tensor) and t.is_floating_point() else t
                           for t in (x, weight, bias))
    check_masked_linear_args(x, weight, bias, m_in, m_out)
    return _masked_linear_op(x, weight, bias, m_in, m_out, dispatch.backend_for("masked_linear", x))
