"""lumos.gate: a gated copy of a user's model, with a feature gate on its input."""
from __future__ import annotations

import copy
from collections import Counter
from typing import Callable, Iterable, Sequence

import torch
from torch import nn
from torch.nn.utils import parametrize

from .plan import check_not_meta, plan_model
from .plan.planner import kept_whole as modules_kept_whole
from .plan.planner import shared_with
from .plan.record import Whole
from .plan.trace import has_hooks
from .model import GatedModel, as_input_tuple
from .nn import FeatureGate, GatedLinear
from .nn import GatedGINEAggregation, GatedMultiheadAttention, GINEAggregation
from .nn import GatedConv1d, GatedConv2d, GatedConv3d, GatedConvTranspose2d, GatedConvTranspose3d
from .nn.transformer import TWINS as TRACEABLE_TWINS  # torch layer fx keeps whole -> traceable lumos twin
from .nn.transformer import twin_blocker

# plain layer type -> function(layer, **gate_kwargs) returning its gated twin (same weights)
GATED_LAYERS: dict[type, Callable[..., nn.Module]] = {
    nn.Linear: GatedLinear.from_linear,
    nn.MultiheadAttention: GatedMultiheadAttention.from_mha,
    GINEAggregation: GatedGINEAggregation.from_aggregation,  # the aggregation inside lumos.nn.GINConv
    nn.Conv1d: GatedConv1d.from_conv, nn.Conv2d: GatedConv2d.from_conv, nn.Conv3d: GatedConv3d.from_conv,
    nn.ConvTranspose2d: GatedConvTranspose2d.from_conv, nn.ConvTranspose3d: GatedConvTranspose3d.from_conv,
}
EXAMPLE_ROWS = 8  # rows of the example inputs kept on the gated model for tracing later
# gated twins whose `out_gate` has one unit per output channel: the ones that can share it
OUTPUT_GATED = (GatedLinear, GatedConv1d, GatedConv2d, GatedConv3d, GatedConvTranspose2d, GatedConvTranspose3d)


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


# layers whose rule also prunes parts of them: those parts are not gated on their own
PRUNED_INSIDE = (nn.MultiheadAttention, GINEAggregation)


def _whole_reason(gm, name: str, calls: Counter, shared: dict[str, str]) -> str:
    """Why the plan keeps the module ``name`` whole (``shared``: :func:`shared_with` of ``gm``)."""
    module = gm.get_submodule(name)
    if has_hooks(module):
        return "has forward hooks or pre-hooks (kept whole so that they keep running on it)"
    if calls[name] > 1:
        return "called more than once per forward (shared weights)"
    if any(n.op == "get_attr" and n.target.startswith(name + ".") for n in gm.graph.nodes):
        return "its weights are also read directly in forward (tied weights)"
    other = shared.get(name)
    if other is not None:
        return f"holds the same parameter tensor as `{other}` (tied weights)"
    if name in gm.meta.get("lumos_user_leaves", ()):
        return "named in leaf_modules (kept whole)"
    return ("compaction keeps it whole: lumos has no rule for this configuration or call (e.g. "
            "MultiheadAttention with add_bias_kv or add_zero_attn, a conv on an unbatched input)")


def _variant_reason(module: nn.Module) -> str | None:
    """Why a layer of a gateable kind that is not exactly that type stays ungated (None for
    others): a parametrized layer (``weight_norm``, ``spectral_norm``) would lose its
    parametrization in a gated twin; a subclass may compute something else in ``forward``."""
    if type(module) in GATED_LAYERS or not isinstance(module, tuple(GATED_LAYERS)) \
            or type(module).__module__.startswith("lumos."):
        return None
    if parametrize.is_parametrized(module):
        names = ", ".join(f"`{name}`" for name in module.parametrizations)
        return (f"its {names} is parametrized (weight_norm, spectral_norm...), which a gated twin would drop; "
                "compaction turns it into a plain layer")
    base = next(t for t in type(module).__mro__ if t in GATED_LAYERS)
    return f"{type(module).__name__} is a subclass of {base.__name__}; lumos gates only {base.__name__} itself"


def _choose_layers(model: nn.Module, example_inputs: tuple, feature_dim: int,
                   leaf_modules: Iterable) -> tuple[list[str], dict[str, str], list[list[str]]]:
    """Which supported layers to gate, why the others are left alone, and which chosen layers
    make the same channels (:func:`_same_channels`).

    A layer is worth gating only if its output channels can really be removed: not when it
    produces the model's output, or feeds ops that need every channel (an op lumos keeps whole;
    a LayerNorm followed by an activation). The channel plan of the ungated model with every
    layer's outputs assumed closed says which: a layer none of whose channels it drops stays
    ungated.
    """
    plan, records = plan_model(_Plain(model, feature_dim), example_inputs, leaf_modules=leaf_modules,
                               who="lumos.gate", assume_closed=True)
    outputs = [plan.space_of[a] for n in plan.gm.graph.nodes if n.op == "output"
               for a in n.all_input_nodes if a in plan.space_of]
    calls = Counter(node.target for node in plan.gm.graph.nodes if node.op == "call_module")
    shared = shared_with(plan.gm)
    whole = modules_kept_whole(plan.gm) | {n.target for n in plan.gm.graph.nodes
                                            if n.op == "call_module" and isinstance(records[n], Whole)}
    chosen, skipped = [], {}
    for name, module in model.named_modules():
        variant = _variant_reason(module)
        if type(module) not in GATED_LAYERS and variant is None:
            continue
        parent = next((called for called in calls if name.startswith(called + ".")), None)
        if parent is not None:
            if not isinstance(plan.module_of(parent), PRUNED_INSIDE) or parent in whole:
                why = "a leaf module" if parent in plan.gm.meta.get("lumos_user_leaves", ()) \
                    else _whole_reason(plan.gm, parent, calls, shared)
                skipped[name] = f"inside `{parent}`, which lumos keeps whole ({why})"
            continue
        if variant is not None:
            skipped[name] = variant
            continue
        if calls.get(name, 0) == 0:
            skipped[name] = "never called in forward (or called inside a leaf module)"
            continue
        if name in whole:
            skipped[name] = _whole_reason(plan.gm, name, calls, shared)
            continue
        node = next(n for n in plan.gm.graph.nodes if n.op == "call_module" and n.target == name)
        space = plan.space_of.get(node)
        if space is not None and bool(plan.kept_mask(space).all()):
            if any(plan.same_group(space, out) for out in outputs):
                skipped[name] = "produces the model's output, whose width is fixed"
            else:
                ops = plan.pinned_by(space)
                skipped[name] = "feeds an op that needs every channel" + (
                    f": {', '.join(ops[:3])}{' and more' if len(ops) > 3 else ''}" if ops
                    else " (an op lumos keeps whole, or a LayerNorm followed by an activation)")
            continue
        chosen.append(name)
    return chosen, skipped, _same_channels(plan, chosen)


def _same_channels(plan, chosen: list[str]) -> list[list[str]]:
    """Lists of ``chosen`` layers whose outputs are the same channels, index by index: the
    producers a residual add sums into one stream. Such a channel goes only when every producer's
    gate closes it, so with a gate each, the expected cost ``1 - prod(1 - p)`` hardly moves with
    any one of them and the L0 penalty cannot shrink the stream; :func:`gate` gives them one gate."""
    groups = plan.group_index()
    by_channels: dict[tuple, list[str]] = {}
    nodes = {n.target: n for n in plan.gm.graph.nodes if n.op == "call_module"}
    for name in chosen:
        space = plan.space_of.get(nodes[name])
        if space is not None and space.size > 0:
            key = tuple(groups[space.start:space.start + space.size].tolist())
            by_channels.setdefault(key, []).append(name)
    return [names for names in by_channels.values() if len(names) > 1]


def _share_output_gates(model: nn.Module, same_channels: list[list[str]]) -> dict[str, str]:
    """Give each list of layers of ``same_channels`` the first one's output gate, in place;
    returns ``{layer: layer whose gate it uses}``."""
    shared = {}
    for names in same_channels:
        layers = [(name, model.get_submodule(name)) for name in names]
        layers = [(name, layer) for name, layer in layers if isinstance(layer, OUTPUT_GATED)
                  and layer.out_gate is not None]
        if not layers:
            continue
        owner, first = layers[0]
        for name, layer in layers[1:]:
            if layer.out_gate.n == first.out_gate.n:
                layer.out_gate = first.out_gate
                shared[name] = owner
    return shared


def _swap_in_traceable_twins(model: nn.Module, leaf_modules: tuple) -> dict[str, str]:
    """Turn, in place, every torch layer of ``TRACEABLE_TWINS`` into its twin (same submodules and
    state_dict, a forward fx can trace), except in ``leaf_modules`` or where a part could not be
    traced (:func:`lumos.nn.transformer.twin_blocker`); returns those kept whole, with why."""
    leaf_types = tuple(m for m in leaf_modules if isinstance(m, type))
    whole, kept = {}, {}  # name of a module kept whole -> why its parts are
    for name, module in model.named_modules():
        outer = next((w for w in whole if name.startswith(w + ".")), None)
        why = whole[outer] if outer is not None else None
        if why is None and (name in leaf_modules or isinstance(module, leaf_types)):
            why = whole[name] = f"`{name}` is in leaf_modules"
        if type(module) not in TRACEABLE_TWINS:
            continue
        why = why or twin_blocker(module)
        if why is None:
            module.__class__ = TRACEABLE_TWINS[type(module)]
        else:
            kept[name] = f"{type(module).__name__} kept whole (not converted to its lumos.nn twin): {why}"
            whole.setdefault(name, f"inside `{name}`, kept whole")
    return kept


class _Plain(GatedModel):
    """An ungated model seen through the same tracing path as a gated one."""

    def __init__(self, model: nn.Module, feature_dim: int):
        super().__init__(model, None, feature_dim)


@torch.inference_mode(False)  # called in an inference_mode block, the gated model must still train outside one
def gate(model: nn.Module, example_inputs, *, features: bool = True,
         feature_names: Sequence[str] | None = None, feature_dim: int = -1,
         leaf_modules: Iterable = (), mask_seed: int = 0, share_gates: bool = True,
         **gate_kwargs) -> GatedModel:
    """A gated copy of ``model``: L0 gates on the widths of its layers and on its input features.

    Every supported layer (``GATED_LAYERS``: ``nn.Linear`` -> :class:`lumos.nn.GatedLinear`...)
    whose width can really shrink becomes its gated twin with the same weights; layers whose
    output must keep every channel (the output layer, a layer feeding a LayerNorm followed by
    an activation) or that compaction keeps whole (called twice, hooked, tied weights) stay as
    they are and are listed in ``gated.skipped`` with the reason. torch's Transformer layers and stacks (``TRACEABLE_TWINS``) first become their
    :mod:`lumos.nn.transformer` twins, so that the attention and feed-forward layers inside
    them are gated. ``model`` itself is not modified. A bare layer (a linear model: one
    ``nn.Linear`` or convolution) is wrapped in ``nn.Sequential`` (``gated.model[0]``).

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
        share_gates: layers whose outputs are the same channels (summed by a residual add) share
            one output gate, so that a channel of the stream is kept or removed as one unit
            (``gated.shared_gates``: layer -> the layer whose gate it uses). With a gate each, a
            channel goes only when every one of them closes, and the L0 penalty's gradient on
            any one gate is the channel's cost times the others' probability of being closed,
            about 0: the stream cannot shrink and the pressure falls on the other gates, the
            input features' among them (an SRResNet, x2 super-resolution, target 0.3, seeds
            0-29: a needed input lost or a constant model in 21 runs; with shared gates in none).
            False: a gate per layer (a residual branch of one layer can then close alone).
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
    if not isinstance(share_gates, bool):
        raise TypeError(f"lumos.gate: `share_gates` must be True or False, got {share_gates!r}")
    example_inputs = as_input_tuple(example_inputs, "lumos.gate", features)
    check_not_meta(model, example_inputs, "lumos.gate")
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
    if type(copied) in GATED_LAYERS:  # a bare layer (a linear model): torch.fx records its forward as a
        copied = nn.Sequential(copied)  # function call, not a call of a module lumos can gate
    kept_whole = _swap_in_traceable_twins(copied, leaf_modules)
    chosen, skipped, same_channels = _choose_layers(copied, example_inputs, feature_dim, leaf_modules)
    skipped = {**kept_whole, **skipped}
    for name in chosen:
        parent_name, _, leaf = name.rpartition(".")
        parent = copied.get_submodule(parent_name) if parent_name else copied
        layer = getattr(parent, leaf)
        setattr(parent, leaf, GATED_LAYERS[type(layer)](layer, **gate_kwargs))
    shared = _share_output_gates(copied, same_channels) if share_gates else {}
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
    gated.shared_gates = shared
    return gated
