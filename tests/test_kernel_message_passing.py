"""Triton masked_message_passing vs the torch reference: values and all gradients.

On CPU the kernels run in Triton's interpreter (TRITON_INTERPRET=1, set by conftest) with
``LUMOS_BACKEND=triton``; the same tests run on a CUDA GPU when one is present.
"""
import pytest
import torch

from kernel_checks import DEVICES, assert_close, assert_compiles_for_cuda_target, needs_interpreter
from lumos_kernels import masked_message_passing, masked_message_passing_reference, to_csr
from lumos_kernels.message_passing import _message_passing_op, transpose_csr

# Tolerances, once per dtype. 16-bit inputs are compared with the fp32 reference on the same
# (rounded) inputs; atol is relative to the largest expected magnitude (sums over edges/nodes).
TOL = {
    torch.float32: dict(rtol=1e-5, atol=1e-5),
    torch.float16: dict(rtol=5e-3, atol=5e-3),
    torch.bfloat16: dict(rtol=3e-2, atol=3e-2),
}

pytestmark = pytest.mark.usefixtures("triton_backend")


def _graph(num_nodes, num_edges, device="cpu", hub=False):
    g = torch.Generator().manual_seed(num_nodes * 1000 + num_edges)
    edge_index = torch.randint(0, num_nodes, (2, num_edges), generator=g)
    if hub:  # a skewed degree: half the edges point into node 0
        edge_index[1, : num_edges // 2] = 0
    return to_csr(edge_index.to(device), num_nodes)


def _inputs(num_nodes, num_edges, feats, device="cpu", dtype=torch.float32, gate=True, learn_eps=True):
    x = torch.randn(num_nodes, feats, device=device).to(dtype).requires_grad_()
    emb = torch.randn(num_edges, feats, device=device).to(dtype).requires_grad_()
    m = torch.rand(feats, device=device).requires_grad_() if gate else None
    eps = torch.tensor(0.3, device=device, dtype=dtype, requires_grad=True) if learn_eps else 0.3
    return x, emb, m, eps


def _check_against_reference(csr, x, emb, m, eps, dtype=torch.float32, transposed=True):
    kwargs = {}
    if transposed:
        rowptr_t, perm_t = csr.transposed()
        kwargs = dict(rowptr_t=rowptr_t, perm_t=perm_t)
    out = masked_message_passing(x, csr.rowptr, csr.col, emb, m, eps, **kwargs)
    g = torch.Generator().manual_seed(99)
    grad = torch.randn(out.shape, generator=g).to(device=out.device, dtype=out.dtype)
    leaves = [t for t in (x, emb, m, eps) if isinstance(t, torch.Tensor) and t.requires_grad]
    grads = torch.autograd.grad(out, leaves, grad)

    def up(t):
        return t.detach().float().requires_grad_(t.requires_grad) if isinstance(t, torch.Tensor) else t

    ref_in = [up(t) for t in (x, emb, m, eps)]
    ref = masked_message_passing_reference(x=ref_in[0], rowptr=csr.rowptr, col=csr.col, edge_emb=ref_in[1],
                                           m=ref_in[2], eps=ref_in[3])
    ref_leaves = [t for t in ref_in if isinstance(t, torch.Tensor) and t.requires_grad]
    ref_grads = torch.autograd.grad(ref, ref_leaves, grad.float())
    assert out.dtype == x.dtype
    assert_close(out, ref, TOL[dtype])
    for got, want in zip(grads, ref_grads):
        assert got.shape == want.shape
        assert_close(got, want, TOL[dtype])


# (nodes, edges, features): one node without edges (M=1); one node with self-loops; tails
# around the 64 x 64 interpreter tiles; several row blocks; exact tiles; a hub node.
GRAPHS = [(1, 0, 3, False), (1, 4, 5, False), (70, 300, 70, False), (130, 400, 33, False),
          (64, 128, 64, False), (40, 160, 10, True)]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("num_nodes, num_edges, feats, hub", GRAPHS)
def test_message_passing_matches_reference(device, num_nodes, num_edges, feats, hub):
    csr = _graph(num_nodes, num_edges, device, hub)
    _check_against_reference(csr, *_inputs(num_nodes, num_edges, feats, device))


@pytest.mark.parametrize("device", DEVICES)
def test_message_passing_without_gate_and_fixed_eps(device):
    csr = _graph(50, 200, device)
    _check_against_reference(csr, *_inputs(50, 200, 20, device, gate=False, learn_eps=False))


@pytest.mark.parametrize("device", DEVICES)
def test_message_passing_computes_transposed_csr_when_omitted(device):
    csr = _graph(50, 200, device)
    _check_against_reference(csr, *_inputs(50, 200, 20, device), transposed=False)


@pytest.mark.parametrize("device", DEVICES)
def test_message_passing_non_contiguous_inputs(device):
    csr = _graph(45, 150, device)
    _, _, m, eps = _inputs(45, 150, 30, device)
    x = torch.randn(45, 60, device=device)[:, ::2].requires_grad_()
    emb = torch.randn(30, 150, device=device).t().requires_grad_()
    assert not x.is_contiguous() and not emb.is_contiguous()
    _check_against_reference(csr, x, emb, m, eps)


@pytest.mark.parametrize("device", DEVICES)
def test_message_passing_all_zero_gate(device):
    csr = _graph(45, 150, device)
    x, emb, _, eps = _inputs(45, 150, 30, device)
    m = torch.zeros(30, device=device, requires_grad=True)
    out = masked_message_passing(x, csr.rowptr, csr.col, emb, m, eps)
    assert torch.equal(out, torch.zeros_like(out))
    _check_against_reference(csr, x, emb, m, eps)


@needs_interpreter
def test_message_passing_only_some_gradients_needed():
    csr = _graph(30, 90, "cpu")
    x, emb, m, eps = _inputs(30, 90, 12)
    emb.requires_grad_(False)
    m.requires_grad_(False)
    _check_against_reference(csr, x, emb, m, eps)
    x.requires_grad_(False)
    _check_against_reference(csr, x, emb.requires_grad_(), m, eps)


@needs_interpreter
def test_message_passing_gradcheck_float64():
    """The Triton backward (both passes) against finite differences, independent of the reference."""
    csr = _graph(6, 15, "cpu")
    x, emb, m, eps = (t.double().detach().requires_grad_() for t in _inputs(6, 15, 4))

    def fn(x, emb, m, eps):
        return masked_message_passing(x, csr.rowptr, csr.col, emb, m, eps)

    assert torch.autograd.gradcheck(fn, (x, emb, m, eps))


@needs_interpreter
def test_message_passing_backward_is_deterministic():
    csr = _graph(70, 300, "cpu")
    x, emb, m, eps = _inputs(70, 300, 40)
    runs = []
    for _ in range(2):
        out = masked_message_passing(x, csr.rowptr, csr.col, emb, m, eps)
        runs.append(torch.autograd.grad(out.square().sum(), (x, emb, m, eps)))
    for a, b in zip(*runs):
        assert torch.equal(a, b)


def test_transposed_csr_lists_the_edges_leaving_each_node():
    edge_index = torch.tensor([[0, 1, 2, 3, 0], [2, 0, 2, 1, 0]])
    csr = to_csr(edge_index, 4)
    rowptr_t, perm_t = csr.transposed()
    assert csr.transposed() is csr.transposed()  # cached on the instance
    src_of_sorted = csr.col[perm_t]
    assert rowptr_t.tolist() == [0, 2, 3, 4, 5]
    assert src_of_sorted.tolist() == [0, 0, 1, 2, 3]
    assert torch.equal(rowptr_t, transpose_csr(csr.rowptr, csr.col)[0])
    rowptr, col, perm = csr  # still the 3-tuple it was
    assert torch.equal(col, csr.col)


@pytest.mark.parametrize("backend", [pytest.param("triton", marks=needs_interpreter), "torch"])
def test_message_passing_opcheck(backend):
    csr = _graph(20, 60, "cpu")
    x, emb, m, eps = _inputs(20, 60, 9)
    rowptr_t, perm_t = csr.transposed()
    rowptr, col = csr.rowptr, csr.col
    torch.library.opcheck(_message_passing_op, (x, rowptr, col, emb, m, eps, rowptr_t, perm_t, backend))
    torch.library.opcheck(_message_passing_op, (x, rowptr, col, emb, None, eps.detach(), None, None, backend))


@pytest.mark.parametrize("backend", [pytest.param("triton", marks=needs_interpreter), "torch"])
def test_message_passing_torch_compile_fullgraph(backend, monkeypatch):
    """Both backends are one op to torch.compile (the reference alone has a data-dependent size)."""
    monkeypatch.setenv("LUMOS_BACKEND", backend)
    csr = _graph(30, 90, "cpu")
    x, emb, m, eps = _inputs(30, 90, 12)
    rowptr_t, perm_t = csr.transposed()

    def loss(x, emb, m, eps):
        out = masked_message_passing(x, csr.rowptr, csr.col, emb, m, eps, rowptr_t=rowptr_t, perm_t=perm_t)
        return torch.tanh(out).sum()

    compiled = torch.compile(loss, fullgraph=True)
    got = compiled(x, emb, m, eps)
    want = loss(x, emb, m, eps)
    assert_close(got, want, TOL[torch.float32])
    for a, e in zip(torch.autograd.grad(got, (x, emb, m, eps)), torch.autograd.grad(want, (x, emb, m, eps))):
        assert_close(a, e, TOL[torch.float32])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("num_nodes, num_edges, feats", [(1, 0, 3), (257, 2000, 65)])
def test_message_passing_16bit_matches_fp32_reference(device, dtype, num_nodes, num_edges, feats):
    csr = _graph(num_nodes, num_edges, device)
    _check_against_reference(csr, *_inputs(num_nodes, num_edges, feats, device, dtype), dtype=dtype)


_COMPILE_CHECK = """
import triton.language as tl
from lumos_kernels import dispatch, message_passing
fwd, bwd_dst, bwd_src = message_passing._kernels()
for dt in ("fp32", "bf16"):
    sig = dict(x_ptr="*" + dt, rowptr_ptr="*i64", col_ptr="*i64", emb_ptr="*" + dt, m_ptr="*fp32",
               eps_ptr="*" + dt, out_ptr="*" + dt, grad_ptr="*" + dt, d_emb_ptr="*fp32",
               dm_part_ptr="*fp32", d_eps_part_ptr="*fp32", rowptr_t_ptr="*i64", perm_t_ptr="*i64",
               dx_ptr="*" + dt)
    meta = dict(ACC=tl.float32, BLOCK_V=16, BLOCK_F=64)
    dispatch.compile_for_cuda_target(fwd, sig, dict(HAS_M=True, **meta))
    dispatch.compile_for_cuda_target(bwd_dst, sig, dict(HAS_M=True, NEED_M=True, NEED_EPS=True, **meta))
    dispatch.compile_for_cuda_target(bwd_src, sig, dict(HAS_M=True, **meta))
print("compiled")
"""


def test_message_passing_kernels_compile_for_a_cuda_target():
    """Real Triton compilation to sm_80 cubins (no GPU needed): catches what the interpreter cannot."""
    assert_compiles_for_cuda_target(_COMPILE_CHECK)
