"""Analysis of a graph's ends and constants: model inputs, the output, attributes (``get_attr``)."""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import fx, nn

from .channels import CONST, FREE, ChannelPlan, Space
from .record import Context, Copy, Record, keep_inputs_whole
from .trace import node_shape


@dataclass
class Input(Record):
    """A model input. The first one carries the features (on ``ctx.feature_dim``); inputs stay
    whole unless ``keep_input_shape=False``, where the first one shrinks to the kept features."""


def analyze_placeholder(node: fx.Node, plan: ChannelPlan, ctx: Context) -> Record:
    shape = node_shape(node)
    if shape is None or len(shape) == 0:
        return Copy()
    first = node is next(iter(plan.gm.graph.nodes))
    space = plan.new_space(node, ctx.feature_dim if first else -1)
    if not (first and not ctx.keep_input_shape):
        plan.pin(space)
    return Input()


@dataclass
class Output(Record):
    """The model output: every channel of every output tensor is kept."""


def analyze_output(node: fx.Node, plan: ChannelPlan, ctx: Context) -> Record:
    keep_inputs_whole(node, plan)
    return Output()


def attr_value(plan: ChannelPlan, node: fx.Node):
    """The object a ``get_attr`` node reads."""
    obj = plan.gm
    for part in node.target.split("."):
        obj = getattr(obj, part)
    return obj


@dataclass
class Attribute(Record):
    """A tensor attribute read in ``forward`` (``self.gamma``, ``self.pos``). A user that tracks
    it on a dim (:func:`attr_space`) gives it a space; building then keeps the kept slices."""

    def params(self, node, plan):
        value = attr_value(plan, node)
        if not isinstance(value, nn.Parameter):
            return 0
        space = plan.space_of.get(node)
        if space is None:
            return value.numel()
        return value.numel() // max(space.size, 1) * int(plan.kept_mask(space).sum())


def analyze_get_attr(node: fx.Node, plan: ChannelPlan, ctx: Context) -> Record:
    return Attribute()


def attr_space(plan: ChannelPlan, node: fx.Node, dim: int) -> Space | None:
    """Track the attribute read by ``get_attr`` ``node`` on ``dim`` (for its single user, which
    asks), or None when it cannot be (several users, not a tensor, already tracked on another
    dim). Its channels are CONST when the attribute is one number per channel (a layer scale, a
    bias: a dropped channel holds that number everywhere), FREE otherwise (a position embedding)."""
    value = attr_value(plan, node)
    shape = node_shape(node)
    if not isinstance(value, torch.Tensor) or shape is None or len(shape) == 0 or len(node.users) != 1:
        return None
    dim = dim % len(shape)
    if node in plan.space_of:
        space = plan.space_of[node]
        return space if space.dim == dim else None
    per_channel = math.prod(shape) == shape[dim]
    return plan.new_space(node, dim, CONST if per_channel else FREE)
