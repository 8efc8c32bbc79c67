"""KV mode "kivi" (KIVI, 2 or 4 bits): keys per-channel in groups of ``group_size`` tokens, quantized a block of
``residual_length`` tokens at a time (the block waits in 16 bits until it fills); values per-token in groups of
``group_size`` channels, with a sliding 16-bit window of the ``residual_length`` most recent tokens."""
from __future__ import annotations

from ...ops import kv as kv_ops
from ..base import OP, GroupwiseStore, PrefixedLayer, add_bytes, check_positive_int, fail
from ..registry import register_kv_mode


@register_kv_mode("kivi", bits=(2, 4))
class KiviLayer(PrefixedLayer):
    """KIVI: keys per-channel, quantized R tokens at a time; values per-token with a sliding 16-bit window of R.
    group_size G: a power of 2; residual_length R: a multiple of G."""

    def __init__(self, group_size: int = 32, residual_length: int = 128, prefix_keys=None, prefix_values=None,
                 bits: int | None = None, backend="auto"):
        g = kv_ops._group_size(group_size, "group_size", OP)
        check_positive_int(residual_length, "residual_length")
        if residual_length % g:
            fail(f"residual_length must be a multiple of group_size ({g}), got {residual_length}")
        self.residual_length, self.group_size = residual_length, g
        super().__init__(prefix_keys, prefix_values, backend, bits)

    is_croppable = False  # a crop cannot un-quantize (docs/KV_CACHE.md)

    def init_stores(self):
        self.k = GroupwiseStore(self.bits, self.group_size, "channel", self.backend, in_order=True)
        self.v = GroupwiseStore(self.bits, self.group_size, "token", self.backend, in_order=True)

    def crop_stores(self, m):
        # keys: whole R-blocks stay quantized, a dissolved group's tokens rejoin the 16-bit block (and are
        # re-quantized when it fills); values: the 16-bit window holds fewer than R tokens until it refills
        self.k.crop(m)
        self.v.crop(m)

    def append(self, key_states, value_states):
        pos = list(range(self.n_tokens, self.n_tokens + key_states.shape[2]))
        r = self.residual_length
        self.k.add_fp(key_states, pos)
        full = len(self.k.fp_pos) // r * r      # keys: whole blocks of R leave the residual
        self.k.quantize_fp_rows(list(range(full)))
        self.v.add_fp(value_states, pos)
        over = max(len(self.v.fp_pos) - r, 0)   # values: the oldest beyond the window of R
        self.v.quantize_fp_rows(list(range(over)))

    def keys_values(self, dtype):
        return self.k.assemble(self.prefix_keys, dtype), self.v.assemble(self.prefix_values, dtype)

    def body_bytes(self):
        return add_bytes(self.k.nbytes(), self.v.nbytes())
