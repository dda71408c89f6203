"""Analysis of multi-head attention (``nn.MultiheadAttention``, :class:`lumos.nn.GatedMultiheadAttention`).

The layer returns ``(output, weights)``. Three internal spaces hold its **heads**, the Q/K head
dimensions and the V head dimensions (shared by all heads); ``output = result[0]`` gets the
output channel space (``embed_dim``, computed by ``out_proj``). A head survives if its gate is
open, some V dimension survives and some output channel is read; a Q/K (V) dimension survives
if its gate is open and some head survives. Query, key and value are read through linear
projections, so a dropped input channel may hold a constant or an AFFINE value (folded).
"""
from __future__ import annotations

import inspect
import operator
from dataclasses import dataclass

import torch
from torch import fx, nn

from ..nn.attention import GatedMultiheadAttention
from .channels import ChannelPlan, Space
from .record import Context, LayerCost, Record, op_name, whole
from .trace import node_shape

ATTENTION_TYPES = (nn.MultiheadAttention, GatedMultiheadAttention)


def bound_args(node: fx.Node, module: nn.Module) -> dict:
    """The call's arguments by parameter name (defaults filled in)."""
    bound = inspect.signature(module.forward).bind(*node.args, **node.kwargs)
    bound.apply_defaults()
    return dict(bound.arguments)


def last_dim_space(plan: ChannelPlan, value, reader: fx.Node | None = None) -> Space | None:
    """The channel space of ``value`` if it is tracked on its last dim, else None (and kept whole:
    ``reader``, the op reading it, named as what keeps it)."""
    if not isinstance(value, fx.Node) or value not in plan.space_of:
        return None
    space = plan.space_of[value]
    if space.dim != len(node_shape(value)) - 1:
        # tracked on another dim than the one this layer reads by column
        plan.pin(space, by=None if reader is None else f"{op_name(reader, plan)} reading them along another dim")
        plan.consume(space)
        return None
    return space


def attention_gates(module: nn.Module):
    """``(head_gate, qk_dim_gate, v_dim_gate)``, all None for a plain ``nn.MultiheadAttention``."""
    if isinstance(module, GatedMultiheadAttention):
        return module.head_gate, module.qk_dim_gate, module.v_dim_gate
    return None, None, None


def result_items(node: fx.Node, index: int) -> list[fx.Node]:
    """The ``result[index]`` nodes of an attention call."""
    return [u for u in node.users if u.op == "call_function" and u.target is operator.getitem
            and len(u.args) > 1 and u.args[1] == index]


def supported(module: nn.Module) -> bool:
    return isinstance(module, GatedMultiheadAttention) or (module.bias_k is None and not module.add_zero_attn)


@dataclass
class Attention(Record):
    """Multi-head attention with its heads, Q/K dims and V dims spaces (module docstring)."""

    heads: Space
    qk: Space
    vd: Space
    reports_width = True

    def width(self, node, plan) -> tuple[int, int]:
        """Heads before and after compaction (what :func:`lumos.report` lists)."""
        return self.heads.size, int(self.kept(node, plan)[0].numel())

    def out_space(self, node, plan) -> Space | None:
        items = [u for u in result_items(node, 0) if u in plan.space_of]
        return plan.space_of[items[0]] if items else None

    def kept(self, node, plan):
        """(kept heads, kept Q/K dims, kept V dims, kept output channels); no head if no V dim."""
        heads, qk, vd = plan.kept(self.heads), plan.kept(self.qk), plan.kept(self.vd)
        out = self.out_space(node, plan)
        out_kept = plan.kept(out) if out is not None else torch.arange(plan.module(node).embed_dim)
        if vd.numel() == 0:
            heads = heads[:0]
        return heads, qk, vd, out_kept

    def inputs_kept(self, node, plan):
        """Kept and removed input columns of query, key and value."""
        module = plan.module(node)
        args = bound_args(node, module)
        widths = {"query": module.embed_dim, "key": module.kdim, "value": module.vdim}
        result = {}
        for name, width in widths.items():
            space = plan.space_of.get(args[name])
            if space is None or space.dim != len(node_shape(args[name])) - 1:
                result[name] = (torch.arange(width), torch.zeros(0, dtype=torch.long))
            else:
                result[name] = (plan.kept(space), plan.removed(space))
        return result

    def _counts(self, node, plan, dense):
        module = plan.module(node)
        if dense:
            h, dq, dv, out = module.num_heads, module.head_dim, module.head_dim, module.embed_dim
            ins = {"query": module.embed_dim, "key": module.kdim, "value": module.vdim}
        else:
            heads, qk, vd, out_kept = self.kept(node, plan)
            h, dq, dv, out = heads.numel(), qk.numel(), vd.numel(), out_kept.numel()
            ins = {k: v[0].numel() for k, v in self.inputs_kept(node, plan).items()}
        return h, dq, dv, out, ins

    def params(self, node, plan):
        module = plan.module(node)
        h, dq, dv, out, ins = self._counts(node, plan, False)
        bias = module.out_proj.bias is not None
        if h == 0:  # the projections are emitted whenever a head survives
            return 0
        count = h * dv * (ins["value"] + bias) + out * (h * dv + bias)
        if dq:
            count += h * dq * (ins["query"] + ins["key"] + 2 * bias)
        return count

    def flops(self, node, plan, dense=False):
        module = plan.module(node)
        args = bound_args(node, module)
        h, dq, dv, out, ins = self._counts(node, plan, dense)
        if h == 0:
            return 0.0
        q_shape, k_shape = node_shape(args["query"]), node_shape(args["key"])
        queries, keys = q_shape[:-1].numel(), k_shape[:-1].numel()
        source = k_shape[-2] if module.batch_first or len(k_shape) == 2 else k_shape[0]
        projections = queries * h * dq * ins["query"] + keys * h * (dq * ins["key"] + dv * ins["value"])
        core = queries * source * h * (dq + dv)
        return 2.0 * (projections + queries * out * h * dv + core)

    def layer_cost(self, node, plan):
        """Q+K and V+out_proj as (heads x dims) products, out_proj's bias on the output channels.
        Input and output widths are taken whole (the residual stream); the softmax core is not counted."""
        module = plan.module(node)
        bias = module.out_proj.bias is not None
        tokens = node_shape(bound_args(node, module)["query"])[:-1].numel()
        terms = [LayerCost(self.heads, module.num_heads, None, self.qk, module.embed_dim + module.kdim + 2 * bias,
                           False, tokens),
                 LayerCost(self.heads, module.num_heads, None, self.vd, module.vdim + module.embed_dim + bias,
                           False, tokens)]
        out = self.out_space(node, plan)
        if bias and out is not None:
            terms.append(LayerCost(None, 1, None, out, 0.0, True, tokens))
        return terms


def analyze_attention(node: fx.Node, plan: ChannelPlan, ctx: Context) -> Record:
    module = plan.module(node)
    if not supported(module):
        return whole(node, plan)
    head_gate, qk_gate, v_gate = attention_gates(module)

    def kind(gate):
        return gate.kept().cpu() if gate is not None else True

    heads = plan.new_ids(module.num_heads, 0, kind(head_gate), head_gate)
    qk = plan.new_ids(module.head_dim, 0, kind(qk_gate), qk_gate)
    vd = plan.new_ids(module.head_dim, 0, kind(v_gate), v_gate)

    def output_read() -> bool:
        return any(bool(plan.kept_mask(plan.space_of[u]).any()) for u in result_items(node, 0)
                   if u in plan.space_of) or any(u.users for u in result_items(node, 1))

    def any_kept(space):
        return lambda: bool(plan.kept_mask(space).any())

    if any(u.users for u in result_items(node, 1)):  # used attention weights: every head's stays computed
        plan.pin(heads)
    plan.consume(heads, lambda: output_read() and bool(plan.kept_mask(vd).any()))
    plan.consume(qk, any_kept(heads))
    plan.consume(vd, any_kept(heads))
    args = bound_args(node, module)
    for name, dims in (("query", qk), ("key", qk), ("value", vd)):
        space = last_dim_space(plan, args[name], node)
        if space is not None:
            plan.consume(space, lambda dims=dims: bool(plan.kept_mask(heads).any() and plan.kept_mask(dims).any()),
                         strict=False)
    for name in ("key_padding_mask", "attn_mask"):
        if isinstance(args[name], fx.Node) and args[name] in plan.space_of:
            plan.pin(plan.space_of[args[name]], by=f"the `{name}` of {op_name(node, plan)}")
            plan.consume(plan.space_of[args[name]])
    return Attention(heads, qk, vd)


@dataclass
class AttentionItem(Record):
    """``result[0]`` (the output: its own channel space, FREE, computed by ``out_proj``) or
    ``result[1]`` (the attention weights: kept whole)."""

    index: int


def analyze_attention_item(node: fx.Node, plan: ChannelPlan, record: Attention) -> Record:
    index = node.args[1]
    if index == 0 and node_shape(node) is not None:
        earlier = [u for u in result_items(node.args[0], 0) if u in plan.space_of]
        if earlier:  # read twice: one set of output channels
            plan.same_space(node, earlier[0])
        else:
            plan.new_space(node, -1, True)
    elif node_shape(node) is not None and len(node_shape(node)) > 0:
        plan.pin(plan.new_space(node, -1))
    return AttentionItem(index)
