"""KV mode "logquant" (LogQuant, 2 or 4 bits): like KIVI, but the 16-bit tokens are LogQuant's: a recent list L
and a sparse list S (window W): when |L| > 2W, ``S = (S + L[:W])[::2]`` (the first time ``S = L[:W]``) and
``L = L[W:]``; the tokens that leave S + L are quantized (values at once; keys once ``group_size`` of them have
left, waiting in 16 bits until then). At most 3W (+ group_size - 1 pending keys) 16-bit tokens."""
from __future__ import annotations

from ...ops import kv as kv_ops
from ..base import OP, GroupwiseStore, PrefixedLayer, add_bytes, check_positive_int
from ..registry import register_kv_mode


def logquant_select(sparse: list[int], recent: list[int], window: int) -> tuple[list[int], list[int], list[int]]:
    """LogQuant's selection, applied until |recent| <= 2W -> (sparse, recent, positions that left)."""
    left = []
    while len(recent) > 2 * window:
        if not sparse:
            sparse, recent = recent[:window], recent[window:]
            continue
        merged = sparse + recent[:window]
        sparse, recent = merged[::2], recent[window:]
        left.extend(merged[1::2])
    return sparse, recent, left



@register_kv_mode("logquant", bits=(2, 4))
class LogQuantLayer(PrefixedLayer):
    """LogQuant: the 16-bit tokens at log-spaced positions (sparse list S + recent list L, window W); the others
    quantized (keys per-channel once group_size of them have left, values per-token at once).
    window W: a positive int; group_size G: a power of 2."""

    def __init__(self, window: int = 32, group_size: int = 32, prefix_keys=None, prefix_values=None,
                 bits: int | None = None, backend="auto"):
        self.group_size = kv_ops._group_size(group_size, "group_size", OP)
        self.window = check_positive_int(window, "window")
        super().__init__(prefix_keys, prefix_values, backend, bits)

    is_croppable = False  # a crop cannot un-quantize (docs/KV_CACHE.md)

    def init_stores(self):
        self.sparse: list[int] = []
        self.recent: list[int] = []
        self.k = GroupwiseStore(self.bits, self.group_size, "channel", self.backend, in_order=False)
        self.v = GroupwiseStore(self.bits, self.group_size, "token", self.backend, in_order=False)
        self._pending_keys: list[int] = []   # positions that left S + L, keys not yet a full group

    def crop_stores(self, m):
        # S and L lose their positions >= m (the newest: L's end, S's only if L empties); the selection goes on
        # from there. Keys of a dissolved group wait again as pending keys, ahead of the ones pending already.
        self.sparse = [p for p in self.sparse if p < m]
        self.recent = [p for p in self.recent if p < m]
        restored = self.k.crop(m)
        self._pending_keys = restored + [p for p in self._pending_keys if p < m]
        self.v.crop(m)

    def append(self, key_states, value_states):
        pos = list(range(self.n_tokens, self.n_tokens + key_states.shape[2]))
        self.k.add_fp(key_states, pos)
        self.v.add_fp(value_states, pos)
        self.sparse, self.recent, left = logquant_select(self.sparse, self.recent + pos, self.window)
        if left:
            v_row = {p: i for i, p in enumerate(self.v.fp_pos)}
            self.v.quantize_fp_rows([v_row[p] for p in left])
            self._pending_keys.extend(left)
            g = self.k.group_size
            ready = len(self._pending_keys) // g * g
            if ready:
                k_row = {p: i for i, p in enumerate(self.k.fp_pos)}
                self.k.quantize_fp_rows([k_row[p] for p in self._pending_keys[:ready]])
                self._pending_keys = self._pending_keys[ready:]

    def keys_values(self, dtype):
        return self.k.assemble(self.prefix_keys, dtype), self.v.assemble(self.prefix_values, dtype)

    def fp16_positions(self) -> list[int]:
        """The positions (after the prefix) held in 16 bits for both K and V: S + L."""
        return self.sparse + self.recent

    def body_bytes(self):
        return add_bytes(self.k.nbytes(), self.v.nbytes())


