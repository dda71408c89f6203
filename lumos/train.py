"""Training with the L0 penalty: ``lumos.penalty``, a budget controller, and a small ``fit`` loop."""
from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass, field
from typing import Callable, Iterable

import torch
from torch import nn

from .cost import check_cost, cost_model
from .gates import clamp_gates_, gates_of


def _gated_check(model: nn.Module, who: str) -> None:
    if not isinstance(model, nn.Module):
        raise TypeError(f"{who}: `model` must be an nn.Module, got {type(model).__name__}")
    if not gates_of(model):
        raise ValueError(f"{who}: the model has no lumos gates; make it with lumos.gate(model, example_inputs)")


def penalty(model: nn.Module, cost: str = "count", normalize: bool = False) -> torch.Tensor:
    """The L0 complexity term ``L_C`` to add (times a weight) to the task loss.

    Args:
        model: a gated model (from :func:`lumos.gate`).
        cost: ``"count"``: expected number of open gates (the paper's ``sum_j p_open_j``);
            ``"params"`` / ``"flops"``: expected parameters / FLOPs per sample of the model
            given every gate's ``p_open`` (each gate weighted by what it controls).
        normalize: divide by the dense model's cost, giving the expected fraction kept.

    Returns:
        A differentiable scalar tensor.
    """
    _gated_check(model, "lumos.penalty")
    check_cost(cost, "lumos.penalty")
    costs = cost_model(model)
    value = costs.expected(cost)
    return value / costs.dense[cost] if normalize else value


def kept_fraction(model: nn.Module, cost: str = "params") -> float:
    """Fraction of the dense model's cost that the gates' eval masks keep (no gradient)."""
    check_cost(cost, "lumos.kept_fraction")
    costs = cost_model(model)
    return costs.actual(cost) / costs.dense[cost]


class BudgetController:
    """Lagrangian weight on the L0 term so that training ends at a target budget.

    Minimises ``task + lam * max(E[fraction kept] - target, 0)`` over the model while ``lam`` follows
    dual ascent ``lam <- max(0, lam + step_size * (E[fraction kept] - target))``: the user says
    "keep 20% of parameters" instead of searching for a penalty weight.

    Args:
        model: the gated model.
        target: fraction of the dense cost to keep, in (0, 1].
        cost: ``"params"`` (default), ``"flops"`` or ``"count"``.
        step_size: dual-ascent step per update.
        lam: initial weight (>= 0).

    Usage::

        controller = lumos.BudgetController(gated, target=0.2)
        loss = task_loss + controller.penalty()
        loss.backward(); optimizer.step(); controller.update()
    """

    def __init__(self, model: nn.Module, target: float, cost: str = "params", step_size: float = 0.02,
                 lam: float = 0.0):
        _gated_check(model, "lumos.BudgetController")
        check_cost(cost, "lumos.BudgetController")
        if not isinstance(target, (int, float)) or math.isnan(target) or not 0.0 < target <= 1.0:
            raise ValueError(f"lumos.BudgetController: `target` must be a fraction in (0, 1], got {target!r}")
        if not (math.isfinite(step_size) and math.isfinite(lam)) or step_size <= 0 or lam < 0:
            raise ValueError(f"lumos.BudgetController: need step_size > 0 and lam >= 0, got {step_size}, {lam}")
        self.model, self.target, self.cost = model, float(target), cost
        self.step_size, self.lam = float(step_size), float(lam)
        self.fraction = 1.0  # expected fraction kept at the last penalty() call

    def penalty(self) -> torch.Tensor:
        """``lam * max(expected fraction kept - target, 0)``, differentiable in the gates.

        The hinge stops pushing gates closed once the budget is met: a gate pushed below
        ``t_l`` gets no task gradient again, so overshooting the budget could not be undone.
        """
        expected = penalty(self.model, self.cost, normalize=True)
        self.fraction = float(expected.detach())
        return self.lam * torch.relu(expected - self.target)

    def update(self) -> float:
        """One dual-ascent step on ``lam`` from the last expected fraction; returns ``lam``."""
        self.lam = max(0.0, self.lam + self.step_size * (self.fraction - self.target))
        return self.lam


class NoiseRangeSchedule:
    """Anneals every gate's ``noise_range`` per epoch (the LUMOS reference code's variant).

    Geometric from ``start`` (0.5: deterministic gates) to ``end`` (about 0: full hard-concrete
    noise) over ``epochs``, then held at ``end``.
    """

    def __init__(self, start: float = 0.5, end: float = 1e-6, epochs: int = 10):
        if not 0 < end <= start <= 0.5 or epochs < 1:
            raise ValueError(f"NoiseRangeSchedule: need 0 < end <= start <= 0.5 and epochs >= 1, got {start}, {end}, {epochs}")
        self.start, self.end, self.epochs = start, end, epochs

    def value(self, epoch: int) -> float:
        t = min(epoch / self.epochs, 1.0)
        return self.start * (self.end / self.start) ** t

    def apply(self, model: nn.Module, epoch: int) -> None:
        for _, gate in gates_of(model):
            gate.noise_range = self.value(epoch)


@dataclass
class History:
    """What :func:`fit` saw, one dict per epoch (``epoch, train_loss, val_loss, val_metric,
    kept_fraction, lam, seconds``), and the epoch whose weights were restored (None if none was)."""

    epochs: list[dict] = field(default_factory=list)
    best_epoch: int | None = None
    stopped_early: bool = False

    def column(self, key: str) -> list:
        return [row.get(key) for row in self.epochs]


def _is_pair(data) -> bool:
    """(inputs, targets) tensors, as opposed to an iterable of batches."""
    return isinstance(data, (tuple, list)) and len(data) == 2 and all(isinstance(t, torch.Tensor) for t in data)


def _batches(data, batch_size: int, shuffle: bool, generator: torch.Generator | None):
    if _is_pair(data):
        x, y = data
        n = x.shape[0]
        order = torch.randperm(n, generator=generator) if shuffle else torch.arange(n)
        for start in range(0, n, batch_size):
            idx = order[start:start + batch_size]
            yield x[idx], y[idx]
    else:
        yield from data


def _check_data(data, name: str) -> None:
    if data is None:
        return
    if _is_pair(data):
        x, y = data
        if x.shape[0] != y.shape[0]:
            raise ValueError(f"lumos.fit: `{name}` inputs have {x.shape[0]} rows but targets {y.shape[0]}")
        for label, t in (("inputs", x), ("targets", y)):
            if not t.is_floating_point() and label == "inputs":
                raise TypeError(f"lumos.fit: `{name}` inputs must be floating point, got {t.dtype}")
            if t.is_floating_point() and not torch.isfinite(t).all():
                bad = (~torch.isfinite(t)).nonzero()[0].tolist()
                raise ValueError(f"lumos.fit: `{name}` {label} contain NaN or inf (first at index {bad})")
    elif not isinstance(data, Iterable) or isinstance(data, torch.Tensor):
        raise TypeError(f"lumos.fit: `{name}` must be (inputs, targets) tensors or an iterable of batches")


def _check_batch(xb: torch.Tensor, where: str) -> None:
    if isinstance(xb, torch.Tensor) and xb.is_floating_point() and not torch.isfinite(xb).all():
        raise ValueError(f"lumos.fit: NaN or inf in the inputs of {where}")


@torch.no_grad()
def evaluate(model: nn.Module, data, loss_fn: Callable, metric: Callable | None = None,
             batch_size: int = 4096) -> tuple[float, float | None]:
    """Mean loss and metric of ``model`` in eval mode over ``data`` ((x, y) or a loader)."""
    was_training = model.training
    model.eval()
    preds, targets, total, count = [], [], 0.0, 0
    device = next(model.parameters()).device
    for xb, yb in _batches(data, batch_size, False, None):
        xb, yb = xb.to(device), yb.to(device)
        out = model(xb)
        total += float(loss_fn(out, yb)) * xb.shape[0]
        count += xb.shape[0]
        if metric is not None:
            preds.append(out)
            targets.append(yb)
    model.train(was_training)
    value = metric(torch.cat(preds), torch.cat(targets)) if metric is not None and preds else None
    return total / max(count, 1), value


def fit(model: nn.Module, train, val=None, *, loss_fn: Callable = nn.functional.mse_loss,
        metric: Callable | None = None, epochs: int = 50, lr: float = 1e-3, batch_size: int = 256,
        target: float | None = None, cost: str = "params", lam: float = 0.0,
        optimizer: torch.optim.Optimizer | None = None, patience: int | None = None,
        tolerance: float = 0.02, noise_schedule: NoiseRangeSchedule | None = None,
        step_size: float = 0.02, gate_lr: float = 0.02, restore_best: bool | None = None,
        progress: bool = True, seed: int | None = 0,
        description: str = "lumos.fit") -> History:
    """Train ``model`` on ``train``, with the L0 penalty when it has gates; returns a :class:`History`.

    Args:
        model: a gated model from :func:`lumos.gate` (a plain model trains without penalty).
        train, val: ``(inputs, targets)`` tensors, or iterables of ``(inputs, targets)`` batches.
        loss_fn: task loss ``loss_fn(pred, target)``; default MSE.
        metric: optional ``metric(pred, target) -> float`` reported on ``val``.
        epochs, lr, batch_size: the usual (Adam unless ``optimizer`` is given).
        target: budget as the fraction of ``cost`` to keep, in (0, 1]; drives a
            :class:`BudgetController`. None: fixed weight ``lam`` on :func:`penalty`.
        cost: ``"params"``, ``"flops"`` or ``"count"``.
        lam: weight of the penalty when ``target`` is None (normalised cost, i.e. fraction kept).
        patience: stop after this many epochs in a row without a better validation loss (with a
            ``target``, counting only epochs within budget); None: never.
        tolerance: with a ``target``, an epoch counts as best only if its kept fraction is
            at most ``target + tolerance``; the weights of the best epoch are restored at the end.
        restore_best: load the weights of the best epoch at the end. Default: yes with a
            ``target`` (best within budget) or for an ungated model; no for a fixed ``lam``,
            where an early epoch would undo the pruning.
        noise_schedule: anneal the gates' noise range per epoch (LUMOS reference variant).
        step_size: dual-ascent step of the budget controller.
        gate_lr: Adam learning rate of the gate logits (they travel farther than weights).
        progress: show a progress bar (tqdm).
        seed: seeds torch's RNG (gate samples, shuffling) for a reproducible run; None leaves it.
    """
    from tqdm.auto import tqdm

    if not isinstance(model, nn.Module):
        raise TypeError(f"lumos.fit: `model` must be an nn.Module, got {type(model).__name__}")
    _check_data(train, "train")
    _check_data(val, "val")
    if not isinstance(epochs, int) or epochs < 1:
        raise ValueError(f"lumos.fit: `epochs` must be a positive int, got {epochs!r}")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"lumos.fit: `batch_size` must be a positive int, got {batch_size!r}")
    check_cost(cost, "lumos.fit")
    if not isinstance(lam, (int, float)) or not math.isfinite(lam) or lam < 0:
        raise ValueError(f"lumos.fit: `lam` must be a finite weight >= 0, got {lam!r}")
    if seed is not None:
        torch.manual_seed(seed)
    gated = bool(gates_of(model))
    controller = BudgetController(model, target, cost, step_size=step_size) if gated and target is not None else None
    if target is not None and not gated:
        raise ValueError("lumos.fit: `target` needs a gated model; make it with lumos.gate(model, example_inputs)")
    if optimizer is None:
        gate_params = [g.log_alpha for _, g in gates_of(model)]
        gate_ids = {id(p) for p in gate_params}
        others = [p for p in model.parameters() if id(p) not in gate_ids]
        groups = [{"params": others, "lr": lr}]
        if gate_params:
            groups.append({"params": gate_params, "lr": gate_lr})
        optimizer = torch.optim.Adam(groups)
    device = next(model.parameters()).device
    generator = torch.Generator().manual_seed(seed) if seed is not None else None
    history, best_loss, best_state, best_epoch, bad_epochs = History(), math.inf, None, None, 0
    bar = tqdm(range(epochs), desc=description, disable=not progress, leave=True)
    checked = _is_pair(train)
    for epoch in bar:
        started = time.perf_counter()
        if noise_schedule is not None:
            noise_schedule.apply(model, epoch)
        model.train()
        total, count = 0.0, 0
        for step, (xb, yb) in enumerate(_batches(train, batch_size, True, generator)):
            if not checked:  # tensor pairs were checked whole before training
                _check_batch(xb, f"batch {step} of epoch {epoch}")
            xb, yb = xb.to(device), yb.to(device)
            loss = loss_fn(model(xb), yb)
            task = float(loss.detach())
            if controller is not None:
                loss = loss + controller.penalty()
            elif gated and lam:
                loss = loss + lam * penalty(model, cost, normalize=True)
            if not math.isfinite(task) or not torch.isfinite(loss.detach()):
                raise FloatingPointError(
                    f"lumos.fit: the loss became {float(loss.detach())} (task loss {task}) at batch {step} "
                    f"of epoch {epoch}; lower `lr` or check the targets"
                )
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            if gated:
                clamp_gates_(model)
            if controller is not None:
                controller.update()
            total += task * xb.shape[0]
            count += xb.shape[0]
        if count == 0:
            raise ValueError(f"lumos.fit: `train` gave no batch in epoch {epoch}; pass (inputs, targets) "
                             "tensors or a re-iterable loader (a DataLoader, a list), not a one-shot iterator")
        row = {"epoch": epoch, "train_loss": total / max(count, 1), "seconds": time.perf_counter() - started}
        if gated:
            row["kept_fraction"] = kept_fraction(model, cost)
            row["lam"] = controller.lam if controller is not None else lam
        score = row["train_loss"]
        if val is not None:
            row["val_loss"], row["val_metric"] = evaluate(model, val, loss_fn, metric)
            score = row["val_loss"]
        history.epochs.append(row)
        within_budget = controller is None or row["kept_fraction"] <= target + tolerance
        if within_budget and score < best_loss:
            best_loss, best_state, bad_epochs = score, copy.deepcopy(model.state_dict()), 0
            best_epoch = epoch
        elif within_budget:
            bad_epochs += 1
        bar.set_postfix({k: (f"{v:.4g}" if isinstance(v, float) else v) for k, v in row.items()
                         if k in ("train_loss", "val_loss", "val_metric", "kept_fraction", "lam")})
        if patience is not None and bad_epochs >= patience:
            history.stopped_early = True
            break
    bar.close()
    if restore_best is None:
        restore_best = controller is not None or not gated
    if restore_best and best_state is not None:
        model.load_state_dict(best_state)
        history.best_epoch = best_epoch
    model.eval()
    return history
