"""Compaction: turn a gated model into a plain, smaller PyTorch model that computes the same thing.

``lumos.compact(gated, example_inputs)`` traces the gated model with ``torch.fx``, solves which
channels of every tensor survive (:mod:`.plan`, with one rule per op kind in :mod:`.rules`),
folds the gate values into the weights and rebuilds each layer at its new width
(:mod:`.build`). The result is an ``fx.GraphModule`` of standard torch modules (plus
:class:`InputSelect` for the kept input features) equal to ``gated.eval()`` to float tolerance.
"""
from __future__ import annotations

import warnings
from collections import Counter
from typing import Iterable

import torch
from torch import fx, nn

from ..model import GatedModel, as_input_tuple
from ..nn import FeatureGate
from .build import build
from .modules import InputSelect
from .plan import ChannelPlan
from .rules import Opaque, Placeholder, Rule, rule_for
from . import rules_conv  # noqa: F401  (registers the conv, pooling, flatten, cat rules)
from . import rules_gnn, rules_attention  # noqa: F401  (GINE aggregation, graph pooling, attention)
from .trace import TraceError, propagate_shapes, trace

__all__ = ["CompactionError", "InputSelect", "TraceError", "compact", "plan_model"]


class CompactionError(RuntimeError):
    """A gated model that lumos cannot compact into an exact plain model."""


def trace_gated(gated: nn.Module, leaf_modules: Iterable = ()) -> tuple[fx.GraphModule, int]:
    """Trace a gated model (a :class:`GatedModel` or any module holding gated layers).

    Returns the graph module and the feature dimension of its first input. For a
    :class:`GatedModel` the input feature gate becomes a node right after the first input.
    """
    if not isinstance(gated, GatedModel):
        return trace(gated, leaf_modules), -1
    gm = trace(gated.model, leaf_modules)
    if gated.feature_gate is not None:
        name = "feature_gate"
        while hasattr(gm, name):  # the user's model may have a submodule of that name
            name = "lumos_" + name
        gm.add_submodule(name, gated.feature_gate)
        first = next(n for n in gm.graph.nodes if n.op == "placeholder")
        with gm.graph.inserting_after(first):
            gate_node = gm.graph.call_module(name, (first,))
        first.replace_all_uses_with(gate_node, delete_user_cb=lambda user: user is not gate_node)
        gm.recompile()
    return gm, gated.feature_dim


def _default_inputs(gated: nn.Module) -> tuple:
    """The example inputs kept by :func:`lumos.gate`, moved to where the model is now."""
    inputs = getattr(gated, "example_inputs", ())
    if not inputs:
        raise ValueError("lumos.compact: pass `example_inputs` (this model was not made by lumos.gate)")
    param = next((p for p in gated.parameters() if p.is_floating_point()), None)
    if param is None:
        return tuple(inputs)
    return tuple(t.to(param.device, param.dtype) if isinstance(t, torch.Tensor) and t.is_floating_point()
                 else t.to(param.device) if isinstance(t, torch.Tensor) else t for t in inputs)


def plan_model(gated: nn.Module, example_inputs=None, *, leaf_modules: Iterable | None = None,
               keep_input_shape: bool = True) -> tuple[ChannelPlan, dict[fx.Node, Rule]]:
    """Trace ``gated`` and solve which channels survive, without building anything.

    ``example_inputs`` and ``leaf_modules`` default to those given to :func:`lumos.gate`.
    """
    if example_inputs is None:
        example_inputs = _default_inputs(gated)
    if leaf_modules is None:
        leaf_modules = getattr(gated, "leaf_modules", ())
    example_inputs = as_input_tuple(example_inputs, "lumos.compact")
    was_training = gated.training
    gated.eval()  # trace in eval: functional dropout etc. record training=False
    try:
        gm, feature_dim = trace_gated(gated, leaf_modules)
        propagate_shapes(gm, example_inputs)
    finally:
        gated.train(was_training)
    plan = ChannelPlan(gm)
    placeholder = Placeholder(feature_dim, keep_input_shape)
    calls = Counter(node.target for node in gm.graph.nodes if node.op == "call_module")
    # kept whole: modules the user named as leaves, and modules called more than once (one
    # compacted copy could not serve calls that keep different channels)
    whole = gm.meta.get("lumos_user_leaves", set()) | {t for t, count in calls.items() if count > 1}
    rules = {}
    for node in gm.graph.nodes:
        rules[node] = Opaque() if node.op == "call_module" and node.target in whole \
            else rule_for(node, plan, placeholder)
        rules[node].analyze(node, plan)
    plan.solve()
    return plan, rules


def compact(gated: nn.Module, example_inputs=None, *, leaf_modules: Iterable | None = None,
            keep_input_shape: bool = True) -> fx.GraphModule:
    """Build the plain, compacted model of ``gated`` (which is left untouched).

    Args:
        gated: a model from :func:`lumos.gate` (or any module holding lumos gated layers).
        example_inputs: a tensor or tuple of inputs the model accepts (a few rows are enough);
            defaults to those given to :func:`lumos.gate`.
        leaf_modules: submodules (types, objects or qualified names) to keep whole, for
            code ``torch.fx`` cannot trace; their inputs and outputs keep every channel.
            Defaults to those given to :func:`lumos.gate`.
        keep_input_shape: True (default): the compacted model takes the full input and selects
            the kept features itself. False: it takes only the kept feature columns, in order
            (``lumos.report(gated).kept_features`` names them).

    Returns:
        An ``fx.GraphModule`` in eval mode with standard torch layers at their kept widths;
        ``compacted(x)`` equals ``gated.eval()(x)`` to float tolerance.
    """
    if not isinstance(gated, nn.Module):
        raise TypeError(f"lumos.compact: `gated` must be an nn.Module, got {type(gated).__name__}")
    plan, rules = plan_model(gated, example_inputs, leaf_modules=leaf_modules,
                             keep_input_shape=keep_input_shape)
    for node in plan.gm.graph.nodes:
        if node.op == "call_module" and isinstance(plan.module(node), FeatureGate) and plan.width(node) == 0:
            warnings.warn("lumos.compact: the compacted model no longer depends on its input (every input "
                          "feature, or every unit of a layer on the input's path, is closed) and predicts "
                          "a constant; train with a larger budget or a smaller penalty", stacklevel=2)
    inner = gated.model if isinstance(gated, GatedModel) else gated
    with torch.no_grad():
        return build(plan, rules, f"Compact{type(inner).__name__}")
