"""Coverage of compaction over the architecture zoo, beside Torch-Pruning (issue 9, acceptance 5).

For every model of ``tests/zoo_architectures.py`` (widths times ``--scale``):

- **gated**: the fraction of its parameters that sit in layers :func:`lumos.gate` gates;
- **lumos compacted**: with a seeded random half of every gate closed, the compacted model's
  parameters as a fraction of the dense model's, after checking that it equals the gated model
  in eval mode on fresh inputs (another batch size and, where the model allows it, another
  image size or sequence length; relative error at most 1e-5). A model that does not compact,
  or compacts to different outputs, gets no number: the table says what happened;
- **Torch-Pruning**: DepGraph with L1 magnitude importance (``torch-pruning``, the ``bench``
  extra), uniform per-layer ratio (attention heads pruned at the same ratio), output layer
  ignored, the ratio bisected so that its parameter count comes closest to lumos'. Its
  outputs are not those of the dense model (it prunes, it does not compact exactly);
- **latency**: CPU median over repeated calls under ``torch.inference_mode()``, dense vs
  lumos compacted vs Torch-Pruning pruned, on one batch of ``--batch`` inputs of the example size.

Run::

    python bench/bench_coverage.py --out bench/results/coverage-cpu.md

writes the markdown table there and the same rows, the settings and the command as JSON next
to it (``coverage-cpu.json``). pytest collects this file too (``bench/conftest.py``):
``test_coverage_row`` checks one row per model at scale 1, untimed, and ``test_inference_latency``
times dense / lumos / Torch-Pruning at scale 1, batch 32, with pytest-benchmark.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys
import time
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

import lumos
from lumos.evaluation.baselines import output_layers
from bench_compaction import measure, n_params

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from zoo_architectures import (architectures, close_half_of_every_gate, gated_layer_params,  # noqa: E402
                               relative_error)

REL_TOL = 1e-5           # float32, compacted vs gated eval on fresh inputs
BISECTION_STEPS = 10     # Torch-Pruning ratio search
MAX_TP_RATIO = 0.9       # Torch-Pruning's per-layer pruning ratio stays below this
CLOSE_SEED = 0


def _error_text(err: Exception) -> str:
    text = str(err).strip().splitlines()[0] if str(err).strip() else ""
    return f"{type(err).__name__}: {text[:160]}"


def lumos_result(arch, dense: nn.Module, example: tuple, fresh: tuple) -> dict:
    """Gate ``dense``, close half of every gate, compact, check against the gated model."""
    result = {"gated_fraction": None, "skipped": None, "kept_fraction": None, "rel_error": None,
              "error": None, "compacted": None}
    try:
        gated = lumos.gate(dense, example, feature_dim=arch.feature_dim)
    except Exception as err:
        result["error"] = f"lumos.gate failed: {_error_text(err)}"
        return result
    result["gated_fraction"] = gated_layer_params(gated) / n_params(dense)
    result["skipped"] = len(gated.skipped)
    close_half_of_every_gate(gated, seed=CLOSE_SEED)
    gated.eval()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            compacted = lumos.compact(gated, example)
        with torch.inference_mode():
            errors = [relative_error(compacted(*x), gated(*x)) for x in (example, fresh)]
    except Exception as err:
        result["error"] = f"lumos.compact failed: {_error_text(err)}"
        return result
    result["rel_error"] = max(errors)
    if not result["rel_error"] <= REL_TOL:
        result["error"] = f"compacted model differs from the gated one (relative error {result['rel_error']:.1e})"
        return result
    result["kept_fraction"] = n_params(compacted) / n_params(dense)
    result["compacted"] = compacted
    return result


def prune_with_torch_pruning(dense: nn.Module, example: tuple, ratio: float) -> nn.Module:
    """A copy of ``dense`` pruned by Torch-Pruning (DepGraph, L1 magnitude) at ``ratio`` per layer."""
    try:
        import torch_pruning as tp
    except ImportError as err:  # pragma: no cover - optional
        raise ImportError("bench_coverage: Torch-Pruning is not installed; pip install -e '.[bench]'") from err
    model = copy.deepcopy(dense)
    heads = {m: m.num_heads for m in model.modules() if isinstance(m, nn.MultiheadAttention)}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pruner = tp.pruner.MetaPruner(
            model, example[0] if len(example) == 1 else example, tp.importance.MagnitudeImportance(p=1),
            pruning_ratio=ratio, ignored_layers=output_layers(model, example), num_heads=heads,
            prune_num_heads=bool(heads), prune_head_dims=False, head_pruning_ratio=ratio)
        pruner.step()
    return model.eval()


def torch_pruning_result(dense: nn.Module, example: tuple, fresh: tuple, target_params: int | None) -> dict:
    """Torch-Pruning at the per-layer ratio whose parameter count comes closest to ``target_params``
    (bisection; ``None``: no lumos target, ratio 0.5)."""
    result = {"ratio": None, "kept_fraction": None, "error": None, "pruned": None, "note": ""}
    try:
        if target_params is None:
            ratio, pruned = 0.5, prune_with_torch_pruning(dense, example, 0.5)
            result["note"] = "ratio 0.5 (no lumos target)"
        else:
            ratio, pruned = _bisect_ratio(dense, example, target_params)
        with torch.inference_mode():
            pruned(*fresh)  # it runs on inputs it was not traced with
    except Exception as err:
        result["error"] = f"Torch-Pruning failed: {_error_text(err)}"
        return result
    result.update(ratio=ratio, kept_fraction=n_params(pruned) / n_params(dense), pruned=pruned)
    if target_params is not None and abs(n_params(pruned) - target_params) > 0.05 * target_params:
        limit = f" at its largest ratio, {MAX_TP_RATIO}" if ratio == MAX_TP_RATIO else ""
        result["note"] = f"nearest count it reaches{limit} is {n_params(pruned) / target_params:.2f}x lumos'"
    return result


def _bisect_ratio(dense: nn.Module, example: tuple, target_params: int) -> tuple[float, nn.Module]:
    low, high = 0.0, MAX_TP_RATIO
    best = (0.0, copy.deepcopy(dense).eval())
    for _ in range(BISECTION_STEPS):
        ratio = (low + high) / 2
        pruned = prune_with_torch_pruning(dense, example, ratio)
        if abs(n_params(pruned) - target_params) < abs(n_params(best[1]) - target_params):
            best = (ratio, pruned)
        if n_params(pruned) > target_params:
            low = ratio
        else:
            high = ratio
    if abs(n_params(best[1]) - target_params) > 0.01 * target_params:  # the bound itself may be closest
        pruned = prune_with_torch_pruning(dense, example, MAX_TP_RATIO)
        if abs(n_params(pruned) - target_params) < abs(n_params(best[1]) - target_params):
            best = (MAX_TP_RATIO, pruned)
    return best


def median_latency_ms(model: nn.Module, inputs: tuple, seconds: float, min_calls: int = 10) -> float:
    """Median wall time of ``model(*inputs)`` in ms (3 warm-up calls, then about ``seconds`` of calls)."""
    with torch.inference_mode():
        for _ in range(3):
            model(*inputs)
        times, start = [], time.perf_counter()
        while len(times) < min_calls or time.perf_counter() - start < seconds:
            t0 = time.perf_counter()
            model(*inputs)
            times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times)


def prepared(arch, scale: int) -> dict:
    """The dense model, lumos' result and Torch-Pruning's at lumos' parameter count."""
    dense = arch.build(scale=scale)
    example, fresh = arch.example_inputs(), arch.fresh_inputs()
    ours = lumos_result(arch, dense, example, fresh)
    target = n_params(ours["compacted"]) if ours["compacted"] is not None else None
    return {"dense": dense, "lumos": ours, "torch_pruning": torch_pruning_result(dense, example, fresh, target)}


def coverage_row(arch, scale: int, batch: int, seconds: float | None) -> dict:
    """One architecture's row (no latency when ``seconds`` is None)."""
    models = prepared(arch, scale)
    dense, ours, theirs = models["dense"], models["lumos"], models["torch_pruning"]
    row = {"architecture": arch.name, "dense_params": n_params(dense),
           "lumos_gated_fraction": ours["gated_fraction"], "lumos_skipped_layers": ours["skipped"],
           "lumos_kept_fraction": ours["kept_fraction"], "lumos_rel_error": ours["rel_error"],
           "lumos_error": ours["error"], "tp_ratio": theirs["ratio"], "tp_kept_fraction": theirs["kept_fraction"],
           "tp_error": theirs["error"], "tp_note": theirs["note"],
           "dense_ms": None, "lumos_ms": None, "tp_ms": None}
    if seconds is not None:
        timed = arch.example_inputs(batch)
        row["dense_ms"] = median_latency_ms(dense, timed, seconds)
        if ours["compacted"] is not None:
            row["lumos_ms"] = median_latency_ms(ours["compacted"], timed, seconds)
        if theirs["pruned"] is not None:
            row["tp_ms"] = median_latency_ms(theirs["pruned"], timed, seconds)
    return row


def _pct(x):
    return "—" if x is None else f"{100 * x:.1f}%"


def _ms(x):
    return "—" if x is None else f"{x:.3f}"


def to_markdown(rows: list[dict], settings: dict) -> str:
    lines = [
        f"# Compaction coverage on the architecture zoo (CPU)",
        "",
        f"Command: `{settings['command']}`  ",
        f"Widths x{settings['scale']}; latency: median over about {settings['seconds']} s of calls, batch "
        f"{settings['batch']}, {settings['threads']} torch thread(s), torch {settings['torch']}, "
        f"load average {settings['load_average_1min']:.2f} on {settings['cpus']} CPUs at the start; "
        f"Torch-Pruning {settings['torch_pruning']}.",
        "",
        "lumos: half of every gate closed at random (seed 0), compacted model checked equal to the gated "
        f"model (relative error <= {REL_TOL:.0e}) on fresh inputs of another batch size and size. "
        "Torch-Pruning: DepGraph, L1 magnitude, per-layer ratio bisected to lumos' parameter count "
        "(not exact: it prunes, its outputs differ from the dense model's).",
        "",
        "| architecture | dense params | params in gated layers | lumos compacted params | dense ms | "
        "lumos ms | Torch-Pruning params | Torch-Pruning ms | notes |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        notes = "; ".join(n for n in (r["lumos_error"], r["tp_error"], r["tp_note"] and f"TP: {r['tp_note']}") if n)
        lines.append(f"| {r['architecture']} | {r['dense_params']} | {_pct(r['lumos_gated_fraction'])} | "
                     f"{_pct(r['lumos_kept_fraction'])} | {_ms(r['dense_ms'])} | {_ms(r['lumos_ms'])} | "
                     f"{_pct(r['tp_kept_fraction'])} | {_ms(r['tp_ms'])} | {notes.replace('|', '/')} |")
    return "\n".join(lines) + "\n"


def _settings(args, command: str) -> dict:
    import torch_pruning as tp

    return {"command": command, "scale": args.scale, "batch": args.batch, "seconds": args.seconds,
            "threads": torch.get_num_threads(), "torch": torch.__version__, "torch_pruning": tp.__version__,
            "cpus": os.cpu_count(), "load_average_1min": os.getloadavg()[0], "close_seed": CLOSE_SEED,
            "rel_tol": REL_TOL}


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, help="markdown table to write (and its .json beside it)")
    parser.add_argument("--scale", type=int, default=4, help="width multiplier of the zoo models (default 4)")
    parser.add_argument("--batch", type=int, default=32, help="batch size of the timed inputs (default 32)")
    parser.add_argument("--seconds", type=float, default=2.0, help="seconds of calls per latency (default 2)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads while timing (default 1)")
    parser.add_argument("--only", nargs="*", help="architectures to run (default: all)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    command = "python bench/bench_coverage.py " + " ".join(argv if argv is not None else sys.argv[1:])
    settings = _settings(args, command.strip())
    zoo = architectures()
    names = args.only or list(zoo)
    rows = []
    for name in names:
        rows.append(coverage_row(zoo[name], args.scale, args.batch, args.seconds))
        print(f"{name}: done", file=sys.stderr)
    table = to_markdown(rows, settings)
    print(table)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(table)
        args.out.with_suffix(".json").write_text(json.dumps({"settings": settings, "rows": rows}, indent=2) + "\n")
    return rows


# -- pytest ------------------------------------------------------------------------------------------
ZOO = architectures()
TIMED_BATCH = 32


@pytest.mark.parametrize("name", list(ZOO))
def test_coverage_row(name):
    """One row at scale 1, untimed: numbers only where lumos compacted exactly."""
    pytest.importorskip("torch_pruning")
    row = coverage_row(ZOO[name], scale=1, batch=4, seconds=None)
    if row["lumos_error"] is None:
        assert 0 < row["lumos_kept_fraction"] <= 1 and row["lumos_rel_error"] <= REL_TOL
    else:
        assert row["lumos_kept_fraction"] is None
    assert (row["tp_error"] is None) == (row["tp_kept_fraction"] is not None)


@pytest.fixture(scope="module", params=list(ZOO))
def timed_models(request):
    pytest.importorskip("torch_pruning")
    arch = ZOO[request.param]
    models = prepared(arch, scale=1)
    return {"name": arch.name, "dense": models["dense"], "lumos": models["lumos"]["compacted"],
            "torch_pruning": models["torch_pruning"]["pruned"], "inputs": arch.example_inputs(TIMED_BATCH)}


@pytest.mark.parametrize("variant", ["dense", "lumos", "torch_pruning"])
def test_inference_latency(benchmark, timed_models, variant):
    model = timed_models[variant]
    if model is None:
        pytest.skip(f"{timed_models['name']}: no {variant} model (see bench_coverage.py's table)")
    benchmark.group = f"coverage-{timed_models['name']}-batch-{TIMED_BATCH}"
    benchmark.extra_info.update(variant=variant, params=n_params(model), threads=torch.get_num_threads())
    with torch.inference_mode():
        measure(benchmark, model, *timed_models["inputs"])


if __name__ == "__main__":
    main()
