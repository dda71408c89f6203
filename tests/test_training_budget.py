"""Training finds the right small model on every seed: ``lumos.fit(target=...)`` and the README's
own-loop recipe, on tasks whose relevant inputs are known (``zoo_training.py``), three seeds each.

One setting for every task, no per-task tuning: ``SETTING`` below (lumos' defaults except 20
epochs at Adam lr 1e-2; README, "The gates"). Each run must end within 0.02 of its target
fraction of parameters (the kept fraction and the compacted model agree), keep every relevant
input and drop every irrelevant one.
"""
import re
from pathlib import Path

import pytest
import torch

import lumos
from lumos.report import count_params
from zoo_training import TASKS, four_of_fourteen

pytestmark = pytest.mark.usefixtures("one_torch_thread")
SETTING = dict(epochs=20, lr=1e-2, batch_size=256)
TARGET, TOLERANCE = 0.1, 0.02
README = Path(__file__).resolve().parent.parent / "README.md"


def kept_inputs(gated) -> set[int]:
    return set(gated.feature_gate.gate.kept().nonzero().flatten().tolist())


@pytest.mark.slow
@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("task_name", list(TASKS))
def test_fit_to_a_target_keeps_exactly_the_relevant_inputs_on_every_seed(task_name, seed):
    task = TASKS[task_name](0)
    torch.manual_seed(seed)
    dense = task.make_model()
    gated = lumos.gate(dense, task.train[0][:64])
    history = lumos.fit(gated, task.train, task.val, target=TARGET, metric=task.metric, seed=seed,
                        progress=False, **SETTING)
    assert kept_inputs(gated) == set(task.relevant)
    fraction = lumos.kept_fraction(gated)
    assert abs(fraction - TARGET) <= TOLERANCE and history.target_met
    assert count_params(lumos.compact(gated)) / count_params(dense) == pytest.approx(fraction)
    assert history.epochs[-1]["val_metric"] > 0.9  # a useful model, not only a small one


def readme_own_loop_recipe() -> str:
    """The README's own-loop code block, as written there."""
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    recipe = [b for b in blocks if "lumos.BudgetController(" in b and "for x, y in loader" in b]
    assert len(recipe) == 1, "README.md must hold exactly one own-loop recipe"
    return recipe[0]


@pytest.mark.slow
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_readme_own_loop_recipe_reaches_its_target_with_the_relevant_inputs(seed):
    task = four_of_fourteen(0)
    torch.manual_seed(seed)
    x_train, y_train = task.train
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x_train, y_train), batch_size=64,
                                         shuffle=True)
    namespace = {"model": task.make_model(), "x_train": x_train, "loader": loader}
    exec(compile(readme_own_loop_recipe(), "README.md", "exec"), namespace)
    gated, controller = namespace["gated"], namespace["controller"]
    assert abs(lumos.kept_fraction(gated) - controller.target) <= TOLERANCE
    assert kept_inputs(gated) == set(task.relevant)
    small = namespace["small"]
    assert lumos.evaluate(small, task.val, metric=task.metric)[1] > 0.9
