"""Models the other zoos do not have, written from papers and common scientific-ML practice, to
break compaction: each one exercises an op or an idiom lumos' own zoos leave out.

``CASES[name]()`` returns a :class:`Case`: the model, its example inputs, other inputs of other
batch / spatial / sequence sizes (what a user feeds it later), and the arguments for
:func:`lumos.gate`. ``randomize_gates`` (tests/zoo.py) sets the gate patterns.
"""
from __future__ import annotations

import math
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrizations


@dataclass
class Case:
    """A model to gate and compact. ``inputs``: the example inputs (a tuple); ``others``: more
    input tuples the model accepts, of other shapes; ``gate_kwargs``: for :func:`lumos.gate`;
    ``all_closed_refusal``: the message (a regex) of the documented refusal to compact it with
    every gate closed, if any."""

    model: nn.Module
    inputs: tuple
    others: list = field(default_factory=list)
    gate_kwargs: dict = field(default_factory=dict)
    all_closed_refusal: str | None = None


def _g(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _randn(*shape, seed: int = 0, dtype=torch.float32) -> torch.Tensor:
    return torch.randn(*shape, generator=_g(seed)).to(dtype)


def _look_trained(model: nn.Module, seed: int = 0) -> nn.Module:
    """Non-trivial norm statistics and affine parameters (fresh ones are 0/1 and hide bugs)."""
    g = _g(seed + 100)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._NormBase):
            if m.track_running_stats and m.running_mean is not None:
                m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g) * 0.3)
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)
        if isinstance(m, (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm)):
            if getattr(m, "weight", None) is not None:
                with torch.no_grad():
                    m.weight.copy_(1 + 0.3 * torch.randn(m.weight.shape, generator=g))
                    if m.bias is not None:
                        m.bias.copy_(0.3 * torch.randn(m.bias.shape, generator=g))
    return model.eval()


# -- scientific-ML architectures -----------------------------------------------------------------
class SpectralConv2d(nn.Module):
    """The Fourier layer of an FNO (Li et al., 2021): ``irfft2(W * rfft2(x)[modes])``, complex
    weights on the lowest ``modes`` frequencies of each spatial dim."""

    def __init__(self, width: int, modes: int):
        super().__init__()
        self.modes = modes
        scale = 1 / width
        self.w_low = nn.Parameter(scale * torch.randn(width, width, modes, modes, dtype=torch.cfloat))
        self.w_high = nn.Parameter(scale * torch.randn(width, width, modes, modes, dtype=torch.cfloat))

    def forward(self, x):
        n, c, h, w = x.shape
        spectrum = torch.fft.rfft2(x)
        out = torch.zeros(n, c, h, w // 2 + 1, dtype=torch.cfloat, device=x.device)
        m = self.modes
        out[:, :, :m, :m] = torch.einsum("bixy,ioxy->boxy", spectrum[:, :, :m, :m], self.w_low)
        out[:, :, -m:, :m] = torch.einsum("bixy,ioxy->boxy", spectrum[:, :, -m:, :m], self.w_high)
        return torch.fft.irfft2(out, s=(h, w))


class FNO2d(nn.Module):
    """Lift (1x1 conv), two Fourier layers each with a 1x1 conv skip and GELU, project."""

    def __init__(self, in_channels: int = 3, width: int = 8, modes: int = 3):
        super().__init__()
        self.lift = nn.Conv2d(in_channels, width, 1)
        self.spectral = nn.ModuleList(SpectralConv2d(width, modes) for _ in range(2))
        self.skip = nn.ModuleList(nn.Conv2d(width, width, 1) for _ in range(2))
        self.project = nn.Sequential(nn.Conv2d(width, 16, 1), nn.GELU(), nn.Conv2d(16, 1, 1))

    def forward(self, x):
        h = self.lift(x)
        for spectral, skip in zip(self.spectral, self.skip):
            h = F.gelu(spectral(h) + skip(h))
        return self.project(h)


class FourierFeatures(nn.Module):
    """A 1-D spectral layer written with ``rfft`` on a Linear's output (channels last), then
    ``irfft`` back: the FFT runs over the sequence, the channels pass through it."""

    def __init__(self, d_in: int = 4, width: int = 12, modes: int = 4):
        super().__init__()
        self.modes = modes
        self.lift = nn.Linear(d_in, width)
        self.weight = nn.Parameter(torch.randn(width, modes, dtype=torch.cfloat) / width)
        self.head = nn.Linear(width, 2)

    def forward(self, x):  # (N, L, d_in)
        h = self.lift(x).transpose(1, 2)  # (N, width, L)
        spectrum = torch.fft.rfft(h, dim=-1)
        kept = spectrum[..., :self.modes] * self.weight
        h = torch.fft.irfft(kept, n=h.shape[-1], dim=-1)
        return self.head(F.gelu(h.transpose(1, 2)))


class PointNet(nn.Module):
    """PointNet (Qi et al., 2017) classification + segmentation head: a shared MLP over points as
    Conv1d(k=1), max over points, the global feature broadcast back and concatenated."""

    def __init__(self, n_points_features: int = 3, classes: int = 4):
        super().__init__()
        self.local = nn.Sequential(nn.Conv1d(n_points_features, 16, 1), nn.BatchNorm1d(16), nn.ReLU(),
                                   nn.Conv1d(16, 24, 1), nn.BatchNorm1d(24), nn.ReLU())
        self.globl = nn.Sequential(nn.Conv1d(24, 32, 1), nn.ReLU())
        self.seg = nn.Sequential(nn.Conv1d(24 + 32, 16, 1), nn.ReLU(), nn.Conv1d(16, classes, 1))
        self.cls = nn.Sequential(nn.Linear(32, 16), nn.ReLU(), nn.Dropout(0.3), nn.Linear(16, classes))

    def forward(self, x):  # (N, 3, P)
        local = self.local(x)
        g = self.globl(local).max(dim=2, keepdim=True).values  # (N, 32, 1)
        seg = self.seg(torch.cat([local, g.expand(-1, -1, x.shape[2])], dim=1))
        return self.cls(g.squeeze(-1)), seg


class MixerBlock(nn.Module):
    """MLP-Mixer (Tolstikhin et al., 2021): token mixing on the transposed tokens, then channel mixing."""

    def __init__(self, tokens: int, channels: int, token_hidden: int, channel_hidden: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(channels)
        self.token_mlp = nn.Sequential(nn.Linear(tokens, token_hidden), nn.GELU(), nn.Linear(token_hidden, tokens))
        self.norm2 = nn.LayerNorm(channels)
        self.channel_mlp = nn.Sequential(nn.Linear(channels, channel_hidden), nn.GELU(),
                                         nn.Linear(channel_hidden, channels))

    def forward(self, x):  # (N, tokens, channels)
        x = x + self.token_mlp(self.norm1(x).transpose(1, 2)).transpose(1, 2)
        return x + self.channel_mlp(self.norm2(x))


class MLPMixer(nn.Module):
    def __init__(self, patch: int = 4, size: int = 16, channels: int = 12):
        super().__init__()
        self.patch = patch
        tokens = (size // patch) ** 2
        self.embed = nn.Conv2d(1, channels, patch, stride=patch)
        self.blocks = nn.Sequential(*[MixerBlock(tokens, channels, 10, 20) for _ in range(2)])
        self.norm = nn.LayerNorm(channels)
        self.head = nn.Linear(channels, 3)

    def forward(self, x):  # (N, 1, 16, 16)
        h = self.embed(x).flatten(2).transpose(1, 2)  # (N, tokens, channels)
        h = self.norm(self.blocks(h))
        return self.head(h.mean(dim=1))


class GLUFeedForward(nn.Module):
    """SwiGLU / GEGLU (Shazeer, 2020): one projection to twice the hidden width, ``chunk`` in two,
    ``act(a) * b``, project back; a residual around it."""

    def __init__(self, d: int = 10, hidden: int = 16, act: Callable = F.silu):
        super().__init__()
        self.act = act
        self.w_in = nn.Linear(d, 2 * hidden)
        self.w_out = nn.Linear(hidden, d)

    def forward(self, x):
        a, b = self.w_in(x).chunk(2, dim=-1)
        return x + self.w_out(self.act(a) * b)


class GLUNet(nn.Module):
    def __init__(self, d_in: int = 7):
        super().__init__()
        self.embed = nn.Linear(d_in, 10)
        self.swiglu = GLUFeedForward(10, 16, F.silu)
        self.geglu = GLUFeedForward(10, 12, F.gelu)
        self.head = nn.Linear(10, 1)

    def forward(self, x):
        return self.head(self.geglu(self.swiglu(self.embed(x))))


class SchNetLike(nn.Module):
    """A SchNet-style continuous-filter convolution (Schuett et al., 2017): a filter network on
    radial basis expansions of edge lengths, ``x[src] * W(d_ij)`` summed into ``dst`` with
    ``index_add``, an atom-wise MLP, and a sum over atoms per molecule."""

    def __init__(self, atom_features: int = 5, width: int = 16, rbf: int = 12, cutoff: float = 3.0):
        super().__init__()
        self.register_buffer("centers", torch.linspace(0, cutoff, rbf))
        self.embed = nn.Linear(atom_features, width)
        self.filter = nn.Sequential(nn.Linear(rbf, width), nn.Softplus(), nn.Linear(width, width))
        self.atomwise = nn.Sequential(nn.Linear(width, width), nn.Softplus(), nn.Linear(width, 1))
        self.pool = SumPool()

    def forward(self, x, pos, edge_index, batch):
        src, dst = edge_index[0], edge_index[1]
        dist = (pos[src] - pos[dst]).norm(dim=-1, keepdim=True)
        expanded = torch.exp(-4.0 * (dist - self.centers) ** 2)
        h = self.embed(x)
        messages = h[src] * self.filter(expanded)
        h = h + torch.zeros_like(h).index_add(0, dst, messages)
        return self.pool(self.atomwise(h), batch)


class SumPool(nn.Module):
    """Sum of atom values per molecule: ``int(batch.max())`` is Python control flow on a tensor's
    value, which torch.fx cannot trace (named in ``leaf_modules``)."""

    def forward(self, values, batch):
        return torch.zeros(int(batch.max()) + 1, values.shape[1], dtype=values.dtype).index_add(0, batch, values)


class RecurrentEncoder(nn.Module):
    """An LSTM or GRU encoder over a sequence, its last step through a sigmoid-gated head."""

    def __init__(self, d_in: int = 6, hidden: int = 12, cell: type = nn.LSTM):
        super().__init__()
        self.inp = nn.Linear(d_in, 8)
        self.rnn = cell(8, hidden, batch_first=True)
        self.value = nn.Linear(hidden, 10)
        self.gate = nn.Linear(hidden, 10)
        self.out = nn.Linear(10, 2)

    def forward(self, x):  # (N, L, d_in)
        h, _ = self.rnn(torch.tanh(self.inp(x)))
        last = h[:, -1]
        return self.out(self.value(last) * torch.sigmoid(self.gate(last)))


class WaveNetBlock(nn.Module):
    """Dilated causal conv (left ``F.pad``), gated ``tanh * sigmoid``, residual and skip 1x1 convs."""

    def __init__(self, channels: int, dilation: int, kernel: int = 2, skip: int = 10):
        super().__init__()
        self.pad = dilation * (kernel - 1)
        self.filt = nn.Conv1d(channels, channels, kernel, dilation=dilation)
        self.gate = nn.Conv1d(channels, channels, kernel, dilation=dilation)
        self.res = nn.Conv1d(channels, channels, 1)
        self.skip = nn.Conv1d(channels, skip, 1)

    def forward(self, x):
        padded = F.pad(x, (self.pad, 0))
        z = torch.tanh(self.filt(padded)) * torch.sigmoid(self.gate(padded))
        return x + self.res(z), self.skip(z)


class WaveNet(nn.Module):
    def __init__(self, d_in: int = 2, channels: int = 8):
        super().__init__()
        self.inp = nn.Conv1d(d_in, channels, 1)
        self.blocks = nn.ModuleList(WaveNetBlock(channels, d) for d in (1, 2, 4))
        self.out = nn.Sequential(nn.ReLU(), nn.Conv1d(10, 10, 1), nn.ReLU(), nn.Conv1d(10, 3, 1))

    def forward(self, x):  # (N, d_in, L)
        h = self.inp(x)
        skips = 0
        for block in self.blocks:
            h, s = block(h)
            skips = skips + s
        return self.out(skips)


class CosmoFlow3d(nn.Module):
    """CosmoFlow (Mathuriya et al., 2018): Conv3d + LeakyReLU + AvgPool3d stages, flatten, FC with dropout."""

    def __init__(self, size: int = 8):
        super().__init__()
        self.convs = nn.Sequential(
            nn.Conv3d(1, 6, 3, padding=1), nn.LeakyReLU(0.2), nn.AvgPool3d(2),
            nn.Conv3d(6, 8, 3, padding=1), nn.LeakyReLU(0.2), nn.AvgPool3d(2))
        self.fc = nn.Sequential(nn.Flatten(), nn.Linear(8 * (size // 4) ** 3, 20), nn.LeakyReLU(0.2),
                                nn.Dropout(0.2), nn.Linear(20, 10), nn.LeakyReLU(0.2), nn.Linear(10, 4))

    def forward(self, x):
        return self.fc(self.convs(x))


class SDPAttention(nn.Module):
    """Self-attention with a fused qkv projection, ``unbind``, ``F.scaled_dot_product_attention``."""

    def __init__(self, d: int = 16, heads: int = 4):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)

    def forward(self, x):
        n, l, d = x.shape
        q, k, v = self.qkv(x).view(n, l, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4).unbind(0)
        h = F.scaled_dot_product_attention(q, k, v)
        return self.proj(h.transpose(1, 2).reshape(n, l, d))


class EinsumAttention(nn.Module):
    """Single-head attention written with ``einsum`` and a softmax, scaled by ``x.shape[-1]``."""

    def __init__(self, d: int = 16, dk: int = 8):
        super().__init__()
        self.q, self.k, self.v = nn.Linear(d, dk), nn.Linear(d, dk), nn.Linear(d, d)

    def forward(self, x):
        q, k = self.q(x), self.k(x)
        scores = torch.einsum("bld,bmd->blm", q, k) / math.sqrt(q.shape[-1])
        return torch.einsum("blm,bmd->bld", scores.softmax(-1), self.v(x))


class AttentionNet(nn.Module):
    def __init__(self, d_in: int = 5, d: int = 16):
        super().__init__()
        self.embed = nn.Linear(d_in, d)
        self.sdpa = SDPAttention(d)
        self.einsum = EinsumAttention(d)
        self.norm = nn.LayerNorm(d)
        self.ff = nn.Sequential(nn.Linear(d, 24), nn.GELU(), nn.Linear(24, d))
        self.head = nn.Linear(d, 1)

    def forward(self, x):
        h = self.embed(x)
        h = h + self.sdpa(h)
        h = h + self.einsum(h)
        h = h + self.ff(self.norm(h))
        return self.head(h).squeeze(-1)


# -- idioms --------------------------------------------------------------------------------------
class WhereResidual(nn.Module):
    """``torch.where`` picks, per element, the block's output or the skip."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(6, 12)
        self.b = nn.Linear(12, 12)
        self.head = nn.Linear(12, 2)

    def forward(self, x):
        h = torch.relu(self.a(x))
        f = self.b(h)
        return self.head(torch.where(f > 0, f, h))


class StackUnbind(nn.Module):
    """Three branches stacked on a new dim, summed, and unbound again."""

    def __init__(self):
        super().__init__()
        self.branches = nn.ModuleList(nn.Linear(6, 10) for _ in range(3))
        self.head = nn.Linear(10, 2)

    def forward(self, x):
        stacked = torch.stack([torch.relu(b(x)) for b in self.branches], dim=1)  # (N, 3, 10)
        a, b, c = stacked.unbind(1)
        return self.head(a * b + c + stacked.mean(1))


class StackChannelsLast(nn.Module):
    """``torch.stack`` on the last dim (after the channels), then a flatten merging both."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(6, 8)
        self.b = nn.Linear(6, 8)
        self.head = nn.Linear(16, 2)

    def forward(self, x):
        h = torch.stack([torch.relu(self.a(x)), torch.tanh(self.b(x))], dim=-1)  # (N, 8, 2)
        return self.head(h.flatten(1))


class SliceChannels(nn.Module):
    """``h[:, :3]`` and ``h[:, 3:]`` of a layer's output go to different heads; the input sliced too."""

    def __init__(self):
        super().__init__()
        self.body = nn.Linear(5, 10)
        self.mean = nn.Linear(3, 1)
        self.rest = nn.Linear(7, 2)

    def forward(self, x):
        h = torch.relu(self.body(x))
        return self.mean(h[:, :3]) + self.rest(h[:, 3:]).sum(-1, keepdim=True) + x[:, :1]


class PadConv(nn.Module):
    """``F.pad`` on the spatial dims (reflect) and on the channel dim (zeros)."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 6, 3)
        self.c2 = nn.Conv2d(8, 4, 3)
        self.head = nn.Conv2d(4, 2, 1)

    def forward(self, x):
        h = torch.relu(self.c1(F.pad(x, (1, 1, 1, 1), mode="reflect")))
        h = F.pad(h, (1, 1, 1, 1, 1, 1))  # one zero channel either side
        return self.head(torch.relu(self.c2(h)))


class PositionalEncoding(nn.Module):
    """A sinusoidal positional-encoding buffer added to token embeddings (``pe[:, :L]``)."""

    def __init__(self, d: int = 12, max_len: int = 64):
        super().__init__()
        pos = torch.arange(max_len).unsqueeze(1)
        div = torch.exp(torch.arange(0, d, 2) * (-math.log(10000.0) / d))
        pe = torch.zeros(1, max_len, d)
        pe[0, :, 0::2] = torch.sin(pos * div)
        pe[0, :, 1::2] = torch.cos(pos * div)
        self.register_buffer("pe", pe)
        self.embed = nn.Linear(4, d)
        self.ff = nn.Sequential(nn.Linear(d, 20), nn.ReLU(), nn.Linear(20, d))
        self.head = nn.Linear(d, 1)

    def forward(self, x):  # (N, L, 4)
        h = self.embed(x) + self.pe[:, :x.size(1)]
        return self.head(h + self.ff(h))


class Parametrized(nn.Module):
    """``weight_norm`` and ``spectral_norm`` parametrizations (torch.nn.utils.parametrizations)."""

    def __init__(self):
        super().__init__()
        self.a = parametrizations.weight_norm(nn.Linear(6, 14))
        self.b = parametrizations.spectral_norm(nn.Linear(14, 10))
        self.c = parametrizations.weight_norm(nn.Conv1d(10, 6, 1))
        self.head = nn.Linear(6, 1)

    def forward(self, x):
        h = torch.relu(self.b(torch.relu(self.a(x))))
        h = torch.relu(self.c(h.unsqueeze(-1))).squeeze(-1)
        return self.head(h)


class ModuleListLoop(nn.Module):
    """A residual stack in an ``nn.ModuleList`` loop, and ``nn.Identity`` skips."""

    def __init__(self, d: int = 10, depth: int = 3):
        super().__init__()
        self.inp = nn.Linear(5, d)
        self.layers = nn.ModuleList(nn.Sequential(nn.Linear(d, 16), nn.SiLU(), nn.Linear(16, d)) for _ in range(depth))
        self.skips = nn.ModuleList(nn.Identity() for _ in range(depth))
        self.head = nn.Linear(d, 1)

    def forward(self, x):
        h = self.inp(x)
        for layer, skip in zip(self.layers, self.skips):
            h = skip(h) + layer(h)
        return self.head(h)


class EmbeddingModel(nn.Module):
    """Continuous features plus an ``nn.Embedding`` of integer categories (second input)."""

    def __init__(self, categories: int = 7):
        super().__init__()
        self.embed = nn.Embedding(categories, 6)
        self.num = nn.Linear(4, 6)
        self.mlp = nn.Sequential(nn.Linear(12, 16), nn.ReLU(), nn.Linear(16, 1))

    def forward(self, x, category):
        return self.mlp(torch.cat([self.num(x), self.embed(category)], dim=-1))


class DictOutput(nn.Module):
    """A dict of outputs (two heads), the first one a tuple."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(6, 14), nn.ReLU(), nn.Linear(14, 10), nn.ReLU())
        self.mu = nn.Linear(10, 2)
        self.logvar = nn.Linear(10, 2)

    def forward(self, x):
        h = self.body(x)
        return {"gaussian": (self.mu(h), self.logvar(h).exp()), "features": h[:, :2]}


class TwoInputs(nn.Module):
    """Two float inputs of different widths (a field and its conditioning parameters), FiLM-style."""

    def __init__(self):
        super().__init__()
        self.field = nn.Linear(6, 12)
        self.film = nn.Linear(3, 24)
        self.head = nn.Linear(12, 1)

    def forward(self, x, params):
        scale, shift = self.film(params).chunk(2, dim=-1)
        return self.head(torch.relu(self.field(x) * (1 + scale) + shift))


class SequentialDict(nn.Module):
    """``nn.Sequential(OrderedDict(...))`` with a dropout that stays in train mode."""

    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(OrderedDict([
            ("fc1", nn.Linear(6, 16)), ("act1", nn.Tanh()), ("drop", nn.Dropout(0.5)),
            ("fc2", nn.Linear(16, 12)), ("act2", nn.Tanh()), ("fc3", nn.Linear(12, 2))]))

    def forward(self, x):
        return self.net(x)


class ReusedLinear(nn.Module):
    """One ``nn.Linear`` called twice (the same weights), and a layer around it."""

    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(6, 10)
        self.shared = nn.Linear(10, 10)
        self.head = nn.Linear(10, 1)

    def forward(self, x):
        h = torch.relu(self.inp(x))
        h = torch.relu(self.shared(h))
        return self.head(torch.relu(self.shared(h)))


class UpsampleDecoder(nn.Module):
    """``F.interpolate(scale_factor=2)``, ``nn.PixelShuffle`` and ``AdaptiveAvgPool2d((2, 2))`` + flatten."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 3, padding=1)
        self.c2 = nn.Conv2d(8, 16, 3, padding=1)
        self.shuffle = nn.PixelShuffle(2)
        self.c3 = nn.Conv2d(4, 6, 3, padding=1)
        self.pool = nn.AdaptiveAvgPool2d((2, 2))
        self.head = nn.Linear(6 * 4, 3)

    def forward(self, x):
        h = torch.relu(self.c1(x))
        h = F.interpolate(h, scale_factor=2, mode="bilinear", align_corners=False)
        h = self.shuffle(torch.relu(self.c2(h)))
        h = torch.relu(self.c3(h))
        return self.head(self.pool(h).flatten(1))


class NormZoo(nn.Module):
    """GroupNorm with several groups, InstanceNorm (affine or not, with running statistics or not),
    ``nn.Identity`` skips."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 12, 3, padding=1)
        self.gn = nn.GroupNorm(4, 12)
        self.c2 = nn.Conv2d(12, 8, 3, padding=1)
        self.inorm = nn.InstanceNorm2d(8, affine=True)
        self.c3 = nn.Conv2d(8, 8, 3, padding=1)
        self.inorm_plain = nn.InstanceNorm2d(8)
        self.c4 = nn.Conv2d(8, 6, 1)
        self.inorm_stats = nn.InstanceNorm2d(6, affine=True, track_running_stats=True)
        self.skip = nn.Identity()
        self.head = nn.Conv2d(6, 2, 1)

    def forward(self, x):
        h = torch.relu(self.gn(self.c1(x)))
        h = torch.relu(self.inorm(self.c2(h)))
        h = self.skip(h) + torch.relu(self.inorm_plain(self.c3(h)))
        return self.head(torch.tanh(self.inorm_stats(self.c4(h))))


class CatSequence(nn.Module):
    """``torch.cat`` on the sequence dim (a learned token prepended) and on the batch dim."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Linear(5, 12)
        self.token = nn.Parameter(torch.randn(1, 1, 12))
        self.ff = nn.Sequential(nn.Linear(12, 16), nn.ReLU(), nn.Linear(16, 12))
        self.head = nn.Linear(12, 2)

    def forward(self, x):  # (N, L, 5)
        h = self.embed(x)
        h = torch.cat([self.token.expand(h.shape[0], -1, -1), h], dim=1)
        h = h + self.ff(h)
        both = torch.cat([h, -h], dim=0)
        return self.head(both[: x.shape[0], 0] + both[x.shape[0]:, 0])


class PlainMLP(nn.Module):
    """A small MLP for dtype cases (float64, bfloat16)."""

    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(6, 16), nn.GELU(), nn.Linear(16, 12), nn.LayerNorm(12),
                                 nn.Linear(12, 12), nn.SiLU(), nn.Linear(12, 2))

    def forward(self, x):
        return self.net(x)


class ConvOdd(nn.Module):
    """Strided, padded convs and a transposed conv on an odd spatial size (batch size 1 example)."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(2, 8, 3, stride=2, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.c2 = nn.Conv2d(8, 8, 3, padding=2, dilation=2, padding_mode="circular")
        self.up = nn.ConvTranspose2d(8, 6, 3, stride=2, padding=1)
        self.head = nn.Conv2d(6, 1, 1)

    def forward(self, x):
        h = torch.relu(self.bn(self.c1(x)))
        h = torch.relu(self.c2(h))
        return self.head(torch.relu(self.up(h)))


# -- models that broke compaction (regression tests) ---------------------------------------------------
class NormChain(nn.Module):
    """LayerNorm then RMSNorm between linear layers: with every input of a norm closed, the norm
    sees only constants (once an ``rsqrt`` of a Python float)."""

    def __init__(self):
        super().__init__()
        self.a, self.ln, self.b = nn.Linear(6, 12), nn.LayerNorm(12), nn.Linear(12, 12)
        self.rms, self.head = nn.RMSNorm(12), nn.Linear(12, 2)

    def forward(self, x):
        return self.head(self.rms(self.b(self.ln(self.a(x)))))


class ChannelGroupNorm(nn.Module):
    """GroupNorm with one channel per group (an instance norm with affine parameters) after a
    pruned conv: a closed channel's constant went through ``F.group_norm`` of a single value."""

    def __init__(self):
        super().__init__()
        self.c1, self.gn, self.c2 = nn.Conv2d(3, 6, 3, padding=1), nn.GroupNorm(6, 6), nn.Conv2d(6, 2, 1)

    def forward(self, x):
        return self.c2(torch.relu(self.gn(self.c1(x))))


class ReciprocalNorm(nn.Module):
    """A number divided by a LayerNorm's output: ``2 / (y + 5)`` is no affine function of the row
    statistics, though ``y + 5`` is (once a crash in the builder)."""

    def __init__(self):
        super().__init__()
        self.a, self.ln, self.head = nn.Linear(6, 10), nn.LayerNorm(10), nn.Linear(10, 2)

    def forward(self, x):
        return self.head(2.0 / (self.ln(self.a(x)) + 5.0))


class AttentionWeightsUsed(nn.Module):
    """``nn.MultiheadAttention`` called with its default ``need_weights=True``, the weights used."""

    def __init__(self):
        super().__init__()
        self.inp, self.attn, self.head = nn.Linear(5, 8), nn.MultiheadAttention(8, 2, batch_first=True), nn.Linear(8, 1)

    def forward(self, x):
        h = self.inp(x)
        a, w = self.attn(h, h, h)
        return self.head(a) + w.mean(-1, keepdim=True)


class AttentionBiasKV(nn.Module):
    """Self-attention with ``add_bias_kv`` and ``add_zero_attn`` (lumos gates no such layer),
    followed by a feed-forward block it does gate."""

    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(5, 12)
        self.attn = nn.MultiheadAttention(12, 3, batch_first=True, add_bias_kv=True, add_zero_attn=True)
        self.ff = nn.Sequential(nn.Linear(12, 16), nn.ReLU(), nn.Linear(16, 12))
        self.head = nn.Linear(12, 1)

    def forward(self, x):
        h = self.inp(x)
        h = h + self.attn(h, h, h, need_weights=False)[0]
        return self.head(h + self.ff(h))


class MonteCarloDropout(nn.Module):
    """Dropout kept on in eval (``training=True``), as Monte Carlo dropout does: random in eval."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(6, 12), nn.Linear(12, 2)

    def forward(self, x):
        return self.b(F.dropout(torch.sigmoid(self.a(x)), 0.2, training=True))


class TokenSequence(nn.Module):
    """Float features and integer tokens of the same sequence (the probe resizes both)."""

    def __init__(self):
        super().__init__()
        self.emb, self.inp = nn.Embedding(11, 8), nn.Linear(3, 8)
        self.ff = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 8))
        self.head = nn.Linear(8, 1)

    def forward(self, x, tokens):
        h = self.inp(x) + self.emb(tokens)
        h = h + self.ff(h)
        return self.head(h.mean(1))


class FullyConvolutional(nn.Module):
    """A residual 1-D CNN that takes any length (gated with ``features=False``: no feature dim)."""

    def __init__(self):
        super().__init__()
        self.c1, self.c2, self.head = nn.Conv1d(3, 10, 3, padding=1), nn.Conv1d(10, 10, 3, padding=1), nn.Conv1d(10, 1, 1)

    def forward(self, x):
        h = torch.relu(self.c1(x))
        return self.head(h + torch.relu(self.c2(h)))


def gate_everything(model: nn.Module, example_inputs: tuple, feature_dim: int = -1, features: bool = True,
                    leaf_modules=()) -> nn.Module:
    """A :class:`lumos.GatedModel` with every layer lumos can gate gated, whatever :func:`lumos.gate`
    would choose (the output layer, layers feeding ops kept whole, layers called twice): compaction
    must then keep what the plan needs by itself."""
    import copy

    from lumos.convert import GATED_LAYERS
    from lumos.model import GatedModel
    from lumos.nn import FeatureGate

    copied = copy.deepcopy(model)
    for name, module in list(copied.named_modules()):
        if name and type(module) in GATED_LAYERS:
            parent_name, _, leaf = name.rpartition(".")
            parent = copied.get_submodule(parent_name) if parent_name else copied
            try:
                setattr(parent, leaf, GATED_LAYERS[type(module)](module))
            except ValueError:  # a configuration the gated twin does not take (add_bias_kv...)
                pass
    gate = FeatureGate(example_inputs[0].shape[feature_dim], dim=feature_dim) if features else None
    return GatedModel(copied, gate, feature_dim, example_inputs, {}, tuple(leaf_modules))


# -- the registry ----------------------------------------------------------------------------------
def _seq(n, l, d, seed=0):
    return (_randn(n, l, d, seed=seed),)


def _molecules(seed: int = 0, graphs: int = 3, atoms: int = 5):
    g = _g(seed)
    sizes = torch.randint(3, atoms + 1, (graphs,), generator=g)
    n = int(sizes.sum())
    batch = torch.repeat_interleave(torch.arange(graphs), sizes)
    edges, start = [], 0
    for size in sizes.tolist():
        for i in range(size):
            for j in range(size):
                if i != j:
                    edges.append((start + i, start + j))
        start += size
    edge_index = torch.tensor(edges).t().contiguous()
    return torch.randn(n, 5, generator=g), torch.randn(n, 3, generator=g), edge_index, batch


def _embedding_inputs(n, seed=0):
    return _randn(n, 4, seed=seed), torch.randint(0, 7, (n,), generator=_g(seed + 1))


def _cases() -> dict[str, Callable[[], Case]]:
    return {
        "fno2d": lambda: Case(FNO2d(), (_randn(4, 3, 12, 12),), [(_randn(2, 3, 16, 10, seed=1),)],
                              {"feature_dim": 1, "leaf_modules": [SpectralConv2d]}),
        "fourier_1d": lambda: Case(FourierFeatures(), _seq(4, 16, 4), [_seq(3, 20, 4, 1)]),
        "pointnet": lambda: Case(_look_trained(PointNet()), (_randn(4, 3, 20),), [(_randn(2, 3, 33, seed=1),)],
                                 {"feature_dim": 1}),
        "mlp_mixer": lambda: Case(_look_trained(MLPMixer()), (_randn(4, 1, 16, 16),), [(_randn(1, 1, 16, 16, seed=1),)],
                                  {"feature_dim": 1, "features": False}),
        "glu_ffn": lambda: Case(GLUNet(), (_randn(8, 7),), [(_randn(1, 7, seed=1),)]),
        "schnet": lambda: Case(SchNetLike(), _molecules(0), [_molecules(1, graphs=2, atoms=6)],
                               {"leaf_modules": [SumPool]}),
        "lstm_head": lambda: Case(RecurrentEncoder(cell=nn.LSTM), _seq(4, 7, 6), [_seq(2, 11, 6, 1)]),
        "gru_head": lambda: Case(RecurrentEncoder(cell=nn.GRU), _seq(4, 7, 6), [_seq(1, 3, 6, 1)]),
        "wavenet": lambda: Case(WaveNet(), (_randn(4, 2, 30),), [(_randn(2, 2, 17, seed=1),)], {"feature_dim": 1}),
        "cosmoflow3d": lambda: Case(CosmoFlow3d(), (_randn(2, 1, 8, 8, 8),), [(_randn(3, 1, 8, 8, 8, seed=1),)],
                                    {"features": False}),
        "attention": lambda: Case(_look_trained(AttentionNet()), _seq(4, 6, 5), [_seq(2, 9, 5, 1), _seq(1, 1, 5, 2)]),
        "where_residual": lambda: Case(WhereResidual(), (_randn(8, 6),), [(_randn(3, 6, seed=1),)]),
        "stack_unbind": lambda: Case(StackUnbind(), (_randn(8, 6),), [(_randn(3, 6, seed=1),)]),
        "stack_last": lambda: Case(StackChannelsLast(), (_randn(8, 6),), [(_randn(3, 6, seed=1),)]),
        "slice_channels": lambda: Case(SliceChannels(), (_randn(8, 5),), [(_randn(3, 5, seed=1),)]),
        "pad_conv": lambda: Case(PadConv(), (_randn(2, 3, 9, 9),), [(_randn(3, 3, 12, 7, seed=1),)],
                                 {"feature_dim": 1}),
        "positional": lambda: Case(PositionalEncoding(), _seq(4, 10, 4), [_seq(2, 23, 4, 1)]),
        "parametrized": lambda: Case(Parametrized().eval(), (_randn(8, 6),), [(_randn(3, 6, seed=1),)]),
        "modulelist_loop": lambda: Case(ModuleListLoop(), (_randn(8, 5),), [(_randn(1, 5, seed=1),)]),
        "embedding": lambda: Case(EmbeddingModel(), _embedding_inputs(8), [_embedding_inputs(3, 5)]),
        "dict_output": lambda: Case(DictOutput(), (_randn(8, 6),), [(_randn(2, 6, seed=1),)]),
        "two_inputs": lambda: Case(TwoInputs(), (_randn(8, 6), _randn(8, 3, seed=1)),
                                   [(_randn(3, 6, seed=2), _randn(3, 3, seed=3))]),
        "sequential_dict": lambda: Case(SequentialDict(), (_randn(8, 6),), [(_randn(3, 6, seed=1),)]),
        "reused_linear": lambda: Case(ReusedLinear(), (_randn(8, 6),), [(_randn(3, 6, seed=1),)]),
        "upsample_decoder": lambda: Case(UpsampleDecoder(), (_randn(2, 3, 8, 8),), [(_randn(3, 3, 8, 8, seed=1),)],
                                         {"feature_dim": 1}),
        "norm_zoo": lambda: Case(_look_trained(NormZoo()), (_randn(2, 3, 7, 9),), [(_randn(3, 3, 10, 6, seed=1),)],
                                 {"feature_dim": 1}),
        "cat_sequence": lambda: Case(CatSequence(), _seq(4, 5, 5), [_seq(2, 8, 5, 1)]),
        "float64": lambda: Case(_look_trained(PlainMLP()).double(), (_randn(8, 6, dtype=torch.float64),),
                                [(_randn(3, 6, seed=1, dtype=torch.float64),)]),
        "bfloat16": lambda: Case(_look_trained(PlainMLP()).to(torch.bfloat16), (_randn(8, 6, dtype=torch.bfloat16),),
                                 [(_randn(3, 6, seed=1, dtype=torch.bfloat16),)]),
        "batch_one_odd": lambda: Case(_look_trained(ConvOdd()), (_randn(1, 2, 11, 13),), [(_randn(2, 2, 7, 9, seed=1),)],
                                      {"feature_dim": 1}),
        "norm_chain": lambda: Case(_look_trained(NormChain()), (_randn(8, 6),), [(_randn(3, 6, seed=1),)]),
        "channel_group_norm": lambda: Case(_look_trained(ChannelGroupNorm()), (_randn(2, 3, 6, 6),),
                                           [(_randn(3, 3, 5, 9, seed=1),)], {"feature_dim": 1}),
        "reciprocal_norm": lambda: Case(_look_trained(ReciprocalNorm()), (_randn(8, 6),), [(_randn(3, 6, seed=1),)]),
        "attention_weights": lambda: Case(AttentionWeightsUsed(), _seq(3, 5, 5), [_seq(2, 7, 5, 1)],
                                          all_closed_refusal="every value dimension of it is closed"),
        "attention_bias_kv": lambda: Case(AttentionBiasKV(), _seq(3, 5, 5), [_seq(2, 7, 5, 1)]),
        "tokens": lambda: Case(TokenSequence(), (_randn(4, 5, 3), torch.randint(0, 11, (4, 5), generator=_g(1))),
                               [(_randn(2, 9, 3, seed=2), torch.randint(0, 11, (2, 9), generator=_g(3)))]),
        "fully_convolutional": lambda: Case(FullyConvolutional(), (_randn(2, 3, 10),), [(_randn(3, 3, 7, seed=1),)],
                                            {"features": False}),
    }


CASES = _cases()


# -- random architectures (fuzzing) ------------------------------------------------------------------
ACTIVATIONS = ("relu", "gelu", "tanh", "sigmoid", "silu", "softplus", "identity")


def _activation(name: str, x: torch.Tensor) -> torch.Tensor:
    return x if name == "identity" else getattr(torch, name)(x) if name in ("tanh", "sigmoid") else getattr(F, name)(x)


class RandomNet(nn.Module):
    """A model that runs ``program``: a list of ``(op, args)`` steps, each appending one tensor to
    a list that starts with the input; the outputs are the tensors at ``outputs``. torch.fx
    traces through the Python loop, so the traced graph is the ops themselves."""

    def __init__(self, program: list, layers: dict, outputs: list, params: dict | None = None):
        super().__init__()
        self.program, self.outputs = program, outputs
        self.layers = nn.ModuleDict(layers)
        self.params = nn.ParameterDict(params or {})

    def forward(self, x):
        t = [x]
        for op, a in self.program:
            t.append(self._step(op, a, t))
        return tuple(t[i] for i in self.outputs) if len(self.outputs) > 1 else t[self.outputs[0]]

    def _step(self, op, a, t):
        if op == "layer":
            return self.layers[a[1]](t[a[0]])
        if op == "act":
            return _activation(a[1], t[a[0]])
        if op == "binary":
            x, y = t[a[0]], t[a[1]]
            return {"add": lambda: x + y, "sub": lambda: x - y, "mul": lambda: x * y,
                    "glu": lambda: x * torch.sigmoid(y), "max": lambda: torch.maximum(x, y)}[a[2]]()
        if op == "scalar":
            x = t[a[0]]
            return {"mul": lambda: x * a[2], "add": lambda: x + a[2], "div": lambda: x / a[2], "rdiv": lambda: a[2] / (x * x + 1),
                    "neg": lambda: -x, "pow": lambda: x ** 2}[a[1]]()
        if op == "cat":
            return torch.cat([t[i] for i in a[0]], dim=a[1])
        if op == "chunk":
            return t[a[0]].chunk(a[1], dim=a[3])[a[2]]
        if op == "split":
            return torch.split(t[a[0]], a[1], dim=a[3])[a[2]]
        if op == "narrow":
            return t[a[0]].narrow(a[1], a[2], a[3])
        if op == "slice_last":
            return t[a[0]][..., a[1]:a[2]]
        if op == "slice_1":
            return t[a[0]][:, a[1]:a[2]]
        if op == "permute":
            return t[a[0]].permute(*a[1])
        if op == "transpose":
            return t[a[0]].transpose(a[1], a[2])
        if op == "mean":
            return t[a[0]].mean(a[1])
        if op == "amax":
            return t[a[0]].amax(a[1])
        if op == "pick":  # one position of the sequence: (N, L, C) -> (N, C)
            return t[a[0]][:, a[1]]
        if op == "rows":  # (N, L, C) -> (N * L, C) -> layer -> (N, L, C')
            x = t[a[0]]
            n, length = x.shape[0], x.shape[1]
            return self.layers[a[1]](x.reshape(-1, x.shape[-1])).view(n, length, -1)
        if op == "flat_seq":  # (N, C, H, W) -> (N, H*W, C)
            x = t[a[0]]
            return x.flatten(2).transpose(1, 2)
        if op == "unflat_seq":  # (N, H*W, C) -> (N, C, H, W), the spatial shape of t[a[1]]
            x, like = t[a[0]], t[a[1]]
            return x.transpose(1, 2).reshape(x.shape[0], -1, like.shape[2], like.shape[3])
        if op == "se":  # squeeze-excite gate from another tensor of the same width
            return t[a[0]] * torch.sigmoid(t[a[1]].mean((2, 3), keepdim=True))
        if op == "resample":
            x = t[a[0]]
            down = F.avg_pool2d(x, 2) if a[1] == "avg" else F.max_pool2d(x, 2)
            return F.interpolate(down, size=x.shape[2:], mode="nearest")
        if op == "stack_mean":
            return torch.stack([t[i] for i in a[0]], dim=a[1]).mean(a[1])
        if op == "flatten_head":  # (N, C, H, W) -> global mean -> flatten
            return t[a[0]].mean((2, 3)).flatten(1)
        if op == "param":  # a layer scale (C,) or (C, 1, 1), or a position embedding (L, C)
            x, p = t[a[0]], self.params[a[1]]
            if a[2] == "pos":
                return x + p[: x.shape[1]]
            return x * p if a[2] == "mul" else x + p
        if op == "by_width":  # scaled by the channel count read from the shape
            x = t[a[0]]
            return x * x.shape[a[1]] ** -0.5
        if op == "cat_seq_mean":  # two sequences joined along the sequence, then averaged over it
            return torch.cat([t[a[0]], t[a[1]]], dim=1).mean(1)
        if op == "up_down":  # a strided transposed conv up, an average pool back down
            return F.avg_pool2d(self.layers[a[1]](t[a[0]]), 2)
        if op == "glu":  # GLU over the channel dim
            return F.glu(t[a[0]], dim=a[1])
        if op == "roll":
            return torch.roll(t[a[0]], a[1], dims=a[2])
        if op == "flip":
            return t[a[0]].flip(*a[1])
        if op == "shuffle_up":  # sub-pixel x2 (C -> C/4), pooled back to the same positions
            return F.avg_pool2d(F.pixel_shuffle(t[a[0]], 2), 2)
        if op == "unshuffle_down":  # space-to-depth x2 (C -> 4C), upsampled back
            x = t[a[0]]
            return F.interpolate(self.layers[a[1]](x), size=x.shape[2:], mode="nearest")
        raise ValueError(op)


def _push_channel_op(rng, push, layer, i: int, kind: str, c: int, dim: int) -> None:
    """One of the per-channel ops of ``random_architecture(..., channel_ops=True)`` on tensor ``i``."""
    choice = rng.random()
    if choice < 0.25 and kind in ("img", "vec"):
        prelu = nn.PReLU(c)
        with torch.no_grad():
            prelu.weight.uniform_(-0.5, 0.5)
        push("layer", (i, layer(prelu)), kind, c)
    elif choice < 0.45 and c % 2 == 0:
        push("glu", (i, dim), kind, c // 2)
    elif choice < 0.7 and kind in ("img", "seq"):
        dims = rng.choice([(2,), (2, 3), (1,), (-1,)] if kind == "img" else [(1,), (2,), (1, 2)])
        if rng.random() < 0.5:
            push("roll", (i, tuple(rng.choice([1, -2]) for _ in dims), dims), kind, c)
        else:
            push("flip", (i, dims), kind, c)
    elif kind == "img" and c % 4 == 0 and rng.random() < 0.5:
        push("shuffle_up", (i,), kind, c // 4)
    elif kind == "img":
        push("unshuffle_down", (i, layer(nn.PixelUnshuffle(2))), kind, 4 * c)
    else:
        push("layer", (i, layer(nn.Dropout(0.3))), kind, c)


@dataclass
class _Tensor:
    kind: str  # "vec" (N, C), "seq" (N, L, C), "img" (N, C, H, W)
    channels: int


def _norm_stats(module: nn.Module, rng) -> nn.Module:
    g = torch.Generator().manual_seed(rng.randrange(10**6))
    with torch.no_grad():
        for p in module.parameters():
            p.add_(0.4 * torch.randn(p.shape, generator=g))
        if getattr(module, "running_mean", None) is not None:
            module.running_mean.normal_(generator=g)
            module.running_var.uniform_(0.5, 2.0, generator=g)
    return module.eval()


def random_architecture(seed: int, dtype: torch.dtype = torch.float32, channel_ops: bool = False) -> Case:
    """A random model composing the ops compaction supports (linear, conv, norms, activations,
    residual adds and products, cat, chunk/split, slices, reshapes and permutes, pooling), with
    its example input, an input of another batch (and spatial/sequence) size, and gate kwargs.
    ``dtype=torch.float64`` holds the comparison to 1e-9: small formula errors show.
    ``channel_ops``: in place of some dropout layers, per-channel PReLU, GLU, roll and flip
    (over positions or over the channels) and pixel (un)shuffles (the other seeds' models are
    unchanged)."""
    import random

    rng = random.Random(seed)
    family = rng.choice(["vec", "seq", "img"])
    c0 = rng.randint(2, 6)
    g = _g(seed)
    if family == "img":
        x, other = torch.randn(2, c0, 6, 6, generator=g), torch.randn(3, c0, 8, 10, generator=g)
    elif family == "seq":
        x, other = torch.randn(3, 5, c0, generator=g), torch.randn(2, 9, c0, generator=g)
    else:
        x, other = torch.randn(6, c0, generator=g), torch.randn(3, c0, generator=g)
    tensors, program, layers, params = [_Tensor(family, c0)], [], {}, {}

    def layer(module):
        name = f"l{len(layers)}"
        layers[name] = module
        return name

    def push(op, args, kind, channels):
        program.append((op, args))
        tensors.append(_Tensor(kind, channels))

    for _ in range(rng.randint(4, 16)):
        i = rng.choice([j for j, t in enumerate(tensors) if t.kind in ("vec", "seq", "img")])
        kind, c = tensors[i].kind, tensors[i].channels
        dim = 1 if kind == "img" else -1
        peers = [j for j, t in enumerate(tensors) if t == tensors[i] and j != i]
        same_kind = [j for j, t in enumerate(tensors) if t.kind == kind]
        r = rng.random()
        if r < 0.25:  # a layer that changes the width
            n = rng.randint(1, 12)
            if kind == "img":
                groups = rng.choice([d for d in (1, 2, c) if c % d == 0 and n % d == 0])
                k = rng.choice([1, 3])
                conv = nn.Conv2d(c, n, k, padding=k // 2 if rng.random() < 0.5 else "same", groups=groups,
                                 bias=rng.random() < 0.8, padding_mode=rng.choice(["zeros", "zeros", "reflect", "circular"]))
                push("layer", (i, layer(conv)), kind, n)
            elif kind == "seq" and rng.random() < 0.3:
                push("rows", (i, layer(nn.Linear(c, n))), kind, n)
            else:
                push("layer", (i, layer(nn.Linear(c, n, bias=rng.random() < 0.8))), kind, n)
        elif r < 0.35:  # a norm
            if kind == "img":
                choice = rng.random()
                if choice < 0.35:
                    norm = nn.BatchNorm2d(c)
                elif choice < 0.6:
                    norm = nn.GroupNorm(rng.choice([d for d in range(1, c + 1) if c % d == 0]), c)
                elif choice < 0.8:
                    norm = nn.InstanceNorm2d(c, affine=rng.random() < 0.6, track_running_stats=rng.random() < 0.3)
                else:
                    push("flat_seq", (i,), "seq", c)
                    push("layer", (len(tensors) - 1, layer(_norm_stats(nn.LayerNorm(c), rng))), "seq", c)
                    push("unflat_seq", (len(tensors) - 1, i), "img", c)
                    continue
            else:
                norm = rng.choice([nn.LayerNorm(c, elementwise_affine=rng.random() < 0.7), nn.RMSNorm(c)])
            push("layer", (i, layer(_norm_stats(norm, rng))), kind, c)
        elif r < 0.48:
            push("act", (i, rng.choice(ACTIVATIONS)), kind, c)
        elif r < 0.58 and peers:
            push("binary", (i, rng.choice(peers), rng.choice(["add", "add", "sub", "mul", "glu", "max"])), kind, c)
        elif r < 0.63:
            push("scalar", (i, rng.choice(["mul", "add", "div", "rdiv", "neg", "pow"]), rng.choice([0.5, -2.0, 3.0])),
                 kind, c)
        elif r < 0.69:
            parts = [i] + rng.sample(same_kind, min(len(same_kind), rng.randint(1, 2)))
            push("cat", (parts, dim), kind, sum(tensors[j].channels for j in parts))
        elif r < 0.75 and c >= 2:
            choice = rng.random()
            if choice < 0.3:
                k = rng.choice([2, 3])
                pieces = torch.arange(c).chunk(k)
                idx = rng.randrange(len(pieces))
                push("chunk", (i, k, idx, dim), kind, len(pieces[idx]))
            elif choice < 0.5:
                size = rng.randint(1, c - 1)
                pieces = torch.arange(c).split(size)
                idx = rng.randrange(len(pieces))
                push("split", (i, size, idx, dim), kind, len(pieces[idx]))
            else:
                start = rng.randrange(c - 1)
                stop = rng.randint(start + 1, c)
                op = rng.choice(["narrow", "slice_1" if kind == "img" else "slice_last"])
                args = (i, dim, start, stop - start) if op == "narrow" else (i, start, stop)
                push(op, args, kind, stop - start)
        elif r < 0.85 and kind == "seq":
            choice = rng.random()
            if choice < 0.5:  # a Conv1d (with a BatchNorm) on the transposed sequence
                n = rng.randint(1, 10)
                push("transpose", (i, 1, 2), "seqT", c)
                conv = nn.Conv1d(c, n, rng.choice([1, 3]), padding="same")
                push("layer", (len(tensors) - 1, layer(conv)), "seqT", n)
                if rng.random() < 0.5:
                    push("layer", (len(tensors) - 1, layer(_norm_stats(nn.BatchNorm1d(n), rng))), "seqT", n)
                push("transpose", (len(tensors) - 1, 1, 2), "seq", n)
            elif choice < 0.8 and peers:
                push("stack_mean", ([i] + peers[:1], rng.choice([0, 1, 2])), kind, c)
            else:
                push(rng.choice(["mean", "amax"]), (i, 1), "vec", c) if rng.random() < 0.5 else push("pick", (i, 0), "vec", c)
        elif r < 0.85 and kind == "img":
            choice = rng.random()
            if choice < 0.35 and peers:
                push("se", (i, rng.choice(peers)), kind, c)
            elif choice < 0.7:
                push("resample", (i, rng.choice(["avg", "max"])), kind, c)
            else:  # channels-last LayerNorm + Linear, back
                push("permute", (i, (0, 2, 3, 1)), "imgL", c)
                push("layer", (len(tensors) - 1, layer(_norm_stats(nn.LayerNorm(c), rng))), "imgL", c)
                n = rng.randint(1, 10)
                push("layer", (len(tensors) - 1, layer(nn.Linear(c, n))), "imgL", n)
                push("permute", (len(tensors) - 1, (0, 3, 1, 2)), kind, n)
        elif r < 0.9:
            choice = rng.random()
            if choice < 0.4:
                name = f"p{len(params)}"
                position = kind == "seq" and rng.random() < 0.5
                shape = (c, 1, 1) if kind == "img" else (16, c) if position else (c,)
                params[name] = nn.Parameter(torch.randn(shape, generator=g))
                push("param", (i, name, "pos" if position else rng.choice(["mul", "add"])), kind, c)
            elif choice < 0.6:
                push("by_width", (i, dim), kind, c)
            elif choice < 0.8 and kind == "seq" and peers:
                push("cat_seq_mean", (i, rng.choice(peers)), "vec", c)
            elif kind == "img":
                n = rng.randint(1, 8)
                up = nn.ConvTranspose2d(c, n, rng.choice([2, 4]), stride=2, padding=0)
                if up.kernel_size[0] == 4:
                    up.padding = (1, 1)
                push("up_down", (i, layer(up)), kind, n)
            else:
                push("layer", (i, layer(nn.Dropout(0.3))), kind, c)
        elif channel_ops:
            _push_channel_op(rng, push, layer, i, kind, c, dim)
        else:
            push("layer", (i, layer(nn.Dropout(0.3))), kind, c)
    finals = [j for j, t in enumerate(tensors) if t.kind in ("vec", "seq", "img")]
    last = finals[-1]
    if tensors[last].kind == "img" and rng.random() < 0.6:
        push("flatten_head", (last,), "vec", tensors[last].channels)
        last = len(tensors) - 1
    if tensors[last].kind == "img":
        push("layer", (last, layer(nn.Conv2d(tensors[last].channels, 2, 1))), "img", 2)
    else:
        push("layer", (last, layer(nn.Linear(tensors[last].channels, 2))), tensors[last].kind, 2)
    outputs = [len(tensors) - 1]
    if rng.random() < 0.3 and len(finals) > 1:
        outputs.append(rng.choice(finals[:-1]))
    model = RandomNet(program, layers, outputs, params).eval().to(dtype)
    gate_kwargs = {"feature_dim": 1 if family == "img" else -1, "features": rng.random() < 0.7}
    return Case(model, (x.to(dtype),), [(other.to(dtype),)], gate_kwargs)
