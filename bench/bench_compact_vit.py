"""What compaction buys for a ViT on CPU with 75% of the attention heads pruned.

``inference-vit-75%-heads-pruned``: latency of ``dense(x)`` (torch's ``nn.MultiheadAttention``),
``gated.eval()(x)`` and ``compacted(x)`` under ``torch.inference_mode()``, on a batch of
``BATCH`` images of ``PATCHES`` patches. In every encoder block a seeded random 75% of the heads
are closed; every other gate (head dimensions, MLP neurons, input features) is fully open, so
the speedup is the heads' alone. The compacted model is checked once against the gated one
before timing (and its parameter count against ``lumos.report``).

Run::

    python -m pytest bench/bench_compact_vit.py --benchmark-enable --benchmark-only \\
        --benchmark-columns=median,iqr,min,rounds -q

(add ``OMP_NUM_THREADS=1`` in front on a busy machine; see ``bench_compaction.py``).
"""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

import lumos
from bench_compaction import CLOSE_LOGIT, KEEP_LOGIT, measure, n_params, run_info

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from zoo_graph_attention import TinyViT  # noqa: E402

PATCH_DIM, PATCHES, DIM, HEADS, DEPTH, MLP, CLASSES = 48, 64, 256, 8, 4, 512, 10
BATCH = 32
PRUNED_HEADS = 0.75
ATOL = RTOL = 1e-4  # float32, compacted vs gated eval


@torch.no_grad()
def prune_heads(gated: torch.nn.Module, fraction: float, generator: torch.Generator) -> int:
    """Open every gate, then close a random ``fraction`` of each attention layer's heads."""
    for _, gate in lumos.gates_of(gated):
        gate.log_alpha.fill_(KEEP_LOGIT)
    kept = None
    for module in gated.modules():
        if isinstance(module, lumos.nn.GatedMultiheadAttention):
            closed = torch.randperm(module.num_heads, generator=generator)[:round(fraction * module.num_heads)]
            module.head_gate.log_alpha[closed] = CLOSE_LOGIT
            kept = module.num_heads - closed.numel()
    return kept


@pytest.fixture(scope="module")
def vit_models():
    generator = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    dense = TinyViT(PATCH_DIM, PATCHES, DIM, HEADS, DEPTH, MLP, CLASSES).eval()
    x = torch.randn(BATCH, PATCHES, PATCH_DIM, generator=generator)
    gated = lumos.gate(dense, x[:4])
    kept = prune_heads(gated, PRUNED_HEADS, generator)
    gated.eval()
    compacted = lumos.compact(gated, x[:4])
    assert n_params(compacted) == lumos.report(gated).params_after
    with torch.inference_mode():
        torch.testing.assert_close(compacted(x), gated(x), atol=ATOL, rtol=RTOL)
    info = {"pruned_heads": PRUNED_HEADS, "heads_kept": kept, "heads": HEADS, "dim": DIM, "depth": DEPTH,
            "batch": BATCH, "tokens": PATCHES + 1, "dense_params": n_params(dense),
            "compacted_params": n_params(compacted), **run_info(x)}
    return {"dense": dense, "gated_eval": gated, "compacted": compacted, "x": x, "info": info}


@pytest.mark.parametrize("kind", ["dense", "gated_eval", "compacted"])
def test_inference_latency_of_vit(benchmark, vit_models, kind):
    model, x, info = vit_models[kind], vit_models["x"], vit_models["info"]
    benchmark.group = f"inference-vit-{round(100 * PRUNED_HEADS)}%-heads-pruned"
    benchmark.extra_info.update(info, model=kind)
    with torch.inference_mode():
        measure(benchmark, model, x)
