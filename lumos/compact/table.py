"""The one table of builders: which function builds the compacted op of each analysis record."""
from __future__ import annotations

from typing import Callable

from torch import fx

from ..plan import ops_attention, ops_conv, ops_elementwise, ops_features, ops_graph, ops_io, ops_linear
from ..plan import ops_index, ops_norm, ops_pixel, ops_pool, ops_shape
from ..plan.errors import CompactionError, failed_at
from ..plan.record import Copy, Record, Whole
from . import (build_attention, build_conv, build_elementwise, build_graph, build_index, build_io, build_linear,
               build_norm, build_shape)
from .builder import Builder
from .values import Value

BuildFn = Callable[[fx.Node, Record, Builder], None]

BUILDERS: dict[type, BuildFn] = {
    Copy: build_io.build_copy,
    Whole: build_io.build_whole,
    ops_io.Input: build_io.build_input,
    ops_io.Output: build_io.build_copy,
    ops_io.Attribute: build_io.build_attribute,
    ops_features.FeatureSelect: build_linear.build_feature_select,
    ops_linear.LinearLayer: build_linear.build_linear,
    ops_conv.ConvLayer: build_conv.build_conv,
    ops_norm.BatchNormLayer: build_norm.build_batch_norm,
    ops_norm.GroupNormLayer: build_norm.build_group_norm,
    ops_norm.InstanceNormLayer: build_norm.build_instance_norm,
    ops_norm.StatNorm: build_norm.build_stat_norm,
    ops_elementwise.Elementwise: build_elementwise.build_elementwise,
    ops_elementwise.ChannelPReLU: build_elementwise.build_channel_prelu,
    ops_elementwise.GatedHalves: build_elementwise.build_glu,
    ops_pixel.PixelShuffle: build_shape.build_pixel_shuffle,
    ops_pool.PassThrough: build_elementwise.build_pass_through,
    ops_pool.Channelwise: build_elementwise.build_channelwise,
    ops_shape.Reshape: build_shape.build_reshape,
    ops_shape.ShuffleStep: build_shape.build_shuffle_step,
    ops_shape.ShuffleMerge: build_shape.build_shuffle_merge,
    ops_shape.Permute: build_shape.build_permute,
    ops_index.Index: build_index.build_index,
    ops_index.Split: build_index.build_split,
    ops_index.PieceItem: build_index.build_piece,
    ops_index.Concat: build_index.build_concat,
    ops_index.ShapeRead: build_index.build_shape_read,
    ops_index.ShapeItem: build_index.build_shape_item,
    ops_shape.Expand: build_shape.build_expand,
    ops_attention.Attention: build_attention.build_attention,
    ops_attention.AttentionItem: build_attention.build_attention_item,
    ops_graph.Aggregation: build_graph.build_aggregation,
    ops_graph.Pool: build_graph.build_pool,
}


def build(plan, records: dict[fx.Node, Record], class_name: str) -> tuple[fx.GraphModule, Builder]:
    """Build every node in graph order; returns the compacted model and the builder (whose
    ``env`` maps original nodes to compacted ones, for diagnostics)."""
    b = Builder(plan, records)
    for node in plan.gm.graph.nodes:
        b.current = node
        try:
            BUILDERS[type(records[node])](node, records[node], b)
        except CompactionError:
            raise
        except Exception as err:  # a builder's bug: name the node, never a bare traceback
            raise failed_at("lumos.compact", "build", node, plan.gm, err) from err
        if node in plan.space_of and node not in b.values:
            b.values[node] = Value.zeros(plan.space_of[node].size)
    b.current = None
    return b.finish(class_name), b
