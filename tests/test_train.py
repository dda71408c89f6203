"""Penalty, budget controller and fit: costs, errors, and the budget hit on cfd_flux."""
import pytest
import torch
from torch import nn

import lumos
from lumos.report import count_params
from zoo import mlp_zoo, randomize_gates


@pytest.fixture
def gated_mlp():
    model = nn.Sequential(nn.Linear(6, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 2))
    return lumos.gate(model, torch.randn(8, 6))


def test_penalty_count_is_sum_of_p_open(gated_mlp):
    expected = sum(g.p_open().sum() for _, g in lumos.gates_of(gated_mlp))
    torch.testing.assert_close(lumos.penalty(gated_mlp, "count"), expected)


def test_penalty_params_dense_limit_and_gradient(gated_mlp):
    with torch.no_grad():
        for _, gate in lumos.gates_of(gated_mlp):
            gate.log_alpha.fill_(30.0)  # p_open -> 1: the expected cost is the dense cost
    dense = count_params(gated_mlp)
    assert float(lumos.penalty(gated_mlp, "params").detach()) == pytest.approx(dense, rel=1e-4)
    for _, gate in lumos.gates_of(gated_mlp):
        gate.log_alpha.data.fill_(0.0)
    value = lumos.penalty(gated_mlp, "flops", normalize=True)
    value.backward()
    assert 0 < float(value) < 1
    assert all(g.log_alpha.grad is not None and (g.log_alpha.grad > 0).all() for _, g in lumos.gates_of(gated_mlp))


def test_kept_fraction_matches_compacted_params():
    model, x = mlp_zoo()["relu_3hidden"]
    gated = lumos.gate(model, x)
    randomize_gates(gated, seed=3)
    compacted = lumos.compact(gated, x)
    assert lumos.kept_fraction(gated, "params") == pytest.approx(count_params(compacted) / count_params(model))


@pytest.mark.parametrize("target", [0.0, -0.5, 1.5, float("nan"), "0.2"])
def test_budget_controller_rejects_targets_outside_unit_interval(gated_mlp, target):
    with pytest.raises(ValueError, match="target"):
        lumos.BudgetController(gated_mlp, target=target)


def test_penalty_rejects_unknown_cost_and_ungated_model(gated_mlp):
    with pytest.raises(ValueError, match="cost"):
        lumos.penalty(gated_mlp, "energy")
    with pytest.raises(ValueError, match="no lumos gates"):
        lumos.penalty(nn.Linear(3, 2))


def test_fit_rejects_nan_inputs(gated_mlp):
    x, y = torch.randn(32, 6), torch.randn(32, 2)
    x[5, 2] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        lumos.fit(gated_mlp, (x, y), epochs=1, progress=False)


def test_fit_rejects_nan_in_a_loader_batch(gated_mlp):
    x, y = torch.randn(32, 6), torch.randn(32, 2)
    x[20, 0] = float("nan")
    loader = [(x[:16], y[:16]), (x[16:], y[16:])]
    with pytest.raises(ValueError, match="NaN.*batch 1"):
        lumos.fit(gated_mlp, loader, epochs=1, progress=False)


def test_fit_rejects_mismatched_rows_and_integer_inputs(gated_mlp):
    with pytest.raises(ValueError, match="rows"):
        lumos.fit(gated_mlp, (torch.randn(10, 6), torch.randn(9, 2)), epochs=1, progress=False)
    with pytest.raises(TypeError, match="floating"):
        lumos.fit(gated_mlp, (torch.ones(10, 6, dtype=torch.long), torch.randn(10, 2)), epochs=1, progress=False)


def test_fit_rejects_target_out_of_range(gated_mlp):
    with pytest.raises(ValueError, match="target"):
        lumos.fit(gated_mlp, (torch.randn(10, 6), torch.randn(10, 2)), epochs=1, target=2.0, progress=False)


def test_fit_with_large_penalty_closes_gates_and_records_history(gated_mlp):
    x = torch.randn(256, 6)
    y = x[:, :2] * 2
    history = lumos.fit(gated_mlp, (x, y), epochs=20, lam=5.0, batch_size=16, progress=False)
    assert len(history.epochs) == 20
    assert history.epochs[-1]["kept_fraction"] < history.epochs[0]["kept_fraction"] <= 1.0
    assert lumos.kept_fraction(gated_mlp) < 0.5


def test_noise_range_schedule_anneals_every_gate(gated_mlp):
    schedule = lumos.NoiseRangeSchedule(0.5, 1e-6, epochs=4)
    schedule.apply(gated_mlp, 0)
    assert all(g.noise_range == 0.5 for _, g in lumos.gates_of(gated_mlp))
    schedule.apply(gated_mlp, 10)
    assert all(g.noise_range == pytest.approx(1e-6) for _, g in lumos.gates_of(gated_mlp))


def test_fit_rejects_one_shot_iterator(gated_mlp):
    x, y = torch.randn(32, 6), torch.randn(32, 2)
    batches = iter([(x[:16], y[:16]), (x[16:], y[16:])])
    with pytest.raises(ValueError, match="one-shot"):
        lumos.fit(gated_mlp, batches, epochs=2, progress=False)


@pytest.mark.parametrize("lam", [float("nan"), -1.0])
def test_fit_rejects_bad_penalty_weight(gated_mlp, lam):
    with pytest.raises(ValueError, match="lam"):
        lumos.fit(gated_mlp, (torch.randn(8, 6), torch.randn(8, 2)), epochs=1, lam=lam, progress=False)


def test_fit_patience_stops_after_that_many_epochs_without_progress():
    model = nn.Linear(3, 1)
    x = torch.randn(64, 3)
    y = torch.randn(64, 1)  # noise: validation cannot keep improving
    history = lumos.fit(model, (x, y), val=(x[:16], y[:16]), epochs=200, lr=0.5, patience=2, progress=False)
    assert history.stopped_early
    last_best = history.best_epoch
    assert len(history.epochs) == last_best + 1 + 2
