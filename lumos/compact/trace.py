"""Symbolic tracing (torch.fx) of a gated model, with errors that name the module to blame."""
from __future__ import annotations

from typing import Iterable

import torch
from torch import fx, nn


class TraceError(RuntimeError):
    """A model could not be traced; the message names the module and the workaround."""


def lumos_leaf_types() -> tuple[type, ...]:
    """Module types traced as single calls: every layer exported by :mod:`lumos.nn`, except
    compositions that set ``lumos_trace_through = True`` (``GINConv``: aggregation + MLP), whose
    parts are traced instead."""
    from .. import nn as lumos_nn

    layers = (getattr(lumos_nn, name) for name in lumos_nn.__all__)
    return tuple(t for t in layers if isinstance(t, type) and not getattr(t, "lumos_trace_through", False))


class _Tracer(fx.Tracer):
    """fx tracer that keeps lumos layers and user-named modules whole and remembers where it is."""

    def __init__(self, leaf_modules: Iterable[type | nn.Module | str] = ()):
        super().__init__()
        self.leaf_types = lumos_leaf_types() + tuple(m for m in leaf_modules if isinstance(m, type))
        self.leaf_objects = {id(m) for m in leaf_modules if isinstance(m, nn.Module)}
        self.leaf_names = {m for m in leaf_modules if isinstance(m, str)}
        self.failed_in: str | None = None  # innermost submodule whose forward raised

    def is_user_leaf(self, m: nn.Module, qualname: str) -> bool:
        """Whether the user asked to keep ``m`` whole (``leaf_modules``)."""
        return (isinstance(m, self.leaf_types[len(lumos_leaf_types()):]) or id(m) in self.leaf_objects
                or qualname in self.leaf_names)

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return (isinstance(m, self.leaf_types) or id(m) in self.leaf_objects
                or qualname in self.leaf_names or super().is_leaf_module(m, qualname))

    def call_module(self, m, forward, args, kwargs):
        try:
            return super().call_module(m, forward, args, kwargs)
        except Exception:
            if self.failed_in is None:  # the innermost module records itself first
                self.failed_in = self.path_of_module(m)
            raise


def trace(model: nn.Module, leaf_modules: Iterable[type | nn.Module | str] = ()) -> fx.GraphModule:
    """Trace ``model`` into an ``fx.GraphModule`` whose lumos layers are single nodes.

    ``leaf_modules`` (types, module objects or qualified names) are kept whole too: use it for
    a submodule whose forward cannot be traced (Python control flow on tensor values); its
    inputs and outputs then keep all their channels.
    """
    tracer = _Tracer(leaf_modules)
    try:
        graph = tracer.trace(model)
    except Exception as err:  # fx raises TraceError, TypeError, AttributeError... for the same cause
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
    gm = fx.GraphModule(model, graph, type(model).__name__)
    modules = dict(model.named_modules())
    gm.meta["lumos_user_leaves"] = {n.target for n in graph.nodes if n.op == "call_module"
                                    and tracer.is_user_leaf(modules[n.target], n.target)}
    return gm


def propagate_shapes(gm: fx.GraphModule, example_inputs: tuple) -> None:
    """Run ``example_inputs`` through ``gm`` (eval mode), storing each node's output in ``meta``."""
    from torch.fx.passes.shape_prop import ShapeProp

    was_training = gm.training
    gm.eval()
    try:
        with torch.no_grad():
            ShapeProp(gm).propagate(*example_inputs)
    except Exception as err:
        raise ValueError(
            f"lumos: the model failed on `example_inputs` "
            f"(shapes {[tuple(t.shape) for t in example_inputs if isinstance(t, torch.Tensor)]}): "
            f"{type(err).__name__}: {err}"
        ) from err
    finally:
        gm.train(was_training)


def node_shape(node: fx.Node) -> torch.Size | None:
    """The output shape recorded by :func:`propagate_shapes`, or None for a non-tensor value."""
    meta = node.meta.get("tensor_meta")
    return meta.shape if meta is not None and hasattr(meta, "shape") else None
