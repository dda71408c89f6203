"""Triton masked_message_passing vs the torch reference: values and all gradients.

On CPU the kernels run in Triton's interpreter (TRITON_INTERPRET=1, set by conftest) with
``LUMOS_BACKEND=triton``; the same tests run on a CUDA GPU when one is present.
"""
import pytest
import torch

from kernel_checks import DEVICES, assert_close, assert_compiles_for_cuda_target, needs_interpreter
from lumos_kernels import masked_message_passing, masked_message_passing_reference, to_csr
from lumos_kernels._triton import message_passing as triton_message_passing
from lumos_kernels.message_passing import CSR, _message_passing_op, transpose_csr

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


@needs_interpreter
def test_message_passing_opcheck():
    csr = _graph(20, 60, "cpu")
    x, emb, m, eps = _inputs(20, 60, 9)
    rowptr_t, perm_t = csr.transposed()
    rowptr, col = csr.rowptr, csr.col
    torch.library.opcheck(_message_passing_op, (x, rowptr, col, emb, m, eps, rowptr_t, perm_t))
    torch.library.opcheck(_message_passing_op, (x, rowptr.int(), col.int(), emb, m, eps, None, None))
    torch.library.opcheck(_message_passing_op, (x, rowptr, col, emb, None, eps.detach(), None, None))


@pytest.mark.parametrize("backend", [pytest.param("triton", marks=needs_interpreter), "torch"])
def test_message_passing_torch_compile_fullgraph(backend, monkeypatch):
    """Triton: one opaque op to torch.compile; torch: traced by inductor (the destinations' size is given)."""
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


def _hub_graph(device="cpu"):
    """64 nodes: node 0 receives 5,000 edges, 3,000 of them from node 1; 100 edges among nodes
    1..31; nodes 32..63 have no edge at all."""
    g = torch.Generator().manual_seed(5)
    into_hub = torch.stack([torch.cat([torch.ones(3000, dtype=torch.long), torch.randint(1, 32, (2000,), generator=g)]),
                            torch.zeros(5000, dtype=torch.long)])
    among = torch.randint(1, 32, (2, 100), generator=g)
    edge_index = torch.cat([into_hub, among], dim=1)
    return to_csr(edge_index[:, torch.randperm(edge_index.shape[1], generator=g)].to(device), 64)


def _as_index(csr, dtype):
    """The same CSR with ``rowptr`` and ``col`` (and its cached transposed view) in ``dtype``."""
    cast = CSR(csr.rowptr.to(dtype), csr.col.to(dtype), csr.perm)
    rowptr_t, perm_t = csr.transposed()
    cast.__dict__["_transposed"] = (rowptr_t.to(dtype), perm_t.to(dtype))
    return cast


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("index_dtype, transposed", [(torch.int32, True), (torch.int64, False)],
                         ids=["int32-transposed-given", "int64-transposed-computed"])
def test_message_passing_hub_of_degree_5000_beside_isolated_nodes(device, index_dtype, transposed):
    """A row 5x longer than a segment is split over programs and finished by the second pass;
    node 1's 3,000 out-edges are split the same way in the dx pass."""
    csr = _hub_graph(device)
    assert int(csr.rowptr[1]) == 5000 and int((csr.col == 1).sum()) >= 3000
    assert triton_message_passing.INTERPRET_CHUNK < 3000  # both the hub and node 1 get split
    _check_against_reference(_as_index(csr, index_dtype), *_inputs(64, csr.col.numel(), 12, device),
                             transposed=transposed)


@needs_interpreter
@pytest.mark.parametrize("index_dtype", [torch.int32, torch.int64], ids=str)
def test_message_passing_many_split_rows_with_small_segments(index_dtype, monkeypatch):
    """Segments of 3 edges: most rows of a power-law-ish graph are split, in both directions."""
    monkeypatch.setattr(triton_message_passing, "INTERPRET_CHUNK", 3)
    g = torch.Generator().manual_seed(2)
    weights = 1.0 / torch.arange(1, 41, dtype=torch.float)  # Zipf-like degrees
    src = torch.multinomial(weights, 400, replacement=True, generator=g)
    dst = torch.multinomial(weights.flip(0), 400, replacement=True, generator=g)
    csr = to_csr(torch.stack([src, dst]), 40)
    _check_against_reference(_as_index(csr, index_dtype), *_inputs(40, 400, 20))


def test_segment_plan_cuts_rows_into_chunks_and_lists_split_rows():
    degrees = torch.tensor([0, 3, 10, 1, 0, 9])
    rowptr = torch.cat([torch.zeros(1, dtype=torch.long), degrees.cumsum(0)])
    plan = triton_message_passing.segment_plan(rowptr, 23, chunk=4)
    valid = plan.row < 6
    segments = list(zip(plan.row[valid].tolist(), plan.lo[valid].tolist(), plan.hi[valid].tolist(),
                        plan.slot[valid].tolist()))
    assert segments == [(0, 0, 0, -1), (1, 0, 3, -1), (2, 3, 7, 0), (2, 7, 11, 1), (2, 11, 13, 2),
                        (3, 13, 14, -1), (4, 14, 14, -1), (5, 14, 18, 3), (5, 18, 22, 4), (5, 22, 23, 5)]
    assert plan.row.numel() >= len(segments) and plan.num_slots >= 6  # static bounds hold
    listed = plan.split_row < 6
    assert plan.split_row[listed].tolist() == [2, 5]
    assert plan.split_slot[listed].tolist() == [0, 3] and plan.split_count[listed].tolist() == [3, 3]
    assert (plan.split_count[~listed] == 0).all()


def _bad_graph(kind):
    csr = to_csr(torch.tensor([[0, 1, 2, 3, 0, 2], [1, 2, 0, 0, 3, 3]]), 4)
    rowptr, col = csr.rowptr.clone(), csr.col.clone()
    rowptr_t = perm_t = None
    if kind == "start":
        rowptr[0] = 1
    elif kind == "end":
        rowptr[-1] = 5
    elif kind == "decreasing":
        rowptr[2] = 0
    elif kind == "col":
        col[1] = 4
    elif kind == "transposed":
        rowptr_t, perm_t = transpose_csr(rowptr, col)
        perm_t = perm_t.flip(0)
    return rowptr, col, rowptr_t, perm_t


@pytest.mark.parametrize("backend", [pytest.param("triton", marks=needs_interpreter), "torch"])
@pytest.mark.parametrize("kind, match", [("start", "rowptr.*start at 0"), ("end", "rowptr.*end at E"),
                                         ("decreasing", "rowptr.*never decrease"), ("col", "col.*num_nodes"),
                                         ("transposed", "source-sorted view")])
def test_message_passing_rejects_an_invalid_graph(backend, kind, match, monkeypatch):
    monkeypatch.setenv("LUMOS_BACKEND", backend)
    rowptr, col, rowptr_t, perm_t = _bad_graph(kind)
    x, emb = torch.randn(4, 3), torch.randn(6, 3)
    with pytest.raises(ValueError, match=f"masked_message_passing: .*{match}"):
        masked_message_passing(x, rowptr, col, emb, rowptr_t=rowptr_t, perm_t=perm_t)


def test_message_passing_rejects_float_indices_and_checks_a_changed_graph_again():
    csr = to_csr(torch.tensor([[0, 1], [1, 0]]), 2)
    x, emb = torch.randn(2, 3), torch.randn(2, 3)
    with pytest.raises(TypeError, match="`col` must be a 1-D int32 or int64"):
        masked_message_passing(x, csr.rowptr, csr.col.float(), emb)
    masked_message_passing(x, csr.rowptr, csr.col, emb)  # valid, and remembered as such
    csr.rowptr[0] = 1  # modified in place: checked again
    with pytest.raises(ValueError, match="start at 0"):
        masked_message_passing(x, csr.rowptr, csr.col, emb)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_message_passing_output_may_be_modified_in_place(device, backend, monkeypatch):
    monkeypatch.setenv("LUMOS_BACKEND", backend)
    csr = _graph(30, 90, device)
    x, emb, m, eps = _inputs(30, 90, 12, device)
    grads = []
    for in_place in (True, False):
        out = masked_message_passing(x, csr.rowptr, csr.col, emb, m, eps)
        assert out._base is None
        out = torch.relu_(out.add_(0.1)) if in_place else torch.relu(out + 0.1)
        grads.append(torch.autograd.grad(out.square().sum(), (x, emb, m, eps)))
    for got, want in zip(*grads):
        torch.testing.assert_close(got, want, rtol=0, atol=0)


_COMPILE_CHECK = """
import re
import triton.language as tl
from lumos_kernels._triton.cuda_target import compile_for_cuda_target
from lumos_kernels._triton import message_passing as mp

def check_row_addresses_are_int64(ttir, name):
    # A 2-D feature-tile address is row * F + col. Triton adds the two parts with two addptr ops:
    # the row part must be i64; an i32 offset of a 2-D tile may only be the broadcast column range.
    defs = {m.group(1): line for line in ttir.splitlines() for m in [re.match(r"\\s*(%[\\w.#]+) = ", line)] if m}
    for line in ttir.splitlines():
        hit = re.search(r"tt.addptr %\\S+, (%[\\w.#]+) : tensor<(\\d+)x(\\d+)x!tt.ptr<\\w+>>, "
                        r"tensor<\\d+x\\d+x(i\\d+)>", line)
        if hit and hit.group(4) == "i32":
            source = defs[hit.group(1)]
            assert "tt.broadcast" in source and "tensor<1x" in source, (name, line.strip(), source.strip())
        elif hit:
            assert hit.group(4) == "i64", (name, line.strip())

for arch, dt, index in ((90, "fp32", "i32"), (90, "bf16", "i64"), (80, "fp32", "i32")):
    sig = dict(value_ptr="*" + dt, index_ptr="*" + index, emb_ptr="*" + dt, self_ptr="*" + dt, m_ptr="*fp32",
               eps_ptr="*" + dt, seg_row_ptr="*i64", seg_lo_ptr="*i64", seg_hi_ptr="*i64", seg_slot_ptr="*i64",
               out_ptr="*" + dt, part_ptr="*fp32", split_row_ptr="*i64", split_slot_ptr="*i64",
               split_count_ptr="*i64", grad_ptr="*" + dt, x_ptr="*" + dt, col_ptr="*" + index,
               dst_ptr="*i64", d_emb_ptr="*fp32", dm_part_ptr="*fp32")
    for forward in (True, False):
        meta = dict(GATE_MESSAGES=forward, HAS_M=True, ACC=tl.float32, BLOCK_F=64)
        if not forward:
            sig.update(value_ptr="*fp32", index_ptr="*" + index)
        kernel = compile_for_cuda_target(mp.segment_sum_kernel, sig,
                                         dict(RELU_OF_SUM_WITH_EMB=forward, BLOCK_S=32, **meta), capability=arch)
        check_row_addresses_are_int64(kernel.asm["ttir"], "segment_sum")
        kernel = compile_for_cuda_target(mp.segment_finish_kernel, sig, dict(BLOCK_P=16, **meta), capability=arch)
        check_row_addresses_are_int64(kernel.asm["ttir"], "segment_finish")
    kernel = compile_for_cuda_target(mp.edge_grad_kernel, sig,
                                     dict(HAS_M=True, STORE_D_EMB=True, NEED_M=True, ACC=tl.float32, BLOCK_E=32,
                                          BLOCK_F=64), capability=arch)
    check_row_addresses_are_int64(kernel.asm["ttir"], "edge_grad")
print("compiled")
"""


def test_message_passing_kernels_compile_for_cuda_targets_with_int64_row_addresses():
    """Real compilation to sm_80/sm_90 (no GPU needed), int32 and int64 indices: every feature-row
    address is computed in int64, so N * F or E * F past 2**31 cannot wrap."""
    assert_compiles_for_cuda_target(_COMPILE_CHECK)
