"""The quantized KV cache for transformers v5: PrefixQuantCache (modes prefixquant, kivi, logquant, fp16)."""
from .prefix_quant_cache import MODES, PrefixQuantCache

__all__ = ["MODES", "PrefixQuantCache"]
