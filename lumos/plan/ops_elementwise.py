"""Analysis of elementwise ops, broadcasting included: activations, dropout, arithmetic.

The output's channels are tied to those of every operand that has the output's channel width on
the aligned dim (a residual add, a squeeze-excite multiply ``x * s[:, :, None, None]``, a layer
scale ``gamma * x`` with ``gamma`` an attribute: its slices follow the kept channels). An
operand broadcast along the channels (a per-sample scalar) is read whole. A dropped channel's
kind follows the op: an activation of a constant is a constant; a sum of AFFINE values is
AFFINE; a product of two AFFINE values, or any activation of one, is not (FREE).
"""
from __future__ import annotations

import operator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import fx, nn

from .channels import AFFINE, CONST, FREE, ChannelPlan
from .ops_io import attr_space, attr_value
from .ops_shape import tracked_input
from .record import Context, Copy, Record, op_name, whole
from .trace import node_shape

# op classes: how a dropped channel's value follows the operands' (see `combine_kinds`)
UNARY, IDENTITY, NEG, ADD, SUB, MUL, DIV, OTHER = "unary", "identity", "neg", "add", "sub", "mul", "div", "other"

UNARY_MODULES = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU, nn.Mish, nn.Sigmoid,
    nn.Tanh, nn.Softplus, nn.Softsign, nn.Hardtanh, nn.Hardswish, nn.Hardsigmoid, nn.Tanhshrink, nn.PReLU,
    nn.LogSigmoid, nn.Threshold,
)
IDENTITY_MODULES = (nn.Identity, nn.Dropout, nn.AlphaDropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d,
                    nn.FeatureAlphaDropout)
UNARY_FUNCTIONS = (
    torch.relu, F.relu, F.relu6, F.leaky_relu, F.elu, F.selu, F.celu, F.gelu, F.silu, F.mish, torch.sigmoid,
    F.sigmoid, torch.tanh, F.tanh, F.softplus, F.softsign, F.hardtanh, F.hardswish, F.hardsigmoid, torch.exp,
    torch.sin, torch.cos, torch.abs, torch.square, torch.sqrt, torch.rsqrt, torch.log, F.logsigmoid,
    torch.clamp, torch.clip, torch.erf,
)
IDENTITY_FUNCTIONS = (F.dropout, F.dropout1d, F.dropout2d, F.dropout3d, F.alpha_dropout, F.feature_alpha_dropout)
BINARY_FUNCTIONS = {
    operator.add: ADD, torch.add: ADD, operator.sub: SUB, torch.sub: SUB, operator.mul: MUL, torch.mul: MUL,
    operator.truediv: DIV, torch.div: DIV, operator.neg: NEG, torch.neg: NEG, operator.pow: OTHER,
    torch.pow: OTHER, torch.maximum: OTHER, torch.minimum: OTHER,
}
UNARY_METHODS = ("relu", "sigmoid", "tanh", "exp", "abs", "square", "sqrt", "rsqrt", "log", "clamp", "clip",
                 "float", "double", "half", "bfloat16")
IDENTITY_METHODS = ("contiguous", "clone")
BINARY_METHODS = {"add": ADD, "sub": SUB, "mul": MUL, "div": DIV, "neg": NEG, "pow": OTHER}


def combine_kinds(op: str, tied: list[torch.Tensor], varying_broadcast: bool) -> torch.Tensor:
    """The kind of each output channel of an elementwise op whose tied operands have kinds
    ``tied`` (first = first tensor operand). ``varying_broadcast``: an operand broadcast along
    the channels varies from row to row (a dropped channel is then no known function)."""
    stacked = torch.stack(tied)
    top = stacked.max(0).values
    if varying_broadcast:
        return torch.full_like(top, FREE)
    if op in (IDENTITY, NEG, ADD, SUB):
        return top
    if op == MUL:  # a product of two AFFINE values is quadratic in the signals
        return torch.where((stacked >= AFFINE).sum(0) >= 2, FREE, top)
    if op == DIV:  # 1 / AFFINE is not affine
        return torch.where(stacked[1:].max(0).values >= AFFINE, FREE, stacked[0]) if len(tied) > 1 else top
    return torch.where(top == CONST, CONST, FREE)  # an activation of a constant is a constant


@dataclass
class Elementwise(Record):
    """An elementwise op on tied channels.

    Attributes:
        op: its class (UNARY, IDENTITY, NEG, ADD, SUB, MUL, DIV, OTHER).
        out_dim: the output's channel dim.
        tied: tensor operands whose channels are the output's.
        broadcast: tensor operands broadcast along the channels.
    """

    op: str
    out_dim: int
    tied: tuple
    broadcast: tuple

    def params(self, node, plan):
        return sum(p.numel() for p in plan.module(node).parameters()) if node.op == "call_module" else 0


def _varies(node: fx.Node, plan: ChannelPlan) -> bool:
    """Whether an operand broadcast along the channels may differ from one position to another
    (anything but a single-number attribute)."""
    if node.op != "get_attr":
        return True
    value = attr_value(plan, node)
    return not isinstance(value, torch.Tensor) or value.numel() != 1


def analyze_elementwise(node: fx.Node, plan: ChannelPlan, op: str) -> Record:
    shape = node_shape(node)
    tensors = [a for a in node.all_input_nodes if node_shape(a) is not None]
    if not tensors or shape is None:
        return Copy() if not any(a in plan.space_of for a in node.all_input_nodes) else whole(node, plan)
    if len(shape) == 0:
        return whole(node, plan)
    out_dim = None
    for a in tensors:
        space, a_shape = plan.space_of.get(a), node_shape(a)
        if space is not None:
            aligned = space.dim + len(shape) - len(a_shape)
            if aligned >= 0 and a_shape[space.dim] == shape[aligned]:
                out_dim = aligned
                break
    if out_dim is None:
        return Copy() if not any(a in plan.space_of for a in tensors) else whole(node, plan)
    tied, broadcast = [], []
    for a in tensors:
        a_shape = node_shape(a)
        aligned = out_dim - (len(shape) - len(a_shape))
        space = plan.space_of.get(a)
        if aligned < 0 or (a_shape[aligned] == 1 and shape[out_dim] != 1):
            broadcast.append(a)
            if space is not None:  # its channels (on another dim) all reach every output channel
                plan.pin(space, by=f"{op_name(node, plan)} broadcasting them over its channels")
                plan.consume(space)
            continue
        if space is None and a.op == "get_attr":
            space = attr_space(plan, a, aligned)
        if space is None or space.dim != aligned or space.size != shape[out_dim]:
            return whole(node, plan)
        tied.append(a)
    # a number computed in forward (a size read, arithmetic on it) may differ between input shapes
    numbers = [a for a in node.all_input_nodes if node_shape(a) is None]
    varying = any(_varies(b, plan) for b in broadcast) or bool(numbers)
    # one entry per tensor argument, repeats included (x * x is quadratic in x)
    arguments = [a for a in (*node.args, *node.kwargs.values()) if isinstance(a, fx.Node) and a in tied]
    operand_kinds = [plan.kinds(plan.space_of[a]) for a in arguments]
    first = node.args[0] if node.args else node.kwargs.get("input")
    if op == DIV and first not in tied:  # a number (or a broadcast tensor) divided by tied channels
        operand_kinds.insert(0, torch.full((shape[out_dim],), CONST, dtype=torch.long))
    kinds = combine_kinds(op, operand_kinds, varying)
    out = plan.new_space(node, out_dim, kinds)
    for a in tied:
        plan.tie(out, plan.space_of[a])
    return Elementwise(op, out_dim, tuple(tied), tuple(broadcast))


@dataclass
class ChannelPReLU(Record):
    """``nn.PReLU`` with one slope per channel (on dim 1): sliced to the kept channels."""

    def params(self, node, plan):
        return plan.width(node)


def analyze_unary_module(node: fx.Node, plan: ChannelPlan, ctx: Context) -> Record:
    module = plan.module(node)
    if isinstance(module, nn.PReLU) and module.num_parameters != 1:
        return analyze_channel_prelu(node, plan)
    return analyze_elementwise(node, plan, UNARY)


def analyze_channel_prelu(node: fx.Node, plan: ChannelPlan) -> Record:
    """Channel ``c`` of the output is channel ``c`` of the input under its own slope (PReLU's
    channel dim is dim 1): tied; a constant stays a constant, anything else becomes FREE."""
    x, space = tracked_input(node, plan)
    shape = node_shape(x) if space is not None else None
    if (space is None or shape is None or len(shape) < 2 or space.dim != 1
            or space.size != plan.module(node).num_parameters or len(node.args) != 1 or node.kwargs):
        return whole(node, plan)
    plan.same_space(node, x, torch.where(plan.kinds(space) == CONST, CONST, FREE))
    return ChannelPReLU()


@dataclass
class GatedHalves(Record):
    """``F.glu`` / ``nn.GLU`` along the channel dim: output channel ``c`` is ``a_c * sigmoid(b_c)``
    of input channels ``c`` and ``c + C / 2``, the three tied (a pair is kept or dropped whole, so
    the kept input channels are the same set in both halves and GLU of them pairs them right)."""


def analyze_glu(node: fx.Node, plan: ChannelPlan, ctx: Context) -> Record:
    x, space = tracked_input(node, plan)
    shape = node_shape(x) if space is not None else None
    if node.op == "call_module":
        dim = plan.module(node).dim
    else:
        dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", -1)
    if space is None or shape is None or not isinstance(dim, int) or dim % len(shape) != space.dim \
            or space.size % 2:
        return whole(node, plan)
    half = space.size // 2
    kinds = plan.kinds(space)
    both_const = (kinds[:half] == CONST) & (kinds[half:] == CONST)
    out = plan.new_space(node, space.dim, torch.where(both_const, CONST, FREE))
    for first in (space.start, space.start + half):
        plan.tie_ids(out.ids.tolist(), range(first, first + half))
    return GatedHalves()


def analyze_identity_module(node, plan, ctx):
    return analyze_elementwise(node, plan, IDENTITY)


def analyze_unary(node, plan, ctx):
    return analyze_elementwise(node, plan, UNARY)


def analyze_identity(node, plan, ctx):
    return analyze_elementwise(node, plan, IDENTITY)


def analyze_binary_function(node, plan, ctx):
    if node.kwargs and set(node.kwargs) - {"other", "input"}:
        return analyze_elementwise(node, plan, OTHER)  # alpha=..., rounding_mode=...: no linear rule
    return analyze_elementwise(node, plan, BINARY_FUNCTIONS[node.target])


def analyze_binary_method(node, plan, ctx):
    if node.kwargs and set(node.kwargs) - {"other"}:
        return analyze_elementwise(node, plan, OTHER)
    return analyze_elementwise(node, plan, BINARY_METHODS[node.target])
