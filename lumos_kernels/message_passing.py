"""Masked GINE message passing over a CSR graph sorted by destination node.

For node ``v`` with in-neighbours ``j`` (edge ``e = (j, v)``) and column gates ``m`` (F,):

    out[v] = m * ((1 + eps) * x[v] + sum_j relu(x[j] + edge_emb[e]))

Gradients (KERNELS.md 1), with ``G = dL/dout`` and ``h`` the bracket above:

    d edge_emb[e] = m * G[v] * [x[j] + edge_emb[e] > 0]
    dx[j]        += m * G[v] * [x[j] + edge_emb[e] > 0]     for every edge leaving j
    dx[v]        += (1 + eps) * m * G[v]
    dm            = sum_v G[v] * h[v]
    d eps         = sum_v sum_cols m * G[v] * x[v]
"""
from __future__ import annotations

from typing import NamedTuple

import torch

from . import dispatch


class CSR(NamedTuple):
    """A graph in compressed sparse rows keyed by destination node.

    Attributes:
        rowptr: ``(num_nodes + 1,)`` int64; edges into node ``v`` are ``rowptr[v]:rowptr[v+1]``.
        col: ``(E,)`` int64 source node of each edge, in destination-sorted order.
        perm: ``(E,)`` int64; ``perm[i]`` is the original edge id of sorted edge ``i``, so
            per-edge features in the original order become ``edge_attr[perm]``.
    """

    rowptr: torch.Tensor
    col: torch.Tensor
    perm: torch.Tensor

    @property
    def num_nodes(self) -> int:
        return self.rowptr.numel() - 1

    def destinations(self) -> torch.Tensor:
        """``(E,)`` destination node of each sorted edge."""
        counts = self.rowptr[1:] - self.rowptr[:-1]
        return torch.repeat_interleave(torch.arange(self.num_nodes, device=self.rowptr.device), counts)


def to_csr(edge_index: torch.Tensor, num_nodes: int) -> CSR:
    """Sort ``edge_index`` (2, E) of (source, destination) pairs by destination, once.

    The sort is stable, so edges into one node keep their original relative order and the
    result is deterministic.
    """
    if not isinstance(edge_index, torch.Tensor) or edge_index.dim() != 2 or edge_index.shape[0] != 2:
        shape = tuple(edge_index.shape) if isinstance(edge_index, torch.Tensor) else type(edge_index).__name__
        raise ValueError(f"to_csr: `edge_index` must be a (2, E) tensor of (source, destination), got {shape}")
    if edge_index.is_floating_point() or edge_index.is_complex() or edge_index.dtype == torch.bool:
        raise TypeError(f"to_csr: `edge_index` must be an integer tensor, got {edge_index.dtype}")
    if int(num_nodes) < 0:
        raise ValueError(f"to_csr: `num_nodes` must be >= 0, got {num_nodes}")
    edge_index = edge_index.long()
    if edge_index.numel() and (edge_index.min() < 0 or edge_index.max() >= num_nodes):
        raise ValueError(
            f"to_csr: `edge_index` values must lie in [0, num_nodes={num_nodes}), "
            f"got range [{int(edge_index.min())}, {int(edge_index.max())}]"
        )
    src, dst = edge_index
    perm = torch.argsort(dst, stable=True)
    counts = torch.bincount(dst, minlength=num_nodes)
    rowptr = torch.zeros(num_nodes + 1, dtype=torch.long, device=edge_index.device)
    rowptr[1:] = torch.cumsum(counts, 0)
    return CSR(rowptr, src[perm].contiguous(), perm)


class _MessagePassingReference(torch.autograd.Function):
    """Torch reference (gather + index_add_) with the explicit backward of the module docstring."""

    @staticmethod
    def forward(ctx, x, rowptr, col, edge_emb, m, eps):
        num_nodes = rowptr.numel() - 1
        dst = torch.repeat_interleave(torch.arange(num_nodes, device=x.device), rowptr[1:] - rowptr[:-1])
        pre = x[col] + edge_emb
        agg = torch.zeros_like(x).index_add_(0, dst, torch.relu(pre))
        h = (1 + eps) * x + agg
        ctx.save_for_backward(x, col, dst, pre > 0, m, eps, h)
        return h * m if m is not None else h

    @staticmethod
    def backward(ctx, grad_out):
        x, col, dst, positive, m, eps, h = ctx.saved_tensors
        need_x, _, _, need_emb, need_m, need_eps = ctx.needs_input_grad
        g_gated = grad_out * m if m is not None else grad_out
        g_edge = g_gated[dst] * positive
        dx = d_emb = dm = d_eps = None
        if need_x:
            dx = ((1 + eps) * g_gated).index_add_(0, col, g_edge)
        if need_emb:
            d_emb = g_edge
        if need_m:
            dm = (grad_out * h).sum(0)
        if need_eps:
            d_eps = (g_gated * x).sum().reshape(eps.shape)
        return dx, None, None, d_emb, dm, d_eps


def masked_message_passing_reference(x, rowptr, col, edge_emb, m=None, eps=0.0):
    """Torch reference of :func:`masked_message_passing` (same signature, any device)."""
    if not isinstance(eps, torch.Tensor):
        eps = torch.tensor(float(eps), dtype=x.dtype, device=x.device)
    return _MessagePassingReference.apply(x, rowptr, col, edge_emb, m, eps)


def check_message_passing_args(x, rowptr, col, edge_emb, m, eps) -> None:
    """Raise a clear error for wrong shapes, dtypes or devices (shared by both backends)."""
    op = "masked_message_passing"
    if x.dim() != 2:
        raise ValueError(f"{op}: `x` must be (num_nodes, F), got {tuple(x.shape)}")
    dispatch.check_float(op, "x", x)
    dispatch.check_float(op, "edge_emb", edge_emb)
    dispatch.check_float(op, "m", m)
    for name, t in (("rowptr", rowptr), ("col", col)):
        if t.dim() != 1 or t.is_floating_point():
            raise ValueError(f"{op}: `{name}` must be a 1-D integer tensor, got {tuple(t.shape)} {t.dtype}")
    if rowptr.numel() != x.shape[0] + 1:
        raise ValueError(
            f"{op}: `rowptr` must have num_nodes + 1 = {x.shape[0] + 1} entries, got {rowptr.numel()}"
        )
    if edge_emb.shape != (col.numel(), x.shape[1]):
        raise ValueError(
            f"{op}: `edge_emb` must be (E, F) = ({col.numel()}, {x.shape[1]}) in destination-sorted "
            f"edge order, got {tuple(edge_emb.shape)}"
        )
    dispatch.check_vector(op, "m", m, x.shape[1], "one gate per feature column")
    if isinstance(eps, torch.Tensor) and eps.numel() != 1:
        raise ValueError(f"{op}: `eps` must be a scalar, got shape {tuple(eps.shape)}")
    dispatch.check_same_device(op, x=x, rowptr=rowptr, col=col, edge_emb=edge_emb, m=m)


def masked_message_passing(x: torch.Tensor, rowptr: torch.Tensor, col: torch.Tensor,
                           edge_emb: torch.Tensor, m: torch.Tensor | None = None,
                           eps: float | torch.Tensor = 0.0) -> torch.Tensor:
    """GINE aggregation with column gates (module docstring has the formula).

    Args:
        x: ``(num_nodes, F)`` node features.
        rowptr, col: CSR by destination from :func:`to_csr`.
        edge_emb: ``(E, F)`` edge embeddings in the same destination-sorted order as ``col``.
        m: ``(F,)`` column gates or None.
        eps: the GIN ``eps`` (float, or a scalar tensor to learn it).

    Returns:
        ``(num_nodes, F)``.
    """
    check_message_passing_args(x, rowptr, col, edge_emb, m, eps)
    if dispatch.backend_for("masked_message_passing", x) == "triton":
        raise dispatch.triton_not_built("masked_message_passing")
    return masked_message_passing_reference(x, rowptr, col, edge_emb, m, eps)
