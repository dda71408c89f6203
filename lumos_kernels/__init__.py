"""Fused gate ops for lumos: Triton kernels on CUDA, torch references on CPU.

Each op lives in its own module with its kernel(s), torch reference and autograd;
:mod:`lumos_kernels.dispatch` picks the backend.
"""
from .hard_concrete import hard_concrete, hard_concrete_reference, p_open, philox_uniform
from .masked_gemm import masked_linear, masked_linear_reference
from .message_passing import CSR, masked_message_passing, masked_message_passing_reference, to_csr

__all__ = [
    "CSR",
    "hard_concrete",
    "hard_concrete_reference",
    "masked_linear",
    "masked_linear_reference",
    "masked_message_passing",
    "masked_message_passing_reference",
    "p_open",
    "philox_uniform",
    "to_csr",
]
