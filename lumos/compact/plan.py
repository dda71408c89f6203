"""Which channels of every tensor survive compaction: channel groups solved over an fx graph.

Every tracked tensor gets a *space*: its channels along one dimension, each a global id.
Rules (``rules.py``) tie ids that must be kept or dropped together (an activation's input
and output, the two operands of a residual add, a concatenation's parts at their offsets),
mark ids a layer *produces* non-constant (open output gates) and ids a layer *consumes*
(open input columns of a layer whose outputs survive), and *pin* ids that must stay
physically present (model outputs, inputs of ops lumos has no rule for).

A group of tied ids is kept if it is pinned, or if it is both produced and consumed.
Consumption depends on which outputs survive, so the solve iterates to a fixed point
(liveness only decreases, so it terminates).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable

import torch
from torch import fx, nn

from .trace import node_shape


@dataclass(frozen=True)
class Space:
    """The channels of one tensor: global ids ``start .. start + size - 1`` along ``dim``."""

    start: int
    size: int
    dim: int

    @property
    def ids(self) -> torch.Tensor:
        return torch.arange(self.start, self.start + self.size)


class ChannelPlan:
    """Channel spaces, ties and liveness for one traced model (see module docstring)."""

    def __init__(self, gm: fx.GraphModule):
        self.gm = gm
        self.modules = dict(gm.named_modules())
        self.space_of: dict[fx.Node, Space] = {}
        self._parent: list[int] = []
        self._produced: list[bool] = []
        self._pinned: list[bool] = []
        self._consumers: list[tuple[Space, Callable[[], torch.Tensor | bool]]] = []
        self._kept: torch.Tensor | None = None  # bool per global id, after solve()
        self._pinned_group: torch.Tensor | None = None
        self.producer_gates: list[tuple[Space, object]] = []  # (space, gate producing it)
        self.certain_spaces: list[Space] = []  # spaces an ungated op computes in full

    # -- building ---------------------------------------------------------------------------
    def module(self, node: fx.Node) -> nn.Module:
        return self.modules[node.target]

    def new_space(self, node: fx.Node, dim: int, produced: bool | torch.Tensor = True,
                  gate=None) -> Space:
        """Give ``node``'s output a fresh space on ``dim``; ``produced`` marks non-constant ids.

        ``gate`` is the :class:`~lumos.gates.HardConcreteGate` whose eval mask gave ``produced``
        (one gate per channel), so that the cost model can follow it differentiably.
        """
        shape = node_shape(node)
        dim = dim % len(shape)
        space = self.new_ids(shape[dim], dim, produced, gate)
        self.space_of[node] = space
        return space

    def new_ids(self, size: int, dim: int = -1, produced: bool | torch.Tensor = True, gate=None) -> Space:
        """A fresh space of ``size`` ids that is no tensor's output: a layer's internal width
        (attention heads, head dimensions). ``produced`` and ``gate`` as in :meth:`new_space`."""
        space = Space(len(self._parent), size, dim)
        self._parent.extend(range(space.start, space.start + size))
        flags = [bool(produced)] * size if isinstance(produced, bool) else produced.bool().cpu().tolist()
        self._produced.extend(flags)
        self._pinned.extend([False] * size)
        if gate is not None:
            self.producer_gates.append((space, gate))
        elif produced is True:
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
            raise ValueError(f"lumos.compact: cannot tie channel spaces of sizes {a.size} and {b.size}")
        self.tie_ids(range(a.start, a.start + a.size), range(b.start, b.start + b.size))

    def same_space(self, node: fx.Node, source: fx.Node) -> Space:
        """Give ``node`` a fresh space tied to ``source``'s (an elementwise op's output)."""
        src = self.space_of[source]
        space = self.new_space(node, src.dim, produced=False)
        self.tie(space, src)
        return space

    def pin(self, space: Space) -> None:
        """Keep every channel of ``space`` (and of everything tied to it)."""
        self._pinned[space.start:space.start + space.size] = [True] * space.size

    def consume(self, space: Space, mask: Callable[[], torch.Tensor | bool] | torch.Tensor | bool = True) -> None:
        """Mark channels of ``space`` as read; ``mask`` may be a callable re-evaluated each solve step."""
        fn = mask if callable(mask) else (lambda: mask)
        self._consumers.append((space, fn))

    # -- solving ----------------------------------------------------------------------------
    def _group_any(self, roots: torch.Tensor, flags: torch.Tensor) -> torch.Tensor:
        out = torch.zeros(roots.numel(), dtype=torch.bool)
        out.index_put_((roots,), flags, accumulate=True)  # bool accumulate = logical or
        return out[roots]

    def solve(self, max_iters: int = 1000) -> None:
        """Compute which ids are kept (module docstring), iterating consumption to a fixed point."""
        n = len(self._parent)
        roots = self.group_index()
        produced = self._group_any(roots, torch.tensor(self._produced, dtype=torch.bool))
        pinned = self._group_any(roots, torch.tensor(self._pinned, dtype=torch.bool))
        self._kept = pinned | produced
        self._pinned_group = pinned
        for _ in range(max_iters):
            consumed = torch.zeros(n, dtype=torch.bool)
            for space, fn in self._consumers:
                mask = fn()
                block = consumed[space.start:space.start + space.size]
                block |= mask if isinstance(mask, torch.Tensor) else torch.full((space.size,), bool(mask))
            kept = pinned | (produced & self._group_any(roots, consumed))
            if torch.equal(kept, self._kept):
                break
            self._kept = kept
        else:  # pragma: no cover - liveness is monotone, so this cannot happen
            raise RuntimeError("lumos.compact: channel liveness did not converge")

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
