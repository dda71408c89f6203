"""Gated convolutions and compaction of CNNs: exact equality with the gated model, sizes as
reported, standard modules only, serialisation, training closes conv gates, and models that
cannot shrink exactly stay whole."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lumos

from lumos.nn import (GatedConv1d, GatedConv2d, GatedConv3d, GatedConvTranspose2d,
                      GatedConvTranspose3d)
from zoo import assert_state_dict_round_trip, randomize_gates
from zoo_cnn import cnn_zoo

ATOL, RTOL = 1e-4, 1e-5  # float32, compacted vs gated eval
ZOO = cnn_zoo()
GATED_CONVS = (GatedConv1d, GatedConv2d, GatedConv3d, GatedConvTranspose2d, GatedConvTranspose3d)
PLAIN_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose2d, nn.ConvTranspose3d)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _gated(name: str, seed: int = 5, close_layer: bool = False):
    """The zoo model ``name`` gated on its input channels, gates set at random (about half
    closed; ``close_layer``: the zoo's chosen conv closed fully); input channel 0 stays open."""
    model, x, layer = ZOO[name]
    gated = lumos.gate(model, x, feature_dim=1)
    randomize_gates(gated, seed=seed, fully_closed=layer if close_layer else None)
    with torch.no_grad():
        gated.feature_gate.gate.log_alpha[0] = 4.0
    return gated, x


def _compact(gated, x):
    return lumos.compact(gated, x, allow_constant=True)  # closing a chain layer cuts the input off


def _n_params(model):
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("close_layer", [False, True], ids=["random", "one_layer_closed"])
@pytest.mark.parametrize("name", sorted(ZOO))
def test_compact_equals_gated_eval(name, close_layer):
    gated, x = _gated(name, close_layer=close_layer)
    compacted = _compact(gated, x)
    torch.testing.assert_close(compacted(x), gated.eval()(x), atol=ATOL, rtol=RTOL)
    x2 = torch.randn(3, *x.shape[1:])  # another batch size than the one traced
    torch.testing.assert_close(compacted(x2), gated.eval()(x2), atol=ATOL, rtol=RTOL)


@pytest.mark.parametrize("name", sorted(ZOO))
def test_compact_param_count_equals_report(name):
    gated, x = _gated(name, seed=2)
    compacted = _compact(gated, x)
    report = lumos.report(gated)
    assert _n_params(compacted) == report.params_after
    assert report.params_after < report.params_before
    assert any(layer["width_after"] < layer["width_before"] for layer in report.layers)


@pytest.mark.parametrize("name", sorted(ZOO))
def test_compacted_model_holds_only_standard_modules(name):
    gated, x = _gated(name, seed=1, close_layer=True)
    compacted = _compact(gated, x)
    leaves = [m for m in compacted.modules() if not list(m.children())]
    assert all(type(m).__module__.startswith("torch.nn.modules") for m in leaves), [type(m) for m in leaves]
    assert not any(isinstance(m, GATED_CONVS + (lumos.HardConcreteGate,)) for m in compacted.modules())


@pytest.mark.parametrize("name", sorted(ZOO))
def test_compacted_state_dict_round_trip_and_export(name):
    gated, x = _gated(name, seed=9)
    compacted, twin = _compact(gated, x), _compact(gated, x)
    assert_state_dict_round_trip(compacted, twin, (x,))
    exported = torch.export.export(compacted, (x,))
    torch.testing.assert_close(exported.module()(x), compacted(x))


@pytest.mark.parametrize("name", sorted(ZOO))
def test_gate_converts_convs_and_leaves_output_layer_alone(name):
    model, x, _ = ZOO[name]
    gated = lumos.gate(model, x, feature_dim=1)
    plain = [n for n, m in model.named_modules() if type(m) in PLAIN_CONVS]
    converted = [n for n, m in gated.model.named_modules() if isinstance(m, GATED_CONVS)]
    assert len(gated.skipped) == 1 and "output" in next(iter(gated.skipped.values()))
    assert set(converted) == set(plain) - set(gated.skipped)
    assert gated.feature_gate.dim == 1 and gated.feature_gate.n_features == x.shape[1]


def test_compact_shrinks_conv_widths_to_kept_gates():
    gated, x = _gated("vgg", seed=4)
    convs = [m for m in gated.modules() if isinstance(m, GatedConv2d)]
    kept = [int(m.out_gate.kept().sum()) for m in convs]
    compacted = _compact(gated, x)
    widths = [m.out_channels for m in compacted.modules() if isinstance(m, nn.Conv2d)]
    assert widths == kept
    assert compacted.get_submodule("classifier.0").in_features == kept[-1] * 2 * 2


def test_constant_channels_into_zero_padded_conv_are_exact_at_the_borders():
    """A closed channel after BatchNorm + ReLU holds a non-zero constant; a zero-padded conv sees
    it everywhere but in its padding, so no bias can replace it: compaction adds the exact map."""
    gated, x = _gated("vgg", seed=5)
    compacted = _compact(gated, x)
    functions = {n.target for n in compacted.graph.nodes if n.op == "call_function"}
    assert F.conv2d in functions or torch.conv2d in functions  # the border map: a conv of ones
    torch.testing.assert_close(compacted(x), gated.eval()(x), atol=ATOL, rtol=RTOL)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["unet2d", "cosmoflow3d"])
def test_training_with_params_penalty_closes_conv_gates(name):
    model, x, _ = ZOO[name]
    gated = lumos.gate(model, x, feature_dim=1)
    data = torch.randn(8, *x.shape[1:])
    with torch.no_grad():
        target = model(data)
    optimizer = torch.optim.Adam(gated.parameters(), lr=0.05)
    gated.train()
    for _ in range(200):
        optimizer.zero_grad()
        loss = F.mse_loss(gated(data), target) + 1.0 * lumos.penalty(gated, "params", normalize=True)
        loss.backward()
        optimizer.step()
        lumos.clamp_gates_(gated)
    convs = {n: m for n, m in gated.model.named_modules() if isinstance(m, GATED_CONVS)}
    closed = {n for n, m in convs.items() if int(m.out_gate.kept().sum()) < m.out_channels}
    assert len(closed) >= 0.75 * len(convs), sorted(set(convs) - closed)
    assert {type(convs[n]) for n in closed} == {type(m) for m in convs.values()}  # every conv kind
    report = lumos.report(gated)
    assert report.params_after < 0.5 * report.params_before
    compacted = _compact(gated, x)
    torch.testing.assert_close(compacted(x), gated.eval()(x), atol=ATOL, rtol=RTOL)


class _SlicedChannels(nn.Module):
    """Keeps the first 4 channels by slicing (an index map on the channels) and uses a
    depthwise conv (groups == channels)."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.depthwise = nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.conv3 = nn.Conv2d(4, 8, 3, padding=1)
        self.head = nn.Conv2d(8, 2, 1)

    def forward(self, x):
        h = torch.relu(self.depthwise(torch.relu(self.conv1(x))))
        h = torch.relu(self.conv2(h))[:, :4]
        return self.head(torch.relu(self.conv3(h)))


def _close_units(gated, units: dict) -> None:
    """Open every gate, then close the listed units (layer name -> output channels)."""
    with torch.no_grad():
        for _, gate in lumos.gates_of(gated):
            gate.log_alpha.fill_(4.0)
        for name, channels in units.items():
            gated.get_submodule(name).out_gate.log_alpha[channels] = -8.0


def test_channel_slice_and_depthwise_conv_compact_exactly():
    model, x = _SlicedChannels().eval(), torch.randn(2, 3, 12, 12)
    gated = lumos.gate(model, x, feature_dim=1)
    assert set(gated.skipped) == {"head"}
    _close_units(gated, {"model.conv1": [3], "model.depthwise": [1, 5], "model.conv2": [2, 6]})
    compacted = _compact(gated, x)
    torch.testing.assert_close(compacted(x), gated.eval()(x), atol=ATOL, rtol=RTOL)
    x2 = torch.randn(3, 3, 7, 9)
    torch.testing.assert_close(compacted(x2), gated.eval()(x2), atol=ATOL, rtol=RTOL)
    depthwise = compacted.get_submodule("depthwise")
    assert depthwise.groups == depthwise.out_channels == 6  # channels 1 and 5 removed
    assert compacted.get_submodule("conv2").out_channels == 3  # of the 4 sliced ones, channel 2 closed
    assert compacted.get_submodule("conv3").in_channels == 3
    assert _n_params(compacted) == lumos.report(gated).params_after


class _GatedByHand(nn.Module):
    """Gated layers placed by hand: a grouped gated conv (kept whole, gates folded), average
    pooling that counts zero padding (a constant channel would not stay constant: kept whole),
    a concatenation along the width and a 3d transposed conv."""

    def __init__(self):
        super().__init__()
        self.conv1 = GatedConv2d(3, 8, 3, padding=1, gate_in=True)
        self.bn = nn.BatchNorm2d(8)
        self.conv2 = GatedConv2d(8, 8, 3, padding=1)
        self.grouped = GatedConv2d(8, 6, 3, padding=1, groups=2)
        self.conv3 = GatedConv2d(6, 6, 1)
        self.up3d = GatedConvTranspose3d(6, 4, 2, stride=2)
        self.out = nn.Conv3d(4, 1, 1)

    def forward(self, x):
        h = torch.relu(self.bn(self.conv1(x)))
        h = F.avg_pool2d(h, 3, stride=1, padding=1)  # counts the zero padding
        h = torch.relu(self.grouped(torch.relu(self.conv2(h))))
        h = torch.cat([h, 0.5 * h], dim=3)  # along the width: channels tied, not shifted
        h = self.conv3(h)
        return self.out(torch.sigmoid(self.up3d(h.unsqueeze(2))))


def test_hand_gated_layers_compact_exactly_or_stay_whole():
    model = _GatedByHand().eval()
    with torch.no_grad():
        model.bn.running_mean.uniform_(-0.5, 0.5)
        model.bn.bias.uniform_(0.5, 1.0)
    x = torch.randn(2, 3, 8, 8)
    randomize_gates(model, seed=6)
    with torch.no_grad():
        model.conv1.out_gate.log_alpha[:4] = -8.0
        model.conv1.out_gate.log_alpha[4:] = 4.0
        model.conv1.in_gate.log_alpha[0] = 4.0
    compacted = lumos.compact(model, x)
    torch.testing.assert_close(compacted(x), model.eval()(x), atol=ATOL, rtol=RTOL)
    assert compacted.get_submodule("conv1").out_channels == 8  # padded average pooling: whole
    assert compacted.get_submodule("grouped").groups == 2
    assert sum(p.numel() for p in compacted.parameters()) == lumos.report(model, x).params_after
    assert not any(isinstance(m, GATED_CONVS) for m in compacted.modules())


@pytest.mark.parametrize("plain, gated_type, shape", [
    (nn.Conv1d(4, 6, 3, padding=1, padding_mode="circular"), GatedConv1d, (2, 4, 9)),
    (nn.Conv2d(3, 5, 3, stride=2, padding=1), GatedConv2d, (2, 3, 9, 9)),
    (nn.Conv3d(2, 4, 3, dilation=2, bias=False), GatedConv3d, (2, 2, 7, 7, 7)),
    (nn.ConvTranspose2d(6, 4, 3, stride=2, output_padding=1, groups=2), GatedConvTranspose2d, (2, 6, 5, 5)),
    (nn.ConvTranspose3d(2, 3, 2, stride=2), GatedConvTranspose3d, (2, 2, 3, 3, 3)),
])
def test_gated_conv_matches_torch_layer_and_masks_channels(plain, gated_type, shape):
    gated = gated_type.from_conv(plain, gate_in=True)
    assert [n for n, _ in plain.named_parameters()] == [n for n, _ in gated.named_parameters()
                                                         if not n.endswith("log_alpha")]
    x = torch.randn(*shape)
    m_out = torch.tensor([1.0, 0.0] * 4)[:plain.out_channels]
    m_in = torch.tensor([0.0, 1.0] * 4)[:plain.in_channels]
    with torch.no_grad():
        gated.out_gate.log_alpha.copy_(torch.where(m_out > 0, 4.0, -8.0))
        gated.in_gate.log_alpha.copy_(torch.where(m_in > 0, 4.0, -8.0))
    view = [1, -1] + [1] * (x.dim() - 2)
    expected = plain(x * m_in.view(view)) * m_out.view(view)
    torch.testing.assert_close(gated.eval()(x), expected)
    assert f"kept_out={int(m_out.sum())}/{plain.out_channels}" in repr(gated)


def test_gated_conv_has_torch_init():
    torch.manual_seed(3)
    plain = nn.Conv2d(3, 5, 3)
    torch.manual_seed(3)
    gated = GatedConv2d(3, 5, 3)
    torch.testing.assert_close(gated.weight, plain.weight)
    torch.testing.assert_close(gated.bias, plain.bias)
    with pytest.raises(ValueError, match=r"GatedConv2d: input must have shape"):
        gated(torch.randn(2, 4, 8, 8))
    with pytest.raises(TypeError, match="expected a Conv2d"):
        GatedConv2d.from_conv(nn.Conv3d(3, 5, 3))


class _ConvAfterConstants(nn.Module):
    """gated conv -> BatchNorm -> ReLU -> ``layer`` -> tanh -> 1x1 conv: channels closed in the
    first conv reach ``layer`` as non-zero constants (BatchNorm shifts them)."""

    def __init__(self, layer: nn.Module):
        super().__init__()
        dims = len(layer.kernel_size)
        self.first = (GatedConv1d, GatedConv2d, GatedConv3d)[dims - 1](3, 6, 3, padding=1)
        self.bn = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)[dims - 1](6)
        self.layer = _gated_twin(layer)
        self.head = (nn.Conv1d, nn.Conv2d, nn.Conv3d)[dims - 1](layer.out_channels, 2, 1)
        with torch.no_grad():
            self.bn.running_mean.uniform_(-0.5, 0.5)
            self.bn.bias.uniform_(0.2, 0.8)

    def forward(self, x):
        return self.head(torch.tanh(self.layer(torch.relu(self.bn(self.first(x))))))


def _gated_twin(layer):
    twins = {nn.Conv1d: GatedConv1d, nn.Conv2d: GatedConv2d, nn.Conv3d: GatedConv3d,
             nn.ConvTranspose2d: GatedConvTranspose2d, nn.ConvTranspose3d: GatedConvTranspose3d}
    return twins[type(layer)].from_conv(layer, gate_in=True)


CONV_CASES = {
    "zero_padding": (nn.Conv2d(6, 5, 3, padding=1), (2, 3, 9, 9)),
    "reflect_padding": (nn.Conv2d(6, 5, 3, padding=1, padding_mode="reflect"), (2, 3, 9, 9)),
    "circular_dilated": (nn.Conv2d(6, 5, 3, padding=2, dilation=2, padding_mode="circular"), (2, 3, 9, 9)),
    "strided_no_bias": (nn.Conv2d(6, 5, 3, stride=2, padding=1, bias=False), (2, 3, 9, 9)),
    "same_padding": (nn.Conv2d(6, 5, (3, 1), padding="same"), (2, 3, 9, 9)),
    "no_padding_no_bias": (nn.Conv2d(6, 5, 3, bias=False), (2, 3, 9, 9)),
    "conv1d_replicate": (nn.Conv1d(6, 5, 5, padding=2, padding_mode="replicate"), (2, 3, 11)),
    "conv3d": (nn.Conv3d(6, 5, 3, padding=1), (2, 3, 5, 5, 5)),
    "transposed_output_padding": (nn.ConvTranspose2d(6, 5, 3, stride=2, padding=1, output_padding=1),
                                  (2, 3, 6, 6)),
    "transposed_no_bias": (nn.ConvTranspose2d(6, 5, 2, stride=2, bias=False), (2, 3, 5, 5)),
    "transposed3d": (nn.ConvTranspose3d(6, 5, 2, stride=2), (2, 3, 3, 3, 3)),
}


@pytest.mark.parametrize("closed", ["random", "all_inputs", "all_outputs"])
@pytest.mark.parametrize("case", sorted(CONV_CASES))
def test_conv_after_constant_channels_compacts_exactly(case, closed):
    layer, shape = CONV_CASES[case]
    torch.manual_seed(1)
    model = _ConvAfterConstants(layer).eval()
    randomize_gates(model, seed=4)
    with torch.no_grad():
        model.first.out_gate.log_alpha[:3] = -8.0  # at least three constant channels
        if closed == "all_inputs":
            model.first.out_gate.log_alpha.fill_(-8.0)
        if closed == "all_outputs":
            model.layer.out_gate.log_alpha.fill_(-8.0)
    x = torch.randn(*shape)
    compacted = lumos.compact(model, x, allow_constant=True)  # all inputs closed: a constant model
    torch.testing.assert_close(compacted(x), model(x), atol=ATOL, rtol=RTOL)
    x2 = torch.randn(1, *shape[1:])
    torch.testing.assert_close(compacted(x2), model(x2), atol=ATOL, rtol=RTOL)
    assert _n_params(compacted) == lumos.report(model, x).params_after
