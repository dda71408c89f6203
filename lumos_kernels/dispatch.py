"""Backend choice and the one calling convention of the lumos_kernels ops.

Every op (``hard_concrete``, ``masked_linear``, ``masked_message_passing``) is built the same way:

1. the public function checks its arguments (errors name the function and the argument);
2. ``backend = backend_for(op, tensor)``: ``"triton"`` for CUDA tensors, ``"torch"`` for CPU
   tensors; ``LUMOS_BACKEND=triton|torch`` overrides it (with ``TRITON_INTERPRET=1``,
   ``triton`` runs on CPU tensors: that is how CI tests the kernels);
3. the Triton backend is one ``torch.library`` custom op, ``torch.ops.lumos.<op>``, whose
   registered autograd is its one (fused) backward, and whose body launches the Triton kernels
   (:func:`triton_kernels`, imported on first use): ``torch.compile(fullgraph=True)`` sees one
   opaque op, and ``torch.library.opcheck`` tests it;
4. the torch backend is plain torch, differentiated by autograd: in eager mode it costs what
   its tensor ops cost (a custom op's dispatch costs about 0.1 ms per call on these CPUs, more
   than a small layer's arithmetic), and ``torch.compile`` traces and fuses it;
5. ``<op>_reference`` is the plain-torch formula: the torch backend itself or the same formula
   arranged differently, and the oracle of the Triton kernels.

Outputs are never saved for a backward (the custom ops' are fresh tensors; the torch
backends end in ops whose backward does not read their output), so a user may modify them in
place (``nn.ReLU(inplace=True)`` after a gated layer) and still train.
"""
from __future__ import annotations

import importlib
import os
from types import ModuleType
from typing import Iterable, List, Optional

import torch

BACKENDS = ("torch", "triton")


def forced_backend() -> str | None:
    """The backend named by ``LUMOS_BACKEND``, or None when the variable is unset or empty."""
    name = os.environ.get("LUMOS_BACKEND", "").strip().lower()
    if not name:
        return None
    if name not in BACKENDS:
        raise ValueError(f"LUMOS_BACKEND={name!r} is not a backend; expected one of {BACKENDS}")
    return name


def triton_interpreted() -> bool:
    """True when Triton runs in its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0").strip() not in ("", "0")


def backend_for(op: str, tensor: torch.Tensor) -> str:
    """Which backend runs ``op`` on ``tensor``: ``"triton"`` or ``"torch"``.

    Raises a clear error when Triton is forced on CPU tensors without the interpreter,
    since the kernels would otherwise be compiled for a GPU that is not there.
    """
    name = forced_backend()
    if name is None:
        return "triton" if tensor.is_cuda else "torch"
    if name == "triton" and not tensor.is_cuda and not triton_interpreted():
        raise RuntimeError(
            f"{op}: LUMOS_BACKEND=triton with CPU tensors needs TRITON_INTERPRET=1 "
            "(Triton's CPU interpreter); unset LUMOS_BACKEND to use the torch reference"
        )
    return name


def capturing_cuda_graph() -> bool:
    """True while a CUDA graph is being captured on the current stream (nothing may sync then)."""
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


def triton_kernels(op_module: str) -> ModuleType:
    """The private module of Triton kernels and launchers of one op (imports triton on first use)."""
    return importlib.import_module(f"lumos_kernels._triton.{op_module}")


def none_as_empty(tensors: Iterable[Optional[torch.Tensor]], like: torch.Tensor) -> List[torch.Tensor]:
    """A custom op cannot return None: an empty tensor stands for "not needed"."""
    return [t if t is not None else like.new_empty(0) for t in tensors]


def wanted(grads: Iterable[torch.Tensor], needs: Iterable[bool]) -> tuple:
    """The gradients a backward returns: None where the input needs none (undoes :func:`none_as_empty`)."""
    return tuple(g if need else None for g, need in zip(grads, needs))


def in_dtype(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``t`` in ``dtype``: itself when it already is (the ops call this per gate tensor on every
    step, where an ``aten::to`` that copies nothing still costs its dispatch)."""
    return t if t.dtype == dtype else t.to(dtype)


def check_float(op: str, name: str, tensor: torch.Tensor | None) -> None:
    """Raise TypeError naming ``name`` unless ``tensor`` is None or floating point."""
    if tensor is not None and not tensor.is_floating_point():
        raise TypeError(f"{op}: `{name}` must be a floating-point tensor, got dtype {tensor.dtype}")


def check_same_device(op: str, **tensors: torch.Tensor | None) -> None:
    """Raise ValueError when the given tensors do not all live on one device."""
    devices = {name: t.device for name, t in tensors.items() if t is not None}
    if len(set(devices.values())) > 1:
        listed = ", ".join(f"{name} on {dev}" for name, dev in devices.items())
        raise ValueError(f"{op}: all tensors must be on one device, got {listed}")


def check_vector(op: str, name: str, tensor: torch.Tensor | None, length: int, what: str) -> None:
    """Raise ValueError unless ``tensor`` is None or a 1-D tensor of ``length`` elements."""
    if tensor is not None and (tensor.dim() != 1 or tensor.shape[0] != length):
        raise ValueError(
            f"{op}: `{name}` must have shape ({length},) ({what}), got {tuple(tensor.shape)}"
        )
