"""The pruning baselines of ``lumos bench``: L1-norm structured, Torch-Pruning, unstructured masks."""
import builtins
import warnings

import pytest
import torch
from torch import nn

from lumos import workloads
from lumos.evaluation import baselines
from lumos.pipeline import example_inputs
from lumos.report import count_params

ALL = workloads.available()


def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 12), nn.ReLU(), nn.Linear(12, 2)).eval()


def test_l1_structured_keeps_the_largest_l1_units_of_every_layer_with_their_weights():
    dense = _mlp()
    x = torch.randn(32, 6)
    pruned = baselines.L1Structured(dense, (x,))(0.5)
    keep0 = torch.topk(dense[0].weight.abs().sum(1), 8).indices.sort().values
    keep1 = torch.topk(dense[2].weight.abs().sum(1), 6).indices.sort().values
    # the same function as the dense model with every other unit's output zeroed
    h = torch.relu(dense[0](x))
    h = h * torch.zeros(16).index_fill_(0, keep0, 1.0)
    h = torch.relu(dense[2](h)) * torch.zeros(12).index_fill_(0, keep1, 1.0)
    torch.testing.assert_close(pruned(x), dense[4](h), atol=1e-5, rtol=1e-5)
    assert count_params(pruned) == 6 * 8 + 8 + 8 * 6 + 6 + 6 * 2 + 2


@pytest.mark.parametrize("name", ALL)
def test_every_baseline_builds_a_working_pruned_model(name):
    work = workloads.load(name, "small")
    torch.manual_seed(0)
    dense = work.make_model().eval()
    example, inputs = example_inputs(work), work.inputs("val", 9)
    total = count_params(dense)
    expected = dense(*inputs).shape
    searches = {"l1_structured": baselines.L1Structured(dense, example)}
    try:
        searches["torch_pruning"] = baselines.torch_pruning(dense, example)
    except ImportError:
        pass
    for method, search in searches.items():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # Torch-Pruning's notes on unwrapped parameters
            model = search(0.6)
        assert model(*inputs).shape == expected, method
        assert count_params(model) < 0.75 * total, method  # really pruned (a ViT's residual stream may stay)
    masked = baselines.unstructured_mask(dense, 0.3)
    assert baselines.nonzero_params(masked) / total == pytest.approx(0.3, abs=0.01)
    assert masked(*inputs).shape == expected


def test_match_fraction_finds_the_closest_size_even_when_size_is_not_monotone():
    def kept_at(ratio):  # falls, dips far below the target (an over-pruned group), then falls again
        if ratio < 0.45:
            return 1 - ratio
        return 0.05 if ratio < 0.55 else 1.08 - ratio

    def prune(ratio):
        return nn.Linear(1, max(1, round(1000 * kept_at(ratio))), bias=False)

    model, ratio, kept = baselines.match_fraction(prune, 0.2, 1000)
    assert abs(kept - 0.2) <= 0.005 and ratio > 0.55  # plain bisection would stop at the dip
    assert kept == count_params(model) / 1000


def test_unstructured_mask_fine_tunes_an_attention_model_and_masks_become_permanent_zeros():
    work = workloads.load("vit_fields", "small")
    torch.manual_seed(0)
    model = baselines.unstructured_mask(work.make_model(), 0.3)
    x, y = work.train[0][:16], work.train[1][:16]
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(3):  # nn.MultiheadAttention reads out_proj.weight directly: masks must still apply
        loss = nn.functional.cross_entropy(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    kept = baselines.nonzero_params(model)
    out = model.eval()(x)
    baselines.make_masks_permanent(model)
    assert not any(hasattr(m, "weight_mask") or hasattr(m, "in_proj_weight_mask") for m in model.modules())
    assert all(not m._forward_pre_hooks for m in model.modules())
    torch.testing.assert_close(model(x), out)
    zeros = sum(int((p == 0).sum()) for _, p in model.named_parameters() if p.dim() > 1)
    assert count_params(model) - zeros <= kept


def test_output_layers_are_the_ones_producing_the_model_output():
    dense = _mlp()
    assert baselines.output_layers(dense, (torch.randn(3, 6),)) == [dense[4]]


def test_torch_pruning_missing_names_the_extra(monkeypatch):
    real_import = builtins.__import__

    def fake_import(name, *args, **kwargs):
        if name == "torch_pruning":
            raise ImportError("No module named 'torch_pruning'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", fake_import)
    with pytest.raises(ImportError, match=r"pip install 'lumos\[pruning\]'"):
        baselines.torch_pruning(_mlp(), (torch.randn(3, 6),))
