"""Inputs shaped unlike the example one, which the model accepts: another batch size and, where
the model allows it, another spatial or sequence size.

Channel planning checks on them that every shape-dependent op (a ``view``, a ``reshape``) means
the same for every input shape, not only the example's; :func:`lumos.compact` runs the gated and
the compacted model on them before it returns.
"""
from __future__ import annotations

from typing import Callable

import torch

ALT_BATCH = (3, 2)  # another batch size: the first of these that differs from the example's


def _cycled(t: torch.Tensor, sizes: dict[int, int], generator: torch.Generator) -> torch.Tensor:
    """``t`` resized to ``sizes`` (dim -> size) by cycling its entries along each dim, plus a
    little noise for floating-point tensors (so that repeated rows still differ)."""
    for dim, size in sizes.items():
        index = torch.arange(size, device=t.device) % t.shape[dim]
        t = t.index_select(dim, index)
    if t.is_floating_point():
        scale = t.detach().float().std().nan_to_num(1.0).clamp(min=1e-3) if t.numel() > 1 else 1.0
        noise = torch.randn(t.shape, generator=generator).to(t.device, t.dtype)
        t = t + 0.05 * scale * noise
    return t


def _resized(example_inputs: tuple, first_sizes: dict[int, int], generator) -> tuple:
    """Every tensor input resized where its dim matches the first input's (same index, same size)."""
    first = example_inputs[0]
    out = []
    for t in example_inputs:
        if not isinstance(t, torch.Tensor):
            out.append(t)
            continue
        sizes = {d: s for d, s in first_sizes.items() if d < t.dim() and t.shape[d] == first.shape[d]}
        out.append(_cycled(t, sizes, generator).detach())
    return tuple(out)


def alternative_inputs(run: Callable, example_inputs: tuple, feature_dim: int, seed: int = 0) -> list[tuple]:
    """Input tuples that ``run`` (the model, in eval mode) accepts, shaped unlike ``example_inputs``:
    first another batch size, then also every dim of the first input other than the batch and
    feature dims doubled. Candidates the model rejects are left out (an empty list is fine:
    then every input the model accepts has the example's shape, up to what it cannot tell)."""
    first = example_inputs[0]
    if first.dim() < 2 or any(isinstance(t, torch.Tensor) and not (t.is_floating_point() or t.dtype == torch.bool)
                              for t in example_inputs):
        return []  # unbatched, or integer inputs (graph indices) whose sizes are tied to each other
    generator = torch.Generator().manual_seed(seed)
    batch = next(b for b in ALT_BATCH if b != first.shape[0])
    feature = feature_dim % first.dim()
    spatial = {d: 2 * first.shape[d] for d in range(1, first.dim()) if d != feature}
    candidates = [{0: batch}]
    if spatial:
        candidates.append({0: batch, **spatial})
    accepted = []
    for sizes in candidates:
        inputs = _resized(example_inputs, sizes, generator)
        try:
            with torch.no_grad():
                run(*inputs)
        except Exception:  # noqa: BLE001 - any failure means "the model does not take this shape"
            continue
        accepted.append(inputs)
    return accepted
