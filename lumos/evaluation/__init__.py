"""The LUMOS paper's evaluation as a feature: lumos against dense training and peer pruning methods
on the built-in workloads (``lumos bench``).

- :mod:`.training`: train / evaluate any workload (tensor pairs or graph batches).
- :mod:`.baselines`: L1-norm structured pruning, Torch-Pruning (DepGraph), unstructured masks.
- :mod:`.bench`: one row per (workload, method); ``results.md``, ``results.json``, ``results.png``.
"""
