"""The KV cache a quantized model runs with: pqk.PrefixQuantCache in the mode of its QuantConfig.

* "static": PrefixQuant, static per-head scales (4 or 8 bits) after a 16-bit prefix.
* "dynamic": the QuaRot-style baseline: every token quantized with its own per-head asymmetric scale
  (one group = one head's head_dim channels), kept in 16 bits after a fake-quant round trip. This layer lives here
  (not in the cache package) because it is an accuracy baseline only: it saves no memory.
* "kivi" / "logquant" / "fp16": PrefixQuantCache's own modes.
"""
from __future__ import annotations

import torch

from .. import format as fmt
from .. import kv_format as kvf
from ..cache import PrefixQuantCache
from ..cache.prefix_quant_cache import Fp16Layer


def _fake_quant_per_token(x: torch.Tensor, bits: int) -> torch.Tensor:
    """x [B, H, T, D] -> quantized and dequantized per (token, head), in x's dtype."""
    if bits == 8:  # symmetric per (token, head)
        s = fmt.per_token_scale(x, bits).unsqueeze(-1)
        return (fmt.quantize(x, s, bits).float() * s).to(x.dtype)
    d = x.shape[-1]
    q, s, z = kvf.quantize_groupwise(x, bits, d, "token")
    return kvf.dequantize_groupwise(q, s, z, bits, d, "token").to(x.dtype)


def build_cache(num_layers: int, mode: str, bits: int, *, prefix_keys=None, prefix_values=None, key_scales=None,
                value_scales=None, backend: str = "auto"):
    """A fresh cache for one forward / generate call (the prefix tensors are shared, never copied)."""
    if mode == "static":
        cache = PrefixQuantCache(num_layers, "prefixquant", key_scales=key_scales, value_scales=value_scales,
                                 prefix_keys=prefix_keys, prefix_values=prefix_values, backend=backend)
        for layer in cache.layers:  # PrefixQuantCache builds 4-bit layers; StaticQuantLayer takes bits 4 or 8
            layer.bits = bits
        return cache
    if mode in ("kivi", "logquant"):
        cache = PrefixQuantCache(num_layers, mode, prefix_keys=prefix_keys, prefix_values=prefix_values,
                                 backend=backend)
        for layer in cache.layers:
            layer.k.bits = layer.v.bits = bits
        return cache
    cache = PrefixQuantCache(num_layers, "fp16", prefix_keys=prefix_keys, prefix_values=prefix_values,
                             backend=backend)
    if mode == "dynamic":
        cache.layers = [_DynamicTokenLayer(layer.prefix_keys, layer.prefix_values, bits, backend)
                        for layer in cache.layers]
    return cache


class _DynamicTokenLayer(Fp16Layer):
    """Per-token per-head dynamic KV quantization (the QuaRot-style baseline), fake-quantized."""

    def __init__(self, prefix_keys, prefix_values, bits: int, backend: str):
        super().__init__(prefix_keys, prefix_values, backend)
        self.bits = bits

    def append(self, key_states, value_states):
        super().append(_fake_quant_per_token(key_states, self.bits), _fake_quant_per_token(value_states, self.bits))
