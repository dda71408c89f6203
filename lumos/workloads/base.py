"""The shape every built-in workload has: data splits, a model factory and the task metric."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn


@dataclass
class Workload:
    """A built-in SciML workload, generated offline and deterministically from a seed.

    Attributes:
        name: registry name, e.g. ``"cfd_flux"``.
        description: one line for ``lumos run --help`` and reports.
        train, val, test: ``(inputs, targets)`` pairs; inputs ``(n, n_features)`` float32,
            targets ``(n, n_targets)`` float32 (already standardised where that helps training).
        feature_names: one name per input column.
        informative_features: the columns the target really depends on (the known right
            answer for feature selection); every other column is a distractor.
        target_names: one name per target column.
        make_model: ``make_model(**kwargs) -> nn.Module``, the dense model the paper would train.
        loss_fn: training loss, ``loss_fn(pred, target) -> scalar tensor``.
        metric: ``metric(pred, target) -> float``, the task metric reported to the user.
        metric_name: e.g. ``"R2"``.
        higher_is_better: direction of ``metric``.
        fit_defaults: suggested ``lumos.fit`` keyword arguments (epochs, lr, batch_size).
        stats: standardisation statistics of the train split (e.g. ``x_mean``, ``x_scale``,
            ``y_mean``, ``y_scale``), to map inputs and predictions back to physical units.
    """

    name: str
    description: str
    train: tuple[torch.Tensor, torch.Tensor]
    val: tuple[torch.Tensor, torch.Tensor]
    test: tuple[torch.Tensor, torch.Tensor]
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

    @property
    def distractor_features(self) -> list[str]:
        """Columns the target does not depend on."""
        return [f for f in self.feature_names if f not in self.informative_features]
