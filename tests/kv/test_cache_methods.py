"""PrefixQuantCache beyond greedy decoding: beam reordering / batch selection / repeat, crop, reset.

Layer level: a cache whose batch rows were selected is bit-exact with a cache fed the selected sequences from
the start (every quantizer works per batch row), in every mode; a cropped "fp16" / "prefixquant" / "dynamic" cache
is bit-exact with one built from the shorter sequence; a cropped "kivi" / "logquant" cache returns exactly what it
returned before the crop for the remaining positions. Model level: generate(num_beams=2/3) and assisted generation."""
import pytest
import torch
from transformers import AutoModelForCausalLM, DynamicCache

import prefixquant_kernels as pqk

from .conftest import needs_triton, rand_kv
from .test_prefix_quant_cache import _cache, _generate, _ids, _prefix_and_scales, _tiny_model

H, D, P = 2, 64, 3
MODES = {"fp16": {}, "prefixquant": None, "kivi": dict(group_size=4, residual_length=8),
         "logquant": dict(group_size=4, window=2), "dynamic": {}}


def _make(mode, prefix, gen_or_scales, backend="reference"):
    kw = MODES[mode]
    if kw is None:
        kw = dict(key_scales=[gen_or_scales[0]], value_scales=[gen_or_scales[1]])
    pk, pv = prefix if prefix is not None else (None, None)
    return pqk.PrefixQuantCache(1, mode, prefix_keys=None if pk is None else [pk],
                                prefix_values=None if pv is None else [pv], backend=backend, **kw)


def _data(gen, b, n):
    return rand_kv((b, H, n, D), torch.float16, gen), rand_kv((b, H, n, D), torch.float16, gen)


def _feed(cache, k, v, sizes):
    """Update layer 0 with consecutive chunks of k/v of the given token counts; the last returned (K, V)."""
    out, t = None, 0
    for n in sizes:
        out = cache.update(k[:, :, t:t + n], v[:, :, t:t + n], 0)
        t += n
    return out


def _scales(gen):
    return torch.rand(H, generator=gen) + 0.2, torch.rand(H, generator=gen) + 0.2


def _assert_same(a, b):
    for x, y in zip(a, b):
        assert x.shape == y.shape and torch.equal(x, y)


# ---- batch selection -----------------------------------------------------------------------------------------

SELECTIONS = {
    "reorder": (lambda c: c.reorder_cache(torch.tensor([2, 0, 2])), [2, 0, 2]),
    "select": (lambda c: c.batch_select_indices(torch.tensor([1, 2])), [1, 2]),
    "repeat_interleave": (lambda c: c.batch_repeat_interleave(2), [0, 0, 1, 1, 2, 2]),
}


@pytest.mark.parametrize("how,shared_prefix", [("reorder", True), ("select", False), ("repeat_interleave", True),
                                                ("reorder", False)])
@pytest.mark.parametrize("mode", list(MODES))
def test_batch_selection_is_exact(mode, how, shared_prefix, gen):
    b, sizes, more = 3, [13, 1, 1, 1], [1, 1, 5, 1]       # prefill, decode steps; then more after the selection
    prefix = _data(gen, 1 if shared_prefix else b, P)
    scales = _scales(gen)
    k, v = _data(gen, b, sum(sizes) + sum(more))
    n0 = sum(sizes)
    cache = _make(mode, prefix, scales)
    _feed(cache, k[:, :, :n0], v[:, :, :n0], sizes)
    select, idx = SELECTIONS[how]
    select(cache)
    layer = cache.layers[0]
    assert layer.batch == len(idx)
    if shared_prefix:
        assert layer.prefix_keys is prefix[0] and layer.prefix_values is prefix[1]  # shared: never copied
    # the same sequences, fed from the start
    fresh_prefix = prefix if shared_prefix else (prefix[0][idx], prefix[1][idx])
    fresh = _make(mode, fresh_prefix, scales)
    _feed(fresh, k[idx, :, :n0], v[idx, :, :n0], sizes)
    got = _feed(cache, k[idx, :, n0:], v[idx, :, n0:], more)
    want = _feed(fresh, k[idx, :, n0:], v[idx, :, n0:], more)
    _assert_same(got, want)
    assert cache.memory_bytes() == fresh.memory_bytes()
    if not shared_prefix:                                   # selected into a new tensor, the user's untouched
        assert layer.prefix_keys is not prefix[0] and torch.equal(layer.prefix_keys, prefix[0][idx])


def test_selection_before_the_first_update_selects_a_per_sequence_prefix(gen):
    prefix = _data(gen, 2, P)
    cache = _make("fp16", prefix, None)
    cache.batch_repeat_interleave(2)
    assert torch.equal(cache.layers[0].prefix_keys, prefix[0].repeat_interleave(2, 0))
    shared = _make("fp16", _data(gen, 1, P), None)
    shared.batch_repeat_interleave(3)                       # batch-1 prefix: nothing to repeat
    assert shared.layers[0].prefix_keys.shape[0] == 1


# ---- crop ----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("mode", ["fp16", "prefixquant", "dynamic"])
@pytest.mark.parametrize("k_remove", [1, 5, 17, 17 + 2, 17 + P])  # within the tokens, all of them, into the prefix
def test_crop_is_exact_for_per_token_modes(mode, k_remove, gen):
    b, sizes = 2, [11, 1, 1, 4]
    prefix, scales = _data(gen, 1, P), _scales(gen)
    k, v = _data(gen, b, 17 + 3)
    cache = _make(mode, prefix, scales)
    _feed(cache, k, v, sizes)
    cache.crop(-k_remove)
    n = 17 - k_remove                                        # tokens kept after the prefix (< 0: into the prefix)
    assert cache.get_seq_length() == P + 17 - k_remove
    p_keep = min(P, P + n)
    fresh = _make(mode, (prefix[0][:, :, :p_keep], prefix[1][:, :, :p_keep]), scales)
    if n > 0:
        _feed(fresh, k[:, :, :n], v[:, :, :n], [n])
    got = _feed(cache, k[:, :, 17:], v[:, :, 17:], [3])     # the next chunk, the same for both
    want = _feed(fresh, k[:, :, 17:], v[:, :, 17:], [3])
    _assert_same(got, want)
    assert cache.memory_bytes() == fresh.memory_bytes()


def _held_positions(store) -> list[int]:
    body = list(range(store.packed.n)) if store.in_order else store.body_pos.view().reshape(-1).tolist()
    return body + store.fp_pos


@pytest.mark.parametrize("mode", ["kivi", "logquant"])
@pytest.mark.parametrize("k_remove", [1, 2, 3, 6, 9, 20, 26])
def test_crop_keeps_what_the_groupwise_modes_returned(mode, k_remove, gen):
    b, sizes, later = 2, [13, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1], 9   # 26 tokens, then 9 more one at a time
    prefix = _data(gen, 1, P)
    k, v = _data(gen, b, 26 + later)
    cache = _make(mode, prefix, None)
    before = _feed(cache, k, v, sizes)
    layer = cache.layers[0]
    nq_keys = layer.k.packed.n
    cache.crop(-k_remove)
    m = 26 - k_remove
    g = layer.k.group_size
    assert layer.k.packed.n % g == 0 and layer.k.packed.n <= nq_keys
    dissolved = layer.k.packed.n < nq_keys and m > layer.k.packed.n
    for store in (layer.k, layer.v):                         # every kept position once, in the body or 16-bit
        assert sorted(_held_positions(store)) == list(range(m))
    if mode == "logquant":
        fp = layer.fp16_positions()
        assert layer.v.fp_pos == fp and set(layer.k.fp_pos) == set(fp) | set(layer._pending_keys)
    # the remaining positions come back exactly as before the crop, then decoding goes on consistently
    t = 26
    for step in range(later):
        out = cache.update(k[:, :, t:t + 1], v[:, :, t:t + 1], 0)
        t += 1
        if step == 0:
            for x, y in zip(out, before):
                assert torch.equal(x[:, :, :P + m], y[:, :, :P + m])
        for store in (layer.k, layer.v):
            assert sorted(_held_positions(store)) == list(range(m + step + 1))
    assert cache.get_seq_length() == P + m + later
    if mode == "kivi":  # R = 8, G = 4: keys 0..23 quantized; a crop to m < 24 tokens cuts a group unless 4 | m
        assert dissolved == (m < 24 and m % g != 0)


def test_crop_of_kivi_dissolves_a_partial_key_group(gen):
    """R = 8, G = 4: 16 keys quantized (4 groups), 16 + 2 tokens; crop 4 -> 14 tokens: group 12..15 loses 2."""
    k, v = _data(gen, 1, 18)
    cache = _make("kivi", None, None)
    before = _feed(cache, k, v, [18])
    layer = cache.layers[0]
    assert layer.k.packed.n == 16 and layer.k.fp_pos == [16, 17]
    cache.crop(-4)
    assert layer.k.packed.n == 12 and layer.k.fp_pos == [12, 13]
    kk, vv = layer.keys_values(torch.float16)
    assert torch.equal(kk, before[0][:, :, :14]) and torch.equal(vv, before[1][:, :, :14])
    assert cache.is_croppable is False and _make("prefixquant", None, _scales(gen)).is_croppable is True


# ---- reset, bad arguments ------------------------------------------------------------------------------------

@pytest.mark.parametrize("mode", list(MODES))
def test_reset_keeps_only_the_prefix(mode, gen):
    prefix, scales = _data(gen, 1, P), _scales(gen)
    k, v = _data(gen, 2, 14)
    cache = _make(mode, prefix, scales)
    _feed(cache, k, v, [9, 1])
    cache.reset()
    assert cache.get_seq_length() == P
    fresh = _make(mode, prefix, scales)
    _assert_same(_feed(cache, k, v, [13, 1]), _feed(fresh, k, v, [13, 1]))


@pytest.mark.parametrize("call,exc,match", [
    (lambda c: c.crop(2), ValueError, r"crop takes minus the number of tokens to remove .*got 2"),
    (lambda c: c.crop(-(P + 6)), ValueError, r"crop\(-9\) removes more tokens than the cache holds \(8\)"),
    (lambda c: c.crop(-1.0), TypeError, "tokens_to_remove must be an int"),
    (lambda c: c.reorder_cache(torch.tensor([0.0, 1.0])), TypeError, "beam_idx must be a 1-D integer tensor"),
    (lambda c: c.reorder_cache(torch.tensor([[0, 1]])), TypeError, "beam_idx must be a 1-D integer tensor"),
    (lambda c: c.reorder_cache(torch.tensor([0, 2])), ValueError, r"beam_idx must hold batch indices in \[0, 2\)"),
    (lambda c: c.batch_select_indices(torch.tensor([-1])), ValueError, "indices must hold batch indices"),
    (lambda c: c.batch_repeat_interleave(0), ValueError, "repeats must be a positive int"),
])
def test_bad_arguments_leave_the_cache_as_it_was(call, exc, match, gen):
    prefix = _data(gen, 1, P)
    k, v = _data(gen, 2, 5)
    cache = _make("kivi", prefix, None)
    before = _feed(cache, k, v, [5])
    with pytest.raises(exc, match=r"^pqk\.PrefixQuantCache: " + match):
        call(cache)
    _assert_same(cache.layers[0].keys_values(torch.float16), before)


def test_a_per_sequence_prefix_with_beams_names_the_fix(gen):
    prefix = _data(gen, 2, P)
    cache = _make("fp16", prefix, None)
    k, v = _data(gen, 6, 2)
    with pytest.raises(ValueError, match="give a batch-1 prefix, or repeat_interleave it by num_beams"):
        cache.update(k, v, 0)


# ---- generate() ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("arch,num_beams", [("llama", 3), ("qwen2", 2)])
def test_fp16_mode_beam_search_like_dynamic_cache(arch, num_beams, gen):
    model, cfg = _tiny_model(arch)
    ids = _ids(gen)
    pk, pv, _, _ = _prefix_and_scales(model, ids)
    want = _generate(model, ids, DynamicCache(config=cfg), False, num_beams=num_beams)
    cache = _cache("fp16", 2, pk, pv, None, None, "reference")
    got = _generate(model, ids, cache, False, num_beams=num_beams)
    assert torch.equal(got, want)
    assert cache.layers[0].prefix_keys is pk[0]             # the batch-1 prefix served every beam, never copied


@needs_triton
@pytest.mark.parametrize("arch,mode,num_beams", [("qwen2", "prefixquant", 2)])  # the interpreter is slow: one
def test_triton_beam_search_like_reference(arch, mode, num_beams, gen):
    model, _ = _tiny_model(arch)
    ids = _ids(gen)
    pk, pv, ks, vs = _prefix_and_scales(model, ids)
    out = {be: _generate(model, ids, _cache(mode, 2, pk, pv, ks, vs, be), False, num_beams=num_beams, new=4)
           for be in ("reference", "triton")}
    assert torch.equal(out["triton"], out["reference"])


@pytest.mark.parametrize("mode", ["fp16", "kivi"])  # exact crops / a crop that dissolves key groups
def test_assisted_generation_crops(mode, gen):
    """Assisted decoding verifies a draft and crops the rejected tokens. transformers 5.23's assisted decoding
    re-feeds a pre-filled cache's tokens (a DynamicCache fails the same way), so no prefix here."""
    model, cfg = _tiny_model("llama")
    torch.manual_seed(5)
    assistant = AutoModelForCausalLM.from_config(cfg).eval()
    ids = _ids(gen)[:1]
    _, _, ks, vs = _prefix_and_scales(model, ids)
    crops = []
    plain = _cache(mode, 2, None, None, ks, vs, "reference")
    assisted = _cache(mode, 2, None, None, ks, vs, "reference")
    orig = assisted.crop
    assisted.crop = lambda t: (crops.append(t), orig(t))[1]
    want = _generate(model, ids, plain, False, new=8)
    got = _generate(model, ids, assisted, False, new=8, assistant_model=assistant)
    assert any(t < 0 for t in crops)                         # rejected draft tokens were cropped
    assert assisted.get_seq_length() == plain.get_seq_length()
    if mode == "fp16":                                       # exact crops: the same tokens as plain greedy
        assert torch.equal(got, want)
