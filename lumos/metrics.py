"""Measurements users can trust: task metrics, parameters, FLOPs, latency, peak memory, energy.

Energy is read from a hardware counter (NVML on NVIDIA GPUs when ``pynvml`` is installed, RAPL
on Linux CPUs when ``/sys/class/powercap`` is readable); everywhere else it is reported as
unavailable, never estimated.
"""
from __future__ import annotations

import contextlib
import os
import statistics
import sys
import time

import torch
from torch import nn

from .report import count_flops, count_params

__all__ = ["accuracy", "count_flops", "count_params", "energy", "latency", "measure_inference", "mse",
           "paired_latency", "peak_memory", "r2_score"]


def r2_score(pred: torch.Tensor, target: torch.Tensor) -> float:
    """Coefficient of determination, averaged over target columns. Shapes ``(n, k)`` or ``(n,)``."""
    pred, target = pred.reshape(target.shape[0], -1).double(), target.reshape(target.shape[0], -1).double()
    residual = ((target - pred) ** 2).sum(0)
    total = ((target - target.mean(0)) ** 2).sum(0).clamp_min(1e-300)
    return float((1 - residual / total).mean())


def mse(pred: torch.Tensor, target: torch.Tensor) -> float:
    """Mean squared error over every element (float64 accumulation). Same shapes."""
    if pred.shape != target.shape:
        raise ValueError(f"lumos.metrics.mse: `pred` {tuple(pred.shape)} and `target` {tuple(target.shape)} differ")
    return float(((pred.double() - target.double()) ** 2).mean())


def accuracy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """Fraction of rows whose largest logit is the label. ``logits (n, classes)``, ``labels (n,)`` integer."""
    if logits.dim() != 2 or labels.shape != logits.shape[:1]:
        raise ValueError(f"lumos.metrics.accuracy: need logits (n, classes) and labels (n,), got "
                         f"{tuple(logits.shape)} and {tuple(labels.shape)}")
    return float((logits.argmax(dim=-1) == labels).double().mean())


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _as_tuple(inputs) -> tuple:
    return (inputs,) if isinstance(inputs, torch.Tensor) else tuple(inputs)


def _summary(times: list[float], inputs: tuple) -> dict:
    q = statistics.quantiles(times, n=5) if len(times) > 1 else [times[0]] * 4
    return {"median_ms": statistics.median(times), "p20_ms": q[0], "p80_ms": q[3], "repeats": len(times),
            "threads": torch.get_num_threads(), "device": str(inputs[0].device)}


@torch.inference_mode()
def _timings(models: list[nn.Module], inputs: tuple, repeats: int, warmup: int) -> list[list[float]]:
    """Wall-clock ms of ``repeats`` calls of each model in eval mode, the models taking turns (their
    order alternating every round) so that a change of machine load hits them alike."""
    if repeats < 1:
        raise ValueError(f"latency: `repeats` must be >= 1, got {repeats}")
    device = inputs[0].device
    modes = [m.training for m in models]
    for m in models:
        m.eval()
        for _ in range(warmup):
            m(*inputs)
    _sync(device)
    times = [[] for _ in models]
    for r in range(repeats):
        order = range(len(models)) if r % 2 == 0 else reversed(range(len(models)))
        for i in order:
            start = time.perf_counter()
            models[i](*inputs)
            _sync(device)
            times[i].append((time.perf_counter() - start) * 1e3)
    for m, mode in zip(models, modes):
        m.train(mode)
    return times


def latency(model: nn.Module, inputs: tuple | torch.Tensor, repeats: int = 50, warmup: int = 5) -> dict:
    """Wall-clock time of ``model(*inputs)`` in eval mode: median and 20th/80th percentiles (ms)."""
    inputs = _as_tuple(inputs)
    return _summary(_timings([model], inputs, repeats, warmup)[0], inputs)


def paired_latency(reference: nn.Module, model: nn.Module, inputs: tuple | torch.Tensor, repeats: int = 50,
                   warmup: int = 5) -> tuple[dict, dict]:
    """:func:`latency` of ``reference`` and of ``model``, timed in alternation (fair on a shared
    machine); ``reference_median / model_median`` is the speedup."""
    inputs = _as_tuple(inputs)
    ref_times, model_times = _timings([reference, model], inputs, repeats, warmup)
    return _summary(ref_times, inputs), _summary(model_times, inputs)


@contextlib.contextmanager
def _quiet_stderr():
    """Silence the C-level stderr (the profiler's start/stop lines) for the ``with`` block."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def _tensor_bytes(tensors) -> int:
    seen, total = set(), 0
    for t in tensors:
        if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in seen:
            seen.add(t.untyped_storage().data_ptr())
            total += t.untyped_storage().nbytes()
    return total


def _cpu_allocation_peak(model: nn.Module, inputs: tuple) -> int | None:
    """Peak of the bytes allocated and not yet freed during ``model(*inputs)``, from the
    allocation records of the torch profiler (``profile_memory=True``); None if unavailable."""
    from torch.profiler import ProfilerActivity, profile

    with _quiet_stderr(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        model(*inputs)
    try:
        events = prof.profiler.kineto_results.events()
    except AttributeError:  # pragma: no cover - the profiler's layout changed
        return None
    live = peak = 0
    for event in sorted((e for e in events if e.name() == "[memory]"), key=lambda e: e.start_ns()):
        live += event.nbytes()
        peak = max(peak, live)
    return peak


def peak_memory(model: nn.Module, inputs: tuple | torch.Tensor) -> dict:
    """Peak memory of one forward of ``model(*inputs)`` in inference mode (bytes): the model's
    parameters and buffers, the inputs, plus the peak of what the forward allocates on top
    (activations, workspaces, the output).

    The allocation peak comes from ``torch.cuda.max_memory_allocated`` minus what was allocated
    before the call on CUDA (``method="cuda_max_allocated"``), and from the torch profiler's
    record of every CPU allocation and free (``profile_memory=True``) on CPU
    (``method="cpu_profiler_allocations"``): tensor memory as torch's allocator hands it out,
    not the process's resident set. ``bytes`` is None (and ``method`` says why) where neither
    is available.

    Returns:
        ``{"bytes": int | None, "method": str}``.
    """
    inputs = _as_tuple(inputs)
    device = inputs[0].device
    resident = _tensor_bytes(list(model.parameters()) + list(model.buffers()) + list(inputs))
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            model(*inputs)  # warm-up: lazily built caches are not part of the forward's peak
            if device.type == "cuda":
                torch.cuda.synchronize(device)
                before = torch.cuda.memory_allocated(device)
                torch.cuda.reset_peak_memory_stats(device)
                model(*inputs)
                torch.cuda.synchronize(device)
                extra, method = torch.cuda.max_memory_allocated(device) - before, "cuda_max_allocated"
            else:
                extra, method = _cpu_allocation_peak(model, inputs), "cpu_profiler_allocations"
    finally:
        model.train(was_training)
    if extra is None:
        return {"bytes": None, "method": "unavailable: the torch profiler gave no allocation records"}
    return {"bytes": resident + int(extra), "method": method}


RAPL_ROOT = "/sys/class/powercap"


def _rapl_packages() -> list[str]:
    """The top-level RAPL package domains (``intel-rapl:0``...) whose energy counter is readable."""
    import glob
    import os

    found = []
    for domain in sorted(glob.glob(os.path.join(RAPL_ROOT, "intel-rapl:*"))):
        if domain.count(":") != 1:
            continue  # sub-domains (core, dram) are inside their package's count
        try:
            with open(os.path.join(domain, "energy_uj")) as counter:
                int(counter.read())
            found.append(domain)
        except (OSError, ValueError):
            continue
    return found


def _rapl_read(domain: str, name: str = "energy_uj") -> int:
    with open(f"{domain}/{name}") as counter:
        return int(counter.read())


def energy(model: nn.Module, inputs: tuple | torch.Tensor, repeats: int = 20) -> dict:
    """Energy per forward of ``model(*inputs)`` (joules), read from a hardware counter, never estimated.

    On CUDA: NVML's total-energy counter of the GPU (``pynvml`` needed; ``method="nvml"``). On
    Linux CPU: the RAPL package counters under ``/sys/class/powercap`` (``method="rapl"``; they
    count the whole CPU package, so other processes' work is included: compare on an idle
    machine). Where no counter can be read, ``joules`` is None and ``method`` says why.

    Returns:
        ``{"joules": float | None, "method": str, "repeats": int}``.
    """
    inputs = _as_tuple(inputs)
    device = inputs[0].device
    if device.type == "cuda":
        try:
            import pynvml
        except ImportError:
            return {"joules": None, "method": "unavailable: pynvml is not installed (pip install nvidia-ml-py)",
                    "repeats": repeats}
        pynvml.nvmlInit()
        handle = pynvml.nvmlDeviceGetHandleByIndex(device.index or 0)
        read = lambda: pynvml.nvmlDeviceGetTotalEnergyConsumption(handle) / 1e3  # noqa: E731 (mJ -> J)
        method = "nvml"
    else:
        domains = _rapl_packages()
        if not domains:
            return {"joules": None, "method": f"unavailable: no readable RAPL counter under {RAPL_ROOT}",
                    "repeats": repeats}
        ranges = [_rapl_read(d, "max_energy_range_uj") for d in domains]
        read = lambda: [_rapl_read(d) for d in domains]  # noqa: E731 (microjoules)
        method = "rapl"
    was_training = model.training
    model.eval()
    with torch.inference_mode():
        model(*inputs)  # warm-up
        _sync(device)
        start = read()
        for _ in range(repeats):
            model(*inputs)
        _sync(device)
        end = read()
    model.train(was_training)
    if method == "nvml":
        joules = end - start
    else:  # each counter wraps around at its max_energy_range_uj
        joules = sum((e - s) % r for s, e, r in zip(start, end, ranges)) / 1e6
    return {"joules": joules / repeats, "method": method, "repeats": repeats}


def measure_inference(model: nn.Module, inputs: tuple | torch.Tensor, repeats: int = 50,
                      reference: nn.Module | None = None) -> dict:
    """Latency (:func:`latency`), peak memory (:func:`peak_memory`) and energy (:func:`energy`)
    of ``model(*inputs)``, in one dict: ``latency``, ``memory``, ``energy``. With a
    ``reference`` model, the two are timed in alternation (:func:`paired_latency`), the
    reference's latency is added as ``reference_latency`` and ``speedup`` is reference median /
    model median."""
    out = {}
    if reference is None:
        out["latency"] = latency(model, inputs, repeats=repeats)
    else:
        out["reference_latency"], out["latency"] = paired_latency(reference, model, inputs, repeats=repeats)
        out["speedup"] = out["reference_latency"]["median_ms"] / out["latency"]["median_ms"]
    out["memory"] = peak_memory(model, inputs)
    out["energy"] = energy(model, inputs, repeats=max(1, repeats // 2))
    return out
