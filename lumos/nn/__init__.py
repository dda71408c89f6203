"""Gated layers: drop-in replacements of torch layers that carry L0 gates."""
from .conv import GatedConv1d, GatedConv2d, GatedConv3d, GatedConvTranspose2d, GatedConvTranspose3d
from .feature_gate import FeatureGate
from .linear import GatedLinear

__all__ = ["FeatureGate", "GatedLinear"]
__all__ += ["GatedConv1d", "GatedConv2d", "GatedConv3d", "GatedConvTranspose2d", "GatedConvTranspose3d"]
from .attention import GatedMultiheadAttention  # noqa: E402
from .gin import GatedGINConv, GatedGINEAggregation, GINConv, GINEAggregation, GlobalPool  # noqa: E402

__all__ += ["GatedMultiheadAttention", "GINConv", "GatedGINConv", "GINEAggregation", "GatedGINEAggregation",
            "GlobalPool"]
from .transformer import (Transformer, TransformerDecoder, TransformerDecoderLayer,  # noqa: E402
                          TransformerEncoder, TransformerEncoderLayer)

__all__ += ["Transformer", "TransformerDecoder", "TransformerDecoderLayer", "TransformerEncoder",
            "TransformerEncoderLayer"]
