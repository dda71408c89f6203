"""lumos: shrink scientific-ML models in one training run.

Learned L0 (hard-concrete) gates decide which input features matter and how wide every layer
should be; :func:`compact` then turns the gated model into a plain, smaller PyTorch model.

    gated = lumos.gate(model, x_example, feature_names=names)
    history = lumos.fit(gated, (x, y), val=(x_val, y_val), target=0.2)
    small = lumos.compact(gated, x_example)
    print(lumos.report(gated).to_markdown())
"""
from . import nn
from .compact import CompactionError, TraceError, compact
from .convert import gate
from .gates import GateSampler, HardConcreteGate, clamp_gates_, gates_of, step_gates_
from .model import GatedModel
from .report import Report, report
from .train import (BudgetController, Callback, History, NoiseRangeSchedule, drop_unneeded_inputs_, evaluate, fit,
                    kept_fraction, min_fraction, param_groups, penalty, train_step)

__all__ = [
    "BudgetController",
    "Callback",
    "CompactionError",
    "GateSampler",
    "GatedModel",
    "HardConcreteGate",
    "History",
    "NoiseRangeSchedule",
    "Report",
    "TraceError",
    "clamp_gates_",
    "compact",
    "drop_unneeded_inputs_",
    "evaluate",
    "fit",
    "gate",
    "gates_of",
    "kept_fraction",
    "min_fraction",
    "nn",
    "param_groups",
    "penalty",
    "report",
    "step_gates_",
    "train_step",
]
__version__ = "0.1.0"
