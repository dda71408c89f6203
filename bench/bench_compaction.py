"""What compaction buys on CPU, and what gating costs in training.

Two benchmark families on a SciML surrogate MLP (12 inputs -> 3 x 512 SiLU -> 3 outputs):

- ``inference-<p>%-pruned``: latency of ``dense(x)``, ``gated.eval()(x)`` and ``compacted(x)``
  on 4096 rows under ``torch.inference_mode()``, with a seeded random ``p`` of each hidden
  layer's neurons closed (every input feature kept). Dense over compacted median is the
  speedup compaction gives; gated eval is what a user runs if they skip :func:`lumos.compact`.
- ``train-step-batch-256``: one optimiser step (forward, MSE, backward, Adam) of the plain MLP,
  of the gated MLP, and of the gated MLP with ``lumos.penalty(gated, "params", normalize=True)``
  added to the loss; the gated steps also clamp the gates, as :func:`lumos.fit` does.

Every setup checks its model once before timing (the compacted output equals the gated eval
output, the compacted widths are the kept widths, gate gradients flow), so no number can
come from a wrong model. torch's thread count is left alone and recorded in ``extra_info``.

Run (pytest collects a file named on the command line whatever its name)::

    python -m pytest bench/bench_compaction.py --benchmark-enable --benchmark-only \\
        --benchmark-columns=median,iqr,min,rounds -q

``--benchmark-enable`` overrides the ``--benchmark-disable`` that setup.cfg adds for test runs.

On a machine whose cores are busy with other work (``load_average_1min`` in ``extra_info``
above the core count), torch's OpenMP threads wait a scheduler tick at every barrier and the
times come out as multiples of ~4 ms; ``OMP_NUM_THREADS=1`` in the environment gives a
contention-robust cross-check.
"""
from __future__ import annotations

import os
import time

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lumos
from lumos.train import penalty
from lumos_kernels import dispatch

N_FEATURES, HIDDEN, DEPTH, N_OUTPUTS = 12, 512, 3, 3
INFERENCE_ROWS = 4096
TRAIN_BATCH = 256
PRUNED_FRACTIONS = (0.75, 0.90)
KEEP_LOGIT, CLOSE_LOGIT = 4.0, -8.0  # p_open above t_u (gate exactly 1) / at most t_l (exactly 0)
L0_WEIGHT = 1e-2
LEARNING_RATE = 1e-3
ATOL = RTOL = 1e-5  # float32, compacted vs gated eval
SECONDS_PER_BENCHMARK = 5.0  # rounds are chosen to fill about this much time
MIN_ROUNDS, MAX_ROUNDS, WARMUP_ROUNDS = 15, 2000, 3


def surrogate_mlp() -> nn.Sequential:
    """The dense model: ``N_FEATURES -> DEPTH x HIDDEN (SiLU) -> N_OUTPUTS``."""
    widths = [N_FEATURES] + [HIDDEN] * DEPTH
    layers: list[nn.Module] = []
    for n_in, n_out in zip(widths[:-1], widths[1:]):
        layers += [nn.Linear(n_in, n_out), nn.SiLU()]
    layers.append(nn.Linear(HIDDEN, N_OUTPUTS))
    return nn.Sequential(*layers)


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def mlp_params(widths: list[int]) -> int:
    """Parameters of a plain MLP with these layer widths (weights and biases)."""
    return sum(n_in * n_out + n_out for n_in, n_out in zip(widths[:-1], widths[1:]))


def gated_linears(gated: nn.Module) -> list[lumos.nn.GatedLinear]:
    return [m for m in gated.modules() if isinstance(m, lumos.nn.GatedLinear)]


@torch.no_grad()
def prune_hidden(gated: nn.Module, fraction: float, generator: torch.Generator) -> int:
    """Open every gate, then close a random ``fraction`` of each hidden layer's neurons.

    Returns the number of neurons kept per hidden layer.
    """
    for _, gate in lumos.gates_of(gated):
        gate.log_alpha.fill_(KEEP_LOGIT)
    kept = None
    for layer in gated_linears(gated):
        n = layer.out_gate.n
        n_closed = round(fraction * n)
        closed = torch.randperm(n, generator=generator)[:n_closed]
        layer.out_gate.log_alpha[closed] = CLOSE_LOGIT
        kept = n - n_closed
    return kept


def run_info(x: torch.Tensor) -> dict:
    return {
        "torch_threads": torch.get_num_threads(),
        "torch_interop_threads": torch.get_num_interop_threads(),
        "lumos_backend": dispatch.backend_for("masked_linear", x),
        "torch_version": torch.__version__,
        "load_average_1min": os.getloadavg()[0],
    }


def measure(benchmark, fn, *args) -> None:
    """Time ``fn(*args)`` over enough single-call rounds to fill ``SECONDS_PER_BENCHMARK``.

    A fixed, stated round count instead of pytest-benchmark's calibration (which stops at a
    handful of rounds for calls of 100 ms): the median of many rounds is what a shared 2-core
    machine can report with a usable IQR.
    """
    if benchmark.disabled:  # plain `pytest` run (setup.cfg disables benchmarks): one checked call
        benchmark(fn, *args)
        return
    seconds = 0.0  # the slowest warm-up call: a busy machine must not blow the time budget
    for _ in range(WARMUP_ROUNDS):
        start = time.perf_counter()
        fn(*args)
        seconds = max(seconds, time.perf_counter() - start)
    rounds = max(MIN_ROUNDS, min(MAX_ROUNDS, int(SECONDS_PER_BENCHMARK / max(seconds, 1e-6))))
    benchmark.extra_info["rounds_requested"] = rounds
    benchmark.pedantic(fn, args=args, rounds=rounds, iterations=1, warmup_rounds=0)


@pytest.fixture(scope="module", params=PRUNED_FRACTIONS, ids=lambda f: f"{round(100 * f)}%")
def pruned_models(request):
    """Dense, gated (eval) and compacted surrogate at one pruning level, checked once."""
    fraction = request.param
    generator = torch.Generator().manual_seed(0)
    dense = surrogate_mlp().eval()
    x = torch.randn(INFERENCE_ROWS, N_FEATURES, generator=generator)
    gated = lumos.gate(dense, x[:8])
    assert len(gated_linears(gated)) == DEPTH, gated
    kept = prune_hidden(gated, fraction, generator)
    gated.eval()
    compacted = lumos.compact(gated, x[:8])

    expected = mlp_params([N_FEATURES] + [kept] * DEPTH + [N_OUTPUTS])
    assert n_params(compacted) == expected, (n_params(compacted), expected, compacted)
    with torch.inference_mode():
        torch.testing.assert_close(compacted(x), gated(x), atol=ATOL, rtol=RTOL)
    info = {
        "pruned_fraction": fraction,
        "hidden_kept": kept,
        "dense_params": n_params(dense),
        "compacted_params": n_params(compacted),
        "kept_param_fraction": n_params(compacted) / n_params(dense),
        "rows": INFERENCE_ROWS,
        **run_info(x),
    }
    return {"dense": dense, "gated_eval": gated, "compacted": compacted, "x": x, "info": info}


@pytest.mark.parametrize("kind", ["dense", "gated_eval", "compacted"])
def test_inference_latency_of_surrogate(benchmark, pruned_models, kind):
    model, x, info = pruned_models[kind], pruned_models["x"], pruned_models["info"]
    benchmark.group = f"inference-{round(100 * info['pruned_fraction'])}%-pruned"
    benchmark.extra_info.update(info, model=kind)
    with torch.inference_mode():
        measure(benchmark, model, x)


def train_step(model: nn.Module, optimizer: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor,
               with_penalty: bool) -> torch.Tensor:
    """One step: forward, MSE (plus the normalised params penalty), backward, Adam, gate clamp."""
    optimizer.zero_grad(set_to_none=True)
    loss = F.mse_loss(model(x), y)
    if with_penalty:
        loss = loss + L0_WEIGHT * penalty(model, "params", normalize=True)
    loss.backward()
    optimizer.step()
    if lumos.gates_of(model):
        lumos.clamp_gates_(model)
    return loss.detach()


@pytest.mark.parametrize("variant", ["plain", "gated", "gated+penalty"])
def test_train_step_of_surrogate(benchmark, variant):
    generator = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    x = torch.randn(TRAIN_BATCH, N_FEATURES, generator=generator)
    y = torch.randn(TRAIN_BATCH, N_OUTPUTS, generator=generator)
    dense = surrogate_mlp()
    model = dense if variant == "plain" else lumos.gate(dense, x[:8])
    model.train()
    optimizer = torch.optim.Adam(model.parameters(), lr=LEARNING_RATE)
    with_penalty = variant == "gated+penalty"

    # Checked once: the step trains, and in a gated model every gate gets a gradient.
    loss = train_step(model, optimizer, x, y, with_penalty)
    assert torch.isfinite(loss), loss
    for name, gate in lumos.gates_of(model):
        grad = gate.log_alpha.grad
        assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0, name
    assert bool(lumos.gates_of(model)) == (variant != "plain")

    benchmark.group = f"train-step-batch-{TRAIN_BATCH}"
    benchmark.extra_info.update(
        variant=variant,
        batch=TRAIN_BATCH,
        params=n_params(model),
        gates=sum(gate.n for _, gate in lumos.gates_of(model)),
        **run_info(x),
    )
    measure(benchmark, train_step, model, optimizer, x, y, with_penalty)
