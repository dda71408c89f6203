"""Backend choice for lumos_kernels ops: Triton for CUDA tensors, the torch reference for CPU.

``LUMOS_BACKEND=triton|torch`` overrides the choice for every op. With ``TRITON_INTERPRET=1``
the Triton backend also runs on CPU tensors (slowly): that is how CI tests the kernels.
"""
from __future__ import annotations

import os

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


def compile_for_cuda_target(kernel, signature: dict, constexprs: dict, capability: int = 80,
                            num_warps: int = 4, num_stages: int = 3):
    """Compile a ``@triton.jit`` kernel to a cubin for ``sm_<capability>`` without a GPU.

    For tests on machines without one: the interpreter runs kernels as Python and misses what
    only the compiler checks (types of loop-carried values, constexpr use, layouts). Arguments
    not named in ``signature`` are taken as ``i32`` scalars; ``constexprs`` gives the
    compile-time values. Must run in a process without ``TRITON_INTERPRET``.
    """
    import triton
    from triton.backends.compiler import GPUTarget

    full = {name: signature.get(name, "i32") for name in kernel.arg_names}
    full.update({name: "constexpr" for name in constexprs})
    source = triton.compiler.ASTSource(fn=kernel, signature=full, constexprs=constexprs)
    return triton.compile(source, target=GPUTarget("cuda", capability, 32),
                          options=dict(num_warps=num_warps, num_stages=num_stages))
