"""Building the input feature selection and linear layers."""
from __future__ import annotations

import operator

import torch
from torch import fx

from ..plan.ops_features import FeatureSelect
from ..plan.ops_linear import LinearLayer, gates
from ..plan.record import channel_view
from ..plan.trace import node_shape
from .builder import Builder, as64, eval_mask
from .plain import plain_linear
from .values import Value


def build_feature_select(node: fx.Node, record: FeatureSelect, b: Builder) -> None:
    """``x[..., kept] * m[kept]``: ``index_select`` of the kept features (a closed one kept for a
    residual path reads as 0) and their fractional gate values as a multiply."""
    gate = b.plan.module(node).gate
    x = node.args[0]
    out_space = b.plan.space_of[node]
    out_kept = b.plan.kept(out_space)
    selected = b.select(x, out_kept, out_space.dim, node.name)
    scale = eval_mask(gate, out_space.size)[out_kept]
    if not bool((scale == 1).all()):
        view = b.call_method("reshape", b.buffer(node.name + "_scale", scale),
                             channel_view(len(node_shape(node)), out_space.dim))
        selected = b.call_function(operator.mul, selected, view)
    elif selected is b.env[x] and node.name in b.mutated:  # never alias what the gated model did not
        selected = b.call_method("clone", selected)
    b.env[node] = selected
    b.values[node] = Value.zeros(out_space.size)  # a closed feature holds 0


def fold_inputs(weight: torch.Tensor, value: Value, removed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """What dropped inputs ``removed`` (holding ``value``) add to each output of a linear map with
    ``weight`` ``(out, in)``: a constant ``(out,)`` and signal coefficients ``(out, T)``."""
    if removed.numel() == 0:
        return torch.zeros(weight.shape[0], dtype=torch.float64), None
    w = weight[:, removed]
    const = w @ value.const[removed]
    coef = w @ value.coef[removed] if value.coef is not None else None
    return const, coef


def build_linear(node: fx.Node, record: LinearLayer, b: Builder) -> None:
    """Kept inputs select columns, kept outputs rows; gate values fold into the weight, the
    constants of dropped inputs into the bias (a buffer added when there is none), their AFFINE
    parts into a small linear map of the signals."""
    module = b.plan.module(node)
    in_gate, out_gate = gates(module)
    weight = as64(module.weight)
    n, k = weight.shape
    m_in, m_out = eval_mask(in_gate, k), eval_mask(out_gate, n)
    w_eff = weight * m_out[:, None] * m_in[None, :]
    bias = as64(module.bias) * m_out if module.bias is not None else torch.zeros(n, dtype=torch.float64)
    x = node.args[0]
    if record.in_space is None:
        kept_in, removed_in, value_in = torch.arange(k), torch.zeros(0, dtype=torch.long), Value.zeros(k)
    else:
        kept_in, removed_in, value_in = b.plan.kept(record.in_space), b.plan.removed(record.in_space), b.values[x]
    fold, coef = fold_inputs(w_eff, value_in, removed_in)
    full_bias = bias + fold
    # a closed row has zero weights and bias: exactly this value; an open dropped row is never read
    b.values[node] = Value(full_bias, value_in.signals if coef is not None else None, coef)
    kept_out = b.plan.kept(record.out_space)
    x_new = b.env[x]
    ndim = len(node_shape(node))
    if kept_out.numel() == 0:
        b.env[node] = b.no_channels(x_new, -1)
        return
    if kept_in.numel() == 0:
        out = b.constant(x_new, full_bias[kept_out], -1, ndim)
    else:
        dense = plain_linear(w_eff[kept_out][:, kept_in], full_bias[kept_out] if module.bias is not None else None,
                             module.weight)
        out = b.call_module(node.target, dense, x_new)
        if module.bias is None and bool(fold[kept_out].abs().gt(0).any()):
            out = b.call_function(operator.add, out, b.buffer(node.name, fold[kept_out]))
    term = b.signal_term(value_in, coef[kept_out], -1) if coef is not None else None
    if term is not None:
        out = b.call_function(operator.add, out, term)
    b.env[node] = out
