"""The state of a :func:`lumos.fit` run (:class:`FitLoop`: its epochs, syncs, checks and
checkpoints), the :class:`History` it returns and the :class:`Callback` hooks it calls."""
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
from ..gates import gates_of, model_sampler
from ..model import feature_gate_of
from . import distributed as ddp
from .budget import BudgetController
from .checkpoint import model_fingerprint, rng_states, save_atomic, set_rng_states, FORMAT, VERSION
from .data import LoaderData, TensorData
from .input_test import close_inputs_, drop_unneeded_inputs_
from .penalty import check_finite_gates, kept_fraction, param_groups
from .step import _model_device, _to, train_step


@dataclass
class History:
    """What :func:`fit` saw, one dict per epoch (``epoch, train_loss, val_loss, val_metric,
    kept_fraction, lam, seconds``), the epoch whose weights were restored (None if none was),
    with a ``target`` whether the run ended within ``tolerance`` of it, the inputs the test at
    the lock closed (``inputs_dropped``: one dict per input, ``name``, ``index``, ``rise``, ``z``;
    None before the test or without one, see :func:`lumos.train.input_test.drop_unneeded_inputs_`)
    and, for a run resumed from a checkpoint, ``resumed_from`` (``path``, ``epoch``, ``step``)."""

    epochs: list[dict] = field(default_factory=list)
    best_epoch: int | None = None
    stopped_early: bool = False
    target_met: bool | None = None
    resumed_from: dict | None = None
    inputs_dropped: list[dict] | None = None

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

    def test_inputs_at_lock(self, data: TensorData | LoaderData, row: dict) -> None:
        """Once, at the end of the first epoch in which the gates are locked: close the kept
        inputs the model does not use (:func:`lumos.train.input_test.drop_unneeded_inputs_` on
        ``data``; in a data-parallel run rank 0 decides), record them in ``row`` and the history
        and forget the best weights of earlier epochs, which had those inputs."""
        if (self.history.inputs_dropped is not None or self.controller is None or not self.controller.locked
                or feature_gate_of(self.model) is None):
            return
        main = self.ranks is None or self.ranks.main
        dropped = drop_unneeded_inputs_(self.model, data, self.loss_fn) if main else None
        if self.ranks is not None:  # the other ranks close what rank 0 closed
            dropped = ddp.broadcast_object(dropped, self.ranks)
            close_inputs_(self.model, [item["index"] for item in dropped])
        self.history.inputs_dropped = dropped
        row["inputs_dropped"] = [item["name"] for item in dropped]
        if dropped:
            self.best_score, self.best_epoch, self.best_state, self.bad_epochs = math.inf, None, None, 0
            row["kept_fraction"] = kept_fraction(self.model, self.cost)

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
