"""``lumos.fit``: a small training loop built from :func:`train_step`, with callbacks,
checkpoints that resume exactly, divergence and collapse checks, bf16, ``torch.compile`` and DDP.

Per training step the loop runs one forward, one sampling call for every gate, one
vectorised cost evaluation, backward and the optimiser, and keeps the task loss and the
gradients' norm as device tensors; it reads them back once per epoch and before each
checkpoint (a *sync*), where a non-finite value stops the run naming its step.
"""
from __future__ import annotations

import math
import warnings
from typing import Callable, Iterable

import torch
from torch import nn

from ..cost import check_cost
from ..gates import gates_of, model_sampler
from ..model import has_feature_gate
from . import distributed as ddp
from .budget import BudgetController, anneal_too_short, check_target, momentum_lookahead
from .checkpoint import check_fingerprint, read_checkpoint, remove_stale_temp
from .data import LoaderData, TensorData, as_data, check_against_model, check_tensors
from .fit_loop import Callback, CheckpointFile, FitLoop, History
from .forward import check_precision, forward_modules
from .noise import NoiseRangeSchedule
from .penalty import check_finite_gates, kept_fraction, param_groups
from .step import _model_device, _model_dtype, _to, evaluate

PROBE_ROWS = 64  # training rows the collapse check runs the model on


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
        distributed: bool | None = None, test_inputs: bool = True, description: str = "lumos.fit") -> History:
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
        test_inputs: with a ``target`` and an input feature gate, at the end of the epoch in which
            the gates lock, close each kept input whose shuffling across rows of ``val`` (else
            ``train``) does not raise the loss by 2 standard errors: the gates can keep an input
            that carries nothing (:mod:`lumos.train.input_test`; ``History.inputs_dropped``).

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
    if not isinstance(test_inputs, bool):
        raise TypeError(f"{who}: `test_inputs` must be True or False, got {test_inputs!r}")
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
                             scheduler=scheduler, scheduler_interval=scheduler_interval, ranks=ranks,
                             # only when off: checkpoints written before the test existed still resume
                             **({} if test_inputs else {"test_inputs": False}))
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
        if test_inputs:
            loop.test_inputs_at_lock(val_data if val_data is not None else train_data, row)
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
