"""Building normalisations: BatchNorm and GroupNorm sliced to their kept channels; LayerNorm,
RMSNorm and one-group GroupNorm with dropped channels as plain torch ops that keep the
statistics of the original width and expose the row signals their dropped outputs depend on.
The formulas are derived in ``lumos/compact/DERIVATIONS.md``."""
from __future__ import annotations

import operator

import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.nn.utils import parametrize

from ..plan.ops_io import attr_value
from ..plan.ops_norm import BatchNormLayer, GroupNormLayer, InstanceNormLayer, StatNorm
from ..plan.trace import node_shape
from .builder import Builder, as64
from .values import Value


def build_batch_norm(node: fx.Node, record: BatchNormLayer, b: Builder) -> None:
    """``nn.BatchNorm`` in eval: a per-channel affine map ``y = (x - mean) * scale (* w + b)``;
    sliced to the kept channels, the dropped channels' values mapped the same way."""
    module = b.plan.module(node)
    x = node.args[0]

    def sliced(kept: torch.Tensor) -> nn.Module:
        new = parametrize.type_before_parametrizations(module)(kept.numel(), eps=module.eps, momentum=module.momentum, affine=module.affine,
                           track_running_stats=True, device=module.running_mean.device,
                           dtype=module.running_mean.dtype)
        with torch.no_grad():
            new.running_mean.copy_(module.running_mean[kept])
            new.running_var.copy_(module.running_var[kept])
            new.num_batches_tracked.copy_(module.num_batches_tracked)
            if module.affine:
                new.weight.copy_(module.weight[kept])
                new.bias.copy_(module.bias[kept])
        return new

    b.channel_module(node, sliced)
    scale = (as64(module.running_var) + module.eps).rsqrt()
    shift = -as64(module.running_mean) * scale
    if module.affine:
        scale, shift = scale * as64(module.weight), shift * as64(module.weight) + as64(module.bias)
    value = b.values[x].scaled(scale)
    b.values[node] = value.with_const(value.const + shift)


def _take_kept_affine(new: nn.Module, module: nn.Module, kept: torch.Tensor) -> None:
    """Give ``new`` (built on the meta device) ``module``'s affine weight and bias at ``kept``, if it has them."""
    if module.affine:
        new.weight = nn.Parameter(module.weight.detach()[kept].clone())
        new.bias = nn.Parameter(module.bias.detach()[kept].clone())


def build_instance_norm(node: fx.Node, record: InstanceNormLayer, b: Builder) -> None:
    """``nn.InstanceNorm`` with per-sample statistics at the kept channels; a dropped constant
    channel normalises to 0, so it holds the bias (0 without affine parameters)."""
    module = b.plan.module(node)

    def sliced(kept: torch.Tensor) -> nn.Module:
        new = parametrize.type_before_parametrizations(module)(kept.numel(), eps=module.eps, affine=module.affine,
                                                              device="meta")
        _take_kept_affine(new, module, kept)
        return new

    b.channel_module(node, sliced)
    size = b.plan.space_of[node].size
    b.values[node] = Value(as64(module.bias) if module.affine else torch.zeros(size, dtype=torch.float64))


def build_group_norm(node: fx.Node, record: GroupNormLayer, b: Builder) -> None:
    """``nn.GroupNorm`` with whole groups kept; a dropped group of constants has the constant
    output ``group_norm`` of those constants."""
    module: nn.GroupNorm = b.plan.module(node)
    kept = b.plan.kept(b.plan.space_of[node])
    x = node.args[0]
    per = module.num_channels // module.num_groups
    if kept.numel() == 0:
        b.env[node] = b.env[x]
    else:
        new = nn.GroupNorm(kept.numel() // per, kept.numel(), eps=module.eps, affine=module.affine, device="meta")
        _take_kept_affine(new, module, kept)
        b.env[node] = b.call_module(node.target, new, b.env[x])
    weight = as64(module.weight) if module.affine else None
    bias = as64(module.bias) if module.affine else None
    # a constant map of two positions (group_norm refuses groups of one value, as one channel per group has)
    const = b.values[x].const.reshape(1, -1, 1).expand(1, -1, 2)
    b.values[node] = Value(F.group_norm(const, module.num_groups, weight, bias, module.eps)[0, :, 0])


def _affine(node: fx.Node, record: StatNorm, b: Builder, name: str, size: int) -> torch.Tensor | None:
    """The norm's full ``weight`` or ``bias`` (float64), None if it has none."""
    source = getattr(record, name)
    if source is None:
        return None
    tensor = getattr(b.plan.module(node), name) if source == "module" else attr_value(b.plan, source)
    return as64(tensor).reshape(size)


def build_stat_norm(node: fx.Node, record: StatNorm, b: Builder) -> None:
    """LayerNorm / RMSNorm / one-group GroupNorm; see the module docstring."""
    x = node.args[0]
    space = b.plan.space_of[x]
    size = space.size
    removed, kept = b.plan.removed(space), b.plan.kept(space)
    weight, bias = _affine(node, record, b, "weight", size), _affine(node, record, b, "bias", size)
    if removed.numel() == 0:  # every channel kept: the op itself
        b.copy(node)
        b.values[node] = Value.zeros(size)
        return
    b.env[node], b.values[node] = _emit_stat_norm(node, record, b, x, space.dim, kept, removed, weight, bias)


def _params(node: fx.Node, record: StatNorm, b: Builder, name: str, kept: torch.Tensor) -> fx.Node | None:
    """The kept part of the norm's ``weight`` / ``bias`` as a parameter of the compacted model."""
    source = getattr(record, name)
    if source is None:
        return None
    if source != "module":
        return b.env[source]  # an attribute, sliced by its own builder
    original = getattr(b.plan.module(node), name)
    target = f"{node.target}.{name}"
    b.attrs[target] = nn.Parameter(original.detach()[kept].clone(), original.requires_grad)
    return b.emit("get_attr", target, ())


def _constant_norm(rms: bool, const: torch.Tensor, weight, bias, eps: float) -> torch.Tensor:
    """``(C,)`` float64: the norm of a row whose channels all hold the constants ``const``."""
    if rms:
        y = const * (const.pow(2).mean() + eps).rsqrt()
    else:
        centred = const - const.mean()
        y = centred * (centred.pow(2).mean() + eps).rsqrt()
    if weight is not None:
        y = y * weight
    return y + bias if bias is not None else y


def _emit_stat_norm(node, record, b, x, dim, kept, removed, weight, bias):
    """Plain ops computing the kept outputs, and the :class:`Value` of the dropped ones.

    The kept channels are reduced twice (their mean, then their squared deviations from the
    full row's mean); the dropped channels' part is a few numbers per row (DERIVATIONS.md,
    section 4)."""
    ndim = len(node_shape(x))
    dim = dim % ndim
    last = dim == ndim - 1
    size, k, n = kept.numel() + removed.numel(), kept.numel(), removed.numel()
    x_new = b.env[x] if last else b.call_method("movedim", b.env[x], dim, -1)
    x_new = b.call_method("contiguous", x_new)  # reductions along a strided last dim are slow (as F.layer_norm does)
    positions = [d - (d > dim) for d in (r % ndim for r in record.reduce_dims) if d != dim]
    value = b.values[x].rows(removed)
    signals = value.signals if value.uses_signals() else None
    if signals is not None and not last:
        signals = b.call_method("movedim", signals, dim, -1)
    alpha, beta = value.const, (value.coef if signals is not None else None)

    def op(fn, *args):
        return b.call_function(fn, *args)

    def pos_mean(t):  # the mean over the positions a statistic also runs over (one-group GroupNorm)
        return b.call_method("mean", t, positions, keepdim=True) if positions and isinstance(t, fx.Node) else t

    def per_row(const: float, linear: torch.Tensor, gram: torch.Tensor):
        """``const + 2 s . linear + s^T gram s`` per row (a number without signals)."""
        if signals is None:
            return const
        sl = op(torch.matmul, signals, b.buffer(node.name + "_linear", 2 * linear.reshape(-1, 1)))
        sg = op(torch.matmul, signals, b.buffer(node.name + "_gram", gram))
        quad = b.call_method("sum", op(operator.mul, sg, signals), -1, keepdim=True)
        return op(operator.add, op(operator.add, sl, quad), const)

    eps = record.eps if record.eps is not None else torch.finfo(node.meta.get("lumos_dtype", b.dtype)).eps
    if k == 0 and signals is None:  # every input channel a constant: so is every output channel
        return b.no_channels(b.env[x], dim), Value(_constant_norm(record.rms, alpha, weight, bias, eps))
    stat_dims = positions + [-1]
    if record.rms:  # mean of squares over the original width
        dropped = per_row(float((alpha ** 2).sum()), beta.t() @ alpha if beta is not None else None,
                          beta.t() @ beta if beta is not None else None)
        total = pos_mean(dropped)
        if k:
            kept_ms = b.call_method("mean", op(operator.mul, x_new, x_new), stat_dims, keepdim=True)
            total = op(operator.add, op(operator.mul, kept_ms, float(k)), total)
        rstd = op(torch.rsqrt, op(operator.add, op(operator.truediv, total, float(size)), eps))
        y = op(operator.mul, x_new, rstd)
        row_signals, coef_rows = [rstd], [alpha]
    else:  # mean and variance over the original width, the dropped channels by their values
        alpha_bar = float(alpha.mean())
        centred_alpha = alpha - alpha_bar
        vbar = alpha_bar  # the dropped channels' mean in each row
        spread = float((centred_alpha ** 2).sum())  # and the sum of their squared deviations from it
        if beta is not None:
            beta_bar = beta.mean(0)
            centred_beta = beta - beta_bar
            vbar = op(operator.add, op(torch.matmul, signals, b.buffer(node.name + "_beta", beta_bar.reshape(-1, 1))),
                      alpha_bar)
            spread = per_row(spread, centred_beta.t() @ centred_alpha, centred_beta.t() @ centred_beta)
        mean = op(operator.mul, pos_mean(vbar), float(n))
        if k:
            kept_mean = b.call_method("mean", x_new, stat_dims, keepdim=True)
            mean = op(operator.add, mean, op(operator.mul, kept_mean, float(k)))
        mean = op(operator.truediv, mean, float(size))
        gap = op(operator.sub, vbar, mean)
        var = op(operator.add, pos_mean(spread), op(operator.mul, pos_mean(op(operator.mul, gap, gap)), float(n)))
        centred = op(operator.sub, x_new, mean)
        if k:  # (torch.var_mean is many times slower on CPU than a mean of squares)
            kept_part = b.call_method("mean", op(operator.mul, centred, centred), stat_dims, keepdim=True)
            var = op(operator.add, var, op(operator.mul, kept_part, float(k)))
        rstd = op(torch.rsqrt, op(operator.add, op(operator.truediv, var, float(size)), eps))
        y = op(operator.mul, centred, rstd)
        row_signals, coef_rows = [rstd, op(operator.mul, mean, rstd)], [alpha, -torch.ones_like(alpha)]
    w_param, b_param = _params(node, record, b, "weight", kept), _params(node, record, b, "bias", kept)
    if w_param is not None:
        y = op(operator.mul, y, w_param)
    if b_param is not None:
        y = op(operator.add, y, b_param)
    if signals is not None:
        row_signals.append(op(operator.mul, signals, rstd))
        coef_rows.append(beta.t())
    out_signals = op(torch.cat, row_signals, -1) if len(row_signals) > 1 else row_signals[0]
    if positions:  # per-sample signals, laid out over the positions like the tensor
        out_signals = op(operator.add, out_signals, b.call_method("sum", b.no_channels(x_new, -1), -1, keepdim=True))
    coef_removed = torch.cat([c.reshape(-1, n) if c.dim() == 2 else c.reshape(1, -1) for c in coef_rows]).t()
    w = weight[removed] if weight is not None else torch.ones(n, dtype=torch.float64)
    coef = torch.zeros(size, coef_removed.shape[1], dtype=torch.float64)
    coef[removed] = coef_removed * w[:, None]
    const = torch.zeros(size, dtype=torch.float64)
    if bias is not None:
        const[removed] = bias[removed]
    if not last:
        y = b.call_method("movedim", y, -1, dim)
        out_signals = b.call_method("movedim", out_signals, -1, dim)
    return y, Value(const, out_signals, coef)
