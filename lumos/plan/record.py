"""What channel analysis finds about one node: a record that building consumes.

Every analysis rule (``lumos/plan/ops_*.py``) is a plain function ``analyze(node, plan, ctx)``
that records ties, kinds, reads and pins on the :class:`~lumos.plan.channels.ChannelPlan` and
returns a :class:`Record` (a small dataclass, one type per op family) holding what building
needs later. Records also answer the questions the cost model and :func:`lumos.report` ask
without building anything: the parameters and FLOPs a node keeps, and how its size follows
the gated widths (:class:`LayerCost`).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

from torch import fx, nn

from ..gates import HardConcreteGate
from .channels import ChannelPlan, Space
from .trace import node_shape


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


@dataclass
class Context:
    """What every analysis rule may need besides the node and the plan.

    Attributes:
        feature_dim: the feature dim of the first model input (-1 for tabular data).
        keep_input_shape: whether the compacted model takes the full first input.
        whole: targets of modules kept whole (user leaves, hooked modules, modules called more
            than once with parameters, modules whose parameters are read elsewhere).
        mutated: names of nodes an in-place op touches through an alias (kept whole).
        records: the records of the nodes analysed so far (read-only for rules: an item of a
            tuple asks what made the tuple).
        assume_closed: plan as if every ungated layer that could carry gates had them all
            closed (:func:`lumos.gate` asks which layers could then lose channels at all).
    """

    feature_dim: int = -1
    keep_input_shape: bool = True
    whole: set = field(default_factory=set)
    mutated: set = field(default_factory=set)
    records: dict = field(default_factory=dict)
    assume_closed: bool = False


class Record:
    """Base record: analysis tracked nothing; building copies the op as it is."""

    reports_width: ClassVar[bool] = False  # True for layers whose output width lumos.report lists

    def params(self, node: fx.Node, plan: ChannelPlan) -> int:
        """Parameters the compacted op holds (0 for ops without parameters)."""
        return 0

    def flops(self, node: fx.Node, plan: ChannelPlan, dense: bool = False) -> float:
        """FLOPs of the op (2 per multiply-add of a matrix product or convolution) over the traced
        example, in the compacted model (``dense=True``: in the dense model)."""
        return 0.0

    def layer_cost(self, node: fx.Node, plan: ChannelPlan) -> LayerCost | list[LayerCost] | None:
        """The layer's cost structure, or None when its size does not depend on gated widths."""
        return None


@dataclass
class Copy(Record):
    """An op copied as it is (no tracked channel: a shape read, an op on untracked tensors)."""


def count_params(model: nn.Module) -> int:
    """Parameters of ``model``, gate logits excluded."""
    gate_params = {id(p) for m in model.modules() if isinstance(m, HardConcreteGate) for p in m.parameters()}
    return sum(p.numel() for p in model.parameters() if id(p) not in gate_params)


@dataclass
class Whole(Record):
    """An op kept whole: every tracked input and its output keep every channel (exact, the
    fallback for any op lumos has no rule for). A gated module kept whole becomes its plain
    twin: its gate logits are no parameters of the compacted model."""

    def params(self, node, plan):
        return count_params(plan.module(node)) if node.op == "call_module" else 0


def op_name(node: fx.Node, plan: ChannelPlan) -> str:
    """How an error or a reason names ``node``: `` `enc.0` (Conv2d)``, `` `torch.roll` ``, `` `.flip()` ``."""
    if node.op == "call_module":
        return f"`{node.target}` ({type(plan.module(node)).__name__})"
    if node.op == "call_method":
        return f"`.{node.target}()`"
    if node.op == "call_function":
        module = getattr(node.target, "__module__", None) or ""
        prefix = "F." if module.startswith("torch.nn.functional") else "torch." if module.startswith("torch") else ""
        return f"`{prefix}{getattr(node.target, '__name__', node.target)}`"
    return f"`{node.name}`"


def keep_inputs_whole(node: fx.Node, plan: ChannelPlan) -> None:
    """Every tracked input of ``node`` keeps all its channels, and ``node`` reads them all."""
    for arg in node.all_input_nodes:
        if arg in plan.space_of:
            plan.pin(plan.space_of[arg], by=op_name(node, plan))
            plan.consume(plan.space_of[arg])


def whole(node: fx.Node, plan: ChannelPlan, ctx: Context | None = None) -> Whole:
    """Analysis of an op kept whole: inputs pinned and read, a pinned space on its output."""
    keep_inputs_whole(node, plan)
    shape = node_shape(node)
    if shape is not None and len(shape) > 0:
        plan.pin(plan.new_space(node, -1))
    return Whole()


def channel_view(ndim: int, dim: int) -> list[int]:
    """The shape that broadcasts a ``(C,)`` vector along ``dim`` of an ``ndim``-dim tensor."""
    dim = dim % ndim
    return [-1 if d == dim else 1 for d in range(ndim)]
