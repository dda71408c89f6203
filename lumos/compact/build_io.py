"""Building a graph's ends and constants (inputs, output, attributes), ops copied as they are,
and ops kept whole."""
from __future__ import annotations

import operator

import torch
from torch import fx, nn

from ..plan import Record
from ..plan.ops_io import attr_value
from ..plan.trace import node_shape
from .build_graph import build_whole_graph_layer
from .builder import Builder
from .plain import is_gated, plain_twin
from .values import Value


def build_copy(node: fx.Node, record: Record, b: Builder) -> None:
    """Copy the op; tracked channels are all kept, their dropped values never read."""
    b.copy(node)
    if node in b.plan.space_of:
        b.values[node] = Value.zeros(b.plan.space_of[node].size)


def build_input(node: fx.Node, record: Record, b: Builder) -> None:
    """A model input, copied, with a check of its number of dims: the compacted ops name dims by
    their index in the example's layout, so an input with more or fewer dims (an MLP compacted
    on ``(N, F)`` rows fed ``(B, T, F)``) would put the channels elsewhere."""
    build_copy(node, record, b)
    shape = node_shape(node)
    if shape is None:
        return
    x = b.env[node]
    message = (f"lumos: this compacted model takes `{node.name}` with {len(shape)} dims, as the example it was "
               f"compacted with (shape {tuple(shape)}); for inputs with another number of dims, call "
               "lumos.compact with an example of that shape")
    b.call_function(torch._assert, b.call_function(operator.eq, b.call_method("dim", x), len(shape)), message)


def build_whole(node: fx.Node, record: Record, b: Builder) -> None:
    """An op kept whole: copied; a graph layer becomes its plain-torch ops, a module holding
    gates its plain twin (gates folded, hooks kept)."""
    if node.op == "call_module" and build_whole_graph_layer(node, b):
        pass
    elif node.op == "call_module" and is_gated(b.plan.module(node)):
        b.attrs[node.target] = plain_twin(b.plan.module(node))
        b.env[node] = b.emit("call_module", node.target, b.arg(node.args), b.arg(node.kwargs))
    else:
        b.copy(node)
    if node in b.plan.space_of:
        b.values[node] = Value.zeros(b.plan.space_of[node].size)


def build_attribute(node: fx.Node, record: Record, b: Builder) -> None:
    """An attribute: its kept slices along its tracked dim (a parameter stays a parameter)."""
    space = b.plan.space_of.get(node)
    if space is None:
        b.copy(node)
        return
    value = attr_value(b.plan, node)
    kept = b.plan.kept(space)
    sliced = value.detach().index_select(space.dim, kept.to(value.device)).clone()
    b.attrs[node.target] = nn.Parameter(sliced, value.requires_grad) if isinstance(value, nn.Parameter) else sliced
    b.env[node] = b.emit("get_attr", node.target, ())
    shape = node_shape(node)
    per_channel = shape.numel() == shape[space.dim]
    b.values[node] = Value(value.detach().double().cpu().reshape(-1) if per_channel
                           else torch.zeros(space.size, dtype=torch.float64))
