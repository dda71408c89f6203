"""The permutation test of kept inputs (lumos.train.input_test): on models whose use of each
input is set by hand, it closes exactly the inputs whose values the model does not use, keeps
both copies of an input the model reads twice, never closes the last input, is a pure function
of model, data and seed, and leaves the model as it found it. fit runs it at the lock
(tests/test_workloads_feature_selection.py has the built-in workloads)."""
import pytest
import torch
from torch import nn

import lumos
from lumos.train.input_test import permutation_test


def linear_gated(weight: list[float], rows: int = 512, seed: int = 0, copy: bool = False):
    """A gated ``Linear(4, 1)`` with ``weight`` set by hand and data ``y = 2 x0 - x1`` (plus noise);
    ``copy``: ``x1`` is ``x0`` again. Every gate open. Returns ``(gated, x, y)``."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, 4, generator=gen)
    if copy:
        x[:, 1] = x[:, 0]
    y = (2 * x[:, :1] - x[:, 1:2]) + 0.1 * torch.randn(rows, 1, generator=gen)
    model = nn.Sequential(nn.Linear(4, 1))
    with torch.no_grad():
        model[0].weight.copy_(torch.tensor([weight]))
        model[0].bias.zero_()
    gated = lumos.gate(model, x[:8], feature_names=["a", "b", "noise", "unused"])
    return gated, x, y


@pytest.mark.parametrize("seed", range(5))
def test_inputs_the_model_does_not_use_are_closed_and_the_others_kept(seed):
    # "noise" is read with weight 0.3 but carries nothing: shuffling it changes no row's expected
    # loss; "unused" has weight 0: shuffling it changes nothing at all
    gated, x, y = linear_gated([2.0, -1.0, 0.3, 0.0], seed=seed)
    dropped = lumos.drop_unneeded_inputs_(gated, (x, y))
    assert sorted(d["name"] for d in dropped) == ["noise", "unused"]
    assert lumos.report(gated).kept_features == ["a", "b"]
    assert all(d["z"] < 2 for d in dropped)


def test_needed_inputs_rise_far_above_the_threshold_and_a_constant_effect_is_zero():
    gated, x, y = linear_gated([2.0, -1.0, 0.3, 0.0])
    result = permutation_test(gated, (x, y), nn.functional.mse_loss)
    assert result[0]["z"] > 10 and result[1]["z"] > 10
    assert result[0]["rise"] > 1  # shuffling a (weight 2) adds about 8 to a loss of about 0.1
    assert result[3] == {"rise": 0.0, "z": 0.0}


@pytest.mark.parametrize("seed", range(5))
def test_a_useless_input_the_model_leans_on_falls_below_zero_once_its_value_is_integrated_out(seed):
    # "noise" (variance 1) read with weight 0.3 on top of residual noise 0.1: the model's loss is
    # 0.09 + 0.01. Averaging the prediction over K = 3 shufflings leaves 0.09 / 3 of the injected
    # variance: expected relative rise (0.03 + 0.01) / 0.1 - 1 = -0.6, far below 0 in z; the
    # average of the shuffled losses (classic permutation importance) has expected rise 0, and its
    # z is noise around 0 that a lucky pairing of rows pushes above the threshold now and then
    from lumos.train.input_test import PERMUTATIONS, Z_KEEP

    gated, x, y = linear_gated([2.0, -1.0, 0.3, 0.0], rows=2048, seed=seed)
    integrated = permutation_test(gated, (x, y), nn.functional.mse_loss, [2])[2]
    classic = permutation_test(gated, (x, y), nn.functional.mse_loss, [2], average_outputs=False)[2]
    expected = (0.09 / PERMUTATIONS + 0.01) / 0.1 - 1
    assert abs(integrated["rise"] - expected) < 0.1
    assert integrated["z"] < -3 * Z_KEEP
    assert abs(classic["rise"]) < 0.1 and abs(classic["z"]) < 4


def test_integrating_out_works_for_a_classifier_and_keeps_what_it_needs():
    # cross-entropy is convex in the logits, so averaging them can only lower the loss of a useless input
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2048, 3, generator=gen)
    y = (x[:, 0] > 0).long()
    model = nn.Sequential(nn.Linear(3, 2))
    with torch.no_grad():
        model[0].weight.copy_(torch.tensor([[-3.0, 0.0, -1.0], [3.0, 0.0, 1.0]]))  # reads x2, which says nothing
        model[0].bias.zero_()
    gated = lumos.gate(model, x[:8], feature_names=["signal", "unused", "noise"])
    result = permutation_test(gated, (x, y), nn.functional.cross_entropy)
    assert result[0]["z"] > 10 and result[1] == {"rise": 0.0, "z": 0.0} and result[2]["z"] < -2
    lumos.drop_unneeded_inputs_(gated, (x, y), nn.functional.cross_entropy)
    assert lumos.report(gated).kept_features == ["signal"]


def test_an_input_read_twice_is_kept_twice_and_an_unread_copy_is_closed():
    both, x, y = linear_gated([1.0, 0.0, 0.0, 0.0], copy=True)  # y = x0: a and b are the same column
    with torch.no_grad():
        both.model[0].weight.copy_(torch.tensor([[0.5, 0.5, 0.0, 0.0]]))
    lumos.drop_unneeded_inputs_(both, (x, y))
    assert lumos.report(both).kept_features == ["a", "b"]

    once, x, y = linear_gated([1.0, 0.0, 0.0, 0.0], copy=True)
    lumos.drop_unneeded_inputs_(once, (x, y))
    assert lumos.report(once).kept_features == ["a"]


def test_the_last_kept_input_is_never_closed():
    gated, x, y = linear_gated([0.0, 0.0, 0.0, 0.0])
    dropped = lumos.drop_unneeded_inputs_(gated, (x, y))
    assert len(dropped) == 3 and len(lumos.report(gated).kept_features) == 1


def test_the_test_is_a_pure_function_and_leaves_the_model_as_it_was():
    gated, x, y = linear_gated([2.0, -1.0, 0.3, 0.0])
    gated.train()
    first = permutation_test(gated, (x, y), nn.functional.mse_loss, seed=3)
    again = permutation_test(gated, (x, y), nn.functional.mse_loss, seed=3)
    assert first == again
    assert gated.training and not gated.feature_gate._forward_pre_hooks
    other = permutation_test(gated, (x, y), nn.functional.mse_loss, seed=4)
    assert other[2]["z"] != first[2]["z"]  # another seed, other shufflings


def test_convolution_channels_and_a_loader_are_tested_like_columns():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(64, 3, 8, 8, generator=gen)
    y = x[:, :1] - x[:, 1:2]
    conv = nn.Sequential(nn.Conv2d(3, 1, 1, bias=False))
    with torch.no_grad():
        conv[0].weight.copy_(torch.tensor([1.0, -1.0, 0.5]).reshape(1, 3, 1, 1))
    gated = lumos.gate(conv, x[:4], feature_names=["u", "v", "dark"], feature_dim=1)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=16)
    dropped = lumos.drop_unneeded_inputs_(gated, loader)
    assert [d["name"] for d in dropped] == ["dark"]
    assert lumos.report(gated).kept_features == ["u", "v"]


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="drop_unneeded_inputs_: `model` has no input FeatureGate"):
        lumos.drop_unneeded_inputs_(nn.Linear(2, 1), (torch.randn(4, 2), torch.randn(4, 1)))
    with pytest.raises(TypeError, match="`model` must be an nn.Module"):
        lumos.drop_unneeded_inputs_("model", None)
    gated, x, y = linear_gated([1.0, 0.0, 0.0, 0.0])
    with pytest.raises(ValueError, match="`data` must be"):
        lumos.drop_unneeded_inputs_(gated, None)
    with pytest.raises(ValueError, match="no batch of 2 rows"):
        permutation_test(gated, (x[:1], y[:1]), nn.functional.mse_loss)
    with pytest.raises(TypeError, match="`test_inputs` must be True or False"):
        lumos.fit(gated, (x, y), epochs=1, target=0.5, test_inputs="yes", progress=False)


@pytest.mark.filterwarnings("ignore:lumos.fit. the budget anneals over")
def test_fit_does_nothing_without_a_target_or_when_told_not_to():
    gated, x, y = linear_gated([2.0, -1.0, 0.3, 0.0])
    history = lumos.fit(gated, (x, y), epochs=2, progress=False)  # no target: no lock, no test
    assert history.inputs_dropped is None
    gated, x, y = linear_gated([2.0, -1.0, 0.3, 0.0])
    history = lumos.fit(gated, (x, y), (x, y), epochs=2, target=0.9, test_inputs=False, progress=False)
    assert history.inputs_dropped is None
