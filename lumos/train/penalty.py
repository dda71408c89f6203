"""The L0 penalty, the kept fraction, and the optimiser parameter groups for a gated model."""
from __future__ import annotations

import torch
from torch import nn

from ..cost import check_cost, cost_model
from ..gates import gates_of

# Gate logits travel about 5 units between "open" and "closed" while weights move by about the
# learning rate per step: with Adam (whose steps are about `lr` whatever the gradient's scale)
# the gates need a larger step to close within a run. README "The gates" has the experiment.
GATE_LR_SCALE = 20.0


def check_gated(model: nn.Module, who: str) -> None:
    """Raise a clear error unless ``model`` is a module holding lumos gates."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"{who}: `model` must be an nn.Module, got {type(model).__name__}")
    if not gates_of(model):
        raise ValueError(f"{who}: the model has no lumos gates; make it with lumos.gate(model, example_inputs)")


def check_finite_gates(model: nn.Module, who: str) -> None:
    """Raise a clear error naming the first gate whose ``log_alpha`` holds NaN or inf (one host sync)."""
    gates = gates_of(model)
    finite = torch.stack([torch.isfinite(g.log_alpha).all() for _, g in gates]).cpu()
    if not bool(finite.all()):
        name, gate = gates[int((~finite).nonzero()[0])]
        bad = (~torch.isfinite(gate.log_alpha)).nonzero()[0].tolist()
        raise ValueError(f"{who}: gate `{name}` has a non-finite log_alpha (first at unit {bad[0]}: "
                         f"{float(gate.log_alpha.detach()[bad[0]])}); training diverged: lower the "
                         "learning rate or restore an earlier checkpoint")


def penalty(model: nn.Module, cost: str = "count", normalize: bool = False) -> torch.Tensor:
    """The L0 complexity term ``L_C`` to add (times a weight) to the task loss.

    Args:
        model: a gated model (from :func:`lumos.gate`).
        cost: ``"count"``: expected number of open gates (the paper's ``sum_j p_open_j``);
            ``"params"`` / ``"flops"``: expected parameters / FLOPs per sample of the model
            given every gate's ``p_open`` (each gate weighted by what it controls).
        normalize: divide by the dense model's cost, giving the expected fraction kept.

    Returns:
        A differentiable scalar tensor. NaN or inf in a gate's ``log_alpha`` is refused with an
        error naming the gate (this check reads one value back from the device;
        :class:`lumos.BudgetController` skips it).
    """
    check_gated(model, "lumos.penalty")
    check_cost(cost, "lumos.penalty")
    check_finite_gates(model, "lumos.penalty")
    costs = cost_model(model)
    value = costs.expected(cost)
    return value / costs.dense[cost] if normalize else value


def kept_fraction(model: nn.Module, cost: str = "params") -> float:
    """Fraction of the dense model's cost that the gates' eval masks keep (no gradient)."""
    check_gated(model, "lumos.kept_fraction")
    check_cost(cost, "lumos.kept_fraction")
    costs = cost_model(model)
    return costs.actual(cost) / costs.dense[cost]


def min_fraction(model: nn.Module, cost: str = "params") -> float:
    """The smallest fraction of the dense ``cost`` the gates can reach (every gate closed):
    what the layers lumos keeps whole cost (``cost_model(model).whole`` names them)."""
    check_gated(model, "lumos.min_fraction")
    check_cost(cost, "lumos.min_fraction")
    costs = cost_model(model)
    return costs.minimum[cost] / costs.dense[cost]


def param_groups(model: nn.Module, lr: float, gate_lr: float | None = None) -> list[dict]:
    """Optimiser parameter groups for a gated model: its weights at ``lr``, its gate logits at
    ``gate_lr`` (default ``GATE_LR_SCALE * lr``, 20x).

    Usage: ``torch.optim.Adam(lumos.param_groups(gated, lr=1e-3))``. A gate logit must travel
    about 5 units from open to closed; with Adam each step moves it by about its learning
    rate, so at the weights' rate a run of a few thousand steps could not close a gate.

    The logits' group asks for the optimiser's fused implementation (``fused=True``,
    ``foreach=False``) where every logit is a floating tensor on a device with fused kernels: one
    gate is one small tensor, and on CPU torch's default steps them one by one (Adam on the four
    gates of ``bench/bench_training.py``'s MLP: 126 us, fused 53 us, the same numbers to rounding);
    Adam, AdamW, SGD and Adagrad read the keys, the others ignore them. The weights' group keeps
    the optimiser's own choice.
    """
    if not isinstance(lr, (int, float)) or not lr > 0:
        raise ValueError(f"lumos.param_groups: `lr` must be a positive number, got {lr!r}")
    gate_lr = GATE_LR_SCALE * lr if gate_lr is None else gate_lr
    if not isinstance(gate_lr, (int, float)) or not gate_lr > 0:
        raise ValueError(f"lumos.param_groups: `gate_lr` must be a positive number, got {gate_lr!r}")
    logits = [g.log_alpha for _, g in gates_of(model)]
    ids = {id(p) for p in logits}
    weights = [p for p in model.parameters() if id(p) not in ids]
    groups = [{"params": weights, "lr": float(lr)}] if weights else []
    if logits:
        groups.append({"params": logits, "lr": float(gate_lr), **_fused_if_supported(logits)})
    return groups


def _fused_if_supported(params: list[torch.Tensor]) -> dict:
    """``{"fused": True, "foreach": False}`` where torch has fused optimiser kernels for every one
    of ``params`` (floating, on a supported device), else ``{}`` (the optimiser's default)."""
    try:  # a private helper of torch.optim: without it, the optimiser's default
        from torch.optim.optimizer import _get_fused_kernels_supported_devices
        devices = _get_fused_kernels_supported_devices()
    except (ImportError, AttributeError):
        return {}
    if all(p.is_floating_point() and p.device.type in devices for p in params):
        return {"fused": True, "foreach": False}
    return {}
