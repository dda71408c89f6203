"""The two errors a user sees when lumos refuses a model: it could not be traced, or it could
not be compacted exactly. Both messages name the module or node to blame and what to do."""
from __future__ import annotations

from torch import fx


class TraceError(RuntimeError):
    """A model could not be traced; the message names the module and the workaround."""


class CompactionError(RuntimeError):
    """A gated model that lumos cannot compact into an exact plain model; the message names the
    node (or gate) and what to do."""


def describe_node(node: fx.Node, gm: fx.GraphModule) -> str:
    """A node as a message names it: its name, and its module (and type) or function."""
    if node.op == "call_module":
        return f"`{node.name}` (module `{node.target}`, {type(gm.get_submodule(node.target)).__name__})"
    target = node.target if isinstance(node.target, str) else getattr(node.target, "__name__", str(node.target))
    return f"`{node.name}` ({node.op} {target})"


def leaf_hint(node: fx.Node) -> str:
    """What a user can do about a node lumos fails on: keep its module whole, and report it."""
    stack = node.meta.get("nn_module_stack") or {}
    path = next(reversed(stack.values()))[0] if stack else (node.target if node.op == "call_module" else "")
    if path:
        return f'keep that part whole with leaf_modules=["{path}"] and report this as a lumos bug'
    return "report this as a lumos bug, with the model"


def failed_at(who: str, step: str, node: fx.Node, gm: fx.GraphModule, err: Exception) -> CompactionError:
    """The error for an internal failure of ``step`` ("analyse", "build") at ``node``: never a
    bare traceback, always the node and what to do."""
    return CompactionError(f"{who}: lumos failed to {step} {describe_node(node, gm)}: {type(err).__name__}: {err}; "
                           f"{leaf_hint(node)}")
