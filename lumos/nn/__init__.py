"""Gated layers: drop-in replacements of torch layers that carry L0 gates."""
from .feature_gate import FeatureGate
from .linear import GatedLinear

__all__ = ["FeatureGate", "GatedLinear"]
