"""Building convolutions (grouped and depthwise included).

Kept input channels select weight columns, kept outputs rows, inside each kept group (see
:class:`lumos.plan.ops_conv.Packing`); gate values fold into weight and bias. A dropped input
channel holding a constant ``c`` contributes ``c`` times the sum of the kernel taps that fall
inside the input: without zero padding that is the same at every position and folds into the
bias; with zero padding (or in a transposed conv) it differs near the borders, and the compacted
model adds the exact map: a convolution of a one-channel map of ones with ``sum_j c_j W[:, j]``.
Dropped inputs with AFFINE values add the convolution of their signals.
"""
from __future__ import annotations

import operator

import torch
import torch.nn.functional as F
from torch import fx, nn

from ..plan.ops_conv import ConvLayer
from ..plan.record import channel_view
from ..plan.trace import node_shape
from .builder import Builder
from .plain import folded_conv, plain_conv
from .values import Value

CONV_FNS = (F.conv1d, F.conv2d, F.conv3d)
TRANSPOSED_FNS = (F.conv_transpose1d, F.conv_transpose2d, F.conv_transpose3d)


def is_transposed(module: nn.Module) -> bool:
    return isinstance(module, nn.modules.conv._ConvTransposeNd)


def oi_weight(module: nn.Module, weight: torch.Tensor) -> torch.Tensor:
    """A conv weight in the ``(C_out, C_in / g, *k)`` layout (a transposed conv's is
    ``(C_in, C_out / g, *k)``): row ``o`` holds output ``o``'s taps on its group's inputs."""
    if not is_transposed(module):
        return weight
    g = module.groups
    c_in, per_out = weight.shape[0], weight.shape[1]
    grouped = weight.reshape(g, c_in // g, per_out, *weight.shape[2:]).transpose(1, 2)
    return grouped.reshape(g * per_out, c_in // g, *weight.shape[2:])


def torch_layout(module: nn.Module, oi: torch.Tensor, groups: int) -> torch.Tensor:
    """The inverse of :func:`oi_weight` for a layer with ``groups`` groups."""
    if not is_transposed(module):
        return oi
    per_out, per_in = oi.shape[0] // groups, oi.shape[1]
    grouped = oi.reshape(groups, per_out, per_in, *oi.shape[2:]).transpose(1, 2)
    return grouped.reshape(groups * per_in, per_out, *oi.shape[2:])


def per_output(module: nn.Module, oi: torch.Tensor, inputs: torch.Tensor) -> torch.Tensor:
    """``sum_j inputs[j, ...] * W[o, j]`` for every output ``o`` over its group's inputs ``j``.

    ``inputs`` is ``(C_in,)`` (constants: returns ``(C_out, *k)``) or ``(C_in, T)`` (signal
    coefficients: returns ``(C_out, T, *k)``)."""
    g = module.groups
    per_out, per_in = oi.shape[0] // g, oi.shape[1]
    w = oi.reshape(g, per_out, per_in, -1)
    if inputs.dim() == 1:
        out = torch.einsum("goik,gi->gok", w, inputs.reshape(g, per_in))
        return out.reshape(oi.shape[0], *oi.shape[2:])
    out = torch.einsum("goik,git->gotk", w, inputs.reshape(g, per_in, -1))
    return out.reshape(oi.shape[0], inputs.shape[1], *oi.shape[2:])


def breaks_constants(module: nn.Module) -> bool:
    """Whether a constant input channel gives a non-constant output (zero padding, transposed)."""
    if is_transposed(module):
        return True
    if module.padding_mode != "zeros" or module.padding == "valid":
        return False
    if module.padding == "same":
        return any(d * (k - 1) > 0 for d, k in zip(module.dilation, module.kernel_size))
    return any(p > 0 for p in module.padding)


def conv_call(b: Builder, module: nn.Module, x: fx.Node, weight: fx.Node) -> fx.Node:
    """``module``'s convolution (stride, padding and its mode, dilation; one group) of ``x`` with
    ``weight``, no bias, as plain functional calls."""
    n = len(module.kernel_size) - 1
    if is_transposed(module):
        return b.call_function(TRANSPOSED_FNS[n], x, weight, None, module.stride, module.padding,
                               module.output_padding, 1, module.dilation)
    padding = module.padding
    if module.padding_mode != "zeros":
        x = b.call_function(F.pad, x, list(module._reversed_padding_repeated_twice), mode=module.padding_mode)
        padding = 0
    return b.call_function(CONV_FNS[n], x, weight, None, module.stride, padding, module.dilation)


def _positions_probe(b: Builder, module: nn.Module, x_new: fx.Node) -> fx.Node:
    """``(N, 0, *S_out)``: no channel, the output's positions (a removed convolution's output)."""
    k = tuple(module.kernel_size)
    zeros = b.buffer(b.current.name + "_probe", torch.zeros((1, 1) + k, dtype=torch.float64))
    probe = conv_call(b, module, b.ones_positions(x_new), zeros)
    batch = b.call_method("size", x_new, 0)
    return b.call_method("expand", b.no_channels(probe, 1), batch, *([-1] * (len(k) + 1)))


def build_conv(node: fx.Node, record: ConvLayer, b: Builder) -> None:
    module = b.plan.module(node)
    weight, bias = folded_conv(module)
    has_bias = bias is not None
    bias = bias if has_bias else torch.zeros(module.out_channels, dtype=torch.float64)
    oi = oi_weight(module, weight)
    x = node.args[0]
    c_in = module.in_channels
    if record.in_space is None:
        kept_in, removed_in, value_in = torch.arange(c_in), torch.zeros(0, dtype=torch.long), Value.zeros(c_in)
    else:
        kept_in, removed_in, value_in = b.plan.kept(record.in_space), b.plan.removed(record.in_space), b.values[x]
    const_in = torch.zeros(c_in, dtype=torch.float64)
    const_in[removed_in] = value_in.const[removed_in]
    w_const = per_output(module, oi, const_in)  # (C_out, *k): the kernel of one extra channel of ones
    uniform = not breaks_constants(module)
    fold = w_const.flatten(1).sum(1) if uniform else torch.zeros_like(bias)
    b.values[node] = Value(bias + fold)  # exact for closed channels (zero rows); unread otherwise
    kept_out = b.plan.kept(record.out_space)
    x_new = b.env[x]
    ndim = len(node_shape(node))
    if kept_out.numel() == 0:
        b.env[node] = _positions_probe(b, module, x_new)
        return
    p = record.packing(node, b.plan)
    border = w_const[kept_out]
    border_weight = border.unsqueeze(0) if is_transposed(module) else border.unsqueeze(1)
    if p.width_in == 0:  # no input left: the output is the constants' convolution (and the bias)
        out = conv_call(b, module, b.ones_positions(x_new), b.buffer(node.name + "_border", border_weight))
        out = b.call_function(operator.add, out, b.call_method(
            "reshape", b.buffer(node.name + "_bias", bias[kept_out]), channel_view(ndim, 1)))
        batch = b.call_method("size", x_new, 0)
        out = b.call_method("contiguous", b.call_method("expand", out, batch, *([-1] * (ndim - 1))))
    else:
        out = _packed_conv(node, b, module, oi, bias + fold, has_bias, kept_in, p, x_new)
        if not has_bias and bool(fold[kept_out].abs().gt(0).any()):
            extra = b.call_method("reshape", b.buffer(node.name + "_fold", fold[kept_out]), channel_view(ndim, 1))
            out = b.call_function(operator.add, out, extra)
        if not uniform and bool(border.abs().gt(0).any()):
            ones = conv_call(b, module, b.ones_positions(x_new), b.buffer(node.name + "_border", border_weight))
            out = b.call_function(operator.add, out, ones)
    if value_in.uses_signals(removed_in):
        coef = torch.zeros(c_in, value_in.coef.shape[1], dtype=torch.float64)
        coef[removed_in] = value_in.coef[removed_in]
        kernel = per_output(module, oi, coef)[kept_out]  # (k_out, T, *k)
        kernel = kernel.transpose(0, 1) if is_transposed(module) else kernel
        signals = b.call_function(operator.mul, value_in.signals, b.ones_positions(x_new))
        out = b.call_function(operator.add, out, conv_call(b, module, signals, b.buffer(node.name + "_signals", kernel)))
    b.env[node] = out


def _packed_conv(node, b: Builder, module, oi, full_bias, has_bias, kept_in, p, x_new) -> fx.Node:
    """The kept groups' kept channels as one (grouped) conv: inputs gathered into equal groups,
    outputs of groups narrower than the widest picked back out."""
    g = module.groups
    per_in = module.in_channels // g
    groups = len(p.groups)
    packed = torch.zeros((groups * p.width_out, p.width_in) + tuple(oi.shape[2:]), dtype=torch.float64)
    packed_bias = torch.zeros(groups * p.width_out, dtype=torch.float64)
    gather, real = [], []
    for t, (group, outs, ins) in enumerate(zip(p.groups, p.outs, p.ins)):
        rows = torch.arange(outs.numel()) + t * p.width_out
        packed[rows, :ins.numel()] = oi[outs][:, ins - group * per_in]
        packed_bias[rows] = full_bias[outs]
        positions = torch.searchsorted(kept_in, ins).tolist()
        gather += positions + [0] * (p.width_in - ins.numel())  # padding slots read any channel, weight 0
        real += rows.tolist()
    layer = plain_conv(module, groups * p.width_in, groups * p.width_out, groups,
                       torch_layout(module, packed, groups), packed_bias if has_bias else None)
    x_in = x_new
    if gather != list(range(kept_in.numel())):
        x_in = b.call_method("index_select", x_new, 1, b.buffer(node.name + "_gather", torch.tensor(gather)))
    out = b.call_module(node.target, layer, x_in)
    if real != list(range(groups * p.width_out)):
        out = b.call_method("index_select", out, 1, b.buffer(node.name + "_outputs", torch.tensor(real)))
    return out
