"""Compaction through per-channel ops that lumos used to keep whole: ``nn.PReLU`` with one slope
per channel, ``torch.roll`` / ``torch.flip`` over positions, GLU (``F.glu``, ``nn.GLU``) and pixel
(un)shuffles, on models written from their papers' diagrams: an SRResNet generator (Ledig et al.
2017: conv-BN-PReLU residual blocks, PixelShuffle upsampling), an EDSR-style x4 upsampler (two
``F.pixel_shuffle`` stages) behind a ``PixelUnshuffle`` encoder, a periodic finite-difference network of
the kind CFD surrogates use (the Laplacian stencil by ``torch.roll``), a mirror-symmetrised
predictor (``flip``), a gated convolution stack (Dauphin et al. 2017, GLU over channels) and a
GLU feed-forward (Shazeer 2020). Each is gated, half of every gate closed, compacted, and compared
with the gated model on batch and spatial sizes other than the example's; ops that move channels
(a flip or roll of the channel dim) stay exact by being kept whole; a layer lumos keeps whole says
which op needs its channels.
"""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lumos
from lumos.report import count_params
from zoo_architectures import close_half_of_every_gate, relative_error

pytestmark = pytest.mark.usefixtures("one_torch_thread")


class SRResidualBlock(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(channels, channels, 3, padding=1), nn.BatchNorm2d(channels),
                                  nn.PReLU(channels), nn.Conv2d(channels, channels, 3, padding=1),
                                  nn.BatchNorm2d(channels))

    def forward(self, x):
        return x + self.body(x)


class SRResNet(nn.Module):
    """Head conv + PReLU, residual blocks, a long skip, one x2 PixelShuffle upsampling, tail conv."""

    def __init__(self, channels: int = 16, blocks: int = 2):
        super().__init__()
        self.head = nn.Sequential(nn.Conv2d(3, channels, 9, padding=4), nn.PReLU(channels))
        self.blocks = nn.Sequential(*[SRResidualBlock(channels) for _ in range(blocks)])
        self.merge = nn.Sequential(nn.Conv2d(channels, channels, 3, padding=1), nn.BatchNorm2d(channels))
        self.upsample = nn.Sequential(nn.Conv2d(channels, 4 * channels, 3, padding=1), nn.PixelShuffle(2),
                                      nn.PReLU(channels))
        self.tail = nn.Conv2d(channels, 3, 9, padding=4)

    def forward(self, x):
        h = self.head(x)
        return self.tail(self.upsample(h + self.merge(self.blocks(h))))


class PeriodicLaplacianNet(nn.Module):
    """Lift, a periodic 5-point Laplacian of the features (``torch.roll``), mix, project."""

    def __init__(self):
        super().__init__()
        self.lift = nn.Conv2d(2, 24, 1)
        self.mix = nn.Conv2d(48, 24, 1)
        self.project = nn.Conv2d(24, 1, 1)

    def forward(self, u):
        h = torch.tanh(self.lift(u))
        laplacian = (torch.roll(h, 1, 2) + torch.roll(h, -1, 2) + h.roll(1, 3) + h.roll(-1, 3) - 4 * h)
        return self.project(torch.tanh(self.mix(torch.cat([h, laplacian], 1))))


class MirrorSymmetric(nn.Module):
    """``f(x) + mirror(g(mirror(x)))``, the mirror along the width written both ways."""

    def __init__(self):
        super().__init__()
        self.f = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.GELU(), nn.Conv2d(16, 16, 3, padding=1))
        self.g = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.GELU(), nn.Conv2d(16, 16, 3, padding=1))
        self.head = nn.Conv2d(16, 2, 1)

    def forward(self, x):
        return self.head(self.f(x) + torch.flip(self.g(x.flip(3)), dims=[-1]))


class GatedConvStack(nn.Module):
    """Gated convolutions: conv to 2C, GLU over channels, residual."""

    def __init__(self, channels: int = 16):
        super().__init__()
        self.inp = nn.Conv1d(4, channels, 1)
        self.convs = nn.ModuleList(nn.Conv1d(channels, 2 * channels, 3, padding=1) for _ in range(2))
        self.mix = nn.ModuleList(nn.Conv1d(channels, channels, 1) for _ in range(2))
        self.out = nn.Conv1d(channels, 2, 1)

    def forward(self, x):
        h = self.inp(x)
        for conv, mix in zip(self.convs, self.mix):
            h = h + mix(F.glu(conv(h), dim=1))
        return self.out(h)


class GLUFeedForward(nn.Module):
    """Linear to 2H, ``nn.GLU`` on the last dim, linear back (a GLU transformer feed-forward)."""

    def __init__(self):
        super().__init__()
        self.up = nn.Linear(8, 64)
        self.glu = nn.GLU()
        self.down = nn.Linear(32, 8)
        self.head = nn.Linear(8, 1)

    def forward(self, x):
        return self.head(x + self.down(self.glu(self.up(x))))


class ShuffleUpsampler(nn.Module):
    """Space-to-depth encoder (``PixelUnshuffle``), a body, and x4 sub-pixel upsampling in two
    ``F.pixel_shuffle`` stages (EDSR's upsampler), ReLU between."""

    def __init__(self, channels: int = 8):
        super().__init__()
        self.down = nn.PixelUnshuffle(2)
        self.enc = nn.Conv2d(4, channels, 3, padding=1)
        self.body = nn.Conv2d(channels, channels, 3, padding=1)
        self.up1 = nn.Conv2d(channels, 4 * channels, 3, padding=1)
        self.up2 = nn.Conv2d(channels, 4 * channels, 3, padding=1)
        self.tail = nn.Conv2d(channels, 1, 3, padding=1)

    def forward(self, x):  # x (B, 1, H, W), H and W even
        h = torch.relu(self.enc(self.down(x)))
        h = h + torch.relu(self.body(h))
        h = torch.relu(F.pixel_shuffle(self.up1(h), 2))
        return self.tail(F.pixel_shuffle(self.up2(h), upscale_factor=2))


class ChannelMovers(nn.Module):
    """Ops that move channels: a flip of the channel dim (given as varargs, channels last) and a
    roll of it. lumos must keep the layers before them whole (``pre`` stays prunable: ``a``
    reads its channels)."""

    def __init__(self):
        super().__init__()
        self.pre = nn.Linear(6, 16)
        self.a = nn.Linear(16, 16)
        self.b = nn.Linear(16, 16)
        self.c = nn.Linear(16, 2)

    def forward(self, x):  # x (B, H, W, 6)
        h = torch.relu(self.a(torch.relu(self.pre(x)))).flip(1, 3)
        h = torch.relu(self.b(h)).roll(2, -1)
        return self.c(h)


def _looking_trained(model: nn.Module) -> nn.Module:
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.2, 0.2, generator=g)
                m.running_var.uniform_(0.5, 1.5, generator=g)
            if isinstance(m, nn.PReLU):
                m.weight.uniform_(0.05, 0.4, generator=g)  # one slope per channel, all different
    return model.eval()


CASES = {
    "srresnet": (SRResNet, lambda b, s: torch.randn(b, 3, s, s), 8, [(2, 12), (1, 10)]),
    "periodic_laplacian": (PeriodicLaplacianNet, lambda b, s: torch.randn(b, 2, s, s), 8, [(3, 12), (1, 5)]),
    "mirror_symmetric": (MirrorSymmetric, lambda b, s: torch.randn(b, 3, s, s), 8, [(2, 11), (5, 4)]),
    "gated_conv_stack": (GatedConvStack, lambda b, s: torch.randn(b, 4, s), 16, [(3, 23), (1, 7)]),
    "glu_feed_forward": (GLUFeedForward, lambda b, s: torch.randn(b, s, 8), 5, [(2, 9), (7, 1)]),
    "shuffle_upsampler": (ShuffleUpsampler, lambda b, s: torch.randn(b, 1, s, s), 8, [(2, 12), (1, 6)]),
    "channel_movers": (ChannelMovers, lambda b, s: torch.randn(b, s, s, 6), 4, [(2, 6), (1, 3)]),
}


@pytest.mark.parametrize("name", list(CASES))
def test_compacted_equals_gated_on_other_sizes(name):
    cls, make, size, others = CASES[name]
    torch.manual_seed(0)
    example = make(4, size)
    gated = lumos.gate(_looking_trained(cls()), example, features=False)
    close_half_of_every_gate(gated, seed=3)
    gated.eval()
    small = lumos.compact(gated, example)
    for batch, other in [(4, size), *others]:
        x = make(batch, other)
        with torch.no_grad():
            assert relative_error(small(x), gated(x)) < 1e-5, (name, batch, other)


@pytest.mark.parametrize("name, gated_layers", [
    ("srresnet", ["head.0", "blocks.0.body.0", "blocks.1.body.0", "upsample.0"]),
    ("shuffle_upsampler", ["enc", "body", "up1", "up2"]),
    ("periodic_laplacian", ["lift", "mix"]),
    ("mirror_symmetric", ["f.0", "f.2", "g.0", "g.2"]),
    ("channel_movers", ["pre"]),
    ("gated_conv_stack", ["inp", "convs.0", "convs.1"]),
    ("glu_feed_forward", ["up"]),
])
def test_the_layers_before_these_ops_are_gated_and_shrink(name, gated_layers):
    cls, make, size, _ = CASES[name]
    torch.manual_seed(0)
    dense = _looking_trained(cls())
    gated = lumos.gate(dense, make(4, size), features=False)
    assert not set(gated_layers) & set(gated.skipped), {k: gated.skipped[k] for k in gated_layers if k in gated.skipped}
    close_half_of_every_gate(gated, seed=3)
    assert count_params(lumos.compact(gated, make(4, size))) < count_params(dense)


def test_a_prelu_with_one_slope_per_channel_is_sliced_to_the_kept_channels():
    torch.manual_seed(0)
    gated = lumos.gate(_looking_trained(SRResNet()), torch.randn(2, 3, 8, 8), features=False)
    close_half_of_every_gate(gated, seed=3)
    small = lumos.compact(gated, torch.randn(2, 3, 8, 8))
    conv = small.get_submodule("blocks.0.body.0")
    prelu = small.get_submodule("blocks.0.body.2")
    assert isinstance(prelu, nn.PReLU) and prelu.num_parameters == conv.out_channels < 16
    kept = torch.nonzero(gated.model.blocks[0].body[0].out_gate.kept()).flatten()
    assert torch.equal(prelu.weight, gated.model.blocks[0].body[2].weight[kept])


def test_ops_that_move_channels_keep_their_layers_whole_and_say_which_op():
    torch.manual_seed(0)
    gated = lumos.gate(ChannelMovers(), torch.randn(2, 4, 4, 6), features=False)
    assert gated.skipped["a"] == "feeds an op that needs every channel: `.flip()`"
    assert gated.skipped["b"] == "feeds an op that needs every channel: `.roll()`"


def test_a_pixel_shuffle_of_unequal_constants_is_refused_naming_it():
    """A closed unit before a BatchNorm holds the norm's shift, different per channel: shuffled,
    the dropped output channel would be a sub-pixel pattern, which no later layer can fold."""
    model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.PixelShuffle(2),
                          nn.Conv2d(4, 2, 3, padding=1))
    _looking_trained(model)
    gated = lumos.gate(model, torch.randn(2, 3, 6, 6), features=False)
    with torch.no_grad():
        gated.model[0].out_gate.log_alpha[:4] = -8.0  # the whole first group closed
    with pytest.raises(lumos.CompactionError, match=r"module `2`, PixelShuffle.*different constants.*leaf_modules"):
        lumos.compact(gated, torch.randn(2, 3, 6, 6))
    with torch.no_grad():  # without the norm's shifts: a group of zeros, folded
        gated.model[1].running_mean.zero_()
        gated.model[1].bias.zero_()
    small = lumos.compact(gated, torch.randn(2, 3, 6, 6))
    x = torch.randn(3, 3, 10, 10)
    gated.eval()
    assert small.get_submodule("0").out_channels == 12
    assert relative_error(small(x), gated(x)) < 1e-5
