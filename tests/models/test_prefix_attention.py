"""Prefill over [prefix | prompt] without a materialized mask (models/prefix_attention.py): the causal flash
kernel on the prompt's keys merged with a small softmax over the prefix keys by log-sum-exp. Equals SDPA with the
bottom-right causal mask; the patched model uses it for unpadded prefills into a prefix-only cache."""
import pytest
import torch

from prefixquant_kernels.models import attention, prefix_attention

from .test_fused_decode import _assert_same, _quantized
from .tiny import StubTokenizer, text


def _masked_reference(q, k, v, p, scaling):
    t, g = q.shape[2], q.shape[1] // k.shape[1]
    mask = torch.ones(t, p + t, dtype=torch.bool).tril(p)   # query i: the prefix and prompt keys 0..i
    out = torch.nn.functional.scaled_dot_product_attention(q.float(), k.float().repeat_interleave(g, 1),
                                                           v.float().repeat_interleave(g, 1), attn_mask=mask,
                                                           scale=scaling)
    return out.transpose(1, 2)


@pytest.mark.parametrize("B,Hkv,G,T,P,D", [(1, 2, 4, 37, 1, 64), (2, 3, 1, 16, 3, 32), (1, 1, 2, 5, 0, 16),
                                          (1, 2, 2, 129, 4, 8)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_matches_masked_sdpa(B, Hkv, G, T, P, D, dtype):
    g = torch.Generator().manual_seed(T + P)
    q = torch.randn(B, Hkv * G, T, D, generator=g).to(dtype)
    k = (torch.randn(B, Hkv, P + T, D, generator=g) * 3).to(dtype)   # spread scores: the merge must be exact
    v = torch.randn(B, Hkv, P + T, D, generator=g).to(dtype)
    out = prefix_attention.prefix_causal_attention(q, k, v, P, D ** -0.5)
    want = _masked_reference(q, k, v, P, D ** -0.5)
    assert out.dtype == dtype and out.shape == (B, T, Hkv * G, D)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(out.float(), want, atol=tol, rtol=tol)


def test_rejects_mismatched_lengths():
    q, k = torch.randn(1, 2, 5, 8), torch.randn(1, 2, 7, 8)
    with pytest.raises(ValueError, match="key/value must be"):
        prefix_attention.prefix_causal_attention(q, k, k, 1, 0.3)


@pytest.fixture
def spy(monkeypatch):
    n = []
    real = attention.prefix_causal_attention
    monkeypatch.setattr(attention, "prefix_causal_attention", lambda *a: n.append(1) or real(*a))
    return n


def _prefill(model, fused, prompt, mask=None):
    cache = model.pqk_state.make_cache(prompt.shape[0])
    cache.fused_decode = fused
    attn = []
    o_proj = model.model.layers[0].self_attn.o_proj
    hook = o_proj.register_forward_pre_hook(lambda mod, args: attn.append(args[0].clone()))
    try:
        with torch.no_grad():
            logits = model(prompt, past_key_values=cache, attention_mask=mask).logits
    finally:
        hook.remove()
    return logits, attn[0]


@pytest.mark.parametrize("arch,attn,kv_bits", [("llama", "sdpa", 4), ("qwen3", "eager", 8), ("qwen2", "sdpa", 4),
                                                ("mistral", "sdpa", 4), ("phi3", "sdpa", 4), ("phi3", "eager", 8)])
def test_model_prefill_uses_it_and_matches(arch, attn, kv_bits, spy):
    model = _quantized(arch, attn, kv_bits, True)
    assert model.pqk_state.make_cache(1).layers[0].prefix_len > 0
    prompt = torch.tensor([StubTokenizer().encode(text(45, seed=4))])
    want = _prefill(model, False, prompt)
    assert not spy
    got = _prefill(model, True, prompt)
    assert len(spy) == len(model.model.layers)
    _assert_same(got, want)


def test_padded_prefill_keeps_the_mask(spy):
    model = _quantized("llama", "sdpa", 4, False)
    prompt = torch.tensor([StubTokenizer().encode(text(40, seed=s))[:24] for s in (7, 8)])
    mask = torch.ones_like(prompt)
    mask[1, :5] = 0
    want = _prefill(model, False, prompt, mask)
    got = _prefill(model, True, prompt, mask)
    assert not spy
    _assert_same(got, want)
