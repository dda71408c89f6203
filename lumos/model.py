"""GatedModel: a user's model with lumos gates, plus the example inputs it was gated with."""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from .gates import GateSampler, gates_of
from .nn import FeatureGate


def as_input_tuple(example_inputs, who: str, features: bool = True) -> tuple:
    """Normalise ``example_inputs`` (a tensor or a tuple/list of them) to a tuple, checking it.

    ``features``: the first input holds features that a :class:`lumos.nn.FeatureGate` scales, so
    it must be floating point; without one it may be anything a model takes first (token ids)."""
    if isinstance(example_inputs, torch.Tensor):
        example_inputs = (example_inputs,)
    if not isinstance(example_inputs, (tuple, list)) or not example_inputs:
        raise TypeError(
            f"{who}: `example_inputs` must be a tensor or a non-empty tuple of model inputs, "
            f"got {type(example_inputs).__name__}"
        )
    first = example_inputs[0]
    if not isinstance(first, torch.Tensor):
        raise TypeError(f"{who}: the first example input must be a tensor, got {type(first).__name__}")
    if features and not first.is_floating_point():
        raise TypeError(
            f"{who}: the first example input (the features) must be floating point, got {first.dtype}; "
            "convert it with .float(), or pass features=False to lumos.gate (no input feature gate: "
            "token ids, class labels)"
        )
    if first.dim() == 0:
        raise ValueError(f"{who}: the first example input must have a feature dimension, got a scalar")
    return tuple(example_inputs)


class GatedModel(nn.Module):
    """The result of :func:`lumos.gate`: ``model`` (with gated layers) behind an input ``feature_gate``.

    ``forward(x, *args, **kwargs)`` gates the features of ``x`` on ``feature_dim`` and calls
    ``model``. ``example_inputs`` (kept off the state_dict) let :func:`lumos.report` and
    :func:`lumos.compact` trace shapes without being handed inputs again.

    Attributes:
        model: the user's model, its supported layers replaced by gated ones.
        feature_gate: :class:`lumos.nn.FeatureGate` or None.
        feature_dim: the feature dimension of the first input.
        skipped: qualified name -> reason, for layers left ungated.
        leaf_modules: the ``leaf_modules`` given to :func:`lumos.gate`, reused by
            :func:`lumos.compact`, :func:`lumos.report` and the penalty.
        gate_sampler: the :class:`lumos.gates.GateSampler` every gate draws its noise from
            (seed ``mask_seed``); :func:`lumos.step_gates_` advances it after each optimiser step.
    """

    def __init__(self, model: nn.Module, feature_gate: FeatureGate | None, feature_dim: int = -1,
                 example_inputs: Sequence[torch.Tensor] = (), skipped: dict[str, str] | None = None,
                 leaf_modules: Sequence = (), mask_seed: int = 0):
        super().__init__()
        self.model = model
        self.feature_gate = feature_gate
        self.feature_dim = feature_dim
        self.example_inputs = tuple(t.detach() if isinstance(t, torch.Tensor) else t for t in example_inputs)
        self.skipped = dict(skipped or {})
        self.leaf_modules = tuple(leaf_modules)
        self.gate_sampler = GateSampler(mask_seed, (gate for _, gate in gates_of(self)))

    def forward(self, x, *args, **kwargs):
        # One sampling call draws every gate's mask for this call; the gates read it while the
        # model runs. Outside this call (checkpointed recomputation) a gate draws the same mask.
        sampler = self.gate_sampler
        sampler.current = sampler.draw(self.training) if sampler.gates else None
        try:
            if self.feature_gate is not None:
                x = self.feature_gate(x)
            return self.model(x, *args, **kwargs)
        finally:
            sampler.current = None

    @property
    def feature_names(self) -> list[str] | None:
        return self.feature_gate.feature_names if self.feature_gate is not None else None


def feature_gate_of(model: nn.Module) -> FeatureGate | None:
    """The :class:`lumos.nn.FeatureGate` ``model`` holds (None without one)."""
    return next((m for m in model.modules() if isinstance(m, FeatureGate)), None)


def has_feature_gate(model: nn.Module) -> bool:
    """Whether ``model`` holds a :class:`lumos.nn.FeatureGate` (its first input is then features)."""
    return feature_gate_of(model) is not None

