"""lumos.gate: a gated copy of a user's model, with a feature gate on its input."""
from __future__ import annotations

import copy
from collections import Counter
from typing import Callable, Iterable, Sequence

import torch
from torch import nn

from .compact import plan_model
from .model import GatedModel, as_input_tuple
from .nn import FeatureGate, GatedLinear
from .nn import GatedGINEAggregation, GatedMultiheadAttention, GINEAggregation
from .nn import GatedConv1d, GatedConv2d, GatedConv3d, GatedConvTranspose2d, GatedConvTranspose3d

# plain layer type -> function(layer, **gate_kwargs) returning its gated twin (same weights)
GATED_LAYERS: dict[type, Callable[..., nn.Module]] = {
    nn.Linear: GatedLinear.from_linear,
    nn.MultiheadAttention: GatedMultiheadAttention.from_mha,
    GINEAggregation: GatedGINEAggregation.from_aggregation,  # the aggregation inside lumos.nn.GINConv
    nn.Conv1d: GatedConv1d.from_conv, nn.Conv2d: GatedConv2d.from_conv, nn.Conv3d: GatedConv3d.from_conv,
    nn.ConvTranspose2d: GatedConvTranspose2d.from_conv, nn.ConvTranspose3d: GatedConvTranspose3d.from_conv,
}
EXAMPLE_ROWS = 8  # rows of the example inputs kept on the gated model for tracing later


def _kept_examples(gated: GatedModel, example_inputs: tuple) -> tuple:
    """A few rows of the example inputs when the model runs on them, else the inputs whole
    (a dense adjacency matrix, an edge list: rows that are not samples)."""
    sliced = _example_slice(example_inputs)
    was_training = gated.training
    gated.eval()
    try:
        with torch.no_grad():
            gated(*sliced)
        return sliced
    except Exception:
        return tuple(t.detach() if isinstance(t, torch.Tensor) else t for t in example_inputs)
    finally:
        gated.train(was_training)


def _example_slice(example_inputs: tuple) -> tuple:
    """A few rows of each example input (enough to trace shapes, cheap to keep)."""
    first = example_inputs[0]
    batch = first.shape[0] if first.dim() > 1 else None
    if any(isinstance(t, torch.Tensor) and not t.is_floating_point() for t in example_inputs):
        batch = None  # integer inputs (edge_index, a graph's batch vector) index rows: keep them all
    out = []
    for t in example_inputs:
        if isinstance(t, torch.Tensor) and batch is not None and t.dim() > 1 and t.shape[0] == batch:
            t = t[:EXAMPLE_ROWS]
        out.append(t.detach().clone() if isinstance(t, torch.Tensor) else t)
    return tuple(out)


def _choose_layers(model: nn.Module, example_inputs: tuple, feature_dim: int,
                   leaf_modules: Iterable) -> tuple[list[str], dict[str, str]]:
    """Which supported layers to gate, and why the others are left alone.

    A layer is worth gating only if its output channels can really be removed: not when it
    produces the model's output, or feeds an op that needs every channel (LayerNorm, an op
    lumos has no rule for); the channel plan of the ungated model says which.
    """
    plan, _ = plan_model(_Plain(model, feature_dim), example_inputs, leaf_modules=leaf_modules)
    outputs = [plan.space_of[a] for n in plan.gm.graph.nodes if n.op == "output"
               for a in n.all_input_nodes if a in plan.space_of]
    calls = Counter(node.target for node in plan.gm.graph.nodes if node.op == "call_module")
    chosen, skipped = [], {}
    for name, module in model.named_modules():
        if type(module) not in GATED_LAYERS:
            continue
        if any(name.startswith(called + ".") for called in calls):
            continue  # part of a layer traced whole (a GINE aggregation's edge embedding): its rule prunes it
        if calls.get(name, 0) == 0:
            skipped[name] = "never called in forward (or called inside a leaf module)"
            continue
        if calls[name] > 1:
            skipped[name] = "called more than once per forward (shared weights)"
            continue
        node = next(n for n in plan.gm.graph.nodes if n.op == "call_module" and n.target == name)
        space = plan.space_of[node]
        if bool(plan.pinned_mask(space).all()):
            if any(plan.same_group(space, out) for out in outputs):
                skipped[name] = "produces the model's output, whose width is fixed"
            else:
                skipped[name] = ("feeds an op that needs every channel (e.g. LayerNorm, "
                                 "or an op lumos keeps whole)")
            continue
        chosen.append(name)
    return chosen, skipped


class _Plain(GatedModel):
    """An ungated model seen through the same tracing path as a gated one."""

    def __init__(self, model: nn.Module, feature_dim: int):
        super().__init__(model, None, feature_dim)


def gate(model: nn.Module, example_inputs, *, features: bool = True,
         feature_names: Sequence[str] | None = None, feature_dim: int = -1,
         leaf_modules: Iterable = (), mask_seed: int = 0, **gate_kwargs) -> GatedModel:
    """A gated copy of ``model``: L0 gates on the widths of its layers and on its input features.

    Every supported layer (``GATED_LAYERS``: ``nn.Linear`` -> :class:`lumos.nn.GatedLinear`...)
    whose width can really shrink becomes its gated twin with the same weights; layers whose output must keep every channel (the output layer, a
    layer feeding LayerNorm) stay as they are and are listed in ``gated.skipped`` with the
    reason. ``model`` itself is not modified.

    Args:
        model: the dense model (an ``nn.Module``, traceable by ``torch.fx``).
        example_inputs: a tensor or tuple of inputs ``model`` accepts; the first holds the
            features (a few rows are enough).
        features: add a :class:`lumos.nn.FeatureGate` on the first input (feature selection).
        feature_names: names of the input features, for reports.
        feature_dim: the feature dimension of the first input (-1 for tabular data).
        leaf_modules: submodules to treat as opaque (see :func:`lumos.compact`).
        mask_seed: seed of the gates' noise (:class:`lumos.gates.GateSampler`); the same on every
            DDP rank by default, whatever torch's RNG state.
        **gate_kwargs: passed to every :class:`lumos.gates.HardConcreteGate` (``t_l``, ``t_u``,
            ``init_drop_rate``, ``noise_range``...). The defaults start every gate open (mask
            exactly 1), so the gated model computes what ``model`` computes until training
            closes gates.

    Returns:
        A :class:`lumos.GatedModel`; train it with :func:`lumos.penalty` added to the loss (or
        :func:`lumos.fit`), then call :func:`lumos.compact`.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"lumos.gate: `model` must be a torch.nn.Module, got {type(model).__name__}")
    example_inputs = as_input_tuple(example_inputs, "lumos.gate")
    supported = [name for name, m in model.named_modules() if type(m) in GATED_LAYERS]
    if not supported:
        found = sorted({type(m).__name__ for m in model.modules() if not list(m.children())})
        raise ValueError(
            f"lumos.gate: {type(model).__name__} has no layer lumos can gate "
            f"(supported: {', '.join(t.__name__ for t in GATED_LAYERS)}; found: {', '.join(found) or 'none'})"
        )
    first = example_inputs[0]
    if not -first.dim() <= feature_dim < first.dim():
        raise ValueError(f"lumos.gate: `feature_dim`={feature_dim} is out of range for input shape {tuple(first.shape)}")
    # module objects named as leaves belong to `model`: name them, so they match in the copy
    names = {id(m): name for name, m in model.named_modules()}
    leaf_modules = tuple(names.get(id(m), m) if isinstance(m, nn.Module) else m for m in leaf_modules)
    copied = copy.deepcopy(model)
    chosen, skipped = _choose_layers(copied, example_inputs, feature_dim, leaf_modules)
    for name in chosen:
        parent_name, _, leaf = name.rpartition(".")
        parent = copied.get_submodule(parent_name) if parent_name else copied
        layer = getattr(parent, leaf)
        setattr(parent, leaf, GATED_LAYERS[type(layer)](layer, **gate_kwargs))
    feature_gate = None
    if features:
        feature_gate = FeatureGate(first.shape[feature_dim], feature_names, dim=feature_dim, **gate_kwargs)
        feature_gate.to(first.device)
    if not chosen and feature_gate is None:
        raise ValueError(
            f"lumos.gate: nothing to gate in {type(model).__name__}: "
            + "; ".join(f"{k}: {v}" for k, v in skipped.items())
        )
    gated = GatedModel(copied, feature_gate, feature_dim, example_inputs, skipped, leaf_modules, mask_seed)
    gated.example_inputs = _kept_examples(gated, example_inputs)
    return gated
