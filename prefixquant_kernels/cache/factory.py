"""The cache a quantized model runs with, by mode name: ``build_cache(num_layers, mode, bits, ...)`` -> a
PrefixQuantCache (or, with ``key_rotation`` / ``key_offsets``, a KeyRotatingCache: the keys rotated per head,
``K H``, and / or centered, ``- mu``, before the mode quantizes them; models/attention.py rotates the queries to
match). Any registered mode (registry.py), with
the keyword arguments that mode takes.
"""
from __future__ import annotations

import torch

from .base import per_layer
from .prefix_quant_cache import PrefixQuantCache


def rotate_heads(x: torch.Tensor, rotation: torch.Tensor) -> torch.Tensor:
    """x float [..., D] (e.g. [B, H, T, D]) -> ``x @ rotation`` (rotation float [D, D]), computed in fp32, in x's
    dtype (a 16-bit matmul would add its own rounding to every key before it is quantized)."""
    if x.shape[-1] != rotation.shape[0]:
        raise ValueError(f"pqk.rotate_heads: x has head_dim {x.shape[-1]}, the rotation is "
                         f"{tuple(rotation.shape)}")
    return (x.float() @ rotation.to(device=x.device, dtype=torch.float32)).to(x.dtype)


def transform_keys(key_states: torch.Tensor, rotation: torch.Tensor | None, offset: torch.Tensor | None):
    """What KeyRotatingCache does to new keys before they are quantized: key_states [B, H_kv, T, D] ->
    ``key_states @ rotation`` (float [D, D], or None: not rotated) ``- offset`` (float [H_kv, D] per head, or None),
    in key_states' dtype."""
    if rotation is not None:
        key_states = rotate_heads(key_states, rotation)
    if offset is not None:                                   # [H_kv, D] -> [1, H_kv, 1, D]
        key_states = (key_states.float() - offset.to(key_states.device)[None, :, None]).to(key_states.dtype)
    return key_states


class KeyRotatingCache(PrefixQuantCache):
    """A PrefixQuantCache that transforms the new keys before its layer quantizes them: ``K @ key_rotation`` per
    head (the online Hadamard on K after RoPE; the patched model forward reads ``key_rotation`` and rotates the
    queries to match), then ``- key_offsets[layer]`` (QuantConfig.k_center: a static per-head offset, which leaves
    softmax(q K^T) unchanged, so the queries need nothing). key_rotation: float32 [D, D] orthogonal or None;
    key_offsets: per layer float32 [H_kv, D], or None. The prefix keys given to it must already be transformed."""

    def __init__(self, *args, key_rotation: torch.Tensor | None = None,
                 key_offsets: list[torch.Tensor] | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        if key_offsets is not None:
            key_offsets = per_layer(key_offsets, len(self.layers), "key_offsets")
            for i, mu in enumerate(key_offsets):
                if not isinstance(mu, torch.Tensor) or not mu.is_floating_point() or mu.dim() != 2:
                    raise ValueError(f"pqk.KeyRotatingCache: key_offsets[{i}] must be a float tensor [H_kv, D], got "
                                     f"{getattr(mu, 'shape', type(mu).__name__)}")
        self.key_rotation, self.key_offsets = key_rotation, key_offsets

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        key_states = transform_keys(key_states, self.key_rotation,
                                    None if self.key_offsets is None else self.key_offsets[layer_idx])
        return super().update(key_states, value_states, layer_idx, *args, **kwargs)


def build_cache(num_layers: int, mode: str, bits: int | None = None, *, key_rotation: torch.Tensor | None = None,
                key_offsets: list[torch.Tensor] | None = None, backend: str = "auto", **options) -> PrefixQuantCache:
    """A fresh cache for one forward / generate call (the prefix tensors are shared, never copied).

    mode: a registered mode (QuantConfig.resolved_kv_mode); bits: one of its widths (None: its default);
    key_rotation: float32 [D, D] or None; key_offsets: per layer float32 [H_kv, D] or None (KeyRotatingCache);
    options: PrefixQuantCache's keyword arguments (prefix_keys, prefix_values, and the mode's own: key_scales /
    value_scales, window, group_size, ...)."""
    if key_rotation is None and key_offsets is None:
        return PrefixQuantCache(num_layers, mode, bits=bits, backend=backend, **options)
    return KeyRotatingCache(num_layers, mode, bits=bits, backend=backend, key_rotation=key_rotation,
                            key_offsets=key_offsets, **options)
