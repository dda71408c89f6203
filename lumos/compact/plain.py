"""Plain torch twins of lumos' gated layers, with their eval gate values folded into the weights
(for gated layers a plan keeps whole: called twice, hooked, a leaf of the user's)."""
from __future__ import annotations

import copy

import torch
from torch import nn
from torch.nn.utils import parametrize

from ..nn import FeatureGate, GatedLinear, GatedMultiheadAttention
from ..nn.conv import GATED_CONVS
from .builder import as64, copy_hooks, eval_mask, without_parametrizations


def folded_linear(module: GatedLinear) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Weight ``(out, in)`` and bias of a gated linear layer with its eval gates folded, float64."""
    weight = as64(module.weight)
    m_in = eval_mask(module.in_gate, weight.shape[1])
    m_out = eval_mask(module.out_gate, weight.shape[0])
    bias = as64(module.bias) * m_out if module.bias is not None else None
    return weight * m_out[:, None] * m_in[None, :], bias


def folded_conv(module: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Weight (torch's layout) and bias of a (gated) convolution with its eval gates folded, float64."""
    weight = as64(module.weight)
    g, c_in, c_out = module.groups, module.in_channels, module.out_channels
    m_in = eval_mask(getattr(module, "in_gate", None), c_in)
    m_out = eval_mask(getattr(module, "out_gate", None), c_out)
    k = [1] * (weight.dim() - 2)
    if isinstance(module, nn.modules.conv._ConvTransposeNd):  # (C_in, C_out / g, *k)
        weight = weight * m_in.reshape(-1, 1, *k)
        weight = (weight.reshape(g, c_in // g, c_out // g, *weight.shape[2:])
                  * m_out.reshape(g, 1, c_out // g, *k)).reshape(weight.shape)
    else:  # (C_out, C_in / g, *k): input channel of weight[o, j] = group(o) * (C_in / g) + j
        m_in_rows = m_in.reshape(g, 1, c_in // g).expand(g, c_out // g, c_in // g)
        weight = weight * m_out.reshape(-1, 1, *k) * m_in_rows.reshape(c_out, c_in // g, *k)
    bias = as64(module.bias) * m_out if module.bias is not None else None
    return weight, bias


def plain_conv(module: nn.Module, c_in: int, c_out: int, groups: int, weight: torch.Tensor,
               bias: torch.Tensor | None) -> nn.Module:
    """A plain torch conv with ``module``'s hyper-parameters and the given widths and weights."""
    plain = getattr(module, "_plain", None) or parametrize.type_before_parametrizations(module)
    kwargs = dict(kernel_size=module.kernel_size, stride=module.stride, padding=module.padding,
                  dilation=module.dilation, groups=groups, bias=bias is not None,
                  padding_mode=module.padding_mode, device="meta")
    if isinstance(module, nn.modules.conv._ConvTransposeNd):
        kwargs["output_padding"] = module.output_padding
    layer = plain(c_in, c_out, **kwargs)
    layer.weight = nn.Parameter(weight.to(module.weight).contiguous())
    if bias is not None:
        layer.bias = nn.Parameter(bias.to(module.weight).contiguous())
    return layer


def plain_linear(weight: torch.Tensor, bias: torch.Tensor | None, like: torch.Tensor) -> nn.Linear:
    layer = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device="meta")
    layer.weight = nn.Parameter(weight.to(like).contiguous())
    if bias is not None:
        layer.bias = nn.Parameter(bias.to(like).contiguous())
    return layer


def plain_attention(module: GatedMultiheadAttention) -> nn.MultiheadAttention:
    """``nn.MultiheadAttention`` computing what the gated one computes in eval: Q rows scaled by
    the Q/K dim gates, V rows by head and V dim gates."""
    ref = module.out_proj.weight
    plain = nn.MultiheadAttention(module.embed_dim, module.num_heads, module.dropout,
                                  bias=module.q_proj.bias is not None, kdim=module.kdim, vdim=module.vdim,
                                  batch_first=module.batch_first, device=ref.device, dtype=ref.dtype)
    m_head = eval_mask(module.head_gate, module.num_heads)
    m_qk = eval_mask(module.qk_dim_gate, module.head_dim).repeat(module.num_heads)
    m_v = (m_head[:, None] * eval_mask(module.v_dim_gate, module.head_dim)[None, :]).reshape(-1)
    scales = (m_qk, torch.ones_like(m_qk), m_v)
    projections = (module.q_proj, module.k_proj, module.v_proj)
    with torch.no_grad():
        weights = [as64(p.weight) * s[:, None] for p, s in zip(projections, scales)]
        if plain._qkv_same_embed_dim:
            plain.in_proj_weight.copy_(torch.cat(weights))
        else:
            for name, w in zip(("q_proj_weight", "k_proj_weight", "v_proj_weight"), weights):
                getattr(plain, name).copy_(w)
        if plain.in_proj_bias is not None:
            plain.in_proj_bias.copy_(torch.cat([as64(p.bias) * s for p, s in zip(projections, scales)]))
        plain.out_proj.load_state_dict(module.out_proj.state_dict())
    return plain


def plain_twin(module: nn.Module) -> nn.Module:
    """``module`` with every gated layer in it (itself included) replaced by its plain twin
    (gates folded), hooks kept. Other modules are deep-copied."""
    if isinstance(module, GatedLinear):
        weight, bias = folded_linear(module)
        twin = plain_linear(weight, bias, module.weight)
    elif isinstance(module, GATED_CONVS):
        weight, bias = folded_conv(module)
        twin = plain_conv(module, module.in_channels, module.out_channels, module.groups, weight, bias)
    elif isinstance(module, GatedMultiheadAttention):
        twin = plain_attention(module)
    elif isinstance(module, FeatureGate):
        raise TypeError("plain_twin: a FeatureGate has no plain twin")
    else:
        twin = without_parametrizations(copy.deepcopy(module))
        for name, child in module.named_children():
            if is_gated(child):
                setattr(twin, name, plain_twin(child))
    copy_hooks(module, twin)
    return twin


def is_gated(module: nn.Module) -> bool:
    """Whether ``module`` holds a lumos gate."""
    from ..gates import HardConcreteGate

    return any(isinstance(m, HardConcreteGate) for m in module.modules())
