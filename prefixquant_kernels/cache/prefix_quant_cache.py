"""PrefixQuantCache: a transformers v5 ``Cache`` holding each layer's K/V as
``[16-bit prefix | quantized body | 16-bit tokens]`` in one of the registered KV modes (registry.py; one file per
mode in prefixquant_kernels/cache/modes/). The modes, their layouts and the crop / beam-search semantics:
docs/KV_CACHE.md; the bit formats: prefixquant_kernels/kv_format.py.

Contract: the constructor validates every argument and builds its layers from the registry (``kv_mode(mode)``),
never naming a layer class; the methods generate() and assisted generation call (update, reorder_cache, crop,
batch_select_indices, batch_repeat_interleave, reset) validate their arguments once, for all layers.
Tested with transformers 5.23 (``Cache(layers=...)``, ``CacheLayerMixin``).
"""
from __future__ import annotations

import contextlib

import torch
from transformers.cache_utils import Cache

from ..ops import kv as kv_ops
from .base import add_bytes, check_positive_int, check_prefix, fail, per_layer
from .registry import kv_mode

# PrefixQuantCache's named tuning knobs: handed to the modes that take them, ignored by the others (as before the
# registry); every other option must be one the mode takes.
_KNOBS = ("group_size", "residual_length", "window")


class PrefixQuantCache(Cache):
    """A transformers v5 Cache of [16-bit prefix | quantized body | 16-bit tokens] per layer (docs/KV_CACHE.md).

    Args:
        num_layers: the model's number of decoder layers.
        mode: a registered KV mode: "static" (PrefixQuant, static per-head scales; "prefixquant" is an alias),
            "dynamic", "kivi", "logquant", "fp16" (``pqk.cache.kv_modes()`` lists them).
        bits: one of the mode's widths (static and dynamic 4 | 8, kivi and logquant 2 | 4, fp16 16);
            None: the mode's default (its first).
        key_scales, value_scales: "static" only: one float [H_kv] tensor per layer (static per-head scales).
        prefix_keys, prefix_values: optional, one [1 or B, H_kv, P, D] tensor per layer (any mode).
        group_size: kivi/logquant: G (keys: G tokens per channel group; values: G channels per token group), 32.
        residual_length: kivi: R, a multiple of G, 128.   window: logquant: W, 32.
            (group_size / residual_length / window are ignored by the modes that do not take them.)
        backend: "auto" | "reference" | "triton" | "cpu", as in the KV ops.
        max_cache_len: "static" only: preallocate the body for this many tokens after the prefix, a cache
            transformers compiles (``is_compileable``; modes/static.py's PreallocatedStaticLayer). None: grow.
        **options: the own arguments of a mode registered outside this package.

        cache = PrefixQuantCache(cfg.num_hidden_layers, "prefixquant", key_scales=ks, value_scales=vs,
                                 prefix_keys=pk, prefix_values=pv)
        model.generate(prefix_ids_then_prompt, past_key_values=cache, max_new_tokens=32)
    """

    # A model patched by pqk (models/patch.py) runs its one-token steps with this cache under deferred_reads():
    # "static" layers then attend over the packed K/V in place. False: every step builds float K/V.
    fused_decode = True

    def __init__(self, num_layers: int, mode: str = "prefixquant", *, key_scales=None, value_scales=None,
                 prefix_keys=None, prefix_values=None, group_size: int | None = None,
                 residual_length: int | None = None, window: int | None = None, bits: int | None = None,
                 backend: str = "auto", max_cache_len: int | None = None, **options):
        check_positive_int(num_layers, "num_layers")
        spec = kv_mode(mode, op="PrefixQuantCache")
        if backend not in kv_ops.KV_BACKENDS:
            fail(f"backend must be one of {kv_ops.KV_BACKENDS}, got {backend!r}")
        pks = per_layer(prefix_keys, num_layers, "prefix_keys")
        pvs = per_layer(prefix_values, num_layers, "prefix_values")
        for i, (pk, pv) in enumerate(zip(pks, pvs)):
            check_prefix(pk, pv, i)
        given = {k: v for k, v in (("key_scales", key_scales), ("value_scales", value_scales), *options.items())
                 if v is not None}
        self._reject_foreign(spec, mode, [k for k in given if k not in spec.options])
        for name, v in (("group_size", group_size), ("residual_length", residual_length), ("window", window)):
            if v is not None and name in spec.options:
                given[name] = v
        self.mode = spec.name
        layer_cls = spec.layer
        if max_cache_len is not None:
            layer_cls = spec.preallocated
            if layer_cls is None:
                fail(f"max_cache_len (a preallocated, compileable cache) is for mode 'static', not {mode!r}")
            given["max_cache_len"] = max_cache_len
        layers = layer_cls.for_layers(num_layers, pks, pvs, bits=bits, backend=backend, **given)
        self.bits = layers[0].bits
        super().__init__(layers=layers)

    @staticmethod
    def _reject_foreign(spec, mode: str, names: list[str]) -> None:
        """Options the mode does not take: name the mode that does, or the ones this mode takes."""
        if not names:
            return
        from .registry import kv_modes
        takers = [s for s in map(kv_mode, kv_modes()) if names[0] in s.options]
        if takers:
            fail(f"{'/'.join(takers[0].options)} are for mode={takers[0].spelled()}, not {mode!r}")
        fail(f"mode {spec.name!r} takes no option {names[0]!r} (its options: {spec.options or 'none'})")

    @contextlib.contextmanager
    def deferred_reads(self):
        """Within the block, a one-token update() of a "static" layer returns empty K/V ([B, H, 0, D]) and
        does not dequantize the history: the caller promises an attention that notices the empty K/V and calls
        the layer's decode_attention(query, scaling) (or keys_values(dtype)) instead. The patched model forward
        (models/patch.py) opens it around a decode step, with the pqk attention (models/attention.py)."""
        for layer in self.layers:
            layer.defer_reads = True
        try:
            yield self
        finally:
            for layer in self.layers:
                layer.defer_reads = False

    # ---- beam search, contrastive / assisted generation (docs/KV_CACHE.md); arguments checked once, for all layers

    def _batch_index(self, idx, name: str) -> torch.Tensor:
        """A 1-D integer tensor (or list) of batch rows in [0, batch) -> int64 (on idx's device)."""
        if not isinstance(idx, torch.Tensor):
            idx = torch.as_tensor(idx)
        if idx.dim() != 1 or idx.dtype.is_floating_point or idx.dtype.is_complex or idx.dtype == torch.bool:
            fail(f"{name} must be a 1-D integer tensor of batch indices, got {idx.dtype} of shape "
                  f"{tuple(idx.shape)}", TypeError)
        b = self.layers[0].batch_size()
        if b is not None and idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= b):  # one sync per call
            fail(f"{name} must hold batch indices in [0, {b}), got values in [{int(idx.min())}, {int(idx.max())}]")
        return idx.long()

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        """Beam search: sequence i continues beam beam_idx[i] (int [B*num_beams])."""
        idx = self._batch_index(beam_idx, "beam_idx")
        for layer in self.layers:
            layer.reorder_cache(idx)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        """Keep only the sequences `indices` (int [B']), in that order."""
        idx = self._batch_index(indices, "indices")
        for layer in self.layers:
            layer.batch_select_indices(idx)

    def batch_repeat_interleave(self, repeats: int) -> None:
        """Repeat each sequence `repeats` times in place (batch B -> B * repeats, as repeat_interleave)."""
        check_positive_int(repeats, "repeats")
        for layer in self.layers:
            layer.batch_repeat_interleave(repeats)

    def crop(self, tokens_to_remove: int) -> None:
        """Remove the k = -tokens_to_remove newest tokens (transformers >= 5: a negative count; 0 is a no-op)."""
        if isinstance(tokens_to_remove, bool) or not isinstance(tokens_to_remove, int):
            fail(f"tokens_to_remove must be an int <= 0, got {tokens_to_remove!r}", TypeError)
        if tokens_to_remove > 0:
            fail(f"crop takes minus the number of tokens to remove (transformers >= 5), got {tokens_to_remove}; "
                  f"to keep the first n tokens call crop(n - cache.get_seq_length())")
        n = self.get_seq_length()
        if -tokens_to_remove > n:
            fail(f"crop({tokens_to_remove}) removes more tokens than the cache holds ({n})")
        for layer in self.layers:
            layer.crop(tokens_to_remove)

    def memory_bytes(self) -> dict[str, int]:
        """Bytes of the tensors held, by part, summed over layers (a shared prefix counted once per layer)."""
        total: dict[str, int] = {}
        for layer in self.layers:
            total = add_bytes(total, layer.memory_bytes())
        total["total"] = sum(total.values())
        return total

    def bytes_per_token_per_layer(self) -> float:
        """Total bytes held / (layers * batch * tokens after the prefix): the cost of one more token."""
        layer = self.layers[0]
        n = layer.n_tokens
        if n == 0:
            return 0.0
        m = self.memory_bytes()
        b = layer.batch
        return (m["total"] - m.get("prefix", 0)) / (len(self.layers) * n * b)
