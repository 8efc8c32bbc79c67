"""nn.Module replacements built on the op layer."""
from .quant_linear import QuantLinear, quantize_weight
from .quant_mlp import QuantGatedMLP

__all__ = ["QuantGatedMLP", "QuantLinear", "quantize_weight"]
