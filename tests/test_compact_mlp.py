"""Compaction of gated MLPs: exact equality with the gated model, sizes as reported, edge cases."""
import pytest
import torch
from torch import nn

import lumos

from zoo import assert_state_dict_round_trip, mlp_zoo, randomize_gates

ATOL = 1e-5
STANDARD = (nn.Linear, nn.LayerNorm, nn.BatchNorm1d, nn.ReLU, nn.SiLU, nn.GELU, nn.Tanh, nn.ELU,
            nn.Softplus, nn.Dropout)
ZOO = mlp_zoo()


def _gated_layers(gated):
    return [name for name, m in gated.named_modules() if isinstance(m, lumos.nn.GatedLinear)]


@pytest.fixture(params=sorted(ZOO), ids=sorted(ZOO))
def zoo_case(request):
    model, x = ZOO[request.param]
    return model, x


@pytest.mark.parametrize("closed_layer", [None, 0, -1])
def test_compact_equals_gated_eval(zoo_case, closed_layer):
    model, x = zoo_case
    gated = lumos.gate(model, x)
    layers = _gated_layers(gated)
    randomize_gates(gated, seed=5, fully_closed=None if closed_layer is None else layers[closed_layer])
    compacted = lumos.compact(gated, x, allow_constant=True)  # closing the first layer cuts the input off
    torch.testing.assert_close(compacted(x), gated.eval()(x), atol=ATOL, rtol=1e-5)
    # a different batch shape than the one traced
    x2 = torch.randn(3, *x.shape[1:])
    torch.testing.assert_close(compacted(x2), gated.eval()(x2), atol=ATOL, rtol=1e-5)


def test_compact_param_count_equals_report(zoo_case):
    model, x = zoo_case
    gated = lumos.gate(model, x)
    randomize_gates(gated, seed=2)
    compacted = lumos.compact(gated, x)
    report = lumos.report(gated)
    assert sum(p.numel() for p in compacted.parameters()) == report.params_after
    assert report.params_after < report.params_before


def test_compacted_model_holds_only_standard_modules(zoo_case):
    model, x = zoo_case
    gated = lumos.gate(model, x)
    randomize_gates(gated, seed=1)
    compacted = lumos.compact(gated, x)
    leaves = [m for m in compacted.modules() if not list(m.children())]
    assert all(isinstance(m, STANDARD) for m in leaves), [type(m) for m in leaves]
    assert not any(isinstance(m, (lumos.nn.GatedLinear, lumos.HardConcreteGate)) for m in compacted.modules())


def test_compact_shrinks_widths_to_kept_gates():
    model, x = ZOO["relu_3hidden"]
    gated = lumos.gate(model, x)
    randomize_gates(gated, seed=4)
    kept = [int(gated.get_submodule(n).out_gate.kept().sum()) for n in _gated_layers(gated)]
    compacted = lumos.compact(gated, x)
    widths = [m.out_features for m in compacted.modules() if isinstance(m, nn.Linear)]
    assert widths[:-1] == kept and widths[-1] == 3


def test_compact_leaves_gated_model_untouched():
    model, x = ZOO["residual"]
    gated = lumos.gate(model, x)
    randomize_gates(gated, seed=3)
    before = {k: v.clone() for k, v in gated.state_dict().items()}
    gated.train()
    lumos.compact(gated, x)
    assert gated.training
    for key, value in gated.state_dict().items():
        assert torch.equal(value, before[key]), key


def test_fully_closed_feature_set_is_refused_unless_a_constant_model_is_allowed():
    model, x = ZOO["relu_3hidden"]
    gated = lumos.gate(model, x)
    randomize_gates(gated, seed=0)
    with torch.no_grad():
        gated.feature_gate.gate.log_alpha.fill_(-8.0)
    with pytest.raises(lumos.CompactionError, match="lumos.compact: the model no longer depends on its input.*"
                                                    "gate `feature_gate.gate`.*allow_constant=True"):
        lumos.compact(gated, x)
    compacted = lumos.compact(gated, x, allow_constant=True)
    out = compacted(x)
    torch.testing.assert_close(out, gated.eval()(x), atol=ATOL, rtol=1e-5)
    assert torch.allclose(out, out[:1].expand_as(out))  # the same prediction for every row
    assert lumos.report(gated).kept_features == []


def test_keep_input_shape_false_takes_only_kept_columns():
    model, x = ZOO["silu_dropout"]
    gated = lumos.gate(model, x, feature_names=list("abcdef"))
    randomize_gates(gated, seed=7)
    kept = lumos.report(gated).kept_features
    index = [list("abcdef").index(name) for name in kept]
    compacted = lumos.compact(gated, x, keep_input_shape=False)
    torch.testing.assert_close(compacted(x[:, index]), gated.eval()(x), atol=ATOL, rtol=1e-5)


def test_compacted_state_dict_round_trip_and_export():
    model, x = ZOO["norms_sigmoid"]
    gated = lumos.gate(model, x)
    randomize_gates(gated, seed=9)
    compacted, twin = lumos.compact(gated, x), lumos.compact(gated, x)
    assert_state_dict_round_trip(compacted, twin, (x,))
    exported = torch.export.export(compacted, (x,))
    torch.testing.assert_close(exported.module()(x), compacted(x))


def test_gate_skips_output_layer_and_layernorm_activation_feeder():
    """fc1 feeds LayerNorm then ReLU: a closed fc1 unit still changes every LayerNorm output
    through the statistics, and the ReLU of that is no known function: it cannot be dropped."""
    model, x = ZOO["norms_sigmoid"]
    gated = lumos.gate(model, x)
    assert "out" in gated.skipped and "output" in gated.skipped["out"]
    assert "fc1" in gated.skipped and "LayerNorm followed by an activation" in gated.skipped["fc1"]
    assert set(_gated_layers(gated)) == {"model.fc2", "model.fc3"}


def test_gate_rejects_model_without_supported_layer():
    model = nn.Sequential(nn.LayerNorm(5), nn.Tanh())
    with pytest.raises(ValueError, match="no layer lumos can gate.*LayerNorm"):
        lumos.gate(model, torch.randn(2, 5))


@pytest.mark.parametrize("bad, error, match", [
    (torch.randint(0, 3, (4, 5)), TypeError, "floating point"),
    ("not a tensor", TypeError, "example_inputs"),
    (torch.randn(4, 7), ValueError, "example_inputs"),
])
def test_gate_rejects_bad_example_inputs(bad, error, match):
    model = nn.Sequential(nn.Linear(5, 8), nn.ReLU(), nn.Linear(8, 1))
    with pytest.raises(error, match=match):
        lumos.gate(model, bad)


class DataDependent(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(4, 8), nn.Linear(8, 1)

    def forward(self, x):
        h = self.fc1(x)
        if h.sum() > 0:  # Python control flow on a tensor value: fx cannot follow it
            h = torch.relu(h)
        return self.fc2(h)


def test_untraceable_model_error_names_the_fix():
    with pytest.raises(lumos.TraceError, match="leaf_modules"):
        lumos.gate(DataDependent(), torch.randn(3, 4))


def test_compact_rejects_non_module():
    with pytest.raises(TypeError, match="gated"):
        lumos.compact("model", torch.randn(2, 3))


class ChannelWrite(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(4, 8), nn.Linear(8, 1)

    def forward(self, x):
        h = torch.relu(self.fc1(x))
        h[:, :3] = 0.0  # in-place write into some channels
        return self.fc2(h)


class ChannelSlice(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(4, 8), nn.Linear(3, 1)

    def forward(self, x):
        h = torch.relu(self.fc1(x))
        h.narrow(1, 0, 3).mul_(2.0)  # in-place on a channel slice
        return self.fc2(h[:, 2:5])


def test_in_place_channel_write_error_names_the_fix():
    with pytest.raises(lumos.TraceError, match="item assignment.*leaf_modules"):
        lumos.gate(ChannelWrite(), torch.randn(3, 4))


def test_channel_slicing_keeps_the_sliced_layer_whole_and_exact():
    x = torch.randn(6, 4)
    gated = lumos.gate(ChannelSlice(), x)
    assert "fc1" in gated.skipped and "needs every channel" in gated.skipped["fc1"]
    randomize_gates(gated, seed=1)
    compacted = lumos.compact(gated, x)
    torch.testing.assert_close(compacted(x), gated.eval()(x), atol=ATOL, rtol=1e-5)
    assert compacted.get_submodule("fc1").out_features == 8


class SharedLayer(nn.Module):
    """One linear layer applied to two branches that keep different channels."""

    def __init__(self):
        super().__init__()
        self.a1, self.a2 = nn.Linear(4, 8), nn.Linear(4, 8)
        self.shared, self.head = nn.Linear(8, 8), nn.Linear(8, 1)

    def forward(self, x):
        return self.head(self.shared(torch.relu(self.a1(x))) + self.shared(torch.relu(self.a2(x))))


def test_module_called_twice_is_kept_whole_exact_and_counted_once():
    x = torch.randn(6, 4)
    gated = lumos.gate(SharedLayer(), x)
    assert "called more than once" in gated.skipped["shared"]
    randomize_gates(gated, seed=2)
    compacted = lumos.compact(gated, x)
    torch.testing.assert_close(compacted(x), gated.eval()(x), atol=ATOL, rtol=1e-5)
    assert sum(p.numel() for p in compacted.parameters()) == lumos.report(gated).params_after


class NamedLikeLumos(nn.Module):
    def __init__(self):
        super().__init__()
        self.feature_gate = nn.Linear(5, 9)  # the user's own layer with lumos' internal name
        self.head = nn.Sequential(nn.ReLU(), nn.Linear(9, 1))

    def forward(self, x):
        return self.head(self.feature_gate(x))


def test_user_submodule_named_feature_gate_survives_compaction():
    x = torch.randn(6, 5)
    gated = lumos.gate(NamedLikeLumos(), x)
    randomize_gates(gated, seed=3)
    compacted = lumos.compact(gated, x)
    torch.testing.assert_close(compacted(x), gated.eval()(x), atol=ATOL, rtol=1e-5)


class Clipped(nn.Module):
    def forward(self, h):
        return h if h.abs().max() < 1e6 else h.clamp(-1e6, 1e6)  # untraceable control flow


class WithClip(nn.Module):
    def __init__(self):
        super().__init__()
        self.l1, self.clip, self.head = nn.Linear(4, 8), Clipped(), nn.Linear(8, 1)

    def forward(self, x):
        return self.head(self.clip(torch.relu(self.l1(x))))


def test_trace_error_names_the_submodule_and_leaf_modules_carry_through_training():
    x, y = torch.randn(32, 4), torch.randn(32, 1)
    with pytest.raises(lumos.TraceError, match=r'submodule `clip`.*leaf_modules=\["clip"\]'):
        lumos.gate(WithClip(), x)
    gated = lumos.gate(WithClip(), x, leaf_modules=["clip"])
    lumos.fit(gated, (x, y), epochs=1, target=0.5, progress=False)  # the penalty traces with them too
    compacted = lumos.compact(gated)
    torch.testing.assert_close(compacted(x), gated.eval()(x), atol=ATOL, rtol=1e-5)


class NoisyLinear(nn.Linear):
    def forward(self, x):
        return super().forward(x) + 0.1 * x.sum(-1, keepdim=True)


def test_leaf_subclass_of_a_known_layer_stays_whole():
    model = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), NoisyLinear(6, 6), nn.ReLU(), nn.Linear(6, 1))
    x = torch.randn(5, 4)
    gated = lumos.gate(model, x, leaf_modules=[NoisyLinear])
    randomize_gates(gated, seed=1)
    compacted = lumos.compact(gated)
    torch.testing.assert_close(compacted(x), gated.eval()(x), atol=ATOL, rtol=1e-5)
    assert isinstance(compacted.get_submodule("2"), NoisyLinear)


@pytest.mark.parametrize("make, shape", [(lambda: nn.Linear(6, 2), (64, 6)),
                                         (lambda: nn.Conv1d(6, 3, 3, padding=1), (64, 6, 10))])
def test_a_bare_layer_is_gated_on_its_inputs_and_compacts_exactly(make, shape):
    """A linear model (one nn.Linear, or one conv) is gated on its input features, not refused
    nor left with a cost model that has no layer: torch.fx sees a bare layer's forward as a
    function call, so lumos.gate wraps it."""
    torch.manual_seed(0)
    x = torch.randn(*shape)
    gated = lumos.gate(make(), x[:8], feature_dim=1)
    assert 0 < lumos.min_fraction(gated) < 1  # the input columns can go, the output width cannot
    with torch.no_grad():
        gated.feature_gate.gate.log_alpha[[1, 4]] = lumos.gates.LOG_ALPHA_MIN
    small = lumos.compact(gated.eval())
    fresh = torch.randn(5, *shape[1:-1], shape[-1] + 3) if len(shape) == 3 else torch.randn(5, 6)
    torch.testing.assert_close(small(fresh), gated(fresh))
    assert sum(p.numel() for p in small.parameters()) < sum(p.numel() for p in make().parameters())
