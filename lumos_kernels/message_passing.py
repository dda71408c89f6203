"""Masked GINE message passing over a CSR graph sorted by destination node.

For node ``v`` with in-neighbours ``j`` (edge ``e = (j, v)``) and column gates ``m`` (F,):

    out[v] = m * ((1 + eps) * x[v] + sum_j relu(x[j] + edge_emb[e]))

Gradients (KERNELS.md 1), with ``G = dL/dout`` and ``h`` the bracket above:

    d edge_emb[e] = m * G[v] * [x[j] + edge_emb[e] > 0]
    dx[j]        += m * G[v] * [x[j] + edge_emb[e] > 0]     for every edge leaving j
    dx[v]        += (1 + eps) * m * G[v]
    dm            = sum_v G[v] * h[v] = (1 + eps) sum_v G[v] x[v] + sum_e G[v] relu(x[j] + emb[e])
    d eps         = sum_v sum_cols m * G[v] * x[v]

Triton backend (CUDA tensors, or CPU tensors under ``TRITON_INTERPRET=1``; kernels and their
design in ``lumos_kernels/_triton/message_passing.py``): rows are cut into segments of at most
64 edges spread over programs, and split rows are finished by a deterministic second pass, so
a hub node costs no more wall time than its share of the edges (no serial walk over a high
degree); tiles are chosen per ``F``. The forward uses no atomics. The backward computes the
per-edge gradient edge-parallel (it is ``d emb``), then ``dx`` as the same segment sums over
the **transposed CSR** (``rowptr_t`` by source, ``perm_t`` mapping each source-sorted edge to
its destination-sorted position), again without atomics: gradients are bitwise reproducible,
as DDP ranks need. The transposed CSR costs one ``argsort`` of ``col`` per graph: pass it
(:meth:`CSR.transposed`) or let the op compute and remember it. fp32, fp16, bf16 (and fp64)
features with fp32 accumulation (fp64 for fp64); int32 or int64 indices, addresses in int64.

Every call checks the graph (``rowptr`` starts at 0, ends at ``E``, never decreases; ``col``
in ``[0, num_nodes)``; a given transposed CSR matches ``col``), once per graph tensor: the
result is remembered while the tensors are alive and not modified in place. (While a CUDA
graph is being captured no check can run; the eager warm-up call before capture checks. A
compiled torch backend does not check either: its indexing still refuses nodes out of range.)

The Triton backend is the custom op ``torch.ops.lumos.masked_message_passing`` with that
backward registered; the torch backend (CPU tensors) is :func:`masked_message_passing_reference`,
plain torch differentiated by autograd (see :mod:`lumos_kernels.dispatch`).
"""
from __future__ import annotations

from typing import List, NamedTuple, Optional, Tuple

import torch

from . import _memo, dispatch

_OP = "masked_message_passing"
_INDEX_DTYPES = (torch.int32, torch.int64)


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
        return torch.repeat_interleave(torch.arange(self.num_nodes, device=self.rowptr.device), counts,
                                       output_size=self.col.numel())

    def transposed(self) -> Tuple[torch.Tensor, torch.Tensor]:
        """``(rowptr_t, perm_t)``: the CSR keyed by *source* node (see :func:`transpose_csr`), cached."""
        cached = self.__dict__.get("_transposed")
        if cached is None:
            cached = transpose_csr(self.rowptr, self.col)
            self.__dict__["_transposed"] = cached
        return cached


def transpose_csr(rowptr: torch.Tensor, col: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """The source-keyed view of a destination-sorted CSR, for the message-passing backward.

    Returns ``(rowptr_t, perm_t)``, int64: edges leaving node ``j`` are the destination-sorted
    edge positions ``perm_t[rowptr_t[j]:rowptr_t[j+1]]`` (a stable sort, so deterministic).
    Computed without a host sync.
    """
    num_nodes = rowptr.numel() - 1
    col = col.long()
    perm_t = torch.argsort(col, stable=True)
    nodes = torch.arange(num_nodes + 1, device=col.device)
    rowptr_t = torch.searchsorted(col[perm_t], nodes)  # edges whose source is < j
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
    csr = CSR(rowptr, src[perm].contiguous(), perm)
    _memo.remember(csr.rowptr, "checked", True, csr.col)  # valid by construction
    return csr


# ----------------------------------------------------------------------------------------
# Argument and graph checks
# ----------------------------------------------------------------------------------------

def check_message_passing_args(x, rowptr, col, edge_emb, m, eps) -> None:
    """Raise a clear error for wrong shapes, dtypes or devices (shared by both backends)."""
    if x.dim() != 2:
        raise ValueError(f"{_OP}: `x` must be (num_nodes, F), got {tuple(x.shape)}")
    dispatch.check_float(_OP, "x", x)
    dispatch.check_float(_OP, "edge_emb", edge_emb)
    dispatch.check_float(_OP, "m", m)
    for name, t in (("rowptr", rowptr), ("col", col)):
        _check_index(name, t)
    if rowptr.numel() != x.shape[0] + 1:
        raise ValueError(
            f"{_OP}: `rowptr` must have num_nodes + 1 = {x.shape[0] + 1} entries, got {rowptr.numel()}"
        )
    if edge_emb.shape != (col.numel(), x.shape[1]):
        raise ValueError(
            f"{_OP}: `edge_emb` must be (E, F) = ({col.numel()}, {x.shape[1]}) in destination-sorted "
            f"edge order, got {tuple(edge_emb.shape)}"
        )
    if edge_emb.dtype != x.dtype:
        raise TypeError(f"{_OP}: `edge_emb` must have the dtype of `x` ({x.dtype}), got {edge_emb.dtype}")
    dispatch.check_vector(_OP, "m", m, x.shape[1], "one gate per feature column")
    if isinstance(eps, torch.Tensor) and eps.numel() != 1:
        raise ValueError(f"{_OP}: `eps` must be a scalar, got shape {tuple(eps.shape)}")
    dispatch.check_same_device(_OP, x=x, rowptr=rowptr, col=col, edge_emb=edge_emb, m=m,
                               eps=eps if isinstance(eps, torch.Tensor) else None)


def _check_index(name: str, t: torch.Tensor) -> None:
    if not isinstance(t, torch.Tensor) or t.dim() != 1 or t.dtype not in _INDEX_DTYPES:
        got = f"{tuple(t.shape)} {t.dtype}" if isinstance(t, torch.Tensor) else type(t).__name__
        raise TypeError(f"{_OP}: `{name}` must be a 1-D int32 or int64 tensor, got {got}")


def _rowptr_problems(name: str, rowptr: torch.Tensor, num_edges: int) -> List[str]:
    """What is wrong with a CSR row pointer (one host sync)."""
    first, last, decreasing = torch.stack([
        rowptr[0].long(), rowptr[-1].long(), (rowptr[1:] < rowptr[:-1]).sum()]).tolist()
    problems = []
    if first != 0:
        problems.append(f"`{name}` must start at 0, got {first}")
    if last != num_edges:
        problems.append(f"`{name}` must end at E = len(col) = {num_edges}, got {last}")
    if decreasing:
        problems.append(f"`{name}` must never decrease, it does at {decreasing} places")
    return problems


def _raise(problems: List[str]) -> None:
    if problems:
        raise ValueError(f"{_OP}: {'; '.join(problems)} (build the graph with lumos_kernels.to_csr)")


def _check_graph(rowptr: torch.Tensor, col: torch.Tensor) -> None:
    """Raise ValueError unless ``(rowptr, col)`` is a valid CSR (remembered per graph)."""
    num_nodes = rowptr.numel() - 1

    def check():
        problems = _rowptr_problems("rowptr", rowptr, col.numel())
        if col.numel():
            low, high = torch.stack([col.min().long(), col.max().long()]).tolist()
            if low < 0 or high >= num_nodes:
                problems.append(f"`col` values must lie in [0, num_nodes={num_nodes}), got [{low}, {high}]")
        _raise(problems)
        return True

    if not dispatch.capturing_cuda_graph():
        _memo.remembered(rowptr, "checked", check, col)


def _check_transposed(rowptr_t: torch.Tensor, perm_t: torch.Tensor, col: torch.Tensor, num_nodes: int) -> None:
    """Raise ValueError unless ``(rowptr_t, perm_t)`` is the source-sorted view of ``col``."""
    num_edges = col.numel()

    def check():
        _check_index("rowptr_t", rowptr_t)
        _check_index("perm_t", perm_t)
        if rowptr_t.numel() != num_nodes + 1:
            raise ValueError(f"{_OP}: `rowptr_t` must have num_nodes + 1 = {num_nodes + 1} entries, "
                             f"got {rowptr_t.numel()}")
        if perm_t.numel() != num_edges:
            raise ValueError(f"{_OP}: `perm_t` must have E = {num_edges} entries, got {perm_t.numel()}")
        problems = _rowptr_problems("rowptr_t", rowptr_t, num_edges)
        if num_edges and not problems:
            low, high = torch.stack([perm_t.min().long(), perm_t.max().long()]).tolist()
            if low < 0 or high >= num_edges:
                problems.append(f"`perm_t` values must lie in [0, E={num_edges}), got [{low}, {high}]")
            else:
                covered = torch.zeros(num_edges, dtype=torch.bool, device=col.device)
                covered.index_fill_(0, perm_t.long(), True)
                source = torch.repeat_interleave(torch.arange(rowptr_t.numel() - 1, device=col.device),
                                                 rowptr_t[1:] - rowptr_t[:-1], output_size=num_edges)
                if not bool(covered.all() & (col[perm_t].long() == source).all()):
                    problems.append("`rowptr_t, perm_t` must be the source-sorted view of `col` "
                                    "(lumos_kernels.message_passing.transpose_csr)")
        _raise(problems)
        return True

    if not dispatch.capturing_cuda_graph():
        _memo.remembered(rowptr_t, "checked_transposed", check, perm_t, col)


# ----------------------------------------------------------------------------------------
# The torch backend (also the reference of the Triton kernels)
# ----------------------------------------------------------------------------------------

def masked_message_passing_reference(x, rowptr, col, edge_emb, m=None, eps=0.0):
    """Plain-torch :func:`masked_message_passing` (same arguments, any device; gradients from
    autograd): the torch backend, and the oracle of the Triton kernels. Its one data-dependent
    size, the edges' destinations, is given (``output_size=E``), so ``torch.compile`` traces it."""
    num_nodes = rowptr.numel() - 1
    dst = torch.repeat_interleave(torch.arange(num_nodes, device=x.device), rowptr[1:] - rowptr[:-1],
                                  output_size=col.numel())
    h = (1 + eps) * x + torch.zeros_like(x).index_add(0, dst, torch.relu(x[col] + edge_emb))
    return h * m.to(h.dtype) if m is not None else h


def _runs_triton(backend: str, x: torch.Tensor) -> bool:
    return backend == "triton" and x.numel() > 0  # no nodes or no columns: nothing to launch


# ----------------------------------------------------------------------------------------
# The Triton backend: a custom op and its one backward
# ----------------------------------------------------------------------------------------

@torch.library.custom_op("lumos::masked_message_passing", mutates_args=())
def _message_passing_op(x: torch.Tensor, rowptr: torch.Tensor, col: torch.Tensor, edge_emb: torch.Tensor,
                        m: Optional[torch.Tensor], eps: torch.Tensor, rowptr_t: Optional[torch.Tensor],
                        perm_t: Optional[torch.Tensor]) -> torch.Tensor:
    _check_graph(rowptr, col)
    if rowptr_t is not None:
        _check_transposed(rowptr_t, perm_t, col, x.shape[0])
    return dispatch.triton_kernels("message_passing").forward(x, rowptr, col, edge_emb, m, eps)


@_message_passing_op.register_fake
def _(x, rowptr, col, edge_emb, m, eps, rowptr_t, perm_t):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


@torch.library.custom_op("lumos::masked_message_passing_backward", mutates_args=())
def _message_passing_backward_op(grad: torch.Tensor, x: torch.Tensor, rowptr: torch.Tensor,
                                 col: torch.Tensor, edge_emb: torch.Tensor, m: Optional[torch.Tensor],
                                 eps: torch.Tensor, rowptr_t: Optional[torch.Tensor],
                                 perm_t: Optional[torch.Tensor], need_x: bool, need_emb: bool, need_m: bool,
                                 need_eps: bool) -> List[torch.Tensor]:
    needs = (need_x, need_emb, need_m and m is not None, need_eps)
    if rowptr_t is None:
        rowptr_t, perm_t = _memo.remembered(rowptr, "transposed", lambda: transpose_csr(rowptr, col), col)
    grads = dispatch.triton_kernels("message_passing").backward(grad, x, rowptr, col, edge_emb, m, eps,
                                                                rowptr_t, perm_t, needs)
    return dispatch.none_as_empty(grads, x)


@_message_passing_backward_op.register_fake
def _(grad, x, rowptr, col, edge_emb, m, eps, rowptr_t, perm_t, need_x, need_emb, need_m, need_eps):
    like = (x, edge_emb, m, eps)
    needs = (need_x, need_emb, need_m and m is not None, need_eps)
    return [torch.empty_like(t, memory_format=torch.contiguous_format) if need else x.new_empty(0)
            for t, need in zip(like, needs)]


def _message_passing_setup_context(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _message_passing_backward(ctx, grad):
    x, rowptr, col, edge_emb, m, eps, rowptr_t, perm_t = ctx.saved_tensors
    need_x, _, _, need_emb, need_m, need_eps, _, _ = ctx.needs_input_grad
    needs = (need_x, need_emb, need_m and m is not None, need_eps)
    grads = _message_passing_backward_op(grad, x, rowptr, col, edge_emb, m, eps, rowptr_t, perm_t, *needs)
    dx, d_emb, dm, d_eps = dispatch.wanted(grads, needs)
    return dx, None, None, d_emb, dm, d_eps, None, None


_message_passing_op.register_autograd(_message_passing_backward, setup_context=_message_passing_setup_context)


def masked_message_passing(x: torch.Tensor, rowptr: torch.Tensor, col: torch.Tensor,
                           edge_emb: torch.Tensor, m: torch.Tensor | None = None,
                           eps: float | torch.Tensor = 0.0, *, rowptr_t: torch.Tensor | None = None,
                           perm_t: torch.Tensor | None = None) -> torch.Tensor:
    """GINE aggregation with column gates (module docstring has the formula).

    Args:
        x: ``(num_nodes, F)`` node features.
        rowptr, col: CSR by destination from :func:`to_csr` (int32 or int64).
        edge_emb: ``(E, F)`` edge embeddings in the same destination-sorted order as ``col``.
        m: ``(F,)`` column gates or None.
        eps: the GIN ``eps`` (float, or a scalar tensor to learn it).
        rowptr_t, perm_t: optional transposed CSR from :meth:`CSR.transposed` /
            :func:`transpose_csr`, used by the Triton backward; computed once per graph when
            omitted.

    Returns:
        ``(num_nodes, F)``, a new tensor (safe to modify in place). CUDA tensors (or
        ``LUMOS_BACKEND=triton``) run the Triton kernels through the custom op
        ``torch.ops.lumos.masked_message_passing``; CPU tensors the torch backend, the formula
        of :func:`masked_message_passing_reference` in plain torch, differentiated by autograd.
        The graph is checked on the first eager call with it; a compiled torch backend does not
        check it (its indexing still refuses nodes out of range).
    """
    check_message_passing_args(x, rowptr, col, edge_emb, m, eps)
    if (rowptr_t is None) != (perm_t is None):
        raise ValueError(f"{_OP}: pass both `rowptr_t` and `perm_t`, or neither")
    if not isinstance(eps, torch.Tensor):
        eps = torch.tensor(float(eps), dtype=x.dtype, device=x.device)
    if _runs_triton(dispatch.backend_for(_OP, x), x):
        return _message_passing_op(x, rowptr, col, edge_emb, m, eps.reshape(()), rowptr_t, perm_t)
    if not torch.compiler.is_compiling():  # remembered per graph: a host sync once
        _check_graph(rowptr, col)
        if rowptr_t is not None:
            _check_transposed(rowptr_t, perm_t, col, x.shape[0])
    return masked_message_passing_reference(x, rowptr, col, edge_emb, m, eps.reshape(()))
