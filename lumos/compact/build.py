"""Walk a solved channel plan and emit the compacted model as an ``fx.GraphModule``."""
from __future__ import annotations

import copy
from typing import Any

import torch
from torch import fx, nn

from .plan import ChannelPlan
from .rules import Rule


class Builder:
    """Collects the compacted graph, its modules and constants while rules emit ops.

    Attributes:
        plan: the solved :class:`ChannelPlan`.
        graph: the new ``fx.Graph``.
        env: original node -> new node.
        const: original node -> ``(size,)`` float64 values of its dropped channels.
    """

    def __init__(self, plan: ChannelPlan):
        self.plan = plan
        self.graph = fx.Graph()
        self.env: dict[fx.Node, fx.Node] = {}
        self.const: dict[fx.Node, torch.Tensor] = {}
        self.attrs: dict[str, Any] = {}
        tensors = [*plan.gm.parameters(), *plan.gm.buffers()]
        self.device = tensors[0].device if tensors else torch.device("cpu")  # where new layers go

    def copy(self, node: fx.Node) -> fx.Node:
        """Emit ``node`` unchanged (its module deep-copied, its attribute tensor copied)."""
        if node.op == "call_module":
            self.attrs[node.target] = copy.deepcopy(self.plan.module(node))
        elif node.op == "get_attr":
            self.attrs[node.target] = _get_attr(self.plan.gm, node.target)
        new = self.graph.node_copy(node, self.env.__getitem__)
        self.env[node] = new
        return new

    def call_module(self, target: str, module: nn.Module, args: tuple) -> fx.Node:
        """Emit a call of ``module`` registered under ``target`` (the original module's name)."""
        self.attrs[target] = module.to(self.device)
        return self.graph.call_module(target, args)

    def call_function(self, fn, args: tuple) -> fx.Node:
        return self.graph.call_function(fn, args)

    def add_buffer(self, hint: str, value: torch.Tensor) -> fx.Node:
        """Store a constant tensor in the compacted model and return the node that reads it."""
        name = f"{hint.replace('.', '_')}_constant"
        while name in self.attrs:
            name += "_"
        self.attrs[name] = value.detach().to(self.device, copy=True)
        return self.graph.get_attr(name)


def _get_attr(root: nn.Module, target: str):
    obj = root
    for part in target.split("."):
        obj = getattr(obj, part)
    if isinstance(obj, nn.Parameter):
        return nn.Parameter(obj.detach().clone(), requires_grad=obj.requires_grad)
    return obj.detach().clone() if isinstance(obj, torch.Tensor) else copy.deepcopy(obj)


def build(plan: ChannelPlan, rules: dict[fx.Node, Rule], class_name: str) -> fx.GraphModule:
    """Run every rule's ``build`` in graph order and assemble the compacted ``GraphModule``."""
    b = Builder(plan)
    for node in plan.gm.graph.nodes:
        rules[node].build(node, b)
        if node in plan.space_of and node not in b.const:  # kept whole: no dropped channel
            b.const[node] = torch.zeros(plan.space_of[node].size, dtype=torch.float64)
    b.graph.lint()
    gm = fx.GraphModule(b.attrs, b.graph, class_name)
    for name, value in b.attrs.items():  # GraphModule copies plain tensors as attributes: make them buffers
        if isinstance(value, torch.Tensor) and not isinstance(value, nn.Parameter):
            owner, _, leaf = name.rpartition(".")
            module = gm.get_submodule(owner) if owner else gm
            delattr(module, leaf)
            module.register_buffer(leaf, value)
    return gm.eval()
