"""Symbolic tracing (torch.fx) of a model, made fit for channel planning.

:func:`trace` turns a model into an ``fx.GraphModule`` whose lumos layers, user-named leaves and
layers carrying forward hooks are single nodes (so a hook keeps running on the layer it was
registered on), with errors that name the module to blame. A container (a block, a stage) with
hooks is traced through with its hooks off; the plan keeps the tensors that go in and out of it
whole and compaction gives the compacted model a submodule of that name with the same hooks. :func:`functionalize` rewrites
in-place ops whose effect is local (``ReLU(inplace=True)``, ``h.relu_()``) into their
out-of-place twins, and marks the others so that the plan keeps the tensors they touch whole.
:func:`propagate_shapes` records every node's output shape for each set of inputs it is given.
"""
from __future__ import annotations

import inspect
import operator
from typing import Iterable

import torch
import torch.nn.functional as F
from torch import fx, nn

from .errors import TraceError


def lumos_leaf_types() -> tuple[type, ...]:
    """Module types traced as single calls: every layer exported by :mod:`lumos.nn`, except
    compositions that set ``lumos_trace_through = True`` (``GINConv``: aggregation + MLP), whose
    parts are traced instead."""
    from .. import nn as lumos_nn

    layers = (getattr(lumos_nn, name) for name in lumos_nn.__all__)
    return tuple(t for t in layers if isinstance(t, type) and not getattr(t, "lumos_trace_through", False))


HOOK_DICTS = ("_forward_hooks", "_forward_hooks_with_kwargs", "_forward_hooks_always_called", "_forward_pre_hooks",
              "_forward_pre_hooks_with_kwargs")


def has_hooks(module: nn.Module) -> bool:
    """Whether ``module`` has forward hooks or forward pre-hooks (they must keep running on it)."""
    return bool(module._forward_hooks or module._forward_pre_hooks)


class _Tracer(fx.Tracer):
    """fx tracer that keeps lumos layers, user-named modules and hooked modules whole, and
    remembers where it is."""

    def __init__(self, leaf_modules: Iterable[type | nn.Module | str] = ()):
        super().__init__()
        leaf_modules = tuple(leaf_modules)
        self.lumos_types = lumos_leaf_types()
        self.user_types = tuple(m for m in leaf_modules if isinstance(m, type))
        self.leaf_objects = {id(m) for m in leaf_modules if isinstance(m, nn.Module)}
        self.leaf_names = {m for m in leaf_modules if isinstance(m, str)}
        self.failed_in: str | None = None  # innermost submodule whose forward raised

    def is_layer(self, m: nn.Module, qualname: str) -> bool:
        """Whether ``m`` is traced as one call by nature (a lumos layer or a torch layer)."""
        return isinstance(m, self.lumos_types) or super().is_leaf_module(m, qualname)

    def is_user_leaf(self, m: nn.Module, qualname: str) -> bool:
        """Whether ``m`` must be kept whole: named in ``leaf_modules``, or a layer with hooks (or
        a container with hooks whose calls could not be told apart)."""
        return (isinstance(m, self.user_types) or id(m) in self.leaf_objects or qualname in self.leaf_names
                or (has_hooks(m) and self.is_layer(m, qualname)))

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return self.is_layer(m, qualname) or self.is_user_leaf(m, qualname)

    def call_module(self, m, forward, args, kwargs):
        try:
            return super().call_module(m, forward, args, kwargs)
        except Exception:
            if self.failed_in is None:  # the innermost module records itself first
                self.failed_in = self.path_of_module(m)
            raise


def _traced(model: nn.Module, leaf_modules: tuple) -> tuple[fx.Graph, _Tracer]:
    """Trace with every forward hook off (a container's hooks must not be traced into the graph:
    compaction puts them back on a submodule); raise :class:`TraceError` naming the module."""
    tracer = _Tracer(leaf_modules)
    stashed = [(m, {name: getattr(m, name) for name in HOOK_DICTS if hasattr(m, name)}) for m in model.modules()]
    for module, dicts in stashed:
        for name, hooks in dicts.items():
            if hooks:
                setattr(module, name, type(hooks)())
    try:
        return tracer.trace(model), tracer
    except Exception as err:  # fx raises TraceError, TypeError, AttributeError... for the same cause
        # buffers are plain tensors to fx by default: `self.pe[:, :x.size(1)]` (a slice bounded by
        # a traced size) fails on them; traced as attributes, such code traces
        retry = _Tracer(leaf_modules)
        retry.proxy_buffer_attributes = True
        try:
            return retry.trace(model), retry
        except Exception:  # noqa: BLE001 - the first error says what is wrong
            pass
        where = tracer.failed_in or ""
        owner = f"submodule `{where}` ({type(model.get_submodule(where)).__name__})" if where \
            else f"the forward of {type(model).__name__}"
        hint = (f"lumos.compact(..., leaf_modules=[\"{where}\"])" if where
                else "move the untraceable part into a submodule and name it in leaf_modules=[...]")
        raise TraceError(
            f"lumos could not trace {owner}: {type(err).__name__}: {err}. torch.fx traces "
            "symbolically, so it cannot follow Python control flow on tensor values (if x.sum() > 0, "
            "loops over a tensor's values) nor item assignment into a tensor (x[:, :3] = 0). "
            f"Workaround: {hint}; that module then keeps all its input and output channels."
        ) from err
    finally:
        for module, dicts in stashed:
            for name, hooks in dicts.items():
                setattr(module, name, hooks)


def _traced_bound(entry) -> bool:
    return isinstance(entry, slice) and any(isinstance(v, fx.Node) for v in (entry.start, entry.stop, entry.step))


def _traced_slices_as_ops(gm: fx.GraphModule) -> None:
    """Rewrite ``buffer[:, :n]`` with a traced bound ``n`` as ``aten.slice`` (the same clamping
    semantics) followed by the rest of the index: torch re-traces a saved ``GraphModule`` with
    buffers as plain tensors, and a plain tensor cannot be sliced by a traced number."""
    graph = gm.graph
    for node in list(graph.nodes):
        source = node.args[0] if node.op == "call_function" and node.target is operator.getitem else None
        if not isinstance(source, fx.Node) or source.op != "get_attr":
            continue
        entries = list(node.args[1]) if isinstance(node.args[1], tuple) else [node.args[1]]
        value = gm.get_buffer(source.target) if source.target in dict(gm.named_buffers()) else None
        if value is None or not any(_traced_bound(e) for e in entries) or entries.count(Ellipsis) > 1:
            continue
        if Ellipsis in entries:
            at = entries.index(Ellipsis)
            consuming = sum(e is not None and e is not Ellipsis for e in entries)
            entries[at:at + 1] = [slice(None)] * (value.dim() - consuming)
        rest, dim = [], 0
        with graph.inserting_before(node):
            for entry in entries:
                if _traced_bound(entry):
                    step = 1 if entry.step is None else entry.step
                    source = graph.call_function(torch.ops.aten.slice.Tensor, (source, dim, entry.start, entry.stop, step))
                    entry = slice(None)
                rest.append(entry)
                dim += entry is not None
            new = graph.call_function(operator.getitem, (source, tuple(rest)))
        node.replace_all_uses_with(new)
        graph.erase_node(node)
    graph.lint()
    gm.recompile()


def interior(graph: fx.Graph, qualname: str) -> list[fx.Node]:
    """The nodes traced inside the module ``qualname``, in graph order."""
    return [n for n in graph.nodes if any(path == qualname for path, _ in (n.meta.get("nn_module_stack") or {}).values())]


def boundary(graph: fx.Graph, qualname: str) -> tuple[list[fx.Node], list[fx.Node]]:
    """``(inputs, outputs)`` of the module ``qualname`` in ``graph``: the nodes outside it that
    its nodes read, and its nodes that are read outside it."""
    inside = set(interior(graph, qualname))
    inputs = list(dict.fromkeys(a for n in inside for a in n.all_input_nodes if a not in inside))
    outputs = [n for n in inside if any(u not in inside for u in n.users)]
    return inputs, outputs


def trace(model: nn.Module, leaf_modules: Iterable[type | nn.Module | str] = ()) -> fx.GraphModule:
    """Trace ``model`` into an ``fx.GraphModule`` whose lumos layers are single nodes.

    ``leaf_modules`` (types, module objects or qualified names) are kept whole too: use it for
    a submodule whose forward cannot be traced (Python control flow on tensor values); its
    inputs and outputs then keep all their channels. Layers with forward hooks are kept whole
    the same way. ``gm.meta["lumos_user_leaves"]`` holds the targets of all such modules;
    ``gm.meta["lumos_hooked"]`` the names of containers with hooks, traced through.
    """
    leaf_modules = tuple(leaf_modules)
    graph, tracer = _traced(model, leaf_modules)
    hooked = [name for name, m in model.named_modules() if name and has_hooks(m) and not tracer.is_leaf_module(m, name)]
    repeated = []  # a container called twice: its two calls cannot be told apart, keep it whole
    order = {n: i for i, n in enumerate(graph.nodes)}
    for name in hooked:
        nodes = interior(graph, name)
        if nodes and order[nodes[-1]] - order[nodes[0]] + 1 != len(nodes):
            repeated.append(name)
    if repeated:
        leaf_modules = leaf_modules + tuple(repeated)
        graph, tracer = _traced(model, leaf_modules)
        hooked = [name for name in hooked if name not in repeated]
    gm = fx.GraphModule(model, graph, type(model).__name__)
    if tracer.proxy_buffer_attributes:
        _traced_slices_as_ops(gm)
    modules = dict(model.named_modules())
    gm.meta["lumos_user_leaves"] = {n.target for n in graph.nodes if n.op == "call_module"
                                    and tracer.is_user_leaf(modules[n.target], n.target)}
    gm.meta["lumos_hooked"] = [name for name in hooked if interior(graph, name)]
    return gm


# -- in-place ops -----------------------------------------------------------------------------
# Ops whose output may share memory with an input (views, identities): a mutation of one is
# seen through the other.
ALIAS_METHODS = {
    "view", "view_as", "reshape", "reshape_as", "flatten", "unflatten", "transpose", "permute", "t",
    "squeeze", "unsqueeze", "expand", "expand_as", "narrow", "select", "chunk", "split", "unbind",
    "movedim", "moveaxis", "swapaxes", "swapdims", "as_strided", "detach", "contiguous", "diagonal",
    "unfold", "to", "type", "type_as", "float", "double", "half", "bfloat16", "cpu", "cuda",
    "requires_grad_", "tensor_split", "split_with_sizes",
}
ALIAS_FUNCTIONS = {
    operator.getitem, torch.flatten, torch.reshape, torch.transpose, torch.permute, torch.squeeze,
    torch.unsqueeze, torch.narrow, torch.select, torch.chunk, torch.split, torch.unbind, torch.movedim,
    torch.t, torch.detach, torch.swapaxes, torch.tensor_split, F.dropout, F.dropout1d, F.dropout2d,
    F.dropout3d, F.alpha_dropout, F.feature_alpha_dropout,
}
ALIAS_MODULES = (nn.Identity, nn.Flatten, nn.Unflatten, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d,
                 nn.AlphaDropout, nn.FeatureAlphaDropout)


def _module_of(gm: fx.GraphModule, node: fx.Node) -> nn.Module | None:
    return gm.get_submodule(node.target) if node.op == "call_module" else None


def may_alias(gm: fx.GraphModule, node: fx.Node) -> bool:
    """Whether ``node``'s output may share memory with one of its inputs."""
    if node.op == "call_method":
        return node.target in ALIAS_METHODS
    if node.op == "call_function":
        if node.target is getattr:  # x.shape, x.dtype: no tensor; x.T, x.mT, x.data: a view
            return len(node.args) > 1 and node.args[1] in ("T", "mT", "H", "mH", "data", "real", "imag")
        known = getattr(node.target, "__module__", "") in ("torch", "torch.nn.functional", "_operator",
                                                            "operator", "math", "builtins")
        return node.target in ALIAS_FUNCTIONS or not known
    if node.op == "call_module":
        module = _module_of(gm, node)
        known = type(module).__module__.startswith(("torch.nn.modules", "lumos.nn"))
        return isinstance(module, ALIAS_MODULES) or not known or node.target in gm.meta.get("lumos_user_leaves", ())
    return False


def _inplace_kwarg(node: fx.Node) -> bool:
    """Whether a ``call_function`` node passes ``inplace=True`` (by name or position)."""
    try:
        params = inspect.signature(node.target).parameters
    except (TypeError, ValueError):
        return False
    if "inplace" not in params:
        return False
    if "inplace" in node.kwargs:
        return bool(node.kwargs["inplace"])
    index = list(params).index("inplace")
    return index < len(node.args) and bool(node.args[index])


def out_of_place(gm: fx.GraphModule, node: fx.Node) -> tuple | None:
    """``(op, target, args, kwargs)`` computing what in-place ``node`` computes, without the
    mutation; ``()`` when ``node`` is an in-place module (copied with ``inplace=False``); None
    when ``node`` mutates nothing. Raises KeyError for an in-place op with no out-of-place twin."""
    if node.op == "call_module":
        return () if getattr(_module_of(gm, node), "inplace", False) is True else None
    if node.op == "call_method" and node.target.endswith("_") and not node.target.endswith("__"):
        twin = node.target[:-1]
        if not callable(getattr(torch.Tensor, twin, None)) or node.target == "requires_grad_":
            raise KeyError(node.target)
        return ("call_method", twin, node.args, node.kwargs)
    if node.op == "call_function":
        name = getattr(node.target, "__name__", "")
        module = getattr(node.target, "__module__", "") or ""
        if name.endswith("_") and not name.endswith("__") and module.startswith("torch"):
            namespace = F if node.target is getattr(F, name, None) else torch
            twin = getattr(namespace, name[:-1], None)
            if twin is None:
                raise KeyError(name)
            return ("call_function", twin, node.args, node.kwargs)
        if _inplace_kwarg(node):
            params = list(inspect.signature(node.target).parameters)
            index = params.index("inplace")
            args, kwargs = list(node.args), dict(node.kwargs)
            if "inplace" in kwargs:
                kwargs["inplace"] = False
            else:
                args[index] = False
            return ("call_function", node.target, tuple(args), kwargs)
    return None


def _local_mutation(root: fx.Node, members: list[fx.Node], ops: list[fx.Node], inplace: dict,
                    order: dict) -> bool:
    """Whether the in-place ``ops`` of an alias group can be made out-of-place by rewiring later
    readers: the group's root is a fresh tensor (no model input, no parameter), every op
    mutates the root or an earlier op's result (not a view), and no view made before an op is
    read after it (it would see the mutation)."""
    if root.op in ("placeholder", "get_attr") or root in inplace or any(inplace[m] == "none" for m in ops):
        return False
    versions = {root, *ops}
    if any(m.args[0] not in versions for m in ops):
        return False
    for view in members:
        if view in versions:
            continue
        later = [order[m] for m in ops if order[m] > order[view]]
        if later and any(order[user] > min(later) for user in view.users):
            return False
    return True


def functionalize(gm: fx.GraphModule) -> None:
    """Rewrite in-place ops into out-of-place ones where that is exact; mark the rest.

    An in-place op on a tensor that no view or alias shares (a fresh layer output, mutated only
    by in-place ops) becomes its out-of-place twin, and every later reader of that tensor reads
    the new value: the same values, and compaction can then treat the op like any other (an
    in-place module keeps its node and is copied with ``inplace=False``: its node is listed in
    ``gm.meta["lumos_functionalized"]``). An in-place op on a model input, a parameter, or a
    tensor shared with a view stays as it is; every node of its alias group is listed in
    ``gm.meta["lumos_mutated"]`` and the channel plan keeps those tensors whole.
    """
    graph = gm.graph
    parent: dict[fx.Node, fx.Node] = {}

    def find(n):
        while parent.get(n, n) is not n:
            n = parent[n]
        return n

    def union(a, b):
        ra, rb = find(a), find(b)
        if ra is not rb:
            parent[rb] = ra

    inplace = {}
    for node in graph.nodes:
        try:
            twin = out_of_place(gm, node)
        except KeyError:
            twin = "none"
        if twin is not None:
            inplace[node] = twin
            if node.args and isinstance(node.args[0], fx.Node):
                union(node.args[0], node)
        elif may_alias(gm, node):
            for arg in node.all_input_nodes:
                union(arg, node)
    groups: dict[fx.Node, list[fx.Node]] = {}
    for node in graph.nodes:
        groups.setdefault(find(node), []).append(node)
    order = {node: i for i, node in enumerate(graph.nodes)}
    mutated: set[fx.Node] = set()
    simple: set[fx.Node] = set()  # roots of groups whose in-place ops can become out-of-place
    for root, members in groups.items():
        ops = [m for m in members if m in inplace]
        if ops and _local_mutation(root, members, ops, inplace, order):
            simple.add(root)
        elif ops:
            mutated.update(members)
    current: dict[fx.Node, fx.Node] = {}  # group root -> node holding its latest value
    versions = {n for root in simple for n in groups[root] if n is root or n in inplace}
    functional: set[str] = set()

    def latest(a):
        return current.get(find(a), a) if a in versions else a

    for node in list(graph.nodes):
        node.args = fx.map_arg(node.args, latest)
        node.kwargs = fx.map_arg(node.kwargs, latest)
        root = find(node)
        if root not in simple or node not in versions:
            continue
        if node in inplace and inplace[node] == ():
            functional.add(node.name)
        elif node in inplace:
            op, target, args, kwargs = inplace[node]
            with graph.inserting_before(node):
                new = graph.create_node(op, target, fx.map_arg(args, latest), fx.map_arg(kwargs, latest),
                                        name=node.name + "_functional")
            node.replace_all_uses_with(new)
            graph.erase_node(node)
            parent[new] = root  # readers of the new value read the latest version too
            versions.add(new)
            node = new
        current[root] = node
    gm.meta["lumos_functionalized"] = functional
    gm.meta["lumos_mutated"] = {n.name for n in mutated}
    graph.lint()
    gm.recompile()


# -- shapes -----------------------------------------------------------------------------------
def _structure(value):
    """A value's shape structure: ``torch.Size`` for a tensor, a tuple of those for a tuple."""
    if isinstance(value, torch.Tensor):
        return value.shape
    if isinstance(value, (tuple, list)):
        return tuple(_structure(v) for v in value)
    return None


class _ShapeRecorder(fx.Interpreter):
    def run_node(self, n):
        value = super().run_node(n)
        n.meta.setdefault("lumos_shapes", []).append(_structure(value))
        if isinstance(value, torch.Tensor) and len(n.meta["lumos_shapes"]) == 1:
            n.meta["lumos_dtype"] = value.dtype
        return value


def propagate_shapes(gm: fx.GraphModule, input_sets: list[tuple]) -> list[int]:
    """Run each input tuple through ``gm`` (eval mode, no grad), recording every node's output
    shape per run in ``node.meta["lumos_shapes"]``. The first set (the example inputs) must run;
    a later set the traced graph rejects is left out. Returns the indices of the sets recorded."""
    for node in gm.graph.nodes:
        node.meta["lumos_shapes"] = []
    was_training = gm.training
    gm.eval()
    recorded = []
    try:
        for i, inputs in enumerate(input_sets):
            try:
                with torch.no_grad():
                    _ShapeRecorder(gm).run(*inputs)
                recorded.append(i)
            except Exception as err:
                for node in gm.graph.nodes:
                    del node.meta["lumos_shapes"][len(recorded):]
                if i > 0:
                    continue
                shapes = [tuple(t.shape) for t in inputs if isinstance(t, torch.Tensor)]
                raise ValueError(f"lumos: the model failed on `example_inputs` (shapes {shapes}): "
                                 f"{type(err).__name__}: {err}") from err
    finally:
        gm.train(was_training)
    return recorded


def node_shape(node: fx.Node, run: int = 0) -> torch.Size | None:
    """The output shape of ``node`` on the example inputs (``run`` 0) or on the ``run``-th set of
    inputs :func:`propagate_shapes` was given; None for a value that is not a tensor."""
    shapes = node.meta.get("lumos_shapes", ())
    value = shapes[run] if run < len(shapes) else None
    return value if isinstance(value, torch.Size) else None


def node_shapes(node: fx.Node) -> list:
    """The shape structure of ``node``'s output in every run (see :func:`propagate_shapes`)."""
    return list(node.meta.get("lumos_shapes", ()))
