"""The LUMOS paper's evaluation as a feature: lumos against dense training and peer pruning methods
on the built-in workloads (``lumos bench``).

- :mod:`.training`: train / evaluate a model on any workload (tensor pairs or graph batches).
- :mod:`.baselines`: L1-norm structured pruning, Torch-Pruning (DepGraph), unstructured masks.
- :mod:`.bench`: the protocol; one row per (workload, method, seed, target).
- :mod:`.results`: ``results.md`` (with the acceptance check), ``results.json``, ``results.png``.
"""
