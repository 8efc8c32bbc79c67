"""The KV cache a quantized model runs with: pqk.PrefixQuantCache in the mode of its QuantConfig.

* "static": PrefixQuant, static per-head scales (4 or 8 bits) after a 16-bit prefix.
* "dynamic": the QuaRot-style baseline: every token quantized with its own per-head asymmetric scale
  (one group = one head's head_dim channels), kept in 16 bits after a fake-quant round trip. This layer lives here
  (not in the cache package) because it is an accuracy baseline only: it saves no memory.
* "kivi" / "logquant" / "fp16": PrefixQuantCache's own modes.

With ``key_rotation`` (QuantConfig.kv_rotate, models/qk_rotation.py) every mode first rotates the new keys per head,
``K H``, so it quantizes and returns keys in the rotated space; the model then rotates its queries to match.
"""
from __future__ import annotations

import functools

import torch

from .. import format as fmt
from .. import kv_format as kvf
from ..cache import PrefixQuantCache
from ..cache.prefix_quant_cache import Fp16Layer
from .qk_rotation import rotate_heads


def _fake_quant_per_token(x: torch.Tensor, bits: int) -> torch.Tensor:
    """x [B, H, T, D] -> quantized and dequantized per (token, head), in x's dtype."""
    if bits == 8:  # symmetric per (token, head)
        s = fmt.per_token_scale(x, bits).unsqueeze(-1)
        return (fmt.quantize(x, s, bits).float() * s).to(x.dtype)
    d = x.shape[-1]
    q, s, z = kvf.quantize_groupwise(x, bits, d, "token")
    return kvf.dequantize_groupwise(q, s, z, bits, d, "token").to(x.dtype)


class KeyRotatingCache(PrefixQuantCache):
    """A PrefixQuantCache that rotates the new keys, ``K @ key_rotation`` per head, before its layer quantizes them
    (the online Hadamard on K after RoPE). key_rotation: float32 [D, D] orthogonal; the prefix keys given to it
    must already be rotated. The patched model forward reads ``key_rotation`` and rotates the queries to match."""

    def __init__(self, *args, key_rotation: torch.Tensor, **kwargs):
        super().__init__(*args, **kwargs)
        self.key_rotation = key_rotation

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        return super().update(rotate_heads(key_states, self.key_rotation), value_states, layer_idx, *args, **kwargs)


def build_cache(num_layers: int, mode: str, bits: int, *, prefix_keys=None, prefix_values=None, key_scales=None,
                value_scales=None, key_rotation: torch.Tensor | None = None, window: int = 32,
                backend: str = "auto"):
    """A fresh cache for one forward / generate call (the prefix tensors are shared, never copied).
    key_rotation: float32 [D, D] or None (a KeyRotatingCache: keys rotated before they are stored).
    window: LogQuant's W (mode "logquant" only)."""
    if key_rotation is None:
        new_cache = PrefixQuantCache
    else:
        new_cache = functools.partial(KeyRotatingCache, key_rotation=key_rotation)
    if mode == "static":
        cache = new_cache(num_layers, "prefixquant", key_scales=key_scales, value_scales=value_scales,
                          prefix_keys=prefix_keys, prefix_values=prefix_values, backend=backend)
        for layer in cache.layers:  # PrefixQuantCache builds 4-bit layers; StaticQuantLayer takes bits 4 or 8
            layer.bits = bits
        return cache
    if mode in ("kivi", "logquant"):
        extra = {"window": window} if mode == "logquant" else {}
        cache = new_cache(num_layers, mode, prefix_keys=prefix_keys, prefix_values=prefix_values, backend=backend,
                          **extra)
        for layer in cache.layers:
            layer.k.bits = layer.v.bits = bits
        return cache
    cache = new_cache(num_layers, "fp16", prefix_keys=prefix_keys, prefix_values=prefix_values, backend=backend)
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
