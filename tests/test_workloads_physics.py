"""The physics of the built-in workloads: each generator checked against closed forms, finite
differences or the statistics it promises (independent of how the generator computes them)."""
import math
import random

import pytest
import torch

from lumos.evaluation.training import train
from lumos.workloads import cosmo3d, em_denoise, md_forces, molecules, vit_fields
from lumos.workloads.graphs import GraphSet
from lumos.workloads.spectral import apply_transfer, gaussian_random_fields, wavenumbers


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


def _abs_corr(x, y):
    x = (x - x.mean(0)) / x.std(0)
    y = (y - y.mean(0)) / y.std(0)
    return (x.T @ y / (len(x) - 1)).abs()


# -- spectral helpers -----------------------------------------------------------------------------
@pytest.mark.parametrize("shape", [(16, 16, 16), (15, 12), (32,)])
def test_gaussian_random_fields_have_the_requested_rms_and_zero_mean(shape):
    k = wavenumbers(shape)
    power = torch.where(k > 0, k.clamp_min(1e-9) ** -2.0, 0.0)[None].expand(300, *k.shape)
    sigma = torch.linspace(0.5, 2.0, 300)
    fields = gaussian_random_fields(300, shape, power, sigma, _gen())
    rms = fields.flatten(1).std(1)
    assert torch.allclose(fields.flatten(1).mean(1), torch.zeros(300, dtype=torch.float64), atol=1e-12)
    assert abs(float((rms / sigma).mean()) - 1.0) < 0.03


def test_apply_transfer_of_ones_is_identity_and_wavenumbers_are_symmetric():
    x = torch.randn(3, 8, 6, generator=_gen(), dtype=torch.float64)
    torch.testing.assert_close(apply_transfer(x, torch.ones(8, 4, dtype=torch.float64), 2), x)
    full = wavenumbers((8, 6), half=False)
    assert float(full[0, 0]) == 0.0 and torch.allclose(full[1, 0], full[-1, 0])
    assert float(wavenumbers((8,), half=True)[-1]) == pytest.approx(math.pi)


# -- md_forces ------------------------------------------------------------------------------------
def _features(r1=1.1, r2=1.2, theta=2.0, D=4.0, a=2.0, r0=1.1, k_theta=2.0, theta0=1.9):
    return torch.tensor([[r1, r2, theta, D, a, r0, k_theta, theta0]], dtype=torch.float64)


def test_md_forces_are_minus_the_energy_gradient_by_finite_differences():
    feats = _features()
    forces = md_forces.fragment_forces(feats)[0]
    r1, r2, theta = 1.1, 1.2, 2.0
    params = dict(zip(md_forces.FEATURE_NAMES[3:], feats[:, 3:].unbind(1)))
    pos = {"i": torch.tensor([[r1, 0.0, 0.0]], dtype=torch.float64),
           "j": torch.zeros(1, 3, dtype=torch.float64),
           "k": torch.tensor([[r2 * math.cos(theta), r2 * math.sin(theta), 0.0]], dtype=torch.float64)}
    h = 1e-6
    for atom, cols in (("i", (0, 1)), ("k", (2, 3))):
        for axis, col in zip((0, 1), cols):
            plus, minus = dict(pos), dict(pos)
            plus[atom] = pos[atom].clone()
            plus[atom][0, axis] += h
            minus[atom] = pos[atom].clone()
            minus[atom][0, axis] -= h
            grad = (md_forces.fragment_energy(plus["i"], plus["j"], plus["k"], params)
                    - md_forces.fragment_energy(minus["i"], minus["j"], minus["k"], params)) / (2 * h)
            assert float(forces[col]) == pytest.approx(-float(grad), rel=1e-6, abs=1e-8)


def test_md_forces_vanish_at_equilibrium_and_match_the_morse_closed_form():
    assert torch.allclose(md_forces.fragment_forces(_features(r1=1.1, r2=1.1, theta=1.9)),
                          torch.zeros(1, 4, dtype=torch.float64), atol=1e-12)
    # bond 2 and the angle at equilibrium: atom i feels only the Morse force along x,
    # F = -dV/dr = -2 D a (1 - e^{-a(r-r0)}) e^{-a(r-r0)}
    r1, depth, a, r0 = 1.4, 4.0, 2.0, 1.1
    forces = md_forces.fragment_forces(_features(r1=r1, r2=r0, theta=1.9, D=depth, a=a, r0=r0, theta0=1.9))[0]
    e = math.exp(-a * (r1 - r0))
    assert float(forces[0]) == pytest.approx(-2 * depth * a * (1 - e) * e, rel=1e-10)
    assert abs(float(forces[1])) < 1e-12 and abs(float(forces[2])) < 1e-12


def test_md_forces_distractors_are_independent_of_the_forces():
    w = md_forces.load("full", n_train=20000, n_val=10, n_test=10)
    x, y = w.train
    corr = _abs_corr(x.double(), torch.cat([y, y ** 2], 1).double()).max(1).values
    n_real = len(w.informative_features)
    assert (corr[n_real:] < 0.04).all(), corr
    assert corr[:3].min() > 0.1, corr  # r1, r2, theta drive the forces


# -- cosmo3d --------------------------------------------------------------------------------------
def test_cosmo3d_fields_have_the_requested_spectral_slope_and_rms():
    grid, n = 16, 64
    k = wavenumbers((grid,) * 3)
    for slope in (-2.5, -1.0):
        fields = cosmo3d.density_fields(torch.full((n,), 0.8), torch.full((n,), slope), grid, _gen(1))
        assert float(fields.flatten(1).std(1).mean()) == pytest.approx(0.8, rel=0.05)
        power = (torch.fft.rfftn(fields, dim=(1, 2, 3)).abs() ** 2).mean(0)
        shells = [(k > lo) & (k <= lo * 1.6) for lo in (0.5, 0.9, 1.5)]
        log_k = torch.tensor([float(k[s].mean().log()) for s in shells])
        log_p = torch.tensor([float(power[s].mean().log()) for s in shells])
        fitted = float(torch.linalg.lstsq(torch.stack([log_k, torch.ones(3)], 1), log_p[:, None]).solution[0])
        assert fitted == pytest.approx(slope, abs=0.15)


def test_cosmo3d_galaxy_channel_is_bias_times_density_plus_shot_noise():
    w = cosmo3d.load("small", n_train=64, n_val=8, n_test=8)
    x, y = w.train
    s = w.stats
    fields = x.double() * s["x_scale"] + s["x_mean"]
    bias = y.double()[:, 2] * s["y_scale"][0, 2] + s["y_mean"][0, 2]
    delta, galaxies = fields[:, 0].flatten(1), fields[:, 1].flatten(1)
    fitted = (delta * galaxies).sum(1) / (delta * delta).sum(1)
    assert torch.allclose(fitted, bias, atol=0.15)
    residual = (galaxies - bias[:, None] * delta).std()
    assert float(residual) == pytest.approx(cosmo3d.SHOT_NOISE_STD, rel=0.05)


# -- em_denoise -----------------------------------------------------------------------------------
def test_em_denoise_frames_are_poisson_counts_of_the_clean_image():
    side, n = 16, 400
    clean = em_denoise.blur(em_denoise.specimens(n, side, 4, _gen()))
    assert float(clean.min()) >= 0.2 - 1e-9  # background never below its range
    half_dose = torch.full((n, 1, 1), 10.0, dtype=torch.float64)
    frames = torch.stack(em_denoise.record_frames(clean, half_dose, 20, _gen(2)))
    counts = frames * half_dose
    assert torch.equal(counts, counts.round())
    z = (frames.mean(0) - clean) / torch.sqrt(clean / half_dose / 20)  # ~ N(0, 1) per pixel
    assert abs(float(z.mean())) < 0.02 and float(z.var()) == pytest.approx(1.0, rel=0.05)


def test_em_denoise_blur_keeps_the_mean_and_smooths():
    images = em_denoise.specimens(8, 16, 4, _gen())
    blurred = em_denoise.blur(images)
    torch.testing.assert_close(blurred.mean((1, 2)), images.mean((1, 2)))
    assert float(blurred.diff(dim=-1).abs().mean()) < float(images.diff(dim=-1).abs().mean())


def test_em_denoise_averaging_both_frames_beats_one_frame_and_dark_frame_is_unrelated():
    w = em_denoise.load("small", n_train=256)
    x, y = w.train
    s = w.stats
    frames = x.double() * s["x_scale"] + s["x_mean"]
    one = float(((frames[:, 0] - y[:, 0].double()) ** 2).mean())
    both = float(((frames[:, :2].mean(1) - y[:, 0].double()) ** 2).mean())
    assert both == pytest.approx(one / 2, rel=0.1)
    dark = frames[:, 2].flatten()
    assert float(dark.mean()) == pytest.approx(em_denoise.DARK_MEAN, rel=0.02)
    assert float(_abs_corr(dark[:, None], y.double().flatten()[:, None])) < 0.02


# -- molecules ------------------------------------------------------------------------------------
def test_bond_additivity_enthalpy_of_known_molecules():
    # ethane C-C: 346 + 6 C-H; formaldehyde C=O: 799 + 2 C-H; hydroxylamine N-O: 201 + 2 N-H + O-H
    assert molecules.atomization_enthalpy(["C", "C"], [(0, 1, 1)]) == 346 + 6 * 411
    assert molecules.atomization_enthalpy(["C", "O"], [(0, 1, 2)]) == 799 + 2 * 411
    assert molecules.atomization_enthalpy(["N", "O"], [(0, 1, 1)]) == 201 + 2 * 386 + 459


def test_random_molecules_respect_valence_and_are_connected():
    rng = random.Random(0)
    for _ in range(300):
        elements, bonds = molecules.random_molecule(rng, 4, 15)
        used = [0] * len(elements)
        for a, b, order in bonds:
            assert a != b and order in (1, 2)
            used[a] += order
            used[b] += order
        assert all(u <= molecules.VALENCE[e] for u, e in zip(used, elements))
        reached, frontier = {0}, [0]
        while frontier:
            node = frontier.pop()
            for a, b, _ in bonds:
                for u, v in ((a, b), (b, a)):
                    if u == node and v not in reached:
                        reached.add(v)
                        frontier.append(v)
        assert reached == set(range(len(elements)))
    assert len({tuple(m[0]) for m in (molecules.random_molecule(random.Random(s), 6, 6) for s in range(20))}) > 10


def test_molecules_targets_match_the_graphs():
    w = molecules.load("small")
    graphs = w.train
    s = w.stats
    for g in range(5):
        (x, edge_index, edge_attr, _), y = graphs.batch(torch.tensor([g]))
        elements = [molecules.ELEMENTS[0] if not row.any() else molecules.ELEMENTS[1 + int(row.argmax())]
                    for row in x[:, :3]]
        bonds = [(int(a), int(b), 1 + int(attr[1])) for (a, b), attr in zip(edge_index.T.tolist(), edge_attr)
                 if a < b]
        expected = molecules.atomization_enthalpy(elements, bonds) / len(elements)
        assert float(y[0, 0] * s["y_scale"][0, 0] + s["y_mean"][0, 0]) == pytest.approx(expected, rel=1e-6)


def test_graph_set_batches_offset_nodes_and_model_is_batch_independent():
    w = molecules.load("small")
    graphs = w.val
    (x, edge_index, edge_attr, batch), y = graphs.batch(torch.tensor([3, 0, 5]))
    assert int(batch.max()) == 2 and y.shape == (3, 1)
    for g in range(3):  # edges stay inside their graph
        nodes = (batch == g).nonzero().flatten()
        mask = (edge_index[0] >= nodes.min()) & (edge_index[0] <= nodes.max())
        assert ((edge_index[1][mask] >= nodes.min()) & (edge_index[1][mask] <= nodes.max())).all()
    torch.manual_seed(0)
    model = w.make_model().eval()
    together = model(x, edge_index, edge_attr, batch)
    alone = torch.cat([model(*graphs.batch(torch.tensor([g]))[0]) for g in (3, 0, 5)])
    torch.testing.assert_close(together, alone, atol=1e-5, rtol=1e-5)
    assert sum(len(yb) for _, yb in graphs) == len(graphs)


def test_graph_set_shuffles_reproducibly_and_refuses_inconsistent_pointers():
    w1, w2 = molecules.load("small", seed=3), molecules.load("small", seed=3)
    first = [yb for _, yb in w1.train]
    assert all(torch.equal(a, b) for a, b in zip(first, (yb for _, yb in w2.train)))
    assert not all(torch.equal(a, b) for a, b in zip(first, (yb for _, yb in w1.train)))  # next epoch: new order
    g = w1.val
    with pytest.raises(ValueError, match="GraphSet"):
        GraphSet(g.x, g.edge_index, g.edge_attr, g.node_ptr[:-1], g.edge_ptr, g.y)


def test_graph_set_epoch_order_is_a_function_of_seed_and_epoch():
    iterated, fresh = molecules.load("small", seed=3), molecules.load("small", seed=3)
    for _ in iterated.train:  # an earlier pass (a dense phase) must not change a later run's batches
        pass
    orders = {}
    for name, w in (("iterated", iterated), ("fresh", fresh)):
        w.train.set_epoch(4)
        orders[name] = torch.cat([yb for _, yb in w.train])
    torch.testing.assert_close(orders["iterated"], orders["fresh"], rtol=0, atol=0)
    torch.testing.assert_close(torch.cat([yb for _, yb in fresh.train]), orders["fresh"], rtol=0, atol=0)
    fresh.train.set_epoch(5)
    assert not torch.equal(torch.cat([yb for _, yb in fresh.train]), orders["fresh"])
    reseeded = fresh.train.subset(torch.arange(len(fresh.train)), shuffle=True, seed=4)  # same graphs
    reseeded.set_epoch(4)
    assert not torch.equal(torch.cat([yb for _, yb in reseeded]), orders["fresh"])


def test_fit_on_graph_batches_does_not_depend_on_earlier_passes():
    w = molecules.load("small", seed=1)
    trained = []
    for earlier_passes in (0, 2):
        for _ in range(earlier_passes):
            for _ in w.train:
                pass
        torch.manual_seed(0)
        model = w.make_model()
        train(model, w, 2, name="dense", seed=0)
        trained.append(model.state_dict())
    for key, value in trained[0].items():
        torch.testing.assert_close(trained[1][key], value, rtol=0, atol=0, msg=key)


# -- vit_fields -----------------------------------------------------------------------------------
def test_vit_fields_regime_boundaries():
    bound = math.log10(2)  # 0.30103
    log10_le = torch.tensor([-0.6, -0.302, -0.3, 0.0, 0.3, 0.302, 0.6])
    assert vit_fields.regime(log10_le).tolist() == [0, 0, 1, 1, 1, 2, 2]
    assert vit_fields.regime(torch.tensor([-bound, bound], dtype=torch.float64)).tolist() == [1, 1]


def test_vit_fields_more_diffusion_means_smoother_unit_variance_fields():
    tau = torch.tensor([0.05, 0.5, 5.0]).repeat_interleave(50)
    fields = vit_fields.diffused_fields(tau, 32, _gen())
    assert torch.allclose(fields.flatten(1).std(1), torch.ones(150, dtype=torch.float64), atol=0.02)
    roughness = fields.diff(dim=-1).pow(2).mean((1, 2)).reshape(3, 50).mean(1)
    assert roughness[0] > roughness[1] > roughness[2]


def _threshold_accuracy(score: torch.Tensor, labels: torch.Tensor) -> float:
    """Accuracy of the best 3-class rule ``class = [s > a] + [s > b]`` with ``s = +-score``."""
    best = 0.0
    for s in (score, -score):
        cuts = torch.quantile(s, torch.linspace(0.02, 0.98, 30, dtype=s.dtype))
        for i, a in enumerate(cuts):
            for b in cuts[i:]:
                pred = (s > a).long() + (s > b).long()
                best = max(best, float((pred == labels).double().mean()))
    return best


def test_vit_fields_classes_need_both_fields():
    w = vit_fields.load("small", n_train=3000)
    x, y = w.train
    roughness = x.double().diff(dim=-1).pow(2).mean((2, 3)).log()  # (n, channels), grows as tau falls
    majority = float(torch.bincount(y).max()) / len(y)
    temperature, concentration = (_threshold_accuracy(roughness[:, c], y) for c in (0, 1))
    both = _threshold_accuracy(roughness[:, 0] - roughness[:, 1], y)
    assert concentration < majority + 0.03  # alone, c says nothing: its diffusion time is unknown
    assert temperature < both - 0.1  # T alone helps a little; compared with c it tells the regime
    assert _threshold_accuracy(roughness[:, 2], y) < majority + 0.03  # the distractor tells nothing
    counts = torch.bincount(y, minlength=3).double() / len(y)
    assert (counts > 0.2).all()
