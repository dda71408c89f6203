"""HardConcreteGate, GatedLinear and FeatureGate: semantics, parameters, errors, serialisation."""
import io
import math

import pytest
import torch
from torch import nn

import lumos
import lumos_kernels
from lumos.gates import LOG_ALPHA_MAX, LOG_ALPHA_MIN, HardConcreteGate
from lumos.nn import FeatureGate, GatedLinear
from zoo import mlp_zoo


def test_gate_defaults_start_open_with_mask_exactly_one():
    gate = HardConcreteGate(50)
    assert (gate.t_l, gate.t_u, gate.beta, gate.gamma, gate.zeta) == (0.05, 0.95, 2 / 3, -0.1, 1.1)
    # log(1 - 0.1) - log(0.1) = log 9 plus N(0, 0.01) noise: p_open about 0.978, above t_u
    torch.testing.assert_close(gate.log_alpha.detach(), torch.full((50,), math.log(9.0)), atol=0.05, rtol=0)
    assert (gate.p_open() > gate.t_u).all()
    assert torch.equal(gate(), torch.ones(50)) and torch.equal(gate.eval()(), torch.ones(50))


def test_gate_training_mask_is_fixed_within_a_step_and_new_after_it():
    gate = HardConcreteGate(200)
    with torch.no_grad():
        gate.log_alpha.zero_()  # inside the stochastic band
    a, b = gate(), gate()
    assert torch.equal(a, b)  # the same step: the same mask
    gate.sampler.advance()
    assert not torch.equal(gate(), a)
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


def _band_gated_mlp(seed: int = 0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(5, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 1))
    gated = lumos.gate(model, torch.randn(8, 5)).train()
    with torch.no_grad():
        for _, gate in lumos.gates_of(gated):
            gate.log_alpha.uniform_(-2.0, 2.0)  # inside the band: masks are random
    return model, gated


def test_activation_checkpointing_recomputes_the_same_mask():
    _, gated = _band_gated_mlp()
    x = torch.randn(8, 5)
    grads = []
    for checkpointed in (False, True):
        gated.zero_grad()
        if checkpointed:
            def run(h):
                return gated.model(h)
            h = gated.feature_gate(x)
            out = torch.utils.checkpoint.checkpoint(run, h, use_reentrant=False)  # recomputed in backward
        else:
            out = gated(x)
        out.square().sum().backward()
        grads.append({n: p.grad.clone() for n, p in gated.named_parameters()})
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], msg=name)


def test_two_forward_calls_in_one_step_share_masks_and_backward_works():
    _, gated = _band_gated_mlp()
    layer = gated.model[0]
    seen = []
    layer.out_gate.register_forward_hook(lambda module, args, mask: seen.append(mask.detach().clone()))
    loss = gated(torch.randn(8, 5)).square().mean() + gated(torch.randn(6, 5)).abs().mean()
    loss.backward()
    assert len(seen) == 2 and torch.equal(seen[0], seen[1])
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in gated.parameters())
    assert gated.gate_sampler.current is None  # nothing kept from the forward calls


def test_training_mask_is_a_pure_function_of_logits_seed_step_and_offset():
    _, a = _band_gated_mlp(seed=0)
    _, b = _band_gated_mlp(seed=1)  # other weights, other torch RNG history
    b.load_state_dict(a.state_dict())
    x = torch.randn(8, 5)
    torch.manual_seed(7)
    state = torch.get_rng_state()
    out_a = a(x)
    assert torch.equal(torch.get_rng_state(), state)  # masks do not draw from torch's RNG
    torch.manual_seed(99)
    torch.testing.assert_close(b(x), out_a)
    for (_, gate_a), (_, gate_b) in zip(lumos.gates_of(a), lumos.gates_of(b)):
        assert torch.equal(gate_a(), gate_b())  # drawn by the gate itself: the model's numbers
    lumos.step_gates_(a)
    assert a.gate_sampler.step == 1 and not torch.equal(a(x), out_a)
    b.gate_sampler.load_state_dict(a.gate_sampler.state_dict())
    torch.testing.assert_close(b(x), a(x))
    b.gate_sampler.reseed(5)
    assert not torch.equal(b(x), a(x))


def test_model_masks_are_the_step_keys_sampling_and_a_gate_alone_draws_the_same_numbers():
    """The sampler draws many steps' uniforms at once (NOISE_TABLE_STEPS); on every step, after
    a reseed, and at the table's boundaries, the masks are bit for bit ``hard_concrete`` of the
    gates' logits with the step's key, and a gate drawing its own mask gets the same numbers."""
    from lumos.gates import NOISE_TABLE_STEPS, noise_key

    _, gated = _band_gated_mlp()
    sampler = gated.gate_sampler
    logits = torch.cat([gate.log_alpha for gate in sampler.gates])
    steps = list(range(NOISE_TABLE_STEPS + 3)) + [5, 2 * NOISE_TABLE_STEPS - 1]
    for step in steps:
        sampler.reseed(3 if step == 5 else 0, step)
        drawn = sampler.draw(True)
        whole = lumos_kernels.hard_concrete(logits, seed=noise_key(sampler.seed, step), offset=0)
        assert torch.equal(torch.cat(drawn), whole), step
        for gate, mask in zip(sampler.gates, drawn):
            assert torch.equal(gate(), mask), (step, gate.offset)  # drawn outside a forward: the same numbers


def test_gates_are_numbered_one_after_another_in_the_model():
    _, gated = _band_gated_mlp()
    names, gates = zip(*lumos.gates_of(gated))
    assert names == ("model.0.out_gate", "model.2.out_gate", "feature_gate.gate")
    assert [g.offset for g in gates] == [0, 16, 32]
    assert gated.gate_sampler.gates == list(gates)


@pytest.mark.parametrize("name", ["relu_3hidden", "silu_dropout", "residual", "norms_sigmoid"])
def test_gated_model_with_default_gates_equals_the_original_at_step_0(name):
    model, x = mlp_zoo()[name]
    model.train()
    gated = lumos.gate(model, x).train()
    torch.manual_seed(3)
    want = model(x)
    torch.manual_seed(3)  # dropout draws the same numbers
    torch.testing.assert_close(gated(x), want, atol=0, rtol=0)
    model.eval(), gated.eval()
    torch.testing.assert_close(gated(x), model(x), atol=0, rtol=0)


def test_gated_cnn_with_default_gates_equals_the_original_at_step_0():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 3),
                          nn.ReLU(), nn.Flatten(), nn.Linear(8 * 4 * 4, 2)).eval()
    x = torch.randn(4, 3, 6, 6)
    gated = lumos.gate(model, x, feature_dim=1).eval()
    torch.testing.assert_close(gated(x), model(x), atol=0, rtol=0)


def test_step_gates_clamps_logits_and_advances_the_noise():
    _, gated = _band_gated_mlp()
    gate = gated.model[0].out_gate
    with torch.no_grad():
        gate.log_alpha[:2] = torch.tensor([50.0, -50.0])
    lumos.step_gates_(gated)
    assert gate.log_alpha[:2].tolist() == pytest.approx([LOG_ALPHA_MAX, LOG_ALPHA_MIN])
    assert gated.gate_sampler.state_dict() == {"seed": 0, "step": 1}


def test_noise_range_change_regroups_the_sampling_calls():
    _, gated = _band_gated_mlp()
    x = torch.randn(8, 5)
    gated.model[2].out_gate.noise_range = 0.5  # deterministic sigmoid(log_alpha / beta) for this gate
    gated(x)
    layer = gated.model[2]
    s = torch.sigmoid(layer.out_gate.log_alpha / layer.out_gate.beta) * 1.2 - 0.1
    pi = layer.out_gate.p_open()
    want = torch.where(pi > 0.95, 1.0, torch.where(pi <= 0.05, 0.0, s.clamp(0, 1)))
    index = gated.gate_sampler.gates.index(layer.out_gate)
    torch.testing.assert_close(gated.gate_sampler.draw(True)[index], want)
