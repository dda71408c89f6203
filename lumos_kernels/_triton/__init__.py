"""Triton kernels of the lumos_kernels ops, one private module per op.

Imported on the first Triton launch (``lumos_kernels.dispatch.triton_kernels``): importing
``lumos_kernels`` never imports triton. Each module holds module-level ``@triton.jit``
kernels and the launchers that compute grids, strides and buffers; the op's autograd and
custom-op registration live in the public module of the same name.
"""
