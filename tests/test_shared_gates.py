"""Layers whose outputs are the same channels share one output gate (``lumos.gate``'s
``share_gates``): the producers a residual add sums into one stream (SRResNet, MobileNetV2).

Checked: which layers share; that the gated model still equals the user's model at step 0; that the
L0 penalty's gradient reaches the shared gate with the channel's whole cost (with a gate per layer
it is about 0, so the stream could not shrink); that closing a shared channel removes it from every
producer and the compacted model stays exact on other batch and image sizes; that the budget lock's
scales fold into every user of a shared gate; that a state_dict round-trips and an interrupted
``lumos.fit`` resumes to the bit; and that ``lumos.fit`` on an SRResNet keeps both needed inputs on
three seeds (with a gate per layer the same runs end as constant models).
"""
import pytest
import torch
from torch import nn

import lumos
from lumos.cost import cost_model
from lumos.gates import fold_lock_scales_
from lumos.report import count_params
from test_compact_channel_ops import SRResNet
from zoo_architectures import MobileNetV2, close_half_of_every_gate, relative_error
from zoo_training import two_field_superres

pytestmark = pytest.mark.usefixtures("one_torch_thread")

RESIDUAL_PRODUCERS = ["blocks.0.body.3", "blocks.1.body.3", "merge.0"]  # they add into head.0's channels


def gated_srresnet(**options) -> nn.Module:
    torch.manual_seed(0)
    return lumos.gate(SRResNet(8, 2), torch.randn(4, 3, 12, 12), feature_names=["u", "v", "noise"],
                      feature_dim=1, **options)


def assert_compacts_exactly(gated: nn.Module, shapes) -> nn.Module:
    """``lumos.compact(gated)``, checked equal to ``gated`` in eval mode on inputs of ``shapes``."""
    gated.eval()
    small = lumos.compact(gated)
    for shape in shapes:
        x = torch.randn(shape)
        with torch.no_grad():
            assert relative_error(small(x), gated(x)) < 1e-5
    return small


def test_residual_producers_share_the_stream_gate():
    gated = gated_srresnet()
    assert gated.shared_gates == {name: "head.0" for name in RESIDUAL_PRODUCERS}
    stream = gated.model.head[0].out_gate
    for name in RESIDUAL_PRODUCERS:
        assert gated.model.get_submodule(name).out_gate is stream
    gate_of = {row["name"]: row["gate_of"] for row in lumos.report(gated).layers}
    assert gate_of == {"head.0": None, "blocks.0.body.0": None, "blocks.1.body.0": None, "upsample.0": None,
                       "tail": None, **{name: "head.0" for name in RESIDUAL_PRODUCERS}}
    names = [name for name, _ in lumos.gates_of(gated)]
    assert names == ["model.head.0.out_gate", "model.blocks.0.body.0.out_gate", "model.blocks.1.body.0.out_gate",
                     "model.upsample.0.out_gate", "feature_gate.gate"]
    assert sum(p.numel() for p in gated.parameters()) == \
        sum(p.numel() for p in SRResNet(8, 2).parameters()) + sum(g.n for _, g in lumos.gates_of(gated))


def test_a_gate_per_layer_on_request():
    gated = gated_srresnet(share_gates=False)
    assert gated.shared_gates == {}
    assert len(lumos.gates_of(gated)) == 8
    with pytest.raises(TypeError, match="lumos.gate: `share_gates` must be True or False"):
        gated_srresnet(share_gates="yes")


def test_gated_model_equals_the_users_model_at_step_zero():
    torch.manual_seed(0)
    model = SRResNet(8, 2).eval()
    x = torch.randn(4, 3, 12, 12)
    gated = lumos.gate(model, x, feature_dim=1).eval()
    with torch.no_grad():
        assert torch.equal(gated(x), model(x))


def test_the_penalty_reaches_the_shared_stream_gate():
    """With every unit at the same p_open, the expected cost's gradient on the stream's gate is
    the channel's cost in every layer it feeds; with a gate per producer it is nearly 0."""
    gradients = {}
    for share in (True, False):
        gated = gated_srresnet(share_gates=share)
        with torch.no_grad():
            for _, gate in lumos.gates_of(gated):
                gate.log_alpha.zero_()
        cost_model(gated).expected("params").backward()
        gradients[share] = {name: gate.log_alpha.grad.mean().item() for name, gate in lumos.gates_of(gated)}
    shared, separate = gradients[True], gradients[False]
    block_conv = shared["model.blocks.0.body.0.out_gate"]
    assert shared["model.head.0.out_gate"] > 2 * block_conv
    assert separate["model.head.0.out_gate"] < 0.1 * block_conv
    for name in RESIDUAL_PRODUCERS:
        assert separate[f"model.{name}.out_gate"] < 0.1 * block_conv


def test_closing_a_shared_channel_removes_it_everywhere_and_compaction_stays_exact():
    gated = gated_srresnet()
    close_half_of_every_gate(gated, seed=3)
    gated.eval()
    small = assert_compacts_exactly(gated, ((1, 3, 12, 12), (5, 3, 20, 16)))
    kept = int(gated.model.head[0].out_gate.kept().sum())
    assert kept == 4
    for name in ["head.0", *RESIDUAL_PRODUCERS]:
        assert small.get_submodule(name).out_channels == kept
    assert count_params(small) < count_params(gated_srresnet(share_gates=False)) / 2


def test_inverted_residual_projections_share_the_stream_gate():
    """MobileNetV2: each block's projecting 1x1 conv adds into the stream of the block before it
    where the shapes allow (stride 1, same width), the first block's into the stem's."""
    torch.manual_seed(0)
    model = MobileNetV2()
    x = torch.randn(2, 3, 32, 32)
    gated = lumos.gate(model, x, feature_dim=1)
    residual = [name for name, m in model.named_modules() if getattr(m, "use_res_connect", False)]
    assert gated.shared_gates == {"features.1.conv.1": "features.0.0", "features.3.conv.2": "features.2.conv.2",
                                  "features.5.conv.2": "features.4.conv.2"}, residual
    for name, owner in gated.shared_gates.items():
        assert gated.model.get_submodule(name).out_gate is gated.model.get_submodule(owner).out_gate
    close_half_of_every_gate(gated, seed=1)
    assert_compacts_exactly(gated, ((3, 3, 32, 32), (1, 3, 40, 24)))


def test_lock_scales_fold_into_every_user_of_a_shared_gate():
    gated = gated_srresnet()
    close_half_of_every_gate(gated, seed=2)
    stream = gated.model.head[0].out_gate
    with torch.no_grad():
        stream.lock_scale.copy_(torch.linspace(0.2, 0.9, stream.n))
        for _, gate in lumos.gates_of(gated):
            if gate is not stream:
                gate.lock_scale.uniform_(0.3, 1.0)
    gated.gate_sampler.scaled = True  # what pinning sets: the masks now carry the scales
    gated.eval()
    x = torch.randn(3, 3, 12, 12)
    with torch.no_grad():
        before = gated(x)
        fold_lock_scales_(gated)
        after = gated(x)
    assert torch.equal(stream.lock_scale, torch.ones_like(stream.lock_scale))
    assert relative_error(after, before) < 1e-5


def test_state_dict_round_trip():
    gated = gated_srresnet()
    close_half_of_every_gate(gated, seed=4)
    fresh = gated_srresnet()
    fresh.load_state_dict(gated.state_dict())
    assert fresh.model.blocks[0].body[3].out_gate is fresh.model.head[0].out_gate
    gated.eval(), fresh.eval()
    x = torch.randn(2, 3, 12, 12)
    with torch.no_grad():
        assert torch.equal(fresh(x), gated(x))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_srresnet_training_keeps_both_needed_inputs(seed):
    """x2 super-resolution of two fields ``u``, ``v`` (the target needs both) plus a noise channel,
    ``lumos.fit(target=0.3)``, 640 steps: both fields kept, the noise dropped, the budget met, the
    validation loss near the dense model's (about 0.04 here; a model without ``u`` or ``v`` is
    about 0.2, a constant 0.37), and compaction exact. With ``share_gates=False`` these three
    seeds end as a constant model (every input gate closed)."""
    x, y = two_field_superres(256, seed, size=8)
    val = two_field_superres(128, seed + 50, size=8)
    torch.manual_seed(seed)
    gated = lumos.gate(SRResNet(8, 2), x[:8], feature_names=["u", "v", "noise"], feature_dim=1)
    history = lumos.fit(gated, (x, y), val, target=0.3, epochs=40, lr=2e-3, batch_size=16, seed=seed,
                        progress=False)
    assert lumos.report(gated).kept_features == ["u", "v"]
    assert abs(lumos.kept_fraction(gated) - 0.3) <= 0.02 and history.target_met
    assert lumos.evaluate(gated, val)[0] < 0.1
    assert_compacts_exactly(gated, ((3, 3, 8, 8), (2, 3, 12, 10)))


def test_an_interrupted_run_with_shared_gates_resumes_exactly(tmp_path):
    """fit stopped after step 200 (past the lock) and run again from its checkpoint ends with the
    uninterrupted run's weights to the bit, the stream's gate still shared."""
    from test_train_checkpoint import Interrupt, StopAt

    def run(checkpoint=None, stop=None):
        x, y = two_field_superres(128, 0, size=8)
        torch.manual_seed(0)
        gated = lumos.gate(SRResNet(8, 2), x[:8], feature_names=["u", "v", "noise"], feature_dim=1)
        lumos.fit(gated, (x, y), target=0.3, epochs=40, lr=2e-3, batch_size=16, seed=0, progress=False,
                  checkpoint=checkpoint, checkpoint_every=7 if checkpoint else None, callbacks=[StopAt(stop)])
        return gated

    reference = run()
    with pytest.raises(Interrupt):
        run(tmp_path / "run.pt", stop=200)
    resumed = run(tmp_path / "run.pt")
    assert resumed.model.blocks[0].body[3].out_gate is resumed.model.head[0].out_gate
    want, got = reference.state_dict(), resumed.state_dict()
    assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)
