"""``lumos.fit``: a small training loop built from :func:`train_step`, with callbacks,
checkpoints that resume exactly, divergence and collapse checks, bf16, ``torch.compile`` and DDP.

Per training step the loop runs one forward, one sampling call for every gate, one
vectorised cost evaluation, backward and the optimiser, and keeps the task loss and the
gradients' norm as device tensors; it reads them back once per epoch and before each
checkpoint (a *sync*), where a non-finite value stops the run naming its step.
"""
from __future__ import annotations

import copy
import dataclasses
import math
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable

import torch
from torch import nn

from ..collapse import closed_gates, constant_message, predicts_constant
from ..cost import check_cost, cost_model
from ..gates import gates_of, model_sampler, step_gates_
from ..model import has_feature_gate
from . import distributed as ddp
from .budget import BudgetController, anneal_too_short, check_target, momentum_lookahead
from .checkpoint import (check_fingerprint, model_fingerprint, read_checkpoint, remove_stale_temp, rng_states,
                         save_atomic, set_rng_states, FORMAT, VERSION)
from .data import LoaderData, TensorData, as_data, check_against_model, check_tensors
from .forward import check_precision, forward_modules
from .noise import NoiseRangeSchedule
from .penalty import check_finite_gates, kept_fraction, param_groups

PROBE_ROWS = 64  # training rows the collapse check runs the model on


@dataclass
class History:
    """What :func:`fit` saw, one dict per epoch (``epoch, train_loss, val_loss, val_metric,
    kept_fraction, lam, seconds``), the epoch whose weights were restored (None if none was),
    with a ``target`` whether the run ended within ``tolerance`` of it, and, for a run resumed
    from a checkpoint, ``resumed_from`` (``path``, ``epoch``, ``step``)."""

    epochs: list[dict] = field(default_factory=list)
    best_epoch: int | None = None
    stopped_early: bool = False
    target_met: bool | None = None
    resumed_from: dict | None = None

    def column(self, key: str) -> list:
        return [row.get(key) for row in self.epochs]


class Callback:
    """Hooks :func:`fit` calls; subclass and override what you need. ``loop`` is the running
    :class:`FitLoop` (model, optimizer, controller, epoch, step, history). A callback with
    ``state_dict()`` / ``load_state_dict()`` is saved in fit's checkpoints and restored on
    resume (plain data only: tensors, numbers, strings, lists, dicts)."""

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
               lam: float = 0.0, cost: str = "params", forward: nn.Module | None = None,
               eval_forward: nn.Module | None = None, lock_on_batch: bool = True) -> torch.Tensor:
    """One optimiser step on one batch; returns the detached task loss (no host sync).

    ``loss_fn(forward(*inputs), target)`` plus the L0 term: ``controller.penalty`` with a
    :class:`BudgetController`, else ``lam`` times the expected fraction of ``cost`` kept
    (nothing when ``lam`` is 0). After ``optimizer.step()``, ``controller.step()`` or
    :func:`lumos.step_gates_` finishes the gates' step (clamp, next noise). ``forward`` is what
    computes the output (``model`` wrapped in DDP, ``torch.compile`` or autocast); default
    ``model``. ``eval_forward``: what computes it in evaluation (default ``forward``). With
    ``lock_on_batch`` the controller's lock compares its two ways of pinning the gates by the loss
    of this batch through ``eval_forward`` in eval mode (:meth:`BudgetController.step`'s
    ``closure``); a data-parallel run passes False, its ranks holding different batches but
    having to pin alike.
    """
    task = loss_fn((forward if forward is not None else model)(*inputs), target)
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
        closure = None
        if lock_on_batch:
            chosen = eval_forward if eval_forward is not None else forward if forward is not None else model
            closure = _batch_loss(model, chosen, inputs, target, loss_fn)
        controller.step(closure)
    else:
        step_gates_(model)
    return task.detach()


def _batch_loss(model: nn.Module, forward: nn.Module, inputs: tuple, target: torch.Tensor, loss_fn: Callable):
    """A closure giving ``loss_fn`` on this batch with ``model`` in eval mode (batch norm's running
    statistics untouched, no dropout), then back in the mode it was in."""
    def closure() -> torch.Tensor:
        was_training = model.training
        model.eval()
        try:
            return loss_fn(forward(*inputs), target)
        finally:
            model.train(was_training)
    return closure


@torch.no_grad()
def evaluate(model: nn.Module, data, loss_fn: Callable = nn.functional.mse_loss, metric: Callable | None = None,
             batch_size: int = 4096, *, ranks: "ddp.Ranks | None" = None) -> tuple[float, float | None]:
    """Mean loss and ``metric(pred, target)`` of ``model`` in eval mode over ``data``
    (``(inputs, target)`` or a loader, as :func:`fit` takes).

    With ``ranks`` (inside a data-parallel :func:`fit`), each rank evaluates every
    ``world``-th row of tensor data and the sums and predictions are combined over the ranks
    (a loader is evaluated whole on every rank); every rank returns the same numbers.
    """
    dtype = _model_dtype(model)
    if not isinstance(data, (TensorData, LoaderData)):
        data = as_data(data, "data", "lumos.evaluate", dtype, has_feature_gate(model))
    was_training = model.training
    model.eval()
    device = _model_device(model)
    preds, targets = [], []
    total, count = torch.zeros((), dtype=torch.float64, device=device), 0
    shard = ranks if isinstance(data, TensorData) else None
    try:
        for inputs, target in data.batches(batch_size, ranks=shard, pad=False):
            inputs, target = _to(inputs, device), target.to(device)
            out = model(*inputs)
            total = total + loss_fn(out, target).detach().double() * target.shape[0]
            count += target.shape[0]
            if metric is not None:
                preds.append(out)
                targets.append(target)
    finally:
        model.train(was_training)
    if shard is not None:
        summed = ddp.all_reduce(torch.stack([total, total.new_tensor(float(count))]), shard)
        total, count = summed[0], int(summed[1])
        if metric is not None:
            parts = ddp.gather_objects((torch.cat(preds).cpu() if preds else None,
                                        torch.cat(targets).cpu() if targets else None), shard)
            preds = [p.to(device) for p, _ in parts if p is not None]
            targets = [t.to(device) for _, t in parts if t is not None]
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


class CheckpointFile:
    """Where :class:`FitLoop` saves itself: ``path``, every ``every`` steps (None: at epoch ends
    only) and at the end of each epoch, with what must match to resume (see
    :mod:`lumos.train.checkpoint`)."""

    def __init__(self, path, every: int | None, settings: dict, who: str):
        if not isinstance(path, (str, Path)):
            raise TypeError(f"{who}: `checkpoint` must be a file path (str or Path), got {type(path).__name__}")
        self.path = Path(path)
        if self.path.is_dir():
            raise ValueError(f"{who}: `checkpoint` must be a file path, got the folder `{self.path}`")
        if not self.path.parent.is_dir():
            raise ValueError(f"{who}: the folder of `checkpoint` ({self.path.parent}) does not exist")
        self.every, self.settings, self.who = every, settings, who
        self.saved_step: int | None = None  # the step of the last checkpoint this run wrote or read


class FitLoop:
    """The state of one :func:`fit` run and the epoch it runs; what a checkpoint saves.

    Attributes:
        model, optimizer, controller, scheduler: as given to or built by :func:`fit`.
        forward, eval_forward: what computes the output in training and in evaluation (the
            model, or its DDP / compiled / autocast wrappers; see :mod:`lumos.train.forward`).
        generator: the shuffling generator of tensor data.
        epoch: epochs completed; step: optimiser steps taken; batch: batches done in the
            current epoch.
        history: the :class:`History` so far.
        best_score, best_epoch, best_state, bad_epochs: model selection and patience.
        ranks: this process's :class:`lumos.train.distributed.Ranks` in a data-parallel run.
        checkpoint: the :class:`CheckpointFile`, or None.
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, loss_fn: Callable, *,
                 controller: BudgetController | None, lam: float, cost: str, tolerance: float,
                 callbacks: Iterable[Callback] = (), scheduler=None, scheduler_interval: str = "epoch",
                 generator: torch.Generator | None = None, ranks: "ddp.Ranks | None" = None,
                 checkpoint: CheckpointFile | None = None, precision: str = "fp32"):
        self.model, self.optimizer, self.loss_fn = model, optimizer, loss_fn
        self.controller, self.lam, self.cost, self.tolerance = controller, lam, cost, tolerance
        self.scheduler, self.scheduler_interval = scheduler, scheduler_interval
        self.generator, self.ranks, self.checkpoint, self.precision = generator, ranks, checkpoint, precision
        self.forward: nn.Module = model
        self.eval_forward: nn.Module = model
        self.gated = bool(gates_of(model))
        self.callbacks = list(callbacks)
        self.device = _model_device(model)
        self.epoch = self.step = self.batch = self.bad_epochs = 0
        self.best_score, self.best_epoch, self.best_state = math.inf, None, None
        self.history = History()
        self.probe_inputs: tuple | None = None  # a few training rows for the collapse check
        self.collapse_warned = False
        # this epoch, one per step: task loss, rows, sum of the gradients' norms (device tensors until a
        # sync reads them back and, in a data-parallel run, combines them over the ranks)
        self._losses: list[torch.Tensor] = []
        self._rows: list[int] = []
        self._grads: list[torch.Tensor] = []
        self._synced = 0
        self._epoch_start: dict | None = None  # the RNG states the epoch's order was drawn from
        self._resume_rng: dict | None = None
        self._params = [p for p in model.parameters() if p.requires_grad]

    # -- one epoch ---------------------------------------------------------------------------
    def run_epoch(self, data: TensorData | LoaderData, batch_size: int) -> dict:
        """Train one epoch (or the rest of one, after a resume); returns its row (``train_loss``,
        ``seconds``, and the gates' state)."""
        started = time.perf_counter()
        self.model.train()
        self.forward.train()
        for inputs, target in self._epoch_batches(data, batch_size):
            inputs, target = _to(inputs, self.device), target.to(self.device, non_blocking=True)
            task = train_step(self.model, inputs, target, self.optimizer, self.loss_fn, self.controller,
                              self.lam, self.cost, forward=self.forward,
                              eval_forward=self.eval_forward, lock_on_batch=self.ranks is None)
            self._losses.append(task)
            self._rows.append(target.shape[0])
            self._grads.append(self._grad_norms())
            self.step += 1
            self.batch += 1
            if self.scheduler is not None and self.scheduler_interval == "step":
                self.scheduler.step()
            for callback in self.callbacks:
                callback.on_step_end(self, task)
            if self.checkpoint is not None and self.checkpoint.every and self.step % self.checkpoint.every == 0:
                self.save_checkpoint()
        if not self._losses:
            raise ValueError(f"lumos.fit: `train` gave no batch in epoch {self.epoch}")
        self.sync()
        per_step, rows = torch.stack(self._losses), torch.tensor(self._rows, dtype=torch.float64)
        if self.ranks is not None:
            ddp.broadcast_buffers(self.model, self.ranks)
        row = {"epoch": self.epoch, "train_loss": float((per_step * rows).sum() / rows.sum())}
        if self.gated:
            check_finite_gates(self.model, "lumos.fit")
            row["kept_fraction"] = kept_fraction(self.model, self.cost)
            row["lam"] = self.controller.lam if self.controller is not None else self.lam
        if self.ranks is not None:
            ddp.check_ranks_agree(self.model, row.get("lam"), self.ranks, "lumos.fit")
        row["seconds"] = time.perf_counter() - started
        return row

    def _epoch_batches(self, data: TensorData | LoaderData, batch_size: int):
        """This epoch's batches. The first time, note the RNG states its order is drawn from; after
        a resume in the middle of an epoch, redraw that order from them and skip the batches
        already done, then restore the RNG states the checkpoint saved."""
        if isinstance(data, LoaderData):
            data.set_epoch(self.epoch)
        generator = self.generator if isinstance(data, TensorData) else None
        if self.batch == 0:
            self._epoch_start = {"torch": torch.get_rng_state(),
                                 "generator": generator.get_state() if generator is not None else None}
        elif self._resume_rng is not None:
            torch.set_rng_state(self._epoch_start["torch"])
            if generator is not None:
                generator.set_state(self._epoch_start["generator"])
        per_rank = ddp.per_rank_batch(batch_size, self.ranks, "lumos.fit") if self.ranks is not None else batch_size
        batches = iter(data.batches(per_rank, generator, ranks=self.ranks))
        if self.batch and self._resume_rng is not None:
            for _ in range(self.batch):
                next(batches)
            set_rng_states(self._resume_rng, self.device)
        self._resume_rng = None
        return batches

    def _grad_norms(self) -> torch.Tensor:
        """The sum of every gradient's norm (0-dim, on the device): non-finite iff one is."""
        grads = [p.grad for p in self._params if p.grad is not None]
        if not grads:
            return torch.zeros((), device=self.device)
        norms = torch._foreach_norm(grads)
        return torch.stack(norms).sum() if len({n.dtype for n in norms}) == 1 else sum(n.double() for n in norms)

    def sync(self) -> None:
        """Read back this epoch's new per-step losses and gradient norms (combined over the
        ranks; float64 on the CPU from then on) and stop at the first non-finite one."""
        new = len(self._losses) - self._synced
        if new:
            window = slice(self._synced, len(self._losses))
            losses = torch.stack(self._losses[window]).double()
            grads = torch.stack([g.double() for g in self._grads[window]])
            rows = torch.tensor(self._rows[window], dtype=torch.float64, device=losses.device)
            if self.ranks is not None:
                packed = ddp.all_reduce(torch.cat([losses * rows, rows, grads]), self.ranks)
                losses, rows, grads = packed[:new] / packed[new:2 * new], packed[new:2 * new], packed[2 * new:]
            losses, rows, grads = losses.cpu(), rows.cpu(), grads.cpu()  # the one read-back
            self._losses[window] = list(losses.unbind())
            self._rows[window] = [int(r) for r in rows.tolist()]
            self._grads[window] = list(grads.unbind())
            self._synced = len(self._losses)
            self._check_finite(losses, grads, window.start)

    def _check_finite(self, losses: torch.Tensor, grads: torch.Tensor, first_batch: int) -> None:
        bad = (~torch.isfinite(losses) | ~torch.isfinite(grads)).nonzero()
        if not bad.numel():
            return
        i = int(bad[0])
        batch = first_batch + i
        step = self.step - len(self._losses) + batch
        if not math.isfinite(float(losses[i])):
            what = f"the task loss became non-finite (NaN or inf: {float(losses[i])})"
            hint = "check that batch's inputs and targets for NaN or inf, lower `lr`"
        else:
            what = f"a gradient became non-finite (NaN or inf; the task loss was {float(losses[i]):.6g})"
            hint = "lower `lr`, check the model for operations whose gradient can be infinite (sqrt or log at 0)"
        if self.precision == "bf16":
            hint += ", train with precision='fp32'"
        if self.checkpoint is not None and self.checkpoint.saved_step is not None:
            kept = (f"The last good checkpoint (saved after {self.checkpoint.saved_step} steps) is kept at "
                    f"`{self.checkpoint.path}`: fit resumes from it when called again (a new `lr` is applied).")
        elif self.checkpoint is not None:
            kept = f"No checkpoint was written before it (`{self.checkpoint.path}` is left as it was)."
        else:
            kept = "Pass `checkpoint=` to keep the last good state of a run."
        raise FloatingPointError(f"lumos.fit: {what} at step {step} (epoch {self.epoch}, batch {batch}); {hint}. "
                                 + kept)

    def warn_if_constant(self) -> None:
        """Warn (once per run) when every unit of a gate on the input's path has closed, so that
        the model predicts a constant: ``lumos.compact`` would refuse it."""
        if self.collapse_warned or not self.gated or self.probe_inputs is None or not closed_gates(self.model):
            return
        if predicts_constant(self.model, self.probe_inputs):
            self.collapse_warned = True
            if self.ranks is None or self.ranks.main:
                warnings.warn(f"lumos.fit: after epoch {self.epoch - 1} (step {self.step}) "
                              f"{constant_message(self.model)}. lumos.compact will refuse it (unless "
                              "allow_constant=True): train with a larger `target` or a smaller `lam`, cap the "
                              "penalty's loss scale (controller_options={'loss_cap': True}), or resume an "
                              "earlier checkpoint", RuntimeWarning, stacklevel=3)

    def end_epoch(self, row: dict, score: float, patience: int | None) -> bool:
        """Record the epoch, keep the best weights within budget; True when patience runs out."""
        self.history.epochs.append(row)
        self.epoch += 1
        self.batch = self._synced = 0
        self._losses, self._rows, self._grads = [], [], []
        target = self.controller.target if self.controller is not None else None
        within = target is None or row["kept_fraction"] <= target + self.tolerance
        if within and score < self.best_score:
            self.best_score, self.best_epoch, self.bad_epochs = score, row["epoch"], 0
            self.best_state = copy.deepcopy(self.model.state_dict())
        elif within:
            self.bad_epochs += 1
        if self.scheduler is not None and self.scheduler_interval == "epoch":
            if isinstance(self.scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
                self.scheduler.step(score)
            else:
                self.scheduler.step()
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
        if kept > controller.target + self.tolerance and (self.ranks is None or self.ranks.main):
            why = (f"lam reached its bound {controller.lam_max:g}" if controller.saturated
                   else f"lam is {controller.lam:.3g} and still rising")
            warnings.warn(
                f"lumos.fit: the run ended keeping {kept:.3f} of the dense {self.cost}, above the target "
                f"{controller.target} (+{self.tolerance}): {why}. Train for more epochs, or check with "
                "lumos.min_fraction(model) what the layers lumos keeps whole cost.", RuntimeWarning, stacklevel=3)

    # -- checkpoints -------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """Everything a resumed run needs to continue exactly: model (gates included), optimizer,
        controller, scheduler, the gates' sampler and noise ranges, the shuffling generator and
        the RNG states (of every rank), where the epoch is and its losses so far, model
        selection, history and callbacks. Call :meth:`sync` first (the losses must be read back)."""
        sampler = model_sampler(self.model)
        rng = rng_states(self.device)
        return {
            "epoch": self.epoch, "step": self.step, "batch": self.batch, "bad_epochs": self.bad_epochs,
            "best_score": self.best_score, "best_epoch": self.best_epoch, "best_state": self.best_state,
            "history": dataclasses.asdict(self.history), "collapse_warned": self.collapse_warned,
            "epoch_losses": torch.stack(self._losses) if self._losses else None, "epoch_rows": list(self._rows),
            "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
            "controller": self.controller.state_dict() if self.controller is not None else None,
            "scheduler": self.scheduler.state_dict() if self.scheduler is not None else None,
            "sampler": sampler.state_dict() if sampler is not None else None,
            "noise_ranges": {name: gate.noise_range for name, gate in gates_of(self.model)},
            "generator": self.generator.get_state() if self.generator is not None else None,
            "epoch_start": self._epoch_start,
            "rng": ddp.gather_objects(rng, self.ranks) if self.ranks is not None else [rng],
            "callbacks": [cb.state_dict() if hasattr(cb, "state_dict") else None for cb in self.callbacks],
        }

    def load_state_dict(self, state: dict) -> None:
        """Continue from :meth:`state_dict` (this rank's RNG states; a rank the checkpoint did
        not have is refused by ``fit`` before)."""
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        if self.controller is not None:
            self.controller.load_state_dict(state["controller"])
        if self.scheduler is not None:
            self.scheduler.load_state_dict(state["scheduler"])
        sampler = model_sampler(self.model)
        if sampler is not None:
            sampler.load_state_dict(state["sampler"])
        for name, gate in gates_of(self.model):
            gate.noise_range = state["noise_ranges"][name]
        if self.generator is not None and state["generator"] is not None:
            self.generator.set_state(state["generator"])
        for callback, saved in zip(self.callbacks, state["callbacks"]):
            if saved is not None and hasattr(callback, "load_state_dict"):
                callback.load_state_dict(saved)
        self.epoch, self.step, self.batch = state["epoch"], state["step"], state["batch"]
        self.bad_epochs, self.best_score = state["bad_epochs"], state["best_score"]
        self.best_epoch, self.best_state = state["best_epoch"], state["best_state"]
        self.history = History(**state["history"])
        self.collapse_warned = state["collapse_warned"]
        losses = state["epoch_losses"]
        self._losses = list(losses.unbind()) if losses is not None else []
        self._rows = list(state["epoch_rows"])
        self._grads = [torch.zeros((), dtype=torch.float64)] * len(self._losses)
        self._synced = len(self._losses)
        self._epoch_start = state["epoch_start"]
        rng = state["rng"][self.ranks.rank if self.ranks is not None else 0]
        set_rng_states(rng, self.device)
        self._resume_rng = rng if self.batch else None

    def save_checkpoint(self) -> None:
        """Write the checkpoint (rank 0; the others wait), after checking that every loss,
        gradient and weight is finite: a diverged state never replaces the last good one."""
        store = self.checkpoint
        self.sync()
        floats = [(name, t) for name, t in self.model.state_dict().items()
                  if isinstance(t, torch.Tensor) and t.is_floating_point()]
        finite = torch.stack([torch.isfinite(t).all() for _, t in floats]).cpu() if floats else torch.ones(1, dtype=torch.bool)
        if not bool(finite.all()):
            bad = floats[int((~finite).nonzero()[0])][0]
            raise FloatingPointError(
                f"lumos.fit: `{bad}` holds NaN or inf at step {self.step} (epoch {self.epoch}) although every "
                f"loss and gradient was finite; lower `lr`. The last good checkpoint"
                + (f" (saved after {store.saved_step} steps) is kept at `{store.path}`" if store.saved_step is not None
                   else f" was not written (`{store.path}` is left as it was)"))
        data = {"format": FORMAT, "version": VERSION, "model": model_fingerprint(self.model),
                "settings": store.settings, "state": self.state_dict()}
        if self.ranks is None or self.ranks.main:
            save_atomic(data, store.path)
        if self.ranks is not None:
            ddp.barrier(self.ranks)
        store.saved_step = self.step

    def resume(self, changed: dict, lr: float | None, fit_built_optimizer: bool) -> None:
        """After :meth:`load_state_dict`: apply a new ``lr`` (the only hyper-parameter a resumed
        run may change besides ``precision`` and ``epochs``) and say that the run resumed."""
        store = self.checkpoint
        if "lr" in changed:
            if not fit_built_optimizer or self.scheduler is not None:
                raise ValueError(f"lumos.fit: checkpoint `{store.path}` was written with lr={changed['lr'][0]!r}; "
                                 f"a new lr ({lr!r}) can be applied only to the optimizer fit builds, without a "
                                 "scheduler; resume with the same lr")
            for group, fresh in zip(self.optimizer.param_groups, param_groups(self.model, lr)):
                group["lr"] = fresh["lr"]
        store.saved_step = self.step
        self.history.resumed_from = {"path": str(store.path), "epoch": self.epoch, "step": self.step}
        if self.ranks is None or self.ranks.main:
            where = f"epoch {self.epoch}" + (f", batch {self.batch}" if self.batch else "")
            notes = "".join(f"; {k} {old!r} -> {new!r}" for k, (old, new) in changed.items())
            print(f"lumos.fit: resuming from `{store.path}` after {self.step} steps ({where}){notes}", file=sys.stderr)


def _check_positive_int(value, name: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"lumos.fit: `{name}` must be a positive int, got {value!r}")


def fit(model: nn.Module, train, val=None, *, loss_fn: Callable = nn.functional.mse_loss,
        metric: Callable | None = None, epochs: int = 50, lr: float = 1e-3, batch_size: int = 256,
        target: float | None = None, cost: str = "params", lam: float = 0.0,
        optimizer: torch.optim.Optimizer | None = None, scheduler=None, scheduler_interval: str = "epoch",
        patience: int | None = None, tolerance: float = 0.02, noise_schedule: NoiseRangeSchedule | None = None,
        restore_best: bool | None = None, callbacks: Iterable[Callback] = (), progress: bool = True,
        seed: int | None = None, controller_options: dict | None = None, checkpoint=None,
        checkpoint_every: int | None = None, precision: str = "fp32", compile: bool = False,
        distributed: bool | None = None, description: str = "lumos.fit") -> History:
    """Train ``model`` on ``train``, with the L0 penalty when it has gates; returns a :class:`History`.

    Args:
        model: a gated model from :func:`lumos.gate` (a plain model trains without penalty),
            on the device to train on.
        train, val: ``(inputs, target)`` tensors or NumPy arrays (``inputs`` a tensor or a tuple
            of them, one per positional argument of the model), or re-iterables of such batches
            (see :mod:`lumos.train.data`).
        loss_fn: task loss ``loss_fn(pred, target)``; default MSE. Targets are checked against
            it: same shape as the output and floating point for regression losses, class
            indices in range for ``cross_entropy``.
        metric: optional ``metric(pred, target) -> float`` reported on ``val``.
        epochs, lr, batch_size: the usual (``batch_size`` is the global batch of a
            data-parallel run). Without ``optimizer``, Adam over :func:`lumos.param_groups`
            (gate logits at ``GATE_LR_SCALE * lr``).
        target: budget as the fraction of ``cost`` to keep, in (0, 1]; drives a
            :class:`BudgetController`. None: fixed weight ``lam`` on the expected fraction kept.
        cost: ``"params"``, ``"flops"`` or ``"count"``.
        lam: weight of the penalty when ``target`` is None.
        scheduler: an LR scheduler over ``optimizer``, or a function ``optimizer -> scheduler``
            (for the optimizer fit builds); stepped after every epoch (``ReduceLROnPlateau``
            with the validation loss) or, with ``scheduler_interval="step"``, every step.
        patience: stop after this many epochs in a row without a better validation loss (with a
            ``target``, counting only epochs within budget); None: never.
        tolerance: with a ``target``, an epoch counts as best only if its kept fraction is at
            most ``target + tolerance``; a run that ends farther than ``tolerance`` from the
            target warns (``History.target_met``).
        noise_schedule: anneal the gates' noise range per epoch (LUMOS reference variant).
        restore_best: load the weights of the best epoch at the end. Default: yes with a
            ``target`` (best within budget) or for an ungated model; no for a fixed ``lam``,
            where an early epoch would undo the pruning.
        callbacks: :class:`Callback` objects (logging...).
        progress: show a progress bar (tqdm), updated once per epoch.
        seed: seed torch's global RNG (dropout; ``seed + rank`` in a data-parallel run), the
            shuffling and the gates' noise, for a reproducible run; None (default) touches no
            global state: shuffling then draws its seed from torch's RNG, and the gates keep
            their sampler's seed and step.
        controller_options: keyword arguments for the :class:`BudgetController` (``warmup``,
            ``anneal``, ``lock``...); ``lookahead`` defaults to the momentum of the optimizer's
            gate-logit group (:func:`lumos.train.budget.momentum_lookahead`: 9 for Adam's 0.9,
            0 for SGD without momentum).
        checkpoint: a file path. The run is saved there every ``checkpoint_every`` steps and at
            the end of every epoch (atomically: never a partial file); if the file exists, fit
            resumes from it (and says so on stderr) and ends with the same weights, to the bit
            on CPU, as a run never interrupted. A file from another model or with other
            settings that matter (data, ``batch_size``, ``target``, ``cost``, ``lam``, ``seed``,
            ``loss_fn``, processes...) or a truncated one is refused and left as it is; ``lr``,
            ``precision`` and ``epochs`` (without a ``target``) may change on resume.
        checkpoint_every: steps between checkpoints (None: at epoch ends only).
        precision: ``"fp32"`` or ``"bf16"`` (the forward under ``torch.autocast`` in bfloat16,
            weights and optimizer in float32; CPU or CUDA).
        compile: run the forward through ``torch.compile`` (training and validation).
        distributed: True: data-parallel over the processes of ``torchrun`` (DDP, each process
            computing ``batch_size / N`` rows of every batch, metrics combined over the ranks,
            checkpoints written by rank 0); None (default): so when a process group of more
            than one process is initialised or torchrun started more than one; False: never.
            See :mod:`lumos.train.distributed`.

    Raises:
        FloatingPointError: a loss, gradient or weight became NaN or inf; the message names the
            step and where the last good checkpoint is.
    """
    from tqdm.auto import tqdm

    who = "lumos.fit"
    if not isinstance(model, nn.Module):
        raise TypeError(f"{who}: `model` must be an nn.Module, got {type(model).__name__}")
    if isinstance(model, nn.parallel.DistributedDataParallel):
        raise TypeError(f"{who}: pass the model itself, not a DistributedDataParallel wrapper; "
                        "fit(..., distributed=True) wraps it")
    _check_positive_int(epochs, "epochs")
    _check_positive_int(batch_size, "batch_size")
    if checkpoint_every is not None:
        _check_positive_int(checkpoint_every, "checkpoint_every")
        if checkpoint is None:
            raise ValueError(f"{who}: `checkpoint_every` needs a `checkpoint` path to write to")
    if scheduler_interval not in ("epoch", "step"):
        raise ValueError(f"{who}: `scheduler_interval` must be 'epoch' or 'step', got {scheduler_interval!r}")
    check_cost(cost, who)
    if isinstance(lam, bool) or not isinstance(lam, (int, float)) or not math.isfinite(lam) or lam < 0:
        raise ValueError(f"{who}: `lam` must be a finite weight >= 0, got {lam!r}")
    device = _model_device(model)
    precision = check_precision(precision, device, who)
    gated = bool(gates_of(model))
    if gated:
        check_finite_gates(model, who)
    if target is not None:
        check_target(target, who)
        if not gated:
            raise ValueError(f"{who}: `target` needs a gated model; make it with lumos.gate(model, example_inputs)")
    ranks = ddp.ranks_for_fit(distributed, device, who)
    dtype = _model_dtype(model)
    features = has_feature_gate(model)
    train_data, val_data = as_data(train, "train", who, dtype, features), as_data(val, "val", who, dtype, features)
    if ranks is not None:
        ddp.per_rank_batch(batch_size, ranks, who)
    probe_inputs = _check_first_batches(model, train_data, val_data, loss_fn, features)
    if seed is not None:
        torch.manual_seed(seed + (ranks.rank if ranks is not None else 0))
        if hasattr(model, "gate_sampler"):
            model.gate_sampler.reseed(seed)
    shuffle_seed = seed if seed is not None else int(torch.randint(2**62, ()))
    if ranks is not None:  # every rank shuffles alike and draws rank 0's gate noise
        sampler = model_sampler(model)
        shuffle_seed, sampler_state = ddp.broadcast_object(
            (shuffle_seed, sampler.state_dict() if sampler is not None else None), ranks)
        if sampler is not None:
            sampler.load_state_dict(sampler_state)
        if isinstance(train_data, LoaderData):
            train_data.loader = ddp.shard_loader(train_data.loader, ranks, shuffle_seed % 2**31, who)
    generator = torch.Generator().manual_seed(shuffle_seed)
    fit_built_optimizer = optimizer is None
    optimizer = optimizer if optimizer is not None else torch.optim.Adam(param_groups(model, lr))
    controller = None
    if target is not None:
        options = {"lookahead": momentum_lookahead(optimizer, model, who), **(controller_options or {})}
        controller = BudgetController(model, target, epochs * _steps_per_epoch(train_data, batch_size), cost,
                                      who=who, **options)
        too_short = anneal_too_short(controller, optimizer)
        if too_short is not None and (ranks is None or ranks.main):
            why, steps = too_short
            warnings.warn(f"{who}: {why}: train for at least {math.ceil(steps * epochs / controller.total_steps)} "
                          f"epochs, or give the gate logits a larger learning rate "
                          "(optimizer=torch.optim.Adam(lumos.param_groups(model, lr, gate_lr=...)))",
                          RuntimeWarning, stacklevel=2)
    scheduler = _scheduler(scheduler, optimizer, who)
    store = None
    if checkpoint is not None:
        settings = _settings(model, train_data, epochs=epochs, batch_size=batch_size, lr=lr if fit_built_optimizer
                             else None, optimizer=optimizer, target=target, cost=cost, lam=lam, seed=seed,
                             loss_fn=loss_fn, precision=precision, controller=controller,
                             controller_options=controller_options, noise_schedule=noise_schedule,
                             scheduler=scheduler, scheduler_interval=scheduler_interval, ranks=ranks)
        store = CheckpointFile(checkpoint, checkpoint_every, settings, who)
    loop = FitLoop(model, optimizer, loss_fn, controller=controller, lam=lam, cost=cost, tolerance=tolerance,
                   callbacks=callbacks, scheduler=scheduler, scheduler_interval=scheduler_interval,
                   generator=generator, ranks=ranks, checkpoint=store, precision=precision)
    loop.probe_inputs = probe_inputs
    if store is not None:
        _resume_if_saved(loop, store, lr, fit_built_optimizer)
    loop.forward, loop.eval_forward = forward_modules(
        model, device, precision=precision, compile=compile,
        ddp=(lambda module: ddp.wrap_ddp(module, ranks)) if ranks is not None else None)
    for callback in loop.callbacks:
        callback.on_fit_start(loop)
    done = loop.history.stopped_early or loop.epoch >= epochs
    bar = tqdm(total=epochs, initial=min(loop.epoch, epochs), desc=description,
               disable=not progress or (ranks is not None and not ranks.main), leave=True)
    while not done:
        if noise_schedule is not None:
            noise_schedule.apply(model, loop.epoch)
        row = loop.run_epoch(train_data, batch_size)
        score = row["train_loss"]
        if val_data is not None:
            row["val_loss"], row["val_metric"] = evaluate(loop.eval_forward, val_data, loss_fn, metric, ranks=ranks)
            score = row["val_loss"]
        bar.update(1)
        bar.set_postfix({k: (f"{v:.4g}" if isinstance(v, float) else v) for k, v in row.items()
                         if k in ("train_loss", "val_loss", "val_metric", "kept_fraction", "lam")})
        stop = loop.end_epoch(row, score, patience)
        loop.history.stopped_early = stop
        loop.warn_if_constant()
        if store is not None:
            loop.save_checkpoint()
        done = stop or loop.epoch >= epochs
    bar.close()
    if restore_best is None:
        restore_best = controller is not None or not gated
    return loop.finish(restore_best)


def _resume_if_saved(loop: FitLoop, store: CheckpointFile, lr: float, fit_built_optimizer: bool) -> None:
    """Load ``store`` into ``loop`` if the file exists (on every rank, which must all see it)."""
    ranks, who = loop.ranks, store.who
    if ranks is None or ranks.main:
        remove_stale_temp(store.path)
    exists = store.path.exists()
    if ranks is not None:
        seen = ddp.gather_objects(exists, ranks)
        if len(set(seen)) > 1:
            raise RuntimeError(f"{who}: checkpoint `{store.path}` exists for ranks "
                               f"{[r for r, e in enumerate(seen) if e]} only; it must be on a file system every "
                               "process sees")
    if not exists:
        return
    data = read_checkpoint(store.path, who, map_location=loop.device)
    changed = check_fingerprint(data, loop.model, store.settings, store.path, who)
    loop.load_state_dict(data["state"])
    loop.resume(changed, lr, fit_built_optimizer)


def _scheduler(scheduler, optimizer: torch.optim.Optimizer, who: str):
    """The LR scheduler: as given, or built by a function of the optimizer."""
    kinds = (torch.optim.lr_scheduler.LRScheduler, torch.optim.lr_scheduler.ReduceLROnPlateau)
    if scheduler is None or isinstance(scheduler, kinds):
        return scheduler
    if isinstance(scheduler, type) or not callable(scheduler):
        raise TypeError(f"{who}: `scheduler` must be an LR scheduler or a function optimizer -> scheduler "
                        f"(e.g. lambda opt: torch.optim.lr_scheduler.StepLR(opt, 10)), got {scheduler!r}")
    built = scheduler(optimizer)
    if not isinstance(built, kinds):
        raise TypeError(f"{who}: `scheduler`(optimizer) returned {type(built).__name__}, not an LR scheduler")
    return built


def _settings(model: nn.Module, train, *, ranks, controller, optimizer, loss_fn, controller_options, noise_schedule,
              scheduler, **values) -> dict:
    """What a checkpoint must agree on to be resumed by this call (plain data)."""
    if isinstance(train, TensorData):
        tensors = (*train.inputs, train.target)
        data = {"rows": train.rows, "shapes": [list(t.shape) for t in tensors],
                "sums": [float(t.double().sum()) for t in tensors]}
    else:
        data = {"batches": len(train.loader) if hasattr(train.loader, "__len__") else None}
    return {
        **values, "train": data, "processes": ranks.world if ranks is not None else 1,
        "optimizer": type(optimizer).__name__, "loss_fn": getattr(loss_fn, "__qualname__", type(loss_fn).__qualname__),
        "budget_steps": controller.total_steps if controller is not None else None,
        "controller_options": repr(sorted((controller_options or {}).items())),
        "noise_schedule": repr(vars(noise_schedule)) if noise_schedule is not None else None,
        "scheduler": type(scheduler).__name__ if scheduler is not None else None,
    }


def _steps_per_epoch(data: TensorData | LoaderData, batch_size: int) -> int:
    if isinstance(data, TensorData):
        return -(-data.rows // batch_size)
    try:
        return len(data.loader)
    except TypeError:  # a loader without a length: count one pass
        return sum(1 for _ in data.loader)


def _check_first_batches(model: nn.Module, train, val, loss_fn: Callable, features: bool) -> tuple:
    """Check the targets against the model's output before any training (loaders: first batch;
    ``features``: the model has an input feature gate, see :func:`check_tensors`); returns a few
    training rows (:data:`PROBE_ROWS`) for the collapse check."""
    device = _model_device(model)
    first_inputs = ()
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
            check_tensors(inputs, target, "lumos.fit", f"the first batch of `{name}`", features)
        if name == "train":
            first_inputs = _to(tuple(t[:PROBE_ROWS] for t in inputs), device)
        check_against_model(model, _to(tuple(t[:8] for t in inputs), device), target, loss_fn,
                            "lumos.fit", f"`{name}`")
    return first_inputs
