"""Micro-benchmarks of the lumos_kernels ops against honest baselines on the same shapes.

Baselines are what a user would write without lumos, eager and under ``torch.compile``:
``F.linear`` (the bound for the masked GEMM) and the masked expression; per-layer gate
sampling with ``torch.rand``; gather + ``index_add_`` and ``torch.segment_reduce`` message
passing (and torch-scatter's ``segment_csr`` when installed).

On a CUDA GPU every case is timed with ``triton.testing.do_bench`` (median, 20th and 80th
percentiles) with its peak extra memory, and the session writes
``bench/results/<gpu-name>.json``. On CPU no Triton kernel runs (the interpreter is not a
benchmark: the ``lumos`` cases run the ops' torch backend, what a CPU user gets) and every
case is timed by pytest-benchmark on smaller shapes. With
``--benchmark-disable`` every case runs once, untimed: the CI smoke test. See bench/README.md.
"""
import json
import math
import platform
import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from lumos_kernels import (fp32_input_precision, hard_concrete, masked_linear, masked_linear_reference,
                           masked_message_passing, p_open, to_csr)
from lumos_kernels.hard_concrete import BETA, GAMMA, T_LOW, T_UP, ZETA

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
RESULTS_DIR = Path(__file__).parent / "results"
_RESULTS = []

# Shapes from real models (issue 3) on a GPU; on CPU, small enough for two cores.
if CUDA:
    GEMM_SHAPES = [(m, nk, nk) for m in (4096, 65536) for nk in (256, 1024, 4096)]
    GEMM_DTYPES = [torch.bfloat16, torch.float32]
    GRAPHS = [(10_000, 100_000, 64, "uniform"), (100_000, 1_000_000, 128, "uniform"),
              (100_000, 1_000_000, 256, "uniform"), (100_000, 1_000_000, 128, "power_law")]
    GRAPH_DTYPES = [torch.float32, torch.bfloat16]
else:
    GEMM_SHAPES = [(4096, 256, 256)]
    GEMM_DTYPES = [torch.float32]
    GRAPHS = [(5_000, 50_000, 32, "uniform"), (5_000, 50_000, 32, "power_law")]
    GRAPH_DTYPES = [torch.float32]
GATES = (100_000, 50)  # 100k gates in 50 layers

# the variant each op's ratios are taken against (the first one present)
BASELINES = {"masked_linear": ["plain_linear"], "hard_concrete": ["torch_rand_per_layer"],
             "message_passing": ["torch_scatter_segment_csr", "torch_index_add"]}


def _measure(benchmark, fn, **record):
    """Time ``fn``: do_bench + peak memory on CUDA (recorded for the JSON), pytest-benchmark on CPU."""
    if not CUDA:
        benchmark(fn)
        return
    import triton

    fn()  # warm-up (compilation, launch-config timing)
    torch.cuda.synchronize()
    if benchmark.disabled:  # --benchmark-disable: a smoke run, nothing recorded
        return
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    median, p20, p80 = triton.testing.do_bench(fn, quantiles=[0.5, 0.2, 0.8])
    record.update(median_ms=median, p20_ms=p20, p80_ms=p80, peak_extra_mem_bytes=peak)
    benchmark.extra_info.update(record)
    _RESULTS.append(record)


def _backward(fn, leaves):
    def step():
        out = fn()
        torch.autograd.grad(out, leaves, torch.ones_like(out))
    return step


def _timed_call(call, pas, leaves):
    """``call`` as timed for ``pas``: under no_grad ("forward") or with the backward into ``leaves``."""
    return _backward(call, leaves) if pas == "forward_backward" else torch.no_grad()(call)


PASSES = pytest.mark.parametrize("pas", ["forward", "forward_backward"])


def _op_cases(variants, shape_names, shapes, dtypes):
    """Parametrize an op's benchmark over variant x shape x dtype x pass (ids in that order)."""
    def decorate(test):
        test = pytest.mark.parametrize("variant", list(variants))(test)
        test = pytest.mark.parametrize(shape_names, shapes)(test)
        test = pytest.mark.parametrize("dtype", dtypes, ids=str)(test)
        return PASSES(test)
    return decorate


@pytest.fixture(scope="session", autouse=True)
def _write_gpu_results():
    yield
    if not (CUDA and _RESULTS):
        return
    import triton

    name = torch.cuda.get_device_name()
    doc = dict(device=name, torch=torch.__version__, triton=triton.__version__, cuda=torch.version.cuda,
               python=platform.python_version(), fp32_input_precision=fp32_input_precision(),
               results=_RESULTS, ratios=_ratios(_RESULTS))
    RESULTS_DIR.mkdir(exist_ok=True)
    path = RESULTS_DIR / (re.sub(r"[^A-Za-z0-9_.-]+", "-", name).strip("-") + ".json")
    path.write_text(json.dumps(doc, indent=2) + "\n")


def _ratios(results):
    """Each variant's median over the baseline's, per (op, pass, shape, dtype)."""
    groups = {}
    for r in results:
        key = (r["op"], r["pass"], json.dumps(r["shape"]), r.get("graph"), r["dtype"])
        groups.setdefault(key, {})[r["variant"]] = r
    out = []
    for (op, pas, shape, graph, dtype), variants in groups.items():
        base = next((variants[name] for name in BASELINES[op] if name in variants), None)
        if base is None:
            continue
        out.append(dict(op=op, **{"pass": pas}, shape=json.loads(shape), graph=graph, dtype=dtype,
                        baseline=base["variant"],
                        median_over_baseline={v: r["median_ms"] / base["median_ms"] for v, r in variants.items()}))
    return out


# ------------------------------------------------------------------------------ masked_linear

def _plain_linear(x, w, b, m_in, m_out):
    return F.linear(x, w, b)  # bias fused, no gates: the bound


MASKED_LINEAR_VARIANTS = {
    "lumos": masked_linear,  # the op: Triton on CUDA tensors, its torch backend on CPU tensors
    "eager_expression": masked_linear_reference,  # F.linear(x * m_in, W * m_out[:, None], b * m_out)
    "compiled_expression": torch.compile(masked_linear_reference),
    "plain_linear": _plain_linear,
}


@_op_cases(MASKED_LINEAR_VARIANTS, "m, n, k", GEMM_SHAPES, GEMM_DTYPES)
def test_bench_masked_linear(benchmark, variant, m, n, k, dtype, pas):
    fn = MASKED_LINEAR_VARIANTS[variant]
    grad = pas == "forward_backward"
    x = torch.randn(m, k, device=DEVICE, dtype=dtype, requires_grad=grad)
    w = (torch.randn(n, k, device=DEVICE) / k ** 0.5).to(dtype).requires_grad_(grad)
    b = torch.randn(n, device=DEVICE, dtype=dtype, requires_grad=grad)
    m_in = torch.rand(k, device=DEVICE, dtype=dtype, requires_grad=grad)
    m_out = torch.rand(n, device=DEVICE, dtype=dtype, requires_grad=grad)
    args = (x, w, b, m_in, m_out)
    call = _timed_call(lambda: fn(*args), pas, args if variant != "plain_linear" else (x, w, b))
    _measure(benchmark, call, op="masked_linear", variant=variant, shape=[m, n, k], dtype=str(dtype),
             **{"pass": pas})


# ------------------------------------------------------------------------------ hard_concrete

def _gate_logits(device):
    n, layers = GATES
    flat = (torch.rand(n, device=device) * 6 - 3).requires_grad_()
    return flat, [int(len(part)) for part in torch.tensor_split(torch.arange(n), layers)]


def _one_launch(flat, sizes, seed):
    m, total = hard_concrete(flat, seed=seed, offset=0, return_p_open_sum=True)
    return m.sum() + total


def _torch_rand_layer(log_alpha):
    """Semi-stochastic hard-concrete gates of one layer as a user writes them: torch.rand noise."""
    u = torch.rand_like(log_alpha).clamp(1e-6, 1 - 1e-6)
    s = torch.sigmoid((torch.log(u) - torch.log1p(-u) + log_alpha) / BETA)
    z = (s * (ZETA - GAMMA) + GAMMA).clamp(0, 1)
    pi = p_open(log_alpha)
    return torch.where(pi > T_UP, 1.0, torch.where(pi <= T_LOW, 0.0, z)), pi.sum()


_compiled_rand_layer = torch.compile(_torch_rand_layer)


def _per_layer(layer_fn):
    def run(flat, sizes, seed):
        out = 0
        for view in flat.split(sizes):  # one call per layer: a model without a flat gate buffer
            m, total = layer_fn(view)
            out = out + m.sum() + total
        return out
    return run


HARD_CONCRETE_VARIANTS = {"lumos": _one_launch, "torch_rand_per_layer": _per_layer(_torch_rand_layer),
                          "compiled_torch_rand_per_layer": _per_layer(_compiled_rand_layer)}


@PASSES
@pytest.mark.parametrize("variant", list(HARD_CONCRETE_VARIANTS))
def test_bench_hard_concrete(benchmark, variant, pas):
    fn = HARD_CONCRETE_VARIANTS[variant]
    flat, sizes = _gate_logits(DEVICE)
    call = _timed_call(lambda: fn(flat, sizes, 7), pas, (flat,))
    _measure(benchmark, call, op="hard_concrete", variant=variant, shape=list(GATES), dtype="torch.float32",
             **{"pass": pas})


# ------------------------------------------------------------------------------ message passing

def _edge_index(num_nodes, num_edges, kind):
    """``uniform`` endpoints, or ``power_law`` destinations (Zipf, exponent 1: a few hubs hold
    a large share of the edges, as in citation and social graphs)."""
    g = torch.Generator().manual_seed(0)
    src = torch.randint(0, num_nodes, (num_edges,), generator=g)
    if kind == "uniform":
        dst = torch.randint(0, num_nodes, (num_edges,), generator=g)
    else:
        weights = 1.0 / torch.arange(1, num_nodes + 1, dtype=torch.float64)
        dst = torch.multinomial(weights, num_edges, replacement=True, generator=g)
    return torch.stack([src, dst])


def _graph_inputs(num_nodes, num_edges, feats, kind, dtype, grad):
    csr = to_csr(_edge_index(num_nodes, num_edges, kind).to(DEVICE), num_nodes)
    x = torch.randn(num_nodes, feats, device=DEVICE, dtype=dtype, requires_grad=grad)
    emb = torch.randn(num_edges, feats, device=DEVICE, dtype=dtype, requires_grad=grad)
    m = torch.rand(feats, device=DEVICE, dtype=dtype, requires_grad=grad)
    return csr, x, emb, m


def _lumos_mp(csr, dst, x, emb, m):
    rowptr_t, perm_t = csr.transposed()
    return masked_message_passing(x, csr.rowptr, csr.col, emb, m, 0.1, rowptr_t=rowptr_t, perm_t=perm_t)


def _index_add_mp(csr, dst, x, emb, m):
    agg = torch.zeros_like(x).index_add_(0, dst, torch.relu(x[csr.col] + emb))
    return m * (1.1 * x + agg)


def _segment_reduce_mp(csr, dst, x, emb, m):
    agg = torch.segment_reduce(torch.relu(x[csr.col] + emb), "sum", offsets=csr.rowptr, axis=0, unsafe=True)
    return m * (1.1 * x + agg)


def _scatter_mp(csr, dst, x, emb, m):
    from torch_scatter import segment_csr

    agg = segment_csr(torch.relu(x[csr.col] + emb), csr.rowptr, reduce="sum")
    return m * (1.1 * x + agg)


def _has_torch_scatter():
    try:
        import torch_scatter  # noqa: F401
    except ImportError:
        return False
    return True


MESSAGE_PASSING_VARIANTS = {
    "lumos": _lumos_mp,  # the op: Triton on CUDA tensors, its torch backend on CPU tensors
    "torch_index_add": _index_add_mp,
    "compiled_index_add": torch.compile(_index_add_mp),
    "torch_segment_reduce": _segment_reduce_mp,
    "torch_scatter_segment_csr": _scatter_mp,
}


@_op_cases(MESSAGE_PASSING_VARIANTS, "num_nodes, num_edges, feats, kind", GRAPHS, GRAPH_DTYPES)
def test_bench_message_passing(benchmark, variant, num_nodes, num_edges, feats, kind, dtype, pas):
    if variant == "torch_scatter_segment_csr" and not _has_torch_scatter():
        pytest.skip("torch_scatter is not installed (pip install torch-scatter)")
    fn = MESSAGE_PASSING_VARIANTS[variant]
    grad = pas == "forward_backward"
    csr, x, emb, m = _graph_inputs(num_nodes, num_edges, feats, kind, dtype, grad)
    dst = csr.destinations()
    csr.transposed()  # built once per graph, as a layer caches it
    call = _timed_call(lambda: fn(csr, dst, x, emb, m), pas, (x, emb, m))
    max_degree = int((csr.rowptr[1:] - csr.rowptr[:-1]).max())
    _measure(benchmark, call, op="message_passing", variant=variant, shape=[num_nodes, num_edges, feats],
             graph=kind, max_in_degree=max_degree, dtype=str(dtype), **{"pass": pas})


def test_bench_graphs_are_what_they_say():
    """The power-law graph has hubs (the case a serial walk over a row handles badly)."""
    num_nodes, num_edges = GRAPHS[0][:2]
    uniform = to_csr(_edge_index(num_nodes, num_edges, "uniform"), num_nodes)
    power_law = to_csr(_edge_index(num_nodes, num_edges, "power_law"), num_nodes)
    degree = lambda csr: csr.rowptr[1:] - csr.rowptr[:-1]  # noqa: E731
    assert int(degree(power_law).max()) > 50 * math.ceil(num_edges / num_nodes)
    assert int(degree(uniform).max()) < 5 * math.ceil(num_edges / num_nodes)
