"""Building elementwise ops, pooling and per-channel reductions: the op is copied (it works on
any channel count); the dropped channels' values follow it: the op applied to the operands'
constants, and for linear ops (+, -, scaling) the signals' coefficients combined."""
from __future__ import annotations

import copy

import torch
from torch import fx, nn

from ..plan.ops_elementwise import ADD, DIV, IDENTITY, MUL, NEG, SUB, ChannelPReLU, Elementwise, GatedHalves
from ..plan.ops_io import attr_value
from ..plan.ops_pool import Channelwise, PassThrough
from ..plan.ops_shape import input_of
from ..plan.record import channel_view
from ..plan.trace import node_shape
from .builder import Builder, as64
from .values import Value


def _const_operand(a: fx.Node, record: Elementwise, b: Builder, ndim: int):
    """What operand ``a`` holds on the dropped channels, shaped to broadcast like the op's output."""
    if a in record.tied:
        return b.values[a].const.clone().reshape(channel_view(ndim, record.out_dim))
    if a.op == "get_attr":
        value = attr_value(b.plan, a)
        if value.numel() == 1:
            return value.detach().double().cpu().reshape([1] * ndim)
    return torch.zeros([1] * ndim, dtype=torch.float64)  # varies: the output channels are FREE


def _evaluate(node: fx.Node, b: Builder, args, kwargs) -> torch.Tensor:
    if node.op == "call_module":
        module = copy.deepcopy(b.plan.module(node)).eval().double()
        if hasattr(module, "inplace"):
            module.inplace = False
        return module(*args, **kwargs)
    if node.op == "call_method":
        return getattr(args[0], node.target)(*args[1:], **kwargs)
    kwargs = {k: (False if k == "inplace" else v) for k, v in kwargs.items()}
    return node.target(*args, **kwargs)


def _affine(node: fx.Node, record: Elementwise, b: Builder, size: int) -> tuple:
    """``(signals, coef)`` of the output when a linear op combines AFFINE operands."""
    affine = [a for a in record.tied if b.values[a].uses_signals()]
    if not affine or record.op not in (IDENTITY, NEG, ADD, SUB, MUL, DIV):
        return None, None
    if len({b.values[a].signals for a in affine}) > 1:
        return _concatenated(node, record, b, size)
    signals = b.values[affine[0]].signals
    operands = list(node.args) + list(node.kwargs.values())
    coefs = {a: b.values[a].coef_or_zeros(b.values[affine[0]].coef.shape[1]) for a in record.tied}
    if record.op in (IDENTITY, NEG):
        coef = coefs[operands[0]]
        return signals, -coef if record.op == NEG else coef
    if record.op in (ADD, SUB):
        first, second = operands[0], operands[1] if len(operands) > 1 else 0
        coef = coefs.get(first, 0) + (-1 if record.op == SUB else 1) * coefs.get(second, 0)
        return signals, coef
    # MUL / DIV: one AFFINE operand scaled by the other's per-channel constant (or a number)
    first, second = operands[0], operands[1]
    ndim = len(node_shape(node))

    def factor(operand):
        if isinstance(operand, fx.Node):
            return _const_operand(operand, record, b, ndim).reshape(-1).expand(size)
        return torch.full((size,), float(operand), dtype=torch.float64)

    if record.op == MUL:
        scaled, other = (first, second) if first in affine else (second, first)
        return signals, coefs[scaled] * factor(other)[:, None]
    if first not in affine:  # c / AFFINE is no affine value (the plan made it FREE: never read)
        return None, None
    return signals, coefs[first] / factor(second)[:, None]


def _concatenated(node, record, b, size):
    """Several signal tensors: concatenated along the channel dim, coefficients side by side."""
    if record.op not in (ADD, SUB):
        return None, None
    parts, coefs = [], []
    for i, a in enumerate(record.tied):
        value = b.values[a]
        if not value.uses_signals():
            continue
        sign = -1.0 if record.op == SUB and i > 0 else 1.0
        parts.append(value.signals)
        coefs.append(sign * value.coef)
    signals = b.call_function(torch.cat, parts, record.out_dim)
    return signals, torch.cat(coefs, 1)


def build_elementwise(node: fx.Node, record: Elementwise, b: Builder) -> None:
    b.copy(node)
    space = b.plan.space_of[node]
    ndim = len(node_shape(node))
    env = {a: _const_operand(a, record, b, ndim) for a in node.all_input_nodes if node_shape(a) is not None}
    numbers = {a: 1.0 for a in node.all_input_nodes if node_shape(a) is None}  # FREE output: any number
    args = fx.map_arg(node.args, lambda a: env.get(a, numbers.get(a)))
    kwargs = fx.map_arg(node.kwargs, lambda a: env.get(a, numbers.get(a)))
    with torch.no_grad():
        const = _evaluate(node, b, args, kwargs).double()
    const = const.expand([space.size if d == record.out_dim % ndim else 1 for d in range(ndim)]).reshape(-1)
    signals, coef = _affine(node, record, b, space.size)
    b.values[node] = Value(const.clone(), signals, coef)


def build_channel_prelu(node: fx.Node, record: ChannelPReLU, b: Builder) -> None:
    """``nn.PReLU`` with one slope per channel: a PReLU over the kept channels with their slopes;
    a dropped constant channel ``c`` holds ``prelu(c)`` under its own slope."""
    module = b.plan.module(node)

    def sliced(kept: torch.Tensor) -> nn.Module:
        new = nn.PReLU(kept.numel(), device="meta")
        new.weight = nn.Parameter(module.weight.detach()[kept].clone())
        return new

    b.channel_module(node, sliced)
    const = b.values[node.args[0]].const
    b.values[node] = Value(torch.where(const >= 0, const, as64(module.weight) * const))


def build_glu(node: fx.Node, record: GatedHalves, b: Builder) -> None:
    """GLU of the kept channel pairs (copied: it halves any even width); a dropped pair of
    constants holds ``a * sigmoid(b)``."""
    space = b.plan.space_of[node]
    x = input_of(node)
    if b.plan.width(node) > 0:
        b.copy(node)
    else:
        b.env[node] = b.no_channels(b.env[x], space.dim)
    const = b.values[x].const
    b.values[node] = Value(const[:space.size] * torch.sigmoid(const[space.size:]))


def build_pass_through(node: fx.Node, record: PassThrough, b: Builder) -> None:
    """Pooling / upsampling: copied; with no channel left, run on one zero channel for the positions."""
    x = node.args[0] if node.args else node.kwargs["input"]
    b.values[node] = b.values[x]
    if b.plan.width(node) > 0:
        b.copy(node)
        return
    x_new = b.env[x]  # pooling and interpolation reject tensors without channels
    one = b.call_method("sum", b.no_channels(x_new, 1), 1, keepdim=True)
    args = (one,) + tuple(b.arg(node.args[1:]))
    if node.op == "call_module":
        b.attrs[node.target] = copy.deepcopy(b.plan.module(node))
    y = b.emit(node.op, node.target, args, b.arg(node.kwargs))
    b.env[node] = b.no_channels(y, 1)


def build_channelwise(node: fx.Node, record: Channelwise, b: Builder) -> None:
    """A reduction or softmax over other dims: copied; a constant channel keeps its constant
    where the op keeps constants (the others are FREE: never read)."""
    b.copy(node)
    x = node.args[0]
    size = b.plan.space_of[node].size
    b.values[node] = Value(b.values[x].const.clone()) if record.keeps_constant else Value.zeros(size)
