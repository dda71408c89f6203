"""Which kept inputs does the model need? A permutation test of each input the gates kept.

The L0 gates can keep an input that carries no information: when closing it (feeding zeros) would
shift what the following layers compute, its task gradient holds its gate open (README, "What an
input gate can miss"). Closing is the wrong question; the right one is whether the model uses
the input's *values*. Shuffling an input across the rows of the data (permutation importance,
Breiman 2001) keeps its distribution and removes what it says about each row. The model's
predictions over a few shufflings are averaged before the loss is taken (the input's value
integrated out, :func:`permutation_test` says why): the loss rises for an input the model needs,
and for one that carries nothing it stays put or falls, the more the model leans on it. At the lock, with the
architecture fixed, :func:`drop_unneeded_inputs_` closes the kept inputs whose shuffling does not
raise the loss by :data:`Z_KEEP` standard errors, one at a time (the least needed first, the others
tested again without it, so two copies of one input are not both closed), and the training after
the lock adapts the model to their absence. :func:`lumos.fit` runs it on its validation data.
"""
from __future__ import annotations

import math
from typing import Callable

import torch
from torch import nn

from ..gates import LOG_ALPHA_MIN
from ..model import feature_gate_of
from ..nn.feature_gate import FeatureGate
from .data import LoaderData, TensorData, as_data
from .step import _model_device, _model_dtype, _to

# An input is kept when integrating it out raises the loss by at least this many standard errors
# (a one-sided test at about 2%): an input whose use the data cannot resolve from noise is dropped.
Z_KEEP = 2.0
PERMUTATIONS = 3  # shufflings per input, averaged: the test does not hinge on one pairing of rows
CHUNKS = 32  # each batch's rows are split into this many groups; the standard error is over groups
MAX_ROWS = 8192  # rows of ``data`` the test reads at most
BATCH_ROWS = 1024  # rows per forward pass (and per shuffling: rows are exchanged within a batch)


@torch.no_grad()
def permutation_test(model: nn.Module, data, loss_fn: Callable = nn.functional.mse_loss,
                     features: list[int] | None = None, *, seed: int = 0,
                     average_outputs: bool = True) -> dict[int, dict]:
    """The rise of ``loss_fn`` when each input feature is shuffled across rows, ``model`` in eval mode.

    Each feature is shuffled :data:`PERMUTATIONS` times. By default the model's *predictions* over
    those shufflings are averaged and the loss of that average compared with the loss on the
    intact data: the loss of the model's prediction with the feature's value integrated out. Why
    not the average of the shuffled losses (classic permutation importance, ``average_outputs=False``)?
    A model can lean on a feature that carries nothing (its weights fit the feature's noise); then
    every shuffling injects as much noise as the true values did, the expected rise is exactly 0,
    and the test keeps such a feature whenever the data's one pairing of rows happens to suit the
    model (about 2% of the time at :data:`Z_KEEP`). Averaging the predictions removes part of the
    injected noise: for a loss convex in the prediction (MSE, L1, Huber, cross-entropy on logits)
    the expected rise of a useless feature is then *negative*, by ``1 - 1/PERMUTATIONS`` of the
    variance it injects (Jensen), the more so the more the model leans on it, while a needed
    feature's rise stays at least what the feature says about the target beyond the other inputs.
    A feature the model barely reads still comes out near 0 either way: the gates close those.

    Args:
        model: a model holding a :class:`lumos.nn.FeatureGate` (a :class:`lumos.GatedModel`).
        data: ``(inputs, target)`` tensors or a re-iterable of such batches, as :func:`lumos.fit`
            takes (or its :class:`lumos.train.TensorData` / ``LoaderData``); at most
            :data:`MAX_ROWS` rows are read, :data:`BATCH_ROWS` at a time. Rows are exchanged within
            a batch along dim 0 of the gated input (the samples, or a graph batch's nodes).
        loss_fn: mean loss ``loss_fn(pred, target)`` (default MSE).
        features: indices of the features to test (default: those the gate keeps).
        seed: seed of the shufflings (the test is a pure function of model, data and seed).
        average_outputs: average the predictions over the shufflings (default), else the losses.
            Predictions that are not floating tensors of one shape (a tuple, class indices) are
            never averaged: their losses are.

    Returns:
        ``{feature: {"rise": relative rise of the loss, "z": that rise over its standard error}}``;
        ``z`` is 0 where the rise is exactly 0 (a constant input).
    """
    who = "lumos.train.input_test.permutation_test"
    gate = _feature_gate(model, who)
    data = _as_test_data(data, model, who)
    if features is None:
        features = [j for j, keep in enumerate(gate.gate.kept().tolist()) if keep]
    generator = torch.Generator().manual_seed(seed)
    device = _model_device(model)
    shuffled: dict = {}
    handle = gate.register_forward_pre_hook(lambda module, args: _shuffle_hook(module, args, shuffled))
    was_training = model.training
    model.eval()
    base_parts, diffs = [], {j: [] for j in features}
    try:
        for inputs, target in _batches(data):
            inputs, target = _to(inputs, device), target.to(device)
            pred = model(*inputs)
            base = _chunk_losses(pred, target, loss_fn)
            base_parts.append(base)
            for j in features:
                preds = []
                for _ in range(PERMUTATIONS):
                    shuffled["feature"], shuffled["generator"] = j, generator
                    preds.append(model(*inputs))
                    shuffled.clear()
                diffs[j].append(_shuffled_losses(preds, pred, target, loss_fn, average_outputs) - base)
    finally:
        handle.remove()
        model.train(was_training)
    if not base_parts:
        raise ValueError("lumos.train.input_test.permutation_test: `data` gave no batch of 2 rows or more")
    loss = float(torch.cat(base_parts).mean())
    result = {}
    for j in features:
        diff = torch.cat(diffs[j])
        mean, spread = float(diff.mean()), float(diff.std()) if diff.numel() > 1 else 0.0
        z = mean / (spread / math.sqrt(diff.numel())) if spread > 0 else math.copysign(math.inf, mean) if mean else 0.0
        result[j] = {"rise": mean / loss if loss > 0 else mean, "z": z}
    return result


@torch.no_grad()
def drop_unneeded_inputs_(model: nn.Module, data, loss_fn: Callable = nn.functional.mse_loss,
                          z_keep: float = Z_KEEP) -> list[dict]:
    """Close, one at a time, each kept input whose shuffling raises ``loss_fn`` on ``data`` by
    less than ``z_keep`` standard errors (the lowest first, then test the rest again); the last
    kept input is never closed. A closed input's gate logit is pinned at its lower bound, as the
    budget lock pins a unit. Returns one dict per input closed, in order: ``name``, ``index``
    (its position on the gated dim), ``rise`` (relative), ``z``. See :func:`permutation_test` for ``data``.

    :func:`lumos.fit` calls it once, at the end of the epoch in which the gates lock; in your own
    loop, call it once at the end of the epoch in which ``controller.locked`` turns True, on
    held-out data (the training after the lock then adapts the model to the closed inputs).
    Training rows also work, but a model that memorised an input's noise there keeps it."""
    gate = _feature_gate(model, "lumos.drop_unneeded_inputs_")
    data = _as_test_data(data, model, "lumos.drop_unneeded_inputs_")
    dropped = []
    while True:
        kept = [j for j, keep in enumerate(gate.gate.kept().tolist()) if keep]
        if len(kept) < 2:
            return dropped
        results = permutation_test(model, data, loss_fn, kept)
        worst = min(kept, key=lambda j: results[j]["z"])
        if results[worst]["z"] >= z_keep:
            return dropped
        close_inputs_(model, [worst])
        dropped.append({"name": gate.feature_names[worst], "index": worst, **results[worst]})


@torch.no_grad()
def close_inputs_(model: nn.Module, indices: list[int]) -> None:
    """Close the inputs at ``indices`` of ``model``'s feature gate for good: their logits pinned at
    the lower bound, as the budget lock pins a unit."""
    feature_gate_of(model).gate.log_alpha[indices] = LOG_ALPHA_MIN


def _feature_gate(model: nn.Module, who: str) -> FeatureGate:
    if not isinstance(model, nn.Module):
        raise TypeError(f"{who}: `model` must be an nn.Module, got {type(model).__name__}")
    gate = feature_gate_of(model)
    if gate is None:
        raise ValueError(f"{who}: `model` has no input FeatureGate; make it with lumos.gate(model, example_inputs)")
    return gate


def _as_test_data(data, model: nn.Module, who: str) -> TensorData | LoaderData:
    if isinstance(data, (TensorData, LoaderData)):
        return data
    if data is None:
        raise ValueError(f"{who}: `data` must be (inputs, target) or a loader of such batches, got None")
    return as_data(data, "data", who, _model_dtype(model), True)


def _batches(data: TensorData | LoaderData):
    """Batches of at least 2 rows (rows are exchanged within a batch), :data:`MAX_ROWS` rows in all."""
    seen = 0
    for inputs, target in data.batches(BATCH_ROWS, pad=False):
        if seen >= MAX_ROWS:
            return
        if target.shape[0] >= 2:
            seen += target.shape[0]
            yield inputs, target


def _shuffle_hook(gate: FeatureGate, args: tuple, shuffled: dict):
    """Forward pre-hook of the feature gate: while ``shuffled`` names a feature, that feature of the
    input is replaced by the same feature of other rows (a random permutation of dim 0)."""
    if not shuffled:
        return None
    x = args[0]
    index = [slice(None)] * x.dim()
    index[gate.dim % x.dim()] = shuffled["feature"]
    order = torch.randperm(x.shape[0], generator=shuffled["generator"]).to(x.device)
    x = x.clone()
    x[tuple(index)] = x[order][tuple(index)]
    return (x, *args[1:])


def _shuffled_losses(preds: list, base: torch.Tensor, target: torch.Tensor, loss_fn: Callable,
                     average_outputs: bool) -> torch.Tensor:
    """:func:`_chunk_losses` of the predictions ``preds`` of the shufflings: of their mean where
    ``average_outputs`` and they are floating tensors like the intact prediction ``base``, else the
    mean of their losses."""
    if average_outputs and all(isinstance(p, torch.Tensor) and p.is_floating_point() and p.shape == base.shape
                               for p in preds + [base]):
        # base + mean of the changes: exactly base where no shuffling changed the output (the mean of
        # equal floats need not round back to them, and a rounding difference would get a z)
        return _chunk_losses(base + torch.stack([p - base for p in preds]).mean(0), target, loss_fn)
    return torch.stack([_chunk_losses(p, target, loss_fn) for p in preds]).mean(0)


def _chunk_losses(pred: torch.Tensor, target: torch.Tensor, loss_fn: Callable) -> torch.Tensor:
    """``(k,)`` float64: ``loss_fn`` on each of up to :data:`CHUNKS` consecutive groups of rows
    (one group when the model's output is not one tensor with a row per target row)."""
    if not isinstance(pred, torch.Tensor) or pred.shape[:1] != target.shape[:1]:
        return loss_fn(pred, target).double().reshape(1)
    pieces = zip(torch.tensor_split(pred, min(CHUNKS, target.shape[0])),
                 torch.tensor_split(target, min(CHUNKS, target.shape[0])))
    return torch.stack([loss_fn(p, t).double() for p, t in pieces])
