"""Centered keys (QuantConfig.k_center): the static KV cache quantizes ``K H - mu`` with a calibrated per-head offset
mu [H_kv, D], the 16-bit prefix keys stored centered too. ``q (k - mu)^T`` shifts a query's every score by the same
``q mu^T``, so the attention is unchanged in float; the cache, the pipeline's prefix, the checkpoint, the compiled
step and the fine-tuning's KV quantizer must all apply the same mu."""
import pytest
import torch

import prefixquant_kernels as pqk
from prefixquant_kernels import kv_format as kvf
from prefixquant_kernels.cache import KeyRotatingCache, build_cache
from prefixquant_kernels.calibration.finetune import PrefixKV
from prefixquant_kernels.calibration.pipeline import quantize_model
from prefixquant_kernels.calibration.rotation import random_orthogonal

from .tiny import BOS, StubTokenizer, text, tiny_model

_MODELS: dict = {}


def _quantized(k_center: bool, a_bits: int = 8):
    key = (k_center, a_bits)
    if key not in _MODELS:
        cfg = pqk.QuantConfig(w_bits=4, a_bits=a_bits, kv_bits=4, k_center=k_center, calib_samples=2,
                              calib_seq_len=64)
        _MODELS[key] = quantize_model(tiny_model("llama"), StubTokenizer(), text(), cfg, progress=False)
    return _MODELS[key]


def _ids(batch=2, t=23, seed=1):
    ids = torch.randint(3, 120, (batch, t), generator=torch.Generator().manual_seed(seed))
    ids[:, 0] = BOS
    return ids


def _keys(seed, b, t, h, d):
    """Random K / V [b, h, t, D], a key offset mu [h, D], a rotation [D, D] and per-head K / V scales."""
    g = torch.Generator().manual_seed(seed)
    k, v = torch.randn(b, h, t, d, generator=g) * 3, torch.randn(b, h, t, d, generator=g)
    mu = torch.randn(h, d, generator=g)
    ks, vs = torch.rand(h, generator=g) + 0.2, torch.rand(h, generator=g) + 0.2
    return k, v, mu, random_orthogonal(d, seed).float(), ks, vs


def _centered_codes(k, rot, mu, ks):
    """What the cache stores for k, dequantized: the static 4-bit quantizer on ``K rot - mu``."""
    return kvf.dequantize_static(kvf.quantize_static(k @ rot - mu[None, :, None], ks, 4), ks, 4)


def test_the_cache_quantizes_rotated_keys_minus_the_offset():
    k, v, mu, rot, ks, vs = _keys(0, 1, 19, 2, 32)
    cache = build_cache(1, "static", 4, key_scales=[ks], value_scales=[vs], key_rotation=rot, key_offsets=[mu])
    assert isinstance(cache, KeyRotatingCache)
    k_hat, _ = cache.update(k, v, 0)
    torch.testing.assert_close(k_hat, _centered_codes(k, rot, mu, ks), atol=1e-6, rtol=0)
    # offsets alone (no rotation) also make a KeyRotatingCache
    only = build_cache(1, "static", 4, key_scales=[ks], value_scales=[vs], key_offsets=[mu])
    assert isinstance(only, KeyRotatingCache) and only.key_rotation is None
    with pytest.raises(TypeError, match=r"key_offsets must be a list with one entry per layer \(1\), got list of "
                                        r"length 2"):
        build_cache(1, "static", 4, key_scales=[ks], value_scales=[vs], key_offsets=[mu, mu])
    with pytest.raises(ValueError, match=r"key_offsets\[0\] must be a float tensor \[H_kv, D\]"):
        build_cache(1, "static", 4, key_scales=[ks], value_scales=[vs], key_offsets=[mu[0]])


def test_attention_is_unchanged_in_float_with_centered_prefix_and_body():
    """A 16-bit cache over the k_center model's stored (centered) prefix, subtracting the offsets from the new keys,
    gives the logits of one holding the uncentered prefix and keys; forgetting the offsets on either side does
    not (the check can fail)."""
    model = _quantized(True)
    st = model.pqk_state
    n = st.num_layers
    mus = [getattr(st, f"key_offsets_{i}") for i in range(n)]
    pk, pv = st._list("prefix_keys"), st._list("prefix_values")
    uncentered = [(k.float() + mu[None, :, None]) for k, mu in zip(pk, mus)]
    ids = _ids()[:, 1:]
    common = dict(key_rotation=st.qk_rotation, prefix_values=[p.float() for p in pv])

    def logits(keys, offsets):
        cache = build_cache(n, "fp16", key_offsets=offsets, prefix_keys=[k.float() for k in keys], **common)
        with torch.no_grad():
            return model(ids, past_key_values=cache).logits

    want = logits(uncentered, None)
    got = logits(pk, mus)
    torch.testing.assert_close(got, want, atol=2e-4, rtol=2e-4)
    wrong = (logits(pk, None) - want).abs().max()          # the prefix centered, the new keys not
    assert wrong > 20 * (got - want).abs().max(), (float(wrong), float((got - want).abs().max()))


def test_pipeline_centers_the_prefix_and_the_checkpoint_keeps_the_offsets(tmp_path):
    plain, cent = _quantized(False), _quantized(True)
    assert not hasattr(plain.pqk_state, "key_offsets_0")
    for i in range(cent.pqk_state.num_layers):
        mu = getattr(cent.pqk_state, f"key_offsets_{i}")
        assert mu.shape == (2, 16) and mu.abs().max() > 1e-3
        # same seed, same rotation and prefix: the centered prefix keys are the plain ones minus mu (fp16 storage)
        a = getattr(cent.pqk_state, f"prefix_keys_{i}").float() + mu[None, :, None]
        b = getattr(plain.pqk_state, f"prefix_keys_{i}").float()
        torch.testing.assert_close(a, b, atol=4e-3 * float(b.abs().max()), rtol=0)
    ids = _ids()
    pqk.save_quantized(cent, str(tmp_path / "c"), float_dtype="float32")
    loaded = pqk.load_quantized(str(tmp_path / "c"))
    assert loaded.pqk_state.cfg.k_center
    for i in range(cent.pqk_state.num_layers):
        assert torch.equal(getattr(loaded.pqk_state, f"key_offsets_{i}"), getattr(cent.pqk_state, f"key_offsets_{i}"))
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, cent(ids).logits)


def test_compiled_generate_equals_eager_with_centered_keys():
    model = _quantized(True)
    ids = _ids(batch=2, t=9)
    mask = torch.ones_like(ids)
    mask[1, :2] = 0
    kw = dict(attention_mask=mask, max_new_tokens=8, do_sample=False, output_logits=True,
              return_dict_in_generate=True)
    eager = model.generate(ids, pqk_compile=False, **kw)
    comp = model.generate(ids, pqk_compile=True, **kw)
    assert hasattr(model, "_compiled_call")
    assert torch.equal(comp.sequences, eager.sequences)
    for a, b in zip(comp.logits, eager.logits):
        torch.testing.assert_close(a, b, rtol=0, atol=0.03 * float(b.abs().max()))


def test_finetune_kv_quantizer_centers_in_the_rotated_space():
    k, v, mu, rot, ks, vs = _keys(2, 3, 7, 2, 16)
    k_hat, _ = PrefixKV(None, None, ks, vs, 4, rot, mu).update(k, v)
    torch.testing.assert_close(k_hat @ rot - mu[None, :, None], _centered_codes(k, rot, mu, ks), atol=1e-5, rtol=0)
