"""Compaction: turn a gated model into a plain, smaller PyTorch model that computes the same thing.

``lumos.compact(gated, example_inputs)`` plans the channels (:mod:`lumos.plan`: trace, one
analysis rule per op, solve), builds each op at its kept width from its record (one builder per
op family, ``build_*.py``, dispatched by :data:`.table.BUILDERS`), folds the gate values and the
values of dropped channels into the consumers, checks the result against the gated model
(:mod:`.check`) and returns an ``fx.GraphModule`` that holds only torch modules, torch functions
and buffers. ``DERIVATIONS.md`` derives what the builders fold.
"""
from __future__ import annotations

import copy
from typing import Iterable

import torch
from torch import fx, nn

from ..collapse import closed_gates, constant_message, predicts_constant
from ..model import GatedModel, as_input_tuple, has_feature_gate
from ..nn import FeatureGate
from ..plan import CompactionError, TraceError, check_gates, check_not_meta, default_inputs, plan_model
from ..plan.planner import shared_with
from .builder import copy_hooks
from .check import self_check
from .nest import nest
from .plain import is_gated
from .table import build

__all__ = ["CompactionError", "TraceError", "compact", "check_gates"]


def _refuse_tied_gated_layers(plan) -> None:
    """A gated layer whose parameter is also read directly or held by another module (tied
    weights) cannot keep its tie once its gates are folded into its weights."""
    for target, other in shared_with(plan.gm).items():
        if is_gated(plan.gm.get_submodule(target)):
            raise CompactionError(
                f"lumos.compact: gated layer `{target}` holds the same parameter tensor as `{other}` (tied "
                "weights); folding its gates would untie them. lumos.gate leaves such layers ungated: gate the "
                "original model with lumos.gate, or untie the weights")
    for node in plan.gm.graph.nodes:
        if node.op != "get_attr":
            continue
        owner = node.target.rpartition(".")[0]
        for other in plan.gm.graph.nodes:
            if other.op == "call_module" and (owner == other.target or owner.startswith(other.target + ".")) \
                    and is_gated(plan.module(other)):
                raise CompactionError(
                    f"lumos.compact: `{node.target}` is read directly by node `{node.name}` while `{other.target}` is "
                    "a gated layer (tied weights); folding its gates would untie them. lumos.gate leaves such "
                    "layers ungated: gate the original model with lumos.gate, or untie the weights")


def _refuse_constant(gated: nn.Module, plan, inputs: tuple) -> None:
    """A model whose every input feature is unread (the plan says so), or that gives the same
    output for other inputs while a gate is closed, predicts a constant: refused."""
    feature_node = next((n for n in plan.gm.graph.nodes if n.op == "call_module"
                         and isinstance(plan.module(n), FeatureGate)), None)
    if (feature_node is not None and plan.width(feature_node) == 0) \
            or (closed_gates(gated) and predicts_constant(gated, inputs)):
        raise CompactionError(f"lumos.compact: {constant_message(gated)}. Train with a larger budget (`target`) "
                              "or a smaller penalty (`lam`), or pass allow_constant=True to build that constant "
                              "model")


@torch.inference_mode(False)  # called in an inference_mode block, the model must still work outside one
def compact(gated: nn.Module, example_inputs=None, *, leaf_modules: Iterable | None = None,
            keep_input_shape: bool = True, allow_constant: bool = False) -> fx.GraphModule:
    """Build the plain, compacted model of ``gated`` (which is left untouched), and check it.

    Args:
        gated: a model from :func:`lumos.gate` (or any module holding lumos gated layers).
        example_inputs: a tensor or tuple of inputs the model accepts (a few rows are enough);
            defaults to those given to :func:`lumos.gate`.
        leaf_modules: submodules (types, objects or qualified names) to keep whole, for
            code ``torch.fx`` cannot trace; their inputs and outputs keep every channel.
            Defaults to those given to :func:`lumos.gate`.
        keep_input_shape: True (default): the compacted model takes the full input and selects
            the kept features itself. False: it takes only the kept feature columns, in order
            (``lumos.report(gated).kept_features`` names them); without a feature gate
            (``lumos.gate(..., features=False)``) the input stays whole either way.
        allow_constant: build the model even if it no longer depends on its input (every unit
            of a gate on the input's path closed: it predicts a constant). Default: refuse.

    Returns:
        An ``fx.GraphModule`` in eval mode holding only torch modules, torch functions and
        buffers, its layers at their kept widths; ``compacted(x)`` equals ``gated.eval()(x)`` to
        float tolerance. Before returning, the two are compared on fresh inputs of the example's
        shape and of other batch and spatial/sequence sizes the model accepts.

    Raises:
        CompactionError: the model cannot be compacted exactly (the message names the node and
            what to do), a gate's ``log_alpha`` holds NaN, or the model predicts a constant
            (without ``allow_constant``).
        TraceError: ``torch.fx`` cannot trace the model (the message names the module).
    """
    if not isinstance(gated, nn.Module):
        raise TypeError(f"lumos.compact: `gated` must be an nn.Module, got {type(gated).__name__}")
    inputs = as_input_tuple(example_inputs, "lumos.compact", has_feature_gate(gated)) if example_inputs is not None \
        else default_inputs(gated)
    check_not_meta(gated, inputs, "lumos.compact")
    check_gates(gated, "lumos.compact")
    if not any(isinstance(m, FeatureGate) for m in gated.modules()):
        keep_input_shape = True  # no feature gate: no feature is dropped, nothing says which columns to pass
    plan, records = plan_model(gated, inputs, leaf_modules=leaf_modules, keep_input_shape=keep_input_shape)
    _refuse_tied_gated_layers(plan)
    if not allow_constant:
        _refuse_constant(gated, plan, inputs)
    inner = gated.model if isinstance(gated, GatedModel) else gated
    was_training = gated.training
    gated.eval()  # weights read in eval mode (a spectral_norm's power iteration must not run, nor move)
    try:
        with torch.no_grad():
            small, builder = build(plan, records, f"Compact{type(inner).__name__}")
    finally:
        gated.train(was_training)
    flat = small
    hooked = plan.gm.meta.get("lumos_hooked", [])
    if hooked:  # containers with hooks become submodules of the same name, with the same hooks
        flat = copy.deepcopy(small)
        small = nest(small, plan.gm, inner, hooked)
    copy_hooks(inner, small)
    feature_index, feature_dim = None, -1
    if not keep_input_shape:
        first = next(n for n in plan.gm.graph.nodes if n.op == "placeholder")
        feature_index = plan.kept(plan.space_of[first])
        feature_dim = plan.space_of[first].dim
    self_check(gated, small, flat, builder, inputs, feature_index, feature_dim)
    return small
