"""Analysis of ops that pick or assemble channels: indexing (``x[:, :4]``, ``h[:, 0]``),
``chunk``/``split``, ``cat``/``stack``, and shape reads (``x.size(1)``, ``x.shape``).

Indexing with ints, slices, None and Ellipsis maps channel ids (a slice of the channel dim keeps
the kept ids inside it; an int picks one channel, which must stay). ``chunk``/``split`` along the
channels give each piece a range of ids; along another dim each piece keeps the input's ids.
``cat`` along the channels shifts each operand's ids by its offset (a U-Net skip). Reading the
channel count gives the original count (a number the compacted model computes with).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import fx

from .channels import ChannelPlan
from .ops_shape import affine_to_free, input_of, tracked_input
from .record import Context, Copy, Record, whole
from .trace import node_shape, node_shapes

HARMLESS_ATTRS = ("dtype", "device", "ndim", "is_cuda", "requires_grad", "layout")
SPLIT_METHODS = ("chunk", "split", "tensor_split", "unbind")
SHAPE_METHODS = ("size", "dim")

# -- indexing -----------------------------------------------------------------------------------
@dataclass
class Index(Record):
    """``x[...]`` with ints, slices, None and Ellipsis. ``entries``: the index with one entry per
    dim (Ellipsis expanded); ``position``: the entry applied to the channel dim (rewritten to
    compacted positions when building); ``out_dim``: the channel dim of the output (None when
    an int removed it)."""

    entries: tuple
    position: int
    channel_index: object
    out_dim: int | None


def _expand_index(index, ndim: int) -> list | None:
    """The index as one entry per input dim (None entries inserted as "new"), or None if it has
    tensors or several Ellipses."""
    entries = list(index) if isinstance(index, tuple) else [index]
    if any(isinstance(e, fx.Node) and node_shape(e) is not None for e in entries):
        return None  # advanced indexing with a tensor
    consuming = [e for e in entries if e is not None and e is not Ellipsis]
    if sum(e is Ellipsis for e in entries) > 1 or len(consuming) > ndim:
        return None
    if Ellipsis in entries:
        at = entries.index(Ellipsis)
        entries = entries[:at] + [slice(None)] * (ndim - len(consuming)) + entries[at + 1:]
    else:
        entries = entries + [slice(None)] * (ndim - len(consuming))
    return entries


def analyze_getitem(node: fx.Node, plan: ChannelPlan, ctx: Context) -> Record:
    """``x[...]`` on a tracked tensor; a tuple item (chunk, attention, size) is another rule's."""
    x, space = tracked_input(node, plan)
    if space is None:
        return Copy()
    shape = node_shape(x)
    entries = _expand_index(node.args[1], len(shape))
    if entries is None:
        return whole(node, plan)
    in_dim, out_dim, position, channel_index = 0, 0, None, None
    out_channel_dim = None
    for i, e in enumerate(entries):
        if e is None:
            out_dim += 1
            continue
        if in_dim == space.dim:
            position, channel_index = i, e
            if isinstance(e, slice):
                out_channel_dim = out_dim
        if isinstance(e, slice):
            out_dim += 1
        elif not (isinstance(e, int) or (isinstance(e, fx.Node) and node_shape(e) is None)):
            return whole(node, plan)
        in_dim += 1
    if isinstance(channel_index, fx.Node):
        return whole(node, plan)  # a computed channel number
    if isinstance(channel_index, int):  # one channel picked: it must stay, the output has no channel dim
        plan.pin_ids([space.start + channel_index % space.size])
        plan.consume(space, torch.arange(space.size) == channel_index % space.size)
        return Index(tuple(entries), position, channel_index, None)
    picked = torch.arange(space.size)[channel_index]
    out = plan.new_space(node, out_channel_dim, plan.kinds(space)[picked])
    plan.tie_ids(out.ids.tolist(), (space.start + picked).tolist())
    return Index(tuple(entries), position, channel_index, out_channel_dim)


# -- chunk / split --------------------------------------------------------------------------------
@dataclass
class Split(Record):
    """``chunk``/``split``/``tensor_split``/``unbind``: a tuple of pieces. Along the channel dim
    (``along_channels``) each piece takes a range of channels (``sizes``) and the compacted op
    splits the kept channels of each range; along another dim the op is copied and each piece
    keeps the input's channels."""

    along_channels: bool
    sizes: tuple[int, ...]


def split_dim(node: fx.Node, ndim: int) -> int | None:
    name = node.target if node.op == "call_method" else getattr(node.target, "__name__", "")
    args = list(node.args[1:])
    if name == "unbind":
        dim = node.kwargs.get("dim", args[0] if args else 0)
    else:
        dim = node.kwargs.get("dim", args[1] if len(args) > 1 else 0)
    return dim % ndim if isinstance(dim, int) else None


def analyze_split(node: fx.Node, plan: ChannelPlan, ctx: Context) -> Record:
    x, space = tracked_input(node, plan)
    if space is None:
        return Copy()
    dim = split_dim(node, len(node_shape(x)))
    pieces = node_shapes(node)[0]
    if dim is None or not isinstance(pieces, tuple) or not all(isinstance(p, torch.Size) for p in pieces):
        return whole(node, plan)
    name = node.target if node.op == "call_method" else getattr(node.target, "__name__", "")
    if dim != space.dim:
        return Split(False, ())
    if name == "unbind":
        return whole(node, plan)
    return Split(True, tuple(p[dim] for p in pieces))


def analyze_split_item(node: fx.Node, plan: ChannelPlan, record: Split) -> Record:
    """``pieces[i]`` of a :class:`Split`: a space tied to the input's channels of that piece."""
    source = node.args[0]
    x = input_of(source)
    space = plan.space_of[x]
    i = node.args[1]
    if not isinstance(i, int):
        return whole(node, plan)
    if not record.along_channels:
        dims = len(node_shape(x)) - len(node_shape(node))  # unbind removes the split dim
        split = split_dim(source, len(node_shape(x)))
        out_dim = space.dim - (1 if dims and split < space.dim else 0)
        out = plan.new_space(node, out_dim, affine_to_free(plan.kinds(space)))
        plan.tie(out, space)
        return PieceItem()
    i = i % len(record.sizes)
    start = sum(record.sizes[:i])
    picked = torch.arange(start, start + record.sizes[i])
    out = plan.new_space(node, space.dim, plan.kinds(space)[picked])
    plan.tie_ids(out.ids.tolist(), (space.start + picked).tolist())
    return PieceItem()


@dataclass
class PieceItem(Record):
    """An item of a tuple whose node building maps to a tuple of nodes (a split, an attention
    result): building picks the item."""


# -- concatenation ------------------------------------------------------------------------------
@dataclass
class Concat(Record):
    """``torch.cat`` / ``torch.concat`` / ``torch.stack``. Along the channel dim (``along_channels``)
    each operand's channels keep their place at its offset (a U-Net skip); along another dim the
    operands' channels are tied one to one, and a dropped channel is marked FREE (it may hold
    different constants in different operands)."""

    along_channels: bool


def analyze_cat(node: fx.Node, plan: ChannelPlan, ctx: Context) -> Record:
    stack = node.target is torch.stack
    tensors = node.args[0] if node.args else node.kwargs.get("tensors")
    dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
    shape = node_shape(node)
    if not isinstance(tensors, (list, tuple)) or not tensors or not isinstance(dim, int) or shape is None:
        return whole(node, plan)
    spaces = [plan.space_of.get(t) if isinstance(t, fx.Node) else None for t in tensors]
    if all(s is None for s in spaces):
        return Copy()
    if any(s is None for s in spaces) or len({s.dim for s in spaces}) != 1:
        return whole(node, plan)
    tracked = spaces[0].dim
    dim = dim % len(shape)
    if not stack and dim == tracked:
        kinds = torch.cat([plan.kinds(s) for s in spaces])
        out = plan.new_space(node, tracked, kinds)
        offset = out.start
        for space in spaces:
            plan.tie_ids(range(offset, offset + space.size), space.ids.tolist())
            offset += space.size
        return Concat(True)
    if len({s.size for s in spaces}) != 1:
        return whole(node, plan)
    out_dim = tracked + 1 if stack and dim <= tracked else tracked
    out = plan.new_space(node, out_dim, True)
    for space in spaces:
        plan.tie(out, space)
    return Concat(False)


# -- shape reads --------------------------------------------------------------------------------
@dataclass
class ShapeRead(Record):
    """``x.size(d)``, ``x.shape``, ``x.dim()``, ``x.dtype``. Reading the channel count gives the
    original count (a compacted model computes with the same numbers); ``whole_shape``: the node
    is the whole shape (``x.size()``, ``x.shape``), whose items are read later."""

    channel_dim: int | None
    whole_shape: bool


def analyze_shape_read(node: fx.Node, plan: ChannelPlan, ctx: Context) -> Record:
    x, space = tracked_input(node, plan)
    if node.op == "call_function" and node.target is getattr:
        attr = node.args[1] if len(node.args) > 1 else None
        if attr in HARMLESS_ATTRS:
            return Copy()
        if attr != "shape":
            return whole(node, plan) if space is not None else Copy()
        return ShapeRead(space.dim if space is not None else None, True)
    if node.target == "dim" or space is None:
        return Copy()
    dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
    if dim is None:
        return ShapeRead(space.dim, True)
    return ShapeRead(space.dim, False) if isinstance(dim, int) else whole(node, plan)


def analyze_shape_item(node: fx.Node, plan: ChannelPlan, record: ShapeRead) -> Record:
    """``x.shape[i]`` / ``x.size()[i]``."""
    return ShapeItem(record.channel_dim)


@dataclass
class ShapeItem(Record):
    """An item of a whole shape: the channel count is emitted as the original number."""

    channel_dim: int | None


def channel_count(node: fx.Node, ctx: Context) -> int | None:
    """The channel count ``node`` reads (``x.size(d)``, ``x.shape[d]`` of a tracked dim ``d``),
    a fixed number; None when it reads anything else."""
    record = ctx.records.get(node)
    if isinstance(record, ShapeRead) and not record.whole_shape:
        x = input_of(node)
        dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
        if isinstance(dim, int) and dim % len(node_shape(x)) == record.channel_dim:
            return node_shape(x)[record.channel_dim]
        return None
    if isinstance(record, ShapeItem) and record.channel_dim is not None and isinstance(node.args[1], int):
        x = input_of(node.args[0])
        ndim = len(node_shape(x))
        if node.args[1] % ndim == record.channel_dim:
            return node_shape(x)[record.channel_dim]
    return None
