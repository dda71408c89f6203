"""The measurements lumos run and lumos bench report: metrics, memory, energy, paired latency."""
import pytest
import torch
from torch import nn

from lumos import metrics


def test_mse_and_accuracy_values_and_shape_errors():
    assert metrics.mse(torch.tensor([1.0, 3.0]), torch.tensor([0.0, 1.0])) == pytest.approx(2.5)
    logits = torch.tensor([[2.0, 1.0], [0.0, 3.0], [5.0, -1.0]])
    assert metrics.accuracy(logits, torch.tensor([0, 1, 1])) == pytest.approx(2 / 3)
    with pytest.raises(ValueError, match="mse"):
        metrics.mse(torch.zeros(3), torch.zeros(3, 1))
    with pytest.raises(ValueError, match="accuracy"):
        metrics.accuracy(logits, torch.tensor([0, 1]))


def test_peak_memory_counts_weights_inputs_and_the_activations_of_the_forward():
    model = nn.Sequential(nn.Linear(8, 256), nn.ReLU(), nn.Linear(256, 4))
    weights = 4 * sum(p.numel() for p in model.parameters())
    small, large = (metrics.peak_memory(model, torch.randn(rows, 8)) for rows in (64, 4096))
    assert small["method"] == large["method"] == "cpu_profiler_allocations"
    hidden = 4 * 4096 * 256  # one (4096, 256) float32 activation is alive at the peak
    assert large["bytes"] >= weights + 4 * 4096 * 8 + hidden
    assert large["bytes"] - small["bytes"] >= hidden


class _Meter(nn.Module):
    """A model whose every forward adds ``joules`` to a fake RAPL counter (wrapping like the real one)."""

    def __init__(self, counter, joules, wrap_uj):
        super().__init__()
        self.counter, self.joules, self.wrap_uj = counter, joules, wrap_uj
        self.lin = nn.Linear(2, 2)

    def forward(self, x):
        value = (int(self.counter.read_text()) + round(self.joules * 1e6)) % self.wrap_uj
        self.counter.write_text(str(value))
        return self.lin(x)


def test_energy_reads_rapl_counters_with_wraparound(tmp_path, monkeypatch):
    package = tmp_path / "intel-rapl:0"
    package.mkdir()
    (package / "energy_uj").write_text(str(2**32 - 3_000_000))  # wraps during the measurement
    (package / "max_energy_range_uj").write_text(str(2**32))
    (tmp_path / "intel-rapl:0:0").mkdir()  # a sub-domain (core): counted inside its package
    monkeypatch.setattr(metrics, "RAPL_ROOT", str(tmp_path))
    result = metrics.energy(_Meter(package / "energy_uj", 0.25, 2**32), torch.randn(3, 2), repeats=20)
    assert result["method"] == "rapl" and result["joules"] == pytest.approx(0.25)


def test_energy_is_none_with_the_reason_when_no_counter_is_readable(tmp_path, monkeypatch):
    monkeypatch.setattr(metrics, "RAPL_ROOT", str(tmp_path / "absent"))
    result = metrics.energy(nn.Linear(2, 2), torch.randn(3, 2), repeats=2)
    assert result["joules"] is None and result["method"].startswith("unavailable: no readable RAPL counter")


def test_paired_latency_alternates_the_two_models():
    calls = []

    class Tagged(nn.Module):
        def __init__(self, tag):
            super().__init__()
            self.tag = tag

        def forward(self, x):
            calls.append(self.tag)
            return x

    reference, candidate = metrics.paired_latency(Tagged("a"), Tagged("b"), torch.zeros(1), repeats=4, warmup=0)
    assert calls == ["a", "b", "b", "a", "a", "b", "b", "a"]
    assert reference["repeats"] == candidate["repeats"] == 4 and candidate["median_ms"] >= 0
    with pytest.raises(ValueError, match="repeats"):
        metrics.latency(nn.Identity(), torch.zeros(1), repeats=0)
