"""One decoder layer traced once, its graph reused for every layer of the compiled decode step.

Dynamo traces the step's bytecode into one FX graph, and AOT autograd, inductor's lowering and its codegen each
walk every node of it: for SmolLM2's 30 identical layers that is ~30x one layer's work, ~100 s of a cold compile
on 2 cores (docs/PERF.md, "Where the compile's time goes"). ``torch.compiler.nested_compile_region`` marks a
function whose graph dynamo traces once and reuses for later calls whose inputs match (the same tensor metadata,
its guards passing): the step stays one graph (one guard check, one wrapper call), with 30 calls of one subgraph.

A region's inputs must be tensors (and the module whose parameters it reads): dynamo does not reuse a region
that takes a Python object such as the cache. So a decode step's layer call passes its cache layer's tensors (the
packed K/V buffers, the filled length, scales, prefix, the key rotation and offset) and, inside the region,
``StepLayerCache`` stands in for the PrefixQuantCache: the same ``update`` (the keys transformed as
KeyRotatingCache does, then PreallocatedStaticLayer's quantize + index_copy) and the same ``decode_attention``,
for whatever layer index the attention passes. What is the same for every layer (bits, kernel kind, whether
there is a prefix) is a constant of the region's code; the layer index is never read inside it.

``install(model)`` wraps the forward of each decoder layer (instance attributes, idempotent); the wrapper takes
the region only while dynamo traces a one-token step over a preallocated PrefixQuantCache, and otherwise calls the
layer's own forward.
"""
from __future__ import annotations

import inspect
import itertools
import types

import torch

from ..cache.factory import transform_keys
from ..cache.modes.static import PreallocatedStaticLayer
from . import compiled_step, decode_layer


# max_reuse_entries (torch >= 2.12) lifts the cap on reuses of one traced region; torch 2.11 (the GPU image's) has
# no such argument and raised TypeError in the first GPU run.
_REGION_KW = ({"max_reuse_entries": 4096}
              if "max_reuse_entries" in inspect.signature(torch.compiler.nested_compile_region).parameters else {})


class StepLayerCache(PreallocatedStaticLayer):
    """One preallocated static layer rebuilt from its tensors inside the region, passed to the decoder layer as
    its cache: ``update(k, v, layer_idx)`` ignores the index (HF's attention reads ``self.layer_idx`` only to pass
    it here), and the pqk attention takes the cache itself as its layer (``is_one_layer``) instead of indexing
    ``cache.layers`` (a read that would make the index a guarded constant, different in every layer: no reuse).
    consts: (bits, kernel kind, has a prefix), the same for every layer."""

    def __init__(self, consts, k, v, length, key_scale, value_scale, pk, pv, key_rotation, key_offset):
        # no PreallocatedStaticLayer.__init__: the buffers exist, and the constants are the cache's
        self.bits, self.kind, has_prefix = consts
        self.is_initialized = True
        self.k, self.v, self.length = k, v, length
        self.key_scale, self.value_scale = key_scale, value_scale
        self._pk, self._pv = pk, pv
        self._pk_cpu, self._pv_cpu = (pk, pv) if has_prefix else (None, None)
        self.key_rotation, self.key_offset = key_rotation, key_offset

    is_one_layer = True   # the pqk attention takes the cache as the layer (models/attention.py)

    def update(self, key_states, value_states, *args, **kwargs):
        key_states = transform_keys(key_states, self.key_rotation, self.key_offset)
        return PreallocatedStaticLayer.update(self, key_states, value_states)


def layer_tensors(cache, i: int) -> tuple:
    """The tensors of cache layer i a region takes: (k, v, length, key_scale, value_scale, prefix K, prefix V,
    key_rotation or None, key_offset or None)."""
    layer = cache.layers[i]
    offsets = getattr(cache, "key_offsets", None)
    pk, pv = (layer._pk, layer._pv) if layer._pk_cpu is None else (layer._pk_cpu, layer._pv_cpu)  # contiguous
    return (layer.k, layer.v, layer.length, layer.key_scale, layer.value_scale, pk, pv,
            getattr(cache, "key_rotation", None), None if offsets is None else offsets[i])


def _make_step(consts: tuple):
    # Layers that differ in a traced constant (a per-layer softmax scale, a layer kept at other bits) get one traced
    # subgraph each; torch's default cache of 8 then raises. No model has more layers than this: at worst every
    # layer is traced once, as without regions.
    @torch.compiler.nested_compile_region(**_REGION_KW)
    def step(layer, hidden_states, attention_mask, cos, sin, position_ids, query_rotation, *tensors):
        cache = StepLayerCache(consts, *tensors)
        kw = {} if query_rotation is None else {"pqk_query_rotation": query_rotation}
        return type(layer).forward(layer, hidden_states, attention_mask=attention_mask, position_ids=position_ids,
                                   past_key_values=cache, use_cache=True, position_embeddings=(cos, sin),
                                   pqk_cache=cache, **kw)
    return step


# One region per (bits, kernel kind, has a prefix): the region's code reads them as closure constants, equal for
# every layer (its guards pass). Made here, not on demand: dynamo cannot trace the decorator itself.
STEPS = {c: _make_step(c) for c in itertools.product((4, 8), ("reference", "cpu", "cuda", "triton"), (True, False))}


def _takes_region(past_key_values, hidden_states, kwargs) -> bool:
    layers = getattr(past_key_values, "layers", None)
    return (torch.compiler.is_compiling() and hidden_states.shape[1] == 1 and layers is not None
            and len(layers) > 0   # (not bool(list): dynamo in torch 2.11 cannot trace it)
            and all(type(l) is PreallocatedStaticLayer for l in layers)
            and kwargs.get("pqk_cache") is past_key_values and not set(kwargs) - {"pqk_cache", "pqk_query_rotation"})


def _region_forward(layer, orig):
    def forward(self, hidden_states, attention_mask=None, position_ids=None, past_key_values=None, use_cache=False,
                position_embeddings=None, **kwargs):
        if not _takes_region(past_key_values, hidden_states, kwargs):
            return orig(hidden_states, attention_mask=attention_mask, position_ids=position_ids,
                        past_key_values=past_key_values, use_cache=use_cache,
                        position_embeddings=position_embeddings, **kwargs)
        i = self.self_attn.layer_idx
        like = past_key_values.layers[i]
        cos, sin = position_embeddings
        tensors = layer_tensors(past_key_values, i)
        query_rotation = kwargs.get("pqk_query_rotation")
        if compiled_step.DECODE_LAYER_OP and (query_rotation is None) == (tensors[7] is None):
            slot = decode_layer.slot_of(self, like, hidden_states)
            if slot is not None:   # the whole layer as one C++ op (models/decode_layer.py)
                return decode_layer.forward(slot, hidden_states, attention_mask, cos, sin, *tensors)
        step = STEPS[(like.bits, like.kind, like._pk_cpu is not None)]
        return step(self, hidden_states, attention_mask, cos, sin, position_ids, query_rotation, *tensors)
    forward._pqk_region = True
    return types.MethodType(forward, layer)


def install(model) -> None:
    """Wrap every decoder layer's forward (idempotent); see the module docstring."""
    from .arch import decoder_layers
    for layer in decoder_layers(model):
        decode_layer.register(layer)
        if not getattr(layer.forward, "_pqk_region", False):
            object.__setattr__(layer, "forward", _region_forward(layer, layer.forward))
