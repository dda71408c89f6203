"""The modules :func:`lumos.fit` calls for the forward pass: the gated model in DDP,
``torch.compile`` and bf16 autocast, as asked.

The model itself is never replaced: its parameters, gates, sampler and state_dict stay where the
user, the optimizer, the budget controller and the checkpoints see them; only the forward goes
through the wrappers.
"""
from __future__ import annotations

import torch
from torch import nn

PRECISIONS = ("fp32", "bf16")


def check_precision(precision, device: torch.device, who: str) -> str:
    """``precision`` if this device can train in it, else a clear error."""
    if precision == "fp16":
        raise ValueError(f"{who}: `precision`='fp16' needs loss scaling, which fit does not do; use 'bf16' "
                         "(the same speed on recent GPUs and CPUs, float32's range)")
    if precision not in PRECISIONS:
        raise ValueError(f"{who}: `precision` must be one of {PRECISIONS}, got {precision!r}")
    if precision == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise ValueError(f"{who}: `precision`='bf16' is not supported by {torch.cuda.get_device_name(device)}; "
                         "use 'fp32'")
    return precision


class AutocastForward(nn.Module):
    """Runs ``module`` under ``torch.autocast(device_type, bfloat16)`` and returns its floating
    outputs in float32, so that the loss is computed in float32. The weights stay float32
    (autocast casts copies for the matrix products), and so does what compaction reads.

    Args:
        module: the model (or its DDP / compiled wrapper).
        device_type: ``"cpu"`` or ``"cuda"``.
    """

    def __init__(self, module: nn.Module, device_type: str):
        super().__init__()
        self.module = module
        self.device_type = device_type

    def forward(self, *args, **kwargs):
        with torch.autocast(self.device_type, dtype=torch.bfloat16):
            out = self.module(*args, **kwargs)
        return out.float() if isinstance(out, torch.Tensor) and out.is_floating_point() else out


def forward_modules(model: nn.Module, device: torch.device, *, precision: str = "fp32", compile: bool = False,
                    ddp=None) -> tuple[nn.Module, nn.Module]:
    """``(train_forward, eval_forward)`` for ``model``.

    ``compile``: ``torch.compile(model)`` (its compiled graphs serve both). ``ddp``: a function
    wrapping the training forward in DistributedDataParallel (evaluation runs without it: each
    rank evaluates its own shard, so the ranks would not call forward equally often, which
    DDP's buffer broadcast needs). ``precision="bf16"``: both in :class:`AutocastForward`.
    """
    runner = torch.compile(model) if compile else model
    train_forward = ddp(runner) if ddp is not None else runner
    if precision == "bf16":
        return AutocastForward(train_forward, device.type), AutocastForward(runner, device.type)
    return train_forward, runner
