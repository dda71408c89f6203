"""Containers with forward hooks (a ResNet stage with a feature-recording hook): the plan traced
through them with their hooks off and kept their inputs and outputs whole; here their compacted
ops move into a submodule of the same name (an ``fx.GraphModule``) that gets the same hooks, so
the hooks see the same tensors as in the gated model and the parameters keep their names."""
from __future__ import annotations

import operator

from torch import fx, nn

from ..plan.trace import interior
from .builder import copy_hooks


def _attr(root: nn.Module, target: str):
    obj = root
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def _delete_attr(root: nn.Module, target: str) -> None:
    owner, _, leaf = target.rpartition(".")
    module = root.get_submodule(owner) if owner else root
    delattr(module, leaf)


def nest(small: fx.GraphModule, traced: fx.GraphModule, model: nn.Module, hooked: list[str]) -> fx.GraphModule:
    """Move the compacted ops of each hooked container (of ``model``, traced as ``traced``) into a
    submodule of ``small`` with the container's name and hooks (innermost first); returns ``small``."""
    for name in sorted(hooked, key=lambda n: -n.count(".")):
        inside_names = {n.name for n in interior(traced.graph, name)}
        _nest_one(small, name, inside_names, model.get_submodule(name))
    small.graph.lint()
    small.recompile()
    return small


def _nest_one(small: fx.GraphModule, name: str, inside_names: set[str], original: nn.Module) -> None:
    graph = small.graph
    inside = [n for n in graph.nodes if n.op not in ("placeholder", "output")
              and n.meta.get("lumos_origin") in inside_names]
    if not inside:
        return
    members = set(inside)
    inputs = list(dict.fromkeys(a for n in inside for a in n.all_input_nodes if a not in members))
    outputs = [n for n in inside if any(u not in members for u in n.users)]
    sub_graph = fx.Graph()
    env = {a: sub_graph.placeholder(a.name) for a in inputs}
    attrs, prefix = {}, name + "."
    for node in inside:
        target = node.target
        if node.op in ("call_module", "get_attr"):
            relative = target[len(prefix):] if target.startswith(prefix) else target
            attrs[relative] = _attr(small, target)
            target = relative
        env[node] = sub_graph.create_node(node.op, target, fx.map_arg(node.args, env.__getitem__),
                                          fx.map_arg(node.kwargs, env.__getitem__), name=node.name)
    sub_graph.output(env[outputs[0]] if len(outputs) == 1 else tuple(env[o] for o in outputs))
    sub = fx.GraphModule(attrs, sub_graph, f"Compact{type(original).__name__}")
    for key, value in attrs.items():  # GraphModule stores plain tensors as attributes: buffers
        if not isinstance(value, (nn.Module, nn.Parameter)) and hasattr(value, "shape"):
            owner, _, leaf = key.rpartition(".")
            module = sub.get_submodule(owner) if owner else sub
            delattr(module, leaf)
            module.register_buffer(leaf, value)
    copy_hooks(original, sub)
    origin = next(iter(inside)).meta.get("lumos_origin")
    with graph.inserting_before(inside[0]):
        call = graph.call_module(name, tuple(inputs))
        call.meta["lumos_origin"] = origin
        results = [call] if len(outputs) == 1 else [graph.call_function(operator.getitem, (call, i))
                                                     for i in range(len(outputs))]
    for node, result in zip(outputs, results):
        result.meta["lumos_origin"] = origin
        node.replace_all_uses_with(result, delete_user_cb=lambda user: user not in members)
    for node in reversed(inside):
        graph.erase_node(node)
    used = {n.target for n in graph.nodes if n.op in ("call_module", "get_attr")}
    for target in {n for n in attrs if not n.startswith(prefix)} | {prefix + n for n in attrs}:
        if target not in used and not any(u.startswith(target + ".") for u in used):
            try:
                _delete_attr(small, target)
            except AttributeError:
                pass
    if name in dict(small.named_modules()):
        small.delete_submodule(name)
    small.add_submodule(name, sub.eval())
