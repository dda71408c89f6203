"""A collection of small graphs stored flat and batched on the fly (for the ``molecules`` workload)."""
from __future__ import annotations

import torch


def _ranges(starts: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """The concatenation of ``arange(s, s + c)`` over ``zip(starts, counts)``, vectorised."""
    total = int(counts.sum())
    first = torch.cumsum(counts, 0) - counts  # where each range begins in the output
    return torch.repeat_interleave(starts - first, counts) + torch.arange(total)


class GraphSet:
    """Graphs with node features, edges, edge features and one target row per graph.

    Iterating gives ``((x, edge_index, edge_attr, batch), y)`` batches of ``batch_size`` graphs
    (the disjoint union of the graphs, node indices offset per graph). With ``shuffle``, after
    :meth:`set_epoch` the order is a pure function of ``(seed, epoch)`` (as with torch's
    ``DistributedSampler``; :func:`lumos.fit` calls it every epoch), so a training run sees the
    same batches whatever iterated the set before it, and a run resumed mid-epoch redraws the
    order it left. Before any :meth:`set_epoch`, every iteration draws a new order from the set's
    own generator (seeded by ``seed``).

    Args:
        x: ``(N, F)`` node features of all graphs, graph after graph.
        edge_index: ``(2, E)`` int64 (source, destination) node indices *local to each graph*.
        edge_attr: ``(E, F_e)`` edge features.
        node_ptr: ``(G + 1,)`` int64; the nodes of graph ``g`` are ``node_ptr[g]:node_ptr[g + 1]``.
        edge_ptr: ``(G + 1,)`` int64, likewise for edges.
        y: ``(G, ...)`` targets.
        batch_size: graphs per batch.
        shuffle: draw a new graph order every iteration.
        seed: seed of that order.
    """

    def __init__(self, x: torch.Tensor, edge_index: torch.Tensor, edge_attr: torch.Tensor, node_ptr: torch.Tensor,
                 edge_ptr: torch.Tensor, y: torch.Tensor, batch_size: int = 64, shuffle: bool = False,
                 seed: int = 0):
        n_graphs = len(node_ptr) - 1
        if len(edge_ptr) != n_graphs + 1 or y.shape[0] != n_graphs:
            raise ValueError(f"GraphSet: node_ptr, edge_ptr and y disagree on the number of graphs "
                             f"({n_graphs}, {len(edge_ptr) - 1}, {y.shape[0]})")
        if (int(node_ptr[-1]) != x.shape[0] or int(edge_ptr[-1]) != edge_index.shape[1]
                or edge_attr.shape[0] != edge_index.shape[1]):
            raise ValueError("GraphSet: node_ptr / edge_ptr do not end at the number of nodes / edges")
        self.x, self.edge_index, self.edge_attr, self.y = x, edge_index, edge_attr, y
        self.node_ptr, self.edge_ptr = node_ptr, edge_ptr
        self.batch_size, self.shuffle, self.seed = batch_size, shuffle, seed
        self._generator = torch.Generator().manual_seed(seed)
        self._epoch: int | None = None

    def __len__(self) -> int:
        return self.y.shape[0]

    def batch(self, graphs: torch.Tensor) -> tuple[tuple[torch.Tensor, ...], torch.Tensor]:
        """The graphs ``graphs`` (int64 indices) as one batch ``((x, edge_index, edge_attr, batch), y)``."""
        node_counts = self.node_ptr[graphs + 1] - self.node_ptr[graphs]
        edge_counts = self.edge_ptr[graphs + 1] - self.edge_ptr[graphs]
        nodes = _ranges(self.node_ptr[graphs], node_counts)
        edges = _ranges(self.edge_ptr[graphs], edge_counts)
        offsets = torch.repeat_interleave(torch.cumsum(node_counts, 0) - node_counts, edge_counts)
        batch = torch.repeat_interleave(torch.arange(len(graphs)), node_counts)
        inputs = (self.x[nodes], self.edge_index[:, edges] + offsets, self.edge_attr[edges], batch)
        return inputs, self.y[graphs]

    def set_epoch(self, epoch: int) -> None:
        """Draw the order of the following iterations from ``(seed, epoch)`` alone."""
        self._epoch = int(epoch)

    def _order_generator(self) -> torch.Generator:
        if self._epoch is None:
            return self._generator
        # Python hashes a tuple of ints alike in every process (PYTHONHASHSEED salts only str and
        # bytes); unlike seed + epoch, neighbouring seeds do not replay each other's epochs.
        return torch.Generator().manual_seed(hash((self.seed, self._epoch)) & (2**63 - 1))

    def __iter__(self):
        n = len(self)
        order = torch.randperm(n, generator=self._order_generator()) if self.shuffle else torch.arange(n)
        for start in range(0, n, self.batch_size):
            yield self.batch(order[start:start + self.batch_size])

    def inputs(self, n: int) -> tuple[torch.Tensor, ...]:
        """The inputs of the first ``n`` graphs as one batch."""
        return self.batch(torch.arange(min(n, len(self))))[0]

    def subset(self, graphs: torch.Tensor, *, batch_size: int | None = None, shuffle: bool = False,
               seed: int = 0) -> "GraphSet":
        """A new set holding the graphs ``graphs`` (re-indexed from 0)."""
        (x, edge_index, edge_attr, _), y = self.batch(graphs)
        node_counts = self.node_ptr[graphs + 1] - self.node_ptr[graphs]
        edge_counts = self.edge_ptr[graphs + 1] - self.edge_ptr[graphs]
        local = edge_index - torch.repeat_interleave(torch.cumsum(node_counts, 0) - node_counts, edge_counts)
        zero = torch.zeros(1, dtype=torch.long)
        return GraphSet(x, local, edge_attr, torch.cat([zero, torch.cumsum(node_counts, 0)]),
                        torch.cat([zero, torch.cumsum(edge_counts, 0)]), y,
                        batch_size or self.batch_size, shuffle, seed)
