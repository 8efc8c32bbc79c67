"""QuantConfig, re-exported: it lives in prefixquant_kernels/config.py (below models/ and calibration/, which both
use it). Every name this module exported before the move still imports from here."""
from ..config import (  # noqa: F401
    ACT_QUANT,
    AUTO_KV_MODE,
    CONFIG_VERSION,
    LINEAR_BITS,
    WEIGHT_METHODS,
    QuantConfig,
    _fail,
    kv_bits_choices,
    kv_modes,
)


def __getattr__(name):   # KV_MODES / KV_BITS: computed from the KV mode registry when read (config.py)
    if name in ("KV_MODES", "KV_BITS"):
        from .. import config
        return getattr(config, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
