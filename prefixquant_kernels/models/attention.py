"""The pqk attention: the model's sdpa / eager attention, registered in transformers' ``AttentionInterface`` as
``pqk_qk_rotated_sdpa`` / ``pqk_qk_rotated_eager``, with three optional call arguments the patched forward
(models/patch.py) passes: ``pqk_query_rotation`` (rotate Q by the Hadamard the cache rotates K with, after RoPE),
``pqk_cache`` (a decode step under ``deferred_reads()``: attend over the packed cache in place) and
``pqk_prefix_len`` (an unpadded prefill after the prefix: one causal call, models/prefix_attention.py). Without
them it is exactly the base attention; its mask function is the base's (in a compiled CPU step, made once by an
opaque op: ``_step_mask``). Why Q/K are rotated online, and where: docs/DESIGN.md ("The Q/K rotation").
Supported families run ``RoPE -> past_key_values.update(k, v) -> attention_interface(q, k, v)`` (transformers 5.23;
Mistral and Phi-3 also pass ``sliding_window``, which makes the pqk attention take its base path when set).
"""
from __future__ import annotations

import sys

import torch

from ..cache.factory import rotate_heads  # noqa: F401  (Q is rotated as the cache rotates K)
from .prefix_attention import prefix_causal_attention

BASES = ("sdpa", "eager")
PREFIX = "pqk_qk_rotated_"


def _base_attention(base: str, module):
    if base == "eager":   # every modeling file defines its own eager_attention_forward (not in the registry)
        return sys.modules[type(module).__module__].eager_attention_forward
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
    return ALL_ATTENTION_FUNCTIONS[base]


def _allows_everything(mask) -> bool:
    """True when an attention mask (None, bool: True = attend, or additive float) masks nothing."""
    if mask is None:
        return True
    return bool(mask.all()) if mask.dtype == torch.bool else bool((mask == 0).all())


def _scaling(query, kwargs) -> float:
    """The attention's softmax scale: the model's ``scaling`` argument, else 1/sqrt(head_dim)."""
    scaling = kwargs.get("scaling")
    return scaling if scaling is not None else query.shape[-1] ** -0.5


def _key_mask(mask):
    """The one-token step's 4-D mask [B, 1, 1, KV] (bool True = attend, or additive float: 0 = attend) -> bool
    [B, KV] for the decode kernel; None stays None."""
    if mask is None:
        return None
    row = mask[:, 0, -1]
    return row if row.dtype == torch.bool else row == 0


def _no_extras(kwargs) -> bool:
    """No sliding window, softcap or dropout: plain softmax attention."""
    return kwargs.get("sliding_window") is None and kwargs.get("softcap") is None and not kwargs.get("dropout")


def _fusable(query, attention_mask, kwargs) -> bool:
    """Can the fused decode attention (no mask, no window, no softcap, no dropout) stand in for the base one?"""
    return query.shape[2] == 1 and _no_extras(kwargs) and _allows_everything(attention_mask)


def _rotated_attention(base: str):
    def attention(module, query, key, value, attention_mask, pqk_query_rotation=None, pqk_cache=None,
                  pqk_prefix_len=None, **kwargs):
        """query float [B, H_q, T, D]; key, value [B, H_kv, S, D] (keys already rotated by the cache when
        pqk_query_rotation float [D, D] is given). pqk_cache: the PrefixQuantCache of a decode step run under
        its deferred_reads(): an empty key means the layer skipped building K/V, and its decode_attention reads
        the cache in place (or, where the fused kernel does not apply, keys_values builds K/V after all).
        pqk_prefix_len: P, given for a prefill of an unpadded batch into a cache holding only its P prefix
        tokens: the mask is then "all of the prefix + causal", computed without a mask (models/prefix_attention.py)."""
        if pqk_query_rotation is not None:
            query = rotate_heads(query, pqk_query_rotation)
        if pqk_cache is not None and key.shape[-2] == 0:
            # a decode step's layer region passes a cache of its one layer (models/layer_region.py): the layer
            # index, a different constant in every layer, is not read inside the region
            layer = pqk_cache if getattr(pqk_cache, "is_one_layer", False) else pqk_cache.layers[module.layer_idx]
            if layer.is_compileable and query.shape[2] == 1 and _no_extras(kwargs):
                # a preallocated cache (a compiled step): the kernel takes the padding mask, no host check
                out = layer.decode_attention(query, _scaling(query, kwargs), _key_mask(attention_mask))
                return out.transpose(1, 2).contiguous(), None
            if _fusable(query, attention_mask, kwargs):
                out = layer.decode_attention(query, _scaling(query, kwargs))
                return out.transpose(1, 2).contiguous(), None   # [B, T, H_q, D], like the base attentions
            key, value = layer.keys_values(query.dtype)
        if (pqk_prefix_len is not None and query.shape[2] > 1
                and key.shape[-2] == pqk_prefix_len + query.shape[2] and _no_extras(kwargs)):
            return prefix_causal_attention(query, key, value, pqk_prefix_len, _scaling(query, kwargs)), None
        if attention_mask is not None and attention_mask.shape[-1] > key.shape[-2]:
            # a preallocated cache's mask spans its capacity; its layer returned the filled rows only
            attention_mask = attention_mask[..., :key.shape[-2]]
        return _base_attention(base, module)(module, query, key, value, attention_mask, **kwargs)
    attention.__name__ = f"{PREFIX}{base}"
    return attention


def _step_mask(base_fn):
    """The base implementation's mask function, its mask made by one opaque op (pqk::materialize) where a compiled
    CPU step builds it in its graph (a step called without attention_mask, as benchmarks/e2e.py calls it; generate()
    builds the mask outside the step and passes it in). Inductor otherwise recomputes the mask, a compare over the
    preallocated cache's capacity, into every layer's input: one parallel kernel a layer, 30 a step for SmolLM2, their
    cost growing with the capacity (docs/PERF.md, change 23). Eager calls and other devices get the base mask."""
    def mask(*args, **kwargs):
        m = base_fn(*args, **kwargs)
        if isinstance(m, torch.Tensor) and m.device.type == "cpu" and torch.compiler.is_compiling():
            m = torch.ops.pqk.materialize(m)
        return m
    mask.__name__ = f"{PREFIX}{getattr(base_fn, '__name__', 'mask')}"
    return mask


def _register() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
    for base in BASES:
        AttentionInterface.register(PREFIX + base, _rotated_attention(base))
        AttentionMaskInterface.register(PREFIX + base, _step_mask(ALL_MASK_ATTENTION_FUNCTIONS[base]))


_register()


def check_attention(model) -> str:
    """The base implementation the model's rotated attention wraps; ValueError for one other than sdpa / eager
    (flash / flex attention would need their own twin)."""
    cur = model.config._attn_implementation
    base = (cur or "sdpa").removeprefix(PREFIX)
    if base not in BASES:
        raise ValueError(f"pqk.quantize_model: kv_rotate needs attn_implementation 'sdpa' or 'eager', the model uses "
                         f"{cur!r} (load it with attn_implementation='sdpa' or set QuantConfig(kv_rotate=False))")
    return base


def has_twin(model) -> bool:
    """Whether the model's attention is one this module has a pqk twin of (sdpa / eager, or already the twin)."""
    cur = model.config._attn_implementation
    return (cur or "sdpa").removeprefix(PREFIX) in BASES


def use_rotated_attention(model) -> None:
    """Switch the model's attention to its rotated-query twin (idempotent). Without the ``pqk_query_rotation``
    argument the twin is the base attention, so a call without a key-rotating cache is unchanged."""
    cur = model.config._attn_implementation
    if cur is None or not cur.startswith(PREFIX):
        model.config._attn_implementation = PREFIX + check_attention(model)
