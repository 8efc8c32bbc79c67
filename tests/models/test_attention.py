"""The KV rotation (QuantConfig.kv_rotate): Q/K rotated online after RoPE (K by the cache, Q by the registered
attention twin), V folded offline. Exact in float (GQA, Qwen2 qkv bias, Qwen3 q/k norm, sdpa and eager, with and
without a prefix, forward and generate); it shrinks a 4-bit static cache's error on keys with an outlier channel."""
import pytest
import torch

import prefixquant_kernels as pqk
from prefixquant_kernels.calibration import prefix as pfx
from prefixquant_kernels.calibration import rotation, scales
from prefixquant_kernels.models import attention
from prefixquant_kernels.cache import KeyRotatingCache, build_cache
from prefixquant_kernels.models.patch import swap
from prefixquant_kernels.models.state import PrefixQuantState

from .tiny import BOS, StubTokenizer, text, tiny_model


def _randomized(arch, attn="sdpa"):
    """A tiny model whose qkv biases (Qwen2) and q/k norm weights (Qwen3) are not trivial."""
    model = tiny_model(arch)
    model.set_attn_implementation(attn)
    g = torch.Generator().manual_seed(1)
    spec = pqk.models.get_spec(model)
    with torch.no_grad():
        for layer in model.model.layers:
            a = layer.self_attn
            for lin in (layer.get_submodule(n) for n in spec.points["qkv"]):
                if lin.bias is not None:
                    lin.bias.copy_(torch.randn(lin.bias.shape, generator=g))
            for norm in (getattr(a, "q_norm", None), getattr(a, "k_norm", None)):
                if norm is not None:
                    norm.weight.copy_(torch.rand(norm.weight.shape, generator=g) + 0.5)
    return model


def _kv_rotated_float(model, prefix_ids):
    """The float model with only the KV rotation (16-bit cache, no linear quantized): must compute the same."""
    h = rotation.rotate_kv(model, seed=3).float()
    cfg = pqk.QuantConfig(w_bits=8, a_bits=8, kv_bits=16, kv_rotate=True, prefix=bool(prefix_ids),
                          prefix_tokens=prefix_ids or None)
    c = model.config
    state = PrefixQuantState(cfg, c.num_hidden_layers, c.num_key_value_heads, rotation.head_dim(model),
                             len(prefix_ids), BOS if prefix_ids else None)
    state.set_qk_rotation(h)
    if prefix_ids:
        pk, pv = pfx.prefix_kv(model, prefix_ids)
        state.prefix_ids.copy_(torch.tensor(prefix_ids))
        state.set_prefix([attention.rotate_heads(k, h) for k in pk], pv)
    swap(model, {}, state)
    return model, h


@pytest.mark.parametrize("arch,attn,prefix_ids", [
    ("llama", "sdpa", [7, BOS]), ("qwen2", "sdpa", [7, BOS]), ("qwen3", "sdpa", [7, BOS]),
    ("llama", "eager", []), ("qwen3", "eager", [BOS]),
    ("mistral", "sdpa", [7, BOS]), ("phi3", "sdpa", [7, BOS]), ("phi3", "eager", []),   # phi3: V rows of qkv_proj
])
def test_kv_rotation_keeps_the_float_model(arch, attn, prefix_ids):
    ref = _randomized(arch, attn)
    model, h = _kv_rotated_float(_randomized(arch, attn), prefix_ids)
    assert model.config._attn_implementation == attention.PREFIX + attn
    assert not torch.allclose(h, torch.eye(h.shape[0]))
    spec = pqk.models.get_spec(model)
    q_rows, k_rows, v_rows = spec.qkv_rows(model.config)
    v_rotated, v_ref = (m.model.layers[0].get_submodule(spec.v).weight for m in (model, ref))
    assert not torch.allclose(v_rotated[v_rows], v_ref[v_rows])
    assert torch.equal(v_rotated[q_rows], v_ref[q_rows]) or not spec.fused_qkv     # fused: only the V rows change
    assert torch.equal(v_rotated[k_rows], v_ref[k_rows]) or not spec.fused_qkv
    ids = torch.tensor([StubTokenizer().encode(text(37, seed=2))])   # odd length
    lead = torch.tensor([prefix_ids], dtype=torch.long)
    with torch.no_grad():
        want = ref(torch.cat([lead, ids], 1)).logits[:, len(prefix_ids):]
        cache = model.pqk_state.make_cache(1)
        assert isinstance(cache, KeyRotatingCache)
        got = model(ids, past_key_values=cache).logits
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
        # the cache holds rotated keys: without the query rotation the logits would differ
        assert not torch.allclose(cache.layers[0].k.view(), cache.layers[0].k.view() @ h.T, atol=1e-3)
        # a call without the key-rotating cache rotates neither side (V's folded rotation is exact on its own)
        torch.testing.assert_close(model(ids, use_cache=False).logits, ref(ids).logits, atol=1e-4, rtol=1e-4)
    gen = dict(max_new_tokens=5, do_sample=False, pad_token_id=0)
    user = torch.cat([torch.tensor([[BOS]]), ids[:, :9]], 1)
    want_seq = ref.generate(torch.cat([lead, user[:, 1:] if prefix_ids[-1:] == [BOS] else user], 1), **gen)
    assert torch.equal(model.generate(user, **gen)[:, -5:], want_seq[:, -5:])


def test_static_4bit_cache_error_is_smaller_on_rotated_keys_with_an_outlier_channel():
    g = torch.Generator().manual_seed(0)
    t, d = 97, 64
    q = torch.randn(1, 4, t, d, generator=g)                  # 4 query heads on 2 KV heads (GQA)
    k = torch.randn(1, 2, t, d, generator=g)
    k[..., 5] = k[..., 5] * 30 + 20                           # an outlier channel (as K has after RoPE)
    v = torch.randn(1, 2, t, d, generator=g)
    h = rotation.random_orthogonal(d, 0).float()
    ref = q @ k.repeat_interleave(2, 1).transpose(-1, -2)
    errs = {}
    for name, rot in (("plain", None), ("rotated", h)):
        qq = q if rot is None else q @ rot
        kk = k if rot is None else k @ rot
        ks, vs = scales.search_kv_scales([qq[0]], [kk[0]], [v[0]], 4)   # the per-head static scales, searched
        cache = build_cache(1, "static", 4, key_scales=[ks], value_scales=[vs], key_rotation=rot)
        k_hat, _ = cache.update(k, v, 0)
        if rot is not None:   # the cache quantized K H with the searched per-head scales
            want = torch.stack([scales.fake_quant_act(kk[0, i], float(ks[i]), 4) for i in range(2)]).unsqueeze(0)
            torch.testing.assert_close(k_hat, want, atol=1e-5, rtol=1e-5)
        errs[name] = float((qq @ k_hat.repeat_interleave(2, 1).transpose(-1, -2) - ref).pow(2).mean())
    assert errs["rotated"] < 0.25 * errs["plain"], errs


def test_quantized_kv4_with_rotation_beats_without_on_a_key_outlier_channel():
    """End to end, W8A8 + static KV4: a k_proj with an outlier output channel per head, and q/k large enough that
    attention is not uniform (else K's error would not matter) -> the rotated cache follows the float model
    closer (measured: 2.8e-4 vs 1.1e-3 mean squared logit error; both 1.0e-5 with a 16-bit cache)."""
    def planted():
        m = tiny_model("llama")
        with torch.no_grad():
            for layer in m.model.layers:
                layer.self_attn.q_proj.weight *= 10
                w = layer.self_attn.k_proj.weight
                w *= 3
                w.view(2, 16, -1)[:, 3] *= 10                    # [H_kv, D, hidden]: channel 3 of every head
        return m
    ref = planted()
    ids = torch.tensor([StubTokenizer().encode(text(120, seed=7))])
    errs = {}
    for kv_rotate in (False, True):
        cfg = pqk.QuantConfig(w_bits=8, a_bits=8, kv_bits=4, kv_rotate=kv_rotate, weight_method="rtn",
                              calib_samples=2, calib_seq_len=64)
        model = pqk.quantize_model(planted(), StubTokenizer(), text(), cfg, progress=False)
        assert model.pqk_state.rotates_qk == kv_rotate
        st = model.pqk_state
        with torch.no_grad():
            want = ref(torch.cat([st.prefix_ids.unsqueeze(0), ids], 1)).logits[:, st.prefix_len:]
            errs[kv_rotate] = float((model(ids).logits - want).pow(2).mean())
    assert errs[True] < 0.5 * errs[False], errs


def test_attention_other_than_sdpa_or_eager_is_refused_before_any_change():
    model = tiny_model("llama")
    model.config._attn_implementation = "flex_attention"
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="kv_rotate needs attn_implementation 'sdpa' or 'eager'"):
        pqk.quantize_model(model, StubTokenizer(), text(), pqk.QuantConfig(calib_samples=2, calib_seq_len=64),
                           progress=False)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    with pytest.raises(ValueError, match="head_dim 16, the rotation is"):
        attention.rotate_heads(torch.zeros(1, 2, 3, 16), torch.eye(8))
