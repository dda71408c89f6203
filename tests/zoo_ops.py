"""Small models built around one channel-linking op each (written for the compaction op tests,
from the blocks' descriptions: ResNet, MobileNetV2, ShuffleNetV2, squeeze-excite, ConvNeXt,
post-norm Transformer, a hybrid CNN-transformer's fold of tokens back into an image). Each
``OPS`` entry: ``(factory, example input, other input)`` where the other input has another
batch size and, where the model allows it, another spatial size."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class ReusedReLUBlock(nn.Module):
    """ResNet basic block with one ``nn.ReLU`` module called three times and a downsample branch."""

    def __init__(self, c_in=6, c=12):
        super().__init__()
        self.stem = nn.Conv2d(3, c_in, 3, padding=1)
        self.conv1 = nn.Conv2d(c_in, c, 3, stride=2, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c)
        self.conv2 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c)
        self.downsample = nn.Sequential(nn.Conv2d(c_in, c, 1, stride=2, bias=False), nn.BatchNorm2d(c))
        self.relu = nn.ReLU(inplace=True)
        self.head = nn.Conv2d(c, 2, 1)

    def forward(self, x):
        x = self.relu(self.stem(x))
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.head(self.relu(out + self.downsample(x)))


class InvertedResidual(nn.Module):
    """MobileNetV2 block: 1x1 expand, 3x3 depthwise, 1x1 linear projection, residual."""

    def __init__(self, c=8, expand=4):
        super().__init__()
        hidden = c * expand
        self.stem = nn.Conv2d(3, c, 3, padding=1)
        self.expand = nn.Sequential(nn.Conv2d(c, hidden, 1, bias=False), nn.BatchNorm2d(hidden), nn.ReLU6(inplace=True))
        self.depthwise = nn.Sequential(nn.Conv2d(hidden, hidden, 3, padding=1, groups=hidden, bias=False),
                                       nn.BatchNorm2d(hidden), nn.ReLU6(inplace=True))
        self.project = nn.Sequential(nn.Conv2d(hidden, c, 1, bias=False), nn.BatchNorm2d(c))
        self.head = nn.Conv2d(c, 2, 1)

    def forward(self, x):
        x = self.stem(x)
        return self.head(x + self.project(self.depthwise(self.expand(x))))


class GroupedConvs(nn.Module):
    """A grouped conv (4 groups), a depthwise conv with channel multiplier 2 and a grouped
    transposed conv."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1)
        self.grouped = nn.Conv2d(16, 16, 3, padding=1, groups=4)
        self.multiplier = nn.Conv2d(16, 32, 3, padding=1, groups=16)
        self.up = nn.ConvTranspose2d(32, 8, 2, stride=2, groups=4)
        self.head = nn.Conv2d(8, 2, 1)

    def forward(self, x):
        h = F.silu(self.stem(x))
        h = F.silu(self.grouped(h))
        h = F.silu(self.multiplier(h))
        return self.head(torch.tanh(self.up(h)))


class SqueezeExcite(nn.Module):
    """MBConv-like: conv, squeeze-excite (global mean, two 1x1 convs, sigmoid, channel multiply
    ``x * s``), a second SE spelled with linear layers and ``s[:, :, None, None]``."""

    def __init__(self, c=12, r=4):
        super().__init__()
        self.conv = nn.Conv2d(3, c, 3, padding=1)
        self.se_reduce, self.se_expand = nn.Conv2d(c, c // r, 1), nn.Conv2d(c // r, c, 1)
        self.conv2 = nn.Conv2d(c, c, 3, padding=1)
        self.fc1, self.fc2 = nn.Linear(c, c // r), nn.Linear(c // r, c)
        self.head = nn.Conv2d(c, 2, 1)

    def forward(self, x):
        h = F.silu(self.conv(x))
        s = torch.sigmoid(self.se_expand(F.silu(self.se_reduce(F.adaptive_avg_pool2d(h, 1)))))
        h = F.silu(self.conv2(h * s))
        s = torch.sigmoid(self.fc2(F.relu(self.fc1(h.mean((2, 3))))))
        return self.head(h * s[:, :, None, None])


class ChunkShuffle(nn.Module):
    """ShuffleNetV2 unit: split the channels in two, a branch on one half, concatenate, shuffle
    (``view`` / ``transpose`` / ``view`` with ``x.size()``); then a ``split`` into unequal parts."""

    def __init__(self, c=16):
        super().__init__()
        self.stem = nn.Conv2d(3, c, 3, padding=1)
        half = c // 2
        self.branch = nn.Sequential(nn.Conv2d(half, half, 1), nn.ReLU(), nn.Conv2d(half, half, 3, padding=1,
                                                                                   groups=half),
                                    nn.Conv2d(half, half, 1), nn.ReLU())
        self.a, self.b = nn.Conv2d(5, 4, 1), nn.Conv2d(c - 5, 4, 1)
        self.head = nn.Conv2d(8, 2, 1)

    @staticmethod
    def shuffle(x, groups=2):
        n, c, h, w = x.size()
        x = x.view(n, groups, c // groups, h, w).transpose(1, 2).contiguous()
        return x.view(n, -1, h, w)

    def forward(self, x):
        x = F.relu(self.stem(x))
        left, right = x.chunk(2, dim=1)
        x = self.shuffle(torch.cat([left, self.branch(right)], dim=1))
        first, rest = torch.split(x, [5, x.shape[1] - 5], dim=1)
        return self.head(torch.cat([self.a(first), self.b(rest)], 1))


class ConvNeXtBlock(nn.Module):
    """ConvNeXt block: 7x7 depthwise conv, permute to channels-last, LayerNorm, Linear 4x, GELU,
    Linear, layer scale ``gamma``, permute back, residual."""

    def __init__(self, c=8):
        super().__init__()
        self.stem = nn.Conv2d(3, c, 4, stride=4)
        self.dwconv = nn.Conv2d(c, c, 7, padding=3, groups=c)
        self.norm = nn.LayerNorm(c, eps=1e-6)
        self.pwconv1, self.pwconv2 = nn.Linear(c, 4 * c), nn.Linear(4 * c, c)
        self.gamma = nn.Parameter(0.5 + torch.rand(c))
        self.head = nn.Linear(c, 3)

    def forward(self, x):
        x = self.stem(x)
        h = self.dwconv(x).permute(0, 2, 3, 1)
        h = self.pwconv2(F.gelu(self.pwconv1(self.norm(h))))
        x = x + (self.gamma * h).permute(0, 3, 1, 2)
        return self.head(x.mean((2, 3)))


class PostNormStream(nn.Module):
    """A post-norm residual MLP stream ``h = LN(h + f(h))`` (as in ``norm_first=False``
    Transformers), an RMSNorm block, a functional LayerNorm with attribute parameters, and a
    cls-token read ``h[:, 0]``: the stream's closed channels are AFFINE in the norms' row signals."""

    def __init__(self, n_in=6, d=16):
        super().__init__()
        self.embed = nn.Linear(n_in, d)
        self.ln0 = nn.LayerNorm(d)
        self.fc1, self.fc2 = nn.Linear(d, 24), nn.Linear(24, d)
        self.ln1 = nn.LayerNorm(d)
        self.fc3, self.fc4 = nn.Linear(d, 20), nn.Linear(20, d)
        self.rms = nn.RMSNorm(d)
        self.w, self.b = nn.Parameter(1 + 0.1 * torch.randn(d)), nn.Parameter(0.1 * torch.randn(d))
        self.head = nn.Linear(d, 2)

    def forward(self, x):
        h = self.ln0(self.embed(x))
        h = self.ln1(h + self.fc2(F.gelu(self.fc1(h))))
        h = self.rms(h + 0.5 * self.fc4(F.relu(self.fc3(h))))
        return self.head(F.layer_norm(h, (h.shape[-1],), self.w, self.b)[:, 0])


class GroupNormOne(nn.Module):
    """``GroupNorm(1, C)`` (a LayerNorm over channels and positions) between convolutions."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 10, 3, padding=1)
        self.norm = nn.GroupNorm(1, 10)
        self.conv2 = nn.Conv2d(10, 6, 3, padding=1)
        self.head = nn.Conv2d(6, 2, 1)

    def forward(self, x):
        return self.head(F.relu(self.conv2(self.norm(self.conv1(x)))))


class Reshapes(nn.Module):
    """Flatten and view from conv to FC, unsqueeze/squeeze, a reshape keeping the channel dim."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv1d(4, 10, 3, padding=1)
        self.conv2 = nn.Conv1d(10, 10, 1)
        self.fc = nn.Linear(10 * 8, 5)
        self.fc2 = nn.Linear(10, 5)

    def forward(self, x):
        h = torch.relu(self.conv(x))
        g = h.reshape(h.size(0), 10, -1).unsqueeze(-1).squeeze(-1)
        g = torch.relu(self.conv2(g))
        flat = F.adaptive_avg_pool1d(g, 8).view(g.size(0), -1)
        return self.fc(flat) + self.fc2(g.transpose(1, 2)).mean(1)


class TokensToImage(nn.Module):
    """A hybrid CNN-transformer step: conv features flattened to tokens, a per-token linear layer,
    and the tokens folded back into an image whose spatial shape is read from another tensor (a
    slice of the input's channels, which compaction keeps whole)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.proj = nn.Linear(8, 6)
        self.head = nn.Conv2d(6, 2, 1)

    def forward(self, x):
        like = x.narrow(1, 0, 2)
        tokens = self.proj(torch.relu(self.conv(x)).flatten(2).transpose(1, 2))
        return self.head(tokens.transpose(1, 2).reshape(x.shape[0], -1, like.shape[2], like.shape[3]))


def _norm_stats(model: nn.Module) -> nn.Module:
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.running_mean.uniform_(-0.5, 0.5, generator=g)
                m.running_var.uniform_(0.5, 2.0, generator=g)
                m.weight.uniform_(0.5, 1.5, generator=g)
                m.bias.uniform_(-0.5, 0.5, generator=g)
            if isinstance(m, (nn.LayerNorm, nn.GroupNorm, nn.RMSNorm)) and m.weight is not None:
                m.weight.uniform_(0.5, 1.5, generator=g)
                if getattr(m, "bias", None) is not None:
                    m.bias.uniform_(-0.5, 0.5, generator=g)
    return model.eval()


OPS = {
    "reused_relu": (ReusedReLUBlock, (2, 3, 8, 8), (3, 3, 12, 10)),
    "inverted_residual": (InvertedResidual, (2, 3, 8, 8), (3, 3, 10, 6)),
    "grouped_convs": (GroupedConvs, (2, 3, 8, 8), (3, 3, 6, 10)),
    "squeeze_excite": (SqueezeExcite, (2, 3, 8, 8), (3, 3, 9, 7)),
    "chunk_shuffle": (ChunkShuffle, (2, 3, 8, 8), (3, 3, 5, 7)),
    "convnext_block": (ConvNeXtBlock, (2, 3, 16, 16), (3, 3, 24, 12)),
    "post_norm_stream": (PostNormStream, (2, 5, 6), (3, 7, 6)),
    "group_norm_one": (GroupNormOne, (2, 3, 8, 8), (3, 3, 6, 9)),
    "reshapes": (Reshapes, (2, 4, 8), (3, 4, 8)),
    "tokens_to_image": (TokensToImage, (2, 3, 8, 8), (3, 3, 6, 10)),
}


def make(name: str, seed: int = 0) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    """The dense model ``name`` (eval mode, non-trivial norm statistics), its example input and
    another input of a different shape."""
    factory, shape, other = OPS[name]
    torch.manual_seed(seed)
    model = _norm_stats(factory())
    return model, torch.randn(*shape), torch.randn(*other)
