"""Peer pruning methods, each brought to a given kept-parameter fraction of a trained dense model.

- :func:`l1_structured`: L1-norm filter pruning (Li et al., "Pruning Filters for Efficient
  ConvNets", ICLR 2017): every prunable layer keeps the same fraction of its output units
  (neurons, channels, attention heads and head dimensions, GINE feature columns), the ones
  whose own weights have the largest L1 norm. The structural bookkeeping (which other layers
  lose the matching rows) is lumos' compaction, fed with gates set to exactly 0 or 1, so the
  pruned model is exact and plain.
- :func:`torch_pruning`: Torch-Pruning's DepGraph (Fang et al., CVPR 2023) with group L1
  magnitude importance, a uniform ratio per group; needs the optional ``torch-pruning`` package.
- :func:`unstructured_mask`: ``torch.nn.utils.prune`` global unstructured L1 magnitude pruning of
  every weight matrix and kernel; the zeros stay in dense tensors, so it saves nothing at
  inference (the baseline that shows masks alone give no speedup).

Each function returns the pruned (not yet fine-tuned) model; :func:`match_fraction` searches a
method's ratio so that the model keeps a requested fraction of the dense parameters.
"""
from __future__ import annotations

import copy
from typing import Callable

import torch
from torch import nn

from ..compact import compact
from ..convert import gate
from ..nn import GatedConv1d, GatedConv2d, GatedConv3d, GatedConvTranspose2d, GatedConvTranspose3d
from ..nn import GatedGINEAggregation, GatedLinear, GatedMultiheadAttention, GINEAggregation
from ..report import count_params

OPEN, CLOSED = 30.0, -30.0  # gate logits whose eval masks are exactly 1 and 0


def _rows_l1(weight: torch.Tensor) -> torch.Tensor:
    """L1 norm of each output unit's weights, the output units on dim 0."""
    return weight.detach().abs().flatten(1).sum(1)


def _heads_l1(layer: GatedMultiheadAttention) -> dict[str, torch.Tensor]:
    heads, head_dim = layer.num_heads, layer.head_dim
    q, k, v = (_rows_l1(p.weight).reshape(heads, head_dim) for p in (layer.q_proj, layer.k_proj, layer.v_proj))
    return {"head_gate": (q + k + v).sum(1), "qk_dim_gate": (q + k).sum(0), "v_dim_gate": v.sum(0)}


def _columns_l1(layer: GatedGINEAggregation) -> dict[str, torch.Tensor]:
    if layer.edge_lin is None:  # no weights of its own per column: rank none below the others
        return {"column_gate": torch.ones(layer.in_channels)}
    return {"column_gate": _rows_l1(layer.edge_lin.weight) + layer.edge_lin.bias.detach().abs()}


# gated layer type -> its gates' per-unit L1 scores (the weights that produce each unit)
L1_SCORES: dict[type, Callable[[nn.Module], dict[str, torch.Tensor]]] = {
    GatedLinear: lambda m: {"out_gate": _rows_l1(m.weight)},
    GatedConv1d: lambda m: {"out_gate": _rows_l1(m.weight)},
    GatedConv2d: lambda m: {"out_gate": _rows_l1(m.weight)},
    GatedConv3d: lambda m: {"out_gate": _rows_l1(m.weight)},
    GatedConvTranspose2d: lambda m: {"out_gate": _rows_l1(m.weight.transpose(0, 1))},
    GatedConvTranspose3d: lambda m: {"out_gate": _rows_l1(m.weight.transpose(0, 1))},
    GatedMultiheadAttention: _heads_l1,
    GatedGINEAggregation: _columns_l1,
}


class L1Structured:
    """L1-norm structured pruning of ``dense`` at any ratio (see the module docstring).

    ``L1Structured(dense, example_inputs)(ratio)`` returns a plain pruned model in which every
    gateable layer keeps ``max(1, round((1 - ratio) * units))`` of its units. The dense model is
    gated once (no feature gate: this method does not select inputs).
    """

    def __init__(self, dense: nn.Module, example_inputs: tuple):
        self.example_inputs = example_inputs
        self.gated = gate(dense, example_inputs, features=False)
        self.scores = []  # (gate, its per-unit scores)
        for module in self.gated.modules():
            scorer = L1_SCORES.get(type(module))
            for name, score in (scorer(module) if scorer else {}).items():
                unit_gate = getattr(module, name, None)
                if unit_gate is not None:
                    self.scores.append((unit_gate, score))

    @torch.no_grad()
    def __call__(self, ratio: float) -> nn.Module:
        for unit_gate, score in self.scores:
            keep = max(1, round((1 - ratio) * score.numel()))
            unit_gate.log_alpha.fill_(CLOSED)
            unit_gate.log_alpha[torch.topk(score, keep).indices] = OPEN
        return compact(self.gated, self.example_inputs)


def output_layers(model: nn.Module, inputs: tuple) -> list[nn.Module]:
    """The leaf modules whose output tensor is the model's output (their width is fixed)."""
    seen = []
    hooks = [m.register_forward_hook(lambda mod, args, out: seen.append((mod, out)))
             for m in model.modules() if not list(m.children())]
    try:
        with torch.no_grad():
            out = model(*inputs)
    finally:
        for hook in hooks:
            hook.remove()
    outs = out if isinstance(out, (tuple, list)) else (out,)
    return [mod for mod, value in seen if any(value is o for o in outs)]


def torch_pruning(dense: nn.Module, example_inputs: tuple) -> Callable[[float], nn.Module]:
    """A function ``ratio -> pruned copy of dense`` by Torch-Pruning's DepGraph with group L1
    magnitude importance (``GroupMagnitudeImportance(p=1)``, mean-normalised per group), ranked
    globally over groups (Torch-Pruning 1.6's per-layer mode merges the ranking scopes of two
    groups rooted at the same layer, which a ViT block has, and then prunes neither);
    attention heads keep their count while head dimensions shrink; the output layer is kept
    whole.

    Raises:
        ImportError: naming the extra, when ``torch-pruning`` is not installed.
    """
    try:
        import torch_pruning as tp
    except ImportError as err:
        raise ImportError("the torch_pruning baseline needs Torch-Pruning: pip install 'lumos[pruning]'") from err
    fixed = {id(m) for m in output_layers(dense, example_inputs)}

    def prune(ratio: float) -> nn.Module:
        model = copy.deepcopy(dense).eval()
        num_heads = {m: m.num_heads for m in model.modules() if isinstance(m, nn.MultiheadAttention)}
        ignored = [m for m, original in zip(model.modules(), dense.modules()) if id(original) in fixed]
        pruner = tp.pruner.BasePruner(model, example_inputs, importance=tp.importance.GroupMagnitudeImportance(p=1),
                                      pruning_ratio=ratio, ignored_layers=ignored, num_heads=num_heads,
                                      global_pruning=True,
                                      prune_head_dims=True, prune_num_heads=False)
        pruner.step()
        for module in model.modules():  # Torch-Pruning shrinks the weights, not this width attribute
            if isinstance(module, GINEAggregation) and module.edge_lin is not None:
                module.in_channels = module.edge_lin.out_features
        return model

    return prune


def unstructured_targets(model: nn.Module) -> list[tuple[nn.Module, str]]:
    """Every weight matrix and kernel: ``weight`` of linear and conv layers, ``in_proj_weight`` of
    ``nn.MultiheadAttention`` (packed Q, K, V)."""
    targets = []
    for module in model.modules():
        if isinstance(module, (nn.Linear, nn.modules.conv._ConvNd)):
            targets.append((module, "weight"))
        elif isinstance(module, nn.MultiheadAttention) and module.in_proj_weight is not None:
            targets.append((module, "in_proj_weight"))
    return targets


def unstructured_mask(dense: nn.Module, fraction: float) -> nn.Module:
    """A copy of ``dense`` whose smallest-magnitude weights (global L1 over
    :func:`unstructured_targets`) are masked so that ``fraction`` of all parameters stay non-zero
    (as close as the prunable weights allow). The masks are ``torch.nn.utils.prune`` hooks, so
    fine-tuning keeps the zeros; call :func:`make_masks_permanent` before deployment."""
    from torch.nn.utils import prune

    model = copy.deepcopy(dense)
    targets = unstructured_targets(model)
    prunable = sum(getattr(m, name).numel() for m, name in targets)
    total = count_params(model)
    n_pruned = min(prunable, max(0, round(total * (1 - fraction))))
    if n_pruned:
        prune.global_unstructured(targets, pruning_method=prune.L1Unstructured, amount=n_pruned)
    for module in model.modules():
        if isinstance(module, nn.MultiheadAttention):
            # MHA reads out_proj.weight without calling out_proj, so out_proj's own mask hook
            # never runs: re-apply it before every attention forward
            module._lumos_mask_refresh = module.register_forward_pre_hook(_refresh_out_proj_mask)
    return model


def _refresh_out_proj_mask(attention: nn.MultiheadAttention, args) -> None:
    from torch.nn.utils import prune

    for hook in list(attention.out_proj._forward_pre_hooks.values()):
        if isinstance(hook, prune.BasePruningMethod):
            hook(attention.out_proj, args)


def make_masks_permanent(model: nn.Module) -> nn.Module:
    """Fold ``torch.nn.utils.prune`` masks into the weights (dense tensors with zeros), in place."""
    from torch.nn.utils import prune

    for module, name in unstructured_targets(model):
        if prune.is_pruned(module) and hasattr(module, name + "_mask"):
            prune.remove(module, name)
        refresh = module.__dict__.pop("_lumos_mask_refresh", None)
        if refresh is not None:
            refresh.remove()
    return model


def nonzero_params(model: nn.Module) -> int:
    """Parameters that are not exactly zero (masks applied)."""
    total = count_params(model)
    for module, name in unstructured_targets(model):
        mask = getattr(module, name + "_mask", None)
        if mask is not None:
            total -= int((mask == 0).sum())
    return total


def match_fraction(prune: Callable[[float], nn.Module], fraction: float, dense_params: int,
                   grid: int = 12, refine: int = 8) -> tuple[nn.Module, float, float]:
    """Search ``ratio`` in [0, 0.98] so that ``prune(ratio)`` keeps about ``fraction`` of
    ``dense_params`` parameters.

    The kept fraction need not fall monotonically with the ratio (Torch-Pruning's global
    ranking skips a group it would empty), so ``grid`` evenly spaced ratios are tried first,
    then ``refine`` bisection steps between the neighbouring grid ratios that bracket
    ``fraction`` closest to the best grid point.

    Returns:
        ``(model, ratio, kept fraction)`` of the closest model found.
    """
    tried = {}

    def kept_at(ratio: float) -> float:
        model = prune(ratio)
        tried[ratio] = (model, count_params(model) / dense_params)
        return tried[ratio][1]

    ratios = [0.98 * i / (grid - 1) for i in range(grid)]
    kept = [kept_at(r) for r in ratios]
    brackets = [i for i in range(grid - 1) if kept[i] >= fraction >= kept[i + 1]]
    if brackets:
        best_grid = min(range(grid), key=lambda i: abs(kept[i] - fraction))
        i = min(brackets, key=lambda j: abs(j - best_grid))
        low, high = ratios[i], ratios[i + 1]
        for _ in range(refine):
            middle = 0.5 * (low + high)
            if kept_at(middle) > fraction:
                low = middle
            else:
                high = middle
    ratio = min(tried, key=lambda r: abs(tried[r][1] - fraction))
    return tried[ratio][0], ratio, tried[ratio][1]
