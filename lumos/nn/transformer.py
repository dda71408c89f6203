"""Traceable twins of torch's Transformer layers, so that lumos can gate what is inside them.

``torch.fx`` keeps every ``torch.nn`` module whole, and the forwards of
``nn.TransformerEncoderLayer`` & co. could not be traced anyway: they branch on mask dtypes,
on the fast-path conditions and on mask *values* (causal-mask detection). The twins here are
subclasses of the torch classes with the same constructor, submodules, attributes and
``state_dict``; only ``forward`` is rewritten, as the ops torch's reference (non-fast) path
computes: attention module calls, ``nn.Linear``, the activation, dropout, ``nn.LayerNorm`` and
residual adds. Inside :func:`lumos.gate` the attention layers then become
:class:`~lumos.nn.GatedMultiheadAttention` (heads and head dimensions) and ``linear1`` a
:class:`~lumos.nn.GatedLinear` (the feed-forward width).

Differences from torch's forward, all outside what torch specifies:
- masks go to the attention modules as given (torch converts them to float first; the
  attention module applies the same conversion, with the same result);
- no fast path: on CPU in eval mode under ``no_grad`` torch runs fused kernels, whose results
  agree to float rounding; with a key padding mask torch's ``TransformerEncoder`` fast path
  returns zeros at padded positions, the twin returns what the reference path computes there;
- ``is_causal=None`` is read as False (torch inspects the mask's values to decide; the hint
  only selects a kernel, the mask is applied either way);
- the input checks of ``nn.Transformer.forward`` run on tensors, not while tracing.
"""
from __future__ import annotations

import copy

import torch
from torch import fx, nn


def _to_twins_(module: nn.Module) -> nn.Module:
    """``module`` and every torch Transformer module inside it turned, in place, into twins."""
    for sub in module.modules():
        twin = TWINS.get(type(sub))
        if twin is not None:
            sub.__class__ = twin  # same attributes and submodules: only forward changes
    return module


def _is(module: nn.Module, torch_type: type) -> bool:
    """Whether ``module`` is a ``torch_type`` or its twin (not some other subclass)."""
    return type(module) in (torch_type, TWINS[torch_type])


def twin_blocker(module: nn.Module) -> str | None:
    """Why the torch Transformer ``module`` cannot become a twin, or None if it can: a stack whose
    layers, or an ``nn.Transformer`` whose encoder or decoder, are of another class (a subclass,
    a custom layer): the twin would have to trace their forward, which lumos does not know."""
    for stack, layer_type in ((nn.TransformerEncoder, nn.TransformerEncoderLayer),
                              (nn.TransformerDecoder, nn.TransformerDecoderLayer)):
        if _is(module, stack):
            odd = [type(layer).__name__ for layer in module.layers if not _is(layer, layer_type)]
            return f"its layers include a {odd[0]}, not an nn.{layer_type.__name__}" if odd else None
    if _is(module, nn.Transformer):
        for name, stack in (("encoder", nn.TransformerEncoder), ("decoder", nn.TransformerDecoder)):
            part = getattr(module, name)
            why = twin_blocker(part) if _is(part, stack) else f"a {type(part).__name__}, not an nn.{stack.__name__}"
            if why is not None:
                return f"its {name}: {why}"
    return None


def _from_torch(cls, layer: nn.Module) -> nn.Module:
    """A twin of ``layer`` (a deep copy: the argument is not changed)."""
    torch_type = next(torch_type for torch_type, twin in TWINS.items() if twin is cls)
    if type(layer) is not torch_type:
        raise TypeError(f"lumos.nn.{cls.__name__}.from_torch: `layer` must be a {torch_type.__module__}."
                        f"{torch_type.__name__}, got {type(layer).__name__}")
    why = twin_blocker(layer)
    if why is not None:
        raise TypeError(f"lumos.nn.{cls.__name__}.from_torch: cannot convert this {torch_type.__name__}: {why}")
    return _to_twins_(copy.deepcopy(layer))


def _hint(is_causal):
    """torch's stacks read ``is_causal=None`` from the mask's values; the twins read it as False."""
    return False if is_causal is None else is_causal


def _is_traced(*tensors) -> bool:
    return any(isinstance(t, fx.Proxy) for t in tensors)


class TransformerEncoderLayer(nn.TransformerEncoderLayer):
    r"""``nn.TransformerEncoderLayer`` with a forward that ``torch.fx`` can trace (module docstring).

    .. math::
        \text{post-norm: } x = \mathrm{LN}_1(x + \mathrm{SA}(x)),\; x = \mathrm{LN}_2(x + \mathrm{FF}(x));
        \quad \text{pre-norm: } x = x + \mathrm{SA}(\mathrm{LN}_1(x)),\; x = x + \mathrm{FF}(\mathrm{LN}_2(x))

    with ``FF(x) = dropout2(linear2(dropout(activation(linear1(x)))))`` and ``SA`` the self-attention
    followed by ``dropout1``. Same arguments as torch's layer; :meth:`from_torch` converts one.

    Shapes:
        src ``(N, S, d_model)`` if ``batch_first`` else ``(S, N, d_model)``, or ``(S, d_model)``;
        src_mask ``(S, S)`` or ``(N * nhead, S, S)``; src_key_padding_mask ``(N, S)``; output as src.
    """

    lumos_trace_through = True  # lumos.compact traces the attention and linear layers inside

    @classmethod
    def from_torch(cls, layer: nn.TransformerEncoderLayer) -> "TransformerEncoderLayer":
        """The twin of ``layer``: a copy with the same weights, hooks and submodules."""
        return _from_torch(cls, layer)

    def forward(self, src: torch.Tensor, src_mask: torch.Tensor | None = None,
                src_key_padding_mask: torch.Tensor | None = None, is_causal: bool = False) -> torch.Tensor:
        x = src
        if self.norm_first:
            x = x + self._self_attention(self.norm1(x), src_mask, src_key_padding_mask, is_causal)
            return x + self._feed_forward(self.norm2(x))
        x = self.norm1(x + self._self_attention(x, src_mask, src_key_padding_mask, is_causal))
        return self.norm2(x + self._feed_forward(x))

    def _self_attention(self, x, attn_mask, key_padding_mask, is_causal):
        x = self.self_attn(x, x, x, attn_mask=attn_mask, key_padding_mask=key_padding_mask, need_weights=False,
                           is_causal=is_causal)[0]
        return self.dropout1(x)

    def _feed_forward(self, x):
        return self.dropout2(self.linear2(self.dropout(self.activation(self.linear1(x)))))


class TransformerDecoderLayer(nn.TransformerDecoderLayer):
    r"""``nn.TransformerDecoderLayer`` with a forward that ``torch.fx`` can trace (module docstring).

    Self-attention over the target, cross-attention to ``memory``, feed-forward; each with a
    residual add and a LayerNorm after (``norm_first=False``) or before it (``norm_first=True``).
    Same arguments as torch's layer; :meth:`from_torch` converts one.

    Shapes:
        tgt ``(N, T, d_model)`` if ``batch_first`` else ``(T, N, d_model)``, or ``(T, d_model)``;
        memory ``(N, S, d_model)`` likewise; tgt_mask ``(T, T)``; memory_mask ``(T, S)``; key padding
        masks ``(N, T)`` and ``(N, S)``; output as tgt.
    """

    lumos_trace_through = True

    @classmethod
    def from_torch(cls, layer: nn.TransformerDecoderLayer) -> "TransformerDecoderLayer":
        """The twin of ``layer``: a copy with the same weights, hooks and submodules."""
        return _from_torch(cls, layer)

    def forward(self, tgt: torch.Tensor, memory: torch.Tensor, tgt_mask: torch.Tensor | None = None,
                memory_mask: torch.Tensor | None = None, tgt_key_padding_mask: torch.Tensor | None = None,
                memory_key_padding_mask: torch.Tensor | None = None, tgt_is_causal: bool = False,
                memory_is_causal: bool = False) -> torch.Tensor:
        x = tgt
        if self.norm_first:
            x = x + self._self_attention(self.norm1(x), tgt_mask, tgt_key_padding_mask, tgt_is_causal)
            x = x + self._cross_attention(self.norm2(x), memory, memory_mask, memory_key_padding_mask,
                                          memory_is_causal)
            return x + self._feed_forward(self.norm3(x))
        x = self.norm1(x + self._self_attention(x, tgt_mask, tgt_key_padding_mask, tgt_is_causal))
        x = self.norm2(x + self._cross_attention(x, memory, memory_mask, memory_key_padding_mask, memory_is_causal))
        return self.norm3(x + self._feed_forward(x))

    def _self_attention(self, x, attn_mask, key_padding_mask, is_causal):
        x = self.self_attn(x, x, x, attn_mask=attn_mask, key_padding_mask=key_padding_mask, is_causal=is_causal,
                           need_weights=False)[0]
        return self.dropout1(x)

    def _cross_attention(self, x, memory, attn_mask, key_padding_mask, is_causal):
        x = self.multihead_attn(x, memory, memory, attn_mask=attn_mask, key_padding_mask=key_padding_mask,
                                is_causal=is_causal, need_weights=False)[0]
        return self.dropout2(x)

    def _feed_forward(self, x):
        return self.dropout3(self.linear2(self.dropout(self.activation(self.linear1(x)))))


class TransformerEncoder(nn.TransformerEncoder):
    """``nn.TransformerEncoder`` run layer by layer, then its ``norm`` (if any); traceable.

    Same arguments as torch's stack; :meth:`from_torch` converts one with its layers. Shapes as
    :class:`TransformerEncoderLayer` (``mask`` is the layers' ``src_mask``).
    """

    lumos_trace_through = True

    @classmethod
    def from_torch(cls, encoder: nn.TransformerEncoder) -> "TransformerEncoder":
        """The twin of ``encoder`` (its layers become :class:`TransformerEncoderLayer` twins)."""
        return _from_torch(cls, encoder)

    def forward(self, src: torch.Tensor, mask: torch.Tensor | None = None,
                src_key_padding_mask: torch.Tensor | None = None, is_causal: bool | None = None) -> torch.Tensor:
        output = src
        for layer in self.layers:
            output = layer(output, src_mask=mask, src_key_padding_mask=src_key_padding_mask, is_causal=_hint(is_causal))
        if self.norm is not None:
            output = self.norm(output)
        return output


class TransformerDecoder(nn.TransformerDecoder):
    """``nn.TransformerDecoder`` run layer by layer, then its ``norm`` (if any); traceable.

    Same arguments as torch's stack; :meth:`from_torch` converts one with its layers. Shapes as
    :class:`TransformerDecoderLayer`.
    """

    lumos_trace_through = True

    @classmethod
    def from_torch(cls, decoder: nn.TransformerDecoder) -> "TransformerDecoder":
        """The twin of ``decoder`` (its layers become :class:`TransformerDecoderLayer` twins)."""
        return _from_torch(cls, decoder)

    def forward(self, tgt: torch.Tensor, memory: torch.Tensor, tgt_mask: torch.Tensor | None = None,
                memory_mask: torch.Tensor | None = None, tgt_key_padding_mask: torch.Tensor | None = None,
                memory_key_padding_mask: torch.Tensor | None = None, tgt_is_causal: bool | None = None,
                memory_is_causal: bool = False) -> torch.Tensor:
        output = tgt
        for layer in self.layers:
            output = layer(output, memory, tgt_mask=tgt_mask, memory_mask=memory_mask,
                           tgt_key_padding_mask=tgt_key_padding_mask,
                           memory_key_padding_mask=memory_key_padding_mask, tgt_is_causal=_hint(tgt_is_causal),
                           memory_is_causal=memory_is_causal)
        if self.norm is not None:
            output = self.norm(output)
        return output


class Transformer(nn.Transformer):
    """``nn.Transformer``: encoder then decoder; traceable. Same arguments, attributes
    (``generate_square_subsequent_mask``) and ``state_dict`` as torch's; :meth:`from_torch`
    converts one with its stacks and layers.

    Shapes: src ``(N, S, d_model)``, tgt ``(N, T, d_model)`` if ``batch_first`` (else sequence
    first); output as tgt.
    """

    lumos_trace_through = True

    @classmethod
    def from_torch(cls, transformer: nn.Transformer) -> "Transformer":
        """The twin of ``transformer`` (its encoder, decoder and their layers become twins)."""
        return _from_torch(cls, transformer)

    def forward(self, src: torch.Tensor, tgt: torch.Tensor, src_mask: torch.Tensor | None = None,
                tgt_mask: torch.Tensor | None = None, memory_mask: torch.Tensor | None = None,
                src_key_padding_mask: torch.Tensor | None = None, tgt_key_padding_mask: torch.Tensor | None = None,
                memory_key_padding_mask: torch.Tensor | None = None, src_is_causal: bool | None = None,
                tgt_is_causal: bool | None = None, memory_is_causal: bool = False) -> torch.Tensor:
        if not _is_traced(src, tgt):
            self._check(src, tgt)
        memory = self.encoder(src, mask=src_mask, src_key_padding_mask=src_key_padding_mask, is_causal=src_is_causal)
        return self.decoder(tgt, memory, tgt_mask=tgt_mask, memory_mask=memory_mask,
                            tgt_key_padding_mask=tgt_key_padding_mask,
                            memory_key_padding_mask=memory_key_padding_mask, tgt_is_causal=tgt_is_causal,
                            memory_is_causal=memory_is_causal)

    def _check(self, src: torch.Tensor, tgt: torch.Tensor) -> None:
        batch = 0 if self.batch_first else 1
        if src.dim() == 3 and src.size(batch) != tgt.size(batch):
            raise RuntimeError(f"lumos.nn.Transformer: the batch number of src and tgt must be equal, got "
                               f"{tuple(src.shape)} and {tuple(tgt.shape)} (batch_first={self.batch_first})")
        if src.size(-1) != self.d_model or tgt.size(-1) != self.d_model:
            raise RuntimeError(f"lumos.nn.Transformer: the feature number of src and tgt must be equal to d_model="
                               f"{self.d_model}, got {tuple(src.shape)} and {tuple(tgt.shape)}")


# torch class -> twin (the classes above), for lumos.gate and from_torch
TWINS: dict[type, type] = {
    nn.TransformerEncoderLayer: TransformerEncoderLayer,
    nn.TransformerDecoderLayer: TransformerDecoderLayer,
    nn.TransformerEncoder: TransformerEncoder,
    nn.TransformerDecoder: TransformerDecoder,
    nn.Transformer: Transformer,
}
