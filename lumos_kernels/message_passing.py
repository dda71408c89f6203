"""Masked GINE message passing over a CSR graph sorted by destination node.

For node ``v`` with in-neighbours ``j`` (edge ``e = (j, v)``) and column gates ``m`` (F,):

    out[v] = m * ((1 + eps) * x[v] + sum_j relu(x[j] + edge_emb[e]))

Gradients (KERNELS.md 1), with ``G = dL/dout`` and ``h`` the bracket above:

    d edge_emb[e] = m * G[v] * [x[j] + edge_emb[e] > 0]
    dx[j]        += m * G[v] * [x[j] + edge_emb[e] > 0]     for every edge leaving j
    dx[v]        += (1 + eps) * m * G[v]
    dm            = sum_v G[v] * h[v]
    d eps         = sum_v sum_cols m * G[v] * x[v]

Triton backend (CUDA tensors, or CPU tensors under ``TRITON_INTERPRET=1``):

- forward: one program per block of destination rows x block of feature columns, looping
  over the neighbours of its rows (up to the block's largest in-degree, masked per row), with
  ``(1 + eps)`` self term and column gate in the epilogue. No atomics: deterministic.
- backward, pass 1 (destination order, same tiling): recomputes ``x[j] + emb[e]`` per edge,
  writes ``d emb`` (fp32 scratch), and rebuilds ``h`` in registers for per-program partial
  sums of ``dm`` and ``d eps`` (``[programs, F]`` buffers reduced by torch), so the forward
  saves nothing but its inputs.
- backward, pass 2 (source order): ``dx[j] = (1 + eps) m G[j] + sum over edges leaving j of
  d emb[e]`` (the per-edge message gradient *is* ``d emb``), a segment sum over the
  **transposed CSR** (``rowptr_t`` by source, ``perm_t`` mapping each source-sorted edge to
  its destination-sorted position). Chosen over per-edge atomics because it is deterministic
  (bitwise-reproducible gradients, as DDP ranks need) and needs no fp32 atomics for bf16
  inputs; it costs one ``argsort`` of ``col``, done once per graph by :meth:`CSR.transposed`
  and passed as ``rowptr_t=, perm_t=`` (computed on the fly when omitted). Not measured
  against atomics on a GPU: no GPU was available when this was written.
- fp32, fp16, bf16 (and fp64) features; fp32 accumulation (fp64 for fp64); ``x`` and
  ``edge_emb`` are made contiguous once.

Both backends are one custom op, ``torch.ops.lumos.masked_message_passing`` (with a
``backend`` argument), so ``torch.compile(fullgraph=True)`` works on CPU too: the reference's
``repeat_interleave`` has a data-dependent size that a traced graph cannot hold.
``to_csr``'s graph is sorted once; a layer keeps its ``CSR`` (and ``CSR.transposed()``).
"""
from __future__ import annotations

import functools
from typing import List, NamedTuple, Optional, Tuple

import torch

from . import dispatch


class _CSRFields(NamedTuple):
    rowptr: torch.Tensor
    col: torch.Tensor
    perm: torch.Tensor


class CSR(_CSRFields):
    """A graph in compressed sparse rows keyed by destination node.

    Attributes:
        rowptr: ``(num_nodes + 1,)`` int64; edges into node ``v`` are ``rowptr[v]:rowptr[v+1]``.
        col: ``(E,)`` int64 source node of each edge, in destination-sorted order.
        perm: ``(E,)`` int64; ``perm[i]`` is the original edge id of sorted edge ``i``, so
            per-edge features in the original order become ``edge_attr[perm]``.

    Still a 3-tuple ``(rowptr, col, perm)``; :meth:`transposed` adds the source-sorted view
    the Triton backward uses, computed once and cached on the instance.
    """

    @property
    def num_nodes(self) -> int:
        return self.rowptr.numel() - 1

    def destinations(self) -> torch.Tensor:
        """``(E,)`` destination node of each sorted edge."""
        counts = self.rowptr[1:] - self.rowptr[:-1]
        return torch.repeat_interleave(torch.arange(self.num_nodes, device=self.rowptr.device), counts)

    def transposed(self) -> Tuple[torch.Tensor, torch.Tensor]:
        """``(rowptr_t, perm_t)``: the CSR keyed by *source* node (see :func:`transpose_csr`), cached."""
        cached = self.__dict__.get("_transposed")
        if cached is None:
            cached = transpose_csr(self.rowptr, self.col)
            self.__dict__["_transposed"] = cached
        return cached


def transpose_csr(rowptr: torch.Tensor, col: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """The source-keyed view of a destination-sorted CSR, for the message-passing backward.

    Returns ``(rowptr_t, perm_t)``: edges leaving node ``j`` are the destination-sorted edge
    positions ``perm_t[rowptr_t[j]:rowptr_t[j+1]]`` (a stable sort, so deterministic).
    """
    num_nodes = rowptr.numel() - 1
    col = col.long()
    perm_t = torch.argsort(col, stable=True)
    rowptr_t = torch.zeros(num_nodes + 1, dtype=torch.long, device=col.device)
    rowptr_t[1:] = torch.cumsum(torch.bincount(col, minlength=num_nodes), 0)
    return rowptr_t, perm_t


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


def _reference_aggregate(x, rowptr, col, edge_emb, eps):
    """``(h, dst, positive)``: the pre-gate output, each edge's destination, ``[pre > 0]``."""
    num_nodes = rowptr.numel() - 1
    dst = torch.repeat_interleave(torch.arange(num_nodes, device=x.device), rowptr[1:] - rowptr[:-1])
    pre = x[col] + edge_emb
    agg = torch.zeros_like(x).index_add_(0, dst, torch.relu(pre))
    h = (1 + eps) * x + agg
    return h, dst, pre > 0


def _reference_grads(grad_out, x, col, dst, positive, m, eps, h, need_x, need_emb, need_m, need_eps):
    """The explicit gradients of the module docstring: ``(dx, d_emb, dm, d_eps)``, None if unneeded."""
    g_gated = grad_out * m.to(grad_out.dtype) if m is not None else grad_out
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
    return dx, d_emb, dm, d_eps


class _MessagePassingReference(torch.autograd.Function):
    """Torch reference (gather + index_add_) with the explicit backward of the module docstring."""

    @staticmethod
    def forward(ctx, x, rowptr, col, edge_emb, m, eps):
        h, dst, positive = _reference_aggregate(x, rowptr, col, edge_emb, eps)
        ctx.save_for_backward(x, col, dst, positive, m, eps, h)
        return h * m.to(h.dtype) if m is not None else h

    @staticmethod
    def backward(ctx, grad_out):
        x, col, dst, positive, m, eps, h = ctx.saved_tensors
        need_x, _, _, need_emb, need_m, need_eps = ctx.needs_input_grad
        dx, d_emb, dm, d_eps = _reference_grads(grad_out, x, col, dst, positive, m, eps, h,
                                                need_x, need_emb, need_m, need_eps)
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
    if edge_emb.dtype != x.dtype:
        raise TypeError(f"{op}: `edge_emb` must have the dtype of `x` ({x.dtype}), got {edge_emb.dtype}")
    dispatch.check_vector(op, "m", m, x.shape[1], "one gate per feature column")
    if isinstance(eps, torch.Tensor) and eps.numel() != 1:
        raise ValueError(f"{op}: `eps` must be a scalar, got shape {tuple(eps.shape)}")
    dispatch.check_same_device(op, x=x, rowptr=rowptr, col=col, edge_emb=edge_emb, m=m,
                               eps=eps if isinstance(eps, torch.Tensor) else None)


# ----------------------------------------------------------------------------------------
# Triton kernels (built on first use: importing lumos_kernels must not import triton)
# ----------------------------------------------------------------------------------------

_BLOCK_V, _BLOCK_F = 16, 64                      # rows x feature columns per program (GPU)
_INTERPRET_BLOCK_V, _INTERPRET_BLOCK_F = 64, 64  # few programs under the interpreter


@functools.lru_cache(maxsize=None)
def _kernels():
    import triton
    import triton.language as tl

    @triton.jit
    def _gine_fwd_kernel(x_ptr, rowptr_ptr, col_ptr, emb_ptr, m_ptr, eps_ptr, out_ptr, num_nodes, F,
                         HAS_M: tl.constexpr, ACC: tl.constexpr,
                         BLOCK_V: tl.constexpr, BLOCK_F: tl.constexpr):
        rows = tl.program_id(0) * BLOCK_V + tl.arange(0, BLOCK_V)
        cols = tl.program_id(1) * BLOCK_F + tl.arange(0, BLOCK_F)
        row_ok = rows < num_nodes
        col_ok = cols < F
        start = tl.load(rowptr_ptr + rows, mask=row_ok, other=0)
        deg = tl.load(rowptr_ptr + rows + 1, mask=row_ok, other=0) - start
        agg = tl.zeros((BLOCK_V, BLOCK_F), dtype=ACC)
        # rows of one block loop together up to the block's largest in-degree
        for i in range(0, tl.max(deg, axis=0)):
            edge_ok = row_ok & (i < deg)
            edge = start + i
            src = tl.load(col_ptr + edge, mask=edge_ok, other=0)
            ok = edge_ok[:, None] & col_ok[None, :]
            x_src = tl.load(x_ptr + src[:, None] * F + cols[None, :], mask=ok, other=0.0).to(ACC)
            emb = tl.load(emb_ptr + edge[:, None] * F + cols[None, :], mask=ok, other=0.0).to(ACC)
            agg += tl.maximum(x_src + emb, 0.0)
        ok = row_ok[:, None] & col_ok[None, :]
        offs = rows[:, None].to(tl.int64) * F + cols[None, :]
        x_dst = tl.load(x_ptr + offs, mask=ok, other=0.0).to(ACC)
        h = (1.0 + tl.load(eps_ptr).to(ACC)) * x_dst + agg
        if HAS_M:
            h *= tl.load(m_ptr + cols, mask=col_ok, other=0.0).to(ACC)[None, :]
        tl.store(out_ptr + offs, h.to(out_ptr.dtype.element_ty), mask=ok)

    @triton.jit
    def _gine_bwd_dst_kernel(grad_ptr, x_ptr, rowptr_ptr, col_ptr, emb_ptr, m_ptr, eps_ptr,
                             d_emb_ptr, dm_part_ptr, d_eps_part_ptr, num_nodes, F,
                             HAS_M: tl.constexpr, NEED_M: tl.constexpr, NEED_EPS: tl.constexpr,
                             ACC: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_F: tl.constexpr):
        pid_v = tl.program_id(0)
        rows = pid_v * BLOCK_V + tl.arange(0, BLOCK_V)
        cols = tl.program_id(1) * BLOCK_F + tl.arange(0, BLOCK_F)
        row_ok = rows < num_nodes
        col_ok = cols < F
        ok = row_ok[:, None] & col_ok[None, :]
        offs = rows[:, None].to(tl.int64) * F + cols[None, :]
        grad = tl.load(grad_ptr + offs, mask=ok, other=0.0).to(ACC)
        if HAS_M:
            grad_gated = grad * tl.load(m_ptr + cols, mask=col_ok, other=0.0).to(ACC)[None, :]
        else:
            grad_gated = grad
        start = tl.load(rowptr_ptr + rows, mask=row_ok, other=0)
        deg = tl.load(rowptr_ptr + rows + 1, mask=row_ok, other=0) - start
        agg = tl.zeros((BLOCK_V, BLOCK_F), dtype=ACC)
        for i in range(0, tl.max(deg, axis=0)):
            edge_ok = row_ok & (i < deg)
            edge = start + i
            src = tl.load(col_ptr + edge, mask=edge_ok, other=0)
            e_ok = edge_ok[:, None] & col_ok[None, :]
            x_src = tl.load(x_ptr + src[:, None] * F + cols[None, :], mask=e_ok, other=0.0).to(ACC)
            emb = tl.load(emb_ptr + edge[:, None] * F + cols[None, :], mask=e_ok, other=0.0).to(ACC)
            pre = x_src + emb
            # d emb[e] = m G[v] [pre > 0]; it is also edge e's contribution to dx[src]
            tl.store(d_emb_ptr + edge[:, None] * F + cols[None, :], tl.where(pre > 0.0, grad_gated, 0.0),
                     mask=e_ok)
            agg += tl.maximum(pre, 0.0)
        if NEED_M or NEED_EPS:
            x_dst = tl.load(x_ptr + offs, mask=ok, other=0.0).to(ACC)
            part = pid_v.to(tl.int64) * F + cols
            if NEED_M:
                h = (1.0 + tl.load(eps_ptr).to(ACC)) * x_dst + agg
                tl.store(dm_part_ptr + part, tl.sum(grad * h, axis=0), mask=col_ok)
            if NEED_EPS:
                tl.store(d_eps_part_ptr + part, tl.sum(grad_gated * x_dst, axis=0), mask=col_ok)

    @triton.jit
    def _gine_bwd_src_kernel(grad_ptr, m_ptr, eps_ptr, rowptr_t_ptr, perm_t_ptr, d_emb_ptr, dx_ptr,
                             num_nodes, F, HAS_M: tl.constexpr, ACC: tl.constexpr,
                             BLOCK_V: tl.constexpr, BLOCK_F: tl.constexpr):
        rows = tl.program_id(0) * BLOCK_V + tl.arange(0, BLOCK_V)
        cols = tl.program_id(1) * BLOCK_F + tl.arange(0, BLOCK_F)
        row_ok = rows < num_nodes
        col_ok = cols < F
        start = tl.load(rowptr_t_ptr + rows, mask=row_ok, other=0)
        deg = tl.load(rowptr_t_ptr + rows + 1, mask=row_ok, other=0) - start
        acc = tl.zeros((BLOCK_V, BLOCK_F), dtype=ACC)
        for i in range(0, tl.max(deg, axis=0)):
            edge_ok = row_ok & (i < deg)
            edge = tl.load(perm_t_ptr + start + i, mask=edge_ok, other=0)
            acc += tl.load(d_emb_ptr + edge[:, None] * F + cols[None, :],
                           mask=edge_ok[:, None] & col_ok[None, :], other=0.0)
        ok = row_ok[:, None] & col_ok[None, :]
        offs = rows[:, None].to(tl.int64) * F + cols[None, :]
        grad = tl.load(grad_ptr + offs, mask=ok, other=0.0).to(ACC)
        if HAS_M:
            grad *= tl.load(m_ptr + cols, mask=col_ok, other=0.0).to(ACC)[None, :]
        dx = (1.0 + tl.load(eps_ptr).to(ACC)) * grad + acc
        tl.store(dx_ptr + offs, dx.to(dx_ptr.dtype.element_ty), mask=ok)

    return _gine_fwd_kernel, _gine_bwd_dst_kernel, _gine_bwd_src_kernel


def _launch_params(x: torch.Tensor):
    import triton.language as tl

    if dispatch.triton_interpreted():
        block_v, block_f = _INTERPRET_BLOCK_V, _INTERPRET_BLOCK_F
    else:
        block_v, block_f = _BLOCK_V, _BLOCK_F
    acc = tl.float64 if x.dtype == torch.float64 else tl.float32
    grid = (-(-x.shape[0] // block_v), -(-x.shape[1] // block_f))
    return grid, dict(ACC=acc, BLOCK_V=block_v, BLOCK_F=block_f)


def _nonempty(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """A valid pointer for a kernel argument that has no elements (an edgeless graph)."""
    return t if t.numel() else like.new_zeros(1)


def _message_passing_forward_triton(x, rowptr, col, edge_emb, m, eps):
    out = torch.empty_like(x, memory_format=torch.contiguous_format)
    if x.numel() == 0:
        return out
    x = x.contiguous()
    m = m.contiguous() if m is not None else None  # 1-D loads use no stride
    grid, meta = _launch_params(x)
    fwd, _, _ = _kernels()
    fwd[grid](x, rowptr.contiguous(), _nonempty(col.contiguous(), rowptr),
              _nonempty(edge_emb.contiguous(), x), m if m is not None else x, eps, out,
              x.shape[0], x.shape[1], HAS_M=m is not None, **meta)
    return out


def _message_passing_backward_triton(grad, x, rowptr, col, edge_emb, m, eps, rowptr_t, perm_t,
                                     need_x, need_emb, need_m, need_eps):
    num_nodes, feats = x.shape
    need_m = need_m and m is not None
    if x.numel() == 0:
        return (torch.zeros_like(x) if need_x else None, torch.zeros_like(edge_emb) if need_emb else None,
                torch.zeros_like(m) if need_m else None, torch.zeros_like(eps) if need_eps else None)
    x = x.contiguous()
    grad = grad.contiguous()
    rowptr = rowptr.contiguous()
    m = m.contiguous() if m is not None else None  # 1-D loads use no stride
    acc_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    grid, meta = _launch_params(x)
    _, bwd_dst, bwd_src = _kernels()
    # d emb doubles as the per-edge message gradient that pass 2 gathers into dx
    d_emb = torch.empty(edge_emb.shape, dtype=acc_dtype, device=x.device)
    dm_part = torch.empty((grid[0], feats), dtype=acc_dtype, device=x.device) if need_m else d_emb
    d_eps_part = torch.empty((grid[0], feats), dtype=acc_dtype, device=x.device) if need_eps else d_emb
    if need_x or need_emb or need_m or need_eps:
        bwd_dst[grid](grad, x, rowptr, _nonempty(col.contiguous(), rowptr),
                      _nonempty(edge_emb.contiguous(), x), m if m is not None else x, eps,
                      _nonempty(d_emb, x), _nonempty(dm_part, x), _nonempty(d_eps_part, x),
                      num_nodes, feats, HAS_M=m is not None, NEED_M=need_m, NEED_EPS=need_eps, **meta)
    dx = None
    if need_x:
        if rowptr_t is None or perm_t is None:
            rowptr_t, perm_t = transpose_csr(rowptr, col)
        dx = torch.empty_like(x)
        bwd_src[grid](grad, m if m is not None else x, eps, rowptr_t.contiguous(),
                      _nonempty(perm_t.contiguous(), rowptr), _nonempty(d_emb, x), dx,
                      num_nodes, feats, HAS_M=m is not None, **meta)
    return (dx,
            d_emb.to(edge_emb.dtype) if need_emb else None,
            dm_part.sum(0).to(m.dtype) if need_m else None,
            d_eps_part.sum().to(eps.dtype).reshape(eps.shape) if need_eps else None)


# ----------------------------------------------------------------------------------------
# torch.library registration: the Triton path as custom ops torch.compile can see
# ----------------------------------------------------------------------------------------

# Both backends run through these ops (``backend="torch"`` is the reference's math): the
# reference's ``repeat_interleave`` has a data-dependent size that breaks
# ``torch.compile(fullgraph=True)``, an opaque op does not. The torch backend returns what
# the reference saves for its backward (``h``, ``dst``, ``[pre > 0]``) as extra outputs, so
# the CPU path costs what the reference costs; the Triton backend recomputes them in its
# backward kernels and returns empty tensors there.

def _empty_saved(x, col):
    return x.new_empty(0), col.new_empty(0, dtype=torch.long), x.new_empty(0, dtype=torch.bool)


@torch.library.custom_op("lumos::masked_message_passing", mutates_args=())
def _message_passing_op(x: torch.Tensor, rowptr: torch.Tensor, col: torch.Tensor, edge_emb: torch.Tensor,
                        m: Optional[torch.Tensor], eps: torch.Tensor, rowptr_t: Optional[torch.Tensor],
                        perm_t: Optional[torch.Tensor],
                        backend: str) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    if backend == "triton":
        return (_message_passing_forward_triton(x, rowptr, col, edge_emb, m, eps), *_empty_saved(x, col))
    h, dst, positive = _reference_aggregate(x, rowptr, col, edge_emb, eps)
    if m is None:  # h is only needed for dm; outputs must not alias each other
        return h, x.new_empty(0), dst, positive
    return h * m.to(h.dtype), h, dst, positive


@_message_passing_op.register_fake
def _(x, rowptr, col, edge_emb, m, eps, rowptr_t, perm_t, backend):
    out = torch.empty_like(x, memory_format=torch.contiguous_format)
    if backend == "triton":
        return (out, *_empty_saved(x, col))
    num_edges = col.shape[0]
    return (out, torch.empty_like(out) if m is not None else x.new_empty(0),
            col.new_empty(num_edges, dtype=torch.long), x.new_empty((num_edges, x.shape[1]), dtype=torch.bool))


@torch.library.custom_op("lumos::masked_message_passing_backward", mutates_args=())
def _message_passing_backward_op(grad: torch.Tensor, x: torch.Tensor, rowptr: torch.Tensor,
                                 col: torch.Tensor, edge_emb: torch.Tensor, m: Optional[torch.Tensor],
                                 eps: torch.Tensor, rowptr_t: Optional[torch.Tensor],
                                 perm_t: Optional[torch.Tensor], h: torch.Tensor, dst: torch.Tensor,
                                 positive: torch.Tensor, need_x: bool, need_emb: bool, need_m: bool,
                                 need_eps: bool, backend: str) -> List[torch.Tensor]:
    need_m = need_m and m is not None
    if backend == "triton":
        grads = _message_passing_backward_triton(grad, x, rowptr, col, edge_emb, m, eps, rowptr_t, perm_t,
                                                 need_x, need_emb, need_m, need_eps)
    else:
        grads = _reference_grads(grad, x, col, dst, positive, m, eps, h, need_x, need_emb, need_m, need_eps)
    # a custom op cannot return None: an empty tensor stands for "not needed"
    return [gr if gr is not None else x.new_empty(0) for gr in grads]


@_message_passing_backward_op.register_fake
def _(grad, x, rowptr, col, edge_emb, m, eps, rowptr_t, perm_t, h, dst, positive, need_x, need_emb, need_m,
      need_eps, backend):
    like = (x, edge_emb, m, eps)
    needs = (need_x, need_emb, need_m and m is not None, need_eps)
    return [torch.empty_like(t, memory_format=torch.contiguous_format) if need else x.new_empty(0)
            for t, need in zip(like, needs)]


def _message_passing_setup_context(ctx, inputs, output):
    ctx.save_for_backward(*inputs[:-1], *output[1:])
    ctx.backend = inputs[-1]


def _message_passing_backward(ctx, grad, _grad_h, _grad_dst, _grad_positive):
    x, rowptr, col, edge_emb, m, eps, rowptr_t, perm_t, h, dst, positive = ctx.saved_tensors
    need_x, _, _, need_emb, need_m, need_eps, _, _, _ = ctx.needs_input_grad
    dx, d_emb, dm, d_eps = _message_passing_backward_op(grad, x, rowptr, col, edge_emb, m, eps, rowptr_t,
                                                        perm_t, h, dst, positive, need_x, need_emb, need_m,
                                                        need_eps, ctx.backend)
    return (dx if need_x else None, None, None, d_emb if need_emb else None,
            dm if need_m and m is not None else None, d_eps if need_eps else None, None, None, None)


_message_passing_op.register_autograd(_message_passing_backward, setup_context=_message_passing_setup_context)


def masked_message_passing(x: torch.Tensor, rowptr: torch.Tensor, col: torch.Tensor,
                           edge_emb: torch.Tensor, m: torch.Tensor | None = None,
                           eps: float | torch.Tensor = 0.0, *, rowptr_t: torch.Tensor | None = None,
                           perm_t: torch.Tensor | None = None) -> torch.Tensor:
    """GINE aggregation with column gates (module docstring has the formula).

    Args:
        x: ``(num_nodes, F)`` node features.
        rowptr, col: CSR by destination from :func:`to_csr`.
        edge_emb: ``(E, F)`` edge embeddings in the same destination-sorted order as ``col``.
        m: ``(F,)`` column gates or None.
        eps: the GIN ``eps`` (float, or a scalar tensor to learn it).
        rowptr_t, perm_t: optional transposed CSR from :meth:`CSR.transposed` /
            :func:`transpose_csr`, used by the Triton backward; computed when omitted.

    Returns:
        ``(num_nodes, F)``. Both backends go through the custom op
        ``torch.ops.lumos.masked_message_passing``: the Triton kernels for CUDA tensors (or
        ``LUMOS_BACKEND=triton``), the torch reference's math for CPU tensors.
    """
    check_message_passing_args(x, rowptr, col, edge_emb, m, eps)
    if (rowptr_t is None) != (perm_t is None):
        raise ValueError("masked_message_passing: pass both `rowptr_t` and `perm_t`, or neither")
    if not isinstance(eps, torch.Tensor):
        eps = torch.tensor(float(eps), dtype=x.dtype, device=x.device)
    backend = dispatch.backend_for("masked_message_passing", x)
    return _message_passing_op(x, rowptr, col, edge_emb, m, eps.reshape(()), rowptr_t, perm_t, backend)[0]
