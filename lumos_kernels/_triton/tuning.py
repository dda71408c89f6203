"""Launch-config choice for the GEMM kernels: timed once per key on a GPU, safe under CUDA graphs.

Why not ``triton.autotune``: its key holds raw argument values, so every new ``M`` (a GNN's
node count changes every batch) re-times every config; and timing inside CUDA-graph capture
fails. Here the caller builds the key (with ``M`` bucketed to a power of two, the kernel's
flags and the operands' layouts), a key is timed once, and a launch that meets an untimed key
while a CUDA graph is being captured takes the caller's heuristic config without timing.
"""
from __future__ import annotations

from typing import Callable, Hashable, NamedTuple, Sequence

from ..dispatch import capturing_cuda_graph, triton_interpreted


class LaunchConfig(NamedTuple):
    """Tile sizes (the kernel's ``BLOCK_*`` constexprs, in the kernel's own order) and launch options."""

    blocks: tuple
    num_warps: int = 4
    num_stages: int = 3


def m_bucket(m: int, smallest: int = 16, largest: int = 1 << 17) -> int:
    """``m`` rounded up to a power of two in ``[smallest, largest]``: one tuning key per bucket."""
    return min(max(smallest, 1 << max(0, (int(m) - 1).bit_length())), largest)


class ConfigChooser:
    """Remembers, per key, the fastest of a fixed list of :class:`LaunchConfig`."""

    def __init__(self, name: str, candidates: Sequence[LaunchConfig]):
        self.name = name
        self.candidates = tuple(candidates)
        self.chosen: dict = {}

    def choose(self, key: Hashable, run: Callable[[LaunchConfig], object],
               heuristic: LaunchConfig) -> LaunchConfig:
        """The config for ``key``; ``run(config)`` launches the kernel once with ``config``.

        Under the interpreter, and while a CUDA graph is being captured, ``heuristic`` is used
        without timing (nothing is remembered then, so the key is timed on its next eager call).
        """
        if triton_interpreted():
            return heuristic
        found = self.chosen.get(key)
        if found is not None:
            return found
        if capturing_cuda_graph():
            return heuristic
        import triton

        timings = []
        for config in self.candidates:
            try:
                timings.append(triton.testing.do_bench(lambda config=config: run(config), warmup=5, rep=20))
            except triton.runtime.errors.OutOfResources:  # too much shared memory on this GPU
                timings.append(float("inf"))
        best = min(range(len(self.candidates)), key=timings.__getitem__)
        found = self.chosen[key] = self.candidates[best] if timings[best] < float("inf") else heuristic
        return found
