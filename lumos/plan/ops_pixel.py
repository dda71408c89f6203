"""Analysis of ``PixelShuffle`` / ``PixelUnshuffle`` (sub-pixel convolution upsampling and its
inverse), channel dim ``-3``, factor ``r``.

``PixelShuffle``: output channel ``c`` is made of input channels ``c r^2 .. c r^2 + r^2 - 1``, one
per sub-pixel position; the ``r^2 + 1`` are tied, so the kept input channels are whole groups in
order, and the shuffle of the compacted input is the kept output channels. A dropped output
channel is CONST when its whole group is (it holds their common constant; a group of different
constants is a periodic pattern, which compaction refuses, naming the op). ``PixelUnshuffle``:
output channels ``c r^2 .. c r^2 + r^2 - 1`` are input channel ``c`` at the ``r^2`` sub-pixel
positions, tied to it; a constant stays a constant. Anything else is FREE (its values move to
other positions).
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

SHUFFLE_MODULES = (nn.PixelShuffle, nn.PixelUnshuffle)
SHUFFLE_FUNCTIONS = (F.pixel_shuffle, F.pixel_unshuffle, torch.pixel_shuffle, torch.pixel_unshuffle)


@dataclass
class PixelShuffle(Record):
    """A pixel shuffle (``unshuffle=False``) or unshuffle of factor ``factor``."""

    factor: int
    unshuffle: bool


def _factor_and_kind(node: fx.Node, plan: ChannelPlan) -> tuple[int | None, bool]:
    if node.op == "call_module":
        module = plan.module(node)
        unshuffle = isinstance(module, nn.PixelUnshuffle)
        return (module.downscale_factor if unshuffle else module.upscale_factor), unshuffle
    unshuffle = node.target in (F.pixel_unshuffle, torch.pixel_unshuffle)
    name = "downscale_factor" if unshuffle else "upscale_factor"
    factor = node.args[1] if len(node.args) > 1 else node.kwargs.get(name)
    return (factor if isinstance(factor, int) and not isinstance(factor, bool) else None), unshuffle


def analyze_pixel_shuffle(node: fx.Node, plan: ChannelPlan, ctx: Context) -> Record:
    x, space = tracked_input(node, plan)
    shape = node_shape(x) if space is not None else None
    factor, unshuffle = _factor_and_kind(node, plan)
    if space is None or shape is None or factor is None or len(shape) < 3 or space.dim != len(shape) - 3:
        return whole(node, plan)
    group = factor * factor
    kinds = plan.kinds(space)
    if unshuffle:
        out = plan.new_space(node, space.dim, torch.where(kinds == CONST, CONST, FREE).repeat_interleave(group))
        for k in range(group):
            plan.tie_ids(range(out.start + k, out.start + out.size, group), range(space.start, space.start + space.size))
    else:
        if space.size % group:
            return whole(node, plan)
        all_const = (kinds.view(-1, group) == CONST).all(1)
        out = plan.new_space(node, space.dim, torch.where(all_const, CONST, FREE))
        for k in range(group):
            plan.tie_ids(range(out.start, out.start + out.size), range(space.start + k, space.start + space.size, group))
    return PixelShuffle(factor, unshuffle)
