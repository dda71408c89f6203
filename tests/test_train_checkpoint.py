"""Checkpoints of lumos.fit: a killed run resumes to the same bits, bad files are refused and
left as they are, no temporary file stays behind."""
import os
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import lumos
from fit_worker import launch
from lumos.train import checkpoint as ckpt

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def assert_same_state(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


@pytest.mark.slow
def test_a_run_killed_mid_epoch_resumes_to_bit_identical_parameters(tmp_path):
    """SIGKILL after step 17 (epoch 1, batch 7 of 10; the last checkpoint after step 15), run the
    same command again: the final weights, the compacted model and the history equal an
    uninterrupted run's exactly (CPU); dropout, the gates' noise, the budget controller and the
    shuffling all resume where they were."""
    launch(tmp_path / "reference", "--dropout")
    checkpoint = tmp_path / "run.pt"
    killed = launch(tmp_path / "resumed", "--dropout", "--checkpoint", checkpoint, "--every", 5, pause_at=17)
    assert killed.returncode == -9 and "step 17" in killed.stdout and "step 18" not in killed.stdout
    assert checkpoint.exists() and not (tmp_path / "resumed").exists()
    assert torch.load(checkpoint, weights_only=True)["state"]["step"] == 15
    done = launch(tmp_path / "resumed", "--dropout", "--checkpoint", checkpoint, "--every", 5)
    assert "resuming from" in done.stderr and "after 15 steps (epoch 1, batch 5)" in done.stderr
    reference, resumed = torch.load(tmp_path / "reference"), torch.load(tmp_path / "resumed")
    assert resumed["resumed_from"]["step"] == 15
    assert_same_state(reference["state"], resumed["state"])
    assert_same_state(reference["compacted"], resumed["compacted"])
    assert [row["train_loss"] for row in reference["history"]] == [row["train_loss"] for row in resumed["history"]]
    assert reference["losses"][15:] == resumed["losses"]  # the resumed run redid steps 16 and 17 alike
    assert sorted(os.listdir(tmp_path)) == ["reference", "resumed", "run.pt"]  # no temporary file left


# -- in one process: interrupt with an exception, resume, compare ----------------------------------

class Interrupt(Exception):
    pass


class StopAt(lumos.Callback):
    """Raises after step ``at``; counts calls of NumPy's and Python's RNGs (restored on resume)."""

    def __init__(self, at: int | None = None):
        self.at, self.draws = at, 0.0

    def on_step_end(self, loop, task_loss):
        import random

        import numpy as np

        self.draws += float(np.random.rand()) + random.random()
        if loop.step == self.at:
            raise Interrupt

    def state_dict(self):
        return {"draws": self.draws}

    def load_state_dict(self, state):
        self.draws = state["draws"]


def _problem(seed: int = 0, loader: bool = False):
    torch.manual_seed(seed)
    x = torch.randn(200, 6)
    y = x[:, :2] * 2
    model = nn.Sequential(nn.Linear(6, 24), nn.ReLU(), nn.Dropout(0.1), nn.Linear(24, 24), nn.ReLU(),
                          nn.Linear(24, 2))
    gated = lumos.gate(model, x[:8])
    train = DataLoader(TensorDataset(x, y), batch_size=25, shuffle=True) if loader else (x, y)
    return gated, train, (x[:40], y[:40])


FIT = dict(epochs=4, batch_size=25, seed=3, progress=False)


@pytest.mark.parametrize("options", [
    dict(target=0.3, scheduler=lambda opt: torch.optim.lr_scheduler.StepLR(opt, 1, gamma=0.7)),
    dict(lam=0.5, loader=True),
    dict(target=0.5, scheduler_interval="step",
         scheduler=lambda opt: torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=[0.01, 0.2], total_steps=40)),
], ids=["target-steplr", "lam-shuffled-loader", "onecycle-per-step"])
@pytest.mark.parametrize("stop_at, every", [(13, 4), (16, None)], ids=["mid-epoch", "epoch-end"])
def test_an_interrupted_run_resumes_exactly(tmp_path, options, stop_at, every):
    import random

    import numpy as np

    options = dict(options)
    loader = options.pop("loader", False)
    gated, train, val = _problem(loader=loader)
    np.random.seed(0), random.seed(0)
    counter = StopAt()
    lumos.fit(gated, train, val, callbacks=[counter], **FIT, **options)
    reference, draws = gated.state_dict(), counter.draws

    path = tmp_path / "run.pt"
    gated, train, val = _problem(loader=loader)
    np.random.seed(0), random.seed(0)
    with pytest.raises(Interrupt):
        lumos.fit(gated, train, val, callbacks=[StopAt(stop_at)], checkpoint=path, checkpoint_every=every,
                  **FIT, **options)
    gated, train, val = _problem(loader=loader)
    np.random.seed(7), random.seed(7), torch.manual_seed(7)  # whatever the state: the checkpoint restores it
    counter = StopAt()
    history = lumos.fit(gated, train, val, callbacks=[counter], checkpoint=path, checkpoint_every=every,
                        **FIT, **options)
    assert history.resumed_from["step"] == (12 if every else 8)
    assert_same_state(reference, gated.state_dict())
    assert counter.draws == draws


def test_a_finished_run_called_again_returns_the_same_model_without_training(tmp_path, capsys):
    path = tmp_path / "run.pt"
    gated, train, val = _problem()
    first = lumos.fit(gated, train, val, target=0.3, checkpoint=path, **FIT)
    done = gated.state_dict()
    gated, train, val = _problem()
    again = lumos.fit(gated, train, val, target=0.3, checkpoint=path, **FIT)
    assert_same_state(done, gated.state_dict())
    assert again.epochs == first.epochs and again.best_epoch == first.best_epoch
    assert "resuming from" in capsys.readouterr().err


def test_a_resumed_run_may_lower_the_learning_rate(tmp_path):
    path = tmp_path / "run.pt"
    gated, train, val = _problem()
    with pytest.raises(Interrupt):
        lumos.fit(gated, train, val, callbacks=[StopAt(12)], checkpoint=path, **FIT)
    gated, train, val = _problem()
    optimizer = torch.optim.Adam(lumos.param_groups(gated, 1e-4))
    with pytest.raises(ValueError, match="lr=0.001.*only to the optimizer fit builds"):
        lumos.fit(gated, train, val, checkpoint=path, optimizer=optimizer, **FIT)
    seen = []

    class Lr(lumos.Callback):
        def on_fit_start(self, loop):
            seen.extend(group["lr"] for group in loop.optimizer.param_groups)

    lumos.fit(gated, train, val, checkpoint=path, callbacks=[Lr()], **{**FIT, "lr": 1e-4})
    assert seen == pytest.approx([1e-4, 1e-4 * lumos.train.GATE_LR_SCALE])


# -- files that cannot be resumed are refused and left as they are ----------------------------------

def _written(tmp_path) -> Path:
    path = tmp_path / "run.pt"
    gated, train, val = _problem()
    lumos.fit(gated, train, val, checkpoint=path, **{**FIT, "epochs": 1})
    return path


@pytest.mark.parametrize("keep", [0.5, 0.0], ids=["half", "empty"])
def test_a_truncated_checkpoint_is_refused_and_left_as_it_is(tmp_path, keep):
    path = _written(tmp_path)
    data = path.read_bytes()
    path.write_bytes(data[:int(len(data) * keep)])
    gated, train, val = _problem()
    with pytest.raises(ValueError, match=r"lumos.fit: cannot read checkpoint `.*run.pt` \(.* bytes\): it is truncated"):
        lumos.fit(gated, train, val, checkpoint=path, **FIT)
    assert path.read_bytes() == data[:int(len(data) * keep)]


def test_a_checkpoint_of_another_model_or_other_settings_is_refused(tmp_path):
    path = _written(tmp_path)
    data = path.read_bytes()
    torch.manual_seed(0)
    x = torch.randn(200, 6)
    wider = lumos.gate(nn.Sequential(nn.Linear(6, 32), nn.ReLU(), nn.Linear(32, 2)), x[:8])
    with pytest.raises(ValueError, match=r"written for a different model: .*`model.0.weight` is \(24, 6\) float32 "
                                         r"there and \(32, 6\) float32 here"):
        lumos.fit(wider, (x, x[:, :2]), checkpoint=path, **FIT)
    for change, message in [(dict(batch_size=20), "batch_size=25 there, 20 here"),
                            (dict(seed=4), "seed=3 there, 4 here"),
                            (dict(target=0.2), "target=None there, 0.2 here"),
                            (dict(loss_fn=nn.functional.l1_loss), "loss_fn='mse_loss' there, 'l1_loss' here")]:
        gated, train, val = _problem()
        with pytest.raises(ValueError, match=f"other settings that matter: {message}"):
            lumos.fit(gated, train, val, checkpoint=path, **{**FIT, **change})
    gated, _, val = _problem()
    with pytest.raises(ValueError, match="other settings that matter: train="):
        lumos.fit(gated, (x + 1, x[:, :2]), val, checkpoint=path, **FIT)  # other data, same shapes
    assert path.read_bytes() == data
    path.write_text("not a checkpoint")
    with pytest.raises(ValueError, match="cannot read checkpoint"):
        lumos.fit(gated, train, val, checkpoint=path, **FIT)
    torch.save({"weights": torch.ones(3)}, path)
    with pytest.raises(ValueError, match="is a torch file but not a lumos.fit checkpoint"):
        lumos.fit(gated, train, val, checkpoint=path, **FIT)


def test_checkpoint_arguments_are_checked(tmp_path):
    gated, train, val = _problem()
    with pytest.raises(ValueError, match="`checkpoint_every` needs a `checkpoint`"):
        lumos.fit(gated, train, checkpoint_every=5, **FIT)
    with pytest.raises(ValueError, match="`checkpoint_every` must be a positive int"):
        lumos.fit(gated, train, checkpoint=tmp_path / "a.pt", checkpoint_every=0, **FIT)
    with pytest.raises(ValueError, match="must be a file path, got the folder"):
        lumos.fit(gated, train, checkpoint=tmp_path, **FIT)
    with pytest.raises(ValueError, match="does not exist"):
        lumos.fit(gated, train, checkpoint=tmp_path / "no" / "a.pt", **FIT)


def test_a_write_that_fails_leaves_the_previous_checkpoint_and_no_temporary_file(tmp_path, monkeypatch):
    path = tmp_path / "run.pt"
    ckpt.save_atomic({"a": torch.ones(2)}, path)
    before = path.read_bytes()

    def failing_save(obj, handle):
        handle.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", failing_save)
    with pytest.raises(OSError, match="disk full"):
        ckpt.save_atomic({"a": torch.zeros(2)}, path)
    assert path.read_bytes() == before and os.listdir(tmp_path) == ["run.pt"]
    ckpt.temp_path(path).write_bytes(b"left by a killed run")
    monkeypatch.undo()
    gated, train, val = _problem()
    fresh = tmp_path / "fresh.pt"
    ckpt.temp_path(fresh).write_bytes(b"left by a killed run")
    lumos.fit(gated, train, val, checkpoint=fresh, **{**FIT, "epochs": 1})
    assert not ckpt.temp_path(fresh).exists() and fresh.exists()
