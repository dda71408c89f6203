"""Acceptance of compaction on the architectures people copy (issue 9, acceptance 1).

For every model of ``zoo_architectures``: ``lumos.gate`` puts most of its parameters in gated
layers; with a seeded random half of every gate closed, ``lumos.compact`` returns a model equal
to ``gated.eval()`` on the example inputs and on fresh inputs of another batch size and (where
the model allows it) another image size or sequence length, holding at most 75% of the dense
model's parameters.
"""
from __future__ import annotations

import functools

import pytest
import torch
from torch import nn

import lumos
from zoo_architectures import architectures, close_half_of_every_gate, gated_layer_params, relative_error

ZOO = architectures()
REL_TOL = 1e-5                  # float32: ||compacted(x) - gated(x)|| / ||gated(x)||
MIN_GATED_PARAM_FRACTION = 0.6  # of the dense parameters, inside layers lumos gates
MAX_KEPT_PARAM_FRACTION = 0.75  # of the dense parameters, in the compacted model


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@functools.lru_cache(maxsize=None)
def gated_and_compacted(name: str):
    """``(dense, gated, compacted or the exception compact raised)``; half of every gate closed."""
    arch = ZOO[name]
    dense = arch.build()
    gated = lumos.gate(dense, arch.example_inputs(), feature_dim=arch.feature_dim)
    close_half_of_every_gate(gated, seed=0)
    gated.eval()
    try:
        compacted = lumos.compact(gated, arch.example_inputs())
    except Exception as err:  # reported by the tests that need the compacted model
        compacted = err
    return dense, gated, compacted


def _compacted(name: str):
    dense, gated, compacted = gated_and_compacted(name)
    if isinstance(compacted, Exception):
        raise compacted
    return dense, gated, compacted


@pytest.mark.parametrize("name", list(ZOO))
def test_gate_puts_most_parameters_in_gated_layers(name):
    dense, gated, _ = gated_and_compacted(name)
    print(f"{name}: gated.skipped = {gated.skipped}")
    fraction = gated_layer_params(gated) / n_params(dense)
    assert fraction >= MIN_GATED_PARAM_FRACTION, (
        f"{name}: {fraction:.1%} of the parameters sit in gated layers; skipped: {gated.skipped}")


@pytest.mark.parametrize("name", list(ZOO))
def test_compacted_equals_gated_eval_on_fresh_inputs(name):
    arch = ZOO[name]
    _, gated, compacted = _compacted(name)
    for which, inputs in (("example", arch.example_inputs()), ("fresh", arch.fresh_inputs())):
        with torch.no_grad():
            expected, actual = gated(*inputs), compacted(*inputs)
        assert actual.shape == expected.shape, f"{name}, {which} inputs: shape {actual.shape} != {expected.shape}"
        error = relative_error(actual, expected)
        assert error <= REL_TOL, f"{name}, {which} inputs: relative error {error:.2e} > {REL_TOL:.0e}"


@pytest.mark.parametrize("name", list(ZOO))
def test_compacted_keeps_at_most_three_quarters_of_the_parameters(name):
    dense, _, compacted = _compacted(name)
    fraction = n_params(compacted) / n_params(dense)
    print(f"{name}: compacted keeps {fraction:.1%} of {n_params(dense)} parameters")
    assert fraction <= MAX_KEPT_PARAM_FRACTION, f"{name}: compacted keeps {fraction:.1%} of the parameters"
