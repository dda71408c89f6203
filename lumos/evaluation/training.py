"""Train and evaluate a model on a built-in workload, whatever the form of its data.

Tensor-pair workloads go through :func:`lumos.fit` and :func:`lumos.train.evaluate`. Graph
workloads (batches ``((x, edge_index, edge_attr, batch), y)``) need a multi-input loop that
``lumos.fit`` does not have yet (issue 10, item 5); :func:`_fit_input_tuples` is that loop,
with ``fit``'s semantics (Adam with the gate logits at ``gate_lr``, budget controller, best
epoch within budget restored), until ``fit`` takes tuple inputs.
"""
from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass

import torch
from torch import nn

from ..gates import clamp_gates_, gates_of
from ..train import BudgetController, History, evaluate, fit, kept_fraction
from ..workloads import Workload


@dataclass
class Phase:
    """One training phase: its name, what :func:`lumos.fit` recorded, and its wall time (s)."""

    name: str
    history: History
    seconds: float


def _tensor_pairs(work: Workload) -> bool:
    return isinstance(work.train, tuple)


def train(model: nn.Module, work: Workload, epochs: int, *, name: str, seed: int = 0, target: float | None = None,
          cost: str = "params", progress: bool = False) -> Phase:
    """Train ``model`` on ``work.train`` for ``epochs`` with the workload's loss, learning rate and
    batch size, selecting the best epoch on ``work.val`` (within budget, with a ``target``)."""
    settings = dict(loss_fn=work.loss_fn, metric=work.metric, epochs=epochs, lr=work.fit_defaults["lr"],
                    batch_size=work.fit_defaults["batch_size"], seed=seed, progress=progress, description=name)
    if target is not None:
        settings.update(target=target, cost=cost)
    start = time.perf_counter()
    if _tensor_pairs(work):
        history = fit(model, work.train, work.val, **settings)
    else:
        history = _fit_input_tuples(model, work.train, work.val, **settings)
    return Phase(name, history, time.perf_counter() - start)


@torch.no_grad()
def evaluate_split(model: nn.Module, work: Workload, split: str = "test") -> float:
    """The workload's metric of ``model`` (eval mode) on ``split``."""
    data = getattr(work, split)
    if _tensor_pairs(work):
        return evaluate(model, data, work.loss_fn, work.metric)[1]
    return _evaluate_input_tuples(model, data, work.loss_fn, work.metric)[1]


@torch.no_grad()
def _evaluate_input_tuples(model: nn.Module, batches, loss_fn, metric) -> tuple[float, float]:
    was_training = model.training
    model.eval()
    preds, targets, total, count = [], [], 0.0, 0
    for inputs, y in batches:
        out = model(*inputs)
        total += float(loss_fn(out, y)) * y.shape[0]
        count += y.shape[0]
        preds.append(out)
        targets.append(y)
    model.train(was_training)
    return total / max(count, 1), metric(torch.cat(preds), torch.cat(targets))


def _fit_input_tuples(model: nn.Module, train, val, *, loss_fn, metric, epochs: int, lr: float, seed: int,
                      target: float | None = None, cost: str = "params", gate_lr: float = 0.02,
                      step_size: float = 0.02, tolerance: float = 0.02, **_display) -> History:
    """``lumos.fit`` for batches whose inputs are a tuple (``model(*inputs)``); see the module docstring."""
    torch.manual_seed(seed)
    gate_params = [g.log_alpha for _, g in gates_of(model)]
    gate_ids = {id(p) for p in gate_params}
    groups = [{"params": [p for p in model.parameters() if id(p) not in gate_ids], "lr": lr}]
    if gate_params:
        groups.append({"params": gate_params, "lr": gate_lr})
    optimizer = torch.optim.Adam(groups)
    controller = BudgetController(model, target, cost, step_size=step_size) if target is not None else None
    history, best_loss, best_state = History(), math.inf, None
    for epoch in range(epochs):
        started = time.perf_counter()
        model.train()
        total, count = 0.0, 0
        for inputs, y in train:
            loss = loss_fn(model(*inputs), y)
            total += float(loss.detach()) * y.shape[0]
            count += y.shape[0]
            if controller is not None:
                loss = loss + controller.penalty()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            if gate_params:
                clamp_gates_(model)
            if controller is not None:
                controller.update()
        row = {"epoch": epoch, "train_loss": total / max(count, 1), "seconds": time.perf_counter() - started}
        if gate_params:
            row["kept_fraction"] = kept_fraction(model, cost)
            row["lam"] = controller.lam if controller is not None else 0.0
        row["val_loss"], row["val_metric"] = _evaluate_input_tuples(model, val, loss_fn, metric)
        history.epochs.append(row)
        within_budget = controller is None or row["kept_fraction"] <= target + tolerance
        if within_budget and row["val_loss"] < best_loss:
            best_loss, best_state, history.best_epoch = row["val_loss"], copy.deepcopy(model.state_dict()), epoch
    if best_state is not None:
        model.load_state_dict(best_state)
    model.eval()
    return history
