"""The torch backend of the lumos_kernels ops (the CPU path): float64 gradcheck, the plain references
and the closed-form gradients of KERNELS.md as oracles, the noise generator against a pure-Python
SplitMix64, gate law, noise contract, CSR, argument errors."""
import math

import pytest
import torch

from lumos_kernels import (gate_uniform, gate_uniform_rows, hard_concrete, hard_concrete_parts, hard_concrete_reference, masked_linear,
                           masked_linear_reference, masked_message_passing, masked_message_passing_reference, p_open,
                           to_csr)
from lumos_kernels.hard_concrete import BETA, GAMMA, ZETA, log_alpha_bounds


def _f64(*shape, grad=True):
    return torch.randn(*shape, dtype=torch.float64, requires_grad=grad)


@pytest.mark.parametrize("training", [True, False])
def test_hard_concrete_gradcheck(training):
    # log_alpha in the band (p_open within (0.05, 0.95]) so the stochastic branch is exercised
    log_alpha = (torch.rand(64, dtype=torch.float64) * 2.5 - 1.5).requires_grad_()
    fn = lambda la: hard_concrete(la, seed=7, offset=3, training=training)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (log_alpha,), eps=1e-6, atol=1e-6)


@pytest.mark.parametrize("shape", [(1, 3, 2), (5, 7, 4), (2, 3, 5, 6)])
@pytest.mark.parametrize("gated", ["none", "in", "out", "both"])
@pytest.mark.parametrize("bias", [True, False])
def test_masked_linear_gradcheck(shape, gated, bias):
    *lead, k, n = shape
    x = _f64(*lead, k)
    w = _f64(n, k)
    b = _f64(n) if bias else None
    m_in = torch.rand(k, dtype=torch.float64, requires_grad=True) if gated in ("in", "both") else None
    m_out = torch.rand(n, dtype=torch.float64, requires_grad=True) if gated in ("out", "both") else None
    args = (x, w, b, m_in, m_out)
    assert torch.autograd.gradcheck(masked_linear, args)


def test_masked_linear_matches_dense_formula():
    x, w, b = torch.randn(4, 6, 5), torch.randn(3, 5), torch.randn(3)
    m_in, m_out = torch.rand(5), torch.rand(3)
    expected = (x * m_in) @ (w * m_out[:, None]).T + b * m_out
    torch.testing.assert_close(masked_linear(x, w, b, m_in, m_out), expected)


def _graph(num_nodes=6, num_edges=15, seed=0):
    g = torch.Generator().manual_seed(seed)
    edge_index = torch.randint(0, num_nodes, (2, num_edges), generator=g)
    return edge_index


@pytest.mark.parametrize("with_gate", [True, False])
def test_message_passing_gradcheck(with_gate):
    edge_index = _graph()
    csr = to_csr(edge_index, 6)
    x = _f64(6, 4)
    emb = _f64(15, 4)
    m = torch.rand(4, dtype=torch.float64, requires_grad=True) if with_gate else None
    eps = torch.tensor(0.3, dtype=torch.float64, requires_grad=True)
    fn = lambda x, emb, m, eps: masked_message_passing(x, csr.rowptr, csr.col, emb, m, eps)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (x, emb, m, eps))


def test_message_passing_matches_edge_loop():
    edge_index = _graph(num_nodes=5, num_edges=12, seed=3)
    x, emb_orig, m = torch.randn(5, 3), torch.randn(12, 3), torch.rand(3)
    csr = to_csr(edge_index, 5)
    out = masked_message_passing(x, csr.rowptr, csr.col, emb_orig[csr.perm], m, eps=0.5)
    expected = 1.5 * x.clone()
    for e in range(12):
        j, v = edge_index[:, e]
        expected[v] += torch.relu(x[j] + emb_orig[e])
    torch.testing.assert_close(out, expected * m)


def test_to_csr_sorts_by_destination_stably():
    edge_index = torch.tensor([[0, 1, 2, 3, 0], [2, 0, 2, 1, 0]])
    csr = to_csr(edge_index, 4)
    assert csr.rowptr.tolist() == [0, 2, 3, 5, 5]
    assert csr.perm.tolist() == [1, 4, 3, 0, 2]
    assert csr.col.tolist() == [1, 0, 3, 0, 2]
    assert csr.destinations().tolist() == [0, 0, 1, 2, 2]


def _splitmix64_outputs(seed: int, first: int, count: int) -> list[int]:
    """Outputs ``first .. first + count - 1`` of SplitMix64 seeded with ``seed``, written from the
    published algorithm with Python ints (an oracle independent of the int64-tensor emulation)."""
    mask = (1 << 64) - 1
    outputs = []
    for index in range(first, first + count):
        z = (seed + (index + 1) * 0x9E3779B97F4A7C15) & mask
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & mask
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & mask
        outputs.append(z ^ (z >> 31))
    return outputs


@pytest.mark.parametrize("key, offset", [(0, 0), (5, 100), (-3, 2**40 + 7), (2**63 - 1, 2**64 - 4)])
def test_gate_uniform_is_the_top_24_bits_of_splitmix64(key, offset):
    u = gate_uniform(key, offset, 8)
    want = [(z >> 40) * 2.0 ** -24 for z in _splitmix64_outputs(key & (2**64 - 1), offset, 8)]
    assert u.dtype == torch.float32 and u.tolist() == want  # exact: every value is a multiple of 2**-24
    assert torch.equal(gate_uniform(torch.tensor(key), offset, 8), u)  # a tensor key: the same numbers


def test_gate_uniform_is_uniform_keyed_and_addressed_by_counter():
    u = gate_uniform(5, 0, 100_000)
    assert 0 <= u.min() and u.max() < 1
    # 20 equal bins: chi-square with 19 degrees of freedom; 50 is far beyond its 99.99th percentile
    counts = torch.histc(u, bins=20, min=0.0, max=1.0)
    assert float(((counts - 5000) ** 2 / 5000).sum()) < 50
    for lag in (1, 2, 64):  # neighbouring counters are uncorrelated (standard error 1/sqrt(n) ~ 0.003)
        assert abs(torch.corrcoef(torch.stack([u[:-lag], u[lag:]]))[0, 1]) < 0.02
    # neighbouring keys (consecutive steps give unrelated keys anyway) draw unrelated numbers
    assert abs(torch.corrcoef(torch.stack([u, gate_uniform(6, 0, 100_000)]))[0, 1]) < 0.02
    assert torch.equal(gate_uniform(5, 100, 50), u[100:150])  # offsets address the same stream


def _law(log_alpha):
    """P(z == 0) and P(z == 1) of the hard-concrete distribution (KERNELS.md 1)."""
    p0 = torch.sigmoid(BETA * math.log(-GAMMA / ZETA) - log_alpha)
    p1 = 1 - torch.sigmoid(BETA * math.log((1 - GAMMA) / (ZETA - 1)) - log_alpha)
    return p0, p1


def test_hard_concrete_mask_frequency_matches_law_inside_band():
    n = 200_000
    for value in (-0.8, 0.0, 0.9):
        log_alpha = torch.full((n,), value)
        m = hard_concrete(log_alpha, seed=11, offset=0, training=True)
        p0, p1 = _law(log_alpha[0])
        # binomial standard error at n = 2e5 is about 1e-3: allow 5 sigma
        assert abs((m == 0).float().mean().item() - p0.item()) < 5e-3
        assert abs((m == 1).float().mean().item() - p1.item()) < 5e-3


def test_hard_concrete_thresholds_force_zero_and_one():
    log_alpha = torch.tensor([-6.0, -4.7, 3.0, 6.0])
    pi = p_open(log_alpha)
    assert pi[0] <= 0.05 and pi[1] <= 0.05 and pi[2] > 0.95 and pi[3] > 0.95
    for seed in range(20):
        m = hard_concrete(log_alpha, seed=seed, training=True)
        assert m.tolist() == [0.0, 0.0, 1.0, 1.0]
    assert hard_concrete(log_alpha, seed=0, training=False).tolist() == [0.0, 0.0, 1.0, 1.0]


def test_hard_concrete_eval_is_deterministic_z_hat():
    log_alpha = torch.linspace(-1.5, 1.3, 17)
    a = hard_concrete(log_alpha, seed=1, training=False)
    b = hard_concrete(log_alpha, seed=2, training=False)
    assert torch.equal(a, b)
    z_hat = (torch.sigmoid(log_alpha) * (ZETA - GAMMA) + GAMMA).clamp(0, 1)
    torch.testing.assert_close(a, z_hat)


def test_hard_concrete_same_seed_same_mask():
    log_alpha = torch.zeros(1000)
    a = hard_concrete(log_alpha, seed=3, offset=10, training=True)
    assert torch.equal(a, hard_concrete(log_alpha, seed=3, offset=10, training=True))
    assert not torch.equal(a, hard_concrete(log_alpha, seed=4, offset=10, training=True))
    assert not torch.equal(a, hard_concrete(log_alpha, seed=3, offset=11, training=True))


def test_hard_concrete_noise_range_half_is_deterministic():
    log_alpha = torch.linspace(-1, 1, 9)
    a = hard_concrete(log_alpha, seed=1, training=True, noise_range=0.5)
    b = hard_concrete(log_alpha, seed=2, training=True, noise_range=0.5)
    assert torch.equal(a, b)


@pytest.mark.parametrize("kwargs, match", [
    (dict(t_l=0.9, t_u=0.1), "t_l"),
    (dict(beta=0.0), "beta"),
    (dict(noise_range=0.7), "noise_range"),
])
def test_hard_concrete_rejects_bad_parameters(kwargs, match):
    with pytest.raises(ValueError, match=match):
        hard_concrete(torch.zeros(3), seed=0, **kwargs)


def test_hard_concrete_rejects_integer_logits():
    with pytest.raises(TypeError, match="log_alpha"):
        hard_concrete(torch.zeros(3, dtype=torch.long), seed=0)


@pytest.mark.parametrize("args, match", [
    ((torch.randn(2, 4), torch.randn(3, 5)), "x"),
    ((torch.randn(2, 5), torch.randn(3, 5), torch.randn(4)), "bias"),
    ((torch.randn(2, 5), torch.randn(3, 5), None, torch.rand(4)), "m_in"),
    ((torch.randn(2, 5), torch.randn(3, 5), None, None, torch.rand(5)), "m_out"),
    ((torch.randint(0, 3, (2, 5)), torch.randn(3, 5)), "x"),
])
def test_masked_linear_rejects_bad_input(args, match):
    with pytest.raises((ValueError, TypeError), match=match):
        masked_linear(*args)


def test_to_csr_rejects_out_of_range_nodes():
    with pytest.raises(ValueError, match="num_nodes"):
        to_csr(torch.tensor([[0, 5], [1, 2]]), 3)


def test_backend_env_rejects_unknown(monkeypatch):
    monkeypatch.setenv("LUMOS_BACKEND", "cuda")
    with pytest.raises(ValueError, match="LUMOS_BACKEND"):
        masked_linear(torch.randn(2, 3), torch.randn(4, 3))


# ------------------------------------------------------- the torch backend against the plain reference

def test_hard_concrete_torch_backend_gradients_are_the_closed_forms_of_kernels_md():
    """Autograd through the torch backend's sampling formula against the closed-form derivative the
    Triton backward uses: (z - gamma)(zeta - z) / ((zeta - gamma) beta) inside the band where
    0 < z < 1, else 0; the penalty's p_open (1 - p_open)."""
    log_alpha = (torch.rand(500, dtype=torch.float64) * 8 - 4).requires_grad_()
    pi = p_open(log_alpha.detach())
    in_band = (pi > 0.05) & (pi <= 0.95)
    for training in (True, False):
        m, total = hard_concrete(log_alpha, seed=3, offset=9, training=training, return_p_open_sum=True)
        assert torch.equal(m, hard_concrete_reference(log_alpha, 3, 9, training))  # the same formulas
        ref_grad = torch.autograd.grad((hard_concrete_reference(log_alpha, 3, 9, training) * 1.0).sum(), log_alpha)[0]
        torch.testing.assert_close(ref_grad, torch.autograd.grad(m.sum(), log_alpha, retain_graph=True)[0])
        torch.testing.assert_close(total, pi.sum())
        live = in_band & (m > 0) & (m < 1)
        assert live.sum() > 50 and (~live).sum() > 50
        slope = (m - GAMMA) * (ZETA - m) / ((ZETA - GAMMA) * (BETA if training else 1.0))
        weights = torch.randn(500, dtype=torch.float64)
        got = torch.autograd.grad((m * weights).sum() + 0.3 * total, log_alpha)[0]
        want = torch.where(live, weights * slope, 0.0) + 0.3 * pi * (1 - pi)
        torch.testing.assert_close(got, want.detach())


def test_masked_linear_torch_backend_matches_the_reference_values_and_gradients():
    for rows in (3, 40):  # fewer and more rows than outputs: the two ways the torch backend scales
        args = [_f64(2, rows, 9), _f64(7, 9), _f64(7), torch.rand(9, dtype=torch.float64, requires_grad=True),
                torch.rand(7, dtype=torch.float64, requires_grad=True)]
        y, y_ref = masked_linear(*args), masked_linear_reference(*args)
        torch.testing.assert_close(y, y_ref)
        grad = torch.randn_like(y)
        for got, want in zip(torch.autograd.grad(y, args, grad), torch.autograd.grad(y_ref, args, grad)):
            torch.testing.assert_close(got, want)


@pytest.mark.parametrize("bias, m_in, m_out", [(True, False, True), (False, True, False), (False, True, True),
                                                (True, True, True)])
@pytest.mark.parametrize("frozen", ["none", "weights", "gates"])
def test_masked_linear_torch_backend_gradients_with_some_arguments_absent_or_frozen(bias, m_in, m_out, frozen):
    """Every combination the backward branches on: absent bias or gate, weights or gates without
    gradient, gates in another dtype (fp32 gates on fp64 weights), fewer rows than input
    features (gates scale the activations) and more (output gates alone scale the weight)."""
    for rows in (5, 20):
        x, w = _f64(rows, 9), _f64(7, 9)
        b = _f64(7) if bias else None
        gi = torch.rand(9, requires_grad=True) if m_in else None
        go = torch.rand(7, requires_grad=True) if m_out else None
        if go is not None:
            with torch.no_grad():
                go[2] = 0.0  # a closed gate still gets its exact gradient
        frozen_args = {"none": [], "weights": [w, b], "gates": [gi, go]}[frozen]
        for t in frozen_args:
            if t is not None:
                t.requires_grad_(False)
        args = [t for t in (x, w, b, gi, go) if t is not None and t.requires_grad]
        y, y_ref = masked_linear(x, w, b, gi, go), masked_linear_reference(x, w, b, gi, go)
        torch.testing.assert_close(y, y_ref)
        grad = torch.randn_like(y)
        for got, want in zip(torch.autograd.grad(y, args, grad), torch.autograd.grad(y_ref, args, grad)):
            assert got.dtype == want.dtype
            torch.testing.assert_close(got, want)


def test_message_passing_torch_backend_gradients_are_the_closed_forms_of_kernels_md():
    """Autograd through the torch backend against the explicit gradients the Triton kernels compute."""
    csr = to_csr(_graph(num_nodes=8, num_edges=30, seed=4), 8)
    x, emb = _f64(8, 5), _f64(30, 5)
    m = torch.rand(5, dtype=torch.float64, requires_grad=True)
    eps = torch.tensor(0.2, dtype=torch.float64, requires_grad=True)
    out = masked_message_passing(x, csr.rowptr, csr.col, emb, m, eps)
    grad = torch.randn_like(out)
    got = torch.autograd.grad(out, (x, emb, m, eps), grad)
    with torch.no_grad():
        dst, src = csr.destinations(), csr.col
        positive = (x[src] + emb > 0).double()
        g_edge = m * grad[dst] * positive
        h = (1 + eps) * x + torch.zeros_like(x).index_add(0, dst, torch.relu(x[src] + emb))
        want = ((1 + eps) * m * grad + torch.zeros_like(x).index_add(0, src, g_edge),
                g_edge, (grad * h).sum(0), (m * grad * x).sum())
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w)


def test_hard_concrete_mask_of_a_gate_depends_only_on_its_position_in_the_flat_buffer():
    """The noise contract: gate i draws (seed, offset + i), so a slice sampled alone with the
    matching offset, or the buffer seen as 2-D, gives exactly the same masks."""
    flat = torch.rand(3000) * 4 - 2
    whole = hard_concrete(flat, seed=9, offset=7)
    for start, stop in ((0, 1), (0, 1000), (1000, 1001), (1001, 3000), (2999, 3000)):
        assert torch.equal(hard_concrete(flat[start:stop], seed=9, offset=7 + start), whole[start:stop])
    assert torch.equal(hard_concrete(flat.view(30, 100), seed=9, offset=7), whole.view(30, 100))
    assert torch.equal(hard_concrete(flat.view(100, 30).t(), seed=9, offset=7),
                       hard_concrete(flat.view(100, 30).t().contiguous(), seed=9, offset=7))


def test_masked_linear_under_autocast_computes_in_the_autocast_dtype():
    x, w, b = torch.randn(4, 6), torch.randn(3, 6, requires_grad=True), torch.randn(3)
    m_in, m_out = torch.rand(6), torch.rand(3)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = masked_linear(x, w, b, m_in, m_out)
    assert y.dtype == torch.bfloat16
    expected = masked_linear_reference(x.bfloat16(), w.bfloat16(), b.bfloat16(), m_in, m_out)
    torch.testing.assert_close(y.float(), expected.float(), rtol=2e-2, atol=2e-2)  # bf16 roundings differ
    y.float().sum().backward()
    assert w.grad.dtype == torch.float32 and w.grad.abs().sum() > 0


def test_masked_linear_rejects_a_weight_of_another_dtype_naming_it():
    with pytest.raises(TypeError, match="masked_linear: `weight` dtype torch.float64 must match `x`"):
        masked_linear(torch.randn(2, 3), torch.randn(4, 3, dtype=torch.float64))
    with pytest.raises(TypeError, match="`bias` dtype"):
        masked_linear(torch.randn(2, 3), torch.randn(4, 3), torch.randn(4, dtype=torch.float64))


def test_gate_uniform_rows_are_gate_uniform_of_each_key():
    keys = torch.tensor([0, 1, -5, 2**62, -(2**63)], dtype=torch.int64)
    rows = gate_uniform_rows(keys, 7, 300)
    assert rows.shape == (5, 300)
    for key, row in zip(keys.tolist(), rows):
        assert torch.equal(row, gate_uniform(key, 7, 300))


def test_hard_concrete_parts_are_the_concatenation_sampled_at_once():
    """Masks and gradients of several logit tensors sampled together equal those of their
    concatenation; given uniforms are used as they are."""
    g = torch.Generator().manual_seed(0)
    parts = [(torch.rand(shape, generator=g, dtype=torch.float64) * 5 - 2.5).requires_grad_()
             for shape in [(7,), (3, 4), (1,)]]
    flat = torch.cat([p.detach().reshape(-1) for p in parts]).requires_grad_()
    for training in (True, False):
        masks = hard_concrete_parts(parts, seed=11, offset=4, training=training)
        whole = hard_concrete(flat, seed=11, offset=4, training=training)
        assert [m.shape for m in masks] == [p.shape for p in parts]
        torch.testing.assert_close(torch.cat([m.reshape(-1) for m in masks]), whole, rtol=0, atol=0)
        weights = torch.randn(whole.shape, generator=g, dtype=torch.float64)
        got = torch.autograd.grad(sum((m.reshape(-1) * w).sum() for m, w in
                                      zip(masks, weights.split([p.numel() for p in parts]))), parts)
        want = torch.autograd.grad((whole * weights).sum(), flat)[0]
        torch.testing.assert_close(torch.cat([x.reshape(-1) for x in got]), want)
    uniform = gate_uniform(11, 4, flat.numel())
    given = hard_concrete_parts(parts, seed=11, offset=4, uniform=uniform)
    for a, b in zip(given, hard_concrete_parts(parts, seed=11, offset=4)):
        assert torch.equal(a, b)
    with pytest.raises(ValueError, match="hard_concrete_parts: `uniform` must hold one number per gate"):
        hard_concrete_parts(parts, seed=11, uniform=uniform[:-1])
    with pytest.raises(ValueError, match="hard_concrete_parts: `log_alphas` must hold at least one tensor"):
        hard_concrete_parts([], seed=1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
def test_hard_concrete_parts_without_a_graph_are_the_recorded_masks_bit_for_bit(dtype):
    """Where nothing is differentiated (no grad mode, or frozen logits) the masks skip the
    autograd node; they are the same numbers, at the thresholds too, training and eval."""
    g = torch.Generator().manual_seed(1)
    closed_max, open_min = (float(b) for b in log_alpha_bounds(dtype=torch.float32))
    edges = torch.tensor([closed_max, open_min, math.log(-GAMMA / ZETA), 0.0, -9.0, 9.0, float("nan")])
    parts = [torch.cat([edges, torch.rand(40, generator=g) * 8 - 4]).to(dtype),
             (torch.rand(3, 5, generator=g) * 8 - 4).to(dtype), torch.zeros(1, dtype=dtype)]
    for training in (True, False):
        recorded = hard_concrete_parts([p.clone().requires_grad_() for p in parts], seed=5, offset=2, training=training)
        with torch.no_grad():
            no_grad = hard_concrete_parts([p.clone().requires_grad_() for p in parts], seed=5, offset=2,
                                          training=training)
        frozen = hard_concrete_parts(parts, seed=5, offset=2, training=training)
        for want, *gots in zip(recorded, no_grad, frozen):
            for got in gots:
                assert got.shape == want.shape and got.dtype == want.dtype and not got.requires_grad
                assert torch.equal(got.nan_to_num(-1.0), want.detach().nan_to_num(-1.0))


@pytest.mark.parametrize("rows", [5, 40])  # fewer / more rows than input features: both torch paths
@pytest.mark.parametrize("gate_in", [False, True])
def test_masked_linear_torch_backend_second_order_gradients_match_the_reference(rows, gate_in):
    """A loss on the input gradient (create_graph=True, as physics-informed losses do) differentiates
    the torch backend's backward itself: it must record it and give the reference's gradients."""
    x = _f64(rows, 9)
    w, b = _f64(7, 9), _f64(7)
    gi = torch.rand(9, dtype=torch.float64, requires_grad=True) if gate_in else None
    go = torch.rand(7, dtype=torch.float64, requires_grad=True)
    params = [t for t in (w, b, gi, go) if t is not None]
    grads = []
    for fn in (masked_linear, masked_linear_reference):
        y = torch.tanh(fn(x, w, b, gi, go))
        dx, = torch.autograd.grad(y.sum(), x, create_graph=True)
        grads.append(torch.autograd.grad(dx.square().sum(), params))
    for got, want in zip(*grads):
        torch.testing.assert_close(got, want)
