"""Quantized Hugging Face models: the module swap (patch.py, keyed by model_type), the state a quantized model
carries (state.py: prefix K/V, KV scales) and the KV cache it runs with (kv_cache.py). Needs transformers."""
from .patch import REGISTRY, ArchSpec, get_spec, patch_class, patch_instance, swap  # noqa: F401
from .state import PrefixQuantState  # noqa: F401
