"""Tracing lives in :mod:`lumos.plan.trace` (the channel plan is its own package); this name is
kept for code that imported it from here."""
from ..plan.trace import TraceError, node_shape, propagate_shapes, trace  # noqa: F401 (re-exported)
