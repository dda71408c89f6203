"""Analysis of ops that act on each channel alone: pooling, upsampling, reductions or
softmax over dims other than the channel dim (``x.mean((2, 3))`` global pooling), and
``torch.roll`` / ``torch.flip`` over other dims (a shifted window, a periodic shift, a mirror).

Their output channel ``c`` depends only on input channel ``c``: channels pass through (tied).
A constant channel stays the same constant under max, mean and (non-counting) average pooling,
interpolation, a mean or a max; not under a sum or a softmax, whose value depends on how many
positions there are (that differs between input shapes): there it becomes FREE; a roll or a flip
only moves positions, so a constant stays. Average pooling that counts zero padding, or with a
divisor override, is kept whole.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import fx, nn

from .channels import CONST, FREE, ChannelPlan
from .ops_shape import tracked_input
from .record import Context, Record, whole
from .trace import node_shape

MAX_POOLS = (nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d,
             nn.AdaptiveMaxPool3d, nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d, nn.Upsample)
AVG_POOLS = (nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d)
POOL_FUNCTIONS = (F.max_pool1d, F.max_pool2d, F.max_pool3d, F.adaptive_max_pool1d, F.adaptive_max_pool2d,
                  F.adaptive_max_pool3d, F.adaptive_avg_pool1d, F.adaptive_avg_pool2d, F.adaptive_avg_pool3d,
                  torch.max_pool1d, torch.max_pool2d, torch.max_pool3d, F.interpolate, F.upsample,
                  F.upsample_nearest, F.upsample_bilinear)
AVG_POOL_FUNCTIONS = (F.avg_pool1d, F.avg_pool2d, F.avg_pool3d)
_AVG_POOL_ARGS = ("input", "kernel_size", "stride", "padding", "ceil_mode", "count_include_pad",
                  "divisor_override")


@dataclass
class PassThrough(Record):
    """Channels pass through on the channel dim (pooling, upsampling); a dropped channel keeps
    its constant."""


def _keeps_constants_module(module: nn.Module) -> bool:
    if isinstance(module, AVG_POOLS):
        padding = module.padding if isinstance(module.padding, tuple) else (module.padding,)
        return module.divisor_override is None and (not module.count_include_pad or all(p == 0 for p in padding))
    return True


def _keeps_constants_function(node: fx.Node) -> bool:
    if node.target not in AVG_POOL_FUNCTIONS:
        return True
    args = dict(zip(_AVG_POOL_ARGS, node.args))
    args.update(node.kwargs)
    padding = args.get("padding", 0)
    padding = padding if isinstance(padding, (tuple, list)) else (padding,)
    return args.get("divisor_override") is None and (not args.get("count_include_pad", True)
                                                      or all(p == 0 for p in padding))


def analyze_pool(node: fx.Node, plan: ChannelPlan, ctx: Context) -> Record:
    x = node.args[0] if node.args else node.kwargs.get("input")
    space = plan.space_of.get(x) if isinstance(x, fx.Node) else None
    shape_in, shape_out = (node_shape(x) if space is not None else None), node_shape(node)
    exact = _keeps_constants_module(plan.module(node)) if node.op == "call_module" else _keeps_constants_function(node)
    if (space is None or space.dim != 1 or shape_out is None or len(shape_out) != len(shape_in)
            or shape_out[:2] != shape_in[:2] or len(shape_in) < 3 or not exact):
        return whole(node, plan)
    plan.same_space(node, x, torch.where(plan.kinds(space) == CONST, CONST, FREE))
    return PassThrough()


# -- reductions over other dims -----------------------------------------------------------------
KEEPS_CONSTANT = {"mean": True, "amax": True, "amin": True, "sum": False, "softmax": False, "log_softmax": False}
REDUCTION_FUNCTIONS = {torch.mean: "mean", torch.sum: "sum", torch.amax: "amax", torch.amin: "amin",
                       torch.softmax: "softmax", F.softmax: "softmax", torch.log_softmax: "log_softmax",
                       F.log_softmax: "log_softmax"}


@dataclass
class Channelwise(Record):
    """A reduction, softmax, roll or flip over dims other than the channel dim.

    Attributes:
        keeps_constant: whether a constant channel gives the same constant (mean, max, roll,
            flip), else its output is FREE (sum, softmax: they depend on the number of positions).
    """

    keeps_constant: bool


def _dims(node: fx.Node, name: str):
    """The reduced dims of a reduction call (None: all), or the softmax dim."""
    args = list(node.args[1:])
    kwargs = node.kwargs
    dim = kwargs.get("dim", args[0] if args else None)
    if name in ("softmax", "log_softmax"):
        return (dim,) if isinstance(dim, int) else False
    if dim is None:
        return None
    return (dim,) if isinstance(dim, int) else tuple(dim) if isinstance(dim, (tuple, list)) else False


def analyze_reduction(node: fx.Node, plan: ChannelPlan, ctx: Context) -> Record:
    name = node.target if node.op == "call_method" else REDUCTION_FUNCTIONS[node.target]
    x = node.args[0] if node.args else None
    space = plan.space_of.get(x) if isinstance(x, fx.Node) else None
    shape_in, shape_out = (node_shape(x) if space is not None else None), node_shape(node)
    dims = _dims(node, name)
    if space is None or shape_out is None or not dims or any(not isinstance(d, int) for d in dims):
        return whole(node, plan)
    ndim = len(shape_in)
    dims = {d % ndim for d in dims}
    if space.dim in dims or "dtype" in node.kwargs:
        return whole(node, plan)
    keepdim = len(shape_out) == ndim
    out_dim = space.dim if keepdim else space.dim - sum(d < space.dim for d in dims)
    if out_dim >= len(shape_out) or shape_out[out_dim] != space.size:
        return whole(node, plan)
    keeps = KEEPS_CONSTANT[name]
    kinds = torch.where((plan.kinds(space) == CONST) & keeps, CONST, FREE)
    out = plan.new_space(node, out_dim, kinds)
    plan.tie(out, space)
    return Channelwise(keeps)


# -- moving positions ---------------------------------------------------------------------------
MOVE_FUNCTIONS = (torch.roll, torch.flip)
MOVE_METHODS = ("roll", "flip")


def _moved_dims(node: fx.Node):
    """The dims a roll or flip moves along (None: a roll of the flattened tensor, or dims given
    in a way this analysis does not read)."""
    name = node.target if node.op == "call_method" else node.target.__name__
    args, kwargs = list(node.args[1:]), node.kwargs
    if name == "roll":
        dims = kwargs.get("dims", args[1] if len(args) > 1 else None)
    elif node.op == "call_method" and len(args) > 1:
        dims = tuple(args)  # x.flip(2, 3)
    else:
        dims = kwargs.get("dims", args[0] if args else None)
    if isinstance(dims, int):
        return (dims,)
    if isinstance(dims, (tuple, list)) and dims and all(isinstance(d, int) for d in dims):
        return tuple(dims)
    return None


def analyze_move(node: fx.Node, plan: ChannelPlan, ctx: Context) -> Record:
    """``torch.roll`` / ``torch.flip`` (function or method) along dims other than the channel
    dim: each channel's positions are moved, channels pass through."""
    x, space = tracked_input(node, plan)
    shape = node_shape(x) if space is not None else None
    dims = _moved_dims(node)
    if space is None or shape is None or dims is None or space.dim in {d % len(shape) for d in dims}:
        return whole(node, plan)
    plan.same_space(node, x, torch.where(plan.kinds(space) == CONST, CONST, FREE))
    return Channelwise(True)
