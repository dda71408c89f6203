"""Building normalisations: BatchNorm and GroupNorm sliced to their kept channels; LayerNorm,
RMSNorm and one-group GroupNorm with dropped channels as plain torch ops that keep the
statistics of the original width and expose the row signals their dropped outputs depend on.
The formulas are derived in ``lumos/compact/DERIVATIONS.md``."""
from __future__ import annotations

import operator

import torch
import torch.nn.functional as F
from torch import fx, nn

from ..plan.ops_io import attr_value
from ..plan.ops_norm import BatchNormLayer, GroupNormLayer, StatNorm
from ..plan.trace import node_shape
from .builder import Builder, as64
from .values import Value


def build_batch_norm(node: fx.Node, record: BatchNormLayer, b: Builder) -> None:
    """``nn.BatchNorm`` in eval: a per-channel affine map ``y = (x - mean) * scale (* w + b)``;
    sliced to the kept channels, the dropped channels' values mapped the same way."""
    module = b.plan.module(node)
    kept = b.plan.kept(b.plan.space_of[node])
    x = node.args[0]
    if kept.numel() == 0:
        b.env[node] = b.no_channels(b.env[x], 1)
    else:
        new = type(module)(kept.numel(), eps=module.eps, momentum=module.momentum, affine=module.affine,
                           track_running_stats=True, device=module.running_mean.device,
                           dtype=module.running_mean.dtype)
        with torch.no_grad():
            new.running_mean.copy_(module.running_mean[kept])
            new.running_var.copy_(module.running_var[kept])
            new.num_batches_tracked.copy_(module.num_batches_tracked)
            if module.affine:
                new.weight.copy_(module.weight[kept])
                new.bias.copy_(module.bias[kept])
        b.env[node] = b.call_module(node.target, new, b.env[x])
    scale = (as64(module.running_var) + module.eps).rsqrt()
    shift = -as64(module.running_mean) * scale
    if module.affine:
        scale, shift = scale * as64(module.weight), shift * as64(module.weight) + as64(module.bias)
    value = b.values[x].scaled(scale)
    b.values[node] = value.with_const(value.const + shift)


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
        if module.affine:
            new.weight = nn.Parameter(module.weight.detach()[kept].clone())
            new.bias = nn.Parameter(module.bias.detach()[kept].clone())
        b.env[node] = b.call_module(node.target, new, b.env[x])
    weight = as64(module.weight) if module.affine else None
    bias = as64(module.bias) if module.affine else None
    const = b.values[x].const.reshape(1, -1, 1)
    b.values[node] = Value(F.group_norm(const, module.num_groups, weight, bias, module.eps).reshape(-1))


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


def _emit_stat_norm(node, record, b, x, dim, kept, removed, weight, bias):
    """Plain ops computing the kept outputs, and the :class:`Value` of the dropped ones."""
    ndim = len(node_shape(x))
    dim = dim % ndim
    last = dim == ndim - 1
    size = kept.numel() + removed.numel()
    x_new = b.env[x] if last else b.call_method("movedim", b.env[x], dim, -1)
    positions = [d - (d > dim) for d in (r % ndim for r in record.reduce_dims) if d != dim]
    value = b.values[x].rows(removed)
    signals = value.signals if value.uses_signals() else None
    if signals is not None and not last:
        signals = b.call_method("movedim", signals, dim, -1)
    count = removed.numel()
    alpha, beta = value.const, (value.coef if signals is not None else None)

    def pos_mean(t):
        return b.call_method("mean", t, positions, keepdim=True) if positions else t

    def matvec(s, vec):  # s (..., T) @ vec (T,) -> (..., 1)
        return b.call_function(torch.matmul, s, b.buffer(node.name + "_coef", vec.reshape(-1, 1)))

    def quadratic(s, gram):  # sum_tu s_t G_tu s_u -> (..., 1)
        sg = b.call_function(torch.matmul, s, b.buffer(node.name + "_gram", gram))
        return b.call_method("sum", b.call_function(operator.mul, sg, s), -1, keepdim=True)

    def add(a, c):
        return b.call_function(operator.add, a, c)

    def mul(a, c):
        return b.call_function(operator.mul, a, c)

    eps = record.eps if record.eps is not None else torch.finfo(node.meta.get("lumos_dtype", b.dtype)).eps
    if record.rms:  # mean of squares over the original width
        total = b.call_method("sum", pos_mean(mul(x_new, x_new)), -1, keepdim=True)
        dropped = float((alpha ** 2).sum())
        if signals is not None:
            part = add(mul(matvec(signals, beta.t() @ alpha), 2.0), quadratic(signals, beta.t() @ beta))
            total = add(total, pos_mean(part))
        mean_square = b.call_function(operator.truediv, add(total, dropped), float(size))
        rstd = b.call_function(torch.rsqrt, add(mean_square, eps))
        y = mul(x_new, rstd)
        row_signals, coef_rows = [rstd], [alpha]
    else:  # mean and variance over the original width, dropped channels by their values
        alpha_bar = float(alpha.mean())
        a = alpha - alpha_bar
        vbar = alpha_bar
        s_sum = b.call_method("sum", pos_mean(x_new), -1, keepdim=True)
        if signals is not None:
            beta_bar = beta.mean(0)
            centred = beta - beta_bar
            vbar = add(matvec(signals, beta_bar), alpha_bar)  # the dropped channels' mean, per position
            mean = b.call_function(operator.truediv, add(s_sum, mul(pos_mean(vbar), float(count))), float(size))
            spread = add(add(mul(matvec(signals, centred.t() @ a), 2.0), quadratic(signals, centred.t() @ centred)),
                         float((a ** 2).sum()))
        else:
            mean = b.call_function(operator.truediv, add(s_sum, alpha_bar * count), float(size))
            spread = float((a ** 2).sum())
        centred_x = b.call_function(operator.sub, x_new, mean)
        var = b.call_method("sum", pos_mean(mul(centred_x, centred_x)), -1, keepdim=True)
        gap = b.call_function(operator.sub, vbar, mean) if signals is not None \
            else b.call_function(operator.sub, alpha_bar, mean)
        dropped = add(pos_mean(spread) if not isinstance(spread, float) else spread,
                      mul(pos_mean(mul(gap, gap)), float(count)))
        var = b.call_function(operator.truediv, add(var, dropped), float(size))
        rstd = b.call_function(torch.rsqrt, add(var, eps))
        y = mul(centred_x, rstd)
        row_signals, coef_rows = [rstd, mul(mean, rstd)], [alpha, -torch.ones_like(alpha)]
    w_param, b_param = _params(node, record, b, "weight", kept), _params(node, record, b, "bias", kept)
    if w_param is not None:
        y = mul(y, w_param)
    if b_param is not None:
        y = add(y, b_param)
    if signals is not None:
        row_signals.append(mul(signals, rstd))
        coef_rows.append(beta.t())
    out_signals = b.call_function(torch.cat, row_signals, -1) if len(row_signals) > 1 else row_signals[0]
    coef_removed = torch.cat([c.reshape(-1, count) if c.dim() == 2 else c.reshape(1, -1) for c in coef_rows]).t()
    w = weight[removed] if weight is not None else torch.ones(count, dtype=torch.float64)
    coef = torch.zeros(size, coef_removed.shape[1], dtype=torch.float64)
    coef[removed] = coef_removed * w[:, None]
    const = torch.zeros(size, dtype=torch.float64)
    if bias is not None:
        const[removed] = bias[removed]
    if not last:
        y = b.call_method("movedim", y, -1, dim)
        out_signals = b.call_method("movedim", out_signals, -1, dim)
    return y, Value(const, out_signals, coef)
