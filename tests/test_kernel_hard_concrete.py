"""Triton hard_concrete vs the torch reference: mask, fused p_open sum, gradients, keying.

On CPU the kernels run in Triton's interpreter (TRITON_INTERPRET=1, set by conftest) with
``LUMOS_BACKEND=triton``; the same tests run on a CUDA GPU when one is present.
"""
import math

import pytest
import torch
import triton
import triton.language as tl

from kernel_checks import DEVICES, assert_compiles_for_cuda_target, needs_interpreter
from lumos_kernels import gate_uniform, hard_concrete, hard_concrete_reference, log_alpha_bounds, p_open
from lumos_kernels._triton.hard_concrete import gate_uniform as kernel_gate_uniform
from lumos_kernels.hard_concrete import BETA, GAMMA, T_UP, ZETA, _hard_concrete_op

# Tolerances, once per dtype. The kernel and the torch backend draw bit-identical uniforms; their
# masks differ only by the last bits of log/sigmoid, so fp32 values agree to a few ulps.
TOL = {
    torch.float32: dict(rtol=1e-5, atol=1e-6),
    torch.float16: dict(rtol=1e-3, atol=1e-3),
    torch.bfloat16: dict(rtol=1e-2, atol=1e-2),
}

pytestmark = pytest.mark.usefixtures("triton_backend")


def _logits(shape, device="cpu"):
    # spread over [-5, 5]: forced-off, in-band and forced-on gates all occur
    return (torch.rand(shape, device=device) * 10 - 5).requires_grad_()


def _check_against_reference(log_alpha, training, noise_range=0.0, seed=123, offset=77):
    kwargs = dict(seed=seed, offset=offset, training=training, noise_range=noise_range)
    m, total = hard_concrete(log_alpha, **kwargs, return_p_open_sum=True)
    m_ref = hard_concrete_reference(log_alpha, **kwargs)
    total_ref = p_open(log_alpha).sum()  # the oracle: plain torch, gradients from autograd
    tol = TOL[torch.float32]
    assert m.shape == log_alpha.shape and m.dtype == log_alpha.dtype
    torch.testing.assert_close(m, m_ref, **tol)
    # the gates the thresholds or the clamp force are exactly the same ones
    assert torch.equal(m == 0, m_ref == 0)
    assert torch.equal(m == 1, m_ref == 1)
    torch.testing.assert_close(total, total_ref, **tol)
    grad_m = torch.randn_like(m)
    for weight in (0.0, 0.7):  # the task gradient alone, then with the penalty's
        (got,) = torch.autograd.grad((m * grad_m).sum() + weight * total, log_alpha, retain_graph=True)
        (want,) = torch.autograd.grad((m_ref * grad_m).sum() + weight * total_ref, log_alpha,
                                      retain_graph=True)
        torch.testing.assert_close(got, want, **tol)


# one gate; tails around the 4096-gate interpreter block; a 2-D buffer; several programs
SHAPES = [(1,), (7,), (4095,), (4097,), (3, 50), (10001,)]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("training", [True, False])
def test_hard_concrete_matches_reference(device, shape, training):
    _check_against_reference(_logits(shape, device), training)


@pytest.mark.parametrize("device", DEVICES)
def test_hard_concrete_noise_range_matches_reference(device):
    _check_against_reference(_logits((5000,), device), training=True, noise_range=0.25)


@pytest.mark.parametrize("device", DEVICES)
def test_hard_concrete_non_contiguous_logits(device):
    wide = _logits((3000, 2), device)
    strided = wide[:, 1]
    assert not strided.is_contiguous()
    _check_against_reference(strided, training=True)


@pytest.mark.parametrize("device", DEVICES)
def test_hard_concrete_all_gates_forced_off(device):
    log_alpha = torch.full((300,), -8.0, device=device, requires_grad=True)
    m = hard_concrete(log_alpha, seed=1, training=True)
    assert torch.equal(m, torch.zeros_like(m))
    (grad,) = torch.autograd.grad(m.sum(), log_alpha)
    assert torch.equal(grad, torch.zeros_like(grad))
    _check_against_reference(log_alpha, training=True)


@pytest.mark.parametrize("device", DEVICES)
def test_hard_concrete_same_key_same_mask_other_key_other_mask(device):
    log_alpha = torch.zeros(5000, device=device)
    a = hard_concrete(log_alpha, seed=3, offset=10)
    assert torch.equal(a, hard_concrete(log_alpha, seed=3, offset=10))
    assert not torch.equal(a, hard_concrete(log_alpha, seed=4, offset=10))
    assert not torch.equal(a, hard_concrete(log_alpha, seed=3, offset=11))


@pytest.mark.parametrize("device", DEVICES)
def test_hard_concrete_layer_views_of_a_flat_buffer_sample_the_same_gates(device):
    """A layer sampling its slice at offset = its start gets exactly the one-launch mask."""
    flat = torch.rand(6000, device=device) * 4 - 2
    whole = hard_concrete(flat, seed=9, offset=0)
    for start, stop in ((0, 1000), (1000, 1001), (1001, 6000)):
        part = hard_concrete(flat[start:stop], seed=9, offset=start)
        assert torch.equal(part, whole[start:stop])


@needs_interpreter
def test_hard_concrete_64_bit_offsets_match_the_reference_and_wrap_modulo_2_64():
    log_alpha = torch.zeros(100)
    for offset in (2**32 - 10, 2**63 - 50):  # counters cross 2**32, then wrap past 2**64 (as int64: 2**63)
        m = hard_concrete(log_alpha, seed=5, offset=offset)
        torch.testing.assert_close(m, hard_concrete_reference(log_alpha, 5, offset, True), **TOL[torch.float32])
        assert torch.equal(m, hard_concrete(log_alpha, seed=5, offset=offset - 2**64))


@triton.jit(do_not_specialize=["key", "offset"])
def _kernel_uniforms(out_ptr, n, key: tl.int64, offset: tl.int64, BLOCK: tl.constexpr):
    idx = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    tl.store(out_ptr + idx, kernel_gate_uniform(key, offset.to(tl.int64) + idx), mask=idx < n)


@needs_interpreter
def test_kernel_uniforms_are_bit_identical_to_gate_uniform():
    """The kernel's noise source and the torch backend's are the same numbers, bit for bit."""
    for key, offset in ((0, 0), (7, 123), (-(2**40) - 3, 2**31 - 5), (2**63 - 1, 2**63 - 1000)):
        out = torch.empty(3000)
        _kernel_uniforms[(3,)](out, 3000, key, offset, BLOCK=1024)
        assert torch.equal(out, gate_uniform(key, offset, 3000))


@needs_interpreter
def test_hard_concrete_mask_frequencies_match_the_law():
    n = 200_000
    for value in (-0.8, 0.9):
        m = hard_concrete(torch.full((n,), value), seed=11, training=True)
        p0 = torch.sigmoid(torch.tensor(BETA * math.log(-GAMMA / ZETA) - value)).item()
        p1 = 1 - torch.sigmoid(torch.tensor(BETA * math.log((1 - GAMMA) / (ZETA - 1)) - value)).item()
        assert abs((m == 0).float().mean().item() - p0) < 5e-3  # ~5 binomial sigma
        assert abs((m == 1).float().mean().item() - p1) < 5e-3


@needs_interpreter
@pytest.mark.parametrize("training", [True, False])
def test_hard_concrete_gradcheck_float64(training):
    """The Triton backward (mask and fused p_open sum) against finite differences."""
    log_alpha = (torch.rand(64, dtype=torch.float64) * 2.5 - 1.5).requires_grad_()

    def fn(la):
        m, total = hard_concrete(la, seed=7, offset=3, training=training, return_p_open_sum=True)
        return m, total

    assert torch.autograd.gradcheck(fn, (log_alpha,), eps=1e-6, atol=1e-6)


@needs_interpreter
def test_hard_concrete_empty_buffer():
    m, total = hard_concrete(torch.empty(0), seed=0, return_p_open_sum=True)
    assert m.shape == (0,) and total.item() == 0.0


@needs_interpreter
@pytest.mark.parametrize("training", [True, False])
def test_hard_concrete_opcheck(training):
    log_alpha = _logits((40,))
    args = (log_alpha, torch.tensor(3), 5, training, 0.05, 0.95, BETA, GAMMA, ZETA, 0.0)
    torch.library.opcheck(_hard_concrete_op, args)


@pytest.mark.parametrize("backend", [pytest.param("triton", marks=needs_interpreter), "torch"])
def test_hard_concrete_torch_compile_fullgraph(backend, monkeypatch):
    """Triton: one opaque op to torch.compile; torch: traced and fused by inductor, the same numbers."""
    monkeypatch.setenv("LUMOS_BACKEND", backend)
    log_alpha = _logits((500,))

    def loss(log_alpha, seed):
        m, total = hard_concrete(log_alpha, seed=seed, offset=0, return_p_open_sum=True)
        return (m * torch.arange(500.0)).sum() + 0.1 * total

    compiled = torch.compile(loss, fullgraph=True)
    for seed in (1, 2):
        got = compiled(log_alpha, seed)
        want = loss(log_alpha, seed)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-3)
        (g_got,) = torch.autograd.grad(got, log_alpha)
        (g_want,) = torch.autograd.grad(want, log_alpha)
        torch.testing.assert_close(g_got, g_want, **TOL[torch.float32])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_hard_concrete_16bit_matches_fp32_kernel(device, dtype):
    """16-bit logits are sampled in fp32 and stored in 16 bits."""
    log_alpha = (torch.rand(10001, device=device) * 10 - 5).to(dtype)
    m = hard_concrete(log_alpha, seed=2, offset=1)
    m32 = hard_concrete(log_alpha.float(), seed=2, offset=1)
    assert m.dtype == dtype
    torch.testing.assert_close(m32, hard_concrete_reference(log_alpha.float(), 2, 1, True), **TOL[torch.float32])
    torch.testing.assert_close(m.float(), m32, **TOL[dtype])


def _ulp_neighbourhood(value: float, ulps: int = 64) -> torch.Tensor:
    """The fp32 numbers from ``ulps`` below to ``ulps`` above ``value`` (``2 * ulps + 1`` of them)."""
    centre = torch.tensor(value, dtype=torch.float32)
    below, above, step = [centre], [], centre
    for _ in range(ulps):
        step = torch.nextafter(step, torch.tensor(-math.inf))
        below.append(step)
    step = centre
    for _ in range(ulps):
        step = torch.nextafter(step, torch.tensor(math.inf))
        above.append(step)
    return torch.stack(below[::-1] + above)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("t_l", [0.05, 0.4])
def test_hard_concrete_forces_the_same_gates_on_both_backends_near_the_thresholds(device, t_l, monkeypatch):
    """Logits within +-64 ulp of both boundaries: the same gates forced open / closed on both
    backends, and exactly those whose p_open (in float64) is above t_u / at or below t_l."""
    shift = BETA * math.log(-GAMMA / ZETA)
    boundaries = [shift + math.log(t_l / (1 - t_l)), shift + math.log(T_UP / (1 - T_UP))]
    logits = torch.cat([_ulp_neighbourhood(b) for b in boundaries]).to(device)
    pi = p_open(logits.double()).cpu()
    masks = {}
    for backend in ("triton", "torch"):
        monkeypatch.setenv("LUMOS_BACKEND", backend)
        # eval: z_hat lies strictly inside (0, 1) near t_u, and near t_l = 0.4, so a mask of
        # exactly 0 or 1 there is a forced gate (near t_l = 0.05 z_hat clamps to 0 either way);
        # training with noise_range = 0.5 (u = 1/2) keeps z below 1 near t_u too
        masks[backend, "eval"] = hard_concrete(logits, seed=0, training=False, t_l=t_l).cpu()
        masks[backend, "train"] = hard_concrete(logits, seed=4, training=True, t_l=t_l, noise_range=0.5).cpu()
    for mode in ("eval", "train"):
        got, want = masks["triton", mode], masks["torch", mode]
        assert torch.equal(got == 1, want == 1) and torch.equal(got == 0, want == 0), mode
        assert torch.equal(got == 1, pi > T_UP), mode
    if t_l == 0.4:
        assert torch.equal(masks["triton", "eval"] == 0, pi <= t_l)
    # both thresholds are crossed inside the neighbourhood: the test probes the boundary
    assert (pi > T_UP).any() and not (pi > T_UP).all() and (pi <= t_l).any()


def test_log_alpha_bounds_are_the_last_fp32_logits_on_each_side():
    """closed_max is the largest fp32 logit with p_open <= t_l, open_min the smallest with p_open > t_u
    (p_open evaluated in float64, which resolves one fp32 ulp)."""
    closed_max, open_min = (torch.tensor(v) for v in log_alpha_bounds(0.05, 0.95))
    after_closed = torch.nextafter(closed_max, torch.tensor(math.inf))
    before_open = torch.nextafter(open_min, torch.tensor(-math.inf))
    assert p_open(closed_max.double()) <= 0.05 < p_open(after_closed.double())
    assert p_open(before_open.double()) <= 0.95 < p_open(open_min.double())
    assert math.isnan(log_alpha_bounds(t_u=1.0)[1])  # t_u = 1 forces nothing open
    assert log_alpha_bounds(t_l=0.0)[0] == -math.inf


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_hard_concrete_p_open_sum_is_accumulated_in_fp32_for_bf16_logits(device, backend, monkeypatch):
    monkeypatch.setenv("LUMOS_BACKEND", backend)
    log_alpha = (torch.rand(20_000, device=device) * 6 - 3).to(torch.bfloat16).requires_grad_()
    m, total = hard_concrete(log_alpha, seed=1, return_p_open_sum=True)
    exact = p_open(log_alpha.detach().double()).sum()
    assert m.dtype == torch.bfloat16 and total.dtype == torch.float32
    # fp32 over 20k terms: ~1e-7 relative; a bf16 result would be off by up to ~0.4%
    assert abs(total.item() - exact.item()) <= 1e-5 * exact.item()
    (grad,) = torch.autograd.grad(total, log_alpha)
    pi = p_open(log_alpha.detach().float())
    torch.testing.assert_close(grad.float(), pi * (1 - pi), **TOL[torch.bfloat16])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_hard_concrete_mask_may_be_modified_in_place(device, backend, monkeypatch):
    """The mask is a fresh tensor the backward does not need: in-place ops on it keep gradients right."""
    monkeypatch.setenv("LUMOS_BACKEND", backend)
    log_alpha = (torch.rand(2, 300, device=device) * 3 - 1.5).requires_grad_()
    weight = torch.randn(2, 300, device=device)
    grads = []
    for in_place in (True, False):
        m = hard_concrete(log_alpha, seed=5, offset=2)
        m = m.mul_(2.0).add_(1.0) if in_place else m * 2.0 + 1.0
        grads.append(torch.autograd.grad((m * weight).sum(), log_alpha)[0])
    torch.testing.assert_close(grads[0], grads[1], rtol=0, atol=0)
    assert grads[0].abs().sum() > 0


_COMPILE_CHECK = """
import triton.language as tl
from lumos_kernels._triton.cuda_target import compile_for_cuda_target
from lumos_kernels._triton.hard_concrete import hard_concrete_fwd_kernel as kernel
floats = ["noise_lo", "noise_scale", "u_eps", "inv_beta", "gamma", "zeta", "log_ratio", "dm_scale"]
for arch in (80, 90):
    for dt, acc in (("fp32", "fp32"), ("bf16", "fp32"), ("fp64", "fp64")):
        sig = {name: "fp32" for name in floats}
        sig.update(log_alpha_ptr="*" + dt, m_ptr="*" + dt, dm_ptr="*" + acc, p_open_part_ptr="*" + acc)
        for training in (True, False):
            compile_for_cuda_target(kernel, sig, dict(TRAINING=training, BLOCK=1024), capability=arch)
print("compiled")
"""


def test_hard_concrete_kernel_compiles_for_cuda_targets():
    """Real Triton compilation to sm_80/sm_90 cubins (no GPU needed): catches what the interpreter cannot."""
    assert_compiles_for_cuda_target(_COMPILE_CHECK)
