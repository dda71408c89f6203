"""``lumos.fit``: a small training loop built from :func:`train_step`, with callbacks.

Per training step the loop runs one forward, one sampling call for every gate, one
vectorised cost evaluation, backward and the optimiser; it reads nothing back from the device
until the end of the epoch (losses and the first non-finite step are collected as tensors).
"""
from __future__ import annotations

import copy
import math
import time
import warnings
from dataclasses import dataclass, field
from typing import Callable, Iterable

import torch
from torch import nn

from ..cost import check_cost, cost_model
from ..gates import gates_of, step_gates_
from .budget import BudgetController, check_target
from .data import LoaderData, TensorData, as_data, check_against_model, check_tensors
from .noise import NoiseRangeSchedule
from .penalty import check_finite_gates, kept_fraction, param_groups


@dataclass
class History:
    """What :func:`fit` saw, one dict per epoch (``epoch, train_loss, val_loss, val_metric,
    kept_fraction, lam, seconds``), the epoch whose weights were restored (None if none was),
    and, with a ``target``, whether the run ended within ``tolerance`` of it."""

    epochs: list[dict] = field(default_factory=list)
    best_epoch: int | None = None
    stopped_early: bool = False
    target_met: bool | None = None

    def column(self, key: str) -> list:
        return [row.get(key) for row in self.epochs]


class Callback:
    """Hooks :func:`fit` calls; subclass and override what you need. ``loop`` is the running
    :class:`FitLoop` (model, optimizer, controller, epoch, step, history)."""

    def on_fit_start(self, loop: "FitLoop") -> None:
        pass

    def on_step_end(self, loop: "FitLoop", task_loss: torch.Tensor) -> None:
        """After each optimiser step; ``task_loss`` is detached (reading it syncs the device)."""

    def on_epoch_end(self, loop: "FitLoop", row: dict) -> None:
        pass

    def on_fit_end(self, loop: "FitLoop") -> None:
        pass


def train_step(model: nn.Module, inputs: tuple, target: torch.Tensor, optimizer: torch.optim.Optimizer,
               loss_fn: Callable = nn.functional.mse_loss, controller: BudgetController | None = None,
               lam: float = 0.0, cost: str = "params") -> torch.Tensor:
    """One optimiser step on one batch; returns the detached task loss (no host sync).

    ``loss_fn(model(*inputs), target)`` plus the L0 term: ``controller.penalty`` with a
    :class:`BudgetController`, else ``lam`` times the expected fraction of ``cost`` kept
    (nothing when ``lam`` is 0). After ``optimizer.step()``, ``controller.step()`` or
    :func:`lumos.step_gates_` finishes the gates' step (clamp, next noise).
    """
    task = loss_fn(model(*inputs), target)
    loss = task
    if controller is not None:
        loss = loss + controller.penalty(task)
    elif lam:
        costs = cost_model(model)
        loss = loss + lam * costs.expected(cost) / costs.dense[cost]
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    if controller is not None:
        controller.step()
    else:
        step_gates_(model)
    return task.detach()


@torch.no_grad()
def evaluate(model: nn.Module, data, loss_fn: Callable = nn.functional.mse_loss, metric: Callable | None = None,
             batch_size: int = 4096) -> tuple[float, float | None]:
    """Mean loss and ``metric(pred, target)`` of ``model`` in eval mode over ``data``
    (``(inputs, target)`` or a loader, as :func:`fit` takes)."""
    dtype = _model_dtype(model)
    data = data if isinstance(data, (TensorData, LoaderData)) else as_data(data, "data", "lumos.evaluate", dtype)
    was_training = model.training
    model.eval()
    device = _model_device(model)
    preds, targets, total, count = [], [], None, 0
    try:
        for inputs, target in data.batches(batch_size):
            inputs, target = _to(inputs, device), target.to(device)
            out = model(*inputs)
            loss = loss_fn(out, target).detach() * target.shape[0]
            total = loss if total is None else total + loss
            count += target.shape[0]
            if metric is not None:
                preds.append(out)
                targets.append(target)
    finally:
        model.train(was_training)
    value = metric(torch.cat(preds), torch.cat(targets)) if metric is not None and preds else None
    return (float(total) / count if count else math.nan), (float(value) if value is not None else None)


def _model_device(model: nn.Module) -> torch.device:
    param = next(model.parameters(), None)
    return param.device if param is not None else torch.device("cpu")


def _model_dtype(model: nn.Module) -> torch.dtype:
    floats = [p.dtype for p in model.parameters() if p.is_floating_point()]
    return floats[0] if floats else torch.get_default_dtype()


def _to(inputs: tuple, device: torch.device) -> tuple:
    return tuple(t.to(device, non_blocking=True) for t in inputs)


class FitLoop:
    """The state of one :func:`fit` run and the epoch it runs; what a checkpoint saves.

    Attributes:
        model, optimizer, controller: as given to or built by :func:`fit`.
        epoch: epochs completed; step: optimiser steps taken.
        history: the :class:`History` so far.
        best_score, best_epoch, best_state, bad_epochs: model selection and patience.
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, loss_fn: Callable, *,
                 controller: BudgetController | None, lam: float, cost: str, tolerance: float,
                 callbacks: Iterable[Callback] = ()):
        self.model, self.optimizer, self.loss_fn = model, optimizer, loss_fn
        self.controller, self.lam, self.cost, self.tolerance = controller, lam, cost, tolerance
        self.gated = bool(gates_of(model))
        self.callbacks = list(callbacks)
        self.device = _model_device(model)
        self.epoch = self.step = self.bad_epochs = 0
        self.best_score, self.best_epoch, self.best_state = math.inf, None, None
        self.history = History()

    def run_epoch(self, data: TensorData | LoaderData, batch_size: int, generator: torch.Generator | None) -> dict:
        """Train one epoch; returns its row (``train_loss``, ``seconds``, and the gates' state)."""
        started = time.perf_counter()
        self.model.train()
        losses, rows = [], []
        for inputs, target in data.batches(batch_size, generator):
            inputs, target = _to(inputs, self.device), target.to(self.device, non_blocking=True)
            task = train_step(self.model, inputs, target, self.optimizer, self.loss_fn,
                              self.controller, self.lam, self.cost)
            losses.append(task)
            rows.append(target.shape[0])
            self.step += 1
            for callback in self.callbacks:
                callback.on_step_end(self, task)
        if not losses:
            raise ValueError(f"lumos.fit: `train` gave no batch in epoch {self.epoch}")
        per_step = torch.stack(losses).double().cpu()  # the epoch's one read-back
        self._check_finite(per_step, len(losses))
        row = {"epoch": self.epoch, "train_loss": float((per_step * torch.tensor(rows, dtype=torch.float64)).sum()
                                                        / sum(rows))}
        if self.gated:
            row["kept_fraction"] = kept_fraction(self.model, self.cost)
            row["lam"] = self.controller.lam if self.controller is not None else self.lam
        row["seconds"] = time.perf_counter() - started
        return row

    def _check_finite(self, per_step: torch.Tensor, steps: int) -> None:
        bad = (~torch.isfinite(per_step)).nonzero()
        if bad.numel():
            batch = int(bad[0])
            raise FloatingPointError(
                f"lumos.fit: the task loss became non-finite (NaN or inf: {float(per_step[batch])}) at step {self.step - steps + batch} "
                f"(epoch {self.epoch}, batch {batch}); check that batch's inputs and targets for NaN or inf, "
                "or lower `lr`")
        if self.gated:
            check_finite_gates(self.model, "lumos.fit")

    def end_epoch(self, row: dict, score: float, patience: int | None) -> bool:
        """Record the epoch, keep the best weights within budget; True when patience runs out."""
        self.history.epochs.append(row)
        self.epoch += 1
        target = self.controller.target if self.controller is not None else None
        within = target is None or row["kept_fraction"] <= target + self.tolerance
        if within and score < self.best_score:
            self.best_score, self.best_epoch, self.bad_epochs = score, row["epoch"], 0
            self.best_state = copy.deepcopy(self.model.state_dict())
        elif within:
            self.bad_epochs += 1
        for callback in self.callbacks:
            callback.on_epoch_end(self, row)
        return patience is not None and self.bad_epochs >= patience

    def finish(self, restore_best: bool) -> History:
        """Restore the best weights if asked, judge the budget, return the history."""
        if restore_best and self.best_state is not None:
            self.model.load_state_dict(self.best_state)
            self.history.best_epoch = self.best_epoch
        if self.controller is not None:
            self._judge_budget()
        self.model.eval()
        for callback in self.callbacks:
            callback.on_fit_end(self)
        return self.history

    def _judge_budget(self) -> None:
        controller, kept = self.controller, kept_fraction(self.model, self.cost)
        self.history.target_met = abs(kept - controller.target) <= self.tolerance
        if kept > controller.target + self.tolerance:
            why = (f"lam reached its bound {controller.lam_max:g}" if controller.saturated
                   else f"lam is {controller.lam:.3g} and still rising")
            warnings.warn(
                f"lumos.fit: the run ended keeping {kept:.3f} of the dense {self.cost}, above the target "
                f"{controller.target} (+{self.tolerance}): {why}. Train for more epochs, or check with "
                "lumos.min_fraction(model) what the layers lumos keeps whole cost.", RuntimeWarning, stacklevel=3)

    def state_dict(self) -> dict:
        """Loop counters and model selection (the optimizer and controller save their own)."""
        return {"epoch": self.epoch, "step": self.step, "bad_epochs": self.bad_epochs,
                "best_score": self.best_score, "best_epoch": self.best_epoch, "best_state": self.best_state,
                "history": copy.deepcopy(self.history)}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.step, self.bad_epochs = state["epoch"], state["step"], state["bad_epochs"]
        self.best_score, self.best_epoch, self.best_state = state["best_score"], state["best_epoch"], state["best_state"]
        self.history = copy.deepcopy(state["history"])


def _check_positive_int(value, name: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"lumos.fit: `{name}` must be a positive int, got {value!r}")


def fit(model: nn.Module, train, val=None, *, loss_fn: Callable = nn.functional.mse_loss,
        metric: Callable | None = None, epochs: int = 50, lr: float = 1e-3, batch_size: int = 256,
        target: float | None = None, cost: str = "params", lam: float = 0.0,
        optimizer: torch.optim.Optimizer | None = None, patience: int | None = None,
        tolerance: float = 0.02, noise_schedule: NoiseRangeSchedule | None = None,
        restore_best: bool | None = None, callbacks: Iterable[Callback] = (), progress: bool = True,
        seed: int | None = None, controller_options: dict | None = None,
        description: str = "lumos.fit") -> History:
    """Train ``model`` on ``train``, with the L0 penalty when it has gates; returns a :class:`History`.

    Args:
        model: a gated model from :func:`lumos.gate` (a plain model trains without penalty).
        train, val: ``(inputs, target)`` tensors or NumPy arrays (``inputs`` a tensor or a tuple
            of them, one per positional argument of the model), or re-iterables of such batches
            (see :mod:`lumos.train.data`).
        loss_fn: task loss ``loss_fn(pred, target)``; default MSE. Targets are checked against
            it: same shape as the output and floating point for regression losses, class
            indices in range for ``cross_entropy``.
        metric: optional ``metric(pred, target) -> float`` reported on ``val``.
        epochs, lr, batch_size: the usual. Without ``optimizer``, Adam over
            :func:`lumos.param_groups` (gate logits at ``GATE_LR_SCALE * lr``).
        target: budget as the fraction of ``cost`` to keep, in (0, 1]; drives a
            :class:`BudgetController`. None: fixed weight ``lam`` on the expected fraction kept.
        cost: ``"params"``, ``"flops"`` or ``"count"``.
        lam: weight of the penalty when ``target`` is None.
        patience: stop after this many epochs in a row without a better validation loss (with a
            ``target``, counting only epochs within budget); None: never.
        tolerance: with a ``target``, an epoch counts as best only if its kept fraction is at
            most ``target + tolerance``; a run that ends farther than ``tolerance`` from the
            target warns (``History.target_met``).
        noise_schedule: anneal the gates' noise range per epoch (LUMOS reference variant).
        restore_best: load the weights of the best epoch at the end. Default: yes with a
            ``target`` (best within budget) or for an ungated model; no for a fixed ``lam``,
            where an early epoch would undo the pruning.
        callbacks: :class:`Callback` objects (logging, checkpoints).
        progress: show a progress bar (tqdm), updated once per epoch.
        seed: seed torch's global RNG (dropout), the shuffling and the gates' noise, for a
            reproducible run; None (default) touches no global state: shuffling then draws its
            seed from torch's RNG, and the gates keep their sampler's seed and step.
        controller_options: keyword arguments for the :class:`BudgetController` (``warmup``,
            ``anneal``, ``lock``...).
    """
    from tqdm.auto import tqdm

    if not isinstance(model, nn.Module):
        raise TypeError(f"lumos.fit: `model` must be an nn.Module, got {type(model).__name__}")
    _check_positive_int(epochs, "epochs")
    _check_positive_int(batch_size, "batch_size")
    check_cost(cost, "lumos.fit")
    if isinstance(lam, bool) or not isinstance(lam, (int, float)) or not math.isfinite(lam) or lam < 0:
        raise ValueError(f"lumos.fit: `lam` must be a finite weight >= 0, got {lam!r}")
    gated = bool(gates_of(model))
    if target is not None:
        check_target(target, "lumos.fit")
        if not gated:
            raise ValueError("lumos.fit: `target` needs a gated model; make it with lumos.gate(model, example_inputs)")
    dtype = _model_dtype(model)
    train_data, val_data = as_data(train, "train", "lumos.fit", dtype), as_data(val, "val", "lumos.fit", dtype)
    _check_first_batches(model, train_data, val_data, loss_fn)
    if seed is not None:
        torch.manual_seed(seed)
        if hasattr(model, "gate_sampler"):
            model.gate_sampler.reseed(seed)
    generator = torch.Generator().manual_seed(seed if seed is not None else int(torch.randint(2**62, ())))
    controller = None
    if target is not None:
        controller = BudgetController(model, target, epochs * _steps_per_epoch(train_data, batch_size), cost,
                                      who="lumos.fit", **(controller_options or {}))
    optimizer = optimizer if optimizer is not None else torch.optim.Adam(param_groups(model, lr))
    loop = FitLoop(model, optimizer, loss_fn, controller=controller, lam=lam, cost=cost,
                   tolerance=tolerance, callbacks=callbacks)
    for callback in loop.callbacks:
        callback.on_fit_start(loop)
    bar = tqdm(range(epochs), desc=description, disable=not progress, leave=True)
    for epoch in bar:
        if noise_schedule is not None:
            noise_schedule.apply(model, epoch)
        row = loop.run_epoch(train_data, batch_size, generator if isinstance(train_data, TensorData) else None)
        score = row["train_loss"]
        if val_data is not None:
            row["val_loss"], row["val_metric"] = evaluate(model, val_data, loss_fn, metric)
            score = row["val_loss"]
        bar.set_postfix({k: (f"{v:.4g}" if isinstance(v, float) else v) for k, v in row.items()
                         if k in ("train_loss", "val_loss", "val_metric", "kept_fraction", "lam")})
        if loop.end_epoch(row, score, patience):
            loop.history.stopped_early = True
            break
    bar.close()
    if restore_best is None:
        restore_best = controller is not None or not gated
    return loop.finish(restore_best)


def _steps_per_epoch(data: TensorData | LoaderData, batch_size: int) -> int:
    if isinstance(data, TensorData):
        return -(-data.rows // batch_size)
    try:
        return len(data.loader)
    except TypeError:  # a loader without a length: count one pass
        return sum(1 for _ in data.loader)


def _check_first_batches(model: nn.Module, train, val, loss_fn: Callable) -> None:
    """Check the targets against the model's output before any training (loaders: first batch)."""
    device = _model_device(model)
    for name, data in (("train", train), ("val", val)):
        if data is None:
            continue
        if isinstance(data, TensorData):
            inputs, target = data.inputs, data.target
        else:
            first = next(iter(data.batches()), None)
            if first is None:
                raise ValueError(f"lumos.fit: `{name}` gave no batch")
            inputs, target = first
            check_tensors(inputs, target, "lumos.fit", f"the first batch of `{name}`")
        check_against_model(model, _to(tuple(t[:8] for t in inputs), device), target, loss_fn,
                            "lumos.fit", f"`{name}`")
