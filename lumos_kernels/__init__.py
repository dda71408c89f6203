"""Fused gate ops for lumos: Triton kernels on CUDA, torch references on CPU.

Each op lives in its own module (reference, custom op, autograd); its Triton kernels live in
the private ``lumos_kernels._triton`` module of the same name, imported on the first Triton
launch. :mod:`lumos_kernels.dispatch` says how every op picks its backend.
"""
from .hard_concrete import (gate_uniform, gate_uniform_rows, hard_concrete, hard_concrete_parts, hard_concrete_reference,
                            log_alpha_bounds, p_open)
from .masked_gemm import fp32_input_precision, masked_linear, masked_linear_reference
from .message_passing import CSR, masked_message_passing, masked_message_passing_reference, to_csr

__all__ = [
    "CSR",
    "fp32_input_precision",
    "gate_uniform",
    "gate_uniform_rows",
    "hard_concrete",
    "hard_concrete_parts",
    "hard_concrete_reference",
    "log_alpha_bounds",
    "masked_linear",
    "masked_linear_reference",
    "masked_message_passing",
    "masked_message_passing_reference",
    "p_open",
    "to_csr",
]
