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


@pytest.mark.parametrize("in_band", [True, False])
def test_train_step_samples_once_evaluates_cost_once_and_reads_nothing_back(in_band, monkeypatch):
    """The structure of a gated training step (issue 10): one sampling call, one vectorised cost
    evaluation, no walk over the model's modules and no host read-back, inside the stochastic
    band and outside it. (The controller's state kept in tensors as on an accelerator: on CPU it
    reads its two scalars, which costs nothing there.)"""
    from torch import nn
    from torch.profiler import ProfilerActivity, profile

    import lumos.gates
    from lumos.cost import CostModel

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 32), nn.SiLU(), nn.Linear(32, 32), nn.SiLU(), nn.Linear(32, 2))
    x, y = torch.randn(64, 6), torch.randn(64, 2)
    gated = lumos.gate(model, x[:8])
    if in_band:
        with torch.no_grad():
            for _, gate in lumos.gates_of(gated):
                gate.log_alpha.uniform_(-1.0, 1.0)
    optimizer = torch.optim.SGD(lumos.param_groups(gated, lr=1e-3))  # Adam reads its step count back on CPU
    monkeypatch.setattr(lumos.BudgetController, "host_scalars_on_cpu", False)
    controller = lumos.BudgetController(gated, target=0.3, total_steps=10**6, warmup=0.0)
    for _ in range(2):
        lumos.train_step(gated, (x,), y, optimizer, controller=controller)

    calls = {"sample": 0, "cost": 0, "walk": 0}

    def counting(name, fn):
        def wrapper(*args, **kwargs):
            calls[name] += 1
            return fn(*args, **kwargs)
        return wrapper

    monkeypatch.setattr(lumos.gates, "hard_concrete_parts", counting("sample", lumos.gates.hard_concrete_parts))
    monkeypatch.setattr(CostModel, "_cost_of_widths", counting("cost", CostModel._cost_of_widths))
    monkeypatch.setattr(nn.Module, "named_modules", counting("walk", nn.Module.named_modules))
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        lumos.train_step(gated, (x,), y, optimizer, controller=controller)
    read_backs = sum(e.count for e in prof.key_averages() if e.key in ("aten::item", "aten::_local_scalar_dense"))
    assert calls == {"sample": 1, "cost": 1, "walk": 0}
    assert read_backs == 0


def test_fit_warns_when_the_annealing_is_too_short_for_the_gates_to_close():
    """A run whose annealing phase is shorter than a gate logit's travel to closed at Adam's step
    (about its learning rate) is warned about with the epochs that would be enough (an SRResNet at
    160 steps, target 0.3, closed one of its two needed inputs and ended at 6x the dense loss);
    those epochs give no warning; SGD's step has no such bound, so it is not judged."""
    import re
    import warnings

    from torch import nn

    from lumos.train.budget import anneal_too_short

    torch.manual_seed(0)
    x, y = torch.randn(256, 4), torch.randn(256, 1)

    def gated_mlp():
        torch.manual_seed(0)
        return lumos.gate(nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 1)), x[:8])

    with pytest.warns(RuntimeWarning, match=r"anneals over 5 optimiser steps.*train for at least \d+ epochs") as caught:
        lumos.fit(gated_mlp(), (x, y), target=0.5, epochs=2, batch_size=32, lr=1e-3, seed=0, progress=False)
    enough = int(re.search(r"at least (\d+) epochs", str(caught[0].message)).group(1))
    with warnings.catch_warnings(record=True) as later:
        warnings.simplefilter("always")
        lumos.fit(gated_mlp(), (x, y), target=0.5, epochs=enough, batch_size=32, lr=1e-3, seed=0, progress=False)
    assert not [w for w in later if "anneals over" in str(w.message)]
    gated = gated_mlp()
    controller = lumos.BudgetController(gated, target=0.5, total_steps=16)
    assert anneal_too_short(controller, torch.optim.SGD(lumos.param_groups(gated, lr=1e-3), momentum=0.9)) is None
    why, steps = anneal_too_short(controller, torch.optim.Adam(lumos.param_groups(gated, lr=1e-3)))
    assert steps > 16 and "lam" in why
