"""The torch backend of the lumos_kernels ops (the CPU path): float64 gradcheck, the plain references
(autograd of the formulas) as oracle, gate law, noise contract, CSR, argument errors."""
import math

import pytest
import torch

from lumos_kernels import (hard_concrete, hard_concrete_reference, masked_linear, masked_linear_reference,
                           masked_message_passing, masked_message_passing_reference, p_open, philox_uniform,
                           to_csr)
from lumos_kernels.hard_concrete import BETA, GAMMA, ZETA


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


def test_philox_uniform_in_unit_interval_and_keyed():
    u = philox_uniform(5, 0, 10000)
    assert u.dtype == torch.float32 and 0 <= u.min() and u.max() < 1
    assert abs(u.mean().item() - 0.5) < 0.01
    assert torch.equal(u, philox_uniform(5, 0, 10000))
    assert not torch.equal(u, philox_uniform(6, 0, 10000))
    # offsets address the same stream: counter offset + i
    assert torch.equal(philox_uniform(5, 100, 50), u[100:150])


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

def test_hard_concrete_torch_backend_matches_the_reference_values_and_gradients():
    """The op's closed-form backward against autograd through the reference's sampling formula."""
    log_alpha = (torch.rand(500, dtype=torch.float64) * 8 - 4).requires_grad_()
    for training in (True, False):
        m, total = hard_concrete(log_alpha, seed=3, offset=9, training=training, return_p_open_sum=True)
        m_ref = hard_concrete_reference(log_alpha, 3, 9, training)
        torch.testing.assert_close(m, m_ref)
        torch.testing.assert_close(total, p_open(log_alpha).sum())
        weights = torch.randn(500, dtype=torch.float64)
        got = torch.autograd.grad((m * weights).sum() + 0.3 * total, log_alpha)[0]
        want = torch.autograd.grad((m_ref * weights).sum() + 0.3 * p_open(log_alpha).sum(), log_alpha)[0]
        torch.testing.assert_close(got, want)


def test_masked_linear_torch_backend_matches_the_reference_values_and_gradients():
    for rows in (3, 40):  # fewer and more rows than outputs: the two ways the torch backend scales
        args = [_f64(2, rows, 9), _f64(7, 9), _f64(7), torch.rand(9, dtype=torch.float64, requires_grad=True),
                torch.rand(7, dtype=torch.float64, requires_grad=True)]
        y, y_ref = masked_linear(*args), masked_linear_reference(*args)
        torch.testing.assert_close(y, y_ref)
        grad = torch.randn_like(y)
        for got, want in zip(torch.autograd.grad(y, args, grad), torch.autograd.grad(y_ref, args, grad)):
            torch.testing.assert_close(got, want)


def test_message_passing_torch_backend_matches_the_reference_values_and_gradients():
    csr = to_csr(_graph(num_nodes=8, num_edges=30, seed=4), 8)
    args = [_f64(8, 5), _f64(30, 5), torch.rand(5, dtype=torch.float64, requires_grad=True),
            torch.tensor(0.2, dtype=torch.float64, requires_grad=True)]
    out = masked_message_passing(args[0], csr.rowptr, csr.col, *args[1:])
    ref = masked_message_passing_reference(args[0], csr.rowptr, csr.col, *args[1:])
    torch.testing.assert_close(out, ref)
    grad = torch.randn_like(out)
    for got, want in zip(torch.autograd.grad(out, args, grad), torch.autograd.grad(ref, args, grad)):
        torch.testing.assert_close(got, want)


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
