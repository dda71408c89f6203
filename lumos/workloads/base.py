"""The shape every built-in workload has: data splits, a model factory and the task metric."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn

from ..metrics import r2_score

SIZES = ("small", "full")

# Workload fields shared by the R2 regression workloads.
R2_REGRESSION = dict(loss_fn=nn.functional.mse_loss, metric=r2_score, metric_name="R2", higher_is_better=True)


@dataclass
class Workload:
    """A built-in SciML workload, generated offline and deterministically from a seed.

    Attributes:
        name: registry name, e.g. ``"cfd_flux"``.
        description: one line for ``lumos run --help`` and reports.
        train, val, test: ``(inputs, targets)`` tensor pairs (inputs ``(n, ...)`` float32 with the
            named features on ``feature_dim``), or, for graph workloads, a
            :class:`lumos.workloads.graphs.GraphSet` that iterates over ``((x, edge_index,
            edge_attr, batch), targets)`` batches.
        feature_names: one name per input feature (a column, a channel, a node feature).
        informative_features: the features the target really depends on (the known right answer
            for feature selection); every other feature is a distractor.
        target_names: one name per target column (or class, for classification).
        make_model: ``make_model(**kwargs) -> nn.Module``, the dense model the paper would train.
        loss_fn: training loss, ``loss_fn(pred, target) -> scalar tensor``.
        metric: ``metric(pred, target) -> float``, the task metric reported to the user.
        metric_name: ``"R2"``, ``"MSE"`` or ``"accuracy"``.
        higher_is_better: direction of ``metric``.
        fit_defaults: ``lumos.fit`` keyword arguments for this size (``epochs``, ``lr``,
            ``batch_size``); ``fine_tune_epochs`` for the fine-tuning after pruning.
        stats: standardisation statistics of the train split, to map inputs and predictions back
            to physical units (see each workload's docstring).
        feature_dim: the dimension of the first input that holds the named features (-1 for
            tabular rows and node features, 1 for the channels of fields and images).
        size: ``"small"`` (tests, CI) or ``"full"`` (real runs); ``cfd_flux`` also has ``"demo"``
            (what ``lumos demo`` runs).
        seed: the seed the data was generated from.
        unit: what one sample is (``"row"``, ``"field"``, ``"image"``, ``"graph"``), for reports.
    """

    name: str
    description: str
    train: object
    val: object
    test: object
    feature_names: list[str]
    informative_features: list[str]
    target_names: list[str]
    make_model: Callable[..., nn.Module]
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    metric: Callable[[torch.Tensor, torch.Tensor], float]
    metric_name: str
    higher_is_better: bool = True
    fit_defaults: dict = field(default_factory=dict)
    stats: dict = field(default_factory=dict)
    feature_dim: int = -1
    size: str = "full"
    seed: int = 0
    unit: str = "row"

    @property
    def distractor_features(self) -> list[str]:
        """Features the target does not depend on."""
        return [f for f in self.feature_names if f not in self.informative_features]

    def inputs(self, split: str = "val", n: int = 64) -> tuple:
        """The model inputs of the first ``n`` samples of ``split`` (``"train"``, ``"val"``,
        ``"test"``), as a tuple to call ``model(*inputs)`` with."""
        data = getattr(self, split)
        if hasattr(data, "inputs"):
            return data.inputs(n)
        return (data[0][:n],)


def check_size(size: str, who: str, sizes=SIZES) -> str:
    """``size`` if it is one of ``sizes`` (every workload has ``"small"`` and ``"full"``), else a
    ValueError naming ``who``."""
    if size not in sizes:
        raise ValueError(f"{who}: `size` must be one of {', '.join(sizes)}, got {size!r}")
    return size


def split_rows(x: torch.Tensor, y: torch.Tensor, n_train: int, n_val: int) -> tuple[tuple, tuple, tuple]:
    """``(train, val, test)`` pairs: the first ``n_train`` rows, the next ``n_val``, the rest."""
    cuts = [0, n_train, n_train + n_val, x.shape[0]]
    return tuple((x[a:b], y[a:b]) for a, b in zip(cuts, cuts[1:]))


def standardise(x: torch.Tensor, n_train: int, dims: tuple[int, ...] = (0,)) -> tuple[torch.Tensor, dict]:
    """``x`` standardised with the mean and std of its first ``n_train`` rows over ``dims``;
    returns the float32 tensor and ``{"mean", "scale"}`` (float64) to undo it."""
    train = x[:n_train].double()
    mean, scale = train.mean(dims, keepdim=True), train.std(dims, keepdim=True).clamp_min(1e-12)
    return ((x.double() - mean) / scale).float(), {"mean": mean, "scale": scale}


def standardise_table(x: torch.Tensor, y: torch.Tensor, n_train: int) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """Tabular inputs ``(n, f)`` and targets ``(n, k)`` standardised per column with the first
    ``n_train`` rows; ``stats`` holds ``x_mean``, ``x_scale`` ``(f,)`` and ``y_mean``, ``y_scale``
    ``(k,)`` (float64) to undo it."""
    x, x_stats = standardise(x, n_train)
    y, y_stats = standardise(y, n_train)
    stats = {"x_mean": x_stats["mean"][0], "x_scale": x_stats["scale"][0],
             "y_mean": y_stats["mean"][0], "y_scale": y_stats["scale"][0]}
    return x, y, stats


def size_params(sizes: dict[str, dict], size: str, overrides: dict, who: str) -> dict:
    """The parameters of ``size`` from a workload's ``SIZES`` table, updated by ``overrides``
    (each must name a known parameter; None keeps the size's value)."""
    check_size(size, who, tuple(sizes))
    params = dict(sizes[size])
    unknown = sorted(set(overrides) - set(params))
    if unknown:
        raise TypeError(f"{who}: unknown argument(s) {', '.join(unknown)}; known: {', '.join(sorted(params))}")
    params.update({k: v for k, v in overrides.items() if v is not None})
    return params


FIT_KEYS = ("epochs", "lr", "batch_size", "fine_tune_epochs")


def fit_defaults(params: dict) -> dict:
    """The ``lumos.fit`` settings among a workload's size parameters."""
    return {k: params[k] for k in FIT_KEYS if k in params}


def mlp(n_in: int, hidden, n_out: int, activation=nn.SiLU) -> nn.Sequential:
    """``n_in -> hidden[0] -> ... -> n_out`` linear layers with ``activation()`` after each hidden one."""
    layers, width = [], n_in
    for h in hidden:
        layers += [nn.Linear(width, h), activation()]
        width = h
    return nn.Sequential(*layers, nn.Linear(width, n_out))


def uniform(n: int, low_high: tuple[float, float], generator: torch.Generator) -> torch.Tensor:
    """``(n,)`` float64 draws, uniform in ``[low, high)``."""
    low, high = low_high
    return low + (high - low) * torch.rand(n, generator=generator, dtype=torch.float64)
