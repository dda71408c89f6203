"""Penalty, budget controller and fit: costs, errors, the loop's pieces, and bad input."""
import copy
import math
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lumos
from lumos.cost import cost_model
from lumos.report import count_params
from zoo import mlp_zoo, randomize_gates


pytestmark = pytest.mark.usefixtures("one_torch_thread")


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
    assert 0 < float(value.detach()) < 1
    assert all(g.log_alpha.grad is not None and (g.log_alpha.grad > 0).all() for _, g in lumos.gates_of(gated_mlp))


def test_kept_fraction_matches_compacted_params():
    model, x = mlp_zoo()["relu_3hidden"]
    gated = lumos.gate(model, x)
    randomize_gates(gated, seed=3)
    compacted = lumos.compact(gated, x)
    assert lumos.kept_fraction(gated, "params") == pytest.approx(count_params(compacted) / count_params(model))


@pytest.mark.parametrize("target", [0.0, -0.5, 1.5, float("nan"), "0.2", True])
def test_budget_controller_rejects_targets_outside_unit_interval(gated_mlp, target):
    with pytest.raises(ValueError, match="lumos.BudgetController: `target`"):
        lumos.BudgetController(gated_mlp, target=target, total_steps=10)


@pytest.mark.parametrize("total_steps", [None, 0, 2.5])
def test_budget_controller_needs_the_number_of_steps(gated_mlp, total_steps):
    with pytest.raises(ValueError, match="total_steps"):
        lumos.BudgetController(gated_mlp, target=0.2, total_steps=total_steps)


@pytest.mark.parametrize("lookahead", [-1.0, float("inf"), "9"])
def test_budget_controller_rejects_a_bad_lookahead(gated_mlp, lookahead):
    with pytest.raises(ValueError, match="lumos.BudgetController: `lookahead`"):
        lumos.BudgetController(gated_mlp, target=0.2, total_steps=10, lookahead=lookahead)


def test_fit_takes_the_lookahead_from_the_optimizers_momentum(gated_mlp):
    """fit's controller looks ahead as far as the gate logits' optimizer carries them; an optimizer
    without the gate logits cannot reach a target and is refused, naming fit's argument."""
    from lumos.train.budget import momentum_lookahead

    make = {"adam": lambda g: torch.optim.Adam(g), "adamw 0.8": lambda g: torch.optim.AdamW(g, betas=(0.8, 0.99)),
            "sgd": lambda g: torch.optim.SGD(g, lr=0.1), "sgd 0.9": lambda g: torch.optim.SGD(g, lr=0.1, momentum=0.9),
            "rmsprop": lambda g: torch.optim.RMSprop(g), "adagrad": lambda g: torch.optim.Adagrad(g)}
    want = {"adam": 9.0, "adamw 0.8": 4.0, "sgd": 0.0, "sgd 0.9": 9.0, "rmsprop": 0.0, "adagrad": 0.0}
    for name, build in make.items():
        assert momentum_lookahead(build(lumos.param_groups(gated_mlp, lr=1e-3)), gated_mlp) == want[name], name

    class Seen(lumos.Callback):
        def on_fit_start(self, loop):
            self.lookahead = loop.controller.lookahead

    x, y = torch.randn(64, 6), torch.randn(64, 2)
    seen = Seen()
    lumos.fit(gated_mlp, (x, y), target=0.5, epochs=1, progress=False, callbacks=[seen],
              optimizer=torch.optim.SGD(gated_mlp.parameters(), lr=1e-2))
    assert seen.lookahead == 0.0
    lumos.fit(gated_mlp, (x, y), target=0.5, epochs=1, progress=False, callbacks=[seen],
              controller_options={"lookahead": 3.0})
    assert seen.lookahead == 3.0
    weights = [p for name, p in gated_mlp.named_parameters() if not name.endswith("log_alpha")]
    with pytest.raises(ValueError, match="lumos.fit: `optimizer` does not hold the model's gate logits"):
        lumos.fit(gated_mlp, (x, y), target=0.5, epochs=1, progress=False, optimizer=torch.optim.Adam(weights))
    for momentum in (1.0, 1.5):  # SGD takes both; the logits would never stop
        with pytest.raises(ValueError, match=rf"lumos.fit: `optimizer` moves the gate logits with momentum {momentum}"):
            lumos.fit(gated_mlp, (x, y), target=0.5, epochs=1, progress=False,
                      optimizer=torch.optim.SGD(gated_mlp.parameters(), lr=1e-2, momentum=momentum))


@pytest.mark.parametrize("host", [True, False])
def test_controller_error_is_the_soft_fraction_lookahead_steps_ahead(gated_mlp, monkeypatch, host):
    """``e = clamp((K_h - budget) / budget, -1, 1)`` with ``K_h = K + h (K - K_prev)``: a soft
    fraction falling towards the budget releases the pressure before it gets there; the rate
    is carried in checkpoints, and one written without it resumes with no rate for a step."""
    monkeypatch.setattr(lumos.BudgetController, "host_scalars_on_cpu", host)

    def lams(softs, lookahead, resume_after=None, drop_rate=False):
        controller = lumos.BudgetController(gated_mlp, target=0.5, total_steps=100, warmup=0.0, anneal=0.0,
                                            lock=None, dual_lr=1.0, kp=10.0, lookahead=lookahead)
        out = []
        for i, soft in enumerate(softs):
            if i == resume_after:
                state = controller.state_dict()
                if drop_rate:
                    del state["soft_before"]
                controller = lumos.BudgetController(gated_mlp, target=0.5, total_steps=100, warmup=0.0,
                                                    anneal=0.0, lock=None, dual_lr=1.0, kp=10.0, lookahead=lookahead)
                controller.load_state_dict(state)
            controller._soft_kept = soft if host else torch.tensor(soft, dtype=torch.float64)
            with torch.no_grad():
                controller.step()
            out.append(controller.lam)
        return out

    def by_hand(softs, lookahead, no_rate_at=None):
        integral, before, out = 0.0, 1.0, []
        for i, soft in enumerate(softs):
            ahead = soft if i == no_rate_at else soft + lookahead * (soft - before)
            error = min(max((ahead - 0.5) / 0.5, -1.0), 1.0)
            integral = min(max(integral + error, 0.0), lumos.train.budget.LAM_MAX)
            out.append(min(max(integral + 10.0 * error, 0.0), lumos.train.budget.LAM_MAX))
            before = soft
        return out

    softs = [0.9, 0.8, 0.72, 0.66, 0.62, 0.6]  # approaching the budget 0.5, slowing down
    assert lams(softs, 0.0) == pytest.approx(by_hand(softs, 0.0), abs=1e-12)
    ahead = lams(softs, 9.0)
    assert ahead == pytest.approx(by_hand(softs, 9.0), abs=1e-12)
    assert lams(softs, 0.0)[3] > 3.0 and ahead[3] == 0.0  # the pressure is off before K reaches the budget
    assert lams(softs, 9.0, resume_after=3) == ahead
    assert lams(softs, 9.0, resume_after=3, drop_rate=True) == pytest.approx(by_hand(softs, 9.0, no_rate_at=3),
                                                                             abs=1e-12)


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
    # loader batches are not inspected one by one (that would read back every step): the loss is
    with pytest.raises(FloatingPointError, match="NaN.*batch 1"):
        lumos.fit(gated_mlp, loader, epochs=1, progress=False)


def test_fit_rejects_mismatched_rows_and_integer_inputs(gated_mlp):
    with pytest.raises(ValueError, match="rows"):
        lumos.fit(gated_mlp, (torch.randn(10, 6), torch.randn(9, 2)), epochs=1, progress=False)
    with pytest.raises(TypeError, match="floating"):
        lumos.fit(gated_mlp, (torch.ones(10, 6, dtype=torch.long), torch.randn(10, 2)), epochs=1, progress=False)


def test_fit_rejects_target_out_of_range_as_its_own_error(gated_mlp):
    with pytest.raises(ValueError, match="^lumos.fit: `target`"):
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
    with pytest.raises(ValueError, match="lumos.fit: `train` is a one-shot"):
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


# -- bad input, refused where the user passes it ------------------------------------------------

def test_fit_converts_numpy_arrays(gated_mlp):
    x = np.random.default_rng(0).normal(size=(64, 6))  # float64, as NumPy makes them
    y = x[:, :2] * 2
    history = lumos.fit(gated_mlp, (x, y), val=(x[:16], y[:16]), epochs=2, batch_size=16, progress=False)
    assert len(history.epochs) == 2 and math.isfinite(history.epochs[-1]["val_loss"])


@pytest.mark.parametrize("bad, message", [
    (lambda x, y: (x.tolist(), y), "`train` input 0 must be a torch.Tensor or a NumPy array, got list"),
    (lambda x, y: (np.array(["a"] * 8, dtype=object), y), "`train` input 0 is a NumPy array of dtype object"),
    (lambda x, y: x, "`train` must be \\(inputs, target\\) tensors"),
])
def test_fit_refuses_data_it_cannot_use(gated_mlp, bad, message):
    x, y = torch.randn(8, 6), torch.randn(8, 2)
    with pytest.raises(TypeError, match=f"^lumos.fit: {message}"):
        lumos.fit(gated_mlp, bad(x, y), epochs=1, progress=False)


def test_fit_refuses_a_target_that_would_broadcast_against_the_output():
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 1))
    gated = lumos.gate(model, torch.randn(8, 4))
    x = torch.randn(32, 4)
    with pytest.raises(ValueError, match=r"lumos.fit: `train` target has shape \(8,\).*outputs \(8, 1\)"):
        lumos.fit(gated, (x, x[:, 0]), epochs=1, progress=False)
    with pytest.raises(ValueError, match=r"lumos.fit: `val` target has shape \(8, 2\)"):
        lumos.fit(gated, (x, x[:, :1]), val=(x, x[:, :2]), epochs=1, progress=False)


def test_fit_refuses_integer_targets_for_a_regression_loss(gated_mlp):
    x = torch.randn(16, 6)
    with pytest.raises(TypeError, match="lumos.fit: `train` target has integer dtype torch.int64.*regression"):
        lumos.fit(gated_mlp, (x, torch.ones(16, 2, dtype=torch.long)), epochs=1, progress=False)


def test_fit_trains_a_classifier_with_cross_entropy_and_checks_class_indices():
    torch.manual_seed(0)
    x = torch.randn(256, 5)
    y = (x[:, 0] > 0).long() + (x[:, 1] > 0).long()  # 3 classes from 2 of 5 inputs
    gated = lumos.gate(nn.Sequential(nn.Linear(5, 32), nn.ReLU(), nn.Linear(32, 3)), x[:8])
    accuracy = lambda logits, labels: float((logits.argmax(1) == labels).double().mean())  # noqa: E731
    history = lumos.fit(gated, (x, y), val=(x, y), loss_fn=F.cross_entropy, metric=accuracy, epochs=30,
                        lr=1e-2, batch_size=32, progress=False, seed=0)
    assert history.epochs[-1]["val_metric"] > 0.9
    with pytest.raises(ValueError, match="lumos.fit: `train` target holds class 3 but the model outputs 3 classes"):
        lumos.fit(gated, (x, y + 1), loss_fn=F.cross_entropy, epochs=1, progress=False)


class TwoInputs(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 1))

    def forward(self, x, scale):
        return self.body(x) * scale


def test_fit_takes_multi_input_batches_as_tuples_and_loaders():
    torch.manual_seed(0)
    x, scale = torch.randn(64, 6), torch.rand(64, 1) + 0.5
    y = x[:, :1] * scale
    gated = lumos.gate(TwoInputs(), (x[:8], scale[:8]))
    lumos.fit(gated, ((x, scale), y), val=((x, scale), y), epochs=2, batch_size=16, progress=False)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, scale, y), batch_size=16)
    history = lumos.fit(gated, loader, val=loader, epochs=2, progress=False)
    assert math.isfinite(history.epochs[-1]["val_loss"])


def test_fit_does_not_reset_the_global_seed_unless_given_one(gated_mlp):
    x, y = torch.randn(64, 6), torch.randn(64, 2)
    torch.manual_seed(123)
    lumos.fit(gated_mlp, (x, y), epochs=1, batch_size=16, progress=False)
    after_fit = torch.rand(3)
    torch.manual_seed(0)  # what the old default seed=0 reset it to
    assert not torch.equal(after_fit, torch.rand(3))

    def seeded_run():
        torch.manual_seed(0)
        model = lumos.gate(nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 2)), x[:8])
        with torch.no_grad():
            for _, gate in lumos.gates_of(model):
                gate.log_alpha.fill_(0.0)  # random masks, so the gate noise matters
        torch.manual_seed(int(1000 * torch.rand(())))  # any global state before fit
        lumos.fit(model, (x, y), epochs=2, batch_size=16, progress=False, seed=7)
        return model.state_dict()

    torch.manual_seed(1)
    first = seeded_run()
    torch.manual_seed(2)
    second = seeded_run()
    for key in first:
        assert torch.equal(first[key], second[key]), key


# -- the loop's pieces -----------------------------------------------------------------------------

def test_train_step_is_a_reusable_step_and_callbacks_see_every_step_and_epoch(gated_mlp):
    x, y = torch.randn(64, 6), torch.randn(64, 2)
    optimizer = torch.optim.Adam(lumos.param_groups(gated_mlp, lr=1e-2))
    controller = lumos.BudgetController(gated_mlp, target=0.5, total_steps=4)
    for step in range(4):
        loss = lumos.train_step(gated_mlp, (x,), y, optimizer, controller=controller)
        assert loss.shape == () and not loss.requires_grad
    assert controller.steps == 4 and gated_mlp.gate_sampler.step == 4 and controller.locked

    seen = {"steps": 0, "epochs": [], "start": 0, "end": 0}

    class Recorder(lumos.Callback):
        def on_fit_start(self, loop):
            seen["start"] += 1

        def on_step_end(self, loop, task_loss):
            seen["steps"] += 1

        def on_epoch_end(self, loop, row):
            seen["epochs"].append(row["epoch"])

        def on_fit_end(self, loop):
            seen["end"] += 1

    lumos.fit(gated_mlp, (x, y), epochs=3, batch_size=16, progress=False, callbacks=[Recorder()])
    assert seen == {"steps": 12, "epochs": [0, 1, 2], "start": 1, "end": 1}


def test_param_groups_give_gate_logits_a_larger_step(gated_mlp):
    weights, gates = lumos.param_groups(gated_mlp, lr=1e-3)
    assert weights["lr"] == 1e-3 and gates["lr"] == pytest.approx(lumos.train.GATE_LR_SCALE * 1e-3)
    assert {id(p) for p in gates["params"]} == {id(g.log_alpha) for _, g in lumos.gates_of(gated_mlp)}
    assert len(weights["params"]) + len(gates["params"]) == len(list(gated_mlp.parameters()))


@pytest.mark.parametrize("make", [lambda g: torch.optim.Adam(g), lambda g: torch.optim.AdamW(g, foreach=True),
                                  lambda g: torch.optim.SGD(g, momentum=0.9), lambda g: torch.optim.Adagrad(g),
                                  lambda g: torch.optim.RMSprop(g)],
                         ids=["adam", "adamw-foreach", "sgd", "adagrad", "rmsprop"])
def test_the_gate_logits_fused_step_is_the_one_by_one_step(gated_mlp, make):
    """param_groups asks for the fused implementation for the gate logits (a gated step's cost on
    CPU); the optimisers that have one step them as one by one (to rounding), the others ignore it."""
    import copy

    gates = lumos.param_groups(gated_mlp, lr=1e-2)[1]
    assert gates["fused"] is True and gates["foreach"] is False
    models = [gated_mlp, copy.deepcopy(gated_mlp)]
    optimizers = [make(lumos.param_groups(models[0], lr=1e-2)),
                  make([{k: v for k, v in group.items() if k not in ("fused", "foreach")}
                        for group in lumos.param_groups(models[1], lr=1e-2)])]
    x, y = torch.randn(64, 6, generator=torch.Generator().manual_seed(0)), torch.zeros(64, 2)
    for step in range(5):
        for model, optimizer in zip(models, optimizers):
            optimizer.zero_grad()
            nn.functional.mse_loss(model(x), y).add(lumos.penalty(model, "params")).backward()
            optimizer.step()
    for (name, a), b in zip(models[0].named_parameters(), models[1].parameters()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7, msg=name)


def _count_reads(monkeypatch, fn):
    """How many times ``fn`` reads a tensor value back to Python (item, float, bool, tolist)."""
    count = [0]
    for name in ("item", "__float__", "__bool__", "tolist"):
        original = getattr(torch.Tensor, name)

        def counting(self, *args, _original=original, **kwargs):
            count[0] += 1
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, counting)
    fn()
    monkeypatch.undo()
    return count[0]


def test_gated_training_steps_read_nothing_back_beyond_a_plain_step(gated_mlp, monkeypatch):
    """With the controller's state in tensors, as on an accelerator (on CPU it reads its two
    scalars: see the next test)."""
    x, y = torch.randn(64, 6), torch.randn(64, 2)
    optimizer = torch.optim.Adam(lumos.param_groups(gated_mlp, lr=1e-3))
    monkeypatch.setattr(lumos.BudgetController, "host_scalars_on_cpu", False)
    controller = lumos.BudgetController(gated_mlp, target=0.3, total_steps=100)
    lumos.train_step(gated_mlp, (x,), y, optimizer, controller=controller)  # builds the cost model

    def plain_steps():  # the same model and optimizer without lumos' penalty and bookkeeping
        for _ in range(10):
            optimizer.zero_grad()
            F.mse_loss(gated_mlp(x), y).backward()
            optimizer.step()

    def gated_steps():
        for _ in range(10):
            lumos.train_step(gated_mlp, (x,), y, optimizer, controller=controller)

    assert _count_reads(monkeypatch, gated_steps) == _count_reads(monkeypatch, plain_steps)


# -- budgets ---------------------------------------------------------------------------------------

class LSTMRegressor(nn.Module):
    """A sequence model whose recurrent layer lumos keeps whole, with a prunable MLP head."""

    def __init__(self):
        super().__init__()
        self.lstm = nn.LSTM(4, 32, batch_first=True)
        self.head = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 1))

    def forward(self, x):
        out, _ = self.lstm(x)
        return self.head(out[:, -1])


def test_a_target_below_what_the_gates_can_reach_is_refused_naming_the_layers_kept_whole():
    x = torch.randn(16, 5, 4)
    gated = lumos.gate(LSTMRegressor(), x, feature_dim=-1)
    minimum = lumos.min_fraction(gated)
    assert minimum == pytest.approx((4864 + 1) / count_params(gated))  # the LSTM and the output bias
    with pytest.raises(ValueError, match=r"lumos.fit: `target`=0.2 is below 0.69\d+.*lstm \(4,864 params\)"):
        lumos.fit(gated, (x, torch.randn(16, 1)), target=0.2, epochs=1, progress=False)
    with pytest.raises(ValueError, match="lumos.BudgetController: `target`=0.5 is below"):
        lumos.BudgetController(gated, target=0.5, total_steps=10)
    lumos.BudgetController(gated, target=0.8, total_steps=10)  # within reach


def test_a_run_that_ends_above_its_target_says_so():
    torch.manual_seed(0)
    x = torch.randn(64, 6)
    y = x[:, :2].sum(1, keepdim=True)
    gated = lumos.gate(nn.Sequential(nn.Linear(6, 32), nn.ReLU(), nn.Linear(32, 1)), x[:8])
    with pytest.warns(RuntimeWarning, match="lumos.fit: the run ended keeping 1.000 .* above the target 0.2"):
        history = lumos.fit(gated, (x, y), target=0.2, epochs=2, batch_size=64, progress=False,
                            controller_options=dict(lock=None))
    assert history.target_met is False


@pytest.mark.parametrize("relative", [True, False])
def test_controller_scalars_on_the_host_give_the_device_path_numbers_bit_for_bit(monkeypatch, relative):
    """On CPU the controller keeps lam, its integral and soft_kept as Python floats; on an
    accelerator as 0-dim float64 tensors. Both paths give the same run, bit for bit: warm-up,
    annealing, the lock, a saturated lam, and a checkpoint taken on one path resumed on the other."""
    x, y = torch.randn(128, 6, generator=torch.Generator().manual_seed(0)), torch.randn(128, 2)

    def run(host: bool, steps: int = 40, resume_from: dict | None = None):
        monkeypatch.setattr(lumos.BudgetController, "host_scalars_on_cpu", host)
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(6, 32), nn.SiLU(), nn.Linear(32, 32), nn.SiLU(), nn.Linear(32, 2))
        gated = lumos.gate(model, x[:8])
        optimizer = torch.optim.Adam(lumos.param_groups(gated, lr=1e-2))
        controller = lumos.BudgetController(gated, target=0.3, total_steps=steps, warmup=0.1, anneal=0.4, lock=0.8,
                                            kp=30.0, lam_max=5.0, relative=relative)
        assert controller._on_host is host
        trace = []
        for step in range(steps):
            if resume_from is not None and step == steps // 2:
                gated.load_state_dict(resume_from["model"])
                optimizer.load_state_dict(resume_from["optimizer"])
                gated.gate_sampler.load_state_dict(resume_from["sampler"])
                controller.load_state_dict(resume_from["controller"])
            if step == steps // 2:
                saved = {"model": {k: v.clone() for k, v in gated.state_dict().items()},
                         "optimizer": copy.deepcopy(optimizer.state_dict()), "sampler": gated.gate_sampler.state_dict(),
                         "controller": controller.state_dict()}
            lumos.train_step(gated, (x[step % 2::2],), y[step % 2::2], optimizer, controller=controller)
            trace.append((controller.lam, controller.expected, controller.saturated, controller.locked))
        return trace, gated.state_dict(), controller.state_dict(), saved

    host, device = run(True), run(False)
    assert host[0] == device[0]
    assert any(saturated for _, _, saturated, _ in host[0]) and host[0][-1][3]  # lam_max hit, then locked
    for a, b in ((host[1], device[1]), (host[2], device[2])):
        assert a.keys() == b.keys()
        for key in a:
            if isinstance(a[key], torch.Tensor):
                assert a[key].dtype == b[key].dtype and torch.equal(a[key], b[key]), key
    resumed = run(False, resume_from=host[3])  # a CPU checkpoint resumed on the tensor path, and back
    assert resumed[0] == host[0]
    assert run(True, resume_from=device[3])[0] == host[0]


def test_penalty_on_cpu_records_no_graph_while_lam_is_zero(gated_mlp):
    """A zero weight's term is a constant 0 (its gradient is exactly 0): no cost backward to run."""
    x, y = torch.randn(64, 6), torch.randn(64, 2)
    optimizer = torch.optim.SGD(lumos.param_groups(gated_mlp, lr=1e-3))
    controller = lumos.BudgetController(gated_mlp, target=0.3, total_steps=100, warmup=0.5, anneal=0.5)
    task = F.mse_loss(gated_mlp(x), y)
    term = controller.penalty(task)
    assert controller.lam == 0.0 and term.item() == 0.0 and not term.requires_grad
    for _ in range(51):  # past the warm-up, with the budget at the target: lam rises
        lumos.train_step(gated_mlp, (x,), y, optimizer, controller=controller)
    term = controller.penalty(F.mse_loss(gated_mlp(x), y))
    assert controller.lam > 0 and term.requires_grad and term.item() > 0


def test_lam_is_bounded(gated_mlp):
    controller = lumos.BudgetController(gated_mlp, target=0.1, total_steps=1000, warmup=0.0, anneal=0.0,
                                        lock=None, dual_lr=500.0, lam_max=50.0)
    for _ in range(5):
        controller.penalty(torch.tensor(1.0))
        controller.step()
    assert controller.lam == 50.0 and controller.saturated


def test_lock_fixes_the_largest_model_within_the_target():
    model, x = mlp_zoo()["relu_3hidden"]
    gated = lumos.gate(model, x)
    randomize_gates(gated, closed_fraction=0.2, seed=1)
    with torch.no_grad():
        gated.feature_gate.gate.log_alpha.fill_(4.5)  # inputs ranked first: the model is no constant
    lumos.train.budget.lock_to_budget(gated, 0.3)
    kept = lumos.kept_fraction(gated)
    assert 0.29 < kept <= 0.3  # the units are small: the largest model within 0.3 comes close to it
    masks = [g.eval_mask() for _, g in lumos.gates_of(gated)]
    assert all(((m == 0) | (m == 1)).all() for m in masks)  # every gate decided: mask exactly 0 or 1
    assert count_params(lumos.compact(gated, x)) == pytest.approx(kept * count_params(model))


def _in_band_gated(seed: int = 0):
    model, x = mlp_zoo()["relu_3hidden"]
    gated = lumos.gate(model, x)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, gate in lumos.gates_of(gated):  # every unit inside the stochastic band: 0 < z_hat < 1
            gate.log_alpha.copy_(torch.rand(gate.n, generator=g) * 2 - 1)
    return gated.eval(), x


def test_pinning_the_gates_keeps_what_the_model_computes_through_the_kept_units():
    """The budget lock pins every unit open or closed; a kept unit inside the band keeps its eval value
    (its lock_scale) instead of jumping to 1, so the model the lock fixes computes what it computed."""
    from lumos.gates import LOG_ALPHA_MAX, LOG_ALPHA_MIN, pin_gates_

    gated, x = _in_band_gated()
    gates = [g for _, g in lumos.gates_of(gated)]
    before = [g.eval_mask().clone() for g in gates]
    assert all(((m > 0) & (m < 1)).any() for m in before)
    out = gated(x)
    pin_gates_(gates, torch.ones(sum(g.n for g in gates), dtype=torch.bool))
    torch.testing.assert_close(gated(x), out, rtol=0, atol=0)
    assert all(bool((g.log_alpha == LOG_ALPHA_MAX).all()) for g in gates)
    torch.testing.assert_close(gated.train()(x), out, rtol=0, atol=0)  # no noise left in training either
    torch.testing.assert_close(lumos.compact(gated.eval(), x)(x), out, rtol=1e-5, atol=1e-6)

    gated, x = _in_band_gated()  # keep every other unit: the kept ones keep their values, the others close
    gates = [g for _, g in lumos.gates_of(gated)]
    before = torch.cat([g.eval_mask() for g in gates])
    keep = torch.arange(before.numel()) % 2 == 0
    pin_gates_(gates, keep)
    after = torch.cat([g.eval_mask() for g in gates])
    torch.testing.assert_close(after, torch.where(keep, before, torch.zeros_like(before)), rtol=0, atol=0)
    assert bool((torch.cat([g.log_alpha.detach() for g in gates]) == torch.where(keep, LOG_ALPHA_MAX,
                                                                               LOG_ALPHA_MIN)).all())


def test_pinning_on_a_device_condition_and_the_deadline_lock_keep_the_kept_units_values():
    from lumos.gates import pin_gates_

    gated, x = _in_band_gated(seed=1)
    gates = [g for _, g in lumos.gates_of(gated)]
    logits = [g.log_alpha.detach().clone() for g in gates]
    everything = torch.ones(sum(g.n for g in gates), dtype=torch.bool)
    pin_gates_(gates, everything, when=torch.tensor(False))  # the controller's accelerator path, no lock yet
    for gate, logit in zip(gates, logits):
        assert torch.equal(gate.log_alpha.detach(), logit) and bool((gate.lock_scale == 1).all())
    out = gated(x)
    pin_gates_(gates, everything, when=torch.tensor(True))
    torch.testing.assert_close(gated(x), out, rtol=0, atol=0)

    gated, x = _in_band_gated(seed=2)  # lock_to_budget with room for every unit: nothing changes
    out = gated(x)
    lumos.train.budget.lock_to_budget(gated, 1.0)
    torch.testing.assert_close(gated(x), out, rtol=1e-5, atol=1e-6)  # the scales folded into the weights: rounding


def test_the_lock_pins_the_kept_units_at_their_eval_values_or_at_one_whichever_fits_the_batch():
    from lumos.gates import pin_gates_
    from lumos.train.budget import pin_to_lower_loss_

    outputs = {}
    for keep_values in (True, False):
        gated, x = _in_band_gated(seed=5)
        gates = [g for _, g in lumos.gates_of(gated)]
        pin_gates_(gates, torch.ones(sum(g.n for g in gates), dtype=torch.bool))
        if not keep_values:  # every kept unit at exactly 1
            for gate in gates:
                gate.lock_scale.fill_(1.0)
        outputs[keep_values] = (gated(x).detach(), torch.cat([g.lock_scale for g in gates]))
    assert not torch.equal(outputs[True][1], outputs[False][1])
    for wanted in (True, False, "nan", None):
        gated, x = _in_band_gated(seed=5)
        gates = [g for _, g in lumos.gates_of(gated)]
        calls = []

        def closure():
            calls.append(1)
            return torch.tensor(float("nan")) if wanted == "nan" else F.mse_loss(gated(x), outputs[wanted][0])

        pin_to_lower_loss_(gates, torch.ones(sum(g.n for g in gates), dtype=torch.bool),
                           None if wanted is None else closure)
        chosen = wanted if isinstance(wanted, bool) else True  # NaN or no closure: the eval values
        torch.testing.assert_close(gated(x), outputs[chosen][0], rtol=0, atol=0)
        torch.testing.assert_close(torch.cat([g.lock_scale for g in gates]), outputs[chosen][1], rtol=0, atol=0)
        assert len(calls) == (0 if wanted is None else 2)


def test_fit_passes_the_batch_to_the_lock_once(gated_mlp, monkeypatch):
    """fit's controller gets this batch's loss as its closure; the lock calls it for its two choices,
    once in the run, in eval mode."""
    from lumos.train import budget

    seen, modes, inside = [], [], []
    original = budget.pin_to_lower_loss_

    def spy(gates, keep, closure):
        seen.append(closure)
        inside.append(True)
        original(gates, keep, closure)
        inside.clear()

    monkeypatch.setattr(budget, "pin_to_lower_loss_", spy)
    gated_mlp.register_forward_pre_hook(lambda module, args: modes.append(module.training) if inside else None)
    x, y = torch.randn(256, 6), torch.randn(256, 2)
    lumos.fit(gated_mlp, (x, y), target=0.5, epochs=8, batch_size=32, progress=False)
    assert len(seen) == 1 and callable(seen[0]) and modes == [False, False]


@pytest.mark.parametrize("kind", ["mlp", "conv", "conv_transpose_grouped"])
def test_folding_the_lock_scales_into_the_weights_keeps_what_the_model_computes(kind):
    from lumos.gates import fold_lock_scales_, pin_gates_

    torch.manual_seed(0)
    if kind == "mlp":
        gated, x = _in_band_gated(seed=6)
    else:
        second = (nn.ConvTranspose2d(8, 6, 3, padding=1, groups=2) if kind == "conv_transpose_grouped"
                  else nn.Conv2d(8, 6, 3, padding=1))
        model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), second, nn.ReLU(), nn.Flatten(),
                              nn.Linear(6 * 5 * 5, 2))
        x = torch.randn(4, 3, 5, 5)
        gated = lumos.gate(model, x).eval()
        g = torch.Generator().manual_seed(6)
        with torch.no_grad():
            for _, gate in lumos.gates_of(gated):
                gate.log_alpha.copy_(torch.rand(gate.n, generator=g) * 2 - 1)
    gates = [g for _, g in lumos.gates_of(gated)]
    pin_gates_(gates, torch.ones(sum(g.n for g in gates), dtype=torch.bool))
    out = gated(x)
    fold_lock_scales_(gated)
    torch.testing.assert_close(gated(x), out, rtol=1e-5, atol=1e-6)
    for name, gate in lumos.gates_of(gated):
        folded = bool((gate.lock_scale == 1).all())
        assert folded == ("feature_gate" not in name), name  # input features keep their scale
    torch.testing.assert_close(lumos.compact(gated, x)(x), out, rtol=1e-5, atol=1e-6)


def test_folding_leaves_a_layer_whose_weight_another_layer_holds_with_its_scale():
    from lumos.gates import fold_lock_scales_, pin_gates_

    torch.manual_seed(0)
    a, b = lumos.nn.GatedLinear(6, 6), lumos.nn.GatedLinear(6, 6)
    b.weight = a.weight  # tied by hand: folding a's scale would change b too
    model = nn.Sequential(a, nn.ReLU(), b)
    with torch.no_grad():
        for gate in (a.out_gate, b.out_gate):
            gate.log_alpha.uniform_(-1.0, 1.0)
    gates = [a.out_gate, b.out_gate]
    pin_gates_(gates, torch.ones(12, dtype=torch.bool))
    x = torch.randn(5, 6)
    out = model.eval()(x)
    fold_lock_scales_(model)
    assert not bool((a.out_gate.lock_scale == 1).all()) and not bool((b.out_gate.lock_scale == 1).all())
    torch.testing.assert_close(model(x), out, rtol=0, atol=0)


def test_lock_scales_travel_in_the_state_dict_and_old_state_dicts_load():
    from lumos.gates import pin_gates_

    gated, x = _in_band_gated(seed=3)
    old = {k: v.clone() for k, v in gated.state_dict().items() if not k.endswith("lock_scale")}  # saved before they existed
    unpinned = gated(x)
    gates = [g for _, g in lumos.gates_of(gated)]
    pin_gates_(gates, torch.ones(sum(g.n for g in gates), dtype=torch.bool))
    out, state = gated(x), gated.state_dict()
    assert any(k.endswith("lock_scale") for k in state)
    fresh, _ = _in_band_gated(seed=4)
    fresh.load_state_dict(state)
    torch.testing.assert_close(fresh(x), out, rtol=0, atol=0)
    fresh.load_state_dict(old)
    assert all(bool((g.lock_scale == 1).all()) for _, g in lumos.gates_of(fresh))
    torch.testing.assert_close(fresh(x), unpinned, rtol=0, atol=0)


def test_penalty_refuses_nan_logits_naming_the_gate(gated_mlp):
    with torch.no_grad():
        gated_mlp.model[2].out_gate.log_alpha[3] = float("nan")
    with pytest.raises(ValueError, match="lumos.penalty: gate `model.2.out_gate` has a non-finite log_alpha "
                                         "\\(first at unit 3"):
        lumos.penalty(gated_mlp, "params")


@pytest.mark.parametrize("name", ["residual", "sequence_input", "norms_sigmoid"])
@pytest.mark.parametrize("kind", ["params", "flops", "count"])
def test_expected_and_soft_kept_in_one_evaluation_match_the_separate_ones(name, kind):
    model, x = mlp_zoo()[name]
    gated = lumos.gate(model, x)
    randomize_gates(gated, seed=3)
    costs = cost_model(gated)
    expected, soft = costs.expected_and_soft_kept(kind)
    assert expected.requires_grad and not soft.requires_grad
    torch.testing.assert_close(expected, costs.expected(kind))
    torch.testing.assert_close(soft.double(), costs.soft_kept(kind), rtol=1e-6, atol=1e-6)
    logits = [g.log_alpha for g in costs.gates]
    got = torch.autograd.grad(expected, logits)
    want = torch.autograd.grad(costs.expected(kind), logits)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w)


@pytest.mark.parametrize("name", ["resnet_basic", "densenet", "shufflenet_v2", "vit", "transformer_seq2seq"])
def test_closed_form_cost_gradient_matches_autograd_on_the_architecture_zoo(name):
    """The training step's cost (one backward node, closed-form gradient) against autograd through
    the plain formulas, on models with residual sums (groups made by several gates),
    concatenations, channel shuffles and attention; every gate inside the band."""
    from zoo_architectures import architectures

    arch = architectures()[name]
    torch.manual_seed(0)
    gated = lumos.gate(arch.factory(1), arch.example_inputs(), feature_dim=arch.feature_dim)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for _, gate in lumos.gates_of(gated):
            gate.log_alpha.copy_(torch.rand(gate.n, generator=g) * 8 - 4)
    costs = cost_model(gated)
    logits = [gate.log_alpha for gate in costs.gates]
    for kind in ("params", "flops", "count"):
        expected, _ = costs.expected_and_soft_kept(kind)
        torch.testing.assert_close(expected, costs.expected(kind))
        got = torch.autograd.grad(expected, logits)
        want = torch.autograd.grad(costs._expected(torch.sigmoid(torch.cat(logits) - costs._shift.float()), kind),
                                   logits)
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6 * float(b.abs().max()))


def test_cost_gradient_is_differentiable_again_under_create_graph():
    """A loss on the gradient (create_graph=True) differentiates the training step's cost a second
    time: the closed-form node must give autograd's second derivatives, not constants."""
    model, x = mlp_zoo()["residual"]
    gated = lumos.gate(model, x)
    with torch.no_grad():  # every gate inside the band, where p_open (1 - p_open) is large
        for _, gate in lumos.gates_of(gated):
            gate.log_alpha.uniform_(-2.0, 2.0, generator=torch.Generator().manual_seed(4))
    costs = cost_model(gated)
    logits = [gate.log_alpha for gate in costs.gates]
    second = []
    for expected in (costs.expected_and_soft_kept("params")[0], costs.expected("params")):
        first = torch.autograd.grad(expected, logits, create_graph=True)
        second.append(torch.autograd.grad(sum(g.square().sum() for g in first), logits))
    assert max(float(g.abs().max()) for g in second[1]) > 1.0  # a real second derivative to compare
    for got, want in zip(*second):
        torch.testing.assert_close(got, want)


def test_closed_form_cost_gradient_with_a_layer_input_gate():
    """A GatedLinear with its own input gate: its input width is the product of two gates' p_open."""
    torch.manual_seed(0)
    model = nn.Sequential(lumos.nn.GatedLinear(6, 16), nn.ReLU(), lumos.nn.GatedLinear(16, 8, gate_in=True),
                          nn.ReLU(), nn.Linear(8, 2))
    gated = lumos.gate(model, torch.randn(4, 6))
    randomize_gates(gated, closed_fraction=0.0, seed=2)
    with torch.no_grad():
        for _, gate in lumos.gates_of(gated):
            gate.log_alpha.uniform_(-3, 3)
    costs = cost_model(gated)
    assert costs._has_in_gates
    logits = [gate.log_alpha for gate in costs.gates]
    for kind in ("params", "flops"):
        expected, _ = costs.expected_and_soft_kept(kind)
        p = torch.sigmoid(torch.cat(logits) - costs._shift.float())
        want = torch.autograd.grad(costs._expected(p, kind), logits)
        for a, b in zip(torch.autograd.grad(expected, logits), want):
            torch.testing.assert_close(a, b)


@pytest.mark.parametrize("name", ["relu_3hidden", "silu_dropout", "sequence_input", "residual"])
def test_actual_cost_through_the_width_matrix_is_the_exact_count_of_the_kept_units(name):
    """The kept model's cost from the linear widths (the training step's path) equals the count
    through the channel groups, exactly, for any set of kept units."""
    model, x = mlp_zoo()[name]
    costs = cost_model(lumos.gate(model, x))
    assert costs._linear_widths or name == "residual"  # the residual stream's channels have two producers
    g = torch.Generator().manual_seed(3)
    for kind in ("params", "flops"):
        for fraction in (0.0, 0.3, 0.8, 1.0):
            kept = torch.rand(costs.n_units, generator=g) < fraction
            via_groups = costs._cost(costs._q_actual(kept.double()), kept.double(), kind)
            assert costs.actual_tensor(kind, kept).dtype == torch.float64
            assert float(costs.actual_tensor(kind, kept)) == float(via_groups)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_controller_measurement_keeps_the_eval_masks_units(dtype):
    """The training step's measurement (each logit against one bound per gate) keeps the units the
    eval masks keep, for gates with different thresholds and stretch, over logits spanning open to
    closed and at each bound and its neighbours: exactly where a threshold decides (forced open or
    closed); where ``z_hat``'s zero decides, as the comparison without rounding."""
    from lumos_kernels.hard_concrete import log_alpha_bounds

    torch.manual_seed(0)
    model = nn.Sequential(lumos.nn.GatedLinear(6, 40), nn.ReLU(),
                          lumos.nn.GatedLinear(40, 40, t_l=0.2, t_u=0.9, gamma=-0.3, zeta=1.05), nn.ReLU(),
                          lumos.nn.GatedLinear(40, 30, t_l=0.0, t_u=0.3), nn.ReLU(), nn.Linear(30, 2))
    gated = lumos.gate(model, torch.randn(4, 6)).to(dtype)
    costs = cost_model(gated)
    for seed in range(5):
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for gate in costs.gates:
                gate.log_alpha.copy_(torch.rand(gate.n, generator=g, dtype=torch.float64) * 10 - 5)
        assert torch.equal(costs.units_above_threshold(), costs.kept_units())
    down, up = torch.tensor(-math.inf, dtype=dtype), torch.tensor(math.inf, dtype=dtype)
    with torch.no_grad():  # every logit on or next to one of its gate's boundaries
        for gate in costs.gates:
            closed_max, open_min = log_alpha_bounds(gate.t_l, gate.t_u, gate.beta, gate.gamma, gate.zeta, dtype)
            edges = torch.tensor([b for b in (closed_max, open_min, math.log(-gate.gamma / gate.zeta))
                                  if math.isfinite(b)], dtype=dtype)
            near = torch.cat([torch.nextafter(edges, down), edges, torch.nextafter(edges, up)])
            gate.log_alpha.copy_(near.repeat(gate.n // len(near) + 1)[:gate.n])
    measured = costs.units_above_threshold()
    start = 0
    for gate in costs.gates:
        x = gate.log_alpha.detach()
        closed_max, open_min = log_alpha_bounds(gate.t_l, gate.t_u, gate.beta, gate.gamma, gate.zeta, dtype)
        exact = (x >= open_min) | ((x > closed_max) & (x.double() > math.log(-gate.gamma / gate.zeta)))
        assert torch.equal(measured[start:start + gate.n], exact)
        forced = (x >= open_min) | (x <= closed_max)
        assert torch.equal(measured[start:start + gate.n][forced], gate.kept()[forced])
        start += gate.n
    assert measured.any() and not measured.all()


@pytest.mark.parametrize("grad", [True, False])
def test_the_evaluation_gives_the_kept_units_from_its_own_copy_of_the_logits(grad):
    model, x = mlp_zoo()["residual"]
    gated = lumos.gate(model, x)
    randomize_gates(gated, seed=5)
    costs = cost_model(gated)
    with torch.set_grad_enabled(grad):
        expected, soft, units = costs.expected_and_soft_kept("params", normalize=True, units=True)
    assert torch.equal(units, costs.units_above_threshold()) and units.dtype == torch.bool
    assert not units.requires_grad and expected.requires_grad == grad
    alone = costs.expected_and_soft_kept("params", normalize=True)
    assert torch.equal(expected, alone[0]) and torch.equal(soft, alone[1])


@pytest.mark.parametrize("host", [True, False])
def test_the_lock_measurement_is_the_exact_fraction_whether_or_not_the_units_moved(gated_mlp, monkeypatch, host):
    """On CPU a measurement whose kept units equal the last ones reuses their cost: after every
    ``penalty`` call the recorded fraction is the exact one of the units above their bounds, and
    the measurement before it is kept for the lock's choice, whether one unit crossed or none."""
    monkeypatch.setattr(lumos.BudgetController, "host_scalars_on_cpu", host)
    controller = lumos.BudgetController(gated_mlp, target=0.5, total_steps=100, warmup=0.0, anneal=0.0)
    costs = cost_model(gated_mlp)
    gate = costs.gates[-1]
    with torch.no_grad():
        gate.log_alpha.fill_(3.0)  # every unit kept
    before = None
    for move in (False, False, True, False, True):
        if move:
            with torch.no_grad():
                gate.log_alpha[int(gate.log_alpha.argmax())] = -4.0  # one unit closes
        controller.penalty(torch.tensor(1.0))
        units = costs.units_above_threshold()
        exact = costs.actual_tensor("params", units) / costs.dense["params"]
        assert torch.equal(controller._units, units)
        assert float(controller._kept) == float(exact)
        assert controller._last[0] is not None and (before is None or float(controller._last[0]) == before)
        before = float(exact)


def test_cost_model_evaluates_every_layer_in_one_pass_matching_the_per_layer_formula():
    model, x = mlp_zoo()["residual"]
    gated = lumos.gate(model, x)
    randomize_gates(gated, seed=2)
    costs = cost_model(gated)
    measured = costs.evaluate("params")
    assert float(measured.kept) == pytest.approx(costs.actual("params"))
    assert float(measured.expected) == pytest.approx(float(lumos.penalty(gated, "params")), rel=1e-6)
    assert measured.kept_units.shape == measured.in_band.shape == (costs.n_units,)


@pytest.mark.parametrize("host", [True, False])
def test_the_penalty_scale_is_the_task_loss_capped_at_the_warm_ups(gated_mlp, monkeypatch, host):
    """With ``relative`` and ``loss_cap``, ``lam * min(task, L_w) * E``: ``L_w`` averages the
    warm-up's task losses (EMA 0.9), then stays; a loss that rises above it (gates in the band) does
    not raise the pressure, a loss below it scales it down as before; the reference survives a
    checkpoint. Without ``loss_cap`` (the default) the scale is the loss itself."""
    monkeypatch.setattr(lumos.BudgetController, "host_scalars_on_cpu", host)

    def controller(loss_cap=True):
        c = lumos.BudgetController(gated_mlp, target=0.5, total_steps=10, warmup=0.3, anneal=0.6, loss_cap=loss_cap)
        c._lam = 2.0 if host else torch.tensor(2.0, dtype=torch.float64)  # a fixed weight, to read the scale
        return c

    def scale(c, task):
        expected = cost_model(gated_mlp).expected_and_soft_kept("params", normalize=True)[0]
        return float(c.penalty(torch.tensor(task)).detach() / (2.0 * expected.detach()))

    c = controller()
    reference = None
    for task in (1.0, 3.0, 2.0):  # the warm-up: steps 0, 1, 2
        reference = task if reference is None else 0.9 * reference + 0.1 * task
        assert scale(c, task) == pytest.approx(min(task, reference), rel=1e-6)
        c.steps += 1
    assert reference == pytest.approx(1.28)
    assert scale(c, 5.0) == pytest.approx(1.28, rel=1e-6)  # capped
    assert scale(c, 0.5) == pytest.approx(0.5, rel=1e-6)  # below: the loss itself
    resumed = controller()
    resumed.load_state_dict(c.state_dict())
    assert scale(resumed, 5.0) == pytest.approx(1.28, rel=1e-6)
    default = controller(loss_cap=False)
    default.steps = 5
    assert scale(default, 5.0) == pytest.approx(5.0, rel=1e-6)
