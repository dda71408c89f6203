"""HardConcreteGate, GatedLinear and FeatureGate: semantics, parameters, errors, serialisation."""
import io

import pytest
import torch
from torch import nn

import lumos
from lumos.gates import LOG_ALPHA_MAX, LOG_ALPHA_MIN, HardConcreteGate
from lumos.nn import FeatureGate, GatedLinear


def test_gate_defaults_match_design():
    gate = HardConcreteGate(5)
    assert (gate.t_l, gate.t_u, gate.beta, gate.gamma, gate.zeta) == (0.05, 0.95, 2 / 3, -0.1, 1.1)
    # log(1 - 0.5) - log(0.5) = 0 plus N(0, 0.01) noise
    assert gate.log_alpha.abs().max() < 0.1


def test_gate_training_samples_vary_eval_is_fixed():
    gate = HardConcreteGate(200)
    a, b = gate(), gate()
    assert not torch.equal(a, b)
    gate.eval()
    assert torch.equal(gate(), gate())
    torch.testing.assert_close(gate(), gate.eval_mask())


def test_gate_eval_applies_thresholds_not_z_hat_everywhere():
    gate = HardConcreteGate(3).eval()
    with torch.no_grad():
        gate.log_alpha.copy_(torch.tensor([4.0, 0.0, -4.6]))
    m = gate().detach()
    assert m[0] == 1.0  # z_hat would be about 1 anyway, p_open > t_u pins it to 1 exactly
    assert 0 < m[1] < 1 and float(m[1]) == pytest.approx(float(gate.z_hat()[1].detach()))
    assert m[2] == 0.0
    assert gate.kept().tolist() == [True, True, False]


def test_gate_clamp_keeps_logits_in_reference_range():
    gate = HardConcreteGate(2)
    with torch.no_grad():
        gate.log_alpha.copy_(torch.tensor([-50.0, 50.0]))
    gate.clamp_()
    assert gate.log_alpha.tolist() == pytest.approx([LOG_ALPHA_MIN, LOG_ALPHA_MAX])


@pytest.mark.parametrize("kwargs", [dict(n=0), dict(n=3, init_drop_rate=1.0), dict(n=3, t_l=0.5, t_u=0.4)])
def test_gate_rejects_bad_arguments(kwargs):
    with pytest.raises(ValueError):
        HardConcreteGate(**kwargs)


def test_gated_linear_has_linear_names_and_init():
    torch.manual_seed(3)
    plain = nn.Linear(7, 5)
    torch.manual_seed(3)
    gated = GatedLinear(7, 5)
    torch.testing.assert_close(gated.weight, plain.weight)
    torch.testing.assert_close(gated.bias, plain.bias)
    names = {n for n, _ in gated.named_parameters()}
    assert {"weight", "bias", "out_gate.log_alpha"} == names


def test_gated_linear_with_open_gates_equals_linear():
    plain = nn.Linear(4, 6)
    gated = GatedLinear.from_linear(plain, gate_in=True).eval()
    with torch.no_grad():
        gated.out_gate.log_alpha.fill_(4.0)
        gated.in_gate.log_alpha.fill_(4.0)
    x = torch.randn(3, 2, 4)
    torch.testing.assert_close(gated(x), plain(x))


def test_gated_linear_rejects_wrong_width():
    with pytest.raises(ValueError, match=r"\(\*, 4\)"):
        GatedLinear(4, 2)(torch.randn(3, 5))


def test_feature_gate_names_and_errors():
    fg = FeatureGate(3, ["a", "b", "c"])
    with torch.no_grad():
        fg.gate.log_alpha.copy_(torch.tensor([4.0, -8.0, 4.0]))
    assert fg.kept_features() == ["a", "c"]
    fg.eval()
    x = torch.randn(5, 3)
    torch.testing.assert_close(fg(x), x * torch.tensor([1.0, 0.0, 1.0]))
    with pytest.raises(ValueError, match="3 features"):
        fg(torch.randn(5, 4))
    with pytest.raises(TypeError, match="floating"):
        fg(torch.ones(5, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="feature_names"):
        FeatureGate(3, ["a"])


def test_gated_model_state_dict_round_trip():
    model = nn.Sequential(nn.Linear(5, 16), nn.ReLU(), nn.Linear(16, 2))
    x = torch.randn(8, 5)
    gated = lumos.gate(model, x, feature_names=list("abcde"))
    with torch.no_grad():
        for _, gate in lumos.gates_of(gated):
            gate.log_alpha.uniform_(-3, 3)
    buffer = io.BytesIO()
    torch.save(gated.state_dict(), buffer)
    buffer.seek(0)
    fresh = lumos.gate(model, x, feature_names=list("abcde"))
    fresh.load_state_dict(torch.load(buffer))
    torch.testing.assert_close(fresh.eval()(x), gated.eval()(x))
    assert lumos.report(fresh).kept_features == lumos.report(gated).kept_features


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_16_bit_gated_linear_trains_with_fp32_gates(dtype):
    layer = GatedLinear(6, 4, gate_in=True, dtype=dtype)
    x = torch.randn(5, 6, dtype=dtype)
    out = layer(x)
    assert out.dtype == dtype
    out.float().sum().backward()
    assert layer.weight.grad.dtype == dtype
    assert layer.out_gate.log_alpha.grad.dtype == torch.float32
    assert layer.in_gate.log_alpha.grad.dtype == torch.float32


def test_mask_is_drawn_once_per_step_so_checkpointing_recomputes_the_same():
    model = nn.Sequential(nn.Linear(5, 16), nn.ReLU(), nn.Linear(16, 1))
    x = torch.randn(8, 5)
    gated = lumos.gate(model, x).train()
    layer = gated.model[0]

    def run(checkpointed: bool):
        gated.zero_grad()
        torch.manual_seed(3)
        if checkpointed:
            lumos.gates.sample_gates([g for _, g in lumos.gates_of(gated)])
            h = gated.feature_gate(x)
            h = torch.utils.checkpoint.checkpoint(layer, h, use_reentrant=False)
            out = gated.model[2](torch.relu(h))
        else:
            out = gated(x)
        out.sum().backward()
        return {n: p.grad.clone() for n, p in gated.named_parameters()}

    plain, checkpointed = run(False), run(True)
    for name in plain:
        torch.testing.assert_close(checkpointed[name], plain[name], msg=name)
    first, second = layer.out_gate(), layer.out_gate()
    assert torch.equal(first, second)  # a second call in the same step: the same mask
