"""Quantized Hugging Face models: the model layout per family (arch.py: ArchSpec, REGISTRY keyed by model_type),
the module swap (patch.py), the state a quantized model carries (state.py: prefix K/V, KV scales) and the KV cache
it runs with (kv_cache.py). Needs transformers."""
from .arch import REGISTRY, ArchSpec, get_spec  # noqa: F401
from .patch import patch_class, patch_instance, swap  # noqa: F401
from .state import PrefixQuantState  # noqa: F401
