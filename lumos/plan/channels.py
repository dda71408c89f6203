"""Which channels of every tensor survive compaction: channel groups solved over an fx graph.

Every tracked tensor gets a *space*: its channels along one dim, each a global id. Analysis
rules (``lumos/plan/ops_*.py``) record, as data on the :class:`ChannelPlan`:

- **ties**: ids kept or dropped together (an activation's input and output, the operands of a
  residual add, a concatenation's parts at their offsets, a flatten's blocks);
- **kinds**: what an id holds if it is dropped. ``CONST``: the same value at every position (a
  closed gate's output, an activation of a constant); ``AFFINE``: a known affine function of a
  few per-row signals (a norm's output on a dropped channel depends on the row's mean and
  deviation, see ``lumos/compact/DERIVATIONS.md``); ``FREE``: anything else (an open gate's
  output), which can be dropped only if nothing reads it;
- **reads** (``consume``): ids an op reads while its outputs survive, *strictly* (the op needs
  the value itself) or not (a linear layer or a norm can fold an AFFINE input);
- **pins**: ids that must stay physically present (model outputs, inputs of ops lumos keeps
  whole).

An id *needs* to stay when it is FREE and read, or AFFINE and read strictly; a group of tied
ids is kept when it is pinned or one of its ids needs to stay. Reads depend on which outputs
survive, so :meth:`ChannelPlan.solve` iterates from "everything kept" to a fixed point (liveness
only decreases, so it terminates; keeping more is always exact).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable

import torch
from torch import fx, nn

from .trace import node_shape

CONST, AFFINE, FREE = 0, 1, 2
KIND_NAMES = ("CONST", "AFFINE", "FREE")


@dataclass(frozen=True)
class Space:
    """The channels of one tensor: global ids ``start .. start + size - 1`` along ``dim``."""

    start: int
    size: int
    dim: int

    @property
    def ids(self) -> torch.Tensor:
        return torch.arange(self.start, self.start + self.size)


def as_kinds(kind: bool | int | torch.Tensor, size: int) -> list[int]:
    """A kind per channel from ``kind``: True/False (FREE/CONST), a kind, or a tensor of either."""
    if isinstance(kind, torch.Tensor):
        kind = kind.detach().cpu()
        values = torch.where(kind, FREE, CONST) if kind.dtype == torch.bool else kind.long()
        return values.tolist()
    if isinstance(kind, bool):
        return [FREE if kind else CONST] * size
    return [int(kind)] * size


class ChannelPlan:
    """Channel spaces, ties, kinds, reads and liveness for one traced model (module docstring).

    Attributes:
        gm: the traced model.
        space_of: node -> its output's :class:`Space` (tracked nodes only).
        producer_gates: ``(space, gate)`` for every space whose FREE channels are the open
            units of ``gate`` (what the cost model follows differentiably).
        certain_spaces: spaces an ungated op computes in full (always FREE).
        alternatives: input tuples unlike the example that the model accepts (see
            :mod:`lumos.plan.probe`); shape-dependent rules check themselves on them.
    """

    def __init__(self, gm: fx.GraphModule):
        self.gm = gm
        self.modules = dict(gm.named_modules())
        self.space_of: dict[fx.Node, Space] = {}
        self._parent: list[int] = []
        self._kind: list[int] = []
        self._pinned: list[bool] = []
        self._pinners: list[tuple[Space, str]] = []  # what pinned a space, where it said
        self._consumers: list[tuple[Space, Callable[[], torch.Tensor | bool], bool]] = []
        self._kept: torch.Tensor | None = None  # bool per global id, after solve()
        self._pinned_group: torch.Tensor | None = None
        self.producer_gates: list[tuple[Space, object]] = []
        self.certain_spaces: list[Space] = []
        self.alternatives: list[tuple] = []

    # -- building ---------------------------------------------------------------------------
    def module(self, node: fx.Node) -> nn.Module:
        return self.modules[node.target]

    def module_of(self, target: str) -> nn.Module:
        """The submodule of the traced model named ``target``."""
        return self.modules[target]

    def new_space(self, node: fx.Node, dim: int, kind: bool | int | torch.Tensor = True, gate=None) -> Space:
        """Give ``node``'s output a fresh space on ``dim``. ``kind``: True (FREE), False (CONST),
        a kind, or a tensor of them per channel (a bool tensor: FREE where True).

        ``gate`` is the :class:`~lumos.gates.HardConcreteGate` whose eval mask gave ``kind``
        (one gate per channel), so that the cost model can follow it differentiably.
        """
        shape = node_shape(node)
        dim = dim % len(shape)
        space = self.new_ids(shape[dim], dim, kind, gate)
        self.space_of[node] = space
        return space

    def new_ids(self, size: int, dim: int = -1, kind: bool | int | torch.Tensor = True, gate=None) -> Space:
        """A fresh space of ``size`` ids that is no tensor's output: a layer's internal width
        (attention heads, head dimensions). ``kind`` and ``gate`` as in :meth:`new_space`."""
        space = Space(len(self._parent), size, dim)
        self._parent.extend(range(space.start, space.start + size))
        self._kind.extend(as_kinds(kind, size))
        self._pinned.extend([False] * size)
        if gate is not None:
            self.producer_gates.append((space, gate))
        elif kind is True or (isinstance(kind, int) and not isinstance(kind, bool) and kind == FREE):
            self.certain_spaces.append(space)
        return space

    def _find(self, i: int) -> int:
        root = i
        while self._parent[root] != root:
            root = self._parent[root]
        while self._parent[i] != root:  # path compression
            self._parent[i], i = root, self._parent[i]
        return root

    def tie_ids(self, a: Iterable[int], b: Iterable[int]) -> None:
        """Tie ids pairwise: each pair is kept or dropped together."""
        for i, j in zip(a, b):
            ri, rj = self._find(int(i)), self._find(int(j))
            if ri != rj:
                self._parent[max(ri, rj)] = min(ri, rj)

    def tie(self, a: Space, b: Space) -> None:
        """Tie two spaces of equal size channel by channel."""
        if a.size != b.size:
            raise ValueError(f"lumos: cannot tie channel spaces of sizes {a.size} and {b.size}")
        self.tie_ids(range(a.start, a.start + a.size), range(b.start, b.start + b.size))

    def kinds(self, space: Space) -> torch.Tensor:
        """Long ``(size,)``: the kind of each channel of ``space`` (CONST, AFFINE or FREE)."""
        return torch.tensor(self._kind[space.start:space.start + space.size], dtype=torch.long)

    def same_space(self, node: fx.Node, source: fx.Node, kind: torch.Tensor | None = None) -> Space:
        """Give ``node`` a fresh space tied to ``source``'s (an elementwise op's output); its kinds
        are ``kind`` if given, else the source's."""
        src = self.space_of[source]
        space = self.new_space(node, src.dim, self.kinds(src) if kind is None else kind)
        self.tie(space, src)
        return space

    def pin(self, space: Space, by: str | None = None) -> None:
        """Keep every channel of ``space`` (and of everything tied to it); ``by`` names the op
        that needs them, for :meth:`pinned_by`."""
        self._pinned[space.start:space.start + space.size] = [True] * space.size
        if by is not None and space.size:
            self._pinners.append((space, by))

    def pinned_by(self, space: Space) -> list[str]:
        """The ops (as :meth:`pin` named them) that keep channels tied to ``space`` whole, in
        analysis order, each once."""
        roots = {self._find(i) for i in range(space.start, space.start + space.size)}
        names: list[str] = []
        for pinned, by in self._pinners:
            if by not in names and any(self._find(i) in roots for i in range(pinned.start, pinned.start + pinned.size)):
                names.append(by)
        return names

    def pin_ids(self, ids: Iterable[int]) -> None:
        """Keep the given channel ids (and everything tied to them)."""
        for i in ids:
            self._pinned[int(i)] = True

    def consume(self, space: Space, mask: Callable[[], torch.Tensor | bool] | torch.Tensor | bool = True,
                strict: bool = True) -> None:
        """Mark channels of ``space`` as read; ``mask`` may be a callable re-evaluated each solve
        step. ``strict=False``: the reader folds an AFFINE value (a linear layer, a norm)."""
        fn = mask if callable(mask) else (lambda: mask)
        self._consumers.append((space, fn, strict))

    # -- solving ----------------------------------------------------------------------------
    def _group_any(self, roots: torch.Tensor, flags: torch.Tensor) -> torch.Tensor:
        out = torch.zeros(roots.numel(), dtype=torch.bool)
        out.index_put_((roots,), flags, accumulate=True)  # bool accumulate = logical or
        return out[roots]

    def solve(self, max_iters: int = 10000) -> None:
        """Compute which ids are kept (module docstring), iterating reads to a fixed point.

        ``max_iters=1`` gives one step from "everything kept": the ids that could be dropped
        while every reader stays alive (what :func:`lumos.gate` asks of each layer alone)."""
        n = len(self._parent)
        roots = self.group_index()
        kinds = torch.tensor(self._kind, dtype=torch.long)
        pinned = self._group_any(roots, torch.tensor(self._pinned, dtype=torch.bool))
        self._pinned_group = pinned
        self._kept = torch.ones(n, dtype=torch.bool)
        for _ in range(max_iters):
            read = torch.zeros(n, dtype=torch.bool)
            read_strict = torch.zeros(n, dtype=torch.bool)
            for space, fn, strict in self._consumers:
                mask = fn()
                mask = mask if isinstance(mask, torch.Tensor) else torch.full((space.size,), bool(mask))
                read[space.start:space.start + space.size] |= mask
                if strict:
                    read_strict[space.start:space.start + space.size] |= mask
            need = ((kinds == FREE) & read) | ((kinds == AFFINE) & read_strict)
            kept = pinned | self._group_any(roots, need)
            if torch.equal(kept, self._kept):
                break
            self._kept = kept
        else:  # pragma: no cover - liveness is monotone, so this cannot happen
            if max_iters > 1:
                raise RuntimeError("lumos: channel liveness did not converge")

    # -- reading ----------------------------------------------------------------------------
    def kept_mask(self, space: Space) -> torch.Tensor:
        """Bool ``(size,)``: which channels of ``space`` are kept. Before :meth:`solve`, all."""
        if self._kept is None:
            return torch.ones(space.size, dtype=torch.bool)
        return self._kept[space.start:space.start + space.size]

    def kept(self, space: Space) -> torch.Tensor:
        """Long indices of the kept channels of ``space``."""
        return self.kept_mask(space).nonzero().flatten()

    def removed(self, space: Space) -> torch.Tensor:
        """Long indices of the dropped channels of ``space``."""
        return (~self.kept_mask(space)).nonzero().flatten()

    def group_index(self) -> torch.Tensor:
        """``(num_ids,)`` long: a dense group number per channel id (tied ids share it)."""
        roots = torch.tensor([self._find(i) for i in range(len(self._parent))], dtype=torch.long)
        return torch.unique(roots, return_inverse=True)[1]

    def pinned_mask(self, space: Space) -> torch.Tensor:
        """Bool ``(size,)``: channels that must stay whatever the gates say (after :meth:`solve`)."""
        return self._pinned_group[space.start:space.start + space.size]

    def same_group(self, a: Space, b: Space) -> bool:
        """Whether the first channels of two spaces are tied together."""
        return a.size > 0 and b.size > 0 and self._find(a.start) == self._find(b.start)

    def width(self, node: fx.Node) -> int | None:
        """Number of kept channels of ``node``'s output, or None when it is not tracked."""
        space = self.space_of.get(node)
        return None if space is None else int(self.kept_mask(space).sum())
