"""The builder: walks a solved channel plan in graph order, asks the builder of each node's
record (``lumos/compact/table.py``) to emit the compacted op, and assembles a plain
``fx.GraphModule`` (torch modules, torch functions and buffers only)."""
from __future__ import annotations

import copy
from collections import OrderedDict
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.nn.utils import parametrize

from ..plan import ChannelPlan, Record
from ..plan.record import channel_view
from ..plan.trace import HOOK_DICTS, node_shape
from .values import Value



def copy_hooks(source: nn.Module, target: nn.Module) -> None:
    """Give ``target`` the forward hooks and pre-hooks of ``source`` (the same hook functions)."""
    for name in HOOK_DICTS:
        if hasattr(source, name):
            setattr(target, name, OrderedDict(getattr(source, name)))


def without_parametrizations(module: nn.Module) -> nn.Module:
    """``module`` (a copy, changed in place) with every parametrized tensor of it and its
    submodules (``weight_norm``, ``spectral_norm``...) replaced by its eval-mode value: a plain
    parameter, so that ``torch.save`` of the compacted model works (torch refuses to pickle
    parametrized modules) and no power iteration runs again."""
    training = module.training
    module.eval()  # spectral_norm's power iteration runs (and moves its vectors) in training mode
    for sub in module.modules():
        if parametrize.is_parametrized(sub):
            for name in list(sub.parametrizations):
                parametrize.remove_parametrizations(sub, name, leave_parametrized=True)
    return module.train(training)


def _tensors(module: nn.Module) -> list[torch.Tensor]:
    """Every parameter and buffer of ``module``, a tensor held twice listed twice."""
    return [t for _, t in [*module.named_parameters(remove_duplicate=False),
                           *module.named_buffers(remove_duplicate=False)]]


def eval_mask(gate, n: int) -> torch.Tensor:
    """``(n,)`` float64 CPU eval mask of ``gate`` (all ones when there is no gate), for folding."""
    return torch.ones(n, dtype=torch.float64) if gate is None else gate.eval_mask().double().cpu()


def as64(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.detach().double().cpu()


class Builder:
    """Collects the compacted graph, its modules and buffers while node builders emit ops.

    Attributes:
        plan: the solved :class:`~lumos.plan.ChannelPlan`; ``records``: one record per node.
        graph: the new ``fx.Graph``.
        env: original node -> what stands for it in the new graph (a node, a number, or a tuple
            of nodes for a tuple-valued op).
        values: original node -> :class:`Value` of its dropped channels.
    """

    def __init__(self, plan: ChannelPlan, records: dict[fx.Node, Record]):
        self.plan, self.records = plan, records
        self.graph = fx.Graph()
        self.env: dict[fx.Node, Any] = {}
        self.values: dict[fx.Node, Value] = {}
        self.attrs: dict[str, Any] = {}
        self.current: fx.Node | None = None
        self.functionalized = plan.gm.meta.get("lumos_functionalized", set())
        self.mutated = plan.gm.meta.get("lumos_mutated", set())
        # an in-place module also called where its in-place effect is kept: its out-of-place
        # calls get a copy of their own
        self._inplace_kept = {n.target for n in plan.gm.graph.nodes if n.op == "call_module"
                              and n.name not in self.functionalized
                              and getattr(plan.module(n), "inplace", False) is True}
        self._tensor_copies: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        tensors = [*plan.gm.parameters(), *plan.gm.buffers()]
        self.device = tensors[0].device if tensors else torch.device("cpu")  # where new layers go
        self.dtype = next((t.dtype for t in tensors if t.is_floating_point()), torch.float32)

    # -- emitting ---------------------------------------------------------------------------
    def emit(self, op: str, target, args: tuple, kwargs: dict | None = None) -> fx.Node:
        """A new graph node, labelled with the original node it was emitted for."""
        new = self.graph.create_node(op, target, tuple(args), dict(kwargs or {}))
        if self.current is not None:
            new.meta["lumos_origin"] = self.current.name
        return new

    def call_function(self, fn, *args, **kwargs) -> fx.Node:
        return self.emit("call_function", fn, args, kwargs)

    def call_method(self, name: str, *args, **kwargs) -> fx.Node:
        return self.emit("call_method", name, args, kwargs)

    def call_module(self, target: str, module: nn.Module, *args, **kwargs) -> fx.Node:
        """Call ``module``, registered under ``target`` (the original module's name)."""
        self.attrs[target] = module.to(self.device)
        return self.emit("call_module", target, args, kwargs)

    def arg(self, value):
        """An original argument (node, or structure of nodes) mapped into the new graph."""
        return fx.map_arg(value, self.env.__getitem__)

    def copy(self, node: fx.Node) -> fx.Node:
        """Emit ``node`` unchanged (its module deep-copied with its hooks, in-place modules made
        out-of-place where the plan functionalized them)."""
        target = node.target
        if node.op == "call_module":
            original = self.plan.module(node)
            module = without_parametrizations(self._deepcopy(original))
            copy_hooks(original, module)
            if node.name in self.functionalized and getattr(module, "inplace", False):
                module.inplace = False
                if target in self._inplace_kept:
                    target = f"{target}_out_of_place".replace(".", "_")
            self.attrs[target] = module
        elif node.op == "get_attr":
            self.attrs[target] = self._attr_copy(target)
        new = self.emit(node.op, target, self.arg(node.args), self.arg(node.kwargs))
        self.env[node] = new
        return new

    def _deepcopy(self, module: nn.Module) -> nn.Module:
        """A deep copy of ``module`` whose tensors also held by a module copied before are that
        copy's tensors: layers holding one weight tensor (tied) still hold one in the result."""
        memo = {key: twin for key, (_, twin) in self._tensor_copies.items()}
        twin = copy.deepcopy(module, memo)
        for t, t_twin in zip(_tensors(module), _tensors(twin)):
            self._tensor_copies.setdefault(id(t), (t, t_twin))  # the original kept: its id stays its own
        return twin

    def _attr_copy(self, target: str):
        obj = self.plan.gm
        for part in target.split("."):
            obj = getattr(obj, part)
        if isinstance(obj, nn.Parameter):
            return nn.Parameter(obj.detach().clone(), requires_grad=obj.requires_grad)
        return obj.detach().clone() if isinstance(obj, torch.Tensor) else copy.deepcopy(obj)

    def buffer(self, hint: str, value: torch.Tensor, dtype: torch.dtype | None = None) -> fx.Node:
        """Store a constant tensor in the compacted model (model dtype unless ``dtype`` or an
        integer tensor) and return the node that reads it."""
        name = f"{hint.replace('.', '_')}_constant"
        while name in self.attrs:
            name += "_"
        if value.is_floating_point():
            value = value.to(dtype or self.dtype)
        self.attrs[name] = value.detach().to(self.device, copy=True)
        return self.emit("get_attr", name, ())

    # -- small plain-torch idioms ------------------------------------------------------------
    def channel_module(self, node: fx.Node, make) -> None:
        """Emit ``node``, a module acting per channel on dim 1 (a norm, a PReLU), rebuilt for the
        kept channels by ``make(kept)`` (``kept``: their indices); with none kept, its input's
        positions without channels."""
        kept = self.plan.kept(self.plan.space_of[node])
        x = self.env[node.args[0]]
        self.env[node] = self.no_channels(x, 1) if kept.numel() == 0 else self.call_module(node.target, make(kept), x)

    def no_channels(self, x: fx.Node, dim: int) -> fx.Node:
        """``x`` with no channel left on ``dim`` (a removed layer's output with ``x``'s positions)."""
        return self.call_method("narrow", x, dim, 0, 0)

    def constant(self, x: fx.Node, value: torch.Tensor, dim: int, ndim: int) -> fx.Node:
        """A real tensor shaped like ``x`` with ``value.numel()`` channels on ``dim`` holding
        ``value`` (a removed input's layer). Computed as ``x.narrow(dim, 0, 0).sum(dim, keepdim)``
        (zeros, whatever ``x`` holds) plus the value: no view, so in-place ops on it are safe."""
        zeros = self.call_method("sum", self.no_channels(x, dim), dim, keepdim=True)
        view = self.call_method("reshape", self.buffer(self.current.name, value), channel_view(ndim, dim))
        return self.call_function(torch.add, zeros, view)

    def ones_positions(self, x: fx.Node, pad: list | None = None) -> fx.Node:
        """``(1, 1, *S)`` ones for ``x`` shaped ``(N, C, *S)`` (padded with ones by ``pad``)."""
        zeros = self.call_method("sum", self.no_channels(x, 1), 1, keepdim=True)
        ones = self.call_function(torch.add, self.call_method("narrow", zeros, 0, 0, 1), 1.0)
        return ones if pad is None else self.call_function(F.pad, ones, pad, value=1.0)

    def select(self, x: fx.Node, wanted: torch.Tensor, dim: int, hint: str) -> fx.Node:
        """Channels ``wanted`` (original ids, in that order) of ``x``'s compacted value: kept ones
        are selected, dropped ones are their constants. No op when nothing changes."""
        space = self.plan.space_of.get(x)
        present = self.plan.kept(space) if space is not None else torch.arange(node_shape(x)[dim])
        x_new = self.env[x]
        if torch.equal(present, wanted):
            return x_new
        position = {c: i for i, c in enumerate(present.tolist())}
        missing = [c for c in wanted.tolist() if c not in position]
        if missing:
            value = self.values[x]
            if value.uses_signals(torch.tensor(missing)):
                raise AssertionError(f"lumos: {hint}: dropped AFFINE channels cannot be selected")
            ndim = len(node_shape(x))
            fill = self.constant(x_new, value.const[missing], dim, ndim)
            x_new = self.call_function(torch.cat, [x_new, fill], dim)
        index = [position[c] if c in position else present.numel() + missing.index(c) for c in wanted.tolist()]
        if index == list(range(len(index))) and len(index) == present.numel() + len(missing):
            return x_new
        return self.call_method("index_select", x_new, dim, self.buffer(hint + "_index", torch.tensor(index, dtype=torch.long)))

    def signal_term(self, value: Value, coef: torch.Tensor, dim: int) -> fx.Node | None:
        """``sum_t coef[:, t] * s_t`` laid out on ``dim`` (``coef``: ``(k, T)`` for ``k`` output
        channels), or None when it is zero."""
        if value.signals is None or not bool(coef.abs().gt(0).any()):
            return None
        weight = self.buffer(self.current.name + "_signals", coef)
        if dim == -1 or dim == len(node_shape(self.current)) - 1:
            return self.call_function(F.linear, value.signals, weight)
        moved = self.call_method("movedim", value.signals, dim, -1)
        return self.call_method("movedim", self.call_function(F.linear, moved, weight), -1, dim)

    # -- assembling --------------------------------------------------------------------------
    def module_class_name(self) -> str:
        return type(self.plan.gm).__name__

    def finish(self, class_name: str) -> fx.GraphModule:
        self.graph.lint()
        gm = fx.GraphModule(self.attrs, self.graph, class_name)
        for name, value in self.attrs.items():  # GraphModule copies plain tensors as attributes: make them buffers
            if isinstance(value, torch.Tensor) and not isinstance(value, nn.Parameter):
                owner, _, leaf = name.rpartition(".")
                module = gm.get_submodule(owner) if owner else gm
                delattr(module, leaf)
                module.register_buffer(leaf, value)
        return gm.eval()
