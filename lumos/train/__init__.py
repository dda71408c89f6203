"""Training with the L0 penalty: ``lumos.penalty``, ``BudgetController``, and ``lumos.fit``, a small
loop built from :func:`train_step` that any user can replace by their own loop."""
from .budget import BudgetController
from .data import TensorData, as_data
from .loop import Callback, FitLoop, History, evaluate, fit, train_step
from .noise import NoiseRangeSchedule
from .penalty import GATE_LR_SCALE, kept_fraction, min_fraction, param_groups, penalty

__all__ = [
    "BudgetController", "Callback", "FitLoop", "GATE_LR_SCALE", "History", "NoiseRangeSchedule", "TensorData",
    "as_data", "evaluate", "fit", "kept_fraction", "min_fraction", "param_groups", "penalty", "train_step",
]
