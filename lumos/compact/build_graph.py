"""Building graph layers as plain torch ops (no lumos module in the compacted model).

GINE aggregation ``h = s * ((1 + eps) x + sum_{j -> v} relu(x_j + W_e e_jv + b_e))``:
``index_select`` of the sources, the edge embedding as an ``nn.Linear`` of the kept columns,
``index_add`` at the destinations (on CUDA ``index_add`` sums with atomics, so the order of the
sum, and its last bits, may vary from run to run). ``GlobalPool``: ``index_add`` per graph and
``bincount`` for the mean."""
from __future__ import annotations

import operator

import torch
from torch import fx, nn

from ..nn.gin import GINEAggregation, GlobalPool
from ..plan.errors import CompactionError
from ..plan.ops_attention import bound_args
from ..plan.ops_graph import Aggregation, Pool
from ..plan.trace import node_shape
from .builder import Builder, as64, eval_mask
from .build_linear import fold_inputs
from .plain import plain_linear
from .values import Value


def _edge_embedding(node, b: Builder, module, kept, kept_in, removed_in, attr) -> nn.Linear:
    """Rows ``kept`` and columns ``kept_in`` of the edge embedding; dropped edge-feature columns
    (constants upstream) fold into the bias."""
    edge_lin = module.edge_lin
    weight = as64(edge_lin.weight)
    value = b.values.get(attr, Value.zeros(weight.shape[1])) if removed_in.numel() else Value.zeros(weight.shape[1])
    fold, _ = fold_inputs(weight, value, removed_in)
    if edge_lin.bias is None and bool(fold[kept].abs().gt(0).any()):
        raise CompactionError(f"lumos.compact: `{node.target}`: the edge embedding has no bias to take the constant "
                              "of dropped edge-feature columns; give it a bias")
    bias = (as64(edge_lin.bias) + fold)[kept] if edge_lin.bias is not None else None
    return plain_linear(weight[kept][:, kept_in], bias, edge_lin.weight)


def emit_aggregation(node: fx.Node, b: Builder, kept: torch.Tensor, kept_in: torch.Tensor,
                     removed_in: torch.Tensor) -> fx.Node:
    """The GINE aggregation of columns ``kept`` (edge features ``kept_in`` read by the embedding)."""
    module = b.plan.module(node)
    args = bound_args(node, module)
    x, attr = args["x"], args["edge_attr"]
    x_sel = b.select(x, kept, -1, f"{node.name}_x")
    edge_index = b.env[args["edge_index"]]
    source = b.call_function(operator.getitem, edge_index, 0)
    target = b.call_function(operator.getitem, edge_index, 1)
    if module.edge_lin is None:
        emb = b.select(attr, kept, -1, f"{node.name}_edge_attr")
    else:
        emb = b.call_module(f"{node.target}.edge_lin",
                            _edge_embedding(node, b, module, kept, kept_in, removed_in, attr), b.env[attr])
    messages = b.call_function(torch.relu, b.call_function(
        operator.add, b.call_method("index_select", x_sel, 0, source), emb))
    summed = b.call_method("index_add", b.call_function(torch.zeros_like, x_sel), 0, target, messages)
    eps_name = f"{node.target}.eps"
    eps = module.eps.detach().clone()
    b.attrs[eps_name] = nn.Parameter(eps) if isinstance(module.eps, nn.Parameter) else eps
    one_plus_eps = b.call_function(operator.add, b.emit("get_attr", eps_name, ()), 1.0)
    out = b.call_function(operator.add, b.call_function(operator.mul, one_plus_eps, x_sel), summed)
    scale = eval_mask(getattr(module, "column_gate", None), module.in_channels)[kept]
    if module.out_scale is not None:
        scale = scale * as64(module.out_scale)[kept]
    if not bool((scale == 1).all()):
        out = b.call_function(operator.mul, out, b.buffer(f"{node.name}_scale", scale))
    return out


def build_aggregation(node: fx.Node, record: Aggregation, b: Builder) -> None:
    out_space = b.plan.space_of[node]
    kept = b.plan.kept(out_space)
    b.values[node] = Value.zeros(out_space.size)  # a closed column is exactly 0
    if kept.numel() == 0:
        x = bound_args(node, b.plan.module(node))["x"]
        b.env[node] = b.no_channels(b.env[x], -1)
        return
    kept_in, removed_in = record.edge_columns(node, b.plan)
    b.env[node] = emit_aggregation(node, b, kept, kept_in, removed_in)


def emit_pool(node: fx.Node, b: Builder, kept: torch.Tensor) -> fx.Node:
    """Per-graph sum (or mean) of columns ``kept``."""
    module: GlobalPool = b.plan.module(node)
    args = bound_args(node, module)
    x_sel = b.select(args["x"], kept, -1, f"{node.name}_x")
    batch = b.env[args["batch"]]
    if args["num_graphs"] is None:
        counts = b.call_function(torch.bincount, batch)
        graphs = b.call_method("size", counts, 0)
    else:
        graphs = b.arg(args["num_graphs"])
        counts = b.call_function(torch.bincount, batch, minlength=graphs)
    out = b.call_method("new_zeros", x_sel, graphs, b.call_method("size", x_sel, 1))
    out = b.call_method("index_add", out, 0, batch, x_sel)
    if module.reduce == "mean":
        denominator = b.call_method("type_as", b.call_method("clamp", counts, min=1), x_sel)
        out = b.call_function(operator.truediv, out,
                              b.call_function(operator.getitem, denominator, (slice(None), None)))
    return out


def build_pool(node: fx.Node, record: Pool, b: Builder) -> None:
    b.values[node] = Value.zeros(b.plan.space_of[node].size)
    b.env[node] = emit_pool(node, b, b.plan.kept(b.plan.space_of[node]))


def build_whole_graph_layer(node: fx.Node, b: Builder) -> bool:
    """A graph layer the plan keeps whole, emitted as plain ops with every column (True), or
    False when ``node`` is no graph layer."""
    module = b.plan.module(node)
    if isinstance(module, GINEAggregation):
        edge_cols = torch.arange(module.edge_dim) if module.edge_lin is not None else torch.zeros(0, dtype=torch.long)
        b.env[node] = emit_aggregation(node, b, torch.arange(module.in_channels), edge_cols,
                                       torch.zeros(0, dtype=torch.long))
        return True
    if isinstance(module, GlobalPool):
        b.env[node] = emit_pool(node, b, torch.arange(node_shape(node)[-1]))
        return True
    return False
