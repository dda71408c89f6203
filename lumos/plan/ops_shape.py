"""Analysis of reshape-like ops as index maps: reshape/view/flatten, squeeze/unsqueeze, permute/
transpose, expand, and the channel shuffle.

Each maps the channel ids of its input to positions of its output, and must mean the same for
every input shape, not only the example's. A reshape is split into groups of consecutive dims
with equal sizes (``(N, C, H, W) -> (N, C*H*W)``: ``[N]->[N]``, ``[C, H, W]->[C*H*W]``); the
channel dim's group must keep it intact (it moves) or merge it with other dims into one output
dim (a flatten: channel ``c`` owns a block of positions), with the same grouping on the example
and on every alternative input shape (:mod:`lumos.plan.probe`). Anything else (a regrouping
like ``(N, C, L) -> (N, C*L/2, 2)``, whose meaning depends on ``L``; a split of the channel dim)
keeps its input whole, which is exact. The compacted op is rewritten with the kept channel
count where its arguments name it. Splitting the channel dim, swapping the two parts and
merging them back (ShuffleNet's channel shuffle) is recognised as one permutation of channels.
Indexing, splitting, concatenation and shape reads are in :mod:`.ops_index`.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import fx, nn

from .channels import AFFINE, FREE, ChannelPlan, Space
from .record import Context, Copy, Record, whole
from .trace import node_shape, node_shapes

FLATTEN_METHODS = ("flatten",)
RESHAPE_METHODS = ("view", "reshape")
SQUEEZE_METHODS = ("squeeze", "unsqueeze")
PERMUTE_METHODS = ("permute", "transpose", "swapaxes", "swapdims", "movedim", "moveaxis", "t")


def input_of(node: fx.Node) -> fx.Node | None:
    x = node.args[0] if node.args else node.kwargs.get("input")
    return x if isinstance(x, fx.Node) else None


def tracked_input(node: fx.Node, plan: ChannelPlan) -> tuple[fx.Node | None, Space | None]:
    x = input_of(node)
    return x, (plan.space_of.get(x) if x is not None else None)


def affine_to_free(kinds: torch.Tensor) -> torch.Tensor:
    """Kinds after an op that cannot carry AFFINE values (they become FREE)."""
    return torch.where(kinds == AFFINE, FREE, kinds)



# -- reshapes -----------------------------------------------------------------------------------
def reshape_groups(shape_in, shape_out) -> list[tuple[tuple[int, ...], tuple[int, ...]]] | None:
    """Consecutive input dims and output dims with equal products, in order (None if none fit)."""
    n, m = len(shape_in), len(shape_out)
    i = j = 0
    groups = []
    while i < n or j < m:
        gi, gj = ([i] if i < n else []), ([j] if j < m else [])
        pi, pj = (shape_in[i] if i < n else 1), (shape_out[j] if j < m else 1)
        i, j = i + (i < n), j + (j < m)
        while pi != pj:
            if pi < pj:
                if i >= n:
                    return None
                pi, i = pi * shape_in[i], i + 1
                gi.append(i - 1)
            else:
                if j >= m:
                    return None
                pj, j = pj * shape_out[j], j + 1
                gj.append(j - 1)
        groups.append((tuple(gi), tuple(gj)))
    return groups


@dataclass(frozen=True)
class ReshapeMap:
    """Where a reshape puts the channel dim.

    Attributes:
        out_dim: the output dim holding the channels.
        merged: True when the channel dim is merged with other dims into ``out_dim`` (channel
            ``c`` owns several positions), False when it stays intact (it may move).
        in_dims: the input dims merged into ``out_dim`` (sizes > 1, and the channel dim).
    """

    out_dim: int
    merged: bool
    in_dims: tuple[int, ...]


def reshape_map(channel_dim: int, shapes_in: list, shapes_out: list) -> ReshapeMap | None:
    """The :class:`ReshapeMap` of a reshape on every run (example and alternative shapes), or
    None when the channel dim is not kept intact or merged, or not the same way on every run."""
    found = set()
    for shape_in, shape_out in zip(shapes_in, shapes_out):
        if not isinstance(shape_in, torch.Size) or not isinstance(shape_out, torch.Size):
            return None
        if shape_in[channel_dim] <= 1:
            return None
        groups = reshape_groups(shape_in, shape_out)
        if groups is None:
            return None
        gi, gj = next(g for g in groups if channel_dim in g[0])
        in_eff = tuple(d for d in gi if shape_in[d] != 1)
        out_eff = [d for d in gj if shape_out[d] != 1]
        if len(out_eff) != 1:
            return None  # the channel dim is split (or regrouped with a split)
        found.add((gi, gj, ReshapeMap(out_eff[0], in_eff != (channel_dim,), in_eff)))
    return next(iter(found))[2] if len(found) == 1 else None


def _tie_reshape(node: fx.Node, plan: ChannelPlan, space: Space, rmap: ReshapeMap) -> Space:
    """The output space of a reshape: intact, tied one to one; merged, each position tied to its
    channel (row-major order over the merged input dims). AFFINE values do not follow a reshape
    (their signals would need the same one): they become FREE."""
    kinds = affine_to_free(plan.kinds(space))
    if not rmap.merged:
        out = plan.new_space(node, rmap.out_dim, kinds)
        plan.tie(out, space)
        return out
    shape_in = node_shape(input_of(node))
    sizes = [shape_in[d] for d in rmap.in_dims]
    owner = torch.arange(space.size).reshape([space.size if d == space.dim else 1 for d in rmap.in_dims])
    owner = owner.expand(sizes).reshape(-1)
    out = plan.new_space(node, rmap.out_dim, kinds[owner])
    plan.tie_ids(out.ids.tolist(), (space.start + owner).tolist())
    return out


@dataclass
class Reshape(Record):
    """A reshape-like op. ``rewrite``: how building emits it: ``"copy"`` (its arguments name dims,
    not sizes: flatten, unsqueeze(d)), ``"sizes"`` (view/reshape: the channel entry is rewritten),
    ``"squeeze"`` (squeeze(): every size-1 dim but the channel dim)."""

    map: ReshapeMap
    rewrite: str


def reshape_sizes(node: fx.Node) -> list | None:
    """The size arguments of ``x.view(*sizes)`` / ``x.reshape(sizes)`` / ``torch.reshape(x, sizes)``
    as a list (ints, -1 and nodes), or None when they are not spelled out (``x.view(y.shape)``)."""
    rest = list(node.args[1:])
    if "shape" in node.kwargs or "size" in node.kwargs:
        rest = [node.kwargs.get("shape", node.kwargs.get("size"))]
    if len(rest) == 1 and isinstance(rest[0], (tuple, list)):
        rest = list(rest[0])
    if not rest or any(not isinstance(s, (int, fx.Node)) or isinstance(s, bool) for s in rest):
        return None
    if any(isinstance(s, fx.Node) and node_shape(s) is not None for s in rest):
        return None  # a tensor argument (x.view(dtype) or similar)
    return rest


def analyze_reshape(node: fx.Node, plan: ChannelPlan, ctx: Context) -> Record:
    """view/reshape/flatten/squeeze/unsqueeze (methods, functions, ``nn.Flatten``, ``nn.Unflatten``)."""
    shuffle = analyze_shuffle(node, plan)
    if shuffle is not None:
        return shuffle
    x, space = tracked_input(node, plan)
    if space is None:
        return Copy()
    name = node.target if node.op == "call_method" else getattr(node.target, "__name__", "")
    if node.op == "call_module":
        name = "flatten" if isinstance(plan.module(node), nn.Flatten) else "unflatten"
    rmap = reshape_map(space.dim, [s for s in node_shapes(x)], [s for s in node_shapes(node)])
    if rmap is None:
        return whole(node, plan)
    if name in ("view", "reshape"):
        if reshape_sizes(node) is None:
            return whole(node, plan)
        rewrite = "sizes"
    elif name == "squeeze" and len(node.args) < 2 and "dim" not in node.kwargs:
        rewrite = "squeeze"
    else:
        rewrite = "copy"
    _tie_reshape(node, plan, space, rmap)
    return Reshape(rmap, rewrite)


# -- channel shuffle ------------------------------------------------------------------------------
def _skip_contiguous(node: fx.Node) -> fx.Node | None:
    """The single user of ``node``, past ``.contiguous()`` calls (None unless there is exactly one)."""
    while True:
        if len(node.users) != 1:
            return None
        user = next(iter(node.users))
        if not (user.op == "call_method" and user.target == "contiguous"):
            return user
        node = user


def _is_reshape_like(node: fx.Node) -> bool:
    return ((node.op == "call_method" and node.target in RESHAPE_METHODS + FLATTEN_METHODS + ("unflatten",))
            or (node.op == "call_function" and node.target in (torch.reshape, torch.flatten)))


def _swap(node: fx.Node, a: int, b: int) -> bool:
    """Whether ``node`` transposes exactly dims ``a`` and ``b`` of its input."""
    ndim = len(node_shape(node.args[0]))
    if node.op == "call_method" and node.target in ("transpose", "swapaxes", "swapdims"):
        dims = {d % ndim for d in node.args[1:3]} if len(node.args) == 3 else None
        return dims == {a, b}
    if node.op == "call_function" and node.target is torch.transpose:
        return len(node.args) == 3 and {d % ndim for d in node.args[1:3]} == {a, b}
    if node.op == "call_method" and node.target == "permute":
        perm = list(node.args[1]) if len(node.args) == 2 and isinstance(node.args[1], (tuple, list)) \
            else list(node.args[1:])
        expected = list(range(ndim))
        expected[a], expected[b] = b, a
        return all(isinstance(p, int) for p in perm) and [p % ndim for p in perm] == expected
    return False


@dataclass(frozen=True)
class Shuffle:
    """A channel shuffle: ``split`` (channel dim -> two dims), ``swap`` (transpose them), ``merge``
    (back to one dim), and ``perm``: output channel ``q`` is input channel ``perm[q]``."""

    split: fx.Node
    swap: fx.Node
    merge: fx.Node
    perm: torch.Tensor


def find_shuffle(split: fx.Node, plan: ChannelPlan) -> Shuffle | None:
    """The channel shuffle that starts at ``split``, if it is one, on every run's shapes."""
    x, space = tracked_input(split, plan)
    if space is None or not _is_reshape_like(split):
        return None
    swap = _skip_contiguous(split)
    if swap is None:
        return None
    merge = _skip_contiguous(swap)
    if merge is None or not _is_reshape_like(merge):
        return None
    d = space.dim
    parts = None
    for shape_in, shape_split, shape_merged in zip(node_shapes(x), node_shapes(split), node_shapes(merge)):
        if not all(isinstance(s, torch.Size) for s in (shape_in, shape_split, shape_merged)):
            return None
        other_in = list(shape_in[:d]) + list(shape_in[d + 1:])
        if (len(shape_split) != len(shape_in) + 1 or list(shape_split[:d]) + list(shape_split[d + 2:]) != other_in
                or shape_split[d] * shape_split[d + 1] != shape_in[d] or shape_merged != shape_in):
            return None
        if parts not in (None, (shape_split[d], shape_split[d + 1])):
            return None
        parts = (shape_split[d], shape_split[d + 1])
    if parts is None or not _swap(swap, d, d + 1):
        return None
    perm = torch.arange(space.size).reshape(parts).t().reshape(-1)
    return Shuffle(split, swap, merge, perm)


def _shuffle_through(node: fx.Node, plan: ChannelPlan) -> Shuffle | None:
    """The shuffle ``node`` belongs to (as its split, swap, a contiguous call or its merge)."""
    probe, steps = node, 0
    while probe is not None and steps < 6:
        shuffle = find_shuffle(probe, plan) if _is_reshape_like(probe) else None
        if shuffle is not None:
            inside = {shuffle.split, shuffle.swap, shuffle.merge}
            chain = shuffle.split
            while chain is not shuffle.merge:  # the contiguous calls in between belong too
                chain = next(iter(chain.users))
                inside.add(chain)
            return shuffle if node in inside else None
        probe = input_of(probe)
        steps += 1
    return None


@dataclass
class ShuffleStep(Record):
    """A node inside a channel shuffle before its merge: building emits nothing (the compacted
    tensor keeps its channels on one dim until the merge reorders them)."""


@dataclass
class ShuffleMerge(Record):
    """The merge that ends a channel shuffle: the compacted op reorders the kept channels."""

    shuffle: Shuffle
    source: fx.Node  # the tensor the shuffle started from


def analyze_shuffle(node: fx.Node, plan: ChannelPlan) -> Record | None:
    """The record of ``node`` if it is part of a channel shuffle, else None."""
    shuffle = _shuffle_through(node, plan)
    if shuffle is None:
        return None
    if node is not shuffle.merge:
        return ShuffleStep()
    source = input_of(shuffle.split)
    space = plan.space_of[source]
    out = plan.new_space(node, space.dim, plan.kinds(space)[shuffle.perm])
    plan.tie_ids(out.ids.tolist(), (space.start + shuffle.perm).tolist())
    return ShuffleMerge(shuffle, source)


def analyze_in_shuffle(node: fx.Node, plan: ChannelPlan, ctx: Context) -> Record | None:
    """``transpose`` / ``contiguous`` inside a shuffle, else None (the caller's rule applies)."""
    shuffle = _shuffle_through(node, plan)
    return ShuffleStep() if shuffle is not None and node is not shuffle.merge else None


# -- permutations of dims -----------------------------------------------------------------------
def permuted_dim(node: fx.Node, dim: int, ndim: int) -> int | None:
    """Where dim ``dim`` of the input goes under ``node`` (permute/transpose/movedim/t), or None."""
    args = list(node.args[1:])
    name = node.target if node.op == "call_method" else getattr(node.target, "__name__", "")
    order = list(range(ndim))
    try:
        if name == "permute":
            perm = list(args[0]) if len(args) == 1 and isinstance(args[0], (tuple, list)) else args
            perm = list(node.kwargs.get("dims", perm))
            order = [p % ndim for p in perm]
        elif name in ("transpose", "swapaxes", "swapdims"):
            a, b = (args + [node.kwargs.get("dim0"), node.kwargs.get("dim1")])[:2]
            a, b = a % ndim, b % ndim
            order[a], order[b] = order[b], order[a]
        elif name == "t":
            order = order[::-1] if ndim == 2 else order
        elif name in ("movedim", "moveaxis"):
            src, dst = (args + [node.kwargs.get("source"), node.kwargs.get("destination")])[:2]
            order = torch.arange(ndim).movedim(src, dst).tolist()
        else:
            return None
    except (TypeError, IndexError, RuntimeError):
        return None
    if sorted(order) != list(range(ndim)) or any(not isinstance(o, int) for o in order):
        return None
    return order.index(dim)


@dataclass
class Permute(Record):
    """A permutation of dims: the channel dim moves, channels (and AFFINE signals) follow."""


def analyze_permute(node: fx.Node, plan: ChannelPlan, ctx: Context) -> Record:
    step = analyze_in_shuffle(node, plan, ctx)
    if step is not None:
        return step
    x, space = tracked_input(node, plan)
    if space is None:
        return Copy()
    out_dim = permuted_dim(node, space.dim, len(node_shape(x)))
    if out_dim is None:
        return whole(node, plan)
    out = plan.new_space(node, out_dim, plan.kinds(space))
    plan.tie(out, space)
    return Permute()


# -- expand ---------------------------------------------------------------------------------------
@dataclass
class Expand(Record):
    """``x.expand(*sizes)`` / ``x.expand_as(y)``: the channel dim keeps its size (the compacted op
    gets -1 there); ``new_dims`` leading dims are added."""

    new_dims: int
    as_other: bool


def analyze_expand(node: fx.Node, plan: ChannelPlan, ctx: Context) -> Record:
    x, space = tracked_input(node, plan)
    if space is None:
        return Copy()
    shape_in, shape_out = node_shape(x), node_shape(node)
    new_dims = len(shape_out) - len(shape_in)
    out_dim = space.dim + new_dims
    if shape_out[out_dim] != space.size:
        return whole(node, plan)
    if node.target == "expand_as":
        other = node.args[1]
        other_space = plan.space_of.get(other)
        if other_space is None or other_space.dim != out_dim:
            return whole(node, plan)
        out = plan.new_space(node, out_dim, affine_to_free(plan.kinds(space)))
        plan.tie(out, space)
        plan.tie(out, other_space)
        return Expand(new_dims, True)
    if reshape_sizes(node) is None:
        return whole(node, plan)
    out = plan.new_space(node, out_dim, affine_to_free(plan.kinds(space)))
    plan.tie(out, space)
    return Expand(new_dims, False)
