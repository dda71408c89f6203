"""Expected and actual cost (parameters, FLOPs) of a gated model, differentiable in its gates.

Each analysis record describes its layer's cost as a :class:`~lumos.plan.LayerCost`.
Every channel group of the channel plan (see :mod:`lumos.plan.channels`) is alive with
probability ``q = 1 - prod_g (1 - p_g)`` over the gates ``g`` that produce it (1 when an
ungated layer produces it). A layer then costs ``E[in] * E[out] * weight_per_pair (+ E[out]
for the bias)`` parameters and twice that times its output positions in FLOPs per sample,
where ``E[width]`` sums ``q`` over the channels of its input or output. With the gates' eval
masks instead of ``p_open`` the same formulas give the cost of the compacted model.

The structure is flattened once into index tensors, so one evaluation is a fixed handful of
tensor ops (gathers and ``index_add``) over all gates and layers, whatever their number: the
penalty runs every training step.
"""
from __future__ import annotations

import math
import weakref
from typing import NamedTuple

import torch
from torch import nn

from lumos_kernels.hard_concrete import log_alpha_bounds, nearest_on_side

from .plan import LayerCost, Space, plan_model
from .gates import HardConcreteGate, eval_masks, gates_of
from .nn import FeatureGate

COSTS = ("count", "params", "flops")
# The widths' dense (units x layers) form is used up to this many entries (32 MB in float64).
LINEAR_WIDTHS_MAX_ENTRIES = 1 << 22
_CACHE: "weakref.WeakKeyDictionary[nn.Module, CostModel]" = weakref.WeakKeyDictionary()


class CostEvaluation(NamedTuple):
    """One vectorised evaluation (:meth:`CostModel.evaluate`); every field stays on the device."""

    expected: torch.Tensor  # 0-dim, differentiable: the cost under every gate's p_open
    kept: torch.Tensor  # 0-dim float64, no gradient: the cost of the eval masks
    kept_units: torch.Tensor  # (n_units,) bool: which gate units the eval masks keep
    in_band: torch.Tensor  # (n_units,) bool: units inside the stochastic band t_l < p_open <= t_u


class CostModel:
    """Cost structure of one gated model, built once from its channel plan.

    Args:
        gated: a model from :func:`lumos.gate`.
        example_inputs: inputs to trace with (default: the ones kept by :func:`lumos.gate`).

    Attributes:
        dense: ``{"count", "params", "flops"}`` of the model with every gate open.
        minimum: the same with every gate closed: the least the gates can reach.
        whole: qualified name -> parameters, for the modules whose size no gate changes.
    """

    def __init__(self, gated: nn.Module, example_inputs=None):
        plan, records = plan_model(gated, example_inputs, who="lumos.penalty")
        self.gates = [gate for _, gate in gates_of(gated)]
        starts, total = {}, 0
        for gate in self.gates:
            starts[id(gate)] = total
            total += gate.n
        self.n_units = total
        group = plan.group_index()
        self.n_groups = int(group.max()) + 1 if group.numel() else 0
        ones_group, ones_unit = self.n_groups, self.n_units  # index of an appended constant 1

        def groups_of(space: Space) -> torch.Tensor:
            return group[space.start:space.start + space.size]

        def units_of(gate) -> torch.Tensor:
            return torch.arange(gate.n) + starts[id(gate)]

        producers = [(groups_of(space), units_of(gate)) for space, gate in plan.producer_gates]
        self._prod_group = _cat_long([g for g, _ in producers])
        self._prod_unit = _cat_long([u for _, u in producers])
        if self._prod_group.numel():  # a gate shared by several layers produces each of its groups once
            pairs = torch.unique(torch.stack([self._prod_group, self._prod_unit]), dim=1)
            self._prod_group, self._prod_unit = pairs[0].contiguous(), pairs[1].contiguous()
        certain = torch.zeros(self.n_groups, dtype=torch.bool)
        for space in plan.certain_spaces:
            certain[groups_of(space)] = True
        self._certain = certain
        # the usual case, each group produced by at most one gate unit: q is that unit's p (a gather)
        producers_per_group = torch.bincount(self._prod_group, minlength=self.n_groups)
        self._single_producer = bool((producers_per_group <= 1).all())
        producer = torch.full((self.n_groups,), self.n_units, dtype=torch.long)  # n_units: none (p = 0)
        producer[self._prod_group] = self._prod_unit
        self._producer = torch.where(certain, self.n_units + 1, producer)  # n_units + 1: certain (p = 1)

        batch = self._batch(gated, example_inputs)
        out_group, out_layer, in_group, in_unit, in_layer = [], [], [], [], []
        weight_per_pair, bias, positions = [], [], []
        self.whole: dict[str, int] = {}
        for node in plan.gm.graph.nodes:
            module = plan.module(node) if node.op == "call_module" else None
            terms = records[node].layer_cost(node, plan)  # a LayerCost, a list of them (attention), or None
            if isinstance(terms, LayerCost):
                terms = [terms]
            for term in terms or ():
                layer = len(weight_per_pair)
                outs = groups_of(term.out_space)
                out_group.append(outs)
                out_layer.append(torch.full_like(outs, layer))
                ins = groups_of(term.in_space) if term.in_space is not None \
                    else torch.full((term.in_size,), ones_group, dtype=torch.long)
                in_group.append(ins)
                in_unit.append(units_of(term.in_gate) if term.in_gate is not None
                               else torch.full_like(ins, ones_unit))
                in_layer.append(torch.full_like(ins, layer))
                weight_per_pair.append(float(term.weight_per_pair))
                bias.append(1.0 if term.bias else 0.0)
                positions.append(term.positions / batch)
            if terms is None and module is not None and not isinstance(module, (FeatureGate, HardConcreteGate)):
                count = sum(p.numel() for name, p in module.named_parameters() if not name.endswith("log_alpha"))
                if count:
                    self.whole[str(node.target)] = count
        self.n_layers = len(weight_per_pair)
        self._out_group, self._out_layer = _cat_long(out_group), _cat_long(out_layer)
        self._in_group, self._in_unit, self._in_layer = _cat_long(in_group), _cat_long(in_unit), _cat_long(in_layer)
        self._weight_per_pair = torch.tensor(weight_per_pair, dtype=torch.float64)
        self._bias = torch.tensor(bias, dtype=torch.float64)
        self._flops_per_pair = 2 * self._weight_per_pair * torch.tensor(positions, dtype=torch.float64)
        self._has_in_gates = bool((self._in_unit < self.n_units).any())
        self.fixed_params = float(sum(self.whole.values()))
        # p_open = sigmoid(log_alpha - shift) per unit (gates may differ in beta, gamma, zeta)
        per_unit = lambda value: torch.cat([torch.full((g.n,), value(g), dtype=torch.float64)  # noqa: E731
                                            for g in self.gates]) if self.gates else torch.zeros(0, dtype=torch.float64)
        self._shift = per_unit(lambda g: g.beta * math.log(-g.gamma / g.zeta))
        self._t_low, self._t_up = per_unit(lambda g: g.t_l), per_unit(lambda g: g.t_u)
        # the logit above which each unit's eval mask is non-zero (kept_bound): in float64, the soft
        # count's centre; as float32 numbers, what float32 (and fp16, bf16) logits are compared with
        self._kept_above = per_unit(lambda g: kept_bound(g, torch.float64))
        self._kept_above_float32 = per_unit(lambda g: kept_bound(g, torch.float32))
        self._centres = torch.stack([self._shift, self._kept_above])  # p_open's and soft_kept's, (2, n_units)
        self._fixed_params = torch.tensor(self.fixed_params, dtype=torch.float64)
        self._moved: dict[tuple, torch.Tensor] = {}
        self._linear_widths = self._single_producer and not self._has_in_gates \
            and self.n_units * self.n_layers <= LINEAR_WIDTHS_MAX_ENTRIES
        if self._linear_widths:  # [E[in] | E[out]] = p @ [A_in | A_out] + [c_in | c_out]: one product
            (a_in, c_in), (a_out, c_out) = (self._width_matrix(self._in_group, self._in_layer),
                                            self._width_matrix(self._out_group, self._out_layer))
            self._widths_matrix, self._widths_fixed = torch.cat([a_in, a_out], 1), torch.cat([c_in, c_out])

        with torch.no_grad():
            every_group, every_unit = torch.ones(self.n_groups, dtype=torch.float64), torch.ones(self.n_units, dtype=torch.float64)
            self.dense = {kind: float(self._cost(every_group, every_unit, kind)) for kind in ("params", "flops")}
            self.minimum = {kind: float(self.actual_tensor(kind, every_unit < 0)) for kind in COSTS}
        self.dense["count"] = float(self.n_units)

    def _width_matrix(self, groups: torch.Tensor, layers: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(A, c)``, ``(n_units, n_layers)`` and ``(n_layers,)`` float64: with each group made by
        at most one unit and no layer input gates, a layer's expected width (over these
        ``groups`` / ``layers`` entries) is ``p @ A + c``: ``A`` counts the channels each unit
        makes, ``c`` those no gate controls."""
        unit = torch.cat([self._producer, self._producer.new_tensor([self.n_units + 1])])[groups]
        counts = torch.zeros(self.n_units + 2, self.n_layers, dtype=torch.float64)
        counts.index_put_((unit, layers), torch.ones(len(unit), dtype=torch.float64), accumulate=True)
        return counts[:self.n_units].clone(), counts[self.n_units + 1].clone()

    @staticmethod
    def _batch(gated, example_inputs) -> int:
        inputs = example_inputs if example_inputs is not None else getattr(gated, "example_inputs", ())
        first = inputs[0] if isinstance(inputs, (tuple, list)) else inputs
        return first.shape[0] if first.dim() > 1 else 1

    def _on(self, name, like: torch.Tensor, make=None) -> torch.Tensor:
        """Index or constant tensor ``name`` on ``like``'s device (float ones in its dtype),
        copied there once: the penalty runs every training step. ``make``: builds the tensor
        (float64 or integer) when ``name`` is a key, not an attribute."""
        key = (name, like.device, like.dtype)
        moved = self._moved.get(key)
        if moved is None:
            value = getattr(self, name) if make is None else make()
            moved = value.to(like.device) if not value.is_floating_point() else value.to(like.device, like.dtype)
            self._moved[key] = moved
        return moved

    # -- one vectorised evaluation -----------------------------------------------------------
    def _cost(self, q: torch.Tensor, p_unit: torch.Tensor, kind: str) -> torch.Tensor:
        """Parameters or FLOPs per sample (``kind``), from ``q`` ``(..., n_groups)`` (the
        probability each channel group is alive) and ``p_unit`` ``(..., n_units)`` (each gate
        unit's probability of being open, for a layer's own input gate); shape ``(...)``, in
        ``q``'s dtype. Leading dimensions are evaluated together (one pass for several models)."""
        return self._cost_of_widths(*self._widths(q, p_unit), kind)

    def _widths_of_p(self, p: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(E[in], E[out])``, each ``(k, n_layers)``, from ``k`` models' unit probabilities ``p``
        ``(k, n_units)``: one matrix product when the widths are linear in ``p``
        (:meth:`_width_matrix`), else through ``q`` (:meth:`_widths`)."""
        if not self._linear_widths:
            return self._widths(self._q_expected(p), p)
        widths = torch.addmm(self._on("_widths_fixed", p), p, self._on("_widths_matrix", p))
        return widths.split(self.n_layers, -1)

    def _widths(self, q: torch.Tensor, p_unit: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(E[in], E[out])``, each ``(..., n_layers)``: every layer's expected input and output width."""
        one = q.new_ones((*q.shape[:-1], 1))
        q_ext = torch.cat([q, one], -1)  # index n_groups: an input channel no group tracks
        zeros = q.new_zeros((*q.shape[:-1], self.n_layers))
        e_out = zeros.index_add(-1, self._on("_out_layer", q), q_ext[..., self._on("_out_group", q)])
        in_alive = q_ext[..., self._on("_in_group", q)]
        if self._has_in_gates:
            in_alive = in_alive * torch.cat([p_unit, one], -1)[..., self._on("_in_unit", q)]
        e_in = zeros.index_add(-1, self._on("_in_layer", q), in_alive)
        return e_in, e_out

    def _cost_of_widths(self, e_in: torch.Tensor, e_out: torch.Tensor, kind: str) -> torch.Tensor:
        pairs = e_in * e_out
        if kind != "params":
            return pairs @ self._on("_flops_per_pair", e_in)
        if pairs.dim() == 2:  # several models (the training step's two): fused matrix-vector products
            with_bias = torch.addmv(self._on("_fixed_params", e_in), e_out, self._on("_bias", e_in))
            return torch.addmv(with_bias, pairs, self._on("_weight_per_pair", e_in))
        return pairs @ self._on("_weight_per_pair", e_in) + e_out @ self._on("_bias", e_in) + self.fixed_params

    def _grad_p(self, p: torch.Tensor, e_in: torch.Tensor, e_out: torch.Tensor, kind: str) -> torch.Tensor:
        """``(n_units,)`` d cost / d p_open of one model (``p`` ``(n_units,)`` and the widths from
        :meth:`_widths_of_p`), in closed form: the cost is ``sum_l w_l E[in]_l E[out]_l
        (+ b_l E[out]_l)`` and each width sums ``q`` (times a layer's own input gate)."""
        per_pair = self._on("_weight_per_pair" if kind == "params" else "_flops_per_pair", p)
        # d cost / d E[out]
        d_out = torch.addcmul(self._on("_bias", p), per_pair, e_in) if kind == "params" else per_pair * e_in
        if self._linear_widths:
            return self._on("_widths_matrix", p) @ torch.cat([per_pair * e_out, d_out])
        q = self._q_expected(p)
        d_in = (per_pair * e_out)[self._on("_in_layer", p)]  # d cost / d in_alive, per input entry
        d_q = p.new_zeros(self.n_groups + 1).index_add_(0, self._on("_out_group", p), d_out[self._on("_out_layer", p)])
        d_p = p.new_zeros(self.n_units + 2)  # n_units: no producer, n_units + 1: certain (their p is fixed)
        if self._has_in_gates:
            q_ext, p_ext = torch.cat([q, p.new_ones(1)]), torch.cat([p, p.new_ones(1)])
            in_unit = self._on("_in_unit", p)
            d_q.index_add_(0, self._on("_in_group", p), d_in * p_ext[in_unit])
            d_p.index_add_(0, in_unit, d_in * q_ext[self._on("_in_group", p)])
        else:
            d_q.index_add_(0, self._on("_in_group", p), d_in)
        d_q = d_q[:-1]
        if self._single_producer:
            d_p.index_add_(0, self._on("_producer", p), d_q)
            return d_p[:self.n_units]
        # q = 1 - prod (1 - p) over a group's producers: dq/dp_u = prod over the others = (1 - q) / (1 - p_u)
        kept = p <= 1 - 1e-6  # where _q_expected's clamp let p through
        one_minus_q = torch.where(self._on("_certain", p), 0.0, 1.0 - q)
        prod_unit = self._on("_prod_unit", p)
        through = (d_q * one_minus_q)[self._on("_prod_group", p)] / (1.0 - p.clamp(max=1 - 1e-6))[prod_unit]
        d_p.index_add_(0, prod_unit, through * kept[prod_unit])
        return d_p[:self.n_units]

    def _flat_log_alpha(self) -> torch.Tensor:
        logits = [g.log_alpha for g in self.gates]
        return torch.cat(logits) if len(logits) > 1 else logits[0]

    def p_open(self) -> torch.Tensor:
        """``(n_units,)`` every gate unit's ``p_open``, differentiable, in gate order."""
        log_alpha = self._flat_log_alpha()
        return torch.sigmoid(log_alpha - self._on("_shift", log_alpha))

    @torch.no_grad()
    def soft_kept(self, kind: str, temperature: float = 0.5) -> torch.Tensor:
        """0-dim cost (no gradient) with each unit counted ``sigmoid((log_alpha - threshold) /
        temperature)``, ``threshold`` the logit above which its eval mask keeps it: the cost of
        the eval masks, smoothed, so that it moves as soon as the gates move."""
        log_alpha = self._flat_log_alpha().detach().double()
        soft = torch.sigmoid((log_alpha - self._on("_kept_above", log_alpha)) / temperature)
        return self._expected(soft, kind)

    @torch.no_grad()
    def kept_units(self) -> torch.Tensor:
        """``(n_units,)`` bool: which gate units the eval masks keep, in gate order."""
        return torch.cat(eval_masks(self.gates)) > 0  # a GatedModel's gates: one sampling call

    @torch.no_grad()
    def units_above_threshold(self, log_alpha: torch.Tensor | None = None) -> torch.Tensor:
        """``(n_units,)`` bool: the units whose ``log_alpha`` lies above the boundary of its eval
        mask's support (:func:`kept_bound`): the units :meth:`kept_units` keeps, except a logit
        within rounding of ``z_hat``'s zero, which the eval mask's float arithmetic may place on
        either side. One concatenation and one comparison, where :meth:`kept_units` samples every
        eval mask: the measurement a training step can afford (:class:`lumos.BudgetController`).
        ``log_alpha``: the gates' logits already concatenated (in gate order), if the caller has them."""
        log_alpha = (self._flat_log_alpha() if log_alpha is None else log_alpha).detach()
        if log_alpha.dtype == torch.float64:
            return log_alpha > self._on("_kept_above", log_alpha)
        if log_alpha.dtype != torch.float32:
            log_alpha = log_alpha.float()  # fp16, bf16: exact in float32, where their bounds are
        return log_alpha > self._on("_kept_above_float32", log_alpha)

    def _q_expected(self, p: torch.Tensor) -> torch.Tensor:
        """``(..., n_groups)`` probability each group is alive, from ``p`` ``(..., n_units)``."""
        if self._single_producer:
            never_always = p.new_tensor([0.0, 1.0]).expand(*p.shape[:-1], 2)
            return torch.cat([p, never_always], -1)[..., self._on("_producer", p)]
        log_closed = torch.log1p(-p.clamp(max=1 - 1e-6))
        closed = p.new_zeros((*p.shape[:-1], self.n_groups)).index_add(
            -1, self._on("_prod_group", p), log_closed[..., self._on("_prod_unit", p)])
        return torch.where(self._on("_certain", p), 1.0, -torch.expm1(closed))

    def _q_actual(self, kept: torch.Tensor) -> torch.Tensor:
        live = kept.new_zeros(self.n_groups).index_add(0, self._on("_prod_group", kept),
                                                       kept[self._on("_prod_unit", kept)])
        return ((live > 0) | self._on("_certain", kept)).to(kept.dtype)

    def evaluate(self, kind: str) -> CostEvaluation:
        """Both costs, expected (differentiable, under ``p_open``) and actual (the eval masks),
        with the units they came from."""
        p = self.p_open()
        kept_units = self.kept_units()
        with torch.no_grad():
            in_band = (p > self._on("_t_low", p)) & (p <= self._on("_t_up", p))
        return CostEvaluation(self._expected(p, kind), self.actual_tensor(kind, kept_units), kept_units, in_band)

    def _expected(self, p: torch.Tensor, kind: str) -> torch.Tensor:
        if kind == "count":
            return p.sum(-1)
        return self._cost(self._q_expected(p), p, kind)

    def expected(self, kind: str) -> torch.Tensor:
        """Differentiable expected cost under the gates' ``p_open``, in the gates' dtype."""
        return self._expected(self.p_open(), kind)

    def expected_and_soft_kept(self, kind: str, temperature: float = 0.5, normalize: bool = False,
                               units: bool = False) -> tuple[torch.Tensor, ...]:
        """``(expected(kind), soft_kept(kind, temperature))`` from one vectorised evaluation (the
        two unit vectors stacked, one flat copy of the logits) and one backward node with the
        closed-form gradient (:class:`_ExpectedCost`): what a training step needs. The second is
        detached and in the gates' dtype (``soft_kept`` alone is float64). ``normalize``: both
        as fractions of the dense model's cost. ``units``: also :meth:`units_above_threshold`,
        from the same copy of the logits (a third item)."""
        scale = 1.0 / self.dense[kind] if normalize else 1.0
        logits = [g.log_alpha for g in self.gates]
        if not torch.is_grad_enabled():  # no graph to record: the evaluation alone
            expected, kept, _, log_alpha = self._expected_and_soft_kept(kind, temperature, scale, logits)
            return (expected, kept, self.units_above_threshold(log_alpha)) if units else (expected, kept)
        return _ExpectedCost.apply(self, kind, temperature, scale, units, *logits)

    def _expected_and_soft_kept(self, kind: str, temperature: float, scale: float, logits) -> tuple:
        """``(expected, soft_kept, saved, log_alpha)``: the evaluation of
        :meth:`expected_and_soft_kept` without a graph, what :meth:`_grad_p` needs (``(p,)`` or
        ``(p, E[in], E[out])`` of the expected row) and the concatenated logits."""
        log_alpha = torch.cat(logits) if len(logits) > 1 else logits[0]
        # rows: p = sigmoid(log_alpha - shift) and soft = sigmoid((log_alpha - kept_above) / temperature)
        divisors = self._on(("divisors", temperature), log_alpha,
                            lambda: torch.tensor([[1.0], [temperature]], dtype=torch.float64))
        both = torch.sigmoid((log_alpha - self._on("_centres", log_alpha)) / divisors)
        if kind == "count":
            cost, saved = both.sum(-1), (both[0],)
        else:
            e_in, e_out = self._widths_of_p(both)
            cost, saved = self._cost_of_widths(e_in, e_out, kind), (both[0], e_in[0], e_out[0])
        expected, kept = (cost * scale if scale != 1.0 else cost).unbind()
        return expected, kept, saved, log_alpha

    @torch.no_grad()
    def actual_tensor(self, kind: str, kept_units: torch.Tensor) -> torch.Tensor:
        """0-dim float64 cost (exact counts) of the model that keeps ``kept_units`` (bool, in
        gate order)."""
        kept = kept_units.double()
        if kind == "count":
            return kept.sum()
        if self._linear_widths:  # the expected widths of 0/1 probabilities: the same exact counts
            return self._cost_of_widths(*self._widths_of_p(kept[None]), kind)[0]
        return self._cost(self._q_actual(kept), kept, kind)

    @torch.no_grad()
    def actual(self, kind: str) -> float:
        """Cost with the eval masks (what compaction keeps, before downstream-liveness pruning)."""
        return float(self.actual_tensor(kind, self.kept_units()))


class _ExpectedCost(torch.autograd.Function):
    """The training step's cost evaluation: ``(expected, soft_kept)`` of a :class:`CostModel`
    computed without recording a graph, and the expected cost's gradient in closed form
    (:meth:`CostModel._grad_p`, then ``dp/dlog_alpha = p (1 - p)``). The evaluation is a few
    dozen tensor ops on small vectors; autograd's graph of them cost more than the ops."""

    @staticmethod
    def forward(ctx, costs, kind, temperature, scale, units, *logits):
        ctx.set_materialize_grads(False)
        expected, kept, saved, log_alpha = costs._expected_and_soft_kept(kind, temperature, scale, logits)
        ctx.save_for_backward(*saved)
        ctx.costs, ctx.kind, ctx.sizes, ctx.scale = costs, kind, [t.numel() for t in logits], scale
        ctx.logits = logits  # only for a backward that is itself differentiated (see backward)
        if not units:
            ctx.mark_non_differentiable(kept)
            return expected, kept
        above = costs.units_above_threshold(log_alpha)
        ctx.mark_non_differentiable(kept, above)
        return expected, kept, above

    @staticmethod
    def backward(ctx, grad_expected, *_grad_kept):
        if grad_expected is None:
            return (None,) * (5 + len(ctx.sizes))
        if torch.is_grad_enabled():  # create_graph=True: autograd through the plain formulas, differentiable again
            with torch.enable_grad():
                expected = ctx.costs.expected(ctx.kind) * ctx.scale
            grads = torch.autograd.grad(expected, ctx.logits, grad_expected, create_graph=True)
            return (None,) * 5 + tuple(grads)
        p, *widths = ctx.saved_tensors
        d_p = torch.ones_like(p) if ctx.kind == "count" else ctx.costs._grad_p(p, *widths, ctx.kind)
        grad = torch.ops.aten.sigmoid_backward(d_p.mul_(grad_expected * ctx.scale), p)  # times p (1 - p)
        return (None,) * 5 + grad.split(ctx.sizes)


def kept_bound(gate: HardConcreteGate, dtype: torch.dtype) -> float:
    """The ``dtype`` (float32 or float64) number ``b`` such that a logit ``x`` of that dtype has a
    non-zero eval mask exactly when ``x > b``, with ``z_hat`` taken without rounding: forced open
    at ``x >= open_min``, otherwise kept where not forced closed (``x > closed_max``) and
    ``z_hat > 0`` (``x > logit(-gamma / (zeta - gamma))``); the bounds of
    :func:`lumos_kernels.hard_concrete.log_alpha_bounds`."""
    closed_max, open_min = log_alpha_bounds(gate.t_l, gate.t_u, gate.beta, gate.gamma, gate.zeta, dtype)
    bound = max(closed_max, nearest_on_side(math.log(-gate.gamma / gate.zeta), dtype, above=False))
    if math.isnan(open_min):  # t_u = 1: nothing forced open
        return bound
    below_open = nearest_on_side(math.nextafter(open_min, -math.inf), dtype, above=False)  # x >= open_min: x > this
    return min(below_open, bound)


def _cat_long(parts: list[torch.Tensor]) -> torch.Tensor:
    return torch.cat(parts).long() if parts else torch.zeros(0, dtype=torch.long)


def cost_model(gated: nn.Module) -> CostModel:
    """The (cached) :class:`CostModel` of ``gated``."""
    model = _CACHE.get(gated)
    if model is None:
        model = _CACHE[gated] = CostModel(gated)
    return model


def check_cost(cost: str, who: str) -> None:
    if cost not in COSTS:
        raise ValueError(f"{who}: `cost` must be one of {COSTS}, got {cost!r}")
