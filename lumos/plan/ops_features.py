"""Analysis of the input feature gate (:class:`lumos.nn.FeatureGate`): ``x * m`` on the features."""
from __future__ import annotations

from dataclasses import dataclass

from torch import fx

from .channels import ChannelPlan
from .record import Context, Record, whole


@dataclass
class FeatureSelect(Record):
    """Closed features are dropped (they hold 0); an open feature nothing downstream reads is
    not read from the input either."""


def analyze_feature_gate(node: fx.Node, plan: ChannelPlan, ctx: Context) -> Record:
    gate = plan.module(node).gate
    in_space = plan.space_of.get(node.args[0])
    if in_space is None:
        return whole(node, plan)
    kept = gate.kept().cpu()
    out = plan.new_space(node, in_space.dim, kept, gate=gate)
    plan.consume(in_space, lambda: kept & plan.kept_mask(out))
    return FeatureSelect()
