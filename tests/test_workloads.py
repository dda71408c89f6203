"""Built-in workloads: determinism, shapes, known-right-answer feature selection, physics."""
import math

import pytest

from lumos.metrics import r2_score
import torch
from torch import nn

from lumos import workloads
from lumos.workloads import cfd_flux

SMALL = dict(n_train=2000, n_val=300, n_test=300)


def _splits(w):
    return [t for split in (w.train, w.val, w.test) for t in split]


def _abs_corr(x, y):
    """``|corr|`` between every column of ``x (n, a)`` and of ``y (n, b)``, shape ``(a, b)``."""
    x = (x - x.mean(0)) / x.std(0)
    y = (y - y.mean(0)) / y.std(0)
    return (x.T @ y / (len(x) - 1)).abs()


def test_registry_lists_and_loads_cfd_flux():
    assert "cfd_flux" in workloads.available()
    assert workloads.load("cfd_flux", **SMALL).name == "cfd_flux"


def test_registry_unknown_name_raises_with_known_names():
    with pytest.raises(ValueError, match="cfd_flux"):
        workloads.load("no_such_workload")


def test_cfd_flux_same_seed_is_bitwise_identical():
    a, b = cfd_flux.load(seed=3, **SMALL), cfd_flux.load(seed=3, **SMALL)
    assert all(torch.equal(s, t) for s, t in zip(_splits(a), _splits(b)))


def test_cfd_flux_other_seed_differs():
    a, b = cfd_flux.load(seed=0, **SMALL), cfd_flux.load(seed=1, **SMALL)
    assert not any(torch.equal(s, t) for s, t in zip(_splits(a), _splits(b)))


def test_cfd_flux_shapes_dtypes_names_and_finite():
    w = cfd_flux.load(n_distractors=4, **SMALL)
    n_features = 6 + 4
    for (x, y), n in zip((w.train, w.val, w.test), (2000, 300, 300)):
        assert x.shape == (n, n_features) and y.shape == (n, 3)
        assert x.dtype == y.dtype == torch.float32
        assert torch.isfinite(x).all() and torch.isfinite(y).all()
    assert len(w.feature_names) == len(set(w.feature_names)) == n_features
    assert w.informative_features == cfd_flux.STATE_NAMES
    assert w.distractor_features == [f"distractor_{k}" for k in range(4)]
    assert w.target_names == cfd_flux.TARGET_NAMES
    model = w.make_model(hidden=(16, 8))
    assert isinstance(model, nn.Sequential)
    assert model(w.val[0]).shape == (300, 3)


def test_cfd_flux_standardised_with_train_statistics():
    w = cfd_flux.load(**SMALL)
    for t in w.train:
        assert torch.allclose(t.mean(0), torch.zeros(t.shape[1]), atol=1e-5)
        assert torch.allclose(t.std(0), torch.ones(t.shape[1]), atol=1e-4)
    # Un-standardising gives back the Rusanov flux of the un-standardised states.
    x, y = w.val
    s = w.stats
    prim = x.double() * s["x_scale"] + s["x_mean"]
    flux = y.double() * s["y_scale"] + s["y_mean"]
    assert torch.allclose(cfd_flux.rusanov_flux(prim[:, :6]), flux, rtol=1e-5, atol=1e-5)


def test_cfd_flux_distractors_independent_of_target_informative_not():
    w = cfd_flux.load(n_train=20000, n_val=10, n_test=10)
    x, y = w.train
    targets = torch.cat([y, y ** 2], dim=1)  # y**2 also catches a symmetric dependence
    corr = _abs_corr(x.double(), targets.double()).max(dim=1).values
    n_informative = len(w.informative_features)
    assert (corr[n_informative:] < 0.04).all(), corr   # ~1/sqrt(20000) = 0.007 is chance level
    assert (corr[:n_informative] > 0.2).all(), corr


def test_rusanov_flux_equal_states_is_physical_flux():
    # rho=1, u=0.5, p=1: E = 1/0.4 + 0.5*0.25 = 2.625, F = (0.5, 1.25, 0.5 * 3.625).
    prim = torch.tensor([[1.0, 0.5, 1.0, 1.0, 0.5, 1.0]], dtype=torch.float64)
    expected = torch.tensor([[0.5, 1.25, 1.8125]], dtype=torch.float64)
    assert torch.allclose(cfd_flux.rusanov_flux(prim), expected, rtol=0, atol=1e-12)


def test_rusanov_flux_fluid_at_rest_closed_form():
    # L = (1, 0, 1), R = (0.5, 0, 0.5): c_L = c_R = sqrt(1.4) = s_max, F(U_L) = (0, 1, 0),
    # F(U_R) = (0, 0.5, 0), U_R - U_L = (-0.5, 0, -1.25).
    prim = torch.tensor([[1.0, 0.0, 1.0, 0.5, 0.0, 0.5]], dtype=torch.float64)
    s = math.sqrt(1.4)
    expected = torch.tensor([[0.25 * s, 0.75, 0.625 * s]], dtype=torch.float64)
    assert torch.allclose(cfd_flux.rusanov_flux(prim), expected, rtol=0, atol=1e-12)


def test_r2_is_one_for_perfect_prediction_and_zero_for_mean():
    y = torch.randn(100, 3, generator=torch.Generator().manual_seed(0))
    assert r2_score(y, y) == pytest.approx(1.0)
    assert r2_score(y.mean(0).expand_as(y), y) == pytest.approx(0.0, abs=1e-12)


# -- every workload: registry, sizes, determinism, shapes ----------------------------------------
ALL = workloads.available()


def _tensors(data):
    """Every tensor of a split: an (inputs, targets) pair or a GraphSet."""
    if isinstance(data, tuple):
        return list(data)
    return [data.x, data.edge_index, data.edge_attr, data.node_ptr, data.edge_ptr, data.y]


def test_registry_lists_the_six_workloads_of_the_paper_with_descriptions():
    assert ALL == ["cfd_flux", "md_forces", "cosmo3d", "em_denoise", "molecules", "vit_fields"]
    for name in ALL:
        assert len(workloads.describe(name)) > 20


@pytest.mark.parametrize("name", ALL)
def test_small_workload_same_seed_identical_other_seed_differs(name):
    a, b, c = (workloads.load(name, "small", seed=s) for s in (4, 4, 5))
    for split in ("train", "val", "test"):
        same = zip(_tensors(getattr(a, split)), _tensors(getattr(b, split)))
        assert all(torch.equal(s, t) for s, t in same)
    assert not torch.equal(_tensors(a.train)[0], _tensors(c.train)[0])


@pytest.mark.parametrize("name", ALL)
def test_small_workload_shapes_names_finite_and_model_output(name):
    w = workloads.load(name, "small")
    assert w.size == "small" and w.seed == 0
    assert len(set(w.feature_names)) == len(w.feature_names)
    assert set(w.informative_features) < set(w.feature_names)  # every workload has distractors
    assert w.distractor_features
    for split in ("train", "val", "test"):
        for t in _tensors(getattr(w, split)):
            assert not t.is_floating_point() or torch.isfinite(t).all()
        inputs = w.inputs(split, 5)
        assert inputs[0].dtype == torch.float32
        assert inputs[0].shape[w.feature_dim] == len(w.feature_names)
    torch.manual_seed(0)
    model = w.make_model()
    out = model(*w.inputs("val", 5))
    n_samples = 5
    if w.metric_name == "accuracy":
        assert out.shape == (n_samples, len(w.target_names))
    else:
        target = (w.val[1] if isinstance(w.val, tuple) else w.val.y)[:n_samples]
        assert out.shape == target.shape
    assert set(w.fit_defaults) == {"epochs", "fine_tune_epochs", "lr", "batch_size"}


@pytest.mark.parametrize("name", ALL)
def test_full_size_has_more_data_than_small(name):
    small, full = workloads.SIZES  # ("small", "full")
    module = __import__(f"lumos.workloads.{name}", fromlist=["SIZES"])
    assert {small, full} <= set(module.SIZES) <= {small, full, "demo"}
    assert module.SIZES[full]["n_train"] > module.SIZES[small]["n_train"]


def test_cfd_flux_demo_size_sits_between_small_and_full_and_other_workloads_refuse_it():
    demo = workloads.load("cfd_flux", "demo")
    assert demo.size == "demo"
    sizes = [workloads.load("cfd_flux", s).train[0].shape[0] for s in ("small", "demo", "full")]
    assert sizes == sorted(sizes) and len(set(sizes)) == 3
    with pytest.raises(ValueError, match=r"md_forces\.load: `size` must be one of small, full, got 'demo'"):
        workloads.load("md_forces", "demo")


def test_bad_size_and_unknown_argument_are_refused_naming_the_function():
    with pytest.raises(ValueError, match=r"md_forces\.load: `size` must be one of small, full"):
        workloads.load("md_forces", "medium")
    with pytest.raises(TypeError, match=r"cosmo3d\.load: unknown argument\(s\) n_rows"):
        workloads.load("cosmo3d", "small", n_rows=3)
    with pytest.raises(ValueError, match=r"describe: unknown workload"):
        workloads.describe("nope")
