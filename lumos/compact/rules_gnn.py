"""Compaction rules for graph layers (registered at import time).

Node features ``(N, F)`` carry their channels (feature columns) on the last dim.

- :class:`GINEAggregationRule`: ``GINEAggregation`` / ``GatedGINEAggregation`` (inside a
  ``GINConv``, which compaction traces through, so the MLP after it is ordinary linear layers).
  Column ``c`` of the output depends only on column ``c`` of ``x`` and row ``c`` of the edge
  embedding, and is zero when its gate is closed; so the output gets its own channel space
  (produced by the column gate), input column ``c`` is read iff output column ``c`` survives,
  and the edge embedding keeps the rows of the kept columns. An output column whose input
  column was dropped upstream (a constant ``k``) reads ``k`` from a constant column.
- :class:`ColumnwiseRule`: ``GlobalPool`` (per-graph sum or mean of each column), the same way.
"""
from __future__ import annotations

import copy
import inspect

import torch
from torch import fx, nn

from ..nn.gin import GatedGINEAggregation, GINEAggregation, GlobalPool
from .modules import zero_width
from .plan import ChannelPlan, Space
from .rules import LayerCost, Opaque, Rule, eval_mask, register_module_rule
from .trace import node_shape


# -- helper op called by compacted graphs -------------------------------------------------------
def select_columns(x: torch.Tensor, index: torch.Tensor, fill: torch.Tensor) -> torch.Tensor:
    """Columns of ``x`` (last dim) in the order ``index``; ``index[i] >= n`` picks the constant
    column ``fill[index[i] - n]`` (an input column dropped upstream whose value is known).

    Shapes: x ``(*, n)``, index ``(k,)`` long, fill ``(f,)``; returns ``(*, k)``.
    """
    if fill.numel():
        x = torch.cat([x, fill.to(x.dtype).expand(*x.shape[:-1], fill.numel())], dim=-1)
    return x.index_select(-1, index)


# -- shared pieces ----------------------------------------------------------------------------------
def bound_args(node: fx.Node, module: nn.Module) -> dict:
    """The call's arguments by parameter name (defaults filled in)."""
    bound = inspect.signature(module.forward).bind(*node.args, **node.kwargs)
    bound.apply_defaults()
    return dict(bound.arguments)


def last_dim_space(plan: ChannelPlan, value) -> Space | None:
    """The channel space of ``value`` if it is tracked on its last dim, else None (and pinned)."""
    if not isinstance(value, fx.Node) or value not in plan.space_of:
        return None
    space = plan.space_of[value]
    if space.dim != len(node_shape(value)) - 1:
        plan.pin(space)  # tracked on another dim than the one this layer reads by column
        return None
    return space


def emit_column_select(b, x: fx.Node, wanted: torch.Tensor, hint: str) -> fx.Node:
    """Emit the columns ``wanted`` (original ids) of ``x``'s compacted value: kept ones are
    selected, dropped ones become their constant (``b.const``). No op when nothing changes."""
    space = b.plan.space_of.get(x)
    present = b.plan.kept(space) if space is not None else torch.arange(node_shape(x)[-1])
    if torch.equal(present, wanted):
        return b.env[x]
    position = {c: i for i, c in enumerate(present.tolist())}
    missing = [c for c in wanted.tolist() if c not in position]
    index = [position[c] if c in position else present.numel() + missing.index(c) for c in wanted.tolist()]
    fill = b.const[x][missing].float() if missing else torch.zeros(0)
    return b.call_function(select_columns, (b.env[x], b.add_buffer(f"{hint}_index", torch.tensor(index)),
                                            b.add_buffer(f"{hint}_fill", fill)))


# -- GINE aggregation -------------------------------------------------------------------------------
class GINEAggregationRule(Rule):
    """See the module docstring. Gate values of the kept columns stay as the plain module's
    ``out_scale`` (absent when they are all 1); ``eps`` is copied."""

    reports_width = True

    def analyze(self, node, plan):
        module = plan.module(node)
        args = bound_args(node, module)
        x_space = last_dim_space(plan, args["x"])
        gate = getattr(module, "column_gate", None)
        produced = gate.kept().cpu() if gate is not None else True
        out = plan.new_space(node, -1, produced=produced, gate=gate)
        if x_space is not None:
            plan.consume(x_space, lambda: plan.kept_mask(out))
        attr_space = last_dim_space(plan, args["edge_attr"])
        if attr_space is not None and module.edge_lin is not None:  # the embedding reads every column
            plan.consume(attr_space, lambda: bool(plan.kept_mask(out).any()))
        elif attr_space is not None:  # no embedding: edge_attr is read column by column like x
            plan.consume(attr_space, lambda: plan.kept_mask(out))

    def _edge_columns(self, node, plan, module):
        """Kept and dropped columns of ``edge_attr`` that the edge embedding reads."""
        space = plan.space_of.get(bound_args(node, module)["edge_attr"])
        if space is None or module.edge_lin is None or space.dim != 1:
            n = module.edge_dim if module.edge_lin is not None else 0
            return torch.arange(n), torch.zeros(0, dtype=torch.long)
        return plan.kept(space), plan.removed(space)

    def layer_cost(self, node, plan):
        module = plan.module(node)
        if module.edge_lin is None:
            return None
        args = bound_args(node, module)
        in_space = plan.space_of.get(args["edge_attr"])
        in_space = in_space if in_space is not None and in_space.dim == 1 else None
        edges = node_shape(args["edge_attr"])[0]
        return LayerCost(in_space, module.edge_dim, None, plan.space_of[node], 1.0,
                         module.edge_lin.bias is not None, float(edges))

    def params(self, node, plan):
        module = plan.module(node)
        kept = plan.width(node)
        if kept == 0:
            return 0
        count = int(module.train_eps)
        if module.edge_lin is not None:
            kept_in, _ = self._edge_columns(node, plan, module)
            count += kept * kept_in.numel() + (kept if module.edge_lin.bias is not None else 0)
        return count

    def build(self, node, b):
        module = b.plan.module(node)
        args = bound_args(node, module)
        out_space = b.plan.space_of[node]
        kept = b.plan.kept(out_space)
        b.const[node] = torch.zeros(out_space.size, dtype=torch.float64)  # a closed column is exactly 0
        x = args["x"]
        if kept.numel() == 0:
            b.env[node] = b.call_function(zero_width, (b.env[x], -1))
            return
        x_sel = emit_column_select(b, x, kept, f"{node.target}_x")
        attr = args["edge_attr"]
        if module.edge_lin is None:
            attr_new = emit_column_select(b, attr, kept, f"{node.target}_edge_attr")
        else:
            attr_new = b.env[attr]
        plain = self._compacted(node, b, module, kept)
        b.env[node] = b.call_module(node.target, plain, (x_sel, b.env[args["edge_index"]], attr_new))

    def _compacted(self, node, b, module, kept) -> GINEAggregation:
        ref = module.eps
        edge_dim = None
        if module.edge_lin is not None:
            kept_in, removed_in = self._edge_columns(node, b.plan, module)
            edge_dim = kept_in.numel()
        plain = GINEAggregation(kept.numel(), edge_dim, module.train_eps, 0.0, device=ref.device, dtype=ref.dtype)
        with torch.no_grad():
            plain.eps.copy_(module.eps)
            if module.edge_lin is not None:
                self._fill_edge_lin(node, b, module.edge_lin, plain.edge_lin, kept, kept_in, removed_in)
        scale = eval_mask(getattr(module, "column_gate", None), module.in_channels)[kept]
        if not bool((scale == 1).all()):
            plain.out_scale = scale.to(ref)
        return plain

    @staticmethod
    def _fill_edge_lin(node, b, edge_lin, target, kept, kept_in, removed_in) -> None:
        """Rows ``kept`` and columns ``kept_in`` of the edge embedding; dropped edge-feature
        columns (constants upstream) fold into the bias."""
        weight = edge_lin.weight.detach().double().cpu()
        fold = torch.zeros(weight.shape[0], dtype=torch.float64)
        if removed_in.numel():
            attr = bound_args(node, b.plan.module(node))["edge_attr"]
            fold = weight[:, removed_in] @ b.const[attr][removed_in]
        if edge_lin.bias is None and bool(fold[kept].abs().gt(0).any()):
            from . import CompactionError
            raise CompactionError(f"lumos.compact: `{node.target}`: the edge embedding has no bias to take the "
                                  "constant of dropped edge-feature columns; give it a bias")
        target.weight.copy_(weight[kept][:, kept_in].to(target.weight))
        if edge_lin.bias is not None:
            target.bias.copy_((edge_lin.bias.detach().double().cpu() + fold)[kept].to(target.bias))
        elif target.bias is not None:
            target.bias = None


# -- column-wise modules (graph pooling) -------------------------------------------------------------
class ColumnwiseRule(Rule):
    """A module whose output column ``c`` depends only on input column ``c`` (``GlobalPool``):
    input column ``c`` is read iff output column ``c`` survives; a dropped input column (a
    constant) is fed as that constant, since e.g. a per-graph sum of it is not a constant."""

    def __init__(self, arg: str = "x"):
        self.arg = arg
        self.whole = False  # True when the input is not tracked by column: kept whole, copied

    def analyze(self, node, plan):
        module = plan.module(node)
        x_space = last_dim_space(plan, bound_args(node, module)[self.arg])
        shape = node_shape(node)
        if x_space is None or shape is None or shape[-1] != x_space.size:
            self.whole = True
            return Opaque().analyze(node, plan)
        out = plan.new_space(node, -1, produced=True)
        plan.consume(x_space, lambda: plan.kept_mask(out))

    def build(self, node, b):
        if self.whole:
            return b.copy(node)
        module = b.plan.module(node)
        args = bound_args(node, module)
        x_sel = emit_column_select(b, args[self.arg], b.plan.kept(b.plan.space_of[node]), f"{node.target}_x")
        new_args = tuple(x_sel if name == self.arg else fx.map_arg(value, b.env.__getitem__)
                         for name, value in args.items())
        b.env[node] = b.call_module(node.target, copy.deepcopy(module), new_args)


register_module_rule((GINEAggregation, GatedGINEAggregation), lambda m: GINEAggregationRule())
register_module_rule(GlobalPool, lambda m: ColumnwiseRule("x"))
