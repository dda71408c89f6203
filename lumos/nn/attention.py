"""GatedMultiheadAttention: ``nn.MultiheadAttention`` with L0 gates on heads and head dimensions.

:func:`attention_core` (heads split, masks merged, ``F.scaled_dot_product_attention``, heads
merged) is the gated layer's core; a compacted model spells the same computation out in plain
torch ops between ``nn.Linear`` projections (``lumos/compact/build_attention.py``).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from lumos_kernels import masked_linear

from ..gates import HardConcreteGate


def _float_mask(mask: torch.Tensor | None, name: str, dtype: torch.dtype) -> torch.Tensor | None:
    """torch's mask convention as an additive float mask: bool True means "may not attend"."""
    if mask is None:
        return None
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(mask, float("-inf"))
    if not mask.is_floating_point():
        raise TypeError(f"multi-head attention: `{name}` must be a bool or float tensor, got {mask.dtype}")
    return mask.to(dtype)


def attention_core(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, num_heads: int, scale: float, *,
                   batch_first: bool = True, attn_mask: torch.Tensor | None = None,
                   key_padding_mask: torch.Tensor | None = None, dropout_p: float = 0.0,
                   need_weights: bool = False, average_attn_weights: bool = True,
                   heads: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    r"""Scaled dot-product attention over already projected ``q, k, v``, with torch's mask rules.

    .. math::
        o_h = \mathrm{softmax}(\mathrm{scale} \cdot q_h k_h^T + M)\, v_h, \qquad o = [o_1, \dots, o_H]

    ``M`` merges ``attn_mask`` ((L, S), or (B * H_all, L, S) per head) and ``key_padding_mask``
    ((B, S)); bool masks mark positions that may *not* be attended (``nn.MultiheadAttention``'s
    convention), float masks are added. ``heads`` (long, a subset of the ``H_all`` heads the mask
    was made for) selects the rows of a per-head ``attn_mask``.

    Shapes:
        q ``(B, L, H * Dq)`` (``(L, B, .)`` if not ``batch_first``; ``(L, .)`` unbatched),
        k ``(B, S, H * Dq)``, v ``(B, S, H * Dv)``; returns ``(B, L, H * Dv)`` in q's layout and
        the attention weights ``(B, L, S)`` averaged over heads (``(B, H, L, S)`` if not
        ``average_attn_weights``) when ``need_weights``, else None.
    """
    batched = q.dim() == 3
    if not batched:
        q, k, v = q.unsqueeze(0), k.unsqueeze(0), v.unsqueeze(0)
        key_padding_mask = key_padding_mask.unsqueeze(0) if key_padding_mask is not None else None
    elif not batch_first:
        q, k, v = q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1)
    batch, length, source = q.shape[0], q.shape[1], k.shape[1]
    qh = q.reshape(batch, length, num_heads, -1).transpose(1, 2)
    kh = k.reshape(batch, source, num_heads, -1).transpose(1, 2)
    vh = v.reshape(batch, source, num_heads, -1).transpose(1, 2)
    mask = _float_mask(attn_mask, "attn_mask", q.dtype)
    if mask is not None:
        if mask.dim() == 2:
            mask = mask.reshape(1, 1, length, source)
        else:
            mask = mask.reshape(batch, -1, length, source)
            if heads is not None:
                mask = mask.index_select(1, heads)
    padding = _float_mask(key_padding_mask, "key_padding_mask", q.dtype)
    if padding is not None:
        padding = padding.reshape(batch, 1, 1, source)
        mask = padding if mask is None else mask + padding
    weights = None
    if need_weights:
        scores = torch.matmul(qh, kh.transpose(-2, -1)) * scale
        if mask is not None:
            scores = scores + mask
        attn = torch.softmax(scores, dim=-1)
        if dropout_p > 0.0:
            attn = F.dropout(attn, p=dropout_p)
        out = torch.matmul(attn, vh)
        weights = attn.mean(dim=1) if average_attn_weights else attn
        if not batched:
            weights = weights.squeeze(0)
    else:
        out = F.scaled_dot_product_attention(qh, kh, vh, attn_mask=mask, dropout_p=dropout_p, scale=scale)
    out = out.transpose(1, 2).reshape(batch, length, -1)
    if not batched:
        return out.squeeze(0), weights
    return (out if batch_first else out.transpose(0, 1)), weights


GATE_NAMES = ("head_gate", "qk_dim_gate", "v_dim_gate")


def _load_torch_layout(module: nn.Module, state_dict: dict, prefix: str, *args) -> None:
    """``load_state_dict`` pre-hook of :class:`GatedMultiheadAttention`: rewrite, in the dict being
    loaded, an ``nn.MultiheadAttention`` layout (packed ``in_proj_weight`` / ``in_proj_bias``, or
    ``q_proj_weight``, ``k_proj_weight``, ``v_proj_weight``) to ``q_proj.weight``... and add the gates'
    current values (torch's layer has no gates). Any other layout is left as it is."""
    packed, separate = prefix + "in_proj_weight", [f"{prefix}{p}_proj_weight" for p in "qkv"]
    if packed in state_dict:
        weights = state_dict.pop(packed).chunk(3)
    elif all(key in state_dict for key in separate):
        weights = [state_dict.pop(key) for key in separate]
    else:
        return
    bias = state_dict.pop(prefix + "in_proj_bias", None)
    biases = bias.chunk(3) if bias is not None else (None, None, None)
    for p, weight, b in zip("qkv", weights, biases):
        state_dict[f"{prefix}{p}_proj.weight"] = weight
        if b is not None:
            state_dict[f"{prefix}{p}_proj.bias"] = b
    for gate in GATE_NAMES:
        for key, value in getattr(module, gate).state_dict().items():
            state_dict.setdefault(f"{prefix}{gate}.{key}", value)


class GatedMultiheadAttention(nn.Module):
    r"""Multi-head attention with separate Q, K, V projections and L0 gates (DESIGN.md 1, attention).

    With ``m_head`` (one gate per head), ``m_qk`` and ``m_v`` (one gate per head dimension, shared
    by all heads so that heads keep equal widths), for head ``h``:

    .. math::
        o_h = \mathrm{softmax}\Big(\frac{(q_h \odot m_{qk})\, k_h^T}{\sqrt{d}} + M\Big)
              \big(v_h \odot m_v\big)\, m_{head,h}, \qquad
        y = W_O [o_1, \dots, o_H] + b_O

    with ``q = x_q W_Q^T + b_Q`` (likewise k, v) and ``d = embed_dim // num_heads``. Q and K share
    their dimension gates (the gate multiplies each term of the dot product once); a closed
    V dimension also removes the matching input columns of ``W_O``; a closed head removes its
    rows of ``W_Q, W_K, W_V`` and its columns of ``W_O``. ``embed_dim`` (the residual stream)
    keeps its width.

    A drop-in for ``nn.MultiheadAttention`` (same arguments and ``forward``; ``add_bias_kv`` and
    ``add_zero_attn`` are not supported). Parameters ``q_proj``, ``k_proj``, ``v_proj``,
    ``out_proj`` are ``nn.Linear`` layers initialised like torch's packed projections.
    ``load_state_dict`` also takes a ``state_dict`` of ``nn.MultiheadAttention`` (packed
    ``in_proj_weight``/``in_proj_bias``, or ``q_proj_weight``... when ``kdim``/``vdim`` differ): it
    is split into the three projections, and the gates, which torch's layer has not, keep
    their current values.

    Args:
        embed_dim, num_heads, dropout, bias, kdim, vdim, batch_first: as ``nn.MultiheadAttention``.
        **gate_kwargs: passed to each :class:`lumos.gates.HardConcreteGate`.

    Shapes:
        query ``(B, L, embed_dim)`` (``(L, B, .)`` if not ``batch_first``, ``(L, .)`` unbatched),
        key ``(B, S, kdim)``, value ``(B, S, vdim)``; output ``(B, L, embed_dim)`` and the
        attention weights ``(B, L, S)`` (or None).
    """

    def __init__(self, embed_dim: int, num_heads: int, dropout: float = 0.0, bias: bool = True,
                 add_bias_kv: bool = False, add_zero_attn: bool = False, kdim: int | None = None,
                 vdim: int | None = None, batch_first: bool = False, device=None, dtype=None, **gate_kwargs):
        super().__init__()
        if add_bias_kv or add_zero_attn:
            raise ValueError("GatedMultiheadAttention: `add_bias_kv` and `add_zero_attn` are not supported")
        if embed_dim <= 0 or num_heads <= 0 or embed_dim % num_heads:
            raise ValueError(f"GatedMultiheadAttention: `embed_dim` ({embed_dim}) must be a positive multiple "
                             f"of `num_heads` ({num_heads})")
        factory = {"device": device, "dtype": dtype}
        self.embed_dim, self.num_heads, self.head_dim = embed_dim, num_heads, embed_dim // num_heads
        self.kdim = kdim if kdim is not None else embed_dim
        self.vdim = vdim if vdim is not None else embed_dim
        self.dropout, self.batch_first = float(dropout), bool(batch_first)
        self.q_proj = nn.Linear(embed_dim, embed_dim, bias=bias, **factory)
        self.k_proj = nn.Linear(self.kdim, embed_dim, bias=bias, **factory)
        self.v_proj = nn.Linear(self.vdim, embed_dim, bias=bias, **factory)
        self.out_proj = nn.Linear(embed_dim, embed_dim, bias=bias, **factory)
        self._reset_weights()
        self.head_gate = HardConcreteGate(num_heads, device=device, **gate_kwargs)
        self.qk_dim_gate = HardConcreteGate(self.head_dim, device=device, **gate_kwargs)
        self.v_dim_gate = HardConcreteGate(self.head_dim, device=device, **gate_kwargs)
        self.register_load_state_dict_pre_hook(_load_torch_layout)

    @property
    def scaling(self) -> float:
        """The softmax temperature ``1 / sqrt(head_dim)`` (of the full head width, kept by compaction)."""
        return 1.0 / math.sqrt(self.head_dim)

    def _reset_weights(self) -> None:
        """torch's ``MultiheadAttention._reset_parameters``: xavier on the (packed) in-projection,
        zero biases; ``out_proj`` keeps ``nn.Linear``'s init with a zero bias."""
        projections = (self.q_proj, self.k_proj, self.v_proj)
        with torch.no_grad():
            if self.kdim == self.vdim == self.embed_dim:
                packed = torch.empty(3 * self.embed_dim, self.embed_dim, device=self.q_proj.weight.device,
                                     dtype=self.q_proj.weight.dtype)
                nn.init.xavier_uniform_(packed)
                for proj, part in zip(projections, packed.chunk(3)):
                    proj.weight.copy_(part)
            else:
                for proj in projections:
                    nn.init.xavier_uniform_(proj.weight)
            for proj in projections + (self.out_proj,):
                if proj.bias is not None:
                    proj.bias.zero_()

    def reset_parameters(self) -> None:
        self.out_proj.reset_parameters()
        self._reset_weights()
        for gate in (self.head_gate, self.qk_dim_gate, self.v_dim_gate):
            gate.reset_parameters()

    @classmethod
    def from_mha(cls, mha: nn.MultiheadAttention, **gate_kwargs) -> "GatedMultiheadAttention":
        """A gated copy of ``mha`` holding the same weights (torch's packed ``in_proj_weight`` split
        into Q, K, V); with every gate open it computes exactly what ``mha`` computes."""
        if not isinstance(mha, nn.MultiheadAttention):
            raise TypeError(f"GatedMultiheadAttention.from_mha: `mha` must be nn.MultiheadAttention, "
                            f"got {type(mha).__name__}")
        if mha.bias_k is not None or mha.add_zero_attn:
            raise ValueError("GatedMultiheadAttention.from_mha: `add_bias_kv` and `add_zero_attn` are not supported")
        ref = mha.out_proj.weight
        layer = cls(mha.embed_dim, mha.num_heads, mha.dropout, bias=mha.in_proj_bias is not None, kdim=mha.kdim,
                    vdim=mha.vdim, batch_first=mha.batch_first, device=ref.device, dtype=ref.dtype, **gate_kwargs)
        if mha._qkv_same_embed_dim:
            weights = mha.in_proj_weight.chunk(3)
        else:
            weights = (mha.q_proj_weight, mha.k_proj_weight, mha.v_proj_weight)
        biases = mha.in_proj_bias.chunk(3) if mha.in_proj_bias is not None else (None, None, None)
        with torch.no_grad():
            for proj, weight, bias in zip((layer.q_proj, layer.k_proj, layer.v_proj), weights, biases):
                proj.weight.copy_(weight)
                if bias is not None:
                    proj.bias.copy_(bias)
            layer.out_proj.weight.copy_(mha.out_proj.weight)
            if mha.out_proj.bias is not None:
                layer.out_proj.bias.copy_(mha.out_proj.bias)
        return layer

    def _check(self, query, key, value, key_padding_mask, attn_mask, is_causal) -> None:
        name = type(self).__name__
        for arg, tensor, width in (("query", query, self.embed_dim), ("key", key, self.kdim),
                                   ("value", value, self.vdim)):
            if not isinstance(tensor, torch.Tensor) or tensor.dim() not in (2, 3) or tensor.shape[-1] != width:
                shape = tuple(tensor.shape) if isinstance(tensor, torch.Tensor) else type(tensor).__name__
                raise ValueError(f"{name}: `{arg}` must be (batch, length, {width}) or unbatched (length, {width}), "
                                 f"got {shape}")
        if not query.dim() == key.dim() == value.dim() or key.shape[:-1] != value.shape[:-1]:
            raise ValueError(f"{name}: `query`, `key`, `value` must all be batched or all unbatched, and key and "
                             f"value must have the same leading shape; got {tuple(query.shape)}, "
                             f"{tuple(key.shape)}, {tuple(value.shape)}")
        if is_causal and attn_mask is None:
            raise RuntimeError(f"{name}: `is_causal` is only a hint; pass the causal `attn_mask` too "
                               "(as nn.MultiheadAttention requires)")

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                key_padding_mask: torch.Tensor | None = None, need_weights: bool = True,
                attn_mask: torch.Tensor | None = None, average_attn_weights: bool = True,
                is_causal: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        self._check(query, key, value, key_padding_mask, attn_mask, is_causal)
        m_head, m_qk, m_v = self.head_gate(), self.qk_dim_gate(), self.v_dim_gate()
        q = masked_linear(query, self.q_proj.weight, self.q_proj.bias, None, m_qk.repeat(self.num_heads))
        k = masked_linear(key, self.k_proj.weight, self.k_proj.bias, None, None)
        v = masked_linear(value, self.v_proj.weight, self.v_proj.bias, None, (m_head[:, None] * m_v).reshape(-1))
        out, weights = attention_core(q, k, v, self.num_heads, self.scaling, batch_first=self.batch_first,
                                      attn_mask=attn_mask, key_padding_mask=key_padding_mask,
                                      dropout_p=self.dropout if self.training else 0.0,
                                      need_weights=need_weights, average_attn_weights=average_attn_weights)
        return self.out_proj(out), weights

    def extra_repr(self) -> str:
        kept = [int(g.kept().sum()) for g in (self.head_gate, self.qk_dim_gate, self.v_dim_gate)]
        return (f"embed_dim={self.embed_dim}, num_heads={self.num_heads}, batch_first={self.batch_first}, "
                f"kept_heads={kept[0]}/{self.num_heads}, kept_qk_dims={kept[1]}/{self.head_dim}, "
                f"kept_v_dims={kept[2]}/{self.head_dim}")
