"""The one table of analysis rules: which function analyses which op.

Modules are matched in the order of :data:`MODULE_RULES` (first match; a subclass of a listed
type matches too, unless the user named it a leaf), functions and methods by their target. An
op with no entry is kept whole (:func:`lumos.plan.record.whole`): exact, never silently wrong.
Adding an op kind means adding a line here, an analysis function in its family's
``ops_*.py``, a builder in ``lumos/compact/build_*.py`` and a test.
"""
from __future__ import annotations

import operator
from typing import Callable

import torch
import torch.nn.functional as F
from torch import fx, nn

from ..nn import FeatureGate, GatedLinear, GlobalPool
from . import (ops_attention, ops_conv, ops_elementwise as ew, ops_features, ops_graph, ops_index, ops_io,
               ops_linear, ops_norm, ops_pixel, ops_pool, ops_shape)
from .channels import ChannelPlan
from .record import Context, Record, whole

Analyzer = Callable[[fx.Node, ChannelPlan, Context], Record]

MODULE_RULES: tuple[tuple[tuple[type, ...], Analyzer], ...] = (
    ((FeatureGate,), ops_features.analyze_feature_gate),
    ((GatedLinear, nn.Linear), ops_linear.analyze_linear),
    (ops_conv.CONV_TYPES, ops_conv.analyze_conv),
    (ops_norm.BATCH_NORMS, ops_norm.analyze_batch_norm),
    (ops_norm.INSTANCE_NORMS, ops_norm.analyze_instance_norm),
    ((nn.GroupNorm,), ops_norm.analyze_group_norm),
    ((nn.LayerNorm, nn.RMSNorm), ops_norm.analyze_layer_norm_module),
    (ops_attention.ATTENTION_TYPES, ops_attention.analyze_attention),
    (ops_graph.AGGREGATION_TYPES, ops_graph.analyze_aggregation),
    ((GlobalPool,), ops_graph.analyze_global_pool),
    (ew.UNARY_MODULES, ew.analyze_unary_module),
    (ew.IDENTITY_MODULES, ew.analyze_identity_module),
    ((nn.GLU,), ew.analyze_glu),
    (ops_pool.MAX_POOLS + ops_pool.AVG_POOLS, ops_pool.analyze_pool),
    ((nn.Flatten, nn.Unflatten), ops_shape.analyze_reshape),
    (ops_pixel.SHUFFLE_MODULES, ops_pixel.analyze_pixel_shuffle),
)


def analyze_item(node: fx.Node, plan: ChannelPlan, ctx: Context) -> Record:
    """``operator.getitem``: an item of a tuple some rule made (attention result, split pieces,
    a shape), else indexing a tensor."""
    source = node.args[0]
    record = ctx.records.get(source) if isinstance(source, fx.Node) else None
    if isinstance(record, ops_attention.Attention):
        return ops_attention.analyze_attention_item(node, plan, record)
    if isinstance(record, ops_index.Split):
        return ops_index.analyze_split_item(node, plan, record)
    if isinstance(record, ops_index.ShapeRead) and record.whole_shape:
        return ops_index.analyze_shape_item(node, plan, record)
    return ops_index.analyze_getitem(node, plan, ctx)


def analyze_contiguous(node: fx.Node, plan: ChannelPlan, ctx: Context) -> Record:
    return ops_shape.analyze_in_shuffle(node, plan, ctx) or ew.analyze_identity(node, plan, ctx)


FUNCTION_RULES: dict[Callable, Analyzer] = {
    **{f: ew.analyze_unary for f in ew.UNARY_FUNCTIONS},
    **{f: ew.analyze_identity for f in ew.IDENTITY_FUNCTIONS},
    **{f: ew.analyze_binary_function for f in ew.BINARY_FUNCTIONS},
    **{f: ops_pool.analyze_pool for f in ops_pool.POOL_FUNCTIONS + ops_pool.AVG_POOL_FUNCTIONS},
    **{f: ops_pool.analyze_reduction for f in ops_pool.REDUCTION_FUNCTIONS},
    **{f: ops_pool.analyze_move for f in ops_pool.MOVE_FUNCTIONS},
    F.glu: ew.analyze_glu,
    **{f: ops_pixel.analyze_pixel_shuffle for f in ops_pixel.SHUFFLE_FUNCTIONS},
    F.layer_norm: ops_norm.analyze_layer_norm_function,
    F.rms_norm: ops_norm.analyze_layer_norm_function,
    torch.flatten: ops_shape.analyze_reshape,
    torch.reshape: ops_shape.analyze_reshape,
    torch.squeeze: ops_shape.analyze_reshape,
    torch.unsqueeze: ops_shape.analyze_reshape,
    torch.permute: ops_shape.analyze_permute,
    torch.transpose: ops_shape.analyze_permute,
    torch.movedim: ops_shape.analyze_permute,
    torch.swapaxes: ops_shape.analyze_permute,
    torch.t: ops_shape.analyze_permute,
    torch.chunk: ops_index.analyze_split,
    torch.split: ops_index.analyze_split,
    torch.tensor_split: ops_index.analyze_split,
    torch.unbind: ops_index.analyze_split,
    torch.cat: ops_index.analyze_cat,
    torch.concat: ops_index.analyze_cat,
    torch.concatenate: ops_index.analyze_cat,
    torch.stack: ops_index.analyze_cat,
    operator.getitem: analyze_item,
    getattr: ops_index.analyze_shape_read,
}

METHOD_RULES: dict[str, Analyzer] = {
    **{m: ew.analyze_unary for m in ew.UNARY_METHODS},
    **{m: ew.analyze_binary_method for m in ew.BINARY_METHODS},
    "clone": ew.analyze_identity,
    "contiguous": analyze_contiguous,
    **{m: ops_pool.analyze_reduction for m in ("mean", "sum", "amax", "amin", "softmax", "log_softmax")},
    **{m: ops_pool.analyze_move for m in ops_pool.MOVE_METHODS},
    **{m: ops_shape.analyze_reshape for m in ops_shape.RESHAPE_METHODS + ops_shape.FLATTEN_METHODS
       + ops_shape.SQUEEZE_METHODS + ("unflatten",)},
    **{m: ops_shape.analyze_permute for m in ops_shape.PERMUTE_METHODS},
    **{m: ops_index.analyze_split for m in ops_index.SPLIT_METHODS},
    **{m: ops_index.analyze_shape_read for m in ops_index.SHAPE_METHODS},
    "expand": ops_shape.analyze_expand,
    "expand_as": ops_shape.analyze_expand,
}

OP_RULES: dict[str, Analyzer] = {
    "placeholder": ops_io.analyze_placeholder,
    "output": ops_io.analyze_output,
    "get_attr": ops_io.analyze_get_attr,
}


def rule_for(node: fx.Node, plan: ChannelPlan, ctx: Context) -> Analyzer:
    """The analysis function for ``node`` (:func:`~lumos.plan.record.whole` when none applies)."""
    if node.op in OP_RULES:
        return OP_RULES[node.op]
    if node.name in ctx.mutated or (node.op == "call_module" and node.target in ctx.whole):
        return whole
    if node.op == "call_module":
        module = plan.module(node)
        for types, analyzer in MODULE_RULES:
            if isinstance(module, types):
                return analyzer
        return whole
    if node.op == "call_function":
        try:
            return FUNCTION_RULES.get(node.target, whole)
        except TypeError:  # an unhashable target
            return whole
    if node.op == "call_method":
        return METHOD_RULES.get(node.target, whole)
    return whole
