"""KV mode "static" (alias "prefixquant"): PrefixQuant's ``[16-bit prefix | quantized body]``, every token after
the prefix quantized symmetrically with a calibrated per-KV-head scale (one for K, one for V, per layer), 4 or 8
bits. The only mode with a fused decode attention (``decode_attention``: the packed K/V read in place)."""
from __future__ import annotations

import torch

from ...ops import kv as kv_ops
from ..base import PrefixedLayer, Rows, fail, head_scales, nbytes, per_layer
from ..registry import register_kv_mode


@register_kv_mode("static", bits=(4, 8), options=("key_scales", "value_scales"), aliases=("prefixquant",))
class StaticQuantLayer(PrefixedLayer):
    """PrefixQuant: [prefix | 4- or 8-bit body], static per-head scales for K and V (float [H_kv] each, > 0)."""

    def __init__(self, key_scale: torch.Tensor, value_scale: torch.Tensor, prefix_keys=None, prefix_values=None,
                 bits: int | None = None, backend="auto"):
        super().__init__(prefix_keys, prefix_values, backend, bits)
        self.key_scale, self.value_scale = head_scales(key_scale, "key_scale"), head_scales(value_scale, "value_scale")

    @classmethod
    def for_layers(cls, num_layers, prefix_keys, prefix_values, *, backend, bits=None, key_scales=None,
                   value_scales=None):
        if key_scales is None or value_scales is None:
            fail("mode='prefixquant' ('static') needs key_scales and value_scales (one [H_kv] tensor per layer)")
        ks = per_layer(key_scales, num_layers, "key_scales")
        vs = per_layer(value_scales, num_layers, "value_scales")
        return [cls(head_scales(ks[i], f"key_scales[{i}]"), head_scales(vs[i], f"value_scales[{i}]"),
                    prefix_keys[i], prefix_values[i], bits=bits, backend=backend) for i in range(num_layers)]

    def init_stores(self):
        self.k, self.v = Rows(), Rows()

    def crop_stores(self, m):
        self.k.truncate(m)
        self.v.truncate(m)

    def lazy_initialization(self, key_states, value_states):
        super().lazy_initialization(key_states, value_states)
        h = key_states.shape[1]
        for name, s in (("key_scales", self.key_scale), ("value_scales", self.value_scale)):
            if s.numel() != h or s.device != key_states.device:
                fail(f"each of {name} must have shape ({h},) (one scale per KV head) on {key_states.device}, "
                     f"got {tuple(s.shape)} on {s.device}")

    def append(self, key_states, value_states):
        self.k.append(kv_ops.kv_quantize(key_states, self.key_scale, self.bits, backend=self.backend))
        self.v.append(kv_ops.kv_quantize(value_states, self.value_scale, self.bits, backend=self.backend))

    def keys_values(self, dtype):
        return tuple(kv_ops.kv_dequant_concat(pre, rows.view(), scale, self.bits, dtype, backend=self.backend)
                     for pre, rows, scale in ((self.prefix_keys, self.k, self.key_scale),
                                              (self.prefix_values, self.v, self.value_scale)))

    has_decode_attention = True

    def decode_attention(self, query: torch.Tensor, scaling: float) -> torch.Tensor:
        """query float [B, H_q, 1, D] (after RoPE) -> query.dtype [B, H_q, 1, D]: softmax(q K^T scaling) V over
        the whole cache, K/V read in their stored form (kv_decode_attention: the C++ kernel on CPU, Triton on
        CUDA) instead of dequantized into a float copy first."""
        out = kv_ops.kv_decode_attention(query[:, :, 0], self.prefix_keys, self.prefix_values, self.k.view(),
                                         self.v.view(), self.key_scale, self.value_scale, self.bits, scaling,
                                         backend=self.backend)
        return out.unsqueeze(2)

    def body_bytes(self):
        return {"body": self.k.nbytes() + self.v.nbytes(),
                "scales": nbytes(self.key_scale) + nbytes(self.value_scale)}
