"""The quantized KV cache for transformers v5: PrefixQuantCache and its modes, one file each in modes/, looked up by
name in registry.py (static, alias prefixquant; dynamic; kivi; logquant; fp16); factory.py's build_cache is what a
quantized model's state calls. docs/KV_CACHE.md describes the modes.

The registry imports neither torch nor transformers (QuantConfig validates its kv_mode with it); the cache classes
need transformers and are imported on first use.
"""
from .registry import KVMode, kv_mode, kv_mode_aliases, kv_modes, register_kv_mode, unregister_kv_mode

__all__ = ["MODES", "KVMode", "KeyRotatingCache", "PrefixQuantCache", "build_cache", "kv_mode", "kv_mode_aliases",
           "kv_modes", "register_kv_mode", "unregister_kv_mode"]


def __getattr__(name):
    if name == "PrefixQuantCache":
        from .prefix_quant_cache import PrefixQuantCache
        return PrefixQuantCache
    if name in ("build_cache", "KeyRotatingCache"):
        from . import factory
        return getattr(factory, name)
    if name == "MODES":   # the registered modes' canonical names (kv_modes(), read when asked)
        return kv_modes()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
