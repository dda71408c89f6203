"""Analysis of graph layers: node features ``(N, F)`` carry their channels (feature columns) on
the last dim.

- ``GINEAggregation`` / ``GatedGINEAggregation`` (inside a ``GINConv``, which tracing goes
  through, so the MLP after it is ordinary linear layers): output column ``c`` depends only on
  input column ``c`` and row ``c`` of the edge embedding, and is zero when its gate is closed.
  So the output gets its own space (FREE where the column gate is open), input column ``c`` is
  read iff output column ``c`` survives, and the edge embedding keeps the rows of the kept
  columns. An output column whose input column was dropped upstream reads that column's constant.
- ``GlobalPool`` (per-graph sum or mean of each column), column by column the same way.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import fx

from ..nn.gin import GatedGINEAggregation, GINEAggregation
from .channels import ChannelPlan, Space
from .ops_attention import bound_args, last_dim_space
from .ops_linear import output_kind
from .record import Context, LayerCost, Record, whole
from .trace import node_shape

AGGREGATION_TYPES = (GINEAggregation, GatedGINEAggregation)


@dataclass
class Aggregation(Record):
    """A GINE aggregation; see the module docstring."""

    out_space: Space
    reports_width = True

    def edge_columns(self, node, plan):
        """Kept and dropped columns of ``edge_attr`` that the edge embedding reads."""
        module = plan.module(node)
        space = plan.space_of.get(bound_args(node, module)["edge_attr"])
        if space is None or module.edge_lin is None or space.dim != 1:
            n = module.edge_dim if module.edge_lin is not None else 0
            return torch.arange(n), torch.zeros(0, dtype=torch.long)
        return plan.kept(space), plan.removed(space)

    def params(self, node, plan):
        module = plan.module(node)
        kept = plan.width(node)
        if kept == 0:
            return 0
        count = int(module.train_eps)
        if module.edge_lin is not None:
            kept_in, _ = self.edge_columns(node, plan)
            count += kept * kept_in.numel() + (kept if module.edge_lin.bias is not None else 0)
        return count

    def flops(self, node, plan, dense=False):
        module = plan.module(node)
        if module.edge_lin is None:
            return 0.0
        edges = node_shape(bound_args(node, module)["edge_attr"])[0]
        cols = module.in_channels if dense else plan.width(node)
        ins = module.edge_dim if dense else self.edge_columns(node, plan)[0].numel()
        return 2.0 * edges * cols * ins

    def layer_cost(self, node, plan):
        module = plan.module(node)
        if module.edge_lin is None:
            return None
        args = bound_args(node, module)
        in_space = plan.space_of.get(args["edge_attr"])
        in_space = in_space if in_space is not None and in_space.dim == 1 else None
        edges = node_shape(args["edge_attr"])[0]
        return LayerCost(in_space, module.edge_dim, None, self.out_space, 1.0,
                         module.edge_lin.bias is not None, float(edges))


def analyze_aggregation(node: fx.Node, plan: ChannelPlan, ctx: Context) -> Record:
    module = plan.module(node)
    args = bound_args(node, module)
    x_space = last_dim_space(plan, args["x"], node)
    gate = getattr(module, "column_gate", None)
    out = plan.new_space(node, -1, output_kind(gate, ctx), gate=gate)
    if x_space is not None:
        plan.consume(x_space, lambda: plan.kept_mask(out))
    attr_space = last_dim_space(plan, args["edge_attr"], node)
    if attr_space is not None and module.edge_lin is not None:  # the embedding reads every column
        plan.consume(attr_space, lambda: bool(plan.kept_mask(out).any()))
    elif attr_space is not None:  # no embedding: edge_attr is read column by column like x
        plan.consume(attr_space, lambda: plan.kept_mask(out))
    return Aggregation(out)


@dataclass
class Pool(Record):
    """``GlobalPool``: output column ``c`` is the per-graph sum or mean of input column ``c``; a
    dropped input column (a constant) is fed as that constant (its per-graph sum is no constant)."""


def analyze_global_pool(node: fx.Node, plan: ChannelPlan, ctx: Context) -> Record:
    module = plan.module(node)
    x_space = last_dim_space(plan, bound_args(node, module)["x"], node)
    shape = node_shape(node)
    if x_space is None or shape is None or shape[-1] != x_space.size:
        return whole(node, plan)
    out = plan.new_space(node, -1, True)
    plan.consume(x_space, lambda: plan.kept_mask(out))
    return Pool()
