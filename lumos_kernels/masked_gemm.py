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

The Triton backend is the custom op ``torch.ops.lumos.masked_linear`` with that backward
registered; the torch backend (CPU tensors) is plain torch differentiated by autograd (see
:mod:`lumos_kernels.dispatch` and :func:`_masked_linear_torch`).
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


class _MaskedLinearTorch(torch.autograd.Function):
    """The torch backend with input gates: ``nn.Linear``'s GEMMs with the gates applied around
    them, and the backward of the module docstring arranged so that every extra pass is over an
    activation-sized ``(M, K)`` or ``(M, N)`` tensor, none over the weight:

        a = (x * m_in) @ W.T + b  (saved when ``m_out`` needs a gradient),  y = a * m_out
        Gm = G * m_out;  dW = Gm.T @ (x * m_in);  db = Gm.sum(0);  dm_out = (G * a).sum(0)
        P = Gm @ W;  dx = P * m_in;  dm_in = (P * x).sum(0)

    ``m_in`` scales whichever of ``x`` and the weight's columns is smaller. The output is a
    new tensor no backward reads: safe to modify in place.
    """

    @staticmethod
    def forward(ctx, x2, weight, bias, m_in, m_out):
        n = weight.shape[0]
        m_in_w = None if m_in is None else dispatch.in_dtype(m_in, weight.dtype)
        m_out_w = None if m_out is None else dispatch.in_dtype(m_out, weight.dtype)
        xs, w = x2, weight
        if m_in_w is not None:
            if x2.shape[0] <= n:
                xs = x2 * m_in_w
            else:
                w = weight * m_in_w
        a = F.linear(xs, w, bias)
        keep_a = m_out is not None and ctx.needs_input_grad[4]
        ctx.save_for_backward(x2, weight, m_in_w, m_out_w, a if keep_a else None)
        ctx.gate_dtypes = (None if m_in is None else m_in.dtype, None if m_out is None else m_out.dtype)
        ctx.has_bias = bias is not None
        return a if m_out_w is None else a * m_out_w

    @staticmethod
    def backward(ctx, grad_y):
        x2, weight, m_in, m_out, a = ctx.saved_tensors
        need_x, need_w, need_b, need_in, need_out = ctx.needs_input_grad
        n = weight.shape[0]
        g = grad_y
        dx = dw = db = dm_in = dm_out = None
        if m_out is None:
            gm = g
        elif need_out:
            # (g * a) once, then its buffer takes g * m_out: one activation-sized buffer, not two
            # (unless this backward is itself recorded, create_graph=True: out= has no gradient)
            ga = g * a
            dm_out = dispatch.in_dtype(ga.sum(0), ctx.gate_dtypes[1])
            gm = g * m_out if torch.is_grad_enabled() else torch.mul(g, m_out, out=ga)
        else:
            gm = g * m_out
        if need_x or (need_in and m_in is not None):
            p = gm @ weight  # (M, K)
            if need_in and m_in is not None:
                dm_in = dispatch.in_dtype((p * x2).sum(0), ctx.gate_dtypes[0])
            if need_x:
                dx = p if m_in is None else p.mul_(m_in)
        if need_w:
            if m_in is None:
                dw = gm.t() @ x2
            elif x2.shape[0] <= n:
                dw = gm.t() @ (x2 * m_in)
            else:
                dw = (gm.t() @ x2).mul_(m_in)
        if need_b and ctx.has_bias:
            db = gm.sum(0)
        return dx, dw, db, dm_in, dm_out


def _masked_linear_torch(x, weight, bias, m_in, m_out):
    """The torch backend; without gates, ``F.linear`` itself.

    Output gates alone (every hidden layer of a gated MLP) are plain autograd ops, which cost
    less on CPU than a Python ``autograd.Function`` doing the same passes (measured on the
    12-512x3-3 MLP at batch 256: 1.20x a plain training step against 1.22x): the gates scale
    the activations ``F.linear(x, W, b) * m_out``, or the weight's rows when the weight is the
    smaller (``K < M``, e.g. a first layer on a few features). Input gates take
    :class:`_MaskedLinearTorch`, whose backward never scales the weight."""
    if m_in is None and m_out is None:
        return F.linear(x, weight, bias)
    if m_in is None:
        m = dispatch.in_dtype(m_out, weight.dtype)
        if x.numel() // max(weight.shape[1], 1) > weight.shape[1]:
            return F.linear(x, weight * m[:, None], None if bias is None else bias * m)
        return F.linear(x, weight, bias) * m
    x2 = x if x.dim() == 2 else x.reshape(-1, weight.shape[1])
    y = _MaskedLinearTorch.apply(x2, weight, bias, m_in, m_out)
    return y if x.dim() == 2 else y.view(*x.shape[:-1], weight.shape[0])


def _has_work(x, weight) -> bool:
    """False when M, N or K is 0: nothing for a kernel to do (the torch backend handles it)."""
    return x.numel() > 0 and weight.numel() > 0


# ----------------------------------------------------------------------------------------
# The Triton backend: a custom op and its one backward
# ----------------------------------------------------------------------------------------

@torch.library.custom_op("lumos::masked_linear", mutates_args=())
def _masked_linear_op(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                      m_in: Optional[torch.Tensor], m_out: Optional[torch.Tensor]) -> torch.Tensor:
    return dispatch.triton_kernels("masked_gemm").forward(x, weight, bias, m_in, m_out, fp32_input_precision())


@_masked_linear_op.register_fake
def _(x, weight, bias, m_in, m_out):
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


@torch.library.custom_op("lumos::masked_linear_backward", mutates_args=())
def _masked_linear_backward_op(grad_y: torch.Tensor, x: torch.Tensor, weight: torch.Tensor,
                               bias: Optional[torch.Tensor], m_in: Optional[torch.Tensor],
                               m_out: Optional[torch.Tensor], need_x: bool, need_w: bool, need_b: bool,
                               need_m_in: bool, need_m_out: bool) -> List[torch.Tensor]:
    needs = (need_x, need_w, need_b, need_m_in, need_m_out)
    grads = dispatch.triton_kernels("masked_gemm").backward(grad_y, x, weight, bias, m_in, m_out, needs,
                                                            fp32_input_precision())
    return dispatch.none_as_empty(grads, x)


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
    needs = [need and t is not None for need, t in zip(ctx.needs_input_grad, (x, weight, bias, m_in, m_out))]
    grads = _masked_linear_backward_op(grad_y, x, weight, bias, m_in, m_out, *needs)
    return dispatch.wanted(grads, needs)


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
        ``(..., N)`` in the dtype of ``x``, differentiable in every tensor argument, safe to
        modify in place (no backward reads it). CUDA tensors (or ``LUMOS_BACKEND=triton``) run
        the Triton kernels through the custom op ``torch.ops.lumos.masked_linear`` (a new
        tensor); CPU tensors, and problems with M, N or K equal to 0, the torch backend (plain
        torch, autograd: like ``F.linear``, a view of a new tensor when ``x`` is not 2-D).
    """
    if isinstance(x, torch.Tensor) and torch.is_autocast_enabled(x.device.type):
        dtype = torch.get_autocast_dtype(x.device.type)
        x, weight, bias = (t.to(dtype) if isinstance(t, torch.Tensor) and t.is_floating_point() else t
                           for t in (x, weight, bias))
    check_masked_linear_args(x, weight, bias, m_in, m_out)
    if dispatch.backend_for("masked_linear", x) == "triton" and _has_work(x, weight):
        return _masked_linear_op(x, weight, bias, m_in, m_out)
    return _masked_linear_torch(x, weight, bias, m_in, m_out)
