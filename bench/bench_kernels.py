"""Micro-benchmarks of the lumos_kernels ops against honest baselines on the same shapes.

On a CUDA GPU every case is timed with ``triton.testing.do_bench`` (median, 20th and 80th
percentiles) with its peak extra memory, and the session writes
``bench/results/<gpu-name>.json``. On CPU the Triton cases skip (the interpreter is not a
benchmark) and the torch cases are timed by pytest-benchmark on smaller shapes.
See bench/README.md for how to run.
"""
import json
import platform
import re
from pathlib import Path

import pytest
import torch

from lumos_kernels import (hard_concrete, hard_concrete_reference, masked_linear, masked_linear_reference,
                           masked_message_passing, p_open, to_csr)

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
RESULTS_DIR = Path(__file__).parent / "results"
_RESULTS = []

NO_GPU = "needs a CUDA GPU: Triton kernels are timed on a GPU only (the CPU interpreter is not a benchmark)"

# Shapes from real models (issue 3) on a GPU; on CPU, small enough for two cores.
if CUDA:
    GEMM_SHAPES = [(m, nk, nk) for m in (4096, 65536) for nk in (256, 1024, 4096)]
    GEMM_DTYPES = [torch.bfloat16, torch.float32]
    GRAPHS = [(10_000, 100_000, 64), (100_000, 1_000_000, 128), (100_000, 1_000_000, 256)]
    GRAPH_DTYPES = [torch.float32, torch.bfloat16]
else:
    GEMM_SHAPES = [(4096, 256, 256)]
    GEMM_DTYPES = [torch.float32]
    GRAPHS = [(10_000, 100_000, 64)]
    GRAPH_DTYPES = [torch.float32]
GATES = (100_000, 50)  # 100k gates in 50 layers


def _measure(benchmark, fn, **record):
    """Time ``fn``: do_bench + peak memory on CUDA (recorded for the JSON), pytest-benchmark on CPU."""
    if not CUDA:
        benchmark(fn)
        return
    import triton

    fn()  # warm-up (compilation, autotuning)
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
               python=platform.python_version(), results=_RESULTS, ratios=_ratios(_RESULTS))
    RESULTS_DIR.mkdir(exist_ok=True)
    path = RESULTS_DIR / (re.sub(r"[^A-Za-z0-9_.-]+", "-", name).strip("-") + ".json")
    path.write_text(json.dumps(doc, indent=2) + "\n")


def _ratios(results):
    """Each variant's median over the baseline's, per (op, pass, shape, dtype)."""
    baselines = {"masked_linear": ["plain_gemm"], "hard_concrete": ["per_layer_reference"],
                 "message_passing": ["torch_scatter_segment_csr", "torch_index_add"]}
    groups = {}
    for r in results:
        groups.setdefault((r["op"], r["pass"], json.dumps(r["shape"]), r["dtype"]), {})[r["variant"]] = r
    out = []
    for (op, pas, shape, dtype), variants in groups.items():
        base = next((variants[name] for name in baselines[op] if name in variants), None)
        if base is None:
            continue
        out.append(dict(op=op, **{"pass": pas}, shape=json.loads(shape), dtype=dtype, baseline=base["variant"],
                        median_over_baseline={v: r["median_ms"] / base["median_ms"] for v, r in variants.items()}))
    return out


# ------------------------------------------------------------------------------ masked_linear

def _gated_expression(x, w, b, m_in, m_out):
    return (x * m_in) @ (w * m_out[:, None]).T + b * m_out


_compiled_expression = torch.compile(_gated_expression)


def _plain_gemm(x, w, b, m_in, m_out):
    return x @ w.T + b


MASKED_LINEAR_VARIANTS = {
    "triton": masked_linear,  # the public op: Triton on CUDA tensors
    "reference": masked_linear_reference,
    "eager_expression": _gated_expression,
    "compiled_expression": _compiled_expression,
    "plain_gemm": _plain_gemm,
}


@_op_cases(MASKED_LINEAR_VARIANTS, "m, n, k", GEMM_SHAPES, GEMM_DTYPES)
def test_bench_masked_linear(benchmark, variant, m, n, k, dtype, pas):
    if variant == "triton" and not CUDA:
        pytest.skip(NO_GPU)
    fn = MASKED_LINEAR_VARIANTS[variant]
    grad = pas == "forward_backward"
    x = torch.randn(m, k, device=DEVICE, dtype=dtype, requires_grad=grad)
    w = (torch.randn(n, k, device=DEVICE) / k ** 0.5).to(dtype).requires_grad_(grad)
    b = torch.randn(n, device=DEVICE, dtype=dtype, requires_grad=grad)
    m_in = torch.rand(k, device=DEVICE, dtype=dtype, requires_grad=grad)
    m_out = torch.rand(n, device=DEVICE, dtype=dtype, requires_grad=grad)
    args = (x, w, b, m_in, m_out)
    call = _timed_call(lambda: fn(*args), pas, args if variant != "plain_gemm" else (x, w, b))
    _measure(benchmark, call, op="masked_linear", variant=variant, shape=[m, n, k], dtype=str(dtype),
             **{"pass": pas})


# ------------------------------------------------------------------------------ hard_concrete

def _layers(device):
    n, layers = GATES
    flat = (torch.rand(n, device=device) * 6 - 3).requires_grad_()
    return flat, torch.tensor_split(torch.arange(n), layers)


def _one_launch(flat, bounds, seed):
    m, total = hard_concrete(flat, seed=seed, offset=0, return_p_open_sum=True)
    return m.sum() + total


def _per_layer(flat, bounds, seed):
    out = 0
    for idx in bounds:  # what a model without a flat gate buffer does: one call per layer
        start, stop = int(idx[0]), int(idx[-1]) + 1
        view = flat[start:stop]
        out = out + hard_concrete_reference(view, seed, start, True).sum() + p_open(view).sum()
    return out


HARD_CONCRETE_VARIANTS = {"one_launch": _one_launch, "per_layer_reference": _per_layer}


@PASSES
@pytest.mark.parametrize("variant", list(HARD_CONCRETE_VARIANTS))
def test_bench_hard_concrete(benchmark, variant, pas):
    fn = HARD_CONCRETE_VARIANTS[variant]
    flat, bounds = _layers(DEVICE)
    call = _timed_call(lambda: fn(flat, bounds, 7), pas, (flat,))
    # on CPU "one_launch" is the torch backend on the flat buffer (one op call, no Triton)
    _measure(benchmark, call, op="hard_concrete", variant=variant, shape=list(GATES), dtype="torch.float32",
             **{"pass": pas})


# ------------------------------------------------------------------------------ message passing

def _graph_inputs(num_nodes, num_edges, feats, dtype, grad):
    g = torch.Generator().manual_seed(0)
    edge_index = torch.randint(0, num_nodes, (2, num_edges), generator=g).to(DEVICE)
    csr = to_csr(edge_index, num_nodes)
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
    "lumos": _lumos_mp,  # Triton on CUDA; the torch backend's op on CPU
    "torch_index_add": _index_add_mp,
    "torch_scatter_segment_csr": _scatter_mp,
}


@_op_cases(MESSAGE_PASSING_VARIANTS, "num_nodes, num_edges, feats", GRAPHS, GRAPH_DTYPES)
def test_bench_message_passing(benchmark, variant, num_nodes, num_edges, feats, dtype, pas):
    if variant == "torch_scatter_segment_csr" and not _has_torch_scatter():
        pytest.skip("torch_scatter is not installed (pip install torch-scatter)")
    fn = MESSAGE_PASSING_VARIANTS[variant]
    grad = pas == "forward_backward"
    csr, x, emb, m = _graph_inputs(num_nodes, num_edges, feats, dtype, grad)
    dst = csr.destinations()
    csr.transposed()  # built once per graph, as a layer caches it
    call = _timed_call(lambda: fn(csr, dst, x, emb, m), pas, (x, emb, m))
    _measure(benchmark, call, op="message_passing", variant=variant, shape=[num_nodes, num_edges, feats],
             dtype=str(dtype), **{"pass": pas})
