"""Fused decode: a patched model's one-token steps with a "prefixquant" PrefixQuantCache attend over the packed
K/V in place (PrefixQuantCache.deferred_reads + the pqk attention + kv_decode_attention) instead of dequantizing
the whole history first. Same logits as the unfused path (cache.fused_decode = False), for Llama / Mistral / Qwen2 /
Qwen3 / Phi-3, sdpa and eager, KV 4 and 8 bits, with and without the Q/K rotation; falls back where it cannot apply."""
import pytest
import torch

import prefixquant_kernels as pqk
from prefixquant_kernels.cache.modes.static import StaticQuantLayer
from prefixquant_kernels.calibration.pipeline import quantize_model

from .tiny import StubTokenizer, text, tiny_model

_MODELS: dict = {}


def _quantized(arch, attn, kv_bits, kv_rotate):
    key = (arch, attn, kv_bits, kv_rotate)
    if key not in _MODELS:
        model = tiny_model(arch)
        model.set_attn_implementation(attn)
        cfg = pqk.QuantConfig(w_bits=8, a_bits=8, kv_bits=kv_bits, kv_rotate=kv_rotate, calib_samples=2,
                              calib_seq_len=64)
        _MODELS[key] = quantize_model(model, StubTokenizer(), text(), cfg, progress=False)
    return _MODELS[key]


@pytest.fixture
def calls(monkeypatch):
    n = []
    real = StaticQuantLayer.decode_attention
    monkeypatch.setattr(StaticQuantLayer, "decode_attention", lambda self, *a: n.append(1) or real(self, *a))
    return n


def _decode(model, fused: bool, prompt, steps, mask=None):
    """-> (logits of the decode steps, layer 0's attention outputs (o_proj inputs) of those steps, the cache)."""
    cache = model.pqk_state.make_cache(prompt.shape[0])
    cache.fused_decode = fused
    out, attn = [], []
    o_proj = model.model.layers[0].self_attn.o_proj
    with torch.no_grad():
        model(prompt, past_key_values=cache, attention_mask=mask)
        hook = o_proj.register_forward_pre_hook(lambda mod, args: attn.append(args[0].clone()))
        try:
            for t in range(steps):
                tok = torch.full((prompt.shape[0], 1), 5 + 7 * t)
                if mask is not None:
                    mask = torch.cat([mask, torch.ones_like(tok)], 1)
                out.append(model(tok, past_key_values=cache, attention_mask=mask).logits)
        finally:
            hook.remove()
    return torch.cat(out, 1), torch.cat(attn, 1), cache


def _assert_same(got, want):
    """Layer 0's attention output to fp32 rounding (the two paths sum in different orders); the logits to a few
    % of their range: downstream, the static activation quantizers turn 1e-7 differences into an occasional
    one-level flip, which a wrong attention (e.g. a missing prefix or scale) exceeds by orders of magnitude."""
    (lg, ag), (lw, aw) = got, want
    torch.testing.assert_close(ag, aw, atol=1e-5 * float(aw.abs().max()), rtol=1e-4)
    torch.testing.assert_close(lg, lw, atol=0.03 * float(lw.abs().max()), rtol=0)


@pytest.mark.parametrize("arch,attn,kv_bits,kv_rotate", [
    ("llama", "sdpa", 4, True), ("llama", "eager", 4, False), ("qwen2", "sdpa", 4, False),
    ("qwen3", "sdpa", 8, True), ("qwen3", "eager", 4, True),
    ("mistral", "sdpa", 4, True), ("phi3", "sdpa", 4, True), ("phi3", "eager", 8, False),
])
def test_fused_decode_matches_unfused(arch, attn, kv_bits, kv_rotate, calls):
    model = _quantized(arch, attn, kv_bits, kv_rotate)
    prompt = torch.tensor([StubTokenizer().encode(text(41, seed=3))])
    *want, _ = _decode(model, False, prompt, 6)
    assert not calls
    *got, cache = _decode(model, True, prompt, 6)
    assert len(calls) == 6 * len(model.model.layers)      # every layer of every step took the fused path
    assert not any(layer.defer_reads for layer in cache.layers)   # the block was closed
    _assert_same(got, want)


def test_generate_is_unchanged(calls):
    model = _quantized("llama", "sdpa", 4, True)
    user = torch.tensor([StubTokenizer().encode(text(20, seed=5), add_special_tokens=True)])
    gen = dict(max_new_tokens=6, do_sample=False, pad_token_id=0, pqk_compile=False)   # the growing cache's
    fused = model.generate(user, **gen)                  # path (the compiled one: test_compiled_step.py)
    assert calls
    calls.clear()
    old = pqk.PrefixQuantCache.fused_decode
    try:
        pqk.PrefixQuantCache.fused_decode = False
        plain = model.generate(user, **gen)
    finally:
        pqk.PrefixQuantCache.fused_decode = old
    assert not calls and torch.equal(fused, plain)


def test_padded_batch_falls_back_to_the_full_read(calls):
    """A left-padded batch has a real mask: the fused kernel (no mask) must not run, the result stays right."""
    model = _quantized("llama", "sdpa", 4, False)
    prompt = torch.tensor([StubTokenizer().encode(text(40, seed=s))[:24] for s in (7, 8)])
    mask = torch.ones_like(prompt)
    mask[1, :4] = 0
    *want, _ = _decode(model, False, prompt, 3, mask)
    *got, _ = _decode(model, True, prompt, 3, mask)
    assert not calls
    _assert_same(got, want)


def test_without_the_block_update_returns_full_kv():
    model = _quantized("llama", "sdpa", 4, False)
    cache = model.pqk_state.make_cache(1)
    with torch.no_grad():
        model(torch.tensor([[5, 6, 7]]), past_key_values=cache)
    layer = cache.layers[0]
    kv = torch.randn(1, layer.key_scale.numel(), 1, cache.layers[0].k.view().shape[-1] * 2)
    k, v = layer.update(kv, kv)
    assert k.shape[2] == cache.get_seq_length()
    with cache.deferred_reads():
        k, v = layer.update(kv, kv)
        assert k.shape[2] == 0
