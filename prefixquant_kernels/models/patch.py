"""Module swap for Hugging Face causal LMs: the layout comes from the model family's ArchSpec (models/arch.py,
keyed by ``config.model_type``; ``REGISTRY``, ``ArchSpec``, ``get_spec``, ``decoder_layers``, ``float_linears``,
``resolve`` are re-exported here).

What is swapped: every linear the spec names (q/k/v/o and gate/up/down, or Phi-3's fused qkv_proj / gate_up_proj)
``nn.Linear`` -> ``pqk.nn.QuantLinear`` (the linear inside a RotatedLinear when the model was rotated)
(Qwen2's qkv bias is carried by QuantLinear; Qwen3's q_norm/k_norm stay in float, after the quantized GEMM).
Every RMSNorm of the family runs ``pqk::rms_norm`` on the CPU (models/float_ops.py; the module stays).
Attention itself is not replaced: every supported attention calls ``past_key_values.update(k, v, layer_idx)``
after RoPE (and q/k norm), so the K/V path goes through ``pqk.PrefixQuantCache`` once the model runs with one.
The patched ``forward`` / ``generate`` supply that cache (built by ``model.pqk_state``) when none is given:

* ``model(ids)``: ids are the tokens *after* the prefix (the prefix is in the cache; positions start at P).
* ``model.generate(ids)``: ids as a user writes them; the prefix is put in front (the user's leading BOS is
  dropped when the prefix ends with it, so it is not doubled) and the returned sequences are ``ids + new tokens``.
  Where models/compiled_step.py's ``plan`` allows (the "static" KV mode, greedy or sampling), the cache is the
  preallocated one and transformers compiles the decode step; ``generate(..., pqk_compile=False)`` opts out.

With QuantConfig.kv_rotate the cache rotates K after RoPE and the attention is switched to its rotated-query twin
(models/attention.py); the patched forward passes the cache's rotation to it as ``pqk_query_rotation``.
A one-token step with a PrefixQuantCache (``fused_decode``, on by default) runs under the cache's
``deferred_reads()`` with the same pqk attention, which then reads the quantized K/V in place
(``kv_decode_attention``) instead of a dequantized float copy of the whole history.

All or nothing: ``swap`` checks every target and builds nothing in the model until all replacements exist.
"""
from __future__ import annotations

import contextlib
import functools

import torch
from torch import nn

from . import attention, compiled_step, float_ops
from .arch import (REGISTRY, ArchSpec, _fail, decoder_layers, float_linears, get_spec,  # noqa: F401 (re-exported)
                   resolve, unwrap)


def swap(model, replacements: dict[str, nn.Module], state: nn.Module | None = None) -> None:
    """Put every replacement in place (and ``state`` as ``model.pqk_state``), then patch forward/generate.
    Every target is resolved before the first setattr, so a bad name leaves the model as it was."""
    targets = []
    for name, new in replacements.items():
        parent_name, _, child = name.rpartition(".")
        try:
            parent = model.get_submodule(parent_name)
        except AttributeError:
            _fail(f"cannot swap {name!r}: no module {parent_name!r}")
        if not isinstance(getattr(parent, child, None), nn.Module) or not isinstance(new, nn.Module):
            _fail(f"cannot swap {name!r}: not a module")
        targets.append((parent, child, new))
    rotates_qk = state is not None and getattr(state, "rotates_qk", False)
    if rotates_qk:
        attention.check_attention(model)
    for parent, child, new in targets:   # from here on nothing can fail
        setattr(parent, child, new)
    float_ops.use_cpp_norms(model)
    float_ops.use_cpp_rope(model)
    if state is not None:
        model.pqk_state = state
    if rotates_qk:
        attention.use_rotated_attention(model)
    patch_instance(model)


# ---- forward / generate: supply the PrefixQuantCache ------------------------------------------------------------

def _forward_with_cache(orig):
    @functools.wraps(orig)
    def forward(self, input_ids=None, attention_mask=None, past_key_values=None, use_cache=None, **kwargs):
        state = getattr(self, "pqk_state", None)
        if torch.compiler.is_compiling():
            compiled_step.check_graph_key(self)
        if state is not None and past_key_values is None and use_cache is not False:
            ref = input_ids if input_ids is not None else kwargs.get("inputs_embeds")
            past_key_values = state.make_cache(ref.shape[0])
            use_cache = True
            if attention_mask is not None:
                attention_mask = state.extend_mask(attention_mask)
        rotation = getattr(past_key_values, "key_rotation", None)
        if rotation is not None:   # the cache rotates K after RoPE: the queries must be rotated the same way
            attention.use_rotated_attention(self)
            kwargs["pqk_query_rotation"] = rotation
        reads = contextlib.nullcontext()
        ref = input_ids if input_ids is not None else kwargs.get("inputs_embeds")
        # a preallocated (compileable) PrefixQuantCache answers one-token updates with empty K/V: it needs the pqk
        # attention, whatever fused_decode says
        prealloc = hasattr(past_key_values, "fused_decode") and past_key_values.is_compileable
        if prealloc and not attention.has_twin(self):
            raise ValueError(f"pqk: a preallocated PrefixQuantCache (max_cache_len) needs attn_implementation 'sdpa' "
                             f"or 'eager', the model uses {self.config._attn_implementation!r}")
        if prealloc:   # its prefill's mask spans the capacity, its layers return the filled rows: the twin cuts it
            attention.use_rotated_attention(self)
        fused = ((prealloc or getattr(past_key_values, "fused_decode", False)) and ref is not None
                 and attention.has_twin(self))
        if fused and ref.shape[1] == 1:
            # a decode step: the attention reads the quantized cache in place (PrefixQuantCache.deferred_reads; a
            # preallocated cache's layers always do, so a compiled step has no context manager to trace)
            attention.use_rotated_attention(self)
            kwargs["pqk_cache"] = past_key_values
            if not past_key_values.is_compileable:
                reads = past_key_values.deferred_reads()
        elif fused and _fresh_prefix(past_key_values) and _unpadded(attention_mask, ref.shape[1],
                                                                    past_key_values.layers[0].prefix_len):
            # a prefill after the prefix alone, no padding: "prefix + causal" as one causal kernel call, no mask
            # (models/prefix_attention.py)
            attention.use_rotated_attention(self)
            kwargs["pqk_prefix_len"] = past_key_values.layers[0].prefix_len
        with reads:
            return orig(self, input_ids=input_ids, attention_mask=attention_mask, past_key_values=past_key_values,
                        use_cache=use_cache, **kwargs)
    forward._pqk_patched = True
    return forward


def _unpadded(mask, t: int, p: int) -> bool:
    """No padding in a prefill of t tokens after the p prefix tokens: a 2-D mask of ones, or a 4-D one (the
    preallocated cache's, built by generate) whose last query row attends to all p + t positions."""
    if isinstance(mask, dict):   # Qwen2/3's generate builds one mask per layer type
        mask = mask.get("full_attention")
    if mask is None:
        return True
    if mask.dim() == 4:
        row = mask[:, :, -1, :p + t]
        return bool(row.all()) if row.dtype == torch.bool else bool((row == 0).all())
    return bool(mask.all())


def _fresh_prefix(cache) -> bool:
    """The cache holds its prefix (the same P > 0 tokens in every layer) and nothing else yet."""
    layers = getattr(cache, "layers", None)
    if not layers or not all(hasattr(l, "prefix_len") and hasattr(l, "n_tokens") for l in layers):
        return False
    p = layers[0].prefix_len
    return p > 0 and all(l.prefix_len == p and l.n_tokens == 0 for l in layers)


def _generate_with_prefix(orig):
    @functools.wraps(orig)
    def generate(self, input_ids=None, attention_mask=None, past_key_values=None, pqk_compile: bool = True,
                 **kwargs):
        if not isinstance(pqk_compile, bool):
            raise TypeError(f"pqk: generate's pqk_compile must be True or False, got {pqk_compile!r}")
        state = getattr(self, "pqk_state", None)
        if state is None or past_key_values is not None or input_ids is None:
            return orig(self, input_ids, attention_mask=attention_mask, past_key_values=past_key_values, **kwargs)
        ids, mask = state.with_prefix(input_ids, attention_mask)
        if mask is None:
            mask = torch.ones_like(ids)
        capacity = compiled_step.plan(self, state, ids, kwargs) if pqk_compile else None
        if capacity is None:
            cache = state.make_cache(ids.shape[0])
        else:   # a preallocated cache: transformers compiles the decode step (models/compiled_step.py)
            cache = state.make_cache(ids.shape[0], max_cache_len=capacity)
            kwargs.setdefault("compile_config", compiled_step.compile_config(self.device))
        out = orig(self, ids, attention_mask=mask, past_key_values=cache, **kwargs)
        seqs = out if isinstance(out, torch.Tensor) else out.sequences
        full = torch.cat([input_ids.to(seqs.device), seqs[:, ids.shape[1]:]], 1)
        if isinstance(out, torch.Tensor):
            return full
        out.sequences = full
        return out
    generate._pqk_patched = True
    return generate


def _unbound(fn):
    """A bound method's function, so wrappers can be installed on an instance or on a class alike."""
    return getattr(fn, "__func__", fn)


def patch_instance(model) -> None:
    """Patch one model's forward/generate (idempotent). Other instances of its class are not affected."""
    import types
    for attr, wrap in (("forward", _forward_with_cache), ("generate", _generate_with_prefix),
                       ("get_compiled_call", compiled_step.timed_compiled_call)):
        cur = _unbound(getattr(model, attr))
        if not getattr(cur, "_pqk_patched", False):
            object.__setattr__(model, attr, types.MethodType(wrap(cur), model))


def patch_class(cls) -> type:
    """Patch a *ForCausalLM class (idempotent): its instances use their ``pqk_state`` when they have one and
    behave as before when they have none."""
    for attr, wrap in (("forward", _forward_with_cache), ("generate", _generate_with_prefix),
                       ("get_compiled_call", compiled_step.timed_compiled_call)):
        cur = getattr(cls, attr)
        if not getattr(cur, "_pqk_patched", False):
            setattr(cls, attr, wrap(cur))
    return cls
