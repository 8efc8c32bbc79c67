"""nn.Module replacements built on the op layer."""
from .quant_linear import QuantLinear, quantize_weight

__all__ = ["QuantLinear", "quantize_weight"]
