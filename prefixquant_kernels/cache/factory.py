"""The cache a quantized model runs with, by mode name: ``build_cache(num_layers, mode, bits, ...)`` -> a
PrefixQuantCache (or, with ``key_rotation``, a KeyRotatingCache: the keys rotated per head, ``K H``, before the
mode quantizes them; models/attention.py rotates the queries to match). Any registered mode (registry.py), with
the keyword arguments that mode takes.
"""
from __future__ import annotations

import torch

from .prefix_quant_cache import PrefixQuantCache


def rotate_heads(x: torch.Tensor, rotation: torch.Tensor) -> torch.Tensor:
    """x float [..., D] (e.g. [B, H, T, D]) -> ``x @ rotation`` (rotation float [D, D]), computed in fp32, in x's
    dtype (a 16-bit matmul would add its own rounding to every key before it is quantized)."""
    if x.shape[-1] != rotation.shape[0]:
        raise ValueError(f"pqk.rotate_heads: x has head_dim {x.shape[-1]}, the rotation is "
                         f"{tuple(rotation.shape)}")
    return (x.float() @ rotation.to(device=x.device, dtype=torch.float32)).to(x.dtype)


class KeyRotatingCache(PrefixQuantCache):
    """A PrefixQuantCache that rotates the new keys, ``K @ key_rotation`` per head, before its layer quantizes them
    (the online Hadamard on K after RoPE). key_rotation: float32 [D, D] orthogonal; the prefix keys given to it
    must already be rotated. The patched model forward reads ``key_rotation`` and rotates the queries to match."""

    def __init__(self, *args, key_rotation: torch.Tensor, **kwargs):
        super().__init__(*args, **kwargs)
        self.key_rotation = key_rotation

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        return super().update(rotate_heads(key_states, self.key_rotation), value_states, layer_idx, *args, **kwargs)


def build_cache(num_layers: int, mode: str, bits: int | None = None, *, key_rotation: torch.Tensor | None = None,
                backend: str = "auto", **options) -> PrefixQuantCache:
    """A fresh cache for one forward / generate call (the prefix tensors are shared, never copied).

    mode: a registered mode (QuantConfig.resolved_kv_mode); bits: one of its widths (None: its default);
    key_rotation: float32 [D, D] or None; options: PrefixQuantCache's keyword arguments (prefix_keys,
    prefix_values, and the mode's own: key_scales / value_scales, window, group_size, ...)."""
    if key_rotation is None:
        return PrefixQuantCache(num_layers, mode, bits=bits, backend=backend, **options)
    return KeyRotatingCache(num_layers, mode, bits=bits, backend=backend, key_rotation=key_rotation, **options)
