"""Zoo models with graph and attention layers: a GINE molecule model and a small ViT, with data."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

import lumos

ATOM_TYPES, BOND_TYPES = 5, 3
NODE_DIM = ATOM_TYPES + 3   # one-hot atom type, charge, mass, a distractor
EDGE_DIM = BOND_TYPES + 1   # one-hot bond type, bond length


def make_molecules(num_graphs: int = 6, seed: int = 0, min_atoms: int = 5, max_atoms: int = 12):
    """A batch of molecule-like graphs: a random spanning tree per molecule plus a ring closure
    or two, every bond in both directions.

    Returns ``(x, edge_index, edge_attr, batch, y)``: node features ``(N, NODE_DIM)``,
    ``(2, E)`` long, ``(E, EDGE_DIM)``, the graph of each node ``(N,)`` and one regression target
    per graph ``(G, 1)`` (a function of atom counts and bonds).
    """
    g = torch.Generator().manual_seed(seed)
    xs, edges, attrs, batch, ys, offset = [], [], [], [], [], 0
    for graph in range(num_graphs):
        n = int(torch.randint(min_atoms, max_atoms + 1, (1,), generator=g))
        atom = torch.randint(0, ATOM_TYPES, (n,), generator=g)
        x = torch.cat([F.one_hot(atom, ATOM_TYPES).float(), torch.randn(n, 3, generator=g)], 1)
        parent = [int(torch.randint(0, i, (1,), generator=g)) for i in range(1, n)]
        pairs = [(i + 1, p) for i, p in enumerate(parent)]
        for _ in range(int(torch.randint(1, 3, (1,), generator=g))):
            a, b = torch.randint(0, n, (2,), generator=g).tolist()
            if a != b:
                pairs.append((a, b))
        src = torch.tensor([a for a, b in pairs] + [b for a, b in pairs])
        dst = torch.tensor([b for a, b in pairs] + [a for a, b in pairs])
        bond = torch.randint(0, BOND_TYPES, (len(pairs),), generator=g).repeat(2)
        length = (1.0 + 0.2 * torch.rand(len(pairs), generator=g)).repeat(2)
        xs.append(x)
        edges.append(torch.stack([src, dst]) + offset)
        attrs.append(torch.cat([F.one_hot(bond, BOND_TYPES).float(), length[:, None]], 1))
        batch.append(torch.full((n,), graph))
        ys.append(x[:, :ATOM_TYPES].sum(0) @ torch.arange(1.0, ATOM_TYPES + 1) / n + 0.1 * bond.float().mean())
        offset += n
    return (torch.cat(xs), torch.cat(edges, 1), torch.cat(attrs), torch.cat(batch),
            torch.stack(ys)[:, None])


class GINEMolecule(nn.Module):
    """Node embedding -> 3 x (GINConv with edge embedding, ReLU) -> per-graph pool -> MLP head."""

    def __init__(self, node_dim=NODE_DIM, edge_dim=EDGE_DIM, hidden=32, layers=3, n_out=1, pool="sum"):
        super().__init__()
        self.node_emb = nn.Linear(node_dim, hidden)
        self.convs = nn.ModuleList(
            lumos.nn.GINConv(hidden, nn.Sequential(nn.Linear(hidden, 2 * hidden), nn.ReLU(),
                                                   nn.Linear(2 * hidden, hidden)), edge_dim, train_eps=True)
            for _ in range(layers))
        self.pool = lumos.nn.GlobalPool(pool)
        self.head = nn.Sequential(nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, n_out))

    def forward(self, x, edge_index, edge_attr, batch):
        h = self.node_emb(x)
        for conv in self.convs:
            h = F.relu(conv(h, edge_index, edge_attr))
        return self.head(self.pool(h, batch))


def patchify(images: torch.Tensor, patch: int) -> torch.Tensor:
    """``(B, C, H, W)`` images -> ``(B, H*W / patch^2, C * patch^2)`` flattened patches."""
    b, c, h, w = images.shape
    x = images.reshape(b, c, h // patch, patch, w // patch, patch).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(b, (h // patch) * (w // patch), c * patch * patch)


class EncoderBlock(nn.Module):
    """Pre-LN transformer block: ``h + attn(ln(h))``, ``h + mlp(ln(h))``."""

    def __init__(self, dim, heads, mlp):
        super().__init__()
        self.ln1 = nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.ln2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, mlp), nn.GELU(), nn.Linear(mlp, dim))

    def forward(self, h):
        a = self.ln1(h)
        h = h + self.attn(a, a, a, need_weights=False)[0]
        return h + self.mlp(self.ln2(h))


class TinyViT(nn.Module):
    """Linear patch embedding, cls token, learned positions, encoder blocks, LayerNorm, head."""

    def __init__(self, patch_dim=48, patches=16, dim=32, heads=4, depth=2, mlp=64, n_classes=5):
        super().__init__()
        self.embed = nn.Linear(patch_dim, dim)
        self.cls = nn.Parameter(0.02 * torch.randn(1, 1, dim))
        self.pos = nn.Parameter(0.02 * torch.randn(1, patches + 1, dim))
        self.blocks = nn.Sequential(*(EncoderBlock(dim, heads, mlp) for _ in range(depth)))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, n_classes)

    def forward(self, patches):
        h = self.embed(patches)
        h = torch.cat([self.cls.expand(h.shape[0], -1, -1), h], dim=1) + self.pos
        h = self.blocks(h)
        return self.head(self.norm(h)[:, 0])


def make_images(n: int = 8, seed: int = 0, size: int = 16, patch: int = 4) -> torch.Tensor:
    """``(n, size^2 / patch^2, 3 * patch^2)`` patches of random smooth images."""
    g = torch.Generator().manual_seed(seed)
    images = F.avg_pool2d(torch.randn(n, 3, size + 2, size + 2, generator=g), 3, stride=1)
    return patchify(images, patch)
