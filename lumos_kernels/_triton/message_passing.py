"""Triton kernels of masked_message_passing: skew-proof segment sums over a CSR, and the edge gradients.

A row of the CSR (a node's in-edges, or out-edges for the backward) is cut into *segments*
of at most ``chunk`` edges, so no program walks more than ``chunk`` edges whatever the
degrees: a hub of degree d becomes ``ceil(d / chunk)`` segments spread over programs.

- ``segment_sum_kernel`` (pass 1): each program owns ``BLOCK_S`` segments x ``BLOCK_F``
  feature columns and sums their messages. A row that is one segment (most rows) is finished
  there (self term, gate) and stored; the segments of a split row store their partial sums
  in a ``[slots, F]`` fp32 buffer.
- ``segment_finish_kernel`` (pass 2): one program per split row x column block adds that
  row's partials in a fixed order and finishes the row. No atomics: deterministic.
- ``edge_grad_kernel``: per edge ``e = (j, v)``, ``d emb[e] = m G[v] [x[j] + emb[e] > 0]``,
  plus per-program partial sums of ``G[v] relu(x[j] + emb[e])`` for the gate gradient.

The forward is pass 1 + 2 over the destination-sorted CSR with messages
``relu(x[col[e]] + emb[e])``; ``dx`` is pass 1 + 2 over the source-sorted CSR with messages
``d emb[perm_t[e]]``. Every feature-row address is computed in int64 (``N * F`` and
``E * F`` may pass 2**31 with int32 indices). Segment tables are built with torch ops and no
host sync (sizes are static bounds), once per graph (:mod:`lumos_kernels._memo`).
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from .. import _memo
from ..dispatch import triton_interpreted

CHUNK = 64               # most edges one program walks per segment on a GPU
INTERPRET_CHUNK = 1024   # under the interpreter each loop step costs ~0.1 ms: few, long segments


@triton.jit
def _finish_rows(out_ptr, self_ptr, m_ptr, eps_ptr, rows, row_ok, cols, col_ok, messages, F,
                 GATE_MESSAGES: tl.constexpr, HAS_M: tl.constexpr, ACC: tl.constexpr):
    """``out[row] = m * ((1 + eps) * self[row] + messages)`` (forward, ``GATE_MESSAGES``) or
    ``m * (1 + eps) * self[row] + messages`` (dx, whose messages carry the gate already)."""
    ok = row_ok[:, None] & col_ok[None, :]
    offs = rows[:, None].to(tl.int64) * F + cols[None, :]
    own = tl.load(self_ptr + offs, mask=ok, other=0.0).to(ACC) * (1.0 + tl.load(eps_ptr).to(ACC))
    if HAS_M:
        m = tl.load(m_ptr + cols, mask=col_ok, other=0.0).to(ACC)[None, :]
        if GATE_MESSAGES:
            result = m * (own + messages)
        else:
            result = m * own + messages
    else:
        result = own + messages
    tl.store(out_ptr + offs, result.to(out_ptr.dtype.element_ty), mask=ok)


@triton.jit
def segment_sum_kernel(value_ptr, index_ptr, emb_ptr, self_ptr, m_ptr, eps_ptr,
                       seg_row_ptr, seg_lo_ptr, seg_hi_ptr, seg_slot_ptr, out_ptr, part_ptr,
                       num_segments, num_nodes, F,
                       RELU_OF_SUM_WITH_EMB: tl.constexpr, GATE_MESSAGES: tl.constexpr, HAS_M: tl.constexpr,
                       ACC: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_F: tl.constexpr):
    seg = tl.program_id(0) * BLOCK_S + tl.arange(0, BLOCK_S)
    cols = tl.program_id(1) * BLOCK_F + tl.arange(0, BLOCK_F)
    seg_ok = seg < num_segments
    col_ok = cols < F
    rows = tl.load(seg_row_ptr + seg, mask=seg_ok, other=num_nodes)
    lo = tl.load(seg_lo_ptr + seg, mask=seg_ok, other=0)
    length = tl.load(seg_hi_ptr + seg, mask=seg_ok, other=0) - lo
    slot = tl.load(seg_slot_ptr + seg, mask=seg_ok, other=-1)
    acc = tl.zeros((BLOCK_S, BLOCK_F), dtype=ACC)
    # at most `chunk` steps, whatever the degrees: long rows were cut into several segments
    for i in range(0, tl.max(length, axis=0)):
        edge_ok = i < length
        edge = lo + i
        ok = edge_ok[:, None] & col_ok[None, :]
        src = tl.load(index_ptr + edge, mask=edge_ok, other=0).to(tl.int64)
        message = tl.load(value_ptr + src[:, None] * F + cols[None, :], mask=ok, other=0.0).to(ACC)
        if RELU_OF_SUM_WITH_EMB:
            emb = tl.load(emb_ptr + edge[:, None].to(tl.int64) * F + cols[None, :], mask=ok, other=0.0)
            message = tl.maximum(message + emb.to(ACC), 0.0)
        acc += message
    row_ok = rows < num_nodes
    _finish_rows(out_ptr, self_ptr, m_ptr, eps_ptr, rows, row_ok & (slot < 0), cols, col_ok, acc, F,
                 GATE_MESSAGES, HAS_M, ACC)
    partial = slot[:, None].to(tl.int64) * F + cols[None, :]
    tl.store(part_ptr + partial, acc, mask=(row_ok & (slot >= 0))[:, None] & col_ok[None, :])


@triton.jit
def segment_finish_kernel(part_ptr, split_row_ptr, split_slot_ptr, split_count_ptr, self_ptr, m_ptr, eps_ptr,
                          out_ptr, num_nodes, F, GATE_MESSAGES: tl.constexpr, HAS_M: tl.constexpr,
                          ACC: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_F: tl.constexpr):
    split = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK_F + tl.arange(0, BLOCK_F)
    col_ok = cols < F
    row = tl.load(split_row_ptr + split)
    first = tl.load(split_slot_ptr + split)
    count = tl.load(split_count_ptr + split)  # 0 for the padding entries (row == num_nodes)
    acc = tl.zeros((BLOCK_F,), dtype=ACC)
    for p0 in range(0, count, BLOCK_P):
        slots = p0 + tl.arange(0, BLOCK_P)
        ok = (slots < count)[:, None] & col_ok[None, :]
        tile = tl.load(part_ptr + (first + slots)[:, None].to(tl.int64) * F + cols[None, :], mask=ok, other=0.0)
        acc += tl.sum(tile, axis=0)
    rows = tl.zeros((1,), dtype=tl.int64) + row
    _finish_rows(out_ptr, self_ptr, m_ptr, eps_ptr, rows, rows < num_nodes, cols, col_ok, acc[None, :], F,
                 GATE_MESSAGES, HAS_M, ACC)


@triton.jit
def edge_grad_kernel(grad_ptr, x_ptr, col_ptr, dst_ptr, emb_ptr, m_ptr, d_emb_ptr, dm_part_ptr, num_edges, F,
                     HAS_M: tl.constexpr, STORE_D_EMB: tl.constexpr, NEED_M: tl.constexpr,
                     ACC: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_F: tl.constexpr):
    pid_e = tl.program_id(0)
    edge = pid_e.to(tl.int64) * BLOCK_E + tl.arange(0, BLOCK_E)
    cols = tl.program_id(1) * BLOCK_F + tl.arange(0, BLOCK_F)
    edge_ok = edge < num_edges
    col_ok = cols < F
    ok = edge_ok[:, None] & col_ok[None, :]
    src = tl.load(col_ptr + edge, mask=edge_ok, other=0).to(tl.int64)
    dst = tl.load(dst_ptr + edge, mask=edge_ok, other=0).to(tl.int64)
    edge_offs = edge[:, None] * F + cols[None, :]
    pre = (tl.load(x_ptr + src[:, None] * F + cols[None, :], mask=ok, other=0.0).to(ACC)
           + tl.load(emb_ptr + edge_offs, mask=ok, other=0.0).to(ACC))
    grad = tl.load(grad_ptr + dst[:, None] * F + cols[None, :], mask=ok, other=0.0).to(ACC)
    if STORE_D_EMB:
        if HAS_M:
            grad_gated = grad * tl.load(m_ptr + cols, mask=col_ok, other=0.0).to(ACC)[None, :]
        else:
            grad_gated = grad
        tl.store(d_emb_ptr + edge_offs, tl.where(pre > 0.0, grad_gated, 0.0), mask=ok)
    if NEED_M:
        # the message part of dm = sum_v G[v] * h[v]; the self part is added by the launcher
        tl.store(dm_part_ptr + pid_e.to(tl.int64) * F + cols, tl.sum(grad * tl.maximum(pre, 0.0), axis=0),
                 mask=col_ok)


# ----------------------------------------------------------------------------------------
# Segment tables and tiles
# ----------------------------------------------------------------------------------------

class SegmentPlan(NamedTuple):
    """A CSR cut into segments of at most ``chunk`` edges (all int64, built without a host sync).

    Segment ``s`` covers edges ``lo[s]:hi[s]`` of row ``row[s]`` (``row == num_nodes`` marks the
    padding up to the static bound ``num_nodes + cdiv(E, chunk)``); ``slot[s]`` is its partial
    row for a split row, -1 for a row that is one segment. ``split_row`` lists the split rows
    (padded with ``num_nodes`` to the bound ``E // (chunk + 1)``), with the first partial slot
    and the number of partials of each.
    """

    row: torch.Tensor
    lo: torch.Tensor
    hi: torch.Tensor
    slot: torch.Tensor
    split_row: torch.Tensor
    split_slot: torch.Tensor
    split_count: torch.Tensor
    num_slots: int


def segment_plan(rowptr: torch.Tensor, num_edges: int, chunk: int) -> SegmentPlan:
    num_nodes = rowptr.numel() - 1
    rowptr = rowptr.long()
    degree = rowptr[1:] - rowptr[:-1]
    pieces = ((degree + chunk - 1) // chunk).clamp_(min=1)  # an edgeless row still gets its self term
    pieces_end = pieces.cumsum(0)
    # sum(max(1, ceil(d / chunk))) <= num_nodes + E / chunk
    seg = torch.arange(num_nodes + triton.cdiv(num_edges, chunk), device=rowptr.device)
    row = torch.searchsorted(pieces_end, seg, right=True)
    valid = row < num_nodes
    row_c = row.clamp(max=num_nodes - 1)
    lo = rowptr[row_c] + (seg - (pieces_end[row_c] - pieces[row_c])) * chunk
    hi = torch.minimum(lo + chunk, rowptr[row_c + 1])
    lo, hi = torch.where(valid, lo, 0), torch.where(valid, hi, 0)
    split = valid & (pieces[row_c] > 1)
    slot = torch.where(split, split.cumsum(0) - 1, -1)
    # a split row has degree > chunk: fewer than E / (chunk + 1) of them, with < 2 E / chunk pieces
    split_row = torch.nonzero_static(pieces > 1, size=num_edges // (chunk + 1), fill_value=num_nodes)[:, 0]
    split_ok = split_row < num_nodes
    split_c = split_row.clamp(max=num_nodes - 1)
    first_seg = pieces_end[split_c] - pieces[split_c]
    return SegmentPlan(row, lo, hi, slot, split_row,
                       torch.where(split_ok, slot[first_seg.clamp(max=seg.numel() - 1)], 0),
                       torch.where(split_ok, pieces[split_c], 0), 2 * triton.cdiv(num_edges, chunk))


def _chunk() -> int:
    return INTERPRET_CHUNK if triton_interpreted() else CHUNK


def _plan(rowptr: torch.Tensor, num_edges: int) -> SegmentPlan:
    chunk = _chunk()
    return _memo.remembered(rowptr, ("segment_plan", num_edges, chunk),
                            lambda: segment_plan(rowptr, num_edges, chunk))


class _Tiles(NamedTuple):
    block_f: int
    block_s: int   # segments per program (pass 1)
    block_p: int   # partials per step (pass 2)
    block_e: int   # edges per program (edge gradients)


def _tiles(feats: int) -> _Tiles:
    """Tiles chosen per F: a column block that F fills, rows so that a tile holds ~2k values."""
    block_f = min(128, max(16, triton.next_power_of_2(max(feats, 1))))
    if triton_interpreted():  # few programs: each one costs milliseconds
        return _Tiles(block_f, 128, 64, 1024)
    rows = max(16, min(128, 2048 // block_f))
    return _Tiles(block_f, rows, 16, rows)


def _acc(dtype: torch.dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


def _nonempty(t: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
    """A valid pointer for a kernel argument that has no elements (an edgeless graph)."""
    return t if t is not None and t.numel() else like.new_zeros(1)


# ----------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------

def _segment_sums(out, values, index, emb, own, m, eps, rowptr, num_edges, is_forward):
    """Pass 1 + 2 of the module docstring: ``out`` (N, F) from a CSR's segments."""
    num_nodes, feats = out.shape
    plan = _plan(rowptr, num_edges)
    tiles = _tiles(feats)
    acc = _acc(own.dtype)
    acc_dtype = torch.float64 if own.dtype == torch.float64 else torch.float32
    partials = torch.empty((max(plan.num_slots, 1), feats), dtype=acc_dtype, device=out.device)
    flags = dict(GATE_MESSAGES=is_forward, HAS_M=m is not None, ACC=acc)
    m_arg = m if m is not None else own
    grid = (triton.cdiv(plan.row.numel(), tiles.block_s), triton.cdiv(feats, tiles.block_f))
    segment_sum_kernel[grid](
        _nonempty(values, own), _nonempty(index, rowptr), _nonempty(emb, own), own, m_arg, eps,
        plan.row, plan.lo, plan.hi, plan.slot, out, partials, plan.row.numel(), num_nodes, feats,
        RELU_OF_SUM_WITH_EMB=is_forward, **flags, BLOCK_S=tiles.block_s, BLOCK_F=tiles.block_f)
    if plan.split_row.numel():
        grid = (plan.split_row.numel(), triton.cdiv(feats, tiles.block_f))
        segment_finish_kernel[grid](
            partials, plan.split_row, plan.split_slot, plan.split_count, own, m_arg, eps, out, num_nodes, feats,
            **flags, BLOCK_P=tiles.block_p, BLOCK_F=tiles.block_f)
    return out


def forward(x, rowptr, col, edge_emb, m, eps):
    """``m * ((1 + eps) x + sum_j relu(x[j] + emb[e]))``, a fresh ``(N, F)`` tensor."""
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    x, edge_emb = x.contiguous(), edge_emb.contiguous()
    m = m.contiguous() if m is not None else None  # 1-D loads use no stride
    return _segment_sums(out, x, col.contiguous(), edge_emb, x, m, eps, rowptr.contiguous(), col.numel(),
                         is_forward=True)


def destinations(rowptr: torch.Tensor, num_edges: int) -> torch.Tensor:
    """``(E,)`` int64 destination of each destination-sorted edge (no host sync; remembered)."""
    def compute():
        num_nodes = rowptr.numel() - 1
        return torch.repeat_interleave(torch.arange(num_nodes, device=rowptr.device), rowptr[1:] - rowptr[:-1],
                                       output_size=num_edges)
    return _memo.remembered(rowptr, ("destinations", num_edges), compute)


def backward(grad, x, rowptr, col, edge_emb, m, eps, rowptr_t, perm_t, needs):
    """``(dx, d_emb, dm, d_eps)`` (None where not needed); ``rowptr_t, perm_t`` the source-sorted CSR."""
    need_x, need_emb, need_m, need_eps = needs
    num_nodes, feats = x.shape
    num_edges = col.numel()
    x, grad, edge_emb, col = x.contiguous(), grad.contiguous(), edge_emb.contiguous(), col.contiguous()
    m = m.contiguous() if m is not None else None
    acc_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    tiles = _tiles(feats)
    d_emb = dm_part = None
    if num_edges and (need_x or need_emb or need_m):
        grid = (triton.cdiv(num_edges, tiles.block_e), triton.cdiv(feats, tiles.block_f))
        # d emb doubles as the per-edge message gradient that the dx pass gathers
        d_emb = torch.empty((num_edges, feats), dtype=acc_dtype, device=x.device) if need_x or need_emb else None
        dm_part = torch.empty((grid[0], feats), dtype=acc_dtype, device=x.device) if need_m else None
        edge_grad_kernel[grid](
            grad, x, col, destinations(rowptr.contiguous(), num_edges), edge_emb,
            m if m is not None else x, _nonempty(d_emb, x), _nonempty(dm_part, x), num_edges, feats,
            HAS_M=m is not None, STORE_D_EMB=d_emb is not None, NEED_M=need_m, ACC=_acc(x.dtype),
            BLOCK_E=tiles.block_e, BLOCK_F=tiles.block_f)
    dx = None
    if need_x:
        dx = _segment_sums(torch.empty(x.shape, dtype=x.dtype, device=x.device), d_emb, perm_t.contiguous(), None,
                           grad, m, eps, rowptr_t.contiguous(), num_edges, is_forward=False)
    dm = d_eps = None
    if need_m or need_eps:
        grad_x = torch.linalg.vecdot(grad.to(acc_dtype), x.to(acc_dtype), dim=0)  # sum_v G[v] x[v], per column
        if need_m:
            dm = (1 + eps.to(acc_dtype)) * grad_x
            if dm_part is not None:
                dm = dm + dm_part.sum(0)
            dm = dm.to(m.dtype)
        if need_eps:
            d_eps = (grad_x * m.to(acc_dtype) if m is not None else grad_x).sum().to(eps.dtype).reshape(eps.shape)
    return dx, (d_emb.to(edge_emb.dtype) if need_emb and d_emb is not None else
                torch.zeros_like(edge_emb) if need_emb else None), dm, d_eps
