"""Every way compaction used to come back silently wrong or crash (issue 9) now gives an exact
model or an error naming the node (or gate) and what to do; and compaction checks itself."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lumos
from lumos import CompactionError
from zoo import randomize_gates

ATOL, RTOL = 1e-4, 1e-5


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _assert_exact(compacted, gated, *inputs):
    with torch.no_grad():
        torch.testing.assert_close(compacted(*inputs), gated.eval()(*inputs), atol=ATOL, rtol=RTOL)


# -- tied weights ---------------------------------------------------------------------------------
class TiedAutoencoder(nn.Module):
    """The decoder reuses the encoder's weights, transposed; a side branch is free to shrink."""

    def __init__(self):
        super().__init__()
        self.enc1, self.enc2 = nn.Linear(10, 16), nn.Linear(16, 4)
        self.side = nn.Sequential(nn.Linear(10, 12), nn.ReLU(), nn.Linear(12, 10))

    def forward(self, x):
        z = self.enc2(torch.relu(self.enc1(x)))
        h = torch.relu(F.linear(z, self.enc2.weight.t()))
        return F.linear(h, self.enc1.weight.t()) + self.side(x)


def test_tied_weights_stay_tied_and_exact():
    x = torch.randn(6, 10)
    gated = lumos.gate(TiedAutoencoder(), x)
    for name in ("enc1", "enc2"):
        assert "tied weights" in gated.skipped[name]
    assert isinstance(gated.model.side[0], lumos.nn.GatedLinear)
    randomize_gates(gated, seed=1)
    compacted = lumos.compact(gated, x)
    _assert_exact(compacted, gated, torch.randn(3, 10))
    with torch.no_grad():  # still one tensor: changing the layer's weight changes the decoder too
        compacted.enc1.weight.mul_(2.0)
    assert not torch.allclose(compacted(x), gated.eval()(x))


class TiedModules(nn.Module):
    """Two layers holding one weight tensor (``b.weight = a.weight``), as users tie them."""

    def __init__(self):
        super().__init__()
        self.inp, self.a, self.b = nn.Linear(6, 8), nn.Linear(8, 8), nn.Linear(8, 8)
        self.b.weight = self.a.weight
        self.mid, self.head = nn.Linear(8, 12), nn.Linear(12, 2)

    def forward(self, x):
        h = torch.relu(self.b(torch.relu(self.a(torch.relu(self.inp(x))))))
        return self.head(torch.relu(self.mid(h)))


def test_layers_holding_one_weight_tensor_stay_ungated_tied_and_exact():
    x = torch.randn(6, 6)
    gated = lumos.gate(TiedModules(), x)
    assert "same parameter tensor as `b`" in gated.skipped["a"]
    assert "same parameter tensor as `a`" in gated.skipped["b"]
    assert gated.model.a.weight is gated.model.b.weight  # still one tensor while training
    assert "needs every channel" in gated.skipped["inp"]  # a reads every input channel of the tied weight
    assert isinstance(gated.model.mid, lumos.nn.GatedLinear)
    randomize_gates(gated, seed=3)
    compacted = lumos.compact(gated, x)
    assert compacted.a.weight is compacted.b.weight
    assert compacted.a.in_features == 8  # its input channels cannot go: b reads the same columns
    _assert_exact(compacted, gated, torch.randn(11, 6))


class TwoGatedLayersOneWeight(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = lumos.nn.GatedLinear(6, 6), lumos.nn.GatedLinear(6, 6)
        self.b.weight = self.a.weight
        self.head = nn.Linear(6, 1)

    def forward(self, x):
        return self.head(torch.relu(self.b(torch.relu(self.a(x)))))


def test_gated_layers_holding_one_weight_tensor_are_refused_naming_both():
    with pytest.raises(CompactionError, match=r"gated layer `a` holds the same parameter tensor as `b`.*untie"):
        lumos.compact(TwoGatedLayersOneWeight(), torch.randn(4, 6))


class TiedGatedByHand(nn.Module):
    def __init__(self):
        super().__init__()
        self.enc = lumos.nn.GatedLinear(6, 8)

    def forward(self, x):
        return F.linear(torch.relu(self.enc(x)), self.enc.weight.t())


def test_gated_layer_with_tied_weights_is_refused_naming_the_node():
    model = TiedGatedByHand()
    with pytest.raises(CompactionError, match=r"`enc.weight` is read directly by node `enc_weight`.*tied"):
        lumos.compact(model, torch.randn(4, 6))


# -- in-place ops ---------------------------------------------------------------------------------
class InPlaceAfterPoolWithSkip(nn.Module):
    """``ReLU(inplace=True)`` on a pooling's output while the pooling's input feeds a skip."""

    def __init__(self):
        super().__init__()
        self.conv1, self.bn = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.pool, self.relu = nn.MaxPool2d(3, stride=1, padding=1), nn.ReLU(inplace=True)
        self.conv2, self.skip = nn.Conv2d(8, 6, 3, padding=1), nn.Conv2d(8, 6, 1)
        with torch.no_grad():
            self.bn.bias.uniform_(-1.0, -0.2)  # closed channels hold negative constants
            self.bn.running_mean.uniform_(-0.5, 0.5)

    def forward(self, x):
        h = self.bn(self.conv1(x))
        return self.conv2(self.relu(self.pool(h))) + self.skip(h)


def test_inplace_relu_after_pooling_with_skip_is_exact():
    x = torch.randn(2, 3, 8, 8)
    gated = lumos.gate(InPlaceAfterPoolWithSkip().eval(), x, feature_dim=1)
    randomize_gates(gated, seed=2)
    with torch.no_grad():
        gated.feature_gate.gate.log_alpha.fill_(4.0)
        gated.model.conv1.out_gate.log_alpha[:4] = -8.0
    compacted = lumos.compact(gated, x)
    assert compacted.get_submodule("conv1").out_channels < 8
    _assert_exact(compacted, gated, torch.randn(3, 3, 6, 10))


class InPlaceVariants(nn.Module):
    """In-place ops of every spelling after gated layers, one after a layer that is removed."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2, self.fc3, self.out = nn.Linear(5, 12), nn.Linear(12, 12), nn.Linear(12, 12), nn.Linear(12, 2)
        self.act = nn.ReLU(inplace=True)

    def forward(self, x):
        h = self.act(self.fc1(x))
        h = F.relu(self.fc2(h), inplace=True)
        g = self.fc3(h)
        g.tanh_()
        return self.out(F.dropout(g, 0.1, self.training) + h)


def test_inplace_ops_and_a_removed_layer_before_them_compact_exactly():
    x = torch.randn(6, 5)
    gated = lumos.gate(InPlaceVariants(), x, share_gates=False)  # fc3 alone removed: its own gate
    randomize_gates(gated, seed=3)
    with torch.no_grad():
        gated.model.fc3.out_gate.log_alpha.fill_(-8.0)  # removed: tanh_ acts on a constant
    compacted = lumos.compact(gated, x)
    _assert_exact(compacted, gated, torch.randn(3, 5))
    assert not any(getattr(m, "inplace", False) for m in compacted.modules())


class AliasedAugmentedAssignment(nn.Module):
    """``b += 1`` on a tensor ``a`` also names: torch.fx records it as ``b = b + 1``."""

    def __init__(self):
        super().__init__()
        self.fc, self.out = nn.Linear(4, 8), nn.Linear(8, 2)

    def forward(self, x):
        a = self.fc(x)
        b = a
        b += 1.0
        return self.out(a)


def test_trace_that_differs_from_the_model_is_refused():
    x = torch.randn(5, 4)
    gated = lumos.gate(AliasedAugmentedAssignment(), x)
    with pytest.raises(CompactionError, match=r"traced graph.*h \+= x.*out of place"):
        lumos.compact(gated, x)


# -- shape-dependent reshapes ---------------------------------------------------------------------
class ReshapeFromExampleLength(nn.Module):
    """``h.reshape(B, -1, 2)`` after a Conv1d: at length 2 it looks like the identity, at other
    lengths it mixes channels and positions."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv1d(3, 8, 1)
        self.head = nn.Linear(2, 1)

    def forward(self, x):
        h = torch.tanh(self.conv(x))
        h = h.reshape(h.size(0), -1, 2)
        return self.head(h).mean(1)


def test_reshape_whose_meaning_depends_on_the_length_stays_whole():
    x = torch.randn(4, 3, 2)
    gated = lumos.gate(ReshapeFromExampleLength(), x, feature_dim=1)
    assert "conv" in gated.skipped
    with torch.no_grad():  # a hand-made gate on the conv: compaction keeps it whole anyway
        gated.model.conv = lumos.nn.GatedConv1d.from_conv(gated.model.conv)
        gated.model.conv.out_gate.log_alpha.copy_(torch.tensor([4.0, -8.0] * 4))
    compacted = lumos.compact(gated, x)
    assert compacted.get_submodule("conv").out_channels == 8
    for length in (2, 6, 7):
        _assert_exact(compacted, gated, torch.randn(3, 3, length))


# -- hooks ----------------------------------------------------------------------------------------
def test_forward_hooks_keep_running_after_gate_and_compact():
    model = nn.Sequential(nn.Linear(6, 12), nn.ReLU(), nn.Linear(12, 12), nn.ReLU(), nn.Linear(12, 2))
    calls = []
    model[2].register_forward_hook(lambda m, inp, out: calls.append(out.shape) or out * 2.0)
    model[0].register_forward_pre_hook(lambda m, inp: (inp[0] + 1.0,))
    x = torch.randn(5, 6)
    gated = lumos.gate(model, x)
    assert "hooks" in gated.skipped["2"] and "hooks" in gated.skipped["0"]
    randomize_gates(gated, seed=5)
    compacted = lumos.compact(gated, x)
    calls.clear()
    _assert_exact(compacted, gated, torch.randn(3, 6))
    assert len(calls) == 2  # gated and compacted model both ran the hook


def test_hook_added_to_a_gated_layer_runs_on_its_plain_twin():
    x = torch.randn(5, 6)
    gated = lumos.gate(nn.Sequential(nn.Linear(6, 12), nn.Tanh(), nn.Linear(12, 2)), x)
    randomize_gates(gated, seed=6)
    gated.model[0].register_forward_hook(lambda m, inp, out: out.clamp(max=0.1))
    compacted = lumos.compact(gated, x)
    assert type(compacted.get_submodule("0")) is nn.Linear and compacted.get_submodule("0")._forward_hooks
    _assert_exact(compacted, gated, torch.randn(3, 6))


# -- crashes of old ------------------------------------------------------------------------------
class ConvPermuteResidual(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(6, 6, 3, padding=1)
        self.head = nn.Linear(6, 2)

    def forward(self, x):
        h = self.conv(x).permute(0, 2, 3, 1) + x.permute(0, 2, 3, 1)
        return self.head(h)


def test_conv_plus_permute_residual_compacts_exactly():
    x = torch.randn(2, 6, 5, 5)
    gated = lumos.gate(ConvPermuteResidual(), x, feature_dim=1)
    randomize_gates(gated, seed=7)
    compacted = lumos.compact(gated, x)
    _assert_exact(compacted, gated, torch.randn(3, 6, 4, 7))


class InputIntoResidualAndNorm(nn.Module):
    def __init__(self, n=8):
        super().__init__()
        self.f = nn.Sequential(nn.Linear(n, 16), nn.ReLU(), nn.Linear(16, n))
        self.norm = nn.LayerNorm(n)
        self.head = nn.Linear(n, 2)

    def forward(self, x):
        return self.head(x + self.f(x)) + self.head(self.norm(x))


def test_keep_input_shape_false_with_input_in_residual_and_layernorm():
    x = torch.randn(6, 8)
    gated = lumos.gate(InputIntoResidualAndNorm(), x, feature_names=list("abcdefgh"))
    randomize_gates(gated, seed=8)
    with torch.no_grad():
        gated.feature_gate.gate.log_alpha.copy_(torch.tensor([4.0, -8.0, 4.0, -8.0, 4.0, 4.0, -8.0, 4.0]))
    kept = lumos.report(gated).kept_features
    assert kept == list("acefh")
    compacted = lumos.compact(gated, x, keep_input_shape=False)
    index = [list("abcdefgh").index(name) for name in kept]
    x2 = torch.randn(3, 8)
    torch.testing.assert_close(compacted(x2[:, index]), gated.eval()(x2), atol=ATOL, rtol=RTOL)


def test_model_on_meta_device_gets_a_clear_error():
    with torch.device("meta"):
        model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 1))
    with pytest.raises(ValueError, match=r"lumos.gate: parameter `0.weight` is on the meta device.*to_empty"):
        lumos.gate(model, torch.randn(3, 4))
    gated = lumos.gate(nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 1)), torch.randn(3, 4))
    with pytest.raises(ValueError, match=r"lumos.compact: parameter .* is on the meta device"):
        lumos.compact(gated.to("meta"), torch.randn(3, 4))


def test_nan_gate_is_refused_by_compact_and_report():
    x = torch.randn(5, 4)
    gated = lumos.gate(nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 1)), x)
    with torch.no_grad():
        gated.model[0].out_gate.log_alpha[2] = float("nan")
    for call, who in ((lumos.compact, "lumos.compact"), (lumos.report, "lumos.report")):
        with pytest.raises(CompactionError, match=rf"{who}: gate `model.0.out_gate` has 1 NaN.*units \[2\]"):
            call(gated, x)


# -- the self-check -------------------------------------------------------------------------------
def test_self_check_names_the_first_disagreeing_node(monkeypatch):
    from lumos.compact import build_linear, table

    real = build_linear.build_linear

    def broken(node, record, b):  # a builder bug: the second layer's bias is off by one
        real(node, record, b)
        if node.target == "2":
            b.env[node] = b.call_function(torch.add, b.env[node], 1.0)

    monkeypatch.setitem(table.BUILDERS, build_linear.LinearLayer, broken)
    x = torch.randn(5, 4)
    gated = lumos.gate(nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 1)), x)
    randomize_gates(gated, seed=9)
    with pytest.raises(CompactionError, match=r"disagrees with the gated model.*kept channels of `_2` \(module `2`"):
        lumos.compact(gated, x)


# -- training with in-place activations -----------------------------------------------------------
class VGGInPlace(nn.Module):
    """VGG-style: conv-BN-ReLU(inplace) blocks, pooling, a classifier with ReLU(inplace) and Dropout."""

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(inplace=True), nn.MaxPool2d(2),
            nn.Conv2d(8, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(inplace=True), nn.MaxPool2d(2))
        self.classifier = nn.Sequential(nn.Flatten(), nn.Linear(16 * 4 * 4, 32), nn.ReLU(inplace=True),
                                        nn.Dropout(0.1), nn.Linear(32, 3))

    def forward(self, x):
        return self.classifier(self.features(x))


def test_vgg_with_inplace_relu_trains_with_fit_and_compacts_exactly():
    """An in-place op on a GatedLinear output in training (it once failed with "Output 0 of
    _MaskedLinearReference is a view"), then a budget met by pruning, compacted exactly."""
    torch.manual_seed(0)
    x, y = torch.randn(64, 3, 16, 16), torch.randn(64, 3)
    gated = lumos.gate(VGGInPlace(), x[:8], feature_dim=1)
    assert set(gated.skipped) == {"classifier.4"}
    history = lumos.fit(gated, (x, y), epochs=8, batch_size=16, target=0.5, progress=False)
    assert history.target_met
    compacted = lumos.compact(gated)
    _assert_exact(compacted, gated, x[:5])
    report = lumos.report(gated)
    assert sum(p.numel() for p in compacted.parameters()) == report.params_after < report.params_before
