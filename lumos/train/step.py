"""One training step (:func:`train_step`) and a model's loss and metric on data (:func:`evaluate`)."""
from __future__ import annotations

import math
from typing import Callable

import torch
from torch import nn

from ..cost import cost_model
from ..gates import step_gates_
from ..model import has_feature_gate
from . import distributed as ddp
from .budget import BudgetController
from .data import LoaderData, TensorData, as_data


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
