"""``lumos bench``: every built-in workload with lumos, the dense model and peer pruning methods.

Protocol: every method trains ``2 * E + F`` epochs in all (``E``, ``F``: the workload's
``epochs`` and ``fine_tune_epochs``); ``PROTOCOL`` is written into the results.

- dense: ``E`` epochs, then ``E + F`` more (the reference).
- lumos: a gated copy of the same initial model trains ``2 * E`` epochs towards keeping
  ``target`` of the parameters, is compacted, and fine-tuned ``F`` epochs.
- ``l1_structured``, ``torch_pruning``, ``unstructured_mask``: the dense model after ``E``
  epochs is pruned to lumos' kept-parameter fraction and fine-tuned ``E + F`` epochs.

Every phase keeps its best epoch on the validation split; metrics are on the test split.
Inference is timed on CPU (median of ``repeats`` forwards of one batch, the batch stated).
"""
from __future__ import annotations

import datetime
import os
import platform
import time
from pathlib import Path

import torch
from torch import nn

from .. import workloads
from ..compact import CompactionError
from ..metrics import measure_inference
from ..pipeline import LumosOutcome, example_inputs, flops_per_sample, inference_inputs, batch_label, run_lumos
from ..report import count_params
from . import baselines
from .training import evaluate_split, train

METHODS = ("dense", "lumos", "l1_structured", "torch_pruning", "unstructured_mask")
PARAMS_TOLERANCE = 0.05  # a baseline's kept fraction must be within 5% (relative) of lumos'
PROTOCOL = (
    "every method trains 2E + F epochs (E, F: the workload's epochs and fine_tune_epochs for its size). "
    "dense: E epochs, then E + F more. lumos: a gated copy of the same initial model trains 2E epochs "
    "towards the target, is compacted and fine-tuned F epochs. l1_structured / torch_pruning / "
    "unstructured_mask: the dense model after E epochs is pruned to lumos' kept-parameter fraction and "
    "fine-tuned E + F epochs. Every phase keeps its best validation epoch; metrics are on the test split."
)


def relative_loss(metric: float, dense: float, higher_is_better: bool) -> float:
    """How much worse ``metric`` is than ``dense``, as a fraction of ``|dense|`` (negative: better)."""
    worse = dense - metric if higher_is_better else metric - dense
    return worse / max(abs(dense), 1e-12)


def layer_widths(model: nn.Module) -> list[int]:
    """Output width of every linear and conv layer of ``model``, in module order (what a structured
    method kept)."""
    return [m.out_features if isinstance(m, nn.Linear) else m.out_channels for m in model.modules()
            if isinstance(m, (nn.Linear, nn.modules.conv._ConvNd))]


def _row(work: workloads.Workload, method: str, *, seed: int, target: float, model: nn.Module | None,
         dense: dict, train_seconds: float | None, features_kept: list[str] | None, params_kept: float | None = None,
         flops_kept: float | None = None, skipped: str | None = None, note: str = "", repeats: int = 50) -> dict:
    """One results row; ``dense`` holds the dense model's metric, inference and training time."""
    row = {
        "workload": work.name, "size": work.size, "seed": seed, "target": target, "method": method,
        "metric_name": work.metric_name, "higher_is_better": work.higher_is_better,
        "metric_dense": dense["metric"], "relevant_features": list(work.informative_features),
        "skipped": skipped, "note": note,
    }
    if model is None:
        return {**row, "metric": None, "params": None, "params_kept": None, "flops_kept": None,
                "cpu_speedup": None, "train_time_ratio": None, "features_kept": None}
    batch = inference_inputs(work)
    if method == "dense":
        inference, speedup = dense["inference"], 1.0
    else:  # timed in alternation with the dense model: fair under a changing machine load
        inference = measure_inference(model, batch, repeats, reference=dense["model"])
        speedup = inference["speedup"]
    metric = evaluate_split(model, work, "test")
    params = count_params(model)
    kept_features = features_kept if features_kept is not None else list(work.feature_names)
    row.update({
        "metric": metric,
        "relative_loss": relative_loss(metric, dense["metric"], work.higher_is_better),
        "params": params,
        "params_kept": params_kept if params_kept is not None else params / dense["params"],
        "flops_kept": flops_kept if flops_kept is not None
        else flops_per_sample(work, model, example_inputs(work)) / dense["flops"],
        "cpu_speedup": speedup,
        "latency_ms": inference["latency"]["median_ms"],
        "latency_batch": batch_label(work, batch),
        "threads": inference["latency"]["threads"],
        "peak_memory_bytes": inference["memory"]["bytes"], "memory_method": inference["memory"]["method"],
        "energy_j": inference["energy"]["joules"], "energy_method": inference["energy"]["method"],
        "train_seconds": train_seconds,
        "train_time_ratio": train_seconds / dense["train_seconds"] if train_seconds is not None else None,
        "layer_widths": layer_widths(model),
        "features_kept": kept_features,
        "features_correct": sorted(kept_features) == sorted(work.informative_features),
    })
    return row


def _baseline(method: str, outcome: LumosOutcome, fraction: float, dense_params: int):
    """The pruned (not fine-tuned) model of ``method`` at ``fraction`` of the dense parameters,
    its kept fraction, and a note."""
    start_model, example = outcome.dense_checkpoint, example_inputs(outcome.work)
    if method == "unstructured_mask":
        model = baselines.unstructured_mask(start_model, fraction)
        return model, baselines.nonzero_params(model) / dense_params, "zeros stay in dense tensors"
    search = (baselines.L1Structured(start_model, example) if method == "l1_structured"
              else baselines.torch_pruning(start_model, example))
    model, ratio, kept = baselines.match_fraction(search, fraction, dense_params)
    return model, kept, f"ratio {ratio:.3f}"


BASELINES = METHODS[2:]


def bench_workload(name: str, *, size: str = "small", seed: int = 0, target: float = 0.2,
                   baselines_to_run=BASELINES, repeats: int = 50, progress: bool = False, log=print) -> list[dict]:
    """The rows of ``dense``, ``lumos`` and each of ``baselines_to_run`` on workload ``name`` (see the
    module docstring)."""
    work = workloads.load(name, size, seed=seed)
    try:
        outcome = run_lumos(work, target=target, cost="params", seed=seed, progress=progress, log=log)
    except CompactionError as err:  # e.g. the gated model collapsed to a constant: reported, not fatal
        log(f"[lumos] {name}: {err}")
        return [_row(work, "lumos", seed=seed, target=target, model=None, dense={"metric": None},
                     train_seconds=None, features_kept=None, skipped=f"CompactionError: {err}")]
    fine_tune_epochs = work.fit_defaults["epochs"] + work.fit_defaults["fine_tune_epochs"]
    phases = outcome.phases
    dense_seconds = phases["dense"].seconds + phases["dense_more"].seconds
    dense = {"metric": evaluate_split(outcome.dense, work, "test"), "params": count_params(outcome.dense),
             "flops": flops_per_sample(work, outcome.dense, example_inputs(work)),
             "inference": measure_inference(outcome.dense, inference_inputs(work), repeats),
             "train_seconds": dense_seconds, "model": outcome.dense}
    common = dict(seed=seed, target=target, dense=dense, repeats=repeats)
    rows = [_row(work, "dense", model=outcome.dense, train_seconds=dense_seconds, features_kept=None,
                 params_kept=1.0, flops_kept=1.0, **common)]
    lumos_seconds = phases["gated"].seconds + (phases["fine_tune"].seconds if "fine_tune" in phases else 0.0)
    rows.append(_row(work, "lumos", model=outcome.fine_tuned, train_seconds=lumos_seconds,
                     features_kept=outcome.report.kept_features, **common))
    fraction = rows[-1]["params_kept"]
    for method in baselines_to_run:
        log(f"[{method}] pruning to {fraction:.1%} of the parameters, fine-tuning {fine_tune_epochs} epochs")
        start = time.perf_counter()
        try:
            model, kept, note = _baseline(method, outcome, fraction, dense["params"])
        except ImportError as err:
            rows.append(_row(work, method, model=None, train_seconds=None, features_kept=None,
                             skipped=str(err), **common))
            continue
        except Exception as err:  # a method that cannot handle this model is reported, not fatal
            rows.append(_row(work, method, model=None, train_seconds=None, features_kept=None,
                             skipped=f"{type(err).__name__}: {err}", **common))
            continue
        prune_seconds = time.perf_counter() - start
        phase = train(model, work, fine_tune_epochs, name=method, seed=seed + 1)
        if method == "unstructured_mask":
            baselines.make_masks_permanent(model)
        if abs(kept - fraction) > PARAMS_TOLERANCE * fraction:
            note += f"; kept {kept:.1%} is outside lumos' {fraction:.1%} +-{PARAMS_TOLERANCE:.0%}"
        seconds = phases["dense"].seconds + prune_seconds + phase.seconds
        rows.append(_row(work, method, model=model, train_seconds=seconds, features_kept=None, params_kept=kept,
                         flops_kept=1.0 if method == "unstructured_mask" else None, note=note, **common))
    return rows


def load_average() -> list[float] | None:
    """The machine's 1, 5 and 15 minute load averages (None where the OS has none): how busy the
    machine was while the timings were taken."""
    try:
        return [round(value, 2) for value in os.getloadavg()]
    except (AttributeError, OSError):
        return None


def machine() -> dict:
    """What the numbers were measured on."""
    return {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "torch": torch.__version__, "threads": torch.get_num_threads(), "python": platform.python_version()}


def run_bench(names: list[str] | None = None, *, size: str = "small", seeds=(0,), targets=(0.2,),
              baselines_to_run=BASELINES, out_dir: str | Path = "lumos-bench", repeats: int = 50, command: str = "",
              note: str = "", progress: bool = False, log=print) -> dict:
    """Bench ``names`` (default: every workload) for each seed and target with the dense model,
    lumos and ``baselines_to_run`` (a subset of :data:`BASELINES`); write ``results.md``,
    ``results.json`` and (with matplotlib) ``results.png`` into ``out_dir``; ``note`` is printed
    under the title of ``results.md`` (e.g. what the numbers are a snapshot of).

    Returns:
        The results dict written to ``results.json`` (``rows``, ``protocol``, ``machine``...), plus
        ``files``: the paths written.
    """
    names = list(names or workloads.available())
    for name in names:
        workloads.describe(name)  # unknown names fail before any training
    unknown = sorted(set(baselines_to_run) - set(BASELINES))
    if unknown:
        raise ValueError(f"lumos.evaluation.run_bench: unknown baseline(s) {', '.join(unknown)}; "
                         f"known: {', '.join(BASELINES)}")
    started, load_at_start = time.perf_counter(), load_average()
    rows = []
    for name in names:
        for seed in seeds:
            for target in targets:
                log(f"== {name} ({size}), seed {seed}, target {target:.0%} of parameters")
                rows += bench_workload(name, size=size, seed=seed, target=target, baselines_to_run=baselines_to_run,
                                       repeats=repeats, progress=progress, log=log)
    results = {"command": command, "note": note, "size": size, "seeds": list(seeds), "targets": list(targets),
               "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
               "wall_seconds": time.perf_counter() - started, "machine": machine(),
               "load_average": {"start": load_at_start, "end": load_average()}, "protocol": PROTOCOL,
               "rows": rows}
    from .results import write_results
    results["files"] = write_results(results, out_dir, log)
    return results


__all__ = ["BASELINES", "METHODS", "PROTOCOL", "bench_workload", "relative_loss", "run_bench"]
