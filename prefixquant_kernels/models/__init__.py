"""Quantized Hugging Face models: the model layout per family (arch.py: ArchSpec, REGISTRY keyed by model_type),
the module swap and patched forward / generate (patch.py), the pqk attention (attention.py) and the state a
quantized model carries (state.py: prefix K/V, KV scales; its cache is built by cache/factory.py). Needs transformers."""
from .arch import REGISTRY, ArchSpec, get_spec  # noqa: F401
from .patch import patch_class, patch_instance, swap  # noqa: F401
from .state import PrefixQuantState  # noqa: F401
