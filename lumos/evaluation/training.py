"""Train and evaluate a model on a built-in workload, whatever the form of its data.

Tensor-pair workloads go through :func:`lumos.fit`. Graph workloads yield batches
``((x, edge_index, edge_attr, batch), y)`` whose inputs do not have one row per sample (nodes
and edges, not graphs); ``lumos.fit`` checks every input against the target's rows and refuses
them, so :func:`_fit_graph_batches` runs the same loop from lumos' own pieces
(:class:`lumos.train.FitLoop`, :class:`lumos.BudgetController`, :func:`lumos.param_groups`) with
``fit``'s defaults. :func:`lumos.train.evaluate` takes both forms.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from torch import nn

from ..train import BudgetController, FitLoop, History, evaluate, fit, param_groups
from ..train.data import LoaderData
from ..train.forward import forward_modules
from ..workloads import Workload

TOLERANCE = 0.02  # lumos.fit's default: an epoch within target + 0.02 counts as within budget


@dataclass
class Phase:
    """One training phase: its name, what :func:`lumos.fit` recorded, and its wall time (s)."""

    name: str
    history: History
    seconds: float


def _tensor_pairs(work: Workload) -> bool:
    return isinstance(work.train, tuple)


def train(model: nn.Module, work: Workload, epochs: int, *, name: str, seed: int = 0, target: float | None = None,
          cost: str = "params", progress: bool = False, fit_options: dict | None = None) -> Phase:
    """Train ``model`` on ``work.train`` for ``epochs`` with the workload's loss, learning rate and
    batch size, selecting the best epoch on ``work.val`` (within budget, with a ``target``).

    ``fit_options``: more :func:`lumos.fit` arguments (``checkpoint``, ``checkpoint_every``,
    ``precision``, ``compile``, ``distributed``, ``test_inputs``); graph workloads, which do not
    train through ``lumos.fit``, refuse those that are set (but ``test_inputs``).
    """
    settings = dict(loss_fn=work.loss_fn, metric=work.metric, epochs=epochs, lr=work.fit_defaults["lr"],
                    batch_size=work.fit_defaults["batch_size"], seed=seed, progress=progress, description=name)
    if target is not None:
        settings.update(target=target, cost=cost)
    options = dict(fit_options or {})
    settings["test_inputs"] = options.pop("test_inputs", True)
    options = {k: v for k, v in options.items() if v not in (None, False, "fp32")}
    start = time.perf_counter()
    if _tensor_pairs(work):
        history = fit(model, work.train, work.val, **settings, **options)
    elif options:
        raise ValueError(f"lumos.evaluation.train: workload {work.name!r} trains on graph batches outside "
                         f"lumos.fit and cannot take {', '.join(sorted(options))}; run it without them")
    else:
        history = _fit_graph_batches(model, work.train, work.val, **settings)
    return Phase(name, history, time.perf_counter() - start)


def evaluate_split(model: nn.Module, work: Workload, split: str = "test") -> float:
    """The workload's metric of ``model`` (eval mode) on ``split``."""
    return evaluate(model, getattr(work, split), work.loss_fn, work.metric)[1]


def _fit_graph_batches(model: nn.Module, train, val, *, loss_fn, metric, epochs: int, lr: float, seed: int,
                       target: float | None = None, cost: str = "params", progress: bool = False,
                       description: str = "", batch_size: int = 0, test_inputs: bool = True) -> History:
    """``lumos.fit(model, train, val, ...)`` for re-iterables of graph batches (see the module docstring)."""
    from tqdm.auto import tqdm

    torch.manual_seed(seed)
    if hasattr(model, "gate_sampler"):
        model.gate_sampler.reseed(seed)
    dtype = next(p.dtype for p in model.parameters() if p.is_floating_point())
    train_data = LoaderData(train, "lumos.evaluation.train", "train", dtype)
    controller = None
    if target is not None:
        steps = epochs * sum(1 for _ in train)
        controller = BudgetController(model, target, steps, cost, who="lumos.evaluation.train")
    loop = FitLoop(model, torch.optim.Adam(param_groups(model, lr)), loss_fn, controller=controller, lam=0.0,
                   cost=cost, tolerance=TOLERANCE)
    loop.forward, loop.eval_forward = forward_modules(model, loop.device)
    val_data = LoaderData(val, "lumos.evaluation.train", "val", dtype)
    for _ in tqdm(range(epochs), desc=description, disable=not progress, leave=True):
        row = loop.run_epoch(train_data, batch_size)
        if test_inputs:
            loop.test_inputs_at_lock(val_data, row)
        row["val_loss"], row["val_metric"] = evaluate(loop.eval_forward, val_data, loss_fn, metric)
        loop.end_epoch(row, row["val_loss"], None)
    return loop.finish(restore_best=True)
