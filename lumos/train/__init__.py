"""Training with the L0 penalty: ``lumos.penalty``, ``BudgetController``, and ``lumos.fit``, a small
loop built from :func:`train_step` that any user can replace by their own loop."""
from .budget import BudgetController
from .data import TensorData, as_data
from .fit_loop import Callback, FitLoop, History
from .input_test import drop_unneeded_inputs_, permutation_test
from .loop import fit
from .noise import NoiseRangeSchedule
from .penalty import GATE_LR_SCALE, kept_fraction, min_fraction, param_groups, penalty
from .step import evaluate, train_step

__all__ = [
    "BudgetController", "Callback", "FitLoop", "GATE_LR_SCALE", "History", "NoiseRangeSchedule", "TensorData",
    "as_data", "drop_unneeded_inputs_", "evaluate", "fit", "kept_fraction", "min_fraction", "param_groups", "penalty",
    "permutation_test", "train_step",
]
