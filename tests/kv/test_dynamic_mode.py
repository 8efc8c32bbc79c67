"""KV mode "dynamic" (prefixquant_kernels/cache/modes/dynamic.py), the QuaRot-style per-token baseline: the numbers
are the per-(token, head) fake quantization the model state's dynamic KV always returned (4-bit asymmetric with one
group of D channels, 8-bit symmetric), whether held packed (4-bit, D a power of 2: what benchmarks/e2e.py measures)
or as 16-bit rows (8-bit, or a head_dim the packed kernels do not take)."""
import pytest
import torch

import prefixquant_kernels as pqk
from prefixquant_kernels import format as fmt
from prefixquant_kernels import kv_format as kvf

from .conftest import KV_BACKENDS, rand_kv

H = 2


def _fake_quant(x: torch.Tensor, bits: int) -> torch.Tensor:
    """Quantized and dequantized per (token, head), in x's dtype: the reference formats, computed here."""
    if bits == 8:
        s = fmt.per_token_scale(x, 8).unsqueeze(-1)
        return (fmt.quantize(x, s, 8).float() * s).to(x.dtype)
    d = x.shape[-1]
    q, s, z = kvf.quantize_groupwise(x, 4, d, "token")
    return kvf.dequantize_groupwise(q, s, z, 4, d, "token").to(x.dtype)


def _run(cache, gen, d, dtype, sizes=(7, 1, 1, 5), b=2):
    ks, vs, out = [], [], None
    for t in sizes:
        k, v = rand_kv((b, H, t, d), dtype, gen), rand_kv((b, H, t, d), dtype, gen)
        ks.append(k)
        vs.append(v)
        out = cache.update(k, v, 0)
    return torch.cat(ks, 2), torch.cat(vs, 2), out


@pytest.mark.parametrize("backend", KV_BACKENDS)
@pytest.mark.parametrize("bits,d,packed", [(4, 64, True), (4, 128, True), (4, 48, False), (8, 64, False)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("prefix", [False, True])
def test_returns_the_per_token_fake_quantized_history(backend, bits, d, packed, dtype, prefix, gen):
    pk = rand_kv((1, H, 3, d), dtype, gen) if prefix else None
    pv = rand_kv((1, H, 3, d), dtype, gen) if prefix else None
    cache = pqk.PrefixQuantCache(1, "dynamic", bits=bits, prefix_keys=None if pk is None else [pk],
                                 prefix_values=None if pv is None else [pv], backend=backend)
    k_all, v_all, (k_out, v_out) = _run(cache, gen, d, dtype)
    n = k_all.shape[2]
    for got, x, pre in ((k_out, k_all, pk), (v_out, v_all, pv)):
        want = _fake_quant(x, bits)
        if pre is not None:
            want = torch.cat([pre.expand(x.shape[0], -1, -1, -1), want], 2)
        assert got.dtype == dtype and torch.equal(got, want)
    layer = cache.layers[0]
    assert layer.packed is packed and cache.get_seq_length() == (3 if prefix else 0) + n
    m = cache.memory_bytes()
    if packed:   # 4 bits per value, an fp16 scale and zero per (token, head); nothing in 16 bits
        assert (m["body"], m["scales"], m["fp16"]) == (2 * 2 * H * n * d // 2, 2 * 2 * 2 * H * n * 2, 0)
    else:
        assert m["fp16"] == 2 * 2 * H * n * d * dtype.itemsize


def test_bits_default_and_widths(gen):
    assert pqk.PrefixQuantCache(1, "dynamic").bits == 4
    with pytest.raises(ValueError, match=r"bits=2 is not supported by mode='dynamic' \(supported: \(4, 8\)\)"):
        pqk.PrefixQuantCache(1, "dynamic", bits=2)
    with pytest.raises(ValueError, match="takes no option 'key_scales'|key_scales/value_scales are for"):
        pqk.PrefixQuantCache(1, "dynamic", key_scales=[torch.ones(H)])


def test_model_state_builds_it_from_the_config(gen):
    from prefixquant_kernels.models.state import PrefixQuantState
    cfg = pqk.QuantConfig(w_bits=8, a_bits=8, kv_bits=8, act_quant="dynamic", prefix=False)
    assert cfg.resolved_kv_mode == "dynamic"
    state = PrefixQuantState(cfg, 2, H, 64, 0, None)
    assert not any(n.startswith("key_scales") for n, _ in state.named_buffers())   # no calibrated scales
    cache = state.make_cache()
    assert cache.mode == "dynamic" and [layer.bits for layer in cache.layers] == [8, 8]
