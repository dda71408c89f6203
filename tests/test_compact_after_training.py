"""Compaction of trained models: every architecture of ``zoo_architectures`` trained with
``lumos.fit`` towards a budget (two seeds), then compacted, computes what the gated model computes
on inputs of another batch size and (where the model allows it) another image size or sequence
length, and ends within its budget.

``test_compact_architectures.py`` closes a random half of every gate; here the gates, the norm
statistics and the lock's scales come from training (shared gates, units pinned at their eval
values or at 1, scales folded into the weights).
"""
from __future__ import annotations

import warnings

import pytest
import torch

import lumos
from zoo_architectures import architectures, relative_error

ZOO = architectures()
TARGET = 0.3
REL_TOL = 1e-5  # float32: ||compacted(x) - gated(x)|| / ||gated(x)||

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def trained(name: str, seed: int) -> tuple:
    """``(gated, example inputs)``: the zoo model gated and trained 12 epochs of 6 batches towards
    ``TARGET`` on targets near its own initial outputs."""
    arch = ZOO[name]
    inputs = arch.make_inputs(96, arch.example_size, seed)
    torch.manual_seed(seed)
    with torch.no_grad():
        out = arch.factory(1).eval()(*inputs)
    target = out + out.std() * torch.randn(out.shape, generator=torch.Generator().manual_seed(seed))
    torch.manual_seed(seed)
    example = tuple(t[:4] for t in inputs)
    gated = lumos.gate(arch.factory(1), example, feature_dim=arch.feature_dim)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a run this short is warned about
        lumos.fit(gated, (inputs if len(inputs) > 1 else inputs[0], target), epochs=12, lr=2e-3, batch_size=16,
                  target=TARGET, seed=seed, progress=False)
    return gated, example


@pytest.mark.slow
@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("name", list(ZOO))
def test_trained_model_compacts_exactly_within_budget(name, seed):
    gated, example = trained(name, seed)
    compacted = lumos.compact(gated, example)
    gated.eval()
    fresh = ZOO[name].fresh_inputs()
    with torch.no_grad():
        expected, actual = gated(*fresh), compacted(*fresh)
    assert actual.shape == expected.shape
    error = relative_error(actual, expected)
    assert error <= REL_TOL, f"{name}, seed {seed}: relative error {error:.2e} on fresh inputs"
    assert lumos.kept_fraction(gated) <= TARGET + 0.02, f"{name}, seed {seed}: {lumos.kept_fraction(gated):.3f} kept"
