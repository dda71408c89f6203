"""Compile a Triton kernel for a CUDA target on a machine without a GPU (for tests)."""
from __future__ import annotations

import triton
from triton.backends.compiler import GPUTarget

_DIVISIBILITY = [["tt.divisibility", 16]]


def compile_for_cuda_target(kernel, signature: dict, constexprs: dict, capability: int = 80,
                            num_warps: int = 4, num_stages: int = 3, aligned: tuple = ()):
    """Compile ``kernel`` (a ``@triton.jit`` function) for ``sm_<capability>`` and return it.

    The result's ``asm`` dict holds the IR of every stage (``ttir``, ``ttgir``, ``llir``,
    ``ptx``, ``cubin``). Arguments not named in ``signature`` take their annotation's type
    (``x: tl.float64``), as a launch does, else ``i32``;
    ``constexprs`` gives the compile-time values (a stride of 1 given there is what a launch
    on a contiguous tensor specialises to). Every pointer, and every scalar named in
    ``aligned``, is marked divisible by 16, as a launch on aligned tensors marks it: without
    that hint Triton cannot vectorise the loads, and its pipeliner leaves them synchronous.
    Must run in a process without ``TRITON_INTERPRET``.
    """
    full = {p.name: signature.get(p.name, p.annotation_type or "i32") for p in kernel.params}
    full.update({name: "constexpr" for name in constexprs})
    attrs = {(i,): _DIVISIBILITY for i, name in enumerate(kernel.arg_names)
             if full[name].startswith("*") or name in aligned}
    source = triton.compiler.ASTSource(fn=kernel, signature=full, constexprs=constexprs, attrs=attrs)
    return triton.compile(source, target=GPUTarget("cuda", capability, 32),
                          options=dict(num_warps=num_warps, num_stages=num_stages))
