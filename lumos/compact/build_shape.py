"""Building reshape-like ops: copied where their arguments name dims (flatten, permute, pixel
shuffles), rewritten where they name the channel count (view, reshape, expand), and the channel
shuffle as one ``index_select``. Indexing, splits and concatenation are built in :mod:`.build_index`."""
from __future__ import annotations

import operator

import torch
from torch import fx

from ..plan.channels import CONST
from ..plan.errors import CompactionError, describe_node
from ..plan.ops_pixel import PixelShuffle
from ..plan.ops_shape import Expand, Permute, Reshape, ShuffleMerge, ShuffleStep, input_of, reshape_groups, reshape_sizes
from ..plan.trace import node_shape
from .builder import Builder
from .values import Value


def const_only(value: Value) -> Value:
    return Value(value.const.clone())


def build_pixel_shuffle(node: fx.Node, record: PixelShuffle, b: Builder) -> None:
    """Copied (the kept channels are whole groups, in order); a dropped output channel of a shuffle
    holds its group's common constant, and a group of different constants is refused."""
    b.copy(node)
    x = input_of(node)
    const, group = b.values[x].const, record.factor ** 2
    if record.unshuffle:
        b.values[node] = Value(const.repeat_interleave(group))
        return
    groups = const.view(-1, group)
    space = b.plan.space_of[node]
    dropped = ~b.plan.kept_mask(space) & (b.plan.kinds(space) == CONST)
    spread = groups.max(1).values - groups.min(1).values
    uneven = dropped & ~(spread <= 1e-9 * (1 + groups.abs().max(1).values))
    if bool(uneven.any()):
        raise CompactionError(
            f"lumos.compact: {describe_node(node, b.plan.gm)}: its dropped output channels "
            f"{uneven.nonzero().flatten().tolist()[:8]} come from input channels holding different constants "
            "(a sub-pixel pattern, which no later layer can fold); keep those units open, or pass the "
            "layer before it or this module in leaf_modules=[...] to keep them whole")
    b.values[node] = Value(groups.mean(1))


def build_reshape(node: fx.Node, record: Reshape, b: Builder) -> None:
    x = input_of(node)
    space = b.plan.space_of[x]
    rmap = record.map
    if record.rewrite == "copy":
        b.copy(node)
    elif record.rewrite == "squeeze":  # every size-1 dim but the channel dim, whatever the kept count
        dims = tuple(d for d in range(len(node_shape(x))) if d != space.dim)
        b.env[node] = b.call_method("squeeze", b.env[x], dims)
    else:
        sizes = list(b.arg(reshape_sizes(node)))
        kept = int(b.plan.kept_mask(space).sum())
        if not rmap.merged:
            sizes[rmap.out_dim] = kept
        elif not any(s == -1 for i, s in enumerate(sizes) if i != rmap.out_dim):
            sizes[rmap.out_dim] = -1
        else:  # the user's -1 is elsewhere: the merged size from the compacted input's sizes
            size = kept
            for d in rmap.in_dims:
                if d != space.dim:
                    size = b.call_function(operator.mul, size, b.call_method("size", b.env[x], d))
            sizes[rmap.out_dim] = size
        if kept == 0:  # no element left: a -1 could be anything, spell it out
            sizes = _explicit_sizes(node, b, x, sizes)
        if node.op == "call_method":
            b.env[node] = b.call_method(node.target, b.env[x], *sizes)
        else:
            b.env[node] = b.call_function(node.target, b.env[x], tuple(sizes))
    value = b.values[x]
    if rmap.merged:
        shape_in = node_shape(x)
        owner = torch.arange(space.size).reshape([space.size if d == space.dim else 1 for d in rmap.in_dims])
        owner = owner.expand([shape_in[d] for d in rmap.in_dims]).reshape(-1)
        b.values[node] = Value(value.const[owner])
    else:
        b.values[node] = const_only(value)


def _explicit_sizes(node: fx.Node, b: Builder, x: fx.Node, sizes: list) -> list:
    """``sizes`` with each -1 replaced by its value, computed from the compacted input's sizes
    (the product of the input dims of its group over the group's other output sizes)."""
    groups = reshape_groups(node_shape(x), node_shape(node))
    out = list(sizes)
    for j, size in enumerate(sizes):
        if size != -1:
            continue
        gi, gj = next(g for g in groups if j in g[1])
        value = 1
        for d in gi:
            value = b.call_function(operator.mul, value, b.call_method("size", b.env[x], d))
        for other in gj:
            if other != j:
                value = b.call_function(operator.floordiv, value, sizes[other])
        out[j] = value
    return out


def build_shuffle_step(node: fx.Node, record: ShuffleStep, b: Builder) -> None:
    """Inside a channel shuffle: nothing to emit, the channels stay on their dim until the merge."""
    b.env[node] = b.env[input_of(node)]


def build_shuffle_merge(node: fx.Node, record: ShuffleMerge, b: Builder) -> None:
    source = record.source
    space, out = b.plan.space_of[source], b.plan.space_of[node]
    kept_in, kept_out = b.plan.kept(space), b.plan.kept(out)
    positions = torch.searchsorted(kept_in, record.shuffle.perm[kept_out])
    x_new = b.env[source]
    if torch.equal(positions, torch.arange(kept_in.numel())):
        b.env[node] = x_new
    else:
        index = b.buffer(node.name + "_shuffle", positions)
        b.env[node] = b.call_method("index_select", x_new, space.dim, index)
    b.values[node] = b.values[source].rows(record.shuffle.perm)


def build_permute(node: fx.Node, record: Permute, b: Builder) -> None:
    b.copy(node)
    value = b.values[input_of(node)]
    signals = value.signals
    if value.uses_signals():  # the signals follow the same permutation
        signals = b.emit(node.op, node.target, (signals,) + tuple(b.arg(node.args[1:])), b.arg(node.kwargs))
    b.values[node] = Value(value.const.clone(), signals, value.coef)

def build_expand(node: fx.Node, record: Expand, b: Builder) -> None:
    x = input_of(node)
    space = b.plan.space_of[node]
    if record.as_other:
        b.copy(node)
    else:
        sizes = list(b.arg(reshape_sizes(node)))
        sizes[space.dim] = -1
        b.env[node] = b.call_method("expand", b.env[x], *sizes)
    b.values[node] = const_only(b.values[x])
