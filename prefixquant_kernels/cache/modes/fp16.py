"""KV mode "fp16": ``[prefix | tokens]``, nothing quantized (the memory and accuracy baseline)."""
from __future__ import annotations

from ..base import PrefixedLayer, Rows, concat_16bit
from ..registry import register_kv_mode


@register_kv_mode("fp16", bits=(16,))
class Fp16Layer(PrefixedLayer):
    """[prefix | tokens] in the model's dtype. bits: 16 (the only width; QuantConfig's kv_bits=16)."""

    def __init__(self, prefix_keys=None, prefix_values=None, backend="auto", bits: int | None = None):
        super().__init__(prefix_keys, prefix_values, backend, bits)

    def init_stores(self):
        self.k, self.v = Rows(), Rows()

    def crop_stores(self, m):
        self.k.truncate(m)
        self.v.truncate(m)

    def append(self, key_states, value_states):
        self.k.append(key_states)
        self.v.append(value_states)

    def keys_values(self, dtype):
        return (concat_16bit(self.prefix_keys, self.k.view(), dtype, self.backend),
                concat_16bit(self.prefix_values, self.v.view(), dtype, self.backend))

    def body_bytes(self):
        return {"fp16": self.k.nbytes() + self.v.nbytes()}
