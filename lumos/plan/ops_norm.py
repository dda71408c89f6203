"""Analysis of normalisations.

- BatchNorm (eval, running statistics): a per-channel affine map, so channels pass through and
  keep their kind (``y = a x + b`` of a CONST or AFFINE value is one too). InstanceNorm: channels
  pass through, a constant channel gives its bias.
- GroupNorm with several groups: a group's channels are tied (kept or dropped whole); a dropped
  group of constants has a constant output.
- LayerNorm and RMSNorm over the channel dim (and GroupNorm with one group, which normalises a
  sample over its channels and positions): **statistic norms**. Every input channel counts in
  the statistics of the original width, so the norm reads all of them (a dropped one by its
  known value), and the output on a dropped channel is ``(c - mean) * rstd * w + b``, an
  AFFINE function of the row's two signals ``rstd`` and ``mean * rstd`` that folds into the
  consumers. ``lumos/compact/DERIVATIONS.md`` derives the formulas the builder uses.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import fx, nn

from .channels import AFFINE, CONST, FREE, ChannelPlan
from .ops_io import attr_space
from .ops_index import channel_count
from .record import Context, Record, whole
from .trace import node_shape

BATCH_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
INSTANCE_NORMS = (nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d)


@dataclass
class BatchNormLayer(Record):
    """BatchNorm in eval: sliced to the kept channels."""

    def params(self, node, plan):
        return 2 * plan.width(node) if plan.module(node).affine else 0


def analyze_batch_norm(node: fx.Node, plan: ChannelPlan, ctx: Context) -> Record:
    module = plan.module(node)
    space = plan.space_of.get(node.args[0])
    if space is None or space.dim != 1 or not module.track_running_stats or len(node.args) != 1:
        return whole(node, plan)
    plan.same_space(node, node.args[0])
    return BatchNormLayer()


@dataclass
class InstanceNormLayer(Record):
    """InstanceNorm with each sample's own statistics, sliced to the kept channels."""

    def params(self, node, plan):
        return 2 * plan.width(node) if plan.module(node).affine else 0


def analyze_instance_norm(node: fx.Node, plan: ChannelPlan, ctx: Context) -> Record:
    """Each channel normalised over its own positions: channels pass through, and a constant
    channel normalises to 0 (its output is the bias). With running statistics, eval mode uses
    them: a per-channel affine map, as BatchNorm."""
    module = plan.module(node)
    if module.track_running_stats:
        return analyze_batch_norm(node, plan, ctx)
    x = node.args[0]
    space, shape = plan.space_of.get(x), node_shape(x)
    if space is None or space.dim != 1 or shape is None or len(shape) < 3 or len(node.args) != 1:
        return whole(node, plan)
    plan.same_space(node, x, torch.where(plan.kinds(space) == CONST, CONST, FREE))
    return InstanceNormLayer()


@dataclass
class GroupNormLayer(Record):
    """GroupNorm with whole groups kept or dropped."""

    def params(self, node, plan):
        return 2 * plan.width(node) if plan.module(node).affine else 0


def analyze_group_norm(node: fx.Node, plan: ChannelPlan, ctx: Context) -> Record:
    module: nn.GroupNorm = plan.module(node)
    x = node.args[0]
    space, shape = plan.space_of.get(x), node_shape(x)
    if space is None or space.dim != 1 or shape is None or len(shape) < 2 or len(node.args) != 1:
        return whole(node, plan)
    if module.num_groups == 1:
        return _stat_norm(node, plan, "layer", tuple(range(1, len(shape))))
    per = module.num_channels // module.num_groups
    kinds = plan.kinds(space).reshape(module.num_groups, per)
    constant = (kinds == CONST).all(1, keepdim=True).expand(-1, per).reshape(-1)
    out = plan.same_space(node, x, torch.where(constant, CONST, FREE))
    for g in range(module.num_groups):
        first = out.start + g * per
        plan.tie_ids(range(first, first + per - 1), range(first + 1, first + per))
    return GroupNormLayer()


@dataclass
class StatNorm(Record):
    """A LayerNorm, RMSNorm or one-group GroupNorm over the tracked channel dim.

    Attributes:
        rms: True for RMSNorm (no mean subtracted).
        reduce_dims: the dims its statistics run over (the channel dim among them).
        weight, bias: where the per-channel affine parameters come from: ``"module"`` (the
            norm module's own), a ``get_attr`` node (``F.layer_norm(x, ..., self.w, self.b)``),
            or None.
        eps: the epsilon (None: RMSNorm's default, the dtype's machine epsilon).
    """

    rms: bool
    reduce_dims: tuple[int, ...]
    weight: object
    bias: object
    eps: float | None

    def params(self, node, plan):
        if node.op != "call_module":
            return 0  # the parameters are attributes, counted where they are read
        kept = plan.width(node)
        return sum(kept for name in ("weight", "bias") if getattr(plan.module(node), name, None) is not None)


def _stat_norm(node: fx.Node, plan: ChannelPlan, kind: str, reduce_dims: tuple[int, ...],
               weight=None, bias=None, eps=None) -> Record:
    x = node.args[0]
    space = plan.space_of[x]
    if node.op == "call_module":
        module = plan.module(node)
        weight = "module" if getattr(module, "weight", None) is not None else None
        bias = "module" if getattr(module, "bias", None) is not None else None
        eps = module.eps
    in_kinds = plan.kinds(space)
    out = plan.same_space(node, x, torch.where(in_kinds == FREE, FREE, AFFINE))
    for attr in (weight, bias):
        if isinstance(attr, fx.Node):
            attr_space_ = attr_space(plan, attr, 0)
            plan.tie(attr_space_, out)
    # the statistics read every input channel, a dropped one by its known (CONST/AFFINE) value
    plan.consume(space, lambda: bool(plan.kept_mask(out).any()), strict=False)
    return StatNorm(kind == "rms", reduce_dims, weight, bias, eps)


def _last_dim_norm(node: fx.Node, plan: ChannelPlan, normalized_shape, ctx: Context | None = None) -> bool:
    x = node.args[0] if node.args else None
    space = plan.space_of.get(x) if isinstance(x, fx.Node) else None
    shape = node_shape(x) if space is not None else None
    shape_size = list(normalized_shape) if isinstance(normalized_shape, (tuple, list, torch.Size)) \
        else [normalized_shape]
    if ctx is not None:  # (x.shape[-1],): a read of the channel count is that number
        shape_size = [channel_count(s, ctx) if isinstance(s, fx.Node) else s for s in shape_size]
    return (space is not None and shape is not None and len(shape_size) == 1 and space.dim == len(shape) - 1
            and shape_size[0] == shape[-1])


def analyze_layer_norm_module(node: fx.Node, plan: ChannelPlan, ctx: Context) -> Record:
    """``nn.LayerNorm`` / ``nn.RMSNorm`` over the last dim (the tracked one)."""
    module = plan.module(node)
    if len(node.args) != 1 or node.kwargs or not _last_dim_norm(node, plan, module.normalized_shape):
        return whole(node, plan)
    return _stat_norm(node, plan, "rms" if isinstance(module, nn.RMSNorm) else "layer", (-1,))


_LN_ARGS = ("input", "normalized_shape", "weight", "bias", "eps")
_RMS_ARGS = ("input", "normalized_shape", "weight", "eps")


def analyze_layer_norm_function(node: fx.Node, plan: ChannelPlan, ctx: Context) -> Record:
    """``F.layer_norm`` / ``F.rms_norm`` over the last dim, with ``get_attr`` (or no) weight and bias."""
    rms = node.target is F.rms_norm
    args = dict(zip(_RMS_ARGS if rms else _LN_ARGS, node.args))
    args.update(node.kwargs)
    weight, bias = args.get("weight"), args.get("bias")
    attrs_ok = all(a is None or (isinstance(a, fx.Node) and a.op == "get_attr" and len(a.users) == 1
                                 and a not in plan.space_of) for a in (weight, bias))
    if not attrs_ok or not _last_dim_norm(node, plan, args.get("normalized_shape"), ctx):
        return whole(node, plan)
    eps = args.get("eps", None if rms else 1e-5)
    return _stat_norm(node, plan, "rms" if rms else "layer", (-1,), weight, bias, eps)
