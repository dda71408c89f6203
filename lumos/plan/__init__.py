"""The traced channel plan: which channels of every tensor of a gated model survive.

``plan_model(gated)`` traces the model (:mod:`.trace`), runs one analysis rule per node (the
table in :mod:`.table`, one file per op family: ``ops_*.py``) that records channel relations as
data on a :class:`ChannelPlan` (:mod:`.channels`) and returns a record per node, and solves the
plan. :func:`lumos.gate`, the cost model, :func:`lumos.report` and :func:`lumos.compact` all
start from it; only compaction builds anything.
"""
from .channels import AFFINE, CONST, FREE, ChannelPlan, Space
from .errors import CompactionError, TraceError
from .planner import check_gates, check_not_meta, default_inputs, plan_model, trace_gated
from .record import Context, LayerCost, Record

__all__ = ["AFFINE", "CONST", "FREE", "ChannelPlan", "CompactionError", "Context", "LayerCost", "Record", "Space",
           "TraceError", "check_gates", "check_not_meta", "default_inputs", "plan_model", "trace_gated"]
