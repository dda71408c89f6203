"""Building multi-head attention as plain torch: the kept rows of the Q, K, V projections as
``nn.Linear`` layers (gate values and the ``1/sqrt(head_dim)`` of the full head width folded into
Q's and V's rows), heads split with ``unflatten``, ``F.scaled_dot_product_attention`` (or the
explicit softmax when the weights are used), heads merged, and the kept columns of ``out_proj``."""
from __future__ import annotations

import operator

import torch
import torch.nn.functional as F
from torch import fx, nn

from ..nn.attention import GatedMultiheadAttention
from ..plan.errors import CompactionError
from ..plan.ops_attention import Attention, AttentionItem, attention_gates, bound_args, result_items
from ..plan.trace import node_shape
from .builder import Builder, as64, eval_mask
from .build_linear import fold_inputs
from .plain import plain_linear
from .values import Value


def projection_weights(module: nn.Module) -> dict[str, torch.Tensor | None]:
    """An attention layer's projections in float64 on CPU: ``q, k, v, o`` and biases ``bq, bk, bv, bo``."""
    if isinstance(module, GatedMultiheadAttention):
        q, k, v = module.q_proj.weight, module.k_proj.weight, module.v_proj.weight
        bq, bk, bv = module.q_proj.bias, module.k_proj.bias, module.v_proj.bias
    else:
        q, k, v = (module.in_proj_weight.chunk(3) if module._qkv_same_embed_dim
                   else (module.q_proj_weight, module.k_proj_weight, module.v_proj_weight))
        bq, bk, bv = module.in_proj_bias.chunk(3) if module.in_proj_bias is not None else (None, None, None)
    return {name: as64(t) for name, t in dict(q=q, k=k, v=v, o=module.out_proj.weight, bq=bq, bk=bk, bv=bv,
                                                bo=module.out_proj.bias).items()}


def _rows(heads: torch.Tensor, dims: torch.Tensor, head_dim: int) -> torch.Tensor:
    """Rows ``h * head_dim + d`` for kept heads ``h`` and dims ``d``, head-major."""
    return (heads[:, None] * head_dim + dims[None, :]).reshape(-1)


def _projection(node, b: Builder, name, x, weight, bias, rows, scale, inputs_kept, ref) -> fx.Node:
    """``Linear(x)`` with rows ``rows`` scaled by ``scale``; dropped input columns fold into the bias
    (a constant added after it when there is none) and the signals."""
    kept_in, removed_in = inputs_kept
    w = weight[rows] * scale[:, None]
    space = b.plan.space_of.get(x)
    value = b.values[x] if space is not None and removed_in.numel() else Value.zeros(w.shape[1])
    fold, coef = fold_inputs(w, value, removed_in)
    full_bias = bias[rows] * scale + fold if bias is not None else None
    out = b.call_module(f"{node.target}.{name}", plain_linear(w[:, kept_in], full_bias, ref), b.env[x])
    if bias is None and bool(fold.abs().gt(0).any()):
        out = b.call_function(operator.add, out, b.buffer(f"{node.name}_{name}", fold))
    term = b.signal_term(value, coef, -1) if coef is not None else None
    return out if term is None else b.call_function(operator.add, out, term)


def _float_mask(b: Builder, mask: fx.Node, source: fx.Node) -> fx.Node:
    """torch's mask convention as an additive float mask: bool True means "may not attend"."""
    if node_shape(source) is not None and source.meta.get("lumos_dtype") == torch.bool:
        zeros = b.call_function(torch.zeros_like, mask, dtype=b.dtype)
        return b.call_method("masked_fill", zeros, mask, float("-inf"))
    return b.call_method("to", mask, b.dtype)


def _mask(node, b: Builder, args, module, heads, batched) -> fx.Node | None:
    """The merged additive mask ``(B or 1, heads or 1, L, S)`` of the kept heads, or None."""
    mask = None
    if args["attn_mask"] is not None:
        mask = _float_mask(b, b.env[args["attn_mask"]], args["attn_mask"])
        if len(node_shape(args["attn_mask"])) == 2:
            mask = b.call_function(operator.getitem, mask, (None, None))
        else:
            mask = b.call_method("unflatten", mask, 0, (-1, module.num_heads))
            if heads.numel() < module.num_heads:
                mask = b.call_method("index_select", mask, 1, b.buffer(node.name + "_heads", heads))
    if args["key_padding_mask"] is not None:
        padding = _float_mask(b, b.env[args["key_padding_mask"]], args["key_padding_mask"])
        if not batched:
            padding = b.call_method("unsqueeze", padding, 0)
        padding = b.call_function(operator.getitem, padding, (slice(None), None, None, slice(None)))
        mask = padding if mask is None else b.call_function(operator.add, mask, padding)
    return mask


def _core(node, b: Builder, module, args, q, k, v, heads, dq, dv, need_weights) -> tuple:
    """Scaled dot-product attention of projected ``q, k, v``: ``(output, weights or None)``."""
    batched = len(node_shape(args["query"])) == 3
    h = heads.numel()

    def to_heads(t, width):
        if not batched:
            t = b.call_method("unsqueeze", t, 0)
        elif not module.batch_first:
            t = b.call_method("transpose", t, 0, 1)
        return b.call_method("transpose", b.call_method("unflatten", t, -1, (h, width)), 1, 2)

    qh, kh, vh = to_heads(q, dq), to_heads(k, dq), to_heads(v, dv)
    mask = _mask(node, b, args, module, heads, batched)
    weights = None
    if need_weights:
        scores = b.call_function(torch.matmul, qh, b.call_method("transpose", kh, -2, -1))
        if mask is not None:
            scores = b.call_function(operator.add, scores, mask)
        attn = b.call_function(torch.softmax, scores, -1)
        out = b.call_function(torch.matmul, attn, vh)
        weights = b.call_method("mean", attn, 1) if bool(args["average_attn_weights"]) else attn
        if not batched:
            weights = b.call_method("squeeze", weights, 0)
    else:
        out = b.call_function(F.scaled_dot_product_attention, qh, kh, vh, attn_mask=mask, dropout_p=0.0, scale=1.0)
    out = b.call_method("flatten", b.call_method("transpose", out, 1, 2), -2)
    if not batched:
        out = b.call_method("squeeze", out, 0)
    elif not module.batch_first:
        out = b.call_method("transpose", out, 0, 1)
    return out, weights


def build_attention(node: fx.Node, record: Attention, b: Builder) -> None:
    module = b.plan.module(node)
    args = bound_args(node, module)
    heads, qk, vd, out = record.kept(node, b.plan)
    inputs = record.inputs_kept(node, b.plan)
    weights_used = any(u.users for u in result_items(node, 1))
    if weights_used and heads.numel() < module.num_heads:  # the plan keeps every head, unless no V dim is left
        raise CompactionError(
            f"lumos.compact: the attention weights of `{node.target}` are used (need_weights=True), but every "
            "value dimension of it is closed, so its heads are removed and their weights cannot be computed; "
            "call it with need_weights=False, or train with a budget that keeps a value dimension")
    w = projection_weights(module)
    head_gate, qk_gate, v_gate = attention_gates(module)
    ref = module.out_proj.weight
    query = b.env[args["query"]]
    ndim = len(node_shape(args["query"]))
    heads_out, weights = None, None
    if heads.numel():
        m_head = eval_mask(head_gate, module.num_heads)
        scaling = 1.0 / module.head_dim ** 0.5
        if qk.numel():
            rows = _rows(heads, qk, module.head_dim)
            q_scale = (eval_mask(qk_gate, module.head_dim)[qk] * scaling).repeat(heads.numel())
            q = _projection(node, b, "q_proj", args["query"], w["q"], w["bq"], rows, q_scale, inputs["query"], ref)
            k = _projection(node, b, "k_proj", args["key"], w["k"], w["bk"], rows,
                            torch.ones(rows.numel(), dtype=torch.float64), inputs["key"], ref)
            dq = qk.numel()
        else:  # every Q/K dim closed: all scores are 0 (uniform attention over the unmasked keys)
            zeros = torch.zeros(heads.numel(), dtype=torch.float64)
            q = b.constant(query, zeros, -1, ndim)
            k = b.constant(b.env[args["key"]], zeros, -1, ndim)
            dq = 1
        rows_v = _rows(heads, vd, module.head_dim)
        v_scale = (m_head[heads][:, None] * eval_mask(v_gate, module.head_dim)[vd][None, :]).reshape(-1)
        v = _projection(node, b, "v_proj", args["value"], w["v"], w["bv"], rows_v, v_scale, inputs["value"], ref)
        heads_out, weights = _core(node, b, module, args, q, k, v, heads, dq, vd.numel(), weights_used)
    if out.numel() == 0:
        result = b.no_channels(query, -1)
    elif heads_out is None:  # no head left: the output is out_proj's bias
        value = w["bo"][out] if w["bo"] is not None else torch.zeros(out.numel(), dtype=torch.float64)
        result = b.constant(query, value, -1, ndim)
    else:
        out_proj = plain_linear(w["o"][out][:, _rows(heads, vd, module.head_dim)],
                                w["bo"][out] if w["bo"] is not None else None, ref)
        result = b.call_module(f"{node.target}.out_proj", out_proj, heads_out)
    b.env[node] = (result, weights)


def build_attention_item(node: fx.Node, record: AttentionItem, b: Builder) -> None:
    made = b.env[node.args[0]]
    index = node.args[1]
    b.env[node] = made[index] if isinstance(made, tuple) else b.call_function(operator.getitem, made, index)
    space = b.plan.space_of.get(node)
    if space is not None:
        b.values[node] = Value.zeros(space.size)  # a dropped output channel is never read
