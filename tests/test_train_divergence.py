"""Divergence and collapse: a NaN/inf loss or gradient stops fit naming the step and keeps the last
good checkpoint; NaN gate logits are refused; a model whose gates cut its input off is reported
during training and refused by compact."""
import math
import warnings

import pytest
import torch
from torch import nn

import lumos
from lumos.collapse import closed_gates, predicts_constant
from lumos.compact import CompactionError
from lumos.train.budget import lock_to_budget

pytestmark = pytest.mark.usefixtures("one_torch_thread")
FIT = dict(epochs=5, batch_size=25, seed=0, progress=False)  # 200 rows: 8 steps per epoch


def _problem(width: int = 24):
    torch.manual_seed(0)
    x = torch.randn(200, 6)
    y = x[:, :2].sum(1, keepdim=True)
    return lumos.gate(nn.Sequential(nn.Linear(6, width), nn.ReLU(), nn.Linear(width, 1)), x[:8]), x, y


class PoisonWeightAfter(lumos.Callback):
    def __init__(self, step: int):
        self.step = step

    def on_step_end(self, loop, task_loss):
        if loop.step == self.step:
            with torch.no_grad():
                loop.model.model[0].weight[0, 0] = float("nan")


def test_a_nan_loss_stops_fit_naming_the_step_and_keeps_the_last_good_checkpoint(tmp_path):
    path = tmp_path / "run.pt"
    gated, x, y = _problem()
    with pytest.raises(FloatingPointError, match=r"lumos.fit: the task loss became non-finite \(NaN or inf: nan\) at "
                                                 r"step 13 \(epoch 1, batch 5\).*lower `lr`.*The last good checkpoint "
                                                 r"\(saved after 10 steps\) is kept at"):
        lumos.fit(gated, (x, y), checkpoint=path, checkpoint_every=5, callbacks=[PoisonWeightAfter(13)], **FIT)
    kept = torch.load(path, weights_only=True)["state"]
    assert kept["step"] == 10  # the checkpoint due after step 15 was not written
    assert all(torch.isfinite(t).all() for t in kept["model"].values() if t.is_floating_point())
    gated, x, y = _problem()  # as the message says: call again with a lower lr, it resumes from there
    history = lumos.fit(gated, (x, y), checkpoint=path, checkpoint_every=5, **{**FIT, "lr": 3e-4})
    assert history.resumed_from["step"] == 10 and math.isfinite(history.epochs[-1]["train_loss"])


def test_a_non_finite_gradient_with_a_finite_loss_is_named_as_such():
    gated, x, y = _problem()

    def loss_with_a_nan_gradient(pred, target):  # d sqrt(u)/du at u = 0 is inf, times 0 is NaN
        return nn.functional.mse_loss(pred, target) + 0.0 * torch.sqrt(pred - pred.detach()).sum()

    with pytest.raises(FloatingPointError, match=r"a gradient became non-finite \(NaN or inf; the task loss was "
                                                 r"[0-9.]+\) at step 0 \(epoch 0, batch 0\).*sqrt or log at 0.*"
                                                 "Pass `checkpoint=`"):
        lumos.fit(gated, (x, y), loss_fn=loss_with_a_nan_gradient, **FIT)


def test_an_infinite_target_in_a_loader_batch_stops_at_its_step_in_bf16_too():
    gated, x, y = _problem()
    y[60] = float("inf")
    loader = [(x[i:i + 25], y[i:i + 25]) for i in range(0, 200, 25)]
    with pytest.raises(FloatingPointError, match=r"non-finite \(NaN or inf: inf\) at step 2 \(epoch 0, batch 2\).*"
                                                 "precision='fp32'"):
        lumos.fit(gated, loader, precision="bf16", **FIT)


def test_nan_gate_logits_are_refused_by_fit_penalty_compact_and_report():
    gated, x, y = _problem()
    with torch.no_grad():
        gated.model[0].out_gate.log_alpha[4] = float("nan")
    with pytest.raises(ValueError, match=r"lumos.fit: gate `model.0.out_gate` has a non-finite log_alpha \(first at "
                                         r"unit 4"):
        lumos.fit(gated, (x, y), **FIT)
    with pytest.raises(ValueError, match="lumos.penalty: gate `model.0.out_gate`"):
        lumos.penalty(gated)
    for who, call in (("lumos.compact", lumos.compact), ("lumos.report", lumos.report)):
        with pytest.raises(CompactionError, match=rf"{who}: gate `model.0.out_gate` has 1 NaN value"):
            call(gated)


def test_fit_warns_during_training_when_the_gates_cut_the_input_off_and_compact_refuses_the_constant():
    gated, x, y = _problem(16)
    with pytest.warns(RuntimeWarning, match=r"lumos.fit: after epoch 1 \(step 14\) the model no longer depends on "
                                            r"its input and predicts a constant: every unit of gates "
                                            r"`model.0.out_gate`.*compact will refuse it"):
        history = lumos.fit(gated, (x, y), lam=20.0, lr=0.02, batch_size=32, epochs=12, seed=0, progress=False)
    assert len(history.epochs) == 12  # a warning, not a stop: the user may have asked for it
    assert "model.0.out_gate" in closed_gates(gated)
    with pytest.raises(CompactionError, match="predicts a constant.*allow_constant=True"):
        lumos.compact(gated)
    small = lumos.compact(gated, allow_constant=True)
    out = small(x)
    torch.testing.assert_close(out, gated.eval()(x))
    assert torch.equal(out, out[:1].expand_as(out))


def test_a_closed_branch_beside_a_live_path_is_no_collapse():
    class TwoPaths(nn.Module):
        def __init__(self):
            super().__init__()
            self.branch = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 6))
            self.head = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 1))

        def forward(self, x):
            return self.head(x + self.branch(x))

    torch.manual_seed(0)
    x = torch.randn(32, 6)
    gated = lumos.gate(TwoPaths(), x[:8])
    with torch.no_grad():
        gated.model.branch[0].out_gate.log_alpha.fill_(-8.0)
    assert closed_gates(gated) == ["model.branch.0.out_gate"]
    assert not predicts_constant(gated, (x,))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        lumos.fit(gated, (x, x[:, :1]), epochs=2, batch_size=8, seed=0, progress=False)
        lumos.compact(gated)
    with torch.no_grad():
        gated.model.head[0].out_gate.log_alpha.fill_(-8.0)
    assert predicts_constant(gated, (x,)) and predicts_constant(gated, (x[:1],))


def test_the_deadline_lock_keeps_one_unit_of_every_gate_it_found_open():
    """A target only a constant model meets (every input feature closed) keeps the best feature."""
    torch.manual_seed(0)
    x = torch.randn(16, 4)
    gated = lumos.gate(nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 1)), x)
    lock_to_budget(gated, 0.05)
    assert closed_gates(gated) == []
    assert not predicts_constant(gated, (x,))
    assert all(int(g.kept().sum()) == 1 for _, g in lumos.gates_of(gated))
