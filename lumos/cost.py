"""Expected and actual cost (parameters, FLOPs) of a gated model, differentiable in its gates.

Each analysis record describes its layer's cost as a :class:`~lumos.plan.LayerCost`.
Every channel group of the channel plan (see :mod:`lumos.plan.channels`) is alive with
probability ``q = 1 - prod_g (1 - p_g)`` over the gates ``g`` that produce it (1 when an
ungated layer produces it). A layer then costs ``E[in] * E[out] * weight_per_pair (+ E[out]
for the bias)`` parameters and twice that times its output positions in FLOPs per sample,
where ``E[width]`` sums ``q`` over the channels of its input or output. With the gates' eval masks instead of ``p_open``
the same formulas give the cost of the compacted model.
"""
from __future__ import annotations

import weakref

import torch
from torch import nn

from .plan import LayerCost, Space, plan_model
from .gates import HardConcreteGate, gates_of
from .nn import FeatureGate

COSTS = ("count", "params", "flops")
_CACHE: "weakref.WeakKeyDictionary[nn.Module, CostModel]" = weakref.WeakKeyDictionary()


class CostModel:
    """Cost structure of one gated model, built once from its channel plan.

    Args:
        gated: a model from :func:`lumos.gate`.
        example_inputs: inputs to trace with (default: the ones kept by :func:`lumos.gate`).
    """

    def __init__(self, gated: nn.Module, example_inputs=None):
        plan, records = plan_model(gated, example_inputs, who="lumos.penalty")
        self.gates = [gate for _, gate in gates_of(gated)]
        self._group = plan.group_index()
        self.n_groups = int(self._group.max()) + 1 if self._group.numel() else 0
        self._producers: list[tuple[HardConcreteGate, torch.Tensor]] = []
        certain = torch.zeros(self.n_groups, dtype=torch.bool)
        self.layers: list[tuple[LayerCost, torch.Tensor | None, torch.Tensor]] = []
        self.fixed_params = 0
        batch = self._batch(gated, example_inputs)
        for space, gate in plan.producer_gates:
            self._producers.append((gate, self._groups(space)))
        for space in plan.certain_spaces:
            certain[self._groups(space)] = True
        for node in plan.gm.graph.nodes:
            module = plan.module(node) if node.op == "call_module" else None
            terms = records[node].layer_cost(node, plan)  # a LayerCost, a list of them (attention), or None
            if isinstance(terms, LayerCost):
                terms = [terms]
            for term in terms or ():
                term.positions /= batch
                in_groups = self._groups(term.in_space) if term.in_space is not None else None
                self.layers.append((term, in_groups, self._groups(term.out_space)))
            if terms is None and module is not None and not isinstance(module, (FeatureGate, HardConcreteGate)):
                self.fixed_params += sum(p.numel() for name, p in module.named_parameters()
                                         if not name.endswith("log_alpha"))
        self._certain = certain
        self._moved: dict[tuple[int, torch.device], torch.Tensor] = {}
        self.dense = {kind: float(self._cost(kind, self._dense_q(), None)) for kind in ("params", "flops")}
        self.dense["count"] = float(sum(g.n for g in self.gates))

    @staticmethod
    def _batch(gated, example_inputs) -> int:
        inputs = example_inputs if example_inputs is not None else getattr(gated, "example_inputs", ())
        first = inputs[0] if isinstance(inputs, (tuple, list)) else inputs
        return first.shape[0] if first.dim() > 1 else 1

    def _groups(self, space: Space) -> torch.Tensor:
        return self._group[space.start:space.start + space.size]

    def _dense_q(self) -> torch.Tensor:
        return torch.ones(self.n_groups)

    def _on(self, index: torch.Tensor, device: torch.device) -> torch.Tensor:
        """``index`` on ``device``, copied there once (the penalty runs every training step)."""
        key = (id(index), device)
        moved = self._moved.get(key)
        if moved is None:
            moved = self._moved[key] = index.to(device)
        return moved

    def _q(self, deterministic: bool) -> torch.Tensor:
        """Probability (or, deterministic, indicator) that each channel group is alive."""
        if deterministic:
            alive = self._certain.clone()
            for gate, groups in self._producers:
                alive[groups[gate.kept().cpu()]] = True
            return alive.float()
        if not self._producers:
            return torch.ones(self.n_groups)
        first = self._producers[0][0].log_alpha
        log_closed = torch.zeros(self.n_groups, dtype=first.dtype, device=first.device)
        for gate, groups in self._producers:
            p = gate.p_open().clamp(max=1 - 1e-6)
            log_closed = log_closed.index_add(0, self._on(groups, p.device), torch.log1p(-p).to(log_closed.dtype))
        q = 1 - torch.exp(log_closed)
        return torch.where(self._on(self._certain, q.device), torch.ones_like(q), q)

    def _cost(self, kind: str, q: torch.Tensor, deterministic: bool | None) -> torch.Tensor:
        total = q.new_zeros(())
        for term, in_groups, out_groups in self.layers:
            e_out = q[self._on(out_groups, q.device)].sum()
            in_q = q[self._on(in_groups, q.device)] if in_groups is not None else q.new_ones(term.in_size)
            if term.in_gate is not None and deterministic is not None:
                gate = term.in_gate.kept().float() if deterministic else term.in_gate.p_open()
                in_q = in_q * gate.to(q.device, q.dtype)
            pairs = in_q.sum() * e_out * term.weight_per_pair
            if kind == "params":
                total = total + pairs + (e_out if term.bias else 0)
            else:
                total = total + 2 * term.positions * pairs
        if kind == "params":
            total = total + self.fixed_params
        return total

    def expected(self, kind: str) -> torch.Tensor:
        """Differentiable expected cost under the gates' ``p_open``."""
        if kind == "count":
            return sum(g.p_open().sum() for g in self.gates)
        return self._cost(kind, self._q(False), False)

    @torch.no_grad()
    def actual(self, kind: str) -> float:
        """Cost with the eval masks (what compaction keeps, before downstream-liveness pruning)."""
        if kind == "count":
            return float(sum(int(g.kept().sum()) for g in self.gates))
        return float(self._cost(kind, self._q(True), True))


def cost_model(gated: nn.Module) -> CostModel:
    """The (cached) :class:`CostModel` of ``gated``."""
    model = _CACHE.get(gated)
    if model is None:
        model = _CACHE[gated] = CostModel(gated)
    return model


def check_cost(cost: str, who: str) -> None:
    if cost not in COSTS:
        raise ValueError(f"{who}: `cost` must be one of {COSTS}, got {cost!r}")
