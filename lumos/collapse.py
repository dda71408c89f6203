"""A gated model that no longer depends on its input: every unit of a gate on the input's path
is closed, so the model predicts a constant. :func:`lumos.fit` warns when training gets there;
:func:`lumos.compact` refuses such a model unless ``allow_constant=True``.
"""
from __future__ import annotations

import torch
from torch import nn

from .gates import gates_of


@torch.no_grad()
def closed_gates(model: nn.Module) -> list[str]:
    """Names of the gates whose eval mask closes every unit (one read-back)."""
    gates = gates_of(model)
    if not gates:
        return []
    any_open = torch.stack([gate.kept().any() for _, gate in gates]).cpu()
    return [name for (name, _), open_ in zip(gates, any_open.tolist()) if not open_]


@torch.no_grad()
def predicts_constant(model: nn.Module, inputs: tuple) -> bool:
    """Whether ``model`` in eval mode gives the same output for ``inputs`` and for the same
    inputs with the rows of the first one rolled (or, if that changes nothing, shifted by 1).

    A closed layer on the input's path makes every later value the same constant whatever the
    input, so the two outputs are equal up to the order of float sums; a model that reads its
    input differs by far more than the tolerance (``1e-6`` of the output's scale) on any data
    whose rows differ. ``inputs`` are a few rows the model accepts.
    """
    first = inputs[0]
    other = first.roll(1, 0)
    if torch.equal(other, first):
        other = first + 1
    was_training = model.training
    model.eval()
    try:
        out, out_other = model(*inputs), model(other, *inputs[1:])
    finally:
        model.train(was_training)
    if not isinstance(out, torch.Tensor) or out.shape != out_other.shape or not out.is_floating_point():
        return False
    scale = float(out.abs().max()) if out.numel() else 0.0
    return bool(torch.allclose(out, out_other, rtol=0.0, atol=1e-6 * max(scale, 1e-30)))


def constant_message(model: nn.Module) -> str:
    """Which gates closed, for the warning of ``fit`` and the refusal of ``compact``."""
    closed = closed_gates(model)
    named = ", ".join(f"`{name}`" for name in closed[:6]) + (f" and {len(closed) - 6} more" if len(closed) > 6 else "")
    return ("the model no longer depends on its input and predicts a constant"
            + (f": every unit of gate {named} is closed" if len(closed) == 1 else
               f": every unit of gates {named} is closed" if closed else ""))
