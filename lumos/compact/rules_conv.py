"""Compaction rules for convolutional models (registered at import time).

Feature maps ``(N, C, *spatial)`` carry their channels on dim 1. The rules here:

- :class:`ConvRule`: ``nn.Conv1d/2d/3d``, ``nn.ConvTranspose1d/2d/3d`` and lumos' gated twins.
  Kept input channels select weight columns, kept outputs rows; gate values fold into weight
  and bias. A dropped input channel holding a constant ``c`` contributes ``c`` times the sum
  of the kernel taps that fall inside the input: without zero padding that is the same at
  every position and folds into the bias; with zero padding (or in a transposed conv) it
  differs near the borders, and the compacted model adds the exact map
  ``conv(ones, sum_j c_j W[:, j])`` (one small one-channel convolution, see
  :func:`conv_of_ones`). Grouped convolutions keep every channel (exact, no savings).
- :class:`GroupNormRule`: a group of channels is kept or dropped whole.
- :class:`ChannelPassThrough`: pooling and upsampling, which map a constant channel to the
  same constant (average pooling that counts zero padding does not: it stays whole).
- :class:`FlattenRule`: ``(N, C, *S) -> (N, C * S)`` gives channel ``c`` the features
  ``c*S .. c*S + S - 1`` (what the following ``nn.Linear`` selects).
- :class:`CatRule`: concatenation along the channels shifts each operand's ids by its offset
  (U-Net skips); along another dim it ties the operands' channels.
- :class:`ShapeRead`: ``x.size(0)``, ``x.shape[0]`` read no channel count and pin nothing.

Function and method rules fall back to the rule registered before them for calls they do not
recognise (so another module's ``view`` or ``cat`` rule keeps working), and to
:class:`~lumos.compact.rules.Opaque` otherwise.
"""
from __future__ import annotations

import copy
import math
import operator

import torch
import torch.nn.functional as F
from torch import fx, nn

from ..nn.conv import GATED_CONVS
from .rules import (FUNCTION_RULES, METHOD_RULES, ChannelMapRule, Elementwise, LayerCost, NormRule, Opaque, Rule,
                    const_by_function, eval_mask, keep_inputs_whole, register_function_rule,
                    register_method_rule, register_module_rule)
from .trace import node_shape

_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_TRANSPOSED = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
_CONV_FNS = (F.conv1d, F.conv2d, F.conv3d)
_TRANSPOSED_FNS = (F.conv_transpose1d, F.conv_transpose2d, F.conv_transpose3d)


# -- helper ops called by compacted graphs ----------------------------------------------------
def conv_of_ones(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                 transposed: bool, stride, padding, dilation, output_padding,
                 pad_ones) -> torch.Tensor:
    """A convolution of a one-channel map of ones shaped like ``x``'s positions.

    This is what input channels holding constants contribute to a convolution, borders
    included: ``weight`` holds ``sum_j c_j W[:, j]`` over those channels. ``pad_ones`` (or None)
    pads the ones with ones first (a conv whose ``padding_mode`` is not ``zeros``).

    Shapes:
        x ``(N, C, *S)``; weight ``(C_out, 1, *k)`` (transposed: ``(1, C_out, *k)``);
        returns ``(1, C_out, *S_out)``.
    """
    ones = x.new_ones((1, 1) + tuple(x.shape[2:]))
    if pad_ones is not None:
        ones = F.pad(ones, pad_ones, value=1.0)
    n = x.dim() - 2
    weight = weight.to(x.dtype)
    bias = bias.to(x.dtype) if bias is not None else None
    if transposed:
        return _TRANSPOSED_FNS[n - 1](ones, weight, bias, stride, padding, output_padding, 1, dilation)
    return _CONV_FNS[n - 1](ones, weight, bias, stride, padding, dilation)


def conv_constant_output(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                         transposed: bool, stride, padding, dilation, output_padding,
                         pad_ones) -> torch.Tensor:
    """The output of a convolution none of whose inputs is kept: :func:`conv_of_ones` for every row.

    Shapes: x ``(N, C, *S)``; returns ``(N, C_out, *S_out)`` (a broadcast view).
    """
    y = conv_of_ones(x, weight, bias, transposed, stride, padding, dilation, output_padding, pad_ones)
    return y.expand((x.shape[0],) + tuple(y.shape[1:]))


def one_zero_channel(x: torch.Tensor) -> torch.Tensor:
    """``(1, 1, *S)`` zeros shaped like ``x``'s positions: a stand-in input for ops that reject
    tensors with no channels (pooling, interpolation), used to learn their output positions."""
    return x.new_zeros((1, 1) + tuple(x.shape[2:]))


def no_channels(y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``(N, 0, *S_y)``: ``x``'s batch, no channel, ``y``'s positions (a removed layer's output)."""
    return x.new_zeros((x.shape[0], 0) + tuple(y.shape[2:]))


# -- small tools ------------------------------------------------------------------------------
def _call_args(node: fx.Node, names: tuple[str, ...]) -> dict:
    """A call's arguments by name (positional ones named after ``names``)."""
    args = dict(zip(names, node.args))
    args.update(node.kwargs)
    return args


def _as_tuple(value, n: int) -> tuple:
    return tuple(value) if isinstance(value, (tuple, list)) else (value,) * n


def _emit_like(node: fx.Node, b, args: tuple, kwargs: dict) -> fx.Node:
    """Emit ``node``'s op (its module deep-copied) on new arguments."""
    if node.op == "call_module":
        b.attrs[node.target] = copy.deepcopy(b.plan.module(node))
    return b.graph.create_node(node.op, node.target, args, kwargs)


def _emit_without_channels(node: fx.Node, b) -> fx.Node:
    """``node``'s output with no channel left: its op runs on one zero channel for the positions."""
    x_new = b.env[node.args[0]]
    one = b.call_function(one_zero_channel, (x_new,))
    rest = fx.map_arg(node.args[1:], b.env.__getitem__)
    y = _emit_like(node, b, (one,) + tuple(rest), fx.map_arg(node.kwargs, b.env.__getitem__))
    return b.call_function(no_channels, (y, x_new))


class _Fallback(Rule):
    """A rule that hands the nodes it does not recognise to another rule.

    Subclasses set ``self.delegate`` in ``analyze`` when the node is not theirs; every other
    method then forwards to it.
    """

    def __init__(self, fallback=None):
        self._fallback = fallback
        self.delegate: Rule | None = None

    def _give_up(self, node, plan) -> None:
        self.delegate = self._fallback() if self._fallback is not None else Opaque()
        self.delegate.analyze(node, plan)

    def layer_cost(self, node, plan):
        return self.delegate.layer_cost(node, plan) if self.delegate else None

    def params(self, node, plan):
        return self.delegate.params(node, plan) if self.delegate else 0

    def build(self, node, b):
        if self.delegate is not None:
            return self.delegate.build(node, b)
        return self._build(node, b)

    def _build(self, node, b):
        b.copy(node)


def _register_function(targets, rule_type) -> None:
    """Register ``rule_type`` for each target, falling back to the rule it replaces."""
    for target in targets:
        previous = FUNCTION_RULES.get(target)
        register_function_rule([target], lambda previous=previous: rule_type(previous))


def _register_method(names, rule_type) -> None:
    for name in names:
        previous = METHOD_RULES.get(name)
        register_method_rule([name], lambda previous=previous: rule_type(previous))


# -- convolutions -----------------------------------------------------------------------------
class ConvRule(ChannelMapRule):
    """A (transposed) convolution, plain or gated: see the module docstring.

    Kept whole (every input and output channel, gate values still folded) when it has
    ``groups > 1``, gets an ``output_size`` argument, or sees an unbatched input.
    """

    def __init__(self, module: nn.Module):
        self.transposed = isinstance(module, _TRANSPOSED)
        self.plain = next(t for t in _CONVS + _TRANSPOSED if isinstance(module, t))
        self.spatial = len(module.kernel_size)

    # structure ---------------------------------------------------------------------------
    def _whole(self, node, plan) -> bool:
        module = plan.module(node)
        shape = node_shape(node.args[0])
        return (module.groups != 1 or len(node.args) > 1 or bool(node.kwargs) or shape is None
                or len(shape) != self.spatial + 2)

    def channel_dim(self, ndim):
        return 1

    def analyze(self, node, plan):
        if self._whole(node, plan):
            keep_inputs_whole(node, plan)
            plan.pin(plan.new_space(node, 1))
            return
        self.analyze_channels(node, plan)

    def layer_cost(self, node, plan):
        if self._whole(node, plan):
            return None
        module = plan.module(node)
        # FLOPs: every (input position, tap) pair of a transposed conv, every (output position, tap) of a conv
        shape = node_shape(node.args[0] if self.transposed else node)
        return LayerCost(self._input_space(node, plan), module.in_channels, self._gates(module)[0],
                         plan.space_of[node], float(math.prod(module.kernel_size)),
                         module.bias is not None, shape.numel() / max(shape[1], 1))


    def params(self, node, plan):
        module = plan.module(node)
        bias = module.bias is not None
        if self._whole(node, plan):
            return module.weight.numel() + (module.bias.numel() if bias else 0)
        kept_in, kept_out = self._kept_in(node, plan, plan.module(node).in_channels)[0].numel(), plan.width(node)
        if kept_in == 0 or kept_out == 0:
            return 0
        return kept_out * kept_in * math.prod(module.kernel_size) + (kept_out if bias else 0)

    # weights -----------------------------------------------------------------------------
    def _folded(self, module) -> tuple[torch.Tensor, torch.Tensor]:
        """Weight (torch's layout) and bias with the eval gate values folded in, float64."""
        in_gate, out_gate = self._gates(module)
        weight = module.weight.detach().double().cpu()
        g, c_in, c_out = module.groups, module.in_channels, module.out_channels
        m_in, m_out = eval_mask(in_gate, c_in), eval_mask(out_gate, c_out)
        k = [1] * self.spatial
        if self.transposed:  # (C_in, C_out / g, *k): output channel o = group * (C_out / g) + j
            weight = weight * m_in.reshape(-1, 1, *k)
            weight = (weight.reshape(g, c_in // g, c_out // g, *weight.shape[2:])
                      * m_out.reshape(g, 1, c_out // g, *k)).reshape(weight.shape)
        else:  # (C_out, C_in / g, *k): input channel of weight[o, j] = group(o) * (C_in / g) + j
            m_in_rows = m_in.reshape(g, 1, c_in // g).expand(g, c_out // g, c_in // g)
            weight = weight * m_out.reshape(-1, 1, *k) * m_in_rows.reshape(c_out, c_in // g, *k)
        bias = module.bias.detach().double().cpu() * m_out if module.bias is not None \
            else torch.zeros(c_out, dtype=torch.float64)
        return weight, bias

    def _plain_layer(self, module, c_in: int, c_out: int, weight: torch.Tensor, bias: torch.Tensor | None):
        kwargs = dict(kernel_size=module.kernel_size, stride=module.stride, padding=module.padding,
                      dilation=module.dilation, groups=module.groups, bias=bias is not None,
                      padding_mode=module.padding_mode, device="meta")
        if self.transposed:
            kwargs["output_padding"] = module.output_padding
        layer = self.plain(c_in, c_out, **kwargs)
        layer.weight = nn.Parameter(weight.to(module.weight).contiguous())
        if bias is not None:
            layer.bias = nn.Parameter(bias.to(module.weight).contiguous())
        return layer

    def _padding_breaks_constants(self, module) -> bool:
        """Whether a constant input channel gives a non-constant output (zero padding, transposed)."""
        if self.transposed:
            return True
        if module.padding_mode != "zeros" or module.padding == "valid":
            return False
        if module.padding == "same":
            return any(d * (k - 1) > 0 for d, k in zip(module.dilation, module.kernel_size))
        return any(p > 0 for p in module.padding)

    def _ones_spec(self, module) -> tuple:
        """The static arguments of :func:`conv_of_ones` for this layer."""
        if self.transposed:
            return (True, module.stride, module.padding, module.dilation, module.output_padding, None)
        if module.padding_mode != "zeros":
            pad_ones = list(module._reversed_padding_repeated_twice)
            return (False, module.stride, 0, module.dilation, 0, pad_ones)
        return (False, module.stride, module.padding, module.dilation, 0, None)

    # build -------------------------------------------------------------------------------
    def build(self, node, b):
        module = b.plan.module(node)
        if self._whole(node, b.plan):
            return self._build_whole(node, b, module)
        weight, bias = self._folded(module)
        w_oi = weight.transpose(0, 1) if self.transposed else weight  # (C_out, C_in, *k)
        kept_in, removed_in = self._kept_in(node, b.plan, module.in_channels)
        kept_out = b.plan.kept(b.plan.space_of[node])
        w_const = self._constant_kernel(node, b, w_oi, removed_in)
        uniform = not self._padding_breaks_constants(module)
        fold = w_const.flatten(1).sum(1) if uniform else torch.zeros_like(bias)
        b.const[node] = bias + fold  # exact for closed channels (zero rows); unread otherwise
        x_new, dtype = b.env[node.args[0]], module.weight.dtype
        spec = self._ones_spec(module)
        if kept_out.numel() == 0:  # removed layer: no channel, the output's positions
            probe_weight = b.add_buffer(node.target, torch.zeros((1, 1) + tuple(module.kernel_size), dtype=dtype))
            probe = b.call_function(conv_of_ones, (x_new, probe_weight, None) + spec)
            b.env[node] = b.call_function(no_channels, (probe, x_new))
            return
        # the kept rows of the constant kernel, shaped as a one-input-channel conv weight
        const_weight = w_const[kept_out].unsqueeze(0 if self.transposed else 1).to(dtype)
        if kept_in.numel() == 0:  # no input left: the output is the constants' convolution
            args = (x_new, b.add_buffer(node.target, const_weight),
                    b.add_buffer(node.target, bias[kept_out].to(dtype)))
            b.env[node] = b.call_function(conv_constant_output, args + spec)
            return
        w_new = w_oi[kept_out][:, kept_in]
        layer = self._plain_layer(module, kept_in.numel(), kept_out.numel(),
                                  w_new.transpose(0, 1) if self.transposed else w_new,
                                  (bias + fold)[kept_out] if module.bias is not None else None)
        out = b.call_module(node.target, layer, (x_new,))
        if module.bias is None and bool(fold[kept_out].abs().gt(0).any()):
            # no bias to fold into: add the dropped inputs' constant contribution as a buffer
            extra = fold[kept_out].reshape(-1, *[1] * self.spatial).to(dtype)
            out = b.call_function(operator.add, (out, b.add_buffer(node.target, extra)))
        if not uniform and bool(w_const[kept_out].abs().gt(0).any()):
            border = b.call_function(conv_of_ones, (x_new, b.add_buffer(node.target, const_weight), None) + spec)
            out = b.call_function(operator.add, (out, border))
        b.env[node] = out

    def _constant_kernel(self, node, b, w_oi: torch.Tensor, removed_in: torch.Tensor) -> torch.Tensor:
        """``sum_j c_j W[:, j]`` over the dropped input channels ``j`` with constants ``c_j``:
        ``(C_out, *k)``, the kernel of one extra input channel of ones."""
        if removed_in.numel() == 0:
            return torch.zeros(w_oi.shape[:1] + w_oi.shape[2:], dtype=w_oi.dtype)
        const_in = b.const[node.args[0]][removed_in]
        return (w_oi[:, removed_in] * const_in.reshape(1, -1, *[1] * self.spatial)).sum(1)

    def _build_whole(self, node, b, module):
        if not any(g is not None for g in self._gates(module)):
            b.copy(node)
            return
        weight, bias = self._folded(module)
        layer = self._plain_layer(module, module.in_channels, module.out_channels, weight,
                                  bias if module.bias is not None else None)
        b.attrs[node.target] = layer
        args, kwargs = fx.map_arg(node.args, b.env.__getitem__), fx.map_arg(node.kwargs, b.env.__getitem__)
        b.env[node] = b.graph.create_node("call_module", node.target, args, kwargs)


# -- normalisation ----------------------------------------------------------------------------
class GroupNormRule(NormRule):
    """``nn.GroupNorm``: each group's channels are tied (a group is kept or dropped whole); the
    kept groups make a smaller GroupNorm. A dropped group holds constants: its output is the
    group norm of those constants (computed once)."""

    def __init__(self):
        self.opaque = False

    def analyze(self, node, plan):
        module: nn.GroupNorm = plan.module(node)
        space = plan.space_of.get(node.args[0])
        shape = node_shape(node.args[0])
        if space is None or space.dim != 1 or shape is None or len(shape) < 2:
            self.opaque = True
            return Opaque().analyze(node, plan)
        self.opaque = False
        out = plan.same_space(node, node.args[0])
        per = module.num_channels // module.num_groups
        for g in range(module.num_groups):
            first = out.start + g * per
            plan.tie_ids(range(first, first + per - 1), range(first + 1, first + per))

    def build(self, node, b):
        if self.opaque:
            return b.copy(node)
        module: nn.GroupNorm = b.plan.module(node)
        kept = b.plan.kept(b.plan.space_of[node])
        x_new = b.env[node.args[0]]
        per = module.num_channels // module.num_groups
        if kept.numel() == 0:
            b.env[node] = x_new
        else:
            new = nn.GroupNorm(kept.numel() // per, kept.numel(), eps=module.eps, affine=module.affine,
                               device="meta")
            if module.affine:
                new.weight = nn.Parameter(module.weight.detach()[kept].clone())
                new.bias = nn.Parameter(module.bias.detach()[kept].clone())
            b.env[node] = b.call_module(node.target, new, (x_new,))
        weight = module.weight.detach().double().cpu() if module.affine else None
        bias = module.bias.detach().double().cpu() if module.affine else None
        const = b.const[node.args[0]].reshape(1, -1, 1)
        b.const[node] = F.group_norm(const, module.num_groups, weight, bias, module.eps).reshape(-1)


# -- pooling, upsampling ----------------------------------------------------------------------
class ChannelPassThrough(Rule):
    """Ops that act on each channel alone and keep a constant channel constant (max pooling,
    average pooling without counted zero padding, adaptive pooling, interpolation): channels
    pass through on dim 1, a dropped channel keeps its constant. Anything else stays whole."""

    def __init__(self, spatial: int | None = None, exact=lambda node, plan: True):
        self.spatial, self.exact = spatial, exact
        self.opaque = False

    def analyze(self, node, plan):
        x = node.args[0] if node.args else None
        space = plan.space_of.get(x) if isinstance(x, fx.Node) else None
        shape_in, shape_out = (node_shape(x) if space is not None else None), node_shape(node)
        if (space is None or space.dim != 1 or shape_out is None or len(shape_out) != len(shape_in)
                or shape_out[:2] != shape_in[:2] or len(shape_in) < 3
                or (self.spatial is not None and len(shape_in) != self.spatial + 2)
                or not self.exact(node, plan)):
            self.opaque = True
            return Opaque().analyze(node, plan)
        plan.same_space(node, x)

    def build(self, node, b):
        if self.opaque:
            return b.copy(node)
        b.const[node] = b.const[node.args[0]]
        if b.plan.width(node) > 0:
            b.copy(node)
        else:  # pooling and interpolation reject tensors without channels
            b.env[node] = _emit_without_channels(node, b)


def _zero_or_uncounted_padding(padding, count_include_pad) -> bool:
    return not count_include_pad or all(p == 0 for p in _as_tuple(padding, 1))


def _avg_pool_module_exact(node, plan) -> bool:
    module = plan.module(node)
    return (getattr(module, "divisor_override", None) is None
            and _zero_or_uncounted_padding(module.padding, module.count_include_pad))


_AVG_POOL_ARGS = ("input", "kernel_size", "stride", "padding", "ceil_mode", "count_include_pad",
                  "divisor_override")


def _avg_pool_function_exact(node, plan) -> bool:
    args = _call_args(node, _AVG_POOL_ARGS)
    return (args.get("divisor_override") is None
            and _zero_or_uncounted_padding(args.get("padding", 0), args.get("count_include_pad", True)))


# -- flatten / view / reshape -----------------------------------------------------------------
class FlattenRule(_Fallback):
    """``(N, C, *S)`` flattened to ``(N, C * S)``: channel ``c`` owns features ``c*S .. c*S+S-1``;
    to ``(N, C, S)`` (or the same shape): channels pass through. ``nn.Flatten``,
    ``torch.flatten``, ``x.flatten``, ``x.view``, ``x.reshape`` and ``torch.reshape`` all reorder
    memory the same way (row-major), so the output shape says which case applies. The compacted
    model calls ``torch.flatten`` (a ``view`` with a hard-coded width would break)."""

    def __init__(self, fallback=None):
        super().__init__(fallback)
        self.kind: str | None = None  # "same", "positions" or "blocks" once analyzed as ours

    @staticmethod
    def _kind(shape_in, shape_out) -> str | None:
        if shape_out is None or len(shape_in) < 3:
            return "same" if shape_out is not None and tuple(shape_out) == tuple(shape_in) else None
        n, c, positions = shape_in[0], shape_in[1], math.prod(shape_in[2:])
        return {tuple(shape_in): "same", (n, c, positions): "positions",
                (n, c * positions): "blocks"}.get(tuple(shape_out))

    def analyze(self, node, plan):
        x = node.args[0] if node.args else node.kwargs.get("input")
        space = plan.space_of.get(x) if isinstance(x, fx.Node) else None
        if space is None:
            if not isinstance(x, fx.Node) or node_shape(x) is None:
                return self._give_up(node, plan)
            return  # untracked input: nothing changes width, the op is copied
        self.kind = self._kind(node_shape(x), node_shape(node)) if space.dim == 1 else None
        if self.kind is None:
            return self._give_up(node, plan)
        if self.kind != "blocks":
            plan.same_space(node, x)
            return
        out = plan.new_space(node, 1, produced=False)
        positions = out.size // space.size
        plan.tie_ids(range(out.start, out.start + out.size),
                     space.ids.repeat_interleave(positions).tolist())

    def _build(self, node, b):
        x = node.args[0] if node.args else node.kwargs.get("input")
        if self.kind is None:
            return b.copy(node)
        x_new = b.env[x]
        if self.kind == "same":
            b.env[node] = x_new
            b.const[node] = b.const[x]
            return
        start = 1 if self.kind == "blocks" else 2
        b.env[node] = b.call_function(torch.flatten, (x_new, start))
        positions = b.plan.space_of[node].size // b.plan.space_of[x].size if self.kind == "blocks" else 1
        b.const[node] = b.const[x].repeat_interleave(positions)


class FlattenModuleRule(FlattenRule):
    """``nn.Flatten`` (see :class:`FlattenRule`)."""

    def __init__(self, module: nn.Flatten):
        super().__init__(None)


# -- concatenation ----------------------------------------------------------------------------
class CatRule(_Fallback):
    """``torch.cat`` / ``torch.concat``. Along the tracked dim: output ids ``offset + i`` are tied
    to each operand's ids (a U-Net skip's channels keep their place after the decoder's).
    Along another dim: the operands' channels are tied one to one; the output is then marked
    as computed (a dropped channel could hold different constants in different operands, which
    is no constant), so a group read downstream is kept."""

    def analyze(self, node, plan):
        args = _call_args(node, ("tensors", "dim"))
        tensors, dim = args.get("tensors"), args.get("dim", 0)
        if not isinstance(tensors, (list, tuple)) or not tensors or not isinstance(dim, int):
            return self._give_up(node, plan)
        spaces = [plan.space_of.get(t) if isinstance(t, fx.Node) else None for t in tensors]
        shape = node_shape(node)
        if shape is None or any(s is None for s in spaces) or len({s.dim for s in spaces}) != 1:
            return self._give_up(node, plan)
        tracked = spaces[0].dim
        self.along_channels = dim % len(shape) == tracked
        if self.along_channels:
            out = plan.new_space(node, tracked, produced=False)
            offset = out.start
            for space in spaces:
                plan.tie_ids(range(offset, offset + space.size), space.ids.tolist())
                offset += space.size
            return
        if len({s.size for s in spaces}) != 1:
            return self._give_up(node, plan)
        out = plan.new_space(node, tracked, produced=True)
        for space in spaces:
            plan.tie(out, space)

    def _build(self, node, b):
        b.copy(node)
        if node not in b.plan.space_of:
            return
        tensors = _call_args(node, ("tensors", "dim"))["tensors"]
        if self.along_channels:
            b.const[node] = torch.cat([b.const[t] for t in tensors])
        else:  # marked computed: its dropped channels are never read
            b.const[node] = torch.zeros(b.plan.space_of[node].size, dtype=torch.float64)


# -- shape reads ------------------------------------------------------------------------------
_HARMLESS_ATTRS = {"dtype", "device", "ndim", "is_cuda", "requires_grad", "layout"}


class ShapeRead(_Fallback):
    """``x.size(d)``, ``x.shape[d]``, ``x.dim()``, ``x.dtype``: reading a size other than the
    channel count pins nothing (``x.view(x.size(0), -1)`` is how CNNs flatten). Reading the
    channel count (or the whole shape, used in unknown ways) keeps the channels whole."""

    def analyze(self, node, plan):
        x = node.args[0] if node.args else None
        space = plan.space_of.get(x) if isinstance(x, fx.Node) else None
        if space is None or self._reads_no_width(node, x, space):
            return
        self._give_up(node, plan)

    @staticmethod
    def _reads_no_width(node, x, space) -> bool:
        ndim = len(node_shape(x))
        if node.op == "call_method" and node.target == "dim":
            return True
        if node.op == "call_method" and node.target == "size":
            dim = _call_args(node, ("self", "dim")).get("dim")
            return isinstance(dim, int) and dim % ndim != space.dim
        if node.op == "call_function" and node.target is getattr:
            attr = node.args[1] if len(node.args) > 1 else None
            if attr in _HARMLESS_ATTRS:
                return True
            return attr == "shape" and all(
                user.op == "call_function" and user.target is operator.getitem
                and isinstance(user.args[1], int) and user.args[1] % ndim != space.dim
                for user in node.users)
        return False


# -- registration -----------------------------------------------------------------------------
def _spatial_of(cls: type) -> int | None:
    """1, 2 or 3 for a ``...1d/2d/3d`` class or function name, None otherwise."""
    name = getattr(cls, "__name__", "")
    return int(name[-2]) if name[-2:] in ("1d", "2d", "3d") else None


def _pass_through_modules(types, exact=lambda node, plan: True) -> None:
    register_module_rule(types, lambda m: ChannelPassThrough(_spatial_of(type(m)), exact))


def _pass_through_functions(targets, exact=lambda node, plan: True) -> None:
    for target in targets:
        spatial = _spatial_of(target)
        register_function_rule([target], lambda spatial=spatial: ChannelPassThrough(spatial, exact))


register_module_rule(_CONVS + _TRANSPOSED + GATED_CONVS, ConvRule)
register_module_rule(nn.GroupNorm, lambda m: GroupNormRule())
_pass_through_modules((nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d,
                       nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d,
                       nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d))
_pass_through_modules((nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d), _avg_pool_module_exact)
register_module_rule(nn.Upsample, lambda m: ChannelPassThrough())  # and UpsamplingNearest2d/Bilinear2d
_pass_through_functions((F.max_pool1d, F.max_pool2d, F.max_pool3d, F.adaptive_max_pool1d,
                         F.adaptive_max_pool2d, F.adaptive_max_pool3d, F.adaptive_avg_pool1d,
                         F.adaptive_avg_pool2d, F.adaptive_avg_pool3d, torch.max_pool1d, torch.max_pool2d,
                         torch.max_pool3d))
_pass_through_functions((F.avg_pool1d, F.avg_pool2d, F.avg_pool3d), _avg_pool_function_exact)
_pass_through_functions((F.interpolate, F.upsample, F.upsample_nearest, F.upsample_bilinear))
register_function_rule((F.dropout1d, F.dropout2d, F.dropout3d, F.alpha_dropout, F.feature_alpha_dropout),
                       lambda: Elementwise(const_by_function))
register_module_rule(nn.Flatten, FlattenModuleRule)
_register_function((torch.flatten, torch.reshape), FlattenRule)
_register_method(("flatten", "view", "reshape"), FlattenRule)
_register_function((torch.cat, torch.concat, torch.concatenate), CatRule)
_register_function((getattr,), ShapeRead)
_register_method(("size", "dim"), ShapeRead)
