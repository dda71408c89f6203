"""What ``fit`` and ``evaluate`` accept as data, checked where the user passes it.

A *batch* is ``(inputs, target)``: ``inputs`` is a tensor or a tuple of tensors (the model's
positional arguments), ``target`` a tensor with one row per sample. A longer tuple
``(x1, x2, ..., target)`` means the same with the last element the target (what a
``DataLoader`` over a ``TensorDataset(x1, x2, y)`` yields). Data is either such a pair of whole
tensors (``fit`` batches and shuffles it) or any re-iterable of batches (a ``DataLoader``, a
list). NumPy arrays are converted: floating arrays to the model's dtype, integer arrays as
int64.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable, Iterator

import torch
from torch import nn

# Losses that compare an output with a target of the same shape, elementwise.
_SAME_SHAPE_LOSSES = {
    nn.functional.mse_loss: "regression", nn.functional.l1_loss: "regression",
    nn.functional.smooth_l1_loss: "regression", nn.functional.huber_loss: "regression",
    nn.functional.binary_cross_entropy_with_logits: "binary",
    nn.functional.binary_cross_entropy: "binary",
}
_SAME_SHAPE_MODULES = {nn.MSELoss: "regression", nn.L1Loss: "regression", nn.SmoothL1Loss: "regression",
                       nn.HuberLoss: "regression", nn.BCEWithLogitsLoss: "binary", nn.BCELoss: "binary"}
_CLASS_LOSSES = (nn.functional.cross_entropy, nn.functional.nll_loss)
_CLASS_MODULES = (nn.CrossEntropyLoss, nn.NLLLoss)


def loss_kind(loss_fn: Callable) -> str | None:
    """``"regression"``, ``"binary"``, ``"classification"`` for the losses torch ships, else None."""
    if loss_fn in _SAME_SHAPE_LOSSES:
        return _SAME_SHAPE_LOSSES[loss_fn]
    for module_type, kind in _SAME_SHAPE_MODULES.items():
        if isinstance(loss_fn, module_type):
            return kind
    if loss_fn in _CLASS_LOSSES or isinstance(loss_fn, _CLASS_MODULES):
        return "classification"
    return None


def _as_tensor(value, what: str, who: str, dtype: torch.dtype) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        return value
    if type(value).__module__ == "numpy" and hasattr(value, "dtype"):
        tensor = torch.from_numpy(value) if value.dtype.kind in "fiub" else None
        if tensor is None:
            raise TypeError(f"{who}: {what} is a NumPy array of dtype {value.dtype}; pass numbers")
        return tensor.to(dtype) if tensor.is_floating_point() else tensor.long() if value.dtype.kind in "iu" \
            else tensor
    raise TypeError(f"{who}: {what} must be a torch.Tensor or a NumPy array, got {type(value).__name__}")


def split_batch(batch, who: str, what: str, dtype: torch.dtype) -> tuple[tuple[torch.Tensor, ...], torch.Tensor]:
    """``(inputs, target)`` of one batch, as a tuple of input tensors and a target tensor."""
    if not isinstance(batch, (tuple, list)) or len(batch) < 2:
        raise TypeError(f"{who}: {what} must be (inputs, target) or (input_1, ..., input_k, target), "
                        f"got {type(batch).__name__}" + (f" of length {len(batch)}" if isinstance(batch, (tuple, list)) else ""))
    *inputs, target = batch
    if len(inputs) == 1 and isinstance(inputs[0], (tuple, list)):
        inputs = list(inputs[0])
    inputs = tuple(_as_tensor(t, f"{what} input {i}", who, dtype) for i, t in enumerate(inputs))
    return inputs, _as_tensor(target, f"{what} target", who, dtype)


@dataclass
class TensorData:
    """Whole tensors: ``inputs`` (a tuple) and ``target``, batched and shuffled by ``fit``."""

    inputs: tuple[torch.Tensor, ...]
    target: torch.Tensor

    @property
    def rows(self) -> int:
        return self.target.shape[0]

    def batches(self, batch_size: int, generator: torch.Generator | None = None, ranks=None,
                pad: bool = True) -> Iterator[tuple]:
        """Batches of ``batch_size`` rows, in a random order drawn from ``generator`` if given.

        With ``ranks`` (a :class:`lumos.train.distributed.Ranks`), this rank's share of that
        order: with ``pad``, DistributedSampler's (every rank as many rows, the k-th batches of
        all ranks together being the k-th block of the order), else every ``world``-th row from
        ``rank`` (evaluation: no row twice)."""
        order = torch.randperm(self.rows, generator=generator) if generator is not None else None
        if ranks is not None:
            from .distributed import shard_positions

            positions = shard_positions(self.rows, ranks) if pad else torch.arange(ranks.rank, self.rows, ranks.world)
            order = positions if order is None else order[positions]
        total = self.rows if order is None else order.numel()
        for start in range(0, total, batch_size):
            if order is None:
                rows = slice(start, start + batch_size)
            else:
                rows = order[start:start + batch_size].to(self.target.device)
            yield tuple(t[rows] for t in self.inputs), self.target[rows]


@dataclass
class LoaderData:
    """A re-iterable of batches (a ``DataLoader``, a list); batches are split as they come."""

    loader: Iterable
    who: str
    name: str
    dtype: torch.dtype

    def batches(self, batch_size: int = 0, generator=None, ranks=None, pad: bool = True) -> Iterator[tuple]:
        """The loader's batches as they come (a loader shards itself: see
        :func:`lumos.train.distributed.shard_loader`)."""
        for index, batch in enumerate(self.loader):
            yield split_batch(batch, self.who, f"batch {index} of `{self.name}`", self.dtype)

    def set_epoch(self, epoch: int) -> None:
        """Tell the loader (one with its own ``set_epoch``, like a
        :class:`~lumos.workloads.graphs.GraphSet`) or its sampler (a DistributedSampler) which
        epoch's order to draw."""
        for source in (self.loader, getattr(self.loader, "sampler", None)):
            if hasattr(source, "set_epoch"):
                source.set_epoch(epoch)
                return


def as_data(data, name: str, who: str, dtype: torch.dtype,
            features: bool = True) -> TensorData | LoaderData | None:
    """Wrap what the user passed as ``name`` (``train`` or ``val``) after checking it
    (``features``: see :func:`check_tensors`)."""
    if data is None:
        return None
    if isinstance(data, (tuple, list)) and len(data) >= 2 and _is_array(data[-1]):
        inputs, target = split_batch(data, who, f"`{name}`", dtype)
        check_tensors(inputs, target, who, f"`{name}`", features)
        return TensorData(inputs, target)
    if _is_array(data) or not isinstance(data, Iterable):
        raise TypeError(f"{who}: `{name}` must be (inputs, target) tensors or arrays, or a re-iterable of "
                        f"(inputs, target) batches such as a DataLoader; got {type(data).__name__}")
    if iter(data) is data:
        raise ValueError(f"{who}: `{name}` is a one-shot iterator; pass (inputs, target) tensors or a "
                         "re-iterable loader (a DataLoader, a list), which every epoch can read again")
    return LoaderData(data, who, name, dtype)


def _is_array(value) -> bool:
    """A tensor or NumPy array: the target of whole-data ``(inputs..., target)``, where a list of
    batches ends with a batch."""
    return isinstance(value, torch.Tensor) or (type(value).__module__ == "numpy" and hasattr(value, "dtype"))


def check_tensors(inputs: tuple[torch.Tensor, ...], target: torch.Tensor, who: str, what: str,
                  features: bool = True) -> None:
    """Rows agree, nothing is NaN or inf, and with ``features`` (the model has an input
    :class:`lumos.nn.FeatureGate`, which scales its first input) the first input is floating point."""
    if target.dim() == 0:
        raise ValueError(f"{who}: {what} target must have one row per sample, got a scalar")
    rows = target.shape[0]
    for i, t in enumerate(inputs):
        if t.dim() == 0 or t.shape[0] != rows:
            raise ValueError(f"{who}: {what} input {i} has {t.shape[0] if t.dim() else 0} rows but the target "
                             f"has {rows}")
    if features and not inputs[0].is_floating_point():
        raise TypeError(f"{who}: {what} inputs must be floating point, got {inputs[0].dtype}; "
                        "convert them with .float() (integer inputs such as token ids need a model gated "
                        "with lumos.gate(..., features=False))")
    for label, t in [(f"input {i}", t) for i, t in enumerate(inputs)] + [("target", target)]:
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            bad = (~torch.isfinite(t)).nonzero()[0].tolist()
            raise ValueError(f"{who}: {what} {label} contains NaN or inf (first at index {bad})")


def check_against_model(model: nn.Module, inputs: tuple, target: torch.Tensor, loss_fn: Callable,
                        who: str, what: str) -> None:
    """Run the model on a few rows (eval mode, no gradient) and check the target fits its output
    for ``loss_fn``: same shape for elementwise losses (an ``(n,)`` target against an
    ``(n, 1)`` output would broadcast), floating targets for regression, class indices in
    range for classification."""
    kind = loss_kind(loss_fn)
    if kind in ("regression", "binary") and not target.is_floating_point():
        raise TypeError(f"{who}: {what} target has integer dtype {target.dtype} but `loss_fn` is a "
                        f"{kind} loss; pass floating-point targets (.float()), or a classification loss "
                        "(torch.nn.functional.cross_entropy) for class labels")
    rows = slice(0, min(8, target.shape[0]))
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            out = model(*(t[rows] for t in inputs))
    finally:
        model.train(was_training)
    if not isinstance(out, torch.Tensor):
        raise TypeError(f"{who}: the model returned {type(out).__name__}; fit needs a tensor output "
                        "(write your own loop around lumos.BudgetController for other outputs)")
    sample = target[rows].to(out.device)
    if kind in ("regression", "binary") and out.shape != sample.shape:
        raise ValueError(f"{who}: {what} target has shape {tuple(sample.shape)} per {rows.stop} rows but the "
                         f"model outputs {tuple(out.shape)}; they must match ({kind} loss compares them "
                         "elementwise and would broadcast), e.g. y.reshape(-1, 1) or y.squeeze(-1)")
    if kind == "classification":
        if sample.is_floating_point():
            if sample.shape != out.shape:
                raise ValueError(f"{who}: {what} target has shape {tuple(sample.shape)}; class probabilities "
                                 f"must match the model output {tuple(out.shape)}")
        else:
            classes = out.shape[1] if out.dim() > 1 else out.shape[0]
            full = target.to(out.device)
            low, high = int(full.min()), int(full.max())
            if low < 0 or high >= classes:
                raise ValueError(f"{who}: {what} target holds class {low if low < 0 else high} but the model "
                                 f"outputs {classes} classes (indices 0..{classes - 1})")
