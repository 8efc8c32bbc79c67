"""PrefixQuantCache: each mode's layout and selection rules at the layer level (no model), the memory report,
bad arguments; and generate() on tiny random Llama / Qwen2 / Qwen3 models: the Triton path (interpreted)
produces the same tokens as the reference path, fp16 mode the same as transformers' DynamicCache."""
import pytest
import torch
from transformers import AutoModelForCausalLM, DynamicCache, LlamaConfig, Qwen2Config, Qwen3Config

import prefixquant_kernels as pqk
from prefixquant_kernels import kv_format as kvf
from prefixquant_kernels.cache.modes.logquant import logquant_select

from .conftest import KV_BACKENDS, needs_triton, rand_kv

H, D = 2, 64


def _prefix(gen, p=3, b=1):
    return rand_kv((b, H, p, D), torch.float16, gen), rand_kv((b, H, p, D), torch.float16, gen)


def _feed(cache, gen, sizes, b=2):
    """Update layer 0 with chunks of the given token counts; returns (all K, all V, last returned K, V)."""
    ks, vs, out = [], [], None
    for t in sizes:
        k, v = rand_kv((b, H, t, D), torch.float16, gen), rand_kv((b, H, t, D), torch.float16, gen)
        ks.append(k)
        vs.append(v)
        out = cache.update(k, v, 0)
    return torch.cat(ks, 2), torch.cat(vs, 2), out


# ---- layout of each mode, against the reference formats ---------------------------------------------------------

@pytest.mark.parametrize("backend", KV_BACKENDS)
def test_prefixquant_returns_prefix_and_dequantized_history(backend, gen):
    pk, pv = _prefix(gen)
    ks, vs = torch.rand(H, generator=gen) + 0.2, torch.rand(H, generator=gen) + 0.2
    cache = pqk.PrefixQuantCache(1, "prefixquant", key_scales=[ks], value_scales=[vs], prefix_keys=[pk],
                                 prefix_values=[pv], backend=backend)
    assert cache.get_seq_length() == 3
    k_all, v_all, (k_out, v_out) = _feed(cache, gen, [5, 1, 1, 7])
    assert cache.get_seq_length() == 3 + 14 and cache.get_mask_sizes(1, 0) == (18, 0)
    for got, x, s, pre in ((k_out, k_all, ks, pk), (v_out, v_all, vs, pv)):
        want = kvf.dequant_concat(pre, kvf.dequantize_static(kvf.quantize_static(x, s, 4), s, 4), None, None, None,
                                  torch.float16)
        torch.testing.assert_close(got, want, rtol=torch.finfo(torch.float16).eps, atol=0)
    assert cache.layers[0].prefix_keys is pk  # the shared prefix is held as given: no per-batch copy


@pytest.mark.parametrize("backend", KV_BACKENDS)
def test_kivi_window_and_key_blocks(backend, gen):
    g, r = 4, 8
    cache = pqk.PrefixQuantCache(1, "kivi", group_size=g, residual_length=r, backend=backend)
    k_all, v_all, (k_out, v_out) = _feed(cache, gen, [11, 1, 1, 1, 1, 1])
    n = 16
    layer = cache.layers[0]
    assert layer.k.fp_pos == list(range(n // r * r, n))     # keys: whole blocks of R quantized
    assert layer.v.fp_pos == list(range(n - r, n))          # values: a sliding window of the R most recent
    nk = n // r * r
    want_k = torch.cat([kvf.dequantize_groupwise(*kvf.quantize_groupwise(k_all[:, :, :nk], 2, g, "channel"), 2, g,
                                                 "channel"), k_all[:, :, nk:].float()], 2).half()
    torch.testing.assert_close(k_out, want_k, rtol=torch.finfo(torch.float16).eps, atol=0)
    # values were quantized one token at a time as they left the window: per-token groups give the same bits
    want_v = torch.cat([kvf.dequantize_groupwise(*kvf.quantize_groupwise(v_all[:, :, :n - r], 2, g, "token"), 2, g,
                                                 "token"), v_all[:, :, n - r:].float()], 2).half()
    torch.testing.assert_close(v_out, want_v, rtol=torch.finfo(torch.float16).eps, atol=0)


def _logquant_prefill(n: int, w: int) -> list[int]:
    """The LogQuant repo's prefill rule (ANCHORS): while len(idx) >= 3W: S = idx[0:2W:2], L = idx[2W:]."""
    idx = list(range(n))
    while len(idx) >= 3 * w:
        idx = idx[0:2 * w:2] + idx[2 * w:]
    return idx


@pytest.mark.parametrize("w", [2, 3, 5])
def test_logquant_selection_rule(w):
    s, l, left_all = [], [], []
    for n in range(1, 12 * w):
        s, l, left = logquant_select(s, l + [n - 1], w)      # one decode step
        left_all += left
        kept = s + l
        assert len(kept) <= 3 * w and len(l) <= 2 * w and kept == sorted(kept)
        assert sorted(kept + left_all) == list(range(n))      # every token is either 16-bit or quantized
        # the repo's prefill loop compresses at |S| + |L| >= 3W, one token earlier than the decode rule (|L| > 2W):
        # it keeps a subset of what decoding keeps. Here a prefill takes the decode rule (below), so that a prefill
        # of n tokens and n single steps hold the same tokens.
        assert set(_logquant_prefill(n, w)) <= set(kept)
        s2, l2, _ = logquant_select([], list(range(n)), w)    # a prefill of n tokens at once
        assert s2 + l2 == kept


@pytest.mark.parametrize("backend", KV_BACKENDS)
def test_logquant_layout(backend, gen):
    g, w = 4, 3
    pk, pv = _prefix(gen, p=1)
    cache = pqk.PrefixQuantCache(1, "logquant", group_size=g, window=w, prefix_keys=[pk], prefix_values=[pv],
                                 backend=backend)
    k_all, v_all, (k_out, v_out) = _feed(cache, gen, [10, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1])
    layer = cache.layers[0]
    fp = layer.fp16_positions()
    assert len(fp) <= 3 * w and layer.v.fp_pos == fp
    assert set(layer.k.fp_pos) == set(fp) | set(layer._pending_keys) and len(layer._pending_keys) < g
    # the 16-bit tokens come back exactly, at their positions after the prefix
    assert torch.equal(v_out[:, :, 0:1], pv.expand(2, -1, -1, -1))
    assert torch.equal(v_out[:, :, [1 + p for p in fp]], v_all[:, :, fp])
    assert torch.equal(k_out[:, :, [1 + p for p in layer.k.fp_pos]], k_all[:, :, layer.k.fp_pos])
    # every quantized value is within its group's quantization error of the original
    q = [p for p in range(k_all.shape[2]) if p not in set(fp)]
    err = (v_out[:, :, [1 + p for p in q]].float() - v_all[:, :, q].float()).abs()
    spread = v_all.float().amax() - v_all.float().amin()
    assert float(err.max()) <= float(spread) / 3 / 2 * 1.01


def test_memory_report_counts_held_tensors(gen):
    b, n = 2, 40
    pk, pv = _prefix(gen, p=4)
    modes = {"fp16": {}, "prefixquant": dict(key_scales=[torch.ones(H)], value_scales=[torch.ones(H)]),
             "kivi": dict(group_size=32, residual_length=32), "logquant": dict(group_size=32, window=4)}
    per_token = {}
    for mode, kw in modes.items():
        cache = pqk.PrefixQuantCache(1, mode, prefix_keys=[pk], prefix_values=[pv], backend="reference", **kw)
        _feed(cache, gen, [n], b=b)
        m = cache.memory_bytes()
        assert m["prefix"] == 2 * pk.numel() * 2                       # counted once, not per sequence
        assert m["total"] == sum(v for k, v in m.items() if k != "total")
        per_token[mode] = cache.bytes_per_token_per_layer()
    assert per_token["fp16"] == 2 * H * D * 2                           # K and V, 2 bytes each
    assert per_token["prefixquant"] == 2 * H * D / 2 + 2 * H * 4 / (n * b)  # 4-bit body + the static scales
    assert per_token["prefixquant"] < per_token["logquant"] < per_token["fp16"]


@pytest.mark.parametrize("kwargs,exc,match", [
    (dict(mode="int3"), ValueError, "mode must be one of"),
    (dict(mode="prefixquant"), ValueError, "needs key_scales and value_scales"),
    (dict(mode="prefixquant", key_scales=[torch.ones(H)], value_scales=[torch.ones(H), torch.ones(H)]), TypeError,
     r"value_scales must be a list with one entry per layer \(1\)"),
    (dict(mode="prefixquant", key_scales=[torch.zeros(H)], value_scales=[torch.ones(H)]), ValueError,
     r"key_scales\[0\] must be finite and > 0"),
    (dict(mode="prefixquant", key_scales=[torch.ones(1, H)], value_scales=[torch.ones(H)]), ValueError,
     r"key_scales\[0\] must be 1-D"),
    (dict(mode="kivi", key_scales=[torch.ones(H)]), ValueError, "key_scales/value_scales are for mode='prefixquant'"),
    (dict(mode="kivi", group_size=32, residual_length=48), ValueError, "residual_length must be a multiple of"),
    (dict(mode="kivi", group_size=12), ValueError, "group_size must be a power of 2"),
    (dict(mode="logquant", window=0), ValueError, "window must be a positive int"),
    (dict(mode="fp16", prefix_keys=[torch.zeros(1, H, 2, D)]), ValueError, "must both be given"),
    (dict(mode="fp16", prefix_keys=[torch.zeros(1, H, 2, D)], prefix_values=[torch.zeros(1, H, 3, D)]), ValueError,
     "must have the same shape"),
    (dict(mode="fp16", backend="cuda"), ValueError, "backend must be one of"),
])
def test_bad_arguments(kwargs, exc, match):
    with pytest.raises(exc, match=r"^pqk\.PrefixQuantCache: .*" + match):
        pqk.PrefixQuantCache(1, **kwargs)


@pytest.mark.parametrize("prefix_shape,scales,match", [
    ((3, H, 2, D), None, r"prefix_keys must have shape \(1 or 2, 2, P, 64\)"),   # P > 0, batch 3 vs 2
    ((1, H + 1, 2, D), None, "prefix_keys must have shape"),
    ((1, H, 2, D // 2), None, "prefix_keys must have shape"),
    (None, 3, r"key_scales must have shape \(2,\)"),
])
def test_mismatch_with_the_model_is_caught_at_the_first_update(prefix_shape, scales, match, gen):
    pre = None if prefix_shape is None else [torch.zeros(prefix_shape)]
    kw = dict(mode="fp16") if scales is None else dict(
        mode="prefixquant", key_scales=[torch.ones(scales)], value_scales=[torch.ones(scales)])
    cache = pqk.PrefixQuantCache(1, prefix_keys=pre, prefix_values=pre, **kw)
    with pytest.raises(ValueError, match=match):
        _feed(cache, gen, [3])


# ---- generate() on tiny random models -------------------------------------------------------------------------

CONFIGS = {
    "llama": LlamaConfig,
    "qwen2": Qwen2Config,
    "qwen3": Qwen3Config,
}
N_PREFIX, N_PROMPT, N_NEW = 3, 6, 6


def _tiny_model(arch: str):
    cfg = CONFIGS[arch](hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                        num_key_value_heads=2, vocab_size=128, max_position_embeddings=128)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(cfg).eval(), cfg


def _prefix_and_scales(model, ids):
    """The prefix K/V of every layer (from the shared first tokens) and static per-head scales (calibration)."""
    with torch.no_grad():
        prefix_cache = DynamicCache(config=model.config)
        model(ids[:1, :N_PREFIX], past_key_values=prefix_cache)
        calib = DynamicCache(config=model.config)
        model(ids, past_key_values=calib)
    pk = [layer.keys for layer in prefix_cache.layers]
    pv = [layer.values for layer in prefix_cache.layers]
    amax = lambda t: t[:, :, N_PREFIX:].abs().amax(dim=(0, 2, 3)) / 7  # noqa: E731 (tokens after the prefix)
    return pk, pv, [amax(l.keys) for l in calib.layers], [amax(l.values) for l in calib.layers]


def _generate(model, ids, cache, sample: bool, new: int = N_NEW, **extra):
    torch.manual_seed(1234)
    kw = dict(do_sample=True, top_k=20, temperature=1.0) if sample else dict(do_sample=False)
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), past_key_values=cache,
                             max_new_tokens=new, min_new_tokens=new, pad_token_id=0, **kw, **extra)
    return out[:, ids.shape[1]:]


def _cache(mode, n_layers, pk, pv, ks, vs, backend):
    kw = {"prefixquant": dict(key_scales=ks, value_scales=vs), "kivi": dict(group_size=4, residual_length=4),
          "logquant": dict(group_size=4, window=2), "fp16": {}}[mode]
    return pqk.PrefixQuantCache(n_layers, mode, prefix_keys=pk, prefix_values=pv, backend=backend, **kw)


def _ids(gen):
    ids = torch.randint(1, 128, (2, N_PREFIX + N_PROMPT), generator=gen)
    ids[1, :N_PREFIX] = ids[0, :N_PREFIX]  # the same prefix tokens lead every sequence
    return ids


@pytest.mark.parametrize("arch", list(CONFIGS))
@pytest.mark.parametrize("sample", [False, True])
def test_fp16_mode_generates_like_dynamic_cache(arch, sample, gen):
    model, cfg = _tiny_model(arch)
    ids = _ids(gen)
    pk, pv, _, _ = _prefix_and_scales(model, ids)
    want = _generate(model, ids, DynamicCache(config=cfg), sample)
    got = _generate(model, ids, _cache("fp16", 2, pk, pv, None, None, "reference"), sample)
    assert torch.equal(got, want)


@needs_triton
@pytest.mark.parametrize("arch,mode,sample", [
    ("llama", "prefixquant", False), ("llama", "prefixquant", True), ("llama", "kivi", False),
    ("llama", "logquant", False), ("qwen2", "prefixquant", False), ("qwen2", "kivi", True),
    ("qwen3", "prefixquant", True), ("qwen3", "logquant", False),
])
def test_triton_path_generates_like_reference(arch, mode, sample, gen):
    model, _ = _tiny_model(arch)
    ids = _ids(gen)
    pk, pv, ks, vs = _prefix_and_scales(model, ids)
    caches = {be: _cache(mode, 2, pk, pv, ks, vs, be) for be in ("reference", "triton")}
    ref = _generate(model, ids, caches["reference"], sample)
    tri = _generate(model, ids, caches["triton"], sample)
    assert torch.equal(tri, ref)
    assert caches["triton"].get_seq_length() == N_PREFIX + N_PROMPT + N_NEW - 1
    assert caches["triton"].memory_bytes() == caches["reference"].memory_bytes()
