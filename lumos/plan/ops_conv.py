"""Analysis of convolutions: ``nn.Conv1d/2d/3d``, ``nn.ConvTranspose1d/2d/3d`` and lumos' gated
twins, grouped and depthwise ones included.

Feature maps ``(N, C, *spatial)`` carry their channels on dim 1. A convolution with ``g``
groups maps input channels ``G * C_in/g ..`` to output channels ``G * C_out/g ..`` of the same
group ``G`` only, so an input channel is read while some output channel of its group survives.
The compacted layer keeps the groups that have a surviving output; inside each, the kept output
and input channels, padded with zero weights to the widest kept group (a grouped convolution
needs equal groups): see :meth:`ConvLayer.packing`. A depthwise conv (one input per group) thus
loses exactly the channels whose gates closed.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import fx, nn

from ..nn.conv import GATED_CONVS
from .channels import ChannelPlan, Space
from .ops_linear import analyze_channel_map, gates
from .record import Context, LayerCost, Record, whole
from .trace import node_shape

CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
TRANSPOSED = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
CONV_TYPES = CONVS + TRANSPOSED + GATED_CONVS


@dataclass(frozen=True)
class Packing:
    """How the kept channels of a grouped convolution pack into a smaller grouped convolution.

    Attributes:
        groups: kept groups (those with a surviving output), ascending.
        outs, ins: per kept group, the kept output / input channels (global indices).
        width_out, width_in: channels per group in the compacted layer (the widest kept group).
    """

    groups: tuple[int, ...]
    outs: tuple[torch.Tensor, ...]
    ins: tuple[torch.Tensor, ...]
    width_out: int
    width_in: int


@dataclass
class ConvLayer(Record):
    """A (transposed) convolution rebuilt at its kept widths (see the module docstring)."""

    in_space: Space | None
    out_space: Space
    reports_width = True

    def packing(self, node: fx.Node, plan: ChannelPlan) -> Packing:
        module = plan.module(node)
        g = module.groups
        per_out, per_in = module.out_channels // g, module.in_channels // g
        kept_out = plan.kept(self.out_space)
        kept_in = plan.kept(self.in_space) if self.in_space is not None else torch.arange(module.in_channels)
        groups = tuple(sorted(set((kept_out // per_out).tolist())))
        outs = tuple(kept_out[kept_out // per_out == G] for G in groups)
        ins = tuple(kept_in[kept_in // per_in == G] for G in groups)
        width_out = max((o.numel() for o in outs), default=0)
        width_in = max((i.numel() for i in ins), default=0)
        return Packing(groups, outs, ins, width_out, width_in)

    def params(self, node, plan):
        module = plan.module(node)
        p = self.packing(node, plan)
        if not p.groups or p.width_in == 0:
            return 0
        count = len(p.groups) * p.width_out * p.width_in * math.prod(module.kernel_size)
        return count + (len(p.groups) * p.width_out if module.bias is not None else 0)

    def flops(self, node, plan, dense=False):
        module = plan.module(node)
        transposed = isinstance(module, TRANSPOSED)
        # every (input position, tap) pair of a transposed conv, every (output position, tap) of a conv
        shape = node_shape(node.args[0] if transposed else node)
        positions = shape.numel() / max(shape[1], 1)
        if dense:
            pairs = module.out_channels * module.in_channels // module.groups
        else:
            p = self.packing(node, plan)
            pairs = len(p.groups) * p.width_out * p.width_in
        return 2.0 * positions * pairs * math.prod(module.kernel_size)

    def layer_cost(self, node, plan):
        module = plan.module(node)
        transposed = isinstance(module, TRANSPOSED)
        shape = node_shape(node.args[0] if transposed else node)
        # a grouped conv's weight pairs each input with the outputs of its group only
        return LayerCost(self.in_space, module.in_channels, gates(module)[0], self.out_space,
                         float(math.prod(module.kernel_size)) / module.groups, module.bias is not None,
                         shape.numel() / max(shape[1], 1))


def analyze_conv(node: fx.Node, plan: ChannelPlan, ctx: Context) -> Record:
    """Kept whole when it gets an ``output_size`` argument or an unbatched input."""
    module = plan.module(node)
    shape = node_shape(node.args[0]) if node.args else None
    if len(node.args) != 1 or node.kwargs or shape is None or len(shape) != len(module.kernel_size) + 2:
        return whole(node, plan)
    in_space, out = analyze_channel_map(node, plan, ctx, 1, 1, in_groups=module.groups)
    return ConvLayer(in_space, out)
