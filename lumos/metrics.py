"""Measurements users can trust: parameters, FLOPs, latency, peak memory, energy.

Energy is read from NVML on NVIDIA GPUs when ``pynvml`` is installed; everywhere else it is
reported as unavailable, never estimated.
"""
from __future__ import annotations

import statistics
import time

import torch
from torch import nn

from .report import count_flops, count_params

__all__ = ["count_flops", "count_params", "energy_joules", "latency", "peak_memory_bytes", "r2_score"]


def r2_score(pred: torch.Tensor, target: torch.Tensor) -> float:
    """Coefficient of determination, averaged over target columns. Shapes ``(n, k)`` or ``(n,)``."""
    pred, target = pred.reshape(target.shape[0], -1).double(), target.reshape(target.shape[0], -1).double()
    residual = ((target - pred) ** 2).sum(0)
    total = ((target - target.mean(0)) ** 2).sum(0).clamp_min(1e-300)
    return float((1 - residual / total).mean())


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.inference_mode()
def latency(model: nn.Module, inputs: tuple | torch.Tensor, repeats: int = 50, warmup: int = 5) -> dict:
    """Wall-clock time of ``model(*inputs)`` in eval mode: median and 20th/80th percentiles (ms)."""
    inputs = (inputs,) if isinstance(inputs, torch.Tensor) else tuple(inputs)
    if repeats < 1:
        raise ValueError(f"latency: `repeats` must be >= 1, got {repeats}")
    device = inputs[0].device
    was_training = model.training
    model.eval()
    for _ in range(warmup):
        model(*inputs)
    _sync(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        model(*inputs)
        _sync(device)
        times.append((time.perf_counter() - start) * 1e3)
    model.train(was_training)
    q = statistics.quantiles(times, n=5) if len(times) > 1 else [times[0]] * 4
    return {"median_ms": statistics.median(times), "p20_ms": q[0], "p80_ms": q[3], "repeats": repeats,
            "threads": torch.get_num_threads(), "device": str(device)}


def peak_memory_bytes(model: nn.Module, inputs: tuple | torch.Tensor) -> int | None:
    """Peak CUDA memory of one forward (bytes); None on CPU, where torch does not track it."""
    inputs = (inputs,) if isinstance(inputs, torch.Tensor) else tuple(inputs)
    device = inputs[0].device
    if device.type != "cuda":
        return None
    torch.cuda.reset_peak_memory_stats(device)
    with torch.inference_mode():
        model(*inputs)
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device)


def energy_joules(model: nn.Module, inputs: tuple | torch.Tensor, repeats: int = 100) -> float | None:
    """Energy per forward (J) from NVML's energy counter; None where it cannot be measured."""
    inputs = (inputs,) if isinstance(inputs, torch.Tensor) else tuple(inputs)
    device = inputs[0].device
    if device.type != "cuda":
        return None
    try:
        import pynvml
    except ImportError:
        return None
    pynvml.nvmlInit()
    handle = pynvml.nvmlDeviceGetHandleByIndex(device.index or 0)
    with torch.inference_mode():
        torch.cuda.synchronize(device)
        start = pynvml.nvmlDeviceGetTotalEnergyConsumption(handle)  # millijoules
        for _ in range(repeats):
            model(*inputs)
        torch.cuda.synchronize(device)
        end = pynvml.nvmlDeviceGetTotalEnergyConsumption(handle)
    return (end - start) / 1e3 / repeats
