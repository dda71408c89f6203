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


def alternative_inputs(run: Callable, example_inputs: tuple, feature_dim: int | None, seed: int = 0) -> list[tuple]:
    """Input tuples that ``run`` (the model, in eval mode) accepts, shaped unlike ``example_inputs``:
    first another batch size, then also every dim of the first input other than the batch and
    feature dims (None: no feature dim) doubled (all together, or, where the model refuses that, each alone). Integer
    inputs are resized the same way (their entries cycled, so category ids stay valid).
    Candidates the model rejects are left out (an empty list is fine: then every input the model
    accepts has the example's shape, up to what it cannot tell; graph indices whose values name
    rows of another input are usually such a case)."""
    first = example_inputs[0]
    if first.dim() < 2:
        return []  # unbatched
    generator = torch.Generator().manual_seed(seed)
    batch = next(b for b in ALT_BATCH if b != first.shape[0])
    feature = feature_dim % first.dim() if feature_dim is not None else None
    spatial = {d: 2 * first.shape[d] for d in range(1, first.dim()) if d != feature}
    accepted = [inputs for inputs in [_resized(example_inputs, {0: batch}, generator)] if _accepts(run, inputs)]
    if spatial:
        together = _resized(example_inputs, {0: batch, **spatial}, generator)
        if _accepts(run, together):
            accepted.append(together)
        elif len(spatial) > 1:  # e.g. images whose channel dim is not the feature dim given: each dim alone
            for d, size in spatial.items():
                alone = _resized(example_inputs, {0: batch, d: size}, generator)
                if _accepts(run, alone):
                    accepted.append(alone)
    return accepted


def _accepts(run: Callable, inputs: tuple) -> bool:
    try:
        with torch.no_grad():
            run(*inputs)
    except Exception:  # noqa: BLE001 - any failure means "the model does not take this shape"
        return False
    return True
