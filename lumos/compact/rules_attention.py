"""Compaction rules for multi-head attention (registered at import time).

``nn.MultiheadAttention`` and :class:`lumos.nn.GatedMultiheadAttention` return a tuple
``(output, weights)``. The attention node's own channel space is its **heads** (what
:func:`lumos.gate` and :func:`lumos.report` look at); two internal spaces hold the Q/K head
dimensions and the V head dimensions (shared by all heads); ``output = result[0]`` gets the
output channel space (``embed_dim``, produced by ``out_proj``).

A head survives if its gate is open, some V dimension survives and some output channel is
read; a Q/K (V) dimension survives if its gate is open and some head survives. The compacted
attention is plain graph ops (:class:`AttentionRule` has the details):

    q = Linear(query) ; k = Linear(key) ; v = Linear(value)              # kept rows only
    o, w = attention_core(q, k, v, kept_heads, scale=1.0, masks...)      # lumos.nn.attention
    result = (Linear(o), w)                                              # out_proj, kept columns

with every gate value and the original ``1 / sqrt(head_dim)`` folded into Q's (and V's) rows.
"""
from __future__ import annotations

import operator
from dataclasses import dataclass

import torch
from torch import fx, nn

from ..nn.attention import GatedMultiheadAttention, attention_core
from .modules import constant_like, zero_width
from .plan import Space
from .rules import FUNCTION_RULES, LayerCost, Opaque, Rule, eval_mask, register_function_rule, register_module_rule
from .rules_gnn import bound_args, last_dim_space
from .trace import node_shape

ATTENTION_TYPES = (nn.MultiheadAttention, GatedMultiheadAttention)


def attention_result(out: torch.Tensor, weights: torch.Tensor | None):
    """``(out, weights)``: the tuple an attention layer returns (used by compacted graphs)."""
    return out, weights


@dataclass
class _Weights:
    """An attention layer's projections in float64 on CPU, split per Q, K, V, out."""

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    o: torch.Tensor
    bq: torch.Tensor | None
    bk: torch.Tensor | None
    bv: torch.Tensor | None
    bo: torch.Tensor | None


def _weights(module: nn.Module) -> _Weights:
    def d(t):
        return None if t is None else t.detach().double().cpu()

    if isinstance(module, GatedMultiheadAttention):
        projections = (module.q_proj, module.k_proj, module.v_proj, module.out_proj)
        return _Weights(*(d(p.weight) for p in projections), *(d(p.bias) for p in projections))
    if module._qkv_same_embed_dim:
        q, k, v = module.in_proj_weight.chunk(3)
    else:
        q, k, v = module.q_proj_weight, module.k_proj_weight, module.v_proj_weight
    bq, bk, bv = module.in_proj_bias.chunk(3) if module.in_proj_bias is not None else (None, None, None)
    return _Weights(d(q), d(k), d(v), d(module.out_proj.weight), d(bq), d(bk), d(bv), d(module.out_proj.bias))


def _gates(module: nn.Module):
    if isinstance(module, GatedMultiheadAttention):
        return module.head_gate, module.qk_dim_gate, module.v_dim_gate
    return None, None, None


def _result_items(node: fx.Node, index: int) -> list[fx.Node]:
    return [u for u in node.users if u.op == "call_function" and u.target is operator.getitem
            and len(u.args) > 1 and u.args[1] == index]


def _supported(module: nn.Module) -> bool:
    return isinstance(module, GatedMultiheadAttention) or (module.bias_k is None and not module.add_zero_attn)


class AttentionRule(Rule):
    """Heads, Q/K dims and V dims are removed; see the module docstring."""

    reports_width = True

    def __init__(self):
        self.qk: Space | None = None
        self.vd: Space | None = None

    # -- analysis ---------------------------------------------------------------------------------
    def analyze(self, node, plan):
        module = plan.module(node)
        if not _supported(module):
            return Opaque().analyze(node, plan)
        head_gate, qk_gate, v_gate = _gates(module)
        heads_n, dim = module.num_heads, module.head_dim

        def produced(gate):
            return gate.kept().cpu() if gate is not None else True

        heads = plan.new_ids(heads_n, 0, produced(head_gate), head_gate)
        plan.space_of[node] = heads
        self.qk = plan.new_ids(dim, 0, produced(qk_gate), qk_gate)
        self.vd = plan.new_ids(dim, 0, produced(v_gate), v_gate)
        qk, vd = self.qk, self.vd

        def output_read() -> bool:
            return any(bool(plan.kept_mask(plan.space_of[u]).any()) for u in _result_items(node, 0)
                       if u in plan.space_of) or any(u.users for u in _result_items(node, 1))

        def any_kept(space):
            return lambda: bool(plan.kept_mask(space).any())

        plan.consume(heads, lambda: output_read() and bool(plan.kept_mask(vd).any()))
        plan.consume(qk, any_kept(heads))
        plan.consume(vd, any_kept(heads))
        args = bound_args(node, module)
        for name, dims in (("query", qk), ("key", qk), ("value", vd)):
            space = last_dim_space(plan, args[name])
            if space is not None:
                plan.consume(space, lambda dims=dims: bool(plan.kept_mask(heads).any() and plan.kept_mask(dims).any()))

    def _out_space(self, node, plan) -> Space | None:
        items = [u for u in _result_items(node, 0) if u in plan.space_of]
        return plan.space_of[items[0]] if items else None

    # -- sizes ------------------------------------------------------------------------------------
    def _kept(self, node, plan):
        """(kept heads, kept Q/K dims, kept V dims, kept output channels); no heads if no V dim."""
        heads, qk, vd = plan.kept(plan.space_of[node]), plan.kept(self.qk), plan.kept(self.vd)
        out = self._out_space(node, plan)
        out_kept = plan.kept(out) if out is not None else torch.arange(plan.module(node).embed_dim)
        if vd.numel() == 0:
            heads = heads[:0]
        return heads, qk, vd, out_kept

    def _inputs_kept(self, node, plan, module):
        """Kept and removed input columns of query, key and value."""
        args = bound_args(node, module)
        widths = {"query": module.embed_dim, "key": module.kdim, "value": module.vdim}
        result = {}
        for name, width in widths.items():
            space = plan.space_of.get(args[name])
            if space is None or space.dim != len(node_shape(args[name])) - 1:
                result[name] = (torch.arange(width), torch.zeros(0, dtype=torch.long))
            else:
                result[name] = (plan.kept(space), plan.removed(space))
        return result

    def params(self, node, plan):
        module = plan.module(node)
        if node not in plan.space_of or plan.space_of[node].size != module.num_heads:
            return Opaque().params(node, plan)
        heads, qk, vd, out = self._kept(node, plan)
        inputs = self._inputs_kept(node, plan, module)
        bias = module.out_proj.bias is not None
        if heads.numel() == 0:  # the core is emitted whenever a head survives, even for the weights alone
            return 0
        rows_qk, rows_v = heads.numel() * qk.numel(), heads.numel() * vd.numel()
        count = rows_v * (inputs["value"][0].numel() + bias) + out.numel() * (rows_v + bias)
        if rows_qk:
            count += rows_qk * (inputs["query"][0].numel() + inputs["key"][0].numel() + 2 * bias)
        return count

    def layer_cost(self, node, plan):
        """Q+K and V+out_proj as (heads x dims) products, out_proj's bias on the output channels.
        Input and output widths are taken whole (the residual stream); the softmax core is not counted."""
        module = plan.module(node)
        if node not in plan.space_of or plan.space_of[node].size != module.num_heads:
            return None
        heads = plan.space_of[node]
        bias = module.out_proj.bias is not None
        tokens = node_shape(bound_args(node, module)["query"])[:-1].numel()
        terms = [LayerCost(heads, module.num_heads, None, self.qk, module.embed_dim + module.kdim + 2 * bias,
                           False, tokens),
                 LayerCost(heads, module.num_heads, None, self.vd, module.vdim + module.embed_dim + bias,
                           False, tokens)]
        out = self._out_space(node, plan)
        if bias and out is not None:
            terms.append(LayerCost(None, 1, None, out, 0.0, True, tokens))
        return terms

    # -- build ------------------------------------------------------------------------------------
    def build(self, node, b):
        module = b.plan.module(node)
        if node not in b.plan.space_of or b.plan.space_of[node].size != module.num_heads or self.qk is None:
            return b.copy(node)
        args = bound_args(node, module)
        heads, qk, vd, out = self._kept(node, b.plan)
        weights_used = any(u.users for u in _result_items(node, 1))
        if weights_used and heads.numel() < module.num_heads:
            from . import CompactionError
            raise CompactionError(
                f"lumos.compact: the attention weights of `{node.target}` are used (need_weights=True), but "
                f"{module.num_heads - heads.numel()} of its {module.num_heads} heads are removed, whose weights "
                "the compacted model cannot reproduce; call it with need_weights=False")
        w = _weights(module)
        query = b.env[args["query"]]
        heads_out, weights = None, None
        if heads.numel():
            core = self._emit_attention(node, b, module, args, w, heads, qk, vd, weights_used)
            heads_out = b.graph.call_function(operator.getitem, (core, 0))
            weights = b.graph.call_function(operator.getitem, (core, 1)) if weights_used else None
        if out.numel() == 0:
            result = b.call_function(zero_width, (query, -1))
        elif heads_out is None:  # no head left: the output is out_proj's bias
            value = w.bo[out] if w.bo is not None else torch.zeros(out.numel(), dtype=torch.float64)
            value = b.add_buffer(node.target, value.to(module.out_proj.weight))
            result = b.call_function(constant_like, (query, value, -1))
        else:
            out_proj = self._linear(w.o[out][:, self._rows(heads, vd, module.head_dim)],
                                    w.bo[out] if w.bo is not None else None, module)
            result = b.call_module(f"{node.target}.out_proj", out_proj, (heads_out,))
        b.env[node] = b.call_function(attention_result, (result, weights))

    @staticmethod
    def _rows(heads: torch.Tensor, dims: torch.Tensor, head_dim: int) -> torch.Tensor:
        """Rows ``h * head_dim + d`` for kept heads ``h`` and dims ``d``, head-major."""
        return (heads[:, None] * head_dim + dims[None, :]).reshape(-1)

    @staticmethod
    def _linear(weight: torch.Tensor, bias: torch.Tensor | None, module: nn.Module) -> nn.Linear:
        ref = module.out_proj.weight
        layer = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device="meta")
        layer.weight = nn.Parameter(weight.to(ref))
        if bias is not None:
            layer.bias = nn.Parameter(bias.to(ref))
        return layer

    def _emit_projection(self, node, b, name, x, weight, bias, rows, scale, inputs_kept, module):
        """``Linear(x)`` with rows ``rows`` scaled by ``scale``; dropped input columns (constants)
        fold into the bias (or a constant added after it when there is no bias)."""
        kept_in, removed_in = inputs_kept
        w = weight[rows] * scale[:, None]
        fold = torch.zeros(rows.numel(), dtype=torch.float64)
        if removed_in.numel():
            fold = w[:, removed_in] @ b.const[x][removed_in]
        full_bias = bias[rows] * scale + fold if bias is not None else None
        layer = self._linear(w[:, kept_in], full_bias, module)
        out = b.call_module(f"{node.target}.{name}", layer, (b.env[x],))
        if bias is None and bool(fold.abs().gt(0).any()):  # no bias to fold into: add the constant
            constant = b.add_buffer(f"{node.target}.{name}", fold.to(module.out_proj.weight))
            out = b.call_function(operator.add, (out, constant))
        return out

    def _emit_attention(self, node, b, module, args, w, heads, qk, vd, need_weights):
        head_gate, qk_gate, v_gate = _gates(module)
        m_head = eval_mask(head_gate, module.num_heads)
        m_qk = eval_mask(qk_gate, module.head_dim)
        m_v = eval_mask(v_gate, module.head_dim)
        inputs = self._inputs_kept(node, b.plan, module)
        scaling = 1.0 / module.head_dim ** 0.5
        if qk.numel():
            rows = self._rows(heads, qk, module.head_dim)
            q_scale = (m_qk[qk] * scaling).repeat(heads.numel())
            q = self._emit_projection(node, b, "q_proj", args["query"], w.q, w.bq, rows, q_scale, inputs["query"],
                                      module)
            k = self._emit_projection(node, b, "k_proj", args["key"], w.k, w.bk, rows,
                                      torch.ones(rows.numel(), dtype=torch.float64), inputs["key"], module)
        else:  # every Q/K dim closed: all scores are 0 (uniform attention over the unmasked keys)
            zeros = torch.zeros(heads.numel(), dtype=module.out_proj.weight.dtype)
            zeros = b.add_buffer(f"{node.target}_qk_zeros", zeros)
            q = b.call_function(constant_like, (b.env[args["query"]], zeros, -1))
            k = b.call_function(constant_like, (b.env[args["key"]], zeros, -1))
        rows_v = self._rows(heads, vd, module.head_dim)
        v_scale = (m_head[heads][:, None] * m_v[vd][None, :]).reshape(-1)
        v = self._emit_projection(node, b, "v_proj", args["value"], w.v, w.bv, rows_v, v_scale, inputs["value"], module)
        head_index = None
        if heads.numel() < module.num_heads and args["attn_mask"] is not None:
            head_index = b.add_buffer(f"{node.target}_heads", heads.clone())
        env = b.env.__getitem__
        kwargs = dict(batch_first=module.batch_first, attn_mask=fx.map_arg(args["attn_mask"], env),
                      key_padding_mask=fx.map_arg(args["key_padding_mask"], env), dropout_p=0.0,
                      need_weights=need_weights, average_attn_weights=bool(args["average_attn_weights"]),
                      heads=head_index)
        return b.graph.call_function(attention_core, (q, k, v, heads.numel(), 1.0), kwargs)


class AttentionItemRule(Rule):
    """``result[0]`` / ``result[1]`` of an attention layer: the output gets its channel space
    (all produced by ``out_proj``); the weights are kept whole."""

    def analyze(self, node, plan):
        index = node.args[1]
        if index == 0 and node_shape(node) is not None:
            earlier = [u for u in _result_items(node.args[0], 0) if u in plan.space_of]
            if earlier:  # read twice: one set of output channels
                plan.same_space(node, earlier[0])
            else:
                plan.new_space(node, -1, produced=True)
        elif node_shape(node) is not None and len(node_shape(node)) > 0:
            plan.pin(plan.new_space(node, -1))


def _getitem_rule(previous):
    """``operator.getitem``: :class:`AttentionItemRule` on an attention layer's result, else the rule
    registered before (or :class:`Opaque`)."""
    fallback = previous() if previous is not None else Opaque()
    return _Dispatch(fallback)


class _Dispatch(Rule):
    def __init__(self, fallback: Rule):
        self.fallback = fallback
        self.chosen: Rule = fallback

    def _choose(self, node, plan):
        source = node.args[0] if node.args else None
        if (isinstance(source, fx.Node) and source.op == "call_module"
                and isinstance(plan.module(source), ATTENTION_TYPES) and source in plan.space_of
                and isinstance(node.args[1], int) and _supported(plan.module(source))):
            return AttentionItemRule()
        return self.fallback

    def analyze(self, node, plan):
        self.chosen = self._choose(node, plan)
        self.chosen.analyze(node, plan)

    def build(self, node, b):
        return self.chosen.build(node, b)

    def params(self, node, plan):
        return self.chosen.params(node, plan)

    def layer_cost(self, node, plan):
        return self.chosen.layer_cost(node, plan)


register_module_rule(ATTENTION_TYPES, lambda m: AttentionRule())
_previous_getitem = FUNCTION_RULES.get(operator.getitem)
register_function_rule([operator.getitem], lambda: _getitem_rule(_previous_getitem))
