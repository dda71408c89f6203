"""Triton masked_linear vs the torch reference: values and all five gradients.

On CPU the kernels run in Triton's interpreter (TRITON_INTERPRET=1, set by conftest) with
``LUMOS_BACKEND=triton``; the same tests run on a CUDA GPU when one is present.
"""
import pytest
import torch

from kernel_checks import (DEVICES, assert_close, assert_compiles_for_cuda_target, needs_cuda,
                           needs_interpreter)
from lumos_kernels import fp32_input_precision, masked_linear, masked_linear_reference
from lumos_kernels._triton import masked_gemm as triton_masked_gemm
from lumos_kernels._triton import tuning
from lumos_kernels.masked_gemm import _masked_linear_op

# Tolerances, once per dtype. 16-bit inputs are compared with the fp32 reference on the same
# (rounded) inputs; atol is relative to the largest expected magnitude (sums over M, N, K).
TOL = {
    torch.float32: dict(rtol=1e-5, atol=1e-5),
    torch.float16: dict(rtol=5e-3, atol=5e-3),
    torch.bfloat16: dict(rtol=3e-2, atol=3e-2),
}

pytestmark = pytest.mark.usefixtures("triton_backend")


def _inputs(lead, n, k, device="cpu", dtype=torch.float32, bias=True, m_in=True, m_out=True):
    x = torch.randn(*lead, k, device=device).to(dtype).requires_grad_()
    w = (torch.randn(n, k, device=device) / k ** 0.5).to(dtype).requires_grad_()
    b = torch.randn(n, device=device).to(dtype).requires_grad_() if bias else None
    gi = torch.rand(k, device=device).requires_grad_() if m_in else None
    go = torch.rand(n, device=device).requires_grad_() if m_out else None
    return x, w, b, gi, go


def _value_and_grads(fn, args, grad_y):
    y = fn(*args)
    leaves = [a for a in args if a is not None and a.requires_grad]
    return y, torch.autograd.grad(y, leaves, grad_y)


def _check_against_reference(args, dtype=torch.float32):
    """The Triton op on ``args`` vs the fp32 reference on the same values, all gradients."""
    y, grads = _value_and_grads(masked_linear, args, _grad_like(args))
    ref_args = [a.detach().float().requires_grad_(a.requires_grad) if a is not None else None for a in args]
    y_ref, grads_ref = _value_and_grads(masked_linear_reference, ref_args, _grad_like(args).float())
    assert y.dtype == args[0].dtype
    assert_close(y, y_ref, TOL[dtype])
    assert len(grads) == len(grads_ref)
    for got, want in zip(grads, grads_ref):
        assert_close(got, want, TOL[dtype])


_GRAD_SEED = 1234


def _grad_like(args):
    x, w = args[0], args[1]
    g = torch.Generator(device="cpu").manual_seed(_GRAD_SEED)
    grad = torch.randn(*x.shape[:-1], w.shape[0], generator=g)
    return grad.to(device=x.device, dtype=x.dtype)


# (leading dims of x, N, K): M=1, tails that do not divide the 32-wide interpreter tiles,
# several tiles along N and K (so the gate-gradient partials are reduced), exact tiles,
# leading batch dims, and a 1x1 map.
SHAPES = [((1,), 5, 7), ((37,), 45, 70), ((70,), 33, 65), ((64,), 64, 96), ((2, 3, 11), 40, 19),
          ((5,), 1, 1)]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("lead, n, k", SHAPES)
def test_masked_linear_matches_reference_values_and_grads(device, lead, n, k):
    _check_against_reference(_inputs(lead, n, k, device))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("bias, m_in, m_out", [(False, False, False), (True, True, False),
                                               (False, False, True), (False, True, True)])
def test_masked_linear_optional_arguments_match_reference(device, bias, m_in, m_out):
    _check_against_reference(_inputs((21,), 35, 40, device, bias=bias, m_in=m_in, m_out=m_out))


@pytest.mark.parametrize("device", DEVICES)
def test_masked_linear_non_contiguous_inputs(device):
    x, w, b, gi, go = _inputs((40,), 36, 50, device)
    x_t = torch.randn(50, 40, device=device).t().requires_grad_()      # column-major x
    w_wide = torch.randn(36, 100, device=device)[:, ::2].requires_grad_()  # strided columns
    assert not x_t.is_contiguous() and not w_wide.is_contiguous()
    _check_against_reference((x_t, w_wide, b, gi, go))


@pytest.mark.parametrize("device", DEVICES)
def test_masked_linear_all_zero_gates(device):
    x, w, b, _, _ = _inputs((33,), 34, 35, device)
    gi = torch.zeros(35, device=device, requires_grad=True)
    go = torch.zeros(34, device=device, requires_grad=True)
    y = masked_linear(x, w, b, gi, go)
    assert torch.equal(y, torch.zeros_like(y))
    _check_against_reference((x, w, b, gi, go))


@needs_interpreter
def test_masked_linear_only_some_gradients_needed():
    x, w, b, gi, go = _inputs((19,), 37, 41)
    w.requires_grad_(False)
    b.requires_grad_(False)
    _check_against_reference((x, w, b, gi, go))
    x.requires_grad_(False)
    _check_against_reference((x, w.requires_grad_(), b, None, go))


@needs_interpreter
def test_masked_linear_split_m_backward_matches_reference():
    """The split-M dW path (used on GPUs for small N x K) reduces its partials correctly."""
    x, w, b, gi, go = _inputs((150,), 37, 41)
    grad = torch.randn(150, 37)
    got = triton_masked_gemm.backward(grad, x, w, b, gi, go, (True,) * 5, "ieee", split_m=3)
    want = torch.autograd.grad(masked_linear_reference(x, w, b, gi, go), (x, w, b, gi, go), grad)
    for a, e in zip(got, want):
        assert_close(a, e, TOL[torch.float32])


@needs_interpreter
def test_masked_linear_gradcheck_float64():
    """The Triton backward against finite differences, independent of the reference."""
    x, w, b, gi, go = (t.double().detach().requires_grad_() for t in _inputs((2, 3), 4, 5))
    assert torch.autograd.gradcheck(masked_linear, (x, w, b, gi, go))


@needs_interpreter
def test_masked_linear_empty_batch():
    x, w, b, gi, go = _inputs((0,), 6, 5)
    _check_against_reference((x, w, b, gi, go))


@needs_interpreter
def test_masked_linear_rejects_mixed_dtypes():
    with pytest.raises(TypeError, match="weight"):
        masked_linear(torch.randn(2, 3), torch.randn(4, 3, dtype=torch.float64))


@needs_interpreter
@pytest.mark.parametrize("optional", [True, False])
def test_masked_linear_opcheck(optional):
    x, w, b, gi, go = _inputs((3, 5), 7, 9, bias=optional, m_in=optional, m_out=True)
    torch.library.opcheck(_masked_linear_op, (x, w, b, gi, go))


@pytest.mark.parametrize("backend", [pytest.param("triton", marks=needs_interpreter), "torch"])
def test_masked_linear_torch_compile_fullgraph(backend, monkeypatch):
    """Triton: one opaque op to torch.compile; torch: traced and fused by inductor."""
    monkeypatch.setenv("LUMOS_BACKEND", backend)
    x, w, b, gi, go = _inputs((6,), 10, 12)

    def loss(x, w, b, gi, go):
        return torch.relu(masked_linear(x, w, b, gi, go)).square().sum()

    compiled = torch.compile(loss, fullgraph=True)
    got = compiled(x, w, b, gi, go)
    got_grads = torch.autograd.grad(got, (x, w, b, gi, go))
    want = loss(x, w, b, gi, go)
    want_grads = torch.autograd.grad(want, (x, w, b, gi, go))
    assert_close(got, want, TOL[torch.float32])
    for a, e in zip(got_grads, want_grads):
        assert_close(a, e, TOL[torch.float32])


# bf16 tl.dot gives wrong results under the triton 3.9 interpreter (KERNELS.md 2): bf16 runs on GPUs only
SIXTEEN_BIT = [
    pytest.param("cpu", torch.float16, marks=needs_interpreter),
    pytest.param("cuda", torch.float16, marks=needs_cuda),
    pytest.param("cpu", torch.bfloat16, marks=pytest.mark.skip(
        reason="bf16 tl.dot is wrong under the Triton 3.9 CPU interpreter; runs on a CUDA GPU")),
    pytest.param("cuda", torch.bfloat16, marks=needs_cuda),
]


@pytest.mark.parametrize("device, dtype", SIXTEEN_BIT)
@pytest.mark.parametrize("lead, n, k", [((1,), 5, 7), ((70,), 33, 65), ((4, 9), 64, 96)])
def test_masked_linear_16bit_matches_fp32_reference(device, dtype, lead, n, k):
    _check_against_reference(_inputs(lead, n, k, device, dtype), dtype)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("lead", [(9,), (2, 3, 4), ()], ids=["2d", "4d", "1d"])
def test_masked_linear_output_may_be_modified_in_place(device, backend, lead, monkeypatch):
    """ReLU(inplace=True) / add_ after a gated layer: training works, gradients equal the out-of-place ones."""
    monkeypatch.setenv("LUMOS_BACKEND", backend)
    args = _inputs(lead, 6, 5, device)
    grads = []
    for in_place in (True, False):
        y = masked_linear(*args)
        if backend == "triton":
            assert y._base is None  # a fresh tensor (the torch backend may return F.linear's view of one)
        y = torch.relu_(y.add_(0.5)) if in_place else torch.relu(y + 0.5)
        grads.append(torch.autograd.grad(y.square().sum(), args))
    for got, want in zip(*grads):
        torch.testing.assert_close(got, want, rtol=0, atol=0)


@pytest.mark.parametrize("setting, expected", [("highest", "ieee"), ("high", "tf32"), ("medium", "tf32")])
def test_fp32_input_precision_follows_torch_matmul_precision(setting, expected, monkeypatch):
    before = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision(setting)
        assert fp32_input_precision() == expected
    finally:
        torch.set_float32_matmul_precision(before)


class _LaunchSpy:
    """Stands in for a ``@triton.jit`` kernel: records each launch's constexprs, then launches."""

    def __init__(self, kernel):
        self.kernel, self.launches = kernel, []

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.launches.append(kwargs)
            return self.kernel[grid](*args, **kwargs)
        return launch


@needs_interpreter
@pytest.mark.parametrize("setting, expected", [("highest", "ieee"), ("high", "tf32")])
def test_fp32_kernels_launch_with_the_precision_torch_would_use(setting, expected, monkeypatch):
    """Forward, dx and dW launches all get INPUT_PRECISION from torch's matmul setting (fp32 inputs)."""
    gemm, dw = _LaunchSpy(triton_masked_gemm.gated_gemm_kernel), _LaunchSpy(triton_masked_gemm.dw_kernel)
    monkeypatch.setattr(triton_masked_gemm, "gated_gemm_kernel", gemm)
    monkeypatch.setattr(triton_masked_gemm, "dw_kernel", dw)
    before = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision(setting)
        _check_against_reference(_inputs((20,), 9, 11))
        x64 = [t.double().detach().requires_grad_() for t in _inputs((4,), 3, 5)]
        masked_linear(*x64).sum().backward()
    finally:
        torch.set_float32_matmul_precision(before)
    def precisions(spy):
        return [(str(kw["ACC"]), kw["INPUT_PRECISION"]) for kw in spy.launches]

    # fp32: forward, dx, dW; then fp64: forward, dx, dW
    assert precisions(gemm) == [("fp32", expected)] * 2 + [("fp64", "ieee")] * 2
    assert precisions(dw) == [("fp32", expected), ("fp64", "ieee")]


def test_m_bucket_rounds_up_to_powers_of_two():
    assert [tuning.m_bucket(m) for m in (1, 16, 17, 1000, 1024, 1025, 10**7)] == \
        [16, 16, 32, 1024, 1024, 2048, 1 << 17]


def test_config_chooser_times_each_key_once_and_never_during_graph_capture(monkeypatch):
    """Launch-config choice without a GPU: timing is faked, the bookkeeping is real."""
    import triton

    configs = [tuning.LaunchConfig((64,)), tuning.LaunchConfig((128,)), tuning.LaunchConfig((32,))]
    heuristic = tuning.LaunchConfig((16,))
    chooser = tuning.ConfigChooser("test", configs)
    timed = []
    fake_ms = {64: 2.0, 128: 1.0, 32: 3.0}

    def fake_bench(fn, **_):
        fn()
        return fake_ms[timed[-1].blocks[0]]

    monkeypatch.setattr(tuning, "triton_interpreted", lambda: False)
    monkeypatch.setattr(triton.testing, "do_bench", fake_bench)
    monkeypatch.setattr(tuning, "capturing_cuda_graph", lambda: True)
    assert chooser.choose("k1", timed.append, heuristic) == heuristic and not timed  # capture: no timing
    monkeypatch.setattr(tuning, "capturing_cuda_graph", lambda: False)
    assert chooser.choose("k1", timed.append, heuristic) == configs[1]
    assert len(timed) == 3
    assert chooser.choose("k1", timed.append, heuristic) == configs[1] and len(timed) == 3  # remembered
    monkeypatch.setattr(tuning, "capturing_cuda_graph", lambda: True)
    assert chooser.choose("k1", timed.append, heuristic) == configs[1]  # a timed key is fine in capture
    assert chooser.choose("k2", timed.append, heuristic) == heuristic and len(timed) == 3


# Compiled for sm_90 (Hopper) without a GPU: the gated K loop must keep the MMA pipelined like the
# ungated one. In the TTGIR, an async `ttng.warp_group_dot` inside the loop is followed by a
# `ttng.warp_group_dot_wait {pendings = N}`: N >= 1 lets the next MMA start before the previous
# one retires; N = 0 serialises them. The forward layout (b = W row-major) and the dx layout
# (b = W.T, a strided view) are both checked, for bf16/fp16, and fp32 with TF32.
_IR_CHECK = """
import re
import triton.language as tl
from lumos_kernels._triton.cuda_target import compile_for_cuda_target
from lumos_kernels._triton.masked_gemm import gated_gemm_kernel, dw_kernel

def loop_waits(ir):
    lines, found = ir.splitlines(), []
    for i, line in enumerate(lines):
        if "scf.for" in line:
            indent = len(line) - len(line.lstrip())
            for inner in lines[i + 1:]:
                if len(inner) - len(inner.lstrip()) <= indent:
                    break
                hit = re.search(r"warp_group_dot_wait .*pendings = (\\d+)", inner)
                if hit:
                    found.append(int(hit.group(1)))
    return found

def compile_gemm(dt, gated, layout, precision, arch=90):
    unit = dict(stride_ak=1, stride_on=1, **({"stride_bk": 1} if layout == "forward" else {"stride_bn": 1}))
    aligned = ("M", "N", "K", "stride_am", "stride_om", "stride_bn" if layout == "forward" else "stride_bk")
    return compile_for_cuda_target(
        gated_gemm_kernel, {"a_ptr": "*" + dt, "b_ptr": "*" + dt, "out_ptr": "*" + dt, "g_k_ptr": "*fp32",
                            "bias_ptr": "*" + dt, "g_n_ptr": "*fp32"},
        dict(HAS_G_K=gated, HAS_BIAS=True, HAS_G_N=True, BLOCK_M=128, BLOCK_N=128,
             BLOCK_K=32 if dt == "fp32" else 64, GROUP_M=8, ACC=tl.float32, INPUT_PRECISION=precision, **unit),
        capability=arch, num_warps=8, num_stages=3, aligned=aligned).asm["ttgir"]

for dt, precision in (("bf16", "ieee"), ("fp16", "ieee"), ("fp32", "tf32")):
    for layout in ("forward", "dx"):
        gated, ungated = (compile_gemm(dt, g, layout, precision) for g in (True, False))
        waits_gated, waits_ungated = loop_waits(gated), loop_waits(ungated)
        print(dt, layout, "gated", waits_gated, "ungated", waits_ungated)
        assert waits_ungated and min(waits_ungated) >= 1, (dt, layout, waits_ungated)
        assert waits_gated and min(waits_gated) == min(waits_ungated), (dt, layout, waits_gated, waits_ungated)
        mma = [line for line in gated.splitlines() if "warp_group_dot " in line]
        assert all("dot_op<{opIdx = 0" in line for line in mma), "gated a operand should come from registers"
# fp32 follows torch: "ieee" must stay off the tensor cores, "tf32" must use them
assert "warp_group_dot " not in compile_gemm("fp32", True, "forward", "ieee")
for arch, dt in ((80, "fp32"), (80, "bf16"), (90, "bf16")):
    acc = dict(ACC=tl.float32, INPUT_PRECISION="tf32" if dt == "fp32" else "ieee")
    compile_gemm(dt, True, "forward", acc["INPUT_PRECISION"], arch)
    compile_for_cuda_target(
        dw_kernel, {"g_ptr": "*" + dt, "x_ptr": "*" + dt, "w_ptr": "*" + dt, "bias_ptr": "*" + dt,
                    "m_in_ptr": "*fp32", "m_out_ptr": "*fp32", "dw_ptr": "*" + dt, "db_part_ptr": "*fp32",
                    "dm_in_part_ptr": "*fp32", "dm_out_part_ptr": "*fp32"},
        dict(HAS_BIAS=True, HAS_M_IN=True, HAS_M_OUT=True, NEED_W=True, NEED_B=True,
             NEED_M_IN=True, NEED_M_OUT=True, BLOCK_N=128, BLOCK_K=64, BLOCK_M=32, **acc), capability=arch)
print("compiled")
"""


def test_gated_gemm_keeps_the_mma_pipelined_on_sm90_like_the_ungated_one():
    """Compile-only (no GPU): gating on the x / G operand keeps wgmma async; the kernels compile for sm_80/90."""
    assert_compiles_for_cuda_target(_IR_CHECK)
