"""KV mode "dynamic": the QuaRot-style baseline, every (token, KV head) vector of head_dim channels quantized at
append time with its own scale (no calibration), after an optional 16-bit prefix.

* 4 bits: asymmetric, one group = the head's D channels (kv_format's group-wise format, axis "token"), stored
  packed (kv_quantize_groupwise) and read back by kv_dequant_concat. A head_dim that is not a power of 2 (the
  packed kernels' group sizes) is held instead as 16-bit rows of the same dequantized values.
* 8 bits: symmetric per (token, head) (prefixquant_kernels/format.py's per-token scale), held as 16-bit rows of
  the dequantized values (an accuracy baseline: no memory saved).
"""
from __future__ import annotations

import torch

from ... import format as fmt
from ... import kv_format as kvf
from ...ops import kv as kv_ops
from ..base import GroupwiseStore, PrefixedLayer, Rows, add_bytes, concat_16bit
from ..registry import register_kv_mode


def fake_quant_per_token(x: torch.Tensor, bits: int) -> torch.Tensor:
    """x [B, H, T, D] -> quantized and dequantized per (token, head), in x's dtype (the numbers the packed store
    returns for 4 bits)."""
    if bits == 8:  # symmetric per (token, head)
        s = fmt.per_token_scale(x, bits).unsqueeze(-1)
        return (fmt.quantize(x, s, bits).float() * s).to(x.dtype)
    d = x.shape[-1]
    q, s, z = kvf.quantize_groupwise(x, bits, d, "token")
    return kvf.dequantize_groupwise(q, s, z, bits, d, "token").to(x.dtype)


def _packable(bits: int, head_dim: int) -> bool:
    """Whether the packed group-wise kernels take one group of head_dim channels (a power of 2)."""
    return bits in kv_ops.GROUPWISE_BITS and head_dim >= 2 and head_dim & (head_dim - 1) == 0


@register_kv_mode("dynamic", bits=(4, 8))
class DynamicTokenLayer(PrefixedLayer):
    """Per-token per-head dynamic KV quantization (see the module doc for the storage of each width)."""

    def __init__(self, prefix_keys=None, prefix_values=None, bits: int | None = None, backend="auto"):
        super().__init__(prefix_keys, prefix_values, backend, bits)

    def init_stores(self):
        self.k = self.v = None   # made at the first update, once head_dim is known
        self.packed = False

    def lazy_initialization(self, key_states, value_states):
        super().lazy_initialization(key_states, value_states)
        d = key_states.shape[3]
        self.packed = _packable(self.bits, d)
        if self.packed:
            self.k, self.v = (GroupwiseStore(self.bits, d, "token", self.backend, in_order=True) for _ in range(2))
        else:
            self.k, self.v = Rows(), Rows()

    def crop_stores(self, m):
        for store in (self.k, self.v):
            if self.packed:
                store.crop(m)
            else:
                store.truncate(m)

    def append(self, key_states, value_states):
        for store, x in ((self.k, key_states), (self.v, value_states)):
            if self.packed:
                store.quantize_append(x)
            else:
                store.append(fake_quant_per_token(x, self.bits))

    def keys_values(self, dtype):
        if self.packed:
            return self.k.assemble(self.prefix_keys, dtype), self.v.assemble(self.prefix_values, dtype)
        return (concat_16bit(self.prefix_keys, self.k.view(), dtype, self.backend),
                concat_16bit(self.prefix_values, self.v.view(), dtype, self.backend))

    def body_bytes(self):
        if self.packed:
            return add_bytes(self.k.nbytes(), self.v.nbytes())
        return {"fp16": sum(store.nbytes() for store in (self.k, self.v) if store is not None)}
