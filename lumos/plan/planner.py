"""``plan_model``: trace a (gated) model and solve which channels survive, building nothing.

This is what :func:`lumos.gate` (which layers are worth gating), the cost model (what the
penalty weighs), :func:`lumos.report` (widths, parameters, FLOPs) and :func:`lumos.compact`
(which builds from it) share.
"""
from __future__ import annotations

from collections import Counter
from typing import Iterable

import torch
from torch import fx, nn

from ..gates import HardConcreteGate, gates_of, tensor_holders
from ..model import GatedModel, as_input_tuple, has_feature_gate
from .channels import ChannelPlan
from .errors import CompactionError, failed_at
from .probe import alternative_inputs
from .record import Context, Record, op_name
from .table import rule_for
from .trace import boundary, functionalize, propagate_shapes, trace


def trace_gated(gated: nn.Module, leaf_modules: Iterable = ()) -> tuple[fx.GraphModule, int]:
    """Trace a gated model (a :class:`GatedModel` or any module holding gated layers).

    Returns the graph module and the feature dimension of its first input. For a
    :class:`GatedModel` the input feature gate becomes a node right after the first input.
    """
    if not isinstance(gated, GatedModel):
        return trace(gated, leaf_modules), -1
    gm = trace(gated.model, leaf_modules)
    if gated.feature_gate is not None:
        name = "feature_gate"
        while hasattr(gm, name):  # the user's model may have a submodule of that name
            name = "lumos_" + name
        gm.add_submodule(name, gated.feature_gate)
        first = next(n for n in gm.graph.nodes if n.op == "placeholder")
        with gm.graph.inserting_after(first):
            gate_node = gm.graph.call_module(name, (first,))
        first.replace_all_uses_with(gate_node, delete_user_cb=lambda user: user is not gate_node)
        gm.recompile()
    return gm, gated.feature_dim


def default_inputs(gated: nn.Module, who: str = "lumos.compact") -> tuple:
    """The example inputs kept by :func:`lumos.gate`, moved to where the model is now."""
    inputs = getattr(gated, "example_inputs", ())
    if not inputs:
        raise ValueError(f"{who}: pass `example_inputs` (this model was not made by lumos.gate)")
    param = next((p for p in gated.parameters() if p.is_floating_point()), None)
    if param is None:
        return tuple(inputs)
    return tuple(t.to(param.device, param.dtype) if isinstance(t, torch.Tensor) and t.is_floating_point()
                 else t.to(param.device) if isinstance(t, torch.Tensor) else t for t in inputs)


def check_not_meta(model: nn.Module, example_inputs: tuple, who: str) -> None:
    """A clear error for a model (or inputs) on the meta device, which hold no values."""
    meta = next((name for name, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta), None)
    if meta is not None or any(isinstance(t, torch.Tensor) and t.is_meta for t in example_inputs):
        where = f"parameter `{meta}`" if meta is not None else "the example inputs"
        raise ValueError(f"{who}: {where} is on the meta device (it holds no values, so lumos cannot run "
                         "the model); materialise the model first, e.g. model.to_empty(device='cpu') and "
                         "load_state_dict(...), and pass real example inputs")


def check_gates(gated: nn.Module, who: str) -> None:
    """Refuse gates with NaN logits: whether such a unit is open is unknown (training diverged)."""
    for name, gate in gates_of(gated):
        bad = torch.isnan(gate.log_alpha.detach())
        if bool(bad.any()):
            raise CompactionError(
                f"{who}: gate `{name}` has {int(bad.sum())} NaN value(s) in log_alpha (units "
                f"{bad.nonzero().flatten().tolist()[:10]}), so whether those units are open is unknown; training "
                "diverged: reload a checkpoint or train again with a smaller learning rate")


def _stateful(module: nn.Module) -> bool:
    return any(True for _ in module.parameters()) or any(True for _ in module.buffers())


def shared_with(gm: fx.GraphModule) -> dict[str, str]:
    """Called modules that hold a parameter or buffer also held by a module outside them (tied
    weights, e.g. ``decoder.weight = encoder.weight``), each mapped to the name of one such
    other module. A gate shared by several layers (:func:`lumos.gate`'s ``share_gates``) is not
    a tie: it scales the same channels wherever it is used."""
    owners = tensor_holders(gm)
    gate_state = {id(t) for m in gm.modules() if isinstance(m, HardConcreteGate)
                  for t in [*m.parameters(), *m.buffers()]}  # a shared gate (lumos.gate) ties no weight
    shared = {}
    for target in dict.fromkeys(n.target for n in gm.graph.nodes if n.op == "call_module"):  # graph order
        inside = lambda name: name == target or name.startswith(target + ".")  # noqa: E731
        module = gm.get_submodule(target)
        for t in [*module.parameters(), *module.buffers()]:
            if id(t) in gate_state:
                continue
            other = next((name for name in owners.get(id(t), ()) if not inside(name)), None)
            if other is not None:
                shared[target] = other
                break
    return shared


def kept_whole(gm: fx.GraphModule) -> set[str]:
    """Targets of modules the plan keeps whole: user leaves and hooked modules, modules with
    parameters or buffers called more than once (one compacted copy could not serve calls that
    keep different channels; a module without state is a function and may be reused), and
    modules whose parameters are also read directly or held by another module (tied weights:
    the compacted model must read the same tensor)."""
    calls = Counter(n.target for n in gm.graph.nodes if n.op == "call_module")
    whole = set(gm.meta.get("lumos_user_leaves", set()))
    whole |= {t for t, count in calls.items() if count > 1 and _stateful(gm.get_submodule(t))}
    whole |= set(shared_with(gm))
    for node in gm.graph.nodes:
        if node.op == "get_attr":
            owner = node.target.rpartition(".")[0]
            whole |= {t for t in calls if owner == t or owner.startswith(t + ".")}
    return whole


def plan_model(gated: nn.Module, example_inputs=None, *, leaf_modules: Iterable | None = None,
               keep_input_shape: bool = True, who: str = "lumos.compact", probe: bool = True,
               assume_closed: bool = False) -> tuple[ChannelPlan, dict[fx.Node, Record]]:
    """Trace ``gated`` and solve which channels survive, without building anything.

    ``example_inputs`` and ``leaf_modules`` default to those given to :func:`lumos.gate`.
    ``probe``: also run the model on inputs of other shapes (:mod:`lumos.plan.probe`), so that
    shape-dependent ops are checked to mean the same for every shape. ``assume_closed``: plan
    as if every ungated layer had all its output gates closed (see :class:`Context`), one
    solve step only: which channels each layer could lose while everything else stays alive.

    Returns the solved :class:`ChannelPlan` (``plan.gm`` is the traced model) and one
    :class:`~lumos.plan.record.Record` per node.
    """
    if example_inputs is None:
        example_inputs = default_inputs(gated, who)
    if leaf_modules is None:
        leaf_modules = getattr(gated, "leaf_modules", ())
    example_inputs = as_input_tuple(example_inputs, who, has_feature_gate(gated))
    check_not_meta(gated, example_inputs, who)
    was_training = gated.training
    gated.eval()  # trace in eval: functional dropout etc. record training=False
    try:
        gm, feature_dim = trace_gated(gated, leaf_modules)
        functionalize(gm)
        feature_dim = feature_dim if isinstance(gated, GatedModel) else -1
        fixed_dim = feature_dim if getattr(gated, "feature_gate", None) is not None else None  # else no dim is fixed
        alternatives = alternative_inputs(gated, example_inputs, fixed_dim) if probe else []
        runs = propagate_shapes(gm, [example_inputs, *alternatives])
    finally:
        gated.train(was_training)
    plan = ChannelPlan(gm)
    plan.alternatives = [alternatives[i - 1] for i in runs[1:]]
    ctx = Context(feature_dim, keep_input_shape, kept_whole(gm), gm.meta.get("lumos_mutated", set()),
                  assume_closed=assume_closed)
    for node in gm.graph.nodes:
        try:
            ctx.records[node] = rule_for(node, plan, ctx)(node, plan, ctx)
        except CompactionError:
            raise
        except Exception as err:  # a rule's bug: name the node, never a bare traceback
            raise failed_at(who, "analyse", node, gm, err) from err
    for node in gm.graph.nodes:  # tensors an in-place op touches through an alias stay whole
        if node.name in ctx.mutated and node in plan.space_of:
            plan.pin(plan.space_of[node], by=f"an in-place op on a view of {op_name(node, plan)}'s output")
    for name in gm.meta.get("lumos_hooked", ()):  # a container's hooks see what they saw before
        inputs, outputs = boundary(gm.graph, name)
        for node in inputs + outputs:
            if node in plan.space_of:
                plan.pin(plan.space_of[node], by=f"the hooks of `{name}`")
    plan.solve(max_iters=1 if assume_closed else 10000)
    return plan, ctx.records
