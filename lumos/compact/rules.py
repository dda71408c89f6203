"""Compaction rules, one per op kind: how channels flow (analyze) and how the op is rebuilt (build).

A rule's ``analyze(node, plan)`` gives ``node``'s output a channel space and records ties,
production, consumption and pins on the :class:`~lumos.compact.plan.ChannelPlan`. Its
``build(node, b)`` emits the compacted op into the :class:`~lumos.compact.build.Builder` and
records the constant value of every dropped channel of the output (what a dropped channel
holds in the gated model: 0 after a closed gate, ``f(0)`` after an activation...), so that a
consumer can fold it into its bias. ``params(node, plan)`` is the parameter count of the
compacted op, which :func:`lumos.report` predicts without building.
"""
from __future__ import annotations

import copy
import operator
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import fx, nn

from ..nn import FeatureGate, GatedLinear
from .modules import InputSelect, constant_like, zero_width
from .plan import ChannelPlan, Space
from .trace import node_shape


def _input_nodes(node: fx.Node) -> list[fx.Node]:
    return list(node.all_input_nodes)


def _broadcast_view(vector: torch.Tensor, ndim: int, dim: int) -> torch.Tensor:
    return vector.reshape([-1 if d == dim else 1 for d in range(ndim)])


@dataclass
class LayerCost:
    """How a layer's size follows its input and output widths (for the differentiable penalty).

    ``params = in * out * weight_per_pair (+ out if bias)``; FLOPs of one forward over the
    traced example ``= 2 * in * out * weight_per_pair * positions`` where ``positions`` is the
    number of output positions per channel (rows, pixels, nodes...) in that forward.

    Attributes:
        in_space: the input channels' space (None: the contracted dim is not tracked).
        in_size: number of input channels.
        in_gate: the layer's own input-column gate, if any.
        out_space: the output channels' space.
    """

    in_space: Space | None
    in_size: int
    in_gate: object
    out_space: Space
    weight_per_pair: float
    bias: bool
    positions: float


class Rule:
    """Base rule: nothing tracked, op copied as is."""

    reports_width = False  # True for layers whose output width lumos.report lists

    def layer_cost(self, node: fx.Node, plan: ChannelPlan) -> LayerCost | None:
        """The layer's cost structure, or None when its size does not depend on gated widths."""
        return None

    def analyze(self, node: fx.Node, plan: ChannelPlan) -> None:
        pass

    def build(self, node: fx.Node, b) -> None:
        b.copy(node)

    def params(self, node: fx.Node, plan: ChannelPlan) -> int:
        return 0


class GetAttr(Rule):
    """A tensor attribute read in ``forward`` (copied; a parameter stays a parameter)."""

    def params(self, node, plan):
        obj = plan.gm
        for part in node.target.split("."):
            obj = getattr(obj, part)
        return obj.numel() if isinstance(obj, nn.Parameter) else 0


def keep_inputs_whole(node: fx.Node, plan: ChannelPlan) -> None:
    """Every tracked input of ``node`` keeps all its channels, and ``node`` reads them all."""
    for arg in _input_nodes(node):
        if arg in plan.space_of:
            plan.pin(plan.space_of[arg])
            plan.consume(plan.space_of[arg])


class Opaque(Rule):
    """An op lumos has no rule for: its inputs and output keep every channel (safe and exact)."""

    def analyze(self, node, plan):
        keep_inputs_whole(node, plan)
        if node_shape(node) is not None and len(node_shape(node)) > 0:
            plan.pin(plan.new_space(node, -1))

    def params(self, node, plan):
        if node.op == "call_module":
            return sum(p.numel() for p in plan.module(node).parameters())
        return 0


class Placeholder(Rule):
    """A model input. The first one carries the features (``feature_dim``); inputs stay whole
    unless ``keep_input_shape=False``, where the first one shrinks to the kept features."""

    def __init__(self, feature_dim: int, keep_input_shape: bool):
        self.feature_dim, self.keep_input_shape = feature_dim, keep_input_shape

    def analyze(self, node, plan):
        shape = node_shape(node)
        if shape is None or len(shape) == 0:
            return
        first = node is next(iter(plan.gm.graph.nodes))
        space = plan.new_space(node, self.feature_dim if first else -1)
        if not (first and not self.keep_input_shape):
            plan.pin(space)


class Output(Rule):
    """The model output keeps every channel."""

    def analyze(self, node, plan):
        keep_inputs_whole(node, plan)


def eval_mask(gate, n: int) -> torch.Tensor:
    """``(n,)`` float64 CPU eval mask of ``gate`` (all ones when there is no gate), for folding."""
    return torch.ones(n, dtype=torch.float64) if gate is None else gate.eval_mask().double().cpu()


class FeatureGateRule(Rule):
    """``x * m`` on the input features: closed features are dropped (constant 0)."""

    def analyze(self, node, plan):
        fg: FeatureGate = plan.module(node)
        x = node.args[0]
        in_space = plan.space_of[x]
        kept = fg.gate.kept().cpu()
        out_space = plan.new_space(node, in_space.dim, produced=kept, gate=fg.gate)
        # an open feature nothing downstream reads is not read from the input either
        plan.consume(in_space, lambda: kept & plan.kept_mask(out_space))

    def build(self, node, b):
        fg: FeatureGate = b.plan.module(node)
        x = node.args[0]
        in_kept = b.plan.kept(b.plan.space_of[x])
        out_space = b.plan.space_of[node]
        out_kept = b.plan.kept(out_space)
        # positions of the output's kept features inside the (possibly already reduced) input
        position = torch.full((in_kept.max().item() + 1 if in_kept.numel() else 0,), -1, dtype=torch.long)
        position[in_kept] = torch.arange(in_kept.numel())
        index = position[out_kept]
        scale = eval_mask(fg.gate, fg.n_features)[out_kept].float()
        scale = None if bool((scale == 1).all()) else scale
        if index.numel() == in_kept.numel() and scale is None:
            b.env[node] = b.env[x]
        else:
            b.env[node] = b.call_module(node.target, InputSelect(index, scale, fg.dim), (b.env[x],))


class ChannelMapRule(Rule):
    """A layer that maps the input channels on one dim to output channels on the same dim
    (linear: the last dim; convolution: dim 1), with optional ``in_gate`` / ``out_gate``.

    Its output channels are produced where ``out_gate`` is open; an input channel is read where
    ``in_gate`` is open and some output channel survives.
    """

    reports_width = True

    def channel_dim(self, ndim: int) -> int:
        """The channel dim of an ``ndim``-dimensional input or output."""
        raise NotImplementedError

    @staticmethod
    def _gates(module):
        return getattr(module, "in_gate", None), getattr(module, "out_gate", None)

    def _input_space(self, node, plan):
        space = plan.space_of.get(node.args[0])
        ndim = len(node_shape(node.args[0]))
        return space if space is not None and space.dim == self.channel_dim(ndim) else None

    def analyze_channels(self, node, plan) -> None:
        """The analysis shared by every channel map (see the class docstring)."""
        in_gate, out_gate = self._gates(plan.module(node))
        x = node.args[0]
        if x in plan.space_of and self._input_space(node, plan) is None:
            plan.pin(plan.space_of[x])  # channels tracked on another dim than the one we contract
        produced = out_gate.kept().cpu() if out_gate is not None else True
        out_space = plan.new_space(node, self.channel_dim(len(node_shape(node))), produced=produced,
                                   gate=out_gate)
        in_space = self._input_space(node, plan)
        if in_space is not None:
            open_in = in_gate.kept().cpu() if in_gate is not None else torch.ones(in_space.size, dtype=torch.bool)
            plan.consume(in_space, lambda: open_in & bool(plan.kept_mask(out_space).any()))

    def analyze(self, node, plan):
        self.analyze_channels(node, plan)

    def _kept_in(self, node, plan, k):
        """Kept and removed input channels (all kept when the input is not tracked on our dim)."""
        space = self._input_space(node, plan)
        if space is None:
            return torch.arange(k), torch.zeros(0, dtype=torch.long)
        return plan.kept(space), plan.removed(space)


class LinearRule(ChannelMapRule):
    """``nn.Linear`` and :class:`lumos.nn.GatedLinear`: kept inputs select columns, kept outputs
    rows; gate values and dropped inputs' constants fold into weight and bias."""

    def channel_dim(self, ndim):
        return ndim - 1

    def layer_cost(self, node, plan):
        module = plan.module(node)
        out_shape = node_shape(node)
        return LayerCost(self._input_space(node, plan), module.weight.shape[1], self._gates(module)[0],
                         plan.space_of[node], 1.0, module.bias is not None,
                         out_shape.numel() / max(out_shape[-1], 1))

    def params(self, node, plan):
        module = plan.module(node)
        kept_in, _ = self._kept_in(node, plan, module.weight.shape[1])
        kept_out = plan.width(node)
        if kept_out == 0 or kept_in.numel() == 0:
            return 0
        return kept_out * kept_in.numel() + (kept_out if module.bias is not None else 0)

    def build(self, node, b):
        module = b.plan.module(node)
        in_gate, out_gate = self._gates(module)
        weight = module.weight.detach().double().cpu()
        n, k = weight.shape
        m_in, m_out = eval_mask(in_gate, k), eval_mask(out_gate, n)
        w_eff = weight * m_out[:, None] * m_in[None, :]
        bias = module.bias.detach().double().cpu() * m_out if module.bias is not None else torch.zeros(n, dtype=torch.float64)
        kept_in, removed_in = self._kept_in(node, b.plan, k)
        fold = torch.zeros(n, dtype=torch.float64)
        if removed_in.numel():
            fold = w_eff[:, removed_in] @ b.const[node.args[0]][removed_in]
        full_bias = bias + fold
        b.const[node] = full_bias  # exact for closed rows (zero weights and bias); unread otherwise
        kept_out = b.plan.kept(b.plan.space_of[node])
        x_new = b.env[node.args[0]]
        if kept_out.numel() == 0:
            b.env[node] = b.call_function(zero_width, (x_new, -1))
            return
        if kept_in.numel() == 0:
            value = b.add_buffer(node.target, full_bias[kept_out].to(module.weight.dtype))
            b.env[node] = b.call_function(constant_like, (x_new, value, -1))
            return
        dense = nn.Linear(kept_in.numel(), kept_out.numel(), bias=module.bias is not None,
                          device="meta")
        dense.weight = nn.Parameter(w_eff[kept_out][:, kept_in].to(module.weight))
        if module.bias is not None:
            dense.bias = nn.Parameter(full_bias[kept_out].to(module.weight))
        out = b.call_module(node.target, dense, (x_new,))
        extra = fold[kept_out]
        if module.bias is None and bool(extra.abs().gt(0).any()):
            # no bias to fold into: add the dropped inputs' constant contribution as a buffer
            out = b.call_function(operator.add, (out, b.add_buffer(node.target, extra.to(module.weight.dtype))))
        b.env[node] = out


class Elementwise(Rule):
    """Activations, dropout and arithmetic: channels pass through; tensor operands of equal shape
    (residual add, gating multiply) are tied into one group. A dropped channel's constant is the
    op applied to the operands' constants."""

    def __init__(self, call):
        self.call = call  # call(node, plan_or_builder, args, kwargs) -> value, for constants

    def analyze(self, node, plan):
        args = _input_nodes(node)
        shape = node_shape(node)
        tracked = [a for a in args if a in plan.space_of and node_shape(a) == shape]
        dims = {plan.space_of[a].dim for a in tracked}
        if shape is None or not args or len(tracked) != len(args) or len(dims) != 1:
            return Opaque().analyze(node, plan)
        # tied to its operands: the group's consumers are those of the ops downstream
        space = plan.same_space(node, tracked[0])
        for other in tracked[1:]:
            plan.tie(space, plan.space_of[other])

    def build(self, node, b):
        b.copy(node)
        space = b.plan.space_of.get(node)
        if space is None or any(a not in b.const for a in _input_nodes(node)):
            return  # kept whole (analyze fell back to Opaque, e.g. a parameter operand): no constant needed
        ndim = len(node_shape(node))
        env = {a: _broadcast_view(b.const[a], ndim, space.dim) for a in _input_nodes(node)}
        args = fx.map_arg(node.args, lambda a: env[a])
        kwargs = fx.map_arg(node.kwargs, lambda a: env[a])
        with torch.no_grad():
            b.const[node] = self.call(node, b, args, kwargs).reshape(-1).double()

    def params(self, node, plan):
        return Opaque().params(node, plan)


# How an elementwise node maps its operands' constants (dropped channels' values) to its own.
def const_by_module(node, b, args, kwargs):
    return copy.deepcopy(b.plan.module(node)).eval().double()(*args, **kwargs)


def const_by_function(node, b, args, kwargs):
    return node.target(*args, **kwargs)


def const_by_method(node, b, args, kwargs):
    return getattr(args[0], node.target)(*args[1:], **kwargs)


class NormRule(Rule):
    """A normalisation layer with one affine weight and bias per channel (BatchNorm, GroupNorm):
    kept channels keep their two parameters, or the layer is kept whole (``opaque``)."""

    opaque = False  # set by analyze when the channels cannot be followed: kept whole

    def params(self, node, plan):
        if self.opaque:
            return Opaque().params(node, plan)
        return 2 * plan.width(node) if plan.module(node).affine else 0


class BatchNormRule(NormRule):
    """``nn.BatchNorm1d/2d/3d`` in eval: a per-channel affine map, sliced to the kept channels."""

    def analyze(self, node, plan):
        module = plan.module(node)
        space = plan.space_of.get(node.args[0])
        if space is None or space.dim != 1 or not module.track_running_stats:
            self.opaque = True
            return Opaque().analyze(node, plan)
        plan.same_space(node, node.args[0])

    def build(self, node, b):
        module = b.plan.module(node)
        if self.opaque:
            return b.copy(node)
        kept = b.plan.kept(b.plan.space_of[node])
        if kept.numel() == 0:
            b.env[node] = b.call_function(zero_width, (b.env[node.args[0]], 1))
        else:
            b.env[node] = b.call_module(node.target, self._sliced(module, kept), (b.env[node.args[0]],))
        scale = (module.running_var.double().cpu() + module.eps).rsqrt()
        const = (b.const[node.args[0]] - module.running_mean.double().cpu()) * scale
        if module.affine:
            const = const * module.weight.detach().double().cpu() + module.bias.detach().double().cpu()
        b.const[node] = const

    @staticmethod
    def _sliced(module, kept):
        new = type(module)(kept.numel(), eps=module.eps, momentum=module.momentum,
                           affine=module.affine, track_running_stats=True,
                           device=module.running_mean.device, dtype=module.running_mean.dtype)
        with torch.no_grad():
            new.running_mean.copy_(module.running_mean[kept])
            new.running_var.copy_(module.running_var[kept])
            new.num_batches_tracked.copy_(module.num_batches_tracked)
            if module.affine:
                new.weight.copy_(module.weight[kept])
                new.bias.copy_(module.bias[kept])
        return new


ELEMENTWISE_MODULES = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU, nn.Mish,
    nn.Sigmoid, nn.Tanh, nn.Softplus, nn.Softsign, nn.Hardtanh, nn.Hardswish, nn.Hardsigmoid,
    nn.Tanhshrink, nn.PReLU, nn.Identity, nn.Dropout, nn.AlphaDropout, nn.Dropout1d, nn.Dropout2d,
    nn.Dropout3d,
)
ELEMENTWISE_FUNCTIONS = {
    torch.relu, F.relu, F.relu6, F.leaky_relu, F.elu, F.selu, F.celu, F.gelu, F.silu, F.mish,
    torch.sigmoid, F.sigmoid, torch.tanh, F.tanh, F.softplus, F.softsign, F.hardtanh, F.hardswish,
    F.hardsigmoid, F.dropout, torch.exp, torch.sin, torch.cos, torch.abs, torch.neg, torch.square,
    operator.add, operator.sub, operator.mul, operator.truediv, operator.neg,
    torch.add, torch.sub, torch.mul, torch.div,
}
ELEMENTWISE_METHODS = {
    "relu", "sigmoid", "tanh", "exp", "abs", "neg", "square", "add", "sub", "mul", "div",
    "contiguous", "clone",
}


# The rule table. Later registrations take precedence, so a module of op kinds (conv, attention,
# GNN) adds its rules by calling the register_* functions at import time.
MODULE_RULES: list[tuple[tuple[type, ...], Callable[[nn.Module], Rule]]] = []
FUNCTION_RULES: dict[Callable, Callable[[], Rule]] = {}
METHOD_RULES: dict[str, Callable[[], Rule]] = {}


def register_module_rule(types: type | tuple[type, ...], factory: Callable[[nn.Module], Rule]) -> None:
    """Handle modules of ``types`` with ``factory(module)`` (a Rule); checked before older entries."""
    MODULE_RULES.insert(0, (types if isinstance(types, tuple) else (types,), factory))


def register_function_rule(targets, factory: Callable[[], Rule]) -> None:
    """Handle ``call_function`` nodes whose target is in ``targets``."""
    for target in targets:
        FUNCTION_RULES[target] = factory


def register_method_rule(names, factory: Callable[[], Rule]) -> None:
    """Handle ``call_method`` nodes (``x.name(...)``) whose name is in ``names``."""
    for name in names:
        METHOD_RULES[name] = factory


def _elementwise_module(module: nn.Module) -> Rule:
    if isinstance(module, nn.PReLU) and module.num_parameters != 1:
        return Opaque()  # one slope per channel: not elementwise in the channel sense
    return Elementwise(const_by_module)


register_module_rule(ELEMENTWISE_MODULES, _elementwise_module)
register_module_rule((nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d), lambda m: BatchNormRule())
register_module_rule((GatedLinear, nn.Linear), lambda m: LinearRule())
register_module_rule(FeatureGate, lambda m: FeatureGateRule())
register_function_rule(ELEMENTWISE_FUNCTIONS, lambda: Elementwise(const_by_function))
register_method_rule(ELEMENTWISE_METHODS, lambda: Elementwise(const_by_method))


def rule_for(node: fx.Node, plan: ChannelPlan, placeholder: Placeholder) -> Rule:
    """The rule that handles ``node``: looked up in the rule table, :class:`Opaque` otherwise."""
    if node.op == "placeholder":
        return placeholder
    if node.op == "output":
        return Output()
    if node.op == "get_attr":
        return GetAttr()
    if node.op == "call_module":
        module = plan.module(node)
        for types, factory in MODULE_RULES:
            if isinstance(module, types):
                return factory(module)
        return Opaque()
    if node.op == "call_function" and node.target in FUNCTION_RULES:
        return FUNCTION_RULES[node.target]()
    if node.op == "call_method" and node.target in METHOD_RULES:
        return METHOD_RULES[node.target]()
    return Opaque()
