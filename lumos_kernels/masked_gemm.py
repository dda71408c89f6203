"""Masked linear layer: ``y = (x * m_in) @ (W * m_out[:, None]).T + b * m_out``.

The gates scale input columns (``m_in``, length K) and output rows (``m_out``, length N);
the masked weight is never materialised. Gradients (KERNELS.md 1), with ``G = dL/dy``
flattened to (M, N) and ``R = G.T @ x`` (N, K):

    dx     = ((G * m_out) @ W) * m_in
    dW     = R * m_out[:, None] * m_in[None, :]
    db     = m_out * G.sum(0)
    dm_in  = (m_out[:, None] * W * R).sum(0)
    dm_out = (m_in[None, :] * W * R).sum(1) + b * G.sum(0)
"""
from __future__ import annotations

import torch

from . import dispatch


class _MaskedLinearReference(torch.autograd.Function):
    """Torch reference with the explicit backward the Triton kernels mirror."""

    @staticmethod
    def forward(ctx, x, weight, bias, m_in, m_out):
        lead, k = x.shape[:-1], x.shape[-1]
        x2 = x.reshape(-1, k)
        xm = x2 * m_in.to(x.dtype) if m_in is not None else x2
        y = xm @ weight.t()
        if bias is not None:
            y = y + bias
        if m_out is not None:
            y = y * m_out.to(y.dtype)
        ctx.save_for_backward(x2, weight, bias, m_in, m_out)
        return y.reshape(*lead, weight.shape[0])

    @staticmethod
    def backward(ctx, grad_y):
        x2, weight, bias, m_in, m_out = ctx.saved_tensors
        need_x, need_w, need_b, need_in, need_out = ctx.needs_input_grad
        g = grad_y.reshape(-1, weight.shape[0])
        g_gated = g * m_out if m_out is not None else g
        dx = dw = db = dm_in = dm_out = None
        if need_x:
            dx = g_gated @ weight
            if m_in is not None:
                dx = dx * m_in
            dx = dx.reshape(*grad_y.shape[:-1], weight.shape[1])
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
                dm_in = wr.sum(0)
            if need_out:
                wr = weight * r if m_in is None else m_in[None, :] * weight * r
                dm_out = wr.sum(1)
                if bias is not None:
                    dm_out = dm_out + bias * g.sum(0)
        if need_b:
            db = g_gated.sum(0)
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


def masked_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                  m_in: torch.Tensor | None = None, m_out: torch.Tensor | None = None) -> torch.Tensor:
    """Gated linear map ``(x * m_in) @ (weight * m_out[:, None]).T + bias * m_out``.

    Args:
        x: ``(..., K)`` input.
        weight: ``(N, K)``.
        bias: ``(N,)`` or None.
        m_in: ``(K,)`` input-column gates or None (all open).
        m_out: ``(N,)`` output gates or None (all open).

    Returns:
        ``(..., N)``, differentiable in every tensor argument.
    """
    check_masked_linear_args(x, weight, bias, m_in, m_out)
    if dispatch.backend_for("masked_linear", x) == "triton":
        raise dispatch.triton_not_built("masked_linear")
    return masked_linear_reference(x, weight, bias, m_in, m_out)
