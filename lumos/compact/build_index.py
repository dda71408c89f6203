"""Building indexing, split, concatenation and shape reads: the channel entry of an index
rewritten to compacted positions, splits of the kept channels of each piece, the original
channel count where it is read."""
from __future__ import annotations

import operator

import torch
from torch import fx

from ..plan.ops_index import Concat, Index, PieceItem, ShapeItem, ShapeRead, Split
from ..plan.ops_shape import input_of
from ..plan.trace import node_shape
from .build_shape import const_only
from .builder import Builder
from .values import Value


def build_index(node: fx.Node, record: Index, b: Builder) -> None:
    x = input_of(node)
    space = b.plan.space_of[x]
    kept = b.plan.kept(space)
    entries = list(b.arg(list(record.entries)))
    if record.out_dim is None:  # one channel picked: its place among the kept ones
        channel = record.channel_index % space.size
        entries[record.position] = int(torch.searchsorted(kept, torch.tensor(channel)))
        b.env[node] = b.call_function(operator.getitem, b.env[x], tuple(entries))
        return
    picked = torch.arange(space.size)[record.channel_index]
    kept_picked = picked[b.plan.kept_mask(space)[picked]]
    positions = torch.searchsorted(kept, kept_picked)
    contiguous = positions.numel() == 0 or torch.equal(positions, torch.arange(int(positions[0]),
                                                                               int(positions[0]) + positions.numel()))
    start = int(positions[0]) if positions.numel() else 0
    entries[record.position] = slice(start, start + positions.numel()) if contiguous else slice(None)
    out = b.call_function(operator.getitem, b.env[x], tuple(entries))
    if not contiguous:
        out = b.call_method("index_select", out, record.out_dim, b.buffer(node.name + "_index", positions))
    b.env[node] = out
    value = b.values[x].rows(picked)
    signals = value.signals
    if value.uses_signals():  # the same index on the other dims
        sig_entries = list(entries)
        sig_entries[record.position] = slice(None)
        signals = b.call_function(operator.getitem, signals, tuple(sig_entries))
    b.values[node] = Value(value.const, signals, value.coef)


def build_split(node: fx.Node, record: Split, b: Builder) -> None:
    x = input_of(node)
    if not record.along_channels:
        b.copy(node)
        return
    space = b.plan.space_of[x]
    mask = b.plan.kept_mask(space)
    bounds = [0] + list(torch.tensor(record.sizes).cumsum(0).tolist())
    sizes = [int(mask[bounds[i]:bounds[i + 1]].sum()) for i in range(len(record.sizes))]
    b.env[node] = b.call_function(torch.split, b.env[x], sizes, space.dim)


def build_piece(node: fx.Node, record: PieceItem, b: Builder) -> None:
    """An item of a split or of an attention result: picked from what building made of the tuple."""
    source = node.args[0]
    made = b.env[source]
    b.env[node] = made[node.args[1]] if isinstance(made, tuple) else b.call_function(operator.getitem, made,
                                                                                       node.args[1])
    space = b.plan.space_of.get(node)
    if space is None:
        return
    split = b.records[source]
    x = input_of(source)
    if isinstance(split, Split) and split.along_channels:
        start = sum(split.sizes[:node.args[1] % len(split.sizes)])
        b.values[node] = b.values[x].rows(torch.arange(start, start + space.size))
    elif isinstance(split, Split):
        b.values[node] = const_only(b.values[x])
    else:
        b.values[node] = Value.zeros(space.size)


def concat_values(b: Builder, values: list[Value], dim: int) -> Value:
    """The values of a concatenation along the channel dim: constants and signal coefficients
    stacked (distinct signal tensors concatenated, their coefficients block-diagonal)."""
    const = torch.cat([v.const for v in values])
    with_signals = [v for v in values if v.uses_signals()]
    if not with_signals:
        return Value(const)
    nodes = list(dict.fromkeys(v.signals for v in with_signals))
    widths = {n: next(v.coef.shape[1] for v in with_signals if v.signals is n) for n in nodes}
    offsets = dict(zip(nodes, [0] + list(torch.tensor([widths[n] for n in nodes]).cumsum(0).tolist())))
    coef = torch.zeros(const.numel(), sum(widths.values()), dtype=torch.float64)
    row = 0
    for v in values:
        if v.uses_signals():
            coef[row:row + v.size, offsets[v.signals]:offsets[v.signals] + widths[v.signals]] = v.coef
        row += v.size
    signals = nodes[0] if len(nodes) == 1 else b.call_function(torch.cat, nodes, dim)
    return Value(const, signals, coef)


def build_concat(node: fx.Node, record: Concat, b: Builder) -> None:
    b.copy(node)
    space = b.plan.space_of.get(node)
    if space is None:
        return
    tensors = node.args[0] if node.args else node.kwargs["tensors"]
    if record.along_channels:
        b.values[node] = concat_values(b, [b.values[t] for t in tensors], space.dim)
    else:
        b.values[node] = Value.zeros(space.size)


def build_shape_read(node: fx.Node, record: ShapeRead, b: Builder) -> None:
    """``x.size(d)`` of a channel dim that compaction shrinks is the original channel count (a
    number); others copied."""
    x = input_of(node)
    dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
    if not record.whole_shape and isinstance(dim, int) and _shrunk_dim(x, dim, record.channel_dim, b):
        b.env[node] = node_shape(x)[record.channel_dim]
        return
    b.copy(node)


def build_shape_item(node: fx.Node, record: ShapeItem, b: Builder) -> None:
    source = node.args[0]
    x = input_of(source)
    index = node.args[1]
    if isinstance(index, int) and _shrunk_dim(x, index, record.channel_dim, b):
        b.env[node] = node_shape(x)[record.channel_dim]
        return
    b.copy(node)


def _shrunk_dim(x: fx.Node, dim: int, channel_dim: int | None, b: Builder) -> bool:
    """Whether ``dim`` of ``x`` is its channel dim and compaction removes some of those channels:
    only then is a read of its size replaced by the original number. A dim whose channels are
    all kept reads its size as the user's model does: the space of an op kept whole sits on its
    last dim, which may be a spatial or sequence size that changes with the input."""
    if channel_dim is None or dim % len(node_shape(x)) != channel_dim:
        return False
    return not bool(b.plan.kept_mask(b.plan.space_of[x]).all())  # the space the read's record names
