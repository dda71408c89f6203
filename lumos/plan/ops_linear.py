"""Analysis of linear layers (``nn.Linear``, :class:`lumos.nn.GatedLinear`): kept inputs select
weight columns, kept outputs rows. Shared with the convolutions: :func:`gates`, :func:`read_space`."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import fx, nn

from .channels import ChannelPlan, Space
from .record import Context, LayerCost, Record, op_name, whole
from .trace import node_shape


def gates(module: nn.Module):
    """``(in_gate, out_gate)`` of a gated layer (None for a plain one)."""
    return getattr(module, "in_gate", None), getattr(module, "out_gate", None)


def read_space(node: fx.Node, plan: ChannelPlan, dim: int) -> Space | None:
    """The space of ``node``'s input if it is tracked on ``dim`` (of the input); else None, and
    an input tracked on another dim is kept whole (the layer reads all of it)."""
    x = node.args[0]
    space = plan.space_of.get(x)
    if space is None:
        return None
    if space.dim != dim % len(node_shape(x)):
        plan.pin(space, by=f"{op_name(node, plan)} reading them along another dim")
        plan.consume(space)
        return None
    return space


def output_kind(gate, ctx: Context):
    """Kinds of a layer's outputs: FREE where its gate is open (all, without a gate, unless the
    plan assumes closed gates everywhere: then CONST)."""
    if gate is not None:
        return gate.kept().cpu()
    return not ctx.assume_closed


def analyze_channel_map(node: fx.Node, plan: ChannelPlan, ctx: Context, in_dim: int, out_dim: int,
                        in_groups: int = 1) -> tuple[Space | None, Space]:
    """The analysis every channel-mapping layer shares: output channels produced where the out
    gate is open; an input channel read (foldably: an AFFINE one is fine) where its in gate is
    open and some output channel of its group survives (``in_groups`` equal groups of inputs
    and outputs, as in a grouped convolution)."""
    in_gate, out_gate = gates(plan.module(node))
    in_space = read_space(node, plan, in_dim)
    out = plan.new_space(node, out_dim, output_kind(out_gate, ctx), gate=out_gate)
    if in_space is not None:
        open_in = in_gate.kept().cpu() if in_gate is not None else torch.ones(in_space.size, dtype=torch.bool)
        per_in, per_out = in_space.size // in_groups, out.size // in_groups

        def read():
            alive = plan.kept_mask(out).reshape(in_groups, per_out).any(1)
            return open_in & alive.repeat_interleave(per_in)

        plan.consume(in_space, read, strict=False)
    return in_space, out


@dataclass
class LinearLayer(Record):
    """A linear layer, rebuilt at its kept widths (gate values and dropped inputs folded)."""

    in_space: Space | None
    out_space: Space
    reports_width = True

    def _widths(self, node, plan, dense):
        module = plan.module(node)
        k_in = module.in_features if dense or self.in_space is None else int(plan.kept_mask(self.in_space).sum())
        k_out = module.out_features if dense else int(plan.kept_mask(self.out_space).sum())
        return (0, 0) if k_in == 0 or k_out == 0 else (k_in, k_out)

    def params(self, node, plan):
        k_in, k_out = self._widths(node, plan, False)
        return k_out * k_in + (k_out if plan.module(node).bias is not None and k_out else 0)

    def flops(self, node, plan, dense=False):
        k_in, k_out = self._widths(node, plan, dense)
        shape = node_shape(node)
        return 2.0 * k_in * k_out * shape.numel() / max(shape[-1], 1)

    def layer_cost(self, node, plan):
        module = plan.module(node)
        shape = node_shape(node)
        return LayerCost(self.in_space, module.in_features, gates(module)[0], self.out_space, 1.0,
                         module.bias is not None, shape.numel() / max(shape[-1], 1))


def analyze_linear(node: fx.Node, plan: ChannelPlan, ctx: Context) -> Record:
    if len(node.args) != 1 or node.kwargs or node_shape(node.args[0]) is None:
        return whole(node, plan)
    in_space, out = analyze_channel_map(node, plan, ctx, -1, -1)
    return LinearLayer(in_space, out)
