"""GINE graph convolution (GIN with edge features): plain and with L0 column gates.

A :class:`GINConv` is an aggregation followed by an MLP. The aggregation is its own module
(:class:`GINEAggregation`, gated twin :class:`GatedGINEAggregation`) so that compaction traces
*through* the convolution: the MLP's ``nn.Linear`` layers are gated and shrunk by the same rules
as any other linear layer, and the aggregation's rule (``lumos/plan/ops_graph.py``) shrinks
the feature columns. A compacted model holds the narrower aggregation as plain torch ops
(``index_select``, ``index_add``: ``lumos/compact/build_graph.py``) followed by the MLP's plain
``nn.Linear`` layers.
"""
from __future__ import annotations

import copy

import torch
from torch import nn

from lumos_kernels import dispatch, masked_message_passing, to_csr
from lumos_kernels.message_passing import CSR

from ..gates import HardConcreteGate


def _is_tracing() -> bool:
    """True under ``torch.jit.trace`` / ``torch.compile`` / ``torch.export`` (no Python-side cache there)."""
    return torch.jit.is_tracing() or torch.compiler.is_compiling()


class GINEAggregation(nn.Module):
    r"""The GINE aggregation step, with an optional fixed column scale ``s``:

    .. math::
        h_v = s \odot \Big((1 + \epsilon)\, x_v + \sum_{j \to v} \mathrm{relu}(x_j + W_e e_{jv} + b_e)\Big)

    ``s`` is the buffer ``out_scale`` (None, i.e. 1, unless a compacted model folded fractional
    gate values into it). The graph's CSR (destination-sorted, :func:`lumos_kernels.to_csr`) is
    computed once per ``edge_index`` tensor and cached (recomputed when the tensor, its shape, its
    in-place version or the node count changes).

    Args:
        in_channels: node feature columns ``F``.
        edge_dim: edge feature columns; ``None``: ``edge_attr`` already has ``F`` columns and is
            used as is (PyG ``GINEConv`` without ``edge_dim``).
        train_eps: learn ``eps`` (a parameter) or keep it fixed (a buffer).
        eps: initial ``eps``.

    Shapes:
        x ``(N, F)``, edge_index ``(2, E)`` integer (source, destination),
        edge_attr ``(E, edge_dim)``; output ``(N, F)``.
    """

    def __init__(self, in_channels: int, edge_dim: int | None, train_eps: bool = False, eps: float = 0.0, *,
                 device=None, dtype=None):
        super().__init__()
        if not isinstance(in_channels, int) or in_channels < 0:
            raise ValueError(f"GINEAggregation: `in_channels` must be an int >= 0, got {in_channels!r}")
        self.in_channels, self.edge_dim, self.train_eps = in_channels, edge_dim, bool(train_eps)
        self.edge_lin = (nn.Linear(edge_dim, in_channels, device=device, dtype=dtype)
                         if edge_dim is not None else None)
        value = torch.tensor(float(eps), device=device, dtype=dtype)
        if train_eps:
            self.eps = nn.Parameter(value)
        else:
            self.register_buffer("eps", value)
        self.register_buffer("out_scale", None)
        self._csr_cache: tuple | None = None

    def csr(self, edge_index: torch.Tensor, num_nodes: int) -> CSR:
        """The destination-sorted CSR of ``edge_index``, from the cache when it still applies."""
        if _is_tracing():
            return to_csr(edge_index, num_nodes)
        key = (edge_index, tuple(edge_index.shape), edge_index._version, int(num_nodes))
        cached = self._csr_cache
        if cached is None or cached[0][0] is not edge_index or cached[0][1:] != key[1:]:
            cached = self._csr_cache = (key, to_csr(edge_index, num_nodes))
        return cached[1]

    def _check(self, x, edge_index, edge_attr) -> None:
        name = type(self).__name__
        if not isinstance(x, torch.Tensor) or x.dim() != 2 or x.shape[1] != self.in_channels:
            shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"{name}: `x` must be (num_nodes, {self.in_channels}), got {shape}")
        if not isinstance(edge_index, torch.Tensor) or edge_index.dim() != 2 or edge_index.shape[0] != 2:
            shape = tuple(edge_index.shape) if isinstance(edge_index, torch.Tensor) else type(edge_index).__name__
            raise ValueError(f"{name}: `edge_index` must be (2, E) (source, destination rows), got {shape}")
        if isinstance(edge_attr, torch.Tensor) and not edge_attr.is_floating_point():
            raise TypeError(f"{name}: `edge_attr` must be floating point, got {edge_attr.dtype}; "
                            "one-hot encode categorical bond types and pass .float()")
        cols = self.edge_dim if self.edge_lin is not None else self.in_channels
        if not isinstance(edge_attr, torch.Tensor) or edge_attr.dim() != 2 \
                or edge_attr.shape != (edge_index.shape[1], cols):
            shape = tuple(edge_attr.shape) if isinstance(edge_attr, torch.Tensor) else type(edge_attr).__name__
            raise ValueError(f"{name}: `edge_attr` must be (E, {cols}) = ({edge_index.shape[1]}, {cols}) "
                             f"(one row per column of `edge_index`), got {shape}")

    def column_mask(self) -> torch.Tensor | None:
        """The ``(F,)`` per-column factor applied to the output (None: all ones)."""
        return self.out_scale

    def forward(self, x: torch.Tensor, edge_index: torch.Tensor, edge_attr: torch.Tensor) -> torch.Tensor:
        self._check(x, edge_index, edge_attr)
        csr = self.csr(edge_index, x.shape[0])
        emb = edge_attr[csr.perm]
        if self.edge_lin is not None:
            emb = self.edge_lin(emb)
        transposed = {}
        if not _is_tracing() and dispatch.backend_for("masked_message_passing", x) == "triton":
            # the kernel's backward walks the source-keyed CSR: build it once per cached graph
            transposed = dict(zip(("rowptr_t", "perm_t"), csr.transposed()))
        return masked_message_passing(x, csr.rowptr, csr.col, emb.to(x.dtype), self.column_mask(), self.eps,
                                      **transposed)

    def __getstate__(self):  # the cache holds graph tensors: never pickle or deep-copy it
        state = super().__getstate__()
        state["_csr_cache"] = None
        return state

    def extra_repr(self) -> str:
        return f"in_channels={self.in_channels}, edge_dim={self.edge_dim}, train_eps={self.train_eps}"


class GatedGINEAggregation(GINEAggregation):
    r"""GINE aggregation with one L0 gate per feature column (DESIGN.md 1, GNN):

    .. math::
        h = m \odot \Big((1 + \epsilon)\, X + \mathrm{prop}(\mathrm{emb}(E), X)\Big)

    so the layer after it reads ``W((1 + eps) m X + m prop(emb(E), X))``. A closed column is
    exactly zero; compaction drops it from ``x``, from the edge embedding's rows and from the
    next layer's input columns. The gate goes through ``masked_message_passing``'s ``m``.

    Args: as :class:`GINEAggregation`, plus ``**gate_kwargs`` for the
    :class:`lumos.gates.HardConcreteGate` ``column_gate``.

    Shapes: as :class:`GINEAggregation`.
    """

    def __init__(self, in_channels: int, edge_dim: int | None, train_eps: bool = False, eps: float = 0.0, *,
                 device=None, dtype=None, **gate_kwargs):
        super().__init__(in_channels, edge_dim, train_eps, eps, device=device, dtype=dtype)
        self.column_gate = HardConcreteGate(in_channels, device=device, **gate_kwargs)

    @classmethod
    def from_aggregation(cls, aggregation: GINEAggregation, **gate_kwargs) -> "GatedGINEAggregation":
        """A gated copy of ``aggregation`` with the same weights (copied, not shared)."""
        if aggregation.out_scale is not None:
            raise ValueError("GatedGINEAggregation.from_aggregation: `aggregation` has a fixed `out_scale` "
                             "(it comes from a compacted model); gate the original model instead")
        ref = aggregation.eps
        layer = cls(aggregation.in_channels, aggregation.edge_dim, aggregation.train_eps, float(ref.detach()),
                    device=ref.device, dtype=ref.dtype, **gate_kwargs)
        if aggregation.edge_lin is not None:
            layer.edge_lin.load_state_dict(aggregation.edge_lin.state_dict())
        return layer

    def column_mask(self) -> torch.Tensor:
        return self.column_gate()

    def extra_repr(self) -> str:
        kept = int(self.column_gate.kept().sum())
        return super().extra_repr() + f", kept_columns={kept}/{self.in_channels}"


class GINConv(nn.Module):
    r"""GINE convolution (Hu et al. 2020; PyG's ``GINEConv``), lumos' plain GNN layer:

    .. math::
        \mathrm{out}_v = \mathrm{MLP}\Big((1 + \epsilon)\, x_v + \sum_{j \to v}
        \mathrm{relu}(x_j + W_e e_{jv} + b_e)\Big)

    The aggregation lives in ``self.aggr`` (:class:`GINEAggregation`: edge embedding
    ``aggr.edge_lin``, ``aggr.eps``, the cached CSR; the sum runs in
    :func:`lumos_kernels.masked_message_passing`), the MLP in ``self.mlp``.

    Args:
        in_channels: node feature columns ``F`` (the MLP's input width).
        mlp: any module mapping ``(N, F)`` to ``(N, F_out)``.
        edge_dim: edge feature columns (None: ``edge_attr`` already has ``F`` columns).
        train_eps: learn ``eps``.
        eps: initial ``eps``.

    Shapes:
        x ``(N, F)``, edge_index ``(2, E)``, edge_attr ``(E, edge_dim)``; output ``(N, F_out)``.
    """

    lumos_trace_through = True  # compaction traces aggr and mlp separately (lumos.plan.trace)
    aggregation_type: type = GINEAggregation

    def __init__(self, in_channels: int, mlp: nn.Module, edge_dim: int | None, train_eps: bool = False,
                 eps: float = 0.0, *, device=None, dtype=None, **gate_kwargs):
        super().__init__()
        if not isinstance(mlp, nn.Module):
            raise TypeError(f"{type(self).__name__}: `mlp` must be an nn.Module, got {type(mlp).__name__}")
        if gate_kwargs and self.aggregation_type is GINEAggregation:
            raise TypeError(f"GINConv takes no gate arguments (got {sorted(gate_kwargs)}); use GatedGINConv")
        self.aggr = self.aggregation_type(in_channels, edge_dim, train_eps, eps, device=device, dtype=dtype,
                                          **gate_kwargs)
        self.mlp = mlp

    @property
    def in_channels(self) -> int:
        return self.aggr.in_channels

    @property
    def edge_dim(self) -> int | None:
        return self.aggr.edge_dim

    @property
    def edge_lin(self) -> nn.Linear | None:
        return self.aggr.edge_lin

    @property
    def eps(self) -> torch.Tensor:
        return self.aggr.eps

    def forward(self, x: torch.Tensor, edge_index: torch.Tensor, edge_attr: torch.Tensor) -> torch.Tensor:
        return self.mlp(self.aggr(x, edge_index, edge_attr))

    @classmethod
    def from_pyg(cls, conv: nn.Module) -> "GINConv":
        """A lumos GINConv equal to a ``torch_geometric.nn.GINEConv`` (weights copied).

        ``x`` must be one tensor (not a bipartite pair) when calling the result.
        """
        try:
            from torch_geometric.nn import GINEConv
        except ImportError as err:  # pragma: no cover - depends on the environment
            raise ImportError("GINConv.from_pyg needs torch_geometric: pip install torch_geometric") from err
        if not isinstance(conv, GINEConv):
            raise TypeError(f"GINConv.from_pyg: `conv` must be a torch_geometric GINEConv, got {type(conv).__name__}")
        lin = getattr(conv, "lin", None)
        in_channels = lin.out_channels if lin is not None else _first_in_features(conv.nn)
        eps = float(conv.eps.reshape(-1)[0])
        train_eps = isinstance(conv.eps, nn.Parameter)
        layer = GINConv(in_channels, copy.deepcopy(conv.nn), lin.in_channels if lin is not None else None,
                        train_eps, eps)
        if lin is not None:
            with torch.no_grad():
                layer.aggr.edge_lin.weight.copy_(lin.weight)
                if lin.bias is not None:
                    layer.aggr.edge_lin.bias.copy_(lin.bias)
                else:
                    layer.aggr.edge_lin.bias.zero_()
        return layer if cls is GINConv else cls.from_gin(layer)


def _first_in_features(mlp: nn.Module) -> int:
    for module in mlp.modules():
        if hasattr(module, "in_features"):
            return int(module.in_features)
        if hasattr(module, "in_channels"):
            return int(module.in_channels)
    raise ValueError("GINConv.from_pyg: cannot tell the node feature width from the GINEConv's `nn`")


class GatedGINConv(GINConv):
    r"""A :class:`GINConv` whose aggregation carries one L0 gate per feature column:

    .. math::
        \mathrm{out} = \mathrm{MLP}\big((1 + \epsilon)\, m \odot X + m \odot \mathrm{prop}(\mathrm{emb}(E), X)\big)

    ``self.aggr`` is a :class:`GatedGINEAggregation`. The MLP's ``nn.Linear`` layers are gated
    like any other by :func:`lumos.gate` (which gates the aggregation inside a plain
    :class:`GINConv` the same way); :meth:`from_gin` alone leaves the MLP as it is.

    Args: as :class:`GINConv`, plus ``**gate_kwargs`` for the column gate.

    Shapes: as :class:`GINConv`.
    """

    aggregation_type = GatedGINEAggregation

    @classmethod
    def from_gin(cls, conv: GINConv, **gate_kwargs) -> "GatedGINConv":
        """A gated copy of ``conv`` (weights copied; the MLP deep-copied)."""
        if not isinstance(conv, GINConv):
            raise TypeError(f"GatedGINConv.from_gin: `conv` must be a lumos GINConv, got {type(conv).__name__}")
        layer = cls.__new__(cls)
        nn.Module.__init__(layer)
        layer.aggr = GatedGINEAggregation.from_aggregation(conv.aggr, **gate_kwargs)
        layer.mlp = copy.deepcopy(conv.mlp)
        return layer


class GlobalPool(nn.Module):
    r"""Per-graph readout of node features: ``out[g] = reduce_{v : batch[v] = g} x[v]``.

    Args:
        reduce: ``"sum"`` or ``"mean"`` (an empty graph gives zeros).

    Shapes:
        x ``(N, F)``, batch ``(N,)`` integer graph id of each node; output ``(G, F)`` with
        ``G = num_graphs`` if given, else ``batch.max() + 1``.
    """

    def __init__(self, reduce: str = "sum"):
        super().__init__()
        if reduce not in ("sum", "mean"):
            raise ValueError(f"GlobalPool: `reduce` must be 'sum' or 'mean', got {reduce!r}")
        self.reduce = reduce

    def forward(self, x: torch.Tensor, batch: torch.Tensor, num_graphs: int | None = None) -> torch.Tensor:
        if x.dim() != 2 or batch.dim() != 1 or batch.shape[0] != x.shape[0]:
            raise ValueError(f"GlobalPool: need `x` (N, F) and `batch` (N,), got {tuple(x.shape)} and "
                             f"{tuple(batch.shape)}")
        if batch.is_floating_point():
            raise TypeError(f"GlobalPool: `batch` must be an integer tensor, got {batch.dtype}")
        if num_graphs is None:
            num_graphs = int(batch.max()) + 1 if batch.numel() else 0
        out = x.new_zeros(num_graphs, x.shape[1]).index_add_(0, batch, x)
        if self.reduce == "mean":
            count = torch.bincount(batch, minlength=num_graphs).clamp(min=1).to(x.dtype)
            out = out / count[:, None]
        return out

    def extra_repr(self) -> str:
        return f"reduce={self.reduce!r}"
