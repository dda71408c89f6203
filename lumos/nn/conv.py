"""Gated convolutions: torch's Conv1d/2d/3d and ConvTranspose2d/3d with L0 gates on their channels."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..gates import HardConcreteGate, fold_gate_scales_


def _channel_view(m: torch.Tensor, ndim: int, dim: int, dtype: torch.dtype) -> torch.Tensor:
    """``m`` (n,) reshaped to broadcast along ``dim`` of an ``ndim``-dim tensor."""
    return m.to(dtype).reshape([-1 if d == dim else 1 for d in range(ndim)])


class _GatedConvNd:
    r"""What every gated convolution shares (mixed in before a torch conv class).

    The layer keeps the torch class's parameters (``weight``, ``bias``), their initialisation
    and its arguments (stride, padding, dilation, groups, padding_mode...); it adds
    ``out_gate`` (one gate per output channel) and, with ``gate_in=True``, ``in_gate`` (one
    gate per input channel). Subclasses say where the output channels sit in ``weight``.
    """

    _plain: type  # the torch layer this one gates

    def _add_gates(self, gate_in: bool, gate_out: bool, device, gate_kwargs: dict) -> None:
        self.in_gate = HardConcreteGate(self.in_channels, device=device, **gate_kwargs) if gate_in else None
        self.out_gate = HardConcreteGate(self.out_channels, device=device, **gate_kwargs) \
            if gate_out else None

    def reset_parameters(self) -> None:
        """torch's initialisation of the weights; gates are reset to their initial logits."""
        super().reset_parameters()
        for name in ("in_gate", "out_gate"):
            gate = self._modules.get(name)  # absent while torch's __init__ runs
            if gate is not None:
                gate.reset_parameters()

    @classmethod
    def from_conv(cls, conv: nn.Module, **kwargs):
        """A gated copy of ``conv`` (an instance of ``cls``'s torch layer) holding the same
        weights (copied, not shared). ``kwargs``: ``gate_in``, ``gate_out`` and gate arguments."""
        if type(conv) is not cls._plain:
            raise TypeError(
                f"{cls.__name__}.from_conv: expected a {cls._plain.__name__}, got {type(conv).__name__}")
        layer = cls(**cls._constructor_args(conv), device=conv.weight.device, dtype=conv.weight.dtype,
                    **kwargs)
        with torch.no_grad():
            layer.weight.copy_(conv.weight)
            if conv.bias is not None:
                layer.bias.copy_(conv.bias)
        return layer

    @staticmethod
    def _constructor_args(conv: nn.Module) -> dict:
        return dict(in_channels=conv.in_channels, out_channels=conv.out_channels,
                    kernel_size=conv.kernel_size, stride=conv.stride, padding=conv.padding,
                    dilation=conv.dilation, groups=conv.groups, bias=conv.bias is not None,
                    padding_mode=conv.padding_mode)

    def _masked_weight(self, m_out: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def _in_channel_dim(self) -> int | None:  # pragma: no cover - abstract
        raise NotImplementedError

    @torch.no_grad()
    def fold_lock_scales_(self) -> None:
        """Move the output gate's ``lock_scale`` into the weight and bias, and the input gate's
        into the weight where each input channel has its own slice of it; set those scales to 1.
        The layer computes the same; a channel held at a scale below 1 learns at full speed again."""
        fold_gate_scales_(self, self._masked_weight, self._in_channel_dim())

    def _gated_input_weight_bias(self, x: torch.Tensor):
        """``(x * m_in, weight * m_out, bias * m_out)`` with this step's masks."""
        channel_dim = x.dim() - self._spatial - 1  # 1 when batched, 0 when not (as torch allows)
        if channel_dim not in (0, 1) or x.shape[channel_dim] != self.in_channels:
            raise ValueError(
                f"{type(self).__name__}: input must have shape ([N,] {self.in_channels}, "
                f"{', '.join('*' * self._spatial)}), got {tuple(x.shape)}"
            )
        if self.in_gate is not None:
            x = x * _channel_view(self.in_gate(), x.dim(), channel_dim, x.dtype)
        if self.out_gate is None:
            return x, self.weight, self.bias
        m_out = self.out_gate()
        bias = self.bias * m_out.to(self.bias.dtype) if self.bias is not None else None
        return x, self._masked_weight(m_out), bias

    def extra_repr(self) -> str:
        text = super().extra_repr()
        if self.in_gate is not None:
            text += f", kept_in={int(self.in_gate.kept().sum())}/{self.in_channels}"
        if self.out_gate is not None:
            text += f", kept_out={int(self.out_gate.kept().sum())}/{self.out_channels}"
        return text


class _GatedConv(_GatedConvNd):
    """Forward of a gated ``Conv{1,2,3}d``: ``weight`` is ``(C_out, C_in / groups, *kernel)``."""

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0, dilation=1,
                 groups=1, bias=True, padding_mode="zeros", *, gate_in: bool = False,
                 gate_out: bool = True, device=None, dtype=None, **gate_kwargs):
        super().__init__(in_channels, out_channels, kernel_size, stride, padding, dilation, groups,
                         bias, padding_mode, device=device, dtype=dtype)
        self._add_gates(gate_in, gate_out, device, gate_kwargs)

    def _masked_weight(self, m_out):
        return self.weight * _channel_view(m_out, self.weight.dim(), 0, self.weight.dtype)

    def _in_channel_dim(self):
        return 1 if self.groups == 1 else None  # grouped: an input channel's weights are not one slice

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x, weight, bias = self._gated_input_weight_bias(x)
        return self._conv_forward(x, weight, bias)


class _GatedConvTranspose(_GatedConvNd):
    """Forward of a gated ``ConvTranspose{2,3}d``: ``weight`` is ``(C_in, C_out / groups, *kernel)``."""

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0, output_padding=0,
                 groups=1, bias=True, dilation=1, padding_mode="zeros", *, gate_in: bool = False,
                 gate_out: bool = True, device=None, dtype=None, **gate_kwargs):
        super().__init__(in_channels, out_channels, kernel_size, stride, padding, output_padding,
                         groups, bias, dilation, padding_mode, device=device, dtype=dtype)
        self._add_gates(gate_in, gate_out, device, gate_kwargs)

    @staticmethod
    def _constructor_args(conv):
        return dict(_GatedConvNd._constructor_args(conv), output_padding=conv.output_padding)

    def _in_channel_dim(self):
        return 0  # weight (C_in, C_out / groups, *kernel): input channel c is row c

    def _masked_weight(self, m_out):
        # output channel o = g * (C_out / groups) + j sits at weight[g * (C_in / groups) + i, j]
        g, w = self.groups, self.weight
        grouped = w.reshape(g, w.shape[0] // g, *w.shape[1:])
        mask = m_out.to(w.dtype).reshape(g, 1, w.shape[1], *([1] * (w.dim() - 2)))
        return (grouped * mask).reshape(w.shape)

    def forward(self, x: torch.Tensor, output_size: list[int] | None = None) -> torch.Tensor:
        x, weight, bias = self._gated_input_weight_bias(x)
        output_padding = self._output_padding(x, output_size, self.stride, self.padding,
                                              self.kernel_size, self._spatial, self.dilation)
        return self._conv_fn(x, weight, bias, self.stride, self.padding, output_padding,
                             self.groups, self.dilation)


_DOC = r"""``nn.{plain}`` whose output channels (and optionally input channels) carry L0 gates.

    .. math::
        y = \mathrm{{{op}}}(x \odot m_{{in}},\; W \odot m_{{out}},\; b \odot m_{{out}})

    ``m_out`` (one gate per output channel, broadcast over the kernel) prunes channels;
    ``m_in`` (one gate per input channel, broadcast over the spatial positions) prunes input
    channels, e.g. on a model's first layer (:class:`lumos.nn.FeatureGate` with ``dim=1`` does
    the same in front of any layer). Parameters ``weight`` and ``bias`` have the names, shapes
    and initialisation of ``nn.{plain}``, and every argument of ``nn.{plain}`` is accepted.

    Args:
        (as ``nn.{plain}``) in_channels, out_channels, kernel_size, stride, padding, ...
        gate_in: gate the input channels (default False).
        gate_out: gate the output channels (default True).
        **gate_kwargs: passed to each :class:`lumos.gates.HardConcreteGate`.

    Shapes:
        input ``(N, C_in, {spatial_in})``, output ``(N, C_out, {spatial_out})`` as ``nn.{plain}``.
    """


def _doc(plain: str, op: str, n: int) -> str:
    names = ["L", "H, W", "D, H, W"][n - 1]
    outs = ["L_out", "H_out, W_out", "D_out, H_out, W_out"][n - 1]
    return _DOC.format(plain=plain, op=op, spatial_in=names, spatial_out=outs)


class GatedConv1d(_GatedConv, nn.Conv1d):
    __doc__ = _doc("Conv1d", "conv1d", 1)
    _plain, _spatial = nn.Conv1d, 1


class GatedConv2d(_GatedConv, nn.Conv2d):
    __doc__ = _doc("Conv2d", "conv2d", 2)
    _plain, _spatial = nn.Conv2d, 2


class GatedConv3d(_GatedConv, nn.Conv3d):
    __doc__ = _doc("Conv3d", "conv3d", 3)
    _plain, _spatial = nn.Conv3d, 3


class GatedConvTranspose2d(_GatedConvTranspose, nn.ConvTranspose2d):
    __doc__ = _doc("ConvTranspose2d", "conv\\_transpose2d", 2)
    _plain, _spatial = nn.ConvTranspose2d, 2
    _conv_fn = staticmethod(F.conv_transpose2d)


class GatedConvTranspose3d(_GatedConvTranspose, nn.ConvTranspose3d):
    __doc__ = _doc("ConvTranspose3d", "conv\\_transpose3d", 3)
    _plain, _spatial = nn.ConvTranspose3d, 3
    _conv_fn = staticmethod(F.conv_transpose3d)


GATED_CONVS = (GatedConv1d, GatedConv2d, GatedConv3d, GatedConvTranspose2d, GatedConvTranspose3d)
