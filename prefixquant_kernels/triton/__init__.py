"""Triton kernels (GPU; also run on CPU tensors under TRITON_INTERPRET=1). Importing this package needs triton.

kv_cache.py: quantize-and-append and dequant-and-concat for the quantized KV cache.
"""
from .kv_cache import kv_dequant_concat, kv_quantize_groupwise, kv_quantize_static

__all__ = ["kv_dequant_concat", "kv_quantize_groupwise", "kv_quantize_static"]
