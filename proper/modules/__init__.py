"""The model layer's modules: the two routers and ProperLinear (one adapted linear layer)."""
from .linear import ProperLinear, is_conv1d, linear_dims
from .routers import LoRAAwareRouter, UserAwareRouter, top_k_gates

__all__ = ["ProperLinear", "UserAwareRouter", "LoRAAwareRouter", "top_k_gates", "is_conv1d", "linear_dims"]
